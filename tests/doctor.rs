//! `irsa-agent doctor` against real servers on 127.0.0.1: a fake kube-apiserver speaking
//! mutual TLS (reached through the host's admin kubeconfig, serving what a real apiserver
//! serves for the host's files) and an HTTPS server with a test CA serving the public
//! documents with controllable headers and delays. Each failure story provokes the failure,
//! checks the verdict in `--json`, and snapshots doctor's words (the checks that do not pass,
//! with their fixes).

mod apply_support;
mod doctor_support;
mod https_support;

use std::time::Duration;

use apply_support::{Behaviour, FakeApiserver, Served, data};
use doctor_support::{DISCOVERY, Date, JWKS, World, chmod, problems, status_of};

fn json(world: &World, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let (_, stdout, stderr) = world.agent(&args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"))
}

/// Runs doctor; returns (exit code, normalized text of the checks that do not pass).
fn doctor(world: &World, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["doctor"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = world.agent(&args);
    assert!(
        stdout.contains(" failed, "),
        "no summary line: {stdout}\n{stderr}"
    );
    (code, world.normalize(&problems(&stdout)))
}

/// The kubeadm manifest as `irsa-agent apply` leaves it: the public issuer first, the default
/// still accepted, audiences pinned, jwks-uri set.
fn after_apply(issuer: &str, manifest: String) -> String {
    manifest.replace(
        "    - --service-account-issuer=https://kubernetes.default.svc.cluster.local\n",
        &format!(
            "    - --api-audiences=https://kubernetes.default.svc.cluster.local\n    - --service-account-issuer={issuer}\n    - --service-account-issuer=https://kubernetes.default.svc.cluster.local\n    - --service-account-jwks-uri={issuer}/openid/v1/jwks\n"
        ),
    )
}

/// The k3s host's second key pair: a key change makes it the new signing key.
fn change_k3s_keys(world: &World) {
    let new_key = std::fs::read_to_string(data("apiserver/rsa-pkcs8/keys/rsa2048b.pkcs8.key"))
        .expect("new key");
    let tls = "/var/lib/rancher/k3s/server/tls";
    let old = world.host.read(&format!("{tls}/service.key"));
    world
        .host
        .write(&format!("{tls}/service.key"), format!("{new_key}{old}"))
        .write(&format!("{tls}/service.current.key"), &new_key);
    for f in ["service.key", "service.current.key"] {
        chmod(&world.host.path(&format!("{tls}/{f}")), 0o600);
    }
}

#[test]
fn a_healthy_cluster_passes_every_check() {
    let world = World::healthy();
    let (code, stdout, stderr) = world.agent(&["doctor"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    insta::assert_snapshot!(world.normalize(&stdout));
    // The JSON contract (README, "doctor --json").
    let doc = json(&world, &[]);
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["summary"]["fail"], 0);
    assert_eq!(doc["summary"]["warn"], 1, "the issuer's port (tests only)");
    assert!(doc["elapsed_ms"].as_u64().is_some());
    eprintln!("doctor on a healthy host: {} ms", doc["elapsed_ms"]);
    for check in doc["checks"].as_array().expect("checks") {
        assert!(
            check["id"].as_str().is_some_and(|id| id.contains('.')),
            "{check}"
        );
        assert!(
            ["pass", "warn", "fail", "skip"].contains(&check["status"].as_str().unwrap_or("")),
            "{check}"
        );
        assert!(
            check["finding"].as_str().is_some_and(|f| !f.is_empty()),
            "{check}"
        );
        assert!(
            check.get("fix").is_some(),
            "fix is always present (null when none): {check}"
        );
    }
    // The apiserver was asked with the admin credential, the public server as a relying party.
    let asked = world.apiserver.requests.lock().expect("lock").clone();
    for path in [
        "/readyz",
        "/.well-known/openid-configuration",
        "/openid/v1/jwks",
        "/api/v1/namespaces/default/endpoints/kubernetes",
    ] {
        assert!(
            asked.iter().any(|p| p == path),
            "{path} not asked: {asked:?}"
        );
    }
    let fetched = world.public.requests.lock().expect("lock").clone();
    assert!(fetched.iter().any(|p| p == DISCOVERY) && fetched.iter().any(|p| p == JWKS));
}

#[test]
fn trailing_slash_in_the_published_issuer() {
    let world = World::healthy();
    let issuer = world.issuer.clone();
    world.public.edit(DISCOVERY, |r| {
        let text = String::from_utf8(r.body.clone()).expect("utf8");
        r.body = text
            .replace(
                &format!("\"issuer\":\"{issuer}\""),
                &format!("\"issuer\":\"{issuer}/\""),
            )
            .into_bytes();
    });
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    assert_eq!(status_of(&json(&world, &[]), "public.issuer"), ["fail"]);
    insta::assert_snapshot!(words);
}

#[test]
fn trailing_slash_in_the_configured_issuer_is_refused_by_the_configuration_check() {
    let world = World::healthy();
    let config = world.host.read("/etc/irsa-agent/config.yaml");
    world.host.write(
        "/etc/irsa-agent/config.yaml",
        config.replace("/cluster-a\n", "/cluster-a/\n"),
    );
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    assert_eq!(status_of(&json(&world, &[]), "config.valid"), ["fail"]);
    // Everything that needs the issuer says why it did not run.
    assert_eq!(status_of(&json(&world, &[]), "public.issuer"), ["skip"]);
    insta::assert_snapshot!(words);
}

#[test]
fn issuer_changed_without_keeping_the_old_one() {
    let world = World::healthy();
    // The classic k3s mistake: one kube-apiserver-arg entry replaces k3s' default issuer.
    world.host.write(
        "/etc/rancher/k3s/config.yaml",
        format!(
            "kube-apiserver-arg:\n  - service-account-issuer={i}\n  - service-account-jwks-uri={i}/openid/v1/jwks\n",
            i = world.issuer
        ),
    );
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    let doc = json(&world, &[]);
    assert_eq!(status_of(&doc, "apiserver.old-issuers"), ["fail"]);
    assert_eq!(status_of(&doc, "apiserver.issuers"), ["pass"]);
    insta::assert_snapshot!(words);
}

#[test]
fn api_audiences_changed_by_an_issuer_change_on_kubeadm() {
    // The issuer replaced by hand in the manifest, no --api-audiences (kubeadm sets none): the
    // audiences followed the issuer (kubernetes#107031).
    let world = World::kubeadm(|issuer, manifest| {
        manifest.replace(
            "    - --service-account-issuer=https://kubernetes.default.svc.cluster.local\n",
            &format!(
                "    - --service-account-issuer={issuer}\n    - --service-account-jwks-uri={issuer}/openid/v1/jwks\n"
            ),
        )
    });
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    let doc = json(&world, &[]);
    assert_eq!(status_of(&doc, "apiserver.api-audiences"), ["fail"]);
    assert_eq!(status_of(&doc, "apiserver.old-issuers"), ["fail"]);
    insta::assert_snapshot!(words);
}

#[test]
fn kubeadm_after_apply_passes_the_flag_checks() {
    // What `irsa-agent apply` writes: dual issuer, audiences pinned, jwks-uri.
    let world = World::kubeadm(after_apply);
    let doc = json(&world, &[]);
    assert_eq!(doc["summary"]["fail"], 0, "{doc:#}");
    for id in [
        "apiserver.issuers",
        "apiserver.old-issuers",
        "apiserver.api-audiences",
        "apiserver.jwks-uri",
        "running.jwks",
        "public.kids",
    ] {
        assert_eq!(status_of(&doc, id), ["pass"], "{id}: {doc:#}");
    }
}

#[test]
fn stale_jwks_after_a_key_change() {
    let mut world = World::healthy();
    change_k3s_keys(&world);
    world.restart_apiserver(&[]); // the apiserver picked up the new key; the public copy did not
    world.public.edit(JWKS, |r| r.age = Some(120));
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    let doc = json(&world, &[]);
    assert_eq!(status_of(&doc, "public.kids"), ["fail"]);
    assert_eq!(status_of(&doc, "running.jwks"), ["pass"]);
    insta::assert_snapshot!(words);
    // Publishing fixes it.
    world.publish_current_keys();
    let doc = json(&world, &[]);
    assert_eq!(status_of(&doc, "public.kids"), ["pass"], "{doc:#}");
}

#[test]
fn apiserver_not_restarted_since_the_key_change() {
    let world = World::healthy();
    change_k3s_keys(&world);
    world.publish_current_keys();
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    assert_eq!(status_of(&json(&world, &[]), "running.jwks"), ["fail"]);
    insta::assert_snapshot!(words);
}

#[test]
fn two_control_plane_nodes_with_different_keys() {
    let mut world = World::healthy();
    // The other server: same issuer, but its own key files (kubeadm's keys here).
    let other = apply_support::Host::new();
    other
        .write(
            "/etc/rancher/k3s/config.yaml",
            world.host.read("/etc/rancher/k3s/config.yaml"),
        )
        .copy(
            &data("apiserver/rsa-pkcs8/keys/rsa2048b.pkcs8.key"),
            "/var/lib/rancher/k3s/server/tls/service.key",
        )
        .copy(
            &data("apiserver/rsa-pkcs8/keys/rsa2048b.pkcs8.key"),
            "/var/lib/rancher/k3s/server/tls/service.current.key",
        );
    let mut served = Served::from_host(other.root(), irsa_agent::config::Distribution::K3s);
    served.endpoints = Some(vec![0]);
    let node_b = FakeApiserver::start(Behaviour::Serve(served));
    world.restart_apiserver(&[node_b.port]);
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    let doc = json(&world, &[]);
    assert_eq!(status_of(&doc, "running.peers"), ["fail"]);
    assert_eq!(
        status_of(&doc, "running.jwks"),
        ["pass"],
        "this node is fine"
    );
    insta::assert_snapshot!(words.replace(&node_b.port.to_string(), "NODE_B_PORT"));
}

#[test]
fn an_rsa_public_key_file() {
    // sa.pub written as PKCS#1 'RSA PUBLIC KEY' (openssl rsa -RSAPublicKey_out): kube-apiserver
    // refuses to start with it.
    let world = World::kubeadm(after_apply);
    world.host.copy(
        &data("apiserver/reject-rsa-public-pkcs1/keys/rsa2048.pkcs1.pub"),
        "/etc/kubernetes/pki/sa.pub",
    );
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    assert_eq!(
        status_of(&json(&world, &[]), "apiserver.key-files"),
        ["fail", "pass"]
    );
    insta::assert_snapshot!(words);
}

#[test]
fn a_private_key_with_mode_0644() {
    let world = World::healthy();
    chmod(
        &world
            .host
            .path("/var/lib/rancher/k3s/server/tls/service.key"),
        0o644,
    );
    chmod(
        &world
            .host
            .path("/var/lib/rancher/k3s/server/tls/service.current.key"),
        0o640,
    );
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    assert_eq!(
        status_of(&json(&world, &[]), "apiserver.key-permissions"),
        ["fail", "warn"]
    );
    insta::assert_snapshot!(words);
}

#[test]
fn a_jwks_served_as_binary_octet_stream() {
    // What S3 answers for an object uploaded without a Content-Type.
    let world = World::healthy();
    world.public.edit(JWKS, |r| {
        r.content_type = Some("binary/octet-stream".into());
    });
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    assert_eq!(
        status_of(&json(&world, &[]), "public.jwks-content-type"),
        ["fail"]
    );
    insta::assert_snapshot!(words);
}

#[test]
fn a_public_endpoint_slower_than_the_aws_limit() {
    // AWS STS gives up after about 5 s (IDPCommunicationError). The threshold is lowered to
    // 1 s here so the test stays quick; the server answers after 1.5 s, above it.
    let world = World::healthy();
    world
        .public
        .edit(JWKS, |r| r.delay = Duration::from_millis(1500));
    // The discovery document is slowish too (under the threshold), so that fetching both one
    // after the other could not overlap.
    world
        .public
        .edit(DISCOVERY, |r| r.delay = Duration::from_millis(500));
    let (code, words) = doctor(&world, &["--slow-threshold", "1s"]);
    assert_eq!(code, 1);
    let doc = json(&world, &["--slow-threshold", "1s"]);
    assert_eq!(status_of(&doc, "public.jwks"), ["fail"]);
    eprintln!(
        "doctor with a 1.5 s JWKS and a 0.5 s discovery document: {} ms",
        doc["elapsed_ms"]
    );
    insta::assert_snapshot!(words);
    // The public documents were fetched concurrently: both answers were pending at once.
    assert!(
        world
            .public
            .max_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "the documents were fetched one after the other"
    );
    // With the real threshold the same answer passes.
    assert_eq!(status_of(&json(&world, &[]), "public.jwks"), ["pass"]);
}

#[test]
fn a_clock_ten_minutes_ahead() {
    let world = World::healthy();
    let now: i64 = 1_795_000_000;
    for path in [DISCOVERY, JWKS] {
        world.public.edit(path, |r| r.date = Date::At(now - 600));
    }
    let (code, words) = doctor(&world, &["--now", &now.to_string()]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(words);
}

#[test]
fn untrusted_certificate_and_missing_documents() {
    let world = World::healthy();
    // No ca-file: the test CA is not trusted.
    let config = world.host.read("/etc/irsa-agent/config.yaml");
    world.host.write(
        "/etc/irsa-agent/config.yaml",
        config.replace("ca-file: /etc/irsa-agent/test-ca.pem\n", ""),
    );
    let doc = json(&world, &[]);
    assert_eq!(status_of(&doc, "public.discovery"), ["fail"]);
    assert!(
        doc.to_string().contains("TLS verification failed"),
        "{doc:#}"
    );
    world.host.write("/etc/irsa-agent/config.yaml", config);
    // Nothing published at the jwks-uri.
    world.public.routes.lock().expect("lock").remove(JWKS);
    let (code, words) = doctor(&world, &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(words);
}

#[test]
fn without_an_admin_kubeconfig_the_apiserver_checks_are_skipped_with_the_reason() {
    let world = World::healthy();
    std::fs::remove_file(world.host.path("/etc/rancher/k3s/k3s.yaml")).expect("rm");
    let doc = json(&world, &[]);
    assert_eq!(doc["ok"], true, "skips are not failures: {doc:#}");
    for id in [
        "running.ready",
        "running.discovery",
        "running.jwks",
        "running.peers",
    ] {
        assert_eq!(status_of(&doc, id), ["skip"], "{id}");
    }
    let reason = doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["id"] == "running.ready")
        .map(|c| c["finding"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(reason.contains("/etc/rancher/k3s/k3s.yaml"), "{reason}");
    // --offline skips the network checks (and says so), the file checks still run.
    let doc = json(&world, &["--offline"]);
    assert_eq!(status_of(&doc, "public.kids"), ["skip"]);
    assert_eq!(status_of(&doc, "apiserver.signing-key"), ["pass"]);
}

#[test]
fn the_old_issuers_check_says_when_they_may_go() {
    let world = World::healthy();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let message = |switched_at: u64| {
        world.host.write(
            "/var/lib/irsa-agent/state.json",
            serde_json::json!({"issuer": {
                "issuer": world.issuer,
                "previous": ["https://kubernetes.default.svc.cluster.local"],
                "switched_at": switched_at,
                "applied_at": switched_at,
            }})
            .to_string(),
        );
        let doc = json(&world, &[]);
        let check = doc["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["id"] == "apiserver.old-issuers")
            .cloned()
            .expect("apiserver.old-issuers");
        assert_eq!(check["status"], "pass", "{check}");
        check["finding"].as_str().unwrap_or_default().to_string()
    };
    // Switched ten minutes ago: tokens minted with the default issuer may still be valid.
    let m = message(now - 600);
    assert!(m.contains("may be valid until"), "{m}");
    assert!(
        m.contains(&format!(
            "after this apiserver switched at {}",
            irsa_agent::state::rfc3339(now - 600)
        )),
        "{m}"
    );
    // Switched 400 days ago: longer than any token lifetime.
    let m = message(now - 400 * 86400);
    assert!(
        m.contains("no token minted with it can be valid any more"),
        "{m}"
    );
}
