#!/usr/bin/env bash
# Cold-cache boot storm: STORM_CLIENTS curl clients ask a relay at once for
# the same kernel + initrd (KERNEL_MIB + INITRD_MIB) of an image the relay
# has never fetched; time until every client has both files. The same
# clients then fetch the same files from nginx serving a local copy. Same
# run, same machine, loopback only (release builds).
#
#   relay/bench/image-storm.sh
#
# Setup: a 1-node coordinator (throw-away CA and data in a work directory),
# `pxemeshctl image push` of the two files, then for each repetition a
# relay started on an EMPTY data directory with `prefetch = false`, so the
# first request finds nothing cached: the relay must fetch both blobs from
# the coordinator (one fetch each, however many clients wait: its
# pxemesh_relay_cache_upstream_fetches_total is recorded) and verify them
# before serving anything. Each client runs `curl URL-kernel URL-initrd`
# (sequentially, like iPXE). nginx serves the same files from a directory
# (page cache warm, sendfile on).
#
# Results: RESULTS_DIR (default target/bench-results/image-storm-<utc>/):
# storm.jsonl (one object per measurement) and summary.md (also printed).
#
# Knobs (environment), defaults in brackets:
#   STORM_CLIENTS [500]  KERNEL_MIB [10]  INITRD_MIB [40]  REPS [3]
#   CONTENT_TMPDIR [/dev/shm]  SKIP_BUILD [0]  KEEP_WORKDIR [0]  RESULTS_DIR
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STORM_CLIENTS=${STORM_CLIENTS:-500}
KERNEL_MIB=${KERNEL_MIB:-10}
INITRD_MIB=${INITRD_MIB:-40}
REPS=${REPS:-3}
CONTENT_TMPDIR=${CONTENT_TMPDIR:-/dev/shm}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-results/image-storm-$(date -u +%Y%m%dT%H%M%SZ)}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
for c in curl jq nginx; do command -v "$c" >/dev/null || die "needs $c (apt-get install $c)"; done
# 500 clients, each with a socket and files open, plus the servers.
ulimit -n 65536 2>/dev/null || true

