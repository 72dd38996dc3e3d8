//! `sluice check` against a table of broken configs (mostly one mistake
//! each; the `*several*` fixtures prove that one run reports them all): every
//! problem must be printed as the exact `path:line:column: message` line,
//! with the line and column of the offending token. Also checks that the
//! full-featured good config passes and loads into the expected model.

use sluice_testkit as support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use sluice::config::{AccessLogFormat, CacheConfig, Limits, LogFormat, OnFailure, StoreBackend};
use sluice::rules::{FieldSource, Fold, KeyPart, RateKey, Spelling, Variants};

/// `(fixture, every line `sluice check` must print, in order)`.
const BAD: &[(&str, &[&str])] = &[
    // ---- gateway.yaml ----
    (
        "tests/fixtures/bad_unknown_top_key.yaml",
        // The file is read on past the typo, so the key it misspelt is
        // missing too.
        &[
            "tests/fixtures/bad_unknown_top_key.yaml:1:1: unknown field `listne`, expected one of listen, admin, store, upstreams, default_upstream, rules, trusted_proxies, limits, shutdown, threads, h2c, upgrade_socket, tls, routes, access_log, log, cache",
            "tests/fixtures/bad_unknown_top_key.yaml:1:1: missing required key `listen`",
        ],
    ),
    (
        "tests/fixtures/bad_unknown_nested_key.yaml",
        &["tests/fixtures/bad_unknown_nested_key.yaml:5:5: unknown field `max_inflght`, expected one of servers, max_inflight, connect_timeout, read_timeout, write_timeout, idle_timeout, health_check, queue_claim_idle"],
    ),
    (
        "tests/fixtures/bad_listen_address.yaml",
        &["tests/fixtures/bad_listen_address.yaml:1:9: listen: \"localhost:8080\" is not an ip:port address like 127.0.0.1:8080 (host names are not resolved)"],
    ),
    (
        "tests/fixtures/bad_duration.yaml",
        &["tests/fixtures/bad_duration.yaml:5:19: upstreams.mall.read_timeout: invalid duration \"5 sec\": expected a whole number followed by ms, s, m or h (like 250ms or 3s)"],
    ),
    (
        "tests/fixtures/bad_zero_max_inflight.yaml",
        &["tests/fixtures/bad_zero_max_inflight.yaml:5:19: upstreams.mall.max_inflight: 0 must be a whole number from 1 to 4294967295"],
    ),
    (
        "tests/fixtures/bad_negative_max_inflight.yaml",
        &["tests/fixtures/bad_negative_max_inflight.yaml:5:19: upstreams.mall.max_inflight: -1 must be a whole number from 1 to 4294967295"],
    ),
    (
        // Never echoed with its password; TLS is refused up front rather
        // than failing every reservation once running.
        "tests/fixtures/bad_redis_tls.yaml",
        &["tests/fixtures/bad_redis_tls.yaml:4:17: store.redis.url: \"rediss://app:***@redis.internal:6380/0\": TLS to Redis (rediss://) is not supported; use redis:// on a private network or a unix:// socket"],
    ),
    (
        "tests/fixtures/bad_redis_scheme.yaml",
        &["tests/fixtures/bad_redis_scheme.yaml:3:17: store.redis.url: \"http://app:***@redis.internal:6379/0\" must start with redis://, unix:// or redis+unix://"],
    ),
    (
        "tests/fixtures/bad_missing_listen.yaml",
        &["tests/fixtures/bad_missing_listen.yaml:1:1: missing required key `listen`"],
    ),
    (
        "tests/fixtures/bad_duplicate_key.yaml",
        &["tests/fixtures/bad_duplicate_key.yaml:6:1: duplicate mapping key: listen"],
    ),
    (
        "tests/fixtures/bad_rules_glob.yaml",
        &["tests/fixtures/bad_rules_glob.yaml:6:8: rules: \"no-such-dir/*.yaml\" matches no file (looked in tests/fixtures)"],
    ),
    (
        "tests/fixtures/bad_duplicate_server.yaml",
        &["tests/fixtures/bad_duplicate_server.yaml:4:47: upstreams.mall.servers[2]: 127.0.0.1:8000 is listed twice"],
    ),
    (
        "tests/fixtures/bad_default_upstream.yaml",
        &["tests/fixtures/bad_default_upstream.yaml:5:19: default_upstream: \"shop\" is not defined under upstreams (defined: mall)"],
    ),
    (
        "tests/fixtures/bad_empty_servers.yaml",
        &["tests/fixtures/bad_empty_servers.yaml:4:14: upstreams.mall.servers: needs at least one server"],
    ),
    (
        "tests/fixtures/bad_health_check_path.yaml",
        &["tests/fixtures/bad_health_check_path.yaml:5:27: upstreams.mall.health_check.path: \"health\" must start with '/'"],
    ),
    (
        "tests/fixtures/bad_store_backend.yaml",
        &["tests/fixtures/bad_store_backend.yaml:3:12: store.backend: \"postgres\" is not one of memory, redis"],
    ),
    (
        "tests/fixtures/bad_on_failure.yaml",
        &["tests/fixtures/bad_on_failure.yaml:4:15: store.on_failure: \"fail_open\" is not one of fail_closed, pass_capped"],
    ),
    (
        "tests/fixtures/bad_trusted_proxies.yaml",
        &["tests/fixtures/bad_trusted_proxies.yaml:8:5: trusted_proxies[1]: \"10.0.0.0/33\" is not a CIDR like 10.0.0.0/8"],
    ),
    (
        "tests/fixtures/bad_admin_open.yaml",
        &["tests/fixtures/bad_admin_open.yaml:3:11: admin.listen: 0.0.0.0:9901 is not a loopback address and admin.token_env is not set, so anyone who reaches it could change stock; set admin.token_env, listen on 127.0.0.1, or set admin.allow_remote_without_token: true"],
    ),
    (
        "tests/fixtures/bad_admin_open_v6.yaml",
        &["tests/fixtures/bad_admin_open_v6.yaml:2:18: admin.listen: [::]:9901 is not a loopback address and admin.token_env is not set, so anyone who reaches it could change stock; set admin.token_env, listen on 127.0.0.1, or set admin.allow_remote_without_token: true"],
    ),
    (
        "tests/fixtures/bad_limits_connections.yaml",
        &[
            "tests/fixtures/bad_limits_connections.yaml:6:20: limits.max_connections: 0 must be a whole number from 1 to 4294967295",
            "tests/fixtures/bad_limits_connections.yaml:7:19: limits.header_timeout: must be above 0",
            "tests/fixtures/bad_limits_connections.yaml:8:22: limits.keepalive_timeout: invalid duration \"10 sec\": expected a whole number followed by ms, s, m or h (like 250ms or 3s)",
        ],
    ),
    (
        "tests/fixtures/bad_routes.yaml",
        &[
            "tests/fixtures/bad_routes.yaml:10:27: routes[1].match.path_prefix: \"api/v2\" must start with '/'",
            "tests/fixtures/bad_routes.yaml:12:12: routes[2].match: needs host, path_prefix or both (what no route matches goes to default_upstream)",
            "tests/fixtures/bad_routes.yaml:14:20: routes[3].match.host: \"static.example:8080\" must not have a port (a route matches the host on any port)",
            "tests/fixtures/bad_routes.yaml:15:15: routes[3].upstream: \"cdn\" is not defined under upstreams (defined: api, mall)",
            "tests/fixtures/bad_routes.yaml:16:5: routes[4]: never matches: routes[0] above it takes every request it would",
            "tests/fixtures/bad_routes.yaml:18:27: routes[5].match.path_prefix: \"/static//js\" is not in canonical form (requests are routed on their canonical path): write \"/static/js\"",
            "tests/fixtures/bad_routes.yaml:20:5: missing required key `routes[6].match`",
        ],
    ),
    (
        "tests/fixtures/bad_routes_unknown_key.yaml",
        // Read on past the unknown key: the match is then empty too.
        &[
            "tests/fixtures/bad_routes_unknown_key.yaml:6:12: routes[0].match: needs host, path_prefix or both (what no route matches goes to default_upstream)",
            "tests/fixtures/bad_routes_unknown_key.yaml:6:14: unknown field `path`, expected one of host, path_prefix",
        ],
    ),
    (
        "tests/fixtures/bad_tls_missing.yaml",
        &[
            "tests/fixtures/bad_tls_missing.yaml:6:3: missing required key `tls.cert`",
            "tests/fixtures/bad_tls_missing.yaml:6:3: missing required key `tls.key`",
            "tests/fixtures/bad_tls_missing.yaml:6:11: tls.listen: 127.0.0.1:8080 is also the main listen address",
        ],
    ),
    (
        "tests/fixtures/bad_tls_files.yaml",
        &[
            "tests/fixtures/bad_tls_files.yaml:7:9: tls.cert: cannot read tests/fixtures/no-such-cert.pem: No such file or directory (os error 2)",
            "tests/fixtures/bad_tls_files.yaml:8:8: tls.key: cannot read tests/fixtures/no-such-key.pem: No such file or directory (os error 2)",
        ],
    ),
    (
        "tests/fixtures/bad_tls_not_pem.yaml",
        &[
            "tests/fixtures/bad_tls_not_pem.yaml:6:40: tls.cert: tests/fixtures/bad_tls_not_pem.yaml holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            "tests/fixtures/bad_tls_not_pem.yaml:6:67: tls.key: tests/fixtures/bad_tls_not_pem.yaml holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1)",
        ],
    ),
    (
        "tests/fixtures/bad_yaml_syntax.yaml",
        &["tests/fixtures/bad_yaml_syntax.yaml:5:4: while parsing a block mapping, did not find expected key"],
    ),
    (
        "tests/fixtures/bad_several.yaml",
        &[
            "tests/fixtures/bad_several.yaml:2:9: listen: \"0.0.0.0:80800\" is not an ip:port address like 127.0.0.1:8080 (host names are not resolved)",
            "tests/fixtures/bad_several.yaml:4:12: store.backend: \"mongo\" is not one of memory, redis",
            "tests/fixtures/bad_several.yaml:8:19: upstreams.mall.max_inflight: 0 must be a whole number from 1 to 4294967295",
            "tests/fixtures/bad_several.yaml:9:19: default_upstream: \"shop\" is not defined under upstreams (defined: mall)",
            "tests/fixtures/bad_several.yaml:10:31: trusted_proxies[1]: \"10.1.2/24\" is not a CIDR like 10.0.0.0/8",
        ],
    ),
    (
        "tests/fixtures/bad_parse_several.yaml",
        &[
            "tests/fixtures/bad_parse_several.yaml:6:19: upstreams.mall.max_inflight: -1 must be a whole number from 1 to 4294967295",
            "tests/fixtures/bad_parse_several.yaml:7:19: upstreams.mall.read_timeout: invalid duration \"5 sec\": expected a whole number followed by ms, s, m or h (like 250ms or 3s)",
            "tests/fixtures/bad_parse_several.yaml:9:31: trusted_proxies[1]: \"300.0.0.0/8\" is not a CIDR like 10.0.0.0/8",
            "tests/fixtures/bad_parse_several.yaml:11:19: limits.max_body_bytes: invalid size \"8 MB\": expected bytes like 65536, 64KiB or 16MiB",
        ],
    ),
    (
        "tests/fixtures/bad_several_with_rules.yaml",
        &[
            "tests/fixtures/bad_several_with_rules.yaml:6:27: upstreams.mall.health_check.path: \"health\" must start with '/'",
            "tests/fixtures/rules/bad_several.yaml:3:22: match.method: \"Post\" is not an uppercase HTTP method like POST",
            "tests/fixtures/rules/bad_several.yaml:7:28: rate_limits[0].rate: 0 must be a whole number from 1 to 4294967295",
            "tests/fixtures/rules/bad_several.yaml:13:23: release_on: \"502\" is not one of connect_error, timeout, 5xx, 4xx",
        ],
    ),
    (
        "tests/fixtures/bad_everything.yaml",
        &[
            "tests/fixtures/bad_everything.yaml:6:19: upstreams.mall.max_inflight: 0 must be a whole number from 1 to 4294967295",
            "tests/fixtures/bad_everything.yaml:7:5: unknown field `retries`, expected one of servers, max_inflight, connect_timeout, read_timeout, write_timeout, idle_timeout, health_check, queue_claim_idle",
            "tests/fixtures/bad_everything.yaml:10:1: unknown field `logging`, expected one of listen, admin, store, upstreams, default_upstream, rules, trusted_proxies, limits, shutdown, threads, h2c, upgrade_socket, tls, routes, access_log, log, cache",
            "tests/fixtures/rules/bad_everything.yaml:3:62: unknown field `host`, expected one of method, path, variants, case, trailing_slash, params, suffix, other_methods",
            "tests/fixtures/rules/bad_everything.yaml:7:36: rate_limits[0].per: invalid duration \"1 minute\": expected a whole number followed by ms, s, m or h (like 250ms or 3s)",
        ],
    ),
    (
        "tests/fixtures/bad_access_log.yaml",
        &[
            "tests/fixtures/bad_access_log.yaml:5:9: access_log.path: tests/fixtures/no-such-dir/access.log cannot be created in tests/fixtures/no-such-dir: No such file or directory (os error 2)",
            "tests/fixtures/bad_access_log.yaml:6:11: access_log.format: \"common\" is not one of json, combined",
            "tests/fixtures/bad_access_log.yaml:7:17: access_log.hash_key_env: environment variable SLUICE_TEST_UNSET_LOG_KEY is unset or empty",
            "tests/fixtures/bad_access_log.yaml:8:11: access_log.buffer: 0 must be a whole number of lines from 1 to 1048576",
            "tests/fixtures/bad_access_log.yaml:9:16: log.format: \"xml\" is not one of text, json",
        ],
    ),
    (
        "tests/fixtures/bad_access_log_path.yaml",
        &["tests/fixtures/bad_access_log_path.yaml:4:21: access_log.path: tests/fixtures/rules is a directory"],
    ),
    (
        "tests/fixtures/bad_access_log_missing_path.yaml",
        &["tests/fixtures/bad_access_log_missing_path.yaml:4:13: missing required key `access_log.path`"],
    ),
    // ---- rule files (each gateway fixture points `rules:` at rules/bad_<what>.yaml) ----
    (
        "tests/fixtures/bad_rule_unknown_key.yaml",
        &["tests/fixtures/rules/bad_unknown_key.yaml:6:5: unknown field `rate_limit`, expected one of name, match, user, sku, quantity, window, rate_limits, dedup, stock, admission, release_on, on_failure, responses"],
    ),
    (
        "tests/fixtures/bad_rule_missing_user.yaml",
        &["tests/fixtures/rules/bad_missing_user.yaml:2:5: missing required key `user`"],
    ),
    (
        "tests/fixtures/bad_rule_missing_sku_match.yaml",
        &[
            "tests/fixtures/rules/bad_missing_sku_match.yaml:2:5: missing required key `match`",
            "tests/fixtures/rules/bad_missing_sku_match.yaml:2:5: missing required key `sku`",
        ],
    ),
    (
        "tests/fixtures/bad_rule_parse_several.yaml",
        &[
            "tests/fixtures/rules/bad_parse_several.yaml:8:36: rate_limits[0].per: invalid duration \"1.5s\": expected a whole number followed by ms, s, m or h (like 250ms or 3s)",
            "tests/fixtures/rules/bad_parse_several.yaml:11:22: match.method: \"post\" is not an uppercase HTTP method like POST",
            "tests/fixtures/rules/bad_parse_several.yaml:13:18: sku.path: \"item\" is not a capture of match.path \"/api/tablets/{sku}/order\"",
            "tests/fixtures/rules/bad_parse_several.yaml:15:16: rate_limits[0].key: \"session\" is not one of ip, user, rule",
            "tests/fixtures/rules/bad_parse_several.yaml:16:32: dedup.ttl: invalid duration 10: needs a unit, like 10s or 10ms",
            "tests/fixtures/rules/bad_parse_several.yaml:17:23: release_on: \"reset\" is not one of connect_error, timeout, 5xx, 4xx",
        ],
    ),
    (
        "tests/fixtures/bad_rule_user_two_sources.yaml",
        &["tests/fixtures/rules/bad_user_two_sources.yaml:4:11: user: give only one of header, cookie, query, jwt"],
    ),
    (
        "tests/fixtures/bad_rule_sku_not_capture.yaml",
        &["tests/fixtures/rules/bad_sku_not_capture.yaml:5:18: sku.path: \"item\" is not a capture of match.path \"/api/seckill/{sku}/order\""],
    ),
    (
        "tests/fixtures/bad_rule_path_template.yaml",
        &["tests/fixtures/rules/bad_path_template.yaml:3:34: match.path: path template \"/api/seckill/item-{sku}/order\": a capture must be a whole segment, like /{sku}/"],
    ),
    (
        "tests/fixtures/bad_rule_lowercase_method.yaml",
        &["tests/fixtures/rules/bad_lowercase_method.yaml:3:22: match.method: \"post\" is not an uppercase HTTP method like POST"],
    ),
    (
        "tests/fixtures/bad_rule_rate_limit_key.yaml",
        &["tests/fixtures/rules/bad_rate_limit_key.yaml:8:16: rate_limits[1].key: \"session\" is not one of ip, user, rule"],
    ),
    (
        "tests/fixtures/bad_rule_rate_zero.yaml",
        &["tests/fixtures/rules/bad_rate_zero.yaml:8:15: rate_limits[0].rate: 0 must be a whole number from 1 to 4294967295"],
    ),
    (
        "tests/fixtures/bad_rule_quantity_max.yaml",
        &["tests/fixtures/rules/bad_quantity_max.yaml:6:45: quantity.max: 2 is below quantity.default 3"],
    ),
    (
        "tests/fixtures/bad_rule_window_order.yaml",
        &["tests/fixtures/rules/bad_window_order.yaml:8:12: window.end: must be after window.start"],
    ),
    (
        "tests/fixtures/bad_rule_window_time.yaml",
        &["tests/fixtures/rules/bad_window_time.yaml:7:14: window.start: \"2026-11-11 00:00\" is not an RFC 3339 time like 2026-11-11T00:00:00+08:00 (premature end of input)"],
    ),
    (
        "tests/fixtures/bad_rule_dedup_ip.yaml",
        &["tests/fixtures/rules/bad_dedup_ip.yaml:6:20: dedup.key: \"ip\" is not one of user, sku"],
    ),
    (
        "tests/fixtures/bad_rule_admission_upstream.yaml",
        &["tests/fixtures/rules/bad_admission_upstream.yaml:6:28: admission.upstream: \"shop\" is not defined under upstreams (defined: mall)"],
    ),
    (
        "tests/fixtures/bad_rule_release_on.yaml",
        &["tests/fixtures/rules/bad_release_on.yaml:6:32: release_on: \"reset\" is not one of connect_error, timeout, 5xx, 4xx"],
    ),
    (
        "tests/fixtures/bad_rule_response_status.yaml",
        &["tests/fixtures/rules/bad_response_status.yaml:7:27: responses.sold_out.status: 999 is not an HTTP status from 200 to 599"],
    ),
    (
        "tests/fixtures/bad_rule_name_none.yaml",
        &["tests/fixtures/rules/bad_name_none.yaml:2:11: name: \"none\" is reserved for requests that match no rule"],
    ),
    (
        "tests/fixtures/bad_rule_duplicate_name.yaml",
        &["tests/fixtures/rules/bad_duplicate_name_2.yaml:7:11: name: \"phone\" is already used by the rule at tests/fixtures/rules/bad_duplicate_name.yaml:2"],
    ),
    (
        "tests/fixtures/bad_rule_jwt_secret.yaml",
        &[
            "tests/fixtures/rules/bad_jwt_secret.yaml:4:44: user.jwt.secret_env: environment variable SLUICE_TEST_UNSET_SECRET is unset or empty",
            "tests/fixtures/rules/bad_jwt_secret.yaml:8:44: user.jwt.secret_env: environment variable SLUICE_TEST_EMPTY_SECRET is unset or empty",
        ],
    ),
    (
        "tests/fixtures/bad_rule_spelling.yaml",
        &[
            "tests/fixtures/rules/bad_spelling.yaml:6:17: match.variants: \"passthrough\" is not one of forward, refuse",
            "tests/fixtures/rules/bad_spelling.yaml:7:13: match.case: \"lower\" is not one of ignore, strict",
            "tests/fixtures/rules/bad_spelling.yaml:8:23: match.trailing_slash: \"yes\" is not one of ignore, strict",
            "tests/fixtures/rules/bad_spelling.yaml:9:15: match.params: \"keep\" is not one of ignore, strict",
            "tests/fixtures/rules/bad_spelling.yaml:10:15: match.suffix: \"any\" is not one of ignore, strict",
            "tests/fixtures/rules/bad_spelling.yaml:11:22: match.other_methods: \"allow\" is not one of refuse, pass",
        ],
    ),
    (
        "tests/fixtures/bad_rule_match_unknown_key.yaml",
        &["tests/fixtures/rules/bad_match_unknown_key.yaml:3:62: unknown field `trailing_slashes`, expected one of method, path, variants, case, trailing_slash, params, suffix, other_methods"],
    ),
    (
        "tests/fixtures/bad_rule_path_canonical.yaml",
        &[
            "tests/fixtures/rules/bad_path_canonical.yaml:3:34: match.path: path template \"/api//seckill/{sku}/order\": empty segment (//): write each slash once",
            "tests/fixtures/rules/bad_path_canonical.yaml:8:34: match.path: path template \"/api/tablets/{sku}/order;jsessionid=1\": ';' starts path parameters, which are not part of a route",
            "tests/fixtures/rules/bad_path_canonical.yaml:13:34: match.path: path template \"/api/watches/../{sku}/order\": dot segments (. and ..) are not allowed",
        ],
    ),
    (
        "tests/fixtures/bad_rule_overlap_spelling.yaml",
        &["tests/fixtures/rules/bad_overlap_spelling.yaml:9:34: match: POST \"/API/Order.json\" overlaps rule \"order\" (POST \"/api/order\"); a request would match both"],
    ),
    // ---- read-cache rules (`cache:` in rule files) and `cache:` in gateway.yaml ----
    (
        "tests/fixtures/bad_cache_rule.yaml",
        &[
            "tests/fixtures/rules/bad_cache_rule.yaml:2:22: cache.match.method: \"POST\" is not cached: only GET is",
            "tests/fixtures/rules/bad_cache_rule.yaml:6:10: cache.ttl: must be above 0",
            "tests/fixtures/rules/bad_cache_rule.yaml:7:21: cache.stale_if_error: invalid duration \"5 min\": expected a whole number followed by ms, s, m or h (like 250ms or 3s)",
            "tests/fixtures/rules/bad_cache_rule.yaml:8:24: cache.key: \"Bad Header\" is not a valid header name",
            "tests/fixtures/rules/bad_cache_rule.yaml:8:45: cache.key: \"ip\" is not one of path, query, header:<name>, cookie:<name>",
            "tests/fixtures/rules/bad_cache_rule.yaml:8:49: cache.key: \"query\" is listed twice",
            "tests/fixtures/rules/bad_cache_rule.yaml:9:15: cache.max_body: 134217728 must be from 1 to 67108864 (64MiB)",
            "tests/fixtures/rules/bad_cache_rule.yaml:10:21: cache.statuses[1]: 206 (a partial answer) is never cached",
            "tests/fixtures/rules/bad_cache_rule.yaml:10:26: cache.statuses[2]: 999 is not an HTTP status from 200 to 599",
            "tests/fixtures/rules/bad_cache_rule.yaml:11:15: cache.upstream: \"shop\" is not defined under upstreams (defined: mall)",
            "tests/fixtures/rules/bad_cache_rule.yaml:15:10: cache.key: must include path (without it every path shares one entry)",
            "tests/fixtures/rules/bad_cache_rule.yaml:16:5: missing required key `ttl`",
        ],
    ),
    (
        "tests/fixtures/bad_cache_overlap.yaml",
        &[
            "tests/fixtures/rules/bad_cache_overlap.yaml:18:33: cache.match: GET \"/api/goods/{sku}\" overlaps cache rule \"/api/goods/{id}\" (GET \"/api/goods/{id}\"); a request would match both",
            "tests/fixtures/rules/bad_cache_overlap.yaml:20:11: name: \"phone\" is already used by the rule at tests/fixtures/rules/bad_cache_overlap.yaml:2",
            "tests/fixtures/rules/bad_cache_overlap.yaml:24:33: cache.match: GET \"/api/phone/{sku}/claim\" overlaps rule \"phone\" (GET \"/api/phone/{sku}/claim\"); flash-sale requests are never cached",
            "tests/fixtures/rules/bad_cache_overlap.yaml:27:33: cache.match: GET \"/api/order/{sku}\" overlaps rule \"order\" (POST \"/api/order/{sku}\"), which refuses other methods on its paths; set its match.other_methods: pass to cache GETs there",
        ],
    ),
    (
        // The cache file sorts before the rules it overlaps.
        "tests/fixtures/bad_cache_first.yaml",
        &[
            "tests/fixtures/rules/cache_first/a_cache.yaml:3:33: cache.match: GET \"/api/phone/{sku}/claim\" overlaps rule \"phone\" (GET \"/api/phone/{sku}/claim\"); flash-sale requests are never cached",
            "tests/fixtures/rules/cache_first/a_cache.yaml:6:33: cache.match: GET \"/api/seckill/{sku}/order\" overlaps rule \"seckill\" (POST \"/api/seckill/{sku}/order\"), which refuses other methods on its paths; set its match.other_methods: pass to cache GETs there",
        ],
    ),
    (
        "tests/fixtures/bad_cache_unknown_key.yaml",
        // Read on past the typo: the key it misspelt is missing too.
        &[
            "tests/fixtures/rules/bad_cache_unknown_key.yaml:2:5: missing required key `ttl`",
            "tests/fixtures/rules/bad_cache_unknown_key.yaml:4:5: unknown field `tll`, expected one of name, match, ttl, stale_while_revalidate, stale_if_error, key, max_body, statuses, lock_timeout, upstream",
        ],
    ),
    (
        "tests/fixtures/bad_cache_gateway.yaml",
        &[
            "tests/fixtures/bad_cache_gateway.yaml:7:14: cache.max_bytes: must be above 0",
            "tests/fixtures/bad_cache_gateway.yaml:9:32: cache.session_cookies[1]: \"a b\" is not a cookie name",
            "tests/fixtures/bad_cache_gateway.yaml:9:39: cache.session_cookies[2]: \"\" is not a cookie name",
        ],
    ),
    (
        "tests/fixtures/bad_rule_overlap.yaml",
        &["tests/fixtures/rules/bad_overlap.yaml:8:34: match: POST \"/api/seckill/p100/order\" overlaps rule \"phone\" (POST \"/api/seckill/{sku}/order\"); a request would match both"],
    ),
];

