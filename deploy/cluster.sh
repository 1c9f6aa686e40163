#!/usr/bin/env bash
# A local multi-node Roost cluster on one machine: etcd, N agents as separate nodes, M proxies,
# and K sample sites of two users. Prints what to try; Ctrl-C (or SIGTERM) stops everything
# and removes what it made: no process, network namespace, veth, bridge or temp dir is left.
#
#   deploy/cluster.sh [--agents N] [--proxies M] [--sites K] [--port-base P] [--lease-ttl S]
#                     [--state-file FILE] [--run-dir DIR] [--bin-dir DIR] [--no-build] [--no-netns]
#
# Each agent is a node with an address of its own:
#   by default: a network namespace per agent, joined by a veth pair to a bridge on a private
#              /24 (10.213.X.0/24, X picked free); the agent listens inside its namespace on
#              10.213.X.(10+i), and reaches etcd on the bridge's 10.213.X.1. Killing a node's
#              agent then looks to the proxies like a machine going away.
#   otherwise: 127.0.0.(10+i) (one loopback address per agent): with --no-netns, or where
#              namespaces can't be made (a container without CAP_NET_ADMIN).
# It runs as root, as roost-agent must (it starts each site as the site's user).
# Proxies listen on 127.0.0.1: port-base+10+2i (HTTP) and +11+2i (admin); etcd on port-base.
#
# While it runs:  kill -USR1 <launcher pid>   adds a node (it joins the placement at once)
#                 kill -KILL <agent pid>      a node dies (its lease expires after --lease-ttl)
#                 kill -TERM <agent pid>      a node drains and leaves
# (A script that starts it in the background must stop it with SIGTERM: bash ignores SIGINT
# in background jobs of non-interactive shells.)
# --run-dir DIR puts logs, agents' state and sites there and keeps it (default: a temp dir,
# removed on exit). --bin-dir DIR: the binaries (default target/debug, built unless --no-build).
# --state-file FILE gets JSON (rewritten on each change, "ready": true once everything
# answers): every process's pid and addresses, for scripts and the integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

agents=3
proxies=2
sites=4
port_base=24000
lease_ttl=5
state_file=
run_dir=
bin_dir=
build=1
use_netns=1

usage() { sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case $1 in
    --agents) agents=$2; shift 2 ;;
    --proxies) proxies=$2; shift 2 ;;
    --sites) sites=$2; shift 2 ;;
    --port-base) port_base=$2; shift 2 ;;
    --lease-ttl) lease_ttl=$2; shift 2 ;;
    --state-file) state_file=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --no-netns) use_netns=0; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for n in agents proxies sites port_base lease_ttl; do
  [[ ${!n} =~ ^[0-9]+$ ]] || { echo "error: --${n//_/-} must be a number, not '${!n}'" >&2; exit 2; }
done
((agents >= 1 && agents <= 200)) || { echo "error: --agents must be 1..200" >&2; exit 2; }
((proxies >= 1 && proxies <= 20)) || { echo "error: --proxies must be 1..20" >&2; exit 2; }
if [ "$(id -u)" -ne 0 ]; then
  echo "error: the cluster needs root (roost-agent starts each site as its own user); run: sudo $0" >&2
  exit 1
fi
# Namespaces need CAP_NET_ADMIN and iproute2: try one, else fall back to loopback addresses.
if ((use_netns)); then
  probe="roost-probe-$$"
  if ip netns add "$probe" 2>/dev/null &&
    ip link add "rp$$" type veth peer name eth0 netns "$probe" 2>/dev/null; then
    ip netns del "$probe" # and with it the veth pair
  else
    ip netns del "$probe" 2>/dev/null || true
    echo "note: cannot create network namespaces here; agents get 127.0.0.x addresses instead" >&2
    use_netns=0
  fi
fi

if ((build)); then
  echo "building the binaries (cargo build --bins)..."
  cargo build --bins
fi
bin_dir=${bin_dir:-$repo/target/debug}
for b in roost-agent roost-proxy roostctl; do
  [ -x "$bin_dir/$b" ] || { echo "error: $bin_dir/$b is missing; build first (cargo build --bins)" >&2; exit 1; }
done

# --- everything made below is recorded here, and removed in reverse by cleanup --------------
tag=$(printf '%04x' $(($$ % 65536)))   # names unique per launcher: several may run at once
made_run_dir=0
if [ -z "$run_dir" ]; then
  run_dir=$(mktemp -d /tmp/roost-cluster.XXXXXX)
  made_run_dir=1
