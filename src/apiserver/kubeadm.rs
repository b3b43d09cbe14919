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

use std::path::{Path, PathBuf};

use serde_yaml::Value;

use super::edit::{self, Document, Item, Locator};
use super::flags::{self, Arg};
use super::install::{
    self, HostChange, Install, Installing, NewKeyPem, Refusal, dedup_kids, refuse,
};
use super::{FileChange, ObserveError, PlanError};
use crate::host::HostRoot;
use crate::keys::PublicKey;

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

impl Observed {
    /// The issuer kubeadm uses when none is configured (from the kubelet's cluster domain).
    pub fn default_issuer(&self) -> String {
        format!(
            "https://kubernetes.default.svc.{}",
            self.cluster_domain.as_deref().unwrap_or("cluster.local")
        )
    }

    /// The admin kubeconfig, and the URL of this host's apiserver (the manifest's
    /// `--advertise-address` and `--secure-port`; the kubeconfig may name a load balancer).
    pub fn kubeconfig(&self) -> (PathBuf, Option<String>) {
        let arg = |name: &str| {
            self.args
                .iter()
                .rev()
                .find(|a| a.name == name)
                .map(|a| a.value.clone())
        };
        let url = arg("advertise-address").map(|addr| {
            let port = arg("secure-port").unwrap_or_else(|| "6443".to_string());
            if addr.contains(':') {
                format!("https://[{addr}]:{port}")
            } else {
                format!("https://{addr}:{port}")
            }
        });
        (PathBuf::from(ADMIN_KUBECONFIG), url)
    }

    /// The file the daemon watches: the static pod manifest.
    pub fn watched(&self) -> super::Watched {
        super::Watched {
            files: vec![self.path.clone()],
            dropin_dirs: Vec::new(),
        }
    }

    /// Where a line for `flag` goes, in words, for fixes.
    pub fn flag_location(&self, _flag: &str) -> String {
        format!(
            "the kube-apiserver command in {} (and apiServer.extraArgs of the kubeadm ClusterConfiguration, so `kubeadm upgrade` keeps it)",
            self.path.display()
        )
    }

    /// The command item that sets `flag=value`.
    pub fn flag_item(flag: &str, value: &str) -> String {
        format!("- --{flag}={value}")
    }
}

/// Paths whose existence says kubeadm's control plane runs here (`distribution: auto`), and
/// the file the daemon waits for while the apiserver cannot be read yet.
pub const MARKERS: [&str; 1] = [MANIFEST];

/// How the apiserver is restarted: kubelet restarts the static pod when its manifest changes.
pub fn restart() -> super::restart::Restart {
    super::restart::Restart::KubeletStaticPod
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

// Key rotation: how a new key is installed here (see [`super::install`]): new files
// `sa-<id>.key` / `sa-<id>.pub` beside `sa.key` / `sa.pub`; trust adds
// `--service-account-key-file=.../sa-<id>.pub` and switches `--service-account-signing-key-file`
// in the static pod manifest (one apiserver: verifying and signing switch in the same restart);
// sign switches kube-controller-manager's `--service-account-private-key-file` (it signs legacy
// Secret tokens); retire writes the new key into `sa.key` / `sa.pub` and points every flag back
// at them, so `kubeadm upgrade` and `kubeadm join --control-plane` keep working. All through the
// byte-preserving editor and the apply executor (backups, atomic writes, rollback).

/// kube-controller-manager's static pod manifest.
pub const KCM_MANIFEST: &str = "/etc/kubernetes/manifests/kube-controller-manager.yaml";
/// kube-controller-manager's signing key flag.
pub const KCM_KEY_FLAG: &str = "service-account-private-key-file";

/// kubeadm's canonical key files and the kube-controller-manager's key flag value, kept in the
/// rotation state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CanonicalFiles {
    /// `--service-account-signing-key-file` before the rotation (`/etc/kubernetes/pki/sa.key`).
    pub signing: String,
    /// The `--service-account-key-file` holding the old signing key (`/etc/kubernetes/pki/sa.pub`).
    pub verification: String,
    /// kube-controller-manager's `--service-account-private-key-file` before the rotation.
    pub controller_manager: String,
    /// Host path of the new public key (`sa-<id>.pub`).
    pub new_public_file: String,
}

impl Observed {
    /// Checks that rotation can manage this host's keys; returns the kids the rotation will
    /// retire at the end (the keys of the file the signing key's public half is in).
    pub fn rotation_preflight(
        &self,
        root: &HostRoot,
        observed: &super::Observed,
    ) -> Result<Vec<String>, Refusal> {
        install::signing_is_verified(observed)?;
        let canonical = canonical(root, observed)?;
        let file = crate::keys::load_verification_file(&root.path(&canonical.verification))
            .map_err(|e| refuse(e.to_string()))?;
        Ok(dedup_kids(
            file.keys
                .iter()
                .map(PublicKey::kid)
                .collect::<Vec<_>>()
                .iter(),
        ))
    }

