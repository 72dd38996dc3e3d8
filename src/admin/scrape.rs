//! What `GET /metrics` reads just before it encodes: the values that live
//! elsewhere (settlements waiting in the journal, each upstream server's
//! health state, whether the store answers, the local sold-out flags).
//! Reading them when scraped keeps nothing in step between scrapes and
//! costs nothing on the request path.

use std::time::Duration;

use crate::admission::Admission;
use crate::metrics::Metrics;
use crate::upstream::Upstreams;

/// Refreshes the scrape-time series of `metrics`. The store is asked with
/// one PING, bounded by `store_bound` on top of the store's own timeout
/// (the Redis client's response timeout, or its circuit breaker, which
/// answers at once while open).
pub async fn refresh(
    metrics: &Metrics,
    upstreams: &Upstreams,
    admission: &Admission,
    store_bound: Duration,
) {
    metrics.set_settlements_pending(admission.ledger().journal().len());
    metrics.set_upstream_servers(&upstreams.server_states());
    metrics.set_soldout_flags(&admission.ledger().flags().flagged());
    let store = tokio::time::timeout(store_bound, admission.store().ping()).await;
    metrics.set_store_up(matches!(store, Ok(Ok(()))));
}
