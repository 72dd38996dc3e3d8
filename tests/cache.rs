//! The read cache through the real gateway binary, against a real
//! loopback upstream that counts what reaches it (and a real Redis for
//! the shared tier): one backend fetch per key however many ask, hits with
//! `Age` and 304, stale answers while the backend fails and errors after,
//! personal answers never shared, a byte-bounded memory tier under a flood
//! of one-off keys, two nodes sharing Redis, Redis killed; the stock view
//! and its store reads; admin purge; the metrics.

use sluice_testkit as support;

use std::time::{Duration, Instant};

use support::{get, metric_value, request, Conn, Gateway, RedisServer, Response, Upstream};

/// The goods pages cached for `ttl`, with the given extra keys.
fn goods_rule(extra: &str) -> String {
    format!(
        "cache:\n  - name: goods\n    match: {{ method: GET, path: \"/api/goods/{{id}}\" }}\n    ttl: 60s\n{extra}"
    )
}

fn config(up: &Upstream, extra: &str) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    connect_timeout: 500ms\n    read_timeout: 3s\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n{extra}",
        up.addr()
    )
}

fn node(up: &Upstream, rules: &str, extra: &str) -> Gateway {
    Gateway::builder()
        .config(&config(up, extra))
        .file("lua-free-rules/cache.yaml", rules)
        .start()
}

