//! Real servers for the publishing tests: a test CA (openssl), SeaweedFS 4.48 (S3 + STS) and
//! nginx on 127.0.0.1, and the Python venv with PyJWT. `bash tests/run.sh` installs them; a
//! missing tool makes the test FAIL with the command that installs it (never a silent skip).
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The venv tests/run.sh creates (weed, python with PyJWT).
pub fn venv() -> PathBuf {
    if let Ok(v) = std::env::var("IRSA_TEST_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/irsa-agent-test-venv")
}

/// A tool from the venv or PATH; panics (test fails) with how to install it.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed (looked in {} and PATH): run `bash tests/run.sh`, which installs SeaweedFS, nginx, curl, openssl and PyJWT",
            venv().join("bin").display()
        )
    })
}

/// A tool from the venv or PATH, if there is one.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let in_venv = venv().join("bin").join(name);
    if in_venv.exists() {
        return Some(in_venv);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let candidate = dir.join(name);
        if candidate.exists() {
            return Some(candidate);
        }
    }
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.exists())
}

/// A free TCP port on 127.0.0.1 for a server another process will bind (SeaweedFS, nginx).
///
/// Not `bind(:0)`: that hands out a port from the kernel's ephemeral range, which every
/// outgoing connection also draws its source port from, so between our check and the server's
/// own bind a client socket could take it (CI once saw SeaweedFS's filer fail with "address
/// already in use", and the stop/restart test leaves its ports free for seconds). Ports here
/// come from below that range (20000-32767), start at an offset derived from the pid so test
/// binaries rarely meet, never repeat within a process, and are checked free by binding them.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 32_768 - LOW;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = u16::try_from(LOW + offset).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 between {LOW} and 32767");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test CA and a server certificate for 127.0.0.1 / localhost.
pub struct TestCa {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn create(dir: &Path) -> TestCa {
        let openssl = tool("openssl");
        let p = |n: &str| dir.join(n);
        run(Command::new(&openssl)
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=irsa-agent test CA", "-keyout"])
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.crt")));
        run(Command::new(&openssl)
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
            ])
            .arg(p("tls.key"))
            .arg("-out")
            .arg(p("tls.csr")));
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext.cnf");
        run(Command::new(&openssl)
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(p("tls.csr"))
            .arg("-CA")
            .arg(p("ca.crt"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("tls.crt"))
            .arg("-extfile")
            .arg(p("ext.cnf")));
        TestCa {
            ca_cert: p("ca.crt"),
            cert: p("tls.crt"),
            key: p("tls.key"),
        }
    }
}

/// Spawns `program args` so that it dies with this test process: a small bash watchdog kills
/// it when our pid disappears (statics are never dropped, so a shared server needs this).
pub fn spawn_tied(
    program: &Path,
    args: &[String],
    envs: &[(&str, &str)],
    log: &Path,
    cwd: &Path,
) -> Child {
    let script = r#"prog="$1"; shift; "$prog" "$@" & child=$!
trap 'kill $child 2>/dev/null; wait $child 2>/dev/null; exit 0' TERM INT EXIT
while kill -0 "$IRSA_TEST_PARENT" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.3; done"#;
    let log_file = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .arg("watchdog")
        .arg(program)
        .args(args)
        .env("IRSA_TEST_PARENT", std::process::id().to_string())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()))
}

/// Waits until `port` answers an HTTP request with any status.
pub fn wait_http(port: u16, what: &str, log: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited ({status}) before answering:\n{}", tail(log));
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
            let mut buf = [0u8; 12];
            if s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not answer on 127.0.0.1:{port} within 60 s:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A user-mode nginx with its own configuration, serving `locations` over TLS (the test CA).
pub struct Nginx {
    child: std::process::Child,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts nginx on 127.0.0.1:`port` with `locations` (nginx `location` blocks) in its server.
pub fn start_nginx(dir: &Path, locations: &str, ca: &TestCa, port: u16) -> Nginx {
    let conf = format!(
        r#"daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
{locations}
    }}
}}
"#,
        dir = dir.display(),
        cert = ca.cert.display(),
        key = ca.key.display(),
    );
    std::fs::create_dir_all(dir.join("tmp")).expect("tmp");
    std::fs::write(dir.join("nginx.conf"), conf).expect("conf");
    let log = dir.join("nginx.out");
    let nginx = tool("nginx");
    let mut child = spawn_tied(
        &nginx,
        &[
            "-p".into(),
            dir.display().to_string(),
            "-c".into(),
            dir.join("nginx.conf").display().to_string(),
        ],
        &[],
        &log,
        dir,
    );
    // nginx speaks TLS only; a plain GET still gets an (error) answer.
    wait_http(port, "nginx", &dir.join("error.log"), &mut child);
    Nginx { child }
}

