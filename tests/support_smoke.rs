//! Smoke tests for the integration-test support helpers that do not need the gateway.

use sluice_testkit as support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{get, metric_value, request, Conn, RedisServer, Upstream};

/// Sends a raw `PING` to `addr` and returns what came back (empty on any error).
fn raw_ping(addr: std::net::SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(b"PING\r\n").unwrap();
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_get_with_json_and_counts_it() {
    let up = Upstream::start();
    let resp = get(up.addr(), "/items/7?x=1").await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("Content-Type"), Some("application/json"));
    let addr = up.addr().to_string();
    assert_eq!(resp.header("x-upstream"), Some(addr.as_str()));
    let json = resp.json();
    assert_eq!(json["upstream"], addr.as_str());
    assert_eq!(json["method"], "GET");
    assert_eq!(json["uri"], "/items/7?x=1");
    assert_eq!(json["body"], "");
    assert_eq!(json["n"], 1);
    assert_eq!(up.requests(), 1);
    assert_eq!(up.connections(), 1);
    assert_eq!(up.inflight(), 0);

    let resp = request(
        up.addr(),
        "POST",
        "/orders",
        &[("X-Trace", "abc")],
        b"{\"sku\":1}",
    )
    .await;
    assert_eq!(resp.json()["body"], "{\"sku\":1}");
    assert_eq!(resp.json()["n"], 2);
    let last = up.last().expect("a recorded request");
    assert_eq!(last.method, "POST");
    assert_eq!(last.uri, "/orders");
    assert_eq!(last.body, b"{\"sku\":1}");
    assert_eq!(last.header("x-trace"), Some("abc"));
    assert_eq!(last.header("content-length"), Some("9"));
    assert_eq!(
        last.header("host"),
        Some(format!("127.0.0.1:{}", up.addr().port()).as_str())
    );

    // Health checks are answered and counted separately.
    assert_eq!(get(up.addr(), "/health").await.text(), "ok");
    up.set_healthy(false);
    assert_eq!(get(up.addr(), "/health").await.status, 503);
    assert_eq!(up.health_checks(), 2);
    assert_eq!(up.requests(), 2);
    assert_eq!(up.recorded().len(), 2);

    up.reset_counters();
    assert_eq!(up.requests(), 0);
    assert_eq!(up.connections(), 0);
    assert!(up.recorded().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_one_connection() {
    let up = Upstream::start();
    let mut conn = Conn::connect(up.addr()).await;
    let a = conn.send("GET", "/a", &[], b"").await.unwrap();
    let b = conn.send("PUT", "/b", &[], b"hello").await.unwrap();
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(b.json()["body"], "hello");
    assert!(!conn.is_closed());
    assert_eq!(up.connections(), 1);
    assert_eq!(up.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_fail_every_knobs() {
    let up = Upstream::start();
    up.set_status(500);
    assert_eq!(get(up.addr(), "/").await.status, 500);
    up.set_status(200);
    up.set_fail_every(3);
    let mut conn = Conn::connect(up.addr()).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(conn.send("GET", "/", &[], b"").await.unwrap().status);
    }
    // Request numbers 2..=7: numbers 3 and 6 fail.
    assert_eq!(statuses, [200, 500, 200, 200, 500, 200]);
    up.set_fail_every(0);
    assert_eq!(get(up.addr(), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_raises_peak_inflight() {
    let up = Upstream::start();
    up.set_stall(Duration::from_millis(400));
    let addr = up.addr();
    let handles: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { get(addr, "/slow").await.status }))
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(up.peak_inflight(), 3);
    assert_eq!(up.inflight(), 0);
    assert_eq!(up.connections(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_refuses_new_and_drops_open_connections() {
    let mut up = Upstream::start();
    let addr = up.addr();
    let mut open = Conn::connect(addr).await;
    assert_eq!(open.send("GET", "/", &[], b"").await.unwrap().status, 200);
    up.stop();
    assert!(
        Conn::try_connect(addr).await.is_err(),
        "connect after stop() should be refused"
    );
    assert!(
        open.send("GET", "/", &[], b"").await.is_err(),
        "a connection open across stop() should be dropped"
    );
}

#[test]
fn metric_value_parses_prometheus_text() {
    let text = r#"# HELP sluice_request_duration_seconds Request latency.
# TYPE sluice_request_duration_seconds histogram
sluice_request_duration_seconds_bucket{route="buy",le="0.1"} 4
sluice_request_duration_seconds_bucket{route="buy",le="+Inf"} 9
sluice_request_duration_seconds_count{route="buy"} 9
sluice_request_duration_seconds_sum{route="buy"} 0.75
sluice_requests_total{route="buy",outcome="admitted"} 12
sluice_requests_total{route="buy",outcome="shed",note="a,b=\"c}\""} 3
sluice_inflight 2
"#;
    assert_eq!(
        metric_value(text, "sluice_request_duration_seconds_count", &[]),
        Some(9.0)
    );
    assert_eq!(
        metric_value(text, "sluice_request_duration_seconds", &[]),
        None
    );
    assert_eq!(
        metric_value(
            text,
            "sluice_request_duration_seconds_bucket",
            &[("le", "+Inf")]
        ),
        Some(9.0)
    );
    assert_eq!(
        metric_value(text, "sluice_requests_total", &[("outcome", "admitted")]),
        Some(12.0)
    );
    assert_eq!(
        metric_value(
            text,
            "sluice_requests_total",
            &[("outcome", "shed"), ("route", "buy")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(text, "sluice_requests_total", &[("note", "a,b=\"c}\"")]),
        Some(3.0)
    );
    assert_eq!(
        metric_value(text, "sluice_requests_total", &[("outcome", "nope")]),
        None
    );
    assert_eq!(metric_value(text, "sluice_inflight", &[]), Some(2.0));
    assert_eq!(metric_value(text, "sluice_inflight", &[("a", "b")]), None);
    assert_eq!(metric_value(text, "sluice_request", &[]), None);
}

#[test]
fn redis_server_starts_kills_and_restarts() {
    let mut redis = RedisServer::start();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/0", redis.port()));
    assert!(raw_ping(redis.addr()).starts_with("+PONG"));
    redis.kill();
    assert!(
        TcpStream::connect_timeout(&redis.addr(), Duration::from_secs(1)).is_err(),
        "connect after kill() should be refused"
    );
    redis.restart();
    assert!(raw_ping(redis.addr()).starts_with("+PONG"));
}
