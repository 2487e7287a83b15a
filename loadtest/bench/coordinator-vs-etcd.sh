#!/usr/bin/env bash
# Write-path benchmark: a 3-node pxemesh coordinator cluster against a 3-node
# etcd 3.4 cluster, both on loopback on this machine, in one run, with the same
# client (pxemesh-loadtest), the same certificates (our CA), mTLS for clients
# and peers, default Raft/snapshot settings and data on the same filesystem.
#
#   loadtest/bench/coordinator-vs-etcd.sh
#
# Benchmarks, identical for both systems (each request writes one new host):
#   seq     1 client, all requests to the leader      -> p50/p99 latency
#   conc    64 clients, all connected to the leader   -> writes/s
#   spread  64 clients spread over the 3 members      -> writes/s (followers forward)
#
# Knobs (environment): SEQ_REQUESTS (2000) SEQ_WARMUP (200) CONC_CLIENTS (64)
# CONC_REQUESTS (20000) CONC_WARMUP (2000) SPREAD (1: also run "spread")
# RESULTS_DIR (target/bench-results/<utc time>) BENCH_TMPDIR (/var/tmp)
# BASE_PORT (47100) KEEP_WORKDIR (0) SKIP_BUILD (0) MAX_SECONDS (300, per run)
# QUIET_WAIT (600: seconds to wait for other CPU load to go away before each run).
#
# Everything listens on 127.0.0.1 (ports BASE_PORT+1..+33); every process this
# script starts is stopped on exit, also on failure or Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SEQ_REQUESTS=${SEQ_REQUESTS:-2000}
SEQ_WARMUP=${SEQ_WARMUP:-200}
CONC_CLIENTS=${CONC_CLIENTS:-64}
CONC_REQUESTS=${CONC_REQUESTS:-20000}
CONC_WARMUP=${CONC_WARMUP:-2000}
SPREAD=${SPREAD:-1}
MAX_SECONDS=${MAX_SECONDS:-300}
BASE_PORT=${BASE_PORT:-47100}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Cleanup: stop everything we started, whatever happens.
# ---------------------------------------------------------------------------
PIDS=()
WORK=""
# Running and not a zombie (our children stay zombies until waited for).
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
stop_pids() { # SIGTERM, up to 10 s to exit, then SIGKILL
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
        local any=0
        for pid in "$@"; do alive "$pid" && any=1; done
        [ "$any" = 0 ] && break
        sleep 0.1
    done
    for pid in "$@"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "${#PIDS[@]}" -gt 0 ]; then stop_pids "${PIDS[@]}"; fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP_WORKDIR" = 1 ] || [ "$rc" != 0 ]; then
            log "work directory kept: $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Prerequisites
# ---------------------------------------------------------------------------
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
need_pkg() { # need_pkg COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2 (for $1)"
    if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}
need_pkg etcd etcd-server
need_pkg jq jq
need_pkg curl curl
ETCD_VERSION=$(etcd --version | sed -n 's/^etcd Version: //p')
case "$ETCD_VERSION" in
    3.4.*) ;;
    *) log "warning: etcd $ETCD_VERSION is not 3.4.x; the comparison targets etcd 3.4" ;;
esac
# Debian's package enables a systemd unit; make sure no stray etcd competes for the CPUs.
if pgrep -x etcd >/dev/null; then
    die "an etcd process is already running ($(pgrep -x etcd | tr '\n' ' ')); stop it first (e.g. systemctl stop etcd)"
fi

for p in $(seq $((BASE_PORT + 1)) $((BASE_PORT + 33))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        die "port $p on 127.0.0.1 is in use; pick another BASE_PORT"
    fi
done

cd "$ROOT"
if [ "$SKIP_BUILD" != 1 ]; then
    log "building release binaries (several minutes on 2 cores)"
    cargo build --release -p pxemesh-coordinator -p pxemesh-certs -p pxemesh-loadtest >&2
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
BIN=$TARGET_DIR/release
for b in pxemesh-coordinator pxemeshctl pxemesh-certs pxemesh-loadtest; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing (build failed?)"
done

mkdir -p "$RESULTS_DIR"
mkdir -p "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/pxemesh-bench.XXXXXX")
PKI=$WORK/pki
log "work directory $WORK ($(df -T "$WORK" | awk 'NR==2 {print $2}') on $(df "$WORK" | awk 'NR==2 {print $1}')), results in $RESULTS_DIR"

# ---------------------------------------------------------------------------
# Certificates (our CA) and the cluster key
# ---------------------------------------------------------------------------
mkdir -p "$PKI"
"$BIN/pxemesh-certs" init --dir "$PKI" --trust-domain bench.local >/dev/null
for i in 1 2 3; do
    "$BIN/pxemesh-certs" issue coordinator --dir "$PKI" --id "$i" >/dev/null