/// The S3 identity the tests sign with (SigV4).
pub const ADMIN_KEY: &str = "AKIDIRSAADMIN";
pub const ADMIN_SECRET: &str = "irsa-admin-secret-0123456789";
/// The account the roles live in.
pub const ROLE_PUBLISHER: &str = "arn:aws:iam::123456789012:role/irsa-publisher";

/// A SeaweedFS 4.48 `weed mini` on 127.0.0.1: S3 over http and https, STS trusting the given
/// issuers (`https://127.0.0.1:<https port>/<bucket>` for each bucket in `oidc_buckets`).
pub struct Seaweed {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub http_port: u16,
    pub https_port: u16,
    child: Child,
    pub log: PathBuf,
    /// How it was started, for [`Seaweed::restart`].
    program: PathBuf,
    args: Vec<String>,
    ca_path: String,
}

impl Seaweed {
    pub fn start(oidc_buckets: &[&str]) -> Seaweed {
        let weed = tool("weed");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::create(dir.path());
        let ports: Vec<u16> = (0..15).map(|_| free_port()).collect();
        let (http_port, https_port) = (ports[0], ports[1]);
        let s3 = serde_json::json!({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": ADMIN_KEY, "secretKey": ADMIN_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]
        }]});
        let providers: Vec<serde_json::Value> = oidc_buckets
            .iter()
            .map(|b| {
                serde_json::json!({"name": format!("cluster-{b}"), "type": "oidc", "enabled": true,
                "config": {"issuer": format!("https://127.0.0.1:{https_port}/{b}"),
                           "clientId": "sts.amazonaws.com", "jwksCacheTTLSeconds": 1}})
            })
            .collect();
        let federated: Vec<String> = oidc_buckets
            .iter()
            .map(|b| format!("cluster-{b}"))
            .collect();
        let iam = serde_json::json!({
            "sts": {"tokenDuration": "1h", "maxSessionLength": "12h", "issuer": "seaweedfs-sts",
                    "signingKey": "aXJzYS1hZ2VudC10ZXN0LXN0cy1zaWduaW5nLWtleS0zMmI="},
            "providers": providers,
            "policy": {"defaultEffect": "Deny", "storeType": "memory"},
            "roles": [{"roleName": "irsa-publisher", "roleArn": ROLE_PUBLISHER,
                "trustPolicy": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                    "Principal": {"Federated": federated}, "Action": ["sts:AssumeRoleWithWebIdentity"]}]},
                "attachedPolicies": ["publisher"]}],
            "policies": [{"name": "publisher", "document": {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*", "arn:aws:s3:::*/*"]},
                {"Effect": "Allow", "Action": ["sts:ValidateSession"], "Resource": ["*"]}]}}]
        });
        std::fs::write(dir.path().join("s3.json"), s3.to_string()).expect("s3.json");
        std::fs::write(dir.path().join("iam.json"), iam.to_string()).expect("iam.json");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        let p = |i: usize| ports[i].to_string();
        let args: Vec<String> = [
            "mini".to_string(),
            format!("-dir={}", dir.path().join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-master.telemetry=false".into(),
            format!("-s3.port={}", p(0)),
            format!("-s3.port.https={}", p(1)),
            format!("-master.port={}", p(2)),
            format!("-master.port.grpc={}", p(3)),
            format!("-volume.port={}", p(4)),
            format!("-volume.port.grpc={}", p(5)),
            format!("-filer.port={}", p(6)),
            format!("-filer.port.grpc={}", p(7)),
            format!("-s3.port.grpc={}", p(8)),
            format!("-s3.port.iceberg={}", p(9)),
            format!("-s3.port.lance={}", p(10)),
            format!("-admin.port={}", p(11)),
            format!("-admin.port.grpc={}", p(12)),
            "-metricsPort=0".into(),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            format!("-s3.cert.file={}", ca.cert.display()),
            format!("-s3.key.file={}", ca.key.display()),
            "-s3.config=s3.json".into(),
            "-s3.iam.config=iam.json".into(),
        ]
        .into();
        let log = dir.path().join("weed.log");
        let ca_path = ca.ca_cert.display().to_string();
        let mut child = spawn_tied(
            &weed,
            &args,
            &[("SSL_CERT_FILE", ca_path.as_str())],
            &log,
            dir.path(),
        );
        wait_http(http_port, "SeaweedFS S3", &log, &mut child);
        wait_http(https_port, "SeaweedFS S3 (https)", &log, &mut child);
        Seaweed {
            dir,
            ca,
            http_port,
            https_port,
            child,
            log,
            program: weed,
            args,
            ca_path,
        }
    }

    /// Stops the server (the target is down: connections are refused).
    pub fn stop(&mut self) {
        terminate(&mut self.child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.http_port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "SeaweedFS still answers after kill"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts it again on the same ports with the same data.
    pub fn restart(&mut self) {
        let log = self.dir.path().join("weed-restarted.log");
        self.child = spawn_tied(
            &self.program,
            &self.args,
            &[("SSL_CERT_FILE", self.ca_path.as_str())],
            &log,
            self.dir.path(),
        );
        wait_http(
            self.http_port,
            "SeaweedFS S3 (restarted)",
            &log,
            &mut self.child,
        );
        self.log = log;
    }

    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }
    pub fn https_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.https_port)
    }
    /// The issuer whose documents live at the root of `bucket`.
    pub fn issuer(&self, bucket: &str) -> String {
        format!("https://127.0.0.1:{}/{bucket}", self.https_port)
    }

    /// A SigV4-signed request with curl (an independent S3 client).
    pub fn curl_signed(&self, method: &str, path_and_query: &str, body: &[u8]) -> (u16, String) {
        use sha2::Digest as _;
        let hash: String = sha2::Sha256::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let body_file = self.dir.path().join(format!("body-{}", free_port()));
        std::fs::write(&body_file, body).expect("body");
        let out = Command::new(tool("curl"))
            .args(["-s", "-w", "\n%{http_code}", "-X", method])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user"])
            .arg(format!("{ADMIN_KEY}:{ADMIN_SECRET}"))
            .arg("-H")
            .arg(format!("x-amz-content-sha256: {hash}"))
            .arg("--data-binary")
            .arg(format!("@{}", body_file.display()))
            .arg(format!("{}{path_and_query}", self.http_endpoint()))
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Creates a bucket, optionally world-readable through a bucket policy.
    pub fn create_bucket(&self, bucket: &str, public_read: bool) {
        let (code, body) = self.curl_signed("PUT", &format!("/{bucket}"), b"");
        assert_eq!(code, 200, "create bucket {bucket}: {body}");
        if public_read {
            let policy = serde_json::json!({"Version": "2012-10-17", "Statement": [{
                "Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                "Action": ["s3:GetObject"], "Resource": [format!("arn:aws:s3:::{bucket}/*")]}]});
            let (code, body) = self.curl_signed(
                "PUT",
                &format!("/{bucket}?policy="),
                policy.to_string().as_bytes(),
            );
            assert!(
                code == 200 || code == 204,
                "bucket policy for {bucket}: {code} {body}"
            );
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// Stops a [`spawn_tied`] server: SIGTERM to its watchdog shell, whose trap stops the server
/// and waits for it (a SIGKILL would leave the server running until this test process ends).
pub fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id())
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A fake k3s host whose keys are `tests/data/apiserver/k3s/keys`, with this config.
pub fn k3s_host(config_yaml: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let tls = root.path().join("var/lib/rancher/k3s/server/tls");
    std::fs::create_dir_all(&tls).expect("tls dir");
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver/k3s/keys");
    for name in ["service.key", "service.current.key"] {
        std::fs::copy(keys.join(name), tls.join(name)).expect("copy key");
    }
    std::fs::create_dir_all(root.path().join("etc/rancher/k3s")).expect("k3s dir");
    write_config(root.path(), config_yaml);
    root
}

pub fn write_config(root: &Path, config_yaml: &str) {
    let dir = root.join("etc/irsa-agent");
    std::fs::create_dir_all(&dir).expect("config dir");
    std::fs::write(dir.join("config.yaml"), config_yaml).expect("config");
}

/// The k3s host's signing key file.
pub fn signing_key_file(root: &Path) -> PathBuf {
    root.join("var/lib/rancher/k3s/server/tls/service.current.key")
}

/// Runs the agent; returns (exit code, stdout, stderr).
pub fn agent(root: &Path, args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = assert_cmd::Command::cargo_bin("irsa-agent").expect("binary");
    cmd.arg("--root").arg(root).args(args);
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_ENDPOINT",
        "IRSA_AGENT_CONFIG",
        "SSL_CERT_FILE",
    ] {
        cmd.env_remove(var);
    }
    // The agent must never reach for an instance metadata service in tests.
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    cmd.env("HOME", root.join("root"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A python script run with the venv's python (PyJWT installed).
pub fn python(script: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tool("python3"))
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
