//! The proxy's settings: command-line flags over an optional TOML file over defaults that
//! work on one machine. `deploy/proxy.example.toml` shows every option.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use roost_proto::etcd::EtcdAccess;
use roost_proto::etcd_security::EtcdSecurityArgs;
use serde::Deserialize;

use crate::agent_tls::AgentTls;
use crate::forwarded::Cidr;

/// roost-proxy: the edge. Routes each request by its Host to the node that serves the site.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// etcd endpoints, comma separated.
    #[arg(long, env = "ROOST_ETCD")]
    pub etcd: Option<String>,
    /// TLS and credentials for a secured etcd (deploy/etcd/README.md).
    #[command(flatten)]
    pub etcd_security: EtcdSecurityArgs,
    /// Where clients (or the load balancer) connect with plain HTTP.
    #[arg(long)]
    pub listen: Option<String>,
    /// Where clients connect with TLS (HTTP/2 or HTTP/1.1); off unless given.
    #[arg(long)]
    pub listen_tls: Option<String>,
    /// A directory of `<host>.crt` + `<host>.key` pairs served by SNI, re-read while running.
    #[arg(long)]
    pub tls_cert_dir: Option<PathBuf>,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(long)]
    pub admin: Option<String>,
    /// A TOML file with any of these settings; flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The etcd key prefix.
    #[arg(long, env = "ROOST_PREFIX")]
    pub prefix: Option<String>,
    /// A file holding the secret presented to agents.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Reach agents over TLS, trusting only agent certificates from this CA (PEM), each
    /// naming its node id (`DNS:<node-id>`). Without it agents are reached in clear text.
    #[arg(long, value_name = "FILE")]
    pub agent_ca: Option<PathBuf>,
    /// The certificate (PEM) this proxy presents to agents (with --agent-client-key).
    #[arg(long, value_name = "FILE")]
    pub agent_client_cert: Option<PathBuf>,
    /// The private key (PEM) of --agent-client-cert.
    #[arg(long, value_name = "FILE")]
    pub agent_client_key: Option<PathBuf>,
    /// Load balancers whose X-Forwarded-For/-Proto/-Host are believed, as CIDRs, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Request-handling threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Take the listening sockets over from a running roost-proxy (zero-downtime upgrade:
    /// start this one with --upgrade, then send the old one SIGQUIT). See deploy/UPGRADE.md.
    #[arg(short, long)]
    pub upgrade: bool,
    /// Run in the background, writing `pid_file` (for systemd `Type=forking` upgrades).
    #[arg(short, long)]
    pub daemon: bool,
}

/// See [`Config::work_stealing`] and BENCHMARKS.md for why this is the default.
const WORK_STEALING_DEFAULT: bool = true;

