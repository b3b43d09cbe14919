//! The plan: what the apiserver flags must become, and the file edits that get them there.
//!
//! [`plan`] is a pure function of the [`Observed`] host and a [`Target`]:
//! - `--service-account-issuer`: the configured issuer **first** (it signs), then every issuer
//!   accepted before (the distribution default included) and every issuer an earlier run
//!   remembered as still to be retired, so existing tokens keep verifying;
//! - `--api-audiences`: pinned to the audiences in force before (k3s/RKE2 already pin
//!   `https://kubernetes.default.svc.<domain>,k3s`; on kubeadm, where it is unset, that is the
//!   old issuers), never adding `sts.amazonaws.com` or any other external audience;
//! - `--service-account-jwks-uri`: the configured jwks-uri;
//! - nothing else: other flags, their order and values stay.
//!
//! It refuses when a key file would be refused by the apiserver or the signing key's public half
//! is not among the verification keys. The edits are verified by re-reading the edited texts the
//! way the distribution does: the managed flags must come out exactly as desired and every other
//! argument exactly as before.

use super::flags::{self, Arg, ServiceAccountFlags};
use super::{FileChange, Observed, PlanError, Source, kubeadm, rancher};
use crate::config::Distribution;

/// What the issuer configuration should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The configured public issuer.
    pub issuer: String,
    pub jwks_uri: String,
    /// Issuers an earlier run switched away from and that are not retired yet.
    pub remembered: Vec<String>,
    /// Issuers to drop (`finalize`); empty for `apply`.
    pub retire: Vec<String>,
    /// Issuers an earlier `finalize` retired (not warned about as missing).
    pub retired: Vec<String>,
    /// Phase one of a multi-server rollout: accept the configured issuer (last) without making
    /// it sign, so tokens signed by servers that already switched verify everywhere.
    pub accept_only: bool,
}

/// The managed flags as they must be.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Desired {
    pub issuers: Vec<String>,
    pub api_audiences: Vec<String>,
    pub jwks_uri: String,
}

/// Audiences that belong to cloud token exchanges, never to the Kubernetes API.
const EXTERNAL_AUDIENCES: [&str; 3] = [
    "sts.amazonaws.com",
    "api://AzureADTokenExchange",
    "https://iam.googleapis.com/",
];

fn is_external_audience(aud: &str) -> bool {
    EXTERNAL_AUDIENCES
        .iter()
        .any(|e| aud == *e || (e.ends_with('/') && aud.starts_with(e)))
        || aud.ends_with(".amazonaws.com")
}

fn dedup(values: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// The pure rule: the flags the apiserver must get.
pub fn desired(before: &ServiceAccountFlags, target: &Target) -> Desired {
    let already_signing = before.issuers.first() == Some(&target.issuer);
    if target.accept_only && !already_signing {
        let issuers = dedup(
            before
                .issuers
                .iter()
                .chain(&target.remembered)
                .filter(|i| !i.is_empty())
                .cloned()
                .chain(std::iter::once(target.issuer.clone())),
        );
        return Desired {
            issuers,
            api_audiences: dedup(before.effective_audiences()),
            jwks_uri: target.jwks_uri.clone(),
        };
    }
    let issuers = dedup(
        std::iter::once(target.issuer.clone()).chain(
            before
                .issuers
                .iter()
                .chain(&target.remembered)
                .filter(|i| !target.retire.contains(i) && !i.is_empty())
                .cloned(),
        ),
    );
    Desired {
        issuers,
        api_audiences: dedup(before.effective_audiences()),
        jwks_uri: target.jwks_uri.clone(),
    }
}

/// The complete plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub distribution: Distribution,
    pub before: ServiceAccountFlags,
    pub desired: Desired,
    /// The flags as the distribution will compute them from the edited files.
    pub after: ServiceAccountFlags,
    pub changes: Vec<FileChange>,
    pub warnings: Vec<String>,
    /// For kubeadm: how to make the change survive `kubeadm upgrade`.
    pub kubeadm_note: Option<String>,
}

impl Plan {
    pub fn in_sync(&self) -> bool {
        self.changes.is_empty()
    }

    /// True when the first (signing) issuer changes.
    pub fn switches_issuer(&self) -> bool {
        self.before.issuers.first() != self.desired.issuers.first()
    }
}

/// The managed flags whose values must change, with their desired values.
fn changed_flags(before: &ServiceAccountFlags, d: &Desired) -> Vec<(&'static str, Vec<String>)> {
    let mut out = Vec::new();
    if before.issuers != d.issuers {
        out.push((flags::ISSUER, d.issuers.clone()));
    }
    if before.api_audiences.as_ref() != Some(&d.api_audiences) {
        out.push((flags::AUDIENCES, d.api_audiences.clone()));
    }
    if before.jwks_uri() != Some(d.jwks_uri.as_str()) {
        out.push((flags::JWKS_URI, vec![d.jwks_uri.clone()]));
    }
    out
}

