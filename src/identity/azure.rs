//! Azure, compatible with azure-workload-identity (v1.5 layout, the one its documentation and
//! most charts show).
//!
//! Pod label `azure.workload.identity/use: "true"` (the trigger). ServiceAccount:
//! `azure.workload.identity/client-id`, `.../tenant-id`, `.../service-account-token-expiration`.
//! Pod: `.../service-account-token-expiration`, `.../skip-containers` (`;`-separated).
//! Injected, each variable on its own and never over one the container sets: `AZURE_CLIENT_ID`,
//! `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`; the projected
//! `azure-identity-token` volume (audience `api://AzureADTokenExchange`) at
//! `/var/run/secrets/azure/tokens`. A lifetime outside 3600-86400 s is an error that rejects the
//! pod, as upstream does. The proxy sidecar (`inject-proxy-sidecar`) is not supported.

use serde_json::Value;

use super::{EnvGroup, Injection, annotation, read_only_mount, split_names, token_volume};

pub const USE_LABEL: &str = "azure.workload.identity/use";
pub const CLIENT_ID: &str = "azure.workload.identity/client-id";
pub const TENANT_ID: &str = "azure.workload.identity/tenant-id";
pub const TOKEN_EXPIRATION: &str = "azure.workload.identity/service-account-token-expiration";
pub const SKIP_CONTAINERS: &str = "azure.workload.identity/skip-containers";
pub const VOLUME: &str = "azure-identity-token";
pub const MOUNT_PATH: &str = "/var/run/secrets/azure/tokens";
pub const TOKEN_FILE: &str = "/var/run/secrets/azure/tokens/azure-identity-token";
pub const AUDIENCE: &str = "api://AzureADTokenExchange";
pub const MIN_EXPIRATION: u64 = 3600;
pub const MAX_EXPIRATION: u64 = 86_400;

/// The agent's defaults (`webhook.azure` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// `AZURE_TENANT_ID` for ServiceAccounts without a tenant-id annotation.
    pub tenant_id: Option<String>,
    pub authority_host: String,
    pub audience: String,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            tenant_id: None,
            authority_host: "https://login.microsoftonline.com/".into(),
            audience: AUDIENCE.into(),
        }
    }
}

/// True when the pod asks for Azure workload identity.
pub fn wanted(pod: &Value) -> bool {
    pod["metadata"]["labels"][USE_LABEL] == "true"
}

/// What a pod of ServiceAccount `sa` gets: `Ok(None)` when the pod does not carry the label,
/// `Err` (the pod is refused, with this message) for a lifetime upstream refuses too.
pub fn injection(
    sa: &Value,
    pod: &Value,
    defaults: &Defaults,
) -> Result<Option<Injection>, String> {
    if !wanted(pod) {
        return Ok(None);
    }
    let expiration = match [
        annotation(pod, TOKEN_EXPIRATION),
        annotation(sa, TOKEN_EXPIRATION),
    ]
    .into_iter()
    .flatten()
    .find(|v| !v.is_empty())
    {
        None => MIN_EXPIRATION,
        Some(v) => {
            let n: u64 = v
                .parse()
                .map_err(|_| format!("{TOKEN_EXPIRATION}: {v:?} is not a number of seconds"))?;
            if !(MIN_EXPIRATION..=MAX_EXPIRATION).contains(&n) {
                return Err(format!(
                    "token expiration {n} not valid. Expected value to be between {MIN_EXPIRATION} and {MAX_EXPIRATION}"
                ));
            }
            n
        }
    };
    let tenant = match annotation(sa, TENANT_ID) {
        Some(t) => Some(t.to_string()),
        None => defaults.tenant_id.clone(),
    };
    let mut env = Vec::new();
    for (name, value) in [
        (
            "AZURE_CLIENT_ID",
            annotation(sa, CLIENT_ID).map(str::to_string),
        ),
        ("AZURE_TENANT_ID", tenant),
        ("AZURE_FEDERATED_TOKEN_FILE", Some(TOKEN_FILE.to_string())),
        (
            "AZURE_AUTHORITY_HOST",
            Some(defaults.authority_host.clone()),
        ),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            env.push(EnvGroup::one(name, value));
        }
    }
    Ok(Some(Injection {
        volume: token_volume(VOLUME, &defaults.audience, expiration, VOLUME),
        mount: read_only_mount(VOLUME, MOUNT_PATH),
        env,
        leave_fully_configured: false,
        skip_containers: split_names(annotation(pod, SKIP_CONTAINERS), ';'),
    }))
}

#[cfg(test)]
mod tests {
    use super::super::{apply, patch};
    use super::*;
    use serde_json::json;

    fn pod(annotations: Value) -> Value {
        json!({"metadata": {"labels": {USE_LABEL: "true"}, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "env": [{"name": "AZURE_TENANT_ID", "value": "mine"}]}]}})
    }

    #[test]
    fn injects_each_variable_unless_set_and_the_token_volume() {
        let sa = json!({"metadata": {"annotations": {CLIENT_ID: "11111111-2222-3333-4444-555555555555"}}});
        let defaults = Defaults {
            tenant_id: Some("tenant-default".into()),
            ..Defaults::default()
        };
        let p = pod(json!({}));
        let inj = injection(&sa, &p, &defaults)
            .expect("valid")
            .expect("label set");
        let out = apply(&p, &patch(&p, &inj)).expect("applies");
        assert_eq!(
            out["spec"]["containers"][0]["env"],
            json!([
                {"name": "AZURE_TENANT_ID", "value": "mine"},
                {"name": "AZURE_CLIENT_ID", "value": "11111111-2222-3333-4444-555555555555"},
                {"name": "AZURE_FEDERATED_TOKEN_FILE", "value": TOKEN_FILE},
                {"name": "AZURE_AUTHORITY_HOST", "value": "https://login.microsoftonline.com/"}
            ])
        );
        assert_eq!(
            out["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"],
            json!({"audience": AUDIENCE, "expirationSeconds": 3600, "path": "azure-identity-token"})
        );
    }

    #[test]
    fn no_label_no_injection_and_bad_lifetimes_are_refused() {
        let sa = json!({"metadata": {}});
        let unlabelled = json!({"spec": {"containers": [{"name": "app"}]}});
        assert_eq!(injection(&sa, &unlabelled, &Defaults::default()), Ok(None));
        for bad in ["60", "86401", "1h"] {
            assert!(
                injection(
                    &sa,
                    &pod(json!({TOKEN_EXPIRATION: bad})),
                    &Defaults::default()
                )
                .is_err()
            );
        }
    }
}
