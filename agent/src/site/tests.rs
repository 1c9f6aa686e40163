//! The site state machine under paused time, with a fake launcher: its workers are entries in
//! a table that exit when told to (or on their own, for an app scripted to fail), so every
//! transition runs in microseconds and nothing depends on the machine's speed.
//!
//! Apps the fake knows: `ok:app` starts and answers; `broken:app` starts, never answers and
//! exits 100 ms later as a failed import does.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use roost_proto::SiteSpec;
use tokio::sync::oneshot;

use super::actor::Msg;
use super::{AcquireError, Sites};
use crate::config::{Args, Config};
use crate::launch::{
    BootWeight, BoxFut, Exit, LaunchError, Launcher, LauncherKind, Listener, SocketRole, Started,
    Worker,
};
use crate::metrics::Metrics;

const BROKEN_EXIT_AFTER: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Table {
    next_pid: i32,
    /// How to end each live worker's process.
    alive: HashMap<i32, oneshot::Sender<Exit>>,
    /// "start <pid> <app>", "term <pid>", "kill <pid>", "probe <app>" in order.
    events: Vec<String>,
    /// Most workers alive at once.
    peak: usize,
    sockets: u32,
    /// Which app the latest worker on each socket runs.
    serves: HashMap<PathBuf, String>,
    /// "lowest <pid>" for a start at the lowest CPU weight, "raised <host>" when it answered.
    boot_weights: Vec<String>,
}

struct Fake {
    dir: PathBuf,
    table: Arc<Mutex<Table>>,
}

impl Fake {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap()
    }
}

struct FakeWorker {
    pid: i32,
    table: Arc<Mutex<Table>>,
}

impl FakeWorker {
    fn end(&self, event: &str, status: &str) {
        let mut t = self.table.lock().unwrap();
        t.events.push(format!("{event} {}", self.pid));
        if let Some(exit) = t.alive.remove(&self.pid) {
            let _ = exit.send(Exit {
                status: status.into(),
                last_line: String::new(),
            });
        }
    }
}

impl Worker for FakeWorker {
    fn pid(&self) -> i32 {
        self.pid
    }
    fn terminate(&self) {
        self.end("term", "signal: 15");
    }
    fn kill(&self) {
        self.end("kill", "signal: 9");
    }
}

impl Launcher for Fake {
    fn socket(
        &self,
        host: &str,
        _spec: &Arc<SiteSpec>,
        _role: SocketRole,
    ) -> BoxFut<Result<Arc<Listener>, LaunchError>> {
        let n = {
            let mut t = self.table();
            t.sockets += 1;
            t.sockets
        };
        let path = self.dir.join(format!("{host}-{n}.sock"));
        let bound = UnixListener::bind(&path).map(|socket| {
            Arc::new(Listener {
                socket,
                address: path.clone(),
                path,
            })
        });
        Box::pin(async move { bound.map_err(LaunchError::from) })
    }

    fn start(
        &self,
        _host: &str,
        spec: &Arc<SiteSpec>,
        listener: &Arc<Listener>,
        weight: BootWeight,
    ) -> BoxFut<Result<Started, LaunchError>> {
        let app = spec.app.clone().unwrap_or_default();
        self.table()
            .serves
            .insert(listener.path.clone(), app.clone());
        let (tx, rx) = oneshot::channel();
        let pid = {
            let mut t = self.table();
            t.next_pid += 1;
            let pid = t.next_pid;
            t.alive.insert(pid, tx);
            t.peak = t.peak.max(t.alive.len());
            t.events.push(format!("start {pid} {app}"));
            if weight == BootWeight::Lowest {
                t.boot_weights.push(format!("lowest {pid}"));
            }
            pid
        };
        let worker = Arc::new(FakeWorker {
            pid,
            table: self.table.clone(),
        });
        if app.starts_with("broken") {
            let w = worker.clone();
            tokio::spawn(async move {
                tokio::time::sleep(BROKEN_EXIT_AFTER).await;
                w.end("exit", "exit status: 3");
            });
        }
        let exited: BoxFut<Exit> = Box::pin(async move {
            rx.await.unwrap_or(Exit {
                status: "gone".into(),
                last_line: String::new(),
            })
        });
        Box::pin(async move {
            Ok(Started {
                worker: worker as Arc<dyn Worker>,
                launcher: LauncherKind::Zygote,
                exited,
            })
        })
    }

