//! Helpers for the daemon tests: the real binary started in `run` mode with a test-owned
//! NOTIFY_SOCKET (a unix datagram socket collecting what it tells systemd), signals, polling
//! with deadlines, and keys to rotate in.
#![allow(dead_code)]

use std::io::Read as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::Digest as _;

/// How long a test waits for something the daemon should do within well under a second.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unix datagram socket standing in for systemd's notification socket.
pub struct NotifySocket {
    pub path: PathBuf,
    messages: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().expect("lock").push(text);
            }
        });
        NotifySocket { path, messages }
    }

    /// Every datagram so far.
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().expect("lock").clone()
    }

    /// Every `KEY=value` line so far, in order.
    pub fn lines(&self) -> Vec<String> {
        self.messages()
            .iter()
            .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    /// The STATUS= values so far.
    pub fn statuses(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("STATUS=").map(str::to_string))
            .collect()
    }

    /// Waits for a line for which `pred` holds; returns it.
    pub fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        eventually(DEADLINE, || self.lines().into_iter().find(|l| pred(l))).unwrap_or_else(|| {
            panic!(
                "no notification {what} within {DEADLINE:?}; got:\n{}",
                self.lines().join("\n")
            )
        })
    }

    pub fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }
}

/// `irsa-agent --root ROOT run ARGS` running in the background.
pub struct Daemon {
    pub child: Child,
    pub notify: NotifySocket,
    pub log: PathBuf,
    pub root: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_irsa-agent"))
}

impl Daemon {
    pub fn start(root: &Path, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(root, false, args, envs)
    }

    /// As [`Daemon::start`], but given `--root` as a path relative to its working directory
    /// (the root's parent), as a person typing `--root ./host` does.
    pub fn start_relative(root: &Path, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(root, true, args, envs)
    }

    fn spawn(root: &Path, relative: bool, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let notify = NotifySocket::bind(dir.path());
        let log = dir.path().join("daemon.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let mut cmd = Command::new(binary());
        if relative {
            let parent = root.parent().expect("the root has a parent");
            let name = root.file_name().expect("the root has a name");
            cmd.current_dir(parent)
                .arg("--root")
                .arg(Path::new(".").join(name));
        } else {
            cmd.arg("--root").arg(root);
        }
        cmd.arg("-v").arg("run").args(args);
        for var in [
            "IRSA_AGENT_CONFIG",
            "IRSA_AGENT_SYSTEMCTL",
            "IRSA_AGENT_APISERVER_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
            "INVOCATION_ID",
            "SSL_CERT_FILE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("NOTIFY_SOCKET", &notify.path)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("HOME", root.join("root"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start irsa-agent run");
        Daemon {
            child,
            notify,
            log,
            root: root.to_path_buf(),
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// Panics (with the daemon's log) unless it is still running.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the daemon exited ({status}):\n{}", self.log());
        }
    }

    /// Waits for READY=1.
    pub fn wait_ready(&mut self) {
        let ready = eventually(DEADLINE, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the daemon exited ({status}) before READY:\n{}", self.log());
            }
            self.notify
                .lines()
                .iter()
                .any(|l| l == "READY=1")
                .then_some(())
        });
        assert!(
            ready.is_some(),
            "no READY=1 within {DEADLINE:?}; notifications:\n{}\nlog:\n{}",
            self.notify.lines().join("\n"),
            self.log()
        );
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.signal(rustix::process::Signal::TERM);
        let status = eventually(DEADLINE, || self.child.try_wait().ok().flatten())
            .unwrap_or_else(|| panic!("no exit within {DEADLINE:?} of SIGTERM:\n{}", self.log()));
        (status, self.log())
    }

    /// `irsa-agent status --json` of this root.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.root)
    }

    /// Waits until `pred` holds for `status --json`; returns that status.
    pub fn wait_status(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let found = eventually(DEADLINE, || {
            let s = self.status();
            pred(&s).then_some(s)
        });
        match found {
            Some(s) => s,
            None => {
                self.assert_running();
                panic!(
                    "status never showed {what} within {DEADLINE:?}; last:\n{}\nlog:\n{}",
                    serde_json::to_string_pretty(&self.status()).unwrap_or_default(),
                    self.log()
                )
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `irsa-agent --root ROOT status --json`.
pub fn status_json(root: &Path) -> serde_json::Value {
    let out = Command::new(binary())
        .arg("--root")
        .arg(root)
        .args(["status", "--json"])
        .output()
        .expect("status runs");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Writes `contents` to a temp file beside `path` and renames it over `path`, as editors,
/// kubeadm and k3s do.
pub fn replace_by_rename(path: &Path, contents: &[u8]) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-test",
        path.file_name().expect("name").to_string_lossy()
    ));
    std::fs::write(&tmp, contents).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A fresh P-256 key as kube-apiserver takes it: (private key PEM (PKCS#8) for
/// --service-account-signing-key-file, public key PEM for --service-account-key-file, kid
/// computed here independently of the agent: base64url(SHA-256(SPKI DER))).
pub struct EcKey {
    pub private_pem: String,
    pub public_pem: String,
    pub kid: String,
}

pub fn new_ec_key() -> EcKey {
    use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
    let secret = p256::SecretKey::random(&mut rand::thread_rng());
    let private_pem = secret
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .expect("pem")
        .to_string();
    let public_pem = secret
        .public_key()
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .expect("pem");
    let spki = secret.public_key().to_public_key_der().expect("spki");
    let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(spki.as_bytes()));
    EcKey {
        private_pem,
        public_pem,
        kid,
    }
}

/// The kids of a JWKS document.
pub fn kids(jwks: &[u8]) -> Vec<String> {
    let doc: serde_json::Value = serde_json::from_slice(jwks).unwrap_or_default();
    doc["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k["kid"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `irsa-agent jwks --key-file ...` for these host paths under `root`: what kube-apiserver
/// serves for them (that command is checked against real apiserver output elsewhere).
pub fn jwks_for(root: &Path, key_files: &[&str]) -> Vec<u8> {
    let mut cmd = Command::new(binary());
    cmd.arg("jwks");
    for f in key_files {
        cmd.arg("--key-file")
            .arg(root.join(f.trim_start_matches('/')));
    }
    let out = cmd.output().expect("jwks runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}
