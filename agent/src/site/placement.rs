//! Is a site still this node's? The agent asks the same placement function the proxies use
//! (`roost_proto::placement`), so a site whose pin or ranking moved elsewhere gives back its
//! socket, cgroup and slot here (issue 9, "Memory").

use std::collections::BTreeMap;

use roost_proto::placement::place;
use roost_proto::NodeInfo;

/// Whether placement over `nodes` puts `host` (pinned to `pin`) on node `me`.
///
/// A view that can't tell counts as yes, so nothing is given back on a partial picture: no
/// nodes known yet, or this node not in the set (before its registration, or while its lease
/// is being renewed). A pin counts as the proxies count it: only while the pinned node is
/// live and not draining.
pub fn placed_here(
    host: &str,
    pin: Option<&str>,
    nodes: &BTreeMap<String, NodeInfo>,
    me: &str,
) -> bool {
    if !nodes.contains_key(me) {
        return true;
    }
    match place(host, pin, nodes) {
        Some((id, _)) => id == me,
        // Every node draining (this one too): no other node will take it either.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: &[&str]) -> BTreeMap<String, NodeInfo> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    id.to_string(),
                    NodeInfo::new(&format!("127.0.0.1:{}", 7000 + i)),
                )
            })
            .collect()
    }

    #[test]
    fn a_pin_decides_while_its_node_is_live() {
        let ns = nodes(&["node-a", "node-b"]);
        assert!(placed_here("s.example", Some("node-a"), &ns, "node-a"));
        assert!(!placed_here("s.example", Some("node-a"), &ns, "node-b"));
        assert!(!placed_here("s.example", Some("node-b"), &ns, "node-a"));
        assert!(placed_here("s.example", Some("node-b"), &ns, "node-b"));
    }

    #[test]
    fn a_pin_to_a_draining_or_dead_node_falls_back_to_the_ranking() {
        let mut ns = nodes(&["node-a", "node-b"]);
        ns.get_mut("node-b").unwrap().draining = true;
        // Only node-a is eligible: it takes the site whatever the pin says.
        assert!(placed_here("s.example", Some("node-b"), &ns, "node-a"));
        assert!(!placed_here("s.example", Some("node-b"), &ns, "node-b"));
        assert!(placed_here("s.example", Some("node-gone"), &ns, "node-a"));
    }

    #[test]
    fn unpinned_sites_follow_the_proxies_ranking_exactly() {
        let ns = nodes(&["node-a", "node-b", "node-c"]);
        for i in 0..300 {
            let host = format!("site{i}.example");
            let winner = place(&host, None, &ns).unwrap().0;
            for me in ["node-a", "node-b", "node-c"] {
                assert_eq!(
                    placed_here(&host, None, &ns, me),
                    me == winner,
                    "{host} {me}"
                );
            }
        }
    }

    #[test]
    fn a_view_that_cannot_tell_keeps_the_site() {
        // No nodes yet (before the first node list), or this node not registered yet.
        assert!(placed_here(
            "s.example",
            Some("node-b"),
            &BTreeMap::new(),
            "node-a"
        ));
        assert!(placed_here(
            "s.example",
            Some("node-b"),
            &nodes(&["node-b"]),
            "node-a"
        ));
        // Every node draining: nobody else takes it either.
        let mut ns = nodes(&["node-a", "node-b"]);
        for n in ns.values_mut() {
            n.draining = true;
        }
        assert!(placed_here("s.example", Some("node-b"), &ns, "node-a"));
    }
}