/// Limits that can be set per site under `[sites."<host>"]`.
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct SiteLimits {
    pub max_body_bytes: Option<u64>,
    pub max_header_bytes: Option<usize>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    etcd: Option<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
    listen: Option<String>,
    listen_tls: Option<String>,
    tls_cert_dir: Option<PathBuf>,
    tls_default_host: Option<String>,
    tls_dir_poll_secs: Option<u64>,
    admin: Option<String>,
    prefix: Option<String>,
    secret_file: Option<PathBuf>,
    agent_ca: Option<PathBuf>,
    agent_client_cert: Option<PathBuf>,
    agent_client_key: Option<PathBuf>,
    trusted_proxies: Option<Vec<String>>,
    threads: Option<usize>,
    work_stealing: Option<bool>,
    grace_period_secs: Option<u64>,
    drain_delay_secs: Option<u64>,
    max_node_attempts: Option<usize>,
    suspect_secs: Option<u64>,
    local_agent_sockets: Option<bool>,
    connect_timeout_ms: Option<u64>,
    upstream_idle_secs: Option<u64>,
    upstream_pool_size: Option<usize>,
    client_timeout_secs: Option<u64>,
    max_header_bytes: Option<usize>,
    max_body_bytes: Option<u64>,
    staleness_warn_secs: Option<u64>,
    upgrade_sock: Option<String>,
    pid_file: Option<String>,
    error_log: Option<String>,
    #[serde(default)]
    sites: HashMap<String, SiteLimits>,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where etcd is, and the TLS material and user to reach it with (files read at load).
    pub etcd: EtcdAccess,
    pub listen: String,
    pub listen_tls: Option<String>,
    pub tls_cert_dir: Option<PathBuf>,
    /// The certificate served to a handshake whose SNI name has none (or that sends none).
    pub tls_default_host: Option<String>,
    pub tls_dir_poll_secs: u64,
    pub admin: String,
    pub prefix: String,
    pub secret: Option<Vec<u8>>,
    /// TLS to agents; `None`: plain HTTP.
    pub agent_tls: Option<AgentTls>,
    pub trusted_proxies: Vec<Cidr>,
    pub threads: usize,
    /// Whether request threads steal each other's tasks (one tokio runtime shared by all)
    /// or each runs its own connections (pingora's no-steal runtimes).
    pub work_stealing: bool,
    /// After SIGTERM (and the drain delay), at most this long to finish requests in flight.
    pub grace_period_secs: u64,
    /// After SIGTERM, keep accepting this long while /readyz says 503, so the load balancer
    /// takes the proxy out before it stops listening.
    pub drain_delay_secs: u64,
    /// How many nodes of a site's ranking to try when connecting fails.
    pub max_node_attempts: usize,
    /// How long a node that refused a connection is tried last.
    pub suspect_secs: u64,
    /// Reach an agent on this machine over the unix socket its node record offers, not its
    /// TCP address: several µs less CPU per request on each side. Only without --agent-ca
    /// (an operator who asked for TLS to agents gets it). `local_agent_sockets = false`
    /// turns it off.
    pub local_agent_sockets: bool,
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections to agents are closed after this long; keep it below the
    /// agent's own keep-alive timeout (60 s) so the proxy never reuses one the agent closed.
    pub upstream_idle_secs: u64,
    pub upstream_pool_size: usize,
    /// How long a client may take to send the next part of a request or read the response.
    pub client_timeout_secs: u64,
    pub max_header_bytes: usize,
    /// 0: unlimited.
    pub max_body_bytes: u64,
    pub site_limits: HashMap<String, SiteLimits>,
    pub staleness_warn_secs: u64,
    pub upgrade: bool,
    pub daemon: bool,
    pub upgrade_sock: String,
    pub pid_file: String,
    pub error_log: Option<String>,
}

