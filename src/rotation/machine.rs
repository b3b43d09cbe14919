//! The rotation state machine, pure: phases that carry their data, one guarded method per
//! transition, illegal transitions as typed errors, and the times things are due computed from
//! the recorded timestamps. No I/O here; [`super::step`] does the work and persists the result.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one rotation is about; carried by every phase from `staged` to `retired`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    /// The rotation's name: the UTC time it started, `20261122T070542Z`.
    pub id: String,
    pub started_at: u64,
    /// `rsa-2048`, `rsa-3072` or `ecdsa-p256`.
    pub key_type: crate::config::KeyType,
    /// The new key's kid and public half (SPKI PEM; published ahead of use).
    pub new_kid: String,
    pub new_public_pem: String,
    /// The kids retired at the end (k3s: every other key in service.key; kubeadm: the keys of
    /// the verification file the old signing key's public half was in).
    pub old_kids: Vec<String>,
    /// The kid the apiserver signed with when the rotation started.
    pub old_signing_kid: String,
    /// `k3s`, `rke2` or `kubeadm`.
    pub distribution: crate::config::Distribution,
    /// Host path of the new private key (k3s/RKE2: in the agent's state folder until `rotate-ca`
    /// has put it into the datastore; kubeadm: `sa-<id>.key` beside `sa.key`).
    pub new_key_file: String,
    /// kubeadm: the files the old key lived in, which get the new key at retirement so that
    /// `kubeadm upgrade` and `kubeadm join --control-plane` keep working (`sa.key`, `sa.pub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical_files: Option<CanonicalFiles>,
    /// The apiservers of the cluster when the rotation started (their URLs). More than one: the
    /// new key is installed as a verification-only key on every server before it is published.
    pub servers: Vec<String>,
    /// Apiserver restarts this rotation caused on this host.
    pub restarts: u32,
    /// Set (and saved) *before* any change that can make an apiserver sign with the new key:
    /// from then on the new key may have signed tokens and cannot simply be removed again.
    pub may_have_signed: bool,
}

pub use crate::apiserver::kubeadm::CanonicalFiles;

impl InProgress {
    /// More than one apiserver.
    pub fn is_ha(&self) -> bool {
        self.servers.len() > 1
    }
}

/// A reading of `serviceaccount_stale_tokens_total`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StaleReading {
    pub at: u64,
    pub value: f64,
}

/// The phases. Each names what has been *achieved*; the step from it does the next thing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// No rotation in progress. `next_due`: when the next one starts (if enabled).
    Idle { since: u64, next_due: Option<u64> },
    /// The new key exists (written 0600, re-read as the apiserver reads it). With several
    /// apiservers, staging also installs it as a verification-only key on all of them.
    Staged { rotation: InProgress, since: u64 },
    /// JWKS with old + new keys published and seen at the public URL; held until `hold_until`
    /// (public Cache-Control max-age + cdn-ttl + propagation-wait after it was first seen).
    Published {
        rotation: InProgress,
        since: u64,
        seen_public_at: u64,
        hold_until: u64,
    },
    /// Every apiserver verifies with old and new keys.
    Trusted { rotation: InProgress, since: u64 },
    /// Every apiserver signs with the new key (checked with a freshly requested token).
    Signing {
        rotation: InProgress,
        since: u64,
        /// When the last apiserver was seen signing with the new key: the old key signed
        /// nothing after this.
        all_signing_at: u64,
    },
    /// Waiting until every token the old key signed has expired.
    Draining {
        rotation: InProgress,
        since: u64,
        all_signing_at: u64,
        drain_until: u64,
        /// The last reading of the apiserver's stale-token counter (`None`: not readable).
        stale: Option<StaleReading>,
    },
    /// The old keys are gone from the apiservers; the JWKS is republished without them.
    Retired { rotation: InProgress, since: u64 },
}

/// The phase names, for messages, metrics and `status --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PhaseName {
    Idle,
    Staged,
    Published,
    Trusted,
    Signing,
    Draining,
    Retired,
}

