//! What a pod needs to assume its cloud identity with a projected service-account token, and
//! the JSON Patch that gives it that: pure functions, no I/O.
//!
//! One file per cloud ([`aws`], [`azure`], [`gcp`]) turns a ServiceAccount's annotations (and
//! the agent's defaults) into an [`Injection`]: a projected token volume, its mount, and the
//! environment variables the cloud's SDKs read. [`patch`] turns an injection into RFC 6902
//! operations for one pod; `irsa-agent pod-config` prints the same injection as manifests for
//! people who do not want a webhook.
//!
//! The rules are those of the webhooks people already use, so existing manifests and Helm
//! charts keep working (README, "Pod identity"):
//!
//! * **Never override.** A variable, volume or mount the pod already has is kept. Variables go
//!   in groups (AWS: `AWS_ROLE_ARN` with `AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_REGION` with
//!   `AWS_DEFAULT_REGION`): a group is added only when none of its names is set. Volumes and
//!   mounts are matched by name.
//! * **Idempotent.** Patching an already patched pod adds nothing, so the webhook can be
//!   reinvoked (`reinvocationPolicy: IfNeeded`) after other webhooks add containers.
//! * **Targeted.** Only `add` operations at the exact place (`/spec/volumes/-`,
//!   `/spec/containers/2/env/-`), never a whole array rewritten: fields this agent does not
//!   know survive. (amazon-eks-pod-identity-webhook replaces `/spec/containers` whole.)
//! * Init containers and containers both, in that order; ephemeral containers never; names in
//!   the pod's skip-containers annotation are left alone.

pub mod admission;
pub mod aws;
pub mod azure;
pub mod gcp;

use serde_json::{Value, json};

/// Variables added together or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvGroup(pub Vec<(String, String)>);

impl EnvGroup {
    pub fn one(name: &str, value: impl Into<String>) -> EnvGroup {
        EnvGroup(vec![(name.to_string(), value.into())])
    }
}

/// What one cloud adds to a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// The volume (`{name, projected: ...}`).
    pub volume: Value,
    /// The volume mount added to each container (`{name, mountPath, readOnly}`).
    pub mount: Value,
    /// Variables, in the order they are added.
    pub env: Vec<EnvGroup>,
    /// AWS: a container that already sets every group is left alone, its mount included
    /// (amazon-eks-pod-identity-webhook does the same).
    pub leave_fully_configured: bool,
    /// Containers (and init containers) not to touch.
    pub skip_containers: Vec<String>,
}

impl Injection {
    fn volume_name(&self) -> &str {
        self.volume["name"].as_str().unwrap_or_default()
    }
}

