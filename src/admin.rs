//! The admin listener: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process is up), `GET /readyz` (the store answers and at least one
//! upstream server is healthy), and the admin API under `/admin/v1/`:
//! stock (`PUT`/`GET /admin/v1/stock/{rule}/{sku}`) and releases
//! (`POST /admin/v1/release`), reloads (`POST /admin/v1/reload`), purges
//! of the read cache (`DELETE /admin/v1/cache?prefix=/api/goods/`) and
//! the effective config, redacted (`GET /admin/v1/config`). Everything under `/admin/` needs
//! `Authorization: Bearer <token>` when `admin.token_env` names a set
//! variable.
//!
//! It runs on its own listener (loopback by default) so that scraping,
//! probes and operators never compete with shoppers. What a scrape reads
//! from elsewhere first is in `scrape`.

pub mod scrape;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::admission::Admission;
use crate::cache::ReadCache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::reload::{ReloadError, Reloader};
use crate::store::StoreError;
use crate::upstream::Upstreams;
use crate::vocab::valid_id;
use crate::vocab::{SkuKey, TicketId};

/// Admin request bodies are tiny JSON objects.
const MAX_ADMIN_BODY: usize = 64 << 10;

/// Units one restock may set: a flash sale's stock, with room to spare,
/// bounded so one request cannot build a giant Redis list.
const MAX_RESTOCK: u64 = 10_000_000;

/// `/readyz` and a scrape wait this long for the store at most.
const READY_STORE_TIMEOUT: Duration = Duration::from_secs(1);

/// The admin HTTP app.
pub struct AdminApp {
    config: Arc<ArcSwap<Config>>,
    metrics: Arc<Metrics>,
    upstreams: Arc<Upstreams>,
    admission: Arc<Admission>,
    reloader: Arc<Reloader>,
    cache: Arc<ReadCache>,
    token: Option<Vec<u8>>,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

fn json_reply(status: StatusCode, value: &Value) -> Response<Vec<u8>> {
    reply(status, "application/json", value.to_string().into_bytes())
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Vec<u8>> {
    json_reply(status, &json!({"error": message.into()}))
}

fn store_error(e: &StoreError) -> Response<Vec<u8>> {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

impl AdminApp {
    /// An admin app; the token is read once from `token_env` if it is set.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        metrics: Arc<Metrics>,
        upstreams: Arc<Upstreams>,
        admission: Arc<Admission>,
        reloader: Arc<Reloader>,
        cache: Arc<ReadCache>,
        token_env: Option<&str>,
    ) -> Self {
        let token = token_env.and_then(|name| match std::env::var(name) {
            Ok(t) if !t.is_empty() => Some(t.into_bytes()),
            _ => {
                tracing::warn!(
                    variable = name,
                    "admin token variable unset or empty: the admin API is open"
                );
                None
            }
        });
        Self {
            config,
            metrics,
            upstreams,
            admission,
            reloader,
            cache,
            token,
        }
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time, so the token cannot be guessed byte by byte.
        given.as_bytes().ct_eq(token).into()
    }

    async fn readiness(&self) -> Response<Vec<u8>> {
        let upstreams: Vec<_> = self
            .upstreams
            .pools()
            .iter()
            .map(|p| {
                json!({
                    "name": p.name(),
                    "servers": p.config().servers.len(),
                    "healthy": p.healthy_servers(),
                })
            })
            .collect();
        let store = tokio::time::timeout(READY_STORE_TIMEOUT, self.admission.store().ping()).await;
        let store_ok = matches!(store, Ok(Ok(())));
        let ready = store_ok && self.upstreams.any_healthy();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_reply(
            status,
            &json!({"ready": ready, "store": if store_ok { "ok" } else { "unreachable" }, "upstreams": upstreams}),
        )
    }

    async fn read_json(session: &mut ServerSession) -> Result<Value, Response<Vec<u8>>> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_ADMIN_BODY {
                        return Err(error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read body: {e}"),
                    ))
                }
            }
        }
        serde_json::from_slice(&body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")))
    }

    async fn stock(
        &self,
        session: &mut ServerSession,
        method: &Method,
        rule: &str,
        sku: &str,
    ) -> Response<Vec<u8>> {
        if self.admission.stage_named(rule).is_none() {
            return error(StatusCode::NOT_FOUND, format!("no rule named {rule:?}"));
        }
        if !valid_id(sku) {
            return error(
                StatusCode::BAD_REQUEST,
                "sku must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            );
        }
        let key = SkuKey::new(rule, sku);
        match *method {
            Method::GET => match self.admission.store().stock(&key).await {
                Ok(Some(view)) => {
                    self.metrics.set_stock_available(rule, sku, view.available);
                    json_reply(StatusCode::OK, &json!(view))
                }
                Ok(None) => error(StatusCode::NOT_FOUND, format!("{key} was never loaded")),
                Err(e) => store_error(&e),
            },
            Method::PUT => {
                let body = match Self::read_json(session).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                };
                let Some(available) = body
                    .get("available")
                    .and_then(Value::as_u64)
                    .filter(|n| *n <= MAX_RESTOCK)
                else {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("body must be {{\"available\": N}} with N a whole number from 0 to {MAX_RESTOCK}"),
                    );
                };
                match self.admission.restock(&key, available).await {
                    Ok(view) => json_reply(StatusCode::OK, &json!(view)),
                    // The change may have landed before the error (a reply
                    // lost to a timeout): say what the store holds now.
                    Err(e) => match self.admission.store().stock(&key).await {
                        Ok(Some(view)) if view.available == available => {
                            json_reply(StatusCode::OK, &json!(view))
                        }
                        Ok(view) => json_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &json!({"error": e.to_string(), "stock": view}),
                        ),
                        Err(_) => store_error(&e),
                    },
                }
            }
            _ => error(StatusCode::METHOD_NOT_ALLOWED, "use GET or PUT"),
        }
    }

    /// `DELETE /admin/v1/cache?prefix=/api/goods/`: the prefix as it is
    /// written in request paths (not decoded), `/` for everything.
    async fn purge(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let prefix = query
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix("prefix="));
        let Some(prefix) = prefix.filter(|p| p.starts_with('/')) else {
            return error(
                StatusCode::BAD_REQUEST,
                "give the path prefix to purge: ?prefix=/api/goods/ (or ?prefix=/ for everything)",
            );
        };
        match self.cache.purge(prefix).await {
            Ok(purged) => json_reply(StatusCode::OK, &json!({"prefix": prefix, "purged": purged})),
            // This node's memory is purged; the shared tier may not be.
            Err(e) => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": e.to_string(), "prefix": prefix}),
            ),
        }
    }

    async fn release(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let body = match Self::read_json(session).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let Some(ticket) = body
            .get("ticket")
            .and_then(Value::as_str)
            .and_then(TicketId::parse)
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "body must be {\"ticket\": \"<32 lowercase hex>\"}",
            );
        };
        match self.admission.release_ticket(ticket).await {
            Ok(Some(units)) => json_reply(
                StatusCode::OK,
                &json!({"ticket": ticket.to_string(), "released": units}),
            ),
            Ok(None) => error(StatusCode::NOT_FOUND, "unknown or expired ticket"),
            Err(e) => store_error(&e),
        }
    }
}

