#!/usr/bin/env bash
# The cold-start benchmark (README, "Benchmarks"): build the release binaries, then time the
# first request to never-started sites through proxy and agent, zygote vs direct spawn vs
# PHP-FPM pm = ondemand behind nginx.
# As root (sites run as a real unix user). Arguments go to roost-bench: --sites N (50).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh --bench # nginx and php-fpm, the PHP-FPM ondemand baseline
cargo build --release -p roost-agent -p roost-proxy -p roost-bench
exec target/release/roost-bench --bin-dir target/release --php-fpm "$@"
