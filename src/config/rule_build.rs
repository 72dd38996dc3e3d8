//! Validation of one raw rule into a [`Rule`], recording every problem
//! with its location instead of stopping at the first.

use std::ffi::OsString;
use std::num::NonZeroU32;
use std::sync::Arc;

use bytes::Bytes;
use chrono::DateTime;
use http::{HeaderName, HeaderValue, Method, StatusCode};
use serde_saphyr::{Location, Spanned};

use super::error::Problems;
use super::rule_raw::{RawMatch, RawRule, RawSku, RawUser};
use crate::outcome::{Outcome, ResponseOverride};
use crate::rules::{
    Dedup, FailureMode, FieldSource, Fold, OtherMethods, PathTemplate, QuantitySpec, QueueSpec,
    RateKey, RateLimit, ReleaseOn, Responses, Rule, Secret, Spelling, Variants, Window,
};
use crate::vocab::UpstreamId;

/// Units one attempt may ask for, at most.
pub const MAX_QUANTITY: u32 = 1000;

/// Reads an environment variable (the real environment, or a stand-in in
/// tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// What a rule may refer to outside itself.
pub struct RuleContext<'a> {
    /// Upstream names, indexed by `UpstreamId`.
    pub upstreams: &'a [String],
    /// Where `admission.upstream` defaults to.
    pub default_upstream: UpstreamId,
    /// Where JWT secrets are read from.
    pub env: EnvLookup<'a>,
}

/// Defaults for keys a rule leaves out, in one place.
pub mod defaults {
    use std::time::Duration;
    /// `dedup.ttl`
    pub const DEDUP_TTL: Duration = Duration::from_secs(600);
    /// `admission.queue.max_wait`
    pub const QUEUE_MAX_WAIT: Duration = Duration::from_secs(1);
    /// `admission.queue.capacity`
    pub const QUEUE_CAPACITY: u32 = 10_000;
    /// `admission.queue.max_attempts`
    pub const QUEUE_MAX_ATTEMPTS: u32 = 3;
    /// `admission.queue.backoff`
    pub const QUEUE_BACKOFF: Duration = Duration::from_millis(200);
    /// `admission.queue.max_queue_time`
    pub const QUEUE_MAX_QUEUE_TIME: Duration = Duration::from_secs(300);
    /// `user.jwt.header`
    pub const JWT_HEADER: &str = "authorization";
    /// `match.variants`, `match.case`, `match.trailing_slash`,
    /// `match.params`, `match.suffix` (defined with the type).
    pub const SPELLING: crate::rules::Spelling = crate::rules::Spelling::DEFAULT;
}

/// Builds a rule, or records its problems and gives `None`.
pub fn build_rule(raw: &Spanned<RawRule>, ctx: &RuleContext, p: &mut Problems) -> Option<Rule> {
    let r = &raw.value;
    let errors_before = p.count();

    let at = raw.referenced;
    let name = p
        .required(at, "name", &r.name)
        .and_then(|n| check_name(p, n));
    let matcher = p.required(at, "match", &r.matcher);
    let method = matcher.and_then(|m| check_method(p, &m.value.method));
    let other_methods = matcher.and_then(|m| other_methods(p, &m.value));
    let path = matcher.and_then(|m| {
        let spelling = spelling(p, &m.value);
        let template = p.check(
            m.value.path.referenced,
            PathTemplate::parse(&m.value.path.value).map_err(|e| format!("match.path: {e}")),
        );
        Some(template?.with_spelling(spelling?))
    });
    let user = p
        .required(at, "user", &r.user)
        .and_then(|u| user_source(p, u, ctx.env));
    let sku = p
        .required(at, "sku", &r.sku)
        .and_then(|s| sku_source(p, s, path.as_ref()));
    let quantity = quantity(p, r);
    let window = window(p, r);
    let rate_limits = rate_limits(p, r);
    let dedup = dedup(p, r);
    let per_user_limit = r.stock.as_ref().and_then(|s| {
        s.value
            .per_user_limit
            .as_ref()
            .and_then(|n| positive_u32(p, n, "stock.per_user_limit"))
    });
    let (upstream, queue) = admission(p, r, ctx);
    let release_on = release_on(p, r);
    let responses = responses(p, r);

    if p.count() > errors_before {
        return None;
    }
    Some(Rule {
        name: name?,
        method: method?,
        path: path?,
        other_methods: other_methods?,
        user: user?,
        sku: sku?,
        quantity: quantity?,
        window: window?,
        rate_limits,
        dedup,
        per_user_limit,
        upstream: upstream?,
        queue,
        release_on,
        on_failure: on_failure(p, r),
        responses,
        origin: (p.file().to_path_buf(), raw.referenced.line() as u32),
    })
}

