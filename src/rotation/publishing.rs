//! Publishing the JWKS and looking at the public copy, behind a trait: the real one is the
//! [`crate::publish`] library (every configured target, then [`crate::publish::verify`] over
//! HTTPS); tests use a fake with a caching relying party.

use std::time::Duration;

use crate::config::Settings;
use crate::host::HostRoot;
use crate::publish::{self, Publication, Publisher, verify};

/// What the public URL serves now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicCopy {
    /// The kids of the public JWKS.
    pub kids: Vec<String>,
    /// The JWKS body (to verify test tokens against exactly what relying parties get).
    pub jwks: Option<String>,
    /// Its Cache-Control max-age (s-maxage preferred), when the answer carried one.
    pub max_age: Option<Duration>,
}

/// Why publishing, or looking at the public copy, failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishingError {
    /// Targets that could not be written or are not in sync, each with why.
    #[error("publishing failed: {}", .0.join("; "))]
    Targets(Vec<String>),
    /// The public copy could not be fetched, or the answer was an error.
    #[error("{0}")]
    Public(String),
}

/// Where the documents go and how the public copy looks.
#[async_trait::async_trait]
pub trait Publishing: Send {
    /// Writes both documents to every target; `Err` names the targets that failed.
    async fn publish(&mut self, publication: &Publication) -> Result<String, PublishingError>;
    /// Fetches the public JWKS (the jwks-uri) as relying parties see it.
    async fn public(&mut self, publication: &Publication) -> Result<PublicCopy, PublishingError>;
    /// The longest Cache-Control max-age the targets are configured with (used when the public
    /// answer has no Cache-Control).
    fn configured_max_age(&self) -> Option<Duration>;
}

/// The real thing: [`publish::publish_all`] + [`verify::verify`].
pub struct RealPublishing {
    publishers: Vec<Publisher>,
    client: reqwest::Client,
    max_ages: Vec<Duration>,
}

impl RealPublishing {
    pub fn new(root: &HostRoot, settings: &Settings, timeout: Duration) -> Result<Self, String> {
        let env = publish::Environment {
            root: root.clone(),
            ca_file: settings.ca_file.as_ref().map(|p| root.path(p)),
        };
        let publishers = publish::publishers(settings, &env).map_err(|e| e.to_string())?;
        let client = publish::http::client(env.ca_file.as_deref(), timeout)?;
        let max_ages = settings
            .publish
            .iter()
            .filter_map(|t| verify::max_age(t.cache_control()))
            .collect();
        Ok(RealPublishing {
            publishers,
            client,
            max_ages,
        })
    }
}

#[async_trait::async_trait]
impl Publishing for RealPublishing {
    async fn publish(&mut self, publication: &Publication) -> Result<String, PublishingError> {
        if self.publishers.is_empty() {
            return Ok("no publish: targets configured (publish the JWKS yourself)".into());
        }
        let reports = publish::publish_all(&self.publishers, publication).await;
        let failed: Vec<String> = reports
            .iter()
            .filter(|r| r.failed() || !r.in_sync())
            .map(|r| {
                let why = [&r.jwks, &r.discovery]
                    .iter()
                    .filter_map(|d| match &d.outcome {
                        publish::Outcome::Failed(w) | publish::Outcome::Skipped(w) => {
                            Some(w.clone())
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                format!("{}: {why}", r.target)
            })
            .collect();
        if !failed.is_empty() {
            return Err(PublishingError::Targets(failed));
        }
        let changed = reports.iter().filter(|r| r.changed()).count();
        Ok(format!(
            "{} target(s) in sync, {changed} written",
            reports.len()
        ))
    }

    async fn public(&mut self, publication: &Publication) -> Result<PublicCopy, PublishingError> {
        let report = verify::verify(&self.client, publication).await;
        if let Some(e) = &report.jwks.error {
            return Err(PublishingError::Public(format!(
                "cannot fetch {}: {e}",
                publication.jwks_uri
            )));
        }
        if report.jwks.status.is_some_and(|s| !(200..300).contains(&s)) {
            return Err(PublishingError::Public(format!(
                "{} answered HTTP {}",
                publication.jwks_uri,
                report.jwks.status.unwrap_or_default()
            )));
        }
        let jwks = match self.client.get(&publication.jwks_uri).send().await {
            Ok(r) if r.status().is_success() => r.text().await.ok(),
            _ => None,
        };
        Ok(PublicCopy {
            kids: report.jwks.kids.clone(),
            jwks,
            max_age: report
                .jwks
                .cache_control
                .as_deref()
                .and_then(verify::max_age),
        })
    }

    fn configured_max_age(&self) -> Option<Duration> {
        self.max_ages.iter().max().copied()
    }
}
