//! The daemon's decisions: when to converge, when to retry and resync, when to hold an
//! apiserver change, when tasks are due, what a stop request does. Pure functions of a
//! [`Schedule`] (the decision state), an event and `now`; no I/O, no threads, no clock of their
//! own. The [`super::engine::Engine`] reads `now` from its one injected
//! [`crate::clock::Clock`], asks, and carries the answers out.
//!
//! Time here is a [`Tick`]: the clock's monotonic time ([`crate::clock::Clock::monotonic`]).

use std::time::{Duration, SystemTime};

use super::backoff::{Backoff, Jitter};
use super::status::Phase;
use crate::config::format_duration;

/// A point in time on the clock's monotonic scale.
pub type Tick = Duration;

/// The first retry comes after about this long; then it doubles up to `run.retry-max`.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// The retry cap until a configuration says otherwise, and the cap of tasks' retries.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Events keep coming (an editor saving, k3s writing several files): converge at the latest
/// this many debounce periods after the first one.
pub const DEBOUNCE_MAX_FACTOR: u32 = 20;
/// The debounce period before a configuration gives one.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// How soon the daemon looks again while it publishes keys only the running apiserver has.
pub const LIVE_RECHECK: Duration = Duration::from_secs(30);
/// The resync interval is spread by this much (±), so agents do not resync in step.
pub const RESYNC_SPREAD: f64 = 0.1;

/// What started a converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Start,
    Reload,
    ConfigChanged,
    FilesChanged,
    Retry,
    Resync,
    Task,
}

impl Trigger {
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Start => "start",
            Trigger::Reload => "reload",
            Trigger::ConfigChanged => "config-changed",
            Trigger::FilesChanged => "files-changed",
            Trigger::Retry => "retry",
            Trigger::Resync => "resync",
            Trigger::Task => "task",
        }
    }
}

/// Work that is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Re-read the agent configuration, then converge.
    ConfigChanged,
    Converge(Trigger),
    Tasks,
}

#[derive(Debug, Clone)]
struct Debounce {
    first: Tick,
    last: Tick,
    reload: bool,
}

/// An apiserver change that was rolled back: not retried while the inputs stay the same.
#[derive(Debug, Clone)]
struct Hold {
    fingerprint: u64,
    message: String,
}

/// Whether the apiserver step may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldCheck {
    /// Nothing is held.
    Free,
    /// A rolled-back change is held and its inputs are the same: do not try it again.
    Held { message: String },
    /// A change was held, but its inputs changed since: the hold is lifted, try again.
    InputsChanged,
}

/// What a converge found, as far as what comes next is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Converged {
    /// Published, apiserver in line (or held), no errors.
    pub ok: bool,
    /// This host is not a server: nothing to retry, the watches bring the next converge.
    pub not_a_server: bool,
    /// Keys are published only because the running apiserver still serves them.
    pub live_only: bool,
    /// The apiserver step asked to look again this soon (a step of the issuer rollout that
    /// comes due at a known time): sooner than the resync, never later.
    pub look_again: Option<Duration>,
}

/// The retry decided after a converge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// It worked; `after` failed attempts came before (0: none).
    Recovered { after: u32 },
    /// Not a server: no retry (failures are not counted).
    NotAServer,
    /// It failed (the `failures`-th time in a row): converge again after `delay`.
    After { delay: Duration, failures: u32 },
}

/// What a stop request (SIGTERM/SIGINT) does to the work in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// Drop the work and stop now.
    Now,
    /// Critical work (an apiserver change) is running: finish it, then stop.
    AfterCritical,
}

/// What a stop request does while `critical` work runs.
pub fn on_stop(critical: bool) -> OnStop {
    if critical {
        OnStop::AfterCritical
    } else {
        OnStop::Now
    }
}

/// Whether the apiserver step runs in this converge: only after a successful publish (relying
/// parties must be able to verify tokens before the apiserver signs with the issuer), and
/// never once a stop was requested.
pub fn apiserver_step_runs(published: bool, stopping: bool) -> bool {
    published && !stopping
}

/// Whether the tasks run after a converge: not once a stop was requested.
pub fn tasks_run_after_converge(stopping: bool) -> bool {
    !stopping
}

/// The work after a converge whose tasks asked for a converge: another one, unless the
/// converge was itself asked for by a task (no converge loop between a task and converges).
pub fn follow_up(requested: bool, trigger: Trigger) -> Option<Work> {
    (requested && trigger != Trigger::Task).then_some(Work::Converge(Trigger::Task))
}

