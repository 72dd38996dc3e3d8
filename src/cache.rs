//! The read cache: hot product and activity pages answered by the gateway
//! for requests that match a cache rule (`cache:` in rule files; see
//! `rules::cache`), so a flash crowd reading a page costs the mall one
//! query per key per `ttl`, not one per shopper. Also the live stock view
//! for those pages (`stock`).
//!
//! ```text
//! GET, cache rule ── bypass? (body, Authorization, session cookie) ──► backend, as sent
//!        │ key: path[?query], host, the rule's headers and cookies
//!        ▼
//!   memory tier ── fresh ──► hit (304 when the validators match)
//!        │   └──── within stale_while_revalidate ──► stale + one refresh behind
//!        ▼ miss (or older)
//!   single flight ── another fetch runs ──► wait ≤ lock_timeout ──► coalesced | bypass
//!        │ leads: one task per key
//!        ▼
//!   Redis tier (cache.redis) ── fresh ──► hit, kept in memory too
//!        ▼
//!   backend fetch ── stored | shared with the waiters | private (only this request)
//!        └── failed or 5xx ──► stale within stale_if_error, else unavailable
//! ```
//!
//! Why a gateway-level cache and not pingora-cache (both were read:
//! pingora-proxy's `proxy_cache.rs`, pingora-cache's `Storage`, `lock`):
//!
//! - pingora-cache fills an entry from the leading client's own proxied
//!   response: its cache lock ends when that client's session does, and
//!   waiters that outlive a lock retry lookups (twice by default) and then
//!   each go upstream. Here the fill is a task of its own (`fetch`, over
//!   pingora's connector like the queue drainer), so one backend fetch per
//!   key holds however clients come and go, and stale-if-error is a branch
//!   on that task's result instead of a hook on an error path.
//! - A hit here is one moka lookup and the same two writes as every
//!   gateway answer (`request_filter`, keep-alive kept); pingora-cache runs
//!   its cache state machine, hashes a `CacheKey` and streams the body from
//!   a `HitHandler` per hit. Hit throughput is what this is measured on.
//! - pingora-cache needs `&'static` storage, lock and predictor and a
//!   streaming `Storage`/`HandleHit`/`HandleMiss` implementation to put
//!   moka and Redis behind it; its stale-while-revalidate spawns a whole
//!   subrequest through our `ProxyHttp` phases. Bodies here are bounded
//!   (`max_body`, 256 KiB by default) and held whole, which makes the
//!   tiers plain values.
//! - What pingora-cache gives for free is small here: a 304 is a
//!   comparison of validators (`policy::not_modified`), `Age` a
//!   subtraction, and Range requests are answered with the whole body (RFC
//!   9110 lets a server ignore Range).
//!
//! A request no cache rule matches pays one scan of its path and no
//! allocation or lock (`rules::CacheRules::find`). Called by the proxy
//! (`proxy::cached`) and the admin API (purge, gauges).

pub mod entry;
pub mod fetch;
pub mod flight;
pub mod memory;
pub mod policy;
pub mod redis;
pub mod stats;
pub mod stock;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName};
use pingora_http::{RequestHeader, ResponseHeader};
use prometheus::IntCounter;

use crate::backend::{self, ClientHop};
use crate::config::Config;
use crate::metrics::{Metrics, UpstreamClass};
use crate::outcome::Outcome;
use crate::rules::{CacheRule, CacheRules};
use crate::store::StoreError;
use crate::upstream::Upstreams;
use crate::vocab::now_ms;
use entry::{Entry, Freshness};
use fetch::{FetchError, Fetcher};
use flight::{Flights, Join, Lead, Waited};
use memory::MemoryTier;
use policy::Verdict;
use redis::RedisTier;
pub use stats::CacheResult;
use stats::{CacheStats, RuleSeries};

/// The response header saying how the cache handled a request.
pub const CACHE_HEADER: &str = "X-Sluice-Cache";

/// Response headers never stored: they belong to one connection or are
/// written per answer.
const NOT_STORED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "age",
];

