//! `storm --baseline dnsmasq` inside a network namespace this test creates
//! (dnsmasq needs ports 67 and 69): the same 60 hosts boot classic PXE
//! (everything over TFTP) from the real relay and then from a real dnsmasq
//! the driver configured; one report holds both runs and their ratios.
//! Needs root; skips loudly otherwise.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const LOADTEST: &str = env!("CARGO_BIN_EXE_pxemesh-loadtest");

fn relay_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("pxemesh-relay");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "pxemesh-relay", "--bin", "pxemesh-relay"])
            .status()
            .expect("run cargo build");
        assert!(st.success(), "cargo build -p pxemesh-relay failed");
    }
    bin
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn skip(why: &str) -> bool {
    eprintln!("\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
    true
}

struct Netns {
    name: String,
    relay: Option<Child>,
}

impl Netns {
    fn new() -> Netns {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pxm-storm-{}-{n}", std::process::id());
        let ok = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        ok(&["netns", "add", &name]);
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name, relay: None }
    }

    fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut c) = self.relay.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything still in the namespace was started by this test.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn baseline_dnsmasq_side_by_side() {
    side_by_side("tftp");
}

/// The http profile's baseline adds nginx for the iPXE part.
#[test]
fn baseline_dnsmasq_and_nginx_side_by_side() {
    if !have("nginx") && skip("nginx not installed (deploy/test-packages.txt: nginx)") {
        return;
    }
    side_by_side("http");
}

fn side_by_side(profile: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && skip("not root: network namespaces") {
        return;
    }
    if !have("dnsmasq") && skip("dnsmasq not installed (deploy/test-packages.txt: dnsmasq-base)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("boot/storm")).unwrap();
    for (name, len) in [
        ("undionly.kpxe", 32 * 1024),
        ("storm/vmlinuz", 128 * 1024 + 3),
        ("storm/initrd.img", 256 * 1024),
    ] {
        let data: Vec<u8> = (0..len as u32).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(d.join("boot").join(name), data).unwrap();
    }
    let hosts = "60";
    let st = Command::new(LOADTEST)
        .args(["storm-rack", "--hosts", hosts, "--out"])
        .arg(d.join("rack.toml"))
        .status()
        .unwrap();
    assert!(st.success());
    // Ports inside the namespace are all free; any high ones do.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .max(20000);
    let (dhcp, agent, tftp, http) = (port, port + 1, port + 2, port + 3);
    std::fs::write(
        d.join("relay.toml"),
        format!(
            "name = \"storm-relay\"\ndata_dir = \"{d}/data\"\nstatic_state = \"{d}/rack.toml\"\n\
             advertise_address = \"127.0.0.1\"\n[[interfaces]]\nname = \"lo\"\naddress = \"127.0.0.1\"\n\
             [dhcp]\nport = {dhcp}\nrelay_agent_port = {agent}\n[tftp]\nlisten = \"127.0.0.1:{tftp}\"\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n[boot]\ndir = \"{d}/boot\"\nbios = \"undionly.kpxe\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let mut ns = Netns::new();
    let log = std::fs::File::create(d.join("relay.log")).unwrap();
    ns.relay = Some(
        ns.exec(&relay_bin())
            .arg("--config")
            .arg(d.join("relay.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = ns
        .exec(Path::new(LOADTEST))
        .args([
            "storm",
            "--no-progress",
            "--profile",
            profile,
            "--hosts",
            hosts,
        ])
        .args(["--dhcp-server", &format!("127.0.0.1:{dhcp}")])
        .args([
            "--agent-port",
            &agent.to_string(),
            "--tftp-port",
            &tftp.to_string(),
        ])
        .args(["--dhcp-timeout-ms", "1000", "--max-seconds", "120"])
        .args(["--baseline", "dnsmasq", "--files-dir"])
        .arg(d.join("boot"))
        .arg("--work-dir")
        .arg(d)
        .arg("--json")
        .arg(d.join("storm.json"))
        .arg("--html")
        .arg(d.join("storm.html"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\nrelay log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(d.join("relay.log")).unwrap_or_default()
    );
    let res: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("storm.json")).unwrap()).unwrap();
    let runs = res["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["label"], "pxemesh-relay");
    assert_eq!(runs[1]["label"], "dnsmasq");
    for r in runs {
        assert_eq!(
            r["completed"], 60,
            "{}: {:#}",
            r["label"], r["failures_by_cause"]
        );
        assert_eq!(r["profile"], profile);
        // Loader, kernel and initrd (plus a config or script) for every host.
        assert!(r["bytes"].as_u64().unwrap() > 60 * (32 + 128 + 256) * 1024);
        assert!(r["time_to_last_host_s"].as_f64().unwrap() > 0.0);
    }
    let c = &res["comparison"];
    assert_eq!(c["baseline"], "dnsmasq");
    assert!(c["time_to_last_host_ratio"].as_f64().unwrap() > 0.0);
    let html = std::fs::read_to_string(d.join("storm.html")).unwrap();
    assert!(
        html.contains("data-series=\"dnsmasq\"") && html.contains("data-series=\"pxemesh-relay\"")
    );
    assert!(html.contains("id=\"ratios\""));
    // The driver stopped its dnsmasq.
    let pids = Command::new("ip")
        .args(["netns", "pids", &ns.name])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pids.stdout)
            .split_whitespace()
            .count(),
        1,
        "only the relay is left in the namespace"
    );
}
