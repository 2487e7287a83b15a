#!/usr/bin/env bash
# The relay (pxemesh-relay, release build) against the reference servers, on
# this machine, in one run, under the same conditions:
#
#   relay/bench/relay-vs-references.sh [dhcp|tftp|http|all]...   (default: all)
#
#   dhcp  perfdhcp (kea-admin) against the relay and against Kea 2.2 (memfile):
#         the highest DORA rate with <= DHCP_MAX_DROP % lost exchanges, found
#         by an ascending search and a short bisection, each point DHCP_SECONDS
#         long and started on an empty lease store; then DHCP_STALL_RUNS
#         repeated runs at DHCP_STALL_RATE for each server.
#   tftp  one 64 MiB transfer (blksize 1456, windowsize 1/8/16; median of
#         TFTP_REPS) against the relay, atftpd and tftpd-hpa; then TFTP_CONC
#         concurrent 1 MiB transfers against the relay and dnsmasq's TFTP.
#   http  HTTP_CONC concurrent downloads of one HTTP_SIZE_MIB file (curl)
#         against the relay's /files/ and nginx (median of HTTP_REPS).
#
# Network: everything runs inside network namespaces this script creates and
# deletes: DHCP in two namespaces joined by one veth pair (no link to the root
# namespace, so no route out), TFTP and HTTP on the loopback of a third one.
# Every server is a foreground process started here and stopped on exit
# (also on failure or Ctrl-C); no system service is used.
#
# Before each measurement the script waits (up to LOAD_WAIT s) until the
# 1-minute load average is below LOAD_MAX, and records the load average at the
# start and the end of the measurement.
#
# Results: RESULTS_DIR (default target/bench-results/relay-<utc time>/):
# dhcp.jsonl, tftp.jsonl, http.jsonl (one JSON object per measurement),
# environment.json, summary.md (also printed), and the server logs.
#
# Knobs (environment), defaults in brackets:
#   DHCP_CLIENTS [50000]  DHCP_SECONDS [10]  DHCP_MAX_DROP [2.5]
#   DHCP_RATES ["100 250 500 1000 2000 4000 8000 16000 32000"]  DHCP_BISECT [3]
#   DHCP_STALL_RUNS [5]  DHCP_STALL_RATE [500]  DHCP_SEARCH [1] (0: repeated runs only)
#   DHCP_SERVERS ["relay kea"] (a subset, to probe one server)
#   DHCP_THREAD_MODE [single] perfdhcp -g: on 2 cores its "multi" mode (a
#     receiver thread) costs the client ~25 % more CPU, taken from the server
#     under test; both servers are measured with the same mode
#   DHCP_PIN [0] 1: server on CPU 0, perfdhcp on CPU 1 (taskset). It keeps
#     a multi-threaded server off the client's core, but on this 2-vCPU VM
#     it cost Kea a third of its rate (docs/benchmarks.md), so it is off
#   TFTP_REPS [3]  TFTP_SIZE_MIB [64]  TFTP_BLKSIZE [1456]  TFTP_WINDOWS ["1 8 16"]
#   TFTP_CONC [500]  TFTP_CONC_REPS [3]
#   HTTP_CONC [100]  HTTP_SIZE_MIB [100]  HTTP_REPS [3]
#   LOAD_MAX [0.5]  LOAD_WAIT [1200]  RELAY_LOG [warn]
#   DATA_TMPDIR [/var/tmp]: lease/state files of the relay and Kea (a disk)
#   CONTENT_TMPDIR [/dev/shm]: the files served over TFTP and HTTP (tmpfs)
#   SKIP_BUILD [0]  KEEP_WORKDIR [0]  RESULTS_DIR
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DHCP_CLIENTS=${DHCP_CLIENTS:-50000}
DHCP_SECONDS=${DHCP_SECONDS:-10}
DHCP_MAX_DROP=${DHCP_MAX_DROP:-2.5}
DHCP_RATES=${DHCP_RATES:-"100 250 500 1000 2000 4000 8000 16000 32000"}
DHCP_BISECT=${DHCP_BISECT:-3}
DHCP_STALL_RUNS=${DHCP_STALL_RUNS:-5}
DHCP_STALL_RATE=${DHCP_STALL_RATE:-500}
DHCP_SEARCH=${DHCP_SEARCH:-1}
DHCP_SERVERS=${DHCP_SERVERS:-"relay kea"}
DHCP_THREAD_MODE=${DHCP_THREAD_MODE:-single}
DHCP_PIN=${DHCP_PIN:-0}
TFTP_REPS=${TFTP_REPS:-3}
TFTP_SIZE_MIB=${TFTP_SIZE_MIB:-64}
TFTP_BLKSIZE=${TFTP_BLKSIZE:-1456}
TFTP_WINDOWS=${TFTP_WINDOWS:-"1 8 16"}
TFTP_CONC=${TFTP_CONC:-500}
TFTP_CONC_REPS=${TFTP_CONC_REPS:-3}
HTTP_CONC=${HTTP_CONC:-100}
HTTP_SIZE_MIB=${HTTP_SIZE_MIB:-100}
HTTP_REPS=${HTTP_REPS:-3}
LOAD_MAX=${LOAD_MAX:-0.5}
LOAD_WAIT=${LOAD_WAIT:-1200}
RELAY_LOG=${RELAY_LOG:-warn}
DATA_TMPDIR=${DATA_TMPDIR:-/var/tmp}
CONTENT_TMPDIR=${CONTENT_TMPDIR:-/dev/shm}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-results/relay-$(date -u +%Y%m%dT%H%M%SZ)}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

WHAT=()
for a in "${@:-all}"; do
    case $a in
        dhcp | tftp | http) WHAT+=("$a") ;;
        all) WHAT+=(dhcp tftp http) ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown benchmark '$a' (dhcp, tftp, http or all)" ;;
    esac
