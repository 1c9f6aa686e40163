//! The routing table: host name → site → ranked nodes. It is the site informer's snapshot
//! (whose [`HostIndex`](roost_proto::hosts::HostIndex) holds keys, aliases and wildcards,
//! updated per event) plus the live node set, swapped atomically whenever either changes.
//! Publishing a table is O(1) for a site change and O(nodes) for a node change; a lookup
//! is an O(log N) search per label of the name, and a site's node ranking is cached until the node set
//! changes. The request path only ever reads an immutable table. A site is held as its
//! [`SiteRoute`] (the fields routing reads), not the whole record: that keeps the proxy's
//! memory per site small.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use roost_proto::hosts::{HostIndex, Site};
use roost_proto::placement::{NodeSet, Ranking};
use roost_proto::{Informer, NodeInfo, SiteRoute, Snapshot};
use tracing::{info, warn};

/// A routable site: its key, routing fields and cached ranking.
pub type Route = Site<SiteRoute>;

/// The sites informer the proxy routes by: each record's routing fields (validated whole,
/// kept in part) plus the host index over them.
pub type SiteInformer = Informer<SiteRoute, HostIndex<SiteRoute>>;
/// One published view of it.
pub type SiteSnapshot = Snapshot<SiteRoute, HostIndex<SiteRoute>>;

/// One immutable view of every route and every live node.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Built from both prefixes after their first full list: until then an absent site may
    /// exist, so the table can't answer 404.
    pub synced: bool,
    /// The revision of the site snapshot this table was built from, passed to agents so one
    /// that has not yet seen a new site waits for it instead of answering 404.
    pub revision: i64,
    sites: Arc<SiteSnapshot>,
    pub nodes: Arc<NodeSet>,
}

impl RouteTable {
    pub fn new(sites: Arc<SiteSnapshot>, nodes: Arc<NodeSet>) -> Self {
        Self {
            synced: false,
            revision: sites.revision,
            sites,
            nodes,
        }
    }

    /// The site serving canonical host `host` (see [`roost_proto::hosts`] for the rule).
    pub fn lookup(&self, host: &str) -> Option<&Arc<Route>> {
        self.sites.index.lookup(host).map(|r| r.site)
    }

    /// Agent addresses for `route`, best first (cached until the node set changes).
    pub fn ranked_addrs(&self, route: &Route) -> Ranking {
        route
            .ranking
            .get(&route.host, route.spec.node.as_deref(), &self.nodes)
    }
}

/// Keeps a [`RouteTable`] current from the two informers, and remembers which nodes
/// recently refused connections.
///
/// The informers are attached after start-up ([`Router::attach`]): in daemon mode pingora
/// forks before its runtimes start, so nothing that owns threads may exist before then.
pub struct Router {
    sites: OnceLock<Arc<SiteInformer>>,
    nodes: OnceLock<Arc<Informer<NodeInfo>>>,
    table: ArcSwap<RouteTable>,
    /// Becomes true once a synced table is published.
    synced: tokio::sync::watch::Sender<bool>,
    suspects: Suspects,
    /// Whether agents on this machine are reached over their unix socket.
    local_sockets: bool,
}

impl Router {
    /// `local_sockets`: reach agents on this machine over their unix socket, not `addr`.
    pub fn new(suspect_for: Duration, local_sockets: bool) -> Arc<Self> {
        Arc::new(Self {
            sites: OnceLock::new(),
            nodes: OnceLock::new(),
            table: ArcSwap::from_pointee(RouteTable::default()),
            synced: tokio::sync::watch::channel(false).0,
            suspects: Suspects::new(suspect_for),
            local_sockets,
        })
    }

    /// Attach the informers (once).
    pub fn attach(&self, sites: Arc<SiteInformer>, nodes: Arc<Informer<NodeInfo>>) {
        let _ = self.sites.set(sites);
        let _ = self.nodes.set(nodes);
    }

