//! Scheduled updates of the agent's model store: every `interval`, each configured model
//! is brought up to date from the update repository through tern-bundle's [`Updater`] —
//! TUF metadata verified from the root up, the bundle downloaded (resumably), verified,
//! golden-checked on this device and installed — and a newly installed version is made
//! active. The repository's next scan serves it, under the store's crash breadcrumb; a
//! version that fails to load is rolled back there.

use std::sync::Arc;

use tern_bundle::{ModelStore, UpdateOutcome, Updater};

use crate::config::UpdateSettings;
use crate::error::AgentError;
use crate::metrics::{Metrics, UpdateResult};

/// The store, its updater and the models to keep up to date.
pub struct Updates {
    updater: Updater,
    store: ModelStore,
    models: Vec<String>,
    metrics: Arc<Metrics>,
}

impl Updates {
    /// An updater for `store` from the repository `settings` names.
    pub fn new(
        store: ModelStore,
        settings: &UpdateSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Updates, AgentError> {
        let root = std::fs::read(&settings.root).map_err(|source| AgentError::Io {
            context: format!("reading {}", settings.root.display()),
            source,
        })?;
        let updater = Updater::new(
            store.clone(),
            &root,
            tern_bundle::http::for_repo(&settings.url),
        )
        .map_err(AgentError::Update)?;
        Ok(Updates {
            updater,
            store,
            models: settings.models.clone(),
            metrics,
        })
    }

    /// Checks every model once; whether any new version was activated.
    pub fn check(&self) -> bool {
        let mut activated = false;
        for name in &self.models {
            let outcome = self.updater.update(name).and_then(|o| match o {
                UpdateOutcome::Installed(installed) => {
                    self.store.activate(name, installed.version)?;
                    Ok(Some(installed.version))
                }
                _ => Ok(None),
            });
            match outcome {
                Ok(Some(version)) => {
                    tracing::info!(model = %name, version, "update installed and activated");
                    self.metrics.update(name, UpdateResult::installed);
                    activated = true;
                }
                Ok(None) => self.metrics.update(name, UpdateResult::up_to_date),
                Err(e) => {
                    tracing::warn!(model = %name, error = %e, "update failed; the installed version keeps serving");
                    self.metrics.update(name, UpdateResult::failed);
                }
            }
        }
        activated
    }
}
