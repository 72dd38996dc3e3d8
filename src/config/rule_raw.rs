//! Serde structs that mirror a rule file in `lua-free-rules/` exactly.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::units::{ByteSize, ConfigDuration};

/// A rule file: `rules:` (flash-sale rules) and `cache:` (read-cache
/// rules), each a list and each optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuleFile {
    #[serde(default)]
    pub rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    pub cache: Vec<Spanned<RawCacheRule>>,
}

/// One read-cache rule, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheRule {
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    #[serde(rename = "match", default)]
    pub matcher: Option<Spanned<RawCacheMatch>>,
    #[serde(default)]
    pub ttl: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub stale_while_revalidate: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub stale_if_error: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub key: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub max_body: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub statuses: Option<Spanned<Vec<Spanned<i64>>>>,
    #[serde(default)]
    pub lock_timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
}

/// A cache rule's `match:`: method and path template only (matched
/// exactly; see `rules::cache`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheMatch {
    pub method: Spanned<String>,
    pub path: Spanned<String>,
}

/// One rule, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    // Required keys are optional here so that a missing one is reported
    // at the rule, together with its other problems.
    #[serde(default)]
    pub name: Option<Spanned<String>>,
    #[serde(rename = "match", default)]
    pub matcher: Option<Spanned<RawMatch>>,
    #[serde(default)]
    pub user: Option<Spanned<RawUser>>,
    #[serde(default)]
    pub sku: Option<Spanned<RawSku>>,
    #[serde(default)]
    pub quantity: Option<Spanned<RawQuantity>>,
    #[serde(default)]
    pub window: Option<Spanned<RawWindow>>,
    #[serde(default)]
    pub rate_limits: Vec<Spanned<RawRateLimit>>,
    #[serde(default)]
    pub dedup: Option<Spanned<RawDedup>>,
    #[serde(default)]
    pub stock: Option<Spanned<RawStock>>,
    #[serde(default)]
    pub admission: Option<Spanned<RawAdmission>>,
    #[serde(default)]
    pub release_on: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub on_failure: Option<Spanned<String>>,
    #[serde(default)]
    pub responses: Option<Spanned<RawResponses>>,
}

/// `match:`: method, path template, and how other spellings of the path
/// are treated (each optional; see `rules::Spelling::DEFAULT`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub method: Spanned<String>,
    pub path: Spanned<String>,
    #[serde(default)]
    pub variants: Option<Spanned<String>>,
    #[serde(default)]
    pub case: Option<Spanned<String>>,
    #[serde(default)]
    pub trailing_slash: Option<Spanned<String>>,
    #[serde(default)]
    pub params: Option<Spanned<String>>,
    #[serde(default)]
    pub suffix: Option<Spanned<String>>,
    #[serde(default)]
    pub other_methods: Option<Spanned<String>>,
}

/// `user:`: exactly one source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    #[serde(default)]
    pub header: Option<Spanned<String>>,
    #[serde(default)]
    pub cookie: Option<Spanned<String>>,
    #[serde(default)]
    pub query: Option<Spanned<String>>,
    #[serde(default)]
    pub jwt: Option<Spanned<RawJwt>>,
}

/// `user.jwt:`: an HS256 token whose claim names the user.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub claim: Spanned<String>,
    pub secret_env: Spanned<String>,
    #[serde(default)]
    pub header: Option<Spanned<String>>,
}

/// `sku:`: exactly one source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSku {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub query: Option<Spanned<String>>,
    #[serde(default)]
    pub header: Option<Spanned<String>>,
    #[serde(default)]
    pub json: Option<Spanned<String>>,
}

/// `quantity:`: at most one source, a default and a maximum.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuantity {
    #[serde(default)]
    pub json: Option<Spanned<String>>,
    #[serde(default)]
    pub query: Option<Spanned<String>>,
    #[serde(default)]
    pub header: Option<Spanned<String>>,
    #[serde(default)]
    pub default: Option<Spanned<i64>>,
    #[serde(default)]
    pub max: Option<Spanned<i64>>,
}

/// `window:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    #[serde(default)]
    pub start: Option<Spanned<String>>,
    #[serde(default)]
    pub end: Option<Spanned<String>>,
}

/// One entry of `rate_limits:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub key: Spanned<String>,
    pub rate: Spanned<i64>,
    pub per: Spanned<ConfigDuration>,
    #[serde(default)]
    pub burst: Option<Spanned<i64>>,
}

/// `dedup:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDedup {
    pub key: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub ttl: Option<Spanned<ConfigDuration>>,
}

/// `stock:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStock {
    #[serde(default)]
    pub per_user_limit: Option<Spanned<i64>>,
}

/// `admission:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub queue: Option<Spanned<RawQueue>>,
}

/// `admission.queue:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    #[serde(default)]
    pub max_wait: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub capacity: Option<Spanned<i64>>,
    #[serde(default)]
    pub max_attempts: Option<Spanned<i64>>,
    #[serde(default)]
    pub backoff: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub max_queue_time: Option<Spanned<ConfigDuration>>,
}

/// `responses:`: one optional override per gateway-made outcome.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponses {
    #[serde(default)]
    pub queued: Option<Spanned<RawResponse>>,
    #[serde(default)]
    pub sold_out: Option<Spanned<RawResponse>>,
    #[serde(default)]
    pub rate_limited: Option<Spanned<RawResponse>>,
    #[serde(default)]
    pub duplicate: Option<Spanned<RawResponse>>,
    #[serde(default)]
    pub not_started: Option<Spanned<RawResponse>>,
    #[serde(default)]
    pub ended: Option<Spanned<RawResponse>>,
    #[serde(default)]
    pub invalid: Option<Spanned<RawResponse>>,
    #[serde(default)]
    pub unavailable: Option<Spanned<RawResponse>>,
}

/// `responses.<outcome>:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResponse {
    #[serde(default)]
    pub status: Option<Spanned<i64>>,
    #[serde(default)]
    pub headers: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    pub body: Option<String>,
}
