//! The operator's series of a gateway, beside the request metrics:
//! process metrics (`process_*`), `sluice_build_info`, upstream server
//! health, the backend's `max_inflight`, store reachability, sold-out
//! flags, config reloads and access-log drops. Values that live elsewhere
//! (a balancer's health state, the store, the flags) are set when
//! `/metrics` is scraped (`admin::scrape`), so nothing has to be kept in
//! step between scrapes.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::{Metrics, RELOAD_RESULTS};

/// The operator's series that are set from outside the request path.
pub(super) struct OpsSeries {
    upstream_server_up: IntGaugeVec,
    upstream_max_inflight: IntGaugeVec,
    store_up: IntGauge,
    soldout_flag: IntGaugeVec,
}

impl OpsSeries {
    /// Registers every series on `registry`; those whose labels are known
    /// now start at 0 (both reload results; build info at 1). Gives the
    /// reload and access-log counters too, which their owners move.
    pub(super) fn register(
        registry: &Registry,
    ) -> Result<(Self, IntCounterVec, IntCounter), prometheus::Error> {
        // The standard process_* series (CPU seconds, resident memory,
        // open and max fds, threads, start time), read from /proc when
        // scraped; the collector exists on Linux only.
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "sluice_build_info",
                "Always 1; the version of the running binary is its label.",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let upstream_server_up = IntGaugeVec::new(
            Opts::new(
                "sluice_upstream_server_up",
                "1 when the upstream server is healthy (always, without a health check), 0 when \
                 its health check failed.",
            ),
            &["upstream", "server"],
        )?;
        let upstream_max_inflight = IntGaugeVec::new(
            Opts::new(
                "sluice_upstream_max_inflight",
                "The configured max_inflight of the upstream on this node (the ceiling of \
                 sluice_upstream_inflight).",
            ),
            &["upstream"],
        )?;
        let store_up = IntGauge::new(
            "sluice_store_up",
            "1 when the store answered a PING at the last scrape, 0 when it did not (down, \
             slower than its timeout, or its circuit breaker open).",
        )?;
        let soldout_flag = IntGaugeVec::new(
            Opts::new(
                "sluice_soldout_flag",
                "1 while this node answers sold_out for the sku without asking the store (its \
                 local flag), 0 for loaded skus that are on sale here.",
            ),
            &["rule", "sku"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "sluice_config_reloads_total",
                "Config reloads (SIGHUP, POST /admin/v1/reload) by result: ok or rejected.",
            ),
            &["result"],
        )?;
        for result in RELOAD_RESULTS {
            config_reloads.with_label_values(&[result]);
        }
        let access_log_dropped = IntCounter::new(
            "sluice_access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind (requests never wait \
             for the log).",
        )?;
        registry.register(Box::new(build_info))?;
        registry.register(Box::new(upstream_server_up.clone()))?;
        registry.register(Box::new(upstream_max_inflight.clone()))?;
        registry.register(Box::new(store_up.clone()))?;
        registry.register(Box::new(soldout_flag.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(access_log_dropped.clone()))?;
        let ops = Self {
            upstream_server_up,
            upstream_max_inflight,
            store_up,
            soldout_flag,
        };
        Ok((ops, config_reloads, access_log_dropped))
    }
}

/// The label values of every series of `vec`, in label-name order.
fn series_labels(vec: &impl Collector) -> Vec<Vec<String>> {
    vec.collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| {
            m.get_label()
                .iter()
                .map(|l| l.value().to_string())
                .collect()
        })
        .collect()
}

impl Metrics {
    /// Sets `sluice_upstream_server_up` to the given `(upstream, server,
    /// up)` states, dropping series of servers no longer listed (a reload
    /// changed the list).
    pub fn set_upstream_servers(&self, states: &[(&str, String, bool)]) {
        self.ops.upstream_server_up.reset();
        for (upstream, server, up) in states {
            self.ops
                .upstream_server_up
                .with_label_values(&[upstream, server.as_str()])
                .set(i64::from(*up));
        }
    }

