#!/usr/bin/env python3
"""Drop-in for CloudStack's scripts/network/exdhcp/dhcpd_edithosts.py:

    dhcpd_edithosts.py <vm mac> <vm ip> <vm name> <dns> <gateway> <next server>

(BaremetalDhcpdResource, DhcpEntryCommand). The reservation goes to pxemesh;
DNS, gateway and next-server are the network's and the relay's business in
pxemesh, so they are checked against the network and a difference is
reported on stderr (not an error: the management server's view of the
subnet wins nowhere but in its logs). Configuration: see pxemesh_wrapper.py.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pxemesh_wrapper as w  # noqa: E402

if len(sys.argv) != 7:
    sys.stderr.write("usage: %s <mac> <ip> <name> <dns> <gateway> <next server>\n" % sys.argv[0])
    sys.exit(1)
mac, ip, name, dns, gateway, _next_server = sys.argv[1:7]
w.reserve(mac, ip, name)
net = json.loads(w.ctl("network", "get", w.need("PXEMESH_NETWORK")).stdout or "{}")
if gateway and net.get("gateway") and net.get("gateway") != gateway:
    sys.stderr.write("pxemesh: note: CloudStack's gateway %s differs from network %s's %s\n"
                     % (gateway, net.get("name"), net.get("gateway")))
if dns and net.get("dns") and dns not in net.get("dns", []):
    sys.stderr.write("pxemesh: note: CloudStack's DNS %s is not among network %s's %s\n"
                     % (dns, net.get("name"), net.get("dns")))
