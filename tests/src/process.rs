//! Child processes with their output in a log file, stopped on drop.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a process gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(10);

/// A running child whose stdout and stderr go to one log file.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawn `cmd` with stdout+stderr appended to `log`. If the test process dies without
    /// running destructors, the kernel sends the child `death_signal` (PR_SET_PDEATHSIG).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, death_signal: Signal) -> Proc {
        let out = open_log(log);
        let err = out.try_clone().expect("dup log fd");
        let sig = death_signal as libc::c_int;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            exited: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far, with ANSI colour codes removed.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Send SIGTERM (if still running) without waiting; [`Proc::stop`] waits.
    pub fn terminate(&mut self) {
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        }
    }

    /// SIGTERM, wait up to [`TERM_GRACE`], then SIGKILL. Returns how it ended; `None` when
    /// it had to be killed.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.exited() {
            return Some(s);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "[harness] {} (pid {}) ignored SIGTERM for {:?}; sending SIGKILL",
            self.name, pid, TERM_GRACE
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// A log file's text with ANSI escape sequences removed ("" if absent).
pub fn read_log(path: &Path) -> String {
    let raw = std::fs::read(path).unwrap_or_default();
    strip_ansi(&String::from_utf8_lossy(&raw))
}

/// Remove `ESC [ ... letter` sequences (tracing colours its fields on some setups).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.clone().next() == Some('[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// True while `/proc/<pid>` exists and the process is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match proc_state(pid) {
        Some(state) => state != 'Z' && state != 'X',
        None => false,
    }
}

/// True while `/proc/<pid>` exists at all (a zombie counts).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The one-letter state from `/proc/<pid>/stat` (R, S, Z, ...).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the state follows the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}
