//! The main job, visible: one flash sale played twice against a stand-in
//! legacy mall (a pool of 20 database connections, orders serialised on the
//! stock-row lock, product pages that need a connection too): first with
//! the buyers straight at the mall, then through Sluice on its embedded
//! memory store. Prints the two side by side, every number measured in the
//! run.
//!
//! `cargo run --profile demo --example flash_sale [-- --buyers 3000 --stock 100
//! --mysql mysql://root@127.0.0.1:3306/mall]`; `--help` lists the knobs.

mod buyers;
mod gateway;
mod table;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sluice_demo_mall::{EmbeddedStore, Mall, MallConfig, MallStore, MySqlStore};

use buyers::Tally;

/// The sku on sale.
const SKU: &str = "phone-1";

const HELP: &str = "\
flash_sale: the same sale straight at a legacy mall, then through Sluice

  --buyers N        buyers, each clicking order once (3000)
  --stock N         units on sale (100)
  --ramp-ms N       the buyers' first clicks spread over this long (1000)
  --retries N       clicks again after an error or a timeout (1)
  --page-views N    product-page views per second during the sale (100)
  --pool N          the mall's database connections (20)
  --pool-wait-ms N  how long a request waits for a connection (1000)
  --row-lock-ms N   work inside an order's transaction, row locked (5)
  --max-inflight N  Sluice's max_inflight for the mall (16)
  --mysql URL       run the mall on MySQL/MariaDB (or MALL_MYSQL_URL);
                    its goods and orders tables are created when missing
                    and reset for each phase
  --serve           load the stock and keep the mall and Sluice running
                    (until Ctrl-C) instead of playing the sale, and print
                    the `sluice drill` command that plays it against them
";

/// The demo's knobs.
struct Args {
    buyers: u64,
    stock: u64,
    ramp_ms: u64,
    retries: u32,
    page_views: u64,
    pool: usize,
    pool_wait_ms: u64,
    row_lock_ms: u64,
    max_inflight: u64,
    mysql: Option<String>,
    serve: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        buyers: 3000,
        stock: 100,
        ramp_ms: 1000,
        retries: 1,
        page_views: 100,
        pool: 20,
        pool_wait_ms: 1000,
        row_lock_ms: 5,
        max_inflight: 16,
        mysql: std::env::var("MALL_MYSQL_URL")
            .ok()
            .filter(|u| !u.is_empty()),
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--serve" {
            args.serve = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            print!("{HELP}");
            std::process::exit(0);
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
            "--buyers" => args.buyers = number()?,
            "--stock" => args.stock = number()?,
            "--ramp-ms" => args.ramp_ms = number()?,
            "--retries" => args.retries = u32::try_from(number()?)?,
            "--page-views" => args.page_views = number()?,
            "--pool" => args.pool = usize::try_from(number()?)?,
            "--pool-wait-ms" => args.pool_wait_ms = number()?,
            "--row-lock-ms" => args.row_lock_ms = number()?,
            "--max-inflight" => args.max_inflight = number()?,
            "--mysql" => args.mysql = Some(value),
            other => bail!("unknown flag {other} (see --help)"),
        }
    }
    if args.pool == 0 || args.max_inflight == 0 {
        bail!("--pool and --max-inflight must be at least 1");
    }
    Ok(args)
}

/// What one play of the sale came to.
pub struct Phase {
    /// "Straight at the mall" or "Through Sluice".
    pub name: &'static str,
    /// Every answer the buyers got.
    pub buyers: Tally,
    /// Every answer the browsing people got.
    pub pages: Tally,
    /// The mall's books after the sale.
    pub books: sluice_demo_mall::Books,
    /// The mall's counters after the sale.
    pub mall: serde_json::Value,
    /// What bounds the orders inside the mall, for the table.
    pub cap: String,
    /// From the first click to the last answer.
    pub elapsed: Duration,
}

