//! `irsa-agent verify-token` and `irsa-agent trust-policy`: tokens minted with the cluster's
//! keys (keys::token::mint) or through the fake apiserver's TokenRequest, verified against
//! the JWKS fetched over HTTPS from the test server (jsonwebtoken does the signature check);
//! each failure story snapshots the explanation.

mod apply_support;
mod doctor_support;
mod https_support;

use apply_support::data;
use doctor_support::{JWKS, Reply, World};
use serde_json::json;

/// "Now" for the tokens minted here (passed as --now).
const NOW: i64 = 1_795_000_000;

fn signing_key(world: &World) -> irsa_agent::keys::SigningKey {
    irsa_agent::keys::load_signing_file(
        &world
            .host
            .path("/var/lib/rancher/k3s/server/tls/service.current.key"),
    )
    .expect("signing key")
}

/// Claims as kube-apiserver writes them for default/app, valid from NOW for an hour.
fn claims(issuer: &str) -> serde_json::Value {
    json!({
        "aud": ["sts.amazonaws.com"],
        "exp": NOW + 3600,
        "iat": NOW,
        "iss": issuer,
        "kubernetes.io": {"namespace": "default", "pod": {"name": "app-7c9f", "uid": "1"},
                          "serviceaccount": {"name": "app", "uid": "2"}},
        "nbf": NOW,
        "sub": "system:serviceaccount:default:app",
    })
}

fn mint(key: &irsa_agent::keys::SigningKey, claims: &serde_json::Value) -> String {
    irsa_agent::keys::token::mint(key, claims).expect("mint")
}

/// verify-token with the token on standard input and NOW as the time.
fn verify(world: &World, token: &str, extra: &[&str]) -> (i32, String) {
    let now = NOW.to_string();
    let mut args = vec!["verify-token", "-", "--now", &now];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = world.agent_with_stdin(&args, token);
    assert!(
        !stdout.contains(token.trim()),
        "the token must never be printed"
    );
    assert!(
        !stderr.contains(token.trim()),
        "the token must never be logged"
    );
    (
        code,
        world.normalize(&format!(
            "{stdout}{}",
            if code > 1 { stderr } else { String::new() }
        )),
    )
}

/// The check lines with this id prefix (and their indented details and fix).
fn lines_of(text: &str, prefix: &str) -> String {
    let mut out = Vec::new();
    let mut keep = false;
    for line in text.lines() {
        if line.starts_with("        ") {
            if keep {
                out.push(line);
            }
            continue;
        }
        keep = line.len() > 8 && line[8..].starts_with(prefix);
        if keep {
            out.push(line);
        }
    }
    out.join("\n") + "\n"
}

