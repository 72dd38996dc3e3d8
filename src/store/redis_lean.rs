//! A lean multiplexed connection to Redis for the two transactions every
//! winner makes (reserve and commit), in the wire format of `resp`.
//!
//! One task per connection owns the socket: it writes the transactions
//! callers hand it, as many as are waiting in one write, and reads the
//! replies back in order, handing each caller its own. A caller that gave
//! up (its timeout) leaves its reply to be read and dropped, so the
//! stream stays in step. Any broken read or write, an unreadable reply,
//! or a reply (or a write) late by `STALE_AFTER_TIMEOUTS` store timeouts
//! (a half-open or frozen peer never answers) fails every waiting caller
//! with a dropped connection and ends the task; the next call dials
//! again, on a task of its own that a caller's timeout does not cut. The caller
//! bounds each call with the store timeout and feeds the breaker
//! (`redis_conn`), as for every other store call.
//!
//! Why not redis-rs's `ConnectionManager` here: see `resp`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Buf, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo, RedisError, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::resp::{self, Arg, Transaction};

/// A connection whose oldest reply is this many store timeouts late is
/// taken as dead: nothing else would notice a half-open connection.
const STALE_AFTER_TIMEOUTS: u32 = 20;

/// Room of the read buffer; replies are small.
const READ_BUF: usize = 16 * 1024;

/// Longest unfinished reply the reader waits for: a transaction's replies
/// are a few hundred bytes, so more is a broken stream.
const MAX_REPLY: usize = 4 * 1024 * 1024;

/// What a caller gets: the replies it asked for, or why not.
type Answer = Result<Vec<Value>, RedisError>;

/// Bytes to write and who waits for their replies.
struct Job {
    bytes: Vec<u8>,
    replies: usize,
    /// A MULTI/EXEC: the answer is EXEC's array, not every reply.
    exec: bool,
    done: oneshot::Sender<Answer>,
}

/// A job written, its replies being read.
struct Pending {
    left: usize,
    exec: bool,
    values: Vec<Value>,
    done: oneshot::Sender<Answer>,
    since: Instant,
}

/// One lean connection, dialled on first use and after any failure.
pub struct LeanConn(Arc<Shared>);

/// What a dial needs; shared with the task that dials.
struct Shared {
    addr: ConnectionAddr,
    /// AUTH and SELECT from the URL, sent first on each new socket.
    hello: Option<(Vec<u8>, usize)>,
    connect_timeout: Duration,
    stale_after: Duration,
    driver: ArcSwapOption<mpsc::UnboundedSender<Job>>,
    /// One dial at a time; the others wait for it.
    dialling: tokio::sync::Mutex<()>,
}

impl LeanConn {
    /// A connection to `info`'s Redis (nothing is dialled yet); `timeout`
    /// is the store's call timeout.
    pub fn new(info: &ConnectionInfo, timeout: Duration, connect_timeout: Duration) -> Self {
        let settings = info.redis_settings();
        let mut hello = Vec::new();
        let mut replies = 0;
        if let Some(password) = settings.password() {
            let mut args: Vec<&dyn Arg> = Vec::with_capacity(2);
            let username = settings.username();
            if let Some(u) = &username {
                args.push(u);
            }
            args.push(&password);
            resp::put_command(&mut hello, "AUTH", &args);
            replies += 1;
        }
        if settings.db() != 0 {
            resp::put_command(&mut hello, "SELECT", &[&settings.db()]);
            replies += 1;
        }
        Self(Arc::new(Shared {
            addr: info.addr().clone(),
            hello: (replies > 0).then_some((hello, replies)),
            connect_timeout,
            stale_after: timeout.saturating_mul(STALE_AFTER_TIMEOUTS),
            driver: ArcSwapOption::empty(),
            dialling: tokio::sync::Mutex::new(()),
        }))
    }

