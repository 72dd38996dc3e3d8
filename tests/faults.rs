//! The promise under faults, with real processes: a frozen Redis, a Redis
//! killed and restarted from its append-only file, a gateway killed with
//! orders at the mall, a Redis restarted empty, a huge restock, queued
//! orders that wait too long. After each: the stock view adds up, no unit
//! stays held past its lease, no buyer is locked out, and the gateway
//! still serves a normal order.

use sluice_testkit as support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::shop::field;
use support::{
    assert_adds_up, metric_value, put_stock, stock_view, wait_for_stock, Conn, Gateway,
    RedisServer, Upstream,
};

const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
    stock: { per_user_limit: 1 }
    admission: { queue: { max_wait: 0s, max_queue_time: 1s } }
"#;

/// A gateway config on `redis` with short timeouts, so leases are short:
/// forwarded holds live 0.2 + 1 + 1 + 0.5 = 2.7 s at most.
fn config(up: &Upstream, redis: &RedisServer, extra: &str) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         store:\n  backend: redis\n  recheck_interval: 100ms\n  sweep_interval: 100ms\n  \
         lease_margin: 500ms\n  in_doubt_for: 3s\n  \
         redis: {{ url: \"{}\", timeout: 50ms, breaker_interval: 200ms }}\n\
         {extra}\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    connect_timeout: 200ms\n    \
         read_timeout: 1s\n    write_timeout: 1s\n    max_inflight: 64\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        redis.url(),
        up.addr()
    )
}

fn node(up: &Upstream, redis: &RedisServer, extra: &str) -> Gateway {
    Gateway::builder()
        .config(&config(up, redis, extra))
        .file("lua-free-rules/seckill.yaml", RULE)
        .start()
}

/// One order; gives (status, outcome), or (0, "error") when the gateway
/// went away (a test killed it).
async fn buy(listen: SocketAddr, user: &str) -> (u16, String) {
    let Ok(mut conn) = Conn::try_connect(listen).await else {
        return (0, "error".into());
    };
    match conn
        .send(
            "POST",
            "/api/seckill/p1/order",
            &[("x-user-id", user)],
            b"{}",
        )
        .await
    {
        Ok(resp) => {
            let outcome = resp
                .header("x-sluice-outcome")
                .unwrap_or("none")
                .to_string();
            (resp.status, outcome)
        }
        Err(_) => (0, "error".into()),
    }
}

/// `users` buyers named `<prefix>-<n>`, `concurrency` at a time; gives
/// every (user, outcome).
async fn burst(
    listen: SocketAddr,
    prefix: &str,
    users: usize,
    concurrency: usize,
) -> Vec<(String, String)> {
    burst_retrying(listen, prefix, users, concurrency, &[]).await
}

/// Like `burst`, but a buyer answered one of `retry_on` tries again, as a
/// real client does after a 503, for up to 20 s; gives each buyer's last
/// outcome. For the phases after a fault: on a loaded machine a 50 ms
/// store call may still time out (`unavailable`, failing closed), and the
/// answer of a reservation sent just before lands a moment later (its own
/// buyer is `duplicate` until it is undone). What these phases check is
/// that no buyer stays locked out.
async fn burst_retrying(
    listen: SocketAddr,
    prefix: &str,
    users: usize,
    concurrency: usize,
    retry_on: &'static [&'static str],
) -> Vec<(String, String)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= users {
                    return seen;
                }
                let user = format!("{prefix}-{i}");
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut outcome = buy(listen, &user).await.1;
                while retry_on.contains(&outcome.as_str()) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    outcome = buy(listen, &user).await.1;
                }
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

fn count(seen: &[(String, String)], outcome: &str) -> usize {
    seen.iter().filter(|(_, o)| o == outcome).count()
}

/// The tickets the mall received (its own order ids).
fn mall_tickets(up: &Upstream) -> Vec<String> {
    up.recorded()
        .iter()
        .filter_map(|r| r.header("x-sluice-ticket").map(str::to_string))
        .collect()
}

