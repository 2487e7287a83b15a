//! The image store end to end: a 3-node coordinator cluster (in-process, on
//! loopback, real certificates), a `pxemesh-relay` process in sync mode, and
//! real curl as the HTTP and TFTP client.
//!
//! One scenario, in phases (setting up the cluster is the expensive part):
//! 1. a directory with several files is pushed to coordinator 1 (the
//!    `pxemeshctl image push` code path); every coordinator holds every
//!    blob, verified, after replication; coordinator 1 is then stopped;
//! 2. a relay starts with coordinator 1 first in its endpoint list; the
//!    profile's kernel and initrd are prefetched (pinned) and served over
//!    HTTP (ETag = digest) and TFTP;
//! 3. 200 concurrent curl requests for a blob the relay does not have: one
//!    upstream fetch (relay metric), 200 byte-identical, correct bodies;
//! 4. that blob corrupted on the relay's disk: never served, fetched again;
//! 5. a budget smaller than the images: the least-recently-used unpinned
//!    blob goes, pinned blobs never;
//! 6. every coordinator down: cached files keep being served.

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pxemesh_certs::{Ca, Identity, LeafRequest, Role, Tls, TlsPaths};
use pxemesh_coordinator::crypto::ClusterKey;
use pxemesh_coordinator::{imagepush, Config, Listeners};
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const TD: &str = "images.pxemesh";
const MIB: usize = 1024 * 1024;

fn issue(ca: &Ca, dir: &Path, role: Role, stem: &str) {
    let mut req = LeafRequest::new(Identity::new(TD, role), 1);
    req.dns_names = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    ca.issue(&req).unwrap().save(dir, stem).unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
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

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

struct Coord {
    addr: String,
    data: PathBuf,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), pxemesh_coordinator::error::CoordError>>>,
}

