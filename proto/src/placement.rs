//! Placement: which node serves a site (DESIGN.md, decision 2).
//!
//! A pure function of the site and the live nodes, so every proxy computes the same answer
//! with no coordinator. Weighted rendezvous (highest-random-weight) hashing: each node gets
//! the score `capacity / -ln(u)` where `u` is a uniform hash of (site, node) in (0, 1); the
//! highest score wins. Adding a node moves only the sites that the new node now wins.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::node::NodeInfo;

/// (node id, agent address), best first: what the proxy tries in order.
pub type Ranking = Arc<[(String, String)]>;

/// One version of the live nodes. Each version has its own generation, so a cached ranking
/// knows whether it was computed for this node set.
#[derive(Debug, Default)]
pub struct NodeSet {
    generation: u64,
    pub nodes: BTreeMap<String, NodeInfo>,
}

impl NodeSet {
    pub fn new(nodes: BTreeMap<String, NodeInfo>) -> Self {
        static GENERATIONS: AtomicU64 = AtomicU64::new(1);
        Self {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            nodes,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// A site's ranking, kept until the node set changes: a request reads it with one atomic
/// load instead of hashing and sorting every node. The first request after a node change
/// ranks again; sites that get no request never do, so a node change costs nothing per site.
#[derive(Debug, Default)]
pub struct RankingCache(ArcSwapOption<(u64, Ranking)>);

impl RankingCache {
    /// The ranking of `site` (pinned to `pin`) over `nodes`, from the cache when it is current.
    pub fn get(&self, site: &str, pin: Option<&str>, nodes: &NodeSet) -> Ranking {
        if let Some(cached) = &*self.0.load() {
            if cached.0 == nodes.generation {
                return cached.1.clone();
            }
        }
        let ranking: Ranking = rank(site, pin, &nodes.nodes)
            .into_iter()
            .map(|(id, n)| (id.to_string(), n.addr.clone()))
            .collect();
        self.0
            .store(Some(Arc::new((nodes.generation, ranking.clone()))));
        ranking
    }
}

/// Every eligible node for `site`, best first: the pinned node (when live and not draining),
/// then the others in rendezvous order. The proxy tries them in this order on connect failure.
pub fn rank<'a>(
    site: &str,
    pin: Option<&str>,
    nodes: &'a BTreeMap<String, NodeInfo>,
) -> Vec<(&'a str, &'a NodeInfo)> {
    let mut scored: Vec<(f64, &'a str, &'a NodeInfo)> = nodes
        .iter()
        .filter(|(_, n)| !n.draining)
        .map(|(id, n)| (score(site, id, n.capacity), id.as_str(), n))
        .collect();
    // Highest score first; ties (practically impossible) broken by id for determinism.
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let mut ranked: Vec<(&str, &NodeInfo)> = scored.into_iter().map(|(_, id, n)| (id, n)).collect();
    if let Some(pin) = pin {
        if let Some(pos) = ranked.iter().position(|(id, _)| *id == pin) {
            let pinned = ranked.remove(pos);
            ranked.insert(0, pinned);
        }
    }
    ranked
}

/// The node that serves `site` now, if any node is eligible.
pub fn place<'a>(
    site: &str,
    pin: Option<&str>,
    nodes: &'a BTreeMap<String, NodeInfo>,
) -> Option<(&'a str, &'a NodeInfo)> {
    rank(site, pin, nodes).into_iter().next()
}

fn score(site: &str, node: &str, capacity: u32) -> f64 {
    let h = stable_hash(site, node);
    // 53 random bits, shifted into the open interval (0, 1).
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    capacity as f64 / -u.ln()
}

/// A hash that every build of every component agrees on (std's hasher makes no such
/// promise across Rust versions): FNV-1a over both names, then the splitmix64 finaliser
/// to spread FNV's weak low bits.
fn stable_hash(site: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(node.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> BTreeMap<String, NodeInfo> {
        (1..=n)
            .map(|i| {
                (
                    format!("node-{i}"),
                    NodeInfo::new(&format!("127.0.0.1:{}", 7000 + i)),
                )
            })
            .collect()
    }

    fn sites() -> Vec<String> {
        (0..10_000)
            .map(|i| format!("site{i}.example.com"))
            .collect()
    }

    #[test]
    fn adding_a_fifth_node_moves_about_a_fifth_and_only_onto_it() {
        let four = nodes(4);
        let five = nodes(5);
        let mut moved = 0;
        for s in sites() {
            let before = place(&s, None, &four).unwrap().0;
            let after = place(&s, None, &five).unwrap().0;
            if before != after {
                assert_eq!(after, "node-5", "{s} moved between old nodes");
                moved += 1;
            }
        }
        // Expect 2,000; allow for hashing noise (sd ≈ 40).
        assert!((1800..=2200).contains(&moved), "moved {moved} of 10000");
    }

    #[test]
    fn capacity_weights_the_share() {
        let mut ns = nodes(2);
        ns.get_mut("node-2").unwrap().capacity = 300;
        let on_two = sites()
            .iter()
            .filter(|s| place(s, None, &ns).unwrap().0 == "node-2")
            .count();
        // Expect 75%.
        assert!((7200..=7800).contains(&on_two), "{on_two}");
    }

    #[test]
    fn pin_wins_when_live_and_not_draining() {
        let mut ns = nodes(3);
        assert_eq!(place("a.example", Some("node-2"), &ns).unwrap().0, "node-2");
        assert_eq!(rank("a.example", Some("node-2"), &ns).len(), 3);
        // A pin to a dead node falls back to hashing.
        assert!(place("a.example", Some("node-9"), &ns).is_some());
        ns.get_mut("node-2").unwrap().draining = true;
        assert_ne!(place("a.example", Some("node-2"), &ns).unwrap().0, "node-2");
    }

    #[test]
    fn draining_nodes_get_nothing_and_no_nodes_means_no_place() {
        let mut ns = nodes(2);
        ns.get_mut("node-1").unwrap().draining = true;
        for s in sites().iter().take(500) {
            assert_eq!(place(s, None, &ns).unwrap().0, "node-2");
        }
        assert!(place("x", None, &BTreeMap::new()).is_none());
    }

    #[test]
    fn a_cached_ranking_lasts_until_the_node_set_changes() {
        let cache = RankingCache::default();
        let two = NodeSet::new(nodes(2));
        let first = cache.get("a.example", Some("node-2"), &two);
        assert_eq!(first[0].0, "node-2");
        assert!(Arc::ptr_eq(
            &first,
            &cache.get("a.example", Some("node-2"), &two)
        ));
        let mut drained = nodes(2);
        drained.get_mut("node-2").unwrap().draining = true;
        let changed = NodeSet::new(drained);
        assert_ne!(changed.generation(), two.generation());
        let again = cache.get("a.example", Some("node-2"), &changed);
        assert_eq!(
            again.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["node-1"]
        );
    }

    #[test]
    fn the_hash_is_stable_across_builds() {
        // Fixed vectors: if these change, proxies of different versions disagree on placement.
        const HASH_A_1: u64 = 0x1374_9f04_76ab_6b96;
        const HASH_A_2: u64 = 0xe407_e43d_abeb_8186;
        assert_eq!(stable_hash("a.example", "node-1"), HASH_A_1);
        assert_eq!(stable_hash("a.example", "node-2"), HASH_A_2);
        assert_ne!(stable_hash("ab", "c"), stable_hash("a", "bc"));
    }
}
