//! The host's kube-apiserver: which distribution runs it, the flags it really gets, and the
//! `apply` machinery that changes them safely.
//!
//! Layout (pure core, thin edges):
//! - [`flags`]: the effective flag model (kube-apiserver flag semantics, k3s `GetArgs`);
//! - [`rancher`] / [`kubeadm`]: read the distribution's files into an [`Observed`] and compute
//!   byte-preserving edits of them (via [`edit`]);
//! - [`plan`]: the pure function from `Observed` + target issuer to a [`plan::Plan`] (dual
//!   issuer, pinned audiences, jwks-uri, key checks), re-verified by re-reading the edited texts;
//! - [`apply`]: the executor: backups, atomic writes, restart, health + issuer wait, rollback;
//! - [`restart`] and [`probe`]: the two outside systems (service manager, apiserver) behind
//!   small traits, with the real systemctl and HTTPS implementations.
//!
//! [`key_files`] gives other subcommands (publish, run, doctor, rotate) the exact key files the
//! apiserver uses.

pub mod apply;
pub mod backups;
pub mod change;
pub mod edit;
pub mod flags;
pub mod install;
pub mod kubeadm;
pub mod plan;
pub mod probe;
pub mod rancher;
pub mod ready;
pub mod restart;

use std::path::PathBuf;

use crate::config::Distribution;
use crate::host::HostRoot;

/// Host paths whose presence identifies each distribution.
/// The concrete distributions, in the order `distribution: auto` looks for them.
const CONCRETE: [Distribution; 3] = [Distribution::K3s, Distribution::Rke2, Distribution::Kubeadm];

/// Paths whose existence says `distribution` is installed here.
fn markers(distribution: Distribution) -> Vec<String> {
    match distribution {
        Distribution::K3s => rancher::Flavor::K3s.markers().to_vec(),
        Distribution::Rke2 => rancher::Flavor::Rke2.markers().to_vec(),
        Distribution::Kubeadm => kubeadm::MARKERS.iter().map(|m| m.to_string()).collect(),
        Distribution::Auto => CONCRETE.into_iter().flat_map(markers).collect(),
    }
}

/// The files whose appearance the daemon waits for while the apiserver of `distribution`
/// (every one, for `auto`) cannot be read yet.
pub fn awaited_files(distribution: Distribution) -> Vec<PathBuf> {
    match distribution {
        Distribution::K3s => rancher::Flavor::K3s.awaited_files().to_vec(),
        Distribution::Rke2 => rancher::Flavor::Rke2.awaited_files().to_vec(),
        Distribution::Kubeadm => kubeadm::MARKERS.iter().map(PathBuf::from).collect(),
        Distribution::Auto => CONCRETE.into_iter().flat_map(awaited_files).collect(),
    }
}

/// How the apiserver of `distribution` is restarted on this host.
pub fn restart(root: &HostRoot, distribution: Distribution) -> restart::Restart {
    match distribution {
        Distribution::K3s => rancher::Flavor::K3s.restart(root),
        Distribution::Rke2 => rancher::Flavor::Rke2.restart(root),
        Distribution::Kubeadm | Distribution::Auto => kubeadm::restart(),
    }
}

/// What the daemon watches for one distribution (host paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    pub files: Vec<PathBuf>,
    /// Folders of drop-ins (any file appearing in them counts).
    pub dropin_dirs: Vec<PathBuf>,
}

/// Why the distribution or its key files cannot be determined.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(
        "no Kubernetes control plane found: none of /etc/rancher/k3s, /var/lib/rancher/k3s/server, /etc/rancher/rke2, /var/lib/rancher/rke2/server, /etc/kubernetes/manifests/kube-apiserver.yaml exists; run irsa-agent on a server (control-plane) node, or set `distribution:` (paths under --root, if given)"
    )]
    NotFound {
        /// The root looked under (not shown: messages name host paths, and callers strip the
        /// root from them).
        root: String,
    },
    #[error(
        "several distributions found ({found}); set `distribution:` in the configuration to the one that runs the apiserver"
    )]
    Ambiguous { root: String, found: String },
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error(
        "the apiserver has no --service-account-signing-key-file{}",
        if .0.is_empty() { String::new() } else { format!(" ({})", .0) }
    )]
    NoSigningKey(String),
}

