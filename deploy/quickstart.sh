#!/usr/bin/env bash
# The one-command quickstart: installs what a fresh Debian machine lacks,
# starts the single-host stack (Redis with AOF fsync-always, ipam, and the
# per-hypervisor daemons) on loopback, and walks through the IPAM demo.
#   bash deploy/quickstart.sh up     start everything and run the demo
#   bash deploy/quickstart.sh down   stop what `up` started (by PID) and remove .run/
# Nothing here touches the machine's network: every listener is on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="$PWD/.run"
REDIS_PORT="${MICROVPC_REDIS_PORT:-6390}"
HOSTNS=mvpcqs-host
export MICROVPC_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
export MICROVPC_SERVER="127.0.0.1:7401"
mvpc() { printf "\n\033[1m$ microvpc %s\033[0m\n" "$*"; node bin/microvpc.js "$@"; }

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
}

start() { # name, command...
  local name=$1; shift
  "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

wait_healthy() { # port
  for _ in $(seq 1 100); do
    if node -e "
      const net=require('net');const s=net.connect($1,'127.0.0.1',()=>{s.end();process.exit(0)});s.on('error',()=>process.exit(1));" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "service on port $1 did not come up; see $RUN/*.log" >&2; return 1
}

up() {
  install_missing
  if [ -d "$RUN" ]; then down; fi
  mkdir -p "$RUN/redis"
  trap 'echo "interrupted: stopping"; down; exit 130' INT TERM
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN/redis" --save "" \
    --appendonly yes --appendfsync always --daemonize no
  wait_healthy "$REDIS_PORT"
  # The simulated hypervisor's own namespace: the gateway programs NAT and
  # the metadata server there, never in this machine's namespace.
  ip netns add "$HOSTNS"
  export MICROVPC_HOST_ID=qs MICROVPC_HOST_NETNS="$HOSTNS" MICROVPC_UPLINK=lo
  local port=7401
  for svc in ipam netagent firewall gateway vmm; do
    start "$svc" node bin/microvpcd.js "$svc" --listen "127.0.0.1:$port"
    wait_healthy "$port"
    port=$((port + 1))
  done
  trap - INT TERM
  echo "stack up: redis :$REDIS_PORT, ipam :7401, netagent :7402, firewall :7403, gateway :7404, vmm :7405 (metrics on +2000)"
  demo
}

demo() {
  mvpc vpc create blog --cidr 10.0.0.0/16 --description "vpcctl tutorial: a blog"
  mvpc subnet create web --vpc blog --cidr 10.0.1.0/24 --type public
  mvpc subnet create db --vpc blog --cidr 10.0.2.0/24 --type private
  mvpc ip allocate --subnet web --vpc blog --owner vm-web-1 --request-id demo-web-1
  mvpc ip allocate --subnet db --vpc blog --owner vm-db-1 --request-id demo-db-1
  mvpc ip allocate --subnet db --vpc blog --owner vm-db-1 --request-id demo-db-1   # retry: same address
  mvpc subnet list --vpc blog
  mvpc ip list --owner vm-db-1
  mvpc ip usage --subnet web --vpc blog
  mvpc vpc delete blog || true   # refused: it still has subnets
  echo
  echo "try: npx buf curl --protocol grpc --http2-prior-knowledge --list-services http://127.0.0.1:7401"
  echo "     node bin/microvpc.js --help        (CLI)     bash deploy/quickstart.sh down   (stop)"
}

down() {
  [ -d "$RUN" ] || { echo "nothing running"; return 0; }
  for f in "$RUN"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
  done
  sleep 0.5
  for f in "$RUN"/*.pid; do
    [ -e "$f" ] || continue
    kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  rm -rf "$RUN"
  ip netns del "$HOSTNS" 2>/dev/null || true
  for ns in $(ip netns list | awk '{print $1}' | grep '^mvpc-qs-' || true); do ip netns del "$ns"; done
  echo "stopped"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  demo) demo ;;
  *) echo "usage: $0 up|down|demo" >&2; exit 2 ;;
esac
