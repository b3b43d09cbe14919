//! AWS credentials for the `s3` target, without static secrets on the host.
//!
//! * **The standard chain** (`credentials: chain`, the default): `AWS_ACCESS_KEY_ID`/... in the
//!   environment; then the shared files `~/.aws/credentials` and `~/.aws/config` (profile
//!   `AWS_PROFILE`, paths `AWS_SHARED_CREDENTIALS_FILE`/`AWS_CONFIG_FILE`, static keys and
//!   region; host paths, resolved under `--root`); then what `object_store` does: web identity
//!   (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`), ECS/EKS container credentials, IMDSv2.
//!   `credential_process`, SSO and `source_profile` chains are not supported.
//! * **The self-issued web identity** (`credentials: self-issued`, or `role-arn:` set): the
//!   agent mints a token itself with the cluster's service-account signing key: issuer = the
//!   configured issuer, `sub` = `web-identity-subject` (default
//!   `system:serviceaccount:kube-system:irsa-agent`), `aud` = `web-identity-audience` (default
//!   `sts.amazonaws.com`), lifetime [`TOKEN_LIFETIME`] (at most 15 minutes). It is held only in
//!   memory for the one STS call, never logged, never written. STS `AssumeRoleWithWebIdentity`
//!   exchanges it for temporary credentials of `role-arn`, which are cached and refreshed
//!   [`REFRESH_BEFORE`] before they expire. Once IAM trusts the issuer, the host needs no AWS
//!   keys at all. The bootstrap (the very first publish, before the issuer is trusted) needs
//!   other credentials or a directory target: see docs/publishing.md.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::CredentialProvider;
use object_store::aws::AwsCredential;

use crate::host::HostRoot;
use crate::keys::{SigningKey, token};

/// Lifetime of a self-issued token (AWS accepts web identity tokens of any lifetime; short
/// keeps a leaked token nearly useless).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Temporary credentials are renewed this long before they expire.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// The session length asked of STS (the role's maximum must allow it; 1 h is the default).
pub const SESSION_DURATION: Duration = Duration::from_secs(3600);
/// `RoleSessionName`: shows in CloudTrail.
pub const SESSION_NAME: &str = "irsa-agent";

/// Static keys and region from a shared config profile.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    /// The files it was read from.
    pub files: Vec<PathBuf>,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .field("files", &self.files)
            .finish()
    }
}

/// Parses an AWS INI file into `section -> key -> value`.
pub fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        if let (Some(section), Some((k, v))) = (&section, line.split_once('=')) {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

/// The shared-config profile the AWS CLI would use, read from the host (under `root`), with
/// the environment's `AWS_PROFILE`, `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE`, `HOME`.
pub fn shared_profile(root: &HostRoot, env: &dyn Fn(&str) -> Option<String>) -> Option<Profile> {
    let name = env("AWS_PROFILE")
        .or_else(|| env("AWS_DEFAULT_PROFILE"))
        .unwrap_or_else(|| "default".into());
    let home = env("HOME").unwrap_or_else(|| "/root".into());
    let credentials_file =
        env("AWS_SHARED_CREDENTIALS_FILE").unwrap_or_else(|| format!("{home}/.aws/credentials"));
    let config_file = env("AWS_CONFIG_FILE").unwrap_or_else(|| format!("{home}/.aws/config"));
    let mut profile = Profile {
        name: name.clone(),
        ..Profile::default()
    };
    let config_section = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    for (file, section) in [
        (credentials_file, name.clone()),
        (config_file, config_section),
    ] {
        let path = root.path(&file);
        let Ok(text) = crate::fs::read_to_string(&path) else {
            continue;
        };
        let ini = parse_ini(&text);
        let Some(values) = ini.get(&section) else {
            continue;
        };
        profile.files.push(PathBuf::from(&file));
        let take = |slot: &mut Option<String>, key: &str| {
            if slot.is_none() {
                *slot = values.get(key).filter(|v| !v.is_empty()).cloned();
            }
        };
        take(&mut profile.access_key_id, "aws_access_key_id");
        take(&mut profile.secret_access_key, "aws_secret_access_key");
        take(&mut profile.session_token, "aws_session_token");
        take(&mut profile.region, "region");
    }
    (!profile.files.is_empty()).then_some(profile)
}

/// Temporary credentials from STS.
#[derive(Clone, PartialEq, Eq)]
pub struct TemporaryCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
}

impl fmt::Debug for TemporaryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemporaryCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field(
                "expiration",
                &humantime::format_rfc3339_seconds(self.expiration),
            )
            .finish()
    }
}

