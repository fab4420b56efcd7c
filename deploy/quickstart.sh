#!/usr/bin/env bash
# The one-command quickstart.
#   bash deploy/quickstart.sh up     install what is missing, start three simulated hypervisors, run the demo
#   bash deploy/quickstart.sh down   stop everything `up` started and remove every namespace it made
# Each simulated hypervisor is a network namespace holding its uplink
# (mvpcqs-host, mvpcqs-host2, mvpcqs-host3), with its own netagent (WireGuard
# overlay), firewall, gateway and vmm on 127.0.0.1; one ipam and one Redis
# serve all three. The uplinks and the "internet" namespace (mvpcqs-inet) share
# one underlay, a bridge in mvpcqs-ul. The demo's VPN client is a
# wireguard-go interface (mvpcqs-laptop) in mvpcqs-inet. This machine's own
# network is never touched. Ctrl-C during `up` leaves nothing behind.
#
#   host   namespace      uplink          host id  gRPC (metrics: +2000)
#   1      mvpcqs-host    192.168.250.10  qs       ipam 7401, netagent 7402, firewall 7403, gateway 7404, vmm 7405
#   2      mvpcqs-host2   192.168.250.11  qs2      netagent 7412, firewall 7413, gateway 7414, vmm 7415
#   3      mvpcqs-host3   192.168.250.12  qs3      netagent 7422, firewall 7423, gateway 7424, vmm 7425
#   the internet: mvpcqs-inet 192.168.250.200; floating IPs and NAT addresses: 192.168.250.128/26; Redis :6390
set -euo pipefail
cd "$(dirname "$0")/.."
# Node 24 from the npm registry when the machine's node is older.
. deploy/node.sh
RUN="$PWD/.run"
REDIS_PORT="${MICROVPC_REDIS_PORT:-6390}"
INETNS=mvpcqs-inet
ULNS=mvpcqs-ul
POOL=192.168.250.128/26
# What VMs never reach: the hypervisors' half of the underlay. ("auto", the
# uplink's whole /24, would take the internet at .200 with it.)
MANAGEMENT=192.168.250.0/25
# Per hypervisor: namespace, host id, uplink address, port base (gRPC base+2..base+5).
HOSTNS=(mvpcqs-host mvpcqs-host2 mvpcqs-host3)
HOST_IDS=(qs qs2 qs3)
UPLINKS=(192.168.250.10 192.168.250.11 192.168.250.12)
PORTS=(7400 7410 7420)
export MICROVPC_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
export MICROVPC_SERVER=127.0.0.1:7401 MICROVPC_FIREWALL=127.0.0.1:7403 MICROVPC_GATEWAY=127.0.0.1:7404 MICROVPC_VMM=127.0.0.1:7405
export MICROVPC_DEMO_INTERNET_NS=$INETNS MICROVPC_DEMO_INTERNET_ADDR=192.168.250.200 MICROVPC_DEMO_HOST_ADDR=192.168.250.10
# What the demo needs of hosts 2 and 3 (host 1's are the variables above).
export MICROVPC_DEMO_HOSTS="qs=127.0.0.1:7405,qs2=127.0.0.1:7415,qs3=127.0.0.1:7425"
# The demo's VPN: blog's endpoint on host 2's uplink; the client is a
# wireguard-go interface in the internet namespace, its PID in $RUN/vpn.
VPN_IF=mvpcqs-laptop
export MICROVPC_DEMO_VPN_ENDPOINT="qs2=192.168.250.11:51820" MICROVPC_DEMO_VPN_NETAGENT=127.0.0.1:7412
export MICROVPC_DEMO_VPN_IFNAME=$VPN_IF MICROVPC_DEMO_RUN_DIR="$RUN"

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
  # The underlay: a bridge joining the three uplinks and the internet.
  ip netns add "$ULNS"
  ip -n "$ULNS" link set lo up
  ip -n "$ULNS" link add br0 type bridge
  ip -n "$ULNS" link set br0 up
  ip netns add "$INETNS"
  ip -n "$INETNS" link set lo up
  ip -n "$INETNS" link add eth0 type veth peer name inet netns "$ULNS"
  ip -n "$INETNS" addr add 192.168.250.200/24 dev eth0
  ip -n "$INETNS" link set eth0 up
  ip -n "$ULNS" link set inet master br0 up
  for i in 0 1 2; do
    local ns=${HOSTNS[$i]}
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add up0 type veth peer name "hv$((i + 1))" netns "$ULNS"
    ip -n "$ns" addr add "${UPLINKS[$i]}/24" dev up0
    ip -n "$ns" link set up0 up
    ip -n "$ULNS" link set "hv$((i + 1))" master br0 up
    # A NAT gateway's address moves between hosts; its new holder announces it
    # with arping -U, which needs this (per-namespace) sysctl (docs/dataplane.md).
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_nonlocal_bind=1
  done
  # The internet's web server answers with the source address it sees.
  start whoami ip netns exec "$INETNS" node -e 'require("http").createServer((q,r)=>r.end(q.socket.remoteAddress.replace(/^::ffff:/,""))).listen(80)'
}

