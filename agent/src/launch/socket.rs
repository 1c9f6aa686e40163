//! The site's listening socket, owned by the agent (DESIGN.md, decision 3).
//!
//! The agent binds it once and keeps it for as long as the site exists: workers come and go,
//! but connections wait in this socket's backlog, so a request that arrives while no worker
//! runs is served by the next one. Layout under the state directory:
//!
//! ```text
//! sites/            0711 root   (traversable, not listable)
//! sites/<host>/     0700 root   only root reaches the socket by path
//! sites/<host>/sock 0600 root
//! ```
//!
//! (A never-started site's socket is bound ahead at `sites/.ready-<n>/sock` and its
//! directory renamed to `sites/<host>`: `ready.rs`.)
//!
//! The worker gets the socket as fd 3 and never needs its path, so no directory on the
//! way to it is the tenant's: root never resolves a path a tenant can redirect with a
//! symlink (an earlier layout gave `sites/<host>/` to the site's user, and a tenant who
//! renamed a symlink over `sock` between the agent's bind and its chown/chmod got root to
//! chown any file). A directory left from that layout is replaced, not reused.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The file name of the socket requests go to, and of a new spec's worker's socket until
/// that worker has answered (then it is renamed over the first).
pub const SERVING: &str = "sock";
pub const CANDIDATE: &str = "sock.next";

/// Bind (or re-bind, after an agent restart) `<state-dir>/sites/<host>/<name>`; returns the
/// listener and its path.
pub fn bind(state_dir: &Path, host: &str, name: &str) -> io::Result<(UnixListener, PathBuf)> {
    let sites = state_dir.join("sites");
    ensure_dir(&sites, 0o711)?;
    let dir = sites.join(host);
    ensure_root_only_dir(&dir)?;
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, &path)),
    }
    let listener = UnixListener::bind(&path).map_err(|e| with_path(e, &path))?;
    // Safe by path: the directory is root's alone, nobody else can put a symlink here.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(|e| with_path(e, &path))?;
    Ok((listener, path))
}

/// Remove the site's socket directory (the site is gone from this node). `remove_dir_all`
/// never follows a symlink inside the tree.
/// A serving socket bound ahead of any site, for the next never-started site's worker
/// (`launch/ready.rs`): `sites/<placeholder>/sock`, in a directory as root-only as a site's.
/// Returns the listener and the path it was bound at (its address from then on).
pub fn make_ready_socket(
    state_dir: &Path,
    placeholder: &str,
) -> io::Result<(UnixListener, PathBuf)> {
    bind(state_dir, placeholder, SERVING)
}

/// Make the directory of [`make_ready_socket`] the socket directory of `host`: the socket
/// is then reached at `sites/<host>/sock`, and keeps its placeholder path as its address.
/// Refuses, and changes nothing, when `host` has a directory already. Returns the new path.
pub fn claim_ready_socket(state_dir: &Path, placeholder: &str, host: &str) -> io::Result<PathBuf> {
    let sites = state_dir.join("sites");
    let dir = sites.join(host);
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &sites.join(placeholder),
        nix::fcntl::AT_FDCWD,
        &dir,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| with_path(e.into(), &dir))?;
    Ok(dir.join(SERVING))
}

pub fn remove(state_dir: &Path, host: &str) {
    let _ = fs::remove_dir_all(state_dir.join("sites").join(host));
}

/// Create `dir` (and parents) if missing and set its mode. `dir` itself must then be a real
/// directory (not a symlink) owned by the agent's user: it is where root works by path.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| with_path(e, dir))?;
    let meta = fs::symlink_metadata(dir).map_err(|e| with_path(e, dir))?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "{} is not a directory of the agent's own user; refusing to work in it",
            dir.display()
        )));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|e| with_path(e, dir))
}

/// `dir` as a directory only the agent's user can enter. Its parent is the agent's own, so
/// the checks below can't be raced; anything else found there (a site user's directory
/// from the earlier layout, a symlink) is removed first.
fn ensure_root_only_dir(dir: &Path) -> io::Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == me && m.mode() & 0o7777 == 0o700 => return Ok(()),
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(dir).map_err(|e| with_path(e, dir))?;
            tracing::info!(dir = %dir.display(), "replaced a site socket directory of an earlier layout");
        }
        Ok(_) => fs::remove_file(dir).map_err(|e| with_path(e, dir))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, dir)),
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| with_path(e, dir))?;
    // The umask may have taken bits away; the mode must be exact for the check above.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| with_path(e, dir))
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}
