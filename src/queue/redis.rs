//! The overflow queue in a Redis Stream with a consumer group, Lua-free
//! like the store: only atomic commands, pipelines and MULTI/EXEC.
//!
//! Keys of one upstream share the hash tag `{queue:<upstream>}` (the
//! contract's `{prefix}queue:{upstream}` with the braces as a literal hash
//! tag), so they live on one cluster slot:
//! - `{prefix}{queue:<upstream>}` the stream; each entry holds `t` (the
//!   ticket), `r` (the encoded request) and `n` (its sequence number);
//!   consumer group `sluice`;
//! - `{prefix}{queue:<upstream>}:seq` the last sequence number given out;
//! - `{prefix}{queue:<upstream>}:served` the highest sequence number
//!   handed to a consumer (a sorted set with the one member `s`, so that
//!   `ZADD GT` keeps the maximum atomically);
//! - `{prefix}{queue:<upstream>}:pos:<ticket>` a waiting ticket's sequence
//!   number (1 h TTL), deleted when it is handed out.
//!
//! Positions are `seq - served` (at least 1): advisory, exact at rest and
//! close under concurrency. An acknowledged entry is deleted from the
//! stream (`XACK` + `XDEL`), so the stream holds only entries waiting or in
//! service, `XLEN` is the depth, and a group re-created at id `0` after
//! Redis lost it redelivers exactly what was never acknowledged.
//!
//! Round trips: push 3 (capacity read, `INCR`, one MULTI), pop 2 when
//! empty and 3 with an entry, ack 1, position 1, depth 1; plus one
//! `XGROUP CREATE` per upstream and process. Needs Redis 6.2 or later
//! (`XAUTOCLAIM`, `ZADD GT`).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use redis::{Pipeline, Value};

use super::{Delivery, Queue, QueuedRequest};
use crate::config::RedisConfig;
use crate::store::redis_conn::{as_int, as_pairs, as_string, has_error_code, RedisConn};
use crate::store::StoreError;
use crate::vocab::TicketId;

/// The consumer group every node reads through.
const GROUP: &str = "sluice";
/// How long a ticket's position is kept (it is deleted when handed out).
const POS_TTL_MS: u64 = 60 * 60 * 1000;
/// The member of the `served` sorted set.
const SERVED_MEMBER: &str = "s";
/// Corrupt entries dropped per pop at most, before giving up until the
/// next poll.
const MAX_SKIPS: usize = 64;

/// The queue on Redis, over one multiplexed, self-reconnecting connection.
pub struct RedisQueue {
    // Made on first use (see `store::redis_conn`).
    conn: RedisConn,
    prefix: String,
    /// Upstreams whose group this process created (or found): creation is
    /// tried once; a later `NOGROUP` (Redis restarted empty) re-creates it.
    groups: Mutex<HashSet<String>>,
    /// Per upstream, where the next `XAUTOCLAIM` scan of the pending
    /// entries resumes, so every pending entry is looked at in turn.
    cursors: Mutex<HashMap<String, String>>,
}

/// A stream entry: its id and fields.
struct Entry {
    id: String,
    fields: Vec<(String, Value)>,
}

impl Entry {
    fn field(&self, name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| as_string(v))
    }

    fn parse(v: &Value) -> Option<Self> {
        let Value::Array(parts) = v else {
            return None;
        };
        let id = as_string(parts.first()?)?;
        let fields = parts.get(1).map(as_pairs).unwrap_or_default();
        Some(Self { id, fields })
    }
}

