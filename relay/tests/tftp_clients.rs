//! The TFTP server against real clients (tftp-hpa, atftp) and a raw UDP
//! client for the protocol corners (tsize probe then ERROR, lost ACKs,
//! duplicates, strangers, busy). Loopback only; every wait is bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pxemesh_relay::config::RelayConfig;
use pxemesh_relay::events::{EventKind, EventLog};
use pxemesh_relay::metrics::{OutcomeLabels, RelayMetrics};
use pxemesh_relay::state::{self, RackState};
use pxemesh_relay::tftp::packet::{self, Packet};
use pxemesh_relay::tftp::{self, TftpContext};
use tokio::net::UdpSocket;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const MAC: &str = "52:54:00:12:34:01";
const MAC_NO_PROFILE: &str = "52:54:00:12:34:02";
const ROLLOVER_LEN: usize = 65536 * 512 + 100;

const RACK: &str = r#"
rack = "r1"

[[networks]]
name = "prov"
rack = "r1"
subnet = "10.20.0.0/24"
mtu = 1500
lease_seconds = 600

[[profiles]]
name = "centos"
kind = "kickstart"
kernel = "centos/vmlinuz"
initrds = ["centos/initrd.img"]
cmdline = "inst.text"
kickstart_url = "http://10.20.0.5/ks.cfg"

[[hosts]]
name = "n1"
mac = "52:54:00:12:34:01"
ip = "10.20.0.11"
rack = "r1"
network = "prov"
profile = "centos"

[[hosts]]
name = "n2"
mac = "52:54:00:12:34:02"
ip = "10.20.0.12"
rack = "r1"
network = "prov"
"#;

/// Deterministic pseudo-random bytes.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Server {
    addr: SocketAddr,
    root: PathBuf,
    metrics: Arc<RelayMetrics>,
    events: Arc<EventLog>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), pxemesh_relay::error::RelayError>>,
    scratch: tempfile::TempDir,
    _dirs: Vec<tempfile::TempDir>,
}

impl Server {
    fn outcome(&self, o: &str) -> u64 {
        self.metrics
            .tftp_transfers
            .get_or_create(&OutcomeLabels { outcome: o.into() })
            .get()
    }

    /// Wait (bounded) until `o` has been counted `n` times: a client is done
    /// when it sends the last ACK, the server a moment later.
    async fn wait_outcome(&self, o: &str, n: u64) {
        for _ in 0..300 {
            if self.outcome(o) >= n && self.metrics.tftp_active.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.outcome(o), n, "outcome {o}: {}", self.metrics.render());
    }

    fn out(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        assert!(
            matches!(r, Ok(Ok(Ok(())))),
            "server did not stop cleanly: {r:?}"
        );
    }
}

