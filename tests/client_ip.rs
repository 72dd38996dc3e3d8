//! The client ip behind several proxies, through the real gateway binary:
//! with the test's loopback peer and `10.0.0.0/8` trusted, a per-ip rate
//! limit is keyed on the first untrusted `X-Forwarded-For` hop from the
//! right (nginx's `real_ip_recursive`), whichever of our proxies the
//! request came through, whatever the client prepended, and across
//! several header lines.

use sluice_testkit as support;

use support::{put_stock, request, Gateway, Response, Upstream};

fn start(mall: &Upstream) -> Gateway {
    let config = format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 1s, timeout: 1s }}\n\
         trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n\
         upstreams:\n  mall: {{ servers: [{mall}], connect_timeout: 500ms }}\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n",
        mall = mall.addr(),
    );
    Gateway::builder()
        .config(&config)
        .file(
            "lua-free-rules/sale.yaml",
            // One order per client ip per hour; every buyer is a new user.
            "rules:\n  - name: phone\n    match: { method: POST, path: \"/api/seckill/{sku}/order\" }\n    \
             user: { header: X-User-Id }\n    sku: { path: sku }\n    \
             rate_limits: [ { key: ip, rate: 1, per: 1h } ]\n",
        )
        .start()
}

/// An order by `user` through proxies that wrote `xff` (one header line each).
async fn order(gw: &Gateway, user: &str, xff: &[&str]) -> Response {
    let mut headers = vec![("x-user-id", user), ("content-type", "application/json")];
    headers.extend(xff.iter().map(|line| ("x-forwarded-for", *line)));
    request(
        gw.listen(),
        "POST",
        "/api/seckill/p1/order",
        &headers,
        b"{}",
    )
    .await
}

#[track_caller]
fn outcome(resp: &Response, want: &str) {
    assert_eq!(
        resp.header("x-sluice-outcome"),
        Some(want),
        "{} {}",
        resp.status,
        resp.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_ip_limit_keys_on_the_first_untrusted_hop_from_the_right() {
    let mall = Upstream::start();
    let gw = start(&mall);
    put_stock(gw.admin(), "phone", "p1", 100).await;

    // Client 203.0.113.5 through our LB 10.0.0.2.
    outcome(
        &order(&gw, "u1", &["203.0.113.5, 10.0.0.2"]).await,
        "forwarded",
    );
    let seen = mall.last().expect("the mall got it");
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.5, 10.0.0.2, 127.0.0.1")
    );
    // The same client through another of our LBs: the same bucket (the
    // last hop alone would be 10.0.0.9, a fresh one).
    outcome(
        &order(&gw, "u2", &["203.0.113.5, 10.0.0.9"]).await,
        "rate_limited",
    );
    // Whatever it writes in front of its own address.
    outcome(
        &order(&gw, "u3", &["6.6.6.6, 1.2.3.4, 203.0.113.5, 10.0.0.2"]).await,
        "rate_limited",
    );
    // Another client through the same LB has its own bucket (the last hop
    // alone would be 10.0.0.2 again, limited).
    outcome(
        &order(&gw, "u4", &["198.51.100.7, 10.0.0.2"]).await,
        "forwarded",
    );
    // A proxy that adds a line of its own: the client's line is not read
    // as the proxy's word.
    outcome(
        &order(&gw, "u5", &["7.7.7.7", "198.51.100.8, 10.0.0.2"]).await,
        "forwarded",
    );
    outcome(
        &order(&gw, "u6", &["8.8.8.8", "198.51.100.8, 10.0.0.3"]).await,
        "rate_limited",
    );
    // Every hop trusted: the leftmost is the client.
    outcome(
        &order(&gw, "u7", &["10.1.1.1, 10.0.0.2"]).await,
        "forwarded",
    );
    outcome(&order(&gw, "u8", &["10.1.1.1"]).await, "rate_limited");
    // Garbage stops the walk at the last trusted hop: 10.0.0.4 is the key,
    // never what the client wrote left of the garbage.
    outcome(
        &order(&gw, "u9", &["203.0.113.99, unknown, 10.0.0.4"]).await,
        "forwarded",
    );
    outcome(
        &order(&gw, "u10", &["1.1.1.1, 10.0.0.4"]).await,
        "forwarded",
    );
    outcome(
        &order(&gw, "u11", &["2.2.2.2, junk, 10.0.0.4"]).await,
        "rate_limited",
    );
    assert_eq!(mall.requests(), 6);
}
