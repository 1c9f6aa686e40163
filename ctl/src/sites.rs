//! `site add | set | rm | ls | show`: registering and changing what the proxies serve.
//!
//! Every write is a compare-and-set transaction, so two operators (or an operator and a
//! script) cannot overwrite each other unnoticed. It writes the site and its alias index
//! entries together ([`crate::aliases`]), so a name is checked with a few key reads, never
//! a scan of every site; only `site ls` reads them all, a page at a time.

use anyhow::{anyhow, bail};
use etcd_client::{Compare, CompareOp, TxnOp};
use roost_proto::{canonical_host, SiteSpec};
use serde::Serialize;

use crate::aliases::{self, NameState};
use crate::catalog::{Catalog, SiteEntry, Via};
use crate::output;
use crate::spec::{self, Program, SiteFlags, SitePatch};
use crate::store::{Listing, Store};
use crate::table::Table;

/// A site as `--json` shows it in `site ls`, `site add` and `site set`.
#[derive(Serialize)]
struct SiteJson<'a> {
    host: &'a str,
    /// The record, or null when it does not decode.
    spec: Option<&'a SiteSpec>,
    /// The node serving the site now, or null.
    placed_on: Option<&'a str>,
    /// Why the record does not decode, or null.
    error: Option<&'a str>,
    /// The value as stored, only for a record that does not decode.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<String>,
    /// What `site set` changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    changes: Option<&'a [String]>,
}

impl<'a> SiteJson<'a> {
    fn of(catalog: &'a Catalog, entry: &'a SiteEntry) -> Self {
        match &entry.spec {
            Ok(spec) => Self::valid(catalog, &entry.host, spec),
            Err(e) => Self {
                host: &entry.host,
                spec: None,
                placed_on: None,
                error: Some(e),
                raw: Some(String::from_utf8_lossy(&entry.raw).into_owned()),
                changes: None,
            },
        }
    }

    fn valid(catalog: &'a Catalog, host: &'a str, spec: &'a SiteSpec) -> Self {
        Self {
            host,
            spec: Some(spec),
            placed_on: catalog.placed(host, spec).map(|(id, _)| id),
            error: None,
            raw: None,
            changes: None,
        }
    }
}

/// The canonical spelling of a host given on the command line.
pub fn canonical(raw: &str) -> anyhow::Result<String> {
    canonical_host(raw).map_err(|e| anyhow!("{raw:?} is not a valid host name: {e}"))
}

fn validate(host: &str, spec: &SiteSpec) -> anyhow::Result<()> {
    spec.validate()
        .map_err(|e| anyhow!("invalid site {host}: {e}"))
}

/// A catalog of the live nodes only: all that placement text needs.
async fn nodes_only(store: &Store) -> anyhow::Result<Catalog> {
    let (_, nodes) = store.nodes().await?;
    Ok(Catalog::new(Listing {
        sites: Vec::new(),
        nodes,
    }))
}

/// Refuse names another site holds, naming each.
fn refuse_clashes<'a>(
    host: &str,
    verb: &str,
    states: impl IntoIterator<Item = &'a NameState>,
) -> anyhow::Result<()> {
    let clashes: Vec<String> = states.into_iter().filter_map(|s| s.clash(host)).collect();
    if clashes.is_empty() {
        return Ok(());
    }
    bail!(
        "cannot {verb} {host}: {}; a name is served by one site only: \
         remove it from the other site first (`roostctl site set SITE --remove-alias NAME`)",
        clashes.join("; ")
    )
}

