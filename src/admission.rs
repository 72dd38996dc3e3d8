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

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, OnFailure};
use crate::outcome::{render, Answer, Outcome, Rendered};
use crate::queue::rates::DrainRates;
use crate::queue::Queue;
use crate::rules::{FailureMode, Route, Rule, RuleSet};
use crate::store::{DedupMark, MarkScope, Reservation, Reserved, StockView, Store, StoreError};
use crate::vocab::{valid_id, ReleaseReason, SkuKey, TicketId};
use extract::{Attempt, Extractor, RequestParts};
use hold::{Hold, HoldTerms, Leases, Ledger};
use journal::Journal;
use ratelimit::RateLimitStage;

/// The header a client may send to make retries of one attempt idempotent.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// [`IDEMPOTENCY_HEADER`] parsed once: a lookup by `&str` parses the name
/// again on every rule request (2% of a sold_out answer, callgrind).
static IDEMPOTENCY_NAME: http::HeaderName = http::HeaderName::from_static(IDEMPOTENCY_HEADER);

/// Kept backend answers are cut at this size: they are replayed to
/// duplicates, not archived.
pub const MAX_KEPT_BODY: usize = 64 << 10;

/// A rule and the per-rule machinery built from it.
pub struct RuleStage {
    /// The rule.
    pub rule: Arc<Rule>,
    extractor: Extractor,
    /// Its token buckets: kept across a reload that keeps its limits.
    limits: Arc<RateLimitStage>,
    /// How long its holds may stay unsettled.
    pub leases: Leases,
    /// What it does while the store is down (its own, or the store's).
    on_failure: FailureMode,
    /// Its `sold_out` and `ended` answers, rendered once: the answers most
    /// of a sale's crowd gets, written without building a body each time.
    sold_out: Rendered,
    ended: Rendered,
}

impl RuleStage {
    /// The stage of `rule` under `config`, taking over `old`'s token
    /// buckets when its rate limits are the same.
    fn build(rule: &Arc<Rule>, config: &Config, old: Option<&RuleStage>) -> Self {
        let store_mode = match config.store.on_failure {
            OnFailure::PassCapped { .. } => FailureMode::PassCapped,
            OnFailure::FailClosed => FailureMode::FailClosed,
        };
        let limits = match old {
            Some(o) if o.rule.rate_limits == rule.rate_limits => o.limits.clone(),
            _ => Arc::new(RateLimitStage::new(&rule.rate_limits)),
        };
        Self {
            rule: rule.clone(),
            extractor: Extractor::new(rule),
            limits,
            leases: Leases::of(rule, config.upstream(rule.upstream), &config.store),
            on_failure: rule.on_failure.unwrap_or(store_mode),
            sold_out: render(&Answer::SoldOut, rule.responses.get(Outcome::SoldOut)),
            ended: render(&Answer::Ended, rule.responses.get(Outcome::Ended)),
        }
    }

    /// Whether this stage would be built the same from `other`.
    fn same_as(&self, other: &RuleStage) -> bool {
        self.rule == other.rule
            && self.leases == other.leases
            && self.on_failure == other.on_failure
    }
}

/// The rules in force and their stages, swapped whole by a reload: a
/// request keeps the stage it started with.
pub struct RuleTable {
    set: RuleSet,
    stages: Vec<Arc<RuleStage>>,
}

impl RuleTable {
    /// Stage 1: the rule a request matches by method and canonical path,
    /// if any, or a refusal of its spelling.
    pub fn find(&self, method: &http::Method, path: &str) -> Route<'_> {
        self.set.find(method, path)
    }

    /// Whether some rule is for exactly this method ([`RuleSet::has_method`]).
    pub fn has_method(&self, method: &[u8]) -> bool {
        self.set.has_method(method)
    }

    /// The stage of the rule at `index` (as [`RuleTable::find`] gives it).
    pub fn stage(&self, index: usize) -> Option<&Arc<RuleStage>> {
        self.stages.get(index)
    }

    /// The stage of the rule named `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<RuleStage>> {
        self.stages.iter().find(|s| &*s.rule.name == name)
    }

    /// Every stage, in rule order.
    pub fn stages(&self) -> &[Arc<RuleStage>] {
        &self.stages
    }
}

