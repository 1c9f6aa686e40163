//! Polling with a deadline: the only way these tests wait.

use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(20);

/// Call `check` until it returns true or `timeout` has passed; true if it ever did.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    wait_for(timeout, || check().then_some(())).is_some()
}

/// Call `probe` until it returns `Some`, or give up with `None` after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}
