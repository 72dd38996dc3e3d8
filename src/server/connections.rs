//! Client connections of a listener: the process's file-descriptor limit
//! (raised at start), how many client connections may be open at once
//! (`limits.max_connections`) and how one over that cap is refused, and how
//! long a client may take to send a request's headers
//! (`limits.header_timeout`) or sit idle between two requests
//! (`limits.keepalive_timeout`). Called by `server`, which puts a
//! [`ConnectionGate`] in front of the proxy and of the admin app.
//!
//! ```text
//! accept ─► ConnectionGate::process_new ── over the cap ──► 503 unavailable, Connection: close,
//!              │ a slot, held until the connection closes       read and drop what the client sends, close
//!              ▼
//!           read the request head (no parsing: find its end) ── late ──► 408, close
//!              │ complete                                          idle, closed ──► close
//!              ▼
//!           the fast lane (main listener): a rule request whose whole body is here,
//!              │                            or a plain pass-through GET
//!              │ ── the gateway's own answer ──► written here; the next head may already follow
//!              │ ── a winner, a slot free; a pass-through GET ──► relayed: sent to the backend, answered here
//!              │ ── a winner that waits ──► its verdict goes along to pingora's session (task-local)
//!              │ the bytes are put back into the stream
//!              ▼
//!           the app's HTTP/1 session: pingora parses the head from those bytes, no socket read
//!              │ reusable
//!              └──► wait up to keepalive_timeout for the next head, which then has header_timeout
//! ```
//!
//! Why not pingora's own knobs: pingora 0.9 gives a client 60 s *per read*
//! while it reads a head (the keep-alive timeout it sets doubles as the
//! read timeout), so a client sending a byte every 59 s is never cut; and
//! its `connection_filter` sees a peer address but never a connection's
//! end, so it cannot count open connections. The gate runs pingora's own
//! HTTP/1 keep-alive loop (`ServerApp for HttpServerApp`) with a deadline
//! on each head, and hands HTTP/2 (h2c preface) and TLS streams to pingora
//! unchanged.

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode};
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::time::{timeout, Instant};

use crate::config::{defaults, Limits};
use crate::deadline::within;
use crate::outcome::{render, Answer, Rendered};
use crate::proxy::lane::{self, FastLane, Step};
use crate::proxy::respond::to_wire;
use crate::server::stream::GateStream;

/// Concurrent connections of the admin listener: scrapes, probes and an
/// operator's calls are few; the fd reserve (`defaults::FD_RESERVE`) counts them.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// The longest head pingora parses (1 MiB - 1); a longer one it refuses
/// with a bare 400.
const PINGORA_HEAD_MAX: u64 = (1 << 20) - 1;

/// Room for the request line on top of `limits.max_header_bytes` (which
/// counts header lines only): the longest URI the `http` crate accepts
/// (65,534 bytes) plus method, version and line ends, rounded up.
const REQUEST_LINE_ROOM: u64 = 66 << 10;

/// First allocation for a head; most request heads are well under this.
const HEAD_BUF: usize = 4096;

/// At most this much of a refused client's request is read and dropped
/// while its connection lingers.
const DISCARD_CEILING: usize = 1 << 20;

/// Refusals are logged at most this often (with the count so far).
const WARN_EVERY_SECS: u64 = 10;

/// The first bytes of the HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0\r\n";

/// The process's file-descriptor limits, as found and as raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found at start.
    pub soft_before: u64,
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit, the ceiling of the soft one.
    pub hard: u64,
}

impl FdLimit {
    /// Raises the soft `RLIMIT_NOFILE` to the hard limit and logs both:
    /// a shell's default soft limit (often 1024) is what ran out first
    /// under many idle connections. A failure is logged and the limit in
    /// force kept; an unreadable limit is taken as 1024, the usual default.
    pub fn raise() -> FdLimit {
        let (soft_before, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
            Ok(limits) => limits,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the file descriptor limit; assuming 1024");
                return FdLimit {
                    soft_before: 1024,
                    soft: 1024,
                    hard: 1024,
                };
            }
        };
        let soft = match rlimit::increase_nofile_limit(hard) {
            Ok(soft) => soft,
            Err(e) => {
                tracing::warn!(error = %e, soft = soft_before, hard, "cannot raise the file descriptor limit");
                soft_before
            }
        };
        tracing::info!(
            soft_before,
            soft,
            hard,
            "file descriptor limit (soft raised to hard)"
        );
        FdLimit {
            soft_before,
            soft,
            hard,
        }
    }
}