else
  mkdir -p "$run_dir"
fi
chmod 755 "$run_dir"
etcd_pid=
proxy_pids=()
agent_pids=()
agent_ids=()
agent_addrs=()
agent_nets=()   # namespace per agent ("" without netns)
bridge=
subnet=
ready=false
stopping=0
sleeper=

ETCD="http://127.0.0.1:$port_base"

write_state() {
  [ -n "$state_file" ] || return 0
  local i sep tmp="$state_file.tmp.$$"
  {
    printf '{\n  "launcher_pid": %d,\n  "ready": %s,\n  "netns": %s,\n' $$ "$ready" \
      "$([ "$use_netns" = 1 ] && echo true || echo false)"
    printf '  "run_dir": "%s",\n  "bin_dir": "%s",\n  "etcd": "%s",\n  "etcd_pid": %s,\n' \
      "$run_dir" "$bin_dir" "$ETCD" "${etcd_pid:-null}"
    printf '  "secret_file": "%s",\n  "lease_ttl_secs": %d,\n  "bridge": %s,\n  "subnet": %s,\n' \
      "$run_dir/secret" "$lease_ttl" "$(json_str "$bridge")" "$(json_str "$subnet")"
    printf '  "proxies": ['
    sep=
    for i in "${!proxy_pids[@]}"; do
      printf '%s\n    {"listen": "127.0.0.1:%d", "admin": "127.0.0.1:%d", "pid": %d, "log": "%s"}' \
        "$sep" $((port_base + 10 + 2 * i)) $((port_base + 11 + 2 * i)) "${proxy_pids[i]}" "$run_dir/proxy-$((i + 1)).log"
      sep=,
    done
    printf '\n  ],\n  "agents": ['
    sep=
    for i in "${!agent_pids[@]}"; do
      printf '%s\n    {"id": "%s", "listen": "%s:7100", "admin": "%s:7101", "pid": %d, "netns": %s, "veth": %s, "state_dir": "%s", "log": "%s"}' \
        "$sep" "${agent_ids[i]}" "${agent_addrs[i]}" "${agent_addrs[i]}" "${agent_pids[i]}" \
        "$(json_str "${agent_nets[i]}")" "$(json_str "$(veth_of "${agent_nets[i]}")")" \
        "$run_dir/${agent_ids[i]}" "$run_dir/${agent_ids[i]}.log"
      sep=,
    done
    printf '\n  ]\n}\n'
  } >"$tmp"
  mv -f "$tmp" "$state_file"
}
json_str() { if [ -n "$1" ]; then printf '"%s"' "$1"; else printf null; fi; }
veth_of() { [ -n "$1" ] && printf 'rv%s%s' "$tag" "${1##*-n}"; }