done
"$BIN/pxemesh-certs" issue admin --dir "$PKI" --name admin --stem admin >/dev/null
"$BIN/pxemesh-coordinator" gen-cluster-key "$WORK/cluster.key" >/dev/null

PX_PORTS=($((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)))
PX_METRICS=($((BASE_PORT + 11)) $((BASE_PORT + 12)) $((BASE_PORT + 13)))
ETCD_CLIENT=($((BASE_PORT + 21)) $((BASE_PORT + 22)) $((BASE_PORT + 23)))
ETCD_PEER=($((BASE_PORT + 31)) $((BASE_PORT + 32)) $((BASE_PORT + 33)))
PX_ENDPOINTS="127.0.0.1:${PX_PORTS[0]},127.0.0.1:${PX_PORTS[1]},127.0.0.1:${PX_PORTS[2]}"
ETCD_ENDPOINTS="127.0.0.1:${ETCD_CLIENT[0]},127.0.0.1:${ETCD_CLIENT[1]},127.0.0.1:${ETCD_CLIENT[2]}"

# CPU seconds (user+system) used so far by the given pids.
cpu_seconds() {
    local hz total=0 pid t
    hz=$(getconf CLK_TCK)
    for pid in "$@"; do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    awk -v t="$total" -v hz="$hz" 'BEGIN { printf "%.2f", t / hz }'
}

# Busy CPU ticks of the whole machine (user nice system irq softirq steal).
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
# CPU ticks of this shell's finished children (the load generator among them).
children_ticks() { awk '{ print $16 + $17 }' "/proc/$$/stat"; }
ticks_to_s() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'; }

# Wait (up to QUIET_WAIT s) until the machine is idle apart from us: another
# build or benchmark on these 2 cores would skew the comparison.
QUIET_WAIT=${QUIET_WAIT:-600}
wait_quiet() {
    local limit=$(( $(getconf CLK_TCK) * 20 / 100 )) t0 t1 i
    for i in $(seq 1 "$QUIET_WAIT"); do
        t0=$(machine_ticks)
        sleep 1
        t1=$(machine_ticks)
        [ $((t1 - t0)) -le "$limit" ] && return 0
        [ "$i" = 1 ] && log "machine busy ($((100 * (t1 - t0) / $(getconf CLK_TCK)))% of a core used by others); waiting up to ${QUIET_WAIT}s for it to settle"
    done
    log "warning: the machine is still busy; results will be skewed"
}

# bench SYSTEM NAME CLIENTS REQUESTS WARMUP CONNECT ENDPOINTS SERVER_PIDS... ; writes RESULTS_DIR/SYSTEM-NAME.json
FAILED=0
bench() {
    local system=$1 name=$2 clients=$3 requests=$4 warmup=$5 connect=$6 endpoints=$7
    shift 7
    local out=$RESULTS_DIR/$system-$name.json cpu0 cpu1 rc=0
    local extra=()
    if [ "$system" = etcd ]; then
        extra=(--etcd-ca "$PKI/ca.pem" --etcd-cert "$PKI/admin.pem" --etcd-key "$PKI/admin-key.pem")
    fi
    wait_quiet
    log "$system $name: $clients client(s), $requests requests (+$warmup warmup), connect=$connect"
    local m0 c0 m1 c1
    m0=$(machine_ticks)
    c0=$(children_ticks)
    cpu0=$(cpu_seconds "$@")
    "$BIN/pxemesh-loadtest" writes --target "$system" --endpoints "$endpoints" \
        --tls-dir "$PKI" --cert-stem admin "${extra[@]}" \
        --clients "$clients" --requests "$requests" --warmup "$warmup" \
        --connect "$connect" --prefix "$name" --max-seconds "$MAX_SECONDS" -o json \
        >"$out.tmp" || rc=$?
    cpu1=$(cpu_seconds "$@")
    c1=$(children_ticks)
    m1=$(machine_ticks)
    if [ ! -s "$out.tmp" ]; then
        log "$system $name: no result (exit $rc)"
        FAILED=1
        rm -f "$out.tmp"
        return 0
    fi
    [ "$rc" = 0 ] || { log "$system $name: more than 1% errors (exit $rc)"; FAILED=1; }
    # Where the machine's CPU went during the run: the servers, the load
    # generator, and anything else ("other" should be near 0).
    jq --argjson cpu "$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN { printf "%.2f", b - a }')" \
        --argjson client "$(ticks_to_s $((c1 - c0)))" \
        --argjson machine "$(ticks_to_s $((m1 - m0)))" \
        '. + {server_cpu_seconds: $cpu, client_cpu_seconds: $client, machine_cpu_seconds: $machine,
              other_cpu_seconds: ((($machine - $cpu - $client) * 100 | round) / 100)}' "$out.tmp" >"$out"
    rm -f "$out.tmp"
    jq -r '"    ok \(.ok) errors \(.errors)  \(.writes_per_second | floor) writes/s  p50 \(.latency_us.p50 / 1000) ms  p99 \(.latency_us.p99 / 1000) ms  server CPU \(.server_cpu_seconds) s  client CPU \(.client_cpu_seconds) s  other CPU \(.other_cpu_seconds) s"' "$out" >&2
}

