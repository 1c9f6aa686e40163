//! The agent's settings: command-line flags over an optional TOML file over defaults that
//! work on one machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use roost_proto::etcd::EtcdAccess;
use roost_proto::etcd_security::EtcdSecurityArgs;
use serde::Deserialize;

/// roost-agent: runs the site workers of one node, on demand, each as its site's user.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// etcd endpoints, comma separated.
    #[arg(long, env = "ROOST_ETCD")]
    pub etcd: Option<String>,
    /// TLS and credentials for a secured etcd (deploy/etcd/README.md).
    #[command(flatten)]
    pub etcd_security: EtcdSecurityArgs,
    /// This node's id in etcd (`<prefix>/nodes/<id>`).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Where proxies reach this agent (HTTP/1.1).
    #[arg(long)]
    pub listen: Option<String>,
    /// The address published for proxies, when it differs from --listen (e.g. 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Admin address: /metrics, /healthz, /readyz, /sites.
    #[arg(long)]
    pub admin: Option<String>,
    /// Where site sockets and logs live.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A TOML file with any of these settings; flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The etcd key prefix.
    #[arg(long, env = "ROOST_PREFIX")]
    pub prefix: Option<String>,
    /// A file holding the secret that proxies present; without it the agent trusts its network.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Serve proxies over TLS with this certificate (PEM; it must name the node id,
    /// `DNS:<node-id>`, which proxies check). Without it proxies connect in clear text.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Accept only proxies presenting a client certificate from this CA (PEM); needs --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Placement weight of this node relative to others.
    #[arg(long)]
    pub capacity: Option<u32>,
}

/// The file form; every field optional.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    etcd: Option<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
    node_id: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    admin: Option<String>,
    state_dir: Option<PathBuf>,
    prefix: Option<String>,
    secret_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    capacity: Option<u32>,
    local_socket: Option<bool>,
    stop_grace_secs: Option<u64>,
    lease_ttl_secs: Option<i64>,
    cgroups: Option<bool>,
    max_workers: Option<usize>,
    memory_budget_mb: Option<u64>,
    pids_max: Option<u64>,
    start_timeout_secs: Option<u64>,
    start_queue_limit: Option<u32>,
    max_crash_backoff_secs: Option<u64>,
    log_max_bytes: Option<u64>,
    preload: Option<Vec<String>>,
    request_threads: Option<usize>,
    work_stealing: Option<bool>,
    min_site_uid: Option<u32>,
    site_group: Option<String>,
    interpreters: Option<Vec<PathBuf>>,
    worker_nofile: Option<u64>,
    default_cpu_limit: Option<f64>,
    cpu_weight: Option<u32>,
    default_io_weight: Option<u32>,
    default_max_concurrent_requests: Option<u32>,
    frameworks: Option<bool>,
    frameworks_max: Option<usize>,
    frameworks_min_sites: Option<usize>,
    frameworks_max_rss_mb: Option<u64>,
    frameworks_pin: Option<Vec<String>>,
    frameworks_forbid: Option<Vec<String>>,
}

/// See [`Config::work_stealing`] and BENCHMARKS.md for why this is the default.
const WORK_STEALING_DEFAULT: bool = true;

