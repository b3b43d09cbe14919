//! Publishing to a REAL SeaweedFS 4.48 (S3 + STS) on 127.0.0.1, started once for this test
//! binary: SigV4 writes (and a wrong secret refused), conditional-write conflicts between
//! writers, public reads through a bucket policy, the full IRSA exchange (a token signed by the
//! test cluster key gets credentials from STS once the agent has published, a tampered token or
//! one signed by an unpublished key does not), and the self-issued web identity (the agent
//! publishes with credentials it obtained with its own token).

mod support;

use std::sync::{Arc, Barrier, OnceLock};

use irsa_agent::config::{AwsCredentials, PublishTarget};
use irsa_agent::keys::{self, PublicKey};
use irsa_agent::publish::{self, Publication, Publisher, Target as _, store::StoreTarget};
use support::{ADMIN_KEY, ADMIN_SECRET, ROLE_PUBLISHER, Seaweed};

/// Buckets whose https URL SeaweedFS's STS trusts as an OIDC issuer.
const OIDC_BUCKETS: [&str; 3] = ["irsa", "selfissued", "unpublished"];

fn seaweed() -> &'static Seaweed {
    static SERVER: OnceLock<Seaweed> = OnceLock::new();
    SERVER.get_or_init(|| Seaweed::start(&OIDC_BUCKETS))
}

fn k3s_kid() -> String {
    let jwks: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/apiserver/k3s/jwks.json"),
        )
        .expect("jwks.json"),
    )
    .expect("JSON");
    // What the real kube-apiserver published for service.current.key (the first key).
    jwks["keys"][0]["kid"].as_str().expect("kid").to_string()
}

fn s3_config(sw: &Seaweed, bucket: &str, extra: &str) -> String {
    format!(
        "issuer: {}\ndistribution: k3s\npublish:\n  - type: s3\n    bucket: {bucket}\n    endpoint: {}\n    path-style: true\n    region: us-east-1\n{extra}",
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

fn ca_env(sw: &Seaweed) -> String {
    sw.ca.ca_cert.display().to_string()
}

fn https_client(sw: &Seaweed) -> reqwest::Client {
    irsa_agent::publish::http::install_crypto_provider();
    let pem = std::fs::read(&sw.ca.ca_cert).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("pem"))
        .build()
        .expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// An anonymous GET over https: (status, headers, body).
fn public_get(sw: &Seaweed, path: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    runtime().block_on(async {
        let r = https_client(sw)
            .get(format!("{}{path}", sw.https_endpoint()))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.bytes().await.expect("body").to_vec())
    })
}

#[test]
fn sigv4_writes_only_with_the_right_secret() {
    let sw = seaweed();
    sw.create_bucket("sigv4", true);
    let host = support::k3s_host(&s3_config(sw, "sigv4", ""));
    let ca = ca_env(sw);
    let mut env = admin_env();
    env.push(("SSL_CERT_FILE", &ca));
    env[1] = ("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--no-verify"], &env);
    assert_eq!(code, 1, "a wrong secret must fail: {stdout}{stderr}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(
        stdout.contains("SignatureDoesNotMatch") || stdout.contains("403"),
        "{stdout}"
    );
    let (status, _, _) = public_get(sw, "/sigv4/openid/v1/jwks");
    assert_eq!(status, 404, "nothing may have been written");

    env[1] = ("AWS_SECRET_ACCESS_KEY", ADMIN_SECRET);
    let (code, stdout, stderr) = support::agent(host.path(), &["publish"], &env);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("openid/v1/jwks: created"), "{stdout}");
    assert!(
        stdout.contains(".well-known/openid-configuration: created"),
        "{stdout}"
    );
    assert!(stdout.contains("matches byte for byte"), "{stdout}");
    // Second run: nothing changes, and --check agrees.
    let (code, stdout, _) = support::agent(host.path(), &["publish"], &env);
    assert_eq!(code, 0);
    assert_eq!(stdout.matches("up to date").count(), 2, "{stdout}");
    let (code, stdout, _) = support::agent(host.path(), &["publish", "--check"], &env);
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn public_reads_through_a_bucket_policy_and_check_finds_drift() {
    let sw = seaweed();
    sw.create_bucket("public", true);
    sw.create_bucket("private", false);
    let ca = ca_env(sw);
    let mut env = admin_env();
    env.push(("SSL_CERT_FILE", &ca));
    for bucket in ["public", "private"] {
        let host = support::k3s_host(&s3_config(
            sw,
            bucket,
            "    cache-control: \"public, max-age=120\"\n",
        ));
        let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--no-verify"], &env);
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
    let expected_jwks = {
        let host = support::k3s_host("issuer: https://x.example\n");
        let tls = host.path().join("var/lib/rancher/k3s/server/tls");
        let keys = keys::load_verification_files(&[tls.join("service.key")]).expect("keys");
        Publication::new(
            &sw.issuer("public"),
            &format!("{}/openid/v1/jwks", sw.issuer("public")),
            &keys,
        )
    };
    let (status, headers, body) = public_get(sw, "/public/openid/v1/jwks");
    assert_eq!(status, 200);
    assert_eq!(body, expected_jwks.documents.jwks.as_bytes());
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "public, max-age=120");
    let (status, _, body) = public_get(sw, "/public/.well-known/openid-configuration");
    assert_eq!(status, 200);
    assert_eq!(body, expected_jwks.documents.discovery.as_bytes());
    // Without the policy, anonymous reads are refused: the policy is what made it public.
    let (status, _, _) = public_get(sw, "/private/openid/v1/jwks");
    assert_eq!(status, 403);

    // Someone replaces the JWKS behind the agent's back: --check exits 2 and says what differs.
    let (code, body) = sw.curl_signed("PUT", "/public/openid/v1/jwks", br#"{"keys":[]}"#);
    assert_eq!(code, 200, "{body}");
    let host = support::k3s_host(&s3_config(
        sw,
        "public",
        "    cache-control: \"public, max-age=120\"\n",
    ));
    let (code, stdout, _) = support::agent(host.path(), &["publish", "--check"], &env);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("DIFFERS: lacks kid"), "{stdout}");
    assert!(stdout.contains("Content-Type is"), "{stdout}");
    let (code, stdout, _) = support::agent(host.path(), &["publish"], &env);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("openid/v1/jwks: updated"), "{stdout}");
    let (code, stdout, _) = support::agent(host.path(), &["publish", "--check"], &env);
    assert_eq!(code, 0, "{stdout}");
}

