//! Restarting the apiserver: the service manager behind a small trait.
//!
//! - k3s: the apiserver runs inside the `k3s` server process: `systemctl restart k3s`, or
//!   `k3s-<name>` when the install script was given a name. The unit is detected from the unit
//!   files under the host root (the one whose `ExecStart` runs `k3s server`).
//! - RKE2: `systemctl restart rke2-server` (it rewrites the static pod manifest on start).
//! - kubeadm: nothing to run: kubelet restarts the static pod when the manifest changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Distribution;
use crate::errors::ProgramError;
use crate::host::HostRoot;

/// How the new flags take effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// `systemctl restart <unit>`.
    Unit(String),
    /// kubelet notices the changed static pod manifest.
    KubeletStaticPod,
}

impl Restart {
    pub fn describe(&self) -> String {
        match self {
            Restart::Unit(unit) => format!("systemctl restart {unit}"),
            Restart::KubeletStaticPod => {
                "kubelet restarts the kube-apiserver static pod by itself".to_string()
            }
        }
    }
}

/// The service manager.
pub trait ServiceManager {
    /// Restarts `unit` and returns once the manager accepted the job.
    fn restart(&mut self, unit: &str) -> Result<(), ProgramError>;
}

/// The real one: `systemctl restart UNIT`.
#[derive(Debug, Clone)]
pub struct Systemctl {
    /// The `systemctl` binary (tests point it at a script).
    pub program: PathBuf,
}

impl Default for Systemctl {
    fn default() -> Self {
        Systemctl {
            program: PathBuf::from("systemctl"),
        }
    }
}

impl ServiceManager for Systemctl {
    fn restart(&mut self, unit: &str) -> Result<(), ProgramError> {
        let output = Command::new(&self.program)
            .arg("restart")
            .arg(unit)
            .output()
            .map_err(|source| ProgramError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ProgramError::Failed {
                command: format!("{} restart {unit}", self.program.display()),
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            })
        }
    }
}

const UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/usr/local/lib/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

/// The `ExecStart=` of a unit file, with line continuations joined.
fn exec_start(text: &str) -> Option<String> {
    let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecStart="))
        .rfind(|v| !v.trim().is_empty())
        .map(str::to_string)
}

fn runs_server(text: &str, program: &str) -> bool {
    exec_start(text).is_some_and(|cmd| {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        words
            .iter()
            .position(|w| w.trim_matches(['"', '\'']).ends_with(program))
            .is_some_and(|i| {
                words
                    .get(i + 1)
                    .is_some_and(|w| w.trim_matches(['"', '\'']) == "server")
            })
    })
}

/// The k3s server unit installed on the host: `k3s.service`, else a `k3s-<name>.service` whose
/// `ExecStart` runs `k3s server`; `k3s` when no unit file is found.
pub fn detect_k3s_unit(root: &HostRoot) -> String {
    let mut named = Vec::new();
    for dir in UNIT_DIRS {
        let dir = root.path(dir);
        if dir.join("k3s.service").is_file() {
            return "k3s".to_string();
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(unit) = name.strip_suffix(".service")
                && unit.starts_with("k3s-")
                && read(&entry.path()).is_some_and(|t| runs_server(&t, "k3s"))
            {
                named.push(unit.to_string());
            }
        }
    }
    named.sort();
    named.dedup();
    named
        .into_iter()
        .next()
        .unwrap_or_else(|| "k3s".to_string())
}

fn read(path: &Path) -> Option<String> {
    crate::fs::read_to_string(path).ok()
}

/// How the apiserver of `distribution` is restarted on this host.
pub fn restart_for(root: &HostRoot, distribution: Distribution, unit: Option<&str>) -> Restart {
    if let Some(unit) = unit {
        return Restart::Unit(unit.trim_end_matches(".service").to_string());
    }
    super::restart(root, distribution)
}

