//! The webhook's two links to the API, through the one Kubernetes client ([`crate::k8s`]):
//!
//! * **The ServiceAccount watch** feeding [`ServiceAccounts`]: a metadata-only watch
//!   (`kube::runtime::watcher` over `PartialObjectMeta<ServiceAccount>`; annotations are metadata, so the secrets list and the
//!   rest never travel), with kube-runtime's default backoff. A re-list replaces the cache whole
//!   once complete; meanwhile the old contents keep answering. A change to an annotation is in
//!   the cache as soon as the watch event arrives.
//! * **The registration**: the MutatingWebhookConfiguration ([`super::registration`]) applied
//!   server-side with one field manager (`irsa-agent`, forced), so every agent applies the same
//!   object and none fights another: at start, whenever the CA bundle changes, and every
//!   [`REAPPLY_EVERY`] (an edit or a deletion behind the agent's back is undone).
//!
//! Both run on the daemon's runtime, retrying on their own; the webhook answers from whatever
//! the cache holds meanwhile and never waits on them.

use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};

use super::{NAME, ServiceAccounts, registration};
use crate::config::webhook::WebhookSettings;
use crate::host::HostRoot;

/// The field manager of the registration.
pub const FIELD_MANAGER: &str = "irsa-agent";
/// How often the registration is applied again without a change.
pub const REAPPLY_EVERY: Duration = Duration::from_secs(600);
/// Requests' timeout; longer than the watch's own server-side timeout (290 s) so an idle
/// watch is not cut by the client.
const TIMEOUT: Duration = Duration::from_secs(330);
/// Wait before retrying when the apiserver cannot be reached at all.
const RETRY: Duration = Duration::from_secs(10);

fn slim(meta: &kube::core::ObjectMeta) -> Value {
    json!({"metadata": {
        "namespace": meta.namespace,
        "name": meta.name,
        "annotations": meta.annotations,
    }})
}

/// Runs until aborted: builds the client from the host's admin kubeconfig (retrying), then
/// watches ServiceAccounts and keeps the registration applied.
pub async fn run(
    root: HostRoot,
    distribution: crate::config::Distribution,
    settings: WebhookSettings,
    cache: ServiceAccounts,
    bundle: tokio::sync::watch::Receiver<String>,
) {
    let client = loop {
        match client(&root, distribution).await {
            Ok(c) => break c,
            Err(e) => {
                log::warn!(
                    "webhook: cannot reach the apiserver to watch ServiceAccounts and register: {e} (retrying in {}s)",
                    RETRY.as_secs()
                );
                tokio::time::sleep(RETRY).await;
            }
        }
    };
    tokio::join!(
        watch(client.clone(), cache),
        register(client, settings, bundle)
    );
}

async fn client(
    root: &HostRoot,
    distribution: crate::config::Distribution,
) -> Result<kube::Client, String> {
    let observed = crate::apiserver::observe(root, distribution).map_err(|e| e.to_string())?;
    let (kubeconfig, url) = crate::apiserver::probe::target(&observed);
    let api = crate::k8s::Api::from_kubeconfig(root, &kubeconfig, url, TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    api.client().map_err(|e| e.to_string())
}

/// Feeds the cache from a metadata-only watch of every ServiceAccount.
pub async fn watch(client: kube::Client, cache: ServiceAccounts) {
    // Metadata only: `Api<PartialObjectMeta<_>>` asks the apiserver for just that.
    let api = kube::Api::<kube::core::PartialObjectMeta<ServiceAccount>>::all(client);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    let mut listing: Option<Vec<Value>> = None;
    let mut ready = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(sa)) => cache.upsert(&slim(&sa.metadata)),
            Ok(Event::Delete(sa)) => {
                if let (Some(ns), Some(name)) = (&sa.metadata.namespace, &sa.metadata.name) {
                    cache.remove(ns, name);
                }
            }
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(sa)) => {
                if let Some(l) = listing.as_mut() {
                    l.push(slim(&sa.metadata));
                }
            }
            Ok(Event::InitDone) => {
                if let Some(l) = listing.take() {
                    cache.replace_all(l.iter());
                }
                if !ready {
                    log::info!(
                        "webhook: {} ServiceAccounts cached, watching for changes",
                        cache.len()
                    );
                    ready = true;
                }
            }
            Err(e) => log::warn!("webhook: ServiceAccount watch: {e} (retrying)"),
        }
    }
}

/// Applies the registration at start, on every bundle change and every [`REAPPLY_EVERY`].
pub async fn register(
    client: kube::Client,
    settings: WebhookSettings,
    mut bundle: tokio::sync::watch::Receiver<String>,
) {
    let api = kube::Api::<MutatingWebhookConfiguration>::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied_ok = false;
    loop {
        let ours = bundle.borrow_and_update().clone();
        let object = registration(&settings, &ours);
        // Another server's agent registered with its own CA: applying ours would make that
        // server's apiserver distrust its local agent. Until the CA is shared between agents,
        // the first registration stays and this is said loudly.
        let existing = api.get_opt(NAME).await;
        if let Ok(Some(current)) = &existing
            && !shares_a_ca(current, &ours)
        {
            log::error!(
                "webhook: MutatingWebhookConfiguration {NAME} was registered by another server's agent with another CA; not replacing it. With several servers the webhook needs a CA shared between agents, which is not built yet: serve it on one server only (webhook.enabled: false on the others) and delete {NAME} to let that one register"
            );
            applied_ok = false;
            tokio::select! {
                _ = tokio::time::sleep(REAPPLY_EVERY) => {}
                changed = bundle.changed() => if changed.is_err() { return },
            }
            continue;
        }
        match api.patch(NAME, &params, &Patch::Apply(&object)).await {
            Ok(_) => {
                if !applied_ok {
                    log::info!(
                        "webhook: registered MutatingWebhookConfiguration {NAME} ({})",
                        settings.url()
                    );
                }
                applied_ok = true;
            }
            Err(e) => {
                applied_ok = false;
                log::warn!("webhook: cannot register MutatingWebhookConfiguration {NAME}: {e}");
            }
        }
        let wait = if applied_ok { REAPPLY_EVERY } else { RETRY };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = bundle.changed() => if changed.is_err() { return },
        }
    }
}

/// Whether the registration's caBundle holds one of the CAs of `ours` (PEM).
fn shares_a_ca(current: &MutatingWebhookConfiguration, ours: &str) -> bool {
    let mine: Vec<Vec<u8>> = crate::keys::pem::blocks(ours.as_bytes())
        .into_iter()
        .map(|b| b.der)
        .collect();
    current.webhooks.iter().flatten().any(|w| {
        w.client_config.ca_bundle.as_ref().is_some_and(|bundle| {
            crate::keys::pem::blocks(&bundle.0)
                .iter()
                .any(|b| mine.contains(&b.der))
        })
    })
}
