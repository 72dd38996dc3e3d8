//! The admission pipeline for requests that match a flash-sale rule
//! (DESIGN.md section 3). Stages, in order, each of which can end the
//! request with an [`Answer`]:
//!
//! 1. match a rule (the proxy asks [`Admission::find`]);
//! 2. extract and validate user, sku, quantity (`extract`);
//! 3. campaign window;
//! 4. rate limits (`ratelimit`);
//! 5. local sold-out flag (`soldout`);
//! 6. + 7. dedup and stock pre-deduction, atomically in the store; a
//!         winner leaves with a [`Hold`] on its units (`hold`);
//! 8. a backend slot now, within `max_wait`, or the queue (`overflow`);
//! 9. settle the hold on the backend's answer (`hold::classify`).
//!
//! Repeats and ticket polls are answered from the ticket's state by one
//! handler (`tickets`). Owned by the proxy; the admin API uses it to
//! restock and release so that local sold-out flags clear at once, and
//! the drainer to take back the holds of queued requests.

pub mod extract;
pub mod hold;
pub mod housekeeping;
pub mod journal;
pub mod overflow;
pub mod ratelimit;
pub mod soldout;
pub mod tickets;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, OnFailure};
use crate::outcome::{render, Answer, Rendered};
use crate::queue::rates::DrainRates;
use crate::queue::Queue;
use crate::rules::{FailureMode, Route, Rule, RuleSet};
use crate::store::{DedupMark, MarkScope, Reservation, Reserved, StockView, Store, StoreError};
use crate::vocab::{valid_id, ReleaseReason, SkuKey, TicketId};
use extract::{Extractor, RequestParts};
use hold::{Hold, HoldTerms, Leases, Ledger};
use journal::Journal;
use ratelimit::RateLimitStage;

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
    /// How long its holds may stay unsettled.
    pub leases: Leases,
    /// What it does while the store is down (its own, or the store's).
    on_failure: FailureMode,
}

/// What the pipeline needs to know of a request.
pub struct Candidate<'a> {
    /// Headers, query, captures and (read) body.
    pub parts: RequestParts<'a>,
    /// The client ip (see `trusted_proxies`).
    pub client_ip: IpAddr,
}

/// The pipeline's decision.
pub enum Verdict {
    /// Answer now, from the gateway.
    Answer(Answer),
    /// Forward, holding a ticket's units.
    Forward(Hold),
    /// The store is down and `on_failure: pass_capped`: forward without a
    /// ticket while holding one of the few permits.
    PassCapped(OwnedSemaphorePermit),
}

/// The pipeline: rules, their stages, the ledger of holds and the queue.
pub struct Admission {
    rules: RuleSet,
    stages: Vec<RuleStage>,
    ledger: Arc<Ledger>,
    /// Shared by the rules that pass while the store is down.
    pass_permits: Arc<Semaphore>,
    /// Where queued winners wait.
    queue: Arc<dyn Queue>,
    /// How fast each upstream's queue drains (for poll ETAs).
    rates: Arc<DrainRates>,
    /// Upstream names by `UpstreamId`.
    upstream_names: Vec<String>,
    /// Skus loaded through this node's admin API, whose gauge housekeeping
    /// refreshes (labels from admin actions only, never from shoppers).
    loaded: std::sync::Mutex<std::collections::BTreeSet<(usize, String)>>,
}

/// The client's `Idempotency-Key`, if it sent one; `Err` is the
/// `invalid` message (a malformed key, or two of them).
fn idempotency_key<'a>(parts: &RequestParts<'a>) -> Result<Option<&'a str>, String> {
    let mut keys = parts.headers.get_all(IDEMPOTENCY_HEADER).iter();
    match (keys.next(), keys.next()) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err("Idempotency-Key: sent more than once".into()),
        (Some(v), None) => match v.to_str().ok().filter(|k| valid_id(k)) {
            Some(k) => Ok(Some(k)),
            None => Err("Idempotency-Key: must be 1-128 characters of A-Z a-z 0-9 . _ : -".into()),
        },
    }
}

/// The dedup mark of an `Idempotency-Key`, scoped to (rule, user): the same
/// key from another buyer is that buyer's own new attempt, never a replay
/// of someone else's answer or ticket. Ids hold no `/`, so `user/key` is
/// unambiguous.
fn idempotency_mark(user: &str, key: &str, ttl: std::time::Duration) -> DedupMark {
    DedupMark {
        scope: MarkScope::Rule,
        id: format!("i:{user}/{key}"),
        ttl,
    }
}

/// Answer for a store that cannot answer (fail closed).
fn store_down(e: &StoreError) -> Answer {
    tracing::debug!(error = %e, "store unavailable");
    Answer::Unavailable {
        message: "the sale is busy, please try again shortly".into(),
    }
}