    fn probe(&self, _host: &str, listener: &Arc<Listener>) -> BoxFut<Result<(), String>> {
        // The fake's worker for `broken` never answers; an `ok` one answers at once.
        let app = self
            .table()
            .serves
            .get(&listener.path)
            .cloned()
            .unwrap_or_default();
        self.table().events.push(format!("probe {app}"));
        Box::pin(async move {
            if app.starts_with("broken") {
                std::future::pending::<()>().await;
            }
            Ok(())
        })
    }

    fn promote(&self, _host: &str, listener: &Listener) -> Result<PathBuf, String> {
        Ok(listener.path.clone())
    }

    fn answered(&self, host: &str) -> BoxFut<()> {
        self.table().boot_weights.push(format!("raised {host}"));
        Box::pin(async {})
    }

    fn forget(&self, host: &str) -> BoxFut<()> {
        self.table().events.push(format!("forget {host}"));
        Box::pin(async {})
    }

    fn oom_kills(&self, _host: &str) -> BoxFut<u64> {
        Box::pin(async { 0 })
    }

    fn memory_bytes(&self, _host: &str) -> BoxFut<Option<u64>> {
        Box::pin(async { None })
    }

    fn shutdown(&self) -> BoxFut<()> {
        Box::pin(async {})
    }
}

struct Node {
    sites: Arc<Sites>,
    fake: Arc<Fake>,
    metrics: Arc<Metrics>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn node(tune: impl FnOnce(&mut Config)) -> Node {
    use std::sync::atomic::AtomicU32;
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "roost-site-tests-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = Config::load(Args::parse_from([
        "roost-agent",
        "--state-dir",
        dir.to_str().unwrap(),
    ]))
    .unwrap();
    cfg.stop_grace = Duration::from_secs(5);
    tune(&mut cfg);
    let fake = Arc::new(Fake {
        dir: dir.clone(),
        table: Arc::default(),
    });
    let metrics = Arc::new(Metrics::new());
    let sites = Sites::new(
        Arc::new(ArcSwap::from_pointee(cfg)),
        metrics.clone(),
        fake.clone(),
        false,
        tokio::runtime::Handle::current(),
    );
    Node {
        sites,
        fake,
        metrics,
        _dir: TempDir(dir),
    }
}

fn spec(app: &str, idle_timeout: u64) -> Arc<SiteSpec> {
    let mut s = SiteSpec::new_app("alice", app, "/srv/a");
    s.idle_timeout = idle_timeout;
    Arc::new(s)
}