/// Rule names become metric labels and Redis key parts: keep them plain.
pub(super) fn check_name(p: &mut Problems, name: &Spanned<String>) -> Option<Arc<str>> {
    let n = name.value.as_str();
    let plain = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !plain {
        p.add(
            name.referenced,
            format!("name: {n:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"),
        );
        return None;
    }
    if n == "none" {
        p.add(
            name.referenced,
            "name: \"none\" is reserved for requests that match no rule",
        );
        return None;
    }
    Some(Arc::from(n))
}

fn check_method(p: &mut Problems, m: &Spanned<String>) -> Option<Method> {
    let text = m.value.as_str();
    let valid = !text.is_empty() && text.chars().all(|c| c.is_ascii_uppercase());
    let parsed = Method::from_bytes(text.as_bytes()).ok().filter(|_| valid);
    if parsed.is_none() {
        p.add(
            m.referenced,
            format!("match.method: {text:?} is not an uppercase HTTP method like POST"),
        );
    }
    parsed
}

/// One of a key's words (`match.<field>`), or `default` when absent.
fn keyword<T: Copy>(
    p: &mut Problems,
    field: &str,
    v: &Option<Spanned<String>>,
    default: T,
    words: &[(&str, T)],
) -> Option<T> {
    let Some(v) = v else {
        return Some(default);
    };
    if let Some(&(_, value)) = words.iter().find(|(w, _)| *w == v.value) {
        return Some(value);
    }
    let names: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
    p.add(
        v.referenced,
        format!(
            "match.{field}: {:?} is not one of {}",
            v.value,
            names.join(", ")
        ),
    );
    None
}

/// `match.other_methods`: `refuse` (the default) or `pass`.
fn other_methods(p: &mut Problems, m: &RawMatch) -> Option<OtherMethods> {
    let words = [
        ("refuse", OtherMethods::Refuse),
        ("pass", OtherMethods::Pass),
    ];
    keyword(
        p,
        "other_methods",
        &m.other_methods,
        OtherMethods::Refuse,
        &words,
    )
}

/// `match.variants` and the `ignore | strict` keys beside it.
fn spelling(p: &mut Problems, m: &RawMatch) -> Option<Spelling> {
    let d = defaults::SPELLING;
    let variants = [("forward", Variants::Forward), ("refuse", Variants::Refuse)];
    let variants = keyword(p, "variants", &m.variants, d.variants, &variants);
    let folds = [("ignore", Fold::Ignore), ("strict", Fold::Strict)];
    let mut fold = |field: &str, v: &Option<Spanned<String>>, default: Fold| {
        keyword(p, field, v, default, &folds)
    };
    let case = fold("case", &m.case, d.case);
    let trailing_slash = fold("trailing_slash", &m.trailing_slash, d.trailing_slash);
    let params = fold("params", &m.params, d.params);
    let suffix = fold("suffix", &m.suffix, d.suffix);
    Some(Spelling {
        variants: variants?,
        case: case?,
        trailing_slash: trailing_slash?,
        params: params?,
        suffix: suffix?,
    })
}

