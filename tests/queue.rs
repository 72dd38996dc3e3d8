//! One suite, two queues: every shared case runs against the in-process
//! queue and against the Redis Stream queue on a real `redis-server`
//! started for it; Redis-only cases cover what only a shared queue can do
//! (a dead consumer's entry claimed by another, Redis restarted empty,
//! corrupt entries).

use sluice_testkit as support;
use support::both_stores;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::config::RedisConfig;
use sluice::queue::memory::MemoryQueue;
use sluice::queue::redis::RedisQueue;
use sluice::queue::{Delivery, Queue, QueuedRequest};
use sluice::store::StoreError;
use sluice::vocab::{SkuKey, TicketId};
use support::RedisServer;

/// A queue under test, with the Redis server it needs (if any).
struct Harness {
    queue: Arc<dyn Queue>,
    /// Kept alive for the case; killed on drop.
    _redis: Option<RedisServer>,
}

fn memory() -> Harness {
    Harness {
        queue: Arc::new(MemoryQueue::new()),
        _redis: None,
    }
}

const PREFIX: &str = "test:";

fn redis_config(server: &RedisServer) -> RedisConfig {
    RedisConfig {
        url: server.url(),
        key_prefix: PREFIX.into(),
        // Generous: the machine is shared and noisy.
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

fn redis_queue(server: &RedisServer) -> RedisQueue {
    RedisQueue::new(&redis_config(server)).expect("redis queue")
}

fn redis() -> Harness {
    let server = RedisServer::start();
    Harness {
        queue: Arc::new(redis_queue(&server)),
        _redis: Some(server),
    }
}

both_stores!(
    pops_come_out_in_push_order,
    positions_count_down_as_entries_are_popped,
    a_full_queue_refuses_and_takes_again_once_one_leaves,
    depth_counts_waiting_and_in_service_until_acked,
    pop_on_empty_is_none,
    upstreams_have_separate_queues,
    concurrent_pushes_pop_each_ticket_exactly_once,
);

const UP: &str = "mall";
const CONSUMER: &str = "node-a";
const CLAIM_IDLE_MS: u64 = 30_000;
const BIG: u32 = 1_000;

fn request(n: usize) -> QueuedRequest {
    QueuedRequest {
        ticket: TicketId::random(),
        key: SkuKey::new("phone", "p1"),
        qty: 1,
        method: "POST".into(),
        path_and_query: format!("/api/seckill/p1/order?n={n}"),
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(format!("{{\"n\":{n}}}")),
        queued_at_ms: 1_700_000_000_000 + n as u64,
    }
}

async fn push(q: &dyn Queue, r: &QueuedRequest, capacity: u32) -> Option<u64> {
    q.push(UP, r, capacity).await.expect("push")
}

async fn pop(q: &dyn Queue) -> Option<Delivery> {
    q.pop(UP, CONSUMER, CLAIM_IDLE_MS).await.expect("pop")
}

async fn position(q: &dyn Queue, r: &QueuedRequest) -> Option<u64> {
    q.position(UP, r.ticket).await.expect("position")
}

async fn depth(q: &dyn Queue) -> u64 {
    q.depth(UP).await.expect("depth")
}

/// Polls `step` until it gives `Some`, for at most 5 s.
async fn eventually<T, F, Fut>(what: &str, mut step: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = step().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pops_come_out_in_push_order(h: Harness) {
    let q = &*h.queue;
    let rs: Vec<QueuedRequest> = (0..5).map(request).collect();
    for r in &rs {
        assert!(push(q, r, BIG).await.is_some());
    }
    for r in &rs {
        let d = pop(q).await.expect("an entry");
        // The whole request comes back, body and headers included.
        assert_eq!(&d.request, r);
        q.ack(UP, &d).await.expect("ack");
    }
    assert!(pop(q).await.is_none());
}

async fn positions_count_down_as_entries_are_popped(h: Harness) {
    let q = &*h.queue;
    let rs: Vec<QueuedRequest> = (0..3).map(request).collect();
    let mut given = Vec::new();
    for r in &rs {
        given.push(push(q, r, BIG).await.expect("room"));
    }
    assert_eq!(given, [1, 2, 3]);
    for (r, want) in rs.iter().zip(1..) {
        assert_eq!(position(q, r).await, Some(want));
    }
    assert_eq!(position(q, &request(9)).await, None, "never queued");

    let first = pop(q).await.expect("an entry");
    assert_eq!(first.request.ticket, rs[0].ticket);
    assert_eq!(position(q, &rs[0]).await, None, "in service, not waiting");
    assert_eq!(position(q, &rs[1]).await, Some(1));
    assert_eq!(position(q, &rs[2]).await, Some(2));
    // A newcomer lines up behind the two still waiting.
    let late = request(3);
    assert_eq!(push(q, &late, BIG).await, Some(3));

    let second = pop(q).await.expect("an entry");
    assert_eq!(second.request.ticket, rs[1].ticket);
    assert_eq!(position(q, &rs[1]).await, None);
    assert_eq!(position(q, &rs[2]).await, Some(1));
    assert_eq!(position(q, &late).await, Some(2));
}

async fn a_full_queue_refuses_and_takes_again_once_one_leaves(h: Harness) {
    let q = &*h.queue;
    let (a, b, c) = (request(0), request(1), request(2));
    assert_eq!(push(q, &a, 2).await, Some(1));
    assert_eq!(push(q, &b, 2).await, Some(2));
    assert_eq!(push(q, &c, 2).await, None, "full");
    assert_eq!(
        position(q, &c).await,
        None,
        "a refused request is not queued"
    );
    assert_eq!(depth(q).await, 2);
    assert_eq!(push(q, &c, 0).await, None, "capacity 0 takes nothing");
    // Capacity bounds the waiting line: an entry in service frees a place.
    let d = pop(q).await.expect("an entry");
    assert_eq!(push(q, &c, 2).await, Some(2));
    assert_eq!(push(q, &request(3), 2).await, None, "full again");
    q.ack(UP, &d).await.expect("ack");
    assert_eq!(depth(q).await, 2);
}

async fn depth_counts_waiting_and_in_service_until_acked(h: Harness) {
    let q = &*h.queue;
    assert_eq!(depth(q).await, 0);
    for i in 0..3 {
        push(q, &request(i), BIG).await.expect("room");
    }
    assert_eq!(depth(q).await, 3);
    let d1 = pop(q).await.expect("an entry");
    let d2 = pop(q).await.expect("an entry");
    assert_eq!(depth(q).await, 3, "in service still counts");
    q.ack(UP, &d1).await.expect("ack");
    assert_eq!(depth(q).await, 2);
    q.ack(UP, &d2).await.expect("ack");
    assert_eq!(depth(q).await, 1);
    let d3 = pop(q).await.expect("an entry");
    q.ack(UP, &d3).await.expect("ack");
    assert_eq!(depth(q).await, 0);
    assert!(pop(q).await.is_none());
}

async fn pop_on_empty_is_none(h: Harness) {
    let q = &*h.queue;
    assert!(pop(q).await.is_none(), "never used");
    let r = request(0);
    push(q, &r, BIG).await.expect("room");
    let d = pop(q).await.expect("an entry");
    assert!(pop(q).await.is_none(), "only entry is in service");
    q.ack(UP, &d).await.expect("ack");
    assert!(pop(q).await.is_none(), "drained");
    assert_eq!(depth(q).await, 0);
}

async fn upstreams_have_separate_queues(h: Harness) {
    let q = &*h.queue;
    let (a, b) = (request(0), request(1));
    assert_eq!(q.push("mall", &a, 1).await.expect("push"), Some(1));
    assert_eq!(q.push("pay", &b, 1).await.expect("push"), Some(1));
    assert_eq!(q.depth("mall").await.expect("depth"), 1);
    assert_eq!(q.position("pay", a.ticket).await.expect("position"), None);
    let d = q.pop("pay", CONSUMER, CLAIM_IDLE_MS).await.expect("pop");
    assert_eq!(d.expect("an entry").request.ticket, b.ticket);
    assert!(q
        .pop("pay", CONSUMER, CLAIM_IDLE_MS)
        .await
        .expect("pop")
        .is_none());
    assert_eq!(
        q.position("mall", a.ticket).await.expect("position"),
        Some(1)
    );
}

async fn concurrent_pushes_pop_each_ticket_exactly_once(h: Harness) {
    let n = 200;
    let mut tasks = Vec::new();
    for i in 0..n {
        let q = h.queue.clone();
        tasks.push(tokio::spawn(async move {
            let r = request(i);
            let position = q.push(UP, &r, BIG).await.expect("push").expect("room");
            (r.ticket, position)
        }));
    }
    let mut pushed = HashSet::new();
    for t in tasks {
        let (ticket, position) = t.await.expect("task");
        assert!((1..=n as u64).contains(&position), "position {position}");
        pushed.insert(ticket);
    }
    assert_eq!(pushed.len(), n);
    assert_eq!(depth(&*h.queue).await, n as u64);

    // Two consumers drain concurrently.
    let mut drains = Vec::new();
    for consumer in ["a", "b"] {
        let q = h.queue.clone();
        drains.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = q.pop(UP, consumer, CLAIM_IDLE_MS).await.expect("pop") {
                q.ack(UP, &d).await.expect("ack");
                got.push(d.request.ticket);
            }
            got
        }));
    }
    let mut popped = Vec::new();
    for d in drains {
        popped.extend(d.await.expect("drain"));
    }
    assert_eq!(popped.len(), n, "every entry once");
    assert_eq!(popped.into_iter().collect::<HashSet<_>>(), pushed);
    assert_eq!(depth(&*h.queue).await, 0);
}