impl Admission {
    /// Builds the stages of every rule of `config`; settlements that
    /// cannot reach `store` go to `journal`.
    pub fn new(
        config: &Config,
        store: Arc<dyn Store>,
        queue: Arc<dyn Queue>,
        rates: Arc<DrainRates>,
        journal: Journal,
    ) -> Self {
        let store_mode = match config.store.on_failure {
            OnFailure::PassCapped { .. } => FailureMode::PassCapped,
            OnFailure::FailClosed => FailureMode::FailClosed,
        };
        let stages: Vec<RuleStage> = config
            .rules
            .rules()
            .iter()
            .map(|rule| RuleStage {
                rule: rule.clone(),
                extractor: Extractor::new(rule),
                limits: RateLimitStage::new(&rule.rate_limits),
                leases: Leases::of(rule, config.upstream(rule.upstream), &config.store),
                on_failure: rule.on_failure.unwrap_or(store_mode),
            })
            .collect();
        Self {
            ledger: Arc::new(Ledger::new(
                store,
                stages.len(),
                config.store.result_ttl,
                journal,
            )),
            rules: config.rules.clone(),
            stages,
            pass_permits: Arc::new(Semaphore::new(config.store.pass_cap as usize)),
            loaded: std::sync::Mutex::new(Default::default()),
            queue,
            rates,
            upstream_names: config.upstreams.iter().map(|u| u.name.clone()).collect(),
        }
    }

    /// Stage 1: the rule a request matches by method and canonical path,
    /// if any, or a refusal of its spelling.
    pub fn find(&self, method: &http::Method, path: &str) -> Route<'_> {
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
        self.ledger.store()
    }

    /// The ledger holds settle through (for the drainer).
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The terms of a hold of rule `rule` (for the drainer, which takes
    /// holds back from the queue).
    pub fn terms(&self, rule: usize, qty: u32) -> Option<HoldTerms> {
        let stage = self.stages.get(rule)?;
        Some(HoldTerms {
            rule,
            qty,
            release_on: stage.rule.release_on,
            leases: stage.leases,
        })
    }

    /// Background: returns expired holds (any node's) and retries the
    /// journaled settlements.
    pub async fn settle_overdue(&self) {
        // This node's own late commits first: after an outage, sweeping
        // first would return their units only for the commits to take
        // them back.
        if !self.ledger.journal().is_empty() {
            self.ledger.retry_pending().await;
        }
        let _ = self.ledger.sweep(|name| self.rule_index(name)).await;
    }

    /// An answer as written to the client: the rule's overrides, if any,
    /// on top of the contract's defaults.
    pub fn render(&self, rule: Option<usize>, answer: &Answer) -> Rendered {
        let overrides = rule
            .and_then(|i| self.stages.get(i))
            .and_then(|s| s.rule.responses.get(answer.outcome()));
        render(answer, overrides)
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
        let idempotency = match idempotency_key(&c.parts) {
            Ok(k) => k,
            Err(message) => return Verdict::Answer(Answer::Invalid { message }),
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
        if self.ledger.flags().is_set(rule, &attempt.sku) {
            return Verdict::Answer(Answer::SoldOut);
        }
        // 6. + 7. dedup and stock, one atomic step in the store
        let key = SkuKey::new(&r.name, &attempt.sku);
        let mut marks = Vec::new();
        let mark_ttl = r.dedup.as_ref().map_or(self.ledger.result_ttl(), |d| d.ttl);
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
            marks.push(idempotency_mark(&attempt.user, k, mark_ttl));
        }
        let ticket = TicketId::random();
        let reservation = Reservation {
            key: &key,
            ticket,
            user: &attempt.user,
            qty: attempt.qty,
            marks: &marks,
            per_user_limit: r.per_user_limit.map(|n| n.get()),
            lease: stage.leases.forward,
        };
        match self.ledger.store().reserve(&reservation).await {
            Ok(Reserved::Won) => {
                let terms = HoldTerms {
                    rule,
                    qty: attempt.qty,
                    release_on: r.release_on,
                    leases: stage.leases,
                };
                Verdict::Forward(Hold::new(self.ledger.clone(), terms, key, ticket))
            }
            Ok(Reserved::SoldOut) => {
                self.ledger.flags().set(rule, &attempt.sku);
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
            Err(e) => match stage.on_failure {
                FailureMode::FailClosed => Verdict::Answer(store_down(&e)),
                FailureMode::PassCapped => match self.pass_permits.clone().try_acquire_owned() {
                    Ok(permit) => Verdict::PassCapped(permit),
                    Err(_) => Verdict::Answer(store_down(&e)),
                },
            },
        }
    }

    /// Admin: releases a ticket by id, wherever it is.
    pub async fn release_ticket(&self, ticket: TicketId) -> Result<Option<u64>, StoreError> {
        let Some(record) = self.store().ticket(ticket).await? else {
            return Ok(None);
        };
        let rule = self.rule_index(&record.key.rule).unwrap_or(usize::MAX);
        let moved = self
            .ledger
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
        let view = self.store().set_available(key, available).await?;
        if view.available > 0 {
            self.ledger.flags().clear(rule, &key.sku);
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
                    .store()
                    .available(&SkuKey::new(&stage.rule.name, &sku))
                    .await;
            }
        }
        let flags = self.ledger.flags();
        for (rule, sku) in flags.flagged() {
            let Some(stage) = self.stages.get(rule) else {
                continue;
            };
            let key = SkuKey::new(&stage.rule.name, &sku);
            match self.store().available(&key).await {
                // Stock came back; or it is gone from the store altogether
                // (Redis restarted empty): then the truth is "not loaded"
                // (`unavailable`), which only the store can tell.
                Ok(Some(0)) | Err(_) => {}
                Ok(_) => flags.clear(rule, &sku),
            }
        }
    }

    /// Background: drops rate-limit state of full buckets and the
    /// store's expired local state.
    pub fn prune(&self) {
        for s in &self.stages {
            s.limits.prune();
        }
        self.store().prune();
    }
}
