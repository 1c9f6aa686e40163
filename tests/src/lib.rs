//! Harness for Roost's integration tests: real etcd, the workspace's real binaries, real
//! unix users running real Python workers, and a raw HTTP/1.1 client.
//!
//! Every test builds its own [`Cluster`] (etcd + one agent + one proxy on free loopback
//! ports, in its own temp directory), so tests run in parallel within one test binary.
//! Everything started is stopped by `Drop` guards, also when a test panics; on a panic the
//! tails of every log are printed and the temp directory is kept.

pub mod bins;
pub mod bulk;
pub mod cluster;
pub mod edge;
pub mod etcd;
pub mod frameworks;
pub mod http;
pub mod latency;
pub mod launcher;
pub mod load;
pub mod ports;
pub mod process;
pub mod procfs;
pub mod prometheus;
pub mod secure_etcd;
pub mod temp;
pub mod users;
pub mod wait;

pub use cluster::{Cluster, Options};
pub use etcd::Etcd;
pub use http::{get, Response};
pub use temp::TempRoot;
pub use users::{ensure_user, site_dir, system_user, User};
pub use wait::{wait_for, wait_until};

/// Hold `lock` for the rest of a test, so that the tests of one file that take it run one at
/// a time (a test that measures latency within its run can't share two cores with another
/// cluster). A lock poisoned by a failed test still serialises the rest.
pub fn one_at_a_time(lock: &'static std::sync::Mutex<()>) -> std::sync::MutexGuard<'static, ()> {
    lock.lock().unwrap_or_else(|p| p.into_inner())
}

/// Source of the echo app (`tests/apps/echo/app.py`): a WSGI `application` that answers
/// with JSON: `environ` (str values only), `pid`, `ppid`, `uid`, `euid`, `gid`, `groups`,
/// `cwd` and `os_environ`.
pub const ECHO_APP: &str = include_str!("../apps/echo/app.py");

/// Source of the misbehaving app (`tests/apps/misbehave/app.py`): `/sleep?secs=N`,
/// `/hog?mb=N`, `/crash`; `/` answers JSON with `pid`, `ppid`, `uid` and `ROOST_TEST_*` env.
pub const MISBEHAVE_APP: &str = include_str!("../apps/misbehave/app.py");

/// The WSGI entry point of [`ECHO_APP`] as `roostctl --app` takes it.
pub const ECHO_ENTRY: &str = "app:application";
