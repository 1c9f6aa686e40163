//! Route lookups at scale (issue 9): nanoseconds per lookup of an exact host, an alias and a
//! wildcard alias in the host index of 100,000 sites (the proxy's `RouteTable::lookup` is
//! this call), and of a site's cached node ranking. An index of 100 sites is the baseline
//! measured in the same run: a lookup must cost the same whatever the number of sites.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use roost_proto::hosts::HostIndex;
use roost_proto::placement::NodeSet;
use roost_proto::{NodeInfo, SiteSpec};

/// `n` sites, each with one exact alias; every tenth also has a wildcard alias.
fn index(n: usize) -> HostIndex {
    (0..n)
        .map(|i| {
            let mut spec = SiteSpec::new_app("alice", "app:application", "/srv/site");
            spec.aliases = vec![format!("www.site-{i:07}.bench.example")];
            if i % 10 == 0 {
                spec.aliases.push(format!("*.w{i:07}.bench.example"));
            }
            (format!("site-{i:07}.bench.example"), Arc::new(spec))
        })
        .collect()
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    for n in [100usize, 100_000] {
        let idx = index(n);
        let last = n - 1;
        let wild = (n - 1) / 10 * 10;
        let exact = format!("site-{last:07}.bench.example");
        let alias = format!("www.site-{last:07}.bench.example");
        let wildcard = format!("shop.eu.w{wild:07}.bench.example");
        let missing = "nobody.elsewhere.example".to_string();
        for (kind, host) in [
            ("exact", &exact),
            ("alias", &alias),
            ("wildcard", &wildcard),
            ("miss", &missing),
        ] {
            assert_eq!(idx.lookup(host).is_some(), kind != "miss", "{kind} {host}");
            group.bench_with_input(BenchmarkId::new(kind, n), host, |b, host| {
                b.iter(|| black_box(idx.lookup(black_box(host)).map(|r| r.site.host.len())))
            });
        }
        let nodes: BTreeMap<String, NodeInfo> = (1..=20)
            .map(|i| {
                (
                    format!("node-{i}"),
                    NodeInfo::new(&format!("10.0.0.{i}:7100")),
                )
            })
            .collect();
        let nodes = NodeSet::new(nodes);
        let site = idx.lookup(&exact).expect("exact").site.clone();
        group.bench_with_input(
            BenchmarkId::new("ranking_cached_20_nodes", n),
            &site,
            |b, site| b.iter(|| black_box(site.ranking.get(&site.host, None, &nodes).len())),
        );
    }
    group.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
