#!/usr/bin/env bash
# The sample mesh as if across hosts: each workload (a `halyard sample-app` and its `halyard
# sidecar`) in its own network namespace, joined by veth pairs to a bridge that lives in a
# namespace of its own; transparent capture (`halyard iptables install`) in every workload
# namespace. Nothing is configured in the root namespace. Identities as in production: an
# offline root signs the CA server's intermediate; the CA server (`halyard ca serve`) runs in the
# bridge namespace; each sidecar makes its own key and enrolls with a one-use bootstrap token.
#
#   sudo deploy/lab/lab.sh up       # namespaces, CA server, registry, processes; waits until ready
#   sudo deploy/lab/lab.sh status   # namespaces, addresses, processes, readiness
#   sudo deploy/lab/lab.sh curl     # one page from the client namespace, through the mesh
#   sudo deploy/lab/lab.sh down     # stops everything and deletes every namespace it made
#
# Environment: HALYARD (binary; default target/release/halyard, else target/debug/halyard),
# LAB_PREFIX (namespace and link name prefix, default hlab), LAB_DIR (state, default
# /tmp/halyard-lab-$LAB_PREFIX), LAB_NET (first three octets of the bridge subnet, default 10.213.0).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
PREFIX=${LAB_PREFIX:-hlab}
DIR=${LAB_DIR:-/tmp/halyard-lab-$PREFIX}
NET=${LAB_NET:-10.213.0}
if [ -z "${HALYARD:-}" ]; then
  HALYARD=$repo/target/release/halyard
  [ -x "$HALYARD" ] || HALYARD=$repo/target/debug/halyard
fi
BRNS=$PREFIX-br

# name  service  version  host-octet  app-port  calls (service=port,...)
WORKLOADS=(
  "client      client      v1  9   -     productpage=9080"
  "productpage productpage v1  10  9080  details=9081,reviews=9082"
  "details     details     v1  11  9081  -"
  "reviews-v1  reviews     v1  12  9082  -"
  "reviews-v2  reviews     v2  13  9082  ratings=9083"
  "reviews-v3  reviews     v3  14  9082  ratings=9083"
  "ratings     ratings     v1  15  9083  -"
)
# Virtual IPs the apps call; transparent capture maps them to services.
declare -A VIP=([productpage]=240.240.0.10 [details]=240.240.0.11 [reviews]=240.240.0.12 [ratings]=240.240.0.13)

say() { printf 'lab: %s\n' "$*"; }
die() { printf 'lab: %s\n' "$*" >&2; exit 1; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

need() {
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces and iptables): sudo $0 $*"
  for t in ip iptables; do command -v $t >/dev/null || die "$t not found (make deps)"; done
  [ -x "$HALYARD" ] || die "no halyard binary at $HALYARD (cargo build --release --bin halyard)"
}

registry_objects() {
  cat <<EOF
kind: MeshConfig
defaultPolicy: allow
trustDomain: mesh.local
EOF
  local svc port
  for svc in productpage details reviews ratings; do
    case $svc in productpage) port=9080;; details) port=9081;; reviews) port=9082;; ratings) port=9083;; esac
    printf -- '---\nkind: Service\nname: %s\nvip: %s\nports:\n  - { name: http, port: %s, protocol: http, targetPort: %s }\n' \
      "$svc" "${VIP[$svc]}" "$port" "$port"
  done
  printf -- '---\nkind: Route\nservice: reviews\nrules:\n  - backends:\n'
  printf '      - { subset: { version: v1 }, weight: 50 }\n      - { subset: { version: v2 }, weight: 25 }\n'
  printf '      - { subset: { version: v3 }, weight: 25 }\n'
}

sidecar_config() { # name service version octet calls
  local name=$1 svc=$2 ver=$3 octet=$4
  cat <<EOF
mesh = "default"
registry = "file://$DIR/registry"
state_dir = "$DIR/state/$name"
id = "$name"

[identity]
cert = "$DIR/id/$name/cert.pem"
key = "$DIR/id/$name/key.pem"
bundle = "$DIR/id/$name/bundle.pem"
ca = "$NET.1:15012"
token = "$DIR/id/$name/token"
id = "spiffe://mesh.local/ns/default/sa/$svc"

[service]
name = "$svc"
version = "$ver"

[inbound]
listen = "$NET.$octet:15443"
app_host = "127.0.0.1"

[outbound.transparent]
listen = "127.0.0.1:15001"

[admin]
listen = "127.0.0.1:15000"

[failure]
drain_timeout = "2s"
EOF
}

