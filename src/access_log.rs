//! The access log (`access_log:`): one line per request the proxy service
//! answers, gateway answers and ticket polls included, as JSON or as
//! nginx's `combined` line with Sluice's fields appended.
//!
//! Off the request path: the proxy's `logging` phase fills an [`Entry`]
//! and [`AccessLog::send`] `try_send`s it into a bounded channel
//! (`access_log.buffer` lines); a dedicated thread formats, hashes and
//! writes the lines through a buffer, flushing whenever the channel runs
//! empty. When the writer falls behind (a slow disk, a stalled pipe) the
//! channel fills and new lines are dropped and counted in
//! `sluice_access_log_dropped_total`: a request never waits for the log.
//!
//! The same thread reopens the file on SIGUSR1 (logrotate's `postrotate`).
//! It listens for the signal from start-up, with or without an access
//! log, so that a SIGUSR1 never kills the gateway (its default action).
//!
//! Owned by the server, which starts it before the listeners open; the
//! proxy holds the sending half.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use prometheus::IntCounter;
use sha2::Sha256;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, Notify};

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::outcome::Outcome;
use crate::vocab::TicketId;

/// Longest path kept in a line: a client must not make the log (or the
/// channel's memory) grow with each byte it sends. Longer ones are cut
/// and end in `...`.
const MAX_PATH: usize = 2048;
/// Longest `Referer` and `User-Agent` kept, cut the same way.
const MAX_HEADER: usize = 512;
/// Lines taken from the channel at a time: enough to batch writes under
/// load, few enough that a flush is never far off.
const BATCH: usize = 256;
/// The file's write buffer: a batch of lines per write(2).
const WRITE_BUFFER: usize = 64 << 10;
/// Bytes of the user's HMAC kept: enough to tell users apart in one
/// log, too few to serve as a user id elsewhere.
const USER_HASH_BYTES: usize = 8;

/// Why the access log could not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    /// The file cannot be opened for appending.
    #[error("access_log.path {path}: cannot open for appending: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The writer thread, its runtime or its signal handler could not start.
    #[error("access log writer: {0}")]
    Writer(std::io::Error),
}

/// What one request leaves in the log (see the README for each field).
#[derive(Clone, Debug)]
pub struct Entry {
    /// When the answer was done.
    pub time: SystemTime,
    /// The client, as `trusted_proxies` makes it out.
    pub client_ip: IpAddr,
    /// The request method.
    pub method: http::Method,
    /// The path as sent, without the query (it may carry user ids and
    /// tokens), cut at [`MAX_PATH`] bytes.
    pub path: String,
    /// The protocol version.
    pub version: http::Version,
    /// The status written to the client (0: none was written).
    pub status: u16,
    /// Body bytes written to the client.
    pub bytes: u64,
    /// `Referer`, cut at [`MAX_HEADER`] bytes.
    pub referer: Option<String>,
    /// `User-Agent`, cut at [`MAX_HEADER`] bytes.
    pub user_agent: Option<String>,
    /// How the gateway decided.
    pub outcome: Outcome,
    /// The matched rule.
    pub rule: Option<Arc<str>>,
    /// The sku, once extracted.
    pub sku: Option<String>,
    /// The user id, once extracted; written only with `log_user: true`,
    /// otherwise as a keyed hash.
    pub user: Option<String>,
    /// A winner's ticket.
    pub ticket: Option<TicketId>,
    /// The upstream the request was sent to.
    pub upstream: Option<String>,
    /// From choosing a server to the end of the upstream's answer.
    pub upstream_time: Option<Duration>,
    /// From the request's start to the end of the answer.
    pub total_time: Duration,
}

/// `s` cut to at most `max` bytes (on a character boundary), marked `...`.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// A path as the log keeps it.
pub fn clip_path(path: &str) -> String {
    clip(path, MAX_PATH)
}

/// A header value as the log keeps it.
pub fn clip_header(value: &str) -> String {
    clip(value, MAX_HEADER)
}

/// The sending half, held by the proxy.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    dropped: IntCounter,
}

impl AccessLog {
    /// Queues a line for the writer; when the channel is full the line
    /// is dropped and counted, never waited for.
    pub fn send(&self, entry: Entry) {
        if self.tx.try_send(entry).is_err() {
            self.dropped.inc();
        }
    }
}

/// The writer thread; [`LogWriter::finish`] writes what is queued and
/// stops it.
pub struct LogWriter {
    stop: Arc<Notify>,
    done: std::sync::mpsc::Receiver<()>,
}