#[test]
fn a_token_from_token_request_passes_and_round_trips_through_trust_policy() {
    let world = World::healthy();
    // trust-policy's IAM JSON feeds verify-token --trust-policy.
    let (code, policy, stderr) = world.agent(&[
        "trust-policy",
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--account-id",
        "123456789012",
        "--format",
        "iam",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let parsed: serde_json::Value = serde_json::from_str(&policy).expect("the IAM part is JSON");
    assert_eq!(
        parsed["Statement"][0]["Action"],
        "sts:AssumeRoleWithWebIdentity"
    );
    world.host.write("/trust.json", &policy);
    let trust = world.host.path("/trust.json").display().to_string();
    let (code, stdout, stderr) = world.agent(&[
        "verify-token",
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--trust-policy",
        &trust,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ACCEPTED"), "{stdout}");
    assert!(
        stdout.contains("policy.verdict: statement 1 allows sts:AssumeRoleWithWebIdentity"),
        "{stdout}"
    );
    assert!(
        world
            .apiserver
            .requests
            .lock()
            .expect("lock")
            .iter()
            .any(|p| p == "/api/v1/namespaces/default/serviceaccounts/app/token"),
        "the token came from TokenRequest"
    );
    // The JSON contract (README, "verify-token --json").
    let (code, stdout, _) = world.agent(&[
        "verify-token",
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--json",
    ]);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["claims"]["sub"], "system:serviceaccount:default:app");
    assert_eq!(doc["header"]["alg"], "RS256");
    assert_eq!(doc["expected"]["audience"], "sts.amazonaws.com");
    assert!(
        doc["keys"]
            .as_str()
            .is_some_and(|k| k.contains("published JWKS"))
    );
    assert!(
        doc["checks"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["status"] == "pass"))
    );

    // A policy for another namespace names what differs.
    let (_, other, _) = world.agent(&[
        "trust-policy",
        "--namespace",
        "prod",
        "--service-account",
        "app",
        "--account-id",
        "123456789012",
        "--format",
        "iam",
    ]);
    world.host.write("/trust-prod.json", &other);
    let trust = world.host.path("/trust-prod.json").display().to_string();
    let (code, stdout, _) = world.agent(&[
        "verify-token",
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--trust-policy",
        &trust,
    ]);
    assert_eq!(code, 1, "{stdout}");
    insta::assert_snapshot!(world.normalize(&lines_of(&stdout, "policy.")));
}

#[test]
fn an_unknown_kid_after_a_key_change_is_a_stale_jwks() {
    let world = World::healthy();
    // A new signing key on the host, not published yet.
    let new_key =
        std::fs::read_to_string(data("apiserver/rsa-pkcs8/keys/rsa2048b.pkcs8.key")).expect("key");
    let tls = "/var/lib/rancher/k3s/server/tls";
    let old = world.host.read(&format!("{tls}/service.key"));
    world
        .host
        .write(&format!("{tls}/service.key"), format!("{new_key}{old}"))
        .write(&format!("{tls}/service.current.key"), &new_key);
    let token = mint(&signing_key(&world), &claims(&world.issuer));
    let (code, out) = verify(&world, &token, &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(out);
    // Against this host's key files it verifies.
    let (code, out) = verify(&world, &token, &["--local"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("checked against this host's key files"),
        "{out}"
    );
}

#[test]
fn the_sts_amazon_com_audience_typo() {
    let world = World::healthy();
    let mut c = claims(&world.issuer);
    c["aud"] = json!(["sts.amazon.com"]);
    let (code, out) = verify(&world, &mint(&signing_key(&world), &c), &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(out);
}

#[test]
fn an_audience_typo_in_the_trust_policy() {
    let world = World::healthy();
    let provider = world.issuer.trim_start_matches("https://").to_string();
    let policy = json!({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow",
        "Principal": {"Federated": format!("arn:aws:iam::123456789012:oidc-provider/{provider}")},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {
            "StringEquals": {format!("{provider}:aud"): "sts.amazon.com"},
            "StringLike": {format!("{provider}:sub"): "system:serviceaccount:default:*"},
        }
    }]});
    world.host.write("/trust.json", policy.to_string());
    let trust = world.host.path("/trust.json").display().to_string();
    let token = mint(&signing_key(&world), &claims(&world.issuer));
    let (code, out) = verify(&world, &token, &["--trust-policy", &trust]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(lines_of(&out, "policy."));
}

#[test]
fn a_trust_policy_for_another_provider_and_action() {
    let world = World::healthy();
    let provider = world.issuer.trim_start_matches("https://").to_string();
    let policy = json!({"Version": "2012-10-17", "Statement": {
        "Effect": "Allow",
        "Principal": {"Federated": format!("arn:aws:iam::123456789012:oidc-provider/{provider}/")},
        "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {format!("{provider}/:sub"): "system:serviceaccount:default:app"}}
    }});
    world.host.write("/trust.json", policy.to_string());
    let trust = world.host.path("/trust.json").display().to_string();
    let token = mint(&signing_key(&world), &claims(&world.issuer));
    let (code, out) = verify(&world, &token, &["--trust-policy", &trust]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(lines_of(&out, "policy."));
}

#[test]
fn a_trailing_slash_in_the_tokens_issuer() {
    let world = World::healthy();
    let token = mint(&signing_key(&world), &claims(&format!("{}/", world.issuer)));
    let (code, out) = verify(&world, &token, &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(lines_of(&out, "token.issuer"));
}

#[test]
fn expired_and_not_yet_valid_tokens_give_times_and_skew() {
    let world = World::healthy();
    let key = signing_key(&world);
    let mut expired = claims(&world.issuer);
    expired["iat"] = json!(NOW - 3690);
    expired["nbf"] = json!(NOW - 3690);
    expired["exp"] = json!(NOW - 90);
    let (code, out1) = verify(&world, &mint(&key, &expired), &[]);
    assert_eq!(code, 1);
    let mut future = claims(&world.issuer);
    future["nbf"] = json!(NOW + 600);
    future["iat"] = json!(NOW + 600);
    future["exp"] = json!(NOW + 4200);
    let (code, out2) = verify(&world, &mint(&key, &future), &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(format!(
        "{}{}",
        lines_of(&out1, "token.lifetime"),
        lines_of(&out2, "token.lifetime")
    ));
}

#[test]
fn a_wrong_algorithm_for_the_published_key() {
    let world = World::healthy();
    // An EC key signs (ES256), but the JWKS publishes an RSA key under its kid.
    let ec =
        irsa_agent::keys::load_signing_file(&data("apiserver/ec-p256-sec1/keys/ec256.sec1.key"))
            .expect("ec key");
    let rsa = signing_key(&world).public;
    let mut jwk: serde_json::Value =
        serde_json::from_str(&irsa_agent::keys::jwks::jwk_json(&rsa)).expect("jwk");
    jwk["kid"] = json!(ec.public.kid());
    world
        .public
        .set(JWKS, Reply::json(json!({"keys": [jwk]}).to_string()));
    let token = mint(&ec, &claims(&world.issuer));
    let (code, out) = verify(&world, &token, &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(out.replace(&ec.public.kid(), "EC_KID"));
}

#[test]
fn malformed_tampered_and_unsigned_tokens() {
    let world = World::healthy();
    let (code, out) = verify(&world, "  Bearer not-a-token\n", &[]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(out);
    // Tampered: another subject, same signature.
    let token = mint(&signing_key(&world), &claims(&world.issuer));
    let parts: Vec<&str> = token.split('.').collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts[1]).expect("b64")).expect("json");
    payload["sub"] = json!("system:serviceaccount:kube-system:admin");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(payload.to_string()),
        parts[2]
    );
    let (code, out) = verify(&world, &forged, &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL  token.signature: the signature does not verify"),
        "{out}"
    );
    // alg none / HS256.
    for alg in ["none", "HS256"] {
        let header = b64.encode(json!({"alg": alg, "kid": rsa_kid(&world)}).to_string());
        let token = format!("{header}.{}.c2ln", parts[1]);
        let (code, out) = verify(&world, &token, &[]);
        assert_eq!(code, 1);
        assert!(
            out.contains("FAIL  token.algorithm: wrong algorithm"),
            "{out}"
        );
    }
}

fn rsa_kid(world: &World) -> String {
    signing_key(world).public.kid()
}

#[test]
fn token_request_for_a_missing_service_account_names_it() {
    let world = World::healthy();
    let (code, _, stderr) = world.agent(&[
        "verify-token",
        "--namespace",
        "default",
        "--service-account",
        "missing",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("service account default/missing not found"),
        "{stderr}"
    );
}

#[test]
fn trust_policy_prints_iam_terraform_azure_and_gcp() {
    let world = World::healthy();
    let (code, stdout, stderr) = world.agent(&[
        "trust-policy",
        "--namespace",
        "default",
        "--service-account",
        "app",
        "--account-id",
        "123456789012",
    ]);
    assert_eq!(code, 0, "{stderr}");
    insta::assert_snapshot!(world.normalize(&stdout));
    // An ARN for another provider is flagged.
    let (code, _, stderr) = world.agent(&[
        "trust-policy",
        "-n",
        "default",
        "--service-account",
        "app",
        "--provider-arn",
        "arn:aws:iam::123456789012:oidc-provider/oidc.example.com/other",
        "--format",
        "terraform",
    ]);
    assert_eq!(code, 0);
    assert!(
        stderr.contains("does not end with :oidc-provider/127.0.0.1:"),
        "{stderr}"
    );
}

#[test]
fn the_token_shape_is_checked_first_and_an_empty_input_is_called_empty() {
    let world = World::healthy();
    let now = NOW.to_string();
    // Empty standard input: before, "this has 1 part".
    let (code, stdout, stderr) =
        world.agent_with_stdin(&["verify-token", "-", "--now", &now], "\n");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains("FAIL  token.format: malformed token: empty input"),
        "{stdout}{stderr}"
    );
    assert!(!stdout.contains("part"), "{stdout}");
    // Garbage, and a relying party nobody serves: the token is called malformed; nothing is
    // fetched (before: "cannot fetch the published JWKS", and never a word about the token).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let unserved = format!("https://127.0.0.1:{port}/nowhere");
    let (code, stdout, stderr) = world.agent_with_stdin(
        &["verify-token", "-", "--now", &now, "--issuer", &unserved],
        "hello world",
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.contains("FAIL  token.format: malformed token: not a JWT: 1 part, expected 3"),
        "{stdout}{stderr}"
    );
    assert!(!stderr.contains("cannot fetch"), "{stderr}");
    assert!(!stderr.contains("fetching the published JWKS"), "{stderr}");
}

/// "REFUSED: problems (a, b)" said no number: the count is always given.
#[test]
fn the_verdict_counts_the_problems() {
    let world = World::healthy();
    let key = signing_key(&world);
    let mut bad = claims(&world.issuer);
    bad["aud"] = json!(["sts.amazon.com"]);
    bad["iat"] = json!(NOW - 3690);
    bad["nbf"] = json!(NOW - 3690);
    bad["exp"] = json!(NOW - 90);
    let (code, out) = verify(&world, &mint(&key, &bad), &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains("REFUSED: 2 problems (token.audience, token.lifetime)"),
        "{out}"
    );
}
