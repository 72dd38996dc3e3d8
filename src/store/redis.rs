//! The shared store on Redis, Lua-free: only atomic commands, pipelines
//! and MULTI/EXEC (with WATCH for the rare conditional steps), so it runs
//! on Redis, Valkey, KeyDB, Dragonfly and behind proxies that refuse
//! scripts.
//!
//! Stock is a list of units, and where a unit is says what it is: in
//! `avail` it can be won; in `h:<ticket>` it is held by a live ticket; in
//! `c:<ticket>` it is sold to that ticket. Every step moves units between
//! these lists atomically, so a unit is always in exactly one of them:
//!
//! - a reservation moves units with `LMOVE` from `avail` to `h:<ticket>`
//!   in one MULTI with the dedup marks (`SET NX GET`), the buyer's holds
//!   (`uh:<user>`, ticket -> units), the ticket record, its index and its
//!   lease; it can never overdraw. A refusal moves them back, removes what
//!   it wrote and reads whether the sku is loaded at all;
//! - a commit `RENAME`s `h:<ticket>` to `c:<ticket>`, drops the lease and
//!   keeps the answer, in one pipelined round trip;
//! - a release moves `h:<ticket>` back to `avail` under WATCH, so a
//!   release that races a commit (or another release) either wins whole
//!   or finds nothing to move. A commit that comes after a release (the
//!   backend said yes after all) takes its units from `avail` again.
//!
//! A timed-out step is resolved by reading, never by retrying; a
//! reservation whose reply was lost is read back in the background
//! until Redis answers, and every live ticket has a lease in `leases`
//! (ticket -> deadline, ms) so that any node returns its units once the
//! lease runs out, even when the node that made it is gone.
//!
//! Keys of one (rule, sku) share the hash tag `{rule:sku}`: `avail`,
//! `loaded`, `tickets` (ticket -> record), `state` (ticket -> Q/H/C/R,
//! written by later steps: none is in flight since the record's time;
//! Q/H tells queued from in flight, the lists tell the rest), `leases`,
//! `h:<ticket>`, `c:<ticket>`, `uh:<user>`, `u:<user>` and `i:<key>`
//! (dedup marks), `released`, `restock`. `ticket:<id>` (no tag) points a
//! ticket at its (rule, sku) and keeps the backend's answer to it once
//! there is one ([`IndexWithAnswer`]); `skus` (no tag) lists the loaded
//! skus, for the lease sweep and reconcile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Pipeline, Value};

use super::redis_conn::{as_int, as_pairs, as_string, RedisConn};
use super::resp::{self, Transaction};
use super::{
    Committed, DedupMark, MarkScope, Reservation, Reserved, SkuAudit, StockView, Store, StoreError,
    TicketAudit, TicketRecord, TicketState,
};
use crate::config::RedisConfig;
use crate::vocab::{now_ms, ReleaseReason, SkuKey, StoredResponse, TicketId};

/// Field separator inside ledger values: never in ids (validated charset).
const SEP: &str = "\u{1f}";
/// Separator of mark keys inside a ticket record.
const MARK_SEP: &str = "\u{1e}";
/// Tries of the restock lock, 25 ms apart.
const RESTOCK_LOCK_TRIES: u32 = 40;
/// The restock lock expires by itself after this (a crashed restock).
const RESTOCK_LOCK_MS: u64 = 10_000;
/// Units pushed per RPUSH when restocking, to keep commands small.
const RESTOCK_CHUNK: u64 = 10_000;

/// The Redis store, over one multiplexed, self-reconnecting connection.
pub struct RedisStore(Arc<Inner>);

/// The store's state, shared with its background resolvers.
pub struct Inner {
    // Made on first use (see `redis_conn`).
    conn: RedisConn,
    /// Admin operations' own connection, with the longer admin timeout.
    admin: RedisConn,
    admin_timeout: Duration,
    prefix: String,
    ticket_ttl: Duration,
}

impl std::ops::Deref for RedisStore {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The immutable part of a ticket, as stored in `tickets`.
struct Record {
    qty: u32,
    user: String,
    counted_for_user: bool,
    marks: Vec<String>,
    /// When it won, ms since the epoch (0 for records that predate it).
    issued_ms: u64,
}

impl Record {
    fn encode(&self) -> String {
        let (mut qty, mut issued) = (itoa::Buffer::new(), itoa::Buffer::new());
        let counted = if self.counted_for_user { "1" } else { "0" };
        let mut parts = vec![
            qty.format(self.qty),
            SEP,
            &self.user,
            SEP,
            counted,
            SEP,
            issued.format(self.issued_ms),
            SEP,
        ];
        for (i, m) in self.marks.iter().enumerate() {
            if i > 0 {
                parts.push(MARK_SEP);
            }
            parts.push(m);
        }
        concat(&parts)
    }

    fn decode(key: &str, text: &str) -> Result<Self, StoreError> {
        let corrupt = || StoreError::Corrupt {
            key: key.to_string(),
            message: format!("unreadable ticket record {text:?}"),
        };
        let mut parts = text.split(SEP);
        let qty = parts
            .next()
            .and_then(|q| q.parse().ok())
            .ok_or_else(corrupt)?;
        let user = parts.next().ok_or_else(corrupt)?.to_string();
        let counted_for_user = parts.next().ok_or_else(corrupt)? == "1";
        let issued_ms = parts.next().ok_or_else(corrupt)?.parse().unwrap_or(0);
        let marks = parts
            .next()
            .unwrap_or_default()
            .split(MARK_SEP)
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        Ok(Self {
            qty,
            user,
            counted_for_user,
            marks,
            issued_ms,
        })
    }
}

/// Adds `n` single-unit moves from `from` to `to`. Taking pops from the
/// head of `avail`; giving back (`back`) returns units to its head, so the
/// most recently released units are sold first.
fn add_moves(
    pipe: &mut Pipeline,
    from: impl redis::ToRedisArgs + Copy,
    to: impl redis::ToRedisArgs + Copy,
    n: u64,
    back: bool,
) {
    let [from_end, to_end] = move_ends(back);
    for _ in 0..n {
        command(pipe, "LMOVE")
            .arg(from)
            .arg(to)
            .arg(from_end)
            .arg(to_end);
    }
}

/// The ends of `avail` and of a ticket's list a move takes a unit from
/// and puts it at: taking pops from the head of `avail`; giving back
/// (`back`) returns units to its head, so the most recently released
/// units are sold first.
fn move_ends(back: bool) -> [&'static str; 2] {
    if back {
        ["RIGHT", "LEFT"]
    } else {
        ["LEFT", "RIGHT"]
    }
}

/// Adds the command that keeps a ticket's answer for `ttl`, in its index
/// (callers read only the replies before it).
fn add_answer(
    t: &mut Transaction,
    index: Joined<'_, 3>,
    key: &SkuKey,
    r: &StoredResponse,
    ttl: Duration,
) {
    let value = IndexWithAnswer {
        member: member(key),
        answer: r,
    };
    t.cmd("SET", &[&index, &value, &"PX", &millis(ttl)]);
}

/// A ticket's index value with the backend's answer kept in it, one
/// string: `{member}\n{status}\n{content type}\n{body}`. Keeping the
/// answer in the index, which every ticket has anyway, spares each winner
/// a key of its own: a new key with a TTL is the costliest write a winner
/// makes (2-3 µs of Redis's CPU apiece, `bench/redis-layout`).
/// The member (ids have a validated charset) and a content type (a field
/// value) never hold a newline; the body is last and may hold anything.
struct IndexWithAnswer<'a> {
    member: Joined<'a, 3>,
    answer: &'a StoredResponse,
}

