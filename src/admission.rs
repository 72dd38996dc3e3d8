//! The admission pipeline for requests that match a flash-sale rule
//! (DESIGN.md section 3). Stages, in order, each of which can end the
//! request with an [`Answer`]:
//!
//! 1. match a rule (done by the proxy through [`Admission::find`]);
//! 2. extract and validate user, sku, quantity (`extract`);
//! 3. campaign window;
//! 4. rate limits (`ratelimit`);
//! 5. local sold-out flag (`soldout`);
//! 6. + 7. dedup and stock pre-deduction, atomically in the store;
//! 8. forward the winner (queueing comes later);
//! 9. settle: commit or release on the backend's answer ([`Admission::settle`]).
//!
//! Owned by the proxy; the admin API uses it to restock and release so that
//! local sold-out flags clear at once.

pub mod extract;
pub mod housekeeping;
pub mod ratelimit;
pub mod soldout;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, OnFailure};
use crate::outcome::Answer;
use crate::queue::{Queue, QueuedRequest};
use crate::rules::{Rule, RuleMatch, RuleSet};
use crate::store::{
    DedupMark, MarkScope, ReleaseReason, Reservation, Reserved, SkuKey, StockView, Store,
    StoreError, StoredResponse, TicketId, TicketRecord, TicketState,
};
use extract::{valid_id, Extractor, ExtractorError, RequestParts};
use ratelimit::RateLimitStage;
use soldout::SoldOutFlags;

/// The header a client may send to make retries of one attempt idempotent.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Kept backend answers are cut at this size: they are replayed to
/// duplicates, not archived.
pub const MAX_KEPT_BODY: usize = 64 << 10;

/// A rule and the per-rule machinery built from it.
pub struct RuleStage {
    /// The rule.
    pub rule: Arc<Rule>,
    extractor: Extractor,
    limits: RateLimitStage,
}

/// What the pipeline needs to know of a request.
pub struct Candidate<'a> {
    /// Headers, query, captures and (read) body.
    pub parts: RequestParts<'a>,
    /// The client ip (see `trusted_proxies`).
    pub client_ip: IpAddr,
}

/// A winner: its stock, its ticket, its units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Winner {
    /// Index of its rule.
    pub rule: usize,
    /// Its stock.
    pub key: SkuKey,
    /// Its ticket (the backend's idempotency key).
    pub ticket: TicketId,
    /// Units held.
    pub qty: u32,
}

/// The pipeline's decision.
pub enum Verdict {
    /// Answer now, from the gateway.
    Answer(Answer),
    /// Forward, holding a ticket.
    Forward(Winner),
    /// The store is down and `on_failure: pass_capped`: forward without a
    /// ticket while holding one of the few permits.
    PassCapped(OwnedSemaphorePermit),
}

/// How a forwarded winner ended.
#[derive(Clone, Debug)]
pub enum Settlement {
    /// The backend answered with this status (and, later, this body).
    Answered {
        /// Status.
        status: u16,
        /// Content-Type.
        content_type: Option<String>,
    },
    /// No answer: why.
    Failed(ReleaseReason),
}

/// Building the pipeline failed (a rule's secret is missing).
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// A JWT secret variable is unset.
    #[error(transparent)]
    Extractor(#[from] ExtractorError),
}

/// The pipeline: rules, their stages, the store and the sold-out flags.
pub struct Admission {
    rules: RuleSet,
    stages: Vec<RuleStage>,
    store: Arc<dyn Store>,
    flags: SoldOutFlags,
    on_failure: OnFailure,
    pass_permits: Arc<Semaphore>,
    result_ttl: Duration,
    /// Where queued winners wait (to answer a repeat with its position).
    queue: Arc<dyn Queue>,
    /// Upstream names by `UpstreamId`.
    upstream_names: Vec<String>,
    /// Skus loaded through this node's admin API, whose gauge housekeeping
    /// refreshes (labels from admin actions only, never from shoppers).
    loaded: std::sync::Mutex<std::collections::BTreeSet<(usize, String)>>,
}

/// Answer for a store that cannot answer (fail closed).
fn store_down(e: &StoreError) -> Answer {
    tracing::debug!(error = %e, "store unavailable");
    Answer::Unavailable {
        message: "the sale is busy, please try again shortly".into(),
    }
}

