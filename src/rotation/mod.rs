//! Unattended service-account signing-key rotation with zero rejected tokens.
//!
//! # The machine
//!
//! ```text
//!            every (or --now)            seen at the public URL
//!   ┌──────┐ ───────────────> ┌────────┐ ──────────────────────> ┌───────────┐
//!   │ idle │                  │ staged │                         │ published │  hold: public max-age
//!   └──────┘ <─────────────── └────────┘ <────────── abort ───── └───────────┘  + cdn-ttl
//!      ^          abort          │  new key written 0600,              │        + propagation-wait
//!      │                         │  re-read as the apiserver reads it; │
//!      │                         │  several servers: installed as a    │ hold over: the apiserver
//!      │                         │  verification-only key everywhere   │ verifies with both keys
//!      │                                                               v
//!   ┌─────────┐  old key gone from  ┌──────────┐  drain over,  ┌─────────┐ <── every apiserver   ┌─────────┐
//!   │ retired │ <────────────────── │ draining │ <──────────── │ signing │     signs with the    │ trusted │
//!   └─────────┘  apiservers + JWKS  └──────────┘  token-life-  └─────────┘ <──────────────────── └─────────┘
//!      │   republished without it       │         time + margin            new key (fresh token
//!      └──> idle (next due: start + every)  no stale-token use, no legacy   verified against the
//!                                           Secret token of the old key     public JWKS)
//! ```
//!
//! Each phase is an enum variant carrying its data ([`machine::Phase`]); each transition is one
//! guarded method that returns a [`machine::TransitionError`] when it is illegal or not due;
//! the state and the outcome of the last step (failed ones included) are saved in the
//! `rotation` section of `/var/lib/irsa-agent/state.json` after every step; delays come from
//! the recorded timestamps ([`machine::RotationState::due_at`]), never from a blind sleep.
//!
//! # The invariant
//!
//! At every moment the published JWKS and every apiserver's verification keys contain every key
//! that may have signed a token that is still valid:
//! - the new key is published, seen at the public URL and held for the caches' lifetime
//!   *before* any apiserver can sign with it ([`RotationState::phase`] records `may_have_signed`
//!   before the change that makes it sign);
//! - on several servers every apiserver verifies with the new key before any signs with it, and
//!   every apiserver has it before it is published (a server's agent publishes what its
//!   apiserver has: publish's conflict merge protects against races, not against a node that
//!   lacks a key);
//! - the old keys stay in both until token-lifetime (or the apiserver's
//!   `--service-account-max-token-expiration`, if longer) + drain-margin after the *last*
//!   apiserver stopped signing with them, and while the apiserver's
//!   `serviceaccount_stale_tokens_total` still rises (the 1-year `kube-api-access` tokens, see
//!   [`STALE_TOKENS`]) or a legacy token Secret still carries an old-key token.
//!
//! # Distributions
//!
//! See [`distro`] for what each install does on k3s/RKE2 (`certificate rotate-ca`, key order in
//! `service.key`) and kubeadm (new `sa-<id>` files, apiserver and controller-manager flags).
//! Apiserver restarts per rotation: one server 2 (trust, retire); N servers 3 per server
//! (verify-only, sign, retire).
//!
//! # Several servers
//!
//! One agent drives the cluster's rotation (it holds the rotation Lease); the others follow it
//! ([`follow`]), one restart at a time (the restart Lease), and the driver advances only once
//! every apiserver has what the previous step installed. k3s/RKE2 share the key through the
//! datastore (`certificate rotate-ca`); kubeadm nodes each have their own files, so the driver
//! shares the new key sealed with the signing key every node already has ([`seal`]) and each
//! follower installs the steps on its own host.
//!
//! # Outside systems
//!
//! The clock ([`crate::clock::Clock`]), the apiservers ([`cluster::Cluster`]), publishing
//! ([`publishing::Publishing`]), the service manager ([`ServiceManager`]) and the distribution's
//! binary ([`runner::CommandRunner`]) are traits; tests run whole rotations on a simulated clock
//! against fakes. [`step`] is the entry point for the daemon; [`advance`] for `irsa-agent
//! rotate`.

pub mod cluster;
pub mod follow;
pub mod keygen;
pub mod machine;
pub mod publishing;
pub mod runner;
pub mod seal;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use self::cluster::Cluster;
use self::keygen::NewKey;
use self::machine::InProgress;
pub use self::machine::{
    Blocked, KeyAge, Phase, PhaseName, RotationState, StaleReading, TransitionError,
};
use self::publishing::Publishing;
use self::runner::CommandRunner;
use crate::apiserver::change::{self, Turned};
use crate::apiserver::install::{self, HostChange, Install, Installing, NewKeyPem, Refusal};
use crate::apiserver::ready::{self, Patience};
use crate::apiserver::restart::{self, Restart, ServiceManager};
use crate::apiserver::{Observed, apply, flags};
use crate::clock::Clock;
use crate::config::{Settings, format_duration};
use crate::fs::{self, NewFile};
use crate::host::HostRoot;
use crate::keys::{self, PublicKey};
use crate::membership;
use crate::publish::Publication;
use crate::state::{self, State, StateError};

/// Why retirement waits for the stale-token counter; printed when it does.
pub const STALE_TOKENS: &str = "\
kube-apiserver (--service-account-extend-token-expiration, on by default) gives the kube-api-access \
tokens kubelet mounts into pods a 1-year exp although they are meant to live about an hour: kubelet \
rewrites the file after ~48 minutes, but a client that read its token once can keep presenting one \
signed by the old key for up to a year. The apiserver counts requests with such tokens past their \
intended expiry in serviceaccount_stale_tokens_total (and annotates the audit events \
authentication.k8s.io/stale-token). While that counter rises, retiring the old key could reject a \
client; find it in the audit log and restart it, or run `irsa-agent rotate --ignore-stale-tokens` \
(the daemon: `rotation.ignore-stale-tokens: \"<reason>\"`).";

/// How long the stale-token counter must stay flat before the old key is retired, at most
/// (shorter when the whole drain is shorter: [`crate::config::Rotation::stale_quiet`]).
pub const STALE_QUIET: Duration = crate::config::STALE_QUIET_MAX;

/// The Cache-Control max-age assumed when neither the public copy nor the configuration gives
/// one (what kube-apiserver itself serves its JWKS with).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

/// How a rotation is driven.
#[derive(Debug, Clone)]
pub struct Options {
    /// Start a rotation even if none is due (`rotate --now`).
    pub start_now: bool,
    /// Retire even though the stale-token counter rises (`rotate --ignore-stale-tokens`).
    pub ignore_stale_tokens: bool,
    /// How long to wait for a restarted apiserver.
    pub restart_timeout: Duration,
    /// How often to ask it while waiting.
    pub poll: Duration,
    /// When to look again while waiting for something outside the agent (the public copy, the
    /// other servers).
    pub recheck: Duration,
    /// The service unit to restart (default: detected).
    pub unit: Option<String>,
    /// Look again now at what the rotation waits for (a legacy Secret, the stale-token
    /// counter, an apiserver that did not answer) instead of at the saved re-check time: a
    /// person ran `irsa-agent rotate`. Holds and drains are never shortened.
    pub look_now: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            start_now: false,
            ignore_stale_tokens: false,
            restart_timeout: Duration::from_secs(300),
            poll: Duration::from_secs(2),
            recheck: Duration::from_secs(60),
            unit: None,
            look_now: false,
        }
    }
}

