//! Pass-through proxying through the real gateway binary, against real
//! loopback upstreams: bodies and queries, keep-alive, round robin, health
//! checks, upstream failure, header hygiene, limits, metrics, shutdown.

use sluice_testkit as support;

use std::time::{Duration, Instant};

use support::{get, metric_value, request, Conn, Gateway, Upstream};

/// A gateway config over the given upstream servers, with a fast health
/// check so tests see state changes quickly.
fn config(servers: &[&Upstream], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|u| u.addr().to_string()).collect();
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 1s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    connect_timeout: 500ms\n    read_timeout: 3s\n    \
         health_check: {{ path: /health, interval: 200ms }}\n\
         default_upstream: mall\n{extra}",
        list.join(", ")
    )
}

fn start(servers: &[&Upstream], extra: &str) -> Gateway {
    Gateway::builder().config(&config(servers, extra)).start()
}

/// Like `start`, without the health check (whose probes open connections).
fn start_unchecked(servers: &[&Upstream]) -> Gateway {
    let yaml = config(servers, "");
    let yaml = yaml.replace("    health_check: { path: /health, interval: 200ms }\n", "");
    assert!(!yaml.contains("health_check"));
    Gateway::builder().config(&yaml).start()
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

async fn healthy_servers(gw: &Gateway) -> u64 {
    let body = get(gw.admin(), "/readyz").await.json();
    body["upstreams"][0]["healthy"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_pass_through_with_query_and_body() {
    let up = Upstream::start();
    let gw = start(&[&up], "");

    let resp = get(gw.listen(), "/items/42?color=red&size=m").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-sluice-outcome"), Some("passthrough"));
    let seen = resp.json();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["uri"], "/items/42?color=red&size=m");

    let body = br#"{"cart":[1,2,3]}"#;
    let resp = request(
        gw.listen(),
        "POST",
        "/cart/checkout?coupon=x1",
        &[("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(resp.status, 200);
    let last = up.last().expect("upstream saw the POST");
    assert_eq!(last.method, "POST");
    assert_eq!(last.uri, "/cart/checkout?coupon=x1");
    assert_eq!(last.body, body);
    assert_eq!(last.header("content-type"), Some("application/json"));

    // The backend's own status passes through untouched.
    up.set_status(404);
    let resp = get(gw.listen(), "/missing").await;
    assert_eq!(resp.status, 404);
    assert_eq!(resp.header("x-sluice-outcome"), Some("passthrough"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_reused_on_both_sides() {
    let up = Upstream::start();
    let gw = start_unchecked(&[&up]);
    let mut conn = Conn::connect(gw.listen()).await;
    for i in 0..10 {
        let resp = conn
            .send("GET", &format!("/p/{i}"), &[], b"")
            .await
            .expect("request on a kept-alive connection");
        assert_eq!(resp.status, 200);
    }
    assert!(
        !conn.is_closed(),
        "the gateway closed a keep-alive connection"
    );
    assert_eq!(up.requests(), 10);
    // Sequential requests reuse one pooled upstream connection.
    assert_eq!(up.connections(), 1, "upstream connections were not reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_load_and_a_dead_one_is_skipped() {
    let a = Upstream::start();
    let mut b = Upstream::start();
    let gw = start(&[&a, &b], "");
    for _ in 0..20 {
        assert_eq!(get(gw.listen(), "/").await.status, 200);
    }
    // Round robin: an even split.
    assert_eq!(a.requests(), 10);
    assert_eq!(b.requests(), 10);

    // A server that dies is skipped at once (connect retry), then taken
    // out by the health check: no client sees an error.
    b.stop();
    for _ in 0..20 {
        let resp = get(gw.listen(), "/").await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    assert_eq!(a.requests(), 30);
    wait_until(
        Duration::from_secs(10),
        "health check to mark b down",
        async || healthy_servers(&gw).await == 1,
    )
    .await;
    let ready = get(gw.admin(), "/readyz").await;
    assert_eq!(ready.status, 200, "one healthy server is enough");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_server_gets_no_traffic_until_it_recovers() {
    let a = Upstream::start();
    let b = Upstream::start();
    let gw = start(&[&a, &b], "");
    b.set_healthy(false);
    wait_until(
        Duration::from_secs(10),
        "b to be marked unhealthy",
        async || healthy_servers(&gw).await == 1,
    )
    .await;
    let before = b.requests();
    for _ in 0..10 {
        assert_eq!(get(gw.listen(), "/").await.status, 200);
    }
    assert_eq!(b.requests(), before, "an unhealthy server got traffic");

    b.set_healthy(true);
    wait_until(Duration::from_secs(10), "b to recover", async || {
        healthy_servers(&gw).await == 2
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get(gw.listen(), "/").await.status, 200);
    }
    assert!(b.requests() > before, "a recovered server got no traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_answers_json_unavailable() {
    let mut up = Upstream::start();
    let gw = start(&[&up], "");
    up.stop();
    // Before the health check notices: the connect fails.
    let resp = get(gw.listen(), "/").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.header("x-sluice-outcome"), Some("unavailable"));
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let body = resp.json();
    assert_eq!(body["outcome"], "unavailable");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));

    // After it notices: no server is selected at all; same answer.
    wait_until(
        Duration::from_secs(10),
        "the server to be marked down",
        async || healthy_servers(&gw).await == 0,
    )
    .await;
    let resp = request(gw.listen(), "POST", "/order", &[], b"{}").await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.json()["outcome"], "unavailable");
    assert_eq!(get(gw.admin(), "/readyz").await.status, 503);

    // Requests are counted just after their answer: wait for the count.
    gw.wait_metric(
        "sluice_requests_total",
        &[("rule", "none"), ("outcome", "unavailable")],
        2.0,
    )
    .await;
    let metrics = gw.metrics().await;
    let errors = metric_value(
        &metrics,
        "sluice_upstream_responses_total",
        &[("upstream", "mall"), ("class", "error")],
    );
    assert_eq!(
        errors,
        Some(1.0),
        "one failed connect, then no server tried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_headers_are_stripped_and_forwarded_for_is_set() {
    let up = Upstream::start();
    let gw = start(&[&up], "");
    let resp = request(
        gw.listen(),
        "POST",
        "/api/order",
        &[
            ("X-Sluice-Ticket", "forged"),
            ("x-sluice-quantity", "100"),
            ("X-Sluice-Rule", "vip"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Shop-Token", "kept"),
        ],
        b"{}",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = up.last().expect("upstream saw it");
    for (name, _) in &seen.headers {
        assert!(!name.starts_with("x-sluice-"), "{name} reached the backend");
    }
    // The peer is not a trusted proxy: its claimed chain is dropped.
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-shop-token"), Some("kept"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_chain_is_extended() {
    let up = Upstream::start();
    let gw = start(&[&up], "trusted_proxies: [127.0.0.0/8]\n");
    let resp = request(
        gw.listen(),
        "GET",
        "/",
        &[("X-Forwarded-For", "198.51.100.4")],
        b"",
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = up.last().expect("upstream saw it");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("198.51.100.4, 127.0.0.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_upstream_classes() {
    let up = Upstream::start();
    let gw = start(&[&up], "");
    let before = gw.metrics().await;
    assert_eq!(
        metric_value(
            &before,
            "sluice_requests_total",
            &[("rule", "none"), ("outcome", "passthrough")]
        ),
        Some(0.0),
        "series known from config exist from the start"
    );
    for _ in 0..7 {
        get(gw.listen(), "/").await;
    }
    up.set_status(502);
    for _ in 0..3 {
        get(gw.listen(), "/").await;
    }
    let passthrough = [("rule", "none"), ("outcome", "passthrough")];
    gw.wait_metric("sluice_requests_total", &passthrough, 10.0)
        .await;
    gw.wait_metric("sluice_request_duration_seconds_count", &passthrough, 10.0)
        .await;
    let m = gw.metrics().await;
    let class = |c| {
        metric_value(
            &m,
            "sluice_upstream_responses_total",
            &[("upstream", "mall"), ("class", c)],
        )
    };
    assert_eq!(class("2xx"), Some(7.0));
    assert_eq!(class("5xx"), Some(3.0));
    assert_eq!(get(gw.admin(), "/healthz").await.status, 200);
    assert_eq!(get(gw.admin(), "/nope").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_answer_431_and_413() {
    let up = Upstream::start();
    let gw = start(
        &[&up],
        "limits: { max_header_bytes: 2KiB, max_body_bytes: 1KiB }\n",
    );
    let big = "x".repeat(3000);
    let resp = request(gw.listen(), "GET", "/", &[("X-Big", big.as_str())], b"").await;
    assert_eq!(resp.status, 431);
    assert_eq!(resp.header("x-sluice-outcome"), Some("invalid"));

    let resp = request(gw.listen(), "POST", "/upload", &[], &[b'a'; 2048]).await;
    assert_eq!(resp.status, 413);
    assert_eq!(resp.json()["outcome"], "invalid");
    assert_eq!(up.requests(), 0, "a refused request reached the backend");

    // Chunked bodies have no length up front; they are cut off as they grow.
    let resp = request(
        gw.listen(),
        "POST",
        "/upload",
        &[("transfer-encoding", "chunked")],
        &[b'a'; 4096],
    )
    .await;
    assert_eq!(resp.status, 413, "{}", resp.text());
    // Its head may have been streamed on already, but never a whole body.
    assert!(
        up.recorded().is_empty(),
        "a body over the limit reached the backend whole"
    );

    let resp = request(gw.listen(), "POST", "/upload", &[], &[b'a'; 512]).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let up = Upstream::start();
    let mut gw = start(&[&up], "");
    up.set_stall(Duration::from_millis(600));
    let addr = gw.listen();
    let in_flight = tokio::spawn(async move { get(addr, "/slow").await });
    wait_until(
        Duration::from_secs(5),
        "the request to reach the upstream",
        async || up.inflight() == 1,
    )
    .await;
    gw.sigterm();
    let resp = in_flight.await.expect("request task");
    assert_eq!(resp.status, 200, "an in-flight request was cut by SIGTERM");
    // grace_period 1s + timeout 1s, with slack for a loaded machine.
    let status = gw
        .wait_exit(Duration::from_secs(15))
        .expect("the gateway did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}\n{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_shows_the_effective_config_without_secrets() {
    let up = Upstream::start();
    let gw = start(
        &[&up],
        "store: { backend: memory, redis: { url: \"redis://app:hunter2@10.0.0.9:6379/0\" } }\n",
    );
    let resp = get(gw.admin(), "/admin/v1/config").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        !resp.text().contains("hunter2"),
        "a secret leaked: {}",
        resp.text()
    );
    let c = resp.json();
    assert_eq!(c["listen"], gw.listen().to_string());
    assert_eq!(
        c["store"]["redis"]["url"],
        "redis://app:***@10.0.0.9:6379/0"
    );
    assert_eq!(c["upstreams"][0]["servers"][0], up.addr().to_string());
    // Defaults are shown as they are in force.
    assert_eq!(c["upstreams"][0]["max_inflight"], 64);
    assert_eq!(c["limits"]["max_body_bytes"], 16 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_matched_body_over_its_limit_is_413_before_admission() {
    let up = Upstream::start();
    let gw = Gateway::builder()
        .config(&config(
            &[&up],
            "rules: lua-free-rules/*.yaml\nlimits: { max_rule_body_bytes: 1KiB }\n",
        ))
        .file(
            "lua-free-rules/buy.yaml",
            "rules:\n  - name: buy\n    match: { method: POST, path: \"/buy/{sku}\" }\n    \
             user: { header: X-User-Id }\n    sku: { path: sku }\n",
        )
        .start();
    let big = vec![b'x'; 2048];
    let declared = request(gw.listen(), "POST", "/buy/p1", &[("x-user-id", "u1")], &big).await;
    assert_eq!(declared.status, 413, "{}", declared.text());
    assert_eq!(declared.header("x-sluice-outcome"), Some("invalid"));
    let chunked = request(
        gw.listen(),
        "POST",
        "/buy/p1",
        &[("x-user-id", "u1"), ("transfer-encoding", "chunked")],
        &big,
    )
    .await;
    assert_eq!(chunked.status, 413, "{}", chunked.text());
    assert_eq!(up.requests(), 0, "a refused body reached the backend");
    // The default pass-through limit (16 MiB) is not the rule's.
    assert_eq!(
        request(gw.listen(), "POST", "/other", &[], &big)
            .await
            .status,
        200
    );
}
