//! Stage 8: a winner takes one of the backend's `max_inflight` slots now,
//! or waits for one in FIFO order up to its rule's `max_wait`
//! ([`Admission::wait_for_slot`]), or is queued, 202 with its ticket and
//! position, for the drainer to send later ([`Admission::enqueue`]). A
//! full or unreachable queue returns the units (`unavailable`). A client
//! that leaves while waiting gets its units back at once.

use std::future::Future;

use super::hold::{Hold, Settlement};
use super::{Admission, RuleStage};
use crate::outcome::Answer;
use crate::queue::QueuedRequest;
use crate::store::TicketState;
use crate::upstream::slots::Slot;
use crate::upstream::UpstreamPool;
use crate::vocab::ReleaseReason;

/// How waiting for a slot ended.
pub enum Waited {
    /// Send it now, under this slot.
    Slot(Hold, Slot),
    /// No slot within `max_wait`: queue it.
    Full(Hold),
    /// The client left while waiting; its units are back.
    ClientGone,
}

impl Admission {
    /// A slot of `pool` for a winner of `stage`'s rule, now or within the
    /// rule's `max_wait`; `client_gone` resolves if the client leaves.
    pub async fn wait_for_slot(
        &self,
        hold: Hold,
        stage: &RuleStage,
        pool: &UpstreamPool,
        client_gone: impl Future<Output = ()>,
    ) -> Waited {
        let max_wait = stage.rule.queue.max_wait;
        let waited = tokio::select! {
            // A slot free now wins over a close seen at the same moment: the
            // order then goes out whole and is settled by its answer.
            biased;
            slot = pool.slots.acquire_within(max_wait) => Some(slot),
            _ = client_gone => None,
        };
        match waited {
            Some(Some(slot)) => Waited::Slot(hold, slot),
            Some(None) => Waited::Full(hold),
            None => {
                if let (_, Err(e)) = hold
                    .settle(Settlement::Release(ReleaseReason::ClientGone))
                    .await
                {
                    tracing::warn!(error = %e, "could not release a winner whose client left");
                }
                Waited::ClientGone
            }
        }
    }

    /// Keeps a winner's request (`None`: it could not be presented) in
    /// `pool`'s queue and answers `queued` with its position; the hold
    /// goes with the entry. Refused, the units go back.
    pub async fn enqueue(
        &self,
        hold: Hold,
        request: Option<QueuedRequest>,
        stage: &RuleStage,
        pool: &UpstreamPool,
    ) -> Answer {
        let capacity = stage.rule.queue.capacity;
        let Some(request) = request else {
            return self.refuse(hold, BUSY).await;
        };
        let pushed = match hold.set_state(TicketState::Queued).await {
            Ok(_) => self.queue.push(pool.name(), &request, capacity).await,
            Err(e) => Err(e),
        };
        match pushed {
            Ok(Some(position)) => {
                let ticket = hold.ticket().to_string();
                hold.into_queue();
                Answer::Queued { ticket, position }
            }
            Ok(None) => {
                self.refuse(
                    hold,
                    "too many orders are waiting, please try again shortly",
                )
                .await
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not queue a winner");
                self.refuse(hold, BUSY).await
            }
        }
    }

    /// Returns a winner's units (it could not be queued) and says so.
    async fn refuse(&self, hold: Hold, message: &str) -> Answer {
        let ticket = hold.ticket();
        if let (_, Err(e)) = hold
            .settle(Settlement::Release(ReleaseReason::QueueFull))
            .await
        {
            tracing::warn!(ticket = %ticket, error = %e, "could not release a refused winner");
        }
        Answer::Unavailable {
            message: message.into(),
        }
    }
}

/// What a winner that could not be kept is told.
const BUSY: &str = "the sale is busy, please try again shortly";
