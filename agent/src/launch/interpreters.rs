//! Which Python a site's zygote may be: the zygote runs as root, so the operator decides
//! (`interpreters` in the agent's config), never the tenant (issue 10).
//!
//! - A site's `python` (or the default one) must be an allowlist entry, compared as
//!   written: the agent never resolves a path the site record names.
//! - A virtualenv is accepted when the `home` of its `pyvenv.cfg` (the directory of the
//!   interpreter it was made from) is an allowed interpreter's directory. Its `bin/python`,
//!   a symlink the tenant owns, is never resolved nor run as root: the allowed
//!   interpreter's zygote forks the worker, which puts the virtualenv's site-packages on
//!   its path after dropping to the site's user.
//! - `pyvenv.cfg` lies in the tenant's directory, so root opens it with `openat2` and
//!   `RESOLVE_NO_SYMLINKS` (no symlink anywhere on its path) and reads it only if it is a
//!   small regular file.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use roost_proto::SiteSpec;

use super::zygote::trusted_interpreter;

/// A `pyvenv.cfg` is a few lines; a larger file is not one.
const MAX_PYVENV_CFG: u64 = 64 * 1024;

/// How long an allowlist entry's resolution (its real path, and that it is root's alone
/// down from `/`) is reused before the disk is looked at again. Resolving one is a dozen
/// system calls, and it came first on every cold start's path, before the zygote was even
/// asked: 42 µs of a start's launcher part (issue 14, the start timings' `interpreter_us`).
/// An interpreter made untrusted (a directory on its path made writable) is refused within
/// this long; the zygote it already runs was checked when it started.
const RECHECK_AFTER: Duration = Duration::from_secs(5);

static TRUSTED: TrustCache = TrustCache::new(RECHECK_AFTER);

/// An entry as written, when it was checked, and what the check said.
type Resolution = (PathBuf, Instant, Result<PathBuf, String>);

/// Allowlist entries as a check resolved them, each reused for `ttl`.
struct TrustCache {
    ttl: Duration,
    entries: Mutex<Vec<Resolution>>,
}

impl TrustCache {
    const fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// `check(entry)`, or its result from less than `ttl` before `now`.
    fn resolve(
        &self,
        entry: &Path,
        now: Instant,
        check: impl FnOnce(&Path) -> Result<PathBuf, String>,
    ) -> Result<PathBuf, String> {
        let lock = || self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, result)) = lock()
            .iter()
            .find(|(p, at, _)| p == entry && now.saturating_duration_since(*at) < self.ttl)
        {
            return result.clone();
        }
        // Checked without the lock: other starts go on meanwhile.
        let result = check(entry);
        let mut entries = lock();
        entries.retain(|(p, _, _)| p != entry);
        entries.push((entry.to_path_buf(), now, result.clone()));
        result
    }
}

/// The real path of the interpreter whose zygote may fork `spec`'s workers, or why none may.
pub fn for_site(spec: &SiteSpec, allowed: &[PathBuf]) -> Result<PathBuf, String> {
    // The operator's own entries are resolved (and must be root's alone); the site's never.
    let entries: Vec<(PathBuf, PathBuf)> = allowed
        .iter()
        .filter_map(|p| {
            TRUSTED
                .resolve(p, Instant::now(), trusted_interpreter)
                .ok()
                .map(|real| (p.clone(), real))
        })
        .collect();
    let listed = || {
        allowed
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if spec.python.is_none() {
        if let Some(venv) = &spec.virtualenv {
            let home = pyvenv_home(Path::new(venv))?;
            return entries
                .iter()
                .find(|(written, real)| {
                    written.parent() == Some(home.as_path()) || real.parent() == Some(home.as_path())
                })
                .map(|(_, real)| real.clone())
                .ok_or_else(|| {
                    format!(
                        "virtualenv {venv} was made from {}, not from an interpreter this node allows ({}; `interpreters` in the agent's config)",
                        home.display(),
                        listed()
                    )
                });
        }
    }
    let python = PathBuf::from(spec.interpreter());
    entries
        .iter()
        .find(|(written, real)| *written == python || *real == python)
        .map(|(_, real)| real.clone())
        .ok_or_else(|| {
            format!(
                "python {} is not an interpreter this node allows ({}; `interpreters` in the agent's config)",
                python.display(),
                listed()
            )
        })
}

/// The `home` line of `<venv>/pyvenv.cfg`, read without following any symlink.
fn pyvenv_home(venv: &Path) -> Result<PathBuf, String> {
    let cfg = venv.join("pyvenv.cfg");
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd = openat2(AT_FDCWD, &cfg, how).map_err(|e| {
        format!(
            "cannot read {} without following a symlink: {e}",
            cfg.display()
        )
    })?;
    let mut file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", cfg.display()))?;
    if !meta.is_file() || meta.size() > MAX_PYVENV_CFG {
        return Err(format!(
            "{} is not a virtualenv's pyvenv.cfg",
            cfg.display()
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", cfg.display()))?;
    parse_home(&text).ok_or_else(|| format!("{} has no home line", cfg.display()))
}

fn parse_home(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "home").then(|| PathBuf::from(value.trim().trim_end_matches('/')))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_checked_again_once_its_resolution_is_older_than_the_ttl() {
        let cache = TrustCache::new(Duration::from_secs(5));
        let checks = std::cell::Cell::new(0);
        let check = |p: &Path| -> Result<PathBuf, String> {
            checks.set(checks.get() + 1);
            Ok(p.with_extension("11"))
        };
        let (entry, t0) = (Path::new("/usr/bin/python3"), Instant::now());
        let real = PathBuf::from("/usr/bin/python3.11");
        assert_eq!(cache.resolve(entry, t0, check), Ok(real.clone()));
        let later = t0 + Duration::from_secs(4);
        assert_eq!(cache.resolve(entry, later, check), Ok(real.clone()));
        assert_eq!(checks.get(), 1, "reused within the ttl");
        let expired = t0 + Duration::from_secs(5);
        assert_eq!(cache.resolve(entry, expired, check), Ok(real));
        assert_eq!(checks.get(), 2, "checked again after it");
        // A refusal is reused as well, and another entry is its own.
        let refuse = |_: &Path| -> Result<PathBuf, String> { Err("not root's".into()) };
        let other = Path::new("/opt/python3");
        assert!(cache.resolve(other, t0, refuse).is_err());
        assert!(cache.resolve(other, t0, check).is_err());
        assert_eq!(checks.get(), 2);
    }

    #[test]
    fn the_home_line_is_found_among_the_others() {
        let text = "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.2\n";
        assert_eq!(parse_home(text), Some(PathBuf::from("/usr/bin")));
        assert_eq!(parse_home("version = 3.11\n"), None);
    }
}
