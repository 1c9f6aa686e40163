//! From command-line flags to a `SiteSpec`, and back to words for people.
//!
//! Pure functions only (no etcd), so `site add` and `site set` share one way of applying
//! flags and it can be unit-tested. Defaults come from `SiteSpec::new_app` and checking
//! from `SiteSpec::validate`: this module never restates either.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::Args;
use roost_proto::site::Cores;
use roost_proto::{canonical_host, SiteSpec};

/// What a site runs: a WSGI app or a plain command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Program {
    App(String),
    Command(Vec<String>),
}

/// `--command "prog args..."` split into argv (a newtype so clap takes it as one value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Argv(pub Vec<String>);

/// Optional settings shared by `site add` and `site set`.
#[derive(Args, Clone, Debug, Default)]
pub struct SiteFlags {
    /// Stop the worker after this many seconds with no request in flight.
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Longest a single request may run.
    #[arg(long, value_name = "SECS")]
    pub request_timeout: Option<u64>,
    /// Worker processes.
    #[arg(long, value_name = "N")]
    pub workers: Option<u32>,
    /// Threads per worker process.
    #[arg(long, value_name = "N")]
    pub threads: Option<u32>,
    /// Memory limit of the site's processes, in MiB.
    #[arg(long, value_name = "N")]
    pub memory_limit_mb: Option<u64>,
    /// CPU the site may use, in cores (0.5 = half a core).
    #[arg(long, value_name = "CORES")]
    pub cpu_limit: Option<f64>,
    /// Block I/O weight against other sites, 1..=10000 (100 is the default).
    #[arg(long, value_name = "N")]
    pub io_weight: Option<u32>,
    /// Requests in flight at once on a node; more get 503 with Retry-After.
    #[arg(long, value_name = "N")]
    pub max_concurrent_requests: Option<u32>,
    /// Python interpreter for an --app site (default: the system python3).
    #[arg(long, value_name = "PATH")]
    pub python: Option<String>,
    /// Virtualenv whose interpreter and packages the site uses.
    #[arg(long, value_name = "PATH")]
    pub virtualenv: Option<String>,
    /// Another host name for this site (repeatable; `*.example.com` for a wildcard).
    #[arg(long = "alias", value_name = "NAME")]
    pub aliases: Vec<String>,
    /// Pin the site to this node while the node is live.
    #[arg(long, value_name = "ID")]
    pub node: Option<String>,
    /// Set an environment variable of the worker (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
}

/// A change to an existing record (`site set`); `None`/empty fields stay as they are.
#[derive(Clone, Debug, Default)]
pub struct SitePatch {
    pub user: Option<String>,
    pub program: Option<Program>,
    pub dir: Option<String>,
    pub flags: SiteFlags,
    pub clear_node: bool,
    pub clear_memory_limit: bool,
    pub clear_cpu_limit: bool,
    pub clear_io_weight: bool,
    pub clear_max_concurrent_requests: bool,
    pub clear_python: bool,
    pub clear_virtualenv: bool,
    pub remove_aliases: Vec<String>,
    pub unset_env: Vec<String>,
}

impl SitePatch {
    /// True when the patch would change nothing whatever the record holds.
    pub fn is_empty(&self) -> bool {
        let f = &self.flags;
        self.user.is_none()
            && self.program.is_none()
            && self.dir.is_none()
            && f.idle_timeout.is_none()
            && f.request_timeout.is_none()
            && f.workers.is_none()
            && f.threads.is_none()
            && f.memory_limit_mb.is_none()
            && f.cpu_limit.is_none()
            && f.io_weight.is_none()
            && f.max_concurrent_requests.is_none()
            && f.python.is_none()
            && f.virtualenv.is_none()
            && f.aliases.is_empty()
            && f.node.is_none()
            && f.env.is_empty()
            && !self.clear_node
            && !self.clear_memory_limit
            && !self.clear_cpu_limit
            && !self.clear_io_weight
            && !self.clear_max_concurrent_requests
            && !self.clear_python
            && !self.clear_virtualenv
            && self.remove_aliases.is_empty()
            && self.unset_env.is_empty()
    }

    /// Apply to `spec`. Removals run before additions, so `--unset-env A --env A=1` sets A.
    pub fn apply(&self, spec: &mut SiteSpec) -> anyhow::Result<()> {
        if let Some(user) = &self.user {
            spec.user = user.clone();
        }
        if let Some(program) = &self.program {
            set_program(spec, program.clone());
        }
        if let Some(dir) = &self.dir {
            spec.dir = dir.clone();
        }
        if self.clear_node {
            spec.node = None;
        }
        if self.clear_memory_limit {
            spec.memory_limit_mb = None;
        }
        if self.clear_cpu_limit {
            spec.cpu_limit = None;
        }
        if self.clear_io_weight {
            spec.io_weight = None;
        }
        if self.clear_max_concurrent_requests {
            spec.max_concurrent_requests = None;
        }
        if self.clear_python {
            spec.python = None;
        }
        if self.clear_virtualenv {
            spec.virtualenv = None;
        }
        for alias in &self.remove_aliases {
            let alias = canonical_alias(alias)?;
            spec.aliases.retain(|a| *a != alias);
        }
        for key in &self.unset_env {
            spec.env.remove(key);
        }
        apply_flags(spec, &self.flags)
    }
}

