//! The DHCP server against real clients (ISC dhclient, busybox udhcpc, ISC
//! dhcrelay) inside network namespaces this test creates.
//!
//! Needs root (skipped loudly otherwise). Network safety: every namespace is
//! new, veth pairs are created directly between two of them (never in the
//! root namespace), no default route exists anywhere, and the `Lab` guard
//! kills every child process and deletes its namespaces on drop, also when
//! a test fails. Namespaces left by a killed test run (their owner pid gone)
//! are removed at the next run.
//!
//! The server runs in its own process inside the server namespace: the test
//! binary re-executes itself under `ip netns exec` with `PXM_DHCP_CHILD`
//! naming the lab directory, and the `server_child` test (a no-op without
//! that variable) serves `pxemesh_relay::dhcp::run` on port 67 from the
//! lab's relay.toml and rack.toml. It writes its metrics to the lab
//! directory every 100 ms and its log to `server.log`.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Encodable, Encoder};

const CHILD_ENV: &str = "PXM_DHCP_CHILD";
const NS_PREFIX: &str = "pxm-dhcp-";

const SERVER_ADDR: &str = "10.77.0.2";
const RESERVED_MAC: &str = "52:54:00:77:00:10";
const RESERVED_IP: &str = "10.77.0.10";
const REMOTE_MAC: &str = "52:54:00:78:00:50";
const REMOTE_IP: &str = "10.78.0.50";
const PXE_CLASS: &str = "PXEClient:Arch:00000:UNDI:002001";

// ---------------------------------------------------------------- helpers

/// A loud line on the real stderr (the test harness captures `eprintln!`).
fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "\n!!!!! {msg} !!!!!\n");
}

