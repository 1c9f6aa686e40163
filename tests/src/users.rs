//! Unix users for sites, and site directories they own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use nix::unistd::{chown, Gid, Uid};

/// A unix user the harness made sure exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

static USERADD: Mutex<()> = Mutex::new(());

/// The agent's default `min_site_uid` (Debian's `UID_MIN`): site users are regular users.
pub const MIN_SITE_UID: u32 = 1000;

/// Make sure regular user `name` (uid >= [`MIN_SITE_UID`]) exists (`useradd --create-home
/// --shell /usr/sbin/nologin NAME` if absent) and return its ids. Idempotent, safe in
/// parallel within a test binary. A user an older harness made with `--system` (uid below
/// 1000, which the agent refuses for sites) is deleted and made again.
pub fn ensure_user(name: &str) -> User {
    let _guard = USERADD.lock().unwrap_or_else(|e| e.into_inner());
    match lookup(name) {
        Some(u) if u.uid >= MIN_SITE_UID => return u,
        Some(_) => run_user_tool("userdel", &[name], name),
        None => {}
    }
    run_user_tool(
        "useradd",
        &["--create-home", "--shell", "/usr/sbin/nologin", name],
        name,
    );
    lookup(name).unwrap_or_else(|| panic!("user {name} still absent after useradd"))
}

/// Run `useradd`/`userdel`; exit code 9 of useradd (the name exists: another test binary
/// made it meanwhile) is fine.
fn run_user_tool(tool: &str, args: &[&str], name: &str) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {tool} (tests need root): {e}"));
    let name_taken = tool == "useradd" && out.status.code() == Some(9);
    if !out.status.success() && !name_taken {
        panic!(
            "{tool} {name} failed ({}): {} (tests need root; userdel fails while a process runs as the user)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A system account (uid below [`MIN_SITE_UID`]) that exists on every Debian host.
pub fn system_user(name: &str) -> User {
    lookup(name).unwrap_or_else(|| panic!("system user {name} is missing"))
}

fn lookup(name: &str) -> Option<User> {
    let u =
        nix::unistd::User::from_name(name).unwrap_or_else(|e| panic!("getpwnam({name}): {e}"))?;
    Some(User {
        name: name.to_string(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

/// Make `base/<user>-<tag>/` owned by `user` (0755) with `app.py` = `app_source` in it,
/// and return its path. `base` must be traversable by the user (a [`crate::TempRoot`] is).
pub fn site_dir(base: &Path, user: &User, tag: &str, app_source: &str) -> PathBuf {
    let dir = base.join(format!("{}-{tag}", user.name));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let app = dir.join("app.py");
    std::fs::write(&app, app_source).unwrap_or_else(|e| panic!("write {}: {e}", app.display()));
    for (p, mode) in [(&dir, 0o755), (&app, 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        chown(
            p.as_path(),
            Some(Uid::from_raw(user.uid)),
            Some(Gid::from_raw(user.gid)),
        )
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
    }
    dir
}
