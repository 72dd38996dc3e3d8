use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::Response;

/// Bound on connecting and on each read of an answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A raw TCP connection for requests no well-behaved client would send:
/// bytes go out exactly as given, answers are parsed by hand (status line,
/// headers, a body framed by `Content-Length` or chunked, or up to close).
pub struct RawConn {
    /// The socket.
    stream: TcpStream,
    /// Bytes read but not yet consumed by a parsed answer.
    buf: Vec<u8>,
    /// Set once the peer closed its side (a read returned 0).
    eof: bool,
}

impl RawConn {
    /// Connects to `addr` (10 s bound); panics on failure.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("connect to {addr}: {e}"),
            Err(_) => panic!("connect to {addr} timed out after {TIMEOUT:?}"),
        };
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes `bytes` in one `write_all`; panics on failure.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
    }

    /// Writes `request` with its last `tail` bytes 100 ms after the rest:
    /// the gateway finds the body still on its way, so its fast lane
    /// leaves the request to pingora's path.
    pub async fn send_with_late_tail(&mut self, request: &[u8], tail: usize) {
        let (head, rest) = request.split_at(request.len().saturating_sub(tail));
        self.send(head).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        self.send(rest).await;
    }

    /// Writes `bytes`, reporting failure (the peer may have closed).
    pub async fn try_send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write {} bytes: {e}", bytes.len()))
    }

    /// Closes the write side (TCP FIN); answers can still be read.
    pub async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Makes the next close send a TCP RST instead of a FIN.
    pub fn set_reset_on_close(&self) {
        let _ = self.stream.set_zero_linger();
    }

    /// Reads more bytes into the buffer; `false` at end of stream.
    async fn fill(&mut self) -> Result<bool, String> {
        if self.eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                self.eof = true;
                Ok(false)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            // A reset after the answer is as good as a close here.
            Ok(Err(_)) => {
                self.eof = true;
                Ok(false)
            }
            Err(_) => Err(format!("no bytes within {TIMEOUT:?}")),
        }
    }

    /// Reads one answer, interim (1xx) answers included.
    pub async fn read_response(&mut self) -> Result<Response, String> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill().await? {
                return Err(format!(
                    "connection closed before a whole answer header; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        self.buf.drain(..head_end);
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if (100..200).contains(&status) {
            return Ok(resp);
        }
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().map_err(|_| format!("bad length {len:?}"))?;
            while self.buf.len() < len {
                if !self.fill().await? {
                    return Err(format!("body cut at {} of {len} bytes", self.buf.len()));
                }
            }
            resp.body = self.buf.drain(..len).collect();
        } else if chunked {
            resp.body = self.read_chunked().await?;
        } else {
            while self.fill().await? {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(resp)
    }

    /// Reads a chunked body (trailers skipped).
    async fn read_chunked(&mut self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf, b"\r\n") {
                    break i;
                }
                if !self.fill().await? {
                    return Err("closed inside a chunk size".into());
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size {size_text:?}"))?;
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        let empty = i == 0;
                        self.buf.drain(..i + 2);
                        if empty {
                            return Ok(body);
                        }
                        continue;
                    }
                    if !self.fill().await? {
                        return Ok(body);
                    }
                }
            }
            while self.buf.len() < size + 2 {
                if !self.fill().await? {
                    return Err("closed inside a chunk".into());
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads the next final answer, skipping interim (1xx) ones.
    pub async fn read_final(&mut self) -> Result<Response, String> {
        loop {
            let resp = self.read_response().await?;
            if !(100..200).contains(&resp.status) {
                return Ok(resp);
            }
        }
    }

    /// Waits until the peer closes the connection (10 s bound per read);
    /// returns whatever bytes came before the close.
    pub async fn read_to_close(&mut self) -> Result<Vec<u8>, String> {
        while self.fill().await? {}
        Ok(std::mem::take(&mut self.buf))
    }
}

/// Index of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
