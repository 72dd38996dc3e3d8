//! A winner's hold on its units, as a value with one owner.
//!
//! Stage 7 makes a [`Hold`]; from then on exactly one place owns it: the
//! proxy's request context while the order is forwarded, the queue entry
//! while it waits ([`Hold::into_queue`] hands it over, the drainer takes it
//! back with [`Ledger::adopt`]), the drainer while it sends it. Settling
//! consumes the hold ([`Hold::settle`]), so settling twice does not
//! compile; dropping an unsettled hold releases its units as
//! `client_gone` (with a warning), so no path can leak units.
//!
//! How a forward ended is turned into a [`Settlement`] in one place,
//! [`classify`], under the rule's `release_on`; the proxy and the drainer
//! both call it.
//!
//! Every hold has a lease in the store ([`Leases`]): units neither
//! committed nor released within it return to stock by themselves, on any
//! node ([`Ledger::sweep`]). A settlement that cannot reach the store is
//! journaled and retried until it lands ([`Ledger::retry_pending`]).

use std::sync::Arc;
use std::time::Duration;

use super::journal::{Journal, Pending};
use super::soldout::SoldOutFlags;
use crate::backend::{ForwardEnd, TicketHeaders};
use crate::config::{StoreConfig, UpstreamConfig};
use crate::rules::{ReleaseOn, Rule};
use crate::store::{Committed, Store, StoreError, TicketState};
use crate::vocab::{ReleaseReason, SkuKey, StoredResponse, TicketId};

/// What becomes of a hold's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// The backend took the order: the units are sold.
    Commit,
    /// The units go back to stock and the buyer's marks are cleared.
    Release(ReleaseReason),
    /// The backend may have acted: the units stay held for reconcile or
    /// an admin release, never resold blindly.
    Keep(ReleaseReason),
}

impl Settlement {
    /// Whether the units go back to stock (a failure the queue may retry).
    pub fn releases(self) -> bool {
        matches!(self, Settlement::Release(_))
    }
}

/// The one mapping from how a forward ended to what happens to its units.
pub fn classify(end: ForwardEnd, on: &ReleaseOn) -> Settlement {
    let by_rule = |listed: bool, reason| {
        if listed {
            Settlement::Release(reason)
        } else {
            Settlement::Keep(reason)
        }
    };
    match end {
        ForwardEnd::Answered(500..=599) if on.status_5xx => {
            Settlement::Release(ReleaseReason::Status5xx)
        }
        ForwardEnd::Answered(400..=499) if on.status_4xx => {
            Settlement::Release(ReleaseReason::Status4xx)
        }
        ForwardEnd::Answered(_) => Settlement::Commit,
        ForwardEnd::ConnectError => by_rule(on.connect_error, ReleaseReason::ConnectError),
        // A reset after the request left is as uncertain as a timeout:
        // `release_on: [timeout]` is the operator's word on both.
        ForwardEnd::Timeout | ForwardEnd::Reset => by_rule(on.timeout, ReleaseReason::Timeout),
        // The backend was never asked: always safe to return.
        ForwardEnd::ClientGone { sent: false } => Settlement::Release(ReleaseReason::ClientGone),
        // The backend was asked and nobody will read its answer: whether
        // it placed the order is unknown, so the units stay held.
        ForwardEnd::ClientGone { sent: true } => Settlement::Keep(ReleaseReason::ClientGone),
    }
}

/// How long a hold may stay unsettled in each phase of its life, from
/// its rule and upstream (documented in the README):
///
/// - forwarded: `max_wait` + `connect_timeout` x servers +
///   `write_timeout` + `read_timeout` + `store.lease_margin` (at least
///   `store.in_doubt_for` when the rule does not release on a timeout);
/// - queued: `admission.queue.max_queue_time` + margin;
/// - sent by the drainer: per try `connect_timeout` + `write_timeout` +
///   `read_timeout` + the longest backoff + margin, renewed at every try;
/// - in doubt (the backend may have acted): `store.in_doubt_for`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leases {
    /// From winning to the backend's answer.
    pub forward: Duration,
    /// While waiting in the queue.
    pub queued: Duration,
    /// While the drainer sends it, per try.
    pub serve: Duration,
    /// Outcome unknown: time to reconcile.
    pub in_doubt: Duration,
    /// The longest a live node may still be placing one of its orders (a
    /// forward, or one try of the drainer): reconcile leaves younger holds
    /// alone.
    pub on_its_way: Duration,
}

