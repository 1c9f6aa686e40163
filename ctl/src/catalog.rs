//! The sites and nodes as the proxy sees them: decoded, checked, placed.
//!
//! Records are decoded with proto's `Record::decode`, the very check the proxy's informer
//! applies, and names resolve with proto's `HostIndex`, the very rule the proxy routes by,
//! so what `roostctl` calls valid (and where it says a name goes) is what the proxy does.
//! A record that does not decode is kept with its error, never dropped.
//!
//! A catalog holds what a command needs: every site for `site ls` and `node ls`, or, for a
//! command about one name ([`Catalog::for_host`]), the nodes and the few sites that can
//! claim that name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use roost_proto::hosts::{self, HostIndex};
use roost_proto::informer::Record;
use roost_proto::placement::{place, rank};
use roost_proto::{NodeInfo, SiteSpec};

use crate::store::{Kv, Listing, Store};

/// One record under `<prefix>/sites/`.
pub struct SiteEntry {
    /// The key without the prefix (a canonical host when the record is valid).
    pub host: String,
    /// The value as stored.
    pub raw: Vec<u8>,
    pub mod_revision: i64,
    /// The decoded record, or why it does not decode (the proxy skips such a record).
    pub spec: Result<SiteSpec, String>,
}

/// One record under `<prefix>/nodes/`.
pub struct NodeEntry {
    pub id: String,
    pub info: Result<NodeInfo, String>,
}

/// How a queried name led to a site.
#[derive(Debug, PartialEq, Eq)]
pub enum Via {
    /// The name is the site's key.
    Key,
    /// The name matched this alias (possibly a `*.` wildcard) of the site.
    Alias(String),
}

pub struct Catalog {
    pub sites: Vec<SiteEntry>,
    pub nodes: Vec<NodeEntry>,
    /// The valid nodes: what placement ranks over.
    live: BTreeMap<String, NodeInfo>,
    /// Position in `sites` by host.
    by_host: HashMap<String, usize>,
    /// The valid sites, indexed as the proxy indexes them.
    index: HostIndex,
}

impl Catalog {
    pub fn new(listing: Listing) -> Self {
        let sites: Vec<SiteEntry> = listing.sites.into_iter().map(decode_site).collect();
        let nodes: Vec<NodeEntry> = listing
            .nodes
            .into_iter()
            .map(|kv| NodeEntry {
                info: <NodeInfo as Record>::decode(&kv.name, &kv.value).map_err(|e| e.to_string()),
                id: kv.name,
            })
            .collect();
        let live = nodes
            .iter()
            .filter_map(|n| n.info.as_ref().ok().map(|i| (n.id.clone(), i.clone())))
            .collect();
        let by_host = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.host.clone(), i))
            .collect();
        let index = sites
            .iter()
            .filter_map(|s| {
                s.spec
                    .as_ref()
                    .ok()
                    .map(|spec| (s.host.clone(), Arc::new(spec.clone())))
            })
            .collect();
        Self {
            sites,
            nodes,
            live,
            by_host,
            index,
        }
    }

    /// What a command about the one name `host` needs: the nodes, the site whose key it
    /// is, and the sites the alias index names for it or for a wildcard above it. Only when
    /// those settle nothing (an alias written with plain etcdctl is not in the index) are
    /// all sites read, in pages.
    pub async fn for_host(store: &Store, host: &str) -> anyhow::Result<Self> {
        let (revision, nodes) = store.nodes().await?;
        let layout = store.layout();
        let mut keys = vec![layout.site_key(host), layout.alias_key(host)];
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            keys.push(layout.alias_key(&format!("*.{parent}")));
            rest = parent;
        }
        let got = store.get_keys(&keys, revision).await?;
        let mut names = BTreeSet::new();
        if got[0].is_some() {
            names.insert(host.to_string());
        }
        for kv in got[1..].iter().flatten() {
            names.insert(String::from_utf8_lossy(&kv.value).into_owned());
        }
        let names: Vec<String> = names.into_iter().collect();
        let site_keys: Vec<String> = names.iter().map(|n| layout.site_key(n)).collect();
        let sites = store
            .get_keys(&site_keys, revision)
            .await?
            .into_iter()
            .zip(names)
            .filter_map(|(kv, name)| kv.map(|kv| Kv { name, ..kv }))
            .collect();
        let catalog = Self::new(Listing { sites, nodes });
        if !catalog.resolve(host).is_empty() {
            return Ok(catalog);
        }
        Ok(Self::new(store.list().await?))
    }

    pub fn live_nodes(&self) -> &BTreeMap<String, NodeInfo> {
        &self.live
    }

    /// The node serving `host` now, as every proxy computes it.
    pub fn placed(&self, host: &str, spec: &SiteSpec) -> Option<(&str, &NodeInfo)> {
        place(host, spec.node.as_deref(), &self.live)
    }

    /// Every eligible node for `host`, best first.
    pub fn ranked(&self, host: &str, spec: &SiteSpec) -> Vec<(&str, &NodeInfo)> {
        rank(host, spec.node.as_deref(), &self.live)
    }

    /// What happens to the site's pin, if it has one: honoured, or why not.
    pub fn pin_note(&self, spec: &SiteSpec) -> Option<String> {
        let pin = spec.node.as_deref()?;
        Some(match self.live.get(pin) {
            None => format!("pin {pin} is not live"),
            Some(n) if n.draining => format!("pin {pin} is draining"),
            Some(_) => "pinned".to_string(),
        })
    }

    /// The number of valid sites placed on each node.
    pub fn sites_per_node(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for site in &self.sites {
            if let Ok(spec) = &site.spec {
                if let Some((id, _)) = self.placed(&site.host, spec) {
                    *counts.entry(id.to_string()).or_insert(0) += 1;
                }
            }
        }
        counts
    }

    pub fn site(&self, host: &str) -> Option<&SiteEntry> {
        self.by_host.get(host).map(|&i| &self.sites[i])
    }

    /// The site serving the canonical name `host`, by proto's rule (the proxy's): its own
    /// key, else an exact alias, else the closest wildcard alias, among valid records; with
    /// several claimants the first host in key order wins. Every claimant is returned, the
    /// winner first. A name whose own record is invalid, and that no valid site claims,
    /// returns that record, so the caller can say why nothing serves it.
    pub fn resolve(&self, host: &str) -> Vec<(&SiteEntry, Via)> {
        let claimants = self.index.claimants(host);
        if claimants.is_empty() {
            return self.site(host).map(|s| (s, Via::Key)).into_iter().collect();
        }
        claimants
            .into_iter()
            .filter_map(|site| {
                let entry = self.site(&site.host)?;
                Some((entry, via_of(site, host)))
            })
            .collect()
    }
}

