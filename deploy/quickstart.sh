#!/usr/bin/env bash
# The one-command quickstart.
#   bash deploy/quickstart.sh up     install what is missing, start the single-host stack, run the demo
#   bash deploy/quickstart.sh down   stop everything `up` started and remove every namespace it made
# The stack lives in network namespaces: a simulated hypervisor ("mvpcqs-host",
# its uplink to an "internet" namespace "mvpcqs-inet"), the VPC namespaces the
# netagent makes, and the VMs. This machine's own network is never touched;
# every daemon listens on 127.0.0.1. Ctrl-C during `up` leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
# Node 24 from the npm registry when the machine's node is older.
. deploy/node.sh
RUN="$PWD/.run"
REDIS_PORT="${MICROVPC_REDIS_PORT:-6390}"
HOSTNS=mvpcqs-host
INETNS=mvpcqs-inet
HOST_ID=qs
export MICROVPC_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
export MICROVPC_SERVER=127.0.0.1:7401 MICROVPC_FIREWALL=127.0.0.1:7403 MICROVPC_GATEWAY=127.0.0.1:7404 MICROVPC_VMM=127.0.0.1:7405
export MICROVPC_DEMO_INTERNET_NS=$INETNS MICROVPC_DEMO_INTERNET_ADDR=192.168.250.200 MICROVPC_DEMO_HOST_ADDR=192.168.250.10

install_missing() {
  local missing=()
  for p in $(grep -v '^#' deploy/packages.txt); do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [ -d node_modules ] || npm ci --no-audit --no-fund
  node build.mjs >/dev/null
}

start() { # name, command...
  local name=$1; shift
  "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

wait_port() { # port
  for _ in $(seq 1 150); do
    if node -e "const s=require('net').connect($1,'127.0.0.1',()=>{s.end();process.exit(0)});s.on('error',()=>process.exit(1))" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "service on port $1 did not come up; see $RUN/*.log" >&2; return 1
}

network() {
  ip netns add "$HOSTNS"
  ip netns add "$INETNS"
  ip -n "$HOSTNS" link add up0 type veth peer name eth0 netns "$INETNS"
  ip -n "$HOSTNS" addr add 192.168.250.10/24 dev up0
  ip -n "$INETNS" addr add 192.168.250.200/24 dev eth0
  for ns in "$HOSTNS" "$INETNS"; do ip -n "$ns" link set lo up; done
  ip -n "$HOSTNS" link set up0 up
  ip -n "$INETNS" link set eth0 up
  # The internet's web server answers with the source address it sees.
  start whoami ip netns exec "$INETNS" node -e 'require("http").createServer((q,r)=>r.end(q.socket.remoteAddress.replace(/^::ffff:/,""))).listen(80)'
}

up() {
  install_missing
  down >/dev/null
  mkdir -p "$RUN/redis"
  trap 'echo; echo "interrupted: cleaning up"; down; exit 130' INT TERM
  network
  # One machine, one host: Redis's default user without a password, no
  # per-host ACL users (docs/redis-acl.md is for fleets).
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN/redis" --save "" \
    --appendonly yes --appendfsync always --daemonize no --unixsocket "$RUN/redis.sock" --unixsocketperm 700
  wait_port "$REDIS_PORT"
  local d="node bin/microvpcd.js"
  start ipam $d ipam --listen 127.0.0.1:7401
  start netagent $d netagent --listen 127.0.0.1:7402 --host-id $HOST_ID
  start firewall $d firewall --listen 127.0.0.1:7403 --host-id $HOST_ID
  start gateway $d gateway --listen 127.0.0.1:7404 --host-id $HOST_ID --host-netns "$HOSTNS" --uplink up0 \
    --public-pool 192.168.250.128/26 --imds-redis "$RUN/redis.sock"
  start vmm $d vmm --listen 127.0.0.1:7405 --host-id $HOST_ID
  for p in 7401 7402 7403 7404 7405; do wait_port $p; done
  echo "stack up: redis :$REDIS_PORT · ipam :7401 · netagent :7402 · firewall :7403 · gateway :7404 · vmm :7405 (metrics: port+2000)"
  node dist/demo.js
  trap - INT TERM
  echo
  echo "try:  node bin/microvpc.js vpc list        node bin/microvpc.js --help"
  echo "      npx buf curl --protocol grpc --http2-prior-knowledge --list-services http://127.0.0.1:7401"
  echo "stop: bash deploy/quickstart.sh down"
}

down() {
  if [ -d "$RUN" ]; then
    for f in "$RUN"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    sleep 1
    for f in "$RUN"/*.pid; do [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
  fi
  # Processes started inside the demo's namespaces (servers in VMs) go with them.
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^($HOSTNS|$INETNS|mvpc-$HOST_ID-|mvpcvm-$HOST_ID-)" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$RUN"
  echo "stopped; nothing left"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