impl Leases {
    /// The leases of a rule's holds.
    pub fn of(rule: &Rule, upstream: &UpstreamConfig, store: &StoreConfig) -> Self {
        let servers = u32::try_from(upstream.servers.len().max(1)).unwrap_or(u32::MAX);
        let one_try = upstream.connect_timeout + upstream.write_timeout + upstream.read_timeout;
        let q = &rule.queue;
        let longest_backoff = q.backoff_after(q.max_attempts.saturating_sub(1));
        let forward = q.max_wait
            + upstream.connect_timeout.saturating_mul(servers)
            + upstream.write_timeout
            + upstream.read_timeout
            + store.lease_margin;
        Self {
            // A rule that keeps units on a timeout keeps them when its
            // node dies mid-order too: the outcome is just as unknown.
            forward: if rule.release_on.timeout {
                forward
            } else {
                forward.max(store.in_doubt_for)
            },
            queued: q.max_queue_time + store.lease_margin,
            serve: one_try + longest_backoff + store.lease_margin,
            in_doubt: store.in_doubt_for,
            on_its_way: forward.max(one_try + longest_backoff + store.lease_margin),
        }
    }
}

/// The settling side of the store: commits, releases, kept answers, the
/// sold-out flags a release clears and the journal of settlements that
/// could not land. Shared by every hold.
pub struct Ledger {
    store: Arc<dyn Store>,
    flags: SoldOutFlags,
    result_ttl: Duration,
    journal: Journal,
}

/// Expired holds returned per sweep at most: a backlog drains over the
/// next sweeps instead of one long burst.
const SWEEP_BATCH: usize = 1000;

impl Ledger {
    /// A ledger over `store`, keeping answers for `result_ttl` and failed
    /// settlements in `journal`.
    pub fn new(store: Arc<dyn Store>, result_ttl: Duration, journal: Journal) -> Self {
        Self {
            store,
            flags: SoldOutFlags::new(),
            result_ttl,
            journal,
        }
    }

    /// The settlements waiting to land.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Returns the units of every hold past its lease (any node's). Gives
    /// the units returned.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let mut returned = 0;
        for (key, ticket) in self.store.expired(SWEEP_BATCH).await? {
            match self
                .release(&key, ticket, ReleaseReason::LeaseExpired)
                .await
            {
                Ok(moved) => {
                    if moved > 0 {
                        tracing::warn!(ticket = %ticket, sku = %key, units = moved,
                            "hold past its lease; units returned to stock");
                    }
                    returned += moved;
                }
                Err(e) => {
                    tracing::debug!(ticket = %ticket, error = %e, "could not return an expired hold");
                    return Err(e);
                }
            }
        }
        Ok(returned)
    }

    /// Tries every journaled settlement again; the ones that land leave
    /// the journal. Gives how many are still waiting.
    pub async fn retry_pending(&self) -> usize {
        let mut landed = Vec::new();
        for (id, p) in self.journal.due() {
            let result = match &p {
                Pending::Commit {
                    key,
                    ticket,
                    answer,
                } => self.commit(key, *ticket, answer.as_ref()).await.map(drop),
                Pending::Release {
                    key,
                    ticket,
                    reason,
                } => self.release(key, *ticket, *reason).await.map(drop),
                Pending::InDoubt { key, ticket, lease } => self
                    .store
                    .set_state(key, *ticket, TicketState::Held, *lease)
                    .await
                    .map(drop),
            };
            match result {
                Ok(()) => landed.push(id),
                // Nothing can make these land: keep the rest moving.
                Err(e @ (StoreError::Corrupt { .. } | StoreError::NotLoaded(_))) => {
                    tracing::error!(settlement = ?p, error = %e, "a journaled settlement cannot land; dropped");
                    landed.push(id);
                }
                // The store is still down: the rest would fail the same way.
                Err(_) => break,
            }
        }
        self.journal.done(&landed).await;
        if !landed.is_empty() {
            tracing::info!(landed = landed.len(), "journaled settlements landed");
        }
        self.journal.len()
    }

    async fn commit(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        answer: Option<&StoredResponse>,
    ) -> Result<(), StoreError> {
        match self
            .store
            .commit(key, ticket, answer, self.result_ttl)
            .await?
        {
            Committed::Held => {}
            Committed::Retaken { short: 0 } => {
                tracing::warn!(ticket = %ticket, sku = %key,
                    "committed after its hold was released; its units were taken again");
            }
            Committed::Retaken { short } => {
                tracing::error!(ticket = %ticket, sku = %key, short,
                    "committed after its hold was released and its units resold: oversold, run sluice reconcile");
            }
            Committed::Unknown => {
                tracing::warn!(ticket = %ticket, sku = %key, "commit of an unknown or expired ticket");
            }
        }
        Ok(())
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The local sold-out flags.
    pub fn flags(&self) -> &SoldOutFlags {
        &self.flags
    }

    /// How long tickets' kept answers live.
    pub fn result_ttl(&self) -> Duration {
        self.result_ttl
    }

    /// Returns a ticket's units and clears the local sold-out flag.
    pub async fn release(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
    ) -> Result<u64, StoreError> {
        let moved = self.store.release(key, ticket, reason).await?;
        if moved > 0 {
            self.flags.clear(&key.rule, &key.sku);
        }
        Ok(moved)
    }

    /// Takes back the hold of a queued entry this node is about to send.
    /// Its entry stays in the queue until settled and may be delivered
    /// again, so an unsettled drop keeps the units (marked sent): a
    /// redelivery sends it then.
    pub fn adopt(self: &Arc<Self>, terms: HoldTerms, key: SkuKey, ticket: TicketId) -> Hold {
        let mut hold = Hold::new(self.clone(), terms, key, ticket);
        hold.mark_sent();
        hold
    }

    async fn keep(&self, key: &SkuKey, ticket: TicketId, answer: &StoredResponse) {
        if let Err(e) = self
            .store
            .keep_response(key, ticket, answer, self.result_ttl)
            .await
        {
            tracing::debug!(ticket = %ticket, error = %e, "could not keep the answer");
        }
    }
}

