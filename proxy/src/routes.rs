//! The routing table: host name → site → ranked nodes, derived from the site and node
//! snapshots and swapped atomically whenever either changes. The request path only ever
//! reads an immutable table.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    /// Built from both prefixes after their first full list: until then an absent site may
    /// exist, so the table can't answer 404.
    pub synced: bool,
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
            synced: false,
            revision,
            exact,
            wildcard,
            nodes: nodes
                .iter()
                .map(|(k, v)| (k.clone(), (**v).clone()))
                .collect(),
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

/// Keeps a [`RouteTable`] current from the two informers, and remembers which nodes
/// recently refused connections.
///
/// The informers are attached after start-up ([`Router::attach`]): in daemon mode pingora
/// forks before its runtimes start, so nothing that owns threads may exist before then.
pub struct Router {
    sites: OnceLock<Arc<Informer<SiteSpec>>>,
    nodes: OnceLock<Arc<Informer<NodeInfo>>>,
    table: ArcSwap<RouteTable>,
    /// Becomes true once a synced table is published.
    synced: tokio::sync::watch::Sender<bool>,
    suspects: Suspects,
}

impl Router {
    pub fn new(suspect_for: Duration) -> Arc<Self> {
        Arc::new(Self {
            sites: OnceLock::new(),
            nodes: OnceLock::new(),
            table: ArcSwap::from_pointee(RouteTable::default()),
            synced: tokio::sync::watch::channel(false).0,
            suspects: Suspects::new(suspect_for),
        })
    }

    /// Attach the informers (once).
    pub fn attach(&self, sites: Arc<Informer<SiteSpec>>, nodes: Arc<Informer<NodeInfo>>) {
        let _ = self.sites.set(sites);
        let _ = self.nodes.set(nodes);
    }

    pub fn sites(&self) -> Option<&Arc<Informer<SiteSpec>>> {
        self.sites.get()
    }

