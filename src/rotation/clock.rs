//! The clock, behind a trait: the system clock in production, a simulated one in tests (whole
//! rotations, holds and drains of days, run in milliseconds).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Time as rotation sees it.
#[async_trait::async_trait]
pub trait Clock: Send + Sync {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
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
    async fn sleep(&self, duration: Duration) {
        tokio::time::sleep(duration).await;
    }
}

/// A simulated clock: `sleep` advances it instantly. Clones share the time.
#[derive(Debug, Clone, Default)]
pub struct SimulatedClock {
    now: Arc<AtomicU64>,
}

impl SimulatedClock {
    pub fn at(now: u64) -> SimulatedClock {
        SimulatedClock {
            now: Arc::new(AtomicU64::new(now)),
        }
    }
    pub fn set(&self, now: u64) {
        self.now.store(now, Ordering::SeqCst);
    }
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_secs().max(1), Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Clock for SimulatedClock {
    fn now(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
    async fn sleep(&self, duration: Duration) {
        self.advance(duration);
    }
}
