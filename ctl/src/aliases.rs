//! The alias index, `<prefix>/aliases/<alias>` → the host of the site claiming it.
//!
//! It lets `site add`/`set` check a name, and `where` find the site behind an alias, with a
//! few key reads instead of a scan of every site. roostctl writes it in the same transaction
//! as the site, guarded by the revisions it read, so two operators cannot claim one alias.
//! It is only an index: an entry counts only while its site's record still lists the alias
//! (a site changed or removed with plain etcdctl leaves a stale entry, which is taken over),
//! and the proxy never reads it.

use etcd_client::{Compare, CompareOp, TxnOp};
use roost_proto::informer::Record;
use roost_proto::SiteSpec;

use crate::store::Store;

/// What etcd holds about one name (a site's host or one of its aliases).
#[derive(Debug)]
pub struct NameState {
    /// The name as written (`*.` kept for a wildcard).
    pub name: String,
    /// Revision of the index key, 0 when absent: the guard of a later write.
    index_revision: i64,
    /// The site the index names, when its record still lists this name.
    pub owner: Option<String>,
    /// A site record has this name as its key (exact names only).
    pub is_site: bool,
}

impl NameState {
    /// Why `host` may not claim this name, if another site holds it.
    pub fn clash(&self, host: &str) -> Option<String> {
        if self.is_site && self.name != host {
            return Some(format!("{} is the name of another site", self.name));
        }
        match &self.owner {
            Some(owner) if owner != host => {
                Some(format!("{} is an alias of site {owner}", self.name))
            }
            _ => None,
        }
    }

    /// The index entry is what was read (so the owner checked is still the owner).
    pub fn guard(&self, store: &Store) -> Compare {
        let key = store.layout().alias_key(&self.name);
        if self.index_revision == 0 {
            Compare::create_revision(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, self.index_revision)
        }
    }

    /// Make the index name `host` for this name.
    pub fn claim(&self, store: &Store, host: &str) -> TxnOp {
        TxnOp::put(store.layout().alias_key(&self.name), host, None)
    }

    /// Drop the index entry if `host` holds it (a stale or foreign entry is left alone).
    pub fn release(&self, store: &Store, host: &str) -> Option<TxnOp> {
        (self.index_revision != 0 && self.owner.as_deref() == Some(host))
            .then(|| TxnOp::delete(store.layout().alias_key(&self.name), None))
    }

    /// The index already names `host`.
    pub fn held_by(&self, host: &str) -> bool {
        self.owner.as_deref() == Some(host)
    }
}

/// Read the index entries of `names`, whether each is a site's key, and whether each
/// entry's site still lists the name: two reads, whatever the number of sites.
pub async fn read(store: &Store, names: &[String]) -> anyhow::Result<Vec<NameState>> {
    let layout = store.layout();
    let mut keys: Vec<String> = names.iter().map(|n| layout.alias_key(n)).collect();
    keys.extend(names.iter().map(|n| layout.site_key(n)));
    let got = store.get_keys(&keys, 0).await?;
    let (index, sites) = got.split_at(names.len());
    let owners: Vec<String> = index
        .iter()
        .map(|kv| {
            kv.as_ref()
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                .unwrap_or_default()
        })
        .collect();
    let owner_keys: Vec<String> = owners.iter().map(|o| layout.site_key(o)).collect();
    let owner_records = store.get_keys(&owner_keys, 0).await?;
    Ok(names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let lists_name = owner_records[i].as_ref().is_some_and(|kv| {
                <SiteSpec as Record>::decode(&owners[i], &kv.value)
                    .is_ok_and(|spec| spec.aliases.iter().any(|a| a == name))
            });
            NameState {
                name: name.clone(),
                index_revision: index[i].as_ref().map_or(0, |kv| kv.mod_revision),
                owner: lists_name.then(|| owners[i].clone()),
                is_site: !name.starts_with("*.") && sites[i].is_some(),
            }
        })
        .collect())
}
