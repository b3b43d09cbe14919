//! Restart, verification and rollback, with a fake systemctl (a script that logs its
//! arguments) and a fake kube-apiserver speaking mutual TLS on 127.0.0.1 that the real probe
//! reaches through the host's admin kubeconfig.

mod apply_support;
mod https_support;

use apply_support::{Behaviour, FakeApiserver, Host, data};
use irsa_agent::config::Distribution;
use irsa_agent::runtime::block_on;
use serde_json::Value;

fn json_of(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

const K3S_CONFIG: &str = "# k3s\nkube-apiserver-arg:\n  - \"audit-log-maxage=30\"   # days\n";

fn k3s_host() -> Host {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write("/etc/rancher/k3s/config.yaml", K3S_CONFIG)
        .k3s_keys("/var/lib/rancher/k3s");
    host
}

#[test]
fn restart_then_wait_for_the_new_issuer_in_the_apiservers_own_discovery() {
    let host = k3s_host();
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    let out = host
        .agent()
        .args([
            "apply",
            "--json",
            "--timeout",
            "20s",
            "--poll-interval",
            "1s",
        ])
        .arg("--systemctl")
        .arg(&systemctl)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json_of(&out);
    assert_eq!(result["changed"], true);
    assert_eq!(result["restart"]["status"], "done");
    assert_eq!(result["restart"]["how"], "systemctl restart k3s");
    assert_eq!(host.systemctl_log(), "restart k3s\n");
    // The probe asked the apiserver itself, with the admin credential.
    let requests = server.requests.lock().expect("lock").clone();
    assert!(requests.contains(&"/readyz".to_string()), "{requests:?}");
    assert!(requests.contains(&"/.well-known/openid-configuration".to_string()));
    // The switch time is recorded for finalize.
    let state: Value =
        serde_json::from_str(&host.read("/var/lib/irsa-agent/state.json")).expect("state");
    assert_eq!(
        state["issuer"]["issuer"],
        "https://oidc.example.com/homelab"
    );
    assert!(state["issuer"]["switched_at"].as_u64().is_some());
    assert_eq!(
        state["issuer"]["previous"],
        serde_json::json!(["https://kubernetes.default.svc.cluster.local"])
    );
    // Again: nothing to do, no restart.
    let out = host
        .agent()
        .args(["apply", "--json"])
        .arg("--systemctl")
        .arg(&systemctl)
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(json_of(&out)["changed"], false);
    assert_eq!(host.systemctl_log(), "restart k3s\n");
}

#[test]
fn an_apiserver_that_never_becomes_healthy_ends_with_the_original_files_restored() {
    let host = k3s_host();
    let server = FakeApiserver::start(Behaviour::NeverReady);
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    let before = std::fs::read(host.path("/etc/rancher/k3s/config.yaml")).expect("read");
    let out = host
        .agent()
        .args(["apply", "--timeout", "2s", "--poll-interval", "200ms"])
        .arg("--systemctl")
        .arg(&systemctl)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    // Byte for byte.
    assert_eq!(
        std::fs::read(host.path("/etc/rancher/k3s/config.yaml")).expect("read"),
        before
    );
    // Restarted with the new config, then again with the restored one.
    assert_eq!(host.systemctl_log(), "restart k3s\nrestart k3s\n");
    // One line names the file and its backup.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| {
            l.contains("restored /etc/rancher/k3s/config.yaml from /var/lib/irsa-agent/backups/")
        })
        .unwrap_or_else(|| panic!("no rollback line in: {stderr}"));
    assert!(
        line.contains(
            "did not become ready serving issuer https://oidc.example.com/homelab within 2s"
        ),
        "{line}"
    );
    assert!(line.contains("/readyz answered 500"), "{line}");
    let backup = line
        .split(" from ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .expect("backup path");
    assert_eq!(std::fs::read(host.path(backup)).expect("backup"), before);
    // No switch recorded.
    let state =
        std::fs::read_to_string(host.path("/var/lib/irsa-agent/state.json")).unwrap_or_default();
    assert!(!state.contains("switched_at\": 1"), "{state}");
}