/// Why STS gave no credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// STS answered with an error (`InvalidIdentityToken`, `IDPCommunicationError`, ...).
    #[error("STS {endpoint} refused AssumeRoleWithWebIdentity for {role_arn}: {code}: {message}")]
    Refused {
        endpoint: String,
        role_arn: String,
        code: String,
        message: String,
    },
    #[error("cannot reach STS {endpoint}: {message}")]
    Unreachable { endpoint: String, message: String },
    #[error("unexpected answer from STS {endpoint}: {message}")]
    BadAnswer { endpoint: String, message: String },
}

/// The text of the first element named `name` in an XML document (entities decoded).
fn xml_text(xml: &str, name: &str) -> Option<String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut inside = false;
    let mut text = String::new();
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) if e.local_name().as_ref() == name.as_bytes() => inside = true,
            Event::Text(t) if inside => text.push_str(&t.decode().ok()?),
            Event::GeneralRef(r) if inside => {
                let name = r.decode().ok()?;
                let decoded = match name.as_ref() {
                    "amp" => "&",
                    "lt" => "<",
                    "gt" => ">",
                    "quot" => "\"",
                    "apos" => "'",
                    _ => "",
                };
                text.push_str(decoded);
            }
            Event::CData(t) if inside => text.push_str(&String::from_utf8_lossy(&t)),
            Event::End(e) if inside && e.local_name().as_ref() == name.as_bytes() => {
                return Some(text);
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// The default STS endpoint: regional when the region is known (what AWS recommends).
pub fn default_sts_endpoint(region: Option<&str>) -> String {
    match region {
        Some(region) if !region.is_empty() => format!("https://sts.{region}.amazonaws.com"),
        _ => "https://sts.amazonaws.com".to_string(),
    }
}

/// One `AssumeRoleWithWebIdentity` call (unsigned, as the API is). The token is sent in the
/// form body and appears in no error.
pub async fn assume_role_with_web_identity(
    client: &reqwest::Client,
    endpoint: &str,
    role_arn: &str,
    session_name: &str,
    token: &str,
    duration: Duration,
) -> Result<TemporaryCredentials, StsError> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("Action", "AssumeRoleWithWebIdentity")
        .append_pair("Version", "2011-06-15")
        .append_pair("RoleArn", role_arn)
        .append_pair("RoleSessionName", session_name)
        .append_pair("DurationSeconds", &duration.as_secs().to_string())
        .append_pair("WebIdentityToken", token)
        .finish();
    let unreachable = |e: reqwest::Error| StsError::Unreachable {
        endpoint: endpoint.to_string(),
        message: super::store::error_chain(&e.without_url()),
    };
    let response = client
        .post(endpoint)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/xml")
        .body(body)
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status();
    let text = response.text().await.map_err(unreachable)?;
    if !status.is_success() {
        return Err(StsError::Refused {
            endpoint: endpoint.to_string(),
            role_arn: role_arn.to_string(),
            code: xml_text(&text, "Code").unwrap_or_else(|| format!("HTTP {status}")),
            message: xml_text(&text, "Message")
                .unwrap_or_else(|| text.chars().take(300).collect::<String>()),
        });
    }
    let field = |name: &str| {
        xml_text(&text, name).ok_or_else(|| StsError::BadAnswer {
            endpoint: endpoint.to_string(),
            message: format!("no <{name}> in the answer"),
        })
    };
    let expiration_text = field("Expiration")?;
    let expiration = humantime::parse_rfc3339_weak(expiration_text.trim_end_matches('Z'))
        .or_else(|_| humantime::parse_rfc3339(&expiration_text))
        .map_err(|e| StsError::BadAnswer {
            endpoint: endpoint.to_string(),
            message: format!("bad <Expiration> {expiration_text:?}: {e}"),
        })?;
    Ok(TemporaryCredentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: field("SecretAccessKey")?,
        session_token: field("SessionToken")?,
        expiration,
    })
}

/// The claims of a self-issued token.
pub fn token_claims(
    issuer: &str,
    subject: &str,
    audience: &str,
    now: SystemTime,
) -> serde_json::Value {
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    serde_json::json!({
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": iat,
        "nbf": iat,
        "exp": iat + TOKEN_LIFETIME.as_secs(),
    })
}

struct Cached {
    credential: Arc<AwsCredential>,
    expiration: SystemTime,
}

/// Credentials of the self-issued web identity, for `object_store`'s S3 client.
pub struct SelfIssued {
    signing_key: SigningKey,
    issuer: String,
    subject: String,
    audience: String,
    role_arn: String,
    sts_endpoint: String,
    client: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

impl fmt::Debug for SelfIssued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SelfIssued")
            .field(
                "signing_key",
                &format_args!("kid {}", self.signing_key.public.kid()),
            )
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("audience", &self.audience)
            .field("role_arn", &self.role_arn)
            .field("sts_endpoint", &self.sts_endpoint)
            .finish_non_exhaustive()
    }
}

