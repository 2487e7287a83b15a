#!/usr/bin/env bash
# Power-on storm: N OpenIPMI ipmi_sim BMCs (default 100) behind one relay,
# driven through a 3-node coordinator cluster, against the baseline of
# running ipmitool once per host, one after another (what CloudStack's
# IPMI driver does), on the same BMCs, same machine, same run.
#
#   relay/bench/ipmi-power-storm.sh
#
# Measured (wall clock):
#   pxemesh    `pxemeshctl power on --rack r1 --wait`: submit N jobs, the relay
#              leases and runs them (max_parallel at a time), until all succeeded
#              (each job = power on + power status read back, as the relay does);
#   seq-on     for each host: `ipmitool ... chassis power on`;
#   seq-on+st  for each host: `chassis power on` then `chassis power status`
#              (the same work per host as a pxemesh job).
# Every chassis is set to "off" before each run; after it, the script checks
# every simulated chassis is on.
#
# ipmi_sim answers in microseconds on loopback, so with BMC_DELAY_MS=0 the run
# measures local CPU (ipmitool and ipmi_sim processes). Real BMCs take
# hundreds of milliseconds per command; BMC_DELAY_MS makes every chassis
# query and change of the simulated BMCs take that long (a sleep in the
# chassis_control script), for both contenders alike.
#
# Knobs (environment): N (100) MAX_PARALLEL (32) ROUNDS (3) BMC_DELAY_MS (0) BASE_PORT (47600)
# RESULTS_DIR (target/bench-results/<utc>) BENCH_TMPDIR (/var/tmp)
# KEEP_WORKDIR (0) SKIP_BUILD (0) PROFILE (release; "debug" for a quick
# check of the script itself, not for figures).
# TCP ports BASE_PORT+1..+13 and UDP ports BASE_PORT+100..+100+N on 127.0.0.1.
# Every process this script starts is stopped on exit, also on failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
N=${N:-100}
MAX_PARALLEL=${MAX_PARALLEL:-32}
ROUNDS=${ROUNDS:-3}
BMC_DELAY_MS=${BMC_DELAY_MS:-0}
DELAY=$(awk -v ms="$BMC_DELAY_MS" 'BEGIN { printf "%.3f", ms / 1000 }')
BASE_PORT=${BASE_PORT:-47600}
BENCH_TMPDIR=${BENCH_TMPDIR:-/var/tmp}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
PROFILE=${PROFILE:-release}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
PW=bench-Ipmi-pw1

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

PIDS=()
WORK=""
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        local any=0
        for pid in "${PIDS[@]}"; do alive "$pid" && any=1; done
        [ "$any" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do alive "$pid" && kill -KILL "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP_WORKDIR" = 1 ] || [ "$rc" != 0 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for c in ipmi_sim ipmitool jq; do
    command -v "$c" >/dev/null || die "$c is missing (apt-get install openipmi ipmitool jq)"
done

cd "$ROOT"
if [ "$SKIP_BUILD" != 1 ]; then
    log "building release binaries"
    cargo build --release -p pxemesh-coordinator -p pxemesh-relay -p pxemesh-certs --bins >&2
fi
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
BIN=$TARGET_DIR/$PROFILE
for b in pxemesh-coordinator pxemeshctl pxemesh-certs pxemesh-relay; do
    [ -x "$BIN/$b" ] || die "$BIN/$b missing"
done
mkdir -p "$RESULTS_DIR" "$BENCH_TMPDIR"
WORK=$(mktemp -d "$BENCH_TMPDIR/pxemesh-ipmi-bench.XXXXXX")
PKI=$WORK/pki
mkdir -p "$PKI"
log "work directory $WORK, results in $RESULTS_DIR"

# --- BMCs --------------------------------------------------------------------
bmc_port() { echo $((BASE_PORT + 100 + $1)); }
start_bmc() {
    local i=$1 d=$WORK/bmc/$1 port
    port=$(bmc_port "$i")
    mkdir -p "$d/state"
    cat >"$d/chassis.sh" <<EOF
#!/bin/sh
D=$d
[ "$BMC_DELAY_MS" != 0 ] && sleep $DELAY
case "\$1" in
  get) shift; for k in "\$@"; do v=\$(cat \$D/\$k 2>/dev/null || echo 0); echo "\$k:\$v"; done;;
  set) shift; while [ \$# -gt 1 ]; do echo "\$2" > \$D/\$1; shift 2; done;;
esac
exit 0
EOF
    chmod +x "$d/chassis.sh"
    cat >"$d/lan.conf" <<EOF
name "bmc$i"
set_working_mc 0x20
  startlan 1
    addr 127.0.0.1 $port
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "$d/chassis.sh"
  user 2 true "admin" "$PW" admin 10 none md2 md5 straight
EOF
    printf 'mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n' >"$d/cmds.emu"
    ipmi_sim -c "$d/lan.conf" -f "$d/cmds.emu" -s "$d/state" -n </dev/null >"$d/sim.log" 2>&1 &
    PIDS+=($!)
}
ipmi() { # ipmi I ARGS...
    IPMI_PASSWORD=$PW ipmitool -I lanplus -C 3 -H 127.0.0.1 -p "$(bmc_port "$1")" -U admin -E "${@:2}"
}
log "starting $N ipmi_sim BMCs"
for i in $(seq 1 "$N"); do start_bmc "$i"; done
for i in $(seq 1 "$N"); do
    ok=0
    for _ in $(seq 1 100); do
        if ipmi "$i" -N 1 -R 1 chassis power status >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.1
    done
    [ "$ok" = 1 ] || die "BMC $i did not come up ($WORK/bmc/$i/sim.log)"
