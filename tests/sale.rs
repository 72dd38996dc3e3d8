//! Whole sales against real processes: several gateway nodes sharing one
//! real Redis, a backend that fails some winners, and Redis killed in the
//! middle of a sale. Nothing may be oversold, lost, or won twice.

use sluice_testkit as support;

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
    stock: { per_user_limit: 1 }
    release_on: [connect_error, timeout, 5xx]
"#;

fn config(up: &Upstream, store: &str) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         store: {store}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    read_timeout: 5s\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        up.addr()
    )
}

fn redis_store(r: &RedisServer) -> String {
    format!(
        "{{ backend: redis, recheck_interval: 200ms, redis: {{ url: \"{}\", timeout: 1s }} }}",
        r.url()
    )
}

fn node(up: &Upstream, store: &str) -> Gateway {
    Gateway::builder()
        .config(&config(up, store))
        .file("lua-free-rules/seckill.yaml", RULE)
        .start()
}

async fn load_stock(admin: SocketAddr, sku: &str, n: u64) -> serde_json::Value {
    let resp = request(
        admin,
        "PUT",
        &format!("/admin/v1/stock/seckill/{sku}"),
        &[("content-type", "application/json")],
        format!("{{\"available\": {n}}}").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "load stock: {}", resp.text());
    resp.json()
}