/// What a hold needs of its rule to settle.
#[derive(Clone, Copy, Debug)]
pub struct HoldTerms {
    /// Units held.
    pub qty: u32,
    /// The rule's `release_on`.
    pub release_on: ReleaseOn,
    /// The rule's leases.
    pub leases: Leases,
}

struct Held {
    ledger: Arc<Ledger>,
    terms: HoldTerms,
    key: SkuKey,
    ticket: TicketId,
    /// Whether its request may have reached the backend.
    sent: bool,
}

/// A winner's units, held by its ticket until settled.
#[must_use = "a hold must be settled; dropping it releases its units as client_gone"]
pub struct Hold {
    /// `None` only once settled or handed over, i.e. in `Drop`.
    inner: Option<Held>,
}

/// A settled hold's ticket, to keep the backend's answer once its body
/// is through (it arrives after the settlement, which happens before the
/// answer is written).
pub struct Receipt {
    ledger: Arc<Ledger>,
    key: SkuKey,
    ticket: TicketId,
}

impl Receipt {
    /// Keeps the answer for duplicates and ticket polls.
    pub async fn keep(&self, answer: &StoredResponse) {
        self.ledger.keep(&self.key, self.ticket, answer).await;
    }
}

impl Hold {
    /// A fresh hold of a ticket that just won.
    pub(crate) fn new(
        ledger: Arc<Ledger>,
        terms: HoldTerms,
        key: SkuKey,
        ticket: TicketId,
    ) -> Self {
        Hold {
            inner: Some(Held {
                ledger,
                terms,
                key,
                ticket,
                sent: false,
            }),
        }
    }

    fn held(&self) -> &Held {
        // Every consuming method takes `self`; only `Drop` sees `None`.
        self.inner
            .as_ref()
            .expect("a live hold always has its ticket")
    }

    /// The ticket (the backend's idempotency key).
    pub fn ticket(&self) -> TicketId {
        self.held().ticket
    }

    /// The stock it holds units of.
    pub fn key(&self) -> &SkuKey {
        &self.held().key
    }

    /// The terms it was made under.
    pub fn terms(&self) -> HoldTerms {
        self.held().terms
    }

