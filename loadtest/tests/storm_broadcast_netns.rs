//! `storm --dhcp-mode broadcast`: the driver in one network namespace, the
//! real relay in another, joined by a veth pair; DHCP by broadcast from port
//! 68 (as a NIC ROM does, no relay agent), then TFTP and HTTP to the relay's
//! address. Needs root; skips loudly otherwise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// Two namespaces joined by a veth pair; deleted with their processes on drop.
struct Lab {
    server: String,
    client: String,
    relay: Option<Child>,
}

impl Lab {
    fn new() -> Lab {
        let id = std::process::id();
        let lab = Lab {
            server: format!("pxm-sbs-{id}"),
            client: format!("pxm-sbc-{id}"),
            relay: None,
        };
        ip(&["netns", "add", &lab.server]);
        ip(&["netns", "add", &lab.client]);
        let (vs, vc) = (format!("vs{id}"), format!("vc{id}"));
        let (vs, vc) = (&vs[..vs.len().min(15)], &vc[..vc.len().min(15)]);
        ip(&[
            "link",
            "add",
            vs,
            "netns",
            &lab.server,
            "type",
            "veth",
            "peer",
            "name",
            vc,
            "netns",
            &lab.client,
        ]);
        for (ns, dev, addr) in [
            (&lab.server, vs, "10.99.0.1/16"),
            (&lab.client, vc, "10.99.0.2/16"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.relay.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.server, &self.client] {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn broadcast_storm_across_a_veth_pair() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("\n!!!!!!!! SKIPPED: not root: network namespaces !!!!!!!!\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("boot/storm")).unwrap();
    for (name, len) in [
        ("undionly.kpxe", 20_000),
        ("storm/vmlinuz", 100_000),
        ("storm/initrd.img", 200_001),
    ] {
        std::fs::write(d.join("boot").join(name), vec![0x5a; len]).unwrap();
    }
    let hosts = "50";
    let st = Command::new(LOADTEST)
        .args([
            "storm-rack",
            "--hosts",
            hosts,
            "--subnet",
            "10.99.0.0/16",
            "--out",
        ])
        .arg(d.join("rack.toml"))
        .status()
        .unwrap();
    assert!(st.success());
    let lab = Lab::new();
    let iface = format!("vs{}", std::process::id());
    let iface = &iface[..iface.len().min(15)];
    std::fs::write(
        d.join("relay.toml"),
        format!(
            "name = \"storm-relay\"\ndata_dir = \"{d}/data\"\nstatic_state = \"{d}/rack.toml\"\n\
             [[interfaces]]\nname = \"{iface}\"\naddress = \"10.99.0.1\"\n\
             [tftp]\nlisten = \"10.99.0.1:69\"\n[http]\nlisten = \"10.99.0.1:8080\"\n[boot]\ndir = \"{d}/boot\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("relay.log")).unwrap();
    let mut lab = lab;
    lab.relay = Some(
        Command::new("ip")
            .args(["netns", "exec", &lab.server])
            .arg(relay_bin())
            .arg("--config")
            .arg(d.join("relay.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // Wait until the relay's HTTP port answers from the client side.
    let give_up = Instant::now() + Duration::from_secs(20);
    while !Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.client,
            "bash",
            "-c",
            "exec 3<>/dev/tcp/10.99.0.1/8080",
        ])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < give_up,
            "relay did not start: {}",
            std::fs::read_to_string(d.join("relay.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let client_if = format!("vc{}", std::process::id());
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.client, LOADTEST])
        .args([
            "storm",
            "--no-progress",
            "--hosts",
            hosts,
            "--subnet",
            "10.99.0.0/16",
        ])
        .args([
            "--dhcp-mode",
            "broadcast",
            "--interface",
            &client_if[..client_if.len().min(15)],
        ])
        .args(["--arrival", "poisson", "--rate", "100"])
        .args(["--dhcp-timeout-ms", "1000", "--max-seconds", "120"])
        .arg("--json")
        .arg(d.join("storm.json"))
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
    let run = &res["runs"][0];
    assert_eq!(run["completed"], 50, "{:#}", run["failures_by_cause"]);
    assert_eq!(run["arrival"]["kind"], "poisson");
    assert_eq!(run["phases"]["http"]["count"], 50);
    for h in run["per_host"].as_array().unwrap() {
        assert!(h["bytes"].as_u64().unwrap() >= 320_001, "{h}");
    }
}
