//! The checks that need only this host's files: the agent's configuration, the apiserver's
//! effective service-account flags, its key files and their permissions.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use super::words::{self, list, plural};
use super::{Check, Status};
use crate::apiserver::restart::{self, Restart};
use crate::apiserver::{self, Observed, Source, flags};
use crate::config::{self, ConfigError, Distribution, Settings};
use crate::host::HostRoot;
use crate::keys::{self, KeyFileError, PublicKey, Refusal, Skipped};
use crate::state::{IssuerState, State};

/// AWS accepts at most this many RSA keys and this many EC keys in one JWKS.
pub const AWS_MAX_KEYS_PER_TYPE: usize = 100;

/// One key file the apiserver reads, as doctor found it.
#[derive(Debug)]
pub struct KeyFile {
    /// Host path.
    pub path: PathBuf,
    /// Named by `--service-account-key-file`.
    pub verification: Option<Result<keys::VerificationKeys, KeyFileError>>,
    /// Named by `--service-account-signing-key-file`.
    pub signing: Option<Result<PublicKey, KeyFileError>>,
    /// Permission bits, or why they could not be read.
    pub mode: Result<u32, String>,
    /// Holds at least one private key block.
    pub private: bool,
}

/// Everything doctor reads from the host's files.
#[derive(Debug)]
pub struct Local {
    pub root: HostRoot,
    pub config: Result<config::Loaded, ConfigError>,
    pub state: Result<State, String>,
    pub observed: Result<Observed, String>,
    pub restart: Option<Restart>,
    pub files: Vec<KeyFile>,
    /// Each `directory` target (as described) and what is wrong with its folders and files:
    /// `Err` when publishing there is refused (a folder others can write), else the entries a
    /// publish would correct.
    pub targets: Vec<(String, Result<Vec<String>, String>)>,
    /// This server's node name: the daemon's (recorded in the state file), else the host name
    /// ([`crate::daemon::status::node_name`]).
    pub node: String,
}

impl Local {
    pub fn settings(&self) -> Option<&Settings> {
        self.config.as_ref().ok().map(|l| &l.settings)
    }

