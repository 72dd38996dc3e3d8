//! The flags of `sluice drill` (clap), documented for `--help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

fn duration(s: &str) -> Result<Duration, String> {
    crate::config::units::parse_duration(s)
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio from 0 up to (not including) 1, like 0.9"
        )),
    }
}

/// The text after the flags. clap turns every `{n}` of help text into a
/// line break, with no escape; an empty style reset inside the braces keeps
/// ours as written (clap strips styles when stdout is not a terminal, and
/// a terminal shows nothing for it).
fn after_help() -> String {
    let n = format!("{{{}n}}", clap::builder::styling::Reset.render());
    format!(
        "Placeholders in --path, --header, --body and --browse-path: {{user}} (the user id, \
<user-prefix><number>), {{sku}} (user i buys sku i mod the number of skus), {{qty}} \
(--quantity) and {n} (the request's number in the drill, from 0).

Exit status: 0 when every check passed (or none could run), 1 when a check failed \
or the target never answered, 2 for bad flags, a bad config or an admin API that \
cannot be read.

Example: sluice drill --config gateway.yaml --rule phone-seckill --sku phone-1 \
--users 3000 --attempts-per-user 2 --admin http://127.0.0.1:9901 --stock 100"
    )
}

/// `sluice drill`: play a flash sale against a gateway and report.
#[derive(Args, Clone, Debug)]
#[command(after_help = after_help())]
pub struct DrillArgs {
    /// The gateway's main listener, http://HOST:PORT (default: `listen` of
    /// --config, with 0.0.0.0 read as 127.0.0.1).
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,

    /// Distinct users; their ids are <user-prefix>1 .. <user-prefix>N.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub users: u64,

    /// Order clicks per user (users click in turn: everyone's first
    /// click, then everyone's second). Default 1; with only --duration
    /// given, users keep clicking until the time is up.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
    pub attempts_per_user: Option<u64>,

    /// Keep-alive connections, each sending one request at a time.
    #[arg(long, value_name = "C", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..100_000))]
    pub concurrency: u64,

    /// Driver threads, each running its share of the connections. Default
    /// 1: a drill usually shares the machine with the gateway it drives,
    /// and one thread drives tens of thousands of requests a second.
    #[arg(long, value_name = "T", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..1024))]
    pub threads: u64,

    /// Stop sending after this long (250ms, 30s, 5m); answers still on
    /// their way are awaited.
    #[arg(long, value_name = "D", value_parser = duration)]
    pub duration: Option<Duration>,

    /// The sku(s) to buy (repeat the flag or list several); needed when
    /// the rule or a flag names a sku.
    #[arg(long = "sku", value_name = "S", num_args = 1..)]
    pub skus: Vec<String>,

    /// gateway.yaml, to build the order request from --rule (its method,
    /// path template, and where the user, sku and quantity go).
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// The rule to drill: with --config the request is built from it; the
    /// admin checks read its stock view and per-user limit.
    #[arg(long, value_name = "NAME")]
    pub rule: Option<String>,

    /// Method of the order request (default: the rule's, else POST when
    /// there is a --body, else GET).
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,

    /// Path and query of the order request, with placeholders (replaces
    /// the rule's).
    #[arg(long, value_name = "PATH")]
    pub path: Option<String>,

    /// A header of the order request, "Name: value", with placeholders;
    /// repeatable (replaces a rule header of the same name).
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    pub headers: Vec<String>,

    /// Body of the order request, with placeholders (replaces the rule's
    /// JSON body).
    #[arg(long, value_name = "BODY")]
    pub body: Option<String>,

    /// Units each order asks for (default: the rule's quantity.default, else 1).
    #[arg(long, value_name = "Q", value_parser = clap::value_parser!(u32).range(1..))]
    pub quantity: Option<u32>,

    /// User ids are this followed by the user's number.
    #[arg(long, value_name = "PREFIX", default_value = "u")]
    pub user_prefix: String,

    /// Mix product-page GETs of this path (with placeholders, e.g.
    /// /goods/{sku}) into the orders.
    #[arg(long, value_name = "PATH")]
    pub browse_path: Option<String>,

    /// Share of all requests that are browse GETs, from 0 up to 1
    /// (default 0.9 with --browse-path: most of a sale's traffic looks).
    #[arg(long, value_name = "R", value_parser = ratio, requires = "browse_path")]
    pub browse_ratio: Option<f64>,

    /// The admin listener, http://HOST:PORT: enables the checks that read
    /// the stock view (needs --rule).
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,

    /// The environment variable holding the admin bearer token (default:
    /// admin.token_env of --config, else SLUICE_ADMIN_TOKEN).
    #[arg(long, value_name = "VAR")]
    pub admin_token_env: Option<String>,

    /// How many units each sku had: checks that all of them are
    /// available, held or sold after the drill (with --admin).
    #[arg(long, value_name = "K")]
    pub stock: Option<u64>,

    /// Units one user may win per sku (default: the rule's
    /// stock.per_user_limit, else 1 when its dedup key is user and sku;
    /// without --rule, 1).
    #[arg(long, value_name = "L", value_parser = clap::value_parser!(u32).range(1..))]
    pub per_user_limit: Option<u32>,

    /// Bound on connecting and on each request's whole answer.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = duration)]
    pub timeout: Duration,

    /// How long a queued ticket is polled after its click before it is
    /// reported as still waiting.
    #[arg(long, value_name = "D", default_value = "60s", value_parser = duration)]
    pub ticket_timeout: Duration,

    /// Print the whole report as one JSON object on stdout (no progress bar).
    #[arg(long)]
    pub json: bool,
}