/// The work after the configuration was (re)read because it changed: a converge, if there is
/// a usable configuration; nothing otherwise (not configured yet: nothing is touched).
pub fn after_config_load(configured: bool) -> Option<Trigger> {
    configured.then_some(Trigger::ConfigChanged)
}

/// One scheduled task's timing.
#[derive(Debug, Clone)]
struct TaskTimer {
    due: Option<Tick>,
    backoff: Backoff,
}

/// The decision state of the daemon (see the module docs).
#[derive(Debug, Clone)]
pub struct Schedule {
    debounce: Option<Debounce>,
    retry: Option<Tick>,
    resync: Option<Tick>,
    backoff: Backoff,
    jitter: Jitter,
    hold: Option<Hold>,
    tasks: Vec<TaskTimer>,
}

/// `due` (a calendar time) on the monotonic scale, given that `wall` is `now`.
pub fn tick_of(due: SystemTime, wall: SystemTime, now: Tick) -> Tick {
    now + due.duration_since(wall).unwrap_or(Duration::ZERO)
}

impl Schedule {
    /// Nothing scheduled; `tasks` timers; delays drawn from `jitter`.
    pub fn new(tasks: usize, jitter: Jitter) -> Schedule {
        Schedule {
            debounce: None,
            retry: None,
            resync: None,
            backoff: Backoff::new(RETRY_BASE, RETRY_MAX),
            jitter,
            hold: None,
            tasks: (0..tasks)
                .map(|_| TaskTimer {
                    due: None,
                    backoff: Backoff::new(RETRY_BASE, RETRY_MAX),
                })
                .collect(),
        }
    }

    /// A new configuration's `run.retry-max`.
    pub fn set_retry_max(&mut self, max: Duration) {
        self.backoff.set_max(max);
    }

    /// Converge failures in a row.
    pub fn failures(&self) -> u32 {
        self.backoff.failures()
    }

    pub fn retry_at(&self) -> Option<Tick> {
        self.retry
    }

    pub fn resync_at(&self) -> Option<Tick> {
        self.resync
    }

    /// Why the apiserver change is held, if it is.
    pub fn held(&self) -> Option<&str> {
        self.hold.as_ref().map(|h| h.message.as_str())
    }

    /// A relevant file changed at `now` (`reload`: the agent's configuration): starts or
    /// extends the debounce window.
    pub fn on_change(&mut self, reload: bool, now: Tick) {
        match &mut self.debounce {
            Some(d) => {
                d.last = now;
                d.reload |= reload;
            }
            None => {
                self.debounce = Some(Debounce {
                    first: now,
                    last: now,
                    reload,
                })
            }
        }
    }

    /// When the changes seen so far are acted on: `period` after the last one, but no later
    /// than [`DEBOUNCE_MAX_FACTOR`] periods after the first.
    pub fn debounce_deadline(&self, period: Duration) -> Option<Tick> {
        let d = self.debounce.as_ref()?;
        Some((d.last + period).min(d.first + period * DEBOUNCE_MAX_FACTOR))
    }

    fn task_deadline(&self, configured: bool) -> Option<Tick> {
        if !configured {
            return None;
        }
        self.tasks.iter().filter_map(|t| t.due).min()
    }

