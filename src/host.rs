//! The injectable host root.
//!
//! Every path on the host (`/etc/rancher/k3s/config.yaml`, `/var/lib/irsa-agent`, the key files
//! a kubeadm manifest names, ...) is written in host terms and resolved through a [`HostRoot`],
//! so tests and `demo` run the real code against a fake host tree. No other module joins a
//! literal absolute path.

use std::path::{Component, Path, PathBuf};

/// Where the host's `/` is. `HostRoot::new("/")` is the real host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot {
    root: PathBuf,
}

impl Default for HostRoot {
    fn default() -> Self {
        HostRoot::new("/")
    }
}

impl HostRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HostRoot { root: root.into() }
    }

    /// The directory standing for `/`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// True when this is the real host (`/`).
    pub fn is_real(&self) -> bool {
        self.root == Path::new("/")
    }

    /// Resolves a host path (absolute, or relative to the host's `/`) under the root.
    ///
    /// `..` is resolved lexically and never climbs above the root, so a hostile or sloppy path
    /// in a config file cannot point outside a fake host.
    pub fn path(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
        for component in host_path.as_ref().components() {
            match component {
                Component::Normal(part) => parts.push(part),
                Component::ParentDir => {
                    parts.pop();
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            }
        }
        let mut out = self.root.clone();
        out.extend(parts);
        out
    }

    /// The host path (as the host sees it) of a path under this root, for messages.
    pub fn host_view(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.root) {
            Ok(rel) => Path::new("/").join(rel),
            Err(_) => path.to_path_buf(),
        }
    }
}

/// The kernel's host name (what kube-apiserver takes for its identity Lease, and the default
/// node name the agent coordinates under).
pub fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_under_root_and_never_escapes() {
        let host = HostRoot::new("/tmp/fake");
        assert_eq!(
            host.path("/etc/rancher/k3s/config.yaml"),
            Path::new("/tmp/fake/etc/rancher/k3s/config.yaml")
        );
        assert_eq!(host.path("etc/x"), Path::new("/tmp/fake/etc/x"));
        assert_eq!(
            host.path("/../../etc/passwd"),
            Path::new("/tmp/fake/etc/passwd")
        );
        assert_eq!(host.path("/a/./b/../c"), Path::new("/tmp/fake/a/c"));
        assert_eq!(
            host.host_view(Path::new("/tmp/fake/etc/x")),
            Path::new("/etc/x")
        );
        assert_eq!(HostRoot::default().path("/etc/x"), Path::new("/etc/x"));
    }
}
