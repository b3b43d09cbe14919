//! `irsa-agent finalize`: retire the old issuers once no token minted with them can be valid.

use std::time::Duration;

use anyhow::bail;
use clap::Args as ClapArgs;
use serde_json::json;

use super::apply::{RunArgs, load_settings, print_outcome, print_plan, result_json};
use super::{Exit, Global};
use crate::apiserver;
use crate::apiserver::apply::{self as executor, FinalizeDecision};
use crate::apiserver::change::{self, Goal};
use crate::apiserver::ready::{self, Patience};
use crate::config::format_duration;
use crate::state::{self, State};

/// Why waiting matters; printed whenever finalize refuses or proceeds.
pub const WHY_WAIT: &str = "\
Why wait: a token keeps the issuer it was minted with, and after finalize a token with an old issuer \
is rejected. Projected tokens live at most their expirationSeconds (bounded by rotation.token-lifetime \
and --service-account-max-token-expiration). But with --service-account-extend-token-expiration=true \
(the default) the kube-api-access tokens kubelet mounts into every pod carry a 1-year exp: kubelet \
replaces them after about 48 minutes, yet a client that read its token once and kept it can present \
an old-issuer token for up to a year. Before finalizing, check that no such client exists: \
`kubectl get --raw /metrics | grep serviceaccount_stale_tokens_total` must not be rising (it counts \
requests with tokens past their original expiry), and audit events annotated \
`authentication.k8s.io/stale-token` name the clients that still use them.";

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Removes the issuers `apply` kept accepted (the old default included) once the time since the \
apiserver was first seen signing with the new issuer exceeds the longest token lifetime: \
rotation.token-lifetime (default 24h) or the apiserver's --service-account-max-token-expiration, \
whichever is longer. Refuses before that. --api-audiences stays pinned, except for external audiences (sts.amazonaws.com, api://AzureADTokenExchange, ...) that a cluster migrated by hand had there: once `apply` put the in-cluster audiences back, finalize removes them with the same wait (until then the tokens pods hold may carry them as their only audience).

Exit status: 0 done or nothing to retire; 2 retirement possible now (--check); 1 refused or error.")]
pub struct Args {
    #[command(flatten)]
    pub run: RunArgs,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let json_out = args.run.json;
    match finalize(global, &args.run) {
        Ok(code) => Ok(code),
        Err(err) if json_out => {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"changed": false, "error": super::error_chain(&err)})
                )?
            );
            log::error!("{}", super::error_chain(&err));
            Ok(Exit::FAILURE)
        }
        Err(err) => Err(err),
    }
}

