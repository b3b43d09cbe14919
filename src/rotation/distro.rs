//! What each distribution needs done on the host, as plans the driver carries out.
//!
//! **k3s / RKE2** (the supported path, k3s docs "Service-Account Issuer Key Rotation"): the
//! apiserver verifies with every key in `<data-dir>/server/tls/service.key` and signs with the
//! first one (k3s copies it to `service.current.key` at every start; older releases sign with
//! `service.key` directly, which also means its first key). The file is bootstrap data kept in
//! the datastore and written to disk by k3s at start, so it is never edited in place: a new
//! `service.key` is staged in `/var/lib/irsa-agent/rotation/<id>/<what>/tls/service.key`,
//! loaded with `k3s certificate rotate-ca --path=<that dir>/..` (which checks that the key the
//! cluster signs with now is still in it), and takes effect at the next restart of each server.
//! The order of the keys in the file decides what a restart does:
//!
//! | install | `service.key` | after the restart the apiserver |
//! |---|---|---|
//! | verify-only (several servers, staging) | old keys, then new | verifies with both, signs with old |
//! | trust (one server) / sign (several) | new, then old keys | verifies with both, signs with new |
//! | retire | new | verifies and signs with new only |
//! | remove-new (abort) | old keys | as before the rotation |
//!
//! **kubeadm**: new files `sa-<id>.key` / `sa-<id>.pub` beside `sa.key` / `sa.pub`; trust adds
//! `--service-account-key-file=.../sa-<id>.pub` and switches `--service-account-signing-key-file`
//! in the static pod manifest (one apiserver: verifying and signing switch in the same restart);
//! sign switches kube-controller-manager's `--service-account-private-key-file` (it signs legacy
//! Secret tokens); retire writes the new key into `sa.key` / `sa.pub` and points every flag back
//! at them, so `kubeadm upgrade` (which regenerates the manifests with `sa.key`/`sa.pub`) and
//! `kubeadm join --control-plane` keep working. All through the byte-preserving editor and the
//! apply executor (backups, atomic writes, rollback).

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::keygen::NewKey;
use super::machine::{CanonicalFiles, InProgress};
use crate::apiserver::rancher::Flavor;
use crate::apiserver::{self, FileChange, Observed, Source, flags, kubeadm};
use crate::fs::{self, NewFile};
use crate::host::HostRoot;
use crate::keys::{self, PublicKey, pem};

/// Host path of rotation's own folder (staged keys of the rotation in progress).
pub const ROTATION_DIR: &str = "/var/lib/irsa-agent/rotation";
/// kube-controller-manager's static pod manifest (kubeadm).
pub const KCM_MANIFEST: &str = "/etc/kubernetes/manifests/kube-controller-manager.yaml";
/// kube-controller-manager's signing key flag.
pub const KCM_KEY_FLAG: &str = "service-account-private-key-file";

/// The host's distribution, as rotation handles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distro {
    Rancher { flavor: Flavor, data_dir: String },
    Kubeadm,
}

/// One key block of a key file: its kid and PEM text.
#[derive(Debug, Clone)]
pub struct KeyBlock {
    pub kid: String,
    pub pem: Zeroizing<String>,
}

/// Which keys an install puts in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Several servers, staging: the new key verifies everywhere, the old one still signs.
    VerifyOnly,
    /// One server: the apiserver verifies with both and signs with the new key.
    Trust,
    /// Several servers: every apiserver signs with the new key (k3s); kubeadm:
    /// kube-controller-manager signs with it too.
    Sign,
    /// Only the new key is left.
    Retire,
    /// Abort before the new key can have signed: the new key goes again.
    RemoveNew,
}

impl Install {
    pub fn name(self) -> &'static str {
        match self {
            Install::VerifyOnly => "verify-only",
            Install::Trust => "trust",
            Install::Sign => "sign",
            Install::Retire => "retire",
            Install::RemoveNew => "remove-new",
        }
    }
}

