//! Table tests of what the cache may store, share and answer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

use super::*;
use crate::rules::PathTemplate;
use crate::vocab::UpstreamId;

fn rule(key: Vec<KeyPart>) -> CacheRule {
    CacheRule {
        name: Arc::from("goods"),
        method: Method::GET,
        path: PathTemplate::parse("/api/goods/{id}").expect("template"),
        ttl: Duration::from_secs(60),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        key,
        max_body: 1 << 18,
        statuses: None,
        lock_timeout: Duration::from_secs(5),
        upstream: UpstreamId(0),
        origin: (PathBuf::from("x.yaml"), 1),
    }
}

fn plain() -> CacheRule {
    rule(vec![KeyPart::Path, KeyPart::Query])
}

fn req(target: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("GET", target.as_bytes(), None).expect("request");
    for (n, v) in headers {
        r.append_header(n.to_string(), *v).expect("header");
    }
    r
}

fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut r = ResponseHeader::build(status, None).expect("response");
    for (n, v) in headers {
        r.append_header(n.to_string(), *v).expect("header");
    }
    r
}

/// Request or response headers of a table row.
type Headers = &'static [(&'static str, &'static str)];

fn sessions() -> Vec<String> {
    vec!["PHPSESSID".into(), "JSESSIONID".into()]
}

#[test]
fn personal_requests_bypass_unless_the_key_names_what_makes_them_personal() {
    let r = plain();
    let s = sessions();
    let table: &[(Headers, Option<Bypass>)] = &[
        (&[("host", "shop")], None),
        (&[("cookie", "_ga=1; theme=dark")], None),
        (&[("cookie", "_ga=1; phpsessid=abc")], Some(Bypass::Session)),
        (
            &[("cookie", "a=1"), ("cookie", "JSESSIONID=x")],
            Some(Bypass::Session),
        ),
        (
            &[("authorization", "Bearer t")],
            Some(Bypass::Authorization),
        ),
        (&[("content-length", "3")], Some(Bypass::Body)),
        (&[("content-length", "0")], None),
        (&[("transfer-encoding", "chunked")], Some(Bypass::Body)),
        (&[("upgrade", "websocket")], Some(Bypass::Upgrade)),
    ];
    for (headers, want) in table {
        assert_eq!(
            bypass(&r, &req("/api/goods/1", headers), &s),
            *want,
            "{headers:?}"
        );
    }
    let keyed = rule(vec![
        KeyPart::Path,
        KeyPart::Header(http::header::AUTHORIZATION),
        KeyPart::Cookie("PHPSESSID".into()),
    ]);
    assert_eq!(
        bypass(
            &keyed,
            &req(
                "/api/goods/1",
                &[("authorization", "Bearer t"), ("cookie", "PHPSESSID=a")]
            ),
            &s
        ),
        None
    );
}

#[test]
fn keys_separate_what_the_rule_names_and_the_host() {
    let r = rule(vec![
        KeyPart::Path,
        KeyPart::Query,
        KeyPart::Header(HeaderName::from_static("accept-language")),
        KeyPart::Cookie("currency".into()),
    ]);
    let k = |target: &str, headers: &[(&str, &str)]| key(&r, &req(target, headers));
    let base = k("/api/goods/1?x=1", &[("host", "Shop.example")]);
    assert_eq!(
        base,
        "/api/goods/1?x=1\nshop.example\naccept-language!\ncookie currency!"
    );
    assert_ne!(base, k("/api/goods/1?x=2", &[("host", "shop.example")]));
    assert_ne!(base, k("/api/goods/1?x=1", &[("host", "evil.example")]));
    assert_ne!(
        base,
        k(
            "/api/goods/1?x=1",
            &[("host", "shop.example"), ("accept-language", "")]
        )
    );
    assert_eq!(
        k(
            "/api/goods/1?x=1",
            &[
                ("host", "shop.example"),
                ("accept-language", "fr"),
                ("cookie", "_ga=9; currency=EUR")
            ]
        ),
        "/api/goods/1?x=1\nshop.example\naccept-language:fr\ncookie currency:EUR"
    );
    // Cookies the key does not name change nothing.
    assert_eq!(
        base,
        k(
            "/api/goods/1?x=1",
            &[("host", "shop.example"), ("cookie", "_ga=1")]
        )
    );
    // Without `query` in the key, the query string is ignored.
    let r = rule(vec![KeyPart::Path]);
    assert_eq!(key(&r, &req("/api/goods/1?x=1", &[])), "/api/goods/1\n");
}

