//! Rate limits are token buckets in each gateway process: two real nodes
//! sharing one real Redis, under a `key: rule` limit of 5, let 5 through
//! each, 10 in all (what README's "Rate limits across nodes" documents and
//! sizes for), while the shared stock stays exact.

use sluice_testkit as support;

use std::net::SocketAddr;

use support::{put_stock, request, stock_view, Gateway, RedisServer, Upstream};

/// 5 per hour, burst 5: no token comes back while the test runs, however
/// slow the machine.
const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    rate_limits:
      - { key: rule, rate: 5, per: 1h }
"#;

fn node(up: &Upstream, redis: &RedisServer) -> Gateway {
    let config = format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         store: {{ backend: redis, redis: {{ url: \"{}\", timeout: 1s }} }}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        redis.url(),
        up.addr()
    );
    Gateway::builder()
        .config(&config)
        .file("lua-free-rules/seckill.yaml", RULE)
        .start()
}

/// Sends one order per user; counts (forwarded, rate_limited).
async fn orders(listen: SocketAddr, users: std::ops::Range<u32>) -> (u32, u32) {
    let (mut forwarded, mut limited) = (0, 0);
    for u in users {
        let resp = request(
            listen,
            "POST",
            "/api/seckill/p1/order",
            &[("x-user-id", &format!("u{u}"))],
            b"",
        )
        .await;
        match resp.header("x-sluice-outcome") {
            Some("forwarded") => forwarded += 1,
            Some("rate_limited") => limited += 1,
            other => panic!("u{u}: {other:?} {}", resp.text()),
        }
    }
    (forwarded, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_limit_holds_per_node_so_n_nodes_let_n_times_through() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let a = node(&up, &redis);
    let b = node(&up, &redis);
    put_stock(a.admin(), "seckill", "p1", 100).await;

    assert_eq!(orders(a.listen(), 0..8).await, (5, 3), "node a: its own 5");
    assert_eq!(orders(b.listen(), 8..16).await, (5, 3), "node b: 5 more");
    assert_eq!(up.requests(), 10, "the backend saw 2 x 5");
    // Stock is shared and exact: 10 units went, whichever node sold them.
    let view = stock_view(b.admin(), "seckill", "p1").await;
    assert_eq!(view["available"], 90, "{view}");
}