fn store_target(sw: &Seaweed, bucket: &str) -> StoreTarget {
    irsa_agent::publish::http::install_crypto_provider();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(sw.http_endpoint())
        .with_allow_http(true)
        .with_access_key_id(ADMIN_KEY)
        .with_secret_access_key(ADMIN_SECRET)
        .build()
        .expect("store");
    StoreTarget::new(format!("s3://{bucket}"), Arc::new(store))
}

fn publisher(sw: &Seaweed, bucket: &str) -> Publisher {
    let target = PublishTarget::S3 {
        bucket: bucket.into(),
        prefix: String::new(),
        region: None,
        endpoint: Some(sw.http_endpoint()),
        path_style: true,
        cache_control: "public, max-age=300".into(),
        credentials: AwsCredentials::Chain,
    };
    let issuer = sw.issuer(bucket);
    Publisher {
        target: Box::new(store_target(sw, bucket)),
        layout: publish::Layout::for_target(&issuer, &format!("{issuer}/openid/v1/jwks"), &target),
        cache_control: "public, max-age=300".into(),
    }
}

fn fresh_keys(n: usize) -> Vec<PublicKey> {
    (0..n)
        .map(|_| {
            use p256::pkcs8::EncodePublicKey as _;
            let secret = p256::SecretKey::random(&mut rand::thread_rng());
            let der = secret.public_key().to_public_key_der().expect("der");
            keys::der::parse_spki(der.as_bytes()).expect("key")
        })
        .collect()
}

