//! What the daemon reports: the `daemon` section of `/var/lib/irsa-agent/state.json`, written
//! on every change, and its rendering for `irsa-agent status` (a person) and `status --json`
//! (scripts; the contract is in the README).
//!
//! `status` reads the whole state file, so sections other features own (`issuer` from
//! apply/finalize, `rotation`, ...) are shown too: known ones in their own words, unknown ones
//! generically.

use serde::{Deserialize, Serialize};

use super::metrics::Metrics;
use crate::host::HostRoot;
use crate::state::{self, State, StateError};

/// `name: line`, unless the line already starts with the name ("rotation: rotation: ...").
pub fn prefixed(name: &str, line: &str) -> String {
    if line
        .strip_prefix(name)
        .is_some_and(|rest| rest.starts_with(':'))
    {
        line.to_string()
    } else {
        format!("{name}: {line}")
    }
}

/// The key of the servers the daemon last saw in the cluster (written by the apiserver step;
/// `status` shows it with the cluster view, not generically).
pub const CLUSTER_KEY: &str = "cluster";

/// The key of the daemon's section in the state file.
pub const SECTION: &str = "daemon";

/// Where the daemon is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Before the first converge finished.
    #[default]
    Starting,
    /// No issuer configured yet (a fresh install): waiting for the configuration.
    WaitingForIssuer,
    /// The configuration cannot be used and there is no earlier one to keep using.
    ConfigInvalid,
    /// The last converge left everything as it should be.
    InSync,
    /// Something failed; a retry is scheduled (`next_retry_at`).
    Retrying,
    /// The host is a k3s/RKE2 agent (worker) node: nothing to do; the daemon waits (without
    /// retrying) until a server's files appear.
    NotAServer,
    /// Published; the apiserver's issuer flags differ from the configuration and
    /// `run.apply-issuer: false` leaves the change to `irsa-agent apply`.
    ApplyPending,
    /// Published, but an apiserver change was rolled back and is not retried until its inputs
    /// change or a reload.
    Held,
    Stopping,
    /// Exited cleanly.
    Stopped,
}

impl Phase {
    pub fn describe(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::WaitingForIssuer => "waiting for an issuer",
            Phase::ConfigInvalid => "configuration invalid",
            Phase::InSync => "in sync",
            Phase::Retrying => "retrying",
            Phase::NotAServer => "not a server node",
            Phase::ApplyPending => "apiserver change pending (irsa-agent apply)",
            Phase::Held => "apiserver change held",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

/// The last converge pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConvergeRecord {
    pub at: u64,
    /// What started it: `start`, `reload`, `config-changed`, `files-changed`, `resync`,
    /// `retry`, `task`.
    pub trigger: String,
    pub ok: bool,
    pub duration_ms: u64,
}

/// One publish target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetStatus {
    pub target: String,
    pub ok: bool,
    /// `unchanged`, `written` (something was created or replaced), `failed`, `skipped`.
    pub result: String,
    pub error: Option<String>,
    pub last_success_at: Option<u64>,
}

/// The apiserver step (apply) of the last converge.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiserverStatus {
    /// `in-sync`, `changed`, `restart-pending` (written, the apiserver not restarted yet:
    /// `--no-restart`), `apply-pending` (`run.apply-issuer: false`: `irsa-agent apply` would
    /// change it), `failed`, `held` (a change was rolled back: not retried until the
    /// inputs change or a reload), `skipped` (publishing failed: the apiserver is not switched
    /// to an issuer relying parties cannot verify yet).
    pub result: String,
    pub message: Option<String>,
    pub at: u64,
}

/// The public check of the last converge: the issuer's documents fetched over HTTPS as a
/// relying party fetches them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PublicStatus {
    /// `matches`, `unreachable`, `differs` (stale, other keys, or a Content-Type relying
    /// parties refuse), `not-checked` (`public-check: false`).
    pub result: String,
    /// One line per document that is not what relying parties need.
    pub problems: Vec<String>,
    pub at: u64,
}

/// A scheduled task (see [`super::tasks`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskStatus {
    pub name: String,
    pub last_run_at: Option<u64>,
    pub next_due_at: Option<u64>,
    pub last_error: Option<String>,
    /// The task's own one-line status.
    pub status: Option<String>,
}