done
all_off() { for i in $(seq 1 "$N"); do echo 0 >"$WORK/bmc/$i/power"; done; }
count_on() { local c=0 i; for i in $(seq 1 "$N"); do [ "$(cat "$WORK/bmc/$i/power" 2>/dev/null)" = 1 ] && c=$((c + 1)); done; echo "$c"; }

# --- coordinators and relay ------------------------------------------------------
"$BIN/pxemesh-certs" init --dir "$PKI" --trust-domain bench.local >/dev/null
for i in 1 2 3; do "$BIN/pxemesh-certs" issue coordinator --dir "$PKI" --id "$i" >/dev/null; done
"$BIN/pxemesh-certs" issue admin --dir "$PKI" --name admin --stem admin >/dev/null
"$BIN/pxemesh-certs" issue relay --dir "$PKI" --rack r1 --name relay-a --stem relay-a >/dev/null
"$BIN/pxemesh-coordinator" gen-cluster-key "$WORK/cluster.key" >/dev/null
PORTS=($((BASE_PORT + 1)) $((BASE_PORT + 2)) $((BASE_PORT + 3)))
ENDPOINTS="127.0.0.1:${PORTS[0]},127.0.0.1:${PORTS[1]},127.0.0.1:${PORTS[2]}"
for i in 1 2 3; do
    d=$WORK/coord$i
    mkdir -p "$d"
    {
        printf 'node_id = %d\nlisten = "127.0.0.1:%d"\ndata_dir = "%s"\ncluster_key_file = "%s"\n\n' \
            "$i" "${PORTS[$((i - 1))]}" "$d/data" "$WORK/cluster.key"
        printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' "$PKI/ca.pem" "$PKI/coordinator-$i.pem" "$PKI/coordinator-$i-key.pem"
        for j in 1 2 3; do printf '\n[[peers]]\nid = %d\naddress = "127.0.0.1:%d"\n' "$j" "${PORTS[$((j - 1))]}"; done
    } >"$d/coordinator.toml"
    RUST_LOG=info "$BIN/pxemesh-coordinator" --config "$d/coordinator.toml" </dev/null >"$d/coordinator.log" 2>&1 &
    PIDS+=($!)
done
ctl() { "$BIN/pxemeshctl" --endpoints "$ENDPOINTS" --tls-dir "$PKI" --cert-stem admin --timeout 10 "$@"; }
ok=0
for _ in $(seq 1 150); do
    if ctl rack put r1 --oob 127.0.0.0/8 >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
