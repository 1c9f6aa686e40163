//! roost-agent: the node. Registers the node in etcd, receives proxied requests, starts each
//! site's worker on its first request as the site's user, stops it when idle.

mod admin;
mod config;
mod http;
mod launch;
mod metrics;
mod preconnect;
mod registration;
mod site;
mod sitelog;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use clap::Parser;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use pingora_core::services::listening::Service;
use pingora_core::tls::ssl::SslVerifyMode;
use roost_proto::{Informer, Layout, NodeInfo, SiteSpec};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::{Args, Config};
use crate::launch::system::SystemLauncher;
use crate::registration::Registration;
use crate::site::Sites;

fn main() -> Result<()> {
    roost_runtime::init_logging();
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "roost-agent must run as root: it starts each site's worker as the site's user"
        );
    }
    let args = Args::parse();
    let cfg = Arc::new(Config::load(args.clone())?);
    if cfg.secret.is_none() {
        warn!("no --secret-file: this agent serves anyone who can reach {}; give proxies and agents a shared secret", cfg.listen);
    }

    // Control-plane work (etcd, timers, reaping workers) runs on its own runtime so it never
    // competes with, or depends on, pingora's request runtimes.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("roost-control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    let metrics = Arc::new(metrics::Metrics::new());
    let layout = Layout::new(&cfg.prefix);
    check_etcd(&control, &cfg, &layout)?;
    let sites =
        control.block_on(async { Informer::<SiteSpec>::start(&cfg.etcd, &layout.sites_prefix()) });
    // Placement needs the live nodes: a site placed on another node is given back here.
    let nodes =
        control.block_on(async { Informer::<NodeInfo>::start(&cfg.etcd, &layout.nodes_prefix()) });
    launch::rlimit::set_worker_nofile(cfg.worker_nofile);
    let settings = Arc::new(arc_swap::ArcSwap::new(cfg.clone()));
    let launcher = SystemLauncher::new(settings.clone(), metrics.clone(), control.handle().clone())
        .with_context(|| format!("preparing state directory {}", cfg.state_dir.display()))?;
    let rss_watchdog = !launcher.uses_cgroups();
    let supervisor = Sites::new(
        settings,
        metrics.clone(),
        launcher,
        rss_watchdog,
        control.handle().clone(),
    );
    // Zygotes before any request thread exists: the manager thread that forks them lives
    // as long as the agent (their parent-death signal follows it).
    if let Err(e) = launch::zygote::init(&cfg.state_dir, &cfg.preload, &cfg.frameworks) {
        warn!(error = %e, "cannot start zygotes; every worker will be started directly");
    }
    let registration = Registration::new(cfg.clone());
    control.spawn(registration.clone().run(metrics.clone()));
    control.spawn(site::run(supervisor.clone(), sites.clone(), nodes));

    let conf = ServerConf {
        threads: cfg.request_threads,
        work_stealing: cfg.work_stealing,
        // The drain is done by DrainOnSignal before pingora is told to stop.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(2),
        pid_file: cfg
            .state_dir
            .join("agent.pid")
            .to_string_lossy()
            .into_owned(),
        upgrade_sock: cfg
            .state_dir
            .join("agent-upgrade.sock")
            .to_string_lossy()
            .into_owned(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora_proxy::http_proxy_service_with_name(
        &server.configuration,
        http::AgentHttp {
            supervisor: supervisor.clone(),
            sites: sites.clone(),
            credential: cfg
                .secret
                .as_deref()
                .map(roost_proto::headers::Credential::new),
            metrics: metrics.clone(),
            preconnects: Arc::new(preconnect::Preconnects::new(metrics.preconnects.clone())),
        },
        "roost-agent",
    );
    match &cfg.tls {
        Some(tls) => {
            let settings = listener_tls(tls)?;
            proxy.add_tls_with_settings(&cfg.listen, None, settings);
        }
        None => {
            warn!(listen = %cfg.listen, "no --tls-cert: proxies reach this agent in clear text, and the secret travels with every request; see docs/security.md");
            proxy.add_tcp(&cfg.listen);
        }
    }
    if let Some(path) = &registration.local_socket {
        // Reachable by whoever may reach --listen, no further: any local user can connect
        // to that port too, and both ask for the secret.
        proxy.add_uds(path, Some(std::fs::Permissions::from_mode(0o666)));
    }
    let mut admin = Service::new(
        "admin".to_string(),
        admin::AdminApp {
            metrics,
            sites,
            registration: registration.clone(),
            sites_here: supervisor.clone(),
            secret: cfg.secret.clone(),
            state_dir: cfg.state_dir.clone(),
        },
    );
    admin.add_tcp(&cfg.admin);
    server.add_service(proxy);
    server.add_service(admin);

    info!(node = %cfg.node_id, listen = %cfg.listen, admin = %cfg.admin, state_dir = %cfg.state_dir.display(), "roost-agent starting");
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnSignal {
            args,
            running: cfg.clone(),
            registration,
            supervisor,
            control: control.handle().clone(),
        }),
    });
    control.shutdown_timeout(Duration::from_secs(1));
    info!("roost-agent stopped");
    Ok(())
}