#[test]
fn a_fetch_carries_only_what_the_key_allows() {
    let r = rule(vec![KeyPart::Path, KeyPart::Cookie("currency".into())]);
    let client = req(
        "/api/goods/1?utm=x",
        &[
            ("host", "shop"),
            ("accept", "application/json"),
            ("accept-encoding", "gzip"),
            ("cookie", "_ga=1; currency=EUR"),
            ("if-none-match", "\"v1\""),
            ("range", "bytes=0-10"),
            ("cache-control", "no-cache"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
        ],
    );
    let f = fetch_request(&r, &client).expect("fetch");
    assert_eq!(f.method, Method::GET);
    assert_eq!(
        f.uri.to_string(),
        "/api/goods/1",
        "query not keyed: not sent"
    );
    let names: Vec<&str> = f.headers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["host", "accept", "cookie"], "{names:?}");
    assert_eq!(
        f.headers.get("cookie").map(|v| v.as_bytes()),
        Some(&b"currency=EUR"[..])
    );
    let with_query = fetch_request(&plain(), &client).expect("fetch");
    assert_eq!(with_query.uri.to_string(), "/api/goods/1?utm=x");
    assert!(with_query.headers.get("cookie").is_none());
}

#[test]
fn answers_are_stored_shared_or_kept_private() {
    let r = plain();
    let store = |fresh: u64| Verdict::Store {
        fresh_for: Duration::from_secs(fresh),
        initial_age: Duration::ZERO,
        stale_ok: true,
    };
    let table: &[(u16, Headers, Verdict)] = &[
        (200, &[], store(60)),
        (204, &[("content-type", "text/plain")], store(60)),
        (200, &[("cache-control", "public, max-age=5")], store(5)),
        (
            200,
            &[("cache-control", "max-age=5, s-maxage=10")],
            store(10),
        ),
        (200, &[("cache-control", "max-age=600")], store(60)),
        (200, &[("set-cookie", "sid=1")], Verdict::Private),
        (200, &[("cache-control", "private")], Verdict::Private),
        (200, &[("cache-control", "Private=\"x\"")], Verdict::Private),
        (200, &[("cache-control", "no-store")], Verdict::Private),
        (
            200,
            &[("cache-control", "max-age=5, no-cache")],
            Verdict::Private,
        ),
        (200, &[("pragma", "no-cache")], Verdict::Private),
        (200, &[("vary", "*")], Verdict::Private),
        (200, &[("vary", "User-Agent")], Verdict::Private),
        (200, &[("vary", "Accept-Encoding, Cookie")], store(60)),
        (206, &[], Verdict::Share),
        (404, &[], Verdict::Share),
        (500, &[], Verdict::Share),
        (500, &[("set-cookie", "sid=1")], Verdict::Private),
    ];
    for (status, headers, want) in table {
        assert_eq!(
            judge(&r, &resp(*status, headers)),
            *want,
            "{status} {headers:?}"
        );
    }
    assert_eq!(
        judge(
            &r,
            &resp(200, &[("age", "7"), ("cache-control", "must-revalidate")])
        ),
        Verdict::Store {
            fresh_for: Duration::from_secs(60),
            initial_age: Duration::from_secs(7),
            stale_ok: false
        }
    );
    let mut listed = plain();
    listed.statuses = Some(vec![200, 404]);
    assert_eq!(judge(&listed, &resp(404, &[])), store(60));
    let keyed = rule(vec![
        KeyPart::Path,
        KeyPart::Header(HeaderName::from_static("user-agent")),
    ]);
    assert_eq!(
        judge(&keyed, &resp(200, &[("vary", "user-agent")])),
        store(60)
    );
}

#[test]
fn conditional_requests_match_validators() {
    let stored = resp(
        200,
        &[
            ("etag", "W/\"v1\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ],
    );
    let table: &[(Headers, bool)] = &[
        (&[], false),
        (&[("if-none-match", "\"v1\"")], true),
        (&[("if-none-match", "\"v0\", W/\"v1\"")], true),
        (&[("if-none-match", "*")], true),
        (&[("if-none-match", "\"v2\"")], false),
        // If-None-Match decides when present, whatever the date says.
        (
            &[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", "Tue, 01 Dec 2026 10:00:00 GMT"),
            ],
            false,
        ),
        (
            &[("if-modified-since", "Tue, 01 Dec 2026 10:00:00 GMT")],
            true,
        ),
        (
            &[("if-modified-since", "Wed, 02 Dec 2026 10:00:00 GMT")],
            false,
        ),
    ];
    for (headers, want) in table {
        assert_eq!(
            not_modified(&req("/x", headers), &stored),
            *want,
            "{headers:?}"
        );
    }
    assert!(!not_modified(
        &req("/x", &[("if-none-match", "*")]),
        &resp(404, &[("etag", "\"v1\"")])
    ));
}