impl PhaseName {
    pub fn as_str(self) -> &'static str {
        match self {
            PhaseName::Idle => "idle",
            PhaseName::Staged => "staged",
            PhaseName::Published => "published",
            PhaseName::Trusted => "trusted",
            PhaseName::Signing => "signing",
            PhaseName::Draining => "draining",
            PhaseName::Retired => "retired",
        }
    }

    /// What the step from this phase does, for "next step" messages.
    pub fn next_action(self) -> &'static str {
        match self {
            PhaseName::Idle => "start a rotation: generate and stage a new key",
            PhaseName::Staged => "publish the JWKS with the new key and see it at the public URL",
            PhaseName::Published => {
                "make the apiserver verify with the new key (after the propagation hold)"
            }
            PhaseName::Trusted => "make the apiserver sign with the new key",
            PhaseName::Signing => "start draining the old key",
            PhaseName::Draining => {
                "retire the old key once every token it signed has expired (apiserver restart)"
            }
            PhaseName::Retired => "republish the JWKS without the old key",
        }
    }
}

impl std::fmt::Display for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition that is not allowed from the current phase (or not yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {transition} a rotation that is {from}: {why}")]
pub struct TransitionError {
    pub from: PhaseName,
    pub transition: &'static str,
    pub why: String,
}

fn illegal(from: PhaseName, transition: &'static str, why: impl Into<String>) -> TransitionError {
    TransitionError {
        from,
        transition,
        why: why.into(),
    }
}

/// How long the published JWKS is held before the new key may sign.
pub fn propagation_hold(max_age: Duration, cdn_ttl: Duration, wait: Duration) -> Duration {
    max_age + cdn_ttl + wait
}

impl Phase {
    pub fn name(&self) -> PhaseName {
        match self {
            Phase::Idle { .. } => PhaseName::Idle,
            Phase::Staged { .. } => PhaseName::Staged,
            Phase::Published { .. } => PhaseName::Published,
            Phase::Trusted { .. } => PhaseName::Trusted,
            Phase::Signing { .. } => PhaseName::Signing,
            Phase::Draining { .. } => PhaseName::Draining,
            Phase::Retired { .. } => PhaseName::Retired,
        }
    }

    /// When the phase began.
    pub fn since(&self) -> u64 {
        match self {
            Phase::Idle { since, .. }
            | Phase::Staged { since, .. }
            | Phase::Published { since, .. }
            | Phase::Trusted { since, .. }
            | Phase::Signing { since, .. }
            | Phase::Draining { since, .. }
            | Phase::Retired { since, .. } => *since,
        }
    }

    /// The rotation in progress, if any.
    pub fn rotation(&self) -> Option<&InProgress> {
        match self {
            Phase::Idle { .. } => None,
            Phase::Staged { rotation, .. }
            | Phase::Published { rotation, .. }
            | Phase::Trusted { rotation, .. }
            | Phase::Signing { rotation, .. }
            | Phase::Draining { rotation, .. }
            | Phase::Retired { rotation, .. } => Some(rotation),
        }
    }

    pub fn rotation_mut(&mut self) -> Option<&mut InProgress> {
        match self {
            Phase::Idle { .. } => None,
            Phase::Staged { rotation, .. }
            | Phase::Published { rotation, .. }
            | Phase::Trusted { rotation, .. }
            | Phase::Signing { rotation, .. }
            | Phase::Draining { rotation, .. }
            | Phase::Retired { rotation, .. } => Some(rotation),
        }
    }

    /// When the step from this phase is due by the clock (holds and drains); `None` for an idle
    /// machine with nothing scheduled. Failure back-off and polling come on top
    /// ([`RotationState::due_at`]).
    pub fn due_at(&self) -> Option<u64> {
        match self {
            Phase::Idle { next_due, .. } => *next_due,
            Phase::Published { hold_until, .. } => Some(*hold_until),
            Phase::Draining { drain_until, .. } => Some(*drain_until),
            other => Some(other.since()),
        }
    }

    /// The keys that must be published ahead of the apiserver having them: the new key from
    /// staging until the apiserver itself verifies with it.
    pub fn published_ahead(&self) -> Option<&InProgress> {
        match self {
            Phase::Staged { rotation, .. } | Phase::Published { rotation, .. } => Some(rotation),
            _ => None,
        }
    }

    // ---- transitions -------------------------------------------------------------------

    /// idle -> staged.
    pub fn stage(&self, rotation: InProgress, at: u64) -> Result<Phase, TransitionError> {
        match self {
            Phase::Idle { .. } => Ok(Phase::Staged {
                rotation,
                since: at,
            }),
            other => Err(illegal(
                other.name(),
                "stage",
                "a rotation is already in progress",
            )),
        }
    }

    /// staged -> published: the new kid was seen at the public URL at `seen_at`; held for
    /// `hold`.
    pub fn publish(&self, seen_at: u64, hold: Duration) -> Result<Phase, TransitionError> {
        match self {
            Phase::Staged { rotation, .. } => Ok(Phase::Published {
                rotation: rotation.clone(),
                since: seen_at,
                seen_public_at: seen_at,
                hold_until: seen_at + hold.as_secs(),
            }),
            other => Err(illegal(
                other.name(),
                "publish",
                "only a staged key is published",
            )),
        }
    }

    /// published -> staged: the public copy lost the new key (someone republished without
    /// it); it is published again and held again from when it is seen.
    pub fn unpublish(&self, at: u64) -> Result<Phase, TransitionError> {
        match self {
            Phase::Published { rotation, .. } if !rotation.may_have_signed => Ok(Phase::Staged {
                rotation: rotation.clone(),
                since: at,
            }),
            other => Err(illegal(
                other.name(),
                "unpublish",
                "only a published key that cannot have signed yet goes back to staged",
            )),
        }
    }

    /// published -> trusted, once the hold is over.
    pub fn trust(&self, at: u64) -> Result<Phase, TransitionError> {
        match self {
            Phase::Published {
                rotation,
                hold_until,
                ..
            } if at >= *hold_until => Ok(Phase::Trusted {
                rotation: rotation.clone(),
                since: at,
            }),
            Phase::Published { hold_until, .. } => Err(illegal(
                PhaseName::Published,
                "trust the new key of",
                format!(
                    "the propagation hold lasts until {} ({}s from now): relying parties may still cache a JWKS without the new key",
                    crate::state::rfc3339(*hold_until),
                    hold_until - at
                ),
            )),
            other => Err(illegal(
                other.name(),
                "trust the new key of",
                "the new key must be published and propagated first",
            )),
        }
    }

    /// trusted -> signing: every apiserver signs with the new key since `all_signing_at`.
    pub fn sign(&self, at: u64, all_signing_at: u64) -> Result<Phase, TransitionError> {
        match self {
            Phase::Trusted { rotation, .. } => Ok(Phase::Signing {
                rotation: rotation.clone(),
                since: at,
                all_signing_at,
            }),
            other => Err(illegal(
                other.name(),
                "sign with the new key of",
                "every apiserver must verify with the new key first",
            )),
        }
    }

    /// signing -> draining: the old key's tokens expire `drain` after the last apiserver
    /// switched.
    pub fn drain(
        &self,
        at: u64,
        drain: Duration,
        stale: Option<StaleReading>,
    ) -> Result<Phase, TransitionError> {
        match self {
            Phase::Signing {
                rotation,
                all_signing_at,
                ..
            } => Ok(Phase::Draining {
                rotation: rotation.clone(),
                since: at,
                all_signing_at: *all_signing_at,
                drain_until: all_signing_at + drain.as_secs(),
                stale,
            }),
            other => Err(illegal(
                other.name(),
                "drain",
                "the old key is drained only once the new key signs everywhere",
            )),
        }
    }

    /// draining -> draining: stale tokens were used (or the counter was reset); look again at
    /// `recheck_at`.
    pub fn wait_for_stale_tokens(
        &self,
        reading: StaleReading,
        recheck_at: u64,
    ) -> Result<Phase, TransitionError> {
        self.with_stale_reading(
            reading,
            |drain_until| drain_until.max(recheck_at),
            (
                "wait for stale tokens in",
                "only a draining rotation waits for them",
            ),
        )
    }
    /// draining -> draining: a new reading of the stale-token counter (its value changed, or
    /// it is the first one); the drain's end stays where it is.
    pub fn note_stale_reading(&self, reading: StaleReading) -> Result<Phase, TransitionError> {
        self.with_stale_reading(
            reading,
            |drain_until| drain_until,
            (
                "read stale tokens in",
                "only a draining rotation watches them",
            ),
        )
    }

    /// draining -> draining with `reading` and the drain's end moved by `drain_until`; the
    /// error's words for any other phase.
    fn with_stale_reading(
        &self,
        reading: StaleReading,
        drain_until: impl FnOnce(u64) -> u64,
        (action, why): (&'static str, &str),
    ) -> Result<Phase, TransitionError> {
        match self {
            Phase::Draining {
                rotation,
                since,
                all_signing_at,
                drain_until: until,
                ..
            } => Ok(Phase::Draining {
                rotation: rotation.clone(),
                since: *since,
                all_signing_at: *all_signing_at,
                drain_until: drain_until(*until),
                stale: Some(reading),
            }),
            other => Err(illegal(other.name(), action, why)),
        }
    }
    /// draining -> retired, once the drain is over.
    pub fn retire(&self, at: u64) -> Result<Phase, TransitionError> {
        match self {
            Phase::Draining {
                rotation,
                drain_until,
                ..
            } if at >= *drain_until => Ok(Phase::Retired {
                rotation: rotation.clone(),
                since: at,
            }),
            Phase::Draining { drain_until, .. } => Err(illegal(
                PhaseName::Draining,
                "retire the old key of",
                format!(
                    "tokens signed by the old key may be valid until {}",
                    crate::state::rfc3339(*drain_until)
                ),
            )),
            other => Err(illegal(
                other.name(),
                "retire the old key of",
                "the old key is retired only after draining",
            )),
        }
    }

    /// retired -> idle; the next rotation is due `every` after this one started.
    pub fn finish(&self, at: u64, every: Duration) -> Result<(Phase, Finished), TransitionError> {
        match self {
            Phase::Retired { rotation, .. } => Ok((
                Phase::Idle {
                    since: at,
                    next_due: Some(rotation.started_at + every.as_secs()),
                },
                Finished::of(rotation, at, Ending::Completed),
            )),
            other => Err(illegal(
                other.name(),
                "finish",
                "a rotation finishes once the old key is retired",
            )),
        }
    }

    /// staged/published/trusted -> idle, only while the new key cannot have signed anything.
    pub fn abort(&self, at: u64, every: Duration) -> Result<(Phase, Finished), TransitionError> {
        match self {
            Phase::Idle { .. } => Err(illegal(
                PhaseName::Idle,
                "abort",
                "no rotation is in progress",
            )),
            other => {
                let Some(rotation) = other.rotation() else {
                    return Err(illegal(other.name(), "abort", "no rotation is in progress"));
                };
                if rotation.may_have_signed
                    || matches!(
                        other.name(),
                        PhaseName::Signing | PhaseName::Draining | PhaseName::Retired
                    )
                {
                    return Err(illegal(
                        other.name(),
                        "abort",
                        format!(
                            "the new key {} may have signed tokens already; removing it would reject them",
                            rotation.new_kid
                        ),
                    ));
                }
                Ok((
                    Phase::Idle {
                        since: at,
                        // Try again one period later, not immediately.
                        next_due: Some(at + every.as_secs()),
                    },
                    Finished::of(rotation, at, Ending::Aborted),
                ))
            }
        }
    }
}

/// A finished (or aborted) rotation, kept in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub id: String,
    pub started_at: u64,
    pub finished_at: u64,
    pub new_kid: String,
    pub retired_kids: Vec<String>,
    pub restarts: u32,
    pub outcome: Ending,
}

/// How a rotation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    /// The old keys were retired.
    Completed,
    /// `rotate --abort`: the new key was removed before it could sign.
    Aborted,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ending::Completed => "completed",
            Ending::Aborted => "aborted",
        })
    }
}

