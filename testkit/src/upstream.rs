use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

/// One non-health request as the upstream saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Request method, e.g. `GET`.
    pub method: String,
    /// Path plus query string.
    pub uri: String,
    /// Headers in arrival order, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The full request body.
    pub body: Vec<u8>,
}

impl Recorded {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Counters, knobs and recordings shared between the test and the server.
struct State {
    /// Non-health requests received.
    requests: AtomicU64,
    /// `GET /health` requests received.
    health_checks: AtomicU64,
    /// TCP connections accepted.
    connections: AtomicU64,
    /// Non-health requests currently being handled.
    inflight: AtomicU64,
    /// Highest `inflight` seen since start or the last reset.
    peak_inflight: AtomicU64,
    /// Status for normal requests.
    status: AtomicU16,
    /// Delay before answering normal requests, in milliseconds.
    stall_ms: AtomicU64,
    /// Whether `/health` answers 200.
    healthy: AtomicBool,
    /// Every k-th normal request answers 500; 0 disables.
    fail_every: AtomicU64,
    /// Every non-health request, in arrival order.
    recorded: Mutex<Vec<Recorded>>,
    /// Whether requests are recorded (a flood of many would fill memory).
    recording: AtomicBool,
    /// Extra headers on normal responses.
    extra_headers: Mutex<Vec<(String, String)>>,
    /// Bytes of padding in normal responses' JSON (`"pad"`).
    padding: AtomicU64,
}

/// Decrements `inflight` when a handler finishes or is dropped mid-request.
struct InflightGuard(Arc<State>);

impl Drop for InflightGuard {
    /// Releases the in-flight slot.
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A scriptable HTTP/1.1 server on `127.0.0.1:0`, on its own runtime thread.
pub struct Upstream {
    /// The bound listen address.
    addr: SocketAddr,
    /// Shared counters and knobs.
    state: Arc<State>,
    /// Sends `true` to stop the accept loop and every connection.
    shutdown: watch::Sender<bool>,
    /// The thread owning the runtime, `None` once stopped.
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds `127.0.0.1:0` and serves in a background thread until stopped.
    pub fn start() -> Upstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream listener");
        listener
            .set_nonblocking(true)
            .expect("set upstream listener non-blocking");
        let addr = listener.local_addr().expect("upstream local addr");
        let state = Arc::new(State {
            requests: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            peak_inflight: AtomicU64::new(0),
            status: AtomicU16::new(200),
            stall_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            fail_every: AtomicU64::new(0),
            recorded: Mutex::new(Vec::new()),
            recording: AtomicBool::new(true),
            extra_headers: Mutex::new(Vec::new()),
            padding: AtomicU64::new(0),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{addr}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build upstream runtime");
                rt.block_on(serve(listener, addr, thread_state, shutdown_rx));
                // Dropping the runtime cancels any task that is still alive.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn upstream thread");
        Upstream {
            addr,
            state,
            shutdown,
            thread: Some(thread),
        }
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Non-health requests received since start or the last reset.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// `GET /health` requests received since start or the last reset.
    pub fn health_checks(&self) -> u64 {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since start or the last reset.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Non-health requests being handled right now.
    pub fn inflight(&self) -> u64 {
        self.state.inflight.load(Ordering::SeqCst)
    }

    /// Highest concurrent non-health requests since start or the last reset.
    pub fn peak_inflight(&self) -> u64 {
        self.state.peak_inflight.load(Ordering::SeqCst)
    }

    /// Zeroes counters and recordings (peak restarts from the current in-flight count).
    pub fn reset_counters(&self) {
        self.state.requests.store(0, Ordering::SeqCst);
        self.state.health_checks.store(0, Ordering::SeqCst);
        self.state.connections.store(0, Ordering::SeqCst);
        self.state
            .peak_inflight
            .store(self.inflight(), Ordering::SeqCst);
        self.state.recorded.lock().expect("recorded lock").clear();
    }

    /// Every non-health request received since start or the last reset.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.recorded.lock().expect("recorded lock").clone()
    }

    /// The most recent non-health request, if any.
    pub fn last(&self) -> Option<Recorded> {
        self.state
            .recorded
            .lock()
            .expect("recorded lock")
            .last()
            .cloned()
    }

    /// Sets the status of normal (non-health) responses; default 200.
    pub fn set_status(&self, status: u16) {
        assert!(
            StatusCode::from_u16(status).is_ok(),
            "invalid status {status}"
        );
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Sets a delay before each normal response is sent; zero disables.
    pub fn set_stall(&self, stall: Duration) {
        let ms = u64::try_from(stall.as_millis()).expect("stall fits in u64 milliseconds");
        self.state.stall_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes `GET /health` answer 200 `ok` (true) or 503 (false).
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Makes every k-th normal request (by request number) answer 500; 0 disables.
    pub fn set_fail_every(&self, k: u64) {
        self.state.fail_every.store(k, Ordering::SeqCst);
    }

    /// Adds these headers to every normal response (replacing the last
    /// set); `{n}` in a value becomes the request number.
    pub fn set_response_headers(&self, headers: &[(&str, &str)]) {
        *self.state.extra_headers.lock().expect("headers lock") = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Pads every normal response's JSON with `bytes` characters (`"pad"`).
    pub fn set_padding(&self, bytes: u64) {
        self.state.padding.store(bytes, Ordering::SeqCst);
    }

    /// Stops (false) or resumes recording requests; counting goes on.
    pub fn set_recording(&self, on: bool) {
        self.state.recording.store(on, Ordering::SeqCst);
    }

    /// Closes the listener and drops every connection; later connects are refused.
    pub fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                panic!("upstream {} thread panicked", self.addr);
            }
        }
    }
}

impl Drop for Upstream {
    /// Stops the server (without re-panicking while already unwinding).
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Resolves once shutdown is requested (or the `Upstream` is gone).
async fn shutdown_requested(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The accept loop: one task per connection, all ending on shutdown.
async fn serve(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    state: Arc<State>,
    shutdown_rx: watch::Receiver<bool>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("register upstream listener");
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown_requested(shutdown_rx.clone()) => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            // Transient accept errors (e.g. EMFILE): back off briefly and go on.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        let conn_state = state.clone();
        let conn_shutdown = shutdown_rx.clone();
        tasks.spawn(async move {
            let service = service_fn(move |req| handle(req, addr, conn_state.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                // A backend finishes an order it got whole even when the
                // gateway's connection closes right after it (as PHP with
                // ignore_user_abort or a Java servlet does): what the
                // gateway keeps held for such an order must show here.
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shutdown_requested(conn_shutdown) => {}
            }
        });
        // Reap finished connection tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    // Every connection task sees the same shutdown signal; wait for them briefly.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
}

/// Answers `/health` from the health knob and everything else with a JSON echo.
async fn handle(
    req: Request<Incoming>,
    addr: SocketAddr,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == hyper::Method::GET && req.uri().path() == "/health" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        let (status, body) = if state.healthy.load(Ordering::SeqCst) {
            (StatusCode::OK, "ok")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
        };
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "text/plain")
            .header("x-upstream", addr.to_string())
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("build health response"));
    }

    let now = state.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InflightGuard(state.clone());
    state.peak_inflight.fetch_max(now, Ordering::SeqCst);
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;

    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(e) => {
            return Ok(Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(Full::new(Bytes::from(format!("body error: {e}"))))
                .expect("build error response"))
        }
    };
    let uri = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| parts.uri.to_string());
    let record = Recorded {
        method: parts.method.to_string(),
        uri: uri.clone(),
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
        body: body.clone(),
    };
    if state.recording.load(Ordering::SeqCst) {
        state.recorded.lock().expect("recorded lock").push(record);
    }

    let stall = state.stall_ms.load(Ordering::SeqCst);
    if stall > 0 {
        tokio::time::sleep(Duration::from_millis(stall)).await;
    }

    let fail_every = state.fail_every.load(Ordering::SeqCst);
    let status = if fail_every > 0 && n % fail_every == 0 {
        500
    } else {
        state.status.load(Ordering::SeqCst)
    };
    let pad = state.padding.load(Ordering::SeqCst) as usize;
    let mut json = serde_json::json!({
        "upstream": addr.to_string(),
        "method": parts.method.as_str(),
        "uri": uri,
        "body": String::from_utf8_lossy(&body),
        "n": n,
    });
    if pad > 0 {
        json["pad"] = serde_json::Value::String("x".repeat(pad));
    }
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-upstream", addr.to_string());
    for (k, v) in state.extra_headers.lock().expect("headers lock").iter() {
        builder = builder.header(k.as_str(), v.replace("{n}", &n.to_string()));
    }
    Ok(builder
        .body(Full::new(Bytes::from(json.to_string())))
        .expect("build upstream response"))
}
