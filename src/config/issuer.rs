//! The rules an issuer URL must follow to be trusted by AWS IAM, GCP workload identity
//! federation and Azure federated credentials (and served by kube-apiserver at all).
//!
//! The issuer is kept as the exact string the user wrote: tokens carry it byte for byte in
//! `iss`, and every relying party compares it exactly. So nothing here normalizes; it only
//! refuses what cannot work and warns about what works only for some relying parties.

use url::Url;

/// The verdict on one URL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UrlCheck {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// The authority part (`host[:port]`) of a raw URL, as written.
fn raw_authority(raw: &str) -> &str {
    let after_scheme = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    let end = after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len());
    &after_scheme[..end]
}

/// The port written in an authority, if any (`[::1]:8443` aware).
fn raw_port(authority: &str) -> Option<&str> {
    let host_end = if authority.starts_with('[') {
        authority.find(']').map_or(authority.len(), |i| i + 1)
    } else {
        authority.find(':').unwrap_or(authority.len())
    };
    authority[host_end..].strip_prefix(':')
}

/// Why a DNS host name cannot be an issuer's host (ASCII, letters/digits/hyphens, labels of
/// 1 to 63 characters not starting or ending with a hyphen, 253 characters in all).
fn host_name_problem(host: &str) -> Option<String> {
    if host.len() > 253 {
        return Some(format!("is {} characters long (at most 253)", host.len()));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Some(if host.ends_with('.') {
                "ends with a dot".to_string()
            } else if host.starts_with('.') {
                "starts with a dot".to_string()
            } else {
                "has an empty label (two dots in a row)".to_string()
            });
        }
        if label.len() > 63 {
            return Some(format!(
                "has a label of {} characters (at most 63)",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Some(format!(
                "has {c:?} in the label {label:?} (only letters, digits and '-' are allowed)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!(
                "has the label {label:?}, which starts or ends with '-'"
            ));
        }
    }
    None
}

/// A control character (or a percent-encoded one) or a space inside the URL.
fn character_problem(trimmed: &str) -> Option<String> {
    if let Some(c) = trimmed.chars().find(|c| c.is_control()) {
        return Some(format!(
            "contains the control character {:?} (U+{:04X}); relying parties refuse it",
            c, c as u32
        ));
    }
    if trimmed.contains(' ') {
        return Some("contains a space".into());
    }
    if trimmed.contains('\\') {
        return Some("contains a backslash ('\\'), which URL parsers read as '/'".into());
    }
    let bytes = trimmed.as_bytes();
    for (i, w) in bytes.windows(3).enumerate() {
        if w[0] == b'%' {
            let code = std::str::from_utf8(&w[1..])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if code.is_some_and(|c| c < 0x20 || c == 0x7f) {
                return Some(format!(
                    "contains the percent-encoded control character {:?}",
                    &trimmed[i..i + 3]
                ));
            }
        }
    }
    None
}

fn check_common(raw: &str, what: &str, out: &mut UrlCheck) -> Option<Url> {
    if raw.is_empty() {
        out.errors.push("is empty".into());
        return None;
    }
    if raw.trim() != raw {
        out.errors.push(format!(
            "has leading or trailing whitespace; the {what} must be exactly {:?}",
            raw.trim()
        ));
    }
    let trimmed = raw.trim();
    if let Some(problem) = character_problem(trimmed) {
        out.errors.push(problem);
        return None;
    }
    let url = match Url::parse(trimmed) {
        Ok(url) => url,
        Err(e) => {
            out.errors.push(format!("is not a valid URL ({e})"));
            return None;
        }
    };
    if url.scheme() != "https" {
        out.errors.push(format!(
            "must start with https:// (AWS, GCP and Azure fetch OIDC documents only over HTTPS, and kube-apiserver ignores a non-https {what})"
        ));
    }
    // The URL parser forgives what relying parties do not: `https:host`, `https:/host` and
    // `https:///host` all read as `https://host`, but tokens carry the string as written.
    let prefix = format!("{}://", url.scheme());
    let Some(after_scheme) = trimmed
        .get(..prefix.len())
        .filter(|head| head.eq_ignore_ascii_case(&prefix))
        .map(|_| &trimmed[prefix.len()..])
    else {
        out.errors.push(format!(
            "must be written https://<host>/<path>: \"{}:\" is not followed by \"//\" (a URL parser guesses {:?}, but tokens carry the {what} exactly as written and no relying party accepts this form)",
            url.scheme(),
            url.as_str()
        ));
        return None;
    };
    let authority = raw_authority(trimmed);
    if authority.is_empty() {
        out.errors.push(format!(
            "has no host: nothing between \"{prefix}\" and {}",
            if after_scheme.is_empty() {
                "the end"
            } else {
                "the path"
            }
        ));
        return None;
    }
    if authority.contains('@') {
        out.errors
            .push("must not contain a user name or password".into());
        return None;
    }
    if url.host_str().is_none_or(str::is_empty) {
        out.errors.push("has no host".into());
        return None;
    }
    if raw_port(authority) == Some("") {
        out.errors
            .push("has an empty port (':' with no number after it)".into());
    }
    if let Some(url::Host::Domain(domain)) = url.host() {
        // The host as written, or its ASCII (punycode) form for an internationalized name.
        let written = authority
            .rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(authority, |(host, _)| host);
        let host = if written.is_ascii() { written } else { domain };
        if let Some(problem) = host_name_problem(host) {
            out.errors
                .push(format!("has an invalid host name {host:?}: it {problem}"));
        }
    }
    let path = &after_scheme[authority.len()..];
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        out.errors.push(format!(
            "has a '.' or '..' path segment; HTTP clients resolve it, so relying parties would fetch another path than the {what} names"
        ));
    }
    if raw.contains('#') {
        out.errors.push("must not have a fragment (#...)".into());
    }
    Some(url)
}

