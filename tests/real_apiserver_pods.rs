//! What `irsa-agent pod-config` prints, against a real kube-apiserver (v1.36.2, named by
//! `IRSA_TEST_KUBE_APISERVER`; without it the test says SKIPPED): the ServiceAccount and
//! ConfigMap are created, a pod built from the template patch passes the apiserver's
//! validation and admission (`dryRun=All`) with the injected volume and variables intact, and a
//! token requested as kubelet requests it for that volume carries the injected audience and
//! lifetime and is accepted by the apiserver for that audience.

mod kube_support;
mod support;

use base64::Engine as _;
use kube_support::Kube;
use serde_json::{Value, json};

fn pod_config(args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_irsa-agent"))
        .arg("pod-config")
        .args(args)
        .output()
        .expect("pod-config runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str::<Value>(d).expect("YAML"))
        .collect()
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

#[test]
fn pod_config_manifests_pass_a_real_apiserver_and_tokens_carry_the_injected_audience() {
    let Some(kube) = Kube::temp("real_apiserver_pods") else {
        return;
    };
    // The k3s test case's keys; the issuer a user would set.
    kube.start_with_test_keys(
        "https://oidc.example.com/homelab",
        "--api-audiences=https://kubernetes.default.svc.cluster.local\n",
    );
    kube.ok(
        "POST",
        "/api/v1/namespaces",
        Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}})),
    );
    let provider =
        "projects/123456789/locations/global/workloadIdentityPools/homelab/providers/k3s";
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "aws",
            vec![
                "--role-arn",
                "arn:aws:iam::123456789012:role/s3-reader",
                "--region",
                "eu-west-1",
            ],
        ),
        (
            "azure",
            vec![
                "--client-id",
                "11111111-2222-3333-4444-555555555555",
                "--tenant-id",
                "t",
            ],
        ),
        ("gcp", vec!["--provider", provider]),
    ];
    for (cloud, extra) in cases {
        let sa = format!("{cloud}-reader");
        let mut args = vec!["-n", "prod", "--service-account", &sa, "--cloud", cloud];
        args.extend(extra);
        let docs = pod_config(&args);
        let mut template = Value::Null;
        for doc in docs {
            match doc["kind"].as_str() {
                Some("ServiceAccount") => {
                    kube.ok(
                        "POST",
                        "/api/v1/namespaces/prod/serviceaccounts",
                        Some(&doc),
                    );
                }
                Some("ConfigMap") => {
                    kube.ok("POST", "/api/v1/namespaces/prod/configmaps", Some(&doc));
                }
                _ => template = doc["spec"]["template"].clone(),
            }
        }
        let mut spec = template["spec"].clone();
        spec["containers"][0]["image"] = "registry.k8s.io/pause:3.10".into();
        let mut metadata = template["metadata"].clone();
        if metadata.is_null() {
            metadata = json!({});
        }
        metadata["name"] = format!("{cloud}-app").into();
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec});
        let created = kube.ok(
            "POST",
            "/api/v1/namespaces/prod/pods?dryRun=All",
            Some(&pod),
        );
        let ours = &template["spec"]["volumes"][0];
        let name = ours["name"].as_str().unwrap_or_default();
        let served = created["spec"]["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == name))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(
            served["projected"]["sources"][0]["serviceAccountToken"],
            ours["projected"]["sources"][0]["serviceAccountToken"],
            "{cloud}: the apiserver changed the token source: {created}"
        );
        assert_eq!(
            created["spec"]["containers"][0]["env"], template["spec"]["containers"][0]["env"],
            "{cloud}"
        );
        // The token kubelet would request for that volume.
        let source = &ours["projected"]["sources"][0]["serviceAccountToken"];
        let audience = source["audience"].as_str().unwrap_or_default().to_string();
        let lifetime = source["expirationSeconds"].as_u64().unwrap_or_default();
        let answer = kube.ok(
            "POST",
            &format!("/api/v1/namespaces/prod/serviceaccounts/{sa}/token"),
            Some(&json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"audiences": [audience], "expirationSeconds": lifetime}
            })),
        );
        let token = answer["status"]["token"].as_str().unwrap_or_default();
        let c = claims(token);
        assert_eq!(c["aud"], json!([audience]), "{cloud}: {c}");
        assert_eq!(c["sub"], format!("system:serviceaccount:prod:{sa}"));
        assert_eq!(
            c["exp"].as_u64().unwrap_or_default() - c["iat"].as_u64().unwrap_or_default(),
            lifetime,
            "{cloud}: {c}"
        );
        kube.accepts(token, Some(&audience))
            .unwrap_or_else(|e| panic!("{cloud}: the apiserver refuses its own token: {e}"));
    }
}
