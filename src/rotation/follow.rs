//! Following the cluster's rotation on the servers that do not drive it.
//!
//! # k3s/RKE2
//!
//! On several servers one agent drives the rotation (it holds the rotation Lease, see
//! [`super::step`]): it installs each step's keys with `k3s certificate rotate-ca`, which puts
//! them in the datastore, and restarts its own server. Every other server loads the datastore's
//! `service.key` only when it starts, so each other agent restarts its own server, one at a time
//! (the restart Lease), when the keys its server has differ from the driver's as the driver's
//! Lease reports them (what the driver's apiserver runs with after a verified step). No person
//! restarts anything, and the driver's waits ("these servers do not verify with the new key")
//! end by themselves.
//!
//! Following the datastore is safe at every step: the driver advances only once every server
//! has what the previous step installed (it asks every apiserver), so a follower that restarts
//! early or late only ever moves one step behind it.
//!
//! A restart that does not bring the driver's keys (the datastore does not have them: the
//! driver's k3s was restored, or the follower uses another datastore) is not repeated for the
//! same keys: the follower holds and says so, instead of restarting its server every minute.
//!
//! # kubeadm
//!
//! Each control-plane node has its own copy of the key files, so each follower installs the
//! driver's steps itself: it opens the new key the driver shared, sealed with the signing key
//! every node shares ([`super::seal`]), writes `sa-<id>.key|.pub` beside its `sa.key`, and
//! makes the same file changes the driver made on its host, one step behind it, holding the
//! restart Lease: `verify-only` (the new public key joins `--service-account-key-file`), `sign`
//! (the apiserver and kube-controller-manager sign with it), `retire` (the new key becomes
//! `sa.key`/`sa.pub`, the old one goes). Which step the driver is at is read from its keys in
//! its Lease ([`stage`]), so a follower that was down catches up in one install. A node whose
//! `sa.key` differs from the driver's cannot open the key and holds, naming both kids. A rotation
//! aborted before the new key signed leaves no shared key: a follower that still verifies with
//! the key it installed for it takes it out again.

use super::seal::{self, Sealed};
use super::{Context, RotationError, failed, lock};
use crate::apiserver::install::{self, HostChange, Install, Installing, NewKeyPem};
use crate::apiserver::kubeadm::CanonicalFiles;
use crate::apiserver::ready::{self, Patience};
use crate::apiserver::restart::{self, Restart};
use crate::apiserver::{Observed, Source};
use crate::config::KeyType;
use crate::membership::{self, Member, View};
use crate::state::{self, State};

/// The key of the follower's record in the state file ([`Record`]).
pub const STATE_KEY: &str = "rotation-follow";

/// What a follower remembers between looks (the state file's [`STATE_KEY`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    /// The keys it last restarted its server for.
    #[serde(default)]
    pub tried: Option<Keys>,
    /// kubeadm: the new key files it installed for the driver's rotation.
    #[serde(default)]
    pub staged: Option<Staged>,
}

/// kubeadm: a follower's copy of the driver's new key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Staged {
    /// The rotation's id (`sa-<id>.key`).
    pub id: String,
    pub new_kid: String,
    pub key_type: KeyType,
    /// Host path of `sa-<id>.key`.
    pub new_key_file: String,
    /// The files the old key lives in (`sa.key`, `sa.pub`), as they were before the rotation.
    pub canonical: CanonicalFiles,
}

impl Record {
    fn load(root: &crate::host::HostRoot) -> Record {
        State::load(root)
            .ok()
            .and_then(|s| s.other.get(STATE_KEY).cloned())
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }

    fn save(&self, root: &crate::host::HostRoot) -> Result<(), RotationError> {
        let value = serde_json::to_value(self).map_err(failed)?;
        State::update(root, |s| {
            s.other.insert(STATE_KEY.to_string(), value);
        })?;
        Ok(())
    }
}

/// A server's keys: every kid it verifies with (sorted) and the one it signs with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Keys {
    pub kids: Vec<String>,
    pub signing: Option<String>,
}

impl Keys {
    pub fn new(kids: impl IntoIterator<Item = String>, signing: Option<String>) -> Keys {
        let mut kids: Vec<String> = kids.into_iter().collect();
        kids.sort();
        kids.dedup();
        Keys { kids, signing }
    }