#[test]
fn a_kubeadm_manifest_is_restored_when_the_static_pod_does_not_come_back() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/cluster-a")
        .copy(
            &data("../hosts/kubeadm/v1.33.yaml"),
            "/etc/kubernetes/manifests/kube-apiserver.yaml",
        )
        .write(
            "/etc/kubernetes/manifests/etcd.yaml",
            "apiVersion: v1\nkind: Pod\n",
        )
        .kubeadm_keys();
    let server = FakeApiserver::start(Behaviour::NeverReady);
    host.kubeconfig("/etc/kubernetes/admin.conf", "https://10.255.255.1:6443");
    let before = host.snapshot();
    let out = host
        .agent()
        .args([
            "apply",
            "--json",
            "--timeout",
            "1s",
            "--poll-interval",
            "200ms",
        ])
        // admin.conf may name a load balancer: the probe goes to the local apiserver.
        .args(["--apiserver-url", &server.url()])
        .arg("--systemctl")
        .arg(host.fake_systemctl())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let result = json_of(&out);
    assert_eq!(result["changed"], false);
    assert!(result["error"].as_str().is_some_and(|e| e.contains("restored /etc/kubernetes/manifests/kube-apiserver.yaml from /var/lib/irsa-agent/backups/")), "{result}");
    // kubelet restarts static pods by itself: systemctl is never called.
    assert_eq!(host.systemctl_log(), "");
    let after = host.snapshot();
    let manifests = |s: &[(std::path::PathBuf, Vec<u8>)]| {
        s.iter()
            .filter(|(p, _)| p.starts_with("etc/kubernetes"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(manifests(&after), manifests(&before));
}

#[test]
fn kubeadm_restart_is_kubelets_job_and_the_probe_goes_to_the_local_apiserver() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/cluster-a")
        .copy(
            &data("../hosts/kubeadm/v1.31.yaml"),
            "/etc/kubernetes/manifests/kube-apiserver.yaml",
        )
        .kubeadm_keys();
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::Kubeadm,
    });
    host.kubeconfig(
        "/etc/kubernetes/admin.conf",
        "https://lb.example.invalid:6443",
    );
    let out = host
        .agent()
        .args(["apply", "--timeout", "20s", "--poll-interval", "500ms"])
        .env("IRSA_AGENT_APISERVER_URL", server.url())
        .arg("--systemctl")
        .arg(host.fake_systemctl())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("serves issuer https://oidc.example.com/cluster-a"),
        "{stdout}"
    );
    assert!(
        stdout.contains("apiVersion: kubeadm.k8s.io/v1beta4"),
        "{stdout}"
    );
    assert_eq!(host.systemctl_log(), "");
}

#[test]
fn a_missing_admin_kubeconfig_stops_before_anything_is_written() {
    let host = k3s_host();
    let before = host.snapshot();
    let out = host
        .agent()
        .args(["apply"])
        .arg("--systemctl")
        .arg(host.fake_systemctl())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/etc/rancher/k3s/k3s.yaml"), "{stderr}");
    assert!(stderr.contains("--no-restart"), "{stderr}");
    let mut after = host.snapshot();
    after.retain(|(p, _)| !p.ends_with("fake-systemctl"));
    assert_eq!(after, before);
}

