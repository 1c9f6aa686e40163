#!/usr/bin/env bash
# Run Roost's cgroup scenarios on the unified cgroup v2 hierarchy, in a VM booted from Debian's own
# kernel (linux-image-amd64) under qemu-system-x86_64 (KVM when it works, else TCG).
#
# The guest's root is the host's root, shared read-only over 9p under a tmpfs overlay, so the guest
# runs the very test binary, roost binaries, etcd, python3 and gunicorn built and installed here.
# A tiny initramfs (busybox-static + the kernel's 9p/virtio/overlay modules) mounts that, and
# deploy/vm/guest.sh mounts ONLY cgroup2 with memory, pids, cpu and io enabled, runs the tests
# named below (from tests/tests/lifecycle.rs, or `BINARY:NAME` from tests/tests/BINARY.rs), writes
# their output to a shared folder, and powers off. The same tests run on the (v1) host in the
# ordinary suite.
#
#   deploy/vm-test.sh                 # the cgroup scenarios
#   deploy/vm-test.sh TEST_NAME...    # other tests, by exact name (lifecycle's, or BINARY:NAME)
# Env: ROOST_VM_TIMEOUT (seconds, default 900), ROOST_VM_ACCEL (kvm|tcg, default: try kvm, then tcg),
#      ROOST_VM_KEEP=1 keeps the work folder (initramfs, console log, results).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

