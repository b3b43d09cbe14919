//! Checking the public copy from the outside, as a relying party sees it.
//!
//! Fetches `<issuer>/.well-known/openid-configuration` and the jwks-uri over HTTPS (trust:
//! [`super::http`]) and compares them with what should be published: byte for byte, else by
//! meaning (same issuer, jwks-uri and algorithms; same set of kids). Each answer's
//! `Cache-Control` and `Age` are kept, so a caller (rotation) can tell how long a cache may
//! still serve an old copy ([`PublicReport::stale_for`]) and wait for propagation instead of
//! guessing.

use std::time::Duration;

use super::{Publication, merge};

/// How a fetched document compares with the expected one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// Byte for byte.
    Exact,
    /// Same meaning (same kids, same discovery fields), other bytes.
    SameMeaning,
    /// Different; the reasons (including a non-2xx status).
    Differs(Vec<String>),
    /// Not fetched (an error; see [`Fetched::error`]).
    NotFetched,
}

/// One fetched document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub url: String,
    pub status: Option<u16>,
    /// Network or TLS error.
    pub error: Option<String>,
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    /// The `Age` header: seconds the answer spent in a cache.
    pub age: Option<u64>,
    pub matches: Match,
    /// The kids found (JWKS only).
    pub kids: Vec<String>,
    /// The `jwks_uri` the public discovery document names (discovery only).
    pub jwks_uri: Option<String>,
    /// How long the request took, from sending to the last body byte (what a relying party
    /// waits; AWS STS gives up after about 5 s).
    pub elapsed: Option<Duration>,
    /// The `Date` header (the answering server's clock).
    pub date: Option<String>,
}

impl Fetched {
    fn new(url: &str) -> Self {
        Fetched {
            url: url.to_string(),
            status: None,
            error: None,
            content_type: None,
            cache_control: None,
            age: None,
            matches: Match::NotFetched,
            kids: Vec::new(),
            jwks_uri: None,
            elapsed: None,
            date: None,
        }
    }

    /// Is what a relying party needs (exactly, or the same meaning).
    pub fn is_ok(&self) -> bool {
        matches!(self.matches, Match::Exact | Match::SameMeaning)
    }

    /// What is wrong with it for a relying party, one line naming the URL (`None` when it is
    /// what they need).
    pub fn problem(&self) -> Option<String> {
        let state = match (&self.error, &self.matches) {
            (Some(e), _) => format!("UNREACHABLE: {e}"),
            (None, Match::Exact | Match::SameMeaning) => return None,
            (None, Match::Differs(why)) => format!("DIFFERS: {}", why.join("; ")),
            (None, Match::NotFetched) => "not fetched".to_string(),
        };
        Some(format!("{}: {state}", self.url))
    }

    /// How much longer the cache that answered may serve this copy: max-age minus Age.
    pub fn cached_for(&self) -> Option<Duration> {
        let max_age = max_age(self.cache_control.as_deref()?)?;
        Some(max_age.saturating_sub(Duration::from_secs(self.age.unwrap_or(0))))
    }
}

/// Both public documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicReport {
    pub discovery: Fetched,
    pub jwks: Fetched,
}

impl PublicReport {
    /// Both documents are what relying parties should see.
    pub fn matches(&self) -> bool {
        self.discovery.is_ok() && self.jwks.is_ok()
    }
    /// A document could not be fetched at all (network, TLS).
    pub fn has_errors(&self) -> bool {
        self.discovery.error.is_some() || self.jwks.error.is_some()
    }
    /// The longest time a cache may still serve an outdated copy (`None` when everything
    /// matches, or when no answer said how long it may be cached).
    pub fn stale_for(&self) -> Option<Duration> {
        [&self.discovery, &self.jwks]
            .into_iter()
            .filter(|f| !f.is_ok())
            .filter_map(Fetched::cached_for)
            .max()
    }
    /// The public JWKS holds every one of `kids` (rotation: "the new key is visible").
    pub fn jwks_has(&self, kids: &[String]) -> bool {
        kids.iter().all(|k| self.jwks.kids.contains(k))
    }
}

/// `max-age` (or `s-maxage`, what shared caches obey) of a Cache-Control value.
pub fn max_age(cache_control: &str) -> Option<Duration> {
    let mut max_age = None;
    let mut s_maxage = None;
    for directive in cache_control.split(',') {
        let directive = directive.trim().to_ascii_lowercase();
        if let Some(v) = directive.strip_prefix("s-maxage=") {
            s_maxage = v.trim_matches('"').parse::<u64>().ok();
        } else if let Some(v) = directive.strip_prefix("max-age=") {
            max_age = v.trim_matches('"').parse::<u64>().ok();
        } else if directive == "no-store" || directive == "no-cache" {
            max_age = Some(0);
        }
    }
    s_maxage.or(max_age).map(Duration::from_secs)
}

/// GETs `url` (as a relying party: `Accept: application/json`), keeping the headers that
/// matter and the time it took; returns the body of a 2xx answer.
pub async fn fetch(client: &reqwest::Client, url: &str) -> (Fetched, Option<Vec<u8>>) {
    let mut out = Fetched::new(url);
    let started = std::time::Instant::now();
    let response = match client
        .get(url)
        .header("Accept", "application/json")
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            let timed_out = e.is_timeout();
            let chain = super::store::error_chain(&e.without_url());
            out.error = Some(if timed_out {
                format!("timed out: {chain}")
            } else {
                chain
            });
            return (out, None);
        }
    };
    out.status = Some(response.status().as_u16());
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    out.content_type = header("content-type");
    out.cache_control = header("cache-control");
    out.age = header("age").and_then(|v| v.trim().parse().ok());
    out.date = header("date");
    let status = response.status();
    let body = match response.bytes().await {
        Ok(b) => b.to_vec(),
        Err(e) => {
            out.error = Some(super::store::error_chain(&e));
            return (out, None);
        }
    };
    out.elapsed = Some(started.elapsed());
    if !status.is_success() {
        out.matches = Match::Differs(vec![format!("answered HTTP {status}")]);
        return (out, None);
    }
    (out, Some(body))
}

