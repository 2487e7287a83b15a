//! Power jobs end to end: three real coordinator processes, a real relay
//! process, OpenIPMI `ipmi_sim` BMCs on loopback and `pxemeshctl`.
//!
//! Each simulated BMC's `chassis_control` script records the power state and
//! boot device in files, so the test checks the simulated chassis, not only
//! what the job says. Covered:
//! - power status/on/off/cycle and bootdev pxe change and report the chassis
//!   state; selection by name, MAC, rack and label; idempotency keys;
//! - a wrong password fails fast with the RMCP+ message and is not retried;
//!   a BMC that does not answer is retried, then failed with a clear reason;
//! - a BMC outside the rack's OOB networks is refused without being contacted;
//! - the relay killed (-9) while it holds a job: after the lease expires the
//!   restarted relay leases it again and it succeeds, once; a queued job of
//!   the same host is cancelled and never runs;
//! - fencing across relays: a relay frozen (SIGSTOP) mid-job loses it to a
//!   second relay of the rack; thawed, its report for the old lease is
//!   refused and the job stays as the second relay finished it;
//! - no BMC password in any process's argument list (sampled from /proc all
//!   along), in the relay's or coordinators' logs, or in pxemeshctl output.
//!
//! Needs `ipmi_sim` (Debian `openipmi`) and `ipmitool`; skips LOUDLY without.

#[path = "support/cargo_build.rs"]
mod cargo_build;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pxemesh_certs::{Ca, Identity, LeafRequest, Role};
use serde_json::Value;