fn finalize(global: &Global, run: &RunArgs) -> anyhow::Result<Exit> {
    let root = &global.root;
    let settings = load_settings(global)?;
    let mut state = State::load(root)?;
    let observed = apiserver::observe(root, settings.distribution)?;
    change::refuse_command_line_flags(root, &observed, &run.options())?;
    let lifetime = executor::longest_token_lifetime(settings.rotation.token_lifetime, &observed);
    let now = state::unix_now();
    // External audiences (sts.amazonaws.com, ...) go too, but only once every in-cluster
    // audience is back: then every default token minted since carries one of those.
    let previous = state
        .issuer
        .as_ref()
        .map(|s| s.previous.clone())
        .unwrap_or_default();
    let audiences = executor::FinalizeAudiences::of(&observed, &previous);
    if audiences.blocked() {
        let (in_force, missing, external) =
            (&audiences.in_force, &audiences.missing, &audiences.external);
        bail!(
            "--api-audiences is {} without the in-cluster audiences {}: the tokens pods hold carry {} as their only audience, so removing it now would reject them; run `irsa-agent apply` first (it puts {} back and keeps {}), then run finalize the longest token lifetime ({}) later",
            in_force.join(","),
            missing.join(","),
            external.join(", "),
            missing.join(","),
            external.join(", "),
            format_duration(lifetime)
        );
    }
    let drop = audiences.external;
    let mut decision = executor::finalize_decision(
        state.issuer.as_ref(),
        &settings.issuer,
        &observed.flags.issuers,
        &drop,
        now,
        lifetime,
    );
    // A switch written with --no-restart: see whether the apiserver serves it by now.
    if let FinalizeDecision::AwaitingSwitch { retire } = &decision {
        let mut e = change::edges(root, &observed, &run.options());
        let serving = e
            .probe
            .as_mut()
            .map(|p| crate::runtime::block_on(p.check()));
        match serving {
            Some(status) if status.issuer.as_deref() == Some(settings.issuer.as_str()) => {
                // Under the state lock, on the file as it is now (a rotation step may have
                // been recorded since it was read above).
                let mark = |st: &mut state::IssuerState| {
                    st.switched_at = Some(now);
                    st.pending_restart_since = None;
                    st.pending_backup = None;
                };
                State::update(root, |s| s.issuer.as_mut().map(mark))?;
                state.issuer.as_mut().map(mark);
                decision = FinalizeDecision::TooEarly {
                    retire: retire.clone(),
                    switched_at: now,
                    remaining: lifetime,
                };
            }
            Some(status) => bail!(
                "the apiserver does not serve {} yet ({}): restart it first (apply wrote the change without restarting), then wait {} before finalize",
                settings.issuer,
                status.detail,
                format_duration(lifetime)
            ),
            None => bail!(
                "cannot tell whether the apiserver serves {} yet: {}",
                settings.issuer,
                e.probe_error.unwrap_or_default()
            ),
        }
    }
    let retire = match decision {
        FinalizeDecision::NotApplied
            if observed.flags.issuers.first() == Some(&settings.issuer) =>
        {
            bail!(
                "the apiserver signs with {}, but irsa-agent has no record of applying it on this host ({}), so it cannot tell since when; run `irsa-agent apply` first (it records that), then finalize after the longest token lifetime",
                settings.issuer,
                state::STATE_FILE
            )
        }
        FinalizeDecision::NotApplied => bail!(
            "the apiserver does not sign with the configured issuer {} yet (it has {}); run `irsa-agent apply` first",
            settings.issuer,
            observed.flags.issuers.join(", ")
        ),
        FinalizeDecision::NothingToRetire => {
            if run.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "changed": false,
                        "in_sync": true,
                        "retire": [],
                        "issuers": observed.flags.issuers,
                    }))?
                );
            } else {
                println!(
                    "nothing to retire: the apiserver accepts {} (issuers you added yourself are left alone)",
                    observed.flags.issuers.join(", ")
                );
            }
            return Ok(Exit::OK);
        }
        FinalizeDecision::AwaitingSwitch { .. } => unreachable_awaiting()?,
        FinalizeDecision::TooEarly {
            retire,
            switched_at,
            remaining,
        } => {
            let message = format!(
                "refusing to {} yet: the apiserver was first seen signing with {} at {}; tokens minted with the old issuer(s) before then may live {} (the longest token lifetime configured), so wait {} more (until {})",
                what_goes(&retire, &drop),
                settings.issuer,
                state::rfc3339(switched_at),
                format_duration(lifetime),
                format_duration(round_up(remaining)),
                state::rfc3339(now + round_up(remaining).as_secs()),
            );
            eprintln!("{WHY_WAIT}");
            bail!("{message}");
        }
        FinalizeDecision::Ready { retire } => retire,
    };
    let options = run.options();
    let mut prepared = change::prepare(root, &settings, Goal::Retire(retire.clone()), &options)?;
    for warning in &prepared.plan.warnings {
        log::warn!("{warning}");
    }
    if !run.json {
        eprintln!("{WHY_WAIT}");
    }
    // The apiserver's own evidence comes before retiring anything: it must answer, serving
    // the configured issuer, with a readable stale-token counter. When it cannot be asked,
    // finalize waits (up to --timeout) and then refuses, changing nothing.
    let stale = wait_for_evidence(
        &mut change::edges(root, &prepared.observed, &options),
        &settings.issuer,
        run,
    )?;
    if stale > 0.0 {
        log::warn!(
            "serviceaccount_stale_tokens_total is {stale} on this apiserver: some clients use tokens past their original expiry; find them in the audit log (authentication.k8s.io/stale-token) before retiring old issuers"
        );
    } else {
        log::info!("serviceaccount_stale_tokens_total is 0 on this apiserver");
    }
    let restart = crate::apiserver::restart::restart_for(
        root,
        observed.distribution,
        run.apiserver.unit.as_deref(),
    );
    let extra = json!({"retire": retire, "drop_audiences": prepared.plan.dropped_audiences, "stale_tokens_total": stale});
    if run.check {
        let plan = &prepared.plan;
        if run.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&result_json(plan, None, &restart, true, extra))?
            );
        } else {
            print_plan(plan, run.diff);
            println!(
                "can be done now: {}",
                what_goes(&retire, &plan.dropped_audiences)
            );
        }
        return Ok(if plan.in_sync() {
            Exit::OK
        } else {
            Exit::PENDING
        });
    }
    let outcome = change::carry_out(root, &settings, &mut prepared, &options)?.outcome;
    let plan = &prepared.plan;
    if run.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result_json(
                plan,
                Some(&outcome),
                &restart,
                false,
                extra
            ))?
        );
    } else {
        print_plan(plan, run.diff);
        print_outcome(plan, &outcome);
        if !retire.is_empty() {
            println!("retired: {}", retire.join(", "));
        }
        if !plan.dropped_audiences.is_empty() {
            println!(
                "removed from --api-audiences: {}",
                plan.dropped_audiences.join(", ")
            );
        }
    }
    Ok(Exit::OK)
}

