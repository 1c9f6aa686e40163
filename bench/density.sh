#!/usr/bin/env bash
# The density benchmark (BENCHMARKS.md, "Density"): one node with 1,000 registered hello-world
# sites, 100 of them warm, and 100 fresh gunicorns beside them; PSS and fds of each part.
# As root (sites run as a real unix user). Arguments go to roost-density-bench: --sites, --warm.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh
cargo build --release -p roost-agent -p roost-proxy -p roost-bench
exec target/release/roost-density-bench --bin-dir target/release "$@"
