//! Framework sets: which third-party packages several sites share, learnt from what their
//! workers imported (issue 14; docs/first-hit.md). Pure logic and the state file; the
//! zygotes that preload a set are started by `zygote.rs`.
//!
//! - A worker reports, once after its first response, the modules it imported from the
//!   interpreter's own paths ([`parse_report`]: tenant input, so bounded and checked).
//! - [`Learner::observe`] keys the report by its third-party top-level packages (its
//!   *packages*, e.g. {django, asgiref, sqlparse}) and counts the sites whose packages
//!   contain a candidate set, forming smaller candidates from the common part of two
//!   sites' packages (a Django site that also uses `requests` shares {django, …} with one
//!   that does not). A candidate used by `min_sites` sites becomes a framework set, up to
//!   `max_sets`; its modules are those every counted site imported.
//! - [`Learner::choose`]: a site forks from the largest set contained in the packages of
//!   its last run.
//! - [`StateFile`]: the sets, with the fingerprint of the interpreter and its package
//!   directories they were probed against, written atomically under the state dir.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A report is one SOCK_SEQPACKET message; the worker keeps it under this.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;
/// Module names per list of a report.
pub const MAX_REPORT_MODULES: usize = 2000;
/// Longest module name accepted.
const MAX_NAME_LEN: usize = 200;
/// Third-party top-level packages in one report (a key with more is not a framework).
const MAX_PACKAGES: usize = 64;
/// Candidate sets remembered (the least recently seen goes first).
const MAX_CANDIDATES: usize = 64;
/// Sites whose last run's packages are remembered, for `choose`; past it one is forgotten
/// and forks from the base zygote until its next report.
const MAX_SITES: usize = 100_000;
/// Modules one set preloads at most.
const MAX_SET_MODULES: usize = 4000;

pub type Packages = BTreeSet<String>;

