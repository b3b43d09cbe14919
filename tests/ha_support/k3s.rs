//! k3s-shaped hosts for the HA harness ([`super::Ha::start_as`] with [`super::Shape::K3s`]).
//!
//! Each server `cp<i>` is a k3s server: `/etc/rancher/k3s/config.yaml` (and drop-ins in
//! `config.yaml.d`), `/etc/rancher/k3s/k3s.yaml` (the admin kubeconfig k3s writes), the unit file
//! `k3s.service`, and `/var/lib/rancher/k3s/server/tls` (serving certificate, client CA, and the
//! service-account keys). Three stand-ins per server, in `tests/kube`:
//!
//! - `k3s-standin.sh`, the k3s process: runs the real kube-apiserver with the arguments k3s
//!   computes (base flags: etcd, certificates, addresses; k3s's service-account defaults; the
//!   `kube-apiserver-arg` entries of config.yaml and its drop-ins, merged the way k3s merges them,
//!   see `k3s-standin.py`). At every start it reconciles the host's `service.key` from the shared
//!   "datastore" folder and signs with its first key, as k3s's bootstrap does; it restarts only
//!   when the systemctl stand-in asks.
//! - `k3s-systemctl.sh` ([`Ha::k3s_systemctl`]): `systemctl restart k3s` really stops and starts
//!   that server's apiserver, and returns once it is ready (k3s is `Type=notify`).
//! - `k3s-standin.py` as `k3s` ([`Ha::k3s_binary`]): `k3s certificate rotate-ca --path=DIR`
//!   checks that DIR's `service.key` still holds the key the cluster signs with, and stores it
//!   in the datastore; nothing on disk changes until a restart.
//!
//! The datastore starts with the k3s test case's keys (tests/data/apiserver/k3s/keys: two keys,
//! the first signs).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{Ha, PORT, admin_conf, scripts, write};

/// The admin kubeconfig k3s writes, as a host path.
pub const ADMIN_CONF: &str = "/etc/rancher/k3s/k3s.yaml";
/// k3s's TLS folder (default data-dir), as a host path.
pub const TLS: &str = "/var/lib/rancher/k3s/server/tls";
/// k3s's config file, as a host path.
pub const CONFIG: &str = "/etc/rancher/k3s/config.yaml";

/// The `kid` of a JWT's header.
pub fn token_kid(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').next()?)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v["kid"].as_str().map(str::to_string)
}