/// Checks an issuer: https, a host, no user info, no query, no fragment, no trailing slash, no
/// surrounding whitespace; warns on a port and on spellings relying parties treat differently.
pub fn check_issuer(raw: &str) -> UrlCheck {
    let mut out = UrlCheck::default();
    let Some(url) = check_common(raw, "issuer", &mut out) else {
        return out;
    };
    let trimmed = raw.trim();
    if trimmed.contains('?') {
        out.errors.push(
            "must not have a query (?...); kube-apiserver does not serve discovery for such an issuer and AWS refuses it"
                .into(),
        );
    }
    if trimmed.ends_with('/') {
        out.errors.push(format!(
            "must not end with '/': tokens carry the issuer byte for byte and AWS, GCP and Azure compare it exactly; write {:?}",
            trimmed.trim_end_matches('/')
        ));
    }
    if trimmed.len() > 255 {
        out.warnings.push(format!(
            "is {} characters long; AWS IAM accepts an OIDC provider URL of at most 255",
            trimmed.len()
        ));
    }
    let authority = raw_authority(trimmed);
    if let Some(port) = raw_port(authority).filter(|p| !p.is_empty()) {
        out.warnings.push(format!(
            "has a port (:{port}); AWS IAM does not accept an OIDC provider URL with a port, so this issuer works only for GCP, Azure or tests"
        ));
    }
    if authority.chars().any(|c| c.is_ascii_uppercase()) || raw.starts_with("HTTPS") {
        out.warnings.push(
            "has upper-case letters in its scheme or host; relying parties compare the issuer case-sensitively, so tokens must carry exactly this spelling; prefer lower case"
                .into(),
        );
    }
    if out.errors.is_empty() {
        let mut normal = url.as_str().to_string();
        if url.path() == "/" && !trimmed.ends_with('/') {
            normal.pop();
        }
        if normal != trimmed && !authority.chars().any(|c| c.is_ascii_uppercase()) {
            out.warnings.push(format!(
                "is not in normal form (a URL parser reads it as {normal:?}); make sure the IAM OIDC provider and every trust policy use exactly the configured spelling"
            ));
        }
    }
    out
}

