//! The daemon's state and its converge pass. The main loop ([`super::main_loop`]) owns the
//! signals, the watchdog and systemd; everything it decides is asked of an [`Engine`]:
//! what is due next ([`Engine::next_wakeup`], [`Engine::take_due`]), what an inotify event
//! means ([`Engine::on_event`]), and the work itself ([`Engine::converge`],
//! [`Engine::run_tasks`], [`Engine::load_config`]).

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use super::apply_step::{ApplyReport, ApplyStep, FailureKind};
use super::backoff::Jitter;
use super::decide::{self, Converged, HoldCheck, Retry, Schedule, Tick, round};
pub use super::decide::{Trigger, Work};
use super::metrics::{self, TargetMetric};
use super::status::{
    ApiserverStatus, ConvergeRecord, DaemonStatus, Phase, PublicStatus, TargetStatus, TaskStatus,
    prefixed,
};
use super::tasks::{ScheduledTask, TaskContext, TaskReason};
use super::watch::{Group, WatchEvent, WatchSet, Watcher};
use crate::apiserver::{self, Observed};
use crate::clock::Clock;
use crate::config::{self, Settings, format_duration};
use crate::host::HostRoot;
use crate::publish::{self, Outcome, Publication, Publisher};
use crate::state::State;

/// The longest one request of the public check may take (AWS STS gives up after about 5 s).
const PUBLIC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many reads of the apiserver's files per converge ([`Engine::observe_watched`]):
/// each one after the first follows a watch added on a directory the previous read named (the
/// configuration, then the key files it names, then a drop-in folder appearing meanwhile).
const OBSERVE_ROUNDS: usize = 4;

/// How the daemon was started.
#[derive(Debug, Clone)]
pub struct Options {
    pub root: HostRoot,
    /// `--config FILE` instead of /etc/irsa-agent/config.yaml + config.d/.
    pub config: Option<PathBuf>,
    /// The node name it coordinates under (recorded for `status` and `doctor`).
    pub node: String,
}

struct TaskSlot {
    task: Box<dyn ScheduledTask>,
    status: TaskStatus,
}

