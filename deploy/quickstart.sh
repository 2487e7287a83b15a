#!/usr/bin/env bash
# pxemesh quickstart: a whole mesh on loopback, and a boot storm through it.
#
#   deploy/quickstart.sh           build; create a CA and certificates; start a
#                                  3-node coordinator cluster and two rack
#                                  relays; register demo racks, networks, hosts
#                                  and a boot profile; push a small image; run
#                                  a short boot storm against each relay
#   deploy/quickstart.sh --status  print the cluster and relay status again
#   deploy/quickstart.sh --down    stop everything it started (state is kept)
#   deploy/quickstart.sh --purge   stop and delete the work directory
#
# Re-running is safe: certificates, keys and data are reused, running
# processes are left alone, records are re-applied idempotently and the image
# push is a no-op when the blobs are already stored. Everything listens on
# 127.0.0.1 only, on unprivileged ports:
#   coordinators gRPC 7101-7103, metrics 9101-9103
#   relay-a (rack-a) DHCP 6701, TFTP 6901, HTTP 8101, metrics 9201
#   relay-b (rack-b) DHCP 6702, TFTP 6902, HTTP 8102, metrics 9202
# Environment: PXEMESH_HOME (work directory, default .pxemesh-quickstart),
# PXEMESH_PROFILE (release|debug, default release), PXEMESH_SKIP_BUILD=1,
# PXEMESH_STORM_HOSTS (simulated hosts per rack, default 40).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${PXEMESH_HOME:-$ROOT/.pxemesh-quickstart}"
PROFILE="${PXEMESH_PROFILE:-release}"
STORM_HOSTS="${PXEMESH_STORM_HOSTS:-40}"
NODES=(1 2 3)
RACKS=(a b)
grpc_port() { echo $((7100 + $1)); }
metrics_port() { echo $((9100 + $1)); }
ENDPOINTS="127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
rack_index() { case $1 in a) echo 1 ;; b) echo 2 ;; esac; }

if [ "$PROFILE" = release ]; then BIN="$ROOT/target/release"; else BIN="$ROOT/target/debug"; fi
if [ -n "${CARGO_TARGET_DIR:-}" ]; then BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = release ] && echo release || echo debug)"; fi
ctl() { "$BIN/pxemeshctl" --endpoints "$ENDPOINTS" --tls-dir "$WORK/tls" --cert-stem admin "$@"; }

pid_of() { cat "$WORK/$1/pid" 2>/dev/null; }
running() { local p; p=$(pid_of "$1") && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
stop() { # stop DIR NAME: SIGTERM, up to 10 s, then SIGKILL
    local p
    running "$1" || { rm -f "$WORK/$1/pid"; return 0; }
    p=$(pid_of "$1")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    rm -f "$WORK/$1/pid"
    echo "stopped $2"
}
down() {
    for r in "${RACKS[@]}"; do stop "relay-$r" "relay-$r"; done
    for n in "${NODES[@]}"; do stop "node$n" "coordinator $n"; done
}
status() {
    ctl cluster status
    echo
    ctl relay list
}

case "${1:-}" in
    --down) down; exit 0 ;;
    --purge) down; rm -rf "$WORK"; echo "removed $WORK"; exit 0 ;;
    --status) status; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--status|--down|--purge]" >&2; exit 2 ;;
esac

if [ "${PXEMESH_SKIP_BUILD:-0}" != 1 ]; then
    echo "==> building pxemesh ($PROFILE; the first build takes several minutes)"
    flags=(--locked --manifest-path "$ROOT/Cargo.toml" -p pxemesh-certs -p pxemesh-coordinator -p pxemesh-relay -p pxemesh-loadtest)
    [ "$PROFILE" = release ] && flags+=(--release)
    cargo build "${flags[@]}"
fi
for b in pxemesh-certs pxemesh-coordinator pxemeshctl pxemesh-relay pxemesh-loadtest; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (build failed?)" >&2; exit 1; }
done

mkdir -p "$WORK/tls"
if [ ! -f "$WORK/tls/ca.pem" ]; then
    echo "==> creating a CA and certificates in $WORK/tls"
    "$BIN/pxemesh-certs" init --dir "$WORK/tls" --trust-domain quickstart.pxemesh