/// A new record from `site add`'s flags (not yet validated).
pub fn build(
    user: &str,
    program: Program,
    dir: &str,
    flags: &SiteFlags,
) -> anyhow::Result<SiteSpec> {
    let mut spec = SiteSpec::new_app(user, "", dir);
    set_program(&mut spec, program);
    apply_flags(&mut spec, flags)?;
    Ok(spec)
}

fn set_program(spec: &mut SiteSpec, program: Program) {
    match program {
        Program::App(app) => {
            spec.app = Some(app);
            spec.command = None;
        }
        Program::Command(argv) => {
            spec.app = None;
            spec.command = Some(argv);
        }
    }
}

fn apply_flags(spec: &mut SiteSpec, f: &SiteFlags) -> anyhow::Result<()> {
    if let Some(v) = f.idle_timeout {
        spec.idle_timeout = v;
    }
    if let Some(v) = f.request_timeout {
        spec.request_timeout = v;
    }
    if let Some(v) = f.workers {
        spec.workers = v;
    }
    if let Some(v) = f.threads {
        spec.threads = v;
    }
    if let Some(v) = f.memory_limit_mb {
        spec.memory_limit_mb = Some(v);
    }
    if let Some(v) = f.cpu_limit {
        spec.cpu_limit = Some(Cores(v));
    }
    if let Some(v) = f.io_weight {
        spec.io_weight = Some(v);
    }
    if let Some(v) = f.max_concurrent_requests {
        spec.max_concurrent_requests = Some(v);
    }
    if let Some(v) = &f.python {
        spec.python = Some(v.clone());
    }
    if let Some(v) = &f.virtualenv {
        spec.virtualenv = Some(v.clone());
    }
    if let Some(v) = &f.node {
        spec.node = Some(v.clone());
    }
    for alias in &f.aliases {
        let alias = canonical_alias(alias)?;
        if !spec.aliases.contains(&alias) {
            spec.aliases.push(alias);
        }
    }
    for (k, v) in &f.env {
        spec.env.insert(k.clone(), v.clone());
    }
    Ok(())
}

/// An alias in the spelling `validate` requires: canonical host, `*.` kept for wildcards.
pub fn canonical_alias(raw: &str) -> anyhow::Result<String> {
    let (wildcard, bare) = match raw.trim().strip_prefix("*.") {
        Some(bare) => (true, bare),
        None => (false, raw),
    };
    let host = canonical_host(bare).with_context(|| format!("invalid alias {raw:?}"))?;
    Ok(if wildcard { format!("*.{host}") } else { host })
}

/// `--env K=V`: the first `=` splits, so values may contain `=`; `K=` sets an empty value.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("{s:?} has no variable name; write K=V")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!("{s:?} is not K=V")),
    }
}

/// `--command`: split like a POSIX shell does words (spaces, '…', "…", backslash), with no
/// expansion of any kind, so what the operator quoted is what the program gets.
pub fn parse_command(s: &str) -> Result<Argv, String> {
    let words = shlex::split(s)
        .ok_or("an unterminated quote or a trailing backslash; quote as a POSIX shell does")?;
    if words.is_empty() {
        return Err("needs a program, e.g. --command \"/usr/bin/myserver --flag\"".into());
    }
    Ok(Argv(words))
}

/// argv as one line that [`parse_command`] reads back to the same words.
pub fn command_line(argv: &[String]) -> String {
    // Only a NUL byte can't be quoted (and no argv that exec takes holds one): shown as a list.
    shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_else(|_| format!("{argv:?}"))
}

/// What a site runs, for a table cell.
pub fn program_summary(spec: &SiteSpec) -> String {
    match (&spec.app, &spec.command) {
        (Some(app), _) => app.clone(),
        (None, Some(argv)) => command_line(argv),
        (None, None) => "-".into(),
    }
}

