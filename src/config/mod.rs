//! The agent's configuration: `/etc/irsa-agent/config.yaml` plus drop-ins
//! `/etc/irsa-agent/config.d/*.yaml` in file-name order, all under the host root, or one file
//! given with `--config`.
//!
//! Three stages, as zincati does it:
//! 1. **fragments**: each file is read on its own into a [`Fragment`] whose every field is
//!    optional and remembers the file it came from; type errors and unknown keys are recorded
//!    as [`Problem`]s, not returned early;
//! 2. **merge**: a later file replaces a key (inside `rotation:`, each sub-key on its own; the
//!    `publish:` list as a whole) — a pure function;
//! 3. **validation** into [`Settings`]: parsed enums and durations, the issuer checked against
//!    what AWS, GCP and Azure accept.
//!
//! All problems of all files are reported at once, each naming the file, the key and the value.
//! Keys are kebab-case, like k3s's own config.yaml.

pub mod fields;
pub mod issuer;
pub mod layout;
pub mod run;
pub mod webhook;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use self::fields::{Fields, show};
pub use self::fields::{Problem, format_duration, parse_duration};
use crate::host::HostRoot;
use crate::keys::jwks::default_jwks_uri;

/// Host path of the main config file.
pub const CONFIG_FILE: &str = "/etc/irsa-agent/config.yaml";
/// Host path of the drop-in directory.
pub const CONFIG_DIR: &str = "/etc/irsa-agent/config.d";

/// Which Kubernetes distribution runs the apiserver on this host. Persisted in the state file
/// by its name; an unknown name there is an error naming the file and the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Auto,
    K3s,
    Rke2,
    Kubeadm,
}

impl Distribution {
    pub const NAMES: [&'static str; 4] = ["auto", "k3s", "rke2", "kubeadm"];

    pub fn name(self) -> &'static str {
        match self {
            Distribution::Auto => "auto",
            Distribution::K3s => "k3s",
            Distribution::Rke2 => "rke2",
            Distribution::Kubeadm => "kubeadm",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Distribution::Auto),
            "k3s" => Some(Distribution::K3s),
            "rke2" => Some(Distribution::Rke2),
            "kubeadm" => Some(Distribution::Kubeadm),
            _ => None,
        }
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One place the documents are published to. Each target gets both documents.
///
/// Object keys (file paths for `directory`) are `<prefix>/.well-known/openid-configuration` and
/// the jwks-uri's path; see [`layout`] for how they line up with the issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishTarget {
    /// A directory served by a web server; a host path, resolved under the host root.
    Directory {
        path: PathBuf,
        prefix: String,
        cache_control: String,
        /// Also write a `_headers` file (Cloudflare Pages / Netlify) giving both documents their
        /// Content-Type and Cache-Control.
        pages_headers: bool,
        /// Users or groups besides root that may write the folder (`writable-by:`); the agent
        /// refuses a folder others can write unless they are named here.
        writable_by: Vec<String>,
    },
    /// AWS S3 or an S3-compatible store.
    S3 {
        bucket: String,
        prefix: String,
        region: Option<String>,
        endpoint: Option<String>,
        path_style: bool,
        cache_control: String,
        credentials: AwsCredentials,
    },
    /// Google Cloud Storage.
    Gcs {
        bucket: String,
        prefix: String,
        cache_control: String,
        /// A service-account key file (host path); default: application default credentials.
        credentials_file: Option<PathBuf>,
        /// Another JSON API endpoint than https://storage.googleapis.com (fake-gcs-server, private
        /// endpoints).
        endpoint: Option<String>,
    },
    /// Azure Blob Storage (static website: container `$web`).
    AzureBlob {
        account: String,
        container: String,
        prefix: String,
        endpoint: Option<String>,
        cache_control: String,
    },
}

/// The `Cache-Control` published documents get unless `cache-control:` says otherwise: short
/// enough that a new key is seen within minutes, long enough that a CDN absorbs STS's fetches.
pub const DEFAULT_CACHE_CONTROL: &str = "public, max-age=300";
/// The subject of the agent's self-issued web identity token.
pub const DEFAULT_WEB_IDENTITY_SUBJECT: &str = "system:serviceaccount:kube-system:irsa-agent";
/// The audience AWS STS expects in a web identity token.
pub const DEFAULT_WEB_IDENTITY_AUDIENCE: &str = "sts.amazonaws.com";

/// How an `s3` target gets AWS credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsCredentials {
    /// The standard chain: environment, shared config files, web identity, ECS/EKS, IMDSv2.
    Chain,
    /// The agent's own token, signed with the cluster's service-account signing key and
    /// exchanged through STS AssumeRoleWithWebIdentity.
    SelfIssued(WebIdentity),
}

