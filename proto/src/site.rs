//! `SiteSpec`: what an operator registers under `<prefix>/sites/<host>`.
//!
//! Decoding is strict: an unknown field is an error (a typo such as `idle_timout` must not
//! silently fall back to a default), and every error names the field it is about, so the
//! log line for a bad record written with `etcdctl` tells the operator what to fix.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::env_vars::EnvVars;
use crate::host::canonical_host;
use crate::node::valid_node_id;

/// The Python interpreter a site gets when it names none. Root's `PATH` on our hosts starts
/// with a pyenv Python that site users cannot read, so never rely on `PATH` for this.
pub const DEFAULT_PYTHON: &str = "/usr/bin/python3";

/// One hosted site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    /// The unix user the worker runs as; never root.
    pub user: String,
    /// A WSGI application as `module:callable`. Exactly one of `app` and `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// Any program that serves HTTP on the socket passed with `LISTEN_FDS` (argv).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The site's directory: the worker's working directory, and on the Python path.
    pub dir: String,
    /// The interpreter for `app` sites; defaults to [`DEFAULT_PYTHON`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    /// A virtualenv whose interpreter and packages the site uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtualenv: Option<String>,
    /// More host names that serve this site.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Pin the site to this node while the node is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Worker processes.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// Threads per worker process.
    #[serde(default = "default_threads")]
    pub threads: u32,
    /// Seconds with no request in flight after which the worker is stopped.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: u64,
    /// Seconds a single request may run.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: u64,
    /// Memory limit of the site's worker processes, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mb: Option<u64>,
    /// CPU the site's processes may use together, in cores (0.5: half of one core), over
    /// the node's default. A cap, not a reservation: sites share spare CPU by weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<Cores>,
    /// Block I/O weight against the node's other sites, cgroup v2's scale: 1..=10000, 100
    /// for a site that names none (over the node's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_weight: Option<u32>,
    /// Requests the site may have in flight on a node at once (CloudLinux's "entry
    /// processes"); past it the agent answers 503 with `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Environment of the worker (on top of a small clean base).
    #[serde(default, skip_serializing_if = "EnvVars::is_empty")]
    pub env: EnvVars,
    /// How the worker of an `app` site starts: forked from the interpreter's preloaded
    /// zygote (the default), or `direct` (a fresh gunicorn). `command` sites always start
    /// directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<SpawnMode>,
}

/// A share of CPU time in cores. Validated finite and positive, so it compares as `Eq`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cores(pub f64);

impl Eq for Cores {}

/// The smallest CPU cap: the kernel's minimum quota (1 ms) in its default 100 ms period.
pub const MIN_CPU_LIMIT: f64 = 0.01;
/// The largest: more cores than any node of ours has.
pub const MAX_CPU_LIMIT: f64 = 1024.0;
/// cgroup v2's weight range (`cpu.weight`, `io.weight`); 100 is the default.
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_CONCURRENT_REQUESTS: u32 = 100_000;

/// How an `app` site's worker is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpawnMode {
    /// Forked from the preloaded zygote of the site's interpreter: milliseconds.
    Zygote,
    /// A fresh interpreter running gunicorn: the opt-out.
    Direct,
}

