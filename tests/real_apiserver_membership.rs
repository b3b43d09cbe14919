//! Membership Leases against the real kube-apiserver (v1.36.2, named by
//! `IRSA_TEST_KUBE_APISERVER`; without it the test says SKIPPED): an agent announces itself in
//! `kube-system`, renews, and the view names the apiserver (by the host in its own identity
//! Lease) that has no live agent.

mod kube_support;
mod run_support;
mod support;

use irsa_agent::host::HostRoot;
use irsa_agent::membership::{self, Report};
use kube_support::Kube;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A current-thread runtime for the tests' calls to the apiserver.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A client with the test apiserver's admin credential, on `runtime`.
fn admin_client(kube: &Kube, runtime: &tokio::runtime::Runtime) -> kube::Client {
    runtime.block_on(async {
        irsa_agent::k8s::Api::from_kubeconfig(
            &HostRoot::new("/"),
            &kube.state.join("kubeconfig"),
            None,
            std::time::Duration::from_secs(10),
        )
        .await
        .expect("client config")
        .client()
        .expect("client")
    })
}

#[test]
fn an_agent_announces_itself_and_the_apiserver_without_one_is_named() {
    let Some(kube) = Kube::temp("real_apiserver_membership") else {
        return;
    };
    kube.start_with_test_keys("https://oidc.example.com/homelab", "");
    // kube-apiserver names its host in its identity Lease (os.Hostname).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let runtime = runtime();
    let client = admin_client(&kube, &runtime);
    runtime.block_on(async {
        // The apiserver's identity Lease appears shortly after it starts.
        let mut view = membership::View::default();
        for _ in 0..60 {
            view = membership::view(&client, now()).await.expect("view");
            if view.apiservers.contains(&host) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        assert_eq!(view.apiservers, vec![host.clone()], "{view:?}");
        assert_eq!(view.without_agent(), vec![host.clone()], "no agent yet");

        // Another node's agent does not count for this apiserver.
        let report = Report {
            version: "test".into(),
            issuers: vec!["https://oidc.example.com/homelab".into()],
            kids: vec!["kid-a".into()],
            rollout: "signing".into(),
            rotation: "idle".into(),
            ..Report::default()
        };
        membership::announce(&client, "elsewhere", &report, 40, now())
            .await
            .expect("announce");
        let view = membership::view(&client, now()).await.expect("view");
        assert_eq!(view.without_agent(), vec![host.clone()], "{view:?}");

        // Its own agent does; the report reads back as written.
        membership::announce(&client, &host, &report, 40, now())
            .await
            .expect("announce");
        let view = membership::view(&client, now()).await.expect("view");
        assert!(view.without_agent().is_empty(), "{view:?}");
        let mine = view
            .agents
            .iter()
            .find(|a| a.node == host)
            .expect("own lease");
        assert!(mine.live);
        assert_eq!(mine.report.as_ref(), Some(&report));

        // A renewal moves renewTime and keeps acquireTime; past its duration it is not live.
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{}",
            membership::lease_name(&host)
        );
        let before = kube.ok("GET", &path, None);
        let later = now() + 30;
        let renewed = Report {
            rotation: "staged".into(),
            ..report.clone()
        };
        membership::announce(&client, &host, &renewed, 40, later)
            .await
            .expect("renew");
        let after = kube.ok("GET", &path, None);
        assert_eq!(
            before["spec"]["acquireTime"], after["spec"]["acquireTime"],
            "{after}"
        );
        assert_ne!(
            before["spec"]["renewTime"], after["spec"]["renewTime"],
            "{after}"
        );
        let view = membership::view(&client, later + 41).await.expect("view");
        let mine = view
            .agents
            .iter()
            .find(|a| a.node == host)
            .expect("own lease");
        assert!(!mine.live, "expired at renewTime + 40 s");
        assert_eq!(mine.report.as_ref(), Some(&renewed));
        assert!(
            !view.agents.iter().any(|a| a.node == "restart"),
            "the restart Lease is not an agent"
        );
    });
}

