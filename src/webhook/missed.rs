//! Pods the webhook missed: created while no agent answered (`failurePolicy: Ignore` lets
//! the apiserver create them bare), so they run without the identity their ServiceAccount
//! names. The daemon looks for them periodically ([`super::kube_sync`]) and `doctor` once;
//! both decide with [`find`], which asks the webhook's own rule: would the webhook change
//! this pod if it were created now? A pod it did mutate answers no (the injection is
//! idempotent), so only the missed ones (and pods created before their ServiceAccount was
//! annotated, which lack the identity just the same) are named. The fix is the same for
//! both: delete the pod; its controller recreates it through the webhook.

use serde_json::Value;

use crate::identity::admission::{self, Defaults};

/// The pod label that opts a pod out of the webhook (the registration's objectSelector).
pub const SKIP_LABEL: &str = "eks.amazonaws.com/skip-pod-identity-webhook";
/// The Event reason on a missed pod.
pub const EVENT_REASON: &str = "IdentityNotInjected";

/// One pod without the identity its ServiceAccount names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl Missed {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What to do about it.
    pub fn fix(&self) -> String {
        format!(
            "kubectl delete pod -n {} {} (its controller recreates it, and the webhook injects the identity of ServiceAccount {})",
            self.namespace, self.name, self.service_account
        )
    }
}

/// The pods among `pods` (full Pod objects, as the API lists them) the webhook would change
/// now: those it missed. Finished and terminating pods, pods opted out by label and pods
/// of skipped namespaces are not counted; a ServiceAccount whose annotation the webhook
/// would refuse is not either (such a pod was never going to get an identity).
pub fn find<'a>(
    pods: impl IntoIterator<Item = &'a Value>,
    defaults: &Defaults,
    service_account: impl Fn(&str, &str) -> Option<Value>,
) -> Vec<Missed> {
    let mut out = Vec::new();
    for pod in pods {
        let meta = &pod["metadata"];
        let (Some(namespace), Some(name)) = (meta["namespace"].as_str(), meta["name"].as_str())
        else {
            continue;
        };
        if defaults.skip_namespaces.iter().any(|n| n == namespace)
            || !meta["deletionTimestamp"].is_null()
            || !meta["labels"][SKIP_LABEL].is_null()
            || matches!(
                pod["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            )
        {
            continue;
        }
        let sa_name = pod["spec"]["serviceAccountName"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let Some(sa) = service_account(namespace, sa_name) else {
            continue;
        };
        if admission::pod_patch(pod, Some(&sa), defaults).is_ok_and(|ops| !ops.is_empty()) {
            out.push(Missed {
                namespace: namespace.to_string(),
                name: name.to_string(),
                uid: meta["uid"].as_str().unwrap_or_default().to_string(),
                service_account: sa_name.to_string(),
            });
        }
    }
    out
}

/// The words for a list of missed pods (the first few named).
pub fn summary(missed: &[String]) -> String {
    const NAMED: usize = 5;
    let mut text = missed
        .iter()
        .take(NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if missed.len() > NAMED {
        text.push_str(&format!(" and {} more", missed.len() - NAMED));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sa() -> Value {
        json!({"metadata": {"namespace": "prod", "name": "s3", "annotations": {
            "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/s3"}}})
    }

    fn pod(name: &str, extra: Value) -> Value {
        let mut p = json!({"metadata": {"namespace": "prod", "name": name, "uid": format!("u-{name}")},
            "spec": {"serviceAccountName": "s3", "containers": [{"name": "app", "image": "x"}]},
            "status": {"phase": "Running"}});
        if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                p.insert(k.clone(), v.clone());
            }
        }
        p
    }

    #[test]
    fn only_pods_the_webhook_would_still_change_are_missed() {
        let defaults = Defaults::default();
        let lookup = |ns: &str, name: &str| (ns == "prod" && name == "s3").then(sa);
        let bare = pod("bare", json!({}));
        // The pod as the webhook would have left it: nothing more to do.
        let ops = admission::pod_patch(&bare, Some(&sa()), &defaults).expect("patch");
        let mutated = crate::identity::apply(&bare, &ops).expect("apply");
        let mut mutated = mutated;
        mutated["metadata"]["name"] = json!("mutated");
        let done = pod("done", json!({"status": {"phase": "Succeeded"}}));
        let opted_out = pod(
            "opted-out",
            json!({"metadata": {"namespace": "prod", "name": "opted-out", "labels": {SKIP_LABEL: "true"}}}),
        );
        let mut other_sa = pod("other", json!({}));
        other_sa["spec"]["serviceAccountName"] = json!("plain");
        let mut system = pod("system", json!({}));
        system["metadata"]["namespace"] = json!("kube-system");
        let pods = [bare, mutated, done, opted_out, other_sa, system];
        let missed = find(pods.iter(), &defaults, lookup);
        let names: Vec<String> = missed.iter().map(Missed::key).collect();
        assert_eq!(names, vec!["prod/bare"]);
        assert_eq!(missed[0].uid, "u-bare");
        assert!(missed[0].fix().contains("kubectl delete pod -n prod bare"));
    }

    #[test]
    fn the_summary_names_the_first_five() {
        let names: Vec<String> = (0..7).map(|i| format!("prod/p{i}")).collect();
        assert_eq!(
            summary(&names),
            "prod/p0, prod/p1, prod/p2, prod/p3, prod/p4 and 2 more"
        );
        assert_eq!(summary(&names[..1]), "prod/p0");
    }
}
