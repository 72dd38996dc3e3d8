//! `routes:`: where traffic that no flash-sale rule matches goes, as an
//! ordered list of `{ match: { host, path_prefix }, upstream }`. Checked
//! here as strictly as the rest (a match with neither key, an unknown
//! upstream, a prefix that is not canonical or not a prefix, a host with
//! a port, a route that an earlier one always takes first); run by
//! `validate`. The run-time table is the top-level `routes` module.

use serde_saphyr::Spanned;

use super::error::Problems;
use super::model::RouteConfig;
use super::raw::RawGateway;
use crate::rules::canonical::{normalize, Fold};
use crate::vocab::UpstreamId;

/// Whether a request path (canonical) falls under `prefix` (canonical):
/// equal to it, or going on past it at a segment boundary, so `/api`
/// takes `/api`, `/api/` and `/api/goods` but not `/apix`; a prefix
/// ending in `/` takes only what lies under it. The same test the
/// run-time table makes.
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// A host as routes compare it: lowercase, without a port or a final dot.
/// `None` for an empty host.
pub fn host_key(host: &str) -> Option<String> {
    let host = host.trim();
    // `[v6]:port` keeps its brackets; `name:port` loses the port.
    let bare = match host.rfind(':') {
        Some(at) if !host.starts_with('[') || host[..at].ends_with(']') => &host[..at],
        _ => host,
    };
    let bare = bare.strip_suffix('.').unwrap_or(bare);
    (!bare.is_empty()).then(|| bare.to_ascii_lowercase())
}

/// Why a configured host cannot be matched, if it cannot.
fn host_problem(host: &str) -> Option<&'static str> {
    if host.contains("://") || host.contains('/') {
        return Some("is a host name like static.example.com, not a URL");
    }
    if host.contains('*') {
        return Some("wildcards are not supported: list each host");
    }
    let v6 = host.starts_with('[') && host.ends_with(']');
    if v6 {
        return host[1..host.len() - 1]
            .parse::<std::net::Ipv6Addr>()
            .err()
            .map(|_| "is not a valid [IPv6] address");
    }
    if host.contains(':') {
        return Some("must not have a port (a route matches the host on any port)");
    }
    let labels_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    (!labels_ok || host.len() > 253)
        .then_some("is not a host name (letters, digits, '-' and '_' in dot-separated labels)")
}

/// Why a configured path prefix cannot be matched, if it cannot.
fn prefix_problem(prefix: &str) -> Option<String> {
    if !prefix.starts_with('/') {
        return Some("must start with '/'".into());
    }
    if prefix.contains(['?', '#']) {
        return Some("is a path: it must not hold a query ('?') or a fragment ('#')".into());
    }
    if prefix.contains('*') {
        return Some(
            "is a plain prefix, not a glob: write the path the routed paths start with, like /api"
                .into(),
        );
    }
    // Requests are routed on their canonical path; a prefix in any other
    // spelling would never match.
    let canonical = normalize(prefix, Fold::Ignore);
    (canonical.as_str() != prefix).then(|| {
        format!(
            "is not in canonical form (requests are routed on their canonical path): write {:?}",
            canonical.as_str()
        )
    })
}

/// Validates `routes:` against the upstream names (in `UpstreamId` order).
pub(super) fn routes(p: &mut Problems, raw: &RawGateway, names: &[String]) -> Vec<RouteConfig> {
    let Some(list) = &raw.routes else {
        return Vec::new();
    };
    let mut out: Vec<(usize, RouteConfig)> = Vec::new();
    for (i, route) in list.value.iter().enumerate() {
        let field = format!("routes[{i}]");
        let before = p.count();
        let r = &route.value;
        let upstream = p
            .required(route.referenced, &format!("{field}.upstream"), &r.upstream)
            .and_then(|u| {
                let found = names.iter().position(|n| *n == u.value);
                if found.is_none() && !names.is_empty() {
                    p.add(
                        u.referenced,
                        format!(
                            "{field}.upstream: {:?} is not defined under upstreams (defined: {})",
                            u.value,
                            names.join(", ")
                        ),
                    );
                }
                found
            });
        let matcher = p.required(route.referenced, &format!("{field}.match"), &r.matcher);
        let mut host = None;
        let mut path_prefix = None;
        if let Some(m) = matcher {
            if m.value.host.is_none() && m.value.path_prefix.is_none() {
                p.add(
                    m.referenced,
                    format!("{field}.match: needs host, path_prefix or both (what no route matches goes to default_upstream)"),
                );
            }
            host = m
                .value
                .host
                .as_ref()
                .and_then(|h| checked_host(p, &field, h));
            path_prefix =
                m.value
                    .path_prefix
                    .as_ref()
                    .and_then(|pp| match prefix_problem(&pp.value) {
                        Some(why) => {
                            p.add(
                                pp.referenced,
                                format!("{field}.match.path_prefix: {:?} {why}", pp.value),
                            );
                            None
                        }
                        None => Some(pp.value.clone()),
                    });
        }
        if p.count() > before {
            continue;
        }
        let (Some(upstream), Some(_)) = (upstream, matcher) else {
            continue;
        };
        let route_cfg = RouteConfig {
            host,
            path_prefix,
            upstream: UpstreamId(upstream),
        };
        if let Some((j, _)) = out.iter().find(|(_, earlier)| shadows(earlier, &route_cfg)) {
            p.add(
                route.referenced,
                format!(
                    "{field}: never matches: routes[{j}] above it takes every request it would"
                ),
            );
            continue;
        }
        out.push((i, route_cfg));
    }
    out.into_iter().map(|(_, r)| r).collect()
}