make_bridge() {
  ip netns add "$BRNS"
  nsx "$BRNS" ip link set lo up
  nsx "$BRNS" ip link add br0 type bridge
  nsx "$BRNS" ip addr add "$NET.1/24" dev br0
  nsx "$BRNS" ip link set br0 up
}

make_workload_ns() { # index name octet
  local i=$1 name=$2 octet=$3 ns=$PREFIX-$2
  ip netns add "$ns"
  nsx "$ns" ip link set lo up
  # Both ends are created inside the bridge namespace, then one moves: nothing touches the root.
  nsx "$BRNS" ip link add "${PREFIX}v$i" type veth peer name "${PREFIX}p$i"
  nsx "$BRNS" ip link set "${PREFIX}p$i" netns "$ns"
  nsx "$BRNS" ip link set "${PREFIX}v$i" master br0 up
  nsx "$ns" ip link set "${PREFIX}p$i" name eth0
  nsx "$ns" ip addr add "$NET.$octet/24" dev eth0
  nsx "$ns" ip link set eth0 up
  nsx "$ns" ip route add default via "$NET.1"
}

start_bg() { # ns logname args...
  local ns=$1 log=$2; shift 2
  # `ip netns exec` execs the command: $! is the halyard process itself.
  ip netns exec "$ns" "$@" >"$DIR/logs/$log.log" 2>&1 &
  echo $! >>"$DIR/pids"
}

start_ca() { # the offline root, the CA server's intermediate, the CA server in the bridge namespace
  say "CA server on $NET.1:15012 (offline root in $DIR/root)"
  "$HALYARD" ca init --dir "$DIR/root" --trust-domain mesh.local --force >/dev/null
  "$HALYARD" ca intermediate --root "$DIR/root" --out "$DIR/ca1" --ttl 720h --force >/dev/null
  cat >"$DIR/ca.toml" <<EOF
listen = "$NET.1:15012"
dir = "ca1"
registry = "file://$DIR/registry"
mesh = "default"
leaf_ttl = "24h"
EOF
  start_bg "$BRNS" ca "$HALYARD" ca serve --config "$DIR/ca.toml"
  local i
  for i in $(seq 1 100); do
    grep -q "CA listening" "$DIR/logs/ca.log" 2>/dev/null && return 0
    sleep 0.1
  done
  die "CA server not listening; see $DIR/logs/ca.log"
}

enroll_token() { # name service: a one-use token for the workload's id, and the root to trust
  mkdir -p "$DIR/id/$1"
  "$HALYARD" ca token create --id "spiffe://mesh.local/ns/default/sa/$2" \
    --registry "file://$DIR/registry" --ttl 10m --uses 1 --out "$DIR/id/$1/token" 2>/dev/null
  cp "$DIR/root/ca.crt" "$DIR/id/$1/bundle.pem"
}