/// Why the publication must not go out, if it must not: the JWKS has to contain the key the
/// apiserver signs with, or tokens it mints could not be verified by anyone.
pub fn check_signing_key(
    kids: &[String],
    signing_kid: &str,
    signing_file: &str,
) -> Result<(), String> {
    if kids.iter().any(|k| k == signing_kid) {
        return Ok(());
    }
    Err(format!(
        "refusing to publish: the JWKS would lack the key the apiserver signs with ({signing_file}, kid {signing_kid}), so nobody could verify the tokens it mints; its public half must be in a --service-account-key-file"
    ))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The daemon's state (see the module docs).
pub struct Engine {
    /// The one clock every time the engine acts on comes from.
    clock: Arc<dyn Clock>,
    /// What is due when, and whether an apiserver change is held: the decisions' state.
    schedule: Schedule,
    root: HostRoot,
    explicit_config: Option<PathBuf>,
    settings: Option<Settings>,
    config_error: Option<String>,
    publishers: Vec<Publisher>,
    /// The signing kid and settings the publishers were built with (self-issued S3
    /// credentials sign with the signing key: rebuilt when it changes).
    publishers_for: Option<String>,
    apply: Option<Box<dyn ApplyStep>>,
    tasks: Vec<TaskSlot>,
    watch_set: WatchSet,
    watcher: Watcher,
    /// Kids last written successfully per target (drift: a target differs although nothing
    /// changed on our side).
    last_good: BTreeMap<String, Vec<String>>,
    /// The apiserver step found everything in sync last time.
    apiserver_was_in_sync: bool,
    /// The apiserver runs with older flags than its files say (`--no-restart`).
    restart_pending: bool,
    /// `run.apply-issuer: false` and the apiserver's flags differ from the configuration.
    apply_pending: bool,
    last_warnings: Vec<String>,
    /// Kids published only because the running apiserver still serves them (not restarted
    /// since they left the key files); while there are any, the daemon looks again soon.
    live_only: Vec<String>,
    /// The apiserver step's last ask to look again this soon ([`super::Applied::look_again`]).
    look_again: Option<Duration>,
    /// Kids published only because another server's apiserver verifies with them (with the
    /// node), as last logged.
    peer_only: Vec<String>,
    /// The keys the running apiserver was last seen serving: kept published while it cannot
    /// be asked (a key is dropped from the JWKS only on evidence that it no longer serves it).
    last_live: Vec<crate::keys::PublicKey>,
    last_errors: Vec<String>,
    /// What the last successful publish wrote (for the public check).
    last_publication: Option<Publication>,
    /// Why there is nothing to do on this host (an agent node): no retries, the watches on
    /// the server's files bring the next converge.
    not_a_server: Option<String>,
    pub status: DaemonStatus,
    metrics_tx: tokio::sync::watch::Sender<String>,
    metrics_server: Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>,
    /// The pod identity webhook being served, and the settings it was started with.
    webhook: Option<(
        crate::config::webhook::WebhookSettings,
        crate::webhook::Running,
    )>,
    /// The webhook's ServiceAccount cache; outlives restarts of the server.
    pub webhook_cache: crate::webhook::ServiceAccounts,
    /// Why the enabled webhook is not served (shown by `status`, retried at every converge).
    webhook_error: Option<String>,
    textfile_error: Option<String>,
    state_error: Option<String>,
    /// Set while blocking work that must not be cut off runs (an apiserver change).
    pub critical: Arc<AtomicBool>,
    /// Set when a stop was requested: no new apiserver step starts.
    pub stopping: Arc<AtomicBool>,
}

impl Engine {
    pub fn new(
        options: Options,
        clock: Arc<dyn Clock>,
        apply: Box<dyn ApplyStep>,
        tasks: Vec<Box<dyn ScheduledTask>>,
        watcher: Watcher,
    ) -> Engine {
        let previous = State::load(&options.root)
            .ok()
            .as_ref()
            .and_then(DaemonStatus::from_state);
        let now = clock.now();
        let mut status = DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: now,
            updated_at: now,
            phase: Phase::Starting,
            status: "starting".into(),
            node: Some(options.node.clone()),
            ..Default::default()
        };
        status.metrics.start_timestamp_seconds = now;
        if let Some(prev) = previous {
            // Carried over: when the documents were last published successfully.
            status.metrics.last_publish_success_timestamp_seconds =
                prev.metrics.last_publish_success_timestamp_seconds;
            status.last_success_at = prev.last_success_at;
            status.targets = prev
                .targets
                .into_iter()
                .map(|t| TargetStatus {
                    ok: false,
                    result: "not yet checked".into(),
                    error: None,
                    ..t
                })
                .collect();
        }
        let (metrics_tx, _) = tokio::sync::watch::channel(String::new());
        let watch_set = WatchSet::new(&options.root, options.config.as_deref());
        Engine {
            clock,
            schedule: Schedule::new(tasks.len(), Jitter::from_entropy()),
            root: options.root,
            explicit_config: options.config,
            settings: None,
            config_error: None,
            publishers: Vec::new(),
            publishers_for: None,
            apply: Some(apply),
            tasks: tasks
                .into_iter()
                .map(|task| TaskSlot {
                    status: TaskStatus {
                        name: task.name().to_string(),
                        ..Default::default()
                    },
                    task,
                })
                .collect(),
            watch_set,
            watcher,
            last_good: BTreeMap::new(),
            apiserver_was_in_sync: false,
            restart_pending: false,
            apply_pending: false,
            last_warnings: Vec::new(),
            live_only: Vec::new(),
            look_again: None,
            peer_only: Vec::new(),
            last_live: Vec::new(),
            last_errors: Vec::new(),
            last_publication: None,
            not_a_server: None,
            status,
            metrics_tx,
            metrics_server: None,
            webhook: None,
            webhook_cache: crate::webhook::ServiceAccounts::loading(),
            webhook_error: None,
            textfile_error: None,
            state_error: None,
            critical: Arc::new(AtomicBool::new(false)),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn configured(&self) -> bool {
        self.settings.is_some()
    }

    /// The configuration file a person should edit.
    fn config_file_shown(&self) -> String {
        match &self.explicit_config {
            Some(p) => p.display().to_string(),
            None => config::CONFIG_FILE.to_string(),
        }
    }

    /// (Re)reads the configuration. A configuration that cannot be used never replaces one
    /// that could: the daemon keeps going with the previous settings and says so.
    pub fn load_config(&mut self) {
        // Watch at least the configuration (the apiserver's files come with a converge), and
        // before reading it: a file written between the read and a new watch (the folder was
        // just created) would otherwise go unseen until the next resync.
        if self.settings.is_none() {
            let _ = self.set_watches(WatchSet::new(&self.root, self.explicit_config.as_deref()));
        }
        match config::load(&self.root, self.explicit_config.as_deref()) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    log::warn!("{w}");
                }
                if self.config_error.is_some() {
                    log::info!("the configuration is valid again");
                }
                self.config_error = None;
                if self.settings.as_ref() != Some(&loaded.settings) {
                    if self.settings.is_some() {
                        log::info!("configuration changed; converging with the new settings");
                    }
                    self.schedule.set_retry_max(loaded.settings.run.retry_max);
                    self.publishers.clear();
                    self.publishers_for = None;
                    self.last_good.clear();
                    self.status.issuer = Some(loaded.settings.issuer.clone());
                    for w in crate::unit::sandbox_warnings(&self.root, &loaded.settings) {
                        log::warn!("{w}");
                    }
                    self.settings = Some(loaded.settings);
                    self.update_metrics_server();
                    self.update_webhook_server();
                }
            }
            Err(e) if e.is_unconfigured() && self.settings.is_none() => {
                self.config_error = None;
                log::info!(
                    "no issuer configured yet: waiting for `issuer:` in {} (nothing is changed until then)",
                    self.config_file_shown()
                );
            }
            Err(e) => {
                let message = e.to_string();
                if self.config_error.as_ref() != Some(&message) {
                    match &self.settings {
                        Some(_) => log::error!(
                            "{message}\nkeeping the previous configuration until this is fixed"
                        ),
                        None => log::error!("{message}\nwaiting for a valid configuration"),
                    }
                }
                self.config_error = Some(message);
            }
        }
        self.refresh_status();
    }

    /// A reload asked for by a person (SIGHUP): re-read the configuration and try everything
    /// again now, a held apiserver change included.
    pub fn reload(&mut self) {
        self.schedule.reload();
        self.load_config();
    }

    fn update_metrics_server(&mut self) {
        let wanted = self.settings.as_ref().and_then(|s| s.run.metrics_listen);
        if self.metrics_server.as_ref().map(|(a, _)| *a) == wanted {
            return;
        }
        if let Some((addr, handle)) = self.metrics_server.take() {
            handle.abort();
            log::info!("metrics endpoint on {addr} closed");
        }
        let Some(addr) = wanted else { return };
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std);
        match listener {
            Ok(listener) => {
                log::info!("serving metrics on http://{addr}/metrics");
                let handle = tokio::spawn(metrics::serve(listener, self.metrics_tx.subscribe()));
                self.metrics_server = Some((addr, handle));
            }
            Err(e) => log::error!("cannot serve metrics on {addr}: {e}"),
        }
    }

    /// Starts, restarts (settings changed) or stops the webhook server.
    fn update_webhook_server(&mut self) {
        let wanted = self
            .settings
            .as_ref()
            .map(|s| s.webhook.clone())
            .filter(|w| w.enabled);
        if self.webhook.as_ref().map(|(w, _)| w) == wanted.as_ref() && self.webhook_error.is_none()
        {
            return;
        }
        self.webhook_error = None;
        if let Some((old, running)) = self.webhook.take() {
            running.stop();
            log::info!("webhook on {} stopped", old.url());
        }
        self.status.metrics.webhook = None;
        let Some(wanted) = wanted else { return };
        match crate::webhook::start(
            &self.root,
            &wanted,
            self.webhook_cache.clone(),
            crate::webhook::unix_now(),
        ) {
            Ok(mut running) => {
                log::info!(
                    "serving the pod identity webhook on {} (CA in {})",
                    wanted.url(),
                    crate::webhook::certs::ca_file(&self.root).display()
                );
                if let Some(settings) = &self.settings {
                    running.attach(tokio::spawn(crate::webhook::kube_sync::run(
                        self.root.clone(),
                        settings.distribution,
                        wanted.clone(),
                        self.webhook_cache.clone(),
                        running.bundle.clone(),
                        running.control(),
                        running.counters.clone(),
                    )));
                }
                self.webhook = Some((wanted, running));
            }
            Err(e) => {
                let message = format!("{e:#}");
                log::error!(
                    "cannot serve the pod identity webhook: {message} (tried again at every converge)"
                );
                self.webhook_error = Some(message);
            }
        }
    }

    /// Watches `set`. Returns whether a directory is newly watched: what was read in it before
    /// may have changed unseen, and must be read again.
    fn set_watches(&mut self, set: WatchSet) -> bool {
        self.watch_set = set;
        let updated = self.watcher.update(&self.watch_set);
        for problem in &updated.problems {
            log::warn!("{problem}");
        }
        self.status.watching = self
            .watcher
            .watched()
            .map(|p| self.root.host_view(p).display().to_string())
            .collect();
        updated.added > 0
    }

    /// What an inotify event means: starts or extends the debounce window.
    pub fn on_event(&mut self, event: WatchEvent) {
        let (mut reload, mut relevant) = (false, false);
        match event {
            WatchEvent::Rescan => {
                log::warn!("the kernel dropped file events; re-reading everything");
                (reload, relevant) = (true, true);
            }
            WatchEvent::Error(e) => log::warn!("file watch: {e}"),
            WatchEvent::Changed(paths) => {
                for path in paths {
                    match self.watch_set.classify(&path) {
                        Some(Group::AgentConfig) => {
                            log::debug!("changed: {}", path.display());
                            (reload, relevant) = (true, true);
                        }
                        Some(Group::Apiserver) => {
                            log::debug!("changed: {}", path.display());
                            relevant = true;
                        }
                        None => {}
                    }
                }
            }
        }
        if relevant {
            self.schedule.on_change(reload, self.clock.monotonic());
        }
    }

    fn debounce_period(&self) -> Duration {
        self.settings
            .as_ref()
            .map_or(decide::DEFAULT_DEBOUNCE, |s| s.run.debounce)
    }

    /// The clock's time now, monotonic.
    pub fn now(&self) -> Tick {
        self.clock.monotonic()
    }

    /// Unix time `at` (in the future or past) stands for.
    fn unix_of(&self, at: Tick) -> u64 {
        let (now, wall) = (self.clock.monotonic(), self.clock.now());
        if at >= now {
            wall.saturating_add((at - now).as_secs())
        } else {
            wall.saturating_sub((now - at).as_secs())
        }
    }

    /// When the loop must wake up next (`None`: only for an event or a signal).
    pub fn next_wakeup(&self) -> Option<Tick> {
        self.schedule
            .next_wakeup(self.configured(), self.debounce_period())
    }

    /// The work due now, if any.
    pub fn take_due(&mut self) -> Option<Work> {
        let (now, configured, period) = (self.now(), self.configured(), self.debounce_period());
        self.schedule.take_due(now, configured, period)
    }

    /// One converge: read the host, publish, then bring the apiserver in line, then run the
    /// tasks. Returns whether a task asked for another converge.
    pub async fn converge(&mut self, trigger: Trigger) -> bool {
        let Some(settings) = self.settings.clone() else {
            return false;
        };
        let started = self.clock.monotonic();
        log::debug!("converging ({})", trigger.name());
        self.status.metrics.converges_total += 1;
        // A webhook that could not start (port taken, CA file unreadable) is tried again.
        if self.webhook_error.is_some() {
            self.update_webhook_server();
        }
        let mut errors: Vec<String> = Vec::new();
        if let Some(step) = self.apply.as_mut() {
            step.begin();
        }

        let observed = self.observe_watched(&settings);

        let not_a_server = match &observed {
            Err(e) if e.is_agent_node() => Some(e.to_string()),
            _ => None,
        };
        if not_a_server.is_some() && not_a_server != self.not_a_server {
            log::error!(
                "{}; waiting until this host becomes a server (not retrying; the files are watched)",
                not_a_server.as_deref().unwrap_or_default()
            );
        }
        self.not_a_server = not_a_server;
        let published = match &observed {
            Ok(o) => self.publish(&settings, o, &mut errors).await,
            Err(_) if self.not_a_server.is_some() => false,
            Err(e) => {
                errors.push(format!("cannot read the apiserver configuration: {e}"));
                false
            }
        };
        if published && !self.stopping.load(Ordering::SeqCst) {
            self.check_public(&settings, &mut errors).await;
        }
        let apiserver_ok = if !published {
            if observed.is_ok() {
                self.status.apiserver = Some(ApiserverStatus {
                    result: "skipped".into(),
                    message: Some(
                        "waiting for the documents to be published first: relying parties must be able to verify tokens before the apiserver signs with the issuer".into(),
                    ),
                    at: self.clock.now(),
                });
            }
            false
        } else if !decide::apiserver_step_runs(published, self.stopping.load(Ordering::SeqCst)) {
            false
        } else {
            self.apiserver_step(&settings, &mut errors).await
        };

        let ok = published && apiserver_ok && errors.is_empty();
        let now = self.clock.monotonic();
        let duration = now.saturating_sub(started);
        self.status.metrics.last_converge_duration_seconds = duration.as_secs_f64();
        self.status.last_converge = Some(ConvergeRecord {
            at: self.clock.now(),
            trigger: trigger.name().into(),
            ok,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        });
        let converged = Converged {
            ok,
            not_a_server: self.not_a_server.is_some(),
            live_only: !self.live_only.is_empty(),
            look_again: self.look_again,
        };
        match self
            .schedule
            .after_converge(converged, now, settings.run.resync_interval)
        {
            Retry::Recovered { after } => {
                if after > 0 {
                    log::info!("recovered after {after} failed attempt(s)");
                }
                self.status.last_success_at = Some(self.clock.now());
            }
            // Nothing to retry: the watches on the server's files bring the next converge.
            Retry::NotAServer => {}
            Retry::After { delay, failures } => {
                self.status.metrics.converge_failures_total += 1;
                if errors != self.last_errors {
                    for e in &errors {
                        log::error!("{e}");
                    }
                    log::warn!("retrying in {}", format_duration(round(delay)));
                } else {
                    log::debug!(
                        "failed again ({failures} in a row); retrying in {}",
                        format_duration(round(delay))
                    );
                }
            }
        }
        self.last_errors = errors.clone();
        self.status.errors = errors;
        self.refresh_status();

        if !decide::tasks_run_after_converge(self.stopping.load(Ordering::SeqCst)) {
            return false;
        }
        let reason = TaskReason::AfterConverge {
            in_sync: ok && self.schedule.held().is_none(),
            published_kids: self.status.kids.clone(),
            signing_kid: self.status.signing_kid.clone(),
        };
        let requested = self.run_tasks(Some(reason)).await;
        decide::follow_up(requested, trigger).is_some()
    }

    /// Reads the apiserver's files and watches them. Which files those are is known only
    /// once they are read (the configuration names the key files), so the watch comes after
    /// the read: a file changed in between, in a directory not watched yet, would be seen by
    /// nobody until the next resync. So while the read adds a watch, it is read again (the
    /// watch now sees any later change); bounded, since every round only adds watches.
    fn observe_watched(&mut self, settings: &Settings) -> Result<Observed, apiserver::DetectError> {
        let mut rounds = 0;
        loop {
            let observed = apiserver::observe(&self.root, settings.distribution);
            crate::failpoint::hit("daemon:after-observe");
            let mut set = WatchSet::new(&self.root, self.explicit_config.as_deref());
            match &observed {
                Ok(o) => set.add_apiserver(&self.root, o),
                Err(_) => set.add_markers(&self.root, settings),
            }
            rounds += 1;
            if !self.set_watches(set) || rounds >= OBSERVE_ROUNDS {
                return observed;
            }
            log::debug!("newly watched directories: reading the apiserver's files again");
        }
    }

    /// The keys the running apiserver serves (`None`: it cannot be asked), and the keys the
    /// other servers' apiservers verify with, by node.
    async fn live_keys(
        &mut self,
        observed: &Observed,
    ) -> (
        Option<Vec<crate::keys::PublicKey>>,
        Vec<(String, crate::keys::PublicKey)>,
    ) {
        let Some(mut step) = self.apply.take() else {
            return (None, Vec::new());
        };
        let observed = observed.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let keys = step.live_keys(&observed);
            let peers = step.peer_keys(&observed);
            (step, keys, peers)
        })
        .await;
        match joined {
            Ok((step, keys, peers)) => {
                self.apply = Some(step);
                (keys, peers)
            }
            Err(e) => {
                log::error!("asking the apiserver for its keys failed internally: {e}");
                (None, Vec::new())
            }
        }
    }

    /// Builds the publication from the apiserver's keys (and the tasks' extra keys), checks
    /// it, and writes it to every target.
    async fn publish(
        &mut self,
        settings: &Settings,
        observed: &Observed,
        errors: &mut Vec<String>,
    ) -> bool {
        let keys = &observed.keys;
        if !keys.errors.is_empty() {
            errors.push(format!(
                "not publishing: the apiserver would refuse its key files: {}",
                keys.errors.join("; ")
            ));
            return false;
        }
        let Some(signing) = &keys.signing else {
            errors.push(match &observed.flags.signing_endpoint {
                Some(e) => format!(
                    "not publishing: tokens are signed by the external signer at {e}; irsa-agent cannot tell which key signs"
                ),
                None => "not publishing: the apiserver has no --service-account-signing-key-file".into(),
            });
            return false;
        };
        let mut all = keys.verification.clone();
        for slot in &self.tasks {
            all.extend(slot.task.extra_keys());
        }
        // Never drop a key the running apiserver still verifies (and may sign) with: a key
        // file replaced by one without it takes effect only at the apiserver's next restart.
        let (live, peers) = self.live_keys(observed).await;
        let live = match live {
            Some(live) => {
                self.last_live = live.clone();
                live
            }
            None => {
                if !self.last_live.is_empty() {
                    log::debug!(
                        "the running apiserver cannot be asked for its keys; keeping the {} it was last seen serving",
                        self.last_live.len()
                    );
                }
                self.last_live.clone()
            }
        };
        let live_only = crate::keys::add_missing(&mut all, live);
        if live_only != self.live_only {
            if live_only.is_empty() {
                log::info!(
                    "the running apiserver serves exactly the key files' keys again; kid(s) {} no longer published",
                    self.live_only.join(", ")
                );
            } else {
                log::warn!(
                    "kid(s) {} stay published: the running apiserver still verifies with them, although the key files no longer hold them (it has not been restarted since); they go once it has",
                    live_only.join(", ")
                );
            }
            self.live_only = live_only;
        }
        // The union of every live server's keys: a key another server's apiserver verifies
        // with stays published even when this one lacks it.
        let mut from_peers: Vec<String> = Vec::new();
        for (node, key) in peers {
            for kid in crate::keys::add_missing(&mut all, vec![key]) {
                from_peers.push(format!("{kid} ({node})"));
            }
        }
        if from_peers != self.peer_only {
            if from_peers.is_empty() {
                log::info!(
                    "this server's apiserver has every key the other servers verify with again"
                );
            } else {
                log::warn!(
                    "kid(s) {} stay published: the other servers' apiservers verify with them, this one's does not, so it rejects tokens signed with them (a rotation step not picked up yet, or keys restored from an old backup)",
                    from_peers.join(", ")
                );
            }
            self.peer_only = from_peers;
        }
        let publication = Publication::new(&settings.issuer, &settings.jwks_uri, &all);
        let signing_kid = signing.kid();
        self.status.kids = publication.kids().to_vec();
        self.status.signing_kid = Some(signing_kid.clone());
        let signing_file = observed.flags.signing_key_file.clone().unwrap_or_default();
        if let Err(e) = check_signing_key(publication.kids(), &signing_kid, &signing_file) {
            errors.push(e);
            self.status.metrics.publish_failures_total += 1;
            return false;
        }
        if self.publishers_for.as_deref() != Some(signing_kid.as_str()) {
            let env = publish::Environment {
                root: self.root.clone(),
                ca_file: settings.ca_file.as_ref().map(|p| self.root.path(p)),
            };
            match publish::publishers(settings, &env) {
                Ok(p) => {
                    self.publishers = p;
                    self.publishers_for = Some(signing_kid.clone());
                }
                Err(e) => {
                    errors.push(format!("cannot set up the publish targets: {e}"));
                    self.status.metrics.publish_failures_total += 1;
                    return false;
                }
            }
        }
        let timeout = settings.run.publish_timeout;
        // `None`: timed out (the requests in flight are dropped).
        let reports = tokio::time::timeout(
            timeout,
            publish::publish_all(&self.publishers, &publication),
        )
        .await
        .ok();
        let now = self.clock.now();
        let kids = publication.kids().to_vec();
        let mut all_ok = true;
        let mut targets = Vec::new();
        for (i, p) in self.publishers.iter().enumerate() {
            let name = p.name();
            let previous = self.status.targets.iter().find(|t| t.target == name);
            let mut t = TargetStatus {
                target: name.clone(),
                ok: false,
                result: "failed".into(),
                error: None,
                last_success_at: previous.and_then(|t| t.last_success_at),
            };
            match reports.as_ref().and_then(|r| r.get(i)) {
                None => {
                    t.error = Some(format!(
                        "gave up after {} (run.publish-timeout)",
                        format_duration(timeout)
                    ));
                }
                Some(report) => {
                    let failures: Vec<String> = [&report.jwks, &report.discovery]
                        .into_iter()
                        .chain(report.extras.iter())
                        .filter_map(|d| match &d.outcome {
                            Outcome::Failed(why) => Some(why.clone()),
                            _ => None,
                        })
                        .collect();
                    let written = [&report.jwks, &report.discovery]
                        .into_iter()
                        .chain(report.extras.iter())
                        .filter(|d| matches!(d.outcome, Outcome::Created | Outcome::Updated))
                        .count() as u64;
                    self.status.metrics.objects_written_total += written;
                    for d in [&report.jwks, &report.discovery] {
                        if !d.merged_kids.is_empty() {
                            log::warn!(
                                "{name}: kept kid(s) {} another writer published concurrently",
                                d.merged_kids.join(", ")
                            );
                        }
                    }
                    if failures.is_empty() && report.in_sync() {
                        t.ok = true;
                        t.result = if written > 0 { "written" } else { "unchanged" }.into();
                        t.last_success_at = Some(now);
                        if written > 0 {
                            if self.last_good.get(&name) == Some(&kids) {
                                self.status.metrics.drift_found_total += 1;
                                log::warn!(
                                    "{name}: the published documents had been changed or removed behind irsa-agent's back; restored"
                                );
                            } else {
                                log::info!(
                                    "{name}: published {} key(s): {}",
                                    kids.len(),
                                    kids.join(", ")
                                );
                            }
                        }
                        self.last_good.insert(name.clone(), kids.clone());
                    } else {
                        t.error = Some(if failures.is_empty() {
                            "not every document is in place".to_string()
                        } else {
                            failures.join("; ")
                        });
                    }
                }
            }
            if let Some(e) = &t.error {
                all_ok = false;
                errors.push(format!("{name}: {e}"));
            }
            targets.push(t);
        }
        self.status.targets = targets;
        if all_ok {
            self.last_publication = Some(publication);
            self.status.metrics.keys_published = kids.len() as u64;
            self.status.metrics.last_publish_success_timestamp_seconds = Some(now);
        } else {
            self.status.metrics.publish_failures_total += 1;
        }
        all_ok
    }

    /// Fetches the issuer's documents over HTTPS as a relying party does, after a successful
    /// publish. A public copy that is unreachable, stale or served with a Content-Type relying
    /// parties refuse is an error of this converge (retried with backoff, so `status` is not
    /// "in sync"), unless `public-check: false` says the URL is not served yet.
    async fn check_public(&mut self, settings: &Settings, errors: &mut Vec<String>) {
        let at = self.clock.now();
        if !settings.public_check {
            self.status.public = Some(PublicStatus {
                result: "not-checked".into(),
                problems: vec![format!(
                    "public-check: false in the configuration; {} is not fetched",
                    publish::verify::discovery_url(&settings.issuer)
                )],
                at,
            });
            return;
        }
        let Some(publication) = self.last_publication.clone() else {
            return;
        };
        let ca_file = settings.ca_file.as_ref().map(|p| self.root.path(p));
        let client = match publish::http::client(ca_file.as_deref(), PUBLIC_REQUEST_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                errors.push(format!("public copy: cannot set up HTTPS: {e}"));
                return;
            }
        };
        let report = match tokio::time::timeout(
            settings.run.publish_timeout,
            publish::verify::verify(&client, &publication),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                let problem = format!(
                    "{}: UNREACHABLE: no answer within {} (run.publish-timeout)",
                    publish::verify::discovery_url(&settings.issuer),
                    format_duration(settings.run.publish_timeout)
                );
                errors.push(format!("public copy: {problem}"));
                self.status.public = Some(PublicStatus {
                    result: "unreachable".into(),
                    problems: vec![problem],
                    at,
                });
                return;
            }
        };
        let problems: Vec<String> = [&report.discovery, &report.jwks]
            .into_iter()
            .filter_map(publish::verify::Fetched::problem)
            .collect();
        let result = if problems.is_empty() {
            "matches"
        } else if report.has_errors() {
            "unreachable"
        } else {
            "differs"
        };
        for p in &problems {
            errors.push(format!("public copy: {p}"));
        }
        self.status.public = Some(PublicStatus {
            result: result.into(),
            problems,
            at,
        });
    }

    /// The apiserver step on a blocking thread (unless held after a rollback).
    async fn apiserver_step(&mut self, settings: &Settings, errors: &mut Vec<String>) -> bool {
        let now = self.clock.now();
        let Engine {
            schedule,
            watch_set,
            ..
        } = self;
        match schedule.check_hold(|| fingerprint(watch_set, settings)) {
            HoldCheck::Free => {}
            HoldCheck::Held { message } => {
                self.status.apiserver = Some(ApiserverStatus {
                    result: "held".into(),
                    message: Some(format!(
                        "{message}; not retried until the apiserver configuration, its key files or the agent configuration change, or `systemctl reload irsa-agent`"
                    )),
                    at: now,
                });
                return true;
            }
            HoldCheck::InputsChanged => log::info!(
                "the inputs changed since the rolled-back apiserver change; trying again"
            ),
        }
        let Some(mut step) = self.apply.take() else {
            errors.push(
                "the apiserver step is unavailable after an internal error; restart irsa-agent"
                    .into(),
            );
            return false;
        };
        self.critical.store(true, Ordering::SeqCst);
        let s = settings.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let report = step.apply(&s);
            let cluster = step.cluster(&s);
            (step, report, cluster)
        })
        .await;
        self.critical.store(false, Ordering::SeqCst);
        let report: ApplyReport = match joined {
            Ok((step, report, cluster)) => {
                self.apply = Some(step);
                if let Some(c) = cluster {
                    self.status.metrics.cluster = Some(super::metrics::ClusterMetric::of(&c));
                }
                report
            }
            Err(e) => {
                errors.push(format!("the apiserver step failed internally: {e}"));
                return false;
            }
        };
        for w in &report.warnings {
            if !self.last_warnings.contains(w) {
                log::warn!("{w}");
            }
        }
        self.last_warnings = report.warnings.clone();
        self.status.metrics.apiserver_restarts_total += u64::from(report.restarts);
        match report.outcome {
            Ok(applied) => {
                if let Some(lost) = &applied.lost_change {
                    log::warn!("{lost}");
                }
                if applied.changed {
                    log::info!("apiserver: {}", applied.summary);
                    if applied.lost_change.is_some() || self.apiserver_was_in_sync {
                        self.status.metrics.drift_found_total += 1;
                    }
                }
                if applied.apply_pending && !self.apply_pending {
                    log::warn!("apiserver: {}", applied.summary);
                }
                self.apply_pending = applied.apply_pending;
                self.look_again = applied.look_again;
                self.apiserver_was_in_sync = !applied.apply_pending;
                self.restart_pending = applied.restart_pending;
                self.status.apiserver = Some(ApiserverStatus {
                    result: if applied.apply_pending {
                        "apply-pending"
                    } else if applied.restart_pending {
                        "restart-pending"
                    } else if applied.changed {
                        "changed"
                    } else {
                        "in-sync"
                    }
                    .into(),
                    message: Some(applied.summary),
                    at: now,
                });
                true
            }
            Err(failed) => {
                self.look_again = None;
                self.apiserver_was_in_sync = false;
                self.apply_pending = false;
                if failed.kind == FailureKind::RolledBack {
                    log::error!("{}", failed.message);
                    log::error!(
                        "not trying this apiserver change again until its inputs change or `systemctl reload irsa-agent`"
                    );
                    self.schedule
                        .rolled_back(fingerprint(&self.watch_set, settings), &failed.message);
                    self.status.apiserver = Some(ApiserverStatus {
                        result: "held".into(),
                        message: Some(failed.message),
                        at: now,
                    });
                    return true;
                }
                self.status.apiserver = Some(ApiserverStatus {
                    result: "failed".into(),
                    message: Some(failed.message.clone()),
                    at: now,
                });
                errors.push(format!("apiserver: {}", failed.message));
                false
            }
        }
    }

    /// Runs the tasks that are due (`reason` `None`), or all of them after a converge.
    /// Returns whether one asked for a converge.
    pub async fn run_tasks(&mut self, reason: Option<TaskReason>) -> bool {
        let Some(settings) = self.settings.clone() else {
            return false;
        };
        let mut requested = false;
        let started = self.clock.monotonic();
        let Engine {
            tasks,
            root,
            publishers,
            critical,
            schedule,
            clock,
            ..
        } = self;
        for (i, slot) in tasks.iter_mut().enumerate() {
            let reason = match &reason {
                Some(r) => r.clone(),
                None if schedule.task_due(i, started) => TaskReason::Due,
                None => continue,
            };
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(clock.now());
            let mut ctx = TaskContext::new(
                now,
                reason,
                root,
                &settings,
                publishers,
                critical.clone(),
                clock.clone(),
            );
            let result = slot.task.run(&mut ctx).await;
            slot.status.last_run_at = Some(unix(now));
            if let Some(line) = ctx.status.take() {
                // Logged when it says something new: a countdown ("(in 29d23h)") alone changes
                // at every run and would log the same state every recheck interval.
                let before = slot.status.status.as_deref().map(without_countdowns);
                if before.as_deref() != Some(without_countdowns(&line).as_str()) {
                    log::info!("{}", prefixed(&slot.status.name, &line));
                }
                slot.status.status = Some(line);
            }
            requested |= ctx.converge_requested;
            let (tick, wall) = (
                clock.monotonic(),
                SystemTime::UNIX_EPOCH + Duration::from_secs(clock.now()),
            );
            slot.status.next_due_at = match result {
                Ok(next) => {
                    if slot.status.last_error.take().is_some() {
                        log::info!("{}: recovered", slot.status.name);
                    }
                    schedule.task_ran(i, Ok(next), tick, wall);
                    next.map(unix)
                }
                Err(e) => {
                    let message = crate::errors::chain(e.as_ref());
                    let delay = schedule
                        .task_ran(i, Err(()), tick, wall)
                        .unwrap_or_default();
                    if slot.status.last_error.as_ref() != Some(&message) {
                        log::error!(
                            "{} (retrying in {})",
                            prefixed(&slot.status.name, &message),
                            format_duration(round(delay))
                        );
                    }
                    slot.status.last_error = Some(message);
                    Some(unix(wall + delay))
                }
            };
        }
        self.status.tasks = self.tasks.iter().map(|t| t.status.clone()).collect();
        requested
    }

    /// Recomputes the phase and the one-line status from what is known.
    pub fn refresh_status(&mut self) {
        let config_file = self.config_file_shown();
        let failed = self.webhook_error.as_ref().and_then(|e| {
            let w = &self.settings.as_ref()?.webhook;
            Some(metrics::WebhookMetric {
                url: w.url(),
                error: Some(e.clone()),
                ..Default::default()
            })
        });
        self.status.metrics.webhook = failed.or_else(|| {
            self.webhook.as_ref().map(|(w, running)| {
                let [requests, mutations, refusals, errors] = running.counters.snapshot();
                metrics::WebhookMetric {
                    url: w.url(),
                    requests_total: requests,
                    mutations_total: mutations,
                    refusals_total: refusals,
                    errors_total: errors,
                    service_accounts: self.webhook_cache.len() as u64,
                    certificate_expiry_timestamp_seconds: running
                        .counters
                        .certificate_expiry
                        .load(std::sync::atomic::Ordering::Relaxed),
                    pods_missed: running.counters.missed.lock().ok().and_then(|m| m.clone()),
                    error: None,
                }
            })
        });
        let next_retry_at = self.schedule.retry_at().map(|t| self.unix_of(t));
        let next_resync_at = self.schedule.resync_at().map(|t| self.unix_of(t));
        let now = self.clock.monotonic();
        let held = self.schedule.held();
        let s = &mut self.status;
        s.updated_at = self.clock.now();
        s.config_error = self.config_error.clone();
        s.failures = self.schedule.failures();
        s.next_retry_at = next_retry_at;
        s.next_resync_at = next_resync_at;
        let first_target = s.targets.first().map(|t| t.target.clone());
        let (phase, line) = decide::phase(&decide::Situation {
            configured: self.settings.is_some(),
            config_file: &config_file,
            config_error: self.config_error.as_deref(),
            converged: s.last_converge.is_some(),
            not_a_server: self.not_a_server.as_deref(),
            retry_in: self.schedule.retry_at().map(|t| t.saturating_sub(now)),
            failures: s.failures,
            first_error: s.errors.first().map(String::as_str),
            targets: s.targets.len(),
            first_target: first_target.as_deref(),
            kids: s.kids.len(),
            held,
            apply_pending: self.apply_pending,
            restart_pending: self.restart_pending,
        });
        if phase != s.phase || line != s.status {
            // NotAServer: the converge logged it already, as an error, once.
            if phase != s.phase && phase != Phase::NotAServer {
                if line.starts_with(phase.describe()) {
                    log::info!("{line}");
                } else {
                    log::info!("{}: {line}", phase.describe());
                }
            }
            s.phase = phase;
            s.status = line;
        }
        s.metrics.in_sync = s.phase == Phase::InSync;
        s.metrics.targets = s
            .targets
            .iter()
            .map(|t| TargetMetric {
                target: t.target.clone(),
                up: t.ok,
                last_success_timestamp_seconds: t.last_success_at,
            })
            .collect();
    }

    /// Marks the stop and records it.
    pub fn stopped(&mut self) {
        self.status.phase = Phase::Stopped;
        self.status.status = "stopped".into();
        self.status.next_retry_at = None;
        self.status.next_resync_at = None;
        self.status.updated_at = self.clock.now();
        self.save();
    }

    /// Writes the state section, the metrics textfile and the endpoint's copy.
    pub fn save(&mut self) {
        if let Err(e) = self.status.save(&self.root) {
            let message = e.to_string();
            if self.state_error.as_ref() != Some(&message) {
                log::warn!("{message} (status and metrics will not show this daemon's state)");
                self.state_error = Some(message);
            }
        } else {
            self.state_error = None;
        }
        let mut text = metrics::render(&self.status.metrics, self.status.issuer.as_deref());
        for slot in &self.tasks {
            text.push_str(&slot.task.metrics());
        }
        self.metrics_tx.send_replace(text.clone());
        if let Some(path) = self
            .settings
            .as_ref()
            .and_then(|s| s.run.metrics_textfile.clone())
        {
            let full = self.root.path(&path);
            match metrics::write_textfile(&full, &text) {
                Ok(_) => self.textfile_error = None,
                Err(e) => {
                    let message =
                        format!("cannot write the metrics textfile {}: {e}", path.display());
                    if self.textfile_error.as_ref() != Some(&message) {
                        log::warn!("{message}");
                        self.textfile_error = Some(message);
                    }
                }
            }
        }
    }
}

