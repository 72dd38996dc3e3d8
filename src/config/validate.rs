//! Turns the raw `gateway.yaml` into the typed [`Config`], collecting every
//! problem with its location.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde_saphyr::{Location, Spanned};

use super::error::Problems;
use super::model::{
    defaults, is_loopback, AdminConfig, CacheConfig, Config, HealthCheckConfig, Limits, OnFailure,
    RedisConfig, ShutdownConfig, StoreBackend, StoreConfig, UpstreamConfig,
};
use super::raw::{RawGateway, RawUpstream};
use super::units::ConfigDuration;
use crate::rules::{CacheRules, RuleSet};
use crate::vocab::UpstreamId;

fn socket_addr(p: &mut Problems, field: &str, v: &Spanned<String>) -> Option<SocketAddr> {
    p.check(
        v.referenced,
        v.value.parse::<SocketAddr>().map_err(|_| {
            format!(
                "{field}: {:?} is not an ip:port address like 127.0.0.1:8080 (host names are not resolved)",
                v.value
            )
        }),
    )
}

fn positive(p: &mut Problems, field: &str, v: &Spanned<i64>) -> Option<u32> {
    let n = u32::try_from(v.value).ok().filter(|n| *n > 0);
    if n.is_none() {
        p.add(
            v.referenced,
            format!(
                "{field}: {} must be a whole number from 1 to {}",
                v.value,
                u32::MAX
            ),
        );
    }
    n
}

/// The largest rule-matched body pingora can hold for forwarding.
const RULE_BODY_CEILING: u64 = 64 << 10;

/// A positive duration, or the default (recording a zero as a problem).
fn duration(
    p: &mut Problems,
    field: &str,
    key: &str,
    v: &Option<Spanned<ConfigDuration>>,
    default: Duration,
) -> Duration {
    let Some(v) = v else { return default };
    match p.duration(&format!("{field}.{key}"), v) {
        Some(d) if d.is_zero() => {
            p.add(v.referenced, format!("{field}.{key}: must be above 0"));
            default
        }
        Some(d) => d,
        None => default,
    }
}