/// The host work of one install, for the driver to carry out.
#[derive(Debug)]
pub enum HostChange {
    /// Nothing to change on disk.
    None,
    /// k3s/RKE2: stage `content` as `<dir>/tls/service.key`, run
    /// `<program> certificate rotate-ca --path=<dir>`, restart the unit. `expected`: the JWKS
    /// kids (in order) the apiserver serves afterwards.
    RotateCa {
        program: &'static str,
        dir: PathBuf,
        content: Zeroizing<String>,
        data_dir_arg: Option<String>,
        expected: Vec<String>,
    },
    /// kubeadm: file changes through the apply executor. `restarts_apiserver`: the apiserver
    /// manifest changes (kubelet restarts the pod); then its JWKS must become `expected`.
    Files {
        changes: Vec<FileChange>,
        restarts_apiserver: bool,
        expected: Vec<String>,
    },
}

/// A rotation cannot start or continue on this host as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse(message: impl Into<String>) -> Refusal {
    Refusal(message.into())
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Refusal {
    Refusal(format!("cannot {what} {}: {e}", path.display()))
}

/// Kids without repeats, order kept.
pub fn dedup_kids<'a>(kids: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in kids {
        if !out.contains(k) {
            out.push(k.clone());
        }
    }
    out
}

/// The key blocks of a key file (non-key blocks dropped), each re-encoded as PEM.
pub fn key_blocks(data: &[u8]) -> Vec<KeyBlock> {
    let mut out = Vec::new();
    for block in pem::blocks(data) {
        let text = Zeroizing::new(pem::encode(&block.label_str(), &block.der));
        let parsed = keys::parse_verification_keys(text.as_bytes()).unwrap_or_default();
        if let [key] = parsed.keys.as_slice() {
            out.push(KeyBlock {
                kid: key.kid(),
                pem: text,
            });
        }
    }
    out
}

