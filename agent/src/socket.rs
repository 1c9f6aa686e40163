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

/// A bound, listening unix socket for one site.
#[derive(Debug)]
pub struct SiteSocket {
    pub path: PathBuf,
    pub listener: UnixListener,
    pub uid: Uid,
}

impl SiteSocket {
    /// Create (or re-create, after an agent restart) the socket of `host` for `uid`/`gid`.
    pub fn create(state_dir: &Path, host: &str, uid: Uid, gid: Gid) -> io::Result<Self> {
        let sites = state_dir.join("sites");
        ensure_dir(&sites, 0o711)?;
        let dir = sites.join(host);
        ensure_dir(&dir, 0o700)?;
        chown(&dir, Some(uid), Some(gid)).map_err(io::Error::from)?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let path = dir.join("sock");
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        chown(&path, Some(uid), Some(gid)).map_err(io::Error::from)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            path,
            listener,
            uid,
        })
    }

    /// Remove the socket and its directory (the site is gone from this node).
    pub fn remove(self) {
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Create `dir` (and parents) if missing and set its mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}
