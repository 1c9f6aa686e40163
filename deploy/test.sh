#!/usr/bin/env bash
# The test command: install what is missing, build the binaries, run every test.
# Runs as root: tests create unix users and start workers under their uids.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the tests need root (they create users and drop to their uids); run: sudo $0" >&2
  exit 1
fi

deploy/install-deps.sh
# Integration tests start the real binaries, so build them first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@" -- --test-threads=2