done
[ "$ok" = 1 ] || die "no coordinator leader"
ctl network put n1 --rack r1 --subnet 10.20.0.0/16 >/dev/null
printf '%s\n' "$PW" >"$WORK/pw"
log "registering $N hosts"
for i in $(seq 1 "$N"); do
    ctl host put "h$i" --mac "$(printf '52:54:00:bb:%02x:%02x' $((i / 256)) $((i % 256)))" \
        --ip "10.20.$((i / 250)).$((i % 250 + 2))" --rack r1 --network n1 \
        --bmc-address 127.0.0.1 --bmc-port "$(bmc_port "$i")" --bmc-user admin \
        --bmc-password-file "$WORK/pw" --cipher-suite 3 >/dev/null
done
mkdir -p "$WORK/relay"
cat >"$WORK/relay/relay.toml" <<EOF
name = "relay-a"
data_dir = "$WORK/relay/data"
metrics_listen = "127.0.0.1:$((BASE_PORT + 13))"

[coordinators]
endpoints = ["127.0.0.1:${PORTS[0]}", "127.0.0.1:${PORTS[1]}", "127.0.0.1:${PORTS[2]}"]
ca = "$PKI/ca.pem"
cert = "$PKI/relay-a.pem"
key = "$PKI/relay-a-key.pem"

[dhcp]
enabled = false
[tftp]
enabled = false
[http]
enabled = false
[boot]
dir = "$WORK/relay"

[ipmi]
max_parallel = $MAX_PARALLEL
EOF
RUST_LOG=info "$BIN/pxemesh-relay" --config "$WORK/relay/relay.toml" </dev/null >"$WORK/relay/relay.log" 2>&1 &
RELAY_PID=$!
PIDS+=($RELAY_PID)
# Ready once it ran a job.
ctl power status h1 --wait --wait-timeout 60 >/dev/null || die "the relay did not run a job ($WORK/relay/relay.log)"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
RESULTS=$RESULTS_DIR/ipmi-power-storm.jsonl
: >"$RESULTS"
record() { # record NAME ROUND SECONDS ON
    printf '{"run":"%s","round":%d,"seconds":%s,"hosts":%d,"powered_on":%d,"bmc_delay_ms":%d,"max_parallel":%d,"loadavg":"%s"}\n' \
        "$1" "$2" "$3" "$N" "$4" "$BMC_DELAY_MS" "$MAX_PARALLEL" "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS"
    log "$(printf '%-10s round %d: %6.2f s for %d hosts (%d on)' "$1" "$2" "$3" "$N" "$4")"
}

for r in $(seq 1 "$ROUNDS"); do
    all_off
    t0=$(now)
    ctl -o json power on --rack r1 --wait --wait-timeout 600 --idempotency-key "storm-$r" >"$WORK/storm-$r.json" \
        || die "pxemesh storm round $r failed (see $WORK/storm-$r.json)"
    t1=$(now)
    record pxemesh "$r" "$(elapsed "$t0" "$t1")" "$(count_on)"

    all_off
    t0=$(now)
    for i in $(seq 1 "$N"); do ipmi "$i" chassis power on >/dev/null; done
    t1=$(now)
    record seq-on "$r" "$(elapsed "$t0" "$t1")" "$(count_on)"

    all_off
    t0=$(now)
    for i in $(seq 1 "$N"); do ipmi "$i" chassis power on >/dev/null; ipmi "$i" chassis power status >/dev/null; done
    t1=$(now)
    record seq-on+st "$r" "$(elapsed "$t0" "$t1")" "$(count_on)"
done
curl -s "http://127.0.0.1:$((BASE_PORT + 13))/metrics" | grep '^pxemesh_relay_ipmi' >"$RESULTS_DIR/relay-ipmi-metrics.txt" || true
jq -s 'group_by(.run) | map({run: .[0].run, rounds: length,
        median_s: (map(.seconds) | sort | .[(length / 2 | floor)]),
        min_s: (map(.seconds) | min), max_s: (map(.seconds) | max)})' "$RESULTS" | tee "$RESULTS_DIR/summary.json"
