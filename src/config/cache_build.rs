//! Validation of one raw read-cache rule (`cache:` in a rule file) into a
//! [`CacheRule`], recording every problem with its location. Field names
//! in messages are prefixed `cache.` so they read apart from flash-sale
//! rules in the same file.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use serde_saphyr::Spanned;

use super::error::Problems;
use super::rule_build::{check_name, RuleContext};
use super::rule_raw::RawCacheRule;
use crate::rules::{CacheRule, Fold, KeyPart, PathTemplate, Spelling, Variants};
use crate::vocab::UpstreamId;

/// Defaults for keys a cache rule leaves out, in one place.
pub mod defaults {
    use std::time::Duration;
    /// `stale_while_revalidate`, `stale_if_error`: no stale answers.
    pub const STALE: Duration = Duration::ZERO;
    /// `max_body`: 256 KiB, a product page with room to spare.
    pub const MAX_BODY: u64 = 256 << 10;
    /// `lock_timeout`: as nginx's `proxy_cache_lock_timeout`.
    pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);
}

/// The largest `max_body`: answers are held whole in memory while they are
/// fetched and served.
pub const MAX_BODY_CEILING: u64 = 64 << 20;

/// Cache rules match exactly: every spelling difference is another path.
const EXACT: Spelling = Spelling {
    variants: Variants::Forward,
    case: Fold::Strict,
    trailing_slash: Fold::Strict,
    params: Fold::Strict,
    suffix: Fold::Strict,
};

/// Builds a cache rule, or records its problems and gives `None`.
pub fn build_cache_rule(
    raw: &Spanned<RawCacheRule>,
    ctx: &RuleContext,
    p: &mut Problems,
) -> Option<CacheRule> {
    let r = &raw.value;
    let errors_before = p.count();
    let at = raw.referenced;
    let matcher = p.required(at, "match", &r.matcher);
    let method = matcher.and_then(|m| {
        let text = m.value.method.value.as_str();
        if text == "GET" {
            Some(Method::GET)
        } else {
            p.add(
                m.value.method.referenced,
                format!("cache.match.method: {text:?} is not cached: only GET is"),
            );
            None
        }
    });
    let path = matcher.and_then(|m| {
        p.check(
            m.value.path.referenced,
            PathTemplate::parse(&m.value.path.value)
                .map(|t| t.with_spelling(EXACT))
                .map_err(|e| format!("cache.match.path: {e}")),
        )
    });
    // Unnamed rules are labelled by their path template, unique since
    // overlapping rules are refused.
    let name = match &r.name {
        Some(n) => check_name(p, n),
        None => matcher.map(|m| Arc::from(m.value.path.value.as_str())),
    };
    let ttl = p.required(at, "ttl", &r.ttl).and_then(|t| {
        let d = p.duration("cache.ttl", t)?;
        if d.is_zero() {
            p.add(t.referenced, "cache.ttl: must be above 0");
            return None;
        }
        Some(d)
    });
    let mut window = |field: &str, v: &Option<Spanned<_>>, default: Duration| match v {
        Some(v) => p.duration(field, v).unwrap_or(default),
        None => default,
    };
    let stale_while_revalidate = window(
        "cache.stale_while_revalidate",
        &r.stale_while_revalidate,
        defaults::STALE,
    );
    let stale_if_error = window("cache.stale_if_error", &r.stale_if_error, defaults::STALE);
    let lock_timeout = window(
        "cache.lock_timeout",
        &r.lock_timeout,
        defaults::LOCK_TIMEOUT,
    );
    let key = key(p, r);
    let max_body = match &r.max_body {
        None => Some(defaults::MAX_BODY),
        Some(m) => match p.size("cache.max_body", m) {
            Some(n) if (1..=MAX_BODY_CEILING).contains(&n) => Some(n),
            Some(n) => {
                p.add(
                    m.referenced,
                    format!("cache.max_body: {n} must be from 1 to {MAX_BODY_CEILING} (64MiB)"),
                );
                None
            }
            None => None,
        },
    };
    let statuses = r.statuses.as_ref().map(|list| {
        let mut out = Vec::new();
        for (i, s) in list.value.iter().enumerate() {
            match u16::try_from(s.value)
                .ok()
                .filter(|c| (200..=599).contains(c))
            {
                Some(206) => p.add(
                    s.referenced,
                    format!("cache.statuses[{i}]: 206 (a partial answer) is never cached"),
                ),
                Some(c) => out.push(c),
                None => p.add(
                    s.referenced,
                    format!(
                        "cache.statuses[{i}]: {} is not an HTTP status from 200 to 599",
                        s.value
                    ),
                ),
            }
        }
        if list.value.is_empty() {
            p.add(list.referenced, "cache.statuses: list at least one status");
        }
        out
    });
    let upstream = match &r.upstream {
        None => Some(ctx.default_upstream),
        Some(name) => {
            let found = ctx.upstreams.iter().position(|u| *u == name.value);
            if found.is_none() {
                p.add(
                    name.referenced,
                    format!(
                        "cache.upstream: {:?} is not defined under upstreams (defined: {})",
                        name.value,
                        ctx.upstreams.join(", ")
                    ),
                );
            }
            found.map(UpstreamId)
        }
    };
    if p.count() > errors_before {
        return None;
    }
    Some(CacheRule {
        name: name?,
        method: method?,
        path: path?,
        ttl: ttl?,
        stale_while_revalidate,
        stale_if_error,
        key: key?,
        max_body: max_body?,
        statuses,
        lock_timeout,
        upstream: upstream?,
        origin: (p.file().to_path_buf(), raw.referenced.line() as u32),
    })
}

/// `key:`: `path` (required), `query`, `header:<name>`, `cookie:<name>`;
/// `[path, query]` when left out. The path goes first whatever the order
/// written (purges go by path prefix).
fn key(p: &mut Problems, r: &RawCacheRule) -> Option<Vec<KeyPart>> {
    let Some(list) = &r.key else {
        return Some(vec![KeyPart::Path, KeyPart::Query]);
    };
    let before = p.count();
    let mut parts = vec![KeyPart::Path];
    let mut has_path = false;
    for item in &list.value {
        let text = item.value.trim();
        let part = match text.split_once(':') {
            None if text == "path" => {
                if has_path {
                    p.add(item.referenced, "cache.key: \"path\" is listed twice");
                }
                has_path = true;
                continue;
            }
            None if text == "query" => Some(KeyPart::Query),
            Some(("header", name)) => match HeaderName::from_bytes(name.trim().as_bytes()) {
                Ok(h) => Some(KeyPart::Header(h)),
                Err(_) => {
                    p.add(
                        item.referenced,
                        format!("cache.key: {name:?} is not a valid header name"),
                    );
                    None
                }
            },
            Some(("cookie", name)) if !name.trim().is_empty() => {
                Some(KeyPart::Cookie(name.trim().to_string()))
            }
            _ => {
                p.add(
                    item.referenced,
                    format!(
                        "cache.key: {text:?} is not one of path, query, header:<name>, cookie:<name>"
                    ),
                );
                None
            }
        };
        if let Some(part) = part {
            if parts.contains(&part) {
                p.add(
                    item.referenced,
                    format!("cache.key: {text:?} is listed twice"),
                );
            } else {
                parts.push(part);
            }
        }
    }
    if !has_path && p.count() == before {
        // Without the path, one product's page would answer for another.
        p.add(
            list.referenced,
            "cache.key: must include path (without it every path shares one entry)",
        );
    }
    (p.count() == before).then_some(parts)
}