    fn describe(&self) -> String {
        format!(
            "verifies with {}, signs with {}",
            self.kids.join(", "),
            self.signing.as_deref().unwrap_or("(unknown)")
        )
    }
}

/// What a follower does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Follow {
    /// No other agent drives a rotation: nothing to follow.
    Nothing,
    /// This server has the driver's keys.
    InStep { driver: String },
    /// Restart this server: it lacks what the driver advanced to.
    Restart {
        driver: String,
        target: Keys,
        why: String,
    },
    /// Do nothing, and say why (a driver that is not live; a restart that did not help).
    Hold(String),
}

/// The agent driving a rotation, other than `me`.
pub fn driver<'v>(view: &'v View, me: &str) -> Option<&'v Member> {
    view.agents
        .iter()
        .find(|a| a.node != me && a.report.as_ref().is_some_and(membership::Report::rotating))
}

/// The live driver's node, rotation phase and keys, or what to do instead.
fn target(me: &str, view: &View) -> Result<(String, String, Keys), Follow> {
    let Some(driver) = driver(view, me) else {
        return Err(Follow::Nothing);
    };
    let Some(report) = driver.report.as_ref() else {
        return Err(Follow::Nothing);
    };
    if !driver.live {
        return Err(Follow::Hold(format!(
            "{} drives the cluster's key rotation ({}) but its agent is not live: this server keeps its keys until it comes back",
            driver.node, report.rotation
        )));
    }
    let target = Keys::new(report.kids.iter().cloned(), report.signing_kid.clone());
    if target.kids.is_empty() {
        return Err(Follow::Hold(format!(
            "{} drives the cluster's key rotation ({}) but reports no keys",
            driver.node, report.rotation
        )));
    }
    Ok((driver.node.clone(), report.rotation.clone(), target))
}

/// What `me`, whose server has `mine`, does about the rotation `view` shows (k3s/RKE2: keys
/// shared through the datastore). `tried`: the keys it last restarted its server for.
pub fn decide(me: &str, mine: &Keys, view: &View, tried: Option<&Keys>) -> Follow {
    let (driver, phase, target) = match target(me, view) {
        Ok(t) => t,
        Err(follow) => return follow,
    };
    if *mine == target {
        return Follow::InStep { driver };
    }
    if tried == Some(&target) {
        return Follow::Hold(format!(
            "this server was restarted for {driver}'s rotation step ({phase}) and still {} instead ({}): the datastore does not hold what {driver}'s apiserver runs with; look at both servers' logs",
            mine.describe(),
            target.describe(),
        ));
    }
    Follow::Restart {
        why: format!(
            "{driver} advanced the cluster's key rotation ({phase}): its apiserver {}; this one {}",
            target.describe(),
            mine.describe()
        ),
        driver,
        target,
    }
}

/// kubeadm: how far keys are in the rotation to `new_kid`: the install that brought them there
/// (`None`: they do not have the new key).
pub fn stage(keys: &Keys, new_kid: &str) -> Option<Install> {
    if !keys.kids.iter().any(|k| k == new_kid) {
        None
    } else if keys.signing.as_deref() != Some(new_kid) {
        Some(Install::VerifyOnly)
    } else if keys.kids.len() == 1 {
        Some(Install::Retire)
    } else {
        Some(Install::Sign)
    }
}

fn rank(stage: Option<Install>) -> u8 {
    match stage {
        None => 0,
        Some(Install::VerifyOnly) => 1,
        Some(Install::Sign | Install::Trust) => 2,
        Some(Install::Retire) => 3,
        Some(Install::RemoveNew) => 0,
    }
}

