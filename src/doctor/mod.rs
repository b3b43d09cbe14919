//! `doctor`, `verify-token` and `trust-policy`: explaining what is wrong before AWS answers
//! `InvalidIdentityToken`.
//!
//! # Design
//!
//! **doctor** is a list of [`Check`]s. Each names one link of the chain from the key files to
//! the public JWKS, has a stable id (`apiserver.issuers`, `public.kids`, ...; the README lists
//! them), a [`Status`] (pass, warn, fail, skip), a one-line finding and, when something is
//! wrong, a concrete fix: the command to run or the configuration line to change. A check
//! that cannot run (no admin kubeconfig, no network) is a `skip` with the reason, never left
//! out. Any `fail` makes the exit status 1; warnings alone exit 0.
//!
//! Pure core, thin edges, as everywhere in the agent:
//! 1. gather: the configuration, the state file, the apiserver's effective flags and key files
//!    ([`local::gather`]); the running apiserver through the host's admin kubeconfig
//!    ([`running::gather`], on its own thread with the probe's runtime: readiness, its own
//!    discovery document and JWKS, the `kubernetes` endpoints and every other apiserver's
//!    JWKS); the public documents over HTTPS ([`public::gather`], the same trust as `publish`:
//!    system store or `SSL_CERT_FILE`, plus `ca-file:`). The two network parts run at the same
//!    time, under one overall deadline;
//! 2. evaluate: pure functions turn those facts into checks ([`local::evaluate`],
//!    [`running::evaluate`], [`public::evaluate`]); the unit tests feed them facts directly;
//! 3. render: text (grouped, `FAIL`/`WARN` first-class, fixes indented) or the `--json`
//!    document (README, "doctor --json").
//!
//! **verify-token** ([`token`]) decodes a token, picks the key by `kid` from the published JWKS
//! (or the local key files), verifies the signature with jsonwebtoken, and explains each
//! failure in words (unknown kid = stale JWKS, issuer and audience near-misses, times with the
//! clock skew, algorithm vs key type); with an IAM trust policy it evaluates the conditions on
//! `<provider>:sub` / `<provider>:aud` the way IAM does ([`policy`]).
//!
//! **trust-policy** ([`policy::render`]) prints the IAM trust policy, a Terraform snippet and
//! the Azure and GCP equivalents for one service account; its IAM JSON feeds straight back
//! into `verify-token --trust-policy`.

pub mod local;
pub mod policy;
pub mod public;
pub mod running;
pub mod thumbprint;
pub mod token;
pub mod words;

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::host::HostRoot;

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Skip,
    Warn,
    Fail,
}

impl Status {
    /// The four-letter tag of the text output.
    pub fn tag(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Skip => "skip",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable id, `<group>.<name>` (README lists them).
    pub id: &'static str,
    /// What the check was about when it repeats (a key file, a URL, an apiserver address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: Status,
    /// One line: what was found.
    pub finding: String,
    /// What to do: a command or the configuration line to change (`None` when nothing).
    pub fix: Option<String>,
    /// More lines (per-node keys, every config problem, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

impl Check {
    fn new(id: &'static str, status: Status, finding: impl Into<String>) -> Self {
        Check {
            id,
            subject: None,
            status,
            finding: finding.into(),
            fix: None,
            details: Vec::new(),
        }
    }
    pub fn pass(id: &'static str, finding: impl Into<String>) -> Self {
        Check::new(id, Status::Pass, finding)
    }
    pub fn warn(id: &'static str, finding: impl Into<String>) -> Self {
        Check::new(id, Status::Warn, finding)
    }
    pub fn fail(id: &'static str, finding: impl Into<String>) -> Self {
        Check::new(id, Status::Fail, finding)
    }
    pub fn skip(id: &'static str, reason: impl Into<String>) -> Self {
        Check::new(id, Status::Skip, reason)
    }
    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
    pub fn details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }
    /// The group: the id up to the first dot.
    pub fn group(&self) -> &'static str {
        self.id.split('.').next().unwrap_or(self.id)
    }
}