    pub fn sites(&self) -> Option<&Arc<SiteInformer>> {
        self.sites.get()
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
    /// Without suspects this is the cached ranking itself, shared, not copied.
    pub fn ranked(&self, table: &RouteTable, route: &Route) -> Ranking {
        let ranked = table.ranked_addrs(route);
        if !self.suspects.any() {
            return ranked;
        }
        let mut reordered = ranked.to_vec();
        self.suspects.demote(&mut reordered);
        reordered.into()
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

    /// Publish a table from the current snapshots. `nodes` is the node set to use, rebuilt
    /// by the caller only when the node snapshot changed (so cached rankings stay valid).
    fn publish(&self, nodes: Arc<NodeSet>) {
        let Some(sites) = self.sites.get() else {
            return;
        };
        let Some(node_informer) = self.nodes.get() else {
            return;
        };
        // Read the flags before the snapshots: a snapshot read after `is_synced` is at least
        // the first full list.
        let synced = sites.is_synced() && node_informer.is_synced();
        let mut table = RouteTable::new(sites.snapshot(), nodes);
        table.synced = synced;
        self.table.store(Arc::new(table));
        if synced {
            self.synced
                .send_if_modified(|s| !std::mem::replace(s, true));
        }
    }

    /// Republish the table whenever either snapshot changes. Call after [`Router::attach`].
    pub async fn run(self: Arc<Self>) {
        let (Some(sites), Some(nodes)) = (self.sites.get().cloned(), self.nodes.get().cloned())
        else {
            warn!("router started without informers");
            return;
        };
        let mut sites_rx = sites.subscribe();
        let mut nodes_rx = nodes.subscribe();
        let (mut last_sites, mut last_nodes) = (sites.snapshot(), nodes.snapshot());
        let mut node_set = Arc::new(node_set_of(&last_nodes, self.local_sockets).await);
        self.publish(node_set.clone());
        loop {
            tokio::select! {
                r = sites_rx.changed() => if r.is_err() { return },
                r = nodes_rx.changed() => if r.is_err() { return },
            }
            let (s, n) = (sites.snapshot(), nodes.snapshot());
            // Most wake-ups are progress notifications: nothing to publish.
            if Arc::ptr_eq(&s, &last_sites) && Arc::ptr_eq(&n, &last_nodes) {
                continue;
            }
            if !Arc::ptr_eq(&n, &last_nodes) {
                node_set = Arc::new(node_set_of(&n, self.local_sockets).await);
                // A node that left etcd is no longer anyone's suspect (or the gauge would
                // report it until its deadline, and an alert on it would fire for nothing).
                self.suspects.keep_only(|id| n.items.contains_key(id));
            }
            last_sites = s;
            last_nodes = n;
            self.publish(node_set.clone());
        }
    }
}

/// The node set placement ranks over (a new generation: cached rankings are recomputed).
/// With `local_sockets`, an agent whose record offers a unix socket that this proxy finds
/// on its machine and can open is reached there: its address becomes `unix:<path>`
/// ([`AgentAddr`]).
async fn node_set_of(nodes: &Snapshot<NodeInfo>, local_sockets: bool) -> NodeSet {
    let mut set = BTreeMap::new();
    for (id, n) in nodes.items.iter() {
        let mut node = (**n).clone();
        let offered = n.local_socket(id).filter(|_| local_sockets);
        if let Some(path) = offered {
            match probe_local_socket(path).await {
                Ok(()) => {
                    info!(node = %id, socket = path, "reaching the agent on this machine over its unix socket");
                    node.addr = format!("{UNIX_PREFIX}{path}");
                }
                // Another machine's node: the usual case in a cluster, not worth a line.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(node = %id, socket = path, error = %e, addr = %n.addr,
                        "a unix socket of this node's name is here but cannot be used; reaching it at its address");
                }
            }
        }
        set.insert(id.clone(), node);
    }
    NodeSet::new(set)
}

/// Ranked addresses of agents reached over their unix socket start with this.
const UNIX_PREFIX: &str = "unix:";

/// Where the proxy connects for a node: what the ranking holds, parsed once per request.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentAddr<'a> {
    Tcp(std::net::SocketAddr),
    Unix(&'a str),
}

impl<'a> AgentAddr<'a> {
    pub fn parse(addr: &'a str) -> Option<Self> {
        match addr.strip_prefix(UNIX_PREFIX) {
            Some(path) => Some(Self::Unix(path)),
            None => addr.parse().ok().map(Self::Tcp),
        }
    }
}

