//! The daemon drives key rotation (its ScheduledTask): a rotation due at start goes from idle to
//! draining within seconds (hold 0: max-age 0, no cdn-ttl, no propagation-wait), restarting
//! k3s through the fake systemctl once (`certificate rotate-ca` through a fake k3s), with the
//! JWKS republished with both keys and `status` showing the rotation.
mod apply_support;
mod https_support;
mod rotation_support;
mod run_support;

use apply_support::{Behaviour, FakeApiserver, Host};
use irsa_agent::config::Distribution;
use run_support::Daemon;

#[test]
fn the_daemon_runs_a_due_rotation_to_draining() {
    let host = Host::new();
    let root = host.root().to_path_buf();
    rotation_support::k3s_host(&root);
    let public =
        rotation_support::StaticHttps::start_with_max_age(root.join("srv/oidc"), "cluster-a", 0);
    host.copy(
        &apply_support::data("probe/ca.crt"),
        "/etc/irsa-agent/test-ca.crt",
    );
    let issuer = format!("https://127.0.0.1:{}/cluster-a", public.port);
    // The apiserver already signs with the public issuer (apply is in sync).
    host.write(
        "/etc/rancher/k3s/config.yaml",
        format!("kube-apiserver-arg:\n  - service-account-issuer={issuer}\n  - service-account-issuer=https://kubernetes.default.svc.cluster.local\n  - service-account-jwks-uri={issuer}/openid/v1/jwks\n  - api-audiences=https://kubernetes.default.svc.cluster.local,k3s\n"),
    );
    host.write(
        "/etc/irsa-agent/config.yaml",
        format!("issuer: {issuer}\ndistribution: k3s\nca-file: /etc/irsa-agent/test-ca.crt\npublish:\n  - type: directory\n    path: /srv/oidc\n    cache-control: \"public, max-age=0\"\nrotation:\n  enabled: true\n  every: 30d\n  propagation-wait: 0s\n  token-lifetime: 10m\n  drain-margin: 0s\nrun:\n  metrics-textfile: /var/lib/prometheus/node-exporter/irsa_agent.prom\n"),
    );
    std::fs::create_dir_all(root.join("var/lib/prometheus/node-exporter")).expect("mkdir");
    let apiserver = FakeApiserver::start(Behaviour::Keys {
        root: root.clone(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &apiserver.url());
    // A rotation is due (the schedule came round).
    host.write(
        "/var/lib/irsa-agent/state.json",
        "{\"rotation\":{\"phase\":\"idle\",\"since\":1,\"next_due\":1}}\n",
    );
    let systemctl = rotation_support::fake_k3s_systemctl(&root)
        .display()
        .to_string();
    let k3s = rotation_support::fake_k3s_binary(&root)
        .display()
        .to_string();
    let mut d = Daemon::start(
        &root,
        &[
            "--systemctl",
            &systemctl,
            "--k3s",
            &k3s,
            "--poll-interval",
            "100ms",
            "--timeout",
            "20s",
        ],
        &[],
    );
    d.wait_ready();
    let status = d.wait_status("the rotation draining", |s| {
        s["rotation"]["phase"] == "draining"
    });
    let new_kid = status["rotation"]["rotation"]["new_kid"]
        .as_str()
        .expect("kid")
        .to_string();
    let jwks = std::fs::read_to_string(root.join("srv/oidc/openid/v1/jwks")).expect("jwks");
    assert!(jwks.contains(&new_kid), "{jwks}");
    assert_eq!(host.systemctl_log(), "restart k3s\n", "{}", d.log());
    assert!(
        d.log().contains("rotation: published -> trusted"),
        "{}",
        d.log()
    );
    // `status` shows the rotation in its own words: phase, since when, what comes next.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_irsa-agent"))
        .arg("--root")
        .arg(&root)
        .arg("status")
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rotation: draining since "), "{text}");
    assert!(text.contains(&format!("new key {new_kid}")), "{text}");
    assert!(text.contains("  next: "), "{text}");
    // The rotation's metrics are part of the daemon's exposition.
    let textfile = root.join("var/lib/prometheus/node-exporter/irsa_agent.prom");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&textfile).unwrap_or_default();
        if text.contains("irsa_agent_rotation_phase{phase=\"draining\"} 1") {
            assert!(
                text.contains("irsa_agent_rotation_phase{phase=\"idle\"} 0"),
                "{text}"
            );
            assert!(text.contains("irsa_agent_converges_total"), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no draining phase in the metrics textfile:\n{text}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, _) = d.stop();
    assert!(code.success());
}