hypervisor() { # index (0..2): its netagent, firewall, gateway and vmm
  local i=$1 d="bin/microvpcd.js" # executed as the image runs it: its #! line carries the node flags
  local ns=${HOSTNS[$i]} id=${HOST_IDS[$i]} b=${PORTS[$i]} n=$((i + 1))
  [ "$n" = 1 ] && n=""
  local on="--host-id $id"
  start "netagent$n" $d netagent --listen 127.0.0.1:$((b + 2)) --metrics-listen 127.0.0.1:$((b + 2002)) $on \
    --overlay --host-netns "$ns" --underlay-interface up0 --wireguard wireguard-go --state-dir "$RUN/state"
  start "firewall$n" $d firewall --listen 127.0.0.1:$((b + 3)) --metrics-listen 127.0.0.1:$((b + 2003)) $on \
    --flow-logs "$RUN/flow-logs"
  start "gateway$n" $d gateway --listen 127.0.0.1:$((b + 4)) --metrics-listen 127.0.0.1:$((b + 2004)) $on \
    --host-netns "$ns" --uplink up0 --public-pool "$POOL" --imds-redis "$RUN/redis.sock" --management-cidrs "$MANAGEMENT"
  start "vmm$n" $d vmm --listen 127.0.0.1:$((b + 5)) --metrics-listen 127.0.0.1:$((b + 2005)) $on \
    --netagent 127.0.0.1:$((b + 2)) --firewall 127.0.0.1:$((b + 3)) --gateway 127.0.0.1:$((b + 4))
}

up() {
  install_missing
  down >/dev/null
  mkdir -p "$RUN/redis" "$RUN/state"
  trap 'echo; echo "interrupted: cleaning up"; down; exit 130' INT TERM
  local t0=$SECONDS
  network
  # One machine: Redis's default user without a password, no per-host ACL
  # users (docs/redis-acl.md is for fleets).
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$RUN/redis" --save "" \
    --appendonly yes --appendfsync always --daemonize no --unixsocket "$RUN/redis.sock" --unixsocketperm 700
  wait_port "$REDIS_PORT"
  start ipam bin/microvpcd.js ipam --listen 127.0.0.1:7401
  for i in 0 1 2; do hypervisor $i; done
  for b in "${PORTS[@]}"; do for k in 2 3 4 5; do wait_port $((b + k)); done; done
  wait_port 7401
  echo "stack up in $((SECONDS - t0)) s: redis :$REDIS_PORT · ipam :7401"
  for i in 0 1 2; do
    local b=${PORTS[$i]}
    echo "  hypervisor $((i + 1)) ${HOSTNS[$i]} (${HOST_IDS[$i]}, uplink ${UPLINKS[$i]}): netagent :$((b + 2)) · firewall :$((b + 3)) · gateway :$((b + 4)) · vmm :$((b + 5)) (metrics: port+2000)"
  done
  if ! node dist/demo.js; then
    trap - INT TERM
    echo "the demo failed; the stack is left up to look at (logs: $RUN/*.log). stop: bash deploy/quickstart.sh down" >&2
    return 1
  fi
  trap - INT TERM
  echo
  echo "up and demo took $((SECONDS - t0)) s"
  echo "try:  node bin/microvpc.js vpc list        node bin/microvpc.js --help"
  echo "      npx buf curl --protocol grpc --http2-prior-knowledge --list-services http://127.0.0.1:7401"
  echo "stop: bash deploy/quickstart.sh down"
}

# wireguard-go runs in a host namespace, but its control socket
# /var/run/wireguard/<if>.sock is global: end each one the netagents
# recorded — the overlay's (state/HOST/wg) and the VPN endpoints'
# (state/HOST/vpn/wg) — and the demo's VPN client (vpn/IF.pid), by PID if it
# still is that wireguard-go, and remove its socket.
stop_wireguard() {
  local f ifname pid
  for f in "$RUN"/state/*/wg/wg*.pid "$RUN"/state/*/vpn/wg/wg*.pid "$RUN"/vpn/*.pid; do
    [ -e "$f" ] || continue
    ifname=$(basename "$f" .pid)
    pid=$(grep -o '"pid": *[0-9]*' "$f" | grep -o '[0-9]*$' || grep -xo '[0-9]*' "$f" || true)
    if [ -n "$pid" ] && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qx "$ifname"; then kill -9 "$pid" 2>/dev/null || true; fi
    rm -f "/var/run/wireguard/$ifname.sock"
  done
  # The client's socket even if up was interrupted before its PID was written.
  rm -f "/var/run/wireguard/$VPN_IF.sock"
  ip -n "$INETNS" link del "$VPN_IF" 2>/dev/null || true
}

down() {
  if [ -d "$RUN" ]; then
    for f in "$RUN"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
    sleep 1
    for f in "$RUN"/*.pid; do [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    stop_wireguard
  fi
  # Processes started inside the demo's namespaces (servers in VMs, wireguard-go) go with them.
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^(mvpcqs-(host|host2|host3|inet|ul)|mvpc-qs[23]?-.*|mvpcvm-qs[23]?-.*)$" || true); do
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