/// The connection limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Client connections open at once; more are refused.
    pub max_connections: usize,
    /// Time to send a request's headers.
    pub header_timeout: Duration,
    /// Idle time allowed between two requests.
    pub keepalive_timeout: Duration,
    /// A head this long without its end gets 431 and the connection is
    /// closed: `limits.max_header_bytes` plus [`REQUEST_LINE_ROOM`], at
    /// most pingora's own ceiling. Also what one connection's head can
    /// cost in memory.
    pub max_head_bytes: usize,
}

impl ConnectionLimits {
    /// The main listener's: `limits.max_connections`, or what the fd limit
    /// holds ([`defaults::max_connections`]). A configured cap above that
    /// is kept, with a warning: the operator may know better (other limits,
    /// a raised hard limit later), but should hear it.
    pub fn main(limits: &Limits, fds: FdLimit) -> Self {
        let fits = defaults::max_connections(fds.soft);
        let max = match limits.max_connections {
            Some(m) => {
                if m > fits {
                    tracing::warn!(
                        max_connections = m,
                        fits,
                        fd_soft_limit = fds.soft,
                        "limits.max_connections is above what the file descriptor limit holds; the gateway may run out of descriptors"
                    );
                }
                m
            }
            None => fits,
        };
        let limits = Self {
            max_connections: usize::try_from(max).unwrap_or(usize::MAX),
            ..Self::admin(limits)
        };
        tracing::info!(
            max_connections = limits.max_connections,
            derived = limits.max_connections == fits as usize,
            header_timeout = ?limits.header_timeout,
            keepalive_timeout = ?limits.keepalive_timeout,
            "client connection limits"
        );
        limits
    }

    /// The admin listener's: [`ADMIN_MAX_CONNECTIONS`], the same times
    /// and head size.
    pub fn admin(limits: &Limits) -> Self {
        let head = limits
            .max_header_bytes
            .saturating_add(REQUEST_LINE_ROOM)
            .min(PINGORA_HEAD_MAX);
        Self {
            max_connections: ADMIN_MAX_CONNECTIONS,
            header_timeout: limits.header_timeout,
            keepalive_timeout: limits.keepalive_timeout,
            max_head_bytes: usize::try_from(head).unwrap_or(usize::MAX),
        }
    }

    /// Refused connections that may linger at once (reading the client's
    /// request so that closing does not reset the connection): one eighth
    /// of the cap, as the fd budget counts it, from 16 to 1024.
    fn lingering(&self) -> usize {
        (self.max_connections / 8).clamp(16, 1024)
    }
}

