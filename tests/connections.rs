//! Client connections against the real gateway binary (issue 8, case 7):
//! the file-descriptor limit is raised at start; idle connections over
//! `limits.max_connections` get a clear 503 and the process never runs out
//! of descriptors, even with a hard limit of 1024 and 1,100 idle
//! connections; a client that does not finish its request head within
//! `limits.header_timeout` (first request or a keep-alive one) is cut; h2c
//! still works behind the gate. Raw sockets throughout, every wait bounded
//! far above the configured times (no timing threshold is asserted).

use sluice_testkit as support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::{Gateway, Upstream};

/// Bound on any single wait for the gateway: far above every time the
/// configs below set, so only a gateway that never acts fails it.
const PATIENCE: Duration = Duration::from_secs(30);

/// A gateway over `up` with `limits` (YAML flow mapping contents).
fn config(up: &Upstream, limits: &str, extra: &str) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 1s, timeout: 1s }}\n\
         upstreams:\n  mall:\n    servers: [{}]\n\
         default_upstream: mall\n\
         limits: {{ {limits} }}\n{extra}",
        up.addr()
    )
}

/// A connected socket with `PATIENCE` as its read and write timeout.
fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, PATIENCE)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(PATIENCE)).expect("read timeout");
    s.set_write_timeout(Some(PATIENCE)).expect("write timeout");
    s
}

/// How reading a connection to its end went.
#[derive(Debug)]
struct Ended {
    /// Everything received.
    bytes: Vec<u8>,
    /// The server closed the connection (EOF or reset), rather than the
    /// read timing out after `PATIENCE`.
    closed_by_server: bool,
}

impl Ended {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let (head, _) = text.split_once("\r\n\r\n")?;
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> serde_json::Value {
        let text = self.text();
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"))
    }
}

/// Reads until the server closes the connection or `PATIENCE` passes.
fn read_to_end(s: &mut TcpStream) -> Ended {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                return Ended {
                    bytes,
                    closed_by_server: true,
                }
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ended {
                    bytes,
                    closed_by_server: false,
                }
            }
            // A reset is the server closing too.
            Err(_) => {
                return Ended {
                    bytes,
                    closed_by_server: true,
                }
            }
        }
    }
}

/// Reads exactly one response with a Content-Length body, leaving the
/// connection open.
fn read_one_response(s: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("read a response head");
        assert!(
            n > 0,
            "closed mid-head: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.push(buf[0]);
    }
    let head = String::from_utf8_lossy(&bytes).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no content-length: {head}"));
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).expect("read a response body");
    head + &String::from_utf8_lossy(&body)
}

/// Sends a complete `GET path` asking to close, and reads the whole answer.
fn get_closing(s: &mut TcpStream, path: &str) -> Ended {
    let request = format!("GET {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n");
    // A refused connection may have half-closed already; the answer is
    // still there to read.
    let _ = s.write_all(request.as_bytes());
    read_to_end(s)
}

/// A fresh connection's `GET /` to its end.
fn fresh_get(addr: SocketAddr) -> Ended {
    get_closing(&mut connect(addr), "/")
}

/// Asserts `ended` is the gateway's clear refusal of a connection.
fn assert_refused(ended: &Ended) {
    assert_eq!(ended.status(), Some(503), "{}", ended.text());
    assert_eq!(
        ended.header("x-sluice-outcome").as_deref(),
        Some("unavailable")
    );
    assert_eq!(ended.header("connection").as_deref(), Some("close"));
    assert_eq!(ended.header("retry-after").as_deref(), Some("1"));
    assert_eq!(ended.json()["outcome"], "unavailable");
    assert!(ended.closed_by_server, "the refused connection stayed open");
}

