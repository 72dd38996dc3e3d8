//! The effective config as JSON for `GET /admin/v1/config`: every value
//! in force, defaults included, with secrets redacted (a password in the
//! Redis URL; tokens and JWT secrets are only ever named by their
//! environment variable, never read into the config).

use serde_json::{json, Value};

use super::{Config, OnFailure, StoreBackend};
use crate::rules::{FieldSource, KeyPart, RateKey};

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `redis://user:secret@host/0` -> `redis://user:***@host/0`; a socket's
/// `?pass=` (where redis-rs reads it) and anything before an `@` of a
/// string that is no URL at all are masked too.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // The last `@`: a raw `?` or `:` in a password stays on its left.
    let (userinfo, host) = match rest.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, rest),
    };
    let mut out = String::with_capacity(url.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***@");
            }
            None => out.push_str("***@"),
        }
    }
    match host.split_once('?') {
        Some((host, query)) => {
            out.push_str(host);
            out.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _))
                        if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                    {
                        format!("{k}=***")
                    }
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(host),
    }
    out
}

fn source(s: &FieldSource) -> Value {
    match s {
        FieldSource::Header(h) => json!({"header": h.as_str()}),
        FieldSource::Cookie(c) => json!({"cookie": c}),
        FieldSource::Query(q) => json!({"query": q}),
        FieldSource::Path(p) => json!({"path": p}),
        FieldSource::Json(j) => json!({"json": j}),
        FieldSource::Jwt {
            header,
            claim,
            secret_env,
            ..
        } => json!({"jwt": {"header": header.as_str(), "claim": claim, "secret_env": secret_env}}),
    }
}