    /// The ticket headers its request carries to the backend.
    pub fn ticket_headers(&self) -> TicketHeaders<'_> {
        let h = self.held();
        TicketHeaders {
            ticket: h.ticket,
            qty: h.terms.qty,
            key: &h.key,
        }
    }

    /// Notes that its request is about to reach the backend: from now on
    /// an unsettled drop keeps the units (the backend may have acted).
    pub fn mark_sent(&mut self) {
        if let Some(h) = self.inner.as_mut() {
            h.sent = true;
        }
    }

    /// How an end of its forward settles, under its rule's `release_on`.
    pub fn classify(&self, end: ForwardEnd) -> Settlement {
        classify(end, &self.held().terms.release_on)
    }

    /// Moves its ticket between `Queued` and `Held` in the store, with the
    /// lease of that phase (queued, or sent by the drainer); gives whether
    /// it still holds its units (a sweep may have returned them).
    pub async fn set_state(&self, state: TicketState) -> Result<bool, StoreError> {
        let h = self.held();
        let lease = match state {
            TicketState::Queued => h.terms.leases.queued,
            _ => h.terms.leases.serve,
        };
        h.ledger
            .store
            .set_state(&h.key, h.ticket, state, lease)
            .await
    }

    fn take(mut self) -> Held {
        // Consuming methods run once per value, so `inner` is still there.
        self.inner
            .take()
            .expect("a live hold always has its ticket")
    }

    /// Settles the hold: commits, releases or keeps its units. The receipt
    /// comes back whether or not the store took the settlement, so the
    /// backend's answer can still be kept.
    pub async fn settle(self, how: Settlement) -> (Receipt, Result<(), StoreError>) {
        let h = self.take();
        let result = h.apply(how, None).await;
        (h.receipt(), result)
    }

    /// Settles the hold and keeps `answer` for the buyer's poll: a release
    /// keeps it first (a poll never sees a released ticket without its
    /// reason), a commit keeps it with the commit.
    pub async fn settle_with_answer(
        self,
        how: Settlement,
        answer: &StoredResponse,
    ) -> Result<(), StoreError> {
        self.take().apply(how, Some(answer)).await
    }

    /// Hands the hold to the queue entry that now carries its ticket; the
    /// drainer that sends the entry takes it back with [`Ledger::adopt`].
    pub fn into_queue(self) {
        drop(self.take());
    }

    /// Lets go of a hold the store already settled (its lease ran out and
    /// a sweep returned its units): nothing is left to settle.
    pub fn relinquish(self) {
        drop(self.take());
    }
}

impl Held {
    fn receipt(self) -> Receipt {
        Receipt {
            ledger: self.ledger,
            key: self.key,
            ticket: self.ticket,
        }
    }

