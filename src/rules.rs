//! Flash-sale rules at run time: the typed model of a rule and the rule
//! set that matches requests to rules by method and the canonical form of
//! their path (`canonical`), against path templates (`template`); and the
//! read-cache rules, matched exactly (`cache`).
//!
//! Building rules from files is `config`'s job (it owns file loading,
//! secrets and error locations); this module only holds the result and
//! matches against it. The admission pipeline reads these values; nothing
//! here touches a request body.

pub mod cache;
pub mod canonical;
pub mod template;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset};
use http::{HeaderName, Method};

use crate::outcome::{Outcome, ResponseOverride};
use crate::vocab::UpstreamId;
pub use cache::{CacheRule, CacheRules, KeyPart};
pub use canonical::{Fold, Spelling, Variants};
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
    /// Path template to match, with how it treats other spellings.
    pub path: PathTemplate,
    /// What a request of another method to the rule's path gets.
    pub other_methods: OtherMethods,
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

/// What a request gets that reaches a rule's path with another method
/// (`match.other_methods`). Many legacy handlers take any method (a PHP
/// script reading `$_REQUEST`, ThinkPHP's `Route::rule`, a Spring
/// `@RequestMapping` without `method`), so a `GET` or `PUT` of the order
/// path would place an order past admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtherMethods {
    /// Answered `invalid` (`refuse`, the default).
    Refuse,
    /// Proxied as an unmatched request (`pass`): the backend serves
    /// another method on that path (an order's status, a CORS preflight).
    Pass,
}

impl Rule {
    /// Whether a request of `method`, another than the rule's, is refused
    /// on the rule's paths: by `other_methods: refuse`, and always a HEAD
    /// on a GET rule's, which every framework serves with the GET handler.
    pub fn refuses(&self, method: &Method) -> bool {
        self.other_methods == OtherMethods::Refuse
            || (*method == Method::HEAD && self.method == Method::GET)
    }

    /// Whether a request of `method` on the rule's paths is the rule's to
    /// judge: its own method in any letter case, or one it refuses.
    fn judges(&self, method: &Method) -> bool {
        self.method.as_str().eq_ignore_ascii_case(method.as_str()) || self.refuses(method)
    }
}

impl OtherMethods {
    /// The config word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            OtherMethods::Refuse => "refuse",
            OtherMethods::Pass => "pass",
        }
    }
}

/// The rules in force, matched in file order.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    rules: Vec<Arc<Rule>>,
}

/// Where stage 1 sends a request.
pub enum Route<'r> {
    /// No rule: the request is proxied unchanged.
    Unmatched,
    /// A rule matched.
    Rule(RuleMatch<'r>),
    /// A spelling of a rule's route that the gateway refuses as `invalid`.
    Refused(Refusal<'r>),
}

/// A request's rule, the path captures it produced and the path the
/// backend receives.
pub struct RuleMatch<'r> {
    /// Its index in the rule set.
    pub index: usize,
    /// The matched rule.
    pub rule: &'r Arc<Rule>,
    /// `(capture name, value)` in template order, from the canonical path.
    pub captures: Vec<(&'r str, String)>,
    /// The rule's own spelling of the request's path: forwarded instead
    /// of the request's when they differ.
    pub path: String,
}

/// A request that reaches a rule only through a spelling it refuses.
pub struct Refusal<'r> {
    /// The rule's index in the rule set.
    pub index: usize,
    /// The rule.
    pub rule: &'r Arc<Rule>,
    /// Why, for the client (names the canonical spelling when there is one).
    pub message: String,
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

    /// Whether some rule is for exactly this method: when none is,
    /// [`RuleSet::find`] can only answer `Unmatched` or a refusal.
    pub fn has_method(&self, method: &[u8]) -> bool {
        self.rules
            .iter()
            .any(|r| r.method.as_str().as_bytes() == method)
    }

    /// Stage 1: the first rule whose method and template match the
    /// canonical form of `path` (no query), or a refusal when the request
    /// reaches a rule's route only by a spelling that must not pass: a
    /// method in other letter case (methods are case-sensitive, RFC 9110
    /// 9.1), another spelling when the rule says `variants: refuse`, or a
    /// path that matches only once escapes of reserved characters (`%2F`),
    /// double encodings or backslashes are decoded.
    pub fn find(&self, method: &Method, path: &str) -> Route<'_> {
        if !path.starts_with('/') {
            // `*` and authority-form targets name no path a rule has.
            return Route::Unmatched;
        }
        // One canonical form per `params` mode in use, made on demand.
        let mut normal: [Option<canonical::NormalPath>; 2] = [None, None];
        let mut other_case: Option<(usize, &Arc<Rule>, String)> = None;
        let mut other_method: Option<(usize, &Arc<Rule>, String)> = None;
        for (index, rule) in self.rules.iter().enumerate() {
            if !rule.judges(method) {
                continue;
            }
            let same = rule.method == *method;
            let case_only = !same && rule.method.as_str().eq_ignore_ascii_case(method.as_str());
            let params = rule.path.spelling().params;
            let canonical =
                normal[params.index()].get_or_insert_with(|| canonical::normalize(path, params));
            let Some(captures) = rule.path.matches(canonical) else {
                continue;
            };
            let own = rule.path.render(&captures);
            if case_only {
                other_case.get_or_insert((index, rule, own));
                continue;
            }
            if !same {
                // Another rule may take this method on the same path.
                other_method.get_or_insert((index, rule, own));
                continue;
            }
            if own != path && rule.path.spelling().variants == Variants::Refuse {
                return Route::Refused(Refusal {
                    index,
                    rule,
                    message: format!("the path is not this route's own spelling: send it as {own}"),
                });
            }
            return Route::Rule(RuleMatch {
                index,
                rule,
                captures: captures
                    .into_iter()
                    .map(|(k, v)| (k, v.to_string()))
                    .collect(),
                path: own,
            });
        }
        // A method refusal names the request the rule takes.
        let wrong_method = match (other_case, other_method) {
            (Some(m), _) => Some((m, "methods are case-sensitive: send".to_string())),
            (None, Some(m)) => Some((m, format!("{method} is not taken here, this route takes"))),
            (None, None) => None,
        };
        if let Some(((index, rule, own), why)) = wrong_method {
            return Route::Refused(Refusal {
                index,
                rule,
                message: format!("{why} {} {own}", rule.method.as_str()),
            });
        }
        self.lenient_refusal(method, path)
            .map_or(Route::Unmatched, Route::Refused)
    }

    /// A refusal for a path that reaches a rule only as a lenient backend
    /// reads it (`canonical::lenient`).
    fn lenient_refusal(&self, method: &Method, path: &str) -> Option<Refusal<'_>> {
        // One lenient reading per `case` mode in use, made on demand.
        let mut read: [Option<Option<String>>; 2] = [None, None];
        self.rules.iter().enumerate().find_map(|(index, rule)| {
            if !rule.judges(method) {
                return None;
            }
            let spelling = rule.path.spelling();
            let read = read[spelling.case.index()]
                .get_or_insert_with(|| canonical::lenient(path, spelling.case))
                .as_deref()?;
            let canonical = canonical::normalize(read, spelling.params);
            let captures = rule.path.matches(&canonical)?;
            Some(Refusal {
                index,
                rule,
                message: format!(
                    "the path reaches this route only once its escapes or backslashes are decoded or its segments trimmed: send {} {}",
                    rule.method.as_str(),
                    rule.path.render(&captures)
                ),
            })
        })
    }
}
