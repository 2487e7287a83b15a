#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/.

Seeds are the real shapes each parser meets: DHCP requests laid out as
dhclient, udhcpc, PXE ROMs (BIOS and UEFI), UEFI HTTP boot and iPXE send
them (options in the order those clients use), through relay agents with
option 82; TFTP RRQs with the options PXE ROMs and tftp-hpa send; HTTP
requests as curl, iPXE and UEFI firmware make them; CloudStack answers (a
bare metal listing shaped like the CloudStack simulator's, errors, async
results; `--recorded DIR` writes the recorded answers of
../shared/cloudstack-responses, which fuzz/run.sh adds at run time); our example
configuration files; image manifests. Run from the repository root:

    python3 fuzz/seeds/make_seeds.py

Deterministic: running it twice gives the same files. Seeds are small; the
corpus libFuzzer grows during `fuzz/run.sh` goes to a temporary copy and is
never committed.
"""
import hashlib
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- DHCP
def ip(s):
    return bytes(int(x) for x in s.split("."))


def mac(s):
    return bytes(int(x, 16) for x in s.split(":"))


def opt(code, value):
    return bytes([code, len(value)]) + value


def dhcp(mtype, chaddr, opts, xid=0x1234ABCD, ciaddr="0.0.0.0", giaddr="0.0.0.0",
         flags=0, hops=0, secs=0, op=1):
    hdr = struct.pack("!BBBBIHH", op, 1, 6, hops, xid, secs, flags)
    hdr += ip(ciaddr) + ip("0.0.0.0") + ip("0.0.0.0") + ip(giaddr)
    hdr += mac(chaddr) + bytes(10) + bytes(64) + bytes(128)
    body = bytes([99, 130, 83, 99])
    if mtype is not None:
        body += opt(53, bytes([mtype]))
    for o in opts:
        body += o
    body += bytes([255])
    return hdr + body


N1 = "52:54:00:12:34:01"
D1 = "52:54:00:12:34:02"
FAR1 = "52:54:00:12:34:03"
POOL = "52:54:00:aa:bb:cc"
SID = opt(54, ip("10.20.0.2"))
PRL_DHCLIENT = opt(55, bytes([1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]))
PRL_PXE = opt(55, bytes([1, 2, 3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135]))
UUID = opt(97, bytes([0]) + bytes(range(16)))
NII = opt(94, bytes([1, 2, 1]))


def dhcp_seeds():
    t = "dhcp_request"
    cid = lambda m: opt(61, bytes([1]) + mac(m))
    write(t, "dhclient-discover", dhcp(1, N1, [cid(N1), opt(12, b"n1"), PRL_DHCLIENT]))
    write(t, "dhclient-request-selecting", dhcp(3, N1, [cid(N1), SID, opt(50, ip("10.20.0.11")), opt(12, b"n1"), PRL_DHCLIENT]))
    write(t, "dhclient-request-renewing", dhcp(3, N1, [cid(N1), PRL_DHCLIENT], ciaddr="10.20.0.11"))
    write(t, "dhclient-init-reboot", dhcp(3, N1, [cid(N1), opt(50, ip("10.20.0.11")), PRL_DHCLIENT]))
    write(t, "dhclient-release", dhcp(7, N1, [cid(N1), SID], ciaddr="10.20.0.11"))
    write(t, "dhclient-inform", dhcp(8, N1, [cid(N1), PRL_DHCLIENT], ciaddr="10.20.0.11"))
    udhcpc = [cid(POOL), opt(57, struct.pack("!H", 576)), opt(60, b"udhcp 1.36.1"), opt(55, bytes([1, 3, 6, 12, 15, 28, 42]))]
    write(t, "udhcpc-discover-pool", dhcp(1, POOL, udhcpc, flags=0x8000))
    write(t, "udhcpc-request-pool", dhcp(3, POOL, udhcpc + [opt(50, ip("10.30.0.200")), opt(54, ip("10.30.0.2"))]))
    write(t, "udhcpc-decline-pool", dhcp(4, POOL, [cid(POOL), opt(50, ip("10.30.0.200")), opt(54, ip("10.30.0.2"))]))
    write(t, "udhcpc-release-pool", dhcp(7, POOL, [cid(POOL), opt(54, ip("10.30.0.2"))], ciaddr="10.30.0.200"))
    write(t, "reserved-on-pool-net", dhcp(1, D1, [cid(D1), PRL_DHCLIENT]))
    pxe = lambda arch, cls: [opt(57, struct.pack("!H", 1260)), opt(93, struct.pack("!H", arch)), NII, UUID, PRL_PXE, opt(60, cls)]
    write(t, "pxe-bios-discover", dhcp(1, N1, pxe(0, b"PXEClient:Arch:00000:UNDI:002001"), flags=0x8000, secs=4))
    write(t, "pxe-bios-request", dhcp(3, N1, pxe(0, b"PXEClient:Arch:00000:UNDI:002001") + [SID, opt(50, ip("10.20.0.11"))], flags=0x8000))
    write(t, "pxe-uefi-x64-discover", dhcp(1, N1, pxe(7, b"PXEClient:Arch:00007:UNDI:003016")))
    write(t, "pxe-uefi-arm64-discover", dhcp(1, N1, pxe(11, b"PXEClient:Arch:00011:UNDI:003000")))
    write(t, "uefi-http-boot-discover", dhcp(1, N1, pxe(16, b"HTTPClient:Arch:00016:UNDI:003001")))
    ipxe_enc = opt(175, opt(177, b"\x01\x01\x01") + opt(19, b"\x01") + opt(24, b"\x01"))
    write(t, "ipxe-discover", dhcp(1, N1, pxe(0, b"PXEClient:Arch:00000:UNDI:002001") + [opt(77, b"iPXE"), ipxe_enc]))
    write(t, "ipxe-request", dhcp(3, N1, pxe(7, b"PXEClient:Arch:00007:UNDI:003016") + [opt(77, b"iPXE"), ipxe_enc, SID, opt(50, ip("10.20.0.11"))]))
    agent = opt(82, opt(1, b"eth0/1/12:1994") + opt(2, mac("00:11:22:33:44:55")))
    write(t, "relayed-discover-opt82", dhcp(1, FAR1, pxe(0, b"PXEClient:Arch:00000:UNDI:002001") + [agent], giaddr="10.40.0.1", hops=1))
    write(t, "relayed-request-opt82", dhcp(3, FAR1, [cid(FAR1), opt(54, ip("10.20.0.2")), opt(50, ip("10.40.0.50")), agent], giaddr="10.40.0.1", hops=1))
    write(t, "overload-option52", dhcp(1, N1, [opt(52, b"\x03"), cid(N1)]))
    write(t, "long-options", dhcp(1, N1, [opt(12, b"x" * 255), opt(43, b"\x01" * 200), cid(N1)]))
    write(t, "bootp-no-msgtype", dhcp(None, N1, []))
    write(t, "boot-reply-op2", dhcp(2, N1, [], op=2))
    write(t, "truncated", dhcp(1, N1, [cid(N1)])[:250])


# ---------------------------------------------------------------- TFTP
def rrq(name, mode="octet", opts=(), op=1):
    b = struct.pack("!H", op) + name.encode() + b"\0" + mode.encode() + b"\0"
    for k, v in opts:
        b += k.encode() + b"\0" + v.encode() + b"\0"
    return b


def tftp_seeds():
    t = "tftp_request"
    write(t, "pxe-rom-tsize-probe", rrq("undionly.kpxe", opts=[("tsize", "0"), ("blksize", "1456")]))
    write(t, "pxe-rom-leading-slash", rrq("/undionly.kpxe", opts=[("blksize", "1468"), ("tsize", "0")]))
    write(t, "uefi-windowsize", rrq("ipxe.efi", opts=[("blksize", "1468"), ("windowsize", "4"), ("tsize", "0")]))
    write(t, "tftp-hpa-timeout", rrq("centos/vmlinuz", "netascii", [("timeout", "3"), ("blksize", "65464")]))
    write(t, "pxelinux-cfg", rrq("pxelinux.cfg/01-52-54-00-12-34-01", opts=[("tsize", "0")]))
    write(t, "ipxe-script", rrq("52:54:00:12:34:01.ipxe"))
    write(t, "ipxe-script-dashes", rrq("52-54-00-12-34-03.ipxe", "NetASCII"))
    write(t, "traversal", rrq("../../etc/passwd"))
    write(t, "symlink-escape", rrq("escape"))
    write(t, "symlink-inside", rrq("inside", opts=[("BLKSIZE", "512"), ("blksize", "1024")]))
    write(t, "write-request", rrq("upload.bin", op=2))
    write(t, "ack", struct.pack("!HH", 4, 1))
    write(t, "ack-wrapped", struct.pack("!HH", 4, 0))
    write(t, "error-client-abort", struct.pack("!HH", 5, 8) + b"tsize probe\0")
    write(t, "oack", struct.pack("!H", 6) + b"blksize\x001468\x00tsize\x0012345\x00")
    write(t, "data", struct.pack("!HH", 3, 1) + b"x" * 32)
    write(t, "mail-mode", rrq("undionly.kpxe", "mail"))


# ---------------------------------------------------------------- HTTP
def http_seeds():
    t = "http_path"
    crlf = lambda *lines: ("\r\n".join(lines) + "\r\n\r\n").encode()
    write(t, "curl-get", crlf("GET /files/centos/vmlinuz HTTP/1.1", "Host: 10.20.0.2:8080", "User-Agent: curl/7.88.1", "Accept: */*"))
    write(t, "curl-range", crlf("GET /files/centos/vmlinuz HTTP/1.1", "Host: 10.20.0.2", "Range: bytes=0-99"))
    write(t, "suffix-range", crlf("GET /files/centos/vmlinuz HTTP/1.1", "Host: 10.20.0.2", "Range: bytes=-500"))
    write(t, "open-range", crlf("GET /files/ipxe.efi HTTP/1.1", "Host: 10.20.0.2", "Range: bytes=1048576-"))
    write(t, "multi-range", crlf("GET /files/ipxe.efi HTTP/1.1", "Range: bytes=0-1,5-9"))
    write(t, "if-range-etag", crlf("GET /files/centos/vmlinuz HTTP/1.1", "If-Range: \"sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03\"", "Range: bytes=100-199"))
    write(t, "if-none-match", crlf("GET /files/centos/vmlinuz HTTP/1.1", "If-None-Match: \"x\", \"sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03\""))
    write(t, "head-close", crlf("HEAD /files/ipxe.efi HTTP/1.1", "Host: 10.20.0.2", "Connection: close"))
    write(t, "ipxe", crlf("GET /files/centos/initrd.img HTTP/1.1", "Connection: keep-alive", "User-Agent: iPXE/1.21.1+ (g4bd064de)", "Host: 10.20.0.2:8080"))
    write(t, "uefi-http-boot", crlf("GET /files/ipxe.efi HTTP/1.1", "Host: 10.20.0.2", "Accept: */*", "User-Agent: UefiHttpBoot/1.0"))
    write(t, "http10", crlf("GET /files/ipxe.efi HTTP/1.0"))
    write(t, "traversal", crlf("GET /files/../../etc/passwd HTTP/1.1"))
    write(t, "symlink-escape", crlf("GET /files/escape HTTP/1.1"))
    write(t, "pipelined", crlf("GET /files/ipxe.efi HTTP/1.1", "Range: bytes=0-0") + crlf("GET /files/centos/vmlinuz HTTP/1.1"))
    write(t, "content-length", crlf("GET /files/ipxe.efi HTTP/1.1", "Content-Length: 0"))


# ---------------------------------------------------------------- CloudStack
def recorded_seeds(out_dir):
    """The recorded CloudStack answers of ../shared/cloudstack-responses,
    each wrapped as a live server sends it ({"<command>response": ...}).
    They are third-party test data, so they are not checked in: fuzz/run.sh
    writes them into its temporary corpus when the directory exists."""
    shared = os.path.join(os.path.dirname(ROOT), "shared", "cloudstack-responses")
    if not os.path.isdir(shared):
        return 0
    n = 0
    os.makedirs(out_dir, exist_ok=True)
    for fname in sorted(os.listdir(shared)):
        if not fname.endswith(".json"):
            continue
        with open(os.path.join(shared, fname)) as f:
            doc = json.load(f)
        for cmd, value in sorted(doc.items()):
            key = cmd.lower() + "response"
            # The SDK's files sometimes wrap under the command's name.
            if isinstance(value, dict) and len(value) == 1 and next(iter(value)).endswith("response"):
                value = next(iter(value.values()))
            with open(os.path.join(out_dir, f"recorded-{cmd}"), "w") as f:
                f.write(json.dumps({key: value}, sort_keys=True))
            n += 1
    return n


def cloudstack_seeds():
    t = "cloudstack_json"
    zone = {"id": "z1", "name": "zone1", "networktype": "Advanced"}
    pod = {"id": "p1", "name": "POD0", "zoneid": "z1", "zonename": "zone1"}
    hosts = [{"id": f"h-{i}", "name": f"bm-0{i}", "hypervisor": "BareMetal", "type": "Routing",
              "podid": "p1", "podname": "POD0", "zoneid": "z1", "zonename": "zone1",
              "ipaddress": f"172.16.15.{10 + i}", "cpunumber": 8, "cpuspeed": 2400,
              "memorytotal": 34359738368, "state": "Up", "resourcestate": "Enabled",
              "details": {"hostmac": f"52:54:00:00:01:0{i}"}} for i in range(1, 4)]
    vms = [{"id": f"v-{i}", "name": f"inst-{i}", "state": s, "hypervisor": "BareMetal",
            "hostid": f"h-{i}", "zoneid": "z1", "templateid": "t1",
            "nic": [{"id": f"n-{i}", "macaddress": f"52:54:00:00:01:0{i}", "ipaddress": f"10.1.1.{100 + i}",
                     "netmask": "255.255.255.0", "gateway": "10.1.1.1", "networkid": "net1",
                     "networkname": "baremetal-guest", "broadcasturi": "vlan://1994", "isdefault": True}]}
           for i, s in [(1, "Running"), (2, "Stopped"), (3, "Expunging")]]
    templates = [{"id": "t1", "name": "centos7", "hypervisor": "BareMetal", "zoneid": "z1",
                  "url": "ks=http://10.0.0.5/c7.cfg;kernel=10.0.0.5:/c7/vmlinuz;initrd=10.0.0.5:/c7/initrd.img"},
                 {"id": "t2", "name": "broken", "hypervisor": "BareMetal", "zoneid": "z1", "url": "ks=x;kernel=;initrd=y"}]
    listing = {
        "listzonesresponse": {"count": 1, "zone": [zone]},
        "listpodsresponse": {"count": 1, "pod": [pod]},
        "listhostsresponse": {"count": 3, "host": hosts},
        "listvirtualmachinesresponse": {"count": 3, "virtualmachine": vms},
        "listtemplatesresponse": {"count": 2, "template": templates},
    }
    write(t, "baremetal-listing", json.dumps(listing, sort_keys=True))
    write(t, "api-error", json.dumps({"errorresponse": {"errorcode": 431, "cserrorcode": 9999, "errortext": "Unable to execute API command listhosts due to invalid value"}}))
    write(t, "async-result", json.dumps({"queryasyncjobresultresponse": {"jobid": "j1", "jobstatus": 1, "jobresultcode": 0, "jobresult": {"success": True}}}))
    write(t, "empty-lists", json.dumps({"listzonesresponse": {}, "listpodsresponse": {"pod": None}}))


# ---------------------------------------------------------------- config files
def config_seeds():
    t = "config_toml"
    deploy = os.path.join(ROOT, "deploy")
    for fname in sorted(os.listdir(deploy)):
        if fname.endswith(".toml"):
            with open(os.path.join(deploy, fname), "rb") as f:
                write(t, "deploy-" + fname, f.read())
    with open(os.path.join(ROOT, "fuzz", "data", "rack.toml"), "rb") as f:
        write(t, "fuzz-rack.toml", f.read())
    with open(os.path.join(ROOT, "fuzz", "data", "relay.toml"), "rb") as f:
        write(t, "fuzz-relay.toml", f.read())
    rack = {"rack": "r1",
            "networks": [{"name": "prov", "rack": "r1", "subnet": "10.20.0.0/24", "gateway": "10.20.0.1",
                          "mtu": 1500, "lease_seconds": 600, "pool": ["10.20.0.100", "10.20.0.150"]}],
            "hosts": [{"name": "n1", "mac": "52:54:00:12:34:01", "ip": "10.20.0.11", "rack": "r1",
                       "network": "prov", "profile": "centos"}],
            "profiles": [{"name": "centos", "kind": "kickstart", "kernel": "centos/vmlinuz"}]}
    write(t, "rack.json", json.dumps(rack, indent=1))
    write(t, "hosts.csv", "name,mac,ip,rack,network,profile,bmc_address,bmc_username,labels\n"
          "n1,52:54:00:12:34:01,10.20.0.11,r1,prov,centos,10.99.0.11,ADMIN,role=worker;tier=a\n"
          "n2,52-54-00-12-34-02,10.20.0.12,r1,prov,,,,\n")
    write(t, "hosts.json", json.dumps({"hosts": [{"name": "n1", "mac": "52:54:00:12:34:01", "ip": "10.20.0.11",
                                                   "rack": "r1", "network": "prov", "labels": {"role": "worker"}}]}))


# ---------------------------------------------------------------- manifests
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + varint(payload)


def manifest(name, files, revision=0):
    b = field(1, 2, name.encode())
    for path, content, mode in files:
        digest = "sha256:" + hashlib.sha256(content).hexdigest()
        f = field(1, 2, path.encode()) + field(2, 2, digest.encode()) + field(3, 0, len(content)) + field(4, 0, mode)
        b += field(2, 2, f)
    if revision:
        b += field(14, 0, revision) + field(15, 0, revision)
    return b


def manifest_seeds():
    t = "image_manifest"
    write(t, "centos7", manifest("centos7", [("vmlinuz", b"kernel", 0o644), ("initrd.img", b"initrd", 0o644)]))
    write(t, "nested-paths", manifest("ubuntu-22.04", [("casper/vmlinuz", b"k", 0o644), ("casper/initrd", b"i", 0o600), ("boot/grub/grub.cfg", b"cfg", 0o644)], revision=42))
    write(t, "duplicate-digest", manifest("dup", [("a", b"same", 0o644), ("b", b"same", 0o755)]))
    write(t, "empty", manifest("empty", []))
    write(t, "bad-path", manifest("bad", [("../etc/passwd", b"x", 0o644)]))


def s_(num, text):
    return field(num, 2, text.encode())


def labels(num, d):
    return b"".join(field(num, 2, s_(1, k) + s_(2, v)) for k, v in sorted(d.items()))


def admin_seeds():
    t = "admin_object"
    rack = s_(1, "r1") + s_(2, "rack one") + s_(3, "10.99.0.0/24") + labels(4, {"row": "a"})
    write(t, "rack", field(1, 2, rack))
    net = (s_(1, "prov") + s_(2, "r1") + s_(3, "10.20.0.0/24") + s_(4, "10.20.0.1") + s_(5, "10.20.0.1")
           + s_(5, "2001:db8::53") + s_(6, "rack1.example") + field(7, 0, 9000) + field(8, 0, 1994)
           + s_(9, "10.20.0.100") + s_(10, "10.20.0.150") + field(11, 0, 600) + s_(12, "eth0"))
    write(t, "network", field(2, 2, net))
    bmc = s_(1, "10.99.0.11") + field(2, 0, 623) + s_(3, "ADMIN") + s_(4, "secret") + field(6, 0, 17)
    host = (s_(1, "n1") + s_(2, "52:54:00:12:34:01") + s_(3, "10.20.0.11") + s_(4, "n1.rack1.example")
            + s_(5, "r1") + s_(6, "prov") + s_(7, "centos") + labels(8, {"role": "worker"}) + field(9, 2, bmc))
    write(t, "host", field(3, 2, host))
    write(t, "host-dashed-mac", field(3, 2, s_(1, "n2") + s_(2, "52-54-00-12-34-02") + s_(3, "10.20.0.12") + s_(5, "r1") + s_(6, "prov")))
    prof = (s_(1, "centos") + s_(3, "kickstart") + s_(4, "centos7") + s_(5, "vmlinuz") + s_(6, "initrd.img")
            + s_(7, "ip=dhcp") + s_(8, "http://10.20.0.2/ks.cfg"))
    write(t, "profile", field(4, 2, prof))
    write(t, "profile-ipxe", field(4, 2, s_(1, "custom") + s_(3, "ipxe") + s_(9, "#!ipxe\nchain http://${next-server}/x\n")))
    write(t, "image", field(5, 2, manifest("centos7", [("vmlinuz", b"kernel", 0o644)])))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--recorded":
        print(f"{recorded_seeds(sys.argv[2])} recorded CloudStack answers")
        return 0
    dhcp_seeds()
    tftp_seeds()
    http_seeds()
    cloudstack_seeds()
    config_seeds()
    manifest_seeds()
    admin_seeds()
    for target in sorted(os.listdir(CORPUS)):
        print(f"{target}: {len(os.listdir(os.path.join(CORPUS, target)))} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
