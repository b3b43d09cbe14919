//! The webhook's two links to the API, through the one Kubernetes client ([`crate::k8s`]):
//!
//! * **The ServiceAccount watch** feeding [`ServiceAccounts`]: a metadata-only watch
//!   (`kube::runtime::watcher` over `PartialObjectMeta<ServiceAccount>`; annotations are metadata, so the secrets list and the
//!   rest never travel), with kube-runtime's default backoff. A re-list replaces the cache whole
//!   once complete; meanwhile the old contents keep answering. A change to an annotation is in
//!   the cache as soon as the watch event arrives.
//! * **The CA shared by every agent** ([`sync_ca`]): the Secret `kube-system/irsa-agent-webhook-ca`
//!   holds the CAs with their keys (the text of the local file). The first agent to reach the
//!   API creates it from its local CA (a create fails when it exists, so exactly one agent
//!   wins); every agent adopts what the Secret holds, keeps a copy in its local file (0600) and
//!   issues its own serving certificate from it, on its own host. CA replacement (a new CA 180
//!   days before expiry, the old one dropped once expired) is done on the Secret, with the
//!   resourceVersion as a compare-and-swap, by whichever agent sees it due first; the others
//!   adopt the result at their next sync ([`CA_SYNC_EVERY`]). Without the API (at boot, before
//!   the apiserver answers) an agent serves from its local copy.
//! * **The registration**: the MutatingWebhookConfiguration ([`super::registration`]) applied
//!   server-side with one field manager (`irsa-agent`, forced). With the CA shared and the same
//!   `webhook:` settings on every server, every agent applies the same object (url
//!   `https://127.0.0.1:PORT/mutate` means "the agent on the apiserver's own host"), so
//!   applying is a no-op that writes nothing: no flapping. It is applied once the CA is shared,
//!   whenever the bundle changes, and every [`REAPPLY_EVERY`] (an edit or a deletion behind the
//!   agent's back is undone); when a reapply did change the object, the agent says so (another
//!   server with other `webhook:` settings would make the registration flap).
//!
//! * **Missed pods** ([`scan_missed`]): every [`MISSED_SCAN_EVERY`], once the cache is
//!   loaded, the pods are listed and those the webhook would still change
//!   ([`super::missed::find`]: created while no agent answered, with `failurePolicy: Ignore`)
//!   are counted (`irsa_agent_webhook_pods_missed`, `status`) and get a Warning Event
//!   (`IdentityNotInjected`, named after the pod's uid, so several agents make one).
//!
//! All run on the daemon's runtime, retrying on their own; the webhook answers from whatever
//! the cache holds meanwhile and never waits on them.

use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{
    Event as CoreEvent, ObjectReference, Pod, Secret, ServiceAccount,
};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::{Value, json};

use super::{Control, Counters, NAME, ServiceAccounts, certs, missed, registration};
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
/// How often an agent reads the shared CA again (and replaces a CA when due).
pub const CA_SYNC_EVERY: Duration = Duration::from_secs(3600);
/// How often the pods are checked for ones the webhook missed.
pub const MISSED_SCAN_EVERY: Duration = Duration::from_secs(60);
/// The Secret holding the CAs every agent shares.
pub const CA_SECRET_NAMESPACE: &str = "kube-system";
pub const CA_SECRET: &str = "irsa-agent-webhook-ca";
/// Its one key: the CA file's text (CERTIFICATE and PRIVATE KEY blocks).
pub const CA_SECRET_KEY: &str = "ca.pem";

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
    control: Control,
    counters: std::sync::Arc<Counters>,
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
        watch(client.clone(), cache.clone()),
        scan_missed(
            client.clone(),
            cache,
            settings.defaults.clone(),
            counters,
            MISSED_SCAN_EVERY
        ),
        share_then_register(
            client,
            root,
            settings,
            bundle,
            control,
            REAPPLY_EVERY,
            CA_SYNC_EVERY
        )
    );
}

