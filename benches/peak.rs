//! Peak shaving, measured: the latency a gateway adds to a forwarded
//! winner while the queue is empty (peer: the same requests straight to
//! the upstream, in the same run), and the drain rate of a queue in front
//! of a slow backend (peer: the backend's own ceiling, max_inflight / its
//! service time).
//!
//! `cargo bench --bench peak`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1 as client_http1;
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sluice_testkit::free_addr;
use tokio::net::{TcpListener as TokioListener, TcpStream};

const SAMPLES: usize = 2000;
const DRAIN_ORDERS: usize = 400;
const SLOW_SERVICE: Duration = Duration::from_millis(10);
const SLOW_INFLIGHT: u32 = 4;

/// A backend answering 200 after `delay`.
async fn backend(delay: Duration) -> SocketAddr {
    let listener = TokioListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            br#"{"ok":1}"#,
                        ))))
                    },
                );
                let _ = server_http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

type Sender = client_http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = client_http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn send(sender: &mut Sender, method: &str, path: &str, user: &str) -> u16 {
    sender.ready().await.expect("ready");
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench")
        .header("x-user-id", user)
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// Sequential latencies of `SAMPLES` requests on one keep-alive connection.
async fn latencies(
    addr: SocketAddr,
    method: &str,
    path: impl Fn(usize) -> String,
) -> Vec<Duration> {
    let mut sender = connect(addr).await;
    let mut out = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let t = Instant::now();
        let status = send(&mut sender, method, &path(i), &format!("u{i}")).await;
        assert_eq!(status, 200, "request {i}");
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn pct(v: &[Duration], q: f64) -> f64 {
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn write_config(
    dir: &std::path::Path,
    listen: SocketAddr,
    admin: SocketAddr,
    fast: SocketAddr,
    slow: SocketAddr,
) {
    std::fs::create_dir_all(dir.join("rules")).expect("dir");
    std::fs::write(
        dir.join("gateway.yaml"),
        format!(
            "listen: {listen}\nadmin: {{ listen: {admin} }}\nthreads: 1\n\
             shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
             upstreams:\n  fast: {{ servers: [{fast}], max_inflight: 64 }}\n  \
             slow: {{ servers: [{slow}], max_inflight: {SLOW_INFLIGHT} }}\n\
             default_upstream: fast\nrules: rules/*.yaml\n"
        ),
    )
    .expect("config");
    std::fs::write(
        dir.join("rules/bench.yaml"),
        "rules:\n\
         - name: buy\n  match: { method: POST, path: \"/buy/{sku}\" }\n  user: { header: X-User-Id }\n  sku: { path: sku }\n\
         - name: drain\n  match: { method: POST, path: \"/drain/{sku}\" }\n  user: { header: X-User-Id }\n  sku: { path: sku }\n  \
           admission: { upstream: slow, queue: { max_wait: 0s, capacity: 100000 } }\n",
    )
    .expect("rules");
}

async fn admin(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut sender = connect(addr).await;
    sender.ready().await.expect("ready");
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("admin");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let fast = backend(Duration::ZERO).await;
    let slow = backend(SLOW_SERVICE).await;
    let (listen, admin_addr) = (free_addr(), free_addr());
    let dir = std::env::temp_dir().join(format!("sluice-peak-{}", std::process::id()));
    write_config(&dir, listen, admin_addr, fast, slow);
    let config = sluice::config::load(&dir.join("gateway.yaml")).expect("config");
    let gateway = sluice::server::Gateway::build(config, false).expect("gateway");
    std::thread::spawn(move || gateway.run());
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(listen).await.is_err() || TcpStream::connect(admin_addr).await.is_err()
    {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin(
        admin_addr,
        "PUT",
        "/admin/v1/stock/buy/p1",
        "{\"available\": 1000000}",
    )
    .await;
    admin(
        admin_addr,
        "PUT",
        "/admin/v1/stock/drain/p1",
        "{\"available\": 1000000}",
    )
    .await;

    // Latency added with the queue empty.
    let direct = latencies(fast, "POST", |_| "/buy/p1".into()).await;
    let passthrough = latencies(listen, "POST", |_| "/other".into()).await;
    let winner = latencies(listen, "POST", |_| "/buy/p1".into()).await;
    println!("latency, {SAMPLES} sequential requests on one keep-alive connection (µs)");
    println!(
        "{:<28} {:>8} {:>8} {:>14}",
        "path", "p50", "p99", "added p50"
    );
    for (name, v) in [
        ("direct to upstream (peer)", &direct),
        ("gateway passthrough", &passthrough),
        ("gateway winner, no queue", &winner),
    ] {
        println!(
            "{name:<28} {:>8.0} {:>8.0} {:>14.0}",
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 0.5) - pct(&direct, 0.5)
        );
    }

    // Drain rate: every order queued at once in front of a slow backend.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..50 {
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(listen).await;
            let mut queued = 0;
            let mut i = w;
            while i < DRAIN_ORDERS {
                if send(&mut sender, "POST", "/drain/p1", &format!("d{i}")).await == 202 {
                    queued += 1;
                }
                i += 50;
            }
            queued
        }));
    }
    let mut queued = 0;
    for t in tasks {
        queued += t.await.expect("task");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view = admin(admin_addr, "GET", "/admin/v1/stock/drain/p1", "").await;
        let v: serde_json::Value = serde_json::from_str(&view).expect("stock view");
        if v["sold"].as_u64() == Some(DRAIN_ORDERS as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "the queue did not drain: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rate = DRAIN_ORDERS as f64 / elapsed;
    let ceiling = f64::from(SLOW_INFLIGHT) / SLOW_SERVICE.as_secs_f64();
    println!(
        "\ndrain: {DRAIN_ORDERS} orders ({queued} queued) in front of a {} ms backend capped at {SLOW_INFLIGHT}: \
         {rate:.0} orders/s = {:.2}x the backend's ceiling of {ceiling:.0}/s",
        SLOW_SERVICE.as_millis(),
        rate / ceiling
    );
    let _ = std::fs::remove_dir_all(&dir);
    std::process::exit(0);
}
