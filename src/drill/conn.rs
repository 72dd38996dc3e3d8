//! A raw keep-alive HTTP/1.1 client connection: write a rendered request,
//! read one answer (status line and headers through `httparse`, then a
//! `Content-Length`, chunked or read-to-close body), keep whatever the
//! server sent beyond it for the next answer.
//!
//! Hand-written framing rather than hyper's client: the drill needs the
//! status, `X-Sluice-Outcome`, `Connection: close` and sometimes the body,
//! from one reused buffer per connection and no allocation per request;
//! a full client (pooling, header maps, body streams) costs more per
//! request than the gateway's cheapest answers, and the drill must never
//! be the bottleneck of a benchmark.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stats::Label;

/// Headers beyond this many make the answer malformed (the gateway and
/// ordinary backends send about ten).
const MAX_HEADERS: usize = 64;

/// A response head larger than this is refused (the gateway's own limit
/// for request heads is 64 KiB).
const MAX_HEAD: usize = 64 << 10;

/// A kept body larger than this is cut (tickets and poll answers are
/// small JSON objects; a page body is only skipped, never kept).
const MAX_KEPT_BODY: usize = 1 << 20;

/// The read buffer starts this big and grows only for a long head.
const READ_CHUNK: usize = 16 << 10;

/// How an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The server closed the connection before sending any byte of the
    /// answer (a keep-alive connection it had already given up on).
    #[error("connection closed before the answer")]
    ClosedEarly,
    /// The socket failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// What came back is not an HTTP/1.1 answer we can frame.
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// Which answers' bodies to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Skip every body.
    Nothing,
    /// Keep the body of a `queued` answer (it carries the ticket).
    Queued,
    /// Keep every body.
    All,
}

/// The parts of an answer the drill reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Its `X-Sluice-Outcome`.
    pub label: Label,
}

/// One client connection.
pub struct Conn {
    stream: TcpStream,
    /// Bytes read; `buf[start..end]` is not consumed yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Answers read on it so far.
    served: u64,
    /// The server asked to close it (or framed a body by closing).
    closing: bool,
}

/// How an answer's body is framed.
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