/// Raises this test process's own soft descriptor limit to its hard one,
/// so that it can hold the idle connections it opens.
fn raise_own_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// Polls a fresh `GET /` until it is served (200), within `PATIENCE`.
fn wait_served(addr: SocketAddr) -> Ended {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let ended = fresh_get(addr);
        if ended.status() == Some(200) || Instant::now() >= deadline {
            return ended;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_soft_fd_limit_is_raised_to_the_hard_one_at_start() {
    let up = Upstream::start();
    let gw = Gateway::builder()
        .config(&config(&up, "", ""))
        .fd_limit(256, 1024)
        .start();
    assert_eq!(gw.fd_limits(), (1024, 1024));
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("file descriptor limit"))
        .unwrap_or_else(|| panic!("no fd limit line in the log:\n{log}"));
    for part in ["soft_before=256", "soft=1024", "hard=1024"] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
    // The derived cap for 1024 descriptors: (1024 - 256) * 8 / 17.
    assert!(
        log.lines()
            .any(|l| l.contains("client connection limits") && l.contains("max_connections=361")),
        "{log}"
    );
}

#[test]
fn with_1024_descriptors_1100_idle_connections_leave_the_gateway_answering() {
    let own = raise_own_fd_limit();
    assert!(own >= 1400, "this test needs 1400 descriptors, has {own}");
    let up = Upstream::start();
    // As in the report: `ulimit -n 1024` (soft and hard), no cap set, and
    // a header deadline far beyond this test so the idle ones stay.
    let gw = Gateway::builder()
        .config(&config(&up, "header_timeout: 5m", ""))
        .fd_limit(1024, 1024)
        .start();
    let idle: Vec<TcpStream> = (0..1100).map(|_| connect(gw.listen())).collect();

    // A buyer on a fresh connection is answered at once, not left to time
    // out: served if a place is free, else the clear refusal (which it is
    // depends on how far the gateway got through the idle ones).
    let ended = fresh_get(gw.listen());
    if ended.status() != Some(200) {
        assert_refused(&ended);
    }
    // The gateway never ran out of descriptors: accept never failed, and
    // it holds fewer than its limit.
    let log = gw.log();
    assert!(
        !log.contains("Too many open files") && !log.contains("Accept() failed"),
        "{log}"
    );
    // ... and the reserve for backend connections, Redis and logs is free.
    let open = gw.open_fds();
    assert!(open + 256 <= 1024, "{open} descriptors open");
    // The admin listener, with its own cap, still answers.
    assert_eq!(
        get_closing(&mut connect(gw.admin()), "/healthz").status(),
        Some(200)
    );

    // Once the idle connections go, buyers are served again.
    drop(idle);
    let ended = wait_served(gw.listen());
    assert_eq!(ended.status(), Some(200), "{}", ended.text());
    assert_eq!(
        ended.header("x-sluice-outcome").as_deref(),
        Some("passthrough")
    );
}

#[test]
fn connections_over_max_connections_get_a_clear_refusal() {
    let up = Upstream::start();
    let gw = Gateway::builder()
        .config(&config(
            &up,
            "max_connections: 40, header_timeout: 5m, keepalive_timeout: 5m",
            "",
        ))
        .start();
    // Fill the cap with 40 kept-alive connections, each proven served by an
    // answer. (A connection the start-up probe just closed may hold a place
    // for a moment: a refusal then is retried, never counted.)
    let mut held = Vec::new();
    let mut tries = 0;
    while held.len() < 40 {
        tries += 1;
        assert!(tries <= 60, "only {} of 40 connections served", held.len());
        let mut s = connect(gw.listen());
        s.write_all(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
            .expect("write a request");
        let answer = read_one_response(&mut s);
        if answer.starts_with("HTTP/1.1 200") {
            held.push(s);
        } else {
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        }
    }

    // The cap is full: a buyer on a fresh connection is told at once.
    assert_refused(&fresh_get(gw.listen()));
    // So are idle connections over the cap, whatever they send later
    // (they linger reading it, so the answer is not lost to a reset).
    let mut idle: Vec<TcpStream> = (0..10).map(|_| connect(gw.listen())).collect();
    for s in &mut idle {
        assert_refused(&get_closing(s, "/"));
    }
    // The served connections are untouched: keep-alive goes on.
    for s in &mut held {
        s.write_all(b"GET /again HTTP/1.1\r\nHost: shop\r\n\r\n")
            .expect("write a second request");
        let answer = read_one_response(s);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    // Places come back when connections close.
    drop(held);
    let ended = wait_served(gw.listen());
    assert_eq!(ended.status(), Some(200), "{}", ended.text());
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_after_header_timeout() {
    let up = Upstream::start();
    let gw = Gateway::builder()
        .config(&config(
            &up,
            "header_timeout: 1s, keepalive_timeout: 1s",
            "",
        ))
        .start();

    // Half a head, then nothing: 408 and the server closes.
    let mut s = connect(gw.listen());
    s.write_all(b"POST /api/seckill/p1/order HTTP/1.1\r\nHost: shop\r\nX-User-")
        .expect("write half a head");
    let ended = read_to_end(&mut s);
    assert!(ended.closed_by_server, "still open: {}", ended.text());
    assert_eq!(ended.status(), Some(408), "{}", ended.text());
    assert_eq!(ended.header("x-sluice-outcome").as_deref(), Some("invalid"));
    assert_eq!(ended.json()["outcome"], "invalid");

    // A slow drip, one byte at a time: the deadline is for the whole head,
    // not per read, so it is cut too.
    let mut s = connect(gw.listen());
    let head = b"GET / HTTP/1.1\r\nHost: shop\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let started = Instant::now();
    let mut cut = false;
    for byte in head.iter().cycle() {
        if s.write_all(&[*byte]).is_err() {
            cut = true;
            break;
        }
        if started.elapsed() > PATIENCE {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cut, "a dripping client was never cut");

    // A connection that sends nothing is closed quietly.
    let mut s = connect(gw.listen());
    let ended = read_to_end(&mut s);
    assert!(
        ended.closed_by_server && ended.bytes.is_empty(),
        "{ended:?}"
    );

    // Keep-alive: after one answered request, the connection idles out
    // quietly; a next head that starts but does not end gets 408.
    for (next, want) in [(&b""[..], None), (&b"GET / HTTP/1.1\r\nHo"[..], Some(408))] {
        let mut s = connect(gw.listen());
        s.write_all(b"GET / HTTP/1.1\r\nHost: shop\r\n\r\n")
            .expect("write a request");
        let first = read_one_response(&mut s);
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(
            first
                .to_ascii_lowercase()
                .contains("connection: keep-alive"),
            "{first}"
        );
        s.write_all(next).expect("write the next head's start");
        let ended = read_to_end(&mut s);
        assert!(ended.closed_by_server, "{ended:?}");
        assert_eq!(ended.status(), want, "{}", ended.text());
    }

    // Whoever finishes in time is served.
    let ended = fresh_get(gw.listen());
    assert_eq!(ended.status(), Some(200), "{}", ended.text());
}

#[test]
fn a_head_that_outgrows_its_limit_gets_431_and_is_closed() {
    let up = Upstream::start();
    let gw = Gateway::builder()
        .config(&config(
            &up,
            "max_header_bytes: 4KiB, header_timeout: 5m",
            "",
        ))
        .start();
    // 4 KiB of headers plus 66 KiB of room for the request line, and one
    // byte more, with no end: answered without waiting for the deadline.
    // (Exactly one byte more, so everything sent is read and the close is
    // a clean one.)
    let ceiling = 4096 + 66 * 1024;
    let mut head = b"GET / HTTP/1.1\r\nHost: shop\r\n".to_vec();
    while head.len() < ceiling + 1 {
        head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    head.truncate(ceiling + 1);
    let mut s = connect(gw.listen());
    s.write_all(&head).expect("write the head");
    let ended = read_to_end(&mut s);
    assert!(ended.closed_by_server, "{ended:?}");
    assert_eq!(ended.status(), Some(431), "{}", ended.text());
    assert_eq!(ended.header("x-sluice-outcome").as_deref(), Some("invalid"));
    assert_eq!(ended.json()["outcome"], "invalid");
    // A complete head under the ceiling still reaches the gateway's own
    // size check (431 for headers over max_header_bytes).
    let mut s = connect(gw.listen());
    let big = format!(
        "GET / HTTP/1.1\r\nHost: shop\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(8000)
    );
    s.write_all(big.as_bytes()).expect("write");
    let ended = read_to_end(&mut s);
    assert_eq!(ended.status(), Some(431), "{}", ended.text());
}

#[test]
fn h2c_and_short_http1_requests_pass_the_gate() {
    let up = Upstream::start();
    let gw = Gateway::builder()
        .config(&config(&up, "header_timeout: 5m", "h2c: true\n"))
        .start();
    // HTTP/2 with prior knowledge: the preface and an empty SETTINGS
    // frame; the server's first frame is its own SETTINGS (type 4).
    let mut s = connect(gw.listen());
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .expect("write the preface");
    let mut frame = [0u8; 9];
    s.read_exact(&mut frame)
        .expect("read the server's first frame");
    assert_eq!(frame[3], 4, "not a SETTINGS frame: {frame:?}");

    // An HTTP/1.0 request shorter than the 24-byte h2 preface is answered
    // (pingora alone would wait for 24 bytes before deciding).
    let mut s = connect(gw.listen());
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
    let ended = read_to_end(&mut s);
    assert!(ended.closed_by_server, "{ended:?}");
    assert!(ended.text().starts_with("HTTP/1."), "{}", ended.text());
}