// Redis only.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumers_entry_is_claimed_after_the_idle_time() {
    let server = RedisServer::start();
    let q = redis_queue(&server);
    let r = request(0);
    push(&q, &r, BIG).await.expect("room");

    let before_delivery = Instant::now();
    let taken = q.pop(UP, "a", 100).await.expect("pop").expect("an entry");
    // "a" dies without acking. "b" gets nothing until the entry has been
    // idle for 100 ms, then that same entry.
    let claimed = eventually("claim", || async {
        let got = q.pop(UP, "b", 100).await.expect("pop");
        if got.is_some() {
            // Idle time is counted from the delivery to "a", which came
            // after `before_delivery` (Redis counts whole milliseconds).
            assert!(
                before_delivery.elapsed() >= Duration::from_millis(95),
                "claimed after {:?}",
                before_delivery.elapsed()
            );
        }
        got
    })
    .await;
    assert_eq!(claimed.id, taken.id);
    assert_eq!(claimed.request, r);
    assert_eq!(depth(&q).await, 1);
    q.ack(UP, &claimed).await.expect("ack");
    assert_eq!(depth(&q).await, 0);
    // The late ack of the dead consumer is harmless.
    q.ack(UP, &taken).await.expect("late ack");
    assert!(q.pop(UP, "c", 0).await.expect("pop").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_entry_is_never_claimed() {
    let server = RedisServer::start();
    let q = redis_queue(&server);
    push(&q, &request(0), BIG).await.expect("room");
    let d = q.pop(UP, "a", 0).await.expect("pop").expect("an entry");
    q.ack(UP, &d).await.expect("ack");
    assert!(q.pop(UP, "b", 0).await.expect("pop").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_works_again_after_redis_restarts_empty() {
    let mut server = RedisServer::start();
    let q = redis_queue(&server);
    push(&q, &request(0), BIG).await.expect("room");
    let d = pop(&q).await.expect("an entry");
    q.ack(UP, &d).await.expect("ack");

    server.restart();
    // The group is gone with everything else; the queue re-creates it.
    let r = request(1);
    let given = eventually("push after restart", || async {
        match q.push(UP, &r, BIG).await {
            Ok(p) => Some(p),
            Err(StoreError::Backend { .. } | StoreError::Timeout { .. }) => None,
            Err(e) => panic!("unexpected {e}"),
        }
    })
    .await;
    assert_eq!(given, Some(1), "sequence numbers start again");
    assert_eq!(position(&q, &r).await, Some(1));
    let d = pop(&q).await.expect("the entry pushed after the restart");
    assert_eq!(d.request, r);
    q.ack(UP, &d).await.expect("ack");
    assert_eq!(depth(&q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_is_re_created_when_only_it_was_lost() {
    let server = RedisServer::start();
    let q = redis_queue(&server);
    // The group exists (made by this push) and is then destroyed behind
    // the queue's back, with one entry waiting: it is still delivered.
    let r = request(0);
    push(&q, &r, BIG).await.expect("room");
    let mut conn = raw(&server).await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream_key())
        .arg("sluice")
        .query_async(&mut conn)
        .await
        .expect("destroy group");
    let d = pop(&q).await.expect("the waiting entry");
    assert_eq!(d.request, r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_entries_are_dropped_not_delivered() {
    let server = RedisServer::start();
    let q = redis_queue(&server);
    let mut conn = raw(&server).await;
    let bad_ticket = TicketId::random().to_string();
    let _: String = redis::cmd("XADD")
        .arg(stream_key())
        .arg("*")
        .arg("t")
        .arg(&bad_ticket)
        .arg("r")
        .arg("{not json")
        .arg("n")
        .arg(0)
        .query_async(&mut conn)
        .await
        .expect("xadd");
    let _: String = redis::cmd("XADD")
        .arg(stream_key())
        .arg("*")
        .arg("x")
        .arg("no request at all")
        .query_async(&mut conn)
        .await
        .expect("xadd");
    let r = request(0);
    push(&q, &r, BIG).await.expect("room");
    assert_eq!(depth(&q).await, 3);

    let d = pop(&q).await.expect("the good entry");
    assert_eq!(d.request, r);
    assert_eq!(depth(&q).await, 1, "corrupt entries deleted");
    q.ack(UP, &d).await.expect("ack");
    assert!(pop(&q).await.is_none());
    assert_eq!(depth(&q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_share_one_hash_tag() {
    let server = RedisServer::start();
    let q = redis_queue(&server);
    let r = request(0);
    push(&q, &r, BIG).await.expect("room");
    let mut conn = raw(&server).await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    keys.sort();
    let tag = stream_key();
    assert_eq!(
        keys,
        [
            tag.clone(),
            format!("{tag}:pos:{}", r.ticket),
            format!("{tag}:seq"),
        ]
    );
}

fn stream_key() -> String {
    format!("{PREFIX}{{queue:{UP}}}")
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}
