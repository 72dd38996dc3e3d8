//! The fast lane: a request to a flash-sale rule judged straight from the
//! bytes the connection gate read, before pingora builds a session for it.
//! When the gateway answers it itself (sold out, rate limited, ended, a
//! duplicate, invalid, ...), the lane writes the same answer the proxy
//! would, counts it and logs it; a winner with a slot free at once is
//! relayed (`relay`); one that must wait (or a capped pass) goes on to
//! pingora with its verdict handed over through a task-local, so admission
//! runs once per request and the hold keeps one owner. A bodiless GET
//! that no rule and no read-cache rule matches (a product page, an image)
//! is relayed to the upstream its route picks, as pingora's path would
//! forward it.
//!
//! Why: nearly all of a sale's crowd is refused, and pingora's session
//! (head parse into its own types, the proxy phases, the response writer)
//! cost more than all of the gateway's own work on such a request
//! (BENCHMARKS.md); on a pass-through GET it was most of the cost. The
//! lane takes only what it reads exactly as pingora would: HTTP/1.1 in
//! origin form, not HEAD or CONNECT, one `Host` without userinfo, at most
//! one all-digit `Content-Length` with the whole body already read (none
//! on a pass-through GET), no `Transfer-Encoding`, `Expect` or `Upgrade`,
//! at most one `Connection` line, `keep-alive` or `close`, within the size
//! limits, to a rule's route or a pass-through route.
//! Everything else (polls, read-cache routes, other methods, refused
//! spellings, a body still on its way, a shutdown) goes to pingora
//! untouched, bytes and all.

use std::cell::RefCell;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use arc_swap::ArcSwap;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Uri};

use super::access::logged_header;
use super::intake::{STOCK_PATH, TICKETS_PATH};
use super::relay::{Order, Relay, Seen as Logged};
use super::respond::wire_answer;
use crate::access_log::{clip_path, AccessLog, Entry};
use crate::admission::extract::{Attempt, RequestParts};
use crate::admission::RuleTable;
use crate::admission::{Admission, Candidate, RuleStage, Verdict};
use crate::backend::exchange::{self, Connector};
use crate::backend::{self, forwarded, ClientHop};
use crate::cache::ReadCache;
use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::routes::Routes;
use crate::rules::{Route, RuleMatch};
use crate::upstream::Upstreams;

/// Header fields the lane parses; a head with more goes to pingora.
const MAX_FIELDS: usize = 64;

/// What the lane made of the request at the front of the gate's buffer.
pub enum Step {
    /// Not the lane's: pingora serves it from the same bytes.
    Pass,
    /// Answered: write `response`, drop the request's `used` bytes from
    /// the buffer (what follows is the next request), and close the
    /// connection after writing when `close`.
    Answered {
        /// The whole HTTP/1.1 response.
        response: Vec<u8>,
        /// The request's head and body length.
        used: usize,
        /// The client asked for `Connection: close`.
        close: bool,
    },
    /// A verdict that forwards: pingora serves the request with it (boxed:
    /// the gate's connection future keeps no room for it while idle).
    Forward(Box<Preset>),
    /// A winner with a slot free at once: sent and answered by the relay
    /// (`FastLane::relay`), without a pingora session.
    Relay(Box<Relay>),
}

/// A verdict the lane reached for a request that pingora now forwards.
pub struct Preset {
    /// The stage it was judged under.
    pub(super) stage: Arc<RuleStage>,
    /// The rule's own spelling of its path, as the lane matched it.
    pub(super) path: String,
    /// The verdict: a hold to forward, or a capped pass.
    pub(super) verdict: Verdict,
    /// Who and what it was for.
    pub(super) attempt: Option<Attempt>,
}

tokio::task_local! {
    static PRESET: RefCell<Option<Preset>>;
}

/// Runs pingora's session of the request the lane judged, with its
/// verdict for `request_filter` to take; a verdict left untaken (the
/// session failed first) is dropped with the scope, which releases a hold.
pub async fn with_preset<F: Future>(preset: Box<Preset>, session: F) -> F::Output {
    PRESET.scope(RefCell::new(Some(*preset)), session).await
}

/// Hands a verdict that forwards to pingora's session.
fn forward(
    stage: Arc<RuleStage>,
    path: String,
    verdict: Verdict,
    attempt: Option<Attempt>,
) -> Step {
    Step::Forward(Box::new(Preset {
        stage,
        path,
        verdict,
        attempt,
    }))
}