impl LogWriter {
    /// Writes the lines still queued and flushes, waiting at most
    /// `within` (a writer stuck on a full pipe would wait forever).
    pub fn finish(self, within: Duration) {
        self.stop.notify_one();
        if self.done.recv_timeout(within).is_err() {
            tracing::warn!("the access log writer did not finish within {within:?}; lines still queued are lost");
        }
    }
}

/// Starts the writer thread (opening the file first, so a path that
/// cannot be written stops the start) and its SIGUSR1 handler. Without
/// an access log the thread only keeps SIGUSR1 harmless.
pub fn start(
    config: Option<&AccessLogConfig>,
    dropped: IntCounter,
) -> Result<(Option<AccessLog>, LogWriter), AccessLogError> {
    let sink = config.map(|c| Sink::open(c, dropped.clone())).transpose()?;
    let (log, rx) = match config {
        Some(c) => {
            let (tx, rx) = mpsc::channel(c.buffer as usize);
            (Some(AccessLog { tx, dropped }), Some(rx))
        }
        None => (None, None),
    };
    let stop = Arc::new(Notify::new());
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let (done_tx, done) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("sluice-access-log".into())
        .spawn({
            let stop = stop.clone();
            move || {
                run(sink, rx, stop, ready_tx);
                let _ = done_tx.send(());
            }
        })
        .map_err(AccessLogError::Writer)?;
    // The handler is in place before any listener opens.
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(AccessLogError::Writer(e)),
        Err(_) => {
            return Err(AccessLogError::Writer(std::io::Error::other(
                "the writer thread stopped while starting",
            )))
        }
    }
    Ok((log, LogWriter { stop, done }))
}

/// The writer thread's body: its own small runtime, so that the signal
/// is awaited with tokio and the file written with plain blocking calls
/// that never stall the proxy's runtimes.
fn run(
    mut sink: Option<Sink>,
    mut rx: Option<mpsc::Receiver<Entry>>,
    stop: Arc<Notify>,
    ready: std::sync::mpsc::SyncSender<std::io::Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    runtime.block_on(async {
        let mut usr1 = match signal(SignalKind::user_defined1()) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                biased;
                _ = stop.notified() => break,
                _ = usr1.recv() => match sink.as_mut() {
                    Some(sink) => sink.reopen(),
                    None => tracing::info!("SIGUSR1: no access_log to reopen"),
                },
                n = next_batch(&mut rx, &mut batch) => {
                    if n == 0 {
                        break;
                    }
                    if let Some(sink) = sink.as_mut() {
                        for entry in batch.drain(..) {
                            sink.write(&entry);
                        }
                        if rx.as_ref().is_some_and(|rx| rx.is_empty()) {
                            sink.flush();
                        }
                    }
                    batch.clear();
                }
            }
        }
        // Stopping: what is queued is still written.
        if let (Some(sink), Some(rx)) = (sink.as_mut(), rx.as_mut()) {
            while let Ok(entry) = rx.try_recv() {
                sink.write(&entry);
            }
            sink.flush();
        }
    });
}

/// The next lines, or never without an access log; 0 once every sender
/// is gone.
async fn next_batch(rx: &mut Option<mpsc::Receiver<Entry>>, batch: &mut Vec<Entry>) -> usize {
    match rx {
        Some(rx) => rx.recv_many(batch, BATCH).await,
        None => std::future::pending().await,
    }
}

/// The keyed hash that stands for a user id: HMAC-SHA256 under the key
/// of `access_log.hash_key_env`, or a random key per process.
struct UserHash(Hmac<Sha256>);

impl UserHash {
    fn new(key: &[u8]) -> Result<Self, AccessLogError> {
        Hmac::new_from_slice(key)
            .map(UserHash)
            .map_err(|e| AccessLogError::Writer(std::io::Error::other(e.to_string())))
    }

    fn of(&self, user: &str) -> String {
        let mut mac = self.0.clone();
        mac.update(user.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(USER_HASH_BYTES * 2);
        for b in digest.iter().take(USER_HASH_BYTES) {
            let _ = write!(out, "{b:02x}");
        }
        out
    }
}

/// The open file and how lines are made.
struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
    format: AccessLogFormat,
    log_user: bool,
    hash: UserHash,
    dropped: IntCounter,
    line: Vec<u8>,
    /// Whether the last write failed (one warning per run of failures).
    failing: bool,
}

fn open(path: &Path) -> Result<File, AccessLogError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AccessLogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

