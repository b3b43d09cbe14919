//! The public documents, fetched over HTTPS as a relying party fetches them: the discovery
//! document at `<issuer>/.well-known/openid-configuration` and the configured jwks-uri, both
//! at once, with the agent's usual trust (system store or `SSL_CERT_FILE`, plus `ca-file:`).

use std::time::{Duration, Instant};

use super::local::{AWS_MAX_KEYS_PER_TYPE, Local};
use super::words::{self, list, plural};
use super::{Check, Options};
use crate::publish::verify::{self, Fetched};
use crate::publish::{self, merge};

/// One fetched document and its body (2xx only).
pub type Document = (Fetched, Option<Vec<u8>>);

/// Both documents.
#[derive(Debug, Clone)]
pub struct View {
    /// What the check trusted, for messages.
    pub trust: String,
    pub discovery: Document,
    pub jwks: Document,
}

/// The public part of doctor.
#[derive(Debug, Clone)]
pub enum Facts {
    /// Not attempted; why.
    Skipped(String),
    /// Could not even start (a bad ca-file, the deadline); why.
    Failed(String),
    Fetched(Box<View>),
}

/// What the HTTPS client trusts, in words.
pub fn trust_description(ca_file: Option<&std::path::Path>) -> String {
    let base = match std::env::var_os("SSL_CERT_FILE") {
        Some(f) => format!("SSL_CERT_FILE={}", std::path::Path::new(&f).display()),
        None => "the system certificate store".to_string(),
    };
    match ca_file {
        Some(ca) => format!("{base} and ca-file {}", ca.display()),
        None => base,
    }
}

/// Fetches both documents at once (a current-thread runtime of its own), until `deadline`.
pub fn gather_blocking(
    root: &crate::host::HostRoot,
    local: &Local,
    options: &Options,
    deadline: Instant,
) -> Facts {
    if options.offline {
        return Facts::Skipped("--offline".into());
    }
    let Some(settings) = local.settings() else {
        return Facts::Skipped(
            "no valid configuration: the issuer is unknown (see config.valid)".into(),
        );
    };
    let ca_file = settings.ca_file.as_ref().map(|p| root.path(p));
    let left = deadline.saturating_duration_since(Instant::now());
    // Long enough to measure a slow answer (beyond the 5 s AWS allows), short enough to end.
    let per_request = left.min(options.slow_threshold * 2 + Duration::from_secs(2));
    let client = match publish::http::client(ca_file.as_deref(), per_request) {
        Ok(c) => c,
        Err(e) => return Facts::Failed(local.host_text(&e)),
    };
    let trust = trust_description(settings.ca_file.as_deref());
    let discovery_url = verify::discovery_url(&settings.issuer);
    let fetched = crate::runtime::block_on(async {
        tokio::time::timeout(
            left,
            futures_util::future::join(
                verify::fetch(&client, &discovery_url),
                verify::fetch(&client, &settings.jwks_uri),
            ),
        )
        .await
    });
    match fetched {
        Ok((discovery, jwks)) => Facts::Fetched(Box::new(View {
            trust,
            discovery,
            jwks,
        })),
        Err(_) => Facts::Failed(format!(
            "no answer within doctor's deadline ({})",
            words::duration(options.deadline)
        )),
    }
}

const IDS: [&str; 10] = [
    "public.discovery",
    "public.issuer",
    "public.jwks-uri",
    "public.discovery-content-type",
    "public.jwks",
    "public.jwks-content-type",
    "public.jwks-keys",
    "public.kids",
    "public.cache",
    "public.clock",
];

