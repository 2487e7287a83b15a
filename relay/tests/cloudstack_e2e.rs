//! The CloudStack bridge end to end: the CloudStack API simulator
//! (coordinator/tests/cloudstack_sim), a real coordinator process running the
//! bridge, a real relay process, an OpenIPMI `ipmi_sim` BMC on loopback and
//! the drop-in `deploy/cloudstack/ipmi.py`:
//!
//! - a pod with two bare metal hosts and one kickstart instance becomes the
//!   rack's host record, and the relay answers the instance's MAC over DHCP
//!   (a relay-agent style unicast request on loopback) with its address;
//! - the instance entering `Starting` sets the simulated chassis to boot
//!   from PXE, then powers it on (in that order, as the BMC saw it);
//! - the kickstart's callback to the relay (`GET
//!   /baremetal/provisiondone/<mac>`) produces exactly one accepted
//!   `notifyBaremetalProvisionDone`, also across further syncs;
//! - `ipmi.py` run with CloudStack's arguments (`power action=off`, `ping`,
//!   `boot_dev dev=pxe`, `boot_or_reboot`) changes the simulated chassis and
//!   answers like the original; an unknown BMC exits 1; the BMC password is
//!   never on a child's command line.
//!
//! Needs `ipmi_sim` (Debian `openipmi`), `ipmitool` and python3; skips LOUDLY
//! without.

#[path = "support/cargo_build.rs"]
mod cargo_build;
#[path = "../../coordinator/tests/cloudstack_sim/mod.rs"]
mod cloudstack_sim;

use std::fs;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudstack_sim::{SimState, API_KEY, SECRET};
use dhcproto::v4::{DhcpOption, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use pxemesh_certs::{Ca, Identity, LeafRequest, Role};
use serde_json::{json, Value};

const TD: &str = "cs.pxemesh";
const BMC_PW: &str = "Cs-Bmc-pw-5531x";
const VM_MAC: &str = "52:54:00:c5:00:01";
const VM_IP: &str = "127.0.0.50";
const BMC_IP: &str = "127.0.0.11";

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .any(|d: PathBuf| d.join(bin).is_file())
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn issue(ca: &Ca, dir: &Path, role: Role, stem: &str) {
    let mut req = LeafRequest::new(Identity::new(TD, role), 1);
    req.dns_names = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    ca.issue(&req).unwrap().save(dir, stem).unwrap();
}

/// The simulator on its own runtime thread (the test body is blocking).
struct SimThread {
    url: String,
    state: Arc<Mutex<SimState>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimThread {
    fn start() -> SimThread {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let sim = cloudstack_sim::Sim::start().await;
                tx.send((sim.url(), sim.state.clone())).unwrap();
                let _ = stopped.await;
                drop(sim);
            });
        });
        let (url, state) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        SimThread {
            url,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn set(&self, coll: &str, items: Vec<Value>) {
        self.state
            .lock()
            .unwrap()
            .collections
            .insert(coll.into(), items);
    }

    fn accepted_notifies(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .jobs
            .values()
            .filter(|j| {
                j.command
                    .eq_ignore_ascii_case("notifyBaremetalProvisionDone")
            })
            .filter(|j| j.outcome.is_ok())
            .count()
    }
}

impl Drop for SimThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `ipmi_sim` BMC whose chassis script records power and boot device.
struct Bmc {
    dir: PathBuf,
    child: Child,
}

