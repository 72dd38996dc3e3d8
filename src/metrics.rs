//! Prometheus metrics owned by one gateway instance (no global registry,
//! so tests can build independent gateways). Label values come from config
//! (rule and upstream names) or from closed enums, never from requests;
//! series known from config are created at zero on start-up. The
//! operator's series (process, build, health, reloads) are in `ops`.

mod ops;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::outcome::Outcome;
use crate::vocab::{ReleaseReason, StoreOp};

/// Buckets for store round trips: tens of microseconds to the timeout.
const STORE_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The `rule` label of requests no rule matched.
pub const NO_RULE: &str = "none";

/// Buckets for gateway latency: sub-millisecond refusals up to backend
/// timeouts.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Class of an upstream answer (`class` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamClass {
    /// 1xx
    Informational,
    /// 2xx
    Success,
    /// 3xx
    Redirect,
    /// 4xx
    ClientError,
    /// 5xx
    ServerError,
    /// No HTTP answer: connect error, timeout, reset.
    Error,
}

impl UpstreamClass {
    /// Every class, for pre-registration.
    pub const ALL: [UpstreamClass; 6] = [
        UpstreamClass::Informational,
        UpstreamClass::Success,
        UpstreamClass::Redirect,
        UpstreamClass::ClientError,
        UpstreamClass::ServerError,
        UpstreamClass::Error,
    ];

    /// The class of a status code.
    pub fn of_status(status: u16) -> Self {
        match status {
            100..=199 => UpstreamClass::Informational,
            200..=299 => UpstreamClass::Success,
            300..=399 => UpstreamClass::Redirect,
            400..=499 => UpstreamClass::ClientError,
            _ => UpstreamClass::ServerError,
        }
    }

    /// Its position in [`Self::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            UpstreamClass::Informational => "1xx",
            UpstreamClass::Success => "2xx",
            UpstreamClass::Redirect => "3xx",
            UpstreamClass::ClientError => "4xx",
            UpstreamClass::ServerError => "5xx",
            UpstreamClass::Error => "error",
        }
    }
}

/// Series of one rule label, resolved once so the hot path does no hashing.
struct RuleSeries {
    requests: Vec<IntCounter>,
    durations: Vec<Histogram>,
}

impl RuleSeries {
    /// Resolves `rule`'s series, one per outcome (in `Outcome::ALL` order).
    fn of(rule: &str, requests: &IntCounterVec, durations: &HistogramVec) -> Self {
        Self {
            requests: Outcome::ALL
                .iter()
                .map(|o| requests.with_label_values(&[rule, o.as_str()]))
                .collect(),
            durations: Outcome::ALL
                .iter()
                .map(|o| durations.with_label_values(&[rule, o.as_str()]))
                .collect(),
        }
    }

    fn observe(&self, outcome: Outcome, elapsed: Duration) {
        let i = outcome_index(outcome);
        self.requests[i].inc();
        self.durations[i].observe(elapsed.as_secs_f64());
    }
}

/// The labelled series looked up by name on every request, resolved once:
/// a `with_label_values` hashes its labels and takes a lock each time. A
/// short list scanned by name costs less than that hash for the handful of
/// rules and upstreams a gateway has (rules only ever join it, as their
/// series stay in the registry; a gateway with hundreds would want a map).
struct Resolved<T> {
    entries: Vec<(Arc<str>, T)>,
}

impl<T> Resolved<T> {
    fn get(&self, name: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, t)| t)
    }
}