const GOOD: &str = "tests/fixtures/good/gateway.yaml";

/// The JWT secrets the good fixtures and the shipped packs name; rules
/// read them when loaded, so `check` needs them set.
const SECRETS: &[(&str, &str)] = &[
    ("SHOP_JWT_SECRET", "fixture-secret"),
    ("SLUICE_JWT_SECRET", "fixture-secret"),
    ("SLUICE_TEST_EMPTY_SECRET", ""),
    ("SLUICE_LOG_KEY", "fixture-log-key"),
];

/// `sluice` with the fixtures' secrets in its environment.
fn sluice_with_secrets() -> std::process::Command {
    let mut cmd = support::sluice_cmd();
    cmd.envs(SECRETS.iter().copied());
    cmd
}

/// Runs `sluice check --config <path>` from the crate root.
fn check(path: &str) -> Output {
    sluice_with_secrets()
        .arg("check")
        .arg("--config")
        .arg(path)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run sluice check")
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Problems are printed on stderr, like `nginx -t`'s.
fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bad_configs_print_every_problem_at_its_token() {
    let mut failures = Vec::new();
    for (fixture, expected) in BAD {
        let out = check(fixture);
        let got = stderr_lines(&out);
        if out.status.code() != Some(1) || got != *expected || !out.stdout.is_empty() {
            failures.push(format!(
                "{fixture}: exit {:?}\n  expected on stderr:\n    {}\n  got:\n    {}\n  stdout (must be empty): {}",
                out.status.code(),
                expected.join("\n    "),
                got.join("\n    "),
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

/// Two unknown keys, a bad value and a bad rule file (an unknown key and
/// a bad value of its own): one run reports all five, each at its token,
/// on stderr, with nothing on stdout, and exits 1. Unknown keys used to
/// stop a file's check at the first one.
#[test]
fn check_reports_every_problem_of_every_file_in_one_run() {
    let out = check("tests/fixtures/bad_everything.yaml");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines = stderr_lines(&out);
    let at: Vec<&str> = lines
        .iter()
        .map(|l| l.split(": ").next().unwrap_or(""))
        .collect();
    assert_eq!(
        at,
        [
            "tests/fixtures/bad_everything.yaml:6:19",
            "tests/fixtures/bad_everything.yaml:7:5",
            "tests/fixtures/bad_everything.yaml:10:1",
            "tests/fixtures/rules/bad_everything.yaml:3:62",
            "tests/fixtures/rules/bad_everything.yaml:7:36",
        ],
        "{lines:#?}"
    );
    let unknown = lines.iter().filter(|l| l.contains("unknown field")).count();
    assert_eq!(unknown, 3, "{lines:#?}");
}

/// `sluice check --print` shows the effective config on stdout as YAML:
/// the defaults of every key left out, the rule files read and resolved.
#[test]
fn check_print_shows_the_effective_config_with_defaults() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("gateway.yaml"),
        "listen: 127.0.0.1:8080\nupstreams: { mall: { servers: [127.0.0.1:8000] } }\n\
         default_upstream: mall\nrules: rules/*.yaml\n",
    )
    .expect("write gateway.yaml");
    std::fs::create_dir(dir.path().join("rules")).expect("rules dir");
    std::fs::write(
        dir.path().join("rules/phone.yaml"),
        "rules:\n  - name: phone\n    match: { method: POST, path: \"/api/{sku}/order\" }\n    \
         user: { header: X-User-Id }\n    sku: { path: sku }\n",
    )
    .expect("write rule file");
    let out = sluice_with_secrets()
        .args(["check", "--print", "--config"])
        .arg(dir.path().join("gateway.yaml"))
        .output()
        .expect("run sluice check --print");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(": ok (1 upstreams, 1 rules)"), "{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let printed: serde_json::Value = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("--print is not YAML ({e}):\n{text}"));
    let at = |pointer: &str| {
        printed
            .pointer(pointer)
            .cloned()
            .unwrap_or_else(|| panic!("no {pointer} in:\n{text}"))
    };
    // Defaults of keys the file leaves out.
    assert_eq!(at("/admin/listen"), "127.0.0.1:9901");
    assert_eq!(at("/store/backend"), "memory");
    assert_eq!(at("/upstreams/0/max_inflight"), 64);
    assert_eq!(at("/upstreams/0/connect_timeout_ms"), 1000);
    assert_eq!(at("/limits/max_body_bytes"), 16 << 20);
    assert_eq!(at("/shutdown/grace_period_ms"), 5000);
    // The rule file, read and resolved (its upstream is the default one).
    assert_eq!(at("/rules/0/name"), "phone");
    assert_eq!(at("/rules/0/upstream"), "mall");
}

#[test]
fn good_config_passes_check() {
    let out = check(GOOD);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout_lines(&out),
        [format!("{GOOD}: ok (2 upstreams, 5 rules)")]
    );
}

#[test]
fn a_remote_admin_listener_passes_check_with_a_token_or_the_opt_in() {
    for fixture in [
        "tests/fixtures/ok_admin_remote_token.yaml",
        "tests/fixtures/ok_admin_remote_opt_in.yaml",
    ] {
        let out = check(fixture);
        assert_eq!(
            stdout_lines(&out),
            [format!("{fixture}: ok (1 upstreams, 0 rules)")],
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0));
    }
}

/// `sluice run` on `fixture` with `env` set and `SLUICE_ADMIN_TOKEN`
/// removed; it must exit by itself (it refuses before binding anything,
/// so nothing listens off loopback). The exit code and stderr.
fn run_refused(fixture: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = support::sluice_cmd();
    cmd.arg("run")
        .arg("--config")
        .arg(fixture)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("SLUICE_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn sluice run");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("poll sluice run").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("reap sluice run");
            panic!(
                "sluice run {fixture} kept running: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("reap sluice run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn run_refuses_a_remote_admin_listener_whose_token_is_unset_or_empty() {
    let fixture = "tests/fixtures/ok_admin_remote_token.yaml";
    for env in [&[][..], &[("SLUICE_ADMIN_TOKEN", "")][..]] {
        let (code, stderr) = run_refused(fixture, env);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(
            stderr.contains(
                "admin.listen 0.0.0.0:9901 is not a loopback address and its token variable SLUICE_ADMIN_TOKEN is unset or empty"
            ),
            "{stderr}"
        );
    }
}

#[test]
fn missing_config_file_fails_with_a_clear_message() {
    let path = "tests/fixtures/does_not_exist.yaml";
    let out = check(path);
    assert_eq!(out.status.code(), Some(1));
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let prefix = format!("{path}:1:1: cannot read config: ");
    assert!(
        lines[0].starts_with(&prefix) && lines[0].contains("No such file or directory"),
        "{}",
        lines[0]
    );
}

#[test]
fn good_config_loads_into_the_typed_model() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(GOOD);
    let env = |name: &str| {
        SECRETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| std::ffi::OsString::from(v))
    };
    let config = sluice::config::load_with_env(&path, &env).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(config.admin.listen, "127.0.0.1:9901".parse().unwrap());
    assert_eq!(
        config.admin.token_env.as_deref(),
        Some("SLUICE_ADMIN_TOKEN")
    );

    assert_eq!(config.store.backend, StoreBackend::Redis);
    assert_eq!(config.store.redis.key_prefix, "shop:");
    assert_eq!(config.store.redis.timeout, Duration::from_millis(50));
    assert_eq!(config.store.on_failure, OnFailure::PassCapped { cap: 4 });

    let upstream = |name: &str| {
        config
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .unwrap_or_else(|| panic!("upstream {name}"))
    };
    let mall = upstream("mall");
    assert_eq!(config.upstream(config.default_upstream).name, "mall");
    assert_eq!(mall.servers.len(), 2);
    assert_eq!(mall.max_inflight, 64);
    assert_eq!(mall.read_timeout, Duration::from_secs(5));
    assert_eq!(mall.write_timeout, Duration::from_secs(3));
    assert_eq!(mall.idle_timeout, Duration::from_secs(120));
    let hc = mall.health_check.as_ref().expect("mall health_check");
    assert_eq!(
        (hc.path.as_str(), hc.interval, hc.timeout),
        (
            "/health",
            Duration::from_secs(2),
            Duration::from_millis(500)
        )
    );
    assert_eq!(upstream("coupons").read_timeout, Duration::from_millis(750));

    let proxies: Vec<String> = config
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(proxies, ["10.0.0.0/8", "192.168.1.10/32", "fd00::/8"]);
    assert_eq!(
        config.limits,
        Limits {
            max_header_bytes: 32 << 10,
            max_rule_body_bytes: 8192,
            max_body_bytes: 8 << 20,
            max_connections: Some(20000),
            header_timeout: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(30),
        }
    );
    assert!(!config.admin.allow_remote_without_token);
    assert_eq!(config.shutdown.grace_period, Duration::from_secs(10));
    assert_eq!(config.threads, 4);
    assert!(config.h2c);
    let routes: Vec<(Option<&str>, Option<&str>, &str)> = config
        .routes
        .iter()
        .map(|r| {
            (
                r.host.as_deref(),
                r.path_prefix.as_deref(),
                config.upstream(r.upstream).name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            (None, Some("/api/coupons"), "coupons"),
            // Hosts are kept lowercase: they are compared without case.
            (Some("static.example.com"), Some("/assets/"), "mall"),
        ]
    );
    // tls: its files are made by tests/tls.rs, which checks it.
    assert!(config.tls.is_none());
    let access_log = config.access_log.as_ref().expect("access_log");
    assert_eq!(
        access_log.path,
        path.parent().expect("dir").join("access.log")
    );
    assert_eq!(access_log.format, AccessLogFormat::Combined);
    assert!(!access_log.log_user);
    assert_eq!(access_log.buffer, 1024);
    assert_eq!(
        access_log.hash_key.as_ref().map(|k| k.bytes()),
        Some(&b"fixture-log-key"[..])
    );
    assert_eq!(config.log.format, LogFormat::Json);

    let rules = config.rules.rules();
    let names: Vec<&str> = rules.iter().map(|r| &*r.name).collect();
    assert_eq!(
        names,
        [
            "phone-seckill",
            "phone-preorder",
            "voucher-grab",
            "jwt-flash",
            "jwt-default-header"
        ]
    );
    let seckill = &rules[0];
    assert_eq!(seckill.method.as_str(), "POST");
    // No spelling keys: the secure defaults; phone-preorder sets them all.
    assert_eq!(*seckill.path.spelling(), Spelling::DEFAULT);
    assert_eq!(
        *rules[1].path.spelling(),
        Spelling {
            variants: Variants::Refuse,
            case: Fold::Strict,
            trailing_slash: Fold::Strict,
            params: Fold::Ignore,
            suffix: Fold::Strict,
        }
    );
    assert_eq!(seckill.sku, FieldSource::Path("sku".into()));
    let limits: Vec<(RateKey, u32, Duration, u32)> = seckill
        .rate_limits
        .iter()
        .map(|l| (l.key, l.rate.get(), l.per, l.burst.get()))
        .collect();
    assert_eq!(
        limits,
        [
            (RateKey::Ip, 20, Duration::from_secs(1), 40),
            // No `burst:` given: it defaults to the rate.
            (RateKey::User, 1, Duration::from_secs(3), 1),
            (RateKey::Rule, 5000, Duration::from_secs(1), 5000),
        ]
    );
    assert_eq!((seckill.quantity.default, seckill.quantity.max), (1, 5));
    // JWT secrets are read when the rules are loaded, and never printed.
    match &rules[3].user {
        FieldSource::Jwt {
            secret, secret_env, ..
        } => {
            assert_eq!(secret_env, "SHOP_JWT_SECRET");
            assert_eq!(secret.bytes(), b"fixture-secret");
        }
        other => panic!("jwt-flash user: {other:?}"),
    }
    assert!(!format!("{:?}", rules[3]).contains("fixture-secret"));
    let vouchers = &rules[2];
    assert_eq!(config.upstream(vouchers.upstream).name, "coupons");
    assert_eq!(vouchers.queue.max_wait, Duration::from_millis(250));

    assert_eq!(
        config.cache,
        CacheConfig {
            max_bytes: 128 << 20,
            redis: true,
            session_cookies: vec!["PHPSESSID".into(), "SHOPSESSION".into()],
        }
    );
    let cached = config.cache_rules.rules();
    assert_eq!(cached.len(), 2);
    let goods = &cached[0];
    assert_eq!(&*goods.name, "goods");
    assert_eq!(
        (
            goods.ttl,
            goods.stale_while_revalidate,
            goods.stale_if_error
        ),
        (
            Duration::from_secs(2),
            Duration::from_secs(10),
            Duration::from_secs(300)
        )
    );
    assert_eq!(
        goods.key,
        [
            KeyPart::Path,
            KeyPart::Query,
            KeyPart::Header(http::HeaderName::from_static("accept-language")),
            KeyPart::Cookie("currency".into()),
        ]
    );
    assert_eq!(goods.max_body, 256 << 10);
    assert_eq!(goods.statuses, Some(vec![200, 404]));
    assert_eq!(goods.lock_timeout, Duration::from_secs(3));
    assert_eq!(config.upstream(goods.upstream).name, "coupons");
    // Defaults, and the path as the name of an unnamed rule.
    let activity = &cached[1];
    assert_eq!(&*activity.name, "/api/activity/{id}/");
    assert_eq!(activity.key, [KeyPart::Path, KeyPart::Query]);
    assert_eq!(
        (activity.stale_while_revalidate, activity.stale_if_error),
        (Duration::ZERO, Duration::ZERO)
    );
    assert_eq!(activity.max_body, 256 << 10);
    assert_eq!(activity.statuses, None);
    assert_eq!(activity.lock_timeout, Duration::from_secs(5));
    assert_eq!(config.upstream(activity.upstream).name, "mall");
}

/// Every shipped rule pack passes `sluice check`: the default
/// `gateway.yaml` with its rules, and each opt-in pack in
/// `lua-free-rules/more/` loaded through a config that points at it.
#[test]
fn shipped_gateway_and_every_rule_pack_pass_check() {
    let out = sluice_with_secrets()
        .args(["check", "--config", "gateway.yaml"])
        .output()
        .expect("run sluice check");
    assert!(
        out.status.success(),
        "gateway.yaml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let packs = std::fs::read_dir("lua-free-rules/more").expect("lua-free-rules/more");
    let mut checked = 0;
    for pack in packs {
        let pack = pack.expect("dir entry").path();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            "listen: 127.0.0.1:8080\nupstreams: {{ mall: {{ servers: [127.0.0.1:8000] }} }}\n\
             default_upstream: mall\nrules: [\"{}\", \"{}\"]\n",
            std::fs::canonicalize("lua-free-rules/phone-seckill.yaml")
                .expect("pack")
                .display(),
            std::fs::canonicalize(&pack).expect("pack").display()
        );
        std::fs::write(dir.path().join("gateway.yaml"), config).expect("write config");
        let out = sluice_with_secrets()
            .args(["check", "--config"])
            .arg(dir.path().join("gateway.yaml"))
            .output()
            .expect("run sluice check");
        assert!(
            out.status.success(),
            "{}: {}",
            pack.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 3, "expected the opt-in packs, found {checked}");
}
