//! `irsa-agent check-config`: validate the configuration and show what is in effect.

use clap::Args as ClapArgs;
use serde_json::json;

use super::{Exit, Global};
use crate::config::{self, PublishTarget, format_duration};

#[derive(Debug, ClapArgs)]
#[command(
    after_help = "Exits 0 when the configuration is valid (warnings included), 1 when it is not; \
every problem of every file is listed at once."
)]
pub struct Args {
    /// Print the settings as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let loaded = config::load(&global.root, global.config.as_deref())?;
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    let s = &loaded.settings;
    // What the installed service could not do with these settings (its sandbox).
    let host_warnings = crate::unit::sandbox_warnings(&global.root, s);
    for warning in &host_warnings {
        log::warn!("{warning}");
    }
    if args.json {
        let targets: Vec<_> = s
            .publish
            .iter()
            .map(|t| json!({"type": t.type_name(), "target": t.describe()}))
            .collect();
        let doc = json!({
            "issuer": s.issuer,
            "jwks-uri": s.jwks_uri,
            "distribution": s.distribution.name(),
            "publish": targets,
            "public-check": s.public_check,
            "rotation": {
                "enabled": s.rotation.enabled,
                "every": format_duration(s.rotation.every),
                "key-type": s.rotation.key_type.name(),
                "propagation-wait": format_duration(s.rotation.propagation_wait),
                "cdn-ttl": format_duration(s.rotation.cdn_ttl),
                "token-lifetime": format_duration(s.rotation.token_lifetime),
                "drain-margin": format_duration(s.rotation.drain_margin),
            },
            "run": {
                "resync-interval": format_duration(s.run.resync_interval),
                "debounce": format_duration(s.run.debounce),
                "retry-max": format_duration(s.run.retry_max),
                "publish-timeout": format_duration(s.run.publish_timeout),
                "metrics-textfile": s.run.metrics_textfile,
                "metrics-listen": s.run.metrics_listen.map(|a| a.to_string()),
                "apply-issuer": s.run.apply_issuer,
                "finalize": s.run.finalize,
            },
            "webhook": s.webhook.to_json(),
            "backups": {
                "keep": s.backups.keep,
                "max-age": format_duration(s.backups.max_age),
            },
            "sources": s.sources,
            "warnings": loaded.warnings.iter().map(ToString::to_string).chain(host_warnings.iter().cloned()).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(Exit::OK);
    }
    println!(
        "configuration is valid ({} file{})",
        s.sources.len(),
        if s.sources.len() == 1 { "" } else { "s" }
    );
    for source in &s.sources {
        println!("  read {}", source.display());
    }
    println!("issuer:        {}", s.issuer);
    println!("jwks-uri:      {}", s.jwks_uri);
    println!("distribution:  {}", s.distribution);
    if s.publish.is_empty() {
        println!("publish:       (no targets)");
    }
    for target in &s.publish {
        let extra = match target {
            PublishTarget::S3 {
                endpoint: Some(e), ..
            } => format!(" via {e}"),
            _ => String::new(),
        };
        println!("publish:       {}{extra}", target.describe());
    }
    println!(
        "public check:  {}",
        if s.public_check {
            "on (publish and the daemon fetch the documents over HTTPS)"
        } else {
            "off (public-check: false)"
        }
    );
    println!(
        "daemon:        {}",
        if s.run.apply_issuer {
            "publishes, and applies `issuer:` to the apiserver at once (restarting it)"
        } else {
            "publishes; apiserver changes wait for `irsa-agent apply` (run.apply-issuer: false)"
        }
    );
    println!(
        "rotation:      {}",
        if s.rotation.enabled {
            format!(
                "every {} ({})",
                format_duration(s.rotation.every),
                s.rotation.key_type.name()
            )
        } else {
            "disabled".to_string()
        }
    );
    let w = &s.webhook;
    println!(
        "webhook:       {}",
        if w.enabled {
            format!(
                "serves {} (failure policy {}, skips {})",
                w.url(),
                w.failure_policy.name(),
                if w.defaults.skip_namespaces.is_empty() {
                    "no namespace".to_string()
                } else {
                    w.defaults.skip_namespaces.join(", ")
                }
            )
        } else {
            "off (webhook.enabled: false)".to_string()
        }
    );
    Ok(Exit::OK)
}
