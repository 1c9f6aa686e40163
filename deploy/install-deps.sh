#!/usr/bin/env bash
# Install the system packages Roost needs to build, test and run, if any are missing.
# Debian/Ubuntu, as root. Safe to run again: it installs nothing when all are present.
set -euo pipefail

packages=(
  cmake             # pingora builds zlib-ng with it
  protobuf-compiler # etcd-client compiles etcd's protobufs
  etcd-server       # the cluster's store (3.4, v3 API)
  etcd-client       # etcdctl, used by the tests and handy for operators
  python3           # workers default to the system interpreter, /usr/bin/python3
  python3-gunicorn  # the WSGI server the workers run
  curl
  pkg-config        # openssl-sys finds the system OpenSSL with it
  libssl-dev        # roost-proxy terminates TLS with pingora's openssl backend
  openssl           # the tests make certificates and check handshakes with it
  passwd            # useradd, for the demo's and tests' site users
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