impl Sink {
    fn open(config: &AccessLogConfig, dropped: IntCounter) -> Result<Self, AccessLogError> {
        let key: Vec<u8> = match &config.hash_key {
            Some(k) => k.bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        Ok(Self {
            out: BufWriter::with_capacity(WRITE_BUFFER, open(&config.path)?),
            path: config.path.clone(),
            format: config.format,
            log_user: config.log_user,
            hash: UserHash::new(&key)?,
            dropped,
            line: Vec::with_capacity(1024),
            failing: false,
        })
    }

    fn write(&mut self, entry: &Entry) {
        self.line.clear();
        let user = entry.user.as_deref().map(|u| {
            if self.log_user {
                User::Id(u.to_string())
            } else {
                User::Hash(self.hash.of(u))
            }
        });
        let made = match self.format {
            AccessLogFormat::Json => json_line(&mut self.line, entry, user, self.log_user),
            AccessLogFormat::Combined => {
                self.line
                    .extend_from_slice(combined_line(entry, user, self.log_user).as_bytes());
                Ok(())
            }
        };
        self.line.push(b'\n');
        let written = made
            .map_err(std::io::Error::other)
            .and_then(|()| self.out.write_all(&self.line));
        self.outcome(written);
    }

    fn flush(&mut self) {
        let flushed = self.out.flush();
        if let Err(e) = &flushed {
            // The buffered lines stay and are tried again with the next.
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the access log");
        }
    }

    fn outcome(&mut self, written: std::io::Result<()>) {
        match written {
            Ok(()) => self.failing = false,
            Err(e) => {
                self.dropped.inc();
                if !self.failing {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write the access log; lines are dropped and counted");
                }
                self.failing = true;
            }
        }
    }

    /// Writes out the old file's lines and goes on in a new file at the
    /// path (logrotate moved the old one away). If the path cannot be
    /// opened, lines keep going to the old file.
    fn reopen(&mut self) {
        self.flush();
        match open(&self.path) {
            Ok(file) => {
                self.out = BufWriter::with_capacity(WRITE_BUFFER, file);
                tracing::info!(path = %self.path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen the access log; still writing to the old file")
            }
        }
    }
}

/// A user as the log shows it.
enum User {
    Id(String),
    Hash(String),
}

/// Seconds with microseconds, as nginx's `$request_time` (which stops
/// at milliseconds).
fn secs(d: Duration) -> String {
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

/// Milliseconds with microseconds, for JSON (no exponent for small ones).
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

#[derive(serde::Serialize)]
struct JsonLine<'a> {
    time: String,
    client_ip: IpAddr,
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    status: u16,
    bytes: u64,
    outcome: &'static str,
    rule: Option<&'a str>,
    sku: Option<&'a str>,
    ticket: Option<String>,
    // One of the two, by `log_user`; null when no user was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_hash: Option<Option<String>>,
    upstream: Option<&'a str>,
    upstream_ms: Option<f64>,
    request_ms: f64,
    referer: Option<&'a str>,
    user_agent: Option<&'a str>,
}

fn json_line(
    out: &mut Vec<u8>,
    e: &Entry,
    user: Option<User>,
    log_user: bool,
) -> Result<(), serde_json::Error> {
    let (id, hash) = match user {
        Some(User::Id(u)) => (Some(u), None),
        Some(User::Hash(h)) => (None, Some(h)),
        None => (None, None),
    };
    let line = JsonLine {
        time: chrono::DateTime::<chrono::Utc>::from(e.time)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        client_ip: e.client_ip,
        method: e.method.as_str(),
        path: &e.path,
        protocol: protocol(e.version),
        status: e.status,
        bytes: e.bytes,
        outcome: e.outcome.as_str(),
        rule: e.rule.as_deref(),
        sku: e.sku.as_deref(),
        ticket: e.ticket.map(|t| t.to_string()),
        user: log_user.then_some(id),
        user_hash: (!log_user).then_some(hash),
        upstream: e.upstream.as_deref(),
        upstream_ms: e.upstream_time.map(millis),
        request_ms: millis(e.total_time),
        referer: e.referer.as_deref(),
        user_agent: e.user_agent.as_deref(),
    };
    serde_json::to_writer(out, &line)
}

/// nginx's escaping of `$request` and headers in a log line: `"`, `\`,
/// control and non-ASCII bytes as `\xHH`.
fn escape_quoted(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
}

/// A `key=value` value: ids and names as they are, `-` when absent, any
/// byte that could break the field apart (a space, `=`, `"`) escaped.
fn push_field(out: &mut String, key: &str, value: Option<&str>) {
    out.push(' ');
    out.push_str(key);
    out.push('=');
    match value {
        None | Some("") => out.push('-'),
        Some(v) => {
            for b in v.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-' | b'/') {
                    out.push(char::from(b));
                } else {
                    let _ = write!(out, "\\x{b:02X}");
                }
            }
        }
    }
}

