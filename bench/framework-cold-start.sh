#!/usr/bin/env bash
# The framework cold-start benchmark (issue 14, BENCHMARKS.md): build the release binaries,
# then time the first response of Django and Flask sites cold from the base zygote, from a
# framework zygote the agent learnt on its own, and from a fresh gunicorn, in one run.
# As root (sites run as a real unix user). Arguments go to roost-framework-bench: --rounds N (10).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-deps.sh # python3-django, python3-flask (the test packages)
cargo build --release -p roost-agent -p roost-proxy -p roost-bench
exec target/release/roost-framework-bench --bin-dir target/release "$@"
