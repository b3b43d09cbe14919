//! The webhook as the real kube-apiserver (v1.36.2, named by `IRSA_TEST_KUBE_APISERVER`;
//! without it the test says SKIPPED) calls it: the registration the agent makes is applied
//! server-side (field manager `irsa-agent`, twice, as two agents would), and pods created with
//! `dryRun=All` come back mutated for AWS and Azure, unchanged without annotations, with their
//! own variables kept. With the agent stopped, `failurePolicy: Ignore` creates the pod without
//! the injection and `failurePolicy: Fail` refuses it.
//!
//! The first test fills the ServiceAccount cache itself; the others run the agent's own links
//! to the API ([`webhook::kube_sync`]): the watch, the CA shared through a Secret and the
//! registration. They cover the whole IRSA loop (annotation -> mutated pod -> TokenRequest
//! with the injected audience and lifetime -> credentials from SeaweedFS's STS, which trusts
//! the issuer irsa-agent published) and two agents sharing one CA without flapping.

mod kube_support;
mod support;

use irsa_agent::config::webhook::{FailurePolicy, WebhookSettings};
use irsa_agent::host::HostRoot;
use irsa_agent::webhook::{self, ServiceAccounts};
use kube_support::Kube;
use serde_json::{Value, json};

/// The webhook served on its own thread (the test blocks in curl while the apiserver calls it).
struct Agent {
    bundle: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start(root: HostRoot, settings: WebhookSettings, cache: ServiceAccounts) -> Agent {
        let (info_tx, info_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let running = webhook::start(&root, &settings, cache, webhook::unix_now())
                    .expect("webhook starts");
                info_tx.send(running.bundle.borrow().clone()).expect("send");
                while stop_rx.try_recv().is_err() {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                running.stop();
            });
        });
        let bundle = info_rx.recv().expect("webhook info");
        Agent {
            bundle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pod(sa: &str, labels: Value, env: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "app", "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": [{
            "name": "app", "image": "registry.example/app:1", "env": env,
        }]},
    })
}