app_args() { # svc ver port calls
  local svc=$1 ver=$2 port=$3 calls=$4 c s p
  printf '%s\n' sample-app --service "$svc" --version "$ver" --listen "127.0.0.1:$port"
  [ "$calls" = - ] && return 0
  IFS=, read -ra c <<<"$calls"
  for x in "${c[@]}"; do
    s=${x%%=*} p=${x##*=}
    printf '%s\n' --call "$s=http://${VIP[$s]}:$p/$s"
  done
}

http_get() { # ns host port path [header]: prints the response, over bash's /dev/tcp
  local ns=$1 host=$2 port=$3 path=$4 header=${5:-}
  nsx "$ns" timeout 10 bash -c '
    exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "GET %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n" "$2" "$0" "$3" >&3
    cat <&3' "$host" "$port" "$path" "${header:+$header$'\r\n'}"
}

wait_ready() { # ns
  local i
  for i in $(seq 1 100); do
    http_get "$1" 127.0.0.1 15000 /readyz 2>/dev/null | head -1 | grep -q ' 200' && return 0
    sleep 0.1
  done
  die "$1: sidecar not ready; see $DIR/logs"
}

up() {
  need up
  ip netns list | grep -q "^$BRNS\b" && die "already up (lab.sh down first)"
  mkdir -p "$DIR"/{logs,state,id}
  : >"$DIR/pids"
  mkdir -p "$DIR/registry/default"
  registry_objects | "$HALYARD" ctl --registry "file://$DIR/registry" apply -f - >/dev/null
  make_bridge
  start_ca
  local i=0 name svc ver octet port calls ns
  for w in "${WORKLOADS[@]}"; do
    read -r name svc ver octet port calls <<<"$w"
    i=$((i + 1)); ns=$PREFIX-$name
    make_workload_ns "$i" "$name" "$octet"
    # The sidecar's own calls to the CA (15012/tcp) are not the app's: never captured.
    nsx "$ns" "$HALYARD" iptables install --capture-port 15001 --exclude-ports 15012 >/dev/null
    enroll_token "$name" "$svc"
    sidecar_config "$name" "$svc" "$ver" "$octet" >"$DIR/$name.toml"
    start_bg "$ns" "$name-sidecar" "$HALYARD" sidecar --config "$DIR/$name.toml"
    if [ "$port" != - ]; then
      mapfile -t args < <(app_args "$svc" "$ver" "$port" "$calls")
      start_bg "$ns" "$name-app" "$HALYARD" "${args[@]}"
    fi
    say "$ns: $NET.$octet, $svc $ver"
  done
  for w in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$w"
    wait_ready "$PREFIX-$name"
  done
  say "up: try 'lab.sh curl'"
}

curl_page() {
  need curl
  local user=${1:-reader} i out
  for i in $(seq 1 50); do
    out=$(http_get "$PREFIX-client" "${VIP[productpage]}" 9080 /productpage "x-user: $user" 2>/dev/null || true)
    if printf '%s' "$out" | head -1 | grep -q ' 200' && ! printf '%s' "$out" | grep -q '"error"'; then
      printf '%s\n' "$out"
      return 0
    fi
    sleep 0.2
  done
  printf '%s\n' "$out"
  die "no whole page from productpage (see $DIR/logs)"
}

status() {
  local w name ns
  ip netns list | grep -q "^$BRNS\b" || { say "down"; return 0; }
  for w in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$w"; ns=$PREFIX-$name
    printf '%-22s %-16s ready: %s\n' "$ns" \
      "$(nsx "$ns" ip -4 -o addr show dev eth0 | awk '{print $4}')" \
      "$(http_get "$ns" 127.0.0.1 15000 /readyz 2>/dev/null | head -1 | tr -d '\r' || echo no)"
  done
  [ -f "$DIR/pids" ] && say "$(alive | wc -w) processes running"
  return 0
}

alive() { # the recorded pids still running
  local p
  [ -f "$DIR/pids" ] || return 0
  while read -r p; do
    kill -0 "$p" 2>/dev/null && printf '%s ' "$p"
  done <"$DIR/pids"
  return 0
}

down() {
  need down
  local left
  left=$(alive)
  if [ -n "$left" ]; then
    # shellcheck disable=SC2086 # a list of pids
    kill -TERM $left 2>/dev/null || true
    for _ in $(seq 1 50); do
      [ -z "$(alive)" ] && break
      sleep 0.1
    done
    left=$(alive)
    # shellcheck disable=SC2086
    [ -n "$left" ] && kill -KILL $left 2>/dev/null
  fi
  local w name ns
  for w in "${WORKLOADS[@]}"; do
    read -r name _ <<<"$w"; ns=$PREFIX-$name
    if ip netns list | grep -q "^$ns\b"; then
      nsx "$ns" "$HALYARD" iptables remove >/dev/null 2>&1 || true
      ip netns del "$ns"
    fi
  done
  ip netns list | grep -q "^$BRNS\b" && ip netns del "$BRNS"
  rm -rf "$DIR"
  say "down: processes stopped, namespaces deleted"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  curl) curl_page "${2:-reader}" ;;
  *) die "usage: $0 up|status|curl [USER]|down" ;;
esac
