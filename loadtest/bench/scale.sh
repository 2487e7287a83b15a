#!/usr/bin/env bash
# Coordinator scale: a 3-node cluster holding RACKS racks with HOSTS_PER_RACK
# hosts each (default 1000 x 100 = 100,000 hosts, every host with a BMC
# record and a sealed password), on loopback:
#
#   loadtest/bench/scale.sh
#
# Measures, in this order:
#   1. load: `pxemesh-loadtest scale` applies one atomic batch per rack;
#   2. coordinator memory: VmRSS and VmHWM of each coordinator, and the size
#      of each data directory (sled state + Raft WAL);
#   3. full resync of one relay, two ways: RESYNC_TRIALS in-process watches
#      from revision 0 with relay certificates of random racks (the real
#      client, the real RelayService), and RELAY_RUNS real `pxemesh-relay`
#      processes started on an empty data directory, timed until their
#      metrics show the rack applied at the cluster's revision;
#   4. snapshot: a 4th coordinator joins; the log was compacted
#      (snapshot_entries = SNAPSHOT_ENTRIES), so it catches up from a Raft
#      snapshot. Reported: the snapshot's size (its
#      pxemesh_coordinator_snapshot_bytes metric) and the time from
#      add-member until it has applied the leader's index.
#
# Results: RESULTS_DIR (default target/bench-results/scale-<utc time>/):
# scale.json (loadtest), summary.md (also printed), environment.json, logs.
#
# Knobs: RACKS [1000] HOSTS_PER_RACK [100] CONCURRENCY [8] RESYNC_TRIALS [30]
#        RELAY_RUNS [5] SNAPSHOT_ENTRIES [500] BASE_PORT [27400]
#        BENCH_TMPDIR [/var/tmp] SKIP_BUILD [0] KEEP_WORKDIR [0] RESULTS_DIR
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RACKS=${RACKS:-1000}
HOSTS_PER_RACK=${HOSTS_PER_RACK:-100}
CONCURRENCY=${CONCURRENCY:-8}
RESYNC_TRIALS=${RESYNC_TRIALS:-30}
RELAY_RUNS=${RELAY_RUNS:-5}
SNAPSHOT_ENTRIES=${SNAPSHOT_ENTRIES:-500}
BASE_PORT=${BASE_PORT:-27400}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-results/scale-$(date -u +%Y%m%dT%H%M%SZ)}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

