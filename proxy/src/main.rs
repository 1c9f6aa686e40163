//! roost-proxy: the edge. A pingora server that maps `Host` → site → node from an in-memory
//! snapshot of etcd and forwards to that node's agent. Stateless: run as many as you like
//! behind a load balancer.

mod admin;
mod config;
mod http;
mod metrics;
mod respond;
mod routes;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use async_trait::async_trait;
use clap::Parser;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::listening::Service;
use roost_proto::{Informer, Layout, NodeInfo, SiteSpec};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::{Args, Config};
use crate::routes::Router;

fn main() -> Result<()> {
    init_logging();
    let cfg = Config::load(Args::parse())?;
    if cfg.secret.is_none() {
        warn!("no --secret-file: agents that require a secret will refuse this proxy");
    }
    // etcd watches and the routing table live on their own runtime, apart from requests.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("roost-control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let layout = Layout::new(&cfg.prefix);
    let router = control.block_on(async {
        let sites = Informer::<SiteSpec>::start(&cfg.etcd, &layout.sites_prefix());
        let nodes = Informer::<NodeInfo>::start(&cfg.etcd, &layout.nodes_prefix());
        Router::new(sites, nodes)
    });
    control.spawn(router.clone().run());
    let metrics = Arc::new(metrics::Metrics::new());
    let draining = Arc::new(AtomicBool::new(false));

    let mut conf = ServerConf::default();
    conf.threads = cfg.threads;
    conf.grace_period_seconds = Some(cfg.grace_period_secs);
    conf.graceful_shutdown_timeout_seconds = Some(2);
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut edge = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        http::EdgeHttp {
            router: router.clone(),
            secret: cfg.secret.clone(),
            metrics: metrics.clone(),
            max_node_attempts: cfg.max_node_attempts,
        },
        "roost-proxy",
    );
    edge.add_tcp(&cfg.listen);
    let mut admin = Service::new(
        "admin".to_string(),
        admin::AdminApp {
            metrics,
            router,
            draining: draining.clone(),
        },
    );
    admin.add_tcp(&cfg.admin);
    server.add_service(edge);
    server.add_service(admin);

    info!(listen = %cfg.listen, admin = %cfg.admin, etcd = %cfg.etcd, "roost-proxy starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSignal { draining }),
    });
    control.shutdown_timeout(Duration::from_secs(1));
    info!("roost-proxy stopped");
    Ok(())
}

/// SIGTERM or SIGINT: report not-ready at once (the load balancer stops sending), then let
/// pingora stop accepting and finish requests in flight for the grace period.
struct DrainOnSignal {
    draining: Arc<AtomicBool>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                warn!("cannot install signal handlers; SIGTERM will not drain");
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = int.recv() => info!("SIGINT: draining"),
        }
        self.draining.store(true, Ordering::Release);
        ShutdownSignal::GracefulTerminate
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}