fn skip_unless_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        loud("SKIPPED: needs root for network namespaces (dhcp_netns)");
        return true;
    }
    if which("ip").is_none() {
        loud("SKIPPED: `ip` (iproute2) not installed (dhcp_netns)");
        return true;
    }
    false
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// A required client tool; `None` (with a loud message) when not installed.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    let p = which(name);
    if p.is_none() {
        loud(&format!(
            "SKIPPED part: `{name}` not installed (Debian package {package})"
        ));
    }
    p
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Poll `f` every 50 ms until it is true or `limit` passes.
fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait for a child to exit, killing it after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_for(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

static LABS: AtomicUsize = AtomicUsize::new(0);

/// Remove namespaces a previous, killed run of this test left behind.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Namespaces, processes and files of one test; all gone on drop.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Lab {
        remove_stale_namespaces();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        Lab {
            prefix: format!("{NS_PREFIX}{}-{n}", std::process::id()),
            namespaces: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new namespace with loopback up.
    fn ns(&mut self, short: &str) -> String {
        let name = format!("{}-{short}", self.prefix);
        ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A veth pair from namespace `a` to namespace `b`, both ends up, with
    /// optional addresses. Created inside `a`, never in the root namespace.
    fn veth(
        &self,
        a: &str,
        a_if: &str,
        a_addr: Option<&str>,
        b: &str,
        b_if: &str,
        b_addr: Option<&str>,
    ) {
        ip(&[
            "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
        ]);
        for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            if let Some(addr) = addr {
                ip(&["-n", ns, "addr", "add", addr, "dev", ifname]);
            }
            ip(&["-n", ns, "link", "set", ifname, "up"]);
        }
    }

    fn set_mac(&self, ns: &str, ifname: &str, mac: &str) {
        ip(&["-n", ns, "link", "set", "dev", ifname, "down"]);
        ip(&["-n", ns, "link", "set", "dev", ifname, "address", mac]);
        ip(&["-n", ns, "link", "set", "dev", ifname, "up"]);
    }

    /// Start `cmd args` inside `ns`, output to `<label>.log`; killed on drop.
    fn spawn(
        &mut self,
        label: &str,
        ns: &str,
        cmd: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> usize {
        let log = fs::File::create(self.path(&format!("{label}.log"))).expect("log file");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(cmd).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = c.spawn().unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        self.children.push((label.to_string(), child));
        self.children.len() - 1
    }

    fn child(&mut self, i: usize) -> &mut Child {
        &mut self.children[i].1
    }

    fn kill(&mut self, i: usize) {
        let c = self.child(i);
        let _ = c.kill();
        let _ = c.wait();
    }

    fn log(&self, label: &str) -> String {
        fs::read_to_string(self.path(&format!("{label}.log"))).unwrap_or_default()
    }

    /// Write the rack and relay config; `pool` adds 10.77.0.200-210.
    fn write_config(&self, pool: bool) {
        let pool = if pool {
            "pool = [\"10.77.0.200\", \"10.77.0.210\"]\n"
        } else {
            ""
        };
        let rack = format!(
            r#"rack = "lab"

[[networks]]
name = "prov"
rack = "lab"
subnet = "10.77.0.0/24"
gateway = "10.77.0.1"
dns = ["10.77.0.53", "10.77.0.54"]
domain = "lab.pxemesh.test"
mtu = 1400
lease_seconds = 600
{pool}
[[networks]]
name = "remote"
rack = "lab"
subnet = "10.78.0.0/24"
gateway = "10.78.0.1"
dns = ["10.77.0.53"]
domain = "remote.pxemesh.test"
mtu = 1500
lease_seconds = 900

[[profiles]]
name = "centos"
kind = "kickstart"
kernel = "centos/vmlinuz"

[[hosts]]
name = "n1"
mac = "{RESERVED_MAC}"
ip = "{RESERVED_IP}"
rack = "lab"
network = "prov"
profile = "centos"
hostname = "n1"

[[hosts]]
name = "far1"
mac = "{REMOTE_MAC}"
ip = "{REMOTE_IP}"
rack = "lab"
network = "remote"
"#
        );
        fs::write(self.path("rack.toml"), rack).expect("write rack");
        let relay = format!(
            r#"name = "lab-relay"
data_dir = "{}"
static_state = "{}"

[[interfaces]]
name = "s0"
address = "{SERVER_ADDR}"

[dhcp]
offer_hold_seconds = 10

[http]
listen = "0.0.0.0:8080"
"#,
            self.path("data").display(),
            self.path("rack.toml").display()
        );
        fs::write(self.path("relay.toml"), relay).expect("write relay config");
    }

    /// Start the DHCP server child in `ns` and wait until it serves.
    fn start_server(&mut self, ns: &str) -> usize {
        let _ = fs::remove_file(self.path("ready"));
        let exe = std::env::current_exe().expect("current exe");
        let dir = self.dir.path().to_string_lossy().into_owned();
        let i = self.spawn(
            "server",
            ns,
            &exe,
            &["--exact", "server_child", "--nocapture", "--test-threads=1"],
            &[(CHILD_ENV, &dir), ("RUST_LOG", "info,pxemesh_relay=debug")],
        );
        let ready = wait_for(Duration::from_secs(15), || self.path("ready").exists());
        assert!(
            ready,
            "DHCP server did not start; log:\n{}",
            self.log("server")
        );
        i
    }

    fn metrics(&self) -> String {
        fs::read_to_string(self.path("metrics.txt")).unwrap_or_default()
    }

    /// The counter of `msg_type`/`outcome` as last written by the server.
    fn counter(&self, msg_type: &str, outcome: &str) -> u64 {
        let needle = format!("msg_type=\"{msg_type}\",outcome=\"{outcome}\"}}");
        self.metrics()
            .lines()
            .find(|l| l.starts_with("pxemesh_relay_dhcp_messages") && l.contains(&needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A shell script that dumps its environment to `<name>.env` when
    /// called for `reason` ($reason for dhclient, $1 for udhcpc).
    fn env_script(&self, name: &str) -> PathBuf {
        let p = self.path(&format!("{name}.sh"));
        let out = self.path(&format!("{name}.env"));
        let body = format!(
            "#!/bin/sh\ncase \"${{reason:-$1}}\" in BOUND|bound|RENEW|REBOOT) env > '{}.tmp' && mv '{}.tmp' '{}';; esac\nexit 0\n",
            out.display(),
            out.display(),
            out.display()
        );
        fs::write(&p, body).expect("write script");
        let _ = Command::new("chmod").arg("755").arg(&p).status();
        p
    }

    fn env_file(&self, name: &str) -> String {
        fs::read_to_string(self.path(&format!("{name}.env"))).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::thread::panicking() {
            for (label, _) in &self.children {
                eprintln!("----- {label}.log -----\n{}", self.log(label));
            }
        }
    }
}

/// `KEY=value` from an env dump.
fn env_var<'a>(env: &'a str, key: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Server (S) and client (C) namespaces joined by s0 <-> c0.
fn two_namespaces(lab: &mut Lab, client_addr: Option<&str>) -> (String, String) {
    let s = lab.ns("s");
    let c = lab.ns("c");
    lab.veth(
        &s,
        "s0",
        Some(&format!("{SERVER_ADDR}/24")),
        &c,
        "c0",
        client_addr,
    );
    (s, c)
}

/// Run dhclient once (`-1`) in `ns`, foreground; returns once it has a
/// lease (true) or exited / timed out (false). Stopped afterwards.
fn dhclient(lab: &mut Lab, ns: &str, name: &str, conf: &str, limit: Duration) -> bool {
    let Some(bin) = tool("dhclient", "isc-dhcp-client") else {
        return false;
    };
    let cf = lab.path(&format!("{name}.conf"));
    fs::write(&cf, conf).expect("write dhclient.conf");
    let script = lab.env_script(name);
    let lf = lab.path(&format!("{name}.leases"));
    let pf = lab.path(&format!("{name}.pid"));
    let args = [
        "-d",
        "-1",
        "-v",
        "-cf",
        &cf.to_string_lossy(),
        "-lf",
        &lf.to_string_lossy(),
        "-pf",
        &pf.to_string_lossy(),
        "-sf",
        &script.to_string_lossy(),
        "c0",
    ]
    .map(|s| s.to_string());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let i = lab.spawn(name, ns, &bin, &args, &[]);
    let env_path = lab.path(&format!("{name}.env"));
    let mut exited = false;
    let got = wait_for(limit, || {
        if env_path.exists() {
            return true;
        }
        exited = matches!(lab.children[i].1.try_wait(), Ok(Some(_)));
        exited
    }) && !exited;
    if got {
        // dhclient runs its script (which writes the env file) before it
        // writes the lease file: killing it at once lost the lease file on a
        // loaded machine. Wait for a whole lease block, bounded.
        wait_for(Duration::from_secs(5), || {
            fs::read_to_string(&lf).is_ok_and(|l| l.contains('}'))
        });
    }
    lab.kill(i);
    got
}

// ------------------------------------------------------- the server child

/// The server process (only when re-executed by a test; a no-op otherwise).
#[test]
fn server_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(serve_child(dir));
}

async fn serve_child(dir: PathBuf) {
    use pxemesh_relay::{
        config::RelayConfig, dhcp, events::EventLog, metrics::RelayMetrics, state,
    };
    let config = Arc::new(RelayConfig::from_file(&dir.join("relay.toml")).expect("relay.toml"));
    let rack =
        state::RackState::from_static_file(config.static_state.as_ref().expect("static_state"))
            .expect("rack");
    let db = sled::open(config.data_dir.join("sled")).expect("sled");
    let metrics = Arc::new(RelayMetrics::new());
    let events = Arc::new(EventLog::open(&db, metrics.clone()).expect("events"));
    let leases = dhcp::Leases::open(&config.data_dir, Some(&db)).expect("leases");
    let mut sockets = Vec::new();
    for iface in &config.interfaces {
        let s = dhcp::bind(iface, config.dhcp.port).expect("bind");
        sockets.push((
            iface.clone(),
            tokio::net::UdpSocket::from_std(s).expect("tokio socket"),
        ));
    }
    let ctx = Arc::new(dhcp::DhcpContext {
        config,
        state: state::shared(rack),
        leases,
        events,
        metrics: metrics.clone(),
        loaders: Default::default(),
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(dhcp::run(ctx, sockets, shutdown.clone()));
    fs::write(dir.join("ready"), b"ready").expect("ready file");
    // Bounded life: the parent kills us; if it died, stop within 100 ms;
    // in any case stop after 90 s.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let end = Instant::now() + Duration::from_secs(90);
    while Instant::now() < end && unsafe { libc::getppid() } == parent {
        let tmp = dir.join("metrics.txt.tmp");
        if fs::write(&tmp, metrics.render()).is_ok() {
            let _ = fs::rename(&tmp, dir.join("metrics.txt"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

// ------------------------------------------------------------------ tests

/// (a) ISC dhclient as a BIOS PXE client (vendor class PXEClient) with a
/// reserved MAC: its address, every network option, and the boot file.
#[test]
fn dhclient_pxe_client_gets_reservation_and_boot_file() {
    if skip_unless_root() {
        return;
    }
    let mut lab = Lab::new();
    lab.write_config(true);
    let (s, c) = two_namespaces(&mut lab, None);
    lab.set_mac(&c, "c0", RESERVED_MAC);
    lab.start_server(&s);
    let conf = format!(
        "send vendor-class-identifier \"{PXE_CLASS}\";\n\
         request subnet-mask, broadcast-address, routers, domain-name-servers, domain-name, host-name, interface-mtu;\n\
         timeout 15;\nretry 1;\n"
    );
    if !dhclient(&mut lab, &c, "dhclient", &conf, Duration::from_secs(15)) {
        if which("dhclient").is_none() {
            return;
        }
        panic!(
            "dhclient got no lease; log:\n{}\nserver:\n{}",
            lab.log("dhclient"),
            lab.log("server")
        );
    }
    let lease = dhclient_lease_file(&lab);
    for want in [
        format!("fixed-address {RESERVED_IP};"),
        "option subnet-mask 255.255.255.0;".into(),
        "option routers 10.77.0.1;".into(),
        "option domain-name-servers 10.77.0.53,10.77.0.54;".into(),
        "option domain-name \"lab.pxemesh.test\";".into(),
        "option interface-mtu 1400;".into(),
        "option host-name \"n1\";".into(),
        format!("option dhcp-server-identifier {SERVER_ADDR};"),
        "option dhcp-lease-time 600;".into(),
        "filename \"undionly.kpxe\";".into(),
        format!("server-name \"{SERVER_ADDR}\";"),
    ] {
        assert!(lease.contains(&want), "lease file lacks {want:?}:\n{lease}");
    }
    let env = lab.env_file("dhclient");
    assert_eq!(env_var(&env, "new_ip_address"), Some(RESERVED_IP), "{env}");
    assert_eq!(env_var(&env, "new_next_server"), Some(SERVER_ADDR), "{env}");
    assert_eq!(
        env_var(&env, "new_filename"),
        Some("undionly.kpxe"),
        "{env}"
    );
    assert!(
        wait_for(Duration::from_secs(2), || lab.counter("request", "ack")
            >= 1),
        "{}",
        lab.metrics()
    );
    assert!(lab.counter("discover", "offer") >= 1);
}

/// (b) busybox udhcpc (not a PXE client): the reservation and options, no
/// boot file.
#[test]
fn udhcpc_gets_reservation_and_options() {
    if skip_unless_root() {
        return;
    }
    let Some(udhcpc) = tool("udhcpc", "udhcpc") else {
        return;
    };
    let mut lab = Lab::new();
    lab.write_config(true);
    let (s, c) = two_namespaces(&mut lab, None);
    lab.set_mac(&c, "c0", RESERVED_MAC);
    lab.start_server(&s);
    let script = lab.env_script("udhcpc");
    let script = script.to_string_lossy().into_owned();
    let args = [
        "-f", "-q", "-n", "-t", "4", "-T", "2", "-i", "c0", "-s", &script, "-O", "mtu", "-O",
        "domain",
    ];
    let i = lab.spawn("udhcpc", &c, &udhcpc, &args, &[]);
    let status = wait_exit(lab.child(i), Duration::from_secs(12));
    assert!(
        status.is_some_and(|s| s.success()),
        "udhcpc failed ({status:?}):\n{}",
        lab.log("udhcpc")
    );
    let env = lab.env_file("udhcpc");
    assert_eq!(env_var(&env, "ip"), Some(RESERVED_IP), "{env}");
    assert_eq!(env_var(&env, "subnet"), Some("255.255.255.0"), "{env}");
    assert_eq!(env_var(&env, "router"), Some("10.77.0.1"), "{env}");
    assert_eq!(
        env_var(&env, "dns").map(str::trim),
        Some("10.77.0.53 10.77.0.54"),
        "{env}"
    );
    assert_eq!(env_var(&env, "domain"), Some("lab.pxemesh.test"), "{env}");
    assert_eq!(env_var(&env, "mtu"), Some("1400"), "{env}");
    assert_eq!(env_var(&env, "lease"), Some("600"), "{env}");
    assert_eq!(env_var(&env, "serverid"), Some(SERVER_ADDR), "{env}");
    assert_eq!(env_var(&env, "hostname"), Some("n1"), "{env}");
    // Not a PXE client: no boot file, no next server.
    assert_eq!(env_var(&env, "boot_file"), None, "{env}");
    assert_eq!(env_var(&env, "siaddr"), None, "{env}");
}

/// Run `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid fd of a network namespace; affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}

fn mac_bytes(mac: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in mac.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("mac");
    }
    m
}

/// (c1) A relayed DISCOVER/REQUEST crafted with dhcproto, as a relay agent
/// with giaddr 10.78.0.1 on the remote network sends them (from port 67,
/// with option 82 whose sub-options are deliberately out of order): the
/// replies come back to giaddr:67 with option 82 byte for byte. Crafted so
/// the exact bytes can be checked; (c2) does the same with a real relay.
#[test]
fn relayed_request_is_answered_to_the_relay_agent_with_option82() {
    if skip_unless_root() {
        return;
    }
    let mut lab = Lab::new();
    lab.write_config(false);
    let (s, c) = two_namespaces(&mut lab, Some("10.77.0.3/24"));
    ip(&["-n", &c, "addr", "add", "10.78.0.1/24", "dev", "c0"]);
    ip(&["-n", &s, "route", "add", "10.78.0.0/24", "via", "10.77.0.3"]);
    lab.start_server(&s);
    let raw82: Vec<u8> = vec![
        2, 3, b'r', b'i', b'd', 1, 4, b'p', b'o', b'r', b't', 0x97, 1, 0x5a,
    ];
    let result = in_netns(&c, move || -> Result<(), String> {
        let sock = UdpSocket::bind("0.0.0.0:67").map_err(|e| format!("bind :67 in C: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(700)))
            .map_err(|e| e.to_string())?;
        let server: SocketAddr = format!("{SERVER_ADDR}:67")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let exchange = |kind: MessageType, extra: &[DhcpOption]| -> Result<Message, String> {
            let mut m = Message::new_with_id(
                0x7e57_0001,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::UNSPECIFIED,
                "10.78.0.1".parse().map_err(|e| format!("{e}"))?,
                &mac_bytes(REMOTE_MAC),
            );
            m.set_hops(1);
            m.opts_mut().insert(DhcpOption::MessageType(kind));
            m.opts_mut()
                .insert(DhcpOption::ClassIdentifier(PXE_CLASS.as_bytes().to_vec()));
            for o in extra {
                m.opts_mut().insert(o.clone());
            }
            let mut b = Vec::new();
            m.encode(&mut Encoder::new(&mut b))
                .map_err(|e| e.to_string())?;
            b.pop(); // end option; option 82 goes last, as a relay agent appends it
            b.push(82);
            b.push(raw82.len() as u8);
            b.extend_from_slice(&raw82);
            b.push(255);
            let mut buf = [0u8; 1500];
            for _attempt in 0..4 {
                sock.send_to(&b, server).map_err(|e| format!("send: {e}"))?;
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if from != server {
                    return Err(format!("reply from {from}, expected {server}"));
                }
                let r =
                    pxemesh_relay::dhcp::packet::decode(&buf[..n]).map_err(|e| e.to_string())?;
                if r.relay_info.as_deref() != Some(&raw82[..]) {
                    return Err(format!("option 82 not echoed verbatim: {:?}", r.relay_info));
                }
                return Ok(r.msg);
            }
            Err(format!("no {kind:?} reply"))
        };
        let offer = exchange(MessageType::Discover, &[])?;
        let check = |m: &Message, kind: MessageType| -> Result<(), String> {
            let ok = m.opts().msg_type() == Some(kind)
                && m.yiaddr().to_string() == REMOTE_IP
                && m.giaddr().to_string() == "10.78.0.1"
                && m.opts().get(OptionCode::Router)
                    == Some(&DhcpOption::Router(vec![[10, 78, 0, 1].into()]))
                && m.opts().get(OptionCode::DomainName)
                    == Some(&DhcpOption::DomainName("remote.pxemesh.test".into()))
                && m.opts().get(OptionCode::BootfileName)
                    == Some(&DhcpOption::BootfileName(b"undionly.kpxe".to_vec()))
                && m.siaddr().to_string() == SERVER_ADDR;
            if ok {
                Ok(())
            } else {
                Err(format!("unexpected {kind:?}: {m:?}"))
            }
        };
        check(&offer, MessageType::Offer)?;
        let ack = exchange(
            MessageType::Request,
            &[
                DhcpOption::ServerIdentifier(SERVER_ADDR.parse().map_err(|e| format!("{e}"))?),
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
            ],
        )?;
        check(&ack, MessageType::Ack)
    });
    if let Err(e) = result {
        panic!("{e}\nserver log:\n{}", lab.log("server"));
    }
    assert!(
        wait_for(Duration::from_secs(2), || lab.counter("request", "ack")
            >= 1),
        "{}",
        lab.metrics()
    );
}

/// (c2) A real relay agent: ISC dhcrelay in namespace R between the client
/// network (10.78.0.0/24) and the server, adding option 82 (`-a`), with
/// dhclient behind it: network choice by giaddr, replies to the relay
/// agent's port 67, the relay's own delivery to the client. (dhcrelay also
/// forwards replies that lack option 82, so the byte-exact echo is checked
/// by (c1); here the server log shows dhcrelay's option 82 arrived.)
#[test]
fn dhclient_through_isc_dhcrelay() {
    if skip_unless_root() {
        return;
    }
    let Some(dhcrelay) = tool("dhcrelay", "isc-dhcp-relay") else {
        return;
    };
    if which("dhclient").is_none() {
        let _ = tool("dhclient", "isc-dhcp-client");
        return;
    }
    let mut lab = Lab::new();
    lab.write_config(false);
    let s = lab.ns("s");
    let r = lab.ns("r");
    let c = lab.ns("c");
    lab.veth(
        &s,
        "s0",
        Some(&format!("{SERVER_ADDR}/24")),
        &r,
        "r1",
        Some("10.77.0.3/24"),
    );
    lab.veth(&r, "r0", Some("10.78.0.1/24"), &c, "c0", None);
    ip(&["-n", &s, "route", "add", "10.78.0.0/24", "via", "10.77.0.3"]);
    lab.set_mac(&c, "c0", REMOTE_MAC);
    lab.start_server(&s);
    let pf = lab.path("dhcrelay.pid").to_string_lossy().into_owned();
    let args = [
        "-d",
        "-4",
        "-a",
        "-pf",
        &pf,
        "-id",
        "r0",
        "-iu",
        "r1",
        SERVER_ADDR,
    ];
    let relay = lab.spawn("dhcrelay", &r, &dhcrelay, &args, &[]);
    // dhcrelay prints its interfaces once it listens.
    let up = wait_for(Duration::from_secs(5), || {
        lab.log("dhcrelay").contains("Sending on")
    });
    assert!(up, "dhcrelay did not start:\n{}", lab.log("dhcrelay"));
    let conf = format!("send vendor-class-identifier \"{PXE_CLASS}\";\ntimeout 15;\nretry 1;\n");
    let got = dhclient(&mut lab, &c, "dhclient", &conf, Duration::from_secs(15));
    assert!(
        got,
        "no lease through dhcrelay\n--- dhclient\n{}\n--- dhcrelay\n{}\n--- server\n{}",
        lab.log("dhclient"),
        lab.log("dhcrelay"),
        lab.log("server")
    );
    let lease = dhclient_lease_file(&lab);
    assert!(
        lease.contains(&format!("fixed-address {REMOTE_IP};")),
        "{lease}"
    );
    assert!(lease.contains("option routers 10.78.0.1;"), "{lease}");
    assert!(lease.contains("option dhcp-lease-time 900;"), "{lease}");
    assert!(lease.contains("filename \"undionly.kpxe\";"), "{lease}");
    // The lease can reach dhclient before the server's log line is written.
    let seen = wait_for(Duration::from_secs(5), || {
        lab.log("server").lines().any(|l| {
            l.contains("dhcp: ack") && l.contains(REMOTE_MAC) && l.contains("option82=true")
        })
    });
    assert!(
        seen,
        "server did not see dhcrelay's option 82:\n{}",
        lab.log("server")
    );
    lab.kill(relay);
}

/// (d) An unknown MAC on a network without a pool gets nothing; the server
/// counts every attempt but logs the MAC once.
#[test]
fn unknown_mac_gets_no_answer() {
    if skip_unless_root() {
        return;
    }
    let mut lab = Lab::new();
    lab.write_config(false);
    let (s, c) = two_namespaces(&mut lab, None);
    lab.set_mac(&c, "c0", "52:54:00:99:99:01");
    lab.start_server(&s);
    let mut attempts_by_tools = 0;
    if which("dhclient").is_some() {
        let got = dhclient(
            &mut lab,
            &c,
            "dhclient",
            "timeout 4;\nretry 1;\n",
            Duration::from_secs(8),
        );
        assert!(!got, "unknown MAC got a lease:\n{}", lab.log("dhclient"));
        assert!(
            lab.log("dhclient").contains("DHCPDISCOVER"),
            "{}",
            lab.log("dhclient")
        );
        attempts_by_tools += 1;
    } else {
        let _ = tool("dhclient", "isc-dhcp-client");
    }
    if let Some(udhcpc) = tool("udhcpc", "udhcpc") {
        let script = lab.env_script("udhcpc").to_string_lossy().into_owned();
        let args = [
            "-f", "-q", "-n", "-t", "3", "-T", "1", "-i", "c0", "-s", &script,
        ];
        let i = lab.spawn("udhcpc", &c, &udhcpc, &args, &[]);
        let status = wait_exit(lab.child(i), Duration::from_secs(8));
        assert!(
            status.is_some_and(|s| !s.success()),
            "udhcpc: {status:?}\n{}",
            lab.log("udhcpc")
        );
        assert!(lab.env_file("udhcpc").is_empty());
        attempts_by_tools += 3;
    }
    if attempts_by_tools == 0 {
        return;
    }
    let counted = wait_for(Duration::from_secs(2), || {
        lab.counter("discover", "ignored-unknown-mac") >= attempts_by_tools
    });
    assert!(counted, "metrics:\n{}", lab.metrics());
    let log = lab.log("server");
    let lines = log
        .lines()
        .filter(|l| l.contains("unknown MAC") && l.contains("52:54:00:99:99:01"))
        .count();
    assert_eq!(lines, 1, "expected one rate-limited log line:\n{log}");
}

/// udhcpc once in `ns` as `mac`: the address it was given.
fn udhcpc_lease(lab: &mut Lab, ns: &str, udhcpc: &Path, mac: &str, name: &str) -> String {
    lab.set_mac(ns, "c0", mac);
    let script = lab.env_script(name).to_string_lossy().into_owned();
    let args = [
        "-f", "-q", "-n", "-t", "4", "-T", "2", "-i", "c0", "-s", &script,
    ];
    let i = lab.spawn(name, ns, udhcpc, &args, &[]);
    let status = wait_exit(lab.child(i), Duration::from_secs(12));
    assert!(
        status.is_some_and(|s| s.success()),
        "{name}: {status:?}\n{}\nserver:\n{}",
        lab.log(name),
        lab.log("server")
    );
    let env = lab.env_file(name);
    env_var(&env, "ip")
        .unwrap_or_else(|| panic!("{name}: no ip in\n{env}"))
        .to_string()
}

/// (e) Pool clients: an unreserved MAC gets a pool address, a second MAC
/// another; after the server is killed (SIGKILL) and restarted on the same
/// database, each MAC gets its own address back — asked in the opposite
/// order, so a server that forgot would hand out the first address again.
#[test]
fn pool_lease_survives_server_restart() {
    if skip_unless_root() {
        return;
    }
    let Some(udhcpc) = tool("udhcpc", "udhcpc") else {
        return;
    };
    let mut lab = Lab::new();
    lab.write_config(true);
    let (s, c) = two_namespaces(&mut lab, None);
    let server = lab.start_server(&s);
    let (m1, m2, m3) = (
        "52:54:00:aa:00:01",
        "52:54:00:aa:00:02",
        "52:54:00:aa:00:03",
    );
    let a1 = udhcpc_lease(&mut lab, &c, &udhcpc, m1, "u1");
    let a2 = udhcpc_lease(&mut lab, &c, &udhcpc, m2, "u2");
    let pool: Vec<String> = (200..=210).map(|i| format!("10.77.0.{i}")).collect();
    assert!(pool.contains(&a1) && pool.contains(&a2), "{a1} {a2}");
    assert_ne!(a1, a2);
    assert_eq!(udhcpc_lease(&mut lab, &c, &udhcpc, m1, "u1-again"), a1);

    lab.kill(server);
    let server_log = lab.log("server");
    lab.start_server(&s);
    assert_eq!(
        udhcpc_lease(&mut lab, &c, &udhcpc, m2, "u2-after"),
        a2,
        "first run:\n{server_log}"
    );
    assert_eq!(udhcpc_lease(&mut lab, &c, &udhcpc, m1, "u1-after"), a1);
    let a3 = udhcpc_lease(&mut lab, &c, &udhcpc, m3, "u3-after");
    assert!(pool.contains(&a3) && a3 != a1 && a3 != a2, "{a3}");
}

/// The lease file dhclient wrote (`dhclient` waits for it before it stops
/// the client).
fn dhclient_lease_file(lab: &Lab) -> String {
    fs::read_to_string(lab.path("dhclient.leases")).unwrap_or_default()
}
