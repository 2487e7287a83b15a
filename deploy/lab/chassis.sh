#!/bin/sh
# ipmi_sim chassis control for the lab's bare metal host: the BMC's power
# state is a QEMU VM. ipmi_sim runs `chassis.sh get power|boot` (prints
# `power:0|1` / `boot:<dev>`) and `chassis.sh set power 0|1` /
# `chassis.sh set boot <dev>`. Configuration comes from the environment the
# lab gives ipmi_sim: LAB_STATE (a directory), LAB_VM_CMD (a file holding the
# QEMU command line, run with sh).
state=${LAB_STATE:?}
pidfile=$state/vm.pid
running() { [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
log() { echo "$(date +%T) chassis: $*" >>"$state/chassis.log"; }
# ipmi_sim passes the MC address first on some versions: skip anything
# before the verb.
while [ $# -gt 0 ] && [ "$1" != get ] && [ "$1" != set ]; do shift; done
case "$1 $2" in
    "get power")
        if running; then echo "power:1"; else echo "power:0"; fi
        ;;
    "set power")
        if [ "$3" = 1 ]; then
            if running; then
                log "power on: already on"
            else
                log "power on: starting the VM (boot device $(cat "$state/bootdev" 2>/dev/null || echo default))"
                sh "$LAB_VM_CMD" >>"$state/vm.log" 2>&1 &
                echo $! >"$pidfile"
            fi
        else
            if running; then
                log "power off: stopping the VM"
                kill "$(cat "$pidfile")" 2>/dev/null
                for _ in 1 2 3 4 5 6 7 8 9 10; do running || break; sleep 0.2; done
                running && kill -9 "$(cat "$pidfile")" 2>/dev/null
            else
                log "power off: already off"
            fi
            rm -f "$pidfile"
        fi
        ;;
    "get boot")
        echo "boot:$(cat "$state/bootdev" 2>/dev/null || echo default)"
        ;;
    "set boot")
        echo "$3" >"$state/bootdev"
        log "boot device set to $3"
        ;;
    *)
        log "unknown request: $*"
        exit 1
        ;;
esac
exit 0
