//! One suite, two stores: every case runs against the memory store and
//! against the Redis store on a real `redis-server` started for it.

use sluice_testkit as support;
use support::both_stores;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::config::RedisConfig;
use sluice::store::memory::MemoryStore;
use sluice::store::redis::RedisStore;
use sluice::store::{
    Committed, DedupMark, MarkScope, Reservation, Reserved, StockView, Store, StoreError,
    TicketState,
};
use sluice::vocab::{ReleaseReason, SkuKey, StoredResponse, TicketId};
use support::RedisServer;

/// A store under test, with the Redis server it needs (if any).
struct Harness {
    store: Arc<dyn Store>,
    redis: Option<RedisServer>,
}

fn memory() -> Harness {
    Harness {
        store: Arc::new(MemoryStore::new()),
        redis: None,
    }
}

fn redis_config(server: &RedisServer) -> RedisConfig {
    RedisConfig {
        url: server.url(),
        key_prefix: "test:".into(),
        // Generous: the machine is shared and noisy; timeouts have their
        // own cases.
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

fn redis() -> Harness {
    let server = RedisServer::start();
    let store =
        RedisStore::new(&redis_config(&server), Duration::from_secs(3600)).expect("redis store");
    Harness {
        store: Arc::new(store),
        redis: Some(server),
    }
}

both_stores!(
    unknown_sku_is_not_loaded_never_unlimited,
    restock_loads_and_views_add_up,
    winners_until_sold_out_then_refusals_hold_nothing,
    quantity_above_what_is_left_takes_nothing,
    commit_keeps_the_answer_and_counts_sold,
    release_returns_units_once,
    dedup_mark_points_at_the_first_ticket_and_clears_on_release,
    losers_leave_no_mark,
    per_user_limit_counts_held_units,
    rule_scope_mark_spans_skus,
    restock_keeps_held_tickets,
    concurrent_buyers_get_exactly_the_stock,
    marks_expire,
    random_interleavings_conserve_units,
    concurrent_restocks_do_not_add_up,
    expired_holds_are_listed_and_their_release_frees_the_buyer,
    a_renewed_lease_is_not_expired,
    settled_tickets_are_never_expired,
    a_commit_after_a_release_takes_the_units_back,
    a_late_commit_without_stock_is_short,
    a_commit_of_an_unknown_ticket_changes_nothing,
    racing_commits_and_releases_move_each_unit_once,
    a_lease_renewed_after_a_sweep_read_it_is_not_released,
    set_state_says_whether_the_ticket_still_holds_its_units,
    racing_late_commits_take_the_units_once,
);

const HOUR: Duration = Duration::from_secs(3600);

fn key(sku: &str) -> SkuKey {
    SkuKey::new("phone", sku)
}

fn user_mark(user: &str) -> DedupMark {
    DedupMark {
        scope: MarkScope::Sku,
        id: format!("u:{user}"),
        ttl: HOUR,
    }
}

async fn reserve(
    store: &dyn Store,
    key: &SkuKey,
    user: &str,
    qty: u32,
    marks: &[DedupMark],
    limit: Option<u32>,
) -> (TicketId, Reserved) {
    reserve_for(store, key, user, qty, marks, limit, HOUR).await
}

async fn reserve_for(
    store: &dyn Store,
    key: &SkuKey,
    user: &str,
    qty: u32,
    marks: &[DedupMark],
    limit: Option<u32>,
    lease: Duration,
) -> (TicketId, Reserved) {
    let ticket = TicketId::random();
    let r = Reservation {
        key,
        ticket,
        user,
        qty,
        marks,
        per_user_limit: limit,
        lease,
    };
    (ticket, store.reserve(&r).await.expect("reserve"))
}

async fn view(store: &dyn Store, key: &SkuKey) -> StockView {
    store.stock(key).await.expect("stock").expect("loaded")
}

fn ok_response() -> StoredResponse {
    StoredResponse {
        status: 200,
        content_type: Some("application/json".into()),
        body: Bytes::from_static(br#"{"order":1}"#),
    }
}

async fn unknown_sku_is_not_loaded_never_unlimited(h: Harness) {
    let s = &*h.store;
    let k = key("ghost");
    assert_eq!(
        reserve(s, &k, "alice", 1, &[], None).await.1,
        Reserved::NotLoaded
    );
    assert_eq!(s.stock(&k).await.expect("stock"), None);
    assert_eq!(s.available(&k).await.expect("available"), None);
    assert!(s
        .ticket(TicketId::random())
        .await
        .expect("ticket")
        .is_none());
    // A refused attempt leaves nothing behind, not even a mark.
    let marks = [user_mark("alice")];
    assert_eq!(
        reserve(s, &k, "alice", 1, &marks, Some(1)).await.1,
        Reserved::NotLoaded
    );
    s.set_available(&k, 1).await.expect("restock");
    assert_eq!(
        reserve(s, &k, "alice", 1, &marks, Some(1)).await.1,
        Reserved::Won
    );
}

async fn restock_loads_and_views_add_up(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    let v = s.set_available(&k, 100).await.expect("restock");
    assert_eq!(
        v,
        StockView {
            available: 100,
            initial: 100,
            ..StockView::default()
        }
    );
    assert_eq!(s.available(&k).await.expect("available"), Some(100));
    // Loaded with zero is loaded: sold out, not "not loaded".
    let empty = key("p0");
    s.set_available(&empty, 0).await.expect("restock");
    assert_eq!(
        reserve(s, &empty, "bob", 1, &[], None).await.1,
        Reserved::SoldOut
    );
}

async fn winners_until_sold_out_then_refusals_hold_nothing(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 5).await.expect("restock");
    let mut won = 0;
    for i in 0..8 {
        match reserve(s, &k, &format!("u{i}"), 1, &[], None).await.1 {
            Reserved::Won => won += 1,
            Reserved::SoldOut => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(won, 5);
    let v = view(s, &k).await;
    assert_eq!((v.available, v.in_flight, v.initial), (0, 5, 5));
}

async fn quantity_above_what_is_left_takes_nothing(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 3).await.expect("restock");
    assert_eq!(reserve(s, &k, "a", 2, &[], None).await.1, Reserved::Won);
    assert_eq!(
        reserve(s, &k, "b", 2, &[], None).await.1,
        Reserved::NotEnough
    );
    let v = view(s, &k).await;
    assert_eq!(
        (v.available, v.in_flight),
        (1, 2),
        "a partial take was not undone"
    );
    assert_eq!(reserve(s, &k, "b", 1, &[], None).await.1, Reserved::Won);
}

async fn commit_keeps_the_answer_and_counts_sold(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 2).await.expect("restock");
    let (t, r) = reserve(s, &k, "alice", 2, &[], None).await;
    assert_eq!(r, Reserved::Won);
    let rec = s.ticket(t).await.expect("ticket").expect("known");
    assert_eq!(
        (rec.state, rec.qty, rec.user.as_str()),
        (TicketState::Held, 2, "alice")
    );
    assert_eq!(rec.key, k);
    s.commit(&k, t, Some(&ok_response()), HOUR)
        .await
        .expect("commit");
    let rec = s.ticket(t).await.expect("ticket").expect("known");
    assert_eq!(rec.state, TicketState::Committed);
    assert_eq!(rec.response, Some(ok_response()));
    let v = view(s, &k).await;
    assert_eq!((v.available, v.sold, v.in_flight, v.initial), (0, 2, 0, 2));
}

async fn release_returns_units_once(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 3).await.expect("restock");
    let (t, _) = reserve(s, &k, "alice", 2, &[], None).await;
    assert_eq!(
        s.release(&k, t, ReleaseReason::Status5xx)
            .await
            .expect("release"),
        2
    );
    assert_eq!(
        s.release(&k, t, ReleaseReason::Admin)
            .await
            .expect("release"),
        0
    );
    let v = view(s, &k).await;
    assert_eq!(
        (v.available, v.in_flight, v.released, v.initial),
        (3, 0, 2, 3)
    );
    let rec = s.ticket(t).await.expect("ticket").expect("known");
    assert_eq!(rec.state, TicketState::Released);
    // A committed order cancelled later returns its units too.
    let (t2, _) = reserve(s, &k, "bob", 1, &[], None).await;
    s.commit(&k, t2, Some(&ok_response()), HOUR)
        .await
        .expect("commit");
    assert_eq!(
        s.release(&k, t2, ReleaseReason::Admin)
            .await
            .expect("release"),
        1
    );
    let v = view(s, &k).await;
    assert_eq!((v.available, v.sold), (3, 0));
    // Unknown tickets release nothing.
    assert_eq!(
        s.release(&k, TicketId::random(), ReleaseReason::Admin)
            .await
            .expect("release"),
        0
    );
}

async fn dedup_mark_points_at_the_first_ticket_and_clears_on_release(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 10).await.expect("restock");
    let marks = [user_mark("alice")];
    let (first, r) = reserve(s, &k, "alice", 1, &marks, None).await;
    assert_eq!(r, Reserved::Won);
    let (_, again) = reserve(s, &k, "alice", 1, &marks, None).await;
    assert_eq!(again, Reserved::Duplicate { first });
    // The duplicate held nothing.
    assert_eq!(view(s, &k).await.in_flight, 1);
    // An Idempotency-Key mark works the same way, alongside the user mark.
    let both = [
        user_mark("bob"),
        DedupMark {
            scope: MarkScope::Sku,
            id: "i:key-1".into(),
            ttl: HOUR,
        },
    ];
    let (bob, _) = reserve(s, &k, "bob", 1, &both, None).await;
    let only_key = [DedupMark {
        scope: MarkScope::Sku,
        id: "i:key-1".into(),
        ttl: HOUR,
    }];
    assert_eq!(
        reserve(s, &k, "carol", 1, &only_key, None).await.1,
        Reserved::Duplicate { first: bob }
    );
    // Released: the unit is back and the user may try again.
    s.release(&k, first, ReleaseReason::Status5xx)
        .await
        .expect("release");
    let (_, retry) = reserve(s, &k, "alice", 1, &marks, None).await;
    assert_eq!(retry, Reserved::Won);
}

