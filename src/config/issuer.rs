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
    let url = match Url::parse(raw.trim()) {
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
    if !url.username().is_empty() || url.password().is_some() {
        out.errors
            .push("must not contain a user name or password".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        out.errors.push("has no host".into());
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
    let authority = raw_authority(trimmed);
    if let Some(port) = raw_port(authority) {
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

    #[test]
    fn port_detection_is_ipv6_aware() {
        assert_eq!(raw_port("[::1]:8443"), Some("8443"));
        assert_eq!(raw_port("[::1]"), None);
        assert_eq!(raw_port("example.com:443"), Some("443"));
        assert_eq!(raw_port("example.com"), None);
    }
}
