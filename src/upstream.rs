//! Upstream server pools: round robin over each upstream's `servers`,
//! active HTTP health checks, and the `HttpPeer` settings (timeouts,
//! keep-alive) of every connection. Addresses are `SocketAddr`s resolved
//! at config time, so selecting a peer never does DNS. A reload swaps a
//! pool's server list and timeouts in place ([`UpstreamPool::apply`]);
//! the set of upstreams, their `max_inflight` and health checks are fixed
//! for the life of the process.

pub mod slots;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use pingora_core::services::background::{background_service, GenBackgroundService};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use pingora_load_balancing::discovery::ServiceDiscovery;
use pingora_load_balancing::health_check::HttpHealthCheck;
use pingora_load_balancing::selection::RoundRobin;
use pingora_load_balancing::{Backend, Backends, LoadBalancer};

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
    name: String,
    /// The config in force (servers and timeouts change on reload).
    config: ArcSwap<UpstreamConfig>,
    /// The server list the balancer discovers, swapped by a reload.
    servers: Arc<ArcSwap<BTreeSet<Backend>>>,
    balancer: Arc<LoadBalancer<RoundRobin>>,
    /// Each server of the config in force with its ready-made peer, in the
    /// balancer's order. Selecting clones one: building a peer and
    /// pingora's own selection (which hashes each backend twice with
    /// SipHash on every pick) were about 2% of a proxied request.
    peers: ArcSwap<Vec<(Backend, HttpPeer)>>,
    /// The round-robin position.
    next: AtomicUsize,
    /// Whether a health check runs: without one every server is always
    /// up, and the balancer's readiness is not looked up.
    checked: bool,
    /// The `max_inflight` slots of this node.
    pub slots: Slots,
}

/// The balancer's service discovery: the server list of the config in
/// force. pingora's own `Static` cannot be changed from outside its crate.
struct ConfiguredServers(Arc<ArcSwap<BTreeSet<Backend>>>);

#[async_trait]
impl ServiceDiscovery for ConfiguredServers {
    async fn discover(&self) -> pingora_core::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok((BTreeSet::clone(&self.0.load()), HashMap::new()))
    }
}

/// The output of a future that completes without waiting, else `None`.
fn ready_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

fn backends_of(servers: &[SocketAddr]) -> BTreeSet<Backend> {
    servers
        .iter()
        .map(|addr| Backend {
            addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(*addr),
            weight: 1,
            ext: Default::default(),
        })
        .collect()
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
            let backends = backends_of(&config.servers);
            let peers = peers_of(config, &backends);
            let servers = Arc::new(ArcSwap::from_pointee(backends));
            let mut lb = LoadBalancer::<RoundRobin>::from_backends(Backends::new(Box::new(
                ConfiguredServers(servers.clone()),
            )));
            // The discovery is a plain read: the first update is ready at once.
            match ready_now(lb.update()) {
                Some(r) => r.map_err(|e| build_err(e.to_string()))?,
                None => return Err(build_err("server list update did not complete".into())),
            }
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
                name: config.name.clone(),
                config: ArcSwap::from_pointee(config.clone()),
                peers: ArcSwap::from_pointee(peers),
                next: AtomicUsize::new(0),
                checked: config.health_check.is_some(),
                servers,
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
        self.pools.iter().find(|p| p.name == name)
    }

    /// Every server of every upstream as `(upstream, server, up)`, for
    /// `sluice_upstream_server_up`.
    pub fn server_states(&self) -> Vec<(&str, String, bool)> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.server_states()
                    .into_iter()
                    .map(|(server, up)| (p.name(), server, up))
            })
            .collect()
    }

    /// Whether any upstream has at least one healthy server.
    pub fn any_healthy(&self) -> bool {
        self.pools.iter().any(|p| p.healthy_servers() > 0)
    }
}

impl UpstreamPool {
    /// The upstream's name (a metric label; fixed for the process).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<UpstreamConfig> {
        self.config.load_full()
    }

    /// Puts a reloaded config of this upstream in force: its server list
    /// (health state of servers it keeps is kept; new ones start up) and
    /// its timeouts. Requests already sent keep their connection.
    pub async fn apply(&self, config: &UpstreamConfig) -> Result<(), UpstreamError> {
        let backends = backends_of(&config.servers);
        // The new servers are picked from now on; until the balancer has
        // them, `select` takes them as up (their health starts up anyway).
        self.peers.store(Arc::new(peers_of(config, &backends)));
        self.servers.store(Arc::new(backends));
        self.balancer
            .update()
            .await
            .map_err(|e| UpstreamError::Build {
                name: self.name.clone(),
                message: e.to_string(),
            })?;
        self.config.store(Arc::new(config.clone()));
        Ok(())
    }

    /// The next healthy server in round-robin order, as a peer with this
    /// upstream's timeouts; `None` when every server is down.
    pub fn select(&self) -> Option<Box<HttpPeer>> {
        let peers = self.peers.load();
        let n = peers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let backends = self.balancer.backends();
        // Each server once at most, from the next one on.
        for skipped in 0..n {
            let (backend, peer) = &peers[start.wrapping_add(skipped) % n];
            // A server the balancer does not list yet (a reload between
            // the list and the balancer's update, or the other way round)
            // has no health state to go by: taken as up, as pingora starts
            // a new server.
            let up = !self.checked
                || backends.ready(backend)
                || !backends.get_backend().contains(backend);
            if up {
                if skipped > 0 {
                    // The servers skipped count as turns taken, so the one
                    // after a down server does not get its share too.
                    self.next.fetch_add(skipped, Ordering::Relaxed);
                }
                return Some(Box::new(peer.clone()));
            }
        }
        None
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
}

