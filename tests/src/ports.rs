//! Free loopback ports, never the same one twice within a test process.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback address whose port the kernel just reported free (bind to port 0, drop).
/// Parallel tests in one process never get the same port.
pub fn free_addr() -> SocketAddr {
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = l.local_addr().expect("local_addr");
        if seen.insert(addr.port()) {
            return addr;
        }
    }
}
