//! Where a ticket is, answered from the store by any node: one lookup
//! ([`Admission::ticket_status`]) serves both ticket polls
//! (`GET /sluice/tickets/{id}`) and repeats of an attempt (stage 6's
//! `duplicate`), which only differ in how they word the answer.

use super::{store_down, Admission};
use crate::outcome::{Answer, TicketPoll};
use crate::store::{StoreError, TicketRecord, TicketState};
use crate::vocab::TicketId;

/// A ticket's record and, while it is queued, its place in line.
pub struct TicketStatus {
    /// The ledger's record, `None` when unknown or expired.
    pub record: Option<TicketRecord>,
    /// 1 = next, while queued and found in the queue.
    pub position: Option<u64>,
    /// Seconds until it is sent, at the recent drain rate.
    pub eta_seconds: Option<u64>,
}

impl Admission {
    /// The state of a ticket, with its queue position while queued.
    pub async fn ticket_status(&self, id: TicketId) -> Result<TicketStatus, StoreError> {
        let record = self.store().ticket(id).await?;
        let upstream = record
            .as_ref()
            .filter(|r| r.state == TicketState::Queued)
            .and_then(|r| self.stage_named(&r.key.rule))
            .and_then(|s| self.upstream_names.get(s.rule.upstream.0));
        let (position, eta_seconds) = match upstream {
            Some(u) => {
                let position = self.queue.position(u, id).await.ok().flatten();
                (
                    position,
                    position.and_then(|p| self.rates.eta_seconds(u, p)),
                )
            }
            None => (None, None),
        };
        Ok(TicketStatus {
            record,
            position,
            eta_seconds,
        })
    }

    /// The answer to a poll of ticket `id`.
    pub async fn poll(&self, id: &str) -> Answer {
        let Some(ticket) = TicketId::parse(id) else {
            return Answer::Ticket {
                id: id.to_string(),
                poll: TicketPoll::Unknown,
            };
        };
        let status = match self.ticket_status(ticket).await {
            Ok(s) => s,
            Err(e) => return store_down(&e),
        };
        let poll = match status.record {
            None => TicketPoll::Unknown,
            Some(r) => match r.state {
                TicketState::Queued => TicketPoll::Queued {
                    position: status.position.unwrap_or(1),
                    eta_seconds: status.eta_seconds,
                },
                TicketState::Held => TicketPoll::InFlight,
                TicketState::Committed => TicketPoll::Done(r.response),
                TicketState::Released => TicketPoll::NotPlaced(r.response),
            },
        };
        Answer::Ticket {
            id: id.to_string(),
            poll,
        }
    }

    /// The answer to a repeat of `first`: its state now, or its stored
    /// answer when it is done.
    pub(super) async fn duplicate_of(&self, first: TicketId) -> Answer {
        let status = match self.ticket_status(first).await {
            Ok(s) => s,
            Err(e) => return store_down(&e),
        };
        let (state, response) = match status.record {
            Some(r) => (Some(r.state), r.response),
            None => (None, None),
        };
        let (queued_position, message) = match (state, response) {
            (Some(TicketState::Committed), Some(resp)) => return Answer::Replay(resp),
            (Some(TicketState::Committed), None) => (None, "already ordered"),
            (Some(TicketState::Queued), _) => {
                (Some(status.position.unwrap_or(1)), "already queued")
            }
            _ => (None, "already in progress"),
        };
        Answer::Duplicate {
            ticket: Some(first.to_string()),
            queued_position,
            message,
        }
    }
}
