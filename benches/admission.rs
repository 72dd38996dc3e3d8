//! Admission decisions per second and Redis round trips per decision, on
//! the memory store and on a real `redis-server` started for the run.
//! The peer is raw Redis: PINGs per second over the same kind of
//! multiplexed connection, measured in the same run, so the ratio says how
//! close a decision gets to the cheapest possible round trip.
//!
//! `cargo bench --bench admission` (needs `redis-server` on PATH).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use sluice::admission::extract::RequestParts;
use sluice::admission::hold::Settlement;
use sluice::admission::{Admission, Candidate, Verdict};
use sluice::config::RedisConfig;
use sluice::outcome::Answer;
use sluice::store::memory::MemoryStore;
use sluice::store::redis::RedisStore;
use sluice::store::Store;
use sluice::vocab::{SkuKey, StoredResponse};
use sluice_testkit::RedisServer;

const RULE: &str = r#"rules:
  - name: bench
    match: { method: POST, path: "/buy/{sku}" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
    stock: { per_user_limit: 1 }
"#;

/// Concurrent decisions in flight, like a busy gateway node.
const CONCURRENCY: usize = 64;

fn admission(store: Arc<dyn Store>, dir: &std::path::Path) -> Admission {
    std::fs::create_dir_all(dir.join("rules")).expect("dir");
    std::fs::write(dir.join("rules/bench.yaml"), RULE).expect("rule");
    std::fs::write(
        dir.join("gateway.yaml"),
        "listen: 127.0.0.1:1\nupstreams: { mall: { servers: [127.0.0.1:2] } }\ndefault_upstream: mall\nrules: rules/*.yaml\n",
    )
    .expect("config");
    let config = sluice::config::load(&dir.join("gateway.yaml")).expect("valid config");
    let queue = Arc::new(sluice::queue::memory::MemoryQueue::new());
    Admission::new(
        &config,
        store,
        queue,
        Default::default(),
        sluice::admission::journal::Journal::in_memory(),
    )
}

/// Runs `n` decisions for distinct users, `CONCURRENCY` at a time; returns
/// (elapsed, winners).
async fn decide(adm: &Arc<Admission>, first_user: usize, n: usize) -> (Duration, usize) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let adm = adm.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            let stage = adm.stage_named("bench").expect("the bench rule");
            let mut headers = HeaderMap::new();
            let mut i = worker;
            while i < n {
                let user = format!("u{}", first_user + i);
                headers.insert("x-user-id", user.parse().expect("header"));
                let c = Candidate {
                    parts: RequestParts {
                        headers: &headers,
                        query: None,
                        captures: &[("sku", "p1")],
                        body: Some(b""),
                    },
                    client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                };
                match adm.admit(&stage, &c).await {
                    Verdict::Forward(hold) => {
                        // A winner's whole life: reserve (above), commit
                        // before the answer, keep the answer after it.
                        let (receipt, committed) = hold.settle(Settlement::Commit).await;
                        committed.expect("commit");
                        receipt
                            .keep(&StoredResponse {
                                status: 200,
                                content_type: Some("application/json".into()),
                                body: bytes::Bytes::from_static(b"{}"),
                            })
                            .await;
                        won += 1
                    }
                    Verdict::Answer(Answer::SoldOut) => {}
                    Verdict::Answer(other) => panic!("unexpected answer {other:?}"),
                    Verdict::PassCapped(_) => panic!("store failed during the bench"),
                }
                i += CONCURRENCY;
            }
            won
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += t.await.expect("task");
    }
    (started.elapsed(), won)
}

async fn ping_rate(url: &str, n: usize) -> f64 {
    let client = redis::Client::open(url).expect("client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let mut conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / CONCURRENCY {
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .expect("ping");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    (n / CONCURRENCY * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    const STOCK: usize = 20_000;
    const LOSERS: usize = 40_000;
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    let key = SkuKey::new("bench", "p1");

    // Memory store.
    let memory: Arc<dyn Store> = Arc::new(MemoryStore::new());
    memory
        .set_available(&key, STOCK as u64)
        .await
        .expect("restock");
    let adm = Arc::new(admission(memory, &dir.join("memory")));
    let (t_win, won) = decide(&adm, 0, STOCK).await;
    let (t_lose, _) = decide(&adm, STOCK, LOSERS).await;
    assert_eq!(won, STOCK);

    // Redis store.
    let server = RedisServer::start();
    let url = server.url();
    let redis_store = Arc::new(
        RedisStore::new(
            &RedisConfig {
                url: url.clone(),
                key_prefix: "bench:".into(),
                timeout: Duration::from_secs(2),
                ..RedisConfig::default()
            },
            Duration::from_secs(3600),
        )
        .expect("redis store"),
    );
    redis_store
        .set_available(&key, STOCK as u64)
        .await
        .expect("restock");
    let adm_r = Arc::new(admission(redis_store.clone(), &dir.join("redis")));
    let rt0 = redis_store.round_trips();
    let (r_win, won_r) = decide(&adm_r, 0, STOCK).await;
    let rt1 = redis_store.round_trips();
    let (r_lose, _) = decide(&adm_r, STOCK, LOSERS).await;
    let rt2 = redis_store.round_trips();
    assert_eq!(won_r, STOCK);
    let pings = ping_rate(&url, 100_000).await;
    let _ = std::fs::remove_dir_all(&dir);

    println!("admission decisions, {CONCURRENCY} concurrent, 2 worker threads");
    println!("{:<34} {:>12} {:>14}", "case", "decisions/s", "round trips");
    println!(
        "{:<34} {:>12.0} {:>14}",
        "memory: winners (whole life)",
        rate(STOCK, t_win),
        "-"
    );
    println!(
        "{:<34} {:>12.0} {:>14}",
        "memory: losers after sold out",
        rate(LOSERS, t_lose),
        "-"
    );
    println!(
        "{:<34} {:>12.0} {:>14.3}",
        "redis: winners (whole life)",
        rate(STOCK, r_win),
        (rt1 - rt0) as f64 / STOCK as f64
    );
    println!(
        "{:<34} {:>12.0} {:>14.5}",
        "redis: losers after sold out",
        rate(LOSERS, r_lose),
        (rt2 - rt1) as f64 / LOSERS as f64
    );
    println!("{:<34} {:>12.0} {:>14}", "peer: raw redis PING", pings, "1");
    println!(
        "\nredis winners/s = {:.2}x raw PINGs/s; a winner's life is reserve + commit \
         (both before its answer) + keeping the answer for replays (after it)",
        rate(STOCK, r_win) / pings
    );
}
