//! The pipeline's background work, as a pingora background service:
//! rechecking sold-out flags (so stock restored through another node is
//! sold again), pruning rate-limit state and the store's expired local
//! state. Runs until shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::Admission;

/// How often full rate-limit buckets and expired marks are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// The background service.
pub struct Housekeeping {
    admission: Arc<Admission>,
    interval: Duration,
}

impl Housekeeping {
    /// Housekeeping for `admission`, ticking every `interval`.
    pub fn new(admission: Arc<Admission>, interval: Duration) -> Self {
        Self {
            admission,
            interval,
        }
    }
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            self.admission.housekeeping().await;
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                self.admission.prune();
            }
        }
    }
}