#[test]
fn conditional_writes_never_lose_a_concurrent_writer() {
    let sw = seaweed();
    sw.create_bucket("conflicts", false);
    let rt = runtime();
    // The raw conditions: If-None-Match on create, If-Match on the ETag read.
    let a = store_target(sw, "conflicts");
    let b = store_target(sw, "conflicts");
    let object = |bytes: &'static [u8]| publish::Object {
        bytes,
        content_type: "application/json",
        cache_control: "no-cache",
    };
    rt.block_on(async {
        a.put("raw", object(b"1"), publish::Condition::Create)
            .await
            .expect("create");
        assert_eq!(
            b.put("raw", object(b"2"), publish::Condition::Create).await,
            Err(publish::TargetError::Conflict),
            "If-None-Match: * must refuse an existing object"
        );
        let seen_by_a = a.read("raw").await.expect("read").expect("exists");
        let seen_by_b = b.read("raw").await.expect("read").expect("exists");
        b.put(
            "raw",
            object(b"3"),
            publish::Condition::Update(seen_by_b.version),
        )
        .await
        .expect("b wins");
        assert_eq!(
            a.put(
                "raw",
                object(b"4"),
                publish::Condition::Update(seen_by_a.version)
            )
            .await,
            Err(publish::TargetError::Conflict),
            "If-Match on a stale ETag must be refused"
        );
        assert_eq!(
            a.read("raw").await.expect("read").expect("exists").bytes,
            b"3"
        );
    });

    // Deterministic race: agent A reads, agent B publishes in between, then A writes. A's
    // If-Match fails, A re-reads and merges: B's key survives next to A's.
    let issuer = sw.issuer("conflicts");
    let jwks_uri = format!("{issuer}/openid/v1/jwks");
    let (keys_a, keys_b) = (fresh_keys(1), fresh_keys(1));
    let b_publication = Publication::new(&issuer, &jwks_uri, &keys_b);
    let racing = Publisher {
        target: Box::new(Racing {
            inner: store_target(sw, "conflicts"),
            other: std::sync::Mutex::new(Some((publisher(sw, "conflicts"), b_publication))),
        }),
        ..publisher(sw, "conflicts")
    };
    let reports = rt.block_on(publish::publish_all(
        &[racing],
        &Publication::new(&issuer, &jwks_uri, &keys_a),
    ));
    let jwks = &reports[0].jwks;
    assert!(!reports[0].failed(), "{reports:?}");
    assert_eq!(jwks.conflicts, 1, "{reports:?}");
    assert_eq!(jwks.merged_kids, vec![keys_b[0].kid()]);
    let stored = rt
        .block_on(a.read("openid/v1/jwks"))
        .expect("read")
        .expect("jwks");
    assert_eq!(
        publish::merge::kids_in(&stored.bytes),
        vec![keys_a[0].kid(), keys_b[0].kid()]
    );

    // Real concurrency: four agents publish different keys at the same moment. Every write
    // succeeds or is retried; the result is one consistent JWKS + discovery pair.
    let key_sets: Vec<Vec<PublicKey>> = (0..4).map(|_| fresh_keys(1)).collect();
    let barrier = Arc::new(Barrier::new(key_sets.len()));
    let threads: Vec<_> = key_sets
        .iter()
        .cloned()
        .map(|keys| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let sw = seaweed();
                let p = publisher(sw, "conflicts");
                let issuer = sw.issuer("conflicts");
                let publication =
                    Publication::new(&issuer, &format!("{issuer}/openid/v1/jwks"), &keys);
                barrier.wait();
                runtime().block_on(publish::publish_all(&[p], &publication))
            })
        })
        .collect();
    let mut conflicts = 0;
    for t in threads {
        let reports = t.join().expect("thread");
        assert!(!reports[0].failed(), "{reports:?}");
        conflicts += reports[0].jwks.conflicts;
    }
    let stored = rt
        .block_on(a.read("openid/v1/jwks"))
        .expect("read")
        .expect("jwks");
    let kids = publish::merge::kids_in(&stored.bytes);
    let all: Vec<String> = key_sets.iter().map(|k| k[0].kid()).collect();
    assert!(
        !kids.is_empty() && kids.iter().all(|k| all.contains(k)),
        "{kids:?}"
    );
    // The discovery document lists ES256 (all keys are P-256) and points at the JWKS.
    let discovery = rt
        .block_on(a.read(".well-known/openid-configuration"))
        .expect("read")
        .expect("discovery");
    let doc: serde_json::Value = serde_json::from_slice(&discovery.bytes).expect("JSON");
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    eprintln!("{conflicts} conflicting writes were merged and retried");

    // A writer whose base is stale: it removes only keys it itself saw, keeps keys added since.
    let mine = fresh_keys(1);
    let issuer = sw.issuer("conflicts");
    let p = publisher(sw, "conflicts");
    let publication = Publication::new(&issuer, &format!("{issuer}/openid/v1/jwks"), &mine);
    let reports = rt.block_on(publish::publish_all(&[p], &publication));
    assert_eq!(reports[0].jwks.outcome, publish::Outcome::Updated);
    assert_eq!(
        reports[0].jwks.removed_kids.len(),
        kids.len(),
        "{reports:?}"
    );
}

