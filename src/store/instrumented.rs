//! A store wrapper that times every operation and counts failures in
//! `sluice_store_duration_seconds{op}` and `sluice_store_errors_total{op}`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Committed, Reservation, Reserved, SkuAudit, StockView, Store, StoreError, TicketRecord,
    TicketState,
};
use crate::metrics::Metrics;
use crate::vocab::{ReleaseReason, SkuKey, StoreOp, StoredResponse, TicketId};

/// Any store, measured.
pub struct InstrumentedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl InstrumentedStore {
    /// Wraps `inner`, reporting to `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: StoreOp,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = f.await;
        self.metrics
            .observe_store(op, started.elapsed(), result.is_ok());
        result
    }
}

#[async_trait]
impl Store for InstrumentedStore {
    async fn reserve(&self, r: &Reservation<'_>) -> Result<Reserved, StoreError> {
        self.timed(StoreOp::Reserve, self.inner.reserve(r)).await
    }

    async fn commit(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: Option<&StoredResponse>,
        ttl: Duration,
    ) -> Result<Committed, StoreError> {
        let committed = self
            .timed(
                StoreOp::Commit,
                self.inner.commit(key, ticket, response, ttl),
            )
            .await?;
        if let Committed::Retaken { short } = committed {
            if short > 0 {
                self.metrics.observe_oversold(&key.rule, short);
            }
        }
        Ok(committed)
    }

    async fn set_state(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        state: TicketState,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.timed(
            StoreOp::Commit,
            self.inner.set_state(key, ticket, state, lease),
        )
        .await
    }

    async fn expired(&self, limit: usize) -> Result<Vec<(SkuKey, TicketId)>, StoreError> {
        self.timed(StoreOp::Read, self.inner.expired(limit)).await
    }

    async fn keep_response(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.timed(
            StoreOp::Commit,
            self.inner.keep_response(key, ticket, response, ttl),
        )
        .await
    }

    async fn release(
        &self,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
    ) -> Result<u64, StoreError> {
        let moved = self
            .timed(StoreOp::Release, self.inner.release(key, ticket, reason))
            .await?;
        if moved > 0 {
            self.metrics.observe_released(&key.rule, reason, moved);
        }
        Ok(moved)
    }

    async fn set_available(&self, key: &SkuKey, available: u64) -> Result<StockView, StoreError> {
        let view = self
            .timed(
                StoreOp::SetAvailable,
                self.inner.set_available(key, available),
            )
            .await?;
        self.metrics
            .set_stock_available(&key.rule, &key.sku, view.available);
        Ok(view)
    }

    async fn stock(&self, key: &SkuKey) -> Result<Option<StockView>, StoreError> {
        self.timed(StoreOp::Read, self.inner.stock(key)).await
    }

    async fn available(&self, key: &SkuKey) -> Result<Option<u64>, StoreError> {
        let n = self.timed(StoreOp::Read, self.inner.available(key)).await?;
        if let Some(n) = n {
            self.metrics.set_stock_available(&key.rule, &key.sku, n);
        }
        Ok(n)
    }

    async fn ticket(&self, id: TicketId) -> Result<Option<TicketRecord>, StoreError> {
        self.timed(StoreOp::Read, self.inner.ticket(id)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOp::Read, self.inner.ping()).await
    }

    async fn skus(&self) -> Result<Vec<SkuKey>, StoreError> {
        self.timed(StoreOp::Read, self.inner.skus()).await
    }

    async fn audit(&self, key: &SkuKey) -> Result<Option<SkuAudit>, StoreError> {
        self.timed(StoreOp::Read, self.inner.audit(key)).await
    }

    fn prune(&self) {
        self.inner.prune();
    }
}