PIDS=()
WORK=
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
stop_pids() {
    local p
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        local any=0
        for p in "$@"; do alive "$p" && any=1; done
        [ "$any" = 0 ] && return 0
        sleep 0.1
    done
    for p in "$@"; do kill -9 "$p" 2>/dev/null || true; done
}
cleanup() {
    [ "${#PIDS[@]}" -gt 0 ] && stop_pids "${PIDS[@]}"
    if [ -n "$WORK" ] && [ "$KEEP_WORKDIR" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v jq >/dev/null || die "jq is needed (apt-get install jq)"
command -v curl >/dev/null || die "curl is needed (apt-get install curl)"
for p in $(seq $((BASE_PORT + 1)) $((BASE_PORT + 30))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p on 127.0.0.1 is in use; pick another BASE_PORT"
    fi
done

cd "$ROOT"
if [ "$SKIP_BUILD" != 1 ]; then
    log "building release binaries (several minutes on 2 cores)"
    cargo build --release -p pxemesh-coordinator -p pxemesh-certs -p pxemesh-loadtest -p pxemesh-relay >&2
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
BIN=$TARGET_DIR/release
for b in pxemesh-coordinator pxemeshctl pxemesh-certs pxemesh-loadtest pxemesh-relay; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (build failed?)"
done

mkdir -p "$RESULTS_DIR" "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/pxemesh-scale.XXXXXX")
PKI=$WORK/pki
log "work directory $WORK ($(df -T "$WORK" | awk 'NR==2 {print $2}')), results in $RESULTS_DIR"
mkdir -p "$PKI"
"$BIN/pxemesh-certs" init --dir "$PKI" --trust-domain scale.local >/dev/null
for i in 1 2 3 4; do "$BIN/pxemesh-certs" issue coordinator --dir "$PKI" --id "$i" >/dev/null; done
"$BIN/pxemesh-certs" issue admin --dir "$PKI" --name admin --stem admin >/dev/null
"$BIN/pxemesh-coordinator" gen-cluster-key "$WORK/cluster.key" >/dev/null

PORTS=($((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)) $((BASE_PORT + 4)))
METRICS=($((BASE_PORT + 11)) $((BASE_PORT + 12)) $((BASE_PORT + 13)) $((BASE_PORT + 14)))
ENDPOINTS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
CTL=("$BIN/pxemeshctl" --endpoints "$ENDPOINTS" --tls-dir "$PKI" --cert-stem admin --timeout 10)

write_config() { # write_config ID JOIN
    local i=$1 join=$2 d=$WORK/node$1
    mkdir -p "$d"
    {
        printf 'node_id = %d\nlisten = "127.0.0.1:%d"\nmetrics_listen = "127.0.0.1:%d"\n' \
            "$i" "${PORTS[$((i - 1))]}" "${METRICS[$((i - 1))]}"
        printf 'data_dir = "%s"\ncluster_key_file = "%s"\njoin = %s\n\n' "$d/data" "$WORK/cluster.key" "$join"
        printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n\n' \
            "$PKI/ca.pem" "$PKI/coordinator-$i.pem" "$PKI/coordinator-$i-key.pem"
        printf '[raft]\nsnapshot_entries = %d\ncatchup_entries = %d\n' \
            "$SNAPSHOT_ENTRIES" "$((SNAPSHOT_ENTRIES / 5))"
        # The initial members; a joining node lists them too (and itself), so
        # that it can answer the leader.
        for j in 1 2 3; do
            printf '\n[[peers]]\nid = %d\naddress = "127.0.0.1:%d"\n' "$j" "${PORTS[$((j - 1))]}"
        done
        if [ "$join" = true ]; then
            printf '\n[[peers]]\nid = %d\naddress = "127.0.0.1:%d"\n' "$i" "${PORTS[$((i - 1))]}"
        fi
    } >"$d/coordinator.toml"
}
start_node() {
    RUST_LOG=${COORD_LOG:-info} "$BIN/pxemesh-coordinator" --config "$WORK/node$1/coordinator.toml" \
        </dev/null >"$WORK/node$1/coordinator.log" 2>&1 &
    NODE_PID[$1]=$!
    PIDS+=($!)
}
declare -A NODE_PID
for i in 1 2 3; do write_config "$i" false; start_node "$i"; done

leader=0
for _ in $(seq 1 150); do
    leader=$("${CTL[@]}" cluster status -o json 2>/dev/null | jq -r '.leader_id // 0' 2>/dev/null || echo 0)
    [ "${leader:-0}" != 0 ] && break
    sleep 0.2
done
[ "${leader:-0}" != 0 ] || die "no leader within 30 s; logs in $WORK/node*/coordinator.log"
log "leader: node $leader"

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
for i in 1 2 3; do BASE_RSS[$i]=$(rss_kib "${NODE_PID[$i]}"); done

log "loading $RACKS racks x $HOSTS_PER_RACK hosts"
"$BIN/pxemesh-loadtest" scale --endpoints "$ENDPOINTS" --tls-dir "$PKI" --cert-stem admin \
    --racks "$RACKS" --hosts-per-rack "$HOSTS_PER_RACK" --concurrency "$CONCURRENCY" \
    --resync-trials "$RESYNC_TRIALS" -o json >"$RESULTS_DIR/scale.json"
jq . "$RESULTS_DIR/scale.json" >&2
revision=$(jq -r .revision_after_load "$RESULTS_DIR/scale.json")

# Let the followers apply everything, then read memory and disk.
sleep 3
mem_rows=
for i in 1 2 3; do
    p=${NODE_PID[$i]}
    mem_rows+="| node $i | $(( ${BASE_RSS[$i]} / 1024 )) | $(( $(rss_kib "$p") / 1024 )) | $(( $(hwm_kib "$p") / 1024 )) | $(du -sm "$WORK/node$i/data" | cut -f1) |"$'\n'
done

log "relay resync: $RELAY_RUNS real relay processes on an empty store"
rack=$(printf 'scale-%05d' $((RACKS / 2)))
"$BIN/pxemesh-certs" issue relay --dir "$PKI" --rack "$rack" --name bench --stem relay-bench >/dev/null
relay_cert=$PKI/relay-bench.pem
relay_key=$PKI/relay-bench-key.pem
relay_times=()
for run in $(seq 1 "$RELAY_RUNS"); do
    d=$WORK/relay$run
    mkdir -p "$d/boot"
    cat >"$d/relay.toml" <<EOF
name = "bench"
data_dir = "$d/data"
metrics_listen = "127.0.0.1:$((BASE_PORT + 20))"
[[interfaces]]
name = "lo"
address = "127.0.0.1"
[coordinators]
endpoints = ["127.0.0.1:${PORTS[$(( (run - 1) % 3 ))]}"]
ca = "$PKI/ca.pem"
cert = "$relay_cert"
key = "$relay_key"
[dhcp]
enabled = false
[tftp]
enabled = false
listen = "127.0.0.1:$((BASE_PORT + 21))"
[http]
enabled = false
listen = "127.0.0.1:$((BASE_PORT + 22))"
[boot]
dir = "$d/boot"
EOF
    t0=$(date +%s%N)
    RUST_LOG=warn "$BIN/pxemesh-relay" --config "$d/relay.toml" </dev/null >"$d/relay.log" 2>&1 &
    rp=$!
    PIDS+=($rp)
    done_ns=
    for _ in $(seq 1 1000); do
        got=$(curl -s "http://127.0.0.1:$((BASE_PORT + 20))/metrics" 2>/dev/null |
            awk '/^pxemesh_relay_sync_revision / {print $2}')
        if [ -n "$got" ] && [ "${got%.*}" -ge "$revision" ]; then done_ns=$(date +%s%N); break; fi
        sleep 0.01
    done
    stop_pids "$rp"
    [ -n "$done_ns" ] || die "relay run $run did not reach revision $revision within 10 s; see $d/relay.log"
    relay_times+=("$(awk -v a="$t0" -v b="$done_ns" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')")
done
log "relay process resync times (ms, from exec): ${relay_times[*]}"

log "snapshot: a 4th coordinator joins a compacted cluster"
write_config 4 true
t0=$(date +%s%N)
"${CTL[@]}" cluster add-member --id 4 --address "127.0.0.1:${PORTS[3]}" >/dev/null
start_node 4
caught_ns=
leader_applied=$("${CTL[@]}" cluster status -o json | jq -r '[.. | objects | select(has("applied_index")) | .applied_index] | max')
for _ in $(seq 1 1200); do
    # Until node 4 answers, pxemeshctl prints an unreachable entry (no index): 0.
    a=$("$BIN/pxemeshctl" --endpoints "127.0.0.1:${PORTS[3]}" --tls-dir "$PKI" --cert-stem admin --timeout 2 \
        cluster status -o json 2>/dev/null |
        jq -r '[.. | objects | select(has("applied_index")) | .applied_index] | max // 0' 2>/dev/null | head -n1)
    case "$a" in '' | *[!0-9]*) a=0 ;; esac
    if [ "$a" -ge "$leader_applied" ]; then caught_ns=$(date +%s%N); break; fi
    sleep 0.05
done
[ -n "$caught_ns" ] || die "node 4 did not catch up within 60 s; see $WORK/node4/coordinator.log"
catchup_ms=$(awk -v a="$t0" -v b="$caught_ns" 'BEGIN { printf "%.0f", (b - a) / 1e6 }')
snap_bytes=$(curl -s "http://127.0.0.1:${METRICS[3]}/metrics" | awk '/^pxemesh_coordinator_snapshot_bytes / {print $2}')
installed=$(curl -s "http://127.0.0.1:${METRICS[3]}/metrics" | awk '/^pxemesh_coordinator_snapshots_installed_total / {print $2}')
[ "${installed:-0}" -ge 1 ] || log "warning: node 4 caught up without installing a snapshot"
rss4=$(( $(rss_kib "${NODE_PID[4]}") / 1024 ))

cat >"$RESULTS_DIR/environment.json" <<EOF
{"date": "$(date -u +%FT%TZ)", "kernel": "$(uname -r)", "cpus": $(nproc),
 "mem_gib": $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo),
 "commit": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)",
 "load_before": "$(cut -d' ' -f1-3 /proc/loadavg)"}