impl Admission {
    /// Builds the stages of every rule of `config`.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        queue: Arc<dyn Queue>,
    ) -> Result<Self, AdmissionError> {
        let mut stages = Vec::new();
        for rule in config.rules.rules() {
            stages.push(RuleStage {
                rule: rule.clone(),
                extractor: Extractor::new(rule)?,
                limits: RateLimitStage::new(&rule.rate_limits),
            });
        }
        let cap = match config.store.on_failure {
            OnFailure::PassCapped { cap } => cap as usize,
            OnFailure::FailClosed => 0,
        };
        Ok(Self {
            flags: SoldOutFlags::new(stages.len()),
            rules: config.rules.clone(),
            stages,
            store,
            on_failure: config.store.on_failure,
            pass_permits: Arc::new(Semaphore::new(cap)),
            result_ttl: config.store.result_ttl,
            loaded: std::sync::Mutex::new(Default::default()),
            queue,
            upstream_names: config.upstreams.iter().map(|u| u.name.clone()).collect(),
        })
    }

    /// Stage 1: the rule a request matches, if any.
    pub fn find<'r, 'p>(
        &'r self,
        method: &http::Method,
        path: &'p str,
    ) -> Option<RuleMatch<'r, 'p>> {
        self.rules.find(method, path)
    }

    /// The stage of a rule index.
    pub fn stage(&self, rule: usize) -> Option<&RuleStage> {
        self.stages.get(rule)
    }

    /// The rule index of a rule name.
    pub fn rule_index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| &*s.rule.name == name)
    }

    /// The store (for the admin API and ticket polls).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stages 2-7 for a request that matched rule `rule`.
    pub async fn admit(&self, rule: usize, c: &Candidate<'_>) -> Verdict {
        let Some(stage) = self.stages.get(rule) else {
            return Verdict::Answer(Answer::Unavailable {
                message: "rule not loaded".into(),
            });
        };
        let r = &stage.rule;
        // 2. extract
        let attempt = match stage.extractor.extract(&c.parts) {
            Ok(a) => a,
            Err(message) => return Verdict::Answer(Answer::Invalid { message }),
        };
        let idempotency = match c.parts.headers.get(IDEMPOTENCY_HEADER) {
            None => None,
            Some(v) => match v.to_str().ok().filter(|k| valid_id(k)) {
                Some(k) => Some(k),
                None => {
                    return Verdict::Answer(Answer::Invalid {
                        message: "Idempotency-Key: must be 1-128 characters of A-Z a-z 0-9 . _ : -"
                            .into(),
                    })
                }
            },
        };
        // 3. window
        let now = chrono::Utc::now();
        if let Some(start) = r.window.start {
            if now < start {
                let starts_in = (start - now.fixed_offset()).to_std().unwrap_or_default();
                return Verdict::Answer(Answer::NotStarted { starts_in });
            }
        }
        if r.window.end.is_some_and(|end| now >= end) {
            return Verdict::Answer(Answer::Ended);
        }
        // 4. rate limits
        if let Err(retry_after) = stage.limits.check(c.client_ip, &attempt.user) {
            return Verdict::Answer(Answer::RateLimited { retry_after });
        }
        // 5. local sold-out flag
        if self.flags.is_set(rule, &attempt.sku) {
            return Verdict::Answer(Answer::SoldOut);
        }
        // 6. + 7. dedup and stock, one atomic step in the store
        let key = SkuKey::new(&r.name, &attempt.sku);
        let mut marks = Vec::new();
        let mark_ttl = r.dedup.as_ref().map_or(self.result_ttl, |d| d.ttl);
        if let Some(d) = &r.dedup {
            let scope = if d.by_sku {
                MarkScope::Sku
            } else {
                MarkScope::Rule
            };
            let id = if d.by_user {
                format!("u:{}", attempt.user)
            } else {
                // Dedup by sku alone: one attempt per sku at a time.
                "s".to_string()
            };
            marks.push(DedupMark {
                scope,
                id,
                ttl: d.ttl,
            });
        }
        if let Some(k) = idempotency {
            marks.push(DedupMark {
                scope: MarkScope::Sku,
                id: format!("i:{k}"),
                ttl: mark_ttl,
            });
        }
        let ticket = TicketId::random();
        let reservation = Reservation {
            key: &key,
            ticket,
            user: &attempt.user,
            qty: attempt.qty,
            marks: &marks,
            per_user_limit: r.per_user_limit.map(|n| n.get()),
        };
        match self.store.reserve(&reservation).await {
            Ok(Reserved::Won) => Verdict::Forward(Winner {
                rule,
                key,
                ticket,
                qty: attempt.qty,
            }),
            Ok(Reserved::SoldOut) => {
                self.flags.set(rule, &attempt.sku);
                Verdict::Answer(Answer::SoldOut)
            }
            // Not enough for this quantity, but some left for others: no
            // flag, or one greedy request would close the sale on this node.
            Ok(Reserved::NotEnough) => Verdict::Answer(Answer::SoldOut),
            Ok(Reserved::NotLoaded) => Verdict::Answer(Answer::Unavailable {
                message: format!("{} is not on sale", attempt.sku),
            }),
            Ok(Reserved::OverUserLimit) => Verdict::Answer(Answer::Duplicate {
                ticket: None,
                queued_position: None,
                message: "the limit per buyer is reached",
            }),
            Ok(Reserved::Duplicate { first }) => Verdict::Answer(self.duplicate_of(first).await),
            Err(e) => match self.on_failure {
                OnFailure::FailClosed => Verdict::Answer(store_down(&e)),
                OnFailure::PassCapped { .. } => match self.pass_permits.clone().try_acquire_owned()
                {
                    Ok(permit) => Verdict::PassCapped(permit),
                    Err(_) => Verdict::Answer(store_down(&e)),
                },
            },
        }
    }

    /// The answer to a repeat of `first`: its state now, or its stored
    /// answer when it is done.
    async fn duplicate_of(&self, first: TicketId) -> Answer {
        let in_progress = Answer::Duplicate {
            ticket: Some(first.to_string()),
            queued_position: None,
            message: "already in progress",
        };
        match self.store.ticket(first).await {
            Ok(Some(TicketRecord {
                state: TicketState::Committed,
                response: Some(resp),
                ..
            })) => Answer::Replay(resp),
            Ok(Some(TicketRecord {
                state: TicketState::Queued,
                key,
                ..
            })) => {
                let upstream = self
                    .rule_index(&key.rule)
                    .and_then(|i| self.stages.get(i))
                    .and_then(|s| self.upstream_names.get(s.rule.upstream.0));
                let position = match upstream {
                    Some(u) => self.queue.position(u, first).await.ok().flatten(),
                    None => None,
                };
                Answer::Duplicate {
                    ticket: Some(first.to_string()),
                    queued_position: Some(position.unwrap_or(1)),
                    message: "already queued",
                }
            }
            Ok(Some(TicketRecord {
                state: TicketState::Committed,
                ..
            })) => Answer::Duplicate {
                ticket: Some(first.to_string()),
                queued_position: None,
                message: "already ordered",
            },
            Ok(_) => in_progress,
            Err(e) => store_down(&e),
        }
    }

    /// The release reason a settlement stands for under the rule's
    /// `release_on`, or `None` when it commits (or, for an unlisted
    /// failure, keeps the units held).
    fn release_reason(&self, rule: usize, how: &Settlement) -> Option<ReleaseReason> {
        let on = &self.stages.get(rule)?.rule.release_on;
        match how {
            Settlement::Answered { status, .. } => match status {
                500..=599 if on.status_5xx => Some(ReleaseReason::Status5xx),
                400..=499 if on.status_4xx => Some(ReleaseReason::Status4xx),
                _ => None,
            },
            Settlement::Failed(reason) => {
                let listed = match reason {
                    ReleaseReason::ConnectError => on.connect_error,
                    ReleaseReason::Timeout => on.timeout,
                    ReleaseReason::Status5xx => on.status_5xx,
                    ReleaseReason::Status4xx => on.status_4xx,
                    // The backend was never asked: always safe to return.
                    ReleaseReason::ClientGone | ReleaseReason::Admin | ReleaseReason::QueueFull => {
                        true
                    }
                };
                listed.then_some(*reason)
            }
        }
    }

    /// Whether settling this way would return the units (a failure the
    /// queue may retry).
    pub fn would_release(&self, rule: usize, how: &Settlement) -> bool {
        self.release_reason(rule, how).is_some()
    }

    /// Stage 9: commits or releases a winner's ticket. Called before the
    /// answer is written, so the admin view agrees with the client.
    pub async fn settle(&self, winner: &Winner, how: &Settlement) -> Result<(), StoreError> {
        if self.stages.get(winner.rule).is_none() {
            return Ok(());
        }
        let release = self.release_reason(winner.rule, how);
        match (release, how) {
            (Some(reason), _) => self
                .release(winner.rule, &winner.key, winner.ticket, reason)
                .await
                .map(drop),
            (None, Settlement::Answered { .. }) => {
                // The answer itself is kept once its body is through.
                self.store
                    .commit(&winner.key, winner.ticket, None, self.result_ttl)
                    .await
            }
            (None, Settlement::Failed(reason)) => {
                // Not listed in release_on: the backend may have taken the
                // order, so the units stay held for reconcile or an admin
                // release.
                tracing::warn!(ticket = %winner.ticket, reason = reason.as_str(),
                    "backend failure not in release_on; units stay in flight");
                Ok(())
            }
        }
    }

    /// Stage 8, overflow: keeps a winner's request in `upstream`'s queue
    /// and answers `queued` with its position; a full (or unreachable)
    /// queue returns the units and answers `unavailable`.
    pub async fn enqueue(
        &self,
        winner: &Winner,
        request: &QueuedRequest,
        upstream: &str,
        capacity: u32,
    ) -> Answer {
        let pushed = match self
            .store
            .set_state(&winner.key, winner.ticket, TicketState::Queued)
            .await
        {
            Ok(()) => self.queue.push(upstream, request, capacity).await,
            Err(e) => Err(e),
        };
        let message = match pushed {
            Ok(Some(position)) => {
                return Answer::Queued {
                    ticket: winner.ticket.to_string(),
                    position,
                }
            }
            Ok(None) => "too many orders are waiting, please try again shortly",
            Err(e) => {
                tracing::debug!(error = %e, "could not queue a winner");
                "the sale is busy, please try again shortly"
            }
        };
        if let Err(e) = self
            .settle(winner, &Settlement::Failed(ReleaseReason::QueueFull))
            .await
        {
            tracing::warn!(ticket = %winner.ticket, error = %e, "could not release a refused winner");
        }
        Answer::Unavailable {
            message: message.into(),
        }
    }

    /// Keeps the body of a committed winner's answer for replay.
    pub async fn keep_body(
        &self,
        winner: &Winner,
        status: u16,
        content_type: Option<String>,
        body: Bytes,
    ) {
        let response = StoredResponse {
            status,
            content_type,
            body,
        };
        if let Err(e) = self
            .store
            .keep_response(&winner.key, winner.ticket, &response, self.result_ttl)
            .await
        {
            tracing::debug!(ticket = %winner.ticket, error = %e, "could not keep the answer");
        }
    }

    /// Returns a ticket's units and clears the local sold-out flag.
    pub async fn release(
        &self,
        rule: usize,
        key: &SkuKey,
        ticket: TicketId,
        reason: ReleaseReason,
    ) -> Result<u64, StoreError> {
        let moved = self.store.release(key, ticket, reason).await?;
        if moved > 0 {
            self.flags.clear(rule, &key.sku);
        }
        Ok(moved)
    }

    /// Admin: releases a ticket by id, wherever it is.
    pub async fn release_ticket(&self, ticket: TicketId) -> Result<Option<u64>, StoreError> {
        let Some(record) = self.store.ticket(ticket).await? else {
            return Ok(None);
        };
        let rule = self.rule_index(&record.key.rule).unwrap_or(usize::MAX);
        let moved = self
            .release(rule, &record.key, ticket, ReleaseReason::Admin)
            .await?;
        Ok(Some(moved))
    }

    /// Admin: sets the available units and clears the flag when positive.
    pub async fn restock(
        &self,
        rule: usize,
        key: &SkuKey,
        available: u64,
    ) -> Result<StockView, StoreError> {
        let view = self.store.set_available(key, available).await?;
        if view.available > 0 {
            self.flags.clear(rule, &key.sku);
        }
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert((rule, key.sku.to_string()));
        }
        Ok(view)
    }

    /// Background: clears flags of skus whose stock came back through
    /// another node, and prunes rate-limit state.
    pub async fn housekeeping(&self) {
        // Reading availability refreshes `sluice_stock_available` (the
        // instrumented store sets it).
        let loaded: Vec<(usize, String)> = self
            .loaded
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        for (rule, sku) in loaded {
            if let Some(stage) = self.stages.get(rule) {
                let _ = self
                    .store
                    .available(&SkuKey::new(&stage.rule.name, &sku))
                    .await;
            }
        }
        for (rule, sku) in self.flags.flagged() {
            let Some(stage) = self.stages.get(rule) else {
                continue;
            };
            let key = SkuKey::new(&stage.rule.name, &sku);
            if let Ok(Some(n)) = self.store.available(&key).await {
                if n > 0 {
                    self.flags.clear(rule, &sku);
                }
            }
        }
    }

    /// Background: drops rate-limit state of full buckets.
    pub fn prune(&self) {
        for s in &self.stages {
            s.limits.prune();
        }
    }
}
