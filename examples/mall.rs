//! The demo's stand-in legacy mall on its own, for an operator trying
//! Sluice in front of it or for `sluice drill`: orders at
//! `POST /api/seckill/{sku}/order`, product pages at `GET /api/goods/{sku}`,
//! `GET /health`, and its counters at `GET /mall/stats`.
//!
//! `cargo run --release --example mall -- --listen 127.0.0.1:8000
//! [--mysql mysql://root@127.0.0.1:3306/mall] [--stock 100] [--pool 20]`
//!
//! On start the sale of `--sku` is reset to `--stock` units with no orders
//! (on MySQL the goods and orders tables, and the database, are created
//! when missing). Runs until Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use sluice_demo_mall::{EmbeddedStore, Mall, MallConfig, MallStore, MySqlStore};

const HELP: &str = "\
mall: the demo's stand-in legacy mall

  --listen ADDR     where to listen (127.0.0.1:8000)
  --mysql URL       MySQL/MariaDB to keep goods and orders in (or
                    MALL_MYSQL_URL); embedded when absent
  --sku SKU         the sku on sale (phone-1)
  --stock N         its units; the sale is reset on start (100)
  --pool N          database connections (20)
  --pool-wait-ms N  how long a request waits for a connection (1000)
  --row-lock-ms N   work inside an order's transaction, row locked (5)
";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8000));
    let mut mysql = std::env::var("MALL_MYSQL_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let mut sku = "phone-1".to_string();
    let mut stock = 100u64;
    let mut config = MallConfig::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            print!("{HELP}");
            return Ok(());
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value (see --help)"))?;
        let number = || -> anyhow::Result<u64> {
            value
                .parse()
                .with_context(|| format!("{flag} needs a whole number, not {value:?}"))
        };
        match flag.as_str() {
            "--listen" => {
                listen = value
                    .parse()
                    .with_context(|| format!("--listen needs ip:port, not {value:?}"))?
            }
            "--mysql" => mysql = Some(value),
            "--sku" => sku = value,
            "--stock" => stock = number()?,
            "--pool" => config.pool = usize::try_from(number()?)?,
            "--pool-wait-ms" => config.pool_wait = Duration::from_millis(number()?),
            "--row-lock-ms" => config.row_lock_hold = Duration::from_millis(number()?),
            other => bail!("unknown flag {other} (see --help)"),
        }
    }
    if config.pool == 0 {
        bail!("--pool must be at least 1");
    }
    let store: Arc<dyn MallStore> = match &mysql {
        Some(url) => Arc::new(
            MySqlStore::connect(url, config)
                .await
                .with_context(|| format!("the mall's database at {url}"))?,
        ),
        None => Arc::new(EmbeddedStore::new(config)),
    };
    let mall = Mall::new(store);
    mall.reset(&sku, stock).await.context("loading the sale")?;
    let server = mall
        .serve(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!(
        "mall on http://{}: {stock} x {sku}; {}",
        server.addr(),
        mall.store().describe()
    );
    tokio::signal::ctrl_c().await?;
    println!("mall stats: {}", mall.stats().to_json());
    Ok(())
}
