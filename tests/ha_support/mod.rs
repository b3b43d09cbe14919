//! An HA control plane for tests: N real kube-apiservers (the binary `IRSA_TEST_KUBE_APISERVER`
//! names) on one etcd (Debian's), each on its own kubeadm-shaped fake host, in a network namespace
//! of the test's own.
//!
//! - The namespace `irsaha-<pid>-<n>` has 10.250.0.1..N on its `lo`; every apiserver listens on
//!   its own address, port 6443 for all (the apiserver refuses loopback addresses in the
//!   `kubernetes` Endpoints, so they cannot be 127.0.0.x). etcd listens on the namespace's
//!   127.0.0.1:2379. Nothing leaves the namespace.
//! - Server `i` is `cp<i+1>`: a fake host root with `/etc/kubernetes/manifests/kube-apiserver.yaml`
//!   (kubeadm's shape, flags sorted; `--bind-address` set so the servers do not collide on one
//!   port), `/etc/kubernetes/admin.conf` (credentials inline, server = its own address),
//!   `/etc/kubernetes/pki` (one CA and serving certificate for the cluster, `sa.key`/`sa.pub`
//!   shared by every server as kubeadm shares them) and kubelet's `config.yaml`.
//! - A kubelet stand-in per server (`tests/kube/kubelet-standin.sh`), in its own UTS namespace
//!   whose hostname is `cp<i+1>` (so each apiserver has its own identity Lease), runs that
//!   server's kube-apiserver with the manifest's command and really stops and starts it whenever
//!   the manifest changes: `irsa-agent --root <host> apply` restarts that host's apiserver only.
//! - [`Ha::agent`] runs the irsa-agent binary as a host's agent inside the namespace
//!   ([`Ha::spawn_agent`]: in the background, e.g. `run`, killed on drop).
//! - [`Ha::workload`] mints tokens through every apiserver and re-checks every live one against
//!   every apiserver (TokenReview) and against the JWKS every server's agent has published
//!   ([`PUBLISHED_JWKS`], a `directory` target the tests configure); [`Ha::monitor`] samples
//!   every 200 ms how many apiservers are down (`/readyz` not 200).
//!
//! What is fair to ask of a published JWKS: each agent publishes its own copy, and each copy
//! must be the union a relying party needs, so every live token must verify (with the JWT
//! library `jsonwebtoken`: its `kid` in the set, the signature, issuer, audience, expiry)
//! against every copy, counted per copy, apart from TokenReview's rejections. Two things are
//! not rejections: a copy that does not exist yet (its agent has not published yet, or publishes
//! nothing) is not checked that round (a relying party cannot have fetched it either; the
//! rounds it was absent are counted); and a token whose `iss` is not the issuer the agents
//! publish for (the apiserver did not sign with that issuer yet) is not checked against it (no
//! relying party of that issuer would be handed it). Anything else is: a copy that exists but
//! lacks a live token's key, or is unreadable, counts against that copy; a copy left behind by
//! an agent that stopped counts too, since a relying party would still fetch it (the tests'
//! agents that are killed are started again).
//!
//! Everything (processes, the namespace) is removed on drop, also when the test panics; the
//! scripts stop by themselves when the test process is gone (even after `kill -9`), and a later
//! [`Ha::start`] deletes namespaces left by test processes that no longer exist.
//!
//! [`Ha::start`] returns `None` after printing `SKIPPED: ...` when it cannot run here: not root,
//! no `ip`, `unshare`, `openssl` or etcd, or no `IRSA_TEST_KUBE_APISERVER`.

#![allow(dead_code)]

pub mod k3s;

use std::future::Future;
use std::io::{Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use irsa_agent::host::HostRoot;
use irsa_agent::k8s::Api;
use serde_json::{Value, json};

/// The port every apiserver listens on (each on its own address).
pub const PORT: u16 = 6443;
/// The audience of the workload's tokens.
pub const AUDIENCE: &str = "sts.amazonaws.com";
/// The issuer the servers start with (kubeadm's default).
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The admin kubeconfig, as a host path.
pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";
/// The apiserver's static pod manifest, as a host path.
pub const MANIFEST: &str = "/etc/kubernetes/manifests/kube-apiserver.yaml";
const NETNS_PREFIX: &str = "irsaha-";
/// The workload's ServiceAccount, in `default`.
const SERVICE_ACCOUNT: &str = "workload";
const TOKEN_SECONDS: u64 = 600;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube")
}

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// One control-plane node.
#[derive(Debug, Clone)]
pub struct Server {
    /// `cp1`, `cp2`, ...: its hostname (the apiserver's identity Lease carries it).
    pub name: String,
    /// `10.250.0.1`, ... (inside the namespace).
    pub ip: String,
    /// `https://10.250.0.1:6443`.
    pub url: String,
    /// The fake host root (`--root` of its agent).
    pub root: PathBuf,
    /// The kubelet stand-in's folder: `events`, `kube-apiserver.log`.
    pub state: PathBuf,
    /// The admin kubeconfig, as a host path (kubeadm's or k3s's).
    pub admin_conf: &'static str,
}

impl Server {
    /// A host path under this server's root.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }

    /// The admin kubeconfig (a real path; usable from inside the namespace).
    pub fn kubeconfig(&self) -> PathBuf {
        self.path(self.admin_conf)
    }

    /// The `--service-account-issuer` values of its manifest, in order.
    pub fn manifest_issuers(&self) -> Vec<String> {
        std::fs::read_to_string(self.path(MANIFEST))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.trim()
                    .trim_start_matches("- ")
                    .strip_prefix("--service-account-issuer=")
                    .map(str::to_string)
            })
            .collect()
    }

    /// What the kubelet stand-in recorded: (unix ms, event, detail).
    pub fn events(&self) -> Vec<(u64, String, String)> {
        std::fs::read_to_string(self.state.join("events"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                let at = parts.next()?.parse().ok()?;
                let event = parts.next()?.to_string();
                Some((at, event, parts.next().unwrap_or("").to_string()))
            })
            .collect()
    }

    /// How many times the stand-in started the apiserver (the first start included).
    pub fn starts(&self) -> usize {
        self.events().iter().filter(|e| e.1 == "start").count()
    }
}

