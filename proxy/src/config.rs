//! The proxy's settings: command-line flags over an optional TOML file over defaults that
//! work on one machine.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use serde::Deserialize;

/// roost-proxy: the edge. Routes each request by its Host to the node that serves the site.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// etcd endpoints, comma separated.
    #[arg(long, env = "ROOST_ETCD")]
    pub etcd: Option<String>,
    /// Where clients (or the load balancer) connect.
    #[arg(long)]
    pub listen: Option<String>,
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
    /// Request-handling threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    etcd: Option<String>,
    listen: Option<String>,
    admin: Option<String>,
    prefix: Option<String>,
    secret_file: Option<PathBuf>,
    threads: Option<usize>,
    grace_period_secs: Option<u64>,
    max_node_attempts: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub etcd: String,
    pub listen: String,
    pub admin: String,
    pub prefix: String,
    pub secret: Option<Vec<u8>>,
    pub threads: usize,
    /// After SIGTERM, how long to keep finishing requests in flight.
    pub grace_period_secs: u64,
    /// How many nodes of a site's ranking to try when connecting fails.
    pub max_node_attempts: usize,
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
            Some(path) => Some(read_secret(&path)?),
            None => None,
        };
        Ok(Self {
            etcd: args
                .etcd
                .or(file.etcd)
                .unwrap_or_else(|| roost_proto::etcd::DEFAULT_ENDPOINTS.into()),
            listen: args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:8080".into()),
            admin: args.admin.or(file.admin).unwrap_or_else(|| "127.0.0.1:9090".into()),
            prefix: args
                .prefix
                .or(file.prefix)
                .unwrap_or_else(|| roost_proto::keys::DEFAULT_PREFIX.into()),
            secret,
            threads: args
                .threads
                .or(file.threads)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            grace_period_secs: file.grace_period_secs.unwrap_or(3),
            max_node_attempts: file.max_node_attempts.unwrap_or(3).max(1),
        })
    }
}

fn read_secret(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading secret file {}", path.display()))?;
    let secret = text.trim();
    if secret.len() < 16 {
        anyhow::bail!("secret file {} holds {} characters; use at least 16", path.display(), secret.len());
    }
    Ok(secret.as_bytes().to_vec())
}