    /// Runs a MULTI/EXEC, or a pipeline; gives one reply per command
    /// (server errors in place).
    pub async fn exec(&self, t: Transaction) -> Answer {
        let exec = t.is_multi();
        let (bytes, replies) = t.finish();
        let (done, answer) = oneshot::channel();
        let job = Job {
            bytes,
            replies,
            exec,
            done,
        };
        let sent = match self.0.driver.load().as_ref() {
            Some(driver) => driver.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(job) = sent {
            // None yet, or its task ended (a broken connection): dial, on
            // a task of its own, so that a caller's timeout (the store's,
            // shorter than a connect may take) never throws a dial away
            // half done, as redis-rs's manager reconnects in the
            // background.
            let shared = Arc::clone(&self.0);
            let driver = tokio::spawn(async move { shared.dial().await })
                .await
                .map_err(|_| dropped("the dial did not finish"))??;
            driver
                .send(job)
                .map_err(|_| dropped("the connection closed"))?;
        }
        answered(answer).await
    }
}

impl Shared {
    /// The live driver, dialling a new connection when there is none.
    async fn dial(&self) -> Result<Arc<mpsc::UnboundedSender<Job>>, RedisError> {
        let _one = self.dialling.lock().await;
        if let Some(driver) = self.driver.load_full() {
            if !driver.is_closed() {
                return Ok(driver);
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let stale_after = self.stale_after;
        let connect = async {
            match &self.addr {
                ConnectionAddr::Tcp(host, port) => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    // Transactions are small and answered at once.
                    s.set_nodelay(true)?;
                    let (r, w) = s.into_split();
                    tokio::spawn(drive(r, w, rx, stale_after));
                }
                ConnectionAddr::Unix(path) => {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    let (r, w) = s.into_split();
                    tokio::spawn(drive(r, w, rx, stale_after));
                }
                _ => {
                    return Err(RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "only redis:// and unix:// addresses are supported",
                    )))
                }
            }
            Ok::<_, RedisError>(())
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })??;
        if let Some((bytes, replies)) = &self.hello {
            let (done, answer) = oneshot::channel();
            let job = Job {
                bytes: bytes.clone(),
                replies: *replies,
                exec: false,
                done,
            };
            tx.send(job).map_err(|_| dropped("the connection closed"))?;
            let values = tokio::time::timeout(self.connect_timeout, answered(answer))
                .await
                .map_err(|_| dropped("no answer to AUTH or SELECT"))??;
            if let Some(e) = values.into_iter().find_map(server_error) {
                // Not "Redis answered": a refused AUTH or SELECT is the
                // store being unusable, and must open the breaker (as
                // redis-rs reports it too).
                return Err(RedisError::from((
                    redis::ErrorKind::AuthenticationFailed,
                    "AUTH or SELECT refused",
                    e.to_string(),
                )));
            }
        }
        let tx = Arc::new(tx);
        self.driver.store(Some(tx.clone()));
        Ok(tx)
    }
}

/// A server error reply as an error.
fn server_error(v: Value) -> Option<RedisError> {
    match v {
        Value::ServerError(e) => Some(e.into()),
        _ => None,
    }
}

async fn answered(answer: oneshot::Receiver<Answer>) -> Answer {
    answer
        .await
        .unwrap_or_else(|_| Err(dropped("the connection closed")))
}

/// A connection lost: the call may or may not have run.
fn dropped(why: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        why,
    ))
}

