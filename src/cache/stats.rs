//! The read cache's metrics, registered in the gateway's registry:
//! `sluice_cache_requests_total{rule,result}` (every series of every
//! cache rule made at 0 on start and resolved once, so counting a hit
//! hashes nothing), `sluice_cache_bytes` and `sluice_cache_entries`
//! (the memory tier, refreshed when `/metrics` is scraped).

use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// How the cache handled a request (`result` label; `X-Sluice-Cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// Fresh from a tier (memory, or Redis), or a 304 from it.
    Hit,
    /// Fetched from the backend for this request.
    Miss,
    /// A stale answer: while one refresh runs, or while the backend fails.
    Stale,
    /// The answer of another request's fetch, waited for.
    Coalesced,
    /// Not answerable from the cache; sent to the backend as it came.
    Bypass,
}

impl CacheResult {
    /// Every result, in label order.
    pub const ALL: [CacheResult; 5] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Stale,
        CacheResult::Coalesced,
        CacheResult::Bypass,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Bypass => "bypass",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The cache's series.
pub struct CacheStats {
    requests: IntCounterVec,
    bytes: IntGauge,
    entries: IntGauge,
}

/// The `sluice_cache_requests_total` series of one cache rule, by result.
pub type RuleSeries = Arc<[IntCounter]>;

impl CacheStats {
    /// Registers the cache's series in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "sluice_cache_requests_total",
                "Requests a cache rule matched, by how the read cache handled them.",
            ),
            &["rule", "result"],
        )?;
        let bytes = IntGauge::new(
            "sluice_cache_bytes",
            "Bytes held by the memory tier of the read cache (bodies, headers, keys, overhead).",
        )?;
        let entries = IntGauge::new(
            "sluice_cache_entries",
            "Entries held by the memory tier of the read cache.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(entries.clone()))?;
        Ok(Self {
            requests,
            bytes,
            entries,
        })
    }

    /// The series of the cache rule named `rule`, created at 0, resolved
    /// once so the hot path does no hashing.
    pub fn series(&self, rule: &str) -> RuleSeries {
        CacheResult::ALL
            .iter()
            .map(|r| self.requests.with_label_values(&[rule, r.as_str()]))
            .collect()
    }

    /// Counts one request of a cache rule.
    pub fn count(series: &[IntCounter], result: CacheResult) {
        if let Some(c) = series.get(result.index()) {
            c.inc();
        }
    }

    /// Publishes the memory tier's size.
    pub fn set_size(&self, bytes: u64, entries: u64) {
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
    }
}