async fn losers_leave_no_mark(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 1).await.expect("restock");
    let marks_a = [user_mark("a")];
    let marks_b = [user_mark("b")];
    assert_eq!(
        reserve(s, &k, "a", 1, &marks_a, Some(1)).await.1,
        Reserved::Won
    );
    assert_eq!(
        reserve(s, &k, "b", 1, &marks_b, Some(1)).await.1,
        Reserved::SoldOut
    );
    // After a restock the loser is a new attempt, not a duplicate, and its
    // per-user count was not left behind either.
    s.set_available(&k, 1).await.expect("restock");
    assert_eq!(
        reserve(s, &k, "b", 1, &marks_b, Some(1)).await.1,
        Reserved::Won
    );
}

async fn per_user_limit_counts_held_units(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 10).await.expect("restock");
    let (t1, r1) = reserve(s, &k, "alice", 1, &[], Some(2)).await;
    let (_, r2) = reserve(s, &k, "alice", 1, &[], Some(2)).await;
    let (_, r3) = reserve(s, &k, "alice", 1, &[], Some(2)).await;
    assert_eq!(
        (r1, r2, r3),
        (Reserved::Won, Reserved::Won, Reserved::OverUserLimit)
    );
    assert_eq!(
        reserve(s, &k, "alice", 3, &[], Some(2)).await.1,
        Reserved::OverUserLimit
    );
    assert_eq!(view(s, &k).await.in_flight, 2, "a refusal held units");
    // Another user is not affected; a release frees the user's quota.
    assert_eq!(
        reserve(s, &k, "bob", 2, &[], Some(2)).await.1,
        Reserved::Won
    );
    s.release(&k, t1, ReleaseReason::Status5xx)
        .await
        .expect("release");
    assert_eq!(
        reserve(s, &k, "alice", 1, &[], Some(2)).await.1,
        Reserved::Won
    );
}

