//! Publishing the discovery document and the JWKS where AWS, GCP and Azure fetch them.
//!
//! # Design
//!
//! * **One small trait per outside system.** Every target (a directory served by a web server,
//!   S3 and S3-compatible stores, GCS, Azure Blob) implements [`Target`]: read an object with its
//!   version (ETag, generation, or a content hash for files) and write it under a condition
//!   ([`Condition::Create`] = `If-None-Match: *`, [`Condition::Update`] = `If-Match`). The
//!   object stores share one implementation over `object_store` ([`store`]); the directory has
//!   its own ([`directory`]); tests use in-memory fakes.
//! * **Render once, write everywhere.** A [`Publication`] holds the two documents rendered once
//!   from the apiserver's verification keys ([`crate::keys::jwks::Documents`]).
//!   [`publish_all`] first brings the JWKS of *every* target up to date, then the discovery
//!   documents, so no relying party ever follows a discovery document to a JWKS that lacks a key
//!   it advertises.
//! * **Write only when the bytes change.** Each object is read first; equal bytes with the
//!   right Content-Type and Cache-Control are left alone (no new ETag, no CDN invalidation).
//! * **Never overwrite someone else's write.** Writes are conditional on what was read. On a
//!   conflict (another agent on another control-plane node wrote in between) the object is
//!   re-read and merged: our keys, plus any key the other writer *added* since our read (a
//!   three-way merge with our first read as the base), so a key another server already signs
//!   with is never dropped by a race. Then the write is retried (at most [`MAX_ATTEMPTS`]).
//!   The discovery document's algorithm list follows the merged JWKS.
//! * **Structured results.** Every target gets a [`TargetReport`]; nothing here prints. The
//!   daemon, rotation and doctor call [`publish_all`] / [`check_all`] and [`verify::verify`]
//!   from a tokio current-thread runtime.
//!
//! Where objects go is [`Layout`]; credentials (the standard AWS chain and the self-issued web
//! identity) are [`credentials`]; the check of the public copy is [`verify`].

pub mod azure;
pub mod credentials;
pub mod directory;
pub mod gcs;
pub mod http;
pub mod merge;
pub mod s3;
pub mod store;
pub mod verify;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::apiserver;
use crate::config::{PublishTarget, Settings};
use crate::host::HostRoot;
use crate::keys::{self, PublicKey, jwks};

pub use crate::config::layout::Layout;

/// The Content-Type both documents are published with: plain JSON, which every relying party
/// and every static host understands (the apiserver itself serves the JWKS as
/// `application/jwk-set+json`; AWS, GCP, Azure and the common JWT libraries accept either).
pub const CONTENT_TYPE: &str = "application/json";

/// How often a conditional write is retried after a conflict before giving up.
pub const MAX_ATTEMPTS: usize = 5;

/// A boxed future, so targets can be used as `dyn Target`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The version of a stored object a conditional write refers to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Version {
    /// The HTTP ETag (S3, Azure) or a content hash (directory).
    pub e_tag: Option<String>,
    /// An object generation (GCS) or store-specific version.
    pub version: Option<String>,
}

/// What a target holds under one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub bytes: Vec<u8>,
    pub version: Version,
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    /// What else is wrong with the stored object that rewriting it fixes (a published file's
    /// owner, mode or type); empty for object stores.
    pub problems: Vec<String>,
}

/// The condition a write is made under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Only if nothing exists yet (`If-None-Match: *`).
    Create,
    /// Only if the object is still this version (`If-Match`).
    Update(Version),
}

/// One object to write.
#[derive(Debug, Clone, Copy)]
pub struct Object<'a> {
    pub bytes: &'a [u8],
    pub content_type: &'a str,
    pub cache_control: &'a str,
}

/// Why a target operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The condition did not hold: someone else wrote first.
    #[error("changed by another writer since it was read")]
    Conflict,
    /// Anything else, already worded for the user (includes the target's answer).
    #[error("{0}")]
    Failed(String),
}

