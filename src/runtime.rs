//! The process's one async runtime.
//!
//! Every part of irsa-agent that talks over the network is async (kube-rs, reqwest, the
//! object-store clients), while most commands and the host work around them (reading key files,
//! `systemctl`, `k3s certificate rotate-ca`) are plain blocking code. They meet here: one
//! current-thread runtime per process (small, as on a Pi), built on first use, and [`block_on`]
//! to run a future on it from blocking code (a command's `main`, or a daemon step on a
//! blocking thread).
//!
//! A current-thread runtime is driven by whichever thread is inside its `block_on`. The daemon's
//! main thread drives it for the daemon's life; a blocking thread that calls [`block_on`]
//! meanwhile polls its own future and is woken by the main thread's timers and sockets (tokio
//! hands the driver over when the main thread lets go).
//!
//! One runtime means one set of timers, one DNS/IO driver, and clients that stay valid: a kube
//! client starts its worker on the runtime that builds it and stops working when that runtime
//! is dropped, so per-call runtimes forced every caller to rebuild its client.
//!
//! The daemon's main loop runs on it too ([`crate::daemon::run`]). [`block_on`] must not be
//! called from async code running on it (tokio refuses: "cannot start a runtime from within a
//! runtime"); async code awaits instead.

use std::future::Future;
use std::sync::OnceLock;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The runtime, built on first use. Building it fails only when the process cannot start a
/// thread or an epoll instance (out of file descriptors or memory): nothing can run then, and
/// the panic message says why.
pub fn get() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the async runtime: {e}"))
    })
}

/// Runs `future` to completion on the process runtime, from blocking code.
pub fn block_on<F: Future>(future: F) -> F::Output {
    get().block_on(future)
}

/// A handle to the process runtime (to spawn onto it from blocking code).
pub fn handle() -> &'static tokio::runtime::Handle {
    get().handle()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// The daemon's shape: one thread drives the runtime for a long time; another thread's
    /// `block_on` (a blocking step asking the apiserver) still gets its timers and finishes.
    #[test]
    fn a_second_thread_runs_its_future_while_another_drives_the_runtime() {
        let driver = std::thread::spawn(|| {
            super::block_on(tokio::time::sleep(Duration::from_millis(600)));
        });
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        let n = std::thread::spawn(|| {
            super::block_on(async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tokio::spawn(async { 7 }).await.unwrap_or(0)
            })
        })
        .join()
        .unwrap_or(0);
        assert_eq!(n, 7);
        assert!(
            start.elapsed() < Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        driver.join().ok();
    }
}
