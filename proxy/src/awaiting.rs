//! Which sites have a request sent to an agent and no answer yet (the proxy's view of cold
//! starts: a warm worker answers in milliseconds, a site whose worker is starting stays here
//! until it answers). Bounded by the requests in flight, never by the number of sites.

use std::sync::Arc;

use dashmap::DashMap;

#[derive(Default)]
pub struct AwaitingSites {
    /// Site → requests sent and not yet answered; a site leaves at 0.
    waiting: DashMap<String, u32>,
}

impl AwaitingSites {
    /// A request to `site` was sent to an agent; the guard ends the wait when the response
    /// header arrives or the request ends some other way.
    pub fn begin(self: &Arc<Self>, site: &str) -> AwaitingGuard {
        *self.waiting.entry(site.to_string()).or_insert(0) += 1;
        AwaitingGuard {
            sites: self.clone(),
            site: site.to_string(),
        }
    }

    /// Sites waiting now.
    pub fn sites(&self) -> usize {
        self.waiting.len()
    }
}

pub struct AwaitingGuard {
    sites: Arc<AwaitingSites>,
    site: String,
}

impl Drop for AwaitingGuard {
    fn drop(&mut self) {
        self.sites.waiting.remove_if_mut(&self.site, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_waits_until_its_last_request_is_answered() {
        let sites = Arc::new(AwaitingSites::default());
        let a1 = sites.begin("a.example");
        let a2 = sites.begin("a.example");
        let b = sites.begin("b.example");
        assert_eq!(sites.sites(), 2);
        drop(a1);
        assert_eq!(sites.sites(), 2, "a.example still has a request waiting");
        drop(a2);
        drop(b);
        assert_eq!(sites.sites(), 0);
    }
}
