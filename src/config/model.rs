//! The typed gateway config that the rest of Sluice reads.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::rules::{CacheRules, RuleSet};

use crate::vocab::UpstreamId;

/// Defaults for keys `gateway.yaml` leaves out, in one place.
pub mod defaults {
    use std::time::Duration;
    /// `admin.listen`: loopback, so the admin API is never exposed by accident.
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9901";
    /// `store.redis.url`
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
    /// `store.redis.key_prefix`
    pub const REDIS_KEY_PREFIX: &str = "sluice:";
    /// `store.redis.timeout`: a stalled Redis must not stall admission.
    pub const REDIS_TIMEOUT: Duration = Duration::from_millis(50);
    /// `store.pass_cap`: with `on_failure: pass_capped`, one request at a time.
    pub const PASS_CAP: u32 = 1;
    /// `store.recheck_interval`: how soon a sold-out flag notices stock that
    /// came back through another node.
    pub const RECHECK_INTERVAL: Duration = Duration::from_millis(500);
    /// `store.result_ttl`: how long tickets and backend answers are kept.
    pub const RESULT_TTL: Duration = Duration::from_secs(3600);
    /// `store.lease_margin`: added to every computed lease, for scheduling
    /// delays and clock skew between nodes.
    pub const LEASE_MARGIN: Duration = Duration::from_secs(5);
    /// `store.in_doubt_for`: how long a hold whose outcome is unknown stays
    /// held before its units return (time to run `sluice reconcile`).
    pub const IN_DOUBT_FOR: Duration = Duration::from_secs(600);
    /// `store.sweep_interval`: how often a node returns expired holds.
    pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
    /// `store.journal`: settlements that could not reach the store, kept
    /// until they land (relative to gateway.yaml's folder).
    pub const JOURNAL: &str = "sluice.journal";
    /// `store.redis.admin_timeout`: admin operations (restock, stock view,
    /// release, reconcile) may take longer than a shopper's request.
    pub const REDIS_ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
    /// `store.redis.breaker_failures`: failures in a row that open the
    /// circuit breaker.
    pub const BREAKER_FAILURES: u32 = 3;
    /// `store.redis.breaker_interval`: while open, one try per interval.
    pub const BREAKER_INTERVAL: Duration = Duration::from_secs(1);
    /// `upstreams.*.max_inflight`
    pub const MAX_INFLIGHT: u32 = 64;
    /// `upstreams.*.connect_timeout`
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// `upstreams.*.read_timeout`
    pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
    /// `upstreams.*.write_timeout`
    pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
    /// `upstreams.*.idle_timeout`: pooled keep-alive connections are closed after this.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `upstreams.*.health_check.interval`
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
    /// `upstreams.*.health_check.timeout`
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
    /// `limits.max_header_bytes`: 64 KiB
    pub const MAX_HEADER_BYTES: u64 = 64 << 10;
    /// `limits.max_rule_body_bytes`: 64 KiB
    pub const MAX_RULE_BODY_BYTES: u64 = 64 << 10;
    /// `limits.max_body_bytes`: 16 MiB
    pub const MAX_BODY_BYTES: u64 = 16 << 20;
    /// `limits.header_timeout`: a client has this long to send a request's
    /// headers (from accept for the first request of a connection, from
    /// its first byte for the next ones). pingora alone allows 60 s per read.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// `limits.keepalive_timeout`: an idle client connection between two
    /// requests is closed after this (pingora's own default).
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
    /// File descriptors kept out of the client-connection budget: the two
    /// listeners, pingora's pool of idle backend connections (128), the
    /// admin listener's connections (64), Redis, health checks, log files
    /// and the runtimes' own descriptors.
    pub const FD_RESERVE: u64 = 256;