    /// When the loop must wake up next (`None`: only for an event or a signal).
    pub fn next_wakeup(&self, configured: bool, debounce: Duration) -> Option<Tick> {
        [
            self.debounce_deadline(debounce),
            self.retry,
            self.resync,
            self.task_deadline(configured),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The work due at `now`, if any, and forgets it: file changes first, then a retry, a
    /// resync, the tasks. Without a configuration only the configuration's changes count.
    pub fn take_due(&mut self, now: Tick, configured: bool, debounce: Duration) -> Option<Work> {
        if self.debounce_deadline(debounce).is_some_and(|d| d <= now) {
            let d = self.debounce.take()?;
            if d.reload || !configured {
                return Some(Work::ConfigChanged);
            }
            return Some(Work::Converge(Trigger::FilesChanged));
        }
        if !configured {
            return None;
        }
        if self.retry.is_some_and(|t| t <= now) {
            self.retry = None;
            return Some(Work::Converge(Trigger::Retry));
        }
        if self.resync.is_some_and(|t| t <= now) {
            self.resync = None;
            return Some(Work::Converge(Trigger::Resync));
        }
        if self.task_deadline(configured).is_some_and(|t| t <= now) {
            return Some(Work::Tasks);
        }
        None
    }

    /// A person asked for a reload: a held change is tried again, and so is everything else,
    /// now (no backoff left over). The reload re-reads the configuration and its converge
    /// every file, so changes seen before it need no converge of their own (one would follow
    /// the reload's at once and say `files-changed` where a person asked for a reload).
    pub fn reload(&mut self) {
        self.hold = None;
        self.backoff.reset();
        self.retry = None;
        self.debounce = None;
    }

    /// The next retry and resync after a converge that ended at `now`.
    pub fn after_converge(&mut self, c: Converged, now: Tick, resync_interval: Duration) -> Retry {
        let retry = if c.ok {
            let after = self.backoff.failures();
            self.backoff.reset();
            self.retry = None;
            Retry::Recovered { after }
        } else if c.not_a_server {
            self.retry = None;
            Retry::NotAServer
        } else {
            let delay = self.backoff.fail(&mut self.jitter);
            self.retry = Some(now + delay);
            Retry::After {
                delay,
                failures: self.backoff.failures(),
            }
        };
        let mut resync = now + self.jitter.spread(resync_interval, RESYNC_SPREAD);
        if c.live_only {
            // Follow the apiserver's restart soon rather than at the next resync.
            resync = resync.min(now + LIVE_RECHECK);
        }
        if let Some(after) = c.look_again {
            resync = resync.min(now + after);
        }
        self.resync = Some(resync);
        retry
    }

    /// Before the apiserver step: whether a held change stays held. `fingerprint` (of the
    /// change's inputs) is computed only when something is held.
    pub fn check_hold(&mut self, fingerprint: impl FnOnce() -> u64) -> HoldCheck {
        let Some(hold) = &self.hold else {
            return HoldCheck::Free;
        };
        if hold.fingerprint == fingerprint() {
            return HoldCheck::Held {
                message: hold.message.clone(),
            };
        }
        self.hold = None;
        HoldCheck::InputsChanged
    }

    /// The apiserver change with inputs `fingerprint` was rolled back: hold it.
    pub fn rolled_back(&mut self, fingerprint: u64, message: &str) {
        self.hold = Some(Hold {
            fingerprint,
            message: message.to_string(),
        });
    }

    /// Whether task `i` is due at `now` (when running the due tasks).
    pub fn task_due(&self, i: usize, now: Tick) -> bool {
        self.tasks
            .get(i)
            .and_then(|t| t.due)
            .is_some_and(|d| d <= now)
    }

    /// Task `i` ran at `now` (`wall` on the calendar): `Ok(next)` is when it asked to run
    /// again; an error is retried with backoff. Returns the retry delay after an error.
    pub fn task_ran(
        &mut self,
        i: usize,
        result: Result<Option<SystemTime>, ()>,
        now: Tick,
        wall: SystemTime,
    ) -> Option<Duration> {
        let Schedule { tasks, jitter, .. } = self;
        let timer = tasks.get_mut(i)?;
        match result {
            Ok(next) => {
                timer.backoff.reset();
                timer.due = next.map(|due| tick_of(due, wall, now));
                None
            }
            Err(()) => {
                let delay = timer.backoff.fail(jitter);
                timer.due = Some(now + delay);
                Some(delay)
            }
        }
    }

    /// When task `i` runs next, if it asked to.
    pub fn task_next(&self, i: usize) -> Option<Tick> {
        self.tasks.get(i).and_then(|t| t.due)
    }
}

/// What the daemon knows when it says where it stands ([`phase`]).
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    /// A usable configuration (with an issuer) is loaded.
    pub configured: bool,
    /// The configuration file a person should edit.
    pub config_file: &'a str,
    /// Why the configuration on disk cannot be used, if it cannot.
    pub config_error: Option<&'a str>,
    /// A converge has finished since the start.
    pub converged: bool,
    /// Why this host is not a server, if it is not.
    pub not_a_server: Option<&'a str>,
    /// How long until the next retry, if one is scheduled.
    pub retry_in: Option<Duration>,
    /// Converge failures in a row.
    pub failures: u32,
    pub first_error: Option<&'a str>,
    /// How many publish targets there are, and the first one's name.
    pub targets: usize,
    pub first_target: Option<&'a str>,
    /// How many kids are published.
    pub kids: usize,
    /// Why the apiserver change is held, if it is.
    pub held: Option<&'a str>,
    pub apply_pending: bool,
    pub restart_pending: bool,
}

/// The phase and the one-line status (`systemctl status`, `irsa-agent status`) of a situation.
pub fn phase(s: &Situation<'_>) -> (Phase, String) {
    if !s.configured {
        return match s.config_error {
            None => (
                Phase::WaitingForIssuer,
                format!("waiting for an issuer in {}", s.config_file),
            ),
            Some(e) => (
                Phase::ConfigInvalid,
                format!(
                    "configuration invalid, waiting for a fix: {}",
                    first_problem(e)
                ),
            ),
        };
    }
    if !s.converged {
        return (Phase::Starting, "starting".into());
    }
    let prefix = s
        .config_error
        .map(|e| {
            format!(
                "configuration invalid, still using the previous one ({}); ",
                first_problem(e)
            )
        })
        .unwrap_or_default();
    if let Some(why) = s.not_a_server {
        return (Phase::NotAServer, format!("{prefix}{why}"));
    }
    if let Some(wait) = s.retry_in {
        return (
            Phase::Retrying,
            format!(
                "{prefix}failing, retry {} in {}: {}",
                s.failures + 1,
                format_duration(round(wait)),
                s.first_error.unwrap_or("unknown error")
            ),
        );
    }
    let published = match (s.targets, s.first_target) {
        (0, _) => "no publish targets configured".to_string(),
        (1, Some(target)) => format!("{} key(s) published to {target}", s.kids),
        (n, _) => format!("{} key(s) published to {n} targets", s.kids),
    };
    let apiserver = match (s.held, s.restart_pending) {
        (Some(message), _) => {
            format!("apiserver change rolled back and held (reload to retry): {message}")
        }
        (None, _) if s.apply_pending => {
            "apiserver change pending: run `irsa-agent apply` (run.apply-issuer: false)".to_string()
        }
        (None, true) => "apiserver configuration written, restart pending".to_string(),
        (None, false) => "apiserver in sync".to_string(),
    };
    let phase = if s.held.is_some() {
        Phase::Held
    } else if s.apply_pending {
        Phase::ApplyPending
    } else {
        Phase::InSync
    };
    (phase, format!("{prefix}{published}; {apiserver}"))
}

/// The headline and the first problem of a multi-line configuration error.
pub fn first_problem(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).collect();
    match lines.as_slice() {
        [] => String::new(),
        [one] => one.to_string(),
        [head, first, ..] => format!("{} {first}", head.trim_end_matches(':')),
    }
}