async fn stock(admin: SocketAddr, sku: &str) -> serde_json::Value {
    let resp = request(
        admin,
        "GET",
        &format!("/admin/v1/stock/seckill/{sku}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(resp.status, 200, "stock view: {}", resp.text());
    resp.json()
}

/// One buy attempt; returns (status, outcome).
async fn buy(listen: SocketAddr, sku: &str, user: &str) -> (u16, String) {
    let resp = request(
        listen,
        "POST",
        &format!("/api/seckill/{sku}/order"),
        &[("x-user-id", user)],
        b"{}",
    )
    .await;
    let outcome = resp
        .header("x-sluice-outcome")
        .unwrap_or("none")
        .to_string();
    (resp.status, outcome)
}

/// Runs `users` buyers, each clicking `clicks` times on successive nodes,
/// `concurrency` at a time; returns every (user, outcome).
async fn burst(
    nodes: &[SocketAddr],
    sku: &str,
    users: usize,
    clicks: usize,
    concurrency: usize,
) -> Vec<(String, String)> {
    burst_as(nodes, sku, "user", users, clicks, concurrency).await
}

/// `burst` with user ids `<prefix>-<n>`.
async fn burst_as(
    nodes: &[SocketAddr],
    sku: &str,
    prefix: &str,
    users: usize,
    clicks: usize,
    concurrency: usize,
) -> Vec<(String, String)> {
    let nodes = Arc::new(nodes.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let nodes = nodes.clone();
        let next = next.clone();
        let sku = sku.to_string();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= users * clicks {
                    return seen;
                }
                let (user, click) = (i / clicks, i % clicks);
                let user = format!("{prefix}-{user}");
                let at = nodes[(i + click) % nodes.len()];
                let (_, outcome) = buy(at, &sku, &user).await;
                seen.push((user, outcome));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("buyer task"));
    }
    all
}

fn count(outcomes: &[(String, String)], what: &str) -> usize {
    outcomes.iter().filter(|(_, o)| o == what).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_redis_sell_exactly_the_stock_once_per_user() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let store = redis_store(&redis);
    let nodes: Vec<Gateway> = (0..3).map(|_| node(&up, &store)).collect();
    load_stock(nodes[0].admin(), "phone", 60).await;

    let listens: Vec<SocketAddr> = nodes.iter().map(|n| n.listen()).collect();
    // 3000 users, each clicking twice on two different nodes.
    let outcomes = burst(&listens, "phone", 3000, 2, 48).await;

    assert_eq!(count(&outcomes, "forwarded"), 60, "winners != stock");
    let seen = up.recorded();
    assert_eq!(seen.len(), 60, "the backend did not get exactly the stock");
    let tickets: HashSet<_> = seen
        .iter()
        .filter_map(|r| r.header("x-sluice-ticket"))
        .collect();
    let users: HashSet<_> = seen.iter().filter_map(|r| r.header("x-user-id")).collect();
    assert_eq!(tickets.len(), 60, "a ticket reached the backend twice");
    assert_eq!(users.len(), 60, "a user won twice");
    for o in &outcomes {
        assert!(
            ["forwarded", "sold_out", "duplicate"].contains(&o.1.as_str()),
            "unexpected outcome {o:?}"
        );
    }
    // Every node sees the same ledger.
    for n in &nodes {
        // The last commits land just after their answers.
        let v = support::wait_for_stock(
            n.admin(),
            "seckill",
            "phone",
            Duration::from_secs(20),
            |v| v["in_flight"] == 0,
        )
        .await;
        assert_eq!(v["available"], 0);
        assert_eq!(v["sold"], 60);
        assert_eq!(v["in_flight"], 0);
        assert_eq!(v["initial"], 60);
    }
}

async fn failing_backend_resells(store: &str, up: &Upstream) {
    let gw = node(up, store);
    load_stock(gw.admin(), "phone", 30).await;
    up.set_fail_every(3);
    let mut outcomes = burst(&[gw.listen()], "phone", 900, 1, 24).await;
    // Each 500 released its unit, which was sold again to someone else. The
    // last failures may come after the last buyer: more buyers come then.
    for round in 0..200 {
        let v = stock(gw.admin(), "phone").await;
        if v["sold"] == 30 && v["in_flight"] == 0 {
            break;
        }
        if v["available"] == 0 {
            // Units still in flight may yet fail and come back.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let more = burst_as(&[gw.listen()], "phone", &format!("late{round}"), 10, 1, 1).await;
        outcomes.extend(more);
    }
    let v = stock(gw.admin(), "phone").await;
    assert_eq!(v["sold"], 30, "{v}");
    assert_eq!(v["available"], 0, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    let ok_orders = up.recorded().len() as u64 - up.requests() / 3;
    assert!(up.requests() > 30, "no failure happened");
    assert_eq!(ok_orders, 30, "successful orders != stock");
    let m = gw.metrics().await;
    let released = metric_value(
        &m,
        "sluice_released_total",
        &[("rule", "seckill"), ("reason", "5xx")],
    )
    .unwrap_or(0.0);
    assert_eq!(
        released as u64,
        up.requests() / 3,
        "every failure released its unit"
    );
    assert_eq!(count(&outcomes, "forwarded") as u64, up.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_units_are_resold_on_memory() {
    let up = Upstream::start();
    failing_backend_resells("{ backend: memory }", &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_backend_units_are_resold_on_redis() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    failing_backend_resells(&redis_store(&redis), &up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_sale_fails_closed_then_recovers_without_restart() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    // A short store timeout, so refusals while Redis is down are quick.
    let store = format!(
        "{{ backend: redis, recheck_interval: 200ms, redis: {{ url: \"{}\", timeout: 200ms }} }}",
        redis.url()
    );
    let gw = node(&up, &store);
    load_stock(gw.admin(), "phone", 5000).await;
    let first = burst(&[gw.listen()], "phone", 40, 1, 8).await;
    assert_eq!(count(&first, "forwarded"), 40);

    // Killed while a burst runs: whatever the store had not confirmed is
    // refused; only confirmed winners reach the backend.
    let listen = gw.listen();
    let during = tokio::spawn(async move { burst_as(&[listen], "phone", "mid", 300, 1, 8).await });
    // Killed once the burst is under way (ten of its orders reached the
    // backend), not after a fixed time: on a fast machine the whole burst
    // was over within 50 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (up.requests() as usize) < 40 + 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    redis.kill();
    let during = during.await.expect("burst");
    let forwarded_during = count(&during, "forwarded");
    let unavailable_during = count(&during, "unavailable");
    assert_eq!(
        forwarded_during + unavailable_during,
        300,
        "only confirmed winners and 503s"
    );
    assert!(
        unavailable_during > 0,
        "Redis died after the burst; the test proves nothing"
    );
    // Every confirmed winner reached the backend, and nothing else did.
    assert_eq!(
        up.requests() as usize,
        40 + forwarded_during,
        "forwarded != backend orders"
    );

    let down = burst(&[gw.listen()], "phone", 30, 1, 8).await;
    assert_eq!(count(&down, "unavailable"), 30, "{down:?}");
    let ready = request(gw.admin(), "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503, "ready without a store");
    assert_eq!(
        up.requests() as usize,
        40 + forwarded_during,
        "something was forwarded without the store"
    );

    // Back, but empty: nothing is sold until the operator loads stock, and
    // then the same gateway sells again.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, outcome) = buy(gw.listen(), "phone", "probe").await;
        assert_eq!(status, 503, "sold without stock: {outcome}");
        let resp = request(
            gw.admin(),
            "PUT",
            "/admin/v1/stock/seckill/phone",
            &[],
            br#"{"available": 5}"#,
        )
        .await;
        if resp.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway never reconnected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The admin's connection is back; the request path's reconnects on its
    // own, as fast as the machine lets it: buyers come once /readyz says so
    // (as a load balancer would send them).
    while request(gw.admin(), "GET", "/readyz", &[], b"").await.status != 200 {
        assert!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = burst(&[gw.listen()], "phone", 20, 1, 4).await;
    assert_eq!(count(&after, "forwarded"), 5, "{after:?}");
    assert_eq!(up.requests() as usize, 45 + forwarded_during);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_one_node_is_sold_on_another() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let store = redis_store(&redis);
    let (a, b) = (node(&up, &store), node(&up, &store));
    load_stock(a.admin(), "phone", 1).await;
    assert_eq!(buy(a.listen(), "phone", "first").await.1, "forwarded");
    // b learns the sku is gone and answers from its local flag.
    assert_eq!(buy(b.listen(), "phone", "second").await.1, "sold_out");
    assert_eq!(buy(b.listen(), "phone", "third").await.1, "sold_out");
    let ticket = up
        .last()
        .and_then(|r| r.header("x-sluice-ticket").map(str::to_string));
    let ticket = ticket.expect("the winner's ticket");
    let resp = request(
        a.admin(),
        "POST",
        "/admin/v1/release",
        &[],
        format!("{{\"ticket\": \"{ticket}\"}}").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["released"], 1);
    // b's flag clears within its recheck interval; poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (_, outcome) = buy(b.listen(), "phone", &format!("retry-{attempt}")).await;
        if outcome == "forwarded" {
            break;
        }
        assert_eq!(outcome, "sold_out");
        assert!(
            Instant::now() < deadline,
            "b never noticed the unit came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stock(b.admin(), "phone").await["available"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_capped_forwards_without_tickets_while_the_store_is_down() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let store = format!(
        "{{ backend: redis, on_failure: pass_capped, pass_cap: 2, redis: {{ url: \"{}\", timeout: 200ms }} }}",
        redis.url()
    );
    let gw = node(&up, &store);
    load_stock(gw.admin(), "phone", 10).await;
    assert_eq!(buy(gw.listen(), "phone", "before").await.1, "forwarded");
    redis.kill();
    // The operator chose to keep selling through an outage: requests go
    // through, without tickets, a few at a time.
    for i in 0..3 {
        let (status, outcome) = buy(gw.listen(), "phone", &format!("during-{i}")).await;
        assert_eq!((status, outcome.as_str()), (200, "forwarded"));
    }
    let seen = up.recorded();
    assert_eq!(seen.len(), 4);
    assert!(seen[0].header("x-sluice-ticket").is_some());
    for r in &seen[1..] {
        assert_eq!(
            r.header("x-sluice-ticket"),
            None,
            "a ticket without a store"
        );
    }
    // The cap holds: with the upstream stalled, at most 2 pass at once.
    up.set_stall(Duration::from_millis(500));
    let listen = gw.listen();
    let tasks: Vec<_> = (0..6)
        .map(|i| tokio::spawn(async move { buy(listen, "phone", &format!("burst-{i}")).await }))
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task").1);
    }
    assert!(
        up.peak_inflight() <= 2,
        "cap exceeded: {}",
        up.peak_inflight()
    );
    assert!(outcomes.iter().any(|o| o == "unavailable"), "{outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_is_each_rules_own_choice() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    // The store says fail_closed; one rule says pass_capped for itself.
    let store = format!(
        "{{ backend: redis, pass_cap: 1, redis: {{ url: \"{}\", timeout: 200ms }} }}",
        redis.url()
    );
    let vouchers = r#"rules:
  - name: vouchers
    match: { method: POST, path: "/api/vouchers/{sku}/grab" }
    user: { header: X-User-Id }
    sku: { path: sku }
    on_failure: pass_capped
"#;
    let gw = Gateway::builder()
        .config(&config(&up, &store))
        .file("lua-free-rules/seckill.yaml", RULE)
        .file("lua-free-rules/vouchers.yaml", vouchers)
        .start();
    redis.kill();
    let (status, outcome) = buy(gw.listen(), "phone", "closed").await;
    assert_eq!((status, outcome.as_str()), (503, "unavailable"));
    let resp = request(
        gw.listen(),
        "POST",
        "/api/vouchers/v1/grab",
        &[("x-user-id", "open")],
        b"{}",
    )
    .await;
    assert_eq!(resp.header("x-sluice-outcome"), Some("forwarded"));
    let seen = up.recorded();
    assert_eq!(seen.len(), 1, "only the pass_capped rule reached the mall");
    assert_eq!(seen[0].uri, "/api/vouchers/v1/grab");
    assert_eq!(seen[0].header("x-sluice-ticket"), None);
}

/// Store round trips, counted by the gateway's own metrics and by Redis
/// itself: a winner costs two (reserve; commit with the kept answer), a
/// loser once its sku is sold out costs none (the local flag answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_winner_costs_two_redis_round_trips_and_a_loser_after_sold_out_none() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    // A long recheck: the flag is not re-read from Redis during the test.
    let store = format!(
        "{{ backend: redis, recheck_interval: 1h, redis: {{ url: \"{}\", timeout: 1s }} }}",
        redis.url()
    );
    let gw = node(&up, &store);
    load_stock(gw.admin(), "phone", 20).await;
    let ops = |text: &str, op: &str| {
        metric_value(text, "sluice_store_duration_seconds_count", &[("op", op)]).unwrap_or(0.0)
    };
    let before = gw.metrics().await;
    let (exec_before, rename_before) = (redis.calls("exec"), redis.calls("rename"));
    for i in 0..20 {
        let (status, outcome) = buy(gw.listen(), "phone", &format!("w{i}")).await;
        assert_eq!((status, outcome.as_str()), (200, "forwarded"));
    }
    // Every reservation is in (the stock view below reads in a MULTI too).
    let exec_after = redis.calls("exec");
    // Commits land just after their answers.
    let view = support::wait_for_stock(
        gw.admin(),
        "seckill",
        "phone",
        Duration::from_secs(20),
        |v| v["in_flight"] == 0,
    )
    .await;
    assert_eq!(view["sold"], 20, "{view}");
    let after = gw.metrics().await;
    assert_eq!(ops(&after, "reserve") - ops(&before, "reserve"), 20.0);
    assert_eq!(ops(&after, "commit") - ops(&before, "commit"), 20.0);
    assert_eq!(ops(&after, "release") - ops(&before, "release"), 0.0);
    // A reservation is one MULTI/EXEC; a commit one pipeline, whose
    // RENAME Redis counts once per commit.
    assert_eq!(exec_after - exec_before, 20, "transactions for 20 winners");
    assert_eq!(
        redis.calls("rename") - rename_before,
        20,
        "commits of 20 winners"
    );

    // The first loser learns the sku is gone from Redis; the rest from
    // the local flag.
    let (_, first) = buy(gw.listen(), "phone", "late0").await;
    assert_eq!(first, "sold_out");
    let exec_mid = redis.calls("exec");
    let reserves_mid = ops(&gw.metrics().await, "reserve");
    for i in 1..50 {
        let (_, outcome) = buy(gw.listen(), "phone", &format!("late{i}")).await;
        assert_eq!(outcome, "sold_out");
    }
    assert_eq!(
        redis.calls("exec"),
        exec_mid,
        "losers after sold out reach Redis"
    );
    assert_eq!(ops(&gw.metrics().await, "reserve"), reserves_mid);
}
