//! One request to a backend server over pingora's client connector,
//! shared by the queue drainer and the relay (`proxy::relay`): a server
//! picked from the pool, the request header and its whole body written,
//! the answer's header read past any 1xx. The body is the caller's to
//! read from the returned session.
//!
//! Retries: a connect failure moves on to the next server (each server
//! gets one try; the backend never saw the request, so even a POST may go
//! elsewhere); an idempotent request that found its pooled connection
//! closed (pingora marks such errors retryable on reused connections) is
//! sent once more on another, as on the proxied path.
//!
//! Kept connections: pingora's HTTP/1 connector pools them, as many as
//! the upstreams' `max_inflight` add up to ([`kept`]), and hands one out
//! without asking the kernel whose it is ([`Kept`]).

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::protocols::http::v1::client::{
    http_req_header_to_wire, HttpSession as Http1Session,
};
use pingora_core::upstreams::peer::{HttpPeer, Peer, PeerOptions, Proxy, Tracer};
use pingora_core::utils::tls::CertKey;
use pingora_core::{Error, ErrorType, RetryType};
use pingora_http::RequestHeader;

use tokio::io::AsyncWriteExt;

use crate::deadline::within;
use crate::upstream::{UpstreamPool, Upstreams};

/// pingora's HTTP/1 client connector and its pool of kept connections (the
/// backends speak HTTP/1): its own, not the generic one, so a kept
/// connection is looked up without the connect machinery in the way.
pub type Connector = pingora_core::connectors::http::v1::Connector;

/// pingora's own pool size, the least kept.
const MIN_KEPT: usize = 128;

/// How many idle connections to the backends a pool keeps: as many as the
/// upstreams' `max_inflight` add up to (at least pingora's 128), the
/// concurrency the gateway itself drives at its backends, which they take
/// by definition. With pingora's 128 and a burst of 256 winners, one
/// winner in 18 found the pool full when it was done, closed its
/// connection, and a later one opened a new one (1,649 connections left
/// in TIME_WAIT over 30,000 winners in `scripts/bench`'s winners phase).
/// Sized at start; idle ones still close after the upstream's
/// `idle_timeout`.
pub fn kept(max_inflight: impl Iterator<Item = u32>) -> usize {
    max_inflight
        .map(|n| n as usize)
        .sum::<usize>()
        .max(MIN_KEPT)
}

/// A connector whose pool keeps [`kept`] idle connections.
pub fn connector(upstreams: &Upstreams) -> Connector {
    let kept = kept(upstreams.pools().iter().map(|p| p.config().max_inflight));
    Connector::new(Some(ConnectorOptions::new(kept)))
}

/// A server as a kept connection to it is asked for: pingora's
/// [`HttpPeer`] without its `matches_fd`, which calls `getpeername` on
/// every kept connection handed out (one system call in five of a relayed
/// page, measured with `strace -c`). The check is moot here: the pool
/// finds a connection by the peer's reuse hash, which covers its address
/// and options, and owns the socket until it hands it out, so its
/// descriptor cannot have been closed and reused for another server in
/// between.
#[derive(Clone)]
struct Kept(Box<HttpPeer>);

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Peer for Kept {
    fn address(&self) -> &pingora_core::protocols::l4::socket::SocketAddr {
        self.0.address()
    }
    fn tls(&self) -> bool {
        self.0.tls()
    }
    fn sni(&self) -> &str {
        self.0.sni()
    }
    fn reuse_hash(&self) -> u64 {
        self.0.reuse_hash()
    }
    fn get_proxy(&self) -> Option<&Proxy> {
        self.0.get_proxy()
    }
    fn get_peer_options(&self) -> Option<&PeerOptions> {
        self.0.get_peer_options()
    }
    fn get_mut_peer_options(&mut self) -> Option<&mut PeerOptions> {
        self.0.get_mut_peer_options()
    }
    fn get_client_cert_key(&self) -> Option<&Arc<CertKey>> {
        self.0.get_client_cert_key()
    }
    fn get_tracer(&self) -> Option<Tracer> {
        self.0.get_tracer()
    }
    fn matches_fd<V: AsRawFd>(&self, _fd: V) -> bool {
        true
    }
}