fn env(pod: &Value) -> Vec<(String, String)> {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|v| {
                    (
                        v["name"].as_str().unwrap_or_default().to_string(),
                        v["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn value(pod: &Value, name: &str) -> Option<String> {
    env(pod)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

fn volumes(pod: &Value) -> Vec<String> {
    pod["spec"]["volumes"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|v| v["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A real apiserver with the k3s test case's service-account keys, started; `None` (SKIPPED)
/// without one.
fn start(test: &str) -> Option<Kube> {
    let kube = Kube::temp(test)?;
    kube.start_with_test_keys("https://oidc.example.com/homelab", "");
    Some(kube)
}

const PODS: &str = "/api/v1/namespaces/prod/pods?dryRun=All";
const MWC: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";

#[test]
fn the_real_apiserver_calls_the_webhook_and_the_failure_policy_holds_when_it_is_down() {
    let Some(kube) = start("real_apiserver_webhook") else {
        return;
    };
    kube.ok(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}})),
    );
    let sas = [
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "prod", "name": "s3-reader", "annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/s3-reader",
            "eks.amazonaws.com/token-expiration": "3600",
        }}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "prod", "name": "blob-reader", "annotations": {
            "azure.workload.identity/client-id": "11111111-2222-3333-4444-555555555555",
            "azure.workload.identity/tenant-id": "66666666-7777-8888-9999-000000000000",
        }}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "prod", "name": "plain"}}),
    ];
    let cache = ServiceAccounts::default();
    for sa in &sas {
        let created = kube.ok("POST", "/api/v1/namespaces/prod/serviceaccounts", Some(sa));
        // The cache gets the objects as the API returns them (as the watch will).
        cache.upsert(&created);
    }

    let agent_root = tempfile::tempdir().expect("agent root");
    let mut settings = WebhookSettings {
        enabled: true,
        ..Default::default()
    };
    settings.listen = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("addr");
    settings.defaults.aws.region = Some("eu-west-1".into());
    let mut agent = Agent::start(
        HostRoot::new(agent_root.path()),
        settings.clone(),
        cache.clone(),
    );
    let apply = |settings: &WebhookSettings, bundle: &str| {
        kube.ok(
            "PATCH",
            &format!("{MWC}/{}?fieldManager=irsa-agent&force=true", webhook::NAME),
            Some(&webhook::registration(settings, bundle)),
        )
    };
    let registered = apply(&settings, &agent.bundle);
    // A second agent applying the same object: no conflict, nothing changes.
    let again = apply(&settings, &agent.bundle);
    assert_eq!(
        registered["metadata"]["resourceVersion"], again["metadata"]["resourceVersion"],
        "applying the same registration again must not write"
    );
    assert_eq!(again["webhooks"][0]["reinvocationPolicy"], "IfNeeded");
    assert_eq!(again["webhooks"][0]["sideEffects"], "None");

    // The apiserver picks registrations up asynchronously: wait until a pod is mutated.
    let aws_pod = pod("s3-reader", json!({}), json!([]));
    let mut created = Value::Null;
    for _ in 0..100 {
        created = kube.ok("POST", PODS, Some(&aws_pod));
        if value(&created, "AWS_ROLE_ARN").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        value(&created, "AWS_ROLE_ARN").as_deref(),
        Some("arn:aws:iam::123456789012:role/s3-reader"),
        "{created}"
    );
    assert_eq!(
        value(&created, "AWS_WEB_IDENTITY_TOKEN_FILE").as_deref(),
        Some("/var/run/secrets/eks.amazonaws.com/serviceaccount/token")
    );
    assert_eq!(value(&created, "AWS_REGION").as_deref(), Some("eu-west-1"));
    let aws_volume = created["spec"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "aws-iam-token"))
        .cloned()
        .unwrap_or_else(|| panic!("no aws-iam-token volume: {created}"));
    assert_eq!(
        aws_volume["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
        3600
    );
    // The apiserver's own token volume is there too (admission ran before and after us).
    assert!(
        volumes(&created)
            .iter()
            .any(|v| v.starts_with("kube-api-access-")),
        "{created}"
    );

    // Azure.
    let created = kube.ok(
        "POST",
        PODS,
        Some(&pod(
            "blob-reader",
            json!({"azure.workload.identity/use": "true"}),
            json!([]),
        )),
    );
    assert_eq!(
        value(&created, "AZURE_CLIENT_ID").as_deref(),
        Some("11111111-2222-3333-4444-555555555555"),
        "{created}"
    );
    assert_eq!(
        value(&created, "AZURE_FEDERATED_TOKEN_FILE").as_deref(),
        Some("/var/run/secrets/azure/tokens/azure-identity-token")
    );
    assert!(volumes(&created).contains(&"azure-identity-token".to_string()));

    // No annotations: unchanged.
    let created = kube.ok("POST", PODS, Some(&pod("plain", json!({}), json!([]))));
    assert!(env(&created).is_empty(), "{created}");
    assert!(
        volumes(&created)
            .iter()
            .all(|v| v.starts_with("kube-api-access-")),
        "{created}"
    );

    // Its own variables are kept.
    let created = kube.ok(
        "POST",
        PODS,
        Some(&pod(
            "s3-reader",
            json!({}),
            json!([{"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::999999999999:role/mine"}]),
        )),
    );
    let roles: Vec<String> = env(&created)
        .into_iter()
        .filter(|(n, _)| n == "AWS_ROLE_ARN")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(roles, vec!["arn:aws:iam::999999999999:role/mine"]);

    // What the webhook adds to a pod create through the apiserver (printed, not asserted: the
    // curl process each request starts dominates, and the machine is shared): the median of
    // 30 dryRun creates with the registration, then 30 without.
    let median_ms = |n: usize| {
        let mut times: Vec<f64> = (0..n)
            .map(|_| {
                let started = std::time::Instant::now();
                let (code, _) = kube.api("POST", PODS, Some(&aws_pod));
                assert_eq!(code, 201);
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[n / 2]
    };
    let with = median_ms(30);
    kube.ok("DELETE", &format!("{MWC}/{}", webhook::NAME), None);
    for _ in 0..100 {
        if value(&kube.ok("POST", PODS, Some(&aws_pod)), "AWS_ROLE_ARN").is_none() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let without = median_ms(30);
    eprintln!(
        "MEASURED: dryRun pod create through curl: median {with:.1} ms with the webhook, {without:.1} ms without ({:+.1} ms)",
        with - without
    );
    apply(&settings, &agent.bundle);
    // Registered again and seen by the apiserver (a pod is mutated) before the agent stops, so
    // the bare pod below is the failure policy's doing.
    let mut seen = false;
    for _ in 0..100 {
        if value(&kube.ok("POST", PODS, Some(&aws_pod)), "AWS_ROLE_ARN").is_some() {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(seen, "the registration applied again was never used");

    // The agent stops. failurePolicy: Ignore (the default): the pod is created, without
    // its identity.
    agent.stop();
    let created = kube.ok("POST", PODS, Some(&aws_pod));
    assert!(value(&created, "AWS_ROLE_ARN").is_none(), "{created}");

    // failurePolicy: Fail: the create is refused, naming the webhook.
    settings.failure_policy = FailurePolicy::Fail;
    apply(&settings, &agent.bundle);
    let mut refused = (0, String::new());
    for _ in 0..100 {
        refused = kube.api("POST", PODS, Some(&aws_pod));
        if refused.0 >= 400 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(refused.0 >= 500, "HTTP {}: {}", refused.0, refused.1);
    assert!(
        refused.1.contains("failed calling webhook") && refused.1.contains(webhook::WEBHOOK_NAME),
        "{}",
        refused.1
    );
    // A pod in a skipped namespace is still created (kube-system is not matched).
    kube.ok(
        "POST",
        "/api/v1/namespaces/kube-system/serviceaccounts",
        Some(
            &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
        ),
    );
    let created = kube.ok(
        "POST",
        "/api/v1/namespaces/kube-system/pods?dryRun=All",
        Some(&pod("default", json!({}), json!([]))),
    );
    assert_eq!(created["kind"], "Pod");
}

/// The webhook with the agent's own links to the API (the watch, the shared CA, the
/// registration), as the daemon runs them, on its own thread. `serve` is where it listens,
/// `register` what it registers (the same, unless the test plays a second server whose port
/// is taken on this one machine).
struct FullAgent {
    commands: std::sync::mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    counters: std::sync::Arc<webhook::Counters>,
}

enum Command {
    Renew(u64),
    Stop,
}

impl FullAgent {
    fn start(
        kube: &Kube,
        root: &std::path::Path,
        serve: WebhookSettings,
        register: WebhookSettings,
        reapply: std::time::Duration,
        ca_sync: std::time::Duration,
        scan: std::time::Duration,
    ) -> FullAgent {
        let kubeconfig = kube.state.join("kubeconfig");
        let root = HostRoot::new(root);
        let (commands, command_rx) = std::sync::mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                // As the daemon: not ready until the watch's first list.
                let cache = ServiceAccounts::loading();
                let running = webhook::start(&root, &serve, cache.clone(), webhook::unix_now())
                    .expect("webhook starts");
                let _ = ready_tx.send(running.counters.clone());
                let api = irsa_agent::k8s::Api::from_kubeconfig(
                    &HostRoot::new("/"),
                    &kubeconfig,
                    None,
                    std::time::Duration::from_secs(330),
                )
                .await
                .expect("kubeconfig");
                let client = api.client().expect("client");
                let watch = tokio::spawn(webhook::kube_sync::watch(client.clone(), cache.clone()));
                let scanning = tokio::spawn(webhook::kube_sync::scan_missed(
                    client.clone(),
                    cache,
                    serve.defaults.clone(),
                    running.counters.clone(),
                    scan,
                ));
                let links = tokio::spawn(webhook::kube_sync::share_then_register(
                    client,
                    root.clone(),
                    register,
                    running.bundle.clone(),
                    running.control(),
                    reapply,
                    ca_sync,
                ));
                loop {
                    match command_rx.try_recv() {
                        Ok(Command::Renew(now)) => running.renew_at(now),
                        Ok(Command::Stop) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            break;
                        }
                        Err(std::sync::mpsc::TryRecvError::Empty) => {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                }
                watch.abort();
                scanning.abort();
                links.abort();
                running.stop();
            });
        });
        let counters = ready_rx.recv().expect("webhook serving");
        FullAgent {
            commands,
            thread: Some(thread),
            counters,
        }
    }

    fn renew_at(&self, now: u64) {
        let _ = self.commands.send(Command::Renew(now));
    }

    fn stop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FullAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn settings_on(port: u16) -> WebhookSettings {
    let mut settings = WebhookSettings {
        enabled: true,
        ..Default::default()
    };
    settings.listen = format!("127.0.0.1:{port}").parse().expect("addr");
    settings
}

/// Polls dryRun creates of `pod` until `done` holds for the answer (10 s at most).
fn created_until(kube: &Kube, pod: &Value, done: impl Fn(&Value) -> bool) -> Value {
    let mut created = Value::Null;
    for _ in 0..200 {
        created = kube.ok("POST", PODS, Some(pod));
        if done(&created) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    created
}

/// The agent's own links to the API against the real kube-apiserver: the ServiceAccount watch
/// feeds the cache (an annotation changed later is used for the next pod) and the agent
/// registers itself once its CA is the cluster's.
#[test]
fn the_watch_feeds_the_cache_and_the_agent_registers_itself() {
    let Some(kube) = start("real_apiserver_webhook") else {
        return;
    };
    kube.ok(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}})),
    );
    let sa = |role: &str| {
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "prod", "name": "s3-reader", "annotations": {
            "eks.amazonaws.com/role-arn": role,
        }}})
    };
    kube.ok(
        "POST",
        "/api/v1/namespaces/prod/serviceaccounts",
        Some(&sa("arn:aws:iam::123456789012:role/first")),
    );
    let agent_root = tempfile::tempdir().expect("agent root");
    let settings = settings_on(support::free_port());
    let _agent = FullAgent::start(
        &kube,
        agent_root.path(),
        settings.clone(),
        settings,
        webhook::kube_sync::REAPPLY_EVERY,
        webhook::kube_sync::CA_SYNC_EVERY,
        webhook::kube_sync::MISSED_SCAN_EVERY,
    );

    // Registered by the agent, and the watch fed the cache: a pod is mutated.
    let aws_pod = pod("s3-reader", json!({}), json!([]));
    let mutated_with = |role: &str| {
        let started = std::time::Instant::now();
        let created = created_until(&kube, &aws_pod, |c| {
            value(c, "AWS_ROLE_ARN").as_deref() == Some(role)
        });
        (value(&created, "AWS_ROLE_ARN").as_deref() == Some(role)).then(|| started.elapsed())
    };
    mutated_with("arn:aws:iam::123456789012:role/first").expect("mutated from the watched SA");
    // A changed annotation is used for the next pods.
    kube.ok(
        "PATCH",
        "/api/v1/namespaces/prod/serviceaccounts/s3-reader?fieldManager=test&force=true",
        Some(&sa("arn:aws:iam::123456789012:role/second")),
    );
    let took = mutated_with("arn:aws:iam::123456789012:role/second")
        .expect("the changed annotation is used");
    eprintln!("MEASURED: annotation change to first pod using it: {took:?} (polling every 50 ms)");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");

    // The registration's caBundle is the CA the agent keeps locally and shared in the Secret.
    let registered = kube.ok("GET", &format!("{MWC}/{}", webhook::NAME), None);
    let local =
        std::fs::read_to_string(agent_root.path().join("var/lib/irsa-agent/webhook-ca.pem"))
            .expect("local CA file");
    assert_eq!(ca_bundle(&registered), bundle_of(&local));
    assert_eq!(shared_ca(&kube), local);
    assert!(
        registered["metadata"]["managedFields"]
            .as_array()
            .is_some_and(|m| m.iter().any(|f| f["manager"] == "irsa-agent")),
        "{registered}"
    );
}

