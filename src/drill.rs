//! `sluice drill`: a full-path load test that plays a flash sale against a
//! running gateway: N distinct users clicking M times over C keep-alive
//! connections, optionally mixed with product-page browsing; a progress
//! bar while it runs; then a report (outcomes, latency percentiles,
//! requests per second, ticket follow-up) and the invariant checks it
//! could verify.
//!
//! It is a client of the gateway, never part of it: it reads `config` and
//! `rules` (to build the request a rule expects) and the outcome
//! vocabulary, and nothing of the gateway's runtime imports it.
//!
//! | module | owns |
//! |---|---|
//! | `args` | the flags |
//! | `template` | text with `{user}`, `{sku}`, `{n}`, `{qty}`, rendered into reused buffers |
//! | `plan` | the order and browse requests, from a rule or from flags |
//! | `conn` | the raw keep-alive HTTP/1.1 client |
//! | `run` | driver threads, workers, the schedule, the progress bar |
//! | `tickets` | following `queued` answers to placed or not |
//! | `stats` | per-thread counts and latency histograms |
//! | `checks` | the admin API's stock view and the invariants |
//! | `report` | text and JSON |

pub mod args;
pub mod checks;
pub mod conn;
pub mod plan;
pub mod report;
pub mod run;
pub mod stats;
pub mod template;
pub mod tickets;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

pub use args::DrillArgs;
use checks::{Admin, Check, SkuViews};
pub use report::Report;

use crate::config::error::ConfigErrors;
use crate::rules::{ReleaseOn, Rule};

