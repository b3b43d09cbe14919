//! Capped exponential backoff with jitter, and the jitter of the resync timer.
//!
//! Pure arithmetic over a small seeded generator, so tests can pin the sequence.

use std::time::Duration;

/// A tiny xorshift64* generator: jitter only, never anything secret.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        // Zero is the one state xorshift cannot leave.
        Jitter(seed.max(1))
    }

    /// Seeded from the clock and the process id, so several agents do not retry in step.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// A number in `[0, 1)`.
    pub fn fraction(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let out = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (out >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `d` spread by ±`spread` (0.1 = ±10%).
    pub fn spread(&mut self, d: Duration, spread: f64) -> Duration {
        let factor = 1.0 - spread + 2.0 * spread * self.fraction();
        d.mul_f64(factor.max(0.0))
    }
}

/// Delays between attempts: `base`, `2 base`, `4 base`, ... capped at `max`, each drawn from
/// the upper half of its step ("equal jitter"): never less than half the step, never in step
/// with another agent.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn set_max(&mut self, max: Duration) {
        self.max = max.max(self.base);
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn fail(&mut self, jitter: &mut Jitter) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        step / 2 + (step / 2).mul_f64(jitter.fraction())
    }

    /// Records a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut jitter = Jitter::new(42);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut steps = Vec::new();
        for _ in 0..12 {
            steps.push(b.fail(&mut jitter));
        }
        let expected_steps = [1u64, 2, 4, 8, 16, 32, 60, 60, 60, 60, 60, 60];
        for (delay, step) in steps.iter().zip(expected_steps) {
            let step = Duration::from_secs(step);
            assert!(
                *delay >= step / 2 && *delay <= step,
                "{delay:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
        assert_eq!(b.failures(), 12);
        b.reset();
        assert!(b.fail(&mut jitter) <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_both_ways_and_stays_in_bounds() {
        let mut jitter = Jitter::new(7);
        let d = Duration::from_secs(600);
        let spread: Vec<Duration> = (0..1000).map(|_| jitter.spread(d, 0.1)).collect();
        assert!(spread.iter().all(|s| *s >= Duration::from_secs(540)));
        assert!(spread.iter().all(|s| *s <= Duration::from_secs(660)));
        assert!(spread.iter().any(|s| *s < Duration::from_secs(570)));
        assert!(spread.iter().any(|s| *s > Duration::from_secs(630)));
        // Two agents started together do not draw the same sequence.
        let mut a = Jitter::new(1);
        let mut b = Jitter::new(2);
        assert_ne!(a.fraction(), b.fraction());
    }
}