fn b64(text: &str) -> Vec<u8> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text).expect("base64")
}

/// The registration's caBundle (PEM text).
fn ca_bundle(registered: &Value) -> String {
    let bundle = registered["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .unwrap_or_else(|| panic!("no caBundle: {registered}"));
    String::from_utf8_lossy(&b64(bundle)).into_owned()
}

/// The certificates of a CA file's text (what a bundle made from it holds).
fn bundle_of(ca_file: &str) -> String {
    irsa_agent::webhook::certs::Authorities::from_pem(ca_file.as_bytes())
        .expect("CA file")
        .bundle_pem()
}

/// The text of the shared CA Secret.
fn shared_ca(kube: &Kube) -> String {
    let secret = kube.ok(
        "GET",
        &format!(
            "/api/v1/namespaces/{}/secrets/{}",
            webhook::kube_sync::CA_SECRET_NAMESPACE,
            webhook::kube_sync::CA_SECRET
        ),
        None,
    );
    let data = secret["data"][webhook::kube_sync::CA_SECRET_KEY]
        .as_str()
        .unwrap_or_else(|| panic!("no {}: {secret}", webhook::kube_sync::CA_SECRET_KEY));
    String::from_utf8_lossy(&b64(data)).into_owned()
}

/// `application/x-www-form-urlencoded` for the STS query (unreserved characters kept).
fn form(pairs: &[(&str, &str)]) -> String {
    let encode = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn xml(body: &str, tag: &str) -> Option<String> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = body.find(&format!("</{tag}>"))?;
    Some(body[start..end].to_string())
}

fn sts_client(sw: &support::Seaweed) -> reqwest::Client {
    irsa_agent::publish::http::install_crypto_provider();
    let pem = std::fs::read(&sw.ca.ca_cert).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("pem"))
        .build()
        .expect("client")
}