fn executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    write(path, text);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The flags k3s gives the apiserver that are not about service accounts (which k3s adds, and
/// config.yaml may override): this harness's addresses, etcd and certificates.
fn base_args(ip: &str) -> String {
    [
        format!("--advertise-address={ip}"),
        "--allow-privileged=true".into(),
        "--anonymous-auth=false".into(),
        "--authorization-mode=Node,RBAC".into(),
        format!("--bind-address={ip}"),
        format!("--client-ca-file={TLS}/client-ca.crt"),
        "--enable-admission-plugins=NodeRestriction".into(),
        // One plain-HTTP etcd for the cluster (k3s: its embedded etcd, or kine).
        "--etcd-servers=http://127.0.0.1:2379".into(),
        format!("--secure-port={PORT}"),
        "--service-cluster-ip-range=10.43.0.0/16".into(),
        format!("--tls-cert-file={TLS}/serving-kube-apiserver.crt"),
        format!("--tls-private-key-file={TLS}/serving-kube-apiserver.key"),
    ]
    .map(|f| f + "\n")
    .concat()
}

impl Ha {
    /// The shared datastore folder (`service.key`).
    pub fn datastore(&self) -> PathBuf {
        self.dir.path().join("datastore")
    }

    /// Server `i`'s systemctl stand-in (for `--systemctl`).
    pub fn k3s_systemctl(&self, i: usize) -> PathBuf {
        self.servers[i].state.join("systemctl")
    }

    /// Server `i`'s `k3s` stand-in (for `--k3s`).
    pub fn k3s_binary(&self, i: usize) -> PathBuf {
        self.servers[i].state.join("k3s")
    }

    /// The agent's arguments that point it at server `i`'s stand-ins.
    pub fn k3s_edges(&self, i: usize) -> Vec<String> {
        vec![
            "--systemctl".into(),
            self.k3s_systemctl(i).display().to_string(),
            "--k3s".into(),
            self.k3s_binary(i).display().to_string(),
        ]
    }

    /// Writes server `i`'s `/etc/rancher/k3s/config.yaml` (takes effect at its next restart).
    pub fn k3s_config(&self, i: usize, yaml: &str) {
        write(&self.servers[i].path(CONFIG), yaml);
    }

    /// Server `i`'s `systemctl` calls so far (`restart k3s`, ...), without the `ready` lines.
    pub fn systemctl_calls(&self, i: usize) -> Vec<String> {
        std::fs::read_to_string(self.servers[i].state.join("systemctl.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(_, rest)| rest.to_string()))
            .filter(|l| l != "ready")
            .collect()
    }

    /// Creates the ServiceAccount `namespace/name` (what kube-controller-manager, which the
    /// harness does not run, creates in a cluster: `kube-system/default`, which the rotation
    /// mints a token for to see which key each apiserver signs with).
    pub fn create_service_account(&self, namespace: &str, name: &str) {
        let first = self.servers[0].clone();
        let (namespace, name) = (namespace.to_string(), name.to_string());
        let (code, body) = super::in_netns(&self.netns, move || async move {
            super::api(&first, Duration::from_secs(10))
                .await
                .post_json(
                    &format!("/api/v1/namespaces/{namespace}/serviceaccounts"),
                    &serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}),
                )
                .await
                .expect("create the ServiceAccount")
        })
        .join()
        .expect("thread");
        assert!(code == 201 || code == 409, "ServiceAccount: {code} {body}");
    }

    /// The kid each apiserver signs with now: a token minted through it (TokenRequest), its
    /// header's `kid` (`None`: no token).
    pub fn signing_kids(&self) -> Vec<Option<String>> {
        let servers = self.servers.clone();
        super::in_netns(&self.netns, move || async move {
            let mut out = Vec::new();
            for s in &servers {
                let client = super::api(s, Duration::from_secs(5))
                    .await
                    .client()
                    .expect("client");
                out.push(super::mint(&client).await.ok().and_then(|t| token_kid(&t)));
            }
            out
        })
        .join()
        .expect("thread")
    }

    /// The apiserver arguments server `i` runs with now (as the stand-in computed them).
    pub fn k3s_apiserver_args(&self, i: usize) -> Vec<String> {
        std::fs::read_to_string(self.servers[i].state.join("kube-apiserver.args"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// The k3s hosts, the datastore and the stand-ins' wrappers (before anything starts).
pub(super) fn prepare_hosts(ha: &Ha, pki: &Path, config: &str) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver/k3s/keys");
    write(
        &ha.datastore().join("service.key"),
        std::fs::read(data.join("service.key")).expect("k3s keys"),
    );
    let stand_in = scripts().join("k3s-standin.py");
    for s in &ha.servers {
        for (from, to) in [
            ("ca.crt", "server-ca.crt"),
            ("ca.crt", "client-ca.crt"),
            ("apiserver.crt", "serving-kube-apiserver.crt"),
            ("apiserver.key", "serving-kube-apiserver.key"),
        ] {
            write(
                &s.path(&format!("{TLS}/{to}")),
                std::fs::read(pki.join(from)).expect("pki"),
            );
        }
        write(&s.path(ADMIN_CONF), admin_conf(pki, &s.url));
        write(&s.path(CONFIG), config);
        write(
            &s.path("/etc/systemd/system/k3s.service"),
            "[Unit]\nDescription=Lightweight Kubernetes\n\n[Service]\nType=notify\nExecStart=/usr/local/bin/k3s \\\n    server \\\n\nRestart=always\nRestartSec=5s\n",
        );
        std::fs::create_dir_all(&s.state).expect("state dir");
        write(&s.state.join("base.args"), base_args(&s.ip));
        // The client certificate for the readiness check (anonymous-auth is off, as on k3s).
        for f in ["ca.crt", "admin.crt", "admin.key"] {
            write(
                &s.state.join(format!("pki/{f}")),
                std::fs::read(pki.join(f)).expect("pki"),
            );
        }
        let st = s.state.display();
        executable(
            &s.state.join("systemctl"),
            &format!(
                "#!/bin/sh\nexec bash '{}' '{st}' '{}' '{st}/pki' \"$@\"\n",
                scripts().join("k3s-systemctl.sh").display(),
                s.url
            ),
        );
        executable(
            &s.state.join("k3s"),
            &format!(
                "#!/bin/sh\nexec python3 '{}' '{}' '{}' '{st}' \"$@\"\n",
                stand_in.display(),
                s.root.display(),
                ha.datastore().display()
            ),
        );
    }
}

/// Starts server `i`'s k3s stand-in in its own UTS namespace inside the test's network namespace.
pub(super) fn spawn_server(ha: &Ha, i: usize) -> Child {
    let s = &ha.servers[i];
    std::fs::create_dir_all(&s.state).expect("state dir");
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(s.state.join("k3s.log"))
        .expect("k3s log");
    use std::os::unix::process::CommandExt as _;
    Command::new("ip")
        .args(["netns", "exec", &ha.netns, "unshare", "--uts", "bash"])
        .arg(scripts().join("k3s-standin.sh"))
        .arg(&s.root)
        .arg(&s.state)
        .arg(&s.name)
        .arg(std::process::id().to_string())
        .arg(ha.datastore())
        .arg(s.state.join("base.args"))
        .env("IRSA_TEST_KUBE_APISERVER", &ha.kapi)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("k3s stand-in")
}
