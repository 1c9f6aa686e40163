//! Each site's worker output: one file per site under `<state-dir>/logs/`, written by the
//! worker through the fds the agent hands it, capped in size by copy-and-truncate (the
//! worker keeps its fd and goes on appending), read back by `roostctl site logs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where a site's worker output goes.
pub fn path(state_dir: &Path, host: &str) -> PathBuf {
    state_dir.join("logs").join(format!("{host}.log"))
}

/// Open the site's log for a new worker's stdout and stderr (append; root-owned, 0640).
pub fn open_for_worker(state_dir: &Path, host: &str) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path(state_dir, host))
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

/// If the log has grown past `max_bytes`, keep its content as `<log>.1` and empty it.
/// Returns true when it rotated.
pub fn rotate_if_large(file: &Path, max_bytes: u64) -> io::Result<bool> {
    let len = match fs::metadata(file) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    let mut old = file.as_os_str().to_owned();
    old.push(".1");
    fs::copy(file, &old)?;
    OpenOptions::new().write(true).open(file)?.set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn tail_returns_the_last_lines_and_rotation_keeps_one_old_file() {
        let dir = std::env::temp_dir().join(format!("roost-sitelog-{}", std::process::id()));
        fs::create_dir_all(dir.join("logs")).unwrap();
        let mut f = open_for_worker(&dir, "a.example").unwrap();
        for i in 0..100 {
            writeln!(f, "line {i}").unwrap();
        }
        let log = path(&dir, "a.example");
        assert_eq!(tail(&log, 2).unwrap(), "line 98\nline 99\n");
        assert!(!rotate_if_large(&log, 1 << 20).unwrap());
        assert!(rotate_if_large(&log, 100).unwrap());
        assert_eq!(fs::metadata(&log).unwrap().len(), 0);
        // The writer keeps appending to the emptied file.
        writeln!(f, "after").unwrap();
        assert_eq!(tail(&log, 5).unwrap(), "after\n");
        assert!(tail(&dir.join("logs/a.example.log.1"), 1)
            .unwrap()
            .contains("line 99"));
        fs::remove_dir_all(dir).unwrap();
    }
}
