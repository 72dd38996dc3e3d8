//! Routes: which upstream serves a request that no flash-sale rule
//! matched (`passthrough`). The first entry of `routes:` whose match fits
//! wins; none fits, `default_upstream`. Called by the proxy's intake only
//! after the rule set found no rule, so a route never takes a request
//! past admission: an order under a routed prefix is still the rule's.
//!
//! - host: the request's authority (HTTP/2 `:authority`, an absolute-form
//!   target) or its `Host`, compared case-insensitively without port or
//!   final dot;
//! - path_prefix: the request's canonical path (`rules::canonical`, as
//!   rules see it, so `/static/..;/admin` is `/admin`), from the start
//!   and at a segment boundary (`/api` takes `/api/x`, not `/apix`),
//!   case-sensitively.
//!
//! The table is built from a validated [`Config`] and held behind an
//! `ArcSwap` in [`Routes`], so a reload swaps in a new table while a
//! request that already picked its upstream keeps it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_http::RequestHeader;

use crate::config::routes::{host_key, under_prefix};
use crate::config::Config;
use crate::rules::canonical::{normalize, Fold};
use crate::vocab::UpstreamId;

/// One route as the table holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    host: Option<String>,
    path_prefix: Option<String>,
    upstream: UpstreamId,
}

/// An ordered route table with its fallback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTable {
    entries: Vec<Entry>,
    fallback: UpstreamId,
    /// Whether any entry reads the path (else the canonical path is not
    /// computed) or the host.
    reads_path: bool,
    reads_host: bool,
}

impl RouteTable {
    /// The table of a validated config.
    pub fn new(config: &Config) -> Self {
        let entries: Vec<Entry> = config
            .routes
            .iter()
            .map(|r| Entry {
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                upstream: r.upstream,
            })
            .collect();
        Self {
            reads_path: entries.iter().any(|e| e.path_prefix.is_some()),
            reads_host: entries.iter().any(|e| e.host.is_some()),
            entries,
            fallback: config.default_upstream,
        }
    }

    /// The upstream for a request with this host (as sent, port and case
    /// included) and raw path (no query).
    pub fn upstream_for(&self, host: Option<&str>, path: &str) -> UpstreamId {
        if self.entries.is_empty() {
            return self.fallback;
        }
        let host = host.filter(|_| self.reads_host).and_then(host_key);
        // `*` and authority-form targets have no path to route on.
        let canonical =
            (self.reads_path && path.starts_with('/')).then(|| normalize(path, Fold::Ignore));
        self.entries
            .iter()
            .find(|e| {
                let host_fits = e
                    .host
                    .as_ref()
                    .is_none_or(|want| host.as_deref() == Some(want.as_str()));
                let path_fits = e.path_prefix.as_ref().is_none_or(|prefix| {
                    canonical
                        .as_ref()
                        .is_some_and(|c| under_prefix(c.as_str(), prefix))
                });
                host_fits && path_fits
            })
            .map_or(self.fallback, |e| e.upstream)
    }

    /// The upstream for a request that no rule matched.
    pub fn pick(&self, req: &RequestHeader) -> UpstreamId {
        self.upstream_for(request_host(req), req.uri.path())
    }
}

/// The host a request names: its URI's authority when it has one
/// (HTTP/2's `:authority`), else its `Host` header (pingora refuses an
/// HTTP/1.1 absolute-form target whose authority differs from `Host`).
fn request_host(req: &RequestHeader) -> Option<&str> {
    req.uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

/// The route table in force, swapped whole on reload.
#[derive(Debug)]
pub struct Routes {
    table: ArcSwap<RouteTable>,
}

impl Routes {
    /// The routes of a validated config.
    pub fn new(config: &Config) -> Self {
        Self {
            table: ArcSwap::from_pointee(RouteTable::new(config)),
        }
    }

    /// Puts a new config's routes in force (reload); requests that already
    /// picked an upstream keep it.
    pub fn apply(&self, config: &Config) {
        self.table.store(Arc::new(RouteTable::new(config)));
    }

    /// The table in force now.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// The upstream for a request that no rule matched.
    pub fn pick(&self, req: &RequestHeader) -> UpstreamId {
        self.table.load().pick(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(Option<&str>, Option<&str>, usize)]) -> RouteTable {
        let entries: Vec<Entry> = entries
            .iter()
            .map(|(h, p, u)| Entry {
                host: h.map(str::to_string),
                path_prefix: p.map(str::to_string),
                upstream: UpstreamId(*u),
            })
            .collect();
        RouteTable {
            reads_path: entries.iter().any(|e| e.path_prefix.is_some()),
            reads_host: entries.iter().any(|e| e.host.is_some()),
            entries,
            fallback: UpstreamId(9),
        }
    }

    #[test]
    fn first_fitting_route_wins_else_the_default() {
        let t = table(&[
            (None, Some("/api"), 1),
            (Some("static.example"), None, 2),
            (Some("admin.example"), Some("/admin"), 3),
        ]);
        let at = |host: Option<&str>, path: &str| t.upstream_for(host, path).0;
        assert_eq!(at(Some("shop.example"), "/api/goods/1"), 1);
        assert_eq!(at(Some("shop.example"), "/api"), 1);
        assert_eq!(at(Some("shop.example"), "/apix"), 9);
        // Order decides: /api on the static host is the api's.
        assert_eq!(at(Some("static.example"), "/api/x"), 1);
        assert_eq!(at(Some("STATIC.example:8443"), "/app.js"), 2);
        assert_eq!(at(Some("static.example."), "/"), 2);
        assert_eq!(at(None, "/app.js"), 9);
        // Both keys must fit.
        assert_eq!(at(Some("admin.example"), "/admin/users"), 3);
        assert_eq!(at(Some("admin.example"), "/other"), 9);
        assert_eq!(at(Some("shop.example"), "/admin/users"), 9);
    }

    #[test]
    fn the_canonical_path_is_routed() {
        let t = table(&[(None, Some("/static"), 1), (None, Some("/admin"), 2)]);
        let at = |path: &str| t.upstream_for(None, path).0;
        assert_eq!(at("//static//app.js"), 1);
        assert_eq!(at("/%73tatic/app.js"), 1);
        // Dot segments and `;params` are read as the backend reads them.
        assert_eq!(at("/static/../admin/users"), 2);
        assert_eq!(at("/static/..;/admin/users"), 2);
        assert_eq!(at("/static;v=1/app.js"), 1);
        // Case-sensitive, like the paths themselves.
        assert_eq!(at("/STATIC/app.js"), 9);
        // No path to route on.
        assert_eq!(at("*"), 9);
    }

    #[test]
    fn a_request_names_its_host_by_authority_first() {
        let mut req = RequestHeader::build("GET", b"/x", None).expect("request");
        req.insert_header("Host", "Static.Example:8080")
            .expect("host");
        assert_eq!(request_host(&req), Some("Static.Example:8080"));
        // An HTTP/2 request's `:authority` is its URI's.
        let mut h2 = RequestHeader::build("GET", b"/x", None).expect("request");
        h2.set_uri(http::Uri::from_static("https://api.example/x"));
        h2.insert_header("Host", "other.example").expect("host");
        assert_eq!(request_host(&h2), Some("api.example"));
        let t = table(&[(Some("api.example"), None, 1)]);
        assert_eq!(t.pick(&h2).0, 1);
        assert_eq!(t.pick(&req).0, 9);
    }

    #[test]
    fn no_routes_is_the_default_upstream() {
        let t = table(&[]);
        assert_eq!(t.upstream_for(Some("a.example"), "/api").0, 9);
    }
}