/// How a fill ended, as every request waiting on it sees it.
enum Filled {
    /// Stored (and shared): from the Redis tier or the backend.
    Stored { entry: Arc<Entry>, from_redis: bool },
    /// Not stored, but public: the waiters get it too.
    Shared(Arc<Entry>),
    /// Only the request that fetched it gets it.
    Private(Arc<Entry>),
    /// The backend failed; a stale entry stands in (`stale_if_error`).
    Stale(Arc<Entry>),
    /// The backend failed and nothing may stand in.
    Failed,
    /// Over `max_body`: everyone goes to the backend.
    TooBig,
}

/// A request a cache rule matched (the rule as it was when the request
/// started, whatever a reload does meanwhile).
#[derive(Clone)]
pub struct Matched {
    rule: Arc<CacheRule>,
    series: RuleSeries,
}

impl Matched {
    /// The rule's name (the `rule` label of the request).
    pub fn name(&self) -> &Arc<str> {
        &self.rule.name
    }

    /// Where the rule's answers come from (for a bypassed request too).
    pub fn upstream(&self) -> crate::vocab::UpstreamId {
        self.rule.upstream
    }
}

/// What to do with a matched request.
pub enum Served {
    /// Write this answer.
    Answer(CachedAnswer),
    /// Proxy it as it came, not stored.
    Bypass,
    /// The backend failed and nothing stale may stand in: 503.
    Unavailable,
}

/// An answer from the cache or from this request's own fetch.
pub struct CachedAnswer {
    entry: Arc<Entry>,
    result: CacheResult,
    outcome: Outcome,
}

impl CachedAnswer {
    /// Its outcome label (`cached`, or `passthrough` for a miss's own
    /// fetch).
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// How the cache handled it.
    pub fn result(&self) -> CacheResult {
        self.result
    }

    /// The answer to write to `req`: a 304 with the stored validators when
    /// its condition matches, else the stored answer; `Age` on all but a
    /// miss's own fetch. The body is `None` for a 304.
    pub fn render(
        &self,
        req: &RequestHeader,
    ) -> pingora_core::Result<(ResponseHeader, Option<Bytes>)> {
        let stored = &self.entry.header;
        let (mut header, body) = if policy::not_modified(req, stored) {
            let mut h = ResponseHeader::build(304, Some(policy::NOT_MODIFIED_KEEPS.len() + 3))?;
            for name in policy::NOT_MODIFIED_KEEPS {
                for v in stored.headers.get_all(name) {
                    h.append_header(name.clone(), v.clone())?;
                }
            }
            (h, None)
        } else {
            let mut h = stored.clone();
            h.insert_header(header::CONTENT_LENGTH, self.entry.body.len())?;
            (h, Some(self.entry.body.clone()))
        };
        if self.result != CacheResult::Miss {
            header.insert_header(header::AGE, self.entry.age(now_ms()).as_secs())?;
        }
        header.insert_header(CACHE_HEADER, self.result.as_str())?;
        Ok((header, body))
    }
}

/// What a purge removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Purged {
    /// Entries of this node's memory tier.
    pub memory: u64,
    /// Entries of the shared Redis tier (`None` without one).
    pub redis: Option<u64>,
}

/// The cache rules in force and their series, swapped whole by a reload.
struct CacheTable {
    rules: CacheRules,
    series: Vec<RuleSeries>,
}

impl CacheTable {
    fn new(rules: &CacheRules, stats: &CacheStats) -> Self {
        Self {
            rules: rules.clone(),
            series: rules
                .rules()
                .iter()
                .map(|r| stats.series(&r.name))
                .collect(),
        }
    }
}

struct Inner {
    table: ArcSwap<CacheTable>,
    memory: MemoryTier,
    redis: Option<RedisTier>,
    flights: Arc<Flights<String, Arc<Filled>>>,
    fetcher: Fetcher,
    upstreams: Arc<Upstreams>,
    metrics: Arc<Metrics>,
    stats: CacheStats,
    session_cookies: Vec<String>,
    /// Bumped by every purge: a fill that began before one stores nothing.
    purges: AtomicU64,
}

/// The read cache of one gateway.
pub struct ReadCache {
    inner: Arc<Inner>,
}

