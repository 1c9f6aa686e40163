#!/usr/bin/env bash
# Install the system packages Roost needs to build, test and run, if any are missing.
# Debian/Ubuntu, as root. Safe to run again: it installs nothing when all are present.
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
  prometheus        # promtool, for tests/metrics.rs: checks /metrics and dashboards/alerts.yml; the server scrapes a cluster in tests/operations.rs
  # the cgroup v2 VM test (deploy/vm-test.sh, run by deploy/test.sh --vm)
  qemu-system-x86   # qemu-system-x86_64 boots the guest (KVM when usable, else TCG)
  linux-image-amd64 # Debian's own kernel (and its 9p/virtio/overlay modules) for the guest
  busybox-static    # the guest's initramfs: a libc-free shell, insmod, mount, switch_root
)

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
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not on PATH; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
