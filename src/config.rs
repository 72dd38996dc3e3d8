//! Configuration: `gateway.yaml` and the rule files it points at.
//!
//! Parsing is strict (unknown keys are errors, every one of them collected
//! by `strict` while the rest is read on) and two-layered: `raw` and
//! `rule_raw` mirror the YAML with source locations, `validate` and
//! `rule_build` turn it into the typed [`Config`] and its rules (JWT
//! secrets included, read from the environment here so that a missing one
//! is reported at its rule's `secret_env`). Every problem is
//! reported as `path:line:column: message`; one file's YAML syntax error
//! (or a value of the wrong type, text where a number belongs) stops that
//! file, but the other files are still checked.
//!
//! Called by `main` (`run`, `check`) and by the admin reload.

pub mod cache_build;
pub mod error;
mod logs;
pub mod model;
pub mod raw;
pub mod restart;
pub mod routes;
pub mod rule_build;
pub mod rule_raw;
pub mod strict;
pub mod tls;
pub mod units;
mod validate;
pub mod view;

use std::path::{Path, PathBuf};

use serde_saphyr::Location;

use crate::rules::{CacheRule, CacheRules, Rule, RuleSet};
use crate::vocab::UpstreamId;
use cache_build::build_cache_rule;
use error::{ConfigError, ConfigErrors, Problems};
pub use model::*;
use rule_build::{build_rule, EnvLookup, RuleContext};
use rule_raw::RawRuleFile;

/// Reads and validates `gateway.yaml` and every rule file it names, with
/// JWT secrets from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, &|name| std::env::var_os(name))
}

/// [`load`] with `env` standing in for the process environment.
pub fn load_with_env(path: &Path, env: EnvLookup) -> Result<Config, ConfigErrors> {
    let mut found = Vec::new();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Err(ConfigErrors(vec![ConfigError::whole_file(
                path,
                format!("cannot read config: {e}"),
            )]))
        }
    };
    let raw: raw::RawGateway = match strict::parse(&text) {
        Ok((r, unknown)) => {
            found.extend(unknown_keys(path, unknown));
            r
        }
        Err(e) => return Err(ConfigErrors(vec![ConfigError::from_yaml(path, &e)])),
    };
    let config = validate::gateway(&mut Problems::new(path, &mut found), &raw);
    let access_log = logs::access_log(&mut Problems::new(path, &mut found), &raw, env);
    let log = logs::log(&mut Problems::new(path, &mut found), &raw);
    // Rule files are checked even when gateway.yaml has problems, so one
    // `sluice check` shows everything; they need the upstream names.
    let names: Vec<String> = raw
        .upstreams
        .as_ref()
        .map(|u| u.value.keys().cloned().collect())
        .unwrap_or_default();
    let default_upstream = raw
        .default_upstream
        .as_ref()
        .and_then(|d| names.iter().position(|n| *n == d.value))
        .unwrap_or(0);
    let globs = raw
        .rules
        .as_ref()
        .map(|g| g.value.0.clone())
        .unwrap_or_default();
    let globs_at = raw.rules.as_ref().map(|g| g.referenced);
    let ctx = RuleContext {
        upstreams: &names,
        default_upstream: UpstreamId(default_upstream),
        env,
    };
    let (rules, cache_rules) = load_rules_into(path, (&globs, globs_at), &ctx, &mut found);
    sort_by_position(&mut found);
    match config {
        Some(mut config) if found.is_empty() => {
            config.rules = RuleSet::new(rules);
            config.access_log = access_log;
            config.log = log;
            config.cache_rules = CacheRules::new(cache_rules);
            Ok(config)
        }
        _ => Err(ConfigErrors(found)),
    }
}

/// Unknown keys of `file` as problems at their keys.
fn unknown_keys(file: &Path, unknown: Vec<strict::UnknownKey>) -> Vec<ConfigError> {
    unknown
        .into_iter()
        .map(|u| ConfigError::at(file, u.at, u.to_string()))
        .collect()
}

/// Orders problems by file (in the order files were read), then line and
/// column, so the output reads top to bottom.
fn sort_by_position(found: &mut [ConfigError]) {
    let mut files: Vec<PathBuf> = Vec::new();
    for e in found.iter() {
        if !files.contains(&e.file) {
            files.push(e.file.clone());
        }
    }
    found.sort_by_key(|e| {
        let file = files.iter().position(|f| *f == e.file).unwrap_or(0);
        (file, e.line, e.column)
    });
}

/// The rule files a set of globs names, sorted, relative to the config;
/// problems are reported at the `rules:` key when its location is known.
fn rule_files(
    config_path: &Path,
    (globs, at): (&[String], Option<Location>),
    found: &mut Vec<ConfigError>,
) -> Vec<PathBuf> {
    let at = at.unwrap_or(Location::UNKNOWN);
    let dir = validate::config_dir(config_path);
    let mut files = Vec::new();
    for g in globs {
        if g.trim().is_empty() {
            continue;
        }
        let pattern = if Path::new(g).is_absolute() {
            g.clone()
        } else {
            dir.join(g).to_string_lossy().into_owned()
        };
        let paths = match glob::glob(&pattern) {
            Ok(paths) => paths,
            Err(e) => {
                found.push(ConfigError::at(
                    config_path,
                    at,
                    format!("rules: {g:?} is not a valid glob: {e}"),
                ));
                continue;
            }
        };
        let before = files.len();
        for entry in paths {
            match entry {
                Ok(p) if p.is_file() => files.push(p),
                Ok(_) => {}
                Err(e) => found.push(ConfigError::whole_file(
                    e.path(),
                    format!("cannot read rule file: {}", e.error()),
                )),
            }
        }
        // A typo in the glob would otherwise silently load no rules. (An
        // empty glob is already reported by validation.)
        if files.len() == before && !g.trim().is_empty() {
            found.push(ConfigError::at(
                config_path,
                at,
                format!("rules: {g:?} matches no file (looked in {})", dir.display()),
            ));
        }
    }
    files.sort();
    files.dedup();
    files
}