/// A counted place under a cap; given back on drop.
/// How many connections a gate is serving now.
#[derive(Clone, Debug)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    /// The count now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    /// A place if fewer than `cap` are taken (never above it, even briefly).
    fn take(count: &'a AtomicUsize, cap: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(count))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Finds the end of an HTTP/1 request head as its bytes arrive, looking at
/// each byte once: the first empty line after the request line (CRLF or a
/// bare LF, both of which httparse accepts); empty lines before the request
/// line are skipped, as httparse skips them.
#[derive(Debug, Default)]
struct HeadScan {
    /// Where to look next.
    pos: usize,
    /// Whether the request line has begun.
    started: bool,
}

impl HeadScan {
    /// Whether `buf` (the same buffer, grown since the last call) holds a
    /// whole head.
    fn complete(&mut self, buf: &[u8]) -> bool {
        if !self.started {
            while buf
                .get(self.pos)
                .is_some_and(|b| matches!(b, b'\r' | b'\n'))
            {
                self.pos += 1;
            }
            if self.pos >= buf.len() {
                return false;
            }
            self.started = true;
        }
        while let Some(off) = buf
            .get(self.pos..)
            .and_then(|rest| rest.iter().position(|b| *b == b'\n'))
        {
            let lf = self.pos + off;
            match (buf.get(lf + 1), buf.get(lf + 2)) {
                (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => return true,
                // The line after this LF has not arrived yet: look again
                // from this LF next time.
                (None, _) | (Some(b'\r'), None) => {
                    self.pos = lf;
                    return false;
                }
                _ => self.pos = lf + 1,
            }
        }
        self.pos = buf.len();
        false
    }
}

/// pingora's own limits on a request head (httparse's header array and the
/// `http` crate's longest URI): past them it answers a bare 400 of its own.
const PINGORA_MAX_HEADERS: usize = 256;
const PINGORA_MAX_URI: usize = 65_534;

/// Heads pingora would refuse with a bare 400 that the gate answers
/// instead, with the JSON body and `X-Sluice-Outcome` every refusal has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unfit {
    /// A request target longer than pingora takes: 414.
    UriTooLong,
    /// More header fields than pingora takes: 431.
    TooManyHeaders,
    /// `Host` more than once (RFC 9112 section 3.2): 400.
    TwoHosts,
}

/// Checks a complete head (from a [`HeadScan`]) for what pingora refuses
/// without a hook: one pass over its lines, no parsing beyond that.
fn unfit(head: &[u8]) -> Option<Unfit> {
    let mut lines = head
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .skip_while(|l| l.is_empty());
    let request_line = lines.next()?;
    let target = request_line
        .iter()
        .position(|b| *b == b' ')
        .zip(request_line.iter().rposition(|b| *b == b' '))
        .map_or(0, |(first, last)| last.saturating_sub(first + 1));
    if target > PINGORA_MAX_URI {
        return Some(Unfit::UriTooLong);
    }
    let (mut fields, mut hosts) = (0, 0);
    for line in lines.take_while(|l| !l.is_empty()) {
        // A continuation line (obs-fold) is not a field of its own.
        if matches!(line.first(), Some(b' ' | b'\t')) {
            continue;
        }
        fields += 1;
        if line.len() > 5 && line[..5].eq_ignore_ascii_case(b"host:") {
            hosts += 1;
        }
    }
    if fields > PINGORA_MAX_HEADERS {
        Some(Unfit::TooManyHeaders)
    } else if hosts > 1 {
        Some(Unfit::TwoHosts)
    } else {
        None
    }
}

/// When a request head must arrive.
#[derive(Clone, Copy, Debug)]
enum Deadline {
    /// The first request of a connection: the whole head by this instant
    /// (counted from accept).
    Fresh(Instant),
    /// A later request: its first byte within `keepalive` of the wait's
    /// start, the rest within `header_timeout` of that byte. Read off the
    /// clock only when a read has to wait (`deadline::within`).
    Next {
        keepalive: Duration,
        header_timeout: Duration,
    },
}

impl Deadline {
    /// The `Next` deadline of a connection's later requests.
    fn next(limits: &ConnectionLimits) -> Self {
        Deadline::Next {
            keepalive: limits.keepalive_timeout,
            header_timeout: limits.header_timeout,
        }
    }

    /// The instant a read that starts waiting now must end by, before the
    /// head has `begun` or after.
    fn by(self, begun: bool) -> Instant {
        match self {
            Deadline::Fresh(by) => by,
            Deadline::Next {
                keepalive,
                header_timeout,
            } => Instant::now() + if begun { header_timeout } else { keepalive },
        }
    }
}

/// How reading a request head ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    /// An empty line ended it (a body or more may follow in the buffer).
    Complete,
    /// Over `max_head_bytes` without its end.
    TooLarge,
    /// Nothing arrived in time, or the server is shutting down.
    Idle,
    /// The head began but did not end in time.
    Late,
    /// The client closed the connection, or it failed.
    Closed,
}

/// Reads from `stream` into `buf` until a whole head is there or a bound
/// is hit.
async fn read_head(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: Deadline,
    max_head_bytes: usize,
) -> Head {
    let mut scan = HeadScan::default();
    // Bytes left after the last request (the fast lane answered it) are
    // this head's first.
    let mut begun = !buf.is_empty();
    // A deadline once read off the clock; a `Next` one is read again when
    // the head begins (its header_timeout runs from there).
    let mut until = None;
    // A client that pipelines may have sent all of this head already.
    if begun {
        if scan.complete(buf) {
            return Head::Complete;
        }
        if buf.len() > max_head_bytes {
            return Head::TooLarge;
        }
    }
    if !begun {
        // Between requests the connection holds no buffer (see first_read).
        *buf = BytesMut::new();
    }
    loop {
        let by = || *until.get_or_insert_with(|| deadline.by(begun));
        let read = if buf.is_empty() {
            within(first_read(stream, buf), by).await
        } else {
            if buf.capacity() - buf.len() < HEAD_BUF / 4 {
                buf.reserve(HEAD_BUF);
            }
            within(stream.read_buf(buf), by).await
        };
        match read {
            Err(_) if buf.is_empty() => return Head::Idle,
            Err(_) => return Head::Late,
            Ok(Ok(0)) | Ok(Err(_)) => return Head::Closed,
            Ok(Ok(_)) => {}
        }
        if !begun {
            begun = true;
            if matches!(deadline, Deadline::Next { .. }) {
                until = None;
            }
        }
        if scan.complete(buf) {
            return Head::Complete;
        }
        if buf.len() > max_head_bytes {
            return Head::TooLarge;
        }
    }
}