fi
for n in "${NODES[@]}"; do
    [ -f "$WORK/tls/coordinator-$n.pem" ] || "$BIN/pxemesh-certs" issue coordinator --dir "$WORK/tls" --id "$n" >/dev/null
done
for r in "${RACKS[@]}"; do
    [ -f "$WORK/tls/relay-$r.pem" ] ||
        "$BIN/pxemesh-certs" issue relay --dir "$WORK/tls" --rack "rack-$r" --name "relay-$r" --stem "relay-$r" >/dev/null
done
[ -f "$WORK/tls/admin.pem" ] || "$BIN/pxemesh-certs" issue admin --dir "$WORK/tls" --name admin --stem admin >/dev/null
[ -f "$WORK/cluster.key" ] || "$BIN/pxemesh-coordinator" gen-cluster-key "$WORK/cluster.key"

start() { # start DIR NAME CMD...
    local dir=$1 name=$2
    shift 2
    if running "$dir"; then
        echo "$name already running (pid $(pid_of "$dir"))"
        return
    fi
    nohup "$@" >>"$WORK/$dir/log" 2>&1 </dev/null &
    echo $! >"$WORK/$dir/pid"
    echo "started $name (pid $!)"
}

for n in "${NODES[@]}"; do
    mkdir -p "$WORK/node$n"
    {
        echo "node_id = $n"
        echo "listen = \"127.0.0.1:$(grpc_port "$n")\""
        echo "metrics_listen = \"127.0.0.1:$(metrics_port "$n")\""
        echo "data_dir = \"$WORK/node$n/data\""
        echo "cluster_key_file = \"$WORK/cluster.key\""
        echo
        echo "[tls]"
        echo "ca = \"$WORK/tls/ca.pem\""
        echo "cert = \"$WORK/tls/coordinator-$n.pem\""
        echo "key = \"$WORK/tls/coordinator-$n-key.pem\""
        for p in "${NODES[@]}"; do
            echo
            echo "[[peers]]"
            echo "id = $p"
            echo "address = \"127.0.0.1:$(grpc_port "$p")\""
        done
    } >"$WORK/node$n/coordinator.toml"
    start "node$n" "coordinator $n" "$BIN/pxemesh-coordinator" --config "$WORK/node$n/coordinator.toml"
done

echo "==> waiting for a leader"
leader=
for _ in $(seq 1 150); do
    if ctl -o json cluster status 2>/dev/null | grep -q '"leader_id": *[1-9]'; then
        leader=yes
        break
    fi
    sleep 0.2
done
[ -n "$leader" ] || { echo "no coordinator leader within 30 s; logs in $WORK/node*/log" >&2; exit 1; }

echo "==> registering demo records (idempotent)"
# rack-a keeps the classic demo: a VLAN with reserved hosts and a pool.
ctl rack put rack-a --description "quickstart demo rack A" --oob 10.250.0.0/24 >/dev/null
ctl rack put rack-b --description "quickstart demo rack B" --oob 10.251.0.0/24 >/dev/null
ctl network put prov-a --rack rack-a --subnet 10.200.0.0/24 --gateway 10.200.0.1 \
    --dns 10.200.0.1 --domain demo.internal --mtu 1500 --vlan 100 --pool 10.200.0.200-10.200.0.250 >/dev/null
# The storm networks: the load generator acts as a DHCP relay agent whose
# giaddr (.1) lies in them, on loopback.
ctl network put storm-a --rack rack-a --subnet 127.16.0.0/16 >/dev/null
ctl network put storm-b --rack rack-b --subnet 127.17.0.0/16 >/dev/null

echo "==> pushing the demo image (a small fake kernel and initrd)"
mkdir -p "$WORK/image"
if [ ! -f "$WORK/image/vmlinuz" ]; then
    head -c $((2 * 1024 * 1024)) /dev/urandom >"$WORK/image/vmlinuz"
    head -c $((6 * 1024 * 1024)) /dev/urandom >"$WORK/image/initrd.img"