/// Whole seconds (at least the milliseconds below one second) for messages.
pub fn round(d: Duration) -> Duration {
    if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);
    const DEBOUNCE: Duration = Duration::from_millis(100);

    fn schedule() -> Schedule {
        Schedule::new(1, Jitter::new(42))
    }

    const FAILED: Converged = Converged {
        ok: false,
        not_a_server: false,
        live_only: false,
        look_again: None,
    };
    const OK: Converged = Converged {
        ok: true,
        not_a_server: false,
        live_only: false,
        look_again: None,
    };

    #[test]
    fn changes_in_quick_succession_make_one_converge_after_the_last() {
        let mut s = schedule();
        let t0 = 10 * SEC;
        for i in 0..5 {
            s.on_change(false, t0 + 50 * MS * i);
        }
        let last = t0 + 200 * MS;
        assert_eq!(s.next_wakeup(true, DEBOUNCE), Some(last + DEBOUNCE));
        assert_eq!(s.take_due(last + DEBOUNCE - MS, true, DEBOUNCE), None);
        assert_eq!(
            s.take_due(last + DEBOUNCE, true, DEBOUNCE),
            Some(Work::Converge(Trigger::FilesChanged))
        );
        // Taken once: nothing is left.
        assert_eq!(s.take_due(last + 10 * SEC, true, DEBOUNCE), None);
        assert_eq!(s.next_wakeup(true, DEBOUNCE), None);
    }

    #[test]
    fn changes_that_never_stop_converge_at_the_cap() {
        let mut s = schedule();
        let t0 = SEC;
        let cap = t0 + DEBOUNCE * DEBOUNCE_MAX_FACTOR;
        let mut now = t0;
        while now < cap + SEC {
            s.on_change(false, now);
            if now >= cap {
                break;
            }
            assert_eq!(s.take_due(now, true, DEBOUNCE), None, "at {now:?}");
            now += 50 * MS;
        }
        assert_eq!(s.debounce_deadline(DEBOUNCE), Some(cap));
        assert_eq!(
            s.take_due(cap, true, DEBOUNCE),
            Some(Work::Converge(Trigger::FilesChanged))
        );
    }

    #[test]
    fn driven_by_the_simulated_clock_a_day_of_resyncs_and_retries_takes_no_time() {
        use crate::clock::{Clock, SimulatedClock};
        let clock = SimulatedClock::at(1_700_000_000);
        let mut s = schedule();
        s.set_retry_max(60 * SEC);
        let (mut converges, mut retries, mut resyncs) = (0u32, 0u32, 0u32);
        // Fails for the first hour, then works: what the loop would do, woken at each
        // deadline.
        let mut ok = false;
        s.after_converge(FAILED, clock.monotonic(), 600 * SEC);
        while clock.monotonic() < 86_400 * SEC {
            let wake = s
                .next_wakeup(true, DEBOUNCE)
                .expect("always something scheduled");
            assert!(wake >= clock.monotonic());
            clock.advance(wake - clock.monotonic());
            match s.take_due(clock.monotonic(), true, DEBOUNCE) {
                Some(Work::Converge(Trigger::Retry)) => retries += 1,
                Some(Work::Converge(Trigger::Resync)) => resyncs += 1,
                other => panic!("unexpected {other:?}"),
            }
            converges += 1;
            ok |= clock.monotonic() >= 3600 * SEC;
            let c = if ok { OK } else { FAILED };
            s.after_converge(c, clock.monotonic(), 600 * SEC);
        }
        // An hour of retries at most a minute apart (at least half a minute once capped) ...
        assert!((60..=130).contains(&retries), "{retries} retries");
        // ... then a resync every 10 min ± 10% for the other 23 hours.
        assert!((125..=155).contains(&resyncs), "{resyncs} resyncs");
        assert_eq!(converges, retries + resyncs);
        assert_eq!(s.failures(), 0);
    }

    #[test]
    fn a_configuration_change_in_the_window_rereads_the_configuration() {
        let mut s = schedule();
        s.on_change(false, SEC);
        s.on_change(true, SEC + 10 * MS);
        s.on_change(false, SEC + 20 * MS);
        assert_eq!(
            s.take_due(SEC + 20 * MS + DEBOUNCE, true, DEBOUNCE),
            Some(Work::ConfigChanged)
        );
    }

    #[test]
    fn unconfigured_only_the_configuration_is_acted_on() {
        // A fresh install: no issuer. A change re-reads the configuration ...
        let mut s = schedule();
        s.after_converge(FAILED, SEC, 10 * SEC);
        let _ = s.task_ran(0, Ok(None), SEC, SystemTime::UNIX_EPOCH);
        s.tasks[0].due = Some(2 * SEC);
        s.on_change(false, SEC);
        assert_eq!(
            s.take_due(SEC + DEBOUNCE, false, DEBOUNCE),
            Some(Work::ConfigChanged)
        );
        // ... retries, resyncs and tasks do not run, however late it is ...
        assert_eq!(s.take_due(3600 * SEC, false, DEBOUNCE), None);
        // ... and a configuration still without an issuer converges nothing.
        assert_eq!(after_config_load(false), None);
        assert_eq!(after_config_load(true), Some(Trigger::ConfigChanged));
    }

    #[test]
    fn retries_back_off_doubling_up_to_the_cap_and_reset_on_success() {
        let mut s = schedule();
        s.set_retry_max(8 * SEC);
        let mut now = SEC;
        let mut delays = Vec::new();
        for n in 1..=7 {
            match s.after_converge(FAILED, now, 600 * SEC) {
                Retry::After { delay, failures } => {
                    assert_eq!(failures, n);
                    assert_eq!(s.retry_at(), Some(now + delay));
                    assert_eq!(s.take_due(now + delay - MS, true, DEBOUNCE), None);
                    now += delay;
                    assert_eq!(
                        s.take_due(now, true, DEBOUNCE),
                        Some(Work::Converge(Trigger::Retry))
                    );
                    delays.push(delay);
                }
                other => panic!("not a retry: {other:?}"),
            }
        }
        for (delay, step) in delays.iter().zip([1u64, 2, 4, 8, 8, 8, 8]) {
            let step = Duration::from_secs(step);
            assert!(
                *delay >= step / 2 && *delay <= step,
                "{delay:?} for {step:?}"
            );
        }
        assert_eq!(
            s.after_converge(OK, now, 600 * SEC),
            Retry::Recovered { after: 7 }
        );
        assert_eq!(s.retry_at(), None);
        assert_eq!(s.failures(), 0);
        match s.after_converge(FAILED, now, 600 * SEC) {
            Retry::After { delay, failures } => {
                assert_eq!(failures, 1);
                assert!(delay <= SEC, "{delay:?}");
            }
            other => panic!("not a retry: {other:?}"),
        }
    }

    #[test]
    fn a_reload_retries_at_once_with_a_fresh_backoff() {
        let mut s = schedule();
        for _ in 0..5 {
            s.after_converge(FAILED, SEC, 600 * SEC);
        }
        s.rolled_back(7, "rolled back");
        // The daemon's own write seen just before the reload: the reload's converge reads it.
        s.on_change(false, SEC);
        s.reload();
        assert_eq!(s.debounce_deadline(DEBOUNCE), None);
        assert_eq!(s.take_due(SEC + DEBOUNCE, true, DEBOUNCE), None);
        assert_eq!(s.retry_at(), None);
        assert_eq!(s.failures(), 0);
        assert_eq!(s.held(), None);
        assert_eq!(s.check_hold(|| 7), HoldCheck::Free);
    }

    #[test]
    fn an_agent_node_is_not_retried() {
        // What the daemon on a k3s agent node does after its converge: no retry, however long
        // it waits; only the resync (and the watches) bring the next converge.
        let mut s = schedule();
        s.set_retry_max(2 * SEC);
        let c = Converged {
            ok: false,
            not_a_server: true,
            live_only: false,
            look_again: None,
        };
        assert_eq!(s.after_converge(c, SEC, 600 * SEC), Retry::NotAServer);
        assert_eq!(s.retry_at(), None);
        assert_eq!(s.failures(), 0);
        let resync = s.resync_at().expect("a resync");
        assert!(resync >= SEC + 540 * SEC, "{resync:?}");
        assert_eq!(s.next_wakeup(true, DEBOUNCE), Some(resync));
        for t in 1..540 {
            assert_eq!(s.take_due(SEC + t * SEC, true, DEBOUNCE), None, "at {t} s");
        }
        // A failing one before it becomes an agent: its retry is dropped.
        let mut s = schedule();
        s.after_converge(FAILED, SEC, 600 * SEC);
        assert!(s.retry_at().is_some());
        s.after_converge(c, 2 * SEC, 600 * SEC);
        assert_eq!(s.retry_at(), None);
    }

    #[test]
    fn resyncs_come_every_interval_spread_by_ten_percent() {
        let mut s = schedule();
        let interval = 600 * SEC;
        let mut now = SEC;
        let mut waits = Vec::new();
        for _ in 0..200 {
            s.after_converge(OK, now, interval);
            let at = s.resync_at().expect("a resync");
            assert_eq!(s.next_wakeup(true, DEBOUNCE), Some(at));
            assert_eq!(s.take_due(at - MS, true, DEBOUNCE), None);
            assert_eq!(
                s.take_due(at, true, DEBOUNCE),
                Some(Work::Converge(Trigger::Resync))
            );
            waits.push(at - now);
            now = at;
        }
        assert!(waits.iter().all(|w| *w >= 540 * SEC && *w <= 660 * SEC));
        assert!(waits.iter().any(|w| *w < 570 * SEC));
        assert!(waits.iter().any(|w| *w > 630 * SEC));
        // Keys only the running apiserver has: looked at again within 30 s.
        let live = Converged {
            live_only: true,
            ..OK
        };
        s.after_converge(live, now, interval);
        assert_eq!(s.resync_at(), Some(now + LIVE_RECHECK));
        // A resync interval shorter than that stays as it is.
        s.after_converge(live, now, 10 * SEC);
        assert!(s.resync_at().is_some_and(|t| t <= now + 11 * SEC));
        // A step due at a known time (the old issuers' retirement): looked at again then.
        let due = Converged {
            look_again: Some(42 * SEC),
            ..OK
        };
        s.after_converge(due, now, interval);
        assert_eq!(s.resync_at(), Some(now + 42 * SEC));
        s.after_converge(due, now, 10 * SEC);
        assert!(s.resync_at().is_some_and(|t| t <= now + 11 * SEC));
    }

    #[test]
    fn due_work_comes_in_order_changes_retry_resync_tasks() {
        let mut s = schedule();
        s.after_converge(FAILED, SEC, SEC);
        s.tasks[0].due = Some(SEC);
        s.on_change(false, SEC);
        let late = 100 * SEC;
        assert_eq!(
            s.take_due(late, true, DEBOUNCE),
            Some(Work::Converge(Trigger::FilesChanged))
        );
        assert_eq!(
            s.take_due(late, true, DEBOUNCE),
            Some(Work::Converge(Trigger::Retry))
        );
        assert_eq!(
            s.take_due(late, true, DEBOUNCE),
            Some(Work::Converge(Trigger::Resync))
        );
        assert_eq!(s.take_due(late, true, DEBOUNCE), Some(Work::Tasks));
        // Tasks stay due until they ran.
        assert!(s.task_due(0, late));
        assert_eq!(s.task_ran(0, Ok(None), late, SystemTime::UNIX_EPOCH), None);
        assert_eq!(s.take_due(late, true, DEBOUNCE), None);
    }

    #[test]
    fn a_rolled_back_change_is_held_until_its_inputs_change() {
        let mut s = schedule();
        assert_eq!(
            s.check_hold(|| unreachable!("nothing held")),
            HoldCheck::Free
        );
        s.rolled_back(1, "the apiserver did not come back; rolled back");
        // Resyncs come and go: the same inputs stay held, every time (no restart loop).
        for _ in 0..100 {
            assert_eq!(
                s.check_hold(|| 1),
                HoldCheck::Held {
                    message: "the apiserver did not come back; rolled back".into()
                }
            );
        }
        assert!(s.held().is_some());
        // A key file or the configuration changed: try once more.
        assert_eq!(s.check_hold(|| 2), HoldCheck::InputsChanged);
        assert_eq!(s.held(), None);
        assert_eq!(s.check_hold(|| 1), HoldCheck::Free);
        // A hold survives failing converges and their retries; only a reload lifts it.
        s.rolled_back(3, "again");
        s.after_converge(FAILED, SEC, 600 * SEC);
        assert_eq!(s.held(), Some("again"));
        s.reload();
        assert_eq!(s.held(), None);
    }

    #[test]
    fn tasks_run_when_they_asked_and_back_off_when_they_fail() {
        let mut s = Schedule::new(2, Jitter::new(3));
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let now = 50 * SEC;
        // Task 0 asks for an hour from now; task 1 only runs after converges.
        s.task_ran(0, Ok(Some(wall + 3600 * SEC)), now, wall);
        s.task_ran(1, Ok(None), now, wall);
        assert_eq!(s.task_next(0), Some(now + 3600 * SEC));
        assert_eq!(s.task_next(1), None);
        assert_eq!(s.next_wakeup(true, DEBOUNCE), Some(now + 3600 * SEC));
        assert_eq!(
            s.next_wakeup(false, DEBOUNCE),
            None,
            "unconfigured: no tasks"
        );
        assert!(!s.task_due(0, now + 3599 * SEC));
        assert!(s.task_due(0, now + 3600 * SEC));
        // A time already past is due at once.
        s.task_ran(0, Ok(Some(wall - 5 * SEC)), now, wall);
        assert_eq!(s.task_next(0), Some(now));
        // Failures: 1 s, 2 s, 4 s ... capped at five minutes; success resets.
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays.push(s.task_ran(0, Err(()), now, wall).expect("a retry"));
            assert_eq!(s.task_next(0), Some(now + *delays.last().expect("one")));
        }
        for (delay, step) in delays
            .iter()
            .zip([1u64, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300])
        {
            let step = Duration::from_secs(step);
            assert!(
                *delay >= step / 2 && *delay <= step,
                "{delay:?} for {step:?}"
            );
        }
        assert_eq!(s.task_ran(0, Ok(None), now, wall), None);
        let first = s.task_ran(0, Err(()), now, wall).expect("a retry");
        assert!(first <= SEC, "{first:?}");
        // Another task's failures are its own.
        assert_eq!(s.task_ran(1, Ok(None), now, wall), None);
        assert!(s.task_ran(1, Err(()), now, wall).is_some_and(|d| d <= SEC));
    }

    #[test]
    fn a_stop_waits_only_for_an_apiserver_change_in_progress() {
        assert_eq!(on_stop(false), OnStop::Now);
        assert_eq!(on_stop(true), OnStop::AfterCritical);
        // Once stopping: no new apiserver step, no tasks after the converge.
        assert!(apiserver_step_runs(true, false));
        assert!(!apiserver_step_runs(true, true));
        assert!(!apiserver_step_runs(false, false));
        assert!(tasks_run_after_converge(false));
        assert!(!tasks_run_after_converge(true));
    }

    #[test]
    fn a_task_asking_for_a_converge_gets_one_but_no_loop() {
        assert_eq!(
            follow_up(true, Trigger::Resync),
            Some(Work::Converge(Trigger::Task))
        );
        assert_eq!(follow_up(false, Trigger::Resync), None);
        // The converge a task asked for does not ask for another.
        assert_eq!(follow_up(true, Trigger::Task), None);
    }

    fn situation() -> Situation<'static> {
        Situation {
            configured: true,
            config_file: "/etc/irsa-agent/config.yaml",
            config_error: None,
            converged: true,
            not_a_server: None,
            retry_in: None,
            failures: 0,
            first_error: None,
            targets: 1,
            first_target: Some("directory /srv/oidc"),
            kids: 2,
            held: None,
            apply_pending: false,
            restart_pending: false,
        }
    }

    #[test]
    fn where_the_daemon_stands_in_one_line() {
        let s = situation();
        assert_eq!(
            phase(&s),
            (
                Phase::InSync,
                "2 key(s) published to directory /srv/oidc; apiserver in sync".into()
            )
        );
        let (p, line) = phase(&Situation {
            held: Some("the apiserver did not come back"),
            ..s
        });
        assert_eq!(p, Phase::Held);
        assert_eq!(
            line,
            "2 key(s) published to directory /srv/oidc; apiserver change rolled back and held (reload to retry): the apiserver did not come back"
        );
        let (p, line) = phase(&Situation {
            retry_in: Some(Duration::from_millis(4500)),
            failures: 2,
            first_error: Some("directory /srv/oidc: permission denied"),
            held: Some("ignored while retrying"),
            ..s
        });
        assert_eq!(p, Phase::Retrying);
        assert_eq!(
            line,
            "failing, retry 3 in 4s: directory /srv/oidc: permission denied"
        );
        let (p, line) = phase(&Situation {
            not_a_server: Some("this is a k3s agent (worker) node"),
            config_error: Some("invalid configuration (1 problem):\n  issuer: not https"),
            ..s
        });
        assert_eq!(p, Phase::NotAServer);
        assert_eq!(
            line,
            "configuration invalid, still using the previous one (invalid configuration (1 problem) issuer: not https); this is a k3s agent (worker) node"
        );
        let (p, line) = phase(&Situation {
            apply_pending: true,
            targets: 3,
            ..s
        });
        assert_eq!(p, Phase::ApplyPending);
        assert!(line.starts_with("2 key(s) published to 3 targets; apiserver change pending"));
        let (p, line) = phase(&Situation {
            restart_pending: true,
            targets: 0,
            ..s
        });
        assert_eq!(p, Phase::InSync);
        assert_eq!(
            line,
            "no publish targets configured; apiserver configuration written, restart pending"
        );
        assert_eq!(
            phase(&Situation {
                converged: false,
                ..s
            }),
            (Phase::Starting, "starting".into())
        );
        assert_eq!(
            phase(&Situation {
                configured: false,
                ..s
            }),
            (
                Phase::WaitingForIssuer,
                "waiting for an issuer in /etc/irsa-agent/config.yaml".into()
            )
        );
        assert_eq!(
            phase(&Situation {
                configured: false,
                config_error: Some("cannot read x"),
                ..s
            }),
            (
                Phase::ConfigInvalid,
                "configuration invalid, waiting for a fix: cannot read x".into()
            )
        );
    }

    #[test]
    fn first_problem_of_a_config_error() {
        assert_eq!(
            first_problem("invalid configuration (2 problems):\n  a: x\n  b: y"),
            "invalid configuration (2 problems) a: x"
        );
        assert_eq!(first_problem("cannot read x"), "cannot read x");
    }
}
