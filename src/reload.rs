//! Reloading the config without a restart (SIGHUP and
//! `POST /admin/v1/reload`): `gateway.yaml` and every rule file are read
//! and validated whole; a config with any problem, or one that changes a
//! key that needs a restart ([`crate::config::restart`]), is refused and
//! the old one keeps serving. Otherwise the new rules, upstream server
//! lists and timeouts, routes, cache rules, the TLS certificate and the rest of the
//! live config are swapped in.
//! Requests under way finish under what they started with; state of
//! rules that stay (token buckets, sold-out flags, stock) is kept.

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Serialize;

use crate::admission::{Admission, RulesChanged};
use crate::cache::ReadCache;
use crate::config::error::ConfigErrors;
use crate::config::tls::TlsFileError;
use crate::config::{restart, Config};
use crate::metrics::Metrics;
use crate::routes::Routes;
use crate::tls::TlsCerts;
use crate::upstream::{UpstreamError, Upstreams};

/// Why a reload was refused; the old config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// A file has problems (each with its `path:line:col`).
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// Keys changed that only a restart can put in force.
    #[error("{}", .0.join("; "))]
    NeedsRestart(Vec<String>),
    /// An upstream's new server list could not be put in force.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The TLS certificate or key could not be read again.
    #[error(transparent)]
    Tls(#[from] TlsFileError),
    /// Reading the files did not complete.
    #[error("reading the config did not complete: {0}")]
    Task(String),
}

impl ReloadError {
    /// One line per problem, for the admin answer and the log.
    pub fn problems(&self) -> Vec<String> {
        match self {
            Self::Invalid(errors) => errors.0.iter().map(ToString::to_string).collect(),
            Self::NeedsRestart(why) => why.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// What a reload put in force.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    /// Rules added, changed, removed and kept.
    pub rules: RulesChanged,
    /// Upstreams whose server list or timeouts changed.
    pub upstreams: Vec<String>,
}

/// Re-reads the config file a gateway was started with and puts it in
/// force; one reload at a time.
pub struct Reloader {
    live: Arc<ArcSwap<Config>>,
    admission: Arc<Admission>,
    upstreams: Arc<Upstreams>,
    routes: Arc<Routes>,
    cache: Arc<ReadCache>,
    tls: Option<Arc<TlsCerts>>,
    metrics: Arc<Metrics>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader of the config in `live` (read again from its `source`,
    /// spelt as at start: another spelling would resolve the paths the
    /// config names against its folder differently; `run` gives an
    /// absolute one, so a later working directory does not matter) and of
    /// everything built from it.
    pub fn new(
        live: Arc<ArcSwap<Config>>,
        admission: Arc<Admission>,
        upstreams: Arc<Upstreams>,
        routes: Arc<Routes>,
        cache: Arc<ReadCache>,
        tls: Option<Arc<TlsCerts>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            live,
            admission,
            upstreams,
            routes,
            cache,
            tls,
            metrics,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads, validates and applies the config; counts the result.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one = self.one_at_a_time.lock().await;
        let result = self.reload_once().await;
        self.metrics.observe_reload(result.is_ok());
        result
    }

    async fn reload_once(&self) -> Result<Reloaded, ReloadError> {
        let source = self.live.load().source.clone();
        // Files and secrets are read with blocking calls: off the runtime.
        let new = tokio::task::spawn_blocking(move || crate::config::load(&source))
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))?
            .map_err(ReloadError::Invalid)?;
        let old = self.live.load_full();
        let why = restart::needs_restart(&old, &new);
        if !why.is_empty() {
            return Err(ReloadError::NeedsRestart(why));
        }
        // Certificates first: renewed files that do not serve refuse the
        // whole reload before anything else changed.
        if let (Some(certs), Some(tls)) = (&self.tls, &new.tls) {
            let (certs, tls) = (certs.clone(), tls.clone());
            tokio::task::spawn_blocking(move || certs.reload(&tls))
                .await
                .map_err(|e| ReloadError::Task(e.to_string()))??;
        }
        let mut upstreams = Vec::new();
        for (pool, config) in self.upstreams.pools().iter().zip(&new.upstreams) {
            if *pool.config() != *config {
                upstreams.push(config.name.clone());
            }
        }
        // Rules first: a rule's leases follow its upstream's timeouts, and
        // a lease computed for longer timeouts is safe while the old,
        // shorter ones still apply.
        // Cache rules are `rule` labels too.
        let names = new.rules.rules().iter().map(|r| &r.name);
        for name in names.chain(new.cache_rules.rules().iter().map(|r| &r.name)) {
            self.metrics.add_rule(name);
        }
        let rules = self.admission.apply(&new);
        for (pool, config) in self.upstreams.pools().iter().zip(&new.upstreams) {
            if *pool.config() != *config {
                pool.apply(config).await?;
            }
        }
        self.routes.apply(&new);
        self.cache.apply(&new);
        self.live.store(Arc::new(new));
        Ok(Reloaded { rules, upstreams })
    }

    /// Logs the result of a reload the way an operator reads it.
    pub fn log(result: &Result<Reloaded, ReloadError>, trigger: &str) {
        match result {
            Ok(r) => tracing::info!(
                trigger,
                added = ?r.rules.added,
                changed = ?r.rules.changed,
                removed = ?r.rules.removed,
                upstreams = ?r.upstreams,
                "config reloaded"
            ),
            Err(e) => {
                for problem in e.problems() {
                    tracing::error!(
                        trigger,
                        "config reload refused, old config keeps serving: {problem}"
                    );
                }
            }
        }
    }
}

/// The SIGHUP listener: each signal is one reload.
pub struct SighupReloads(pub Arc<Reloader>);

#[async_trait::async_trait]
impl BackgroundService for SighupReloads {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: reload through the admin API");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    Reloader::log(&self.0.reload().await, "SIGHUP");
                }
            }
        }
    }
}

/// Ignores SIGHUP until [`SighupReloads`] listens for it: by default the
/// signal ends the process, and a reload sent just after start must not.
pub fn ignore_sighup_until_listening() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no code;
    // nothing else in the process handles SIGHUP before this.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}
