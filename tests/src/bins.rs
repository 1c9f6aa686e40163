//! The workspace's binaries under test: `roost-proxy`, `roost-agent`, `roostctl`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::SystemTime;

pub const PROXY: &str = "roost-proxy";
pub const AGENT: &str = "roost-agent";
pub const CTL: &str = "roostctl";

/// Which crate folder builds each binary (to warn about stale binaries).
const SOURCES: &[(&str, &str)] = &[(PROXY, "proxy"), (AGENT, "agent"), (CTL, "ctl")];

static BUILD: Once = Once::new();

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The directory of the running executable (a benchmark finds the binaries beside itself).
pub fn current_exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() {
                d
            } else {
                workspace_root().join(d)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Path of binary `name` in the debug profile. If any binary is missing, `cargo build
/// --workspace --bins` runs once (so a bare `cargo test` works); still missing: panic.
pub fn bin(name: &str) -> PathBuf {
    let all_present = || SOURCES.iter().all(|(b, _)| path_of(b).is_file());
    if !all_present() {
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
            eprintln!(
                "[harness] roost binaries missing; running `{cargo} build --workspace --bins`"
            );
            let status = Command::new(&cargo)
                .args(["build", "--workspace", "--bins"])
                .current_dir(workspace_root())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("[harness] cargo build --workspace --bins failed: {status:?}");
            }
        });
    }
    let p = path_of(name);
    if !p.is_file() {
        panic!(
            "{} not found; build the workspace first: cargo build --workspace --bins",
            p.display()
        );
    }
    warn_if_stale(name, &p);
    p
}

fn path_of(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// Print a warning when a binary is older than a source file of its crate: `cargo test
/// -p roost-tests` does not rebuild other packages' binaries.
fn warn_if_stale(name: &str, bin: &Path) {
    let Some((_, dir)) = SOURCES.iter().find(|(b, _)| *b == name) else {
        return;
    };
    let Some(built) = mtime(bin) else { return };
    let root = workspace_root();
    let newest = [root.join(dir).join("src"), root.join("proto").join("src")]
        .iter()
        .filter_map(|d| newest_mtime(d))
        .max();
    if matches!(newest, Some(n) if n > built) {
        eprintln!(
            "[harness] WARNING: {} is older than its sources; run cargo build --workspace --bins",
            bin.display()
        );
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            mtime(&p)
        };
        newest = newest.max(t);
    }
    newest
}
