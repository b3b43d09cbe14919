//! The one clock, behind a trait: the system clock in production, a simulated one in tests
//! (whole rotations, holds and drains of days, run in milliseconds). Rotation, the apiserver's
//! restart-and-verify wait ([`crate::apiserver::ready`]) and the daemon read their time from
//! it: calendar time for records and schedules, [`Clock::monotonic`] for its short
//! timers (debounce, retry, resync), which must not jump with the wall clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Time as rotation and the daemon see it.
#[async_trait::async_trait]
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
    /// Time since a fixed, arbitrary origin that never goes back (a wall clock set back by
    /// NTP does not move it): what timers are measured in.
    fn monotonic(&self) -> Duration;
    /// Waits `duration` (a short poll while an apiserver restarts; long waits are never slept:
    /// they are computed from the state and scheduled).
    async fn sleep(&self, duration: Duration);
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

#[async_trait::async_trait]
impl Clock for SystemClock {
    fn now(&self) -> u64 {
        crate::state::unix_now()
    }
    fn monotonic(&self) -> Duration {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        ORIGIN.get_or_init(Instant::now).elapsed()
    }
    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

/// A simulated clock: `sleep` advances it instantly. Clones share the time.
#[derive(Debug, Clone, Default)]
pub struct SimulatedClock {
    now: Arc<AtomicU64>,
    /// Nanoseconds advanced since the start ([`Clock::monotonic`]).
    elapsed: Arc<AtomicU64>,
}

impl SimulatedClock {
    pub fn at(now: u64) -> SimulatedClock {
        SimulatedClock {
            now: Arc::new(AtomicU64::new(now)),
            elapsed: Arc::new(AtomicU64::new(0)),
        }
    }
    /// Sets the calendar time (a wall clock set by hand: the monotonic time stays).
    pub fn set(&self, now: u64) {
        self.now.store(now, Ordering::SeqCst);
    }
    /// Moves time forward: the monotonic time by exactly `by`, the calendar time by `by` in
    /// whole seconds, at least one (so a poll loop on seconds always makes progress).
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_secs().max(1), Ordering::SeqCst);
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.elapsed.fetch_add(nanos, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Clock for SimulatedClock {
    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
    fn monotonic(&self) -> Duration {
        Duration::from_nanos(self.elapsed.load(Ordering::SeqCst))
    }
    async fn sleep(&self, duration: Duration) {
        self.advance(duration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simulated_clock_moves_both_times_and_setting_the_date_keeps_the_timers() {
        let clock = SimulatedClock::at(1000);
        assert_eq!((clock.now(), clock.monotonic()), (1000, Duration::ZERO));
        clock.advance(Duration::from_millis(250));
        // Calendar seconds always move (poll loops on seconds progress); timers move exactly.
        assert_eq!(clock.now(), 1001);
        assert_eq!(clock.monotonic(), Duration::from_millis(250));
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), 1091);
        assert_eq!(clock.monotonic(), Duration::from_millis(90_250));
        // The date set back: timers do not go back with it.
        clock.set(10);
        assert_eq!(clock.now(), 10);
        assert_eq!(clock.monotonic(), Duration::from_millis(90_250));
        // Clones share the time.
        let other = clock.clone();
        other.advance(Duration::from_secs(1));
        assert_eq!(clock.monotonic(), Duration::from_millis(91_250));
    }

    #[test]
    fn the_system_clock_never_goes_back() {
        let clock = SystemClock;
        let a = clock.monotonic();
        let b = clock.monotonic();
        assert!(b >= a);
        assert!(clock.now() > 1_600_000_000);
    }
}
