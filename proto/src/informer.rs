//! The informer: an in-memory, always-readable copy of one etcd prefix (DESIGN.md, decision 1).
//!
//! Its loop is an explicit state machine (the shape of kube-runtime's watcher):
//! - `Listing`: read the prefix in pages at one pinned revision R ([`crate::paging`]) into a
//!   fresh state, publishing nothing until the last page (a half list would hide sites);
//! - `Watching { from }`: watch from R+1, applying each response's events to the persistent
//!   maps (O(log N) per event) and publishing once per response, so a burst is one publish.
//!   A lost watch resumes from the last revision seen, after a backoff; only a compacted
//!   start revision (or a response too large to take) lists again, in pages.
//!
//! Readers on the request path call [`Informer::snapshot`], a lock-free load of an immutable
//! `Arc`: they never wait on etcd, and if etcd is down they keep reading the last snapshot.
//! A snapshot costs O(1) to publish: its maps share structure with the previous one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use etcd_client::{Client, EventType, WatchOptions};
use imbl::OrdMap;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::host::canonical_host;
use crate::node::{valid_node_id, NodeInfo};
use crate::paging::{Pages, MAX_MESSAGE_BYTES};
use crate::site::{SiteSpec, SpecError};
use crate::site_route::SiteRoute;

/// Valid records by name (the key without the prefix): a persistent map, cheap to clone.
pub type Items<T> = OrdMap<String, Arc<T>>;

/// A record type stored one per key under a prefix.
pub trait Record: Sized + Send + Sync + 'static {
    /// What the records are, for log lines ("site", "node").
    const KIND: &'static str;
    /// Decode the value stored under `<prefix><name>`, checking the name as well.
    fn decode(name: &str, value: &[u8]) -> Result<Self, SpecError>;
}

/// Derived state updated per record change, published with the records it was built from
/// (the proxy's host index). An owner asks for one only if it reads it: `()` costs nothing,
/// and an agent, which never routes by host, would otherwise hold an index of every site.
pub trait Index<T>: Clone + Default + std::fmt::Debug + Send + Sync + 'static {
    /// `name` now holds `new` (and held `old`, if it was valid).
    fn put(&mut self, name: &str, old: Option<&Arc<T>>, new: &Arc<T>);
    /// `name` (which held `old`) is gone.
    fn remove(&mut self, name: &str, old: &Arc<T>);
}