/// How `host` leads to `site`: its key, or the alias of the site that matches it.
fn via_of(site: &hosts::Site, host: &str) -> Via {
    if site.host == host {
        return Via::Key;
    }
    let alias = site
        .spec
        .aliases
        .iter()
        .filter(|a| *a == host || wildcard_matches(a, host))
        // An exact alias, else the longest (closest) wildcard.
        .max_by_key(|a| (!a.starts_with("*."), a.len()))
        .cloned()
        .unwrap_or_default();
    Via::Alias(alias)
}

/// `*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`.
fn wildcard_matches(alias: &str, host: &str) -> bool {
    match alias.strip_prefix('*') {
        Some(suffix) if suffix.starts_with('.') => {
            host.len() > suffix.len() && host.ends_with(suffix)
        }
        _ => false,
    }
}

fn decode_site(kv: Kv) -> SiteEntry {
    let spec = <SiteSpec as Record>::decode(&kv.name, &kv.value).map_err(|e| e.to_string());
    SiteEntry {
        host: kv.name,
        raw: kv.value,
        mod_revision: kv.mod_revision,
        spec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(name: &str, value: &str) -> Kv {
        Kv {
            name: name.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
        }
    }

    fn catalog() -> Catalog {
        let site = |aliases: &str| {
            format!(r#"{{"user":"alice","app":"a:b","dir":"/x","aliases":[{aliases}]}}"#)
        };
        Catalog::new(Listing {
            sites: vec![
                kv("a.example", &site(r#""www.a.example""#)),
                kv("b.example", &site(r#""*.b.example","*.deep.b.example""#)),
                kv("bad.example", r#"{"user":1}"#),
                kv("Upper.example", &site("")),
            ],
            nodes: vec![
                kv("n1", r#"{"addr":"127.0.0.1:7100"}"#),
                kv("n2", "garbage"),
            ],
        })
    }

    #[test]
    fn invalid_records_are_kept_with_their_error() {
        let c = catalog();
        assert!(c
            .site("bad.example")
            .unwrap()
            .spec
            .as_ref()
            .unwrap_err()
            .contains("user"));
        assert!(c
            .site("Upper.example")
            .unwrap()
            .spec
            .as_ref()
            .unwrap_err()
            .contains("not canonical"));
        assert!(c.nodes[1].info.is_err());
        assert_eq!(c.live_nodes().keys().collect::<Vec<_>>(), ["n1"]);
    }

    #[test]
    fn an_invalid_record_claims_nothing_and_an_alias_of_a_valid_site_wins() {
        let site = |aliases: &str| {
            format!(r#"{{"user":"alice","app":"a:b","dir":"/x","aliases":[{aliases}]}}"#)
        };
        let c = Catalog::new(Listing {
            sites: vec![
                kv("a.example", &site(r#""bad.example","shared.example""#)),
                kv("bad.example", r#"{"user":1}"#),
                kv("z.example", &site(r#""shared.example""#)),
            ],
            nodes: vec![],
        });
        // The proxy routes bad.example to a.example (the invalid record is not served).
        let r = c.resolve("bad.example");
        assert_eq!(r[0].0.host, "a.example");
        assert_eq!(r[0].1, Via::Alias("bad.example".into()));
        // Two claimants: the first in key order wins, both are returned.
        let r = c.resolve("shared.example");
        assert_eq!(
            r.iter().map(|(s, _)| s.host.as_str()).collect::<Vec<_>>(),
            ["a.example", "z.example"]
        );
    }

    #[test]
    fn valid_sites_are_counted_on_the_live_node() {
        assert_eq!(catalog().sites_per_node().get("n1"), Some(&2));
    }

    #[test]
    fn names_resolve_by_key_then_alias_then_longest_wildcard() {
        let c = catalog();
        let one = |h: &str| {
            let r = c.resolve(h);
            r.first()
                .map(|(s, via)| (s.host.clone(), format!("{via:?}")))
        };
        assert_eq!(one("a.example"), Some(("a.example".into(), "Key".into())));
        assert_eq!(
            one("bad.example"),
            Some(("bad.example".into(), "Key".into()))
        );
        assert_eq!(
            one("www.a.example"),
            Some(("a.example".into(), "Alias(\"www.a.example\")".into()))
        );
        assert_eq!(
            one("x.b.example"),
            Some(("b.example".into(), "Alias(\"*.b.example\")".into()))
        );
        assert_eq!(
            one("x.deep.b.example"),
            Some(("b.example".into(), "Alias(\"*.deep.b.example\")".into()))
        );
        assert_eq!(c.resolve("x.deep.b.example").len(), 1);
        assert_eq!(one("nothing.example"), None);
        assert!(!wildcard_matches("*.b.example", "b.example"));
    }
}
