//! `irsa-agent publish [--check]`: publish the discovery document and JWKS once, then check
//! the public copy.

use std::time::Duration;

use anyhow::bail;
use clap::Args as ClapArgs;

use super::{Exit, Global};
use crate::config::{self, format_duration};
use crate::publish::{self, DocReport, Outcome, Publication, TargetReport, verify};

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Reads the apiserver's service-account keys, renders the JWKS and the discovery document once, \
and writes them to every `publish:` target (JWKS first, then discovery; only when the bytes \
change; conditional writes, merged and retried on a conflict). Then fetches \
<issuer>/.well-known/openid-configuration and the jwks-uri over HTTPS and reports whether the \
public copy matches, with its Cache-Control and Age.

The public check is skipped with --no-verify or `public-check: false` in the configuration \
(while the issuer's URL is not served yet: DNS or the CDN to come); it then says so.

Exit status: 0 published and the public copy matches (or was not checked, as asked); 1 error; \
2 (--check only) a target or the public copy differs; 3 published, but the public copy is \
unreachable, stale (other keys or fields) or served with a Content-Type relying parties refuse: \
AWS STS would not accept tokens yet.")]
pub struct Args {
    /// Change nothing: compare every target and the public copy with what would be published.
    #[arg(long)]
    pub check: bool,

    /// Skip fetching the public copy (e.g. before DNS or the CDN exist); the configuration's
    /// `public-check: false` does the same for every run.
    #[arg(long)]
    pub no_verify: bool,

    /// Timeout for each request of the public check.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

fn kids(label: &str, kids: &[String]) -> Option<String> {
    (!kids.is_empty()).then(|| format!("{label} {}", kids.join(", ")))
}

fn describe_doc(doc: &DocReport) -> String {
    let mut details: Vec<String> = [
        kids("added kid", &doc.added_kids),
        kids("removed kid", &doc.removed_kids),
        kids(
            "kept kid written concurrently by another writer:",
            &doc.merged_kids,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    if doc.conflicts > 0 {
        details.push(format!(
            "{} conflicting write{} retried",
            doc.conflicts,
            if doc.conflicts == 1 { "" } else { "s" }
        ));
    }
    let state = match &doc.outcome {
        Outcome::Unchanged => "up to date".to_string(),
        Outcome::Created => "created".to_string(),
        Outcome::Updated => "updated".to_string(),
        Outcome::Missing => "MISSING".to_string(),
        Outcome::Differs(why) => format!("DIFFERS: {}", why.join("; ")),
        Outcome::Skipped(why) => format!("skipped: {why}"),
        Outcome::Failed(why) => format!("FAILED: {why}"),
    };
    let details = if details.is_empty() || matches!(doc.outcome, Outcome::Differs(_)) {
        String::new()
    } else {
        format!(" ({})", details.join("; "))
    };
    format!("{}: {state}{details}", doc.key)
}

fn print_target(report: &TargetReport) {
    println!("{}", report.target);
    println!("  jwks       {}", describe_doc(&report.jwks));
    println!("  discovery  {}", describe_doc(&report.discovery));
    for extra in &report.extras {
        println!("  extra      {}", describe_doc(extra));
    }
    for note in &report.notes {
        println!("  note: {note}");
    }
}

fn describe_fetched(f: &verify::Fetched) -> String {
    let state = match (&f.error, &f.matches) {
        (Some(e), _) => format!("UNREACHABLE: {e}"),
        (None, verify::Match::Exact) => "matches byte for byte".to_string(),
        (None, verify::Match::SameMeaning) => "same keys and fields, other bytes".to_string(),
        (None, verify::Match::Differs(why)) => format!("DIFFERS: {}", why.join("; ")),
        (None, verify::Match::NotFetched) => "not fetched".to_string(),
    };
    let mut meta = Vec::new();
    if let Some(cc) = &f.cache_control {
        meta.push(format!("Cache-Control {cc:?}"));
    }
    if let Some(age) = f.age {
        meta.push(format!("Age {age}s"));
    }
    if !f.is_ok()
        && f.error.is_none()
        && let Some(left) = f.cached_for()
        && !left.is_zero()
    {
        meta.push(format!(
            "a cache may serve the old copy {} more",
            format_duration(left)
        ));
    }
    let meta = if meta.is_empty() {
        String::new()
    } else {
        format!(" ({})", meta.join(", "))
    };
    format!("{}: {state}{meta}", f.url)
}

/// Adds the keys the running apiserver still serves but the key files no longer hold (a key
/// file replaced before the apiserver's restart: until then the old key still signs). Without
/// an admin kubeconfig or a reachable apiserver the key files' keys are published as they are.
fn with_live_keys(
    global: &Global,
    settings: &config::Settings,
    publication: Publication,
) -> Publication {
    let live = crate::apiserver::observe(&global.root, settings.distribution)
        .map_err(|e| e.to_string())
        .and_then(|observed| {
            crate::apiserver::probe::served_keys(
                &global.root,
                &observed,
                None,
                Duration::from_secs(5),
            )
        });
    let live = match live {
        Ok(keys) => keys,
        Err(e) => {
            log::debug!("not asking the running apiserver for its keys: {e}");
            return publication;
        }
    };
    let mut keys = publication.keys.clone();
    let added = crate::keys::add_missing(&mut keys, live);
    if added.is_empty() {
        return publication;
    }
    log::warn!(
        "also publishing kid(s) {}: the running apiserver still verifies with them, although the key files no longer hold them (restart it, then publish again to drop them)",
        added.join(", ")
    );
    Publication::new(&settings.issuer, &settings.jwks_uri, &keys)
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let loaded = config::load(&global.root, global.config.as_deref())?;
    for warning in &loaded.warnings {
        log::warn!("{warning}");
    }
    let settings = &loaded.settings;
    if settings.publish.is_empty() && !args.check {
        bail!(
            "no `publish:` targets in the configuration; add one (e.g. `publish: [{{type: directory, path: /srv/oidc}}]`, see /usr/share/doc/irsa-agent/publishing.md), or run `publish --check` to check only the public copy"
        );
    }
    log::info!("reading the apiserver's service-account keys");
    let publication = Publication::from_host(
        &global.root,
        settings,
        crate::rotation::published_ahead(&global.root),
    )?;
    let publication = with_live_keys(global, settings, publication);
    log::info!(
        "{} key{} to publish for {}: {}",
        publication.keys.len(),
        if publication.keys.len() == 1 { "" } else { "s" },
        settings.issuer,
        publication.kids().join(", ")
    );
    let env = publish::Environment {
        root: global.root.clone(),
        ca_file: settings.ca_file.as_ref().map(|p| global.root.path(p)),
    };
    crate::runtime::block_on(async {
        let publishers = publish::publishers(settings, &env)?;
        for p in &publishers {
            log::info!(
                "{} {} (JWKS at {}, discovery at {})",
                if args.check {
                    "checking"
                } else {
                    "publishing to"
                },
                p.name(),
                p.layout.jwks_key,
                p.layout.discovery_key
            );
        }
        let reports = if args.check {
            publish::check_all(&publishers, &publication).await
        } else {
            publish::publish_all(&publishers, &publication).await
        };
        for report in &reports {
            print_target(report);
        }
        let failed = reports.iter().any(TargetReport::failed);
        let differs = reports.iter().any(|r| !r.in_sync());
        let mut public_error = false;
        let mut public_differs = false;
        if !args.no_verify && !settings.public_check {
            println!("public copy");
            println!(
                "  not checked: `public-check: false` in the configuration (set it to true, or remove it, once {} is served)",
                verify::discovery_url(&settings.issuer)
            );
        }
        if args.no_verify {
            println!("public copy");
            println!("  not checked (--no-verify)");
        }
        if !args.no_verify && settings.public_check {
            log::info!(
                "fetching the public copy: {} and {}",
                verify::discovery_url(&settings.issuer),
                settings.jwks_uri
            );
            let client = publish::http::client(env.ca_file.as_deref(), args.timeout)
                .map_err(|e| anyhow::anyhow!(e))?;
            let public = verify::verify(&client, &publication).await;
            println!("public copy");
            println!("  {}", describe_fetched(&public.discovery));
            println!("  {}", describe_fetched(&public.jwks));
            if let Some(jwks_uri) = &public.discovery.jwks_uri
                && jwks_uri != &settings.jwks_uri
            {
                println!(
                    "  note: the public discovery document points relying parties to {jwks_uri}, not to the configured {}",
                    settings.jwks_uri
                );
            }
            public_error = public.has_errors();
            public_differs = !public.matches();
            if !args.check && public_differs {
                match public.stale_for() {
                    Some(left) if !left.is_zero() => log::warn!(
                        "the public copy is not updated yet; caches may serve the old one for up to {} more",
                        format_duration(left)
                    ),
                    _ => log::warn!(
                        "the public copy does not match what was published: check that {} is served from the target(s) above",
                        verify::discovery_url(&settings.issuer)
                    ),
                }
            }
        }
        if !args.check && !failed && public_differs {
            eprintln!(
                "published, but the public copy is {}: relying parties (AWS STS) would refuse tokens until {} serves what was published (exit {}; `--no-verify` or `public-check: false` while the URL is not served yet)",
                if public_error {
                    "unreachable"
                } else {
                    "not what was published"
                },
                verify::discovery_url(&settings.issuer),
                Exit::PUBLIC_COPY.0
            );
        }
        Ok::<Exit, anyhow::Error>(if failed || (args.check && public_error) {
            Exit::FAILURE
        } else if args.check && (differs || public_differs) {
            Exit::PENDING
        } else if public_differs {
            Exit::PUBLIC_COPY
        } else {
            Exit::OK
        })
    })
}