    /// `limits.max_connections` when not set: what the file-descriptor
    /// limit can hold. Each admitted client connection may hold a second
    /// descriptor to the backend, and refused connections that linger to
    /// read the client's request take up to one eighth of the cap more, so
    /// `2 m + m / 8 = soft - FD_RESERVE`, that is `m = (soft - 256) * 8 / 17`
    /// (361 for a soft limit of 1024), at least 1.
    pub fn max_connections(fd_soft_limit: u64) -> u32 {
        let usable = fd_soft_limit.saturating_sub(FD_RESERVE);
        // Divide first: the limit can be RLIM_INFINITY (u64::MAX).
        let m = usable / 17 * 8 + usable % 17 * 8 / 17;
        u32::try_from(m).unwrap_or(u32::MAX).max(1)
    }
    /// `cache.max_bytes`: the memory tier of the read cache, 64 MiB.
    pub const CACHE_MAX_BYTES: u64 = 64 << 20;
    /// `cache.session_cookies`: cookies that make a request personal (a
    /// logged-in page), so it bypasses the cache unless the key names
    /// them; the session cookies of PHP, Java servlets, Spring Session,
    /// Laravel, Express, ASP.NET and Django.
    pub const CACHE_SESSION_COOKIES: &[&str] = &[
        "PHPSESSID",
        "JSESSIONID",
        "SESSION",
        "laravel_session",
        "connect.sid",
        "ASP.NET_SessionId",
        "sessionid",
    ];
    /// `shutdown.grace_period`: time for in-flight requests after SIGTERM.
    pub const GRACE_PERIOD: Duration = Duration::from_secs(5);
    /// `upgrade_socket` when not set: one per main listen port, so two
    /// gateways on one host never take each other's listeners.
    pub fn upgrade_socket(listen_port: u16) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/tmp/sluice-{listen_port}.upgrade.sock"))
    }
    /// `shutdown.timeout`: time for runtimes to stop after the grace period.
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    /// `access_log.format`: every field, one JSON object a line.
    pub const ACCESS_LOG_FORMAT: super::AccessLogFormat = super::AccessLogFormat::Json;
    /// `access_log.buffer`: lines waiting for the writer before new ones
    /// are dropped (a few hundred bytes each: a few MiB at most).
    pub const ACCESS_LOG_BUFFER: u32 = 16_384;
    /// The largest `access_log.buffer`: the channel is memory on every node.
    pub const ACCESS_LOG_BUFFER_MAX: u32 = 1 << 20;
    /// `log.format`: human-readable lines.
    pub const LOG_FORMAT: super::LogFormat = super::LogFormat::Text;
}

/// The whole validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `gateway.yaml` it was read from.
    pub source: PathBuf,
    /// Main listener.
    pub listen: SocketAddr,
    /// Admin listener and token.
    pub admin: AdminConfig,
    /// Stock, dedup and ticket store.
    pub store: StoreConfig,
    /// Upstreams, indexed by `UpstreamId`.
    pub upstreams: Vec<UpstreamConfig>,
    /// Where unmatched requests go.
    pub default_upstream: UpstreamId,
    /// Rule-file globs as written (resolved against the config's folder).
    pub rule_globs: Vec<String>,
    /// The rules loaded from them.
    pub rules: RuleSet,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Size, connection and header-time limits of client requests.
    pub limits: Limits,
    /// SIGTERM behaviour.
    pub shutdown: ShutdownConfig,
    /// Worker threads of the main listener.
    pub threads: usize,
    /// Accept HTTP/2 over cleartext (h2c) as well as HTTP/1.1.
    pub h2c: bool,
    /// The Unix socket `sluice run --upgrade` takes the listeners from.
    pub upgrade_socket: PathBuf,
    /// The TLS listener, when there is one.
    pub tls: Option<TlsConfig>,
    /// Where traffic no rule matches goes, first match first; else
    /// `default_upstream`.
    pub routes: Vec<RouteConfig>,
    /// One line per request, when `access_log:` is set.
    pub access_log: Option<AccessLogConfig>,
    /// The gateway's own log lines.
    pub log: LogConfig,
    /// The read cache's tiers.
    pub cache: CacheConfig,
    /// The read-cache rules loaded from the rule files.
    pub cache_rules: CacheRules,
}

/// `tls:`: a second listener of the proxy, HTTPS (HTTP/2 or HTTP/1.1 by ALPN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// Its address (changing it needs a restart).
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first (relative paths resolved from
    /// gateway.yaml's folder).
    pub cert: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key: PathBuf,
}

/// One entry of `routes:`; at least one of `host` and `path_prefix` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteConfig {
    /// The request's host, lowercase, without port; any host when `None`.
    pub host: Option<String>,
    /// A canonical path prefix, matched at a segment boundary; any path
    /// when `None`.
    pub path_prefix: Option<String>,
    /// Where matching requests go.
    pub upstream: UpstreamId,
}

/// `cache:` in `gateway.yaml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bound of the memory tier, in bytes of bodies, headers and keys.
    pub max_bytes: u64,
    /// Share answers between nodes through `store.redis`.
    pub redis: bool,
    /// Cookie names that make a request bypass the cache unless keyed
    /// (compared without regard to case).
    pub session_cookies: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: defaults::CACHE_MAX_BYTES,
            redis: false,
            session_cookies: defaults::CACHE_SESSION_COOKIES
                .iter()
                .map(|c| c.to_string())
                .collect(),
        }
    }
}

impl Config {
    /// The upstream with this id.
    pub fn upstream(&self, id: UpstreamId) -> &UpstreamConfig {
        &self.upstreams[id.0]
    }
}

/// `admin:`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Admin listener.
    pub listen: SocketAddr,
    /// Environment variable holding the bearer token; unset or empty means open.
    pub token_env: Option<String>,
    /// `admin.allow_remote_without_token`: the operator's explicit consent
    /// to an admin listener off loopback with no token (a warning at start).
    pub allow_remote_without_token: bool,
}

