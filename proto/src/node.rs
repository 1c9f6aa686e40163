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
    /// Free-form labels for operators.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// A draining node keeps serving what reaches it but receives no new placements.
    #[serde(default)]
    pub draining: bool,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
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
}