impl Bmc {
    fn start(root: &Path, name: &str, addr: &str, port: u16) -> Bmc {
        let dir = root.join(name);
        fs::create_dir_all(dir.join("state")).unwrap();
        let script = dir.join("chassis.sh");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nD={d}\necho \"$*\" >> $D/calls\ncase \"$1\" in\n  get) shift; for k in \"$@\"; do v=$(cat $D/$k 2>/dev/null || echo 0); echo \"$k:$v\"; done;;\n  set) shift; while [ $# -gt 1 ]; do echo \"$2\" > $D/$1.tmp && mv $D/$1.tmp $D/$1; shift 2; done;;\nesac\nexit 0\n",
                d = dir.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(
            dir.join("lan.conf"),
            format!(
                "name \"bm1\"\nset_working_mc 0x20\n  startlan 1\n    addr {addr} {port}\n    priv_limit admin\n    allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n    allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n    guid a123456789abcdefa123456789abcdef\n  endlan\n  chassis_control \"{}\"\n  user 2 true \"admin\" \"{BMC_PW}\" admin 10 none md2 md5 straight\n",
                script.display()
            ),
        )
        .unwrap();
        fs::write(
            dir.join("cmds.emu"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
        )
        .unwrap();
        let log = fs::File::create(dir.join("sim.log")).unwrap();
        let child = Command::new("ipmi_sim")
            .arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("cmds.emu"))
            .arg("-s")
            .arg(dir.join("state"))
            .arg("-n")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ipmi_sim");
        let t = Instant::now();
        loop {
            let ok = Command::new("ipmitool")
                .args(["-I", "lanplus", "-C", "3", "-H", addr, "-p"])
                .arg(port.to_string())
                .args(["-U", "admin", "-E", "-N", "1", "-R", "1"])
                .args(["chassis", "power", "status"])
                .env("IPMI_PASSWORD", BMC_PW)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "ipmi_sim did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_file(dir.join("calls"));
        Bmc { dir, child }
    }

    fn read(&self, what: &str) -> String {
        fs::read_to_string(self.dir.join(what))
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Lab {
    dir: tempfile::TempDir,
    ctl: PathBuf,
    endpoint: String,
    children: Vec<Child>,
}

impl Lab {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn ctl(&self, args: &[&str]) -> (bool, Value, String) {
        let out = Command::new(&self.ctl)
            .args(["--endpoints", &self.endpoint, "--tls-dir"])
            .arg(self.dir.path())
            .args(["--cert-stem", "admin", "--timeout", "20", "-o", "json"])
            .args(args)
            .output()
            .expect("pxemeshctl");
        let o = String::from_utf8_lossy(&out.stdout).into_owned();
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.success(),
            serde_json::from_str(&o).unwrap_or(Value::Null),
            format!("{o}{e}"),
        )
    }

    fn ctl_ok(&self, args: &[&str]) -> Value {
        let (ok, v, out) = self.ctl(args);
        assert!(ok, "pxemeshctl {args:?}: {out}");
        v
    }

    fn spawn(&mut self, bin: &Path, config: &Path, log: &str) {
        let log = fs::File::create(self.path(log)).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn");
        self.children.push(child);
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn ipmi_py(&self, args: &[&str], port: u16) -> (i32, String, String) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloudstack/ipmi.py");
        let out = Command::new("python3")
            .arg(script)
            .args(args)
            .env("PXEMESHCTL", self.path("pxemeshctl-argv.sh"))
            .env("PXEMESH_ENDPOINTS", &self.endpoint)
            .env("PXEMESH_TLS_DIR", self.dir.path())
            .env("PXEMESH_CERT_STEM", "admin")
            .env("PXEMESH_IPMI_TIMEOUT", "60")
            .env("PXEMESH_IPMI_PORT", port.to_string())
            .output()
            .expect("python3 ipmi.py");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            for name in ["coordinator.log", "relay.log"] {
                let log = self.log(name);
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("---- {name} (last 50 lines) ----");
                for l in &lines[lines.len().saturating_sub(50)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn vm(state: &str) -> Value {
    json!({
        "id": "vm-1", "name": "web-1", "state": state, "hypervisor": "BareMetal",
        "hostid": "h-1", "hostname": "bm-1", "zoneid": "z1", "templateid": "t-ks1",
        "nic": [{"id": "n1", "macaddress": VM_MAC, "ipaddress": VM_IP,
                 "netmask": "255.255.255.0", "gateway": "127.0.0.1", "isdefault": true}]
    })
}

/// A relay agent's DISCOVER for `mac` (giaddr 127.0.0.1, from `agent`);
/// the OFFER's yiaddr, if one comes.
fn dhcp_offer(agent: &UdpSocket, server_port: u16, mac: [u8; 6]) -> Option<Ipv4Addr> {
    let mut m = Message::new_with_id(
        0x5eed_0001,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::LOCALHOST,
        &mac,
    );
    m.set_hops(1);
    m.opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    agent
        .send_to(&buf, ("127.0.0.1", server_port))
        .expect("send DISCOVER");
    let mut rx = [0u8; 1500];
    let (n, _) = agent.recv_from(&mut rx).ok()?;
    let reply = Message::decode(&mut Decoder::new(&rx[..n])).ok()?;
    match reply.opts().get(dhcproto::v4::OptionCode::MessageType) {
        Some(DhcpOption::MessageType(MessageType::Offer)) => Some(reply.yiaddr()),
        _ => None,
    }
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(150));
    }
}

#[test]
fn cloudstack_instance_boots_through_the_relay_and_ipmi_py_drives_the_bmc() {
    if !(which("ipmi_sim") && which("ipmitool") && which("python3")) {
        eprintln!("\n!!!!!!!! SKIPPED cloudstack_e2e: ipmi_sim (openipmi), ipmitool or python3 is not installed !!!!!!!!\n");
        return;
    }
    // Binaries: the relay (this package) and the coordinator's.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_pxemesh-relay"))
        .parent()
        .unwrap()
        .to_path_buf();
    let st = cargo_build::cargo_build_bins(&["pxemesh-coordinator"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("cargo build");
    assert!(st.success(), "building the coordinator binaries failed");
    let coord = bin_dir.join("pxemesh-coordinator");

    let sim = SimThread::start();
    sim.set(
        "zones",
        vec![json!({"id": "z1", "name": "Z1", "networktype": "Basic"})],
    );
    sim.set(
        "pods",
        vec![json!({"id": "p1", "name": "POD0", "zoneid": "z1", "zonename": "Z1"})],
    );
    let cs_host = |i: u32, ip: &str| {
        json!({
            "id": format!("h-{i}"), "name": format!("bm-{i}"), "hypervisor": "BareMetal",
            "type": "Routing", "podid": "p1", "podname": "POD0", "zoneid": "z1",
            "zonename": "Z1", "ipaddress": ip, "cpunumber": 4, "cpuspeed": 2000,
            "memorytotal": 8589934592u64, "state": "Up",
            "details": {"hostmac": format!("52:54:00:c5:00:{i:02x}")}
        })
    };
    sim.set("hosts", vec![cs_host(1, BMC_IP), cs_host(2, "127.0.0.12")]);
    sim.set(
        "templates",
        vec![json!({"id": "t-ks1", "name": "ks", "hypervisor": "BareMetal", "zoneid": "z1",
            "url": "ks=http://127.0.0.1/ks.cfg;kernel=http://127.0.0.1/vmlinuz;initrd=http://127.0.0.1/initrd.img"})],
    );
    sim.set("vms", vec![vm("Stopped")]);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let bmc_port = free_udp();
    let bmc = Bmc::start(&d, "bmc1", BMC_IP, bmc_port);
    // A BMC neither CloudStack nor pxemesh knows yet (what addHost checks
    // with `ipmi.py ping` before the host exists). bm-2 (127.0.0.12) is known:
    // the bridge gives the idle host a record with its BMC.
    let bmc2_port = free_udp();
    let _bmc2 = Bmc::start(&d, "bmc2", "127.0.0.13", bmc2_port);

    let ca = Ca::generate(TD, 1).unwrap();
    ca.save(&d).unwrap();
    issue(
        &ca,
        &d,
        Role::Admin {
            name: "admin".into(),
        },
        "admin",
    );
    issue(
        &ca,
        &d,
        Role::Relay {
            rack: "rack-a".into(),
            name: "relay-a".into(),
        },
        "relay-a",
    );
    issue(&ca, &d, Role::Coordinator { id: 1 }, "coordinator-1");
    assert!(Command::new(&coord)
        .arg("gen-cluster-key")
        .arg(d.join("cluster.key"))
        .status()
        .unwrap()
        .success());
    fs::write(d.join("cs.secret"), format!("{SECRET}\n")).unwrap();
    fs::write(d.join("bmc.pw"), format!("{BMC_PW}\n")).unwrap();
    let port = free_tcp();
    let endpoint = format!("127.0.0.1:{port}");
    fs::write(
        d.join("coordinator.toml"),
        format!(
            r#"node_id = 1
listen = "{endpoint}"
data_dir = "{data}"
cluster_key_file = "{key}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{ckey}"

[[peers]]
id = 1
address = "{endpoint}"

[cloudstack]
url = "{url}"
api_key = "{API_KEY}"
secret_key_file = "{secret}"
interval_seconds = 5
rate_limit_per_second = 200.0
rate_limit_burst = 50
request_timeout_seconds = 2
async_job_timeout_seconds = 5

[cloudstack.pod_racks]
POD0 = "rack-a"

[cloudstack.bmc]
username = "admin"
password_file = "{pw}"
cipher_suite = 3

[cloudstack.bmc.hosts.bm-1]
port = {bmc_port}
"#,
            data = d.join("coord").display(),
            key = d.join("cluster.key").display(),
            ca = d.join("ca.pem").display(),
            cert = d.join("coordinator-1.pem").display(),
            ckey = d.join("coordinator-1-key.pem").display(),
            url = sim.url,
            secret = d.join("cs.secret").display(),
            pw = d.join("bmc.pw").display(),
        ),
    )
    .unwrap();
    let dhcp_port = free_udp();
    let agent = UdpSocket::bind("127.0.0.1:0").unwrap();
    agent
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let agent_port = agent.local_addr().unwrap().port();
    let http_port = free_tcp();
    fs::create_dir_all(d.join("boot")).unwrap();
    fs::write(
        d.join("relay.toml"),
        format!(
            r#"name = "relay-a"
data_dir = "{data}"

[[interfaces]]
name = "lo"
address = "127.0.0.1"

[coordinators]
endpoints = ["{endpoint}"]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
heartbeat_seconds = 1

[dhcp]
port = {dhcp_port}
relay_agent_port = {agent_port}

[tftp]
enabled = false

[http]
listen = "127.0.0.1:{http_port}"

[boot]
dir = "{boot}"

[ipmi]
max_parallel = 4
command_timeout_seconds = 10
session_timeout_seconds = 1
retries = 2
retry_backoff_ms = 200
lease_seconds = 6
"#,
            data = d.join("relay").display(),
            ca = d.join("ca.pem").display(),
            cert = d.join("relay-a.pem").display(),
            key = d.join("relay-a-key.pem").display(),
            boot = d.join("boot").display(),
        ),
    )
    .unwrap();
    // pxemeshctl behind a recorder of its argument lists (password check).
    let argv_log = d.join("argv.log");
    fs::write(
        d.join("pxemeshctl-argv.sh"),
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexec {} \"$@\"\n",
            argv_log.display(),
            bin_dir.join("pxemeshctl").display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(
            d.join("pxemeshctl-argv.sh"),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }

    let mut lab = Lab {
        dir,
        ctl: bin_dir.join("pxemeshctl"),
        endpoint,
        children: Vec::new(),
    };
    lab.spawn(&coord, &d.join("coordinator.toml"), "coordinator.log");
    let t = Instant::now();
    loop {
        let (ok, _, _) = lab.ctl(&["rack", "put", "rack-a", "--oob", "127.0.0.0/8"]);
        if ok {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no leader");
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.ctl_ok(&[
        "network",
        "put",
        "net-a",
        "--rack",
        "rack-a",
        "--subnet",
        "127.0.0.0/24",
        "--gateway",
        "127.0.0.1",
    ]);
    let relay_bin = PathBuf::from(env!("CARGO_BIN_EXE_pxemesh-relay"));
    lab.spawn(&relay_bin, &d.join("relay.toml"), "relay.log");

    // 1. Sync: the instance's host record; the relay answers its MAC.
    let s = lab.ctl_ok(&["cloudstack", "sync", "--wait", "20"]);
    assert_eq!(s["state"], "up", "{s}");
    let h = lab.ctl_ok(&["host", "get", "bm-1"]);
    assert_eq!(h["mac"], VM_MAC, "{h}");
    let mac: [u8; 6] = [0x52, 0x54, 0x00, 0xc5, 0x00, 0x01];
    let mut offered = None;
    wait_until("DHCP offer from the relay", Duration::from_secs(20), || {
        offered = dhcp_offer(&agent, dhcp_port, mac);
        offered.is_some()
    });
    assert_eq!(offered, Some(VM_IP.parse().unwrap()));

    // 2. Starting: bootdev pxe, then power on, at the BMC.
    sim.set("vms", vec![vm("Starting")]);
    let s = lab.ctl_ok(&["cloudstack", "sync", "--wait", "20"]);
    assert_eq!(s["jobs_submitted"], 2, "{s}");
    wait_until("chassis powered on", Duration::from_secs(30), || {
        bmc.read("power") == "1"
    });
    assert_eq!(bmc.read("boot"), "pxe");
    let calls = bmc.read("calls");
    let boot_at = calls.find("set boot").expect("boot device set");
    let power_at = calls.find("set power 1").expect("powered on");
    assert!(boot_at < power_at, "bootdev before power on:\n{calls}");
    let jobs = lab.ctl_ok(&["job", "list"]);
    let mut actions: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["action"].as_str().unwrap())
        .collect();
    actions.reverse(); // newest first
    assert_eq!(actions, ["bootdev-pxe", "power-status", "power-on"]);

    // The kickstart's callback to the relay: one accepted notification.
    let http = format!("127.0.0.1:{http_port}");
    let (code, body) =
        http_get(&http, &format!("/baremetal/provisiondone/{VM_MAC}")).expect("relay HTTP");
    assert_eq!(code, 200, "{body}");
    wait_until(
        "notifyBaremetalProvisionDone",
        Duration::from_secs(20),
        || sim.accepted_notifies() == 1,
    );
    lab.ctl_ok(&["cloudstack", "sync", "--wait", "20"]);
    std::thread::sleep(Duration::from_secs(2));
    lab.ctl_ok(&["cloudstack", "sync", "--wait", "20"]);
    assert_eq!(sim.accepted_notifies(), 1);

    // 3. ipmi.py with CloudStack's arguments.
    let creds = ["usrname=admin", &format!("password={BMC_PW}")];
    let host_arg = format!("hostname={BMC_IP}");
    let run = |sub: &str, extra: &[&str]| {
        let mut a = vec![sub, host_arg.as_str()];
        a.extend_from_slice(&creds);
        a.extend_from_slice(extra);
        a.push("interface=lanplus");
        lab.ipmi_py(&a, 623)
    };
    let (code, out, err) = run("power", &["action=off"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(bmc.read("power"), "0");
    let (code, out, err) = run("ping", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "Chassis Power is off");
    fs::write(bmc.dir.join("boot"), "none\n").unwrap();
    let (code, _, err) = run("boot_dev", &["dev=pxe"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(bmc.read("boot"), "pxe");
    let (code, _, err) = run("boot_or_reboot", &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(bmc.read("power"), "1", "off → power on");
    let (code, out, _) = run("power", &["action=status"]);
    assert_eq!((code, out.trim()), (0, "Chassis Power is on"));
    // A BMC pxemesh does not know: power actions exit 1 with a message...
    let (code, _, err) = lab.ipmi_py(
        &[
            "power",
            "hostname=127.0.0.99",
            "usrname=admin",
            "password=x",
            "action=on",
        ],
        623,
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("no pxemesh host has BMC address 127.0.0.99"),
        "{err}"
    );
    // ...while `ping` (CloudStack's addHost check, before the bridge can know
    // the host) asks the BMC directly, the password in the environment.
    let pw_arg = format!("password={BMC_PW}");
    let (code, out, err) = lab.ipmi_py(
        &[
            "ping",
            "hostname=127.0.0.13",
            "usrname=admin",
            &pw_arg,
            "interface=lan",
        ],
        bmc2_port,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "Chassis Power is off");
    let (code, _, err) = lab.ipmi_py(
        &[
            "ping",
            "hostname=127.0.0.13",
            "usrname=admin",
            "password=wrong-pw",
            "interface=lan",
        ],
        bmc2_port,
    );
    assert_eq!(code, 1);
    assert!(err.contains("ipmitool failed"), "{err}");

    // The password never reached a child's command line or a log.
    let argv = fs::read_to_string(&argv_log).unwrap();
    assert!(argv.contains("host find --bmc 127.0.0.11"), "{argv}");
    assert!(
        !argv.contains(BMC_PW),
        "password on a command line:\n{argv}"
    );
    for log in ["coordinator.log", "relay.log"] {
        assert!(!lab.log(log).contains(BMC_PW), "password in {log}");
    }
}