impl Finished {
    fn of(rotation: &InProgress, at: u64, outcome: Ending) -> Finished {
        Finished {
            id: rotation.id.clone(),
            started_at: rotation.started_at,
            finished_at: at,
            new_kid: rotation.new_kid.clone(),
            retired_kids: if outcome == Ending::Completed {
                rotation.old_kids.clone()
            } else {
                Vec::new()
            },
            restarts: rotation.restarts,
            outcome,
        }
    }
}

/// The outcome of the last step, failed ones included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub at: u64,
    /// The phase the step started from.
    pub from: String,
    /// The phase it ended in.
    pub to: String,
    pub ok: bool,
    pub message: String,
}

/// The persisted `rotation` section of the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationState {
    /// Flattened: `{"phase": "published", "since": ..., "rotation": {...}, "last_step": ...}`.
    #[serde(flatten)]
    pub phase: Phase,
    #[serde(default)]
    pub last_step: Option<StepRecord>,
    /// Consecutive failed steps (for the back-off).
    #[serde(default)]
    pub failures: u32,
    /// Not before this time: back-off after a failure, or the next look while waiting for
    /// something outside (the public copy, other servers, stale tokens).
    #[serde(default)]
    pub not_before: Option<u64>,
    /// The last rotations, newest last (at most [`HISTORY`]).
    #[serde(default)]
    pub history: Vec<Finished>,
    /// The step is blocked: the evidence that guards it could not be read (the apiserver did
    /// not answer). Nothing irreversible happens until it can; retried with a back-off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<Blocked>,
    /// How the first rotation's due time was chosen (the signing key's age, and the evidence
    /// for it), recorded when the state is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_age: Option<KeyAge>,
}