impl ReadCache {
    /// The cache of `config`'s cache rules, its series in `metrics`.
    pub fn new(
        config: &Config,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CacheError> {
        let stats = CacheStats::new(metrics.registry())?;
        let table = ArcSwap::from_pointee(CacheTable::new(&config.cache_rules, &stats));
        let redis = if config.cache.redis {
            Some(RedisTier::new(&config.store.redis)?)
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                table,
                memory: MemoryTier::new(config.cache.max_bytes),
                redis,
                flights: Arc::default(),
                fetcher: Fetcher::default(),
                upstreams,
                metrics,
                stats,
                session_cookies: config.cache.session_cookies.clone(),
                purges: AtomicU64::new(0),
            }),
        })
    }

    /// The cache rule a request matches, if any; allocates nothing when
    /// none does.
    pub fn find(&self, req: &RequestHeader) -> Option<Matched> {
        let table = self.inner.table.load();
        let (index, rule) = table.rules.find(&req.method, req.uri.path())?;
        Some(Matched {
            rule: rule.clone(),
            series: table.series.get(index)?.clone(),
        })
    }

    /// Whether a cache rule matches a GET of `path` (the fast lane leaves
    /// those to the proxy's read path).
    pub fn covers(&self, path: &str) -> bool {
        let table = self.inner.table.load();
        table.rules.find(&http::Method::GET, path).is_some()
    }

    /// Puts a reloaded config's cache rules in force; entries already
    /// kept stay until they expire (or are purged).
    pub fn apply(&self, config: &Config) {
        let table = CacheTable::new(&config.cache_rules, &self.inner.stats);
        self.inner.table.store(Arc::new(table));
    }

    /// Serves a matched request: from a tier, from the fetch of another
    /// request, from its own fetch, or not at all (bypass).
    pub async fn serve(&self, m: Matched, req: &RequestHeader, from: ClientHop<'_>) -> Served {
        let inner = &self.inner;
        let (series, rule) = (&m.series[..], &m.rule);
        if policy::bypass(rule, req, &inner.session_cookies).is_some() {
            return self.bypass(series);
        }
        let key = policy::key(rule, req);
        let mut stale = None;
        if let Some(entry) = inner.memory.get(&key) {
            match (entry.pass, entry.freshness(now_ms())) {
                (true, Freshness::Fresh) => return self.bypass(series),
                (true, _) => {}
                (false, Freshness::Fresh) => {
                    return self.answer(series, entry, CacheResult::Hit, Outcome::Cached)
                }
                (false, Freshness::Revalidate) => {
                    if let Join::Lead(lead) = inner.flights.join(&key) {
                        // Nobody is refreshing it yet: this request starts
                        // the one refresh and is answered stale at once.
                        self.start_fill(rule, key, req, from, Some(entry.clone()), lead);
                    }
                    return self.answer(series, entry, CacheResult::Stale, Outcome::Cached);
                }
                (false, Freshness::Stale) => stale = Some(entry),
            }
        }
        match inner.flights.join(&key) {
            Join::Follow(follower) => match follower.wait(Some(rule.lock_timeout)).await {
                Waited::Value(filled) => self.followed(series, &filled),
                // The fetch took longer than the rule waits, or ended
                // without an answer: go alone rather than hang.
                Waited::TimedOut | Waited::Abandoned => self.bypass(series),
            },
            Join::Lead(lead) => {
                let mine = lead.follower();
                if !self.start_fill(rule, key, req, from, stale, lead) {
                    return self.bypass(series);
                }
                // The fill is bounded by the Redis and upstream timeouts.
                match mine.wait(None).await {
                    Waited::Value(filled) => self.led(series, &filled),
                    Waited::TimedOut | Waited::Abandoned => self.bypass(series),
                }
            }
        }
    }

    /// Starts the fill of `key` in a task of its own; false when the
    /// request cannot be turned into a fetch (then nobody waits on it).
    fn start_fill(
        &self,
        rule: &Arc<CacheRule>,
        key: String,
        req: &RequestHeader,
        from: ClientHop<'_>,
        stale: Option<Arc<Entry>>,
        lead: Lead<String, Arc<Filled>>,
    ) -> bool {
        let request = match policy::fetch_request(rule, req)
            .and_then(|mut r| backend::present(&mut r, from, None, None).map(|()| r))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot build a cache fetch");
                return false;
            }
        };
        let inner = self.inner.clone();
        let rule = rule.clone();
        let generation = inner.purges.load(Ordering::Acquire);
        tokio::spawn(async move {
            let filled = inner.fill(&rule, &key, &request, stale, generation).await;
            lead.finish(Arc::new(filled));
        });
        true
    }

    fn answer(
        &self,
        series: &[IntCounter],
        entry: Arc<Entry>,
        result: CacheResult,
        outcome: Outcome,
    ) -> Served {
        CacheStats::count(series, result);
        Served::Answer(CachedAnswer {
            entry,
            result,
            outcome,
        })
    }

    fn bypass(&self, series: &[IntCounter]) -> Served {
        CacheStats::count(series, CacheResult::Bypass);
        Served::Bypass
    }

    /// What the request that led the fill gets.
    fn led(&self, series: &[IntCounter], filled: &Filled) -> Served {
        match filled {
            Filled::Stored {
                entry,
                from_redis: true,
            } => self.answer(series, entry.clone(), CacheResult::Hit, Outcome::Cached),
            Filled::Stored { entry, .. } | Filled::Shared(entry) | Filled::Private(entry) => self
                .answer(
                    series,
                    entry.clone(),
                    CacheResult::Miss,
                    Outcome::Passthrough,
                ),
            Filled::Stale(entry) => {
                self.answer(series, entry.clone(), CacheResult::Stale, Outcome::Cached)
            }
            Filled::Failed => {
                CacheStats::count(series, CacheResult::Miss);
                Served::Unavailable
            }
            Filled::TooBig => self.bypass(series),
        }
    }

    /// What a request that waited on another's fill gets.
    fn followed(&self, series: &[IntCounter], filled: &Filled) -> Served {
        match filled {
            Filled::Stored { entry, .. } | Filled::Shared(entry) => self.answer(
                series,
                entry.clone(),
                CacheResult::Coalesced,
                Outcome::Cached,
            ),
            Filled::Stale(entry) => {
                self.answer(series, entry.clone(), CacheResult::Stale, Outcome::Cached)
            }
            Filled::Failed => {
                CacheStats::count(series, CacheResult::Coalesced);
                Served::Unavailable
            }
            // Someone else's personal answer is never served: go alone.
            Filled::Private(_) | Filled::TooBig => self.bypass(series),
        }
    }

    /// Purges every entry whose path starts with `prefix`: this node's
    /// memory and the shared Redis tier.
    pub async fn purge(&self, prefix: &str) -> Result<Purged, StoreError> {
        self.inner.purges.fetch_add(1, Ordering::AcqRel);
        let memory = self.inner.memory.purge(prefix);
        let redis = match &self.inner.redis {
            Some(r) => Some(r.purge(prefix).await?),
            None => None,
        };
        Ok(Purged { memory, redis })
    }

    /// Publishes `sluice_cache_bytes` and `sluice_cache_entries` (called
    /// when `/metrics` is scraped).
    pub fn publish_size(&self) {
        let (bytes, entries) = self.inner.memory.size();
        self.inner.stats.set_size(bytes, entries);
    }
}

