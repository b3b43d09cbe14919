//! The `gcs` target: Google Cloud Storage through its JSON API.
//!
//! Credentials: `credentials-file:` (a service-account key JSON, a host path), else the
//! application default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file), else the
//! metadata server (GCE/GKE workload identity); `object_store` turns them into bearer tokens.
//!
//! Objects are read as metadata (`GET /storage/v1/b/<bucket>/o/<name>`: generation,
//! contentType, cacheControl), then as that generation's bytes (`?alt=media&generation=`), so
//! bytes and metadata always belong together. They are written with one multipart upload
//! (`POST /upload/storage/v1/b/<bucket>/o?uploadType=multipart`) carrying the contentType and
//! cacheControl, conditional on `ifGenerationMatch` (`0` to create, else the generation read).
//! The JSON API rather than the XML one (which `object_store` speaks): it is the API Google
//! documents first, and the one fake-gcs-server, the standard emulator the test suite runs
//! against, implements for writes.
//!
//! Public reading: grant `allUsers` the `roles/storage.objectViewer` role on the bucket (uniform
//! bucket-level access), or serve it through a load balancer; the issuer is then
//! `https://storage.googleapis.com/<bucket>/<prefix>`. GCP workload identity federation can also
//! take the JWKS inline (no hosting at all).

use std::time::Duration;

use object_store::gcp::{GcpCredentialProvider, GoogleCloudStorageBuilder};

use super::{BoxFuture, Condition, Environment, Object, Stored, Target, TargetError, Version};
use super::{http, store::error_chain};
use crate::config::PublishTarget;

/// Where the JSON API lives unless `endpoint:` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";

/// How often a read is retried when the object changes between its metadata and its bytes.
const READ_ATTEMPTS: usize = 3;

/// A GCS bucket through the JSON API.
#[derive(Debug, Clone)]
pub struct GcsTarget {
    name: String,
    endpoint: String,
    bucket: String,
    client: reqwest::Client,
    credentials: GcpCredentialProvider,
}

pub fn build(target: &PublishTarget, env: &Environment) -> Result<GcsTarget, String> {
    let PublishTarget::Gcs {
        bucket,
        credentials_file,
        endpoint,
        ..
    } = target
    else {
        return Err("not a gcs target".into());
    };
    // object_store only turns the configured credentials into bearer tokens here.
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(http::store_options(env.ca_file.as_deref())?);
    if let Some(file) = credentials_file {
        let path = env.root.path(file);
        let key = crate::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read credentials-file {}: {e}", path.display()))?;
        builder = builder.with_service_account_key(key);
    }
    let store = builder.build().map_err(|e| {
        let cause = error_chain(&e);
        match credentials_file {
            Some(file) => format!("credentials-file {}: {cause}", file.display()),
            None => cause,
        }
    })?;
    let endpoint = endpoint
        .as_deref()
        .unwrap_or(DEFAULT_ENDPOINT)
        .trim_end_matches('/')
        .to_string();
    Ok(GcsTarget {
        name: target.describe(),
        endpoint,
        bucket: bucket.clone(),
        client: http::client(env.ca_file.as_deref(), Duration::from_secs(30))?,
        credentials: store.credentials().clone(),
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters (an object name is one
/// path segment in the JSON API: `/` becomes `%2F`).
fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GCS's own wording of a failed request: `error.message` of its JSON answer, or the body.
fn answer(status: reqwest::StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    if message.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {message}")
    }
}

/// A multipart/related boundary that does not occur in `bytes`.
fn boundary_for(bytes: &[u8]) -> String {
    let mut boundary = String::from("irsa-agent-boundary");
    while bytes
        .windows(boundary.len())
        .any(|w| w == boundary.as_bytes())
    {
        boundary.push('x');
    }
    boundary
}

impl GcsTarget {
    fn object_url(&self, key: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.endpoint,
            encode(&self.bucket),
            encode(key)
        )
    }

    async fn request(
        &self,
        builder: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(reqwest::StatusCode, Vec<u8>), TargetError> {
        let credential = self.credentials.get_credential().await.map_err(|e| {
            TargetError::Failed(format!("cannot get GCS credentials: {}", error_chain(&e)))
        })?;
        let builder = if credential.bearer.is_empty() {
            builder
        } else {
            builder.bearer_auth(&credential.bearer)
        };
        let response = builder
            .send()
            .await
            .map_err(|e| TargetError::Failed(format!("{what}: {}", error_chain(&e))))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| TargetError::Failed(format!("{what}: {}", error_chain(&e))))?;
        Ok((status, body.to_vec()))
    }

    /// One attempt: `None` inside when the object changed between metadata and bytes.
    async fn read_once(&self, key: &str) -> Result<Option<Option<Stored>>, TargetError> {
        let url = self.object_url(key);
        let what = format!("GET {url}");
        let (status, body) = self.request(self.client.get(&url), &what).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Some(None));
        }
        if !status.is_success() {
            return Err(TargetError::Failed(format!(
                "{what}: {}",
                answer(status, &body)
            )));
        }
        let meta: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| TargetError::Failed(format!("{what}: not the object's metadata: {e}")))?;
        let text = |field: &str| meta[field].as_str().map(str::to_string);
        let generation = text("generation")
            .ok_or_else(|| TargetError::Failed(format!("{what}: the answer has no generation")))?;
        let media = format!("{url}?alt=media&generation={}", encode(&generation));
        let what = format!("GET {media}");
        let (status, bytes) = self.request(self.client.get(&media), &what).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            // Replaced (or deleted) since the metadata was read.
            return Ok(None);
        }
        if !status.is_success() {
            return Err(TargetError::Failed(format!(
                "{what}: {}",
                answer(status, &bytes)
            )));
        }
        Ok(Some(Some(Stored {
            bytes,
            version: Version {
                e_tag: text("etag"),
                version: Some(generation),
            },
            content_type: text("contentType"),
            cache_control: text("cacheControl"),
            problems: Vec::new(),
        })))
    }
}