/// Settings of the self-issued web identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebIdentity {
    pub role_arn: String,
    /// `sub` of the token (what the role's trust policy matches).
    pub subject: String,
    /// `aud` of the token.
    pub audience: String,
    /// STS endpoint; default `https://sts.<region>.amazonaws.com` (or the global one).
    pub sts_endpoint: Option<String>,
}

impl PublishTarget {
    /// The target's `prefix:` (no leading or trailing slash; empty for the root).
    pub fn prefix(&self) -> &str {
        match self {
            PublishTarget::Directory { prefix, .. }
            | PublishTarget::S3 { prefix, .. }
            | PublishTarget::Gcs { prefix, .. }
            | PublishTarget::AzureBlob { prefix, .. } => prefix,
        }
    }

    /// The Cache-Control the documents get.
    pub fn cache_control(&self) -> &str {
        match self {
            PublishTarget::Directory { cache_control, .. }
            | PublishTarget::S3 { cache_control, .. }
            | PublishTarget::Gcs { cache_control, .. }
            | PublishTarget::AzureBlob { cache_control, .. } => cache_control,
        }
    }

    pub const TYPES: [&'static str; 4] = ["directory", "s3", "gcs", "azure-blob"];

    pub fn type_name(&self) -> &'static str {
        match self {
            PublishTarget::Directory { .. } => "directory",
            PublishTarget::S3 { .. } => "s3",
            PublishTarget::Gcs { .. } => "gcs",
            PublishTarget::AzureBlob { .. } => "azure-blob",
        }
    }

    /// A one-line description for messages: `s3://bucket/prefix`, `directory /srv/oidc`.
    pub fn describe(&self) -> String {
        let join = |scheme: &str, bucket: &str, prefix: &str| {
            if prefix.is_empty() {
                format!("{scheme}://{bucket}")
            } else {
                format!("{scheme}://{bucket}/{prefix}")
            }
        };
        match self {
            PublishTarget::Directory { path, prefix, .. } if prefix.is_empty() => {
                format!("directory {}", path.display())
            }
            PublishTarget::Directory { path, prefix, .. } => {
                format!("directory {}/{prefix}", path.display())
            }
            PublishTarget::S3 { bucket, prefix, .. } => join("s3", bucket, prefix),
            PublishTarget::Gcs { bucket, prefix, .. } => join("gs", bucket, prefix),
            PublishTarget::AzureBlob {
                account,
                container,
                prefix,
                ..
            } => join("azure", &format!("{account}/{container}"), prefix),
        }
    }
}

/// The key type rotation generates. Persisted in the state file by its name; an unknown name
/// there is an error naming the file and the value (never silently another key type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KeyType {
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl KeyType {
    pub const NAMES: [&'static str; 3] = ["rsa-2048", "rsa-3072", "ecdsa-p256"];

    pub fn name(self) -> &'static str {
        match self {
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::EcdsaP256 => "ecdsa-p256",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "rsa-2048" => Some(KeyType::Rsa2048),
            "rsa-3072" => Some(KeyType::Rsa3072),
            "ecdsa-p256" => Some(KeyType::EcdsaP256),
            _ => None,
        }
    }
}

/// The longest time the stale-token counter must stay flat before an old key is retired.
pub const STALE_QUIET_MAX: Duration = Duration::from_secs(3600);

/// Signing-key rotation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub enabled: bool,
    /// How often a rotation starts.
    pub every: Duration,
    pub key_type: KeyType,
    /// Extra wait after the new JWKS is seen publicly, on top of its Cache-Control max-age.
    pub propagation_wait: Duration,
    /// How long a CDN in front of the documents may cache them.
    pub cdn_ttl: Duration,
    /// The longest lifetime of a token signed by the old key that must keep verifying.
    pub token_lifetime: Duration,
    /// Extra time the old key stays trusted after `token-lifetime` has passed (clock skew,
    /// tokens minted just before the switch, relying parties' leeway).
    pub drain_margin: Duration,
    /// `ignore-stale-tokens: "<reason>"`: retire the old key without waiting for
    /// `serviceaccount_stale_tokens_total` to stay flat (the daemon's `rotate
    /// --ignore-stale-tokens`); the reason is logged with every retirement it allows.
    pub ignore_stale_tokens: Option<String>,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            enabled: false,
            every: Duration::from_secs(90 * 86_400),
            key_type: KeyType::Rsa2048,
            propagation_wait: Duration::from_secs(3600),
            cdn_ttl: Duration::ZERO,
            token_lifetime: Duration::from_secs(86_400),
            drain_margin: Duration::from_secs(3600),
            ignore_stale_tokens: None,
        }
    }
}