/// TLS for the proxies' port: this agent's certificate, and with a client CA, a handshake
/// that fails unless the proxy presents a certificate from it.
fn listener_tls(tls: &config::ListenerTls) -> Result<TlsSettings> {
    let path = |p: &std::path::Path| {
        p.to_str()
            .map(str::to_string)
            .context("TLS paths must be UTF-8")
    };
    let mut settings =
        TlsSettings::intermediate(&path(&tls.cert)?, &path(&tls.key)?).map_err(|e| {
            anyhow::anyhow!(
                "--tls-cert {} / --tls-key {}: {e}",
                tls.cert.display(),
                tls.key.display()
            )
        })?;
    if let Some(ca) = &tls.client_ca {
        settings
            .set_ca_file(ca)
            .map_err(|e| anyhow::anyhow!("--client-ca {}: {e}", ca.display()))?;
        settings.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    }
    Ok(settings)
}

/// Stop at start when etcd refuses this agent: bad certificates or credentials, or a role
/// that can't read the sites or write this node's key. An etcd that is merely down is
/// logged; the informer and the registration keep trying.
fn check_etcd(control: &tokio::runtime::Runtime, cfg: &Config, layout: &Layout) -> Result<()> {
    let reads = [layout.sites_prefix(), layout.nodes_prefix()];
    let writes = [layout.node_key(&cfg.node_id)];
    let checked = control.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), cfg.etcd.check(&reads, &writes)).await
    });
    match checked {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.fatal => Err(anyhow::anyhow!("etcd: {e}")),
        Ok(Err(e)) => {
            warn!(error = %e, "etcd is not reachable yet; registering once it is");
            Ok(())
        }
        Err(_) => {
            warn!(etcd = %cfg.etcd.urls(), "etcd did not answer within 10s; registering once it does");
            Ok(())
        }
    }
}

/// SIGTERM drains the node: mark it draining in etcd (proxies stop placing sites here),
/// let requests in flight finish, stop the workers, remove the node key, then let pingora
/// close its listeners. SIGINT does the same (Ctrl-C in a terminal is a request to stop).
struct DrainOnSignal {
    /// For SIGHUP: the command line the settings are re-read with.
    args: Args,
    running: Arc<Config>,
    registration: Arc<Registration>,
    supervisor: Arc<Sites>,
    control: tokio::runtime::Handle,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                warn!("cannot install signal handlers; SIGTERM will not drain");
                std::future::pending::<()>().await;
                unreachable!()
            }
        };
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut running = self.running.clone();
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: draining the node"); break }
                _ = int.recv() => { info!("SIGINT: draining the node"); break }
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                    // SIGHUP re-reads the settings that can change under a running node
                    // (limits, timeouts); without a handler it would kill the agent undrained.
                    match running.reloaded(self.args.clone()) {
                        Ok(cfg) => {
                            let cfg = Arc::new(cfg);
                            self.supervisor.reconfigure(cfg.clone());
                            running = cfg;
                        }
                        Err(e) => warn!(error = %format!("{e:#}"), "SIGHUP: config not reloaded; keeping the running settings"),
                    }
                }
            }
        }
        let registration = self.registration.clone();
        let supervisor = self.supervisor.clone();
        let drained = self.control.spawn(async move {
            registration.set_draining();
            // Give proxies a moment to see the draining flag, then wait for requests in flight.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while supervisor.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            supervisor.shutdown().await;
            registration.deregister().await;
        });
        let _ = drained.await;
        ShutdownSignal::GracefulTerminate
    }
}