/// Checks a jwks-uri: https (kube-apiserver requires it), a host, no fragment.
pub fn check_jwks_uri(raw: &str) -> UrlCheck {
    let mut out = UrlCheck::default();
    check_common(raw, "jwks-uri", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_issuers() {
        for ok in [
            "https://oidc.example.com",
            "https://oidc.example.com/cluster-a",
            "https://s3.eu-west-1.amazonaws.com/my-bucket/cluster-a",
        ] {
            let check = check_issuer(ok);
            assert!(
                check.errors.is_empty() && check.warnings.is_empty(),
                "{ok}: {check:?}"
            );
        }
    }

    /// Each form AWS, GCP or Azure refuse is refused here, with the cause named.
    #[test]
    fn refuses_what_relying_parties_refuse() {
        for (bad, cause) in [
            (
                "https:oidc.example.com/x",
                "\"https:\" is not followed by \"//\"",
            ),
            (
                "https:/oidc.example.com/x",
                "\"https:\" is not followed by \"//\"",
            ),
            (
                "https:///x",
                "has no host: nothing between \"https://\" and the path",
            ),
            ("https://a..b/x", "has an empty label (two dots in a row)"),
            (
                "https://-a.example/x",
                "\"-a\", which starts or ends with '-'",
            ),
            (
                "https://a-.example/x",
                "\"a-\", which starts or ends with '-'",
            ),
            ("https://oidc.example.com./x", "ends with a dot"),
            ("https://oidc_1.example.com/x", "'_' in the label"),
            (
                "https://oidc.example.com/a%00b",
                "percent-encoded control character \"%00\"",
            ),
            (
                "https://oidc.example.com/a%1fb",
                "percent-encoded control character",
            ),
            (
                "https://oidc.example.com/a\u{0}b",
                "control character '\\0'",
            ),
            ("https://oidc.example.com/a\tb", "control character '\\t'"),
            ("https://oidc.example.com/a b", "contains a space"),
            ("https:\\\\oidc.example.com/x", "backslash"),
            ("https://@oidc.example.com/x", "user name or password"),
            ("https://u@oidc.example.com/x", "user name or password"),
            ("https://oidc.example.com:/x", "empty port"),
            ("https://oidc.example.com/a/../b", "'..' path segment"),
            ("https://oidc.example.com/x?", "must not have a query"),
            ("https://oidc.example.com/x#", "must not have a fragment"),
            (
                &format!("https://{}.example.com/x", "a".repeat(64)),
                "label of 64 characters",
            ),
        ] {
            let check = check_issuer(bad);
            assert!(
                check.errors.iter().any(|e| e.contains(cause)),
                "{bad:?}: want an error containing {cause:?}, got {check:?}"
            );
            assert!(
                !check.warnings.iter().any(|w| w.contains("has a port")),
                "{bad:?}: {check:?}"
            );
            // The jwks-uri has the same URL rules (a query aside).
            if !cause.contains("query") {
                assert!(!check_jwks_uri(bad).errors.is_empty(), "{bad:?}");
            }
        }
    }

    #[test]
    fn accepts_ip_literals_ports_and_idn() {
        for ok in [
            "https://127.0.0.1:8443/cluster-a",
            "https://[::1]:8443/cluster-a",
            "https://xn--bcher-kva.example/x",
            "https://a-b.c0.example.com/x-y_z/%41",
        ] {
            let check = check_issuer(ok);
            assert!(check.errors.is_empty(), "{ok}: {check:?}");
        }
        // Internationalized names are checked in their ASCII form (and warned about).
        let idn = check_issuer("https://bücher.example/x");
        assert!(idn.errors.is_empty(), "{idn:?}");
        assert!(!idn.warnings.is_empty(), "{idn:?}");
    }

    #[test]
    fn port_detection_is_ipv6_aware() {
        assert_eq!(raw_port("[::1]:8443"), Some("8443"));
        assert_eq!(raw_port("[::1]"), None);
        assert_eq!(raw_port("example.com:443"), Some("443"));
        assert_eq!(raw_port("example.com"), None);
    }
}