#[test]
fn finalize_refuses_until_the_longest_token_lifetime_has_passed() {
    let host = k3s_host();
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    let run = |args: &[&str]| {
        host.agent()
            .args(args)
            .args(["--timeout", "20s", "--poll-interval", "500ms"])
            .arg("--systemctl")
            .arg(&systemctl)
            .output()
            .expect("run")
    };
    // Before apply: nothing was switched.
    let out = run(&["finalize"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `irsa-agent apply` first"));

    assert!(run(&["apply"]).status.success());
    // Right after the switch: refused, with the reason and what to check.
    let out = run(&["finalize"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to retire https://kubernetes.default.svc.cluster.local yet"),
        "{stderr}"
    );
    assert!(
        stderr.contains("serviceaccount_stale_tokens_total"),
        "{stderr}"
    );
    assert!(stderr.contains("1-year"), "{stderr}");

    // 25 hours later (the state says so): the old issuer goes, audiences stay pinned.
    let state_path = host.path("/var/lib/irsa-agent/state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).expect("state")).expect("json");
    let switched = state["issuer"]["switched_at"]
        .as_u64()
        .expect("switched_at");
    state["issuer"]["switched_at"] = serde_json::json!(switched - 25 * 3600);
    std::fs::write(&state_path, state.to_string()).expect("write");
    let out = run(&["finalize", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["finalize", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json_of(&out);
    assert_eq!(
        result["after"]["issuers"],
        serde_json::json!(["https://oidc.example.com/homelab"])
    );
    assert_eq!(
        result["after"]["api_audiences"],
        serde_json::json!(["https://kubernetes.default.svc.cluster.local", "k3s"])
    );
    assert_eq!(result["stale_tokens_total"], 0.0);
    assert_eq!(host.systemctl_log(), "restart k3s\nrestart k3s\n");
    // Then: nothing to retire, and apply stays in sync (it does not bring the old issuer back).
    let out = run(&["finalize"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to retire"));
    let out = run(&["apply", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn finalize_waits_for_the_max_token_expiration_when_it_is_longer() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab")
        .write(
            "/etc/rancher/k3s/config.yaml",
            "kube-apiserver-arg:\n  - service-account-max-token-expiration=48h\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    assert!(
        host.agent()
            .args(["apply", "--no-restart"])
            .output()
            .expect("run")
            .status
            .success()
    );
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    // The switch was written without a restart: finalize sees the apiserver serve it now and
    // starts the clock there.
    let out = host.agent().args(["finalize"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("may live 2d"), "{stderr}");
    let state: Value =
        serde_json::from_str(&host.read("/var/lib/irsa-agent/state.json")).expect("state");
    let switched = state["issuer"]["switched_at"]
        .as_u64()
        .expect("recorded now");
    // 25 hours is not enough with a 48 h maximum token lifetime.
    let mut state = state;
    state["issuer"]["switched_at"] = serde_json::json!(switched - 25 * 3600);
    std::fs::write(
        host.path("/var/lib/irsa-agent/state.json"),
        state.to_string(),
    )
    .expect("write");
    let out = host
        .agent()
        .args(["finalize", "--check"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("wait 23h") || stderr.contains("wait 22h59m"),
        "{stderr}"
    );
}

#[test]
fn the_probe_trusts_only_the_kubeconfig_ca_and_authenticates_with_its_client_certificate() {
    use irsa_agent::apiserver::probe::{ApiserverProbe, KubeconfigProbe};
    use irsa_agent::host::HostRoot;
    let host = k3s_host();
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    let root = HostRoot::new(host.root());
    let timeout = std::time::Duration::from_secs(5);
    // The real admin kubeconfig: ready, and the apiserver's own issuer.
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let mut probe = KubeconfigProbe::new(
        &root,
        std::path::Path::new("/etc/rancher/k3s/k3s.yaml"),
        None,
        timeout,
    )
    .expect("probe");
    let status = block_on(probe.check());
    assert!(status.ready, "{status:?}");
    assert_eq!(
        status.issuer.as_deref(),
        Some("https://kubernetes.default.svc.cluster.local")
    );
    assert_eq!(block_on(probe.stale_tokens()), Some(0.0));
    // A CA that did not sign the server's certificate: not trusted.
    let text = host.read("/etc/rancher/k3s/k3s.yaml");
    let client_pem = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(data("probe/client.crt")).expect("client cert"),
    );
    let wrong_ca = text
        .lines()
        .map(|l| {
            if l.contains("certificate-authority-data") {
                format!("    certificate-authority-data: {client_pem}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    host.write("/etc/rancher/k3s/other.yaml", &wrong_ca);
    let mut probe = KubeconfigProbe::new(
        &root,
        std::path::Path::new("/etc/rancher/k3s/other.yaml"),
        None,
        timeout,
    )
    .expect("probe");
    let status = block_on(probe.check());
    assert!(!status.ready);
    assert!(
        status.detail.to_lowercase().contains("certificate"),
        "{status:?}"
    );
    // Without the client certificate the apiserver (which requires one) refuses the handshake.
    let no_client: String = text
        .lines()
        .filter(|l| !l.contains("client-certificate-data") && !l.contains("client-key-data"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace("  user:\n", "  user:\n    token: not-a-client-cert\n");
    host.write("/etc/rancher/k3s/token.yaml", &no_client);
    let mut probe = KubeconfigProbe::new(
        &root,
        std::path::Path::new("/etc/rancher/k3s/token.yaml"),
        None,
        timeout,
    )
    .expect("probe");
    assert!(!block_on(probe.check()).ready);
    // No CA at all: refused up front.
    host.write(
        "/etc/rancher/k3s/noca.yaml",
        "clusters:\n- cluster:\n    server: https://127.0.0.1:1\n  name: c\ncontexts:\n- context:\n    cluster: c\n  name: x\ncurrent-context: x\n",
    );
    let err = KubeconfigProbe::new(
        &root,
        std::path::Path::new("/etc/rancher/k3s/noca.yaml"),
        None,
        timeout,
    )
    .err()
    .expect("refused");
    assert!(err.contains("certificate-authority"), "{err}");
}

#[test]
fn a_restart_left_pending_is_done_by_the_next_apply() {
    let host = k3s_host();
    // The apiserver runs with the old configuration ...
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    let run = |args: &[&str]| {
        host.agent()
            .args(args)
            .args(["--timeout", "20s", "--poll-interval", "500ms"])
            .arg("--systemctl")
            .arg(&systemctl)
            .output()
            .expect("run")
    };
    // ... while the files are written without a restart.
    assert!(run(&["apply", "--no-restart"]).status.success());
    assert_eq!(host.systemctl_log(), "");
    let out = run(&["apply", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("a restart is pending"));
    let out = run(&["apply", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json_of(&out);
    assert_eq!(result["changed"], true);
    assert_eq!(result["files"], serde_json::json!([]));
    assert_eq!(result["restart"]["status"], "done");
    assert_eq!(host.systemctl_log(), "restart k3s\n");
    let state: Value =
        serde_json::from_str(&host.read("/var/lib/irsa-agent/state.json")).expect("state");
    assert!(state["issuer"]["switched_at"].as_u64().is_some());
    assert!(state["issuer"]["pending_restart_since"].is_null());
    // Now really in sync: no restart.
    let out = run(&["apply", "--json"]);
    assert_eq!(json_of(&out)["changed"], false);
    assert_eq!(host.systemctl_log(), "restart k3s\n");
}

/// The state race of issue 14: `apply` used to load the state at its start and save the whole
/// file at its end, after a restart wait, so a rotation step recorded meanwhile (another
/// process) was rolled back, `may_have_signed` included (the flag that decides whether
/// `rotate --abort` is safe). Forced to overlap: apply pauses after the restart, the rotation's
/// section is written by this process, then apply finishes.
#[test]
fn an_apply_overlapping_a_recorded_rotation_step_leaves_the_rotation_as_written() {
    let host = k3s_host();
    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    let pauses = tempfile::tempdir().expect("tempdir");
    // The state exists before apply reads it.
    irsa_agent::state::State::update(&irsa_agent::host::HostRoot::new(host.root()), |s| {
        s.other
            .insert("rotation".into(), serde_json::json!({"phase": "signing"}));
    })
    .expect("seed state");
    let mut apply = std::process::Command::new(env!("CARGO_BIN_EXE_irsa-agent"))
        .arg("--root")
        .arg(host.root())
        .args([
            "apply",
            "--json",
            "--timeout",
            "20s",
            "--poll-interval",
            "1s",
        ])
        .arg("--systemctl")
        .arg(&systemctl)
        .env_remove("IRSA_AGENT_CONFIG")
        .env_remove("IRSA_AGENT_SYSTEMCTL")
        .env_remove("IRSA_AGENT_APISERVER_URL")
        .env("IRSA_AGENT_FAILPOINTS", "apply:after-restart:pause")
        .env("IRSA_AGENT_FAILPOINT_DIR", pauses.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("apply");
    let flag = pauses.path().join("apply_after-restart.paused");
    let started = std::time::Instant::now();
    while !flag.exists() {
        if let Ok(Some(status)) = apply.try_wait() {
            panic!("apply ended ({status}) before reaching the pause");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "apply never paused"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The rotation records a step, as rotation::save_state does, while apply waits.
    let written = serde_json::json!({"phase": "draining", "may_have_signed": true, "step": 5});
    irsa_agent::state::State::update(&irsa_agent::host::HostRoot::new(host.root()), |s| {
        s.other.insert("rotation".into(), written.clone());
    })
    .expect("rotation step");
    std::fs::remove_file(&flag).expect("resume apply");
    let out = apply.wait_with_output().expect("apply ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_of(&out)["changed"], true);
    let state: Value =
        serde_json::from_str(&host.read("/var/lib/irsa-agent/state.json")).expect("state");
    assert_eq!(state["rotation"], written, "apply rolled the rotation back");
    assert_eq!(
        state["issuer"]["issuer"], "https://oidc.example.com/homelab",
        "apply's own record is there too"
    );
}
