//! A miss's trip to the backend: the fetch request written through
//! pingora's HTTP connector with the upstream's own peer settings (as the
//! queue drainer does), the answer read whole up to the rule's `max_body`.
//! It runs in its own task, so no client leaving can cut a fill that other
//! clients wait on. A server that refuses the connection is skipped for
//! the next one (each tried once); a pooled connection found closed before
//! the request reached it is retried once on another.

use bytes::{Bytes, BytesMut};
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::backend::{self, ForwardEnd};
use crate::upstream::UpstreamPool;

/// A whole backend answer.
pub struct Fetched {
    /// Its status and headers.
    pub header: ResponseHeader,
    /// Its body.
    pub body: Bytes,
}

/// Why a fetch gave no answer to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// The body is longer than `max_body`: the requests go to the backend
    /// themselves, streamed.
    TooBig,
    /// No answer: connect error, timeout, reset.
    Failed(ForwardEnd),
}

/// Fetches through one connection pool of its own.
pub struct Fetcher {
    connector: Connector,
}

impl Default for Fetcher {
    fn default() -> Self {
        Self {
            connector: Connector::new(None),
        }
    }
}

impl Fetcher {
    /// Sends `req` to a server of `pool`; the answer within `connect +
    /// read timeout` for its header and `read timeout` for its body.
    pub async fn fetch(
        &self,
        pool: &UpstreamPool,
        req: &RequestHeader,
        max_body: u64,
    ) -> Result<Fetched, FetchError> {
        let tries = pool.config().servers.len().max(1);
        let mut last = FetchError::Failed(ForwardEnd::ConnectError);
        for _ in 0..tries {
            let Some(peer) = pool.select() else {
                return Err(last);
            };
            match self.exchange(pool, &peer, req, max_body).await {
                // The request never left: the next server may answer.
                Err(FetchError::Failed(ForwardEnd::ConnectError)) => {
                    last = FetchError::Failed(ForwardEnd::ConnectError);
                }
                other => return other,
            }
        }
        Err(last)
    }

    async fn exchange(
        &self,
        pool: &UpstreamPool,
        peer: &HttpPeer,
        req: &RequestHeader,
        max_body: u64,
    ) -> Result<Fetched, FetchError> {
        let budget = pool.config().connect_timeout + pool.config().read_timeout;
        let mut retried = false;
        let mut session = loop {
            let (mut session, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(|e| FetchError::Failed(backend::end_of(&e, false)))?;
            let answered = tokio::time::timeout(budget, async {
                session.write_request_header(Box::new(req.clone())).await?;
                session.finish_request_body().await?;
                loop {
                    session.read_response_header().await?;
                    match session.response_header() {
                        Some(h) if h.status.is_informational() && h.status.as_u16() != 101 => {}
                        _ => return Ok::<_, Box<pingora_core::Error>>(()),
                    }
                }
            })
            .await;
            match answered {
                Ok(Ok(())) => break session,
                Ok(Err(mut e)) => {
                    e.retry.decide_reuse(reused);
                    if e.retry() && !retried {
                        retried = true;
                        continue;
                    }
                    return Err(FetchError::Failed(backend::end_of(&e, true)));
                }
                Err(_) => return Err(FetchError::Failed(ForwardEnd::Timeout)),
            }
        };
        let Some(header) = session.response_header().cloned() else {
            return Err(FetchError::Failed(ForwardEnd::Reset));
        };
        let declared = header
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body) {
            // Not read: the connection is dropped, not pooled.
            return Err(FetchError::TooBig);
        }
        let read_body = async {
            let mut body = BytesMut::new();
            while let Some(chunk) = session.read_response_body().await? {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > max_body {
                    return Ok(None);
                }
            }
            Ok::<_, Box<pingora_core::Error>>(Some(body.freeze()))
        };
        let body = match tokio::time::timeout(pool.config().read_timeout, read_body).await {
            Ok(Ok(Some(body))) => body,
            Ok(Ok(None)) => return Err(FetchError::TooBig),
            Ok(Err(e)) => return Err(FetchError::Failed(backend::end_of(&e, true))),
            Err(_) => return Err(FetchError::Failed(ForwardEnd::Timeout)),
        };
        self.connector
            .release_http_session(session, peer, peer.options.idle_timeout)
            .await;
        Ok(Fetched { header, body })
    }
}