/// Every check of the public copy.
pub fn evaluate(local: &Local, facts: &Facts, options: &Options, now: i64) -> Vec<Check> {
    let view = match facts {
        Facts::Skipped(reason) => {
            return IDS
                .iter()
                .map(|id| Check::skip(id, reason.clone()))
                .collect();
        }
        Facts::Failed(reason) => {
            let mut out = vec![Check::fail("public.discovery", reason.clone())];
            out.extend(
                IDS[1..]
                    .iter()
                    .map(|id| Check::skip(id, "the public documents were not fetched")),
            );
            return out;
        }
        Facts::Fetched(view) => view,
    };
    let Some(settings) = local.settings() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Discovery.
    let (fetched, body) = &view.discovery;
    let reached = reach_check("public.discovery", fetched, body.is_some(), view);
    let discovery_ok = reached.status != super::Status::Fail && body.is_some();
    let unreachable_skip = reached.status == super::Status::Skip;
    out.push(reached);
    let doc = body
        .as_ref()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
    if !discovery_ok {
        let reason = if unreachable_skip {
            "the discovery document could not be fetched from here (see public.discovery)"
        } else {
            "the discovery document could not be fetched (see public.discovery)"
        };
        for id in [
            "public.issuer",
            "public.jwks-uri",
            "public.discovery-content-type",
        ] {
            out.push(Check::skip(id, reason));
        }
    } else {
        out.push(issuer_check(
            doc.as_ref(),
            body.as_deref().unwrap_or(&[]),
            &settings.issuer,
        ));
        out.push(jwks_uri_check(doc.as_ref(), &settings.jwks_uri));
        out.push(content_type_check("public.discovery-content-type", fetched));
    }
    // JWKS.
    let (fetched, body) = &view.jwks;
    let reached = reach_check("public.jwks", fetched, body.is_some(), view);
    let jwks_ok = reached.status != super::Status::Fail && body.is_some();
    let jwks_skipped = reached.status == super::Status::Skip;
    out.push(speed(reached, fetched, options.slow_threshold));
    if !jwks_ok {
        let reason = if jwks_skipped {
            "the JWKS could not be fetched from here (see public.jwks)"
        } else {
            "the JWKS could not be fetched (see public.jwks)"
        };
        for id in [
            "public.jwks-content-type",
            "public.jwks-keys",
            "public.kids",
        ] {
            out.push(Check::skip(id, reason));
        }
    } else {
        let body = body.as_deref().unwrap_or(&[]);
        out.push(content_type_check("public.jwks-content-type", fetched));
        out.push(jwks_keys_check(body));
        out.push(kids_check(local, body, fetched));
    }
    out.push(cache_check(&view.discovery.0, &view.jwks.0));
    out.push(clock_check(&view.discovery.0, &view.jwks.0, now));
    out
}

fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| url.to_string())
}

fn is_network_unreachable(error: &str) -> bool {
    error.contains("Network is unreachable") || error.contains("No route to host")
}

fn is_tls_error(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("certificate") || e.contains("tls") || e.contains("handshake") || e.contains("ssl")
}

/// Reachable, valid TLS, HTTP 200.
fn reach_check(id: &'static str, fetched: &Fetched, has_body: bool, view: &View) -> Check {
    let url = &fetched.url;
    let publish_fix = "`irsa-agent publish` writes both documents; then make sure the web server or bucket serves them at exactly these URLs";
    if let Some(e) = &fetched.error {
        if is_network_unreachable(e) {
            return Check::skip(
                id,
                format!(
                    "this host cannot reach {} ({e}); check from a machine with internet access: curl -sS {url}",
                    host_of(url)
                ),
            );
        }
        if is_tls_error(e) {
            return Check::fail(
                id,
                format!("{url}: TLS verification failed: {e} (trusting {})", view.trust),
            )
            .fix(format!(
                "serve {} with a certificate from a public CA that is valid for that name (AWS, GCP and Azure trust only those); for a private CA in tests set `ca-file:`",
                host_of(url)
            ));
        }
        return Check::fail(id, format!("{url}: not reachable: {e}")).fix(format!(
            "check DNS and the server for {}: curl -sSv {url}",
            host_of(url)
        ));
    }
    match fetched.status {
        Some(code) if (200..300).contains(&code) && has_body => Check::pass(
            id,
            format!(
                "{url}: HTTP {code} in {}, TLS verified",
                fetched
                    .elapsed
                    .map(|e| format!("{} ms", e.as_millis()))
                    .unwrap_or_else(|| "?".into())
            ),
        ),
        Some(code) => Check::fail(
            id,
            format!("{url}: HTTP {code}: nothing relying parties can use is published there"),
        )
        .fix(publish_fix),
        None => Check::fail(id, format!("{url}: no answer")),
    }
}