/// Settings in force.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where etcd is, and the TLS material and user to reach it with (files read at load).
    pub etcd: EtcdAccess,
    pub node_id: String,
    pub listen: String,
    pub advertise: String,
    pub admin: String,
    pub state_dir: PathBuf,
    pub prefix: String,
    pub secret: Option<Vec<u8>>,
    /// TLS for the proxies' port; `None`: plain HTTP.
    pub tls: Option<ListenerTls>,
    pub capacity: u32,
    /// A unix socket (`<state_dir>/agent-<node id>.sock`) serving what --listen serves, for a proxy on
    /// this machine: loopback TCP costs each side several µs more per request. Published in
    /// the node record; `local_socket = false` turns it off.
    pub local_socket: Option<PathBuf>,
    /// How long a stopping worker may finish its requests before SIGKILL.
    pub stop_grace: Duration,
    /// TTL of the lease that holds the node key; the node vanishes this long after a crash.
    pub lease_ttl_secs: i64,
    /// Use cgroups for per-site limits where the kernel offers them.
    pub cgroups: bool,
    /// Workers alive at once on this node; past it the least recently used idle one stops.
    pub max_workers: usize,
    /// Memory all site cgroups together may use before idle workers are evicted to start more.
    pub memory_budget_mb: Option<u64>,
    /// Tasks (processes and threads) one site may have.
    pub pids_max: u64,
    /// How long a new worker may take to answer its first request.
    pub start_timeout: Duration,
    /// Requests that may wait for one site's worker to start; more get 503 at once.
    pub start_queue_limit: u32,
    /// Ceiling of the crash-loop backoff.
    pub max_crash_backoff: Duration,
    /// A site's log is rotated (one old copy kept) past this size.
    pub log_max_bytes: u64,
    /// Python modules every zygote imports before forking workers (e.g. `["flask"]`), on
    /// top of the WSGI server. A module that fails to import is logged and skipped.
    pub preload: Vec<String>,
    /// Threads serving requests (pingora's runtime); defaults to the CPU count.
    pub request_threads: usize,
    /// Whether request threads steal each other's tasks (one tokio runtime shared by all)
    /// or each runs its own connections (pingora's no-steal runtimes).
    pub work_stealing: bool,
    /// Which unix users sites may run as (issue 10): anyone who can write a site record
    /// must not get to run code as `daemon` or `postgres`.
    pub site_users: SiteUserPolicy,
    /// The Python executables zygotes (which run as root) may be; a site's `python`, or
    /// its virtualenv's `home`, must name one of them (`launch/interpreters.rs`).
    pub interpreters: Vec<PathBuf>,
    /// RLIMIT_NOFILE (soft and hard) of every worker, apart from the agent's own
    /// (`launch/rlimit.rs`); fixed at start.
    pub worker_nofile: u64,
    /// CPU, I/O and concurrency limits for sites whose record names none (issue 10).
    pub site_limits: SiteLimitDefaults,
    /// Framework zygotes learnt from what sites import (issue 14, `launch/frameworks.rs`).
    pub frameworks: FrameworkSettings,
}

/// Zero-config framework preloading (docs/first-hit.md). Fixed at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameworkSettings {
    /// Learn framework sets and keep framework zygotes at all.
    pub enabled: bool,
    /// Framework zygotes at most (each a process of tens of MB).
    pub max_sets: usize,
    /// Sites that must share a set before it gets a zygote.
    pub min_sites: usize,
    /// A framework zygote larger than this (RSS) is stopped and its set not built again.
    pub max_rss_bytes: u64,
    /// Modules added to every set whose packages include their top-level package (still probed).
    pub pin: Vec<String>,
    /// Modules (and everything below them) never preloaded.
    pub forbid: Vec<String>,
}

impl Default for FrameworkSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_sets: 4,
            min_sites: 2,
            max_rss_bytes: 256 << 20,
            pin: Vec::new(),
            forbid: Vec::new(),
        }
    }
}

impl FrameworkSettings {
    fn from_file(file: &FileConfig) -> Result<Self> {
        let d = Self::default();
        let s = Self {
            enabled: file.frameworks.unwrap_or(d.enabled),
            max_sets: file.frameworks_max.unwrap_or(d.max_sets),
            min_sites: file.frameworks_min_sites.unwrap_or(d.min_sites),
            max_rss_bytes: file
                .frameworks_max_rss_mb
                .map(|mb| mb << 20)
                .unwrap_or(d.max_rss_bytes),
            pin: file.frameworks_pin.clone().unwrap_or_default(),
            forbid: file.frameworks_forbid.clone().unwrap_or_default(),
        };
        if s.max_sets > 64 {
            anyhow::bail!("frameworks_max: {} is more than 64", s.max_sets);
        }
        if s.min_sites == 0 {
            anyhow::bail!("frameworks_min_sites: must be at least 1");
        }
        for (key, names) in [("frameworks_pin", &s.pin), ("frameworks_forbid", &s.forbid)] {
            if let Some(bad) = names
                .iter()
                .find(|n| !crate::launch::frameworks::valid_module_name(n))
            {
                anyhow::bail!("{key}: {bad:?} is not a dotted Python module name");
            }
        }
        Ok(s)
    }
}

/// Per-site limits a site record may override. Weights are cgroup v2's scale (1..=10000,
/// 100 the kernel's default); on cgroup v1 they are converted.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteLimitDefaults {
    /// CPU cap in cores; `None`: no cap.
    pub cpu_limit: Option<f64>,
    /// Every site's CPU weight: equal, so a busy site can't take more than its share from
    /// its neighbours when the node is contended.
    pub cpu_weight: u32,
    pub io_weight: u32,
    /// Requests one site may have in flight; `None`: no limit beyond the worker's threads.
    pub max_concurrent_requests: Option<u32>,
}