impl Target for GcsTarget {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn read<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Stored>, TargetError>> {
        Box::pin(async move {
            for _ in 0..READ_ATTEMPTS {
                if let Some(stored) = self.read_once(key).await? {
                    return Ok(stored);
                }
            }
            Err(TargetError::Failed(format!(
                "it changed while being read, {READ_ATTEMPTS} times in a row"
            )))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        object: Object<'a>,
        condition: Condition,
    ) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            let generation = match condition {
                Condition::Create => "0".to_string(),
                Condition::Update(Version {
                    version: Some(generation),
                    ..
                }) => generation,
                Condition::Update(_) => {
                    return Err(TargetError::Failed(format!(
                        "cannot replace {key}: no generation was read"
                    )));
                }
            };
            let mut url = url::Url::parse(&format!(
                "{}/upload/storage/v1/b/{}/o",
                self.endpoint,
                encode(&self.bucket)
            ))
            .map_err(|e| TargetError::Failed(format!("endpoint {}: {e}", self.endpoint)))?;
            url.query_pairs_mut()
                .append_pair("uploadType", "multipart")
                .append_pair("ifGenerationMatch", &generation);
            let metadata = serde_json::json!({
                "name": key,
                "contentType": object.content_type,
                "cacheControl": object.cache_control,
            });
            let boundary = boundary_for(object.bytes);
            let mut body = format!(
                "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n--{boundary}\r\nContent-Type: {}\r\n\r\n",
                object.content_type
            )
            .into_bytes();
            body.extend_from_slice(object.bytes);
            body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
            let request = self
                .client
                .post(url.as_str())
                .header(
                    reqwest::header::CONTENT_TYPE,
                    format!("multipart/related; boundary={boundary}"),
                )
                .body(body);
            let what = format!("POST {url}");
            let (status, answer_body) = self.request(request, &what).await?;
            if status == reqwest::StatusCode::PRECONDITION_FAILED {
                return Err(TargetError::Conflict);
            }
            if !status.is_success() {
                return Err(TargetError::Failed(format!(
                    "{what}: {}",
                    answer(status, &answer_body)
                )));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_one_path_segment() {
        assert_eq!(
            encode("cluster-a/.well-known/openid-configuration"),
            "cluster-a%2F.well-known%2Fopenid-configuration"
        );
        assert_eq!(encode("a b+c"), "a%20b%2Bc");
    }

    #[test]
    fn the_boundary_never_occurs_in_the_body() {
        let body = b"--irsa-agent-boundary and irsa-agent-boundaryx";
        let b = boundary_for(body);
        assert!(!String::from_utf8_lossy(body).contains(&b), "{b}");
    }
}