/// `site add`: create the record and its alias index entries, refusing to overwrite a site
/// or to take a name another site holds.
pub async fn add(
    store: &Store,
    host: &str,
    user: &str,
    program: Program,
    dir: &str,
    flags: &SiteFlags,
    json: bool,
) -> anyhow::Result<()> {
    let host = canonical(host)?;
    let spec = spec::build(user, program, dir, flags)?;
    validate(&host, &spec)?;
    let names: Vec<String> = std::iter::once(host.clone())
        .chain(spec.aliases.iter().cloned())
        .collect();
    let states = aliases::read(store, &names).await?;
    let layout = store.layout();
    let site_key = layout.site_key(&host);
    if states[0].is_site {
        return Err(exists(&host));
    }
    refuse_clashes(&host, "add", &states)?;
    let mut compares = vec![Compare::create_revision(
        site_key.as_str(),
        CompareOp::Equal,
        0,
    )];
    compares.extend(states.iter().map(|s| s.guard(store)));
    // An exact alias must not become some other site's key meanwhile either.
    compares.extend(
        spec.aliases
            .iter()
            .filter(|a| !a.starts_with("*.") && **a != host)
            .map(|a| Compare::create_revision(layout.site_key(a), CompareOp::Equal, 0)),
    );
    let mut ops = vec![TxnOp::put(site_key.as_str(), spec.to_json(), None)];
    ops.extend(states[1..].iter().map(|s| s.claim(store, &host)));
    if !store.commit(compares, ops).await? {
        if store.get_site(&host).await?.is_some() {
            return Err(exists(&host));
        }
        bail!("a name of {host} was claimed by another change at the same time: run the command again");
    }
    let catalog = nodes_only(store).await?;
    if json {
        return output::json(&SiteJson::valid(&catalog, &host, &spec));
    }
    output::line(&format!(
        "added {host}: {}",
        placement_text(&catalog, &host, &spec)
    ))
}

fn exists(host: &str) -> anyhow::Error {
    anyhow!(
        "site {host} already exists: change it with `roostctl site set {host} ...`, \
         or remove it first with `roostctl site rm {host}`"
    )
}

/// `site set`: change only the given fields, compare-and-set on the revision read, with
/// the alias index following the aliases.
pub async fn set(store: &Store, host: &str, patch: &SitePatch, json: bool) -> anyhow::Result<()> {
    let host = canonical(host)?;
    // One retry: a concurrent change is re-read and the patch applied on top of it.
    for _ in 0..2 {
        let Some(kv) = store.get_site(&host).await? else {
            let catalog = Catalog::for_host(store, &host).await?;
            return Err(not_found(
                &catalog,
                &host,
                "add it with `roostctl site add`",
            ));
        };
        let old = SiteSpec::from_json(&kv.value).map_err(|e| {
            anyhow!(
                "site {host} has an invalid record ({e}), so there is nothing to patch: \
                 replace it with `roostctl site rm {host}` and `roostctl site add {host} ...`"
            )
        })?;
        let mut new = old.clone();
        patch.apply(&mut new)?;
        validate(&host, &new)?;
        let changes = spec::changes(&old, &new);
        if !changes.is_empty() {
            let mut names = new.aliases.clone();
            names.extend(
                old.aliases
                    .iter()
                    .filter(|a| !new.aliases.contains(a))
                    .cloned(),
            );
            let states = aliases::read(store, &names).await?;
            let (kept, dropped) = states.split_at(new.aliases.len());
            // Only names this change adds are checked: an old conflict does not block edits.
            refuse_clashes(
                &host,
                "change",
                kept.iter().filter(|s| !old.aliases.contains(&s.name)),
            )?;
            let mut compares = vec![Compare::mod_revision(
                store.site_key(&host),
                CompareOp::Equal,
                kv.mod_revision,
            )];
            compares.extend(states.iter().map(|s| s.guard(store)));
            let mut ops = vec![TxnOp::put(store.site_key(&host), new.to_json(), None)];
            // Claim every kept alias the index does not name us for (new, or never indexed).
            ops.extend(
                kept.iter()
                    .filter(|s| !s.held_by(&host))
                    .map(|s| s.claim(store, &host)),
            );
            ops.extend(dropped.iter().filter_map(|s| s.release(store, &host)));
            if !store.commit(compares, ops).await? {
                continue; // changed since we read it: read again and re-apply
            }
        }
        let catalog = nodes_only(store).await?;
        if json {
            let mut out = SiteJson::valid(&catalog, &host, &new);
            out.changes = Some(&changes);
            return output::json(&out);
        }
        return output::line(&if changes.is_empty() {
            format!("{host} unchanged: it already has those settings")
        } else {
            format!(
                "updated {host} ({}): {}",
                changes.join("; "),
                placement_text(&catalog, &host, &new)
            )
        });
    }
    bail!(
        "site {host} kept changing while this update was applied: \
         check `roostctl site show {host}` and run the command again"
    )
}

