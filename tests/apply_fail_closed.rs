//! `apply` and `finalize` never act on missing evidence (issue #13): a change that was written
//! is declared applied only once the running apiserver was seen serving it, and old issuers
//! are retired only when the apiserver answers. The apiserver here is a fake on 127.0.0.1 that
//! is stopped (its port refuses connections) and started again on the same port, which is what
//! an apiserver restart looks like from outside. Killing `apply` right after its write uses the
//! failpoints build (`--features failpoints`).
#![cfg(feature = "failpoints")]

mod apply_support;
mod https_support;

use std::time::{Duration, Instant};

use apply_support::{Behaviour, FakeApiserver, Host, data};
use irsa_agent::config::Distribution;
use serde_json::Value;

const NEW: &str = "https://oidc.example.com/homelab";
const OLD: &str = "https://kubernetes.default.svc.cluster.local";
const MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";

fn out_text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn state(host: &Host) -> Value {
    serde_json::from_str(&host.read("/var/lib/irsa-agent/state.json")).expect("state json")
}

/// The apiserver URL of a kubeadm test host (its admin kubeconfig's server).
fn host_server(host: &Host) -> Option<String> {
    let text = std::fs::read_to_string(host.path("/etc/kubernetes/admin.conf")).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .map(str::to_string)
}

/// A kubeadm host whose admin kubeconfig points at 127.0.0.1:`port`.
fn kubeadm_host(port: u16) -> Host {
    let host = Host::new();
    host.agent_config(NEW)
        .copy(&data("../hosts/kubeadm/v1.32.yaml"), MANIFEST)
        .kubeadm_keys();
    host.kubeconfig(
        "/etc/kubernetes/admin.conf",
        &format!("https://127.0.0.1:{port}"),
    );
    host
}

fn apply(host: &Host, extra: &[&str], failpoints: Option<&str>) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_irsa-agent"));
    cmd.arg("--root").arg(host.root()).arg("apply").args(extra);
    // kubeadm: the probe would go to the manifest's advertise address; tests stay on 127.0.0.1.
    if let Some(server) = host_server(host) {
        cmd.args(["--apiserver-url", &server]);
    }
    cmd.args(["--timeout", "6s", "--poll-interval", "200ms"]);
    cmd.env_remove("IRSA_AGENT_CONFIG")
        .env_remove("IRSA_AGENT_SYSTEMCTL")
        .env_remove("IRSA_AGENT_APISERVER_URL");
    if let Some(f) = failpoints {
        cmd.env("IRSA_AGENT_FAILPOINTS", f);
    }
    cmd
}

/// kubeadm: `apply` is killed right after writing the manifest, while kubelet restarts the
/// apiserver (it does not answer). The next `apply` does not say "in sync": it waits for the
/// apiserver, sees it serve the new issuer, and records that.
#[test]
fn apply_killed_after_the_write_is_verified_by_the_next_apply_once_the_apiserver_is_back() {
    let port = FakeApiserver::refused_port();
    let host = kubeadm_host(port);
    let out = apply(&host, &[], Some("apply:after-write"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(99), "{}", out_text(&out));
    assert!(host.read(MANIFEST).contains(NEW));
    assert!(
        state(&host)["apply_in_flight"]["issuer"] == NEW,
        "{}",
        state(&host)
    );
    // While the apiserver is down, `apply --check` does not call it in sync.
    let out = apply(&host, &["--check"], None).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", out_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("does not answer now"),
        "{}",
        out_text(&out)
    );
    // The next apply starts while the apiserver is still down; it comes back 1.5 s later.
    let started = Instant::now();
    let child = apply(&host, &["--json"], None)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    let _server = FakeApiserver::start_on(
        port,
        Behaviour::FollowHost {
            root: host.root().to_path_buf(),
            distribution: Distribution::Kubeadm,
        },
    );
    let out = child.wait_with_output().expect("wait");
    let took = started.elapsed();
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(
        took >= Duration::from_millis(1500),
        "it did not wait: {took:?}"
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["restart"]["status"], "done", "{}", out_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not answer now"),
        "{}",
        out_text(&out)
    );
    let st = state(&host);
    assert!(st["issuer"]["switched_at"].as_u64().is_some(), "{st}");
    assert!(st.get("apply_in_flight").is_none(), "{st}");
    assert!(host.read(MANIFEST).contains(NEW));
    eprintln!("the second apply waited {took:?} for the apiserver");
}