/// What a worker imported beyond its zygote's base, from the interpreter's own paths.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// From dist-/site-packages, in import order.
    pub third_party: Vec<String>,
    /// From the standard library, in import order.
    pub stdlib: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("report of {0} bytes is over {MAX_REPORT_BYTES}")]
    TooLarge(usize),
    #[error("report is not JSON of the expected shape: {0}")]
    Malformed(String),
    #[error("report lists {0} modules in one list, over {MAX_REPORT_MODULES}")]
    TooMany(usize),
    #[error("report names {0:?}, which is not a dotted Python module name")]
    BadName(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReport {
    third_party: Vec<String>,
    stdlib: Vec<String>,
}

/// `a.b_c.d`: identifiers (ASCII letters, digits, `_`; no leading digit) joined by dots.
pub fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|part| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// Check a worker's report: size, shape, count, every name; duplicates dropped.
pub fn parse_report(bytes: &[u8]) -> Result<Report, ReportError> {
    if bytes.len() > MAX_REPORT_BYTES {
        return Err(ReportError::TooLarge(bytes.len()));
    }
    let wire: WireReport =
        serde_json::from_slice(bytes).map_err(|e| ReportError::Malformed(e.to_string()))?;
    let check = |list: Vec<String>| -> Result<Vec<String>, ReportError> {
        if list.len() > MAX_REPORT_MODULES {
            return Err(ReportError::TooMany(list.len()));
        }
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(list.len());
        for name in list {
            if !valid_module_name(&name) {
                return Err(ReportError::BadName(name.chars().take(80).collect()));
            }
            if seen.insert(name.clone()) {
                out.push(name);
            }
        }
        Ok(out)
    };
    Ok(Report {
        third_party: check(wire.third_party)?,
        stdlib: check(wire.stdlib)?,
    })
}

fn top_level(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

impl Report {
    /// The third-party top-level packages: the key of the report's framework set.
    pub fn packages(&self) -> Packages {
        self.third_party
            .iter()
            .map(|m| top_level(m).to_string())
            .collect()
    }
}

/// A framework set: a zygote preloads `modules` (in order) for sites whose packages
/// contain `packages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameworkSet {
    pub interpreter: PathBuf,
    pub packages: Packages,
    pub modules: Vec<String>,
}

impl FrameworkSet {
    /// `packages` joined by commas: the set's name in logs and metrics.
    pub fn name(&self) -> String {
        self.packages.iter().cloned().collect::<Vec<_>>().join(",")
    }
}

struct Candidate {
    /// Sites counted (at most `min_sites` kept).
    sites: BTreeSet<String>,
    /// Modules every counted site imported, in the first one's order.
    third_party: Vec<String>,
    stdlib: Vec<String>,
    last_seen: u64,
}

/// Learns framework sets from reports. One per agent, behind a mutex; every call is
/// bounded by the candidates (64) and sets (`max_sets`), never by the number of sites.
pub struct Learner {
    min_sites: usize,
    max_sets: usize,
    pin: Vec<String>,
    forbid: Vec<String>,
    candidates: HashMap<(PathBuf, Packages), Candidate>,
    sets: Vec<FrameworkSet>,
    /// Sets that may not be built again (too large, failed): never promoted again.
    refused: HashSet<(PathBuf, Packages)>,
    site_used: HashMap<String, (PathBuf, Arc<Packages>)>,
    interned: HashMap<Packages, Arc<Packages>>,
    tick: u64,
}

impl Learner {
    pub fn new(min_sites: usize, max_sets: usize, pin: Vec<String>, forbid: Vec<String>) -> Self {
        Self {
            min_sites: min_sites.max(1),
            max_sets,
            pin,
            forbid,
            candidates: HashMap::new(),
            sets: Vec::new(),
            refused: HashSet::new(),
            site_used: HashMap::new(),
            interned: HashMap::new(),
            tick: 0,
        }
    }

    pub fn sets(&self) -> &[FrameworkSet] {
        &self.sets
    }

    /// Add a set learnt before (the state file); false when there is no room or it is known.
    pub fn restore(&mut self, set: FrameworkSet) -> bool {
        if self.sets.len() >= self.max_sets
            || self
                .sets
                .iter()
                .any(|s| s.interpreter == set.interpreter && s.packages == set.packages)
        {
            return false;
        }
        self.sets.push(set);
        true
    }

    /// Forget a set for good (its zygote grew too large, or could not be built).
    pub fn refuse(&mut self, interpreter: &Path, packages: &Packages) {
        let key = (interpreter.to_path_buf(), packages.clone());
        self.sets
            .retain(|s| !(s.interpreter == key.0 && s.packages == key.1));
        self.candidates.remove(&key);
        self.refused.insert(key);
    }

    /// Forget a set, to be learnt again from the next reports (its interpreter or packages
    /// changed).
    pub fn discard(&mut self, interpreter: &Path, packages: &Packages) {
        self.sets
            .retain(|s| !(s.interpreter == interpreter && &s.packages == packages));
    }

    /// Record `host`'s report; returns the sets that became framework sets (to build).
    pub fn observe(
        &mut self,
        host: &str,
        interpreter: &Path,
        report: &Report,
    ) -> Vec<FrameworkSet> {
        self.tick += 1;
        let packages = report.packages();
        if packages.is_empty() || packages.len() > MAX_PACKAGES {
            self.site_used.remove(host);
            return Vec::new();
        }
        self.remember_site(host, interpreter, &packages);
        // The report's own set, and the common part with every candidate it overlaps.
        let mut keys = vec![packages.clone()];
        for (interp, cand) in self.candidates.keys() {
            if interp == interpreter {
                let common: Packages = cand.intersection(&packages).cloned().collect();
                if !common.is_empty() && !keys.contains(&common) {
                    keys.push(common);
                }
            }
        }
        let mut promoted = Vec::new();
        for key in keys {
            if self.is_set(interpreter, &key) {
                continue;
            }
            let id = (interpreter.to_path_buf(), key.clone());
            if self.refused.contains(&id) {
                continue;
            }
            // A new common part starts with the sites of the candidates that contain it.
            let inherited: BTreeSet<String> = if self.candidates.contains_key(&id) {
                BTreeSet::new()
            } else {
                self.candidates
                    .iter()
                    .filter(|((i, k), _)| i == interpreter && k.is_superset(&key))
                    .flat_map(|(_, c)| c.sites.iter().cloned())
                    .take(self.min_sites)
                    .collect()
            };
            let base = if self.candidates.contains_key(&id) {
                None
            } else {
                // Modules: the report's, narrowed by the overlapping candidates' below.
                self.candidates
                    .iter()
                    .find(|((i, k), _)| i == interpreter && k.is_superset(&key))
                    .map(|(_, c)| (c.third_party.clone(), c.stdlib.clone()))
            };
            let tick = self.tick;
            let cand = self.candidates.entry(id.clone()).or_insert_with(|| {
                let (tp, sl) =
                    base.unwrap_or_else(|| (report.third_party.clone(), report.stdlib.clone()));
                Candidate {
                    sites: inherited,
                    third_party: tp,
                    stdlib: sl,
                    last_seen: tick,
                }
            });
            cand.last_seen = tick;
            if !cand.sites.contains(host) {
                if !cand.sites.is_empty() {
                    let tp: HashSet<&String> = report.third_party.iter().collect();
                    let sl: HashSet<&String> = report.stdlib.iter().collect();
                    cand.third_party.retain(|m| tp.contains(m));
                    cand.stdlib.retain(|m| sl.contains(m));
                }
                if cand.sites.len() < self.min_sites {
                    cand.sites.insert(host.to_string());
                }
            }
            cand.third_party.retain(|m| key.contains(top_level(m)));
            if cand.sites.len() >= self.min_sites && self.sets.len() < self.max_sets {
                let cand = self.candidates.remove(&id).expect("present");
                let set = FrameworkSet {
                    interpreter: interpreter.to_path_buf(),
                    modules: self.modules_of(&key, cand),
                    packages: key,
                };
                self.sets.push(set.clone());
                promoted.push(set);
            }
        }
        self.trim_candidates();
        promoted
    }

    fn is_set(&self, interpreter: &Path, key: &Packages) -> bool {
        self.sets
            .iter()
            .any(|s| s.interpreter == interpreter && &s.packages == key)
    }

    /// The preload list of a new set: its packages' modules and the stdlib modules all its
    /// sites used, then the operator's pins for its packages (forbidden ones are dropped
    /// when the zygote is built: [`Learner::without_forbidden`]).
    fn modules_of(&self, key: &Packages, cand: Candidate) -> Vec<String> {
        let mut seen = HashSet::new();
        cand.stdlib
            .into_iter()
            .chain(cand.third_party)
            .chain(
                self.pin
                    .iter()
                    .filter(|m| key.contains(top_level(m)))
                    .cloned(),
            )
            .filter(|m| seen.insert(m.clone()))
            .take(MAX_SET_MODULES)
            .collect()
    }

    /// `modules` split into those that may be preloaded and those the operator forbade.
    pub fn without_forbidden(&self, modules: &[String]) -> (Vec<String>, Vec<String>) {
        modules.iter().cloned().partition(|m| !self.is_forbidden(m))
    }

    /// A module the operator forbade, or one below it.
    pub fn is_forbidden(&self, module: &str) -> bool {
        self.forbid.iter().any(|f| {
            module == f || (module.starts_with(f.as_str()) && module[f.len()..].starts_with('.'))
        })
    }

    fn trim_candidates(&mut self) {
        while self.candidates.len() > MAX_CANDIDATES {
            let oldest = self
                .candidates
                .iter()
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.candidates.remove(&k),
                None => break,
            };
        }
    }

    /// The interpreter and packages of `host`'s last report, if remembered.
    pub fn packages_of(&self, host: &str) -> Option<(&Path, &Packages)> {
        self.site_used
            .get(host)
            .map(|(i, p)| (i.as_path(), p.as_ref()))
    }

    /// Remember what `host`'s last run used (read back from its site file after a restart).
    pub fn remember_site(&mut self, host: &str, interpreter: &Path, packages: &Packages) {
        let interned = match self.interned.get(packages) {
            Some(p) => p.clone(),
            None => {
                if self.interned.len() > MAX_SITES {
                    self.interned.clear(); // only a cache of shared copies
                }
                let p = Arc::new(packages.clone());
                self.interned.insert(packages.clone(), p.clone());
                p
            }
        };
        if self.site_used.len() >= MAX_SITES && !self.site_used.contains_key(host) {
            if let Some(k) = self.site_used.keys().next().cloned() {
                self.site_used.remove(&k);
            }
        }
        self.site_used
            .insert(host.to_string(), (interpreter.to_path_buf(), interned));
    }

    /// The framework set `host` should fork from: the largest one of its interpreter
    /// contained in the packages of its last run; None: the base zygote.
    pub fn choose(&self, host: &str, interpreter: &Path) -> Option<&FrameworkSet> {
        let (interp, used) = self.site_used.get(host)?;
        if interp != interpreter {
            return None;
        }
        self.sets
            .iter()
            .filter(|s| s.interpreter == interpreter && s.packages.is_subset(used))
            .max_by_key(|s| s.packages.len())
    }
}