impl Conn {
    /// Connects with Nagle off (requests are written whole, in one call).
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            served: 0,
            closing: false,
        })
    }

    /// Whether it already carried an answer (a failure on a reused
    /// connection may be a keep-alive race, worth one retry).
    pub fn reused(&self) -> bool {
        self.served > 0
    }

    /// Whether the server wants it closed after the last answer.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Sends `request` and reads one answer. When `keep` asks for it, the
    /// answer's body replaces the contents of `body` (up to 1 MiB);
    /// otherwise `body` is left empty and the answer's body skipped.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        body: &mut Vec<u8>,
        keep: Keep,
    ) -> Result<Answer, ExchangeError> {
        let reused = self.reused();
        self.stream.write_all(request).await.map_err(|e| {
            // A reset on a reused connection: the server had closed it.
            if reused {
                ExchangeError::ClosedEarly
            } else {
                ExchangeError::Io(e)
            }
        })?;
        body.clear();
        loop {
            let (answer, framing, head_len) = self.read_head().await?;
            self.start += head_len;
            let kept = match keep {
                Keep::Nothing => false,
                Keep::Queued => answer.label == Label::Outcome(crate::outcome::Outcome::Queued),
                Keep::All => true,
            };
            body.clear();
            self.read_body(framing, kept.then_some(&mut *body)).await?;
            // 1xx answers come before the real one (100 Continue, 103).
            if (100..200).contains(&answer.status) && answer.status != 101 {
                continue;
            }
            self.served += 1;
            return Ok(answer);
        }
    }

    /// Reads until a whole head is buffered; gives the answer, its body's
    /// framing and the head's length.
    async fn read_head(&mut self) -> Result<(Answer, Framing, usize), ExchangeError> {
        loop {
            if self.end > self.start {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&self.buf[self.start..self.end]) {
                    Ok(httparse::Status::Complete(len)) => {
                        let (answer, framing, close) = read_fields(&resp)?;
                        if close {
                            self.closing = true;
                        }
                        return Ok((answer, framing, len));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(_) => return Err(ExchangeError::Malformed("bad status line or header")),
                }
                if self.end - self.start >= MAX_HEAD {
                    return Err(ExchangeError::Malformed("response head over 64 KiB"));
                }
            }
            let first = self.start == self.end;
            let got = match self.fill().await {
                Err(ExchangeError::Io(_)) if first && self.served > 0 => {
                    return Err(ExchangeError::ClosedEarly)
                }
                other => other?,
            };
            if got == 0 {
                return Err(if first && self.served > 0 {
                    ExchangeError::ClosedEarly
                } else if first {
                    ExchangeError::Io(std::io::ErrorKind::UnexpectedEof.into())
                } else {
                    ExchangeError::Malformed("connection closed inside the response head")
                });
            }
        }
    }

    /// Consumes the body, keeping it in `keep` if given.
    async fn read_body(
        &mut self,
        framing: Framing,
        mut keep: Option<&mut Vec<u8>>,
    ) -> Result<(), ExchangeError> {
        match framing {
            Framing::None => Ok(()),
            Framing::Length(n) => self.take(n, keep).await,
            Framing::UntilClose => {
                self.closing = true;
                loop {
                    let n = self.end - self.start;
                    self.take(n, keep.as_deref_mut()).await?;
                    if self.fill().await? == 0 {
                        return Ok(());
                    }
                }
            }
            Framing::Chunked => loop {
                let size = loop {
                    match httparse::parse_chunk_size(&self.buf[self.start..self.end]) {
                        Ok(httparse::Status::Complete((len, size))) => {
                            self.start += len;
                            break size;
                        }
                        Ok(httparse::Status::Partial) => {
                            if self.end - self.start >= MAX_HEAD {
                                return Err(ExchangeError::Malformed("chunk size line too long"));
                            }
                            self.need_more("connection closed inside a chunked body")
                                .await?;
                        }
                        Err(_) => return Err(ExchangeError::Malformed("bad chunk size")),
                    }
                };
                if size == 0 {
                    // Trailers (rare) end with an empty line.
                    return self.skip_trailers().await;
                }
                let size = usize::try_from(size)
                    .map_err(|_| ExchangeError::Malformed("chunk too large"))?;
                self.take(size, keep.as_deref_mut()).await?;
                self.expect_crlf().await?;
            },
        }
    }

    /// Consumes `n` body bytes, reading as needed.
    async fn take(
        &mut self,
        mut n: usize,
        mut keep: Option<&mut Vec<u8>>,
    ) -> Result<(), ExchangeError> {
        loop {
            let here = n.min(self.end - self.start);
            if let Some(k) = keep.as_deref_mut() {
                let room = MAX_KEPT_BODY.saturating_sub(k.len());
                k.extend_from_slice(&self.buf[self.start..self.start + here.min(room)]);
            }
            self.start += here;
            n -= here;
            if n == 0 {
                return Ok(());
            }
            self.need_more("connection closed inside the body").await?;
        }
    }

    async fn expect_crlf(&mut self) -> Result<(), ExchangeError> {
        while self.end - self.start < 2 {
            self.need_more("connection closed inside a chunked body")
                .await?;
        }
        if &self.buf[self.start..self.start + 2] != b"\r\n" {
            return Err(ExchangeError::Malformed("chunk not followed by CRLF"));
        }
        self.start += 2;
        Ok(())
    }

    async fn skip_trailers(&mut self) -> Result<(), ExchangeError> {
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                self.start += i + 2;
                if i == 0 {
                    return Ok(());
                }
                continue;
            }
            if pending.len() >= MAX_HEAD {
                return Err(ExchangeError::Malformed("trailers over 64 KiB"));
            }
            self.need_more("connection closed inside the trailers")
                .await?;
        }
    }

    /// Reads more or fails with `eof` at end of stream.
    async fn need_more(&mut self, eof: &'static str) -> Result<(), ExchangeError> {
        if self.fill().await? == 0 {
            return Err(ExchangeError::Malformed(eof));
        }
        Ok(())
    }

    /// Reads once into the free end of the buffer (compacting or growing
    /// it first when full); 0 at end of stream.
    async fn fill(&mut self) -> Result<usize, ExchangeError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // Only a head longer than the buffer gets here; MAX_HEAD bounds it.
                let len = self.buf.len();
                self.buf.resize(len * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// Why a request got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be opened.
    Connect,
    /// The connection broke or the answer was malformed.
    Io,
    /// Nothing whole within the timeout.
    Timeout,
}

/// One keep-alive connection to a fixed address, reopened as needed.
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    conn: Option<Conn>,
    /// Connections opened so far.
    pub opened: u64,
}

