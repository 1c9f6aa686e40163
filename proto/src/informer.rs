//! The informer: an in-memory, always-readable copy of one etcd prefix (DESIGN.md, decision 1).
//!
//! It lists the prefix at revision R, publishes a snapshot, then watches from R+1 and
//! publishes a new snapshot for each batch of events. A lost watch reconnects with backoff and
//! lists again; a compacted start revision lists again at once. Readers on the request path
//! call [`Informer::snapshot`], a lock-free load of an immutable `Arc`: they never wait on
//! etcd, and if etcd is down they keep reading the last snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::host::canonical_host;
use crate::node::{valid_node_id, NodeInfo};
use crate::site::{SiteSpec, SpecError};

/// A record type stored one per key under a prefix.
pub trait Record: Sized + Send + Sync + 'static {
    /// What the records are, for log lines ("site", "node").
    const KIND: &'static str;
    /// Decode the value stored under `<prefix><name>`, checking the name as well.
    fn decode(name: &str, value: &[u8]) -> Result<Self, SpecError>;
}

impl Record for SiteSpec {
    const KIND: &'static str = "site";
    fn decode(name: &str, value: &[u8]) -> Result<Self, SpecError> {
        match canonical_host(name) {
            Ok(c) if c == name => {}
            Ok(c) => {
                return Err(SpecError {
                    field: "(key)".into(),
                    reason: format!("host {name:?} is not canonical; the key must be {c:?}"),
                })
            }
            Err(e) => {
                return Err(SpecError {
                    field: "(key)".into(),
                    reason: e.to_string(),
                })
            }
        }
        SiteSpec::from_json(value)
    }
}

impl Record for NodeInfo {
    const KIND: &'static str = "node";
    fn decode(name: &str, value: &[u8]) -> Result<Self, SpecError> {
        if !valid_node_id(name) {
            return Err(SpecError {
                field: "(key)".into(),
                reason: format!("{name:?} is not a valid node id"),
            });
        }
        NodeInfo::from_json(value)
    }
}

/// One consistent view of a prefix.
#[derive(Debug)]
pub struct Snapshot<T> {
    /// The etcd revision this view reflects.
    pub revision: i64,
    /// Valid records by name (the key without the prefix).
    pub items: BTreeMap<String, Arc<T>>,
    /// Records that failed to decode, by name, with the reason.
    pub invalid: BTreeMap<String, String>,
}

impl<T> Snapshot<T> {
    fn empty() -> Self {
        Self {
            revision: 0,
            items: BTreeMap::new(),
            invalid: BTreeMap::new(),
        }
    }
}

/// Counters an owner exports as metrics.
#[derive(Debug, Default)]
pub struct InformerStats {
    /// Invalid records seen (each put of a bad value counts once).
    pub invalid_records: AtomicU64,
    /// Full lists of the prefix (the first, and each after a lost watch or compaction).
    pub relists: AtomicU64,
    /// Unix time (ms) of the last answer from etcd; how stale the snapshot may be.
    pub last_contact_ms: AtomicU64,
}

/// Keeps a snapshot of one prefix current. Create with [`Informer::start`].
pub struct Informer<T> {
    prefix: String,
    current: ArcSwap<Snapshot<T>>,
    synced: AtomicBool,
    revision: watch::Sender<i64>,
    pub stats: InformerStats,
}