/// Reads a head's first bytes through the stack into `buf`, which gets
/// its memory only once they are there: an idle keep-alive connection
/// holds no buffer while it waits (10,000 of them held 40 MiB of empty
/// buffers). The copy is of one read, a few hundred bytes for an order.
fn first_read<'a>(
    stream: &'a mut Stream,
    buf: &'a mut BytesMut,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        // On the stack of this poll only, never in the connection's future.
        let mut first = [MaybeUninit::<u8>::uninit(); HEAD_BUF];
        let mut read = ReadBuf::uninit(&mut first);
        ready!(Pin::new(&mut *stream).poll_read(cx, &mut read))?;
        buf.reserve(HEAD_BUF);
        buf.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
}

/// Resolves once the server starts shutting down; never if it cannot tell.
async fn shutting_down(mut shutdown: ShutdownWatch) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Puts bytes read from a plain stream back in front of it, for pingora to
/// read again. `None` if the stream is not a plain one (callers check).
fn rewind(stream: Stream, bytes: &[u8]) -> Option<Stream> {
    match stream.into_any().downcast::<GateStream>() {
        Ok(mut plain) => {
            plain.inner_mut().rewind(bytes);
            Some(plain as Stream)
        }
        Err(_) => None,
    }
}

/// A rendered answer as the raw HTTP/1.1 bytes of a closing response.
fn closing_response(r: &Rendered) -> Bytes {
    Bytes::from(to_wire(r, &[("Connection", b"close")]))
}

/// Whether pingora left the start of a pipelined next request in
/// `settings`. pingora 0.9 keeps that field private with no accessor, so
/// its derived `Debug` is read: `DebugStruct` writes each field name as
/// one piece, so the probe waits for the piece `pipelined_prefix` and
/// stops formatting at the first piece of its value (`Some` or `None`),
/// allocating nothing and never formatting the bytes. `tests/intake.rs`
/// pipelines orders, so a change upstream shows there.
fn has_pipelined_prefix(settings: &HttpPersistentSettings) -> bool {
    use std::fmt::Write as _;
    #[derive(Default)]
    struct Probe {
        in_field: bool,
        found: Option<bool>,
    }
    impl std::fmt::Write for Probe {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            if self.in_field {
                if s == ": " {
                    return Ok(());
                }
                self.found = Some(s.starts_with("Some"));
                // Enough read: stop formatting here.
                return Err(std::fmt::Error);
            }
            self.in_field = s == "pipelined_prefix";
            Ok(())
        }
    }
    let mut probe = Probe::default();
    let _ = write!(probe, "{settings:?}");
    probe.found.unwrap_or(false)
}

/// Whole seconds, rounded up, at least 1: pingora's keep-alive is in seconds.
fn whole_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Caps, times and refuses the client connections of one listener, in
/// front of a pingora HTTP app.
pub struct ConnectionGate<A> {
    app: Arc<A>,
    /// Judges rule requests from the head's bytes before pingora does.
    lane: Option<FastLane>,
    limits: ConnectionLimits,
    /// Which listener, for logs.
    listener: &'static str,
    /// Connections being served (shared with the shutdown watcher).
    open: Arc<AtomicUsize>,
    /// Refused connections still lingering.
    lingering: AtomicUsize,
    /// Refusals so far.
    refused: AtomicU64,
    /// When refusals were last logged: seconds since `born`, plus one (0: never).
    warned_at: AtomicU64,
    born: std::time::Instant,
    /// The 503 written to a connection over the cap.
    refusal: Bytes,
    /// The 408 written to a client that did not finish its head in time.
    late: Bytes,
    /// The 431 written to a client whose head outgrew `max_head_bytes`.
    too_large: Bytes,
    /// The 414 written for a request target longer than pingora takes.
    uri_too_long: Bytes,
    /// The 431 written for more header fields than pingora takes.
    too_many_headers: Bytes,
    /// The 400 written for a request naming `Host` twice.
    two_hosts: Bytes,
}