impl SelfIssued {
    pub fn new(
        signing_key: SigningKey,
        issuer: &str,
        identity: &crate::config::WebIdentity,
        sts_endpoint: String,
        client: reqwest::Client,
    ) -> Self {
        SelfIssued {
            signing_key,
            issuer: issuer.to_string(),
            subject: identity.subject.clone(),
            audience: identity.audience.clone(),
            role_arn: identity.role_arn.clone(),
            sts_endpoint,
            client,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    /// Mints a token and exchanges it (no cache).
    pub async fn exchange(&self) -> Result<TemporaryCredentials, String> {
        let claims = token_claims(
            &self.issuer,
            &self.subject,
            &self.audience,
            SystemTime::now(),
        );
        let token = zeroize::Zeroizing::new(
            token::mint(&self.signing_key, &claims)
                .map_err(|e| format!("cannot sign the web identity token: {e}"))?,
        );
        log::info!(
            "obtaining AWS credentials: AssumeRoleWithWebIdentity for {} at {} with a token for {} signed by kid {}",
            self.role_arn,
            self.sts_endpoint,
            self.subject,
            self.signing_key.public.kid()
        );
        assume_role_with_web_identity(
            &self.client,
            &self.sts_endpoint,
            &self.role_arn,
            SESSION_NAME,
            &token,
            SESSION_DURATION,
        )
        .await
        .map_err(|e| match e {
            StsError::Refused { .. } => format!(
                "{e}; check that IAM trusts the issuer {} (an OIDC provider with audience {}), that the role's trust policy allows sub {}, and that the published JWKS holds kid {} (the first publish needs other credentials: see /usr/share/doc/irsa-agent/publishing.md, bootstrap)",
                self.issuer,
                self.audience,
                self.subject,
                self.signing_key.public.kid()
            ),
            other => other.to_string(),
        })
    }
}

#[async_trait::async_trait]
impl CredentialProvider for SelfIssued {
    type Credential = AwsCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
        let mut cache = self.cache.lock().await;
        if let Some(cached) = cache.as_ref()
            && cached.expiration > SystemTime::now() + REFRESH_BEFORE
        {
            return Ok(Arc::clone(&cached.credential));
        }
        let fresh = self
            .exchange()
            .await
            .map_err(|message| object_store::Error::Generic {
                store: "S3",
                source: message.into(),
            })?;
        let credential = Arc::new(AwsCredential {
            key_id: fresh.access_key_id,
            secret_key: fresh.secret_access_key,
            token: Some(fresh.session_token),
        });
        *cache = Some(Cached {
            credential: Arc::clone(&credential),
            expiration: fresh.expiration,
        });
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sts_answers() {
        let ok = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIA1</AccessKeyId><SecretAccessKey>s/e+c</SecretAccessKey><SessionToken>t&amp;k</SessionToken><Expiration>2030-01-02T03:04:05Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"#;
        assert_eq!(xml_text(ok, "AccessKeyId").as_deref(), Some("ASIA1"));
        assert_eq!(xml_text(ok, "SessionToken").as_deref(), Some("t&k"));
        assert_eq!(xml_text(ok, "Missing"), None);
        let err = "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>bad sig</Message></Error></ErrorResponse>";
        assert_eq!(
            xml_text(err, "Code").as_deref(),
            Some("InvalidIdentityToken")
        );
    }

    #[test]
    fn shared_profiles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = HostRoot::new(dir.path());
        std::fs::create_dir_all(root.path("/root/.aws")).expect("mkdir");
        std::fs::write(
            root.path("/root/.aws/credentials"),
            "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s1\n[ops]\naws_access_key_id=AKIAOPS\naws_secret_access_key=s2\n",
        )
        .expect("write");
        std::fs::write(
            root.path("/root/.aws/config"),
            "[default]\nregion = eu-west-1\n[profile ops]\nregion = us-west-2\n",
        )
        .expect("write");
        let none = |_: &str| None;
        let p = shared_profile(&root, &none).expect("profile");
        assert_eq!(p.access_key_id.as_deref(), Some("AKIADEFAULT"));
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        assert!(!format!("{p:?}").contains("s1"), "secret redacted");
        let ops = |k: &str| (k == "AWS_PROFILE").then(|| "ops".to_string());
        let p = shared_profile(&root, &ops).expect("profile");
        assert_eq!(p.access_key_id.as_deref(), Some("AKIAOPS"));
        assert_eq!(p.region.as_deref(), Some("us-west-2"));
        let other = |k: &str| (k == "AWS_PROFILE").then(|| "nope".to_string());
        assert_eq!(shared_profile(&root, &other), None);
    }
}
