//! kubeadm: the apiserver flags are `spec.containers[0].command` (plus `args`, if any) of the
//! static pod manifest `/etc/kubernetes/manifests/kube-apiserver.yaml`.
//!
//! kubeadm 1.28 to 1.33 write the command as a block list, `kube-apiserver` first, then every
//! flag as one `--name=value` item sorted by name. Edits keep that shape: a changed flag's items
//! are replaced where the first of them was; a new flag goes to its sorted position. kubelet
//! restarts the pod when the file changes, and reads every non-dot file in the folder, so
//! backups and temp files never go there.
//!
//! `kubeadm upgrade` regenerates the manifest from the kubeadm-config ConfigMap: [`persistence`]
//! prints the ClusterConfiguration and the patch that make the change survive it.

use std::path::PathBuf;

use serde_yaml::Value;

use super::edit::{self, Document, Item, Locator};
use super::flags::{self, Arg};
use super::{FileChange, ObserveError, PlanError};
use crate::host::HostRoot;

pub const MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";
pub const MANIFEST_DIR: &str = "/etc/kubernetes/manifests";
pub const ADMIN_KUBECONFIG: &str = "/etc/kubernetes/admin.conf";

/// What the manifest says.
#[derive(Debug, Clone)]
pub struct Observed {
    pub path: PathBuf,
    pub text: String,
    /// `spec.containers[0].command`.
    pub command: Vec<String>,
    /// `spec.containers[0].args` (kubeadm does not write it; hand edits might).
    pub extra_args: Vec<String>,
    /// The effective arguments (command flags, then args).
    pub args: Vec<Arg>,
    /// The Kubernetes version of the image (`registry.k8s.io/kube-apiserver:v1.31.2`).
    pub version: Option<(u32, u32, u32)>,
    /// The cluster's DNS domain as kubelet has it (`clusterDomain:` of
    /// /var/lib/kubelet/config.yaml, which kubeadm writes from networking.dnsDomain); the
    /// default issuer is `https://kubernetes.default.svc.<it>`. `None`: not known here.
    pub cluster_domain: Option<String>,
}

/// Where kubeadm writes the kubelet's configuration.
pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";

/// `clusterDomain:` of the kubelet configuration, when it is there and looks like a DNS
/// domain. A hint only: anything unreadable is `None` (the default `cluster.local` is assumed).
pub fn kubelet_cluster_domain(root: &HostRoot) -> Option<String> {
    let bytes = crate::fs::read_optional(&root.path(KUBELET_CONFIG)).ok()??;
    let value: serde_yaml::Value = serde_yaml::from_slice(&bytes).ok()?;
    let domain = value.get("clusterDomain")?.as_str()?.trim_end_matches('.');
    let valid = !domain.is_empty()
        && domain.len() <= 253
        && domain
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    valid.then(|| domain.to_ascii_lowercase())
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(items)) => items.iter().filter_map(edit::scalar_string).collect(),
        _ => Vec::new(),
    }
}

