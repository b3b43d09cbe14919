//! A local user attacks the host the agent runs on, for real: the attacker is uid 65534 (through
//! `setpriv`, so these tests need root, as CI has; elsewhere they say they were not run), the
//! agent is the real binary running as root against a fake host root.
//!
//! Each attack ends in a clear error or a corrected target within seconds: never a hang, never
//! a write, a mode change or an owner change outside the publish target. The victims are files
//! of the fake host (a `sa.key`, an admin kubeconfig, `/etc/cron.d`), reached by links with
//! their absolute paths, exactly as an attacker would aim at the real ones.

mod apply_support;
mod https_support;
mod run_support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use apply_support::Host;
use run_support::{DEADLINE, Daemon, binary, eventually, kids};

const ATTACKER: u32 = 65534;
const JWKS: &str = "/srv/oidc/openid/v1/jwks";
const DISCOVERY: &str = "/srv/oidc/.well-known/openid-configuration";

/// True when the attacks can run (they need root to switch to the attacker's uid).
fn as_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED {test}: needs root to run the attacker as uid {ATTACKER} (CI runs as root)");
    false
}

fn config(extra: &str) -> String {
    format!(
        "issuer: https://oidc.example.com/homelab\ndistribution: k3s\npublic-check: false\npublish:\n  - type: directory\n    path: /srv/oidc\n{extra}"
    )
}

/// A k3s host with a directory target and the victims: a private key, a kubeconfig, a cron
/// folder. The fake root is traversable by the attacker, like `/` is.
fn host(target_config: &str) -> Host {
    let host = Host::new();
    host.write("/etc/irsa-agent/config.yaml", config(target_config))
        .write("/etc/rancher/k3s/config.yaml", "# k3s\n")
        .k3s_keys("/var/lib/rancher/k3s")
        .write(
            "/etc/kubernetes/pki/sa.key",
            "-----BEGIN PRIVATE KEY-----\nvictim\n",
        )
        .write(
            "/etc/rancher/k3s/k3s.yaml",
            "apiVersion: v1\nkind: Config\n",
        );
    for (path, mode) in [
        ("/etc/kubernetes/pki/sa.key", 0o600),
        ("/etc/rancher/k3s/k3s.yaml", 0o600),
    ] {
        set_mode(&host.path(path), mode);
    }
    std::fs::create_dir_all(host.path("/etc/cron.d")).expect("cron.d");
    std::fs::create_dir_all(host.path("/srv/oidc")).expect("target");
    set_mode(host.root(), 0o755);
    host
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
}

/// Mode, owner and content of every file and folder of the fake host outside the publish
/// target and what the agent itself maintains: what no attack may change.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            // The target, the agent's state, and k3s's config.yaml, which the daemon
            // legitimately gives the issuer (no attack aims at it).
            if rel.starts_with("srv")
                || rel.starts_with("var/lib/irsa-agent")
                || rel == Path::new("etc/rancher/k3s/config.yaml")
            {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let content = if meta.is_file() {
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned()
            } else {
                String::new()
            };
            out.insert(
                rel,
                format!(
                    "{:o} {}:{} {content}",
                    meta.permissions().mode(),
                    meta.uid(),
                    meta.gid()
                ),
            );
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_untouched(before: &BTreeMap<PathBuf, String>, root: &Path, what: &str) {
    let after = snapshot(root);
    if &after != before {
        let changed: Vec<String> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, v)| format!("{}: {v:?} (was {:?})", k.display(), before.get(k)))
            .chain(
                before
                    .keys()
                    .filter(|k| !after.contains_key(*k))
                    .map(|k| format!("{}: removed", k.display())),
            )
            .collect();
        panic!(
            "{what} changed files outside the target:\n{}",
            changed.join("\n")
        );
    }
}

