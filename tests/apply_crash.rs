//! Crash recovery: `apply` killed at each crash window (failpoints, `--features failpoints`),
//! then run again. The next run must end with the right configuration, the apiserver restarted
//! exactly when needed, no temp file left, and never a half-written file.
#![cfg(feature = "failpoints")]

mod apply_support;
mod https_support;

use apply_support::{Behaviour, FakeApiserver, Host, data};
use irsa_agent::config::Distribution;

const K3S_CONFIG: &str = "# k3s\nkube-apiserver-arg:\n  - \"audit-log-maxage=30\"   # days\n";
const NEW: &str = "https://oidc.example.com/homelab";

struct Setup {
    host: Host,
    _server: FakeApiserver,
    systemctl: std::path::PathBuf,
}

fn k3s_with_apiserver() -> Setup {
    let host = Host::new();
    host.agent_config(NEW)
        .write("/etc/rancher/k3s/config.yaml", K3S_CONFIG)
        .k3s_keys("/var/lib/rancher/k3s");
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    Setup {
        host,
        _server: server,
        systemctl,
    }
}

impl Setup {
    fn apply(&self, failpoints: Option<&str>, extra: &[&str]) -> std::process::Output {
        let mut cmd = self.host.agent();
        cmd.arg("apply")
            .args(extra)
            .args(["--timeout", "20s", "--poll-interval", "300ms"])
            .arg("--systemctl")
            .arg(&self.systemctl);
        if let Some(f) = failpoints {
            cmd.env("IRSA_AGENT_FAILPOINTS", f);
        }
        cmd.output().expect("run")
    }

    fn issuers(&self) -> Vec<String> {
        let root = irsa_agent::host::HostRoot::new(self.host.root());
        irsa_agent::apiserver::observe(&root, Distribution::Auto)
            .expect("observe")
            .flags
            .issuers
    }

    fn temp_files(&self) -> Vec<std::path::PathBuf> {
        self.host
            .snapshot()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.to_string_lossy().contains("irsa-agent-tmp"))
            .collect()
    }
}

fn crashed(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(99),
        "expected the failpoint to kill it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn crash_after_the_backup_leaves_the_configuration_untouched() {
    let s = k3s_with_apiserver();
    crashed(&s.apply(Some("apply:after-backup"), &[]));
    assert_eq!(s.host.read("/etc/rancher/k3s/config.yaml"), K3S_CONFIG);
    assert_eq!(s.host.systemctl_log(), "");
    let out = s.apply(None, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.issuers()[0], NEW);
    assert_eq!(s.host.systemctl_log(), "restart k3s\n");
}

#[test]
fn crash_before_the_rename_leaves_a_hidden_temp_file_that_the_next_run_removes() {
    let s = k3s_with_apiserver();
    // The first write_atomic is the backup copy, the second the config itself.
    crashed(&s.apply(Some("fs:before-rename@2"), &[]));
    assert_eq!(s.host.read("/etc/rancher/k3s/config.yaml"), K3S_CONFIG);
    let temps = s.temp_files();
    assert_eq!(temps.len(), 1, "{temps:?}");
    assert!(temps[0].starts_with("etc/rancher/k3s"));
    let name = temps[0]
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    assert!(name.starts_with('.'), "temp files are hidden: {name}");
    // k3s ignores it (not *.yaml in config.yaml.d); the next run sweeps it and applies.
    let out = s.apply(None, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.temp_files().is_empty());
    assert_eq!(s.issuers()[0], NEW);
}

#[test]
fn crash_after_the_write_before_the_restart_is_finished_by_the_next_run() {
    let s = k3s_with_apiserver();
    crashed(&s.apply(Some("apply:after-write"), &[]));
    // The files are complete (atomic), the apiserver was not restarted.
    assert_eq!(s.issuers()[0], NEW);
    assert_eq!(s.host.systemctl_log(), "");
    let out = s.apply(None, &["--check"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = s.apply(None, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.host.systemctl_log(), "restart k3s\n");
    let state = s.host.read("/var/lib/irsa-agent/state.json");
    assert!(state.contains("\"switched_at\": 1"), "{state}");
}

#[test]
fn crash_after_the_restart_needs_no_second_restart() {
    let s = k3s_with_apiserver();
    crashed(&s.apply(Some("apply:after-restart"), &[]));
    assert_eq!(s.host.systemctl_log(), "restart k3s\n");
    let out = s.apply(None, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["changed"], false);
    assert_eq!(s.host.systemctl_log(), "restart k3s\n");
}

#[test]
fn kubeadm_crash_before_the_rename_leaves_nothing_kubelet_would_run() {
    let host = Host::new();
    host.agent_config(NEW)
        .copy(
            &data("../hosts/kubeadm/v1.32.yaml"),
            "/etc/kubernetes/manifests/kube-apiserver.yaml",
        )
        .kubeadm_keys();
    let before = host.read("/etc/kubernetes/manifests/kube-apiserver.yaml");
    let out = host
        .agent()
        .args(["apply", "--no-restart"])
        .env("IRSA_AGENT_FAILPOINTS", "fs:before-rename@2")
        .output()
        .expect("run");
    crashed(&out);
    assert_eq!(
        host.read("/etc/kubernetes/manifests/kube-apiserver.yaml"),
        before
    );
    // kubelet skips dot files; that is the only extra file in the folder.
    let extra: Vec<String> = std::fs::read_dir(host.path("/etc/kubernetes/manifests"))
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n != "kube-apiserver.yaml")
        .collect();
    assert_eq!(extra.len(), 1, "{extra:?}");
    assert!(
        extra[0].starts_with(".kube-apiserver.yaml.irsa-agent-tmp."),
        "{extra:?}"
    );
    let out = host
        .agent()
        .args(["apply", "--no-restart"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = std::fs::read_dir(host.path("/etc/kubernetes/manifests"))
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names, ["kube-apiserver.yaml"]);
}
