//! The operator's files in `examples/`: the Grafana dashboard, the
//! Prometheus alert rules and scrape config, the systemd unit. Every metric
//! name the dashboard and the alerts query must exist on a real gateway's
//! `/metrics` (a gateway on a real Redis with a rule, a queue and a loaded
//! sku), so a renamed metric cannot leave a panel or an alert silently
//! empty. The files' own syntax is checked by promtool and
//! systemd-analyze in the ignored `examples_pass_promtool` (README).

use sluice_testkit as support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use support::{get, put_stock, request, Gateway, RedisServer, Upstream};

fn example(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(rel)
}

fn read(rel: &str) -> String {
    let path = example(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// PromQL: the metric names an expression selects.

/// Aggregation operators: followed by `by (...)`, `without (...)` or `(`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a list of label names in parentheses.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other keywords: binary operators, modifiers, literals.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];

/// Skips from an opening quote at `i` to just past its closing quote.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        // Backquoted strings have no escapes.
        if chars[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// Skips from an opening bracket at `i` to just past its match, stepping
/// over strings (a label value may hold a bracket).
fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0usize;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(chars, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

fn next_non_space(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The metric names a PromQL expression selects: identifiers that are not
/// functions (followed by `(`), aggregations, keywords, label names (in
/// `{...}` or after `by`, `on`, ...), durations, numbers, strings or
/// Grafana variables (`$__rate_interval`, `${x}`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_group(&chars, i, '{', '}'),
            '[' => i = skip_group(&chars, i, '[', ']'),
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_group(&chars, i, '{', '}');
                } else {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration (`5m`, `1.5e3`, `0x1f`).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let after = next_non_space(&chars, i);
                let lower = word.to_ascii_lowercase();
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    if chars.get(after) == Some(&'(') {
                        i = skip_group(&chars, after, '(', ')');
                    }
                } else if chars.get(after) == Some(&'(')
                    || AGGREGATIONS.contains(&lower.as_str())
                    || KEYWORDS.contains(&lower.as_str())
                {
                    // A function, an aggregation or a keyword.
                } else {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// The PromQL inside a Grafana variable query: `label_values(expr,
/// label)` selects from `expr`; `label_values(label)` from nothing.
fn variable_expr(query: &str) -> String {
    let q = query.trim();
    let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    else {
        return q.to_string();
    };
    // The label is after the last top-level comma, if there are two
    // arguments.
    let chars: Vec<char> = inner.chars().collect();
    let mut depth = 0i32;
    let mut split = None;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => {
                i = skip_string(&chars, i);
                continue;
            }
            '{' | '(' | '[' => depth += 1,
            '}' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => split = Some(i),
            _ => {}
        }
        i += 1;
    }
    match split {
        Some(at) => chars[..at].iter().collect(),
        None => String::new(),
    }
}

#[test]
fn the_promql_tokenizer_finds_metric_names_only() {
    let cases: &[(&str, &[&str])] = &[
        (
            r#"histogram_quantile(0.99, sum by (outcome, le) (rate(sluice_request_duration_seconds_bucket{instance=~"$instance", rule=~"$rule"}[$__rate_interval])))"#,
            &["sluice_request_duration_seconds_bucket"],
        ),
        (
            "max by (rule, sku) (a_flag) == 1\nand on (rule, sku)\nmax by (rule, sku) (b_stock) > 0",
            &["a_flag", "b_stock"],
        ),
        (
            "x_inflight >= on (instance, upstream) y_max",
            &["x_inflight", "y_max"],
        ),
        (
            r#"sum(rate(x_total{class=~"5xx|}"}[5m])) by (job) / ignoring(class) group_left z_info offset 5m"#,
            &["x_total", "z_info"],
        ),
        (r#"up{job="sluice"} == 0"#, &["up"]),
        (
            "process_start_time_seconds{a=\"b\"} * 1000 + count without (x) (q:recorded:rate5m)",
            &["process_start_time_seconds", "q:recorded:rate5m"],
        ),
        (
            "sum by (upstream) (rate(r_total[5m])) > 0.1 and bool deriv(d[10m]) > 1e3",
            &["r_total", "d"],
        ),
    ];
    for (expr, want) in cases {
        let got = metric_names(expr);
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "{expr}");
    }
    assert_eq!(
        variable_expr(r#"label_values(sluice_requests_total{instance=~"$instance"}, rule)"#),
        r#"sluice_requests_total{instance=~"$instance"}"#
    );
    assert_eq!(variable_expr("label_values(instance)"), "");
}

// ---------------------------------------------------------------------------
// The files.

/// `examples/prometheus/alerts.yml`, strictly: a typo in a key is an error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<AlertRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertRule {
    alert: String,
    expr: String,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn alert_rules() -> Vec<AlertRule> {
    let file: RuleFile = serde_saphyr::from_str(&read("prometheus/alerts.yml"))
        .unwrap_or_else(|e| panic!("examples/prometheus/alerts.yml: {e}"));
    file.groups
        .into_iter()
        .inspect(|g| assert!(!g.name.is_empty()))
        .flat_map(|g| g.rules)
        .collect()
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("grafana/sluice-dashboard.json"))
        .unwrap_or_else(|e| panic!("examples/grafana/sluice-dashboard.json: {e}"))
}

/// Every PromQL string of the dashboard: each `expr` (panel targets,
/// annotations) and each query variable.
fn dashboard_queries(dash: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    walk(&dash["annotations"], &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] == "query" {
            let q = var["query"]["query"]
                .as_str()
                .or_else(|| var["query"].as_str())
                .unwrap_or_else(|| panic!("variable {} has no query", var["name"]));
            out.push(variable_expr(q));
        }
    }
    out
}

#[test]
fn the_alert_rules_cover_what_an_operator_pages_on() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for wanted in [
        "SluiceStoreDown",
        "SluiceBackend5xxRate",
        "SluiceQueueDepthGrowing",
        "SluiceSoldOutFlagStuck",
        "SluiceUpstreamServerDown",
        "SluiceConfigReloadRejected",
        "SluiceAccessLogDropping",
    ] {
        assert!(names.contains(wanted), "no alert {wanted} in {names:?}");
    }
    assert_eq!(names.len(), rules.len(), "alert names are unique");
    for r in &rules {
        let severity = r.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{}: severity {severity:?}",
            r.alert
        );
        for key in ["summary", "description"] {
            assert!(
                r.annotations.get(key).is_some_and(|s| !s.trim().is_empty()),
                "{}: no {key}",
                r.alert
            );
        }
        assert!(!metric_names(&r.expr).is_empty(), "{}: no metric", r.alert);
        if let Some(d) = &r.for_ {
            sluice::config::units::parse_duration(d)
                .unwrap_or_else(|e| panic!("{}: for: {e}", r.alert));
        }
    }
}