/// kubeadm: the same crash, but the apiserver never becomes ready with the new manifest: the
/// next `apply` rolls the manifest back from the backup the killed run made, as that run would
/// have, and fails saying so.
#[test]
fn apply_killed_after_the_write_is_rolled_back_by_the_next_apply_when_the_apiserver_never_comes() {
    let port = FakeApiserver::refused_port();
    let host = kubeadm_host(port);
    let original = host.read(MANIFEST);
    let out = apply(&host, &[], Some("apply:after-write"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(99), "{}", out_text(&out));
    // The apiserver comes back, but cannot get ready with the new issuer.
    let _server = FakeApiserver::start_on(
        port,
        Behaviour::BreaksOn {
            root: host.root().to_path_buf(),
            distribution: Distribution::Kubeadm,
            broken: NEW.to_string(),
        },
    );
    let out = apply(&host, &[], None).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "restored {MANIFEST} from /var/lib/irsa-agent/backups/"
        )),
        "{}",
        out_text(&out)
    );
    assert!(
        stderr.contains("the apiserver is ready with the old configuration"),
        "{}",
        out_text(&out)
    );
    assert_eq!(host.read(MANIFEST), original);
    let st = state(&host);
    assert!(st.get("apply_in_flight").is_none(), "{st}");
    assert!(
        st["issuer"]["switched_at"].is_null() || st.get("issuer").is_none(),
        "{st}"
    );
}

/// k3s: killed after the write, before the restart; at the next `apply` k3s is down (it
/// was stopped and is starting again). The next `apply` waits instead of calling it in sync,
/// and when k3s is back (having loaded the new flags at its start) verifies it serves the new
/// issuer, without a restart of its own.
#[test]
fn k3s_apply_killed_before_the_restart_waits_for_a_stopped_apiserver() {
    let host = Host::new();
    host.agent_config(NEW)
        .write(
            "/etc/rancher/k3s/config.yaml",
            "# k3s\nkube-apiserver-arg:\n  - \"audit-log-maxage=30\"\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let behaviour = Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    };
    let server = FakeApiserver::start(behaviour.clone());
    let port = server.port;
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    let run = |failpoints: Option<&str>| {
        let mut cmd = apply(&host, &[], failpoints);
        cmd.arg("--systemctl").arg(&systemctl);
        cmd
    };
    let out = run(Some("apply:after-write")).output().expect("run");
    assert_eq!(out.status.code(), Some(99), "{}", out_text(&out));
    // k3s stops: its port refuses connections.
    drop(server);
    let started = Instant::now();
    let child = run(None)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    // Back, with the flags on disk now.
    let _back = FakeApiserver::start_on(port, behaviour);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("serves issuer"),
        "{}",
        out_text(&out)
    );
    assert_eq!(host.systemctl_log(), "", "{}", out_text(&out));
    let st = state(&host);
    assert!(st["issuer"]["switched_at"].as_u64().is_some(), "{st}");
    assert!(st.get("apply_in_flight").is_none(), "{st}");
}

/// `finalize` when the apiserver is stopped: it waits (saying for what), retires nothing in
/// between, and completes once the apiserver is back; when it never comes back it refuses
/// with nothing changed.
#[test]
fn finalize_waits_for_a_stopped_apiserver_and_retires_only_once_it_answers() {
    let host = Host::new();
    host.agent_config(NEW)
        .write(
            "/etc/rancher/k3s/config.yaml",
            "# k3s\nkube-apiserver-arg:\n  - \"audit-log-maxage=30\"\n",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let behaviour = Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    };
    let server = FakeApiserver::start(behaviour.clone());
    let port = server.port;
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());
    let systemctl = host.fake_systemctl();
    let run = |args: &[&str], timeout: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_irsa-agent"));
        cmd.arg("--root")
            .arg(host.root())
            .args(args)
            .args(["--timeout", timeout, "--poll-interval", "200ms"])
            .arg("--systemctl")
            .arg(&systemctl)
            .env_remove("IRSA_AGENT_CONFIG");
        cmd
    };
    let out = run(&["apply"], "10s").output().expect("apply");
    assert!(out.status.success(), "{}", out_text(&out));
    // 25 hours later (the state says so).
    let path = host.path("/var/lib/irsa-agent/state.json");
    let mut st = state(&host);
    let switched = st["issuer"]["switched_at"].as_u64().expect("switched_at");
    st["issuer"]["switched_at"] = serde_json::json!(switched - 25 * 3600);
    std::fs::write(&path, st.to_string()).expect("write");
    let config_before = host.read("/etc/rancher/k3s/config.yaml");
    assert!(config_before.contains(OLD), "{config_before}");

    // Stopped: finalize gives up after its timeout, changing nothing.
    drop(server);
    let out = run(&["finalize"], "2s").output().expect("finalize");
    assert_eq!(out.status.code(), Some(1), "{}", out_text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing was retired"), "{}", out_text(&out));
    assert!(
        stderr.contains("finalize waits for the apiserver"),
        "{}",
        out_text(&out)
    );
    assert_eq!(host.read("/etc/rancher/k3s/config.yaml"), config_before);
    assert_eq!(host.systemctl_log(), "restart k3s\n");

    // Stopped when finalize starts, back 1.5 s later: it waits, then retires.
    let started = Instant::now();
    let child = run(&["finalize"], "20s")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        host.read("/etc/rancher/k3s/config.yaml"),
        config_before,
        "nothing is retired while the apiserver is down"
    );
    let _back = FakeApiserver::start_on(port, behaviour);
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", out_text(&out));
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("retired: {OLD}")),
        "{}",
        out_text(&out)
    );
    assert!(!host.read("/etc/rancher/k3s/config.yaml").contains(OLD));
    assert_eq!(host.systemctl_log(), "restart k3s\nrestart k3s\n");
}