impl Rotation {
    /// The shortest time one rotation takes with these settings, not counting the public
    /// copy's Cache-Control max-age (known only once it is fetched): cdn-ttl + propagation-wait
    /// before the new key signs, token-lifetime + drain-margin before the old key goes.
    pub fn minimum_duration(&self) -> Duration {
        self.cdn_ttl + self.propagation_wait + self.token_lifetime + self.drain_margin
    }

    /// How long `serviceaccount_stale_tokens_total` must stay flat before the old key is
    /// retired: an hour, or the whole drain (`lifetime`, the longest token lifetime in force,
    /// plus drain-margin) when that is shorter. The first reading is taken when the drain starts,
    /// so unless the counter rises this adds nothing to the drain.
    pub fn stale_quiet(&self, lifetime: Duration) -> Duration {
        STALE_QUIET_MAX.min(lifetime + self.drain_margin)
    }
}

/// `backups:`: how long copies of the files `apply` and rotation change are kept under
/// `/var/lib/irsa-agent/backups` (they hold secrets such as k3s's `token:`).
///
/// ```yaml
/// backups:
///   keep: 10        # the newest 10 copies of each file
///   max-age: 30d    # and none older than this once a newer copy of the file exists
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backups {
    pub keep: usize,
    pub max_age: Duration,
}

impl Default for Backups {
    fn default() -> Self {
        Backups {
            keep: 10,
            max_age: Duration::from_secs(30 * 86_400),
        }
    }
}

/// `backups:` of one file; merged key by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupsFragment {
    pub keep: Option<usize>,
    pub max_age: Option<Duration>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The public issuer, exactly as written.
    pub issuer: String,
    /// The jwks-uri: as configured, or `<issuer>/openid/v1/jwks`.
    pub jwks_uri: String,
    pub distribution: Distribution,
    pub publish: Vec<PublishTarget>,
    pub rotation: Rotation,
    /// `run:`: the daemon's timers and metrics outputs.
    pub run: run::RunSettings,
    /// `backups:`: retention of the backups of changed files.
    pub backups: Backups,
    /// `webhook:`: the pod identity webhook the daemon serves (off by default).
    pub webhook: webhook::WebhookSettings,
    /// An extra CA bundle (host path) trusted for the agent's own HTTPS requests: verifying the
    /// public copy, STS, storage endpoints. The system store (or `SSL_CERT_FILE`) stays trusted.
    pub ca_file: Option<PathBuf>,
    /// `public-check:` (default true): after publishing, fetch the issuer's documents over
    /// HTTPS and count a public copy that is unreachable, stale or served with the wrong
    /// Content-Type as a problem. `false` while the URL is not served yet (DNS, CDN to come).
    pub public_check: bool,
    /// The files this was read from, in merge order.
    pub sources: Vec<PathBuf>,
}

/// A value and the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin<T> {
    pub value: T,
    pub file: PathBuf,
}

impl<T> Origin<T> {
    pub fn at(file: &Path, value: T) -> Self {
        Origin {
            value,
            file: file.to_path_buf(),
        }
    }
}

/// One file's settings; every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    pub issuer: Option<Origin<String>>,
    pub jwks_uri: Option<Origin<String>>,
    pub distribution: Option<Origin<Distribution>>,
    pub publish: Option<Origin<Vec<PublishTarget>>>,
    pub rotation: RotationFragment,
    pub ca_file: Option<Origin<PathBuf>>,
    pub public_check: Option<bool>,
    pub run: run::RunFragment,
    pub backups: BackupsFragment,
    pub webhook: webhook::WebhookFragment,
}

/// `rotation:` of one file; merged key by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationFragment {
    pub enabled: Option<bool>,
    pub every: Option<Origin<Duration>>,
    pub key_type: Option<KeyType>,
    pub propagation_wait: Option<Duration>,
    pub cdn_ttl: Option<Duration>,
    pub token_lifetime: Option<Origin<Duration>>,
    pub drain_margin: Option<Duration>,
    pub ignore_stale_tokens: Option<String>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no configuration found: {} does not exist{}; create it with at least `issuer: https://<your public issuer URL>`", CONFIG_FILE, .looked_in.as_ref().map(|p| format!(" (looked in {})", p.display())).unwrap_or_default())]
    NotFound { looked_in: Option<PathBuf> },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(problems))]
    Invalid { problems: Vec<Problem> },
}

impl ConfigError {
    /// True when the host simply has no issuer configured yet (a fresh install), as opposed to
    /// a broken configuration.
    pub fn is_unconfigured(&self) -> bool {
        match self {
            ConfigError::NotFound { .. } => true,
            ConfigError::Invalid { problems } => {
                problems.len() == 1 && problems[0].file.is_none() && problems[0].key == "issuer"
            }
            ConfigError::Read { .. } => false,
        }
    }
}

fn render_problems(problems: &[Problem]) -> String {
    let mut out = format!(
        "invalid configuration ({} problem{}):",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  {p}"));
    }
    out
}

