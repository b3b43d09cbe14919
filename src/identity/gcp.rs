//! Google Cloud workload identity federation from a cluster outside GKE.
//!
//! GCP's client libraries read a *credential configuration* (`"type": "external_account"`, the
//! file `gcloud iam workload-identity-pools create-cred-config` writes) named by
//! `GOOGLE_APPLICATION_CREDENTIALS`; it points at the pod's projected token. So a pod gets one
//! projected volume holding both: the token (audience: the provider's resource name, which a
//! provider accepts with its default settings) and the configuration from a ConfigMap the
//! ServiceAccount's namespace holds ([`config_map_name`]).
//!
//! ServiceAccount annotations (the names pfnet-research's webhook uses):
//! `cloud.google.com/workload-identity-provider` (`projects/NUM/locations/global/
//! workloadIdentityPools/POOL/providers/PROVIDER`) and, to impersonate a Google service
//! account, `cloud.google.com/service-account-email`. Pod: `cloud.google.com/token-expiration`,
//! `cloud.google.com/skip-containers`. Unlike that webhook, a `GOOGLE_APPLICATION_CREDENTIALS`
//! the container sets is kept.

use serde_json::{Value, json};

use super::{EnvGroup, Injection, annotation, split_names};

pub const PROVIDER: &str = "cloud.google.com/workload-identity-provider";
pub const SERVICE_ACCOUNT_EMAIL: &str = "cloud.google.com/service-account-email";
pub const TOKEN_EXPIRATION: &str = "cloud.google.com/token-expiration";
pub const SKIP_CONTAINERS: &str = "cloud.google.com/skip-containers";
pub const VOLUME: &str = "gcp-workload-identity";
pub const MOUNT_PATH: &str = "/var/run/secrets/workload-identity";
pub const CONFIG_KEY: &str = "credential-configuration.json";
pub const MIN_EXPIRATION: u64 = 600;
pub const DEFAULT_EXPIRATION: u64 = 3600;

/// Checks a provider's resource name; the error says what is wrong.
pub fn check_provider(provider: &str) -> Result<(), String> {
    let parts: Vec<&str> = provider.split('/').collect();
    let shape = parts.len() == 8
        && parts[0] == "projects"
        && parts[2] == "locations"
        && parts[4] == "workloadIdentityPools"
        && parts[6] == "providers"
        && parts.iter().skip(1).step_by(2).all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if shape {
        Ok(())
    } else {
        Err(format!(
            "{provider:?} is not a workload identity pool provider: expected projects/PROJECT_NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER"
        ))
    }
}

/// The audience the pod's token is requested with: the provider's full resource name, which
/// a provider accepts when its allowed audiences are left empty (the default).
pub fn token_audience(provider: &str) -> String {
    format!("https://iam.googleapis.com/{provider}")
}

/// The credential configuration (what `gcloud iam workload-identity-pools create-cred-config`
/// writes with `--credential-source-type=text`).
pub fn credential_configuration(provider: &str, service_account: Option<&str>) -> Value {
    let mut config = json!({
        "type": "external_account",
        "audience": format!("//iam.googleapis.com/{provider}"),
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": {
            "file": format!("{MOUNT_PATH}/token"),
            "format": {"type": "text"}
        }
    });
    if let Some(email) = service_account {
        config["service_account_impersonation_url"] = Value::String(format!(
            "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{email}:generateAccessToken"
        ));
    }
    config
}

/// The ConfigMap (in the ServiceAccount's namespace) holding its credential configuration.
pub fn config_map_name(service_account: &str) -> String {
    let name = format!("{service_account}-gcp-credentials");
    name.chars().take(253).collect()
}

/// What a pod of ServiceAccount `sa` gets: `Ok(None)` without a provider annotation, `Err`
/// for a malformed one.
pub fn injection(sa: &Value, pod: &Value) -> Result<Option<Injection>, String> {
    let Some(provider) = annotation(sa, PROVIDER).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    check_provider(provider).map_err(|e| format!("{PROVIDER}: {e}"))?;
    let sa_name = sa["metadata"]["name"].as_str().unwrap_or_default();
    let expiration = annotation(pod, TOKEN_EXPIRATION)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_EXPIRATION)
        .max(MIN_EXPIRATION);
    let volume = json!({
        "name": VOLUME,
        "projected": {"sources": [
            {"serviceAccountToken": {
                "audience": token_audience(provider),
                "expirationSeconds": expiration,
                "path": "token"
            }},
            {"configMap": {
                "name": config_map_name(sa_name),
                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]
            }}
        ]}
    });
    Ok(Some(Injection {
        volume,
        mount: super::read_only_mount(VOLUME, MOUNT_PATH),
        env: vec![EnvGroup::one(
            "GOOGLE_APPLICATION_CREDENTIALS",
            format!("{MOUNT_PATH}/{CONFIG_KEY}"),
        )],
        leave_fully_configured: false,
        skip_containers: split_names(annotation(pod, SKIP_CONTAINERS), ','),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str =
        "projects/123456789/locations/global/workloadIdentityPools/homelab/providers/k3s";

    #[test]
    fn provider_names_are_checked() {
        assert!(check_provider(P).is_ok());
        for bad in [
            "",
            "projects/1/locations/global/workloadIdentityPools/p",
            "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/x",
            "projects/1/locations/global/workloadIdentityPools/p/providers/x y",
        ] {
            assert!(check_provider(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_configuration_points_at_the_projected_token() {
        let c = credential_configuration(P, Some("reader@proj.iam.gserviceaccount.com"));
        assert_eq!(
            c["credential_source"]["file"],
            "/var/run/secrets/workload-identity/token"
        );
        assert_eq!(c["audience"], format!("//iam.googleapis.com/{P}"));
        assert!(
            c["service_account_impersonation_url"].as_str().is_some_and(
                |u| u.ends_with("reader@proj.iam.gserviceaccount.com:generateAccessToken")
            )
        );
        let sa = json!({"metadata": {"name": "reader", "annotations": {PROVIDER: P}}});
        let pod = json!({"spec": {"containers": [{"name": "app"}]}});
        let inj = injection(&sa, &pod).expect("valid").expect("annotated");
        assert_eq!(
            inj.volume["projected"]["sources"][1]["configMap"]["name"],
            "reader-gcp-credentials"
        );
        assert_eq!(
            inj.volume["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            format!("https://iam.googleapis.com/{P}")
        );
    }
}