run_suite() { # run_suite SYSTEM ENDPOINTS SERVER_PIDS...
    local system=$1 endpoints=$2
    shift 2
    bench "$system" seq 1 "$SEQ_REQUESTS" "$SEQ_WARMUP" leader "$endpoints" "$@"
    bench "$system" conc "$CONC_CLIENTS" "$CONC_REQUESTS" "$CONC_WARMUP" leader "$endpoints" "$@"
    if [ "$SPREAD" = 1 ]; then
        bench "$system" spread "$CONC_CLIENTS" "$CONC_REQUESTS" "$CONC_WARMUP" spread "$endpoints" "$@"
    fi
}

# ---------------------------------------------------------------------------
# pxemesh: 3 coordinators, default Raft settings
# ---------------------------------------------------------------------------
log "starting a 3-node pxemesh cluster"
PX_PIDS=()
for i in 1 2 3; do
    d=$WORK/pxemesh/node$i
    mkdir -p "$d"
    {
        printf 'node_id = %d\nlisten = "127.0.0.1:%d"\nmetrics_listen = "127.0.0.1:%d"\n' \
            "$i" "${PX_PORTS[$((i - 1))]}" "${PX_METRICS[$((i - 1))]}"
        printf 'data_dir = "%s"\ncluster_key_file = "%s"\n\n' "$d/data" "$WORK/cluster.key"
        printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' \
            "$PKI/ca.pem" "$PKI/coordinator-$i.pem" "$PKI/coordinator-$i-key.pem"
        for j in 1 2 3; do
            printf '\n[[peers]]\nid = %d\naddress = "127.0.0.1:%d"\n' "$j" "${PX_PORTS[$((j - 1))]}"
        done
    } >"$d/coordinator.toml"
    RUST_LOG=info "$BIN/pxemesh-coordinator" --config "$d/coordinator.toml" \
        </dev/null >"$d/coordinator.log" 2>&1 &
    PX_PIDS+=($!)
    PIDS+=($!)
done

log "waiting for a pxemesh leader"
leader=0
for _ in $(seq 1 150); do
    leader=$("$BIN/pxemeshctl" --endpoints "$PX_ENDPOINTS" --tls-dir "$PKI" --cert-stem admin \
        --timeout 2 cluster status -o json 2>/dev/null | jq -r '.leader_id // 0' 2>/dev/null || echo 0)
    [ "${leader:-0}" != 0 ] && break
    sleep 0.2
done
[ "${leader:-0}" != 0 ] || die "no pxemesh leader within 30 s; logs in $WORK/pxemesh/node*/coordinator.log"
log "pxemesh leader: node $leader"

run_suite pxemesh "$PX_ENDPOINTS" "${PX_PIDS[@]}"
du -sk "$WORK"/pxemesh/node*/data | awk '{s += $1} END {print s}' >"$RESULTS_DIR/pxemesh-disk-kib"
log "stopping pxemesh"
stop_pids "${PX_PIDS[@]}"
PIDS=()

# ---------------------------------------------------------------------------
# etcd 3.4: 3 members, TLS with client-certificate auth for clients and peers,
# our CA, the coordinators' certificates; default heartbeat, election, snapshots
# ---------------------------------------------------------------------------
log "starting a 3-node etcd $ETCD_VERSION cluster"
ETCD_PIDS=()
cluster=""
for i in 1 2 3; do
    cluster+="${cluster:+,}e$i=https://127.0.0.1:${ETCD_PEER[$((i - 1))]}"
done
for i in 1 2 3; do
    d=$WORK/etcd/e$i
    mkdir -p "$d"
    cp=${ETCD_CLIENT[$((i - 1))]}
    pp=${ETCD_PEER[$((i - 1))]}
    # env -i: no ETCD_* variables from the caller's environment change the settings.
    env -i PATH="$PATH" etcd --name "e$i" --data-dir "$d/data" \
        --listen-client-urls "https://127.0.0.1:$cp" --advertise-client-urls "https://127.0.0.1:$cp" \
        --listen-peer-urls "https://127.0.0.1:$pp" --initial-advertise-peer-urls "https://127.0.0.1:$pp" \
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token pxemesh-bench \
        --client-cert-auth --trusted-ca-file "$PKI/ca.pem" \
        --cert-file "$PKI/coordinator-$i.pem" --key-file "$PKI/coordinator-$i-key.pem" \
        --peer-client-cert-auth --peer-trusted-ca-file "$PKI/ca.pem" \
        --peer-cert-file "$PKI/coordinator-$i.pem" --peer-key-file "$PKI/coordinator-$i-key.pem" \
        --logger zap --log-outputs stderr \
        </dev/null >"$d/etcd.log" 2>&1 &
    ETCD_PIDS+=($!)
    PIDS+=($!)
