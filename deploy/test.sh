#!/usr/bin/env bash
# The test command: install what is missing, build the binaries, run every test, and check that
# the run used no system package the installer does not bring (deploy/check-deps.sh).
# Runs as root: tests create unix users and start workers under their uids.
#
#   deploy/test.sh [--vm] [CARGO TEST ARGS...]
# --vm also runs deploy/vm-test.sh afterwards: the cgroup scenarios again, in a VM with only
# cgroup v2 (this machine is v1). Under TCG it takes ~4-5 minutes on a busy 2-core machine,
# too long for every run of the suite; CI (.ci/run) passes --vm.
set -euo pipefail
cd "$(dirname "$0")/.."

vm=0
if [ "${1:-}" = --vm ]; then
  vm=1
  shift
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the tests need root (they create users and drop to their uids); run: sudo $0" >&2
  exit 1
fi

deploy/install-deps.sh

# Record every file the build and the tests open, for the package check at the end.
# fatrace refuses an output file that exists, so it gets a fresh name in a new directory.
trace_dir=$(mktemp -d /tmp/roost-deps-trace.XXXXXX)
trace="$trace_dir/opened"
fatrace --filter=O --output="$trace" &
fatrace_pid=$!
trap 'kill -INT "$fatrace_pid" 2>/dev/null || true; rm -rf "$trace_dir"' EXIT
sleep 0.5 # fanotify marks are set up before anything worth recording runs

echo "building the binaries (the first build compiles ~300 crates: several minutes)..."
# Integration tests start the real binaries, so build them first.
cargo build --workspace --bins
rc=0
cargo test --workspace --no-fail-fast "$@" -- --test-threads=2 || rc=$?

if ((vm)); then
  deploy/vm-test.sh || rc=1
fi

kill -INT "$fatrace_pid" # SIGINT: fatrace flushes what it has and exits
wait "$fatrace_pid" || true
deploy/check-deps.sh "$trace" || rc=1
exit "$rc"
