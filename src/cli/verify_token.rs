//! `irsa-agent verify-token [TOKEN|-]`: decode a token, verify it as a relying party would,
//! and explain every reason it would be refused.

use std::io::Read as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args as ClapArgs;
use serde_json::json;

use super::{Exit, Global};
use crate::apiserver::probe::{self, KubeconfigProbe};
use crate::config::{self, parse_duration};
use crate::doctor::token::{self, Expect, KeySet, LocalKey};
use crate::doctor::{self, Status, policy, render_checks};
use crate::keys::{self, jwks};
use crate::publish;

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
The token comes from the argument, from standard input (`-`, or no argument with input piped), \
or, with --namespace and --service-account, from the apiserver's TokenRequest API through the \
host's admin kubeconfig (with --audience and --duration). Prefer `-` over pasting a token on the \
command line, where other users can see it. The token itself is never printed.

It is checked like AWS STS checks it: a signed JWT, an accepted algorithm, its kid in the JWKS \
published at the configured jwks-uri (or this host's key files with --local), the algorithm \
fitting the key, the signature, iss equal to the configured issuer byte for byte, aud containing \
--audience, and exp/nbf against this host's clock. Each failure is explained (stale JWKS, \
trailing slash or case in the issuer, audience typos such as sts.amazon.com, clock skew). \
--trust-policy FILE also evaluates an IAM trust policy's conditions on <provider>:sub and \
<provider>:aud.

Exit status: 0 a relying party would accept the token (and the trust policy allows it); 1 not.")]
pub struct Args {
    /// The token, or `-` to read it from standard input.
    #[arg(value_name = "TOKEN|-", conflicts_with_all = ["namespace", "service_account"])]
    pub token: Option<String>,

    /// Mint a token for a service account of this namespace (TokenRequest, admin kubeconfig).
    #[arg(long, short = 'n', value_name = "NS", requires = "service_account")]
    pub namespace: Option<String>,

    /// Mint a token for this service account.
    #[arg(long, value_name = "SA", requires = "namespace")]
    pub service_account: Option<String>,

    /// The audience the relying party expects (and the minted token gets).
    #[arg(long, value_name = "AUD", default_value = policy::AWS_AUDIENCE)]
    pub audience: String,

    /// Lifetime of a minted token (kube-apiserver's minimum is 10m).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,

    /// Verify against this host's key files instead of the published JWKS.
    #[arg(long)]
    pub local: bool,

    /// The issuer the relying party expects [default: the configured issuer].
    #[arg(long, value_name = "URL")]
    pub issuer: Option<String>,

    /// Also evaluate this IAM trust policy (JSON) against the token.
    #[arg(long, value_name = "FILE")]
    pub trust_policy: Option<std::path::PathBuf>,

    /// Print one JSON object (see README, "verify-token --json") instead of text.
    #[arg(long)]
    pub json: bool,

    /// Timeout for fetching the published JWKS.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// "Now" as Unix seconds (tests).
    #[arg(long, hide = true, value_name = "SECONDS")]
    pub now: Option<i64>,

    /// The apiserver URL for TokenRequest [default: from the admin kubeconfig].
    #[arg(
        long,
        hide = true,
        value_name = "URL",
        env = "IRSA_AGENT_APISERVER_URL"
    )]
    pub apiserver_url: Option<String>,
}

/// This host's verification keys (kid, host path of the file), in flag order.
fn local_keys(
    global: &Global,
    distribution: config::Distribution,
) -> anyhow::Result<Vec<(keys::PublicKey, String)>> {
    let observed = crate::apiserver::observe(&global.root, distribution)?;
    let mut out = Vec::new();
    for file in &observed.flags.key_files {
        let parsed = keys::load_verification_file(&global.root.path(file)).map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.to_string()
                    .replace(&global.root.root().display().to_string(), "")
            )
        })?;
        out.extend(parsed.keys.into_iter().map(|k| (k, file.clone())));
    }
    Ok(out)
}

fn read_token(args: &Args) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::IsTerminal as _;
    match args.token.as_deref() {
        Some("-") | None => {
            if args.token.is_none() && std::io::stdin().is_terminal() {
                bail!(
                    "no token: give it as an argument, pipe it in (`verify-token - < token`), or mint one with --namespace and --service-account"
                );
            }
            // A token is a few KiB; never read an endless stream.
            const TOKEN_CAP: u64 = 1 << 20;
            let mut text = zeroize::Zeroizing::new(String::new());
            std::io::stdin()
                .take(TOKEN_CAP + 1)
                .read_to_string(&mut text)
                .context("cannot read the token from standard input")?;
            if text.len() as u64 > TOKEN_CAP {
                bail!("standard input holds more than 1 MiB: that is not a token");
            }
            Ok(text)
        }
        Some(t) => Ok(zeroize::Zeroizing::new(t.to_string())),
    }
}