/// kubeadm: what `me` does about the rotation `view` shows, whose new key is `new_kid` (from the
/// key the driver shared). Only the new key's place counts (each node's old keys are its own):
/// `Restart` means "install the driver's step", [`stage`] of its `target`. `tried`: the keys
/// this node last installed a step for.
pub fn decide_files(
    me: &str,
    mine: &Keys,
    view: &View,
    new_kid: &str,
    tried: Option<&Keys>,
) -> Follow {
    let (driver, phase, target) = match target(me, view) {
        Ok(t) => t,
        Err(follow) => return follow,
    };
    let want = stage(&target, new_kid);
    if want.is_none() {
        return Follow::Hold(format!(
            "{driver} drives the cluster's key rotation ({phase}) but its apiserver does not have the key it shared ({new_kid}); waiting for it"
        ));
    }
    if rank(stage(mine, new_kid)) >= rank(want) {
        return Follow::InStep { driver };
    }
    if tried == Some(&target) {
        return Follow::Hold(format!(
            "this node installed {driver}'s rotation step ({phase}) and its apiserver still {}: look at its kube-apiserver (kubelet's log, the manifest)",
            mine.describe(),
        ));
    }
    Follow::Restart {
        why: format!(
            "{driver} advanced the cluster's key rotation ({phase}): its apiserver {}; this one {}",
            target.describe(),
            mine.describe()
        ),
        driver,
        target,
    }
}

/// What a follower's look found, and the other servers' keys as their Leases say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Looked {
    pub look: Look,
    /// [`membership::peer_kids`], when the Leases were read.
    pub peer_kids: Option<Vec<String>>,
}

/// What a follower's look found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Look {
    /// No other agent to follow (no Lease API, or no other agent's Lease), or this agent drives
    /// a rotation: its own schedule rules.
    Alone,
    /// Other agents, none driving a rotation: look again within the recheck interval (a driver
    /// may start any time).
    Quiet,
    /// Following (or holding for) another agent's rotation: the status line.
    Following(String),
}

impl Look {
    fn of(line: Option<String>) -> Look {
        line.map_or(Look::Quiet, Look::Following)
    }
}

/// One look of a follower: when another agent drives a rotation and this server lacks what it
/// advanced to, brings this server there (k3s/RKE2: restarts it; kubeadm: installs the step's
/// files), holding the restart Lease, and waits until its apiserver serves the driver's keys.
pub async fn follow(ctx: &mut Context) -> Result<Looked, RotationError> {
    let observed = install::observe(&ctx.root, ctx.settings.distribution)?;
    let _lock = lock(&ctx.root)?;
    let alone = Looked {
        look: Look::Alone,
        peer_kids: None,
    };
    if super::load_state(&ctx.root)?.is_some_and(|st| st.phase.name() != super::PhaseName::Idle) {
        return Ok(alone);
    }
    let Some(view) = ctx
        .cluster
        .members()
        .await
        .map_err(|e| failed(format!("cannot read the other servers' agent Leases: {e}")))?
    else {
        return Ok(alone);
    };
    let me = ctx.cluster.node().to_string();
    let peer_kids = Some(membership::peer_kids(&view, &me));
    let look = follow_in(ctx, &observed, &view, &me).await?;
    Ok(Looked { look, peer_kids })
}