impl resp::Arg for IndexWithAnswer<'_> {
    fn put(&self, out: &mut Vec<u8>) {
        let mut status = itoa::Buffer::new();
        let status = status.format(self.answer.status);
        let kind = (self.answer.content_type.as_deref())
            .filter(|t| !t.contains('\n'))
            .unwrap_or("");
        let [rule, sep, sku] = self.member.0;
        resp::put_bulk_chunks(
            out,
            &[
                rule.as_bytes(),
                sep.as_bytes(),
                sku.as_bytes(),
                b"\n",
                status.as_bytes(),
                b"\n",
                kind.as_bytes(),
                b"\n",
                &self.answer.body,
            ],
        );
    }
}

/// Reads a ticket's index value: the (rule, sku) it names, and the answer
/// kept in it if there is one; `None` when it is not one.
fn read_index(value: &[u8]) -> Option<(SkuKey, Option<StoredResponse>)> {
    let mut parts = value.splitn(4, |b| *b == b'\n');
    let (rule, sku) = std::str::from_utf8(parts.next()?).ok()?.split_once(SEP)?;
    let key = SkuKey::new(rule, sku);
    let Some(status) = parts.next() else {
        return Some((key, None));
    };
    let status = std::str::from_utf8(status).ok()?.parse().ok()?;
    let kind = std::str::from_utf8(parts.next()?).ok()?;
    let body = parts.next()?;
    Some((
        key,
        Some(StoredResponse {
            status,
            content_type: (!kind.is_empty()).then(|| kind.to_string()),
            body: Bytes::copy_from_slice(body),
        }),
    ))
}

/// An answer kept in a hash of its own (`r:<ticket>`: status, type,
/// body), as versions before [`IndexWithAnswer`] kept it.
fn read_old_answer(v: &Value) -> Option<StoredResponse> {
    let fields: HashMap<String, Value> = as_pairs(v).into_iter().collect();
    let status = fields.get("status").and_then(as_int)?;
    Some(StoredResponse {
        status: u16::try_from(status).ok()?,
        content_type: fields
            .get("type")
            .and_then(as_string)
            .filter(|t| !t.is_empty()),
        body: match fields.get("body") {
            Some(Value::BulkString(b)) => Bytes::from(b.clone()),
            _ => Bytes::new(),
        },
    })
}

/// The hash tag of one (rule, sku), `{prefix}{rule:sku}`, that every key
/// of the sku starts with. Keys are built from it by concatenation: a
/// winner's two transactions name a dozen keys, and `format!` for each
/// was a tenth of the winner's instructions (callgrind).
struct Tag(String);

impl Tag {
    /// `{tag}:{suffix}`, as a command argument.
    fn at<'a>(&'a self, suffix: &'a str) -> Joined<'a, 3> {
        Joined([&self.0, ":", suffix])
    }

    /// `{tag}:{kind}:{id}`, a key of one ticket or user, as a command
    /// argument.
    fn of<'a>(&'a self, kind: &'a str, id: &'a str) -> Joined<'a, 5> {
        Joined([&self.0, ":", kind, ":", id])
    }

    /// `{tag}:{suffix}`.
    fn key(&self, suffix: &str) -> String {
        self.at(suffix).joined()
    }

    /// `{tag}:{kind}:{id}`.
    fn key_of(&self, kind: &str, id: &str) -> String {
        self.of(kind, id).joined()
    }
}

/// A key in parts, written into a command's buffer as one argument: a
/// winner's two transactions name a dozen keys, and joining each into a
/// `String` of its own first cost an allocation and a copy apiece.
#[derive(Clone, Copy)]
struct Joined<'a, const N: usize>([&'a str; N]);

impl<const N: usize> Joined<'_, N> {
    /// The key as a string.
    fn joined(&self) -> String {
        concat(&self.0)
    }
}

impl<const N: usize> resp::Arg for Joined<'_, N> {
    fn put(&self, out: &mut Vec<u8>) {
        resp::put_bulk_parts(out, &self.0);
    }
}

impl<const N: usize> redis::ToRedisArgs for Joined<'_, N> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write as _;
        let mut arg = out.writer_for_next_arg();
        for part in self.0 {
            // Writing into the command's own Vec cannot fail.
            let _ = arg.write_all(part.as_bytes());
        }
    }
}

/// Bytes a reservation's transaction starts with room for, besides its
/// marks and moves.
const RESERVE_BYTES: usize = 640;
/// Bytes a commit's transaction starts with room for, besides a kept
/// answer.
const COMMIT_BYTES: usize = 256;

/// Room a store command starts with: redis-rs starts a command's buffers
/// empty and grows them argument by argument, a reallocation or more
/// each (about 12k instructions of a winner's two transactions,
/// callgrind); a longer command still grows.
const CMD_ARGS: usize = 8;
/// Bytes of arguments a store command starts with room for.
const CMD_BYTES: usize = 160;

/// Starts `name` in `pipe` with room for a typical store command.
fn command<'p>(pipe: &'p mut Pipeline, name: &str) -> &'p mut Pipeline {
    let mut cmd = redis::Cmd::with_capacity(CMD_ARGS, CMD_BYTES);
    cmd.arg(name);
    pipe.add_command(cmd)
}

/// A (rule, sku) as `skus` lists it and a ticket's index names it; read
/// back with `split_once(SEP)`.
fn sku_member(key: &SkuKey) -> String {
    member(key).joined()
}

/// [`sku_member`], as a command argument.
fn member(key: &SkuKey) -> Joined<'_, 3> {
    Joined([&key.rule, SEP, &key.sku])
}

