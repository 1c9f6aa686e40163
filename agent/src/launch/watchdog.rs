//! The last-resort memory limit, for nodes where no cgroup memory controller is writable:
//! the resident memory of each worker's process group, read from `/proc`.

use std::collections::HashMap;
use std::fs;

/// Resident bytes of every process group in `groups`, from one pass over `/proc`.
pub fn group_rss(groups: &[i32]) -> HashMap<i32, u64> {
    let mut out: HashMap<i32, u64> = groups.iter().map(|g| (*g, 0)).collect();
    if groups.is_empty() {
        return out;
    }
    let page = page_size();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((pgrp, rss_pages)) = parse_stat(&stat) {
            if let Some(total) = out.get_mut(&pgrp) {
                *total += rss_pages * page;
            }
        }
    }
    out
}

/// (process group, resident pages) from a `/proc/<pid>/stat` line. The command name may
/// contain spaces and parentheses, so fields are counted after its closing `)`.
fn parse_stat(stat: &str) -> Option<(i32, u64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // After the name: state(0) ppid(1) pgrp(2) ... rss is field 24 of the line, 21 here.
    let pgrp = fields.get(2)?.parse().ok()?;
    let rss = fields.get(21)?.parse().ok()?;
    Some((pgrp, rss))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_names() {
        let line = "1234 (gunicorn: (worker) x) S 1 1230 1230 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 100 12345678 2500 18446744073709551615";
        assert_eq!(parse_stat(line), Some((1230, 2500)));
    }

    #[test]
    fn our_own_group_has_resident_memory() {
        let own = nix::unistd::getpgrp().as_raw();
        assert!(group_rss(&[own])[&own] > 0);
    }
}