/// `$remote_addr - $remote_user [$time_local] "$request" $status
/// $body_bytes_sent "$http_referer" "$http_user_agent"`, then Sluice's
/// fields as `key=value` (see the README).
fn combined_line(e: &Entry, user: Option<User>, log_user: bool) -> String {
    let mut out = String::with_capacity(256 + e.path.len());
    let time = chrono::DateTime::<chrono::Utc>::from(e.time).format("%d/%b/%Y:%H:%M:%S %z");
    let _ = write!(out, "{} - - [{time}] \"", e.client_ip);
    escape_quoted(&mut out, e.method.as_str());
    out.push(' ');
    escape_quoted(&mut out, &e.path);
    let _ = write!(
        out,
        " {}\" {} {} \"",
        protocol(e.version),
        e.status,
        e.bytes
    );
    escape_quoted(&mut out, e.referer.as_deref().unwrap_or("-"));
    out.push_str("\" \"");
    escape_quoted(&mut out, e.user_agent.as_deref().unwrap_or("-"));
    out.push('"');
    push_field(&mut out, "outcome", Some(e.outcome.as_str()));
    push_field(&mut out, "rule", e.rule.as_deref());
    push_field(&mut out, "sku", e.sku.as_deref());
    let ticket = e.ticket.map(|t| t.to_string());
    push_field(&mut out, "ticket", ticket.as_deref());
    let (key, user) = match (log_user, user) {
        (true, Some(User::Id(u))) => ("user", Some(u)),
        (false, Some(User::Hash(h))) => ("user_hash", Some(h)),
        (true, _) => ("user", None),
        (false, _) => ("user_hash", None),
    };
    push_field(&mut out, key, user.as_deref());
    push_field(&mut out, "upstream", e.upstream.as_deref());
    let upstream_time = e.upstream_time.map(secs);
    push_field(&mut out, "upstream_time", upstream_time.as_deref());
    push_field(&mut out, "request_time", Some(&secs(e.total_time)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            // 2026-11-11T00:00:00.250Z
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_794_355_200_250),
            client_ip: "203.0.113.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
            method: http::Method::POST,
            path: "/api/seckill/p1/order".into(),
            version: http::Version::HTTP_11,
            status: 410,
            bytes: 42,
            referer: None,
            user_agent: Some("curl/8.0 \"x\"".into()),
            outcome: Outcome::SoldOut,
            rule: Some("phone".into()),
            sku: Some("p1".into()),
            user: Some("u1".into()),
            ticket: None,
            upstream: None,
            upstream_time: None,
            total_time: Duration::from_micros(1_049),
        }
    }

    #[test]
    fn combined_is_nginx_combined_then_sluice_fields() {
        let line = combined_line(&entry(), Some(User::Hash("00ff".into())), false);
        assert_eq!(
            line,
            "203.0.113.7 - - [11/Nov/2026:00:00:00 +0000] \"POST /api/seckill/p1/order HTTP/1.1\" \
             410 42 \"-\" \"curl/8.0 \\x22x\\x22\" outcome=sold_out rule=phone sku=p1 ticket=- \
             user_hash=00ff upstream=- upstream_time=- request_time=0.001049"
        );
    }

    #[test]
    fn json_has_every_field() {
        let mut out = Vec::new();
        json_line(&mut out, &entry(), Some(User::Id("u1".into())), true).expect("json");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("parses");
        assert_eq!(v["time"], "2026-11-11T00:00:00.250Z");
        assert_eq!(v["user"], "u1");
        assert!(v.get("user_hash").is_none());
        assert_eq!(v["request_ms"], 1.049);
        assert_eq!(v["upstream_ms"], serde_json::Value::Null);
    }

    #[test]
    fn user_hashes_are_keyed_and_stable_under_one_key() {
        let a = UserHash::new(b"key-a").expect("key");
        let b = UserHash::new(b"key-b").expect("key");
        assert_eq!(a.of("u1"), a.of("u1"));
        assert_ne!(a.of("u1"), a.of("u2"));
        assert_ne!(a.of("u1"), b.of("u1"));
        assert_eq!(a.of("u1").len(), USER_HASH_BYTES * 2);
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc...");
        assert_eq!(clip("aé", 2), "a...");
    }
}
