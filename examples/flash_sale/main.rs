//! The main job, visible: a mall that serialises orders on a stock row
//! lock, Sluice in front of it on the embedded memory store, and a burst
//! of buyers for a small stock. Prints what the buyers were told and what
//! the mall received.
//!
//! `cargo run --release --example flash_sale -- --buyers 3000 --stock 100`
//!
//! With `--serve`, it loads the stock and keeps the mall and the gateway
//! running (until Ctrl-C) instead of sending its own buyers, and prints the
//! `sluice drill` command that plays the sale against them.

mod buyers;
mod mall;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const SKU: &str = "phone-1";

const DEMO_RULE: &str = r#"rules:
  - name: phone-seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    quantity: { json: qty, default: 1, max: 1 }
    rate_limits:
      - { key: user, rate: 1, per: 3s }
      - { key: rule, rate: 20000, per: 1s }
    dedup: { key: [user, sku], ttl: 10m }
    stock: { per_user_limit: 1 }
    release_on: [connect_error, timeout, 5xx]
"#;

struct Args {
    buyers: u64,
    stock: u64,
    concurrency: u64,
    row_lock_ms: u64,
    serve: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        buyers: 3000,
        stock: 100,
        concurrency: 200,
        row_lock_ms: 2,
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--serve" {
            args.serve = true;
            continue;
        }
        let value: u64 = it
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag} needs a whole number"))?;
        match flag.as_str() {
            "--buyers" => args.buyers = value,
            "--stock" => args.stock = value,
            "--concurrency" => args.concurrency = value,
            "--row-lock-ms" => args.row_lock_ms = value,
            other => {
                bail!("unknown flag {other}; use --buyers, --stock, --concurrency, --row-lock-ms, --serve")
            }
        }
    }
    Ok(args)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Writes the gateway config and rule file the demo runs with.
fn write_config(
    dir: &std::path::Path,
    mall: SocketAddr,
) -> anyhow::Result<(std::path::PathBuf, SocketAddr, SocketAddr)> {
    let listen = free_addr()?;
    let admin = free_addr()?;
    let config = format!(
        "listen: {listen}\n\
         admin: {{ listen: {admin} }}\n\
         store: {{ backend: memory }}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{mall}]\n    max_inflight: 16\n    \
         health_check: {{ path: /health, interval: 1s }}\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n"
    );
    std::fs::create_dir_all(dir.join("lua-free-rules"))?;
    std::fs::write(dir.join("gateway.yaml"), config)?;
    // The shipped pack (lua-free-rules/phone-seckill.yaml) limits each ip to
    // 20/s; every simulated buyer here shares 127.0.0.1, so the demo keeps
    // the per-user and per-rule buckets and drops the per-ip one.
    std::fs::write(dir.join("lua-free-rules/phone-seckill.yaml"), DEMO_RULE)?;
    Ok((dir.join("gateway.yaml"), listen, admin))
}

async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    admin_request(admin, "GET", path, "").await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mall = mall::Mall::new(SKU, args.stock, Duration::from_millis(args.row_lock_ms));
    let mall_addr = mall.clone().serve().await?;

    let dir = tempfile::tempdir()?;
    let (config_path, listen, admin) = write_config(dir.path(), mall_addr)?;
    let config = sluice::config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = sluice::server::Gateway::build(config, false)?;
    // pingora's server blocks its thread until the process ends.
    std::thread::spawn(move || gateway.run());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !admin_get(admin, "/readyz")
        .await
        .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    {
        if Instant::now() > deadline {
            bail!("the gateway did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let loaded = admin_request(
        admin,
        "PUT",
        &format!("/admin/v1/stock/phone-seckill/{SKU}"),
        &format!("{{\"available\": {}}}", args.stock),
    )
    .await?;
    if !loaded.starts_with("HTTP/1.1 200") {
        bail!("could not load the stock: {loaded}");
    }

    if args.serve {
        println!(
            "The mall (row lock {} ms per order) behind Sluice at {listen}, admin {admin}; {} units of {SKU} loaded.\n\
             Play the sale (Ctrl-C or SIGTERM stops mall and gateway):\n\n  \
             sluice drill --config {} --rule phone-seckill --sku {SKU} --users {} --attempts-per-user 2 \\\n    \
             --concurrency {} --admin http://{admin} --stock {}",
            args.row_lock_ms,
            args.stock,
            config_path.display(),
            args.buyers,
            args.concurrency,
            args.stock
        );
        // Ctrl-C or SIGTERM ends the demo (the gateway inside takes
        // SIGTERM as a drain, which alone would leave the mall running).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        std::process::exit(0);
    }
    println!(
        "Flash sale: {} buyers, {} units of {SKU}, {} at a time, through Sluice at {listen}",
        args.buyers, args.stock, args.concurrency
    );
    println!(
        "(the mall holds its stock-row lock {} ms per order)\n",
        args.row_lock_ms
    );
    let report = buyers::burst(listen, SKU, args.buyers, args.concurrency).await;

    println!("{:<14} {:>6} {:>7}", "outcome", "status", "buyers");
    for ((outcome, status), n) in report.outcomes() {
        println!("{outcome:<14} {status:>6} {n:>7}");
    }
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "\n{} answers in {:.2}s ({:.0}/s); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.answers.len(),
        secs,
        report.answers.len() as f64 / secs,
        ms(report.latency(0.5)),
        ms(report.latency(0.99)),
        ms(report.latency(1.0)),
    );
    // Queued winners are sent by the gateway itself as the mall frees up;
    // wait for them before reading the mall's books.
    let queued = report
        .outcomes()
        .iter()
        .filter(|((o, _), _)| *o == "queued")
        .map(|(_, n)| *n)
        .sum::<usize>();
    if queued > 0 {
        let t0 = Instant::now();
        loop {
            let view = admin_get(admin, &format!("/admin/v1/stock/phone-seckill/{SKU}")).await?;
            let body = view.split("\r\n\r\n").nth(1).unwrap_or("");
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            if v["queued"] == 0 && v["in_flight"] == 0 {
                break;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("queued orders did not drain: {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "{queued} queued winners were sent to the mall by Sluice within {:.2}s after the burst",
            t0.elapsed().as_secs_f64()
        );
    }
    let s = &mall.stats;
    println!(
        "\nThe mall received {} orders: {} sold, {} refused for lack of stock; \
         at worst {} orders waited on the stock row lock at once; {} users bought twice.",
        s.orders_received.load(Ordering::Relaxed),
        s.orders_sold.load(Ordering::Relaxed),
        s.orders_refused.load(Ordering::Relaxed),
        s.peak_waiting.load(Ordering::Relaxed),
        mall.repeat_buyers(),
    );

    let stock = admin_get(admin, &format!("/admin/v1/stock/phone-seckill/{SKU}")).await?;
    if let Some(body) = stock.split("\r\n\r\n").nth(1) {
        println!("\nSluice's stock view: {body}");
    }
    let metrics = admin_get(admin, "/metrics").await?;
    println!("\nFrom Sluice's /metrics:");
    for line in metrics.lines() {
        let counted = line.starts_with("sluice_requests_total") && !line.ends_with(" 0");
        let upstream = line.starts_with("sluice_upstream_responses_total") && !line.ends_with(" 0");
        if counted || upstream {
            println!("  {line}");
        }
    }
    // The gateway thread never returns; end the process here.
    std::process::exit(0);
}