/// [`follow`] once the Leases were read (under the rotation lock).
async fn follow_in(
    ctx: &mut Context,
    observed: &crate::apiserver::Observed,
    view: &membership::View,
    me: &str,
) -> Result<Look, RotationError> {
    let me = me.to_string();
    if !view.agents.iter().any(|a| a.node != me) {
        return Ok(Look::Alone);
    }
    let host = install::host_keys(observed)?;
    let mine = Keys::new(host.verification.iter().cloned(), Some(host.signing.kid()));
    let mut record = Record::load(&ctx.root);
    let shared = observed.source.keys_shared_by_servers();
    let decision = if shared {
        decide(&me, &mine, view, record.tried.as_ref())
    } else if driver(view, &me).is_none() {
        return take_out_aborted(ctx, observed, &mine, &mut record)
            .await
            .map(Look::of);
    } else {
        let sealed = match ctx.cluster.shared_key().await {
            Ok(Some(sealed)) => sealed,
            Ok(None) => {
                let why = "the driver shares no new key yet (Secret kube-system/irsa-agent-rotation-key): waiting for it".to_string();
                return Ok(Look::Following(format!("rotation: holding: {why}")));
            }
            Err(e) => return Err(failed(format!("cannot read the shared new key: {e}"))),
        };
        match decide_files(&me, &mine, view, &sealed.new_kid, record.tried.as_ref()) {
            Follow::Restart {
                driver,
                target,
                why,
            } => {
                return install_step(ctx, observed, &mut record, &sealed, &driver, target, &why)
                    .await
                    .map(Look::of);
            }
            other => other,
        }
    };
    match decision {
        Follow::Nothing => Ok(Look::Quiet),
        Follow::InStep { driver } => Ok(Look::Following(format!(
            "rotation: following {driver}'s rotation; this server has its keys"
        ))),
        Follow::Hold(why) => {
            log::warn!("rotation: {why}");
            Ok(Look::Following(format!("rotation: holding: {why}")))
        }
        Follow::Restart {
            driver,
            target,
            why,
        } => {
            let Restart::Unit(unit) = restart::restart_for(
                &ctx.root,
                observed.distribution,
                ctx.options.unit.as_deref(),
            ) else {
                return Err(failed("no unit to restart"));
            };
            let turned = super::take_turn(ctx).await?;
            log::info!("rotation: {why}: systemctl restart {unit}");
            // Recorded before the restart: a restart that does not bring the keys is not
            // repeated for the same keys.
            record.tried = Some(target.clone());
            record.save(&ctx.root)?;
            let restarted = ctx
                .services
                .restart(&unit)
                .map_err(|e| failed(format!("following {driver}'s rotation: {e}")));
            let served = match restarted {
                Ok(()) => serves(ctx, &driver, &target.kids)
                    .await
                    .map_err(|last| {
                        failed(format!(
                            "restarted {unit} to follow {driver}'s rotation, but its apiserver does not serve {} (last: {last})",
                            target.kids.join(", ")
                        ))
                    }),
                Err(e) => Err(e),
            };
            super::give_turn_back(ctx, turned).await;
            served?;
            announce(ctx).await;
            Ok(Look::Following(format!(
                "rotation: followed {driver}'s rotation: restarted {unit}; this server's apiserver serves {} at {}",
                target.kids.join(", "),
                state::rfc3339(ctx.clock.now())
            )))
        }
    }
}

/// Waits until this server's apiserver serves `kids` (in any order).
async fn serves(ctx: &mut Context, driver: &str, kids: &[String]) -> Result<(), String> {
    let patience = Patience {
        timeout: ctx.options.restart_timeout,
        poll: ctx.options.poll,
    };
    let cluster = &mut ctx.cluster;
    let what = format!(
        "waiting for this server's apiserver to serve {driver}'s keys {}",
        kids.join(", ")
    );
    ready::wait_until(&what, ctx.clock.as_ref(), patience, async || {
        let served = cluster.jwks_kids(None).await.map_err(|e| e.to_string())?;
        let served = Keys::new(served, None);
        if served.kids == kids {
            Ok(())
        } else {
            Err(format!("serves kids {}", served.kids.join(", ")))
        }
    })
    .await
    .map(|_| ())
}

/// Says in this server's Lease what its apiserver has now (the driver waits for it).
async fn announce(ctx: &mut Context) {
    if let Ok(observed) = install::observe(&ctx.root, ctx.settings.distribution) {
        let report = membership::Report::of(&ctx.root, &observed, &ctx.settings.issuer, "");
        if let Err(e) = ctx.cluster.announce(&report).await {
            log::debug!("rotation: cannot announce this server's keys: {e}");
        }
    }
}