/// The fields that differ between two records, as `field: old → new` (for `site set`).
pub fn changes(old: &SiteSpec, new: &SiteSpec) -> Vec<String> {
    let as_map = |s: &SiteSpec| match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(m)) => m.into_iter().collect::<BTreeMap<_, _>>(),
        _ => BTreeMap::new(),
    };
    let (old, new) = (as_map(old), as_map(new));
    let mut fields: Vec<&String> = old.keys().chain(new.keys()).collect();
    fields.sort();
    fields.dedup();
    let show = |v: Option<&serde_json::Value>| match v {
        None => "(unset)".to_string(),
        Some(v) => v.to_string(),
    };
    fields
        .into_iter()
        .filter(|f| old.get(*f) != new.get(*f))
        .map(|f| format!("{f}: {} → {}", show(old.get(f)), show(new.get(f))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> SiteFlags {
        SiteFlags::default()
    }

    #[test]
    fn env_flags_split_at_the_first_equals() {
        assert_eq!(parse_env("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_env("URL=a=b"), Ok(("URL".into(), "a=b".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), "".into())));
        assert!(parse_env("NOVALUE").is_err());
        assert!(parse_env("=1").is_err());
    }

    #[test]
    fn commands_split_like_a_shell_without_expansion() {
        let argv = |s: &str| parse_command(s).map(|a| a.0);
        assert_eq!(
            argv("/bin/srv --port 1").unwrap(),
            ["/bin/srv", "--port", "1"]
        );
        assert_eq!(argv("  a   b  ").unwrap(), ["a", "b"]);
        assert_eq!(
            argv(r#"a 'b c' "d \"e\" $HOME" f\ g"#).unwrap(),
            ["a", "b c", r#"d "e" $HOME"#, "f g"]
        );
        assert_eq!(argv("a '' b").unwrap(), ["a", "", "b"]);
        assert!(argv("a 'b").is_err());
        assert!(argv("a \"b").is_err());
        assert!(argv("a\\").is_err());
        assert!(argv("   ").is_err());
    }

    #[test]
    fn command_lines_read_back_to_the_same_words() {
        for words in [
            vec!["/usr/bin/srv", "--bind", "fd://3"],
            vec!["sh", "-c", "echo 'hi' \"there\" $X"],
            vec!["a", "", "b c"],
        ] {
            let words: Vec<String> = words.into_iter().map(String::from).collect();
            assert_eq!(parse_command(&command_line(&words)).unwrap().0, words);
        }
        assert_eq!(
            command_line(&["/bin/srv".into(), "a b".into()]),
            "/bin/srv 'a b'"
        );
    }

    #[test]
    fn add_builds_a_valid_app_site_with_proto_defaults() {
        let s = build(
            "alice",
            Program::App("app:application".into()),
            "/srv/alice",
            &flags(),
        )
        .unwrap();
        assert_eq!(
            s,
            SiteSpec::new_app("alice", "app:application", "/srv/alice")
        );
        s.validate().unwrap();
    }

    #[test]
    fn add_applies_every_flag() {
        let f = SiteFlags {
            idle_timeout: Some(30),
            request_timeout: Some(10),
            workers: Some(2),
            threads: Some(8),
            memory_limit_mb: Some(256),
            cpu_limit: Some(0.5),
            io_weight: Some(200),
            max_concurrent_requests: Some(20),
            python: Some("/opt/py/bin/python3".into()),
            virtualenv: Some("/srv/venv".into()),
            aliases: vec![
                "WWW.Example.COM.".into(),
                "*.Example.com".into(),
                "www.example.com".into(),
            ],
            node: Some("n1".into()),
            env: vec![
                ("A".into(), "1".into()),
                ("A".into(), "2".into()),
                ("B".into(), "x=y".into()),
            ],
        };
        let s = build(
            "bob",
            Program::Command(vec!["/bin/srv".into(), "-v".into()]),
            "/srv/bob",
            &f,
        )
        .unwrap();
        assert_eq!(s.app, None);
        assert_eq!(
            s.command,
            Some(vec!["/bin/srv".to_string(), "-v".to_string()])
        );
        assert_eq!(
            (s.idle_timeout, s.request_timeout, s.workers, s.threads),
            (30, 10, 2, 8)
        );
        assert_eq!(s.memory_limit_mb, Some(256));
        assert_eq!(s.cpu_limit, Some(Cores(0.5)));
        assert_eq!(s.io_weight, Some(200));
        assert_eq!(s.max_concurrent_requests, Some(20));
        assert_eq!(s.python.as_deref(), Some("/opt/py/bin/python3"));
        assert_eq!(s.virtualenv.as_deref(), Some("/srv/venv"));
        assert_eq!(s.aliases, ["www.example.com", "*.example.com"]);
        assert_eq!(s.node.as_deref(), Some("n1"));
        assert_eq!(s.env.get("A").map(String::as_str), Some("2"));
        assert_eq!(s.env.get("B").map(String::as_str), Some("x=y"));
        s.validate().unwrap();
    }

    #[test]
    fn bad_aliases_are_refused_before_validation() {
        let f = SiteFlags {
            aliases: vec!["not a host".into()],
            ..flags()
        };
        let e = build("a", Program::App("a:b".into()), "/x", &f).unwrap_err();
        assert!(
            format!("{e:#}").contains("invalid alias \"not a host\""),
            "{e:#}"
        );
    }

    #[test]
    fn building_does_not_validate_so_the_caller_reports_the_field() {
        let f = SiteFlags {
            workers: Some(0),
            ..flags()
        };
        let s = build("alice", Program::App("a:b".into()), "/x", &f).unwrap();
        assert_eq!(s.validate().unwrap_err().field, "workers");
    }

    #[test]
    fn limits_are_set_and_cleared_and_bad_ones_name_their_field() {
        let mut s = SiteSpec::new_app("alice", "a:b", "/x");
        let set = SitePatch {
            flags: SiteFlags {
                cpu_limit: Some(1.5),
                io_weight: Some(50),
                max_concurrent_requests: Some(4),
                ..flags()
            },
            ..SitePatch::default()
        };
        assert!(!set.is_empty());
        set.apply(&mut s).unwrap();
        assert_eq!(
            (s.cpu_limit, s.io_weight, s.max_concurrent_requests),
            (Some(Cores(1.5)), Some(50), Some(4))
        );
        let clear = SitePatch {
            clear_cpu_limit: true,
            clear_io_weight: true,
            clear_max_concurrent_requests: true,
            ..SitePatch::default()
        };
        assert!(!clear.is_empty());
        clear.apply(&mut s).unwrap();
        assert_eq!(s, SiteSpec::new_app("alice", "a:b", "/x"));
        let f = SiteFlags {
            cpu_limit: Some(0.001),
            ..flags()
        };
        let s = build("alice", Program::App("a:b".into()), "/x", &f).unwrap();
        assert_eq!(s.validate().unwrap_err().field, "cpu_limit");
    }

    #[test]
    fn set_changes_only_what_is_given() {
        let mut s = SiteSpec::new_app("alice", "a:b", "/x");
        s.node = Some("n1".into());
        s.memory_limit_mb = Some(64);
        s.aliases = vec!["www.a.example".into(), "old.a.example".into()];
        s.env.insert("KEEP".into(), "1".into());
        s.env.insert("DROP".into(), "1".into());
        let before = s.clone();
        let p = SitePatch {
            program: Some(Program::Command(vec!["/bin/srv".into()])),
            flags: SiteFlags {
                idle_timeout: Some(60),
                aliases: vec!["New.A.Example".into()],
                env: vec![("NEW".into(), "2".into())],
                ..flags()
            },
            clear_node: true,
            clear_memory_limit: true,
            remove_aliases: vec!["OLD.a.example".into()],
            unset_env: vec!["DROP".into()],
            ..SitePatch::default()
        };
        assert!(!p.is_empty());
        p.apply(&mut s).unwrap();
        assert_eq!(
            (s.app.clone(), s.command.clone()),
            (None, Some(vec!["/bin/srv".to_string()]))
        );
        assert_eq!(s.idle_timeout, 60);
        assert_eq!(s.node, None);
        assert_eq!(s.memory_limit_mb, None);
        assert_eq!(s.aliases, ["www.a.example", "new.a.example"]);
        assert_eq!(s.env.keys().collect::<Vec<_>>(), ["KEEP", "NEW"]);
        assert_eq!(
            (s.user.as_str(), s.dir.as_str(), s.workers),
            (before.user.as_str(), "/x", before.workers)
        );
        assert_eq!(
            changes(&before, &s),
            [
                "aliases: [\"www.a.example\",\"old.a.example\"] → [\"www.a.example\",\"new.a.example\"]",
                "app: \"a:b\" → (unset)",
                "command: (unset) → [\"/bin/srv\"]",
                "env: {\"DROP\":\"1\",\"KEEP\":\"1\"} → {\"KEEP\":\"1\",\"NEW\":\"2\"}",
                "idle_timeout: 300 → 60",
                "memory_limit_mb: 64 → (unset)",
                "node: \"n1\" → (unset)",
            ]
        );
    }

    #[test]
    fn an_empty_patch_is_recognised_and_changes_nothing() {
        let p = SitePatch::default();
        assert!(p.is_empty());
        let mut s = SiteSpec::new_app("alice", "a:b", "/x");
        p.apply(&mut s).unwrap();
        assert_eq!(s, SiteSpec::new_app("alice", "a:b", "/x"));
        assert!(changes(&s, &s).is_empty());
    }

    #[test]
    fn program_summary_shows_app_or_command() {
        let mut s = SiteSpec::new_app("alice", "app:application", "/x");
        assert_eq!(program_summary(&s), "app:application");
        set_program(
            &mut s,
            Program::Command(vec!["/bin/srv".into(), "a b".into()]),
        );
        assert_eq!(program_summary(&s), "/bin/srv 'a b'");
    }
}