/// Waits until the local apiserver answers ready, serving `issuer`, with a readable
/// `serviceaccount_stale_tokens_total`; returns its value. Polls every --poll-interval for up
/// to --timeout, saying what it waits for; then fails, and nothing was changed.
fn wait_for_evidence(e: &mut change::Edges, issuer: &str, run: &RunArgs) -> anyhow::Result<f64> {
    let Some(probe) = e.probe.as_mut() else {
        bail!(
            "cannot ask the apiserver whether it serves {issuer} and whether stale tokens are in use ({}): nothing was retired; fix that and run finalize again",
            e.probe_error.clone().unwrap_or_default()
        );
    };
    let options = run.options();
    let patience = Patience {
        timeout: run.apiserver.timeout,
        poll: run.apiserver.poll_interval,
    };
    let mut stale = None;
    let waited = crate::runtime::block_on(ready::wait_until(
        "finalize waits for the apiserver before retiring anything",
        options.clock.as_ref(),
        patience,
        async || {
            let status = probe.check().await;
            if !status.ready {
                return Err(format!("it does not answer ready ({})", status.detail));
            }
            if status.issuer.as_deref() != Some(issuer) {
                return Err(format!(
                    "it serves issuer {} instead of {issuer}",
                    status.issuer.as_deref().unwrap_or("(unreadable)")
                ));
            }
            stale = probe.stale_tokens().await;
            match stale {
                Some(_) => Ok(()),
                None => {
                    Err("its /metrics (serviceaccount_stale_tokens_total) cannot be read".into())
                }
            }
        },
    ));
    match (waited, stale) {
        (Ok(_), Some(n)) => Ok(n),
        (Err(why), _) => bail!(
            "the apiserver's evidence could not be read within {}: {why}; nothing was retired (the old issuers stay accepted): run finalize again once it answers",
            format_duration(run.apiserver.timeout)
        ),
        (Ok(_), None) => {
            bail!("the apiserver's stale-token counter could not be read: nothing was retired")
        }
    }
}

/// "retire X" / "remove Y from --api-audiences" / both.
fn what_goes(retire: &[String], drop: &[String]) -> String {
    let mut parts = Vec::new();
    if !retire.is_empty() {
        parts.push(format!("retire {}", retire.join(", ")));
    }
    if !drop.is_empty() {
        parts.push(format!("remove {} from --api-audiences", drop.join(", ")));
    }
    parts.join(" and ")
}

fn round_up(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

fn unreachable_awaiting() -> anyhow::Result<Vec<String>> {
    bail!("internal error: the switch state was not resolved")
}
