//! Network-namespace lab for end-to-end tests. Every namespace is created by
//! the test, has no link to the root namespace (so no route out), and is
//! deleted on drop, together with the processes started in it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Print a loud skip notice; returns true when the test must be skipped.
pub fn skip_unless(ok: bool, why: &str) -> bool {
    if !ok {
        eprintln!("\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
    }
    !ok
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "pxm-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ARGS...`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Start a long-running process inside the namespace; killed on drop.
    pub fn spawn(&mut self, program: &str, args: &[&str], log: &Path) -> u32 {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = self
            .cmd(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn in netns");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// A bridge with an address: the rack's provisioning network.
    pub fn bridge(&self, name: &str, cidr: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.ip(&["addr", "add", cidr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// A tap device enslaved to `bridge`, for a QEMU NIC.
    pub fn tap(&self, name: &str, bridge: &str) {
        self.ip(&["tuntap", "add", name, "mode", "tap"]);
        self.ip(&["link", "set", name, "master", bridge]);
        self.ip(&["link", "set", name, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Poll `f` every 100 ms until it returns Some or `within` passes.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
