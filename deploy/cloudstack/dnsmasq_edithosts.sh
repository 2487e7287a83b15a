#!/bin/sh
# Drop-in for CloudStack's scripts/network/exdhcp/dnsmasq_edithosts.sh:
#   dnsmasq_edithosts.sh <vm mac> <vm ip> <vm name>
# (BaremetalDnsmasqResource, DhcpEntryCommand). Instead of editing dnsmasq's
# hosts file, it makes the reservation in pxemesh; the rack's relay answers
# the MAC. Configuration: see pxemesh_wrapper.py.
if [ $# -ne 3 ]; then
    echo "usage: $0 <mac> <ip> <name>" >&2
    exit 1
fi
here=$(cd "$(dirname "$0")" && pwd)
exec python3 - "$here" "$@" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import pxemesh_wrapper as w
w.reserve(sys.argv[2], sys.argv[3], sys.argv[4])
PY