/// AWS STS gives up on a JWKS slower than about 5 s.
fn speed(check: Check, fetched: &Fetched, threshold: Duration) -> Check {
    if check.status != super::Status::Pass {
        return check;
    }
    match fetched.elapsed {
        Some(elapsed) if elapsed > threshold => Check::fail(
            "public.jwks",
            format!(
                "{}: answered in {:.1} s, more than {:.1} s: AWS STS gives up on a JWKS that slow (IDPCommunicationError)",
                fetched.url,
                elapsed.as_secs_f64(),
                threshold.as_secs_f64()
            ),
        )
        .fix("serve the documents from static storage or a CDN (S3, CloudFront, Pages, a plain nginx), not from a slow or far origin"),
        Some(elapsed) => Check::pass(
            "public.jwks",
            format!(
                "{}: HTTP {} in {} ms, TLS verified (AWS gives up after {} s)",
                fetched.url,
                fetched.status.unwrap_or(200),
                elapsed.as_millis(),
                threshold.as_secs_f64()
            ),
        ),
        None => check,
    }
}

fn issuer_check(doc: Option<&serde_json::Value>, body: &[u8], configured: &str) -> Check {
    let id = "public.issuer";
    let Some(doc) = doc else {
        let start: String = String::from_utf8_lossy(body).chars().take(60).collect();
        return Check::fail(
            id,
            format!("the discovery document is not JSON (it starts with {start:?})"),
        )
        .fix("`irsa-agent publish` writes it; check what the server returns at that URL");
    };
    let Some(issuer) = doc.get("issuer").and_then(|v| v.as_str()) else {
        return Check::fail(id, "the discovery document has no \"issuer\"")
            .fix("`irsa-agent publish` writes it");
    };
    match words::difference(issuer, configured) {
        None => Check::pass(id, format!("{issuer:?} equals the configured issuer byte for byte")),
        Some(why) => Check::fail(
            id,
            format!(
                "the published issuer {issuer:?} is not the configured {configured:?}: it {why}; AWS, GCP and Azure compare it byte for byte with the tokens' iss and the provider URL, so every token is refused"
            ),
        )
        .fix(format!(
            "`irsa-agent publish` writes the configured issuer; the IAM OIDC provider URL must be exactly {configured:?}"
        )),
    }
}

fn jwks_uri_check(doc: Option<&serde_json::Value>, configured: &str) -> Check {
    let id = "public.jwks-uri";
    let Some(uri) = doc.and_then(|d| d.get("jwks_uri")).and_then(|v| v.as_str()) else {
        return Check::fail(id, "the discovery document has no \"jwks_uri\"")
            .fix("`irsa-agent publish` writes it");
    };
    match words::difference(uri, configured) {
        None => Check::pass(id, format!("points to {uri}")),
        Some(why) => Check::fail(
            id,
            format!(
                "the discovery document points relying parties to {uri:?}, not the configured {configured:?}: it {why}"
            ),
        )
        .fix("`irsa-agent publish` writes the configured jwks-uri"),
    }
}

/// `application/json` or `application/jwk-set+json` (parameters ignored).
fn content_type_check(id: &'static str, fetched: &Fetched) -> Check {
    let fix = "serve it as application/json: `irsa-agent publish` sets that on S3/GCS/Azure objects (an object uploaded by hand gets binary/octet-stream); behind nginx add `default_type application/json;` to its location (/usr/share/doc/irsa-agent/publishing.md)";
    let Some(raw) = fetched.content_type.as_deref() else {
        return Check::warn(
            id,
            "no Content-Type: some relying parties refuse a JWKS or discovery document that is not application/json",
        )
        .fix(fix);
    };
    let media = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" | "application/jwk-set+json" => {
            Check::pass(id, format!("Content-Type {raw}"))
        }
        _ => Check::fail(
            id,
            format!(
                "Content-Type {raw}: relying parties expect application/json (or application/jwk-set+json) and may refuse the document"
            ),
        )
        .fix(fix),
    }
}

