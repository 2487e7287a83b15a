#!/usr/bin/env bash
# The pxemesh end-to-end lab: one rack in a network namespace, and a bare
# metal host made of an OpenIPMI BMC (ipmi_sim) whose power control starts a
# QEMU VM on the rack's provisioning bridge.
#
#   sudo deploy/lab/lab.sh            (binaries from target/debug, built if missing)
#   BIN=/path/to/bin sudo deploy/lab/lab.sh
#
# The chain it proves, step by step (each step waits for its own evidence and
# the run stops at the first one missing, naming it):
#   pxemeshctl power on -> job in the coordinators -> rack relay leases it ->
#   ipmitool -> ipmi_sim -> the VM starts -> its iPXE ROM gets DHCP from the
#   relay -> iPXE loader over TFTP -> per-host iPXE script over HTTP ->
#   kernel and initrd from the relay's image cache over HTTP -> the tiny
#   Linux gets DHCP and calls /baremetal/provisiondone/<mac> -> the event
#   shows in `pxemeshctl host get`.
#
# Everything runs inside one namespace the script creates (no veth to the
# root namespace, so no route out) and is torn down on success, failure and
# Ctrl-C. Knobs: LAB_BREAK=tftp|dhcp|http (disable that relay service, to show
# the lab names the broken step), LAB_KEEP=1 (keep the work directory),
# LAB_STEP_TIMEOUT (seconds per VM step, default 120), LAB_CACHE (kernel
# package cache, see build-linux.sh).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=${BIN:-$ROOT/target/debug}
LAB_BREAK=${LAB_BREAK:-}
LAB_KEEP=${LAB_KEEP:-0}
STEP_TIMEOUT=${LAB_STEP_TIMEOUT:-120}
MAC=52:54:00:1a:b0:01
HOST=lab-node-1
NS=pxl-$$
WORK=$(mktemp -d /var/tmp/pxemesh-lab.XXXXXX)
PIDS=()
STEP=0