EOF
{
    echo "# Coordinator scale: $(jq -r .hosts "$RESULTS_DIR/scale.json") hosts in $RACKS racks"
    echo
    echo "Load: $(jq -r '"\(.load_seconds | . * 10 | round / 10) s, \(.hosts_per_second | round) hosts/s (one Apply per rack, '"$CONCURRENCY"' in flight), revision \(.revision_after_load)"' "$RESULTS_DIR/scale.json")"
    echo
    echo "| coordinator | RSS before load (MiB) | RSS after (MiB) | peak RSS (MiB) | data dir (MiB) |"
    echo "|---|---:|---:|---:|---:|"
    printf '%s' "$mem_rows"
    echo "| node 4 (joined from a snapshot) | - | $rss4 | - | $(du -sm "$WORK/node4/data" | cut -f1) |"
    echo
    echo "Raft snapshot installed by node 4: $snap_bytes bytes; add-member to caught up: $catchup_ms ms."
    echo
    echo "Full rack resync, in-process watch from revision 0 ($(jq -r .resync_trials "$RESULTS_DIR/scale.json") trials, $(jq -r .snapshot_hosts "$RESULTS_DIR/scale.json") hosts, $(jq -r .rack_snapshot_bytes "$RESULTS_DIR/scale.json") bytes per rack snapshot):" \
        "p50 $(jq -r .resync_ms_p50 "$RESULTS_DIR/scale.json") ms, p99 $(jq -r .resync_ms_p99 "$RESULTS_DIR/scale.json") ms, max $(jq -r .resync_ms_max "$RESULTS_DIR/scale.json") ms."
    echo
    echo "Real relay process, empty store, exec to rack applied at revision $revision (ms): ${relay_times[*]}"
} | tee "$RESULTS_DIR/summary.md"
