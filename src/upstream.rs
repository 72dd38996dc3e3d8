//! Upstream server pools: round robin over each upstream's `servers`,
//! active HTTP health checks, and the `HttpPeer` settings (timeouts,
//! keep-alive) of every connection. Addresses are `SocketAddr`s resolved
//! at config time, so selecting a peer never does DNS.

pub mod slots;

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_core::services::background::{background_service, GenBackgroundService};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::HttpHealthCheck;
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, LoadBalancer};

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::vocab::UpstreamId;
use slots::Slots;

/// Errors building upstream pools.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// pingora refused a backend list or a health-check request.
    #[error("upstream {name}: {message}")]
    Build {
        /// Upstream name.
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// One upstream: its config and its balancer.
pub struct UpstreamPool {
    /// The validated config.
    pub config: UpstreamConfig,
    balancer: Arc<LoadBalancer<RoundRobin>>,
    /// The `max_inflight` slots of this node.
    pub slots: Slots,
}

/// All upstreams, indexed by [`UpstreamId`].
pub struct Upstreams {
    pools: Vec<UpstreamPool>,
}

/// Background services that run the health checks; hand them to the server.
pub type HealthServices = Vec<GenBackgroundService<LoadBalancer<RoundRobin>>>;

impl Upstreams {
    /// Builds one balancer per upstream, with its health check if configured.
    pub fn new(
        configs: &[UpstreamConfig],
        metrics: &Metrics,
    ) -> Result<(Self, HealthServices), UpstreamError> {
        let mut pools = Vec::new();
        let mut services = Vec::new();
        for config in configs {
            let build_err = |message: String| UpstreamError::Build {
                name: config.name.clone(),
                message,
            };
            let mut lb = LoadBalancer::<RoundRobin>::try_from_iter(config.servers.iter().copied())
                .map_err(|e| build_err(e.to_string()))?;
            let balancer = if let Some(hc) = &config.health_check {
                let host = config
                    .servers
                    .first()
                    .map_or_else(String::new, |a| a.to_string());
                let mut check = HttpHealthCheck::new(&host, false);
                let mut req = RequestHeader::build("GET", hc.path.as_bytes(), None)
                    .map_err(|e| build_err(format!("health_check.path: {e}")))?;
                req.insert_header("Host", host.as_str())
                    .map_err(|e| build_err(format!("health_check host: {e}")))?;
                req.insert_header("User-Agent", "sluice-health-check")
                    .map_err(|e| build_err(format!("health_check: {e}")))?;
                check.req = req;
                check.consecutive_failure = hc.failures as usize;
                check.consecutive_success = hc.successes as usize;
                check.peer_template.options.connection_timeout = Some(hc.timeout);
                check.peer_template.options.read_timeout = Some(hc.timeout);
                // Any 2xx is healthy, not only 200.
                check.validator = Some(Box::new(|resp| {
                    if resp.status.is_success() {
                        Ok(())
                    } else {
                        pingora_core::Error::e_explain(
                            pingora_core::ErrorType::HTTPStatus(resp.status.as_u16()),
                            "health check status",
                        )
                    }
                }));
                lb.set_health_check(Box::new(check));
                lb.health_check_frequency = Some(hc.interval);
                let service = background_service(&format!("health check {}", config.name), lb);
                let task = service.task();
                services.push(service);
                task
            } else {
                Arc::new(lb)
            };
            metrics.set_upstream_max_inflight(&config.name, config.max_inflight);
            pools.push(UpstreamPool {
                config: config.clone(),
                balancer,
                slots: Slots::new(config.max_inflight, metrics.upstream_inflight(&config.name)),
            });
        }
        Ok((Self { pools }, services))
    }

    /// The pool of an upstream.
    pub fn pool(&self, id: UpstreamId) -> &UpstreamPool {
        &self.pools[id.0]
    }

    /// All pools.
    pub fn pools(&self) -> &[UpstreamPool] {
        &self.pools
    }

    /// The pool of an upstream by name.
    pub fn by_name(&self, name: &str) -> Option<&UpstreamPool> {
        self.pools.iter().find(|p| p.config.name == name)
    }

    /// Every server of every upstream as `(upstream, server, up)`, for
    /// `sluice_upstream_server_up`.
    pub fn server_states(&self) -> Vec<(&str, String, bool)> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.server_states()
                    .into_iter()
                    .map(|(server, up)| (p.config.name.as_str(), server, up))
            })
            .collect()
    }

    /// Whether any upstream has at least one healthy server.
    pub fn any_healthy(&self) -> bool {
        self.pools.iter().any(|p| p.healthy_servers() > 0)
    }
}

impl UpstreamPool {
    /// The next healthy server in round-robin order, as a peer with this
    /// upstream's timeouts; `None` when every server is down.
    pub fn select(&self) -> Option<Box<HttpPeer>> {
        // Round robin ignores the key; try each server once at most.
        let backend = self
            .balancer
            .select(b"", self.config.servers.len().max(1))?;
        Some(self.peer(&backend))
    }

    /// How many servers the health check currently considers up.
    pub fn healthy_servers(&self) -> usize {
        let backends = self.balancer.backends();
        backends
            .get_backend()
            .iter()
            .filter(|b| backends.ready(b))
            .count()
    }

    /// Each server of the balancer's current list with whether it is up
    /// (healthy and enabled; always, without a health check), for
    /// `sluice_upstream_server_up`.
    pub fn server_states(&self) -> Vec<(String, bool)> {
        let backends = self.balancer.backends();
        backends
            .get_backend()
            .iter()
            .map(|b| (b.addr.to_string(), backends.ready(b)))
            .collect()
    }

    fn peer(&self, backend: &Backend) -> Box<HttpPeer> {
        let addr: SocketAddr = match backend.addr.as_inet() {
            Some(a) => *a,
            // Backends are built from SocketAddrs only.
            None => self.config.servers[0],
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        let c = &self.config;
        peer.options.connection_timeout = Some(c.connect_timeout);
        peer.options.read_timeout = Some(c.read_timeout);
        peer.options.write_timeout = Some(c.write_timeout);
        peer.options.idle_timeout = Some(c.idle_timeout);
        Box::new(peer)
    }
}