#[test]
fn one_node_at_a_time_holds_the_restart_lease_and_a_dead_holder_frees_it() {
    use membership::Restart;
    let Some(kube) = Kube::temp("real_apiserver_membership") else {
        return;
    };
    kube.start_with_test_keys("https://oidc.example.com/homelab", "");
    let runtime = runtime();
    let client = admin_client(&kube, &runtime);
    runtime.block_on(async {
        let t = now();
        // Two agents race for the free Lease: exactly one holds it.
        let (a, b) = tokio::join!(
            membership::acquire_restart(&client, "cp-a", 60, t),
            membership::acquire_restart(&client, "cp-b", 60, t),
        );
        let (a, b) = (a.expect("cp-a"), b.expect("cp-b"));
        let (winner, loser) = match (&a, &b) {
            (Restart::Held { .. }, Restart::Busy { holder, .. }) if holder == "cp-a" => {
                ("cp-a", "cp-b")
            }
            (Restart::Busy { holder, .. }, Restart::Held { .. }) if holder == "cp-b" => {
                ("cp-b", "cp-a")
            }
            other => panic!("not exactly one holder: {other:?}"),
        };
        // The holder renews; the other is told who holds it and until when.
        assert_eq!(
            membership::acquire_restart(&client, winner, 60, t + 10)
                .await
                .expect("renew"),
            Restart::Held { until: t + 70 }
        );
        assert_eq!(
            membership::acquire_restart(&client, loser, 60, t + 20)
                .await
                .expect("busy"),
            Restart::Busy {
                holder: winner.to_string(),
                until: t + 70
            }
        );
        // Only the holder can give it back; then the other takes it.
        membership::release_restart(&client, loser)
            .await
            .expect("release by a non-holder is a no-op");
        assert!(matches!(
            membership::acquire_restart(&client, loser, 60, t + 20).await,
            Ok(Restart::Busy { .. })
        ));
        membership::release_restart(&client, winner)
            .await
            .expect("release");
        assert_eq!(
            membership::acquire_restart(&client, loser, 5, t + 30)
                .await
                .expect("take"),
            Restart::Held { until: t + 35 }
        );
        // A holder that died (never renewed) frees the Lease when its duration has passed.
        assert!(matches!(
            membership::acquire_restart(&client, winner, 60, t + 34).await,
            Ok(Restart::Busy { .. })
        ));
        assert_eq!(
            membership::acquire_restart(&client, winner, 60, t + 36)
                .await
                .expect("take over"),
            Restart::Held { until: t + 96 }
        );
        let lease = kube.ok(
            "GET",
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/irsa-agent-restart",
            None,
        );
        assert_eq!(lease["spec"]["holderIdentity"], winner, "{lease}");
        // Two changes of holder: the winner to the other, and back after the other died.
        assert_eq!(lease["spec"]["leaseTransitions"], 2, "{lease}");
    });
}

/// A server whose agent's Lease expired and whose apiserver does not announce itself (powered
/// off, or its apiserver kept down while its agent cannot renew through it) is still expected:
/// no other server takes its restart turn until it is back or its Lease is deleted.
#[test]
fn an_expired_agent_lease_without_its_apiserver_holds_the_restart_turn() {
    use irsa_agent::apiserver::change::{Attempt, try_turn_as};
    let Some(kube) = Kube::temp("real_apiserver_membership") else {
        return;
    };
    kube.start_with_test_keys("https://oidc.example.com/homelab", "");
    let runtime = runtime();
    let client = admin_client(&kube, &runtime);
    runtime.block_on(async {
        // This apiserver's host, as its identity Lease names it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let me = loop {
            let leases = membership::list(&client).await.expect("leases");
            if let Some(a) = membership::apiservers_of(&leases, now()).first() {
                break a.host.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no identity Lease");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        // cp-gone's agent renewed its Lease last 100 s ago, for 30 s.
        membership::announce(&client, "cp-gone", &Report::default(), 30, now() - 100)
            .await
            .expect("announce");
        match try_turn_as(&client, &me, "irsa-agent", 60, now()).await {
            Ok(Attempt::PeerDown(why)) => {
                assert!(why.contains("waiting for cp-gone's apiserver"), "{why}");
                assert!(
                    why.contains("kubectl -n kube-system delete lease irsa-agent-cp-gone"),
                    "{why}"
                );
            }
            other => panic!("not held for cp-gone: {other:?}"),
        }
        // Removed for good: its Lease deleted, the turn is this server's.
        kube.ok(
            "DELETE",
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/irsa-agent-cp-gone",
            None,
        );
        match try_turn_as(&client, &me, "irsa-agent", 60, now()).await {
            Ok(Attempt::Held) => {}
            other => panic!("not this server's turn: {other:?}"),
        }
    });
}

/// The k3s admin kubeconfig, as k3s writes it, pointing at the test's apiserver.
fn k3s_kubeconfig(root: &std::path::Path, kube: &Kube) {
    use base64::Engine as _;
    let b64 = |name: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(kube.pki(name)).expect("pki"))
    };
    std::fs::write(
        root.join("etc/rancher/k3s/k3s.yaml"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: {}\n    server: https://127.0.0.1:{}\n  name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\ncurrent-context: default\nusers:\n- name: default\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
            b64("ca.crt"),
            kube.port,
            b64("admin.crt"),
            b64("admin.key")
        ),
    )
    .expect("kubeconfig");
}