/// All metrics of a gateway.
pub struct Metrics {
    registry: Registry,
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    upstream_responses: IntCounterVec,
    unmatched: RuleSeries,
    /// Each known rule's series (a reload that adds a rule adds its own).
    rules: ArcSwap<Resolved<Arc<RuleSeries>>>,
    /// Each upstream's answer counters, by class (the set of upstreams
    /// never changes without a restart).
    upstreams: Resolved<Vec<IntCounter>>,
    store_errors: IntCounterVec,
    store_duration: HistogramVec,
    released: IntCounterVec,
    stock_available: IntGaugeVec,
    upstream_inflight: IntGaugeVec,
    queue_depth: IntGaugeVec,
    queue_wait: HistogramVec,
    oversold: IntCounterVec,
    settlements_pending: IntGauge,
    /// Server health, `max_inflight`, store reachability, sold-out flags.
    ops: ops::OpsSeries,
    /// `sluice_config_reloads_total{result}`: reloads by result, `ok` or
    /// `rejected` (both start at 0).
    pub config_reloads: IntCounterVec,
    /// `sluice_access_log_dropped_total`: access-log lines dropped because
    /// the writer fell behind.
    pub access_log_dropped: IntCounter,
}

/// The `result` label values of `sluice_config_reloads_total`.
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "rejected"];

fn outcome_index(o: Outcome) -> usize {
    Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0)
}