#[test]
fn the_dashboard_is_importable_and_shows_each_topic() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "sluice-gateway");
    assert!(dash["title"].is_string() && dash["schemaVersion"].is_u64());
    // Importable anywhere: the data source is a variable, never a uid of
    // the machine it was drawn on.
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(vars
        .iter()
        .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"));
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate id");
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            matches!((x, w), (Some(x), Some(w)) if x + w <= 24),
            "{}",
            p["title"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    let queried: BTreeSet<String> = dashboard_queries(&dash)
        .iter()
        .flat_map(|q| metric_names(q))
        .collect();
    // The issue's list: funnel by outcome and rule, latency p50/p99 by
    // outcome, stock per sku, queue depth and wait, in-flight against
    // max_inflight, store latency and errors, reloads; and the process.
    for wanted in [
        "sluice_requests_total",
        "sluice_request_duration_seconds_bucket",
        "sluice_stock_available",
        "sluice_queue_depth",
        "sluice_queue_wait_seconds_bucket",
        "sluice_upstream_inflight",
        "sluice_upstream_max_inflight",
        "sluice_store_duration_seconds_bucket",
        "sluice_store_errors_total",
        "sluice_config_reloads_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            queried.contains(wanted),
            "the dashboard never queries {wanted}"
        );
    }
    let titles: Vec<String> = panels
        .iter()
        .filter_map(|p| p["title"].as_str().map(str::to_lowercase))
        .collect();
    for topic in [
        "funnel",
        "p50",
        "p99",
        "stock",
        "queue",
        "max_inflight",
        "store",
        "reload",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no panel about {topic}: {titles:?}"
        );
    }
}

#[test]
fn the_systemd_unit_reloads_with_sighup_and_outlasts_the_drain() {
    let unit = read("sluice.service");
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        keys.entry(k.to_string()).or_default().push(v.to_string());
    }
    let one = |k: &str| -> &str {
        match keys.get(k).map(Vec::as_slice) {
            Some([v]) => v.as_str(),
            other => panic!("{k}: {other:?}"),
        }
    };
    assert_eq!(one("Type"), "exec", "sluice run stays in the foreground");
    assert!(one("ExecStart").ends_with("sluice run --config /etc/sluice/gateway.yaml"));
    assert_eq!(
        keys["ExecReload"].last().map(String::as_str),
        Some("/bin/kill -HUP $MAINPID")
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    let nofile: u64 = one("LimitNOFILE").parse().expect("LimitNOFILE");
    assert!(nofile >= 65_536);
    // Longer than the default drain (grace period + shutdown timeout).
    let stop = sluice::config::units::parse_duration(one("TimeoutStopSec")).expect("duration");
    let defaults = sluice::config::model::defaults::GRACE_PERIOD
        + sluice::config::model::defaults::SHUTDOWN_TIMEOUT;
    assert!(stop > defaults, "{stop:?} <= {defaults:?}");
}

