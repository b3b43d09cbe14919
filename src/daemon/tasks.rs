//! The extension point for scheduled work (key rotation, issue 6, plugs in here).
//!
//! A [`ScheduledTask`] is registered once when the daemon starts (`cli/run.rs`, [`tasks`]
//! list) and is then run by the main loop:
//! - after **every converge** (`TaskReason::AfterConverge`, with what the converge found), and
//! - when the time it asked for comes (`TaskReason::Due`); the loop sleeps until the earliest
//!   due time of all tasks (no polling).
//!
//! The first run is the one after the first converge, so a task always starts from a host the
//! daemon has just read and published. Not configured yet (no issuer): tasks do not run.
//!
//! `run` returns when it wants to run next (`Ok(Some(time))`; `Ok(None)`: only after
//! converges). An `Err` is logged and shown by `status`, and the task is retried with capped
//! exponential backoff (the daemon keeps running). Tasks run on the daemon's single-threaded
//! runtime, one at a time, never concurrently with a converge: a task may read and write the
//! host through the same modules the daemon uses without locking. Blocking work (restarting
//! the apiserver through [`crate::apiserver::restart`], probing it through
//! [`crate::apiserver::probe`], which runs its own runtime) must go through
//! [`TaskContext::blocking`]: it runs on a blocking thread, and a SIGTERM that arrives meanwhile
//! waits for it to finish instead of cutting it off.
//!
//! Keys a task wants published before the apiserver has them (rotation's next key) are
//! returned by [`ScheduledTask::extra_keys`]; every converge publishes them together with the
//! apiserver's keys, so a resync never removes a key published ahead of use. A task's own
//! state belongs in its own top-level key of the state file (`crate::state::State::update`);
//! `irsa-agent status` shows every section.
//!
//! ```ignore
//! struct Rotation { /* ... */ }
//!
//! #[async_trait::async_trait(?Send)]
//! impl ScheduledTask for Rotation {
//!     fn name(&self) -> &str { "rotation" }
//!     fn extra_keys(&self) -> Vec<PublicKey> { self.pending_key.iter().cloned().collect() }
//!     async fn run(&mut self, ctx: &mut TaskContext<'_>) -> anyhow::Result<Option<SystemTime>> {
//!         let next = self.step(ctx.now, ctx.publishers).await?;   // one guarded transition
//!         ctx.set_status(format!("rotation: {}", self.phase));
//!         if self.changed_key_files { ctx.request_converge(); }
//!         Ok(next)                                              // e.g. Some(propagated_at)
//!     }
//! }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use crate::clock::Clock;
use crate::config::Settings;
use crate::host::HostRoot;
use crate::keys::PublicKey;
use crate::publish::Publisher;

/// Why a task runs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskReason {
    /// The time it asked for has come.
    Due,
    /// A converge pass just finished.
    AfterConverge {
        /// Everything (publish and apiserver) ended as it should be.
        in_sync: bool,
        /// The kids the converge published (or tried to), apiserver order.
        published_kids: Vec<String>,
        /// The kid the apiserver signs with, when known.
        signing_kid: Option<String>,
    },
}

/// What a task gets to work with.
pub struct TaskContext<'a> {
    pub now: SystemTime,
    pub reason: TaskReason,
    pub root: &'a HostRoot,
    pub settings: &'a Settings,
    /// The configured targets, built once (their credential caches live inside); use them with
    /// [`crate::publish::publish_all`] / [`crate::publish::check_all`].
    pub publishers: &'a [Publisher],
    /// The daemon's clock: tasks wait and record on it.
    pub clock: Arc<dyn Clock>,
    pub(crate) status: Option<String>,
    pub(crate) converge_requested: bool,
    pub(crate) critical: Arc<AtomicBool>,
}

impl<'a> TaskContext<'a> {
    pub(crate) fn new(
        now: SystemTime,
        reason: TaskReason,
        root: &'a HostRoot,
        settings: &'a Settings,
        publishers: &'a [Publisher],
        critical: Arc<AtomicBool>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        TaskContext {
            now,
            reason,
            root,
            settings,
            publishers,
            clock,
            status: None,
            converge_requested: false,
            critical,
        }
    }

    /// A one-line status shown by `irsa-agent status` (and logged when it changes).
    pub fn set_status(&mut self, line: impl Into<String>) {
        self.status = Some(line.into());
    }

    /// Asks for a converge (re-read the key files, publish, apply) right after this task.
    pub fn request_converge(&mut self) {
        self.converge_requested = true;
    }

    /// Runs blocking work on a blocking thread; a SIGTERM arriving meanwhile waits for it.
    pub async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let flag = self.critical.clone();
        flag.store(true, Ordering::SeqCst);
        let result = tokio::task::spawn_blocking(work).await;
        flag.store(false, Ordering::SeqCst);
        result.map_err(|e| anyhow::anyhow!("blocking work failed: {e}"))
    }
}

/// Scheduled work the daemon runs (see the module docs).
#[async_trait::async_trait(?Send)]
pub trait ScheduledTask {
    /// A short name for logs and `status` (`rotation`).
    fn name(&self) -> &str;

    /// Keys to publish in addition to the apiserver's verification keys.
    fn extra_keys(&self) -> Vec<PublicKey> {
        Vec::new()
    }

    /// Prometheus text (complete `# HELP`/`# TYPE` families) appended to the daemon's metrics
    /// every time they are written.
    fn metrics(&self) -> String {
        String::new()
    }

    /// One step. Returns when to run again (`None`: only after the next converge).
    async fn run(&mut self, ctx: &mut TaskContext<'_>) -> anyhow::Result<Option<SystemTime>>;
}