    /// Writes `sa-<id>.key` / `sa-<id>.pub` beside the signing key; returns the new private
    /// key's host path and the canonical files.
    pub fn stage_new_key(
        &self,
        root: &HostRoot,
        observed: &super::Observed,
        id: &str,
        key: &NewKeyPem<'_>,
    ) -> Result<(String, CanonicalFiles), Refusal> {
        let mut canonical = canonical(root, observed)?;
        let dir = Path::new(&canonical.signing)
            .parent()
            .unwrap_or(Path::new("/etc/kubernetes/pki"))
            .to_path_buf();
        let private = dir.join(format!("sa-{id}.key"));
        let public = dir.join(format!("sa-{id}.pub"));
        crate::fs::write_atomic(
            &root.path(&private),
            key.private_pem.as_bytes(),
            crate::fs::NewFile::PRIVATE,
        )
        .map_err(|e| install::io("write", &private, e))?;
        crate::fs::write_atomic(
            &root.path(&public),
            key.public_pem.as_bytes(),
            crate::fs::NewFile::PRIVATE,
        )
        .map_err(|e| install::io("write", &public, e))?;
        canonical.new_public_file = public.display().to_string();
        Ok((private.display().to_string(), canonical))
    }

    pub fn plan_install(
        &self,
        root: &HostRoot,
        observed: &super::Observed,
        rotation: &Installing<'_>,
        install: Install,
    ) -> Result<HostChange, Refusal> {
        let obs = self;
        let canonical = rotation
            .canonical
            .cloned()
            .ok_or_else(|| refuse("the rotation state lacks kubeadm's key files; abort it"))?;
        let f = &observed.flags;
        let new_pub = canonical.new_public_file.clone();
        let new_key = rotation.new_key_file.to_string();
        let mut changes = Vec::new();
        let mut overrides: Vec<(String, String)> = Vec::new();
        let (key_files, signing): (Vec<String>, String) = match install {
            // The new public key joins the verification files. One node: `trust` also makes
            // the apiserver sign with the new key, and `sign` only switches
            // kube-controller-manager. Several nodes: `verify-only` first (the old key still
            // signs), then `sign`.
            Install::Trust | Install::VerifyOnly | Install::Sign => {
                let mut files = f.key_files.clone();
                if !files.contains(&new_pub) {
                    files.push(new_pub.clone());
                }
                let signing = match install {
                    Install::VerifyOnly => f.signing_key_file.clone().unwrap_or_default(),
                    _ => new_key.clone(),
                };
                (files, signing)
            }
            Install::Retire => {
                let key = rotation.key()?;
                let mut writes = vec![(canonical.signing.clone(), key.private_pem.to_string())];
                if canonical.verification != canonical.signing {
                    writes.push((canonical.verification.clone(), key.public_pem.clone()));
                }
                for (path, content) in writes {
                    let old = crate::fs::read_to_string(root.path(&path)).ok();
                    if old.as_deref() != Some(content.as_str()) {
                        changes.push(FileChange {
                            path: PathBuf::from(&path),
                            old,
                            new: content.clone(),
                        });
                    }
                    overrides.push((path, content));
                }
                let mut files: Vec<String> = f
                    .key_files
                    .iter()
                    .filter(|k| **k != new_pub)
                    .cloned()
                    .collect();
                if !files.contains(&canonical.verification) {
                    files.insert(0, canonical.verification.clone());
                }
                (files, canonical.signing.clone())
            }
            Install::RemoveNew => {
                let files: Vec<String> = f
                    .key_files
                    .iter()
                    .filter(|k| **k != new_pub)
                    .cloned()
                    .collect();
                let signing = match f.signing_key_file.as_deref() {
                    Some(s) if s == new_key => canonical.signing.clone(),
                    Some(s) => s.to_string(),
                    None => canonical.signing.clone(),
                };
                (files, signing)
            }
        };
        let manifest = apiserver_edit(obs, &key_files, &signing)?;
        let restarts_apiserver = manifest.is_some();
        changes.extend(manifest);
        let kcm_key_wanted = match install {
            Install::Sign => Some(new_key.clone()),
            Install::Retire | Install::RemoveNew => Some(canonical.controller_manager.clone()),
            Install::Trust | Install::VerifyOnly => None,
        };
        if let Some(key) = kcm_key_wanted {
            changes.extend(kcm_edit(root, &key)?);
        }
        if changes.is_empty() {
            return Ok(HostChange::None);
        }
        let expected = kids_of_files(root, &key_files, &overrides)?;
        Ok(HostChange::Files {
            changes,
            restarts_apiserver,
            expected,
        })
    }