fn upstream_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn upstream(p: &mut Problems, name: &str, raw: &Spanned<RawUpstream>) -> Option<UpstreamConfig> {
    let u = &raw.value;
    let before = p.count();
    let field = format!("upstreams.{name}");
    if !upstream_name_ok(name) {
        p.add(
            raw.referenced,
            format!(
                "{field}: the name must be 1-64 characters of letters, digits, '-', '_' or '.'"
            ),
        );
    }
    let mut servers: Vec<SocketAddr> = Vec::new();
    if let Some(list) = p.required(raw.referenced, &format!("{field}.servers"), &u.servers) {
        for (i, s) in list.value.iter().enumerate() {
            if let Some(addr) = socket_addr(p, &format!("{field}.servers[{i}]"), s) {
                if servers.contains(&addr) {
                    p.add(
                        s.referenced,
                        format!("{field}.servers[{i}]: {addr} is listed twice"),
                    );
                }
                servers.push(addr);
            }
        }
        if list.value.is_empty() {
            p.add(
                list.referenced,
                format!("{field}.servers: needs at least one server"),
            );
        }
    }
    let max_inflight = match &u.max_inflight {
        Some(m) => positive(p, &format!("{field}.max_inflight"), m).unwrap_or(1),
        None => defaults::MAX_INFLIGHT,
    };
    let connect_timeout = duration(
        p,
        &field,
        "connect_timeout",
        &u.connect_timeout,
        defaults::CONNECT_TIMEOUT,
    );
    let read_timeout = duration(
        p,
        &field,
        "read_timeout",
        &u.read_timeout,
        defaults::READ_TIMEOUT,
    );
    let write_timeout = duration(
        p,
        &field,
        "write_timeout",
        &u.write_timeout,
        defaults::WRITE_TIMEOUT,
    );
    let idle_timeout = duration(
        p,
        &field,
        "idle_timeout",
        &u.idle_timeout,
        defaults::IDLE_TIMEOUT,
    );
    let health_check = match &u.health_check {
        None => None,
        Some(hc) => {
            let h = &hc.value;
            if !h.path.value.starts_with('/') {
                p.add(
                    h.path.referenced,
                    format!(
                        "{field}.health_check.path: {:?} must start with '/'",
                        h.path.value
                    ),
                );
            }
            let interval = duration(
                p,
                &field,
                "health_check.interval",
                &h.interval,
                defaults::HEALTH_INTERVAL,
            );
            let check_timeout = duration(
                p,
                &field,
                "health_check.timeout",
                &h.timeout,
                defaults::HEALTH_TIMEOUT,
            );
            let failures = h
                .failures
                .as_ref()
                .and_then(|f| positive(p, &format!("{field}.health_check.failures"), f))
                .unwrap_or(1);
            let successes = h
                .successes
                .as_ref()
                .and_then(|s| positive(p, &format!("{field}.health_check.successes"), s))
                .unwrap_or(1);
            Some(HealthCheckConfig {
                path: h.path.value.clone(),
                interval,
                timeout: check_timeout,
                failures,
                successes,
            })
        }
    };
    // Above the longest a live node can take to serve a queued request
    // (three tries of connect + read), so a slow node is not mistaken for
    // a dead one.
    let default_claim_idle = (connect_timeout + read_timeout) * 3 + Duration::from_secs(5);
    let queue_claim_idle = duration(
        p,
        &field,
        "queue_claim_idle",
        &u.queue_claim_idle,
        default_claim_idle,
    );
    // One try of the drainer waits at most connect + read (headers) +
    // read (body); a node is also kept alive by heartbeats, but a claim
    // time shorter than one try would hand over entries mid-send.
    let one_try = connect_timeout + read_timeout * 2;
    if queue_claim_idle <= one_try {
        if let Some(c) = &u.queue_claim_idle {
            p.add(
                c.referenced,
                format!(
                    "{field}.queue_claim_idle: must be above connect_timeout + 2 x read_timeout ({one_try:?})"
                ),
            );
        }
    }
    if p.count() > before {
        return None;
    }
    Some(UpstreamConfig {
        queue_claim_idle,
        name: name.to_string(),
        servers,
        max_inflight,
        connect_timeout,
        read_timeout,
        write_timeout,
        idle_timeout,
        health_check,
    })
}

