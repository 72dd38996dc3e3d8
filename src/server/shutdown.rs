//! The end of a gateway process. On SIGTERM (or after an upgrade's
//! SIGQUIT has handed the listeners to the new process) pingora stops
//! accepting and closes idle client connections; this service then waits
//! for what is still under way (client connections with a request in
//! flight, queued requests being sent, and a memory queue's entries,
//! which no one else could send) and ends the process as soon as nothing
//! is left, instead of sleeping out `shutdown.grace_period`, which stays
//! the upper bound (pingora's own timer).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::connections::OpenConnections;
use crate::drain::Sending;
use crate::queue::Queue;

/// How often the watcher looks again once draining.
const POLL: Duration = Duration::from_millis(20);

/// How long nothing must be left before the process ends: a connection
/// accepted just before the listener closed is counted only once its
/// task first runs.
const QUIET: Duration = Duration::from_millis(200);

/// Ends the process once a shutdown has nothing left to wait for.
pub struct ExitWhenDrained {
    /// Client connections of the proxy's listeners.
    pub connections: Vec<OpenConnections>,
    /// Queued requests the drainer is sending.
    pub sending: Sending,
    /// The overflow queue.
    pub queue: Arc<dyn Queue>,
    /// Upstream names (the queue's keys).
    pub upstreams: Vec<String>,
    /// Run (on a blocking thread) just before the process ends: flushes
    /// what is buffered, such as the access log.
    pub before_exit: Arc<dyn Fn() + Send + Sync>,
}

impl ExitWhenDrained {
    async fn left(&self) -> (usize, usize, u64) {
        let connections = self.connections.iter().map(OpenConnections::get).sum();
        let mut queued = 0;
        if !self.queue.shared() {
            for name in &self.upstreams {
                // A local queue cannot fail to answer.
                queued += self.queue.depth(name).await.unwrap_or(0);
            }
        }
        (connections, self.sending.get(), queued)
    }
}

#[async_trait]
impl BackgroundService for ExitWhenDrained {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let started = Instant::now();
        let (connections, sending, queued) = self.left().await;
        tracing::info!(
            connections,
            sending,
            queued,
            "shutting down: no new connections; waiting for requests under way"
        );
        let mut quiet_since: Option<Instant> = None;
        loop {
            let (connections, sending, queued) = self.left().await;
            let idle = connections == 0 && sending == 0 && queued == 0;
            if !idle {
                quiet_since = None;
            } else if quiet_since.get_or_insert_with(Instant::now).elapsed() >= QUIET {
                tracing::info!(
                    after_ms = started.elapsed().as_millis() as u64,
                    "nothing left in flight; exiting"
                );
                // pingora would sleep out the whole grace period; every
                // settlement has been written (the journal syncs each).
                let flush = self.before_exit.clone();
                let _ = tokio::task::spawn_blocking(move || flush()).await;
                std::process::exit(0);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