/// AssumeRoleWithWebIdentity at SeaweedFS's STS: (HTTP status, answer).
fn assume_role(sw: &support::Seaweed, role: &str, token: &str) -> (u16, String) {
    let body = form(&[
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", role),
        ("RoleSessionName", "webhook-loop"),
        ("WebIdentityToken", token),
        ("DurationSeconds", "900"),
    ]);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let r = sts_client(sw)
                .post(format!("{}/", sw.https_endpoint()))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .expect("STS answers");
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        })
}

/// A TokenRequest for prod/`sa` with exactly this audience and lifetime: (token, seconds until
/// it expires as the apiserver says).
fn token_request(kube: &Kube, sa: &str, audience: &str, seconds: i64) -> (String, i64) {
    let answer = kube.ok(
        "POST",
        &format!("/api/v1/namespaces/prod/serviceaccounts/{sa}/token"),
        Some(
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": seconds}}),
        ),
    );
    let token = answer["status"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {answer}"))
        .to_string();
    let expires = answer["status"]["expirationTimestamp"]
        .as_str()
        .and_then(rfc3339_seconds)
        .unwrap_or_else(|| panic!("no expirationTimestamp: {answer}"));
    (token, expires - webhook::unix_now() as i64)
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-12-07T04:00:00Z`).
fn rfc3339_seconds(t: &str) -> Option<i64> {
    let (date, time) = t.trim_end_matches('Z').split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let h: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2])
}

/// The whole IRSA loop on one machine: SeaweedFS's STS trusts the issuer irsa-agent published
/// (from the apiserver's own signing key); a ServiceAccount annotated with a role; a pod
/// created through the real apiserver comes back mutated by the agent's webhook; a token
/// minted with exactly the injected audience and lifetime (what the kubelet would project) is
/// exchanged for credentials that work, for the injected role. A token for another audience is
/// refused.
#[test]
fn the_whole_irsa_loop_from_annotation_to_credentials() {
    let Some(kube) = Kube::temp("real_apiserver_webhook (IRSA loop)") else {
        return;
    };
    if support::find_tool("weed").is_none() {
        eprintln!(
            "SKIPPED: the_whole_irsa_loop_from_annotation_to_credentials not run: SeaweedFS (weed) is not installed; `bash tests/run.sh` installs it"
        );
        return;
    }
    let sw = support::Seaweed::start(&["loop"]);
    sw.create_bucket("loop", true);
    let issuer = sw.issuer("loop");

    // The apiserver issues tokens for that issuer, signed with the k3s case's key.
    kube.start_with_test_keys(&issuer, "");

    // irsa-agent publishes the issuer from the host's key files (the same files).
    let host = support::k3s_host(&format!(
        "issuer: {issuer}\ndistribution: k3s\npublish:\n  - type: s3\n    bucket: loop\n    endpoint: {}\n    path-style: true\n    region: us-east-1\n",
        sw.http_endpoint()
    ));
    let ca = sw.ca.ca_cert.display().to_string();
    let (code, stdout, stderr) = support::agent(
        host.path(),
        &["publish"],
        &[
            ("AWS_ACCESS_KEY_ID", support::ADMIN_KEY),
            ("AWS_SECRET_ACCESS_KEY", support::ADMIN_SECRET),
            ("SSL_CERT_FILE", &ca),
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    // What was published holds every key the apiserver itself announces.
    let apiserver_jwks = kube.ok("GET", "/openid/v1/jwks", None);
    let published: Value = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            sts_client(&sw)
                .get(format!("{issuer}/openid/v1/jwks"))
                .send()
                .await
                .expect("GET jwks")
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .expect("JSON")
        });
    let kids = |jwks: &Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .map(|k| {
                k.iter()
                    .filter_map(|k| k["kid"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(!kids(&apiserver_jwks).is_empty(), "{apiserver_jwks}");
    for kid in kids(&apiserver_jwks) {
        assert!(kids(&published).contains(&kid), "{kid} not in {published}");
    }

    // The annotated ServiceAccount, and the agent's webhook with its own links to the API.
    kube.ok(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}})),
    );
    kube.ok(
        "POST",
        "/api/v1/namespaces/prod/serviceaccounts",
        Some(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "prod", "name": "s3-app", "annotations": {
            "eks.amazonaws.com/role-arn": support::ROLE_PUBLISHER,
            "eks.amazonaws.com/token-expiration": "3600",
        }}})),
    );
    let agent_root = tempfile::tempdir().expect("agent root");
    let settings = settings_on(support::free_port());
    let _agent = FullAgent::start(
        &kube,
        agent_root.path(),
        settings.clone(),
        settings,
        webhook::kube_sync::REAPPLY_EVERY,
        webhook::kube_sync::CA_SYNC_EVERY,
        webhook::kube_sync::MISSED_SCAN_EVERY,
    );
    let created = created_until(&kube, &pod("s3-app", json!({}), json!([])), |c| {
        value(c, "AWS_ROLE_ARN").is_some()
    });
    let role = value(&created, "AWS_ROLE_ARN").unwrap_or_else(|| panic!("not mutated: {created}"));
    assert_eq!(role, support::ROLE_PUBLISHER);
    let source = created["spec"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "aws-iam-token"))
        .map(|v| v["projected"]["sources"][0]["serviceAccountToken"].clone())
        .unwrap_or_else(|| panic!("no aws-iam-token volume: {created}"));
    let audience = source["audience"].as_str().expect("audience").to_string();
    let seconds = source["expirationSeconds"]
        .as_i64()
        .expect("expirationSeconds");
    assert_eq!((audience.as_str(), seconds), ("sts.amazonaws.com", 3600));

    // What the kubelet would project: a token with exactly that audience and lifetime.
    let (token, lifetime) = token_request(&kube, "s3-app", &audience, seconds);
    assert!((seconds - 60..=seconds).contains(&lifetime), "{lifetime}");
    let (status, answer) = assume_role(&sw, &role, &token);
    assert_eq!(status, 200, "{answer}");
    let access_key = xml(&answer, "AccessKeyId").expect("AccessKeyId");
    let secret = xml(&answer, "SecretAccessKey").expect("SecretAccessKey");
    let session = xml(&answer, "SessionToken").expect("SessionToken");
    // The credentials are real: a signed S3 read with them succeeds.
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("loop")
        .with_region("us-east-1")
        .with_endpoint(sw.http_endpoint())
        .with_allow_http(true)
        .with_access_key_id(access_key)
        .with_secret_access_key(secret)
        .with_token(session)
        .build()
        .expect("store");
    let target = irsa_agent::publish::store::StoreTarget::new(
        "s3://loop".into(),
        std::sync::Arc::new(store),
    );
    let listed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            use irsa_agent::publish::Target as _;
            target.read("openid/v1/jwks").await
        });
    assert!(
        matches!(listed, Ok(Some(_))),
        "the temporary credentials must read the JWKS: {:?}",
        listed.map(|r| r.map(|o| o.bytes.len()))
    );

    // The same ServiceAccount's token for another audience: refused.
    let (wrong, _) = token_request(&kube, "s3-app", "https://not-sts.example", seconds);
    let (status, answer) = assume_role(&sw, &role, &wrong);
    assert_ne!(
        status, 200,
        "a token for another audience must be refused: {answer}"
    );
    assert!(xml(&answer, "AccessKeyId").is_none(), "{answer}");
    // Refused for its audience, not for anything else about it.
    assert!(answer.contains("audience"), "{answer}");
}

/// GET /healthz on a webhook at `port` trusting only `bundle_pem`: whether TLS and the answer
/// were fine.
fn healthy_with(port: u16, bundle_pem: &str) -> Result<(), String> {
    irsa_agent::publish::http::install_crypto_provider();
    let client = reqwest::Client::builder()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(bundle_pem.as_bytes())
                .map_err(|e| e.to_string())?,
        )
        .build()
        .map_err(|e| e.to_string())?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(async {
            let r = client
                .get(format!("https://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .map_err(|e| format!("{e:?}"))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(r.status().to_string())
            }
        })
}

fn resource_version(kube: &Kube) -> String {
    kube.ok("GET", &format!("{MWC}/{}", webhook::NAME), None)["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Two agents (two servers' worth: separate roots, separate CAs at first) against one real
/// apiserver: the first makes the cluster's CA, the second adopts it; both serve with it, the
/// registration stays put while both reapply it and renew their serving certificates, a pod is
/// mutated by whichever agent answers on the registered address, and a CA replacement reaches
/// both agents and the registration (old and new CA in the bundle).
#[test]
fn two_agents_share_one_ca_and_the_registration_does_not_flap() {
    use irsa_agent::webhook::certs;
    let Some(kube) = start("real_apiserver_webhook (two agents)") else {
        return;
    };
    kube.ok(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}})),
    );
    kube.ok(
        "POST",
        "/api/v1/namespaces/prod/serviceaccounts",
        Some(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "prod", "name": "s3-reader", "annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/s3-reader",
        }}})),
    );
    let (root_a, root_b) = (
        tempfile::tempdir().expect("root a"),
        tempfile::tempdir().expect("root b"),
    );
    let ca_file = |root: &tempfile::TempDir| {
        std::fs::read_to_string(root.path().join("var/lib/irsa-agent/webhook-ca.pem"))
            .expect("CA file")
    };
    // Every server registers https://127.0.0.1:PORT/mutate; on this one machine the second
    // agent listens elsewhere but registers the same.
    let port = support::free_port();
    let port_b = support::free_port();
    let settings = settings_on(port);
    let fast = std::time::Duration::from_millis(300);
    let mut a = FullAgent::start(
        &kube,
        root_a.path(),
        settings.clone(),
        settings.clone(),
        fast,
        fast,
        webhook::kube_sync::MISSED_SCAN_EVERY,
    );
    let aws_pod = pod("s3-reader", json!({}), json!([]));
    let created = created_until(&kube, &aws_pod, |c| value(c, "AWS_ROLE_ARN").is_some());
    assert!(value(&created, "AWS_ROLE_ARN").is_some(), "{created}");
    let shared = shared_ca(&kube);
    assert_eq!(ca_file(&root_a), shared, "A's CA became the cluster's");

    // B starts with a CA of its own (made before it reaches the API), then adopts the shared one.
    let mut b = FullAgent::start(
        &kube,
        root_b.path(),
        settings_on(port_b),
        settings.clone(),
        fast,
        fast,
        webhook::kube_sync::MISSED_SCAN_EVERY,
    );
    let started = std::time::Instant::now();
    while ca_file(&root_b) != shared && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(ca_file(&root_b), shared, "B adopted the shared CA");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(root_b.path().join("var/lib/irsa-agent/webhook-ca.pem"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Both serve certificates the registered bundle verifies.
    let registered = kube.ok("GET", &format!("{MWC}/{}", webhook::NAME), None);
    let bundle = ca_bundle(&registered);
    assert_eq!(bundle, bundle_of(&shared));
    let mut b_ok = healthy_with(port_b, &bundle);
    for _ in 0..100 {
        if b_ok.is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        b_ok = healthy_with(port_b, &bundle);
    }
    b_ok.expect("B serves with the shared CA");
    healthy_with(port, &bundle).expect("A serves with the shared CA");
    // ... and not with a CA of its own any more: a bundle of another CA fails.
    let stranger = certs::Authorities {
        cas: vec![certs::Authority::generate(webhook::unix_now()).expect("ca")],
    };
    assert!(healthy_with(port_b, &stranger.bundle_pem()).is_err());

    // No flapping: both reapply every 300 ms and renew their serving certificates (as 21 days
    // on); the registration is not written.
    let before = resource_version(&kube);
    let later = webhook::unix_now() + 21 * 86_400;
    a.renew_at(later);
    b.renew_at(later);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        resource_version(&kube),
        before,
        "the registration was rewritten"
    );
    // (The renewed certificates start 21 days from now: not checked against the real clock.)

    // A stops: its pods are created bare. B's CA copy then serves on the registered address
    // (as B's apiserver would call it, and with no API needed: from the local file): the pod
    // is mutated with no registration change. Whichever agent answers, the apiserver trusts it.
    a.stop();
    let created = kube.ok("POST", PODS, Some(&aws_pod));
    assert!(
        value(&created, "AWS_ROLE_ARN").is_none(),
        "A is down: {created}"
    );
    let b_here = Agent::start(HostRoot::new(root_b.path()), settings.clone(), {
        let cache = ServiceAccounts::default();
        cache.upsert(&kube.ok(
            "GET",
            "/api/v1/namespaces/prod/serviceaccounts/s3-reader",
            None,
        ));
        cache
    });
    assert_eq!(b_here.bundle, bundle);
    let created = created_until(&kube, &aws_pod, |c| value(c, "AWS_ROLE_ARN").is_some());
    assert!(
        value(&created, "AWS_ROLE_ARN").is_some(),
        "B's CA copy on the registered address: {created}"
    );
    assert_eq!(resource_version(&kube), before);
    drop(b_here);

    // CA replacement: the CA is due (under 180 days left); whoever syncs first adds a new one
    // to the Secret. Both agents adopt it, the registration carries both CAs once.
    let due = {
        let cas = certs::Authorities::from_pem(shared.as_bytes()).expect("shared");
        cas.cas[0].not_after - certs::CA_RENEW_BEFORE + 60
    };
    let rotated = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let api = irsa_agent::k8s::Api::from_kubeconfig(
                &HostRoot::new("/"),
                &kube.state.join("kubeconfig"),
                None,
                std::time::Duration::from_secs(30),
            )
            .await
            .expect("kubeconfig");
            let client = api.client().expect("client");
            webhook::kube_sync::sync_ca(&client, None, due).await
        })
        .expect("rotated");
    let cas = certs::Authorities::from_pem(rotated.as_bytes()).expect("rotated");
    assert_eq!(cas.cas.len(), 2, "old and new CA overlap");
    assert_eq!(shared_ca(&kube), rotated);
    let started = std::time::Instant::now();
    while (ca_file(&root_b) != rotated
        || ca_bundle(&kube.ok("GET", &format!("{MWC}/{}", webhook::NAME), None))
            != cas.bundle_pem())
        && started.elapsed() < std::time::Duration::from_secs(10)
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(ca_file(&root_b), rotated, "B adopted the new CA");
    let registered = kube.ok("GET", &format!("{MWC}/{}", webhook::NAME), None);
    assert_eq!(ca_bundle(&registered), cas.bundle_pem());
    // B's copy still signs with the old CA (the new one signs after 7 days in the bundle),
    // which the bundle holds: a server started from it now is trusted during the overlap.
    // (B itself renewed "21 days on" above, so its certificate is not valid yet by this clock.)
    let mut during = settings_on(support::free_port());
    during.defaults = settings.defaults.clone();
    let restarted = Agent::start(
        HostRoot::new(root_b.path()),
        during.clone(),
        ServiceAccounts::default(),
    );
    assert_eq!(restarted.bundle, cas.bundle_pem());
    healthy_with(during.listen.port(), &ca_bundle(&registered)).expect("served during the overlap");
    healthy_with(during.listen.port(), &bundle).expect("... and trusted by the old bundle too");
    drop(restarted);
    let settled = resource_version(&kube);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(resource_version(&kube), settled);
    b.stop();
}

/// The pods an agent's last look found missed.
fn missed_of(agent: &FullAgent) -> Option<Vec<String>> {
    agent.counters.missed.lock().ok().and_then(|m| m.clone())
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The Events about pod prod/`name`.
fn events_of(kube: &Kube, name: &str) -> Vec<Value> {
    kube.ok("GET", "/api/v1/namespaces/prod/events", None)["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter(|e| e["involvedObject"]["name"] == name)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// A k3s host whose admin kubeconfig reaches the test apiserver (credentials inline) and
/// whose configuration enables the webhook, for `irsa-agent doctor`.
fn doctor_host(kube: &Kube) -> tempfile::TempDir {
    use base64::Engine as _;
    let host = support::k3s_host(
        "issuer: https://oidc.example.com/homelab\ndistribution: k3s\nwebhook:\n  enabled: true\n",
    );
    let inline = |name: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(kube.pki(name)).expect("pki file"))
    };
    std::fs::write(
        host.path().join("etc/rancher/k3s/k3s.yaml"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kapi\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: kapi\n  context: {{cluster: kapi, user: admin}}\ncurrent-context: kapi\n",
            kube.port,
            inline("ca.crt"),
            inline("admin.crt"),
            inline("admin.key")
        ),
    )
    .expect("kubeconfig");
    host
}

fn doctor_check(host: &tempfile::TempDir, id: &str) -> Value {
    let (_, stdout, stderr) = support::agent(host.path(), &["doctor", "--json"], &[]);
    let doc: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    doc["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no check {id}: {stdout}\n{stderr}"))
}

/// Pods created while no agent answered (`failurePolicy: Ignore`) are made loud: the agent
/// counts and names them, puts one Warning Event on each (however many agents look), and
/// doctor names them with the fix; once recreated they are no longer named. On the way, the
/// window a restart of the agent leaves pods unmutated is measured.
#[test]
fn pods_created_while_no_agent_answered_are_named() {
    let Some(kube) = start("real_apiserver_webhook (missed pods)") else {
        return;
    };
    kube.ok(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}})),
    );
    kube.ok(
        "POST",
        "/api/v1/namespaces/prod/serviceaccounts",
        Some(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": "prod", "name": "s3-reader", "annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/s3-reader",
        }}})),
    );
    let root = tempfile::tempdir().expect("agent root");
    let settings = settings_on(support::free_port());
    let scan = std::time::Duration::from_millis(300);
    let agent = |root: &std::path::Path| {
        FullAgent::start(
            &kube,
            root,
            settings.clone(),
            settings.clone(),
            webhook::kube_sync::REAPPLY_EVERY,
            webhook::kube_sync::CA_SYNC_EVERY,
            scan,
        )
    };
    let mut first = agent(root.path());
    let aws_pod = pod("s3-reader", json!({}), json!([]));
    let created = created_until(&kube, &aws_pod, |c| value(c, "AWS_ROLE_ARN").is_some());
    assert!(value(&created, "AWS_ROLE_ARN").is_some(), "{created}");
    assert_eq!(
        wait_for("the first look", || missed_of(&first)),
        Vec::<String>::new()
    );

    // A restart of the agent (stop, start from the same root: its CA file, an empty cache
    // loaded by the watch): how long are pods admitted without their identity?
    // dryRun creates back to back on another thread, each stamped with its start and whether
    // it came back mutated, while the agent stops and starts.
    let done = std::sync::atomic::AtomicBool::new(false);
    let t0 = std::time::Instant::now();
    let (answers, mut again) = std::thread::scope(|scope| {
        let creator = scope.spawn(|| {
            let mut answers = Vec::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let at = t0.elapsed();
                let mutated =
                    value(&kube.ok("POST", PODS, Some(&aws_pod)), "AWS_ROLE_ARN").is_some();
                answers.push((at, mutated));
            }
            answers
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        first.stop();
        let again = agent(root.path());
        std::thread::sleep(std::time::Duration::from_millis(1500));
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (creator.join().expect("creator"), again)
    });
    assert!(
        answers.last().is_some_and(|(_, m)| *m),
        "mutated again after the restart: {answers:?}"
    );
    let bare = answers.iter().filter(|(_, m)| !m).count();
    // The window lies between the last mutated create before the first bare one and the first
    // mutated one after it (none bare: no create fell into it).
    let window = answers.iter().position(|(_, m)| !m).map(|first_bare| {
        let before = answers[..first_bare]
            .last()
            .map(|(at, _)| *at)
            .unwrap_or_default();
        let after = answers[first_bare..]
            .iter()
            .find(|(_, m)| *m)
            .map(|(at, _)| *at)
            .unwrap_or_default();
        after - before
    });
    eprintln!(
        "MEASURED: agent restart (stop, start from the CA file, cache loaded by the watch): {bare} of {} dryRun creates admitted bare, window at most {window:?} (a create every {:?})",
        answers.len(),
        t0.elapsed() / u32::try_from(answers.len()).unwrap_or(1)
    );
    again.stop();

    // No agent: a real pod is created bare.
    let named = |name: &str| {
        let mut p = aws_pod.clone();
        p["metadata"]["name"] = json!(name);
        p
    };
    let missed_pod = kube.ok(
        "POST",
        "/api/v1/namespaces/prod/pods",
        Some(&named("missed-app")),
    );
    assert!(value(&missed_pod, "AWS_ROLE_ARN").is_none(), "{missed_pod}");
    let host = doctor_host(&kube);
    let check = doctor_check(&host, "running.webhook-pods");
    assert_eq!(check["status"], "fail", "{check}");
    let text = check.to_string();
    assert!(text.contains("prod/missed-app"), "{check}");
    assert!(
        text.contains("kubectl delete pod -n prod missed-app"),
        "{check}"
    );

    // Back: the agent names it, once, with an Event; a pod created now is not named.
    let back = agent(root.path());
    let good = created_until(&kube, &aws_pod, |c| value(c, "AWS_ROLE_ARN").is_some());
    assert!(value(&good, "AWS_ROLE_ARN").is_some());
    kube.ok(
        "POST",
        "/api/v1/namespaces/prod/pods",
        Some(&named("good-app")),
    );
    assert_eq!(
        wait_for("the missed pod named", || missed_of(&back)
            .filter(|m| !m.is_empty())),
        vec!["prod/missed-app".to_string()]
    );
    let events = wait_for("the Event", || {
        Some(events_of(&kube, "missed-app")).filter(|e| !e.is_empty())
    });
    assert_eq!(events[0]["reason"], "IdentityNotInjected", "{events:?}");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(
        events[0]["involvedObject"]["uid"],
        missed_pod["metadata"]["uid"]
    );
    assert!(
        events[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("kubectl delete pod -n prod missed-app")),
        "{events:?}"
    );
    assert!(events_of(&kube, "good-app").is_empty());
    // A second agent looking too: still one Event.
    let other_root = tempfile::tempdir().expect("root");
    let other = FullAgent::start(
        &kube,
        other_root.path(),
        settings_on(support::free_port()),
        settings.clone(),
        webhook::kube_sync::REAPPLY_EVERY,
        webhook::kube_sync::CA_SYNC_EVERY,
        scan,
    );
    wait_for("the second agent's look", || {
        missed_of(&other).filter(|m| !m.is_empty())
    });
    std::thread::sleep(scan * 2);
    assert_eq!(events_of(&kube, "missed-app").len(), 1);

    // Recreated (deleted; its controller would create it again through the webhook): no
    // longer named, by the agent or doctor.
    kube.ok(
        "DELETE",
        "/api/v1/namespaces/prod/pods/missed-app?gracePeriodSeconds=0",
        None,
    );
    wait_for("nothing missed", || {
        missed_of(&back).filter(|m| m.is_empty())
    });
    let check = doctor_check(&host, "running.webhook-pods");
    assert_eq!(check["status"], "pass", "{check}");
}
