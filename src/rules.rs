//! Flash-sale rules at run time: the typed model of a rule and the rule
//! set that matches requests to rules by method and path template.
//!
//! Building rules from files is `config`'s job (it owns file loading,
//! secrets and error locations); this module only holds the result and
//! matches against it. The admission pipeline reads these values; nothing
//! here touches a request body.

pub mod template;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use http::{HeaderName, Method};

use crate::outcome::{Outcome, ResponseOverride};
use crate::vocab::UpstreamId;
pub use template::PathTemplate;

/// Where an id or a number is read from in a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldSource {
    /// A request header.
    Header(HeaderName),
    /// A cookie by name.
    Cookie(String),
    /// A query-string parameter.
    Query(String),
    /// A capture of the rule's path template.
    Path(String),
    /// A top-level field of a JSON request body.
    Json(String),
    /// A claim of an HS256 JWT carried in a header (`Bearer` optional).
    Jwt {
        /// The header carrying the token.
        header: HeaderName,
        /// The claim naming the value.
        claim: String,
        /// The environment variable the secret was read from.
        secret_env: String,
        /// The HMAC key, read from `secret_env` when the config was loaded.
        secret: Secret,
    },
}

/// Key material: compared and cloned like bytes, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// Wraps key bytes.
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> Self {
        Self(bytes.into())
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FieldSource {
    /// Whether extracting this needs the request body.
    pub fn needs_body(&self) -> bool {
        matches!(self, FieldSource::Json(_))
    }
}

/// `quantity:`: where the number of units comes from and its bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantitySpec {
    /// Where to read it; `None` means always `default`.
    pub source: Option<FieldSource>,
    /// Used when the field is absent.
    pub default: u32,
    /// Requests over this are `invalid`.
    pub max: u32,
}

/// The campaign window; either end may be open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Before this, `not_started`.
    pub start: Option<DateTime<FixedOffset>>,
    /// From this on, `ended`.
    pub end: Option<DateTime<FixedOffset>>,
}

/// What a token bucket is keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// The client ip (see `trusted_proxies`).
    Ip,
    /// The extracted user id.
    User,
    /// One bucket for the whole rule.
    Rule,
}

/// One token bucket: `rate` tokens every `per`, holding up to `burst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Bucket key.
    pub key: RateKey,
    /// Tokens per period.
    pub rate: NonZeroU32,
    /// The period.
    pub per: Duration,
    /// Bucket size (defaults to `rate`).
    pub burst: NonZeroU32,
}

/// `dedup:`: which parts make an attempt the same, and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    /// Include the user id in the key.
    pub by_user: bool,
    /// Include the sku in the key.
    pub by_sku: bool,
    /// How long a mark lives.
    pub ttl: Duration,
}

/// `admission.queue:`
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    /// How long a winner waits in FIFO for a slot before being `queued`.
    pub max_wait: Duration,
    /// Bound on queued requests.
    pub capacity: u32,
    /// Tries of a queued request whose backend call fails (`release_on`).
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each next one.
    pub backoff: Duration,
    /// How long a queued winner may wait before its units go back (its
    /// lease while queued): an order placed minutes after the click is
    /// worse than a clear "not placed".
    pub max_queue_time: Duration,
}

/// Retries never wait longer than this, however many there are.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl QueueSpec {
    /// The wait after failed try `attempt` (1-based): `backoff`, doubled
    /// for each next one, at most [`MAX_BACKOFF`].
    pub fn backoff_after(&self, attempt: u32) -> Duration {
        self.backoff
            .checked_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .unwrap_or(MAX_BACKOFF)
            .min(MAX_BACKOFF)
    }
}

/// What a rule does while the store cannot answer (`on_failure:`; the
/// rule's own choice over `store.on_failure`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// `unavailable` (503): never sells what it cannot count.
    FailClosed,
    /// Forward without a ticket, at most `store.pass_cap` at a time per
    /// node: the backend's own stock check is the only guard.
    PassCapped,
}

/// `release_on:`: backend failures that return the units to stock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseOn {
    /// The backend could not be connected.
    pub connect_error: bool,
    /// The backend did not answer in `read_timeout`.
    pub timeout: bool,
    /// The backend answered 5xx.
    pub status_5xx: bool,
    /// The backend answered 4xx.
    pub status_4xx: bool,
}

/// Per-outcome answer overrides of a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Responses {
    overrides: Vec<(Outcome, ResponseOverride)>,
}

impl Responses {
    /// Sets the override of one outcome.
    pub fn set(&mut self, outcome: Outcome, o: ResponseOverride) {
        self.overrides.retain(|(k, _)| *k != outcome);
        self.overrides.push((outcome, o));
    }

    /// The override for an outcome, if the rule has one.
    pub fn get(&self, outcome: Outcome) -> Option<&ResponseOverride> {
        self.overrides
            .iter()
            .find(|(k, _)| *k == outcome)
            .map(|(_, o)| o)
    }
}

/// A validated flash-sale rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Unique name; also the `rule` metric label.
    pub name: Arc<str>,
    /// Method to match.
    pub method: Method,
    /// Path template to match.
    pub path: PathTemplate,
    /// Where the user id comes from.
    pub user: FieldSource,
    /// Where the sku comes from.
    pub sku: FieldSource,
    /// Units per attempt.
    pub quantity: QuantitySpec,
    /// Campaign window.
    pub window: Window,
    /// Token buckets, checked in order.
    pub rate_limits: Vec<RateLimit>,
    /// Duplicate-click suppression.
    pub dedup: Option<Dedup>,
    /// Units one user may hold.
    pub per_user_limit: Option<NonZeroU32>,
    /// Where winners go.
    pub upstream: UpstreamId,
    /// Waiting and queueing of winners.
    pub queue: QueueSpec,
    /// Failures that return units.
    pub release_on: ReleaseOn,
    /// Its own `on_failure`, over the store's.
    pub on_failure: Option<FailureMode>,
    /// Answer overrides.
    pub responses: Responses,
    /// Where the rule was written, for logs and `check`.
    pub origin: (PathBuf, u32),
}

/// The rules in force, matched in file order.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Arc<Rule>>,
}

/// A request's rule and the path captures it produced.
pub struct RuleMatch<'r, 'p> {
    /// Its index in the rule set.
    pub index: usize,
    /// The matched rule.
    pub rule: &'r Arc<Rule>,
    /// `(capture name, value)` in template order.
    pub captures: Vec<(&'r str, &'p str)>,
}

impl RuleSet {
    /// A rule set from validated rules.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules: rules.into_iter().map(Arc::new).collect(),
        }
    }

    /// All rules.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule whose method and template match.
    pub fn find<'r, 'p>(&'r self, method: &Method, path: &'p str) -> Option<RuleMatch<'r, 'p>> {
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            if rule.method != *method {
                return None;
            }
            rule.path.matches(path).map(|captures| RuleMatch {
                index,
                rule,
                captures,
            })
        })
    }
}
