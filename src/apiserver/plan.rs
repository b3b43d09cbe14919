//! The plan: what the apiserver flags must become, and the file edits that get them there.
//!
//! [`plan`] is a pure function of the [`Observed`] host and a [`Target`]:
//! - `--service-account-issuer`: the configured issuer **first** (it signs), then every issuer
//!   accepted before (the distribution default included) and every issuer an earlier run
//!   remembered as still to be retired, so existing tokens keep verifying;
//! - `--api-audiences`: pinned to the audiences in force before (k3s/RKE2 already pin
//!   `https://kubernetes.default.svc.<domain>,k3s`; on kubeadm, where it is unset, that is the
//!   old issuers), never adding `sts.amazonaws.com` or any other external audience;
//! - on a cluster migrated by hand (the distribution's default issuer gone, or its in-cluster
//!   audiences gone, e.g. `api-audiences=sts.amazonaws.com` as blog posts write), the
//!   [`Origin`] is restored: the default issuer is accepted again (last) and the in-cluster
//!   audiences are put back in front of the audiences in force, which all stay (the tokens pods
//!   hold carry them). Nothing accepted before stops being accepted. `finalize` later drops
//!   the external audiences once no token can carry them alone;
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
    /// `finalize`: drop the external audiences (`sts.amazonaws.com` and the like) from
    /// `--api-audiences`, which is safe only once every in-cluster audience is in it (then every
    /// default token minted since carries one of those too).
    pub drop_external_audiences: bool,
}

/// What the distribution had before anyone changed it: the issuer every token was minted with
/// and the audiences in-cluster tokens carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub default_issuer: String,
    /// kubeadm: any `https://kubernetes.default.svc.<domain>` counts as the default (the
    /// manifest does not show networking.dnsDomain).
    pub any_domain: bool,
    /// The in-cluster audiences (k3s: `https://kubernetes.default.svc.<domain>,k3s`; kubeadm:
    /// the default issuer, since `--api-audiences` is unset there).
    pub audiences: Vec<String>,
}

impl Origin {
    pub fn is_default_issuer(&self, issuer: &str) -> bool {
        if self.any_domain {
            issuer.starts_with("https://kubernetes.default.svc.")
        } else {
            issuer == self.default_issuer
        }
    }
}