/// How often the informer asks etcd for a progress notification, so its revision advances
/// (and agents can tell "not yet seen" from "does not exist") even when the prefix is quiet.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl<T: Record> Informer<T> {
    /// Start informing on `prefix` from the etcd at `urls`, on the current tokio runtime.
    pub fn start(urls: &str, prefix: &str) -> Arc<Self> {
        let informer = Arc::new(Self {
            prefix: prefix.to_string(),
            current: ArcSwap::from_pointee(Snapshot::empty()),
            synced: AtomicBool::new(false),
            revision: watch::channel(0).0,
            stats: InformerStats::default(),
        });
        tokio::spawn(informer.clone().run(urls.to_string()));
        informer
    }

    /// The current snapshot; never blocks.
    pub fn snapshot(&self) -> Arc<Snapshot<T>> {
        self.current.load_full()
    }

    /// True once the first full list has been published.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// The newest revision etcd has confirmed to this informer.
    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// A receiver that changes whenever the revision advances (with or without new records).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }

    /// Wait until the informer has seen `revision`, or `timeout` passes. True if it has.
    pub async fn wait_for_revision(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Milliseconds since etcd last answered (0 before the first answer).
    pub fn staleness_ms(&self) -> u64 {
        let last = self.stats.last_contact_ms.load(Ordering::Relaxed);
        if last == 0 {
            return 0;
        }
        now_ms().saturating_sub(last)
    }

    async fn run(self: Arc<Self>, urls: String) {
        let mut backoff = BACKOFF_MIN;
        let mut client: Option<Client> = None;
        loop {
            let c = match &client {
                Some(c) => c.clone(),
                None => match crate::etcd::connect(&urls).await {
                    Ok(c) => {
                        client = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        warn!(prefix = %self.prefix, error = %e, retry_in = ?backoff, "cannot reach etcd");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            match self.list_and_watch(c, &mut backoff).await {
                Ok(()) => {}
                Err(e) => {
                    warn!(prefix = %self.prefix, error = %e, retry_in = ?backoff,
                        "lost etcd watch; serving the last snapshot");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// List, then watch until the watch ends. `Ok` means "list again now" (compaction).
    async fn list_and_watch(
        &self,
        mut client: Client,
        backoff: &mut Duration,
    ) -> Result<(), etcd_client::Error> {
        let resp = client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let mut revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut items = BTreeMap::new();
        let mut invalid = BTreeMap::new();
        for kv in resp.kvs() {
            self.apply_put(kv.key(), kv.value(), &mut items, &mut invalid);
        }
        self.stats.relists.fetch_add(1, Ordering::Relaxed);
        self.publish(revision, &items, &invalid);
        if !self.synced.swap(true, Ordering::AcqRel) {
            info!(prefix = %self.prefix, revision, records = items.len(), "first sync complete");
        } else {
            info!(prefix = %self.prefix, revision, records = items.len(), "relisted");
        }
        *backoff = BACKOFF_MIN;

        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_prev_key();
        let (mut requests, mut responses) = client
            .watch(self.prefix.as_str(), Some(options))
            .await?
            .split();
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                msg = responses.message() => {
                    let Some(resp) = msg? else {
                        return Err(etcd_client::Error::WatchError("watch stream ended".into()));
                    };
                    self.stats.last_contact_ms.store(now_ms(), Ordering::Relaxed);
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            info!(prefix = %self.prefix, compact_revision = resp.compact_revision(),
                                "watch start revision was compacted; listing again");
                            return Ok(());
                        }
                        return Err(etcd_client::Error::WatchError(format!(
                            "watch cancelled: {}", resp.cancel_reason())));
                    }
                    if let Some(h) = resp.header() {
                        revision = revision.max(h.revision());
                    }
                    if !resp.events().is_empty() {
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            revision = revision.max(kv.mod_revision());
                            match ev.event_type() {
                                EventType::Put => self.apply_put(kv.key(), kv.value(), &mut items, &mut invalid),
                                EventType::Delete => self.apply_delete(kv.key(), &mut items, &mut invalid),
                            }
                        }
                        self.publish(revision, &items, &invalid);
                    } else {
                        self.revision.send_if_modified(|r| {
                            let advanced = revision > *r;
                            *r = (*r).max(revision);
                            advanced
                        });
                    }
                }
                _ = progress.tick() => {
                    requests.request_progress().await?;
                }
            }
        }
    }

    fn name_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.prefix.as_str())
    }

    fn apply_put(
        &self,
        key: &[u8],
        value: &[u8],
        items: &mut BTreeMap<String, Arc<T>>,
        invalid: &mut BTreeMap<String, String>,
    ) {
        let key_text = String::from_utf8_lossy(key);
        let Some(name) = self.name_of(key) else {
            warn!(key = %key_text, "skipping a key that is not UTF-8");
            self.stats.invalid_records.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match T::decode(name, value) {
            Ok(record) => {
                debug!(kind = T::KIND, name, "record updated");
                invalid.remove(name);
                items.insert(name.to_string(), Arc::new(record));
            }
            Err(e) => {
                // A typo in an update must not take a working site down: the last valid
                // version (if any) keeps serving, and the log line says so.
                let kept = items.contains_key(name);
                warn!(kind = T::KIND, key = %key_text, field = %e.field, reason = %e.reason,
                    kept_last_valid = kept, "skipping invalid {} record", T::KIND);
                self.stats.invalid_records.fetch_add(1, Ordering::Relaxed);
                invalid.insert(name.to_string(), e.to_string());
            }
        }
    }

    fn apply_delete(
        &self,
        key: &[u8],
        items: &mut BTreeMap<String, Arc<T>>,
        invalid: &mut BTreeMap<String, String>,
    ) {
        if let Some(name) = self.name_of(key) {
            debug!(kind = T::KIND, name, "record removed");
            items.remove(name);
            invalid.remove(name);
        }
    }

    fn publish(
        &self,
        revision: i64,
        items: &BTreeMap<String, Arc<T>>,
        invalid: &BTreeMap<String, String>,
    ) {
        self.stats
            .last_contact_ms
            .store(now_ms(), Ordering::Relaxed);
        self.current.store(Arc::new(Snapshot {
            revision,
            items: items.clone(),
            invalid: invalid.clone(),
        }));
        self.revision.send_replace(revision);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
