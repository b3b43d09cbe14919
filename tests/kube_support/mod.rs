//! A real kube-apiserver (and its etcd) for tests, started by `tests/kube/start-apiserver.sh`
//! from the binary `IRSA_TEST_KUBE_APISERVER` names, and requests to it with its admin
//! client certificate.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

pub struct Kube {
    pub scripts: PathBuf,
    pub flags: PathBuf,
    pub state: PathBuf,
    pub port: u16,
    pub kapi: String,
    /// The folder of its state when [`Kube::temp`] made it: removed after the apiserver and
    /// etcd are stopped ([`Drop`] runs before the fields are dropped).
    dir: Option<tempfile::TempDir>,
}

impl Kube {
    pub fn start(&self) {
        let out = Command::new("bash")
            .arg(self.scripts.join("start-apiserver.sh"))
            .arg(&self.flags)
            .arg(&self.state)
            .env("IRSA_TEST_KUBE_APISERVER", &self.kapi)
            .output()
            .expect("start-apiserver.sh");
        assert!(
            out.status.success(),
            "start-apiserver.sh failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn stop_apiserver(&self) {
        let status = Command::new("bash")
            .arg(self.scripts.join("stop-apiserver.sh"))
            .arg(&self.state)
            .arg("apiserver")
            .status()
            .expect("stop-apiserver.sh");
        assert!(status.success());
    }

    pub fn pki(&self, name: &str) -> PathBuf {
        self.state.join("pki").join(name)
    }

    /// One request with the admin client certificate (curl): (HTTP code, body).
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg("--cacert")
            .arg(self.pki("ca.crt"))
            .arg("--cert")
            .arg(self.pki("admin.crt"))
            .arg("--key")
            .arg(self.pki("admin.key"))
            .args(["--max-time", "10"]);
        if let Some(b) = body {
            let content_type = if method == "PATCH" {
                // Server-side apply (JSON is YAML).
                "Content-Type: application/apply-patch+yaml"
            } else {
                "Content-Type: application/json"
            };
            cmd.args(["-H", content_type, "--data-binary"])
                .arg(b.to_string());
        }
        cmd.arg(format!("https://127.0.0.1:{}{path}", self.port));
        let out = cmd.output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (code, text) = self.api(method, path, body);
        assert!(
            (200..300).contains(&code),
            "{method} {path}: HTTP {code}: {text}"
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Does the apiserver accept `token` (TokenReview)?
    pub fn accepts(&self, token: &str, audience: Option<&str>) -> Result<(), String> {
        let mut spec = json!({ "token": token });
        if let Some(a) = audience {
            spec["audiences"] = json!([a]);
        }
        let review = self.ok(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            Some(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})),
        );
        if review["status"]["authenticated"] == true {
            Ok(())
        } else {
            Err(review["status"].to_string())
        }
    }
}

impl Drop for Kube {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop-apiserver.sh"))
            .arg(&self.state)
            .status();
    }
}

impl Kube {
    /// The binary's path from `IRSA_TEST_KUBE_APISERVER`, or `None` after saying the test was
    /// not run.
    pub fn binary(test: &str) -> Option<String> {
        match std::env::var("IRSA_TEST_KUBE_APISERVER") {
            Ok(path) => Some(path),
            Err(_) => {
                eprintln!(
                    "SKIPPED: {test} not run: IRSA_TEST_KUBE_APISERVER not set (`.ci/run` sets it from ../shared/tools/kube-apiserver --path)"
                );
                None
            }
        }
    }

    /// A Kube in `dir` on these ports, with the scripts of tests/kube.
    pub fn new(dir: &Path, kapi: String, ports: [u16; 4]) -> Kube {
        let flags = dir.join("flags");
        std::fs::create_dir_all(&flags).expect("flags dir");
        std::fs::write(
            flags.join("env"),
            format!(
                "SECURE_PORT={}\nETCD_PORT={}\nETCD_PEER_PORT={}\nETCD_METRICS_PORT={}\n",
                ports[0], ports[1], ports[2], ports[3]
            ),
        )
        .expect("env");
        Kube {
            scripts: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube"),
            flags,
            state: dir.join("kapi"),
            port: ports[0],
            kapi,
            dir: None,
        }
    }

    /// A Kube for `test` in a temporary folder of its own, on free ports (not started); `None`
    /// after saying SKIPPED when there is no kube-apiserver ([`Kube::binary`]). The includer
    /// declares `mod support;` (for its free ports).
    pub fn temp(test: &str) -> Option<Kube> {
        let kapi = Kube::binary(test)?;
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = [(); 4].map(|()| crate::support::free_port());
        let mut kube = Kube::new(dir.path(), kapi, ports);
        kube.dir = Some(dir);
        Some(kube)
    }

    /// The folder [`Kube::temp`] made (for the test's own files next to the apiserver's).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or_else(|| self.state.parent().unwrap_or(&self.state), |d| d.path())
    }

    /// The k3s test case's service-account keys (tests/data/apiserver/k3s/keys): the
    /// verification file and the signing file.
    pub fn test_keys() -> (PathBuf, PathBuf) {
        let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/apiserver/k3s/keys");
        (keys.join("service.key"), keys.join("service.current.key"))
    }

    /// Starts it with `issuer`, the k3s test case's keys ([`Kube::test_keys`]) and `extra`
    /// flags (one per line, as in apiserver.args).
    pub fn start_with_test_keys(&self, issuer: &str, extra: &str) {
        let (key, signing) = Kube::test_keys();
        std::fs::write(
            self.flags.join("apiserver.args"),
            format!(
                "--service-account-issuer={issuer}\n--service-account-key-file={}\n--service-account-signing-key-file={}\n{extra}",
                key.display(),
                signing.display()
            ),
        )
        .expect("apiserver.args");
        self.start();
    }
}
