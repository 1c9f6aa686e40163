//! The site's listening socket, owned by the agent (DESIGN.md, decision 3).
//!
//! The agent binds it once and keeps it for as long as the site exists: workers come and go,
//! but connections wait in this socket's backlog, so a request that arrives while no worker
//! runs is served by the next one. Layout under the state directory:
//!
//! ```text
//! sites/            0711 root   (traversable, not listable)
//! sites/<host>/     0700 user   only the site's user (and root) can reach the socket
//! sites/<host>/sock 0600 user
//! ```

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::unistd::{chown, Gid, Uid};

/// The file name of the socket requests go to, and of a new spec's worker's socket until
/// that worker has answered (then it is renamed over the first).
pub const SERVING: &str = "sock";
pub const CANDIDATE: &str = "sock.next";

/// Bind (or re-bind, after an agent restart) `<state-dir>/sites/<host>/<name>` for
/// `uid`/`gid`; returns the listener and its path.
pub fn bind(
    state_dir: &Path,
    host: &str,
    name: &str,
    uid: Uid,
    gid: Gid,
) -> io::Result<(UnixListener, PathBuf)> {
    let sites = state_dir.join("sites");
    ensure_dir(&sites, 0o711)?;
    let dir = sites.join(host);
    ensure_dir(&dir, 0o700)?;
    chown(&dir, Some(uid), Some(gid)).map_err(io::Error::from)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    chown(&path, Some(uid), Some(gid)).map_err(io::Error::from)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok((listener, path))
}

/// Remove the site's socket directory (the site is gone from this node).
pub fn remove(state_dir: &Path, host: &str) {
    let _ = fs::remove_dir_all(state_dir.join("sites").join(host));
}

/// Create `dir` (and parents) if missing and set its mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}
