//! `webhook:`: the mutating admission webhook the daemon serves (README, "Pod identity
//! webhook"). Every key is optional; a later file replaces a key on its own (like `run:`).
//!
//! ```yaml
//! webhook:
//!   enabled: true                 # default false
//!   listen: 127.0.0.1:9443        # the apiserver on this host calls https://127.0.0.1:9443/mutate
//!   failure-policy: Ignore        # or Fail
//!   timeout: 3s                   # the apiserver's timeoutSeconds (1s to 30s)
//!   skip-namespaces: [kube-system]
//!   aws:
//!     region: eu-west-1           # AWS_REGION / AWS_DEFAULT_REGION (none when unset)
//!     regional-sts: true          # AWS_STS_REGIONAL_ENDPOINTS=regional
//!     audience: sts.amazonaws.com
//!     token-expiration: 24h       # at least 10m
//!   azure:
//!     authority-host: https://login.microsoftonline.com/
//!     tenant-id: 00000000-0000-0000-0000-000000000000
//! ```
//!
//! Off by default: serving it means every pod create in the cluster passes through this host's
//! agent, and the registration changes how the cluster admits pods. That is a decision to take
//! on purpose, not something a package upgrade should do.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::Origin;
use super::fields::{Fields, Problem, format_duration};
use crate::identity::{admission, aws, azure};

/// The default port. Not used by k3s, RKE2 or kubeadm (6443, 6444, 9345, 2379-2381,
/// 10248-10260, 10010); controller-runtime webhooks default to it inside pods, which only
/// matters for a `hostNetwork` pod on a control-plane host.
pub const DEFAULT_PORT: u16 = 9443;

/// What the apiserver does when the agent cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// The pod is created without the injection (amazon-eks-pod-identity-webhook's choice).
    Ignore,
    /// The pod create is refused; controllers retry until an agent answers.
    Fail,
}

impl FailurePolicy {
    pub const NAMES: [&'static str; 2] = ["Ignore", "Fail"];

    pub fn name(self) -> &'static str {
        match self {
            FailurePolicy::Ignore => "Ignore",
            FailurePolicy::Fail => "Fail",
        }
    }
}

/// The webhook's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub failure_policy: FailurePolicy,
    /// The apiserver's `timeoutSeconds`.
    pub timeout: Duration,
    /// What is injected, and the namespaces never touched.
    pub defaults: admission::Defaults,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            failure_policy: FailurePolicy::Ignore,
            timeout: Duration::from_secs(3),
            defaults: admission::Defaults::default(),
        }
    }
}

/// `webhook:` of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookFragment {
    pub enabled: Option<bool>,
    pub listen: Option<SocketAddr>,
    pub failure_policy: Option<FailurePolicy>,
    pub timeout: Option<Duration>,
    pub skip_namespaces: Option<Vec<String>>,
    pub aws_region: Option<String>,
    pub aws_regional_sts: Option<bool>,
    pub aws_audience: Option<String>,
    pub aws_token_expiration: Option<Origin<Duration>>,
    pub azure_authority_host: Option<String>,
    pub azure_tenant_id: Option<String>,
    pub azure_audience: Option<String>,
}

/// A DNS-1123 label (a namespace name).
fn is_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn non_empty(f: &mut Fields<'_>, key: &'static str, example: &str) -> Option<String> {
    let value = f.string(key)?;
    if value.trim().is_empty() || value.trim() != value {
        f.problem(
            key,
            Some(&Value::String(value)),
            format!("must not be empty or start or end with spaces, e.g. {example}"),
        );
        return None;
    }
    Some(value)
}

