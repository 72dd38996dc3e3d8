//! The backend's safe concurrency: `max_inflight` slots per upstream and
//! per gateway node, handed out in FIFO order. A slot is an RAII guard:
//! dropping it (success, error, client gone) frees it and moves the
//! `sluice_upstream_inflight` gauge back.

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots of one upstream.
pub struct Slots {
    semaphore: Arc<Semaphore>,
    gauge: IntGauge,
}

/// One admitted request at the backend; freed on drop.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Slots {
    /// `max` slots, reported on `gauge`.
    pub fn new(max: u32, gauge: IntGauge) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(max as usize)),
            gauge,
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.gauge.inc();
        Slot {
            _permit: permit,
            gauge: self.gauge.clone(),
        }
    }

    /// A slot if one frees within `wait` (FIFO among waiters), else `None`.
    pub async fn acquire_within(&self, wait: Duration) -> Option<Slot> {
        if let Ok(p) = self.semaphore.clone().try_acquire_owned() {
            return Some(self.slot(p));
        }
        if wait.is_zero() {
            return None;
        }
        match tokio::time::timeout(wait, self.semaphore.clone().acquire_owned()).await {
            Ok(Ok(p)) => Some(self.slot(p)),
            _ => None,
        }
    }

    /// A slot, however long it takes (for the queue drainer).
    pub async fn acquire(&self) -> Option<Slot> {
        self.semaphore
            .clone()
            .acquire_owned()
            .await
            .ok()
            .map(|p| self.slot(p))
    }

    /// Slots in use now.
    pub fn in_use(&self) -> i64 {
        self.gauge.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: u32) -> Slots {
        Slots::new(n, IntGauge::new("t", "t").expect("gauge"))
    }

    #[tokio::test]
    async fn slots_cap_and_free_on_drop() {
        let s = slots(2);
        let a = s.acquire_within(Duration::ZERO).await.expect("free");
        let b = s.acquire_within(Duration::ZERO).await.expect("free");
        assert_eq!(s.in_use(), 2);
        assert!(s.acquire_within(Duration::from_millis(20)).await.is_none());
        drop(a);
        assert_eq!(s.in_use(), 1);
        let c = s.acquire_within(Duration::ZERO).await.expect("freed");
        drop((b, c));
        assert_eq!(s.in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiter_gets_a_freed_slot() {
        let s = Arc::new(slots(1));
        let held = s.acquire_within(Duration::ZERO).await.expect("free");
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.acquire_within(Duration::from_secs(10)).await.is_some() })
        };
        tokio::task::yield_now().await;
        drop(held);
        assert!(waiter.await.expect("task"));
        assert_eq!(
            s.in_use(),
            0,
            "the waiter's slot was dropped with its task result"
        );
    }
}
