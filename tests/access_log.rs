//! The access log and the gateway's own log format, on real gateway
//! processes: JSON and combined lines for a winner, a sold-out loser, a
//! pass-through and a ticket poll; user ids hashed under a key unless
//! `log_user`; SIGUSR1 after a rename (logrotate) goes on in a new file
//! with nothing lost; a writer stuck on a pipe nobody reads drops lines
//! and counts them while every request is still answered; `log.format:
//! json` makes every log line a JSON object.

use sluice_testkit as support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use support::{get, metric_value, put_stock, request, Gateway, Upstream};

const RULE: &str = r#"rules:
  - name: seckill
    match: { method: POST, path: "/api/seckill/{sku}/order" }
    user: { header: X-User-Id }
    sku: { path: sku }
    dedup: { key: [user, sku], ttl: 10m }
"#;

/// The hash key the tests give `access_log.hash_key_env`.
const KEY: &str = "test-log-key";

/// A gateway before `upstream` with the seckill rule and `extra` config.
fn gateway(upstream: &Upstream, extra: &str) -> Gateway {
    Gateway::builder()
        .config(&format!(
            "listen: ${{LISTEN}}\n\
             admin: {{ listen: ${{ADMIN}} }}\n\
             threads: 2\n\
             shutdown: {{ grace_period: 0s, timeout: 1s }}\n\
             upstreams:\n  mall:\n    servers: [{}]\n\
             default_upstream: mall\n\
             rules: lua-free-rules/*.yaml\n\
             {extra}",
            upstream.addr()
        ))
        .file("lua-free-rules/seckill.yaml", RULE)
        // A folder for logs, as /var/log/sluice would be.
        .file("logs/.keep", "")
        .env("SLUICE_TEST_LOG_KEY", KEY)
        .start()
}