/// What a set's probe was run against: the interpreter and the directories of its
/// sys.path. A change (a package installed or removed changes its directory's mtime)
/// means the set must be probed and learnt again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// (path, mtime in ns, size) of the interpreter and each directory.
    pub files: Vec<(PathBuf, i128, u64)>,
}

impl Fingerprint {
    pub fn of(interpreter: &Path, dirs: &[PathBuf]) -> Self {
        let files = std::iter::once(interpreter)
            .chain(dirs.iter().map(|d| d.as_path()))
            .map(|p| match fs::metadata(p) {
                Ok(m) => (
                    p.to_path_buf(),
                    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
                    if m.is_dir() { 0 } else { m.size() },
                ),
                Err(_) => (p.to_path_buf(), -1, 0),
            })
            .collect();
        Self { files }
    }

    /// The same paths, stat'ed now.
    pub fn current(&self) -> Self {
        match self.files.split_first() {
            Some(((interp, _, _), dirs)) => Self::of(
                interp,
                &dirs.iter().map(|(p, _, _)| p.clone()).collect::<Vec<_>>(),
            ),
            None => self.clone(),
        }
    }
}

/// What one site's last run used, kept in `<state-dir>/sites/<host>/framework` (a directory
/// only root can reach): after an agent restart a site forks from its framework zygote
/// again without a run from the base zygote first. One small file per site, written only
/// when its packages change, read on its cold start: nothing reads all sites' files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteUse {
    pub interpreter: PathBuf,
    pub packages: Packages,
}

