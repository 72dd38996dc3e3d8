//! The floor of Sluice's benchmark (`scripts/bench`): pingora with nothing
//! of Sluice in it. A GET is proxied to the upstream over pingora's
//! keep-alive pool; a POST is answered with a fixed 410 from
//! `request_filter`, keeping the connection alive. Whatever Sluice costs
//! above this binary is Sluice's own work.
//!
//! Usage: `sluice-floor LISTEN UPSTREAM [THREADS]` (addresses as ip:port;
//! one thread by default, like every server of the benchmark).

use std::net::SocketAddr;
use std::process::ExitCode;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};

// The same allocator as Sluice's binary, from the same source file: the
// floor is built like the gateway, so the gap between the two is the
// gateway's own code.
#[path = "../../../src/alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Mimalloc = alloc::Mimalloc;

/// The answer of every POST: the size and headers of Sluice's sold_out.
const SOLD_OUT: &[u8] = b"{\"outcome\":\"sold_out\",\"message\":\"sold out\"}";

/// Proxies GETs to one upstream, answers POSTs itself.
struct Floor {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, s: &mut Session, _: &mut ()) -> Result<bool> {
        if s.req_header().method != "POST" {
            return Ok(false);
        }
        // Drain the body first: pingora closes a connection whose request
        // body was left unread, and the gateway reads it too.
        while s.read_request_body().await?.is_some() {}
        let mut h = ResponseHeader::build(410, Some(3))?;
        h.insert_header("content-type", "application/json")?;
        h.insert_header("content-length", SOLD_OUT.len())?;
        h.insert_header("x-sluice-outcome", "sold_out")?;
        s.write_response_header(Box::new(h), false).await?;
        s.write_response_body(Some(Bytes::from_static(SOLD_OUT)), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        // A parsed address: a host string would be resolved on every request.
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: sluice-floor LISTEN UPSTREAM [THREADS]");
        return ExitCode::from(2);
    };
    let Ok(upstream) = upstream.parse::<SocketAddr>() else {
        eprintln!("sluice-floor: UPSTREAM must be ip:port, got {upstream}");
        return ExitCode::from(2);
    };
    let threads = match args.get(2).map(|t| t.parse::<usize>()) {
        None => 1,
        Some(Ok(t)) if t > 0 => t,
        Some(_) => {
            eprintln!("sluice-floor: THREADS must be a positive number");
            return ExitCode::from(2);
        }
    };
    let conf = ServerConf {
        threads,
        // Stop at once on SIGTERM: the benchmark stops it between runs.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora_proxy::http_proxy_service(&server.configuration, Floor { upstream });
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever()
}
