//! A real etcd (Debian's etcd-server 3.4) on free loopback ports with a temp data dir.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::ports::free_addr;
use crate::process::{tail, Proc};
use crate::secure_etcd::EtcdTls;
use crate::temp::TempRoot;
use crate::wait::wait_until;

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running single-member etcd. Killed on drop; its data dir goes with its temp root.
pub struct Etcd {
    proc: Proc,
    url: String,
    /// Set when this etcd runs with TLS, client certificates and auth.
    tls: Option<EtcdTls>,
    // Declared last: the directory outlives the process during drop.
    _own_root: Option<TempRoot>,
}

impl Etcd {
    /// Start etcd in a temp dir of its own.
    pub fn start() -> Etcd {
        let root = TempRoot::new("etcd");
        let mut etcd = Etcd::start_in(root.path());
        etcd._own_root = Some(root);
        etcd
    }

    /// Start etcd with its data dir and log under `dir`; wait until it answers.
    pub fn start_in(dir: &Path) -> Etcd {
        Self::launch(dir, None)
    }

    /// Start etcd as production runs it: TLS and `--client-cert-auth` on the client port,
    /// then `deploy/etcd/roles.sh` for `nodes` and `auth enable`. The harness's own etcdctl
    /// acts as root (a certificate with CN=root).
    pub fn start_secured_in(dir: &Path, nodes: &[&str]) -> Etcd {
        let tls = EtcdTls::new(dir);
        let etcd = Self::launch(dir, Some(tls));
        let tls = etcd.tls.as_ref().expect("just set");
        tls.apply_roles(&etcd.url, nodes);
        etcd
    }

    /// TLS material and passwords, when started with [`Etcd::start_secured_in`].
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    fn launch(dir: &Path, tls: Option<EtcdTls>) -> Etcd {
        let client = free_addr();
        let peer = free_addr();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{client}");
        let peer_url = format!("http://{peer}");
        let mut cmd = etcd_command("test", &dir.join("etcd-data"), &url, &peer_url, "new");
        let ctl_args = tls.as_ref().map(|t| t.etcdctl_args()).unwrap_or_default();
        if let Some(tls) = &tls {
            cmd.args(tls.server_args());
        }
        let mut proc = Proc::spawn("etcd", cmd, &dir.join("etcd.log"), Signal::SIGKILL);
        let mut etcd_ok = false;
        let ready = wait_until(START_TIMEOUT, || {
            if proc.exited().is_some() {
                return true;
            }
            etcd_ok = etcdctl_at(&url, &ctl_args, &["endpoint", "health"])
                .status
                .success();
            etcd_ok
        });
        if !ready || !etcd_ok {
            panic!(
                "etcd at {url} did not become healthy within {START_TIMEOUT:?} (exit: {:?}); log tail:\n{}",
                proc.exited(),
                tail(&proc.log(), 30)
            );
        }
        Etcd {
            proc,
            url,
            tls,
            _own_root: None,
        }
    }

    /// The client URL, for `--etcd`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Run `etcdctl` (API v3) against this etcd.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let tls = self
            .tls
            .as_ref()
            .map(|t| t.etcdctl_args())
            .unwrap_or_default();
        etcdctl_at(&self.url, &tls, args)
    }

    /// Run `etcdctl` as etcd user `user` (a client certificate with CN = `user`); only on a
    /// secured etcd.
    pub fn etcdctl_as(&self, user: &str, args: &[&str]) -> Output {
        let tls = self.tls.as_ref().expect("etcdctl_as needs a secured etcd");
        let cert = tls.client_cert(user);
        let flags = [
            format!("--cacert={}", tls.pki.ca_cert().display()),
            format!("--cert={}", cert.cert.display()),
            format!("--key={}", cert.key.display()),
        ];
        etcdctl_at(&self.url, &flags, args)
    }

    /// `etcdctl put KEY VALUE`; panics if it fails.
    pub fn put(&self, key: &str, value: &str) {
        let out = self.etcdctl(&["put", key, value]);
        assert!(
            out.status.success(),
            "etcdctl put {key} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The value at `key`, or `None` when absent.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", key, "--print-value-only"]);
        assert!(
            out.status.success(),
            "etcdctl get {key} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = String::from_utf8_lossy(&out.stdout);
        let v = v.strip_suffix('\n').unwrap_or(&v);
        (!v.is_empty()).then(|| v.to_string())
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

fn etcdctl_at(url: &str, tls: &[String], args: &[&str]) -> Output {
    Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(url)
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=5s")
        .args(tls)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {ETCDCTL}: {e}"))
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // etcd holds no state we need: kill at once.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.pid() as i32),
            Signal::SIGKILL,
        );
        self.proc.stop();
    }
}

/// The command line of a one-member etcd on loopback: `name`, data in `data_dir`, clients
/// on `url`, peers on `peer_url`; `state` is `new` for a first start, `existing` for a
/// restart on the same data.
pub fn etcd_command(
    name: &str,
    data_dir: &Path,
    url: &str,
    peer_url: &str,
    state: &str,
) -> Command {
    let mut cmd = Command::new(ETCD);
    cmd.arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen-client-urls")
        .arg(url)
        .arg("--advertise-client-urls")
        .arg(url)
        .arg("--listen-peer-urls")
        .arg(peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(peer_url)
        .arg("--initial-cluster")
        .arg(format!("{name}={peer_url}"))
        .arg("--initial-cluster-state")
        .arg(state);
    cmd
}
