//! The in-process queue of the memory store: one FIFO per upstream. A
//! popped entry is gone (one node: nobody else could claim it).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Delivery, Queue, QueuedRequest};
use crate::store::StoreError;
use crate::vocab::TicketId;

#[derive(Default)]
struct Line {
    waiting: VecDeque<(u64, QueuedRequest)>,
    /// Sequence number of the next entry, and of the last one popped.
    next_seq: u64,
    served_seq: u64,
    in_service: u64,
}

/// The in-process queue.
#[derive(Default)]
pub struct MemoryQueue {
    lines: Mutex<HashMap<String, Line>>,
}

fn poisoned() -> StoreError {
    StoreError::Backend {
        op: "queue",
        message: "memory queue lock poisoned by a panic".into(),
    }
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    fn shared(&self) -> bool {
        false
    }

    async fn push(
        &self,
        upstream: &str,
        request: &QueuedRequest,
        capacity: u32,
    ) -> Result<Option<u64>, StoreError> {
        let mut lines = self.lines.lock().map_err(|_| poisoned())?;
        let line = lines.entry(upstream.to_string()).or_default();
        if line.waiting.len() as u64 >= u64::from(capacity) {
            return Ok(None);
        }
        line.next_seq += 1;
        line.waiting.push_back((line.next_seq, request.clone()));
        Ok(Some(line.next_seq - line.served_seq))
    }

    async fn pop(
        &self,
        upstream: &str,
        _consumer: &str,
        _claim_idle_ms: u64,
    ) -> Result<Option<Delivery>, StoreError> {
        let mut lines = self.lines.lock().map_err(|_| poisoned())?;
        let Some(line) = lines.get_mut(upstream) else {
            return Ok(None);
        };
        let Some((seq, request)) = line.waiting.pop_front() else {
            return Ok(None);
        };
        line.served_seq = seq;
        line.in_service += 1;
        Ok(Some(Delivery {
            id: seq.to_string(),
            request,
        }))
    }

    async fn touch(
        &self,
        _upstream: &str,
        _consumer: &str,
        _delivery: &Delivery,
    ) -> Result<(), StoreError> {
        // One node: nobody else could take it over.
        Ok(())
    }

    async fn ack(&self, upstream: &str, _delivery: &Delivery) -> Result<(), StoreError> {
        let mut lines = self.lines.lock().map_err(|_| poisoned())?;
        if let Some(line) = lines.get_mut(upstream) {
            line.in_service = line.in_service.saturating_sub(1);
        }
        Ok(())
    }

    async fn position(&self, upstream: &str, ticket: TicketId) -> Result<Option<u64>, StoreError> {
        let lines = self.lines.lock().map_err(|_| poisoned())?;
        Ok(lines.get(upstream).and_then(|line| {
            line.waiting
                .iter()
                .position(|(_, r)| r.ticket == ticket)
                .map(|i| i as u64 + 1)
        }))
    }

    async fn depth(&self, upstream: &str) -> Result<u64, StoreError> {
        let lines = self.lines.lock().map_err(|_| poisoned())?;
        Ok(lines
            .get(upstream)
            .map_or(0, |l| l.waiting.len() as u64 + l.in_service))
    }
}