fn join_blocks(blocks: &[&KeyBlock]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for b in blocks {
        out.push_str(&b.pem);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

fn read_file(root: &HostRoot, host: &Path) -> Result<Zeroizing<Vec<u8>>, Refusal> {
    crate::fs::read(root.path(host))
        .map(Zeroizing::new)
        .map_err(|e| io("read", host, e))
}

/// The keys the host's apiserver is configured with now.
#[derive(Debug, Clone)]
pub struct HostKeys {
    /// Verification kids in flag/file order, without repeats.
    pub verification: Vec<String>,
    pub verification_keys: Vec<PublicKey>,
    pub signing: PublicKey,
}

impl Distro {
    /// The distribution of this host.
    pub fn of(observed: &Observed) -> Distro {
        match &observed.source {
            Source::Rancher(r) => Distro::Rancher {
                flavor: r.flavor,
                data_dir: r.data_dir.clone(),
            },
            Source::Kubeadm(_) => Distro::Kubeadm,
        }
    }

    pub fn name(&self) -> &'static str {
        self.distribution().name()
    }

    /// The distribution, as configured and persisted.
    pub fn distribution(&self) -> crate::config::Distribution {
        match self {
            Distro::Rancher {
                flavor: Flavor::K3s,
                ..
            } => crate::config::Distribution::K3s,
            Distro::Rancher {
                flavor: Flavor::Rke2,
                ..
            } => crate::config::Distribution::Rke2,
            Distro::Kubeadm => crate::config::Distribution::Kubeadm,
        }
    }

    fn service_key(&self) -> Option<PathBuf> {
        match self {
            Distro::Rancher { data_dir, .. } => {
                Some(PathBuf::from(format!("{data_dir}/server/tls/service.key")))
            }
            Distro::Kubeadm => None,
        }
    }

    /// The keys as the host's files say now.
    pub fn host_keys(observed: &Observed) -> Result<HostKeys, Refusal> {
        let keys = &observed.keys;
        if !keys.errors.is_empty() {
            return Err(refuse(format!(
                "kube-apiserver would refuse its key files:\n  {}",
                keys.errors.join("\n  ")
            )));
        }
        let signing = keys.signing.clone().ok_or_else(|| {
            refuse("the apiserver has no signing key (--service-account-signing-key-file)")
        })?;
        let verification_keys = keys::dedup(&keys.verification);
        Ok(HostKeys {
            verification: verification_keys.iter().map(PublicKey::kid).collect(),
            verification_keys,
            signing,
        })
    }

    /// Checks that rotation can manage this host's keys; returns the kids the rotation will
    /// retire at the end.
    pub fn preflight(&self, root: &HostRoot, observed: &Observed) -> Result<Vec<String>, Refusal> {
        let f = &observed.flags;
        if let Some(endpoint) = &f.signing_endpoint {
            return Err(refuse(format!(
                "the apiserver signs through an external signer ({endpoint}, --service-account-signing-endpoint): rotate keys in the signer; irsa-agent rotates only key files"
            )));
        }
        match self {
            Distro::Rancher { flavor, data_dir } => {
                let tls = format!("{data_dir}/server/tls");
                let service_key = format!("{tls}/service.key");
                let allowed_signing = [format!("{tls}/service.current.key"), service_key.clone()];
                if f.key_files != [service_key.clone()]
                    || !f
                        .signing_key_file
                        .as_ref()
                        .is_some_and(|s| allowed_signing.contains(s))
                {
                    return Err(refuse(format!(
                        "kube-apiserver-arg sets its own service-account key files ({} / {}): irsa-agent rotates only {}'s own {service_key} through `{} certificate rotate-ca`; remove those entries or rotate by hand",
                        f.key_files.join(", "),
                        f.signing_key_file.as_deref().unwrap_or("-"),
                        flavor.program(),
                        flavor.program()
                    )));
                }
                let host = signing_is_verified(observed)?;
                let unit = crate::apiserver::restart::detect_k3s_unit(root);
                let unit = if *flavor == Flavor::Rke2 {
                    "rke2-server".to_string()
                } else {
                    unit
                };
                let problems =
                    crate::apiserver::restart::command_line_problems(root, &unit, flavor.program());
                if !problems.is_empty() {
                    return Err(refuse(problems.join("\n")));
                }
                let blocks = key_blocks(&read_file(root, Path::new(&service_key))?);
                if blocks.first().map(|b| &b.kid) != Some(&host.signing.kid()) {
                    return Err(refuse(format!(
                        "{service_key}: its first key is not the key the apiserver signs with ({}); {} has not been restarted since service.key changed? restart it first",
                        host.signing.kid(),
                        flavor.program()
                    )));
                }
                Ok(dedup_kids(blocks.iter().map(|b| &b.kid)))
            }
            Distro::Kubeadm => {
                signing_is_verified(observed)?;
                let canonical = kubeadm_canonical(root, observed)?;
                let file = keys::load_verification_file(&root.path(&canonical.verification))
                    .map_err(|e| refuse(e.to_string()))?;
                Ok(dedup_kids(
                    file.keys
                        .iter()
                        .map(PublicKey::kid)
                        .collect::<Vec<_>>()
                        .iter(),
                ))
            }
        }
    }

    /// Writes the new key where the next installs use it; returns (new key file, kubeadm's
    /// canonical files).
    pub fn stage(
        &self,
        root: &HostRoot,
        observed: &Observed,
        id: &str,
        key: &NewKey,
    ) -> Result<(String, Option<CanonicalFiles>), Refusal> {
        match self {
            Distro::Rancher { .. } => {
                let dir = PathBuf::from(format!("{ROTATION_DIR}/{id}"));
                fs::create_dir_all(&root.path(&dir), 0o700).map_err(|e| io("create", &dir, e))?;
                let file = dir.join("new.key");
                fs::write_atomic(&root.path(&file), key.pem.as_bytes(), NewFile::PRIVATE)
                    .map_err(|e| io("write", &file, e))?;
                Ok((file.display().to_string(), None))
            }
            Distro::Kubeadm => {
                let mut canonical = kubeadm_canonical(root, observed)?;
                let dir = Path::new(&canonical.signing)
                    .parent()
                    .unwrap_or(Path::new("/etc/kubernetes/pki"))
                    .to_path_buf();
                let private = dir.join(format!("sa-{id}.key"));
                let public = dir.join(format!("sa-{id}.pub"));
                fs::write_atomic(&root.path(&private), key.pem.as_bytes(), NewFile::PRIVATE)
                    .map_err(|e| io("write", &private, e))?;
                fs::write_atomic(
                    &root.path(&public),
                    key.public().to_spki_pem().as_bytes(),
                    NewFile::PRIVATE,
                )
                .map_err(|e| io("write", &public, e))?;
                canonical.new_public_file = public.display().to_string();
                Ok((private.display().to_string(), Some(canonical)))
            }
        }
    }

    /// The new private key of a rotation, read back (and re-checked).
    pub fn new_key(&self, root: &HostRoot, rotation: &InProgress) -> Result<NewKey, Refusal> {
        let kind = rotation.key_type;
        let bytes = read_file(root, Path::new(&rotation.new_key_file))?;
        let key = super::keygen::load(kind, &bytes).map_err(|e| refuse(e.to_string()))?;
        if key.kid() != rotation.new_kid {
            return Err(refuse(format!(
                "{} no longer holds the new key {} (it holds {}); abort the rotation",
                rotation.new_key_file,
                rotation.new_kid,
                key.kid()
            )));
        }
        Ok(key)
    }

    /// What `install` changes on this host now (nothing when it is in place already).
    pub fn plan(
        &self,
        root: &HostRoot,
        observed: &Observed,
        rotation: &InProgress,
        install: Install,
    ) -> Result<HostChange, Refusal> {
        match self {
            Distro::Rancher { flavor, data_dir } => {
                self.plan_rancher(root, *flavor, data_dir, rotation, install)
            }
            Distro::Kubeadm => plan_kubeadm(root, observed, rotation, install),
        }
    }

    fn plan_rancher(
        &self,
        root: &HostRoot,
        flavor: Flavor,
        data_dir: &str,
        rotation: &InProgress,
        install: Install,
    ) -> Result<HostChange, Refusal> {
        let service_key = self.service_key().unwrap_or_default();
        let current = read_file(root, &service_key)?;
        let blocks = key_blocks(&current);
        let others: Vec<&KeyBlock> = blocks
            .iter()
            .filter(|b| b.kid != rotation.new_kid)
            .collect();
        let new_block = match install {
            Install::RemoveNew => None,
            _ => {
                let key = self.new_key(root, rotation)?;
                Some(KeyBlock {
                    kid: key.kid(),
                    pem: key.pem.clone(),
                })
            }
        };
        let wanted: Vec<&KeyBlock> = match (install, &new_block) {
            (Install::VerifyOnly, Some(new)) => others.iter().copied().chain([new]).collect(),
            (Install::Trust | Install::Sign, Some(new)) => {
                std::iter::once(new).chain(others.iter().copied()).collect()
            }
            (Install::Retire, Some(new)) => vec![new],
            _ => others.clone(),
        };
        if wanted.is_empty() {
            return Err(refuse(format!(
                "{}: removing the new key would leave no key at all",
                service_key.display()
            )));
        }
        let content = join_blocks(&wanted);
        let expected = dedup_kids(wanted.iter().map(|b| &b.kid));
        let have = dedup_kids(blocks.iter().map(|b| &b.kid));
        if have == expected {
            return Ok(HostChange::None);
        }
        let dir = PathBuf::from(format!("{ROTATION_DIR}/{}/{}", rotation.id, install.name()));
        Ok(HostChange::RotateCa {
            program: flavor.program(),
            dir,
            content,
            data_dir_arg: (data_dir != flavor.default_data_dir()).then(|| data_dir.to_string()),
            expected,
        })
    }

    /// Removes what a rotation that crashed before saving its first state left behind: staged
    /// folders under the rotation folder, and (kubeadm) `sa-<UTC stamp>.key|.pub` files no flag
    /// names. Only called while no rotation is in progress. Returns the host paths removed.
    pub fn sweep_orphans(
        &self,
        root: &HostRoot,
        observed: &Observed,
    ) -> Result<Vec<PathBuf>, Refusal> {
        let mut removed = Vec::new();
        let base = PathBuf::from(ROTATION_DIR);
        if let Ok(entries) = std::fs::read_dir(root.path(&base)) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let host = base.join(entry.file_name());
                    remove_tree(&entry.path()).map_err(|e| io("remove", &host, e))?;
                    removed.push(host);
                }
            }
        }
        if let (Distro::Kubeadm, Some(signing)) = (self, &observed.flags.signing_key_file) {
            let dir = Path::new(signing)
                .parent()
                .unwrap_or(Path::new("/etc/kubernetes/pki"));
            let f = &observed.flags;
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
                        fs::remove_durable(&entry.path())
                            .map_err(|e| io("remove", Path::new(&host), e))?;
                        removed.push(PathBuf::from(host));
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Removes the rotation's own files once they are no longer needed (after retirement or
    /// abort): the staged folder (k3s), `sa-<id>.*` (kubeadm), unless a flag still names them.
    pub fn clean_up(
        &self,
        root: &HostRoot,
        observed: &Observed,
        rotation: &InProgress,
    ) -> Result<(), Refusal> {
        let dir = PathBuf::from(format!("{ROTATION_DIR}/{}", rotation.id));
        remove_tree(&root.path(&dir)).map_err(|e| io("remove", &dir, e))?;
        if let (Distro::Kubeadm, Some(c)) = (self, &rotation.canonical_files) {
            let f = &observed.flags;
            let used = |p: &str| {
                f.key_files.iter().any(|k| k == p) || f.signing_key_file.as_deref() == Some(p)
            };
            for file in [&rotation.new_key_file, &c.new_public_file] {
                if !used(file) && !kcm_uses(root, file) {
                    fs::remove_durable(&root.path(file))
                        .map_err(|e| io("remove", Path::new(file), e))?;
                }
            }
        }
        Ok(())
    }
}