impl Config {
    pub fn load(args: Args) -> Result<Self> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let secret = match args.secret_file.or(file.secret_file) {
            Some(path) => Some(roost_runtime::read_secret(&path)?),
            None => None,
        };
        let local_agent_sockets = file.local_agent_sockets.unwrap_or(true);
        let agent_tls = match args.agent_ca.or(file.agent_ca) {
            Some(ca) => Some(AgentTls::load(
                &ca,
                args.agent_client_cert.or(file.agent_client_cert).as_ref(),
                args.agent_client_key.or(file.agent_client_key).as_ref(),
            )?),
            None => None,
        };
        let local_agent_sockets = local_agent_sockets && agent_tls.is_none();
        let trusted_proxies = args
            .trusted_proxies
            .or(file.trusted_proxies)
            .unwrap_or_default()
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.parse::<Cidr>()
                    .map_err(|e| anyhow::anyhow!("trusted_proxies: {s:?}: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut site_limits = HashMap::new();
        for (host, limits) in file.sites {
            let canonical = roost_proto::canonical_host(&host)
                .map_err(|e| anyhow::anyhow!("[sites.{host:?}]: {e}"))?;
            site_limits.insert(canonical, limits);
        }
        let tls_default_host = match file.tls_default_host {
            Some(h) => Some(
                roost_proto::canonical_host(&h)
                    .map_err(|e| anyhow::anyhow!("tls_default_host {h:?}: {e}"))?,
            ),
            None => None,
        };
        let etcd_security = args.etcd_security.or(EtcdSecurityArgs {
            etcd_ca: file.etcd_ca,
            etcd_cert: file.etcd_cert,
            etcd_key: file.etcd_key,
            etcd_user: file.etcd_user,
            etcd_password_file: file.etcd_password_file,
        });
        let etcd_urls = args
            .etcd
            .or(file.etcd)
            .unwrap_or_else(|| roost_proto::etcd::DEFAULT_ENDPOINTS.into());
        let etcd = EtcdAccess::new(&etcd_urls, &etcd_security)?;
        Ok(Self {
            etcd,
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
            listen_tls: args.listen_tls.or(file.listen_tls),
            tls_cert_dir: args.tls_cert_dir.or(file.tls_cert_dir),
            tls_default_host,
            tls_dir_poll_secs: file.tls_dir_poll_secs.unwrap_or(2).max(1),
            admin: args
                .admin
                .or(file.admin)
                .unwrap_or_else(|| "127.0.0.1:9090".into()),
            prefix: args
                .prefix
                .or(file.prefix)
                .unwrap_or_else(|| roost_proto::keys::DEFAULT_PREFIX.into()),
            secret,
            agent_tls,
            trusted_proxies,
            threads: args
                .threads
                .or(file.threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            work_stealing: file.work_stealing.unwrap_or(WORK_STEALING_DEFAULT),
            grace_period_secs: file.grace_period_secs.unwrap_or(30),
            drain_delay_secs: file.drain_delay_secs.unwrap_or(0),
            max_node_attempts: file.max_node_attempts.unwrap_or(3).max(1),
            suspect_secs: file.suspect_secs.unwrap_or(10),
            local_agent_sockets,
            connect_timeout_ms: file.connect_timeout_ms.unwrap_or(2000).max(10),
            upstream_idle_secs: file.upstream_idle_secs.unwrap_or(30).max(1),
            upstream_pool_size: file.upstream_pool_size.unwrap_or(256),
            client_timeout_secs: file.client_timeout_secs.unwrap_or(60).max(1),
            max_header_bytes: file.max_header_bytes.unwrap_or(64 * 1024),
            max_body_bytes: file.max_body_bytes.unwrap_or(100 * 1024 * 1024),
            site_limits,
            staleness_warn_secs: file.staleness_warn_secs.unwrap_or(10).max(1),
            upgrade: args.upgrade,
            daemon: args.daemon,
            upgrade_sock: file
                .upgrade_sock
                .unwrap_or_else(|| "/tmp/roost-proxy-upgrade.sock".into()),
            pid_file: file
                .pid_file
                .unwrap_or_else(|| "/tmp/roost-proxy.pid".into()),
            error_log: file.error_log,
        })
    }

    /// (max header bytes, max body bytes; 0 = unlimited) for `site`.
    pub fn limits_for(&self, site: &str) -> (usize, u64) {
        let s = self.site_limits.get(site);
        (
            s.and_then(|l| l.max_header_bytes)
                .unwrap_or(self.max_header_bytes),
            s.and_then(|l| l.max_body_bytes)
                .unwrap_or(self.max_body_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_loads() {
        let text = include_str!("../../deploy/examples/proxy.toml");
        toml::from_str::<FileConfig>(text).expect("deploy/examples/proxy.toml parses");
    }

    #[test]
    fn file_settings_and_site_limits_load() {
        let dir = std::env::temp_dir().join(format!("roost-proxy-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxy.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:1"
trusted_proxies = ["10.0.0.0/8", "::1/128"]
max_body_bytes = 1000
[sites."Upload.Example"]
max_body_bytes = 0
"#,
        )
        .unwrap();
        let args = Args::parse_from([
            "roost-proxy",
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:2",
        ]);
        let cfg = Config::load(args).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:2");
        assert_eq!(cfg.trusted_proxies.len(), 2);
        assert_eq!(cfg.limits_for("upload.example").1, 0);
        assert_eq!(cfg.limits_for("other.example").1, 1000);
        std::fs::write(&path, "no_such_option = 1\n").unwrap();
        let args = Args::parse_from(["roost-proxy", "--config", path.to_str().unwrap()]);
        assert!(Config::load(args).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn etcd_security_comes_from_the_file_and_flags_win() {
        let dir = std::env::temp_dir().join(format!("roost-proxy-etcd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let password = dir.join("password");
        std::fs::write(&password, "pw\n").unwrap();
        let path = dir.join("proxy.toml");
        std::fs::write(
            &path,
            format!(
                "etcd_user = \"from-file\"\netcd_password_file = {:?}\n",
                password.to_str().unwrap()
            ),
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let cfg = Config::load(Args::parse_from(["roost-proxy", "--config", config])).unwrap();
        assert_eq!(cfg.etcd.security().user(), Some("from-file"));
        let args = Args::parse_from(["roost-proxy", "--config", config, "--etcd-user", "flag"]);
        assert_eq!(
            Config::load(args).unwrap().etcd.security().user(),
            Some("flag")
        );
        // A CA file that cannot be read stops the proxy, naming the option and the file.
        std::fs::write(&path, "etcd_ca = \"/nonexistent/ca.pem\"\n").unwrap();
        let e = Config::load(Args::parse_from(["roost-proxy", "--config", config]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--etcd-ca /nonexistent/ca.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