impl AdminApp {
    /// `POST /admin/v1/reload`: 200 with what changed, or 422 with every
    /// problem (the old config keeps serving).
    async fn reload(&self) -> Response<Vec<u8>> {
        let result = self.reloader.reload().await;
        Reloader::log(&result, "admin API");
        match result {
            Ok(reloaded) => json_reply(StatusCode::OK, &json!({"reloaded": reloaded})),
            Err(e) => {
                let kind = match e {
                    ReloadError::Invalid(_) => "invalid config",
                    ReloadError::NeedsRestart(_) => "needs a restart",
                    _ => "not applied",
                };
                json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"error": format!("reload refused ({kind}); the old config keeps serving"),
                            "problems": e.problems()}),
                )
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        if path.starts_with("/admin/") {
            if !self.authorized(session) {
                return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            }
            let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            return match (&method, parts.as_slice()) {
                (_, ["admin", "v1", "stock", rule, sku]) => {
                    self.stock(session, &method, rule, sku).await
                }
                (&Method::POST, ["admin", "v1", "release"]) => self.release(session).await,
                (&Method::DELETE, ["admin", "v1", "cache"]) => {
                    let query = session.req_header().uri.query().map(str::to_string);
                    self.purge(query.as_deref()).await
                }
                (&Method::GET, ["admin", "v1", "config"]) => json_reply(
                    StatusCode::OK,
                    &crate::config::view::view(&self.config.load()),
                ),
                (&Method::POST, ["admin", "v1", "reload"]) => self.reload().await,
                _ => error(
                    StatusCode::NOT_FOUND,
                    format!("no admin endpoint {method} {path}"),
                ),
            };
        }
        if method != Method::GET && method != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            );
        }
        match path.as_str() {
            "/metrics" => {
                // Read when scraped: nothing to keep in step otherwise.
                scrape::refresh(
                    &self.metrics,
                    &self.upstreams,
                    &self.admission,
                    READY_STORE_TIMEOUT,
                )
                .await;
                self.cache.publish_size();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.encode(),
                )
            }
            "/healthz" => json_reply(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => self.readiness().await,
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no admin endpoint at {path}"),
            ),
        }
    }
}
