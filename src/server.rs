//! Builds the pingora server from a validated [`Config`]: the proxy
//! service on `listen` (and on `tls.listen`, HTTPS), the admin service on
//! `admin.listen` (each behind a
//! [`connections::ConnectionGate`]: connection cap, header deadline), and
//! one background health-check service per checked upstream. pingora's own
//! config loader and command line are bypassed (they ignore unknown keys);
//! its `ServerConf` is made from ours. Before anything is bound, the
//! file-descriptor limit is raised and an admin listener open to the
//! network without a token is refused.

pub mod connections;
pub mod shutdown;
pub mod stream;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use pingora_core::apps::http_app::HttpServer;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::services::listening::Service;

use pingora_core::services::background::background_service;

use crate::access_log::{AccessLogError, LogWriter};
use crate::admin::AdminApp;
use crate::admission::housekeeping::Housekeeping;
use crate::admission::journal::Journal;
use crate::admission::Admission;
use crate::cache::stock::StockView;
use crate::cache::{CacheError, ReadCache};
use crate::config::tls::TlsFileError;
use crate::config::{is_loopback, AdminConfig, Config, StoreBackend};
use crate::drain::Drainer;
use crate::metrics::Metrics;
use crate::proxy::lane::FastLane;
use crate::proxy::SluiceProxy;
use crate::queue::memory::MemoryQueue;
use crate::queue::rates::DrainRates;
use crate::queue::redis::RedisQueue;
use crate::queue::Queue;
use crate::reload::{self, Reloader, SighupReloads};
use crate::routes::Routes;
use crate::store::instrumented::InstrumentedStore;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{Store, StoreError};
use crate::tls::TlsCerts;
use crate::upstream::{UpstreamError, Upstreams};
use connections::{ConnectionGate, ConnectionLimits, FdLimit};
use shutdown::ExitWhenDrained;

