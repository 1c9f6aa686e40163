//! roost-proxy: the edge. A pingora server that maps `Host` → site → node from an in-memory
//! snapshot of etcd and forwards to that node's agent. Stateless: run as many as you like
//! behind a load balancer.
//!
//! Signals: SIGTERM (or SIGINT) drains: /readyz turns 503, after `drain_delay_secs` the
//! listeners close, requests in flight finish (at most `grace_period_secs`), then the process
//! exits. SIGQUIT hands the listening sockets to a new process started with `--upgrade`
//! (deploy/UPGRADE.md), then drains the same way.

mod admin;
mod agent_tls;
mod awaiting;
mod config;
mod forwarded;
mod http;
mod metrics;
mod routes;
mod tap;
mod tls;
mod warm;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use clap::Parser;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{
    ExecutionPhase, RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch,
};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use roost_proto::{CertRecord, Informer, Layout, NodeInfo};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::config::{Args, Config};
use crate::routes::{Router, SiteInformer};
use crate::tls::{CertStore, SniCallbacks};

/// mimalloc, not glibc's malloc: pingora's per-request buffers are larger than glibc's
/// thread cache takes, and malloc and free were about a tenth of this hop's samples
/// (BENCHMARKS.md, "The allocator"). The proxy's threads are a fixed set, so mimalloc's heap
/// per thread costs a fixed few MB. The agent keeps glibc's: it runs a thread per warm
/// worker's output, and a heap each would cost ~0.9 MB per warm site.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    roost_runtime::init_logging();
    let cfg = Arc::new(Config::load(Args::parse())?);
    if cfg.secret.is_none() {
        warn!("no --secret-file: agents that require a secret will refuse this proxy");
    }
    match &cfg.agent_tls {
        None => warn!(
            "no --agent-ca: agents are reached over plain HTTP, so whoever can write a node \
             record in etcd receives the secret; see docs/security.md"
        ),
        Some(tls) if !tls.has_client_cert() => warn!(
            "--agent-ca without --agent-client-cert: agents that require a client certificate \
             will refuse this proxy"
        ),
        Some(_) => {}
    }
    check_etcd(&cfg)?;
    // Nothing here may start a thread: in daemon mode pingora forks inside `run`, and only
    // the forking thread survives. The etcd informers start in the `control` service.
    let router = Router::new(
        Duration::from_secs(cfg.suspect_secs),
        cfg.local_agent_sockets,
    );
    let certs = cfg
        .listen_tls
        .as_ref()
        .map(|_| CertStore::new(cfg.tls_default_host.clone()));
    let metrics = Arc::new(metrics::Metrics::new());
    let draining = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let awaiting = Arc::new(awaiting::AwaitingSites::default());

    let conf = ServerConf {
        threads: cfg.threads,
        work_stealing: cfg.work_stealing,
        // The grace period is an upper bound: the drain watcher below exits as soon as
        // nothing is in flight.
        grace_period_seconds: Some(cfg.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: cfg.upgrade_sock.clone(),
        pid_file: cfg.pid_file.clone(),
        error_log: cfg.error_log.clone(),
        upstream_keepalive_pool_size: cfg.upstream_pool_size,
        ..Default::default()
    };
    let opt = Opt {
        upgrade: cfg.upgrade,
        daemon: cfg.daemon,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With --upgrade this receives the listening sockets from the running proxy.
    server.bootstrap();
    let phases = server.watch_execution_phase();

    let warmer = warm::Warmer::new(router.clone(), cfg.clone(), metrics.clone());
    let proxy = pingora_proxy::http_proxy(
        &server.configuration,
        http::EdgeHttp {
            router: router.clone(),
            cfg: cfg.clone(),
            warmer: warmer.clone(),
            metrics: metrics.clone(),
            in_flight: in_flight.clone(),
            awaiting: awaiting.clone(),
        },
    );
    // Every client connection goes through the tap, which lets the edge check chunked trailers.
    let mut edge = Service::new("roost-proxy".to_string(), tap::Tapped(Arc::new(proxy)));
    edge.add_tcp(&cfg.listen);
    if let (Some(addr), Some(store)) = (&cfg.listen_tls, &certs) {
        let mut settings = TlsSettings::with_callbacks(Box::new(SniCallbacks {
            store: store.clone(),
        }))
        .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
        settings.enable_h2();
        // The ClientHello names the site a round trip before its request: start it now.
        edge.endpoints()
            .set_pre_tls_callback(Arc::new(warm::ClientHelloPeek { warmer }));
        edge.add_tls_with_settings(addr, None, settings);
    }
    let mut admin = Service::new(
        "admin".to_string(),
        admin::AdminApp {
            metrics,
            router: router.clone(),
            certs: certs.clone(),
            draining: draining.clone(),
            in_flight: in_flight.clone(),
            awaiting,
        },
    );
    admin.add_tcp(&cfg.admin);
    server.add_service(background_service(
        "control",
        Control {
            cfg: cfg.clone(),
            router,
            certs,
        },
    ));
    server.add_service(edge);
    server.add_service(admin);

    info!(listen = %cfg.listen, listen_tls = ?cfg.listen_tls, admin = %cfg.admin, etcd = %cfg.etcd.urls(),
        upgrade = cfg.upgrade, "roost-proxy starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSignal {
            cfg: cfg.clone(),
            draining,
            in_flight,
            phases: std::sync::Mutex::new(Some(phases)),
        }),
    });
    info!("roost-proxy stopped");
    Ok(())
}