fn mint(
    global: &Global,
    args: &Args,
    ns: &str,
    sa: &str,
    distribution: config::Distribution,
) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let observed = crate::apiserver::observe(&global.root, distribution)?;
    let (kubeconfig, url) = probe::target(&observed);
    let url = args.apiserver_url.clone().or(url);
    let probe = KubeconfigProbe::new(&global.root, &kubeconfig, url, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot ask the apiserver for a token: {e}"))?;
    let seconds = args.duration.as_secs().max(600);
    log::info!(
        "requesting a token for {ns}/{sa} (audience {}, {} s) from {}",
        args.audience,
        seconds,
        probe.server()
    );
    probe
        .token_request(ns, sa, std::slice::from_ref(&args.audience), seconds)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn run(global: &Global, args: Args) -> anyhow::Result<Exit> {
    let loaded = config::load(&global.root, global.config.as_deref());
    let settings = match (&loaded, &args.issuer) {
        (Ok(l), _) => Some(l.settings.clone()),
        (Err(_), Some(_)) => None,
        (Err(e), None) => bail!("{e}\n(or give the expected issuer with --issuer)"),
    };
    let distribution = settings
        .as_ref()
        .map_or(config::Distribution::Auto, |s| s.distribution);
    let issuer = args
        .issuer
        .clone()
        .or_else(|| settings.as_ref().map(|s| s.issuer.clone()))
        .unwrap_or_default();
    let jwks_uri = match &settings {
        Some(s) if args.issuer.as_ref().is_none_or(|i| *i == s.issuer) => s.jwks_uri.clone(),
        _ => jwks::default_jwks_uri(&issuer),
    };
    let raw = match (&args.namespace, &args.service_account) {
        (Some(ns), Some(sa)) => mint(global, &args, ns, sa, distribution)?,
        _ => read_token(&args)?,
    };
    // The token's shape first: a malformed token is said to be one, without fetching keys
    // (and without failing on a JWKS that cannot be fetched).
    let malformed = token::decode(&token::clean(&raw).0).is_err();
    // This host's keys: the key set with --local, and the explanation of an unknown kid.
    let local = local_keys(global, distribution);
    let keyset = if malformed {
        KeySet {
            source: "no keys (the token is malformed, so none were fetched)".to_string(),
            jwks: Vec::new(),
            published: false,
        }
    } else if args.local {
        let local = local
            .as_ref()
            .map_err(|e| anyhow::anyhow!("cannot read this host's key files: {e}"))?;
        let unique = keys::dedup(&local.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
        KeySet {
            source: "this host's key files".to_string(),
            jwks: unique
                .iter()
                .filter_map(|k| serde_json::from_str(&jwks::jwk_json(k)).ok())
                .collect(),
            published: false,
        }
    } else {
        let ca = settings
            .as_ref()
            .and_then(|s| s.ca_file.as_ref())
            .map(|p| global.root.path(p));
        let client =
            publish::http::client(ca.as_deref(), args.timeout).map_err(|e| anyhow::anyhow!(e))?;
        log::info!("fetching the published JWKS from {jwks_uri}");
        let (fetched, body) = crate::runtime::block_on(publish::verify::fetch(&client, &jwks_uri));
        let Some(body) = body else {
            bail!(
                "cannot fetch the published JWKS from {jwks_uri}: {} (use --local to check against this host's key files)",
                fetched
                    .error
                    .unwrap_or_else(|| format!("HTTP {}", fetched.status.unwrap_or(0)))
            );
        };
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .with_context(|| format!("the JWKS at {jwks_uri} is not JSON"))?;
        KeySet {
            source: format!("the published JWKS at {jwks_uri}"),
            jwks: doc
                .get("keys")
                .and_then(|k| k.as_array())
                .cloned()
                .unwrap_or_default(),
            published: true,
        }
    };
    let local_kids: Vec<LocalKey> = local
        .as_ref()
        .map(|keys| {
            keys.iter()
                .map(|(k, file)| LocalKey {
                    kid: k.kid(),
                    file: file.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let expect = Expect {
        issuer: issuer.clone(),
        audience: args.audience.clone(),
    };
    let now = args.now.unwrap_or_else(doctor::unix_now);
    let mut outcome = token::verify(&raw, &keyset, &local_kids, &expect, now);
    if let Some(path) = &args.trust_policy {
        let text = crate::fs::read_to_string(path)
            .with_context(|| format!("cannot read the trust policy {}", path.display()))?;
        match &outcome.claims {
            Some(claims) => outcome.checks.extend(policy::evaluate(&text, claims)),
            None => outcome.checks.push(doctor::Check::skip(
                "policy.verdict",
                "the token could not be decoded",
            )),
        }
    }
    let ok = !outcome.checks.iter().any(|c| c.status == Status::Fail);
    if args.json {
        let doc = json!({
            "ok": ok,
            "keys": keyset.source,
            "expected": {"issuer": expect.issuer, "audience": expect.audience},
            "header": outcome.header,
            "claims": outcome.claims,
            "checks": outcome.checks,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        if let Some(claims) = &outcome.claims {
            let field = |k: &str| match claims.get(k) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => "(none)".to_string(),
            };
            println!(
                "token: iss {}, sub {}, aud {}",
                field("iss"),
                field("sub"),
                token::audiences(claims).join(", ")
            );
        }
        println!(
            "checked against {} (expected issuer {}, audience {})",
            keyset.source, expect.issuer, expect.audience
        );
        print!("{}", render_checks(&outcome.checks));
        let fails: Vec<&str> = outcome
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.id)
            .collect();
        if ok {
            println!(
                "ACCEPTED: a relying party trusting {issuer} for audience {} would accept this token",
                expect.audience
            );
        } else {
            println!(
                "REFUSED: {} problem{} ({})",
                fails.len(),
                if fails.len() == 1 { "" } else { "s" },
                fails.join(", ")
            );
        }
    }
    Ok(if ok { Exit::OK } else { Exit::FAILURE })
}