/// The validated settings plus warnings worth printing.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: Settings,
    pub warnings: Vec<Problem>,
}

/// The files to read: `--config FILE` alone, or the main file and drop-ins under the root.
pub fn config_files(root: &HostRoot, explicit: Option<&Path>) -> Result<Vec<PathBuf>, ConfigError> {
    if let Some(file) = explicit {
        if !file.exists() {
            return Err(ConfigError::Read {
                path: file.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        return Ok(vec![file.to_path_buf()]);
    }
    let mut files = Vec::new();
    let main = root.path(CONFIG_FILE);
    if main.exists() {
        files.push(main.clone());
    }
    let dir = root.path(CONFIG_DIR);
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut dropins = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::Read {
                    path: dir.clone(),
                    source,
                })?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml")) {
                    dropins.push(entry.path());
                }
            }
            dropins.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
            files.extend(dropins);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    }
    if files.is_empty() {
        return Err(ConfigError::NotFound {
            looked_in: (!root.is_real()).then_some(main),
        });
    }
    Ok(files)
}

/// Reads, merges and validates the configuration.
pub fn load(root: &HostRoot, explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    let files = config_files(root, explicit)?;
    let mut problems = Vec::new();
    let mut fragments = Vec::new();
    for file in &files {
        let text = crate::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        fragments.push(parse_fragment(file, &text, &mut problems));
    }
    let merged = merge(fragments);
    // A file that is not YAML has no keys: its `issuer:` is not missing, it is unreadable.
    // Report the syntax error alone rather than a phantom "issuer: required" beside it.
    if merged.issuer.is_none() && problems.iter().any(|p| p.key == "(file)") {
        return Err(ConfigError::Invalid { problems });
    }
    let result = validate(merged, files, &mut problems);
    match result {
        Some(loaded) if problems.is_empty() => Ok(loaded),
        _ => Err(ConfigError::Invalid { problems }),
    }
}

/// Stage 1: one file into a fragment.
pub fn parse_fragment(file: &Path, text: &str, problems: &mut Vec<Problem>) -> Fragment {
    let mut fragment = Fragment::default();
    // A leading byte order mark is dropped; size and nesting are checked before parsing.
    let doc: Value = match crate::yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            problems.push(Problem {
                file: Some(file.to_path_buf()),
                key: "(file)".into(),
                value: None,
                message: e.to_string(),
            });
            return fragment;
        }
    };
    let empty = Mapping::new();
    let map = match &doc {
        Value::Null => &empty,
        Value::Mapping(m) => m,
        other => {
            problems.push(Problem {
                file: Some(file.to_path_buf()),
                key: "(file)".into(),
                value: Some(show(other)),
                message: "expected a mapping of keys such as `issuer: https://...`".into(),
            });
            return fragment;
        }
    };
    let mut f = Fields::new(file, "", map, problems);
    fragment.issuer = f.string("issuer").map(|v| Origin::at(file, v));
    fragment.jwks_uri = f.string("jwks-uri").map(|v| Origin::at(file, v));
    fragment.distribution = f
        .choice("distribution", &Distribution::NAMES)
        .and_then(Distribution::from_name)
        .map(|v| Origin::at(file, v));
    if let Some(items) = f.sequence("publish") {
        let targets = parse_targets(file, items, f.problems());
        fragment.publish = Some(Origin::at(file, targets));
    }
    if let Some(ca_file) = f.string("ca-file") {
        if ca_file.starts_with('/') {
            fragment.ca_file = Some(Origin::at(file, PathBuf::from(ca_file)));
        } else {
            f.problem(
                "ca-file",
                Some(&Value::String(ca_file)),
                "must be an absolute path on the host (a PEM file of CA certificates)",
            );
        }
    }
    fragment.public_check = f.bool("public-check");
    if let Some(rotation) = f.mapping("rotation") {
        fragment.rotation = parse_rotation(file, rotation, f.problems());
    }
    if let Some(map) = f.mapping("run") {
        fragment.run = run::parse(file, map, f.problems());
    }
    if let Some(map) = f.mapping("webhook") {
        fragment.webhook = webhook::parse(file, map, f.problems());
    }
    if let Some(map) = f.mapping("backups") {
        fragment.backups = parse_backups(file, map, f.problems());
    }
    f.finish();
    fragment
}