/// The parts, joined, in one allocation.
fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.push_str(p);
    }
    out
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// A store for the configured Redis; connects lazily, so the gateway
    /// starts (and answers `unavailable`) while Redis is down.
    pub fn new(config: &RedisConfig, ticket_ttl: Duration) -> Result<Self, StoreError> {
        let conn = RedisConn::new(config)?;
        let admin = conn.for_operators(config, config.admin_timeout)?;
        Ok(Self(Arc::new(Inner {
            conn,
            admin,
            admin_timeout: config.admin_timeout,
            prefix: config.key_prefix.clone(),
            ticket_ttl,
        })))
    }

    /// After a reservation's reply was lost: reads the ledger until Redis
    /// answers (bounded by the reservation's lease, past which the sweep
    /// returns the units anyway) and undoes it if it ran. Never re-runs it.
    fn resolve_in_background(&self, key: SkuKey, ticket: TicketId, within: Duration) {
        let store = self.0.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + within;
            let mut wait = Duration::from_millis(50);
            while tokio::time::Instant::now() < deadline {
                match store
                    .release_watched(&store.conn, &key, ticket, ReleaseReason::Interrupted, true)
                    .await
                {
                    Ok(moved) if moved > 0 => {
                        tracing::info!(ticket = %ticket, units = moved,
                            "an interrupted reservation ran; its units are back");
                        return;
                    }
                    // Not (yet) in the ledger: a reservation still on its
                    // way would show up on a later look.
                    Ok(_) => {}
                    Err(e) => tracing::debug!(ticket = %ticket, error = %e,
                        "cannot resolve an interrupted reservation yet"),
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        });
    }
}

impl Inner {
    fn tag(&self, key: &SkuKey) -> Tag {
        Tag(concat(&[&self.prefix, "{", &key.rule, ":", &key.sku, "}"]))
    }

    fn mark_key(&self, tag: &Tag, key: &SkuKey, mark: &DedupMark) -> String {
        match mark.scope {
            MarkScope::Sku => tag.key(&mark.id),
            MarkScope::Rule => concat(&[&self.prefix, "{", &key.rule, "}:", &mark.id]),
        }
    }

    fn index_key(&self, ticket: &str) -> String {
        self.index_arg(ticket).joined()
    }

    /// A ticket's index key, as a command argument.
    fn index_arg<'a>(&'a self, ticket: &'a str) -> Joined<'a, 3> {
        Joined([&self.prefix, "ticket:", ticket])
    }

    fn skus_key(&self) -> String {
        format!("{}skus", self.prefix)
    }

    /// Round trips made so far (each pipeline or transaction is one), for
    /// benchmarks.
    pub fn round_trips(&self) -> u64 {
        self.conn.round_trips() + self.admin.round_trips()
    }

    /// Whether the circuit breaker considers Redis down now.
    pub fn circuit_open(&self) -> bool {
        self.conn.circuit_open_now()
    }

    async fn run(&self, op: &'static str, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        self.conn.run(op, pipe).await
    }

    /// Sets the list length to `available` (under the restock lock).
    async fn adjust_available(
        &self,
        key: &SkuKey,
        tag: &Tag,
        available: u64,
    ) -> Result<StockView, StoreError> {
        let avail = tag.key("avail");
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(tag.key("loaded")).arg(1).ignore();
        pipe.cmd("SADD")
            .arg(self.skus_key())
            .arg(sku_member(key))
            .ignore();
        pipe.cmd("LLEN").arg(&avail);
        let vals = self.admin.run("set_available", &pipe).await?;
        let now = vals.first().and_then(as_int).unwrap_or(0).max(0) as u64;
        // Units are interchangeable: only the list lengths matter. While a
        // sale runs, concurrent reservations make the result approximate;
        // at rest it is exact, and it never overdraws either way.
        let mut change = redis::pipe();
        if available > now {
            let mut missing = available - now;
            while missing > 0 {
                let n = missing.min(RESTOCK_CHUNK);
                let cmd = change.cmd("RPUSH").arg(&avail);
                for _ in 0..n {
                    cmd.arg("u");
                }
                cmd.ignore();
                missing -= n;
            }
        } else if available < now {
            change.cmd("LPOP").arg(&avail).arg(now - available).ignore();
        }
        if available != now {
            self.admin.run("set_available", &change).await?;
        }
        self.view(&self.admin, key)
            .await?
            .ok_or_else(|| StoreError::NotLoaded(key.clone()))
    }

    /// Deletes the restock lock if it is still ours (compare and delete
    /// under WATCH; it expires by itself otherwise).
    async fn unlock(&self, lock: &str, token: &str) {
        let Ok(mut x) = self.admin.exclusive("set_available").await else {
            return;
        };
        let mut look = redis::pipe();
        look.cmd("WATCH").arg(lock).ignore();
        look.cmd("GET").arg(lock);
        let Ok(vals) = x.query("set_available", &look).await else {
            return;
        };
        let mut tx = redis::pipe();
        if vals
            .unwrap_or_default()
            .first()
            .and_then(as_string)
            .as_deref()
            == Some(token)
        {
            tx.atomic();
            tx.cmd("DEL").arg(lock).ignore();
        } else {
            tx.cmd("UNWATCH").ignore();
        }
        let _ = x.query("set_available", &tx).await;
    }

    /// Moves back what a refused reservation took and removes what it
    /// wrote, in one transaction: units, the marks it set, its hold in the
    /// buyer's holds, its record and lease. (The reservation's reply just
    /// came; nobody else knows the ticket.) When it took nothing, also
    /// reads whether the sku is loaded and has units now; gives those
    /// (having taken some, the sku is loaded; whether units are left does
    /// not matter then, and is given as false).
    async fn undo(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        moved: u64,
        marks_set: &[String],
        user: Option<&str>,
    ) -> Result<(bool, bool), StoreError> {
        let ask_loaded = moved == 0;
        let tag = self.tag(key);
        let id = ticket.to_string();
        let mut pipe = redis::pipe();
        pipe.atomic();
        if ask_loaded {
            pipe.cmd("EXISTS").arg(tag.key("loaded"));
            pipe.cmd("LLEN").arg(tag.key("avail"));
        }
        add_moves(
            &mut pipe,
            &tag.key_of("h", &id),
            &tag.key("avail"),
            moved,
            true,
        );
        for m in marks_set {
            pipe.cmd("DEL").arg(m).ignore();
        }
        if let Some(user) = user {
            pipe.cmd("HDEL")
                .arg(tag.key_of("uh", user))
                .arg(&id)
                .ignore();
        }
        add_forget(&mut pipe, &tag, &id, &self.index_key(&id));
        let vals = self.run("reserve-undo", &pipe).await?;
        if !ask_loaded {
            return Ok((true, false));
        }
        Ok((
            vals.first().and_then(as_int) == Some(1),
            vals.get(1).and_then(as_int).unwrap_or(0) > 0,
        ))
    }

