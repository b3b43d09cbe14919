//! `irsa-agent demo`: the whole job on a bundled example k3s host, with nothing to set up.
//!
//! Copies the example host (embedded in the binary from `examples/k3s-host`) to a temporary
//! root, runs the real `apply` there (without a restart: there is no k3s), publishes the JWKS and
//! discovery document with the real publishing code to the example's directory target (inside
//! the temporary root), prints the diff and the documents, then mints a token with the example
//! signing key and verifies it against the published JWKS with a JWT library, the way AWS STS
//! would.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args as ClapArgs;
use serde_json::json;

use super::{Exit, Global};
use crate::apiserver::apply::{self as executor, Options, RestartOutcome};
use crate::apiserver::plan::{self, Target};
use crate::apiserver::probe::{ApiserverProbe, Status};
use crate::apiserver::restart::{Restart, ServiceManager};
use crate::apiserver::{self};
use crate::config;
use crate::fs::{self, NewFile};
use crate::host::HostRoot;
use crate::keys;
use crate::publish::{self, Publication};
use crate::state::{self, State};

/// The example host, embedded: (host path, contents, mode).
const EXAMPLE_HOST: [(&str, &[u8], u32); 4] = [
    (
        "/etc/irsa-agent/config.yaml",
        include_bytes!("../../examples/k3s-host/etc/irsa-agent/config.yaml"),
        0o644,
    ),
    (
        "/etc/rancher/k3s/config.yaml",
        include_bytes!("../../examples/k3s-host/etc/rancher/k3s/config.yaml"),
        0o600,
    ),
    (
        "/var/lib/rancher/k3s/server/tls/service.key",
        include_bytes!("../../examples/k3s-host/var/lib/rancher/k3s/server/tls/service.key"),
        0o600,
    ),
    (
        "/var/lib/rancher/k3s/server/tls/service.current.key",
        include_bytes!(
            "../../examples/k3s-host/var/lib/rancher/k3s/server/tls/service.current.key"
        ),
        0o600,
    ),
];

#[derive(Debug, ClapArgs)]
#[command(after_help = "\
Runs on a copy of the example host in a temporary folder, removed at the end: nothing else on \
this machine is changed. With --dir the example host is kept in DIR/host (the published \
documents in DIR/host/srv/oidc). Ends with the next steps on a real server (docs/quickstart.md).")]
pub struct Args {
    /// Keep everything in DIR instead of a temporary folder removed at the end.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Publishes with the real publishing code to the example's `publish:` targets (a directory
/// under the demo root). Returns the written files (as paths on this machine) and the
/// publication.
fn publish(
    root: &HostRoot,
    settings: &config::Settings,
) -> anyhow::Result<(Vec<PathBuf>, Publication)> {
    let publication =
        Publication::from_host(root, settings, crate::rotation::published_ahead(root))?;
    let env = publish::Environment {
        root: root.clone(),
        ca_file: None,
    };
    let publishers = publish::publishers(settings, &env)?;
    let reports = crate::runtime::block_on(publish::publish_all(&publishers, &publication));
    let mut written = Vec::new();
    for (report, target) in reports.iter().zip(&settings.publish) {
        if report.failed() {
            bail!("publishing to {} failed: {report:?}", report.target);
        }
        if let config::PublishTarget::Directory { path, .. } = target {
            for doc in [&report.jwks, &report.discovery] {
                written.push(root.path(path).join(&doc.key));
            }
        }
    }
    Ok((written, publication))
}

/// The demo has no k3s to restart.
struct NoServices;
impl ServiceManager for NoServices {
    fn restart(&mut self, unit: &str) -> Result<(), crate::errors::ProgramError> {
        Err(crate::errors::ProgramError::Failed {
            command: format!("systemctl restart {unit}"),
            status: "not run".into(),
            output: "the demo does not restart services".into(),
        })
    }
}
struct NoProbe;
#[async_trait::async_trait]
impl ApiserverProbe for NoProbe {
    async fn check(&mut self) -> Status {
        Status {
            ready: false,
            issuer: None,
            detail: "no apiserver in the demo".into(),
        }
    }
}

fn unique_temp_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for n in 0..100u32 {
        let dir = base.join(format!(
            "irsa-agent-demo-{}-{}-{n}",
            std::process::id(),
            state::unix_now()
        ));
        match fs::create_new_dir(&dir, 0o700) {
            Ok(true) => return Ok(dir),
            Ok(false) => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!("cannot create a temporary folder in {}", base.display())
}

pub fn run(_global: &Global, args: Args) -> anyhow::Result<Exit> {
    let (base, keep) = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            (dir.clone(), true)
        }
        None => (unique_temp_dir()?, false),
    };
    let result = demo(&base);
    if keep {
        println!(
            "\nThe example host and the published documents stay in {} (the documents in {}).",
            base.join("host").display(),
            base.join("host/srv/oidc").display()
        );
    } else {
        let removed = std::fs::remove_dir_all(&base);
        println!(
            "\n{} the demo's folder {}; `irsa-agent demo --dir DIR` keeps the example host and the published documents to look at.",
            if removed.is_ok() {
                "Removed"
            } else {
                "Could not remove"
            },
            base.display()
        );
    }
    if result.is_ok() {
        println!("{NEXT_STEPS}");
    }
    result
}