fn default_workers() -> u32 {
    1
}
fn default_threads() -> u32 {
    4
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_request_timeout() -> u64 {
    60
}

/// A field of a site record that is missing, malformed or out of range.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("field `{field}`: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

impl SpecError {
    fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Environment variables that Roost sets itself and a site may not override.
const RESERVED_ENV: &[&str] = &["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

impl SiteSpec {
    /// A minimal `app` site with every default.
    pub fn new_app(user: &str, app: &str, dir: &str) -> Self {
        Self {
            user: user.to_string(),
            app: Some(app.to_string()),
            command: None,
            dir: dir.to_string(),
            python: None,
            virtualenv: None,
            aliases: Vec::new(),
            node: None,
            workers: default_workers(),
            threads: default_threads(),
            idle_timeout: default_idle_timeout(),
            request_timeout: default_request_timeout(),
            memory_limit_mb: None,
            cpu_limit: None,
            io_weight: None,
            max_concurrent_requests: None,
            env: EnvVars::new(),
            spawn: None,
        }
    }

    /// Decode and validate a record as stored in etcd.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        let mut spec: SiteSpec = decode_object(bytes)?;
        spec.validate()?;
        // serde grows a list as it reads (one alias leaves room for four); an informer holds
        // 100,000 of these for as long as it runs, so keep none of the slack.
        spec.aliases.shrink_to_fit();
        if let Some(argv) = &mut spec.command {
            argv.shrink_to_fit();
        }
        Ok(spec)
    }

    /// Serialise for storage in etcd (compact JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("SiteSpec always serialises")
    }

    /// The interpreter this site's `app` runs under.
    pub fn interpreter(&self) -> String {
        if let Some(py) = &self.python {
            return py.clone();
        }
        if let Some(venv) = &self.virtualenv {
            return format!("{}/bin/python", venv.trim_end_matches('/'));
        }
        DEFAULT_PYTHON.to_string()
    }

    /// Whether this site's worker is forked from a zygote (an `app` site that did not opt out).
    pub fn uses_zygote(&self) -> bool {
        self.app.is_some() && self.command.is_none() && self.spawn != Some(SpawnMode::Direct)
    }

    /// Check every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_user_name(&self.user) {
            return Err(SpecError::new(
                "user",
                format!("{:?} is not a valid unix user name", self.user),
            ));
        }
        if self.user == "root" {
            return Err(SpecError::new("user", "sites never run as root"));
        }
        match (&self.app, &self.command) {
            (Some(_), Some(_)) => {
                return Err(SpecError::new(
                    "command",
                    "give either `app` or `command`, not both",
                ))
            }
            (None, None) => return Err(SpecError::new("app", "give either `app` or `command`")),
            (Some(app), None) => {
                if !valid_app(app) {
                    return Err(SpecError::new(
                        "app",
                        format!("{app:?} is not `module:callable` (e.g. `app:application`)"),
                    ));
                }
            }
            (None, Some(cmd)) => {
                if cmd.is_empty() || cmd[0].is_empty() {
                    return Err(SpecError::new("command", "must name a program"));
                }
                if cmd.iter().any(|a| a.contains('\0')) {
                    return Err(SpecError::new("command", "contains a NUL byte"));
                }
                if self.spawn == Some(SpawnMode::Zygote) {
                    return Err(SpecError::new(
                        "spawn",
                        "`command` sites are always started directly; only `app` sites can use the zygote",
                    ));
                }
            }
        }
        check_abs_path("dir", &self.dir)?;
        if let Some(py) = &self.python {
            check_abs_path("python", py)?;
        }
        if let Some(venv) = &self.virtualenv {
            check_abs_path("virtualenv", venv)?;
        }
        for (i, alias) in self.aliases.iter().enumerate() {
            let field = format!("aliases[{i}]");
            if self.aliases[..i].contains(alias) {
                return Err(SpecError::new(&field, format!("{alias:?} is listed twice")));
            }
            let bare = alias.strip_prefix("*.").unwrap_or(alias);
            match canonical_host(bare) {
                Ok(c) if c == bare => {}
                Ok(c) => {
                    return Err(SpecError::new(
                        &field,
                        format!("{alias:?} is not canonical; write {c:?}"),
                    ))
                }
                Err(e) => return Err(SpecError::new(&field, e.to_string())),
            }
        }
        if let Some(node) = &self.node {
            if !valid_node_id(node) {
                return Err(SpecError::new(
                    "node",
                    format!("{node:?} is not a valid node id"),
                ));
            }
        }
        check_range("workers", self.workers as u64, 1, 64)?;
        check_range("threads", self.threads as u64, 1, 256)?;
        check_range("idle_timeout", self.idle_timeout, 1, 7 * 86400)?;
        check_range("request_timeout", self.request_timeout, 1, 86400)?;
        if let Some(mb) = self.memory_limit_mb {
            check_range("memory_limit_mb", mb, 16, 1 << 20)?;
        }
        if let Some(Cores(cores)) = self.cpu_limit {
            check_cpu_limit(cores).map_err(|reason| SpecError::new("cpu_limit", reason))?;
        }
        if let Some(w) = self.io_weight {
            check_range("io_weight", w as u64, 1, MAX_WEIGHT as u64)?;
        }
        if let Some(n) = self.max_concurrent_requests {
            check_range(
                "max_concurrent_requests",
                n as u64,
                1,
                MAX_CONCURRENT_REQUESTS as u64,
            )?;
        }
        for (k, v) in &self.env {
            let field = format!("env.{k}");
            if !valid_env_name(k) {
                return Err(SpecError::new(
                    &field,
                    "is not a valid environment variable name",
                ));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(SpecError::new(
                    &field,
                    "is set by Roost and cannot be overridden",
                ));
            }
            if v.contains('\0') {
                return Err(SpecError::new(&field, "contains a NUL byte"));
            }
        }
        Ok(())
    }
}

