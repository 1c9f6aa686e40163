//! Host → site resolution: the one rule the proxy routes by and `roostctl` explains with.
//!
//! A canonical host name is served by, in this order:
//! 1. the site whose key it is;
//! 2. else the site listing it as an exact alias;
//! 3. else the site with the closest wildcard alias (`a.b.example.com` tries
//!    `*.b.example.com`, then `*.example.com`; `*.example.com` never matches `example.com`).
//!
//! When several sites claim one alias, the first in key order wins, so every proxy and
//! `roostctl` agree without coordinating. Only valid records take part: a record that does
//! not decode is not served, so it claims nothing.
//!
//! [`HostIndex`] is a persistent map (structure shared between versions), updated per site
//! in O(aliases · log N): cloning it for a new snapshot is O(1), and a lookup costs one
//! O(log N) B-tree search per label of the name. (A B-tree, not a hash trie: imbl's trie
//! nodes are fixed 32-slot arrays, which at 100,000 sites cost tens of MB of empty slots.)
//!
//! The index is generic over the record it holds ([`Aliased`]): `roostctl` indexes whole
//! [`SiteSpec`]s, the proxy only the [`SiteRoute`] it routes by.

use std::sync::Arc;

use imbl::OrdMap;

use crate::informer::Index;
use crate::placement::RankingCache;
use crate::site::SiteSpec;
use crate::site_route::SiteRoute;

/// What the index needs of a site record: the names it claims besides its key.
pub trait Aliased: std::fmt::Debug + Send + Sync + 'static {
    /// Exact aliases, and wildcards written `*.suffix`.
    fn aliases(&self) -> &[String];
}

impl Aliased for SiteSpec {
    fn aliases(&self) -> &[String] {
        &self.aliases
    }
}

impl Aliased for SiteRoute {
    fn aliases(&self) -> &[String] {
        &self.aliases
    }
}

/// One servable site, shared by every index entry that names it.
#[derive(Debug)]
pub struct Site<S = SiteSpec> {
    /// The site's canonical host (its key in etcd).
    pub host: String,
    pub spec: Arc<S>,
    /// The site's node ranking, computed once per node set (see [`RankingCache`]).
    pub ranking: RankingCache,
}

/// How a name led to its site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via<'a> {
    /// The name is the site's key.
    Key,
    /// The name matched this alias of the site, as written (`*.` included for a wildcard).
    Alias(&'a str),
}

/// The answer for one name.
#[derive(Debug)]
pub struct Resolved<'a, S = SiteSpec> {
    pub site: &'a Arc<Site<S>>,
    pub via: Via<'a>,
}

/// Every site claiming one name. Usually one entry; kept sorted by host so the winner of a
/// conflict is the same everywhere.
#[derive(Debug)]
struct Claims<S> {
    /// The site whose key this name is (beats any alias).
    key: Option<Arc<Site<S>>>,
    /// Sites listing this name as an alias, by host.
    aliases: Vec<Arc<Site<S>>>,
}

// Not derived: a derive would ask `S: Clone + Default`, and only `Arc`s are cloned here.
impl<S> Clone for Claims<S> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            aliases: self.aliases.clone(),
        }
    }
}

impl<S> Default for Claims<S> {
    fn default() -> Self {
        Self {
            key: None,
            aliases: Vec::new(),
        }
    }
}

impl<S> Claims<S> {
    fn is_empty(&self) -> bool {
        self.key.is_none() && self.aliases.is_empty()
    }

    fn add_alias(&mut self, site: &Arc<Site<S>>) {
        match self
            .aliases
            .binary_search_by(|s| s.host.as_str().cmp(&site.host))
        {
            Ok(i) => self.aliases[i] = site.clone(),
            Err(i) => self.aliases.insert(i, site.clone()),
        }
    }

    fn remove_alias(&mut self, host: &str) {
        self.aliases.retain(|s| s.host != host);
    }
}

/// The routing index over every valid site: site keys, exact aliases and wildcard aliases.
#[derive(Debug)]
pub struct HostIndex<S = SiteSpec> {
    /// Site keys and exact aliases.
    exact: OrdMap<String, Claims<S>>,
    /// Wildcard aliases, by the suffix after `*.`.
    wildcard: OrdMap<String, Claims<S>>,
    sites: usize,
}

impl<S> Clone for HostIndex<S> {
    fn clone(&self) -> Self {
        Self {
            exact: self.exact.clone(),
            wildcard: self.wildcard.clone(),
            sites: self.sites,
        }
    }
}

impl<S> Default for HostIndex<S> {
    fn default() -> Self {
        Self {
            exact: OrdMap::new(),
            wildcard: OrdMap::new(),
            sites: 0,
        }
    }
}

