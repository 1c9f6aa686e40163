#!/bin/sh
# Fuzz the edge's request-acceptance rules and host canonicalisation (fuzz/, cargo-fuzz with
# libFuzzer), each target for a bounded time, one after another on one core: the machines
# are shared. Stable rustc builds it with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only
# flags). Needs `cargo install cargo-fuzz` and a C++ compiler (libFuzzer is built from source).
#
#   deploy/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 600 s, every target)
#
# Seeds are in fuzz/seeds/<target>/ (committed); what the fuzzer learns goes to
# fuzz/corpus/<target>/ and crashes to fuzz/artifacts/<target>/ (both ignored by git).
# A crash stops the script with libFuzzer's exit code; turn it into a regression test.
set -eu
secs=${1:-600}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
targets=${*:-$(cargo fuzz list)}
for target in $targets; do
    mkdir -p "corpus/$target"
    echo "== $target: ${secs}s"
    cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -print_final_stats=1
done
