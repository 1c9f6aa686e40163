//! Bounded client loops for the operations scenarios: a few threads GET a list of sites
//! through the proxies in turn until stopped, and record every request's outcome with the
//! moment it was sent, so a test can count the failures in a window and see when each site
//! answered again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::get;

/// One request: when it was sent (since the load started), to which site, and how it ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub at: Duration,
    pub took: Duration,
    pub host: String,
    pub proxy: SocketAddr,
    /// `Ok(())` for a 200; otherwise the status or I/O error, and the start of the body.
    pub result: Result<(), String>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
    started: Instant,
}

impl Load {
    /// `clients` threads, each walking `hosts` from its own offset, one request at a time,
    /// alternating between `proxies`.
    pub fn start(proxies: &[SocketAddr], hosts: &[String], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let threads = (0..clients)
            .map(|c| {
                let (stop, proxies, hosts) = (stop.clone(), proxies.to_vec(), hosts.to_vec());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    let mut i = c * hosts.len() / clients.max(1);
                    while !stop.load(Ordering::Acquire) {
                        let host = &hosts[i % hosts.len()];
                        let proxy = proxies[i % proxies.len()];
                        let sent = Instant::now();
                        let result = match get(proxy, Some(host), "/", &[]) {
                            Ok(r) if r.status == 200 => Ok(()),
                            Ok(r) => Err(format!(
                                "status {}: {}",
                                r.status,
                                r.text().chars().take(120).collect::<String>()
                            )),
                            Err(e) => Err(format!("error: {e}")),
                        };
                        out.push(Outcome {
                            at: sent - started,
                            took: sent.elapsed(),
                            host: host.clone(),
                            proxy,
                            result,
                        });
                        i += 1;
                    }
                    out
                })
            })
            .collect();
        Load {
            stop,
            threads,
            started,
        }
    }

    /// When the load started (outcomes' `at` counts from here).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Stop every client after its request in flight; everything they saw, in send order.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Release);
        let mut outcomes: Vec<Outcome> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread panicked"))
            .collect();
        outcomes.sort_by_key(|o| o.at);
        LoadReport {
            started: self.started,
            outcomes,
        }
    }
}

pub struct LoadReport {
    pub started: Instant,
    pub outcomes: Vec<Outcome>,
}

impl LoadReport {
    pub fn requests(&self) -> usize {
        self.outcomes.len()
    }

    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err()).collect()
    }

    /// `instant` as an offset from the load's start.
    pub fn offset(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.started)
    }

    /// The first request to `host` sent at or after `from` that got a 200, if any.
    pub fn first_ok_after(&self, host: &str, from: Duration) -> Option<&Outcome> {
        self.outcomes
            .iter()
            .find(|o| o.host == host && o.at >= from && o.result.is_ok())
    }

    /// The last failed request to `host`, if any.
    pub fn last_failure(&self, host: &str) -> Option<&Outcome> {
        self.outcomes
            .iter()
            .rev()
            .find(|o| o.host == host && o.result.is_err())
    }

    /// Up to `n` failures, one line each, for a test's message.
    pub fn describe_failures(&self, n: usize) -> String {
        self.failures()
            .iter()
            .take(n)
            .map(|o| {
                format!(
                    "  +{:.3}s {} via {} ({:.3}s): {}\n",
                    o.at.as_secs_f64(),
                    o.host,
                    o.proxy,
                    o.took.as_secs_f64(),
                    o.result.as_ref().err().map(String::as_str).unwrap_or("")
                )
            })
            .collect()
    }
}