impl<A> ConnectionGate<A> {
    /// A gate in front of `app`.
    pub fn new(app: A, limits: ConnectionLimits, listener: &'static str) -> Self {
        let mut refusal = render(
            &Answer::Unavailable {
                message: "too many connections, please try again shortly".into(),
            },
            None,
        );
        refusal
            .headers
            .push((http::header::RETRY_AFTER, HeaderValue::from_static("1")));
        let mut late = render(
            &Answer::Invalid {
                message: format!(
                    "request headers not received within {:?}",
                    limits.header_timeout
                ),
            },
            None,
        );
        late.status = StatusCode::REQUEST_TIMEOUT;
        let mut too_large = render(
            &Answer::Invalid {
                message: format!(
                    "request line and headers over {} bytes",
                    limits.max_head_bytes
                ),
            },
            None,
        );
        too_large.status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        let refusal_of = |status: StatusCode, message: &str| {
            let mut r = render(
                &Answer::Invalid {
                    message: message.into(),
                },
                None,
            );
            r.status = status;
            closing_response(&r)
        };
        Self {
            uri_too_long: refusal_of(
                StatusCode::URI_TOO_LONG,
                &format!("request target over {PINGORA_MAX_URI} bytes"),
            ),
            too_many_headers: refusal_of(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &format!("more than {PINGORA_MAX_HEADERS} header fields"),
            ),
            two_hosts: refusal_of(StatusCode::BAD_REQUEST, "Host: sent more than once"),
            app: Arc::new(app),
            lane: None,
            limits,
            listener,
            open: Arc::new(AtomicUsize::new(0)),
            lingering: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            warned_at: AtomicU64::new(0),
            born: std::time::Instant::now(),
            refusal: closing_response(&refusal),
            late: closing_response(&late),
            too_large: closing_response(&too_large),
        }
    }

    /// Puts `lane` in front of the app: the gateway's own answers to rule
    /// requests go out without a pingora session.
    pub fn with_lane(mut self, lane: FastLane) -> Self {
        self.lane = Some(lane);
        self
    }

    /// Client connections being served now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// A live count of the connections being served, for whoever waits
    /// for them to end (a draining shutdown).
    pub fn open_count(&self) -> OpenConnections {
        OpenConnections(self.open.clone())
    }

    /// Counts a refusal; logs one line per [`WARN_EVERY_SECS`] at most.
    fn note_refusal(&self) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.born.elapsed().as_secs() + 1;
        let last = self.warned_at.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + WARN_EVERY_SECS;
        if due
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                listener = self.listener,
                max_connections = self.limits.max_connections,
                refused_total = refused,
                "client connections at the cap: new ones get 503 and are closed"
            );
        }
    }

    /// Answers a connection over the cap with a 503 and closes it. The
    /// answer goes out at once, before the request is read: the client is
    /// told now, whatever it sends. The connection then lingers (if a
    /// lingering place is free) reading and dropping what the client sends
    /// until it closes, for at most `header_timeout`: closing with a
    /// request unread would reset the connection, and a reset can wipe the
    /// answer out of the client's receive buffer before it reads it.
    async fn refuse(&self, mut stream: Stream) {
        self.note_refusal();
        let written = timeout(self.limits.header_timeout, async {
            stream.write_all(&self.refusal).await?;
            stream.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        let Some(_lingering) = Slot::take(&self.lingering, self.limits.lingering()) else {
            return;
        };
        let _ = timeout(self.limits.header_timeout, async {
            if AsyncWriteExt::shutdown(&mut stream).await.is_err() {
                return;
            }
            let mut sink = [0u8; 4096];
            let mut dropped = 0;
            while dropped < DISCARD_CEILING {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => dropped += n,
                }
            }
        })
        .await;
    }

    /// Writes `bytes` within `header_timeout`, so a client that does not
    /// read cannot hold the connection; whether they all went out.
    async fn write_within(&self, stream: &mut Stream, bytes: &[u8]) -> bool {
        let header_timeout = self.limits.header_timeout;
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        matches!(
            within(write, || Instant::now() + header_timeout).await,
            Ok(Ok(()))
        )
    }

    /// Writes a closing answer (the caller then drops the connection).
    async fn answer_and_close(&self, stream: &mut Stream, answer: &Bytes) {
        self.write_within(stream, answer).await;
    }

    /// Writes the lane's answer to the request at the front of `buf` and
    /// drops that request's `used` bytes; `false` when the connection ends
    /// here (it failed, or the client asked for `Connection: close`).
    async fn lane_answered(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
        response: &[u8],
        used: usize,
        close: bool,
    ) -> bool {
        if !self.write_within(stream, response).await {
            return false;
        }
        self.answered_then(stream, buf, used, close).await
    }

    /// After an answer to the request at the front of `buf` went out:
    /// closes the connection if the client asked (`false`), else drops the
    /// request's `used` bytes, so the buffer starts with what follows.
    async fn answered_then(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
        used: usize,
        close: bool,
    ) -> bool {
        if close {
            // As pingora ends a closing answer: FIN, then drop.
            let header_timeout = self.limits.header_timeout;
            let done = AsyncWriteExt::shutdown(stream);
            let _ = within(done, || Instant::now() + header_timeout).await;
            return false;
        }
        let _ = buf.split_to(used);
        // Empty lines after a body (some clients send a CRLF there) are not
        // the start of the next head: skipped as pingora and httparse skip
        // them.
        let blank = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        let _ = buf.split_to(blank);
        true
    }
}

