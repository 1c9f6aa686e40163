#!/usr/bin/env bash
# The main job: a working single-machine Roost cluster.
#
# Installs what is missing, builds, starts etcd, one roost-agent and one roost-proxy, creates
# two unix users with one site each, registers the sites with roostctl, and prints the URLs
# to try. Ctrl-C stops everything cleanly. Run as root from the repository.
#
# Ports (override with the environment): proxy 8080, proxy admin 9090, agent 7100,
# agent admin 7101, etcd 23790. ROOST_PROFILE=release builds optimised binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "error: the demo needs root (the agent starts each site as its own user); run: sudo $0" >&2
  exit 1
fi

PROXY_PORT=${PROXY_PORT:-8080}
PROXY_ADMIN=${PROXY_ADMIN:-9090}
AGENT_PORT=${AGENT_PORT:-7100}
AGENT_ADMIN=${AGENT_ADMIN:-7101}
ETCD_PORT=${ETCD_PORT:-23790}
PROFILE=${ROOST_PROFILE:-debug}
ETCD="http://127.0.0.1:${ETCD_PORT}"

echo "[1/5] checking the system packages Roost needs (deploy/install-deps.sh)..."
deploy/install-deps.sh
echo "[2/5] building the binaries ($PROFILE; the first build compiles ~300 crates and takes several minutes)..."
if [ "$PROFILE" = release ]; then cargo build --release --bins; else cargo build --bins; fi
bin="$repo/target/$PROFILE"

run=/tmp/roost-demo
rm -rf "$run"
mkdir -p "$run"
chmod 755 "$run"
pids=()

cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping roost (agent drains its workers first)..."
  # Newest first: the proxy, then the agent (it drains and deletes its node key in etcd), then etcd.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  echo "stopped. logs were in $run"
  exit 0
}
trap cleanup INT TERM EXIT

wait_for() { # url, what
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "error: $2 did not come up; see $run/*.log" >&2
  exit 1
}

echo "[3/5] starting etcd on $ETCD"
# Each server runs in a session of its own (setsid), so a Ctrl-C reaches only this script,
# which then stops them in order instead of all at once.
setsid etcd --name roost-demo --data-dir "$run/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "roost-demo=http://127.0.0.1:$((ETCD_PORT + 1))" \
  >"$run/etcd.log" 2>&1 &
pids+=($!)
wait_for "$ETCD/health" etcd

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$run/secret"
chmod 600 "$run/secret"

echo "[4/5] starting roost-agent (node demo-1) on 127.0.0.1:$AGENT_PORT"
setsid "$bin/roost-agent" --etcd "$ETCD" --node-id demo-1 --listen "127.0.0.1:$AGENT_PORT" \
  --admin "127.0.0.1:$AGENT_ADMIN" --state-dir "$run/agent" --secret-file "$run/secret" \
  >"$run/agent.log" 2>&1 &
pids+=($!)
echo "      starting roost-proxy on 127.0.0.1:$PROXY_PORT"
setsid "$bin/roost-proxy" --etcd "$ETCD" --listen "127.0.0.1:$PROXY_PORT" \
  --admin "127.0.0.1:$PROXY_ADMIN" --secret-file "$run/secret" \
  >"$run/proxy.log" 2>&1 &
pids+=($!)
echo "      waiting for both to finish their first etcd sync..."
wait_for "http://127.0.0.1:$AGENT_ADMIN/readyz" roost-agent
wait_for "http://127.0.0.1:$PROXY_ADMIN/readyz" roost-proxy

echo "[5/5] creating two users with a site each, and registering the sites"
# Two customers, each with a site in their own directory, owned by them.
for who in alice bob; do
  user="roost-demo-$who"
  # Regular users (uid >= 1000): the agent refuses system accounts as site users
  # (min_site_uid). One made --system by an older demo is made again.
  uid=$(id -u "$user" 2>/dev/null || echo none)
  if [ "$uid" != none ] && [ "$uid" -lt 1000 ]; then userdel "$user"; uid=none; fi
  [ "$uid" != none ] || useradd --create-home --shell /usr/sbin/nologin "$user"
  dir="$run/sites/$who"
  mkdir -p "$dir"
  chmod 755 "$run/sites"
  sed "s/__WHO__/$who/" "$repo/deploy/demo-app.py" >"$dir/app.py"
  chown -R "$user:" "$dir"
  chmod 750 "$dir"
  # Only the site's user may read its code; the agent (root) starts it as that user.
  "$bin/roostctl" --etcd "$ETCD" site add "$who.localhost" --user "$user" \
    --app app:application --dir "$dir" --idle-timeout 30 >/dev/null
done

cat <<MSG

Roost is running: etcd, one proxy, one agent, two sites owned by two users.

  curl http://alice.localhost:$PROXY_PORT/          # alice's site, run as roost-demo-alice
  curl http://bob.localhost:$PROXY_PORT/            # bob's site, run as roost-demo-bob
  curl -H 'Host: nobody.localhost' http://127.0.0.1:$PROXY_PORT/   # 404: no such site

  $bin/roostctl --etcd $ETCD site ls                # the sites and where they run
  $bin/roostctl --etcd $ETCD site add carol.localhost --user roost-demo-alice \\
      --app app:application --dir $run/sites/alice  # live at once, no restart
  curl -H "x-roost-auth: \$(cat $run/secret)" http://127.0.0.1:$AGENT_ADMIN/sites  # workers on the node; idle ones stop after 30 s
  curl http://127.0.0.1:$PROXY_ADMIN/metrics        # Prometheus metrics (agent: :$AGENT_ADMIN)

Logs: $run/{proxy,agent,etcd}.log, site output: $run/agent/logs/
Press Ctrl-C to stop.
MSG

wait -n "${pids[@]}" || true
echo "a Roost process exited unexpectedly; see $run/*.log" >&2
exit 1
