//! Resolving a site's unix user to the ids a worker drops to.

use std::ffi::CString;

use nix::unistd::{Gid, Uid, User};
use thiserror::Error;

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
    #[error("looking up unix user {0:?}: {1}")]
    Lookup(String, nix::Error),
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
}