/// Parses `v1.31.2` / `v1.33.0-rc.1` at the end of an image reference.
pub fn image_version(image: &str) -> Option<(u32, u32, u32)> {
    let tag = image.rsplit(':').next()?;
    let tag = tag.split('@').next()?;
    let tag = tag.strip_prefix('v')?;
    let mut parts = tag.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// Reads the manifest text.
pub fn parse(path: PathBuf, text: String) -> Result<Observed, ObserveError> {
    let value: Value = crate::yaml::from_str(&text).map_err(|e| ObserveError::File {
        path: path.clone(),
        message: e.after_path(),
    })?;
    let container = value
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(|c| c.get(0))
        .ok_or_else(|| ObserveError::File {
            path: path.clone(),
            message: "has no spec.containers[0]: is it a kube-apiserver static pod manifest?"
                .into(),
        })?;
    let command = strings(container.get("command"));
    let extra_args = strings(container.get("args"));
    if command.is_empty() && extra_args.is_empty() {
        return Err(ObserveError::File {
            path,
            message: "spec.containers[0] has no command: cannot tell the apiserver's flags".into(),
        });
    }
    let mut all = command.clone();
    all.extend(extra_args.iter().cloned());
    let args = flags::parse_command(&all)
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    let version = container
        .get("image")
        .and_then(Value::as_str)
        .and_then(image_version);
    Ok(Observed {
        path,
        text,
        command,
        extra_args,
        args,
        version,
        cluster_domain: None,
    })
}

pub fn observe(root: &HostRoot) -> Result<Observed, ObserveError> {
    let path = PathBuf::from(MANIFEST);
    let text = crate::fs::read_to_string(root.path(&path)).map_err(|e| ObserveError::File {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let mut observed = parse(path, text)?;
    observed.cluster_domain = kubelet_cluster_domain(root);
    Ok(observed)
}

/// The manifest edit that gives the managed flags `changes` (flag name -> desired values).
pub fn edits(
    obs: &Observed,
    changes: &[(&'static str, Vec<String>)],
) -> Result<Vec<FileChange>, PlanError> {
    let edit_err = |e| PlanError::Edit {
        path: obs.path.clone(),
        source: e,
    };
    // Managed flags given in `args:` cannot be fixed by editing `command:`.
    let in_args: Vec<String> = flags::parse_command(&obs.extra_args)
        .into_iter()
        .map(|(a, _)| a.name)
        .filter(|n| changes.iter().any(|(f, _)| f == n))
        .collect();
    if !in_args.is_empty() {
        return Err(PlanError::Unsupported(format!(
            "{}: spec.containers[0].args sets --{}; move it into `command:` so irsa-agent can manage it",
            obs.path.display(),
            in_args.join(", --")
        )));
    }
    let parsed = flags::parse_command(&obs.command);
    let mut removed: Vec<usize> = Vec::new();
    let mut inserts: Vec<(usize, String)> = Vec::new();
    for (flag, values) in changes {
        let rendered: Vec<String> = flags::render_managed(flag, values)
            .iter()
            .map(Arg::render)
            .collect();
        let existing: Vec<&(Arg, Vec<usize>)> =
            parsed.iter().filter(|(a, _)| a.name == *flag).collect();
        for (_, idx) in &existing {
            removed.extend(idx.iter().copied());
        }
        let at = match existing.first() {
            Some((_, idx)) => idx[0],
            None => sorted_position(&obs.command, flag),
        };
        inserts.extend(rendered.into_iter().map(|r| (at, r)));
    }
    let doc = Document::parse(&obs.text).map_err(edit_err)?;
    let (loc, _) = doc
        .locate(Locator::ContainerCommand)
        .map_err(edit_err)?
        .ok_or_else(|| edit_err(edit::EditError::Unsupported("no command list".into())))?;
    if loc.items.len() != obs.command.len() {
        return Err(edit_err(edit::EditError::Unsupported(
            "the command list could not be matched to the file".into(),
        )));
    }
    let items = super::rancher::build_items(loc.items.len(), &removed, &inserts);
    let expected: Vec<String> = items
        .iter()
        .map(|i| match i {
            Item::Keep(k) => loc.items[*k].value.clone(),
            Item::New(v) => v.clone(),
        })
        .collect();
    let new_text = edit::edit_list(&doc, &loc, &items).map_err(edit_err)?;
    edit::check_only_list_changed(&doc.value, &new_text, Locator::ContainerCommand, &expected)
        .map_err(edit_err)?;
    Ok(vec![FileChange {
        path: obs.path.clone(),
        old: Some(obs.text.clone()),
        new: new_text,
    }])
}

/// Where kubeadm's sorted list would put `--flag`: before the first flag item whose name sorts
/// after it (the binary name stays first), or at the end.
fn sorted_position(command: &[String], flag: &str) -> usize {
    for (i, item) in command.iter().enumerate() {
        if let Some((name, _)) = flags::split_flag(item)
            && name > flag
        {
            return i;
        }
    }
    command.len()
}

/// Whether a kubeadm release sorts repeated `extraArgs` by value (kubeadm#3261, fixed by
/// kubernetes PR #135400 in 1.36 and backported to the 1.32-1.35 patch releases of early 2026).
pub fn sorts_extra_args(version: (u32, u32, u32)) -> SortRisk {
    match version {
        (1, minor, _) if minor < 31 => SortRisk::MapOnly,
        (1, 31, _) => SortRisk::Sorts,
        (1, 32..=35, _) => SortRisk::SortsBeforeBackport,
        _ => SortRisk::None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortRisk {
    /// v1beta3: `extraArgs` is a map, one issuer only.
    MapOnly,
    /// 1.31: repeated extraArgs are sorted by value.
    Sorts,
    /// 1.32-1.35: sorted unless the patch release has the backport.
    SortsBeforeBackport,
    None,
}

/// The text that tells a kubeadm user how to make the change survive `kubeadm upgrade`.
pub fn persistence(
    issuers: &[String],
    audiences: &[String],
    jwks_uri: &str,
    version: Option<(u32, u32, u32)>,
) -> String {
    let mut out = String::new();
    out.push_str(
        "kubeadm upgrade regenerates kube-apiserver.yaml from the kubeadm-config ConfigMap and drops hand edits \
(irsa-agent re-applies them on its next run, with one more apiserver restart). To make the change permanent, \
put it in the ClusterConfiguration (kubectl -n kube-system edit configmap kubeadm-config):\n\n",
    );
    out.push_str("apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\napiServer:\n  extraArgs:\n");
    let mut push = |name: &str, value: &str| {
        out.push_str(&format!(
            "  - name: {name}\n    value: {}\n",
            yaml_value(value)
        ));
    };
    for issuer in issuers {
        push(flags::ISSUER, issuer);
    }
    push(flags::AUDIENCES, &audiences.join(","));
    push(flags::JWKS_URI, jwks_uri);
    let mut sorted = issuers.to_vec();
    sorted.sort();
    let sorting_hurts = issuers.len() > 1 && sorted.first() != issuers.first();
    let risk = version.map(sorts_extra_args);
    if sorting_hurts || matches!(risk, Some(SortRisk::MapOnly)) {
        if let Some(risk) = risk {
            let (maj, min, pat) = version.unwrap_or_default();
            match risk {
                SortRisk::MapOnly => out.push_str(&format!(
                    "\nwarning: this cluster runs Kubernetes {maj}.{min}.{pat}: kubeadm before 1.31 (v1beta3) keeps extraArgs in a map, so only one service-account-issuer survives an upgrade (kubeadm#2735). Use the patch below.\n"
                )),
                SortRisk::Sorts => out.push_str(&format!(
                    "\nwarning: kubeadm {maj}.{min} sorts repeated extraArgs by value (kubeadm#3261): after an upgrade {} would sign instead of {}. Use the patch below.\n",
                    sorted[0], issuers[0]
                )),
                SortRisk::SortsBeforeBackport => out.push_str(&format!(
                    "\nwarning: kubeadm {maj}.{min} releases before the early-2026 patch releases (the backport of kubernetes#135400) sort repeated extraArgs by value (kubeadm#3261): after an upgrade {} would sign instead of {}. Check `kubeadm version` and the release notes (\"do not sort extraArgs\"), or use the patch below.\n",
                    sorted[0], issuers[0]
                )),
                SortRisk::None => {}
            }
        } else {
            out.push_str(&format!(
                "\nwarning: kubeadm 1.31 and the 1.32-1.35 releases before the early-2026 patch releases sort repeated extraArgs by value (kubeadm#3261): after an upgrade {} would sign instead of {}. Use the patch below with such a kubeadm.\n",
                sorted[0], issuers[0]
            ));
        }
    }
    out.push_str(
        "\nWith any kubeadm (v1beta3 or v1beta4, sorting or not): set only the first issuer in extraArgs \
(service-account-issuer, api-audiences and service-account-jwks-uri as above, one issuer), and append the \
others with a patch, /etc/kubernetes/patches/kube-apiserver+json.yaml:\n\n",
    );
    for issuer in issuers.iter().skip(1) {
        out.push_str(&format!(
            "- op: add\n  path: /spec/containers/0/command/-\n  value: {}\n",
            yaml_value(&format!("--{}={issuer}", flags::ISSUER))
        ));
    }
    out.push_str(
        "\nthen upgrade with `kubeadm upgrade apply|node --patches /etc/kubernetes/patches` (or `patches.directory` in the UpgradeConfiguration).\n",
    );
    out
}

fn yaml_value(v: &str) -> String {
    if v.contains([':', '#', '"', '\'']) || v.starts_with(['-', '*', '&', '!', '[', '{']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_sorting() {
        assert_eq!(
            image_version("registry.k8s.io/kube-apiserver:v1.31.2"),
            Some((1, 31, 2))
        );
        assert_eq!(
            image_version("my.registry:5000/kube-apiserver:v1.33.0-rc.1"),
            Some((1, 33, 0))
        );
        assert_eq!(image_version("kube-apiserver"), None);
        assert_eq!(sorts_extra_args((1, 30, 4)), SortRisk::MapOnly);
        assert_eq!(sorts_extra_args((1, 31, 9)), SortRisk::Sorts);
        assert_eq!(sorts_extra_args((1, 36, 0)), SortRisk::None);
    }

    #[test]
    fn sorted_positions() {
        let cmd: Vec<String> = [
            "kube-apiserver",
            "--advertise-address=1",
            "--secure-port=6443",
            "--tls-cert-file=x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(sorted_position(&cmd, "api-audiences"), 2);
        assert_eq!(sorted_position(&cmd, "service-account-jwks-uri"), 3);
        assert_eq!(sorted_position(&cmd, "zzz"), 4);
    }
}
