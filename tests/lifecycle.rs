//! The end and the replacement of a gateway process, with real signals:
//! SIGTERM finishes what is under way (a request at the backend, a memory
//! queue's entries, a commit after its answer) and exits as soon as
//! nothing is left, well inside a
//! long grace period; `sluice run --upgrade` takes the listeners of a
//! running gateway on SIGQUIT while a client keeps sending requests, and
//! none of them is refused or fails.

use sluice_testkit as support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::shop::{field, put_stock, wait_for_stock};
use support::{request, Conn, Gateway, RedisServer, Upstream};

const RULE: &str = r#"rules:
  - name: flash
    match: { method: POST, path: "/api/flash/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    admission: { queue: { max_wait: 0s } }
"#;

/// A grace period no test waits out: exiting early is the behaviour
/// under test, and a gateway that sleeps it out fails the bounded wait.
const LONG_GRACE: &str = "10m";

/// How long a test waits for a process to exit before failing.
const EXIT_WAIT: Duration = Duration::from_secs(60);

fn gateway_yaml(up: &Upstream, store: &str, max_inflight: u32) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         store: {store}\n\
         shutdown: {{ grace_period: {LONG_GRACE}, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    max_inflight: {max_inflight}\n    read_timeout: 10s\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        up.addr()
    )
}

async fn buy(listen: SocketAddr, sku: &str, user: &str) -> support::client::Response {
    request(
        listen,
        "POST",
        &format!("/api/flash/{sku}/order"),
        &[("x-user-id", user)],
        b"{}",
    )
    .await
}

async fn wait_inflight(up: &Upstream, n: u64) {
    for _ in 0..500 {
        if up.inflight() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the backend never had {n} request(s) in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nothing_in_flight_exits_without_waiting_out_the_grace_period() {
    let up = Upstream::start();
    let mut g = Gateway::builder()
        .config(&gateway_yaml(&up, "{ backend: memory }", 8))
        .file("lua-free-rules/flash.yaml", RULE)
        .start();
    let resp = request(g.listen(), "GET", "/goods/1", &[], b"").await;
    assert_eq!(resp.status, 200);
    g.sigterm();
    let status = g
        .wait_exit(EXIT_WAIT)
        .unwrap_or_else(|| panic!("still running: {}", g.log()));
    assert!(status.success(), "{status}: {}", g.log());
    assert!(
        g.log().contains("nothing left in flight; exiting"),
        "{}",
        g.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_request_at_the_backend_and_the_queue_finish_then_exits() {
    let up = Upstream::start();
    let mut g = Gateway::builder()
        .config(&gateway_yaml(&up, "{ backend: memory }", 1))
        .file("lua-free-rules/flash.yaml", RULE)
        .start();
    put_stock(g.admin(), "flash", "f1", 5).await;
    up.set_stall(Duration::from_millis(1500));
    let listen = g.listen();
    let first = tokio::spawn(async move { buy(listen, "f1", "u1").await });
    wait_inflight(&up, 1).await;
    // The only slot is taken: the next winner is queued.
    let queued = buy(listen, "f1", "u2").await;
    assert_eq!(queued.status, 202, "{}", queued.text());
    assert_eq!(queued.header("x-sluice-outcome"), Some("queued"));

    g.sigterm();
    let resp = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-sluice-outcome"), Some("forwarded"));
    // No new connections once shutting down.
    let mut refused = false;
    for _ in 0..100 {
        match Conn::try_connect(listen).await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(mut c) => {
                // Accepted before the listener closed: it must not be served.
                if c.send("GET", "/goods/1", &[], b"").await.is_err() {
                    refused = true;
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "the listener kept accepting after SIGTERM");

    let status = g
        .wait_exit(EXIT_WAIT)
        .unwrap_or_else(|| panic!("still running: {}", g.log()));
    assert!(status.success(), "{status}: {}", g.log());
    // The queued winner was sent before the process (and its memory
    // queue) went away.
    assert_eq!(up.requests(), 2, "{}", g.log());
    assert!(
        g.log().contains("nothing left in flight; exiting"),
        "{}",
        g.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_a_request_loop_refuses_and_fails_nothing() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let store = format!(
        "{{ backend: redis, redis: {{ url: \"{}\", timeout: 1s }}, journal: sluice.journal }}",
        redis.url()
    );
    let mut old = Gateway::builder()
        .config(&gateway_yaml(&up, &store, 64))
        .file("lua-free-rules/flash.yaml", RULE)
        .start();
    put_stock(old.admin(), "flash", "f1", 100_000).await;
    let listen = old.listen();

    // A client that never stops: plain pages and orders, each on a new
    // connection so every request meets whichever process accepts now.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let won = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..2 {
        let (stop, sent, won) = (stop.clone(), sent.clone(), won.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let result = match Conn::try_connect(listen).await {
                    Err(e) => Err(e),
                    Ok(mut conn) => {
                        if n.is_multiple_of(2) {
                            conn.send("GET", "/goods/1", &[], b"").await
                        } else {
                            let user = format!("c{c}-{n}");
                            conn.send(
                                "POST",
                                "/api/flash/f1/order",
                                &[("x-user-id", user.as_str())],
                                b"{}",
                            )
                            .await
                        }
                    }
                };
                sent.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(resp) if resp.status == 200 => {
                        if resp.header("x-sluice-outcome") == Some("forwarded") {
                            won.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(resp) => failures.push(format!("{} {}", resp.status, resp.text())),
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }
    let wait_sent = |at_least: u64| {
        let sent = sent.clone();
        async move {
            for _ in 0..3000 {
                if sent.load(Ordering::Relaxed) >= at_least {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the client loop stalled");
        }
    };
    wait_sent(50).await;

    // The operator's procedure: start the new binary with --upgrade, then
    // SIGQUIT the old one; it hands over, drains and exits.
    let mut new = old.upgrade();
    old.sigquit();
    new.wait_ready();
    let before_exit = sent.load(Ordering::Relaxed);
    let status = old
        .wait_exit(EXIT_WAIT)
        .unwrap_or_else(|| panic!("the old process is still running: {}", old.log()));
    assert!(status.success(), "{status}: {}", old.log());
    assert!(old.log().contains("listener sockets sent"), "{}", old.log());
    // The new process alone serves a while longer.
    wait_sent(sent.load(Ordering::Relaxed) + 100).await;
    stop.store(true, Ordering::Release);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap_or_else(|e| panic!("{e}")));
    }
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the upgrade: {:?}\n--- old ---\n{}\n--- new ---\n{}",
        failures.len(),
        sent.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)],
        old.log(),
        new.log()
    );
    assert!(before_exit >= 50);

    // The sale went on across both processes with one stock.
    // Each commit lands just after its answer.
    let view = wait_for_stock(new.admin(), "flash", "f1", Duration::from_secs(20), |v| {
        field(v, "in_flight") == 0
    })
    .await;
    let won = won.load(Ordering::Relaxed);
    assert_eq!(field(&view, "sold"), won, "{view}");
    assert_eq!(field(&view, "available"), 100_000 - won, "{view}");
    assert_eq!(
        request(new.admin(), "GET", "/healthz", &[], b"")
            .await
            .status,
        200
    );
    new.sigterm();
    assert!(new.wait_exit(EXIT_WAIT).is_some(), "{}", new.log());
}

/// A winner's commit runs after its answer is out (before its connection
/// takes another request): a SIGTERM then waits for it, however long the
/// store takes, instead of exiting with the order placed at the mall and
/// its units only held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_commit_still_on_its_way_to_the_store() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let store = format!(
        "{{ backend: redis, redis: {{ url: \"{}\", timeout: 10s }} }}",
        redis.url()
    );
    let mut g = Gateway::builder()
        .config(&gateway_yaml(&up, &store, 4))
        .file("lua-free-rules/flash.yaml", RULE)
        .start();
    put_stock(g.admin(), "flash", "f1", 5).await;
    // Redis freezes while the mall takes the order: the answer goes out,
    // its commit cannot land.
    up.set_stall(Duration::from_millis(500));
    let listen = g.listen();
    let first = tokio::spawn(async move { buy(listen, "f1", "u1").await });
    wait_inflight(&up, 1).await;
    redis.freeze();
    let resp = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-sluice-outcome"), Some("forwarded"));

    g.sigterm();
    // Well past the shutdown's quiet time (200 ms): still there.
    let early = g.wait_exit(Duration::from_millis(1500));
    redis.thaw();
    assert!(
        early.is_none(),
        "exited with a commit under way: {}",
        g.log()
    );
    let status = g
        .wait_exit(EXIT_WAIT)
        .unwrap_or_else(|| panic!("still running: {}", g.log()));
    assert!(status.success(), "{status}: {}", g.log());
    // Sold in the store: nothing held, nothing gone back.
    let config = sluice::config::RedisConfig {
        url: redis.url(),
        timeout: Duration::from_secs(2),
        ..sluice::config::RedisConfig::default()
    };
    let store = sluice::store::redis::RedisStore::new(&config, Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("{e}"));
    let view = sluice::store::Store::stock(&store, &sluice::vocab::SkuKey::new("flash", "f1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("flash/f1 not loaded"));
    assert_eq!(
        (view.available, view.in_flight, view.sold),
        (4, 0, 1),
        "{view:?}"
    );
}