fn load_rules_into(
    config_path: &Path,
    globs: (&[String], Option<Location>),
    ctx: &RuleContext,
    found: &mut Vec<ConfigError>,
) -> (Vec<Rule>, Vec<CacheRule>) {
    let mut rules: Vec<Rule> = Vec::new();
    let mut cache_rules: Vec<CacheRule> = Vec::new();
    // Cache rules are built once every file's flash-sale rules are: a
    // cache file that sorts first must still meet the rules it overlaps.
    let mut parsed: Vec<(PathBuf, RawRuleFile)> = Vec::new();
    for file in rule_files(config_path, globs, found) {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                found.push(ConfigError::whole_file(
                    &file,
                    format!("cannot read rule file: {e}"),
                ));
                continue;
            }
        };
        let raw: RawRuleFile = match strict::parse(&text) {
            Ok((r, unknown)) => {
                found.extend(unknown_keys(&file, unknown));
                r
            }
            Err(e) => {
                found.push(ConfigError::from_yaml(&file, &e));
                continue;
            }
        };
        let mut p = Problems::new(&file, found);
        for raw_rule in &raw.rules {
            let Some(rule) = build_rule(raw_rule, ctx, &mut p) else {
                continue;
            };
            if let Some(first) = rules.iter().find(|r| r.name == rule.name) {
                p.add(
                    raw_rule
                        .value
                        .name
                        .as_ref()
                        .map_or(raw_rule.referenced, |n| n.referenced),
                    format!(
                        "name: {:?} is already used by the rule at {}:{}",
                        &*rule.name,
                        first.origin.0.display(),
                        first.origin.1
                    ),
                );
                continue;
            }
            if let Some(other) = rules
                .iter()
                .find(|r| r.method == rule.method && r.path.overlaps(&rule.path))
            {
                p.add(
                    raw_rule
                        .value
                        .matcher
                        .as_ref()
                        .map_or(raw_rule.referenced, |m| m.value.path.referenced),
                    format!(
                        "match: {} {:?} overlaps rule {:?} ({} {:?}); a request would match both",
                        rule.method,
                        rule.path.as_str(),
                        &*other.name,
                        other.method,
                        other.path.as_str()
                    ),
                );
                continue;
            }
            rules.push(rule);
        }
        parsed.push((file, raw));
    }
    for (file, raw) in &parsed {
        let mut p = Problems::new(file, found);
        for raw_rule in &raw.cache {
            let Some(rule) = build_cache_rule(raw_rule, ctx, &mut p) else {
                continue;
            };
            if let Some(problem) = cache_conflict(&rule, &rules, &cache_rules) {
                let at = raw_rule
                    .value
                    .matcher
                    .as_ref()
                    .map_or(raw_rule.referenced, |m| {
                        if problem.starts_with("name") {
                            raw_rule
                                .value
                                .name
                                .as_ref()
                                .map_or(m.value.path.referenced, |n| n.referenced)
                        } else {
                            m.value.path.referenced
                        }
                    });
                p.add(at, problem);
                continue;
            }
            cache_rules.push(rule);
        }
    }
    (rules, cache_rules)
}

/// Why a cache rule cannot join the others: a name already used (by a
/// flash-sale or a cache rule: both are `rule` labels), or a path another
/// cache rule or a flash-sale rule of the same method also matches, or
/// one of another method refuses (`match.other_methods`).
fn cache_conflict(rule: &CacheRule, rules: &[Rule], cache: &[CacheRule]) -> Option<String> {
    let named = rules
        .iter()
        .map(|r| (&r.name, &r.origin))
        .chain(cache.iter().map(|c| (&c.name, &c.origin)))
        .find(|(n, _)| **n == rule.name);
    if let Some((_, origin)) = named {
        return Some(format!(
            "name: {:?} is already used by the rule at {}:{}",
            &*rule.name,
            origin.0.display(),
            origin.1
        ));
    }
    if let Some(other) = cache.iter().find(|c| c.path.overlaps(&rule.path)) {
        return Some(format!(
            "cache.match: GET {:?} overlaps cache rule {:?} (GET {:?}); a request would match both",
            rule.path.as_str(),
            &*other.name,
            other.path.as_str()
        ));
    }
    // A flash-sale rule wins over the cache: refuse the overlap rather
    // than leave a cache rule that never serves some of its paths.
    if let Some(other) = rules
        .iter()
        .find(|r| r.method == rule.method && r.path.overlaps(&rule.path))
    {
        return Some(format!(
            "cache.match: GET {:?} overlaps rule {:?} (GET {:?}); flash-sale requests are never cached",
            rule.path.as_str(),
            &*other.name,
            other.path.as_str()
        ));
    }
    // A rule of another method refuses GETs of its paths unless it passes
    // them (`match.other_methods`): the cache would not serve the paths
    // they share.
    if let Some(other) = rules
        .iter()
        .find(|r| r.method != rule.method && r.refuses(&rule.method) && r.path.overlaps(&rule.path))
    {
        return Some(format!(
            "cache.match: GET {:?} overlaps rule {:?} ({} {:?}), which refuses other methods on its paths; set its match.other_methods: pass to cache GETs there",
            rule.path.as_str(),
            &*other.name,
            other.method.as_str(),
            other.path.as_str()
        ));
    }
    None
}