fn parse_targets(file: &Path, items: &[Value], problems: &mut Vec<Problem>) -> Vec<PublishTarget> {
    let mut targets = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("publish[{i}]");
        let Value::Mapping(map) = item else {
            problems.push(Problem {
                file: Some(file.to_path_buf()),
                key: prefix,
                value: Some(show(item)),
                message: "expected a mapping such as `{type: directory, path: /srv/oidc}`".into(),
            });
            continue;
        };
        let mut f = Fields::new(file, prefix, map, problems);
        let Some(kind) = f.choice("type", &PublishTarget::TYPES) else {
            if map.get("type").is_none() {
                f.problem(
                    "type",
                    None,
                    format!("required: one of {}", PublishTarget::TYPES.join(", ")),
                );
            }
            continue;
        };
        let required = |f: &mut Fields<'_>, key: &'static str| {
            let value = f.string(key);
            match value {
                Some(v) if !v.trim().is_empty() => Some(v),
                Some(_) => {
                    f.problem(
                        key,
                        Some(&Value::String(String::new())),
                        "must not be empty",
                    );
                    None
                }
                None => {
                    if f.raw(key).is_none() {
                        f.problem(key, None, format!("required for `type: {kind}`"));
                    }
                    None
                }
            }
        };
        let target = match kind {
            "directory" => {
                let path = required(&mut f, "path").and_then(|path| {
                    if path.starts_with('/') {
                        Some(PathBuf::from(path))
                    } else {
                        f.problem(
                            "path",
                            Some(&Value::String(path)),
                            "must be an absolute path on the host",
                        );
                        None
                    }
                });
                let prefix = clean_prefix(&mut f);
                let cache_control = cache_control(&mut f);
                let pages_headers = f.bool("pages-headers").unwrap_or(false);
                let writable_by = writable_by(&mut f);
                path.map(|path| PublishTarget::Directory {
                    path,
                    prefix,
                    cache_control,
                    pages_headers,
                    writable_by,
                })
            }
            "s3" => {
                let bucket = required(&mut f, "bucket");
                let prefix = clean_prefix(&mut f);
                let region = f.string("region");
                let endpoint = endpoint_url(&mut f, "endpoint", true);
                let path_style = f.bool("path-style").unwrap_or(false);
                let cache_control = cache_control(&mut f);
                let credentials = aws_credentials(&mut f);
                match (bucket, credentials) {
                    (Some(bucket), Some(credentials)) => Some(PublishTarget::S3 {
                        bucket,
                        prefix,
                        region,
                        endpoint,
                        path_style,
                        cache_control,
                        credentials,
                    }),
                    _ => None,
                }
            }
            "gcs" => {
                let bucket = required(&mut f, "bucket");
                let prefix = clean_prefix(&mut f);
                let cache_control = cache_control(&mut f);
                let credentials_file = f.string("credentials-file").and_then(|p| {
                    if p.starts_with('/') {
                        Some(PathBuf::from(p))
                    } else {
                        f.problem(
                            "credentials-file",
                            Some(&Value::String(p)),
                            "must be an absolute path on the host (a service-account key JSON)",
                        );
                        None
                    }
                });
                let endpoint = endpoint_url(&mut f, "endpoint", true);
                bucket.map(|bucket| PublishTarget::Gcs {
                    bucket,
                    prefix,
                    cache_control,
                    credentials_file,
                    endpoint,
                })
            }
            _ => {
                let account = required(&mut f, "account");
                let container = f.string("container").unwrap_or_else(|| "$web".into());
                let prefix = clean_prefix(&mut f);
                let endpoint = endpoint_url(&mut f, "endpoint", true);
                let cache_control = cache_control(&mut f);
                account.map(|account| PublishTarget::AzureBlob {
                    account,
                    container,
                    prefix,
                    endpoint,
                    cache_control,
                })
            }
        };
        f.finish();
        targets.extend(target);
    }
    targets
}

/// `prefix:` without leading or trailing slashes (`/cluster-a/` and `cluster-a` are the same).
fn clean_prefix(f: &mut Fields<'_>) -> String {
    f.string("prefix")
        .map(|p| p.trim_matches('/').to_string())
        .unwrap_or_default()
}

/// `writable-by:` of a directory target: a user or group name (or a numeric id), or a list of
/// them. A YAML number is taken as an id.
fn writable_by(f: &mut Fields<'_>) -> Vec<String> {
    let word = |v: &Value| match v {
        Value::String(s) if !s.trim().is_empty() && !s.contains([':', '\n', ' ']) => {
            Some(s.trim().to_string())
        }
        Value::Number(n) if n.as_u64().is_some_and(|n| n <= u64::from(u32::MAX)) => {
            Some(n.to_string())
        }
        _ => None,
    };
    let Some(value) = f.raw("writable-by") else {
        return Vec::new();
    };
    let items: Vec<&Value> = match value {
        Value::Sequence(items) => items.iter().collect(),
        one => vec![one],
    };
    let mut out = Vec::new();
    for item in items {
        match word(item) {
            Some(name) => out.push(name),
            None => f.problem(
                "writable-by",
                Some(item),
                "expected a user or group name (www-data) or a numeric id, or a list of them",
            ),
        }
    }
    out
}

