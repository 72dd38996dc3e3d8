//! One request to a backend server over pingora's client connector,
//! shared by the queue drainer and the relay (`proxy::relay`): a server
//! picked from the pool, the request header and its whole body written,
//! the answer's header read past any 1xx. The body is the caller's to
//! read from the returned session.
//!
//! Retries: a connect failure moves on to the next server (each server
//! gets one try; the backend never saw the request, so even a POST may go
//! elsewhere), and a pooled connection found closed before the request
//! reached the backend (pingora marks such errors retryable on reused
//! connections) is retried once on another.

use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType};
use pingora_http::RequestHeader;

use crate::upstream::UpstreamPool;

/// An answer's header is in: its body is still to be read from `session`,
/// which goes back to `connector`'s pool with [`Opened::release`].
pub struct Opened {
    /// The connection, its answer's header read.
    pub session: HttpSession,
    /// The server it is to.
    pub peer: Box<HttpPeer>,
}

impl Opened {
    /// Gives the connection back for reuse (pingora keeps it only when the
    /// answer was read whole and the server allows keep-alive).
    pub async fn release(self, connector: &Connector) {
        let idle = self.peer.options.idle_timeout;
        connector
            .release_http_session(self.session, &*self.peer, idle)
            .await;
    }
}

/// How an exchange failed before an answer's header came in.
pub struct Failed {
    /// pingora's error (a timeout reads as `ReadTimedout`).
    pub error: Box<Error>,
    /// Whether the backend may have the whole request (see
    /// [`super::end_of`]): after a retry, the first try may have reached it.
    pub sent: bool,
}

/// Sends `header` and `body` to a server of `pool` and reads the answer's
/// header. Each read and write on the connection is bounded by the
/// upstream's `read_timeout` and `write_timeout`, as on the proxied path;
/// with `budget`, each try's writing and header reading also is, as a
/// whole.
pub async fn open(
    connector: &Connector,
    pool: &UpstreamPool,
    header: RequestHeader,
    body: &Bytes,
    budget: Option<Duration>,
) -> Result<Opened, Failed> {
    // Copied only for a try on a reused connection, the one kind retried
    // after the header went out.
    let mut header = Some(header);
    let servers = pool.config().servers.len().max(1);
    let (mut connect_failures, mut retried) = (0, false);
    loop {
        let Some(peer) = pool.select() else {
            return Err(Failed {
                error: Error::explain(
                    ErrorType::ConnectNoRoute,
                    format!("upstream {}: no healthy server", pool.name()),
                ),
                sent: retried,
            });
        };
        let (mut session, reused) = match connector.get_http_session(&*peer).await {
            Ok(s) => s,
            Err(e) => {
                connect_failures += 1;
                if connect_failures < servers {
                    continue;
                }
                return Err(Failed {
                    error: e,
                    sent: retried,
                });
            }
        };
        session.set_read_timeout(peer.options.read_timeout);
        session.set_write_timeout(peer.options.write_timeout);
        let to_send = match (reused, header.take()) {
            (true, Some(h)) => {
                let copy = Box::new(h.clone());
                header = Some(h);
                copy
            }
            (false, Some(h)) => Box::new(h),
            (_, None) => {
                return Err(Failed {
                    error: Error::explain(ErrorType::ConnectError, "no request left to retry"),
                    sent: retried,
                })
            }
        };
        let asked = send(&mut session, to_send, body);
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
            Ok(()) => return Ok(Opened { session, peer }),
            Err(mut e) => {
                e.retry.decide_reuse(reused);
                if e.retry() && !retried {
                    retried = true;
                    continue;
                }
                return Err(Failed {
                    error: e,
                    sent: true,
                });
            }
        }
    }
}

/// Writes the request and reads the answer's header: 1xx answers (100
/// Continue, 103) come before the real one; a 101 to a request that asked
/// for no upgrade is final.
async fn send(
    session: &mut HttpSession,
    header: Box<RequestHeader>,
    body: &Bytes,
) -> pingora_core::Result<()> {
    session.write_request_header(header).await?;
    session.write_request_body(body.clone(), true).await?;
    session.finish_request_body().await?;
    loop {
        session.read_response_header().await?;
        match session.response_header() {
            Some(h) if h.status.is_informational() && h.status.as_u16() != 101 => {}
            _ => return Ok(()),
        }
    }
}