fn header_name(p: &mut Problems, field: &str, v: &Spanned<String>) -> Option<HeaderName> {
    let parsed = HeaderName::from_bytes(v.value.as_bytes()).ok();
    if parsed.is_none() {
        p.add(
            v.referenced,
            format!("{field}: {:?} is not a valid header name", v.value),
        );
    }
    parsed
}

fn plain_field(p: &mut Problems, field: &str, v: &Spanned<String>) -> Option<String> {
    if v.value.trim().is_empty() {
        p.add(v.referenced, format!("{field}: must not be empty"));
        return None;
    }
    Some(v.value.clone())
}

/// Records "exactly one of" problems; gives the single choice's index.
fn exactly_one(
    p: &mut Problems,
    at: Location,
    field: &str,
    names: &[&str],
    set: &[bool],
) -> Option<usize> {
    let chosen: Vec<usize> = (0..set.len()).filter(|&i| set[i]).collect();
    match chosen.as_slice() {
        [one] => Some(*one),
        [] => {
            p.add(at, format!("{field}: needs one of {}", names.join(", ")));
            None
        }
        _ => {
            p.add(
                at,
                format!("{field}: give only one of {}", names.join(", ")),
            );
            None
        }
    }
}

fn user_source(p: &mut Problems, user: &Spanned<RawUser>, env: EnvLookup) -> Option<FieldSource> {
    let u = &user.value;
    let which = exactly_one(
        p,
        user.referenced,
        "user",
        &["header", "cookie", "query", "jwt"],
        &[
            u.header.is_some(),
            u.cookie.is_some(),
            u.query.is_some(),
            u.jwt.is_some(),
        ],
    )?;
    match which {
        0 => header_name(p, "user.header", u.header.as_ref()?).map(FieldSource::Header),
        1 => plain_field(p, "user.cookie", u.cookie.as_ref()?).map(FieldSource::Cookie),
        2 => plain_field(p, "user.query", u.query.as_ref()?).map(FieldSource::Query),
        _ => {
            let jwt = &u.jwt.as_ref()?.value;
            let claim = plain_field(p, "user.jwt.claim", &jwt.claim);
            let secret_env = plain_field(p, "user.jwt.secret_env", &jwt.secret_env);
            // Read now, so a missing secret is reported here, at its key,
            // by `sluice check` and a reload alike, not by every request.
            let secret = secret_env.as_ref().and_then(|var| {
                let secret = env(var)
                    .map(OsString::into_encoded_bytes)
                    .filter(|s| !s.is_empty());
                if secret.is_none() {
                    p.add(
                        jwt.secret_env.referenced,
                        format!(
                            "user.jwt.secret_env: environment variable {var} is unset or empty"
                        ),
                    );
                }
                secret.map(Secret::new)
            });
            let header = match &jwt.header {
                Some(h) => header_name(p, "user.jwt.header", h),
                None => Some(HeaderName::from_static(defaults::JWT_HEADER)),
            };
            Some(FieldSource::Jwt {
                header: header?,
                claim: claim?,
                secret_env: secret_env?,
                secret: secret?,
            })
        }
    }
}

fn sku_source(
    p: &mut Problems,
    sku: &Spanned<RawSku>,
    path: Option<&PathTemplate>,
) -> Option<FieldSource> {
    let s = &sku.value;
    let which = exactly_one(
        p,
        sku.referenced,
        "sku",
        &["path", "query", "header", "json"],
        &[
            s.path.is_some(),
            s.query.is_some(),
            s.header.is_some(),
            s.json.is_some(),
        ],
    )?;
    match which {
        0 => {
            let capture = s.path.as_ref()?;
            if let Some(t) = path {
                if !t.has_capture(&capture.value) {
                    p.add(
                        capture.referenced,
                        format!(
                            "sku.path: {:?} is not a capture of match.path {:?}",
                            capture.value,
                            t.as_str()
                        ),
                    );
                    return None;
                }
            }
            Some(FieldSource::Path(capture.value.clone()))
        }
        1 => plain_field(p, "sku.query", s.query.as_ref()?).map(FieldSource::Query),
        2 => header_name(p, "sku.header", s.header.as_ref()?).map(FieldSource::Header),
        _ => plain_field(p, "sku.json", s.json.as_ref()?).map(FieldSource::Json),
    }
}