impl SiteLimitDefaults {
    fn from_file(file: &FileConfig) -> Result<Self> {
        use roost_proto::site::{check_cpu_limit, MAX_CONCURRENT_REQUESTS, MAX_WEIGHT};
        if let Some(cores) = file.default_cpu_limit {
            check_cpu_limit(cores).map_err(|e| anyhow::anyhow!("default_cpu_limit: {e}"))?;
        }
        let weight = |name: &str, v: Option<u32>| -> Result<u32> {
            match v {
                Some(w) if !(1..=MAX_WEIGHT).contains(&w) => {
                    anyhow::bail!("{name}: {w} is outside 1..={MAX_WEIGHT}")
                }
                Some(w) => Ok(w),
                None => Ok(100),
            }
        };
        if let Some(n) = file.default_max_concurrent_requests {
            if !(1..=MAX_CONCURRENT_REQUESTS).contains(&n) {
                anyhow::bail!(
                    "default_max_concurrent_requests: {n} is outside 1..={MAX_CONCURRENT_REQUESTS}"
                );
            }
        }
        Ok(Self {
            cpu_limit: file.default_cpu_limit,
            cpu_weight: weight("cpu_weight", file.cpu_weight)?,
            io_weight: weight("default_io_weight", file.default_io_weight)?,
            max_concurrent_requests: file.default_max_concurrent_requests,
        })
    }
}

/// The proxies' port over TLS: this agent's certificate and key, and the CA proxies'
/// client certificates must chain to (none: any client may connect, the secret decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The unix users a site may name: uid at least `min_uid` (Debian's `UID_MIN`, 1000, by
/// default: system accounts sit below it) and, when `group` is set, a member of that group
/// (primary or supplementary). Root is refused whatever this says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteUserPolicy {
    pub min_uid: u32,
    pub group: Option<String>,
}

impl Config {
    /// This agent's cgroup name: unique per agent installation on a host (node id and state
    /// directory), stable across restarts so a restarted agent finds what it left behind.
    pub fn cgroup_name(&self) -> String {
        let dir = std::fs::canonicalize(&self.state_dir).unwrap_or_else(|_| self.state_dir.clone());
        // FNV-1a: a short, stable tag; not security relevant.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in dir.as_os_str().as_encoded_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("roost-{}-{:08x}", self.node_id, h as u32)
    }

    /// The settings after a SIGHUP: the file and flags read again, with what identifies
    /// this agent (node id, addresses, state directory, etcd, prefix, secret) kept from the
    /// running config; a change to those needs a restart, and the log says so.
    pub fn reloaded(&self, args: Args) -> Result<Self> {
        let mut new = Self::load(args)?;
        let fixed = [
            ("node_id", new.node_id != self.node_id),
            ("listen", new.listen != self.listen),
            ("advertise", new.advertise != self.advertise),
            ("admin", new.admin != self.admin),
            ("state_dir", new.state_dir != self.state_dir),
            ("etcd", new.etcd.urls() != self.etcd.urls()),
            ("prefix", new.prefix != self.prefix),
            ("secret_file", new.secret != self.secret),
            ("tls_cert/tls_key/client_ca", new.tls != self.tls),
            ("capacity", new.capacity != self.capacity),
            ("local_socket", new.local_socket != self.local_socket),
            ("cgroups", new.cgroups != self.cgroups),
            ("preload", new.preload != self.preload),
            ("frameworks*", new.frameworks != self.frameworks),
            ("worker_nofile", new.worker_nofile != self.worker_nofile),
            (
                "request_threads",
                new.request_threads != self.request_threads,
            ),
            ("work_stealing", new.work_stealing != self.work_stealing),
        ];
        for (name, changed) in fixed {
            if changed {
                tracing::warn!(
                    setting = name,
                    "changed in the config, but applies only after a restart"
                );
            }
        }
        new.node_id = self.node_id.clone();
        new.listen = self.listen.clone();
        new.advertise = self.advertise.clone();
        new.admin = self.admin.clone();
        new.state_dir = self.state_dir.clone();
        new.etcd = self.etcd.clone();
        new.prefix = self.prefix.clone();
        new.secret = self.secret.clone();
        new.tls = self.tls.clone();
        new.capacity = self.capacity;
        new.local_socket = self.local_socket.clone();
        new.cgroups = self.cgroups;
        new.preload = self.preload.clone();
        new.frameworks = self.frameworks.clone();
        new.worker_nofile = self.worker_nofile;
        new.request_threads = self.request_threads;
        new.work_stealing = self.work_stealing;
        Ok(new)
    }