/// The `daemon` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    /// The node name the daemon coordinates under (`--node-name`, else the host name):
    /// `status` and `doctor` pick "this server" out of the cluster by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub started_at: u64,
    pub updated_at: u64,
    pub phase: Phase,
    /// The one-line status also sent to systemd (STATUS=).
    pub status: String,
    pub issuer: Option<String>,
    /// Why the configuration cannot be used (the previous one may still be in use).
    pub config_error: Option<String>,
    pub last_converge: Option<ConvergeRecord>,
    /// Unix time of the last converge that fully succeeded.
    pub last_success_at: Option<u64>,
    pub next_retry_at: Option<u64>,
    pub next_resync_at: Option<u64>,
    /// Failures in a row.
    pub failures: u32,
    /// Kids of the JWKS last published (or attempted), apiserver order.
    pub kids: Vec<String>,
    /// The kid of the key the apiserver signs with.
    pub signing_kid: Option<String>,
    pub targets: Vec<TargetStatus>,
    pub apiserver: Option<ApiserverStatus>,
    /// The public copy as relying parties see it (after the last successful publish).
    pub public: Option<PublicStatus>,
    /// What went wrong in the last converge.
    pub errors: Vec<String>,
    pub tasks: Vec<TaskStatus>,
    /// Directories watched for changes.
    pub watching: Vec<String>,
    pub metrics: Metrics,
}

impl DaemonStatus {
    /// The section in a state file, if any (and readable).
    pub fn from_state(state: &State) -> Option<DaemonStatus> {
        state
            .section(SECTION)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Stores this section (load, replace, save under the state lock).
    pub fn save(&self, root: &HostRoot) -> Result<(), StateError> {
        let value = serde_json::to_value(self).map_err(|e| StateError::Write {
            path: state::STATE_FILE.into(),
            source: std::io::Error::other(e),
        })?;
        State::update(root, |state| {
            state.other.insert(SECTION.to_string(), value);
        })
    }
}

/// This server's node name for `status` and `doctor`, as the daemon has it: `explicit`
/// (`--node-name`, `IRSA_AGENT_NODE_NAME`) when given, else the name the daemon recorded in
/// `state` (its unit may set `--node-name` where a shell does not), else the host name.
pub fn node_name(explicit: Option<&str>, state: Option<&State>) -> String {
    if let Some(node) = explicit.map(str::trim).filter(|n| !n.is_empty()) {
        return node.to_string();
    }
    state
        .and_then(DaemonStatus::from_state)
        .and_then(|d| d.node)
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(crate::host::host_name)
}

/// Is the process recorded in the section alive? (`false` after a clean stop.)
pub fn running(status: &DaemonStatus) -> bool {
    if status.phase == Phase::Stopped || status.pid == 0 {
        return false;
    }
    let Ok(raw) = i32::try_from(status.pid) else {
        return false;
    };
    match rustix::process::Pid::from_raw(raw) {
        Some(pid) => match rustix::process::test_kill_process(pid) {
            Ok(()) => true,
            Err(e) => e == rustix::io::Errno::PERM,
        },
        None => false,
    }
}

fn time(t: Option<u64>) -> String {
    t.map(state::rfc3339).unwrap_or_else(|| "never".to_string())
}

/// A scalar of a JSON value for the generic rendering; times (`*_at`, `*_since`) as RFC 3339.
fn scalar(key: &str, v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n)
            if (key.ends_with("_at") || key.ends_with("_since") || key.ends_with("_until"))
                && n.as_u64().is_some_and(|t| t > 1_000_000_000) =>
        {
            n.as_u64().map(state::rfc3339).unwrap_or_default()
        }
        other => other.to_string(),
    }
}

/// Renders a section another feature owns, as indented `key: value` lines.
pub fn render_generic(out: &mut String, indent: usize, key: &str, v: &serde_json::Value) {
    let pad = " ".repeat(indent);
    match v {
        serde_json::Value::Object(map) => {
            out.push_str(&format!("{pad}{key}:\n"));
            for (k, v) in map {
                render_generic(out, indent + 2, k, v);
            }
        }
        serde_json::Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
            let list: Vec<String> = items.iter().map(|i| scalar(key, i)).collect();
            let shown = if list.is_empty() {
                "(none)".to_string()
            } else {
                list.join(", ")
            };
            out.push_str(&format!("{pad}{key}: {shown}\n"));
        }
        serde_json::Value::Array(items) => {
            out.push_str(&format!("{pad}{key}:\n"));
            for (i, item) in items.iter().enumerate() {
                render_generic(out, indent + 2, &format!("[{i}]"), item);
            }
        }
        other => out.push_str(&format!("{pad}{key}: {}\n", scalar(key, other))),
    }
}