/// Whether the socket is here, is an agent's, and this proxy may open it (the agent's
/// permissions, another container's mount namespace): found out once per node change, not
/// on a request. The path's name is already the node's ([`NodeInfo::local_socket`]); it
/// must also be a socket owned by root, as agents run, so a record cannot point the proxy
/// (and the requests it forwards) at some other local service's socket.
async fn probe_local_socket(path: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let refuse = |why: &str| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why.to_string(),
        ))
    };
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return refuse("not a unix socket");
    }
    if meta.uid() != 0 {
        return refuse("not owned by root, as an agent's socket is");
    }
    let connect = tokio::net::UnixStream::connect(path);
    match tokio::time::timeout(Duration::from_millis(500), connect).await {
        Ok(stream) => stream.map(drop),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer in 500 ms",
        )),
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

    /// Forget every suspect for which `present` is false (nodes gone from the node set).
    fn keep_only(&self, present: impl Fn(&str) -> bool) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.retain(|id, _| present(id));
        self.any.store(!until.is_empty(), Ordering::Release);
    }

    /// True when some node may be suspect (one relaxed load: the common case is no).
    fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
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

    fn spec(aliases: &[&str]) -> Arc<SiteRoute> {
        let mut s = roost_proto::SiteSpec::new_app("alice", "app:application", "/srv/a");
        s.aliases = aliases.iter().map(|a| a.to_string()).collect();
        Arc::new(SiteRoute::from(s))
    }

    fn table(sites: &[(&str, &[&str])], nodes: &[&str]) -> RouteTable {
        let pairs = sites.iter().map(|(h, a)| (h.to_string(), spec(a)));
        let snapshot = Snapshot {
            revision: 1,
            items: pairs.clone().collect(),
            invalid: Default::default(),
            index: pairs.collect::<HostIndex<SiteRoute>>(),
        };
        let nodes: BTreeMap<String, NodeInfo> = nodes
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    id.to_string(),
                    NodeInfo::new(&format!("127.0.0.1:{}", 7000 + i)),
                )
            })
            .collect();
        RouteTable::new(Arc::new(snapshot), Arc::new(NodeSet::new(nodes)))
    }

    #[test]
    fn exact_names_and_aliases_route() {
        let t = table(&[("a.example", &["www.a.example"])], &[]);
        assert_eq!(t.lookup("a.example").unwrap().host, "a.example");
        assert_eq!(t.lookup("www.a.example").unwrap().host, "a.example");
        assert!(t.lookup("b.example").is_none());
    }

    #[test]
    fn wildcards_route_and_exact_names_win() {
        let t = table(
            &[("a.example", &["*.a.example"]), ("shop.a.example", &[])],
            &[],
        );
        assert_eq!(t.lookup("x.a.example").unwrap().host, "a.example");
        assert_eq!(t.lookup("deep.x.a.example").unwrap().host, "a.example");
        assert_eq!(t.lookup("shop.a.example").unwrap().host, "shop.a.example");
        assert!(t.lookup("a.example.org").is_none());
    }

    #[test]
    fn suspects_reorder_a_copy_and_never_the_cached_ranking() {
        let t = table(&[("a.example", &[])], &["n1", "n2", "n3"]);
        let router = Router::new(Duration::from_secs(60), false);
        let route = t.lookup("a.example").unwrap();
        let cached = router.ranked(&t, route);
        assert!(Arc::ptr_eq(&cached, &router.ranked(&t, route)));
        router.mark_suspect(&cached[0].0);
        let demoted = router.ranked(&t, route);
        assert_eq!(demoted.last().unwrap().0, cached[0].0);
        assert_eq!(t.ranked_addrs(route)[0].0, cached[0].0);
    }

    #[test]
    fn a_node_that_leaves_the_node_set_is_no_longer_counted_as_suspect() {
        let s = Suspects::new(Duration::from_secs(60));
        s.mark("gone");
        s.mark("kept");
        assert_eq!(s.count(), 2);
        s.keep_only(|id| id == "kept");
        assert_eq!(s.count(), 1);
        s.keep_only(|_| false);
        assert_eq!(s.count(), 0);
        assert!(!s.any(), "nothing left to demote: the fast path is back");
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
        let t = table(&[("a.example", &["b.example"]), ("b.example", &[])], &[]);
        assert_eq!(t.lookup("b.example").unwrap().host, "b.example");
    }
}

#[cfg(test)]
mod local_socket_tests {
    use super::*;

    #[test]
    fn ranked_addresses_parse_as_tcp_or_unix() {
        assert_eq!(
            AgentAddr::parse("127.0.0.1:7100"),
            Some(AgentAddr::Tcp("127.0.0.1:7100".parse().unwrap()))
        );
        assert_eq!(
            AgentAddr::parse("unix:/var/lib/roost/agent-n1.sock"),
            Some(AgentAddr::Unix("/var/lib/roost/agent-n1.sock"))
        );
        assert_eq!(AgentAddr::parse("nowhere"), None);
    }

    /// The suite runs as root: the socket is root's until it is given away.
    #[tokio::test]
    async fn only_a_live_root_owned_socket_is_taken() {
        let dir = std::env::temp_dir().join(format!("roost-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent-n1.sock");
        let _ = std::fs::remove_file(&path);
        let p = path.to_str().unwrap();
        assert!(probe_local_socket(p).await.is_err(), "no socket yet");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        probe_local_socket(p).await.expect("root's live socket");
        std::os::unix::fs::chown(&path, Some(65534), None).expect("chown: run the tests as root");
        let e = probe_local_socket(p).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(probe_local_socket(p).await.is_err(), "a plain file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
