//! The `sluice` binary: parses the command line, loads the config and
//! hands over to the library. `anyhow` lives only here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// Sluice: a flash-sale gateway in front of a mall backend.
#[derive(Parser)]
#[command(name = "sluice", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `run` is the default subcommand: `sluice --config F` runs the gateway.
    #[command(flatten)]
    run: ConfigArg,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway (the default).
    Run(ConfigArg),
    /// Validate the config and every rule file; exit 1 listing each problem.
    Check(ConfigArg),
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
        Command::Run(args) => match run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check(args: &ConfigArg) -> ExitCode {
    match sluice::config::load(&args.config) {
        Ok(config) => {
            println!(
                "{}: ok ({} upstreams, {} rules)",
                args.config.display(),
                config.upstreams.len(),
                config.rules.rules().len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(args: &ConfigArg) -> anyhow::Result<()> {
    sluice::logging::init();
    let config = sluice::config::load(&args.config)
        .map_err(|errors| anyhow::anyhow!("invalid config:\n{errors}"))?;
    tracing::info!(
        listen = %config.listen,
        admin = %config.admin.listen,
        rules = config.rules.rules().len(),
        "sluice starting"
    );
    let gateway = sluice::server::Gateway::build(config).context("cannot start")?;
    gateway.run();
    tracing::info!("sluice stopped");
    Ok(())
}