const TD: &str = "ipmi.pxemesh";
const GOOD_PW: &str = "Ipmi-Good-pw-71x";
const WRONG_PW: &str = "Ipmi-Wrong-pw-72";
const BMC_PW2: &str = "Ipmi-Other-pw-73";

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/bin".into(), "/usr/sbin".into(), "/bin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Coordinator binaries next to the relay binary (built by `cargo test`
/// for the workspace; built here when missing).
fn workspace_bins() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_BIN_EXE_pxemesh-relay"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let coord = dir.join("pxemesh-coordinator");
    let ctl = dir.join("pxemeshctl");
    let loadtest = dir.join("pxemesh-loadtest");
    if !(coord.is_file() && ctl.is_file() && loadtest.is_file())
        || std::env::var_os("PXM_MESH_NO_BUILD").is_none()
    {
        let st = cargo_build::cargo_build_bins(&["pxemesh-coordinator", "pxemesh-loadtest"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("cargo build");
        assert!(st.success(), "building the coordinator binaries failed");
    }
    (coord, ctl)
}

/// One simulated BMC.
struct Bmc {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Bmc {
    fn start(root: &Path, name: &str, password: &str) -> Bmc {
        let dir = root.join(name);
        fs::create_dir_all(dir.join("state")).unwrap();
        let port = free_udp();
        let script = dir.join("chassis.sh");
        // ipmi_sim runs `SCRIPT get power|boot ...` and `SCRIPT set power 1 ...`.
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
                "name \"{name}\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {port}\n    priv_limit admin\n    allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n    allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n    guid a123456789abcdefa123456789abcdef\n  endlan\n  chassis_control \"{}\"\n  user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n",
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
        let bmc = Bmc {
            port,
            dir,
            child: Some(child),
        };
        // Ready when ipmitool gets an answer (bounded).
        let t = Instant::now();
        loop {
            let out = Command::new("ipmitool")
                .args(["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args([
                    "-U", "admin", "-E", "-N", "1", "-R", "1", "chassis", "power", "status",
                ])
                .env("IPMI_PASSWORD", password)
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "ipmi_sim {name} did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = fs::remove_file(bmc.dir.join("calls"));
        bmc
    }

    fn read(&self, what: &str) -> String {
        fs::read_to_string(self.dir.join(what))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    fn calls(&self) -> Vec<String> {
        self.read("calls").lines().map(str::to_string).collect()
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Bmc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Lab {
    dir: tempfile::TempDir,
    ctl: PathBuf,
    coordinators: Vec<(String, Child)>,
    relay: Option<Child>,
    relay_metrics: String,
    /// A second relay of the same rack (fencing across relays).
    relay_b: Option<Child>,
    relay_b_metrics: String,
    /// Every pxemeshctl output, scanned for passwords at the end.
    outputs: Mutex<Vec<String>>,
}

impl Lab {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn endpoints(&self) -> String {
        self.coordinators
            .iter()
            .map(|(a, _)| a.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let out = Command::new(&self.ctl)
            .args([
                "--endpoints",
                &self.endpoints(),
                "--tls-dir",
                &dir,
                "--cert-stem",
                "admin",
            ])
            .args(["--timeout", "10", "-o", "json"])
            .args(args)
            .output()
            .expect("pxemeshctl");
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        self.outputs
            .lock()
            .unwrap()
            .push(format!("{args:?}\n{o}\n{e}"));
        (out.status.success(), o, e)
    }

    fn ctl_ok(&self, args: &[&str]) -> Value {
        let (ok, out, err) = self.ctl(args);
        assert!(ok, "pxemeshctl {args:?} failed:\n{err}\n{out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("pxemeshctl {args:?}: {e}: {out}"))
    }

    /// `power|bootdev ... --wait`: the finished jobs (and whether all succeeded).
    fn run_jobs(&self, args: &[&str]) -> (bool, Vec<Value>, String) {
        let mut full = args.to_vec();
        full.extend(["--wait", "--wait-timeout", "60"]);
        let (ok, out, err) = self.ctl(&full);
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
        (ok, jobs, err)
    }

    fn job(&self, id: &str) -> Value {
        self.ctl_ok(&["job", "get", id])
    }

    fn start_relay(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("relay.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pxemesh-relay"))
            .arg("--config")
            .arg(self.path("relay.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn relay");
        self.relay = Some(child);
    }

    fn start_relay_b(&mut self) {
        let log = fs::File::create(self.path("relay-b.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pxemesh-relay"))
            .arg("--config")
            .arg(self.path("relay-b.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn relay-b");
        self.relay_b = Some(child);
    }

    fn kill_relay(&mut self) {
        if let Some(mut c) = self.relay.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        self.metric_of(&self.relay_metrics, name, labels)
    }

    fn metric_of(&self, addr: &str, name: &str, labels: &[&str]) -> f64 {
        let body = http_get(addr).unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter(|l| labels.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    fn logs(&self) -> String {
        let mut s = fs::read_to_string(self.path("relay.log")).unwrap_or_default();
        s.push_str(&fs::read_to_string(self.path("relay-b.log")).unwrap_or_default());
        for i in 1..=3 {
            s.push_str(
                &fs::read_to_string(self.path(&format!("coordinator-{i}.log"))).unwrap_or_default(),
            );
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_relay();
        if let Some(mut c) = self.relay_b.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, c) in &mut self.coordinators {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let log = fs::read_to_string(self.path("relay.log")).unwrap_or_default();
            eprintln!("---- relay log (last 60 lines) ----");
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{l}");
            }
        }
    }
}

fn http_get(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn issue(ca: &Ca, dir: &Path, role: Role, stem: &str) {
    let mut req = LeafRequest::new(Identity::new(TD, role), 1);
    req.dns_names = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    ca.issue(&req).unwrap().save(dir, stem).unwrap();
}

fn setup() -> Lab {
    let (coord, ctl) = workspace_bins();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
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
            rack: "r1".into(),
            name: "relay-a".into(),
        },
        "relay-a",
    );
    issue(
        &ca,
        &d,
        Role::Relay {
            rack: "r1".into(),
            name: "relay-b".into(),
        },
        "relay-b",
    );
    let st = Command::new(&coord)
        .arg("gen-cluster-key")
        .arg(d.join("cluster.key"))
        .status()
        .unwrap();
    assert!(st.success());
    let ports: Vec<u16> = (0..3).map(|_| free_tcp()).collect();
    let mut coordinators = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = i + 1;
        issue(
            &ca,
            &d,
            Role::Coordinator { id: id as u64 },
            &format!("coordinator-{id}"),
        );
        let mut cfg = format!(
            "node_id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{data}\"\ncluster_key_file = \"{key}\"\n\n[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{ckey}\"\n",
            data = d.join(format!("coord{id}")).display(),
            key = d.join("cluster.key").display(),
            ca = d.join("ca.pem").display(),
            cert = d.join(format!("coordinator-{id}.pem")).display(),
            ckey = d.join(format!("coordinator-{id}-key.pem")).display(),
        );
        for (j, p) in ports.iter().enumerate() {
            cfg.push_str(&format!(
                "\n[[peers]]\nid = {}\naddress = \"127.0.0.1:{p}\"\n",
                j + 1
            ));
        }
        let cfg_path = d.join(format!("coordinator-{id}.toml"));
        fs::write(&cfg_path, cfg).unwrap();
        let log = fs::File::create(d.join(format!("coordinator-{id}.log"))).unwrap();
        let child = Command::new(&coord)
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn coordinator");
        coordinators.push((format!("127.0.0.1:{port}"), child));
    }
    let metrics_port = free_tcp();
    let endpoints: Vec<String> = coordinators
        .iter()
        .map(|(a, _)| format!("\"{a}\""))
        .collect();
    fs::create_dir_all(d.join("boot")).unwrap();
    let relay_cfg = |name: &str, metrics_port: u16| {
        format!(
            r#"name = "{name}"
data_dir = "{data}"
metrics_listen = "127.0.0.1:{metrics_port}"

[coordinators]
endpoints = [{endpoints}]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
heartbeat_seconds = 1

[dhcp]
enabled = false

[tftp]
enabled = false

[http]
enabled = false

[boot]
dir = "{boot}"

[ipmi]
max_parallel = 8
command_timeout_seconds = 10
session_timeout_seconds = 1
retries = 2
retry_backoff_ms = 200
lease_seconds = 6
"#,
            data = d.join(name).display(),
            endpoints = endpoints.join(", "),
            ca = d.join("ca.pem").display(),
            cert = d.join(format!("{name}.pem")).display(),
            key = d.join(format!("{name}-key.pem")).display(),
            boot = d.join("boot").display(),
        )
    };
    let metrics_b = free_tcp();
    fs::write(d.join("relay.toml"), relay_cfg("relay-a", metrics_port)).unwrap();
    fs::write(d.join("relay-b.toml"), relay_cfg("relay-b", metrics_b)).unwrap();
    let lab = Lab {
        dir,
        ctl,
        coordinators,
        relay: None,
        relay_metrics: format!("127.0.0.1:{metrics_port}"),
        relay_b: None,
        relay_b_metrics: format!("127.0.0.1:{metrics_b}"),
        outputs: Mutex::new(Vec::new()),
    };
    // Wait for a leader: a write goes through.
    let t = Instant::now();
    loop {
        let (ok, _, _) = lab.ctl(&["rack", "put", "r1", "--oob", "127.0.0.0/8"]);
        if ok {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cluster did not elect a leader"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.ctl_ok(&[
        "network",
        "put",
        "n1",
        "--rack",
        "r1",
        "--subnet",
        "10.10.0.0/24",
    ]);
    lab
}

fn put_host(lab: &Lab, name: &str, i: u8, bmc_addr: &str, port: u16, pw: &str, labels: &[&str]) {
    let pwfile = lab.path(&format!("{name}.pw"));
    fs::write(&pwfile, format!("{pw}\n")).unwrap();
    let mac = format!("52:54:00:aa:00:{i:02x}");
    let ip = format!("10.10.0.{}", 10 + u32::from(i));
    let port = port.to_string();
    let mut args = vec![
        "host",
        "put",
        name,
        "--mac",
        &mac,
        "--ip",
        &ip,
        "--rack",
        "r1",
        "--network",
        "n1",
        "--bmc-address",
        bmc_addr,
        "--bmc-port",
        &port,
        "--bmc-user",
        "admin",
        "--cipher-suite",
        "3",
    ];
    let pwf = pwfile.to_string_lossy().into_owned();
    args.extend(["--bmc-password-file", &pwf]);
    for l in labels {
        args.extend(["--label", l]);
    }
    lab.ctl_ok(&args);
}

/// Samples every process's argument list until stopped; returns the lines
/// that contained a password.
fn cmdline_sampler(
    stop: Arc<AtomicBool>,
    secrets: Vec<String>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    std::thread::spawn(move || {
        let mut hits = BTreeSet::new();
        let mut samples = 0u64;
        let mut ipmitool_seen = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(rd) = fs::read_dir("/proc") {
                for e in rd.flatten() {
                    let Ok(raw) = fs::read(e.path().join("cmdline")) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
                    if text.contains("ipmitool") {
                        ipmitool_seen += 1;
                    }
                    for s in &secrets {
                        if text.contains(s.as_str()) {
                            hits.insert(text.clone());
                        }
                    }
                }
            }
            samples += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (
            ipmitool_seen,
            hits.into_iter()
                .chain(std::iter::once(format!("samples={samples}")))
                .collect(),
        )
    })
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

#[test]
fn power_jobs_against_ipmi_sim() {
    if which("ipmi_sim").is_none() || which("ipmitool").is_none() {
        eprintln!("\n!!!!!!!! SKIPPED power_jobs_against_ipmi_sim: ipmi_sim (openipmi) or ipmitool is not installed !!!!!!!!\n");
        return;
    }
    let mut lab = setup();
    let stop = Arc::new(AtomicBool::new(false));
    let secrets = vec![
        GOOD_PW.to_string(),
        WRONG_PW.to_string(),
        BMC_PW2.to_string(),
    ];
    let sampler = cmdline_sampler(stop.clone(), secrets.clone());

    let root = lab.path("bmcs");
    let b1 = Bmc::start(&root, "bmc1", GOOD_PW);
    let b2 = Bmc::start(&root, "bmc2", BMC_PW2);
    let b3 = Bmc::start(&root, "bmc3", GOOD_PW);
    put_host(
        &lab,
        "h1",
        1,
        "127.0.0.1",
        b1.port,
        GOOD_PW,
        &["role=compute"],
    );
    put_host(
        &lab,
        "h2",
        2,
        "127.0.0.1",
        b2.port,
        BMC_PW2,
        &["role=compute"],
    );
    // h3's BMC is known with the wrong password.
    put_host(&lab, "h3", 3, "127.0.0.1", b3.port, WRONG_PW, &[]);
    // h4's BMC does not answer (nothing listens there).
    put_host(&lab, "h4", 4, "127.0.0.1", free_udp(), GOOD_PW, &[]);
    // h5's BMC is outside the rack's OOB networks (127.0.0.0/8).
    put_host(&lab, "h5", 5, "10.99.0.1", 623, GOOD_PW, &[]);
    lab.start_relay();

    // --- status, on, off, cycle, bootdev: the chassis follows -----------------
    let (ok, jobs, err) = lab.run_jobs(&["power", "status", "h1"]);
    assert!(ok, "{err}");
    assert_eq!(s(&jobs[0], "result"), "power off");
    let (ok, jobs, err) = lab.run_jobs(&["power", "on", "h1"]);
    assert!(ok, "{err}");
    assert_eq!(s(&jobs[0], "state"), "succeeded");
    assert_eq!(s(&jobs[0], "result"), "power on");
    assert_eq!(b1.read("power"), "1", "chassis powered on");
    // Repeating is safe: on when already on succeeds.
    let (ok, jobs, err) = lab.run_jobs(&["power", "on", "52:54:00:aa:00:01"]);
    assert!(ok, "{err}");
    assert_eq!(s(&jobs[0], "host"), "h1", "selected by MAC");
    let (ok, jobs, err) = lab.run_jobs(&["power", "off", "h1"]);
    assert!(ok, "{err}");
    assert_eq!(s(&jobs[0], "result"), "power off");
    assert_eq!(b1.read("power"), "0");
    lab.run_jobs(&["power", "on", "h1"]);
    let before = b1.calls().len();
    let (ok, _, err) = lab.run_jobs(&["power", "cycle", "h1"]);
    assert!(ok, "{err}");
    // ipmi_sim powers off, then on again after a moment.
    let t = Instant::now();
    loop {
        let calls = b1.calls();
        let new = &calls[before.min(calls.len())..];
        let off = new.iter().position(|c| c == "set power 0");
        let on_after = off.is_some_and(|i| new[i..].iter().any(|c| c == "set power 1"));
        if on_after {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "cycle did not power off and on: {new:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(b1.read("power"), "1");
    let (ok, jobs, err) = lab.run_jobs(&["bootdev", "pxe", "h1"]);
    assert!(ok, "{err}");
    assert_eq!(b1.read("boot"), "pxe", "boot device set on the chassis");
    assert!(
        s(&jobs[0], "result").starts_with("boot device pxe"),
        "{}",
        jobs[0]
    );

    // Selection by label and by rack; jobs of several hosts run in parallel.
    let (ok, jobs, err) = lab.run_jobs(&["power", "on", "--rack", "r1", "--label", "role=compute"]);
    assert!(ok, "{err}");
    let hosts: BTreeSet<&str> = jobs.iter().map(|j| s(j, "host")).collect();
    assert_eq!(hosts, BTreeSet::from(["h1", "h2"]));
    assert_eq!(b2.read("power"), "1");

    // Idempotency key: the same jobs come back.
    let a = lab.ctl_ok(&["power", "status", "h2", "--idempotency-key", "req-42"]);
    let b = lab.ctl_ok(&["power", "status", "h2", "--idempotency-key", "req-42"]);
    assert_eq!(a["jobs"][0]["id"], b["jobs"][0]["id"]);

    // The load driver's power-job storm over the same BMCs.
    let storm = Command::new(lab.ctl.with_file_name("pxemesh-loadtest"))
        .args(["ipmi", "--endpoints", &lab.endpoints(), "--tls-dir"])
        .arg(lab.dir.path())
        .args([
            "--cert-stem",
            "admin",
            "--rack",
            "r1",
            "--label",
            "role=compute",
        ])
        .args(["--action", "power-status", "--timeout", "60", "-o", "json"])
        .output()
        .expect("pxemesh-loadtest");
    let report: Value = serde_json::from_slice(&storm.stdout).unwrap_or_else(|e| {
        panic!(
            "pxemesh-loadtest ipmi: {e}: {}{}",
            String::from_utf8_lossy(&storm.stdout),
            String::from_utf8_lossy(&storm.stderr)
        )
    });
    assert!(storm.status.success(), "{report}");
    assert_eq!(report["jobs"], 2, "{report}");
    assert_eq!(report["succeeded"], 2, "{report}");
    assert!(
        report["latency_ms_max"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );

    // --- wrong password: fails fast, not retried --------------------------------
    let retried = lab.metric("pxemesh_relay_ipmi_attempts_retried_total", &[]);
    assert!(
        lab.metric(
            "pxemesh_relay_ipmi_jobs_finished_total",
            &["outcome=\"succeeded\""]
        ) >= 9.0,
        "relay metrics count the jobs: {}",
        http_get(&lab.relay_metrics).unwrap_or_default()
    );
    let t = Instant::now();
    let (ok, jobs, _) = lab.run_jobs(&["power", "on", "h3"]);
    let took = t.elapsed();
    assert!(!ok, "a wrong password must fail the job");
    let reason = s(&jobs[0], "reason");
    assert!(
        reason.contains("Unable to power on host via IPMI"),
        "{reason}"
    );
    assert!(
        reason.contains("Unable to establish IPMI v2 / RMCP+ session"),
        "{reason}"
    );
    assert_eq!(
        lab.metric("pxemesh_relay_ipmi_attempts_retried_total", &[]),
        retried,
        "auth failures are not retried"
    );
    assert!(
        took < Duration::from_secs(5),
        "wrong password took {took:?}"
    );
    assert_eq!(b3.read("power"), "", "the chassis was never touched");

    // --- a BMC that does not answer: retried, then failed ----------------------
    let (ok, jobs, _) = lab.run_jobs(&["power", "on", "h4"]);
    assert!(!ok);
    let reason = s(&jobs[0], "reason");
    assert!(reason.contains("unreachable after 3 attempts"), "{reason}");
    assert!(
        reason.contains("Unable to power on host via IPMI"),
        "{reason}"
    );
    assert_eq!(
        lab.metric("pxemesh_relay_ipmi_attempts_retried_total", &[]),
        retried + 2.0
    );

    // --- outside the OOB networks: refused ---------------------------------------
    let (ok, jobs, _) = lab.run_jobs(&["power", "on", "h5"]);
    assert!(!ok);
    let reason = s(&jobs[0], "reason");
    assert!(
        reason.contains("outside the OOB networks of rack r1"),
        "{reason}"
    );
    assert_eq!(
        lab.metric(
            "pxemesh_relay_ipmi_jobs_finished_total",
            &["outcome=\"failed\"", "reason=\"outside-oob\""]
        ),
        1.0
    );

    // --- the relay dies while it holds a job ---------------------------------------
    // The BMC is frozen so the job stays in the relay's hands.
    b1.signal(libc::SIGSTOP);
    lab.run_jobs(&["power", "off", "h2"]); // unrelated job still fine
    let sub = lab.ctl_ok(&["power", "off", "h1"]);
    let id = s(&sub["jobs"][0], "id").to_string();
    let t = Instant::now();
    loop {
        let j = lab.job(&id);
        if s(&j, "state") == "running" {
            assert_eq!(j["attempts"], 1);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "job never ran: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A later job of the same host waits for it (one job per host at a
    // time); it can be cancelled while queued, and then never runs.
    let queued = lab.ctl_ok(&["bootdev", "disk", "h1"]);
    let queued_id = s(&queued["jobs"][0], "id").to_string();
    assert_eq!(s(&lab.job(&queued_id), "state"), "queued");
    let c = lab.ctl_ok(&["job", "cancel", &queued_id]);
    assert_eq!(s(&c, "state"), "cancelled");
    lab.kill_relay();
    b1.signal(libc::SIGCONT);
    let killed_at = Instant::now();
    lab.start_relay();
    let t = Instant::now();
    let done = loop {
        let j = lab.job(&id);
        if ["succeeded", "failed"].contains(&s(&j, "state")) {
            break j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "job not finished after the relay restart: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s(&done, "state"), "succeeded", "{done}");
    assert!(done["attempts"].as_u64() >= Some(2), "leased again: {done}");
    assert!(
        killed_at.elapsed() >= Duration::from_secs(3),
        "re-leased only after the lease expired"
    );
    assert_eq!(b1.read("power"), "0");
    assert_eq!(s(&lab.job(&queued_id), "state"), "cancelled");
    assert_eq!(
        b1.read("boot"),
        "pxe",
        "the cancelled bootdev disk never ran"
    );
    // Finished once: the newest succeeded job of h1, reported once.
    let watch = lab.ctl_ok(&[
        "job",
        "list",
        "--host",
        "h1",
        "--state",
        "succeeded",
        "--limit",
        "1",
    ]);
    assert_eq!(watch["jobs"][0]["id"], Value::String(id.clone()));
    let log = fs::read_to_string(lab.path("relay.log")).unwrap_or_default();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("job succeeded") && l.contains(&id))
            .count(),
        1,
        "one success report for {id}"
    );

    // --- a frozen relay's late report is refused (fencing across relays) ---
    lab.start_relay_b();
    b1.signal(libc::SIGSTOP);
    let sub = lab.ctl_ok(&["power", "on", "h1"]);
    let id2 = s(&sub["jobs"][0], "id").to_string();
    let t = Instant::now();
    let holder = loop {
        let j = lab.job(&id2);
        if s(&j, "state") == "running" {
            break s(&j, "leased_by").to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(20), "job never ran: {j}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let (frozen, frozen_metrics, other) = if holder == "relay-a" {
        (
            lab.relay.as_ref().unwrap().id(),
            lab.relay_metrics.clone(),
            "relay-b",
        )
    } else {
        (
            lab.relay_b.as_ref().unwrap().id(),
            lab.relay_b_metrics.clone(),
            "relay-a",
        )
    };
    let refused_before = lab.metric_of(
        &frozen_metrics,
        "pxemesh_relay_ipmi_reports_refused_total",
        &[],
    );
    unsafe { libc::kill(frozen as i32, libc::SIGSTOP) };
    b1.signal(libc::SIGCONT);
    let t = Instant::now();
    let done = loop {
        let j = lab.job(&id2);
        if ["succeeded", "failed"].contains(&s(&j, "state")) {
            break j;
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "job not taken over: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(s(&done, "state"), "succeeded", "{done}");
    // Taken over: a later lease (2, or more if a lease answer was lost on
    // this loaded machine and had to expire too), finished by the other relay.
    assert!(done["attempts"].as_u64() >= Some(2), "{done}");
    assert_eq!(s(&done, "leased_by"), other, "{done}");
    unsafe { libc::kill(frozen as i32, libc::SIGCONT) };
    // The thawed relay's renewal or final report carries lease 1: refused.
    let t = Instant::now();
    while lab.metric_of(
        &frozen_metrics,
        "pxemesh_relay_ipmi_reports_refused_total",
        &[],
    ) <= refused_before
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the stale relay's report was not refused"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = lab.job(&id2);
    assert_eq!(
        (
            s(&after, "state"),
            after["attempts"].as_u64(),
            s(&after, "leased_by")
        ),
        ("succeeded", done["attempts"].as_u64(), other),
        "{after}"
    );
    assert_eq!(b1.read("power"), "1");

    // --- no password anywhere ------------------------------------------------------
    stop.store(true, Ordering::Relaxed);
    let (ipmitool_seen, hits) = sampler.join().unwrap();
    let leaks: Vec<&String> = hits.iter().filter(|h| !h.starts_with("samples=")).collect();
    assert!(
        leaks.is_empty(),
        "password in a process argument list: {leaks:?}"
    );
    assert!(
        ipmitool_seen > 0,
        "the sampler saw no ipmitool process ({hits:?})"
    );
    let logs = lab.logs();
    // Nor in the relay's metrics (label values included; the wrong-password
    // job above made the error-path series exist).
    let relay_metrics = http_get(&lab.relay_metrics).expect("relay metrics");
    assert!(relay_metrics.contains("pxemesh_relay_"), "{relay_metrics}");
    for pw in &secrets {
        assert!(!logs.contains(pw.as_str()), "a BMC password is in a log");
        assert!(
            !relay_metrics.contains(pw.as_str()),
            "a BMC password is in the relay's metrics"
        );
        for o in lab.outputs.lock().unwrap().iter() {
            assert!(
                !o.contains(pw.as_str()),
                "a BMC password is in pxemeshctl output: {o}"
            );
        }
    }
    assert!(
        logs.contains("Unable to establish IPMI v2 / RMCP+ session"),
        "the relay log names the cause"
    );
}
