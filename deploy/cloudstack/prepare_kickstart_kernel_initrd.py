#!/usr/bin/env python3
"""Drop-in for CloudStack's scripts/network/ping/prepare_kickstart_kernel_initrd.py:

    prepare_kickstart_kernel_initrd.py <kernel> <initrd> <tftp dir>/<template uuid>

(BaremetalKickStartPxeResource, PrepareKickstartPxeServerCommand). The
original mounts the NFS directory of each file and copies them next to the
TFTP root as vmlinuz and initrd.img. Here they become image
`cs-<template uuid>` (files vmlinuz and initrd.img) in pxemesh's image store,
which every rack's relay caches; like the original, nothing is copied when
the image already exists. Each of <kernel> and <initrd> may be an NFS path
(server:/path/file, mounted read-only), an http(s) URL or a local file.
Configuration: pxemesh_wrapper.py.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pxemesh_wrapper as w  # noqa: E402


def fetch(src, dst):
    if src.startswith("http://") or src.startswith("https://"):
        try:
            with urllib.request.urlopen(src, timeout=60) as r, open(dst, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            w.fail("downloading %s: %s" % (src, e))
    elif ":" in src and not os.path.exists(src):
        server_dir, _, name = src.rpartition("/")
        mnt = tempfile.mkdtemp(prefix="pxemesh-nfs-")
        try:
            p = subprocess.run(["mount", "-t", "nfs", "-o", "ro,nolock", server_dir, mnt],
                               capture_output=True, text=True, timeout=120)
            if p.returncode != 0:
                w.fail("mounting %s: %s" % (server_dir, p.stderr.strip()))
            try:
                shutil.copyfile(os.path.join(mnt, name), dst)
            finally:
                subprocess.run(["umount", mnt], capture_output=True, timeout=120)
        finally:
            os.rmdir(mnt)
    else:
        try:
            shutil.copyfile(src, dst)
        except OSError as e:
            w.fail("copying %s: %s" % (src, e))


if len(sys.argv) != 4:
    sys.stderr.write("usage: %s <kernel> <initrd> <tftp dir>/<template uuid>\n" % sys.argv[0])
    sys.exit(1)
kernel, initrd, dest = sys.argv[1:4]
template = os.path.basename(dest.rstrip("/"))
if not template:
    w.fail("cannot tell the template uuid from %r" % dest)
name = "cs-%s" % template
images = json.loads(w.ctl("image", "list").stdout or "[]")
if any(i.get("name") == name for i in images):
    print("image %s already present" % name)
    sys.exit(0)
work = tempfile.mkdtemp(prefix="pxemesh-ks-")
try:
    fetch(kernel, os.path.join(work, "vmlinuz"))
    fetch(initrd, os.path.join(work, "initrd.img"))
    w.ctl("image", "push", work, "--name", name)
    print("image %s pushed" % name)
finally:
    shutil.rmtree(work, ignore_errors=True)
