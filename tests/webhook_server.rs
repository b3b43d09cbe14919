//! The webhook server over real TLS: a reqwest client that trusts only the agent's generated CA
//! posts AdmissionReviews shaped as kube-apiserver sends them (tests/data/webhook) to the
//! running server, and the CA replacement is watched from the client's side (explicit `now`,
//! no waiting).

use std::sync::atomic::Ordering;

use base64::Engine as _;
use irsa_agent::config::webhook::WebhookSettings;
use irsa_agent::host::HostRoot;
use irsa_agent::webhook::{self, ServiceAccounts, certs};
use serde_json::{Value, json};

const REVIEW: &str = include_str!("data/webhook/review-pod.json");

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn settings() -> WebhookSettings {
    let mut s = WebhookSettings {
        enabled: true,
        ..Default::default()
    };
    s.listen = "127.0.0.1:0".parse().expect("addr");
    s.defaults.aws.region = Some("eu-west-1".into());
    s
}

fn client(bundle_pem: &str) -> reqwest::Client {
    irsa_agent::publish::http::install_crypto_provider();
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(bundle_pem.as_bytes()).expect("pem"))
        .tls_info(true)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

fn cache() -> ServiceAccounts {
    let cache = ServiceAccounts::default();
    cache.upsert(
        &json!({"metadata": {"namespace": "prod", "name": "s3-reader", "annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/s3-reader",
            "kubectl.kubernetes.io/last-applied-configuration": "{... dropped by the cache ...}",
        }}}),
    );
    cache.upsert(
        &json!({"metadata": {"namespace": "prod", "name": "blob-reader", "annotations": {
            "azure.workload.identity/client-id": "11111111-2222-3333-4444-555555555555",
            "azure.workload.identity/tenant-id": "66666666-7777-8888-9999-000000000000",
        }}}),
    );
    cache.upsert(&json!({"metadata": {"namespace": "prod", "name": "plain"}}));
    cache
}

/// Applies RFC 6902 `add` operations (written here, independently of the agent's own).
fn apply(mut doc: Value, ops: &[Value]) -> Value {
    for op in ops {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().expect("path");
        let (parent, last) = path.rsplit_once('/').expect("slash");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{parent} missing"));
        match target {
            Value::Array(items) if last == "-" => items.push(op["value"].clone()),
            Value::Object(map) => {
                map.insert(last.to_string(), op["value"].clone());
            }
            other => panic!("cannot add at {path} into {other}"),
        }
    }
    doc
}

fn env_of(pod: &Value, container: usize) -> Vec<(String, String)> {
    pod["spec"]["containers"][container]["env"]
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

fn review_for(f: impl FnOnce(&mut Value)) -> Value {
    let mut review: Value = serde_json::from_str(REVIEW).expect("review json");
    f(&mut review["request"]["object"]);
    review
}

async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, Value, String) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// (patched pod, answer) for one review.
async fn mutate(client: &reqwest::Client, url: &str, review: &Value) -> (Value, Value) {
    let (status, answer, text) = post(client, url, serde_json::to_vec(review).expect("json")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let pod = review["request"]["object"].clone();
    let Some(patch) = answer["response"]["patch"].as_str() else {
        assert!(answer["response"].get("patchType").is_none());
        return (pod, answer);
    };
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let ops: Vec<Value> = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("base64"),
    )
    .expect("patch json");
    (apply(pod, &ops), answer)
}