/// Hash of what an apiserver change depends on: the apiserver's files and the settings.
fn fingerprint(watch_set: &WatchSet, settings: &Settings) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    settings.issuer.hash(&mut h);
    settings.jwks_uri.hash(&mut h);
    for path in watch_set.files_of(Group::Apiserver) {
        path.hash(&mut h);
        crate::fs::read(path).ok().hash(&mut h);
    }
    h.finish()
}

/// `line` without its countdowns: every " (in <duration>)" taken out.
fn without_countdowns(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(" (in ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + " (in ".len()..];
        match after.find(')') {
            Some(end) if !after[..end].contains('(') => rest = &after[end + 1..],
            _ => {
                out.push_str(" (in ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_countdown_alone_is_not_news() {
        let a = "idle since 2026-12-07T14:42:54Z; next: start a rotation at 2027-01-06T14:30:10Z (in 29d23h44m); last step: ok";
        let b = "idle since 2026-12-07T14:42:54Z; next: start a rotation at 2027-01-06T14:30:10Z (in 29d23h43m50s); last step: ok";
        assert_eq!(without_countdowns(a), without_countdowns(b));
        assert_eq!(
            without_countdowns(a),
            "idle since 2026-12-07T14:42:54Z; next: start a rotation at 2027-01-06T14:30:10Z; last step: ok"
        );
        // Anything else that changes is news; a parenthesis that is not a countdown stays.
        assert_ne!(
            without_countdowns(a),
            without_countdowns(&a.replace("ok", "FAILED"))
        );
        assert_eq!(without_countdowns("x (in (y) z"), "x (in (y) z");
        assert_eq!(without_countdowns("x (in 5s"), "x (in 5s");
    }

    #[test]
    fn refuses_a_jwks_without_the_signing_key() {
        let kids = vec!["a".to_string(), "b".to_string()];
        assert!(check_signing_key(&kids, "b", "/k").is_ok());
        let e = check_signing_key(
            &kids,
            "c",
            "/var/lib/rancher/k3s/server/tls/service.current.key",
        )
        .expect_err("refused");
        assert!(e.contains("kid c"), "{e}");
        assert!(e.contains("service.current.key"), "{e}");
    }

    #[test]
    fn a_task_line_is_not_prefixed_twice() {
        assert_eq!(
            prefixed("rotation", "rotation: disabled"),
            "rotation: disabled"
        );
        assert_eq!(prefixed("rotation", "idle"), "rotation: idle");
        assert_eq!(
            prefixed("rotation", "rotations ok"),
            "rotation: rotations ok"
        );
    }
}