/// What a reload changed in the rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RulesChanged {
    /// Rules new in this config.
    pub added: Vec<String>,
    /// Rules whose definition changed (their token buckets are kept when
    /// their rate limits did not change).
    pub changed: Vec<String>,
    /// Rules gone.
    pub removed: Vec<String>,
    /// Rules kept as they were, state and all.
    pub unchanged: Vec<String>,
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
    table: ArcSwap<RuleTable>,
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
    loaded: std::sync::Mutex<std::collections::BTreeSet<SkuKey>>,
}

/// The client's `Idempotency-Key`, if it sent one; `Err` is the
/// `invalid` message (a malformed key, or two of them).
fn idempotency_key<'a>(parts: &RequestParts<'a>) -> Result<Option<&'a str>, String> {
    let mut keys = parts.headers.get_all(&IDEMPOTENCY_NAME).iter();
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
        let stages = config
            .rules
            .rules()
            .iter()
            .map(|rule| Arc::new(RuleStage::build(rule, config, None)))
            .collect();
        Self {
            ledger: Arc::new(Ledger::new(store, config.store.result_ttl, journal)),
            table: ArcSwap::from_pointee(RuleTable {
                set: config.rules.clone(),
                stages,
            }),
            pass_permits: Arc::new(Semaphore::new(config.store.pass_cap as usize)),
            loaded: std::sync::Mutex::new(Default::default()),
            queue,
            rates,
            upstream_names: config.upstreams.iter().map(|u| u.name.clone()).collect(),
        }
    }

    /// The rules in force now (a request keeps the table it started
    /// with).
    pub fn rules(&self) -> Arc<RuleTable> {
        self.table.load_full()
    }

    /// The stage of the rule named `name` now.
    pub fn stage_named(&self, name: &str) -> Option<Arc<RuleStage>> {
        self.table.load().named(name).cloned()
    }

    /// Puts the rules of `config` in force: stages of rules that did not
    /// change are kept (token buckets, sold-out flags and all), changed
    /// ones are built anew (keeping their buckets when their rate limits
    /// are the same), removed ones stop matching and their flags go.
    /// Requests under way finish with the stages they started with.
    pub fn apply(&self, config: &Config) -> RulesChanged {
        let old = self.table.load_full();
        let mut changed = RulesChanged::default();
        let stages: Vec<Arc<RuleStage>> = config
            .rules
            .rules()
            .iter()
            .map(|rule| {
                let before = old.named(&rule.name);
                let fresh = RuleStage::build(rule, config, before.map(|s| &**s));
                match before {
                    Some(b) if b.same_as(&fresh) => {
                        changed.unchanged.push(rule.name.to_string());
                        b.clone()
                    }
                    Some(_) => {
                        changed.changed.push(rule.name.to_string());
                        Arc::new(fresh)
                    }
                    None => {
                        changed.added.push(rule.name.to_string());
                        Arc::new(fresh)
                    }
                }
            })
            .collect();
        for gone in old.stages() {
            if !stages.iter().any(|s| s.rule.name == gone.rule.name) {
                changed.removed.push(gone.rule.name.to_string());
                self.ledger.flags().forget_rule(&gone.rule.name);
                if let Ok(mut loaded) = self.loaded.lock() {
                    loaded.retain(|k| k.rule != gone.rule.name);
                }
            }
        }
        self.table.store(Arc::new(RuleTable {
            set: config.rules.clone(),
            stages,
        }));
        changed
    }

    /// The store (for the admin API and ticket polls).
    pub fn store(&self) -> &Arc<dyn Store> {
        self.ledger.store()
    }

    /// The ledger holds settle through (for the drainer).
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The terms of a hold of `stage`'s rule (for the drainer, which
    /// takes holds back from the queue).
    pub fn terms(stage: &RuleStage, qty: u32) -> HoldTerms {
        HoldTerms {
            qty,
            release_on: stage.rule.release_on,
            leases: stage.leases,
        }
    }

    /// Background: returns expired holds (any node's) and retries the
    /// journaled settlements.
    pub async fn settle_overdue(&self) {
        // After an upgrade, the old process's journal once it has exited.
        self.ledger.journal().adopt().await;
        // This node's own late commits first: after an outage, sweeping
        // first would return their units only for the commits to take
        // them back.
        if !self.ledger.journal().is_empty() {
            self.ledger.retry_pending().await;
        }
        let _ = self.ledger.sweep().await;
    }

    /// An answer as written to the client: the rule's overrides, if any,
    /// on top of the contract's defaults.
    pub fn render<'s>(stage: Option<&'s RuleStage>, answer: &Answer) -> Cow<'s, Rendered> {
        match (stage, answer) {
            (Some(s), Answer::SoldOut) => Cow::Borrowed(&s.sold_out),
            (Some(s), Answer::Ended) => Cow::Borrowed(&s.ended),
            _ => {
                let overrides = stage.and_then(|s| s.rule.responses.get(answer.outcome()));
                Cow::Owned(render(answer, overrides))
            }
        }
    }

    /// Stages 2-7 for a request that matched `stage`'s rule.
    pub async fn admit(&self, stage: &RuleStage, c: &Candidate<'_>) -> Verdict {
        self.admit_seen(stage, c).await.0
    }

    /// [`Admission::admit`], also giving back who asked for what (the
    /// extracted attempt, for the access log), once stage 2 got it.
    pub async fn admit_seen(
        &self,
        stage: &RuleStage,
        c: &Candidate<'_>,
    ) -> (Verdict, Option<Attempt>) {
        // 2. extract
        match stage.extractor.extract(&c.parts) {
            Ok(attempt) => (self.judge(stage, &attempt, c).await, Some(attempt)),
            Err(message) => (Verdict::Answer(Answer::Invalid { message }), None),
        }
    }

    /// Stages 3-7 for an extracted attempt.
    async fn judge(&self, stage: &RuleStage, attempt: &Attempt, c: &Candidate<'_>) -> Verdict {
        let r = &stage.rule;
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
        if self.ledger.flags().is_set(&r.name, &attempt.sku) {
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
                let terms = Self::terms(stage, attempt.qty);
                Verdict::Forward(Hold::new(self.ledger.clone(), terms, key, ticket))
            }
            Ok(Reserved::SoldOut) => {
                self.ledger.flags().set(&r.name, &attempt.sku);
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
        let moved = self
            .ledger
            .release(&record.key, ticket, ReleaseReason::Admin)
            .await?;
        Ok(Some(moved))
    }

    /// Admin: sets the available units and clears the flag when positive.
    pub async fn restock(&self, key: &SkuKey, available: u64) -> Result<StockView, StoreError> {
        let view = self.store().set_available(key, available).await?;
        if view.available > 0 {
            self.ledger.flags().clear(&key.rule, &key.sku);
        }
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert(key.clone());
        }
        Ok(view)
    }

    /// Background: clears flags of skus whose stock came back through
    /// another node, and prunes rate-limit state.
    pub async fn housekeeping(&self) {
        // Reading availability refreshes `sluice_stock_available` (the
        // instrumented store sets it).
        let loaded: Vec<SkuKey> = self
            .loaded
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        for key in loaded {
            let _ = self.store().available(&key).await;
        }
        let flags = self.ledger.flags();
        for (rule, sku) in flags.flagged() {
            let key = SkuKey::new(&rule, &sku);
            match self.store().available(&key).await {
                // Stock came back; or it is gone from the store altogether
                // (Redis restarted empty): then the truth is "not loaded"
                // (`unavailable`), which only the store can tell.
                Ok(Some(0)) | Err(_) => {}
                Ok(_) => flags.clear(&rule, &sku),
            }
        }
    }

    /// Background: drops rate-limit state of full buckets and the
    /// store's expired local state.
    pub fn prune(&self) {
        for s in self.table.load().stages() {
            s.limits.prune();
        }
        self.store().prune();
    }
}
