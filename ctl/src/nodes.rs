//! `node ls`: the nodes agents have registered, and how many sites each one serves.

use roost_proto::NodeInfo;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::output;
use crate::store::Store;
use crate::table::Table;

/// A node as `node ls --json` shows it.
#[derive(Serialize)]
struct NodeJson<'a> {
    id: &'a str,
    /// The record, or null when it does not decode (such a node gets no sites).
    info: Option<&'a NodeInfo>,
    /// Valid sites placed on this node now.
    sites: usize,
    error: Option<&'a str>,
}

pub async fn ls(store: &Store, json: bool) -> anyhow::Result<()> {
    let catalog = Catalog::new(store.list().await?);
    let counts = catalog.sites_per_node();
    let count = |id: &str| counts.get(id).copied().unwrap_or(0);
    if json {
        let rows: Vec<NodeJson> = catalog
            .nodes
            .iter()
            .map(|n| NodeJson {
                id: &n.id,
                info: n.info.as_ref().ok(),
                sites: count(&n.id),
                error: n.info.as_ref().err().map(String::as_str),
            })
            .collect();
        return output::json(&rows);
    }
    if catalog.nodes.is_empty() {
        return output::line(&format!(
            "no live nodes: each roost-agent registers itself under {} while it runs",
            store.layout().nodes_prefix()
        ));
    }
    let any_invalid = catalog.nodes.iter().any(|n| n.info.is_err());
    let mut header = vec!["ID", "ADDR", "CAPACITY", "DRAINING", "SITES"];
    if any_invalid {
        header.push("ERROR");
    }
    let mut table = Table::new(&header);
    for node in &catalog.nodes {
        match &node.info {
            Ok(info) => table.row(vec![
                node.id.clone(),
                info.addr.clone(),
                info.capacity.to_string(),
                if info.draining { "yes" } else { "no" }.into(),
                count(&node.id).to_string(),
            ]),
            Err(e) => table.row(vec![
                node.id.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "0".into(),
                format!("invalid, gets no sites: {e}"),
            ]),
        }
    }
    output::emit(&table.render())
}