fn checked_host(p: &mut Problems, field: &str, h: &Spanned<String>) -> Option<String> {
    let problem = if h.value.trim().is_empty() {
        Some("must not be empty")
    } else {
        host_problem(h.value.trim())
    };
    if let Some(why) = problem {
        p.add(
            h.referenced,
            format!("{field}.match.host: {:?} {why}", h.value),
        );
        return None;
    }
    host_key(&h.value)
}

/// Whether every request `later` matches is taken by `earlier` first.
fn shadows(earlier: &RouteConfig, later: &RouteConfig) -> bool {
    let host = match (&earlier.host, &later.host) {
        (None, _) => true,
        (Some(a), Some(b)) => a == b,
        (Some(_), None) => false,
    };
    // A prefix is itself a path under it; every path under `later`'s
    // prefix is then under `earlier`'s (see `under_prefix`).
    let path = match (&earlier.path_prefix, &later.path_prefix) {
        (None, _) => true,
        (Some(a), Some(b)) => under_prefix(b, a),
        (Some(_), None) => false,
    };
    host && path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_at_a_segment_boundary() {
        assert!(under_prefix("/api", "/api"));
        assert!(under_prefix("/api/", "/api"));
        assert!(under_prefix("/api/goods/1", "/api"));
        assert!(!under_prefix("/apix", "/api"));
        assert!(!under_prefix("/ap", "/api"));
        // A prefix ending in a slash takes only what lies under it.
        assert!(under_prefix("/static/app.js", "/static/"));
        assert!(!under_prefix("/static", "/static/"));
        // The root takes everything.
        assert!(under_prefix("/anything", "/"));
    }

    #[test]
    fn hosts_are_compared_lowercase_without_port_or_final_dot() {
        assert_eq!(
            host_key("Static.Example:8080").as_deref(),
            Some("static.example")
        );
        assert_eq!(
            host_key("static.example.").as_deref(),
            Some("static.example")
        );
        assert_eq!(host_key("[::1]:443").as_deref(), Some("[::1]"));
        assert_eq!(host_key("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(host_key("10.0.0.1:80").as_deref(), Some("10.0.0.1"));
        assert_eq!(host_key(":80"), None);
        assert_eq!(host_key(""), None);
    }

    #[test]
    fn configured_hosts_and_prefixes_are_checked() {
        assert_eq!(host_problem("static.example"), None);
        assert_eq!(host_problem("[2001:db8::1]"), None);
        assert!(host_problem("static.example:80").is_some());
        assert!(host_problem("https://static.example").is_some());
        assert!(host_problem("*.example").is_some());
        assert!(host_problem("bad host").is_some());
        assert!(host_problem("a..b").is_some());
        assert_eq!(prefix_problem("/api"), None);
        assert_eq!(prefix_problem("/static/"), None);
        assert_eq!(prefix_problem("/"), None);
        assert!(prefix_problem("api").is_some());
        assert!(prefix_problem("/api//v2").is_some());
        assert!(prefix_problem("/api/./v2").is_some());
        assert!(prefix_problem("/api/*").is_some());
        assert!(prefix_problem("/api?x=1").is_some());
        assert!(prefix_problem("/%61pi").is_some());
    }

    #[test]
    fn an_earlier_route_that_takes_all_of_a_later_one_shadows_it() {
        let r = |host: Option<&str>, prefix: Option<&str>| RouteConfig {
            host: host.map(str::to_string),
            path_prefix: prefix.map(str::to_string),
            upstream: UpstreamId(0),
        };
        assert!(shadows(&r(None, Some("/api")), &r(None, Some("/api"))));
        assert!(shadows(&r(None, Some("/api")), &r(None, Some("/api/v2"))));
        assert!(shadows(
            &r(None, Some("/api")),
            &r(Some("a.example"), Some("/api/v2"))
        ));
        assert!(shadows(
            &r(Some("a.example"), None),
            &r(Some("a.example"), Some("/x"))
        ));
        assert!(!shadows(&r(None, Some("/api/v2")), &r(None, Some("/api"))));
        assert!(!shadows(&r(None, Some("/api")), &r(None, Some("/apix"))));
        assert!(!shadows(
            &r(None, Some("/static/")),
            &r(None, Some("/static"))
        ));
        assert!(!shadows(&r(Some("a.example"), None), &r(None, Some("/x"))));
        assert!(!shadows(
            &r(Some("a.example"), None),
            &r(Some("b.example"), None)
        ));
    }
}