impl Client {
    /// A client of `addr`; `timeout` bounds the connect and each exchange.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            timeout,
            conn: None,
            opened: 0,
        }
    }

    /// Sends one request and reads its answer, connecting first if needed.
    /// A keep-alive connection the server closed just before the request
    /// is reopened and the request sent again once (nothing of it was
    /// read); any other failure drops the connection and is reported.
    pub async fn send(
        &mut self,
        request: &[u8],
        body: &mut Vec<u8>,
        keep: Keep,
    ) -> Result<Answer, Failure> {
        for first_try in [true, false] {
            let conn = match &mut self.conn {
                Some(c) => c,
                None => {
                    let c = match tokio::time::timeout(self.timeout, Conn::connect(self.addr)).await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(_)) => return Err(Failure::Connect),
                        Err(_) => return Err(Failure::Timeout),
                    };
                    self.opened += 1;
                    self.conn.insert(c)
                }
            };
            match tokio::time::timeout(self.timeout, conn.exchange(request, body, keep)).await {
                Ok(Ok(answer)) => {
                    if conn.closing() {
                        self.conn = None;
                    }
                    return Ok(answer);
                }
                Ok(Err(ExchangeError::ClosedEarly)) if first_try => self.conn = None,
                Ok(Err(_)) => {
                    self.conn = None;
                    return Err(Failure::Io);
                }
                Err(_) => {
                    self.conn = None;
                    return Err(Failure::Timeout);
                }
            }
        }
        Err(Failure::Io)
    }
}

/// Status, label, framing and whether the server closes, from a parsed head.
fn read_fields(
    resp: &httparse::Response<'_, '_>,
) -> Result<(Answer, Framing, bool), ExchangeError> {
    let status = resp
        .code
        .ok_or(ExchangeError::Malformed("no status code"))?;
    // HTTP/1.0 closes unless it says keep-alive.
    let mut close = resp.version == Some(0);
    let mut label = Label::Absent;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(ExchangeError::Malformed("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ExchangeError::Malformed("conflicting Content-Length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case(b"x-sluice-outcome") {
            label = Label::parse(h.value);
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    Ok((Answer { status, label }, framing, close))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;
    use tokio::net::TcpListener;

    /// A server that reads one request per item of `answers` and writes
    /// the item, raw, then closes.
    async fn serve(answers: Vec<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            for a in answers {
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.expect("read");
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                // Written in two pieces to exercise partial reads.
                let (a1, a2) = a.split_at(a.len() / 2);
                s.write_all(a1).await.expect("write");
                s.flush().await.expect("flush");
                tokio::task::yield_now().await;
                s.write_all(a2).await.expect("write");
            }
        });
        addr
    }

    const REQ: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn lengths_chunks_and_labels_are_framed_on_one_connection() {
        let addr = serve(vec![
            b"HTTP/1.1 410 Gone\r\nX-Sluice-Outcome: sold_out\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nx-sluice-outcome: queued\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end",
        ])
        .await;
        let mut c = Conn::connect(addr).await.expect("connect");
        let mut body = Vec::new();
        let a = c
            .exchange(REQ, &mut body, Keep::Queued)
            .await
            .expect("first");
        assert_eq!(a.status, 410);
        assert!(body.is_empty());
        assert_eq!(a.label, Label::Outcome(Outcome::SoldOut));
        let a = c
            .exchange(REQ, &mut body, Keep::Queued)
            .await
            .expect("second");
        assert_eq!((a.status, a.label), (202, Label::Outcome(Outcome::Queued)));
        assert_eq!(body, b"abcde");
        let a = c.exchange(REQ, &mut body, Keep::All).await.expect("third");
        assert_eq!((a.status, a.label, body.len()), (204, Label::Absent, 0));
        assert!(!c.closing());
        let a = c.exchange(REQ, &mut body, Keep::All).await.expect("fourth");
        assert_eq!(a.status, 200);
        assert_eq!(body, b"to the end");
        assert!(c.closing());
    }

    #[tokio::test]
    async fn a_reused_connection_closed_before_the_answer_says_so() {
        let addr = serve(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]).await;
        let mut c = Conn::connect(addr).await.expect("connect");
        let mut body = Vec::new();
        c.exchange(REQ, &mut body, Keep::All).await.expect("first");
        assert!(c.reused());
        let e = c
            .exchange(REQ, &mut body, Keep::All)
            .await
            .expect_err("closed");
        assert!(matches!(e, ExchangeError::ClosedEarly), "{e:?}");
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let addr = serve(vec![b"SSH-2.0-OpenSSH\r\n\r\n"]).await;
        let mut c = Conn::connect(addr).await.expect("connect");
        let e = c
            .exchange(REQ, &mut Vec::new(), Keep::All)
            .await
            .expect_err("garbage");
        assert!(matches!(e, ExchangeError::Malformed(_)), "{e:?}");
    }
}