/// Boot directory content shared by the tests.
fn populate(root: &Path, with_rollover: bool) {
    for (name, len) in [
        ("empty.bin", 0),
        ("f511.bin", 511),
        ("f512.bin", 512),
        ("f513.bin", 513),
        ("f3m.bin", 3 << 20),
    ] {
        std::fs::write(root.join(name), random_bytes(len, len as u64 + 1)).unwrap();
    }
    if with_rollover {
        std::fs::write(root.join("rollover.bin"), random_bytes(ROLLOVER_LEN, 99)).unwrap();
    }
    std::fs::create_dir_all(root.join("pxelinux.cfg")).unwrap();
    std::fs::write(root.join("pxelinux.cfg/default"), "DEFAULT local\n").unwrap();
    // A static file for a host the rack does not know.
    std::fs::write(
        root.join("pxelinux.cfg/01-aa-bb-cc-dd-ee-ff"),
        "DEFAULT static\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("centos/7")).unwrap();
    std::fs::write(root.join("centos/7/vmlinuz"), random_bytes(4000, 7)).unwrap();
    std::fs::write(
        root.join("text.txt"),
        "line one\nline two\r\nbare cr\r\n\n\nend",
    )
    .unwrap();
    std::os::unix::fs::symlink("centos/7/vmlinuz", root.join("inner-link")).unwrap();
    let outside = if Path::new("/etc/hostname").exists() {
        "/etc/hostname"
    } else {
        "/etc/passwd"
    };
    std::os::unix::fs::symlink(outside, root.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
}

async fn start(with_rollover: bool, tweak: impl FnOnce(&mut RelayConfig)) -> Server {
    let root_dir = tempfile::tempdir().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let root = root_dir.path().to_path_buf();
    populate(&root, with_rollover);
    let rack_file = data_dir.path().join("rack.toml");
    std::fs::write(&rack_file, RACK).unwrap();
    let toml = format!(
        r#"
name = "relay-test"
data_dir = "{data}"
advertise_address = "10.20.0.2"
[http]
listen = "0.0.0.0:8080"
[tftp]
listen = "127.0.0.1:0"
timeout_ms = 1000
retries = 5
max_blksize = 8192
max_windowsize = 32
max_transfers = 64
[boot]
dir = "{root}"
"#,
        data = data_dir.path().display(),
        root = root.display()
    );
    let mut config = RelayConfig::from_toml(&toml).unwrap();
    tweak(&mut config);
    let metrics = Arc::new(RelayMetrics::new());
    let db = sled::open(data_dir.path().join("db")).unwrap();
    let events = Arc::new(EventLog::open(&db, metrics.clone()).unwrap());
    let state = state::shared(RackState::from_static_file(&rack_file).unwrap());
    let ctx = Arc::new(TftpContext {
        config: Arc::new(config),
        state,
        events: events.clone(),
        metrics: metrics.clone(),
        loaders: Default::default(),
        cache: None,
    });
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tftp::run(ctx, socket, shutdown.clone()));
    Server {
        addr,
        root,
        metrics,
        events,
        shutdown,
        task,
        scratch,
        _dirs: vec![root_dir, data_dir],
    }
}

struct CmdResult {
    ok: bool,
    text: String,
}

async fn run_cmd(cmd: &mut Command, stdin: Option<&str>) -> CmdResult {
    use tokio::io::AsyncWriteExt;
    cmd.kill_on_drop(true)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("client installed");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.unwrap();
    }
    let out = tokio::time::timeout(Duration::from_secs(40), child.wait_with_output())
        .await
        .expect("client timed out")
        .unwrap();
    CmdResult {
        ok: out.status.success(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// tftp-hpa (no options: RFC 1350 lock-step, 512-byte blocks).
async fn tftp_hpa(s: &Server, mode: &str, remote: &str, local: &Path) -> CmdResult {
    run_cmd(
        Command::new("tftp")
            .args([
                "-l",
                "-m",
                mode,
                "127.0.0.1",
                &s.addr.port().to_string(),
                "-c",
                "get",
                remote,
            ])
            .arg(local),
        None,
    )
    .await
}

/// atftp with options.
async fn atftp(s: &Server, opts: &[&str], remote: &str, local: &Path) -> CmdResult {
    let mut cmd = Command::new("atftp");
    for o in opts {
        cmd.args(["--option", o]);
    }
    cmd.args(["-g", "-r", remote, "-l"])
        .arg(local)
        .args(["127.0.0.1", &s.addr.port().to_string()]);
    run_cmd(&mut cmd, None).await
}

fn assert_same(got: &Path, want: &Path, what: &str) {
    let g =
        std::fs::read(got).unwrap_or_else(|e| panic!("{what}: no output {}: {e}", got.display()));
    let w = std::fs::read(want).unwrap();
    assert!(
        g == w,
        "{what}: {} bytes received, {} expected (content differs)",
        g.len(),
        w.len()
    );
}

// ---------------------------------------------------------------- raw client

struct Raw {
    sock: UdpSocket,
}

impl Raw {
    async fn new() -> Raw {
        Raw {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    async fn send(&self, pkt: &[u8], to: SocketAddr) {
        self.sock.send_to(pkt, to).await.unwrap();
    }

    async fn recv(&self, wait: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 70_000];
        match tokio::time::timeout(wait, self.sock.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => Some((buf[..n].to_vec(), from)),
            _ => None,
        }
    }

    /// Every packet arriving within `window` (bounded count).
    async fn collect(&self, window: Duration) -> Vec<(Duration, Vec<u8>, SocketAddr)> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        while out.len() < 1000 {
            let Some(left) = window.checked_sub(t0.elapsed()) else {
                break;
            };
            match self.recv(left).await {
                Some((p, from)) => out.push((t0.elapsed(), p, from)),
                None => break,
            }
        }
        out
    }

    /// A complete download after the RRQ has been sent; `first` is the first
    /// reply if already received. Returns the content.
    async fn finish_download(
        &self,
        first: Option<(Vec<u8>, SocketAddr)>,
        blksize: usize,
    ) -> Vec<u8> {
        let mut data = Vec::new();
        let mut expect: u16 = 1;
        let mut pending = first;
        for _ in 0..100_000 {
            let (p, from) = match pending.take() {
                Some(x) => x,
                None => self
                    .recv(Duration::from_secs(3))
                    .await
                    .expect("server stopped sending"),
            };
            match Packet::parse(&p).unwrap() {
                Packet::Oack(_) => self.send(&packet::ack(0), from).await,
                Packet::Data { block, data: d } => {
                    if block == expect {
                        data.extend_from_slice(d);
                        expect = expect.wrapping_add(1);
                    }
                    self.send(&packet::ack(block), from).await;
                    if block == expect.wrapping_sub(1) && d.len() < blksize {
                        return data;
                    }
                }
                other => panic!("unexpected packet {other:?}"),
            }
        }
        panic!("download did not end");
    }
}

fn error_of(p: &[u8]) -> (u16, String) {
    match Packet::parse(p) {
        Ok(Packet::Error { code, message }) => (code, message),
        other => panic!("expected ERROR, got {other:?}"),
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_hpa_downloads_are_byte_identical() {
    let s = start(false, |_| {}).await;
    for f in [
        "empty.bin",
        "f511.bin",
        "f512.bin",
        "f513.bin",
        "f3m.bin",
        "centos/7/vmlinuz",
        "inner-link",
    ] {
        let out = s.out(&f.replace('/', "_"));
        let r = tftp_hpa(&s, "binary", f, &out).await;
        assert!(
            r.ok && !r.text.contains("Error"),
            "tftp-hpa get {f}: {}",
            r.text
        );
        assert_same(&out, &s.root.join(f), &format!("tftp-hpa {f}"));
    }
    // Leading slash, as many PXE configs spell it.
    let out = s.out("slash");
    let r = tftp_hpa(&s, "binary", "/f513.bin", &out).await;
    assert!(r.ok && !r.text.contains("Error"), "{}", r.text);
    assert_same(&out, &s.root.join("f513.bin"), "leading slash");
    // netascii: the client converts back to local line ends.
    let out = s.out("text");
    let r = tftp_hpa(&s, "netascii", "text.txt", &out).await;
    assert!(r.ok && !r.text.contains("Error"), "{}", r.text);
    assert_same(&out, &s.root.join("text.txt"), "netascii");
    s.wait_outcome("ok", 9).await;
    assert_eq!(s.metrics.tftp_active.get(), 0);
    let events = s.events.since(0, 100);
    let files: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::TftpFile)
        .map(|e| e.detail.as_str())
        .collect();
    assert!(
        files.contains(&"centos/7/vmlinuz") && files.contains(&"f513.bin"),
        "{files:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atftp_with_blksize_windowsize_and_tsize() {
    let s = start(false, |_| {}).await;
    for opts in [
        &["blksize 1456", "windowsize 8", "tsize 0"][..],
        &["blksize 1456"][..],
        &["windowsize 4"][..],
        &["blksize 8192", "windowsize 32"][..],
        // Beyond the configured limits: capped (8192, 32) in the OACK.
        &["blksize 65464", "windowsize 64", "timeout 2"][..],
    ] {
        for f in ["empty.bin", "f511.bin", "f512.bin", "f513.bin", "f3m.bin"] {
            let out = s.out(&format!("{f}-{}", opts.join("_").replace(' ', "")));
            let r = atftp(&s, opts, f, &out).await;
            assert!(r.ok, "atftp {opts:?} {f}: {}", r.text);
            assert_same(&out, &s.root.join(f), &format!("atftp {opts:?} {f}"));
        }
    }
    s.wait_outcome("ok", 25).await;
    assert_eq!(s.metrics.tftp_active.get(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_number_rollover() {
    let s = start(true, |_| {}).await;
    let t = Instant::now();
    let out = s.out("rollover-hpa");
    let r = tftp_hpa(&s, "binary", "rollover.bin", &out).await;
    assert!(r.ok && !r.text.contains("Error"), "{}", r.text);
    assert_same(
        &out,
        &s.root.join("rollover.bin"),
        "rollover tftp-hpa (512-byte blocks)",
    );
    let hpa = t.elapsed();
    let t = Instant::now();
    let out = s.out("rollover-atftp");
    let r = atftp(&s, &["windowsize 16"], "rollover.bin", &out).await;
    assert!(r.ok, "{}", r.text);
    assert_same(
        &out,
        &s.root.join("rollover.bin"),
        "rollover atftp (512-byte blocks, window 16)",
    );
    eprintln!("rollover file ({ROLLOVER_LEN} bytes, 65537 blocks): tftp-hpa {hpa:?}, atftp windowsize 16 {:?}", t.elapsed());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_per_host_files() {
    let s = start(false, |_| {}).await;
    let out = s.out("pxelinux");
    let r = tftp_hpa(&s, "binary", "pxelinux.cfg/01-52-54-00-12-34-01", &out).await;
    assert!(r.ok && !r.text.contains("Error"), "{}", r.text);
    let cfg = std::fs::read_to_string(&out).unwrap();
    assert!(cfg.contains("KERNEL centos/vmlinuz"), "{cfg}");
    assert!(
        cfg.contains("APPEND initrd=centos/initrd.img inst.text ks=http://10.20.0.5/ks.cfg"),
        "{cfg}"
    );

    for name in [
        format!("{MAC}.ipxe"),
        format!("{}.ipxe", MAC.replace(':', "-")),
    ] {
        let out = s.out(&name.replace(':', "_"));
        let r = atftp(&s, &["tsize 0", "blksize 1456"], &name, &out).await;
        assert!(r.ok, "atftp {name}: {}", r.text);
        let script = std::fs::read_to_string(&out).unwrap();
        assert!(script.starts_with("#!ipxe\n"), "{script}");
        assert!(
            script.contains(
                "kernel http://10.20.0.2:8080/files/centos/vmlinuz initrd=initrd.img inst.text"
            ),
            "{script}"
        );
        assert!(
            script
                .contains("initrd --name initrd.img http://10.20.0.2:8080/files/centos/initrd.img"),
            "{script}"
        );
    }
    // Unknown host with a static file on disk: the file; without: ERROR 1.
    let out = s.out("static");
    let r = tftp_hpa(&s, "binary", "pxelinux.cfg/01-aa-bb-cc-dd-ee-ff", &out).await;
    assert!(r.ok && !r.text.contains("Error"), "{}", r.text);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "DEFAULT static\n");

    let c = Raw::new().await;
    c.send(
        &packet::rrq("pxelinux.cfg/01-aa-bb-cc-dd-ee-00", "octet", &[]),
        s.addr,
    )
    .await;
    let (p, _) = c.recv(Duration::from_secs(3)).await.unwrap();
    assert_eq!(error_of(&p), (1, "unknown host aa:bb:cc:dd:ee:00".into()));
    c.send(
        &packet::rrq(&format!("{MAC_NO_PROFILE}.ipxe"), "octet", &[]),
        s.addr,
    )
    .await;
    let (p, _) = c.recv(Duration::from_secs(3)).await.unwrap();
    let (code, msg) = error_of(&p);
    assert_eq!(code, 1);
    assert!(msg.contains("no boot profile"), "{msg}");

    let events = s.events.since(0, 100);
    assert!(
        events.iter().any(|e| e.kind == EventKind::TftpFile
            && e.mac == MAC
            && e.detail == "pxelinux.cfg/01-52-54-00-12-34-01"),
        "{events:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_are_refused() {
    let s = start(false, |_| {}).await;
    // Real clients get an error and no file.
    let out = s.out("passwd1");
    let r = tftp_hpa(&s, "binary", "../etc/passwd", &out).await;
    assert!(
        r.text.contains("Error code 2"),
        "tftp-hpa ../etc/passwd: {}",
        r.text
    );
    let r = tftp_hpa(&s, "binary", "/etc/passwd", &s.out("passwd2")).await;
    assert!(
        r.text.contains("Error code 1"),
        "tftp-hpa /etc/passwd: {}",
        r.text
    );
    let out = s.out("hostname");
    let r = atftp(&s, &[], "escape", &out).await;
    assert!(!r.ok, "atftp escape: {}", r.text);
    assert!(
        std::fs::read(&out).map(|d| d.is_empty()).unwrap_or(true),
        "escaped content written"
    );

    // Exact codes with a raw client.
    let c = Raw::new().await;
    for (name, code) in [
        ("../etc/passwd", 2),
        ("a/../../etc/passwd", 2),
        ("/etc/passwd", 1),
        ("//etc/passwd", 2),
        ("escape", 2),
        ("etc-link/passwd", 2),
        ("centos\\7\\vmlinuz", 2),
        ("missing.bin", 1),
        ("centos", 1),
    ] {
        c.send(&packet::rrq(name, "octet", &[("tsize", "0")]), s.addr)
            .await;
        let (p, _) = c
            .recv(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("no answer for {name}"));
        let (got, msg) = error_of(&p);
        assert_eq!(got, code, "{name}: {msg}");
        if code == 2 {
            assert_eq!(msg, "access violation");
        }
    }
    // 6 raw + tftp-hpa's ../etc/passwd + atftp's escape.
    assert_eq!(s.outcome("access-violation"), 8);
    s.wait_outcome("ok", 0).await;
    assert_eq!(s.metrics.tftp_active.get(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tsize_probe_then_error_is_silent() {
    let s = start(false, |_| {}).await;
    let want = std::fs::read(s.root.join("f3m.bin")).unwrap();
    let probe = packet::rrq("f3m.bin", "octet", &[("tsize", "0"), ("blksize", "1428")]);

    let a = Raw::new().await;
    a.send(&probe, s.addr).await;
    let (p, tid) = a.recv(Duration::from_secs(3)).await.expect("OACK");
    assert_eq!(
        Packet::parse(&p).unwrap(),
        Packet::Oack(vec![
            ("tsize".into(), want.len().to_string()),
            ("blksize".into(), "1428".into())
        ])
    );
    assert_ne!(tid, s.addr, "transfer must use its own port");
    a.send(&packet::error(0, "probe done"), tid).await;
    let after = a.collect(Duration::from_secs(3)).await;
    assert!(
        after.is_empty(),
        "server kept sending after the client's ERROR: {after:?}"
    );
    assert_eq!(s.metrics.tftp_active.get(), 0);
    assert_eq!(s.outcome("client-abort"), 1);
    assert_eq!(s.metrics.tftp_retransmits.get(), 0);

    // The real request from a new port completes.
    let b = Raw::new().await;
    b.send(
        &packet::rrq("f3m.bin", "octet", &[("blksize", "1428")]),
        s.addr,
    )
    .await;
    assert_eq!(b.finish_download(None, 1428).await, want);

    // Same port again (ROMs that keep their port): a different request right
    // after the ERROR is served at once...
    let c = Raw::new().await;
    c.send(&probe, s.addr).await;
    let (_, tid) = c.recv(Duration::from_secs(3)).await.expect("OACK");
    c.send(&packet::error(0, "probe done"), tid).await;
    let t = Instant::now();
    c.send(
        &packet::rrq("f3m.bin", "octet", &[("blksize", "1428")]),
        s.addr,
    )
    .await;
    let first = c
        .recv(Duration::from_secs(3))
        .await
        .expect("no answer to the real request");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "real request delayed {:?}",
        t.elapsed()
    );
    assert_eq!(c.finish_download(Some(first), 1428).await, want);
    // ...and so is an identical one.
    let d = Raw::new().await;
    d.send(&probe, s.addr).await;
    let (_, tid) = d.recv(Duration::from_secs(3)).await.expect("OACK");
    d.send(&packet::error(0, "probe done"), tid).await;
    let t = Instant::now();
    d.send(&probe, s.addr).await;
    let first = d
        .recv(Duration::from_secs(3))
        .await
        .expect("no answer to the repeated request");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "repeated request delayed {:?}",
        t.elapsed()
    );
    assert_ne!(first.1, tid, "answer must come from a new transfer");
    assert_eq!(d.finish_download(Some(first), 1428).await, want);

    // Whether the old transfer read the client's ERROR before the new RRQ
    // superseded it is a race; either way it ended without a retransmission.
    assert_eq!(
        s.outcome("client-abort") + s.outcome("superseded"),
        3,
        "{}",
        s.metrics.render()
    );
    s.wait_outcome("ok", 3).await;
    assert_eq!(s.metrics.tftp_retransmits.get(), 0);
    assert_eq!(s.metrics.tftp_active.get(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acks_retransmit_exactly_retries_times() {
    let s = start(false, |c| {
        c.tftp.timeout_ms = 200;
        c.tftp.retries = 5;
    })
    .await;
    // Plain RRQ: DATA 1, then 5 retransmissions, then nothing.
    let a = Raw::new().await;
    a.send(&packet::rrq("f3m.bin", "octet", &[]), s.addr).await;
    let got = a.collect(Duration::from_millis(3000)).await;
    let blocks: Vec<_> = got
        .iter()
        .map(|(_, p, _)| {
            Packet::parse(p).map(|x| format!("{x:?}").chars().take(24).collect::<String>())
        })
        .collect();
    assert_eq!(got.len(), 6, "{blocks:?}");
    for (_, p, _) in &got {
        assert!(
            matches!(Packet::parse(p), Ok(Packet::Data { block: 1, .. })),
            "{blocks:?}"
        );
    }
    // Spacing follows the 200 ms timeout.
    let last = got.last().map(|(t, _, _)| *t).unwrap_or_default();
    assert!(
        last >= Duration::from_millis(900) && last < Duration::from_millis(2800),
        "last retransmission at {last:?}"
    );
    // With an OACK: the OACK is what gets retransmitted.
    let b = Raw::new().await;
    b.send(&packet::rrq("f513.bin", "octet", &[("tsize", "0")]), s.addr)
        .await;
    let got = b.collect(Duration::from_millis(3000)).await;
    assert_eq!(got.len(), 6);
    assert!(got
        .iter()
        .all(|(_, p, _)| matches!(Packet::parse(p), Ok(Packet::Oack(_)))));
    assert_eq!(s.outcome("timeout"), 2);
    assert_eq!(s.metrics.tftp_retransmits.get(), 10);
    assert_eq!(s.metrics.tftp_active.get(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_corners() {
    let s = start(false, |_| {}).await;
    let want = std::fs::read(s.root.join("f513.bin")).unwrap();

    // WRQ refused from the server port.
    let c = Raw::new().await;
    c.send(&packet::wrq("upload.bin", "octet", &[]), s.addr)
        .await;
    let (p, from) = c.recv(Duration::from_secs(3)).await.unwrap();
    assert_eq!(error_of(&p), (2, "read-only server".into()));
    assert_eq!(from, s.addr);
    assert!(!s.root.join("upload.bin").exists());

    // Unsupported mode and malformed requests.
    c.send(&packet::rrq("f513.bin", "mail", &[]), s.addr).await;
    assert_eq!(
        error_of(&c.recv(Duration::from_secs(3)).await.unwrap().0).0,
        4
    );
    c.send(b"\x00\x01f513.bin", s.addr).await;
    assert_eq!(
        error_of(&c.recv(Duration::from_secs(3)).await.unwrap().0).0,
        4
    );
    c.send(b"\x00", s.addr).await;
    c.send(b"\x00\x04\x00\x01", s.addr).await;
    assert!(c.recv(Duration::from_millis(300)).await.is_none());
    assert_eq!(s.outcome("malformed"), 2);
    assert_eq!(s.outcome("stray"), 1);

    // A retransmitted RRQ does not start a second transfer.
    let d = Raw::new().await;
    let rrq = packet::rrq("f513.bin", "octet", &[]);
    d.send(&rrq, s.addr).await;
    d.send(&rrq, s.addr).await;
    let got = d.collect(Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1, "one DATA 1 expected: {got:?}");
    let tid = got[0].2;

    // A stranger on the transfer port gets ERROR 5; the transfer goes on.
    let x = Raw::new().await;
    x.send(&packet::ack(1), tid).await;
    let (p, _) = x.recv(Duration::from_secs(3)).await.unwrap();
    assert_eq!(error_of(&p).0, 5);
    let first = (got[0].1.clone(), tid);
    assert_eq!(d.finish_download(Some(first), 512).await, want);
    assert_eq!(s.outcome("duplicate-rrq"), 1);
    s.wait_outcome("ok", 1).await;

    // Client ERROR in the middle of the data: ends at once.
    let e = Raw::new().await;
    e.send(
        &packet::rrq("f3m.bin", "octet", &[("windowsize", "4")]),
        s.addr,
    )
    .await;
    let (_, tid) = e.recv(Duration::from_secs(3)).await.unwrap();
    e.send(&packet::ack(0), tid).await;
    for _ in 0..4 {
        e.recv(Duration::from_secs(3)).await.unwrap();
    }
    e.send(&packet::error(3, "disk full"), tid).await;
    assert!(e.collect(Duration::from_millis(1500)).await.is_empty());
    assert_eq!(s.outcome("client-error"), 1, "{}", s.metrics.render());
    assert_eq!(s.metrics.tftp_active.get(), 0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_server_and_shutdown() {
    let s = start(false, |c| c.tftp.max_transfers = 1).await;
    let a = Raw::new().await;
    a.send(&packet::rrq("f3m.bin", "octet", &[]), s.addr).await;
    assert!(a.recv(Duration::from_secs(3)).await.is_some());
    let b = Raw::new().await;
    b.send(&packet::rrq("f3m.bin", "octet", &[]), s.addr).await;
    let (p, _) = b.recv(Duration::from_secs(3)).await.unwrap();
    assert_eq!(error_of(&p), (0, "server busy".into()));
    assert_eq!(s.outcome("busy"), 1);
    assert_eq!(s.metrics.tftp_active.get(), 1);
    // Shutdown stops the running transfer too.
    let metrics = s.metrics.clone();
    let t = Instant::now();
    s.stop().await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(metrics.tftp_active.get(), 0);
    assert_eq!(
        metrics
            .tftp_transfers
            .get_or_create(&OutcomeLabels {
                outcome: "shutdown".into()
            })
            .get(),
        1
    );
}
