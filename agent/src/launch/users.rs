//! Resolving a site's unix user to the ids a worker drops to.

use std::ffi::CString;

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
}