fn doctor_check(root: &std::path::Path, id: &str) -> serde_json::Value {
    let (_, stdout, stderr) = support::agent(root, &["doctor", "--json"], &[]);
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("doctor --json");
    doc["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == id).cloned())
        .unwrap_or_else(|| panic!("no {id} in {stdout}{stderr}"))
}

/// `status --json`, `status`, `apply --check`, `rotate --status` and `doctor` of the real
/// binary show the cluster the Leases on a real apiserver describe: which server is where in
/// the rollout, what comes next, what signing waits for, and what is wrong.
#[test]
fn status_apply_rotate_and_doctor_show_the_cluster_from_the_leases() {
    let Some(kube) = Kube::temp("real_apiserver_membership") else {
        return;
    };
    const OLD: &str = "https://kubernetes.default.svc.cluster.local";
    // A closed port on loopback: doctor's public checks fail fast and stay off the network.
    const NEW: &str = "https://127.0.0.1:1/c1";
    let host = support::k3s_host(&format!("issuer: {NEW}\ndistribution: k3s\n"));
    let root = host.path();
    let tls = root.join("var/lib/rancher/k3s/server/tls");
    std::fs::write(
        kube.flags.join("apiserver.args"),
        format!(
            "--service-account-issuer={OLD}\n--service-account-key-file={}\n--service-account-signing-key-file={}\n",
            tls.join("service.key").display(),
            tls.join("service.current.key").display()
        ),
    )
    .expect("args");
    kube.start();
    k3s_kubeconfig(root, &kube);
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let runtime = runtime();
    let client = admin_client(&kube, &runtime);
    runtime.block_on(async {
        // Wait for this apiserver's identity Lease.
        for _ in 0..60 {
            let view = membership::view(&client, now()).await.expect("view");
            if view.apiservers.contains(&me) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    let report = |issuers: &[&str], kid: &str| Report {
        version: "0.1.0".into(),
        issuers: issuers.iter().map(|s| s.to_string()).collect(),
        kids: vec![kid.into()],
        signing_kid: Some(kid.into()),
        rollout: String::new(),
        rotation: "idle".into(),
        switched_at: None,
        jwks: Vec::new(),
    };
    runtime.block_on(async {
        // This server's agent accepts the new issuer; cp-b's does not yet. A holder that died
        // left the restart Lease behind (its time is past).
        membership::announce(&client, &me, &report(&[OLD, NEW], "kid-me"), 60, now())
            .await
            .expect("announce");
        membership::announce(&client, "cp-b", &report(&[OLD], "kid-b"), 60, now())
            .await
            .expect("announce");
        membership::acquire_restart(&client, "cp-gone", 5, now() - 100)
            .await
            .expect("restart lease");
    });

    let t = std::time::Instant::now();
    let (code, stdout, stderr) = support::agent(root, &["status", "--json"], &[]);
    let status_ms = t.elapsed().as_millis();
    assert_eq!(code, 2, "no daemon runs: {stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("status --json");
    let cluster = &doc["cluster"];
    assert_eq!(cluster["view"], "servers", "{cluster}");
    assert_eq!(cluster["issuer"], NEW);
    let mut want = vec!["cp-b".to_string(), me.clone()];
    want.sort();
    let servers = cluster["servers"].as_array().expect("servers");
    let nodes: Vec<&str> = servers.iter().filter_map(|s| s["node"].as_str()).collect();
    assert_eq!(nodes, want, "{cluster}");
    let server = |node: &str| {
        servers
            .iter()
            .find(|s| s["node"] == node)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(server(&me)["rollout"], "accepting");
    assert_eq!(server(&me)["this"], true);
    assert_eq!(server(&me)["apiserver"], true);
    assert_eq!(server(&me)["signing_kid"], "kid-me");
    assert_eq!(server("cp-b")["rollout"], "before");
    assert_eq!(server("cp-b")["agent"], "live");
    assert_eq!(
        server("cp-b")["apiserver"],
        false,
        "cp-b has no apiserver here"
    );
    assert_eq!(server("cp-b")["rotation"], "idle");
    let next = cluster["next"].as_str().unwrap_or("");
    assert!(next.starts_with(&format!("cp-b accepts {NEW}")), "{next}");
    assert_eq!(
        cluster["waits_for"],
        serde_json::json!(["cp-b (does not accept it yet)"])
    );
    assert_eq!(cluster["restart"]["holder"], "cp-gone");
    assert_eq!(cluster["restart"]["expired"], true);
    // This host's files (k3s defaults: the old issuer only) say it accepts first.
    assert!(
        cluster["this_server_next"]
            .as_str()
            .is_some_and(|n| n.starts_with("accept the issuer")),
        "{cluster}"
    );
    eprintln!("status --json with the cluster: {status_ms} ms");

    let (_, text, _) = support::agent(root, &["status"], &[]);
    eprintln!("{text}");
    assert!(text.contains("cluster:       2 servers ("), "{text}");
    assert!(text.contains("  cp-b: agent 0.1.0, no apiserver identity Lease, before (signs with https://kubernetes.default.svc.cluster.local)"), "{text}");
    assert!(
        text.contains("restart Lease: held by cp-gone PAST ITS TIME"),
        "{text}"
    );

    let (code, text, stderr) = support::agent(root, &["apply", "--check", "--diff"], &[]);
    eprintln!("{text}");
    assert_eq!(code, 2, "{text}{stderr}");
    assert!(
        text.contains(&format!("this server ({me}) next: accept the issuer")),
        "{text}"
    );

    // `apply` itself (not --accept-only) would make this server sign before cp-b, whose agent
    // is live, accepts the issuer: refused, nothing written.
    let files_before = std::fs::read(root.join("etc/rancher/k3s/config.yaml")).ok();
    let (code, text, stderr) = support::agent(root, &["apply"], &[]);
    assert_eq!(code, 1, "{text}{stderr}");
    assert!(
        stderr.contains(&format!("refusing to sign with {NEW} here"))
            && stderr.contains("--accept-only"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(root.join("etc/rancher/k3s/config.yaml")).ok(),
        files_before,
        "apply wrote although it refused"
    );

    let (_, text, stderr) = support::agent(root, &["rotate", "--status"], &[]);
    assert!(
        text.contains("  cp-b: rotation idle; verifies with kid-b, signs with kid-b"),
        "{text}{stderr}"
    );

    // doctor: cp-b does not accept the issuer, the restart Lease is past its time.
    let check = doctor_check(root, "running.cluster");
    eprintln!("{check:#}");
    assert_eq!(check["status"], "warn", "{check}");
    let finding = check["finding"].as_str().unwrap_or("");
    assert!(
        finding.contains("the apiserver of cp-b does not accept"),
        "{finding}"
    );
    assert!(
        finding.contains("restart Lease is held by cp-gone past its time"),
        "{finding}"
    );
    // cp-b signs with an issuer this server does not accept: its tokens are rejected here.
    runtime.block_on(async {
        membership::announce(
            &client,
            "cp-b",
            &report(&["https://other.example/x"], "kid-b"),
            60,
            now(),
        )
        .await
        .expect("announce");
    });
    let check = doctor_check(root, "running.cluster");
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["finding"]
            .as_str()
            .is_some_and(|f| f.contains(&format!(
                "cp-b signs with https://other.example/x, which {me} does not accept"
            ))),
        "{check}"
    );

    // The daemon's metrics (it leaves the apiserver alone here: run.apply-issuer false).
    std::fs::create_dir_all(root.join("srv/oidc")).expect("target");
    std::fs::create_dir_all(root.join("var/lib/node-exporter")).expect("textfile dir");
    support::write_config(
        root,
        &format!(
            "issuer: {NEW}\ndistribution: k3s\npublic-check: false\npublish:\n  - type: directory\n    path: /srv/oidc\nrun:\n  apply-issuer: false\n  resync-interval: 1s\n  metrics-textfile: /var/lib/node-exporter/irsa_agent.prom\n"
        ),
    );
    // Under a name of its own: a running agent announces itself (it would renew this host's
    // Lease, which the test expires below).
    let mut daemon = run_support::Daemon::start(root, &["--node-name", "cp-daemon"], &[]);
    daemon.wait_ready();
    let textfile = root.join("var/lib/node-exporter/irsa_agent.prom");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&textfile).unwrap_or_default();
        if text.contains("irsa_agent_cluster_servers ") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    for line in [
        "irsa_agent_cluster_readable 1".to_string(),
        "irsa_agent_cluster_servers 3".to_string(),
        "irsa_agent_cluster_servers_without_agent 0".to_string(),
        "irsa_agent_cluster_server_rollout_phase{node=\"cp-b\",phase=\"before\"} 1".to_string(),
        format!("irsa_agent_cluster_server_rollout_phase{{node=\"{me}\",phase=\"accepting\"}} 1"),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    // Its own Lease expired: the apiserver here has no live agent any more.
    runtime.block_on(async {
        membership::announce(&client, &me, &report(&[OLD, NEW], "kid-me"), 1, now() - 10)
            .await
            .expect("announce");
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&textfile).unwrap_or_default();
        if text.contains("irsa_agent_cluster_servers_without_agent 1")
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        text.lines().any(|l| l
            == format!(
                "irsa_agent_cluster_server_rollout_phase{{node=\"{me}\",phase=\"unknown\"}} 1"
            )),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "irsa_agent_cluster_servers_without_agent 1"),
        "{text}"
    );
    drop(daemon);
}

/// The requests the daemon made about the cluster (Leases, Endpoints), as the apiserver's audit
/// log recorded them: `verb resource/name` each (`name` empty for a list). The test's own
/// requests (curl) are left out.
fn daemon_requests(audit: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| e["user"]["username"] == "kapi-admin")
        .filter(|e| !e["userAgent"].as_str().unwrap_or("").starts_with("curl"))
        .map(|e| {
            format!(
                "{} {}/{}",
                e["verb"].as_str().unwrap_or(""),
                e["objectRef"]["resource"].as_str().unwrap_or(""),
                e["objectRef"]["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// A k3s host in sync with a real apiserver (the issuer and JWKS URI it runs with: `apply`
/// has nothing to change), whose requests about Leases and Endpoints go to an audit log.
struct InSync {
    kube: Kube,
    host: tempfile::TempDir,
    audit: std::path::PathBuf,
    /// The host name: the apiserver's, and the daemon's node name.
    me: String,
}

/// `None` (SKIPPED) without a kube-apiserver.
fn in_sync() -> Option<InSync> {
    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    let kube = Kube::temp("real_apiserver_membership")?;
    let host = support::k3s_host(&format!(
        "issuer: {ISSUER}\ndistribution: k3s\npublic-check: false\npublish:\n  - type: directory\n    path: /srv/oidc\n"
    ));
    let root = host.path();
    // What `apply` writes for this issuer, and the apiserver runs with it.
    std::fs::write(
        root.join("etc/rancher/k3s/config.yaml"),
        format!("kube-apiserver-arg:\n  - service-account-jwks-uri={ISSUER}/openid/v1/jwks\n"),
    )
    .expect("k3s config");
    let tls = root.join("var/lib/rancher/k3s/server/tls");
    let policy = kube.dir().join("audit-policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n  resources:\n  - group: coordination.k8s.io\n    resources: [leases]\n  - group: \"\"\n    resources: [endpoints]\n- level: None\n",
    )
    .expect("audit policy");
    let audit = kube.dir().join("audit.log");
    std::fs::write(
        kube.flags.join("apiserver.args"),
        format!(
            "--service-account-issuer={ISSUER}\n--service-account-jwks-uri={ISSUER}/openid/v1/jwks\n--service-account-key-file={}\n--service-account-signing-key-file={}\n--audit-policy-file={}\n--audit-log-path={}\n",
            tls.join("service.key").display(),
            tls.join("service.current.key").display(),
            policy.display(),
            audit.display()
        ),
    )
    .expect("args");
    kube.start();
    k3s_kubeconfig(root, &kube);
    // The apiserver announces itself first (the view is then what it stays).
    let identities = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases?labelSelector=apiserver.kubernetes.io%2Fidentity%3Dkube-apiserver";
    run_support::eventually(std::time::Duration::from_secs(30), || {
        let list = kube.ok("GET", identities, None);
        (list["items"].as_array().is_some_and(|i| !i.is_empty())).then_some(())
    })
    .expect("the apiserver's identity Lease");
    let me = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    Some(InSync {
        kube,
        host,
        audit,
        me,
    })
}

impl InSync {
    /// The daemon's section of the state file (`status` would ask the apiserver too).
    fn daemon_state(&self) -> serde_json::Value {
        std::fs::read_to_string(self.host.path().join("var/lib/irsa-agent/state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|s| s["daemon"].clone())
            .unwrap_or_default()
    }

    /// Sends SIGHUP and waits for the converge it asks for.
    fn reload(&self, d: &mut run_support::Daemon) {
        let last = self.daemon_state()["last_converge"].clone();
        d.signal(rustix::process::Signal::HUP);
        run_support::eventually(run_support::DEADLINE, || {
            let s = self.daemon_state();
            (s["last_converge"] != last && s["last_converge"]["trigger"] == "reload").then_some(())
        })
        .unwrap_or_else(|| panic!("no converge after SIGHUP:\n{}", d.log()));
    }

    /// A client with the test apiserver's admin credential, on `runtime`.
    fn client(&self, runtime: &tokio::runtime::Runtime) -> kube::Client {
        admin_client(&self.kube, runtime)
    }

    /// The restart Lease's holder now (`Null` when released).
    fn restart_holder(&self) -> serde_json::Value {
        let lease = self.kube.ok(
            "GET",
            &format!(
                "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{}",
                membership::RESTART
            ),
            None,
        );
        lease["spec"]["holderIdentity"].clone()
    }
}

/// One converge of the daemon on a server in sync reads the cluster's Leases once, with one
/// list, and renews its own Lease with one write: counted in the real apiserver's audit log
/// over a converge asked for by SIGHUP (the tasks after it included). Before, each part of the
/// step read them for itself (the published union, the rollout, the restart Lease left over,
/// the announcement, the metrics): 10 requests through 5 clients, 12 with the rotation task's.
#[test]
fn a_converge_reads_the_leases_once() {
    let Some(s) = in_sync() else {
        return;
    };
    let mut d = run_support::Daemon::start(s.host.path(), &["--no-restart"], &[]);
    d.wait_ready();
    d.wait_status("in sync", |st| st["daemon"]["phase"] == "in-sync");
    // Quiet: nothing more is asked after the converge and its tasks.
    let quiet = |d: &mut run_support::Daemon| {
        let mut last = daemon_requests(&s.audit).len();
        let mut still = 0;
        while still < 3 {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let n = daemon_requests(&s.audit).len();
            still = if n == last { still + 1 } else { 0 };
            last = n;
        }
        d.assert_running();
        last
    };
    let before = quiet(&mut d);
    s.reload(&mut d);
    let after = quiet(&mut d);
    let requests = daemon_requests(&s.audit)[before..after].to_vec();
    eprintln!(
        "one converge: {} request(s) about the cluster:\n  {}",
        requests.len(),
        requests.join("\n  ")
    );
    // The apiserver step: one list, its own Lease renewed over what it listed (no read first).
    let renewal = format!("update leases/{}", membership::lease_name(&s.me));
    let step = requests
        .iter()
        .position(|r| *r == renewal)
        .map(|i| requests[..=i].to_vec());
    assert_eq!(
        step,
        Some(vec!["list leases/".to_string(), renewal.clone()]),
        "{requests:#?}"
    );
    // Then the rotation task, which reads the Leases for itself (src/rotation), once.
    let lists = requests.iter().filter(|r| r.starts_with("list")).count();
    assert!(lists <= 2, "{requests:#?}");
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}

/// At the start of a step the daemon gives back the restart Lease it holds (a daemon killed
/// mid-restart left it: every other server's restart would wait until it expires), but not
/// the one an `irsa-agent apply` on the same host holds, under its own name, for a restart it is
/// carrying out.
#[test]
fn the_daemon_gives_back_its_own_left_over_turn_not_that_of_an_apply_beside_it() {
    let Some(s) = in_sync() else {
        return;
    };
    let runtime = runtime();
    let client = s.client(&runtime);
    // Left by this node's daemon, killed while restarting: live for five more minutes.
    runtime
        .block_on(membership::acquire_restart(&client, &s.me, 300, now()))
        .expect("restart lease");
    assert_eq!(s.restart_holder(), s.me.as_str());
    let mut d = run_support::Daemon::start(s.host.path(), &["--no-restart"], &[]);
    d.wait_ready();
    run_support::eventually(run_support::DEADLINE, || {
        s.restart_holder().is_null().then_some(())
    })
    .unwrap_or_else(|| panic!("the left-over turn was kept:\n{}", d.log()));

    // `apply` run by hand on this host takes the turn as itself.
    let apply = irsa_agent::apiserver::change::command_holder(&s.me);
    assert_ne!(
        apply, s.me,
        "apply and the daemon hold the turn under different names"
    );
    runtime
        .block_on(membership::acquire_restart(&client, &apply, 300, now()))
        .expect("restart lease");
    s.reload(&mut d);
    assert_eq!(s.restart_holder(), apply.as_str(), "{}", d.log());
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}

/// `status` and `doctor` pick "this server" out of the cluster by the node name the daemon
/// runs with (`--node-name` in its unit, recorded in the state file), not by the host name a
/// shell has; `--node-name` given to them wins.
#[test]
fn status_and_doctor_name_this_server_as_the_daemon_does() {
    let Some(s) = in_sync() else {
        return;
    };
    const NODE: &str = "cp-named";
    let mut d =
        run_support::Daemon::start(s.host.path(), &["--no-restart", "--node-name", NODE], &[]);
    d.wait_ready();
    d.wait_status("in sync", |st| st["daemon"]["phase"] == "in-sync");
    let root = s.host.path();
    let this = |args: &[&str]| {
        let (_, stdout, stderr) = support::agent(root, args, &[]);
        let doc: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}{stderr}"));
        let servers = doc["cluster"]["servers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let this: Vec<String> = servers
            .iter()
            .filter(|sv| sv["this"] == true)
            .filter_map(|sv| sv["node"].as_str().map(str::to_string))
            .collect();
        (doc["cluster"]["node"].clone(), this)
    };
    assert_eq!(
        this(&["status", "--json"]),
        (serde_json::json!(NODE), vec![NODE.to_string()])
    );
    assert_eq!(
        this(&["status", "--json", "--node-name", &s.me]),
        (serde_json::json!(s.me), vec![s.me.clone()])
    );
    let check = doctor_check(root, "running.cluster");
    let text = check.to_string();
    assert!(text.contains(&format!("{NODE} (this server)")), "{check:#}");
    assert!(
        !text.contains(&format!("{} (this server)", s.me)),
        "{check:#}"
    );
    let (exit, log) = d.stop();
    assert_eq!(exit.code(), Some(0), "{log}");
}