impl SiteUse {
    const FILE: &'static str = "framework";
    /// A valid file is a few hundred bytes.
    const MAX_BYTES: u64 = 16 * 1024;

    /// The site's file, if it is there and valid.
    pub fn load(site_dir: &Path) -> Option<Self> {
        use std::io::Read;
        let f = fs::File::open(site_dir.join(Self::FILE)).ok()?;
        let mut bytes = Vec::new();
        f.take(Self::MAX_BYTES).read_to_end(&mut bytes).ok()?;
        let u: Self = serde_json::from_slice(&bytes).ok()?;
        (u.packages.len() <= MAX_PACKAGES && u.packages.iter().all(|p| valid_module_name(p)))
            .then_some(u)
    }

    /// Replace the site's file atomically; the directory must exist (it is the site's
    /// socket directory, root's alone).
    pub fn save(&self, site_dir: &Path) -> io::Result<()> {
        let tmp = site_dir.join(format!(".{}.tmp", Self::FILE));
        fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        fs::rename(&tmp, site_dir.join(Self::FILE))
    }
}

/// A set as stored: its modules as the probe kept them, and the fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSet {
    pub set: FrameworkSet,
    pub fingerprint: Fingerprint,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileBody {
    version: u32,
    sets: Vec<StoredSet>,
}