/// `cache-control:`, default [`DEFAULT_CACHE_CONTROL`]; one header value, no line breaks.
fn cache_control(f: &mut Fields<'_>) -> String {
    match f.string("cache-control") {
        Some(value) if value.trim().is_empty() || value.contains(['\r', '\n']) => {
            f.problem(
                "cache-control",
                Some(&Value::String(value)),
                "must be one Cache-Control header value such as \"public, max-age=300\"",
            );
            DEFAULT_CACHE_CONTROL.to_string()
        }
        Some(value) => value.trim().to_string(),
        None => DEFAULT_CACHE_CONTROL.to_string(),
    }
}

fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// An http(s) URL without query or fragment. `allow_http`: plain http is accepted (for
/// storage endpoints on a private network); otherwise only on loopback (credentials travel).
fn endpoint_url(f: &mut Fields<'_>, key: &'static str, allow_http: bool) -> Option<String> {
    let raw = f.string(key)?;
    let problem = match url::Url::parse(&raw) {
        Err(e) => Some(format!("is not a valid URL ({e})")),
        Ok(url) if !matches!(url.scheme(), "http" | "https") => {
            Some("must start with https:// (or http://)".to_string())
        }
        Ok(url) if url.host_str().is_none_or(str::is_empty) => Some("has no host".to_string()),
        Ok(url) if url.query().is_some() || url.fragment().is_some() => {
            Some("must not have a query or fragment".to_string())
        }
        Ok(url) if url.scheme() == "http" && !allow_http && !is_loopback_host(&url) => Some(
            "must use https:// (it carries credentials); http:// is accepted only on loopback"
                .to_string(),
        ),
        Ok(_) => None,
    };
    match problem {
        Some(message) => {
            f.problem(key, Some(&Value::String(raw)), message);
            None
        }
        None => Some(raw.trim_end_matches('/').to_string()),
    }
}

/// `credentials:` and the self-issued web identity keys of an `s3` target.
fn aws_credentials(f: &mut Fields<'_>) -> Option<AwsCredentials> {
    let mode = f.choice("credentials", &["chain", "self-issued"]);
    let mode_given = f.raw("credentials").is_some();
    let role_arn = f.string("role-arn");
    let sts_endpoint = endpoint_url(f, "sts-endpoint", false);
    let subject = f.string("web-identity-subject");
    let audience = f.string("web-identity-audience");
    if mode_given && mode.is_none() {
        return None;
    }
    let self_issued = match mode {
        Some("self-issued") => true,
        Some(_) => false,
        None => role_arn.is_some(),
    };
    if !self_issued {
        for (key, present) in [
            ("role-arn", role_arn.is_some()),
            ("sts-endpoint", sts_endpoint.is_some()),
            ("web-identity-subject", subject.is_some()),
            ("web-identity-audience", audience.is_some()),
        ] {
            if present {
                let value = f.raw(key).cloned();
                f.problem(
                    key,
                    value.as_ref(),
                    "is used only with `credentials: self-issued`; the standard chain takes AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE from the environment",
                );
            }
        }
        return Some(AwsCredentials::Chain);
    }
    let Some(role_arn) = role_arn.filter(|r| !r.trim().is_empty()) else {
        f.problem(
            "role-arn",
            None,
            "required for `credentials: self-issued`: the IAM role (trusting this cluster's issuer) to assume, e.g. arn:aws:iam::123456789012:role/irsa-agent-publisher",
        );
        return None;
    };
    let nonempty = |f: &mut Fields<'_>, key: &str, v: Option<String>, default: &str| match v {
        Some(v) if v.trim().is_empty() => {
            f.problem(key, Some(&Value::String(v)), "must not be empty");
            default.to_string()
        }
        Some(v) => v,
        None => default.to_string(),
    };
    let subject = nonempty(
        f,
        "web-identity-subject",
        subject,
        DEFAULT_WEB_IDENTITY_SUBJECT,
    );
    let audience = nonempty(
        f,
        "web-identity-audience",
        audience,
        DEFAULT_WEB_IDENTITY_AUDIENCE,
    );
    Some(AwsCredentials::SelfIssued(WebIdentity {
        role_arn,
        subject,
        audience,
        sts_endpoint,
    }))
}

fn parse_rotation(file: &Path, map: &Mapping, problems: &mut Vec<Problem>) -> RotationFragment {
    let mut f = Fields::new(file, "rotation", map, problems);
    let fragment = RotationFragment {
        enabled: f.bool("enabled"),
        every: f.duration("every").map(|v| Origin::at(file, v)),
        key_type: f
            .choice("key-type", &KeyType::NAMES)
            .and_then(KeyType::from_name),
        propagation_wait: f.duration("propagation-wait"),
        cdn_ttl: f.duration("cdn-ttl"),
        token_lifetime: f.duration("token-lifetime").map(|v| Origin::at(file, v)),
        drain_margin: f.duration("drain-margin"),
        ignore_stale_tokens: ignore_stale_tokens(&mut f),
    };
    f.finish();
    fragment
}