fn store(p: &mut Problems, raw: &RawGateway) -> StoreConfig {
    let mut out = StoreConfig {
        backend: StoreBackend::Memory,
        redis: RedisConfig::default(),
        on_failure: OnFailure::FailClosed,
        pass_cap: defaults::PASS_CAP,
        recheck_interval: defaults::RECHECK_INTERVAL,
        result_ttl: defaults::RESULT_TTL,
        lease_margin: defaults::LEASE_MARGIN,
        in_doubt_for: defaults::IN_DOUBT_FOR,
        sweep_interval: defaults::SWEEP_INTERVAL,
        journal: config_dir(p.file()).join(defaults::JOURNAL),
    };
    let Some(s) = &raw.store else { return out };
    let s = &s.value;
    out.lease_margin = duration(
        p,
        "store",
        "lease_margin",
        &s.lease_margin,
        out.lease_margin,
    );
    out.in_doubt_for = duration(
        p,
        "store",
        "in_doubt_for",
        &s.in_doubt_for,
        out.in_doubt_for,
    );
    out.sweep_interval = duration(
        p,
        "store",
        "sweep_interval",
        &s.sweep_interval,
        out.sweep_interval,
    );
    if out.sweep_interval.is_zero() {
        if let Some(at) = &s.sweep_interval {
            p.add(at.referenced, "store.sweep_interval: must be more than 0s");
        }
        out.sweep_interval = defaults::SWEEP_INTERVAL;
    }
    if let Some(j) = &s.journal {
        if j.value.trim().is_empty() {
            p.add(j.referenced, "store.journal: must not be empty");
        } else {
            out.journal = config_dir(p.file()).join(&j.value);
        }
    }
    out.recheck_interval = duration(
        p,
        "store",
        "recheck_interval",
        &s.recheck_interval,
        out.recheck_interval,
    );
    out.result_ttl = duration(p, "store", "result_ttl", &s.result_ttl, out.result_ttl);
    if let Some(b) = &s.backend {
        match b.value.as_str() {
            "memory" => out.backend = StoreBackend::Memory,
            "redis" => out.backend = StoreBackend::Redis,
            other => p.add(
                b.referenced,
                format!("store.backend: {other:?} is not one of memory, redis"),
            ),
        }
    }
    if let Some(r) = &s.redis {
        let r = &r.value;
        if let Some(url) = &r.url {
            let scheme_ok = ["redis://", "redis+unix://", "unix://"]
                .iter()
                .any(|s| url.value.starts_with(s));
            // Shown without its password, as everywhere else.
            let shown = super::view::redact_url(&url.value);
            if scheme_ok {
                out.redis.url = url.value.clone();
            } else if url.value.starts_with("rediss://") {
                // The store's connections speak plain RESP (redis-rs is
                // built without TLS): said here, at its line, rather than
                // by `run` failing to start.
                p.add(
                    url.referenced,
                    format!(
                        "store.redis.url: {shown:?}: TLS to Redis (rediss://) is not supported; \
                         use redis:// on a private network or a unix:// socket"
                    ),
                );
            } else {
                p.add(
                    url.referenced,
                    format!(
                        "store.redis.url: {shown:?} must start with redis://, unix:// or redis+unix://"
                    ),
                );
            }
        }
        if let Some(prefix) = &r.key_prefix {
            if prefix.value.contains(['{', '}']) {
                // Braces would break the per-(rule, sku) hash tags.
                p.add(
                    prefix.referenced,
                    "store.redis.key_prefix: must not contain '{' or '}'",
                );
            } else {
                out.redis.key_prefix = prefix.value.clone();
            }
        }
        out.redis.timeout = duration(p, "store.redis", "timeout", &r.timeout, out.redis.timeout);
        out.redis.admin_timeout = duration(
            p,
            "store.redis",
            "admin_timeout",
            &r.admin_timeout,
            out.redis.admin_timeout,
        );
        if let Some(n) = &r.breaker_failures {
            if let Some(n) = positive(p, "store.redis.breaker_failures", n) {
                out.redis.breaker_failures = n;
            }
        }
        out.redis.breaker_interval = duration(
            p,
            "store.redis",
            "breaker_interval",
            &r.breaker_interval,
            out.redis.breaker_interval,
        );
    }
    let cap = match &s.pass_cap {
        Some(c) => positive(p, "store.pass_cap", c).unwrap_or(defaults::PASS_CAP),
        None => defaults::PASS_CAP,
    };
    out.pass_cap = cap;
    if let Some(f) = &s.on_failure {
        match f.value.as_str() {
            "fail_closed" => out.on_failure = OnFailure::FailClosed,
            "pass_capped" => out.on_failure = OnFailure::PassCapped { cap },
            other => p.add(
                f.referenced,
                format!("store.on_failure: {other:?} is not one of fail_closed, pass_capped"),
            ),
        }
    }
    out
}