fi
ctl image push "$WORK/image" --name demo
# Both the demo hosts and the storm's hosts boot the image through iPXE.
ctl profile put ipxe-demo --kind ipxe --image demo --kernel vmlinuz --initrd initrd.img --cmdline "console=ttyS0" >/dev/null
ctl profile put storm --kind ipxe --image demo --kernel vmlinuz --initrd initrd.img --cmdline "console=ttyS0" >/dev/null
hosts="$WORK/demo-hosts.csv"
{
    echo "name,mac,ip,hostname,rack,network,profile,labels"
    for i in $(seq 1 8); do
        printf 'node%02d,52:54:00:00:a0:%02x,10.200.0.%d,node%02d.demo.internal,rack-a,prov-a,ipxe-demo,role=compute\n' "$i" "$i" $((10 + i)) "$i"
    done
} >"$hosts"
ctl host import "$hosts"

for r in "${RACKS[@]}"; do
    i=$(rack_index "$r")
    d=$WORK/relay-$r
    mkdir -p "$d/boot"
    # The storm's simulated PXE ROM fetches a loader over TFTP first; any
    # file will do for it (a real rack puts iPXE's undionly.kpxe here).
    [ -f "$d/boot/undionly.kpxe" ] || head -c 65536 /dev/urandom >"$d/boot/undionly.kpxe"
    cat >"$d/relay.toml" <<EOF
name = "relay-$r"
data_dir = "$d/data"
metrics_listen = "127.0.0.1:$((9200 + i))"
advertise_address = "127.0.0.1"

[[interfaces]]
name = "lo"
address = "127.0.0.1"

[coordinators]
endpoints = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
ca = "$WORK/tls/ca.pem"
cert = "$WORK/tls/relay-$r.pem"
key = "$WORK/tls/relay-$r-key.pem"

[dhcp]
port = $((6700 + i))
relay_agent_port = $((6800 + i))

[tftp]
listen = "127.0.0.1:$((6900 + i))"

[http]
listen = "127.0.0.1:$((8100 + i))"

[boot]
dir = "$d/boot"
EOF
    start "relay-$r" "relay-$r" "$BIN/pxemesh-relay" --config "$d/relay.toml"
done

echo "==> waiting for both relays to report ready"
for _ in $(seq 1 150); do
    [ "$(ctl -o json relay list 2>/dev/null | grep -c '"ready"')" -ge 2 ] && break
    sleep 0.2
done

storm_ok=1
for r in "${RACKS[@]}"; do
    i=$(rack_index "$r")
    subnet=127.$((15 + i)).0.0/16
    echo "==> boot storm: $STORM_HOSTS simulated hosts through relay-$r (DHCP -> TFTP -> HTTP from the image cache)"
    if ! "$BIN/pxemesh-loadtest" storm --no-progress --hosts "$STORM_HOSTS" --prefix "storm-$r" --subnet "$subnet" \
        --dhcp-server "127.0.0.1:$((6700 + i))" --agent-port "$((6800 + i))" --tftp-port "$((6900 + i))" \
        --register --endpoints "$ENDPOINTS" --tls-dir "$WORK/tls" --cert-stem admin \
        --rack "rack-$r" --network "storm-$r" --label "relay-$r" --max-seconds 120 \
        --json "$WORK/storm-$r.json" --html "$WORK/storm-$r.html"; then
        storm_ok=0
    fi
done

echo
status
cat <<EOT

pxemesh quickstart is running.
  work dir       $WORK
  coordinators   $ENDPOINTS (mTLS; metrics http://127.0.0.1:9101/metrics, 9102, 9103)
  relays         relay-a: DHCP 127.0.0.1:6701, TFTP :6901, HTTP http://127.0.0.1:8101/, metrics :9201
                 relay-b: DHCP 127.0.0.1:6702, TFTP :6902, HTTP http://127.0.0.1:8102/, metrics :9202
  logs           $WORK/node{1,2,3}/log, $WORK/relay-{a,b}/log
  storm reports  $WORK/storm-a.html, $WORK/storm-b.html (JSON next to them)
  admin CLI      $BIN/pxemeshctl --endpoints $ENDPOINTS --tls-dir $WORK/tls host list
  stop           $0 --down      (delete everything: $0 --purge)
EOT
if [ "$storm_ok" != 1 ]; then
    echo "a boot storm did not complete; see the reports and the relay logs" >&2
    exit 1
fi