/// Where to go from the demo: the journey on a real server, each step with its check.
const NEXT_STEPS: &str = "
Next, on a real k3s, RKE2 or kubeadm server (every step with the check that it worked:
/usr/share/doc/irsa-agent/quickstart.md, docs/quickstart.md in the source):
  1. set `issuer:` and a `publish:` target in /etc/irsa-agent/config.yaml; `irsa-agent check-config`
  2. `irsa-agent publish` (exit 3 until the issuer's URL serves the documents)
  3. `irsa-agent apply --check --diff`, then `irsa-agent apply`; `irsa-agent doctor`
  4. `irsa-agent trust-policy --namespace NS --service-account SA --account-id ID`: the AWS commands
  5. `kubectl create token SA -n NS --audience sts.amazonaws.com | irsa-agent verify-token -`";

fn demo(base: &Path) -> anyhow::Result<Exit> {
    let host = base.join("host");
    let root = HostRoot::new(&host);
    for (path, contents, mode) in EXAMPLE_HOST {
        let target = root.path(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent, 0o755)?;
        }
        fs::write_atomic(&target, contents, NewFile { mode, owner: None })
            .with_context(|| format!("cannot write {}", target.display()))?;
    }
    println!("==> example k3s host copied to {}", host.display());
    println!(
        "    every host path below (/etc/rancher/k3s/..., /var/lib/irsa-agent/..., /srv/oidc/...) is inside that folder: nothing else on this machine changes"
    );
    let settings = config::load(&root, None)?.settings;
    println!("    configured issuer: {}", settings.issuer);

    println!("\n==> irsa-agent apply --no-restart (the real apply, on the example host)");
    let observed = apiserver::observe(&root, settings.distribution)?;
    let target = Target {
        issuer: settings.issuer.clone(),
        jwks_uri: settings.jwks_uri.clone(),
        remembered: Vec::new(),
        retire: Vec::new(),
        retired: Vec::new(),
        accept_only: false,
        drop_external_audiences: false,
    };
    let plan = plan::plan(&observed, &target)?;
    for warning in &plan.warnings {
        log::warn!("{warning}");
    }
    super::apply::print_plan(&plan, true);
    let opts = Options {
        no_restart: true,
        ..Options::default()
    };
    let outcome = crate::runtime::block_on(executor::execute(
        &root,
        &plan,
        &Restart::Unit("k3s".into()),
        &mut NoServices,
        &mut NoProbe,
        &opts,
        state::unix_now(),
    ))?;
    for w in &outcome.written {
        println!(
            "    {} is the demo's copy: {}",
            w.path.display(),
            root.path(&w.path).display()
        );
    }
    State::update(&root, |st| {
        executor::record(st, &plan, &outcome, state::unix_now())
    })?;
    if let RestartOutcome::Pending(r) = &outcome.restart {
        println!(
            "restart pending: on a real host `{}` makes it take effect",
            r.describe()
        );
    }

    println!("\n==> a second apply changes nothing");
    let again = plan::plan(&apiserver::observe(&root, settings.distribution)?, &target)?;
    println!(
        "    {}",
        if again.in_sync() {
            "in sync: no file written, no restart"
        } else {
            "NOT in sync (this is a bug)"
        }
    );

    println!(
        "\n==> irsa-agent publish (the real publishing code, to the example's directory target)"
    );
    let files = apiserver::key_files(&root, settings.distribution)?;
    let (written, publication) = publish(&root, &settings)?;
    for path in &written {
        println!("    wrote {}", path.display());
    }
    let documents = &publication.documents;
    println!(
        "\n{} (serve it at {}/.well-known/openid-configuration):",
        keys::jwks::DISCOVERY_PATH,
        settings.issuer
    );
    println!("{}", documents.discovery);
    println!(
        "\n{} (serve it at {}):",
        keys::jwks::JWKS_PATH,
        settings.jwks_uri
    );
    println!("{}", documents.jwks);

    println!("\n==> a token signed with the example key, verified against the published JWKS");
    let signing = keys::load_signing_file(&root.path(&files.signing))?;
    let now = state::unix_now();
    let claims = json!({
        "iss": settings.issuer,
        "sub": "system:serviceaccount:default:demo",
        "aud": ["sts.amazonaws.com"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "demo"}},
    });
    let token = keys::token::mint(&signing, &claims)?;
    let jwks_file = written
        .iter()
        .find(|p| p.ends_with(keys::jwks::JWKS_PATH.trim_start_matches('/')))
        .context("the JWKS was not published to a directory")?;
    let published = crate::fs::read_to_string(jwks_file)?;
    let verified = verify(&token, &published, &settings.issuer)?;
    println!(
        "    verified: kid {}, alg {}, iss {}, sub {}, aud {}",
        verified.0,
        verified.1,
        verified.2["iss"].as_str().unwrap_or(""),
        verified.2["sub"].as_str().unwrap_or(""),
        verified.2["aud"]
    );
    println!("\nDone: that was the whole job, on the demo's copy of a k3s server.");
    Ok(Exit::OK)
}

/// Verifies `token` against a JWKS the way a relying party does: key chosen by `kid`, algorithm
/// from the key, issuer and audience checked.
fn verify(
    token: &str,
    jwks: &str,
    issuer: &str,
) -> anyhow::Result<(String, String, serde_json::Value)> {
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(jwks).context("the JWKS does not parse")?;
    let header = jsonwebtoken::decode_header(token)?;
    let kid = header.kid.clone().context("the token has no kid")?;
    let jwk = set
        .find(&kid)
        .with_context(|| format!("kid {kid} is not in the published JWKS"))?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk)?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&["sts.amazonaws.com"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .context("the token does not verify against the published JWKS")?;
    Ok((kid, format!("{:?}", header.alg), data.claims))
}