/// An answer's header is in: its body is still to be read from `session`,
/// which goes back to `connector`'s pool with [`Opened::release`].
pub struct Opened {
    /// The connection, its answer's header read.
    pub session: HttpSession,
    /// The server it is to.
    pub peer: Box<HttpPeer>,
    /// Servers that could not be reached before this one.
    pub connect_failures: usize,
}

impl Opened {
    /// Gives the connection back for reuse (pingora keeps it only when the
    /// answer was read whole and the server allows keep-alive).
    pub async fn release(self, connector: &Connector) {
        let idle = self.peer.options.idle_timeout;
        if let HttpSession::H1(h1) = self.session {
            connector.release_http_session(h1, &*self.peer, idle).await;
        }
    }
}

/// How an exchange failed before an answer's header came in.
pub struct Failed {
    /// pingora's error (a timeout reads as `ReadTimedout`).
    pub error: Box<Error>,
    /// Whether the backend may have the whole request (see
    /// [`super::end_of`]).
    pub sent: bool,
    /// Servers that could not be reached.
    pub connect_failures: usize,
}

/// Sends `header` and `body` to a server of `pool` and reads the answer's
/// header. Each read and write on the connection is bounded by the
/// upstream's `read_timeout` and `write_timeout`, as on the proxied path;
/// with `budget`, each try's writing and header reading also is, as a
/// whole.
///
/// A request that went out whole is sent again only when its method is
/// idempotent and the failure was a pooled connection found closed (as
/// the proxied path does): an order may have been placed by the first try.
/// If that second try fails too, the first try's failure is the one
/// reported, so the order is never taken as unsent.
pub async fn open(
    connector: &Connector,
    pool: &UpstreamPool,
    header: RequestHeader,
    body: &Bytes,
    budget: Option<Duration>,
) -> Result<Opened, Failed> {
    let idempotent = header.method.is_idempotent();
    // Copied only for a try that may be repeated.
    let mut header = Some(header);
    let servers = pool.config().servers.len().max(1);
    let mut connect_failures = 0;
    // The failure of a try that went out, once a second try is made.
    let mut first: Option<Box<Error>> = None;
    let failed = |error: Box<Error>, first: Option<Box<Error>>, connect_failures| {
        let sent = first.is_some();
        Err(Failed {
            error: first.unwrap_or(error),
            sent,
            connect_failures,
        })
    };
    loop {
        let Some(peer) = pool.select() else {
            let error = Error::explain(
                ErrorType::ConnectNoRoute,
                format!("upstream {}: no healthy server", pool.name()),
            );
            return failed(error, first, connect_failures);
        };
        // A kept connection first. pingora's connect future (8.8 KB) is
        // boxed: carried inline, it made every exchange's future (and the
        // relay's, which the gate boxes per request) that much larger, for
        // the few requests that open a connection.
        let peer = Kept(peer);
        let got = match connector.reused_http_session(&peer).await {
            Some(h1) => Ok((h1, true)),
            None => Box::pin(connector.get_http_session(&*peer.0)).await,
        };
        let Kept(peer) = peer;
        let (mut session, reused) = match got {
            Ok((h1, reused)) => (HttpSession::H1(h1), reused),
            Err(e) => {
                connect_failures += 1;
                if connect_failures < servers && first.is_none() {
                    continue;
                }
                return failed(e, first, connect_failures);
            }
        };
        session.set_read_timeout(peer.options.read_timeout);
        session.set_write_timeout(peer.options.write_timeout);
        let repeatable = reused && idempotent && first.is_none();
        let to_send = match (repeatable, header.take()) {
            (true, Some(h)) => {
                let copy = Box::new(h.clone());
                header = Some(h);
                copy
            }
            (false, Some(h)) => Box::new(h),
            (_, None) => {
                let error = Error::explain(ErrorType::ConnectError, "no request left to retry");
                return failed(error, first, connect_failures);
            }
        };
        let asked = send(session, to_send, body, &peer);
        let answered = match budget {
            Some(budget) => match tokio::time::timeout(budget, asked).await {
                Ok(r) => r,
                Err(_) => Err(Error::explain(
                    ErrorType::ReadTimedout,
                    "no answer within the upstream's budget",
                )),
            },
            None => asked.await,
        };
        match answered {
            Ok(session) => {
                return Ok(Opened {
                    session,
                    peer,
                    connect_failures,
                })
            }
            Err(mut e) => {
                e.retry.decide_reuse(reused);
                if e.retry() && repeatable {
                    first = Some(e);
                    continue;
                }
                return Err(Failed {
                    error: first.unwrap_or(e),
                    sent: true,
                    connect_failures,
                });
            }
        }
    }
}