    pub fn load(args: Args) -> Result<Self> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let site_limits = SiteLimitDefaults::from_file(&file)?;
        let frameworks = FrameworkSettings::from_file(&file)?;
        let node_id = args
            .node_id
            .or(file.node_id)
            .unwrap_or_else(default_node_id);
        if !roost_proto::node::valid_node_id(&node_id) {
            anyhow::bail!(
                "--node-id {node_id:?}: use lower-case letters, digits, '.', '_' and '-'"
            );
        }
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:7100".into());
        let advertise = args
            .advertise
            .or(file.advertise)
            .unwrap_or_else(|| listen.clone());
        advertise
            .parse::<std::net::SocketAddr>()
            .with_context(|| format!("advertised address {advertise:?} must be ip:port"))?;
        let state_dir: PathBuf = args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| "/var/lib/roost".into());
        let local_socket = file
            .local_socket
            .unwrap_or(true)
            .then(|| state_dir.join(roost_proto::node::local_socket_name(&node_id)));
        let secret_file = args.secret_file.or(file.secret_file);
        let secret = match secret_file {
            Some(path) => Some(roost_runtime::read_secret(&path)?),
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
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
            args.client_ca.or(file.client_ca),
        ) {
            (Some(cert), Some(key), client_ca) => {
                for (option, path) in [("--tls-cert", &cert), ("--tls-key", &key)]
                    .into_iter()
                    .chain(client_ca.as_ref().map(|p| ("--client-ca", p)))
                {
                    std::fs::metadata(path)
                        .with_context(|| format!("{option} {}: cannot read", path.display()))?;
                }
                Some(ListenerTls {
                    cert,
                    key,
                    client_ca,
                })
            }
            (None, None, None) => None,
            (_, _, Some(_)) => anyhow::bail!("--client-ca needs --tls-cert and --tls-key"),
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        Ok(Self {
            etcd,
            tls,
            node_id,
            listen,
            advertise,
            admin: args
                .admin
                .or(file.admin)
                .unwrap_or_else(|| "127.0.0.1:7101".into()),
            local_socket,
            state_dir,
            prefix: args
                .prefix
                .or(file.prefix)
                .unwrap_or_else(|| roost_proto::keys::DEFAULT_PREFIX.into()),
            secret,
            capacity: args.capacity.or(file.capacity).unwrap_or(100).max(1),
            stop_grace: Duration::from_secs(file.stop_grace_secs.unwrap_or(10)),
            lease_ttl_secs: file.lease_ttl_secs.unwrap_or(5).max(2),
            cgroups: file.cgroups.unwrap_or(true),
            max_workers: file.max_workers.unwrap_or(256).max(1),
            memory_budget_mb: file.memory_budget_mb,
            pids_max: file.pids_max.unwrap_or(512).max(8),
            start_timeout: Duration::from_secs(file.start_timeout_secs.unwrap_or(30).max(1)),
            start_queue_limit: file.start_queue_limit.unwrap_or(100).max(1),
            max_crash_backoff: Duration::from_secs(
                file.max_crash_backoff_secs.unwrap_or(30).max(1),
            ),
            log_max_bytes: file.log_max_bytes.unwrap_or(8 << 20).max(4096),
            preload: file.preload.unwrap_or_default(),
            request_threads: file
                .request_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
                .max(1),
            work_stealing: file.work_stealing.unwrap_or(WORK_STEALING_DEFAULT),
            site_users: SiteUserPolicy {
                min_uid: file.min_site_uid.unwrap_or(1000),
                group: file.site_group,
            },
            interpreters: file
                .interpreters
                .unwrap_or_else(|| vec![roost_proto::site::DEFAULT_PYTHON.into()]),
            worker_nofile: file.worker_nofile.unwrap_or(4096).max(64),
            site_limits,
            frameworks,
        })
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

fn default_node_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.to_ascii_lowercase())
        .filter(|h| roost_proto::node::valid_node_id(h))
        .unwrap_or_else(|| "node-1".into())
}

#[cfg(test)]
mod framework_settings_tests {
    use super::*;

    fn from_toml(text: &str) -> Result<FrameworkSettings> {
        FrameworkSettings::from_file(&toml::from_str::<FileConfig>(text)?)
    }

    #[test]
    fn the_example_config_has_the_defaults_and_bad_framework_settings_are_refused() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent.toml");
        let file = read_file_config(&example).expect("the example config parses");
        assert_eq!(
            FrameworkSettings::from_file(&file).unwrap(),
            FrameworkSettings::default()
        );
        let s =
            from_toml("frameworks_max_rss_mb = 64\nframeworks_forbid = [\"django.contrib.gis\"]\n")
                .unwrap();
        assert_eq!(s.max_rss_bytes, 64 << 20);
        assert_eq!(s.forbid, vec!["django.contrib.gis"]);
        for bad in [
            "frameworks_pin = [\"../etc\"]",
            "frameworks_forbid = [\"a b\"]",
            "frameworks_min_sites = 0",
            "frameworks_max = 1000",
        ] {
            assert!(from_toml(bad).is_err(), "{bad}");
        }
    }
}
