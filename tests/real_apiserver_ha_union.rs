//! The published JWKS on several servers is the union of every live server's keys, against two
//! real kube-apiservers (the HA harness, `tests/ha_support`; without `IRSA_TEST_KUBE_APISERVER`
//! it says SKIPPED).
//!
//! cp1's apiserver verifies with one more key than cp2's (a rotation step cp2 has not picked up
//! yet, or cp2 restored from an older backup). Each server's agent publishes to its own
//! directory. cp2's agent must keep cp1's extra key in what it publishes, because cp1's
//! apiserver may sign with it: relying parties fetch whichever copy was written last. Once cp1's
//! agent is gone (killed, its Lease expired), the key is cp2's to drop again.

mod ha_support;

use std::time::{Duration, Instant};

use ha_support::Ha;
use irsa_agent::config::KeyType;
use irsa_agent::rotation::keygen;

const ISSUER: &str = "https://oidc.example.com/ha-union";
const JWKS: &str = "/srv/oidc/openid/v1/jwks";

fn published_kids(ha: &Ha, i: usize) -> Vec<String> {
    std::fs::read(ha.servers[i].path(JWKS))
        .map(|bytes| irsa_agent::keys::jwk::kids_in(&bytes))
        .unwrap_or_default()
}

fn wait_for(
    what: &str,
    timeout: Duration,
    logs: &dyn Fn() -> String,
    mut ok: impl FnMut() -> bool,
) -> Duration {
    let begin = Instant::now();
    while !ok() {
        assert!(
            begin.elapsed() < timeout,
            "{what}: not within {timeout:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    begin.elapsed()
}

#[test]
fn a_key_only_another_live_server_verifies_with_stays_published() {
    let begin = Instant::now();
    let Some(ha) = Ha::start(2, "real_apiserver_ha_union") else {
        return;
    };
    ha.wait_membership(Duration::from_secs(60));

    // cp1's apiserver verifies with one more key.
    let extra = keygen::generate(KeyType::EcdsaP256).expect("a key");
    let extra_kid = extra.kid();
    let cp1 = &ha.servers[0];
    std::fs::write(
        cp1.path("/etc/kubernetes/pki/extra.pub"),
        extra.public().to_spki_pem(),
    )
    .expect("extra.pub");
    let manifest = cp1.path(ha_support::MANIFEST);
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let edited = text.replace(
        "    - --service-account-key-file=/etc/kubernetes/pki/sa.pub\n",
        "    - --service-account-key-file=/etc/kubernetes/pki/sa.pub\n    - --service-account-key-file=/etc/kubernetes/pki/extra.pub\n",
    );
    assert_ne!(edited, text, "the manifest has no sa.pub flag to add to");
    let starts = cp1.starts();
    std::fs::write(&manifest, edited).expect("manifest");
    ha.wait_restarted(0, starts, Duration::from_secs(120));

    // Each agent publishes its own copy and leaves the apiservers alone; a short resync makes
    // its Lease live for 3 × 2 s after each renewal.
    for i in 0..2 {
        ha.agent_config(
            i,
            &format!(
                "issuer: {ISSUER}\ndistribution: kubeadm\npublish:\n  - type: directory\n    path: /srv/oidc\nrun:\n  apply-issuer: false\n  resync-interval: 2s\n"
            ),
        );
    }
    let mut agents: Vec<_> = (0..2)
        .map(|i| {
            let name = ha.servers[i].name.clone();
            ha.spawn_agent(i, &["run", "--node-name", &name])
        })
        .collect();
    let logs = {
        let paths: Vec<_> = agents.iter().map(|a| a.log.clone()).collect();
        move || {
            paths
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    format!(
                        "--- {}\n{}",
                        p.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
    };

    // cp1 publishes its own keys, extra included; cp2 keeps cp1's extra key.
    let t = wait_for(
        "cp1 publishes its extra key",
        Duration::from_secs(120),
        &logs,
        || published_kids(&ha, 0).contains(&extra_kid),
    );
    let u = wait_for(
        "cp2 publishes cp1's extra key (the union)",
        Duration::from_secs(60),
        &logs,
        || published_kids(&ha, 1).contains(&extra_kid),
    );
    let cp1_kids = published_kids(&ha, 0);
    let mut a = cp1_kids.clone();
    let mut b = published_kids(&ha, 1);
    a.sort();
    b.sort();
    assert_eq!(a, b, "both copies are the union\n{}", logs());
    let cp2_log = std::fs::read_to_string(&agents[1].log).unwrap_or_default();
    assert!(
        cp2_log.contains(&format!("{extra_kid} (cp1)")) && cp2_log.contains("stay published"),
        "cp2's agent does not say why it publishes cp1's key\n{}",
        logs()
    );

    // cp1's agent dies: after its Lease expires, the key is cp2's to drop.
    agents[0].kill();
    let dropped = wait_for(
        "cp2 drops cp1's extra key once cp1's agent is gone",
        Duration::from_secs(90),
        &logs,
        || !published_kids(&ha, 1).contains(&extra_kid),
    );
    eprintln!(
        "union: cp1 published its extra key {:.1}s after its agent started, cp2 {:.1}s later; cp2 dropped it {:.1}s after cp1's agent was killed; published kids {:?}; wall time {:.1}s",
        t.as_secs_f64(),
        u.as_secs_f64(),
        dropped.as_secs_f64(),
        cp1_kids,
        begin.elapsed().as_secs_f64()
    );
    // Its own keys stay.
    assert!(!published_kids(&ha, 1).is_empty(), "{}", logs());
}
