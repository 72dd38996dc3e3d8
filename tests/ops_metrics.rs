//! The operator's series on a real gateway's `/metrics`: process metrics,
//! build info, each upstream server's health (from a real health check
//! against real upstreams), the store's reachability (a real Redis
//! frozen, killed and restarted), the local sold-out flag, `max_inflight`,
//! and the reload and access-log series that start at 0.

use sluice_testkit as support;

use std::net::SocketAddr;

use support::{metric_value, put_stock, request, Gateway, RedisServer, Upstream};

const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
"#;

/// Two upstreams: `mall` (two servers, health-checked every 100ms) and
/// `cdn` (no health check).
fn config(a: &Upstream, b: &Upstream, cdn: &Upstream, store: &str) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         store: {store}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  \
           mall:\n    servers: [{}, {}]\n    max_inflight: 7\n    \
             health_check: {{ path: /health, interval: 100ms }}\n  \
           cdn:\n    servers: [{}]\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        a.addr(),
        b.addr(),
        cdn.addr()
    )
}

fn start(a: &Upstream, b: &Upstream, cdn: &Upstream, store: &str) -> Gateway {
    Gateway::builder()
        .config(&config(a, b, cdn, store))
        .file("lua-free-rules/seckill.yaml", RULE)
        .start()
}

async fn buy(listen: SocketAddr, sku: &str, user: &str) -> String {
    let resp = request(
        listen,
        "POST",
        &format!("/api/seckill/{sku}/order"),
        &[("x-user-id", user)],
        b"",
    )
    .await;
    resp.header("x-sluice-outcome").unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_series_on_a_real_gateway() {
    let a = Upstream::start();
    let mut b = Upstream::start();
    let cdn = Upstream::start();
    // b's health check fails from the start.
    b.set_healthy(false);
    let gw = start(&a, &b, &cdn, "{ backend: memory }");
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());

    let text = gw.metrics().await;
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        metric_value(&text, "sluice_build_info", &[("version", version)]),
        Some(1.0),
        "{text}"
    );
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
    ] {
        let v = metric_value(&text, name, &[]);
        assert!(v.is_some_and(|v| v >= 0.0), "{name}: {v:?}");
    }
    assert!(metric_value(&text, "process_resident_memory_bytes", &[]).is_some_and(|v| v > 0.0));
    for result in ["ok", "rejected"] {
        assert_eq!(
            metric_value(&text, "sluice_config_reloads_total", &[("result", result)]),
            Some(0.0),
            "{result}"
        );
    }
    assert_eq!(
        metric_value(&text, "sluice_access_log_dropped_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "sluice_upstream_max_inflight",
            &[("upstream", "mall")]
        ),
        Some(7.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "sluice_upstream_max_inflight",
            &[("upstream", "cdn")]
        ),
        Some(64.0),
        "the documented default"
    );
    assert_eq!(metric_value(&text, "sluice_store_up", &[]), Some(1.0));
    // Without a health check a server counts as up.
    assert_eq!(
        metric_value(
            &text,
            "sluice_upstream_server_up",
            &[("upstream", "cdn"), ("server", &cdn.addr().to_string())]
        ),
        Some(1.0)
    );

    fn up(server: &str) -> [(&str, &str); 2] {
        [("upstream", "mall"), ("server", server)]
    }
    gw.wait_metric("sluice_upstream_server_up", &up(&a_addr), 1.0)
        .await;
    gw.wait_metric("sluice_upstream_server_up", &up(&b_addr), 0.0)
        .await;
    b.set_healthy(true);
    gw.wait_metric("sluice_upstream_server_up", &up(&b_addr), 1.0)
        .await;
    // A server that stops answering at all goes down too.
    b.stop();
    gw.wait_metric("sluice_upstream_server_up", &up(&b_addr), 0.0)
        .await;
    gw.wait_metric("sluice_upstream_server_up", &up(&a_addr), 1.0)
        .await;

    // The sold-out flag: 0 for a loaded sku on sale, 1 once this node
    // answers sold_out by itself, 0 again after a restock.
    put_stock(gw.admin(), "seckill", "p1", 1).await;
    let flag = [("rule", "seckill"), ("sku", "p1")];
    gw.wait_metric("sluice_soldout_flag", &flag, 0.0).await;
    assert_eq!(buy(gw.listen(), "p1", "u1").await, "forwarded");
    assert_eq!(buy(gw.listen(), "p1", "u2").await, "sold_out");
    gw.wait_metric("sluice_soldout_flag", &flag, 1.0).await;
    gw.wait_metric("sluice_stock_available", &flag, 0.0).await;
    put_stock(gw.admin(), "seckill", "p1", 5).await;
    gw.wait_metric("sluice_soldout_flag", &flag, 0.0).await;
    assert_eq!(buy(gw.listen(), "p1", "u2").await, "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_up_follows_a_real_redis() {
    let a = Upstream::start();
    let b = Upstream::start();
    let cdn = Upstream::start();
    let mut redis = RedisServer::start();
    let store = format!(
        "{{ backend: redis, redis: {{ url: \"{}\", timeout: 200ms, breaker_failures: 2, \
         breaker_interval: 200ms }} }}",
        redis.url()
    );
    let gw = start(&a, &b, &cdn, &store);
    gw.wait_metric("sluice_store_up", &[], 1.0).await;

    // Frozen: connections stay open, nothing answers within the timeout.
    redis.freeze();
    gw.wait_metric("sluice_store_up", &[], 0.0).await;
    redis.thaw();
    gw.wait_metric("sluice_store_up", &[], 1.0).await;

    // Killed: refused; restarted: up again (the breaker lets a try through).
    redis.kill();
    gw.wait_metric("sluice_store_up", &[], 0.0).await;
    redis.restart();
    gw.wait_metric("sluice_store_up", &[], 1.0).await;
    let text = gw.metrics().await;
    assert!(
        metric_value(&text, "sluice_store_errors_total", &[("op", "read")])
            .is_some_and(|n| n > 0.0),
        "the failed pings are counted as store errors"
    );
}