// ---------------------------------------------------------------------------
// Against a real gateway.

const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
    admission: { upstream: mall, queue: { max_wait: 100ms, capacity: 100 } }
"#;

/// The sample names of a Prometheus text page (`_bucket`, `_sum` and
/// `_count` of histograms included, as PromQL sees them).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_query_exists_on_a_real_gateway() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let config = format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         store: {{ backend: redis, recheck_interval: 200ms, redis: {{ url: \"{}\", timeout: 1s }} }}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    max_inflight: 4\n    \
           health_check: {{ path: /health, interval: 200ms }}\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        redis.url(),
        up.addr()
    );
    let gw = Gateway::builder()
        .config(&config)
        .file("lua-free-rules/seckill.yaml", RULE)
        .start();
    // The scrape config's path is the one the gateway serves.
    #[derive(Deserialize)]
    struct ScrapeFile {
        scrape_configs: Vec<ScrapeConfig>,
    }
    #[derive(Deserialize)]
    struct ScrapeConfig {
        job_name: String,
        metrics_path: String,
    }
    let scrape: ScrapeFile = serde_saphyr::from_str(&read("prometheus/prometheus.yml"))
        .unwrap_or_else(|e| panic!("examples/prometheus/prometheus.yml: {e}"));
    let job = &scrape.scrape_configs[0];
    assert_eq!(job.job_name, "sluice", "the alerts' up{{job=\"sluice\"}}");
    assert_eq!(get(gw.admin(), &job.metrics_path).await.status, 200);

    // Skus appear once loaded; a sale makes a sold-out flag.
    put_stock(gw.admin(), "seckill", "p1", 1).await;
    for user in ["u1", "u2"] {
        let resp = request(
            gw.listen(),
            "POST",
            "/api/seckill/p1/order",
            &[("x-user-id", user)],
            b"",
        )
        .await;
        assert!(resp.status < 500, "{}", resp.text());
    }
    gw.wait_metric(
        "sluice_soldout_flag",
        &[("rule", "seckill"), ("sku", "p1")],
        1.0,
    )
    .await;

    let exposed = sample_names(&gw.metrics().await);
    let mut queried: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in alert_rules() {
        for name in metric_names(&rule.expr) {
            queried
                .entry(name)
                .or_default()
                .insert(format!("alert {}", rule.alert));
        }
    }
    for q in dashboard_queries(&dashboard()) {
        for name in metric_names(&q) {
            queried.entry(name).or_default().insert("dashboard".into());
        }
    }
    assert!(queried.len() >= 20, "{queried:?}");
    let missing: Vec<String> = queried
        .iter()
        // `up` is made by Prometheus for every target, never exposed.
        .filter(|(name, _)| name.as_str() != "up" && !exposed.contains(name.as_str()))
        .map(|(name, by)| format!("{name} (queried by {by:?})"))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not on /metrics:\n{}\n\nexposed: {exposed:?}",
        missing.join("\n")
    );
}

// ---------------------------------------------------------------------------
// The real tools, when installed.

/// `promtool check config`, `check rules`, `test rules` (the alerts'
/// unit tests), the dashboard's PromQL parsed by promtool as recording
/// rules (Grafana's variables filled in), and `systemd-analyze verify` of
/// the unit pointed at the binary under test. Needs `promtool` (Debian:
/// `apt-get install prometheus`) and systemd-analyze:
/// `cargo test --test examples -- --ignored`.
#[test]
#[ignore = "needs promtool and systemd-analyze"]
fn examples_pass_promtool() {
    let run = |cmd: &mut std::process::Command| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is it installed?)"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{cmd:?}:\n{text}");
        text
    };
    let prom = example("prometheus");
    run(std::process::Command::new("promtool")
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&prom));
    run(std::process::Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(&prom));

    let dir = tempfile::tempdir().expect("temp dir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries(&dashboard()).iter().enumerate() {
        if q.is_empty() {
            continue;
        }
        let q = q
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
            .replace("$rule", ".*")
            .replace("$upstream", ".*");
        let escaped = serde_json::to_string(&q).expect("json string");
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {escaped}\n"
        ));
    }
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, rules).expect("write rules");
    run(std::process::Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path));

    let unit = read("sluice.service").replace(
        "/usr/local/bin/sluice",
        &support::sluice_bin().to_string_lossy(),
    );
    let unit_path = dir.path().join("sluice.service");
    std::fs::write(&unit_path, unit).expect("write unit");
    let out = run(std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path));
    assert!(out.trim().is_empty(), "systemd-analyze verify: {out}");
}
