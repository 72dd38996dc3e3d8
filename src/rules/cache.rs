//! Cache rules at run time: which GET requests the gateway's read cache
//! may answer (`match`), what makes two requests the same entry (`key`),
//! and how long an entry serves (`ttl`, `stale_while_revalidate`,
//! `stale_if_error`). Built by `config` from the `cache:` lists of rule
//! files; the `cache` module matches requests against them and serves.
//!
//! A cache rule matches a request's path only when the path is already
//! canonical and equals the template exactly (literal case, no suffix, the
//! trailing slash as written): any other spelling is proxied as sent,
//! uncached. That keeps the pass-through path free of allocation (one scan
//! of the path, no normal form built) and means an entry is always keyed
//! and fetched by the spelling the backend routes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

use super::canonical::is_canonical;
use super::PathTemplate;
use crate::vocab::UpstreamId;

/// One part of a cache key, besides the host (always keyed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyPart {
    /// The path (required in every key).
    Path,
    /// The query string, byte for byte.
    Query,
    /// Every value of a request header (`header:Accept-Language`).
    Header(HeaderName),
    /// A cookie by name (`cookie:currency`).
    Cookie(String),
}

/// A validated cache rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheRule {
    /// Unique name (the `rule` metric label); the path template when the
    /// file gives none.
    pub name: Arc<str>,
    /// The method (only GET is cached).
    pub method: Method,
    /// The path template, matched exactly.
    pub path: PathTemplate,
    /// How long an answer is fresh (shortened by the backend's `max-age`
    /// or `s-maxage`).
    pub ttl: Duration,
    /// After `ttl`, how long the stale answer is still served while one
    /// background refresh runs.
    pub stale_while_revalidate: Duration,
    /// After `ttl`, how long the stale answer is served while the backend
    /// fails or times out.
    pub stale_if_error: Duration,
    /// What makes two requests the same entry, in order (`Path` first).
    pub key: Vec<KeyPart>,
    /// Answers with a longer body are not cached.
    pub max_body: u64,
    /// Statuses that are cached; `None`: every 2xx but 206.
    pub statuses: Option<Vec<u16>>,
    /// How long a request waits for another's fetch of the same key
    /// before it goes to the backend itself.
    pub lock_timeout: Duration,
    /// Where answers are fetched from.
    pub upstream: UpstreamId,
    /// Where the rule was written, for logs.
    pub origin: (PathBuf, u32),
}

impl CacheRule {
    /// Whether the query string is part of the key.
    pub fn keys_query(&self) -> bool {
        self.key.contains(&KeyPart::Query)
    }

    /// Whether a request header is part of the key.
    pub fn keys_header(&self, name: &HeaderName) -> bool {
        self.key
            .iter()
            .any(|k| matches!(k, KeyPart::Header(h) if h == name))
    }

    /// Whether a cookie is part of the key (by name, or the whole `Cookie`).
    pub fn keys_cookie(&self, name: &str) -> bool {
        self.key.iter().any(|k| match k {
            KeyPart::Cookie(c) => c == name,
            KeyPart::Header(h) => h == http::header::COOKIE,
            _ => false,
        })
    }

    /// Whether an answer with this status may be stored.
    pub fn caches_status(&self, status: u16) -> bool {
        match &self.statuses {
            Some(list) => list.contains(&status),
            None => (200..300).contains(&status) && status != 206,
        }
    }

    /// The longest an entry is kept: fresh, then stale for the longer of
    /// the two stale windows.
    pub fn lifetime(&self) -> Duration {
        self.ttl + self.stale_while_revalidate.max(self.stale_if_error)
    }
}

/// The cache rules in force; a request matches one at most (`sluice
/// check` refuses overlaps).
#[derive(Clone, Debug, Default)]
pub struct CacheRules {
    rules: Vec<Arc<CacheRule>>,
}

impl CacheRules {
    /// A set from validated rules.
    pub fn new(rules: Vec<CacheRule>) -> Self {
        Self {
            rules: rules.into_iter().map(Arc::new).collect(),
        }
    }

    /// All rules, in file order.
    pub fn rules(&self) -> &[Arc<CacheRule>] {
        &self.rules
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule a request's method and path (no query) match, with its
    /// index; `None` without allocating when none does.
    pub fn find(&self, method: &Method, path: &str) -> Option<(usize, &Arc<CacheRule>)> {
        if self.rules.is_empty() || *method != Method::GET || !is_canonical(path) {
            return None;
        }
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.path.matches_exactly(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(path: &str) -> CacheRule {
        CacheRule {
            name: Arc::from(path),
            method: Method::GET,
            path: PathTemplate::parse(path).expect("template"),
            ttl: Duration::from_secs(2),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(300),
            key: vec![KeyPart::Path, KeyPart::Query],
            max_body: 1 << 18,
            statuses: None,
            lock_timeout: Duration::from_secs(5),
            upstream: UpstreamId(0),
            origin: (PathBuf::from("x.yaml"), 1),
        }
    }

    #[test]
    fn only_the_exact_canonical_spelling_matches() {
        let set = CacheRules::new(vec![rule("/api/goods/{id}"), rule("/api/shop/")]);
        let found = |m: &Method, p: &str| set.find(m, p).map(|(i, _)| i);
        assert_eq!(found(&Method::GET, "/api/goods/7"), Some(0));
        assert_eq!(found(&Method::GET, "/api/goods/%E6%89%8B"), Some(0));
        assert_eq!(found(&Method::GET, "/api/shop/"), Some(1));
        for other in [
            "/api/goods/7/",
            "/api/goods",
            "/api/goods/7/x",
            "/API/goods/7",
            "/api//goods/7",
            "/api/./goods/7",
            "/api/goods/7;v=1",
            "/api/goods/%37",
            "/api/goods/%e6%89%8b",
            "/api/shop",
        ] {
            assert_eq!(found(&Method::GET, other), None, "{other}");
        }
        assert_eq!(found(&Method::HEAD, "/api/goods/7"), None);
        assert_eq!(found(&Method::POST, "/api/goods/7"), None);
    }

    #[test]
    fn statuses_default_to_2xx_but_partial_content() {
        let mut r = rule("/x");
        assert!(r.caches_status(200) && r.caches_status(204));
        assert!(!r.caches_status(206) && !r.caches_status(404) && !r.caches_status(500));
        r.statuses = Some(vec![200, 404]);
        assert!(r.caches_status(404) && !r.caches_status(204));
    }
}
