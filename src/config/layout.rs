//! Where the two documents go inside a target, and whether that lines up with the issuer.
//!
//! Keys: the discovery document at `<prefix>/.well-known/openid-configuration`; the JWKS at the
//! jwks-uri's path, taken relative to the same place: when the jwks-uri lies under the issuer
//! (the default `<issuer>/openid/v1/jwks`), at `<prefix>/<the rest>`; otherwise the prefix is
//! matched against the end of the issuer's path to find where the target is mounted on the
//! issuer's host, and the jwks-uri's path is taken relative to that.
//!
//! A relying party fetches `<issuer>/.well-known/openid-configuration`, so the issuer's path has
//! to end with the prefix. When the issuer points straight at the bucket (an S3, GCS or Azure
//! host we recognise) we also know where the bucket's root is and say which prefix would line
//! up. These are notes, not errors: a CDN or a rewrite in front may change paths.

use url::Url;

use crate::config::PublishTarget;
use crate::keys::jwks::DISCOVERY_PATH;

/// The object keys of one target, and notes about how they line up with the URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub discovery_key: String,
    pub jwks_key: String,
    pub notes: Vec<String>,
}

fn join(prefix: &str, rest: &str) -> String {
    let rest = rest.trim_start_matches('/');
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}/{rest}")
    }
}

fn origin(url: &Url) -> (String, Option<String>, Option<u16>) {
    (
        url.scheme().to_string(),
        url.host_str().map(str::to_ascii_lowercase),
        url.port_or_known_default(),
    )
}

/// Where a bucket's root is on the issuer's host, when the issuer points straight at it:
/// `Some("")` for a virtual-hosted bucket, `Some("/bucket")` for path style.
fn bucket_mount(target: &PublishTarget, issuer: &Url) -> Option<(String, String)> {
    let host = issuer.host_str()?.to_ascii_lowercase();
    match target {
        PublishTarget::S3 {
            bucket,
            endpoint,
            path_style,
            ..
        } => {
            let bucket_l = bucket.to_ascii_lowercase();
            if let Some(endpoint) = endpoint.as_deref().and_then(|e| Url::parse(e).ok()) {
                let same = endpoint.host_str().map(str::to_ascii_lowercase) == Some(host.clone())
                    && endpoint.port_or_known_default() == issuer.port_or_known_default();
                if same {
                    let base = endpoint.path().trim_end_matches('/').to_string();
                    return Some(if *path_style {
                        (
                            format!("{base}/{bucket}"),
                            format!("the bucket {bucket} at {endpoint}"),
                        )
                    } else {
                        (base, format!("the bucket endpoint {endpoint}"))
                    });
                }
                return None;
            }
            if let Some(rest) = host.strip_prefix(&format!("{bucket_l}."))
                && rest.starts_with("s3")
                && rest.ends_with(".amazonaws.com")
            {
                return Some((String::new(), format!("the S3 bucket {bucket}")));
            }
            if (host.starts_with("s3.") || host.starts_with("s3-"))
                && host.ends_with(".amazonaws.com")
            {
                return Some((format!("/{bucket}"), format!("the S3 bucket {bucket}")));
            }
            None
        }
        PublishTarget::Gcs { bucket, .. } => {
            if host == "storage.googleapis.com" {
                Some((format!("/{bucket}"), format!("the GCS bucket {bucket}")))
            } else if host == format!("{}.storage.googleapis.com", bucket.to_ascii_lowercase()) {
                Some((String::new(), format!("the GCS bucket {bucket}")))
            } else {
                None
            }
        }
        PublishTarget::AzureBlob {
            account, container, ..
        } => {
            let account = account.to_ascii_lowercase();
            if host == format!("{account}.blob.core.windows.net") {
                Some((
                    format!("/{container}"),
                    format!("the container {container} of {account}"),
                ))
            } else if host.starts_with(&format!("{account}.z"))
                && host.ends_with(".web.core.windows.net")
            {
                Some((String::new(), format!("the static website of {account}")))
            } else {
                None
            }
        }
        PublishTarget::Directory { .. } => None,
    }
}