/// `<state-dir>/frameworks.json`.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("frameworks.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored sets; a missing file is none, a corrupt one an error (to log, then ignore).
    pub fn load(&self) -> Result<Vec<StoredSet>, String> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", self.path.display())),
        };
        let body: FileBody = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a framework state file: {e}", self.path.display()))?;
        if body.version != 1 {
            return Err(format!(
                "{}: version {} is not 1",
                self.path.display(),
                body.version
            ));
        }
        for s in &body.sets {
            if let Some(bad) = s
                .set
                .modules
                .iter()
                .chain(s.set.packages.iter())
                .find(|m| !valid_module_name(m))
            {
                return Err(format!(
                    "{}: {bad:?} is not a module name",
                    self.path.display()
                ));
            }
        }
        Ok(body.sets)
    }

    /// Replace the file atomically (write, fsync, rename).
    pub fn save(&self, sets: &[StoredSet]) -> io::Result<()> {
        let body = FileBody {
            version: 1,
            sets: sets.to_vec(),
        };
        let tmp = self
            .path
            .with_extension(format!("json.{}.tmp", std::process::id()));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&body).map_err(io::Error::other)?)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(third_party: &[&str], stdlib: &[&str]) -> Report {
        Report {
            third_party: third_party.iter().map(|s| s.to_string()).collect(),
            stdlib: stdlib.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn py() -> PathBuf {
        PathBuf::from("/usr/bin/python3.11")
    }

    const DJANGO: &[&str] = &[
        "django",
        "django.conf",
        "django.urls",
        "asgiref",
        "asgiref.local",
        "sqlparse",
    ];
    const FLASK: &[&str] = &[
        "flask",
        "flask.app",
        "werkzeug",
        "jinja2",
        "markupsafe",
        "itsdangerous",
        "click",
        "blinker",
    ];

    #[test]
    fn a_set_is_made_once_two_sites_share_it_and_holds_their_common_modules() {
        let mut l = Learner::new(2, 4, vec![], vec![]);
        assert!(l
            .observe("a.test", &py(), &report(DJANGO, &["decimal", "uuid"]))
            .is_empty());
        // The same site again does not count twice.
        assert!(l
            .observe("a.test", &py(), &report(DJANGO, &["decimal", "uuid"]))
            .is_empty());
        let sets = l.observe("b.test", &py(), &report(DJANGO, &["decimal", "json"]));
        assert_eq!(sets.len(), 1);
        let set = &sets[0];
        assert_eq!(set.name(), "asgiref,django,sqlparse");
        assert!(set.modules.contains(&"django.urls".to_string()));
        assert!(set.modules.contains(&"decimal".to_string()));
        assert!(
            !set.modules.contains(&"uuid".to_string()),
            "only b's and a's common modules"
        );
        assert!(!set.modules.contains(&"json".to_string()));
        // Both sites, and a third one that uses the set, fork from it.
        assert_eq!(
            l.choose("a.test", &py()).map(|s| s.name()),
            Some(set.name())
        );
        assert_eq!(
            l.choose("b.test", &py()).map(|s| s.name()),
            Some(set.name())
        );
        assert!(
            l.choose("c.test", &py()).is_none(),
            "no report yet: the base zygote"
        );
        assert!(l
            .choose("a.test", Path::new("/usr/bin/python3.13"))
            .is_none());
    }

    #[test]
    fn sites_with_extra_packages_share_the_common_framework() {
        let mut l = Learner::new(2, 4, vec![], vec![]);
        let mut with_requests: Vec<&str> = DJANGO.to_vec();
        with_requests.extend(["requests", "urllib3"]);
        let mut with_pillow: Vec<&str> = DJANGO.to_vec();
        with_pillow.push("PIL");
        assert!(l
            .observe("a.test", &py(), &report(&with_requests, &[]))
            .is_empty());
        let sets = l.observe("b.test", &py(), &report(&with_pillow, &[]));
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].name(), "asgiref,django,sqlparse");
        assert!(!sets[0]
            .modules
            .iter()
            .any(|m| m.starts_with("requests") || m == "PIL"));
        assert_eq!(
            l.choose("a.test", &py()).unwrap().name(),
            "asgiref,django,sqlparse"
        );
    }

    #[test]
    fn flask_and_django_make_two_sets_and_a_site_chooses_its_own() {
        let mut l = Learner::new(2, 4, vec![], vec![]);
        l.observe("d1", &py(), &report(DJANGO, &[]));
        l.observe("f1", &py(), &report(FLASK, &[]));
        assert_eq!(l.observe("d2", &py(), &report(DJANGO, &[])).len(), 1);
        assert_eq!(l.observe("f2", &py(), &report(FLASK, &[])).len(), 1);
        assert_eq!(l.sets().len(), 2);
        assert_eq!(
            l.choose("f1", &py()).unwrap().name(),
            "blinker,click,flask,itsdangerous,jinja2,markupsafe,werkzeug"
        );
        assert_eq!(
            l.choose("d2", &py()).unwrap().name(),
            "asgiref,django,sqlparse"
        );
        // A site that now uses no framework forks from the base zygote.
        l.observe("d1", &py(), &report(&[], &["json"]));
        assert!(l.choose("d1", &py()).is_none());
    }

    #[test]
    fn sets_are_bounded_and_a_refused_set_is_not_made_again() {
        let mut l = Learner::new(2, 1, vec![], vec![]);
        l.observe("d1", &py(), &report(DJANGO, &[]));
        assert_eq!(l.observe("d2", &py(), &report(DJANGO, &[])).len(), 1);
        l.observe("f1", &py(), &report(FLASK, &[]));
        assert!(
            l.observe("f2", &py(), &report(FLASK, &[])).is_empty(),
            "max_sets is 1"
        );
        let django = l.sets()[0].packages.clone();
        // A discarded set is learnt again.
        l.discard(&py(), &django);
        assert!(l.sets().is_empty());
        l.observe("d5", &py(), &report(DJANGO, &[]));
        assert_eq!(l.observe("d6", &py(), &report(DJANGO, &[])).len(), 1);
        l.refuse(&py(), &django);
        assert!(l.sets().is_empty());
        assert!(l.observe("d3", &py(), &report(DJANGO, &[])).is_empty());
        assert!(l.observe("d4", &py(), &report(DJANGO, &[])).is_empty());
        // The room is free again for another framework.
        assert_eq!(l.observe("f3", &py(), &report(FLASK, &[])).len(), 1);
    }

    #[test]
    fn pins_join_their_framework_and_forbidden_modules_never_do() {
        let mut l = Learner::new(
            2,
            4,
            vec!["django.contrib.admin".into(), "flask.json".into()],
            vec!["django.urls".into()],
        );
        l.observe(
            "d1",
            &py(),
            &report(
                &["django", "django.urls", "django.urls.base", "django.urlsx"],
                &[],
            ),
        );
        let set = l.observe(
            "d2",
            &py(),
            &report(
                &["django", "django.urls", "django.urls.base", "django.urlsx"],
                &[],
            ),
        );
        let (modules, forbidden) = l.without_forbidden(&set[0].modules);
        assert_eq!(forbidden, vec!["django.urls", "django.urls.base"]);
        assert!(modules.contains(&"django.contrib.admin".to_string()));
        assert!(
            !modules.contains(&"flask.json".to_string()),
            "not this set's package"
        );
        assert!(!modules.contains(&"django.urls".to_string()));
        assert!(!modules.contains(&"django.urls.base".to_string()));
        assert!(
            modules.contains(&"django.urlsx".to_string()),
            "a prefix of the name is not a parent"
        );
    }

    #[test]
    fn candidates_stay_bounded_whatever_sites_report() {
        let mut l = Learner::new(2, 4, vec![], vec![]);
        for i in 0..1000 {
            let name = format!("pkg{i}");
            l.observe(&format!("s{i}"), &py(), &report(&[name.as_str()], &[]));
        }
        assert!(l.candidates.len() <= MAX_CANDIDATES);
        assert!(l.sets().is_empty());
    }

    #[test]
    fn reports_are_checked_as_hostile_input() {
        let ok =
            parse_report(br#"{"third_party":["django","django.conf","django"],"stdlib":["json"]}"#)
                .unwrap();
        assert_eq!(
            ok.third_party,
            vec!["django", "django.conf"],
            "duplicates dropped"
        );
        assert_eq!(
            ok.packages().into_iter().collect::<Vec<_>>(),
            vec!["django"]
        );
        for bad in [
            &br#"{"third_party":["../../etc/passwd"],"stdlib":[]}"#[..],
            br#"{"third_party":["os; import x"],"stdlib":[]}"#,
            br#"{"third_party":["a..b"],"stdlib":[]}"#,
            br#"{"third_party":[".a"],"stdlib":[]}"#,
            br#"{"third_party":["1abc"],"stdlib":[]}"#,
            br#"{"third_party":[""],"stdlib":[]}"#,
            "{\"third_party\":[\"caf\u{e9}\"],\"stdlib\":[]}".as_bytes(),
        ] {
            assert!(
                matches!(parse_report(bad), Err(ReportError::BadName(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            parse_report(b"not json"),
            Err(ReportError::Malformed(_))
        ));
        assert!(matches!(
            parse_report(br#"{"third_party":[]}"#),
            Err(ReportError::Malformed(_))
        ));
        assert!(matches!(
            parse_report(br#"{"third_party":[],"stdlib":[],"extra":1}"#),
            Err(ReportError::Malformed(_))
        ));
        assert!(matches!(
            parse_report(br#"{"third_party":[1],"stdlib":[]}"#),
            Err(ReportError::Malformed(_))
        ));
        let long = format!(
            r#"{{"third_party":["{}"],"stdlib":[]}}"#,
            "a".repeat(MAX_NAME_LEN + 1)
        );
        assert!(matches!(
            parse_report(long.as_bytes()),
            Err(ReportError::BadName(_))
        ));
        let many: Vec<String> = (0..MAX_REPORT_MODULES + 1)
            .map(|i| format!("m{i}"))
            .collect();
        let body = serde_json::json!({"third_party": many, "stdlib": []}).to_string();
        assert!(matches!(
            parse_report(body.as_bytes()),
            Err(ReportError::TooMany(_))
        ));
        let huge = vec![b' '; MAX_REPORT_BYTES + 1];
        assert!(matches!(parse_report(&huge), Err(ReportError::TooLarge(_))));
    }

    #[test]
    fn the_state_file_round_trips_and_a_corrupt_one_is_an_error() {
        let dir =
            std::env::temp_dir().join(format!("roost-frameworks-unit-{}", std::process::id()));
        let packages_dir = dir.join("dist-packages");
        fs::create_dir_all(&packages_dir).unwrap();
        let file = StateFile::new(&dir);
        assert_eq!(file.load().unwrap(), vec![]);
        let stored = StoredSet {
            set: FrameworkSet {
                interpreter: py(),
                packages: ["flask".to_string()].into(),
                modules: vec!["flask".into(), "json".into()],
            },
            fingerprint: Fingerprint::of(
                Path::new("/usr/bin/python3"),
                std::slice::from_ref(&packages_dir),
            ),
        };
        file.save(std::slice::from_ref(&stored)).unwrap();
        assert_eq!(file.load().unwrap(), vec![stored.clone()]);
        assert_eq!(stored.fingerprint.current(), stored.fingerprint);
        // A package installed into a directory changes its mtime, so the fingerprint.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(packages_dir.join("new_package.py"), "").unwrap();
        assert_ne!(stored.fingerprint.current(), stored.fingerprint);
        let site = SiteUse {
            interpreter: py(),
            packages: ["django".to_string(), "asgiref".to_string()].into(),
        };
        site.save(&dir).unwrap();
        assert_eq!(SiteUse::load(&dir), Some(site));
        fs::write(
            dir.join("framework"),
            br#"{"interpreter":"/x","packages":["a b"]}"#,
        )
        .unwrap();
        assert_eq!(
            SiteUse::load(&dir),
            None,
            "a bad name makes the file invalid"
        );
        fs::write(file.path(), b"{\"version\":1,\"sets\":[{").unwrap();
        assert!(file
            .load()
            .unwrap_err()
            .contains("not a framework state file"));
        fs::write(file.path(), br#"{"version":1,"sets":[{"set":{"interpreter":"/x","packages":["a"],"modules":["os; rm"]},"fingerprint":{"files":[]}}]}"#).unwrap();
        assert!(file.load().unwrap_err().contains("not a module name"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
