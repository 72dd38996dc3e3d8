//! Peak shaving against real processes: the backend never sees more than
//! `max_inflight` admitted requests, winners that find no slot are queued
//! with a ticket and served later by the gateway itself, and no slot or
//! unit leaks when the queue is full, a client leaves or the backend dies.

use sluice_testkit as support;
use support::both_stores;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{metric_value, request, Gateway, RedisServer, Upstream};

const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
    admission: { queue: { max_wait: MAXWAIT, capacity: CAPACITY, max_attempts: 2, backoff: 50ms } }
    release_on: [connect_error, timeout, 5xx]
"#;

struct Sale {
    max_inflight: u32,
    max_wait: &'static str,
    capacity: u32,
    claim_idle: &'static str,
}

impl Default for Sale {
    fn default() -> Self {
        Self {
            max_inflight: 4,
            max_wait: "20ms",
            capacity: 10_000,
            claim_idle: "30s",
        }
    }
}

fn node(up: &Upstream, store: &str, sale: &Sale) -> Gateway {
    let config = format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         store: {store}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    max_inflight: {}\n    \
         connect_timeout: 300ms\n    read_timeout: 1s\n    queue_claim_idle: {}\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        up.addr(),
        sale.max_inflight,
        sale.claim_idle
    );
    let rule = RULE
        .replace("MAXWAIT", sale.max_wait)
        .replace("CAPACITY", &sale.capacity.to_string());
    Gateway::builder()
        .config(&config)
        .file("lua-free-rules/seckill.yaml", &rule)
        .start()
}

fn memory() -> (String, Option<RedisServer>) {
    ("{ backend: memory }".to_string(), None)
}

fn redis() -> (String, Option<RedisServer>) {
    let r = RedisServer::start();
    (
        format!(
            "{{ backend: redis, redis: {{ url: \"{}\", timeout: 1s }} }}",
            r.url()
        ),
        Some(r),
    )
}

async fn load_stock(admin: SocketAddr, n: u64) {
    let resp = request(
        admin,
        "PUT",
        "/admin/v1/stock/seckill/phone",
        &[],
        format!("{{\"available\": {n}}}").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

async fn stock(admin: SocketAddr) -> serde_json::Value {
    request(admin, "GET", "/admin/v1/stock/seckill/phone", &[], b"")
        .await
        .json()
}

/// `users` buyers, `concurrency` at a time; returns (user, status, body).
async fn buyers(
    listen: SocketAddr,
    users: usize,
    concurrency: usize,
) -> Vec<(String, u16, serde_json::Value, String)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= users {
                    return out;
                }
                let user = format!("user-{i}");
                let resp = request(
                    listen,
                    "POST",
                    "/api/seckill/phone/order",
                    &[("x-user-id", user.as_str())],
                    b"{}",
                )
                .await;
                let outcome = resp.header("x-sluice-outcome").unwrap_or("").to_string();
                let body = serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null);
                out.push((user, resp.status, body, outcome));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("buyer"));
    }
    all
}

