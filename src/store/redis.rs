//! The shared store on Redis, Lua-free: only atomic commands, pipelines
//! and MULTI/EXEC, so it runs on Redis, Valkey, KeyDB, Dragonfly and behind
//! proxies that refuse scripts.
//!
//! Stock is a list of units. A reservation moves units with `LMOVE` from
//! `avail` to the ticket's own list in one MULTI with the dedup marks
//! (`SET NX GET`), the per-user count and the ticket record: it can never
//! overdraw, and what a ticket holds can always be read back (`LLEN`).
//! A refusal undoes only what the transaction did, by moving the units
//! back; a timed-out step is resolved by reading, never by retrying.
//!
//! Keys of one (rule, sku) share the hash tag `{rule:sku}`:
//! `avail` (list), `loaded`, `tickets` (ticket -> record), `state`
//! (ticket -> H/C/R), `h:<ticket>` (units held), `uq:<user>`, `u:<user>`
//! and `i:<key>` (dedup marks), `r:<ticket>` (kept response), `released`.
//! `ticket:<id>` (no tag) points a ticket at its (rule, sku).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{Pipeline, Value};

use super::redis_conn::{as_int, as_pairs, as_string, RedisConn};
use super::{
    DedupMark, MarkScope, Reservation, Reserved, StockView, Store, StoreError, TicketRecord,
    TicketState,
};
use crate::config::RedisConfig;
use crate::vocab::{ReleaseReason, SkuKey, StoredResponse, TicketId};

/// Field separator inside ledger values: never in ids (validated charset).
const SEP: char = '\u{1f}';
/// Separator of mark keys inside a ticket record.
const MARK_SEP: char = '\u{1e}';
/// Tries of the restock lock, 25 ms apart.
const RESTOCK_LOCK_TRIES: u32 = 40;
/// The restock lock expires by itself after this (a crashed restock).
const RESTOCK_LOCK_MS: u64 = 10_000;
/// Units pushed per RPUSH when restocking, to keep commands small.
const RESTOCK_CHUNK: u64 = 10_000;

/// The Redis store, over one multiplexed, self-reconnecting connection.
pub struct RedisStore {
    // Made on first use (see `redis_conn`).
    conn: RedisConn,
    prefix: String,
    ticket_ttl: Duration,
}

/// The immutable part of a ticket, as stored in `tickets`.
struct Record {
    qty: u32,
    user: String,
    counted_for_user: bool,
    marks: Vec<String>,
}

impl Record {
    fn encode(&self) -> String {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let marks: Vec<&str> = self.marks.iter().map(String::as_str).collect();
        format!(
            "{}{SEP}{}{SEP}{}{SEP}{now_ms}{SEP}{}",
            self.qty,
            self.user,
            u8::from(self.counted_for_user),
            marks.join(&MARK_SEP.to_string())
        )
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
        let _issued_ms = parts.next().ok_or_else(corrupt)?;
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
        })
    }
}

/// Adds `n` single-unit moves from `from` to `to`. Taking pops from the
/// head of `avail`; giving back (`back`) returns units to its head, so the
/// most recently released units are sold first.
fn add_moves(pipe: &mut Pipeline, from: &str, to: &str, n: u64, back: bool) {
    let (from_end, to_end) = if back {
        ("RIGHT", "LEFT")
    } else {
        ("LEFT", "RIGHT")
    };
    for _ in 0..n {
        pipe.cmd("LMOVE")
            .arg(from)
            .arg(to)
            .arg(from_end)
            .arg(to_end);
    }
}