/// The lane's judgement of this request, if it made one, taken whole:
/// the request is served under the stage and route it was judged by,
/// whatever a reload did since (requests under way finish with the rules
/// they started with), and is neither matched nor judged again.
pub(super) fn take_preset() -> Option<Preset> {
    PRESET.try_with(|p| p.borrow_mut().take()).ok().flatten()
}

/// Whether a GET of `path` is a ticket or stock poll, which pingora's
/// path answers (`intake`).
fn is_poll(path: &str) -> bool {
    path.starts_with(TICKETS_PATH) || path.starts_with(STOCK_PATH)
}

/// A request line the lane takes, parsed from the gate's buffer, with the
/// head's header fields still raw.
struct Line<'b> {
    method: Method,
    uri: Uri,
    /// Bytes of the whole head at the front of the buffer.
    head_len: usize,
    fields: &'b [httparse::Header<'b>],
}

/// The header fields of a head the lane takes.
#[derive(Debug)]
struct Fields {
    headers: HeaderMap,
    /// Bytes of the body after the head.
    body_len: usize,
    /// `Connection: close`.
    close: bool,
}

/// An all-digit `Content-Length` (what every parser reads alike).
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The first token of the head at the front of `buf` (the method, as
/// httparse reads it: after any empty lines, up to a space), if the buffer
/// holds a space to end it.
fn first_token(buf: &[u8]) -> Option<&[u8]> {
    let start = buf.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
    let rest = &buf[start..];
    rest.iter().position(|b| *b == b' ').map(|end| &rest[..end])
}

/// The request line of the whole head at the front of `buf`, if it is
/// HTTP/1.1 in origin form; the fields are parsed into `slots`.
fn request_line<'b>(buf: &'b [u8], slots: &'b mut [httparse::Header<'b>]) -> Option<Line<'b>> {
    let mut req = httparse::Request::new(slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    if req.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let target = req.path?;
    if !target.starts_with('/') {
        return None;
    }
    Some(Line {
        method,
        uri: Uri::try_from(target).ok()?,
        head_len,
        fields: req.headers,
    })
}

/// The header fields of `line`, if the lane takes them (see the module
/// doc) and the whole body follows the head in `buf`; `None` hands the
/// request to pingora.
fn fields(line: &Line<'_>, buf: &[u8], limits: &Limits) -> Option<Fields> {
    let mut headers = HeaderMap::with_capacity(line.fields.len());
    let (mut header_bytes, mut length, mut close) = (0u64, None, false);
    let (mut hosts, mut connections) = (0, 0);
    for field in line.fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = field.value;
        // As `limits.max_header_bytes` counts them: name, ": ", value, CRLF.
        header_bytes += (name.as_str().len() + value.len() + 4) as u64;
        if name == header::TRANSFER_ENCODING || name == header::EXPECT || name == header::UPGRADE {
            return None;
        } else if name == header::CONTENT_LENGTH {
            if length.is_some() {
                return None;
            }
            length = Some(digits(value)?);
        } else if name == header::CONNECTION {
            // pingora reads the first of several; the lane takes one only.
            if connections > 0 {
                return None;
            }
            connections += 1;
            if value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !value.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if name == header::HOST {
            // pingora refuses userinfo in Host (400, close).
            if value.contains(&b'@') {
                return None;
            }
            hosts += 1;
        }
        headers.append(name, HeaderValue::from_bytes(value).ok()?);
    }
    let body_len = length.unwrap_or(0);
    if hosts != 1
        || header_bytes > limits.max_header_bytes
        || body_len > limits.max_body_bytes.min(limits.max_rule_body_bytes)
    {
        return None;
    }
    let body_len = usize::try_from(body_len).ok()?;
    if buf.len() - line.head_len < body_len {
        return None;
    }
    Some(Fields {
        headers,
        body_len,
        close,
    })
}

/// What the lane read of a request it takes, owned: the parse's header
/// slots (2 KiB) are not kept across the store's round trip, in the
/// future the gate boxes per request.
struct Seen<'r> {
    method: Method,
    uri: Uri,
    head_len: usize,
    head: Fields,
    rule: RuleMatch<'r>,
    stage: Arc<RuleStage>,
    client_ip: IpAddr,
}