/// A host file could not be read or understood.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ObserveError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// A k3s/RKE2 agent (worker): it runs no apiserver and has no service-account keys.
    #[error(
        "this is a {program} agent (worker) node: {evidence} exists, but {data_dir}/server does not, so no apiserver runs here and there are no service-account keys ({data_dir}/server/tls/service.key); irsa-agent runs on server nodes: install and configure it on each {program} server instead"
    )]
    AgentNode {
        program: &'static str,
        data_dir: String,
        /// What shows that the host is an agent (its data folder or its unit).
        evidence: String,
    },
}

impl ObserveError {
    /// The host is not a control-plane node: nothing to do until that changes (waiting, not
    /// retrying, is the right answer).
    pub fn is_agent_node(&self) -> bool {
        matches!(self, ObserveError::AgentNode { .. })
    }
}

impl DetectError {
    /// See [`ObserveError::is_agent_node`].
    pub fn is_agent_node(&self) -> bool {
        matches!(self, DetectError::Observe(e) if e.is_agent_node())
    }
}

/// Why `apply` will not change anything.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Detect(#[from] DetectError),
    #[error("cannot edit {} safely: {source}", path.display())]
    Edit {
        path: PathBuf,
        #[source]
        source: edit::EditError,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("refusing to change the apiserver: {0}")]
    Keys(String),
    #[error("internal check failed, nothing was written: {0}")]
    Verify(String),
}

/// One file the plan writes: host path, old text (`None` = new file), new text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: PathBuf,
    pub old: Option<String>,
    pub new: String,
}

/// Where the flags come from: one type per distribution (k3s and RKE2 share one), each in its
/// own file. The methods below only dispatch; a new distribution is a new file and an arm here.
#[derive(Debug, Clone)]
pub enum Source {
    Rancher(rancher::Observed),
    Kubeadm(kubeadm::Observed),
}

impl Source {
    /// The apiserver's arguments as the distribution computes them.
    pub fn args(&self) -> &[flags::Arg] {
        match self {
            Source::Rancher(r) => &r.args,
            Source::Kubeadm(k) => &k.args,
        }
    }

    /// The issuer the distribution uses when none is configured.
    pub fn default_issuer(&self) -> String {
        match self {
            Source::Rancher(r) => r.default_issuer(),
            Source::Kubeadm(k) => k.default_issuer(),
        }
    }

    /// The admin kubeconfig (host path) and, when the kubeconfig may name another server, the
    /// URL of this host's apiserver.
    pub fn kubeconfig(&self) -> (PathBuf, Option<String>) {
        match self {
            Source::Rancher(r) => (r.flavor.kubeconfig(), None),
            Source::Kubeadm(k) => k.kubeconfig(),
        }
    }

    /// The configuration files the daemon watches.
    pub fn watched(&self) -> Watched {
        match self {
            Source::Rancher(r) => r.watched(),
            Source::Kubeadm(k) => k.watched(),
        }
    }

    /// Where a line for `flag` goes, in words (for fixes).
    pub fn flag_location(&self, flag: &str) -> String {
        match self {
            Source::Rancher(r) => r.flag_location(flag),
            Source::Kubeadm(k) => k.flag_location(flag),
        }
    }

    /// The list item that sets `flag=value`, in the distribution's syntax.
    pub fn flag_item(&self, flag: &str, value: &str) -> String {
        match self {
            Source::Rancher(_) => rancher::Observed::flag_item(flag, value),
            Source::Kubeadm(_) => kubeadm::Observed::flag_item(flag, value),
        }
    }

    /// Key rotation: whether every server loads the same key file from the cluster's datastore
    /// (k3s/RKE2: `rotate-ca` on one server, a restart on each), rather than each host keeping
    /// its own key files (kubeadm).
    pub fn keys_shared_by_servers(&self) -> bool {
        match self {
            Source::Rancher(_) => true,
            Source::Kubeadm(_) => false,
        }
    }

    /// Key rotation: checks that rotation can manage this host's keys; returns the kids it
    /// retires at the end.
    pub fn rotation_preflight(
        &self,
        root: &HostRoot,
        observed: &Observed,
    ) -> Result<Vec<String>, install::Refusal> {
        match self {
            Source::Rancher(r) => r.rotation_preflight(root, observed),
            Source::Kubeadm(k) => k.rotation_preflight(root, observed),
        }
    }