/// The host's keys, if its signing key's public half is among its verification keys.
fn signing_is_verified(observed: &Observed) -> Result<HostKeys, Refusal> {
    let host = Distro::host_keys(observed)?;
    if !host.verification.contains(&host.signing.kid()) {
        return Err(refuse(format!(
            "the signing key (kid {}) is not among the verification keys: fix that first (irsa-agent apply explains)",
            host.signing.kid()
        )));
    }
    Ok(host)
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

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => match dir.parent() {
            Some(parent) => fs::sync_dir(parent),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn kcm_observe(root: &HostRoot) -> Result<kubeadm::Observed, Refusal> {
    let path = PathBuf::from(KCM_MANIFEST);
    let text = crate::fs::read_to_string(root.path(&path)).map_err(|e| {
        refuse(format!(
            "cannot read {KCM_MANIFEST} ({e}): kube-controller-manager signs legacy token Secrets with the same key and must be switched with the apiserver; irsa-agent rotates only kubeadm control planes whose controller-manager runs as this static pod"
        ))
    })?;
    kubeadm::parse(path, text).map_err(|e| refuse(e.to_string()))
}

fn kcm_key(obs: &kubeadm::Observed) -> Option<String> {
    obs.args
        .iter()
        .rev()
        .find(|a| a.name == KCM_KEY_FLAG)
        .map(|a| a.value.clone())
}

/// The kid of the key kube-controller-manager signs legacy token Secrets with (kubeadm).
pub fn kcm_signing_kid(root: &HostRoot) -> Option<String> {
    let file = kcm_key(&kcm_observe(root).ok()?)?;
    keys::load_signing_file(&root.path(file))
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
fn kubeadm_canonical(root: &HostRoot, observed: &Observed) -> Result<CanonicalFiles, Refusal> {
    let f = &observed.flags;
    let signing = f
        .signing_key_file
        .clone()
        .ok_or_else(|| refuse("the apiserver has no --service-account-signing-key-file"))?;
    let host = Distro::host_keys(observed)?;
    let mut verification = None;
    for file in &f.key_files {
        let keys =
            keys::load_verification_file(&root.path(file)).map_err(|e| refuse(e.to_string()))?;
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
    obs: &kubeadm::Observed,
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
    let edits = kubeadm::edits(obs, &changes).map_err(|e| refuse(e.to_string()))?;
    let Some(change) = edits.into_iter().next() else {
        return Ok(None);
    };
    let after =
        kubeadm::parse(obs.path.clone(), change.new.clone()).map_err(|e| refuse(e.to_string()))?;
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
    let edits = kubeadm::edits(&kcm, &[(KCM_KEY_FLAG, vec![key.to_string()])])
        .map_err(|e| refuse(e.to_string()))?;
    let Some(change) = edits.into_iter().next() else {
        return Ok(None);
    };
    let after =
        kubeadm::parse(kcm.path.clone(), change.new.clone()).map_err(|e| refuse(e.to_string()))?;
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
            None => read_file(root, Path::new(file))?.to_vec(),
        };
        let parsed = keys::parse_verification_keys(&data).unwrap_or_default();
        kids.extend(parsed.keys.iter().map(PublicKey::kid));
    }
    Ok(dedup_kids(kids.iter()))
}

fn plan_kubeadm(
    root: &HostRoot,
    observed: &Observed,
    rotation: &InProgress,
    install: Install,
) -> Result<HostChange, Refusal> {
    let Source::Kubeadm(obs) = &observed.source else {
        return Err(refuse("not a kubeadm host"));
    };
    let canonical = rotation
        .canonical_files
        .clone()
        .ok_or_else(|| refuse("the rotation state lacks kubeadm's key files; abort it"))?;
    let f = &observed.flags;
    let new_pub = canonical.new_public_file.clone();
    let new_key = rotation.new_key_file.clone();
    let mut changes = Vec::new();
    let mut overrides: Vec<(String, String)> = Vec::new();
    let (key_files, signing): (Vec<String>, String) = match install {
        Install::Trust => {
            let mut files = f.key_files.clone();
            if !files.contains(&new_pub) {
                files.push(new_pub.clone());
            }
            (files, new_key.clone())
        }
        Install::Sign | Install::VerifyOnly => (
            f.key_files.clone(),
            f.signing_key_file.clone().unwrap_or_default(),
        ),
        Install::Retire => {
            let key = Distro::Kubeadm.new_key(root, rotation)?;
            let mut writes = vec![(canonical.signing.clone(), key.pem.to_string())];
            if canonical.verification != canonical.signing {
                writes.push((canonical.verification.clone(), key.public().to_spki_pem()));
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

/// Where rotation finds the current keys of a host: re-observed after every change.
pub fn observe(
    root: &HostRoot,
    distribution: crate::config::Distribution,
) -> Result<Observed, Refusal> {
    apiserver::observe(root, distribution).map_err(|e| refuse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_key_names() {
        assert!(is_staged_name("sa-20261122T070542Z.key"));
        assert!(is_staged_name("sa-20261122T070542Z.pub"));
        assert!(!is_staged_name("sa.key"));
        assert!(!is_staged_name("sa-backup.key"));
        assert!(!is_staged_name("sa-20261122T070542Z.key.bak"));
        assert!(!is_staged_name("sa-2026112xT070542Z.key"));
    }

    #[test]
    fn key_blocks_skip_what_is_not_a_key() {
        let key = crate::rotation::keygen::generate(crate::config::KeyType::EcdsaP256)
            .map(|k| k.pem.to_string())
            .unwrap_or_default();
        let text = format!(
            "# comment\n{key}-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n{key}"
        );
        let blocks = key_blocks(text.as_bytes());
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].kid, blocks[1].kid);
        assert_eq!(dedup_kids(blocks.iter().map(|b| &b.kid)).len(), 1);
    }
}
