#!/bin/sh
# Least-privilege etcd users and roles for Roost (issue 10), then `auth enable`.
#
#   deploy/etcd/roles.sh PASSWORD_DIR NODE_ID...
#
# Creates, unless they exist:
#   root                root role; needed by etcd to turn auth on. Keep its password offline.
#   roost-proxy         reads <prefix>/ (sites, aliases, nodes, certs). Writes nothing.
#   roost-agent-<id>    reads <prefix>/sites/ and <prefix>/nodes/ (placement); writes only <prefix>/nodes/<id>, its own node key
#                       (under its lease). It can't read the TLS keys under <prefix>/certs/.
#   roost-operator      reads <prefix>/; writes sites, aliases and certs (roostctl). Not nodes.
# Each user's password goes to PASSWORD_DIR/<user>.password (mode 0600, made with
# `openssl rand` unless the file exists): give it to the component with --etcd-user and
# --etcd-password-file. A client certificate whose CN is the user name is the same user to
# etcd (--client-cert-auth), so issue each component a certificate with its own CN.
#
# etcdctl is reached through its own environment: ETCDCTL_ENDPOINTS, ETCDCTL_CACERT,
# ETCDCTL_CERT, ETCDCTL_KEY (and, once auth is on, ETCDCTL_USER=root:<password>).
# ROOST_PREFIX sets the key prefix (default /roost). Safe to run again to add nodes.
set -eu

if [ $# -lt 1 ]; then
    echo "usage: $0 PASSWORD_DIR [NODE_ID...]" >&2
    exit 2
fi
dir=$1
shift
prefix=${ROOST_PREFIX:-/roost}
prefix=${prefix%/}
export ETCDCTL_API=3
umask 077
mkdir -p "$dir"

# The password of user $1, created on first use.
password() {
    f="$dir/$1.password"
    [ -s "$f" ] || openssl rand -hex 24 >"$f"
    cat "$f"
}

# Create user $1 (password on stdin, never on a command line) unless it exists.
user() {
    if ! etcdctl user get "$1" >/dev/null 2>&1; then
        password "$1" | etcdctl user add "$1" --interactive=false >/dev/null
    fi
}

# Create role $1 unless it exists.
role() {
    etcdctl role get "$1" >/dev/null 2>&1 || etcdctl role add "$1" >/dev/null
}

user root
etcdctl user grant-role root root >/dev/null

role roost-proxy
etcdctl role grant-permission --prefix roost-proxy read "$prefix/" >/dev/null
user roost-proxy
etcdctl user grant-role roost-proxy roost-proxy >/dev/null

role roost-operator
etcdctl role grant-permission --prefix roost-operator read "$prefix/" >/dev/null
for part in sites aliases certs; do
    etcdctl role grant-permission --prefix roost-operator readwrite "$prefix/$part/" >/dev/null
done
user roost-operator
etcdctl user grant-role roost-operator roost-operator >/dev/null

for node in "$@"; do
    role "roost-agent-$node"
    etcdctl role grant-permission --prefix "roost-agent-$node" read "$prefix/sites/" >/dev/null
    # The live nodes: placement tells the agent which of its sites moved to another node.
    etcdctl role grant-permission --prefix "roost-agent-$node" read "$prefix/nodes/" >/dev/null
    # One key, not a prefix: node-1 must not be able to write node-10.
    etcdctl role grant-permission "roost-agent-$node" readwrite "$prefix/nodes/$node" >/dev/null
    user "roost-agent-$node"
    etcdctl user grant-role "roost-agent-$node" "roost-agent-$node" >/dev/null
done

etcdctl auth enable >/dev/null
echo "etcd auth enabled; passwords in $dir"