/// Decode a JSON object into a record type, naming the offending field on error.
pub(crate) fn decode_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SpecError> {
    // serde would also accept a JSON array for a struct; a record is always an object.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(SpecError::new("(record)", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        // serde reports unknown and missing fields at the parent; lift the name out.
        let field = extract_backticked(&msg)
            .filter(|_| path == "." || path.is_empty())
            .unwrap_or(if path == "." {
                "(record)".to_string()
            } else {
                path
            });
        SpecError::new(&field, strip_position(&msg))
    })
}

fn check_range(field: &str, v: u64, min: u64, max: u64) -> Result<(), SpecError> {
    if v < min || v > max {
        return Err(SpecError::new(
            field,
            format!("{v} is outside {min}..={max}"),
        ));
    }
    Ok(())
}

/// A CPU cap in cores, as a site or an agent's default gives it; the error is the reason.
pub fn check_cpu_limit(cores: f64) -> Result<(), String> {
    if !(MIN_CPU_LIMIT..=MAX_CPU_LIMIT).contains(&cores) {
        return Err(format!(
            "{cores} is outside {MIN_CPU_LIMIT}..={MAX_CPU_LIMIT} cores"
        ));
    }
    Ok(())
}

fn check_abs_path(field: &str, p: &str) -> Result<(), SpecError> {
    if !p.starts_with('/') {
        return Err(SpecError::new(
            field,
            format!("{p:?} is not an absolute path"),
        ));
    }
    if p.contains('\0') || p.split('/').any(|c| c == "..") {
        return Err(SpecError::new(
            field,
            format!("{p:?} may not contain `..` or NUL"),
        ));
    }
    Ok(())
}

/// POSIX-portable user names, as `useradd` accepts them by default.
pub fn valid_user_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && s.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `package.module:callable`, both sides dotted Python identifiers.
fn valid_app(s: &str) -> bool {
    match s.split_once(':') {
        Some((module, callable)) => {
            module.split('.').all(valid_identifier) && callable.split('.').all(valid_identifier)
        }
        None => false,
    }
}

fn valid_env_name(s: &str) -> bool {
    valid_identifier(s)
}

fn extract_backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let len = msg[start..].find('`')?;
    Some(msg[start..start + len].to_string())
}