    /// Key rotation: writes the new key where the installs use it; returns its host path and
    /// (kubeadm) the canonical key files.
    pub fn stage_new_key(
        &self,
        root: &HostRoot,
        observed: &Observed,
        id: &str,
        key: &install::NewKeyPem<'_>,
    ) -> Result<(String, Option<kubeadm::CanonicalFiles>), install::Refusal> {
        match self {
            Source::Rancher(r) => Ok((r.stage_new_key(root, id, key.private_pem)?, None)),
            Source::Kubeadm(k) => {
                let (file, canonical) = k.stage_new_key(root, observed, id, key)?;
                Ok((file, Some(canonical)))
            }
        }
    }

    /// Key rotation: what `install` changes on this host now.
    pub fn plan_install(
        &self,
        root: &HostRoot,
        observed: &Observed,
        rotation: &install::Installing<'_>,
        install: install::Install,
    ) -> Result<install::HostChange, install::Refusal> {
        match self {
            Source::Rancher(r) => r.plan_install(root, rotation, install),
            Source::Kubeadm(k) => k.plan_install(root, observed, rotation, install),
        }
    }

    /// Key rotation: removes what a rotation that crashed before saving its first state left
    /// (staged folders; kubeadm: `sa-<stamp>.*` files no flag names). Returns the host paths.
    pub fn sweep_orphans(
        &self,
        root: &HostRoot,
        observed: &Observed,
    ) -> Result<Vec<PathBuf>, install::Refusal> {
        let mut removed = install::sweep_staged_folders(root)?;
        match self {
            Source::Rancher(_) => {}
            Source::Kubeadm(k) => removed.extend(k.sweep_orphan_keys(root, observed)?),
        }
        Ok(removed)
    }

    /// Key rotation: removes the rotation's own files once no longer needed.
    pub fn clean_up(
        &self,
        root: &HostRoot,
        observed: &Observed,
        rotation: &install::Installing<'_>,
    ) -> Result<(), install::Refusal> {
        install::remove_staged_folder(root, rotation.id)?;
        match self {
            Source::Rancher(_) => Ok(()),
            Source::Kubeadm(k) => k.clean_up_keys(root, observed, rotation),
        }
    }

    /// Key rotation: whether legacy token Secrets are signed with `kid`. On kubeadm
    /// kube-controller-manager signs them with a key file of its own (false when its manifest
    /// or key cannot be read); on k3s/RKE2 it uses the apiserver's own file: always true.
    pub fn legacy_signer_uses(&self, root: &HostRoot, kid: &str) -> bool {
        match self {
            Source::Rancher(_) => true,
            Source::Kubeadm(_) => kubeadm::kcm_signing_kid(root).as_deref() == Some(kid),
        }
    }
}

/// The service-account keys the apiserver would load, checked as it checks them.
#[derive(Debug, Clone, Default)]
pub struct KeyCheck {
    /// Verification keys in flag order (duplicates kept).
    pub verification: Vec<crate::keys::PublicKey>,
    pub signing: Option<crate::keys::PublicKey>,
    /// Files the apiserver would refuse, and why.
    pub errors: Vec<String>,
}

/// What the host's apiserver configuration is now.
#[derive(Debug, Clone)]
pub struct Observed {
    pub distribution: Distribution,
    pub source: Source,
    pub flags: flags::ServiceAccountFlags,
    pub keys: KeyCheck,
}

impl Observed {
    /// The apiserver's arguments as the distribution computes them.
    pub fn args(&self) -> &[flags::Arg] {
        self.source.args()
    }

    /// The issuer the distribution uses when none is configured.
    pub fn default_issuer(&self) -> String {
        self.source.default_issuer()
    }
}

fn check_keys(root: &HostRoot, flags: &flags::ServiceAccountFlags) -> KeyCheck {
    let mut check = KeyCheck::default();
    if flags.signing_endpoint.is_some() {
        return check;
    }
    if flags.key_files.is_empty() {
        check
            .errors
            .push("no --service-account-key-file is set".to_string());
    }
    for file in &flags.key_files {
        match crate::keys::load_verification_file(&root.path(file)) {
            Ok(parsed) => check.verification.extend(parsed.keys),
            Err(e) => check.errors.push(host_message(root, &e.to_string())),
        }
    }
    match &flags.signing_key_file {
        Some(file) => match crate::keys::load_signing_file(&root.path(file)) {
            Ok(key) => check.signing = Some(key.public),
            Err(e) => check.errors.push(host_message(root, &e.to_string())),
        },
        None => check
            .errors
            .push("no --service-account-signing-key-file is set".to_string()),
    }
    check
}