/// The task that owns one socket (see the module doc).
async fn drive<R, W>(
    mut r: R,
    mut w: W,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    stale_after: Duration,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    let mut wbuf: Vec<u8> = Vec::new();
    // Looked at four times per `stale_after`: one timer for the whole
    // connection, not one per call.
    let mut check = tokio::time::interval((stale_after / 4).max(Duration::from_millis(50)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        tokio::select! {
            read = r.read_buf(&mut rbuf) => match read {
                Ok(0) => break "Redis closed the connection",
                Err(_) => break "a read failed",
                Ok(_) => {
                    if let Err(e) = deliver(&mut rbuf, &mut pending) {
                        break e.0;
                    }
                    if rbuf.len() > MAX_REPLY {
                        break "a reply larger than any a transaction gets";
                    }
                }
            },
            job = jobs.recv() => {
                // Every sender is gone: the connection was replaced.
                let Some(job) = job else { break "the connection was replaced" };
                // Woken by a caller, this task would run right after it
                // (tokio's LIFO slot) and write that one transaction alone.
                // Yielding once lets the tasks already ready run first and
                // queue their own: under load one write carries many, and
                // Redis reads, and answers, them in one go; idle, the
                // yield is one more poll. tokio resumes a yielded task when
                // the worker runs out of ready tasks or at its fairness
                // check (every 61 polls), so the wait is bounded.
                tokio::task::yield_now().await;
                wbuf.clear();
                let now = Instant::now();
                let mut next = Some(job);
                while let Some(job) = next {
                    wbuf.extend_from_slice(&job.bytes);
                    pending.push_back(Pending {
                        left: job.replies,
                        exec: job.exec,
                        values: Vec::with_capacity(if job.exec { 1 } else { job.replies }),
                        done: job.done,
                        since: now,
                    });
                    next = jobs.try_recv().ok();
                }
                // Bounded: a peer that stopped reading (frozen, gone)
                // would hold the write, and with it every check, until
                // TCP gives up, minutes later.
                match tokio::time::timeout(stale_after, w.write_all(&wbuf)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break "a write failed",
                    Err(_) => break "a write stalled: the connection is taken as dead",
                }
            }
            _ = check.tick() => {
                if pending.front().is_some_and(|p| p.since.elapsed() > stale_after) {
                    break "no reply in time: the connection is taken as dead";
                }
            }
        }
    };
    tracing::debug!(
        reason = why,
        waiting = pending.len(),
        "redis connection closed"
    );
    for p in pending {
        let _ = p.done.send(Err(dropped(why)));
    }
}

/// Hands every whole reply in `rbuf` to the caller it belongs to.
fn deliver(
    rbuf: &mut BytesMut,
    pending: &mut VecDeque<Pending>,
) -> Result<(), resp::ProtocolError> {
    loop {
        let Some(p) = pending.front_mut() else {
            if rbuf.is_empty() {
                return Ok(());
            }
            return Err(resp::ProtocolError("a reply nobody asked for"));
        };
        if p.exec && p.left > 1 {
            // MULTI's OK or a QUEUED: stepped over (an error is read below).
            if let Some(used) = resp::simple_len(rbuf)? {
                rbuf.advance(used);
                p.left -= 1;
                continue;
            }
        }
        let Some((value, used)) = resp::parse(rbuf)? else {
            return Ok(());
        };
        rbuf.advance(used);
        p.left -= 1;
        if p.exec {
            // MULTI's OK and the QUEUEDs matter only when one is an error
            // (then EXEC's is EXECABORT): keep the first error and EXEC's.
            if p.left == 0 || (p.values.is_empty() && matches!(value, Value::ServerError(_))) {
                p.values.push(value);
            }
        } else {
            p.values.push(value);
        }
        if p.left == 0 {
            if let Some(p) = pending.pop_front() {
                let _ = p.done.send(result_of(p.exec, p.values));
            }
        }
    }
}

/// A finished job's answer: for a transaction, EXEC's array, or the first
/// error that aborted it.
fn result_of(exec: bool, mut values: Vec<Value>) -> Answer {
    if !exec {
        return Ok(values);
    }
    let last = values.pop();
    if let Some(e) = values.into_iter().find_map(server_error) {
        return Err(e);
    }
    match last {
        Some(Value::Array(items)) => Ok(items),
        Some(Value::ServerError(e)) => Err(e.into()),
        // A WATCHed key changed (no WATCH is ever sent here) or a reply
        // of the wrong shape.
        _ => Err(RedisError::from(std::io::Error::other(
            "EXEC did not answer an array",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(replies: usize, exec: bool) -> (Pending, oneshot::Receiver<Answer>) {
        let (done, rx) = oneshot::channel();
        (
            Pending {
                left: replies,
                exec,
                values: Vec::new(),
                done,
                since: Instant::now(),
            },
            rx,
        )
    }

    #[test]
    fn replies_go_to_their_callers_in_order_even_when_split() {
        let (a, mut ra) = pending(3, true);
        let (b, mut rb) = pending(1, false);
        let mut q = VecDeque::from([a, b]);
        let stream = b"+OK\r\n+QUEUED\r\n*1\r\n:5\r\n$2\r\nhi\r\n";
        let mut buf = BytesMut::new();
        for chunk in stream.chunks(4) {
            buf.extend_from_slice(chunk);
            deliver(&mut buf, &mut q).expect("in step");
        }
        assert!(q.is_empty() && buf.is_empty());
        assert_eq!(ra.try_recv().expect("a").expect("ok"), vec![Value::Int(5)]);
        assert_eq!(
            rb.try_recv().expect("b").expect("ok"),
            vec![Value::BulkString(b"hi".to_vec())]
        );
    }

    #[test]
    fn a_refused_transaction_gives_its_first_error() {
        let (a, mut ra) = pending(3, true);
        let mut q = VecDeque::from([a]);
        let mut buf = BytesMut::from(
            &b"+OK\r\n-ERR wrong number of arguments\r\n-EXECABORT Transaction discarded\r\n"[..],
        );
        deliver(&mut buf, &mut q).expect("in step");
        let e = ra.try_recv().expect("answered").expect_err("refused");
        assert_eq!(e.code(), Some("ERR"), "{e}");
    }

    #[test]
    fn errors_inside_exec_stay_in_place() {
        let out = result_of(
            true,
            vec![Value::Array(vec![
                redis::parse_redis_value(b"-ERR no such key\r\n").expect("error"),
                Value::Int(1),
            ])],
        )
        .expect("answered");
        assert!(matches!(out[0], Value::ServerError(_)));
        assert_eq!(out[1], Value::Int(1));
    }

    /// A driver on one end of an in-memory pipe; gives the other end and
    /// the way in.
    fn driven(stale_after: Duration) -> (tokio::io::DuplexStream, mpsc::UnboundedSender<Job>) {
        let (ours, theirs) = tokio::io::duplex(4096);
        let (r, w) = tokio::io::split(ours);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(r, w, rx, stale_after));
        (theirs, tx)
    }

    fn job() -> (Job, oneshot::Receiver<Answer>) {
        let mut t = Transaction::with_capacity(16);
        t.cmd("INCR", &[&"k"]);
        let (bytes, replies) = t.finish();
        let (done, rx) = oneshot::channel();
        (
            Job {
                bytes,
                replies,
                exec: true,
                done,
            },
            rx,
        )
    }

    /// Waits for an answer as a caller does (a job the driver never took
    /// is a dropped connection too); a bound so the test always ends, not
    /// a timing claim.
    async fn within_10s(rx: oneshot::Receiver<Answer>) -> Answer {
        tokio::time::timeout(Duration::from_secs(10), answered(rx))
            .await
            .expect("answered within 10 s")
    }

    /// Counts the writes that reach the socket.
    struct Counted<W> {
        inner: W,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for Counted<W> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            polled
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Callers on one worker, as the gateway runs them: the transactions
    /// queued while they run go out together, not one write each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn transactions_queued_together_go_out_in_one_write() {
        const CALLERS: usize = 20;
        let (ours, mut redis) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(ours);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = Counted {
            inner: w,
            writes: writes.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(r, w, rx, Duration::from_secs(60)));
        let (jobs, answers): (Vec<_>, Vec<_>) = (0..CALLERS).map(|_| job()).unzip();
        let size: usize = jobs.iter().map(|j| j.bytes.len()).sum();
        // Held to the end: the driver stops once every sender is gone.
        let _keep = tx.clone();
        // One task on the worker starts the callers; each queues its
        // transaction when it runs, waking the driver.
        tokio::spawn(async move {
            for j in jobs {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(j);
                });
            }
        });
        let mut got = vec![0; size];
        redis.read_exact(&mut got).await.expect("written");
        let n = writes.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n <= 2, "{CALLERS} transactions took {n} writes");
        redis
            .write_all(&b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n".repeat(CALLERS))
            .await
            .expect("answer");
        for rx in answers {
            assert_eq!(within_10s(rx).await.expect("ok"), vec![Value::Int(1)]);
        }
    }

    #[tokio::test]
    async fn a_transaction_written_is_answered_with_execs_replies() {
        let (mut redis, tx) = driven(Duration::from_secs(60));
        let (j, rx) = job();
        let sent = j.bytes.clone();
        tx.send(j).map_err(|_| "driver gone").expect("sent");
        let mut got = vec![0; sent.len()];
        redis.read_exact(&mut got).await.expect("written");
        assert_eq!(got, sent);
        redis
            .write_all(b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n")
            .await
            .expect("answer");
        assert_eq!(within_10s(rx).await.expect("ok"), vec![Value::Int(1)]);
    }

    #[tokio::test]
    async fn a_connection_that_closes_fails_whoever_waits() {
        let (redis, tx) = driven(Duration::from_secs(60));
        let (j, rx) = job();
        tx.send(j).map_err(|_| "driver gone").expect("sent");
        drop(redis);
        let e = within_10s(rx).await.expect_err("dropped");
        assert!(e.is_connection_dropped(), "{e}");
        // And the driver is gone, so the next call dials anew.
        tokio::time::timeout(Duration::from_secs(10), tx.closed())
            .await
            .expect("the driver ended");
    }

    #[tokio::test]
    async fn a_connection_that_never_answers_is_taken_as_dead() {
        // Redis frozen, or a half-open socket: nothing comes back.
        let (_redis, tx) = driven(Duration::from_millis(200));
        let (j, rx) = job();
        tx.send(j).map_err(|_| "driver gone").expect("sent");
        let e = within_10s(rx).await.expect_err("dropped");
        assert!(e.is_connection_dropped(), "{e}");
        assert!(e.to_string().contains("taken as dead"), "{e}");
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_taken_as_dead() {
        // A pipe of 64 bytes nobody reads: the write cannot finish.
        let (ours, _redis) = tokio::io::duplex(64);
        let (r, w) = tokio::io::split(ours);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(r, w, rx, Duration::from_millis(200)));
        let mut t = Transaction::with_capacity(16);
        let big = vec![b'x'; 4096];
        t.cmd("SET", &[&"k", &&big[..]]);
        let (bytes, replies) = t.finish();
        let (done, answer) = oneshot::channel();
        tx.send(Job {
            bytes,
            replies,
            exec: true,
            done,
        })
        .map_err(|_| "driver gone")
        .expect("sent");
        let e = within_10s(answer).await.expect_err("dropped");
        assert!(e.is_connection_dropped(), "{e}");
        assert!(e.to_string().contains("write stalled"), "{e}");
    }

    #[test]
    fn a_reply_nobody_asked_for_breaks_the_connection() {
        let mut q = VecDeque::new();
        let mut buf = BytesMut::from(&b":1\r\n"[..]);
        assert!(deliver(&mut buf, &mut q).is_err());
    }
}
