//! Which keys a reload can change and which need a restart: a listener,
//! the store, thread counts and the set of upstreams are built once at
//! start, so a reload that changes them is refused as a whole rather than
//! half applied.
//!
//! Reloadable: every rule file (and the `rules:` globs), the upstreams'
//! `servers` and timeouts, `default_upstream`, `routes`,
//! `trusted_proxies`, the cache rules of the rule files, and the TLS
//! certificate and key (re-read). The TLS listener, the access log, the
//! gateway's own log and the cache's tiers are made at start too: a
//! reload that changes them is refused, not reported applied.

use super::{Config, StoreConfig, UpstreamConfig};

/// One key whose change needs a restart: its path and the two values.
fn changed<T: PartialEq + std::fmt::Debug>(out: &mut Vec<String>, key: &str, old: &T, new: &T) {
    if old != new {
        out.push(format!(
            "{key} changed ({old:?} -> {new:?}): it needs a restart"
        ));
    }
}

/// The upstream keys a reload cannot change (its slots and health check
/// are built at start).
fn upstream(out: &mut Vec<String>, old: &UpstreamConfig, new: &UpstreamConfig) {
    let key = |k: &str| format!("upstreams.{}.{k}", old.name);
    changed(
        out,
        &key("max_inflight"),
        &old.max_inflight,
        &new.max_inflight,
    );
    changed(
        out,
        &key("health_check"),
        &old.health_check,
        &new.health_check,
    );
    changed(
        out,
        &key("queue_claim_idle"),
        &old.queue_claim_idle,
        &new.queue_claim_idle,
    );
}

/// The store is connected to once; its URL may hold a password, so it
/// is named, never shown.
fn store(out: &mut Vec<String>, old: &StoreConfig, new: &StoreConfig) {
    if old.redis.url != new.redis.url {
        out.push("store.redis.url changed: it needs a restart".into());
    }
    let (o, n) = (&old.redis, &new.redis);
    changed(out, "store.backend", &old.backend, &new.backend);
    changed(out, "store.redis.key_prefix", &o.key_prefix, &n.key_prefix);
    changed(out, "store.redis.timeout", &o.timeout, &n.timeout);
    changed(
        out,
        "store.redis.admin_timeout",
        &o.admin_timeout,
        &n.admin_timeout,
    );
    changed(
        out,
        "store.redis.breaker_failures",
        &o.breaker_failures,
        &n.breaker_failures,
    );
    changed(
        out,
        "store.redis.breaker_interval",
        &o.breaker_interval,
        &n.breaker_interval,
    );
    changed(out, "store.on_failure", &old.on_failure, &new.on_failure);
    changed(out, "store.pass_cap", &old.pass_cap, &new.pass_cap);
    changed(
        out,
        "store.recheck_interval",
        &old.recheck_interval,
        &new.recheck_interval,
    );
    changed(out, "store.result_ttl", &old.result_ttl, &new.result_ttl);
    changed(
        out,
        "store.lease_margin",
        &old.lease_margin,
        &new.lease_margin,
    );
    changed(
        out,
        "store.in_doubt_for",
        &old.in_doubt_for,
        &new.in_doubt_for,
    );
    changed(
        out,
        "store.sweep_interval",
        &old.sweep_interval,
        &new.sweep_interval,
    );
    changed(out, "store.journal", &old.journal, &new.journal);
}

