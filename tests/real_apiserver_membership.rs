//! Membership Leases against the real kube-apiserver (v1.36.2, named by
//! `IRSA_TEST_KUBE_APISERVER`; without it the test says SKIPPED): an agent announces itself in
//! `kube-system`, renews, and the view names the apiserver (by the host in its own identity
//! Lease) that has no live agent.

mod kube_support;
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

#[test]
fn an_agent_announces_itself_and_the_apiserver_without_one_is_named() {
    let Some(kapi) = Kube::binary("real_apiserver_membership") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let kube = Kube::new(
        dir.path(),
        kapi,
        [
            support::free_port(),
            support::free_port(),
            support::free_port(),
            support::free_port(),
        ],
    );
    let keys =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver/k3s/keys");
    std::fs::write(
        kube.flags.join("apiserver.args"),
        format!(
            "--service-account-issuer=https://oidc.example.com/homelab\n--service-account-key-file={}\n--service-account-signing-key-file={}\n",
            keys.join("service.key").display(),
            keys.join("service.current.key").display()
        ),
    )
    .expect("args");
    kube.start();
    // kube-apiserver names its host in its identity Lease (os.Hostname).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_string();
    let kubeconfig = kube.state.join("kubeconfig");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let api = irsa_agent::k8s::Api::from_kubeconfig(
            &HostRoot::new("/"),
            &kubeconfig,
            None,
            std::time::Duration::from_secs(10),
        )
        .await
        .expect("client config");
        let client = api.client().expect("client");

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
    let Some(kapi) = Kube::binary("real_apiserver_membership") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let kube = Kube::new(
        dir.path(),
        kapi,
        [
            support::free_port(),
            support::free_port(),
            support::free_port(),
            support::free_port(),
        ],
    );
    let keys =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver/k3s/keys");
    std::fs::write(
        kube.flags.join("apiserver.args"),
        format!(
            "--service-account-issuer=https://oidc.example.com/homelab\n--service-account-key-file={}\n--service-account-signing-key-file={}\n",
            keys.join("service.key").display(),
            keys.join("service.current.key").display()
        ),
    )
    .expect("args");
    kube.start();
    let kubeconfig = kube.state.join("kubeconfig");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let api = irsa_agent::k8s::Api::from_kubeconfig(
            &HostRoot::new("/"),
            &kubeconfig,
            None,
            std::time::Duration::from_secs(10),
        )
        .await
        .expect("client config");
        let client = api.client().expect("client");
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