/// Why a drill could not run.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// A flag is wrong; the message names it.
    #[error("{flag}: {message}")]
    Flag {
        /// The flag, e.g. `--sku`.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The config or a rule file has problems (each at `path:line:col`).
    #[error("invalid config:\n{0}")]
    Config(ConfigErrors),
    /// The rule cannot be drilled as it is.
    #[error("{0}")]
    Rule(String),
    /// The admin API could not be read.
    #[error("admin API at {addr}: {message}")]
    Admin {
        /// Its address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// A thread or runtime could not start.
    #[error("cannot start the driver: {0}")]
    Io(std::io::Error),
    /// A bug: a driver thread died.
    #[error("{0}")]
    Internal(String),
}

fn flag(flag: &'static str, message: impl Into<String>) -> DrillError {
    DrillError::Flag {
        flag,
        message: message.into(),
    }
}

/// `http://HOST:PORT` as (Host header, address). Resolved once, here,
/// before any request.
fn http_url(name: &'static str, url: &str) -> Result<(String, SocketAddr), DrillError> {
    if url.starts_with("https://") {
        return Err(flag(
            name,
            "https is not supported: drill the plain HTTP listener (the same gateway answers both)",
        ));
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(flag(name, format!("{url:?} is not http://HOST:PORT")));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if !path.is_empty() && path != "/" {
        return Err(flag(
            name,
            format!("{url:?}: give only http://HOST:PORT; the path comes from the rule or --path"),
        ));
    }
    if authority.is_empty() {
        return Err(flag(name, format!("{url:?} names no host")));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| flag(name, format!("cannot resolve {authority}: {e}")))?
        .next()
        .ok_or_else(|| flag(name, format!("{authority} resolves to no address")))?;
    Ok((authority.to_string(), addr))
}

/// The rule named `--rule` in the loaded config.
fn find_rule(config: &crate::config::Config, name: &str) -> Result<Arc<Rule>, DrillError> {
    let rules = config.rules.rules();
    rules
        .iter()
        .find(|r| &*r.name == name)
        .cloned()
        .ok_or_else(|| {
            let known: Vec<&str> = rules.iter().map(|r| &*r.name).collect();
            flag(
                "--rule",
                format!(
                    "no rule named {name:?} in {} (its rules: {})",
                    config.source.display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
}

/// The per-user limit the checks hold users to, if any is known.
fn per_user_limit(args: &DrillArgs, rule: Option<&Rule>) -> Option<u32> {
    if args.per_user_limit.is_some() {
        return args.per_user_limit;
    }
    match rule {
        Some(r) => r.per_user_limit.map(|l| l.get()).or_else(|| {
            r.dedup
                .as_ref()
                .filter(|d| d.by_user && d.by_sku)
                .map(|_| r.quantity.max)
        }),
        None => Some(1),
    }
}

/// Runs the drill the flags describe and gives its report.
pub fn run(args: &DrillArgs) -> Result<Report, DrillError> {
    let config = match &args.config {
        Some(path) => Some(crate::config::load(path).map_err(DrillError::Config)?),
        None => None,
    };
    let rule =
        match (&config, &args.rule) {
            (Some(c), Some(name)) => Some(find_rule(c, name)?),
            (Some(c), None) => {
                let known: Vec<&str> = c.rules.rules().iter().map(|r| &*r.name).collect();
                return Err(flag(
                    "--rule",
                    format!(
                    "--config needs --rule NAME, the rule whose request to send (its rules: {})",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
                ));
            }
            (None, _) => None,
        };
    let target = match (&args.target, &config) {
        (Some(t), _) => t.clone(),
        (None, Some(c)) => {
            let mut listen = c.listen;
            if listen.ip().is_unspecified() {
                listen.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{listen}")
        }
        (None, None) => {
            return Err(flag(
                "--target",
                "give the gateway's address, http://HOST:PORT (or --config to use its listen)",
            ))
        }
    };
    let (host, addr) = http_url("--target", &target)?;
    let plan = plan::build(
        rule.as_deref(),
        &plan::Shape {
            method: args.method.as_deref(),
            path: args.path.as_deref(),
            headers: &args.headers,
            body: args.body.as_deref(),
            quantity: args.quantity,
            browse_path: args.browse_path.as_deref(),
            skus: &args.skus,
            user_prefix: &args.user_prefix,
            users: args.users,
            host,
        },
    )?;
    let concurrency = args.concurrency as usize;
    let threads = (args.threads as usize).min(concurrency);
    let attempts = match (args.attempts_per_user, args.duration) {
        (Some(m), _) => Some(m),
        (None, Some(_)) => None,
        (None, None) => Some(1),
    };
    let orders = match attempts {
        Some(m) => Some(
            args.users
                .checked_mul(m)
                .ok_or_else(|| flag("--attempts-per-user", "users x attempts is too large"))?,
        ),
        None => None,
    };
    let browse_ratio = match (&args.browse_path, args.browse_ratio) {
        (Some(_), r) => r.unwrap_or(0.9),
        (None, _) => 0.0,
    };
    let admin = match &args.admin {
        Some(url) => {
            let (admin_host, admin_addr) = http_url("--admin", url)?;
            let token_env = args
                .admin_token_env
                .clone()
                .or_else(|| config.as_ref().and_then(|c| c.admin.token_env.clone()))
                .unwrap_or_else(|| "SLUICE_ADMIN_TOKEN".to_string());
            let token = std::env::var(&token_env).ok().filter(|t| !t.is_empty());
            if args.rule.is_none() {
                return Err(flag(
                    "--admin",
                    "the checks read the stock view of a rule: give --rule NAME",
                ));
            }
            if plan.skus.iter().all(String::is_empty) {
                return Err(flag(
                    "--admin",
                    "the checks read the stock view of each sku: give --sku",
                ));
            }
            Some(Admin::new(admin_addr, admin_host, token, token_env))
        }
        None => None,
    };
    if args.stock.is_some() && admin.is_none() {
        return Err(flag(
            "--stock",
            "the units are checked against the stock view: give --admin too",
        ));
    }
    let rule_name = args.rule.clone().unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DrillError::Io)?;
    let before = match &admin {
        Some(a) => Some(runtime.block_on(a.views(&rule_name, &plan.skus))?),
        None => None,
    };
    let load = run::Load {
        addr,
        concurrency,
        threads,
        schedule: run::Schedule {
            users: args.users,
            orders,
            // Rounded to parts per million; never 0 orders (the ratio is < 1).
            order_ppm: ((1.0 - browse_ratio) * 1e6).round().max(1.0) as u64,
        },
        duration: args.duration,
        timeout: args.timeout,
        ticket_timeout: args.ticket_timeout,
        release_on: rule.as_ref().map_or(
            ReleaseOn {
                connect_error: true,
                timeout: true,
                status_5xx: true,
                status_4xx: false,
            },
            |r| r.release_on,
        ),
        progress: !args.json,
    };
    let plan = Arc::new(plan);
    let ran = run::run(plan.clone(), &load)?;
    let mut checks: Vec<Check> = Vec::new();
    let mut views = Vec::new();
    if ran.stats.answered(stats::Kind::Order) + ran.stats.answered(stats::Kind::Browse) == 0 {
        let e = ran.stats.errors[0];
        checks.push(Check {
            name: "target answered".into(),
            pass: false,
            detail: format!(
                "no answer from {target}: {} connect errors, {} broken, {} timeouts",
                e.connect, e.io, e.timeouts
            ),
        });
    }
    if let Some(limit) = per_user_limit(args, rule.as_deref()) {
        checks.push(checks::per_user(&ran.stats.wins, &plan.skus, limit));
    }
    if let (Some(a), Some(before)) = (&admin, before) {
        let after = runtime.block_on(a.settled_views(&rule_name, &plan.skus))?;
        let sku_views: Vec<SkuViews<'_>> = plan
            .skus
            .iter()
            .zip(before.iter().zip(after.iter()))
            .map(|(sku, (b, a))| SkuViews {
                sku,
                before: *b,
                after: *a,
            })
            .collect();
        let won = checks::won_per_sku(&ran.stats.wins, plan.skus.len());
        checks.insert(0, checks::winners_sold(&sku_views, &won));
        checks.push(checks::adds_up(&sku_views));
        if let Some(k) = args.stock {
            checks.push(checks::stock_matches(&sku_views, k));
        }
        views = plan.skus.iter().cloned().zip(after).collect();
    }
    let request = format!("{} {}", plan.order.method, plan.order.target.pattern());
    Ok(Report {
        meta: report::Meta {
            target,
            rule: args.rule.clone(),
            request,
            browse: args.browse_path.clone(),
            users: args.users,
            attempts_per_user: attempts,
            concurrency,
            threads,
            duration: args.duration,
            skus: plan.skus.clone(),
            quantity: plan.quantity,
        },
        stats: ran.stats,
        load_time: ran.load_time,
        total_time: ran.total_time,
        views,
        checks,
    })
}
