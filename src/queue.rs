//! The overflow queue: winners that found no free upstream slot within
//! `admission.queue.max_wait` are kept here (method, path, headers, body)
//! and sent to the backend by the gateway itself (`drain`) as slots free,
//! oldest first; the entry carries the winner's hold meanwhile. The
//! store decides where it lives: `memory` in-process, `redis` in a Redis
//! Stream with a consumer group, so any node drains it and entries of a
//! node killed mid-drain are claimed by another after an idle time.
//!
//! Delivery is at least once: the backend may see a queued order twice
//! after a crash, and must treat `X-Sluice-Ticket` as its idempotency key.

pub mod memory;
pub mod rates;
pub mod redis;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

use crate::vocab::{SkuKey, TicketId};

/// A winner's request, kept until the backend takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedRequest {
    /// The ticket holding its units.
    pub ticket: TicketId,
    /// Its stock.
    pub key: SkuKey,
    /// Units held.
    pub qty: u32,
    /// HTTP method.
    pub method: String,
    /// Path and query, as the client sent them.
    pub path_and_query: String,
    /// Headers as the backend will receive them (`backend::queued`).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// When it was queued (ms since the epoch), for the wait metric.
    pub queued_at_ms: u64,
}

/// The wire form of a queued request (JSON, body in base64).
#[derive(Serialize, Deserialize)]
struct Wire {
    ticket: String,
    rule: String,
    sku: String,
    qty: u32,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    at: u64,
}

impl QueuedRequest {
    /// Serialises for storage.
    pub fn encode(&self) -> String {
        let wire = Wire {
            ticket: self.ticket.to_string(),
            rule: self.key.rule.to_string(),
            sku: self.key.sku.to_string(),
            qty: self.qty,
            method: self.method.clone(),
            path: self.path_and_query.clone(),
            headers: self.headers.clone(),
            body: STANDARD.encode(&self.body),
            at: self.queued_at_ms,
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses what `encode` wrote.
    pub fn decode(text: &str) -> Result<Self, StoreError> {
        let corrupt = |message: String| StoreError::Corrupt {
            key: "queue entry".into(),
            message,
        };
        let w: Wire = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            ticket: TicketId::parse(&w.ticket)
                .ok_or_else(|| corrupt(format!("bad ticket {:?}", w.ticket)))?,
            key: SkuKey::new(&w.rule, &w.sku),
            qty: w.qty,
            method: w.method,
            path_and_query: w.path,
            headers: w.headers,
            body: Bytes::from(
                STANDARD
                    .decode(&w.body)
                    .map_err(|e| corrupt(e.to_string()))?,
            ),
            queued_at_ms: w.at,
        })
    }
}

/// An entry handed to one consumer; acknowledge it when done.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Queue-specific id (a stream entry id for Redis).
    pub id: String,
    /// The request.
    pub request: QueuedRequest,
}

/// The queue of one or more upstreams (named by upstream).
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Appends a request; gives its position (1 = next), or `None` when the
    /// upstream's queue already holds `capacity` entries.
    async fn push(
        &self,
        upstream: &str,
        request: &QueuedRequest,
        capacity: u32,
    ) -> Result<Option<u64>, StoreError>;

    /// Takes the oldest waiting entry for `consumer`, or an entry another
    /// consumer took and left idle for `claim_idle_ms` (it died); `None`
    /// when there is nothing to do.
    async fn pop(
        &self,
        upstream: &str,
        consumer: &str,
        claim_idle_ms: u64,
    ) -> Result<Option<Delivery>, StoreError>;

    /// Says `consumer` is still working on an entry (resets its idle
    /// time), so no other node takes it over while it is being served.
    async fn touch(
        &self,
        upstream: &str,
        consumer: &str,
        delivery: &Delivery,
    ) -> Result<(), StoreError>;

    /// Marks an entry done (served, or given up and released).
    async fn ack(&self, upstream: &str, delivery: &Delivery) -> Result<(), StoreError>;

    /// How many entries are ahead of a ticket plus one (1 = next), `None`
    /// when the ticket is not waiting.
    async fn position(&self, upstream: &str, ticket: TicketId) -> Result<Option<u64>, StoreError>;

    /// Entries waiting or being served.
    async fn depth(&self, upstream: &str) -> Result<u64, StoreError>;

    /// Whether entries outlive this process (other nodes, or the next
    /// process, take them): a shutting-down node then stops taking
    /// entries instead of draining the queue before it exits.
    fn shared(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_requests_round_trip() {
        let r = QueuedRequest {
            ticket: TicketId::random(),
            key: SkuKey::new("phone", "p1"),
            qty: 2,
            method: "POST".into(),
            path_and_query: "/api/seckill/p1/order?x=1".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"{\"qty\":2}\x00\xff"),
            queued_at_ms: 42,
        };
        assert_eq!(QueuedRequest::decode(&r.encode()).expect("decode"), r);
        assert!(QueuedRequest::decode("{").is_err());
    }
}