/// A place the documents are published to.
pub trait Target: Send + Sync {
    /// `s3://bucket/prefix`, `directory /srv/oidc`: for messages.
    fn describe(&self) -> String;
    /// The object under `key`, or `None` when there is none.
    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, TargetError>>;
    /// Writes `object` under `key` if `condition` holds; [`TargetError::Conflict`] otherwise.
    fn put<'a>(
        &'a self,
        key: &'a str,
        object: Object<'a>,
        condition: Condition,
    ) -> BoxFuture<'a, Result<(), TargetError>>;
    /// Extra files this target wants beside the documents (a Pages `_headers` file), each
    /// written only if absent or already carrying [`Extra::marker`].
    fn extras(&self, _layout: &Layout) -> Vec<Extra> {
        Vec::new()
    }
}

/// An extra object a target publishes (see [`Target::extras`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra {
    pub key: String,
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    /// The first line of a file the agent manages; a file without it belongs to the user.
    pub marker: &'static str,
}

/// What gets published for one issuer: the keys and the two documents rendered from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub issuer: String,
    pub jwks_uri: String,
    /// The keys, each once, in apiserver order.
    pub keys: Vec<PublicKey>,
    pub documents: jwks::Documents,
}

impl Publication {
    /// Renders the documents for these verification keys (in flag order; repeats dropped).
    /// Rotation may pass more keys than the apiserver has (a key published ahead of use).
    pub fn new(issuer: &str, jwks_uri: &str, verification_keys: &[PublicKey]) -> Self {
        let keys = keys::dedup(verification_keys);
        Publication {
            issuer: issuer.to_string(),
            jwks_uri: jwks_uri.to_string(),
            documents: jwks::Documents::build(issuer, jwks_uri, &keys),
            keys,
        }
    }

    /// The publication of this host: the apiserver's verification keys
    /// (`apiserver::key_files` + `keys::load_verification_files`) for the configured issuer,
    /// plus `ahead`: a key a rotation in progress publishes before the apiserver has it
    /// (`rotation::published_ahead`).
    pub fn from_host(
        root: &HostRoot,
        settings: &Settings,
        ahead: Vec<PublicKey>,
    ) -> Result<Self, PublishError> {
        let files = apiserver::key_files(root, settings.distribution)
            .map_err(|e| PublishError::Keys(e.to_string()))?;
        let paths: Vec<PathBuf> = files.verification.iter().map(|p| root.path(p)).collect();
        let keys = keys::load_verification_files(&paths).map_err(|errors| {
            PublishError::Keys(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        })?;
        let mut keys = keys;
        keys.extend(ahead);
        Ok(Publication::new(
            &settings.issuer,
            &settings.jwks_uri,
            &keys,
        ))
    }

    /// The kids, in order.
    pub fn kids(&self) -> &[String] {
        &self.documents.kids
    }
}

/// Why publishing could not even start.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read the apiserver's service-account keys: {0}")]
    Keys(String),
    #[error("{target}: {message}")]
    Setup { target: String, message: String },
}

/// One configured target, ready to use.
pub struct Publisher {
    pub target: Box<dyn Target>,
    pub layout: Layout,
    pub cache_control: String,
}

impl Publisher {
    pub fn name(&self) -> String {
        self.target.describe()
    }
}

/// Everything [`publishers`] needs besides the configuration.
#[derive(Clone)]
pub struct Environment {
    pub root: HostRoot,
    /// Extra trusted CAs (`ca-file:`), already resolved under the root.
    pub ca_file: Option<PathBuf>,
}

/// Builds a [`Publisher`] for every configured target. Credentials are not fetched here (the
/// first request does it), so this is quick and fails only on bad settings.
pub fn publishers(settings: &Settings, env: &Environment) -> Result<Vec<Publisher>, PublishError> {
    let mut out = Vec::new();
    for target in &settings.publish {
        let layout = Layout::for_target(&settings.issuer, &settings.jwks_uri, target);
        let setup = |message: String| PublishError::Setup {
            target: target.describe(),
            message,
        };
        let built: Box<dyn Target> = match target {
            PublishTarget::Directory {
                path,
                cache_control,
                pages_headers,
                writable_by,
                ..
            } => Box::new(
                directory::DirectoryTarget::new(
                    &env.root,
                    path,
                    cache_control,
                    *pages_headers,
                    writable_by,
                )
                .map_err(setup)?,
            ),
            PublishTarget::S3 { .. } => Box::new(s3::build(target, settings, env).map_err(setup)?),
            PublishTarget::Gcs { .. } => Box::new(gcs::build(target, env).map_err(setup)?),
            PublishTarget::AzureBlob { .. } => Box::new(azure::build(target, env).map_err(setup)?),
        };
        out.push(Publisher {
            target: built,
            layout,
            cache_control: target.cache_control().to_string(),
        });
    }
    Ok(out)
}