/// Whether `addr` can only be reached from this host (127.0.0.0/8, ::1,
/// or ::ffff:127.0.0.0/104). `0.0.0.0` and `::` listen everywhere.
pub fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `store.backend`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreBackend {
    /// Embedded, one node.
    Memory,
    /// Shared by many nodes.
    Redis,
}

/// `store.on_failure`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Answer `unavailable` (503).
    FailClosed,
    /// Forward without pre-deduction, at most `cap` at a time per node.
    PassCapped {
        /// In-flight cap while the store is down.
        cap: u32,
    },
}

/// `store:`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Which store.
    pub backend: StoreBackend,
    /// Redis settings (used when `backend` is Redis).
    pub redis: RedisConfig,
    /// What to do when the store cannot answer.
    pub on_failure: OnFailure,
    /// In-flight cap per node for rules that pass while the store is down
    /// (`store.pass_cap`, whichever rule asks).
    pub pass_cap: u32,
    /// Poll interval of sold-out flags.
    pub recheck_interval: Duration,
    /// How long tickets and kept answers live.
    pub result_ttl: Duration,
    /// Added to every computed lease.
    pub lease_margin: Duration,
    /// How long an in-doubt hold stays held.
    pub in_doubt_for: Duration,
    /// How often expired holds are swept.
    pub sweep_interval: Duration,
    /// The settlement journal file.
    pub journal: PathBuf,
}

/// `store.redis:`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// Connection URL.
    pub url: String,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Response timeout of each command.
    pub timeout: Duration,
    /// Response timeout of admin operations.
    pub admin_timeout: Duration,
    /// Failures in a row that open the circuit breaker.
    pub breaker_failures: u32,
    /// While the breaker is open, one try per interval.
    pub breaker_interval: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: defaults::REDIS_URL.to_string(),
            key_prefix: defaults::REDIS_KEY_PREFIX.to_string(),
            timeout: defaults::REDIS_TIMEOUT,
            admin_timeout: defaults::REDIS_ADMIN_TIMEOUT,
            breaker_failures: defaults::BREAKER_FAILURES,
            breaker_interval: defaults::BREAKER_INTERVAL,
        }
    }
}

/// `upstreams.<name>:`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The name (metric label).
    pub name: String,
    /// Servers, round-robin.
    pub servers: Vec<SocketAddr>,
    /// The backend's safe concurrency for admitted requests.
    pub max_inflight: u32,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time to wait for each read from the backend.
    pub read_timeout: Duration,
    /// Time to wait for each write to the backend.
    pub write_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub idle_timeout: Duration,
    /// Active health check.
    pub health_check: Option<HealthCheckConfig>,
    /// How long a queued request may sit with a node that took it before
    /// another node takes it over (that node is presumed dead).
    pub queue_claim_idle: Duration,
}

/// `upstreams.<name>.health_check:`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheckConfig {
    /// Path to GET; any 2xx is healthy.
    pub path: String,
    /// How often.
    pub interval: Duration,
    /// Connect and read timeout of one check.
    pub timeout: Duration,
    /// Consecutive failures that mark a server down.
    pub failures: u32,
    /// Consecutive successes that mark it up again.
    pub successes: u32,
}

/// `limits:`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Total request header bytes before 431.
    pub max_header_bytes: u64,
    /// Body bytes of a rule-matched request before 413.
    pub max_rule_body_bytes: u64,
    /// Body bytes of a pass-through request before 413.
    pub max_body_bytes: u64,
    /// Concurrent client connections of the main listener; `None` derives
    /// it from the file-descriptor limit at start
    /// ([`defaults::max_connections`]).
    pub max_connections: Option<u32>,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Idle time allowed between two requests of one client connection.
    pub keepalive_timeout: Duration,
}

/// `shutdown:`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// After SIGTERM: listeners close, in-flight requests get this long.
    pub grace_period: Duration,
    /// Then runtimes get this long to stop.
    pub timeout: Duration,
}

/// `access_log.format`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object a line.
    Json,
    /// nginx's `combined` line with Sluice's fields appended.
    Combined,
}

impl AccessLogFormat {
    /// The name in the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            AccessLogFormat::Json => "json",
            AccessLogFormat::Combined => "combined",
        }
    }
}

/// `access_log:`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// The file lines are appended to (reopened on SIGUSR1).
    pub path: PathBuf,
    /// The line format.
    pub format: AccessLogFormat,
    /// Write user ids as they are instead of a keyed hash.
    pub log_user: bool,
    /// The variable the hash key was read from; `None`: a random key
    /// per process.
    pub hash_key_env: Option<String>,
    /// The hash key read from `hash_key_env` when the config was loaded.
    pub hash_key: Option<crate::rules::Secret>,
    /// Lines that may wait for the writer before new ones are dropped.
    pub buffer: u32,
}

/// `log.format`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

impl LogFormat {
    /// The name in the config.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `log:`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// The line format of the gateway's own logs (stderr).
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: defaults::LOG_FORMAT,
        }
    }
}
