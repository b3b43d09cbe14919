//! A cluster migrated to a public issuer by hand, as the blog posts do it (tests/hosts/
//! hand-migrated): the issuer replaced, `api-audiences=sts.amazonaws.com`. The one safe path:
//!
//! 1. `irsa-agent apply`: the hand-set issuer keeps signing; the default issuer is accepted
//!    again; the in-cluster audiences go back in front of `sts.amazonaws.com`, which stays
//!    (the tokens pods hold carry it alone); the apiserver restarts;
//! 2. the longest token lifetime later, `irsa-agent finalize`: the default issuer is retired
//!    and `sts.amazonaws.com` leaves `--api-audiences`.
//!
//! For k3s and kubeadm: the flags before and after each step (re-read the way the
//! distribution computes them), doctor's verdict and fixes at each point, `--no-restart` and an
//! early finalize refused, and no step rejecting a token it accepted before, by the apiserver's
//! rule (issuer accepted, one audience among `--api-audiences`).

mod apply_support;
mod https_support;

use apply_support::{Behaviour, FakeApiserver, Host, data};
use irsa_agent::apiserver::{self, flags::ServiceAccountFlags};
use irsa_agent::config::Distribution;
use irsa_agent::host::HostRoot;
use serde_json::Value;

const DEFAULT: &str = "https://kubernetes.default.svc.cluster.local";
const STS: &str = "sts.amazonaws.com";

struct Shape {
    distribution: Distribution,
    issuer: &'static str,
    /// The audiences tokens carried before the hand edit (the distribution's in-cluster ones).
    in_cluster: &'static [&'static str],
    kubeconfig: &'static str,
}

const K3S: Shape = Shape {
    distribution: Distribution::K3s,
    issuer: "https://oidc.example.com/homelab",
    in_cluster: &[DEFAULT, "k3s"],
    kubeconfig: "/etc/rancher/k3s/k3s.yaml",
};

const KUBEADM: Shape = Shape {
    distribution: Distribution::Kubeadm,
    issuer: "https://oidc.example.com/cluster-a",
    in_cluster: &[DEFAULT],
    kubeconfig: "/etc/kubernetes/admin.conf",
};

/// A token as a pod holds it: its issuer and audiences.
struct Token {
    what: &'static str,
    iss: &'static str,
    aud: Vec<&'static str>,
}

/// kube-apiserver's service-account authenticator: the issuer is one of the
/// `--service-account-issuer`s and one audience is among the api-audiences (all issuers when
/// unset).
fn accepts(f: &ServiceAccountFlags, t: &Token) -> bool {
    let audiences = f.effective_audiences();
    f.issuers.iter().any(|i| i == t.iss) && t.aud.iter().any(|a| audiences.iter().any(|x| x == a))
}

fn host_for(shape: &Shape) -> Host {
    let host = Host::new();
    host.agent_config(shape.issuer);
    match shape.distribution {
        Distribution::Kubeadm => {
            host.copy(
                &data("../hosts/hand-migrated/kube-apiserver-v1.31.yaml"),
                "/etc/kubernetes/manifests/kube-apiserver.yaml",
            )
            .kubeadm_keys();
        }
        _ => {
            host.copy(
                &data("../hosts/hand-migrated/k3s-config.yaml"),
                "/etc/rancher/k3s/config.yaml",
            )
            .k3s_keys("/var/lib/rancher/k3s");
        }
    }
    host
}

fn flags(host: &Host) -> ServiceAccountFlags {
    apiserver::observe(&HostRoot::new(host.root()), Distribution::Auto)
        .expect("observe")
        .flags
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `doctor --offline --json`: (status, fix) of one check.
fn check(host: &Host, id: &str) -> (String, String) {
    let out = host
        .agent()
        .args(["doctor", "--offline", "--json"])
        .output()
        .expect("doctor");
    let doc = json_of(&out);
    let c = doc["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {doc:#}"))
        .clone();
    (
        c["status"].as_str().unwrap_or("").to_string(),
        c["fix"].as_str().unwrap_or("").to_string(),
    )
}

/// Every `api-audiences=...` value a fix tells the user to set.
fn audiences_named(fix: &str) -> Vec<String> {
    fix.split("api-audiences=")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| !matches!(c, '`' | ' ' | ')' | ';'))
                .collect()
        })
        .collect()
}

