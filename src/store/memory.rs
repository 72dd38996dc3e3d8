//! The embedded store: one node, everything under one mutex (each
//! operation is a few map lookups, so contention stays short), the same
//! semantics as the Redis store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Committed, DedupMark, MarkScope, Reservation, Reserved, SkuAudit, StockView, Store, StoreError,
    TicketAudit, TicketRecord, TicketState,
};
use crate::vocab::{now_ms, ReleaseReason, SkuKey, StoredResponse, TicketId};

struct Ticket {
    user: String,
    qty: u32,
    state: TicketState,
    marks: Vec<String>,
    response: Option<(StoredResponse, Instant)>,
    /// Until when a live ticket may stay unsettled.
    lease: Instant,
    /// When it won (ms since the epoch).
    issued_ms: u64,
    /// When it last went (or was about to go) to the backend.
    sent_ms: u64,
}

#[derive(Default)]
struct Sku {
    available: u64,
    initial: u64,
    released: u64,
    tickets: HashMap<TicketId, Ticket>,
    held_by_user: HashMap<String, u64>,
}

#[derive(Default)]
struct Inner {
    skus: HashMap<SkuKey, Sku>,
    marks: HashMap<String, (TicketId, Instant)>,
    index: HashMap<TicketId, SkuKey>,
}

/// The in-process store.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

fn mark_key(key: &SkuKey, mark: &DedupMark) -> String {
    match mark.scope {
        MarkScope::Sku => format!("{}:{}|{}", key.rule, key.sku, mark.id),
        MarkScope::Rule => format!("{}|{}", key.rule, mark.id),
    }
}