/// How the servers' hosts look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// kubeadm: a static pod manifest, and a kubelet stand-in.
    Kubeadm,
    /// k3s: `/etc/rancher/k3s`, a k3s and a systemctl stand-in ([`k3s`]); `config` is every
    /// server's `config.yaml` at its first start.
    K3s { config: &'static str },
}

/// The control plane.
pub struct Ha {
    pub servers: Vec<Server>,
    pub shape: Shape,
    /// The network namespace (`ip netns exec <it> ...`).
    pub netns: String,
    kapi: String,
    kubelets: Vec<Option<Child>>,
    etcd: Option<Child>,
    dir: tempfile::TempDir,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn skipped(test: &str, why: &str) -> Option<Ha> {
    eprintln!("SKIPPED: {test} not run: {why}");
    None
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Deletes the namespaces of harness runs whose test process is gone (a test killed with -9).
fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// kubeadm's static pod manifest for server `ip` (flags sorted as kubeadm writes them).
fn manifest(ip: &str) -> String {
    let flags = [
        format!("--advertise-address={ip}"),
        "--allow-privileged=true".into(),
        "--authorization-mode=Node,RBAC".into(),
        // Not kubeadm's default (it binds 0.0.0.0): three servers share one namespace and port.
        format!("--bind-address={ip}"),
        "--client-ca-file=/etc/kubernetes/pki/ca.crt".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--enable-bootstrap-token-auth=true".into(),
        // One plain-HTTP etcd for the cluster (kubeadm: a local etcd member over TLS).
        "--etcd-servers=http://127.0.0.1:2379".into(),
        format!("--secure-port={PORT}"),
        format!("--service-account-issuer={DEFAULT_ISSUER}"),
        "--service-account-key-file=/etc/kubernetes/pki/sa.pub".into(),
        "--service-account-signing-key-file=/etc/kubernetes/pki/sa.key".into(),
        "--service-cluster-ip-range=10.96.0.0/12".into(),
        "--tls-cert-file=/etc/kubernetes/pki/apiserver.crt".into(),
        "--tls-private-key-file=/etc/kubernetes/pki/apiserver.key".into(),
    ];
    let mut command = String::from("    - kube-apiserver\n");
    for f in flags {
        command.push_str(&format!("    - {f}\n"));
    }
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  annotations:
    kubeadm.kubernetes.io/kube-apiserver.advertise-address.endpoint: {ip}:{PORT}
  creationTimestamp: null
  labels:
    component: kube-apiserver
    tier: control-plane
  name: kube-apiserver
  namespace: kube-system
spec:
  containers:
  - command:
{command}    image: registry.k8s.io/kube-apiserver:v1.36.2
    imagePullPolicy: IfNotPresent
    name: kube-apiserver
    readinessProbe:
      failureThreshold: 3
      httpGet:
        host: {ip}
        path: /readyz
        port: {PORT}
        scheme: HTTPS
      periodSeconds: 1
      timeoutSeconds: 15
    resources:
      requests:
        cpu: 250m
    volumeMounts:
    - mountPath: /etc/kubernetes/pki
      name: k8s-certs
      readOnly: true
  hostNetwork: true
  priority: 2000001000
  priorityClassName: system-node-critical
  volumes:
  - hostPath:
      path: /etc/kubernetes/pki
      type: DirectoryOrCreate
    name: k8s-certs
status: {{}}
"
    )
}

/// kubeadm's admin.conf: the cluster CA and the admin client certificate inline.
fn admin_conf(pki: &Path, url: &str) -> String {
    let b64 = |f: &str| {
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(pki.join(f)).expect("pki file"))
    };
    format!(
        "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {}
    server: {url}
  name: kubernetes
contexts:
- context:
    cluster: kubernetes
    user: kubernetes-admin
  name: kubernetes-admin@kubernetes
current-context: kubernetes-admin@kubernetes
kind: Config
preferences: {{}}
users:
- name: kubernetes-admin
  user:
    client-certificate-data: {}
    client-key-data: {}
",
        b64("ca.crt"),
        b64("admin.crt"),
        b64("admin.key")
    )
}

/// Runs `f` on a new thread inside network namespace `netns`, on a runtime of its own (every
/// socket it opens is in the namespace).
pub fn in_netns<T, F, Fut>(netns: &str, f: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let path = format!("/run/netns/{netns}");
    std::thread::Builder::new()
        .name(format!("in-{netns}"))
        .spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f())
        })
        .expect("thread")
}

/// The admin client of a server (call inside the namespace).
pub async fn api(server: &Server, timeout: Duration) -> Api {
    Api::from_kubeconfig(
        &HostRoot::new(&server.root),
        Path::new(server.admin_conf),
        Some(server.url.clone()),
        timeout,
    )
    .await
    .unwrap_or_else(|e| panic!("{}: {e}", server.name))
}

/// `/readyz` answers 200.
async fn ready(api: &Api) -> bool {
    matches!(api.get("/readyz").await, Ok((200, _)))
}

/// etcd's `/health` inside the namespace (plain HTTP).
fn etcd_healthy() -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &"127.0.0.1:2379".parse().expect("addr"),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

impl Ha {
    /// Starts `n` servers (at most 254) and waits until every apiserver is ready, listed in the
    /// `kubernetes` Endpoints and in an identity Lease under its own hostname. `None` (after
    /// printing SKIPPED) when this machine cannot run it.
    pub fn start(n: usize, test: &str) -> Option<Ha> {
        Ha::start_as(n, test, Shape::Kubeadm)
    }

