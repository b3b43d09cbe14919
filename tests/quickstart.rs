//! docs/quickstart.md is a sequence of commands a person types: every `irsa-agent` command in it
//! must exist with the flags it uses (checked against the command's own `--help`), and the
//! README, the demo and the packaged configuration must point at it.

use std::collections::BTreeSet;

const QUICKSTART: &str = include_str!("../docs/quickstart.md");

/// (subcommand, flags) of every `irsa-agent ...` invocation in the text: in code blocks and in
/// `inline code`.
fn invocations(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut candidates: Vec<String> = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            candidates.push(line.to_string());
        } else {
            candidates.extend(line.split('`').skip(1).step_by(2).map(String::from));
        }
    }
    for c in candidates {
        let Some(i) = c.find("irsa-agent ") else {
            continue;
        };
        let words: Vec<&str> = c[i + "irsa-agent ".len()..]
            .split(|ch: char| ch.is_whitespace() || ch == '`')
            .take_while(|w| !matches!(*w, "#" | ">" | "|" | "&&" | ";"))
            .filter(|w| !w.is_empty())
            .collect();
        let Some(sub) = words.iter().find(|w| !w.starts_with('-')) else {
            continue;
        };
        if sub.starts_with('<') || *sub == "run" && words.len() == 1 {
            continue;
        }
        let flags = words
            .iter()
            .filter(|w| w.starts_with("--"))
            .map(|w| w.split('=').next().unwrap_or(w).to_string())
            .collect();
        out.push((sub.to_string(), flags));
    }
    out
}

#[test]
fn every_command_in_the_quickstart_exists_with_its_flags() {
    let found = invocations(QUICKSTART);
    let subs: BTreeSet<&str> = found.iter().map(|(s, _)| s.as_str()).collect();
    // The journey's checks are all there.
    for needed in [
        "status",
        "check-config",
        "publish",
        "trust-policy",
        "apply",
        "doctor",
        "verify-token",
    ] {
        assert!(
            subs.contains(needed),
            "the quickstart lacks `irsa-agent {needed}`: {subs:?}"
        );
    }
    for (sub, flags) in &found {
        let out = assert_cmd::Command::cargo_bin("irsa-agent")
            .expect("binary")
            .args([sub.as_str(), "--help"])
            .output()
            .expect("runs");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "`irsa-agent {sub}` is not a command: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for flag in flags {
            assert!(
                help.contains(&format!("{flag} "))
                    || help.contains(&format!("{flag},"))
                    || help.contains(&format!("{flag}\n")),
                "`irsa-agent {sub} {flag}` (docs/quickstart.md) is not in `irsa-agent {sub} --help`"
            );
        }
    }
}

#[test]
fn the_readme_the_demo_and_the_conffile_point_at_the_quickstart() {
    let readme = include_str!("../README.md");
    assert!(readme.contains("(docs/quickstart.md)"), "README links it");
    let conffile = include_str!("../packaging/config.yaml");
    assert!(conffile.contains("/usr/share/doc/irsa-agent/quickstart.md"));
    let demo = include_str!("../src/cli/demo.rs");
    assert!(demo.contains("docs/quickstart.md"));
}

#[test]
fn the_extractor_sees_flags_and_stops_at_shell_syntax() {
    let text = "```sh\nirsa-agent apply --check --diff     # what would change\nX=1 irsa-agent publish | tee\n```\nthen `irsa-agent trust-policy -n a --format aws`.\n";
    assert_eq!(
        invocations(text),
        vec![
            (
                "apply".to_string(),
                vec!["--check".to_string(), "--diff".to_string()]
            ),
            ("publish".to_string(), vec![]),
            ("trust-policy".to_string(), vec!["--format".to_string()]),
        ]
    );
}