/// Stage 1 for `webhook:`.
pub fn parse(file: &Path, map: &Mapping, problems: &mut Vec<Problem>) -> WebhookFragment {
    let mut f = Fields::new(file, "webhook", map, problems);
    let enabled = f.bool("enabled");
    let listen = f.string("listen").and_then(|a| match a.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() && addr.port() != 0 => Some(addr),
        Ok(_) => {
            f.problem(
                "listen",
                Some(&Value::String(a)),
                "must be a loopback address with a port, such as 127.0.0.1:9443 or [::1]:9443: the apiserver on this host calls the agent there (a URL webhook), and nothing else should reach it",
            );
            None
        }
        Err(_) => {
            f.problem(
                "listen",
                Some(&Value::String(a)),
                "expected an address and port such as 127.0.0.1:9443",
            );
            None
        }
    });
    let failure_policy = f
        .choice("failure-policy", &FailurePolicy::NAMES)
        .map(|n| match n {
            "Fail" => FailurePolicy::Fail,
            _ => FailurePolicy::Ignore,
        });
    let timeout = f.duration("timeout").and_then(|t| {
        if t < Duration::from_secs(1) || t > Duration::from_secs(30) || t.subsec_nanos() != 0 {
            let raw = Value::String(format_duration(t));
            f.problem(
                "timeout",
                Some(&raw),
                "must be whole seconds between 1s and 30s (the apiserver's timeoutSeconds)",
            );
            None
        } else {
            Some(t)
        }
    });
    let skip_namespaces = f.sequence("skip-namespaces").and_then(|items| {
        let mut names = Vec::new();
        for item in items {
            match item.as_str() {
                Some(s) if is_namespace(s) => names.push(s.to_string()),
                _ => {
                    f.problem(
                        "skip-namespaces",
                        Some(item),
                        "every entry must be a namespace name (lowercase letters, digits and -), e.g. [kube-system]",
                    );
                    return None;
                }
            }
        }
        Some(names)
    });
    let mut out = WebhookFragment {
        enabled,
        listen,
        failure_policy,
        timeout,
        skip_namespaces,
        ..Default::default()
    };
    if let Some(aws_map) = f.mapping("aws") {
        let mut a = Fields::new(file, "webhook.aws", aws_map, f.problems());
        out.aws_region = a.string("region").and_then(|r| {
            let ok = !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if ok {
                Some(r)
            } else {
                a.problem(
                    "region",
                    Some(&Value::String(r)),
                    "expected an AWS region such as eu-west-1",
                );
                None
            }
        });
        out.aws_regional_sts = a.bool("regional-sts");
        out.aws_audience = non_empty(&mut a, "audience", "sts.amazonaws.com");
        out.aws_token_expiration = a.duration("token-expiration").and_then(|d| {
            if d < Duration::from_secs(aws::MIN_EXPIRATION) || d.subsec_nanos() != 0 {
                let raw = Value::String(format_duration(d));
                a.problem(
                    "token-expiration",
                    Some(&raw),
                    "must be whole seconds and at least 10m (the shortest token kube-apiserver issues)",
                );
                None
            } else {
                Some(Origin::at(file, d))
            }
        });
        a.finish();
    }
    if let Some(azure_map) = f.mapping("azure") {
        let mut a = Fields::new(file, "webhook.azure", azure_map, f.problems());
        out.azure_authority_host =
            a.string("authority-host")
                .and_then(|h| match url::Url::parse(&h) {
                    Ok(u) if u.scheme() == "https" && u.host().is_some() => Some(h),
                    _ => {
                        a.problem(
                            "authority-host",
                            Some(&Value::String(h)),
                            "expected an https URL such as https://login.microsoftonline.com/",
                        );
                        None
                    }
                });
        out.azure_tenant_id = non_empty(&mut a, "tenant-id", "the directory (tenant) ID");
        out.azure_audience = non_empty(&mut a, "audience", azure::AUDIENCE);
        a.finish();
    }
    f.finish();
    out
}

/// Stage 2: `later` replaces `earlier` key by key.
pub fn merge(earlier: WebhookFragment, later: WebhookFragment) -> WebhookFragment {
    WebhookFragment {
        enabled: later.enabled.or(earlier.enabled),
        listen: later.listen.or(earlier.listen),
        failure_policy: later.failure_policy.or(earlier.failure_policy),
        timeout: later.timeout.or(earlier.timeout),
        skip_namespaces: later.skip_namespaces.or(earlier.skip_namespaces),
        aws_region: later.aws_region.or(earlier.aws_region),
        aws_regional_sts: later.aws_regional_sts.or(earlier.aws_regional_sts),
        aws_audience: later.aws_audience.or(earlier.aws_audience),
        aws_token_expiration: later.aws_token_expiration.or(earlier.aws_token_expiration),
        azure_authority_host: later.azure_authority_host.or(earlier.azure_authority_host),
        azure_tenant_id: later.azure_tenant_id.or(earlier.azure_tenant_id),
        azure_audience: later.azure_audience.or(earlier.azure_audience),
    }
}

