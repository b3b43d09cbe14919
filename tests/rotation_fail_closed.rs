//! Rotation never acts on missing evidence (issue #13), on the simulated cluster of
//! `rotation_support`: the local apiserver is stopped (every request to it is refused) right
//! before each step in turn; the step must not remove a key, no valid token may be rejected
//! (the invariant is checked at every step and every simulated minute/hour), and once the
//! apiserver is back the rotation completes.

mod https_support;
mod rotation_support;

use std::time::Duration;

use irsa_agent::config::Distribution;
use irsa_agent::keys;
use irsa_agent::rotation::{self, PhaseName, RotationState};
use rotation_support::*;

fn state(sim: &Sim) -> RotationState {
    rotation::load_state(&sim.ctx.root)
        .expect("state")
        .expect("rotation state")
}

/// Every kid the published JWKS (origin) lists now.
fn published_kids(sim: &Sim) -> Vec<String> {
    let origin = lock_cdn(&sim.cdn).origin.clone().unwrap_or_default();
    irsa_agent::publish::merge::kids_in(origin.as_bytes())
}

fn local_kids(sim: &Sim) -> Vec<String> {
    sim.local().verification.iter().map(|k| k.kid()).collect()
}

/// Runs a rotation (started with --now); right before the step from `target` the local
/// apiserver is stopped for `attempts` attempts of that step (at their due times), then
/// started again. Returns the status lines of the attempts made while it was down.
async fn rotation_with_outage(target: PhaseName, attempts: usize) -> (Sim, Vec<String>) {
    let mut sim = Sim::new(Distribution::K3s, 1);
    sim.ctx.options.recheck = Duration::from_secs(60);
    let mut outage_lines = Vec::new();
    let mut outage_done = false;
    sim.mint_tokens("before the rotation", DAY);
    sim.ctx.options.start_now = true;
    for _ in 0..600 {
        let phase = rotation::load_state(&sim.ctx.root)
            .expect("state")
            .map_or(PhaseName::Idle, |s| s.phase.name());
        if phase == target && !outage_done {
            outage_done = true;
            let kids_before = (local_kids(&sim), published_kids(&sim));
            let state_before_outage: Vec<String> = rotation::load_state(&sim.ctx.root)
                .expect("state")
                .and_then(|s| s.phase.rotation().map(|r| r.old_kids.clone()))
                .unwrap_or_default();
            sim.world().down = true;
            for i in 0..attempts {
                let now = sim.now();
                let result = rotation::step(&mut sim.ctx, now).await;
                sim.ctx.options.start_now = false;
                sim.check_invariant(&format!("attempt {i} with the apiserver down, {phase}"));
                let line = match &result {
                    Ok(o) => o.status_line.clone(),
                    Err(e) => format!("error: {e}"),
                };
                outage_lines.push(line.clone());
                // No key was removed from the apiserver or from the published JWKS.
                for kid in &kids_before.0 {
                    assert!(local_kids(&sim).contains(kid), "{line}: {kid} removed");
                }
                // (From `retired` the step *is* taking the retired keys out of the JWKS: the
                // evidence for that was read before the old key was retired.)
                let retired: Vec<String> = if phase == PhaseName::Retired {
                    state_before_outage.clone()
                } else {
                    Vec::new()
                };
                for kid in kids_before.1.iter().filter(|k| !retired.contains(k)) {
                    assert!(
                        published_kids(&sim).contains(kid),
                        "{line}: {kid} unpublished"
                    );
                }
                if !sim.world().down {
                    break; // a restart brought it back (systemctl restart k3s starts it)
                }
                let due = state(&sim).due_at().expect("due").max(sim.now() + 1);
                while sim.now() + 60 < due {
                    let t = sim.now() + 60;
                    sim.set_time(t);
                    sim.check_invariant("minute by minute while the apiserver is down");
                }
                sim.set_time(due);
                sim.mint_tokens("while the apiserver is down", HOUR);
            }
            sim.world().down = false;
            continue;
        }
        let now = sim.now();
        let result = rotation::step(&mut sim.ctx, now).await;
        sim.ctx.options.start_now = false;
        let phase = state(&sim).phase.name();
        sim.check_invariant(&format!("after a step, now {phase}"));
        sim.mint_tokens(&format!("{phase}"), DAY);
        if matches!(&result, Ok(o) if o.progressed && o.phase == PhaseName::Idle) {
            break;
        }
        let due = match &result {
            Ok(o) => o.next_due,
            Err(_) => state(&sim).due_at(),
        }
        .expect("due");
        while sim.now() + HOUR < due {
            let t = sim.now() + HOUR;
            sim.set_time(t);
            sim.check_invariant("between steps");
            sim.mint_tokens("hourly", DAY);
        }
        if due > sim.now() {
            sim.set_time(due);
        }
    }
    assert!(outage_done, "the rotation never reached {target}");
    let st = state(&sim);
    assert!(
        matches!(st.phase, rotation::Phase::Idle { .. }),
        "the rotation did not finish after the apiserver came back: {:?}",
        st.last_step
    );
    assert_eq!(
        st.history.last().map(|h| h.outcome),
        Some(irsa_agent::rotation::machine::Ending::Completed)
    );
    for _ in 0..30 {
        let t = sim.now() + HOUR;
        sim.set_time(t);
        sim.check_invariant("after the rotation");
    }
    (sim, outage_lines)
}

