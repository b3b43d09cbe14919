//! Talking to systemd: `sd_notify` messages (sd-notify 0.5) and the watchdog interval.
//!
//! Everything here is a no-op when the daemon does not run under systemd (no `NOTIFY_SOCKET`),
//! so `irsa-agent run` in a terminal behaves the same minus the notifications.

use std::time::Duration;

use sd_notify::NotifyState;

/// The longest STATUS= line sent (systemctl shows one line).
const MAX_STATUS: usize = 300;

/// Sends READY, STATUS, RELOADING, STOPPING, WATCHDOG and EXTEND_TIMEOUT_USEC.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    last_status: String,
}

/// Cuts a status to one line of at most [`MAX_STATUS`] characters.
pub fn one_line(status: &str) -> String {
    let line: String = status
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if line.chars().count() <= MAX_STATUS {
        return line;
    }
    let mut cut: String = line.chars().take(MAX_STATUS - 1).collect();
    cut.push('…');
    cut
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service: `NOTIFY_SOCKET`, and
    /// `WATCHDOG_USEC` (+ `WATCHDOG_PID`) when `WatchdogSec=` is set.
    pub fn from_env() -> Notifier {
        Notifier::new(
            std::env::var_os("NOTIFY_SOCKET").is_some(),
            sd_notify::watchdog_enabled(),
        )
    }

    /// `enabled`: there is a socket to notify; `watchdog`: the watchdog timeout systemd set
    /// (`WATCHDOG_USEC`), if it set one.
    pub fn new(enabled: bool, watchdog: Option<Duration>) -> Notifier {
        Notifier {
            enabled,
            watchdog,
            last_status: String::new(),
        }
    }

    /// A notifier that sends nothing (tests of the loop).
    pub fn disabled() -> Notifier {
        Notifier::new(false, None)
    }

    /// How often to ping the watchdog: half its timeout, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
            .filter(|d| !d.is_zero())
            .map(|d| (d / 2).max(Duration::from_millis(1)))
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            log::debug!("sd_notify failed: {e}");
        }
    }

    /// STATUS=, only when it changed. Returns whether it did.
    pub fn status(&mut self, status: &str) -> bool {
        let line = one_line(status);
        if line == self.last_status {
            return false;
        }
        self.send(&[NotifyState::Status(&line)]);
        self.last_status = line;
        true
    }

    /// READY=1 with the current status.
    pub fn ready(&mut self, status: &str) {
        let line = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&line)]);
        self.last_status = line;
    }

    /// RELOADING=1 with MONOTONIC_USEC (systemd 253+ matches it to the reload request).
    pub fn reloading(&mut self) {
        let status = "reloading the configuration";
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status(status)]),
        }
        self.last_status = status.to_string();
    }

    /// STOPPING=1.
    pub fn stopping(&mut self, status: &str) {
        let line = one_line(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&line)]);
        self.last_status = line;
    }

    /// Whether WATCHDOG=1 is sent: only when systemd asked for it.
    fn pings(&self) -> bool {
        self.watchdog.is_some()
    }

    /// WATCHDOG=1 (only when systemd asked for it).
    pub fn watchdog(&self) {
        if self.pings() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    /// EXTEND_TIMEOUT_USEC: more time to start or stop (the first converge, or an apiserver
    /// restart that must finish before exiting).
    pub fn extend_timeout(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_short_line() {
        assert_eq!(one_line("a\nb\r\n  c "), "a b c");
        let long = "x".repeat(1000);
        let cut = one_line(&long);
        assert_eq!(cut.chars().count(), MAX_STATUS);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn no_watchdog_without_watchdog_usec() {
        // Under systemd without WatchdogSec=: no interval (the loop's watchdog tick never
        // fires) and no WATCHDOG=1 even if asked.
        let quiet = Notifier::new(true, None);
        assert_eq!(quiet.watchdog_interval(), None);
        assert!(!quiet.pings());
        // WatchdogSec=0 is off too.
        assert_eq!(
            Notifier::new(true, Some(Duration::ZERO)).watchdog_interval(),
            None
        );
        // With one: pings at half the timeout, never more often than every millisecond.
        let watched = Notifier::new(true, Some(Duration::from_millis(200)));
        assert!(watched.pings());
        assert_eq!(
            watched.watchdog_interval(),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            Notifier::new(true, Some(Duration::from_micros(1))).watchdog_interval(),
            Some(Duration::from_millis(1))
        );
    }
}