    /// Applies a settlement; one that cannot reach the store is journaled
    /// (and the error returned, for the caller's log).
    async fn apply(
        &self,
        how: Settlement,
        answer: Option<&StoredResponse>,
    ) -> Result<(), StoreError> {
        let ledger = &self.ledger;
        let (result, pending) = match how {
            Settlement::Commit => (
                ledger.commit(&self.key, self.ticket, answer).await,
                Pending::Commit {
                    key: self.key.clone(),
                    ticket: self.ticket,
                    answer: answer.cloned(),
                },
            ),
            Settlement::Release(reason) => {
                if let Some(a) = answer {
                    ledger.keep(&self.key, self.ticket, a).await;
                }
                (
                    ledger
                        .release(&self.key, self.ticket, reason)
                        .await
                        .map(drop),
                    Pending::Release {
                        key: self.key.clone(),
                        ticket: self.ticket,
                        reason,
                    },
                )
            }
            Settlement::Keep(reason) => {
                tracing::warn!(ticket = %self.ticket, reason = reason.as_str(),
                    "outcome unknown (the backend may have taken the order); units stay held for store.in_doubt_for");
                if let Some(a) = answer {
                    ledger.keep(&self.key, self.ticket, a).await;
                }
                let lease = self.terms.leases.in_doubt;
                (
                    ledger
                        .store
                        .set_state(&self.key, self.ticket, TicketState::Held, lease)
                        .await
                        .map(drop),
                    Pending::InDoubt {
                        key: self.key.clone(),
                        ticket: self.ticket,
                        lease,
                    },
                )
            }
        };
        if result.is_err() {
            ledger.journal.add(pending).await;
        }
        result
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let Some(h) = self.inner.take() else {
            return;
        };
        // Sent, the backend may have the order: never resell blindly.
        let how = if h.sent {
            tracing::warn!(ticket = %h.ticket, "hold dropped unsettled after its request was sent; units stay held");
            Settlement::Keep(ReleaseReason::ClientGone)
        } else {
            tracing::warn!(ticket = %h.ticket, "hold dropped unsettled; releasing its units as client_gone");
            Settlement::Release(ReleaseReason::ClientGone)
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = h.apply(how, None).await {
                        tracing::warn!(ticket = %h.ticket, error = %e, "could not settle a dropped hold");
                    }
                });
            }
            // Its lease still returns the units.
            Err(_) => {
                tracing::error!(ticket = %h.ticket, "hold dropped outside a runtime; its lease will return its units");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{Reservation, Reserved};

    fn on(list: &[&str]) -> ReleaseOn {
        ReleaseOn {
            connect_error: list.contains(&"connect_error"),
            timeout: list.contains(&"timeout"),
            status_5xx: list.contains(&"5xx"),
            status_4xx: list.contains(&"4xx"),
        }
    }

    #[test]
    fn every_end_of_a_forward_settles_one_way() {
        use ForwardEnd::*;
        use ReleaseReason as R;
        use Settlement::*;
        let all = on(&["connect_error", "timeout", "5xx", "4xx"]);
        let none = on(&[]);
        let only_5xx = on(&["5xx"]);
        let only_timeout = on(&["timeout"]);
        let only_connect = on(&["connect_error"]);
        let table: Vec<(ForwardEnd, &ReleaseOn, Settlement)> = vec![
            (Answered(200), &all, Commit),
            (Answered(201), &none, Commit),
            (Answered(302), &all, Commit),
            (Answered(404), &all, Release(R::Status4xx)),
            (Answered(404), &none, Commit),
            (Answered(409), &only_5xx, Commit),
            (Answered(500), &all, Release(R::Status5xx)),
            (Answered(503), &only_5xx, Release(R::Status5xx)),
            (Answered(503), &none, Commit),
            (ConnectError, &all, Release(R::ConnectError)),
            (ConnectError, &none, Keep(R::ConnectError)),
            (Timeout, &all, Release(R::Timeout)),
            (Timeout, &none, Keep(R::Timeout)),
            (Reset, &only_timeout, Release(R::Timeout)),
            (Reset, &only_connect, Keep(R::Timeout)),
            (ClientGone { sent: false }, &none, Release(R::ClientGone)),
            (ClientGone { sent: false }, &all, Release(R::ClientGone)),
            (ClientGone { sent: true }, &all, Keep(R::ClientGone)),
            (ClientGone { sent: true }, &none, Keep(R::ClientGone)),
        ];
        for (end, release_on, want) in table {
            assert_eq!(
                classify(end, release_on),
                want,
                "{end:?} under {release_on:?}"
            );
        }
    }

    async fn won(ledger: &Arc<Ledger>, key: &SkuKey) -> Hold {
        let ticket = TicketId::random();
        let r = Reservation {
            key,
            ticket,
            user: "u1",
            qty: 1,
            marks: &[],
            per_user_limit: None,
            lease: Duration::from_secs(60),
        };
        assert_eq!(
            ledger.store.reserve(&r).await.expect("reserve"),
            Reserved::Won
        );
        let terms = HoldTerms {
            qty: 1,
            release_on: on(&[]),
            leases: Leases {
                forward: Duration::from_secs(60),
                queued: Duration::from_secs(60),
                serve: Duration::from_secs(60),
                in_doubt: Duration::from_secs(600),
                on_its_way: Duration::from_secs(60),
            },
        };
        Hold::new(ledger.clone(), terms, key.clone(), ticket)
    }

    #[tokio::test]
    async fn a_dropped_hold_gives_its_units_back() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ledger = Arc::new(Ledger::new(
            store.clone(),
            Duration::from_secs(60),
            Journal::in_memory(),
        ));
        let key = SkuKey::new("r", "s");
        store.set_available(&key, 1).await.expect("load");
        let hold = won(&ledger, &key).await;
        assert_eq!(store.available(&key).await.expect("read"), Some(0));
        drop(hold);
        for _ in 0..100 {
            if store.available(&key).await.expect("read") == Some(1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the dropped hold's unit never came back");
    }

    #[tokio::test]
    async fn a_dropped_hold_that_was_sent_keeps_its_units() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ledger = Arc::new(Ledger::new(
            store.clone(),
            Duration::from_secs(60),
            Journal::in_memory(),
        ));
        let key = SkuKey::new("r", "s");
        store.set_available(&key, 1).await.expect("load");
        let mut hold = won(&ledger, &key).await;
        hold.mark_sent();
        drop(hold);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let view = store.stock(&key).await.expect("read").expect("loaded");
        assert_eq!((view.available, view.in_flight), (0, 1));
    }

    #[tokio::test]
    async fn settling_consumes_the_hold_and_moves_the_units_once() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let ledger = Arc::new(Ledger::new(
            store.clone(),
            Duration::from_secs(60),
            Journal::in_memory(),
        ));
        let key = SkuKey::new("r", "s");
        store.set_available(&key, 2).await.expect("load");
        let sold = won(&ledger, &key).await;
        let returned = won(&ledger, &key).await;
        sold.settle(Settlement::Commit).await.1.expect("commit");
        returned
            .settle(Settlement::Release(ReleaseReason::Timeout))
            .await
            .1
            .expect("release");
        let view = store.stock(&key).await.expect("read").expect("loaded");
        assert_eq!((view.available, view.sold, view.in_flight), (1, 1, 0));
    }
}
