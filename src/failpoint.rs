//! Failpoints: crash the process at a named point, to test what the next run does with what a
//! crash leaves behind (a backup without a change, a change without a restart, a temp file).
//!
//! Compiled in only with the `failpoints` cargo feature (the test suite enables it); then
//! `IRSA_AGENT_FAILPOINTS=name[@n][,name[@n]...]` makes [`hit`] exit the process with status 99
//! the n-th time (default: the first) it reaches that point. `name[@n]:pause` instead creates
//! the file `$IRSA_AGENT_FAILPOINT_DIR/<name>.paused` and waits (at most a minute) until the test
//! removes it: two processes forced to overlap at a chosen point. Without the feature [`hit`] is
//! empty.
//!
//! Points: `apply:after-backup`, `apply:after-write`, `apply:after-restart`,
//! `fs:before-rename` (every [`crate::fs::write_atomic`]: the temp file is written and synced,
//! not yet renamed), `daemon:after-observe` (a converge has read the apiserver's files, not yet
//! watched their folders).
//!
//! Key rotation ([`crate::rotation`]): `rotation:<from>-><to>` at every transition, after its
//! work is done and before the new phase is saved (`rotation:idle->staged`,
//! `rotation:staged->published`, `rotation:published->staged`, `rotation:published->trusted`,
//! `rotation:trusted->signing`, `rotation:signing->draining`, `rotation:draining->retired`,
//! `rotation:retired->idle`); `rotation:after-stage-files` (new key written, state not saved);
//! and inside each install (`verify-only`, `trust`, `sign`, `retire`, `remove-new`):
//! `rotation:<install>:after-rotate-ca` (k3s: the datastore has the new service.key, not yet
//! restarted), `rotation:<install>:after-restart`, `rotation:<install>:after-write` (kubeadm:
//! manifests written).

/// Exits with status 99 at the configured hit of `name`.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static HITS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
    let Ok(spec) = std::env::var("IRSA_AGENT_FAILPOINTS") else {
        return;
    };
    let count = {
        let mut guard = HITS.lock().unwrap_or_else(|e| e.into_inner());
        let map = guard.get_or_insert_with(HashMap::new);
        let n = map.entry(name.to_string()).or_insert(0);
        *n += 1;
        *n
    };
    for entry in spec.split(',') {
        let (entry, pause) = match entry.strip_suffix(":pause") {
            Some(e) => (e, true),
            None => (entry, false),
        };
        let (point, nth) = match entry.split_once('@') {
            Some((p, n)) => (p, n.parse().unwrap_or(1)),
            None => (entry, 1),
        };
        if point == name && nth == count {
            if pause {
                let dir = std::env::var_os("IRSA_AGENT_FAILPOINT_DIR").unwrap_or_default();
                let flag = std::path::Path::new(&dir)
                    .join(format!("{}.paused", name.replace(['/', ':'], "_")));
                let _ = std::fs::write(&flag, b"");
                eprintln!(
                    "failpoint {name}@{count}: paused until {} is removed",
                    flag.display()
                );
                let started = std::time::Instant::now();
                while flag.exists() && started.elapsed() < std::time::Duration::from_secs(60) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                continue;
            }
            eprintln!("failpoint {name}@{count}: exiting");
            std::process::exit(99);
        }
    }
}

/// Without the `failpoints` feature: nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