impl<S: Aliased> HostIndex<S> {
    /// The site serving canonical name `host`, and how it was found.
    pub fn lookup(&self, host: &str) -> Option<Resolved<'_, S>> {
        if let Some(claims) = self.exact.get(host) {
            if let Some(site) = &claims.key {
                return Some(Resolved {
                    site,
                    via: Via::Key,
                });
            }
            if let Some(site) = claims.aliases.first() {
                let alias = alias_as_written(site, host, false);
                return Some(Resolved {
                    site,
                    via: Via::Alias(alias),
                });
            }
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(site) = self.wildcard.get(parent).and_then(|c| c.aliases.first()) {
                let alias = alias_as_written(site, parent, true);
                return Some(Resolved {
                    site,
                    via: Via::Alias(alias),
                });
            }
            rest = parent;
        }
        None
    }

    /// Every site claiming `host` at the level that decides it (key, exact alias or the
    /// closest wildcard), winner first: more than one means a conflict worth a warning.
    pub fn claimants(&self, host: &str) -> Vec<&Arc<Site<S>>> {
        if let Some(claims) = self.exact.get(host) {
            if !claims.is_empty() {
                return claims.key.iter().chain(claims.aliases.iter()).collect();
            }
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(claims) = self.wildcard.get(parent).filter(|c| !c.is_empty()) {
                return claims.aliases.iter().collect();
            }
            rest = parent;
        }
        Vec::new()
    }

    /// The site whose key is `host`.
    pub fn site(&self, host: &str) -> Option<&Arc<Site<S>>> {
        self.exact.get(host).and_then(|c| c.key.as_ref())
    }

    /// Number of sites indexed.
    pub fn len(&self) -> usize {
        self.sites
    }

    pub fn is_empty(&self) -> bool {
        self.sites == 0
    }

    /// Names routed: site names and exact aliases, plus wildcard suffixes (O(1)).
    pub fn names(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Add or replace site `host`; `old` is its previous spec, if it was indexed.
    pub fn upsert(&mut self, host: &str, old: Option<&S>, spec: Arc<S>) {
        if let Some(old) = old {
            self.unlink(host, old);
        } else {
            self.sites += 1;
        }
        let site = Arc::new(Site {
            host: host.to_string(),
            spec: spec.clone(),
            ranking: RankingCache::default(),
        });
        claims_mut(&mut self.exact, host).key = Some(site.clone());
        for alias in spec.aliases() {
            match alias.strip_prefix("*.") {
                Some(suffix) => claims_mut(&mut self.wildcard, suffix).add_alias(&site),
                None => claims_mut(&mut self.exact, alias).add_alias(&site),
            }
        }
    }

    /// Remove site `host`, whose indexed spec is `old`.
    pub fn remove(&mut self, host: &str, old: &S) {
        self.unlink(host, old);
        self.sites = self.sites.saturating_sub(1);
    }

    /// Drop every claim the site `host` made with `old`.
    fn unlink(&mut self, host: &str, old: &S) {
        update_claims(&mut self.exact, host, |c| c.key = None);
        for alias in old.aliases() {
            match alias.strip_prefix("*.") {
                Some(suffix) => update_claims(&mut self.wildcard, suffix, |c| c.remove_alias(host)),
                None => update_claims(&mut self.exact, alias, |c| c.remove_alias(host)),
            }
        }
    }
}

impl<S: Aliased> Index<S> for HostIndex<S> {
    fn put(&mut self, name: &str, old: Option<&Arc<S>>, new: &Arc<S>) {
        self.upsert(name, old.map(|o| &**o), new.clone());
    }

    fn remove(&mut self, name: &str, old: &Arc<S>) {
        HostIndex::remove(self, name, old);
    }
}

impl<S: Aliased> FromIterator<(String, Arc<S>)> for HostIndex<S> {
    fn from_iter<I: IntoIterator<Item = (String, Arc<S>)>>(sites: I) -> Self {
        let mut index = Self::default();
        for (host, spec) in sites {
            index.upsert(&host, None, spec);
        }
        index
    }
}

fn claims_mut<'a, S>(map: &'a mut OrdMap<String, Claims<S>>, name: &str) -> &'a mut Claims<S> {
    if !map.contains_key(name) {
        map.insert(name.to_string(), Claims::default());
    }
    map.get_mut(name).expect("inserted above")
}

/// Change the claims on `name`, dropping the entry once nobody claims it.
fn update_claims<S>(
    map: &mut OrdMap<String, Claims<S>>,
    name: &str,
    change: impl FnOnce(&mut Claims<S>),
) {
    let Some(claims) = map.get_mut(name) else {
        return;
    };
    change(claims);
    if claims.is_empty() {
        map.remove(name);
    }
}