/// Write, or only compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Write,
    Check,
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Already right: same bytes, same Content-Type and Cache-Control.
    Unchanged,
    /// Did not exist; written.
    Created,
    /// Existed with other bytes or metadata; replaced.
    Updated,
    /// (check) Exists but differs; the reasons.
    Differs(Vec<String>),
    /// (check) Does not exist.
    Missing,
    /// Not attempted; why.
    Skipped(String),
    /// Failed; why.
    Failed(String),
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
    /// True when the object is (now) what it should be.
    pub fn is_in_sync(&self) -> bool {
        matches!(
            self,
            Outcome::Unchanged | Outcome::Created | Outcome::Updated
        )
    }
}

/// One object of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocReport {
    /// The object key (path under the target).
    pub key: String,
    pub outcome: Outcome,
    /// Kids this write added / removed (JWKS only).
    pub added_kids: Vec<String>,
    pub removed_kids: Vec<String>,
    /// Kids another writer added concurrently that were kept by the merge.
    pub merged_kids: Vec<String>,
    /// Conditional writes that lost a race and were retried.
    pub conflicts: usize,
}

impl DocReport {
    fn new(key: &str, outcome: Outcome) -> Self {
        DocReport {
            key: key.to_string(),
            outcome,
            added_kids: Vec::new(),
            removed_kids: Vec::new(),
            merged_kids: Vec::new(),
            conflicts: 0,
        }
    }
}

/// The result for one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetReport {
    pub target: String,
    /// Layout warnings: the issuer and this target's prefix may not line up.
    pub notes: Vec<String>,
    pub jwks: DocReport,
    pub discovery: DocReport,
    /// Extra files (a Pages `_headers`).
    pub extras: Vec<DocReport>,
}

impl TargetReport {
    fn docs(&self) -> impl Iterator<Item = &DocReport> {
        [&self.jwks, &self.discovery]
            .into_iter()
            .chain(self.extras.iter())
    }
    /// Some object failed.
    pub fn failed(&self) -> bool {
        self.docs().any(|d| d.outcome.is_failure())
    }
    /// Every object is what it should be.
    pub fn in_sync(&self) -> bool {
        self.docs().all(|d| d.outcome.is_in_sync())
    }
    /// Something was written.
    pub fn changed(&self) -> bool {
        self.docs()
            .any(|d| matches!(d.outcome, Outcome::Created | Outcome::Updated))
    }
}

/// Writes the JWKS, then the discovery document, to every target (see the module docs).
pub async fn publish_all(publishers: &[Publisher], publication: &Publication) -> Vec<TargetReport> {
    run_all(publishers, publication, Mode::Write).await
}

/// Compares every target with what [`publish_all`] would write; changes nothing.
pub async fn check_all(publishers: &[Publisher], publication: &Publication) -> Vec<TargetReport> {
    run_all(publishers, publication, Mode::Check).await
}