/// `site rm`: delete by canonical host, or by the exact name `site ls` lists for a
/// record whose key is not canonical, with the alias index entries it holds.
pub async fn rm(store: &Store, host: &str, json: bool) -> anyhow::Result<()> {
    for name in candidate_names(host) {
        for _ in 0..2 {
            let Some(kv) = store.get_site(&name).await? else {
                break;
            };
            let held = SiteSpec::from_json(&kv.value)
                .map(|s| s.aliases)
                .unwrap_or_default();
            let states = aliases::read(store, &held).await?;
            let mut compares = vec![Compare::mod_revision(
                store.site_key(&name),
                CompareOp::Equal,
                kv.mod_revision,
            )];
            compares.extend(states.iter().map(|s| s.guard(store)));
            let mut ops = vec![TxnOp::delete(store.site_key(&name), None)];
            ops.extend(states.iter().filter_map(|s| s.release(store, &name)));
            if !store.commit(compares, ops).await? {
                continue;
            }
            if json {
                return output::json(&serde_json::json!({ "host": name, "removed": true }));
            }
            return output::line(&format!("removed {name}"));
        }
    }
    let name = canonical(host).unwrap_or(host.to_string());
    let catalog = Catalog::for_host(store, &name).await?;
    Err(not_found(&catalog, &name, "see `roostctl site ls`"))
}

/// `site ls`: every record, the invalid ones too, with where each valid one is placed.
/// Read and printed a page at a time (all pages at one revision), so memory stays flat
/// with 100,000 sites; `--json` is still one JSON array.
pub async fn ls(store: &Store, json: bool) -> anyhow::Result<()> {
    let (revision, nodes) = store.nodes().await?;
    let mut pages = store.site_pages(revision);
    let mut widths = Vec::new();
    let mut first = true;
    while let Some(page) = pages.next().await? {
        let catalog = Catalog::new(Listing {
            sites: page,
            nodes: nodes.clone(),
        });
        if json {
            let mut text = String::new();
            for site in &catalog.sites {
                text += if first { "[\n" } else { ",\n" };
                text += &serde_json::to_string_pretty(&SiteJson::of(&catalog, site))?;
                first = false;
            }
            output::emit(&text)?;
            continue;
        }
        if catalog.sites.is_empty() {
            continue;
        }
        output::emit(&site_table(&catalog).render_continued(&mut widths, !first))?;
        first = false;
    }
    match (json, first) {
        (true, true) => output::line("[]"),
        (true, false) => output::line("\n]"),
        (false, true) => output::line("no sites yet: add one with `roostctl site add HOST --user USER --app MODULE:CALLABLE --dir DIR`"),
        (false, false) => Ok(()),
    }
}

fn site_table(catalog: &Catalog) -> Table {
    let any_invalid = catalog.sites.iter().any(|s| s.spec.is_err());
    let mut header = vec!["HOST", "USER", "APP/COMMAND", "NODE", "IDLE"];
    if any_invalid {
        header.push("ERROR");
    }
    let mut table = Table::new(&header);
    for site in &catalog.sites {
        match &site.spec {
            Ok(spec) => table.row(vec![
                site.host.clone(),
                spec.user.clone(),
                spec::program_summary(spec),
                node_cell(catalog, &site.host, spec),
                format!("{}s", spec.idle_timeout),
            ]),
            Err(e) => table.row(vec![
                site.host.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                format!("invalid, not served: {e}"),
            ]),
        }
    }
    table
}

