//! The hand-migrated cluster's safe path (tests/hand_migrated.rs) against a real kube-apiserver
//! (v1.36.2, named by `IRSA_TEST_KUBE_APISERVER`; without it the test says SKIPPED): tokens
//! are minted and reviewed by the apiserver itself, at each stage, with the flags irsa-agent's
//! plan gives for the k3s fixture of tests/hosts/hand-migrated.
//!
//! 1. k3s defaults (before the hand edit): a default token T0 (aud = api-audiences then);
//! 2. the hand edit (issuer replaced, `api-audiences=sts.amazonaws.com`): T0 is rejected (the
//!    outage), a default token T1 carries sts.amazonaws.com alone, and removing
//!    sts.amazonaws.com first would reject T1;
//! 3. `apply`'s flags: T0 and T1 are accepted again; a default token T2 is minted;
//! 4. `finalize`'s flags (the wait over): T2 is accepted, and a TokenReview for
//!    sts.amazonaws.com is no longer accepted by the Kubernetes API.

mod apply_support;
mod https_support;
mod kube_support;
mod support;

use apply_support::{Host, data};
use kube_support::Kube;
use serde_json::{Value, json};

use irsa_agent::apiserver::{self, flags::ServiceAccountFlags, plan};
use irsa_agent::config::Distribution;
use irsa_agent::host::HostRoot;

const NEW: &str = "https://oidc.example.com/homelab";
const STS: &str = "sts.amazonaws.com";

fn write_flags(kube: &Kube, f: &ServiceAccountFlags) {
    let (key, signing) = Kube::test_keys();
    let mut args = String::new();
    for i in &f.issuers {
        args.push_str(&format!("--service-account-issuer={i}\n"));
    }
    args.push_str(&format!(
        "--api-audiences={}\n",
        f.effective_audiences().join(",")
    ));
    if let Some(uri) = f.jwks_uri() {
        args.push_str(&format!("--service-account-jwks-uri={uri}\n"));
    }
    args.push_str(&format!(
        "--service-account-key-file={}\n--service-account-signing-key-file={}\n",
        key.display(),
        signing.display()
    ));
    std::fs::write(kube.flags.join("apiserver.args"), args).expect("args");
}

fn restart(kube: &Kube, f: &ServiceAccountFlags) {
    kube.stop_apiserver();
    write_flags(kube, f);
    kube.start();
}

/// A token requested without an audience, as kubelet requests the kube-api-access one.
fn default_token(kube: &Kube) -> String {
    let r = kube.ok(
        "POST",
        "/api/v1/namespaces/default/serviceaccounts/app/token",
        Some(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}})),
    );
    r["status"]["token"].as_str().expect("token").to_string()
}

fn flags_of(host: &Host) -> ServiceAccountFlags {
    apiserver::observe(&HostRoot::new(host.root()), Distribution::Auto)
        .expect("observe")
        .flags
}

#[test]
fn every_token_pods_hold_stays_accepted_on_the_real_apiserver() {
    let Some(kube) = Kube::temp("real_apiserver_hand_migrated") else {
        return;
    };
    let started = std::time::Instant::now();
    // 1. k3s as installed: its default flags, read by irsa-agent from a host without config.
    let fresh = Host::new();
    fresh
        .agent_config(NEW)
        .mkdir("/etc/rancher/k3s")
        .k3s_keys("/var/lib/rancher/k3s");
    write_flags(&kube, &flags_of(&fresh));
    kube.start();
    kube.ok(
        "POST",
        "/api/v1/namespaces/default/serviceaccounts",
        Some(&json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "app"}})),
    );
    let t0 = default_token(&kube);
    kube.accepts(&t0, None).expect("T0 before the hand edit");

    // 2. The hand edit of the fixture.
    let host = Host::new();
    host.agent_config(NEW)
        .copy(
            &data("../hosts/hand-migrated/k3s-config.yaml"),
            "/etc/rancher/k3s/config.yaml",
        )
        .k3s_keys("/var/lib/rancher/k3s");
    let edited = flags_of(&host);
    restart(&kube, &edited);
    assert!(
        kube.accepts(&t0, None).is_err(),
        "the hand edit's outage did not happen"
    );
    let t1 = default_token(&kube);
    kube.accepts(&t1, None).expect("T1 under the hand edit");
    // Removing sts.amazonaws.com first (doctor's old fix, read literally: the api-audiences
    // without it, i.e. unset, i.e. the issuers) rejects T1: what pods hold.
    let mut literal = edited.clone();
    literal.api_audiences = None;
    restart(&kube, &literal);
    assert!(
        kube.accepts(&t1, None).is_err(),
        "dropping sts.amazonaws.com first kept T1 valid?"
    );

    // 3. apply's plan (the same rule and edit apply runs), flags re-read from the edited files.
    let observed =
        apiserver::observe(&HostRoot::new(host.root()), Distribution::Auto).expect("observe");
    let mut target = plan::Target {
        issuer: NEW.into(),
        jwks_uri: format!("{NEW}/openid/v1/jwks"),
        remembered: Vec::new(),
        retire: Vec::new(),
        retired: Vec::new(),
        accept_only: false,
        drop_external_audiences: false,
    };
    let applied = plan::plan(&observed, &target).expect("apply's plan");
    assert!(!applied.restored_audiences.is_empty());
    restart(&kube, &applied.after);
    kube.accepts(&t0, None)
        .expect("T0 (minted before the hand edit) after apply");
    kube.accepts(&t1, None)
        .expect("T1 (aud sts.amazonaws.com alone) after apply");
    let t2 = default_token(&kube);

    // 4. finalize's plan on the host as apply left it.
    for change in &applied.changes {
        host.write(&change.path.display().to_string(), &change.new);
    }
    let observed =
        apiserver::observe(&HostRoot::new(host.root()), Distribution::Auto).expect("observe");
    target.retire = applied.restored_issuers.clone();
    target.drop_external_audiences = true;
    let finalized = plan::plan(&observed, &target).expect("finalize's plan");
    assert_eq!(finalized.dropped_audiences, [STS]);
    restart(&kube, &finalized.after);
    kube.accepts(&t2, None)
        .expect("T2 (minted after apply) after finalize");
    // sts.amazonaws.com is no longer an audience the Kubernetes API accepts.
    let review = kube.accepts(&t1, None);
    assert!(review.is_err(), "T1 is for AWS only now");
    let r: Value = kube.ok(
        "POST",
        "/api/v1/namespaces/default/serviceaccounts/app/token",
        Some(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"audiences": [STS]}})),
    );
    let aws = r["status"]["token"].as_str().expect("token");
    assert!(kube.accepts(aws, None).is_err());
    eprintln!(
        "real apiserver, five starts: {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
