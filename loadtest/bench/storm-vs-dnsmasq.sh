#!/usr/bin/env bash
# Boot storm: one pxemesh relay versus dnsmasq, same machine, same run.
#
#   loadtest/bench/storm-vs-dnsmasq.sh
#
# HOSTS simulated hosts power on at once. Against the relay they boot the way
# an iPXE deployment does: DHCP, the LOADER_MIB boot loader over TFTP, DHCP
# again as iPXE, the per-host script, a KERNEL_MIB kernel and an INITRD_MIB
# initrd over HTTP, the provision-done callback. Then the identical storm
# (same hosts, same files, same client settings) runs against dnsmasq serving
# DHCP and TFTP for everything (classic PXE: loader, pxelinux config, kernel,
# initrd over TFTP), configured and started by `pxemesh-loadtest storm
# --baseline dnsmasq --baseline-profile tftp`. Goal: every host done, and the
# relay's time to the last host at most half of dnsmasq's.
#
# Everything runs inside a network namespace this script creates (loopback
# only, no route out), so dnsmasq can have ports 67 and 69 without touching
# the host's; the relay uses high ports there. Processes are stopped and the
# namespace deleted on exit.
#
# Results: RESULTS_DIR (default target/bench-results/storm-<utc time>/):
# storm.json, storm.html (open it in a browser), summary.txt, relay.log,
# environment.json.
#
# Knobs (environment), defaults in brackets:
#   HOSTS [1000]  LOADER_MIB [1]  KERNEL_MIB [10]  INITRD_MIB [40]
#   BLKSIZE [1468]  WINDOWSIZE [1]  TFTP_TIMEOUT_MS [2000]  TFTP_RETRIES [8]
#   DHCP_TIMEOUT_MS [4000]  MAX_SECONDS [3600]  RELAY_LOG [warn]
#   CONTENT_TMPDIR [/dev/shm]: the boot files (tmpfs, as in relay-vs-references.sh)
#   SKIP_BUILD [0]  BUILD_PROFILE [release] (debug: a quick smoke run of this script)
#   RESULTS_DIR
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HOSTS=${HOSTS:-1000}
LOADER_MIB=${LOADER_MIB:-1}
KERNEL_MIB=${KERNEL_MIB:-10}
INITRD_MIB=${INITRD_MIB:-40}
BLKSIZE=${BLKSIZE:-1468}
WINDOWSIZE=${WINDOWSIZE:-1}
TFTP_TIMEOUT_MS=${TFTP_TIMEOUT_MS:-2000}
TFTP_RETRIES=${TFTP_RETRIES:-8}
DHCP_TIMEOUT_MS=${DHCP_TIMEOUT_MS:-4000}
MAX_SECONDS=${MAX_SECONDS:-3600}
RELAY_LOG=${RELAY_LOG:-warn}
CONTENT_TMPDIR=${CONTENT_TMPDIR:-/dev/shm}
SKIP_BUILD=${SKIP_BUILD:-0}
BUILD_PROFILE=${BUILD_PROFILE:-release}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-results/storm-$(date -u +%Y%m%dT%H%M%SZ)}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

case ${1:-} in
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) die "no arguments expected (knobs are environment variables; see --help)" ;;
esac
[ "$(id -u)" = 0 ] || die "needs root (network namespace; dnsmasq on ports 67/69 inside it)"

need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing $2"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
need dnsmasq dnsmasq-base
need ip iproute2
need jq jq

NS=pxm-storm-bench-$$
CONTENT=""
RELAY_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "$RELAY_PID" ] && kill -TERM "$RELAY_PID" 2>/dev/null || true
    sleep 0.5
    for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    [ -n "$CONTENT" ] && rm -rf "$CONTENT"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$SKIP_BUILD" != 1 ]; then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -q -p pxemesh-relay -p pxemesh-loadtest)
fi
RELAY=$TARGET_DIR/$BUILD_PROFILE/pxemesh-relay
LOADTEST=$TARGET_DIR/$BUILD_PROFILE/pxemesh-loadtest
[ -x "$RELAY" ] && [ -x "$LOADTEST" ] || die "binaries missing under $TARGET_DIR/$BUILD_PROFILE"