/// A step that waits for evidence it could not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// When it was first blocked.
    pub since: u64,
    /// What it waits for, in words.
    pub waiting_for: String,
    /// Consecutive blocked attempts (for the back-off).
    pub attempts: u32,
}

/// The age of the signing key in use when rotation first ran on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAge {
    /// The signing key's kid.
    pub kid: String,
    /// When it came into use, as far as the host can tell.
    pub since: u64,
    /// Which evidence `since` is (`installed`: a key file's modification time; `first-seen`:
    /// when irsa-agent first saw it), with the file.
    pub evidence: String,
    pub detail: String,
}

/// How many finished rotations the state keeps.
pub const HISTORY: usize = 10;

impl RotationState {
    /// A machine that has never rotated: idle since `now`, the first rotation due `every` later.
    pub fn new(now: u64, every: Duration) -> RotationState {
        RotationState {
            phase: Phase::Idle {
                since: now,
                next_due: Some(now + every.as_secs()),
            },
            last_step: None,
            failures: 0,
            not_before: None,
            history: Vec::new(),
            blocked: None,
            key_age: None,
        }
    }

    /// A machine that has never rotated, whose first rotation is due `every` after the signing
    /// key in use came into use (`key.since`; never before `now` is known better than that).
    pub fn first(now: u64, every: Duration, key: Option<KeyAge>) -> RotationState {
        let born = key.as_ref().map_or(now, |k| k.since.min(now));
        RotationState {
            phase: Phase::Idle {
                since: now,
                next_due: Some(born + every.as_secs()),
            },
            key_age: key,
            ..RotationState::new(now, every)
        }
    }