async fn rule_scope_mark_spans_skus(h: Harness) {
    let s = &*h.store;
    let (red, blue) = (key("red"), key("blue"));
    s.set_available(&red, 5).await.expect("restock");
    s.set_available(&blue, 5).await.expect("restock");
    let mark = [DedupMark {
        scope: MarkScope::Rule,
        id: "u:alice".into(),
        ttl: HOUR,
    }];
    let (first, r) = reserve(s, &red, "alice", 1, &mark, None).await;
    assert_eq!(r, Reserved::Won);
    assert_eq!(
        reserve(s, &blue, "alice", 1, &mark, None).await.1,
        Reserved::Duplicate { first }
    );
    assert_eq!(view(s, &blue).await.available, 5);
}

async fn restock_keeps_held_tickets(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 10).await.expect("restock");
    let (t, _) = reserve(s, &k, "a", 3, &[], None).await;
    let v = s.set_available(&k, 5).await.expect("restock");
    assert_eq!((v.available, v.in_flight, v.initial), (5, 3, 8));
    let v = s.set_available(&k, 0).await.expect("restock");
    assert_eq!((v.available, v.in_flight, v.initial), (0, 3, 3));
    assert_eq!(reserve(s, &k, "b", 1, &[], None).await.1, Reserved::SoldOut);
    s.release(&k, t, ReleaseReason::Admin)
        .await
        .expect("release");
    let v = view(s, &k).await;
    assert_eq!((v.available, v.in_flight, v.initial), (3, 0, 3));
}

async fn concurrent_buyers_get_exactly_the_stock(h: Harness) {
    let k = key("hot");
    h.store.set_available(&k, 50).await.expect("restock");
    let mut tasks = Vec::new();
    for i in 0..400 {
        let store = h.store.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            let user = format!("u{}", i % 300);
            let marks = [user_mark(&user)];
            reserve(&*store, &k, &user, 1, &marks, Some(1)).await.1
        }));
    }
    let mut won = 0;
    for t in tasks {
        if t.await.expect("task") == Reserved::Won {
            won += 1;
        }
    }
    assert!(won <= 50, "oversold: {won}");
    // A refused attempt (a repeat, a buyer over its limit) takes its units
    // for one round trip before giving them back, so a buyer racing it in
    // that instant may be told sold out (a known limit). Whatever is left
    // then goes to the next buyers: exactly the stock is sold.
    for i in 0..60 {
        let user = format!("late{i}");
        if reserve(&*h.store, &k, &user, 1, &[user_mark(&user)], Some(1))
            .await
            .1
            == Reserved::Won
        {
            won += 1;
        }
    }
    assert_eq!(won, 50);
    let v = view(&*h.store, &k).await;
    assert_eq!((v.available, v.in_flight, v.initial), (0, 50, 50));
}

async fn concurrent_restocks_do_not_add_up(h: Harness) {
    // An ops script setting the same stock through every node at once.
    let k = key("p1");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = h.store.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(
            async move { store.set_available(&k, 50).await },
        ));
    }
    for t in tasks {
        t.await.expect("task").expect("restock");
    }
    let v = view(&*h.store, &k).await;
    assert_eq!((v.available, v.initial), (50, 50));
}