/// The effective config, redacted.
pub fn view(c: &Config) -> Value {
    let upstreams: Vec<Value> = c
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "name": u.name,
                "servers": u.servers.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "max_inflight": u.max_inflight,
                "connect_timeout_ms": ms(u.connect_timeout),
                "read_timeout_ms": ms(u.read_timeout),
                "write_timeout_ms": ms(u.write_timeout),
                "idle_timeout_ms": ms(u.idle_timeout),
                "queue_claim_idle_ms": ms(u.queue_claim_idle),
                "health_check": u.health_check.as_ref().map(|h| json!({
                    "path": h.path, "interval_ms": ms(h.interval), "timeout_ms": ms(h.timeout),
                    "failures": h.failures, "successes": h.successes,
                })),
            })
        })
        .collect();
    let rules: Vec<Value> = c
        .rules
        .rules()
        .iter()
        .map(|r| {
            json!({
                "name": &*r.name,
                "match": {"method": r.method.as_str(), "path": r.path.as_str(),
                          "other_methods": r.other_methods.as_str(),
                          "variants": r.path.spelling().variants.as_str(),
                          "case": r.path.spelling().case.as_str(),
                          "trailing_slash": r.path.spelling().trailing_slash.as_str(),
                          "params": r.path.spelling().params.as_str(),
                          "suffix": r.path.spelling().suffix.as_str()},
                "user": source(&r.user),
                "sku": source(&r.sku),
                "quantity": {"source": r.quantity.source.as_ref().map(source), "default": r.quantity.default, "max": r.quantity.max},
                "window": {"start": r.window.start.map(|t| t.to_rfc3339()), "end": r.window.end.map(|t| t.to_rfc3339())},
                "rate_limits": r.rate_limits.iter().map(|l| json!({
                    "key": match l.key { RateKey::Ip => "ip", RateKey::User => "user", RateKey::Rule => "rule" },
                    "rate": l.rate.get(), "per_ms": ms(l.per), "burst": l.burst.get(),
                })).collect::<Vec<_>>(),
                "dedup": r.dedup.as_ref().map(|d| json!({"user": d.by_user, "sku": d.by_sku, "ttl_ms": ms(d.ttl)})),
                "per_user_limit": r.per_user_limit.map(|n| n.get()),
                "upstream": c.upstream(r.upstream).name,
                "queue": {"max_wait_ms": ms(r.queue.max_wait), "capacity": r.queue.capacity,
                          "max_attempts": r.queue.max_attempts, "backoff_ms": ms(r.queue.backoff)},
                "release_on": {"connect_error": r.release_on.connect_error, "timeout": r.release_on.timeout,
                               "5xx": r.release_on.status_5xx, "4xx": r.release_on.status_4xx},
                "source": format!("{}:{}", r.origin.0.display(), r.origin.1),
            })
        })
        .collect();
    let cache_rules: Vec<Value> = c
        .cache_rules
        .rules()
        .iter()
        .map(|r| {
            json!({
                "name": &*r.name,
                "match": {"method": r.method.as_str(), "path": r.path.as_str()},
                "ttl_ms": ms(r.ttl),
                "stale_while_revalidate_ms": ms(r.stale_while_revalidate),
                "stale_if_error_ms": ms(r.stale_if_error),
                "key": r.key.iter().map(|k| match k {
                    KeyPart::Path => "path".to_string(),
                    KeyPart::Query => "query".to_string(),
                    KeyPart::Header(h) => format!("header:{h}"),
                    KeyPart::Cookie(n) => format!("cookie:{n}"),
                }).collect::<Vec<_>>(),
                "max_body": r.max_body,
                "statuses": r.statuses,
                "lock_timeout_ms": ms(r.lock_timeout),
                "upstream": c.upstream(r.upstream).name,
                "source": format!("{}:{}", r.origin.0.display(), r.origin.1),
            })
        })
        .collect();
    json!({
        "source": c.source.display().to_string(),
        "listen": c.listen.to_string(),
        "admin": {"listen": c.admin.listen.to_string(), "token_env": c.admin.token_env,
                  "allow_remote_without_token": c.admin.allow_remote_without_token},
        "store": {
            "backend": match c.store.backend { StoreBackend::Memory => "memory", StoreBackend::Redis => "redis" },
            "redis": {"url": redact_url(&c.store.redis.url), "key_prefix": c.store.redis.key_prefix,
                      "timeout_ms": ms(c.store.redis.timeout)},
            "on_failure": match c.store.on_failure {
                OnFailure::FailClosed => json!("fail_closed"),
                OnFailure::PassCapped { cap } => json!({"pass_capped": cap}),
            },
            "recheck_interval_ms": ms(c.store.recheck_interval),
            "result_ttl_ms": ms(c.store.result_ttl),
        },
        "upstreams": upstreams,
        "default_upstream": c.upstream(c.default_upstream).name,
        "rule_globs": c.rule_globs,
        "rules": rules,
        "trusted_proxies": c.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "limits": {"max_header_bytes": c.limits.max_header_bytes, "max_rule_body_bytes": c.limits.max_rule_body_bytes,
                   "max_body_bytes": c.limits.max_body_bytes,
                   // null: derived from the file-descriptor limit at start.
                   "max_connections": c.limits.max_connections,
                   "header_timeout_ms": ms(c.limits.header_timeout),
                   "keepalive_timeout_ms": ms(c.limits.keepalive_timeout)},
        "shutdown": {"grace_period_ms": ms(c.shutdown.grace_period), "timeout_ms": ms(c.shutdown.timeout)},
        "threads": c.threads,
        "h2c": c.h2c,
        "upgrade_socket": c.upgrade_socket.display().to_string(),
        // Paths only: the key's contents are never shown.
        "tls": c.tls.as_ref().map(|t| json!({"listen": t.listen.to_string(),
                  "cert": t.cert.display().to_string(), "key": t.key.display().to_string()})),
        "routes": c.routes.iter().map(|r| json!({
            "match": {"host": r.host, "path_prefix": r.path_prefix},
            "upstream": c.upstream(r.upstream).name,
        })).collect::<Vec<_>>(),
        // The hash key itself is never shown, only where it comes from.
        "access_log": c.access_log.as_ref().map(|a| json!({
            "path": a.path.display().to_string(), "format": a.format.as_str(),
            "log_user": a.log_user, "hash_key_env": a.hash_key_env, "buffer": a.buffer,
        })),
        "log": {"format": c.log.format.as_str()},
        "cache": {"max_bytes": c.cache.max_bytes, "redis": c.cache.redis,
                  "session_cookies": c.cache.session_cookies, "rules": cache_rules},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1/0"),
            "redis://:***@10.0.0.1/0"
        );
        assert_eq!(
            redact_url("rediss://app:s3cret@redis/1"),
            "rediss://app:***@redis/1"
        );
        assert_eq!(redact_url("redis://token@redis/1"), "redis://***@redis/1");
        assert_eq!(redact_url("not a url"), "not a url");
        // redis-rs reads a socket's password from the query.
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("unix:/s.sock?password=s3cret"),
            "unix:/s.sock?password=***"
        );
        // Misspelt schemes still hide what sits before the `@`.
        assert_eq!(redact_url("redis:/app:s3cret@host/0"), "redis:***@host/0");
        assert_eq!(
            redact_url("redis://:pa?ss@host/0?pass=x"),
            "redis://:***@host/0?pass=***"
        );
    }
}
