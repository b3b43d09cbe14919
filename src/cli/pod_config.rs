//! `irsa-agent pod-config`: the ServiceAccount and the pod template patch (projected token
//! volume, mount, variables) that give a workload its cloud identity, for people who do not
//! want a webhook. The same code as the webhook computes them ([`crate::identity`]).

use anyhow::bail;
use clap::{Args as ClapArgs, ValueEnum};
use serde_json::{Value, json};

use super::{Exit, Global};
use crate::identity::{self, aws, azure, gcp};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Cloud {
    Aws,
    Azure,
    Gcp,
}

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Prints YAML documents: the ServiceAccount with its annotations (what the webhook reads), for GCP \
the ConfigMap holding the credential configuration, and a patch for a Deployment's pod template \
(volume, mount, variables) that `kubectl patch deployment NAME --patch-file FILE` merges into \
the container named by --container. The values are those the webhook would inject, so a pod \
configured either way gets the same token and variables.

Examples:
  irsa-agent pod-config -n prod --service-account s3-reader --cloud aws \\
      --role-arn arn:aws:iam::123456789012:role/s3-reader --region eu-west-1
  irsa-agent pod-config -n prod --service-account blob-reader --cloud azure \\
      --client-id 11111111-2222-3333-4444-555555555555 --tenant-id TENANT
  irsa-agent pod-config -n prod --service-account gcs-reader --cloud gcp \\
      --provider projects/123/locations/global/workloadIdentityPools/homelab/providers/k3s \\
      --gcp-service-account reader@my-project.iam.gserviceaccount.com")]
pub struct Args {
    /// The service account's namespace.
    #[arg(long, short = 'n', value_name = "NS")]
    pub namespace: String,

    /// The service account's name.
    #[arg(long, value_name = "SA")]
    pub service_account: String,

    /// Which cloud the workload calls.
    #[arg(long, value_enum)]
    pub cloud: Cloud,

    /// The container the patch configures.
    #[arg(long, value_name = "NAME", default_value = "app")]
    pub container: String,

    /// AWS: the IAM role to assume (`eks.amazonaws.com/role-arn`).
    #[arg(long, value_name = "ARN")]
    pub role_arn: Option<String>,

    /// AWS: AWS_REGION and AWS_DEFAULT_REGION.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,

    /// The token's audience [default: sts.amazonaws.com (AWS), api://AzureADTokenExchange
    /// (Azure), the provider's resource name (GCP)].
    #[arg(long, value_name = "AUD")]
    pub audience: Option<String>,

    /// The token's lifetime in seconds [default: 86400 (AWS), 3600 (Azure, GCP)].
    #[arg(long, value_name = "SECONDS")]
    pub token_expiration: Option<u64>,

    /// Azure: the managed identity's or application's client id.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,

    /// Azure: the Entra tenant id.
    #[arg(long, value_name = "ID")]
    pub tenant_id: Option<String>,

    /// GCP: the workload identity pool provider
    /// (projects/NUM/locations/global/workloadIdentityPools/POOL/providers/PROVIDER).
    #[arg(long, value_name = "NAME")]
    pub provider: Option<String>,

    /// GCP: the Google service account to impersonate (omit for direct resource access).
    #[arg(long, value_name = "EMAIL")]
    pub gcp_service_account: Option<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn require<'a>(value: &'a Option<String>, flag: &str, cloud: &str) -> anyhow::Result<&'a str> {
    match value.as_deref() {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => bail!("--cloud {cloud} needs {flag}"),
    }
}