PIDS=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pxm-storm.XXXXXX")
CONTENT=$(mktemp -d "$CONTENT_TMPDIR/pxm-storm-content.XXXXXX")
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$CONTENT"
    if [ "$KEEP_WORKDIR" = 1 ] || [ "$rc" != 0 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
wait_http() { # wait_http URL
    for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done
    return 1
}
metric() { # metric PORT NAME
    curl -sf "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}

if [ "$SKIP_BUILD" != 1 ]; then
    log "building release binaries"
    cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" \
        -p pxemesh-certs -p pxemesh-coordinator -p pxemesh-relay >&2
fi
mkdir -p "$RESULTS_DIR"

# --- PKI, coordinator.
TLS=$WORK/tls
"$BIN/pxemesh-certs" init --dir "$TLS" --trust-domain storm.pxemesh >/dev/null
"$BIN/pxemesh-certs" issue coordinator --dir "$TLS" --id 1 >/dev/null
"$BIN/pxemesh-certs" issue admin --dir "$TLS" --name admin --stem admin >/dev/null
"$BIN/pxemesh-certs" issue relay --dir "$TLS" --rack r1 --name storm --stem relay --ip 127.0.0.1 >/dev/null
"$BIN/pxemesh-coordinator" gen-cluster-key "$WORK/cluster.key" >/dev/null
GRPC=$(free_port)
CMETRICS=$(free_port)
cat >"$WORK/coordinator.toml" <<EOF
node_id = 1
listen = "127.0.0.1:$GRPC"
metrics_listen = "127.0.0.1:$CMETRICS"
data_dir = "$WORK/coord"
cluster_key_file = "$WORK/cluster.key"
[tls]
ca = "$TLS/ca.pem"
cert = "$TLS/coordinator-1.pem"
key = "$TLS/coordinator-1-key.pem"
[[peers]]
id = 1
address = "127.0.0.1:$GRPC"
EOF
RUST_LOG=warn "$BIN/pxemesh-coordinator" --config "$WORK/coordinator.toml" >"$WORK/coordinator.log" 2>&1 &
PIDS+=($!)
ctl() { "$BIN/pxemeshctl" --endpoints "127.0.0.1:$GRPC" --tls-dir "$TLS" --cert-stem admin "$@"; }
for _ in $(seq 1 100); do ctl rack put r1 >/dev/null 2>&1 && break; sleep 0.2; done
ctl rack get r1 >/dev/null || die "coordinator did not come up; see $WORK/coordinator.log"

# --- Content: kernel + initrd, pushed as image "storm".
mkdir -p "$CONTENT/storm"
head -c $((KERNEL_MIB * 1048576)) /dev/urandom >"$CONTENT/storm/vmlinuz"
head -c $((INITRD_MIB * 1048576)) /dev/urandom >"$CONTENT/storm/initrd.img"
chmod -R a+rX "$CONTENT"
log "pushing ${KERNEL_MIB} + ${INITRD_MIB} MiB as image storm"
ctl image push "$CONTENT/storm" --name storm >&2
BYTES_EACH=$(( (KERNEL_MIB + INITRD_MIB) * 1048576 ))

# storm LABEL KERNEL-URL INITRD-URL -> prints "seconds failed slowest"
storm() {
    local dir=$WORK/curl-$1 i kids=() t0 t1
    rm -rf "$dir"; mkdir -p "$dir"
    t0=$(now)
    for i in $(seq 1 "$STORM_CLIENTS"); do
        curl -s --max-time 600 -o /dev/null -o /dev/null \
            -w '%{http_code} %{size_download} %{time_total}\n' "$2" "$3" >"$dir/$i" 2>&1 &
        kids+=($!)
    done
    for i in "${kids[@]}"; do wait "$i" || true; done
    t1=$(now)
    # Each client: two lines (kernel, initrd), both 200 with the full size.
    local failed slowest
    failed=$(for f in "$dir"/*; do
        awk -v k=$((KERNEL_MIB * 1048576)) -v r=$((INITRD_MIB * 1048576)) '
            NR == 1 && !($1 == 200 && $2 == k) { bad = 1 }
            NR == 2 && !($1 == 200 && $2 == r) { bad = 1 }
            END { if (NR != 2) bad = 1; print bad + 0 }' "$f"
    done | awk '{ n += $1 } END { print n + 0 }')
    slowest=$(cat "$dir"/* | awk '{ if ($3 > m) m = $3 } END { print m + 0 }')
    echo "$(elapsed "$t0" "$t1") $failed $slowest"
}

record() { # record SERVER REP SECONDS FAILED SLOWEST UPSTREAM
    jq -nc --arg server "$1" --argjson rep "$2" --argjson seconds "$3" --argjson failed "$4" \
        --argjson slowest "$5" --argjson upstream "$6" --argjson clients "$STORM_CLIENTS" \
        --argjson mib "$((KERNEL_MIB + INITRD_MIB))" '
        {server: $server, rep: $rep, clients: $clients, mib_each: $mib, seconds: $seconds,
         failed: $failed, slowest_client_seconds: $slowest, upstream_fetches: $upstream,
         gib_per_s: ((1000 * ($clients - $failed) * $mib / 1024 / $seconds | round) / 1000)}' |
        tee -a "$RESULTS_DIR/storm.jsonl" |
        jq -r '"    \(.server) rep \(.rep): \(.clients) clients x \(.mib_each) MiB in \(.seconds) s (\(.gib_per_s) GiB/s), slowest client \(.slowest_client_seconds) s, \(.failed) failed, upstream fetches \(.upstream_fetches)"' >&2
}

# --- The relay, cold each time.
for rep in $(seq 1 "$REPS"); do
    HTTP=$(free_port)
    RMETRICS=$(free_port)
    RDIR=$WORK/relay-$rep
    mkdir -p "$RDIR/boot"
    cat >"$WORK/relay-$rep.toml" <<EOF
name = "storm"
data_dir = "$RDIR/data"
metrics_listen = "127.0.0.1:$RMETRICS"
[coordinators]
endpoints = ["127.0.0.1:$GRPC"]
ca = "$TLS/ca.pem"
cert = "$TLS/relay.pem"
key = "$TLS/relay-key.pem"
[dhcp]
enabled = false
[tftp]
enabled = false
[http]
listen = "127.0.0.1:$HTTP"
[boot]
dir = "$RDIR/boot"
[cache]
prefetch = false
# All STORM_CLIENTS curl clients share 127.0.0.1: no per-client cap.
[limits]
http_per_client = 0
EOF
    RUST_LOG=warn "$BIN/pxemesh-relay" --config "$WORK/relay-$rep.toml" >"$WORK/relay-$rep.log" 2>&1 &
    RPID=$!
    PIDS+=($RPID)
    wait_http "http://127.0.0.1:$RMETRICS/metrics" || die "relay did not start; $WORK/relay-$rep.log"
    # Until the manifest arrived (sync revision > 0); nothing is cached.
    for _ in $(seq 1 100); do
        r=$(metric "$RMETRICS" pxemesh_relay_sync_revision)
        [ "${r:-0}" -gt 0 ] 2>/dev/null && break
        sleep 0.1
    done
    [ "$(metric "$RMETRICS" pxemesh_relay_cache_bytes)" = 0 ] || die "relay cache not cold"
    read -r secs failed slowest < <(storm "relay-$rep" \
        "http://127.0.0.1:$HTTP/files/images/storm/vmlinuz" \
        "http://127.0.0.1:$HTTP/files/images/storm/initrd.img")
    up=$(metric "$RMETRICS" pxemesh_relay_cache_upstream_fetches_total)
    record relay-cold "$rep" "$secs" "$failed" "$slowest" "${up:-0}"
    kill -TERM "$RPID"; wait "$RPID" 2>/dev/null || true
done

# --- nginx with a local copy.
NPORT=$(free_port)
mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$NPORT;
        root $CONTENT;
    }
}
EOF
nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" &
PIDS+=($!)
wait_http "http://127.0.0.1:$NPORT/storm/vmlinuz" || die "nginx did not start; $WORK/nginx/error.log"
for rep in $(seq 1 "$REPS"); do
    read -r secs failed slowest < <(storm "nginx-$rep" \
        "http://127.0.0.1:$NPORT/storm/vmlinuz" "http://127.0.0.1:$NPORT/storm/initrd.img")
    record nginx-local "$rep" "$secs" "$failed" "$slowest" 0
done

# --- Summary: medians.
med() { jq -s --arg s "$1" '[.[] | select(.server == $s) | .seconds] | sort | .[(length - 1) / 2 | floor]' "$RESULTS_DIR/storm.jsonl"; }
R=$(med relay-cold)
N=$(med nginx-local)
{
    echo "## Cold-cache boot storm ($(date -u +%F), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB)"
    echo
    echo "$STORM_CLIENTS clients x (${KERNEL_MIB} MiB kernel + ${INITRD_MIB} MiB initrd), median of $REPS:"
    echo
    echo "| server | all clients done (s) |"
    echo "|---|---|"
    echo "| pxemesh-relay, cold cache (fetch from coordinator + verify, then serve) | $R |"
    echo "| nginx, local copy | $N |"
    echo
    echo "Ratio relay/nginx (time): $(awk -v a="$R" -v b="$N" 'BEGIN { printf "%.2f", a / b }')"
} | tee "$RESULTS_DIR/summary.md"