async fn stop(c: &mut Coord) {
    c.stop.cancel();
    if let Some(t) = c.task.take() {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
}

async fn admin_client(addr: &str, tls: std::sync::Arc<Tls>) -> AdminServiceClient<Channel> {
    let ch = pxemesh_coordinator::client::channel_lazy(addr, tls).unwrap();
    AdminServiceClient::new(ch)
}

/// Put with retries while the cluster elects a leader (bounded).
async fn put(c: &mut AdminServiceClient<Channel>, o: pb::Object) -> u64 {
    let t = Instant::now();
    loop {
        match c
            .put(pb::PutRequest {
                object: Some(o.clone()),
            })
            .await
        {
            Ok(r) => return r.into_inner().revision,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(20), "put failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl").args(args).output().expect("run curl")
}

/// A relay metric from its `/metrics` endpoint.
fn metric(metrics_port: u16, name: &str) -> f64 {
    let out = curl(&["-sf", &format!("http://127.0.0.1:{metrics_port}/metrics")]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(-1.0)
}

/// Poll (bounded) until `f` holds.
async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out after {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A size-limited tmpfs on `dir` (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

struct RelayProc(Child);
impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_store_and_relay_cache_end_to_end() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = Ca::generate(TD, 1).unwrap();
    ca.save(d).unwrap();
    for id in 1..=3 {
        issue(
            &ca,
            d,
            Role::Coordinator { id },
            &format!("coordinator-{id}"),
        );
    }
    issue(
        &ca,
        d,
        Role::Admin {
            name: "admin".into(),
        },
        "admin",
    );
    issue(
        &ca,
        d,
        Role::Relay {
            rack: "r1".into(),
            name: "relay-a".into(),
        },
        "relay-a",
    );
    ClusterKey::generate(&d.join("cluster.key")).unwrap();

    // --- 3 coordinators.
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let peers: String = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("\n[[peers]]\nid = {}\naddress = \"{a}\"\n", i + 1))
        .collect();
    let mut coords = Vec::new();
    for (i, grpc) in listeners.into_iter().enumerate() {
        let id = i + 1;
        let data = d.join(format!("coord{id}"));
        let config = Config::from_toml(&format!(
            "node_id = {id}\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\ncluster_key_file = \"{key}\"\n\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{ckey}\"\n\n\
             [images]\nsync_interval_ms = 200\n{peers}",
            addr = addrs[i],
            data = data.display(),
            key = d.join("cluster.key").display(),
            ca = d.join("ca.pem").display(),
            cert = d.join(format!("coordinator-{id}.pem")).display(),
            ckey = d.join(format!("coordinator-{id}-key.pem")).display(),
        ))
        .unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(pxemesh_coordinator::run(
            config,
            Listeners {
                grpc,
                metrics: None,
            },
            stop.clone(),
        ));
        coords.push(Coord {
            addr: addrs[i].clone(),
            data,
            stop,
            task: Some(task),
        });
    }
    let admin_tls = Tls::load(TlsPaths::in_dir(d, "admin")).unwrap();
    let mut c1 = admin_client(&coords[0].addr, admin_tls.clone()).await;
    put(
        &mut c1,
        pb::Object {
            record: Some(pb::object::Record::Rack(pb::Rack {
                name: "r1".into(),
                ..Default::default()
            })),
        },
    )
    .await;

    eprintln!("[{:?}] Phase 1", t0.elapsed());
    // --- Phase 1: push images to coordinator 1.
    let src = d.join("src");
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    files.insert("boot/vmlinuz".into(), bytes(1, 2 * MIB));
    files.insert("boot/initrd.img".into(), bytes(2, 3 * MIB));
    files.insert("boot/README".into(), b"pxemesh test image\n".to_vec());
    files.insert(
        "boot/extra/README.copy".into(),
        b"pxemesh test image\n".to_vec(),
    );
    files.insert("big/blob.bin".into(), bytes(3, 8 * MIB + 12345));
    for (i, u) in ["u1", "u2", "u3"].iter().enumerate() {
        files.insert(format!("{u}/data.bin"), bytes(10 + i as u64, 4 * MIB));
    }
    for (p, data) in &files {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    // The manifest guard: a manifest naming a blob nobody pushed is refused.
    let refused = c1
        .put(pb::PutRequest {
            object: Some(pb::Object {
                record: Some(pb::object::Record::Image(pb::ImageManifest {
                    name: "ghost".into(),
                    files: vec![pb::ImageFile {
                        path: "k".into(),
                        digest: sha(b"never pushed"),
                        size: 12,
                        mode: 0o644,
                    }],
                    ..Default::default()
                })),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");

    for name in ["boot", "big", "u1", "u2", "u3"] {
        let t = Instant::now();
        let (resp, sent) = loop {
            match imagepush::push_image(&mut c1, &src.join(name), name).await {
                Ok(x) => break x,
                Err(e) => {
                    assert!(t.elapsed() < Duration::from_secs(20), "push {name}: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        assert!(resp.revision > 0);
        eprintln!("pushed {name}: {sent} bytes in {:?}", t.elapsed());
    }
    let digests: Vec<String> = files.values().map(|v| sha(v)).collect();
    // Every coordinator holds every blob, with the right content.
    let t = Instant::now();
    until(
        "every blob on every coordinator",
        Duration::from_secs(30),
        || {
            coords.iter().all(|c| {
                digests.iter().all(|dg| {
                    std::fs::read(c.data.join("blobs/sha256").join(hex_of(dg)))
                        .is_ok_and(|b| sha(&b) == *dg)
                })
            })
        },
    )
    .await;
    eprintln!("replicated to all coordinators in {:?}", t.elapsed());

    // The profile that pins boot/vmlinuz and boot/initrd.img (as image paths).
    put(
        &mut c1,
        pb::Object {
            record: Some(pb::object::Record::Profile(pb::BootProfile {
                name: "centos".into(),
                kind: "ipxe".into(),
                image: "boot".into(),
                kernel: "vmlinuz".into(),
                initrds: vec!["initrd.img".into()],
                ..Default::default()
            })),
        },
    )
    .await;
    // Coordinator 1 (where everything was pushed) goes away.
    stop(&mut coords[0]).await;

    eprintln!("[{:?}] Phase 2", t0.elapsed());
    // --- Phase 2: the relay (coordinator 1 first in its list).
    let http_port = free_port();
    let tftp_port = free_port();
    let metrics_port = free_port();
    let relay_data = d.join("relay");
    let boot_dir = d.join("bootdir");
    std::fs::create_dir_all(&boot_dir).unwrap();
    let budget = 14 * MIB;
    let cfg = format!(
        "name = \"relay-a\"\ndata_dir = \"{data}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\
         [coordinators]\nendpoints = [{eps}]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\nheartbeat_seconds = 1\n\
         [dhcp]\nenabled = false\n[tftp]\nlisten = \"127.0.0.1:{tftp_port}\"\n\
         [http]\nlisten = \"127.0.0.1:{http_port}\"\n[boot]\ndir = \"{boot}\"\n\
         [cache]\nbudget_bytes = {budget}\ngc_grace_seconds = 1\n\
         [limits]\nhttp_per_client = 0\n",
        data = relay_data.display(),
        eps = addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", "),
        ca = d.join("ca.pem").display(),
        cert = d.join("relay-a.pem").display(),
        key = d.join("relay-a-key.pem").display(),
        boot = boot_dir.display(),
    );
    std::fs::write(d.join("relay.toml"), cfg).unwrap();
    // The cache directory on its own small file system (root only), filled
    // up in the disk-full phase. Declared before the relay: unmounted after
    // it stopped.
    let cache_fs = Tmpfs::mount(&relay_data.join("cache"), "64m");
    let log = std::fs::File::create(d.join("relay.log")).unwrap();
    let _relay = RelayProc(
        Command::new(env!("CARGO_BIN_EXE_pxemesh-relay"))
            .arg("--config")
            .arg(d.join("relay.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start relay"),
    );
    let cache_file = |dg: &str| relay_data.join("cache/sha256").join(hex_of(dg));
    let kernel = sha(&files["boot/vmlinuz"]);
    let initrd = sha(&files["boot/initrd.img"]);
    until(
        "kernel and initrd prefetched",
        Duration::from_secs(30),
        || cache_file(&kernel).is_file() && cache_file(&initrd).is_file(),
    )
    .await;
    let base = format!("http://127.0.0.1:{http_port}/files/images");
    let out = curl(&[
        "-sf",
        "-D",
        "-",
        "-o",
        "/dev/null",
        &format!("{base}/boot/vmlinuz"),
    ]);
    assert!(out.status.success(), "GET kernel");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        head.contains(&format!("etag: \"{kernel}\"")),
        "ETag is the digest: {head}"
    );
    let got = curl(&["-sf", &format!("{base}/boot/initrd.img")]).stdout;
    assert_eq!(sha(&got), initrd, "initrd over HTTP");
    let got = curl(&[
        "-sf",
        &format!("tftp://127.0.0.1:{tftp_port}/images/boot/initrd.img"),
    ])
    .stdout;
    assert_eq!(sha(&got), initrd, "initrd over TFTP (curl)");
    let got = curl(&["-sf", &format!("{base}/boot/extra/README.copy")]).stdout;
    assert_eq!(got, b"pxemesh test image\n");
    assert_eq!(
        curl(&[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{base}/boot/nope")
        ])
        .stdout,
        b"404"
    );

    eprintln!("[{:?}] Phase 3", t0.elapsed());
    // --- Phase 3: 200 concurrent requests for a blob the relay lacks (all
    // from 127.0.0.1, hence `http_per_client = 0` above).
    let big = sha(&files["big/blob.bin"]);
    assert!(!cache_file(&big).exists());
    let fetches_before = metric(metrics_port, "pxemesh_relay_cache_upstream_fetches_total");
    assert!(
        fetches_before >= 2.0,
        "prefetches counted: {fetches_before}"
    );
    let outdir = d.join("storm");
    std::fs::create_dir_all(&outdir).unwrap();
    let url = format!("{base}/big/blob.bin");
    let t = Instant::now();
    let children: Vec<Child> = (0..200)
        .map(|i| {
            Command::new("curl")
                .args(["-sf", "--max-time", "120", "-o"])
                .arg(outdir.join(format!("{i}.bin")))
                .arg(&url)
                .spawn()
                .expect("spawn curl")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a storm request failed");
    }
    eprintln!("200 concurrent cold requests done in {:?}", t.elapsed());
    let want = &files["big/blob.bin"];
    for i in 0..200 {
        let b = std::fs::read(outdir.join(format!("{i}.bin"))).unwrap();
        assert_eq!(b.len(), want.len(), "response {i} length");
        assert!(b == *want, "response {i} content differs");
    }
    let fetches = metric(metrics_port, "pxemesh_relay_cache_upstream_fetches_total");
    assert_eq!(
        fetches - fetches_before,
        1.0,
        "exactly one upstream fetch for 200 concurrent requests"
    );

    eprintln!("[{:?}] Phase 4", t0.elapsed());
    // --- Phase 4: corrupt the cached blob on disk.
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(cache_file(&big))
            .unwrap();
        f.seek(SeekFrom::Start(4 * MIB as u64)).unwrap();
        f.write_all(b"CORRUPTED BYTES").unwrap();
    }
    let got = curl(&["-sf", &url]).stdout;
    assert_eq!(sha(&got), big, "a corrupt blob is never served");
    assert_eq!(
        metric(metrics_port, "pxemesh_relay_cache_corrupt_total"),
        1.0
    );
    assert_eq!(
        metric(metrics_port, "pxemesh_relay_cache_upstream_fetches_total") - fetches,
        1.0,
        "refetched from upstream"
    );
    let on_disk = std::fs::read(cache_file(&big)).unwrap();
    assert_eq!(sha(&on_disk), big, "replaced on disk");

    eprintln!("[{:?}] Phase 5", t0.elapsed());
    // --- Phase 5: budget (14 MiB; pinned 5 MiB + big 8 MiB held).
    // Unpinned and least recently used first: the README (phase 2), then big.
    let readme = sha(b"pxemesh test image\n");
    assert!(cache_file(&readme).exists());
    let u = |n: &str| sha(&files[&format!("{n}/data.bin")]);
    let get_u = |n: &str| {
        // LRU times are in milliseconds: keep the accesses apart.
        std::thread::sleep(Duration::from_millis(20));
        let b = curl(&["-sf", &format!("{base}/{n}/data.bin")]).stdout;
        assert_eq!(sha(&b), u(n), "{n}");
    };
    get_u("u1"); // 17 MiB > 14: the README, then big (LRU, unpinned) go.
    assert!(!cache_file(&readme).exists(), "LRU unpinned blob evicted");
    assert!(!cache_file(&big).exists(), "LRU unpinned blob evicted");
    get_u("u2"); // 13 MiB
    get_u("u1"); // u1 now more recent than u2
    get_u("u3"); // 17 MiB > 14: u2 goes, not u1.
    assert!(cache_file(&u("u1")).exists(), "recently used blob kept");
    assert!(
        !cache_file(&u("u2")).exists(),
        "least recently used evicted"
    );
    assert!(cache_file(&u("u3")).exists());
    assert!(
        cache_file(&kernel).exists() && cache_file(&initrd).exists(),
        "pinned blobs are never evicted (they are the oldest)"
    );
    assert_eq!(
        metric(metrics_port, "pxemesh_relay_cache_evictions_total"),
        3.0
    );
    let cached = metric(metrics_port, "pxemesh_relay_cache_bytes");
    assert_eq!(cached as usize, 2 * MIB + 3 * MIB + 4 * MIB + 4 * MIB);

    eprintln!("[{:?}] The heartbeat reports", t0.elapsed());
    // The heartbeat reports the cache size to the coordinators.
    let mut c2 = admin_client(&coords[1].addr, admin_tls.clone()).await;
    let t = Instant::now();
    loop {
        let relays = c2
            .list(pb::ListRequest {
                kind: pb::Kind::Relay as i32,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().objects)
            .unwrap_or_default();
        let reported = relays.iter().find_map(|o| match &o.record {
            Some(pb::object::Record::Relay(r)) if r.name == "relay-a" => Some(r.cache_bytes),
            _ => None,
        });
        if reported == Some(cached as u64) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "heartbeat cache_bytes: {reported:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("[{:?}] Phase 6", t0.elapsed());
    // Deleting an image removes its blobs from the cache after the grace
    // period (1 s here); the others stay.
    c2.delete(pb::DeleteRequest {
        kind: pb::Kind::Image as i32,
        name: "u3".into(),
    })
    .await
    .unwrap();
    until("u3's blob collected", Duration::from_secs(15), || {
        !cache_file(&u("u3")).exists()
    })
    .await;
    assert!(cache_file(&u("u1")).exists() && cache_file(&kernel).exists());
    assert_eq!(
        metric(metrics_port, "pxemesh_relay_cache_collected_total"),
        1.0
    );

    eprintln!("[{:?}] Disk full", t0.elapsed());
    // --- Disk full on the cache: a clear error, nothing half-written
    // served, and the download works once space returns.
    if let Some(fs) = &cache_fs {
        let filler = fs.0.join("filler");
        {
            let mut f = std::fs::File::create(&filler).unwrap();
            let chunk = vec![0u8; 256 * 1024];
            let mut n = 0usize;
            while f.write_all(&chunk).is_ok() {
                n += chunk.len();
                assert!(n < 1 << 30, "tmpfs does not fill");
            }
            while f.write_all(&[0u8; 512]).is_ok() {}
        }
        let failures = metric(metrics_port, "pxemesh_relay_cache_upstream_failures_total");
        let url = format!("{base}/big/blob.bin");
        let code = curl(&[
            "-s",
            "--max-time",
            "60",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .stdout;
        assert_eq!(code, b"503", "a download into a full cache");
        assert!(
            !cache_file(&big).exists(),
            "no unverified blob in the cache"
        );
        assert!(
            metric(metrics_port, "pxemesh_relay_cache_upstream_failures_total") > failures,
            "failed fetches counted"
        );
        let relay_log = std::fs::read_to_string(d.join("relay.log")).unwrap_or_default();
        assert!(
            relay_log.contains("No space left on device") || relay_log.contains("os error 28"),
            "the relay log names the cause"
        );
        // Cached blobs are still served from the full disk.
        let got = curl(&["-sf", &format!("{base}/boot/vmlinuz")]).stdout;
        assert_eq!(sha(&got), kernel, "cached blob on a full disk");
        std::fs::remove_file(&filler).unwrap();
        let got = curl(&["-sf", "--max-time", "60", &url]).stdout;
        assert_eq!(sha(&got), big, "downloaded once space returned");
        assert_eq!(sha(&std::fs::read(cache_file(&big)).unwrap()), big);
    } else {
        eprintln!("\n!!!!!!!! SKIPPED disk-full phase: not root (tmpfs mount) !!!!!!!!\n");
    }

    // --- Phase 6: every coordinator down; the cache keeps serving.
    for c in coords.iter_mut() {
        stop(c).await;
    }
    for _ in 0..3 {
        let got = curl(&["-sf", &format!("{base}/boot/vmlinuz")]).stdout;
        assert_eq!(sha(&got), kernel);
    }
    let got = curl(&[
        "-sf",
        &format!("tftp://127.0.0.1:{tftp_port}/images/boot/vmlinuz"),
    ])
    .stdout;
    assert_eq!(sha(&got), kernel, "TFTP with coordinators down");
    eprintln!("[{:?}] A blob evicted earlier", t0.elapsed());
    // A blob evicted earlier cannot be fetched now: a clear 503, not a hang.
    let code = curl(&[
        "-s",
        "--max-time",
        "60",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/u2/data.bin"),
    ])
    .stdout;
    assert_eq!(code, b"503");
}