async fn run_all(
    publishers: &[Publisher],
    publication: &Publication,
    mode: Mode,
) -> Vec<TargetReport> {
    // Phase 1: every JWKS.
    let jwks_results =
        futures_util::future::join_all(publishers.iter().map(|p| sync_jwks(p, publication, mode)))
            .await;
    // Phase 2: the discovery documents (and extras) where the JWKS is in place.
    let rest = futures_util::future::join_all(publishers.iter().zip(&jwks_results).map(
        |(p, (jwks_report, keys))| async move {
            let discovery_key = p.layout.discovery_key.clone();
            let discovery = match keys {
                Some(keys) if mode == Mode::Check || jwks_report.outcome.is_in_sync() => {
                    let bytes = if *keys == publication.keys {
                        publication.documents.discovery.clone()
                    } else {
                        jwks::discovery_json(&publication.issuer, &publication.jwks_uri, keys)
                    };
                    sync_plain(
                        p,
                        &discovery_key,
                        bytes.as_bytes(),
                        CONTENT_TYPE,
                        None,
                        mode,
                    )
                    .await
                }
                _ => DocReport::new(
                    &discovery_key,
                    Outcome::Skipped(
                        "not written because the JWKS is not in place (it is written first)".into(),
                    ),
                ),
            };
            let mut extras = Vec::new();
            for extra in p.target.extras(&p.layout) {
                extras.push(
                    sync_plain(
                        p,
                        &extra.key,
                        &extra.bytes,
                        extra.content_type,
                        Some(extra.marker),
                        mode,
                    )
                    .await,
                );
            }
            (discovery, extras)
        },
    ))
    .await;
    publishers
        .iter()
        .zip(jwks_results)
        .zip(rest)
        .map(|((p, (jwks, _)), (discovery, extras))| TargetReport {
            target: p.name(),
            notes: p.layout.notes.clone(),
            jwks,
            discovery,
            extras,
        })
        .collect()
}

/// Differences in metadata between what is stored and what should be.
fn metadata_differences(stored: &Stored, content_type: &str, cache_control: &str) -> Vec<String> {
    let mut out = stored.problems.clone();
    if stored.content_type.as_deref() != Some(content_type) {
        out.push(format!(
            "Content-Type is {}, should be {content_type:?}",
            stored
                .content_type
                .as_deref()
                .map_or("not set".to_string(), |v| format!("{v:?}"))
        ));
    }
    if stored.cache_control.as_deref() != Some(cache_control) {
        out.push(format!(
            "Cache-Control is {}, should be {cache_control:?}",
            stored
                .cache_control
                .as_deref()
                .map_or("not set".to_string(), |v| format!("{v:?}"))
        ));
    }
    out
}

/// Brings the JWKS of one target up to date. Returns the report and the keys the target ends
/// up publishing (ours, or ours merged with a concurrent writer's), `None` on failure.
async fn sync_jwks(
    p: &Publisher,
    publication: &Publication,
    mode: Mode,
) -> (DocReport, Option<Vec<PublicKey>>) {
    let key = p.layout.jwks_key.as_str();
    let ours = &publication.keys;
    let mut report = DocReport::new(key, Outcome::Unchanged);
    let fail = |mut report: DocReport, why: String| {
        report.outcome = Outcome::Failed(why);
        (report, None)
    };
    let mut current = match p.target.read(key).await {
        Ok(current) => current,
        Err(e) => return fail(report, format!("cannot read {key}: {e}")),
    };
    // Our first read is the base of any merge.
    let base: Vec<String> = current
        .as_ref()
        .map(|s| merge::kids_in(&s.bytes))
        .unwrap_or_default();
    let mut desired = ours.clone();
    for attempt in 0..MAX_ATTEMPTS {
        let desired_bytes = if desired == *ours {
            publication.documents.jwks.clone()
        } else {
            jwks::jwks_json(&desired)
        };
        let desired_kids: Vec<String> = desired.iter().map(PublicKey::kid).collect();
        let (condition, differences) = match &current {
            None => (Condition::Create, None),
            Some(stored) => {
                let mut differences = Vec::new();
                if stored.bytes != desired_bytes.as_bytes() {
                    differences.push(merge::describe_jwks_difference(
                        &stored.bytes,
                        &desired_kids,
                    ));
                }
                differences.extend(metadata_differences(stored, CONTENT_TYPE, &p.cache_control));
                (Condition::Update(stored.version.clone()), Some(differences))
            }
        };
        let stored_kids: Vec<String> = current
            .as_ref()
            .map(|s| merge::kids_in(&s.bytes))
            .unwrap_or_default();
        if attempt == 0 || mode == Mode::Write {
            report.added_kids = desired_kids
                .iter()
                .filter(|k| !stored_kids.contains(k))
                .cloned()
                .collect();
            report.removed_kids = stored_kids
                .iter()
                .filter(|k| !desired_kids.contains(k))
                .cloned()
                .collect();
        }
        match (&differences, mode) {
            (Some(d), _) if d.is_empty() => {
                report.outcome = Outcome::Unchanged;
                return (report, Some(desired));
            }
            (None, Mode::Check) => {
                report.outcome = Outcome::Missing;
                return (report, Some(desired));
            }
            (Some(d), Mode::Check) => {
                report.outcome = Outcome::Differs(d.clone());
                return (report, Some(desired));
            }
            _ => {}
        }
        let object = Object {
            bytes: desired_bytes.as_bytes(),
            content_type: CONTENT_TYPE,
            cache_control: &p.cache_control,
        };
        let created = condition == Condition::Create;
        match p.target.put(key, object, condition).await {
            Ok(()) => {
                report.outcome = if created {
                    Outcome::Created
                } else {
                    Outcome::Updated
                };
                return (report, Some(desired));
            }
            Err(TargetError::Conflict) => {
                report.conflicts += 1;
                current = match p.target.read(key).await {
                    Ok(c) => c,
                    Err(e) => return fail(report, format!("cannot re-read {key}: {e}")),
                };
                let theirs = current
                    .as_ref()
                    .map(|s| merge::keys_in(&s.bytes))
                    .unwrap_or_default();
                let (merged, kept) = merge::three_way(ours, &base, &theirs);
                report.merged_kids = kept;
                desired = merged;
            }
            Err(e) => return fail(report, format!("cannot write {key}: {e}")),
        }
    }
    fail(
        report,
        format!("gave up after {MAX_ATTEMPTS} conflicting writes to {key}"),
    )
}

