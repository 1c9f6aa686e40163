//! `site add | set | rm | ls | show`: registering and changing what the proxies serve.
//!
//! Every write is a compare-and-set transaction, so two operators (or an operator and a
//! script) cannot overwrite each other unnoticed.

use anyhow::{anyhow, bail};
use roost_proto::{canonical_host, SiteSpec};
use serde::Serialize;

use crate::catalog::{Catalog, SiteEntry, Via};
use crate::output;
use crate::spec::{self, Program, SiteFlags, SitePatch};
use crate::store::Store;
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

/// `site add`: create the record, refusing to overwrite one that exists.
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
    let catalog = Catalog::new(store.list().await?);
    if !store.create_site(&host, &spec.to_json()).await? {
        bail!(
            "site {host} already exists: change it with `roostctl site set {host} ...`, \
             or remove it first with `roostctl site rm {host}`"
        );
    }
    warn_about_claims(&catalog, &host, &spec);
    if json {
        return output::json(&SiteJson::valid(&catalog, &host, &spec));
    }
    output::line(&format!(
        "added {host}: {}",
        placement_text(&catalog, &host, &spec)
    ))
}

/// `site set`: change only the given fields, compare-and-set on the revision read.
pub async fn set(store: &Store, host: &str, patch: &SitePatch, json: bool) -> anyhow::Result<()> {
    let host = canonical(host)?;
    let catalog = Catalog::new(store.list().await?);
    // One retry: a concurrent change is re-read and the patch applied on top of it.
    for _ in 0..2 {
        let Some(kv) = store.get_site(&host).await? else {
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
            if !store
                .replace_site(&host, &new.to_json(), kv.mod_revision)
                .await?
            {
                continue; // changed since we read it: read again and re-apply
            }
            warn_about_claims(&catalog, &host, &new);
        }
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
/// record whose key is not canonical.
pub async fn rm(store: &Store, host: &str, json: bool) -> anyhow::Result<()> {
    for name in candidate_names(host) {
        if store.delete_site(&name).await? {
            if json {
                return output::json(&serde_json::json!({ "host": name, "removed": true }));
            }
            return output::line(&format!("removed {name}"));
        }
    }
    let catalog = Catalog::new(store.list().await?);
    Err(not_found(
        &catalog,
        &canonical(host).unwrap_or(host.to_string()),
        "see `roostctl site ls`",
    ))
}

/// `site ls`: every record, the invalid ones too, with where each valid one is placed.
pub async fn ls(store: &Store, json: bool) -> anyhow::Result<()> {
    let catalog = Catalog::new(store.list().await?);
    if json {
        let rows: Vec<SiteJson> = catalog
            .sites
            .iter()
            .map(|s| SiteJson::of(&catalog, s))
            .collect();
        return output::json(&rows);
    }
    if catalog.sites.is_empty() {
        return output::line("no sites yet: add one with `roostctl site add HOST --user USER --app MODULE:CALLABLE --dir DIR`");
    }
    output::emit(&site_table(&catalog).render())
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
    let catalog = Catalog::new(store.list().await?);
    let Some(site) = candidate_names(host).iter().find_map(|n| catalog.site(n)) else {
        let name = canonical(host).unwrap_or(host.to_string());
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

/// Warn (not refuse) when another site already claims this host or one of its aliases:
/// the record is still valid, but which site answers a shared name is the proxy's choice.
fn warn_about_claims(catalog: &Catalog, host: &str, spec: &SiteSpec) {
    for clash in catalog.clashes(host, spec) {
        eprintln!("roostctl: warning: {clash}");
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
