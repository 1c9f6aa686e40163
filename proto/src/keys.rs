//! The etcd key layout (DESIGN.md, "etcd layout").
//!
//! ```text
//! <prefix>/sites/<canonical host>  -> SiteSpec JSON
//! <prefix>/nodes/<node id>         -> NodeInfo JSON, under the agent's lease
//! <prefix>/certs/<canonical host>  -> CertRecord JSON (PEM chain + key) the proxy serves by SNI;
//!                                     `*.<host>` for a wildcard certificate
//! <prefix>/aliases/<alias>         -> the canonical host of the site claiming the alias
//!                                     (`*.<host>` for a wildcard alias); written by roostctl
//!                                     in the same transaction as the site, so it can check
//!                                     a name without reading every site. Proxy and agent
//!                                     never read it: a site written with plain etcdctl,
//!                                     with no index entry, routes all the same.
//! ```

/// The default prefix under which every Roost key lives.
pub const DEFAULT_PREFIX: &str = "/roost";

/// Key layout under one configurable prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Default for Layout {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Layout {
    /// A layout under `prefix`; a trailing `/` is ignored so `/roost` and `/roost/` agree.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/sites/`: list or watch this to see every site.
    pub fn sites_prefix(&self) -> String {
        format!("{}/sites/", self.prefix)
    }

    /// `<prefix>/nodes/`: list or watch this to see every live node.
    pub fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// `<prefix>/certs/`: list or watch this to see every TLS certificate.
    pub fn certs_prefix(&self) -> String {
        format!("{}/certs/", self.prefix)
    }

    /// The key of the certificate for `host` (canonical, or `*.` + canonical).
    pub fn cert_key(&self, host: &str) -> String {
        format!("{}{}", self.certs_prefix(), host)
    }

    /// The key of one site; `host` must already be canonical.
    pub fn site_key(&self, host: &str) -> String {
        format!("{}{}", self.sites_prefix(), host)
    }

    /// `<prefix>/aliases/`: roostctl's index of which site claims each alias.
    pub fn aliases_prefix(&self) -> String {
        format!("{}/aliases/", self.prefix)
    }

    /// The index key of one alias (exact, or `*.` + a canonical host).
    pub fn alias_key(&self, alias: &str) -> String {
        format!("{}{}", self.aliases_prefix(), alias)
    }

    /// The key of one node.
    pub fn node_key(&self, node_id: &str) -> String {
        format!("{}{}", self.nodes_prefix(), node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_built_under_the_prefix() {
        let l = Layout::new("/roost/");
        assert_eq!(l.site_key("example.com"), "/roost/sites/example.com");
        assert_eq!(l.node_key("n1"), "/roost/nodes/n1");
        assert_eq!(Layout::default().sites_prefix(), "/roost/sites/");
        assert_eq!(l.cert_key("*.example.com"), "/roost/certs/*.example.com");
        assert_eq!(l.alias_key("*.example.com"), "/roost/aliases/*.example.com");
    }
}
