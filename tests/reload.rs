//! Reloads against a real gateway process: SIGHUP and
//! `POST /admin/v1/reload` put edited rule files and server lists in
//! force without a restart; a bad file or a restart-only change is
//! refused and the old config keeps serving; state of the rules that stay
//! (token buckets, sold-out flags, stock) survives; a request under way
//! finishes under the rule it started with.

use sluice_testkit as support;

use std::net::SocketAddr;
use std::time::Duration;

use support::shop::{field, put_stock, stock_view, wait_for_stock};
use support::{metric_value, request, Gateway, Upstream};

const SECKILL: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    rate_limits: [ { key: user, rate: 1, per: 1h } ]
    release_on: [connect_error, timeout, 5xx]
"#;

const FLASH: &str = r#"rules:
  - name: flash
    match: { method: POST, path: "/api/flash/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
"#;

const PRESALE: &str = r#"rules:
  - name: presale
    match: { method: POST, path: "/api/presale/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
"#;

fn gateway_yaml(servers: &[SocketAddr], extra: &str) -> String {
    let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n    read_timeout: 5s\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n{extra}",
        servers.join(", ")
    )
}

/// One buy; returns (status, outcome header).
async fn buy(g: &Gateway, rule_path: &str, sku: &str, user: &str) -> (u16, String) {
    let resp = request(
        g.listen(),
        "POST",
        &format!("/api/{rule_path}/{sku}/order"),
        &[("x-user-id", user)],
        b"{}",
    )
    .await;
    let outcome = resp
        .header("x-sluice-outcome")
        .unwrap_or("none")
        .to_string();
    (resp.status, outcome)
}

async fn admin_reload(g: &Gateway) -> (u16, serde_json::Value) {
    let resp = request(g.admin(), "POST", "/admin/v1/reload", &[], b"").await;
    (resp.status, resp.json())
}

async fn reloads(g: &Gateway, result: &str) -> f64 {
    metric_value(
        &g.metrics().await,
        "sluice_config_reloads_total",
        &[("result", result)],
    )
    .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_rules_and_keeps_the_state_of_rules_that_stay() {
    let up = Upstream::start();
    let g = Gateway::builder()
        .config(&gateway_yaml(&[up.addr()], ""))
        .file("lua-free-rules/seckill.yaml", SECKILL)
        .file("lua-free-rules/flash.yaml", FLASH)
        .start();
    assert_eq!(reloads(&g, "ok").await, 0.0, "series start at 0");
    assert_eq!(reloads(&g, "rejected").await, 0.0);

    put_stock(g.admin(), "seckill", "p1", 3).await;
    put_stock(g.admin(), "flash", "f1", 1).await;
    assert_eq!(buy(&g, "seckill", "p1", "u1").await.1, "forwarded");
    assert_eq!(buy(&g, "seckill", "p1", "u1").await.1, "rate_limited");
    assert_eq!(buy(&g, "flash", "f1", "u2").await.1, "forwarded");
    assert_eq!(buy(&g, "flash", "f1", "u3").await.1, "sold_out");
    // Not a rule yet: passes through to the backend untouched.
    assert_eq!(buy(&g, "presale", "x1", "u4").await.1, "passthrough");

    // The operator removes one file and adds another, then `systemctl reload`.
    std::fs::remove_file(g.dir().join("lua-free-rules/flash.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    g.write("lua-free-rules/presale.yaml", PRESALE);
    g.sighup();
    g.wait_metric("sluice_config_reloads_total", &[("result", "ok")], 1.0)
        .await;
    assert!(g.log().contains("config reloaded"), "{}", g.log());

    // seckill stayed: u1's token bucket is still empty, its stock is kept.
    assert_eq!(buy(&g, "seckill", "p1", "u1").await.1, "rate_limited");
    assert_eq!(
        field(&stock_view(g.admin(), "seckill", "p1").await, "available"),
        2
    );
    assert_eq!(buy(&g, "seckill", "p1", "u5").await.1, "forwarded");
    // flash is gone: its path is plain traffic now, its admin API too.
    let before = up.requests();
    assert_eq!(buy(&g, "flash", "f1", "u6").await.1, "passthrough");
    assert_eq!(up.requests(), before + 1);
    let resp = request(g.admin(), "GET", "/admin/v1/stock/flash/f1", &[], b"").await;
    assert_eq!(resp.status, 404, "{}", resp.text());
    // presale is new: its series exist at 0, then it admits.
    let text = g.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "sluice_requests_total",
            &[("rule", "presale"), ("outcome", "forwarded")]
        ),
        Some(0.0),
        "a new rule's series start at 0"
    );
    put_stock(g.admin(), "presale", "x1", 1).await;
    assert_eq!(buy(&g, "presale", "x1", "u7").await.1, "forwarded");
    assert_eq!(buy(&g, "presale", "x1", "u8").await.1, "sold_out");
    assert_eq!(reloads(&g, "rejected").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_refused_with_every_problem_and_the_old_rules_keep_serving() {
    let up = Upstream::start();
    let g = Gateway::builder()
        .config(&gateway_yaml(&[up.addr()], ""))
        .file("lua-free-rules/flash.yaml", FLASH)
        .start();
    put_stock(g.admin(), "flash", "f1", 1).await;
    assert_eq!(buy(&g, "flash", "f1", "u1").await.1, "forwarded");

    // Two mistakes in one file, a third in another.
    g.write(
        "lua-free-rules/flash.yaml",
        "rules:\n  - name: flash\n    match: { method: POST, path: \"/api/flash/{sku}/order\" }\n    user: { header: X-User-Id }\n    sku: { path: sku }\n    rate_limits: [ { key: user, rate: 0, per: 1m } ]\n",
    );
    g.write(
        "lua-free-rules/presale.yaml",
        "rules:\n  - name: presale\n    match: { method: POST, path: \"/api/presale/{sku}/order\" }\n    user: { header: X-User-Id }\n    sku: { path: nope }\n",
    );
    let (status, body) = admin_reload(&g).await;
    assert_eq!(status, 422, "{body}");
    let problems: Vec<String> = body["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("lua-free-rules/flash.yaml:6:") && p.contains("rate")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("lua-free-rules/presale.yaml:5:")),
        "{problems:?}"
    );
    assert_eq!(reloads(&g, "rejected").await, 1.0);

    // The old rules serve: flash is still sold out, presale is no rule.
    assert_eq!(buy(&g, "flash", "f1", "u2").await.1, "sold_out");
    assert_eq!(buy(&g, "presale", "x1", "u3").await.1, "passthrough");

    // SIGHUP with the same files: refused and logged, the process lives.
    g.sighup();
    g.wait_metric(
        "sluice_config_reloads_total",
        &[("result", "rejected")],
        2.0,
    )
    .await;
    assert!(
        g.log().contains("config reload refused") && g.log().contains("presale.yaml:5:"),
        "{}",
        g.log()
    );
    assert_eq!(buy(&g, "flash", "f1", "u4").await.1, "sold_out");

    // Fixed: the next reload goes through.
    g.write("lua-free-rules/flash.yaml", FLASH);
    g.write("lua-free-rules/presale.yaml", PRESALE);
    let (status, body) = admin_reload(&g).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["reloaded"]["rules"]["added"],
        serde_json::json!(["presale"])
    );
    assert_eq!(
        body["reloaded"]["rules"]["unchanged"],
        serde_json::json!(["flash"])
    );
    // flash was kept whole: its sold-out flag too.
    assert_eq!(buy(&g, "flash", "f1", "u5").await.1, "sold_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_with_a_relative_config_path_reloads() {
    // `sluice run --config gateway.yaml`, as the README has it: the paths
    // the config resolves against its folder (the journal, the access log)
    // must be the same at start and on reload, or every reload is refused
    // as changing them.
    let up = Upstream::start();
    let g = Gateway::builder()
        .config(&gateway_yaml(
            &[up.addr()],
            "access_log: { path: access.log }\nupgrade_socket: upgrade.sock\n",
        ))
        .file("lua-free-rules/flash.yaml", FLASH)
        .relative_config()
        .start();
    assert_eq!(buy(&g, "seckill", "s1", "u1").await.1, "passthrough");
    g.write("lua-free-rules/seckill.yaml", SECKILL);
    let (status, body) = admin_reload(&g).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reloads(&g, "ok").await, 1.0);
    // The new rule is in force: its sku was never loaded.
    assert_eq!(buy(&g, "seckill", "s1", "u1").await.1, "unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_restart_only_key_is_refused_with_a_message() {
    let up = Upstream::start();
    let g = Gateway::builder()
        .config(&gateway_yaml(&[up.addr()], ""))
        .file("lua-free-rules/flash.yaml", FLASH)
        .start();
    let yaml =
        std::fs::read_to_string(g.dir().join("gateway.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let moved = yaml.replace(&g.listen().to_string(), "127.0.0.1:1");
    let edited = format!(
        "{}store: {{ backend: redis, redis: {{ url: \"redis://:hunter2@127.0.0.1:1/0\" }} }}\n",
        moved
    );
    std::fs::write(g.dir().join("gateway.yaml"), edited).unwrap_or_else(|e| panic!("{e}"));
    // The same edit also adds a rule; nothing of it may apply.
    g.write("lua-free-rules/presale.yaml", PRESALE);
    let (status, body) = admin_reload(&g).await;
    assert_eq!(status, 422, "{body}");
    let text = body.to_string();
    assert!(text.contains("needs a restart"), "{text}");
    assert!(text.contains("listen changed"), "{text}");
    assert!(text.contains("store.backend changed"), "{text}");
    assert!(
        !text.contains("hunter2"),
        "a password is never shown: {text}"
    );
    assert_eq!(buy(&g, "presale", "x1", "u1").await.1, "passthrough");
    // Still serving on the old address.
    put_stock(g.admin(), "flash", "f1", 1).await;
    assert_eq!(buy(&g, "flash", "f1", "u1").await.1, "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_under_way_finishes_under_the_rule_it_started_with() {
    let up = Upstream::start();
    let g = Gateway::builder()
        .config(&gateway_yaml(&[up.addr()], ""))
        .file("lua-free-rules/flash.yaml", FLASH)
        // A glob that matches no file is a mistake; another rule stays.
        .file("lua-free-rules/seckill.yaml", SECKILL)
        .start();
    put_stock(g.admin(), "flash", "f1", 2).await;
    up.set_stall(Duration::from_millis(1500));
    let listen = g.listen();
    let slow = tokio::spawn(async move {
        request(
            listen,
            "POST",
            "/api/flash/f1/order",
            &[("x-user-id", "u1")],
            b"{}",
        )
        .await
    });
    // The winner is at the backend when the rule is removed.
    for _ in 0..200 {
        if up.inflight() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.inflight(), 1, "the winner reached the backend");
    std::fs::remove_file(g.dir().join("lua-free-rules/flash.yaml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = admin_reload(&g).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["reloaded"]["rules"]["removed"],
        serde_json::json!(["flash"])
    );
    let resp = slow.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-sluice-outcome"), Some("forwarded"));
    up.set_stall(Duration::ZERO);

    // The rule comes back: its unit was sold (committed), one is left.
    g.write("lua-free-rules/flash.yaml", FLASH);
    let (status, body) = admin_reload(&g).await;
    assert_eq!(status, 200, "{body}");
    // The commit lands just after the answer.
    let view = wait_for_stock(g.admin(), "flash", "f1", Duration::from_secs(20), |v| {
        field(v, "in_flight") == 0
    })
    .await;
    assert_eq!(field(&view, "sold"), 1, "{view}");
    assert_eq!(field(&view, "available"), 1, "{view}");
    assert_eq!(field(&view, "in_flight"), 0, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_traffic_to_a_new_server_list() {
    let old = Upstream::start();
    let new = Upstream::start();
    let g = Gateway::builder()
        .config(&gateway_yaml(&[old.addr()], ""))
        .file("lua-free-rules/flash.yaml", FLASH)
        .start();
    let resp = request(g.listen(), "GET", "/goods/1", &[], b"").await;
    assert_eq!(resp.status, 200);
    assert_eq!((old.requests(), new.requests()), (1, 0));

    g.write("gateway.yaml", &gateway_yaml(&[new.addr()], ""));
    g.sighup();
    g.wait_metric("sluice_config_reloads_total", &[("result", "ok")], 1.0)
        .await;
    for _ in 0..4 {
        let resp = request(g.listen(), "GET", "/goods/1", &[], b"").await;
        assert_eq!(resp.status, 200);
    }
    put_stock(g.admin(), "flash", "f1", 1).await;
    assert_eq!(buy(&g, "flash", "f1", "u1").await.1, "forwarded");
    assert_eq!((old.requests(), new.requests()), (1, 5));
    let config = request(g.admin(), "GET", "/admin/v1/config", &[], b"").await;
    assert_eq!(
        config.json()["upstreams"][0]["servers"],
        serde_json::json!([new.addr().to_string()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_puts_new_routes_in_force() {
    let mall = Upstream::start();
    let statics = Upstream::start();
    let yaml = |routes: &str| {
        format!(
            "listen: ${{LISTEN}}\n\
             admin: {{ listen: ${{ADMIN}} }}\n\
             threads: 2\n\
             upstreams:\n  mall:\n    servers: [{}]\n  statics:\n    servers: [{}]\n\
             default_upstream: mall\n\
             rules: lua-free-rules/*.yaml\n{routes}",
            mall.addr(),
            statics.addr()
        )
    };
    let g = Gateway::builder()
        .config(&yaml(""))
        .file("lua-free-rules/flash.yaml", FLASH)
        .start();
    assert_eq!(
        request(g.listen(), "GET", "/static/app.js", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!((mall.requests(), statics.requests()), (1, 0));

    g.write(
        "gateway.yaml",
        &yaml("routes:\n  - { match: { path_prefix: /static }, upstream: statics }\n"),
    );
    let resp = request(g.admin(), "POST", "/admin/v1/reload", &[], b"").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        request(g.listen(), "GET", "/static/app.js", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!(
        request(g.listen(), "GET", "/goods/1", &[], b"")
            .await
            .status,
        200
    );
    assert_eq!((mall.requests(), statics.requests()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_puts_new_cache_rules_in_force() {
    let mall = Upstream::start();
    let g = Gateway::builder()
        .config(&gateway_yaml(&[mall.addr()], ""))
        .file("lua-free-rules/flash.yaml", FLASH)
        .start();
    for _ in 0..2 {
        let resp = request(g.listen(), "GET", "/api/goods/1", &[], b"").await;
        assert_eq!(resp.header("x-sluice-cache"), None);
    }
    assert_eq!(mall.requests(), 2);

    g.write(
        "lua-free-rules/pages.yaml",
        "cache:\n  - name: goods\n    match: { method: GET, path: \"/api/goods/{id}\" }\n    ttl: 60s\n",
    );
    g.sighup();
    g.wait_metric("sluice_config_reloads_total", &[("result", "ok")], 1.0)
        .await;
    let first = request(g.listen(), "GET", "/api/goods/1", &[], b"").await;
    assert_eq!(first.header("x-sluice-cache"), Some("miss"));
    let second = request(g.listen(), "GET", "/api/goods/1", &[], b"").await;
    assert_eq!(second.header("x-sluice-cache"), Some("hit"));
    assert_eq!(mall.requests(), 3, "the cached page is read once");
    g.wait_metric(
        "sluice_cache_requests_total",
        &[("rule", "goods"), ("result", "hit")],
        1.0,
    )
    .await;
}