impl Layout {
    /// The keys for `target` given the configured issuer and jwks-uri (both already validated;
    /// unparsable URLs only give notes).
    pub fn for_target(issuer: &str, jwks_uri: &str, target: &PublishTarget) -> Layout {
        let prefix = target.prefix();
        let mut notes = Vec::new();
        let discovery_key = join(prefix, DISCOVERY_PATH);
        let issuer_url = Url::parse(issuer).ok();
        let issuer_path = issuer_url
            .as_ref()
            .map(|u| u.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        // Where this target's root sits on the issuer's host.
        let mount = if prefix.is_empty() {
            Some(issuer_path.clone())
        } else {
            issuer_path
                .strip_suffix(&format!("/{prefix}"))
                .map(str::to_string)
        };
        if mount.is_none() {
            notes.push(format!(
                "the issuer's path ({:?}) does not end with this target's prefix ({prefix:?}): relying parties fetch {issuer}{DISCOVERY_PATH}, which this target serves only if a CDN or rewrite maps it to {discovery_key}",
                if issuer_path.is_empty() { "/" } else { &issuer_path },
            ));
        }
        if let Some(url) = &issuer_url
            && let Some((bucket_root, what)) = bucket_mount(target, url)
        {
            let want = issuer_path
                .strip_prefix(&bucket_root)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                .map(|rest| rest.trim_matches('/').to_string());
            match want {
                Some(want) if want == prefix => {}
                Some(want) => notes.push(format!(
                    "the issuer points straight at {what}, so the discovery document must be at key {}; set `prefix: {}` (now {prefix:?})",
                    join(&want, DISCOVERY_PATH),
                    if want.is_empty() { "\"\"".to_string() } else { want.clone() },
                )),
                None => notes.push(format!(
                    "the issuer's host serves {what} under {bucket_root:?}, but the issuer's path ({issuer_path:?}) is not under it: relying parties will not find the documents"
                )),
            }
        }
        let jwks_key = match jwks_uri.strip_prefix(issuer) {
            Some(rest) if rest.starts_with('/') => join(prefix, rest),
            _ => {
                let jwks_url = Url::parse(jwks_uri).ok();
                let same_origin = match (&issuer_url, &jwks_url) {
                    (Some(a), Some(b)) => origin(a) == origin(b),
                    _ => false,
                };
                let jwks_path = jwks_url
                    .as_ref()
                    .map(|u| u.path().to_string())
                    .unwrap_or_default();
                match &mount {
                    Some(mount) if same_origin && jwks_path.starts_with(&format!("{mount}/")) => {
                        jwks_path[mount.len() + 1..].to_string()
                    }
                    _ => {
                        let key = jwks_path.trim_start_matches('/').to_string();
                        notes.push(format!(
                            "the jwks-uri {jwks_uri} is not under the issuer: this target writes the JWKS at key {key:?}; make sure {jwks_uri} serves that object"
                        ));
                        key
                    }
                }
            }
        };
        Layout {
            discovery_key,
            jwks_key,
            notes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AwsCredentials;

    fn s3(bucket: &str, prefix: &str, endpoint: Option<&str>, path_style: bool) -> PublishTarget {
        PublishTarget::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
            region: Some("eu-west-1".into()),
            endpoint: endpoint.map(String::from),
            path_style,
            cache_control: "public, max-age=300".into(),
            credentials: AwsCredentials::Chain,
        }
    }

    #[test]
    fn default_jwks_uri_follows_the_prefix() {
        let l = Layout::for_target(
            "https://oidc.example.com/cluster-a",
            "https://oidc.example.com/cluster-a/openid/v1/jwks",
            &s3("oidc", "cluster-a", None, false),
        );
        assert_eq!(
            l.discovery_key,
            "cluster-a/.well-known/openid-configuration"
        );
        assert_eq!(l.jwks_key, "cluster-a/openid/v1/jwks");
        assert!(l.notes.is_empty(), "{:?}", l.notes);
    }

    #[test]
    fn path_style_endpoint_issuer() {
        // SeaweedFS / MinIO: https://host:port/<bucket> is the bucket root.
        let l = Layout::for_target(
            "https://127.0.0.1:18443/oidc",
            "https://127.0.0.1:18443/oidc/openid/v1/jwks",
            &s3("oidc", "", Some("https://127.0.0.1:18443"), true),
        );
        assert_eq!(l.discovery_key, ".well-known/openid-configuration");
        assert_eq!(l.jwks_key, "openid/v1/jwks");
        assert!(l.notes.is_empty(), "{:?}", l.notes);
        // Same, with a prefix that the issuer's path carries.
        let l = Layout::for_target(
            "https://127.0.0.1:18443/oidc/a",
            "https://127.0.0.1:18443/oidc/a/openid/v1/jwks",
            &s3("oidc", "a", Some("https://127.0.0.1:18443"), true),
        );
        assert_eq!(l.jwks_key, "a/openid/v1/jwks");
        assert!(l.notes.is_empty(), "{:?}", l.notes);
    }

    #[test]
    fn misaligned_prefix_is_explained() {
        let l = Layout::for_target(
            "https://oidc-bucket.s3.eu-west-1.amazonaws.com/cluster-a",
            "https://oidc-bucket.s3.eu-west-1.amazonaws.com/cluster-a/openid/v1/jwks",
            &s3("oidc-bucket", "", None, false),
        );
        assert_eq!(l.notes.len(), 1, "{:?}", l.notes);
        assert!(
            l.notes[0].contains("set `prefix: cluster-a`"),
            "{:?}",
            l.notes
        );

        let l = Layout::for_target(
            "https://oidc.example.com/x",
            "https://oidc.example.com/x/openid/v1/jwks",
            &s3("oidc", "cluster-a", None, false),
        );
        assert!(l.notes[0].contains("does not end with this target's prefix"));
    }

    #[test]
    fn jwks_uri_elsewhere() {
        // Same host, outside the issuer's path: relative to where the target is mounted.
        let l = Layout::for_target(
            "https://oidc.example.com/cluster-a",
            "https://oidc.example.com/keys/jwks.json",
            &s3("oidc", "cluster-a", None, false),
        );
        assert_eq!(l.jwks_key, "keys/jwks.json");
        assert!(l.notes.is_empty());
        // Another host: its path, with a note.
        let l = Layout::for_target(
            "https://oidc.example.com/cluster-a",
            "https://cdn.example.net/k/jwks.json",
            &s3("oidc", "cluster-a", None, false),
        );
        assert_eq!(l.jwks_key, "k/jwks.json");
        assert_eq!(l.notes.len(), 1);
    }
}