    /// The verification keys in flag order, when every key file could be read (`None` when
    /// some could not: comparisons with other key sets would be wrong).
    pub fn keys(&self) -> Option<Vec<PublicKey>> {
        let observed = self.observed.as_ref().ok()?;
        if observed.flags.signing_endpoint.is_some() {
            return None;
        }
        let mut out = Vec::new();
        for file in &self.files {
            match &file.verification {
                Some(Ok(parsed)) => out.extend(parsed.keys.iter().cloned()),
                Some(Err(_)) => return None,
                None => {}
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// Why [`Local::keys`] is `None`, for skips.
    pub fn keys_unknown(&self) -> String {
        match &self.observed {
            Ok(o) if o.flags.signing_endpoint.is_some() => format!(
                "the keys are held by the external signer at {} (--service-account-signing-endpoint)",
                o.flags.signing_endpoint.as_deref().unwrap_or("")
            ),
            Ok(_) => "the key files cannot all be read (see apiserver.key-files)".to_string(),
            Err(_) => "the apiserver configuration could not be read (see apiserver.distribution)"
                .to_string(),
        }
    }

    /// The kids of [`Local::keys`], each once, in order.
    pub fn kids(&self) -> Option<Vec<String>> {
        Some(
            keys::dedup(&self.keys()?)
                .iter()
                .map(PublicKey::kid)
                .collect(),
        )
    }

    /// The signing key's public half.
    pub fn signing(&self) -> Option<&PublicKey> {
        self.files
            .iter()
            .find_map(|f| f.signing.as_ref().and_then(|r| r.as_ref().ok()))
    }

    /// The command that makes the apiserver re-read its files.
    pub fn restart_hint(&self) -> String {
        match &self.restart {
            Some(Restart::Unit(unit)) => format!("systemctl restart {unit}"),
            Some(Restart::KubeletStaticPod) => "restart the kube-apiserver static pod: mv /etc/kubernetes/manifests/kube-apiserver.yaml /etc/kubernetes/ && sleep 20 && mv /etc/kubernetes/kube-apiserver.yaml /etc/kubernetes/manifests/".to_string(),
            None => "restart the apiserver".to_string(),
        }
    }

    /// A message with paths under a test root shown as host paths.
    pub fn host_text(&self, text: &str) -> String {
        host_text(&self.root, text)
    }
}

fn host_text(root: &HostRoot, text: &str) -> String {
    if root.is_real() {
        return text.to_string();
    }
    let prefix = root.root().display().to_string();
    text.replace(prefix.trim_end_matches('/'), "")
}

fn holds_private_key(data: &[u8]) -> bool {
    keys::pem::blocks(data)
        .iter()
        .any(|b| b.label.ends_with(b"PRIVATE KEY"))
}

/// Reads the configuration, the state file, the apiserver's flags and every key file.
pub fn gather(root: &HostRoot, config_file: Option<&Path>) -> Local {
    let config = config::load(root, config_file);
    let distribution = config
        .as_ref()
        .map_or(Distribution::Auto, |l| l.settings.distribution);
    let state = State::load(root).map_err(|e| e.to_string());
    let observed =
        apiserver::observe(root, distribution).map_err(|e| host_text(root, &e.to_string()));
    let restart = observed
        .as_ref()
        .ok()
        .map(|o| restart::restart_for(root, o.distribution, None));
    let mut files: Vec<KeyFile> = Vec::new();
    if let Ok(observed) = &observed {
        let f = &observed.flags;
        let named = f
            .key_files
            .iter()
            .map(|p| (p, true))
            .chain(f.signing_key_file.iter().map(|p| (p, false)));
        for (host, verification) in named {
            let path = PathBuf::from(host);
            let real = root.path(&path);
            let index = match files.iter().position(|k| k.path == path) {
                Some(i) => i,
                None => {
                    let mode = std::fs::metadata(&real)
                        .map(|m| m.permissions().mode() & 0o7777)
                        .map_err(|e| e.to_string());
                    let private = crate::fs::read(&real)
                        .map(|d| holds_private_key(&d))
                        .unwrap_or(false);
                    files.push(KeyFile {
                        path: path.clone(),
                        verification: None,
                        signing: None,
                        mode,
                        private,
                    });
                    files.len() - 1
                }
            };
            if verification {
                if files[index].verification.is_none() {
                    files[index].verification = Some(keys::load_verification_file(&real));
                }
            } else {
                files[index].signing = Some(keys::load_signing_file(&real).map(|k| k.public));
            }
        }
    }
    let targets = match &config {
        Ok(loaded) => crate::publish::directory::inspect_all(root, &loaded.settings),
        Err(_) => Vec::new(),
    };
    let node = crate::daemon::status::node_name(None, state.as_ref().ok());
    Local {
        root: root.clone(),
        node,
        config,
        state,
        observed,
        restart,
        files,
        targets,
    }
}

/// `publish.directory`: the folders of a directory target are root's alone (or the
/// `writable-by:` users'), and the published files are root's, 0644, regular files.
fn directory_checks(local: &Local) -> Vec<Check> {
    let id = "publish.directory";
    local
        .targets
        .iter()
        .map(|(target, found)| {
            match found {
                Err(refusal) => Check::fail(id, refusal.clone()),
                Ok(problems) if problems.is_empty() => Check::pass(
                    id,
                    "no other user can write the folders; the documents are root's, mode 0644",
                ),
                Ok(problems) => Check::warn(id, problems.join("; "))
                    .fix("irsa-agent publish (or the running daemon) replaces them with root-owned 0644 files"),
            }
            .subject(target.clone())
        })
        .collect()
}

/// Every check on the files.
pub fn evaluate(local: &Local) -> Vec<Check> {
    let mut out = vec![config_check(local)];
    out.extend(directory_checks(local));
    let observed = match &local.observed {
        Ok(o) => o,
        Err(e) => {
            out.push(
                Check::fail("apiserver.distribution", e.clone()).fix(
                    "run irsa-agent on a control-plane node, or set `distribution: k3s|rke2|kubeadm` in /etc/irsa-agent/config.yaml",
                ),
            );
            let reason =
                "the apiserver configuration could not be read (see apiserver.distribution)";
            for id in [
                "apiserver.issuers",
                "apiserver.old-issuers",
                "apiserver.api-audiences",
                "apiserver.jwks-uri",
                "apiserver.key-files",
                "apiserver.signing-key",
            ] {
                out.push(Check::skip(id, reason));
            }
            return out;
        }
    };
    out.push(distribution_check(observed));
    let settings = local.settings();
    let no_config = "no valid configuration: the configured issuer is unknown (see config.valid)";
    match settings {
        Some(s) => out.push(issuers_check(observed, s)),
        None => out.push(Check::skip("apiserver.issuers", no_config)),
    }
    out.push(old_issuers_check(local, observed));
    out.push(audiences_check(local, observed));
    match settings {
        Some(s) => out.push(jwks_uri_check(observed, s)),
        None => out.push(Check::skip("apiserver.jwks-uri", no_config)),
    }
    if let Some(endpoint) = &observed.flags.signing_endpoint {
        let reason = format!(
            "tokens are signed by the external signer at {endpoint} (--service-account-signing-endpoint): its keys are not in files"
        );
        out.push(Check::skip("apiserver.key-files", reason.clone()));
        out.push(Check::skip("apiserver.signing-key", reason));
        return out;
    }
    out.extend(key_file_checks(local, observed));
    out.push(signing_key_check(local, observed));
    out.extend(permission_checks(local));
    out.push(key_count_check(local));
    out
}

fn config_check(local: &Local) -> Check {
    let id = "config.valid";
    match &local.config {
        Ok(loaded) => {
            let s = &loaded.settings;
            let sources: Vec<String> = s
                .sources
                .iter()
                .map(|p| local.root.host_view(p).display().to_string())
                .collect();
            let finding = format!(
                "issuer {}, jwks-uri {} (from {})",
                s.issuer,
                s.jwks_uri,
                sources.join(", ")
            );
            if loaded.warnings.is_empty() {
                Check::pass(id, finding)
            } else {
                Check::warn(
                    id,
                    format!("{finding}, with {}", plural(loaded.warnings.len(), "warning")),
                )
                .details(
                    loaded
                        .warnings
                        .iter()
                        .map(|w| local.host_text(&w.to_string()))
                        .collect(),
                )
                .fix("see the warnings; `irsa-agent check-config` prints them with the settings in effect")
            }
        }
        Err(ConfigError::Invalid { problems }) => Check::fail(
            id,
            format!("invalid configuration ({})", plural(problems.len(), "problem")),
        )
        .details(
            problems
                .iter()
                .map(|p| local.host_text(&p.to_string()))
                .collect(),
        )
        .fix("correct each value named above (file, key, value); `irsa-agent check-config` re-checks"),
        Err(e @ ConfigError::NotFound { .. }) => Check::fail(id, local.host_text(&e.to_string()))
            .fix("echo 'issuer: https://oidc.example.com/my-cluster' > /etc/irsa-agent/config.yaml"),
        Err(e) => Check::fail(id, local.host_text(&e.to_string())),
    }
}

fn distribution_check(observed: &Observed) -> Check {
    let id = "apiserver.distribution";
    match &observed.source {
        Source::Rancher(r) => {
            let files: Vec<String> = r
                .files
                .iter()
                .filter(|f| f.text.is_some())
                .map(|f| f.path.display().to_string())
                .collect();
            Check::pass(
                id,
                format!(
                    "{} (configuration: {})",
                    observed.distribution,
                    if files.is_empty() {
                        "defaults only, no config.yaml".to_string()
                    } else {
                        files.join(", ")
                    }
                ),
            )
        }
        Source::Kubeadm(k) => Check::pass(
            id,
            format!(
                "kubeadm (static pod manifest {}{})",
                k.path.display(),
                k.version
                    .map(|(a, b, c)| format!(", kube-apiserver v{a}.{b}.{c}"))
                    .unwrap_or_default()
            ),
        ),
    }
}

/// Where a line for `flag` goes, in words, for fixes.
fn flag_location(observed: &Observed, flag: &str) -> String {
    observed.source.flag_location(flag)
}

/// The list item that sets `flag=value` in the distribution's syntax.
fn flag_item(observed: &Observed, flag: &str, value: &str) -> String {
    observed.source.flag_item(flag, value)
}

fn issuers_check(observed: &Observed, settings: &Settings) -> Check {
    let id = "apiserver.issuers";
    let issuers = &observed.flags.issuers;
    let configured = &settings.issuer;
    let apply = "run `irsa-agent apply --check --diff` to see the change, then `irsa-agent apply`";
    if issuers.is_empty() {
        return Check::fail(
            id,
            "no --service-account-issuer is set: kube-apiserver cannot issue service-account tokens",
        )
        .fix(apply);
    }
    let first = &issuers[0];
    if first == configured {
        let others: Vec<String> = issuers[1..].to_vec();
        return Check::pass(
            id,
            format!(
                "{configured} signs (first --service-account-issuer){}",
                if others.is_empty() {
                    String::new()
                } else {
                    format!("; also accepted: {}", others.join(", "))
                }
            ),
        );
    }
    if issuers.contains(configured) {
        return Check::warn(
            id,
            format!(
                "{configured} is accepted but does not sign: the first issuer is {first}, so new tokens still carry iss {first:?} (phase one of `apply --accept-only`)"
            ),
        )
        .fix("once every control-plane node accepts it, run `irsa-agent apply` (without --accept-only) on each, one at a time");
    }
    let near = issuers
        .iter()
        .find_map(|i| words::near_miss(i, configured).map(|why| (i, why)));
    let finding = match near {
        Some((i, why)) => format!(
            "the apiserver's issuer {i:?} is not the configured {configured:?}: it {why}; tokens carry {i:?} and relying parties compare byte for byte"
        ),
        None => format!(
            "the apiserver does not accept the configured issuer {configured}; it signs as {first} (issuers: {})",
            issuers.join(", ")
        ),
    };
    Check::fail(id, finding).fix(apply)
}

/// Is `issuer` the distribution's built-in default?
fn is_default_issuer(observed: &Observed, issuer: &str) -> bool {
    match &observed.source {
        Source::Rancher(_) => issuer == observed.default_issuer(),
        Source::Kubeadm(_) => issuer.starts_with("https://kubernetes.default.svc."),
    }
}

fn old_issuers_check(local: &Local, observed: &Observed) -> Check {
    let id = "apiserver.old-issuers";
    let issuers = &observed.flags.issuers;
    let state = local.state.as_ref().ok().and_then(|s| s.issuer.clone());
    let retired: Vec<String> = state
        .as_ref()
        .map(|s| s.retired.clone())
        .unwrap_or_default();
    let mut expected: Vec<String> = Vec::new();
    // The distribution's default issuer signed every token before anyone changed it.
    let default_kept = issuers.iter().any(|i| is_default_issuer(observed, i));
    let default_retired = retired.iter().any(|i| is_default_issuer(observed, i));
    if !default_kept && !default_retired {
        expected.push(observed.default_issuer());
    }
    if let Some(s) = &state {
        for p in &s.previous {
            if !retired.contains(p) && !expected.contains(p) {
                expected.push(p.clone());
            }
        }
    }
    let missing: Vec<String> = expected
        .into_iter()
        .filter(|i| !issuers.contains(i))
        .collect();
    if missing.is_empty() {
        let old: Vec<String> = issuers.iter().skip(1).cloned().collect();
        return Check::pass(
            id,
            if old.is_empty() {
                "only one issuer, and it is the one tokens were issued with so far".to_string()
            } else {
                format!(
                    "still accepted: {}{}",
                    old.join(", "),
                    retirement(local, observed, state.as_ref())
                )
            },
        );
    }
    let repair = apply_repair(local, observed);
    Check::fail(
        id,
        format!(
            "the issuer was changed without keeping the old one: {} {} no longer accepted, so every token issued with {} is rejected (in-cluster kube-api-access tokens live up to a year with --service-account-extend-token-expiration)",
            missing.join(", "),
            if missing.len() == 1 { "is" } else { "are" },
            if missing.len() == 1 { "it" } else { "them" },
        ),
    )
    .fix(format!(
        "{}; `irsa-agent finalize` retires {} safely later",
        repair.steps(observed),
        missing.join(", ")
    ))
}

/// When the older issuers this server accepts may go, by `finalize`'s rule on this server
/// ([`apiserver::apply::finalize_decision`]); empty when it does not apply (no switch seen).
fn retirement(local: &Local, observed: &Observed, state: Option<&IssuerState>) -> String {
    use apiserver::apply::{self as executor, FinalizeDecision};
    let Some(settings) = local.settings() else {
        return String::new();
    };
    let previous = state.map(|s| s.previous.clone()).unwrap_or_default();
    let audiences = executor::FinalizeAudiences::of(observed, &previous);
    let lifetime = executor::longest_token_lifetime(settings.rotation.token_lifetime, observed);
    let now = crate::state::unix_now();
    match executor::finalize_decision(
        state,
        &settings.issuer,
        &observed.flags.issuers,
        &audiences.external,
        now,
        lifetime,
    ) {
        FinalizeDecision::TooEarly {
            switched_at,
            remaining,
            ..
        } => format!(
            "; tokens minted with it may be valid until {} (the longest token lifetime, {}, after this apiserver switched at {}): it is retired after that, by the daemon (on several servers, the lifetime after the last one switched) or `irsa-agent finalize`",
            crate::state::rfc3339(now + remaining.as_secs()),
            crate::config::format_duration(lifetime),
            crate::state::rfc3339(switched_at)
        ),
        FinalizeDecision::Ready { .. } => format!(
            "; no token minted with it can be valid any more here (this apiserver switched more than {} ago): the daemon retires it (on several servers once every server switched that long ago, `status` says when), or `irsa-agent finalize`",
            crate::config::format_duration(lifetime)
        ),
        _ => String::new(),
    }
}

/// What `irsa-agent apply` would make of the managed flags now: the one path doctor's fixes
/// name (the same pure rule apply uses, with the same target).
struct Repair {
    desired: apiserver::plan::Desired,
    before_audiences: Vec<String>,
}

impl Repair {
    /// "run apply ...: it sets ..." in the distribution's syntax, naming only what changes.
    fn steps(&self, observed: &Observed) -> String {
        let f = &observed.flags;
        let d = &self.desired;
        let mut items: Vec<String> = Vec::new();
        if f.issuers != d.issuers {
            items.extend(
                d.issuers
                    .iter()
                    .map(|i| flag_item(observed, flags::ISSUER, i)),
            );
        }
        if f.api_audiences.as_ref() != Some(&d.api_audiences) {
            items.push(flag_item(
                observed,
                flags::AUDIENCES,
                &d.api_audiences.join(","),
            ));
        }
        let items: Vec<String> = items
            .iter()
            .map(|i| format!("`{}`", i.trim_start_matches("- ")))
            .collect();
        let mut why: Vec<String> = Vec::new();
        let back: Vec<String> = d
            .issuers
            .iter()
            .skip(1)
            .filter(|i| !f.issuers.contains(i))
            .cloned()
            .collect();
        if !back.is_empty() {
            why.push(format!("{} accepted again", back.join(", ")));
        }
        let restored: Vec<String> = d
            .api_audiences
            .iter()
            .filter(|a| !self.before_audiences.contains(a))
            .cloned()
            .collect();
        if !restored.is_empty() {
            why.push(format!(
                "the in-cluster audiences {} back, and {} kept, because the tokens pods hold now carry {}",
                restored.join(","),
                self.before_audiences.join(","),
                if self.before_audiences.len() == 1 { "it" } else { "them" }
            ));
        }
        format!(
            "run `irsa-agent apply --check --diff`, then `irsa-agent apply`: it keeps {} signing, sets {} in {} ({}; nothing accepted now stops being accepted) and restarts the apiserver",
            d.issuers.first().map(String::as_str).unwrap_or(""),
            items.join(" "),
            flag_location(observed, flags::ISSUER),
            why.join("; ")
        )
    }
}

fn apply_repair(local: &Local, observed: &Observed) -> Repair {
    let st = local.state.as_ref().ok().and_then(|s| s.issuer.clone());
    let remembered = st.as_ref().map(|s| s.previous.clone()).unwrap_or_default();
    let f = &observed.flags;
    let (issuer, jwks_uri) = match local.settings() {
        Some(s) => (s.issuer.clone(), s.jwks_uri.clone()),
        None => (
            f.issuers.first().cloned().unwrap_or_default(),
            f.jwks_uri().unwrap_or_default().to_string(),
        ),
    };
    let target = apiserver::plan::Target {
        issuer,
        jwks_uri,
        retired: st.map(|s| s.retired).unwrap_or_default(),
        remembered: remembered.clone(),
        retire: Vec::new(),
        accept_only: false,
        drop_external_audiences: false,
    };
    let origin = apiserver::plan::origin(observed, &remembered);
    Repair {
        desired: apiserver::plan::desired(f, &target, &origin),
        before_audiences: f.effective_audiences(),
    }
}

/// Audiences that belong to cloud token exchanges, never to the Kubernetes API.
fn is_external_audience(aud: &str) -> bool {
    aud == "sts.amazonaws.com"
        || aud.ends_with(".amazonaws.com")
        || aud == "api://AzureADTokenExchange"
        || aud.contains("iam.googleapis.com/")
        || words::near_miss(aud, "sts.amazonaws.com").is_some()
}

fn audiences_check(local: &Local, observed: &Observed) -> Check {
    let id = "apiserver.api-audiences";
    let f = &observed.flags;
    let effective = f.effective_audiences();
    let st = local.state.as_ref().ok().and_then(|s| s.issuer.clone());
    let origin = apiserver::plan::origin(observed, &st.map(|s| s.previous).unwrap_or_default());
    let original = origin.audiences;
    let lost: Vec<String> = original
        .iter()
        .filter(|a| !effective.contains(a))
        .cloned()
        .collect();
    let repair = apply_repair(local, observed);
    let external: Vec<String> = effective
        .iter()
        .filter(|a| is_external_audience(a))
        .cloned()
        .collect();
    if !external.is_empty() {
        let ext = external.join(", ");
        let finding = format!(
            "--api-audiences includes {ext}: any pod can request a token for that audience, and the Kubernetes API then accepts the token meant for AWS/Azure/GCP as well"
        );
        let finalize = |since: &str| {
            format!(
                "`irsa-agent finalize` removes {ext} the longest token lifetime (rotation.token-lifetime, 24h by default, or --service-account-max-token-expiration) after {since}, once `kubectl get --raw /metrics | grep serviceaccount_stale_tokens_total` stops rising"
            )
        };
        if lost.is_empty() {
            let switched = local
                .state
                .as_ref()
                .ok()
                .and_then(|s| s.issuer.as_ref())
                .filter(|s| f.issuers.first() == Some(&s.issuer))
                .and_then(|s| s.switched_at);
            return Check::fail(id, finding).fix(match switched {
                Some(at) => format!(
                    "{} (`irsa-agent finalize --check` says whether it can now)",
                    finalize(&format!(
                        "irsa-agent's last change took effect ({})",
                        crate::state::rfc3339(at)
                    ))
                ),
                None => format!(
                    "run `irsa-agent apply` (it records when its change takes effect), then {}",
                    finalize("that")
                ),
            });
        }
        return Check::fail(
            id,
            format!(
                "{finding}; and without the in-cluster audiences {}, default tokens (kube-api-access) are minted for {} alone, so removing {ext} first would reject the tokens pods hold now",
                list(&lost),
                list(&effective)
            ),
        )
        .fix(format!(
            "keep {ext} for now: 1. {}; 2. {}",
            repair.steps(observed),
            finalize("that")
        ));
    }
    let pin = flag_item(observed, flags::AUDIENCES, &original.join(","));
    match (&f.api_audiences, lost.is_empty()) {
        (None, false) => Check::fail(
            id,
            format!(
                "--api-audiences is not set, so the audiences follow the issuers: they are now {} instead of {}; tokens requested without an audience get aud {:?}, and clients that check aud (Vault's Kubernetes auth and the like) and old tokens with aud {} are rejected (kubernetes#107031)",
                list(&effective),
                list(&original),
                effective.first().cloned().unwrap_or_default(),
                list(&lost)
            ),
        )
        .fix(repair.steps(observed)),
        (None, true) => Check::warn(
            id,
            format!(
                "--api-audiences is not set: the audiences are the issuers ({}); changing the issuer would change them too",
                list(&effective)
            ),
        )
        .fix(format!(
            "`irsa-agent apply` pins it before it changes the issuer; by hand: add `{pin}` to {}",
            flag_location(observed, flags::AUDIENCES)
        )),
        (Some(pinned), true) => Check::pass(id, format!("pinned to {}", list(pinned))),
        (Some(pinned), false) => Check::warn(
            id,
            format!(
                "pinned to {}, which lacks {}: tokens issued for {} are rejected by the Kubernetes API",
                list(pinned),
                list(&lost),
                if lost.len() == 1 { "it" } else { "them" }
            ),
        )
        .fix(repair.steps(observed)),
    }
}

fn jwks_uri_check(observed: &Observed, settings: &Settings) -> Check {
    let id = "apiserver.jwks-uri";
    match observed.flags.jwks_uri() {
        Some(uri) if uri == settings.jwks_uri => Check::pass(id, uri.to_string()),
        Some(uri) => Check::fail(
            id,
            format!(
                "--service-account-jwks-uri is {uri:?}, not the configured {:?}: it {}",
                settings.jwks_uri,
                words::difference(uri, &settings.jwks_uri).unwrap_or_default()
            ),
        )
        .fix("`irsa-agent apply` sets it"),
        None => Check::fail(
            id,
            format!(
                "--service-account-jwks-uri is not set: the apiserver's own discovery document points relying parties at https://<apiserver address>/openid/v1/jwks instead of {}",
                settings.jwks_uri
            ),
        )
        .fix("`irsa-agent apply` sets it"),
    }
}

/// The conversion command for a refused block, when there is one.
fn conversion(reason: &Refusal, path: &Path) -> Option<String> {
    let p = path.display();
    match reason {
        Refusal::RsaPublicPkcs1 => Some(format!(
            "convert it to a 'PUBLIC KEY' (SubjectPublicKeyInfo): openssl rsa -RSAPublicKey_in -in {p} -pubout -out {p}.new && mv {p}.new {p}"
        )),
        Refusal::EcPkcs8Private => Some(format!(
            "convert it to SEC1 ('EC PRIVATE KEY'): openssl ec -in {p} -out {p}.new && mv {p}.new {p}"
        )),
        Refusal::Encrypted => Some(format!(
            "decrypt it: openssl pkey -in {p} -out {p}.new && mv {p}.new {p} (then chmod 600 {p})"
        )),
        Refusal::Certificate(inner) => conversion(inner, path),
        _ => None,
    }
}

/// A key file message on one line, without the path the check already names and without
/// the conversion command the fix gives in full.
fn one_line(message: &str, path: &str) -> String {
    let message = message
        .strip_prefix(&format!("{path}: "))
        .unwrap_or(message);
    message
        .split('\n')
        .map(|part| {
            let part = part.trim();
            ["; convert it with:", "; decrypt it with:"]
                .iter()
                .find_map(|cut| part.find(cut).map(|i| &part[..i]))
                .unwrap_or(part)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn skipped_of(e: &KeyFileError) -> &[Skipped] {
    match e {
        KeyFileError::NoVerificationKeys { skipped, .. }
        | KeyFileError::BadSigningKey { skipped, .. } => skipped,
        _ => &[],
    }
}

fn describe_keys(keys: &[PublicKey]) -> String {
    keys.iter()
        .map(|k| format!("{} {}", k.describe(), k.kid()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_file_checks(local: &Local, observed: &Observed) -> Vec<Check> {
    let id = "apiserver.key-files";
    let mut out = Vec::new();
    if observed.flags.key_files.is_empty() {
        out.push(
            Check::fail(
                id,
                "no --service-account-key-file is set: the apiserver verifies no token",
            )
            .fix(format!(
                "add `{}` to {}",
                flag_item(observed, flags::KEY_FILE, "<file with the public keys>")
                    .trim_start_matches("- "),
                flag_location(observed, flags::KEY_FILE)
            )),
        );
    }
    for file in &local.files {
        let subject = file.path.display().to_string();
        let mut problems: Vec<(Status, String, Option<String>)> = Vec::new();
        let mut found = Vec::new();
        let fix_for = |skipped: &[Skipped]| {
            skipped
                .iter()
                .find_map(|s| conversion(&s.reason, &file.path))
                .map(|c| format!("{c}; then {}", local.restart_hint()))
        };
        if let Some(result) = &file.verification {
            match result {
                Ok(parsed) => {
                    found.push(format!(
                        "verifies with {} ({})",
                        plural(parsed.keys.len(), "key"),
                        describe_keys(&parsed.keys)
                    ));
                    for s in parsed.skipped.iter().filter(|s| s.looks_like_a_key()) {
                        problems.push((
                            Status::Warn,
                            one_line(
                                &format!(
                                    "kube-apiserver ignores {}",
                                    local.host_text(&s.explain_for(&file.path))
                                ),
                                &subject,
                            ),
                            fix_for(std::slice::from_ref(s)),
                        ));
                    }
                }
                Err(e) => problems.push((
                    Status::Fail,
                    one_line(&local.host_text(&e.to_string()), &subject),
                    fix_for(skipped_of(e)),
                )),
            }
        }
        if let Some(result) = &file.signing {
            match result {
                Ok(key) => found.push(format!("signs with {} {}", key.describe(), key.kid())),
                Err(e) => problems.push((
                    Status::Fail,
                    one_line(&local.host_text(&e.to_string()), &subject),
                    fix_for(skipped_of(e)),
                )),
            }
        }
        let check = match problems.iter().max_by_key(|p| p.0) {
            None => Check::pass(id, found.join("; ")),
            Some((status, _, _)) => {
                let status = *status;
                let fix = problems.iter().find_map(|p| p.2.clone()).unwrap_or_else(|| {
                    format!(
                        "replace it with a key kube-apiserver reads (RSA as PKCS#1 'RSA PRIVATE KEY', PKCS#8 or 'PUBLIC KEY'; EC as SEC1 'EC PRIVATE KEY' or 'PUBLIC KEY'), then {}",
                        local.restart_hint()
                    )
                });
                let mut finding: Vec<String> = problems.iter().map(|p| p.1.clone()).collect();
                finding.extend(found);
                let check = if status == Status::Fail {
                    Check::fail(id, finding.join("; "))
                } else {
                    Check::warn(id, finding.join("; "))
                };
                check.fix(fix)
            }
        };
        out.push(check.subject(subject));
    }
    out
}

fn signing_key_check(local: &Local, observed: &Observed) -> Check {
    let id = "apiserver.signing-key";
    let Some(signing_file) = &observed.flags.signing_key_file else {
        return Check::fail(id, "no --service-account-signing-key-file is set").fix(format!(
            "add `{}` to {}",
            flag_item(observed, flags::SIGNING_KEY_FILE, "<private key file>")
                .trim_start_matches("- "),
            flag_location(observed, flags::SIGNING_KEY_FILE)
        ));
    };
    let Some(signing) = local.signing() else {
        return Check::skip(
            id,
            format!("the signing key file {signing_file} cannot be read (see apiserver.key-files)"),
        );
    };
    let Some(keys) = local.keys() else {
        return Check::skip(
            id,
            "a verification key file cannot be read (see apiserver.key-files)",
        );
    };
    if keys.iter().any(|k| k.kid() == signing.kid()) {
        Check::pass(
            id,
            format!(
                "the signing key ({} {}) is among the verification keys",
                signing.describe(),
                signing.kid()
            ),
        )
    } else {
        let target = observed
            .flags
            .key_files
            .first()
            .cloned()
            .unwrap_or_else(|| "<verification key file>".into());
        Check::fail(
            id,
            format!(
                "the signing key {signing_file} ({} {}) is not among the verification keys ({}): every token it signs is rejected, by the apiserver and by relying parties",
                signing.describe(),
                signing.kid(),
                observed.flags.key_files.join(", ")
            ),
        )
        .fix(format!(
            "append its public half to a verification key file: openssl pkey -in {signing_file} -pubout >> {target}; then {}",
            local.restart_hint()
        ))
    }
}

fn permission_checks(local: &Local) -> Vec<Check> {
    let id = "apiserver.key-permissions";
    let mut out = Vec::new();
    for file in &local.files {
        let subject = file.path.display().to_string();
        let p = file.path.display();
        let mode = match &file.mode {
            Ok(m) => *m,
            Err(_) => continue, // the key-files check already says it cannot be read
        };
        let check = if mode & 0o022 != 0 {
            Check::fail(
                id,
                format!(
                    "mode {mode:04o}: {}-writable; whoever can write it can make the apiserver trust (or sign with) a key of their own",
                    if mode & 0o002 != 0 { "world" } else { "group" }
                ),
            )
            .fix(format!("chmod go-w {p}"))
        } else if !file.private {
            Check::pass(id, format!("mode {mode:04o} (public keys only)"))
        } else if mode & 0o004 != 0 {
            Check::fail(
                id,
                format!(
                    "mode {mode:04o}: a private key readable by every user on this host; anyone can mint tokens for every service account (and assume their cloud roles)"
                ),
            )
            .fix(format!("chmod 600 {p}"))
        } else if mode & 0o040 != 0 {
            Check::warn(
                id,
                format!("mode {mode:04o}: a private key readable by its group"),
            )
            .fix(format!("chmod 600 {p}"))
        } else {
            Check::pass(id, format!("mode {mode:04o} (private key, owner only)"))
        };
        out.push(check.subject(subject));
    }
    out
}

fn key_count_check(local: &Local) -> Check {
    let id = "apiserver.key-count";
    let Some(keys) = local.keys() else {
        return Check::skip(id, local.keys_unknown());
    };
    let unique = keys::dedup(&keys);
    let rsa = unique
        .iter()
        .filter(|k| matches!(k, PublicKey::Rsa { .. }))
        .count();
    let ec = unique.len() - rsa;
    let finding = format!(
        "{} to publish ({rsa} RSA, {ec} EC; AWS accepts at most {AWS_MAX_KEYS_PER_TYPE} of each){}",
        plural(unique.len(), "key"),
        if unique.len() < keys.len() {
            format!(
                ", {} repeated in the key files",
                plural(keys.len() - unique.len(), "key")
            )
        } else {
            String::new()
        }
    );
    if rsa > AWS_MAX_KEYS_PER_TYPE || ec > AWS_MAX_KEYS_PER_TYPE {
        Check::fail(id, finding)
            .fix("remove retired keys from the --service-account-key-file files (only keys that signed still-valid tokens are needed)")
    } else {
        Check::pass(id, finding)
    }
}
