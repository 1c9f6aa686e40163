//! The routing table: host name → site → ranked nodes, derived from the site and node
//! snapshots and swapped atomically whenever either changes. The request path only ever
//! reads an immutable table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use roost_proto::{placement, Informer, NodeInfo, SiteSpec};
use tracing::warn;

/// A routable site.
#[derive(Debug)]
pub struct Route {
    /// The site's canonical host (its key in etcd).
    pub site: String,
    pub spec: Arc<SiteSpec>,
}

/// One immutable view of every route and every live node.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The revision of the site snapshot this table was built from, passed to agents so one
    /// that has not yet seen a new site waits for it instead of answering 404.
    pub revision: i64,
    exact: HashMap<String, Arc<Route>>,
    /// `*.example.com` aliases, stored without the `*.`.
    wildcard: HashMap<String, Arc<Route>>,
    pub nodes: BTreeMap<String, NodeInfo>,
}

impl RouteTable {
    pub fn build(
        revision: i64,
        sites: &BTreeMap<String, Arc<SiteSpec>>,
        nodes: &BTreeMap<String, Arc<NodeInfo>>,
    ) -> Self {
        let mut exact: HashMap<String, Arc<Route>> = HashMap::new();
        let mut wildcard: HashMap<String, Arc<Route>> = HashMap::new();
        // Site keys first: a site's own name always beats another site's alias.
        for (host, spec) in sites {
            let route = Arc::new(Route {
                site: host.clone(),
                spec: spec.clone(),
            });
            exact.insert(host.clone(), route);
        }
        // BTreeMap order makes alias conflicts resolve the same way on every proxy.
        for (host, spec) in sites {
            let route = exact[host].clone();
            for alias in &spec.aliases {
                let (table, name) = match alias.strip_prefix("*.") {
                    Some(suffix) => (&mut wildcard, suffix.to_string()),
                    None => (&mut exact, alias.clone()),
                };
                match table.get(&name) {
                    Some(existing) if existing.site != *host => {
                        warn!(alias = %alias, site = %host, owner = %existing.site,
                            "alias already belongs to another site; ignored here");
                    }
                    _ => {
                        table.insert(name, route.clone());
                    }
                }
            }
        }
        Self {
            revision,
            exact,
            wildcard,
            nodes: nodes.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect(),
        }
    }

    /// The site serving canonical host `host`: an exact name or alias, else the closest
    /// wildcard alias (`a.b.example.com` tries `*.b.example.com`, then `*.example.com`).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        if let Some(r) = self.exact.get(host) {
            return Some(r);
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(r) = self.wildcard.get(parent) {
                return Some(r);
            }
            rest = parent;
        }
        None
    }

    /// Agent addresses for `route`, best first.
    pub fn ranked_addrs(&self, route: &Route) -> Vec<(String, String)> {
        placement::rank(&route.site, route.spec.node.as_deref(), &self.nodes)
            .into_iter()
            .map(|(id, n)| (id.to_string(), n.addr.clone()))
            .collect()
    }
}

/// Keeps a [`RouteTable`] current from the two informers.
pub struct Router {
    pub sites: Arc<Informer<SiteSpec>>,
    pub nodes: Arc<Informer<NodeInfo>>,
    table: ArcSwap<RouteTable>,
}

impl Router {
    pub fn new(sites: Arc<Informer<SiteSpec>>, nodes: Arc<Informer<NodeInfo>>) -> Arc<Self> {
        Arc::new(Self {
            sites,
            nodes,
            table: ArcSwap::from_pointee(RouteTable::default()),
        })
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Ready once both prefixes have been listed at least once.
    pub fn is_synced(&self) -> bool {
        self.sites.is_synced() && self.nodes.is_synced()
    }

    fn rebuild(&self) {
        let sites = self.sites.snapshot();
        let nodes = self.nodes.snapshot();
        let table = RouteTable::build(sites.revision, &sites.items, &nodes.items);
        self.table.store(Arc::new(table));
    }

    /// Rebuild the table whenever either snapshot changes.
    pub async fn run(self: Arc<Self>) {
        let mut sites_rx = self.sites.subscribe();
        let mut nodes_rx = self.nodes.subscribe();
        let (mut last_sites, mut last_nodes) = (self.sites.snapshot(), self.nodes.snapshot());
        self.rebuild();
        loop {
            tokio::select! {
                r = sites_rx.changed() => if r.is_err() { return },
                r = nodes_rx.changed() => if r.is_err() { return },
            }
            let (s, n) = (self.sites.snapshot(), self.nodes.snapshot());
            // Most wake-ups are progress notifications: nothing to rebuild.
            if Arc::ptr_eq(&s, &last_sites) && Arc::ptr_eq(&n, &last_nodes) {
                continue;
            }
            last_sites = s;
            last_nodes = n;
            self.rebuild();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(aliases: &[&str]) -> Arc<SiteSpec> {
        let mut s = SiteSpec::new_app("alice", "app:application", "/srv/a");
        s.aliases = aliases.iter().map(|a| a.to_string()).collect();
        Arc::new(s)
    }

    fn table(sites: &[(&str, &[&str])]) -> RouteTable {
        let sites: BTreeMap<String, Arc<SiteSpec>> =
            sites.iter().map(|(h, a)| (h.to_string(), spec(a))).collect();
        RouteTable::build(1, &sites, &BTreeMap::new())
    }

    #[test]
    fn exact_names_and_aliases_route() {
        let t = table(&[("a.example", &["www.a.example"])]);
        assert_eq!(t.lookup("a.example").unwrap().site, "a.example");
        assert_eq!(t.lookup("www.a.example").unwrap().site, "a.example");
        assert!(t.lookup("b.example").is_none());
    }

    #[test]
    fn wildcards_route_and_exact_names_win() {
        let t = table(&[("a.example", &["*.a.example"]), ("shop.a.example", &[])]);
        assert_eq!(t.lookup("x.a.example").unwrap().site, "a.example");
        assert_eq!(t.lookup("deep.x.a.example").unwrap().site, "a.example");
        assert_eq!(t.lookup("shop.a.example").unwrap().site, "shop.a.example");
        assert!(t.lookup("a.example.org").is_none());
    }

    #[test]
    fn a_site_name_beats_another_sites_alias() {
        let t = table(&[("a.example", &["b.example"]), ("b.example", &[])]);
        assert_eq!(t.lookup("b.example").unwrap().site, "b.example");
    }
}