fn unmanaged(args: &[Arg]) -> Vec<&Arg> {
    args.iter()
        .filter(|a| !flags::MANAGED.contains(&a.name.as_str()))
        .collect()
}

fn key_problems(observed: &Observed) -> Result<Vec<String>, PlanError> {
    let mut warnings = Vec::new();
    let flags = &observed.flags;
    if let Some(endpoint) = &flags.signing_endpoint {
        warnings.push(format!(
            "the apiserver signs through the external signer at {endpoint} (--service-account-signing-endpoint): the key files are not checked; the signer must publish its keys"
        ));
        return Ok(warnings);
    }
    let keys = &observed.keys;
    if !keys.errors.is_empty() {
        return Err(PlanError::Keys(format!(
            "kube-apiserver would refuse its key files:\n  {}",
            keys.errors.join("\n  ")
        )));
    }
    if let Some(signing) = &keys.signing
        && !keys.verification.iter().any(|k| k.kid() == signing.kid())
    {
        return Err(PlanError::Keys(format!(
            "the signing key {} ({}, kid {}) is not among the verification keys ({}): every token it signs would be rejected; add its public half to a --service-account-key-file first",
            flags.signing_key_file.as_deref().unwrap_or("?"),
            signing.describe(),
            signing.kid(),
            flags.key_files.join(", ")
        )));
    }
    Ok(warnings)
}

/// Computes the plan for `observed` and `target`.
pub fn plan(observed: &Observed, target: &Target) -> Result<Plan, PlanError> {
    let before = observed.flags.clone();
    let mut warnings = key_problems(observed)?;
    let desired = desired(&before, target);
    for aud in &desired.api_audiences {
        if is_external_audience(aud) {
            warnings.push(format!(
                "--api-audiences includes {aud:?}: tokens requested for that audience (e.g. for AWS STS) are also valid against the Kubernetes API; irsa-agent keeps the audiences as they are, but consider removing it"
            ));
        }
    }
    // kubeadm's default depends on networking.dnsDomain, which the manifest does not show: any
    // `https://kubernetes.default.svc.<domain>` counts there.
    let default_issuer = observed.default_issuer();
    let is_default = |i: &String| match observed.source {
        Source::Kubeadm(_) => i.starts_with("https://kubernetes.default.svc."),
        Source::Rancher(_) => *i == default_issuer,
    };
    let retired_default = target.retire.iter().chain(&target.retired).any(is_default);
    if !desired.issuers.iter().any(is_default) && !retired_default {
        warnings.push(format!(
            "the distribution's default issuer {default_issuer} is not accepted (it was removed before irsa-agent ran): tokens issued with it are rejected"
        ));
    }
    let changes = changed_flags(&before, &desired);
    let (file_changes, after_args) = if changes.is_empty() {
        (Vec::new(), observed.args().to_vec())
    } else {
        match &observed.source {
            Source::Rancher(r) => {
                let edits = rancher::edits(r, &changes)?;
                let after =
                    rancher::with_texts(r, &edits).map_err(|e| PlanError::Verify(e.to_string()))?;
                (edits, after.args)
            }
            Source::Kubeadm(k) => {
                let edits = kubeadm::edits(k, &changes)?;
                let new_text = edits.first().map(|c| c.new.clone()).unwrap_or_default();
                let after = kubeadm::parse(k.path.clone(), new_text)
                    .map_err(|e| PlanError::Verify(e.to_string()))?;
                (edits, after.args)
            }
        }
    };
    let after = ServiceAccountFlags::from_args(&after_args);
    // The edited files must mean exactly the plan.
    if after.issuers != desired.issuers
        || after.effective_audiences() != desired.api_audiences
        || after.api_audiences.is_none()
        || after.jwks_uri() != Some(desired.jwks_uri.as_str())
    {
        return Err(PlanError::Verify(format!(
            "after the edit the apiserver would get issuers {:?}, audiences {:?}, jwks-uri {:?} instead of {:?}, {:?}, {:?}",
            after.issuers,
            after.effective_audiences(),
            after.jwks_uri(),
            desired.issuers,
            desired.api_audiences,
            desired.jwks_uri
        )));
    }
    if unmanaged(observed.args()) != unmanaged(&after_args) {
        return Err(PlanError::Verify(
            "the edit would change apiserver flags other than the issuer, audiences and jwks-uri"
                .into(),
        ));
    }
    let kubeadm_note = match &observed.source {
        Source::Kubeadm(k) => Some(kubeadm::persistence(
            &desired.issuers,
            &desired.api_audiences,
            &desired.jwks_uri,
            k.version,
        )),
        Source::Rancher(_) => None,
    };
    Ok(Plan {
        distribution: observed.distribution,
        before,
        desired,
        after,
        changes: file_changes,
        warnings,
        kubeadm_note,
    })
}