done

log "waiting for an etcd leader"
healthy=0
for _ in $(seq 1 150); do
    if curl -sf --max-time 2 --cacert "$PKI/ca.pem" --cert "$PKI/admin.pem" --key "$PKI/admin-key.pem" \
        "https://127.0.0.1:${ETCD_CLIENT[0]}/health" 2>/dev/null | grep -q '"health":"true"'; then
        healthy=1
        break
    fi
    sleep 0.2
done
[ "$healthy" = 1 ] || die "etcd not healthy within 30 s; logs in $WORK/etcd/e*/etcd.log"

run_suite etcd "$ETCD_ENDPOINTS" "${ETCD_PIDS[@]}"
du -sk "$WORK"/etcd/e*/data | awk '{s += $1} END {print s}' >"$RESULTS_DIR/etcd-disk-kib"
log "stopping etcd"
stop_pids "${ETCD_PIDS[@]}"
PIDS=()

# ---------------------------------------------------------------------------
# Summary: ratios > 1 mean pxemesh is better
# ---------------------------------------------------------------------------
jq -n --arg etcd "$ETCD_VERSION" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg dirty "$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo yes || echo no)" \
    --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" \
    --arg fs "$(df -T "$WORK" | awk 'NR==2 {print $2}')" \
    '{date: $date, pxemesh_commit: $commit, worktree_dirty: $dirty, etcd_version: $etcd,
      nproc: ($nproc | tonumber), cpu: $cpu, kernel: $kernel, filesystem: $fs}' \
    >"$RESULTS_DIR/environment.json"

summary() {
    local names=(seq conc)
    [ "$SPREAD" = 1 ] && names+=(spread)
    echo "| benchmark | metric | pxemesh | etcd $ETCD_VERSION | ratio (>1: pxemesh better) |"
    echo "|---|---|---:|---:|---:|"
    local n label p e
    for n in "${names[@]}"; do
        p=$RESULTS_DIR/pxemesh-$n.json
        e=$RESULTS_DIR/etcd-$n.json
        if [ ! -s "$p" ] || [ ! -s "$e" ]; then
            echo "| $n | (missing result) | | | |"
            continue
        fi
        case $n in
            seq) label="1 client, leader" ;;
            conc) label="$CONC_CLIENTS clients, leader" ;;
            spread) label="$CONC_CLIENTS clients, all members" ;;
        esac
        jq -rn --slurpfile p "$p" --slurpfile e "$e" --arg title "$label" '
            def r2: (. * 100 | round) / 100;
            def ms: (. / 10 | round) / 100;
            $p[0] as $p | $e[0] as $e |
            "| \($title) | writes/s | \($p.writes_per_second | round) | \($e.writes_per_second | round) | \(if $e.writes_per_second > 0 then ($p.writes_per_second / $e.writes_per_second | r2) else "-" end) |",
            "| \($title) | p50 latency (ms) | \($p.latency_us.p50 | ms) | \($e.latency_us.p50 | ms) | \(if $p.latency_us.p50 > 0 then ($e.latency_us.p50 / $p.latency_us.p50 | r2) else "-" end) |",
            "| \($title) | p99 latency (ms) | \($p.latency_us.p99 | ms) | \($e.latency_us.p99 | ms) | \(if $p.latency_us.p99 > 0 then ($e.latency_us.p99 / $p.latency_us.p99 | r2) else "-" end) |",
            "| \($title) | server CPU s per 1000 writes | \(1000 * $p.server_cpu_seconds / ([$p.ok + $p.warmup, 1] | max) | r2) | \(1000 * $e.server_cpu_seconds / ([$e.ok + $e.warmup, 1] | max) | r2) | \(if $p.server_cpu_seconds > 0 then ((1000 * $e.server_cpu_seconds / ([$e.ok + $e.warmup, 1] | max)) / (1000 * $p.server_cpu_seconds / ([$p.ok + $p.warmup, 1] | max)) | r2) else "-" end) |",
            "| \($title) | errors | \($p.errors) | \($e.errors) | |"'
    done
    echo
    echo "Disk used after the runs: pxemesh $(cat "$RESULTS_DIR/pxemesh-disk-kib") KiB, etcd $(cat "$RESULTS_DIR/etcd-disk-kib") KiB (3 nodes each)."
}
summary | tee "$RESULTS_DIR/summary.md"
log "results: $RESULTS_DIR"
[ "$FAILED" = 0 ] || die "at least one benchmark run failed (see above)"