fn compare_discovery(body: &[u8], publication: &Publication, out: &mut Fetched) {
    if body == publication.documents.discovery.as_bytes() {
        out.matches = Match::Exact;
    }
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        out.matches = Match::Differs(vec!["is not JSON".into()]);
        return;
    };
    out.jwks_uri = doc
        .get("jwks_uri")
        .and_then(|v| v.as_str())
        .map(String::from);
    if out.matches == Match::Exact {
        return;
    }
    let expected: serde_json::Value =
        serde_json::from_str(&publication.documents.discovery).unwrap_or_default();
    let mut reasons = Vec::new();
    for field in [
        "issuer",
        "jwks_uri",
        "id_token_signing_alg_values_supported",
        "response_types_supported",
        "subject_types_supported",
    ] {
        if doc.get(field) != expected.get(field) {
            reasons.push(format!(
                "{field} is {}, should be {}",
                doc.get(field)
                    .map_or("missing".to_string(), ToString::to_string),
                expected
                    .get(field)
                    .map_or("missing".to_string(), ToString::to_string),
            ));
        }
    }
    out.matches = if reasons.is_empty() {
        Match::SameMeaning
    } else {
        Match::Differs(reasons)
    };
}

fn compare_jwks(body: &[u8], publication: &Publication, out: &mut Fetched) {
    out.kids = merge::kids_in(body);
    if body == publication.documents.jwks.as_bytes() {
        out.matches = Match::Exact;
        return;
    }
    let mut want: Vec<&String> = publication.kids().iter().collect();
    let mut have: Vec<&String> = out.kids.iter().collect();
    want.sort();
    have.sort();
    out.matches = if want == have && !want.is_empty() {
        Match::SameMeaning
    } else {
        Match::Differs(vec![merge::describe_jwks_difference(
            body,
            publication.kids(),
        )])
    };
}

/// Why a `Content-Type` would make relying parties refuse the document, if it would:
/// anything but `application/json` or `application/jwk-set+json` (parameters such as
/// `charset` are ignored). A missing header is not called wrong here (doctor warns about it).
pub fn content_type_problem(content_type: Option<&str>) -> Option<String> {
    let raw = content_type?;
    let media = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/json" | "application/jwk-set+json" => None,
        _ => Some(format!(
            "served as Content-Type {raw}: relying parties expect application/json (or application/jwk-set+json) and may refuse it"
        )),
    }
}

/// A document whose body is right but whose Content-Type relying parties may refuse is not
/// what they need: it is reported as differing, with the reason.
fn check_content_type(out: &mut Fetched) {
    if !out.is_ok() {
        return;
    }
    if let Some(problem) = content_type_problem(out.content_type.as_deref()) {
        let same = match out.matches {
            Match::Exact => "same bytes, but ",
            _ => "same keys and fields, but ",
        };
        out.matches = Match::Differs(vec![format!("{same}{problem}")]);
    }
}

/// The public discovery URL of an issuer.
pub fn discovery_url(issuer: &str) -> String {
    format!("{issuer}{}", crate::keys::jwks::DISCOVERY_PATH)
}

/// Fetches and compares both public documents.
pub async fn verify(client: &reqwest::Client, publication: &Publication) -> PublicReport {
    let discovery_url = discovery_url(&publication.issuer);
    let (mut discovery, body) = fetch(client, &discovery_url).await;
    if let Some(body) = body {
        compare_discovery(&body, publication, &mut discovery);
        check_content_type(&mut discovery);
    }
    let (mut jwks, body) = fetch(client, &publication.jwks_uri).await;
    if let Some(body) = body {
        compare_jwks(&body, publication, &mut jwks);
        check_content_type(&mut jwks);
    }
    PublicReport { discovery, jwks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_prefers_shared_caches() {
        assert_eq!(
            max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            max_age("max-age=60, s-maxage=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(max_age("no-cache"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
    }

    #[test]
    fn content_types_relying_parties_accept() {
        assert_eq!(content_type_problem(Some("application/json")), None);
        assert_eq!(
            content_type_problem(Some("Application/JSON; charset=utf-8")),
            None
        );
        assert_eq!(content_type_problem(Some("application/jwk-set+json")), None);
        assert_eq!(content_type_problem(None), None);
        let problem = content_type_problem(Some("application/octet-stream")).expect("refused");
        assert!(problem.contains("application/octet-stream"), "{problem}");
        let mut fetched = Fetched::new("https://127.0.0.1/jwks");
        fetched.matches = Match::Exact;
        fetched.content_type = Some("binary/octet-stream".into());
        check_content_type(&mut fetched);
        assert!(!fetched.is_ok(), "{fetched:?}");
        assert!(
            matches!(&fetched.matches, Match::Differs(why) if why[0].starts_with("same bytes, but served as Content-Type binary/octet-stream")),
            "{fetched:?}"
        );
    }
}
