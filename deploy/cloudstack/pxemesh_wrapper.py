"""Shared part of the CloudStack drop-in wrappers: talk to pxemesh through
pxemeshctl, configured by environment (or /etc/pxemesh/cloudstack-wrappers.env):

  PXEMESH_ENDPOINTS   coordinator endpoints (host:port,...)
  PXEMESH_TLS_DIR     directory with ca.pem and the admin certificate
  PXEMESH_CERT_STEM   admin certificate stem (default: admin)
  PXEMESH_RACK        the rack this CloudStack DHCP/PXE server stands for
  PXEMESH_NETWORK     the pxemesh network of that rack's instances
  PXEMESHCTL          pxemeshctl binary (default: pxemeshctl on PATH)

Exit status follows CloudStack's scripts: 0 on success, 1 with a message on
stderr otherwise (the management server logs it).
"""
import json
import os
import subprocess
import sys

ENV_FILE = "/etc/pxemesh/cloudstack-wrappers.env"


def _load_env_file():
    try:
        with open(ENV_FILE) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, v = line.split("=", 1)
                    os.environ.setdefault(k.strip(), v.strip())
    except FileNotFoundError:
        pass


_load_env_file()


def fail(msg):
    sys.stderr.write("pxemesh: %s\n" % msg)
    sys.exit(1)


def need(name):
    v = os.environ.get(name, "").strip()
    if not v:
        fail("%s is not set (environment or %s)" % (name, ENV_FILE))
    return v


def ctl(*args, check=True):
    cmd = [os.environ.get("PXEMESHCTL", "pxemeshctl"), "-o", "json"] + list(args)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        fail("running pxemeshctl: %s" % e)
    if check and p.returncode != 0:
        fail("pxemeshctl %s: %s" % (" ".join(args[:2]), p.stderr.strip() or p.stdout.strip()))
    return p


def hosts():
    out = ctl("host", "list").stdout
    data = json.loads(out) if out.strip() else []
    return data if isinstance(data, list) else data.get("items", [])


def norm_mac(mac):
    m = mac.strip().lower().replace("-", ":")
    parts = m.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        fail("%r is not a MAC address" % mac)
    try:
        [int(p, 16) for p in parts]
    except ValueError:
        fail("%r is not a MAC address" % mac)
    return m


def put_host(h):
    """Write host record `h` (the JSON shape pxemeshctl prints). What the
    record already holds and the caller did not change is carried over:
    profile, labels and the BMC (its password stays stored: pxemesh keeps
    the sealed one when a write omits it)."""
    args = ["host", "put", h["name"], "--mac", h["mac"], "--ip", h["ip"],
            "--rack", h["rack"], "--network", h["network"]]
    if h.get("hostname"):
        args += ["--hostname", h["hostname"]]
    if h.get("profile"):
        args += ["--profile", h["profile"]]
    for k, v in sorted((h.get("labels") or {}).items()):
        args += ["--label", "%s=%s" % (k, v)]
    b = h.get("bmc") or {}
    if b.get("address"):
        args += ["--bmc-address", b["address"]]
        if b.get("port"):
            args += ["--bmc-port", str(b["port"])]
        if b.get("username"):
            args += ["--bmc-user", b["username"]]
        if b.get("cipher_suite"):
            args += ["--cipher-suite", str(b["cipher_suite"])]
    ctl(*args)


def host_by_mac(mac):
    mac = norm_mac(mac)
    for h in hosts():
        if h.get("mac", "").lower() == mac:
            return h
    return None


def reserve(mac, ip, name):
    """What CloudStack's edithosts scripts do to their DHCP server: drop any
    earlier entry for this MAC, IP or name, then add mac -> ip, name."""
    mac = norm_mac(mac)
    rack, network = need("PXEMESH_RACK"), need("PXEMESH_NETWORK")
    current = None
    for h in hosts():
        if h.get("name") == name:
            current = h
            continue
        same = h.get("mac", "").lower() == mac or (
            h.get("ip") == ip and h.get("network") == network
        )
        if same:
            ctl("host", "delete", h["name"])
    h = dict(current or {})
    h.update({"name": name, "mac": mac, "ip": ip, "rack": rack,
              "network": network, "hostname": name})
    put_host(h)