    /// When the next step is due: the phase's own time, pushed back by a failure back-off or a
    /// poll interval.
    pub fn due_at(&self) -> Option<u64> {
        let due = self.phase.due_at()?;
        Some(match self.not_before {
            Some(nb) => due.max(nb),
            None => due,
        })
    }

    /// Records how the last step ended (what `status` shows as the last step).
    pub fn record_step(
        &mut self,
        at: u64,
        from: PhaseName,
        to: PhaseName,
        ok: bool,
        message: String,
    ) {
        self.last_step = Some(StepRecord {
            at,
            from: from.to_string(),
            to: to.to_string(),
            ok,
            message,
        });
    }

    /// Records a finished rotation.
    pub fn remember(&mut self, finished: Finished) {
        self.history.push(finished);
        if self.history.len() > HISTORY {
            let extra = self.history.len() - HISTORY;
            self.history.drain(..extra);
        }
    }
}

/// The back-off after `failures` consecutive failed steps: 1 min, doubling, at most 1 h.
pub fn backoff(failures: u32) -> Duration {
    backoff_from(Duration::from_secs(60), failures)
}

/// The same back-off starting at `first` instead of a minute (blocked steps start at the
/// rotation's re-check interval), doubling, at most 1 h.
pub fn backoff_from(first: Duration, attempts: u32) -> Duration {
    let secs = first
        .as_secs()
        .max(1)
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(12));
    Duration::from_secs(secs.min(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotation() -> InProgress {
        InProgress {
            id: "20261122T000000Z".into(),
            started_at: 1000,
            key_type: crate::config::KeyType::Rsa2048,
            new_kid: "new".into(),
            new_public_pem: String::new(),
            old_kids: vec!["old".into()],
            old_signing_kid: "old".into(),
            distribution: crate::config::Distribution::K3s,
            new_key_file: "/x".into(),
            canonical_files: None,
            servers: vec!["https://127.0.0.1:6443".into()],
            restarts: 0,
            may_have_signed: false,
        }
    }

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn a_whole_rotation_in_order_with_the_clock_guards() -> Result<(), TransitionError> {
        let idle = RotationState::new(0, 90 * 24 * H).phase;
        assert_eq!(idle.due_at(), Some(90 * 24 * 3600));
        let staged = idle.stage(rotation(), 1000)?;
        assert_eq!(
            staged.published_ahead().map(|r| r.new_kid.as_str()),
            Some("new")
        );
        let published = staged.publish(1100, propagation_hold(H, Duration::ZERO, H))?;
        assert_eq!(published.due_at(), Some(1100 + 7200));
        // Too early: a typed error that says until when.
        let early = published.trust(1100 + 7199);
        assert!(
            matches!(&early, Err(e) if e.from == PhaseName::Published && e.why.contains("propagation hold"))
        );
        let trusted = published.trust(1100 + 7200)?;
        assert_eq!(trusted.published_ahead(), None);
        let signing = trusted.sign(9000, 9000)?;
        let draining = signing.drain(9001, 25 * H, None)?;
        assert_eq!(draining.due_at(), Some(9000 + 25 * 3600));
        assert!(draining.retire(9000 + 25 * 3600 - 1).is_err());
        let retired = draining.retire(9000 + 25 * 3600)?;
        let (idle, finished) = retired.finish(200_000, 90 * 24 * H)?;
        assert_eq!(idle.due_at(), Some(1000 + 90 * 24 * 3600));
        assert_eq!(finished.retired_kids, vec!["old".to_string()]);
        assert_eq!(finished.outcome, Ending::Completed);
        Ok(())
    }

    #[test]
    fn persisted_names_round_trip_and_an_unknown_one_is_an_error_naming_it()
    -> Result<(), Box<dyn std::error::Error>> {
        let mut state = RotationState::new(0, H);
        state.phase = state.phase.stage(rotation(), 1000)?;
        let text = serde_json::to_string(&state)?;
        assert!(text.contains(r#""key_type":"rsa-2048""#), "{text}");
        assert!(text.contains(r#""distribution":"k3s""#), "{text}");
        assert_eq!(serde_json::from_str::<RotationState>(&text)?, state);
        // Once read as RSA-2048 whatever it said; now the value is named and nothing is guessed.
        let unknown = text.replace(r#""key_type":"rsa-2048""#, r#""key_type":"rsa-1024""#);
        let err = serde_json::from_str::<RotationState>(&unknown)
            .err()
            .ok_or("an unknown key type was accepted")?;
        assert!(err.to_string().contains("rsa-1024"), "{err}");
        let unknown = text.replace(r#""distribution":"k3s""#, r#""distribution":"k0s""#);
        let err = serde_json::from_str::<RotationState>(&unknown)
            .err()
            .ok_or("an unknown distribution was accepted")?;
        assert!(err.to_string().contains("k0s"), "{err}");
        Ok(())
    }

    #[test]
    fn illegal_transitions_are_typed_errors() -> Result<(), TransitionError> {
        let idle = RotationState::new(0, H).phase;
        for result in [
            idle.publish(1, H).map(|_| ()),
            idle.trust(1).map(|_| ()),
            idle.sign(1, 1).map(|_| ()),
            idle.drain(1, H, None).map(|_| ()),
            idle.retire(1).map(|_| ()),
            idle.finish(1, H).map(|_| ()),
            idle.abort(1, H).map(|_| ()),
        ] {
            let err = result.err();
            assert_eq!(err.map(|e| e.from), Some(PhaseName::Idle));
        }
        let staged = idle.stage(rotation(), 1)?;
        assert!(staged.stage(rotation(), 2).is_err());
        assert!(
            staged.trust(10_000_000).is_err(),
            "never trusted unpublished"
        );
        assert!(staged.retire(10_000_000).is_err());
        Ok(())
    }

    #[test]
    fn abort_only_while_the_new_key_cannot_have_signed() -> Result<(), TransitionError> {
        let idle = RotationState::new(0, H).phase;
        let staged = idle.stage(rotation(), 1)?;
        let (back, finished) = staged.abort(5, H)?;
        assert_eq!(back.name(), PhaseName::Idle);
        assert_eq!(back.due_at(), Some(5 + 3600));
        assert_eq!(finished.outcome, Ending::Aborted);
        assert!(finished.retired_kids.is_empty());
        let published = staged.publish(2, H)?;
        assert!(published.abort(5, H).is_ok());
        let mut trusted = published.trust(2 + 3600)?;
        assert!(trusted.abort(5000, H).is_ok());
        if let Some(r) = trusted.rotation_mut() {
            r.may_have_signed = true;
        }
        let err = trusted.abort(5000, H).err();
        assert!(err.is_some_and(|e| e.why.contains("may have signed")));
        let signing = trusted.sign(6000, 6000)?;
        assert!(signing.abort(7000, H).is_err());
        Ok(())
    }

    #[test]
    fn stale_tokens_push_the_retirement_back() -> Result<(), TransitionError> {
        let draining = RotationState::new(0, H)
            .phase
            .stage(rotation(), 0)?
            .publish(0, Duration::ZERO)?
            .trust(0)?
            .sign(0, 0)?
            .drain(0, H, Some(StaleReading { at: 0, value: 3.0 }))?;
        let later = draining.wait_for_stale_tokens(
            StaleReading {
                at: 3600,
                value: 5.0,
            },
            7200,
        )?;
        assert_eq!(later.due_at(), Some(7200));
        assert!(later.retire(7199).is_err());
        assert!(later.retire(7200).is_ok());
        Ok(())
    }

    #[test]
    fn state_round_trips_through_json_with_the_phase_as_a_tag() -> Result<(), serde_json::Error> {
        let mut state = RotationState::new(0, H);
        state.phase = Phase::Published {
            rotation: rotation(),
            since: 5,
            seen_public_at: 5,
            hold_until: 10,
        };
        let text = serde_json::to_string(&state)?;
        assert!(text.contains("\"phase\":\"published\""), "{text}");
        let back: RotationState = serde_json::from_str(&text)?;
        assert_eq!(back, state);
        Ok(())
    }

    #[test]
    fn metrics_name_the_phase_and_the_next_step() {
        let mut state = RotationState::new(100, H);
        assert!(
            crate::rotation::metrics_text(None)
                .contains("irsa_agent_rotation_phase{phase=\"idle\"} 1\n")
        );
        state.phase = Phase::Published {
            rotation: rotation(),
            since: 5,
            seen_public_at: 5,
            hold_until: 10,
        };
        let text = crate::rotation::metrics_text(Some(&state));
        assert!(
            text.contains("irsa_agent_rotation_phase{phase=\"published\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("irsa_agent_rotation_phase{phase=\"idle\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("irsa_agent_rotation_next_step_timestamp_seconds 10\n"),
            "{text}"
        );
        assert!(
            text.contains("irsa_agent_rotation_apiserver_restarts 0\n"),
            "{text}"
        );
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(60));
        assert_eq!(backoff(2), Duration::from_secs(120));
        assert_eq!(backoff(7), Duration::from_secs(3600));
        assert_eq!(backoff(40), Duration::from_secs(3600));
    }
}
