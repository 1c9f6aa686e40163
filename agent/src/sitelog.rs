//! Each site's worker output: one file per site under `<state-dir>/logs/`, read back by
//! `roostctl site logs`.
//!
//! A worker never holds the file: its stdout and stderr are the write end of a pipe whose
//! read end a small thread of the agent drains into the file ([`pump`]). That thread is the
//! only writer (a site's workers share one [`SiteLog`]), so the size cap rotates by rename
//! (`<host>.log` → `<host>.log.1`) at a line boundary and no line is lost or split, unlike
//! copy-and-truncate, which drops what a worker writes between the copy and the truncate.
//! The pipe bounds what a worker can have in flight: a worker that writes faster than the
//! disk takes it waits, the agent's memory does not grow.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Stack of a pump thread: it only moves bytes.
const PUMP_STACK: usize = 64 * 1024;
const CHUNK: usize = 16 * 1024;
/// The longest unfinished line kept back before it is written anyway.
const MAX_PARTIAL: usize = 64 * 1024;

/// Where a site's worker output goes.
pub fn path(state_dir: &Path, host: &str) -> PathBuf {
    state_dir.join("logs").join(format!("{host}.log"))
}

/// The site's log file, capped in size by rotation.
pub struct SiteLog {
    path: PathBuf,
    file: File,
    len: u64,
    max_bytes: u64,
}

impl SiteLog {
    /// Open (append; root-owned, 0640) the log of `host`.
    pub fn open(state_dir: &Path, host: &str, max_bytes: u64) -> io::Result<Self> {
        let path = path(state_dir, host);
        let file = open_append(&path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path,
            file,
            len,
            max_bytes,
        })
    }

    /// The log of `host` in `file`, a log made ahead ([`create_ready`]) and renamed to
    /// `host`'s ([`claim_ready`]) by the caller: empty, and open already.
    pub fn ready_made(state_dir: &Path, host: &str, file: File, max_bytes: u64) -> Self {
        Self {
            path: path(state_dir, host),
            file,
            len: 0,
            max_bytes,
        }
    }

    /// Append whole lines. Past the cap, the lines that fit end the current file, which
    /// becomes `<log>.1`, and the rest start a new one. A single line longer than the cap
    /// is written whole.
    pub fn write(&mut self, mut lines: &[u8]) -> io::Result<()> {
        while !lines.is_empty() {
            let room = self.max_bytes.saturating_sub(self.len) as usize;
            if lines.len() <= room {
                self.file.write_all(lines)?;
                self.len += lines.len() as u64;
                return Ok(());
            }
            let fits = lines[..room]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let take = if fits > 0 {
                fits
            } else if self.len == 0 {
                // Nothing fits in an empty file: this line alone goes over the cap.
                lines
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(lines.len(), |i| i + 1)
            } else {
                0
            };
            self.file.write_all(&lines[..take])?;
            self.len += take as u64;
            lines = &lines[take..];
            if !lines.is_empty() {
                self.rotate()?;
            }
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut old = self.path.as_os_str().to_owned();
        old.push(".1");
        fs::rename(&self.path, &old)?;
        self.file = open_append(&self.path)?;
        self.len = 0;
        tracing::info!(log = %self.path.display(), "site log rotated");
        Ok(())
    }
}

/// `logs/` is root's alone (0750), so no tenant can place a symlink here; `O_NOFOLLOW`
/// keeps it that way should the directory's rights ever be loosened.
/// An empty log made ahead for no site yet (`launch/ready.rs`): `logs/<placeholder>.log`,
/// kept open, so the site it becomes does not open it again.
pub fn create_ready(state_dir: &Path, placeholder: &str) -> io::Result<File> {
    open_append(&path(state_dir, placeholder))
}

/// Make the log from [`create_ready`] the log of `host`; refuses, and changes nothing, when
/// `host` has a log already (a site that ran before keeps its own).
pub fn claim_ready(state_dir: &Path, placeholder: &str, host: &str) -> io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &path(state_dir, placeholder),
        nix::fcntl::AT_FDCWD,
        &path(state_dir, host),
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(io::Error::from)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// A pipe for one worker's stdout and stderr; returns the write end to give the worker, and
/// a receiver that completes once everything written has reached the log. A thread copies
/// what arrives into `log` until every holder of the write end is gone.
pub fn pump(
    host: &str,
    log: Arc<Mutex<SiteLog>>,
) -> io::Result<(File, tokio::sync::oneshot::Receiver<()>)> {
    Ok(ReadyPump::start()?.assign(host, log))
}

/// A pump whose thread and pipe exist before it knows its site (`launch/ready.rs` keeps a
/// few): a cold start then spawns no thread. The thread waits on its pipe, and learns where
/// the bytes go from `target` when the first arrive, which is after [`ReadyPump::assign`]
/// (only then does the write end leave the agent), so assigning wakes nothing.
pub struct ReadyPump {
    write: File,
    target: Arc<Mutex<Option<PumpTarget>>>,
}