/// Messages name host paths, not paths under a test root.
fn host_message(root: &HostRoot, message: &str) -> String {
    if root.is_real() {
        return message.to_string();
    }
    let prefix = root.root().display().to_string();
    message.replace(prefix.trim_end_matches('/'), "")
}

/// Reads the host: distribution, the files that configure the apiserver, the effective flags and
/// the key files they name.
pub fn observe(root: &HostRoot, configured: Distribution) -> Result<Observed, DetectError> {
    let distribution = detect(root, configured)?;
    let source = match distribution {
        Distribution::K3s => Source::Rancher(rancher::observe(root, rancher::Flavor::K3s)?),
        Distribution::Rke2 => Source::Rancher(rancher::observe(root, rancher::Flavor::Rke2)?),
        Distribution::Kubeadm | Distribution::Auto => Source::Kubeadm(kubeadm::observe(root)?),
    };
    let flags = flags::ServiceAccountFlags::from_args(source.args());
    let keys = check_keys(root, &flags);
    Ok(Observed {
        distribution,
        source,
        flags,
        keys,
    })
}

/// Resolves `distribution: auto` by looking at the host.
pub fn detect(root: &HostRoot, configured: Distribution) -> Result<Distribution, DetectError> {
    if configured != Distribution::Auto {
        return Ok(configured);
    }
    let found: Vec<Distribution> = CONCRETE
        .into_iter()
        .filter(|d| markers(*d).iter().any(|p| root.path(p).exists()))
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(DetectError::NotFound {
            root: root.root().display().to_string(),
        }),
        many => Err(DetectError::Ambiguous {
            root: root.root().display().to_string(),
            found: many.iter().map(|d| d.name()).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// The apiserver's key files, as host paths, in flag order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    /// `--service-account-key-file`s.
    pub verification: Vec<PathBuf>,
    /// `--service-account-signing-key-file`.
    pub signing: PathBuf,
}

/// The key files the apiserver uses, exactly as the distribution computes its flags (k3s/RKE2:
/// config.yaml, drop-ins, `kube-apiserver-arg`, `data-dir`; kubeadm: the static pod manifest).
pub fn key_files(root: &HostRoot, distribution: Distribution) -> Result<KeyFiles, DetectError> {
    let observed = observe(root, distribution)?;
    let flags = observed.flags;
    let signing = flags
        .signing_key_file
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            DetectError::NoSigningKey(
                flags
                    .signing_endpoint
                    .map(|e| format!("tokens are signed by the external signer at {e}"))
                    .unwrap_or_default(),
            )
        })?;
    Ok(KeyFiles {
        verification: flags.key_files.into_iter().map(PathBuf::from).collect(),
        signing: PathBuf::from(signing),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_distribution_and_refuses_ambiguity() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = HostRoot::new(dir.path());
        assert!(matches!(
            detect(&root, Distribution::Auto),
            Err(DetectError::NotFound { .. })
        ));
        std::fs::create_dir_all(root.path("/var/lib/rancher/k3s/server/tls"))?;
        assert_eq!(
            detect(&root, Distribution::Auto).ok(),
            Some(Distribution::K3s)
        );
        let files = key_files(&root, Distribution::Auto).ok();
        assert_eq!(
            files.map(|f| f.signing),
            Some(PathBuf::from("/var/lib/rancher/k3s/server/tls/service.key"))
        );
        std::fs::write(
            root.path("/var/lib/rancher/k3s/server/tls/service.current.key"),
            "",
        )?;
        let files = key_files(&root, Distribution::Auto).ok();
        assert_eq!(
            files.map(|f| f.signing),
            Some(PathBuf::from(
                "/var/lib/rancher/k3s/server/tls/service.current.key"
            ))
        );
        std::fs::create_dir_all(root.path("/etc/kubernetes/manifests"))?;
        std::fs::write(
            root.path("/etc/kubernetes/manifests/kube-apiserver.yaml"),
            "",
        )?;
        assert!(matches!(
            detect(&root, Distribution::Auto),
            Err(DetectError::Ambiguous { .. })
        ));
        assert_eq!(
            detect(&root, Distribution::Rke2).ok(),
            Some(Distribution::Rke2)
        );
        Ok(())
    }
}