/// Shares the CA (retrying until the first sync succeeds), then keeps the registration
/// applied (every `reapply`) and the CA shared (read again every `ca_sync`).
pub async fn share_then_register(
    client: kube::Client,
    root: HostRoot,
    settings: WebhookSettings,
    bundle: tokio::sync::watch::Receiver<String>,
    control: Control,
    reapply: Duration,
    ca_sync: Duration,
) {
    // Registering before the CA is shared would put this agent's own CA in the registration
    // for a moment, and the other servers' apiservers would distrust their agents meanwhile.
    let mut failed = false;
    loop {
        match share_once(&client, &root, &control, super::unix_now()).await {
            Ok(()) => break,
            Err(e) => {
                if !failed {
                    log::warn!("webhook: {e} (retrying every {}s)", RETRY.as_secs());
                }
                failed = true;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
    tokio::join!(
        register_every(client.clone(), settings, bundle, reapply),
        keep_shared(client, root, control, ca_sync)
    );
}

async fn share_once(
    client: &kube::Client,
    root: &HostRoot,
    control: &Control,
    now: u64,
) -> Result<(), String> {
    let local = crate::fs::read_optional(&root.path(certs::CA_FILE))
        .map_err(|e| format!("{}: {e}", certs::ca_file(root).display()))?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    let pem = sync_ca(client, local, now).await?;
    control.adopt(pem, now).await
}

async fn keep_shared(client: kube::Client, root: HostRoot, control: Control, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = share_once(&client, &root, &control, super::unix_now()).await {
            log::warn!(
                "webhook: {e} (the CA in use stays; tried again in {}s)",
                every.as_secs()
            );
        }
    }
}

fn secret_name() -> String {
    format!("{CA_SECRET_NAMESPACE}/{CA_SECRET}")
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

/// The CAs every agent shares, brought up to date at `now`: read from the Secret, or created
/// there from `local` (this host's CA file, or a new CA) when there is none. Several agents may
/// run this at once: creating and replacing are compare-and-swap, the loser reads again.
/// Returns the Secret's text (certificates and keys).
pub async fn sync_ca(
    client: &kube::Client,
    local: Option<String>,
    now: u64,
) -> Result<String, String> {
    let api = kube::Api::<Secret>::namespaced(client.clone(), CA_SECRET_NAMESPACE);
    let name = secret_name();
    for _ in 0..5 {
        let existing = api
            .get_opt(CA_SECRET)
            .await
            .map_err(|e| format!("cannot read the shared CA (Secret {name}): {e}"))?;
        let Some(secret) = existing else {
            // None yet: this agent's CA becomes the cluster's, unless another agent is faster.
            let mut cas = match &local {
                Some(text) => certs::Authorities::from_pem(text.as_bytes()).unwrap_or_default(),
                None => certs::Authorities::default(),
            };
            cas.maintain(now).map_err(|e| e.to_string())?;
            let pem = cas.to_pem().map_err(|e| e.to_string())?;
            match api
                .create(&PostParams::default(), &ca_secret(&pem, None))
                .await
            {
                Ok(_) => {
                    log::info!(
                        "webhook: created the shared CA (Secret {name}) from this host's CA"
                    );
                    return Ok(pem);
                }
                Err(e) if conflict(&e) => continue,
                Err(e) => return Err(format!("cannot create the shared CA (Secret {name}): {e}")),
            }
        };
        let text = secret
            .data
            .as_ref()
            .and_then(|d| d.get(CA_SECRET_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default();
        let mut cas = certs::Authorities::from_pem(text.as_bytes()).map_err(|why| {
            format!("Secret {name}, key {CA_SECRET_KEY}: {why} (delete the Secret to let an agent make a new CA)")
        })?;
        if !cas.maintain(now).map_err(|e| e.to_string())? {
            return Ok(text);
        }
        // A CA was added or dropped: write it back, only over the version read.
        let pem = cas.to_pem().map_err(|e| e.to_string())?;
        let version = secret.metadata.resource_version.clone();
        match api
            .replace(CA_SECRET, &PostParams::default(), &ca_secret(&pem, version))
            .await
        {
            Ok(_) => {
                log::info!(
                    "webhook: the shared CA (Secret {name}) now holds {} CA(s)",
                    cas.cas.len()
                );
                return Ok(pem);
            }
            Err(e) if conflict(&e) => continue,
            Err(e) => return Err(format!("cannot update the shared CA (Secret {name}): {e}")),
        }
    }
    Err(format!(
        "the shared CA (Secret {name}) kept changing under this agent; trying again later"
    ))
}

fn ca_secret(pem: &str, resource_version: Option<String>) -> Secret {
    Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(CA_SECRET_NAMESPACE.into()),
            resource_version,
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "irsa-agent".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [(
                CA_SECRET_KEY.to_string(),
                ByteString(pem.as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    }
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

/// Applies the registration now, on every bundle change and every [`REAPPLY_EVERY`].
pub async fn register(
    client: kube::Client,
    settings: WebhookSettings,
    bundle: tokio::sync::watch::Receiver<String>,
) {
    register_every(client, settings, bundle, REAPPLY_EVERY).await;
}

/// [`register`] reapplying every `every`.
pub async fn register_every(
    client: kube::Client,
    settings: WebhookSettings,
    mut bundle: tokio::sync::watch::Receiver<String>,
    every: Duration,
) {
    let api = kube::Api::<MutatingWebhookConfiguration>::all(client);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied: Option<String> = None;
    let mut differed_logged = false;
    loop {
        let ours = bundle.borrow_and_update().clone();
        let object = registration(&settings, &ours);
        let before = match api.get_opt(NAME).await {
            Ok(found) => found.and_then(|c| c.metadata.resource_version),
            Err(_) => None,
        };
        match api.patch(NAME, &params, &Patch::Apply(&object)).await {
            Ok(after) => {
                let after = after.metadata.resource_version;
                if applied.is_none() {
                    log::info!(
                        "webhook: registered MutatingWebhookConfiguration {NAME} ({})",
                        settings.url()
                    );
                } else if applied.as_deref() == Some(ours.as_str())
                    && before.is_some()
                    && before != after
                    && !differed_logged
                {
                    // Same bundle as last time, yet the apply wrote: someone else applies a
                    // different object. Every server needs the same `webhook:` settings.
                    log::warn!(
                        "webhook: MutatingWebhookConfiguration {NAME} differed from this agent's and was applied again; if another server's agent has other webhook settings (listen port, failure-policy, timeout, skip-namespaces), the registration flips between them: give every server the same `webhook:` section"
                    );
                    differed_logged = true;
                }
                applied = Some(ours);
            }
            Err(e) => {
                applied = None;
                log::warn!("webhook: cannot register MutatingWebhookConfiguration {NAME}: {e}");
            }
        }
        let wait = if applied.is_some() { every } else { RETRY };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = bundle.changed() => if changed.is_err() { return },
        }
    }
}

/// Every `every` (the first time as soon as the cache is loaded): lists the pods, keeps the
/// missed ones in `counters.missed`, and puts a Warning Event on each new one.
pub async fn scan_missed(
    client: kube::Client,
    cache: ServiceAccounts,
    defaults: crate::identity::admission::Defaults,
    counters: std::sync::Arc<Counters>,
    every: Duration,
) {
    let mut reported: std::collections::HashSet<String> = std::collections::HashSet::new();
    loop {
        while !cache.ready() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match list_pods(&client).await {
            Ok(pods) => {
                let found = missed::find(pods.iter(), &defaults, |ns, name| {
                    cache.get(ns, name).map(|sa| (*sa).clone())
                });
                let keys: Vec<String> = found.iter().map(missed::Missed::key).collect();
                if !keys.is_empty() {
                    log::warn!(
                        "webhook: {} pod(s) run without the identity their ServiceAccount names (created while no agent answered the webhook, or before the annotation): {}; delete them so their controllers recreate them",
                        keys.len(),
                        missed::summary(&keys)
                    );
                }
                for pod in &found {
                    if reported.contains(&pod.uid) {
                        continue;
                    }
                    match event(&client, pod).await {
                        Ok(()) => {
                            reported.insert(pod.uid.clone());
                        }
                        Err(e) => {
                            log::warn!("webhook: cannot put an Event on pod {}: {e}", pod.key())
                        }
                    }
                }
                // Forget pods that are gone (the set stays as small as the problem).
                reported.retain(|uid| found.iter().any(|p| &p.uid == uid));
                if let Ok(mut m) = counters.missed.lock() {
                    *m = Some(keys);
                }
            }
            Err(e) => log::warn!("webhook: cannot list pods to find ones the webhook missed: {e}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Every pod, as JSON, a page of 500 at a time.
async fn list_pods(client: &kube::Client) -> Result<Vec<Value>, kube::Error> {
    let api = kube::Api::<Pod>::all(client.clone());
    let mut out = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        out.extend(
            page.items
                .iter()
                .filter_map(|p| serde_json::to_value(p).ok()),
        );
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// The Warning Event on a missed pod. Named after the pod's uid: a second agent's create
/// finds it there (409), so the pod gets one Event however many agents look.
async fn event(client: &kube::Client, pod: &missed::Missed) -> Result<(), kube::Error> {
    let api = kube::Api::<CoreEvent>::namespaced(client.clone(), &pod.namespace);
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let event = CoreEvent {
        metadata: kube::core::ObjectMeta {
            name: Some(format!("{}.irsa-agent-{}", pod.name, pod.uid)),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        },
        reason: Some(missed::EVENT_REASON.into()),
        message: Some(format!(
            "created without the identity of ServiceAccount {} (the irsa-agent webhook did not answer, failurePolicy Ignore, or the annotation came later): it has no cloud credentials; fix: {}",
            pod.service_account,
            pod.fix()
        )),
        type_: Some("Warning".into()),
        source: Some(k8s_openapi::api::core::v1::EventSource {
            component: Some("irsa-agent".into()),
            host: None,
        }),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => Ok(()),
        Err(e) if conflict(&e) => Ok(()),
        Err(e) => Err(e),
    }
}
