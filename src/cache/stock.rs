//! Live stock for pages: `GET /sluice/stock/{rule}/{sku}` on the main
//! listener answers `{"available": N, "state": ...}` from this node's
//! view, so a product page can poll it as often as it likes:
//!
//! - the rule's window says `not_started` or `ended`;
//! - a sku flagged sold out (admission stage 5) is `sold_out` with 0
//!   units, without asking the store;
//! - otherwise the count is the store's, read at most once per sku per
//!   `store.recheck_interval` on this node (kept that long; concurrent
//!   polls of one sku wait on one read).
//!
//! Public and read-only: it changes nothing and shows only what a page
//! shows. Called by the proxy's intake.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use super::flight::{Flights, Join, Waited};
use crate::admission::Admission;
use crate::outcome::{Answer, SaleState, StockPoll};
use crate::vocab::{valid_id, SkuKey};

/// Counts kept at most: polls of skus nobody loaded are answered from
/// here too, so a page (or a scraper) trying made-up skus costs the
/// store one read per sku per interval, and this much memory at most.
const MAX_SKUS: u64 = 100_000;

/// A count as the store gave it: `None` when the sku was never loaded.
type Count = Option<u64>;

/// The stock view of one node.
pub struct StockView {
    admission: Arc<Admission>,
    counts: Cache<String, Count>,
    reads: Arc<Flights<String, Result<Count, ()>>>,
}

impl StockView {
    /// A view over `admission`'s rules, flags and store, counts kept for
    /// `recheck_interval`.
    pub fn new(admission: Arc<Admission>, recheck_interval: Duration) -> Self {
        Self {
            admission,
            counts: Cache::builder()
                .max_capacity(MAX_SKUS)
                .time_to_live(recheck_interval.max(Duration::from_millis(1)))
                .build(),
            reads: Arc::default(),
        }
    }

    /// The answer to `GET /sluice/stock/{rest}`.
    pub async fn poll(&self, rest: &str) -> Answer {
        let unknown = |message: String| Answer::Stock(StockPoll::Unknown { message });
        let Some((rule, sku)) = rest.split_once('/') else {
            return unknown("use /sluice/stock/{rule}/{sku}".into());
        };
        let Some(stage) = self.admission.stage_named(rule) else {
            return unknown(format!("no sale named {rule:?}"));
        };
        if !valid_id(sku) {
            return unknown(format!("sku {}", crate::vocab::ID_SHAPE));
        }
        let now = chrono::Utc::now();
        let window = &stage.rule.window;
        let by_window = if window.start.is_some_and(|s| now < s) {
            Some(SaleState::NotStarted)
        } else if window.end.is_some_and(|e| now >= e) {
            Some(SaleState::Ended)
        } else {
            None
        };
        if self.admission.ledger().flags().is_set(rule, sku) {
            return Answer::Stock(StockPoll::Known {
                available: 0,
                state: by_window.unwrap_or(SaleState::SoldOut),
            });
        }
        match self.count(rule, sku).await {
            Ok(Some(available)) => {
                let state = by_window.unwrap_or(if available == 0 {
                    SaleState::SoldOut
                } else {
                    SaleState::OnSale
                });
                Answer::Stock(StockPoll::Known { available, state })
            }
            Ok(None) => unknown(format!("{sku} is not on sale")),
            Err(()) => Answer::Unavailable {
                message: "stock is unknown right now, please try again shortly".into(),
            },
        }
    }

    /// The sku's count: kept, or read once for everyone asking now.
    async fn count(&self, rule: &str, sku: &str) -> Result<Count, ()> {
        // Rule names and skus are ids (no '/').
        let key = format!("{rule}/{sku}");
        if let Some(count) = self.counts.get(&key) {
            return Ok(count);
        }
        let lead = match self.reads.join(&key) {
            Join::Follow(f) => {
                return match f.wait(None).await {
                    Waited::Value(v) => v,
                    Waited::TimedOut | Waited::Abandoned => Err(()),
                }
            }
            Join::Lead(lead) => lead,
        };
        let mine = lead.follower();
        let (admission, counts, sku_key) = (
            self.admission.clone(),
            self.counts.clone(),
            SkuKey::new(rule, sku),
        );
        // In a task: a poller that leaves does not cut the read the
        // others wait on.
        tokio::spawn(async move {
            let read = admission.store().available(&sku_key).await;
            let read = match read {
                Ok(count) => {
                    counts.insert(key, count);
                    Ok(count)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "stock view: store unavailable");
                    Err(())
                }
            };
            lead.finish(read);
        });
        match mine.wait(None).await {
            Waited::Value(v) => v,
            Waited::TimedOut | Waited::Abandoned => Err(()),
        }
    }
}