/// The alias of `site` that matched: the spec's own string, so callers can show it.
fn alias_as_written<'a, S: Aliased>(site: &'a Site<S>, name: &str, wildcard: bool) -> &'a str {
    site.spec
        .aliases()
        .iter()
        .find(|a| match a.strip_prefix("*.") {
            Some(suffix) => wildcard && suffix == name,
            None => !wildcard && *a == name,
        })
        .map(String::as_str)
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(aliases: &[&str]) -> Arc<SiteSpec> {
        let mut s = SiteSpec::new_app("alice", "app:application", "/srv/a");
        s.aliases = aliases.iter().map(|a| a.to_string()).collect();
        Arc::new(s)
    }

    fn index(sites: &[(&str, &[&str])]) -> HostIndex {
        sites
            .iter()
            .map(|(h, a)| (h.to_string(), spec(a)))
            .collect()
    }

    fn owner(index: &HostIndex, host: &str) -> Option<(String, String)> {
        index.lookup(host).map(|r| {
            let via = match r.via {
                Via::Key => "key".to_string(),
                Via::Alias(a) => a.to_string(),
            };
            (r.site.host.clone(), via)
        })
    }

    fn pair(site: &str, via: &str) -> Option<(String, String)> {
        Some((site.to_string(), via.to_string()))
    }

    #[test]
    fn keys_then_exact_aliases_then_the_closest_wildcard() {
        let i = index(&[
            ("a.example", &["www.a.example"]),
            ("b.example", &["*.b.example", "*.deep.b.example"]),
            ("shop.b.example", &[]),
        ]);
        assert_eq!(owner(&i, "a.example"), pair("a.example", "key"));
        assert_eq!(
            owner(&i, "www.a.example"),
            pair("a.example", "www.a.example")
        );
        assert_eq!(owner(&i, "x.b.example"), pair("b.example", "*.b.example"));
        assert_eq!(
            owner(&i, "y.x.deep.b.example"),
            pair("b.example", "*.deep.b.example")
        );
        assert_eq!(owner(&i, "shop.b.example"), pair("shop.b.example", "key"));
        assert_eq!(owner(&i, "b.example.org"), None);
        assert_eq!(owner(&i, "nothing.example"), None);
        assert_eq!(i.len(), 3);
    }

    #[test]
    fn a_site_name_beats_another_sites_alias() {
        let i = index(&[("a.example", &["b.example"]), ("b.example", &[])]);
        assert_eq!(owner(&i, "b.example"), pair("b.example", "key"));
        assert_eq!(i.claimants("b.example").len(), 2);
    }

    #[test]
    fn an_alias_moves_between_sites() {
        let mut i = index(&[("a.example", &["www.shop.example"]), ("b.example", &[])]);
        assert_eq!(
            owner(&i, "www.shop.example"),
            pair("a.example", "www.shop.example")
        );
        // b takes the alias while a still has it: the first in key order (a) keeps it.
        i.upsert("b.example", Some(&spec(&[])), spec(&["www.shop.example"]));
        assert_eq!(
            owner(&i, "www.shop.example"),
            pair("a.example", "www.shop.example")
        );
        // a lets go: b has it.
        i.upsert("a.example", Some(&spec(&["www.shop.example"])), spec(&[]));
        assert_eq!(
            owner(&i, "www.shop.example"),
            pair("b.example", "www.shop.example")
        );
        assert_eq!(i.claimants("www.shop.example").len(), 1);
        // b removes it: nobody serves it, and nothing is left behind.
        i.upsert("b.example", Some(&spec(&["www.shop.example"])), spec(&[]));
        assert_eq!(owner(&i, "www.shop.example"), None);
        assert!(i.claimants("www.shop.example").is_empty());
        assert_eq!(i.exact.len(), 2);
    }

    #[test]
    fn a_wildcard_added_over_an_exact_name() {
        let mut i = index(&[("api.example", &[]), ("example", &[])]);
        assert_eq!(owner(&i, "www.example"), None);
        i.upsert("example", Some(&spec(&[])), spec(&["*.example"]));
        // The wildcard serves every other name under it; the exact name keeps its own site.
        assert_eq!(owner(&i, "www.example"), pair("example", "*.example"));
        assert_eq!(owner(&i, "api.example"), pair("api.example", "key"));
        assert_eq!(owner(&i, "example"), pair("example", "key"));
        // The exact site goes: the wildcard takes that name too.
        i.remove("api.example", &spec(&[]));
        assert_eq!(owner(&i, "api.example"), pair("example", "*.example"));
    }

    #[test]
    fn a_site_removed_while_another_sites_alias_names_it() {
        let mut i = index(&[("old.example", &[]), ("new.example", &["old.example"])]);
        assert_eq!(owner(&i, "old.example"), pair("old.example", "key"));
        i.remove("old.example", &spec(&[]));
        assert_eq!(owner(&i, "old.example"), pair("new.example", "old.example"));
        assert!(i.site("old.example").is_none());
        // And back: the key wins again.
        i.upsert("old.example", None, spec(&[]));
        assert_eq!(owner(&i, "old.example"), pair("old.example", "key"));
        assert_eq!(i.len(), 2);
    }

    #[test]
    fn an_older_index_is_unchanged_by_later_updates() {
        let mut i = index(&[("a.example", &["www.a.example"])]);
        let before = i.clone();
        i.remove("a.example", &spec(&["www.a.example"]));
        assert!(i.lookup("www.a.example").is_none());
        assert_eq!(
            owner(&before, "www.a.example"),
            pair("a.example", "www.a.example")
        );
    }
}
