//! `sluice drill` against real processes: a gateway started from a
//! temporary config on the memory store, a real HTTP backend on loopback,
//! and the drill run as the real binary. Its `--json` report is parsed and
//! held to the numbers the gateway's admin API and the backend saw.

use sluice_testkit as support;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::{put_stock, sluice_cmd, stock_view, Gateway, Upstream};

const SALE_RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    quantity: { json: qty, default: 1, max: 2 }
    dedup: { key: [user, sku], ttl: 10m }
    stock: { per_user_limit: 1 }
    release_on: [connect_error, timeout, 5xx]
"#;

/// gateway.yaml for one upstream; `upstream` holds its extra keys.
fn config(up: &Upstream, upstream: &str) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         store: {{ backend: memory }}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    read_timeout: 10s\n{upstream}\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        up.addr()
    )
}

fn gateway(up: &Upstream, upstream: &str, rules: &str) -> Gateway {
    Gateway::builder()
        .config(&config(up, upstream))
        .file("lua-free-rules/sale.yaml", rules)
        .start()
}

/// The secret of the token rule: the drill signs what the gateway verifies.
const SECRET: (&str, &str) = ("DRILL_TEST_SECRET", "s3cret");

/// Runs `sluice drill` with `args` off the async runtime.
async fn drill(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        sluice_cmd()
            .arg("drill")
            .args(&args)
            .env(SECRET.0, SECRET.1)
            .output()
            .expect("run sluice drill")
    })
    .await
    .expect("join the drill")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The JSON report on stdout; panics with stderr when there is none.
fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); status {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn count(report: &Value, outcome: &str) -> u64 {
    report["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .filter(|o| o["outcome"] == outcome && o["kind"] == "order")
        .map(|o| o["count"].as_u64().expect("count"))
        .sum()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"].as_str().is_some_and(|n| n.starts_with(name)))
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

/// The flags of a sale drilled from the rule in the gateway's own config.
fn sale_args(gw: &Gateway, users: u64, attempts: u64, stock: u64) -> Vec<String> {
    let mut a = args(&[
        "--config",
        &gw.dir().join("gateway.yaml").to_string_lossy(),
        "--rule",
        "seckill",
        "--sku",
        "p1",
        "--users",
        &users.to_string(),
        "--attempts-per-user",
        &attempts.to_string(),
        "--concurrency",
        "8",
        "--json",
    ]);
    a.extend(args(&[
        "--admin",
        &format!("http://{}", gw.admin()),
        "--stock",
        &stock.to_string(),
    ]));
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_sale_adds_up_and_every_check_passes() {
    let up = Upstream::start();
    let gw = gateway(&up, "", SALE_RULE);
    put_stock(gw.admin(), "seckill", "p1", 10).await;
    // The target comes from the config's listen.
    let out = drill(sale_args(&gw, 50, 2, 10)).await;
    let r = report(&out);
    assert!(out.status.success(), "exit {:?}: {r:#}", out.status);
    assert_eq!(r["requests"], 100, "{r:#}");
    let counted: u64 = r["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .map(|o| o["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(counted, 100, "every request has one outcome row: {r:#}");
    assert_eq!(r["by_kind"]["order"]["answered"], 100);
    assert_eq!(count(&r, "forwarded"), 10, "{r:#}");
    assert_eq!(r["winners"]["units"], 10);
    assert_eq!(up.requests(), 10, "the backend saw exactly the winners");
    for name in [
        "winners == units sold",
        "per-user limit",
        "stock view adds up",
        "units == --stock",
    ] {
        assert_eq!(check(&r, name)["pass"], true, "{name}: {r:#}");
    }
    assert_eq!(r["passed"], true);
    // What the backend received is what the rule reads.
    let last = up.last().expect("a forwarded order");
    assert!(last.uri.starts_with("/api/seckill/p1/order"), "{last:?}");
    assert!(last.header("x-user-id").is_some_and(|u| u.starts_with('u')));
    let body: Value = serde_json::from_slice(&last.body).expect("json body");
    assert_eq!(body, serde_json::json!({"qty": 1}));
    let view = stock_view(gw.admin(), "seckill", "p1").await;
    assert_eq!(view["sold"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_stock_fails_its_check_and_the_exit_status() {
    let up = Upstream::start();
    let gw = gateway(&up, "", SALE_RULE);
    put_stock(gw.admin(), "seckill", "p1", 10).await;
    let out = drill(sale_args(&gw, 20, 1, 11)).await;
    let r = report(&out);
    assert_eq!(out.status.code(), Some(1), "{r:#}");
    let units = check(&r, "units == --stock");
    assert_eq!(units["pass"], false, "{r:#}");
    assert!(
        units["detail"]
            .as_str()
            .is_some_and(|d| d.contains("--stock 11 !=")),
        "{units}"
    );
    // The true invariants still hold.
    assert_eq!(check(&r, "stock view adds up")["pass"], true, "{r:#}");
    assert_eq!(check(&r, "winners == units sold")["pass"], true, "{r:#}");
    assert_eq!(r["passed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_winners_are_followed_to_placed() {
    let up = Upstream::start();
    // One backend slot held half a second per order, and a short wait:
    // orders that overlap one at the backend are queued and sent later
    // by the gateway itself.
    up.set_stall(Duration::from_millis(500));
    let rule = SALE_RULE.replace(
        "release_on:",
        "admission: { upstream: mall, queue: { max_wait: 10ms, capacity: 100 } }\n    release_on:",
    );
    let gw = gateway(&up, "    max_inflight: 1\n", &rule);
    put_stock(gw.admin(), "seckill", "p1", 4).await;
    let mut a = sale_args(&gw, 8, 1, 4);
    a.extend(args(&["--ticket-timeout", "60s"]));
    let out = drill(a).await;
    let r = report(&out);
    assert!(out.status.success(), "exit {:?}: {r:#}", out.status);
    let t = &r["tickets"];
    let queued = t["queued"].as_u64().expect("queued");
    assert!(
        queued > 0,
        "eight orders at once on one slot: some queued: {r:#}"
    );
    assert_eq!(t["placed"], queued, "{r:#}");
    assert_eq!(t["still_waiting"], 0, "{r:#}");
    assert!(t["time_to_placed_ms"]["p50"].is_number(), "{r:#}");
    assert_eq!(
        r["winners"]["forwarded_units"].as_u64().expect("forwarded") + queued,
        4,
        "{r:#}"
    );
    assert_eq!(check(&r, "winners == units sold")["pass"], true, "{r:#}");
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_built_from_rules_carry_each_source() {
    let up = Upstream::start();
    let rules = r#"rules:
  - name: cookie-query-json
    match: { method: POST, path: "/buy" }
    user: { cookie: uid }
    sku: { query: item }
    quantity: { json: count, default: 1, max: 3 }
  - name: header-json-token
    match: { method: PUT, path: "/cart/{shop}/add" }
    user: { jwt: { claim: sub, secret_env: DRILL_TEST_SECRET, header: X-Token } }
    sku: { json: sku }
  - name: capture-json
    match: { method: POST, path: "/seckill/{sku}" }
    user: { header: X-Buyer }
    sku: { path: sku }
    quantity: { query: n, default: 1, max: 5 }
"#;
    let gw = Gateway::builder()
        .config(&config(&up, ""))
        .file("lua-free-rules/sale.yaml", rules)
        .env(SECRET.0, SECRET.1)
        .start();
    for rule in ["cookie-query-json", "capture-json"] {
        put_stock(gw.admin(), rule, "p1", 100).await;
    }
    let config = gw.dir().join("gateway.yaml").to_string_lossy().into_owned();
    let target = format!("http://{}", gw.listen());
    let run = |rule: &str, extra: &[&str]| {
        let mut a = args(&[
            "--config", &config, "--rule", rule, "--target", &target, "--sku", "p1", "--users",
            "3", "--json",
        ]);
        a.extend(args(extra));
        drill(a)
    };

    let out = run("cookie-query-json", &["--quantity", "2"]).await;
    let r = report(&out);
    assert_eq!(count(&r, "forwarded"), 3, "{r:#}");
    let seen = up.recorded();
    assert_eq!(seen.len(), 3);
    let first = &seen[0];
    assert_eq!(first.method, "POST");
    assert_eq!(first.uri, "/buy?item=p1");
    assert!(
        first
            .header("cookie")
            .is_some_and(|c| c.starts_with("uid=u")),
        "{first:?}"
    );
    let body: Value = serde_json::from_slice(&first.body).expect("json");
    assert_eq!(body["count"], 2, "a quantity is a JSON number");

    let out = run("capture-json", &[]).await;
    let r = report(&out);
    assert_eq!(count(&r, "forwarded"), 3, "{r:#}");
    let last = up.last().expect("recorded");
    assert_eq!(last.uri, "/seckill/p1?n=1");
    assert!(last.header("x-buyer").is_some_and(|u| u.starts_with('u')));

    // A path capture that is neither user, sku nor quantity needs --path;
    // a signed token then carries the user (the gateway verifies it).
    let out = run("header-json-token", &[]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("{shop}") && err.contains("--path"), "{err}");
    put_stock(gw.admin(), "header-json-token", "p1", 100).await;
    let out = run("header-json-token", &["--path", "/cart/main/add"]).await;
    let r = report(&out);
    assert_eq!(count(&r, "forwarded"), 3, "{r:#}");
    let last = up.last().expect("recorded");
    assert_eq!(
        (last.method.as_str(), last.uri.as_str()),
        ("PUT", "/cart/main/add")
    );
    assert!(last
        .header("x-token")
        .is_some_and(|t| t.starts_with("Bearer ey")));
    let body: Value = serde_json::from_slice(&last.body).expect("json");
    assert_eq!(body, serde_json::json!({"sku": "p1"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_traffic_is_mixed_in_and_reported_apart() {
    let up = Upstream::start();
    let gw = gateway(&up, "", SALE_RULE);
    put_stock(gw.admin(), "seckill", "p1", 5).await;
    let mut a = sale_args(&gw, 10, 1, 5);
    a.extend(args(&[
        "--browse-path",
        "/goods/{sku}",
        "--browse-ratio",
        "0.75",
    ]));
    let out = drill(a).await;
    let r = report(&out);
    assert!(out.status.success(), "{r:#}");
    assert_eq!(r["by_kind"]["order"]["answered"], 10, "{r:#}");
    assert_eq!(r["by_kind"]["browse"]["answered"], 30, "{r:#}");
    let browse_rows: Vec<&Value> = r["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .filter(|o| o["kind"] == "browse")
        .collect();
    assert!(
        browse_rows.iter().all(|o| o["outcome"] == "passthrough"),
        "{r:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_unknown_rules_are_named() {
    let up = Upstream::start();
    let gw = gateway(&up, "", SALE_RULE);
    let config = gw.dir().join("gateway.yaml").to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--config", &config, "--rule", "nope", "--users", "1"],
            "no rule named \"nope\"",
        ),
        (vec!["--config", &config, "--users", "1"], "--rule"),
        (
            vec!["--config", &config, "--rule", "seckill", "--users", "1"],
            "--sku",
        ),
        (
            vec![
                "--config", &config, "--rule", "seckill", "--users", "1", "--sku", "a b",
            ],
            "--sku",
        ),
        (
            vec![
                "--config",
                &config,
                "--rule",
                "seckill",
                "--users",
                "1",
                "--sku",
                "p1",
                "--quantity",
                "3",
            ],
            "--quantity",
        ),
        (
            vec!["--target", "https://x:1", "--path", "/", "--users", "1"],
            "--target",
        ),
        (
            vec!["--target", "http://127.0.0.1:1", "--users", "1"],
            "--path",
        ),
        (
            vec![
                "--target",
                "http://127.0.0.1:1",
                "--path",
                "/",
                "--users",
                "1",
                "--header",
                "nocolon",
            ],
            "--header",
        ),
        (
            vec!["--users", "1", "--browse-ratio", "1.5"],
            "--browse-ratio",
        ),
        (vec!["--users", "0"], "--users"),
    ];
    for (flags, expect) in cases {
        let out = drill(args(&flags)).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(expect), "{flags:?}: want {expect:?} in {err}");
    }
    // A broken rule file is reported at path:line:col.
    gw.write(
        "lua-free-rules/sale.yaml",
        "rules:\n  - name: x\n    bogus: 1\n",
    );
    let out = drill(args(&["--config", &config, "--rule", "x", "--users", "1"])).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("sale.yaml:3:5"), "{err}");
}

#[test]
fn help_documents_every_flag_and_placeholder() {
    let out = sluice_cmd()
        .args(["drill", "--help"])
        .output()
        .expect("run sluice drill --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--target",
        "--users",
        "--attempts-per-user",
        "--concurrency",
        "--threads",
        "--duration",
        "--sku",
        "--config",
        "--rule",
        "--method",
        "--path",
        "--header",
        "--body",
        "--quantity",
        "--user-prefix",
        "--browse-path",
        "--browse-ratio",
        "--admin",
        "--admin-token-env",
        "--stock",
        "--per-user-limit",
        "--timeout",
        "--ticket-timeout",
        "--json",
    ] {
        assert!(
            help.contains(&format!("{flag} <")) || help.contains(&format!("{flag}  ")),
            "{flag} missing:\n{help}"
        );
    }
    for placeholder in ["{user}", "{sku}", "{qty}", "{n}"] {
        assert!(help.contains(placeholder), "{placeholder} missing:\n{help}");
    }
}
