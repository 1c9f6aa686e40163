//! The sites and nodes as the proxy sees them: decoded, checked, placed.
//!
//! Records are decoded with proto's `Record::decode`, the very check the proxy's informer
//! applies, so what `roostctl` calls valid (and where it says a site is placed) is what
//! the proxy does. A record that does not decode is kept with its error, never dropped.

use std::collections::BTreeMap;

use roost_proto::informer::Record;
use roost_proto::placement::{place, rank};
use roost_proto::{NodeInfo, SiteSpec};

use crate::store::{Kv, Listing};

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
        Self { sites, nodes, live }
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
        self.sites.iter().find(|s| s.host == host)
    }

    /// The site serving the canonical name `host`: its own key first, then an exact alias,
    /// then the longest matching wildcard alias (`*.example.com` matches any name ending in
    /// `.example.com`). Invalid records have no usable aliases and are skipped for those.
    /// With several claimants the first host in key order wins; all are returned.
    pub fn resolve(&self, host: &str) -> Vec<(&SiteEntry, Via)> {
        if let Some(site) = self.site(host) {
            return vec![(site, Via::Key)];
        }
        let valid = || {
            self.sites
                .iter()
                .filter_map(|s| s.spec.as_ref().ok().map(|spec| (s, spec)))
        };
        let exact: Vec<_> = valid()
            .filter(|(_, spec)| spec.aliases.iter().any(|a| a == host))
            .map(|(s, _)| (s, Via::Alias(host.to_string())))
            .collect();
        if !exact.is_empty() {
            return exact;
        }
        let mut wild: Vec<(&SiteEntry, String)> = valid()
            .flat_map(|(s, spec)| {
                spec.aliases
                    .iter()
                    .filter(|a| wildcard_matches(a, host))
                    .map(move |a| (s, a.clone()))
            })
            .collect();
        let longest = wild.iter().map(|(_, a)| a.len()).max().unwrap_or(0);
        wild.retain(|(_, a)| a.len() == longest);
        wild.into_iter().map(|(s, a)| (s, Via::Alias(a))).collect()
    }

    /// Names of the site `host` (its key and aliases) that other valid sites also claim.
    pub fn clashes(&self, host: &str, spec: &SiteSpec) -> Vec<String> {
        let names = std::iter::once(host).chain(spec.aliases.iter().map(String::as_str));
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for name in names.filter(|n| seen.insert(*n)) {
            for other in self.sites.iter().filter(|o| o.host != host) {
                if other.host == name {
                    out.push(format!("{name} is also the name of site {}", other.host));
                } else if let Ok(other_spec) = &other.spec {
                    if other_spec.aliases.iter().any(|a| a == name) {
                        out.push(format!("{name} is also an alias of site {}", other.host));
                    }
                }
            }
        }
        out
    }
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

    #[test]
    fn clashes_name_the_other_site_once_per_name() {
        let c = catalog();
        let mut spec = SiteSpec::new_app("bob", "a:b", "/y");
        spec.aliases = vec![
            "www.a.example".into(),
            "a.example".into(),
            "www.new.example".into(),
        ];
        assert_eq!(
            c.clashes("www.a.example", &spec),
            [
                "www.a.example is also an alias of site a.example",
                "a.example is also the name of site a.example"
            ]
        );
        // A site never clashes with its own record.
        let own = c.site("a.example").unwrap().spec.as_ref().unwrap().clone();
        assert!(c.clashes("a.example", &own).is_empty());
    }
}