/// Commands of `name` Redis has run so far (`INFO commandstats`).
async fn redis_calls(redis: &RedisServer, name: &str) -> u64 {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    let prefix = format!("cmdstat_{name}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_strands_no_unit_and_locks_out_no_buyer() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let gw = node(&up, &redis, "");
    put_stock(gw.admin(), "seckill", "p1", 100).await;
    let before = redis_calls(&redis, "exec").await;

    // Frozen: every order is refused; the breaker keeps most of them
    // from even reaching Redis.
    redis.freeze();
    let during = burst(gw.listen(), "frozen", 60, 4).await;
    assert_eq!(count(&during, "unavailable"), 60, "{during:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.thaw();

    // Whatever ran once Redis woke is undone: nothing stays held and no
    // buyer is left marked.
    let view = wait_for_stock(gw.admin(), "seckill", "p1", Duration::from_secs(20), |v| {
        field(v, "in_flight") == 0 && field(v, "available") == 100
    })
    .await;
    assert_adds_up(&view);
    assert_eq!(up.requests(), 0, "nothing reached the mall");
    let sent = redis_calls(&redis, "exec").await - before;
    assert!(
        sent < 30,
        "{sent} transactions reached Redis for 60 refused orders: the breaker did not hold"
    );

    // Every refused buyer may try again, and wins.
    let again = burst_retrying(gw.listen(), "frozen", 60, 4, &["unavailable", "duplicate"]).await;
    assert_eq!(count(&again, "forwarded"), 60, "{again:?}");
    // Each commit lands just after its answer.
    let view = wait_for_stock(gw.admin(), "seckill", "p1", Duration::from_secs(20), |v| {
        field(v, "in_flight") == 0
    })
    .await;
    assert_eq!((field(&view, "sold"), field(&view, "available")), (60, 40));
    assert_adds_up(&view);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_from_its_aof_sells_exactly_what_the_mall_took() {
    let mut redis = RedisServer::start_with_aof();
    let up = Upstream::start();
    // Slow enough that some orders are at the mall when Redis dies.
    up.set_stall(Duration::from_millis(20));
    let gw = node(&up, &redis, "");
    put_stock(gw.admin(), "seckill", "p1", 300).await;

    let listen = gw.listen();
    let sale = tokio::spawn(async move { burst(listen, "buyer", 600, 16).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart();
    let seen = sale.await.expect("sale");
    assert!(count(&seen, "unavailable") > 0, "Redis died after the sale");

    // Commits lost with Redis are journaled and land once it is back;
    // holds whose outcome nobody knows go back after their lease.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = gw.metrics().await;
        let pending = metric_value(&metrics, "sluice_settlements_pending", &[]);
        let view = stock_view(gw.admin(), "seckill", "p1").await;
        if pending == Some(0.0) && field(&view, "in_flight") == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never settled: {pending:?} {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = stock_view(gw.admin(), "seckill", "p1").await;
    assert_adds_up(&view);
    let tickets = mall_tickets(&up);
    let distinct: HashSet<&String> = tickets.iter().collect();
    assert_eq!(
        distinct.len(),
        tickets.len(),
        "a ticket reached the mall twice"
    );
    assert_eq!(
        field(&view, "sold") as usize,
        tickets.len(),
        "the mall took {} orders, the ledger sold {}: {view}",
        tickets.len(),
        field(&view, "sold")
    );
    assert!(field(&view, "sold") <= 300);
    assert_eq!(field(&view, "initial"), 300);
    // And it still sells.
    assert_eq!(buy(gw.listen(), "late-buyer").await.1, "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_orders_at_the_mall_is_reconciled_while_another_sells() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    // Rules that keep units on a timeout: a dead node's holds wait for
    // reconcile instead of going back after the forward lease.
    let keep = "lua-free-rules/seckill.yaml";
    let rule = format!("{RULE}    release_on: [connect_error, 5xx]\n");
    let start = |up: &Upstream| {
        Gateway::builder()
            .config(&config(up, &redis, "").replace("in_doubt_for: 3s", "in_doubt_for: 10m"))
            .file(keep, &rule)
            .start()
    };
    let mut a = start(&up);
    let b = start(&up);
    put_stock(a.admin(), "seckill", "p1", 50).await;

    // Ten orders reach the mall through `a`, which dies before answering.
    up.set_stall(Duration::from_millis(800));
    let listen = a.listen();
    let stranded = tokio::spawn(async move { burst(listen, "stranded", 10, 10).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.requests() < 10 {
        assert!(Instant::now() < deadline, "orders never reached the mall");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let _ = stranded.await;
    up.set_stall(Duration::ZERO);
    let view = stock_view(b.admin(), "seckill", "p1").await;
    assert_eq!(field(&view, "in_flight"), 10, "{view}");

    // The mall placed six of the ten (the rest failed on its side).
    let tickets = mall_tickets(&up);
    assert_eq!(tickets.len(), 10);
    let placed_file = a.dir().join("placed.txt");
    std::fs::write(
        &placed_file,
        format!("# ticket\n{}\n", tickets[..6].join("\n")),
    )
    .expect("write placed");
    let config = a.dir().join("gateway.yaml");
    // `--min-age` keeps reconcile off the orders `b` is placing meanwhile
    // (milliseconds old); the stranded ones are older by then. It may not
    // be shorter than this config's longest order on its way: 3.1 s.
    let reconcile = |apply: bool| {
        let mut cmd = support::sluice_cmd();
        cmd.args(["reconcile", "--config"])
            .arg(&config)
            .arg("--placed")
            .arg(&placed_file)
            .args(["--min-age", "4s"]);
        if apply {
            cmd.arg("--apply");
        }
        cmd.output().expect("run sluice reconcile")
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Too short a --min-age is refused: it could resell an order a live
    // node is still placing.
    let hasty = support::sluice_cmd()
        .args(["reconcile", "--config"])
        .arg(&config)
        .arg("--placed")
        .arg(&placed_file)
        .args(["--min-age", "1s", "--apply"])
        .output()
        .expect("run sluice reconcile");
    assert_eq!(hasty.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&hasty.stderr).contains("--min-age 1s is shorter than"),
        "{}",
        String::from_utf8_lossy(&hasty.stderr)
    );
    let dry = reconcile(false);
    let text = String::from_utf8_lossy(&dry.stdout).to_string();
    assert_eq!(dry.status.code(), Some(1), "{text}");
    assert_eq!(text.matches("+ commit").count(), 6, "{text}");
    assert_eq!(text.matches("- release").count(), 4, "{text}");
    assert_eq!(
        field(&stock_view(b.admin(), "seckill", "p1").await, "in_flight"),
        10
    );

    // Applied while `b` sells to others: `b`'s own orders are untouched.
    let listen = b.listen();
    let sale =
        tokio::spawn(async move { burst_retrying(listen, "live", 20, 4, &["unavailable"]).await });
    let applied = reconcile(true);
    let text = String::from_utf8_lossy(&applied.stdout).to_string();
    assert_eq!(
        applied.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let live = sale.await.expect("sale");
    assert_eq!(count(&live, "forwarded"), 20, "{live:?}");

    let view = wait_for_stock(b.admin(), "seckill", "p1", Duration::from_secs(10), |v| {
        field(v, "in_flight") == 0
    })
    .await;
    assert_adds_up(&view);
    assert_eq!(
        (field(&view, "sold"), field(&view, "available")),
        (6 + 20, 50 - 26),
        "{view}"
    );
    // The four buyers whose orders were not placed may buy again; the six
    // whose orders were are told they already ordered.
    let again = burst_retrying(b.listen(), "stranded", 10, 1, &["unavailable"]).await;
    assert_eq!(count(&again, "forwarded"), 4, "{again:?}");
    assert_eq!(count(&again, "duplicate"), 6, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_holds_return_after_their_lease_on_another_node() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let mut a = node(&up, &redis, "");
    let b = node(&up, &redis, "");
    put_stock(b.admin(), "seckill", "p1", 5).await;
    up.set_stall(Duration::from_secs(30));
    let listen = a.listen();
    let stranded = tokio::spawn(async move { burst(listen, "gone", 5, 5).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.requests() < 5 {
        assert!(Instant::now() < deadline, "orders never reached the mall");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill();
    let _ = stranded.await;
    assert_eq!(
        field(&stock_view(b.admin(), "seckill", "p1").await, "in_flight"),
        5
    );
    up.set_stall(Duration::ZERO);
    // `b` returns them once their forward lease (2.7 s) has run out.
    let view = wait_for_stock(b.admin(), "seckill", "p1", Duration::from_secs(20), |v| {
        field(v, "available") == 5
    })
    .await;
    assert_adds_up(&view);
    let metrics = b.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "sluice_released_total",
            &[("rule", "seckill"), ("reason", "lease_expired")]
        ),
        Some(5.0)
    );
    // Their buyers are not locked out.
    let again = burst_retrying(b.listen(), "gone", 5, 5, &["unavailable"]).await;
    assert_eq!(count(&again, "forwarded"), 5, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_unflags_its_sold_out_skus() {
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let gw = node(&up, &redis, "");
    put_stock(gw.admin(), "seckill", "p1", 1).await;
    assert_eq!(buy(gw.listen(), "first").await.1, "forwarded");
    assert_eq!(buy(gw.listen(), "second").await.1, "sold_out");
    redis.restart();
    // The flag clears: the truth is now "not loaded", which is 503.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, outcome) = buy(gw.listen(), "third").await;
        if outcome == "unavailable" {
            assert_eq!(status, 503);
            break;
        }
        assert_eq!(outcome, "sold_out");
        assert!(Instant::now() < deadline, "still sold_out from the flag");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    put_stock(gw.admin(), "seckill", "p1", 1).await;
    assert_eq!(buy(gw.listen(), "fourth").await.1, "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_restock_answers_what_happened_and_frees_its_lock() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    // Shopper calls time out after 50 ms; admin calls get 30 s here.
    let gw = Gateway::builder()
        .config(&config(&up, &redis, "").replace(
            "timeout: 50ms, breaker_interval",
            "timeout: 50ms, admin_timeout: 30s, breaker_interval",
        ))
        .file("lua-free-rules/seckill.yaml", RULE)
        .start();
    // 200 chunks of RPUSH, seconds in a test build: far past the shoppers'
    // 50 ms and well inside the test client's own 10 s (10,000,000 units
    // took about 9 s alone and timed out beside the other fault tests).
    let view = put_stock(gw.admin(), "seckill", "p1", 2_000_000).await;
    assert_eq!(field(&view, "available"), 2_000_000);
    // No lock left behind: the next restock goes through at once.
    let view = put_stock(gw.admin(), "seckill", "p1", 5).await;
    assert_eq!(field(&view, "available"), 5);
    assert_eq!(buy(gw.listen(), "buyer").await.1, "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_orders_that_wait_past_max_queue_time_return_their_units() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let gw = Gateway::builder()
        .config(
            &config(&up, &redis, "")
                .replace("max_inflight: 64", "max_inflight: 1")
                .replace("read_timeout: 1s", "read_timeout: 10s"),
        )
        .file("lua-free-rules/seckill.yaml", RULE)
        .start();
    put_stock(gw.admin(), "seckill", "p1", 10).await;
    // One order holds the only slot for 4 s; the others queue behind it
    // and wait longer than max_queue_time (1 s).
    up.set_stall(Duration::from_secs(4));
    let listen = gw.listen();
    let first = tokio::spawn(async move { buy(listen, "slow").await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.requests() < 1 {
        assert!(
            Instant::now() < deadline,
            "the first order never reached the mall"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queued = burst(gw.listen(), "waiting", 5, 5).await;
    assert_eq!(count(&queued, "queued"), 5, "{queued:?}");
    let view = wait_for_stock(gw.admin(), "seckill", "p1", Duration::from_secs(20), |v| {
        field(v, "queued") == 0 && field(v, "available") >= 9
    })
    .await;
    assert_adds_up(&view);
    let _ = first.await;
    up.set_stall(Duration::ZERO);
    // None of them reached the mall later: they were not placed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        up.requests(),
        1,
        "{:?}",
        up.recorded()
            .iter()
            .map(|r| (
                r.header("x-user-id").map(str::to_string),
                r.header("x-sluice-ticket").map(str::to_string)
            ))
            .collect::<Vec<_>>()
    );
    let view = stock_view(gw.admin(), "seckill", "p1").await;
    assert_adds_up(&view);
    assert_eq!(field(&view, "queued"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_journaled_while_redis_is_down_land_after_a_gateway_restart() {
    let mut redis = RedisServer::start_with_aof();
    let up = Upstream::start();
    let shared = tempfile::tempdir().expect("journal dir");
    let journal = shared.path().join("sluice.journal");
    let with_journal = |cfg: String| {
        cfg.replace(
            "  in_doubt_for: 3s\n",
            &format!(
                "  in_doubt_for: 60s\n  journal: \"{}\"\n",
                journal.display()
            ),
        )
    };
    // Orders that keep their units on a timeout, so the journal (not a
    // lease) is what settles them.
    let rule = format!("{RULE}    release_on: [connect_error, 5xx]\n");
    // The same config for both nodes (the same Redis port across its restart).
    let yaml = with_journal(config(&up, &redis, ""));
    let start = || {
        Gateway::builder()
            .config(&yaml)
            .file("lua-free-rules/seckill.yaml", &rule)
            .start()
    };
    let mut first = start();
    put_stock(first.admin(), "seckill", "p1", 10).await;

    // Three orders reach the mall; Redis dies before they are answered,
    // so their commits cannot land and go to the journal.
    up.set_stall(Duration::from_millis(600));
    let listen = first.listen();
    let buyers = tokio::spawn(async move { burst(listen, "j", 3, 3).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.requests() < 3 {
        assert!(Instant::now() < deadline, "orders never reached the mall");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.kill();
    let seen = buyers.await.expect("buyers");
    assert_eq!(count(&seen, "forwarded"), 3, "{seen:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending = metric_value(&first.metrics().await, "sluice_settlements_pending", &[]);
        if pending == Some(3.0) {
            break;
        }
        assert!(Instant::now() < deadline, "not journaled: {pending:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        journal.is_file(),
        "no journal file at {}",
        journal.display()
    );

    // The node dies too; a new one on the same journal brings them home
    // once Redis is back.
    first.kill();
    redis.restart();
    up.set_stall(Duration::ZERO);
    let second = start();
    let view = wait_for_stock(
        second.admin(),
        "seckill",
        "p1",
        Duration::from_secs(20),
        |v| field(v, "sold") == 3,
    )
    .await;
    assert_adds_up(&view);
    assert_eq!(
        (field(&view, "in_flight"), field(&view, "available")),
        (0, 7)
    );
    let pending = metric_value(&second.metrics().await, "sluice_settlements_pending", &[]);
    assert_eq!(pending, Some(0.0));
    assert!(!journal.exists(), "an empty journal leaves no file");
}
