//! What the tests of whole key rotations on three servers share (k3s-shaped hosts in
//! tests/real_apiserver_ha_k3s.rs, kubeadm-shaped ones in
//! tests/real_apiserver_ha_kubeadm_rotation.rs): the public site the issuer URL points at, each
//! host's rotation phase as its state file says, and the figures taken from the monitor.
//! A test that uses it declares `mod ha_support;` and `mod https_support;` too.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{ha_support, https_support};

/// The issuer every rotation test's agents publish for (served by [`PublicSite`]).
pub const ISSUER: &str = "https://127.0.0.1:8443/cluster-a";

/// The public site's port inside the test's own network namespace (nothing else listens there).
pub const PUBLIC_PORT: u16 = 8443;
/// The public site: serves `/cluster-a/...` from the `srv/oidc` of the server whose agent drives
/// a rotation (its state is past idle), else from the first server's.
pub struct PublicSite {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    netns: String,
}

/// The `rotation` section of a host's state file.
pub fn rotation_state(root: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(root.join("var/lib/irsa-agent/state.json"))
        .unwrap_or_else(|_| "{}".into());
    serde_json::from_str::<Value>(&text).unwrap_or(Value::Null)["rotation"].clone()
}

/// A host's rotation phase (`""` before the first one).
pub fn phase(root: &std::path::Path) -> String {
    rotation_state(root)["phase"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The first string value under a key named `key`, anywhere in `v`.
pub fn find(v: &Value, key: &str) -> Option<String> {
    match v {
        Value::Object(map) => map
            .get(key)
            .and_then(|x| x.as_str().map(str::to_string))
            .or_else(|| map.values().find_map(|x| find(x, key))),
        Value::Array(items) => items.iter().find_map(|x| find(x, key)),
        _ => None,
    }
}

impl PublicSite {
    pub fn start(netns: &str, roots: Vec<PathBuf>) -> PublicSite {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = ha_support::in_netns(netns, move || async move {
            let config = https_support::server_config(false);
            let listener =
                std::net::TcpListener::bind(("127.0.0.1", PUBLIC_PORT)).expect("bind the site");
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let Some((request, mut tls)) =
                    https_support::accept(stream, &config, Duration::from_secs(5))
                else {
                    continue;
                };
                let root = roots
                    .iter()
                    .find(|r| !matches!(phase(r).as_str(), "" | "idle"))
                    .unwrap_or(&roots[0]);
                let file = request
                    .path
                    .strip_prefix("/cluster-a/")
                    .filter(|rest| !rest.contains(".."))
                    .map(|rest| root.join("srv/oidc").join(rest));
                let (code, body) = match file.and_then(|f| std::fs::read(f).ok()) {
                    Some(body) => (200, body),
                    None => (404, b"not found".to_vec()),
                };
                https_support::respond(
                    &mut tls,
                    code,
                    &[
                        ("content-type", "application/json".into()),
                        ("cache-control", "public, max-age=0".into()),
                    ],
                    &body,
                );
            }
        });
        PublicSite {
            stop,
            handle: Some(handle),
            netns: netns.to_string(),
        }
    }
}

impl Drop for PublicSite {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the listener (inside the namespace).
        let _ = ha_support::in_netns(&self.netns, || async {
            let _ = std::net::TcpStream::connect(("127.0.0.1", PUBLIC_PORT));
        })
        .join();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The driver's phase over time: (unix ms, phase), one entry per change.
pub type Timeline = Vec<(u64, String)>;

/// The driver's phase at unix ms `at`.
pub fn phase_at(timeline: &Timeline, at: u64) -> &str {
    timeline
        .iter()
        .rev()
        .find(|(t, _)| *t <= at)
        .map_or("idle", |(_, p)| p.as_str())
}

/// The most apiservers the monitor saw down together for at least `seconds` in a row.
pub fn sustained_down(down: &ha_support::MonitorReport, seconds: f64) -> usize {
    let t = &down.timeline;
    (0..t.len())
        .filter(|&i| t.get(i + 1).is_none_or(|next| next.0 - t[i].0 >= seconds))
        .map(|i| t[i].1.len())
        .max()
        .unwrap_or(0)
}

/// A rotation's phases, in order: where [`restarts_by_phase`] counts.
pub const STEPS: [&str; 7] = [
    "idle",
    "staged",
    "published",
    "trusted",
    "signing",
    "draining",
    "retired",
];

/// Apiserver starts per server (after the first `starts_before[j]` of server `j`) by the
/// driver's phase at the moment, `[step][server]` in the order of [`STEPS`].
pub fn restarts_by_phase(
    ha: &ha_support::Ha,
    timeline: &Timeline,
    starts_before: &[usize],
) -> Vec<Vec<usize>> {
    let mut restarts = vec![vec![0usize; ha.servers.len()]; STEPS.len()];
    for (j, s) in ha.servers.iter().enumerate() {
        for (at, _, _) in s
            .events()
            .iter()
            .filter(|e| e.1 == "start")
            .skip(starts_before[j])
        {
            let p = phase_at(timeline, *at);
            let k = STEPS.iter().position(|s| *s == p).unwrap_or(0);
            restarts[k][j] += 1;
        }
    }
    restarts
}

/// The seed of the faults: `IRSA_TEST_SEED` to replay one, else the clock's.
pub fn seed() -> u64 {
    std::env::var("IRSA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(ha_support::unix_ms)
}

/// One agent to kill (-9) once its log (after `from` bytes) has the `nth` line containing
/// `marker`, `delay` later, and to start again `dead_for` after that.
pub struct Kill {
    pub server: usize,
    pub marker: &'static str,
    pub nth: usize,
    pub delay: Duration,
    pub dead_for: Duration,
    pub from: usize,
    pub killed: Option<Instant>,
    pub done: bool,
}

impl Kill {
    pub fn due(&self, log: &str) -> bool {
        log.get(self.from..)
            .is_some_and(|l| l.lines().filter(|x| x.contains(self.marker)).count() >= self.nth)
    }

    /// Kills the agent once its point is due, starts it again once it was dead long enough.
    pub fn tend(
        &mut self,
        agent: &mut ha_support::Agent,
        spawn: impl Fn(usize) -> ha_support::Agent,
        ha: &ha_support::Ha,
        t: Instant,
    ) {
        if self.done {
            return;
        }
        match self.killed {
            None if self.due(&agent.output()) => {
                std::thread::sleep(self.delay);
                agent.kill();
                self.killed = Some(Instant::now());
                eprintln!(
                    "{:6.1}s: killed {}'s agent (-9)",
                    t.elapsed().as_secs_f64(),
                    ha.servers[self.server].name
                );
            }
            Some(at) if at.elapsed() >= self.dead_for => {
                *agent = spawn(self.server);
                self.done = true;
                eprintln!(
                    "{:6.1}s: started {}'s agent again",
                    t.elapsed().as_secs_f64(),
                    ha.servers[self.server].name
                );
            }
            _ => {}
        }
    }
}

/// [`Kill::tend`] for every kill, once.
pub fn tend_all(
    kills: &mut [Kill],
    agents: &mut [ha_support::Agent],
    spawn: impl Fn(usize) -> ha_support::Agent + Copy,
    ha: &ha_support::Ha,
    t: Instant,
) {
    for k in kills.iter_mut() {
        k.tend(&mut agents[k.server], spawn, ha, t);
    }
}

/// Tends the kills until every one is done (killed and started again), for up to `within`: a
/// kill point can come after the rotation's end (a follower's last step), and an agent killed
/// just before it must still be started again.
pub fn finish_kills(
    kills: &mut [Kill],
    agents: &mut [ha_support::Agent],
    spawn: impl Fn(usize) -> ha_support::Agent + Copy,
    ha: &ha_support::Ha,
    t: Instant,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    while kills.iter().any(|k| !k.done) && Instant::now() < deadline {
        tend_all(kills, agents, spawn, ha, t);
        std::thread::sleep(Duration::from_millis(250));
    }
}