/// The entries of an `XREADGROUP` reply for one stream (RESP2: an array of
/// `[key, entries]`; RESP3: a map key -> entries; nil when nothing).
fn read_entries(v: &Value) -> Vec<Entry> {
    let lists: Vec<&Value> = match v {
        Value::Map(pairs) => pairs.iter().map(|(_, entries)| entries).collect(),
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(kv) => kv.get(1),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    lists
        .into_iter()
        .flat_map(|l| match l {
            Value::Array(entries) => entries.iter().filter_map(Entry::parse).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// A sorted-set score (RESP3 double, or RESP2 text) as a whole number.
fn as_score(v: &Value) -> Option<u64> {
    let f = match v {
        Value::Double(f) => *f,
        other => as_string(other)?.parse::<f64>().ok()?,
    };
    (f.is_finite() && f >= 0.0).then_some(f as u64)
}

/// Position from a ticket's sequence number and the served mark.
fn position_of(seq: u64, served: u64) -> u64 {
    seq.saturating_sub(served).max(1)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Both maps are caches: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl RedisQueue {
    /// A queue on the configured Redis; connects lazily, like the store.
    pub fn new(config: &RedisConfig) -> Result<Self, StoreError> {
        Ok(Self {
            conn: RedisConn::new(config)?,
            prefix: config.key_prefix.clone(),
            groups: Mutex::new(HashSet::new()),
            cursors: Mutex::new(HashMap::new()),
        })
    }

    /// Round trips made so far (each pipeline or transaction is one), for
    /// benchmarks.
    pub fn round_trips(&self) -> u64 {
        self.conn.round_trips()
    }

    /// The stream key, also the prefix of the upstream's other keys.
    fn stream(&self, upstream: &str) -> String {
        format!("{}{{queue:{upstream}}}", self.prefix)
    }

    fn pos_key(&self, upstream: &str, ticket: &str) -> String {
        format!("{}:pos:{ticket}", self.stream(upstream))
    }

    /// Creates the consumer group unless this process already did.
    async fn ensure_group(&self, op: &'static str, upstream: &str) -> Result<(), StoreError> {
        if lock(&self.groups).contains(upstream) {
            return Ok(());
        }
        // From `0`: acknowledged entries are deleted, so whatever is in
        // the stream is still owed to the backend.
        let mut pipe = redis::pipe();
        pipe.cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream(upstream))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.conn.query(&pipe).await {
            Ok(_) => {}
            Err(e) if has_error_code(&e, "BUSYGROUP") => {}
            Err(e) => return Err(self.conn.error(op, e)),
        }
        lock(&self.groups).insert(upstream.to_string());
        Ok(())
    }

    /// Runs a pipeline that needs the group; on `NOGROUP` (Redis lost it,
    /// e.g. restarted empty) re-creates the group and retries once. Only
    /// for reads and group reads, which are safe to repeat.
    async fn run_grouped(
        &self,
        op: &'static str,
        upstream: &str,
        pipe: &Pipeline,
    ) -> Result<Vec<Value>, StoreError> {
        self.ensure_group(op, upstream).await?;
        match self.conn.query(pipe).await {
            Ok(vals) => Ok(vals),
            Err(e) if has_error_code(&e, "NOGROUP") => {
                tracing::info!(upstream, "queue consumer group missing; re-creating it");
                lock(&self.groups).remove(upstream);
                lock(&self.cursors).remove(upstream);
                self.ensure_group(op, upstream).await?;
                self.conn.run(op, pipe).await
            }
            Err(e) => Err(self.conn.error(op, e)),
        }
    }

    /// The next entry for `consumer`: one left idle by another consumer
    /// first, else the oldest never delivered.
    async fn take(
        &self,
        upstream: &str,
        consumer: &str,
        claim_idle_ms: u64,
    ) -> Result<Option<Entry>, StoreError> {
        let stream = self.stream(upstream);
        let cursor = lock(&self.cursors)
            .get(upstream)
            .cloned()
            .unwrap_or_else(|| "0-0".into());
        let mut claim = redis::pipe();
        claim
            .cmd("XAUTOCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(claim_idle_ms)
            .arg(&cursor)
            .arg("COUNT")
            .arg(1);
        let vals = self.run_grouped("queue_pop", upstream, &claim).await?;
        // [next cursor, claimed entries, (Redis 7) deleted ids]
        if let Some(Value::Array(reply)) = vals.first() {
            if let Some(next) = reply.first().and_then(as_string) {
                lock(&self.cursors).insert(upstream.to_string(), next);
            }
            // Redis 6.2 gives nil for a pending entry deleted meanwhile.
            if let Some(entry) = match reply.get(1) {
                Some(Value::Array(entries)) => entries.iter().find_map(Entry::parse),
                _ => None,
            } {
                return Ok(Some(entry));
            }
        }
        // No BLOCK: the caller polls.
        let mut read = redis::pipe();
        read.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        let vals = self.run_grouped("queue_pop", upstream, &read).await?;
        Ok(vals
            .first()
            .and_then(|v| read_entries(v).into_iter().next()))
    }

    /// After the push transaction timed out: did it run? Reads the ticket's
    /// position on the same connection (ordered after it).
    async fn resolve_timed_out_push(
        &self,
        upstream: &str,
        ticket: &str,
    ) -> Result<Option<u64>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.pos_key(upstream, ticket));
        pipe.cmd("ZSCORE")
            .arg(format!("{}:served", self.stream(upstream)))
            .arg(SERVED_MEMBER);
        let vals = self.conn.run("queue_push", &pipe).await?;
        let served = vals.get(1).and_then(as_score).unwrap_or(0);
        Ok(vals
            .first()
            .and_then(as_int)
            .map(|seq| position_of(seq.max(0) as u64, served)))
    }
}

#[async_trait]
impl Queue for RedisQueue {
    /// The capacity check reads `XLEN - pending` before adding: under
    /// concurrent pushes from several nodes the queue may briefly exceed
    /// `capacity` by the number of racing pushes (approximate by design;
    /// exact would need a script).
    fn shared(&self) -> bool {
        true
    }

    async fn push(
        &self,
        upstream: &str,
        request: &QueuedRequest,
        capacity: u32,
    ) -> Result<Option<u64>, StoreError> {
        let stream = self.stream(upstream);
        // Waiting = in the stream but not yet handed out (in service
        // entries are pending in the group), as in the memory queue.
        let mut check = redis::pipe();
        check.atomic();
        check.cmd("XLEN").arg(&stream);
        check.cmd("XPENDING").arg(&stream).arg(GROUP);
        let vals = self.run_grouped("queue_push", upstream, &check).await?;
        let len = vals.first().and_then(as_int).unwrap_or(0).max(0) as u64;
        let pending = match vals.get(1) {
            Some(Value::Array(summary)) => summary.first().and_then(as_int).unwrap_or(0),
            _ => 0,
        }
        .max(0) as u64;
        if len.saturating_sub(pending) >= u64::from(capacity) {
            return Ok(None);
        }

        // The sequence number comes first: MULTI cannot feed INCR's answer
        // to XADD. A push that dies after it leaves a gap, which only makes
        // the positions behind it one too high until it is passed.
        let mut incr = redis::pipe();
        incr.cmd("INCR").arg(format!("{stream}:seq"));
        let vals = self.conn.run("queue_push", &incr).await?;
        let seq = vals
            .first()
            .and_then(as_int)
            .ok_or_else(|| StoreError::Backend {
                op: "queue_push",
                message: "INCR gave no number".into(),
            })?
            .max(0) as u64;

        let ticket = request.ticket.to_string();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("t")
            .arg(&ticket)
            .arg("r")
            .arg(request.encode())
            .arg("n")
            .arg(seq);
        pipe.cmd("SET")
            .arg(self.pos_key(upstream, &ticket))
            .arg(seq)
            .arg("PX")
            .arg(POS_TTL_MS)
            .ignore();
        pipe.cmd("ZSCORE")
            .arg(format!("{stream}:served"))
            .arg(SERVED_MEMBER);
        // Counted again with our entry in: concurrent pushes all pass the
        // first check, so the one that finds the queue over capacity takes
        // its own entry out again. Racing pushes may each back out (the
        // queue ends a little short), but it never ends over capacity.
        pipe.cmd("XLEN").arg(&stream);
        pipe.cmd("XPENDING").arg(&stream).arg(GROUP);
        match self.conn.run("queue_push", &pipe).await {
            Ok(vals) => {
                let id = vals.first().and_then(as_string);
                let served = vals.get(1).and_then(as_score).unwrap_or(0);
                let len = vals.get(2).and_then(as_int).unwrap_or(0).max(0) as u64;
                let pending = match vals.get(3) {
                    Some(Value::Array(summary)) => summary.first().and_then(as_int).unwrap_or(0),
                    _ => 0,
                }
                .max(0) as u64;
                if let (true, Some(id)) = (len.saturating_sub(pending) > u64::from(capacity), &id) {
                    // Out again, unless a drainer already took it: then it
                    // will be sent, and the ticket must stay as it is.
                    let mut undo = redis::pipe();
                    undo.atomic();
                    undo.cmd("XPENDING")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(id)
                        .arg(id)
                        .arg(1);
                    undo.cmd("XDEL").arg(&stream).arg(id).ignore();
                    let vals = self.conn.run("queue_push", &undo).await?;
                    let taken = matches!(vals.first(), Some(Value::Array(e)) if !e.is_empty());
                    if !taken {
                        let mut pos = redis::pipe();
                        pos.cmd("DEL").arg(self.pos_key(upstream, &ticket)).ignore();
                        self.conn.run("queue_push", &pos).await?;
                        return Ok(None);
                    }
                }
                Ok(Some(position_of(seq, served)))
            }
            Err(e @ StoreError::Timeout { .. }) => {
                // It may have run: read back, never retry (a retry could
                // queue the request twice). If it ran and was already
                // handed out, this still reports the timeout; delivery is
                // at least once, keyed by the ticket.
                match self.resolve_timed_out_push(upstream, &ticket).await {
                    Ok(Some(position)) => Ok(Some(position)),
                    Ok(None) => Err(e),
                    Err(resolve) => {
                        tracing::warn!(upstream, ticket = %ticket, error = %resolve,
                            "could not resolve a timed-out queue push");
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn pop(
        &self,
        upstream: &str,
        consumer: &str,
        claim_idle_ms: u64,
    ) -> Result<Option<Delivery>, StoreError> {
        let stream = self.stream(upstream);
        for _ in 0..MAX_SKIPS {
            let Some(entry) = self.take(upstream, consumer, claim_idle_ms).await? else {
                return Ok(None);
            };
            // Bookkeeping, for new and reclaimed entries alike (idempotent,
            // so it also repairs what a consumer that died right after
            // taking an entry left undone):
            // - `served` keeps the highest sequence number handed out.
            //   `ZADD GT` is an atomic maximum without a script; a plain
            //   `SET` could go backwards when pops race, and `INCR` per
            //   delivery would drift for good if a consumer died between
            //   taking an entry and counting it;
            // - the ticket is no longer waiting: its position goes.
            let mut book = redis::pipe();
            book.atomic();
            if let Some(n) = entry.field("n").and_then(|n| n.parse::<u64>().ok()) {
                book.cmd("ZADD")
                    .arg(format!("{stream}:served"))
                    .arg("GT")
                    .arg(n)
                    .arg(SERVED_MEMBER)
                    .ignore();
            }
            let ticket = entry.field("t");
            if let Some(t) = &ticket {
                book.cmd("DEL").arg(self.pos_key(upstream, t)).ignore();
            }
            let decoded = entry
                .field("r")
                .ok_or_else(|| StoreError::Corrupt {
                    key: stream.clone(),
                    message: "queue entry without a request".into(),
                })
                .and_then(|r| QueuedRequest::decode(&r));
            match decoded {
                Ok(request) => {
                    // Positions are advisory: a failure here must not lose
                    // the delivery (the entry is ours now).
                    if let Err(e) = self.conn.run("queue_pop", &book).await {
                        tracing::warn!(upstream, id = %entry.id, error = %e,
                            "queue position bookkeeping failed");
                    }
                    return Ok(Some(Delivery {
                        id: entry.id,
                        request,
                    }));
                }
                Err(error) => {
                    tracing::warn!(upstream, id = %entry.id, ticket = ?ticket, %error,
                        "dropping a corrupt queue entry");
                    book.cmd("XACK")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(&entry.id)
                        .ignore();
                    book.cmd("XDEL").arg(&stream).arg(&entry.id).ignore();
                    self.conn.run("queue_pop", &book).await?;
                }
            }
        }
        Ok(None)
    }

    async fn touch(
        &self,
        upstream: &str,
        consumer: &str,
        delivery: &Delivery,
    ) -> Result<(), StoreError> {
        // XCLAIM to ourselves with min-idle 0 resets the entry's idle time
        // (JUSTID: no redelivery count bump, no payload back).
        let mut pipe = redis::pipe();
        pipe.cmd("XCLAIM")
            .arg(self.stream(upstream))
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(&delivery.id)
            .arg("JUSTID")
            .ignore();
        self.conn.run("queue_touch", &pipe).await.map(drop)
    }

    async fn ack(&self, upstream: &str, delivery: &Delivery) -> Result<(), StoreError> {
        let stream = self.stream(upstream);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(&delivery.id)
            .ignore();
        pipe.cmd("XDEL").arg(&stream).arg(&delivery.id).ignore();
        self.conn.run("queue_ack", &pipe).await.map(drop)
    }

    async fn position(&self, upstream: &str, ticket: TicketId) -> Result<Option<u64>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(self.pos_key(upstream, &ticket.to_string()));
        pipe.cmd("ZSCORE")
            .arg(format!("{}:served", self.stream(upstream)))
            .arg(SERVED_MEMBER);
        let vals = self.conn.run("queue_position", &pipe).await?;
        let Some(seq) = vals.first().and_then(as_int) else {
            return Ok(None);
        };
        let served = vals.get(1).and_then(as_score).unwrap_or(0);
        Ok(Some(position_of(seq.max(0) as u64, served)))
    }

    async fn depth(&self, upstream: &str) -> Result<u64, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(self.stream(upstream));
        let vals = self.conn.run("queue_depth", &pipe).await?;
        Ok(vals.first().and_then(as_int).unwrap_or(0).max(0) as u64)
    }
}