/// Runs the agent as root with a deadline: a hang is a failure, not a stuck test.
fn agent(root: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(binary())
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("IRSA_AGENT_CONFIG")
        .env("HOME", root.join("root"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    panic!(
        "irsa-agent {args:?} hung for {DEADLINE:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The attacker: a Python loop run as uid 65534 until killed (on drop).
struct Attacker(Child);

impl Attacker {
    fn start(script: &str, args: &[&Path]) -> Attacker {
        let child = Command::new("setpriv")
            .args([
                &format!("--reuid={ATTACKER}"),
                &format!("--regid={ATTACKER}"),
                "--clear-groups",
                "--",
                "/usr/bin/python3",
                "-c",
                script,
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv");
        Attacker(child)
    }

    /// Stops the loop; returns what it printed (its iteration count).
    fn stop(mut self) -> String {
        let _ = self.0.kill();
        let mut out = String::new();
        if let Some(mut stdout) = self.0.stdout.take() {
            use std::io::Read as _;
            let _ = stdout.read_to_string(&mut out);
        }
        let _ = self.0.wait();
        out
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Swaps links to the victims in for the documents and their folders, as fast as it can:
/// `openid` and `.well-known` are moved away (the target folder is the attacker's) and
/// replaced by the attacker's own folders holding links, or by links to `/etc/cron.d`.
const RACE: &str = r#"
import os, sys, itertools
target, victim, victim_dir = sys.argv[1:4]
def attempt(f):
    try:
        f()
    except OSError:
        pass
n = 0
for n in itertools.count():
    tmp = os.path.join(target, ".x%d" % (n % 4))
    attempt(lambda: os.rename(os.path.join(target, "openid"), os.path.join(target, ".old%d" % n)))
    attempt(lambda: os.makedirs(os.path.join(target, "openid", "v1")))
    attempt(lambda: os.unlink(tmp))
    attempt(lambda: os.symlink(victim, tmp))
    attempt(lambda: os.rename(tmp, os.path.join(target, "openid", "v1", "jwks")))
    attempt(lambda: os.rename(os.path.join(target, ".well-known"), os.path.join(target, ".wk%d" % n)))
    attempt(lambda: os.symlink(victim_dir, os.path.join(target, ".well-known")))
    attempt(lambda: os.unlink(tmp))
    attempt(lambda: os.symlink(victim, tmp))
    attempt(lambda: os.rename(tmp, os.path.join(target, "_headers")))
    if n % 500 == 0:
        print(n, flush=True)
"#;

fn assert_published(host: &Host) {
    for path in [JWKS, DISCOVERY] {
        let meta = std::fs::symlink_metadata(host.path(path)).expect(path);
        assert!(meta.is_file(), "{path} is not a regular file");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644, "{path}");
        assert_eq!(meta.uid(), 0, "{path} is not root's");
    }
    let jwks = std::fs::read(host.path(JWKS)).expect("jwks");
    assert_eq!(kids(&jwks).len(), 2, "{}", String::from_utf8_lossy(&jwks));
}

#[test]
fn a_target_folder_others_can_write_is_refused_with_the_folder_owner_mode_and_fix() {
    if !as_root("a_target_folder_others_can_write_is_refused") {
        return;
    }
    // Owned by the attacker.
    let h = host("");
    chown(&h.path("/srv/oidc"), ATTACKER);
    let before = snapshot(h.root());
    let out = agent(h.root(), &["publish"]);
    let said = text(&out);
    assert_ne!(out.status.code(), Some(0), "{said}");
    for needle in ["/srv/oidc", "owner uid 65534", "writable-by", "chmod go-w"] {
        assert!(said.contains(needle), "missing {needle:?} in:\n{said}");
    }
    let doctor = agent(h.root(), &["doctor", "--offline"]);
    assert_eq!(doctor.status.code(), Some(1), "{}", text(&doctor));
    assert!(
        text(&doctor).contains("owner uid 65534"),
        "{}",
        text(&doctor)
    );
    assert!(
        std::fs::read_dir(h.path("/srv/oidc"))
            .expect("target")
            .next()
            .is_none(),
        "nothing may be written into a refused folder"
    );
    assert_untouched(&before, h.root(), "a refused publish");

    // Root's, but writable by everyone; and a folder above it writable by a group.
    let h = host("");
    set_mode(&h.path("/srv/oidc"), 0o777);
    let said = text(&agent(h.root(), &["publish"]));
    assert!(
        said.contains("mode 0777") && said.contains("every user"),
        "{said}"
    );
    let h = host("");
    set_mode(&h.path("/srv/oidc"), 0o755);
    std::os::unix::fs::chown(h.path("/srv"), Some(0), Some(ATTACKER)).expect("chgrp");
    set_mode(&h.path("/srv"), 0o775);
    let said = text(&agent(h.root(), &["publish"]));
    assert!(
        said.contains("/srv (") && said.contains("group gid 65534"),
        "{said}"
    );

    // Named in writable-by: accepted, and the documents are root's 0644.
    let h = host("    writable-by: 65534\n");
    chown(&h.path("/srv/oidc"), ATTACKER);
    let out = agent(h.root(), &["publish", "--no-verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_published(&h);
}

#[test]
fn the_link_race_never_changes_a_file_outside_the_target_in_30_publishes_and_10s_of_the_daemon() {
    if !as_root("the_link_race_never_changes_a_file_outside_the_target") {
        return;
    }
    let h = host(
        "    writable-by: 65534\nrun:\n  resync-interval: 1s\n  debounce: 0s\n  retry-max: 1s\n",
    );
    chown(&h.path("/srv/oidc"), ATTACKER);
    let before = snapshot(h.root());
    let attacker = Attacker::start(
        RACE,
        &[
            &h.path("/srv/oidc"),
            &h.path("/etc/kubernetes/pki/sa.key"),
            &h.path("/etc/cron.d"),
        ],
    );
    let mut ok = 0;
    let mut errors = Vec::new();
    for _ in 0..30 {
        let out = agent(h.root(), &["publish", "--no-verify"]);
        match out.status.code() {
            Some(0) => ok += 1,
            // A publish that lost the race says so and exits non-zero; never a crash.
            Some(code) if code != 101 => errors.push(text(&out)),
            _ => panic!("publish crashed: {}", text(&out)),
        }
    }
    assert_untouched(&before, h.root(), "30 publishes under the link race");
    eprintln!(
        "30 publishes under the race: {ok} succeeded, {} refused",
        errors.len()
    );
    for e in &errors {
        assert!(!e.contains("panicked"), "{e}");
        eprintln!(
            "refused: {}",
            e.lines()
                .filter(|l| l.contains("cannot") || l.contains("error"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }

    let mut d = Daemon::start(h.root(), &["--no-restart"], &[]);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        d.assert_running();
        std::thread::sleep(Duration::from_millis(200));
    }
    let iterations = attacker.stop();
    assert_untouched(&before, h.root(), "10 s of the daemon under the link race");
    eprintln!(
        "attacker iterations (every 500): {}",
        iterations.split_whitespace().last().unwrap_or("0")
    );
    // Once the attacker stops, the daemon's resync heals the target.
    let healed = eventually(DEADLINE, || {
        let meta = std::fs::symlink_metadata(h.path(JWKS)).ok()?;
        let disc = std::fs::symlink_metadata(h.path(DISCOVERY)).ok()?;
        (meta.is_file() && meta.uid() == 0 && disc.is_file() && disc.uid() == 0).then_some(())
    });
    assert!(
        healed.is_some(),
        "the target was never healed:\n{}",
        d.log()
    );
    assert_published(&h);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn fifos_devices_wrong_modes_and_foreign_files_at_the_target_are_replaced_within_seconds() {
    if !as_root("fifos_devices_wrong_modes_and_foreign_files_at_the_target") {
        return;
    }
    type Setup = fn(&Host);
    let cases: [(&str, Setup, &str); 6] = [
        ("a FIFO at the JWKS", |h| mkfifo(&h.path(JWKS)), "FIFO"),
        (
            "a link to /dev/zero at the JWKS",
            |h| symlink(Path::new("/dev/zero"), &h.path(JWKS)),
            "symbolic link",
        ),
        (
            "a world-writable JWKS",
            |h| {
                std::fs::write(h.path(JWKS), br#"{"keys":[]}"#).expect("jwks");
                set_mode(&h.path(JWKS), 0o666);
            },
            "mode 0666",
        ),
        (
            "a JWKS owned by another user",
            |h| {
                std::fs::write(h.path(JWKS), br#"{"keys":[]}"#).expect("jwks");
                chown(&h.path(JWKS), ATTACKER);
            },
            "owned by uid 65534",
        ),
        (
            "a link to /etc/cron.d where .well-known belongs",
            |h| {
                std::fs::remove_dir_all(h.path("/srv/oidc/.well-known")).expect("rm");
                symlink(&h.path("/etc/cron.d"), &h.path("/srv/oidc/.well-known"));
            },
            "symbolic link",
        ),
        (
            "a world-writable folder inside the target",
            |h| set_mode(&h.path("/srv/oidc/openid/v1"), 0o777),
            "",
        ),
    ];
    for (what, setup, reported) in cases {
        let h = host("");
        // A first publish lays the target out; then the hostile entry replaces a part.
        let out = agent(h.root(), &["publish", "--no-verify"]);
        assert_eq!(out.status.code(), Some(0), "{what}: {}", text(&out));
        setup(&h);
        // doctor names the problem first, and changes nothing.
        let doctor = text(&agent(h.root(), &["doctor", "--offline"]));
        assert!(
            doctor.contains("publish.directory"),
            "{what}: doctor has no publish.directory check:\n{doctor}"
        );
        if !reported.is_empty() {
            assert!(
                doctor.contains(reported),
                "{what}: doctor does not say it:\n{doctor}"
            );
        }
        let before = snapshot(h.root());
        let started = Instant::now();
        let out = agent(h.root(), &["publish", "--no-verify"]);
        let said = text(&out);
        if reported.is_empty() {
            // Others can write in it: refused, naming the folder.
            assert_ne!(out.status.code(), Some(0), "{what}: {said}");
            assert!(said.contains("/srv/oidc/openid/v1"), "{what}: {said}");
            continue;
        }
        assert_eq!(out.status.code(), Some(0), "{what}: {said}");
        assert!(said.contains(reported), "{what}: not reported:\n{said}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what} took {:?}",
            started.elapsed()
        );
        assert_published(&h);
        assert_untouched(&before, h.root(), what);
        // Reported once: the next publish finds nothing to correct.
        let said = text(&agent(h.root(), &["publish", "--no-verify"]));
        assert!(!said.contains(reported), "{what}: reported again:\n{said}");
    }
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .expect("mkfifo");
}

fn symlink(to: &Path, at: &Path) {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(to, at).expect("symlink");
}

const KEY: &str = "/var/lib/rancher/k3s/server/tls/service.key";
const FRAGMENT: &str = "/etc/irsa-agent/config.d/10-extra.yaml";

#[test]
fn fifo_device_and_huge_key_and_config_files_fail_fast_naming_the_file_and_the_cause() {
    if !as_root("fifo_device_and_huge_key_and_config_files_fail_fast") {
        return;
    }
    type Setup = fn(&Host);
    let cases: [(&str, &[&str], Setup, &[&str]); 5] = [
        (
            "a FIFO as the key file",
            &["publish", "--no-verify"],
            |h| mkfifo(&h.path(KEY)),
            &["service.key", "FIFO"],
        ),
        (
            "/dev/zero as the key file",
            &["publish", "--no-verify"],
            |h| symlink(Path::new("/dev/zero"), &h.path(KEY)),
            &["service.key", "character device"],
        ),
        (
            "a FIFO as a config fragment",
            &["check-config"],
            |h| {
                std::fs::create_dir_all(h.path("/etc/irsa-agent/config.d")).expect("config.d");
                mkfifo(&h.path(FRAGMENT));
            },
            &["10-extra.yaml", "FIFO"],
        ),
        (
            "/dev/zero as a config fragment",
            &["check-config"],
            |h| {
                std::fs::create_dir_all(h.path("/etc/irsa-agent/config.d")).expect("config.d");
                symlink(Path::new("/dev/zero"), &h.path(FRAGMENT));
            },
            &["10-extra.yaml", "character device"],
        ),
        (
            "a 200 MB configuration",
            &["check-config"],
            |h| {
                let f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(h.path("/etc/irsa-agent/config.yaml"))
                    .expect("config");
                f.set_len(200 << 20).expect("grow");
            },
            &["config.yaml", "1 MiB limit"],
        ),
    ];
    for (what, args, setup, needles) in cases {
        let h = host("");
        setup(&h);
        let before = snapshot(h.root());
        let out = agent(h.root(), args);
        let said = text(&out);
        assert_ne!(out.status.code(), Some(0), "{what}: {said}");
        for needle in needles {
            assert!(said.contains(needle), "{what}: no {needle:?} in:\n{said}");
        }
        assert_untouched(&before, h.root(), what);
    }
}

#[test]
fn a_fifo_key_file_never_wedges_the_daemon() {
    if !as_root("a_fifo_key_file_never_wedges_the_daemon") {
        return;
    }
    let h = host("run:\n  resync-interval: 1s\n  retry-max: 1s\n");
    let mut d = Daemon::start(h.root(), &["--no-restart"], &[]);
    d.wait_ready();
    mkfifo(&h.path("/var/lib/rancher/k3s/server/tls/service.key"));
    let seen = eventually(DEADLINE, || d.log().contains("FIFO").then_some(()));
    assert!(
        seen.is_some(),
        "the daemon never reported the FIFO:\n{}",
        d.log()
    );
    // Still answering: SIGTERM ends it promptly.
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_drop_in_that_is_a_link_is_never_replaced_and_nothing_is_written() {
    // Config managed elsewhere (Ansible, Nix) and linked into place: apply refuses clearly
    // before writing anything, and the link and its file stay as they were.
    let h = host("");
    h.write(
        "/etc/managed/k3s-apiserver.yaml",
        "kube-apiserver-arg:\n  - \"audit-log-maxage=30\"\n",
    );
    std::fs::create_dir_all(h.path("/etc/rancher/k3s/config.yaml.d")).expect("config.yaml.d");
    let link = h.path("/etc/rancher/k3s/config.yaml.d/50-managed.yaml");
    symlink(&h.path("/etc/managed/k3s-apiserver.yaml"), &link);
    let before = snapshot(h.root());
    let out = agent(h.root(), &["apply", "--no-restart"]);
    let said = text(&out);
    assert_ne!(out.status.code(), Some(0), "{said}");
    for needle in ["50-managed.yaml", "symbolic link", "never replaces a link"] {
        assert!(said.contains(needle), "no {needle:?} in:\n{said}");
    }
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink()
    );
    let after = snapshot(h.root());
    let config_yaml = Path::new("etc/rancher/k3s/config.yaml");
    assert_eq!(
        std::fs::read_to_string(h.path("/etc/rancher/k3s/config.yaml")).expect("config"),
        "# k3s\n",
        "nothing may be written when one file cannot be"
    );
    assert_eq!(
        after
            .iter()
            .filter(|(k, _)| k.as_path() != config_yaml)
            .collect::<Vec<_>>(),
        before
            .iter()
            .filter(|(k, _)| k.as_path() != config_yaml)
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_link_above_the_target_is_followed_only_where_only_root_writes() {
    if !as_root("a_link_above_the_target_is_followed_only_where_only_root_writes") {
        return;
    }
    // /srv on another disk, linked by root: followed, documents written on the real folder.
    let h = host("");
    std::fs::remove_dir_all(h.path("/srv")).expect("rm srv");
    std::fs::create_dir_all(h.path("/data/srv")).expect("data");
    // Relative, so the test can look through it too; the agent resolves either form under the
    // host root.
    symlink(Path::new("data/srv"), &h.path("/srv"));
    let out = agent(h.root(), &["publish", "--no-verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(h.path("/data/srv/oidc/openid/v1/jwks").is_file());
    assert_published(&h);

    // The target a link made by a user writable-by allows, aimed at /etc/cron.d: refused.
    let h = host("    writable-by: 65534\n");
    std::fs::remove_dir_all(h.path("/srv/oidc")).expect("rm target");
    chown(&h.path("/srv"), ATTACKER);
    let before = snapshot(h.root());
    let attacker = Attacker::start(
        "import os, sys\nos.symlink('/etc/cron.d', os.path.join(sys.argv[1], 'oidc'))\nprint('linked', flush=True)\n",
        &[&h.path("/srv")],
    );
    let _ = eventually(DEADLINE, || {
        std::fs::symlink_metadata(h.path("/srv/oidc"))
            .ok()
            .map(|_| ())
    });
    drop(attacker);
    let said = text(&agent(h.root(), &["publish", "--no-verify"]));
    assert!(said.contains("symbolic link (owner uid 65534)"), "{said}");
    assert_untouched(
        &before,
        h.root(),
        "a link made by another user above the target",
    );
}