/// The [`Origin`] of the observed host. `previous`: issuers an earlier run kept accepted (on
/// kubeadm they may name the default issuer with its real cluster domain).
pub fn origin(observed: &Observed, previous: &[String]) -> Origin {
    match &observed.source {
        Source::Rancher(r) => Origin {
            default_issuer: observed.default_issuer(),
            any_domain: false,
            audiences: r
                .defaults
                .get(flags::AUDIENCES)
                .map(|v| flags::split_csv(v))
                .unwrap_or_else(|| vec![observed.default_issuer()]),
        },
        Source::Kubeadm(_) => {
            let is_default = |i: &&String| i.starts_with("https://kubernetes.default.svc.");
            let default_issuer = observed
                .flags
                .issuers
                .iter()
                .find(is_default)
                .or_else(|| previous.iter().find(is_default))
                .cloned()
                .unwrap_or_else(|| observed.default_issuer());
            Origin {
                audiences: vec![default_issuer.clone()],
                default_issuer,
                any_domain: true,
            }
        }
    }
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

/// Is `aud` an audience of a cloud token exchange (AWS, Azure, GCP)?
pub fn is_external_audience(aud: &str) -> bool {
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
pub fn desired(before: &ServiceAccountFlags, target: &Target, origin: &Origin) -> Desired {
    let gone = |i: &String| target.retire.contains(i) || target.retired.contains(i);
    // The default issuer, when someone removed it by hand (not `finalize`): accepted again.
    let default_dropped = !before
        .issuers
        .iter()
        .chain(&target.remembered)
        .chain(&target.retire)
        .chain(&target.retired)
        .any(|i| origin.is_default_issuer(i));
    let restore = default_dropped.then(|| origin.default_issuer.clone());
    let already_signing = before.issuers.first() == Some(&target.issuer);
    let issuers = if target.accept_only && !already_signing {
        dedup(
            before
                .issuers
                .iter()
                .chain(&target.remembered)
                .filter(|i| !i.is_empty())
                .cloned()
                .chain(restore)
                .chain(std::iter::once(target.issuer.clone())),
        )
    } else {
        dedup(
            std::iter::once(target.issuer.clone()).chain(
                before
                    .issuers
                    .iter()
                    .chain(&target.remembered)
                    .filter(|i| !gone(i) && !i.is_empty())
                    .cloned()
                    .chain(restore),
            ),
        )
    };
    Desired {
        issuers,
        api_audiences: desired_audiences(before, target, origin),
        jwks_uri: target.jwks_uri.clone(),
    }
}

/// The audiences in force stay (the tokens pods hold carry them); in-cluster audiences someone
/// removed come back first; external ones go only when `finalize` asks and every in-cluster
/// audience was already there.
fn desired_audiences(
    before: &ServiceAccountFlags,
    target: &Target,
    origin: &Origin,
) -> Vec<String> {
    let in_force = dedup(before.effective_audiences());
    let missing = origin.audiences.iter().any(|a| !in_force.contains(a));
    if missing {
        return dedup(origin.audiences.iter().cloned().chain(in_force));
    }
    if target.drop_external_audiences {
        return in_force
            .into_iter()
            .filter(|a| !is_external_audience(a))
            .collect();
    }
    in_force
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
    /// Issuers removed by hand that the plan accepts again (the distribution's default).
    pub restored_issuers: Vec<String>,
    /// In-cluster audiences removed by hand that the plan puts back.
    pub restored_audiences: Vec<String>,
    /// External audiences the plan removes (`finalize`).
    pub dropped_audiences: Vec<String>,
}

impl Plan {
    pub fn in_sync(&self) -> bool {
        self.changes.is_empty()
    }

    /// True when the first (signing) issuer changes.
    pub fn switches_issuer(&self) -> bool {
        self.before.issuers.first() != self.desired.issuers.first()
    }

    /// The external audiences a hand-migration repair keeps for now (the tokens pods hold may
    /// carry them alone): `finalize` drops them the longest token lifetime after the apiserver
    /// restarted with the in-cluster audiences back. Empty when the plan repairs no audiences.
    pub fn kept_external_audiences(&self) -> Vec<String> {
        if self.restored_audiences.is_empty() {
            return Vec::new();
        }
        self.desired
            .api_audiences
            .iter()
            .filter(|a| is_external_audience(a))
            .cloned()
            .collect()
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
    let origin = origin(observed, &target.remembered);
    let desired = desired(&before, target, &origin);
    let in_force = before.effective_audiences();
    let restored_issuers: Vec<String> = desired
        .issuers
        .iter()
        .filter(|i| {
            !before.issuers.contains(i) && **i != target.issuer && !target.remembered.contains(i)
        })
        .cloned()
        .collect();
    let restored_audiences: Vec<String> = desired
        .api_audiences
        .iter()
        .filter(|a| !in_force.contains(a))
        .cloned()
        .collect();
    let dropped_audiences: Vec<String> = in_force
        .iter()
        .filter(|a| !desired.api_audiences.contains(a))
        .cloned()
        .collect();
    if !restored_issuers.is_empty() || !restored_audiences.is_empty() {
        warnings.push(hand_migration_note(
            &restored_issuers,
            &restored_audiences,
            &desired.api_audiences,
        ));
    }
    for aud in &desired.api_audiences {
        if is_external_audience(aud) {
            warnings.push(format!(
                "--api-audiences includes {aud:?}: tokens requested for it (for AWS STS and the like) are also valid against the Kubernetes API; it stays for now because tokens pods hold may carry it as their only audience; `irsa-agent finalize` removes it once no such token can be valid (the longest token lifetime after the in-cluster audiences took effect)"
            ));
        }
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
        restored_issuers,
        restored_audiences,
        dropped_audiences,
    })
}

/// What a plan that repairs a hand migration does, in one sentence.
fn hand_migration_note(issuers: &[String], audiences: &[String], all: &[String]) -> String {
    let mut parts = Vec::new();
    if !issuers.is_empty() {
        parts.push(format!(
            "accepts {} again (it was removed by hand, so tokens minted with it were rejected)",
            issuers.join(", ")
        ));
    }
    if !audiences.is_empty() {
        let kept: Vec<String> = all
            .iter()
            .filter(|a| !audiences.contains(a))
            .cloned()
            .collect();
        parts.push(format!(
            "puts the in-cluster audiences {} back into --api-audiences in front of the ones in force ({}), which stay",
            audiences.join(", "),
            kept.join(", ")
        ));
    }
    format!(
        "the issuer configuration was changed by hand: this change {}; nothing accepted now stops being accepted",
        parts.join(", and ")
    )
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
            drop_external_audiences: false,
        }
    }

    const DEFAULT: &str = "https://kubernetes.default.svc.cluster.local";

    fn kubeadm() -> Origin {
        Origin {
            default_issuer: DEFAULT.into(),
            any_domain: true,
            audiences: vec![DEFAULT.into()],
        }
    }

    fn k3s() -> Origin {
        Origin {
            default_issuer: DEFAULT.into(),
            any_domain: false,
            audiences: vec![DEFAULT.into(), "k3s".into()],
        }
    }

    /// The apiserver's authenticator for one token: its issuer is accepted and one of its
    /// audiences is among the api-audiences (pkg/serviceaccount, authenticator audiences).
    fn accepts(issuers: &[String], audiences: &[String], iss: &str, aud: &[&str]) -> bool {
        issuers.iter().any(|i| i == iss) && aud.iter().any(|a| audiences.iter().any(|x| x == a))
    }

    #[test]
    fn new_issuer_first_old_ones_kept_audiences_pinned() {
        let d = desired(
            &flags(&[DEFAULT], None),
            &target("https://oidc.example.com/a"),
            &kubeadm(),
        );
        assert_eq!(d.issuers, vec!["https://oidc.example.com/a", DEFAULT]);
        assert_eq!(d.api_audiences, vec![DEFAULT]);
        let d = desired(
            &flags(&[DEFAULT], Some(&[DEFAULT, "k3s"])),
            &target("https://oidc.example.com/a"),
            &k3s(),
        );
        assert_eq!(d.api_audiences, vec![DEFAULT, "k3s"]);
    }

    #[test]
    fn second_run_is_a_fixed_point_and_a_new_issuer_keeps_all_old_ones() {
        let t = target("https://a.example");
        let first = desired(&flags(&[DEFAULT], None), &t, &kubeadm());
        let after = ServiceAccountFlags {
            issuers: first.issuers.clone(),
            api_audiences: Some(first.api_audiences.clone()),
            jwks_uri: Some(first.jwks_uri.clone()),
            ..Default::default()
        };
        assert_eq!(desired(&after, &t, &kubeadm()), first);
        assert!(changed_flags(&after, &first).is_empty());
        let next = desired(&after, &target("https://b.example"), &kubeadm());
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
        t.retired = vec![DEFAULT.into()];
        let d = desired(
            &flags(&["https://a.example"], Some(&[DEFAULT])),
            &t,
            &kubeadm(),
        );
        assert_eq!(d.issuers, vec!["https://a.example", "https://old.example"]);
        t.retired = Vec::new();
        t.retire = vec!["https://old.example".into(), DEFAULT.into()];
        let d = desired(
            &flags(&["https://a.example", DEFAULT], Some(&[DEFAULT])),
            &t,
            &kubeadm(),
        );
        assert_eq!(d.issuers, vec!["https://a.example"]);
        // A default issuer `finalize` retired is not a hand migration: it stays retired.
        t.retire = Vec::new();
        t.retired = vec![DEFAULT.into()];
        t.remembered = Vec::new();
        let d = desired(
            &flags(&["https://a.example"], Some(&[DEFAULT])),
            &t,
            &kubeadm(),
        );
        assert_eq!(d.issuers, vec!["https://a.example"]);
    }

    #[test]
    fn accept_only_adds_the_new_issuer_last_and_never_demotes_it() {
        let mut t = target("https://a.example");
        t.accept_only = true;
        let d = desired(&flags(&[DEFAULT], None), &t, &kubeadm());
        assert_eq!(d.issuers, vec![DEFAULT, "https://a.example"]);
        assert_eq!(d.api_audiences, vec![DEFAULT]);
        // Phase two then makes it sign, keeping the rest.
        let after = ServiceAccountFlags {
            issuers: d.issuers.clone(),
            api_audiences: Some(d.api_audiences.clone()),
            jwks_uri: Some(d.jwks_uri.clone()),
            ..Default::default()
        };
        assert_eq!(desired(&after, &t, &kubeadm()), d);
        t.accept_only = false;
        let d2 = desired(&after, &t, &kubeadm());
        assert_eq!(d2.issuers, vec!["https://a.example", DEFAULT]);
        assert_eq!(d2.api_audiences, vec![DEFAULT]);
        // Once it signs, --accept-only changes nothing.
        t.accept_only = true;
        let switched = ServiceAccountFlags {
            issuers: d2.issuers.clone(),
            ..after
        };
        assert_eq!(desired(&switched, &t, &kubeadm()).issuers, d2.issuers);
    }

    #[test]
    fn a_hand_migrated_cluster_gets_back_what_it_lost_and_keeps_what_pods_hold() {
        const NEW: &str = "https://oidc.example.com/homelab";
        for (origin, lost) in [(k3s(), vec![DEFAULT, "k3s"]), (kubeadm(), vec![DEFAULT])] {
            // As blog posts leave it: the issuer replaced, api-audiences=sts.amazonaws.com.
            let before = flags(&[NEW], Some(&["sts.amazonaws.com"]));
            let d = desired(&before, &target(NEW), &origin);
            assert_eq!(d.issuers, vec![NEW, DEFAULT]);
            let mut want: Vec<&str> = lost.clone();
            want.push("sts.amazonaws.com");
            assert_eq!(d.api_audiences, want);
            // Tokens pods hold now (kube-api-access minted since the hand change: aud is the
            // api-audiences then) and tokens from before it are accepted afterwards.
            assert!(accepts(
                &d.issuers,
                &d.api_audiences,
                NEW,
                &["sts.amazonaws.com"]
            ));
            assert!(accepts(&d.issuers, &d.api_audiences, DEFAULT, &lost));
            // A fixed point.
            let after = ServiceAccountFlags {
                issuers: d.issuers.clone(),
                api_audiences: Some(d.api_audiences.clone()),
                jwks_uri: Some(d.jwks_uri.clone()),
                ..Default::default()
            };
            assert_eq!(desired(&after, &target(NEW), &origin), d);
            // finalize: the old issuer retired, sts.amazonaws.com dropped; tokens minted
            // after the repair (aud = every api-audience then) stay accepted.
            let mut t = target(NEW);
            t.retire = vec![DEFAULT.into()];
            t.drop_external_audiences = true;
            let f = desired(&after, &t, &origin);
            assert_eq!(f.issuers, vec![NEW]);
            assert_eq!(f.api_audiences, lost);
            let minted_after_repair: Vec<&str> = want.clone();
            assert!(accepts(
                &f.issuers,
                &f.api_audiences,
                NEW,
                &minted_after_repair
            ));
            // finalize never drops it while in-cluster audiences are missing.
            let f = desired(&before, &t, &origin);
            assert!(f.api_audiences.iter().any(|a| a == "sts.amazonaws.com"));
        }
        // kubeadm with api-audiences unset after the hand change: the audiences followed the
        // issuer, so pods hold tokens for the new issuer: both stay.
        let d = desired(&flags(&[NEW], None), &target(NEW), &kubeadm());
        assert_eq!(d.issuers, vec![NEW, DEFAULT]);
        assert_eq!(d.api_audiences, vec![DEFAULT, NEW]);
    }

    #[test]
    fn external_audiences_are_recognized() {
        assert!(is_external_audience("sts.amazonaws.com"));
        assert!(is_external_audience("api://AzureADTokenExchange"));
        assert!(!is_external_audience("k3s"));
        assert!(!is_external_audience(DEFAULT));
    }
}
