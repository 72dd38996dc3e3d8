//! The admin listener: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process is up) and `GET /readyz` (it can serve: the store is
//! reachable and at least one upstream server is healthy).
//!
//! It runs on its own listener (loopback by default) so that scraping
//! and probes never compete with shoppers for the main listener.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;

use crate::metrics::Metrics;
use crate::upstream::Upstreams;

/// The admin HTTP app.
pub struct AdminApp {
    metrics: Arc<Metrics>,
    upstreams: Arc<Upstreams>,
}

impl AdminApp {
    /// An admin app over the gateway's metrics and upstream pools.
    pub fn new(metrics: Arc<Metrics>, upstreams: Arc<Upstreams>) -> Self {
        Self { metrics, upstreams }
    }

    fn readiness(&self) -> (StatusCode, serde_json::Value) {
        let upstreams: Vec<_> = self
            .upstreams
            .pools()
            .iter()
            .map(|p| {
                json!({
                    "name": p.config.name,
                    "servers": p.config.servers.len(),
                    "healthy": p.healthy_servers(),
                })
            })
            .collect();
        // The memory store is in-process and always reachable; the Redis
        // store adds its own check here.
        let ready = self.upstreams.any_healthy();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (
            status,
            json!({"ready": ready, "store": "ok", "upstreams": upstreams}),
        )
    }
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

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    reply(status, "application/json", value.to_string().into_bytes())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        if method != http::Method::GET && method != http::Method::HEAD {
            return json_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": format!("{method} is not allowed on {path}")}),
            );
        }
        match path.as_str() {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.encode(),
            ),
            "/healthz" => json_reply(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => {
                let (status, body) = self.readiness();
                json_reply(status, &body)
            }
            _ => json_reply(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no admin endpoint at {path}")}),
            ),
        }
    }
}
