//! The `azure-blob` target: Azure Blob Storage (`object_store`), by default the static website
//! container `$web`, served at `https://<account>.z<N>.web.core.windows.net/<key>`.
//!
//! Credentials come from the environment as the Azure SDKs read them: `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_SAS_KEY`, a service principal (`AZURE_CLIENT_ID` + `AZURE_CLIENT_SECRET` +
//! `AZURE_TENANT_ID`), workload identity (`AZURE_FEDERATED_TOKEN_FILE`), or managed identity.
//! Conditional writes use ETags (`If-Match`, `If-None-Match: *`). `endpoint:` replaces
//! `https://<account>.blob.core.windows.net` (Azurite, sovereign clouds, tests).

use std::sync::Arc;

use object_store::azure::MicrosoftAzureBuilder;

use super::store::StoreTarget;
use super::{Environment, http};
use crate::config::PublishTarget;

pub fn build(target: &PublishTarget, env: &Environment) -> Result<StoreTarget, String> {
    let PublishTarget::AzureBlob {
        account,
        container,
        endpoint,
        ..
    } = target
    else {
        return Err("not an azure-blob target".into());
    };
    let options = http::store_options(env.ca_file.as_deref())?;
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_client_options(options)
        .with_account(account)
        .with_container_name(container);
    if let Some(endpoint) = endpoint {
        builder = builder
            .with_allow_http(endpoint.starts_with("http://"))
            .with_endpoint(endpoint.clone());
    }
    let store = builder.build().map_err(|e| super::store::error_chain(&e))?;
    Ok(StoreTarget::new(target.describe(), Arc::new(store)))
}