fn positive_u32(p: &mut Problems, n: &Spanned<i64>, field: &str) -> Option<NonZeroU32> {
    let parsed = u32::try_from(n.value).ok().and_then(NonZeroU32::new);
    if parsed.is_none() {
        p.add(
            n.referenced,
            format!(
                "{field}: {} must be a whole number from 1 to {}",
                n.value,
                u32::MAX
            ),
        );
    }
    parsed
}

fn quantity(p: &mut Problems, r: &RawRule) -> Option<QuantitySpec> {
    let Some(q) = &r.quantity else {
        return Some(QuantitySpec {
            source: None,
            default: 1,
            max: 1,
        });
    };
    let v = &q.value;
    let sources = [v.json.is_some(), v.query.is_some(), v.header.is_some()];
    let source = if sources.iter().any(|s| *s) {
        match exactly_one(
            p,
            q.referenced,
            "quantity",
            &["json", "query", "header"],
            &sources,
        )? {
            0 => plain_field(p, "quantity.json", v.json.as_ref()?).map(FieldSource::Json),
            1 => plain_field(p, "quantity.query", v.query.as_ref()?).map(FieldSource::Query),
            _ => header_name(p, "quantity.header", v.header.as_ref()?).map(FieldSource::Header),
        }
    } else {
        None
    };
    let default = match &v.default {
        Some(d) => positive_u32(p, d, "quantity.default")?.get(),
        None => 1,
    };
    let max = match &v.max {
        Some(m) => positive_u32(p, m, "quantity.max")?.get(),
        None => default,
    };
    // Each unit is one LMOVE in the reservation's transaction: keep a
    // single attempt's work bounded.
    if max > MAX_QUANTITY {
        let at = v
            .max
            .as_ref()
            .or(v.default.as_ref())
            .map_or(q.referenced, |m| m.referenced);
        p.add(
            at,
            format!("quantity.max: {max} is over the limit of {MAX_QUANTITY} units per attempt"),
        );
        return None;
    }
    if max < default {
        let at = v.max.as_ref().map_or(q.referenced, |m| m.referenced);
        p.add(
            at,
            format!("quantity.max: {max} is below quantity.default {default}"),
        );
        return None;
    }
    Some(QuantitySpec {
        source,
        default,
        max,
    })
}

fn window(p: &mut Problems, r: &RawRule) -> Option<Window> {
    let Some(w) = &r.window else {
        return Some(Window::default());
    };
    let parse = |p: &mut Problems, field: &str, v: &Option<Spanned<String>>| {
        match v {
        None => Some(None),
        Some(s) => p
            .check(
                s.referenced,
                DateTime::parse_from_rfc3339(&s.value).map_err(|e| {
                    format!(
                        "{field}: {:?} is not an RFC 3339 time like 2026-11-11T00:00:00+08:00 ({e})",
                        s.value
                    )
                }),
            )
            .map(Some),
    }
    };
    let start = parse(p, "window.start", &w.value.start);
    let end = parse(p, "window.end", &w.value.end);
    let (start, end) = (start?, end?);
    if let (Some(s), Some(e), Some(at)) = (start, end, w.value.end.as_ref()) {
        if e <= s {
            p.add(at.referenced, "window.end: must be after window.start");
            return None;
        }
    }
    Some(Window { start, end })
}