# Kill every process still inside a namespace or working in the run dir (site workers of an
# agent that was SIGKILLed: they get SIGTERM from the kernel, but may not be gone yet).
kill_leftovers() {
  local ns pid cwd
  for ns in "${agent_nets[@]}"; do
    [ -n "$ns" ] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
  for pid in $(ls /proc | grep -E '^[0-9]+$'); do
    cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || continue
    case $cwd in "$run_dir" | "$run_dir"/*) kill -KILL "$pid" 2>/dev/null || true ;; esac
  done
}

cleanup() { # exit status
  local rc=$1
  trap - INT TERM EXIT USR1
  ((stopping)) && return
  stopping=1
  [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null || true
  echo
  echo "stopping the cluster (proxies, then agents drain their workers, then etcd)..."
  local pid ns
  for pid in "${proxy_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${proxy_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for pid in "${agent_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${agent_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$etcd_pid" ]; then kill -TERM "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  kill_leftovers
  # The veth pair first, by its host end: the kernel tears a deleted namespace (and its
  # end of the pair) down later, on a workqueue, so "nothing left behind" would not yet be
  # true when this script says so.
  for ns in "${agent_nets[@]}"; do
    [ -n "$ns" ] || continue
    ip link del "$(veth_of "$ns")" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || echo "warning: could not delete netns $ns" >&2
  done
  [ -z "$bridge" ] || ip link del "$bridge" 2>/dev/null || true
  if ((made_run_dir)); then rm -rf "$run_dir"; fi
  [ -z "$state_file" ] || rm -f "$state_file"
  echo "stopped; nothing left behind."
  exit "$rc"
}
trap 'cleanup 0' INT TERM
trap 'cleanup $?' EXIT
# Nodes asked for with SIGUSR1 are added by the main loop, not inside the handler.
nodes_asked=0
trap 'nodes_asked=$((nodes_asked + 1))' USR1

fail() {
  echo "error: $*" >&2
  for f in "$run_dir"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }; done
  exit 1
}

wait_for() { # url, what, pid of the server
  local _
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || fail "$2 exited before it answered at $1"
    sleep 0.1
  done
  fail "$2 did not come up at $1"
}

# Refuse ports something else already listens on, before starting anything.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$port_base" $((port_base + 1)) $(seq $((port_base + 10)) $((port_base + 9 + 2 * proxies))); do
  if port_in_use "$p"; then
    echo "error: port $p is in use; choose other ports with --port-base (now $port_base)" >&2
    exit 1
  fi
done

# --- the network: a bridge on a free private /24, one namespace + veth per agent --------------
setup_bridge() {
  local x
  # Parallel launchers pick different subnets: a lock on this script itself, so no lock
  # file is left behind.
  exec 9<"$repo/deploy/cluster.sh"
  flock 9
  for x in $(seq 1 254); do
    if ! ip -4 addr show | grep -q "inet 10\.213\.$x\."; then
      subnet="10.213.$x"
      bridge="rb$tag"
      ip link add "$bridge" type bridge
      ip addr add "$subnet.1/24" dev "$bridge"
      ip link set "$bridge" up
      break
    fi
  done
  flock -u 9
  exec 9>&-
  [ -n "$subnet" ] || fail "no free 10.213.X.0/24 for the cluster's bridge"
}

# Start agent number $1 (1-based) as node-$1.
start_agent() {
  local n=$1 id="node-$1" addr ns="" veth
  if ((use_netns)); then
    ((n <= 240)) || fail "at most 240 agents fit in the /24"
    addr="$subnet.$((10 + n))"
    ns="roost-$tag-n$n"
    veth="rv$tag$n"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$bridge" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  else
    addr="127.0.0.$((10 + n))"
  fi
  local etcd_for_agent=$ETCD
  ((use_netns)) && etcd_for_agent="http://$subnet.1:$port_base"
  mkdir -p "$run_dir/$id"
  cat >"$run_dir/$id.toml" <<TOML
lease_ttl_secs = $lease_ttl
stop_grace_secs = 5
TOML
  local cmd=("$bin_dir/roost-agent" --etcd "$etcd_for_agent" --node-id "$id"
    --listen "$addr:7100" --admin "$addr:7101" --state-dir "$run_dir/$id"
    --secret-file "$run_dir/secret" --config "$run_dir/$id.toml")
  # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup tree.
  if ((use_netns)); then
    RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 setsid nsenter --net="/run/netns/$ns" "${cmd[@]}" >"$run_dir/$id.log" 2>&1 &
  else
    RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 setsid "${cmd[@]}" >"$run_dir/$id.log" 2>&1 &
  fi
  agent_pids+=($!)
  agent_ids+=("$id")
  agent_addrs+=("$addr")
  agent_nets+=("$ns")
  write_state
}

add_node() {
  local n=$((${#agent_pids[@]} + 1))
  echo "adding node-$n..."
  ready=false
  start_agent "$n"
  wait_for "http://${agent_addrs[n - 1]}:7101/readyz" "node-$n" "${agent_pids[n - 1]}"
  ready=true
  write_state
  echo "node-$n is up at ${agent_addrs[n - 1]}:7100 (pid ${agent_pids[n - 1]})"
}

# --- start ------------------------------------------------------------------------------------
((use_netns)) && setup_bridge
write_state

etcd_urls=$ETCD
((use_netns)) && etcd_urls="$ETCD,http://$subnet.1:$port_base"
echo "starting etcd on $etcd_urls"
# Each server runs in a session of its own (setsid): a Ctrl-C reaches only this script, which
# then stops them in order instead of all at once.
setsid etcd --name roost-cluster --data-dir "$run_dir/etcd" \
  --listen-client-urls "$etcd_urls" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$((port_base + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((port_base + 1))" \
  --initial-cluster "roost-cluster=http://127.0.0.1:$((port_base + 1))" \
  >"$run_dir/etcd.log" 2>&1 &
etcd_pid=$!
write_state
wait_for "$ETCD/health" etcd "$etcd_pid"

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$run_dir/secret"
chmod 600 "$run_dir/secret"

for ((n = 1; n <= agents; n++)); do start_agent "$n"; done
echo "started $agents agents: ${agent_addrs[*]}"
for ((i = 0; i < proxies; i++)); do
  RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 setsid "$bin_dir/roost-proxy" --etcd "$ETCD" \
    --listen "127.0.0.1:$((port_base + 10 + 2 * i))" --admin "127.0.0.1:$((port_base + 11 + 2 * i))" \
    --secret-file "$run_dir/secret" >"$run_dir/proxy-$((i + 1)).log" 2>&1 &
  proxy_pids+=($!)
done
write_state
for i in "${!agent_addrs[@]}"; do wait_for "http://${agent_addrs[i]}:7101/readyz" "${agent_ids[i]}" "${agent_pids[i]}"; done
for ((i = 0; i < proxies; i++)); do wait_for "http://127.0.0.1:$((port_base + 11 + 2 * i))/readyz" "proxy $((i + 1))" "${proxy_pids[i]}"; done

# --- sample sites: two users, K sites alternating between them --------------------------------
ctl=("$bin_dir/roostctl" --etcd "$ETCD")
if ((sites > 0)); then
  echo "registering $sites sites of two users..."
  for who in alice bob; do
    user="roost-demo-$who"
    uid=$(id -u "$user" 2>/dev/null || echo none)
    if [ "$uid" != none ] && [ "$uid" -lt 1000 ]; then userdel "$user"; uid=none; fi
    if [ "$uid" = none ]; then
      useradd --create-home --shell /usr/sbin/nologin "$user" 2>/dev/null || id -u "$user" >/dev/null ||
        fail "cannot create user $user"
    fi
    dir="$run_dir/sites/$who"
    mkdir -p "$dir"
    chmod 755 "$run_dir/sites"
    sed "s/__WHO__/$who/" "$repo/deploy/demo-app.py" >"$dir/app.py"
    chown -R "$user:" "$dir"
    chmod 750 "$dir"
  done
  for ((s = 1; s <= sites; s++)); do
    who=alice
    ((s % 2)) || who=bob
    "${ctl[@]}" site add "$(printf 'site-%03d.localhost' "$s")" --user "roost-demo-$who" \
      --app app:application --dir "$run_dir/sites/$who" --idle-timeout 600 >/dev/null
  done
fi
ready=true
write_state

p1=$((port_base + 10))
cat <<MSG

Roost cluster is running: etcd, $agents agents (nodes), $proxies proxies, $sites sites.
$(if ((use_netns)); then echo "Each agent is in its own network namespace (roost-$tag-nN) on $subnet.0/24."; else echo "Each agent listens on its own loopback address (127.0.0.11, .12, ...)."; fi)

  curl -H 'Host: site-001.localhost' http://127.0.0.1:$p1/    # through proxy 1 (of $proxies: ports $p1, $((p1 + 2)), ...)
  ${ctl[*]} where site-001.localhost    # which node serves it, and the fallbacks in order
  ${ctl[*]} node ls                     # the live nodes
  ${ctl[*]} site ls                     # every site and its node

  nodes:
$(for i in "${!agent_pids[@]}"; do echo "    ${agent_ids[i]}  ${agent_addrs[i]}:7100  admin http://${agent_addrs[i]}:7101/metrics  pid ${agent_pids[i]}"; done)
  proxies:
$(for i in "${!proxy_pids[@]}"; do echo "    http://127.0.0.1:$((port_base + 10 + 2 * i))  admin http://127.0.0.1:$((port_base + 11 + 2 * i))/metrics  pid ${proxy_pids[i]}"; done)

  kill -KILL <agent pid>    # a node dies: its sites move once its lease (${lease_ttl}s) expires;
                            # the proxies fail over to the next node of the ranking at once
  kill -TERM <agent pid>    # a node drains and leaves, without failing a request
  kill -USR1 $$         # a new node joins; about 1/(N+1) of the sites move to it

Logs: $run_dir/*.log, site output: $run_dir/node-*/logs/
Press Ctrl-C to stop (everything this started is stopped and removed).
MSG

# Wait for signals; a node dying is part of the trial, so keep running until told to stop.
while :; do
  while ((nodes_asked > 0)); do
    nodes_asked=$((nodes_asked - 1))
    add_node
  done
  sleep 1 &
  sleeper=$!
  wait "$sleeper" || true
  sleeper=
  if ! kill -0 "$etcd_pid" 2>/dev/null; then fail "etcd exited; see $run_dir/etcd.log"; fi
done