/// kubeadm: this node's copy of the driver's new key: opened from the shared key with the
/// signing key this node has (once; later steps read `sa-<id>.key` back).
fn stage_copy(
    ctx: &Context,
    observed: &Observed,
    record: &mut Record,
    sealed: &Sealed,
) -> Result<Result<Staged, String>, RotationError> {
    if let Some(staged) = record.staged.as_ref().filter(|s| s.id == sealed.rotation) {
        return Ok(Ok(staged.clone()));
    }
    let Some(signing) = observed.flags.signing_key_file.as_deref() else {
        return Ok(Err(
            "kube-apiserver has no --service-account-signing-key-file".into(),
        ));
    };
    let mine = match crate::keys::load_signing_file(&ctx.root.path(signing)) {
        Ok(key) => key,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let ca = match seal::ca_key(&ctx.root, signing) {
        Ok(ca) => ca,
        Err(e) => return Ok(Err(format!("cannot read the cluster CA's key: {e}"))),
    };
    let key = match seal::open(sealed, &mine, ca.as_ref()) {
        Ok(key) => key,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let pem = NewKeyPem {
        kid: key.kid(),
        private_pem: &key.pem,
        public_pem: key.public().to_spki_pem(),
    };
    let (new_key_file, canonical) =
        observed
            .source
            .stage_new_key(&ctx.root, observed, &sealed.rotation, &pem)?;
    let Some(canonical) = canonical else {
        return Ok(Err("this host's key files are not kubeadm's".into()));
    };
    let staged = Staged {
        id: sealed.rotation.clone(),
        new_kid: sealed.new_kid.clone(),
        key_type: sealed.key_type,
        new_key_file,
        canonical,
    };
    record.staged = Some(staged.clone());
    record.save(&ctx.root)?;
    log::info!(
        "rotation: opened the new key {} shared by the driver (sealed with {}) and wrote {}",
        sealed.new_kid,
        sealed.sealed_with,
        staged.new_key_file
    );
    Ok(Ok(staged))
}

/// The file changes of `install` on this host for the staged copy.
fn plan(
    ctx: &Context,
    observed: &Observed,
    staged: &Staged,
    install: Install,
) -> Result<HostChange, RotationError> {
    let key = match install {
        Install::RemoveNew => None,
        _ => {
            let bytes = install::read_file(&ctx.root, std::path::Path::new(&staged.new_key_file))?;
            let key = super::keygen::load(staged.key_type, &bytes).map_err(failed)?;
            if key.kid() != staged.new_kid {
                return Err(failed(format!(
                    "{} no longer holds the new key {}",
                    staged.new_key_file, staged.new_kid
                )));
            }
            Some(key)
        }
    };
    let installing = Installing {
        id: &staged.id,
        new_kid: &staged.new_kid,
        new_key_file: &staged.new_key_file,
        canonical: Some(&staged.canonical),
        new_key: key.as_ref().map(|k| NewKeyPem {
            kid: k.kid(),
            private_pem: &k.pem,
            public_pem: k.public().to_spki_pem(),
        }),
    };
    Ok(observed
        .source
        .plan_install(&ctx.root, observed, &installing, install)?)
}

/// kubeadm: makes this node's files what the driver's step installed, holding the restart Lease.
async fn install_step(
    ctx: &mut Context,
    observed: &Observed,
    record: &mut Record,
    sealed: &Sealed,
    driver: &str,
    target: Keys,
    why: &str,
) -> Result<Option<String>, RotationError> {
    let Some(install) = stage(&target, &sealed.new_kid) else {
        return Ok(None);
    };
    let staged = match stage_copy(ctx, observed, record, sealed)? {
        Ok(staged) => staged,
        Err(cause) => {
            let why = format!(
                "cannot install {driver}'s new key {} on this node: {cause}",
                sealed.new_kid
            );
            log::warn!("rotation: {why}");
            return Ok(Some(format!("rotation: holding: {why}")));
        }
    };
    let observed = install::observe(&ctx.root, ctx.settings.distribution)?;
    let change = plan(ctx, &observed, &staged, install)?;
    let HostChange::Files {
        changes,
        restarts_apiserver,
        expected,
    } = change
    else {
        return Ok(Some(format!(
            "rotation: following {driver}'s rotation; this node's files already have its step ({})",
            install.name()
        )));
    };
    let turned = super::take_turn(ctx).await?;
    log::info!("rotation: {why}: installing {}", install.name());
    record.tried = Some(target.clone());
    record.save(&ctx.root)?;
    let what = format!("follow {driver}'s rotation ({})", install.name());
    let written = super::write_files(
        ctx,
        &changes,
        restarts_apiserver,
        &expected,
        &what,
        install,
        || Ok(()),
    )
    .await;
    super::give_turn_back(ctx, turned).await;
    written?;
    if install == Install::Retire {
        let observed = install::observe(&ctx.root, ctx.settings.distribution)?;
        clean_up(ctx, &observed, &staged)?;
        record.staged = None;
        record.save(&ctx.root)?;
    }
    announce(ctx).await;
    Ok(Some(format!(
        "rotation: followed {driver}'s rotation: installed {} ({}); this node's apiserver serves {} at {}",
        install.name(),
        sealed.new_kid,
        expected.join(", "),
        state::rfc3339(ctx.clock.now())
    )))
}

fn clean_up(ctx: &Context, observed: &Observed, staged: &Staged) -> Result<(), RotationError> {
    let installing = Installing {
        id: &staged.id,
        new_kid: &staged.new_kid,
        new_key_file: &staged.new_key_file,
        canonical: Some(&staged.canonical),
        new_key: None,
    };
    if let Source::Kubeadm(k) = &observed.source {
        k.clean_up_keys(&ctx.root, observed, &installing)?;
    }
    Ok(())
}

/// kubeadm, no rotation anywhere: a key this node installed for a rotation that was aborted
/// (no driver, no shared key, never signed with) is taken out again.
async fn take_out_aborted(
    ctx: &mut Context,
    observed: &Observed,
    mine: &Keys,
    record: &mut Record,
) -> Result<Option<String>, RotationError> {
    let Some(staged) = record.staged.clone() else {
        return Ok(None);
    };
    let verifies = mine.kids.contains(&staged.new_kid);
    let signs = mine.signing.as_deref() == Some(staged.new_kid.as_str());
    if signs {
        // Not an abort: the rotation ended and this node signs with its copy (`sa.key` after
        // its retire). The `sa-<id>` files go once no flag names them: an agent killed between
        // its retire and that clean-up (seen on three real apiservers) left them behind.
        clean_up(ctx, observed, &staged)?;
        record.staged = None;
        record.save(&ctx.root)?;
        return Ok(None);
    }
    match ctx.cluster.shared_key().await {
        Ok(None) => {}
        Ok(Some(_)) | Err(_) => return Ok(None),
    }
    if verifies {
        let change = plan(ctx, observed, &staged, Install::RemoveNew)?;
        if let HostChange::Files {
            changes,
            restarts_apiserver,
            expected,
        } = change
        {
            let turned = super::take_turn(ctx).await?;
            log::info!(
                "rotation: the rotation {} ended without its new key {} signing (aborted): taking it out of this node's apiserver",
                staged.id,
                staged.new_kid
            );
            let written = super::write_files(
                ctx,
                &changes,
                restarts_apiserver,
                &expected,
                "take out an aborted rotation's key",
                Install::RemoveNew,
                || Ok(()),
            )
            .await;
            super::give_turn_back(ctx, turned).await;
            written?;
            announce(ctx).await;
        }
    }
    let observed = install::observe(&ctx.root, ctx.settings.distribution)?;
    clean_up(ctx, &observed, &staged)?;
    record.staged = None;
    record.save(&ctx.root)?;
    Ok(Some(format!(
        "rotation: took out {} (rotation {} was aborted)",
        staged.new_kid, staged.id
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Report;

    fn keys(kids: &[&str], signing: &str) -> Keys {
        Keys::new(kids.iter().map(|k| k.to_string()), Some(signing.into()))
    }

    fn view(driver_live: bool, phase: &str, kids: &[&str], signing: &str) -> View {
        View {
            agents: vec![
                Member {
                    node: "cp1".into(),
                    live: driver_live,
                    report: Some(Report {
                        rotation: phase.into(),
                        kids: kids.iter().map(|k| k.to_string()).collect(),
                        signing_kid: Some(signing.into()),
                        ..Report::default()
                    }),
                },
                Member {
                    node: "cp2".into(),
                    live: true,
                    report: Some(Report::default()),
                },
            ],
            apiservers: vec!["cp1".into(), "cp2".into()],
        }
    }

    #[test]
    fn a_follower_restarts_when_it_lacks_what_the_driver_advanced_to() {
        let v = view(true, "published", &["new", "old"], "old");
        let mine = keys(&["old"], "old");
        match decide("cp2", &mine, &v, None) {
            Follow::Restart { driver, target, .. } => {
                assert_eq!(driver, "cp1");
                assert_eq!(target, keys(&["old", "new"], "old"));
            }
            other => panic!("{other:?}"),
        }
        // The signing key counts too (the sign step), and so does a retired key.
        let v = view(true, "signing", &["new", "old"], "new");
        assert!(matches!(
            decide("cp2", &keys(&["new", "old"], "old"), &v, None),
            Follow::Restart { .. }
        ));
        let v = view(true, "retired", &["new"], "new");
        assert!(matches!(
            decide("cp2", &keys(&["new", "old"], "new"), &v, None),
            Follow::Restart { .. }
        ));
    }

    #[test]
    fn in_step_or_no_rotation_means_no_restart() {
        let v = view(true, "trusted", &["new", "old"], "old");
        assert_eq!(
            decide("cp2", &keys(&["old", "new"], "old"), &v, None),
            Follow::InStep {
                driver: "cp1".into()
            }
        );
        let v = view(true, "idle", &["new"], "new");
        assert_eq!(
            decide("cp2", &keys(&["old"], "old"), &v, None),
            Follow::Nothing
        );
        // The driver does not follow itself.
        let v = view(true, "published", &["new", "old"], "old");
        assert_eq!(
            decide("cp1", &keys(&["old"], "old"), &v, None),
            Follow::Nothing
        );
    }

    #[test]
    fn a_dead_driver_or_a_restart_that_did_not_help_holds() {
        let v = view(false, "published", &["new", "old"], "old");
        assert!(matches!(
            decide("cp2", &keys(&["old"], "old"), &v, None),
            Follow::Hold(why) if why.contains("not live")
        ));
        let v = view(true, "published", &["new", "old"], "old");
        let target = keys(&["new", "old"], "old");
        assert!(matches!(
            decide("cp2", &keys(&["old"], "old"), &v, Some(&target)),
            Follow::Hold(why) if why.contains("datastore")
        ));
        // A later step is new keys: restarted for again.
        let v = view(true, "signing", &["new", "old"], "new");
        assert!(matches!(
            decide("cp2", &keys(&["new", "old"], "old"), &v, Some(&target)),
            Follow::Restart { .. }
        ));
    }

    #[test]
    fn a_kubeadm_follower_installs_the_step_the_driver_reached_by_the_new_key_alone() {
        // The driver verifies with its own old keys and the new one; this node has other old
        // keys (its own sa.pub history): only the new key's place counts.
        let v = view(true, "published", &["new", "old"], "old");
        let mine = keys(&["mine-old"], "mine-old");
        match decide_files("cp2", &mine, &v, "new", None) {
            Follow::Restart { target, .. } => {
                assert_eq!(stage(&target, "new"), Some(Install::VerifyOnly))
            }
            other => panic!("{other:?}"),
        }
        let verifying = keys(&["mine-old", "new"], "mine-old");
        assert!(matches!(
            decide_files("cp2", &verifying, &v, "new", None),
            Follow::InStep { .. }
        ));
        // A node that was down catches up in one install: the driver signs, this one lacks
        // the key altogether.
        let v = view(true, "signing", &["new", "old"], "new");
        match decide_files("cp2", &mine, &v, "new", None) {
            Follow::Restart { target, .. } => {
                assert_eq!(stage(&target, "new"), Some(Install::Sign))
            }
            other => panic!("{other:?}"),
        }
        let v = view(true, "retired", &["new"], "new");
        match decide_files("cp2", &keys(&["mine-old", "new"], "new"), &v, "new", None) {
            Follow::Restart { target, .. } => {
                assert_eq!(stage(&target, "new"), Some(Install::Retire))
            }
            other => panic!("{other:?}"),
        }
        // Ahead of the driver (it was restored): nothing to install, never a step back.
        let v = view(true, "trusted", &["new", "old"], "old");
        assert!(matches!(
            decide_files("cp2", &keys(&["new", "old"], "new"), &v, "new", None),
            Follow::InStep { .. }
        ));
    }

    #[test]
    fn a_kubeadm_follower_holds_when_its_install_did_not_take_or_the_driver_lacks_the_key() {
        let v = view(true, "published", &["new", "old"], "old");
        let target = keys(&["new", "old"], "old");
        assert!(matches!(
            decide_files("cp2", &keys(&["old"], "old"), &v, "new", Some(&target)),
            Follow::Hold(why) if why.contains("kube-apiserver")
        ));
        // The shared key is of another rotation than the one the driver's keys show.
        assert!(matches!(
            decide_files("cp2", &keys(&["old"], "old"), &v, "other", None),
            Follow::Hold(why) if why.contains("does not have the key it shared")
        ));
        let v = view(false, "published", &["new", "old"], "old");
        assert!(matches!(
            decide_files("cp2", &keys(&["old"], "old"), &v, "new", None),
            Follow::Hold(why) if why.contains("not live")
        ));
    }
}