fn parse_backups(file: &Path, map: &Mapping, problems: &mut Vec<Problem>) -> BackupsFragment {
    let mut f = Fields::new(file, "backups", map, problems);
    let keep = f.raw("keep").cloned().and_then(|value| {
        match value.as_u64().filter(|n| (1..=1000).contains(n)) {
            Some(n) => usize::try_from(n).ok(),
            None => {
                f.problem(
                    "keep",
                    Some(&value),
                    "expected a whole number from 1 to 1000: how many copies of each backed-up file to keep",
                );
                None
            }
        }
    });
    let max_age = f.duration("max-age").and_then(|d| {
        if d < Duration::from_secs(3600) {
            let raw = f.raw("max-age").cloned();
            f.problem(
                "max-age",
                raw.as_ref(),
                "must be at least 1h (the newest copy of each file is kept whatever its age)",
            );
            None
        } else {
            Some(d)
        }
    });
    f.finish();
    BackupsFragment { keep, max_age }
}

/// `rotation.ignore-stale-tokens`: the reason, as text (a bare `true` says nothing about why).
fn ignore_stale_tokens(f: &mut Fields<'_>) -> Option<String> {
    let value = f.raw("ignore-stale-tokens")?;
    match value {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        other => {
            f.problem(
                "ignore-stale-tokens",
                Some(other),
                "expected the reason as text, e.g. `ignore-stale-tokens: \"audit log checked 2026-12-01: no client keeps tokens\"`: retirement then does not wait for serviceaccount_stale_tokens_total to stay flat, and the reason is logged each time",
            );
            None
        }
    }
}

/// Stage 2: later fragments override earlier ones, key by key.
pub fn merge(fragments: Vec<Fragment>) -> Fragment {
    let mut out = Fragment::default();
    for f in fragments {
        out.issuer = f.issuer.or(out.issuer);
        out.jwks_uri = f.jwks_uri.or(out.jwks_uri);
        out.distribution = f.distribution.or(out.distribution);
        out.publish = f.publish.or(out.publish);
        out.ca_file = f.ca_file.or(out.ca_file);
        out.public_check = f.public_check.or(out.public_check);
        out.run = run::merge(std::mem::take(&mut out.run), f.run);
        out.webhook = webhook::merge(std::mem::take(&mut out.webhook), f.webhook);
        out.backups.keep = f.backups.keep.or(out.backups.keep);
        out.backups.max_age = f.backups.max_age.or(out.backups.max_age);
        let (r, o) = (f.rotation, &mut out.rotation);
        o.enabled = r.enabled.or(o.enabled);
        o.every = r.every.or(o.every.take());
        o.key_type = r.key_type.or(o.key_type);
        o.propagation_wait = r.propagation_wait.or(o.propagation_wait);
        o.cdn_ttl = r.cdn_ttl.or(o.cdn_ttl);
        o.token_lifetime = r.token_lifetime.or(o.token_lifetime.take());
        o.drain_margin = r.drain_margin.or(o.drain_margin);
        o.ignore_stale_tokens = r.ignore_stale_tokens.or(o.ignore_stale_tokens.take());
    }
    out
}

fn url_problems(
    origin: &Origin<String>,
    key: &str,
    check: issuer::UrlCheck,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) {
    let make = |message: String| Problem {
        file: Some(origin.file.clone()),
        key: key.to_string(),
        value: Some(format!("{:?}", origin.value)),
        message,
    };
    problems.extend(check.errors.into_iter().map(make));
    warnings.extend(check.warnings.into_iter().map(make));
}