/// The documents `pod-config` prints, as JSON values (rendered as YAML by [`run`]).
pub fn documents(args: &Args) -> anyhow::Result<Vec<(String, Value)>> {
    for (what, value) in [
        ("--namespace", &args.namespace),
        ("--service-account", &args.service_account),
        ("--container", &args.container),
    ] {
        if !valid_name(value) {
            bail!(
                "{what} {value:?} is not a Kubernetes name (lower-case letters, digits, '-' and '.')"
            );
        }
    }
    let mut annotations = serde_json::Map::new();
    let mut pod = json!({"metadata": {}, "spec": {"containers": [{"name": args.container}]}});
    let mut extra = Vec::new();
    let expiration = args.token_expiration.map(|s| s.to_string());
    let injection = match args.cloud {
        Cloud::Aws => {
            let arn = require(&args.role_arn, "--role-arn", "aws")?;
            if !arn.starts_with("arn:aws") || !arn.contains(":role/") {
                bail!("--role-arn {arn:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)");
            }
            annotations.insert(aws::ROLE_ARN.into(), arn.into());
            if let Some(aud) = &args.audience {
                annotations.insert(aws::AUDIENCE.into(), aud.clone().into());
            }
            if let Some(e) = &expiration {
                annotations.insert(aws::TOKEN_EXPIRATION.into(), e.clone().into());
            }
            let sa = json!({"metadata": {"annotations": annotations}});
            let defaults = aws::Defaults {
                region: args.region.clone(),
                ..aws::Defaults::default()
            };
            aws::injection(&sa, &pod, &defaults)
        }
        Cloud::Azure => {
            let client = require(&args.client_id, "--client-id", "azure")?;
            annotations.insert(azure::CLIENT_ID.into(), client.into());
            if let Some(t) = &args.tenant_id {
                annotations.insert(azure::TENANT_ID.into(), t.clone().into());
            }
            if let Some(e) = &expiration {
                annotations.insert(azure::TOKEN_EXPIRATION.into(), e.clone().into());
            }
            pod["metadata"]["labels"] = json!({azure::USE_LABEL: "true"});
            let sa = json!({"metadata": {"annotations": annotations}});
            let defaults = azure::Defaults {
                audience: args
                    .audience
                    .clone()
                    .unwrap_or_else(|| azure::AUDIENCE.into()),
                ..azure::Defaults::default()
            };
            azure::injection(&sa, &pod, &defaults).map_err(anyhow::Error::msg)?
        }
        Cloud::Gcp => {
            let provider = require(&args.provider, "--provider", "gcp")?;
            gcp::check_provider(provider).map_err(|e| anyhow::anyhow!("--provider: {e}"))?;
            annotations.insert(gcp::PROVIDER.into(), provider.into());
            if let Some(email) = &args.gcp_service_account {
                annotations.insert(gcp::SERVICE_ACCOUNT_EMAIL.into(), email.clone().into());
            }
            if let Some(e) = &expiration {
                pod["metadata"]["annotations"] = json!({gcp::TOKEN_EXPIRATION: e});
            }
            let config =
                gcp::credential_configuration(provider, args.gcp_service_account.as_deref());
            extra.push((
                "the credential configuration the pod's GCP libraries read (GOOGLE_APPLICATION_CREDENTIALS)".to_string(),
                json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": gcp::config_map_name(&args.service_account), "namespace": args.namespace},
                    "data": {gcp::CONFIG_KEY: serde_json::to_string_pretty(&config)?}
                }),
            ));
            let sa =
                json!({"metadata": {"name": args.service_account, "annotations": annotations}});
            let mut injection = gcp::injection(&sa, &pod).map_err(anyhow::Error::msg)?;
            if let (Some(inj), Some(aud)) = (&mut injection, &args.audience) {
                inj.volume["projected"]["sources"][0]["serviceAccountToken"]["audience"] =
                    aud.clone().into();
            }
            injection
        }
    };
    let Some(injection) = injection else {
        bail!("nothing to inject for these settings");
    };
    let patched =
        identity::apply(&pod, &identity::patch(&pod, &injection)).map_err(anyhow::Error::msg)?;
    let mut template = json!({"spec": {
        "serviceAccountName": args.service_account,
        "volumes": patched["spec"]["volumes"],
        "containers": patched["spec"]["containers"],
    }});
    if args.cloud == Cloud::Azure {
        template["metadata"] = json!({"labels": {azure::USE_LABEL: "true"}});
    }
    if let Some(a) = patched["metadata"].get("annotations") {
        template["metadata"]["annotations"] = a.clone();
    }
    let mut docs = vec![(
        "the ServiceAccount (the webhook reads these annotations)".to_string(),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": args.service_account, "namespace": args.namespace, "annotations": annotations},
        }),
    )];
    docs.extend(extra);
    docs.push((
        format!(
            "the pod template patch, without the webhook: kubectl -n {} patch deployment NAME --patch-file THIS_PART.yaml",
            args.namespace
        ),
        json!({"spec": {"template": template}}),
    ));
    Ok(docs)
}

pub fn run(_global: &Global, args: Args) -> anyhow::Result<Exit> {
    for (i, (what, doc)) in documents(&args)?.iter().enumerate() {
        if i > 0 {
            println!("---");
        }
        println!("# {what}");
        print!("{}", serde_yaml::to_string(doc)?);
    }
    Ok(Exit::OK)
}
