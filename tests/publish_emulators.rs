//! The `gcs` and `azure-blob` targets against the real emulators on 127.0.0.1: fake-gcs-server
//! (JSON API, object generations) and Microsoft's Azurite 3.37 (SharedKey signatures, ETags),
//! each started once for this test binary (tests/emulator_support). Through the real
//! `irsa-agent publish`: the documents land byte for byte as the real kube-apiserver serves
//! them, as application/json with the configured Cache-Control; an unchanged document is not
//! rewritten; an outside change is found by `--check` and repaired; a wrong credential fails
//! naming the target and writes nothing. Through the library: the conditions themselves, and a
//! writer that changes the JWKS between the agent's read and its write is merged with, never
//! overwritten.
//!
//! And `irsa-agent run` publishing to both at once: a key file replaced by rename reaches both,
//! an object deleted behind its back is restored by the resync.
//!
//! Without the emulators (IRSA_TEST_FAKE_GCS_SERVER, IRSA_TEST_AZURITE, set by tests/run.sh)
//! each test prints SKIPPED and passes.

mod emulator_support;
mod run_support;
mod support;

use std::path::Path;
use std::sync::{Arc, Barrier};

use emulator_support::{AZURE_ACCOUNT, AZURE_KEY, Azurite, FakeGcs, runtime};
use irsa_agent::config::PublishTarget;
use irsa_agent::host::HostRoot;
use irsa_agent::keys::{self, PublicKey};
use irsa_agent::publish::{self, Publication, Publisher, Target as _};

const PREFIX: &str = "cluster-a";
const JWKS_KEY: &str = "cluster-a/openid/v1/jwks";
const DISCOVERY_KEY: &str = "cluster-a/.well-known/openid-configuration";

fn data(path: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(path),
    )
    .expect("test data")
}

/// The JWKS the real kube-apiserver served for the k3s test keys (byte for byte).
fn apiserver_jwks() -> Vec<u8> {
    data("apiserver/k3s/jwks.json")
}

