//! Resolving a site's unix user to the ids a worker drops to.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};
use thiserror::Error;

use crate::config::SiteUserPolicy;

/// Everything needed to become the user, resolved before fork (the child may not allocate).
#[derive(Debug, Clone)]
pub struct SiteUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub home: String,
}

#[derive(Debug, Error)]
pub enum UserError {
    #[error("unix user {0:?} does not exist on this node")]
    Missing(String),
    #[error("unix user {0:?} has uid 0; sites never run as root")]
    Root(String),
    #[error("unix user {name:?} has uid {uid}, below min_site_uid {min}: system accounts never run sites")]
    BelowMinUid { name: String, uid: u32, min: u32 },
    #[error("unix user {0:?} is not in the site group {1:?} (site_group in the agent's config)")]
    NotInGroup(String, String),
    #[error("site_group {0:?} of the agent's config does not exist on this node")]
    MissingGroup(String),
    #[error("looking up unix user {0:?}: {1}")]
    Lookup(String, nix::Error),
}

impl UserError {
    /// Whether the operator's policy refused the user (rather than the user being absent).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            UserError::Root(_) | UserError::BelowMinUid { .. } | UserError::NotInGroup(..)
        )
    }
}

impl SiteUser {
    pub fn lookup(name: &str) -> Result<Self, UserError> {
        let user = User::from_name(name)
            .map_err(|e| UserError::Lookup(name.into(), e))?
            .ok_or_else(|| UserError::Missing(name.into()))?;
        if user.uid.is_root() {
            return Err(UserError::Root(name.into()));
        }
        let cname = CString::new(name).map_err(|_| UserError::Missing(name.into()))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| UserError::Lookup(name.into(), e))?;
        // Never hand a worker the root group, whatever /etc/group says.
        let groups = groups.into_iter().filter(|g| g.as_raw() != 0).collect();
        Ok(Self {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir.to_string_lossy().into_owned(),
        })
    }

    /// [`SiteUser::lookup`], then the operator's `policy`: a site record can name any user,
    /// so the node decides which ones it lends to sites.
    pub fn lookup_allowed(name: &str, policy: &SiteUserPolicy) -> Result<Self, UserError> {
        let user = Self::lookup(name)?;
        if user.uid.as_raw() < policy.min_uid {
            return Err(UserError::BelowMinUid {
                name: name.into(),
                uid: user.uid.as_raw(),
                min: policy.min_uid,
            });
        }
        if let Some(group) = &policy.group {
            let gid = Group::from_name(group)
                .map_err(|e| UserError::Lookup(name.into(), e))?
                .ok_or_else(|| UserError::MissingGroup(group.clone()))?
                .gid;
            if user.gid != gid && !user.groups.contains(&gid) {
                return Err(UserError::NotInGroup(name.into(), group.clone()));
            }
        }
        Ok(user)
    }
}

/// How long a looked-up user stands at most, for user databases no local file shows (LDAP,
/// sssd): what nscd does, with a shorter time.
const USER_CACHE_TTL: Duration = Duration::from_secs(60);
/// Users kept at most; past it the cache starts over (a host has thousands, not millions).
const USER_CACHE_MAX: usize = 4096;
/// The files whose change voids every cached user.
const USER_FILES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// Site users looked up recently. Every worker start needs its user's ids and groups, and
/// the user and group databases cost ~250 µs on a cold start's path (issue 14); a site's
/// next start, or another site of the same user, takes them from here. An entry stands
/// while `/etc/passwd` and `/etc/group` are unchanged (inode, size, modification time: a
/// user removed from the site group is refused at the next start), under the same policy,
/// and for at most [`USER_CACHE_TTL`]. Refusals are not kept.
pub struct UserCache {
    files: Vec<PathBuf>,
    entries: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    user: SiteUser,
    policy: SiteUserPolicy,
    files: Vec<Option<FileStamp>>,
    at: Instant,
}

/// What tells a file changed: inode (an editor's rename), size, modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp(u64, u64, i64, i64);

impl Default for UserCache {
    fn default() -> Self {
        Self::watching(USER_FILES.iter().map(PathBuf::from).collect())
    }
}

