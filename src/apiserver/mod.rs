//! The host's kube-apiserver: which distribution runs it and which key files it uses.
//!
//! Foundation scope: distribution detection and the distributions' default key locations.
//! The `apply` work replaces [`key_files`] with the effective flags computed exactly as each
//! distribution does (config.yaml + drop-ins + kube-apiserver-arg for k3s/RKE2, the static pod
//! manifest for kubeadm); callers (publish, run, doctor, rotate) keep using this interface.

use std::path::PathBuf;

use crate::config::Distribution;
use crate::host::HostRoot;

/// Host paths whose presence identifies each distribution.
const MARKERS: [(Distribution, &[&str]); 3] = [
    (
        Distribution::K3s,
        &["/etc/rancher/k3s", "/var/lib/rancher/k3s/server"],
    ),
    (
        Distribution::Rke2,
        &["/etc/rancher/rke2", "/var/lib/rancher/rke2/server"],
    ),
    (
        Distribution::Kubeadm,
        &["/etc/kubernetes/manifests/kube-apiserver.yaml"],
    ),
];

/// Why the distribution or its key files cannot be determined.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(
        "no Kubernetes control plane found under {root}: none of /etc/rancher/k3s, /var/lib/rancher/k3s/server, /etc/rancher/rke2, /var/lib/rancher/rke2/server, /etc/kubernetes/manifests/kube-apiserver.yaml exists; run irsa-agent on a server (control-plane) node, or set `distribution:`"
    )]
    NotFound { root: String },
    #[error(
        "several distributions found under {root} ({found}); set `distribution:` in the configuration to the one that runs the apiserver"
    )]
    Ambiguous { root: String, found: String },
}

/// Resolves `distribution: auto` by looking at the host.
pub fn detect(root: &HostRoot, configured: Distribution) -> Result<Distribution, DetectError> {
    if configured != Distribution::Auto {
        return Ok(configured);
    }
    let found: Vec<Distribution> = MARKERS
        .iter()
        .filter(|(_, paths)| paths.iter().any(|p| root.path(p).exists()))
        .map(|(d, _)| *d)
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(DetectError::NotFound {
            root: root.root().display().to_string(),
        }),
        many => Err(DetectError::Ambiguous {
            root: root.root().display().to_string(),
            found: many.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The apiserver's key files, as host paths, in flag order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    /// `--service-account-key-file`s.
    pub verification: Vec<PathBuf>,
    /// `--service-account-signing-key-file`.
    pub signing: PathBuf,
}

/// The key files a distribution uses by default.
pub fn key_files(root: &HostRoot, distribution: Distribution) -> Result<KeyFiles, DetectError> {
    let rancher = |name: &str| {
        let tls = format!("/var/lib/rancher/{name}/server/tls");
        let current = PathBuf::from(format!("{tls}/service.current.key"));
        let service = PathBuf::from(format!("{tls}/service.key"));
        // Older k3s/RKE2 releases sign with the first key of service.key.
        let signing = if root.path(&current).exists() {
            current
        } else {
            service.clone()
        };
        KeyFiles {
            verification: vec![service],
            signing,
        }
    };
    Ok(match detect(root, distribution)? {
        Distribution::K3s => rancher("k3s"),
        Distribution::Rke2 => rancher("rke2"),
        Distribution::Kubeadm | Distribution::Auto => KeyFiles {
            verification: vec![PathBuf::from("/etc/kubernetes/pki/sa.pub")],
            signing: PathBuf::from("/etc/kubernetes/pki/sa.key"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_distribution_and_refuses_ambiguity() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = HostRoot::new(dir.path());
        assert!(matches!(
            detect(&root, Distribution::Auto),
            Err(DetectError::NotFound { .. })
        ));
        std::fs::create_dir_all(root.path("/var/lib/rancher/k3s/server/tls"))?;
        assert_eq!(
            detect(&root, Distribution::Auto).ok(),
            Some(Distribution::K3s)
        );
        let files = key_files(&root, Distribution::Auto).ok();
        assert_eq!(
            files.map(|f| f.signing),
            Some(PathBuf::from("/var/lib/rancher/k3s/server/tls/service.key"))
        );
        std::fs::write(
            root.path("/var/lib/rancher/k3s/server/tls/service.current.key"),
            "",
        )?;
        let files = key_files(&root, Distribution::Auto).ok();
        assert_eq!(
            files.map(|f| f.signing),
            Some(PathBuf::from(
                "/var/lib/rancher/k3s/server/tls/service.current.key"
            ))
        );
        std::fs::create_dir_all(root.path("/etc/kubernetes/manifests"))?;
        std::fs::write(
            root.path("/etc/kubernetes/manifests/kube-apiserver.yaml"),
            "",
        )?;
        assert!(matches!(
            detect(&root, Distribution::Auto),
            Err(DetectError::Ambiguous { .. })
        ));
        assert_eq!(
            detect(&root, Distribution::Rke2).ok(),
            Some(Distribution::Rke2)
        );
        Ok(())
    }
}