fn migrate(shape: &Shape) -> String {
    let host = host_for(shape);
    let before = flags(&host);
    assert_eq!(before.issuers, [shape.issuer]);
    assert_eq!(before.api_audiences, Some(vec![STS.to_string()]));
    // What pods hold: the default token since the hand edit carries every api-audience then
    // (sts.amazonaws.com alone); an AWS token asked for sts.amazonaws.com; a token a client
    // read before the hand edit (kube-api-access lives up to a year).
    let since_edit = Token {
        what: "kube-api-access minted since the hand edit",
        iss: shape.issuer,
        aud: vec![STS],
    };
    let for_aws = Token {
        what: "aws-iam-token",
        iss: shape.issuer,
        aud: vec![STS],
    };
    let before_edit = Token {
        what: "kube-api-access minted before the hand edit",
        iss: DEFAULT,
        aud: shape.in_cluster.to_vec(),
    };
    assert!(accepts(&before, &since_edit) && accepts(&before, &for_aws));
    assert!(
        !accepts(&before, &before_edit),
        "the outage the edit caused"
    );

    // Doctor, before: both checks fail and both fixes name apply's repair, which keeps
    // sts.amazonaws.com; no fix says to set api-audiences without it.
    let mut words = String::new();
    for id in ["apiserver.old-issuers", "apiserver.api-audiences"] {
        let (status, fix) = check(&host, id);
        assert_eq!(status, "fail", "{id}");
        assert!(fix.contains("`irsa-agent apply`"), "{id}: {fix}");
        for value in audiences_named(&fix) {
            assert!(value.split(',').any(|a| a == STS), "{id}: {value}: {fix}");
            for a in shape.in_cluster {
                assert!(value.split(',').any(|x| x == *a), "{id}: {value}");
            }
        }
        words.push_str(&format!("before / {id}: {fix}\n"));
    }
    let (_, fix) = check(&host, "apiserver.api-audiences");
    assert!(fix.contains(&format!("keep {STS} for now")), "{fix}");
    assert!(fix.contains("`irsa-agent finalize` removes"), "{fix}");

    let server = FakeApiserver::start(Behaviour::FollowHost {
        root: host.root().to_path_buf(),
        distribution: shape.distribution,
    });
    host.kubeconfig(shape.kubeconfig, &server.url());
    let systemctl = host.fake_systemctl();
    let run = |args: &[&str]| {
        host.agent()
            .args(args)
            .args(["--timeout", "20s", "--poll-interval", "500ms"])
            .arg("--systemctl")
            .arg(&systemctl)
            // kubeadm: the manifest's advertise address, here the fake on 127.0.0.1.
            .env("IRSA_AGENT_APISERVER_URL", server.url())
            .output()
            .expect("run")
    };

    // The preview and --no-restart write nothing.
    let snapshot = host.snapshot();
    let out = run(&["apply", "--check", "--diff"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the issuer configuration was changed by hand"),
        "{stderr}"
    );
    let out = run(&["apply", "--no-restart"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing --no-restart"), "{stderr}");
    assert_eq!(host.snapshot(), snapshot, "a refused apply wrote something");

    // Step 1: apply.
    let out = run(&["apply", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json_of(&out);
    assert_eq!(result["restart"]["status"], "done", "{result:#}");
    let repaired = flags(&host);
    assert_eq!(repaired.issuers, [shape.issuer, DEFAULT]);
    let mut want: Vec<&str> = shape.in_cluster.to_vec();
    want.push(STS);
    assert_eq!(repaired.effective_audiences(), want);
    assert_eq!(
        repaired.jwks_uri(),
        Some(format!("{}/openid/v1/jwks", shape.issuer).as_str())
    );
    for t in [&since_edit, &for_aws, &before_edit] {
        assert!(accepts(&repaired, t), "rejected after apply: {}", t.what);
    }
    // Nothing accepted before stops being accepted.
    for i in &before.issuers {
        assert!(repaired.issuers.contains(i));
    }
    for a in before.effective_audiences() {
        assert!(repaired.effective_audiences().contains(&a));
    }
    let (status, _) = check(&host, "apiserver.old-issuers");
    assert_eq!(status, "pass");
    let (status, fix) = check(&host, "apiserver.api-audiences");
    assert_eq!(status, "fail", "sts.amazonaws.com is still there");
    assert!(!fix.contains("keep "), "{fix}");
    assert!(fix.contains("`irsa-agent finalize` removes"), "{fix}");
    let fix = match fix.split_once("took effect (") {
        Some((head, tail)) => format!(
            "{head}took effect (TIME{}",
            tail.find(')').map(|i| &tail[i..]).unwrap_or("")
        ),
        None => fix,
    };
    words.push_str(&format!("after apply / apiserver.api-audiences: {fix}\n"));
    // A second apply changes nothing.
    let out = run(&["apply", "--check"]);
    assert_eq!(out.status.code(), Some(0));

    // Step 2: finalize, refused right away.
    let out = run(&["finalize"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "refusing to retire {DEFAULT} and remove {STS} from --api-audiences yet"
        )),
        "{stderr}"
    );
    assert_eq!(flags(&host), repaired);
    // 25 hours after the repair (the state says so).
    let state_path = host.path("/var/lib/irsa-agent/state.json");
    let mut state: Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).expect("state")).expect("json");
    let at = state["issuer"]["switched_at"]
        .as_u64()
        .expect("switched_at");
    state["issuer"]["switched_at"] = serde_json::json!(at - 25 * 3600);
    std::fs::write(&state_path, state.to_string()).expect("write");
    let out = run(&["finalize", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = json_of(&out);
    assert_eq!(result["drop_audiences"], serde_json::json!([STS]));
    let done = flags(&host);
    assert_eq!(done.issuers, [shape.issuer]);
    assert_eq!(done.effective_audiences(), shape.in_cluster);
    // Default tokens minted since the repair carry every api-audience of then: accepted.
    let since_repair = Token {
        what: "kube-api-access minted since apply",
        iss: shape.issuer,
        aud: want.clone(),
    };
    assert!(accepts(&done, &since_repair));
    for id in ["apiserver.old-issuers", "apiserver.api-audiences"] {
        assert_eq!(check(&host, id).0, "pass", "{id} after finalize");
    }
    let out = run(&["apply", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "apply brought something back: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    words.replace(host.root().to_string_lossy().as_ref(), "")
}

#[test]
fn k3s_migrated_by_hand_takes_the_one_safe_path() {
    let words = migrate(&K3S);
    insta::assert_snapshot!(words);
}

#[test]
fn kubeadm_migrated_by_hand_takes_the_one_safe_path() {
    let words = migrate(&KUBEADM);
    insta::assert_snapshot!(words);
}

/// finalize never removes sts.amazonaws.com while the in-cluster audiences are missing: the
/// tokens pods hold would all be rejected.
#[test]
fn finalize_before_the_repair_refuses_and_says_apply_first() {
    let host = host_for(&K3S);
    let snapshot = host.snapshot();
    let out = host.agent().args(["finalize"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("removing it now would reject them; run `irsa-agent apply` first"),
        "{stderr}"
    );
    assert_eq!(host.snapshot(), snapshot);
}

/// kubeadm with its own DNS domain (networking.dnsDomain, which kubeadm writes into the
/// kubelet's clusterDomain): the default issuer that comes back is that domain's.
#[test]
fn kubeadm_with_its_own_dns_domain_gets_that_default_back() {
    let host = host_for(&KUBEADM);
    host.write(
        "/var/lib/kubelet/config.yaml",
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDNS:\n- 10.96.0.10\nclusterDomain: homelab.internal\n",
    );
    let out = host
        .agent()
        .args(["apply", "--check", "--json"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let result = json_of(&out);
    let own = "https://kubernetes.default.svc.homelab.internal";
    assert_eq!(
        result["after"]["issuers"],
        serde_json::json!([KUBEADM.issuer, own])
    );
    assert_eq!(
        result["after"]["api_audiences"],
        serde_json::json!([own, STS])
    );
    let (_, fix) = check(&host, "apiserver.old-issuers");
    assert!(
        fix.contains(&format!("--service-account-issuer={own}")),
        "{fix}"
    );
}