/// How doctor runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// The overall deadline for the network checks (they run concurrently).
    pub deadline: Duration,
    /// Above this a JWKS answer is too slow (AWS STS: IDPCommunicationError after ~5 s).
    pub slow_threshold: Duration,
    /// The apiserver URL to probe instead of the kubeconfig's (or kubeadm's advertise address).
    pub apiserver_url: Option<String>,
    /// "Now" in Unix seconds (tests); the system clock otherwise.
    pub now: Option<i64>,
    /// Skip every network check (reported as skipped).
    pub offline: bool,
    /// This server's node name (`--node-name`); `None`: the daemon's, else the host name
    /// ([`crate::daemon::status::node_name`]).
    pub node: Option<String>,
}

/// AWS STS reports `IDPCommunicationError` when the JWKS takes longer than about this.
pub const AWS_JWKS_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for Options {
    fn default() -> Self {
        Options {
            deadline: Duration::from_secs(20),
            slow_threshold: AWS_JWKS_TIMEOUT,
            apiserver_url: None,
            now: None,
            offline: false,
            node: None,
        }
    }
}

/// Every check, in order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    /// Wall time of the whole run.
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Report {
    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }
    /// True when no check failed.
    pub fn ok(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    /// The `--json` document (README, "doctor --json").
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.ok(),
            "summary": {
                "pass": self.count(Status::Pass),
                "warn": self.count(Status::Warn),
                "fail": self.count(Status::Fail),
                "skip": self.count(Status::Skip),
            },
            "elapsed_ms": u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX),
            "checks": self.checks,
        })
    }

    /// The text output: checks grouped, fixes and details indented, a summary line.
    pub fn to_text(&self) -> String {
        let mut out = render_checks(&self.checks);
        out.push_str(&format!(
            "{}: {} failed, {} warning{}, {} passed, {} skipped\n",
            if self.ok() { "ok" } else { "NOT OK" },
            self.count(Status::Fail),
            self.count(Status::Warn),
            if self.count(Status::Warn) == 1 {
                ""
            } else {
                "s"
            },
            self.count(Status::Pass),
            self.count(Status::Skip),
        ));
        out
    }
}

/// Checks as text: a title per group, one line per check, details and the fix indented.
pub fn render_checks(checks: &[Check]) -> String {
    let mut out = String::new();
    let mut group = "";
    for check in checks {
        if check.group() != group {
            group = check.group();
            out.push_str(group_title(group));
            out.push('\n');
        }
        let name = check.id;
        let subject = check
            .subject
            .as_deref()
            .map(|s| format!(" [{s}]"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {}  {name}{subject}: {}\n",
            check.status.tag(),
            check.finding
        ));
        for detail in &check.details {
            out.push_str(&format!("        - {detail}\n"));
        }
        if let Some(fix) = &check.fix {
            out.push_str(&format!("        fix: {fix}\n"));
        }
    }
    out
}

fn group_title(group: &str) -> &'static str {
    match group {
        "config" => "configuration",
        "apiserver" => "apiserver configuration and key files",
        "running" => "running apiserver (through the admin kubeconfig)",
        "public" => "public discovery document and JWKS (as AWS, GCP and Azure fetch them)",
        "token" => "token",
        "policy" => "trust policy",
        _ => "other",
    }
}

/// The current time in Unix seconds.
pub fn unix_now() -> i64 {
    i64::try_from(crate::state::unix_now()).unwrap_or(i64::MAX)
}

/// Runs every check on the host under `root`.
pub fn run(root: &HostRoot, config: Option<&Path>, options: &Options) -> Report {
    let started = Instant::now();
    let mut local = local::gather(root, config);
    if let Some(node) = options.node.as_deref().filter(|n| !n.trim().is_empty()) {
        local.node = node.trim().to_string();
    }
    let mut checks = local::evaluate(&local);

    // The two network parts run at the same time: the apiserver on a thread (the probe owns
    // its runtime), the public documents on a current-thread runtime here.
    let deadline = started + options.deadline;
    let apiserver_job = running::start(root, &local, options);
    let public = public::gather_blocking(root, &local, options, deadline);
    let apiserver = apiserver_job.finish(deadline);

    let now = options.now.unwrap_or_else(unix_now);
    checks.extend(running::evaluate(&local, &apiserver, now));
    checks.extend(public::evaluate(&local, &public, options, now));
    Report {
        checks,
        elapsed: started.elapsed(),
    }
}