/// `~` and `/` escaped for a JSON Pointer segment (RFC 6901).
pub fn pointer_segment(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn has_named(list: Option<&Value>, name: &str) -> bool {
    list.and_then(Value::as_array)
        .is_some_and(|items| items.iter().any(|i| i["name"] == name))
}

/// Appends `item` to the array at `path` (created when absent) as JSON Patch operations.
fn append(ops: &mut Vec<Value>, exists: bool, path: &str, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    if exists {
        for item in items {
            ops.push(json!({"op": "add", "path": format!("{path}/-"), "value": item}));
        }
    } else {
        ops.push(json!({"op": "add", "path": path, "value": items}));
    }
}

/// The RFC 6902 operations that add `injection` to `pod` (see the module docs). Empty when
/// the pod already has everything.
pub fn patch(pod: &Value, injection: &Injection) -> Vec<Value> {
    let mut ops = Vec::new();
    let spec = &pod["spec"];
    let mut mounted_anywhere = false;
    for kind in ["initContainers", "containers"] {
        let Some(containers) = spec[kind].as_array() else {
            continue;
        };
        for (i, container) in containers.iter().enumerate() {
            let name = container["name"].as_str().unwrap_or_default();
            if injection.skip_containers.iter().any(|s| s == name) {
                continue;
            }
            let env = container.get("env").filter(|e| e.is_array());
            let set = |var: &str| has_named(env, var);
            let missing: Vec<&EnvGroup> = injection
                .env
                .iter()
                .filter(|g| !g.0.iter().any(|(n, _)| set(n)))
                .collect();
            if injection.leave_fully_configured && missing.is_empty() {
                continue;
            }
            let base = format!("/spec/{kind}/{i}");
            let values: Vec<Value> = missing
                .iter()
                .flat_map(|g| g.0.iter())
                .map(|(n, v)| json!({"name": n, "value": v}))
                .collect();
            append(&mut ops, env.is_some(), &format!("{base}/env"), values);
            let mounts = container.get("volumeMounts").filter(|m| m.is_array());
            let mount_name = injection.mount["name"].as_str().unwrap_or_default();
            if !has_named(mounts, mount_name) {
                append(
                    &mut ops,
                    mounts.is_some(),
                    &format!("{base}/volumeMounts"),
                    vec![injection.mount.clone()],
                );
            }
            mounted_anywhere = true;
        }
    }
    let volumes = spec.get("volumes").filter(|v| v.is_array());
    if mounted_anywhere && !has_named(volumes, injection.volume_name()) {
        // The volume first: mounts refer to it (JSON Patch applies in order, and the
        // apiserver validates the result as a whole, but a reader expects it first).
        let mut volume_ops = Vec::new();
        append(
            &mut volume_ops,
            volumes.is_some(),
            "/spec/volumes",
            vec![injection.volume.clone()],
        );
        volume_ops.extend(ops);
        ops = volume_ops;
    }
    ops
}

/// Applies `add` operations (the only kind [`patch`] makes) to a pod, as the apiserver would:
/// for `pod-config`'s preview and for tests.
pub fn apply(pod: &Value, ops: &[Value]) -> Result<Value, String> {
    let mut out = pod.clone();
    for op in ops {
        if op["op"] != "add" {
            return Err(format!("unsupported operation {op}"));
        }
        let path = op["path"].as_str().ok_or("operation without a path")?;
        let (parent, last) = path.rsplit_once('/').ok_or("bad path")?;
        let target = out
            .pointer_mut(parent)
            .ok_or_else(|| format!("{parent} does not exist"))?;
        let value = op["value"].clone();
        match target {
            Value::Array(items) if last == "-" => items.push(value),
            Value::Array(items) => {
                let i: usize = last.parse().map_err(|_| format!("bad index in {path}"))?;
                if i > items.len() {
                    return Err(format!("index out of range in {path}"));
                }
                items.insert(i, value);
            }
            Value::Object(map) => {
                map.insert(last.replace("~1", "/").replace("~0", "~"), value);
            }
            _ => return Err(format!("{parent} is not an array or object")),
        }
    }
    Ok(out)
}

/// A projected service-account token volume.
pub fn token_volume(name: &str, audience: &str, expiration: u64, path: &str) -> Value {
    json!({
        "name": name,
        "projected": {
            "sources": [{
                "serviceAccountToken": {
                    "audience": audience,
                    "expirationSeconds": expiration,
                    "path": path,
                }
            }]
        }
    })
}

/// A read-only volume mount.
pub fn read_only_mount(name: &str, path: &str) -> Value {
    json!({"name": name, "mountPath": path, "readOnly": true})
}

/// Splits a skip-containers annotation at `separator`, trimming each name.
pub fn split_names(value: Option<&str>, separator: char) -> Vec<String> {
    value
        .map(|v| {
            v.split(separator)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The annotations (or labels) of an object, as `(key, value)` look-ups.
pub fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object["metadata"]["annotations"][key].as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injection() -> Injection {
        Injection {
            volume: token_volume("tok", "aud", 3600, "token"),
            mount: read_only_mount("tok", "/var/run/tok"),
            env: vec![
                EnvGroup(vec![("A".into(), "1".into()), ("B".into(), "2".into())]),
                EnvGroup::one("C", "3"),
            ],
            leave_fully_configured: false,
            skip_containers: vec!["sidecar".into()],
        }
    }

    #[test]
    fn adds_volume_mounts_and_env_groups_without_overriding_and_is_idempotent() {
        let pod = json!({"spec": {
            "initContainers": [{"name": "init"}],
            "containers": [
                {"name": "app", "env": [{"name": "B", "value": "mine"}], "x-unknown": 1},
                {"name": "sidecar"}
            ],
            "volumes": [{"name": "data", "emptyDir": {}}]
        }});
        let ops = patch(&pod, &injection());
        let patched = apply(&pod, &ops).expect("applies");
        assert_eq!(patched["spec"]["volumes"][1]["name"], "tok");
        // B was set: its group (A, B) is not added; C is.
        assert_eq!(
            patched["spec"]["containers"][0]["env"],
            json!([{"name": "B", "value": "mine"}, {"name": "C", "value": "3"}])
        );
        assert_eq!(patched["spec"]["containers"][0]["x-unknown"], 1);
        assert_eq!(
            patched["spec"]["initContainers"][0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}, {"name": "C", "value": "3"}])
        );
        assert_eq!(
            patched["spec"]["initContainers"][0]["volumeMounts"][0]["mountPath"],
            "/var/run/tok"
        );
        assert_eq!(patched["spec"]["containers"][1], json!({"name": "sidecar"}));
        assert!(ops.iter().all(|op| op["op"] == "add"));
        assert_eq!(patch(&patched, &injection()), Vec::<Value>::new());
    }

    #[test]
    fn a_pod_whose_containers_are_all_skipped_gets_no_volume() {
        let pod = json!({"spec": {"containers": [{"name": "sidecar"}]}});
        assert!(patch(&pod, &injection()).is_empty());
    }

    #[test]
    fn fully_configured_containers_are_left_alone_when_the_cloud_says_so() {
        let mut inj = injection();
        inj.leave_fully_configured = true;
        let pod = json!({"spec": {"containers": [{"name": "app", "env": [
            {"name": "A", "value": "x"}, {"name": "C", "value": "y"}
        ]}]}});
        assert!(patch(&pod, &inj).is_empty());
    }
}
