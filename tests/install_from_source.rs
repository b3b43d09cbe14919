//! `tools/install-from-source.sh` (README "Install", quickstart step 1) installs into a
//! temporary root (`--destdir`) the binary cargo built for these tests: the files the .deb
//! ships (the one list in Cargo.toml), with their modes; a second run keeps an edited
//! conffile and changes nothing else; `--uninstall` removes the program and keeps the
//! configuration and state, `--purge` deletes those too.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install-from-source.sh")
}

fn tools_missing() -> Option<String> {
    for tool in ["bash", "gzip", "install", "awk", "cmp", "stat"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn install(root: &Path, extra: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg(script())
        .arg("--destdir")
        .arg(root)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_irsa-agent"))
        .args(extra)
        .output()
        .expect("run install-from-source.sh");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every file under `root` (host paths), sorted.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(format!(
                    "/{}",
                    path.strip_prefix(root).expect("under root").display()
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// The `[package.metadata.deb] assets` of Cargo.toml: (source, destination, mode).
fn deb_assets() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("Cargo.toml");
    let list = text
        .split("[package.metadata.deb]")
        .nth(1)
        .and_then(|t| t.split("assets = [").nth(1))
        .and_then(|t| t.split("\n]").next())
        .expect("assets list");
    list.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .map(|l| {
            let parts: Vec<String> = l
                .split('"')
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, s)| s.to_string())
                .collect();
            assert_eq!(parts.len(), 3, "{l}");
            (parts[0].clone(), parts[1].clone(), parts[2].clone())
        })
        .collect()
}

#[test]
fn installs_the_debs_files_keeps_the_conffile_and_uninstalls() {
    if let Some(why) = tools_missing() {
        println!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let started = std::time::Instant::now();
    install(root, &[]);
    eprintln!("install-from-source.sh --destdir: {:?}", started.elapsed());
    let p = |host: &str| root.join(host.trim_start_matches('/'));

    // The binary runs, the unit starts it from where it is, the conffile is the example.
    assert_eq!(mode(&p("/usr/bin/irsa-agent")), 0o755);
    let version = Command::new(p("/usr/bin/irsa-agent"))
        .arg("--version")
        .output()
        .expect("installed binary");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("irsa-agent "));
    let unit = std::fs::read_to_string(p("/usr/lib/systemd/system/irsa-agent.service"))
        .expect("unit installed");
    assert!(unit.contains("ExecStart=/usr/bin/irsa-agent run"), "{unit}");
    assert_eq!(
        std::fs::read(p("/etc/irsa-agent/config.yaml")).expect("conffile"),
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/config.yaml"))
            .expect("example")
    );
    assert_eq!(mode(&p("/etc/irsa-agent/config.yaml")), 0o644);
    assert_eq!(mode(&p("/var/lib/irsa-agent")), 0o700);
    for doc in ["README.md", "quickstart.md", "publishing.md"] {
        assert_eq!(mode(&p(&format!("/usr/share/doc/irsa-agent/{doc}"))), 0o644);
    }
    // The man page is what `man irsa-agent` opens: gzip'd roff.
    let man = std::fs::read(p("/usr/share/man/man1/irsa-agent.1.gz")).expect("man page");
    assert_eq!(&man[..2], &[0x1f, 0x8b]);
    assert!(p("/usr/share/bash-completion/completions/irsa-agent").is_file());
    assert!(p("/usr/share/zsh/vendor-completions/_irsa-agent").is_file());
    assert!(p("/usr/share/fish/vendor_completions.d/irsa-agent.fish").is_file());

    // Every asset of the .deb is there with its mode (the lintian override is Debian's own).
    for (source, dest, want) in deb_assets() {
        if dest.starts_with("usr/share/lintian") {
            continue;
        }
        let want = u32::from_str_radix(&want, 8).expect("octal mode");
        let installed: Vec<PathBuf> = if dest.ends_with('/') {
            let name = source.rsplit('/').next().unwrap_or("");
            let dir = p(&dest);
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .flatten()
                .map(|e| e.path())
                .filter(|f| {
                    let file = f.file_name().map(|n| n.to_string_lossy().to_string());
                    let file = file.unwrap_or_default();
                    match name.split_once('*') {
                        Some((pre, post)) => file.starts_with(pre) && file.ends_with(post),
                        None => file == name,
                    }
                })
                .collect()
        } else {
            vec![p(&dest)]
        };
        assert!(
            !installed.is_empty(),
            "{source} -> {dest}: nothing installed"
        );
        for f in installed {
            assert_eq!(mode(&f), want, "{}", f.display());
        }
    }
    // The manifest lists every installed file outside /etc (what --uninstall removes).
    let manifest =
        std::fs::read_to_string(p("/usr/lib/irsa-agent/install-manifest")).expect("manifest");
    let listed: Vec<&str> = manifest.lines().collect();
    let installed = files(root);
    for f in &installed {
        if !f.starts_with("/etc/") {
            assert!(listed.contains(&f.as_str()), "{f} not in the manifest");
        }
    }

    // A second run: the edited conffile stays, nothing else changes.
    let edited = "issuer: https://oidc.example.com/homelab\n";
    std::fs::write(p("/etc/irsa-agent/config.yaml"), edited).expect("edit");
    let before = files(root);
    let out = install(root, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("keeping your /etc/irsa-agent/config.yaml"),
        "{stderr}"
    );
    assert!(
        stderr.contains("already installed: nothing to do"),
        "{stderr}"
    );
    assert!(!stderr.contains("    + install"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(p("/etc/irsa-agent/config.yaml")).expect("conffile"),
        edited
    );
    assert_eq!(files(root), before);

    // Uninstall: the program goes, configuration and state stay; --purge takes them too.
    std::fs::write(p("/var/lib/irsa-agent/state.json"), "{}").expect("state");
    install(root, &["--uninstall"]);
    let left = files(root);
    assert_eq!(
        left,
        [
            "/etc/irsa-agent/config.yaml",
            "/var/lib/irsa-agent/state.json"
        ],
        "{left:#?}"
    );
    install(root, &["--uninstall", "--purge"]);
    assert!(files(root).is_empty(), "{:#?}", files(root));
}

/// The README's install section and the quickstart's step 1 name this script, and no
/// placeholder URL a reader could not fill in.
#[test]
fn the_install_docs_name_the_script_and_no_placeholder() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let install = readme
        .split("\n## Install\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("## Install");
    let quickstart = std::fs::read_to_string(root.join("docs/quickstart.md")).expect("quickstart");
    let step1 = quickstart
        .split("\n## 1. ")
        .nth(1)
        .and_then(|s| s.split("\n## 2. ").next())
        .expect("step 1");
    for (name, text) in [("README ## Install", install), ("quickstart step 1", step1)] {
        assert!(text.contains("tools/install-from-source.sh"), "{name}");
        assert!(!text.contains("<release-url>"), "{name}");
    }
}

#[test]
fn the_help_answers_what_it_installs_and_bad_usage_exits_64() {
    if let Some(why) = tools_missing() {
        println!("SKIPPED: {why}");
        return;
    }
    let out = Command::new("bash")
        .arg(script())
        .arg("--help")
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for words in [
        "--destdir",
        "--uninstall",
        "/etc/irsa-agent/config.yaml ONLY if",
    ] {
        assert!(help.contains(words), "{words}: {help}");
    }
    let out = Command::new("bash")
        .arg(script())
        .arg("--purge")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
}