/// Stop at start when etcd refuses this proxy (certificates, credentials, a role that can't
/// read the prefix): retrying can't fix those, and a proxy that never syncs only says 503.
/// An etcd that is merely down is logged; the informers keep trying. The runtime is dropped
/// before pingora starts, so no thread outlives it into a daemon fork.
fn check_etcd(cfg: &Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let layout = Layout::new(&cfg.prefix);
    let reads = [layout.sites_prefix(), layout.nodes_prefix()];
    let checked = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), cfg.etcd.check(&reads, &[])).await
    });
    match checked {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.fatal => Err(anyhow::anyhow!("etcd: {e}")),
        Ok(Err(e)) => {
            warn!(error = %e, "etcd is not reachable yet; serving nothing until it is");
            Ok(())
        }
        Err(_) => {
            warn!(etcd = %cfg.etcd.urls(), "etcd did not answer within 10s; serving nothing until it does");
            Ok(())
        }
    }
}

/// etcd, the routing table and the certificates: started once the server runs (after any
/// daemon fork), on a runtime of their own apart from requests.
struct Control {
    cfg: Arc<Config>,
    router: Arc<Router>,
    certs: Option<Arc<CertStore>>,
}

#[async_trait]
impl BackgroundService for Control {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let cfg = &self.cfg;
        let layout = Layout::new(&cfg.prefix);
        let sites = SiteInformer::start(&cfg.etcd, &layout.sites_prefix());
        let nodes = Informer::<NodeInfo>::start(&cfg.etcd, &layout.nodes_prefix());
        self.router.attach(sites, nodes);
        tokio::spawn(self.router.clone().run());
        if let Some(store) = &self.certs {
            let informer = Informer::<CertRecord>::start(&cfg.etcd, &layout.certs_prefix());
            store.attach(informer.clone());
            tokio::spawn(store.clone().follow_etcd(informer));
            if let Some(dir) = &cfg.tls_cert_dir {
                tokio::spawn(
                    store
                        .clone()
                        .follow_dir(dir.clone(), Duration::from_secs(cfg.tls_dir_poll_secs)),
                );
            }
        }
        tokio::spawn(on_sighup(self.cfg.clone(), self.certs.clone()));
        // Keep running through shutdown: requests still in flight route from this table.
        self.watch_staleness().await;
    }
}

