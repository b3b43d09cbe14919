//! The `s3` target: AWS S3 and S3-compatible stores (Cloudflare R2, MinIO, SeaweedFS, Ceph).
//!
//! Requests are SigV4-signed by `object_store`. Without `endpoint:` the bucket is addressed
//! virtual-hosted (`https://<bucket>.s3.<region>.amazonaws.com`), or path style with
//! `path-style: true`. With `endpoint:`, `path-style: true` gives `<endpoint>/<bucket>/<key>`
//! (R2, MinIO, SeaweedFS) and `path-style: false` puts the bucket in front of the endpoint's
//! host, as the AWS SDKs do. No ACL header is ever sent: many buckets refuse ACLs, and public
//! reading belongs in a bucket policy or a CDN. Credentials: [`super::credentials`].

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;

use super::credentials::{self, SelfIssued};
use super::store::StoreTarget;
use super::{Environment, http};
use crate::apiserver;
use crate::config::{AwsCredentials, PublishTarget, Settings};
use crate::keys;

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `https://host/path` with the bucket in front of the host.
fn virtual_hosted(endpoint: &str, bucket: &str) -> Result<String, String> {
    let mut url = url::Url::parse(endpoint).map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("endpoint {endpoint:?} has no host"))?
        .to_string();
    url.set_host(Some(&format!("{bucket}.{host}")))
        .map_err(|e| format!("endpoint {endpoint:?}: {e}"))?;
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// Builds the S3 target. With the self-issued web identity this reads the cluster's signing
/// key (once, here) but contacts nothing yet.
pub fn build(
    target: &PublishTarget,
    settings: &Settings,
    env: &Environment,
) -> Result<StoreTarget, String> {
    let PublishTarget::S3 {
        bucket,
        region,
        endpoint,
        path_style,
        credentials,
        ..
    } = target
    else {
        return Err("not an s3 target".into());
    };
    let options = http::store_options(env.ca_file.as_deref())?;
    // The standard chain starts with the environment (AWS_ACCESS_KEY_ID, AWS_REGION, ...).
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(options);
    let profile = credentials::shared_profile(&env.root, &env_var);
    let env_region = env_var("AWS_REGION").or_else(|| env_var("AWS_DEFAULT_REGION"));
    let region = region
        .clone()
        .or(env_region)
        .or_else(|| profile.as_ref().and_then(|p| p.region.clone()));
    if let Some(region) = &region {
        builder = builder.with_region(region);
    }
    match endpoint {
        Some(endpoint) => {
            let endpoint = if *path_style {
                endpoint.clone()
            } else {
                virtual_hosted(endpoint, bucket)?
            };
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(!*path_style)
                .with_endpoint(endpoint);
        }
        None => builder = builder.with_virtual_hosted_style_request(!*path_style),
    }
    match credentials {
        AwsCredentials::Chain => {
            let env_has_keys = env_var("AWS_ACCESS_KEY_ID").is_some();
            if let Some(profile) = profile.filter(|_| !env_has_keys)
                && let (Some(id), Some(secret)) =
                    (&profile.access_key_id, &profile.secret_access_key)
            {
                log::debug!(
                    "s3://{bucket}: using the static keys of profile {} ({})",
                    profile.name,
                    profile
                        .files
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret);
                if let Some(token) = &profile.session_token {
                    builder = builder.with_token(token);
                }
            }
        }
        AwsCredentials::SelfIssued(identity) => {
            let files = apiserver::key_files(&env.root, settings.distribution)
                .map_err(|e| e.to_string())?;
            let signing_key = keys::load_signing_file(&env.root.path(&files.signing))
                .map_err(|e| format!("the self-issued web identity needs the signing key: {e}"))?;
            let sts_endpoint = identity
                .sts_endpoint
                .clone()
                .unwrap_or_else(|| credentials::default_sts_endpoint(region.as_deref()));
            let client = http::client(env.ca_file.as_deref(), std::time::Duration::from_secs(30))?;
            builder = builder.with_credentials(Arc::new(SelfIssued::new(
                signing_key,
                &settings.issuer,
                identity,
                sts_endpoint,
                client,
            )));
        }
    }
    let store = builder.build().map_err(|e| super::store::error_chain(&e))?;
    Ok(StoreTarget::new(target.describe(), Arc::new(store)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bucket_goes_in_front_of_the_host() {
        assert_eq!(
            super::virtual_hosted("https://s3.eu-central-1.wasabisys.com", "oidc").as_deref(),
            Ok("https://oidc.s3.eu-central-1.wasabisys.com")
        );
    }
}