/// A target that lets another agent publish between our read and our first write.
struct Racing {
    inner: StoreTarget,
    other: std::sync::Mutex<Option<(Publisher, Publication)>>,
}

impl publish::Target for Racing {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn read<'a>(
        &'a self,
        key: &'a str,
    ) -> publish::BoxFuture<'a, Result<Option<publish::Stored>, publish::TargetError>> {
        self.inner.read(key)
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        object: publish::Object<'a>,
        condition: publish::Condition,
    ) -> publish::BoxFuture<'a, Result<(), publish::TargetError>> {
        Box::pin(async move {
            let other = self.other.lock().expect("lock").take();
            if let Some((p, publication)) = other {
                let reports = publish::publish_all(&[p], &publication).await;
                assert!(!reports[0].failed(), "{reports:?}");
            }
            self.inner.put(key, object, condition).await
        })
    }
}

const STS_SCRIPT: &str = r#"
import sys, time, json, base64, ssl, urllib.request, urllib.parse, urllib.error
import jwt
endpoint, ca, key_file, kid, issuer, mode = sys.argv[1:7]
now = int(time.time())
claims = {"iss": issuer, "sub": "system:serviceaccount:default:app", "aud": "sts.amazonaws.com",
          "iat": now, "nbf": now, "exp": now + 600}
token = jwt.encode(claims, open(key_file).read(), algorithm="RS256", headers={"kid": kid})
if mode == "tamper":
    h, p, s = token.split(".")
    claims["sub"] = "system:serviceaccount:kube-system:cluster-admin"
    p = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    token = ".".join([h, p, s])
body = urllib.parse.urlencode({"Action": "AssumeRoleWithWebIdentity", "Version": "2011-06-15",
    "RoleArn": sys.argv[7], "RoleSessionName": "irsa-test", "WebIdentityToken": token,
    "DurationSeconds": "900"}).encode()
try:
    r = urllib.request.urlopen(urllib.request.Request(endpoint, data=body),
                               context=ssl.create_default_context(cafile=ca))
    print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"#;

/// Exchanges a PyJWT-minted token at SeaweedFS's STS: (HTTP status, answer).
fn exchange(
    sw: &Seaweed,
    issuer: &str,
    key_file: &std::path::Path,
    kid: &str,
    mode: &str,
) -> (u16, String) {
    let ca = ca_env(sw);
    let endpoint = format!("{}/", sw.https_endpoint());
    let key = key_file.display().to_string();
    let (code, out, err) = support::python(
        STS_SCRIPT,
        &[&endpoint, &ca, &key, kid, issuer, mode, ROLE_PUBLISHER],
    );
    assert_eq!(code, 0, "python: {err}");
    let (status, body) = out.split_once('\n').expect("status line");
    (status.trim().parse().expect("status"), body.to_string())
}

fn xml(body: &str, tag: &str) -> String {
    let start = body.find(&format!("<{tag}>")).map(|i| i + tag.len() + 2);
    let end = body.find(&format!("</{tag}>"));
    match (start, end) {
        (Some(s), Some(e)) => body[s..e].to_string(),
        _ => panic!("no <{tag}> in {body}"),
    }
}

