//! `NodeInfo`: what an agent publishes under `<prefix>/nodes/<id>`, bound to its lease.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::site::SpecError;

/// One live node, as its agent announces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    /// `host:port` where proxies reach the agent.
    pub addr: String,
    /// The agent's admin address (`/metrics`, `/healthz`, site logs), if it serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
    /// Relative weight in placement; a node of capacity 200 gets about twice the sites of 100.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// Free-form labels for operators. Keys under `roost/` are Roost's own (see
    /// [`LOCAL_SOCKET_LABEL`]): facts a proxy may use and an older one ignores, which a new
    /// field would not allow (records are read with unknown fields denied).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// A draining node keeps serving what reaches it but receives no new placements.
    #[serde(default)]
    pub draining: bool,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

/// The agent's unix socket, for a proxy on the same machine: cheaper than loopback TCP.
pub const LOCAL_SOCKET_LABEL: &str = "roost/local-socket";

/// The file name of node `node_id`'s unix socket, in its agent's state directory. The node
/// id in the name is what tells a proxy the socket is that node's: a proxy on another
/// machine finds no live socket of that name (every machine may use the same state
/// directory), and the proxy connects to no other socket a record might name.
pub fn local_socket_name(node_id: &str) -> String {
    format!("agent-{node_id}.sock")
}

fn default_capacity() -> u32 {
    100
}

impl NodeInfo {
    pub fn new(addr: &str) -> Self {
        Self {
            addr: addr.to_string(),
            admin: None,
            capacity: default_capacity(),
            labels: BTreeMap::new(),
            draining: false,
            version: String::new(),
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        let node: NodeInfo = crate::site::decode_object(bytes)?;
        if node.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(SpecError {
                field: "addr".into(),
                reason: format!("{:?} is not ip:port", node.addr),
            });
        }
        if node.capacity == 0 {
            return Err(SpecError {
                field: "capacity".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(node)
    }

    /// Publish the agent's unix socket, for proxies on its machine.
    pub fn set_local_socket(&mut self, path: &str) {
        self.labels
            .insert(LOCAL_SOCKET_LABEL.to_string(), path.to_string());
    }

    /// The unix socket node `node_id`'s record offers, if it is an absolute path named as
    /// [`local_socket_name`] says. Whether it is on this machine is for the caller to find
    /// out (a live socket of that name, owned by root).
    pub fn local_socket(&self, node_id: &str) -> Option<&str> {
        let path = self.labels.get(LOCAL_SOCKET_LABEL)?;
        let name = std::path::Path::new(path).file_name()?;
        (path.starts_with('/') && name == local_socket_name(node_id).as_str())
            .then_some(path.as_str())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("NodeInfo always serialises")
    }
}

/// Node ids: lower-case letters, digits, `.`, `_`, `-`; 1..=63 characters.
pub fn valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_records_round_trip_and_validate() {
        let n = NodeInfo::new("127.0.0.1:7100");
        assert_eq!(NodeInfo::from_json(n.to_json().as_bytes()).unwrap(), n);
        assert_eq!(
            NodeInfo::from_json(br#"{"addr":"nowhere"}"#)
                .unwrap_err()
                .field,
            "addr"
        );
        assert_eq!(NodeInfo::from_json(br#"{}"#).unwrap_err().field, "addr");
        assert_eq!(
            NodeInfo::from_json(br#"["127.0.0.1:1",null,100]"#)
                .unwrap_err()
                .field,
            "(record)"
        );
        assert_eq!(
            NodeInfo::from_json(br#"{"addr":"127.0.0.1:1","capacity":0}"#)
                .unwrap_err()
                .field,
            "capacity"
        );
        assert!(valid_node_id("node-1.dc2"));
        assert!(!valid_node_id("Node 1"));
        assert!(!valid_node_id(""));
    }

    #[test]
    fn a_local_socket_is_offered_only_under_its_nodes_name() {
        let mut n = NodeInfo::new("127.0.0.1:7100");
        assert_eq!(n.local_socket("n1"), None);
        n.set_local_socket("/var/lib/roost/agent-n1.sock");
        // A label, so a record any version of the proxy parses.
        let read = NodeInfo::from_json(n.to_json().as_bytes()).unwrap();
        assert_eq!(
            read.local_socket("n1"),
            Some("/var/lib/roost/agent-n1.sock")
        );
        assert_eq!(read.local_socket("n2"), None, "another node's name");
        n.set_local_socket("/run/docker.sock");
        assert_eq!(n.local_socket("n1"), None, "not an agent's socket");
        n.set_local_socket("agent-n1.sock");
        assert_eq!(n.local_socket("n1"), None, "a relative path");
    }
}