/// Why `new` cannot be put in force by a reload of `old`: one line per
/// key that needs a restart; empty when the reload can go ahead.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    changed(&mut out, "listen", &old.listen, &new.listen);
    changed(&mut out, "admin", &old.admin, &new.admin);
    store(&mut out, &old.store, &new.store);
    changed(&mut out, "limits", &old.limits, &new.limits);
    changed(&mut out, "shutdown", &old.shutdown, &new.shutdown);
    changed(&mut out, "threads", &old.threads, &new.threads);
    changed(&mut out, "h2c", &old.h2c, &new.h2c);
    changed(
        &mut out,
        "upgrade_socket",
        &old.upgrade_socket,
        &new.upgrade_socket,
    );
    // The certificate and key are read again; the listener is not.
    let tls_listen = |c: &Config| c.tls.as_ref().map(|t| t.listen);
    changed(&mut out, "tls.listen", &tls_listen(old), &tls_listen(new));
    // Its hash key is compared, never shown (`Secret` prints redacted).
    changed(&mut out, "access_log", &old.access_log, &new.access_log);
    changed(&mut out, "log", &old.log, &new.log);
    changed(&mut out, "cache", &old.cache, &new.cache);
    let names = |c: &Config| {
        c.upstreams
            .iter()
            .map(|u| u.name.clone())
            .collect::<Vec<_>>()
    };
    if names(old) != names(new) {
        changed(
            &mut out,
            "upstreams (the set of names)",
            &names(old),
            &names(new),
        );
    } else {
        for (o, n) in old.upstreams.iter().zip(&new.upstreams) {
            upstream(&mut out, o, n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{AccessLogConfig, AccessLogFormat};
    use super::*;

    fn config() -> Config {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("gateway.yaml");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).unwrap_or_else(|e| panic!("{e}"));
        };
        write(
            "gateway.yaml",
            "listen: 127.0.0.1:8080\nupstreams:\n  mall:\n    servers: [127.0.0.1:9000]\n\
             default_upstream: mall\nrules: rules.yaml\n",
        );
        write(
            "rules.yaml",
            "rules:\n  - name: r\n    match: { method: POST, path: \"/buy/{sku}\" }\n\
             \x20   user: { header: X-User-Id }\n    sku: { path: sku }\n",
        );
        super::super::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn reloadable_keys_pass_and_restart_keys_are_named_without_secrets() {
        let old = config();
        let mut new = old.clone();
        new.upstreams[0]
            .servers
            .push("127.0.0.1:9001".parse().unwrap_or_else(|e| panic!("{e}")));
        new.upstreams[0].read_timeout *= 2;
        new.trusted_proxies.clear();
        assert!(needs_restart(&old, &new).is_empty());

        new.listen = "127.0.0.1:8081".parse().unwrap_or_else(|e| panic!("{e}"));
        new.store.redis.url = "redis://:hunter2@127.0.0.1:6390/0".into();
        new.upstreams[0].max_inflight += 1;
        let why = needs_restart(&old, &new);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[0].starts_with("listen changed (127.0.0.1:8080 -> 127.0.0.1:8081)"));
        assert!(why
            .iter()
            .any(|w| w == "store.redis.url changed: it needs a restart"));
        assert!(why
            .iter()
            .any(|w| w.starts_with("upstreams.mall.max_inflight changed (64 -> 65)")));
        assert!(!why.join(" ").contains("hunter2"));
    }

    #[test]
    fn the_tls_listener_the_logs_and_the_cache_tiers_need_a_restart() {
        let old = config();
        let tls = super::super::TlsConfig {
            listen: "127.0.0.1:8443".parse().unwrap_or_else(|e| panic!("{e}")),
            cert: "cert.pem".into(),
            key: "key.pem".into(),
        };
        let refused = |change: &dyn Fn(&mut Config), key: &str| {
            let mut new = old.clone();
            change(&mut new);
            let why = needs_restart(&old, &new);
            assert_eq!(why.len(), 1, "{key}: {why:?}");
            assert!(why[0].starts_with(&format!("{key} changed")), "{why:?}");
        };
        refused(&|c| c.tls = Some(tls.clone()), "tls.listen");
        refused(&|c| c.log.format = super::super::LogFormat::Json, "log");
        refused(&|c| c.cache.max_bytes += 1, "cache");
        refused(&|c| c.cache.redis = !c.cache.redis, "cache");
        refused(
            &|c| {
                c.access_log = Some(AccessLogConfig {
                    path: "access.log".into(),
                    format: AccessLogFormat::Json,
                    log_user: false,
                    hash_key_env: None,
                    hash_key: None,
                    buffer: 1024,
                })
            },
            "access_log",
        );

        // With TLS on both sides, a new certificate or key is re-read; a
        // new listener is not.
        let mut with = old.clone();
        with.tls = Some(tls.clone());
        let mut new = with.clone();
        if let Some(t) = new.tls.as_mut() {
            t.cert = "other.pem".into();
            t.key = "other-key.pem".into();
        }
        assert!(needs_restart(&with, &new).is_empty());
        if let Some(t) = new.tls.as_mut() {
            t.listen = "127.0.0.1:9443".parse().unwrap_or_else(|e| panic!("{e}"));
        }
        let why = needs_restart(&with, &new);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("127.0.0.1:8443") && why[0].contains("127.0.0.1:9443"));
    }
}