    /// [`Ha::start`] with hosts of `shape`.
    pub fn start_as(n: usize, test: &str, shape: Shape) -> Option<Ha> {
        assert!((1..255).contains(&n));
        if !rustix::process::geteuid().is_root() {
            return skipped(test, "needs root (network and UTS namespaces)");
        }
        let Ok(kapi) = std::env::var("IRSA_TEST_KUBE_APISERVER") else {
            return skipped(
                test,
                "IRSA_TEST_KUBE_APISERVER not set (`.ci/run` sets it from ../shared/tools/kube-apiserver --path)",
            );
        };
        for (program, args, why) in [
            ("ip", &["-V"][..], "no `ip` (iproute2)"),
            ("unshare", &["--version"][..], "no `unshare` (util-linux)"),
            ("openssl", &["version"][..], "no `openssl`"),
        ] {
            if !runs(program, args) {
                return skipped(test, why);
            }
        }
        let etcd = std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into());
        if !runs(&etcd, &["--version"]) {
            return skipped(
                test,
                &format!("no etcd at {etcd} (apt-get install etcd-server)"),
            );
        }
        sweep_stale_namespaces();

        let netns = format!(
            "{NETNS_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &netns])
            .output()
            .expect("ip netns add");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Operation not permitted") || err.contains("Permission denied") {
                return skipped(test, &format!("cannot create a network namespace: {err}"));
            }
            panic!("ip netns add {netns}: {err}");
        }
        let dir = tempfile::Builder::new()
            .prefix("irsa-ha-")
            .tempdir()
            .expect("tempdir");
        let servers: Vec<Server> = (1..=n)
            .map(|i| {
                let ip = format!("10.250.0.{i}");
                Server {
                    name: format!("cp{i}"),
                    url: format!("https://{ip}:{PORT}"),
                    ip,
                    root: dir.path().join(format!("cp{i}")),
                    state: dir.path().join(format!("kubelet-cp{i}")),
                    admin_conf: match shape {
                        Shape::Kubeadm => ADMIN_CONF,
                        Shape::K3s { .. } => k3s::ADMIN_CONF,
                    },
                }
            })
            .collect();
        // From here on, drop cleans up.
        let mut ha = Ha {
            servers,
            shape,
            netns: netns.clone(),
            kapi,
            kubelets: Vec::new(),
            etcd: None,
            dir,
        };
        run(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]));
        for s in &ha.servers {
            run(Command::new("ip").args([
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{}/32", s.ip),
                "dev",
                "lo",
            ]));
        }

        let pki = ha.dir.path().join("pki");
        run(Command::new("bash")
            .arg(scripts().join("ha-pki.sh"))
            .arg(&pki)
            .args(ha.servers.iter().map(|s| s.ip.clone())));
        for s in ha.servers.iter().filter(|_| shape == Shape::Kubeadm) {
            for f in ["ca.crt", "ca.key", "apiserver.crt", "apiserver.key"] {
                write(
                    &s.path(&format!("/etc/kubernetes/pki/{f}")),
                    std::fs::read(pki.join(f)).expect("pki"),
                );
            }
            write(
                &s.path("/etc/kubernetes/pki/sa.pub"),
                std::fs::read(data("apiserver/kubeadm/keys/rsa2048.pub")).expect("sa.pub"),
            );
            write(
                &s.path("/etc/kubernetes/pki/sa.key"),
                std::fs::read(data("apiserver/kubeadm/keys/rsa2048.pkcs1.key")).expect("sa.key"),
            );
            write(&s.path(MANIFEST), manifest(&s.ip));
            write(&s.path(ADMIN_CONF), admin_conf(&pki, &s.url));
            write(
                &s.path("/var/lib/kubelet/config.yaml"),
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nclusterDomain: cluster.local\nstaticPodPath: /etc/kubernetes/manifests\n",
            );
        }

        if let Shape::K3s { config } = shape {
            k3s::prepare_hosts(&ha, &pki, config);
        }
        let etcd_dir = ha.dir.path().join("etcd");
        std::fs::create_dir_all(&etcd_dir).expect("etcd dir");
        let log = std::fs::File::create(etcd_dir.join("etcd.log")).expect("etcd log");
        ha.etcd = Some(
            Command::new("ip")
                .args(["netns", "exec", &netns, "bash"])
                .arg(scripts().join("ha-etcd.sh"))
                .arg(etcd_dir.join("data"))
                .arg(std::process::id().to_string())
                .env("ETCD_BIN", &etcd)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .process_group(0)
                .spawn()
                .expect("etcd"),
        );
        let healthy = in_netns(&netns, move || async move {
            for _ in 0..150 {
                if etcd_healthy() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        })
        .join()
        .expect("etcd health");
        assert!(
            healthy,
            "etcd not healthy after 30 s: {}",
            ha.tail("etcd/etcd.log", 20)
        );

        for i in 0..n {
            ha.kubelets.push(None);
            ha.start_apiserver(i);
        }
        ha.wait_ready(Duration::from_secs(180));
        ha.wait_membership(Duration::from_secs(60));
        // The workload's ServiceAccount.
        let first = ha.servers[0].clone();
        let (code, body) = in_netns(&netns, move || async move {
            api(&first, Duration::from_secs(10))
                .await
                .post_json(
                    "/api/v1/namespaces/default/serviceaccounts",
                    &json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT}}),
                )
                .await
                .expect("create the ServiceAccount")
        })
        .join()
        .expect("thread");
        assert!(code == 201 || code == 409, "ServiceAccount: {code} {body}");
        Some(ha)
    }

    /// The last `lines` lines of a file under the harness folder.
    fn tail(&self, rel: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(rel)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The irsa-agent binary as server `i`'s agent: inside the namespace, `--root` its host.
    pub fn agent(&self, i: usize) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(env!("CARGO_BIN_EXE_irsa-agent"))
            .arg("--root")
            .arg(&self.servers[i].root);
        for var in [
            "IRSA_AGENT_CONFIG",
            "IRSA_AGENT_SYSTEMCTL",
            "IRSA_AGENT_APISERVER_URL",
            "IRSA_AGENT_ROOT",
            "IRSA_AGENT_CLOCK",
            "IRSA_AGENT_FAILPOINTS",
            "IRSA_AGENT_FAILPOINT_DIR",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// Starts server `i`'s agent with `args` (`["run"]`) in the background, its output appended
    /// to `<harness dir>/agent-cp<i+1>.log`; killed (-9) when the handle drops.
    pub fn spawn_agent(&self, i: usize, args: &[&str]) -> Agent {
        let log_path = self
            .dir
            .path()
            .join(format!("agent-{}.log", self.servers[i].name));
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("agent log");
        let child = self
            .agent(i)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("irsa-agent");
        Agent {
            child: Some(child),
            log: log_path,
        }
    }

    /// Writes server `i`'s `/etc/irsa-agent/config.yaml`.
    pub fn agent_config(&self, i: usize, yaml: &str) {
        write(&self.servers[i].path("/etc/irsa-agent/config.yaml"), yaml);
    }

    /// Starts server `i`'s kubelet stand-in (which starts its apiserver); does not wait.
    pub fn start_apiserver(&mut self, i: usize) {
        assert!(
            self.kubelets[i].is_none(),
            "{} runs already",
            self.servers[i].name
        );
        if matches!(self.shape, Shape::K3s { .. }) {
            self.kubelets[i] = Some(k3s::spawn_server(self, i));
            return;
        }
        let s = &self.servers[i];
        std::fs::create_dir_all(&s.state).expect("kubelet dir");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(s.state.join("kubelet.log"))
            .expect("kubelet log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "unshare", "--uts", "bash"])
            .arg(scripts().join("kubelet-standin.sh"))
            .arg(&s.root)
            .arg(&s.state)
            .arg(&s.name)
            .arg(std::process::id().to_string())
            .env("IRSA_TEST_KUBE_APISERVER", &self.kapi)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("kubelet stand-in");
        self.kubelets[i] = Some(child);
    }

    /// Stops server `i`: its kubelet stand-in stops the apiserver (SIGTERM) and exits, so the
    /// apiserver stays down until [`Ha::start_apiserver`].
    pub fn stop_apiserver(&mut self, i: usize) {
        if let Some(child) = self.kubelets[i].take() {
            stop(child, Duration::from_secs(40));
        }
    }

    /// Waits until every running server's `/readyz` answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let running: Vec<Server> = self
            .servers
            .iter()
            .zip(&self.kubelets)
            .filter(|(_, k)| k.is_some())
            .map(|(s, _)| s.clone())
            .collect();
        let names: Vec<String> = running.iter().map(|s| s.name.clone()).collect();
        let ok = in_netns(&self.netns, move || async move {
            let deadline = Instant::now() + timeout;
            let mut apis = Vec::new();
            for s in &running {
                apis.push(api(s, Duration::from_secs(2)).await);
            }
            while Instant::now() < deadline {
                let mut all = true;
                for a in &apis {
                    all &= ready(a).await;
                }
                if all {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        })
        .join()
        .expect("thread");
        if !ok {
            let logs: Vec<String> = self
                .servers
                .iter()
                .map(|s| {
                    format!(
                        "{}: {}\n",
                        s.name,
                        self.tail(&format!("kubelet-{}/kube-apiserver.log", s.name), 8)
                    )
                })
                .collect();
            panic!(
                "{names:?} not all ready after {timeout:?}:\n{}",
                logs.concat()
            );
        }
    }

    /// Waits until server `i` was started again after `starts_before` starts and is ready.
    pub fn wait_restarted(&self, i: usize, starts_before: usize, timeout: Duration) -> Duration {
        let begin = Instant::now();
        while self.servers[i].starts() <= starts_before {
            assert!(
                begin.elapsed() < timeout,
                "{} was not restarted within {timeout:?}: {:?}",
                self.servers[i].name,
                self.servers[i].events()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let server = self.servers[i].clone();
        let left = timeout.saturating_sub(begin.elapsed());
        let ok = in_netns(&self.netns, move || async move {
            let a = api(&server, Duration::from_secs(2)).await;
            let deadline = Instant::now() + left;
            while Instant::now() < deadline {
                if ready(&a).await {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
        .join()
        .expect("thread");
        assert!(ok, "{} not ready after its restart", self.servers[i].name);
        begin.elapsed()
    }

    /// Waits until the `kubernetes` Endpoints list every server's address and the apiservers'
    /// identity Leases name every server's hostname.
    pub fn wait_membership(&self, timeout: Duration) {
        let servers = self.servers.clone();
        let seen = in_netns(&self.netns, move || async move {
            let a = api(&servers[0], Duration::from_secs(5)).await;
            let mut want_ips: Vec<String> = servers.iter().map(|s| s.ip.clone()).collect();
            let mut want_names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
            want_ips.sort();
            want_names.sort();
            let deadline = Instant::now() + timeout;
            let mut last = (Vec::new(), Vec::new());
            while Instant::now() < deadline {
                let (ips, names) = membership(&a).await;
                if ips == want_ips && names == want_names {
                    return Ok(());
                }
                last = (ips, names);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(last)
        })
        .join()
        .expect("thread");
        if let Err((ips, names)) = seen {
            panic!("after {timeout:?}: Endpoints {ips:?}, identity Leases of {names:?}");
        }
    }

    /// What every server's discovery document names as issuer (`None`: unreadable).
    pub fn served_issuers(&self) -> Vec<Option<String>> {
        let servers = self.servers.clone();
        in_netns(&self.netns, move || async move {
            let mut out = Vec::new();
            for s in &servers {
                let a = api(s, Duration::from_secs(5)).await;
                out.push(match a.get("/.well-known/openid-configuration").await {
                    Ok((200, body)) => serde_json::from_str::<Value>(&body)
                        .ok()
                        .and_then(|v| v["issuer"].as_str().map(str::to_string)),
                    _ => None,
                });
            }
            out
        })
        .join()
        .expect("thread")
    }

    /// The kids of the JWKS every apiserver serves (`/openid/v1/jwks`; empty: unreadable).
    pub fn served_kids(&self) -> Vec<Vec<String>> {
        let servers = self.servers.clone();
        in_netns(&self.netns, move || async move {
            let mut out = Vec::new();
            for s in &servers {
                let a = api(s, Duration::from_secs(5)).await;
                out.push(match a.get("/openid/v1/jwks").await {
                    Ok((200, body)) => kids_of(&body),
                    _ => Vec::new(),
                });
            }
            out
        })
        .join()
        .expect("thread")
    }

    /// The kids of the JWKS server `i`'s agent published ([`PUBLISHED_JWKS`]; empty: none).
    pub fn published_kids(&self, i: usize) -> Vec<String> {
        kids_of(&std::fs::read_to_string(self.servers[i].path(PUBLISHED_JWKS)).unwrap_or_default())
    }

    /// Takes the agents' cluster-wide restart Lease as `holder` (for `seconds`), through server
    /// `i`, waiting up to `timeout` while an agent holds it (its restart in flight). While the
    /// test holds it, no agent starts a restart.
    pub fn take_restart_lease(&self, i: usize, holder: &str, seconds: i32, timeout: Duration) {
        let server = self.servers[i].clone();
        let holder = holder.to_string();
        let taken = in_netns(&self.netns, move || async move {
            let client = api(&server, Duration::from_secs(5))
                .await
                .client()
                .expect("client");
            let deadline = Instant::now() + timeout;
            let mut last = String::new();
            while Instant::now() < deadline {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs() as i64;
                match irsa_agent::membership::acquire_restart(&client, &holder, seconds, now).await
                {
                    Ok(irsa_agent::membership::Restart::Held { .. }) => return Ok(()),
                    other => last = format!("{other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(last)
        })
        .join()
        .expect("thread");
        if let Err(last) = taken {
            panic!("the restart Lease not taken within {timeout:?}: {last}");
        }
    }

    /// The nodes of the live agents (their Leases, [`irsa_agent::membership::view`]), through
    /// server `i`.
    pub fn live_agents(&self, i: usize) -> Vec<String> {
        let server = self.servers[i].clone();
        in_netns(&self.netns, move || async move {
            let client = api(&server, Duration::from_secs(5))
                .await
                .client()
                .expect("client");
            let now = (unix_ms() / 1000) as i64;
            match irsa_agent::membership::view(&client, now).await {
                Ok(view) => view
                    .agents
                    .into_iter()
                    .filter(|a| a.live)
                    .map(|a| a.node)
                    .collect(),
                Err(_) => Vec::new(),
            }
        })
        .join()
        .expect("thread")
    }

    /// Gives the restart Lease taken by [`Ha::take_restart_lease`] back, through server `i`.
    pub fn release_restart_lease(&self, i: usize, holder: &str) {
        let server = self.servers[i].clone();
        let holder = holder.to_string();
        in_netns(&self.netns, move || async move {
            let client = api(&server, Duration::from_secs(5))
                .await
                .client()
                .expect("client");
            irsa_agent::membership::release_restart(&client, &holder)
                .await
                .expect("release the restart Lease");
        })
        .join()
        .expect("thread");
    }

    /// A token for the workload's ServiceAccount (audience [`AUDIENCE`]) minted by server `i`.
    pub fn mint(&self, i: usize) -> Result<String, String> {
        let server = self.servers[i].clone();
        in_netns(&self.netns, move || async move {
            let client = api(&server, Duration::from_secs(5))
                .await
                .client()
                .expect("client");
            mint(&client).await
        })
        .join()
        .expect("thread")
    }

    /// TokenReview of `token` (audience [`AUDIENCE`]) by server `i`.
    pub fn review(&self, i: usize, token: &str) -> Review {
        let server = self.servers[i].clone();
        let token = token.to_string();
        in_netns(&self.netns, move || async move {
            let client = api(&server, Duration::from_secs(5))
                .await
                .client()
                .expect("client");
            review(&client, &token).await
        })
        .join()
        .expect("thread")
    }

    /// Starts the token workload: a round every second; live tokens of `issuer` are also
    /// checked against the JWKS each server's agent publishes ([`PUBLISHED_JWKS`]).
    pub fn workload(&self, issuer: &str) -> Workload {
        self.workload_with(self.workload_options(issuer, Duration::from_secs(1)))
    }

    /// The workload's defaults: every server's [`PUBLISHED_JWKS`], named after the server.
    pub fn workload_options(&self, issuer: &str, period: Duration) -> WorkloadOptions {
        WorkloadOptions {
            issuer: issuer.to_string(),
            jwks: self
                .servers
                .iter()
                .map(|s| (s.name.clone(), s.path(PUBLISHED_JWKS)))
                .collect(),
            period,
        }
    }

    /// Starts the token workload with `options`.
    pub fn workload_with(&self, options: WorkloadOptions) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(WorkloadReport::default()));
        let servers = self.servers.clone();
        let (stop2, shared2) = (stop.clone(), shared.clone());
        let handle = in_netns(&self.netns, move || async move {
            workload(servers, options, stop2, shared2).await;
        });
        Workload {
            stop,
            shared,
            handle: Some(handle),
        }
    }

    /// Starts the monitor of apiservers down at once.
    pub fn monitor(&self) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let servers = self.servers.clone();
        let stop2 = stop.clone();
        let handle = in_netns(&self.netns, move || monitor(servers, stop2));
        Monitor {
            stop,
            handle: Some(handle),
        }
    }
}

/// An agent running in the background ([`Ha::spawn_agent`]); `ip netns exec` execs the agent, so
/// the process is the agent itself.
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(child) = self.child.take() {
            stop(child, grace);
        }
    }

    /// Its output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (Endpoints addresses of `kubernetes`, hostnames of the apiserver identity Leases), sorted.
async fn membership(a: &Api) -> (Vec<String>, Vec<String>) {
    let mut ips = Vec::new();
    if let Ok((200, body)) = a
        .get("/api/v1/namespaces/default/endpoints/kubernetes")
        .await
    {
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        for subset in v["subsets"].as_array().into_iter().flatten() {
            for addr in subset["addresses"].as_array().into_iter().flatten() {
                if let Some(ip) = addr["ip"].as_str() {
                    ips.push(ip.to_string());
                }
            }
        }
    }
    let mut names = Vec::new();
    if let Ok((200, body)) = a
        .get("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases?labelSelector=apiserver.kubernetes.io%2Fidentity%3Dkube-apiserver")
        .await
    {
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        for lease in v["items"].as_array().into_iter().flatten() {
            if let Some(h) = lease["metadata"]["labels"]["kubernetes.io/hostname"].as_str() {
                names.push(h.to_string());
            }
        }
    }
    ips.sort();
    names.sort();
    names.dedup();
    (ips, names)
}

/// The `kid`s of a JWKS document, sorted.
fn kids_of(jwks: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(jwks).unwrap_or_default();
    let mut kids: Vec<String> = v["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["kid"].as_str().map(str::to_string))
        .collect();
    kids.sort();
    kids
}

/// The last `lines` lines of every file of `paths` (agents' logs), each under its path: for a
/// failing assertion's message.
pub fn log_tails<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>, lines: usize) -> String {
    paths
        .into_iter()
        .map(|p| {
            let p = p.as_ref();
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            format!(
                "--- {}\n{}",
                p.display(),
                all[all.len().saturating_sub(lines)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Stops a harness child: SIGTERM, then SIGKILL to its whole process group after `grace`.
fn stop(mut child: Child, grace: Duration) {
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let begin = Instant::now();
    while begin.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Whatever is left of the group (the apiserver or etcd under the script).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

impl Drop for Ha {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in &self.servers {
                eprintln!(
                    "--- {} kubelet stand-in events:\n{}\n--- {} kube-apiserver.log (last lines):\n{}",
                    s.name,
                    self.tail(&format!("kubelet-{}/events", s.name), 12),
                    s.name,
                    self.tail(&format!("kubelet-{}/kube-apiserver.log", s.name), 12)
                );
            }
        }
        let kubelets: Vec<Child> = self.kubelets.iter_mut().filter_map(Option::take).collect();
        // Stop them together (each stop is graceful and takes a few seconds).
        let stoppers: Vec<JoinHandle<()>> = kubelets
            .into_iter()
            .map(|k| std::thread::spawn(move || stop(k, Duration::from_secs(40))))
            .collect();
        for s in stoppers {
            let _ = s.join();
        }
        if let Some(etcd) = self.etcd.take() {
            stop(etcd, Duration::from_secs(15));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// What a TokenReview said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Review {
    Accepted,
    /// `authenticated: false`, with the apiserver's error.
    Rejected(String),
    /// No answer, or not a TokenReview answer (down, restarting, overloaded).
    Unavailable(String),
}

async fn post(client: &kube::Client, path: &str, body: &Value) -> Result<(u16, Value), String> {
    use http_body_util::BodyExt as _;
    let request = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(kube::client::Body::from(body.to_string().into_bytes()))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let response = client.send(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| "timed out after 5 s".to_string())?
}

async fn review(client: &kube::Client, token: &str) -> Review {
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [AUDIENCE]},
    });
    match post(client, "/apis/authentication.k8s.io/v1/tokenreviews", &body).await {
        Ok((201 | 200, v)) if v["kind"] == "TokenReview" => {
            if v["status"]["authenticated"] == true {
                Review::Accepted
            } else {
                Review::Rejected(v["status"]["error"].as_str().unwrap_or("").to_string())
            }
        }
        Ok((code, v)) => Review::Unavailable(format!("HTTP {code}: {}", v["message"])),
        Err(e) => Review::Unavailable(e),
    }
}

async fn mint(client: &kube::Client) -> Result<String, String> {
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [AUDIENCE], "expirationSeconds": TOKEN_SECONDS},
    });
    match post(
        client,
        &format!("/api/v1/namespaces/default/serviceaccounts/{SERVICE_ACCOUNT}/token"),
        &body,
    )
    .await
    {
        Ok((201 | 200, v)) => v["status"]["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| "no token in the answer".to_string()),
        Ok((code, v)) => Err(format!("HTTP {code}: {}", v["message"])),
        Err(e) => Err(e),
    }
}

/// Where every agent of the HA tests publishes (a `directory` target at `/srv/oidc`): the JWKS,
/// as a host path under each server's root.
pub const PUBLISHED_JWKS: &str = "/srv/oidc/openid/v1/jwks";

/// What the workload checks live tokens against besides the apiservers.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// The issuer the agents publish for: a token whose `iss` is this must verify against
    /// every JWKS the agents have published (tokens of other issuers are not meant for it).
    pub issuer: String,
    /// The published JWKS files: (name, real path).
    pub jwks: Vec<(String, PathBuf)>,
    /// One round (mint through every server, check every live token) at most every `period`.
    pub period: Duration,
}

/// The token workload's figures.
#[derive(Debug, Clone, Default)]
pub struct WorkloadReport {
    /// Rounds (mint through every server, check every live token against every server).
    pub rounds: u64,
    pub minted: u64,
    /// Mints per server.
    pub minted_by: Vec<u64>,
    /// TokenRequests that got no token (the server down or restarting).
    pub mint_failed: u64,
    /// TokenReviews answered (accepted + rejected).
    pub checked: u64,
    pub rejected: u64,
    /// TokenReviews not answered (the server down or restarting).
    pub unavailable: u64,
    /// The published JWKS sources' names ([`WorkloadOptions::jwks`]), in order.
    pub jwks_sources: Vec<String>,
    /// Per source: live tokens of the published issuer checked against it (signature, issuer,
    /// audience, expiry), once it existed.
    pub jwks_checked: Vec<u64>,
    /// Per source: those it failed to verify (an unreadable or unparsable JWKS counts as
    /// failing every token checked that round).
    pub jwks_rejected: Vec<u64>,
    /// Per source: rounds in which it did not exist yet (not checked, not a rejection).
    pub jwks_absent_rounds: Vec<u64>,
    /// Checks skipped because the token's issuer is not the published one (minted before the
    /// apiserver signed with it).
    pub jwks_other_issuer: u64,
    /// The first rejections (by an apiserver or a published JWKS): when, minted by, checked by,
    /// why.
    pub rejections: Vec<String>,
}

impl WorkloadReport {
    /// Tokens the published JWKS files failed to verify, all sources together.
    pub fn jwks_rejected_total(&self) -> u64 {
        self.jwks_rejected.iter().sum()
    }

    /// Checks against the published JWKS files, all sources together.
    pub fn jwks_checked_total(&self) -> u64 {
        self.jwks_checked.iter().sum()
    }

    /// The figures in two lines: TokenReview, then the published JWKS per source.
    pub fn describe(&self) -> String {
        let per_source: Vec<String> = self
            .jwks_sources
            .iter()
            .enumerate()
            .map(|(i, name)| {
                format!(
                    "{name} {} checked, {} rejected (absent {} rounds)",
                    self.jwks_checked[i], self.jwks_rejected[i], self.jwks_absent_rounds[i]
                )
            })
            .collect();
        format!(
            "tokens: {} minted (per server {:?}; {} mints unanswered), {} rounds; TokenReview: {} checks answered, {} rejected, {} unanswered\npublished JWKS: {} checks, {} rejected ({}); {} checks skipped (token of another issuer)",
            self.minted,
            self.minted_by,
            self.mint_failed,
            self.rounds,
            self.checked,
            self.rejected,
            self.unavailable,
            self.jwks_checked_total(),
            self.jwks_rejected_total(),
            per_source.join("; "),
            self.jwks_other_issuer
        )
    }
}

/// The JSON of a JWT's payload, unverified (to see its issuer).
fn token_claims(token: &str) -> Option<Value> {
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.split('.').nth(1)?)
        .ok()?;
    serde_json::from_slice(&payload).ok()
}

/// Verifies `token` as a relying party does with the JWKS `jwks` (the JWT library
/// `jsonwebtoken`): its `kid` in the set, the signature, `iss` = `issuer`, `aud` has
/// [`AUDIENCE`], not expired.
fn verify_with_jwks(
    token: &str,
    jwks: &jsonwebtoken::jwk::JwkSet,
    issuer: &str,
) -> Result<(), String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
    let kid = header.kid.ok_or("the token has no kid")?;
    let jwk = jwks
        .find(&kid)
        .ok_or_else(|| format!("kid {kid} is not in the JWKS"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| format!("kid {kid}: {e}"))?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|_| ())
        .map_err(|e| format!("kid {kid}: {e}"))
}

/// [`verify_with_jwks`] with the JWKS file `path` (for a test's own checks of the checker).
pub fn verify_with_jwks_file(token: &str, path: &Path, issuer: &str) -> Result<(), String> {
    match read_published(path) {
        Published::Set(set) => verify_with_jwks(token, &set, issuer),
        Published::Absent => Err(format!("{}: absent", path.display())),
        Published::Unusable(why) => Err(why),
    }
}

/// One published JWKS as read this round.
enum Published {
    Absent,
    Unusable(String),
    Set(jsonwebtoken::jwk::JwkSet),
}

fn read_published(path: &Path) -> Published {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Published::Absent,
        Err(e) => Published::Unusable(format!("{}: {e}", path.display())),
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(set) => Published::Set(set),
            Err(e) => Published::Unusable(format!("{}: not a JWKS ({e})", path.display())),
        },
    }
}

/// Mints a token through every server per round (at most one round per `period`) and checks
/// every live token against every server (TokenReview) and against every published JWKS.
async fn workload(
    servers: Vec<Server>,
    options: WorkloadOptions,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<WorkloadReport>>,
) {
    let begin = Instant::now();
    let mut clients = Vec::new();
    for s in &servers {
        clients.push(
            api(s, Duration::from_secs(3))
                .await
                .client()
                .expect("client"),
        );
    }
    {
        let mut r = report.lock().expect("report");
        r.minted_by = vec![0; servers.len()];
        r.jwks_sources = options.jwks.iter().map(|(n, _)| n.clone()).collect();
        r.jwks_checked = vec![0; options.jwks.len()];
        r.jwks_rejected = vec![0; options.jwks.len()];
        r.jwks_absent_rounds = vec![0; options.jwks.len()];
    }
    // (token, minted by, minted at)
    let mut tokens: Vec<(String, usize, Instant)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let round = Instant::now();
        let minted = futures_util::future::join_all(clients.iter().map(mint)).await;
        {
            let mut r = report.lock().expect("report");
            for (i, m) in minted.into_iter().enumerate() {
                match m {
                    Ok(t) => {
                        r.minted += 1;
                        r.minted_by[i] += 1;
                        tokens.push((t, i, Instant::now()));
                    }
                    Err(_) => r.mint_failed += 1,
                }
            }
        }
        // Live: not past its lifetime (less a margin for the check itself).
        tokens.retain(|t| t.2.elapsed() < Duration::from_secs(TOKEN_SECONDS - 30));
        let live = &tokens;
        let checks = futures_util::future::join_all(clients.iter().map(|c| async move {
            let mut out = Vec::new();
            for (t, _, _) in live {
                out.push(review(c, t).await);
            }
            out
        }))
        .await;
        let published: Vec<Published> = options
            .jwks
            .iter()
            .map(|(_, path)| read_published(path))
            .collect();
        {
            let mut r = report.lock().expect("report");
            r.rounds += 1;
            for (checker, results) in checks.into_iter().enumerate() {
                for (token, result) in tokens.iter().zip(results) {
                    match result {
                        Review::Accepted => r.checked += 1,
                        Review::Rejected(why) => {
                            r.checked += 1;
                            r.rejected += 1;
                            if r.rejections.len() < 20 {
                                r.rejections.push(format!(
                                    "at {:.1}s: a token minted by {} {:.1}s before, rejected by {}: {why}",
                                    begin.elapsed().as_secs_f64(),
                                    servers[token.1].name,
                                    token.2.elapsed().as_secs_f64(),
                                    servers[checker].name
                                ));
                            }
                        }
                        Review::Unavailable(_) => r.unavailable += 1,
                    }
                }
            }
            for (source, jwks) in published.iter().enumerate() {
                if matches!(jwks, Published::Absent) {
                    r.jwks_absent_rounds[source] += 1;
                    continue;
                }
                for (token, by, at) in &tokens {
                    let iss =
                        token_claims(token).and_then(|c| c["iss"].as_str().map(str::to_string));
                    if iss.as_deref() != Some(options.issuer.as_str()) {
                        r.jwks_other_issuer += 1;
                        continue;
                    }
                    r.jwks_checked[source] += 1;
                    let verdict = match jwks {
                        Published::Set(set) => verify_with_jwks(token, set, &options.issuer),
                        Published::Unusable(why) => Err(why.clone()),
                        Published::Absent => Ok(()),
                    };
                    if let Err(why) = verdict {
                        r.jwks_rejected[source] += 1;
                        if r.rejections.len() < 20 {
                            r.rejections.push(format!(
                                "at {:.1}s: a token minted by {} {:.1}s before, rejected by the JWKS {} published: {why}",
                                begin.elapsed().as_secs_f64(),
                                servers[*by].name,
                                at.elapsed().as_secs_f64(),
                                options.jwks[source].0
                            ));
                        }
                    }
                }
            }
        }
        let spent = round.elapsed();
        if spent < options.period {
            tokio::time::sleep(options.period - spent).await;
        }
    }
}

/// The running workload.
pub struct Workload {
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<WorkloadReport>>,
    handle: Option<JoinHandle<()>>,
}

impl Workload {
    /// The figures so far.
    pub fn report(&self) -> WorkloadReport {
        self.shared.lock().expect("report").clone()
    }

    /// Waits until it has finished `rounds` rounds in all.
    pub fn wait_rounds(&self, rounds: u64) {
        while self.report().rounds < rounds {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Waits until it has finished `more` rounds after the current one (the newest tokens
    /// checked everywhere).
    pub fn wait_more_rounds(&self, more: u64) {
        self.wait_rounds(self.report().rounds + more);
    }

    /// Stops it after its current round; the final figures.
    pub fn finish(mut self) -> WorkloadReport {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("workload thread");
        }
        self.report()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The monitor's figures.
#[derive(Debug, Clone, Default)]
pub struct MonitorReport {
    /// When the monitor started (Unix ms): the timeline's origin.
    pub started_ms: u64,
    pub samples: u64,
    /// The most apiservers down in one sample: refusing connections, or answering `/readyz`
    /// with something else than 200 (a restarting apiserver does both).
    pub max_down: usize,
    /// Samples in which each server was down.
    pub down_samples: Vec<u64>,
    /// Samples in which some server did not answer within [`MONITOR_TIMEOUT`] (the machine too
    /// busy; not counted as down, listed with `?` in the timeline).
    pub slow_samples: u64,
    /// Every change: seconds since the monitor started, and the servers down then (`cp2?`: no
    /// answer in time).
    pub timeline: Vec<(f64, Vec<String>)>,
}

/// How long the monitor waits for one `/readyz`.
pub const MONITOR_TIMEOUT: Duration = Duration::from_secs(2);

/// One server in one sample of the monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Up,
    Down,
    /// No answer within the timeout: busy (a loaded machine), hung, or going away.
    Slow,
}

async fn seen(api: &Api) -> Seen {
    match api.get("/readyz").await {
        Ok((200, _)) => Seen::Up,
        Ok(_) => Seen::Down,
        Err(e)
            if ["deadline has elapsed", "timed out"]
                .iter()
                .any(|t| e.to_string().contains(t)) =>
        {
            Seen::Slow
        }
        Err(_) => Seen::Down,
    }
}

async fn monitor(servers: Vec<Server>, stop: Arc<AtomicBool>) -> MonitorReport {
    let begin = Instant::now();
    let started_ms = unix_ms();
    let mut apis = Vec::new();
    for s in &servers {
        apis.push(api(s, MONITOR_TIMEOUT).await);
    }
    let mut report = MonitorReport {
        started_ms,
        down_samples: vec![0; servers.len()],
        ..MonitorReport::default()
    };
    let mut last: Option<Vec<String>> = None;
    while !stop.load(Ordering::SeqCst) {
        let sample = Instant::now();
        let states = futures_util::future::join_all(apis.iter().map(seen)).await;
        let shown: Vec<String> = servers
            .iter()
            .zip(&states)
            .filter_map(|(s, st)| match st {
                Seen::Up => None,
                Seen::Down => Some(s.name.clone()),
                Seen::Slow => Some(format!("{}?", s.name)),
            })
            .collect();
        let down = states.iter().filter(|st| **st == Seen::Down).count();
        report.samples += 1;
        report.max_down = report.max_down.max(down);
        if states.contains(&Seen::Slow) {
            report.slow_samples += 1;
        }
        for (i, st) in states.iter().enumerate() {
            if *st == Seen::Down {
                report.down_samples[i] += 1;
            }
        }
        if last.as_ref() != Some(&shown) {
            report
                .timeline
                .push((begin.elapsed().as_secs_f64(), shown.clone()));
            last = Some(shown);
        }
        let spent = sample.elapsed();
        if spent < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(200) - spent).await;
        }
    }
    report
}

/// Now, in Unix milliseconds (the kubelet stand-ins' event clock).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The running monitor.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<MonitorReport>>,
}

impl Monitor {
    pub fn finish(mut self) -> MonitorReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("running")
            .join()
            .expect("monitor thread")
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl MonitorReport {
    /// The timeline as lines (`12.3s: down cp2`).
    pub fn describe(&self) -> String {
        self.timeline
            .iter()
            .map(|(at, down)| {
                if down.is_empty() {
                    format!("{at:6.1}s: all up\n")
                } else {
                    format!("{at:6.1}s: down {}\n", down.join(" "))
                }
            })
            .collect()
    }
}
