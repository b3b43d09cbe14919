//! `irsa-agent publish` (one shot) keeps a key the running apiserver still serves after the key
//! files dropped it (before the apiserver's restart the old key still signs), and drops it once
//! the apiserver has restarted with the new files. The apiserver is a fake that loads the
//! host's key files at each restart and serves them at /openid/v1/jwks, reached through the
//! admin kubeconfig with mutual TLS.

mod apply_support;
mod https_support;
mod run_support;

use apply_support::{Behaviour, FakeApiserver, Host};
use irsa_agent::config::Distribution;
use run_support::{binary, kids, new_ec_key, replace_by_rename};

const SERVICE_KEY: &str = "/var/lib/rancher/k3s/server/tls/service.key";
const CURRENT_KEY: &str = "/var/lib/rancher/k3s/server/tls/service.current.key";
const JWKS: &str = "/srv/oidc/openid/v1/jwks";

fn publish(host: &Host) -> (bool, String) {
    let out = std::process::Command::new(binary())
        .arg("--root")
        .arg(host.root())
        .args(["publish", "--no-verify"])
        .output()
        .expect("run irsa-agent publish");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn publish_keeps_a_key_the_running_apiserver_still_serves() {
    let host = Host::new();
    host.agent_config("https://oidc.example.com/homelab");
    host.write(
        "/etc/irsa-agent/config.d/50-publish.yaml",
        "distribution: k3s\npublish:\n  - type: directory\n    path: /srv/oidc\n",
    )
    .write("/etc/rancher/k3s/config.yaml", "# k3s\n")
    .k3s_keys("/var/lib/rancher/k3s");
    let server = FakeApiserver::start(Behaviour::Keys {
        root: host.root().to_path_buf(),
        distribution: Distribution::K3s,
    });
    host.kubeconfig("/etc/rancher/k3s/k3s.yaml", &server.url());

    let (ok, log) = publish(&host);
    assert!(ok, "{log}");
    let old_kids = kids(&std::fs::read(host.path(JWKS)).expect("jwks"));
    assert_eq!(old_kids.len(), 2, "{log}");
    assert!(!log.contains("also publishing"), "{log}");

    // The key files now hold a new key only; the apiserver has not restarted.
    let key = new_ec_key();
    replace_by_rename(&host.path(SERVICE_KEY), key.public_pem.as_bytes());
    replace_by_rename(&host.path(CURRENT_KEY), key.private_pem.as_bytes());
    let (ok, log) = publish(&host);
    assert!(ok, "{log}");
    let mut want = vec![key.kid.clone()];
    want.extend(old_kids.iter().cloned());
    assert_eq!(kids(&std::fs::read(host.path(JWKS)).expect("jwks")), want);
    assert!(log.contains("also publishing kid(s)"), "{log}");

    // k3s restarted with the new files: the old keys go.
    std::fs::write(host.path("/systemctl.log"), "restart k3s\n").expect("log a restart");
    let (ok, log) = publish(&host);
    assert!(ok, "{log}");
    assert_eq!(
        kids(&std::fs::read(host.path(JWKS)).expect("jwks")),
        vec![key.kid.clone()],
        "{log}"
    );
}