fn rate_limits(p: &mut Problems, r: &RawRule) -> Vec<RateLimit> {
    let mut out = Vec::new();
    for (i, rl) in r.rate_limits.iter().enumerate() {
        let v = &rl.value;
        let field = format!("rate_limits[{i}]");
        let key = match v.key.value.as_str() {
            "ip" => Some(RateKey::Ip),
            "user" => Some(RateKey::User),
            "rule" => Some(RateKey::Rule),
            other => {
                p.add(
                    v.key.referenced,
                    format!("{field}.key: {other:?} is not one of ip, user, rule"),
                );
                None
            }
        };
        let rate = positive_u32(p, &v.rate, &format!("{field}.rate"));
        let per = p
            .duration(&format!("{field}.per"), &v.per)
            .unwrap_or_default();
        if per.is_zero() && v.per.value.0.is_ok() {
            p.add(v.per.referenced, format!("{field}.per: must be above 0"));
        }
        let burst = match &v.burst {
            Some(b) => positive_u32(p, b, &format!("{field}.burst")),
            None => rate,
        };
        if let (Some(key), Some(rate), Some(burst), false) = (key, rate, burst, per.is_zero()) {
            // governor refills one token every per/rate; under 1ns it cannot.
            if per.as_nanos() < u128::from(rate.get()) {
                p.add(
                    v.rate.referenced,
                    format!("{field}.rate: {rate} per {per:?} is finer than 1ns per token"),
                );
                continue;
            }
            out.push(RateLimit {
                key,
                rate,
                per,
                burst,
            });
        }
    }
    out
}

fn dedup(p: &mut Problems, r: &RawRule) -> Option<Dedup> {
    let d = r.dedup.as_ref()?;
    let mut by_user = false;
    let mut by_sku = false;
    for k in &d.value.key.value {
        let slot = match k.value.as_str() {
            "user" => &mut by_user,
            "sku" => &mut by_sku,
            other => {
                p.add(
                    k.referenced,
                    format!("dedup.key: {other:?} is not one of user, sku"),
                );
                continue;
            }
        };
        if *slot {
            p.add(
                k.referenced,
                format!("dedup.key: {:?} is listed twice", k.value),
            );
        }
        *slot = true;
    }
    if d.value.key.value.is_empty() {
        p.add(
            d.value.key.referenced,
            "dedup.key: needs at least one of user, sku",
        );
    }
    let ttl = match &d.value.ttl {
        Some(t) => p.duration("dedup.ttl", t).unwrap_or(defaults::DEDUP_TTL),
        None => defaults::DEDUP_TTL,
    };
    if ttl.is_zero() {
        if let Some(t) = &d.value.ttl {
            p.add(t.referenced, "dedup.ttl: must be above 0");
        }
    }
    Some(Dedup {
        by_user,
        by_sku,
        ttl,
    })
}

fn admission(p: &mut Problems, r: &RawRule, ctx: &RuleContext) -> (Option<UpstreamId>, QueueSpec) {
    let mut queue = QueueSpec {
        max_wait: defaults::QUEUE_MAX_WAIT,
        capacity: defaults::QUEUE_CAPACITY,
        max_attempts: defaults::QUEUE_MAX_ATTEMPTS,
        backoff: defaults::QUEUE_BACKOFF,
        max_queue_time: defaults::QUEUE_MAX_QUEUE_TIME,
    };
    let Some(a) = &r.admission else {
        return (Some(ctx.default_upstream), queue);
    };
    let upstream = match &a.value.upstream {
        None => Some(ctx.default_upstream),
        Some(name) => {
            let found = ctx.upstreams.iter().position(|u| *u == name.value);
            if found.is_none() {
                p.add(
                    name.referenced,
                    format!(
                        "admission.upstream: {:?} is not defined under upstreams (defined: {})",
                        name.value,
                        ctx.upstreams.join(", ")
                    ),
                );
            }
            found.map(UpstreamId)
        }
    };
    if let Some(q) = &a.value.queue {
        if let Some(w) = &q.value.max_wait {
            queue.max_wait = p
                .duration("admission.queue.max_wait", w)
                .unwrap_or(queue.max_wait);
        }
        if let Some(c) = &q.value.capacity {
            if let Some(c) = positive_u32(p, c, "admission.queue.capacity") {
                queue.capacity = c.get();
            }
        }
        if let Some(n) = &q.value.max_attempts {
            if let Some(n) = positive_u32(p, n, "admission.queue.max_attempts") {
                queue.max_attempts = n.get();
            }
        }
        if let Some(b) = &q.value.backoff {
            queue.backoff = p
                .duration("admission.queue.backoff", b)
                .unwrap_or(queue.backoff);
        }
        if let Some(t) = &q.value.max_queue_time {
            queue.max_queue_time = p
                .duration("admission.queue.max_queue_time", t)
                .filter(|d| {
                    let ok = !d.is_zero();
                    if !ok {
                        p.add(
                            t.referenced,
                            "admission.queue.max_queue_time: must be more than 0s",
                        );
                    }
                    ok
                })
                .unwrap_or(queue.max_queue_time);
        }
    }
    (upstream, queue)
}

