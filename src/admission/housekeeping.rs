//! The pipeline's background work, as a pingora background service:
//! rechecking sold-out flags (so stock restored through another node is
//! sold again), returning holds past their lease and retrying journaled
//! settlements, pruning rate-limit state and the store's expired local
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
    recheck_every: Duration,
    sweep_every: Duration,
}

impl Housekeeping {
    /// Housekeeping for `admission`, ticking every `interval`, sweeping
    /// expired holds every `sweep_every`.
    pub fn new(admission: Arc<Admission>, interval: Duration, sweep_every: Duration) -> Self {
        Self {
            admission,
            recheck_every: interval,
            sweep_every,
        }
    }
}

#[async_trait]
impl BackgroundService for Housekeeping {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.recheck_every.min(self.sweep_every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune = Instant::now();
        let mut last_sweep = Instant::now();
        let mut last_recheck: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            if last_recheck.is_none_or(|t| t.elapsed() >= self.recheck_every) {
                last_recheck = Some(Instant::now());
                self.admission.housekeeping().await;
            }
            if last_sweep.elapsed() >= self.sweep_every {
                last_sweep = Instant::now();
                self.admission.settle_overdue().await;
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                self.admission.prune();
            }
        }
    }
}