/// Stage 3: defaults.
pub fn validate(fragment: WebhookFragment, _problems: &mut [Problem]) -> WebhookSettings {
    let d = WebhookSettings::default();
    let mut defaults = d.defaults.clone();
    if let Some(ns) = fragment.skip_namespaces {
        defaults.skip_namespaces = ns;
    }
    defaults.aws.region = fragment.aws_region.or(defaults.aws.region);
    defaults.aws.regional_sts = fragment
        .aws_regional_sts
        .unwrap_or(defaults.aws.regional_sts);
    defaults.aws.audience = fragment.aws_audience.unwrap_or(defaults.aws.audience);
    defaults.aws.token_expiration = fragment
        .aws_token_expiration
        .map_or(defaults.aws.token_expiration, |o| o.value.as_secs());
    defaults.azure.authority_host = fragment
        .azure_authority_host
        .unwrap_or(defaults.azure.authority_host);
    defaults.azure.tenant_id = fragment.azure_tenant_id.or(defaults.azure.tenant_id);
    defaults.azure.audience = fragment.azure_audience.unwrap_or(defaults.azure.audience);
    WebhookSettings {
        enabled: fragment.enabled.unwrap_or(d.enabled),
        listen: fragment.listen.unwrap_or(d.listen),
        failure_policy: fragment.failure_policy.unwrap_or(d.failure_policy),
        timeout: fragment.timeout.unwrap_or(d.timeout),
        defaults,
    }
}

impl WebhookSettings {
    /// The names the serving certificate carries: loopback in both families, `localhost`, and
    /// the configured address.
    pub fn serving_ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> =
            vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
        if !ips.contains(&self.listen.ip()) {
            ips.push(self.listen.ip());
        }
        ips
    }

    /// The URL the apiserver calls.
    pub fn url(&self) -> String {
        format!("https://{}/mutate", self.listen)
    }

    /// The settings as check-config shows them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "enabled": self.enabled,
            "listen": self.listen.to_string(),
            "url": self.url(),
            "failure-policy": self.failure_policy.name(),
            "timeout": format_duration(self.timeout),
            "skip-namespaces": self.defaults.skip_namespaces,
            "aws": {
                "region": self.defaults.aws.region,
                "regional-sts": self.defaults.aws.regional_sts,
                "audience": self.defaults.aws.audience,
                "token-expiration": format_duration(Duration::from_secs(self.defaults.aws.token_expiration)),
            },
            "azure": {
                "authority-host": self.defaults.azure.authority_host,
                "tenant-id": self.defaults.azure.tenant_id,
                "audience": self.defaults.azure.audience,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> (WebhookFragment, Vec<Problem>) {
        let value: Value = serde_yaml::from_str(text).expect("yaml");
        let map = value.as_mapping().cloned().unwrap_or_default();
        let mut problems = Vec::new();
        let fragment = parse(
            Path::new("/etc/irsa-agent/config.yaml"),
            &map,
            &mut problems,
        );
        (fragment, problems)
    }

    #[test]
    fn defaults_values_and_problems_naming_file_and_field() {
        let mut problems = Vec::new();
        let d = validate(WebhookFragment::default(), &mut problems);
        assert!(!d.enabled, "off unless asked for");
        assert_eq!(d.listen.to_string(), "127.0.0.1:9443");
        assert_eq!(d.defaults.skip_namespaces, vec!["kube-system".to_string()]);
        assert_eq!(d.failure_policy, FailurePolicy::Ignore);

        let (fragment, problems) = parse_text(
            "enabled: true\nlisten: \"[::1]:9555\"\nfailure-policy: Fail\ntimeout: 5s\nskip-namespaces: [kube-system, monitoring]\naws: {region: eu-west-1, regional-sts: false, token-expiration: 1h}\nazure: {authority-host: \"https://login.microsoftonline.us/\", tenant-id: t}\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let s = validate(fragment, &mut Vec::new());
        assert!(s.enabled);
        assert_eq!(s.url(), "https://[::1]:9555/mutate");
        assert_eq!(s.failure_policy, FailurePolicy::Fail);
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(s.defaults.aws.region.as_deref(), Some("eu-west-1"));
        assert!(!s.defaults.aws.regional_sts);
        assert_eq!(s.defaults.aws.token_expiration, 3600);
        assert_eq!(s.defaults.azure.tenant_id.as_deref(), Some("t"));
        assert_eq!(s.defaults.skip_namespaces.len(), 2);
        assert_eq!(s.serving_ips().len(), 2, "::1 is already there");

        let (_, problems) = parse_text(
            "listen: 0.0.0.0:9443\nfailure-policy: ignore\ntimeout: 1m\nskip-namespaces: [Kube_System]\naws: {token-expiration: 5m, regoin: x}\nazure: {authority-host: \"http://x\"}\n",
        );
        let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
        for key in [
            "webhook.listen = \"0.0.0.0:9443\": must be a loopback",
            "webhook.failure-policy = \"ignore\": expected one of Ignore, Fail",
            "webhook.timeout",
            "webhook.skip-namespaces",
            "webhook.aws.token-expiration",
            "webhook.aws.regoin",
            "webhook.azure.authority-host",
        ] {
            assert!(
                text.iter()
                    .any(|t| t.starts_with("/etc/irsa-agent/config.yaml: ") && t.contains(key)),
                "{key} not in {text:#?}"
            );
        }
    }
}
