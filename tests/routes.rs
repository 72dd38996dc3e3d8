//! `routes:` through the real gateway binary with three real upstreams:
//! `/api` goes to `api`, host `static.example` to `static`, the rest to
//! `default_upstream`, first match first, on the canonical path at a
//! segment boundary. A flash-sale rule whose path lies under a routed
//! prefix is still admitted by its rule (never routed past admission),
//! and routed traffic loses the client's `X-Sluice-*` headers like any
//! other pass-through.

use sluice_testkit as support;

use support::{put_stock, request, Gateway, Response, Upstream};

/// The three backends of a mall split by path and host.
struct Mall {
    api: Upstream,
    assets: Upstream,
    shop: Upstream,
}

fn start(mall: &Mall) -> Gateway {
    let config = format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 1s, timeout: 1s }}\n\
         upstreams:\n\
         \x20 shop: {{ servers: [{shop}], connect_timeout: 500ms }}\n\
         \x20 api: {{ servers: [{api}], connect_timeout: 500ms }}\n\
         \x20 static: {{ servers: [{assets}], connect_timeout: 500ms }}\n\
         default_upstream: shop\n\
         routes:\n\
         \x20 - match: {{ path_prefix: /api }}\n\
         \x20   upstream: api\n\
         \x20 - match: {{ host: static.example }}\n\
         \x20   upstream: static\n\
         rules: lua-free-rules/*.yaml\n",
        shop = mall.shop.addr(),
        api = mall.api.addr(),
        assets = mall.assets.addr(),
    );
    Gateway::builder()
        .config(&config)
        .file(
            "lua-free-rules/sale.yaml",
            // The order endpoint lives under /api but its rule sends
            // winners to the shop: the rule decides, not the route.
            "rules:\n  - name: phone\n    match: { method: POST, path: \"/api/seckill/{sku}/order\" }\n    \
             user: { header: X-User-Id }\n    sku: { path: sku }\n    admission: { upstream: shop }\n",
        )
        .start()
}

/// Requests each backend has had: (api, static, shop).
fn counts(mall: &Mall) -> (u64, u64, u64) {
    (
        mall.api.requests(),
        mall.assets.requests(),
        mall.shop.requests(),
    )
}

async fn get(gw: &Gateway, path: &str, host: Option<&str>) -> Response {
    let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
    request(gw.listen(), "GET", path, &headers, b"").await
}

#[track_caller]
fn passthrough(resp: &Response, uri: &str) {
    assert_eq!(
        (resp.status, resp.header("x-sluice-outcome")),
        (200, Some("passthrough")),
        "{}",
        resp.text()
    );
    assert_eq!(resp.json()["uri"], uri, "the path is forwarded as sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_traffic_goes_to_the_first_route_that_fits_else_the_default() {
    let mall = Mall {
        api: Upstream::start(),
        assets: Upstream::start(),
        shop: Upstream::start(),
    };
    let gw = start(&mall);

    // (path, host, which backend: 0 api, 1 static, 2 shop)
    let cases: &[(&str, Option<&str>, usize)] = &[
        ("/api/goods/1?color=red", None, 0),
        ("/api", None, 0),
        ("/api/", None, 0),
        // A segment boundary: /apix is not under /api.
        ("/apix/goods", None, 2),
        // The canonical path is routed: merged slashes, dot segments.
        ("//api//goods/2", None, 0),
        ("/static/../api/goods/3", None, 0),
        ("/api/../account", None, 2),
        // Paths are case-sensitive, as the backends see them.
        ("/API/goods/4", None, 2),
        ("/app.js", Some("static.example"), 1),
        // Hosts: any case, any port.
        ("/app.css", Some("STATIC.Example:8080"), 1),
        // Routes are tried in order: /api on the static host is the api's.
        ("/api/goods/5", Some("static.example"), 0),
        ("/", Some("shop.example"), 2),
        ("/account", None, 2),
    ];
    for (i, (path, host, want)) in cases.iter().enumerate() {
        let before = counts(&mall);
        let resp = get(&gw, path, *host).await;
        passthrough(&resp, path);
        let after = counts(&mall);
        let got = [after.0 - before.0, after.1 - before.1, after.2 - before.2];
        let mut expected = [0, 0, 0];
        expected[*want] = 1;
        assert_eq!(got, expected, "case {i}: {path} host {host:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_under_a_routed_prefix_is_still_admitted_by_its_rule() {
    let mall = Mall {
        api: Upstream::start(),
        assets: Upstream::start(),
        shop: Upstream::start(),
    };
    let gw = start(&mall);
    put_stock(gw.admin(), "phone", "p1", 1).await;

    let order = |user: &'static str, path: &'static str| {
        let addr = gw.listen();
        async move {
            request(
                addr,
                "POST",
                path,
                &[("x-user-id", user), ("content-type", "application/json")],
                b"{}",
            )
            .await
        }
    };
    let won = order("u1", "/api/seckill/p1/order").await;
    assert_eq!(
        won.header("x-sluice-outcome"),
        Some("forwarded"),
        "{}",
        won.text()
    );
    // Another spelling of the same order is the rule's too, never routed.
    let lost = order("u2", "//api/seckill/p1/order").await;
    assert_eq!(
        (lost.status, lost.header("x-sluice-outcome")),
        (410, Some("sold_out")),
        "{}",
        lost.text()
    );
    let seen = mall.shop.last().expect("the shop got the winner");
    assert_eq!(seen.header("x-sluice-rule"), Some("phone"));
    assert_eq!(
        counts(&mall),
        (0, 0, 1),
        "only the winner reached a backend"
    );

    // What the rule does not match under /api is routed.
    let other = order("u3", "/api/seckill/p1/cancel").await;
    assert_eq!(other.header("x-sluice-outcome"), Some("passthrough"));
    assert_eq!(counts(&mall), (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_traffic_loses_the_clients_sluice_headers() {
    let mall = Mall {
        api: Upstream::start(),
        assets: Upstream::start(),
        shop: Upstream::start(),
    };
    let gw = start(&mall);
    for (path, host, backend) in [
        ("/api/cart", "127.0.0.1", &mall.api),
        ("/img/1.png", "static.example", &mall.assets),
    ] {
        let resp = request(
            gw.listen(),
            "POST",
            path,
            &[
                ("host", host),
                ("x-sluice-ticket", "forged"),
                ("X-Sluice-Rule", "vip"),
                ("x-shop-token", "kept"),
            ],
            b"{}",
        )
        .await;
        assert_eq!(resp.header("x-sluice-outcome"), Some("passthrough"));
        let seen = backend.last().expect("the routed backend got it");
        assert_eq!(seen.uri, path);
        for (name, _) in &seen.headers {
            assert!(!name.starts_with("x-sluice-"), "{name} reached {path}");
        }
        assert_eq!(seen.header("x-shop-token"), Some("kept"));
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    }
    assert_eq!(mall.shop.requests(), 0);
}