/// Each key well-formed, its alg matching its type, at most 100 RSA and 100 EC keys.
fn jwks_keys_check(body: &[u8]) -> Check {
    let id = "public.jwks-keys";
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        let start: String = String::from_utf8_lossy(body).chars().take(60).collect();
        return Check::fail(
            id,
            format!("the JWKS is not JSON (it starts with {start:?})"),
        )
        .fix("`irsa-agent publish` writes it; check what the server returns at that URL");
    };
    let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
        return Check::fail(id, "the JWKS has no \"keys\" list")
            .fix("`irsa-agent publish` writes it");
    };
    let mut rsa = 0;
    let mut ec = 0;
    let mut problems = Vec::new();
    for (i, jwk) in keys.iter().enumerate() {
        let kid = jwk
            .get("kid")
            .and_then(|k| k.as_str())
            .unwrap_or("(no kid)");
        let kty = jwk.get("kty").and_then(|k| k.as_str()).unwrap_or("");
        let alg = jwk.get("alg").and_then(|k| k.as_str());
        match kty {
            "RSA" => rsa += 1,
            "EC" => ec += 1,
            other => problems.push(format!(
                "key {} ({kid}): kty {other:?} is neither RSA nor EC",
                i + 1
            )),
        }
        if let Some(alg) = alg {
            let fits = match kty {
                "RSA" => alg.starts_with("RS") || alg.starts_with("PS"),
                "EC" => {
                    let crv = jwk.get("crv").and_then(|c| c.as_str()).unwrap_or("");
                    matches!(
                        (crv, alg),
                        ("P-256", "ES256") | ("P-384", "ES384") | ("P-521", "ES512")
                    )
                }
                _ => true,
            };
            if !fits {
                problems.push(format!(
                    "key {} ({kid}): alg {alg} does not fit a {kty} key",
                    i + 1
                ));
            }
        }
        if matches!(kty, "RSA" | "EC") && merge::key_from_jwk(jwk).is_none() {
            problems.push(format!(
                "key {} ({kid}): not a valid key, or its kid is not the SHA-256 of its key as kube-apiserver computes it",
                i + 1
            ));
        }
        if jwk
            .get("use")
            .and_then(|u| u.as_str())
            .is_some_and(|u| u != "sig")
        {
            problems.push(format!("key {} ({kid}): \"use\" is not \"sig\"", i + 1));
        }
    }
    let finding = format!(
        "{} ({rsa} RSA, {ec} EC; AWS accepts at most {AWS_MAX_KEYS_PER_TYPE} of each)",
        plural(keys.len(), "key")
    );
    if rsa > AWS_MAX_KEYS_PER_TYPE || ec > AWS_MAX_KEYS_PER_TYPE {
        return Check::fail(id, format!("{finding}: too many, AWS refuses the whole JWKS"))
            .fix("publish only the keys in use: `irsa-agent publish` writes the apiserver's keys, de-duplicated");
    }
    if keys.is_empty() {
        return Check::fail(id, "the JWKS holds no key").fix("`irsa-agent publish`");
    }
    if !problems.is_empty() {
        return Check::fail(
            id,
            format!("{finding}, with {}", plural(problems.len(), "problem")),
        )
        .details(problems)
        .fix("`irsa-agent publish` writes keys exactly as kube-apiserver serves them");
    }
    Check::pass(id, finding)
}