impl Inner {
    /// The fill of one key: the Redis tier, then the backend.
    async fn fill(
        self: &Arc<Self>,
        rule: &Arc<CacheRule>,
        key: &str,
        request: &RequestHeader,
        mut stale: Option<Arc<Entry>>,
        generation: u64,
    ) -> Filled {
        if let Some(redis) = &self.redis {
            if let Some(found) = redis.get(key).await {
                let found = Arc::new(found);
                if found.freshness(now_ms()) == Freshness::Fresh {
                    self.memory.insert(key, found.clone());
                    return Filled::Stored {
                        entry: found,
                        from_redis: true,
                    };
                }
                if stale.as_ref().is_none_or(|s| s.born_ms < found.born_ms) {
                    stale = Some(found);
                }
            }
        }
        let on_error = || {
            stale
                .clone()
                .filter(|s| s.serves_on_error(now_ms()))
                .map_or(Filled::Failed, Filled::Stale)
        };
        let pool = self.upstreams.pool(rule.upstream);
        let upstream = pool.name();
        let fetched = match self.fetcher.fetch(pool, request, rule.max_body).await {
            Ok(f) => f,
            Err(FetchError::TooBig) => {
                self.metrics
                    .observe_upstream(upstream, UpstreamClass::Success);
                if let Ok(marker) = pass_marker(rule, request) {
                    self.memory.insert(key, Arc::new(marker));
                }
                return Filled::TooBig;
            }
            Err(FetchError::Failed(end)) => {
                tracing::debug!(?end, upstream = %upstream, "cache fetch failed");
                self.metrics
                    .observe_upstream(upstream, UpstreamClass::Error);
                return on_error();
            }
        };
        let status = fetched.header.status.as_u16();
        self.metrics
            .observe_upstream(upstream, UpstreamClass::of_status(status));
        if status >= 500 {
            if let filled @ Filled::Stale(_) = on_error() {
                return filled;
            }
        }
        let verdict = policy::judge(rule, &fetched.header);
        let entry = match entry_of(rule, request.uri.path(), fetched, verdict) {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::debug!(error = %e, "cache: unusable backend answer");
                return on_error();
            }
        };
        match verdict {
            Verdict::Store { .. } => {
                // A purge since the fetch began may have meant this very
                // answer: serve it to the waiters, keep none of it.
                if self.purges.load(Ordering::Acquire) == generation {
                    self.memory.insert(key, entry.clone());
                    if self.redis.is_some() {
                        let (inner, key, entry) = (self.clone(), key.to_string(), entry.clone());
                        tokio::spawn(async move {
                            if let Some(redis) = &inner.redis {
                                redis.set(&key, &entry).await;
                            }
                        });
                    }
                }
                Filled::Stored {
                    entry,
                    from_redis: false,
                }
            }
            Verdict::Share => Filled::Shared(entry),
            Verdict::Private => Filled::Private(entry),
        }
    }
}