impl<T> Index<T> for () {
    fn put(&mut self, _: &str, _: Option<&Arc<T>>, _: &Arc<T>) {}
    fn remove(&mut self, _: &str, _: &Arc<T>) {}
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

/// The proxy's sites: each record validated whole, then only its routing fields kept.
impl Record for SiteRoute {
    const KIND: &'static str = "site";
    fn decode(name: &str, value: &[u8]) -> Result<Self, SpecError> {
        SiteSpec::decode(name, value).map(SiteRoute::from)
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

/// One consistent view of a prefix, with the index `I` its owner asked for.
#[derive(Debug)]
pub struct Snapshot<T: Record, I: Index<T> = ()> {
    /// The etcd revision this view reflects.
    pub revision: i64,
    /// Valid records by name (the key without the prefix).
    pub items: Items<T>,
    /// Records that failed to decode, by name, with the reason.
    pub invalid: OrdMap<String, String>,
    /// The derived index, built from exactly `items`.
    pub index: I,
}

impl<T: Record, I: Index<T>> Clone for Snapshot<T, I> {
    fn clone(&self) -> Self {
        Self {
            revision: self.revision,
            items: self.items.clone(),
            invalid: self.invalid.clone(),
            index: self.index.clone(),
        }
    }
}

impl<T: Record, I: Index<T>> Default for Snapshot<T, I> {
    fn default() -> Self {
        Self {
            revision: 0,
            items: OrdMap::new(),
            invalid: OrdMap::new(),
            index: I::default(),
        }
    }
}

/// Counters an owner exports as metrics.
#[derive(Debug, Default)]
pub struct InformerStats {
    /// Invalid records seen (each put of a bad value counts once).
    pub invalid_records: AtomicU64,
    /// Full lists of the prefix (the first, and each after a compaction).
    pub relists: AtomicU64,
    /// Pages read by those lists.
    pub list_pages: AtomicU64,
    /// Unix time (ms) of the last answer from etcd; how stale the snapshot may be.
    pub last_contact_ms: AtomicU64,
}

/// Keeps a snapshot of one prefix current, and the index `I` over it (none by default).
/// Create with [`Informer::start`].
pub struct Informer<T: Record, I: Index<T> = ()> {
    prefix: String,
    current: ArcSwap<Snapshot<T, I>>,
    synced: AtomicBool,
    revision: watch::Sender<i64>,
    pub stats: InformerStats,
}

/// How often the informer asks etcd for a progress notification, so its revision advances
/// (and agents can tell "not yet seen" from "does not exist") even when the prefix is quiet.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where the informer's loop is.
enum Phase {
    /// Read the whole prefix again, in pages.
    Listing,
    /// Watch from this revision.
    Watching { from: i64 },
}

/// Why a watch ended.
enum WatchEnd {
    /// The start revision is compacted (or a response could not be taken): list again.
    Relist,
    /// The connection or stream failed: watch again from the last revision after a backoff.
    Lost(etcd_client::Error),
}

impl<T: Record, I: Index<T>> Informer<T, I> {
    /// Start informing on `prefix` from the etcd `access` reaches, on the current tokio runtime.
    pub fn start(access: &crate::etcd::EtcdAccess, prefix: &str) -> Arc<Self> {
        let informer = Arc::new(Self {
            prefix: prefix.to_string(),
            current: ArcSwap::from_pointee(Snapshot::default()),
            synced: AtomicBool::new(false),
            revision: watch::channel(0).0,
            stats: InformerStats::default(),
        });
        tokio::spawn(informer.clone().run(access.clone()));
        informer
    }

    /// The current snapshot; never blocks.
    pub fn snapshot(&self) -> Arc<Snapshot<T, I>> {
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

    async fn run(self: Arc<Self>, access: crate::etcd::EtcdAccess) {
        let mut backoff = BACKOFF_MIN;
        let mut client: Option<Client> = None;
        let mut phase = Phase::Listing;
        // The working copy: changed in place, published as an O(1) clone.
        let mut state = Snapshot::<T, I>::default();
        loop {
            let c = match &client {
                Some(c) => c.clone(),
                None => match access.connect().await {
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
            phase = match phase {
                Phase::Listing => match self.list(&c).await {
                    Ok(listed) => {
                        state = listed;
                        self.publish(&state);
                        backoff = BACKOFF_MIN;
                        Phase::Watching {
                            from: state.revision + 1,
                        }
                    }
                    Err(e) => {
                        warn!(prefix = %self.prefix, error = %e, retry_in = ?backoff,
                            "cannot list from etcd; serving the last snapshot");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        Phase::Listing
                    }
                },
                Phase::Watching { from } => {
                    match self.watch(&c, from, &mut state, &mut backoff).await {
                        WatchEnd::Relist => Phase::Listing,
                        WatchEnd::Lost(e) => {
                            warn!(prefix = %self.prefix, error = %e, retry_in = ?backoff,
                            "lost etcd watch; serving the last snapshot");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            Phase::Watching {
                                from: state.revision + 1,
                            }
                        }
                    }
                }
            };
        }
    }

    /// Read the whole prefix in pages at one revision into a fresh state. The next page is
    /// asked for while this one is decoded, so etcd's time and ours overlap.
    async fn list(&self, client: &Client) -> Result<Snapshot<T, I>, etcd_client::Error> {
        let started = Instant::now();
        let mut pages = Pages::new(client, &self.prefix);
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let reader = tokio::spawn(async move {
            loop {
                let next = pages.next().await.transpose();
                let last = !matches!(next, Some(Ok(_)));
                if let Some(page) = next {
                    if tx.send(page).await.is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
            }
        });
        // Ends the reader if decoding stops early (an error, or this future dropped).
        let _stop_reader = AbortOnDrop(reader);
        let mut state = Snapshot::<T, I>::default();
        let mut count = 0u64;
        while let Some(page) = rx.recv().await {
            let page = page?;
            count += 1;
            state.revision = page.revision;
            for kv in &page.kvs {
                self.apply_put(kv.key(), kv.value(), &mut state);
            }
            self.stats
                .last_contact_ms
                .store(now_ms(), Ordering::Relaxed);
        }
        self.stats.relists.fetch_add(1, Ordering::Relaxed);
        self.stats.list_pages.fetch_add(count, Ordering::Relaxed);
        let (revision, records) = (state.revision, state.items.len());
        let took_ms = started.elapsed().as_millis() as u64;
        if !self.synced.load(Ordering::Acquire) {
            info!(prefix = %self.prefix, revision, records, pages = count, took_ms, "first sync complete");
        } else {
            info!(prefix = %self.prefix, revision, records, pages = count, took_ms, "relisted");
        }
        Ok(state)
    }

    /// Watch from `from`, applying events to `state` and publishing each response's batch.
    async fn watch(
        &self,
        client: &Client,
        from: i64,
        state: &mut Snapshot<T, I>,
        backoff: &mut Duration,
    ) -> WatchEnd {
        // No `prev_kv`: the informer keeps its own copy, and it would double each event.
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut watcher = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (mut requests, mut responses) =
            match watcher.watch(self.prefix.as_str(), Some(options)).await {
                Ok(stream) => stream.split(),
                Err(e) => return WatchEnd::Lost(e),
            };
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                msg = responses.message() => {
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return WatchEnd::Lost(etcd_client::Error::WatchError("watch stream ended".into())),
                        Err(e) if is_out_of_range(&e) => {
                            warn!(prefix = %self.prefix, error = %e, "a watch response was too large to take; listing again");
                            return WatchEnd::Relist;
                        }
                        Err(e) => return WatchEnd::Lost(e),
                    };
                    self.stats.last_contact_ms.store(now_ms(), Ordering::Relaxed);
                    *backoff = BACKOFF_MIN;
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            info!(prefix = %self.prefix, compact_revision = resp.compact_revision(),
                                "watch start revision was compacted; listing again");
                            return WatchEnd::Relist;
                        }
                        return WatchEnd::Lost(etcd_client::Error::WatchError(format!(
                            "watch cancelled: {}", resp.cancel_reason())));
                    }
                    let mut revision = state.revision;
                    if resp.events().is_empty() {
                        // A progress notification: etcd has sent every event up to its header
                        // revision. (Not so for the "created" answer, which may come before
                        // events still to be replayed; and event batches are trusted only for
                        // their own revisions, so a resumed watch misses nothing.)
                        if !resp.created() {
                            if let Some(h) = resp.header() {
                                revision = revision.max(h.revision());
                            }
                        }
                        state.revision = revision;
                        self.revision.send_if_modified(|r| {
                            let advanced = revision > *r;
                            *r = (*r).max(revision);
                            advanced
                        });
                        continue;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        revision = revision.max(kv.mod_revision());
                        match ev.event_type() {
                            EventType::Put => self.apply_put(kv.key(), kv.value(), state),
                            EventType::Delete => self.apply_delete(kv.key(), state),
                        }
                    }
                    state.revision = revision;
                    self.publish(state);
                }
                _ = progress.tick() => {
                    if let Err(e) = requests.request_progress().await {
                        return WatchEnd::Lost(e);
                    }
                }
            }
        }
    }

    fn name_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(self.prefix.as_str())
    }