/// Each of `backends` (the balancer's list, in its order) with its peer
/// under the timeouts of `c`.
fn peers_of(c: &UpstreamConfig, backends: &BTreeSet<Backend>) -> Vec<(Backend, HttpPeer)> {
    backends
        .iter()
        .filter_map(|backend| {
            // Backends are built from SocketAddrs only.
            let addr = *backend.addr.as_inet()?;
            Some((backend.clone(), peer(c, addr)))
        })
        .collect()
}

/// A peer for `addr` with the timeouts of `c`.
fn peer(c: &UpstreamConfig, addr: SocketAddr) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(c.connect_timeout);
    peer.options.read_timeout = Some(c.read_timeout);
    peer.options.write_timeout = Some(c.write_timeout);
    peer.options.idle_timeout = Some(c.idle_timeout);
    peer
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pingora_core::upstreams::peer::Peer;

    use super::*;

    fn config(servers: &[&str], read_ms: u64) -> UpstreamConfig {
        UpstreamConfig {
            name: "mall".into(),
            servers: servers.iter().map(|s| s.parse().expect("addr")).collect(),
            max_inflight: 4,
            connect_timeout: Duration::from_millis(100),
            read_timeout: Duration::from_millis(read_ms),
            write_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(400),
            health_check: None,
            queue_claim_idle: Duration::from_secs(30),
        }
    }

    fn picked(pool: &UpstreamPool) -> (String, Option<Duration>) {
        let peer = pool.select().expect("a server");
        (Peer::address(&*peer).to_string(), peer.options.read_timeout)
    }

    /// A loopback server answering every request 200 until dropped.
    async fn healthy_server() -> (String, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                        if conn.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn a_down_server_is_skipped_and_its_turns_are_shared() {
        let (b, b_task) = healthy_server().await;
        let (c, c_task) = healthy_server().await;
        // Nothing listens on a port just freed.
        let a = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let mut checked = config(&[&a, &b, &c], 200);
        checked.health_check = Some(crate::config::HealthCheckConfig {
            path: "/health".into(),
            interval: Duration::from_secs(3600),
            timeout: Duration::from_millis(500),
            failures: 1,
            successes: 1,
        });
        let metrics = Metrics::new([], ["mall"]).expect("metrics");
        let (upstreams, _) =
            Upstreams::new(std::slice::from_ref(&checked), &metrics).expect("pools");
        let pool = upstreams.pool(UpstreamId(0));
        pool.balancer.backends().run_health_check(false).await;
        assert_eq!(pool.healthy_servers(), 2);
        let mut counts = HashMap::new();
        for _ in 0..60 {
            *counts.entry(picked(pool).0).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&a), None, "the down server gets nothing");
        assert_eq!((counts.get(&b), counts.get(&c)), (Some(&30), Some(&30)));
        // A reload to a server the balancer has not listed yet (the
        // moment between `apply`'s two steps): taken as up, then as checked.
        let (d, d_task) = healthy_server().await;
        let reloaded = UpstreamConfig {
            servers: vec![d.parse().expect("addr")],
            ..checked
        };
        let listed = backends_of(&reloaded.servers);
        pool.peers.store(Arc::new(peers_of(&reloaded, &listed)));
        assert_eq!(picked(pool).0, d);
        pool.apply(&reloaded).await.expect("reload");
        assert_eq!(picked(pool).0, d);
        for task in [b_task, c_task, d_task] {
            task.abort();
        }
    }

    #[tokio::test]
    async fn select_takes_turns_and_follows_a_reload() {
        let metrics = Metrics::new([], ["mall"]).expect("metrics");
        let first = config(&["127.0.0.1:9001", "127.0.0.1:9002"], 200);
        let (upstreams, _) = Upstreams::new(std::slice::from_ref(&first), &metrics).expect("pools");
        let pool = upstreams.pool(UpstreamId(0));
        let turns: Vec<_> = (0..4).map(|_| picked(pool)).collect();
        let ms200 = Some(Duration::from_millis(200));
        let one = ("127.0.0.1:9001".to_string(), ms200);
        let two = ("127.0.0.1:9002".to_string(), ms200);
        assert!(
            turns == [one.clone(), two.clone(), one.clone(), two.clone()]
                || turns == [two.clone(), one.clone(), two, one],
            "round robin over both servers: {turns:?}"
        );
        pool.apply(&config(&["127.0.0.1:9003"], 700))
            .await
            .expect("reload");
        for _ in 0..3 {
            assert_eq!(
                picked(pool),
                (
                    "127.0.0.1:9003".to_string(),
                    Some(Duration::from_millis(700))
                )
            );
        }
    }
}