/// The lines of `path` once it has at least `n` (the writer runs on its
/// own thread); panics with what it has after 10 s.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{}: want {n} lines, have {}:\n{text}",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// The hash the log must show for `user` under [`KEY`]: the first 8
/// bytes of HMAC-SHA256, in hex.
fn keyed_hash(user: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(KEY.as_bytes()).expect("any key length");
    mac.update(user.as_bytes());
    mac.finalize().into_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn buy(gw: &Gateway, user: &str) -> support::Response {
    request(
        gw.listen(),
        "POST",
        "/api/seckill/p1/order",
        &[("x-user-id", user), ("user-agent", "buyer/1.0")],
        b"{}",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_fields_of_a_winner_a_sold_out_and_a_passthrough() {
    let mall = Upstream::start();
    let gw = gateway(
        &mall,
        "access_log: { path: access.log, hash_key_env: SLUICE_TEST_LOG_KEY }\n",
    );
    put_stock(gw.admin(), "seckill", "p1", 1).await;

    let won = buy(&gw, "u1").await;
    assert_eq!(won.header("x-sluice-outcome"), Some("forwarded"));
    let ticket = mall
        .last()
        .and_then(|r| r.header("x-sluice-ticket").map(str::to_owned))
        .expect("the backend got the winner's ticket");
    let lost = buy(&gw, "u2").await;
    assert_eq!(lost.header("x-sluice-outcome"), Some("sold_out"));
    let passed = get(gw.listen(), "/static/app.js?v=secret-token").await;
    assert_eq!(passed.header("x-sluice-outcome"), Some("passthrough"));
    let polled = get(gw.listen(), &format!("/sluice/tickets/{ticket}")).await;

    let lines = wait_lines(&gw.dir().join("access.log"), 4);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    // A line is written when its request ends, which can be just after
    // the client has its answer and sent the next one: found by content.
    let parsed: Vec<Value> = lines.iter().map(|l| json(l)).collect();
    let find = |what: &str, hit: &dyn Fn(&Value) -> bool| {
        let found: Vec<&Value> = parsed.iter().filter(|v| hit(v)).collect();
        assert_eq!(found.len(), 1, "one {what} line in {lines:#?}");
        found[0].clone()
    };
    // (A poll of a done ticket replays its answer, outcome and all.)
    let winner = find("forwarded", &|v| {
        v["outcome"] == "forwarded" && v["path"] == "/api/seckill/p1/order"
    });
    let loser = find("sold_out", &|v| v["outcome"] == "sold_out");
    let pass = find("passthrough", &|v| v["outcome"] == "passthrough");
    let poll = find("poll", &|v| {
        v["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/sluice/tickets/"))
    });

    for line in [&winner, &loser, &pass, &poll] {
        assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
        assert!(
            line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        assert!(
            line["request_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{line}"
        );
        assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
        // Ids are hashed: the raw ones never appear.
        assert!(line.get("user").is_none(), "{line}");
    }

    assert_eq!(winner["method"], "POST");
    assert_eq!(winner["path"], "/api/seckill/p1/order");
    assert_eq!(winner["status"], 200);
    assert_eq!(winner["outcome"], "forwarded");
    assert_eq!(winner["rule"], "seckill");
    assert_eq!(winner["sku"], "p1");
    assert_eq!(winner["ticket"], ticket.as_str());
    assert_eq!(winner["user_hash"], keyed_hash("u1").as_str());
    assert_eq!(winner["upstream"], "mall");
    assert!(winner["upstream_ms"].as_f64().is_some(), "{winner}");
    assert_eq!(winner["user_agent"], "buyer/1.0");

    assert_eq!(loser["status"], 410);
    assert_eq!(loser["outcome"], "sold_out");
    assert_eq!(loser["rule"], "seckill");
    assert_eq!(loser["sku"], "p1");
    assert_eq!(loser["user_hash"], keyed_hash("u2").as_str());
    assert_eq!(loser["ticket"], Value::Null);
    assert_eq!(loser["upstream"], Value::Null);
    assert_eq!(loser["upstream_ms"], Value::Null);
    assert!(loser["bytes"].as_u64().is_some_and(|b| b > 0), "{loser}");

    // The query (which may carry tokens or ids) is not logged.
    assert_eq!(pass["path"], "/static/app.js");
    assert!(
        !lines.iter().any(|l| l.contains("secret-token")),
        "{lines:#?}"
    );
    assert_eq!(pass["status"], 200);
    assert_eq!(pass["outcome"], "passthrough");
    assert_eq!(pass["rule"], Value::Null);
    assert_eq!(pass["sku"], Value::Null);
    assert_eq!(pass["user_hash"], Value::Null);
    assert_eq!(pass["upstream"], "mall");

    assert_eq!(poll["path"], format!("/sluice/tickets/{ticket}").as_str());
    assert_eq!(poll["status"], u64::from(polled.status));
    assert_eq!(poll["upstream"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_are_nginx_combined_with_sluice_fields_and_log_user_writes_ids() {
    let mall = Upstream::start();
    let gw = gateway(
        &mall,
        "access_log: { path: logs/access.log, format: combined, log_user: true }\n",
    );
    // No stock loaded: `unavailable`, with the user and sku read.
    let refused = buy(&gw, "u1").await;
    assert_eq!(refused.status, 503);
    get(gw.listen(), "/index.html").await;

    let lines = wait_lines(&gw.dir().join("logs/access.log"), 2);
    let line = |path: &str| {
        lines
            .iter()
            .find(|l| l.contains(path))
            .unwrap_or_else(|| panic!("no {path} line in {lines:#?}"))
    };
    let (refused_line, index_line) = (line("/api/seckill/p1/order"), line("/index.html"));
    let (date_open, rest) = refused_line.split_once(" [").expect("a [time]");
    assert_eq!(date_open, "127.0.0.1 - -");
    let (time, rest) = rest.split_once("] ").expect("[time] ");
    // 11/Nov/2026:00:00:00 +0000
    assert_eq!(time.len(), 26, "{time}");
    assert!(time.ends_with(" +0000"), "{time}");
    let body_bytes = refused.body.len();
    let want = format!(
        "\"POST /api/seckill/p1/order HTTP/1.1\" 503 {body_bytes} \"-\" \"buyer/1.0\" \
         outcome=unavailable rule=seckill sku=p1 ticket=- user=u1 upstream=- upstream_time=- \
         request_time="
    );
    assert!(rest.starts_with(&want), "{rest}\nwant: {want}");
    let request_time = rest.rsplit("request_time=").next().unwrap_or("");
    assert!(request_time.parse::<f64>().is_ok(), "{rest}");

    assert!(
        index_line.contains("\"GET /index.html HTTP/1.1\" 200 ")
            && index_line.contains(
                " outcome=passthrough rule=- sku=- ticket=- user=- upstream=mall upstream_time=0."
            ),
        "{index_line}"
    );
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_after_a_rename_goes_on_in_a_new_file_and_loses_nothing() {
    let mall = Upstream::start();
    let gw = gateway(&mall, "access_log: { path: access.log }\n");
    let log = gw.dir().join("access.log");
    let rotated = gw.dir().join("access.log.1");
    for _ in 0..3 {
        get(gw.listen(), "/before").await;
    }
    wait_lines(&log, 3);

    // What logrotate does: move the file away, then signal.
    std::fs::rename(&log, &rotated).expect("rename the log");
    // SAFETY: kill(2) to the gateway process this test started and still owns.
    let sent = unsafe { libc::kill(gw.pid() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(sent, 0, "kill -USR1");

    // Lines go on to the renamed file until the writer has reopened;
    // requests continue until one lands in the new file.
    let mut after = 0;
    while count_lines(&log) == 0 {
        assert!(
            after < 500,
            "no line in a new access.log after {after} requests"
        );
        get(gw.listen(), "/after").await;
        after += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every request has its line, in one file or the other.
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_lines(&log) + count_lines(&rotated) < 3 + after {
        assert!(Instant::now() < deadline, "lines lost across the reopen");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count_lines(&log) + count_lines(&rotated), 3 + after);
    let old = std::fs::read_to_string(&rotated).expect("rotated file");
    assert_eq!(old.matches("\"/before\"").count(), 3, "{old}");
    let new = std::fs::read_to_string(&log).expect("new file");
    assert!(new.lines().all(|l| l.contains("\"/after\"")), "{new}");
    assert!(gw.log().contains("access log reopened"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_without_an_access_log_is_harmless() {
    let mall = Upstream::start();
    let mut gw = gateway(&mall, "");
    // SAFETY: kill(2) to the gateway process this test started and still owns.
    let sent = unsafe { libc::kill(gw.pid() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(sent, 0, "kill -USR1");
    // Its default action would have ended the process; it answers on.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("no access_log to reopen") {
        assert!(Instant::now() < deadline, "SIGUSR1 not seen: {}", gw.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(gw.listen(), "/still-here").await.status, 200);
    assert!(gw.wait_exit(Duration::ZERO).is_none(), "the gateway exited");
}

/// A FIFO at a fresh path, opened for reading (so the gateway can open it
/// for writing) but never read: the writer fills the pipe and stalls.
struct StalledPipe {
    _dir: tempfile::TempDir,
    path: PathBuf,
    _reader: std::fs::File,
}

impl StalledPipe {
    fn new() -> StalledPipe {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("access.fifo");
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: mkfifo(3) on a NUL-terminated path in our own temp dir.
        let made = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(made, 0, "mkfifo: {}", std::io::Error::last_os_error());
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .expect("open the FIFO's read end");
        StalledPipe {
            _dir: dir,
            path,
            _reader: reader,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_dropped_and_counted_when_the_writer_cannot_keep_up() {
    let pipe = StalledPipe::new();
    let mall = Upstream::start();
    let gw = gateway(
        &mall,
        &format!(
            "access_log: {{ path: \"{}\", buffer: 1 }}\n",
            pipe.path.display()
        ),
    );
    // Long paths fill the pipe (64 KiB) and the writer's buffer (64 KiB)
    // within a few dozen lines; the writer then blocks for good and the
    // one-line channel overflows.
    let long_id = "a".repeat(2000);
    let sent = 300;
    for _ in 0..sent {
        let resp = get(gw.listen(), &format!("/sluice/tickets/{long_id}")).await;
        assert!(
            resp.header("x-sluice-outcome").is_some(),
            "an answer from the gateway: {} {}",
            resp.status,
            resp.text()
        );
    }
    let text = gw.metrics().await;
    let dropped = metric_value(&text, "sluice_access_log_dropped_total", &[]).unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "no line dropped after {sent} requests with the writer stalled"
    );
    assert!(dropped <= f64::from(sent), "{dropped}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_makes_every_gateway_log_line_a_json_object() {
    let mall = Upstream::start();
    let gw = gateway(&mall, "log: { format: json }\n");
    get(gw.listen(), "/").await;
    let log = gw.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    let mut starting = 0;
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["message"] == "sluice starting" {
            // Fields sit at the top level, where log shippers index them.
            assert_eq!(v["listen"], gw.listen().to_string().as_str(), "{line}");
            starting += 1;
        }
    }
    assert_eq!(starting, 1, "{log}");
}