/// Plays the sale against `target` (the mall itself or Sluice in front of
/// it) on a freshly reset mall.
async fn play(
    name: &'static str,
    cap: String,
    mall: &Mall,
    target: SocketAddr,
    args: &Args,
    sluice: Option<&gateway::Sluice>,
) -> anyhow::Result<Phase> {
    // Orders of a previous phase may still be finishing in the mall.
    let deadline = Instant::now() + Duration::from_secs(60);
    while mall.stats().orders_now() > 0 {
        if Instant::now() > deadline {
            bail!("the mall is still busy with the previous phase");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mall.reset(SKU, args.stock).await?;
    if let Some(s) = sluice {
        s.load_stock(SKU, args.stock).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let browsing = buyers::browse(target, SKU, args.page_views, stop.clone());
    let started = Instant::now();
    let ramp = Duration::from_millis(args.ramp_ms);
    let bought = buyers::buy(target, SKU, args.buyers, ramp, args.retries).await;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let pages = browsing.await?;
    if let Some(s) = sluice {
        s.settle(SKU).await?;
    }
    Ok(Phase {
        name,
        buyers: bought,
        pages,
        books: mall.store().books(SKU).await?,
        mall: mall.stats().to_json(),
        cap,
        elapsed,
    })
}

/// `--serve`: the mall and Sluice in front of it, stock loaded, until
/// Ctrl-C or SIGTERM, for `sluice drill` to play the sale against.
async fn serve(mall: &Mall, at: SocketAddr, args: &Args) -> anyhow::Result<()> {
    mall.reset(SKU, args.stock).await?;
    let sluice = gateway::Sluice::start(at, args.max_inflight).await?;
    sluice.load_stock(SKU, args.stock).await?;
    println!(
        "Sluice at {} (admin {}) in front of the mall at {at}; {} units of {SKU} loaded.\n\
         Play the sale (Ctrl-C or SIGTERM stops mall and gateway):\n\n  \
         sluice drill --target http://{} --config {} --rule {} --sku {SKU} --users {} \\\n    \
         --attempts-per-user 2 --concurrency 200 --admin http://{} --stock {}",
        sluice.listen,
        sluice.admin,
        args.stock,
        sluice.listen,
        sluice.config_path().display(),
        gateway::RULE,
        args.buyers,
        sluice.admin,
        args.stock
    );
    // The gateway inside takes SIGTERM as a drain, which alone would leave
    // the mall running: either signal ends the whole demo.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    std::process::exit(0);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // Every buyer is a connection, to the mall and then to Sluice as well:
    // a login shell's soft limit of 1024 descriptors is too few.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let config = MallConfig {
        pool: args.pool,
        pool_wait: Duration::from_millis(args.pool_wait_ms),
        row_lock_hold: Duration::from_millis(args.row_lock_ms),
    };
    let store: Arc<dyn MallStore> = match &args.mysql {
        Some(url) => Arc::new(
            MySqlStore::connect(url, config)
                .await
                .with_context(|| format!("the mall's database at {url}"))?,
        ),
        None => Arc::new(EmbeddedStore::new(config)),
    };
    let mall = Mall::new(store);
    let server = mall.serve(SocketAddr::from(([127, 0, 0, 1], 0))).await?;

    println!(
        "Flash sale of {} x {SKU}: {} buyers click \"order\" within {:.1} s, each clicking \
         again after an error (up to {}x); meanwhile {} product-page views a second.",
        args.stock,
        args.buyers,
        args.ramp_ms as f64 / 1000.0,
        args.retries,
        args.page_views
    );
    println!("The mall: {}.\n", mall.store().describe());
    if args.serve {
        return serve(&mall, server.addr(), &args).await;
    }

    let direct = play(
        "Straight at the mall",
        format!("pool of {}", args.pool),
        &mall,
        server.addr(),
        &args,
        None,
    )
    .await?;
    let sluice = gateway::Sluice::start(server.addr(), args.max_inflight).await?;
    let through = play(
        "Through Sluice",
        format!("max_inflight {}", args.max_inflight),
        &mall,
        sluice.listen,
        &args,
        Some(&sluice),
    )
    .await?;

    table::print(&direct, &through, args.stock);
    println!(
        "\nSluice's stock view after the sale: {}",
        sluice.stock(SKU).await?
    );
    // The gateway's thread never returns; end the process here.
    std::process::exit(0);
}