fn kids_check(local: &Local, body: &[u8], fetched: &Fetched) -> Check {
    let id = "public.kids";
    let Some(want) = local.kids() else {
        return Check::skip(id, local.keys_unknown());
    };
    let have = merge::kids_in(body);
    let missing: Vec<String> = want.iter().filter(|k| !have.contains(k)).cloned().collect();
    let extra: Vec<String> = have.iter().filter(|k| !want.contains(k)).cloned().collect();
    if missing.is_empty() && extra.is_empty() {
        return Check::pass(
            id,
            format!("the published kids are this host's keys: {}", list(&want)),
        );
    }
    let cache = match fetched.cached_for() {
        Some(left) if !left.is_zero() => format!(
            "; caches may keep serving this copy for {} more (Cache-Control {:?}, Age {})",
            words::duration(left),
            fetched.cache_control.as_deref().unwrap_or(""),
            fetched.age.unwrap_or(0)
        ),
        _ => String::new(),
    };
    if !missing.is_empty() {
        let signing = local.signing().map(crate::keys::PublicKey::kid);
        let signs = signing.as_ref().filter(|s| missing.contains(s));
        let mut finding = match signs {
            Some(s) if missing.len() == 1 => format!(
                "stale JWKS: it lacks the signing key {s}, so relying parties refuse every new token (InvalidIdentityToken)"
            ),
            Some(s) => format!(
                "stale JWKS: it lacks {}, among them the signing key {s}, so relying parties refuse every new token (InvalidIdentityToken)",
                list(&missing)
            ),
            None => format!(
                "stale JWKS: it lacks {}, so relying parties refuse the tokens signed with {} (InvalidIdentityToken)",
                list(&missing),
                if missing.len() == 1 { "it" } else { "them" }
            ),
        };
        if !extra.is_empty() {
            finding.push_str(&format!("; it still has {}", list(&extra)));
        }
        finding.push_str(&cache);
        return Check::fail(id, finding)
            .fix("`irsa-agent publish`, then wait for caches; `irsa-agent publish --check` shows when the public copy matches");
    }
    Check::warn(
        id,
        format!(
            "the JWKS also publishes {}, which this host's key files do not hold: a retired key still trusted by relying parties, or another control-plane node's key (see running.peers){cache}",
            list(&extra)
        ),
    )
    .fix("`irsa-agent publish` publishes exactly the apiserver's keys (once no token signed by the old key is still valid)")
}

fn describe_cache(f: &Fetched) -> String {
    let age = f.age.map(|a| format!(", Age {a}")).unwrap_or_default();
    match &f.cache_control {
        Some(cc) => format!("{cc:?}{age}"),
        None => format!("no Cache-Control{age}"),
    }
}