/// Adds the commands that keep a ticket's answer for `ttl`.
fn add_response(pipe: &mut Pipeline, tag: &str, id: &str, r: &StoredResponse, ttl: Duration) {
    let resp_key = format!("{tag}:r:{id}");
    pipe.cmd("HSET")
        .arg(&resp_key)
        .arg("status")
        .arg(r.status)
        .arg("type")
        .arg(r.content_type.as_deref().unwrap_or(""))
        .arg("body")
        .arg(r.body.as_ref())
        .ignore();
    pipe.cmd("PEXPIRE").arg(&resp_key).arg(millis(ttl)).ignore();
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// A store for the configured Redis; connects lazily, so the gateway
    /// starts (and answers `unavailable`) while Redis is down.
    pub fn new(config: &RedisConfig, ticket_ttl: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            conn: RedisConn::new(config)?,
            prefix: config.key_prefix.clone(),
            ticket_ttl,
        })
    }

    fn tag(&self, key: &SkuKey) -> String {
        format!("{}{{{}:{}}}", self.prefix, key.rule, key.sku)
    }

    fn mark_key(&self, key: &SkuKey, mark: &DedupMark) -> String {
        match mark.scope {
            MarkScope::Sku => format!("{}:{}", self.tag(key), mark.id),
            MarkScope::Rule => format!("{}{{{}}}:{}", self.prefix, key.rule, mark.id),
        }
    }

    fn index_key(&self, ticket: TicketId) -> String {
        format!("{}ticket:{ticket}", self.prefix)
    }

    /// Round trips made so far (each pipeline or transaction is one), for
    /// benchmarks.
    pub fn round_trips(&self) -> u64 {
        self.conn.round_trips()
    }

    async fn run(&self, op: &'static str, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        self.conn.run(op, pipe).await
    }

    /// Sets the list length to `available` (under the restock lock).
    async fn adjust_available(
        &self,
        key: &SkuKey,
        tag: &str,
        available: u64,
    ) -> Result<StockView, StoreError> {
        let avail = format!("{tag}:avail");
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(format!("{tag}:loaded")).arg(1).ignore();
        pipe.cmd("LLEN").arg(&avail);
        let vals = self.run("set_available", &pipe).await?;
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
            self.run("set_available", &change).await?;
        }
        self.stock(key)
            .await?
            .ok_or_else(|| StoreError::NotLoaded(key.clone()))
    }

    /// Whether a ticket is still queued or held (not committed, released
    /// or unknown).
    async fn is_live(&self, tag: &str, id: &str) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(format!("{tag}:state")).arg(id);
        let vals = self.run("state", &pipe).await?;
        Ok(matches!(
            vals.first().and_then(as_string).as_deref(),
            Some("Q") | Some("H")
        ))
    }

    /// Moves back what a reservation took and removes what it wrote, in
    /// one transaction: units, the marks it set, its user count, its record.
    async fn undo(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        moved: u64,
        marks_set: &[String],
        user_counted: Option<(&str, u32)>,
    ) -> Result<(), StoreError> {
        let tag = self.tag(key);
        let held = format!("{tag}:h:{ticket}");
        let mut pipe = redis::pipe();
        pipe.atomic();
        add_moves(&mut pipe, &held, &format!("{tag}:avail"), moved, true);
        for m in marks_set {
            pipe.cmd("DEL").arg(m).ignore();
        }
        if let Some((user, qty)) = user_counted {
            pipe.cmd("DECRBY")
                .arg(format!("{tag}:uq:{user}"))
                .arg(qty)
                .ignore();
        }
        pipe.cmd("HDEL")
            .arg(format!("{tag}:tickets"))
            .arg(ticket.to_string())
            .ignore();
        pipe.cmd("HDEL")
            .arg(format!("{tag}:state"))
            .arg(ticket.to_string())
            .ignore();
        pipe.cmd("DEL").arg(self.index_key(ticket)).ignore();
        self.run("reserve-undo", &pipe).await.map(drop)
    }

    /// After a reservation timed out: did it run? Reads the ledger on the
    /// same connection (ordered after it) and undoes it if it did.
    async fn resolve_timed_out_reservation(
        &self,
        r: &Reservation<'_>,
        mark_keys: &[String],
    ) -> Result<(), StoreError> {
        let tag = self.tag(r.key);
        let ticket = r.ticket.to_string();
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(format!("{tag}:tickets")).arg(&ticket);
        pipe.cmd("LLEN").arg(format!("{tag}:h:{ticket}"));
        for m in mark_keys {
            pipe.cmd("GET").arg(m);
        }
        let vals = self.run("reserve-resolve", &pipe).await?;
        let ran = vals.first().is_some_and(|v| !matches!(v, Value::Nil));
        if !ran {
            return Ok(());
        }
        let moved = vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64;
        let ours: Vec<String> = mark_keys
            .iter()
            .zip(vals.iter().skip(2))
            .filter(|(_, v)| as_string(v).as_deref() == Some(ticket.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        let user_counted = r.per_user_limit.map(|_| (r.user, r.qty));
        self.undo(r.key, r.ticket, moved, &ours, user_counted).await
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn reserve(&self, r: &Reservation<'_>) -> Result<Reserved, StoreError> {
        let tag = self.tag(r.key);
        let ticket = r.ticket.to_string();
        let mark_keys: Vec<String> = r.marks.iter().map(|m| self.mark_key(r.key, m)).collect();
        let record = Record {
            qty: r.qty,
            user: r.user.to_string(),
            counted_for_user: r.per_user_limit.is_some(),
            marks: mark_keys.clone(),
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("EXISTS").arg(format!("{tag}:loaded"));
        for (k, m) in mark_keys.iter().zip(r.marks) {
            pipe.cmd("SET")
                .arg(k)
                .arg(&ticket)
                .arg("NX")
                .arg("PX")
                .arg(millis(m.ttl))
                .arg("GET");
        }
        if r.per_user_limit.is_some() {
            pipe.cmd("INCRBY")
                .arg(format!("{tag}:uq:{}", r.user))
                .arg(r.qty);
        }
        let (avail, held) = (format!("{tag}:avail"), format!("{tag}:h:{ticket}"));
        add_moves(&mut pipe, &avail, &held, u64::from(r.qty), false);
        pipe.cmd("HSET")
            .arg(format!("{tag}:tickets"))
            .arg(&ticket)
            .arg(record.encode())
            .ignore();
        pipe.cmd("HSET")
            .arg(format!("{tag}:state"))
            .arg(&ticket)
            .arg("H")
            .ignore();
        pipe.cmd("SET")
            .arg(self.index_key(r.ticket))
            .arg(format!("{}{SEP}{}", r.key.rule, r.key.sku))
            .arg("PX")
            .arg(millis(self.ticket_ttl))
            .ignore();
        let vals = match self.run("reserve", &pipe).await {
            Ok(v) => v,
            Err(e) => {
                // A timeout or a connection lost after the transaction was
                // sent: it may have run. Read back and undo, never retry.
                // (When Redis is down the read fails too; nothing ran then.)
                if let Err(resolve) = self.resolve_timed_out_reservation(r, &mark_keys).await {
                    tracing::debug!(ticket = %r.ticket, error = %resolve,
                        "could not resolve an interrupted reservation; reconcile will");
                }
                return Err(e);
            }
        };
        let mut it = vals.iter();
        let loaded = it.next().and_then(as_int) == Some(1);
        let olds: Vec<Option<String>> = (0..mark_keys.len())
            .map(|_| it.next().and_then(as_string))
            .collect();
        let user_total = if r.per_user_limit.is_some() {
            it.next().and_then(as_int)
        } else {
            None
        };
        let moved = (0..r.qty)
            .filter(|_| it.next().is_some_and(|v| !matches!(v, Value::Nil)))
            .count() as u64;

        let short = match moved {
            0 => Some(Reserved::SoldOut),
            m if m < u64::from(r.qty) => Some(Reserved::NotEnough),
            _ => None,
        };
        let verdict = if !loaded {
            Reserved::NotLoaded
        } else if let Some(first) = olds.iter().flatten().find_map(|t| TicketId::parse(t)) {
            Reserved::Duplicate { first }
        } else if let (Some(limit), Some(total)) = (r.per_user_limit, user_total) {
            if total > i64::from(limit) {
                Reserved::OverUserLimit
            } else {
                short.unwrap_or(Reserved::Won)
            }
        } else {
            short.unwrap_or(Reserved::Won)
        };
        if verdict != Reserved::Won {
            let marks_set: Vec<String> = mark_keys
                .iter()
                .zip(&olds)
                .filter(|(_, old)| old.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            let user_counted = r.per_user_limit.map(|_| (r.user, r.qty));
            self.undo(r.key, r.ticket, moved, &marks_set, user_counted)
                .await?;
        }
        Ok(verdict)
    }

    async fn commit(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: Option<&StoredResponse>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let tag = self.tag(key);
        let id = ticket.to_string();
        // Only a live ticket is committed: a ticket released meanwhile (an
        // operator, or a failed copy of the same queued order) stays
        // released. One transaction reads the old state and writes `C`;
        // in the rare case the old state was not live, a second step puts
        // it back (no unit moves either way, so stock is never affected).
        let state_key = format!("{tag}:state");
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HGET").arg(&state_key).arg(&id);
        pipe.cmd("HSET").arg(&state_key).arg(&id).arg("C").ignore();
        if let Some(response) = response {
            add_response(&mut pipe, &tag, &id, response, ttl);
        }
        let vals = self.run("commit", &pipe).await?;
        let old = vals.first().and_then(as_string);
        match old.as_deref() {
            Some("Q") | Some("H") => Ok(()),
            Some(other) => {
                let mut undo = redis::pipe();
                undo.cmd("HSET")
                    .arg(&state_key)
                    .arg(&id)
                    .arg(other)
                    .ignore();
                self.run("commit", &undo).await.map(drop)
            }
            None => {
                let mut undo = redis::pipe();
                undo.cmd("HDEL").arg(&state_key).arg(&id).ignore();
                self.run("commit", &undo).await.map(drop)
            }
        }
    }

    async fn set_state(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        state: TicketState,
    ) -> Result<(), StoreError> {
        let code = match state {
            TicketState::Queued => "Q",
            TicketState::Held => "H",
            // Commit and release have their own operations.
            TicketState::Committed | TicketState::Released => return Ok(()),
        };
        let tag = self.tag(key);
        if !self.is_live(&tag, &ticket.to_string()).await? {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(format!("{tag}:state"))
            .arg(ticket.to_string())
            .arg(code)
            .ignore();
        self.run("set_state", &pipe).await.map(drop)
    }

    async fn keep_response(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let tag = self.tag(key);
        let mut pipe = redis::pipe();
        pipe.atomic();
        add_response(&mut pipe, &tag, &ticket.to_string(), response, ttl);
        self.run("keep_response", &pipe).await.map(drop)
    }

    async fn release(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
    ) -> Result<u64, StoreError> {
        let tag = self.tag(key);
        let id = ticket.to_string();
        let mut read = redis::pipe();
        read.cmd("HGET").arg(format!("{tag}:tickets")).arg(&id);
        read.cmd("HGET").arg(format!("{tag}:state")).arg(&id);
        let vals = self.run("release", &read).await?;
        let (Some(text), Some(state)) = (
            vals.first().and_then(as_string),
            vals.get(1).and_then(as_string),
        ) else {
            return Ok(0);
        };
        // As in the memory store: a committed order is cancelled only by
        // an admin release.
        if state == "R" || (state == "C" && reason != ReleaseReason::Admin) {
            return Ok(0);
        }
        let record = Record::decode(&format!("{tag}:tickets"), &text)?;

        // Move every unit the ticket holds back; a concurrent second
        // release finds nothing left to move.
        let mut pipe = redis::pipe();
        pipe.atomic();
        let (held, avail) = (format!("{tag}:h:{id}"), format!("{tag}:avail"));
        add_moves(&mut pipe, &held, &avail, u64::from(record.qty), true);
        pipe.cmd("HSET")
            .arg(format!("{tag}:state"))
            .arg(&id)
            .arg("R")
            .ignore();
        for m in &record.marks {
            pipe.cmd("GET").arg(m);
        }
        let vals = self.run("release", &pipe).await?;
        let moved = vals
            .iter()
            .take(record.qty as usize)
            .filter(|v| !matches!(v, Value::Nil))
            .count() as u64;
        if moved == 0 {
            return Ok(0);
        }
        let mut after = redis::pipe();
        after
            .cmd("INCRBY")
            .arg(format!("{tag}:released"))
            .arg(moved)
            .ignore();
        if record.counted_for_user {
            after
                .cmd("DECRBY")
                .arg(format!("{tag}:uq:{}", record.user))
                .arg(moved)
                .ignore();
        }
        // Clear the marks that still point at this ticket, so the user may
        // try again.
        for (m, v) in record
            .marks
            .iter()
            .zip(vals.iter().skip(record.qty as usize))
        {
            if as_string(v).as_deref() == Some(id.as_str()) {
                after.cmd("DEL").arg(m).ignore();
            }
        }
        self.run("release", &after).await?;
        Ok(moved)
    }

    async fn set_available(&self, key: &SkuKey, available: u64) -> Result<StockView, StoreError> {
        let tag = self.tag(key);
        // Restocks of one sku take turns (an ops script may call every
        // node at once): each reads the list length and adjusts it, and two
        // at once would both add the difference.
        let lock = format!("{tag}:restock");
        let token = TicketId::random().to_string();
        let mut taken = false;
        for _ in 0..RESTOCK_LOCK_TRIES {
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(RESTOCK_LOCK_MS);
            let vals = self.run("set_available", &pipe).await?;
            if vals.first().is_some_and(|v| !matches!(v, Value::Nil)) {
                taken = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !taken {
            return Err(StoreError::Backend {
                op: "set_available",
                message: format!("another restock of {key} is running; try again"),
            });
        }
        let result = self.adjust_available(key, &tag, available).await;
        // Released only if still ours (it expires by itself otherwise).
        let mut check = redis::pipe();
        check.cmd("GET").arg(&lock);
        if let Ok(vals) = self.run("set_available", &check).await {
            if vals.first().and_then(as_string).as_deref() == Some(token.as_str()) {
                let mut del = redis::pipe();
                del.cmd("DEL").arg(&lock).ignore();
                let _ = self.run("set_available", &del).await;
            }
        }
        result
    }

    async fn stock(&self, key: &SkuKey) -> Result<Option<StockView>, StoreError> {
        let tag = self.tag(key);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(format!("{tag}:loaded"));
        pipe.cmd("LLEN").arg(format!("{tag}:avail"));
        pipe.cmd("HGETALL").arg(format!("{tag}:state"));
        pipe.cmd("HGETALL").arg(format!("{tag}:tickets"));
        pipe.cmd("GET").arg(format!("{tag}:released"));
        let vals = self.run("stock", &pipe).await?;
        if vals.first().and_then(as_int) != Some(1) {
            return Ok(None);
        }
        let available = vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64;
        let states: HashMap<String, String> = vals
            .get(2)
            .map(as_pairs)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| as_string(&v).map(|v| (k, v)))
            .collect();
        let mut view = StockView {
            available,
            released: vals.get(4).and_then(as_int).unwrap_or(0).max(0) as u64,
            ..StockView::default()
        };
        let tickets_key = format!("{tag}:tickets");
        for (id, rec) in vals.get(3).map(as_pairs).unwrap_or_default() {
            let Some(text) = as_string(&rec) else {
                continue;
            };
            let record = Record::decode(&tickets_key, &text)?;
            match states.get(&id).map(String::as_str) {
                Some("Q") => view.queued += u64::from(record.qty),
                Some("H") => view.in_flight += u64::from(record.qty),
                Some("C") => view.sold += u64::from(record.qty),
                _ => {}
            }
        }
        view.initial = view.available + view.in_flight + view.sold + view.queued;
        Ok(Some(view))
    }

    async fn available(&self, key: &SkuKey) -> Result<Option<u64>, StoreError> {
        let tag = self.tag(key);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(format!("{tag}:loaded"));
        pipe.cmd("LLEN").arg(format!("{tag}:avail"));
        let vals = self.run("available", &pipe).await?;
        if vals.first().and_then(as_int) != Some(1) {
            return Ok(None);
        }
        Ok(Some(vals.get(1).and_then(as_int).unwrap_or(0).max(0) as u64))
    }

    async fn ticket(&self, id: TicketId) -> Result<Option<TicketRecord>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.index_key(id));
        let vals = self.run("ticket", &pipe).await?;
        let Some(where_) = vals.first().and_then(as_string) else {
            return Ok(None);
        };
        let Some((rule, sku)) = where_.split_once(SEP) else {
            return Err(StoreError::Corrupt {
                key: self.index_key(id),
                message: format!("unreadable index {where_:?}"),
            });
        };
        let key = SkuKey::new(rule, sku);
        let tag = self.tag(&key);
        let ticket = id.to_string();
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(format!("{tag}:tickets")).arg(&ticket);
        pipe.cmd("HGET").arg(format!("{tag}:state")).arg(&ticket);
        pipe.cmd("HGETALL").arg(format!("{tag}:r:{ticket}"));
        let vals = self.run("ticket", &pipe).await?;
        let (Some(text), Some(state)) = (
            vals.first().and_then(as_string),
            vals.get(1).and_then(as_string),
        ) else {
            return Ok(None);
        };
        let record = Record::decode(&format!("{tag}:tickets"), &text)?;
        let state = state
            .chars()
            .next()
            .and_then(TicketState::from_code)
            .ok_or_else(|| StoreError::Corrupt {
                key: format!("{tag}:state"),
                message: format!("unknown state {state:?}"),
            })?;
        let fields: HashMap<String, Value> = vals
            .get(2)
            .map(as_pairs)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let response = fields
            .get("status")
            .and_then(as_int)
            .and_then(|s| u16::try_from(s).ok())
            .map(|status| StoredResponse {
                status,
                content_type: fields
                    .get("type")
                    .and_then(as_string)
                    .filter(|t| !t.is_empty()),
                body: match fields.get("body") {
                    Some(Value::BulkString(b)) => Bytes::from(b.clone()),
                    _ => Bytes::new(),
                },
            });
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
}
