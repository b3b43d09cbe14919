//! Hostile inputs through the real binary: key files and configuration files built to make a
//! parser take time quadratic (or worse) in their size. Each must be answered in under a
//! second with an error naming the file and the cause. A guard kills a run after 20 s so a
//! regression fails instead of hanging.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOUND: Duration = Duration::from_secs(1);
const GUARD: Duration = Duration::from_secs(20);

/// Runs the binary; returns (exit code, stderr, elapsed). Panics if it runs past [`GUARD`].
fn run_bounded(args: &[&std::ffi::OsStr]) -> (i32, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_irsa-agent"))
        .args(args)
        .env_remove("IRSA_AGENT_CONFIG")
        .env_remove("IRSA_AGENT_ROOT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > GUARD {
            let _ = child.kill();
            let _ = child.wait();
            panic!("irsa-agent {args:?} still running after {GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    let text = reader.join().expect("stderr reader");
    (status.code().unwrap_or(-1), text, elapsed)
}

/// Just under 1 MiB (the readers' cap) of `unit`, then `tail`.
fn mib_of(unit: &str, tail: &str) -> String {
    let mut s = unit.repeat(((1 << 20) - tail.len()) / unit.len());
    s.push_str(tail);
    s
}

#[test]
fn hostile_key_files_are_answered_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "begin-no-end.pem",
            mib_of("-----BEGIN X-----\n", ""),
            "holds no PEM block",
        ),
        (
            "begin-one-end.pem",
            mib_of("-----BEGIN X-----\n", "aGk=\n-----END X-----\n"),
            "not a key",
        ),
        (
            "begin-headers.pem",
            mib_of(
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n",
                "",
            ),
            "holds no PEM block",
        ),
        (
            "begin-junk-end.pem",
            mib_of(
                "-----BEGIN PUBLIC KEY-----\n",
                &format!("-----END PUBLIC KEY-----{}x\n", " ".repeat(1000)),
            ),
            "holds no PEM block",
        ),
    ];
    for (name, text, cause) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let (code, stderr, took) =
            run_bounded(&["jwks".as_ref(), "--key-file".as_ref(), path.as_os_str()]);
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(cause), "{name}: {stderr}");
        assert!(took < BOUND, "{name}: took {took:?}");
    }
}

fn check_config(file: &Path) -> (i32, String, Duration) {
    run_bounded(&[
        "--config".as_ref(),
        file.as_os_str(),
        "check-config".as_ref(),
    ])
}

#[test]
fn hostile_configurations_are_refused_in_bounded_time_naming_file_and_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deep = "nests collections too deeply (more than 64 levels at line";
    let mut block = String::from("issuer: https://oidc.example.com/x\n");
    for level in 0..1000 {
        block.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
    }
    let cases = [
        (
            "flow-seq.yaml",
            format!("issuer: {}", "[".repeat(200_000)),
            deep,
        ),
        (
            "flow-map.yaml",
            format!("issuer: {}", "{a: ".repeat(50_000)),
            deep,
        ),
        (
            "flow-lines.yaml",
            format!("rotation:\n  every: {}", "[\n".repeat(100_000)),
            deep,
        ),
        (
            "compact-seq.yaml",
            format!("publish:\n  {}", "- ".repeat(100_000)),
            deep,
        ),
        ("block.yaml", block, deep),
        (
            "tagged.yaml",
            format!("issuer: !!seq &a {}", "[ !!seq ".repeat(30_000)),
            deep,
        ),
        (
            "too-large.yaml",
            format!(
                "# {}\nissuer: https://oidc.example.com/x\n",
                "x".repeat(1 << 20)
            ),
            "larger than the 1 MiB limit",
        ),
    ];
    for (name, text, cause) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let (code, stderr, took) = check_config(&path);
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()) && stderr.contains(cause),
            "{name}: want the file and {cause:?} in:\n{stderr}"
        );
        assert!(took < BOUND, "{name}: took {took:?}");
    }
}

#[test]
fn a_byte_order_mark_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, "\u{feff}issuer: https://oidc.example.com/x\n").expect("write");
    let (code, stderr, _) = check_config(&path);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn odd_issuers_are_refused_with_their_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (issuer, cause) in [
        (
            "\"https:oidc.example.com/x\"",
            "\"https:\" is not followed by \"//\"",
        ),
        ("\"https:///x\"", "has no host"),
        (
            "https://a..b/x",
            "has an invalid host name \"a..b\": it has an empty label",
        ),
        (
            "https://-a.example/x",
            "has an invalid host name \"-a.example\"",
        ),
        (
            "https://oidc.example.com/a%00",
            "percent-encoded control character \"%00\"",
        ),
        ("\"https://oidc.example.com/a\\0b\"", "control character"),
    ] {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, format!("issuer: {issuer}\n")).expect("write");
        let (code, stderr, _) = check_config(&path);
        assert_eq!(code, 1, "{issuer}: {stderr}");
        assert!(
            stderr.contains(&format!("{}: issuer = ", path.display())) && stderr.contains(cause),
            "{issuer}: want {cause:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("has a port"), "{issuer}: {stderr}");
    }
}