#[test]
fn pods_are_mutated_over_tls_from_the_cache_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = HostRoot::new(dir.path());
    runtime().block_on(async {
        let running = webhook::start(&root, &settings(), cache(), webhook::unix_now())
            .expect("start");
        // The CA is kept, private.
        let ca_path = root.path(certs::CA_FILE);
        let mode = std::fs::metadata(&ca_path).expect("ca file").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let bundle = running.bundle.borrow().clone();
        let client = client(&bundle);
        let base = format!("https://127.0.0.1:{}", running.local_addr.port());
        let url = format!("{base}/mutate");

        // Health, by the loopback name in the certificate as well.
        let health = client.get(format!("{base}/healthz")).send().await.expect("healthz");
        assert_eq!(health.status().as_u16(), 200);
        let by_name = format!("https://localhost:{}/healthz", running.local_addr.port());
        assert_eq!(client.get(by_name).send().await.expect("localhost").status().as_u16(), 200);

        // AWS.
        let (pod, _) = mutate(&client, &url, &review_for(|_| {})).await;
        let env = env_of(&pod, 0);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("AWS_ROLE_ARN"), Some("arn:aws:iam::123456789012:role/s3-reader"));
        assert_eq!(
            get("AWS_WEB_IDENTITY_TOKEN_FILE"),
            Some("/var/run/secrets/eks.amazonaws.com/serviceaccount/token")
        );
        assert_eq!(get("AWS_REGION"), Some("eu-west-1"));
        assert_eq!(get("AWS_DEFAULT_REGION"), Some("eu-west-1"));
        assert_eq!(get("AWS_STS_REGIONAL_ENDPOINTS"), Some("regional"));
        let volume = pod["spec"]["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "aws-iam-token"))
            .expect("aws-iam-token volume");
        let token = &volume["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "sts.amazonaws.com");
        assert_eq!(token["expirationSeconds"], 86400);
        // The apiserver's own volume is still first, untouched.
        assert_eq!(pod["spec"]["volumes"][0]["name"], "kube-api-access-x2x9p");
        assert!(
            pod["spec"]["containers"][0]["volumeMounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["mountPath"]
                    == "/var/run/secrets/eks.amazonaws.com/serviceaccount"
                    && m["readOnly"] == true))
        );
        // Reinvoked on its own result (reinvocationPolicy: IfNeeded): no patch.
        let again = review_for(|o| *o = pod.clone());
        let (_, answer) = mutate(&client, &url, &again).await;
        assert!(answer["response"].get("patch").is_none(), "{answer}");

        // Azure: the pod label and the ServiceAccount's client and tenant IDs.
        let (pod, _) = mutate(
            &client,
            &url,
            &review_for(|o| {
                o["spec"]["serviceAccountName"] = "blob-reader".into();
                o["metadata"]["labels"]["azure.workload.identity/use"] = "true".into();
            }),
        )
        .await;
        let env = env_of(&pod, 0);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("AZURE_CLIENT_ID"), Some("11111111-2222-3333-4444-555555555555"));
        assert_eq!(get("AZURE_TENANT_ID"), Some("66666666-7777-8888-9999-000000000000"));
        assert_eq!(
            get("AZURE_FEDERATED_TOKEN_FILE"),
            Some("/var/run/secrets/azure/tokens/azure-identity-token")
        );
        assert_eq!(get("AZURE_AUTHORITY_HOST"), Some("https://login.microsoftonline.com/"));
        assert!(get("AWS_ROLE_ARN").is_none());

        // Unannotated ServiceAccount, unknown ServiceAccount, skipped namespace: unchanged.
        for f in [
            (|o: &mut Value| o["spec"]["serviceAccountName"] = "plain".into()) as fn(&mut Value),
            |o| o["spec"]["serviceAccountName"] = "nobody".into(),
        ] {
            let (_, answer) = mutate(&client, &url, &review_for(f)).await;
            assert!(answer["response"].get("patch").is_none(), "{answer}");
        }
        let mut in_kube_system = review_for(|o| o["metadata"]["namespace"] = "kube-system".into());
        in_kube_system["request"]["namespace"] = "kube-system".into();
        let (_, answer) = mutate(&client, &url, &in_kube_system).await;
        assert!(answer["response"].get("patch").is_none(), "{answer}");

        // A pod that sets the variables itself keeps its own values.
        let (pod, _) = mutate(
            &client,
            &url,
            &review_for(|o| {
                o["spec"]["containers"][0]["env"] = json!([
                    {"name": "AWS_ROLE_ARN", "value": "arn:aws:iam::999999999999:role/mine"},
                    {"name": "AWS_REGION", "value": "us-east-2"},
                ]);
            }),
        )
        .await;
        let env = env_of(&pod, 0);
        let values = |k: &str| env.iter().filter(|(n, _)| n == k).map(|(_, v)| v.clone()).collect::<Vec<_>>();
        assert_eq!(values("AWS_ROLE_ARN"), vec!["arn:aws:iam::999999999999:role/mine"]);
        assert_eq!(values("AWS_REGION"), vec!["us-east-2"]);
        assert!(values("AWS_DEFAULT_REGION").is_empty(), "grouped with AWS_REGION: {env:?}");
        assert!(values("AWS_WEB_IDENTITY_TOKEN_FILE").is_empty(), "grouped with AWS_ROLE_ARN");
        assert_eq!(values("AWS_STS_REGIONAL_ENDPOINTS"), vec!["regional"]);

        // A pod refused for its annotation: Azure lifetime out of range, with the reason.
        let (status, answer, _) = post(
            &client,
            &url,
            serde_json::to_vec(&review_for(|o| {
                o["spec"]["serviceAccountName"] = "blob-reader".into();
                o["metadata"]["labels"]["azure.workload.identity/use"] = "true".into();
                o["metadata"]["annotations"] =
                    json!({"azure.workload.identity/service-account-token-expiration": "60"});
            }))
            .expect("json"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(answer["response"]["allowed"], false, "{answer}");

        // Bad bodies: clearly refused.
        let (status, answer, text) = post(&client, &url, b"{not json".to_vec()).await;
        assert_eq!(status, 400, "{text}");
        assert!(
            answer["response"]["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("not an AdmissionReview")),
            "{text}"
        );
        let (status, answer, _) = post(&client, &url, br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"u","kind":{"kind":"Secret"}}}"#.to_vec()).await;
        assert_eq!(status, 200);
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(answer["response"]["uid"], "u");
        let (status, _, text) = post(&client, &url, vec![b' '; webhook::MAX_BODY + 1]).await;
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("at most"), "{text}");
        let get = client.get(&url).send().await.expect("get");
        assert_eq!(get.status().as_u16(), 405);

        // Counted.
        let c = &running.counters;
        // AWS, Azure, the pod with its own variables.
        assert_eq!(c.mutations.load(Ordering::Relaxed), 3);
        // The Azure lifetime, the Secret.
        assert_eq!(c.refusals.load(Ordering::Relaxed), 2);
        // Not JSON, too large, GET.
        assert_eq!(c.errors.load(Ordering::Relaxed), 3);
    });
}