/// The lane: the parts of the proxy a refusal and a relay need.
pub struct FastLane {
    config: Arc<ArcSwap<Config>>,
    pub(super) metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    pub(super) access_log: Option<AccessLog>,
    pub(super) upstreams: Arc<Upstreams>,
    /// Pass-through routes, and the read cache whose routes stay
    /// pingora's.
    routes: Arc<Routes>,
    cache: Arc<ReadCache>,
    /// The relay's client connections to the backends, pooled.
    pub(super) connector: Connector,
}

impl FastLane {
    /// A lane over the proxy's config, metrics, pipeline, access log,
    /// upstream pools, pass-through routes and read cache.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        admission: Arc<Admission>,
        access_log: Option<AccessLog>,
        (upstreams, routes, cache): (Arc<Upstreams>, Arc<Routes>, Arc<ReadCache>),
    ) -> Self {
        let connector = exchange::connector(&upstreams);
        Self {
            config,
            metrics,
            admission,
            access_log,
            upstreams,
            routes,
            cache,
            connector,
        }
    }

    /// The request at the front of `buf`, if the lane takes it: HTTP/1.1
    /// to a rule's route (matched in `rules`), fields as pingora reads
    /// them, whole body in `buf` (the module doc).
    fn read<'r>(&self, buf: &[u8], rules: &'r RuleTable, peer: Option<IpAddr>) -> Option<Seen<'r>> {
        // A method no rule has is pingora's (or `through`'s): not worth
        // parsing the head for. Anything unclear is parsed in full.
        if first_token(buf).is_some_and(|m| !rules.has_method(m)) {
            return None;
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let line = request_line(buf, &mut slots)?;
        let path = line.uri.path();
        // HEAD answers carry no body and CONNECT is refused before any
        // hook: pingora's to write.
        if line.method == Method::HEAD
            || line.method == Method::CONNECT
            || (line.method == Method::GET && is_poll(path))
        {
            return None;
        }
        let Route::Rule(rule) = rules.find(&line.method, path) else {
            return None;
        };
        let stage = rules.stage(rule.index)?.clone();
        let config = self.config.load();
        let head = fields(&line, buf, &config.limits)?;
        let client_ip = forwarded::client_ip_of(peer, &head.headers, &config.trusted_proxies);
        Some(Seen {
            method: line.method,
            uri: line.uri,
            head_len: line.head_len,
            head,
            rule,
            stage,
            client_ip,
        })
    }

    /// The request at the front of `buf` as a relay, if it is a plain
    /// pass-through GET: HTTP/1.1 without a body, fields as pingora reads
    /// them (the module doc), to a route no rule and no read-cache rule
    /// matches; sent as it came (less the hop-by-hop fields and
    /// `X-Sluice-*`, with `X-Forwarded-For` and `-Proto`) to the upstream
    /// its route picks, as pingora's path would forward it. Decided
    /// without waiting for anything, so the gate needs no judgement future
    /// for it. A GET with a body, or one the relay cannot present, is
    /// pingora's.
    pub fn through(&self, buf: &[u8], peer: Option<IpAddr>) -> Option<Box<Relay>> {
        if first_token(buf)? != b"GET" {
            return None;
        }
        let started = Instant::now();
        let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let line = request_line(buf, &mut slots)?;
        let path = line.uri.path();
        if is_poll(path)
            || !matches!(self.admission.rules().find(&line.method, path), Route::Unmatched)
            // A read-cache route is the cache's to serve (pingora's path).
            || self.cache.covers(path)
        {
            return None;
        }
        let config = self.config.load();
        let head = fields(&line, buf, &config.limits)?;
        if head.body_len > 0 {
            return None;
        }
        let host = head.headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let upstream = self.routes.table().upstream_for(host, path);
        let client_ip = forwarded::client_ip_of(peer, &head.headers, &config.trusted_proxies);
        let seen = Logged::of(
            client_ip,
            &line.method,
            path,
            &head.headers,
            self.access_log.is_some(),
        );
        let from = ClientHop {
            peer,
            trusted: &config.trusted_proxies,
            tls: false,
        };
        let request = backend::relayed(
            line.method,
            path,
            line.uri.query(),
            head.headers,
            0,
            from,
            None,
        )
        .ok()?;
        Some(Box::new(Relay {
            order: None,
            upstream,
            request,
            body: Bytes::new(),
            used: line.head_len,
            close: head.close,
            started,
            seen,
        }))
    }

    /// Judges the request at the front of `buf` (a complete head, as the
    /// gate found it) from a client at `peer`.
    pub async fn step(&self, buf: &[u8], peer: Option<IpAddr>) -> Step {
        let started = Instant::now();
        // The route first: pass-through traffic pays for no more parsing.
        let rules = self.admission.rules();
        let Some(seen) = self.read(buf, &rules, peer) else {
            return Step::Pass;
        };
        let (rule, stage) = (seen.rule, seen.stage);
        let (head, client_ip) = (seen.head, seen.client_ip);
        let path = seen.uri.path();
        let captures: Vec<(&str, &str)> = rule
            .captures
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        let body = buf.get(seen.head_len..seen.head_len + head.body_len);
        let candidate = Candidate {
            parts: RequestParts {
                headers: &head.headers,
                query: seen.uri.query(),
                captures: &captures,
                body,
            },
            client_ip,
        };
        let (verdict, attempt) = self.admission.admit_seen(&stage, &candidate).await;
        let answer = match verdict {
            Verdict::Answer(answer) => answer,
            Verdict::Forward(hold) => {
                let stage_upstream = stage.rule.upstream;
                let pool = self.upstreams.pool(stage_upstream);
                let Some(slot) = pool.slots.acquire_within(Duration::ZERO).await else {
                    return forward(stage, rule.path, Verdict::Forward(hold), attempt);
                };
                let from = ClientHop {
                    peer,
                    trusted: &self.config.load().trusted_proxies,
                    tls: false,
                };
                let mut logged = Logged::of(
                    client_ip,
                    &seen.method,
                    path,
                    &head.headers,
                    self.access_log.is_some(),
                );
                let body = Bytes::copy_from_slice(body.unwrap_or_default());
                let request = backend::relayed(
                    seen.method,
                    &rule.path,
                    seen.uri.query(),
                    head.headers,
                    body.len(),
                    from,
                    Some(hold.ticket_headers()),
                );
                let Ok(request) = request else {
                    // Not presentable here (a rule name that is no header
                    // value): pingora's path, with the same verdict.
                    drop(slot);
                    return forward(stage, rule.path, Verdict::Forward(hold), attempt);
                };
                if let Some(a) = attempt {
                    (logged.user, logged.sku) = (Some(a.user), Some(a.sku));
                }
                return Step::Relay(Box::new(Relay {
                    order: Some(Order { stage, hold, slot }),
                    upstream: stage_upstream,
                    request,
                    body,
                    used: seen.head_len + head.body_len,
                    close: head.close,
                    started,
                    seen: logged,
                }));
            }
            verdict => return forward(stage, rule.path, verdict, attempt),
        };
        let rendered = Admission::render(Some(&stage), &answer);
        let response = wire_answer(&rendered, !head.close);
        let elapsed = started.elapsed();
        tracing::debug!(
            rule = &*stage.rule.name,
            outcome = rendered.outcome.as_str(),
            status = rendered.status.as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "decision"
        );
        self.metrics
            .observe_request(Some(&stage.rule.name), rendered.outcome, elapsed);
        if let Some(log) = &self.access_log {
            let (user, sku) = attempt.map(|a| (a.user, a.sku)).unzip();
            log.send(Entry {
                time: SystemTime::now(),
                client_ip,
                method: seen.method,
                path: clip_path(path),
                version: http::Version::HTTP_11,
                status: rendered.status.as_u16(),
                bytes: rendered.body.len() as u64,
                referer: logged_header(&head.headers, header::REFERER),
                user_agent: logged_header(&head.headers, header::USER_AGENT),
                outcome: rendered.outcome,
                rule: Some(stage.rule.name.clone()),
                sku,
                user,
                ticket: None,
                upstream: None,
                upstream_time: None,
                total_time: elapsed,
            });
        }
        Step::Answered {
            response,
            used: seen.head_len + head.body_len,
            close: head.close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 200,
            max_body_bytes: 100,
            max_rule_body_bytes: 50,
            max_connections: None,
            header_timeout: std::time::Duration::from_secs(1),
            keepalive_timeout: std::time::Duration::from_secs(1),
        }
    }

    /// What the lane makes of `raw` under `limits`: `(head_len, body_len, close)`.
    fn taken_under(raw: &str, limits: &Limits) -> Option<(usize, usize, bool)> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let line = request_line(raw.as_bytes(), &mut slots)?;
        let f = fields(&line, raw.as_bytes(), limits)?;
        Some((line.head_len, f.body_len, f.close))
    }

    fn taken(raw: &str) -> Option<(usize, usize, bool)> {
        taken_under(raw, &limits())
    }

    #[test]
    fn takes_plain_http11_requests_with_their_whole_body() {
        let order = "POST /buy/1 HTTP/1.1\r\nHost: shop\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(taken(order), Some((order.len() - 2, 2, false)));
        let pipelined = format!("{order}GET / HTTP/1.1\r\n");
        assert_eq!(taken(&pipelined), Some((order.len() - 2, 2, false)));
        let bare = "POST /buy/1 HTTP/1.1\r\nHost: shop\r\n\r\n";
        assert_eq!(taken(bare), Some((bare.len(), 0, false)));
        let closing = "POST /b HTTP/1.1\r\nHost: s\r\nConnection: Close\r\n\r\n";
        assert_eq!(taken(closing), Some((closing.len(), 0, true)));
        let kept = "POST /b HTTP/1.1\r\nHost: s\r\nconnection: keep-alive\r\n\r\n";
        assert_eq!(taken(kept), Some((kept.len(), 0, false)));
    }

    #[test]
    fn leaves_to_pingora_what_it_might_read_differently() {
        for raw in [
            // the body is still on its way
            "POST /b HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n\r\nhi",
            // framing other than one plain length
            "POST /b HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
            "POST /b HTTP/1.1\r\nHost: s\r\nContent-Length: +2\r\n\r\nhi",
            "POST /b HTTP/1.1\r\nHost: s\r\nContent-Length:  \r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            "GET /b HTTP/1.1\r\nHost: s\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: s\r\nConnection: close, te\r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: s\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: u@s\r\n\r\n",
            // versions, target forms, Host
            "POST /b HTTP/1.0\r\nHost: s\r\n\r\n",
            "POST http://s/b HTTP/1.1\r\nHost: s\r\n\r\n",
            "POST * HTTP/1.1\r\nHost: s\r\n\r\n",
            "POST /b HTTP/1.1\r\n\r\n",
            "POST /b HTTP/1.1\r\nHost: s\r\nhost: t\r\n\r\n",
            // over the limits: pingora's path answers them
            "POST /b HTTP/1.1\r\nHost: s\r\nContent-Length: 51\r\n\r\n",
            // not a whole head, or not HTTP
            "POST /b HTTP/1.1\r\nHost: s\r\n",
            "POST /b HTTP/1.1\r\nHo st: s\r\n\r\n",
        ] {
            assert_eq!(taken(raw), None, "{raw:?}");
        }
        let long = format!(
            "POST /b HTTP/1.1\r\nHost: s\r\nX: {}\r\n\r\n",
            "v".repeat(200)
        );
        assert_eq!(taken(&long), None);
        let many: String = (0..MAX_FIELDS).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("POST /b HTTP/1.1\r\nHost: s\r\n{many}\r\n");
        let roomy = Limits {
            max_header_bytes: 1 << 20,
            ..limits()
        };
        assert_eq!(taken_under(&many, &roomy), None);
    }

    #[test]
    fn the_first_token_is_the_method_httparse_reads() {
        for raw in [
            "POST /b HTTP/1.1\r\nHost: s\r\n\r\n",
            "\r\n\r\nGET / HTTP/1.1\r\nHost: s\r\n\r\n",
            "\nPURGE /x HTTP/1.1\r\nHost: s\r\n\r\n",
            "post /b HTTP/1.1\r\nHost: s\r\n\r\n",
        ] {
            let mut slots = [httparse::EMPTY_HEADER; 4];
            let mut req = httparse::Request::new(&mut slots);
            assert!(
                req.parse(raw.as_bytes()).is_ok_and(|s| s.is_complete()),
                "{raw:?}"
            );
            assert_eq!(
                first_token(raw.as_bytes()),
                req.method.map(str::as_bytes),
                "{raw:?}"
            );
        }
        // What httparse refuses has no method a rule could have.
        assert_eq!(first_token(b" POST /b HTTP/1.1\r\n\r\n"), Some(&b""[..]));
        assert_eq!(first_token(b"POST"), None);
        assert_eq!(first_token(b"\r\n"), None);
    }

    #[test]
    fn digits_only_lengths() {
        assert_eq!(digits(b"0"), Some(0));
        assert_eq!(digits(b"1234"), Some(1234));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1 ",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(digits(bad), None, "{bad:?}");
        }
    }
}