fn poisoned(op: &'static str) -> StoreError {
    StoreError::Backend {
        op,
        message: "memory store lock poisoned by a panic".into(),
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `f` to a ticket if it exists; unknown tickets are a no-op.
    fn with_ticket(
        &self,
        op: &'static str,
        key: &SkuKey,
        ticket: TicketId,
        f: impl FnOnce(&mut Ticket),
    ) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().map_err(|_| poisoned(op))?;
        if let Some(t) = inner
            .skus
            .get_mut(key)
            .and_then(|s| s.tickets.get_mut(&ticket))
        {
            f(t);
        }
        Ok(())
    }

    fn view(sku: &Sku) -> StockView {
        let mut v = StockView {
            available: sku.available,
            initial: sku.initial,
            released: sku.released,
            ..StockView::default()
        };
        for t in sku.tickets.values() {
            match t.state {
                TicketState::Queued => v.queued += u64::from(t.qty),
                TicketState::Held => v.in_flight += u64::from(t.qty),
                TicketState::Committed => v.sold += u64::from(t.qty),
                TicketState::Released => {}
            }
        }
        v
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn reserve(&self, r: &Reservation<'_>) -> Result<Reserved, StoreError> {
        let now = Instant::now();
        let mut guard = self.inner.lock().map_err(|_| poisoned("reserve"))?;
        let inner = &mut *guard;
        let Some(sku) = inner.skus.get_mut(r.key) else {
            return Ok(Reserved::NotLoaded);
        };
        let keys: Vec<String> = r.marks.iter().map(|m| mark_key(r.key, m)).collect();
        for k in &keys {
            if let Some((first, expires)) = inner.marks.get(k) {
                if *expires > now {
                    return Ok(Reserved::Duplicate { first: *first });
                }
            }
        }
        let qty = u64::from(r.qty);
        let held = sku.held_by_user.get(r.user).copied().unwrap_or(0);
        if let Some(limit) = r.per_user_limit {
            if held + qty > u64::from(limit) {
                return Ok(Reserved::OverUserLimit);
            }
        }
        if sku.available == 0 {
            return Ok(Reserved::SoldOut);
        }
        if sku.available < qty {
            return Ok(Reserved::NotEnough);
        }
        sku.available -= qty;
        *sku.held_by_user.entry(r.user.to_string()).or_default() += qty;
        sku.tickets.insert(
            r.ticket,
            Ticket {
                user: r.user.to_string(),
                qty: r.qty,
                state: TicketState::Held,
                marks: keys.clone(),
                response: None,
                lease: now + r.lease,
                issued_ms: now_ms(),
                sent_ms: now_ms(),
            },
        );
        for (k, m) in keys.into_iter().zip(r.marks) {
            inner.marks.insert(k, (r.ticket, now + m.ttl));
        }
        inner.index.insert(r.ticket, r.key.clone());
        Ok(Reserved::Won)
    }

    async fn commit(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: Option<&StoredResponse>,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let mut guard = self.inner.lock().map_err(|_| poisoned("commit"))?;
        let Some(sku) = guard.skus.get_mut(key) else {
            return Ok(Committed::Unknown);
        };
        let Some(t) = sku.tickets.get_mut(&ticket) else {
            return Ok(Committed::Unknown);
        };
        // Kept whatever the state, as in Redis: the state decides whether
        // a poll shows it.
        if let Some(r) = response {
            t.response = Some((r.clone(), Instant::now() + ttl));
        }
        let outcome = match t.state {
            TicketState::Held | TicketState::Queued => Committed::Held,
            TicketState::Committed => return Ok(Committed::Held),
            TicketState::Released => {
                // The backend placed it after all: take its units again.
                let qty = u64::from(t.qty);
                let taken = sku.available.min(qty);
                sku.available -= taken;
                *sku.held_by_user.entry(t.user.clone()).or_default() += taken;
                Committed::Retaken {
                    short: u32::try_from(qty - taken).unwrap_or(u32::MAX),
                }
            }
        };
        t.state = TicketState::Committed;
        Ok(outcome)
    }

    async fn set_state(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        state: TicketState,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut live = false;
        self.with_ticket("set_state", key, ticket, |t| {
            live = matches!(t.state, TicketState::Queued | TicketState::Held);
            if live && matches!(state, TicketState::Queued | TicketState::Held) {
                t.state = state;
                t.lease = Instant::now() + lease;
                t.sent_ms = now_ms();
            }
        })?;
        Ok(live)
    }

    async fn expired(&self, limit: usize) -> Result<Vec<(SkuKey, TicketId)>, StoreError> {
        let now = Instant::now();
        let inner = self.inner.lock().map_err(|_| poisoned("expired"))?;
        let mut found: Vec<(Instant, SkuKey, TicketId)> = inner
            .skus
            .iter()
            .flat_map(|(key, sku)| {
                sku.tickets.iter().filter_map(move |(id, t)| {
                    let live = matches!(t.state, TicketState::Queued | TicketState::Held);
                    (live && t.lease <= now).then(|| (t.lease, key.clone(), *id))
                })
            })
            .collect();
        found.sort();
        Ok(found
            .into_iter()
            .take(limit)
            .map(|(_, key, id)| (key, id))
            .collect())
    }

    async fn keep_response(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // Any state, as in Redis: the state decides whether it is shown
        // (a held ticket's poll says "in progress" whatever is kept).
        self.with_ticket("keep_response", key, ticket, |t| {
            t.response = Some((response.clone(), Instant::now() + ttl));
        })
    }

    async fn release(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
    ) -> Result<u64, StoreError> {
        let mut guard = self.inner.lock().map_err(|_| poisoned("release"))?;
        let inner = &mut *guard;
        let Some(sku) = inner.skus.get_mut(key) else {
            return Ok(0);
        };
        let Some(t) = sku.tickets.get_mut(&ticket) else {
            return Ok(0);
        };
        // Only an operator (or the backend, through the admin API) may
        // cancel a committed order; a late failure of another copy of the
        // same order must not put sold units back on sale.
        if t.state == TicketState::Released
            || (t.state == TicketState::Committed && reason != ReleaseReason::Admin)
            // A lease renewed since the sweep saw it run out.
            || (reason == ReleaseReason::LeaseExpired && t.lease > Instant::now())
        {
            return Ok(0);
        }
        t.state = TicketState::Released;
        let qty = u64::from(t.qty);
        sku.available += qty;
        sku.released += qty;
        if let Some(h) = sku.held_by_user.get_mut(&t.user) {
            *h = h.saturating_sub(qty);
            if *h == 0 {
                sku.held_by_user.remove(&t.user);
            }
        }
        for k in &t.marks {
            if inner
                .marks
                .get(k)
                .is_some_and(|(owner, _)| *owner == ticket)
            {
                inner.marks.remove(k);
            }
        }
        Ok(qty)
    }

    async fn set_available(&self, key: &SkuKey, available: u64) -> Result<StockView, StoreError> {
        let mut inner = self.inner.lock().map_err(|_| poisoned("set_available"))?;
        let sku = inner.skus.entry(key.clone()).or_default();
        let held = sku.initial - sku.available;
        sku.available = available;
        sku.initial = available + held;
        Ok(Self::view(sku))
    }

    async fn stock(&self, key: &SkuKey) -> Result<Option<StockView>, StoreError> {
        let inner = self.inner.lock().map_err(|_| poisoned("stock"))?;
        Ok(inner.skus.get(key).map(Self::view))
    }

    async fn available(&self, key: &SkuKey) -> Result<Option<u64>, StoreError> {
        let inner = self.inner.lock().map_err(|_| poisoned("available"))?;
        Ok(inner.skus.get(key).map(|s| s.available))
    }

    async fn ticket(&self, id: TicketId) -> Result<Option<TicketRecord>, StoreError> {
        let inner = self.inner.lock().map_err(|_| poisoned("ticket"))?;
        let Some(key) = inner.index.get(&id) else {
            return Ok(None);
        };
        let now = Instant::now();
        Ok(inner
            .skus
            .get(key)
            .and_then(|s| s.tickets.get(&id))
            .map(|t| TicketRecord {
                id,
                key: key.clone(),
                user: t.user.clone(),
                qty: t.qty,
                state: t.state,
                response: t
                    .response
                    .as_ref()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(r, _)| r.clone()),
            }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn skus(&self) -> Result<Vec<SkuKey>, StoreError> {
        let inner = self.inner.lock().map_err(|_| poisoned("skus"))?;
        let mut keys: Vec<SkuKey> = inner.skus.keys().cloned().collect();
        keys.sort();
        Ok(keys)
    }

    async fn audit(&self, key: &SkuKey) -> Result<Option<SkuAudit>, StoreError> {
        let inner = self.inner.lock().map_err(|_| poisoned("audit"))?;
        let Some(sku) = inner.skus.get(key) else {
            return Ok(None);
        };
        let (now, now_wall) = (Instant::now(), now_ms());
        let mut tickets: Vec<TicketAudit> = sku
            .tickets
            .iter()
            .map(|(id, t)| {
                let qty = u64::from(t.qty);
                let live = matches!(t.state, TicketState::Queued | TicketState::Held);
                TicketAudit {
                    id: *id,
                    user: t.user.clone(),
                    qty: t.qty,
                    state: t.state,
                    held: if live { qty } else { 0 },
                    sold: if t.state == TicketState::Committed {
                        qty
                    } else {
                        0
                    },
                    issued_ms: t.issued_ms,
                    since_ms: t.sent_ms,
                    lease_ms: live.then(|| {
                        // Instants have no wall clock; place it from now.
                        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                        now_wall
                            .saturating_add(ms(t.lease.saturating_duration_since(now)))
                            .saturating_sub(ms(now.saturating_duration_since(t.lease)))
                    }),
                }
            })
            .collect();
        tickets.sort_by_key(|t| (t.issued_ms, t.id));
        Ok(Some(SkuAudit {
            available: sku.available,
            tickets,
        }))
    }

    /// Drops expired marks and kept responses (housekeeping calls it).
    fn prune(&self) {
        let now = Instant::now();
        if let Ok(mut inner) = self.inner.lock() {
            inner.marks.retain(|_, (_, expires)| *expires > now);
            for sku in inner.skus.values_mut() {
                for t in sku.tickets.values_mut() {
                    if t.response.as_ref().is_some_and(|(_, exp)| *exp <= now) {
                        t.response = None;
                    }
                }
            }
        }
    }
}
