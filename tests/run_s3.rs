//! `irsa-agent run` publishing to a REAL SeaweedFS 4.48 (S3, SigV4) on 127.0.0.1: a key file
//! replaced by rename reaches the bucket, an object deleted in the bucket is restored by the
//! resync, and a server that goes down is retried (with backoff, same process) until it is
//! back. Reads go through anonymous HTTP GETs (public-read bucket policy), as STS reads them.

mod run_support;
mod support;

use run_support::{DEADLINE, Daemon, eventually, jwks_for, kids, new_ec_key, replace_by_rename};
use support::{ADMIN_KEY, ADMIN_SECRET, Seaweed};

const SERVICE_KEY: &str = "/var/lib/rancher/k3s/server/tls/service.key";
const CURRENT_KEY: &str = "/var/lib/rancher/k3s/server/tls/service.current.key";

fn config(sw: &Seaweed, bucket: &str) -> String {
    format!(
        "issuer: {}\ndistribution: k3s\npublic-check: false\npublish:\n  - type: s3\n    bucket: {bucket}\n    endpoint: {}\n    path-style: true\n    region: us-east-1\nrun:\n  resync-interval: 1s\n  retry-max: 2s\n  publish-timeout: 3s\n",
        sw.issuer(bucket),
        sw.http_endpoint()
    )
}

fn admin_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ADMIN_KEY),
        ("AWS_SECRET_ACCESS_KEY", ADMIN_SECRET),
    ]
}

/// An anonymous GET of an object: (HTTP status, body).
fn get(sw: &Seaweed, path: &str) -> (u16, Vec<u8>) {
    let out = std::process::Command::new(support::tool("curl"))
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("{}{path}", sw.http_endpoint()))
        .output()
        .expect("curl");
    let text = out.stdout;
    let split = text.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&text[split..])
        .trim()
        .parse()
        .unwrap_or(0);
    (code, text[..split].to_vec())
}

fn real_apiserver_jwks() -> Vec<u8> {
    std::fs::read(run_support::data("apiserver/k3s/jwks.json")).expect("jwks.json")
}

fn wait_object(d: &mut Daemon, sw: &Seaweed, path: &str, what: &str, want: &[u8]) {
    let found = eventually(DEADLINE, || {
        let (code, body) = get(sw, path);
        (code == 200 && body == want).then_some(())
    });
    if found.is_none() {
        d.assert_running();
        let (code, body) = get(sw, path);
        panic!(
            "{path} never became {what}; it is {code}: {}\nstatus: {}\nlog:\n{}",
            String::from_utf8_lossy(&body),
            d.status(),
            d.log()
        );
    }
}

/// Rotates a new EC key in, k3s style (verification file first, then the signing key), each
/// file replaced by rename. Returns the new kid.
fn rotate_in_a_new_key(root: &std::path::Path) -> String {
    let key = new_ec_key();
    let path = |p: &str| root.join(p.trim_start_matches('/'));
    let mut both = std::fs::read_to_string(path(SERVICE_KEY)).expect("service.key");
    both.push_str(&key.public_pem);
    replace_by_rename(&path(SERVICE_KEY), both.as_bytes());
    replace_by_rename(&path(CURRENT_KEY), key.private_pem.as_bytes());
    key.kid
}

#[test]
fn publishes_to_s3_follows_a_key_rename_and_restores_a_deleted_object() {
    let sw = Seaweed::start(&[]);
    sw.create_bucket("run", true);
    let host = support::k3s_host(&config(&sw, "run"));
    let mut d = Daemon::start(host.path(), &["--no-restart"], &admin_env());
    d.wait_ready();
    // Published before READY, byte for byte what the real apiserver served for these keys.
    assert_eq!(
        get(&sw, "/run/openid/v1/jwks"),
        (200, real_apiserver_jwks())
    );
    let (code, discovery) = get(&sw, "/run/.well-known/openid-configuration");
    assert_eq!(code, 200);
    let discovery: serde_json::Value = serde_json::from_slice(&discovery).expect("json");
    assert_eq!(discovery["issuer"], sw.issuer("run").as_str());

    let new_kid = rotate_in_a_new_key(host.path());
    let expected = jwks_for(host.path(), &[SERVICE_KEY]);
    wait_object(
        &mut d,
        &sw,
        "/run/openid/v1/jwks",
        "the new JWKS",
        &expected,
    );
    assert!(kids(&expected).contains(&new_kid));

    // Deleted in the bucket behind the agent's back: the resync puts it back.
    let (code, body) = sw.curl_signed("DELETE", "/run/openid/v1/jwks", b"");
    assert!(code == 204 || code == 200, "delete: {code} {body}");
    wait_object(&mut d, &sw, "/run/openid/v1/jwks", "restored", &expected);
    let status = d.wait_status("drift counted", |s| {
        s["daemon"]["metrics"]["drift_found_total"].as_u64() >= Some(1)
    });
    assert_eq!(
        status["daemon"]["targets"][0]["target"], "s3://run",
        "{status}"
    );
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}

#[test]
fn a_stopped_s3_server_is_retried_until_it_is_back() {
    let mut sw = Seaweed::start(&[]);
    sw.create_bucket("down", true);
    let host = support::k3s_host(&config(&sw, "down"));
    let mut d = Daemon::start(host.path(), &["--no-restart"], &admin_env());
    d.wait_ready();
    assert_eq!(
        get(&sw, "/down/openid/v1/jwks"),
        (200, real_apiserver_jwks())
    );

    sw.stop();
    let new_kid = rotate_in_a_new_key(host.path());
    let status = d.wait_status("failed attempts against the stopped server", |s| {
        s["daemon"]["phase"] == "retrying"
            && s["daemon"]["metrics"]["publish_failures_total"]
                .as_u64()
                .is_some_and(|n| n >= 2)
    });
    let error = status["daemon"]["errors"][0].as_str().unwrap_or("");
    assert!(error.starts_with("s3://down:"), "{status}");
    d.notify.wait_line("a STATUS saying it retries", |l| {
        l.starts_with("STATUS=failing, retry") && l.contains("s3://down")
    });

    sw.restart();
    let expected = jwks_for(host.path(), &[SERVICE_KEY]);
    wait_object(
        &mut d,
        &sw,
        "/down/openid/v1/jwks",
        "the new JWKS",
        &expected,
    );
    assert!(kids(&expected).contains(&new_kid));
    let status = d.wait_status("in sync again", |s| s["daemon"]["phase"] == "in-sync");
    assert_eq!(status["daemon"]["pid"], d.pid(), "same process");
    assert_eq!(d.notify.count("READY=1"), 1);
    d.assert_running();
}