/// Everything a step needs: the host, the settings and the outside systems.
pub struct Context {
    pub root: HostRoot,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
    pub cluster: Box<dyn Cluster>,
    pub publishing: Box<dyn Publishing>,
    pub services: Box<dyn ServiceManager + Send>,
    pub runner: Box<dyn CommandRunner>,
    pub options: Options,
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    pub phase: PhaseName,
    /// A transition happened.
    pub progressed: bool,
    /// When the next step is due (`None`: nothing scheduled, e.g. rotation disabled).
    pub next_due: Option<u64>,
    /// One line for logs and `status`.
    pub status_line: String,
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The host is not in a state rotation can handle; nothing was changed.
    #[error("refusing to rotate: {0}")]
    Refused(String),
    /// Something failed half-way; the step is retried with a back-off.
    #[error("{0}")]
    Failed(String),
    /// Not this server's turn to restart its apiserver (another one restarts, or a peer
    /// apiserver is down): nothing was changed. A step waits for it (looks again at the
    /// re-check interval) instead of failing: the back-off of a failure grows to an hour, and
    /// the cluster must resume as soon as the peer is back.
    #[error("{0}")]
    Turn(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<Refusal> for RotationError {
    fn from(r: Refusal) -> Self {
        RotationError::Refused(r.0)
    }
}

/// What a handler achieved.
enum Progress {
    /// A new phase.
    Advanced(Box<Phase>, String),
    /// Still waiting for something outside; look again at the time given.
    Waiting(String, u64),
    /// The evidence that guards the step could not be read (the apiserver did not answer):
    /// nothing was done; retried with a back-off from the re-check interval.
    Blocked(String),
}

/// The key of rotation's section in the state file.
pub const STATE_KEY: &str = "rotation";

/// Loads the rotation state (`None`: never rotated).
pub fn load_state(root: &HostRoot) -> Result<Option<RotationState>, StateError> {
    let state = State::load(root)?;
    match state.other.get(STATE_KEY) {
        None => Ok(None),
        Some(value) => serde_json::from_value(value.clone())
            .map(Some)
            .map_err(|source| StateError::Parse {
                path: PathBuf::from(state::STATE_FILE),
                source,
            }),
    }
}

/// Pushes this server's own next rotation back to `every` after `now` when it is due already,
/// while it follows the rotation another server's agent drives: the cluster's keys are being
/// replaced now, and a follower that kept its old due time would start a second rotation the
/// moment the driver finishes (every server of a k3s cluster whose key is older than `every`
/// is due at once). Only an idle state changes; returns the new due time when it did.
pub fn postpone_while_following(
    root: &HostRoot,
    now: u64,
    every: Duration,
) -> Result<Option<u64>, StateError> {
    let Some(mut st) = load_state(root)? else {
        return Ok(None);
    };
    let Phase::Idle { next_due, .. } = &mut st.phase else {
        return Ok(None);
    };
    if !next_due.is_some_and(|due| due <= now) {
        return Ok(None);
    }
    let due = now + every.as_secs();
    *next_due = Some(due);
    save_state(root, &st)?;
    Ok(Some(due))
}

fn save_state(root: &HostRoot, st: &RotationState) -> Result<(), StateError> {
    let value = serde_json::to_value(st).map_err(|e| StateError::Write {
        path: PathBuf::from(state::STATE_FILE),
        source: std::io::Error::other(e),
    })?;
    State::update(root, |state| {
        sweep_dead_temp_files(root);
        state.other.insert(STATE_KEY.to_string(), value);
    })
}

/// Removes temp files of the state file left by a process that died writing it (the pid in
/// the name is gone); never one another process is writing right now.
fn sweep_dead_temp_files(root: &HostRoot) {
    let Ok(entries) = std::fs::read_dir(root.path(state::STATE_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(".state.json.irsa-agent-tmp.") else {
            continue;
        };
        let pid = rest.split('.').next().unwrap_or("");
        let alive = !pid.is_empty() && std::path::Path::new("/proc").join(pid).exists();
        if !alive && fs::remove_durable(&entry.path()).is_ok() {
            log::info!("removed {name}, left by an interrupted write of the state file");
        }
    }
}

/// The keys to publish ahead of the apiserver having them (the new key from staging until the
/// apiserver verifies with it). `publish` adds them to what it reads from the host, so neither
/// the daemon nor `irsa-agent publish` removes a key rotation is propagating.
pub fn published_ahead(root: &HostRoot) -> Vec<PublicKey> {
    let Ok(Some(st)) = load_state(root) else {
        return Vec::new();
    };
    st.phase
        .published_ahead()
        .and_then(|r| keys::parse_verification_keys(r.new_public_pem.as_bytes()).ok())
        .map(|k| k.keys)
        .unwrap_or_default()
}

fn due_text(due: Option<u64>, now: u64) -> String {
    match due {
        None => "nothing scheduled".to_string(),
        Some(d) if d <= now => "now".to_string(),
        Some(d) => format!(
            "at {} (in {})",
            state::rfc3339(d),
            format_duration(Duration::from_secs(d - now))
        ),
    }
}

/// The rotation lines of `irsa-agent status` / `rotate --status`: phase, since when, what comes
/// next and when, the last step's outcome.
pub fn status_lines(st: Option<&RotationState>, settings: &Settings, now: u64) -> Vec<String> {
    status_lines_on(None, st, settings, now)
}

/// [`status_lines`] on a host: before the first rotation it also says when the first one is
/// due by the age of the signing key (read from the host's key files under `root`).
pub fn status_lines_on(
    root: Option<&HostRoot>,
    st: Option<&RotationState>,
    settings: &Settings,
    now: u64,
) -> Vec<String> {
    let mut out = Vec::new();
    let Some(st) = st else {
        out.push(format!(
            "rotation: never run ({}){}",
            if settings.rotation.enabled {
                format!(
                    "enabled, every {}",
                    format_duration(settings.rotation.every)
                )
            } else {
                "disabled".to_string()
            },
            "; `irsa-agent rotate --now` starts one"
        ));
        if let Some(root) = root {
            let age = signing_key_age(root, settings, now);
            out.push(format!(
                "  {}",
                first_due_line(age.as_ref(), settings.rotation.every, now)
            ));
        }
        return out;
    };
    out.extend(state_lines(st, settings.rotation.enabled, now));
    out
}

/// When the signing key in use came into use, by the best evidence the host has: the oldest
/// modification time of the files holding it (the signing-key file, the verification files
/// with its public half): when it was installed. `None` when the key files cannot be read.
pub fn signing_key_age(root: &HostRoot, settings: &Settings, now: u64) -> Option<KeyAge> {
    let observed = install::observe(root, settings.distribution).ok()?;
    let kid = observed.keys.signing.as_ref()?.kid();
    let mut files: Vec<String> = observed.flags.signing_key_file.iter().cloned().collect();
    for file in &observed.flags.key_files {
        if keys::load_verification_file(&root.path(file))
            .is_ok_and(|k| k.keys.iter().any(|key| key.kid() == kid))
        {
            files.push(file.clone());
        }
    }
    let oldest = files
        .iter()
        .filter_map(|f| {
            let modified = std::fs::metadata(root.path(f)).ok()?.modified().ok()?;
            let secs = modified
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs();
            Some((secs, f.clone()))
        })
        .min();
    Some(match oldest {
        Some((at, file)) if at <= now => KeyAge {
            kid,
            since: at,
            evidence: "installed".into(),
            detail: format!(
                "written {} (the modification time of {})",
                state::rfc3339(at),
                file
            ),
        },
        _ => KeyAge {
            kid,
            since: now,
            evidence: "first-seen".into(),
            detail: format!(
                "first seen by irsa-agent at {} (no key file has a usable modification time)",
                state::rfc3339(now)
            ),
        },
    })
}

/// The `rotate --status` line saying when the first rotation is due and why.
fn first_due_line(age: Option<&KeyAge>, every: Duration, now: u64) -> String {
    match age {
        Some(a) => {
            let due = a.since.min(now) + every.as_secs();
            format!(
                "first rotation due {} ({} after the signing key {} came into use: {}; it is {} old)",
                due_text(Some(due), now),
                format_duration(every),
                a.kid,
                a.detail,
                format_duration(Duration::from_secs(now.saturating_sub(a.since)))
            )
        }
        None => format!(
            "first rotation due {} after irsa-agent first steps the rotation (the signing key's files cannot be read now, so its age is unknown)",
            format_duration(every)
        ),
    }
}

/// The lines describing a saved rotation state (for `irsa-agent status`, which may have no
/// valid configuration at hand): `enabled` is `rotation.enabled`.
pub fn state_lines(st: &RotationState, enabled: bool, now: u64) -> Vec<String> {
    let mut out = Vec::new();
    let phase = st.phase.name();
    out.push(format!(
        "rotation: {phase} since {}",
        state::rfc3339(st.phase.since())
    ));
    if let Some(r) = st.phase.rotation() {
        out.push(format!(
            "  rotation {} ({}): new key {}, retiring {}; {} apiserver restart(s) so far{}",
            r.id,
            r.key_type,
            r.new_kid,
            r.old_kids.join(", "),
            r.restarts,
            if r.is_ha() {
                format!("; {} servers", r.servers.len())
            } else {
                String::new()
            }
        ));
    }
    match (&st.phase, enabled) {
        (Phase::Idle { .. }, false) => out.push(
            "  next: nothing (rotation.enabled is false; `irsa-agent rotate --now` starts one)"
                .to_string(),
        ),
        _ => out.push(format!(
            "  next: {} {}",
            phase.next_action(),
            due_text(st.due_at(), now)
        )),
    }
    if let Some(b) = &st.blocked {
        out.push(format!(
            "  BLOCKED since {} ({} attempt(s)): waiting for {}; nothing irreversible happens until it can be read; next look {}",
            state::rfc3339(b.since),
            b.attempts,
            b.waiting_for,
            due_text(st.due_at(), now)
        ));
    }
    if let (Phase::Idle { .. }, true, Some(age)) = (&st.phase, st.history.is_empty(), &st.key_age) {
        out.push(format!(
            "  first rotation: due by the signing key's age: {} came into use {} ({})",
            age.kid,
            state::rfc3339(age.since),
            age.detail
        ));
    }
    if let Some(last) = &st.last_step {
        out.push(format!(
            "  last step: {} {} ({} -> {}): {}",
            state::rfc3339(last.at),
            if last.ok { "ok" } else { "FAILED" },
            last.from,
            last.to,
            last.message
        ));
    }
    if let Some(done) = st.history.last() {
        out.push(format!(
            "  last rotation: {} {} at {} (new key {}, {} restart(s))",
            done.id,
            done.outcome,
            state::rfc3339(done.finished_at),
            done.new_kid,
            done.restarts
        ));
    }
    out
}

/// The rotation part of `status --json`.
pub fn status_json(st: Option<&RotationState>, settings: &Settings, now: u64) -> serde_json::Value {
    let Some(st) = st else {
        return serde_json::json!({"phase": null, "enabled": settings.rotation.enabled});
    };
    serde_json::json!({
        "enabled": settings.rotation.enabled,
        "phase": st.phase.name(),
        "since": state::rfc3339(st.phase.since()),
        "next_due": st.due_at().map(state::rfc3339),
        "due_now": st.due_at().is_some_and(|d| d <= now),
        "rotation": st.phase.rotation(),
        "last_step": st.last_step,
        "blocked": st.blocked,
        "key_age": st.key_age,
        "history": st.history,
    })
}

/// The rotation's metrics in the Prometheus text format, for the daemon's metrics endpoint or
/// a node-exporter textfile: `irsa_agent_rotation_phase{phase=...}` (1 for the current one),
/// `irsa_agent_rotation_phase_since_timestamp_seconds`,
/// `irsa_agent_rotation_next_step_timestamp_seconds`, `irsa_agent_rotation_step_failures`
/// (consecutive), `irsa_agent_rotation_apiserver_restarts` (of the rotation in progress),
/// `irsa_agent_rotation_last_completed_timestamp_seconds`.
pub fn metrics_text(st: Option<&RotationState>) -> String {
    let mut x = crate::exposition::Exposition::default();
    let current = st.map_or(PhaseName::Idle, |s| s.phase.name());
    let phases = [
        PhaseName::Idle,
        PhaseName::Staged,
        PhaseName::Published,
        PhaseName::Trusted,
        PhaseName::Signing,
        PhaseName::Draining,
        PhaseName::Retired,
    ];
    x.family(
        "rotation_phase",
        "gauge",
        "The signing-key rotation phase (1 = current).",
        phases.map(|phase| {
            (
                format!("{{phase=\"{phase}\"}}"),
                u8::from(current == phase).to_string(),
            )
        }),
    );
    let Some(st) = st else {
        return x.finish();
    };
    x.gauge(
        "rotation_phase_since_timestamp_seconds",
        "When the current rotation phase began.",
        st.phase.since(),
    );
    if let Some(due) = st.due_at() {
        x.gauge(
            "rotation_next_step_timestamp_seconds",
            "When the next rotation step is due.",
            due,
        );
    }
    x.gauge(
        "rotation_step_failures",
        "Consecutive failed rotation steps.",
        st.failures,
    );
    x.gauge(
        "rotation_blocked",
        "1 while the next rotation step waits for evidence it could not read (the apiserver did not answer); nothing irreversible happens meanwhile.",
        u8::from(st.blocked.is_some()),
    );
    if let Some(b) = &st.blocked {
        x.gauge(
            "rotation_blocked_since_timestamp_seconds",
            "Since when the next rotation step is blocked.",
            b.since,
        );
    }
    if let Some(r) = st.phase.rotation() {
        x.gauge(
            "rotation_apiserver_restarts",
            "Apiserver restarts the rotation in progress caused on this host.",
            r.restarts,
        );
    }
    if let Some(done) = st
        .history
        .iter()
        .rev()
        .find(|h| h.outcome == machine::Ending::Completed)
    {
        x.gauge(
            "rotation_last_completed_timestamp_seconds",
            "When the last rotation completed.",
            done.finished_at,
        );
    }
    x.finish()
}

/// Runs [`step`] until nothing more is due now (the clock is read after each step, so a
/// rotation advances through phases that are due back to back). Returns every step's outcome.
pub async fn advance(ctx: &mut Context) -> Result<Vec<StepOutcome>, RotationError> {
    let mut outcomes = Vec::new();
    for _ in 0..16 {
        let now = ctx.clock.now();
        let outcome = step(ctx, now).await?;
        let again = outcome.progressed && outcome.next_due.is_some_and(|d| d <= ctx.clock.now());
        outcomes.push(outcome);
        ctx.options.start_now = false;
        if !again {
            break;
        }
    }
    Ok(outcomes)
}

/// Takes the rotation lock (one step at a time, across processes).
fn lock(root: &HostRoot) -> Result<fs::DirLock, RotationError> {
    let dir = root.path(install::ROTATION_DIR);
    fs::create_dir_all(&dir, 0o700).map_err(|e| {
        RotationError::Failed(format!("cannot create {}: {e}", install::ROTATION_DIR))
    })?;
    fs::lock_dir(&dir)
        .map_err(|e| RotationError::Failed(format!("cannot lock {}: {e}", install::ROTATION_DIR)))
}

/// Does the step that is due now (at most one transition), saves the state and the outcome,
/// and says when the next one is due. A failed step is saved too, with a back-off.
pub async fn step(ctx: &mut Context, now: u64) -> Result<StepOutcome, RotationError> {
    let _lock = lock(&ctx.root)?;
    let mut st = match load_state(&ctx.root)? {
        Some(st) => st,
        None => {
            let age = signing_key_age(&ctx.root, &ctx.settings, now);
            let st = RotationState::first(now, ctx.settings.rotation.every, age);
            if let Some(a) = &st.key_age {
                log::info!(
                    "rotation: the signing key {} came into use {} ({}); the first rotation is due {}",
                    a.kid,
                    state::rfc3339(a.since),
                    a.detail,
                    due_text(st.due_at(), now)
                );
            }
            save_state(&ctx.root, &st)?;
            st
        }
    };
    let from = st.phase.name();
    let idle_start = matches!(st.phase, Phase::Idle { .. }) && ctx.options.start_now;
    if matches!(st.phase, Phase::Idle { .. }) && !ctx.settings.rotation.enabled && !idle_start {
        return Ok(StepOutcome {
            phase: from,
            progressed: false,
            next_due: None,
            status_line: "rotation is disabled (rotation.enabled: false)".into(),
        });
    }
    // Whatever is due: the host must still have what the rotation installed (kubeadm upgrade
    // regenerates the manifests with sa.key/sa.pub).
    if matches!(
        from,
        PhaseName::Trusted | PhaseName::Signing | PhaseName::Draining
    ) {
        let mut run = Run {
            ctx: &mut *ctx,
            st: &mut st,
        };
        if let Err(e) = run.reinstall_if_lost().await {
            log::error!("rotation: {e}");
            let _ = save_state(&ctx.root, &st);
            return Err(e);
        }
    }
    // A person asking (`irsa-agent rotate`) looks again now at what the rotation waits for;
    // the phase's own time (a hold, a drain) still rules.
    let due = if ctx.options.look_now {
        st.phase.due_at()
    } else {
        st.due_at()
    };
    if !idle_start && due.is_some_and(|d| d > now) {
        let due = st.due_at();
        return Ok(StepOutcome {
            phase: from,
            progressed: false,
            next_due: due,
            status_line: format!(
                "{from}: next step ({}) due {}",
                from.next_action(),
                due_text(due, now)
            ),
        });
    }
    let result = {
        let mut run = Run {
            ctx: &mut *ctx,
            st: &mut st,
        };
        run.handle(now).await
    };
    let at = ctx.clock.now();
    let outcome = record(ctx, &mut st, from, at, result);
    if outcome.is_ok() {
        coordinate(ctx, &st, from).await;
    }
    outcome
}

/// How long the driver holds the rotation Lease after a step: until its next step is due, plus
/// room for that step's restarts; when it dies, the Lease frees itself by then (its report
/// still says a rotation is in progress, which holds every other agent's start).
fn rotation_lease_seconds(options: &Options, due: Option<u64>, now: u64) -> u64 {
    due.unwrap_or(now).saturating_sub(now)
        + 3 * options.recheck.as_secs()
        + options.restart_timeout.as_secs()
}

/// After a step: the driver renews the rotation Lease while its rotation is in progress and
/// gives it back at the end; either way this server's Lease says where it is. Failures are
/// logged: the Lease expires by itself, and the next step says it again.
async fn coordinate(ctx: &mut Context, st: &RotationState, from: PhaseName) {
    let to = st.phase.name();
    if to != PhaseName::Idle {
        let seconds = rotation_lease_seconds(&ctx.options, st.due_at(), ctx.clock.now());
        match ctx.cluster.hold(membership::ROTATION, seconds).await {
            Ok(membership::Restart::Held { .. }) => {}
            Ok(membership::Restart::Busy { holder, .. }) => log::warn!(
                "rotation: {holder} holds the rotation Lease while this server's rotation is {to}: two agents drive a rotation; look at both (`irsa-agent rotate --status`)"
            ),
            Err(e) if e.no_lease_api() => {}
            Err(e) => log::debug!("rotation: cannot renew the rotation Lease: {e}"),
        }
    } else if from != PhaseName::Idle
        && let Err(e) = ctx.cluster.let_go(membership::ROTATION).await
    {
        log::debug!("rotation: cannot give the rotation Lease back (it expires by itself): {e}");
    }
    let Ok(observed) = install::observe(&ctx.root, ctx.settings.distribution) else {
        return;
    };
    let report = membership::Report::of(&ctx.root, &observed, &ctx.settings.issuer, to.as_str());
    if let Err(e) = ctx.cluster.announce(&report).await {
        log::debug!("rotation: cannot announce this server's rotation phase: {e}");
    }
}

/// Saves what a step achieved (or why it failed) and says what comes next.
fn record(
    ctx: &mut Context,
    st: &mut RotationState,
    from: PhaseName,
    at: u64,
    result: Result<Progress, RotationError>,
) -> Result<StepOutcome, RotationError> {
    match result {
        Ok(Progress::Advanced(phase, message)) => {
            let phase = *phase;
            let to = phase.name();
            crate::failpoint::hit(&format!("rotation:{from}->{to}"));
            st.phase = phase;
            st.failures = 0;
            st.not_before = None;
            st.blocked = None;
            st.record_step(at, from, to, true, message.clone());
            save_state(&ctx.root, st)?;
            log::info!("rotation: {from} -> {to}: {message}");
            Ok(StepOutcome {
                phase: to,
                progressed: true,
                next_due: st.due_at(),
                status_line: format!("{to}: {message}"),
            })
        }
        Ok(Progress::Waiting(message, recheck_at)) => {
            st.not_before = Some(recheck_at);
            st.failures = 0;
            st.blocked = None;
            st.record_step(at, from, from, true, format!("waiting: {message}"));
            save_state(&ctx.root, st)?;
            // The status line says it (the daemon logs it when it changes; `rotate` prints it):
            // a wait looked at every re-check interval is not logged each time.
            log::debug!("rotation: {from}: waiting: {message}");
            Ok(StepOutcome {
                phase: from,
                progressed: false,
                next_due: st.due_at(),
                status_line: format!("{from}: waiting: {message}"),
            })
        }
        Ok(Progress::Blocked(what)) => {
            let (since, attempts) = match &st.blocked {
                Some(b) => (b.since, b.attempts + 1),
                None => (at, 1),
            };
            let delay = machine::backoff_from(ctx.options.recheck, attempts);
            st.not_before = Some(at + delay.as_secs());
            st.blocked = Some(machine::Blocked {
                since,
                waiting_for: what.clone(),
                attempts,
            });
            let message = format!(
                "blocked: waiting for {what}; nothing irreversible is done until it can be read (attempt {attempts}, next look {})",
                due_text(st.due_at(), at)
            );
            st.record_step(at, from, from, false, message.clone());
            save_state(&ctx.root, st)?;
            log::warn!("rotation: {from}: {message}");
            Ok(StepOutcome {
                phase: from,
                progressed: false,
                next_due: st.due_at(),
                status_line: format!("{from}: {message}"),
            })
        }
        Err(RotationError::Turn(why)) => {
            let recheck_at = at + ctx.options.recheck.as_secs().max(1);
            record(ctx, st, from, at, Ok(Progress::Waiting(why, recheck_at)))
        }
        Err(err) => {
            st.failures += 1;
            st.not_before = Some(at + machine::backoff(st.failures).as_secs());
            let to = st.phase.name();
            st.record_step(at, from, to, false, err.to_string());
            // The error is what matters; a failure to record it is logged.
            if let Err(e) = save_state(&ctx.root, st) {
                log::error!("rotation: cannot record the failed step: {e}");
            }
            log::error!(
                "rotation: {from}: step failed (attempt {}, next try {}): {err}",
                st.failures,
                due_text(st.due_at(), at)
            );
            Err(err)
        }
    }
}

/// Abandons the rotation in progress, where that is safe: while the new key cannot have signed
/// anything it is removed again (from the apiservers' verification keys where it was added,
/// from disk, from the JWKS). After that, refuses and says why.
pub async fn abort(ctx: &mut Context, now: u64) -> Result<StepOutcome, RotationError> {
    let _lock = lock(&ctx.root)?;
    let Some(mut st) = load_state(&ctx.root)? else {
        return Err(RotationError::Refused("no rotation has ever run".into()));
    };
    let from = st.phase.name();
    let every = ctx.settings.rotation.every;
    if let Err(e) = st.phase.abort(now, every) {
        let why = if matches!(from, PhaseName::Idle) {
            e.to_string()
        } else {
            format!(
                "{e}. Abort is possible only before the new key can sign. From here the way out is forward: the rotation keeps both keys trusted while draining, so no token is rejected; let it finish (`irsa-agent rotate`, or the daemon). To go back to the old key instead, start a new rotation after this one (old tokens of the new key are then drained the same way) — never remove a key that may have signed by hand."
            )
        };
        return Err(RotationError::Refused(why));
    }
    let Some(rotation) = st.phase.rotation().cloned() else {
        return Err(RotationError::Refused("no rotation is in progress".into()));
    };
    let mut run = Run {
        ctx: &mut *ctx,
        st: &mut st,
    };
    let observed = run.observe()?;
    let change = plan_install(&run.ctx.root, &observed, &rotation, Install::RemoveNew)?;
    run.carry_out(change, Install::RemoveNew, "remove the new key again")
        .await?;
    let observed = run.observe()?;
    clean_up(&run.ctx.root, &observed, &rotation)?;
    run.unshare_new_key().await;
    // Republish without the new key.
    let publication = run.publication(&observed, None)?;
    let published = run.ctx.publishing.publish(&publication).await;
    let (phase, finished) = st.phase.abort(now, every)?;
    st.remember(finished);
    st.phase = phase;
    st.not_before = None;
    st.failures = 0;
    let message = format!(
        "aborted rotation {}: the new key {} is removed{}",
        rotation.id,
        rotation.new_kid,
        match &published {
            Ok(_) => " and the JWKS republished without it".to_string(),
            Err(e) => format!(" (republishing failed: {e}; the next publish drops it)"),
        }
    );
    st.record_step(
        ctx.clock.now(),
        from,
        PhaseName::Idle,
        true,
        message.clone(),
    );
    save_state(&ctx.root, &st)?;
    // The other servers learn it from this server's Lease now (their agents take their copies
    // of the new key out once no rotation is driven), not at the daemon's next converge.
    coordinate(ctx, &st, from).await;
    Ok(StepOutcome {
        phase: PhaseName::Idle,
        progressed: true,
        next_due: st.due_at(),
        status_line: message,
    })
}

/// How long a restarted apiserver is waited for, and how often it is asked.
fn patience(ctx: &Context) -> Patience {
    Patience {
        timeout: ctx.options.restart_timeout,
        poll: ctx.options.poll,
    }
}

/// Waits for this server's turn to restart its apiserver: the cluster-wide restart Lease, and
/// every other apiserver serving ([`change::wait_for_turn`]). Every rotation restart takes it,
/// the driver's and the followers'.
async fn take_turn(ctx: &mut Context) -> Result<Turned, RotationError> {
    let timeout = ctx.options.restart_timeout;
    let patience = Patience {
        timeout: timeout * 2,
        poll: ctx.options.poll.max(Duration::from_secs(1)),
    };
    let seconds = timeout.as_secs() + 60;
    let cluster = &mut ctx.cluster;
    change::wait_for_turn(ctx.clock.as_ref(), patience, async |_| {
        cluster.try_turn(seconds).await
    })
    .await
    .map_err(RotationError::Turn)
}

/// Gives the restart Lease back after a restart made in turn (it expires by itself if this
/// fails).
async fn give_turn_back(ctx: &mut Context, turned: Turned) {
    if turned == Turned::Held
        && let Err(e) = ctx.cluster.let_go(membership::RESTART).await
    {
        log::warn!("rotation: cannot give the restart Lease back (it expires by itself): {e}");
    }
}

/// Waits ([`ready::wait_until`]) until the local apiserver is ready and serves exactly
/// `expected` (kids, in order, repeats dropped).
async fn wait_for_jwks(ctx: &mut Context, expected: &[String]) -> Result<(), String> {
    let patience = patience(ctx);
    let cluster = &mut ctx.cluster;
    let what = format!(
        "waiting for kube-apiserver to serve the keys {}",
        expected.join(", ")
    );
    ready::wait_until(&what, ctx.clock.as_ref(), patience, async || {
        let health = cluster.health().await;
        if !health.ready {
            return Err(health.detail);
        }
        let kids = cluster.jwks_kids(None).await.map_err(|e| e.to_string())?;
        let kids = install::dedup_kids(kids.iter());
        if kids == expected {
            Ok(())
        } else {
            Err(format!(
                "serves kids {} instead of {}",
                kids.join(", "),
                expected.join(", ")
            ))
        }
    })
    .await
    .map(|_| ())
    .map_err(|last| {
        format!(
            "kube-apiserver did not become ready with the keys {} within {}s (last: {last})",
            expected.join(", "),
            patience.timeout.as_secs()
        )
    })
}

async fn wait_ready(ctx: &mut Context) -> String {
    let patience = patience(ctx);
    let cluster = &mut ctx.cluster;
    let waited = ready::wait_until(
        "waiting for kube-apiserver to be ready with the restored files",
        ctx.clock.as_ref(),
        patience,
        async || {
            let health = cluster.health().await;
            if health.ready {
                Ok(())
            } else {
                Err(health.detail)
            }
        },
    )
    .await;
    match waited {
        Ok(_) => "the apiserver is ready with the restored files".into(),
        Err(last) => format!("the apiserver is still not ready ({last}): look at it now"),
    }
}

/// kubeadm: writes an install's files through the apply executor (backups, atomic writes);
/// kubelet restarts what a changed manifest names. When the apiserver restarts, `restarting`
/// runs first (to count the restart), then this waits until it serves `expected`, and restores
/// the files when it does not. Whether anything was written.
async fn write_files(
    ctx: &mut Context,
    changes: &[crate::apiserver::FileChange],
    restarts_apiserver: bool,
    expected: &[String],
    what: &str,
    install: Install,
    restarting: impl FnOnce() -> Result<(), StateError>,
) -> Result<bool, RotationError> {
    let root = ctx.root.clone();
    let prepared = apply::write_changes(&root, changes, ctx.clock.now(), &ctx.settings.backups)
        .map_err(|e| failed(format!("{what}: {e}")))?;
    if restarts_apiserver && prepared.is_some() {
        // The manifest is written: kubelet restarts the apiserver.
        restarting()?;
    }
    crate::failpoint::hit(&format!("rotation:{}:after-write", install.name()));
    let Some(prepared) = prepared else {
        return Ok(false);
    };
    if !restarts_apiserver {
        return Ok(true);
    }
    match wait_for_jwks(ctx, expected).await {
        Ok(()) => Ok(true),
        Err(e) => {
            let restored = prepared.restore(&root);
            let back = wait_ready(ctx).await;
            Err(failed(format!("{what}: {e}; {restored}; {back}")))
        }
    }
}

/// One step in progress.
struct Run<'a> {
    ctx: &'a mut Context,
    st: &'a mut RotationState,
}

fn failed(e: impl std::fmt::Display) -> RotationError {
    RotationError::Failed(e.to_string())
}

/// Who brings the other servers along, and what to do for one without an agent.
fn by_their_agents(observed: &Observed) -> String {
    if observed.source.keys_shared_by_servers() {
        format!(
            "their agents restart them, one at a time (a server without irsa-agent: restart {} there)",
            observed.distribution.name()
        )
    } else {
        "their agents install the new key and restart their apiservers, one at a time (a node without irsa-agent: install it there, or `irsa-agent rotate --abort` before the new key signs)".to_string()
    }
}

impl Run<'_> {
    fn now(&self) -> u64 {
        self.ctx.clock.now()
    }

    fn save(&self) -> Result<(), RotationError> {
        save_state(&self.ctx.root, self.st).map_err(RotationError::from)
    }

    fn observe(&self) -> Result<Observed, RotationError> {
        Ok(install::observe(
            &self.ctx.root,
            self.ctx.settings.distribution,
        )?)
    }

    fn rotation(&self) -> Result<InProgress, RotationError> {
        self.st
            .phase
            .rotation()
            .cloned()
            .ok_or_else(|| RotationError::Failed("no rotation in progress".into()))
    }

    fn update_rotation(&mut self, f: impl FnOnce(&mut InProgress)) -> Result<(), RotationError> {
        if let Some(r) = self.st.phase.rotation_mut() {
            f(r);
        }
        self.save()
    }

    /// What to publish: the host's verification keys, plus the new key while it is published
    /// ahead of the apiservers.
    fn publication(
        &self,
        observed: &Observed,
        ahead: Option<&InProgress>,
    ) -> Result<Publication, RotationError> {
        let mut keys = install::host_keys(observed)?.verification_keys;
        if let Some(r) = ahead {
            let parsed = keys::parse_verification_keys(r.new_public_pem.as_bytes())
                .map_err(|e| failed(format!("the saved new public key is unreadable: {e:?}")))?;
            keys.extend(parsed.keys);
        }
        Ok(Publication::new(
            &self.ctx.settings.issuer,
            &self.ctx.settings.jwks_uri,
            &keys,
        ))
    }

    fn restart(&self, observed: &Observed) -> Restart {
        restart::restart_for(
            &self.ctx.root,
            observed.distribution,
            self.ctx.options.unit.as_deref(),
        )
    }

    /// Carries out a host change and waits until the apiserver serves the expected keys.
    async fn carry_out(
        &mut self,
        change: HostChange,
        install: Install,
        what: &str,
    ) -> Result<bool, RotationError> {
        if matches!(change, HostChange::None) {
            return Ok(false);
        }
        // One apiserver restarts at a time across the cluster (the restart Lease), as for
        // `apply`: with k3s's embedded etcd two at once can cost quorum.
        let turned = take_turn(self.ctx).await?;
        let result = self.carry_out_in_turn(change, install, what).await;
        give_turn_back(self.ctx, turned).await;
        result
    }

    async fn carry_out_in_turn(
        &mut self,
        change: HostChange,
        install: Install,
        what: &str,
    ) -> Result<bool, RotationError> {
        let root = self.ctx.root.clone();
        match change {
            HostChange::None => Ok(false),
            HostChange::RotateCa {
                program,
                dir,
                content,
                data_dir_arg,
                expected,
            } => {
                let file = dir.join("tls/service.key");
                fs::create_dir_all(&root.path(dir.join("tls")), 0o700)
                    .and_then(|()| {
                        fs::write_atomic(&root.path(&file), content.as_bytes(), NewFile::PRIVATE)
                    })
                    .map_err(|e| failed(format!("cannot stage {}: {e}", file.display())))?;
                let mut args = vec![
                    "certificate".to_string(),
                    "rotate-ca".to_string(),
                    format!("--path={}", dir.display()),
                ];
                if let Some(d) = data_dir_arg {
                    args.push(format!("--data-dir={d}"));
                }
                log::info!("rotation: {what}: {program} {}", args.join(" "));
                self.ctx
                    .runner
                    .run(program, &args)
                    .map_err(|e| failed(format!("{what}: {e}")))?;
                crate::failpoint::hit(&format!("rotation:{}:after-rotate-ca", install.name()));
                let observed = self.observe()?;
                let Restart::Unit(unit) = self.restart(&observed) else {
                    return Err(failed("no unit to restart"));
                };
                self.update_rotation(|r| r.restarts += 1)?;
                log::info!("rotation: {what}: systemctl restart {unit}");
                self.ctx
                    .services
                    .restart(&unit)
                    .map_err(|e| failed(format!("{what}: {e}")))?;
                crate::failpoint::hit(&format!("rotation:{}:after-restart", install.name()));
                wait_for_jwks(self.ctx, &expected).await.map_err(|e| {
                    failed(format!(
                        "{what}: {e}; the new service.key is in the datastore ({program} loads it at every start), so nothing was rolled back: look at `journalctl -u {unit}`; the next step checks again"
                    ))
                })?;
                Ok(true)
            }
            HostChange::Files {
                changes,
                restarts_apiserver,
                expected,
            } => {
                let st = &mut *self.st;
                write_files(
                    self.ctx,
                    &changes,
                    restarts_apiserver,
                    &expected,
                    what,
                    install,
                    || {
                        if let Some(r) = st.phase.rotation_mut() {
                            r.restarts += 1;
                        }
                        save_state(&root, st)
                    },
                )
                .await
            }
        }
    }

    /// From `trusted` to `draining` the host must keep what the rotation installed; when it
    /// lost it (kubeadm upgrade regenerated the manifests; someone restored a backup), installs
    /// it again right away. Returns whether it had to.
    async fn reinstall_if_lost(&mut self) -> Result<bool, RotationError> {
        let rotation = self.rotation()?;
        let observed = self.observe()?;
        let signed = matches!(
            self.st.phase.name(),
            PhaseName::Signing | PhaseName::Draining
        );
        // Judged by the keys, not by the files: a crash may have left a later install (sign,
        // retire) in place before the phase was saved, and that is not a loss.
        let host = install::host_keys(&observed)?;
        let verifies = host.verification.contains(&rotation.new_kid);
        let signs = host.signing.kid() == rotation.new_kid;
        let mut lost: Vec<Install> = Vec::new();
        if rotation.is_ha() {
            if signed && !signs {
                lost.push(Install::Sign);
            } else if !verifies {
                lost.push(Install::VerifyOnly);
            }
        } else if !verifies || !signs {
            lost.push(Install::Trust);
        }
        if signed
            && !observed
                .source
                .legacy_signer_uses(&self.ctx.root, &rotation.new_kid)
        {
            lost.push(Install::Sign);
        }
        for install in &lost {
            let observed = self.observe()?;
            let change = plan_install(&self.ctx.root, &observed, &rotation, *install)?;
            if matches!(change, HostChange::None) {
                continue;
            }
            log::warn!(
                "rotation: the host lost the new key's {} install (kubeadm upgrade? a restored backup?): installing it again",
                install.name()
            );
            self.carry_out(change, *install, "reinstall the rotation's keys")
                .await?;
        }
        Ok(!lost.is_empty())
    }

    /// The apiservers of the cluster (each one's URL).
    async fn servers(&mut self) -> Result<Vec<String>, RotationError> {
        self.ctx
            .cluster
            .servers()
            .await
            .map_err(|e| failed(format!("cannot list the cluster's apiservers: {e}")))
    }

    /// The apiservers to ask, each as `(name, address)`: with one apiserver, the local one
    /// through the admin kubeconfig (its advertised address may not be reachable from the
    /// node itself, behind NAT); with several, each at its endpoint address.
    ///
    /// During a rotation the apiservers it started with are asked too: the Endpoints list only
    /// the apiservers whose endpoint lease is current, and one that is restarting, or whose
    /// lease lapsed for a moment, is missing from them. Measured on three real apiservers (k3s
    /// hosts, tests/real_apiserver_ha_k3s.rs): while one follower restarted, the Endpoints
    /// lacked another one that still signed with the old key, and the driver went on to
    /// `signing` without asking it. A server that cannot be asked holds the step.
    async fn targets(&mut self) -> Result<Vec<(String, Option<String>)>, RotationError> {
        let mut servers = self.servers().await?;
        if let Ok(rotation) = self.rotation() {
            for s in rotation.servers {
                if !servers.contains(&s) {
                    servers.push(s);
                }
            }
        }
        if servers.len() == 1 {
            return Ok(vec![(servers[0].clone(), None)]);
        }
        Ok(servers.into_iter().map(|s| (s.clone(), Some(s))).collect())
    }

    /// Servers whose JWKS lacks `kid` (`want` true) or still has it (`want` false).
    async fn servers_where(&mut self, kid: &str, want: bool) -> Result<Vec<String>, RotationError> {
        let mut out = Vec::new();
        for (server, address) in self.targets().await? {
            match self.ctx.cluster.jwks_kids(address.as_deref()).await {
                Ok(kids) if kids.iter().any(|k| k == kid) == want => {}
                Ok(_) => out.push(server),
                Err(e) => out.push(format!("{server} ({e})")),
            }
        }
        Ok(out)
    }

    /// Servers that do not sign with `kid` (by a freshly requested token's kid).
    async fn servers_not_signing_with(&mut self, kid: &str) -> Result<Vec<String>, RotationError> {
        let mut out = Vec::new();
        for (server, address) in self.targets().await? {
            match self.ctx.cluster.request_token(address.as_deref()).await {
                Ok(token) if cluster::token_kid(&token).as_deref() == Some(kid) => {}
                Ok(token) => out.push(format!(
                    "{server} (signs with {})",
                    cluster::token_kid(&token).unwrap_or_default()
                )),
                Err(e) => out.push(format!("{server} ({e})")),
            }
        }
        Ok(out)
    }

    /// kubeadm on several nodes: seals the new key with the signing key every node shares
    /// ([`seal`]) and stores it for the other nodes' agents, unless it is there already.
    async fn share_new_key(&mut self, rotation: &InProgress) -> Result<(), RotationError> {
        if let Ok(Some(shared)) = self.ctx.cluster.shared_key().await
            && shared.rotation == rotation.id
            && shared.new_kid == rotation.new_kid
        {
            return Ok(());
        }
        let canonical = rotation
            .canonical_files
            .as_ref()
            .ok_or_else(|| failed("the rotation state lacks kubeadm's key files; abort it"))?;
        let old = keys::load_signing_file(&self.ctx.root.path(&canonical.signing))
            .map_err(|e| failed(e.to_string()))?;
        if old.public.kid() != rotation.old_signing_kid {
            return Err(failed(format!(
                "{} holds the key {}, not {} the rotation started with: the other nodes could not open the new key sealed with it",
                canonical.signing,
                old.public.kid(),
                rotation.old_signing_kid
            )));
        }
        let ca = seal::ca_key(&self.ctx.root, &canonical.signing).map_err(|e| {
            failed(format!(
                "cannot read the cluster CA's key, which seals the new key with sa.key: {e}"
            ))
        })?;
        if ca.is_none() {
            log::warn!(
                "rotation: no ca.key beside {}: the new key is sealed with sa.key alone (whoever holds the current sa.key and can read the Secret could open it)",
                canonical.signing
            );
        }
        let key = new_key(&self.ctx.root, rotation)?;
        let sealed = seal::seal(
            &old,
            ca.as_ref(),
            &rotation.id,
            rotation.key_type,
            &rotation.new_kid,
            &rotation.new_public_pem,
            &key.pem,
        )
        .map_err(failed)?;
        self.ctx.cluster.share_key(&sealed).await.map_err(|e| {
            failed(format!(
                "cannot share the new key with the other control-plane nodes: {e}"
            ))
        })?;
        log::info!(
            "rotation: the new key {} is shared with the other control-plane nodes, sealed with the signing key {}{} (Secret {}/{})",
            rotation.new_kid,
            sealed.sealed_with,
            sealed
                .ca
                .as_deref()
                .map(|c| format!(" and the cluster CA's key {c}"))
                .unwrap_or_default(),
            membership::NAMESPACE,
            seal::SECRET
        );
        Ok(())
    }

    /// Removes the shared key, if any; a failure is logged (the next rotation replaces it).
    async fn unshare_new_key(&mut self) {
        if let Err(e) = self.ctx.cluster.unshare_key().await {
            log::warn!(
                "rotation: cannot remove the Secret {}/{} (it holds the sealed key, useless without sa.key; the next rotation replaces it): {e}",
                membership::NAMESPACE,
                seal::SECRET
            );
        }
    }

    fn recheck_at(&self) -> u64 {
        self.now() + self.ctx.options.recheck.as_secs()
    }

    fn unit_hint(&self, observed: &Observed) -> String {
        match self.restart(observed) {
            Restart::Unit(u) => format!("systemctl restart {u}"),
            Restart::KubeletStaticPod => "restart its kube-apiserver".to_string(),
        }
    }

    async fn handle(&mut self, now: u64) -> Result<Progress, RotationError> {
        match self.st.phase.name() {
            PhaseName::Idle => self.start(now).await,
            PhaseName::Staged => self.publish_new_key().await,
            PhaseName::Published => self.trust_new_key().await,
            PhaseName::Trusted => self.sign_with_new_key().await,
            PhaseName::Signing => self.begin_drain().await,
            PhaseName::Draining => self.retire_old_key().await,
            PhaseName::Retired => self.finish_rotation().await,
        }
    }

    /// idle -> staged.
    async fn start(&mut self, now: u64) -> Result<Progress, RotationError> {
        let observed = self.observe()?;
        let old_kids = observed
            .source
            .rotation_preflight(&self.ctx.root, &observed)?;
        let host = install::host_keys(&observed)?;
        // The running apiserver must have loaded what is on disk.
        let health = self.ctx.cluster.health().await;
        if !health.ready {
            return Err(RotationError::Refused(format!(
                "the apiserver is not ready ({}); a rotation starts only on a healthy control plane",
                health.detail
            )));
        }
        let loaded = self
            .ctx
            .cluster
            .jwks_kids(None)
            .await
            .map_err(|e| failed(format!("cannot read the apiserver's JWKS: {e}")))?;
        if install::dedup_kids(loaded.iter()) != host.verification {
            return Err(RotationError::Refused(format!(
                "the running apiserver verifies with {} but its key files hold {}: a restart is pending; restart it ({}) before rotating",
                loaded.join(", "),
                host.verification.join(", "),
                self.unit_hint(&observed)
            )));
        }
        let servers = self.servers().await?;
        // On several servers one agent drives the cluster's rotation; the others follow it.
        if let Some(not_mine) = self.claim_rotation().await? {
            return Ok(not_mine);
        }
        // Leftovers of a start that crashed before its state was saved.
        for path in observed.source.sweep_orphans(&self.ctx.root, &observed)? {
            log::info!(
                "rotation: removed {} (left by an interrupted start)",
                path.display()
            );
        }
        let kind = self.ctx.settings.rotation.key_type;
        log::info!("rotation: generating a {} key", kind.name());
        let key = keygen::generate(kind).map_err(failed)?;
        let id = state::compact_stamp(now);
        let (new_key_file, canonical_files) =
            observed
                .source
                .stage_new_key(&self.ctx.root, &observed, &id, &pem_of(&key))?;
        crate::failpoint::hit("rotation:after-stage-files");
        let rotation = InProgress {
            id: id.clone(),
            started_at: now,
            key_type: kind,
            new_kid: key.kid(),
            new_public_pem: key.public().to_spki_pem(),
            old_kids,
            old_signing_kid: host.signing.kid(),
            distribution: observed.distribution,
            new_key_file: new_key_file.clone(),
            canonical_files,
            servers: servers.clone(),
            restarts: 0,
            may_have_signed: false,
        };
        let phase = self.st.phase.stage(rotation, now)?;
        Ok(Progress::Advanced(
            Box::new(phase),
            format!(
                "rotation {id}: new {} key {} written to {new_key_file}{}",
                kind.name(),
                key.kid(),
                if servers.len() > 1 {
                    format!(
                        " ({} apiservers: it is installed as a verification-only key on all of them next)",
                        servers.len()
                    )
                } else {
                    String::new()
                }
            ),
        ))
    }

    /// On several servers, one agent drives the cluster's one rotation: this one, unless
    /// another agent reports a rotation in progress (live or not: its state is on its host, and
    /// a second rotation would fight it) or holds the rotation Lease. The Lease write is
    /// conditional, so of two agents due at the same moment exactly one starts. `Some` is what
    /// the step does instead of starting.
    async fn claim_rotation(&mut self) -> Result<Option<Progress>, RotationError> {
        let view = match self.ctx.cluster.members().await {
            Ok(view) => view,
            Err(e) => {
                return Ok(Some(Progress::Blocked(format!(
                    "the other servers' agent Leases, read before a rotation starts ({e})"
                ))));
            }
        };
        let me = self.ctx.cluster.node().to_string();
        if let Some(driver) = view.as_ref().and_then(|v| follow::driver(v, &me)) {
            return Ok(Some(Progress::Waiting(
                format!(
                    "{} drives the cluster's key rotation ({}){}; this server follows it and starts none of its own",
                    driver.node,
                    driver.report.as_ref().map_or("", |r| r.rotation.as_str()),
                    if driver.live {
                        ""
                    } else {
                        ", but its agent is not live: the rotation holds until it comes back"
                    }
                ),
                self.recheck_at(),
            )));
        }
        let seconds = rotation_lease_seconds(&self.ctx.options, None, self.now());
        match self.ctx.cluster.hold(membership::ROTATION, seconds).await {
            Ok(membership::Restart::Held { .. }) => Ok(None),
            Ok(membership::Restart::Busy { holder, until }) => Ok(Some(Progress::Waiting(
                format!(
                    "{holder} holds the rotation Lease (until {}): it drives the cluster's key rotation",
                    state::rfc3339(u64::try_from(until).unwrap_or(0))
                ),
                self.recheck_at(),
            ))),
            Err(e) if e.no_lease_api() => Ok(None),
            Err(e) => Ok(Some(Progress::Blocked(format!(
                "the rotation Lease, which this server must hold to start a rotation ({e})"
            )))),
        }
    }

    /// staged -> published.
    async fn publish_new_key(&mut self) -> Result<Progress, RotationError> {
        let rotation = self.rotation()?;
        let mut observed = self.observe()?;
        new_key(&self.ctx.root, &rotation)?;
        if rotation.is_ha() {
            if !observed.source.keys_shared_by_servers() {
                self.share_new_key(&rotation).await?;
            }
            // Every apiserver verifies with the new key before anything publishes it.
            let change = plan_install(&self.ctx.root, &observed, &rotation, Install::VerifyOnly)?;
            self.carry_out(
                change,
                Install::VerifyOnly,
                "install the new key as a verification-only key",
            )
            .await?;
            observed = self.observe()?;
            let lacking = self.servers_where(&rotation.new_kid, true).await?;
            if !lacking.is_empty() {
                return Ok(Progress::Waiting(
                    format!(
                        "{}; these servers do not verify with it yet: {}; {}",
                        if observed.source.keys_shared_by_servers() {
                            "the new key is in the datastore"
                        } else {
                            "the new key is shared, sealed, with the other control-plane nodes"
                        },
                        lacking.join(", "),
                        by_their_agents(&observed)
                    ),
                    self.recheck_at(),
                ));
            }
        }
        let publication = self.publication(&observed, Some(&rotation))?;
        let summary = self
            .ctx
            .publishing
            .publish(&publication)
            .await
            .map_err(failed)?;
        let public = self
            .ctx
            .publishing
            .public(&publication)
            .await
            .map_err(|e| failed(format!("cannot check the public copy: {e}")))?;
        if !public.kids.contains(&rotation.new_kid) {
            return Ok(Progress::Waiting(
                format!(
                    "published ({summary}), but {} does not list the new key {} yet (a cache in front of it?)",
                    self.ctx.settings.jwks_uri, rotation.new_kid
                ),
                self.recheck_at(),
            ));
        }
        let max_age = public
            .max_age
            .or_else(|| self.ctx.publishing.configured_max_age())
            .unwrap_or(DEFAULT_MAX_AGE);
        let r = &self.ctx.settings.rotation;
        let hold = machine::propagation_hold(max_age, r.cdn_ttl, r.propagation_wait);
        let now = self.now();
        let phase = self.st.phase.publish(now, hold)?;
        Ok(Progress::Advanced(
            Box::new(phase),
            format!(
                "JWKS with the new key published ({summary}) and seen at {}; held {} (max-age {} + cdn-ttl {} + propagation-wait {})",
                self.ctx.settings.jwks_uri,
                format_duration(hold),
                format_duration(max_age),
                format_duration(r.cdn_ttl),
                format_duration(r.propagation_wait)
            ),
        ))
    }

    /// published -> trusted (after the hold).
    async fn trust_new_key(&mut self) -> Result<Progress, RotationError> {
        let rotation = self.rotation()?;
        let observed = self.observe()?;
        // The public copy must still have the new key (someone may have republished without
        // it): looked at before republishing, so a removal is not papered over.
        let publication = self.publication(&observed, Some(&rotation))?;
        let public = self
            .ctx
            .publishing
            .public(&publication)
            .await
            .map_err(|e| failed(format!("cannot check the public copy: {e}")))?;
        if !public.kids.contains(&rotation.new_kid) {
            // Someone republished without it: back to staged, where it is published again and
            // the propagation hold starts over once it is seen.
            self.ctx
                .publishing
                .publish(&publication)
                .await
                .map_err(failed)?;
            let phase = self.st.phase.unpublish(self.now())?;
            return Ok(Progress::Advanced(
                Box::new(phase),
                format!(
                    "{} no longer lists the new key {}: republished; the propagation hold starts again once it is seen",
                    self.ctx.settings.jwks_uri, rotation.new_kid
                ),
            ));
        }
        self.ctx
            .publishing
            .publish(&publication)
            .await
            .map_err(failed)?;
        let now = self.now();
        // Checked before anything is changed: never trust (or sign with) a key too early.
        let next = self.st.phase.trust(now)?;
        if rotation.is_ha() {
            let lacking = self.servers_where(&rotation.new_kid, true).await?;
            if !lacking.is_empty() {
                return Ok(Progress::Waiting(
                    format!(
                        "these servers do not verify with the new key: {}; {}",
                        lacking.join(", "),
                        by_their_agents(&observed)
                    ),
                    self.recheck_at(),
                ));
            }
            return Ok(Progress::Advanced(
                Box::new(next),
                "every apiserver verifies with the old and the new key".into(),
            ));
        }
        // One server: verifying with the new key and signing with it switch in one restart.
        self.update_rotation(|r| r.may_have_signed = true)?;
        let change = plan_install(&self.ctx.root, &observed, &rotation, Install::Trust)?;
        let restarted = self
            .carry_out(change, Install::Trust, "trust the new key")
            .await?;
        let kids = self
            .ctx
            .cluster
            .jwks_kids(None)
            .await
            .map_err(|e| failed(format!("cannot read the apiserver's JWKS: {e}")))?;
        if !kids.contains(&rotation.new_kid) || !kids.contains(&rotation.old_signing_kid) {
            return Err(failed(format!(
                "the apiserver serves kids {} after the change: it should verify with {} and {}",
                kids.join(", "),
                rotation.new_kid,
                rotation.old_signing_kid
            )));
        }
        let next = self.st.phase.trust(self.now())?;
        Ok(Progress::Advanced(
            Box::new(next),
            format!(
                "the apiserver verifies with the old and the new key{}",
                if restarted { " (restarted)" } else { "" }
            ),
        ))
    }

    /// trusted -> signing.
    async fn sign_with_new_key(&mut self) -> Result<Progress, RotationError> {
        let rotation = self.rotation()?;
        let observed = self.observe()?;
        // Several servers: every one signs with the new key now (k3s: the staged file puts it
        // first in the datastore; kubeadm: each node's apiserver and kube-controller-manager).
        // One kubeadm node: `trust` switched the apiserver; kube-controller-manager switches.
        let shared = observed.source.keys_shared_by_servers();
        if rotation.is_ha() || !shared {
            if !rotation.may_have_signed {
                self.update_rotation(|r| r.may_have_signed = true)?;
            }
            let what = if rotation.is_ha() {
                "sign with the new key"
            } else {
                "make kube-controller-manager sign legacy token Secrets with the new key"
            };
            let change = plan_install(&self.ctx.root, &observed, &rotation, Install::Sign)?;
            self.carry_out(change, Install::Sign, what).await?;
        }
        let lagging = self.servers_not_signing_with(&rotation.new_kid).await?;
        if !lagging.is_empty() {
            return Ok(Progress::Waiting(
                format!(
                    "these servers still sign with the old key: {}; {}; they verify with both keys, so nothing is rejected meanwhile",
                    lagging.join(", "),
                    by_their_agents(&observed)
                ),
                self.recheck_at(),
            ));
        }
        // The apiserver is healthy, serves its discovery, and a fresh token verifies against the
        // public JWKS as relying parties fetch it.
        let health = self.ctx.cluster.health().await;
        if !health.ready || health.issuer.is_none() {
            return Err(failed(format!(
                "the apiserver is not healthy after the switch: {}",
                health.detail
            )));
        }
        let token = self
            .ctx
            .cluster
            .request_token(None)
            .await
            .map_err(|e| failed(format!("cannot request a test token: {e}")))?;
        let publication = self.publication(&observed, None)?;
        let public = self
            .ctx
            .publishing
            .public(&publication)
            .await
            .map_err(|e| failed(format!("cannot check the public copy: {e}")))?;
        let now = self.now();
        verify_token(
            &token,
            public.jwks.as_deref().unwrap_or(""),
            &rotation.new_kid,
            now,
        )
        .map_err(|e| {
            failed(format!(
                "a token the apiserver just issued does not verify against the public JWKS: {e}"
            ))
        })?;
        let phase = self.st.phase.sign(now, now)?;
        Ok(Progress::Advanced(
            Box::new(phase),
            format!(
                "every apiserver signs with the new key {}; a fresh token verifies against the public JWKS; issuer {}",
                rotation.new_kid,
                health.issuer.unwrap_or_default()
            ),
        ))
    }

    /// Why retirement does not wait for the stale-token counter, if it does not:
    /// `rotate --ignore-stale-tokens`, or `rotation.ignore-stale-tokens: "<reason>"`.
    fn ignore_stale_tokens(&self) -> Option<String> {
        if self.ctx.options.ignore_stale_tokens {
            return Some("`irsa-agent rotate --ignore-stale-tokens` was given".into());
        }
        self.ctx
            .settings
            .rotation
            .ignore_stale_tokens
            .as_ref()
            .map(|reason| format!("rotation.ignore-stale-tokens: {reason:?}"))
    }

    /// The longest lifetime a token of the old key can have.
    fn token_lifetime(&self, observed: &Observed) -> Duration {
        let configured = self.ctx.settings.rotation.token_lifetime;
        observed
            .flags
            .max_token_expiration
            .as_deref()
            .and_then(flags::parse_go_duration)
            .map_or(configured, |max| configured.max(max))
    }

    /// signing -> draining.
    async fn begin_drain(&mut self) -> Result<Progress, RotationError> {
        let observed = self.observe()?;
        let lifetime = self.token_lifetime(&observed);
        let drain = lifetime + self.ctx.settings.rotation.drain_margin;
        let now = self.now();
        let stale = self
            .ctx
            .cluster
            .stale_tokens()
            .await
            .map(|value| StaleReading { at: now, value })
            .map_err(|e| {
                log::warn!(
                    "rotation: cannot read serviceaccount_stale_tokens_total at the start of the drain ({e}); retirement waits until it has been read and stayed flat"
                )
            })
            .ok();
        let phase = self.st.phase.drain(now, drain, stale)?;
        let until = phase.due_at().unwrap_or(now);
        Ok(Progress::Advanced(
            Box::new(phase),
            format!(
                "draining the old key until {} (token lifetime {} + margin {})",
                state::rfc3339(until),
                format_duration(lifetime),
                format_duration(self.ctx.settings.rotation.drain_margin)
            ),
        ))
    }

    /// draining -> retired.
    async fn retire_old_key(&mut self) -> Result<Progress, RotationError> {
        let rotation = self.rotation()?;
        let observed = self.observe()?;
        let now = self.now();
        // Never retire too early.
        self.st.phase.retire(now)?;
        // Every piece of evidence below is read from the apiserver; when it cannot be read,
        // the old key stays (fail closed) and the step is tried again on the back-off.
        //
        // The 1-year kube-api-access tokens: no stale-token use for a while.
        let ignore = self.ignore_stale_tokens();
        if let Some(reason) = &ignore {
            log::warn!(
                "rotation: not waiting for serviceaccount_stale_tokens_total to stay flat: {reason}"
            );
        } else if let Phase::Draining { stale, .. } = &self.st.phase {
            let previous = *stale;
            let value = match self.ctx.cluster.stale_tokens().await {
                Ok(value) => value,
                Err(e) => {
                    return Ok(Progress::Blocked(format!(
                        "the apiserver's serviceaccount_stale_tokens_total, which must be read before the old key is retired ({e})"
                    )));
                }
            };
            let window = self
                .ctx
                .settings
                .rotation
                .stale_quiet(self.token_lifetime(&observed))
                .as_secs();
            let reading = StaleReading { at: now, value };
            let flat_since = previous.filter(|p| p.value == value).map(|p| p.at);
            match flat_since {
                Some(since) if now.saturating_sub(since) >= window => {}
                Some(since) => {
                    let quiet_at = since + window;
                    return Ok(Progress::Waiting(
                        format!(
                            "serviceaccount_stale_tokens_total has stayed at {value} for {} of the {} it must stay flat before the old key is retired (until {})",
                            format_duration(Duration::from_secs(now - since)),
                            format_duration(Duration::from_secs(window)),
                            state::rfc3339(quiet_at)
                        ),
                        quiet_at.min(self.recheck_at()),
                    ));
                }
                None => {
                    let why = match previous {
                        Some(p) if value > p.value => format!(
                            "serviceaccount_stale_tokens_total rose from {} to {value} since {}: a client still presents a token past its intended expiry, maybe one signed by the old key; retirement waits until it has stayed flat for {}. {STALE_TOKENS}",
                            p.value,
                            state::rfc3339(p.at),
                            format_duration(Duration::from_secs(window))
                        ),
                        Some(_) => format!(
                            "the stale-token counter was reset (apiserver restart); watching it for {} before retiring",
                            format_duration(Duration::from_secs(window))
                        ),
                        None => format!(
                            "watching serviceaccount_stale_tokens_total for {} before retiring (no reading since the drain started)",
                            format_duration(Duration::from_secs(window))
                        ),
                    };
                    let phase = self.st.phase.note_stale_reading(reading)?;
                    self.st.phase = phase;
                    return Ok(Progress::Waiting(
                        why,
                        (now + window).min(self.recheck_at()),
                    ));
                }
            }
        }
        // Legacy token Secrets never expire: one signed by an old key would be rejected.
        let secrets = match self.ctx.cluster.legacy_token_kids().await {
            Ok(secrets) => secrets,
            Err(e) => {
                return Ok(Progress::Blocked(format!(
                    "the list of legacy service-account token Secrets, which must be read before the old key is retired ({e})"
                )));
            }
        };
        let old: Vec<String> = secrets
            .iter()
            .filter(|(_, kid)| rotation.old_kids.contains(kid))
            .map(|(name, _)| name.clone())
            .collect();
        if !old.is_empty() {
            return Ok(Progress::Waiting(
                format!(
                    "legacy service-account token Secrets hold tokens signed by the old key and never expire ({} of {}): {}; retiring it would reject them. Move their users to projected or TokenRequest tokens, or re-create each Secret (delete it and create it again: kube-controller-manager signs the new one with the new key); looked at again every {}",
                    old.len(),
                    secrets.len(),
                    old.join(", "),
                    format_duration(self.ctx.options.recheck)
                ),
                self.recheck_at(),
            ));
        }
        let change = plan_install(&self.ctx.root, &observed, &rotation, Install::Retire)?;
        self.carry_out(change, Install::Retire, "retire the old key")
            .await?;
        let kids = self
            .ctx
            .cluster
            .jwks_kids(None)
            .await
            .map_err(|e| failed(format!("cannot read the apiserver's JWKS: {e}")))?;
        if kids.iter().any(|k| rotation.old_kids.contains(k)) || !kids.contains(&rotation.new_kid) {
            return Err(failed(format!(
                "the apiserver serves kids {} after retiring {}",
                kids.join(", "),
                rotation.old_kids.join(", ")
            )));
        }
        Ok(Progress::Advanced(
            Box::new(self.st.phase.retire(self.now())?),
            format!(
                "the apiserver verifies and signs with the new key only; retired {}",
                rotation.old_kids.join(", ")
            ),
        ))
    }

    /// retired -> idle.
    async fn finish_rotation(&mut self) -> Result<Progress, RotationError> {
        let rotation = self.rotation()?;
        let observed = self.observe()?;
        let publication = self.publication(&observed, None)?;
        let summary = self
            .ctx
            .publishing
            .publish(&publication)
            .await
            .map_err(failed)?;
        if rotation.is_ha() {
            let mut still = Vec::new();
            for kid in &rotation.old_kids {
                for s in self.servers_where(kid, false).await? {
                    if !still.contains(&s) {
                        still.push(s);
                    }
                }
            }
            if !still.is_empty() {
                return Ok(Progress::Waiting(
                    format!(
                        "these servers still verify with the old key (harmless, but their agents keep publishing it): {}; {}",
                        still.join(", "),
                        by_their_agents(&observed)
                    ),
                    self.recheck_at(),
                ));
            }
        }
        clean_up(&self.ctx.root, &observed, &rotation)?;
        if rotation.is_ha() {
            self.unshare_new_key().await;
        }
        let now = self.now();
        let (phase, finished) = self
            .st
            .phase
            .finish(now, self.ctx.settings.rotation.every)?;
        self.st.remember(finished);
        let next = phase.due_at();
        Ok(Progress::Advanced(
            Box::new(phase),
            format!(
                "rotation {} complete ({summary}); {} apiserver restart(s); next rotation due {}",
                rotation.id,
                rotation.restarts,
                next.map(state::rfc3339).unwrap_or_else(|| "never".into())
            ),
        ))
    }
}

/// Verifies a token against a JWKS document (what relying parties do), requiring `kid` and an
/// `exp` after `now` (the rotation's clock).
pub fn verify_token(token: &str, jwks: &str, kid: &str, now: u64) -> Result<(), String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    if header.kid.as_deref() != Some(kid) {
        return Err(format!(
            "signed with {} instead of {kid}",
            header.kid.unwrap_or_default()
        ));
    }
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(jwks).map_err(|e| format!("the JWKS is not readable: {e}"))?;
    let jwk = set
        .find(kid)
        .ok_or_else(|| format!("the JWKS has no key {kid}"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.validate_aud = false;
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(|e| e.to_string())?;
    match data.claims.get("exp").and_then(|e| e.as_u64()) {
        Some(exp) if exp > now => Ok(()),
        Some(exp) => Err(format!("expired at {}", state::rfc3339(exp))),
        None => Err("it has no exp".into()),
    }
}

/// The new private key of a rotation, read back from its file (and re-checked).
fn new_key(root: &HostRoot, rotation: &InProgress) -> Result<NewKey, Refusal> {
    let bytes = install::read_file(root, std::path::Path::new(&rotation.new_key_file))?;
    let key = keygen::load(rotation.key_type, &bytes).map_err(|e| Refusal(e.to_string()))?;
    if key.kid() != rotation.new_kid {
        return Err(Refusal(format!(
            "{} no longer holds the new key {} (it holds {}); abort the rotation",
            rotation.new_key_file,
            rotation.new_kid,
            key.kid()
        )));
    }
    Ok(key)
}

/// The new key as the distribution's installs write it.
fn pem_of(key: &NewKey) -> NewKeyPem<'_> {
    NewKeyPem {
        kid: key.kid(),
        private_pem: &key.pem,
        public_pem: key.public().to_spki_pem(),
    }
}

/// The rotation as the distribution's installs see it.
fn installing<'a>(rotation: &'a InProgress, key: Option<&'a NewKey>) -> Installing<'a> {
    Installing {
        id: &rotation.id,
        new_kid: &rotation.new_kid,
        new_key_file: &rotation.new_key_file,
        canonical: rotation.canonical_files.as_ref(),
        new_key: key.map(pem_of),
    }
}

/// What `install` changes on this host now (the distribution plans it; see
/// [`crate::apiserver::install`]). Every install but removing the new key reads it back first.
fn plan_install(
    root: &HostRoot,
    observed: &Observed,
    rotation: &InProgress,
    install: Install,
) -> Result<HostChange, Refusal> {
    let key = match install {
        Install::RemoveNew => None,
        _ => Some(new_key(root, rotation)?),
    };
    observed
        .source
        .plan_install(root, observed, &installing(rotation, key.as_ref()), install)
}

/// Removes the rotation's own files once they are no longer needed (after retirement or
/// abort), unless a flag still names them.
fn clean_up(root: &HostRoot, observed: &Observed, rotation: &InProgress) -> Result<(), Refusal> {
    observed
        .source
        .clean_up(root, observed, &installing(rotation, None))
}

/// Host paths a rotation writes besides the state (for docs and tests).
pub fn rotation_dir(id: &str) -> PathBuf {
    PathBuf::from(format!("{}/{id}", install::ROTATION_DIR))
}

/// A token's secret bytes, wiped when dropped.
pub type Token = Zeroizing<String>;

/// How [`Context::for_host`] reaches the real host's outside systems.
#[derive(Debug, Clone)]
pub struct HostEdges {
    /// The `systemctl` program.
    pub systemctl: PathBuf,
    /// Programs by name (`k3s`, `rke2`) when not in `PATH`.
    pub programs: Vec<(String, PathBuf)>,
    /// The apiserver URL (default: the admin kubeconfig's; kubeadm: the advertise address).
    pub apiserver_url: Option<String>,
    /// Timeout of each HTTPS request.
    pub request_timeout: Duration,
    /// This server's node name: the name its agent coordinates under with the other servers'
    /// (the rotation Lease, the restart Lease, its report).
    pub node: String,
    /// Who holds the restart Lease during this process's restarts: `None` for the daemon (its
    /// node name), [`change::command_holder`] for `irsa-agent rotate` run by hand, so that the
    /// daemon beside it never takes or gives back the command's turn as its own.
    pub restart_holder: Option<String>,
}

impl Default for HostEdges {
    fn default() -> Self {
        HostEdges {
            systemctl: PathBuf::from("systemctl"),
            programs: Vec::new(),
            apiserver_url: None,
            request_timeout: Duration::from_secs(10),
            node: crate::host::host_name(),
            restart_holder: None,
        }
    }
}

impl Context {
    /// The real thing: the admin kubeconfig's apiserver, the configured publish targets, the
    /// host's systemctl and k3s/rke2 binaries. Build it once (the daemon keeps it: publish's
    /// credential cache lives inside) and call [`step`] when [`StepOutcome::next_due`] comes.
    pub async fn for_host(
        root: &HostRoot,
        settings: &Settings,
        clock: Arc<dyn Clock>,
        edges: HostEdges,
        options: Options,
    ) -> Result<Context, RotationError> {
        let observed = install::observe(root, settings.distribution)?;
        let (kubeconfig, url) = crate::apiserver::probe::target(&observed);
        let api = crate::k8s::Api::from_kubeconfig(
            root,
            &kubeconfig,
            edges.apiserver_url.clone().or(url),
            edges.request_timeout,
        )
        .await
        .map_err(|e| RotationError::Refused(format!("cannot reach the apiserver: {e}")))?;
        let publishing = publishing::RealPublishing::new(root, settings, edges.request_timeout)
            .map_err(failed)?;
        Ok(Context {
            root: root.clone(),
            settings: settings.clone(),
            clock,
            cluster: Box::new(cluster::ApiCluster {
                api,
                restart_holder: edges.restart_holder.unwrap_or_else(|| edges.node.clone()),
                node: edges.node,
                lease_seconds: membership::lease_seconds(settings),
            }),
            publishing: Box::new(publishing),
            services: Box::new(crate::apiserver::restart::Systemctl {
                program: edges.systemctl,
            }),
            runner: Box::new(runner::SystemRunner {
                programs: edges.programs,
            }),
            options,
        })
    }
}
