//! The packaged systemd unit (`systemd/irsa-agent.service`) as the agent needs to know it:
//! under `ProtectSystem=strict` it may write only its `ReadWritePaths=` (and its
//! `StateDirectory=`), so a `directory` target elsewhere fails at the first publish with
//! "read-only file system". `check-config` and the daemon warn about that beforehand, when the
//! packaged unit is installed on the host.

use std::path::{Path, PathBuf};

use crate::config::{PublishTarget, Settings};
use crate::host::HostRoot;

/// The unit's `ReadWritePaths=` (each optional, `-`, in the unit). A test checks that this list
/// is exactly what `systemd/irsa-agent.service` says.
pub const READ_WRITE_PATHS: [&str; 6] = [
    "/etc/rancher/k3s",
    "/etc/rancher/rke2",
    "/etc/kubernetes/manifests",
    "/etc/kubernetes/pki",
    "/var/lib/prometheus/node-exporter",
    "/srv/oidc",
];

/// The unit's `StateDirectory=irsa-agent`.
pub const STATE_DIRECTORY: &str = "/var/lib/irsa-agent";

/// Where the package (or an admin) installs the unit.
const UNIT_FILES: [&str; 4] = [
    "/etc/systemd/system/irsa-agent.service",
    "/usr/lib/systemd/system/irsa-agent.service",
    "/lib/systemd/system/irsa-agent.service",
    "/usr/local/lib/systemd/system/irsa-agent.service",
];

/// Drop-ins (`systemctl edit irsa-agent`) that may add `ReadWritePaths=`.
const DROPIN_DIRS: [&str; 3] = [
    "/etc/systemd/system/irsa-agent.service.d",
    "/usr/lib/systemd/system/irsa-agent.service.d",
    "/run/systemd/system/irsa-agent.service.d",
];

/// The `ReadWritePaths=` of a unit or drop-in text: each word, without the `-` (optional) and
/// `+` prefixes. An empty assignment resets the list (systemd's rule).
pub fn read_write_paths_of(text: &str, into: &mut Vec<PathBuf>) {
    for line in text.lines() {
        let line = line.trim();
        let Some(value) = line.strip_prefix("ReadWritePaths=") else {
            continue;
        };
        if value.trim().is_empty() {
            into.clear();
            continue;
        }
        for word in value.split_whitespace() {
            let word = word.trim_start_matches(['-', '+']);
            if word.starts_with('/') {
                into.push(PathBuf::from(word));
            }
        }
    }
}

/// The installed unit file, if the packaged unit is installed on this host.
pub fn installed_unit(root: &HostRoot) -> Option<PathBuf> {
    UNIT_FILES
        .iter()
        .map(PathBuf::from)
        .find(|p| root.path(p).is_file())
}

/// What the installed unit lets the agent write: its `ReadWritePaths=` (from the unit file and
/// its drop-ins) and the state directory. `None` when the unit is not installed (the agent
/// then runs some other way and nothing is known about its sandbox).
pub fn writable_paths(root: &HostRoot) -> Option<Vec<PathBuf>> {
    let unit = installed_unit(root)?;
    let mut paths = Vec::new();
    match crate::fs::read_to_string(root.path(&unit)) {
        Ok(text) => read_write_paths_of(&text, &mut paths),
        Err(_) => paths.extend(READ_WRITE_PATHS.iter().map(PathBuf::from)),
    }
    for dir in DROPIN_DIRS {
        let Ok(entries) = std::fs::read_dir(root.path(dir)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        files.sort();
        for file in files {
            if let Ok(text) = crate::fs::read_to_string(&file) {
                read_write_paths_of(&text, &mut paths);
            }
        }
    }
    paths.push(PathBuf::from(STATE_DIRECTORY));
    Some(paths)
}

fn under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// One warning per `directory` target the installed unit cannot write, with the fix.
pub fn sandbox_warnings(root: &HostRoot, settings: &Settings) -> Vec<String> {
    let Some(writable) = writable_paths(root) else {
        return Vec::new();
    };
    settings
        .publish
        .iter()
        .filter_map(|t| match t {
            PublishTarget::Directory { path, .. } => Some(path),
            _ => None,
        })
        .filter(|path| !writable.iter().any(|w| under(path, w)))
        .map(|path| {
            format!(
                "publish: directory {}: the irsa-agent service cannot write there (its unit makes everything read-only but {}): the daemon's publishes would fail with \"read-only file system\"; use a folder under /srv/oidc, or allow this one: `systemctl edit irsa-agent`, add `[Service]` and `ReadWritePaths={}`, then `systemctl restart irsa-agent`",
                path.display(),
                READ_WRITE_PATHS.join(", "),
                path.display()
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_the_units() {
        let unit = include_str!("../systemd/irsa-agent.service");
        let mut paths = Vec::new();
        read_write_paths_of(unit, &mut paths);
        let expected: Vec<PathBuf> = READ_WRITE_PATHS.iter().map(PathBuf::from).collect();
        assert_eq!(
            paths, expected,
            "READ_WRITE_PATHS must be the ReadWritePaths= of systemd/irsa-agent.service"
        );
        assert!(
            unit.lines()
                .any(|l| l.trim() == format!("StateDirectory={}", &STATE_DIRECTORY[9..])),
            "StateDirectory=irsa-agent"
        );
    }

    #[test]
    fn drop_in_syntax() {
        let mut paths = vec![PathBuf::from("/a")];
        read_write_paths_of("[Service]\nReadWritePaths=-/var/www/oidc +/x\n", &mut paths);
        assert_eq!(
            paths,
            ["/a", "/var/www/oidc", "/x"].map(PathBuf::from).to_vec()
        );
        read_write_paths_of("ReadWritePaths=\nReadWritePaths=/y\n", &mut paths);
        assert_eq!(paths, vec![PathBuf::from("/y")]);
    }
}