scenarios=(
  a_memory_hog_is_killed_and_its_neighbour_keeps_answering
  a_fork_bomb_stops_at_pids_max_and_its_neighbour_keeps_answering
  the_agent_sits_in_a_leaf_and_sites_in_its_delegated_group
  a_restarted_agent_cleans_up_what_its_predecessor_left
  a_killed_agents_workers_do_not_live_on
  limits:a_site_capped_at_half_a_core_spinning_8_processes_uses_about_half_a_core
  ready:a_never_started_site_takes_a_socket_log_and_cgroup_made_ahead_with_its_own_limits_and_they_are_made_again
)
(($#)) && scenarios=("$@")
timeout_s=${ROOST_VM_TIMEOUT:-900}

die() {
  echo "vm-test: FAILED: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "needs root (qemu's 9p export of / and the tests' useradd); run: sudo $0"
qemu=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 is missing (deploy/install-deps.sh installs qemu-system-x86)"
# The newest Debian kernel that has its modules here (linux-image-amd64 depends on it).
kver=$(for k in /boot/vmlinuz-*; do v=${k#/boot/vmlinuz-}; [ -f "/lib/modules/$v/modules.dep" ] && echo "$v"; done 2>/dev/null | sort -V | tail -n1)
[ -n "$kver" ] || die "no kernel: no /boot/vmlinuz-* with /lib/modules/<version>/modules.dep (deploy/install-deps.sh installs linux-image-amd64)"
kernel=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver
busybox=/bin/busybox
# The initramfs has no libc: busybox must be the static build (busybox-static, not busybox).
has_interp() { python3 -c 'import struct,sys
h = open(sys.argv[1], "rb").read(1 << 16)
off, size, n = struct.unpack_from("<Q", h, 32)[0], *struct.unpack_from("<HH", h, 54)
sys.exit(0 if any(struct.unpack_from("<I", h, off + i * size)[0] == 3 for i in range(n)) else 1)' "$1"; }
[ -x "$busybox" ] && ! has_interp "$busybox" || die "no static busybox at $busybox (deploy/install-deps.sh installs busybox-static)"

# Scenarios grouped by test binary: "lifecycle" unless named as BINARY:NAME.
declare -A names_of=()
for s in "${scenarios[@]}"; do
  case "$s" in
    *:*) names_of[${s%%:*}]+=" ${s#*:}" ;;
    *) names_of[lifecycle]+=" $s" ;;
  esac
done
echo "vm-test: building the binaries and the test binaries: ${!names_of[*]}"
cargo build --workspace --bins -q
declare -A testbin_of=()
for binary in "${!names_of[@]}"; do
  testbin=$(cargo test -p roost-tests --test "$binary" --no-run --message-format=json -q \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$binary")
  [ -x "$testbin" ] || die "cargo did not produce the $binary test binary"
  testbin_of[$binary]=$testbin
done

work=$(mktemp -d /tmp/roost-vm.XXXXXX)
qemu_pid=
cleanup() {
  [ -n "$qemu_pid" ] && kill -KILL "$qemu_pid" 2>/dev/null || true
  if [ "${ROOST_VM_KEEP:-0}" = 1 ]; then echo "vm-test: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
results=$work/results
mkdir -p "$results" "$work/initramfs/bin" "$work/initramfs/modules"

# --- the initramfs: busybox, stage 1, and the modules for 9p, virtio and overlayfs --------------
cp "$busybox" "$work/initramfs/bin/busybox"
cp deploy/vm/init "$work/initramfs/init"
# modules.dep: "path/mod.ko: dep1.ko dep2.ko"; load order is each module after its dependencies.
declare -A dep_of=() seen=()
while IFS= read -r line; do
  dep_of[${line%%:*}]=${line#*:}
done < "$moddir/modules.dep"
order=()
visit() {
  local path=$1 d
  [ -n "${seen[$path]:-}" ] && return
  seen[$path]=1
  for d in ${dep_of[$path]}; do visit "$d"; done
  order+=("$path")
}
for name in virtio_pci 9pnet_virtio 9p overlay; do
  path=$(awk -v n="$name" -F: '{ f=$1; sub(/.*\//, "", f); sub(/\.ko.*/, "", f); gsub(/-/, "_", f); if (f == n) { print $1; exit } }' "$moddir/modules.dep")
  if [ -z "$path" ]; then
    grep -q "/$name.ko" "$moddir/modules.builtin" 2>/dev/null && continue # built into this kernel
    die "kernel $kver has no module $name"
  fi
  visit "$path"
done
: > "$work/initramfs/modules.order"
for path in "${order[@]}"; do
  base=$(basename "$path")
  case "$base" in # busybox insmod wants plain ELF
    *.ko.xz) "$busybox" xz -dc "$moddir/$path" > "$work/initramfs/modules/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) die "$path is zstd-compressed; busybox's insmod can't load it (Debian's kernels use .ko or .ko.xz)" ;;
    *) cp "$moddir/$path" "$work/initramfs/modules/$base" ;;
  esac
  echo "$base" >> "$work/initramfs/modules.order"
done
(cd "$work/initramfs" && find . | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) > "$work/initramfs.cpio"

# --- what the guest runs ------------------------------------------------------------------------
cp deploy/vm/guest.sh "$results/guest.sh"
{
  echo "cd $(printf %q "$repo")"
  echo "export RUST_BACKTRACE=1"
  # Under TCG on a busy host the agent's 5 s lease expires between keep-alives (the proxy then
  # drops the node), and a cold worker takes longer than the 15 s start timeout; longer ones
  # change nothing these scenarios check.
  printf 'export ROOST_TEST_AGENT_CONFIG=%q\n' $'lease_ttl_secs = 30\nstart_timeout_secs = 60'
  # Warm the guest's page cache: under TCG a first zygote otherwise reads Python and gunicorn
  # over 9p while the agent's fork request times out on it.
  echo "python3 -c 'import gunicorn.app.base, gunicorn.workers.gthread, json, ssl' || true"
  echo "cat target/debug/roost-agent target/debug/roost-proxy target/debug/roostctl /usr/bin/etcd > /dev/null"
  # Every binary runs; the run fails if any of them does.
  echo "failed=0"
  for binary in "${!names_of[@]}"; do
    printf '%q --exact --test-threads=1' "${testbin_of[$binary]}"
    # shellcheck disable=SC2086 # one word per test name
    printf ' %q' ${names_of[$binary]}
    echo " || failed=1"
  done
  echo 'exit $failed'
} > "$results/run.sh"

# --- boot ---------------------------------------------------------------------------------------
accels=(kvm tcg)
[ -n "${ROOST_VM_ACCEL:-}" ] && accels=("$ROOST_VM_ACCEL")
console=$work/console.log
ran=
start=$(date +%s)
for accel in "${accels[@]}"; do
  : > "$console"
  rm -f "$results/status"
  echo "vm-test: booting $kernel with -accel $accel (timeout ${timeout_s}s): ${scenarios[*]}"
  # Two vCPUs: the tests run etcd, an agent, a proxy and Python workers side by side.
  "$qemu" -accel "$accel" -cpu max -smp 2 -m 2048 \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$console" \
    -kernel "$kernel" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 panic=-1 cgroup_no_v1=all loglevel=4" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$results,mount_tag=results,security_model=none" \
    2> "$work/qemu.err" &
  qemu_pid=$!
  deadline=$((start + timeout_s))
  booted=$(( $(date +%s) + 60 )) # KVM boots to stage 1 in seconds; past this it hangs
  while kill -0 "$qemu_pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
    if [ "$accel" = kvm ] && [ "$(date +%s)" -gt "$booted" ] && ! grep -q 'roost-vm: stage 1' "$console"; then
      kill -KILL "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=
      echo "vm-test: qemu -accel kvm started but the guest did not boot within 60s; next accelerator"
      continue 2
    fi
    sleep 1
  done
  if kill -0 "$qemu_pid" 2>/dev/null; then
    kill -KILL "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=
    echo "--- console (last 40 lines)"; tail -n 40 "$console"
    [ -f "$results/output" ] && { echo "--- test output so far"; tail -n 60 "$results/output"; }
    die "timeout: the VM ran past ${timeout_s}s (-accel $accel)"
  fi
  qemu_rc=0; wait "$qemu_pid" || qemu_rc=$?; qemu_pid=
  if [ "$qemu_rc" -ne 0 ] && ! grep -q 'roost-vm: stage 1' "$console"; then
    echo "vm-test: qemu -accel $accel did not start (exit $qemu_rc): $(head -c 500 "$work/qemu.err")"
    continue # e.g. /dev/kvm present but KVM unusable: try the next accelerator
  fi
  ran=$accel
  break
done
elapsed=$(( $(date +%s) - start ))
[ -n "$ran" ] || die "qemu could not start with any of: ${accels[*]} ($(cat "$work/qemu.err"))"

if [ ! -f "$results/status" ]; then
  echo "--- console (last 60 lines)"; tail -n 60 "$console"
  [ -f "$results/output" ] && { echo "--- test output"; tail -n 80 "$results/output"; }
  die "the guest powered off without a result (-accel $ran, ${elapsed}s): see the console above"
fi
echo "--- guest"; cat "$results/guest-info"
status=$(cat "$results/status")
if [ "$status" -ne 0 ]; then
  echo "--- test output"; cat "$results/output"
  die "scenario failed in the VM with exit status $status (-accel $ran, ${elapsed}s)"
fi
grep -E '^test |^test result' "$results/output"
echo "vm-test: ok: ${#scenarios[@]} scenario(s) passed on cgroup v2 (-accel $ran, ${elapsed}s)"
