//! roost-bare-pingora: pingora's HTTP proxy with nothing of Roost in it, for the warm-path
//! benchmark's `pingora-gunicorn` path (issue 12).
//!
//! Both of Roost's hops are pingora proxies. This one forwards every request to one upstream
//! (a unix socket or a TCP address), with the same allocator and the same thread count as `roost-proxy`, and
//! does nothing else: no routing, no header rules, no log line, no metrics. Beside nginx in
//! front of the same gunicorn, its CPU per request is the floor a pingora hop starts from on
//! this machine, so the benchmark separates pingora's own cost from Roost's.

use async_trait::async_trait;
use clap::Parser;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_proxy::{ProxyHttp, Session};

/// The same allocator as `roost-proxy`, so the floor is measured on equal terms.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "roost-bare-pingora",
    about = "pingora's proxy with no Roost code: one address in, one upstream out"
)]
struct Args {
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: String,
    /// The upstream: a unix socket's path (starting with `/`) or host:port.
    #[arg(long)]
    upstream: String,
    /// Request threads (roost-proxy's default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

struct Forward {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let peer = if self.upstream.starts_with('/') {
            HttpPeer::new_uds(&self.upstream, false, String::new())?
        } else {
            HttpPeer::new(self.upstream.as_str(), false, String::new())
        };
        Ok(Box::new(peer))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        // The benchmark stops it with SIGTERM: no connection is worth waiting for.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora_proxy::http_proxy_service(
        &server.configuration,
        Forward {
            upstream: args.upstream,
        },
    );
    service.add_tcp(&args.listen);
    server.add_service(service);
    server.run_forever();
}