    /// Returns what a ticket holds to `avail` (for an admin release also
    /// what it bought), under WATCH on its unit lists so that a commit or
    /// another release in between is seen, never doubled. `forget` also
    /// removes its record (an interrupted reservation nobody was told
    /// about). Gives the units moved.
    async fn release_watched(
        &self,
        conn: &RedisConn,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
        forget: bool,
    ) -> Result<u64, StoreError> {
        let tag = self.tag(key);
        let id = ticket.to_string();
        let (held, sold, avail) = (tag.key_of("h", &id), tag.key_of("c", &id), tag.key("avail"));
        // A few tries: each abort means someone else moved these units,
        // and the next look sees what they did.
        for _ in 0..8 {
            let mut x = conn.exclusive("release").await?;
            // Watching the unit lists catches a commit, a release and a
            // lease renewal (`set_state` touches `h:`) in between.
            let mut look = redis::pipe();
            look.cmd("WATCH").arg(&held).arg(&sold).ignore();
            look.cmd("HGET").arg(tag.key("tickets")).arg(&id);
            look.cmd("LLEN").arg(&held);
            look.cmd("LLEN").arg(&sold);
            look.cmd("ZSCORE").arg(tag.key("leases")).arg(&id);
            let vals = x.query("release", &look).await?.unwrap_or_default();
            let record = match vals.first().and_then(as_string) {
                Some(text) => match Record::decode(&tag.key("tickets"), &text) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        x.discard();
                        return Err(e);
                    }
                },
                None => None,
            };
            let n_held = vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64;
            let n_sold_now = vals.get(2).and_then(as_int).unwrap_or(0).max(0) as u64;
            // Only an operator (or the backend, through the admin API) may
            // cancel a sold order.
            let n_sold = if reason == ReleaseReason::Admin {
                n_sold_now
            } else {
                0
            };
            // A sweep acts on a lease seen run out a moment ago: one renewed
            // since (a drainer picked the order up) is not expired any more.
            let renewed = reason == ReleaseReason::LeaseExpired
                && vals
                    .get(3)
                    .and_then(as_int)
                    .is_some_and(|deadline| deadline > i64::try_from(now_ms()).unwrap_or(i64::MAX));
            let Some(record) = record.filter(|_| !renewed) else {
                let mut unwatch = redis::pipe();
                unwatch.cmd("UNWATCH").ignore();
                x.query("release", &unwatch).await?;
                return Ok(0);
            };
            // The marks still pointing at this ticket go with it, so the
            // buyer may try again; watched too, so a mark taken over in
            // between is left alone.
            let mut marks = redis::pipe();
            if !record.marks.is_empty() {
                marks.cmd("WATCH").arg(&record.marks).ignore();
                for m in &record.marks {
                    marks.cmd("GET").arg(m);
                }
            }
            let ours: Vec<&String> = if record.marks.is_empty() {
                Vec::new()
            } else {
                let vals = x.query("release", &marks).await?.unwrap_or_default();
                record
                    .marks
                    .iter()
                    .zip(vals.iter())
                    .filter(|(_, v)| as_string(v).as_deref() == Some(id.as_str()))
                    .map(|(m, _)| m)
                    .collect()
            };
            let moved = n_held + n_sold;
            // Holding nothing and sold nothing: a reservation that never
            // won, or one undone already; whatever it left is cleared too.
            let dead = n_held == 0 && n_sold_now == 0;
            let mut tx = redis::pipe();
            tx.atomic();
            add_moves(&mut tx, &held, &avail, n_held, true);
            add_moves(&mut tx, &sold, &avail, n_sold, true);
            // The lease goes in every case: units moved back, a ticket that
            // never held any, or one sold whose lease outlived it (a
            // commit's pipeline cut off after its RENAME; its marks stay
            // with the sold order).
            tx.cmd("ZREM").arg(tag.key("leases")).arg(&id).ignore();
            if moved > 0 || forget || dead {
                for m in &ours {
                    tx.cmd("DEL").arg(*m).ignore();
                }
                if record.counted_for_user {
                    tx.cmd("HDEL")
                        .arg(tag.key_of("uh", &record.user))
                        .arg(&id)
                        .ignore();
                }
            }
            if forget {
                add_forget(&mut tx, &tag, &id, &self.index_key(&id));
            } else if moved > 0 || dead {
                tx.cmd("HSET")
                    .arg(tag.key("state"))
                    .arg(&id)
                    .arg("R")
                    .ignore();
                tx.cmd("INCRBY")
                    .arg(tag.key("released"))
                    .arg(moved)
                    .ignore();
            }
            match x.query("release", &tx).await? {
                Some(_) => return Ok(moved),
                None => continue,
            }
        }
        Err(StoreError::Backend {
            op: "release",
            message: format!("ticket {ticket} kept changing under the release; try again"),
        })
    }

    /// The stock view, on `conn`: units counted where they are.
    async fn view(&self, conn: &RedisConn, key: &SkuKey) -> Result<Option<StockView>, StoreError> {
        let tag = self.tag(key);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(tag.key("loaded"));
        pipe.cmd("LLEN").arg(tag.key("avail"));
        pipe.cmd("HGETALL").arg(tag.key("state"));
        pipe.cmd("GET").arg(tag.key("released"));
        // Every ticket has a record; only some have a state field.
        pipe.cmd("HKEYS").arg(tag.key("tickets"));
        // One snapshot: a reservation in between would count twice.
        pipe.atomic();
        let vals = conn.read("stock", &pipe).await?;
        if vals.first().and_then(as_int) != Some(1) {
            return Ok(None);
        }
        let mut view = StockView {
            available: vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64,
            released: vals.get(3).and_then(as_int).unwrap_or(0).max(0) as u64,
            ..StockView::default()
        };
        // Ticket -> its state field, if any: the records' tickets and, to
        // miss no units, any state field without a record.
        let mut states: HashMap<String, Option<String>> = vals
            .get(4)
            .map(|v| match v {
                Value::Array(items) | Value::Set(items) => items
                    .iter()
                    .filter_map(as_string)
                    .map(|id| (id, None))
                    .collect(),
                _ => HashMap::new(),
            })
            .unwrap_or_default();
        for (id, state) in vals.get(2).map(as_pairs).unwrap_or_default() {
            states.insert(id, as_string(&state));
        }
        let states: Vec<(String, Option<String>)> = states.into_iter().collect();
        let mut lists = redis::pipe();
        for (id, _) in &states {
            lists.cmd("LLEN").arg(tag.key_of("h", id));
            lists.cmd("LLEN").arg(tag.key_of("c", id));
        }
        let counts = if states.is_empty() {
            Vec::new()
        } else {
            conn.read("stock", &lists).await?
        };
        for (i, (_, state)) in states.iter().enumerate() {
            let held = counts.get(2 * i).and_then(as_int).unwrap_or(0).max(0) as u64;
            let sold = counts.get(2 * i + 1).and_then(as_int).unwrap_or(0).max(0) as u64;
            view.sold += sold;
            if state.as_deref().is_some_and(|s| s.starts_with('Q')) {
                view.queued += held;
            } else {
                view.in_flight += held;
            }
        }
        view.initial = view.available + view.in_flight + view.sold + view.queued;
        Ok(Some(view))
    }

    /// A commit that found no held units: the ticket was released (or
    /// never won). Takes its units from `avail` again if it has a record.
    async fn commit_late(&self, key: &SkuKey, ticket: TicketId) -> Result<Committed, StoreError> {
        let tag = self.tag(key);
        let id = ticket.to_string();
        let (held, sold) = (tag.key_of("h", &id), tag.key_of("c", &id));
        // Under WATCH: two late commits of one ticket (a journal replay and
        // reconcile, say) must not both take its units.
        for _ in 0..8 {
            let mut x = self.conn.exclusive("commit").await?;
            let mut look = redis::pipe();
            look.cmd("WATCH").arg(&held).arg(&sold).ignore();
            look.cmd("HGET").arg(tag.key("tickets")).arg(&id);
            look.cmd("LLEN").arg(&sold);
            look.cmd("LLEN").arg(&held);
            let vals = x.query("commit", &look).await?.unwrap_or_default();
            if vals.get(2).and_then(as_int).unwrap_or(0) > 0 {
                // Its units are still held: the commit's RENAME did not run
                // (only a missing `h:` sends a commit here). Taking more
                // from `avail` would sell them twice.
                x.discard();
                return Err(StoreError::Backend {
                    op: "commit",
                    message: format!(
                        "ticket {ticket} still holds its units; the commit did not run"
                    ),
                });
            }
            let Some(text) = vals.first().and_then(as_string) else {
                // Unknown: no state may be left behind for it.
                let mut forget = redis::pipe();
                forget.cmd("UNWATCH").ignore();
                forget.cmd("HDEL").arg(tag.key("state")).arg(&id).ignore();
                x.query("commit", &forget).await?;
                return Ok(Committed::Unknown);
            };
            let record = match Record::decode(&tag.key("tickets"), &text) {
                Ok(r) => r,
                Err(e) => {
                    x.discard();
                    return Err(e);
                }
            };
            let have = vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64;
            let want = u64::from(record.qty).saturating_sub(have);
            if want == 0 {
                // A repeated commit.
                let mut unwatch = redis::pipe();
                unwatch.cmd("UNWATCH").ignore();
                x.query("commit", &unwatch).await?;
                return Ok(Committed::Held);
            }
            let mut take = redis::pipe();
            take.atomic();
            add_moves(&mut take, &tag.key("avail"), &sold, want, false);
            if record.counted_for_user {
                let holds = tag.key_of("uh", &record.user);
                take.cmd("HSET")
                    .arg(&holds)
                    .arg(&id)
                    .arg(record.qty)
                    .ignore();
                take.cmd("PEXPIRE")
                    .arg(&holds)
                    .arg(millis(self.ticket_ttl))
                    .ignore();
            }
            take.cmd("HSET")
                .arg(tag.key("state"))
                .arg(&id)
                .arg("C")
                .ignore();
            let Some(vals) = x.query("commit", &take).await? else {
                continue;
            };
            let taken = vals.iter().filter(|v| !matches!(v, Value::Nil)).count() as u64;
            // `released` counted these units as returned; they are sold again.
            if taken > 0 {
                let mut fix = redis::pipe();
                fix.cmd("DECRBY")
                    .arg(tag.key("released"))
                    .arg(taken)
                    .ignore();
                self.run("commit", &fix).await?;
            }
            return Ok(Committed::Retaken {
                short: u32::try_from(want - taken).unwrap_or(u32::MAX),
            });
        }
        Err(StoreError::Backend {
            op: "commit",
            message: format!("ticket {ticket} kept changing under a late commit; try again"),
        })
    }
}

