//! How a new service-account key is installed in an apiserver's key files: the vocabulary every
//! distribution shares ([`Install`], [`HostChange`], [`Refusal`]) and the helpers its plans use.
//! Each distribution's own part lives in its file ([`super::rancher`], [`super::kubeadm`]);
//! [`super::Source`] dispatches; rotation ([`crate::rotation`]) decides which install is due and
//! carries the [`HostChange`] out.
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

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::kubeadm::CanonicalFiles;
use super::{FileChange, Observed};
use crate::fs;
use crate::host::HostRoot;
use crate::keys::{self, PublicKey, pem};

/// Host path of rotation's own folder (staged keys of the rotation in progress).
pub const ROTATION_DIR: &str = "/var/lib/irsa-agent/rotation";

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

pub(super) fn refuse(message: impl Into<String>) -> Refusal {
    Refusal(message.into())
}

pub(super) fn io(what: &str, path: &Path, e: std::io::Error) -> Refusal {
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

pub(super) fn join_blocks(blocks: &[&KeyBlock]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for b in blocks {
        out.push_str(&b.pem);
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

pub fn read_file(root: &HostRoot, host: &Path) -> Result<Zeroizing<Vec<u8>>, Refusal> {
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

/// The new key as installs write it (rotation generates it, keeps it in a file and re-checks it).
pub struct NewKeyPem<'a> {
    pub kid: String,
    /// The private key (PKCS#8 or the format the key type uses).
    pub private_pem: &'a Zeroizing<String>,
    /// Its public half, SPKI PEM.
    pub public_pem: String,
}

/// A rotation in progress, as an install sees it.
pub struct Installing<'a> {
    /// The rotation's name (its staged folder).
    pub id: &'a str,
    pub new_kid: &'a str,
    /// Host path of the new private key.
    pub new_key_file: &'a str,
    /// kubeadm: the files the old key lives in.
    pub canonical: Option<&'a CanonicalFiles>,
    /// The new key, read back from `new_key_file`; `None` only for [`Install::RemoveNew`]
    /// (an abort must work when the file is gone).
    pub new_key: Option<NewKeyPem<'a>>,
}

impl Installing<'_> {
    /// The new key, which every install but [`Install::RemoveNew`] needs.
    pub(super) fn key(&self) -> Result<&NewKeyPem<'_>, Refusal> {
        self.new_key.as_ref().ok_or_else(|| {
            refuse(format!(
                "{} is needed to install the new key and was not read",
                self.new_key_file
            ))
        })
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

/// The host's keys, if its signing key's public half is among its verification keys.
pub(super) fn signing_is_verified(observed: &Observed) -> Result<HostKeys, Refusal> {
    let host = host_keys(observed)?;
    if !host.verification.contains(&host.signing.kid()) {
        return Err(refuse(format!(
            "the signing key (kid {}) is not among the verification keys: fix that first (irsa-agent apply explains)",
            host.signing.kid()
        )));
    }
    Ok(host)
}

pub(super) fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => match dir.parent() {
            Some(parent) => fs::sync_dir(parent),
            None => Ok(()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the staged folders under [`ROTATION_DIR`] (a rotation that crashed before saving its
/// first state left them). Returns the host paths removed.
pub(super) fn sweep_staged_folders(root: &HostRoot) -> Result<Vec<PathBuf>, Refusal> {
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
    Ok(removed)
}

/// Removes the staged folder of rotation `id`.
pub(super) fn remove_staged_folder(root: &HostRoot, id: &str) -> Result<(), Refusal> {
    let dir = PathBuf::from(format!("{ROTATION_DIR}/{id}"));
    remove_tree(&root.path(&dir)).map_err(|e| io("remove", &dir, e))
}

/// Where rotation finds the current keys of a host: re-observed after every change.
pub fn observe(
    root: &HostRoot,
    distribution: crate::config::Distribution,
) -> Result<Observed, Refusal> {
    super::observe(root, distribution).map_err(|e| refuse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