impl<A> ConnectionGate<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// pingora's session of the request at the front of `stream`, with
    /// the connection's `kept` settings from its last request, or a new
    /// connection's. Built outside `serve`, whose future would otherwise
    /// keep room for the session (680 bytes) in every idle connection.
    fn session<'a>(
        &'a self,
        stream: Stream,
        kept: Option<HttpPersistentSettings>,
        reuse_limit: Option<u32>,
        shutdown: &'a ShutdownWatch,
    ) -> impl Future<Output = Option<ReusedHttpStream>> + Send + 'a {
        let mut session = ServerSession::new_http1(stream);
        match kept {
            Some(kept) => kept.apply_to_session(&mut session),
            None => {
                // As pingora's own loop does for a new connection.
                let keepalive =
                    (!*shutdown.borrow()).then_some(whole_secs(self.limits.keepalive_timeout));
                session.set_keepalive(keepalive);
                session.set_keepalive_reuses_remaining(reuse_limit);
            }
        }
        self.app.process_new_http(session, shutdown)
    }

    /// Serves the connection if it is under `max_connections`, else
    /// refuses it.
    async fn admit(&self, stream: Stream, shutdown: &ShutdownWatch) {
        match Slot::take(&self.open, self.limits.max_connections) {
            Some(_served) => self.serve(stream, shutdown).await,
            // Boxed: its 4 KiB sink would otherwise make every
            // connection's future (allocated at accept) that much larger.
            None => Box::pin(self.refuse(stream)).await,
        }
    }

    /// Serves one admitted connection until it closes: pingora's HTTP/1
    /// keep-alive loop, with each request head read under its deadline.
    async fn serve(&self, stream: Stream, shutdown: &ShutdownWatch) {
        // Only a plain TCP stream can take bytes back; a TLS one (the
        // `tls.listen` listener) goes to pingora as it is, with pingora's
        // per-read timeouts (README, Operating Sluice, TLS).
        if !stream.as_any().is::<L4Stream>() {
            self.app.process_new(stream, shutdown).await;
            return;
        }
        let Ok(plain) = stream.into_any().downcast::<L4Stream>() else {
            return;
        };
        let mut stream: Stream = Box::new(GateStream::new(plain));
        let options = self.app.server_options();
        let h2c = options.is_some_and(|o| o.h2c);
        let reuse_limit = options.and_then(|o| o.keepalive_request_limit);
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut deadline = Deadline::Fresh(Instant::now() + self.limits.header_timeout);
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        // pingora counts a connection's reuses only in its own sessions.
        let lane = self.lane.as_ref().filter(|_| reuse_limit.is_none());
        // The head's buffer: its bytes are copied back into the stream,
        // so it is free again for the next head; what follows a request
        // the lane answered stays in it as the next head's start. It holds
        // memory only while a head is read (read_head).
        let mut buf = BytesMut::new();
        loop {
            // A client that pipelined its next request: pingora read its
            // start along with the last body and keeps it for the next
            // session, which parses it first; the socket may never have
            // more. That head is pingora's to read (with its own per-read
            // timeouts), not the gate's.
            if settings.as_ref().is_some_and(has_pipelined_prefix) {
                let served = self.session(stream, settings.take(), reuse_limit, shutdown);
                let Some(reused) = served.await else {
                    return;
                };
                let (next, kept) = reused.consume();
                stream = next;
                settings = kept;
                deadline = Deadline::next(&self.limits);
                continue;
            }
            // At shutdown an idle keep-alive connection is closed, but a
            // new one (accepted just before the listener closed, its
            // client already sending) is served its first request.
            let idle = matches!(deadline, Deadline::Next { .. }) && buf.is_empty();
            let head = tokio::select! {
                biased;
                head = read_head(&mut stream, &mut buf, deadline, self.limits.max_head_bytes) => head,
                () = shutting_down(shutdown.clone()), if idle => Head::Idle,
            };
            match head {
                Head::Complete => {}
                Head::Late => {
                    tracing::debug!(
                        listener = self.listener,
                        "request head not finished in time"
                    );
                    self.answer_and_close(&mut stream, &self.late).await;
                    return;
                }
                Head::TooLarge => {
                    tracing::debug!(listener = self.listener, "request head too large");
                    self.answer_and_close(&mut stream, &self.too_large).await;
                    return;
                }
                Head::Idle | Head::Closed => return,
            }
            let h2_preface = buf.starts_with(H2_PREFACE_START);
            let mut preset = None;
            if let Some(lane) = lane.filter(|_| !h2_preface && !*shutdown.borrow()) {
                // A plain pass-through GET is relayed without a judgement.
                // A judgement is boxed, as the session below: its state is
                // not kept in every idle connection's future.
                let step = match lane.through(&buf, peer) {
                    Some(relay) => Step::Relay(relay),
                    None => Box::pin(lane.step(&buf, peer)).await,
                };
                match step {
                    Step::Pass => {}
                    Step::Forward(p) => preset = Some(p),
                    Step::Relay(relay) => {
                        let (used, close) = (relay.used(), relay.close());
                        let header_timeout = self.limits.header_timeout;
                        if !Box::pin(lane.relay(relay, &mut stream, header_timeout)).await {
                            return;
                        }
                        if !self.answered_then(&mut stream, &mut buf, used, close).await {
                            return;
                        }
                        deadline = Deadline::next(&self.limits);
                        continue;
                    }
                    Step::Answered {
                        response,
                        used,
                        close,
                    } => {
                        let open = self
                            .lane_answered(&mut stream, &mut buf, &response, used, close)
                            .await;
                        if !open {
                            return;
                        }
                        deadline = Deadline::next(&self.limits);
                        continue;
                    }
                }
            }
            // What the lane answered was fit: one Host, at most 64 fields
            // and a URI the `http` crate takes. The rest is checked here.
            if let Some(why) = unfit(&buf).filter(|_| !h2_preface) {
                tracing::debug!(listener = self.listener, ?why, "request head refused");
                let answer = match why {
                    Unfit::UriTooLong => &self.uri_too_long,
                    Unfit::TooManyHeaders => &self.too_many_headers,
                    Unfit::TwoHosts => &self.two_hosts,
                };
                self.answer_and_close(&mut stream, answer).await;
                return;
            }
            let Some(rewound) = rewind(stream, &buf) else {
                return;
            };
            buf.clear();
            stream = rewound;
            if h2c && matches!(deadline, Deadline::Fresh(_)) && h2_preface {
                // pingora's own h2c path: it peeks the preface again, from
                // the bytes just put back.
                self.app.process_new(stream, shutdown).await;
                return;
            }
            let served = self.session(stream, settings.take(), reuse_limit, shutdown);
            let reused = match preset {
                Some(p) => Box::pin(lane::with_preset(p, served)).await,
                None => served.await,
            };
            let Some(reused) = reused else {
                return;
            };
            let (next, kept) = reused.consume();
            stream = next;
            settings = kept;
            deadline = Deadline::next(&self.limits);
        }
    }
}

