//! `where HOST`: which nodes serve a site, in the order the proxy tries them.
//!
//! HOST may be the site's key or any of its aliases; the ranking is always computed for
//! the site's key, as the proxy does, with its pin honoured.

use anyhow::{anyhow, bail};
use serde::Serialize;

use crate::catalog::{Catalog, Via};
use crate::output;
use crate::sites::canonical;
use crate::store::Store;
use crate::table::Table;

#[derive(Serialize)]
struct WhereJson<'a> {
    /// The name asked about (canonical).
    query: &'a str,
    /// The site serving it.
    site: &'a str,
    /// The alias that matched, or null when `query` is the site's key.
    alias: Option<&'a str>,
    pin: Option<&'a str>,
    /// Eligible nodes, best first; the first one serves the site now.
    nodes: Vec<RankedJson<'a>>,
}

#[derive(Serialize)]
struct RankedJson<'a> {
    id: &'a str,
    addr: &'a str,
    capacity: u32,
    pinned: bool,
}

pub async fn where_(store: &Store, host: &str, json: bool) -> anyhow::Result<()> {
    let host = canonical(host)?;
    let catalog = Catalog::for_host(store, &host).await?;
    let claims = catalog.resolve(&host);
    let Some((site, via)) = claims.first() else {
        bail!(
            "no site serves {host}: register it with `roostctl site add {host} ...`, \
             or add it to a site with `roostctl site set SITE --alias {host}`"
        );
    };
    if claims.len() > 1 {
        let all: Vec<&str> = claims.iter().map(|(s, _)| s.host.as_str()).collect();
        eprintln!(
            "roostctl: warning: {host} is claimed by several sites ({}); showing {}",
            all.join(", "),
            site.host
        );
    }
    let spec = site.spec.as_ref().map_err(|e| {
        anyhow!(
            "site {} has an invalid record, so no node serves it: {e}; see `roostctl site show {}`",
            site.host,
            site.host
        )
    })?;
    let ranked = catalog.ranked(&site.host, spec);
    if ranked.is_empty() {
        let live = catalog.live_nodes().len();
        if live == 0 {
            bail!("no node is live, so {host} is served nowhere: start a roost-agent (see `roostctl node ls`)");
        }
        bail!(
            "every live node ({live}) is draining, so {host} is served nowhere: \
             undrain one or start another roost-agent (see `roostctl node ls`)"
        );
    }
    let pin = spec.node.as_deref();
    let alias = match via {
        Via::Alias(a) => Some(a.as_str()),
        Via::Key => None,
    };
    if json {
        return output::json(&WhereJson {
            query: &host,
            site: &site.host,
            alias,
            pin,
            nodes: ranked
                .iter()
                .map(|(id, n)| RankedJson {
                    id,
                    addr: &n.addr,
                    capacity: n.capacity,
                    pinned: Some(*id) == pin,
                })
                .collect(),
        });
    }
    let mut text = match alias {
        Some(a) => format!("{host} is served by site {} (alias {a})\n", site.host),
        None => format!("{host}\n"),
    };
    if let Some(note) = catalog.pin_note(spec).filter(|n| n != "pinned") {
        text += &format!("note: {note}, so the site is placed by hashing\n");
    }
    let mut table = Table::new(&["", "NODE", "ADDR", "CAPACITY", "NOTE"]);
    for (i, (id, n)) in ranked.iter().enumerate() {
        table.row(vec![
            if i == 0 { "*" } else { "" }.into(),
            id.to_string(),
            n.addr.clone(),
            n.capacity.to_string(),
            if Some(*id) == pin { "pinned" } else { "" }.into(),
        ]);
    }
    text += &table.render();
    output::emit(&text)
}