/// The real kube-apiserver's discovery document with our issuer (and its default jwks_uri).
fn apiserver_discovery(issuer: &str) -> Vec<u8> {
    String::from_utf8(data("apiserver/k3s/discovery.json"))
        .expect("utf-8")
        .trim_end()
        .replace(
            "https://127.0.0.1:6443/openid/v1/jwks",
            &format!("{issuer}/openid/v1/jwks"),
        )
        .replace("https://kubernetes.default.svc.cluster.local", issuer)
        .into_bytes()
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

/// A target that lets another agent publish between our read and our first write.
struct Racing {
    inner: Box<dyn publish::Target>,
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

/// The raw conditions, a deterministic race (merged, nothing lost) and four concurrent
/// writers (all succeed, one consistent pair), on targets `make` builds.
fn conditional_writes_merge(issuer: &str, make: &dyn Fn() -> Publisher) {
    let rt = runtime();
    let object = |bytes: &'static [u8]| publish::Object {
        bytes,
        content_type: "application/json",
        cache_control: "no-cache",
    };
    let (a, b) = (make(), make());
    rt.block_on(async {
        a.target
            .put("raw", object(b"1"), publish::Condition::Create)
            .await
            .expect("create");
        assert_eq!(
            b.target
                .put("raw", object(b"2"), publish::Condition::Create)
                .await,
            Err(publish::TargetError::Conflict),
            "create-only must refuse an existing object"
        );
        let seen_by_a = a.target.read("raw").await.expect("read").expect("exists");
        let seen_by_b = b.target.read("raw").await.expect("read").expect("exists");
        b.target
            .put(
                "raw",
                object(b"3"),
                publish::Condition::Update(seen_by_b.version),
            )
            .await
            .expect("b wins");
        assert_eq!(
            a.target
                .put(
                    "raw",
                    object(b"4"),
                    publish::Condition::Update(seen_by_a.version)
                )
                .await,
            Err(publish::TargetError::Conflict),
            "a write on a stale version must be refused"
        );
        assert_eq!(
            a.target
                .read("raw")
                .await
                .expect("read")
                .expect("raw")
                .bytes,
            b"3"
        );
    });

    // Agent A reads (nothing yet), agent B publishes its key, then A writes: A's condition
    // fails, A re-reads and merges, and the JWKS holds both keys.
    let jwks_uri = format!("{issuer}/openid/v1/jwks");
    let (keys_a, keys_b) = (fresh_keys(1), fresh_keys(1));
    let racing = Publisher {
        target: Box::new(Racing {
            inner: make().target,
            other: std::sync::Mutex::new(Some((
                make(),
                Publication::new(issuer, &jwks_uri, &keys_b),
            ))),
        }),
        ..make()
    };
    let reports = rt.block_on(publish::publish_all(
        &[racing],
        &Publication::new(issuer, &jwks_uri, &keys_a),
    ));
    assert!(!reports[0].failed(), "{reports:?}");
    assert_eq!(reports[0].jwks.conflicts, 1, "{reports:?}");
    assert_eq!(reports[0].jwks.merged_kids, vec![keys_b[0].kid()]);
    let stored = rt
        .block_on(a.target.read(JWKS_KEY))
        .expect("read")
        .expect("jwks");
    assert_eq!(
        publish::merge::kids_in(&stored.bytes),
        vec![keys_a[0].kid(), keys_b[0].kid()],
        "the other writer's key must survive"
    );
    assert_eq!(stored.content_type.as_deref(), Some("application/json"));

    // Four agents at the same moment: every write succeeds or is retried after a conflict.
    let key_sets: Vec<Vec<PublicKey>> = (0..4).map(|_| fresh_keys(1)).collect();
    let barrier = Arc::new(Barrier::new(key_sets.len()));
    let reports: Vec<_> = std::thread::scope(|s| {
        let threads: Vec<_> = key_sets
            .iter()
            .map(|keys| {
                let barrier = Arc::clone(&barrier);
                let p = make();
                let publication = Publication::new(issuer, &jwks_uri, keys);
                s.spawn(move || {
                    barrier.wait();
                    runtime().block_on(publish::publish_all(&[p], &publication))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    let conflicts: usize = reports.iter().map(|r| r[0].jwks.conflicts).sum();
    for r in &reports {
        assert!(!r[0].failed(), "{r:?}");
    }
    let stored = rt
        .block_on(a.target.read(JWKS_KEY))
        .expect("read")
        .expect("jwks");
    let kids = publish::merge::kids_in(&stored.bytes);
    let all: Vec<String> = key_sets.iter().map(|k| k[0].kid()).collect();
    assert!(
        !kids.is_empty() && kids.iter().all(|k| all.contains(k)),
        "{kids:?}"
    );
    eprintln!("{conflicts} conflicting writes were merged and retried");
}

// ---- GCS: fake-gcs-server ----

const GCS_KEY_FILE: &str = "/etc/irsa-agent/gcs.json";
/// A service-account key file with OAuth off, as fake-gcs-server set-ups use (the emulator
/// checks no tokens): the agent sends no bearer token instead of asking Google for one.
const GCS_NO_OAUTH_KEY: &str =
    r#"{"disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}"#;

fn gcs_issuer(bucket: &str) -> String {
    format!("https://storage.googleapis.com/{bucket}/{PREFIX}")
}

fn gcs_config(gcs: &FakeGcs, bucket: &str, cache_control: &str) -> String {
    format!(
        "issuer: {}\ndistribution: k3s\npublish:\n  - type: gcs\n    bucket: {bucket}\n    prefix: {PREFIX}\n    endpoint: {}\n    credentials-file: {GCS_KEY_FILE}\n    cache-control: \"{cache_control}\"\n",
        gcs_issuer(bucket),
        gcs.endpoint()
    )
}

fn gcs_host(gcs: &FakeGcs, bucket: &str, cache_control: &str) -> tempfile::TempDir {
    let host = support::k3s_host(&gcs_config(gcs, bucket, cache_control));
    std::fs::write(host.path().join(&GCS_KEY_FILE[1..]), GCS_NO_OAUTH_KEY).expect("key");
    host
}

fn generation(gcs: &FakeGcs, bucket: &str, name: &str) -> String {
    gcs.metadata(bucket, name).expect("object")["generation"]
        .as_str()
        .expect("generation")
        .to_string()
}

#[test]
fn gcs_documents_land_byte_exact_and_drift_is_repaired() {
    let Some(gcs) = FakeGcs::get("gcs_documents_land_byte_exact_and_drift_is_repaired") else {
        return;
    };
    let bucket = "oidc-docs";
    gcs.create_bucket(bucket);
    let host = gcs_host(gcs, bucket, "public, max-age=77");
    let publish = |args: &[&str]| support::agent(host.path(), args, &[]);

    let (code, stdout, stderr) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("gs://oidc-docs/cluster-a\n"), "{stdout}");
    assert!(stdout.contains("openid/v1/jwks: created"), "{stdout}");
    assert!(
        stdout.contains(".well-known/openid-configuration: created"),
        "{stdout}"
    );
    let issuer = gcs_issuer(bucket);
    assert_eq!(gcs.bytes(bucket, JWKS_KEY), Some(apiserver_jwks()));
    assert_eq!(
        gcs.bytes(bucket, DISCOVERY_KEY),
        Some(apiserver_discovery(&issuer))
    );
    for name in [JWKS_KEY, DISCOVERY_KEY] {
        let meta = gcs.metadata(bucket, name).expect("object");
        assert_eq!(meta["contentType"], "application/json", "{meta}");
        assert_eq!(meta["cacheControl"], "public, max-age=77", "{meta}");
        assert!(meta.get("acl").is_none_or(|acl| acl.is_null()), "{meta}");
    }

    // Unchanged: nothing is rewritten (the generations stay), and --check agrees.
    let before = generation(gcs, bucket, JWKS_KEY);
    let (code, stdout, _) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(stdout.matches("up to date").count(), 2, "{stdout}");
    assert_eq!(generation(gcs, bucket, JWKS_KEY), before);
    let (code, stdout, _) = publish(&["publish", "--check", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");

    // Someone replaces the JWKS behind the agent's back: --check sees it, publish repairs it.
    gcs.overwrite(bucket, JWKS_KEY, br#"{"keys":[]}"#);
    let (code, stdout, _) = publish(&["publish", "--check", "--no-verify"]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("lacks kid"), "{stdout}");
    let (code, stdout, _) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("openid/v1/jwks: updated"), "{stdout}");
    assert_eq!(gcs.bytes(bucket, JWKS_KEY), Some(apiserver_jwks()));
    assert_eq!(
        gcs.metadata(bucket, JWKS_KEY).expect("jwks")["contentType"],
        "application/json"
    );

    // A new Cache-Control is a change too: both objects are rewritten with it.
    support::write_config(host.path(), &gcs_config(gcs, bucket, "public, max-age=120"));
    let (code, stdout, _) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(stdout.matches(": updated").count(), 2, "{stdout}");
    for name in [JWKS_KEY, DISCOVERY_KEY] {
        let meta = gcs.metadata(bucket, name).expect("object");
        assert_eq!(meta["cacheControl"], "public, max-age=120", "{meta}");
    }
    assert_eq!(gcs.bytes(bucket, JWKS_KEY), Some(apiserver_jwks()));
}

#[test]
fn gcs_conditional_writes_merge_a_concurrent_writer() {
    let Some(gcs) = FakeGcs::get("gcs_conditional_writes_merge_a_concurrent_writer") else {
        return;
    };
    let bucket = "oidc-race";
    gcs.create_bucket(bucket);
    let host = gcs_host(gcs, bucket, "public, max-age=300");
    let issuer = gcs_issuer(bucket);
    let target = PublishTarget::Gcs {
        bucket: bucket.into(),
        prefix: PREFIX.into(),
        cache_control: "public, max-age=300".into(),
        credentials_file: Some(GCS_KEY_FILE.into()),
        endpoint: Some(gcs.endpoint()),
    };
    let env = publish::Environment {
        root: HostRoot::new(host.path()),
        ca_file: None,
    };
    let make = || Publisher {
        target: Box::new(publish::gcs::build(&target, &env).expect("gcs target")),
        layout: publish::Layout::for_target(&issuer, &format!("{issuer}/openid/v1/jwks"), &target),
        cache_control: "public, max-age=300".into(),
    };
    conditional_writes_merge(&issuer, &make);
}

#[test]
fn gcs_a_bad_credentials_file_or_bucket_fails_naming_the_target() {
    let Some(gcs) = FakeGcs::get("gcs_a_bad_credentials_file_or_bucket_fails_naming_the_target")
    else {
        return;
    };
    // fake-gcs-server checks no tokens, so a wrong key can only be one the agent cannot use.
    let host = gcs_host(gcs, "oidc-creds", "public, max-age=300");
    std::fs::write(host.path().join(&GCS_KEY_FILE[1..]), "not a key").expect("key");
    let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--no-verify"], &[]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("gs://oidc-creds/cluster-a"), "{all}");
    assert!(
        all.contains("credentials-file /etc/irsa-agent/gcs.json"),
        "{all}"
    );

    // A bucket that does not exist: the target and the store's answer, nothing else written.
    let host = gcs_host(gcs, "no-such-bucket", "public, max-age=300");
    let (code, stdout, stderr) = support::agent(host.path(), &["publish", "--no-verify"], &[]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stdout.starts_with("gs://no-such-bucket/cluster-a\n"),
        "{stdout}"
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("404"), "{stdout}");
}

// ---- Azure: Azurite ----

fn azure_issuer() -> String {
    format!("https://{AZURE_ACCOUNT}.z6.web.core.windows.net/{PREFIX}")
}

fn azure_config(az: &Azurite, container: &str, cache_control: &str) -> String {
    format!(
        "issuer: {}\ndistribution: k3s\npublish:\n  - type: azure-blob\n    account: {AZURE_ACCOUNT}\n    container: {container}\n    prefix: {PREFIX}\n    endpoint: {}\n    cache-control: \"{cache_control}\"\n",
        azure_issuer(),
        az.endpoint()
    )
}

#[test]
fn azure_documents_land_byte_exact_and_drift_is_repaired() {
    let Some(az) = Azurite::get("azure_documents_land_byte_exact_and_drift_is_repaired") else {
        return;
    };
    az.create_container("$web");
    let host = support::k3s_host(&azure_config(az, "$web", "public, max-age=77"));
    let env = [("AZURE_STORAGE_ACCOUNT_KEY", AZURE_KEY)];
    let publish = |args: &[&str]| support::agent(host.path(), args, &env);

    let (code, stdout, stderr) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.starts_with("azure://devstoreaccount1/$web/cluster-a\n"),
        "{stdout}"
    );
    assert!(stdout.contains("openid/v1/jwks: created"), "{stdout}");
    let jwks = az.get_blob("$web", JWKS_KEY);
    assert_eq!(jwks.status, 200);
    assert_eq!(jwks.body, apiserver_jwks());
    let discovery = az.get_blob("$web", DISCOVERY_KEY);
    assert_eq!(discovery.status, 200);
    assert_eq!(discovery.body, apiserver_discovery(&azure_issuer()));
    for a in [&jwks, &discovery] {
        assert_eq!(
            a.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(
            a.header("cache-control").as_deref(),
            Some("public, max-age=77")
        );
    }

    // Unchanged: nothing is rewritten (the ETag stays), and --check agrees.
    let (code, stdout, _) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(stdout.matches("up to date").count(), 2, "{stdout}");
    assert_eq!(
        az.get_blob("$web", JWKS_KEY).header("etag"),
        jwks.header("etag")
    );
    let (code, stdout, _) = publish(&["publish", "--check", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");

    // Someone replaces the JWKS behind the agent's back: --check sees it, publish repairs it.
    let other = az.store("$web");
    let rt = runtime();
    let seen = rt
        .block_on(other.read(JWKS_KEY))
        .expect("read")
        .expect("jwks");
    rt.block_on(other.put(
        JWKS_KEY,
        publish::Object {
            bytes: br#"{"keys":[]}"#,
            content_type: "text/plain",
            cache_control: "no-store",
        },
        publish::Condition::Update(seen.version),
    ))
    .expect("outside write");
    let (code, stdout, _) = publish(&["publish", "--check", "--no-verify"]);
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("lacks kid"), "{stdout}");
    let (code, stdout, _) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("openid/v1/jwks: updated"), "{stdout}");
    let jwks = az.get_blob("$web", JWKS_KEY);
    assert_eq!(jwks.body, apiserver_jwks());
    assert_eq!(
        jwks.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        jwks.header("cache-control").as_deref(),
        Some("public, max-age=77")
    );

    // A new Cache-Control is a change too: both blobs are rewritten with it.
    support::write_config(
        host.path(),
        &azure_config(az, "$web", "public, max-age=120"),
    );
    let (code, stdout, _) = publish(&["publish", "--no-verify"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(stdout.matches(": updated").count(), 2, "{stdout}");
    for name in [JWKS_KEY, DISCOVERY_KEY] {
        let a = az.get_blob("$web", name);
        assert_eq!(
            a.header("cache-control").as_deref(),
            Some("public, max-age=120")
        );
    }
}

#[test]
fn azure_a_wrong_key_fails_naming_the_target_and_writes_nothing() {
    let Some(az) = Azurite::get("azure_a_wrong_key_fails_naming_the_target_and_writes_nothing")
    else {
        return;
    };
    az.create_container("wrongkey");
    let host = support::k3s_host(&azure_config(az, "wrongkey", "public, max-age=300"));
    // A well-formed key that is not the account's.
    let wrong = "aXJzYS1hZ2VudC10ZXN0LWtleS1ub3QtdGhlLWFjY291bnRzLWtleQ==";
    let (code, stdout, stderr) = support::agent(
        host.path(),
        &["publish", "--no-verify"],
        &[("AZURE_STORAGE_ACCOUNT_KEY", wrong)],
    );
    assert_eq!(code, 1, "a wrong key must fail: {stdout}{stderr}");
    assert!(
        stdout.starts_with("azure://devstoreaccount1/wrongkey/cluster-a\n"),
        "{stdout}"
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("403"), "{stdout}");
    // Azurite's answer, in one line of the report rather than an XML document.
    let failed = stdout
        .lines()
        .find(|l| l.contains("FAILED"))
        .unwrap_or_default();
    assert!(
        failed.contains("403 Forbidden: AuthorizationFailure: Server failed to authenticate"),
        "{stdout}"
    );
    assert!(!stdout.contains("<Error>"), "{stdout}");
    assert_eq!(az.get_blob("wrongkey", JWKS_KEY).status, 404);
    assert_eq!(az.get_blob("wrongkey", DISCOVERY_KEY).status, 404);

    // The right key then works: it was the key, nothing else.
    let (code, stdout, stderr) = support::agent(
        host.path(),
        &["publish", "--no-verify"],
        &[("AZURE_STORAGE_ACCOUNT_KEY", AZURE_KEY)],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(az.get_blob("wrongkey", JWKS_KEY).body, apiserver_jwks());
}

#[test]
fn azure_conditional_writes_merge_a_concurrent_writer() {
    let Some(az) = Azurite::get("azure_conditional_writes_merge_a_concurrent_writer") else {
        return;
    };
    az.create_container("race");
    let issuer = azure_issuer();
    let target = PublishTarget::AzureBlob {
        account: AZURE_ACCOUNT.into(),
        container: "race".into(),
        prefix: PREFIX.into(),
        endpoint: Some(az.endpoint()),
        cache_control: "public, max-age=300".into(),
    };
    let make = || Publisher {
        target: Box::new(az.store("race")),
        layout: publish::Layout::for_target(&issuer, &format!("{issuer}/openid/v1/jwks"), &target),
        cache_control: "public, max-age=300".into(),
    };
    conditional_writes_merge(&issuer, &make);
}

// ---- The daemon, publishing to both ----

#[test]
fn the_daemon_keeps_gcs_and_azure_in_sync() {
    let test = "the_daemon_keeps_gcs_and_azure_in_sync";
    let (Some(gcs), Some(az)) = (FakeGcs::get(test), Azurite::get(test)) else {
        return;
    };
    gcs.create_bucket("oidc-run");
    az.create_container("run");
    let config = format!(
        "issuer: {}\ndistribution: k3s\npublic-check: false\npublish:\n  - type: gcs\n    bucket: oidc-run\n    prefix: {PREFIX}\n    endpoint: {}\n    credentials-file: {GCS_KEY_FILE}\n  - type: azure-blob\n    account: {AZURE_ACCOUNT}\n    container: run\n    prefix: {PREFIX}\n    endpoint: {}\nrun:\n  resync-interval: 1s\n  retry-max: 2s\n  publish-timeout: 5s\n",
        gcs_issuer("oidc-run"),
        gcs.endpoint(),
        az.endpoint()
    );
    let host = support::k3s_host(&config);
    std::fs::write(host.path().join(&GCS_KEY_FILE[1..]), GCS_NO_OAUTH_KEY).expect("key");
    let mut d = run_support::Daemon::start(
        host.path(),
        &["--no-restart"],
        &[("AZURE_STORAGE_ACCOUNT_KEY", AZURE_KEY)],
    );
    d.wait_ready();
    // Published before READY, byte for byte what the real apiserver served for these keys.
    assert_eq!(gcs.bytes("oidc-run", JWKS_KEY), Some(apiserver_jwks()));
    assert_eq!(az.get_blob("run", JWKS_KEY).body, apiserver_jwks());

    // A new key, k3s style: the verification file replaced by rename.
    let service_key = host
        .path()
        .join("var/lib/rancher/k3s/server/tls/service.key");
    let key = run_support::new_ec_key();
    let mut both = std::fs::read_to_string(&service_key).expect("service.key");
    both.push_str(&key.public_pem);
    run_support::replace_by_rename(&service_key, both.as_bytes());
    let expected = run_support::jwks_for(
        host.path(),
        &["/var/lib/rancher/k3s/server/tls/service.key"],
    );
    assert!(run_support::kids(&expected).contains(&key.kid));
    let reached = run_support::eventually(run_support::DEADLINE, || {
        (gcs.bytes("oidc-run", JWKS_KEY).as_deref() == Some(&expected[..])
            && az.get_blob("run", JWKS_KEY).body == expected)
            .then_some(())
    });
    assert!(
        reached.is_some(),
        "the new JWKS never reached both:\n{}",
        d.log()
    );

    // Deleted in the bucket behind the agent's back: the resync puts it back.
    gcs.delete("oidc-run", JWKS_KEY);
    let restored = run_support::eventually(run_support::DEADLINE, || {
        (gcs.bytes("oidc-run", JWKS_KEY).as_deref() == Some(&expected[..])).then_some(())
    });
    assert!(restored.is_some(), "never restored:\n{}", d.log());
    let status = d.wait_status("drift counted and in sync", |s| {
        s["daemon"]["metrics"]["drift_found_total"].as_u64() >= Some(1)
            && s["daemon"]["phase"] == "in-sync"
    });
    let targets: Vec<&str> = status["daemon"]["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["target"].as_str())
        .collect();
    assert_eq!(
        targets,
        [
            "gs://oidc-run/cluster-a",
            "azure://devstoreaccount1/run/cluster-a"
        ],
        "{status}"
    );
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}