#[async_trait]
impl<A> ServerApp for ConnectionGate<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The connection lives on a task of the gate's own, and pingora's
        // accept task ends here: that task holds its TLS handshake
        // machinery (several KiB, even for plain TCP) for as long as it
        // runs, so an idle connection kept in it cost that much more.
        let gate = Arc::clone(self);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { gate.admit(stream, &shutdown).await });
        // The gate runs the keep-alive loop itself: nothing to hand back.
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::{unfit, Unfit};

    #[test]
    fn heads_pingora_would_refuse_bare_are_told_apart() {
        let ok =
            b"GET /a?b=c HTTP/1.1\r\nHost: shop\r\nX-A: 1\r\n folded\r\n\r\nbody: not a header\r\n";
        assert_eq!(unfit(ok), None);
        let long = format!("GET /{} HTTP/1.1\r\nHost: shop\r\n\r\n", "a".repeat(65_534));
        assert_eq!(unfit(long.as_bytes()), Some(Unfit::UriTooLong));
        let just = format!("GET /{} HTTP/1.1\r\nHost: shop\r\n\r\n", "a".repeat(65_533));
        assert_eq!(unfit(just.as_bytes()), None);
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..257 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(unfit(many.as_bytes()), Some(Unfit::TooManyHeaders));
        let hosts = b"\r\nGET / HTTP/1.1\nHost: a\nhOsT: b\n\n";
        assert_eq!(unfit(hosts), Some(Unfit::TwoHosts));
    }

    use super::*;

    /// Feeds `chunks` one after another into one buffer; the index of the
    /// chunk after which the head was complete.
    fn complete_after(chunks: &[&[u8]]) -> Option<usize> {
        let mut scan = HeadScan::default();
        let mut buf = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            buf.extend_from_slice(c);
            if scan.complete(&buf) {
                return Some(i);
            }
        }
        None
    }

    #[test]
    fn a_head_ends_at_the_first_empty_line() {
        assert_eq!(
            complete_after(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]),
            Some(0)
        );
        assert_eq!(complete_after(&[b"GET / HTTP/1.1\n\n"]), Some(0));
        assert_eq!(
            complete_after(&[b"GET / HTTP/1.1\r\nHost: a\n\r\nbody"]),
            Some(0)
        );
        assert_eq!(complete_after(&[b"GET / HTTP/1.1\r\nHost: a\r\n"]), None);
    }

    #[test]
    fn a_head_split_anywhere_is_found_when_its_last_byte_arrives() {
        let head: &[u8] = b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
        let end = head.len() - 2;
        for cut in 1..head.len() {
            let (a, b) = head.split_at(cut);
            let want = if cut >= end { Some(0) } else { Some(1) };
            assert_eq!(complete_after(&[a, b]), want, "cut at {cut}");
        }
        // Byte by byte: complete exactly at the last byte of the empty line.
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(complete_after(&bytes), Some(end - 1));
    }

    #[test]
    fn empty_lines_before_the_request_line_are_skipped() {
        assert_eq!(complete_after(&[b"\r\n\r\n"]), None);
        assert_eq!(complete_after(&[b"\r\n\r\n", b"GET / HTTP/1.1\r\n"]), None);
        assert_eq!(
            complete_after(&[b"\r\n\r\n", b"GET / HTTP/1.1\r\n", b"\r\n"]),
            Some(2)
        );
        assert_eq!(complete_after(&[b"\n\n\nGET / HTTP/1.0\n\n"]), Some(0));
    }

    #[test]
    fn the_refusal_is_a_closing_503_with_the_outcome_and_json() {
        let gate = ConnectionGate::new(
            (),
            ConnectionLimits {
                max_connections: 1,
                header_timeout: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(60),
                max_head_bytes: 1000,
            },
            "test",
        );
        let text = String::from_utf8(gate.refusal.to_vec()).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        for line in [
            "Content-Type: application/json",
            "X-Sluice-Outcome: unavailable",
            "retry-after: 1",
            "Connection: close",
        ] {
            assert!(head.lines().any(|l| l == line), "{line} missing in {head}");
        }
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(json["outcome"], "unavailable");
        let late = String::from_utf8(gate.late.to_vec()).unwrap_or_default();
        assert!(
            late.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{late}"
        );
        assert!(late.contains("X-Sluice-Outcome: invalid\r\n"), "{late}");
        let too_large = String::from_utf8(gate.too_large.to_vec()).unwrap_or_default();
        assert!(
            too_large.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{too_large}"
        );
        assert!(too_large.contains("over 1000 bytes"), "{too_large}");
    }

    #[test]
    fn slots_never_exceed_the_cap_and_come_back_on_drop() {
        let count = AtomicUsize::new(0);
        let a = Slot::take(&count, 2);
        let b = Slot::take(&count, 2);
        assert!(a.is_some() && b.is_some());
        assert!(Slot::take(&count, 2).is_none());
        drop(a);
        assert!(Slot::take(&count, 2).is_some());
        drop(b);
        assert_eq!(count.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_derived_cap_fits_the_fd_limit() {
        assert_eq!(defaults::max_connections(1024), 361);
        assert_eq!(defaults::max_connections(100), 1);
        assert!(defaults::max_connections(u64::MAX) > 0);
        for soft in [300u64, 1024, 4096, 65536, 1 << 20] {
            let m = u64::from(defaults::max_connections(soft));
            let limits = ConnectionLimits {
                max_connections: m as usize,
                header_timeout: Duration::from_secs(1),
                keepalive_timeout: Duration::from_secs(1),
                max_head_bytes: 1000,
            };
            // Served connections and their backend connections, lingering
            // refusals (when the cap is large enough that an eighth of it
            // is the lingering bound) and the reserve all fit.
            let lingering = limits.lingering() as u64;
            if m >= 128 {
                assert!(
                    2 * m + lingering + defaults::FD_RESERVE <= soft,
                    "soft {soft}"
                );
            }
        }
    }
}
