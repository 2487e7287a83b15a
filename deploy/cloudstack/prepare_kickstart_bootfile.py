#!/usr/bin/env python3
"""Drop-in for CloudStack's scripts/network/ping/prepare_kickstart_bootfile.py:

    prepare_kickstart_bootfile.py <tftp dir> <mac> <template uuid>/vmlinuz \\
        <template uuid>/initrd.img <ks URL> <ksdevice>

(BaremetalKickStartPxeResource, PrepareKickstartPxeServerCommand). The
original writes pxelinux.cfg/01-<mac> into the TFTP root. Here the host with
that MAC gets a kickstart boot profile `cs-<template uuid>` whose kernel and
initrd come from image `cs-<template uuid>` (prepare_kickstart_kernel_initrd.py
fills it) and whose command line is the original's APPEND line; the rack's
relay renders the per-MAC config (pxelinux or iPXE) from it. The TFTP
directory argument is accepted and not used. Configuration: pxemesh_wrapper.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pxemesh_wrapper as w  # noqa: E402

if len(sys.argv) not in (6, 7):
    sys.stderr.write("usage: %s <tftp dir> <mac> <uuid>/vmlinuz <uuid>/initrd.img <ks URL> [<ksdevice>]\n"
                     % sys.argv[0])
    sys.exit(1)
_tftp_dir, mac, kernel, initrd, ks = sys.argv[1:6]
ksdevice = sys.argv[6] if len(sys.argv) == 7 else ""
template, _, kernel_file = kernel.strip("/").partition("/")
itemplate, _, initrd_file = initrd.strip("/").partition("/")
if not template or not kernel_file or template != itemplate or not initrd_file:
    w.fail("kernel and initrd must be <template uuid>/<file> of the same template, got %r and %r"
           % (kernel, initrd))
if not (ks.startswith("http://") or ks.startswith("https://")):
    w.fail("the kickstart URL must be http(s), got %r" % ks)
host = w.host_by_mac(mac)
if host is None:
    w.fail("no host with MAC %s: the DHCP entry (dnsmasq_edithosts/dhcpd_edithosts) comes first" % mac)
profile = "cs-%s" % template
cmdline = "ramdisk_size=66000"
if ksdevice:
    cmdline += " ksdevice=%s" % ksdevice
w.ctl("profile", "put", profile, "--kind", "kickstart", "--image", profile,
      "--kernel", kernel_file, "--initrd", initrd_file, "--kickstart-url", ks,
      "--cmdline", cmdline, "--description", "CloudStack template %s" % template)
host["profile"] = profile
w.put_host(host)
