//! The crowd of a sale: buyers who all click "order" within the first
//! second (and click again when they see an error), and people who only
//! look at the product page while the sale runs. Both arrive on a fixed
//! schedule, not as a fixed number of busy connections, so a slow server
//! cannot slow the crowd down. Every answer is recorded with its latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a buyer's app waits for an answer before showing an error.
const BUYER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a browsing person waits for a page before giving up.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a buyer who saw an error takes to click again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Upper bound on page views of one sale, so browsing ends even if the
/// buyers never do.
const MAX_VIEWS: u64 = 100_000;

/// What one request came to, as the person saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// An order number (the mall placed the order).
    Bought,
    /// "Queued": Sluice holds the order and sends it when the mall frees up.
    Queued,
    /// "Sold out", from the mall or from Sluice.
    SoldOut,
    /// Another refusal: already bought, duplicate, slow down.
    Refused,
    /// A page that loaded.
    Page,
    /// An error page (5xx) or a broken connection.
    Error,
    /// Nothing within the app's timeout.
    Timeout,
}

/// One answer.
pub struct Answer {
    /// What the person saw.
    pub seen: Seen,
    /// Time from send to the end of the answer (or to the timeout).
    pub latency: Duration,
}

/// Every answer of one crowd.
#[derive(Default)]
pub struct Tally {
    /// The answers, in no particular order.
    pub answers: Vec<Answer>,
}

impl Tally {
    /// Answers that were `seen`.
    pub fn count(&self, seen: Seen) -> usize {
        self.answers.iter().filter(|a| a.seen == seen).count()
    }

    /// The latency at quantile `q` (0.0-1.0) over all answers.
    pub fn latency(&self, q: f64) -> Duration {
        self.latency_of(q, |_| true)
    }

    /// The latency at quantile `q` over the answers whose `seen` passes.
    pub fn latency_of(&self, q: f64, pick: impl Fn(Seen) -> bool) -> Duration {
        let mut all: Vec<Duration> = self
            .answers
            .iter()
            .filter(|a| pick(a.seen))
            .map(|a| a.latency)
            .collect();
        all.sort();
        let i = ((all.len() as f64 - 1.0) * q).round() as usize;
        all.get(i).copied().unwrap_or_default()
    }
}

/// `buyers` people each click "order" once for `sku` at `target`, their
/// first clicks spread evenly over `ramp` (everyone is waiting for the
/// sale to open), each on their own connection; a buyer who sees an error
/// or a timeout clicks again after [`RETRY_PAUSE`], at most `retries`
/// times.
pub async fn buy(
    target: SocketAddr,
    sku: &str,
    buyers: u64,
    ramp: Duration,
    retries: u32,
) -> Tally {
    let path = format!("/api/seckill/{sku}/order");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..buyers {
        let path = path.clone();
        // Evenly spread, so every run has the same arrival pattern.
        let at = started + ramp.mul_f64(id as f64 / buyers.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let user = format!("buyer-{id}");
            let mut answers = Vec::new();
            let mut conn = None;
            for attempt in 0..=retries {
                if attempt > 0 {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                let answer = send(&mut conn, target, "POST", &path, &user, BUYER_TIMEOUT).await;
                let again = matches!(answer.seen, Seen::Error | Seen::Timeout);
                answers.push(answer);
                if !again {
                    break;
                }
            }
            answers
        }));
    }
    let mut tally = Tally::default();
    for t in tasks {
        if let Ok(mut a) = t.await {
            tally.answers.append(&mut a);
        }
    }
    tally
}

/// Product-page views of `sku` at `target`, `per_second` of them evenly
/// spaced, each by another person on their own connection, until `stop` is
/// set. Views arrive on schedule whether or not earlier ones came back, so
/// every moment of the sale is sampled alike.
pub fn browse(
    target: SocketAddr,
    sku: &str,
    per_second: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Tally> {
    let path = format!("/api/goods/{sku}");
    tokio::spawn(async move {
        let mut views = Vec::new();
        let every = Duration::from_secs(1).checked_div(per_second.max(1) as u32);
        let mut tick = tokio::time::interval(every.unwrap_or(Duration::from_secs(1)));
        for n in 0..MAX_VIEWS {
            tick.tick().await;
            if stop.load(Ordering::Relaxed) || per_second == 0 {
                break;
            }
            let path = path.clone();
            views.push(tokio::spawn(async move {
                let mut conn = None;
                let user = format!("browser-{n}");
                send(&mut conn, target, "GET", &path, &user, BROWSER_TIMEOUT).await
            }));
        }
        let mut tally = Tally::default();
        for v in views {
            if let Ok(a) = v.await {
                tally.answers.push(a);
            }
        }
        tally
    })
}

type Sender = http1::SendRequest<Full<Bytes>>;

/// One request on the person's keep-alive connection (opened when there is
/// none); a failed or timed-out exchange drops the connection, as a browser
/// or an app would.
async fn send(
    conn: &mut Option<Sender>,
    target: SocketAddr,
    method: &str,
    path: &str,
    user: &str,
    timeout: Duration,
) -> Answer {
    let t0 = Instant::now();
    let seen = match tokio::time::timeout(timeout, exchange(conn, target, method, path, user)).await
    {
        Ok(Ok(seen)) => seen,
        Ok(Err(_)) => {
            *conn = None;
            Seen::Error
        }
        Err(_) => {
            *conn = None;
            Seen::Timeout
        }
    };
    Answer {
        seen,
        latency: t0.elapsed(),
    }
}

async fn exchange(
    conn: &mut Option<Sender>,
    target: SocketAddr,
    method: &str,
    path: &str,
    user: &str,
) -> Result<Seen, String> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        let stream = TcpStream::connect(target)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        *conn = Some(sender);
    }
    let sender = conn.as_mut().ok_or("no connection")?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let body = if method == "POST" {
        Bytes::from_static(br#"{"qty":1}"#)
    } else {
        Bytes::new()
    };
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", target.to_string())
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let outcome = resp
        .headers()
        .get("x-sluice-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["code"].as_i64());
    Ok(classify(method, status, &outcome, code))
}

/// What a person makes of an answer: the status, Sluice's outcome header
/// (absent straight at the mall) and the mall's own `code`.
fn classify(method: &str, status: u16, outcome: &str, code: Option<i64>) -> Seen {
    match (status, outcome, code) {
        (500..=599, _, _) | (0..=199, _, _) => Seen::Error,
        (202, "queued", _) => Seen::Queued,
        (_, "sold_out", _) | (200, _, Some(1001)) => Seen::SoldOut,
        (200, _, Some(0)) if method == "GET" => Seen::Page,
        (200, _, Some(0)) => Seen::Bought,
        _ => Seen::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_a_person_would() {
        assert_eq!(classify("POST", 200, "", Some(0)), Seen::Bought);
        assert_eq!(classify("POST", 200, "forwarded", Some(0)), Seen::Bought);
        assert_eq!(classify("POST", 200, "", Some(1001)), Seen::SoldOut);
        assert_eq!(classify("POST", 410, "sold_out", None), Seen::SoldOut);
        assert_eq!(classify("POST", 202, "queued", None), Seen::Queued);
        assert_eq!(classify("POST", 503, "", Some(503)), Seen::Error);
        assert_eq!(classify("POST", 503, "unavailable", None), Seen::Error);
        assert_eq!(classify("POST", 429, "rate_limited", None), Seen::Refused);
        assert_eq!(classify("POST", 200, "", Some(1002)), Seen::Refused);
        assert_eq!(classify("GET", 200, "passthrough", Some(0)), Seen::Page);
    }
}