/// `site show`: the record, where it is placed, and (if invalid) why it is not served.
pub async fn show(store: &Store, host: &str, json: bool) -> anyhow::Result<()> {
    let name = canonical(host).unwrap_or(host.to_string());
    let mut catalog = Catalog::for_host(store, &name).await?;
    if catalog.site(&name).is_none() && name != host {
        // A record whose key is not canonical is shown under the name as given.
        catalog = Catalog::for_host(store, host).await?;
    }
    let Some(site) = candidate_names(host).iter().find_map(|n| catalog.site(n)) else {
        return Err(not_found(&catalog, &name, "see `roostctl site ls`"));
    };
    if json {
        // The record exactly as stored, for scripts that edit and write it back.
        return output::line(&String::from_utf8_lossy(&site.raw));
    }
    let mut text = format!("site:       {}\n", site.host);
    match &site.spec {
        Ok(spec) => {
            text += &format!(
                "placement:  {}\n",
                placement_text(&catalog, &site.host, spec)
            );
            text += &format!("record:     (revision {})\n", site.mod_revision);
            text += &serde_json::to_string_pretty(spec)?;
        }
        Err(e) => {
            text += &format!(
                "invalid:    {e}\n            proxies do not serve this record; fix it with etcdctl, or \
                 `roostctl site rm {0}` and `roostctl site add`\n",
                site.host
            );
            text += &format!("record:     (revision {}, as stored)\n", site.mod_revision);
            text += &String::from_utf8_lossy(&site.raw);
        }
    }
    output::line(&text)
}

/// The names to try for a host argument: its canonical form, then the argument as given
/// (so a record written with a non-canonical key can still be shown and removed).
fn candidate_names(raw: &str) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(c) = canonical_host(raw) {
        names.push(c);
    }
    if !raw.is_empty() && !names.iter().any(|n| n == raw) {
        names.push(raw.to_string());
    }
    names
}

/// "no such site", with a pointer to the site when the name is one of its aliases.
fn not_found(catalog: &Catalog, host: &str, advice: &str) -> anyhow::Error {
    match catalog.resolve(host).first() {
        Some((site, Via::Alias(alias))) => anyhow!(
            "no such site {host}: it is served by {} through its alias {alias}; \
             use `{}` as the site name",
            site.host,
            site.host
        ),
        _ => anyhow!("no such site {host}: {advice}"),
    }
}

/// The NODE cell: the placed node, with a note when a pin is not honoured.
fn node_cell(catalog: &Catalog, host: &str, spec: &SiteSpec) -> String {
    let placed = catalog.placed(host, spec).map(|(id, _)| id).unwrap_or("-");
    match catalog.pin_note(spec) {
        Some(note) => format!("{placed} ({note})"),
        None => placed.to_string(),
    }
}

/// "placed on n1 (127.0.0.1:7100, pinned)" or why nothing serves the site.
fn placement_text(catalog: &Catalog, host: &str, spec: &SiteSpec) -> String {
    match catalog.placed(host, spec) {
        Some((id, node)) => {
            let note = catalog
                .pin_note(spec)
                .map(|n| format!(", {n}"))
                .unwrap_or_default();
            format!("placed on {id} ({}{note})", node.addr)
        }
        None if catalog.live_nodes().is_empty() => {
            "no node is live yet; it is served as soon as a roost-agent registers".into()
        }
        None => "every live node is draining; it is served once one is undrained or another joins"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_tried_canonical_first_then_as_given() {
        assert_eq!(
            candidate_names("Example.COM"),
            ["example.com", "Example.COM"]
        );
        assert_eq!(candidate_names("example.com"), ["example.com"]);
        assert_eq!(candidate_names("a b"), ["a b"]);
        assert!(candidate_names("").is_empty());
    }

    #[test]
    fn the_site_table_shows_placement_pins_and_invalid_records() {
        use crate::store::{Kv, Listing};
        let kv = |name: &str, value: &str| Kv {
            name: name.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 1,
        };
        let catalog = Catalog::new(Listing {
            sites: vec![
                kv(
                    "a.example",
                    r#"{"user":"alice","app":"app:application","dir":"/a"}"#,
                ),
                kv(
                    "b.example",
                    r#"{"user":"bob","command":["/bin/srv","a b"],"dir":"/b","node":"gone","idle_timeout":5}"#,
                ),
                kv("bad.example", r#"{"user":1}"#),
            ],
            nodes: vec![kv("n1", r#"{"addr":"127.0.0.1:7100","capacity":100}"#)],
        });
        assert_eq!(
            site_table(&catalog).render(),
            "HOST         USER   APP/COMMAND      NODE                       IDLE  ERROR\n\
             a.example    alice  app:application  n1                         300s\n\
             b.example    bob    /bin/srv 'a b'   n1 (pin gone is not live)  5s\n\
             bad.example  -      -                -                          -     \
             invalid, not served: field `user`: invalid type: integer `1`, expected a string\n"
        );
    }
}
