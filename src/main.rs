//! The `sluice` binary: parses the command line, loads the config and
//! hands over to the library. `anyhow` lives only here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

// mimalloc instead of glibc's malloc: pingora and the gateway allocate and
// free small buffers on every request, and glibc's malloc/free were a tenth
// to a fifth of the profile. Measured against glibc and jemalloc in
// BENCHMARKS.md ("The release profile"). Built without transparent huge
// pages (Cargo.toml); called through `sluice::alloc` (why there).
#[global_allocator]
static GLOBAL: sluice::alloc::Mimalloc = sluice::alloc::Mimalloc;

/// Sluice: a flash-sale gateway in front of a mall backend.
#[derive(Parser)]
#[command(name = "sluice", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `run` is the default subcommand: `sluice --config F` runs the gateway.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway (the default).
    Run(RunArgs),
    /// Validate the config and every rule file; exit 1 listing every
    /// problem on stderr.
    Check(CheckArgs),
    /// Play a flash sale against a running gateway (N users, M clicks
    /// each, C keep-alive connections) and report outcomes, latencies,
    /// tickets and the invariant checks it could verify.
    Drill(Box<sluice::drill::DrillArgs>),
    /// Check the shared store's ledgers after a crash and repair them from
    /// the tickets the backend placed (dry run unless --apply).
    Reconcile(ReconcileArgs),
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print the effective config (defaults filled in, rule files read,
    /// secrets redacted) as YAML on stdout, like `nginx -T`.
    #[arg(long)]
    print: bool,
}

#[derive(Args)]
struct ReconcileArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Only this rule.
    #[arg(long)]
    rule: Option<String>,
    /// Only this sku.
    #[arg(long)]
    sku: Option<String>,
    /// The tickets the backend placed, one per line (the first word of
    /// each line; `#` comments and blank lines skipped), e.g. the output
    /// of `SELECT ticket FROM orders`. Placed tickets are committed, and
    /// in-flight holds not in the file are released.
    #[arg(long)]
    placed: Option<PathBuf>,
    /// Only holds at least this old are released (keeps reconcile away
    /// from orders still on their way while nodes are live).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    min_age: std::time::Duration,
    /// Make the changes (default: print what would change).
    #[arg(long)]
    apply: bool,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    sluice::config::units::parse_duration(s)
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Take the listening sockets of the gateway running with this config
    /// (zero-downtime upgrade): start this, then send the old process
    /// SIGQUIT within 5 s; it hands over, drains and exits.
    #[arg(long)]
    upgrade: bool,
}

#[derive(Args, Clone)]
struct ConfigArg {
    /// Path of gateway.yaml.
    #[arg(long, short = 'c', default_value = "gateway.yaml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run(cli.run)) {
        Command::Check(args) => check(&args),
        Command::Drill(args) => drill(&args),
        Command::Reconcile(args) => match reconcile(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("sluice reconcile: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let path = &args.config.config;
    match sluice::config::load(path) {
        Ok(config) => {
            let summary = format!(
                "{}: ok ({} upstreams, {} rules)",
                path.display(),
                config.upstreams.len(),
                config.rules.rules().len()
            );
            if !args.print {
                println!("{summary}");
                return ExitCode::SUCCESS;
            }
            // stdout carries only the config, so it can be piped.
            match serde_saphyr::to_string(&sluice::config::view::view(&config)) {
                Ok(yaml) => {
                    print!("{yaml}");
                    eprintln!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{}: cannot print the config: {e}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        Err(errors) => {
            // Problems go to stderr (as nginx -t's do): stdout stays clean
            // for --print.
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Exit status 0 when every check passed, 1 when one failed (or the
/// target never answered), 2 when the drill could not run.
fn drill(args: &sluice::drill::DrillArgs) -> ExitCode {
    match sluice::drill::run(args) {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sluice drill: {e}");
            ExitCode::from(2)
        }
    }
}

/// `Ok(true)` when the ledgers add up (or were repaired), `Ok(false)`
/// when something is left to fix.
fn reconcile(args: &ReconcileArgs) -> anyhow::Result<bool> {
    use sluice::reconcile::{apply, plan, read_placed, Scope};
    let config = sluice::config::load(&args.config.config)
        .map_err(|errors| anyhow::anyhow!("invalid config:\n{errors}"))?;
    if config.store.backend != sluice::config::StoreBackend::Redis {
        anyhow::bail!(
            "store.backend is memory: its ledger lives inside the gateway process and \
             is gone after a crash (reload the stock with the admin API); reconcile \
             works on the shared Redis store"
        );
    }
    // Younger holds may still be on their way to the backend from a live
    // node: releasing one would resell an order about to be placed.
    let on_its_way = config
        .rules
        .rules()
        .iter()
        .map(|r| {
            sluice::admission::hold::Leases::of(r, config.upstream(r.upstream), &config.store)
                .on_its_way
        })
        .max()
        .unwrap_or_default();
    if args.placed.is_some() && args.min_age < on_its_way {
        anyhow::bail!(
            "--min-age {:?} is shorter than the longest an order of this config can still be \
             on its way to the backend ({on_its_way:?}: max_wait + connect_timeout x servers + \
             write_timeout + read_timeout + store.lease_margin, or one drainer try)",
            args.min_age
        );
    }
    let placed = match &args.placed {
        Some(path) => Some(read_placed(path).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let scope = Scope {
        rule: args.rule.clone(),
        sku: args.sku.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(async {
        let store =
            sluice::store::redis::RedisStore::new(&config.store.redis, config.store.result_ttl)
                .context("cannot reach the store")?;
        let report = plan(&store, &scope, placed.as_ref(), args.min_age)
            .await
            .context("cannot read the store")?;
        print!("{}", report.render());
        if report.is_clean() {
            println!("every ledger adds up");
            return Ok(true);
        }
        if !args.apply {
            let n = report.actions().count();
            println!("dry run: {n} change(s) planned; run again with --apply to make them");
            return Ok(false);
        }
        for line in apply(&store, &report, config.store.result_ttl).await {
            println!("{line}");
        }
        let after = plan(&store, &scope, placed.as_ref(), args.min_age)
            .await
            .context("cannot read the store")?;
        print!("after:\n{}", after.render());
        Ok(after.is_clean())
    })
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    // The config says how to log, so it is read first; its problems are
    // printed as `sluice check` prints them.
    // Absolute: the reloader reads the file again by this path, whatever
    // the working directory is by then, and the paths the config resolves
    // against its folder (journal, access log, upgrade socket) come out
    // the same at start and on every reload.
    let path = std::path::absolute(&args.config.config)
        .with_context(|| format!("cannot resolve {}", args.config.config.display()))?;
    let config = sluice::config::load(&path)
        .map_err(|errors| anyhow::anyhow!("invalid config:\n{errors}"))?;
    sluice::logging::init(config.log.format);
    tracing::info!(
        listen = %config.listen,
        admin = %config.admin.listen,
        rules = config.rules.rules().len(),
        upgrade = args.upgrade,
        "sluice starting"
    );
    let gateway = sluice::server::Gateway::build(config, args.upgrade).context("cannot start")?;
    gateway.run();
    tracing::info!("sluice stopped");
    Ok(())
}