fn kid_list(d: &DaemonStatus) -> String {
    if d.kids.is_empty() {
        return "(none)".to_string();
    }
    d.kids
        .iter()
        .map(|k| {
            if d.signing_kid.as_deref() == Some(k.as_str()) {
                format!("{k} (signs)")
            } else {
                k.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The person's view of the state file.
/// `rotation_enabled` is `rotation.enabled` when the configuration could be read (`None`:
/// unknown, the rotation's next step is shown as its schedule says).
pub fn render_human(state: &State, rotation_enabled: Option<bool>) -> String {
    let mut out = String::new();
    match DaemonStatus::from_state(state) {
        None => out.push_str(
            "irsa-agent run: no daemon has run on this host yet (no `daemon` section in the state file)\n",
        ),
        Some(d) => {
            let alive = running(&d);
            let how = match (alive, d.phase) {
                (true, _) => format!("running (pid {} since {})", d.pid, time(Some(d.started_at))),
                (false, Phase::Stopped) => {
                    format!("stopped (last ran as pid {} until {})", d.pid, time(Some(d.updated_at)))
                }
                (false, _) => format!(
                    "NOT RUNNING: pid {} is gone without a clean stop (last update {})",
                    d.pid,
                    time(Some(d.updated_at))
                ),
            };
            out.push_str(&format!("irsa-agent run: {how}, version {}\n", d.version));
            out.push_str(&format!("state:         {}\n", d.phase.describe()));
            out.push_str(&format!("status:        {}\n", d.status));
            if let Some(issuer) = &d.issuer {
                out.push_str(&format!("issuer:        {issuer}\n"));
            }
            if let Some(e) = &d.config_error {
                out.push_str(&format!("configuration: {e}\n"));
            }
            if !d.kids.is_empty() || d.signing_kid.is_some() {
                out.push_str(&format!("keys:          {}\n", kid_list(&d)));
            }
            if !d.targets.is_empty() {
                out.push_str("targets:\n");
                for t in &d.targets {
                    let result = match &t.error {
                        Some(e) => format!("FAILED: {e}"),
                        None => format!("ok ({})", t.result),
                    };
                    out.push_str(&format!(
                        "  {}: {result}; last success {}\n",
                        t.target,
                        time(t.last_success_at)
                    ));
                }
            }
            if let Some(w) = d.metrics.webhook.as_ref().filter(|w| w.error.is_some()) {
                out.push_str(&format!(
                    "webhook:       NOT SERVED at {}: {} (pods are created without their identity, or refused with failure-policy Fail)\n",
                    w.url,
                    w.error.as_deref().unwrap_or_default()
                ));
            } else if let Some(w) = &d.metrics.webhook {
                out.push_str(&format!(
                    "webhook:       {} ({} reviews, {} pods given an identity, {} refused, {} errors; {} ServiceAccounts cached; certificate until {})\n",
                    w.url,
                    w.requests_total,
                    w.mutations_total,
                    w.refusals_total,
                    w.errors_total,
                    w.service_accounts,
                    time(Some(w.certificate_expiry_timestamp_seconds))
                ));
                if let Some(missed) = w.pods_missed.as_ref().filter(|m| !m.is_empty()) {
                    out.push_str(&format!(
                        "  MISSED: {} pod(s) run without their identity (created while no agent answered, or before the annotation): {}; delete them so their controllers recreate them\n",
                        missed.len(),
                        crate::webhook::missed::summary(missed)
                    ));
                }
            }
            if let Some(p) = &d.public {
                out.push_str(&format!(
                    "public copy:   {} ({})\n",
                    p.result,
                    time(Some(p.at))
                ));
                for problem in &p.problems {
                    out.push_str(&format!("  {problem}\n"));
                }
            }
            if let Some(a) = &d.apiserver {
                out.push_str(&format!(
                    "apiserver:     {}{} ({})\n",
                    a.result,
                    a.message
                        .as_ref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default(),
                    time(Some(a.at))
                ));
            }
            if let Some(c) = &d.last_converge {
                out.push_str(&format!(
                    "last converge: {} ({}): {} in {} ms\n",
                    time(Some(c.at)),
                    c.trigger,
                    if c.ok { "ok" } else { "FAILED" },
                    c.duration_ms
                ));
            }
            out.push_str(&format!("last success:  {}\n", time(d.last_success_at)));
            if let Some(t) = d.next_retry_at {
                out.push_str(&format!(
                    "next retry:    {} (failure {} in a row)\n",
                    time(Some(t)),
                    d.failures
                ));
            }
            if let Some(t) = d.next_resync_at {
                out.push_str(&format!("next resync:   {}\n", time(Some(t))));
            }
            for e in &d.errors {
                out.push_str(&format!("error:         {e}\n"));
            }
            for t in &d.tasks {
                out.push_str(&format!(
                    "task {}; last run {}; next due {}{}\n",
                    prefixed(&t.name, t.status.as_deref().unwrap_or("-")),
                    time(t.last_run_at),
                    time(t.next_due_at),
                    t.last_error
                        .as_ref()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default()
                ));
            }
            let m = &d.metrics;
            out.push_str(&format!(
                "metrics:       {} converges ({} failed), {} publish failures, {} objects written, {} keys published, {} apiserver restarts, {} drift found; last full publish {}\n",
                m.converges_total,
                m.converge_failures_total,
                m.publish_failures_total,
                m.objects_written_total,
                m.keys_published,
                m.apiserver_restarts_total,
                m.drift_found_total,
                time(m.last_publish_success_timestamp_seconds)
            ));
        }
    }
    if let Some(i) = &state.issuer {
        out.push_str("issuer switch (apply):\n");
        out.push_str(&format!("  issuer:      {}\n", i.issuer));
        out.push_str(&format!(
            "  still accepted: {}\n",
            if i.previous.is_empty() {
                "(none)".to_string()
            } else {
                i.previous.join(", ")
            }
        ));
        out.push_str(&format!("  switched at: {}\n", time(i.switched_at)));
        if let Some(p) = i.pending_restart_since {
            out.push_str(&format!("  restart pending since {}\n", state::rfc3339(p)));
        }
        if !i.retired.is_empty() {
            out.push_str(&format!(
                "  retired:     {} ({})\n",
                i.retired.join(", "),
                time(i.finalized_at)
            ));
        }
    }
    for (key, value) in &state.other {
        if key == SECTION || key == CLUSTER_KEY {
            continue;
        }
        // Rotation in its own words (phase, since when, what comes next and when).
        if key == crate::rotation::STATE_KEY
            && let Ok(st) = serde_json::from_value::<crate::rotation::RotationState>(value.clone())
        {
            let now = crate::state::unix_now();
            for line in crate::rotation::state_lines(&st, rotation_enabled.unwrap_or(true), now) {
                out.push_str(&line);
                out.push('\n');
            }
            continue;
        }
        render_generic(&mut out, 0, key, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_other_sections_generically() {
        let state: State = serde_json::from_value(serde_json::json!({
            "rotation": {"phase": "propagating", "next_key": "abc", "started_at": 1_795_334_742u64,
                          "kids": ["a", "b"], "steps": [{"name": "x"}]},
            "daemon": {"pid": 0, "phase": "stopped", "status": "stopped", "version": "0.1.0"}
        }))
        .expect("state");
        let text = render_human(&state, None);
        assert!(text.contains("irsa-agent run: stopped"), "{text}");
        assert!(text.contains("rotation:\n"), "{text}");
        assert!(text.contains("\n  kids: a, b\n"), "{text}");
        assert!(text.contains("  next_key: abc\n"), "{text}");
        assert!(
            text.contains("  started_at: 2026-11-22T08:05:42Z\n"),
            "{text}"
        );
        assert!(
            text.contains("  steps:\n    [0]:\n      name: x\n"),
            "{text}"
        );
    }

    #[test]
    fn a_dead_pid_is_not_running() {
        let mut d = DaemonStatus {
            pid: std::process::id(),
            phase: Phase::InSync,
            ..Default::default()
        };
        assert!(running(&d));
        d.phase = Phase::Stopped;
        assert!(!running(&d));
        d.phase = Phase::InSync;
        d.pid = i32::MAX as u32;
        assert!(!running(&d));
    }
}