impl Metrics {
    /// Registers every metric and creates the series known from config.
    pub fn new<'a>(
        rules: impl IntoIterator<Item = &'a str>,
        upstreams: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new("sluice_requests_total", "Requests by rule and outcome."),
            &["rule", "outcome"],
        )?;
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "sluice_request_duration_seconds",
                "Time from request start to the end of the answer, by rule and outcome.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["rule", "outcome"],
        )?;
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "sluice_upstream_responses_total",
                "Upstream answers by status class; `error` when no answer came.",
            ),
            &["upstream", "class"],
        )?;
        let store_errors = IntCounterVec::new(
            Opts::new(
                "sluice_store_errors_total",
                "Store operations that failed or timed out.",
            ),
            &["op"],
        )?;
        let store_duration = HistogramVec::new(
            HistogramOpts::new("sluice_store_duration_seconds", "Store operation latency.")
                .buckets(STORE_BUCKETS.to_vec()),
            &["op"],
        )?;
        let released = IntCounterVec::new(
            Opts::new(
                "sluice_released_total",
                "Units returned to stock, by rule and reason.",
            ),
            &["rule", "reason"],
        )?;
        let stock_available = IntGaugeVec::new(
            Opts::new(
                "sluice_stock_available",
                "Available units of skus an operator loaded, as last seen by this node.",
            ),
            &["rule", "sku"],
        )?;
        let upstream_inflight = IntGaugeVec::new(
            Opts::new(
                "sluice_upstream_inflight",
                "Admitted requests at the upstream now, on this node (capped by max_inflight).",
            ),
            &["upstream"],
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "sluice_queue_depth",
                "Queued winners waiting or being sent, as last seen.",
            ),
            &["upstream"],
        )?;
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "sluice_queue_wait_seconds",
                "Time from queueing to the gateway sending the request to the backend.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["upstream"],
        )?;
        let oversold = IntCounterVec::new(
            Opts::new(
                "sluice_oversold_total",
                "Units a late commit could not take back from stock (the backend placed \
                 an order after its hold had been released and the units resold): run \
                 sluice reconcile.",
            ),
            &["rule"],
        )?;
        let settlements_pending = IntGauge::new(
            "sluice_settlements_pending",
            "Commits and releases that could not reach the store, kept in the journal \
             and retried until they land.",
        )?;
        registry.register(Box::new(oversold.clone()))?;
        registry.register(Box::new(settlements_pending.clone()))?;
        registry.register(Box::new(upstream_inflight.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(queue_wait.clone()))?;
        registry.register(Box::new(store_errors.clone()))?;
        registry.register(Box::new(store_duration.clone()))?;
        registry.register(Box::new(released.clone()))?;
        registry.register(Box::new(stock_available.clone()))?;
        for op in StoreOp::ALL {
            store_errors.with_label_values(&[op.as_str()]);
            store_duration.with_label_values(&[op.as_str()]);
        }
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_responses.clone()))?;
        let unmatched = RuleSeries::of(NO_RULE, &requests_total, &request_duration);
        let mut upstream_series = Vec::new();
        for upstream in upstreams {
            upstream_inflight.with_label_values(&[upstream]);
            queue_depth.with_label_values(&[upstream]);
            queue_wait.with_label_values(&[upstream]);
            let responses = UpstreamClass::ALL
                .iter()
                .map(|class| upstream_responses.with_label_values(&[upstream, class.as_str()]))
                .collect();
            upstream_series.push((Arc::from(upstream), responses));
        }
        let (ops, config_reloads, access_log_dropped) = ops::OpsSeries::register(&registry)?;
        let metrics = Self {
            registry,
            requests_total,
            request_duration,
            upstream_responses,
            unmatched,
            rules: ArcSwap::from_pointee(Resolved {
                entries: Vec::new(),
            }),
            upstreams: Resolved {
                entries: upstream_series,
            },
            store_errors,
            store_duration,
            released,
            stock_available,
            upstream_inflight,
            queue_depth,
            queue_wait,
            oversold,
            settlements_pending,
            ops,
            config_reloads,
            access_log_dropped,
        };
        for rule in rules {
            metrics.add_rule(rule);
        }
        Ok(metrics)
    }

    /// Creates the series of a rule at 0 (at start, and for a rule a
    /// reload adds), so dashboards see it before its first request.
    pub fn add_rule(&self, rule: &str) {
        if self.rules.load().get(rule).is_none() {
            let series = Arc::new(RuleSeries::of(
                rule,
                &self.requests_total,
                &self.request_duration,
            ));
            self.rules.rcu(|old| {
                let mut entries = old.entries.clone();
                if !entries.iter().any(|(n, _)| &**n == rule) {
                    entries.push((Arc::from(rule), series.clone()));
                }
                Resolved { entries }
            });
        }
        self.oversold.with_label_values(&[rule]);
        for reason in ReleaseReason::ALL {
            self.released.with_label_values(&[rule, reason.as_str()]);
        }
    }

    /// The counter of dropped access-log lines (moved by the access log).
    pub fn access_log_dropped(&self) -> IntCounter {
        self.access_log_dropped.clone()
    }

    /// Counts units a late commit could not take back.
    pub fn observe_oversold(&self, rule: &str, units: u32) {
        self.oversold
            .with_label_values(&[rule])
            .inc_by(u64::from(units));
    }

    /// Sets the number of settlements waiting in the journal.
    pub fn set_settlements_pending(&self, n: usize) {
        self.settlements_pending
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The in-flight gauge of an upstream (moved by its slot guards).
    pub fn upstream_inflight(&self, upstream: &str) -> IntGauge {
        self.upstream_inflight.with_label_values(&[upstream])
    }

    /// Sets the queue depth gauge of an upstream.
    pub fn set_queue_depth(&self, upstream: &str, depth: u64) {
        self.queue_depth
            .with_label_values(&[upstream])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Observes how long a queued request waited.
    pub fn observe_queue_wait(&self, upstream: &str, waited: Duration) {
        self.queue_wait
            .with_label_values(&[upstream])
            .observe(waited.as_secs_f64());
    }

    /// Times one store operation; counts it as an error when it failed.
    pub fn observe_store(&self, op: StoreOp, elapsed: Duration, ok: bool) {
        self.store_duration
            .with_label_values(&[op.as_str()])
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.store_errors.with_label_values(&[op.as_str()]).inc();
        }
    }

    /// Counts units returned to stock.
    pub fn observe_released(&self, rule: &str, reason: ReleaseReason, units: u64) {
        self.released
            .with_label_values(&[rule, reason.as_str()])
            .inc_by(units);
    }

    /// Sets the available-units gauge of a loaded sku (labels from admin
    /// actions, never from shopper requests).
    pub fn set_stock_available(&self, rule: &str, sku: &str, available: u64) {
        self.stock_available
            .with_label_values(&[rule, sku])
            .set(i64::try_from(available).unwrap_or(i64::MAX));
    }

    /// Counts one finished request and its duration.
    pub fn observe_request(&self, rule: Option<&str>, outcome: Outcome, elapsed: Duration) {
        let Some(rule) = rule else {
            self.unmatched.observe(outcome, elapsed);
            return;
        };
        if let Some(series) = self.rules.load().get(rule) {
            series.observe(outcome, elapsed);
            return;
        }
        // A rule no one registered (never in the gateway; tests may).
        let labels = [rule, outcome.as_str()];
        self.requests_total.with_label_values(&labels).inc();
        self.request_duration
            .with_label_values(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one upstream answer (or failure to answer).
    pub fn observe_upstream(&self, upstream: &str, class: UpstreamClass) {
        match self.upstreams.get(upstream) {
            Some(by_class) => by_class[class.index()].inc(),
            None => self
                .upstream_responses
                .with_label_values(&[upstream, class.as_str()])
                .inc(),
        }
    }

    /// The registry, for subsystems that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of everything.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for I/O reasons; a malformed
        // family would be a bug in registration, so an empty page is fine.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_from_config_start_at_zero() {
        let m = Metrics::new(["phone"], ["mall"]).expect("metrics");
        let text = String::from_utf8(m.encode()).expect("utf8");
        assert!(text.contains(r#"sluice_requests_total{outcome="sold_out",rule="phone"} 0"#));
        assert!(text.contains(r#"sluice_requests_total{outcome="passthrough",rule="none"} 0"#));
        assert!(text.contains(r#"sluice_upstream_responses_total{class="5xx",upstream="mall"} 0"#));
    }

    #[test]
    fn class_index_is_its_place_in_all() {
        for (i, class) in UpstreamClass::ALL.into_iter().enumerate() {
            assert_eq!(class.index(), i, "{class:?}");
        }
    }

    #[test]
    fn resolved_series_are_the_exposed_ones() {
        let m = Metrics::new(["phone"], ["mall", "shop"]).expect("metrics");
        m.add_rule("added");
        m.add_rule("added");
        m.observe_request(Some("phone"), Outcome::Forwarded, Duration::from_millis(2));
        m.observe_request(Some("added"), Outcome::Queued, Duration::from_millis(2));
        m.observe_request(Some("added"), Outcome::Queued, Duration::from_millis(2));
        m.observe_upstream("shop", UpstreamClass::Error);
        m.observe_upstream("mall", UpstreamClass::of_status(503));
        let text = String::from_utf8(m.encode()).expect("utf8");
        for line in [
            r#"sluice_requests_total{outcome="forwarded",rule="phone"} 1"#,
            r#"sluice_requests_total{outcome="queued",rule="added"} 2"#,
            r#"sluice_request_duration_seconds_count{outcome="queued",rule="added"} 2"#,
            r#"sluice_upstream_responses_total{class="error",upstream="shop"} 1"#,
            r#"sluice_upstream_responses_total{class="5xx",upstream="mall"} 1"#,
            r#"sluice_upstream_responses_total{class="5xx",upstream="shop"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn observations_count() {
        let m = Metrics::new([], ["mall"]).expect("metrics");
        m.observe_request(None, Outcome::Passthrough, Duration::from_millis(3));
        m.observe_request(Some("phone"), Outcome::SoldOut, Duration::from_millis(1));
        m.observe_upstream("mall", UpstreamClass::of_status(204));
        let text = String::from_utf8(m.encode()).expect("utf8");
        assert!(text.contains(r#"sluice_requests_total{outcome="passthrough",rule="none"} 1"#));
        assert!(text.contains(r#"sluice_requests_total{outcome="sold_out",rule="phone"} 1"#));
        assert!(text.contains(r#"sluice_upstream_responses_total{class="2xx",upstream="mall"} 1"#));
        assert!(text.contains(
            r#"sluice_request_duration_seconds_count{outcome="passthrough",rule="none"} 1"#
        ));
    }
}