/// Validates everything in `gateway.yaml` except the rule files.
pub fn gateway(p: &mut Problems, raw: &RawGateway) -> Option<Config> {
    let before = p.count();
    let listen = p
        .required(Location::UNKNOWN, "listen", &raw.listen)
        .and_then(|l| socket_addr(p, "listen", l));
    let admin = {
        let a = raw.admin.as_ref().map(|a| &a.value);
        let listen = match a.and_then(|a| a.listen.as_ref()) {
            Some(l) => socket_addr(p, "admin.listen", l),
            None => defaults::ADMIN_LISTEN.parse().ok(),
        };
        let token_env = a.and_then(|a| a.token_env.as_ref()).and_then(|t| {
            if t.value.trim().is_empty() {
                p.add(
                    t.referenced,
                    "admin.token_env: must name an environment variable",
                );
                None
            } else {
                Some(t.value.clone())
            }
        });
        let allow_remote_without_token = a
            .and_then(|a| a.allow_remote_without_token.as_ref())
            .is_some_and(|v| v.value);
        // An admin API anyone on the network can reach, with no token,
        // lets anyone set stock or release tickets: refuse it unless the
        // operator said so in as many words.
        if let (Some(l), None, false) = (listen, &token_env, allow_remote_without_token) {
            if !is_loopback(l) {
                let at = a
                    .and_then(|a| a.listen.as_ref())
                    .map_or(Location::UNKNOWN, |l| l.referenced);
                p.add(
                    at,
                    format!(
                        "admin.listen: {l} is not a loopback address and admin.token_env is not set, so anyone who reaches it could change stock; set admin.token_env, listen on 127.0.0.1, or set admin.allow_remote_without_token: true"
                    ),
                );
            }
        }
        listen.map(|listen| AdminConfig {
            listen,
            token_env,
            allow_remote_without_token,
        })
    };
    if let (Some(l), Some(a)) = (listen, &admin) {
        if l == a.listen {
            let at = raw
                .admin
                .as_ref()
                .and_then(|a| a.value.listen.as_ref())
                .or(raw.listen.as_ref())
                .map_or(Location::UNKNOWN, |l| l.referenced);
            p.add(
                at,
                format!("admin.listen: {l} is also the main listen address"),
            );
        }
    }
    let store = store(p, raw);

    let mut names = Vec::new();
    let mut upstreams = Vec::new();
    if let Some(ups) = p.required(Location::UNKNOWN, "upstreams", &raw.upstreams) {
        for (name, u) in &ups.value {
            names.push(name.clone());
            if let Some(u) = upstream(p, name, u) {
                upstreams.push(u);
            }
        }
        if ups.value.is_empty() {
            p.add(ups.referenced, "upstreams: needs at least one upstream");
        }
    }
    let default_upstream = p
        .required(Location::UNKNOWN, "default_upstream", &raw.default_upstream)
        .and_then(|d| {
            let found = names.iter().position(|n| *n == d.value);
            if found.is_none() && !names.is_empty() {
                p.add(
                    d.referenced,
                    format!(
                        "default_upstream: {:?} is not defined under upstreams (defined: {})",
                        d.value,
                        names.join(", ")
                    ),
                );
            }
            found
        });

    let rule_globs = raw
        .rules
        .as_ref()
        .map(|g| g.value.0.clone())
        .unwrap_or_default();
    if let Some(g) = &raw.rules {
        if rule_globs.iter().any(|s| s.trim().is_empty()) {
            p.add(g.referenced, "rules: a glob must not be empty");
        }
    }

    let mut trusted_proxies = Vec::new();
    for (i, c) in raw.trusted_proxies.iter().enumerate() {
        // A bare address means that one host.
        let parsed = c
            .value
            .parse::<IpNet>()
            .or_else(|_| c.value.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => p.add(
                c.referenced,
                format!(
                    "trusted_proxies[{i}]: {:?} is not a CIDR like 10.0.0.0/8",
                    c.value
                ),
            ),
        }
    }

    let mut limits = Limits {
        max_header_bytes: defaults::MAX_HEADER_BYTES,
        max_rule_body_bytes: defaults::MAX_RULE_BODY_BYTES,
        max_body_bytes: defaults::MAX_BODY_BYTES,
        max_connections: None,
        header_timeout: defaults::HEADER_TIMEOUT,
        keepalive_timeout: defaults::KEEPALIVE_TIMEOUT,
    };
    if let Some(l) = &raw.limits {
        limits.max_connections = l
            .max_connections
            .as_ref()
            .and_then(|m| positive(p, "limits.max_connections", m));
        limits.header_timeout = duration(
            p,
            "limits",
            "header_timeout",
            &l.header_timeout,
            limits.header_timeout,
        );
        limits.keepalive_timeout = duration(
            p,
            "limits",
            "keepalive_timeout",
            &l.keepalive_timeout,
            limits.keepalive_timeout,
        );
        // pingora buffers a rule-matched body in its 64 KiB retry buffer,
        // which is how the body reaches the backend after admission.
        if let Some(v) = &l.max_rule_body_bytes {
            if matches!(v.value.0, Ok(n) if n > RULE_BODY_CEILING) {
                p.add(
                    v.referenced,
                    format!("limits.max_rule_body_bytes: at most {RULE_BODY_CEILING} (64KiB)"),
                );
            }
        }
        for (field, v, slot) in [
            (
                "limits.max_header_bytes",
                &l.max_header_bytes,
                &mut limits.max_header_bytes,
            ),
            (
                "limits.max_rule_body_bytes",
                &l.max_rule_body_bytes,
                &mut limits.max_rule_body_bytes,
            ),
            (
                "limits.max_body_bytes",
                &l.max_body_bytes,
                &mut limits.max_body_bytes,
            ),
        ] {
            if let Some(v) = v {
                match p.size(field, v) {
                    Some(0) => p.add(v.referenced, format!("{field}: must be above 0")),
                    Some(n) => *slot = n,
                    None => {}
                }
            }
        }
    }

    let mut shutdown = ShutdownConfig {
        grace_period: defaults::GRACE_PERIOD,
        timeout: defaults::SHUTDOWN_TIMEOUT,
    };
    if let Some(s) = &raw.shutdown {
        // Zero is allowed here: no grace, or no wait for the runtimes.
        if let Some(g) = &s.grace_period {
            shutdown.grace_period = p
                .duration("shutdown.grace_period", g)
                .unwrap_or(shutdown.grace_period);
        }
        if let Some(t) = &s.timeout {
            shutdown.timeout = p
                .duration("shutdown.timeout", t)
                .unwrap_or(shutdown.timeout);
        }
    }

    let tls = super::tls::tls(
        p,
        raw,
        &[
            ("main listen", listen),
            ("admin.listen", admin.as_ref().map(|a| a.listen)),
        ],
    );
    let routes = super::routes::routes(p, raw, &names);

    let threads = match &raw.threads {
        Some(t) => positive(p, "threads", t).map_or(1, |n| n as usize),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };

    let upgrade_socket = match &raw.upgrade_socket {
        Some(s) => {
            let path = config_dir(p.file()).join(&s.value);
            // sockaddr_un holds 107 bytes of path and a NUL.
            let len = path.as_os_str().len();
            if s.value.is_empty() || len > 107 {
                p.add(
                    s.referenced,
                    format!(
                        "upgrade_socket: {:?} must name a Unix socket path of 1 to 107 bytes \
                         ({len} bytes from the config's folder)",
                        s.value
                    ),
                );
                None
            } else {
                Some(path)
            }
        }
        None => listen.map(|l| defaults::upgrade_socket(l.port())),
    };
    let cache = cache(p, raw);

    if p.count() > before {
        return None;
    }
    Some(Config {
        source: p.file().to_path_buf(),
        listen: listen?,
        admin: admin?,
        store,
        upstreams,
        default_upstream: UpstreamId(default_upstream?),
        rule_globs,
        rules: RuleSet::default(),
        trusted_proxies,
        limits,
        shutdown,
        threads,
        h2c: raw.h2c.unwrap_or(false),
        upgrade_socket: upgrade_socket?,
        tls,
        routes,
        // Set by `logs`, which also reads the hash key's variable.
        access_log: None,
        log: Default::default(),
        cache,
        cache_rules: CacheRules::default(),
    })
}

/// `cache:`: the memory bound, the Redis tier and the session cookies.
fn cache(p: &mut Problems, raw: &RawGateway) -> CacheConfig {
    let mut out = CacheConfig::default();
    let Some(c) = &raw.cache else {
        return out;
    };
    if let Some(m) = &c.value.max_bytes {
        match p.size("cache.max_bytes", m) {
            Some(0) => p.add(m.referenced, "cache.max_bytes: must be above 0"),
            // moka weighs entries in u32 and sums them in u64: any u64 fits.
            Some(n) => out.max_bytes = n,
            None => {}
        }
    }
    if let Some(r) = &c.value.redis {
        out.redis = r.value;
    }
    if let Some(list) = &c.value.session_cookies {
        out.session_cookies.clear();
        for (i, name) in list.value.iter().enumerate() {
            let n = name.value.trim();
            let token = !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
            if token {
                out.session_cookies.push(n.to_string());
            } else {
                p.add(
                    name.referenced,
                    format!(
                        "cache.session_cookies[{i}]: {:?} is not a cookie name",
                        name.value
                    ),
                );
            }
        }
    }
    out
}

/// The folder rule globs are relative to.
pub fn config_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}