    /// Removes `sa-<UTC stamp>.key|.pub` files no flag names (a rotation that crashed before
    /// saving its first state left them). Returns the host paths removed.
    pub fn sweep_orphan_keys(
        &self,
        root: &HostRoot,
        observed: &super::Observed,
    ) -> Result<Vec<PathBuf>, Refusal> {
        let mut removed = Vec::new();
        let f = &observed.flags;
        let Some(signing) = &f.signing_key_file else {
            return Ok(removed);
        };
        let dir = Path::new(signing)
            .parent()
            .unwrap_or(Path::new("/etc/kubernetes/pki"));
        if let Ok(entries) = std::fs::read_dir(root.path(dir)) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if !is_staged_name(&name) {
                    continue;
                }
                let host = dir.join(&name).display().to_string();
                let used = f.key_files.contains(&host)
                    || f.signing_key_file.as_deref() == Some(host.as_str())
                    || kcm_uses(root, &host);
                if !used {
                    crate::fs::remove_durable(&entry.path())
                        .map_err(|e| install::io("remove", Path::new(&host), e))?;
                    removed.push(PathBuf::from(host));
                }
            }
        }
        Ok(removed)
    }

    /// Removes the rotation's `sa-<id>.*` files once no flag names them (after retirement or
    /// abort).
    pub fn clean_up_keys(
        &self,
        root: &HostRoot,
        observed: &super::Observed,
        rotation: &Installing<'_>,
    ) -> Result<(), Refusal> {
        let Some(c) = rotation.canonical else {
            return Ok(());
        };
        let f = &observed.flags;
        let used = |p: &str| {
            f.key_files.iter().any(|k| k == p) || f.signing_key_file.as_deref() == Some(p)
        };
        for file in [rotation.new_key_file, c.new_public_file.as_str()] {
            if !used(file) && !kcm_uses(root, file) {
                crate::fs::remove_durable(&root.path(file))
                    .map_err(|e| install::io("remove", Path::new(file), e))?;
            }
        }
        Ok(())
    }
}

/// `sa-20261122T070542Z.key` / `.pub`: the names rotation gives kubeadm key files.
fn is_staged_name(name: &str) -> bool {
    let Some(stem) = name
        .strip_suffix(".key")
        .or_else(|| name.strip_suffix(".pub"))
        .and_then(|n| n.strip_prefix("sa-"))
    else {
        return false;
    };
    let b = stem.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
}

fn kcm_observe(root: &HostRoot) -> Result<Observed, Refusal> {
    let path = PathBuf::from(KCM_MANIFEST);
    let text = crate::fs::read_to_string(root.path(&path)).map_err(|e| {
        refuse(format!(
            "cannot read {KCM_MANIFEST} ({e}): kube-controller-manager signs legacy token Secrets with the same key and must be switched with the apiserver; irsa-agent rotates only kubeadm control planes whose controller-manager runs as this static pod"
        ))
    })?;
    parse(path, text).map_err(|e| refuse(e.to_string()))
}

fn kcm_key(obs: &Observed) -> Option<String> {
    obs.args
        .iter()
        .rev()
        .find(|a| a.name == KCM_KEY_FLAG)
        .map(|a| a.value.clone())
}

/// The kid of the key kube-controller-manager signs legacy token Secrets with (kubeadm).
pub fn kcm_signing_kid(root: &HostRoot) -> Option<String> {
    let file = kcm_key(&kcm_observe(root).ok()?)?;
    crate::keys::load_signing_file(&root.path(file))
        .ok()
        .map(|k| k.public.kid())
}

fn kcm_uses(root: &HostRoot, file: &str) -> bool {
    kcm_observe(root)
        .ok()
        .and_then(|o| kcm_key(&o))
        .is_some_and(|k| k == file)
}

/// kubeadm's layout: the signing key file, the verification file holding exactly its public
/// half, and kube-controller-manager's key flag.
fn canonical(root: &HostRoot, observed: &super::Observed) -> Result<CanonicalFiles, Refusal> {
    let f = &observed.flags;
    let signing = f
        .signing_key_file
        .clone()
        .ok_or_else(|| refuse("the apiserver has no --service-account-signing-key-file"))?;
    let host = install::host_keys(observed)?;
    let mut verification = None;
    for file in &f.key_files {
        let keys = crate::keys::load_verification_file(&root.path(file))
            .map_err(|e| refuse(e.to_string()))?;
        if keys.keys.iter().any(|k| k.kid() == host.signing.kid()) {
            if keys.keys.iter().all(|k| k.kid() == host.signing.kid()) {
                verification = Some(file.clone());
                break;
            }
            return Err(refuse(format!(
                "{file} holds the signing key's public half together with other keys: irsa-agent replaces the signing key's own file (kubeadm's sa.pub) at the end of a rotation and will not rewrite a file with other keys in it"
            )));
        }
    }
    let verification = verification.ok_or_else(|| {
        refuse("no --service-account-key-file holds the signing key's public half")
    })?;
    let kcm = kcm_observe(root)?;
    let controller_manager = kcm_key(&kcm).ok_or_else(|| {
        refuse(format!(
            "{KCM_MANIFEST} has no --{KCM_KEY_FLAG}: kube-controller-manager would not sign legacy token Secrets with the key"
        ))
    })?;
    if controller_manager != signing {
        return Err(refuse(format!(
            "kube-controller-manager signs with {controller_manager} but the apiserver with {signing}: make them the same key first"
        )));
    }
    Ok(CanonicalFiles {
        signing,
        verification,
        controller_manager,
        new_public_file: String::new(),
    })
}