/// Brings one object without merge semantics (discovery document, extras) up to date. With a
/// `marker`, an existing object that does not start with it is the user's and left alone.
async fn sync_plain(
    p: &Publisher,
    key: &str,
    bytes: &[u8],
    content_type: &str,
    marker: Option<&str>,
    mode: Mode,
) -> DocReport {
    let mut report = DocReport::new(key, Outcome::Unchanged);
    for _ in 0..MAX_ATTEMPTS {
        let current = match p.target.read(key).await {
            Ok(c) => c,
            Err(e) => {
                report.outcome = Outcome::Failed(format!("cannot read {key}: {e}"));
                return report;
            }
        };
        let condition = match &current {
            None if mode == Mode::Check => {
                report.outcome = Outcome::Missing;
                return report;
            }
            None => Condition::Create,
            Some(stored) => {
                if let Some(marker) = marker
                    && !stored.bytes.starts_with(marker.as_bytes())
                {
                    report.outcome = Outcome::Failed(format!(
                        "{key} exists and was not written by irsa-agent (it does not start with {marker:?}); left alone: add these lines to it yourself, or remove it:\n{}",
                        String::from_utf8_lossy(bytes)
                    ));
                    return report;
                }
                let mut differences = Vec::new();
                if stored.bytes != bytes {
                    differences.push("content differs".to_string());
                }
                let cache_control = if marker.is_some() {
                    stored.cache_control.clone().unwrap_or_default()
                } else {
                    p.cache_control.clone()
                };
                if marker.is_none() {
                    differences.extend(metadata_differences(stored, content_type, &cache_control));
                } else {
                    differences.extend(stored.problems.iter().cloned());
                }
                if differences.is_empty() {
                    report.outcome = Outcome::Unchanged;
                    return report;
                }
                if mode == Mode::Check {
                    report.outcome = Outcome::Differs(differences);
                    return report;
                }
                Condition::Update(stored.version.clone())
            }
        };
        let created = condition == Condition::Create;
        let object = Object {
            bytes,
            content_type,
            cache_control: &p.cache_control,
        };
        match p.target.put(key, object, condition).await {
            Ok(()) => {
                report.outcome = if created {
                    Outcome::Created
                } else {
                    Outcome::Updated
                };
                return report;
            }
            Err(TargetError::Conflict) => report.conflicts += 1,
            Err(e) => {
                report.outcome = Outcome::Failed(format!("cannot write {key}: {e}"));
                return report;
            }
        }
    }
    report.outcome = Outcome::Failed(format!(
        "gave up after {MAX_ATTEMPTS} conflicting writes to {key}"
    ));
    report
}

#[cfg(test)]
mod tests;