impl Control {
    /// A log line while etcd has not confirmed the snapshot for `staleness_warn_secs`, and
    /// one when it has again. The metric is `roost_proxy_snapshot_staleness_seconds`.
    async fn watch_staleness(&self) {
        let warn_after = Duration::from_secs(self.cfg.staleness_warn_secs);
        let mut stale_since_warned: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if !self.router.is_synced() {
                continue;
            }
            let stale = Duration::from_millis(self.router.staleness_ms());
            if stale >= warn_after {
                if stale_since_warned.is_none_or(|t| t.elapsed() >= warn_after) {
                    warn!(staleness_ms = stale.as_millis() as u64,
                        "etcd has not confirmed the routing snapshot; serving every known site from it");
                    stale_since_warned = Some(Instant::now());
                }
            } else if stale_since_warned.take().is_some() {
                info!(
                    staleness_ms = stale.as_millis() as u64,
                    "etcd confirms the routing snapshot again"
                );
            }
        }
    }
}

/// SIGHUP: sites, nodes and certificates from etcd are always current, so the only thing to
/// re-read is the certificate directory (at once, instead of at the next scan). Everything
/// else in the config file takes effect through an upgrade (`systemctl reload`), which
/// starts a new process with a fresh config and no downtime.
async fn on_sighup(cfg: Arc<Config>, certs: Option<Arc<CertStore>>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot install a SIGHUP handler");
        return;
    };
    while hup.recv().await.is_some() {
        info!("SIGHUP: re-reading the certificate directory; other settings change through an upgrade (deploy/UPGRADE.md)");
        if let (Some(store), Some(dir)) = (certs.clone(), cfg.tls_cert_dir.clone()) {
            let _ = tokio::task::spawn_blocking(move || store.scan_dir(&dir)).await;
        }
    }
}

/// SIGTERM or SIGINT: report not-ready at once (the load balancer stops sending), keep
/// serving for the drain delay, then let pingora stop accepting; requests in flight finish.
/// SIGQUIT: hand the listening sockets to the new process (`--upgrade`), then the same.
struct DrainOnSignal {
    cfg: Arc<Config>,
    draining: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    phases: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int, mut quit) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) {
            (Ok(t), Ok(i), Ok(q)) => (t, i, q),
            _ => {
                error!("cannot install signal handlers; SIGTERM will not drain");
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        let upgrade = tokio::select! {
            _ = term.recv() => { info!("SIGTERM: draining"); false }
            _ = int.recv() => { info!("SIGINT: draining"); false }
            _ = quit.recv() => { info!("SIGQUIT: handing the listening sockets to the new process"); true }
        };
        if !upgrade {
            // During an upgrade the admin socket is shared with the new process, which is
            // ready: only a real drain reports not-ready.
            self.draining.store(true, Ordering::Release);
            if self.cfg.drain_delay_secs > 0 {
                info!(
                    drain_delay_secs = self.cfg.drain_delay_secs,
                    "reporting not-ready; still accepting until the load balancer notices"
                );
                tokio::time::sleep(Duration::from_secs(self.cfg.drain_delay_secs)).await;
            }
        }
        if let Some(phases) = self.phases.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let in_flight = self.in_flight.clone();
            let grace = Duration::from_secs(self.cfg.grace_period_secs);
            std::thread::Builder::new()
                .name("roost-drain".into())
                .spawn(move || exit_when_drained(phases, in_flight, grace))
                .ok();
        }
        info!(
            in_flight = self.in_flight.load(Ordering::Relaxed),
            "closing the listeners; finishing requests in flight"
        );
        if upgrade {
            ShutdownSignal::GracefulUpgrade
        } else {
            ShutdownSignal::GracefulTerminate
        }
    }
}

/// Pingora waits out the whole grace period even when nothing is left to do. Once its
/// listeners are closed, exit as soon as no request has been in flight for a moment.
fn exit_when_drained(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    in_flight: Arc<AtomicUsize>,
    grace: Duration,
) {
    loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownGracePeriod) => break,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        }
    }
    let started = Instant::now();
    let settle = Duration::from_millis(300);
    let mut idle_since: Option<Instant> = None;
    while started.elapsed() < grace {
        if in_flight.load(Ordering::Acquire) == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= settle {
                info!(
                    after_ms = started.elapsed().as_millis() as u64,
                    "drained: no request in flight; exiting"
                );
                std::process::exit(0);
            }
        } else {
            idle_since = None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    warn!(
        in_flight = in_flight.load(Ordering::Relaxed),
        "grace period over; cutting requests still in flight"
    );
}