/// Writes the request and reads the answer's header: 1xx answers (100
/// Continue, 103) come before the real one. A 101 to a request that asked
/// for no upgrade (the only kind sent here) is a broken answer.
async fn send(
    mut session: HttpSession,
    header: Box<RequestHeader>,
    body: &Bytes,
    peer: &HttpPeer,
) -> pingora_core::Result<HttpSession> {
    match session {
        // Head and body in one write: pingora's client flushes the head on
        // its own, a second system call (and a second packet for the
        // backend) per request. Its answer is read by a session over the
        // same connection, which needs the request only for a HEAD's
        // bodiless answer, a `Connection` field or an upgrade: none of
        // these is sent this way.
        HttpSession::H1(h1)
            if header.method != http::Method::HEAD
                && !header.headers.contains_key(http::header::CONNECTION)
                && !header.headers.contains_key(http::header::UPGRADE) =>
        {
            let mut stream = h1.into_inner();
            let mut wire = http_req_header_to_wire(&header).ok_or_else(|| {
                Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "request-line contains forbidden bytes",
                )
            })?;
            wire.extend_from_slice(body);
            let write = async {
                stream.write_all(&wire).await?;
                stream.flush().await
            };
            let written = match peer.options.write_timeout {
                Some(t) => within(write, || tokio::time::Instant::now() + t)
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
                None => write.await,
            };
            if let Err(e) = written {
                let kind = if e.kind() == std::io::ErrorKind::TimedOut {
                    ErrorType::WriteTimedout
                } else {
                    ErrorType::WriteError
                };
                let mut e = Error::because(kind, "writing the request", e);
                // Not whole at the backend: a stale pooled connection may
                // be tried again, as a read failure on one is.
                e.retry = RetryType::ReusedOnly;
                return Err(e);
            }
            let mut h1 = Http1Session::new_with_options(stream, peer);
            h1.read_timeout = peer.options.read_timeout;
            h1.write_timeout = peer.options.write_timeout;
            session = HttpSession::H1(h1);
        }
        _ => {
            session.write_request_header(header).await?;
            session.write_request_body(body.clone(), true).await?;
            session.finish_request_body().await?;
        }
    }
    loop {
        session.read_response_header().await?;
        match session.response_header().map(|h| h.status.as_u16()) {
            Some(101) => {
                return Error::e_explain(
                    ErrorType::InvalidHTTPHeader,
                    "101 Switching Protocols to a request that asked for no upgrade",
                )
            }
            Some(100..=199) => {}
            _ => return Ok(session),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_peer_is_its_server_but_for_the_descriptor_check() {
        let mut server = HttpPeer::new("127.0.0.1:8080", false, String::new());
        server.options.idle_timeout = Some(Duration::from_secs(7));
        let kept = Kept(Box::new(server.clone()));
        assert_eq!(kept.reuse_hash(), server.reuse_hash());
        assert_eq!(kept.address(), server.address());
        assert_eq!(kept.to_string(), server.to_string());
        assert_eq!((kept.tls(), kept.sni()), (server.tls(), server.sni()));
        assert!(kept.get_proxy().is_none() && kept.get_client_cert_key().is_none());
        assert!(kept.get_tracer().is_none());
        assert_eq!(
            kept.get_peer_options().map(|o| o.idle_timeout),
            Some(Some(Duration::from_secs(7)))
        );
        // Not a socket to 127.0.0.1:8080: pingora asks the kernel and says
        // no; the kept pool does not ask.
        assert!(!server.matches_fd(std::io::stdin()));
        assert!(kept.matches_fd(std::io::stdin()));
    }

    #[test]
    fn the_pools_keep_the_upstreams_concurrency_and_never_less_than_pingoras() {
        assert_eq!(kept([].into_iter()), 128);
        assert_eq!(kept([64].into_iter()), 128);
        assert_eq!(kept([1024, 64].into_iter()), 1088);
        assert_eq!(
            kept([u32::MAX, u32::MAX].into_iter()),
            2 * u32::MAX as usize
        );
    }
}