/// A stored form of a fetched answer: the headers worth replaying, the
/// windows its verdict allows.
fn entry_of(
    rule: &CacheRule,
    path: &str,
    fetched: fetch::Fetched,
    verdict: Verdict,
) -> pingora_core::Result<Entry> {
    let upstream = fetched.header;
    let named_by_connection: Vec<String> = upstream
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut header = ResponseHeader::build(upstream.status, Some(upstream.headers.len()))?;
    for (name, value) in &upstream.headers {
        let n = name.as_str();
        let dropped = NOT_STORED.contains(&n)
            || n.starts_with(backend::SLUICE_HEADER_PREFIX)
            || named_by_connection.iter().any(|c| c == n);
        if !dropped {
            header.append_header(HeaderName::clone(name), value.clone())?;
        }
    }
    let (fresh_for, initial_age, stale_ok) = match verdict {
        Verdict::Store {
            fresh_for,
            initial_age,
            stale_ok,
        } => (fresh_for, initial_age, stale_ok),
        Verdict::Share | Verdict::Private => (Duration::ZERO, Duration::ZERO, false),
    };
    let window = |d: Duration| if stale_ok { d } else { Duration::ZERO };
    let age_ms = u64::try_from(initial_age.as_millis()).unwrap_or(u64::MAX);
    Ok(Entry {
        path: path.into(),
        header,
        body: fetched.body,
        born_ms: now_ms().saturating_sub(age_ms),
        fresh_for,
        stale_while_revalidate: window(rule.stale_while_revalidate),
        stale_if_error: window(rule.stale_if_error),
        pass: false,
    })
}

/// A marker that a key's answers are over `max_body`: its requests go to
/// the backend directly (streamed) for one `ttl`, instead of each paying
/// a fetch that is thrown away.
fn pass_marker(rule: &CacheRule, request: &RequestHeader) -> pingora_core::Result<Entry> {
    Ok(Entry {
        path: request.uri.path().into(),
        header: ResponseHeader::build(200, Some(0))?,
        body: Bytes::new(),
        born_ms: now_ms(),
        fresh_for: rule.ttl,
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        pass: true,
    })
}

/// Why the cache could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Its metrics could not be registered.
    #[error("cache metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Its Redis tier could not be made (a bad URL).
    #[error("cache redis tier: {0}")]
    Redis(#[from] StoreError),
}