async fn marks_expire(h: Harness) {
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 10).await.expect("restock");
    let short = [DedupMark {
        scope: MarkScope::Sku,
        id: "u:alice".into(),
        ttl: Duration::from_millis(100),
    }];
    assert_eq!(
        reserve(s, &k, "alice", 1, &short, None).await.1,
        Reserved::Won
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match reserve(s, &k, "alice", 1, &short, None).await.1 {
            Reserved::Won => break,
            Reserved::Duplicate { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(Instant::now() < deadline, "the mark never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Random reserve / commit / release / restock steps against a model:
/// after every step the store's view equals the model's, so no unit is
/// ever created or lost and availability never goes below zero.
async fn random_interleavings_conserve_units(h: Harness) {
    let s = &*h.store;
    let k = key("fuzz");
    let mut rng_state: u64 = 0x5eed_1234_abcd_0001;
    let mut next = move |n: u64| {
        // xorshift64: deterministic, so a failure replays.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % n
    };
    let mut available: u64 = 0;
    let mut live: Vec<(TicketId, u64, bool)> = Vec::new(); // (ticket, qty, committed)
    s.set_available(&k, 0).await.expect("load");
    for step in 0..300 {
        match next(10) {
            0..=4 => {
                let qty = 1 + next(3) as u32;
                let (t, r) = reserve(s, &k, &format!("u{}", next(20)), qty, &[], None).await;
                match r {
                    Reserved::Won => {
                        assert!(available >= u64::from(qty), "step {step}: overdrawn");
                        available -= u64::from(qty);
                        live.push((t, u64::from(qty), false));
                    }
                    Reserved::SoldOut => assert_eq!(available, 0, "step {step}"),
                    Reserved::NotEnough => {
                        assert!(available > 0 && available < u64::from(qty), "step {step}")
                    }
                    other => panic!("step {step}: {other:?}"),
                }
            }
            5 if !live.is_empty() => {
                let i = next(live.len() as u64) as usize;
                s.commit(&k, live[i].0, Some(&ok_response()), HOUR)
                    .await
                    .expect("commit");
                live[i].2 = true;
            }
            6 | 7 if !live.is_empty() => {
                let i = next(live.len() as u64) as usize;
                let (t, qty, _) = live.swap_remove(i);
                let moved = s
                    .release(&k, t, ReleaseReason::Admin)
                    .await
                    .expect("release");
                assert_eq!(moved, qty, "step {step}");
                available += qty;
                // Releasing twice moves nothing.
                assert_eq!(
                    s.release(&k, t, ReleaseReason::Admin)
                        .await
                        .expect("release"),
                    0
                );
            }
            _ => {
                let n = next(12);
                s.set_available(&k, n).await.expect("restock");
                available = n;
            }
        }
        let held: u64 = live.iter().filter(|l| !l.2).map(|l| l.1).sum();
        let sold: u64 = live.iter().filter(|l| l.2).map(|l| l.1).sum();
        let v = view(s, &k).await;
        assert_eq!(
            (v.available, v.in_flight, v.sold, v.initial),
            (available, held, sold, available + held + sold),
            "step {step}"
        );
    }
    if let Some(server) = &h.redis {
        assert_redis_lists_match(server, &k, available, &live).await;
    }
}

/// Reads the Redis lists themselves: units are where the ledger says.
async fn assert_redis_lists_match(
    server: &RedisServer,
    k: &SkuKey,
    available: u64,
    live: &[(TicketId, u64, bool)],
) {
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let tag = format!("test:{{{}:{}}}", k.rule, k.sku);
    let avail: u64 = redis::cmd("LLEN")
        .arg(format!("{tag}:avail"))
        .query_async(&mut conn)
        .await
        .expect("llen");
    assert_eq!(avail, available);
    for (t, qty, committed) in live {
        // Held units are in the ticket's `h:` list, sold ones in its `c:`.
        let list = if *committed { "c" } else { "h" };
        let held: u64 = redis::cmd("LLEN")
            .arg(format!("{tag}:{list}:{t}"))
            .query_async(&mut conn)
            .await
            .expect("llen");
        assert_eq!(held, *qty, "ticket {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_not_loaded_and_reconnects() {
    let mut h = redis();
    let k = key("p1");
    h.store.set_available(&k, 5).await.expect("restock");
    assert_eq!(
        reserve(&*h.store, &k, "a", 1, &[], None).await.1,
        Reserved::Won
    );
    let server = h.redis.as_mut().expect("redis");
    server.kill();
    // Down: an error, quickly, never a verdict.
    let r = Reservation {
        key: &k,
        ticket: TicketId::random(),
        user: "b",
        qty: 1,
        marks: &[],
        per_user_limit: None,
        lease: HOUR,
    };
    assert!(
        h.store.reserve(&r).await.is_err(),
        "a verdict without Redis"
    );
    server.restart();
    // Back, empty: the same store object reconnects and says not loaded.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match h.store.reserve(&r).await {
            Ok(verdict) => {
                assert_eq!(verdict, Reserved::NotLoaded);
                break;
            }
            Err(_) => {
                assert!(Instant::now() < deadline, "the store never reconnected");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A winner's answer is kept in its ticket's index (no key of its own),
/// and one kept by an earlier build in `r:<ticket>` is still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keeps_a_winners_answer_in_its_index_and_reads_the_old_place() {
    let h = redis();
    let server = h.redis.as_ref().expect("redis");
    let s = &*h.store;
    let k = key("p1");
    s.set_available(&k, 3).await.expect("restock");
    let (t, r) = reserve(s, &k, "alice", 1, &[user_mark("alice")], None).await;
    assert_eq!(r, Reserved::Won);
    s.commit(&k, t, Some(&ok_response()), HOUR)
        .await
        .expect("commit");
    let tag = format!("test:{{{}:{}}}", k.rule, k.sku);
    assert_eq!(server.command(&["EXISTS", &format!("{tag}:r:{t}")]), ":0");
    let index = server.command(&["GET", &format!("test:ticket:{t}")]);
    assert_eq!(
        index,
        format!("phone\u{1f}p1\n200\napplication/json\n{{\"order\":1}}")
    );
    let ttl: i64 = (server.command(&["PTTL", &format!("test:ticket:{t}")]))
        .trim_start_matches(':')
        .parse()
        .expect("a TTL");
    assert!(ttl > 0 && ttl <= 3_600_000, "{ttl}");
    // An earlier build: the index names the sku only, the answer has a
    // hash of its own.
    let (t2, r) = reserve(s, &k, "bob", 1, &[], None).await;
    assert_eq!(r, Reserved::Won);
    s.commit(&k, t2, None, HOUR).await.expect("commit");
    assert_eq!(
        s.ticket(t2).await.expect("ticket").expect("known").response,
        None
    );
    let old = format!("{tag}:r:{t2}");
    let hset = [
        "HSET",
        &old,
        "status",
        "201",
        "type",
        "text/plain",
        "body",
        "made",
    ];
    assert_eq!(server.command(&hset), ":3");
    let rec = s.ticket(t2).await.expect("ticket").expect("known");
    assert_eq!(rec.state, TicketState::Committed);
    // An index that cannot be read is an error that names it, without
    // the shopper's answer in it.
    let (t3, r) = reserve(s, &k, "carol", 1, &[], None).await;
    assert_eq!(r, Reserved::Won);
    let bad = "phone\u{1f}p1\nnot-a-status\ntext/plain\nsecret body";
    let set = ["SET", &format!("test:ticket:{t3}"), bad];
    assert_eq!(server.command(&set), "+OK");
    let e = s.ticket(t3).await.expect_err("an unreadable index");
    let text = e.to_string();
    assert!(text.contains(&format!("test:ticket:{t3}")), "{text}");
    assert!(!text.contains("secret body"), "{text}");
    assert_eq!(
        rec.response,
        Some(StoredResponse {
            status: 201,
            content_type: Some("text/plain".into()),
            body: Bytes::from_static(b"made"),
        })
    );
}

#[tokio::test]
async fn redis_writes_no_state_field_for_a_winner_and_reads_earlier_ones() {
    let h = redis();
    let server = h.redis.as_ref().expect("redis");
    let s = &*h.store;
    let k = key("lean");
    s.set_available(&k, 5).await.expect("restock");
    let tag = format!("test:{{{}:{}}}", k.rule, k.sku);
    let (t, r) = reserve(s, &k, "alice", 1, &[user_mark("alice")], None).await;
    assert_eq!(r, Reserved::Won);
    // The reservation writes no state field: in flight since its record.
    assert_eq!(
        server.command(&["HEXISTS", &format!("{tag}:state"), &t.to_string()]),
        ":0"
    );
    assert_eq!(
        s.ticket(t).await.expect("ticket").expect("known").state,
        TicketState::Held
    );
    let view = s.stock(&k).await.expect("stock").expect("loaded");
    assert_eq!(
        (view.available, view.in_flight, view.sold, view.initial),
        (4, 1, 0, 5)
    );
    // Nor does the commit: `c:<ticket>` says it.
    s.commit(&k, t, Some(&ok_response()), HOUR)
        .await
        .expect("commit");
    assert_eq!(
        server.command(&["HEXISTS", &format!("{tag}:state"), &t.to_string()]),
        ":0"
    );
    assert_eq!(
        server.command(&["ZSCORE", &format!("{tag}:leases"), &t.to_string()]),
        ""
    );
    let rec = s.ticket(t).await.expect("ticket").expect("known");
    assert_eq!(rec.state, TicketState::Committed);
    assert_eq!(rec.response, Some(ok_response()));
    // A second commit of it changes nothing.
    s.commit(&k, t, None, HOUR).await.expect("commit again");
    let view = s.stock(&k).await.expect("stock").expect("loaded");
    assert_eq!(
        (view.available, view.in_flight, view.sold, view.initial),
        (4, 0, 1, 5)
    );
    // Tickets of an earlier build, with their fields: one held (`H<ms>`),
    // one sold (`C`), one queued; all read and counted as before.
    let mut old = Vec::new();
    for (user, field) in [
        ("bob", "H1733350000000"),
        ("carol", "C"),
        ("dave", "Q1733350000000"),
    ] {
        let (t, r) = reserve(s, &k, user, 1, &[], None).await;
        assert_eq!(r, Reserved::Won);
        if field == "C" {
            s.commit(&k, t, None, HOUR).await.expect("commit");
        }
        let hset = ["HSET", &format!("{tag}:state"), &t.to_string(), field];
        assert_eq!(server.command(&hset), ":1");
        old.push(t);
    }
    let states: Vec<TicketState> = states_of(s, &old).await;
    assert_eq!(
        states,
        [
            TicketState::Held,
            TicketState::Committed,
            TicketState::Queued
        ]
    );
    let view = s.stock(&k).await.expect("stock").expect("loaded");
    assert_eq!(
        (
            view.available,
            view.in_flight,
            view.queued,
            view.sold,
            view.initial
        ),
        (1, 1, 1, 2, 5)
    );
    // Released, it says so whatever field it had.
    assert_eq!(
        s.release(&k, old[0], ReleaseReason::Status5xx)
            .await
            .expect("release"),
        1
    );
    assert_eq!(
        s.ticket(old[0])
            .await
            .expect("ticket")
            .expect("known")
            .state,
        TicketState::Released
    );
}

#[tokio::test]
async fn redis_a_sold_tickets_left_over_lease_is_cleared_by_the_sweep() {
    let h = redis();
    let server = h.redis.as_ref().expect("redis");
    let s = &*h.store;
    let k = key("cut");
    s.set_available(&k, 2).await.expect("restock");
    let marks = [user_mark("erin")];
    let (t, r) = reserve(s, &k, "erin", 1, &marks, None).await;
    assert_eq!(r, Reserved::Won);
    s.commit(&k, t, None, HOUR).await.expect("commit");
    // As if the commit's pipeline was cut after its RENAME: the lease
    // stayed, and ran out.
    let tag = format!("test:{{{}:{}}}", k.rule, k.sku);
    let zadd = ["ZADD", &format!("{tag}:leases"), "1", &t.to_string()];
    assert_eq!(server.command(&zadd), ":1");
    assert_eq!(s.expired(100).await.expect("expired"), [(k.clone(), t)]);
    assert_eq!(sweep_release(s, &k, t).await, 0);
    // Gone from the sweep; still sold, and its buyer still a duplicate.
    assert_eq!(
        s.ticket(t).await.expect("ticket").expect("known").state,
        TicketState::Committed
    );
    let view = s.stock(&k).await.expect("stock").expect("loaded");
    assert_eq!((view.available, view.sold), (1, 1));
    assert_eq!(
        reserve(s, &k, "erin", 1, &marks, None).await.1,
        Reserved::Duplicate { first: t }
    );
}

#[tokio::test]
async fn redis_a_commit_step_redis_refuses_fails_the_commit_and_takes_nothing_more() {
    let server = RedisServer::start();
    // A buyer account that may not run one of the commit's steps.
    let acl = [
        "ACL", "SETUSER", "shop", "on", ">pw", "~*", "&*", "+@all", "-zrem", "-rename",
    ];
    assert_eq!(server.command(&acl), "+OK");
    let config = RedisConfig {
        url: format!("redis://shop:pw@127.0.0.1:{}/0", server.port()),
        key_prefix: "test:".into(),
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    };
    let s = RedisStore::new(&config, HOUR).expect("store");
    let k = key("acl");
    s.set_available(&k, 3).await.expect("restock");
    let tag = format!("test:{{{}:{}}}", k.rule, k.sku);
    // The RENAME refused: an error (journaled, tried again), never the
    // late path, which would take another unit from `avail`.
    let (t, r) = reserve(&s, &k, "fred", 1, &[], None).await;
    assert_eq!(r, Reserved::Won);
    let e = s.commit(&k, t, None, HOUR).await.expect_err("refused");
    assert!(e.to_string().contains("no permissions"), "{e}");
    let view = s.stock(&k).await.expect("stock").expect("loaded");
    assert_eq!((view.available, view.in_flight, view.sold), (2, 1, 0));
    // The RENAME allowed, the ZREM refused: sold, but the commit fails so
    // that it is tried again; the try again takes nothing more and drops
    // the lease.
    assert_eq!(
        server.command(&["ACL", "SETUSER", "shop", "+rename"]),
        "+OK"
    );
    let e = s.commit(&k, t, None, HOUR).await.expect_err("refused");
    assert!(e.to_string().contains("no permissions"), "{e}");
    let lease = ["ZSCORE", &format!("{tag}:leases"), &t.to_string()];
    assert_ne!(server.command(&lease), "");
    assert_eq!(server.command(&["ACL", "SETUSER", "shop", "+zrem"]), "+OK");
    assert_eq!(
        s.commit(&k, t, None, HOUR).await.expect("commit"),
        Committed::Held
    );
    assert_eq!(server.command(&lease), "");
    let view = s.stock(&k).await.expect("stock").expect("loaded");
    assert_eq!((view.available, view.in_flight, view.sold), (2, 0, 1));
}

/// Releases `t` as the sweep does; gives the units it moved, once the
/// sweep has nothing left to find.
async fn sweep_release(s: &dyn Store, k: &SkuKey, t: TicketId) -> u64 {
    let moved = s
        .release(k, t, ReleaseReason::LeaseExpired)
        .await
        .expect("release");
    assert!(s.expired(100).await.expect("expired").is_empty());
    moved
}

/// The states of `tickets`, read one by one.
async fn states_of(s: &dyn Store, tickets: &[TicketId]) -> Vec<TicketState> {
    let mut out = Vec::new();
    for t in tickets {
        out.push(s.ticket(*t).await.expect("ticket").expect("known").state);
    }
    out
}

/// A sale on `url` through a store: restock, a win, a commit with its
/// answer, read back.
async fn sells_one_through(url: String) -> RedisStore {
    let config = RedisConfig {
        url,
        key_prefix: "test:".into(),
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    };
    let store = RedisStore::new(&config, HOUR).expect("store");
    let k = key("p1");
    store.set_available(&k, 3).await.expect("restock");
    let (t, r) = reserve(&store, &k, "alice", 1, &[user_mark("alice")], None).await;
    assert_eq!(r, Reserved::Won);
    store
        .commit(&k, t, Some(&ok_response()), HOUR)
        .await
        .expect("commit");
    let rec = store.ticket(t).await.expect("ticket").expect("known");
    assert_eq!(rec.state, TicketState::Committed);
    assert_eq!(rec.response, Some(ok_response()));
    let v = view(&store, &k).await;
    assert_eq!((v.available, v.sold, v.in_flight), (2, 1, 0));
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_password_and_a_database_is_used_as_the_url_says() {
    let server = RedisServer::start();
    assert_eq!(
        server.command(&["CONFIG", "SET", "requirepass", "s3cret"]),
        "+OK"
    );
    let url = format!("redis://:s3cret@127.0.0.1:{}/5", server.port());
    sells_one_through(url.clone()).await;
    // Everything landed in database 5, nothing in 0.
    let client = redis::Client::open(url.replace("/5", "/0")).expect("client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let size = |db: i64| {
        let mut pipe = redis::pipe();
        pipe.cmd("SELECT").arg(db).ignore().cmd("DBSIZE");
        let mut conn = conn.clone();
        async move {
            let (n,): (u64,) = pipe.query_async(&mut conn).await.expect("dbsize");
            n
        }
    };
    assert_eq!(size(0).await, 0);
    assert!(size(5).await > 0);
    // A wrong password is an error, never a verdict.
    let wrong = RedisConfig {
        url: format!("redis://:nope@127.0.0.1:{}/5", server.port()),
        timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    };
    let store = RedisStore::new(&wrong, HOUR).expect("store");
    let k = key("p1");
    let r = Reservation {
        key: &k,
        ticket: TicketId::random(),
        user: "bob",
        qty: 1,
        marks: &[],
        per_user_limit: None,
        lease: HOUR,
    };
    let e = store.reserve(&r).await.expect_err("refused");
    assert!(e.to_string().contains("WRONGPASS"), "{e}");
    // And it counts as the store failing: the breaker opens, and buyers
    // are refused at once instead of each dialling again.
    for _ in 0..RedisConfig::default().breaker_failures {
        let _ = store.reserve(&r).await;
    }
    let e = store.reserve(&r).await.expect_err("refused");
    assert!(matches!(e, StoreError::CircuitOpen { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_a_unix_socket_sells_as_over_tcp() {
    let server = RedisServer::start();
    sells_one_through(server.unix_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_commands_are_lua_free() {
    // The contract: no EVAL, EVALSHA, FUNCTION or FCALL anywhere in src/.
    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    sources(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    assert!(files.len() > 10, "found only {} sources", files.len());
    for file in files {
        let src = std::fs::read_to_string(&file).expect("read source");
        for forbidden in [
            "\"EVAL",
            "\"EVALSHA",
            "\"FUNCTION",
            "\"FCALL",
            "Script::new",
        ] {
            assert!(
                !src.contains(forbidden),
                "{forbidden} in {}",
                file.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_timed_out_reservation_never_creates_or_loses_units() {
    let server = RedisServer::start();
    let mut config = redis_config(&server);
    config.timeout = Duration::from_millis(50);
    // The stall opens the circuit breaker; let it try again soon after.
    config.breaker_interval = Duration::from_millis(20);
    let store = RedisStore::new(&config, HOUR).expect("store");
    let k = key("slow");
    store.set_available(&k, 5).await.expect("restock");
    let client = redis::Client::open(server.url()).expect("client");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    // Stall Redis longer than the store's timeout: the reservation times
    // out while its transaction may still run afterwards.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(300)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .expect("pause");
    let ticket = TicketId::random();
    let r = Reservation {
        key: &k,
        ticket,
        user: "a",
        qty: 2,
        marks: &[],
        per_user_limit: None,
        lease: HOUR,
    };
    assert!(
        store.reserve(&r).await.is_err(),
        "a verdict from a stalled Redis"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Whatever happened, every unit is either available or held by the
    // ticket, and the ledger agrees with the lists.
    let tag = "test:{phone:slow}";
    let avail: u64 = redis::cmd("LLEN")
        .arg(format!("{tag}:avail"))
        .query_async(&mut admin)
        .await
        .expect("llen");
    let held: u64 = redis::cmd("LLEN")
        .arg(format!("{tag}:h:{ticket}"))
        .query_async(&mut admin)
        .await
        .expect("llen");
    assert_eq!(avail + held, 5, "units created or lost");
    // If it ran, it is read back and undone in the background: every unit
    // comes back by itself, the reservation never re-run.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = view(&store, &k).await;
        assert_eq!(v.available + v.in_flight, 5, "units created or lost: {v:?}");
        if v.available == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the interrupted reservation was never undone: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.ticket(ticket).await.expect("ticket"), None);
}

/// Polls `expired` until `ticket` shows up (its lease is short).
async fn wait_expired(s: &dyn Store, ticket: TicketId) -> Vec<(SkuKey, TicketId)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = s.expired(100).await.expect("expired");
        if found.iter().any(|(_, t)| *t == ticket) {
            return found;
        }
        assert!(Instant::now() < deadline, "lease never ran out: {found:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn expired_holds_are_listed_and_their_release_frees_the_buyer(h: Harness) {
    let s = &*h.store;
    let k = key("lease");
    s.set_available(&k, 2).await.expect("restock");
    let marks = [user_mark("alice")];
    let (t, r) = reserve_for(
        s,
        &k,
        "alice",
        1,
        &marks,
        Some(1),
        Duration::from_millis(50),
    )
    .await;
    assert_eq!(r, Reserved::Won);
    let (long, _) = reserve(s, &k, "bob", 1, &[], None).await;
    let found = wait_expired(s, t).await;
    assert_eq!(found, vec![(k.clone(), t)], "only the short lease ran out");
    assert_ne!(long, t);
    assert_eq!(sweep_release(s, &k, t).await, 1);
    // The buyer's mark and hold went with it: alice may buy again.
    assert_eq!(
        reserve(s, &k, "alice", 1, &marks, Some(1)).await.1,
        Reserved::Won
    );
    let v = view(s, &k).await;
    assert_eq!((v.available, v.in_flight, v.initial), (0, 2, 2));
}

async fn a_renewed_lease_is_not_expired(h: Harness) {
    let s = &*h.store;
    let k = key("renew");
    s.set_available(&k, 1).await.expect("restock");
    let (t, _) = reserve_for(s, &k, "a", 1, &[], None, Duration::from_millis(30)).await;
    s.set_state(&k, t, TicketState::Queued, HOUR)
        .await
        .expect("queue");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.expired(100).await.expect("expired").is_empty());
    let rec = s.ticket(t).await.expect("ticket").expect("known");
    assert_eq!(rec.state, TicketState::Queued);
    assert_eq!(view(s, &k).await.queued, 1);
}

async fn settled_tickets_are_never_expired(h: Harness) {
    let s = &*h.store;
    let k = key("settled");
    s.set_available(&k, 2).await.expect("restock");
    let short = Duration::from_millis(20);
    let (sold, _) = reserve_for(s, &k, "a", 1, &[], None, short).await;
    let (back, _) = reserve_for(s, &k, "b", 1, &[], None, short).await;
    s.commit(&k, sold, None, HOUR).await.expect("commit");
    s.release(&k, back, ReleaseReason::Timeout)
        .await
        .expect("release");
    // Renewing a settled ticket's lease brings nothing back to life.
    s.set_state(&k, sold, TicketState::Held, short)
        .await
        .expect("renew");
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(s.expired(100).await.expect("expired").is_empty());
    assert_eq!(
        s.ticket(sold).await.expect("ticket").expect("known").state,
        TicketState::Committed
    );
}

async fn a_commit_after_a_release_takes_the_units_back(h: Harness) {
    let s = &*h.store;
    let k = key("late");
    s.set_available(&k, 3).await.expect("restock");
    let (t, _) = reserve(s, &k, "alice", 2, &[], Some(2)).await;
    s.release(&k, t, ReleaseReason::Timeout)
        .await
        .expect("release");
    assert_eq!(view(s, &k).await.available, 3);
    // The backend placed it after all.
    let c = s
        .commit(&k, t, Some(&ok_response()), HOUR)
        .await
        .expect("commit");
    assert_eq!(c, Committed::Retaken { short: 0 });
    let v = view(s, &k).await;
    assert_eq!((v.available, v.sold, v.in_flight, v.initial), (1, 2, 0, 3));
    assert_eq!(
        s.ticket(t).await.expect("ticket").expect("known").state,
        TicketState::Committed
    );
    // The buyer's two units count against its limit again.
    assert_eq!(
        reserve(s, &k, "alice", 1, &[], Some(2)).await.1,
        Reserved::OverUserLimit
    );
}

async fn a_late_commit_without_stock_is_short(h: Harness) {
    let s = &*h.store;
    let k = key("short");
    s.set_available(&k, 1).await.expect("restock");
    let (t, _) = reserve(s, &k, "alice", 1, &[], None).await;
    s.release(&k, t, ReleaseReason::Timeout)
        .await
        .expect("release");
    let (other, r) = reserve(s, &k, "bob", 1, &[], None).await;
    assert_eq!(r, Reserved::Won);
    s.commit(&k, other, None, HOUR).await.expect("commit");
    // Now alice's order comes back placed: one unit too many was sold.
    assert_eq!(
        s.commit(&k, t, None, HOUR).await.expect("commit"),
        Committed::Retaken { short: 1 }
    );
    let v = view(s, &k).await;
    assert_eq!((v.available, v.in_flight), (0, 0));
}

async fn a_commit_of_an_unknown_ticket_changes_nothing(h: Harness) {
    let s = &*h.store;
    let k = key("unknown");
    s.set_available(&k, 2).await.expect("restock");
    let ghost = TicketId::random();
    assert_eq!(
        s.commit(&k, ghost, None, HOUR).await.expect("commit"),
        Committed::Unknown
    );
    assert_eq!(s.ticket(ghost).await.expect("ticket"), None);
    let v = view(s, &k).await;
    assert_eq!((v.available, v.sold, v.initial), (2, 0, 2));
}

async fn racing_commits_and_releases_move_each_unit_once(h: Harness) {
    let s = h.store.clone();
    let k = key("race");
    let n = 60;
    s.set_available(&k, n).await.expect("restock");
    let mut tickets = Vec::new();
    for i in 0..n {
        let (t, r) = reserve(&*s, &k, &format!("u{i}"), 1, &[], None).await;
        assert_eq!(r, Reserved::Won);
        tickets.push(t);
    }
    // Each ticket gets a commit and a release at the same time (a lease
    // running out just as the backend's yes arrives).
    let mut tasks = Vec::new();
    for t in tickets.iter().copied() {
        let (s1, s2, k1, k2) = (s.clone(), s.clone(), k.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            s1.commit(&k1, t, None, HOUR).await.expect("commit")
        }));
        tasks.push(tokio::spawn(async move {
            s2.release(&k2, t, ReleaseReason::Timeout)
                .await
                .expect("release");
            Committed::Held
        }));
    }
    let mut short = 0;
    for task in tasks {
        if let Committed::Retaken { short: s } = task.await.expect("task") {
            short += s;
        }
    }
    // The commit always wins in the end, and no unit is counted twice:
    // with stock to take back, nothing is short.
    assert_eq!(short, 0);
    let v = view(&*s, &k).await;
    assert_eq!((v.available, v.sold, v.in_flight, v.initial), (0, n, 0, n));
    for t in tickets {
        assert_eq!(
            s.ticket(t).await.expect("ticket").expect("known").state,
            TicketState::Committed
        );
    }
}

async fn a_lease_renewed_after_a_sweep_read_it_is_not_released(h: Harness) {
    let s = &*h.store;
    let k = key("renewed");
    s.set_available(&k, 1).await.expect("restock");
    let (t, _) = reserve_for(s, &k, "a", 1, &[], None, Duration::from_millis(30)).await;
    wait_expired(s, t).await;
    // A drainer picks the order up just after the sweep listed it.
    assert!(s
        .set_state(&k, t, TicketState::Held, HOUR)
        .await
        .expect("renew"));
    assert_eq!(
        s.release(&k, t, ReleaseReason::LeaseExpired)
            .await
            .expect("release"),
        0
    );
    assert_eq!(view(s, &k).await.in_flight, 1);
}

async fn set_state_says_whether_the_ticket_still_holds_its_units(h: Harness) {
    let s = &*h.store;
    let k = key("live");
    s.set_available(&k, 2).await.expect("restock");
    let (t, _) = reserve(s, &k, "a", 1, &[], None).await;
    assert!(s
        .set_state(&k, t, TicketState::Queued, HOUR)
        .await
        .expect("queue"));
    s.release(&k, t, ReleaseReason::Timeout)
        .await
        .expect("release");
    assert!(!s
        .set_state(&k, t, TicketState::Held, HOUR)
        .await
        .expect("renew"));
    assert_eq!(
        s.ticket(t).await.expect("ticket").expect("known").state,
        TicketState::Released
    );
    assert_eq!(view(s, &k).await.available, 2);
}

async fn racing_late_commits_take_the_units_once(h: Harness) {
    let s = h.store.clone();
    let k = key("twice");
    s.set_available(&k, 10).await.expect("restock");
    let (t, _) = reserve(&*s, &k, "a", 2, &[], None).await;
    s.release(&k, t, ReleaseReason::Timeout)
        .await
        .expect("release");
    // A journal replay and reconcile commit the same ticket at once.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (s, k) = (s.clone(), k.clone());
            tokio::spawn(async move { s.commit(&k, t, None, HOUR).await.expect("commit") })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let v = view(&*s, &k).await;
    assert_eq!((v.sold, v.available, v.initial), (2, 8, 10), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_dead_reservation_is_cleared_by_the_sweep() {
    let h = redis();
    let s = &*h.store;
    let k = key("dead");
    s.set_available(&k, 1).await.expect("restock");
    let marks = [user_mark("ghost")];
    let (t, r) = reserve_for(
        s,
        &k,
        "ghost",
        1,
        &marks,
        Some(1),
        Duration::from_millis(30),
    )
    .await;
    assert_eq!(r, Reserved::Won);
    // As if its undo never ran: its unit went back, its record, lease
    // and mark stayed.
    let server = h.redis.as_ref().expect("redis");
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let tag = "test:{phone:dead}";
    let _: Option<String> = redis::cmd("LMOVE")
        .arg(format!("{tag}:h:{t}"))
        .arg(format!("{tag}:avail"))
        .arg("RIGHT")
        .arg("LEFT")
        .query_async(&mut conn)
        .await
        .expect("lmove");
    wait_expired(s, t).await;
    assert_eq!(sweep_release(s, &k, t).await, 0);
    // Gone from the sweep, and the buyer is free again.
    assert_eq!(
        reserve(s, &k, "ghost", 1, &marks, Some(1)).await.1,
        Reserved::Won
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refused_attempts_leave_no_key_without_a_ttl() {
    let h = redis();
    let s = &*h.store;
    let k = key("gone");
    s.set_available(&k, 1).await.expect("restock");
    let (winner, r) = reserve(s, &k, "w", 1, &[user_mark("w")], Some(1)).await;
    assert_eq!(r, Reserved::Won);
    // Distinct buyers on a sold-out sku with a per-user limit and dedup:
    // every one is refused.
    for i in 0..200 {
        let user = format!("loser{i}");
        let r = reserve(s, &k, &user, 1, &[user_mark(&user)], Some(1))
            .await
            .1;
        assert_eq!(r, Reserved::SoldOut);
    }
    let server = h.redis.as_ref().expect("redis");
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    let tag = "test:{phone:gone}";
    // The sku's own keys live as long as the sku; the winner's units and
    // nothing else may be permanent.
    let permanent_ok = [
        format!("{tag}:loaded"),
        format!("{tag}:tickets"),
        format!("{tag}:state"),
        format!("{tag}:leases"),
        format!("{tag}:h:{winner}"),
        "test:skus".to_string(),
    ];
    let mut permanent = Vec::new();
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        if ttl < 0 && !permanent_ok.contains(key) {
            permanent.push(key.clone());
        }
    }
    assert!(permanent.is_empty(), "keys without a TTL: {permanent:?}");
    assert!(
        keys.len() < 20,
        "refused buyers left keys behind: {} keys",
        keys.len()
    );
}
