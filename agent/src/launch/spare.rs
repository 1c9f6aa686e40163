//! A zygote's spare, held by the agent: the next worker's fork request goes to it directly,
//! answered already.
//!
//! A spare is a child a zygote forks ahead, unspecialised, that waits for a fork request
//! (`roost_zygote.py`). Handed over by its zygote, a request cost a cold start the zygote's
//! wake-up and handover (0.2–0.3 ms, run on the launcher's CPU: `perf sched`), then the
//! spare's answer (its pid and a pidfd, ~0.3 ms of cold Python), which the launcher waited
//! for before it could send the cgroup step and the spec. Now:
//! - the zygote gives the agent a copy of its end of each new spare's socket, with the
//!   spare's pid, on the events channel (`offer`);
//! - the spare says on that socket when it is settled (prewarmed; on cgroup v1, in the
//!   group made ahead it was offered, if it joined it);
//! - a worker's request goes to a settled spare with `"answered": true`: the agent has the
//!   answer already (the pid, a pidfd it opened itself, the group), and the spare goes
//!   straight on to its cgroup step and spec.
//!
//! The zygote learns of it when the spare closes its end, and makes the next one after a
//! quiet spell. A spare that is not settled yet, or gone, or whose zygote died, is not
//! used: the zygote is asked, as without a spare.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{recv, MsgFlags};
use serde_json::json;

use super::fdpass::{pidfd_open, poll_now, send_with_fds, set_timeouts};
use super::zygote::Answer;

/// How long a fork request may take to be sent to a spare.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) struct Spare {
    sock: OwnedFd,
    pid: i32,
    pidfd: OwnedFd,
    /// From its latest "settled" message: the group it was offered, the one it is in.
    cgroup_offered: Option<String>,
    cgroup: Option<String>,
    settled: bool,
}

impl Spare {
    /// The spare `pid` on `sock` (the agent's copy of the zygote's end), if it is alive:
    /// its pidfd is opened first, then the socket checked, so the pidfd is the spare's and
    /// not a recycled pid's (a spare that exited has closed its end).
    pub(super) fn offer(sock: OwnedFd, pid: i32) -> Option<Self> {
        if pid <= 0 {
            return None;
        }
        let pidfd = pidfd_open(pid).ok()?;
        if hung_up(&sock) || set_timeouts(sock.as_raw_fd(), SEND_TIMEOUT).is_err() {
            return None;
        }
        Some(Self {
            sock,
            pid,
            pidfd,
            cgroup_offered: None,
            cgroup: None,
            settled: false,
        })
    }

    /// Read what the spare said since: whether it is settled, and in which group.
    fn catch_up(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            if n == 0 {
                self.settled = false; // the spare is gone
                return;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf[..n]) else {
                continue;
            };
            if v["settled"] == json!(true) {
                let name = |key: &str| v[key].as_str().map(str::to_string);
                self.cgroup_offered = name("cgroup_offered");
                self.cgroup = name("cgroup");
                self.settled = true;
            }
        }
    }

    /// Send request `id` and its child's channel to this spare, as answered; the answer.
    /// `Err(self)`: not settled yet (the caller keeps it for the next start); `Ok(None)`:
    /// gone, or the send failed (the caller asks the zygote).
    pub(super) fn take_for(
        mut self,
        id: u64,
        channel: &OwnedFd,
    ) -> Result<Option<Answer>, Box<Spare>> {
        self.catch_up();
        if !self.settled {
            return if hung_up(&self.sock) {
                Ok(None)
            } else {
                Err(Box::new(self))
            };
        }
        let request = json!({"op": "fork", "id": id, "role": "worker", "answered": true});
        let sent = send_with_fds(
            self.sock.as_raw_fd(),
            request.to_string().as_bytes(),
            &[channel.as_raw_fd()],
        );
        Ok(sent.ok().map(|()| Answer {
            pid: self.pid,
            pidfd: Some(self.pidfd),
            cgroup: self.cgroup,
            cgroup_offered: self.cgroup_offered,
        }))
    }
}

/// Whether the other end of `sock` is closed.
fn hung_up(sock: &OwnedFd) -> bool {
    poll_now(sock.as_raw_fd(), 0) & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}