#[test]
fn a_client_trusting_only_the_old_ca_keeps_working_until_the_new_ca_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = HostRoot::new(dir.path());
    let now = webhook::unix_now();
    // An old CA with 170 days left, so the agent adds a new one as it starts.
    let old =
        certs::Authority::generate(now - (certs::CA_LIFETIME - 170 * 86_400)).expect("old ca");
    let old_only = certs::Authorities { cas: vec![old] };
    let path = root.path(certs::CA_FILE);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(&path, old_only.to_pem().expect("pem")).expect("write");
    // The new CA will have been in the bundle long enough 60 s from now: rewrite it as made
    // (propagation - 60 s) ago, as if the agent had added it then.
    let (mut cas, _) = certs::load_and_maintain(&root, now).expect("maintain");
    assert_eq!(cas.cas.len(), 2, "a new CA is added with 170 days left");
    cas.cas[1] = certs::Authority::generate(now - certs::CA_PROPAGATION + 60).expect("new ca");
    std::fs::write(&path, cas.to_pem().expect("pem")).expect("write");
    let old_pem = old_only.bundle_pem();
    let new_only = certs::Authorities {
        cas: vec![cas.cas[1].clone()],
    };
    let new_pem = new_only.bundle_pem();

    runtime().block_on(async {
        let running = webhook::start(&root, &settings(), cache(), now).expect("start");
        let bundle = running.bundle.borrow().clone();
        assert_eq!(
            bundle,
            format!("{old_pem}{new_pem}"),
            "the bundle holds both CAs"
        );
        let url = format!("https://127.0.0.1:{}/healthz", running.local_addr.port());
        let issuer = |client: reqwest::Client| {
            let url = url.clone();
            async move {
                let response = client
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                let info = response
                    .extensions()
                    .get::<reqwest::tls::TlsInfo>()
                    .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
                    .ok_or("no peer certificate")?;
                Ok::<Vec<u8>, String>(info)
            }
        };
        // Before the new CA has propagated: the old CA still signs.
        assert!(issuer(client(&old_pem)).await.is_ok());
        assert!(
            issuer(client(&new_pem)).await.is_err(),
            "not signed by the new CA yet"
        );
        assert!(issuer(client(&bundle)).await.is_ok());

        // 120 s later the new CA signs; the certificate is swapped on the running server.
        running.renew_at(now + 120);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            issuer(client(&new_pem)).await.is_ok(),
            "signed by the new CA now"
        );
        assert!(issuer(client(&old_pem)).await.is_err());
        assert!(
            issuer(client(&bundle)).await.is_ok(),
            "the registered bundle works throughout"
        );
        assert_eq!(
            *running.bundle.borrow(),
            bundle,
            "the bundle did not change"
        );

        // Once the old CA has expired it leaves the bundle (and the file).
        running.renew_at(old_only.cas[0].not_after + 1);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(*running.bundle.borrow(), new_pem);
        let on_disk =
            certs::Authorities::from_pem(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(on_disk.bundle_pem(), new_pem);
    });
}