/// Adds the commands that remove a ticket that never was: its record,
/// state, lease and index.
fn add_forget(pipe: &mut Pipeline, tag: &Tag, id: &str, index: &str) {
    pipe.cmd("HDEL").arg(tag.key("tickets")).arg(id).ignore();
    pipe.cmd("HDEL").arg(tag.key("state")).arg(id).ignore();
    pipe.cmd("ZREM").arg(tag.key("leases")).arg(id).ignore();
    pipe.cmd("DEL").arg(index).ignore();
}

/// The reply of a reservation's transaction, read in the order it was
/// written.
struct ReserveReply {
    olds: Vec<Option<String>>,
    user_total: Option<i64>,
    moved: u64,
}

/// Reads a reservation's replies, in the order `reserve` sent its
/// commands (the last three, which only write, unread).
fn parse_reserve(vals: &[Value], marks: usize, counted: bool, qty: u32) -> ReserveReply {
    let mut it = vals.iter();
    let olds = (0..marks).map(|_| it.next().and_then(as_string)).collect();
    let user_total = if counted {
        // HSET of this ticket's hold, then HVALS of the buyer's holds (this
        // ticket's included), then PEXPIRE.
        let _hset = it.next();
        let total = it.next().map(|v| match v {
            Value::Array(items) => items.iter().filter_map(as_int).sum(),
            Value::Set(items) => items.iter().filter_map(as_int).sum(),
            _ => 0,
        });
        let _pexpire = it.next();
        total
    } else {
        None
    };
    let moved = (0..qty)
        .filter(|_| it.next().is_some_and(|v| !matches!(v, Value::Nil)))
        .count() as u64;
    ReserveReply {
        olds,
        user_total,
        moved,
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn reserve(&self, r: &Reservation<'_>) -> Result<Reserved, StoreError> {
        let tag = self.tag(r.key);
        let hex = r.ticket.hex();
        let ticket = hex.as_str();
        let mark_keys: Vec<String> = r
            .marks
            .iter()
            .map(|m| self.mark_key(&tag, r.key, m))
            .collect();
        let counted = r.per_user_limit.is_some();
        let record = Record {
            qty: r.qty,
            user: r.user.to_string(),
            counted_for_user: counted,
            marks: mark_keys.clone(),
            issued_ms: now_ms(),
        };
        // The marks, the buyer's 3, the moves and 3 more, in one MULTI/EXEC
        // on the lean connection (`redis_lean`): `parse_reserve` reads the
        // replies by position. Whether the sku is loaded matters only when
        // `avail` gave too few units (an empty list is no key at all): the
        // refusal's undo asks. No state field either: none means in flight
        // since the record's time.
        let mut t =
            Transaction::with_capacity(RESERVE_BYTES + 64 * (mark_keys.len() + r.qty as usize));
        for (k, m) in mark_keys.iter().zip(r.marks) {
            t.cmd("SET", &[k, &ticket, &"NX", &"PX", &millis(m.ttl), &"GET"]);
        }
        if counted {
            // The buyer's holds, ticket -> units: removing one twice is
            // harmless, unlike decrementing a counter twice. It expires
            // with the tickets, so a refused buyer leaves nothing behind.
            let holds = tag.of("uh", r.user);
            t.cmd("HSET", &[&holds, &ticket, &r.qty]);
            t.cmd("HVALS", &[&holds]);
            t.cmd("PEXPIRE", &[&holds, &millis(self.ticket_ttl)]);
        }
        let (avail, held) = (tag.at("avail"), tag.of("h", ticket));
        let [from_end, to_end] = move_ends(false);
        for _ in 0..r.qty {
            t.cmd("LMOVE", &[&avail, &held, &from_end, &to_end]);
        }
        t.cmd("HSET", &[&tag.at("tickets"), &ticket, &record.encode()]);
        t.cmd(
            "SET",
            &[
                &self.index_arg(ticket),
                &member(r.key),
                &"PX",
                &millis(self.ticket_ttl),
            ],
        );
        t.cmd(
            "ZADD",
            &[
                &tag.at("leases"),
                &now_ms().saturating_add(millis(r.lease)),
                &ticket,
            ],
        );
        let vals = match self.conn.transact("reserve", t, false).await {
            Ok(v) => v,
            Err(e) => {
                // A timeout or a connection lost after the transaction was
                // sent: it may have run, now or when Redis wakes. Read it
                // back until Redis answers, never retry it. (Refused by the
                // breaker, it was never sent.)
                if !matches!(e, StoreError::CircuitOpen { .. }) {
                    self.resolve_in_background(r.key.clone(), r.ticket, r.lease);
                }
                return Err(e);
            }
        };
        let reply = parse_reserve(&vals, mark_keys.len(), counted, r.qty);
        let short = match reply.moved {
            0 => Some(Reserved::SoldOut),
            m if m < u64::from(r.qty) => Some(Reserved::NotEnough),
            _ => None,
        };
        let duplicate = reply.olds.iter().flatten().find_map(|t| TicketId::parse(t));
        let over_limit = matches!(
            (r.per_user_limit, reply.user_total),
            (Some(limit), Some(total)) if total > i64::from(limit)
        );
        if duplicate.is_none() && !over_limit && short.is_none() {
            // Units came out of `avail`, so the sku is loaded.
            return Ok(Reserved::Won);
        }
        let marks_set: Vec<String> = mark_keys
            .iter()
            .zip(&reply.olds)
            .filter(|(_, old)| old.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let user = counted.then_some(r.user);
        let (loaded, units_now) = match self
            .undo(r.key, r.ticket, reply.moved, &marks_set, user)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                // Left as it is, the refused attempt would hold its marks
                // (and any units) until its lease: undo it from the ledger
                // as soon as Redis answers.
                self.resolve_in_background(r.key.clone(), r.ticket, r.lease);
                return Err(e);
            }
        };
        Ok(if !loaded {
            Reserved::NotLoaded
        } else if let Some(first) = duplicate {
            Reserved::Duplicate { first }
        } else if over_limit {
            Reserved::OverUserLimit
        } else if short == Some(Reserved::SoldOut) && units_now {
            // Units came since the reservation looked (the first load, a
            // restock, a release): refused, but with no sold-out flag.
            Reserved::NotEnough
        } else {
            short.unwrap_or(Reserved::Won)
        })
    }

    async fn commit(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: Option<&StoredResponse>,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let tag = self.tag(key);
        let hex = ticket.hex();
        let id = hex.as_str();
        // One round trip: its held units become its sold units whole, or,
        // when a release got there first, nothing moves and the late path
        // takes them again. A pipeline, not a MULTI: each step is atomic on
        // its own and right in any order with others' steps in between (a
        // sweep or release after the RENAME finds nothing held; the lease
        // and the answer are the same whichever way the RENAME went), and
        // Redis need not queue them. `c:<ticket>` says it is committed: no
        // state field is written.
        let mut t =
            Transaction::pipeline(COMMIT_BYTES + response.map_or(0, |r| r.body.len() + 256));
        t.cmd("RENAME", &[&tag.of("h", id), &tag.of("c", id)]);
        t.cmd("ZREM", &[&tag.at("leases"), &id]);
        if let Some(response) = response {
            add_answer(&mut t, self.index_arg(id), key, response, ttl);
        }
        // The RENAME's "no such key" (a release got there first) is read
        // below. Any other error (a refused command: ACL, OOM) fails the
        // commit, which is then journaled and tried again; a try again
        // finds the units sold if the RENAME ran, and redoes the rest.
        let vals = self.conn.transact("commit", t, true).await?;
        let late = matches!(
            vals.first(),
            Some(Value::ServerError(e)) if e.details() == Some("no such key")
        );
        let refused = vals.iter().skip(usize::from(late)).find_map(|v| match v {
            Value::ServerError(e) => Some(e.clone()),
            _ => None,
        });
        if let Some(e) = refused {
            return Err(self.conn.error("commit", e.into()));
        }
        if late {
            self.commit_late(key, ticket).await
        } else {
            Ok(Committed::Held)
        }
    }

    async fn set_state(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        state: TicketState,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let code = match state {
            TicketState::Queued => "Q",
            TicketState::Held => "H",
            // Commit and release have their own operations.
            TicketState::Committed | TicketState::Released => return Ok(false),
        };
        let tag = self.tag(key);
        let id = ticket.to_string();
        let held = tag.key_of("h", &id);
        // The lists say whether the ticket is still live, whatever the
        // state field says; the lease is renewed only while it is (`XX`:
        // a commit or release removed it). Rotating the held list by one
        // changes nothing but touches it, so a sweep that read the old
        // lease (and WATCHes the list) gives up.
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HSET")
            .arg(tag.key("state"))
            .arg(&id)
            .arg(format!("{code}{}", now_ms()))
            .ignore();
        pipe.cmd("ZADD")
            .arg(tag.key("leases"))
            .arg("XX")
            .arg(now_ms().saturating_add(millis(lease)))
            .arg(&id)
            .ignore();
        pipe.cmd("LMOVE")
            .arg(&held)
            .arg(&held)
            .arg("RIGHT")
            .arg("LEFT")
            .ignore();
        pipe.cmd("EXISTS").arg(&held);
        let vals = self.run("set_state", &pipe).await?;
        Ok(vals.first().and_then(as_int) == Some(1))
    }

    async fn expired(&self, limit: usize) -> Result<Vec<(SkuKey, TicketId)>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(self.skus_key());
        let vals = self.run("expired", &pipe).await?;
        let skus: Vec<SkuKey> = match vals.first() {
            Some(Value::Array(items)) | Some(Value::Set(items)) => items
                .iter()
                .filter_map(as_string)
                .filter_map(|s| s.split_once(SEP).map(|(r, k)| SkuKey::new(r, k)))
                .collect(),
            _ => Vec::new(),
        };
        if skus.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for key in &skus {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(self.tag(key).key("leases"))
                .arg("-inf")
                .arg(now)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
        }
        let vals = self.run("expired", &pipe).await?;
        let mut found: Vec<(i64, SkuKey, TicketId)> = Vec::new();
        for (key, v) in skus.iter().zip(&vals) {
            for (id, score) in as_pairs(v) {
                if let Some(t) = TicketId::parse(&id) {
                    found.push((as_int(&score).unwrap_or(0), key.clone(), t));
                }
            }
        }
        found.sort();
        Ok(found
            .into_iter()
            .take(limit)
            .map(|(_, k, t)| (k, t))
            .collect())
    }

    async fn keep_response(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let hex = ticket.hex();
        let mut t = Transaction::with_capacity(response.body.len() + 256);
        add_answer(&mut t, self.index_arg(hex.as_str()), key, response, ttl);
        self.conn
            .transact("keep_response", t, false)
            .await
            .map(drop)
    }

    async fn release(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
    ) -> Result<u64, StoreError> {
        // Operators' releases may take the admin timeout; a shopper's
        // failed order is settled within the request's own.
        let conn = if reason == ReleaseReason::Admin {
            &self.admin
        } else {
            &self.conn
        };
        self.release_watched(conn, key, ticket, reason, false).await
    }

    async fn set_available(&self, key: &SkuKey, available: u64) -> Result<StockView, StoreError> {
        let tag = self.tag(key);
        // Restocks of one sku take turns (an ops script may call every
        // node at once): each reads the list length and adjusts it, and two
        // at once would both add the difference.
        let lock = tag.key("restock");
        let token = TicketId::random().to_string();
        // Outlives the restock's own steps (each within the admin timeout),
        // and expires by itself after a crash.
        let lock_ms = RESTOCK_LOCK_MS.max(millis(self.admin_timeout) * 4);
        let mut taken = false;
        let mut last_error = None;
        for _ in 0..RESTOCK_LOCK_TRIES {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(lock_ms);
            match self.admin.run("set_available", &pipe).await {
                Ok(vals) if vals.first().is_some_and(|v| !matches!(v, Value::Nil)) => {
                    taken = true;
                    break;
                }
                Ok(_) => {}
                // A connection broken by a Redis restart: the next try
                // reconnects.
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !taken {
            return Err(last_error.unwrap_or_else(|| StoreError::Backend {
                op: "set_available",
                message: format!("another restock of {key} is running; try again"),
            }));
        }
        // "Set to N" reads the list's length first, so doing it again
        // after an error (a reply lost, a connection broken) is safe.
        let result = match self.adjust_available(key, &tag, available).await {
            Err(e) if !matches!(e, StoreError::NotLoaded(_)) => {
                tracing::debug!(error = %e, "restock interrupted; reading again and finishing it");
                self.adjust_available(key, &tag, available).await
            }
            done => done,
        };
        self.unlock(&lock, &token).await;
        result
    }

    async fn stock(&self, key: &SkuKey) -> Result<Option<StockView>, StoreError> {
        self.view(&self.admin, key).await
    }

    async fn available(&self, key: &SkuKey) -> Result<Option<u64>, StoreError> {
        let tag = self.tag(key);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(tag.key("loaded"));
        pipe.cmd("LLEN").arg(tag.key("avail"));
        let vals = self.run("available", &pipe).await?;
        if vals.first().and_then(as_int) != Some(1) {
            return Ok(None);
        }
        Ok(Some(vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64))
    }

    async fn ticket(&self, id: TicketId) -> Result<Option<TicketRecord>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.index_key(&id.hex()));
        let vals = self.run("ticket", &pipe).await?;
        let index = match vals.first() {
            Some(Value::BulkString(b)) => b.as_slice(),
            _ => return Ok(None),
        };
        let Some((key, kept)) = read_index(index) else {
            return Err(StoreError::Corrupt {
                key: self.index_key(&id.hex()),
                // Its first line only: what follows is a shopper's answer.
                message: format!(
                    "unreadable index {:?}",
                    String::from_utf8_lossy(index.split(|b| *b == b'\n').next().unwrap_or(&[]))
                ),
            });
        };
        let tag = self.tag(&key);
        let ticket = id.to_string();
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(tag.key("tickets")).arg(&ticket);
        pipe.cmd("HGET").arg(tag.key("state")).arg(&ticket);
        pipe.cmd("EXISTS").arg(tag.key_of("h", &ticket));
        pipe.cmd("EXISTS").arg(tag.key_of("c", &ticket));
        if kept.is_none() {
            // An answer kept by a version before the index held answers
            // (a rolling upgrade): in a hash of its own.
            pipe.cmd("HGETALL").arg(tag.key_of("r", &ticket));
        }
        let vals = self.run("ticket", &pipe).await?;
        let Some(text) = vals.first().and_then(as_string) else {
            return Ok(None);
        };
        let record = Record::decode(&tag.key("tickets"), &text)?;
        // No state field: in flight (or settled, as the lists say) since
        // its reservation, which writes none.
        let written = match vals.get(1).and_then(as_string) {
            None => TicketState::Held,
            Some(state) => state
                .chars()
                .next()
                .and_then(TicketState::from_code)
                .ok_or_else(|| StoreError::Corrupt {
                    key: tag.key("state"),
                    message: format!("unknown state {state:?}"),
                })?,
        };
        let held = vals.get(2).and_then(as_int) == Some(1);
        let sold = vals.get(3).and_then(as_int) == Some(1);
        // Where its units are decides; the field tells queued from held.
        let state = if sold || written == TicketState::Committed {
            TicketState::Committed
        } else if held {
            match written {
                TicketState::Queued => TicketState::Queued,
                _ => TicketState::Held,
            }
        } else {
            TicketState::Released
        };
        let response = kept.or_else(|| vals.get(4).and_then(read_old_answer));
        Ok(Some(TicketRecord {
            id,
            key,
            user: record.user,
            qty: record.qty,
            state,
            response,
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        self.run("ping", &pipe).await.map(drop)
    }

    async fn skus(&self) -> Result<Vec<SkuKey>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(self.skus_key());
        let vals = self.admin.read("skus", &pipe).await?;
        let mut keys: Vec<SkuKey> = match vals.first() {
            Some(Value::Array(items)) | Some(Value::Set(items)) => items
                .iter()
                .filter_map(as_string)
                .filter_map(|s| s.split_once(SEP).map(|(r, k)| SkuKey::new(r, k)))
                .collect(),
            _ => Vec::new(),
        };
        keys.sort();
        Ok(keys)
    }

    async fn audit(&self, key: &SkuKey) -> Result<Option<SkuAudit>, StoreError> {
        let tag = self.tag(key);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(tag.key("loaded"));
        pipe.cmd("LLEN").arg(tag.key("avail"));
        pipe.cmd("HGETALL").arg(tag.key("tickets"));
        pipe.cmd("HGETALL").arg(tag.key("state"));
        pipe.cmd("ZRANGE")
            .arg(tag.key("leases"))
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let vals = self.admin.read("audit", &pipe).await?;
        if vals.first().and_then(as_int) != Some(1) {
            return Ok(None);
        }
        let available = vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64;
        let tickets_key = tag.key("tickets");
        let records: Vec<(String, Record)> = vals
            .get(2)
            .map(as_pairs)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(id, v)| as_string(&v).map(|text| (id, text)))
            .map(|(id, text)| Record::decode(&tickets_key, &text).map(|r| (id, r)))
            .collect::<Result<_, _>>()?;
        let states: HashMap<String, String> = vals
            .get(3)
            .map(as_pairs)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| as_string(&v).map(|v| (k, v)))
            .collect();
        let leases: HashMap<String, i64> = vals
            .get(4)
            .map(as_pairs)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| as_int(&v).map(|v| (k, v)))
            .collect();
        let mut lists = redis::pipe();
        for (id, _) in &records {
            lists.cmd("LLEN").arg(tag.key_of("h", id));
            lists.cmd("LLEN").arg(tag.key_of("c", id));
        }
        let counts = if records.is_empty() {
            Vec::new()
        } else {
            self.admin.read("audit", &lists).await?
        };
        let mut tickets = Vec::new();
        for (i, (id, record)) in records.into_iter().enumerate() {
            let Some(ticket) = TicketId::parse(&id) else {
                continue;
            };
            let held = counts.get(2 * i).and_then(as_int).unwrap_or(0).max(0) as u64;
            let sold = counts.get(2 * i + 1).and_then(as_int).unwrap_or(0).max(0) as u64;
            let written = states
                .get(&id)
                .and_then(|s| s.chars().next())
                .and_then(TicketState::from_code);
            let state = if sold > 0 || written == Some(TicketState::Committed) {
                TicketState::Committed
            } else if held > 0 {
                if written == Some(TicketState::Queued) {
                    TicketState::Queued
                } else {
                    TicketState::Held
                }
            } else {
                TicketState::Released
            };
            // `H<ms>`/`Q<ms>`: when it was last queued or sent.
            let since_ms = states
                .get(&id)
                .and_then(|s| s.get(1..))
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(record.issued_ms);
            tickets.push(TicketAudit {
                id: ticket,
                user: record.user,
                qty: record.qty,
                state,
                held,
                sold,
                issued_ms: record.issued_ms,
                since_ms,
                lease_ms: leases.get(&id).and_then(|ms| u64::try_from(*ms).ok()),
            });
        }
        tickets.sort_by_key(|t| (t.issued_ms, t.id));
        Ok(Some(SkuAudit { available, tickets }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_written_in_parts_encode_as_joined_strings() {
        let tag = Tag("sluice:{sale:1}".to_string());
        let key = SkuKey::new("sale", "1");
        let mut parts = Pipeline::with_capacity(3);
        parts.atomic();
        command(&mut parts, "RENAME")
            .arg(tag.of("h", "ab"))
            .arg(tag.of("c", "ab"));
        command(&mut parts, "HSET")
            .arg(tag.at("state"))
            .arg(Joined(["H", "17"]))
            .ignore();
        // Longer than the room a command starts with: it still grows.
        let long = "x".repeat(CMD_BYTES * 2);
        command(&mut parts, "SET")
            .arg(member(&key))
            .arg(&long)
            .arg(Joined::<0>([]));
        let mut strings = redis::pipe();
        strings.atomic();
        strings
            .cmd("RENAME")
            .arg(tag.key_of("h", "ab"))
            .arg(tag.key_of("c", "ab"));
        strings
            .cmd("HSET")
            .arg(tag.key("state"))
            .arg("H17")
            .ignore();
        strings.cmd("SET").arg(sku_member(&key)).arg(&long).arg("");
        assert_eq!(parts.get_packed_pipeline(), strings.get_packed_pipeline());
        assert_eq!(tag.key_of("h", "ab"), "sluice:{sale:1}:h:ab");
        assert_eq!(sku_member(&key), "sale\u{1f}1");
    }

    /// The bulk string an index with `answer` is written as.
    fn written(key: &SkuKey, answer: &StoredResponse) -> Vec<u8> {
        let mut out = Vec::new();
        let value = IndexWithAnswer {
            member: member(key),
            answer,
        };
        resp::Arg::put(&value, &mut out);
        out
    }

    #[test]
    fn an_answer_kept_in_the_index_reads_back_whole() {
        let key = SkuKey::new("sale", "sku-1");
        let answer = StoredResponse {
            status: 201,
            content_type: Some("application/json".into()),
            body: Bytes::from_static(b"{\"a\":\n1}\n\xff"),
        };
        let out = written(&key, &answer);
        let value = out
            .splitn(2, |b| *b == b'\n')
            .nth(1)
            .expect("a bulk string");
        let value = &value[..value.len() - 2];
        assert_eq!(
            out.len(),
            value.len() + format!("${}\r\n\r\n", value.len()).len()
        );
        assert_eq!(read_index(value), Some((key.clone(), Some(answer))));
        // The index as a reservation writes it, and an answer without a
        // content type.
        assert_eq!(
            read_index(sku_member(&key).as_bytes()),
            Some((key.clone(), None))
        );
        let plain = StoredResponse {
            status: 503,
            content_type: None,
            body: Bytes::new(),
        };
        let out = written(&key, &plain);
        assert!(out.ends_with(b"sale\x1fsku-1\n503\n\n\r\n"), "{out:?}");
        assert_eq!(
            read_index(b"sale\x1fsku-1\n503\n\n"),
            Some((key, Some(plain)))
        );
        assert_eq!(read_index(b"no separator"), None);
        assert_eq!(read_index(b"sale\x1fsku-1\nx\n\n"), None);
    }
}