    pub fn nodes(&self) -> Option<&Arc<Informer<NodeInfo>>> {
        self.nodes.get()
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Ready once a table built from both prefixes' first full list is published.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Wait (at most `timeout`) for the first synced table. A proxy that has just taken over
    /// the listening sockets in a binary upgrade, or just started behind a load balancer that
    /// does not check `/readyz`, holds requests for the few milliseconds of its first etcd
    /// list instead of refusing them.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How long ago etcd last confirmed the routing snapshot (the older of the two prefixes);
    /// 0 before the first answer.
    pub fn staleness_ms(&self) -> u64 {
        let s = self.sites.get().map_or(0, |i| i.staleness_ms());
        let n = self.nodes.get().map_or(0, |i| i.staleness_ms());
        s.max(n)
    }

    /// `route`'s nodes, best first, with nodes that recently refused a connection moved to
    /// the end (kept in ranking order among themselves: if all are suspect, nothing changes).
    pub fn ranked(&self, table: &RouteTable, route: &Route) -> Vec<(String, String)> {
        let mut ranked = table.ranked_addrs(route);
        self.suspects.demote(&mut ranked);
        ranked
    }

    /// A connection to `node` failed: try it last for a while.
    pub fn mark_suspect(&self, node: &str) -> bool {
        self.suspects.mark(node)
    }

    /// A connection to `node` worked.
    pub fn clear_suspect(&self, node: &str) {
        self.suspects.clear(node)
    }

    pub fn suspect_count(&self) -> usize {
        self.suspects.count()
    }

    fn rebuild(&self) {
        let (Some(sites), Some(nodes)) = (self.sites.get(), self.nodes.get()) else {
            return;
        };
        // Read the flags before the snapshots: a snapshot read after `is_synced` is at least
        // the first full list.
        let synced = sites.is_synced() && nodes.is_synced();
        let sites = sites.snapshot();
        let nodes = nodes.snapshot();
        let mut table = RouteTable::build(sites.revision, &sites.items, &nodes.items);
        table.synced = synced;
        self.table.store(Arc::new(table));
        if synced {
            self.synced
                .send_if_modified(|s| !std::mem::replace(s, true));
        }
    }

    /// Rebuild the table whenever either snapshot changes. Call after [`Router::attach`].
    pub async fn run(self: Arc<Self>) {
        let (Some(sites), Some(nodes)) = (self.sites.get().cloned(), self.nodes.get().cloned())
        else {
            warn!("router started without informers");
            return;
        };
        let mut sites_rx = sites.subscribe();
        let mut nodes_rx = nodes.subscribe();
        let (mut last_sites, mut last_nodes) = (sites.snapshot(), nodes.snapshot());
        self.rebuild();
        loop {
            tokio::select! {
                r = sites_rx.changed() => if r.is_err() { return },
                r = nodes_rx.changed() => if r.is_err() { return },
            }
            let (s, n) = (sites.snapshot(), nodes.snapshot());
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

/// Nodes that refused a connection recently, each until a deadline. Read on every request,
/// written only on failures: the common case is one relaxed atomic load.
struct Suspects {
    for_how_long: Duration,
    any: AtomicBool,
    until: Mutex<HashMap<String, Instant>>,
}

impl Suspects {
    fn new(for_how_long: Duration) -> Self {
        Self {
            for_how_long,
            any: AtomicBool::new(false),
            until: Mutex::new(HashMap::new()),
        }
    }

    /// Returns true when the node was not suspect before.
    fn mark(&self, node: &str) -> bool {
        if self.for_how_long.is_zero() {
            return false;
        }
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let was = until.get(node).is_some_and(|t| *t > now);
        until.insert(node.to_string(), now + self.for_how_long);
        self.any.store(true, Ordering::Release);
        !was
    }

    fn clear(&self, node: &str) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.remove(node);
        self.any.store(!until.is_empty(), Ordering::Release);
    }

    fn count(&self) -> usize {
        if !self.any.load(Ordering::Acquire) {
            return 0;
        }
        let now = Instant::now();
        let until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.values().filter(|t| **t > now).count()
    }

    fn demote(&self, ranked: &mut Vec<(String, String)>) {
        if !self.any.load(Ordering::Acquire) || ranked.len() < 2 {
            return;
        }
        let now = Instant::now();
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.retain(|_, t| *t > now);
        self.any.store(!until.is_empty(), Ordering::Release);
        if until.is_empty() {
            return;
        }
        let (fine, suspect): (Vec<_>, Vec<_>) = ranked
            .drain(..)
            .partition(|(id, _)| !until.contains_key(id));
        ranked.extend(fine);
        ranked.extend(suspect);
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
        let sites: BTreeMap<String, Arc<SiteSpec>> = sites
            .iter()
            .map(|(h, a)| (h.to_string(), spec(a)))
            .collect();
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
    fn suspect_nodes_go_last_until_they_expire() {
        let s = Suspects::new(Duration::from_millis(200));
        let ranked = || {
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".into(), "2".into()),
                ("c".into(), "3".into()),
            ]
        };
        let order = |v: &Vec<(String, String)>| {
            v.iter()
                .map(|(id, _)| id.clone())
                .collect::<Vec<_>>()
                .join("")
        };
        let mut r = ranked();
        s.demote(&mut r);
        assert_eq!(order(&r), "abc");
        assert!(s.mark("a"));
        assert!(!s.mark("a"));
        s.mark("b");
        let mut r = ranked();
        s.demote(&mut r);
        assert_eq!(order(&r), "cab");
        assert_eq!(s.count(), 2);
        s.clear("b");
        let mut r = ranked();
        s.demote(&mut r);
        assert_eq!(order(&r), "bca");
        std::thread::sleep(Duration::from_millis(250));
        let mut r = ranked();
        s.demote(&mut r);
        assert_eq!(order(&r), "abc");
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn a_site_name_beats_another_sites_alias() {
        let t = table(&[("a.example", &["b.example"]), ("b.example", &[])]);
        assert_eq!(t.lookup("b.example").unwrap().site, "b.example");
    }
}