fn cache_check(discovery: &Fetched, jwks: &Fetched) -> Check {
    let id = "public.cache";
    let fetched: Vec<&Fetched> = [discovery, jwks]
        .into_iter()
        .filter(|f| f.status.is_some_and(|s| (200..300).contains(&s)))
        .collect();
    if fetched.is_empty() {
        return Check::skip(id, "nothing was fetched");
    }
    let finding = fetched
        .iter()
        .map(|f| {
            format!(
                "{}: {}",
                if std::ptr::eq(*f, jwks) {
                    "JWKS"
                } else {
                    "discovery"
                },
                describe_cache(f)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let day = Duration::from_secs(86_400);
    if fetched.iter().any(|f| f.cache_control.is_none()) {
        return Check::warn(
            id,
            format!("{finding}: without Cache-Control, caches pick their own lifetime (CloudFront keeps objects 24 h by default), so a new key may not be seen for that long"),
        )
        .fix("publish with a Cache-Control (`cache-control: public, max-age=300` is irsa-agent's default) or set it at the CDN");
    }
    if let Some(long) = fetched
        .iter()
        .filter_map(|f| f.cache_control.as_deref().and_then(verify::max_age))
        .max()
        && long > day
    {
        return Check::warn(
            id,
            format!(
                "{finding}: a max-age of {} means a new key reaches relying parties only that long after it is published (rotation waits for it)",
                words::duration(long)
            ),
        )
        .fix("use a shorter max-age, e.g. `cache-control: public, max-age=300` on the publish target");
    }
    Check::pass(id, finding)
}

fn clock_check(discovery: &Fetched, jwks: &Fetched, now: i64) -> Check {
    let id = "public.clock";
    if discovery.status.is_none() && jwks.status.is_none() {
        return Check::skip(id, "nothing was fetched");
    }
    let Some((date, host)) = [jwks, discovery]
        .into_iter()
        .find_map(|f| f.date.as_deref().map(|d| (d, host_of(&f.url))))
    else {
        return Check::skip(id, "no Date header in the answers: cannot compare clocks");
    };
    let Some(theirs) = words::parse_http_date(date) else {
        return Check::skip(id, format!("unreadable Date header {date:?}"));
    };
    let skew = now - theirs;
    let ahead = if skew >= 0 { "ahead of" } else { "behind" };
    let amount = words::duration(Duration::from_secs(skew.unsigned_abs()));
    let finding = format!("this host's clock is {amount} {ahead} {host}'s (Date: {date})");
    let fix = "sync this host's clock: timedatectl set-ntp true (systemd-timesyncd or chrony)";
    match skew.unsigned_abs() {
        0..=30 => Check::pass(
            id,
            format!("this host's clock agrees with {host}'s (less than 30s apart)"),
        ),
        31..=300 => Check::warn(
            id,
            format!(
                "{finding}: tokens minted here look {} to relying parties",
                if skew > 0 {
                    "issued in the future"
                } else {
                    "older than they are"
                }
            ),
        )
        .fix(fix),
        _ => Check::fail(
            id,
            format!(
                "{finding}: tokens minted here are {} for relying parties",
                if skew > 0 {
                    "not yet valid"
                } else {
                    "expired too early"
                }
            ),
        )
        .fix(fix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn fetched(content_type: Option<&str>, date: Option<&str>) -> Fetched {
        Fetched {
            url: "https://oidc.example.com/a/openid/v1/jwks".into(),
            status: Some(200),
            error: None,
            content_type: content_type.map(String::from),
            cache_control: Some("public, max-age=300".into()),
            age: None,
            matches: verify::Match::NotFetched,
            kids: Vec::new(),
            jwks_uri: None,
            elapsed: Some(Duration::from_millis(20)),
            date: date.map(String::from),
        }
    }

    #[test]
    fn content_types() {
        for (ct, status) in [
            (Some("application/json"), Status::Pass),
            (Some("application/json; charset=utf-8"), Status::Pass),
            (Some("application/jwk-set+json"), Status::Pass),
            (Some("binary/octet-stream"), Status::Fail),
            (Some("application/octet-stream"), Status::Fail),
            (Some("text/html"), Status::Fail),
            (None, Status::Warn),
        ] {
            assert_eq!(
                content_type_check("public.jwks-content-type", &fetched(ct, None)).status,
                status,
                "{ct:?}"
            );
        }
    }

    #[test]
    fn clock_skew_levels() {
        let now = 1_795_000_000;
        let at = |secs: i64| {
            let f = fetched(Some("application/json"), Some(&http_date(now - secs)));
            clock_check(&f, &f, now).status
        };
        assert_eq!(at(0), Status::Pass);
        assert_eq!(at(-20), Status::Pass);
        assert_eq!(at(120), Status::Warn);
        assert_eq!(at(-900), Status::Fail);
    }

    /// `Sun, 06 Nov 1994 08:49:37 GMT` (httpdate, independent of the parser in words).
    fn http_date(secs: i64) -> String {
        let secs = u64::try_from(secs).expect("a time after 1970");
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
    }

    #[test]
    fn unreachable_networks_are_skips_tls_problems_are_failures() {
        assert!(is_network_unreachable(
            "error sending request: Network is unreachable (os error 101)"
        ));
        assert!(!is_network_unreachable("Connection refused (os error 111)"));
        assert!(is_tls_error("invalid peer certificate: UnknownIssuer"));
        assert!(!is_tls_error("Connection refused (os error 111)"));
    }
}