/// Stage 3: the merged fragment into settings. Errors go to `problems`; returns `None` when
/// there were any.
pub fn validate(
    merged: Fragment,
    sources: Vec<PathBuf>,
    problems: &mut Vec<Problem>,
) -> Option<Loaded> {
    let mut warnings = Vec::new();
    let Some(issuer) = merged.issuer else {
        problems.push(Problem {
            file: None,
            key: "issuer".into(),
            value: None,
            message: format!(
                "required: set the public https URL AWS/GCP/Azure will fetch the discovery document from (e.g. `issuer: https://oidc.example.com/cluster-a`) in {CONFIG_FILE} or a drop-in"
            ),
        });
        return None;
    };
    url_problems(
        &issuer,
        "issuer",
        issuer::check_issuer(&issuer.value),
        problems,
        &mut warnings,
    );
    let jwks_uri = match &merged.jwks_uri {
        Some(origin) => {
            url_problems(
                origin,
                "jwks-uri",
                issuer::check_jwks_uri(&origin.value),
                problems,
                &mut warnings,
            );
            origin.value.clone()
        }
        None => default_jwks_uri(&issuer.value),
    };
    if merged.publish.as_ref().is_none_or(|p| p.value.is_empty()) {
        warnings.push(Problem {
            file: merged.publish.as_ref().map(|p| p.file.clone()),
            key: "publish".into(),
            value: None,
            message: format!(
                "no targets: nothing will be published from this host, and relying parties find no documents at {} unless something else puts them there (add a target, e.g. `publish: [{{type: directory, path: /srv/oidc}}]`; /usr/share/doc/irsa-agent/publishing.md)",
                issuer.value
            ),
        });
    }
    // Where each target puts the documents, and whether that can line up with the issuer.
    if let Some(publish) = &merged.publish {
        for (i, target) in publish.value.iter().enumerate() {
            let layout = layout::Layout::for_target(&issuer.value, &jwks_uri, target);
            warnings.extend(layout.notes.into_iter().map(|message| Problem {
                file: Some(publish.file.clone()),
                key: format!("publish[{i}]"),
                value: Some(target.describe()),
                message,
            }));
        }
    }
    let r = merged.rotation;
    let defaults = Rotation::default();
    let rotation = Rotation {
        enabled: r.enabled.unwrap_or(defaults.enabled),
        every: r.every.as_ref().map_or(defaults.every, |o| o.value),
        key_type: r.key_type.unwrap_or(defaults.key_type),
        propagation_wait: r.propagation_wait.unwrap_or(defaults.propagation_wait),
        cdn_ttl: r.cdn_ttl.unwrap_or(defaults.cdn_ttl),
        token_lifetime: r
            .token_lifetime
            .as_ref()
            .map_or(defaults.token_lifetime, |o| o.value),
        drain_margin: r.drain_margin.unwrap_or(defaults.drain_margin),
        ignore_stale_tokens: r.ignore_stale_tokens.clone(),
    };
    if let Some(reason) = &rotation.ignore_stale_tokens {
        warnings.push(Problem {
            file: None,
            key: "rotation.ignore-stale-tokens".into(),
            value: Some(format!("{reason:?}")),
            message: "the old key is retired without waiting for serviceaccount_stale_tokens_total to stay flat: a client still presenting a stale token signed by it is then rejected".into(),
        });
    }
    if let Some(every) = &r.every
        && every.value <= rotation.token_lifetime
    {
        problems.push(Problem {
                file: Some(every.file.clone()),
                key: "rotation.every".into(),
                value: Some(format_duration(every.value)),
                message: format!(
                    "must be longer than rotation.token-lifetime ({}): an old key is retired only after every token it signed has expired",
                    format_duration(rotation.token_lifetime)
                ),
            });
    }
    if let Some(every) = &r.every
        && every.value > rotation.token_lifetime
        && every.value <= rotation.minimum_duration()
    {
        problems.push(Problem {
            file: Some(every.file.clone()),
            key: "rotation.every".into(),
            value: Some(format_duration(every.value)),
            message: format!(
                "must be longer than one rotation takes ({} = cdn-ttl {} + propagation-wait {} + token-lifetime {} + drain-margin {}, plus the published JWKS's Cache-Control max-age): the next rotation would be due before this one has retired the old key",
                format_duration(rotation.minimum_duration()),
                format_duration(rotation.cdn_ttl),
                format_duration(rotation.propagation_wait),
                format_duration(rotation.token_lifetime),
                format_duration(rotation.drain_margin),
            ),
        });
    }
    if let Some(lifetime) = &r.token_lifetime
        && lifetime.value < Duration::from_secs(600)
    {
        problems.push(Problem {
            file: Some(lifetime.file.clone()),
            key: "rotation.token-lifetime".into(),
            value: Some(format_duration(lifetime.value)),
            message: "must be at least 10m (the shortest lifetime kube-apiserver issues)".into(),
        });
    }
    let run = run::validate(merged.run, problems);
    let webhook = webhook::validate(merged.webhook, problems);
    if !problems.is_empty() {
        return None;
    }
    Some(Loaded {
        settings: Settings {
            issuer: issuer.value,
            jwks_uri,
            distribution: merged.distribution.map_or(Distribution::Auto, |o| o.value),
            publish: merged.publish.map(|o| o.value).unwrap_or_default(),
            rotation,
            run,
            webhook,
            backups: Backups {
                keep: merged.backups.keep.unwrap_or(Backups::default().keep),
                max_age: merged.backups.max_age.unwrap_or(Backups::default().max_age),
            },
            ca_file: merged.ca_file.map(|o| o.value),
            public_check: merged.public_check.unwrap_or(true),
            sources,
        },
        warnings,
    })
}
