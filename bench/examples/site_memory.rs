//! Heap bytes per site of each structure an informer holds, at N sites (default 100,000),
//! counted by a global allocator: where the proxy's and agent's RSS goes (issue 9).
//! `cargo run -p roost-bench --example site_memory [-- N]`

use roost_tests::bulk::bench_site_record;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use imbl::OrdMap;
use roost_proto::hosts::HostIndex;
use roost_proto::informer::Index;
use roost_proto::{SiteRoute, SiteSpec};

/// Live heap bytes, as requested (malloc's own rounding and headers come on top).
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("N"))
        .unwrap_or(100_000);
    let inputs: Vec<(String, String)> = (0..n)
        .map(|i| (format!("site-{i:07}.bench.example"), bench_site_record(i)))
        .collect();
    let per_site = |bytes: usize| bytes as f64 / n as f64;

    let before = LIVE.load(Ordering::Relaxed);
    let specs: Vec<Arc<SiteSpec>> = inputs
        .iter()
        .map(|(_, v)| Arc::new(SiteSpec::from_json(v.as_bytes()).expect("valid")))
        .collect();
    let decoded = LIVE.load(Ordering::Relaxed) - before - n * 8;
    println!("decoded SiteSpec (Arc)  {:7.0} B/site", per_site(decoded));
    println!(
        "  of which inline        {:7} B",
        std::mem::size_of::<SiteSpec>() + 16
    );

    let before = LIVE.load(Ordering::Relaxed);
    let mut items: OrdMap<String, Arc<SiteSpec>> = OrdMap::new();
    for ((name, _), spec) in inputs.iter().zip(&specs) {
        items.insert(name.clone(), spec.clone());
    }
    println!(
        "items map (key order)   {:7.0} B/site",
        per_site(LIVE.load(Ordering::Relaxed) - before)
    );

    let before = LIVE.load(Ordering::Relaxed);
    let mut index = HostIndex::default();
    for ((name, _), spec) in inputs.iter().zip(&specs) {
        index.put(name, None, spec);
    }
    println!(
        "host index              {:7.0} B/site",
        per_site(LIVE.load(Ordering::Relaxed) - before)
    );
    drop((items, index, specs));

    // The proxy's view: routing fields only (validated whole first).
    let before = LIVE.load(Ordering::Relaxed);
    let routes: Vec<Arc<SiteRoute>> = inputs
        .iter()
        .map(|(_, v)| {
            Arc::new(SiteRoute::from(
                SiteSpec::from_json(v.as_bytes()).expect("valid"),
            ))
        })
        .collect();
    let decoded = LIVE.load(Ordering::Relaxed) - before - n * 8;
    println!("decoded SiteRoute (Arc) {:7.0} B/site", per_site(decoded));
    let before = LIVE.load(Ordering::Relaxed);
    let mut index = HostIndex::<SiteRoute>::default();
    for ((name, _), route) in inputs.iter().zip(&routes) {
        index.put(name, None, route);
    }
    println!(
        "host index (SiteRoute)  {:7.0} B/site",
        per_site(LIVE.load(Ordering::Relaxed) - before)
    );
}