done
want() { local w; for w in "${WHAT[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, port 67/69)"

# ---------------------------------------------------------------------------
# Cleanup: stop every process we started, delete our namespaces and files.
# ---------------------------------------------------------------------------
PIDS=()
NETNS=()
WORK=""
CONTENT=""
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# stop_pid PID: SIGTERM, up to 10 s, then SIGKILL. STOPPED_BY: "term" or "kill".
STOPPED_BY=""
stop_pid() {
    local pid=$1 how=term
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        how="kill"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
    STOPPED_BY=$how
}
cleanup() {
    local rc=$? pid ns
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        local any=0
        for pid in "${PIDS[@]}"; do alive "$pid" && any=1; done
        [ "$any" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
    for ns in "${NETNS[@]}"; do
        # Anything still running in the namespace was started by us.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    [ -n "$CONTENT" ] && rm -rf "$CONTENT"
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
# Packages. Services the packages would start are kept from starting
# (policy-rc.d) and disabled; we run every server ourselves in the foreground.
# ---------------------------------------------------------------------------
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || {
        [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
        die "apt-get install $* failed"
    }
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || apt_install "$2"
}
# atftpd and tftpd-hpa conflict as packages. Whichever is not installed is
# unpacked (not installed) under target/bench-tools and run from there.
TOOLS=$ROOT/target/bench-tools
unpacked() { # unpacked PACKAGE BINARY-PATH -> prints the binary's path
    local pkg=$1 bin=$2 dir=$TOOLS/$1
    if [ ! -x "$dir$bin" ]; then
        if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
        log "unpacking $pkg into $dir (conflicts with an installed package)"
        rm -rf "$dir"
        mkdir -p "$dir"
        (cd "$dir" && apt-get download -o APT::Sandbox::User=root "$pkg" >/dev/null 2>&1) ||
            die "apt-get download $pkg failed"
        dpkg-deb -x "$dir"/"$pkg"_*.deb "$dir"
    fi
    echo "$dir$bin"
}

need jq jq
need curl curl
need ss iproute2
if want dhcp; then
    need perfdhcp kea-admin
    need kea-dhcp4 kea-dhcp4-server
fi
ATFTPD=/usr/sbin/atftpd
TFTPD_HPA=/usr/sbin/in.tftpd
if want tftp; then
    need atftp atftp
    need dnsmasq dnsmasq
    if [ ! -x "$ATFTPD" ] && [ ! -x "$TFTPD_HPA" ]; then apt_install tftpd-hpa; fi
    [ -x "$TFTPD_HPA" ] || TFTPD_HPA=$(unpacked tftpd-hpa /usr/sbin/in.tftpd)
    [ -x "$ATFTPD" ] || ATFTPD=$(unpacked atftpd /usr/sbin/atftpd)
fi
if want http; then
    need nginx nginx
fi
# A service the packages started (on a machine with systemd) would compete for
# the CPUs: stop and disable it.
if [ -d /run/systemd/system ]; then
    for svc in kea-dhcp4-server tftpd-hpa atftpd dnsmasq nginx; do
        if systemctl is-active --quiet "$svc" 2>/dev/null || systemctl is-enabled --quiet "$svc" 2>/dev/null; then
            log "stopping and disabling the $svc service (the benchmark runs its own)"
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
    done
fi
for p in kea-dhcp4 in.tftpd atftpd dnsmasq nginx; do
    if pgrep -x "$p" >/dev/null; then
        log "warning: a $p process not started by this script is running ($(pgrep -x "$p" | tr '\n' ' ')); it may compete for the CPUs"
    fi
done

cd "$ROOT"
if [ "$SKIP_BUILD" != 1 ]; then
    log "building the relay: cargo build --release -p pxemesh-relay"
    cargo build --release -p pxemesh-relay >&2
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
RELAY=$TARGET_DIR/release/pxemesh-relay
[ -x "$RELAY" ] || die "$RELAY missing (build failed?)"

mkdir -p "$RESULTS_DIR" "$DATA_TMPDIR" "$CONTENT_TMPDIR"
WORK=$(mktemp -d "$DATA_TMPDIR/pxemesh-relay-bench.XXXXXX")
CONTENT=$(mktemp -d "$CONTENT_TMPDIR/pxemesh-relay-bench.XXXXXX")
# Unprivileged server workers (nginx, atftpd, tftpd-hpa) must read the content.
chmod 755 "$WORK" "$CONTENT"
log "work $WORK ($(df -T "$WORK" | awk 'NR==2 {print $2}')), content $CONTENT ($(df -T "$CONTENT" | awk 'NR==2 {print $2}')), results $RESULTS_DIR"

TAG="pxmb$$"
new_netns() { # new_netns NAME
    ip netns add "$1"
    NETNS+=("$1")
    ip -n "$1" link set lo up
}
# in_ns NS CMD...: run in the namespace
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
# start NS LOG CMD...: start a server in the namespace; its pid in STARTED.
STARTED=0
start() {
    local ns=$1 logf=$2
    shift 2
    ip netns exec "$ns" "$@" </dev/null >>"$logf" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}
# wait_udp NS PORT / wait_tcp NS PORT: until something listens (10 s).
wait_listen() {
    local ns=$1 proto=$2 port=$3 pid=$4
    for _ in $(seq 1 100); do
        alive "$pid" || return 1
        if in_ns "$ns" ss -Hln"$proto" "sport = :$port" | grep -q .; then return 0; fi
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------------------
# Load: wait for a quiet machine, record the load average.
# ---------------------------------------------------------------------------
load1() { awk '{print $1}' /proc/loadavg; }
wait_load() {
    local waited=0 l
    while :; do
        l=$(load1)
        awk -v l="$l" -v m="$LOAD_MAX" 'BEGIN { exit !(l < m) }' && return 0
        if [ "$waited" -ge "$LOAD_WAIT" ]; then
            log "warning: load average still $l after ${LOAD_WAIT}s; measuring anyway"
            return 0
        fi
        [ "$waited" = 0 ] && log "load average $l >= $LOAD_MAX; waiting (up to ${LOAD_WAIT}s)"
        sleep 5
        waited=$((waited + 5))
    done
}
# CPU seconds (user+system, with reaped children) of PID and its descendants.
tree_pids() {
    local p=$1 c kids
    echo "$p"
    kids=$(cat /proc/"$p"/task/*/children 2>/dev/null || true)
    for c in $kids; do tree_pids "$c"; done
}
cpu_ticks() {
    local t=0 p v
    for p in $(tree_pids "$1"); do
        v=$(awk '{print $14 + $15 + $16 + $17}' /proc/"$p"/stat 2>/dev/null || echo 0)
        t=$((t + v))
    done
    echo "$t"
}
ticks_s() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", t / hz }'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "null"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# ===========================================================================
# DHCP
# ===========================================================================
# Namespace S: the server on s0 (198.18.0.1/16); namespace C: perfdhcp on c0
# (198.18.0.2/16). perfdhcp acts as a relay agent (giaddr 198.18.0.2, source
# port 67), so the server's network must contain 198.18.0.2 and answers go to
# 198.18.0.2:67. 198.18.0.0/15 is the RFC 2544 benchmarking range.
DHCP_SERVER_IP=198.18.0.1
DHCP_CLIENT_IP=198.18.0.2
DHCP_POOL_FIRST=198.18.1.0
DHCP_POOL_LAST=198.18.235.255 # 60 160 addresses, more than DHCP_CLIENTS
NS_S=$TAG-s
NS_C=$TAG-c

dhcp_setup() {
    new_netns "$NS_S"
    new_netns "$NS_C"
    # Created inside S with its peer inside C: never in the root namespace.
    ip -n "$NS_S" link add s0 type veth peer name c0 netns "$NS_C"
    ip -n "$NS_S" addr add "$DHCP_SERVER_IP/16" dev s0
    ip -n "$NS_C" addr add "$DHCP_CLIENT_IP/16" dev c0
    ip -n "$NS_S" link set s0 up
    ip -n "$NS_C" link set c0 up
    local d=$WORK/dhcp
    mkdir -p "$d"
    cat >"$d/rack.toml" <<EOF
rack = "bench"
[[networks]]
name = "bench"
rack = "bench"
subnet = "198.18.0.0/16"
gateway = "$DHCP_SERVER_IP"
mtu = 1500
pool = ["$DHCP_POOL_FIRST", "$DHCP_POOL_LAST"]
lease_seconds = 3600
EOF
}

# The server's config for one point; its state starts empty every time.
dhcp_start() { # dhcp_start relay|kea DIR -> STARTED
    local server=$1 d=$2
    rm -rf "$d"
    mkdir -p "$d"
    case $server in
        relay)
            cat >"$d/relay.toml" <<EOF
name = "bench"
data_dir = "$d/data"
static_state = "$WORK/dhcp/rack.toml"
metrics_listen = "127.0.0.1:9200"
[[interfaces]]
name = "s0"
address = "$DHCP_SERVER_IP"
[tftp]
enabled = false
[http]
enabled = false
[boot]
dir = "$d"
EOF
            start "$NS_S" "$d/server.log" "$RELAY" --config "$d/relay.toml" --log "$RELAY_LOG"
            ;;
        kea)
            cat >"$d/kea-dhcp4.json" <<EOF
{ "Dhcp4": {
    "interfaces-config": { "interfaces": [ "s0" ], "dhcp-socket-type": "udp" },
    "lease-database": { "type": "memfile", "persist": true, "name": "$d/leases4.csv", "lfc-interval": 0 },
    "valid-lifetime": 3600, "renew-timer": 1800, "rebind-timer": 3150,
    "subnet4": [ { "id": 1, "subnet": "198.18.0.0/16",
                   "pools": [ { "pool": "$DHCP_POOL_FIRST - $DHCP_POOL_LAST" } ],
                   "option-data": [ { "name": "routers", "data": "$DHCP_SERVER_IP" } ] } ],
    "loggers": [ { "name": "kea-dhcp4", "severity": "WARN",
                   "output_options": [ { "output": "$d/kea.log" } ] } ]
} }
EOF
            start "$NS_S" "$d/server.log" env KEA_PIDFILE_DIR="$d" KEA_LOCKFILE_DIR="$d" \
                kea-dhcp4 -c "$d/kea-dhcp4.json"
            ;;
    esac
    wait_listen "$NS_S" u 67 "$STARTED" || die "$server did not start listening on port 67; log: $d/server.log"
    # Every thread of the server (later ones inherit it from their creator).
    if [ "$DHCP_PIN" = 1 ]; then taskset -a -p -c 0 "$STARTED" >/dev/null; fi
}

rcvbuf_errors() { in_ns "$1" cat /proc/net/snmp | awk '/^Udp:/ { if (h) { print $6; exit } h = 1 }'; }

# p99 of "sent / received: S.us / S.us" lines after the given header (ms).
p99_of() { # FILE HEADER
    awk -v h="$2" '
        index($0, "***Timestamps for packets: " h) { on = 1; next }
        /^\*\*\*/ { on = 0 }
        on && /^sent \/ received:/ { print ($6 - $4) * 1000 }' "$1" |
        sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "null"; else { i = int(NR * 0.99 + 0.999); if (i > NR) i = NR; printf "%.3f", v[i] } }'
}

# dhcp_point SERVER RATE KIND: one measurement; appends to dhcp.jsonl, sets
# POINT_PASS to true or false.
POINT_PASS=false
dhcp_point() {
    local server=$1 rate=$2 kind=$3 d=$WORK/dhcp/$1 out
    out=$RESULTS_DIR/dhcp-$server-$kind-$rate-$(date +%H%M%S).txt
    dhcp_start "$server" "$d"
    local pid=$STARTED
    wait_load
    local l0 l1 c0 c1 e0 e1 ce0 ce1 t0 t1 rc=0
    l0=$(load1)
    c0=$(cpu_ticks "$pid")
    e0=$(rcvbuf_errors "$NS_S")
    ce0=$(rcvbuf_errors "$NS_C")
    t0=$(now)
    local pin=()
    if [ "$DHCP_PIN" = 1 ]; then pin=(taskset -c 1); fi
    in_ns "$NS_C" "${pin[@]}" perfdhcp -4 -g "$DHCP_THREAD_MODE" -r "$rate" -R "$DHCP_CLIENTS" -p "$DHCP_SECONDS" -W 1000000 -x t \
        -l "$DHCP_CLIENT_IP" "$DHCP_SERVER_IP" >"$out" 2>&1 || rc=$?
    t1=$(now)
    c1=$(cpu_ticks "$pid")
    e1=$(rcvbuf_errors "$NS_S")
    ce1=$(rcvbuf_errors "$NS_C")
    l1=$(load1)
    local offers=null acks=null
    if [ "$server" = relay ]; then
        local m
        m=$(in_ns "$NS_S" curl -s --max-time 5 http://127.0.0.1:9200/metrics || true)
        offers=$(awk -F' ' '/^pxemesh_relay_dhcp_messages_total\{.*outcome="offer"/ { s += $2 } END { print s + 0 }' <<<"$m")
        acks=$(awk -F' ' '/^pxemesh_relay_dhcp_messages_total\{.*outcome="ack"/ { s += $2 } END { print s + 0 }' <<<"$m")
    fi
    stop_pid "$pid"
    local stop=$STOPPED_BY
    local lease_bytes
    lease_bytes=$(du -sb "$d" | awk '{print $1}')
    cp "$d/server.log" "$RESULTS_DIR/dhcp-$server-$kind-$rate-server.log" 2>/dev/null || true
    # Counters from perfdhcp's report: DISCOVER-OFFER first, REQUEST-ACK second.
    local do_sent do_recv ra_sent ra_recv do_avg ra_avg do_p99 ra_p99
    do_sent=$(awk '/^sent packets:/ { n++; if (n == 1) print $3 }' "$out")
    do_recv=$(awk '/^received packets:/ { n++; if (n == 1) print $3 }' "$out")
    ra_sent=$(awk '/^sent packets:/ { n++; if (n == 2) print $3 }' "$out")
    ra_recv=$(awk '/^received packets:/ { n++; if (n == 2) print $3 }' "$out")
    do_avg=$(awk '/^avg delay:/ { n++; if (n == 1) print ($3 == "n/a" ? "null" : $3) }' "$out")
    ra_avg=$(awk '/^avg delay:/ { n++; if (n == 2) print ($3 == "n/a" ? "null" : $3) }' "$out")
    do_p99=$(p99_of "$out" DISCOVER-OFFER)
    ra_p99=$(p99_of "$out" REQUEST-ACK)
    # Keep the report, not the per-packet timestamps (megabytes).
    sed -i '/^sent \/ received:/d' "$out"
    local json
    json=$(jq -nc --arg server "$server" --arg kind "$kind" --argjson rate "$rate" \
        --argjson clients "$DHCP_CLIENTS" --argjson seconds "$DHCP_SECONDS" --argjson rc "$rc" \
        --argjson do_sent "${do_sent:-0}" --argjson do_recv "${do_recv:-0}" \
        --argjson ra_sent "${ra_sent:-0}" --argjson ra_recv "${ra_recv:-0}" \
        --argjson do_avg "${do_avg:-null}" --argjson ra_avg "${ra_avg:-null}" \
        --argjson do_p99 "${do_p99:-null}" --argjson ra_p99 "${ra_p99:-null}" \
        --argjson rcvbuf "$((e1 - e0))" --argjson client_rcvbuf "$((ce1 - ce0))" --argjson cpu "$(ticks_s $((c1 - c0)))" \
        --argjson wall "$(elapsed "$t0" "$t1")" --argjson load_start "$l0" --argjson load_end "$l1" \
        --argjson offers "$offers" --argjson acks "$acks" --arg stop "$stop" \
        --argjson state_bytes "$lease_bytes" --argjson max_drop "$DHCP_MAX_DROP" --arg report "$(basename "$out")" '
        ($do_sent - $ra_recv) as $lost |
        {server: $server, kind: $kind, rate: $rate, clients: $clients, seconds: $seconds, perfdhcp_exit: $rc,
         discover_sent: $do_sent, offer_received: $do_recv, request_sent: $ra_sent, ack_received: $ra_recv,
         exchange_drop_pct: (if $do_sent > 0 then ((10000 * $lost / $do_sent | round) / 100) else 100 end),
         discover_offer_drop_pct: (if $do_sent > 0 then ((10000 * ($do_sent - $do_recv) / $do_sent | round) / 100) else 100 end),
         request_ack_drop_pct: (if $ra_sent > 0 then ((10000 * ($ra_sent - $ra_recv) / $ra_sent | round) / 100) else null end),
         completed_per_second: (($ra_recv / $seconds) | round),
         sent_fraction: (if $rate > 0 then ((100 * $do_sent / ($rate * $seconds) | round) / 100) else null end),
         do_avg_ms: $do_avg, do_p99_ms: $do_p99, ra_avg_ms: $ra_avg, ra_p99_ms: $ra_p99,
         server_rcvbuf_errors: $rcvbuf, client_rcvbuf_errors: $client_rcvbuf, server_cpu_seconds: $cpu, wall_seconds: $wall,
         load_start: $load_start, load_end: $load_end,
         relay_offers_decided: $offers, relay_acks_decided: $acks,
         server_stopped_by: $stop, server_state_bytes: $state_bytes, report: $report}
        | . + {pass: (.exchange_drop_pct <= $max_drop and .sent_fraction >= 0.95)}')
    echo "$json" >>"$RESULTS_DIR/dhcp.jsonl"
    jq -r '"    \(.server) \(.kind) rate \(.rate)/s: sent \(.discover_sent) DISCOVER, \(.ack_received) ACK back, exchange drops \(.exchange_drop_pct)% (DO \(.discover_offer_drop_pct)%, RA \(.request_ack_drop_pct)%), DO avg/p99 \(.do_avg_ms)/\(.do_p99_ms) ms, RA avg/p99 \(.ra_avg_ms)/\(.ra_p99_ms) ms, rcvbuf errors server \(.server_rcvbuf_errors) client \(.client_rcvbuf_errors), server CPU \(.server_cpu_seconds) s, stopped by \(.server_stopped_by), load \(.load_start)->\(.load_end) => \(if .pass then "PASS" else "FAIL" end)"' <<<"$json" >&2
    POINT_PASS=$(jq -r '.pass' <<<"$json")
}

# Ascending search, then bisection between the last passing and first failing rate.
dhcp_search() {
    local server=$1 ok=0 bad=0 r
    log "DHCP $server: ascending search over rates $DHCP_RATES (${DHCP_SECONDS}s each, $DHCP_CLIENTS clients)"
    for r in $DHCP_RATES; do
        dhcp_point "$server" "$r" search
        if [ "$POINT_PASS" = true ]; then ok=$r; else bad=$r; break; fi
    done
    if [ "$bad" != 0 ]; then
        local i mid
        for i in $(seq 1 "$DHCP_BISECT"); do
            mid=$(((ok + bad) / 2))
            mid=$((mid / 50 * 50))
            [ "$mid" -le "$ok" ] && break
            [ "$mid" -ge "$bad" ] && break
            log "DHCP $server: bisect step $i between $ok and $bad: $mid"
            dhcp_point "$server" "$mid" search
            if [ "$POINT_PASS" = true ]; then ok=$mid; else bad=$mid; fi
        done
    fi
    log "DHCP $server: highest passing rate $ok/s (first failing: $([ "$bad" = 0 ] && echo none || echo "$bad/s"))"
    jq -nc --arg server "$server" --argjson ok "$ok" --argjson bad "$bad" \
        '{server: $server, max_rate: $ok, first_failing_rate: (if $bad == 0 then null else $bad end)}' \
        >>"$RESULTS_DIR/dhcp-max.jsonl"
}

run_dhcp() {
    dhcp_setup
    local s i
    if [ "$DHCP_SEARCH" = 1 ]; then
        for s in $DHCP_SERVERS; do dhcp_search "$s"; done
    fi
    if [ "$DHCP_STALL_RUNS" -gt 0 ]; then
        for s in $DHCP_SERVERS; do
            log "DHCP $s: $DHCP_STALL_RUNS repeated runs at $DHCP_STALL_RATE/s"
            for i in $(seq 1 "$DHCP_STALL_RUNS"); do dhcp_point "$s" "$DHCP_STALL_RATE" repeat; done
        done
    fi
}

# ===========================================================================
# TFTP and HTTP: one namespace, servers and clients on its loopback
# ===========================================================================
NS_T=$TAG-t
content_setup() {
    [ -n "${CONTENT_READY:-}" ] && return 0
    new_netns "$NS_T"
    # glibc's getaddrinfo(AI_ADDRCONFIG) returns no IPv4 address when the only
    # one is on lo, and tftpd-hpa then refuses to start: give the namespace a
    # veth pair whose both ends stay inside it (198.19.0.0/16 is RFC 2544
    # benchmarking space; nothing is ever sent there).
    ip -n "$NS_T" link add t0 type veth peer name t1
    ip -n "$NS_T" addr add 198.19.0.1/32 dev t0
    ip -n "$NS_T" link set t0 up
    ip -n "$NS_T" link set t1 up
    mkdir -p "$CONTENT/root" "$CONTENT/out"
    chmod 755 "$CONTENT/root"
    log "writing content: ${TFTP_SIZE_MIB} MiB, 1 MiB and ${HTTP_SIZE_MIB} MiB random files"
    head -c "$((TFTP_SIZE_MIB * 1048576))" /dev/urandom >"$CONTENT/root/tftp-big.bin"
    head -c 1048576 /dev/urandom >"$CONTENT/root/tftp-1m.bin"
    head -c "$((HTTP_SIZE_MIB * 1048576))" /dev/urandom >"$CONTENT/root/http-big.bin"
    chmod 644 "$CONTENT"/root/*
    printf 'rack = "bench"\n' >"$WORK/empty-rack.toml"
    CONTENT_READY=1
}

relay_content_start() { # relay_content_start tftp|http -> STARTED
    local what=$1 d=$WORK/relay-$1
    rm -rf "$d"
    mkdir -p "$d"
    {
        printf 'name = "bench"\ndata_dir = "%s"\nstatic_state = "%s"\n' "$d/data" "$WORK/empty-rack.toml"
        printf '[dhcp]\nenabled = false\n'
        if [ "$what" = tftp ]; then
            printf '[tftp]\nlisten = "127.0.0.1:69"\n[http]\nenabled = false\n'
        else
            printf '[tftp]\nenabled = false\n[http]\nlisten = "127.0.0.1:80"\n'
        fi
        printf '[boot]\ndir = "%s"\n' "$CONTENT/root"
        # Every benchmark client shares one address (127.0.0.1): lift the
        # per-client caps, as the references' caps are lifted above/below.
        printf '[limits]\ntftp_per_client = 0\nhttp_per_client = 0\n'
    } >"$d/relay.toml"
    start "$NS_T" "$d/relay.log" "$RELAY" --config "$d/relay.toml" --log "$RELAY_LOG"
    if [ "$what" = tftp ]; then
        wait_listen "$NS_T" u 69 "$STARTED" || die "relay TFTP did not start; $d/relay.log"
    else
        wait_listen "$NS_T" t 80 "$STARTED" || die "relay HTTP did not start; $d/relay.log"
    fi
}

tftp_server_start() { # relay|atftpd|tftpd-hpa|dnsmasq -> STARTED
    local d=$WORK/tftp-$1
    mkdir -p "$d"
    case $1 in
        relay) relay_content_start tftp ;;
        atftpd)
            # -m: concurrent transfers (threads), default 100.
            start "$NS_T" "$d/server.log" "$ATFTPD" --daemon --no-fork --port 69 --bind-address 127.0.0.1 \
                --logfile "$d/atftpd.log" -m 1000 "$CONTENT/root"
            ;;
        tftpd-hpa)
            start "$NS_T" "$d/server.log" "$TFTPD_HPA" -L -a 127.0.0.1:69 -s "$CONTENT/root"
            ;;
        dnsmasq)
            # --port=0: no DNS. --tftp-max: concurrent transfers, default 50.
            start "$NS_T" "$d/server.log" dnsmasq -k --conf-file=/dev/null --port=0 --enable-tftp \
                --tftp-root="$CONTENT/root" --tftp-max=1000 --listen-address=127.0.0.1 --bind-interfaces \
                --user=root --pid-file="$d/dnsmasq.pid" --log-facility="$d/dnsmasq.log"
            ;;
    esac
    [ "$1" = relay ] || wait_listen "$NS_T" u 69 "$STARTED" || die "$1 did not start; $d/server.log"
}

# Whether the server acknowledges windowsize (its OACK), from one small transfer.
tftp_oack() {
    in_ns "$NS_T" atftp --trace --option "blksize $TFTP_BLKSIZE" --option "windowsize 8" \
        -g -r tftp-1m.bin -l "$CONTENT/out/probe" 127.0.0.1 69 >"$CONTENT/out/probe.trace" 2>&1 || true
    grep -m1 'received OACK' "$CONTENT/out/probe.trace" || echo "no OACK"
}

run_tftp_single() {
    local server pid ws rep oack
    for server in relay atftpd tftpd-hpa; do
        tftp_server_start "$server"
        pid=$STARTED
        oack=$(tftp_oack)
        log "TFTP $server: OACK to 'blksize $TFTP_BLKSIZE, windowsize 8': $oack"
        for ws in $TFTP_WINDOWS; do
            for rep in $(seq 1 "$TFTP_REPS"); do
                rm -f "$CONTENT/out/big"
                wait_load
                local l0 l1 c0 c1 t0 t1 rc=0 ok=false
                l0=$(load1)
                c0=$(cpu_ticks "$pid")
                t0=$(now)
                in_ns "$NS_T" timeout 600 atftp --option "blksize $TFTP_BLKSIZE" --option "windowsize $ws" \
                    -g -r tftp-big.bin -l "$CONTENT/out/big" 127.0.0.1 69 >/dev/null 2>&1 || rc=$?
                t1=$(now)
                c1=$(cpu_ticks "$pid")
                l1=$(load1)
                cmp -s "$CONTENT/out/big" "$CONTENT/root/tftp-big.bin" && [ "$rc" = 0 ] && ok=true
                jq -nc --arg server "$server" --argjson ws "$ws" --argjson rep "$rep" --argjson ok "$ok" \
                    --argjson rc "$rc" --argjson seconds "$(elapsed "$t0" "$t1")" --argjson mib "$TFTP_SIZE_MIB" \
                    --argjson blksize "$TFTP_BLKSIZE" --arg oack "$oack" \
                    --argjson ws_acked "$(grep -q windowsize <<<"$oack" && echo true || echo false)" \
                    --argjson cpu "$(ticks_s $((c1 - c0)))" --argjson load_start "$l0" --argjson load_end "$l1" '
                    {test: "single", server: $server, blksize: $blksize, windowsize: $ws, windowsize_acked: $ws_acked,
                     rep: $rep, ok: $ok, client_exit: $rc, seconds: $seconds, mib: $mib,
                     mib_per_s: ((100 * $mib / $seconds | round) / 100), server_cpu_seconds: $cpu,
                     load_start: $load_start, load_end: $load_end, oack: $oack}' |
                    tee -a "$RESULTS_DIR/tftp.jsonl" |
                    jq -r '"    \(.server) windowsize \(.windowsize) rep \(.rep): \(.seconds) s (\(.mib_per_s) MiB/s) \(if .ok then "ok" else "FAILED" end), server CPU \(.server_cpu_seconds) s, load \(.load_start)->\(.load_end)"' >&2
            done
        done
        stop_pid "$pid"
        cp "$WORK"/tftp-"$server"/*.log "$RESULTS_DIR/" 2>/dev/null || true
    done
    rm -f "$CONTENT/out/big"
}

run_tftp_conc() {
    local server pid rep i
    for server in relay dnsmasq; do
        tftp_server_start "$server"
        pid=$STARTED
        for rep in $(seq 1 "$TFTP_CONC_REPS"); do
            rm -rf "$CONTENT/out/conc"
            mkdir -p "$CONTENT/out/conc"
            wait_load
            local l0 l1 c0 c1 t0 t1 kids=() failed=0 rc
            l0=$(load1)
            c0=$(cpu_ticks "$pid")
            t0=$(now)
            # TFTP_CONC clients at once, each bounded by a timeout.
            for i in $(seq 1 "$TFTP_CONC"); do
                ip netns exec "$NS_T" timeout 300 atftp --option "blksize $TFTP_BLKSIZE" \
                    -g -r tftp-1m.bin -l "$CONTENT/out/conc/$i" 127.0.0.1 69 >/dev/null 2>&1 &
                kids+=($!)
            done
            for i in "${!kids[@]}"; do
                rc=0
                wait "${kids[$i]}" || rc=$?
                if [ "$rc" != 0 ] || [ "$(stat -c %s "$CONTENT/out/conc/$((i + 1))" 2>/dev/null || echo 0)" != 1048576 ]; then
                    failed=$((failed + 1))
                fi
            done
            t1=$(now)
            c1=$(cpu_ticks "$pid")
            l1=$(load1)
            jq -nc --arg server "$server" --argjson rep "$rep" --argjson n "$TFTP_CONC" --argjson failed "$failed" \
                --argjson blksize "$TFTP_BLKSIZE" --argjson seconds "$(elapsed "$t0" "$t1")" \
                --argjson cpu "$(ticks_s $((c1 - c0)))" --argjson load_start "$l0" --argjson load_end "$l1" '
                {test: "concurrent", server: $server, rep: $rep, transfers: $n, mib_each: 1, blksize: $blksize,
                 windowsize: 1, failed: $failed, seconds: $seconds, server_cpu_seconds: $cpu,
                 load_start: $load_start, load_end: $load_end}' |
                tee -a "$RESULTS_DIR/tftp.jsonl" |
                jq -r '"    \(.server) \(.transfers) x 1 MiB rep \(.rep): \(.seconds) s, \(.failed) failed, server CPU \(.server_cpu_seconds) s, load \(.load_start)->\(.load_end)"' >&2
        done
        stop_pid "$pid"
    done
    rm -rf "$CONTENT/out/conc"
}

run_tftp() {
    content_setup
    log "TFTP: one ${TFTP_SIZE_MIB} MiB transfer, blksize $TFTP_BLKSIZE, windowsize $TFTP_WINDOWS, $TFTP_REPS times each"
    run_tftp_single
    log "TFTP: $TFTP_CONC concurrent 1 MiB transfers, $TFTP_CONC_REPS times each"
    run_tftp_conc
}

# ===========================================================================
# HTTP
# ===========================================================================
nginx_start() { # -> STARTED
    local d=$WORK/nginx
    mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    default_type application/octet-stream;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    server {
        listen 127.0.0.1:80;
        root $CONTENT/root;
    }
}
EOF
    start "$NS_T" "$d/server.log" nginx -p "$d" -e "$d/error.log" -c "$d/nginx.conf"
    wait_listen "$NS_T" t 80 "$STARTED" || die "nginx did not start; $d/server.log $d/error.log"
}

run_http() {
    content_setup
    local server pid url rep i bytes=$((HTTP_SIZE_MIB * 1048576))
    log "HTTP: $HTTP_CONC concurrent downloads of a ${HTTP_SIZE_MIB} MiB file, $HTTP_REPS times each, servers alternating"
    # Alternate the servers rep by rep (each started fresh, on the same port)
    # so that a change in machine load affects both alike.
    for rep in $(seq 1 "$HTTP_REPS"); do
    for server in relay nginx; do
        if [ "$server" = relay ]; then
            relay_content_start http
            url=http://127.0.0.1:80/files/http-big.bin
        else
            nginx_start
            url=http://127.0.0.1:80/http-big.bin
        fi
        pid=$STARTED
        # Warm-up (not measured): page cache, and the relay's ETag (sha256 of
        # the file, computed once per file version).
        in_ns "$NS_T" curl -sf -o /dev/null "$url" || die "$server: warm-up download of $url failed"
        {
            rm -rf "$WORK/curl"
            mkdir -p "$WORK/curl"
            wait_load
            local l0 l1 c0 c1 t0 t1 kids=() failed=0
            l0=$(load1)
            c0=$(cpu_ticks "$pid")
            t0=$(now)
            for i in $(seq 1 "$HTTP_CONC"); do
                ip netns exec "$NS_T" curl -s --max-time 600 -o /dev/null \
                    -w '%{http_code} %{size_download} %{time_total}\n' "$url" >"$WORK/curl/$i" 2>&1 &
                kids+=($!)
            done
            for i in "${kids[@]}"; do wait "$i" || true; done
            t1=$(now)
            c1=$(cpu_ticks "$pid")
            l1=$(load1)
            failed=$(cat "$WORK"/curl/* | awk -v b="$bytes" '!($1 == 200 && $2 == b) { n++ } END { print n + 0 }')
            local slowest
            slowest=$(cat "$WORK"/curl/* | awk '{ if ($3 > m) m = $3 } END { print m + 0 }')
            jq -nc --arg server "$server" --argjson rep "$rep" --argjson n "$HTTP_CONC" --argjson failed "$failed" \
                --argjson mib "$HTTP_SIZE_MIB" --argjson seconds "$(elapsed "$t0" "$t1")" --argjson slowest "$slowest" \
                --argjson cpu "$(ticks_s $((c1 - c0)))" --argjson load_start "$l0" --argjson load_end "$l1" '
                {server: $server, rep: $rep, downloads: $n, mib_each: $mib, failed: $failed, seconds: $seconds,
                 slowest_download_seconds: $slowest,
                 gib_per_s: ((1000 * ($n - $failed) * $mib / 1024 / $seconds | round) / 1000),
                 server_cpu_seconds: $cpu, load_start: $load_start, load_end: $load_end}' |
                tee -a "$RESULTS_DIR/http.jsonl" |
                jq -r '"    \(.server) rep \(.rep): \(.downloads) x \(.mib_each) MiB in \(.seconds) s = \(.gib_per_s) GiB/s, \(.failed) failed, server CPU \(.server_cpu_seconds) s, load \(.load_start)->\(.load_end)"' >&2
        }
        stop_pid "$pid"
    done
    done
}

# ===========================================================================
# Run, then summarize
# ===========================================================================
log "benchmarks: ${WHAT[*]}"
for w in dhcp tftp http; do
    want "$w" || continue
    "run_$w"
done

ver() { "$@" 2>&1 | head -1 || true; }
jq -n --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg relay_dirty "$(git -C "$ROOT" status --porcelain -- relay coordinator Cargo.lock 2>/dev/null | grep -q . && echo yes || echo no)" \
    --arg cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" --arg rustc "$(rustc -V 2>/dev/null || echo unknown)" \
    --arg mem "$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" \
    --arg data_fs "$(df -T "$WORK" | awk 'NR==2 {print $2 " on " $1}')" \
    --arg content_fs "$(df -T "$CONTENT" | awk 'NR==2 {print $2 " on " $1}')" \
    --arg kea "$(ver kea-dhcp4 -V)" --arg perfdhcp "$(ver perfdhcp -v)" \
    --arg atftpd "$([ -x "$ATFTPD" ] && ver "$ATFTPD" -V || echo n/a)" \
    --arg tftpd_hpa "$([ -x "$TFTPD_HPA" ] && ver "$TFTPD_HPA" -V || echo n/a)" \
    --arg dnsmasq "$(ver dnsmasq -v)" --arg nginx "$(ver nginx -v)" \
    --arg atftp "$(ver atftp --version)" --arg curl "$(ver curl --version)" \
    --arg relay_log "$RELAY_LOG" \
    '{date: $date, commit: $commit, relay_or_coordinator_dirty: $relay_dirty, cpu: $cpu, nproc: ($nproc | tonumber),
      memory: $mem, kernel: $kernel, rustc: $rustc, data_fs: $data_fs, content_fs: $content_fs,
      kea: $kea, perfdhcp: $perfdhcp, atftpd: $atftpd, tftpd_hpa: $tftpd_hpa, dnsmasq: $dnsmasq,
      nginx: $nginx, atftp: $atftp, curl: $curl, relay_log_level: $relay_log}' 2>/dev/null \
    >"$RESULTS_DIR/environment.json" || true

r2() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0 || a == "null" || b == "null") print "-"; else printf "%.2f", a / b }'; }
summary() {
    if [ -s "$RESULTS_DIR/dhcp-max.jsonl" ]; then
        local rmax kmax
        rmax=$(jq -r 'select(.server == "relay") | .max_rate' "$RESULTS_DIR/dhcp-max.jsonl" | tail -1)
        kmax=$(jq -r 'select(.server == "kea") | .max_rate' "$RESULTS_DIR/dhcp-max.jsonl" | tail -1)
        echo "### DHCP: perfdhcp -g $DHCP_THREAD_MODE, CPU pinning $DHCP_PIN, $DHCP_CLIENTS clients, ${DHCP_SECONDS} s per point, <= $DHCP_MAX_DROP % lost exchanges"
        echo
        echo "| server | highest passing rate (DORA/s) | exchange drops there | DISCOVER-OFFER avg / p99 (ms) | REQUEST-ACK avg / p99 (ms) | server CPU s | first failing rate | drops there |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|"
        local s
        for s in relay kea; do
            jq -rs --arg s "$s" --argjson max "$( [ "$s" = relay ] && echo "${rmax:-0}" || echo "${kmax:-0}")" '
                [ .[] | select(.server == $s and .kind == "search") ] as $pts |
                ([ $pts[] | select(.rate == $max and .pass) ] | last) as $p |
                ([ $pts[] | select(.pass | not) ] | sort_by(.rate) | first) as $f |
                "| \($s) | \($max) | \($p.exchange_drop_pct // "-") % | \($p.do_avg_ms // "-") / \($p.do_p99_ms // "-") | \($p.ra_avg_ms // "-") / \($p.ra_p99_ms // "-") | \($p.server_cpu_seconds // "-") | \($f.rate // "-") | \(if $f then "\($f.exchange_drop_pct) % (sent \($f.sent_fraction * 100 | round) % of the rate\(if $f.server_stopped_by == "kill" then "; ignored SIGTERM" else "" end))" else "-" end) |"' \
                "$RESULTS_DIR/dhcp.jsonl"
        done
        echo
        echo "Ratio relay/Kea: $(r2 "${rmax:-0}" "${kmax:-0}") (goal: >= 2)."
        if jq -e 'select(.kind == "repeat")' "$RESULTS_DIR/dhcp.jsonl" >/dev/null 2>&1; then
            echo
            echo "Repeated runs at $DHCP_STALL_RATE/s (each from an empty lease store):"
            echo
            echo "| server | runs | passing | exchange drops per run (%) | stopped by SIGKILL (SIGTERM ignored 10 s) |"
            echo "|---|---:|---:|---|---:|"
            for s in relay kea; do
                jq -rs --arg s "$s" '[ .[] | select(.server == $s and .kind == "repeat") ] as $r |
                    "| \($s) | \($r | length) | \([ $r[] | select(.pass) ] | length) | \([ $r[] | .exchange_drop_pct | tostring ] | join(", ")) | \([ $r[] | select(.server_stopped_by == "kill") ] | length) |"' \
                    "$RESULTS_DIR/dhcp.jsonl"
            done
        fi
        echo
    fi
    if [ -s "$RESULTS_DIR/tftp.jsonl" ]; then
        echo "### TFTP: one ${TFTP_SIZE_MIB} MiB transfer, blksize $TFTP_BLKSIZE (median of $TFTP_REPS, seconds; MiB/s)"
        echo
        echo "| windowsize | relay | atftpd | tftpd-hpa | relay vs atftpd (time ratio, >1: relay faster) | relay vs tftpd-hpa |"
        echo "|---:|---:|---:|---:|---:|---:|"
        local ws srv cell rel at hp
        for ws in $TFTP_WINDOWS; do
            local row="| $ws"
            rel=""; at=""; hp=""
            for srv in relay atftpd tftpd-hpa; do
                local med acked
                med=$(jq -r --arg s "$srv" --argjson w "$ws" 'select(.test == "single" and .server == $s and .windowsize == $w and .ok) | .seconds' "$RESULTS_DIR/tftp.jsonl" | median)
                acked=$(jq -r --arg s "$srv" --argjson w "$ws" 'select(.test == "single" and .server == $s and .windowsize == $w) | .windowsize_acked' "$RESULTS_DIR/tftp.jsonl" | head -1)
                if [ "$med" = null ]; then
                    cell="failed"
                elif [ "$ws" != 1 ] && [ "$acked" = false ]; then
                    cell="N/A (no windowsize; ran at 1: ${med} s)"
                    med=null
                else
                    cell="$med s ($(awk -v m="$TFTP_SIZE_MIB" -v s="$med" 'BEGIN { printf "%.1f", m / s }') MiB/s)"
                fi
                row+=" | $cell"
                case $srv in relay) rel=$med ;; atftpd) at=$med ;; tftpd-hpa) hp=$med ;; esac
            done
            echo "$row | $(r2 "$at" "$rel") | $(r2 "$hp" "$rel") |"
        done
        echo
        echo "### TFTP: $TFTP_CONC concurrent 1 MiB transfers, blksize $TFTP_BLKSIZE, windowsize 1 ($TFTP_CONC_REPS runs)"
        echo
        echo "| server | failed transfers per run | total time per run (s) | median (s) |"
        echo "|---|---|---|---:|"
        for srv in relay dnsmasq; do
            jq -rs --arg s "$srv" '[ .[] | select(.test == "concurrent" and .server == $s) ] as $r |
                "| \($s) | \([ $r[] | .failed | tostring ] | join(", ")) | \([ $r[] | .seconds | tostring ] | join(", ")) | \([ $r[] | .seconds ] | sort | if length == 0 then "-" elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end) |"' \
                "$RESULTS_DIR/tftp.jsonl"
        done
        echo
    fi
    if [ -s "$RESULTS_DIR/http.jsonl" ]; then
        echo "### HTTP: $HTTP_CONC concurrent downloads of a ${HTTP_SIZE_MIB} MiB file (median of $HTTP_REPS)"
        echo
        echo "| server | time for all (s) | aggregate GiB/s | failed | server CPU s |"
        echo "|---|---:|---:|---:|---:|"
        local rg ng
        for srv in relay nginx; do
            local t g c f
            t=$(jq -r --arg s "$srv" 'select(.server == $s) | .seconds' "$RESULTS_DIR/http.jsonl" | median)
            g=$(jq -r --arg s "$srv" 'select(.server == $s) | .gib_per_s' "$RESULTS_DIR/http.jsonl" | median)
            c=$(jq -r --arg s "$srv" 'select(.server == $s) | .server_cpu_seconds' "$RESULTS_DIR/http.jsonl" | median)
            f=$(jq -r --arg s "$srv" 'select(.server == $s) | .failed' "$RESULTS_DIR/http.jsonl" | paste -sd, -)
            echo "| $srv | $t | $g | $f | $c |"
            if [ "$srv" = relay ]; then rg=$g; else ng=$g; fi
        done
        echo
        echo "Ratio relay/nginx (throughput): $(r2 "$rg" "$ng") (goal: >= 0.9)."
        echo
    fi
    echo "Load average (1 min) at the start/end of the measurements: $(cat "$RESULTS_DIR"/*.jsonl 2>/dev/null | jq -rs '[ .[] | select(.load_start) ] | if length == 0 then "-" else "start \(map(.load_start) | min)-\(map(.load_start) | max), end \(map(.load_end) | min)-\(map(.load_end) | max)" end')."
}
summary | tee "$RESULTS_DIR/summary.md"
log "results: $RESULTS_DIR"