/// Let the actors and their tasks run; paused time moves only by `ms`.
async fn settle(ms: u64) {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

impl Node {
    fn events(&self) -> Vec<String> {
        self.fake.table().events.clone()
    }
    fn alive(&self) -> usize {
        self.fake.table().alive.len()
    }
    fn send(&self, host: &str, msg: Msg) {
        self.sites
            .ctx
            .actors
            .get(host)
            .unwrap()
            .shared
            .tx
            .send(msg)
            .unwrap();
    }
    async fn state(&self, host: &str) -> super::SiteStatus {
        self.sites
            .status()
            .await
            .into_iter()
            .find(|s| s.host == host)
            .expect("site has an actor")
    }
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_answers_then_stops_when_idle() {
    let n = node(|_| {});
    let s = spec("ok:app", 10);
    let t = n.sites.acquire("a.example", &s).await.unwrap();
    assert_eq!(t.generation, 1);
    assert_eq!(n.state("a.example").await.state, "starting");
    t.mark_answered(std::time::Instant::now());
    settle(1).await;
    assert_eq!(n.state("a.example").await.state, "ready");
    drop(t);
    settle(9_000).await;
    assert_eq!(n.alive(), 1, "not idle long enough yet");
    settle(1_100).await;
    assert_eq!(n.alive(), 0, "{:?}", n.events());
    assert_eq!(n.events(), vec!["start 1 ok:app", "term 1"]);
    let st = n.state("a.example").await;
    assert_eq!((st.state, st.pid), ("idle", None));
    assert_eq!(n.sites.ctx.capacity.live(), 0, "the slot came back");
    assert_eq!(n.metrics.worker_stops.with_label_values(&["idle"]).get(), 1);
    // The next request starts a new worker on the same socket.
    let t = n.sites.acquire("a.example", &s).await.unwrap();
    assert_eq!(t.generation, 2);
    assert_eq!(n.fake.table().sockets, 1);
}

#[tokio::test(start_paused = true)]
async fn requests_waiting_for_a_start_are_bounded() {
    let n = node(|c| c.start_queue_limit = 2);
    let s = spec("ok:app", 60);
    let _a = n.sites.acquire("q.example", &s).await.unwrap();
    let _b = n.sites.acquire("q.example", &s).await.unwrap();
    let third = n.sites.acquire("q.example", &s).await;
    assert!(
        matches!(third, Err(AcquireError::StartQueueFull { waiting: 2 })),
        "{third:?}"
    );
    _a.mark_answered(std::time::Instant::now());
    settle(1).await;
    assert!(
        n.sites.acquire("q.example", &s).await.is_ok(),
        "answered: no limit"
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_dies_before_answering_backs_off() {
    let n = node(|_| {});
    let s = spec("broken:app", 60);
    let t = n.sites.acquire("b.example", &s).await.unwrap();
    settle(200).await;
    drop(t);
    // One failure: the next request tries again at once.
    let t = n.sites.acquire("b.example", &s).await.unwrap();
    settle(200).await;
    drop(t);
    settle(1).await;
    // Two in a row: back off.
    let r = n.sites.acquire("b.example", &s).await;
    assert!(
        matches!(r, Err(AcquireError::CrashLoop { retry_in_secs: 1 })),
        "{r:?}"
    );
    assert_eq!(n.state("b.example").await.failures, 2);
    settle(1_100).await;
    assert!(
        n.sites.acquire("b.example", &s).await.is_ok(),
        "backoff over"
    );
    assert_eq!(n.metrics.worker_crashes.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_never_answers_is_killed_at_the_start_timeout() {
    let n = node(|c| c.start_timeout = Duration::from_secs(3));
    // `ok` answers only when a request's response says so; this one never does.
    let s = spec("ok:app", 60);
    let _t = n.sites.acquire("slow.example", &s).await.unwrap();
    settle(2_900).await;
    assert_eq!(n.metrics.start_timeouts.get(), 0);
    settle(200).await;
    assert_eq!(n.metrics.start_timeouts.get(), 1);
    assert!(
        n.events().contains(&"kill 1".to_string()),
        "{:?}",
        n.events()
    );
    assert_eq!(n.alive(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_crash_after_answering_restarts_for_the_waiting_requests() {
    let n = node(|_| {});
    let s = spec("ok:app", 60);
    let t = n.sites.acquire("c.example", &s).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    settle(1).await;
    let pid = n.state("c.example").await.pid.unwrap();
    // The worker dies on its own with a request in flight.
    let exit = n.fake.table().alive.remove(&pid).unwrap();
    exit.send(Exit {
        status: "signal: 11".into(),
        last_line: "Segmentation fault".into(),
    })
    .unwrap();
    settle(1).await;
    assert_eq!(n.metrics.worker_crashes.get(), 1);
    assert_eq!(
        n.alive(),
        1,
        "a new worker for the backlog: {:?}",
        n.events()
    );
    assert_eq!(
        n.state("c.example").await.failures,
        0,
        "not a start failure"
    );
    assert!(t
        .failure_reason()
        .await
        .unwrap()
        .contains("Segmentation fault"));
}

#[tokio::test(start_paused = true)]
async fn a_full_node_evicts_the_least_recently_used_idle_worker_or_refuses() {
    let n = node(|c| c.max_workers = 2);
    let s = spec("ok:app", 600);
    for host in ["a.example", "b.example"] {
        let t = n.sites.acquire(host, &s).await.unwrap();
        t.mark_answered(std::time::Instant::now());
        settle(10).await;
    }
    // Full: c's start asks a (least recently used) to stop and waits for its exit.
    let t = n.sites.acquire("c.example", &s).await.unwrap();
    assert_eq!(n.alive(), 2);
    let events = n.events();
    assert!(events.contains(&"term 1".to_string()), "{events:?}");
    assert!(!events.contains(&"term 2".to_string()), "{events:?}");
    assert_eq!(
        n.metrics.worker_stops.with_label_values(&["evicted"]).get(),
        1
    );
    // b and c busy: nothing to evict, refused at once.
    let b = n.sites.acquire("b.example", &s).await.unwrap();
    let r = n.sites.acquire("a.example", &s).await;
    assert!(matches!(r, Err(AcquireError::AtCapacity)), "{r:?}");
    drop((t, b));
}

#[tokio::test(start_paused = true)]
async fn concurrent_cold_starts_never_exceed_max_workers() {
    let n = node(|c| c.max_workers = 3);
    let s = spec("ok:app", 600);
    let starts: Vec<_> = (0..20)
        .map(|i| {
            let (sites, s) = (n.sites.clone(), s.clone());
            tokio::spawn(async move {
                let host = format!("s{i}.example");
                let t = sites.acquire(&host, &s).await;
                if let Ok(t) = &t {
                    t.mark_answered(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                t.is_ok()
            })
        })
        .collect();
    let mut served = 0;
    for s in starts {
        served += s.await.unwrap() as usize;
    }
    settle(10_000).await;
    let peak = n.fake.table().peak;
    assert!(peak <= 3, "peak {peak} workers, limit 3");
    assert!(served >= 3, "only {served} served");
}

#[tokio::test(start_paused = true)]
async fn a_changed_spec_whose_worker_fails_leaves_the_old_one_serving() {
    let n = node(|_| {});
    let v1 = spec("ok:app", 600);
    let t = n.sites.acquire("d.example", &v1).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    settle(1).await;
    let old_pid = n.state("d.example").await.pid.unwrap();

    n.send("d.example", Msg::SpecChanged(spec("broken:app", 600)));
    settle(1).await;
    // While the candidate boots, requests still go to the old worker.
    let during = n.sites.acquire("d.example", &v1).await.unwrap();
    assert_eq!(during.generation, t.generation);
    settle(200).await;
    let st = n.state("d.example").await;
    assert_eq!(st.pid, Some(old_pid));
    assert_eq!(st.state, "ready");
    assert!(
        st.note.as_deref().is_some_and(
            |n| n.starts_with("serving the previous spec: worker exited (exit status: 3)")
        ),
        "{st:?}"
    );
    assert_eq!(n.metrics.spec_change_failures.get(), 1);
    assert!(!n.events().contains(&format!("term {old_pid}")));
    drop(during);

    // A valid spec takes over once its worker answered; the old one drains, then stops.
    let v3 = spec("ok:v3", 600);
    n.send("d.example", Msg::SpecChanged(v3.clone()));
    settle(1).await;
    let st = n.state("d.example").await;
    assert_ne!(st.pid, Some(old_pid), "{:?}", n.events());
    assert_eq!(st.note, None);
    assert!(
        !n.events().contains(&format!("term {old_pid}")),
        "a request still holds the old worker"
    );
    let next = n.sites.acquire("d.example", &v3).await.unwrap();
    assert!(next.generation > t.generation);
    drop(t);
    settle(1).await;
    assert!(
        n.events().contains(&format!("term {old_pid}")),
        "{:?}",
        n.events()
    );
    assert_eq!(
        n.metrics
            .worker_stops
            .with_label_values(&["replaced"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_changed_spec_with_no_worker_applies_at_once() {
    let n = node(|_| {});
    let t = n
        .sites
        .acquire("e.example", &spec("ok:app", 1))
        .await
        .unwrap();
    t.mark_answered(std::time::Instant::now());
    drop(t);
    settle(1_500).await;
    assert_eq!(n.alive(), 0);
    n.send("e.example", Msg::SpecChanged(spec("ok:v2", 1)));
    settle(1).await;
    let _t = n
        .sites
        .acquire("e.example", &spec("ok:v2", 1))
        .await
        .unwrap();
    assert!(
        n.events().contains(&"start 2 ok:v2".to_string()),
        "{:?}",
        n.events()
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_every_worker_and_refuses_with_503_not_404() {
    let n = node(|_| {});
    let s = spec("ok:app", 600);
    for host in ["f.example", "g.example"] {
        let t = n.sites.acquire(host, &s).await.unwrap();
        t.mark_answered(std::time::Instant::now());
    }
    settle(1).await;
    assert_eq!(n.alive(), 2);
    n.sites.shutdown().await;
    assert_eq!(n.alive(), 0, "{:?}", n.events());
    let r = n.sites.acquire("f.example", &s).await;
    assert!(matches!(r, Err(AcquireError::ShuttingDown)), "{r:?}");
    assert_eq!(
        n.metrics
            .worker_stops
            .with_label_values(&["shutdown"])
            .get(),
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_removed_site_stops_and_refuses() {
    let n = node(|_| {});
    let s = spec("ok:app", 600);
    let t = n.sites.acquire("h.example", &s).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    drop(t);
    settle(1).await;
    n.send("h.example", Msg::Removed);
    settle(1).await;
    assert_eq!(n.alive(), 0);
    assert!(n.sites.ctx.actors.get("h.example").is_none(), "actor ended");
    assert_eq!(
        n.metrics.worker_stops.with_label_values(&["removed"]).get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_ignores_sigterm_is_killed_after_the_grace() {
    let n = node(|c| c.stop_grace = Duration::from_secs(2));
    let s = spec("ok:app", 1);
    let t = n.sites.acquire("i.example", &s).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    drop(t);
    // This worker ignores SIGTERM: take its exit away from `terminate`.
    let exit = n.fake.table().alive.remove(&1).unwrap();
    settle(1_100).await;
    assert!(n.events().contains(&"term 1".to_string()));
    assert!(!n.events().contains(&"kill 1".to_string()));
    settle(2_000).await;
    assert!(
        n.events().contains(&"kill 1".to_string()),
        "{:?}",
        n.events()
    );
    drop(exit);
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_is_timed_once_per_new_worker_from_its_first_answer() {
    let n = node(|_| {});
    let s = spec("ok:app", 10);
    let cold = || {
        n.metrics
            .cold_start
            .with_label_values(&["zygote"])
            .get_sample_count()
    };
    let (t1, t2) = (
        n.sites.acquire("a.example", &s).await.unwrap(),
        n.sites.acquire("a.example", &s).await.unwrap(),
    );
    assert_eq!(n.metrics.cold_waits.get(), 2, "both waited for the start");
    // Both requests' answers arrive; only the worker's first counts.
    t1.mark_answered(std::time::Instant::now());
    t2.mark_answered(std::time::Instant::now());
    settle(1).await;
    assert_eq!(cold(), 1);
    let t3 = n.sites.acquire("a.example", &s).await.unwrap();
    t3.mark_answered(std::time::Instant::now());
    settle(1).await;
    assert_eq!(cold(), 1, "a warm request is no cold start");
    assert_eq!(n.metrics.cold_waits.get(), 2);
    assert_eq!(n.metrics.spawns.with_label_values(&["zygote"]).get(), 1);
    drop((t1, t2, t3));
    // Idle stop, then the next request starts (and times) a new worker.
    settle(11_000).await;
    let t4 = n.sites.acquire("a.example", &s).await.unwrap();
    t4.mark_answered(std::time::Instant::now());
    settle(1).await;
    assert_eq!(cold(), 2);
    assert_eq!(n.metrics.worker_stops.with_label_values(&["idle"]).get(), 1);
}

/// A snapshot of one site pinned to `pin`, and the nodes `node-a` (this one) and `node-b`.
fn placed(
    host: &str,
    spec: &Arc<SiteSpec>,
    pin: &str,
) -> (
    roost_proto::Snapshot<SiteSpec>,
    std::collections::BTreeMap<String, roost_proto::NodeInfo>,
) {
    let mut pinned = (**spec).clone();
    pinned.node = Some(pin.to_string());
    let mut snap = roost_proto::Snapshot::<SiteSpec>::default();
    snap.items.insert(host.to_string(), Arc::new(pinned));
    let nodes = ["node-a", "node-b"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                id.to_string(),
                roost_proto::NodeInfo::new(&format!("127.0.0.1:{}", 7000 + i)),
            )
        })
        .collect();
    (snap, nodes)
}

#[tokio::test(start_paused = true)]
async fn a_site_placed_elsewhere_is_given_back_once_idle_and_a_late_request_restarts_it() {
    let n = node(|c| c.node_id = "node-a".into());
    let s = spec("ok:app", 600);
    let host = "m.example";
    let (snap, _) = placed(host, &s, "node-a");
    let s = snap.items.get(host).unwrap().clone();
    let t = n.sites.acquire(host, &s).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    settle(1).await;

    // Pinned to this node: nothing happens.
    let (snap, nodes) = placed(host, &s, "node-a");
    n.sites.reconcile(&snap, &nodes);
    settle(1).await;
    assert_eq!(n.alive(), 1);

    // Moved to node-b while a request is in flight: the request finishes first.
    let (snap, nodes) = placed(host, &s, "node-b");
    n.sites.reconcile(&snap, &nodes);
    settle(1).await;
    assert_eq!(n.alive(), 1, "given back with a request in flight");
    assert_eq!(
        n.state(host).await.note.as_deref(),
        Some("placed on another node: given back once idle")
    );
    drop(t);
    settle(1).await;
    assert_eq!(n.alive(), 0, "{:?}", n.events());
    assert_eq!(
        n.events(),
        vec!["start 1 ok:app", "term 1", "forget m.example"]
    );
    assert!(n.sites.ctx.actors.get(host).is_none(), "actor ended");
    assert_eq!(
        n.metrics.worker_stops.with_label_values(&["moved"]).get(),
        1
    );
    assert_eq!(n.sites.ctx.capacity.live(), 0, "the slot came back");

    // A proxy that has not seen the move yet: the request is served by a fresh actor.
    let t = n.sites.acquire(host, &s).await.unwrap();
    assert_eq!(t.generation, 1, "a new actor");
    t.mark_answered(std::time::Instant::now());
    drop(t);
    settle(1).await;
    assert_eq!(n.alive(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_site_placed_back_before_it_was_idle_is_kept() {
    let n = node(|c| c.node_id = "node-a".into());
    let s = spec("ok:app", 600);
    let host = "k.example";
    // The spec stays the same; the node set changes under it.
    let (snap, mut nodes) = placed(host, &s, "node-b");
    let s = snap.items.get(host).unwrap().clone();
    let t = n.sites.acquire(host, &s).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    n.sites.reconcile(&snap, &nodes);
    settle(1).await;
    assert!(n.state(host).await.note.is_some(), "leaving");
    // node-b drains: the pin no longer holds, and node-a is the only candidate.
    nodes.get_mut("node-b").unwrap().draining = true;
    n.sites.reconcile(&snap, &nodes);
    settle(1).await;
    drop(t);
    settle(1).await;
    assert_eq!(n.alive(), 1, "{:?}", n.events());
    assert_eq!(n.state(host).await.note, None);
}

#[tokio::test(start_paused = true)]
async fn without_this_node_in_the_node_set_nothing_is_given_back() {
    let n = node(|c| c.node_id = "node-c".into());
    let s = spec("ok:app", 600);
    let host = "u.example";
    let t = n.sites.acquire(host, &s).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    drop(t);
    let (snap, nodes) = placed(host, &s, "node-b");
    n.sites.reconcile(&snap, &nodes);
    settle(1).await;
    assert_eq!(n.alive(), 1, "{:?}", n.events());
}

#[tokio::test(start_paused = true)]
async fn requests_past_the_sites_concurrency_limit_are_refused_without_a_start() {
    let n = node(|_| {});
    let mut limited = (*spec("ok:app", 600)).clone();
    limited.max_concurrent_requests = Some(2);
    let s = Arc::new(limited);
    // Two wait for the start; the third is refused at once, before any worker is asked.
    let (a, b, c) = tokio::join!(
        n.sites.acquire("c.example", &s),
        n.sites.acquire("c.example", &s),
        async {
            settle(0).await;
            n.sites.acquire("c.example", &s).await
        }
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        matches!(c, Err(AcquireError::TooManyRequests { limit: 2 })),
        "{c:?}"
    );
    assert_eq!(n.events(), vec!["start 1 ok:app"]);
    a.mark_answered(std::time::Instant::now());
    drop(a);
    settle(1).await;
    // One finished: there is room for one more.
    let d = n.sites.acquire("c.example", &s).await.unwrap();
    assert!(matches!(
        n.sites.acquire("c.example", &s).await,
        Err(AcquireError::TooManyRequests { .. })
    ));
    drop((b, d));
}

#[tokio::test(start_paused = true)]
async fn the_nodes_default_concurrency_limit_applies_to_sites_that_name_none() {
    let n = node(|c| c.site_limits.max_concurrent_requests = Some(1));
    let s = spec("ok:app", 600);
    let t = n.sites.acquire("d.example", &s).await.unwrap();
    assert!(matches!(
        n.sites.acquire("d.example", &s).await,
        Err(AcquireError::TooManyRequests { limit: 1 })
    ));
    drop(t);
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_boots_at_the_lowest_cpu_weight_until_it_answers_and_a_candidate_never_does() {
    let n = node(|_| {});
    let t = n
        .sites
        .acquire("w.example", &spec("ok:app", 600))
        .await
        .unwrap();
    settle(1).await;
    assert_eq!(n.fake.table().boot_weights, ["lowest 1"]);
    t.mark_answered(std::time::Instant::now());
    settle(1).await;
    assert_eq!(
        n.fake.table().boot_weights,
        ["lowest 1", "raised w.example"]
    );
    // A new spec's worker boots beside the serving one, in the same group: no lowering.
    n.send("w.example", Msg::SpecChanged(spec("ok:app2", 600)));
    settle(1).await;
    assert!(
        n.events().contains(&"start 2 ok:app2".to_string()),
        "{:?}",
        n.events()
    );
    assert_eq!(
        n.fake.table().boot_weights,
        ["lowest 1", "raised w.example"]
    );
    drop(t);
}

/// Poll `acquire` once: `Some` if it finished without waiting for the site's actor (a round
/// trip to it cannot complete within one poll: the actor is another task).
fn without_the_actor<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    use std::task::{Context, Poll, Waker};
    match std::pin::Pin::new(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_ready_worker_is_claimed_and_released_without_the_actor_until_its_state_changes() {
    let n = node(|_| {});
    let mut limited = (*spec("ok:app", 600)).clone();
    limited.max_concurrent_requests = Some(2);
    let s = Arc::new(limited);
    // Starting: requests ask the actor.
    let mut first = Box::pin(n.sites.acquire("r.example", &s));
    assert!(without_the_actor(&mut first).is_none());
    let t = first.await.unwrap();
    let mut second = Box::pin(n.sites.acquire("r.example", &s));
    assert!(without_the_actor(&mut second).is_none(), "not answered yet");
    drop(second.await.unwrap());
    t.mark_answered(std::time::Instant::now());
    settle(1).await;

    // Ready: claimed with atomics only, on the same worker, counted by the actor's status.
    let warm = without_the_actor(&mut Box::pin(n.sites.acquire("r.example", &s)))
        .expect("a ready worker is claimed without the actor")
        .unwrap();
    assert_eq!(warm.generation, t.generation);
    assert_eq!(n.state("r.example").await.in_flight, 2);
    // The site's limit is enforced on the fast path too.
    let refused = without_the_actor(&mut Box::pin(n.sites.acquire("r.example", &s)))
        .expect("the limit is checked without the actor");
    assert!(
        matches!(refused, Err(AcquireError::TooManyRequests { limit: 2 })),
        "{refused:?}"
    );
    drop(warm);
    settle(1).await;
    assert_eq!(n.state("r.example").await.in_flight, 1);

    // Placed on another node while a request is in flight: the gate closes, and a request
    // goes to the actor again, which keeps the site here for it.
    n.send("r.example", Msg::Placement { here: false });
    settle(1).await;
    let mut moved = Box::pin(n.sites.acquire("r.example", &s));
    assert!(
        without_the_actor(&mut moved).is_none(),
        "the gate is closed"
    );
    let late = moved.await.unwrap();
    assert_eq!(late.generation, t.generation, "{:?}", n.events());
    drop(t);
    settle(1).await;
    let again = without_the_actor(&mut Box::pin(n.sites.acquire("r.example", &s)))
        .expect("kept here: the gate is open again")
        .unwrap();
    assert_eq!(again.generation, late.generation);
    assert_eq!(n.events(), vec!["start 1 ok:app"]);
    drop((late, again));
    settle(1).await;
    assert_eq!(n.state("r.example").await.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_worker_busy_past_its_idle_timeout_stops_an_idle_timeout_after_its_last_request() {
    let n = node(|_| {});
    let s = spec("ok:app", 10);
    let t = n.sites.acquire("busy.example", &s).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    drop(t);
    settle(1).await;
    // A request claimed through the gate outlives the idle timeout: the actor finds it in
    // flight when the deadline comes, and waits for the gate to say it ended.
    let long = n.sites.acquire("busy.example", &s).await.unwrap();
    settle(25_000).await;
    assert_eq!(n.alive(), 1, "{:?}", n.events());
    drop(long);
    settle(9_000).await;
    assert_eq!(n.alive(), 1, "idle for 9 s only");
    settle(1_100).await;
    assert_eq!(n.alive(), 0, "{:?}", n.events());
    assert_eq!(n.metrics.worker_stops.with_label_values(&["idle"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_claimed_on_the_old_worker_keeps_it_until_done_after_a_spec_change() {
    let n = node(|_| {});
    let v1 = spec("ok:v1", 600);
    let t = n.sites.acquire("sc.example", &v1).await.unwrap();
    t.mark_answered(std::time::Instant::now());
    drop(t);
    settle(1).await;
    let old = without_the_actor(&mut Box::pin(n.sites.acquire("sc.example", &v1)))
        .expect("claimed through the gate")
        .unwrap();
    n.send("sc.example", Msg::SpecChanged(spec("ok:v2", 600)));
    settle(1).await;
    let new = n.sites.acquire("sc.example", &v1).await.unwrap();
    assert!(new.generation > old.generation, "the new worker serves");
    let old_pid = old.pid;
    assert_eq!(n.state("sc.example").await.stopping, vec![old_pid]);
    assert!(
        !n.events().contains(&format!("term {old_pid}")),
        "the old worker finishes its request first: {:?}",
        n.events()
    );
    assert_eq!(n.state("sc.example").await.in_flight, 2);
    drop(old);
    settle(1).await;
    assert!(
        n.events().contains(&format!("term {old_pid}")),
        "{:?}",
        n.events()
    );
    assert_eq!(n.state("sc.example").await.in_flight, 1);
    drop(new);
}

/// Requests on four threads claim and release three sites as fast as they can while their
/// actors stop idle workers (idle timeout 0), evict them (room for two workers), and swap one
/// site's spec back and forth. A request holding a ticket for a worker that had answered
/// must never see that worker stopped: only a drain (which waits for it), an idle stop or
/// an eviction (which need nothing in flight) may stop an answered worker here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_racing_idle_stops_evictions_and_spec_changes_never_lose_a_request() {
    let n = Arc::new(node(|c| {
        c.max_workers = 2;
        c.stop_grace = Duration::from_secs(1);
    }));
    let sites = [
        ("idle.example", spec("ok:app", 0)),
        ("warm.example", spec("ok:app", 600)),
        ("swap.example", spec("ok:v1", 600)),
    ];
    let tasks: Vec<_> = (0..8u64)
        .map(|seed| {
            let (n, sites) = (n.clone(), sites.clone());
            tokio::spawn(async move {
                let (mut fast, mut served, mut violations) = (0u32, 0u32, Vec::new());
                let mut rng = seed * 7919 + 17;
                for _ in 0..400 {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let (host, s) = &sites[(rng >> 33) as usize % sites.len()];
                    let mut claim = Box::pin(n.sites.acquire(host, s));
                    let result = match without_the_actor(&mut claim) {
                        Some(r) => {
                            fast += 1;
                            r
                        }
                        None => claim.await,
                    };
                    let Ok(t) = result else { continue };
                    served += 1;
                    let answered = |t: &super::Ticket| {
                        t.shared.answered_generation.load(Ordering::Acquire) == t.generation
                    };
                    let was_answered = answered(&t);
                    t.mark_answered(std::time::Instant::now());
                    for _ in 0..(rng >> 61) {
                        tokio::task::yield_now().await;
                    }
                    let alive = n.fake.table().alive.contains_key(&t.pid);
                    if (was_answered || answered(&t)) && !alive {
                        violations.push(format!("{host} pid {}", t.pid));
                    }
                    drop(t);
                }
                (fast, served, violations)
            })
        })
        .collect();
    let swapper = {
        let n = n.clone();
        tokio::spawn(async move {
            for i in 0..150 {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let app = if i % 2 == 0 { "ok:v2" } else { "ok:v1" };
                if let Some(h) = n.sites.ctx.actors.get("swap.example") {
                    let _ = h.shared.tx.send(Msg::SpecChanged(spec(app, 600)));
                }
            }
        })
    };
    let (mut fast, mut served) = (0, 0);
    for t in tasks {
        let (f, s, violations) = t.await.unwrap();
        assert!(
            violations.is_empty(),
            "stopped under a request: {violations:?}"
        );
        fast += f;
        served += s;
    }
    swapper.await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    eprintln!(
        "{served} served, {fast} of them without the actor; {} worker starts",
        n.events().iter().filter(|e| e.starts_with("start")).count()
    );
    assert!(served > 1_000, "only {served} of 3200 requests served");
    assert!(fast > 100, "only {fast} requests took the fast path");
    for (host, _) in &sites {
        assert_eq!(
            n.state(host).await.in_flight,
            0,
            "{host}: every request ended"
        );
    }
    assert_eq!(n.sites.in_flight(), 0);
    assert!(
        n.fake.table().peak <= 2,
        "peak {} workers",
        n.fake.table().peak
    );
}
