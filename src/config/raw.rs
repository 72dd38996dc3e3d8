//! Serde structs that mirror `gateway.yaml` exactly. Unknown keys are
//! errors; values stay close to the text (with their locations) so that
//! `validate` can report every problem with its line and column.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::units::{ByteSize, ConfigDuration};

/// The top level of `gateway.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub listen: Spanned<String>,
    #[serde(default)]
    pub admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub store: Option<Spanned<RawStore>>,
    pub upstreams: Spanned<BTreeMap<String, Spanned<RawUpstream>>>,
    pub default_upstream: Spanned<String>,
    #[serde(default)]
    pub rules: Option<Spanned<RawGlobs>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub limits: Option<RawLimits>,
    #[serde(default)]
    pub shutdown: Option<RawShutdown>,
    #[serde(default)]
    pub threads: Option<Spanned<u64>>,
    #[serde(default)]
    pub h2c: Option<bool>,
}

/// `admin:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default)]
    pub listen: Option<Spanned<String>>,
    #[serde(default)]
    pub token_env: Option<Spanned<String>>,
}

/// `store:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default)]
    pub backend: Option<Spanned<String>>,
    #[serde(default)]
    pub redis: Option<Spanned<RawRedis>>,
    #[serde(default)]
    pub on_failure: Option<Spanned<String>>,
    #[serde(default)]
    pub pass_cap: Option<Spanned<u64>>,
}

/// `store.redis:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub key_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub timeout: Option<Spanned<ConfigDuration>>,
}

/// `upstreams.<name>:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub servers: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub max_inflight: Option<Spanned<u64>>,
    #[serde(default)]
    pub connect_timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub read_timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub write_timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub idle_timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub health_check: Option<Spanned<RawHealthCheck>>,
}

/// `upstreams.<name>.health_check:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Spanned<String>,
    #[serde(default)]
    pub interval: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub failures: Option<Spanned<u64>>,
    #[serde(default)]
    pub successes: Option<Spanned<u64>>,
}

/// `rules:` takes one glob or a list of globs.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawGlobs {
    One(String),
    Many(Vec<String>),
}

/// `limits:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default)]
    pub max_header_bytes: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub max_rule_body_bytes: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub max_body_bytes: Option<Spanned<ByteSize>>,
}

/// `shutdown:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    #[serde(default)]
    pub grace_period: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub timeout: Option<Spanned<ConfigDuration>>,
}
