#!/usr/bin/env bash
# Install the system packages Roost needs to build, test and run, if any are missing.
# Debian/Ubuntu, as root. Safe to run again: it installs nothing when all are present.
#
#   deploy/install-deps.sh           what the build, the tests and a cluster need
#   deploy/install-deps.sh --bench   that, plus the incumbents the benchmarks compare against
#                                    (bench/warm-path.sh and bench/cold-start.sh call it)
#
# This list is the one place that says what Roost takes from the system. deploy/check-deps.sh
# (run by deploy/test.sh) traces what the build and the tests really open and fails if any of
# it comes from a package this list does not bring, so a package installed by hand, or one that
# arrived as a Recommends, can't hide a missing entry again.
set -euo pipefail

packages=(
  # the build
  ca-certificates   # cargo fetches crates over HTTPS
  gcc               # the linker rustc calls, and cc-rs for C in -sys crates
  libc6-dev         # crt files and headers for that linker and for C builds
  make              # cmake's default generator
  cmake             # pingora builds zlib-ng with it
  protobuf-compiler # etcd-client compiles etcd's protobufs
  libprotobuf-dev   # google/protobuf/*.proto, which etcd's protos import (protoc only Recommends it)
  pkg-config        # openssl-sys finds the system OpenSSL with it
  libssl-dev        # TLS: pingora's openssl backend (proxy, agent), etcd-client's tls-openssl
  # running a cluster: the demo, the tests
  etcd-server       # the cluster's store (3.4, v3 API)
  etcd-client       # etcdctl, used by the tests and handy for operators
  python3           # workers default to the system interpreter, /usr/bin/python3
  python3-gunicorn  # the WSGI server the workers run
  passwd            # useradd, for the demo's and tests' site users
  curl              # the demo waits for its servers with it
  iproute2          # deploy/cluster.sh: a network namespace, veth and bridge per agent (ip)
  # the tests
  openssl           # they make certificates and check handshakes with it
  util-linux        # setpriv, to run a tenant's code as the tenant
  fatrace           # deploy/check-deps.sh: records which system files a run opens
  python3-django    # tests/frameworks.rs: Django sites whose workers teach the agent a framework zygote
  python3-flask     # tests/frameworks.rs: the same with Flask sites
  prometheus        # promtool, for tests/metrics.rs: checks /metrics and dashboards/alerts.yml; the server scrapes a cluster in tests/operations.rs
  # the cgroup v2 VM test (deploy/vm-test.sh, run by deploy/test.sh --vm)
  qemu-system-x86   # qemu-system-x86_64 boots the guest (KVM when usable, else TCG)
  linux-image-amd64 # Debian's own kernel (and its 9p/virtio/overlay modules) for the guest
  busybox-static    # the guest's initramfs: a libc-free shell, insmod, mount, switch_root
)

# The benchmarks only (bench/warm-path.sh, bench/cold-start.sh): the load tool and the servers
# Roost is compared with. Never needed by the build or the test suite, so installed only with
# --bench, and deploy/check-deps.sh (which reads `packages` above) does not allow them to a test.
bench_packages=(
  wrk                     # the closed-loop load generator every row of the warm-path table uses
  nginx-light             # the nginx -> gunicorn and nginx -> PHP-FPM baselines
  apache2                 # the mod_wsgi daemon-mode baseline
  libapache2-mod-wsgi-py3 # mod_wsgi itself
  php-fpm                 # the pm = ondemand cold-start baseline
  linux-perf              # perf record -g, for the profiles in BENCHMARKS.md
)

bench=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    *) echo "usage: deploy/install-deps.sh [--bench]" >&2; exit 2 ;;
  esac
done
if ((bench)); then
  packages+=("${bench_packages[@]}")
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: installing packages needs root; run as root or install: ${missing[*]}" >&2
    exit 1
  fi
  apt-get update
  # nginx, apache2 and php-fpm start their services (on :80) as they install. The benchmarks
  # start their own copies on free ports, so forbid service starts during the install with a
  # policy-rc.d (exit 101: "action forbidden"), unless the machine already has one.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# deploy/install-deps.sh: no service starts while it installs\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  status=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" || status=$?
  if ((own_policy)); then rm -f "$policy"; fi
  if ((status)); then exit "$status"; fi
  # Under systemd the units are still enabled: stop and disable them, so none holds :80 after a reboot.
  if ((bench)) && [ -d /run/systemd/system ]; then
    for unit in nginx apache2 php*-fpm; do
      systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not on PATH; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