fn on_failure(p: &mut Problems, r: &RawRule) -> Option<FailureMode> {
    let f = r.on_failure.as_ref()?;
    match f.value.as_str() {
        "fail_closed" => Some(FailureMode::FailClosed),
        "pass_capped" => Some(FailureMode::PassCapped),
        other => {
            p.add(
                f.referenced,
                format!("on_failure: {other:?} is not one of fail_closed, pass_capped"),
            );
            None
        }
    }
}

fn release_on(p: &mut Problems, r: &RawRule) -> ReleaseOn {
    let Some(list) = &r.release_on else {
        return ReleaseOn {
            connect_error: true,
            timeout: true,
            status_5xx: true,
            status_4xx: false,
        };
    };
    let mut on = ReleaseOn::default();
    for item in list {
        match item.value.as_str() {
            "connect_error" => on.connect_error = true,
            "timeout" => on.timeout = true,
            "5xx" => on.status_5xx = true,
            "4xx" => on.status_4xx = true,
            other => p.add(
                item.referenced,
                format!("release_on: {other:?} is not one of connect_error, timeout, 5xx, 4xx"),
            ),
        }
    }
    on
}

fn responses(p: &mut Problems, r: &RawRule) -> Responses {
    let mut out = Responses::default();
    let Some(rs) = &r.responses else {
        return out;
    };
    let v = &rs.value;
    let entries = [
        (Outcome::Queued, &v.queued),
        (Outcome::SoldOut, &v.sold_out),
        (Outcome::RateLimited, &v.rate_limited),
        (Outcome::Duplicate, &v.duplicate),
        (Outcome::NotStarted, &v.not_started),
        (Outcome::Ended, &v.ended),
        (Outcome::Invalid, &v.invalid),
        (Outcome::Unavailable, &v.unavailable),
    ];
    for (outcome, entry) in entries {
        let Some(e) = entry else { continue };
        let field = format!("responses.{}", outcome.as_str());
        let mut o = ResponseOverride::default();
        if let Some(s) = &e.value.status {
            let status = u16::try_from(s.value)
                .ok()
                .filter(|c| (200..=599).contains(c))
                .and_then(|c| StatusCode::from_u16(c).ok());
            match status {
                Some(st) => o.status = Some(st),
                None => p.add(
                    s.referenced,
                    format!(
                        "{field}.status: {} is not an HTTP status from 200 to 599",
                        s.value
                    ),
                ),
            }
        }
        if let Some(h) = &e.value.headers {
            for (name, value) in &h.value {
                let n = HeaderName::from_bytes(name.as_bytes());
                let val = HeaderValue::from_str(value);
                match (n, val) {
                    (Ok(n), Ok(val)) => o.headers.push((n, val)),
                    _ => p.add(
                        h.referenced,
                        format!("{field}.headers: {name:?}: {value:?} is not a valid header"),
                    ),
                }
            }
        }
        o.body = e.value.body.clone().map(Bytes::from);
        out.set(outcome, o);
    }
    out
}