    fn apply_put(&self, key: &[u8], value: &[u8], state: &mut Snapshot<T, I>) {
        let key_text = String::from_utf8_lossy(key);
        let Some(name) = self.name_of(key) else {
            warn!(key = %key_text, "skipping a key that is not UTF-8");
            self.stats.invalid_records.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match T::decode(name, value) {
            Ok(record) => {
                debug!(kind = T::KIND, name, "record updated");
                state.invalid.remove(name);
                let record = Arc::new(record);
                let old = state.items.insert(name.to_string(), record.clone());
                state.index.put(name, old.as_ref(), &record);
            }
            Err(e) => {
                // A typo in an update must not take a working site down: the last valid
                // version (if any) keeps serving, and the log line says so.
                let kept = state.items.contains_key(name);
                warn!(kind = T::KIND, key = %key_text, field = %e.field, reason = %e.reason,
                    kept_last_valid = kept, "skipping invalid {} record", T::KIND);
                self.stats.invalid_records.fetch_add(1, Ordering::Relaxed);
                state.invalid.insert(name.to_string(), e.to_string());
            }
        }
    }

    fn apply_delete(&self, key: &[u8], state: &mut Snapshot<T, I>) {
        if let Some(name) = self.name_of(key) {
            debug!(kind = T::KIND, name, "record removed");
            if let Some(old) = state.items.remove(name) {
                state.index.remove(name, &old);
            }
            state.invalid.remove(name);
        }
    }

    /// Publish `state` as the current snapshot (O(1): the maps share structure).
    fn publish(&self, state: &Snapshot<T, I>) {
        self.stats
            .last_contact_ms
            .store(now_ms(), Ordering::Relaxed);
        self.current.store(Arc::new(state.clone()));
        // Mark synced before announcing the revision, so a subscriber woken by it sees both.
        self.synced.store(true, Ordering::Release);
        self.revision.send_replace(state.revision);
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A message over the gRPC limit.
fn is_out_of_range(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() as i32 == 11)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