#[test]
fn irsa_exchange_works_once_published_and_refuses_forgeries() {
    let sw = seaweed();
    sw.create_bucket("irsa", true);
    let issuer = sw.issuer("irsa");
    let host = support::k3s_host(&s3_config(sw, "irsa", ""));
    let key_file = support::signing_key_file(host.path());
    let kid = k3s_kid();

    // Before the agent publishes, STS cannot find the key: refused.
    let (status, body) = exchange(sw, &issuer, &key_file, &kid, "honest");
    assert_ne!(status, 200, "no JWKS yet, must be refused: {body}");

    let ca = ca_env(sw);
    let mut env = admin_env();
    env.push(("SSL_CERT_FILE", &ca));
    let (code, stdout, stderr) = support::agent(host.path(), &["publish"], &env);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // An honest token signed by the cluster key: credentials.
    let (status, body) = exchange(sw, &issuer, &key_file, &kid, "honest");
    assert_eq!(status, 200, "{body}");
    let access_key = xml(&body, "AccessKeyId");
    let secret = xml(&body, "SecretAccessKey");
    let session = xml(&body, "SessionToken");
    // The credentials work: read the published JWKS back through a signed S3 request.
    irsa_agent::publish::http::install_crypto_provider();
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("irsa")
        .with_region("us-east-1")
        .with_endpoint(sw.http_endpoint())
        .with_allow_http(true)
        .with_access_key_id(access_key)
        .with_secret_access_key(secret)
        .with_token(session)
        .build()
        .expect("store");
    let target = StoreTarget::new("s3://irsa".into(), Arc::new(store));
    let _ = &target;
    let read = runtime()
        .block_on(target.read("openid/v1/jwks"))
        .expect("temporary credentials must work")
        .expect("jwks");
    assert!(publish::merge::kids_in(&read.bytes).contains(&kid));

    // A tampered token (claims changed after signing): refused.
    let (status, body) = exchange(sw, &issuer, &key_file, &kid, "tamper");
    assert_ne!(status, 200, "{body}");
    // A token signed by a key that was never published (under its own kid): refused.
    let other = tempfile::NamedTempFile::new().expect("tmp");
    let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa");
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    std::fs::write(
        other.path(),
        rsa.to_pkcs1_pem(Default::default())
            .expect("pem")
            .as_bytes(),
    )
    .expect("write");
    let other_kid = keys::load_signing_file(other.path())
        .expect("key")
        .public
        .kid();
    let (status, body) = exchange(sw, &issuer, other.path(), &other_kid, "honest");
    assert_ne!(status, 200, "{body}");
    // ... and one that claims the published kid but is signed by the other key: refused.
    let (status, body) = exchange(sw, &issuer, other.path(), &kid, "honest");
    assert_ne!(status, 200, "{body}");
}

#[test]
fn self_issued_web_identity_needs_no_aws_keys() {
    let sw = seaweed();
    sw.create_bucket("selfissued", true);
    sw.create_bucket("unpublished", true);
    let ca = ca_env(sw);
    let self_issued = format!(
        "    cache-control: \"public, max-age=60\"\n    role-arn: {ROLE_PUBLISHER}\n    sts-endpoint: {}\n",
        sw.https_endpoint()
    );

    // Before anything is published the issuer is not trusted yet: a clear failure that points
    // to the bootstrap.
    let host = support::k3s_host(&s3_config(sw, "unpublished", &self_issued));
    let (code, stdout, stderr) = support::agent(
        host.path(),
        &["publish", "--no-verify"],
        &[("SSL_CERT_FILE", &ca)],
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("AssumeRoleWithWebIdentity"), "{stdout}");
    assert!(stdout.contains("bootstrap"), "{stdout}");

    // Bootstrap: the first publish with other credentials.
    let host = support::k3s_host(&s3_config(sw, "selfissued", ""));
    let mut env = admin_env();
    env.push(("SSL_CERT_FILE", &ca));
    let (code, stdout, stderr) = support::agent(host.path(), &["publish"], &env);
    assert_eq!(code, 0, "{stdout}{stderr}");

    // From now on: no AWS keys at all, the agent's own token (a new Cache-Control forces a
    // write, so the temporary credentials are really used for PUTs).
    support::write_config(host.path(), &s3_config(sw, "selfissued", &self_issued));
    let (code, stdout, stderr) =
        support::agent(host.path(), &["publish"], &[("SSL_CERT_FILE", &ca)]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("openid/v1/jwks: updated"), "{stdout}");
    assert!(stderr.contains("AssumeRoleWithWebIdentity for"), "{stderr}");
    assert!(stdout.contains("matches byte for byte"), "{stdout}");
    let (_, headers, _) = public_get(sw, "/selfissued/openid/v1/jwks");
    assert_eq!(headers["cache-control"], "public, max-age=60");
    // The token itself never appears in the output.
    assert!(
        !stderr.contains("eyJ") && !stdout.contains("eyJ"),
        "{stderr}"
    );
}