mkdir -p "$RESULTS_DIR"
CONTENT=$(mktemp -d "$CONTENT_TMPDIR/pxm-storm.XXXXXX")
mkdir -p "$CONTENT/boot/storm" "$CONTENT/data" "$CONTENT/work"
log "boot files: loader $LOADER_MIB MiB, kernel $KERNEL_MIB MiB, initrd $INITRD_MIB MiB in $CONTENT"
head -c $((LOADER_MIB << 20)) /dev/urandom >"$CONTENT/boot/undionly.kpxe"
head -c $((KERNEL_MIB << 20)) /dev/urandom >"$CONTENT/boot/storm/vmlinuz"
head -c $((INITRD_MIB << 20)) /dev/urandom >"$CONTENT/boot/storm/initrd.img"
"$LOADTEST" storm-rack --hosts "$HOSTS" --out "$CONTENT/rack.toml"

cat >"$CONTENT/relay.toml" <<EOF
name = "storm-bench"
data_dir = "$CONTENT/data"
static_state = "$CONTENT/rack.toml"
advertise_address = "127.0.0.1"
[[interfaces]]
name = "lo"
address = "127.0.0.1"
[dhcp]
port = 6767
relay_agent_port = 6768
[tftp]
listen = "127.0.0.1:6969"
max_transfers = $((HOSTS * 2 + 64))
[http]
listen = "127.0.0.1:8080"
[boot]
dir = "$CONTENT/boot"
bios = "undionly.kpxe"
EOF

ip netns add "$NS"
ip -n "$NS" link set lo up
log "starting the relay in $NS"
ip netns exec "$NS" env RUST_LOG="$RELAY_LOG" "$RELAY" --config "$CONTENT/relay.toml" >"$RESULTS_DIR/relay.log" 2>&1 &
RELAY_PID=$!
for _ in $(seq 1 100); do
    ip netns exec "$NS" bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080' 2>/dev/null && break
    sleep 0.1
done

load1() { cut -d' ' -f1 /proc/loadavg; }
L0=$(load1)
log "storm: $HOSTS hosts at once, relay (http profile) then dnsmasq (tftp for everything)"
set +e
ip netns exec "$NS" "$LOADTEST" storm --no-progress \
    --hosts "$HOSTS" --arrival all --profile http \
    --dhcp-server 127.0.0.1:6767 --agent-port 6768 --tftp-port 6969 \
    --dhcp-timeout-ms "$DHCP_TIMEOUT_MS" \
    --blksize "$BLKSIZE" --windowsize "$WINDOWSIZE" \
    --tftp-timeout-ms "$TFTP_TIMEOUT_MS" --tftp-retries "$TFTP_RETRIES" \
    --max-seconds "$MAX_SECONDS" \
    --baseline dnsmasq --baseline-profile tftp \
    --files-dir "$CONTENT/boot" --work-dir "$CONTENT/work" \
    --json "$RESULTS_DIR/storm.json" --html "$RESULTS_DIR/storm.html" | tee "$RESULTS_DIR/summary.txt"
RC=${PIPESTATUS[0]}
set -e
L1=$(load1)

jq -n --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" \
    --arg mem "$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" \
    --arg dnsmasq "$(dnsmasq -v 2>&1 | head -1)" \
    --arg load_start "$L0" --arg load_end "$L1" \
    --arg hosts "$HOSTS" --arg files "$LOADER_MIB/$KERNEL_MIB/$INITRD_MIB MiB" \
    '{date: $date, commit: $commit, cpu: $cpu, nproc: ($nproc | tonumber), memory: $mem, kernel: $kernel,
      dnsmasq: $dnsmasq, load_start: $load_start, load_end: $load_end, hosts: ($hosts | tonumber),
      loader_kernel_initrd: $files}' >"$RESULTS_DIR/environment.json"

if [ -s "$RESULTS_DIR/storm.json" ]; then
    jq -r '.runs[] | "\(.label): \(.completed)/\(.hosts) done, time to last host \(.time_to_last_host_s // "-") s, total p50 \(.phases.total.p50) ms, p99 \(.phases.total.p99) ms"' "$RESULTS_DIR/storm.json"
    jq -r '.comparison | "ratio relay/dnsmasq, time to last host: \(.time_to_last_host_ratio // "-") (goal: <= 0.5)"' "$RESULTS_DIR/storm.json"
fi
log "load average (1 min): $L0 at the start, $L1 at the end"
log "results: $RESULTS_DIR"
exit "$RC"
