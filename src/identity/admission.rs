//! The mutating admission webhook's answer: an `AdmissionReview` (v1) request in, the review
//! with its response out. Pure: the ServiceAccount comes from a look-up the caller provides (the
//! webhook's cache), so an answer never waits on the API.
//!
//! * The response echoes the request's `apiVersion` and `kind` (amazon-eks-pod-identity-webhook
//!   releases up to v0.6.17 did not, and k3s and kubeadm apiservers refuse such answers).
//! * A pod in a skipped namespace, of an unknown ServiceAccount, or with nothing to inject is
//!   allowed unchanged. Every cloud that applies adds its injection (a pod may use several).
//! * A pod is refused only where upstream refuses it too (an Azure token lifetime out of range,
//!   a malformed GCP provider), with the reason; a request that is not a pod review is refused
//!   with the reason.

use base64::Engine as _;
use serde_json::{Value, json};

use super::{aws, azure, gcp, patch};

/// What the webhook injects by default, and where it never acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub aws: aws::Defaults,
    pub azure: azure::Defaults,
    /// Namespaces whose pods are never changed (kube-system by default).
    pub skip_namespaces: Vec<String>,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            aws: aws::Defaults::default(),
            azure: azure::Defaults::default(),
            skip_namespaces: vec!["kube-system".into()],
        }
    }
}

/// The patch for one pod of `namespace` whose ServiceAccount is `sa` (`None`: not cached).
pub fn pod_patch(
    pod: &Value,
    sa: Option<&Value>,
    defaults: &Defaults,
) -> Result<Vec<Value>, String> {
    let Some(sa) = sa else {
        return Ok(Vec::new());
    };
    let mut ops = Vec::new();
    let injections: Vec<_> = [
        aws::injection(sa, pod, &defaults.aws),
        azure::injection(sa, pod, &defaults.azure)?,
        gcp::injection(sa, pod)?,
    ]
    .into_iter()
    .flatten()
    .collect();
    // The pod is copied only when a second cloud must see what the first added (a review is
    // answered on the request path: a copy of a whole pod per review was a fifth of its CPU).
    let mut changed: Option<Value> = None;
    let last = injections.len().saturating_sub(1);
    for (i, injection) in injections.iter().enumerate() {
        // Each cloud sees the pod as the previous one left it, so two never add one path twice.
        let current = changed.as_ref().unwrap_or(pod);
        let more = patch(current, injection);
        if i < last {
            changed = Some(super::apply(current, &more)?);
        }
        ops.extend(more);
    }
    Ok(ops)
}

/// Answers one `AdmissionReview` body. `service_account(namespace, name)` is the cache look-up.
pub fn review(
    body: &[u8],
    defaults: &Defaults,
    service_account: impl Fn(&str, &str) -> Option<Value>,
) -> Value {
    match serde_json::from_slice(body) {
        Ok(request) => review_parsed(&request, defaults, service_account),
        Err(e) => refused(&Value::Null, "", format!("not an AdmissionReview: {e}")),
    }
}

/// [`review`] of a body already parsed as JSON.
pub fn review_parsed(
    request: &Value,
    defaults: &Defaults,
    service_account: impl Fn(&str, &str) -> Option<Value>,
) -> Value {
    let api_version = request["apiVersion"]
        .as_str()
        .unwrap_or("admission.k8s.io/v1");
    let uid = request["request"]["uid"].as_str().unwrap_or_default();
    let req = &request["request"];
    if req["kind"]["kind"] != "Pod" || request["kind"] != "AdmissionReview" {
        return refused(
            request,
            uid,
            "only AdmissionReviews of pods are handled here".into(),
        );
    }
    let namespace = req["namespace"].as_str().unwrap_or_default();
    let answer = |response: Value| json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response});
    if defaults.skip_namespaces.iter().any(|n| n == namespace) {
        return answer(json!({"uid": uid, "allowed": true}));
    }
    let pod = &req["object"];
    let sa_name = pod["spec"]["serviceAccountName"]
        .as_str()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let sa = service_account(namespace, sa_name);
    match pod_patch(pod, sa.as_ref(), defaults) {
        Ok(ops) if ops.is_empty() => answer(json!({"uid": uid, "allowed": true})),
        Ok(ops) => {
            let bytes = serde_json::to_vec(&ops).unwrap_or_default();
            answer(json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            }))
        }
        Err(message) => refused(request, uid, message),
    }
}

fn refused(request: &Value, uid: &str, message: String) -> Value {
    json!({
        "apiVersion": request["apiVersion"].as_str().unwrap_or("admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": false, "status": {"code": 400, "message": message}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(namespace: &str, pod: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": namespace,
                "operation": "CREATE",
                "object": pod,
            }
        }))
        .unwrap_or_default()
    }

    fn sa(_: &str, name: &str) -> Option<Value> {
        (name == "s3-reader").then(|| {
            json!({"metadata": {"name": name, "annotations": {
                aws::ROLE_ARN: "arn:aws:iam::123456789012:role/s3-reader",
                azure::CLIENT_ID: "c",
            }}})
        })
    }

    #[test]
    fn echoes_the_review_type_and_patches_annotated_pods_only() {
        let pod = json!({"metadata": {"labels": {azure::USE_LABEL: "true"}},
            "spec": {"serviceAccountName": "s3-reader", "containers": [{"name": "app"}]}});
        let out = review(&request("prod", pod.clone()), &Defaults::default(), sa);
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(
            out["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(out["response"]["allowed"], true);
        let ops: Vec<Value> = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap_or_default())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let patched = super::super::apply(&pod, &ops).expect("applies");
        let env = patched["spec"]["containers"][0]["env"]
            .as_array()
            .map(Vec::len);
        // AWS: regional STS, role ARN, token file (no region configured); Azure: client id,
        // token file, authority host (no tenant configured or annotated).
        assert_eq!(env, Some(6), "{patched}");
        assert_eq!(patched["spec"]["volumes"].as_array().map(Vec::len), Some(2));
        // Reinvoked on its own result: nothing more.
        let again = review(&request("prod", patched), &Defaults::default(), sa);
        assert!(again["response"].get("patch").is_none(), "{again}");

        for (ns, pod) in [
            (
                "kube-system",
                json!({"spec": {"serviceAccountName": "s3-reader", "containers": [{"name": "a"}]}}),
            ),
            ("prod", json!({"spec": {"containers": [{"name": "a"}]}})),
        ] {
            let out = review(&request(ns, pod), &Defaults::default(), sa);
            assert_eq!(out["response"]["allowed"], true);
            assert!(out["response"].get("patch").is_none(), "{out}");
        }
    }

    #[test]
    fn garbage_and_other_kinds_are_refused_with_the_reason() {
        let out = review(b"{", &Defaults::default(), sa);
        assert_eq!(out["response"]["allowed"], false);
        assert!(
            out["response"]["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("not an AdmissionReview"))
        );
        let mut body: Value =
            serde_json::from_slice(&request("prod", json!({}))).unwrap_or_default();
        body["request"]["kind"]["kind"] = "Secret".into();
        let out = review(
            &serde_json::to_vec(&body).unwrap_or_default(),
            &Defaults::default(),
            sa,
        );
        assert_eq!(out["response"]["allowed"], false);
    }
}