/// Errors that stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address is taken or not ours.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Upstream pools could not be built.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The read cache could not be set up.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The settlement journal cannot be read or written.
    #[error("store.journal {path}: {source}")]
    Journal {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or key cannot serve.
    #[error(transparent)]
    Tls(#[from] TlsFileError),
    /// The access log cannot be written, or its writer cannot start.
    #[error(transparent)]
    AccessLog(#[from] AccessLogError),
    /// The admin listener would be open to the network with no token.
    #[error("admin.listen {addr} is not a loopback address and {why}: anyone who reaches it could change stock; set the token, listen on 127.0.0.1, or set admin.allow_remote_without_token: true")]
    AdminUnprotected {
        /// The admin listen address.
        addr: std::net::SocketAddr,
        /// Which token is missing.
        why: String,
    },
}

/// Refuses an admin listener off loopback whose token is not set (or is
/// empty) in the environment, unless the config allows it, which is then
/// logged as a warning. `sluice check` already refused a missing
/// `admin.token_env`; the variable itself is only known here.
fn check_admin_exposure(
    admin: &AdminConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), StartError> {
    if is_loopback(admin.listen) {
        return Ok(());
    }
    let why = match &admin.token_env {
        None => "admin.token_env is not set".to_string(),
        Some(name) if env(name).is_some_and(|t| !t.is_empty()) => return Ok(()),
        Some(name) => format!("its token variable {name} is unset or empty"),
    };
    if admin.allow_remote_without_token {
        tracing::warn!(
            admin = %admin.listen,
            "admin API open to the network without a token ({why}), as admin.allow_remote_without_token allows"
        );
        return Ok(());
    }
    Err(StartError::AdminUnprotected {
        addr: admin.listen,
        why,
    })
}

/// This node's name in the queue's consumer group: unique per process,
/// so a restarted node does not take over its old self's entries before
/// they have been idle long enough.
fn consumer_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Whole seconds, rounded up: pingora's shutdown knobs are in seconds.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// pingora would panic on a taken port; check first for a clear message.
fn check_bindable(addr: SocketAddr, what: &'static str) -> Result<(), StartError> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| StartError::Listen { addr, what, source })
}

/// The pingora server conf derived from ours.
fn server_conf(config: &Config) -> ServerConf {
    let max_servers = config
        .upstreams
        .iter()
        .map(|u| u.servers.len())
        .max()
        .unwrap_or(1);
    ServerConf {
        threads: config.threads,
        // pingora's default lingers 300 s after SIGTERM.
        grace_period_seconds: Some(ceil_secs(config.shutdown.grace_period)),
        graceful_shutdown_timeout_seconds: Some(ceil_secs(config.shutdown.timeout)),
        // One connect retry per other server of the largest upstream.
        max_retries: max_servers,
        upgrade_sock: config.upgrade_socket.display().to_string(),
        // The proxied path's pool, sized as the relay's.
        upstream_keepalive_pool_size: crate::backend::exchange::kept(
            config.upstreams.iter().map(|u| u.max_inflight),
        ),
        ..ServerConf::default()
    }
}

/// The access log's writer, finished once: by whichever of an early exit
/// ([`ExitWhenDrained`]) and the end of `run` comes first.
#[derive(Clone)]
struct FinishLog(Arc<std::sync::Mutex<Option<LogWriter>>>);

impl FinishLog {
    /// Writes the queued lines and flushes (at most `within`).
    fn finish(&self, within: Duration) {
        let writer = self.0.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            writer.finish(within);
        }
    }
}

/// A built gateway, ready to run.
pub struct Gateway {
    server: Server,
    /// The metrics, for embedding and tests.
    pub metrics: Arc<Metrics>,
    /// The route table of pass-through traffic (`Routes::apply` on reload).
    pub routes: Arc<Routes>,
    /// The TLS listener's certificate, when there is one
    /// (`TlsCerts::reload` on reload).
    pub tls: Option<Arc<TlsCerts>>,
    /// The access log's writer, flushed when the server stops.
    log_writer: FinishLog,
    /// How long the writer gets to flush (`shutdown.timeout`).
    shutdown_timeout: Duration,
}

impl Gateway {
    /// Builds every service from the config; binds nothing until `run`.
    /// With `upgrade`, the listeners are taken from the running gateway
    /// (over `upgrade_socket`, once it gets SIGQUIT) instead of bound.
    pub fn build(config: Config, upgrade: bool) -> Result<Self, StartError> {
        check_admin_exposure(&config.admin, &|name| std::env::var(name).ok())?;
        if !upgrade {
            check_bindable(config.listen, "listen")?;
            check_bindable(config.admin.listen, "admin.listen")?;
            if let Some(tls) = &config.tls {
                check_bindable(tls.listen, "tls.listen")?;
            }
        }
        let tls = match &config.tls {
            Some(tls) => Some(Arc::new(TlsCerts::load(tls)?)),
            None => None,
        };
        let config = Arc::new(config);
        // Cache rules are `rule` labels too (their names are unique
        // across both kinds).
        let metrics = Arc::new(Metrics::new(
            config
                .rules
                .rules()
                .iter()
                .map(|r| &*r.name)
                .chain(config.cache_rules.rules().iter().map(|r| &*r.name)),
            config.upstreams.iter().map(|u| u.name.as_str()),
        )?);
        // Before any listener opens: SIGUSR1 is handled from the start.
        let (access_log, log_writer) =
            crate::access_log::start(config.access_log.as_ref(), metrics.access_log_dropped())?;
        let log_writer = FinishLog(Arc::new(std::sync::Mutex::new(Some(log_writer))));
        let (upstreams, health_services) = Upstreams::new(&config.upstreams, &metrics)?;
        let upstreams = Arc::new(upstreams);
        let store: Arc<dyn Store> = match config.store.backend {
            StoreBackend::Memory => Arc::new(MemoryStore::new()),
            StoreBackend::Redis => Arc::new(RedisStore::new(
                &config.store.redis,
                config.store.result_ttl,
            )?),
        };
        let queue: Arc<dyn Queue> = match config.store.backend {
            StoreBackend::Memory => Arc::new(MemoryQueue::new()),
            StoreBackend::Redis => Arc::new(RedisQueue::new(&config.store.redis)?),
        };
        let rates = Arc::new(DrainRates::default());
        let store: Arc<dyn Store> = Arc::new(InstrumentedStore::new(store, metrics.clone()));
        let journal =
            Journal::open(&config.store.journal).map_err(|source| StartError::Journal {
                path: config.store.journal.clone(),
                source,
            })?;
        let admission = Arc::new(Admission::new(
            &config,
            store,
            queue.clone(),
            rates.clone(),
            journal,
        ));

        let cache = Arc::new(ReadCache::new(&config, upstreams.clone(), metrics.clone())?);
        let stock = Arc::new(StockView::new(
            admission.clone(),
            config.store.recheck_interval,
        ));

        let live = Arc::new(ArcSwap::new(config.clone()));
        let routes = Arc::new(Routes::new(&config));
        let reloader = Arc::new(Reloader::new(
            live.clone(),
            admission.clone(),
            upstreams.clone(),
            routes.clone(),
            cache.clone(),
            tls.clone(),
            metrics.clone(),
        ));
        reload::ignore_sighup_until_listening();

        let options = pingora_core::server::configuration::Opt {
            upgrade,
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(Some(options), server_conf(&config));
        server.bootstrap();

        let fds = FdLimit::raise();
        let mut options = HttpServerOptions::default();
        options.h2c = config.h2c;
        // An idle HTTP/2 connection is held no longer than an idle HTTP/1 one.
        options.h2_idle_timeout = Some(config.limits.keepalive_timeout);
        let mut proxy_app = pingora_proxy::http_proxy(
            &server.configuration,
            SluiceProxy::new(
                live.clone(),
                upstreams.clone(),
                metrics.clone(),
                admission.clone(),
                routes.clone(),
                (cache.clone(), stock),
            )
            .with_access_log(access_log.clone()),
        );
        proxy_app.server_options = Some(options);
        let gate = ConnectionGate::new(
            proxy_app,
            ConnectionLimits::main(&config.limits, fds),
            "main",
        )
        .with_lane(FastLane::new(
            live.clone(),
            metrics.clone(),
            admission.clone(),
            access_log,
            (upstreams.clone(), routes.clone(), cache.clone()),
        ));
        let open_connections = gate.open_count();
        let mut proxy = Service::new("sluice proxy".to_string(), gate);
        // No L4 read buffer: the gate, the lane and pingora's sessions each
        // read into buffers of their own, so pingora's default 64 KiB one
        // (zeroed at accept) only added a copy per read and 64 KiB of
        // memory per open connection, idle or not (BENCHMARKS.md, RSS).
        // No write buffer on the plain listener either: the gate's stream
        // buffers writes in memory it holds only until a flush
        // (server::stream); a TLS connection keeps pingora's.
        let endpoint = |addr: SocketAddr, write: usize| {
            ListenerConfig::tcp(addr.to_string()).l4_buffer(L4BufferSettings::new(0, write))
        };
        proxy.add_listener(endpoint(config.listen, 0));
        // Same service, same gate and connection cap: a request over TLS
        // takes exactly the path of a plain one.
        if let (Some(tls_config), Some(certs)) = (&config.tls, &tls) {
            proxy.add_listener(
                endpoint(tls_config.listen, DEFAULT_L4_WRITE_BUFFER_SIZE)
                    .tls(TlsCerts::settings(certs)?),
            );
        }

        let mut admin = Service::new(
            "sluice admin".to_string(),
            ConnectionGate::new(
                HttpServer::new_app(AdminApp::new(
                    live,
                    metrics.clone(),
                    upstreams.clone(),
                    admission.clone(),
                    reloader.clone(),
                    cache,
                    config.admin.token_env.as_deref(),
                )),
                ConnectionLimits::admin(&config.limits),
                "admin",
            ),
        );
        admin.add_tcp(&config.admin.listen.to_string());
        // Scrapes and probes are light; one thread keeps them off the
        // proxy's workers.
        admin.threads = Some(1);

        server.add_service(proxy);
        server.add_service(admin);
        for hc in health_services {
            server.add_service(hc);
        }
        let drainer = Drainer::new(
            admission.clone(),
            upstreams.clone(),
            queue.clone(),
            metrics.clone(),
            rates,
            consumer_name(),
        );
        server.add_service(background_service(
            "sluice exit when drained",
            ExitWhenDrained {
                connections: vec![open_connections],
                sending: drainer.sending(),
                before_exit: {
                    let log = log_writer.clone();
                    let within = config.shutdown.timeout;
                    Arc::new(move || log.finish(within))
                },
                queue,
                upstreams: config.upstreams.iter().map(|u| u.name.clone()).collect(),
            },
        ));
        server.add_service(background_service("sluice queue drainer", drainer));
        server.add_service(background_service(
            "sluice reload on SIGHUP",
            SighupReloads(reloader),
        ));
        server.add_service(background_service(
            "sluice housekeeping",
            Housekeeping::new(
                admission,
                config.store.recheck_interval,
                config.store.sweep_interval,
            ),
        ));
        let shutdown_timeout = config.shutdown.timeout;
        Ok(Self {
            server,
            metrics,
            routes,
            tls,
            log_writer,
            shutdown_timeout,
        })
    }

    /// Runs until SIGTERM (graceful) or SIGINT (at once); then writes out
    /// the access log and returns.
    pub fn run(self) {
        self.server.run(pingora_core::server::RunArgs::default());
        self.log_writer.finish(self.shutdown_timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(listen: &str, token_env: Option<&str>, allow: bool) -> AdminConfig {
        AdminConfig {
            listen: listen.parse().unwrap_or_else(|e| panic!("{listen}: {e}")),
            token_env: token_env.map(str::to_string),
            allow_remote_without_token: allow,
        }
    }

    #[test]
    fn an_admin_listener_off_loopback_needs_a_set_token_or_the_opt_in() {
        let set = |name: &str| (name == "T").then(|| "secret".to_string());
        let empty = |_: &str| Some(String::new());
        let unset = |_: &str| None;
        // Loopback: never refused, token or not.
        assert!(check_admin_exposure(&admin("127.0.0.1:9901", None, false), &unset).is_ok());
        assert!(check_admin_exposure(&admin("[::1]:9901", Some("T"), false), &empty).is_ok());
        // Off loopback: a set, non-empty token is enough.
        assert!(check_admin_exposure(&admin("0.0.0.0:9901", Some("T"), false), &set).is_ok());
        for (cfg, env) in [
            (
                admin("0.0.0.0:9901", Some("T"), false),
                &empty as &dyn Fn(&str) -> Option<String>,
            ),
            (admin("10.1.2.3:9901", Some("T"), false), &unset),
            (admin("[::]:9901", None, false), &set),
        ] {
            let err = check_admin_exposure(&cfg, env).map(|_| ()).unwrap_err();
            assert!(
                err.to_string().contains("is not a loopback address and"),
                "{err}"
            );
        }
        // The explicit opt-in starts (with a warning).
        assert!(check_admin_exposure(&admin("0.0.0.0:9901", Some("T"), true), &empty).is_ok());
        assert!(check_admin_exposure(&admin("0.0.0.0:9901", None, true), &unset).is_ok());
    }
}
