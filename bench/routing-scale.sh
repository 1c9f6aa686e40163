#!/usr/bin/env bash
# The routing-scale benchmark (README, "Benchmarks"; issue 9): build the release binaries,
# load N sites (default 100,000) into a real etcd, and report sync time against the plain
# paged read floor, proxy and agent RSS, and change propagation at N sites against an empty
# cluster; then the criterion micro-benchmark of route lookups (ns per lookup).
# As root. Arguments go to roost-routing-bench: --sites N (100000), --probes N (100).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p roost-agent -p roost-proxy -p roost-bench
target/release/roost-routing-bench --bin-dir target/release "$@"
cargo bench -p roost-bench --bench route_lookup -- --noplot --warm-up-time 1 --measurement-time 3 2>&1 | grep -E '^route_lookup|time:'
