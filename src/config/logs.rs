//! Validates `access_log:` and `log:` of `gateway.yaml`: formats, the
//! access log's buffer and hash key, and that its file can be written.
//! Called by `config::load_with_env`, which has the environment the hash
//! key is read from.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use super::error::Problems;
use super::model::{defaults, AccessLogConfig, AccessLogFormat, LogConfig, LogFormat};
use super::raw::{RawAccessLog, RawGateway};
use super::rule_build::EnvLookup;
use super::validate::config_dir;
use crate::rules::Secret;

/// `log:`, defaults filled in.
pub fn log(p: &mut Problems, raw: &RawGateway) -> LogConfig {
    let mut out = LogConfig::default();
    let Some(format) = raw.log.as_ref().and_then(|l| l.value.format.as_ref()) else {
        return out;
    };
    match format.value.as_str() {
        "text" => out.format = LogFormat::Text,
        "json" => out.format = LogFormat::Json,
        other => p.add(
            format.referenced,
            format!("log.format: {other:?} is not one of text, json"),
        ),
    }
    out
}

/// `access_log:`, or `None` when it is not set (or has problems, which
/// are recorded).
pub fn access_log(p: &mut Problems, raw: &RawGateway, env: EnvLookup) -> Option<AccessLogConfig> {
    let section = raw.access_log.as_ref()?;
    let a = &section.value;
    let before = p.count();
    let path = p
        .required(section.referenced, "access_log.path", &a.path)
        .and_then(|path| writable(p, path));
    let format = match &a.format {
        None => defaults::ACCESS_LOG_FORMAT,
        Some(f) => match f.value.as_str() {
            "json" => AccessLogFormat::Json,
            "combined" => AccessLogFormat::Combined,
            other => {
                p.add(
                    f.referenced,
                    format!("access_log.format: {other:?} is not one of json, combined"),
                );
                defaults::ACCESS_LOG_FORMAT
            }
        },
    };
    let buffer = buffer(p, a);
    let (hash_key_env, hash_key) = match &a.hash_key_env {
        None => (None, None),
        Some(var) => {
            // Read now, so a missing key is reported at its line by
            // `sluice check`, as JWT secrets are.
            let key = env(&var.value)
                .map(OsString::into_encoded_bytes)
                .filter(|k| !k.is_empty());
            if key.is_none() {
                p.add(
                    var.referenced,
                    format!(
                        "access_log.hash_key_env: environment variable {} is unset or empty",
                        var.value
                    ),
                );
            }
            (Some(var.value.clone()), key.map(Secret::new))
        }
    };
    if p.count() > before {
        return None;
    }
    Some(AccessLogConfig {
        path: path?,
        format,
        log_user: a.log_user.as_ref().is_some_and(|l| l.value),
        hash_key_env,
        hash_key,
        buffer,
    })
}

fn buffer(p: &mut Problems, a: &RawAccessLog) -> u32 {
    let Some(b) = &a.buffer else {
        return defaults::ACCESS_LOG_BUFFER;
    };
    let max = defaults::ACCESS_LOG_BUFFER_MAX;
    match u32::try_from(b.value) {
        Ok(n) if (1..=max).contains(&n) => n,
        _ => {
            p.add(
                b.referenced,
                format!(
                    "access_log.buffer: {} must be a whole number of lines from 1 to {max}",
                    b.value
                ),
            );
            defaults::ACCESS_LOG_BUFFER
        }
    }
}

/// The access log's path (relative to gateway.yaml's folder), checked
/// without creating anything: an existing file must open for appending;
/// a new one needs an existing folder. (Creating it can still fail at
/// start, for want of permission: that is reported then.)
fn writable(p: &mut Problems, path: &Spanned<String>) -> Option<PathBuf> {
    if path.value.trim().is_empty() {
        p.add(path.referenced, "access_log.path: must not be empty");
        return None;
    }
    let full = config_dir(p.file()).join(&path.value);
    let problem = match std::fs::metadata(&full) {
        Ok(m) if m.is_dir() => Some("is a directory".to_string()),
        // A pipe to a log shipper: opening it for writing would wait for
        // its reader.
        Ok(m) if m.file_type().is_fifo() => None,
        Ok(_) => std::fs::OpenOptions::new()
            .append(true)
            .open(&full)
            .err()
            .map(|e| format!("cannot be opened for appending: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => folder_problem(&full),
        Err(e) => Some(format!("cannot be read: {e}")),
    };
    match problem {
        Some(problem) => {
            p.add(
                path.referenced,
                format!("access_log.path: {} {problem}", full.display()),
            );
            None
        }
        None => Some(full),
    }
}

/// Why a new file could not be made in `file`'s folder, if it could not.
fn folder_problem(file: &Path) -> Option<String> {
    let folder = config_dir(file);
    match std::fs::metadata(folder) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!(
            "cannot be created: {} is not a folder",
            folder.display()
        )),
        Err(e) => Some(format!("cannot be created in {}: {e}", folder.display())),
    }
}
