//! `irsa-agent pod-config`, the real binary: the documents parse as Kubernetes YAML, carry the
//! annotations the webhooks read, and the pod patch holds the token volume, mount and variables
//! each cloud's SDK needs; bad input is refused with the flag and the reason.

use serde_json::Value;

fn pod_config(args: &[&str]) -> (i32, Vec<Value>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_irsa-agent"))
        .arg("pod-config")
        .args(args)
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let docs = stdout
        .split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str::<Value>(d).expect("each document is YAML"))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        docs,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn env_of(container: &Value) -> Vec<(String, String)> {
    container["env"]
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

#[test]
fn aws_azure_and_gcp_get_their_token_volume_and_variables() {
    let (code, docs, err) = pod_config(&[
        "-n",
        "prod",
        "--service-account",
        "s3-reader",
        "--cloud",
        "aws",
        "--role-arn",
        "arn:aws:iam::123456789012:role/s3-reader",
        "--region",
        "eu-west-1",
        "--container",
        "web",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(docs[0]["kind"], "ServiceAccount");
    assert_eq!(
        docs[0]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/s3-reader"
    );
    let spec = &docs[1]["spec"]["template"]["spec"];
    assert_eq!(spec["serviceAccountName"], "s3-reader");
    assert_eq!(spec["containers"][0]["name"], "web");
    let env = env_of(&spec["containers"][0]);
    assert!(env.contains(&("AWS_REGION".into(), "eu-west-1".into())));
    assert!(env.contains(&(
        "AWS_WEB_IDENTITY_TOKEN_FILE".into(),
        "/var/run/secrets/eks.amazonaws.com/serviceaccount/token".into()
    )));
    assert_eq!(
        spec["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "sts.amazonaws.com"
    );

    let (code, docs, err) = pod_config(&[
        "-n",
        "prod",
        "--service-account",
        "blob",
        "--cloud",
        "azure",
        "--client-id",
        "11111111-2222-3333-4444-555555555555",
        "--tenant-id",
        "t-1",
    ]);
    assert_eq!(code, 0, "{err}");
    let template = &docs[1]["spec"]["template"];
    assert_eq!(
        template["metadata"]["labels"]["azure.workload.identity/use"],
        "true"
    );
    let env = env_of(&template["spec"]["containers"][0]);
    assert_eq!(
        env.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
            "AZURE_AUTHORITY_HOST"
        ]
    );
    assert_eq!(
        template["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "api://AzureADTokenExchange"
    );

    let provider =
        "projects/123456789/locations/global/workloadIdentityPools/homelab/providers/k3s";
    let (code, docs, err) = pod_config(&[
        "-n",
        "prod",
        "--service-account",
        "gcs",
        "--cloud",
        "gcp",
        "--provider",
        provider,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(docs[1]["kind"], "ConfigMap");
    let config: Value = serde_json::from_str(
        docs[1]["data"]["credential-configuration.json"]
            .as_str()
            .expect("config"),
    )
    .expect("JSON");
    assert_eq!(config["type"], "external_account");
    assert!(config.get("service_account_impersonation_url").is_none());
    let spec = &docs[2]["spec"]["template"]["spec"];
    let sources = &spec["volumes"][0]["projected"]["sources"];
    assert_eq!(sources[1]["configMap"]["name"], docs[1]["metadata"]["name"]);
    // The file the configuration names is the token the volume projects.
    let mount = spec["containers"][0]["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        config["credential_source"]["file"],
        format!(
            "{mount}/{}",
            sources[0]["serviceAccountToken"]["path"]
                .as_str()
                .unwrap_or_default()
        )
    );
}

#[test]
fn missing_or_malformed_input_names_the_flag() {
    for (args, needle) in [
        (
            vec!["-n", "prod", "--service-account", "x", "--cloud", "aws"],
            "--role-arn",
        ),
        (
            vec![
                "-n",
                "prod",
                "--service-account",
                "x",
                "--cloud",
                "aws",
                "--role-arn",
                "s3-reader",
            ],
            "not an IAM role ARN",
        ),
        (
            vec![
                "-n",
                "Prod",
                "--service-account",
                "x",
                "--cloud",
                "aws",
                "--role-arn",
                "arn:aws:iam::1:role/r",
            ],
            "--namespace",
        ),
        (
            vec!["-n", "prod", "--service-account", "x", "--cloud", "azure"],
            "--client-id",
        ),
        (
            vec![
                "-n",
                "prod",
                "--service-account",
                "x",
                "--cloud",
                "azure",
                "--client-id",
                "c",
                "--token-expiration",
                "60",
            ],
            "between 3600 and 86400",
        ),
        (
            vec![
                "-n",
                "prod",
                "--service-account",
                "x",
                "--cloud",
                "gcp",
                "--provider",
                "pool/x",
            ],
            "workload identity pool provider",
        ),
    ] {
        let (code, _, err) = pod_config(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
