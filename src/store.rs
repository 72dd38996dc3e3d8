//! Stock, dedup marks and the ticket ledger, behind one trait with two
//! implementations of the same semantics: `memory` (embedded, one node)
//! and `redis` (shared by many nodes, Lua-free).
//!
//! Conservation is by construction: at every instant a unit is either
//! available or held by exactly one ticket. A reservation never overdraws
//! (it refuses instead); releasing a ticket moves its units back, and a
//! second release finds nothing to move. Called by the admission pipeline
//! and the admin API.

pub mod instrumented;
pub mod memory;
pub mod redis;
pub mod redis_conn;
pub mod redis_lean;
pub mod resp;

use std::time::Duration;

use async_trait::async_trait;

use crate::vocab::{ReleaseReason, SkuKey, StoredResponse, TicketId};

/// Where a dedup mark lives: per (rule, sku), or per rule across skus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkScope {
    /// One mark per (rule, sku, id).
    Sku,
    /// One mark per (rule, id), whatever the sku.
    Rule,
}

/// A dedup mark a winner leaves: the same `id` in the same scope again is
/// a duplicate of this ticket until `ttl` passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupMark {
    /// Scope of the mark.
    pub scope: MarkScope,
    /// Identity within the scope, e.g. `u:alice` or `i:<Idempotency-Key>`.
    pub id: String,
    /// How long the mark lives.
    pub ttl: Duration,
}

/// An attempt to take units.
#[derive(Clone, Debug)]
pub struct Reservation<'a> {
    /// Which stock.
    pub key: &'a SkuKey,
    /// The ticket that will hold the units.
    pub ticket: TicketId,
    /// The buyer.
    pub user: &'a str,
    /// Units wanted (at least 1).
    pub qty: u32,
    /// Marks to leave if this wins (checked atomically with the stock).
    pub marks: &'a [DedupMark],
    /// Units one user may hold in this (rule, sku).
    pub per_user_limit: Option<u32>,
    /// How long a win may stay unsettled before its units return to stock
    /// by themselves (see [`Store::expired`]).
    pub lease: Duration,
}

/// The answer to a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// The ticket holds `qty` units.
    Won,
    /// No unit is left; nothing is held.
    SoldOut,
    /// Some units are left, fewer than `qty`; nothing is held.
    NotEnough,
    /// The sku was never loaded (or its stock was lost): never unlimited.
    NotLoaded,
    /// A mark says this is a repeat of `first`; nothing is held.
    Duplicate {
        /// The first attempt's ticket.
        first: TicketId,
    },
    /// The user would hold more than `per_user_limit`; nothing is held.
    OverUserLimit,
}

/// Where a ticket is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// Holds units; waiting in the queue for a slot.
    Queued,
    /// Holds units; the backend has not answered yet.
    Held,
    /// The backend accepted: the units are sold.
    Committed,
    /// The units went back to stock.
    Released,
}

impl TicketState {
    /// One-letter code used in the ledger.
    pub fn code(self) -> char {
        match self {
            TicketState::Queued => 'Q',
            TicketState::Held => 'H',
            TicketState::Committed => 'C',
            TicketState::Released => 'R',
        }
    }

    /// Parses a ledger code.
    pub fn from_code(c: char) -> Option<Self> {
        match c {
            'Q' => Some(TicketState::Queued),
            'H' => Some(TicketState::Held),
            'C' => Some(TicketState::Committed),
            'R' => Some(TicketState::Released),
            _ => None,
        }
    }
}

/// How a commit went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// The units the ticket held are sold.
    Held,
    /// The ticket had been released (by an operator, or because its lease
    /// ran out) before the backend's yes arrived: its units were taken
    /// from stock again; `short` of them could not be (sold to someone
    /// else meanwhile: an oversell to reconcile).
    Retaken {
        /// Units that could not be taken again.
        short: u32,
    },
    /// Unknown or expired ticket: nothing to commit.
    Unknown,
}

/// One ticket as the ledger has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketRecord {
    /// The ticket.
    pub id: TicketId,
    /// Its stock.
    pub key: SkuKey,
    /// Its buyer.
    pub user: String,
    /// Units it took.
    pub qty: u32,
    /// Where it is.
    pub state: TicketState,
    /// The backend's answer, once committed (while kept).
    pub response: Option<StoredResponse>,
}

/// The admin view of one (rule, sku): all integers, from the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StockView {
    /// Units anyone can still win.
    pub available: u64,
    /// Units ever loaded (available + held + sold).
    pub initial: u64,
    /// Units in committed tickets.
    pub sold: u64,
    /// Units in tickets waiting for the backend.
    pub in_flight: u64,
    /// Units in queued tickets.
    pub queued: u64,
    /// Units returned to stock by releases, cumulative.
    pub released: u64,
}

impl StockView {
    /// Units held or sold: what `initial` must equal.
    pub fn accounted(&self) -> u64 {
        self.available + self.in_flight + self.queued + self.sold
    }

    /// Whether nothing is held any more.
    pub fn settled(&self) -> bool {
        self.in_flight == 0 && self.queued == 0
    }
}