#[tokio::test(flavor = "current_thread")]
async fn an_apiserver_stopped_at_each_step_holds_that_step_and_rejects_no_token() {
    for target in [
        PhaseName::Idle,
        PhaseName::Staged,
        PhaseName::Published,
        PhaseName::Trusted,
        PhaseName::Signing,
        PhaseName::Draining,
        PhaseName::Retired,
    ] {
        let (_sim, lines) = rotation_with_outage(target, 3).await;
        eprintln!("{target}: {lines:?}");
        assert!(!lines.is_empty(), "{target}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_drain_that_ends_while_the_apiserver_is_stopped_is_blocked_not_retired() {
    let (sim, lines) = rotation_with_outage(PhaseName::Draining, 4).await;
    // Every attempt while it was down: blocked, saying what it waits for, backed off from the
    // one-minute re-check (1, 2, 4 min).
    assert_eq!(lines.len(), 4, "{lines:?}");
    for line in &lines {
        assert!(line.starts_with("draining: blocked: waiting for"), "{line}");
        assert!(line.contains("Connection refused"), "{line}");
        assert!(line.contains("nothing irreversible"), "{line}");
    }
    assert!(
        lines[0].contains("serviceaccount_stale_tokens_total"),
        "{}",
        lines[0]
    );
    assert!(lines[3].contains("attempt 4"), "{}", lines[3]);
    let st = state(&sim);
    assert!(st.blocked.is_none(), "cleared once it went on");
    let done = st.history.last().expect("done");
    assert_eq!(done.restarts, 2);
}

#[tokio::test(flavor = "current_thread")]
async fn blocked_retirement_shows_in_status_metrics_and_state() {
    let mut sim = Sim::new(Distribution::K3s, 1);
    sim.ctx.options.recheck = Duration::from_secs(60);
    sim.ctx.options.start_now = true;
    // Walk to the end of the drain.
    for _ in 0..20 {
        let now = sim.now();
        let out = rotation::step(&mut sim.ctx, now).await.expect("step");
        sim.ctx.options.start_now = false;
        if out.phase == PhaseName::Draining && out.progressed {
            break;
        }
        let due = out.next_due.expect("due").max(sim.now());
        sim.set_time(due);
    }
    let drain_until = state(&sim).phase.due_at().expect("drain end");
    sim.set_time(drain_until);
    // The apiserver answers, but its /metrics cannot be read (RBAC, an aggregated error).
    sim.world().stale = None;
    let out = rotation::step(&mut sim.ctx, drain_until)
        .await
        .expect("step");
    assert!(!out.progressed);
    assert!(out.status_line.contains("blocked"), "{}", out.status_line);
    assert!(out.status_line.contains("HTTP 403"), "{}", out.status_line);
    assert_eq!(out.next_due, Some(drain_until + 60));
    let st = state(&sim);
    let blocked = st.blocked.clone().expect("blocked");
    assert_eq!(blocked.attempts, 1);
    let lines = rotation::status_lines(Some(&st), &sim.ctx.settings, drain_until + 1);
    assert!(
        lines.iter().any(|l| l.contains("BLOCKED since")
            && l.contains("serviceaccount_stale_tokens_total")),
        "{lines:?}"
    );
    let metrics = rotation::metrics_text(Some(&st));
    assert!(
        metrics.contains("irsa_agent_rotation_blocked 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "irsa_agent_rotation_blocked_since_timestamp_seconds {drain_until}\n"
        )),
        "{metrics}"
    );
    let json = rotation::status_json(Some(&st), &sim.ctx.settings, drain_until);
    assert_eq!(json["blocked"]["attempts"], 1, "{json}");
    // Not retried before the back-off (no key removed meanwhile)...
    let out = rotation::step(&mut sim.ctx, drain_until + 30)
        .await
        .expect("step");
    assert!(!out.progressed);
    // ... but `irsa-agent rotate` (look_now) looks again at once; still blocked: attempt 2,
    // back-off doubled.
    sim.ctx.options.look_now = true;
    sim.set_time(drain_until + 30);
    let out = rotation::step(&mut sim.ctx, drain_until + 30)
        .await
        .expect("step");
    assert!(out.status_line.contains("attempt 2"), "{}", out.status_line);
    assert_eq!(out.next_due, Some(drain_until + 30 + 120));
    sim.ctx.options.look_now = false;
    // With rotation.ignore-stale-tokens (a stated reason) the counter is not needed; the
    // legacy Secrets still are, and are read: it retires.
    sim.ctx.settings.rotation.ignore_stale_tokens =
        Some("audit log checked: no client keeps tokens".into());
    sim.set_time(drain_until + 150);
    let out = rotation::step(&mut sim.ctx, drain_until + 150)
        .await
        .expect("step");
    assert_eq!(out.phase, PhaseName::Retired, "{}", out.status_line);
    assert!(state(&sim).blocked.is_none());
    let metrics = rotation::metrics_text(Some(&state(&sim)));
    assert!(
        metrics.contains("irsa_agent_rotation_blocked 0\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_recreated_legacy_secret_is_noticed_within_a_minute() {
    let mut sim = Sim::new(Distribution::K3s, 1);
    sim.ctx.options.recheck = Duration::from_secs(60);
    let old_signer = sim.local().signing.clone();
    let legacy = keys::token::mint(
        &old_signer,
        &serde_json::json!({"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:default:legacy"}),
    )
    .expect("mint");
    sim.world().legacy.push(LegacySecret {
        name: "default/legacy-token".into(),
        token: legacy,
    });
    sim.ctx.options.start_now = true;
    let mut waiting_since = None;
    let mut recreated_at = None;
    for _ in 0..200 {
        let now = sim.now();
        let out = rotation::step(&mut sim.ctx, now).await.expect("step");
        sim.ctx.options.start_now = false;
        sim.check_invariant("stepping");
        if out.phase == PhaseName::Retired {
            break;
        }
        if out
            .status_line
            .contains("legacy service-account token Secrets")
        {
            let since = *waiting_since.get_or_insert(now);
            // Looked at again within a minute, and it says so.
            assert_eq!(out.next_due, Some(now + 60), "{}", out.status_line);
            assert!(out.status_line.contains("every 1m"), "{}", out.status_line);
            if now >= since + 300 && recreated_at.is_none() {
                // The operator re-creates it; kube-controller-manager signs it with the new key.
                let signer = sim.local().signing.clone();
                let token =
                    keys::token::mint(&signer, &serde_json::json!({"sub": "x"})).expect("mint");
                sim.world().legacy = vec![LegacySecret {
                    name: "default/legacy-token".into(),
                    token,
                }];
                recreated_at = Some(now);
            }
        }
        let due = out.next_due.expect("due").max(sim.now());
        sim.set_time(due);
    }
    let recreated_at = recreated_at.expect("it waited for the legacy Secret");
    let st = state(&sim);
    assert_eq!(st.phase.name(), PhaseName::Retired);
    let retired_at = st.phase.since();
    assert!(
        retired_at - recreated_at <= 60,
        "retired {}s after the Secret was re-created",
        retired_at - recreated_at
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_stale_token_hold_is_sized_from_the_settings() {
    let mut sim = Sim::new(Distribution::K3s, 1);
    // A short drain: tokens live 10 minutes, no margin.
    sim.ctx.settings.rotation.token_lifetime = Duration::from_secs(600);
    sim.ctx.settings.rotation.drain_margin = Duration::ZERO;
    sim.ctx.options.start_now = true;
    let mut all_signing_at = None;
    for _ in 0..50 {
        let now = sim.now();
        let out = rotation::step(&mut sim.ctx, now).await.expect("step");
        sim.ctx.options.start_now = false;
        if let rotation::Phase::Draining {
            all_signing_at: a, ..
        } = state(&sim).phase
        {
            all_signing_at = Some(a);
        }
        if out.phase == PhaseName::Retired {
            break;
        }
        let due = out.next_due.expect("due").max(sim.now());
        sim.set_time(due);
    }
    let all_signing_at = all_signing_at.expect("drained");
    let retired_at = state(&sim).phase.since();
    // The counter stayed flat for the whole 10-minute drain: retired when the drain ended,
    // not an hour after it started.
    assert_eq!(retired_at, all_signing_at + 600);
}

#[tokio::test(flavor = "current_thread")]
async fn the_first_rotation_is_due_by_the_age_of_the_signing_key() {
    let sim = Sim::new(Distribution::K3s, 1);
    let mut sim = sim;
    // The key files were installed 100 days before now (T0); rotation every 30 days.
    let installed = T0 - 100 * DAY;
    for f in ["service.key", "service.current.key"] {
        let file = std::fs::File::options()
            .write(true)
            .open(sim.root().join(format!("{}/{f}", &K3S_TLS[1..])))
            .expect("open");
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(installed))
            .expect("mtime");
    }
    let lines = rotation::status_lines_on(Some(&sim.ctx.root), None, &sim.ctx.settings, T0);
    assert!(
        lines.iter().any(|l| l.contains("first rotation due now")
            && l.contains("modification time of /var/lib/rancher/k3s/server/tls/service")
            && l.contains("100d old")),
        "{lines:?}"
    );
    // The daemon's first step starts a rotation at once (no --now).
    let out = rotation::step(&mut sim.ctx, T0).await.expect("step");
    assert_eq!(out.phase, PhaseName::Staged, "{}", out.status_line);
    let st = state(&sim);
    let age = st.key_age.clone().expect("key age recorded");
    assert_eq!(age.since, installed);
    assert_eq!(age.evidence, "installed");
}

#[tokio::test(flavor = "current_thread")]
async fn a_new_key_is_first_rotated_every_after_it_was_installed() {
    let mut sim = Sim::new(Distribution::K3s, 1);
    // Key files written 5 days before T0 (30-day period): due in 25 days, not 30.
    let installed = T0 - 5 * DAY;
    for f in ["service.key", "service.current.key"] {
        let file = std::fs::File::options()
            .write(true)
            .open(sim.root().join(format!("{}/{f}", &K3S_TLS[1..])))
            .expect("open");
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(installed))
            .expect("mtime");
    }
    let out = rotation::step(&mut sim.ctx, T0).await.expect("step");
    assert!(!out.progressed);
    assert_eq!(out.next_due, Some(installed + 30 * DAY));
    let lines = rotation::status_lines(Some(&state(&sim)), &sim.ctx.settings, T0);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("first rotation: due by the signing key's age")),
        "{lines:?}"
    );
    // Key files with a modification time in the future of this clock: first seen now.
    let mut sim = Sim::new(Distribution::K3s, 1);
    let future = T0 + 400 * DAY;
    for f in ["service.key", "service.current.key"] {
        let file = std::fs::File::options()
            .write(true)
            .open(sim.root().join(format!("{}/{f}", &K3S_TLS[1..])))
            .expect("open");
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(future))
            .expect("mtime");
    }
    let out = rotation::step(&mut sim.ctx, T0).await.expect("step");
    assert_eq!(out.next_due, Some(T0 + 30 * DAY));
    assert_eq!(
        state(&sim).key_age.map(|a| a.evidence),
        Some("first-seen".to_string())
    );
}