say() { printf '[lab %s] %s\n' "$(date +%T)" "$*"; }
fail() {
    say "LAB FAILED at step $STEP ($STEP_NAME): $*"
    for f in relay.log ipmi_sim.log state/chassis.log state/vm.log serial.log; do
        [ -s "$WORK/$f" ] || continue
        echo "----- last lines of $f -----"
        tail -n 25 "$WORK/$f"
    done
    exit 1
}
step() { STEP=$((STEP + 1)); STEP_NAME=$1; say "step $STEP: $1"; }
cleanup() {
    local p
    [ -s "$WORK/state/vm.pid" ] && PIDS+=("$(cat "$WORK/state/vm.pid")")
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    # Anything else still running in the namespace (the VM started by the BMC).
    if ip netns pids "$NS" >/dev/null 2>&1; then
        for p in $(ip netns pids "$NS"); do kill -9 "$p" 2>/dev/null || true; done
        ip netns del "$NS" 2>/dev/null || true
    fi
    if [ "$LAB_KEEP" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || { echo "lab: needs root (network namespaces, tap devices)" >&2; exit 2; }
for c in ip qemu-system-x86_64 ipmi_sim ipmitool curl; do
    command -v "$c" >/dev/null || { echo "lab: $c is not installed (deploy/test-packages.txt)" >&2; exit 2; }
done
for b in pxemesh-coordinator pxemeshctl pxemesh-certs pxemesh-relay; do
    [ -x "$BIN/$b" ] || (cd "$ROOT" && cargo build -q --bins) || true
    [ -x "$BIN/$b" ] || { echo "lab: $BIN/$b missing" >&2; exit 2; }
done
in_ns() { ip netns exec "$NS" "$@"; }
bg() { # bg LOG CMD... : start in the namespace, remember the pid
    local log=$1
    shift
    ip netns exec "$NS" "$@" </dev/null >>"$log" 2>&1 &
    PIDS+=($!)
}
wait_until() { # wait_until SECONDS CMD... : poll every 0.5 s
    local deadline=$((SECONDS + $1))
    shift
    while [ $SECONDS -lt $deadline ]; do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    return 1
}

step "build the tiny Linux (kernel + busybox initrd)"
mkdir -p "$WORK/image"
"$HERE/build-linux.sh" "$WORK/image" || fail "build-linux.sh failed"

step "network namespace with a provisioning bridge and an OOB network"
ip netns add "$NS"
in_ns ip link set lo up
in_ns ip link add br0 type bridge
in_ns ip addr add 10.77.0.1/24 dev br0
in_ns ip link set br0 up
in_ns ip tuntap add tap0 mode tap
in_ns ip link set tap0 master br0
in_ns ip link set tap0 up
in_ns ip link add oob0 type bridge
in_ns ip addr add 10.78.0.1/24 dev oob0
in_ns ip addr add 10.78.0.10/24 dev oob0
in_ns ip link set oob0 up

step "certificates and a 3-node coordinator cluster"
PKI=$WORK/pki
mkdir -p "$PKI"
"$BIN/pxemesh-certs" init --dir "$PKI" --trust-domain lab.local >/dev/null
for i in 1 2 3; do "$BIN/pxemesh-certs" issue coordinator --dir "$PKI" --id "$i" >/dev/null; done
"$BIN/pxemesh-certs" issue admin --dir "$PKI" --name lab --stem admin >/dev/null
"$BIN/pxemesh-certs" issue relay --dir "$PKI" --rack lab-rack --name relay-lab --stem relay >/dev/null
"$BIN/pxemesh-coordinator" gen-cluster-key "$WORK/cluster.key" >/dev/null
ENDPOINTS=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103
for i in 1 2 3; do
    d=$WORK/coord$i
    mkdir -p "$d"
    {
        printf 'node_id = %d\nlisten = "127.0.0.1:710%d"\ndata_dir = "%s"\ncluster_key_file = "%s"\n' \
            "$i" "$i" "$d/data" "$WORK/cluster.key"
        printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' \
            "$PKI/ca.pem" "$PKI/coordinator-$i.pem" "$PKI/coordinator-$i-key.pem"
        for j in 1 2 3; do printf '[[peers]]\nid = %d\naddress = "127.0.0.1:710%d"\n' "$j" "$j"; done
    } >"$d/coordinator.toml"
    bg "$d/coordinator.log" "$BIN/pxemesh-coordinator" --config "$d/coordinator.toml"
done
ctl() { in_ns "$BIN/pxemeshctl" --endpoints "$ENDPOINTS" --tls-dir "$PKI" --cert-stem admin "$@"; }
has_leader() { [ "$(ctl -o json cluster status | sed -n 's/.*"leader_id": *\([0-9]*\).*/\1/p' | tail -n1)" -gt 0 ]; }
wait_until 30 has_leader || fail "no coordinator leader within 30 s"

step "register the rack, its networks, the host with its BMC, the image and the boot profile"
BMC_PASSWORD="lab-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
ctl rack put lab-rack --oob 10.78.0.0/24 >/dev/null || fail "rack put"
ctl network put lab-prov --rack lab-rack --subnet 10.77.0.0/24 --gateway 10.77.0.1 --interface br0 >/dev/null ||
    fail "network put"
ctl image push "$WORK/image" --name lab-linux >/dev/null || fail "image push"
ctl profile put lab-linux --kind ipxe --image lab-linux --kernel vmlinuz --initrd initrd.gz \
    --cmdline "console=ttyS0 quiet pxemesh.url=http://10.77.0.1:80" >/dev/null || fail "profile put"
printf '%s' "$BMC_PASSWORD" >"$WORK/bmc-password"
ctl host put "$HOST" --mac "$MAC" --ip 10.77.0.50 --rack lab-rack --network lab-prov --profile lab-linux \
    --bmc-address 10.78.0.10 --bmc-port 623 --bmc-user lab --bmc-password-file "$WORK/bmc-password" \
    --cipher-suite 3 >/dev/null || fail "host put"

step "the rack relay (sync mode) on the provisioning bridge"
mkdir -p "$WORK/relay-boot"
cp /usr/lib/ipxe/undionly.kpxe "$WORK/relay-boot/" 2>/dev/null || fail "ipxe's undionly.kpxe missing (package ipxe)"
DHCP_ON=true TFTP_ON=true HTTP_ON=true
case "$LAB_BREAK" in
    dhcp) DHCP_ON=false ;;
    tftp) TFTP_ON=false ;;
    http) HTTP_ON=false ;;
    "") ;;
    *) echo "lab: LAB_BREAK must be dhcp, tftp or http" >&2; exit 2 ;;
esac
[ -n "$LAB_BREAK" ] && say "LAB_BREAK=$LAB_BREAK: the relay's ${LAB_BREAK^^} is disabled on purpose"
cat >"$WORK/relay.toml" <<EOF
name = "relay-lab"
data_dir = "$WORK/relay-data"
metrics_listen = "127.0.0.1:9200"
[[interfaces]]
name = "br0"
address = "10.77.0.1"
[coordinators]
endpoints = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
ca = "$PKI/ca.pem"
cert = "$PKI/relay.pem"
key = "$PKI/relay-key.pem"
[dhcp]
enabled = $DHCP_ON
[tftp]
enabled = $TFTP_ON
listen = "10.77.0.1:69"
[http]
enabled = $HTTP_ON
listen = "10.77.0.1:80"
[boot]
dir = "$WORK/relay-boot"
chainload_ipxe = true
EOF
bg "$WORK/relay.log" "$BIN/pxemesh-relay" --config "$WORK/relay.toml"
relay_has_host() { grep -q "relay serving" "$WORK/relay.log" && ctl -o json relay list | grep -q '"ready"'; }
wait_until 30 relay_has_host || fail "relay not serving and ready within 30 s"