/// serde_json appends " at line 1 column 42"; the field name says more to an operator.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> SpecError {
        SiteSpec::from_json(json.as_bytes()).unwrap_err()
    }

    const OK: &str = r#"{"user":"alice","app":"app:application","dir":"/srv/alice"}"#;

    #[test]
    fn a_minimal_record_decodes_with_defaults() {
        let s = SiteSpec::from_json(OK.as_bytes()).unwrap();
        assert_eq!(s.user, "alice");
        assert_eq!(s.workers, 1);
        assert_eq!(s.threads, 4);
        assert_eq!(s.idle_timeout, 300);
        assert_eq!(s.interpreter(), DEFAULT_PYTHON);
        assert_eq!(SiteSpec::from_json(s.to_json().as_bytes()).unwrap(), s);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err(r#"{"app":"a:b","dir":"/x"}"#).field, "user");
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","idle_timout":5}"#).field,
            "idle_timout"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","idle_timeout":"5"}"#).field,
            "idle_timeout"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","idle_timeout":0}"#).field,
            "idle_timeout"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"nocolon","dir":"/x"}"#).field,
            "app"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"rel/dir"}"#).field,
            "dir"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x/../etc"}"#).field,
            "dir"
        );
        assert_eq!(
            err(r#"{"user":"root","app":"a:b","dir":"/x"}"#).field,
            "user"
        );
        assert_eq!(
            err(r#"{"user":"Bad User","app":"a:b","dir":"/x"}"#).field,
            "user"
        );
        assert_eq!(err(r#"{"user":"alice","dir":"/x"}"#).field, "app");
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","command":["x"],"dir":"/x"}"#).field,
            "command"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","aliases":["Www.X.com"]}"#).field,
            "aliases[0]"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","aliases":["w.x","w.x"]}"#).field,
            "aliases[1]"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","env":{"LISTEN_FDS":"9"}}"#).field,
            "env.LISTEN_FDS"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","workers":1000}"#).field,
            "workers"
        );
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","node":"No Such"}"#).field,
            "node"
        );
        assert_eq!(err(r#"not json"#).field, "(record)");
        assert_eq!(err(r#"[1,2]"#).field, "(record)");
    }

    #[test]
    fn cpu_io_and_concurrency_limits_decode_and_are_checked() {
        let s = SiteSpec::from_json(
            br#"{"user":"alice","app":"a:b","dir":"/x","cpu_limit":0.5,"io_weight":50,"max_concurrent_requests":8}"#,
        )
        .unwrap();
        assert_eq!(s.cpu_limit, Some(Cores(0.5)));
        assert_eq!(s.io_weight, Some(50));
        assert_eq!(s.max_concurrent_requests, Some(8));
        assert_eq!(SiteSpec::from_json(s.to_json().as_bytes()).unwrap(), s);
        // Whole cores are written as integers by operators.
        let two = SiteSpec::from_json(br#"{"user":"alice","app":"a:b","dir":"/x","cpu_limit":2}"#)
            .unwrap();
        assert_eq!(two.cpu_limit, Some(Cores(2.0)));
        let bad = |extra: &str| {
            err(&format!(
                r#"{{"user":"alice","app":"a:b","dir":"/x",{extra}}}"#
            ))
        };
        let e = bad(r#""cpu_limit":0"#);
        assert_eq!(e.field, "cpu_limit");
        assert_eq!(e.reason, "0 is outside 0.01..=1024 cores");
        assert_eq!(bad(r#""cpu_limit":-1"#).field, "cpu_limit");
        assert_eq!(bad(r#""cpu_limit":5000"#).field, "cpu_limit");
        assert_eq!(bad(r#""cpu_limit":"half""#).field, "cpu_limit");
        assert_eq!(bad(r#""io_weight":0"#).field, "io_weight");
        assert_eq!(bad(r#""io_weight":10001"#).field, "io_weight");
        assert_eq!(
            bad(r#""max_concurrent_requests":0"#).field,
            "max_concurrent_requests"
        );
        assert_eq!(
            bad(r#""max_concurrent_requests":-3"#).field,
            "max_concurrent_requests"
        );
    }

    #[test]
    fn wildcard_aliases_are_accepted() {
        let s = SiteSpec::from_json(
            br#"{"user":"alice","app":"a:b","dir":"/x","aliases":["*.alice.example","www.alice.example"]}"#,
        )
        .unwrap();
        assert_eq!(s.aliases.len(), 2);
    }

    #[test]
    fn spawn_mode_defaults_to_the_zygote_and_app_sites_may_opt_out() {
        let s = SiteSpec::from_json(OK.as_bytes()).unwrap();
        assert_eq!(s.spawn, None);
        assert!(s.uses_zygote());
        assert!(!s.to_json().contains("spawn"));
        let direct =
            SiteSpec::from_json(br#"{"user":"alice","app":"a:b","dir":"/x","spawn":"direct"}"#)
                .unwrap();
        assert_eq!(direct.spawn, Some(SpawnMode::Direct));
        assert!(!direct.uses_zygote());
        assert_eq!(
            SiteSpec::from_json(direct.to_json().as_bytes()).unwrap(),
            direct
        );
        let zygote =
            SiteSpec::from_json(br#"{"user":"alice","app":"a:b","dir":"/x","spawn":"zygote"}"#)
                .unwrap();
        assert!(zygote.uses_zygote());
        let cmd = SiteSpec::from_json(br#"{"user":"alice","command":["srv"],"dir":"/x"}"#).unwrap();
        assert!(!cmd.uses_zygote());
        assert_eq!(
            err(r#"{"user":"alice","app":"a:b","dir":"/x","spawn":"fork"}"#).field,
            "spawn"
        );
        assert_eq!(
            err(r#"{"user":"alice","command":["srv"],"dir":"/x","spawn":"zygote"}"#).field,
            "spawn"
        );
        assert!(SiteSpec::from_json(
            br#"{"user":"alice","command":["srv"],"dir":"/x","spawn":"direct"}"#
        )
        .is_ok());
    }

    #[test]
    fn virtualenv_chooses_the_interpreter() {
        let mut s = SiteSpec::new_app("alice", "a:b", "/x");
        s.virtualenv = Some("/srv/venv/".into());
        assert_eq!(s.interpreter(), "/srv/venv/bin/python");
        s.python = Some("/opt/py/bin/python3".into());
        assert_eq!(s.interpreter(), "/opt/py/bin/python3");
    }
}
