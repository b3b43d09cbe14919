//! The `gcs` target: Google Cloud Storage through its XML API (`object_store`).
//!
//! Credentials: `credentials-file:` (a service-account key JSON, a host path), else the
//! application default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file), else the
//! metadata server (GCE/GKE workload identity). Conditional writes use object generations
//! (`x-goog-if-generation-match`, `0` to create). Public reading: grant `allUsers` the
//! `roles/storage.objectViewer` role on the bucket (uniform bucket-level access), or serve it
//! through a load balancer; the issuer is then `https://storage.googleapis.com/<bucket>/<prefix>`.
//! GCP workload identity federation can also take the JWKS inline (no hosting at all).

use std::sync::Arc;

use object_store::gcp::GoogleCloudStorageBuilder;

use super::store::StoreTarget;
use super::{Environment, http};
use crate::config::PublishTarget;

pub fn build(target: &PublishTarget, env: &Environment) -> Result<StoreTarget, String> {
    let PublishTarget::Gcs {
        bucket,
        credentials_file,
        endpoint,
        ..
    } = target
    else {
        return Err("not a gcs target".into());
    };
    let mut options = http::store_options(env.ca_file.as_deref())?;
    let mut builder = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
    if let Some(file) = credentials_file {
        let path = env.root.path(file);
        let key = crate::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read credentials-file {}: {e}", path.display()))?;
        builder = builder.with_service_account_key(key);
    }
    if let Some(endpoint) = endpoint {
        options = options.with_allow_http(endpoint.starts_with("http://"));
        builder = builder.with_base_url(endpoint);
    }
    let store = builder
        .with_client_options(options)
        .build()
        .map_err(|e| super::store::error_chain(&e))?;
    Ok(StoreTarget::new(target.describe(), Arc::new(store)))
}
