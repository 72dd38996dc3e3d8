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
    // Required keys are optional here so that a missing one is reported
    // with the others, not alone.
    #[serde(default)]
    pub listen: Option<Spanned<String>>,
    #[serde(default)]
    pub admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub store: Option<Spanned<RawStore>>,
    #[serde(default)]
    pub upstreams: Option<Spanned<BTreeMap<String, Spanned<RawUpstream>>>>,
    #[serde(default)]
    pub default_upstream: Option<Spanned<String>>,
    #[serde(default)]
    pub rules: Option<Spanned<RawGlobs>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub limits: Option<RawLimits>,
    #[serde(default)]
    pub shutdown: Option<RawShutdown>,
    #[serde(default)]
    pub threads: Option<Spanned<i64>>,
    #[serde(default)]
    pub h2c: Option<bool>,
    #[serde(default)]
    pub upgrade_socket: Option<Spanned<String>>,
    #[serde(default)]
    pub tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    pub routes: Option<Spanned<Vec<Spanned<RawRoute>>>>,
    #[serde(default)]
    pub access_log: Option<Spanned<RawAccessLog>>,
    #[serde(default)]
    pub log: Option<Spanned<RawLog>>,
    #[serde(default)]
    pub cache: Option<Spanned<RawCache>>,
}

/// `tls:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub listen: Option<Spanned<String>>,
    #[serde(default)]
    pub cert: Option<Spanned<String>>,
    #[serde(default)]
    pub key: Option<Spanned<String>>,
}

/// One entry of `routes:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(default, rename = "match")]
    pub matcher: Option<Spanned<RawRouteMatch>>,
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
}

/// `routes[].match:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteMatch {
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    #[serde(default)]
    pub path_prefix: Option<Spanned<String>>,
}

/// `access_log:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub format: Option<Spanned<String>>,
    #[serde(default)]
    pub log_user: Option<Spanned<bool>>,
    #[serde(default)]
    pub hash_key_env: Option<Spanned<String>>,
    #[serde(default)]
    pub buffer: Option<Spanned<i64>>,
}

/// `log:` (the gateway's own log lines)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub format: Option<Spanned<String>>,
}

/// `cache:`: the read cache's tiers (its rules live in rule files).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    #[serde(default)]
    pub max_bytes: Option<Spanned<ByteSize>>,
    #[serde(default)]
    pub redis: Option<Spanned<bool>>,
    #[serde(default)]
    pub session_cookies: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `admin:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default)]
    pub listen: Option<Spanned<String>>,
    #[serde(default)]
    pub token_env: Option<Spanned<String>>,
    #[serde(default)]
    pub allow_remote_without_token: Option<Spanned<bool>>,
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
    pub pass_cap: Option<Spanned<i64>>,
    #[serde(default)]
    pub recheck_interval: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub result_ttl: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub lease_margin: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub in_doubt_for: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub sweep_interval: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub journal: Option<Spanned<String>>,
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
    #[serde(default)]
    pub admin_timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub breaker_failures: Option<Spanned<i64>>,
    #[serde(default)]
    pub breaker_interval: Option<Spanned<ConfigDuration>>,
}

/// `upstreams.<name>:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    #[serde(default)]
    pub servers: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub max_inflight: Option<Spanned<i64>>,
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
    #[serde(default)]
    pub queue_claim_idle: Option<Spanned<ConfigDuration>>,
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
    pub failures: Option<Spanned<i64>>,
    #[serde(default)]
    pub successes: Option<Spanned<i64>>,
}

/// `rules:` takes one glob or a list of globs.
#[derive(Debug)]
pub struct RawGlobs(pub Vec<String>);

impl<'de> Deserialize<'de> for RawGlobs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GlobsVisitor;
        impl<'de> serde::de::Visitor<'de> for GlobsVisitor {
            type Value = RawGlobs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a glob like lua-free-rules/*.yaml, or a list of globs")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawGlobs, E> {
                Ok(RawGlobs(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawGlobs, A::Error> {
                let mut out = Vec::new();
                while let Some(g) = seq.next_element::<String>()? {
                    out.push(g);
                }
                Ok(RawGlobs(out))
            }
        }
        deserializer.deserialize_any(GlobsVisitor)
    }
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
    #[serde(default)]
    pub max_connections: Option<Spanned<i64>>,
    #[serde(default)]
    pub header_timeout: Option<Spanned<ConfigDuration>>,
    #[serde(default)]
    pub keepalive_timeout: Option<Spanned<ConfigDuration>>,
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
