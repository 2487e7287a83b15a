#!/usr/bin/env python3
"""pxemesh stand-in for CloudStack's scripts/util/ipmi.py.

    ipmi.py <ping|boot_dev|reboot|power|boot_or_reboot> hostname=<ipmi ip>
            usrname=<user> password=<password> [interface=<-I value>]
            [dev=<bootdev>] [action=<power action>]

The management server runs it locally. Instead of calling ipmitool, the
pxemesh host whose BMC address is <ipmi ip> is found (`pxemeshctl host find
--bmc`) and a power or boot-device job is submitted with --wait: the rack's
relay runs it with the credentials pxemesh stores sealed for that host. The
usrname/password given by CloudStack are not used and never passed on to a
child process (a command line is visible to every local user); `interface`
is accepted and ignored (the relay picks lanplus and the cipher suite from
the host record).

`ping` of a BMC no pxemesh host has yet (CloudStack's addHost checks the BMC
before the bridge can know the host) runs ipmitool directly, like the
original, with the password in IPMI_PASSWORD (`-E`) and PXEMESH_IPMI_PORT
(default 623); every other sub-command needs the host in pxemesh.

Exit status and output follow the original: 0 on success (`ping` and
`power action=status` print ipmitool's "Chassis Power is on|off" line), 1 with
a message on stderr otherwise.

Configuration: as the other wrappers (pxemesh_wrapper.py), PXEMESH_ENDPOINTS,
PXEMESH_TLS_DIR, PXEMESH_CERT_STEM and PXEMESHCTL in the environment or
/etc/pxemesh/cloudstack-wrappers.env; PXEMESH_IPMI_TIMEOUT (seconds, default
120) bounds each job.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pxemesh_wrapper as w  # noqa: E402

POWER_ACTIONS = {"on", "off", "cycle", "reset", "soft", "status"}
BOOT_DEVICES = {"pxe", "disk"}


def parse(argv):
    if not argv:
        w.fail("usage: ipmi.py <ping|boot_dev|reboot|power|boot_or_reboot> hostname=<ip> ...")
    cmd, params = argv[0], {}
    for a in argv[1:]:
        if "=" not in a:
            w.fail("argument %r is not key=value" % a)
        k, v = a.split("=", 1)
        params[k] = v
    if not params.get("hostname"):
        w.fail("hostname=<ipmi ip> is required")
    return cmd, params


def find_host(bmc):
    """The pxemesh host with this BMC address, or None when there is none."""
    p = w.ctl("host", "find", "--bmc", bmc, check=False)
    if p.returncode != 0:
        if "no host has BMC address" in p.stderr:
            return None
        w.fail("looking up BMC address %s: %s" % (bmc, (p.stderr or p.stdout).strip()))
    names = json.loads(p.stdout).get("hosts", [])
    if len(names) != 1:
        w.fail("BMC address %s belongs to %d pxemesh hosts: %s" % (bmc, len(names), ", ".join(names)))
    return names[0]


def run_job(words, host):
    timeout = os.environ.get("PXEMESH_IPMI_TIMEOUT", "120")
    p = w.ctl(*(words + [host, "--wait", "--wait-timeout", timeout]), check=False)
    try:
        jobs = json.loads(p.stdout).get("jobs", []) if p.stdout.strip() else []
    except ValueError:
        jobs = []
    job = jobs[0] if jobs else {}
    if p.returncode != 0 or job.get("state") != "succeeded":
        reason = job.get("reason") or (p.stderr or p.stdout).strip() or "job failed"
        w.fail("%s %s: %s" % (" ".join(words), host, reason))
    return job.get("result", "")


def power_state(host):
    # The job's result reads "power on" / "power off".
    state = run_job(["power", "status"], host).strip()
    if state.startswith("power "):
        state = state[len("power "):]
    if state not in ("on", "off"):
        w.fail("power status of %s: unexpected answer %r" % (host, state))
    return state


def direct_ping(params):
    """`ping` of a BMC pxemesh does not know yet: CloudStack checks a new
    host's BMC (addHost) before any listing can show it to the bridge. Run
    ipmitool like the original, the password in the environment (-E), never
    on the command line."""
    cmd = ["ipmitool"]
    iface = params.get("interface", "")
    if iface and iface != "default":
        cmd += ["-I", iface]
    cmd += ["-H", params["hostname"], "-p", os.environ.get("PXEMESH_IPMI_PORT", "623"),
            "-U", params.get("usrname", ""), "-E", "chassis", "power", "status"]
    env = dict(os.environ, IPMI_PASSWORD=params.get("password", ""))
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        w.fail("running ipmitool: %s" % e)
    if p.returncode != 0:
        w.fail("no pxemesh host has BMC address %s, and ipmitool failed: %s"
               % (params["hostname"], p.stderr.strip() or p.stdout.strip()))
    print(p.stdout.strip())
    return 0


def main(argv):
    cmd, params = parse(argv)
    host = find_host(params["hostname"])
    if host is None:
        if cmd == "ping":
            return direct_ping(params)
        w.fail("no pxemesh host has BMC address %s" % params["hostname"])
    if cmd == "ping":
        print("Chassis Power is %s" % power_state(host))
    elif cmd == "boot_dev":
        dev = params.get("dev", "")
        if dev not in BOOT_DEVICES:
            w.fail("boot_dev: dev=%r is not one of %s" % (dev, ", ".join(sorted(BOOT_DEVICES))))
        run_job(["bootdev", dev], host)
    elif cmd == "power":
        action = params.get("action", "")
        if action not in POWER_ACTIONS:
            w.fail("power: action=%r is not one of %s" % (action, ", ".join(sorted(POWER_ACTIONS))))
        if action == "status":
            print("Chassis Power is %s" % power_state(host))
        else:
            run_job(["power", action], host)
    elif cmd == "reboot":
        # Like the original: cycle a running host, reset one that is off.
        run_job(["power", "cycle" if power_state(host) == "on" else "reset"], host)
    elif cmd == "boot_or_reboot":
        run_job(["power", "cycle" if power_state(host) == "on" else "on"], host)
    else:
        w.fail("unknown sub-command %r" % cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
