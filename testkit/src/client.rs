use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Bound on connecting and on each request/response exchange.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A fully read HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in arrival order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The full body.
    pub body: Vec<u8>,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The header fields without `Date` (which moves), as sent.
    pub fn fields_but_date(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("date"))
            .cloned()
            .collect()
    }

    /// The body parsed as JSON; panics with status and body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body: {:?}",
                self.status,
                self.text()
            )
        })
    }
}

/// One HTTP/1.1 client connection (no pooling): every `send` reuses this TCP connection.
pub struct Conn {
    /// Where the connection goes.
    addr: SocketAddr,
    /// hyper's request handle for this connection.
    sender: SendRequest<Full<Bytes>>,
    /// The task driving the connection; aborted on drop to close the socket.
    task: JoinHandle<()>,
}

impl Conn {
    /// Opens one TCP connection to `addr`; panics if that fails.
    pub async fn connect(addr: SocketAddr) -> Conn {
        match Conn::try_connect(addr).await {
            Ok(conn) => conn,
            Err(e) => panic!("{e}"),
        }
    }

    /// Opens one TCP connection to `addr`, reporting failure (e.g. refused) as `Err`.
    pub async fn try_connect(addr: SocketAddr) -> Result<Conn, String> {
        let stream = match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(format!("connect to {addr} failed: {e}")),
            Err(_) => return Err(format!("connect to {addr} timed out after {TIMEOUT:?}")),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {addr} failed: {e}"))?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { addr, sender, task })
    }

    /// The address this connection goes to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the connection is known to be closed (by either side).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends one request on this connection and reads the whole response (10 s bound).
    ///
    /// Adds `host: 127.0.0.1:port` and `content-length` unless `headers` has them.
    pub async fn send(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, String> {
        let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        let mut builder = hyper::Request::builder().method(method).uri(path_and_query);
        if !has("host") {
            builder = builder.header("host", format!("127.0.0.1:{}", self.addr.port()));
        }
        let bodyless = matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS" | "TRACE");
        let framed = has("content-length") || has("transfer-encoding");
        if !framed && (!body.is_empty() || !bodyless) {
            builder = builder.header("content-length", body.len().to_string());
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let req = builder
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| format!("invalid request {method} {path_and_query}: {e}"))?;
        let addr = self.addr;
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| format!("connection to {addr} not usable: {e}"))?;
            let resp = self
                .sender
                .send_request(req)
                .await
                .map_err(|e| format!("{method} {path_and_query} to {addr} failed: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("reading body of {method} {path_and_query} from {addr}: {e}"))?
                .to_bytes()
                .to_vec();
            Ok(Response {
                status: parts.status.as_u16(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_ascii_lowercase(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body,
            })
        };
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "{method} {path_and_query} to {addr} timed out after {TIMEOUT:?}"
            )),
        }
    }
}

impl Drop for Conn {
    /// Closes the TCP connection.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends one request on a fresh connection; panics with the error on failure.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut conn = Conn::connect(addr).await;
    match conn.send(method, path, headers, body).await {
        Ok(resp) => resp,
        Err(e) => panic!("request failed: {e}"),
    }
}

/// `GET path` on a fresh connection; panics on failure.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], b"").await
}

/// Asserts an answer's status and `X-Sluice-Outcome`, showing the body on
/// failure.
#[track_caller]
pub fn expect(resp: &Response, status: u16, outcome: &str) {
    assert_eq!(
        (resp.status, resp.header("x-sluice-outcome")),
        (status, Some(outcome)),
        "unexpected answer, body: {}",
        resp.text()
    );
}