struct PumpTarget {
    host: String,
    log: Arc<Mutex<SiteLog>>,
    drained: tokio::sync::oneshot::Sender<()>,
}

impl ReadyPump {
    /// The pipe and its thread, at normal priority whatever thread made it: a worker blocks
    /// once its pipe is full, and its output is not start work (launch/priority.rs).
    pub fn start() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let target = Arc::new(Mutex::new(None));
        let theirs = target.clone();
        std::thread::Builder::new()
            .name("roost-sitelog".into())
            .stack_size(PUMP_STACK)
            .spawn(move || {
                let _ = crate::launch::priority::normal_this_thread();
                drain(File::from(read), &theirs);
            })?;
        Ok(Self {
            write: File::from(write),
            target,
        })
    }

    /// This pump is `host`'s from now on: the write end to give its worker, and what
    /// completes once all it wrote is in `log`.
    pub fn assign(
        self,
        host: &str,
        log: Arc<Mutex<SiteLog>>,
    ) -> (File, tokio::sync::oneshot::Receiver<()>) {
        let (drained, drained_rx) = tokio::sync::oneshot::channel();
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(PumpTarget {
            host: host.to_string(),
            log,
            drained,
        });
        (self.write, drained_rx)
    }
}

/// Copy what arrives on `read` into the target's log, whole lines at a time, until EOF. A
/// pump never assigned (the agent kept its write end, then dropped it) ends silently.
fn drain(mut read: File, target: &Mutex<Option<PumpTarget>>) {
    let mut buf = vec![0u8; CHUNK];
    // The worker's unfinished last line, kept back so lines reach the file whole (a site's
    // workers share the file).
    let mut partial: Vec<u8> = Vec::new();
    let mut assigned: Option<PumpTarget> = None;
    loop {
        let n = match read.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let host = assigned.as_ref().map(|t| t.host.as_str()).unwrap_or("?");
                tracing::warn!(site = %host, error = %e, "cannot read a worker's output");
                break;
            }
        };
        if assigned.is_none() {
            assigned = target.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        let Some(t) = &assigned else {
            continue; // no worker can hold an unassigned pump's write end: nothing to keep
        };
        partial.extend_from_slice(&buf[..n]);
        let whole = match partial.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            // A line without end for this long is written as it is.
            None if partial.len() >= MAX_PARTIAL => partial.len(),
            None => continue,
        };
        let rest = partial.split_off(whole);
        write_lines(&t.host, &t.log, &partial);
        partial = rest;
    }
    let Some(t) = assigned.or_else(|| target.lock().unwrap_or_else(|p| p.into_inner()).take())
    else {
        return;
    };
    if !partial.is_empty() {
        partial.push(b'\n');
        write_lines(&t.host, &t.log, &partial);
    }
    let _ = t.drained.send(());
}

fn write_lines(host: &str, log: &Mutex<SiteLog>, lines: &[u8]) {
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = log.write(lines) {
        tracing::warn!(site = %host, error = %e, "cannot write the site's log");
    }
}

/// The last `n` non-empty lines of the log (reads at most the last 256 KiB).
pub fn tail(file: &Path, n: usize) -> io::Result<String> {
    let mut f = File::open(file)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = lines[lines.len().saturating_sub(n)..].join("\n");
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_through_the_pipe_rotates_by_rename_and_keeps_every_line_whole() {
        let dir = std::env::temp_dir().join(format!("roost-sitelog-{}", std::process::id()));
        fs::create_dir_all(dir.join("logs")).unwrap();
        let log = Arc::new(Mutex::new(SiteLog::open(&dir, "a.example", 4096).unwrap()));
        let (mut writer, _drained) = pump("a.example", log.clone()).unwrap();
        for i in 0..1000 {
            writeln!(writer, "line {i:04} of the worker's output").unwrap();
        }
        drop(writer);
        let current = path(&dir, "a.example");
        let rotated = dir.join("logs/a.example.log.1");
        // The pump finishes once it has seen EOF; wait for the last line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !fs::read_to_string(&current)
            .unwrap_or_default()
            .contains("line 0999")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the pump never wrote the last line"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (old, new) = (
            fs::read_to_string(&rotated).unwrap(),
            fs::read_to_string(&current).unwrap(),
        );
        assert!(new.len() <= 4096 && old.len() <= 4096, "capped");
        // Every line in the two files is whole, and together they end with the newest lines
        // in order, with no gap.
        let lines: Vec<&str> = old.lines().chain(new.lines()).collect();
        for l in &lines {
            assert!(l.starts_with("line ") && l.ends_with("output"), "{l:?}");
        }
        let first: usize = lines[0][5..9].parse().unwrap();
        for (k, l) in lines.iter().enumerate() {
            assert_eq!(l[5..9].parse::<usize>().unwrap(), first + k, "gap at {l}");
        }
        assert_eq!(lines.last().unwrap()[5..9].parse::<usize>().unwrap(), 999);
        assert_eq!(
            tail(&current, 1).unwrap(),
            format!("{}\n", lines.last().unwrap())
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