step "the BMC: ipmi_sim on the OOB network, chassis power = the VM"
mkdir -p "$WORK/state"
cat >"$WORK/vm.sh" <<EOF
exec qemu-system-x86_64 -machine accel=tcg -m 256 -display none -no-reboot \
    -serial file:$WORK/serial.log \
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device e1000,netdev=n0,mac=$MAC -boot n
EOF
cat >"$WORK/lan.conf" <<EOF
name "lab-bmc"
set_working_mc 0x20
  startlan 1
    addr 10.78.0.10 623
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "$HERE/chassis.sh"
  user 2 true "lab" "$BMC_PASSWORD" admin 10 none md2 md5 straight
EOF
cat >"$WORK/cmds.emu" <<EOF
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
mc_enable 0x20
EOF
LAB_STATE=$WORK/state LAB_VM_CMD=$WORK/vm.sh bg "$WORK/ipmi_sim.log" \
    env LAB_STATE="$WORK/state" LAB_VM_CMD="$WORK/vm.sh" \
    ipmi_sim -c "$WORK/lan.conf" -f "$WORK/cmds.emu" -s "$WORK/state" -n
bmc_up() { in_ns env IPMI_PASSWORD="$BMC_PASSWORD" ipmitool -I lanplus -C 3 -H 10.78.0.10 -p 623 -U lab -E chassis power status; }
wait_until 20 bmc_up || fail "ipmi_sim does not answer ipmitool on 10.78.0.10:623"

step "pxemeshctl bootdev pxe + power on -> jobs succeed"
ctl bootdev pxe "$HOST" --wait --wait-timeout 60 >"$WORK/bootdev.out" 2>&1 ||
    fail "bootdev pxe job: $(cat "$WORK/bootdev.out")"
ctl power on "$HOST" --wait --wait-timeout 60 >"$WORK/power-on.out" 2>&1 ||
    fail "power on job: $(cat "$WORK/power-on.out")"
sed 's/^/    /' "$WORK/power-on.out"

step "the BMC started the VM"
vm_running() { [ -s "$WORK/state/vm.pid" ] && kill -0 "$(cat "$WORK/state/vm.pid")"; }
wait_until 10 vm_running || fail "no VM process after power on (chassis.log: $(cat "$WORK/state/chassis.log" 2>/dev/null))"

event() { grep "boot event" "$WORK/relay.log" | grep -F -- "$1" | grep -qF -- "$2"; }
step "the VM's iPXE ROM got DHCP from the relay"
wait_until "$STEP_TIMEOUT" event dhcp-ack "$MAC" || fail "no DHCP ACK for $MAC within ${STEP_TIMEOUT} s"
step "the VM loaded iPXE over TFTP"
wait_until "$STEP_TIMEOUT" event tftp-file undionly.kpxe || fail "no TFTP transfer of undionly.kpxe within ${STEP_TIMEOUT} s"
step "the VM fetched its iPXE script over HTTP"
wait_until "$STEP_TIMEOUT" event http-file "/boot/$MAC.ipxe" || fail "no HTTP request for /boot/$MAC.ipxe within ${STEP_TIMEOUT} s"
step "the VM fetched kernel and initrd from the relay's image cache"
wait_until "$STEP_TIMEOUT" event http-file vmlinuz || fail "no HTTP download of the kernel within ${STEP_TIMEOUT} s"
wait_until "$STEP_TIMEOUT" event http-file initrd.gz || fail "no HTTP download of the initrd within ${STEP_TIMEOUT} s"
step "the tiny Linux booted and called provision-done"
wait_until "$STEP_TIMEOUT" grep -q "PROVISION-DONE sent" "$WORK/serial.log" ||
    fail "the VM's Linux did not report provision-done (serial.log: $(tail -n 5 "$WORK/serial.log" 2>/dev/null))"
step "pxemeshctl host get shows the provision-done event"
shows_done() { ctl host get "$HOST" | grep -q provision-done; }
wait_until 30 shows_done || fail "provision-done not in the host's timeline"
ctl host get "$HOST" | sed 's/^/    /'

step "no BMC password in any log"
if grep -rqF -- "$BMC_PASSWORD" "$WORK"/*.log "$WORK"/coord*/coordinator.log "$WORK/state/chassis.log" 2>/dev/null; then
    fail "the BMC password appears in a log"
fi
say "LAB PASSED: power on -> IPMI -> VM -> DHCP -> TFTP -> HTTP -> kernel/initrd -> provision-done"