/// Waits (bounded) until no admitted request is at the upstream.
async fn wait_inflight_zero(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if metric_value(&m, "sluice_upstream_inflight", &[("upstream", "mall")]) == Some(0.0) {
            return;
        }
        assert!(Instant::now() < deadline, "a slot leaked: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a ticket until it is no longer queued or in flight; returns the
/// final status and the positions seen on the way.
async fn wait_done(listen: SocketAddr, ticket: &str, limit: Duration) -> (u16, Vec<u64>) {
    let deadline = Instant::now() + limit;
    let mut positions = Vec::new();
    loop {
        let resp = request(
            listen,
            "GET",
            &format!("/sluice/tickets/{ticket}"),
            &[],
            b"",
        )
        .await;
        match resp.status {
            202 => {
                if let Some(p) = resp.json()["position"].as_u64() {
                    positions.push(p);
                }
            }
            409 => {}
            done => return (done, positions),
        }
        assert!(Instant::now() < deadline, "ticket {ticket} never finished");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

both_stores!(
    a_slow_backend_never_sees_more_than_max_inflight,
    a_full_queue_answers_unavailable_and_returns_units,
    a_dead_backend_while_draining_releases_after_retries,
);

async fn a_slow_backend_never_sees_more_than_max_inflight(
    (store, _r): (String, Option<RedisServer>),
) {
    let up = Upstream::start();
    up.set_stall(Duration::from_millis(30));
    let gw = node(&up, &store, &Sale::default());
    load_stock(gw.admin(), 200).await;
    let answers = buyers(gw.listen(), 200, 50).await;

    let queued: Vec<&str> = answers
        .iter()
        .filter(|a| a.3 == "queued")
        .map(|a| a.2["ticket"].as_str().expect("ticket"))
        .collect();
    let forwarded = answers.iter().filter(|a| a.3 == "forwarded").count();
    assert_eq!(
        forwarded + queued.len(),
        200,
        "every buyer is a winner here"
    );
    assert!(
        !queued.is_empty(),
        "nothing was queued; the test proves nothing"
    );
    for a in answers.iter().filter(|a| a.3 == "queued") {
        assert_eq!(a.1, 202);
        assert!(
            a.2["position"].as_u64().is_some_and(|p| p >= 1),
            "{:?}",
            a.2
        );
    }
    // Every queued ticket ends done, and positions only shrink.
    let mut all_positions_shrink = true;
    for t in &queued {
        let (status, positions) = wait_done(gw.listen(), t, Duration::from_secs(60)).await;
        assert_eq!(status, 200, "ticket {t}");
        all_positions_shrink &= positions.windows(2).all(|w| w[1] <= w[0]);
    }
    assert!(all_positions_shrink, "a position grew while draining");
    assert!(
        up.peak_inflight() <= 4,
        "peak {} > max_inflight",
        up.peak_inflight()
    );
    let seen = up.recorded();
    let tickets: HashSet<_> = seen
        .iter()
        .filter_map(|r| r.header("x-sluice-ticket"))
        .collect();
    assert_eq!(
        seen.len(),
        200,
        "the backend saw a ticket twice or missed one"
    );
    assert_eq!(tickets.len(), 200);
    let v = stock(gw.admin()).await;
    assert_eq!(
        (
            v["sold"].as_u64(),
            v["queued"].as_u64(),
            v["in_flight"].as_u64()
        ),
        (Some(200), Some(0), Some(0)),
        "{v}"
    );
    wait_inflight_zero(&gw).await;
    let m = gw.metrics().await;
    let waited = metric_value(
        &m,
        "sluice_queue_wait_seconds_count",
        &[("upstream", "mall")],
    );
    assert_eq!(waited, Some(queued.len() as f64));
}

async fn a_full_queue_answers_unavailable_and_returns_units(
    (store, _r): (String, Option<RedisServer>),
) {
    let up = Upstream::start();
    up.set_stall(Duration::from_millis(400));
    let sale = Sale {
        max_inflight: 1,
        max_wait: "0s",
        capacity: 2,
        ..Sale::default()
    };
    let gw = node(&up, &store, &sale);
    load_stock(gw.admin(), 10).await;
    let answers = buyers(gw.listen(), 8, 8).await;
    let count = |o: &str| answers.iter().filter(|a| a.3 == o).count();
    let (fwd, queued, unavailable) = (count("forwarded"), count("queued"), count("unavailable"));
    assert_eq!(fwd + queued + unavailable, 8, "{answers:?}");
    assert!(queued <= 2, "queue over capacity: {queued}");
    assert!(unavailable >= 5, "{answers:?}");
    for a in answers.iter().filter(|a| a.3 == "unavailable") {
        assert_eq!(a.1, 503);
    }
    // Refused winners gave their units back at once.
    let v = stock(gw.admin()).await;
    let held = v["sold"].as_u64().unwrap_or(0)
        + v["in_flight"].as_u64().unwrap_or(0)
        + v["queued"].as_u64().unwrap_or(0);
    assert_eq!(held as usize, fwd + queued, "{v}");
    assert_eq!(v["available"].as_u64(), Some(10 - held), "{v}");
    // Everything drains; no slot leaks.
    for a in answers.iter().filter(|a| a.3 == "queued") {
        let (status, _) = wait_done(
            gw.listen(),
            a.2["ticket"].as_str().expect("t"),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(status, 200);
    }
    // The drainer frees its slot just after the ticket shows done.
    wait_inflight_zero(&gw).await;
    assert!(up.peak_inflight() <= 1);
}

async fn a_dead_backend_while_draining_releases_after_retries(
    (store, _r): (String, Option<RedisServer>),
) {
    let mut up = Upstream::start();
    up.set_stall(Duration::from_millis(300));
    let sale = Sale {
        max_inflight: 1,
        max_wait: "0s",
        ..Sale::default()
    };
    let gw = node(&up, &store, &sale);
    load_stock(gw.admin(), 10).await;
    let answers = buyers(gw.listen(), 5, 5).await;
    let queued: Vec<String> = answers
        .iter()
        .filter(|a| a.3 == "queued")
        .map(|a| a.2["ticket"].as_str().expect("ticket").to_string())
        .collect();
    assert!(!queued.is_empty(), "{answers:?}");
    // The backend dies while the queue drains: retried, then released.
    up.stop();
    for t in &queued {
        let (status, _) = wait_done(gw.listen(), t, Duration::from_secs(30)).await;
        assert_eq!(status, 503, "ticket {t} should show the failure");
        let body = request(
            gw.listen(),
            "GET",
            &format!("/sluice/tickets/{t}"),
            &[],
            b"",
        )
        .await;
        assert_eq!(body.json()["outcome"], "unavailable");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = stock(gw.admin()).await;
        let (q, f) = (v["queued"].as_u64(), v["in_flight"].as_u64());
        if q == Some(0) && f == Some(0) {
            let sold = v["sold"].as_u64().unwrap_or(0);
            assert_eq!(v["available"].as_u64(), Some(10 - sold), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "units never came back: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_inflight_zero(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_waiting_leaks_no_slot() {
    let up = Upstream::start();
    up.set_stall(Duration::from_millis(500));
    let sale = Sale {
        max_inflight: 1,
        max_wait: "2s",
        ..Sale::default()
    };
    let gw = node(&up, "{ backend: memory }", &sale);
    load_stock(gw.admin(), 10).await;
    let listen = gw.listen();
    let first = tokio::spawn(async move {
        request(
            listen,
            "POST",
            "/api/seckill/phone/order",
            &[("x-user-id", "a")],
            b"{}",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The second buyer waits for the slot, then gives up and disconnects.
    let leaver = tokio::spawn(async move {
        let mut conn = support::Conn::connect(listen).await;
        let _ = tokio::time::timeout(
            Duration::from_millis(150),
            conn.send(
                "POST",
                "/api/seckill/phone/order",
                &[("x-user-id", "b")],
                b"{}",
            ),
        )
        .await;
        drop(conn);
    });
    leaver.await.expect("leaver");
    assert_eq!(first.await.expect("first").status, 200);
    // Whatever became of the leaver's order, nothing stays in flight.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = gw.metrics().await;
        let inflight = metric_value(&m, "sluice_upstream_inflight", &[("upstream", "mall")]);
        let v = stock(gw.admin()).await;
        let settled = v["in_flight"].as_u64() == Some(0) && v["queued"].as_u64() == Some(0);
        if inflight == Some(0.0) && settled {
            let sold = v["sold"].as_u64().unwrap_or(0);
            assert_eq!(v["available"].as_u64(), Some(10 - sold), "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot or units leaked: {inflight:?} {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up.peak_inflight() <= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_drain_loses_nothing() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    up.set_stall(Duration::from_millis(100));
    let store = format!(
        "{{ backend: redis, redis: {{ url: \"{}\", timeout: 1s }} }}",
        redis.url()
    );
    let sale = Sale {
        max_inflight: 2,
        max_wait: "0s",
        claim_idle: "3s",
        ..Sale::default()
    };
    let mut a = node(&up, &store, &sale);
    // b runs alongside from the start, sharing the Redis queue.
    let b = node(&up, &store, &sale);
    load_stock(a.admin(), 40).await;
    let answers = buyers(a.listen(), 40, 20).await;
    let queued: Vec<String> = answers
        .iter()
        .filter(|x| x.3 == "queued")
        .map(|x| x.2["ticket"].as_str().expect("ticket").to_string())
        .collect();
    assert!(queued.len() >= 20, "{} queued", queued.len());
    // Let a take some entries, then kill it with entries pending.
    tokio::time::sleep(Duration::from_millis(150)).await;
    // a holds entries it took (in its consumer's pending list) when it dies.
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // Extended form: one row per pending entry, with its consumer, whose
    // name carries the node's pid.
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg("sluice:{queue:mall}")
        .arg("sluice")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut conn)
        .await
        .expect("xpending");
    let mine = format!("-{}-", a.pid());
    let held = rows.iter().filter(|r| r.1.contains(&mine)).count();
    assert!(held > 0, "the node held nothing when it died: {rows:?}");
    a.kill();
    for t in &queued {
        let (status, _) = wait_done(b.listen(), t, Duration::from_secs(60)).await;
        assert_eq!(status, 200, "ticket {t} was lost with its node");
    }
    // At least once: each queued ticket reached the backend, some maybe twice.
    let seen: HashSet<String> = up
        .recorded()
        .iter()
        .filter_map(|r| r.header("x-sluice-ticket").map(str::to_string))
        .collect();
    for t in &queued {
        assert!(seen.contains(t), "ticket {t} never reached the backend");
    }
}