/// Settings on the k3s/RKE2 unit's command line (or its environment) that irsa-agent cannot
/// manage in config.yaml: the service-account flags, another config file, another data-dir or
/// cluster domain. Each entry is a sentence naming the unit file.
pub fn command_line_problems(root: &HostRoot, unit: &str, program: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for dir in UNIT_DIRS {
        let host = PathBuf::from(dir).join(format!("{unit}.service"));
        let Some(text) = read(&root.path(&host)) else {
            continue;
        };
        let env_file = PathBuf::from(dir).join(format!("{unit}.service.env"));
        let env = read(&root.path(&env_file)).unwrap_or_default();
        let config_var = format!("{}_CONFIG_FILE", program.to_ascii_uppercase());
        for (file, body) in [(&host, &text), (&env_file, &env)] {
            if body.contains(&config_var) {
                problems.push(format!(
                    "{} sets {config_var}: irsa-agent edits only /etc/rancher/{program}/config.yaml and config.yaml.d/; move the settings there",
                    file.display()
                ));
            }
        }
        // A drop-in (`<unit>.service.d/*.conf`, in name order) may replace ExecStart.
        let mut cmd = exec_start(&text);
        let dropin_dir = root.path(PathBuf::from(dir).join(format!("{unit}.service.d")));
        if let Ok(entries) = std::fs::read_dir(&dropin_dir) {
            let mut names: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "conf"))
                .collect();
            names.sort();
            for path in names {
                if let Some(c) = read(&path).as_deref().and_then(exec_start) {
                    cmd = Some(c);
                }
            }
        }
        let Some(cmd) = cmd else {
            break;
        };
        let words: Vec<String> = cmd
            .split_whitespace()
            .map(|w| w.trim_matches(['"', '\'']).to_string())
            .collect();
        for (i, word) in words.iter().enumerate() {
            let (flag, inline) = match word.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (word.as_str(), None),
            };
            let value = inline
                .or_else(|| words.get(i + 1).cloned())
                .unwrap_or_default();
            let bad = match flag {
                "--kube-apiserver-arg" => super::flags::MANAGED
                    .iter()
                    .any(|m| super::flags::ExtraArg::parse(&value).name == *m),
                "--config" | "-c" | "--data-dir" | "-d" | "--cluster-domain" => true,
                _ => false,
            };
            if bad {
                problems.push(format!(
                    "{} passes `{flag} {value}` on the {program} command line: irsa-agent reads and edits only /etc/rancher/{program}/config.yaml and config.yaml.d/; move it there first",
                    host.display()
                ));
            }
        }
        break;
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_named_k3s_server_units() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = HostRoot::new(dir.path());
        assert_eq!(detect_k3s_unit(&root), "k3s");
        let units = root.path("/etc/systemd/system");
        std::fs::create_dir_all(&units)?;
        std::fs::write(
            units.join("k3s-agent.service"),
            "[Service]\nExecStart=/usr/local/bin/k3s \\\n    agent \\\n",
        )?;
        std::fs::write(
            units.join("k3s-lab.service"),
            "[Service]\nExecStart=/usr/local/bin/k3s \\\n    server \\\n\t'--disable=traefik' \\\n",
        )?;
        assert_eq!(detect_k3s_unit(&root), "k3s-lab");
        std::fs::write(
            units.join("k3s.service"),
            "[Service]\nExecStart=/usr/local/bin/k3s server\n",
        )?;
        assert_eq!(detect_k3s_unit(&root), "k3s");
        assert_eq!(
            restart_for(&root, Distribution::Kubeadm, None),
            Restart::KubeletStaticPod
        );
        assert_eq!(
            restart_for(&root, Distribution::Rke2, None),
            Restart::Unit("rke2-server".into())
        );
        assert!(command_line_problems(&root, "k3s", "k3s").is_empty());
        std::fs::write(
            units.join("k3s.service"),
            "[Service]\nExecStart=/usr/local/bin/k3s \\\n    server \\\n\t'--kube-apiserver-arg=service-account-issuer=https://x' \\\n\t'--kube-apiserver-arg' 'audit-log-maxage=3' \\\n\t'--data-dir' '/srv/k3s' \\\n",
        )?;
        let problems = command_line_problems(&root, "k3s", "k3s");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("service-account-issuer=https://x"));
        assert!(problems[1].contains("--data-dir /srv/k3s"));
        // A drop-in that replaces ExecStart wins.
        std::fs::create_dir_all(units.join("k3s.service.d"))?;
        std::fs::write(
            units.join("k3s.service.d/override.conf"),
            "[Service]\nExecStart=\nExecStart=/usr/local/bin/k3s server --cluster-domain=lab.internal\n",
        )?;
        let problems = command_line_problems(&root, "k3s", "k3s");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("--cluster-domain lab.internal"));
        Ok(())
    }
}
