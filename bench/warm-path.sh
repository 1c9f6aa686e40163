#!/usr/bin/env bash
# The warm-path benchmark (BENCHMARKS.md): Roost against nginx -> gunicorn, Apache mod_wsgi,
# gunicorn direct, and the floors of a hop (bare pingora, a second nginx), all started here
# with the same hello-world app and loaded with wrk.
# As root (sites run as a real unix user). Installs the incumbents first if they are missing.
#
#   bench/warm-path.sh             the full run (~5 min): 3 rounds of 4 s, c16 and c64, open loop
#   bench/warm-path.sh --smoke     seconds: one round of 1 s; fails on any error
#   bench/warm-path.sh --hold ...  keep the servers up after the tables, for perf record -p PID
# Other arguments go to roost-warm-bench (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh --bench
cargo build --release -p roost-agent -p roost-proxy -p roost-bench
exec target/release/roost-warm-bench --bin-dir target/release "$@"