    /// Sets `sluice_upstream_max_inflight` of an upstream (at start, and
    /// when a reload changes it).
    pub fn set_upstream_max_inflight(&self, upstream: &str, max_inflight: u32) {
        self.ops
            .upstream_max_inflight
            .with_label_values(&[upstream])
            .set(i64::from(max_inflight));
    }

    /// Sets `sluice_store_up`.
    pub fn set_store_up(&self, up: bool) {
        self.ops.store_up.set(i64::from(up));
    }

    /// Sets `sluice_soldout_flag`: 1 for each flagged `(rule, sku)`, 0 for
    /// every other sku this node shows stock of. Skus come from the store
    /// (a flag is only set for a loaded sku), never from request data
    /// alone.
    pub fn set_soldout_flags(&self, flagged: &[(Arc<str>, String)]) {
        self.ops.soldout_flag.reset();
        // `sluice_stock_available`'s labels are (rule, sku) in name order.
        for labels in series_labels(&self.stock_available) {
            if let [rule, sku] = labels.as_slice() {
                self.ops.soldout_flag.with_label_values(&[rule, sku]).set(0);
            }
        }
        for (rule, sku) in flagged {
            self.ops
                .soldout_flag
                .with_label_values(&[rule, sku.as_str()])
                .set(1);
        }
    }

    /// Counts one reload: `ok` when it was put in force, `rejected` when
    /// it failed validation (the old config keeps serving).
    pub fn observe_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[RELOAD_RESULTS[usize::from(!ok)]])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.encode()).expect("utf8")
    }

    #[test]
    fn operator_series_exist_from_start() {
        let m = Metrics::new(["phone"], ["mall"]).expect("metrics");
        let t = text(&m);
        assert!(
            t.contains(r#"sluice_config_reloads_total{result="ok"} 0"#),
            "{t}"
        );
        assert!(t.contains(r#"sluice_config_reloads_total{result="rejected"} 0"#));
        assert!(t.contains("sluice_access_log_dropped_total 0"));
        assert!(t.contains(&format!(
            r#"sluice_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )));
        assert!(t.contains("sluice_store_up 0"));
        #[cfg(target_os = "linux")]
        assert!(t.contains("process_resident_memory_bytes"), "{t}");
    }

    #[test]
    fn scrape_time_values() {
        let m = Metrics::new(["phone"], ["mall"]).expect("metrics");
        m.set_upstream_max_inflight("mall", 16);
        m.set_store_up(true);
        m.set_upstream_servers(&[
            ("mall", "127.0.0.1:1".into(), true),
            ("mall", "127.0.0.1:2".into(), false),
        ]);
        m.observe_reload(true);
        m.observe_reload(false);
        m.observe_reload(false);
        m.set_stock_available("phone", "p1", 3);
        m.set_stock_available("phone", "p2", 0);
        m.set_soldout_flags(&[("phone".into(), "p2".into())]);
        let t = text(&m);
        for line in [
            r#"sluice_upstream_max_inflight{upstream="mall"} 16"#,
            "sluice_store_up 1",
            r#"sluice_upstream_server_up{server="127.0.0.1:1",upstream="mall"} 1"#,
            r#"sluice_upstream_server_up{server="127.0.0.1:2",upstream="mall"} 0"#,
            r#"sluice_config_reloads_total{result="ok"} 1"#,
            r#"sluice_config_reloads_total{result="rejected"} 2"#,
            r#"sluice_soldout_flag{rule="phone",sku="p1"} 0"#,
            r#"sluice_soldout_flag{rule="phone",sku="p2"} 1"#,
        ] {
            assert!(t.contains(line), "{line} missing from\n{t}");
        }
        // A server gone from the list (a reload) loses its series; a
        // cleared flag goes back to 0.
        m.set_upstream_servers(&[("mall", "127.0.0.1:1".into(), true)]);
        m.set_soldout_flags(&[]);
        let t = text(&m);
        assert!(!t.contains("127.0.0.1:2"), "{t}");
        assert!(t.contains(r#"sluice_soldout_flag{rule="phone",sku="p2"} 0"#));
    }
}