fn n_of(resp: &Response) -> u64 {
    resp.json()["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("no n in {}", resp.text()))
}

async fn cache_count(gw: &Gateway, rule: &str, result: &str) -> f64 {
    let text = gw.metrics().await;
    metric_value(
        &text,
        "sluice_cache_requests_total",
        &[("rule", rule), ("result", result)],
    )
    .unwrap_or_else(|| panic!("no cache series {rule}/{result}"))
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
async fn wait_until(limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_gets_of_a_cold_key_reach_the_backend_once() {
    let up = Upstream::start();
    // A slow page widens the window in which the others arrive; the count
    // holds however they come (later ones find the stored answer).
    up.set_stall(Duration::from_millis(500));
    let gw = node(&up, &goods_rule(""), "");
    let listen = gw.listen();
    let clients: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(async move { get(listen, "/api/goods/1").await }))
        .collect();
    let mut bodies = std::collections::BTreeSet::new();
    for c in clients {
        let resp = c.await.expect("client task");
        assert_eq!(resp.status, 200, "{}", resp.text());
        bodies.insert(n_of(&resp));
    }
    assert_eq!(up.requests(), 1, "one backend fetch for 1,000 shoppers");
    assert_eq!(bodies.into_iter().collect::<Vec<_>>(), [1]);
    let miss = cache_count(&gw, "goods", "miss").await;
    let shared =
        cache_count(&gw, "goods", "coalesced").await + cache_count(&gw, "goods", "hit").await;
    assert_eq!((miss, shared), (1.0, 999.0));
    let text = gw.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "sluice_requests_total",
            &[("rule", "goods"), ("outcome", "cached")]
        ),
        Some(999.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_answered_by_the_gateway_with_age_and_conditional_requests_get_304() {
    let up = Upstream::start();
    up.set_response_headers(&[
        ("etag", "\"v1\""),
        ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
    ]);
    let gw = node(&up, &goods_rule(""), "");
    let first = get(gw.listen(), "/api/goods/7").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-sluice-cache"), Some("miss"));
    assert_eq!(first.header("x-sluice-outcome"), Some("passthrough"));
    let hit = get(gw.listen(), "/api/goods/7").await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-sluice-cache"), Some("hit"));
    assert_eq!(hit.header("x-sluice-outcome"), Some("cached"));
    assert!(hit.header("age").is_some_and(|a| a.parse::<u64>().is_ok()));
    assert_eq!(hit.header("etag"), Some("\"v1\""));
    assert_eq!(hit.body, first.body);
    for validators in [
        &[("if-none-match", "\"v0\", \"v1\"")][..],
        &[("if-modified-since", "Tue, 01 Dec 2026 10:00:00 GMT")][..],
    ] {
        let resp = request(gw.listen(), "GET", "/api/goods/7", validators, b"").await;
        assert_eq!(resp.status, 304, "{validators:?}");
        assert!(resp.body.is_empty());
        assert_eq!(resp.header("etag"), Some("\"v1\""));
        assert_eq!(resp.header("x-sluice-outcome"), Some("cached"));
    }
    // A 304 and a full answer on one keep-alive connection.
    let mut conn = Conn::connect(gw.listen()).await;
    let not_modified = conn
        .send("GET", "/api/goods/7", &[("if-none-match", "\"v1\"")], b"")
        .await
        .expect("conditional request");
    assert_eq!(not_modified.status, 304);
    let changed = conn
        .send("GET", "/api/goods/7", &[("if-none-match", "\"v0\"")], b"")
        .await
        .expect("second request on the connection");
    assert_eq!(changed.status, 200);
    assert_eq!(changed.body, first.body);
    // Other paths, other keys; paths no cache rule matches pass through.
    assert_eq!(n_of(&get(gw.listen(), "/api/goods/8").await), 2);
    let other = get(gw.listen(), "/api/other/7").await;
    assert_eq!(other.header("x-sluice-outcome"), Some("passthrough"));
    assert_eq!(other.header("x-sluice-cache"), None);
    assert_eq!(n_of(&get(gw.listen(), "/api/other/7").await), 4);
    // Another spelling is not served from the cache: proxied as sent.
    let spelled = get(gw.listen(), "/api//goods/7").await;
    assert_eq!(spelled.header("x-sluice-cache"), None);
    assert_eq!(up.requests(), 5);
    // Queries are keyed by default.
    assert_eq!(n_of(&get(gw.listen(), "/api/goods/7?c=red").await), 6);
    assert_eq!(n_of(&get(gw.listen(), "/api/goods/7?c=red").await), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_cookie_answer_is_never_served_to_another_client() {
    let up = Upstream::start();
    up.set_response_headers(&[("set-cookie", "sid={n}; Path=/")]);
    up.set_stall(Duration::from_millis(200));
    let gw = node(&up, &goods_rule(""), "");
    let listen = gw.listen();
    let clients: Vec<_> = (0..50)
        .map(|_| tokio::spawn(async move { get(listen, "/api/goods/1").await }))
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for c in clients {
        let resp = c.await.expect("client task");
        assert_eq!(resp.status, 200);
        let n = n_of(&resp);
        // Each client got the answer fetched for it, cookie and all.
        assert_eq!(
            resp.header("set-cookie"),
            Some(format!("sid={n}; Path=/").as_str())
        );
        assert!(seen.insert(n), "answer {n} served twice");
    }
    assert_eq!(up.requests(), 50);
    let again = get(listen, "/api/goods/1").await;
    assert!(seen.insert(n_of(&again)));
    assert_eq!(cache_count(&gw, "goods", "hit").await, 0.0);
    assert_eq!(cache_count(&gw, "goods", "coalesced").await, 0.0);
    assert_eq!(cache_count(&gw, "goods", "stale").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_requests_bypass_unless_the_key_names_them() {
    let up = Upstream::start();
    let rules = format!(
        "{}  - name: account\n    match: {{ method: GET, path: \"/api/account/{{page}}\" }}\n    ttl: 60s\n    key: [path, \"cookie:PHPSESSID\"]\n",
        goods_rule("")
    );
    let gw = node(&up, &rules, "");
    let l = gw.listen();
    for headers in [
        &[("authorization", "Bearer abc")][..],
        &[("cookie", "_ga=1; PHPSESSID=s1")][..],
    ] {
        for _ in 0..2 {
            let resp = request(l, "GET", "/api/goods/1", headers, b"").await;
            assert_eq!(resp.header("x-sluice-cache"), Some("bypass"), "{headers:?}");
            assert_eq!(resp.header("x-sluice-outcome"), Some("passthrough"));
        }
    }
    assert_eq!(up.requests(), 4);
    // A cookie that is not a session's does not make a page personal.
    let ga = [("cookie", "_ga=1")];
    request(l, "GET", "/api/goods/1", &ga, b"").await;
    let hit = request(l, "GET", "/api/goods/1", &ga, b"").await;
    assert_eq!(hit.header("x-sluice-cache"), Some("hit"));
    // Keyed by the session: each session its own entry, and the backend
    // sees that cookie only.
    let s1 = [("cookie", "_ga=1; PHPSESSID=s1")];
    let s2 = [("cookie", "PHPSESSID=s2")];
    let a = request(l, "GET", "/api/account/me", &s1, b"").await;
    let b = request(l, "GET", "/api/account/me", &s2, b"").await;
    assert_ne!(n_of(&a), n_of(&b));
    let sent = up.last().expect("fetched");
    assert_eq!(sent.header("cookie"), Some("PHPSESSID=s2"));
    let again = request(l, "GET", "/api/account/me", &s1, b"").await;
    assert_eq!(again.header("x-sluice-cache"), Some("hit"));
    assert_eq!(n_of(&again), n_of(&a));
    assert_eq!(cache_count(&gw, "goods", "bypass").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_is_down_serves_stale_within_stale_if_error_and_errors_after() {
    let mut up = Upstream::start();
    let rules = "cache:\n  - name: goods\n    match: { method: GET, path: \"/api/goods/{id}\" }\n    ttl: 1s\n    stale_if_error: 4s\n";
    let gw = node(&up, rules, "");
    let filled_from = Instant::now();
    let first = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(first.status, 200);
    up.stop();
    // Past the ttl, within stale_if_error.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stale = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(stale.status, 200, "{}", stale.text());
    assert_eq!(stale.header("x-sluice-cache"), Some("stale"));
    assert_eq!(stale.header("x-sluice-outcome"), Some("cached"));
    assert_eq!(stale.body, first.body);
    // Past ttl + stale_if_error (counted from before the fill).
    let after = filled_from + Duration::from_millis(6000);
    tokio::time::sleep(after.saturating_duration_since(Instant::now())).await;
    let late = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(late.status, 503, "{}", late.text());
    assert_eq!(late.header("x-sluice-outcome"), Some("unavailable"));
    // A key never fetched has nothing stale: an error at once.
    let cold = get(gw.listen(), "/api/goods/2").await;
    assert_eq!(cold.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_5xx_is_covered_by_the_stale_answer() {
    let up = Upstream::start();
    let rules = "cache:\n  - name: goods\n    match: { method: GET, path: \"/api/goods/{id}\" }\n    ttl: 1s\n    stale_if_error: 60s\n";
    let gw = node(&up, rules, "");
    let first = get(gw.listen(), "/api/goods/1").await;
    up.set_status(502);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stale = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-sluice-cache"), Some("stale"));
    assert_eq!(stale.body, first.body);
    // A 5xx with nothing stale is the backend's own answer (not stored).
    let cold = get(gw.listen(), "/api/goods/2").await;
    assert_eq!(cold.status, 502);
    up.set_status(200);
    let back = get(gw.listen(), "/api/goods/2").await;
    assert_eq!(
        (back.status, back.header("x-sluice-cache")),
        (200, Some("miss"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let up = Upstream::start();
    let rules = "cache:\n  - name: goods\n    match: { method: GET, path: \"/api/goods/{id}\" }\n    ttl: 2s\n    stale_while_revalidate: 60s\n";
    let gw = node(&up, rules, "");
    assert_eq!(n_of(&get(gw.listen(), "/api/goods/1").await), 1);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    // The backend is slow: the stale answer does not wait for it.
    up.set_stall(Duration::from_millis(300));
    let stale = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(stale.header("x-sluice-cache"), Some("stale"));
    assert_eq!(n_of(&stale), 1);
    let mut fresh = None;
    wait_until(
        Duration::from_secs(10),
        "the refreshed answer",
        async || {
            let resp = get(gw.listen(), "/api/goods/1").await;
            let hit = resp.header("x-sluice-cache") == Some("hit");
            if hit {
                fresh = Some(n_of(&resp));
            }
            hit
        },
    )
    .await;
    assert_eq!(fresh, Some(2));
    assert_eq!(up.requests(), 2, "one refresh, however many stale answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shorter_max_age_from_the_backend_wins_over_the_ttl() {
    let up = Upstream::start();
    up.set_response_headers(&[("cache-control", "public, max-age=1")]);
    let gw = node(&up, &goods_rule(""), "");
    get(gw.listen(), "/api/goods/1").await;
    let hit = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(hit.header("x-sluice-cache"), Some("hit"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(after.header("x-sluice-cache"), Some("miss"));
    assert_eq!(up.requests(), 2);
    // no-store: never stored.
    up.set_response_headers(&[("cache-control", "no-store")]);
    get(gw.listen(), "/api/goods/2").await;
    let again = get(gw.listen(), "/api/goods/2").await;
    assert_eq!(again.header("x-sluice-cache"), Some("miss"));
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_max_body_is_passed_through_whole() {
    let up = Upstream::start();
    up.set_padding(4096);
    let gw = node(&up, &goods_rule("    max_body: 1KiB\n"), "");
    for _ in 0..2 {
        let resp = get(gw.listen(), "/api/goods/1").await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-sluice-cache"), Some("bypass"));
        assert_eq!(resp.json()["pad"].as_str().map(str::len), Some(4096));
    }
    // The fetch that found it too big, then each request once: the key
    // is marked, so the second request pays no fetch.
    assert_eq!(up.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_keys_stays_under_the_bound_and_the_hot_key_stays_cached() {
    const BOUND: f64 = (2u64 << 20) as f64;
    const FLOOD: usize = 100_000;
    const CONNS: usize = 32;
    let up = Upstream::start();
    up.set_recording(false);
    let gw = node(
        &up,
        &goods_rule(""),
        "cache: { max_bytes: 2MiB }\nlimits: { max_connections: 1000 }\n",
    );
    let hot = get(gw.listen(), "/api/goods/hot").await;
    for _ in 0..20 {
        assert_eq!(get(gw.listen(), "/api/goods/hot").await.body, hot.body);
    }
    let listen = gw.listen();
    let workers: Vec<_> = (0..CONNS)
        .map(|w| {
            tokio::spawn(async move {
                let mut conn = Conn::connect(listen).await;
                let mut i = w;
                while i < FLOOD {
                    let path = format!("/api/goods/{i}");
                    let resp = conn
                        .send("GET", &path, &[], b"")
                        .await
                        .expect("flood request");
                    assert_eq!(resp.status, 200);
                    // The shop's real traffic goes on beside the flood.
                    if i % 500 == w {
                        let h = conn
                            .send("GET", "/api/goods/hot", &[], b"")
                            .await
                            .expect("hot");
                        assert_eq!(h.status, 200);
                    }
                    i += CONNS;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("flood worker");
    }
    let text = gw.metrics().await;
    let bytes = metric_value(&text, "sluice_cache_bytes", &[]).expect("bytes gauge");
    let entries = metric_value(&text, "sluice_cache_entries", &[]).expect("entries gauge");
    assert!(
        bytes > 0.0 && bytes <= BOUND,
        "{bytes} bytes held, bound {BOUND}"
    );
    assert!(entries < FLOOD as f64, "{entries} entries");
    let after = get(gw.listen(), "/api/goods/hot").await;
    assert_eq!(after.header("x-sluice-cache"), Some("hit"));
    assert_eq!(after.body, hot.body, "the hot key was never fetched again");
    assert_eq!(up.requests(), FLOOD as u64 + 1);
}

fn redis_extra(redis: &RedisServer) -> String {
    format!(
        "store: {{ redis: {{ url: \"{}\", timeout: 200ms }} }}\ncache: {{ redis: true }}\n",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_redis_tier() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let a = node(&up, &goods_rule(""), &redis_extra(&redis));
    let b = node(&up, &goods_rule(""), &redis_extra(&redis));
    // Nodes behind one balancer see the shop's own Host (part of the key).
    let host = [("host", "shop.example")];
    let first = request(a.listen(), "GET", "/api/goods/1", &host, b"").await;
    assert_eq!(first.header("x-sluice-cache"), Some("miss"));
    // The shared copy is written just after the answer.
    wait_until(Duration::from_secs(5), "the entry in redis", async || {
        redis.command(&["DBSIZE"]) == ":1"
    })
    .await;
    assert_eq!(
        redis.command(&["EXISTS", "sluice:cache:/api/goods/1\nshop.example"]),
        ":1"
    );
    let from_b = request(b.listen(), "GET", "/api/goods/1", &host, b"").await;
    assert_eq!(from_b.header("x-sluice-cache"), Some("hit"));
    assert_eq!(from_b.body, first.body);
    assert!(from_b.header("age").is_some());
    assert_eq!(
        up.requests(),
        1,
        "a cold node answered from the shared tier"
    );
    // A purge through one node reaches the shared tier.
    let purged = request(
        b.admin(),
        "DELETE",
        "/admin/v1/cache?prefix=/api/goods/",
        &[],
        b"",
    )
    .await;
    assert_eq!(purged.status, 200, "{}", purged.text());
    assert_eq!(purged.json()["purged"]["redis"], 1);
    assert_eq!(redis.command(&["DBSIZE"]), ":0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_hits_keep_coming_from_memory_and_misses_reach_the_backend_once_per_key() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    up.set_stall(Duration::from_millis(300));
    let gw = node(&up, &goods_rule(""), &redis_extra(&redis));
    let first = get(gw.listen(), "/api/goods/1").await;
    assert_eq!(first.status, 200);
    redis.kill();
    for _ in 0..20 {
        let hit = get(gw.listen(), "/api/goods/1").await;
        assert_eq!(hit.header("x-sluice-cache"), Some("hit"));
    }
    let listen = gw.listen();
    for key in 2..5 {
        let clients: Vec<_> = (0..50)
            .map(|_| {
                let path = format!("/api/goods/{key}");
                tokio::spawn(async move { get(listen, &path).await })
            })
            .collect();
        for c in clients {
            assert_eq!(c.await.expect("client").status, 200);
        }
    }
    let per_key = |uri: &str| up.recorded().iter().filter(|r| r.uri == uri).count();
    assert_eq!(per_key("/api/goods/1"), 1);
    for key in 2..5 {
        assert_eq!(per_key(&format!("/api/goods/{key}")), 1, "key {key}");
    }
    assert_eq!(up.requests(), 4);
}

const SALE: &str = r#"rules:
  - name: sale
    match: { method: POST, path: "/api/sale/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
  - name: soon
    match: { method: POST, path: "/api/soon/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    window: { start: "2099-11-11T00:00:00+08:00" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_view_costs_the_store_at_most_one_read_per_sku_per_interval() {
    let up = Upstream::start();
    let gw = node(
        &up,
        SALE,
        "store: { recheck_interval: 5s, sweep_interval: 10m }\n",
    );
    support::put_stock(gw.admin(), "sale", "p1", 10).await;
    support::put_stock(gw.admin(), "soon", "p1", 3).await;
    let reads = async || {
        metric_value(
            &gw.metrics().await,
            "sluice_store_duration_seconds_count",
            &[("op", "read")],
        )
        .unwrap_or(0.0)
    };
    let before = reads().await;
    let started = Instant::now();
    let listen = gw.listen();
    let polls: Vec<_> = (0..300)
        .map(|_| tokio::spawn(async move { get(listen, "/sluice/stock/sale/p1").await }))
        .collect();
    for p in polls {
        let resp = p.await.expect("poll");
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            resp.json(),
            serde_json::json!({"available": 10, "state": "on_sale"})
        );
        assert_eq!(resp.header("x-sluice-outcome"), Some("cached"));
    }
    let elapsed = started.elapsed();
    let read = reads().await - before;
    // One read per interval begun for the view, and as many for the
    // housekeeping recheck of a sku loaded through this node.
    let intervals = (elapsed.as_secs_f64() / 5.0).floor() + 1.0;
    assert!(
        read <= 2.0 * intervals + 1.0,
        "{read} store reads for 300 polls in {elapsed:?}"
    );
    assert_eq!(up.requests(), 0, "polls never reach the backend");

    let soon = get(listen, "/sluice/stock/soon/p1").await.json();
    assert_eq!(
        soon,
        serde_json::json!({"available": 3, "state": "not_started"})
    );
    support::put_stock(gw.admin(), "sale", "p2", 0).await;
    let gone = get(listen, "/sluice/stock/sale/p2").await.json();
    assert_eq!(
        gone,
        serde_json::json!({"available": 0, "state": "sold_out"})
    );
    for unknown in [
        "/sluice/stock/nope/p1",
        "/sluice/stock/sale/p9",
        "/sluice/stock/sale/bad%20sku",
        "/sluice/stock/sale",
    ] {
        let resp = get(listen, unknown).await;
        assert_eq!(resp.status, 404, "{unknown}: {}", resp.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_purge_drops_entries_by_prefix_and_needs_the_token() {
    let up = Upstream::start();
    let rules = format!(
        "{}  - name: shop\n    match: {{ method: GET, path: \"/api/shop/{{id}}\" }}\n    ttl: 60s\n",
        goods_rule("")
    );
    let gw = Gateway::builder()
        .config(&config(&up, "").replace(
            "admin: { listen: ${ADMIN} }",
            "admin: { listen: ${ADMIN}, token_env: SLUICE_ADMIN_TOKEN }",
        ))
        .file("lua-free-rules/cache.yaml", &rules)
        .env("SLUICE_ADMIN_TOKEN", "t0ken")
        .start();
    let l = gw.listen();
    for p in ["/api/goods/1", "/api/goods/2", "/api/shop/1"] {
        get(l, p).await;
    }
    let purge = "/admin/v1/cache?prefix=/api/goods/1";
    let refused = request(gw.admin(), "DELETE", purge, &[], b"").await;
    assert_eq!(refused.status, 401);
    let auth = [("authorization", "Bearer t0ken")];
    let no_prefix = request(gw.admin(), "DELETE", "/admin/v1/cache", &auth, b"").await;
    assert_eq!(no_prefix.status, 400);
    let done = request(gw.admin(), "DELETE", purge, &auth, b"").await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(
        done.json(),
        serde_json::json!({"prefix": "/api/goods/1", "purged": {"memory": 1, "redis": null}})
    );
    assert_eq!(
        get(l, "/api/goods/1").await.header("x-sluice-cache"),
        Some("miss")
    );
    assert_eq!(
        get(l, "/api/goods/2").await.header("x-sluice-cache"),
        Some("hit")
    );
    let all = request(gw.admin(), "DELETE", "/admin/v1/cache?prefix=/", &auth, b"").await;
    assert_eq!(all.json()["purged"]["memory"], 3);
    assert_eq!(
        get(l, "/api/shop/1").await.header("x-sluice-cache"),
        Some("miss")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_series_start_at_zero() {
    let up = Upstream::start();
    let gw = node(&up, &goods_rule(""), "");
    let text = gw.metrics().await;
    for result in ["hit", "miss", "stale", "coalesced", "bypass"] {
        assert_eq!(
            metric_value(
                &text,
                "sluice_cache_requests_total",
                &[("rule", "goods"), ("result", result)]
            ),
            Some(0.0),
            "{result}"
        );
    }
    assert_eq!(metric_value(&text, "sluice_cache_bytes", &[]), Some(0.0));
    assert_eq!(metric_value(&text, "sluice_cache_entries", &[]), Some(0.0));
    assert_eq!(
        metric_value(
            &text,
            "sluice_requests_total",
            &[("rule", "goods"), ("outcome", "cached")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "sluice_requests_total",
            &[("rule", "none"), ("outcome", "cached")]
        ),
        Some(0.0)
    );
}