/// One ticket of a sku as `sluice reconcile` sees it: its record and
/// where its units are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketAudit {
    /// The ticket.
    pub id: TicketId,
    /// Its buyer.
    pub user: String,
    /// Units it took.
    pub qty: u32,
    /// Its state (queued and held tell apart live tickets).
    pub state: TicketState,
    /// Units it holds now.
    pub held: u64,
    /// Units sold to it.
    pub sold: u64,
    /// When it won, ms since the epoch.
    pub issued_ms: u64,
    /// When it was last queued or sent to the backend, ms since the epoch.
    pub since_ms: u64,
    /// When its lease runs out, ms since the epoch (live tickets).
    pub lease_ms: Option<u64>,
}

/// A sku's ledger as `sluice reconcile` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkuAudit {
    /// Units in stock.
    pub available: u64,
    /// Every ticket still on record.
    pub tickets: Vec<TicketAudit>,
}

/// The store could not answer; admission fails closed on this.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer within the configured timeout.
    #[error("store timeout after {timeout:?} on {op}")]
    Timeout {
        /// Operation.
        op: &'static str,
        /// Configured timeout.
        timeout: Duration,
    },
    /// The store is unreachable or answered with an error.
    #[error("store error on {op}: {message}")]
    Backend {
        /// Operation.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The ledger holds something this version cannot read.
    #[error("store ledger corrupt at {key}: {message}")]
    Corrupt {
        /// Key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The operation names a sku that was never loaded.
    #[error("{0} is not loaded")]
    NotLoaded(SkuKey),
    /// The store failed repeatedly; calls fail at once until it is tried
    /// again (the circuit breaker).
    #[error("store unavailable on {op}: {failures} failures in a row, next try in {retry_in:?}")]
    CircuitOpen {
        /// Operation.
        op: &'static str,
        /// Consecutive failures that opened the circuit.
        failures: u32,
        /// Time until the next try.
        retry_in: Duration,
    },
}

/// Stock, marks and tickets. Both implementations pass the same suite
/// (`tests/store.rs`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Takes `qty` units for a new ticket, atomically with the dedup marks
    /// and the per-user limit; refuses without holding anything otherwise.
    async fn reserve(&self, r: &Reservation<'_>) -> Result<Reserved, StoreError>;

    /// Marks a ticket sold, keeping the backend's answer (if given) for
    /// `ttl`. The proxy commits when the headers arrive and keeps the full
    /// answer once its body is through (`keep_response`), so a repeat in
    /// between is told "in progress", never replayed half an answer. A
    /// commit always wins: the backend placed the order, so a ticket
    /// released meanwhile takes its units from stock again.
    async fn commit(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: Option<&StoredResponse>,
        ttl: Duration,
    ) -> Result<Committed, StoreError>;

    /// Moves a live ticket between `Queued` and `Held` (queue in, drainer
    /// out) and renews its lease to `lease` from now; a committed or
    /// released ticket is left as it is. Gives whether it is still live
    /// (holds its units): a drainer sends nothing that is not.
    async fn set_state(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        state: TicketState,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Live tickets whose lease has run out, oldest first, at most
    /// `limit`, across every loaded sku (whichever node made them). The
    /// caller releases them.
    async fn expired(&self, limit: usize) -> Result<Vec<(SkuKey, TicketId)>, StoreError>;

    /// Replaces the kept answer of a committed (or, for a queued request
    /// that failed, released) ticket: the body arrives
    /// after the commit, which happens before the answer is written.
    async fn keep_response(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Returns a ticket's units to stock and clears its marks; returns the
    /// units moved (0 when already released: idempotent).
    async fn release(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
    ) -> Result<u64, StoreError>;

    /// Sets the available units (held tickets untouched); loads the sku
    /// if it was not loaded.
    async fn set_available(&self, key: &SkuKey, available: u64) -> Result<StockView, StoreError>;

    /// The stock view, `None` when the sku was never loaded.
    async fn stock(&self, key: &SkuKey) -> Result<Option<StockView>, StoreError>;

    /// Available units only (cheap), `None` when not loaded.
    async fn available(&self, key: &SkuKey) -> Result<Option<u64>, StoreError>;

    /// A ticket by id, from any node.
    async fn ticket(&self, id: TicketId) -> Result<Option<TicketRecord>, StoreError>;

    /// Whether the store answers at all (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Every loaded sku.
    async fn skus(&self) -> Result<Vec<SkuKey>, StoreError>;

    /// A sku's whole ledger (`None` when never loaded), for reconcile.
    async fn audit(&self, key: &SkuKey) -> Result<Option<SkuAudit>, StoreError>;

    /// Drops expired local state (marks, kept answers); called by
    /// housekeeping. Stores whose entries expire by themselves (Redis
    /// TTLs) have nothing to do.
    fn prune(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_codes_round_trip() {
        for s in [
            TicketState::Held,
            TicketState::Committed,
            TicketState::Released,
        ] {
            assert_eq!(TicketState::from_code(s.code()), Some(s));
        }
    }
}