/// A unified diff of one change, with host paths as file names.
pub fn unified_diff(change: &FileChange) -> String {
    let old = change.old.as_deref().unwrap_or("");
    let path = change.path.display().to_string();
    let old_name = if change.old.is_some() {
        format!("a{path}")
    } else {
        "/dev/null".to_string()
    };
    similar::TextDiff::from_lines(old, &change.new)
        .unified_diff()
        .context_radius(3)
        .header(&old_name, &format!("b{path}"))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(issuers: &[&str], audiences: Option<&[&str]>) -> ServiceAccountFlags {
        ServiceAccountFlags {
            issuers: issuers.iter().map(|s| s.to_string()).collect(),
            api_audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    fn target(issuer: &str) -> Target {
        Target {
            issuer: issuer.into(),
            jwks_uri: format!("{issuer}/openid/v1/jwks"),
            remembered: Vec::new(),
            retire: Vec::new(),
            retired: Vec::new(),
            accept_only: false,
        }
    }

    const DEFAULT: &str = "https://kubernetes.default.svc.cluster.local";

    #[test]
    fn new_issuer_first_old_ones_kept_audiences_pinned() {
        let d = desired(
            &flags(&[DEFAULT], None),
            &target("https://oidc.example.com/a"),
        );
        assert_eq!(d.issuers, vec!["https://oidc.example.com/a", DEFAULT]);
        assert_eq!(d.api_audiences, vec![DEFAULT]);
        let d = desired(
            &flags(&[DEFAULT], Some(&[DEFAULT, "k3s"])),
            &target("https://oidc.example.com/a"),
        );
        assert_eq!(d.api_audiences, vec![DEFAULT, "k3s"]);
    }

    #[test]
    fn second_run_is_a_fixed_point_and_a_new_issuer_keeps_all_old_ones() {
        let t = target("https://a.example");
        let first = desired(&flags(&[DEFAULT], None), &t);
        let after = ServiceAccountFlags {
            issuers: first.issuers.clone(),
            api_audiences: Some(first.api_audiences.clone()),
            jwks_uri: Some(first.jwks_uri.clone()),
            ..Default::default()
        };
        assert_eq!(desired(&after, &t), first);
        assert!(changed_flags(&after, &first).is_empty());
        let next = desired(&after, &target("https://b.example"));
        assert_eq!(
            next.issuers,
            vec!["https://b.example", "https://a.example", DEFAULT]
        );
        assert_eq!(next.api_audiences, vec![DEFAULT]);
    }

    #[test]
    fn remembered_and_retired_issuers() {
        let mut t = target("https://a.example");
        t.remembered = vec!["https://old.example".into()];
        let d = desired(&flags(&["https://a.example"], Some(&["x"])), &t);
        assert_eq!(d.issuers, vec!["https://a.example", "https://old.example"]);
        t.retire = vec!["https://old.example".into(), DEFAULT.into()];
        let d = desired(&flags(&["https://a.example", DEFAULT], Some(&["x"])), &t);
        assert_eq!(d.issuers, vec!["https://a.example"]);
    }

    #[test]
    fn accept_only_adds_the_new_issuer_last_and_never_demotes_it() {
        let mut t = target("https://a.example");
        t.accept_only = true;
        let d = desired(&flags(&[DEFAULT], None), &t);
        assert_eq!(d.issuers, vec![DEFAULT, "https://a.example"]);
        assert_eq!(d.api_audiences, vec![DEFAULT]);
        // Phase two then makes it sign, keeping the rest.
        let after = ServiceAccountFlags {
            issuers: d.issuers.clone(),
            api_audiences: Some(d.api_audiences.clone()),
            jwks_uri: Some(d.jwks_uri.clone()),
            ..Default::default()
        };
        assert_eq!(desired(&after, &t), d);
        t.accept_only = false;
        let d2 = desired(&after, &t);
        assert_eq!(d2.issuers, vec!["https://a.example", DEFAULT]);
        assert_eq!(d2.api_audiences, vec![DEFAULT]);
        // Once it signs, --accept-only changes nothing.
        t.accept_only = true;
        let switched = ServiceAccountFlags {
            issuers: d2.issuers.clone(),
            ..after
        };
        assert_eq!(desired(&switched, &t).issuers, d2.issuers);
    }

    #[test]
    fn external_audiences_are_recognized() {
        assert!(is_external_audience("sts.amazonaws.com"));
        assert!(is_external_audience("api://AzureADTokenExchange"));
        assert!(!is_external_audience("k3s"));
        assert!(!is_external_audience(DEFAULT));
    }
}
