//! `SiteRoute`: what the proxy keeps of a site record, the fields it routes by.
//!
//! The proxy decodes and validates each record whole ([`SiteSpec`]), so an invalid one is
//! skipped and counted exactly as elsewhere, then keeps only this. At 100,000 sites the
//! user, directory, app and environment it never reads were most of its memory.

use crate::site::SiteSpec;

/// The routing fields of a valid [`SiteSpec`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteRoute {
    /// More host names that serve this site (a boxed slice: no spare capacity kept).
    pub aliases: Box<[String]>,
    /// Pin the site to this node while the node is live.
    pub node: Option<String>,
    /// Seconds a single request may run.
    pub request_timeout: u64,
}

impl From<SiteSpec> for SiteRoute {
    fn from(spec: SiteSpec) -> Self {
        Self {
            aliases: spec.aliases.into_boxed_slice(),
            node: spec.node,
            request_timeout: spec.request_timeout,
        }
    }
}