/// The apiserver manifest edit that sets the key flags, verified by re-reading the result.
fn apiserver_edit(
    obs: &Observed,
    key_files: &[String],
    signing: &str,
) -> Result<Option<FileChange>, Refusal> {
    let before = flags::ServiceAccountFlags::from_args(&obs.args);
    let mut changes: Vec<(&'static str, Vec<String>)> = Vec::new();
    if before.key_files != key_files {
        changes.push((flags::KEY_FILE, key_files.to_vec()));
    }
    if before.signing_key_file.as_deref() != Some(signing) {
        changes.push((flags::SIGNING_KEY_FILE, vec![signing.to_string()]));
    }
    if changes.is_empty() {
        return Ok(None);
    }
    let edits = edits(obs, &changes).map_err(|e| refuse(e.to_string()))?;
    let Some(change) = edits.into_iter().next() else {
        return Ok(None);
    };
    let after = parse(obs.path.clone(), change.new.clone()).map_err(|e| refuse(e.to_string()))?;
    let flags_after = flags::ServiceAccountFlags::from_args(&after.args);
    let others = |args: &[flags::Arg]| -> Vec<flags::Arg> {
        args.iter()
            .filter(|a| a.name != flags::KEY_FILE && a.name != flags::SIGNING_KEY_FILE)
            .cloned()
            .collect()
    };
    if flags_after.key_files != key_files
        || flags_after.signing_key_file.as_deref() != Some(signing)
        || others(&obs.args) != others(&after.args)
    {
        return Err(refuse(format!(
            "internal check failed, nothing was written: editing {} would not give exactly the intended key flags",
            obs.path.display()
        )));
    }
    Ok(Some(change))
}

fn kcm_edit(root: &HostRoot, key: &str) -> Result<Option<FileChange>, Refusal> {
    let kcm = kcm_observe(root)?;
    if kcm_key(&kcm).as_deref() == Some(key) {
        return Ok(None);
    }
    let edits =
        edits(&kcm, &[(KCM_KEY_FLAG, vec![key.to_string()])]).map_err(|e| refuse(e.to_string()))?;
    let Some(change) = edits.into_iter().next() else {
        return Ok(None);
    };
    let after = parse(kcm.path.clone(), change.new.clone()).map_err(|e| refuse(e.to_string()))?;
    let others = |args: &[flags::Arg]| -> Vec<flags::Arg> {
        args.iter()
            .filter(|a| a.name != KCM_KEY_FLAG)
            .cloned()
            .collect()
    };
    if kcm_key(&after).as_deref() != Some(key) || others(&kcm.args) != others(&after.args) {
        return Err(refuse(format!(
            "internal check failed, nothing was written: editing {KCM_MANIFEST} would not give exactly --{KCM_KEY_FLAG}={key}"
        )));
    }
    Ok(Some(change))
}

/// The kids (in order, no repeats) of a list of key files as they will be on disk, with
/// `overrides` (host path -> new content) applied.
fn kids_of_files(
    root: &HostRoot,
    files: &[String],
    overrides: &[(String, String)],
) -> Result<Vec<String>, Refusal> {
    let mut kids = Vec::new();
    for file in files {
        let data = match overrides.iter().find(|(p, _)| p == file) {
            Some((_, content)) => content.as_bytes().to_vec(),
            None => install::read_file(root, Path::new(file))?.to_vec(),
        };
        let parsed = crate::keys::parse_verification_keys(&data).unwrap_or_default();
        kids.extend(parsed.keys.iter().map(PublicKey::kid));
    }
    Ok(dedup_kids(kids.iter()))
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

    #[test]
    fn staged_key_names() {
        assert!(is_staged_name("sa-20261122T070542Z.key"));
        assert!(is_staged_name("sa-20261122T070542Z.pub"));
        assert!(!is_staged_name("sa.key"));
        assert!(!is_staged_name("sa-backup.key"));
        assert!(!is_staged_name("sa-20261122T070542Z.key.bak"));
        assert!(!is_staged_name("sa-2026112xT070542Z.key"));
    }
}
