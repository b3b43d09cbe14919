//! AWS (IRSA), compatible with amazon-eks-pod-identity-webhook's annotations.
//!
//! ServiceAccount: `eks.amazonaws.com/role-arn` (the trigger), `.../audience`,
//! `.../sts-regional-endpoints`, `.../token-expiration`. Pod: `.../token-expiration`,
//! `.../skip-containers` (comma-separated). Injected: `AWS_STS_REGIONAL_ENDPOINTS=regional`,
//! `AWS_DEFAULT_REGION` + `AWS_REGION` (when a region is configured), `AWS_ROLE_ARN` +
//! `AWS_WEB_IDENTITY_TOKEN_FILE`, in that order and by group, and the projected `aws-iam-token`
//! volume at `/var/run/secrets/eks.amazonaws.com/serviceaccount`. A container that already sets
//! all of them is left alone (mount included), as upstream does.

use serde_json::Value;

use super::{EnvGroup, Injection, annotation, read_only_mount, split_names, token_volume};

pub const ROLE_ARN: &str = "eks.amazonaws.com/role-arn";
pub const AUDIENCE: &str = "eks.amazonaws.com/audience";
pub const STS_REGIONAL_ENDPOINTS: &str = "eks.amazonaws.com/sts-regional-endpoints";
pub const TOKEN_EXPIRATION: &str = "eks.amazonaws.com/token-expiration";
pub const SKIP_CONTAINERS: &str = "eks.amazonaws.com/skip-containers";
pub const VOLUME: &str = "aws-iam-token";
pub const MOUNT_PATH: &str = "/var/run/secrets/eks.amazonaws.com/serviceaccount";
/// The shortest token lifetime (seconds); shorter requests are raised to it, as upstream does.
pub const MIN_EXPIRATION: u64 = 600;

/// The agent's defaults (`webhook.aws` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub audience: String,
    /// `AWS_REGION`/`AWS_DEFAULT_REGION`; none injected when unset.
    pub region: Option<String>,
    /// Inject `AWS_STS_REGIONAL_ENDPOINTS=regional` (what EKS pods get).
    pub regional_sts: bool,
    pub token_expiration: u64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            audience: "sts.amazonaws.com".into(),
            region: None,
            regional_sts: true,
            token_expiration: 86_400,
        }
    }
}

/// Go's `strconv.ParseBool`, which upstream uses for the annotation.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The token file path a container sees (Windows nodes get a `C:\` path, as upstream).
fn token_file(pod: &Value) -> String {
    let path = format!("{MOUNT_PATH}/token");
    let selector = &pod["spec"]["nodeSelector"];
    let windows = ["kubernetes.io/os", "beta.kubernetes.io/os"]
        .iter()
        .any(|k| selector[*k] == "windows");
    if windows {
        format!("C:{}", path.replace('/', "\\"))
    } else {
        path
    }
}

