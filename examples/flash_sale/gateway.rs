//! Sluice for the demo, in this process: a config on the memory store in a
//! temporary dir, the gateway on its own thread (pingora's server never
//! returns), and the few admin calls the demo makes.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The rule the demo sells under.
pub const RULE: &str = "phone-seckill";

/// The shipped pack (lua-free-rules/phone-seckill.yaml) also limits each ip
/// to 20/s; every simulated buyer here shares 127.0.0.1, so the demo keeps
/// the per-user and per-rule buckets and drops the per-ip one.
const RULE_FILE: &str = r#"rules:
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

/// A running in-process gateway.
pub struct Sluice {
    /// The main listener.
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Holds gateway.yaml and the rule file while the gateway runs.
    dir: tempfile::TempDir,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Sluice {
    /// Starts a gateway in front of `mall` with `max_inflight` orders at a
    /// time, and waits until it is ready.
    pub async fn start(mall: SocketAddr, max_inflight: u64) -> anyhow::Result<Sluice> {
        let dir = tempfile::tempdir()?;
        let listen = free_addr()?;
        let admin = free_addr()?;
        write_config(dir.path(), listen, admin, mall, max_inflight)?;
        let config = sluice::config::load(&dir.path().join("gateway.yaml"))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let gateway = sluice::server::Gateway::build(config, false)?;
        std::thread::spawn(move || gateway.run());
        let sluice = Sluice { listen, admin, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sluice
            .get("/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
        {
            if Instant::now() > deadline {
                bail!("the gateway did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(sluice)
    }

    /// The gateway.yaml it runs with (for `sluice drill --config`).
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// Loads `units` of `sku` under the demo rule.
    pub async fn load_stock(&self, sku: &str, units: u64) -> anyhow::Result<()> {
        let (status, body) = self
            .call(
                "PUT",
                &format!("/admin/v1/stock/{RULE}/{sku}"),
                &format!("{{\"available\": {units}}}"),
            )
            .await?;
        if status != 200 {
            bail!("could not load the stock: {status} {body}");
        }
        Ok(())
    }

    /// Sluice's stock view of `sku`.
    pub async fn stock(&self, sku: &str) -> anyhow::Result<serde_json::Value> {
        let (_, body) = self.get(&format!("/admin/v1/stock/{RULE}/{sku}")).await?;
        serde_json::from_str(&body).context("the stock view is not JSON")
    }

    /// Waits until no order of `sku` is queued or in flight (queued winners
    /// are sent by the gateway itself as the mall frees up).
    pub async fn settle(&self, sku: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let view = self.stock(sku).await?;
            if view["queued"] == 0 && view["in_flight"] == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("queued orders did not drain: {view}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.call("GET", path, "").await
    }

    /// One admin request on its own connection: (status, body).
    async fn call(&self, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.admin).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok((status, body))
    }
}

/// Writes gateway.yaml (memory store, the mall as the one upstream) and
/// the demo's rule file under `dir`.
fn write_config(
    dir: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    mall: SocketAddr,
    max_inflight: u64,
) -> anyhow::Result<()> {
    let config = format!(
        "listen: {listen}\n\
         admin: {{ listen: {admin} }}\n\
         store: {{ backend: memory }}\n\
         shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{mall}]\n    max_inflight: {max_inflight}\n    \
         health_check: {{ path: /health, interval: 1s }}\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n"
    );
    std::fs::create_dir_all(dir.join("lua-free-rules"))?;
    std::fs::write(dir.join("gateway.yaml"), config)?;
    std::fs::write(dir.join("lua-free-rules/phone-seckill.yaml"), RULE_FILE)?;
    Ok(())
}
