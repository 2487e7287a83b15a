#!/usr/bin/env bash
# pxemesh quickstart: a local coordinator cluster on loopback.
#
#   deploy/quickstart.sh           build, create a CA and certificates, start a
#                                  3-node coordinator cluster, register a demo
#                                  rack/network/hosts/profile, print the status
#   deploy/quickstart.sh --status  print the cluster status again
#   deploy/quickstart.sh --down    stop everything it started (state is kept)
#   deploy/quickstart.sh --purge   stop and delete the work directory
#
# Re-running is safe: existing certificates, keys and data are reused, running
# nodes are left alone, and the demo records are re-applied idempotently.
# Everything listens on 127.0.0.1 only (gRPC 7101-7103, metrics 9101-9103).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${PXEMESH_HOME:-$ROOT/.pxemesh-quickstart}"
PROFILE="${PXEMESH_PROFILE:-release}"
NODES=(1 2 3)
grpc_port() { echo $((7100 + $1)); }
metrics_port() { echo $((9100 + $1)); }
ENDPOINTS="127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"

if [ "$PROFILE" = release ]; then BIN="$ROOT/target/release"; else BIN="$ROOT/target/debug"; fi
ctl() { "$BIN/pxemeshctl" --endpoints "$ENDPOINTS" --tls-dir "$WORK/tls" --cert-stem admin "$@"; }

running() { [ -f "$WORK/node$1/pid" ] && kill -0 "$(cat "$WORK/node$1/pid")" 2>/dev/null; }

down() {
    for n in "${NODES[@]}"; do
        if running "$n"; then
            kill "$(cat "$WORK/node$n/pid")" && echo "stopped coordinator $n"
        fi
        rm -f "$WORK/node$n/pid"
    done
}

case "${1:-}" in
    --down) down; exit 0 ;;
    --purge) down; rm -rf "$WORK"; echo "removed $WORK"; exit 0 ;;
    --status) ctl cluster status; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--status|--down|--purge]" >&2; exit 2 ;;
esac

echo "==> building pxemesh ($PROFILE)"
if [ "$PROFILE" = release ]; then
    cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" -p pxemesh-certs -p pxemesh-coordinator
else
    cargo build --locked --manifest-path "$ROOT/Cargo.toml" -p pxemesh-certs -p pxemesh-coordinator
fi

mkdir -p "$WORK/tls"
if [ ! -f "$WORK/tls/ca.pem" ]; then
    echo "==> creating a CA and certificates in $WORK/tls"
    "$BIN/pxemesh-certs" init --dir "$WORK/tls" --trust-domain quickstart.pxemesh
fi
for n in "${NODES[@]}"; do
    [ -f "$WORK/tls/coordinator-$n.pem" ] || "$BIN/pxemesh-certs" issue coordinator --dir "$WORK/tls" --id "$n" >/dev/null
done
[ -f "$WORK/tls/admin.pem" ] || "$BIN/pxemesh-certs" issue admin --dir "$WORK/tls" --name admin --stem admin >/dev/null
[ -f "$WORK/cluster.key" ] || "$BIN/pxemesh-coordinator" gen-cluster-key "$WORK/cluster.key"

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
    } > "$WORK/node$n/coordinator.toml"
    if running "$n"; then
        echo "coordinator $n already running (pid $(cat "$WORK/node$n/pid"))"
    else
        nohup "$BIN/pxemesh-coordinator" --config "$WORK/node$n/coordinator.toml" \
            >>"$WORK/node$n/coordinator.log" 2>&1 &
        echo $! > "$WORK/node$n/pid"
        echo "started coordinator $n (pid $!)"
    fi
done

echo "==> waiting for a leader"
for _ in $(seq 1 100); do
    if ctl -o json cluster status 2>/dev/null | grep -q '"leader_id": *[1-9]'; then
        break
    fi
    sleep 0.2
done

echo "==> registering demo records (idempotent)"
ctl rack put rack-a --description "quickstart demo rack" --oob 10.250.0.0/24
ctl network put prov-a --rack rack-a --subnet 10.200.0.0/24 --gateway 10.200.0.1 \
    --dns 10.200.0.1 --domain demo.internal --mtu 1500 --vlan 100 --pool 10.200.0.200-10.200.0.250
ctl profile put ipxe-demo --kind ipxe --kernel vmlinuz --initrd initrd.img --cmdline "console=ttyS0"
hosts="$WORK/demo-hosts.csv"
{
    echo "name,mac,ip,hostname,rack,network,profile,labels"
    for i in $(seq 1 8); do
        printf 'node%02d,52:54:00:00:a0:%02x,10.200.0.%d,node%02d.demo.internal,rack-a,prov-a,ipxe-demo,role=compute\n' "$i" "$i" $((10 + i)) "$i"
    done
} > "$hosts"
ctl host import "$hosts"

echo
ctl cluster status
cat <<EOT

pxemesh quickstart is running.
  work dir     $WORK
  gRPC (mTLS)  $ENDPOINTS
  metrics      http://127.0.0.1:9101/metrics (9102, 9103)
  logs         $WORK/node{1,2,3}/coordinator.log
  admin CLI    $BIN/pxemeshctl --endpoints $ENDPOINTS --tls-dir $WORK/tls host list
  stop         $0 --down      (delete everything: $0 --purge)
EOT