/// What a pod of ServiceAccount `sa` gets; `None` when the ServiceAccount has no role ARN.
pub fn injection(sa: &Value, pod: &Value, defaults: &Defaults) -> Option<Injection> {
    let role_arn = annotation(sa, ROLE_ARN).filter(|a| !a.is_empty())?;
    let audience = annotation(sa, AUDIENCE).unwrap_or(&defaults.audience);
    let regional = annotation(sa, STS_REGIONAL_ENDPOINTS)
        .and_then(parse_bool)
        .unwrap_or(defaults.regional_sts);
    let expiration = [
        annotation(pod, TOKEN_EXPIRATION),
        annotation(sa, TOKEN_EXPIRATION),
    ]
    .into_iter()
    .flatten()
    .find_map(|v| v.parse::<i64>().ok())
    .map_or(defaults.token_expiration, |v| v.max(0) as u64)
    .max(MIN_EXPIRATION);
    let mut env = Vec::new();
    if regional {
        env.push(EnvGroup::one("AWS_STS_REGIONAL_ENDPOINTS", "regional"));
    }
    if let Some(region) = defaults.region.as_deref().filter(|r| !r.is_empty()) {
        env.push(EnvGroup(vec![
            ("AWS_DEFAULT_REGION".into(), region.into()),
            ("AWS_REGION".into(), region.into()),
        ]));
    }
    env.push(EnvGroup(vec![
        ("AWS_ROLE_ARN".into(), role_arn.into()),
        ("AWS_WEB_IDENTITY_TOKEN_FILE".into(), token_file(pod)),
    ]));
    Some(Injection {
        volume: token_volume(VOLUME, audience, expiration, "token"),
        mount: read_only_mount(VOLUME, MOUNT_PATH),
        env,
        leave_fully_configured: true,
        skip_containers: split_names(annotation(pod, SKIP_CONTAINERS), ','),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{apply, patch};
    use super::*;
    use serde_json::json;

    fn sa(annotations: Value) -> Value {
        json!({"metadata": {"name": "s3-reader", "annotations": annotations}})
    }

    #[test]
    fn injects_what_eks_pods_get_in_upstream_order() {
        let sa = sa(json!({ROLE_ARN: "arn:aws:iam::123456789012:role/s3-reader"}));
        let pod = json!({"spec": {"containers": [{"name": "app"}]}});
        let defaults = Defaults {
            region: Some("eu-west-1".into()),
            ..Defaults::default()
        };
        let inj = injection(&sa, &pod, &defaults).expect("role-arn set");
        let out = apply(&pod, &patch(&pod, &inj)).expect("applies");
        let names: Vec<&str> = out["spec"]["containers"][0]["env"]
            .as_array()
            .map(|e| e.iter().filter_map(|v| v["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            names,
            [
                "AWS_STS_REGIONAL_ENDPOINTS",
                "AWS_DEFAULT_REGION",
                "AWS_REGION",
                "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE"
            ]
        );
        assert_eq!(
            out["spec"]["containers"][0]["env"][4]["value"],
            "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"
        );
        assert_eq!(
            out["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"],
            json!({"audience": "sts.amazonaws.com", "expirationSeconds": 86400, "path": "token"})
        );
    }

    #[test]
    fn annotations_override_defaults_and_short_lifetimes_are_raised() {
        let sa = sa(json!({
            ROLE_ARN: "arn:aws:iam::123456789012:role/r",
            AUDIENCE: "sts.example",
            STS_REGIONAL_ENDPOINTS: "false",
            TOKEN_EXPIRATION: "3600",
        }));
        let pod = json!({"metadata": {"annotations": {TOKEN_EXPIRATION: "60", SKIP_CONTAINERS: "istio-proxy, envoy"}},
            "spec": {"nodeSelector": {"kubernetes.io/os": "windows"}, "containers": [{"name": "app"}, {"name": "envoy"}]}});
        let inj = injection(&sa, &pod, &Defaults::default()).expect("role-arn set");
        assert_eq!(
            inj.volume["projected"]["sources"][0]["serviceAccountToken"]["expirationSeconds"],
            600
        );
        assert_eq!(
            inj.volume["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "sts.example"
        );
        assert_eq!(inj.skip_containers, ["istio-proxy", "envoy"]);
        assert!(
            inj.env
                .iter()
                .all(|g| g.0[0].0 != "AWS_STS_REGIONAL_ENDPOINTS")
        );
        assert_eq!(
            inj.env[0].0[1].1,
            "C:\\var\\run\\secrets\\eks.amazonaws.com\\serviceaccount\\token"
        );
        let out = apply(&pod, &patch(&pod, &inj)).expect("applies");
        assert_eq!(out["spec"]["containers"][1], json!({"name": "envoy"}));
    }

    #[test]
    fn no_role_arn_no_injection() {
        let pod = json!({"spec": {"containers": [{"name": "app"}]}});
        assert!(injection(&sa(json!({})), &pod, &Defaults::default()).is_none());
        assert!(injection(&sa(json!({ROLE_ARN: ""})), &pod, &Defaults::default()).is_none());
    }
}
