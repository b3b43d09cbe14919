//! The one restart-and-verify wait: after irsa-agent restarts an apiserver (or kubelet does, for
//! a static pod), it waits here until the apiserver is seen serving what was planned.
//!
//! `apply`, `finalize`, the daemon's apiserver step ([`super::apply::execute`] and
//! [`super::apply::resume`]) and rotation (which waits for the keys it installed) all wait
//! through [`wait_until`], on the one [`Clock`]: the same timeout and poll rules, the same
//! progress messages, and tests that run a five-minute wait on a simulated clock in no time.
//! What "serving what was planned" means stays with the caller, as the `look` it passes: the
//! issuer in the discovery document, or the key ids in the JWKS.

use std::time::Duration;

use crate::clock::Clock;

/// How long to wait for a restarted apiserver, and how often to ask it meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Patience {
    pub timeout: Duration,
    pub poll: Duration,
}

/// Progress is logged when the answer changes, and at least this often.
const LOG_EVERY: Duration = Duration::from_secs(15);

/// Asks `look` until it answers `Ok` (returns the time waited) or `patience.timeout` has
/// passed on `clock` (returns `look`'s last answer). `look` answers `Err(detail)` while the
/// apiserver is not there yet: down, not ready, or serving something else; `what` leads the
/// progress messages ("waiting for kube-apiserver to serve issuer N").
pub async fn wait_until(
    what: &str,
    clock: &dyn Clock,
    patience: Patience,
    mut look: impl AsyncFnMut() -> Result<(), String>,
) -> Result<Duration, String> {
    let start = clock.monotonic();
    let mut logged: Option<(Duration, String)> = None;
    loop {
        let detail = match look().await {
            Ok(()) => return Ok(clock.monotonic().saturating_sub(start)),
            Err(detail) => detail,
        };
        let waited = clock.monotonic().saturating_sub(start);
        if waited >= patience.timeout {
            return Err(detail);
        }
        let due = logged
            .as_ref()
            .is_none_or(|(at, last)| *last != detail || waited.saturating_sub(*at) >= LOG_EVERY);
        if due {
            log::info!(
                "{what} ({}s of {}s): {detail}",
                waited.as_secs(),
                patience.timeout.as_secs()
            );
            logged = Some((waited, detail));
        }
        clock
            .sleep(
                patience
                    .poll
                    .min(patience.timeout.saturating_sub(waited))
                    .max(Duration::from_millis(10)),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SimulatedClock;

    const PATIENCE: Patience = Patience {
        timeout: Duration::from_secs(300),
        poll: Duration::from_secs(2),
    };

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn it_returns_as_soon_as_the_apiserver_serves_what_was_planned() {
        let clock = SimulatedClock::at(1_700_000_000);
        let mut asked = 0;
        let waited = run(wait_until(
            "waiting to serve issuer N",
            &clock,
            PATIENCE,
            async || {
                asked += 1;
                if asked < 4 {
                    Err(format!("not ready ({asked})"))
                } else {
                    Ok(())
                }
            },
        ));
        // Three polls of 2 s, then the fourth answer is the one.
        assert_eq!(waited, Ok(Duration::from_secs(6)));
        assert_eq!(asked, 4);
    }

    #[test]
    fn a_five_minute_timeout_takes_no_time_and_returns_the_last_answer() {
        let clock = SimulatedClock::at(1_700_000_000);
        let real = std::time::Instant::now();
        let mut asked = 0u32;
        let result = run(wait_until(
            "waiting to be ready",
            &clock,
            PATIENCE,
            async || {
                asked += 1;
                Err(format!("answer {asked}"))
            },
        ));
        // Asked at 0, 2, ..., 300 s: the last answer is the one at the timeout.
        assert_eq!(result, Err("answer 151".to_string()));
        assert_eq!(clock.monotonic(), PATIENCE.timeout);
        assert!(real.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_last_poll_is_cut_to_the_timeout() {
        let clock = SimulatedClock::at(1_700_000_000);
        let patience = Patience {
            timeout: Duration::from_secs(5),
            poll: Duration::from_secs(2),
        };
        let result = run(wait_until(
            "waiting to be ready",
            &clock,
            patience,
            async || Err("down".to_string()),
        ));
        assert_eq!(result, Err("down".to_string()));
        // 2 + 2 + 1: never waits past the timeout.
        assert_eq!(clock.monotonic(), Duration::from_secs(5));
    }
}