impl UserCache {
    /// A cache voided by any change to `files`.
    fn watching(files: Vec<PathBuf>) -> Self {
        Self {
            files,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn stamps(&self) -> Vec<Option<FileStamp>> {
        self.files
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .map(|m| FileStamp(m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
            })
            .collect()
    }

    /// [`SiteUser::lookup_allowed`], from the cache when nothing it rests on changed.
    pub fn lookup_allowed(
        &self,
        name: &str,
        policy: &SiteUserPolicy,
    ) -> Result<SiteUser, UserError> {
        let files = self.stamps();
        {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = entries.get(name) {
                if c.policy == *policy && c.files == files && c.at.elapsed() < USER_CACHE_TTL {
                    return Ok(c.user.clone());
                }
            }
        }
        let user = SiteUser::lookup_allowed(name, policy)?;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= USER_CACHE_MAX {
            entries.clear();
        }
        entries.insert(
            name.to_string(),
            Cached {
                user: user.clone(),
                policy: policy.clone(),
                files,
                at: Instant::now(),
            },
        );
        Ok(user)
    }

    #[cfg(test)]
    fn holds(&self, name: &str) -> bool {
        self.entries.lock().unwrap().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min_uid: u32, group: Option<&str>) -> SiteUserPolicy {
        SiteUserPolicy {
            min_uid,
            group: group.map(str::to_string),
        }
    }

    // Against the host's real accounts: `root` and `daemon` (uid 1, group `daemon`) exist on
    // every Debian system.
    #[test]
    fn the_operators_policy_refuses_root_system_accounts_and_users_outside_the_site_group() {
        let err = SiteUser::lookup_allowed("root", &policy(0, None)).unwrap_err();
        assert!(matches!(err, UserError::Root(_)) && err.is_refusal());
        let err = SiteUser::lookup_allowed("daemon", &policy(1000, None)).unwrap_err();
        assert!(
            matches!(
                err,
                UserError::BelowMinUid {
                    uid: 1,
                    min: 1000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_refusal());
        assert_eq!(
            SiteUser::lookup_allowed("daemon", &policy(1, Some("daemon")))
                .unwrap()
                .uid
                .as_raw(),
            1
        );
        let err = SiteUser::lookup_allowed("daemon", &policy(1, Some("root"))).unwrap_err();
        assert!(matches!(err, UserError::NotInGroup(..)), "{err}");
        let err = SiteUser::lookup_allowed("daemon", &policy(1, Some("roost-no-such-group")))
            .unwrap_err();
        assert!(
            matches!(err, UserError::MissingGroup(_)) && !err.is_refusal(),
            "{err}"
        );
    }

    #[test]
    fn a_cached_user_stands_until_the_files_or_the_policy_change() {
        let dir = std::env::temp_dir().join(format!("roost-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = dir.join("passwd");
        std::fs::write(&passwd, "one\n").unwrap();
        let cache = UserCache::watching(vec![passwd.clone()]);
        let open = policy(1, Some("daemon"));
        let daemon = cache.lookup_allowed("daemon", &open).unwrap();
        let looked_up = cache.entries.lock().unwrap()["daemon"].at;
        // Served from the cache: the same answer, the entry not renewed.
        assert_eq!(
            cache.lookup_allowed("daemon", &open).unwrap().uid,
            daemon.uid
        );
        assert_eq!(cache.entries.lock().unwrap()["daemon"].at, looked_up);
        // A stricter policy is checked, not answered from the cache.
        let err = cache
            .lookup_allowed("daemon", &policy(1000, None))
            .unwrap_err();
        assert!(matches!(err, UserError::BelowMinUid { .. }), "{err}");
        // The watched file changes (size): the entry is looked up again and replaced.
        std::fs::write(&passwd, "one\ntwo\n").unwrap();
        cache.lookup_allowed("daemon", &open).unwrap();
        assert!(cache.entries.lock().unwrap()["daemon"].at > looked_up);
        // Refusals are never kept.
        assert!(cache.lookup_allowed("root", &policy(0, None)).is_err());
        assert!(!cache.holds("root"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
