//! A coordinator whose data disk fills up: a real process with its data
//! directory on a small tmpfs (needs root to mount; skips loudly otherwise).
//! 1. Below `limits.min_free_bytes` writes are refused with a clear
//!    RESOURCE_EXHAUSTED naming the directory; reads go on; freeing space
//!    lets writes through again without a restart.
//! 2. With the guard off, the disk runs out under the log itself: the write
//!    fails with "No space left on device", the process stops instead of
//!    going on with a half-written log, and after space returns a restart
//!    holds every acknowledged write.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use pxemesh_proto::v1 as pb;

/// Errors end the process with their message, not a backtrace, in the log.
const NO_BACKTRACE: &[(&str, &str)] = &[("RUST_BACKTRACE", "0")];

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fill the file system of `dir` with `filler` until ENOSPC (bounded).
fn fill(filler: &Path) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .unwrap();
    let chunk = vec![0xa5u8; 256 * 1024];
    let mut written = 0u64;
    for _ in 0..1024 {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    // Whatever fits of a smaller write too, so nothing is left.
    for _ in 0..4096 {
        match f.write(&chunk[..512]) {
            Ok(n) if n > 0 => written += n as u64,
            _ => break,
        }
    }
    written
}

async fn wait_exit(cluster: &mut Cluster, id: u64, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(st) = cluster.exited(id) {
            return Some(st.code().unwrap_or(-1));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_reported_refused_and_recovered() {
    if !is_root() {
        eprintln!(
            "\n\n*** SKIPPED disk_full_is_reported_refused_and_recovered: needs root to mount a tmpfs (CI runs it as root) ***\n"
        );
        return;
    }
    const MIN_FREE: u64 = 4 * 1024 * 1024;
    let mut cluster = Cluster::with_extra(
        1,
        10_000,
        1_000,
        3_000,
        &format!("\n[limits]\nmin_free_bytes = {MIN_FREE}\n"),
    );
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    // Move the node onto a 32 MiB tmpfs (fresh data: a new one-node cluster).
    cluster.kill(1);
    let data = cluster.dir().join("node1/data");
    std::fs::remove_dir_all(&data).unwrap();
    let _fs = Tmpfs::mount(&data, "32m");
    cluster.spawn_env(1, NO_BACKTRACE);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let mut c = cluster.client(1);
    seed(&mut c).await;
    let mut acked = BTreeSet::new();
    for i in 0..40 {
        put(&mut c, host(i)).await.expect("put with space");
        acked.insert(format!("h{i}"));
    }

    // 1. Below the free-space limit: a clear refusal, nothing else breaks.
    let filler = data.join("filler");
    let filled = fill(&filler);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    f.set_len(filled.saturating_sub(MIN_FREE / 2)).unwrap();
    drop(f);
    let free = pxemesh_coordinator::limits::available_bytes(&data).unwrap();
    assert!(free < MIN_FREE, "free {free}");
    let err = put(&mut c, host(100)).await.expect_err("write refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let msg = err.message().to_string();
    assert!(
        msg.contains("No space left on device")
            && msg.contains("min_free_bytes")
            && msg.contains(&data.display().to_string()),
        "{msg}"
    );
    let names = host_names(&mut c, pb::Consistency::Linearizable)
        .await
        .expect("reads keep working");
    assert_eq!(names, acked);
    assert!(cluster.exited(1).is_none(), "the node must keep running");
    let out = cluster.ctl(&["host", "get", "h100"]);
    assert!(!out.status.success());
    // An image upload into the same full disk: a clear error too.
    let src = cluster.dir().join("image-src");
    std::fs::create_dir_all(&src).unwrap();
    let blob: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("big.img"), blob).unwrap();
    let out = cluster.ctl(&["image", "push", src.to_str().unwrap(), "--name", "big"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("disk full (image push): {}", stderr.trim());
    assert!(!out.status.success());
    assert!(
        stderr.contains("disk full") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert!(cluster.exited(1).is_none(), "the node must keep running");
    // Space returns: writes succeed again, no restart.
    std::fs::remove_file(&filler).unwrap();
    put(&mut c, host(100))
        .await
        .expect("write after space returned");
    acked.insert("h100".into());
    eprintln!("disk full (guard): refused with {:?}: {msg}", err.code());

    // 2. Guard off: the disk runs out under the log and sled themselves.
    cluster.kill(1);
    let cfg_path = cluster.nodes[&1].config.clone();
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace(
            &format!("min_free_bytes = {MIN_FREE}"),
            "min_free_bytes = 0",
        ),
    )
    .unwrap();
    cluster.spawn_env(1, NO_BACKTRACE);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let mut c = cluster.client(1);
    for i in 200..220 {
        put(&mut c, host(i)).await.expect("put with space");
        acked.insert(format!("h{i}"));
    }
    fill(&filler);
    let mut failure = None;
    for i in 300..800 {
        match put(&mut c, host(i)).await {
            Ok(_) => {
                acked.insert(format!("h{i}"));
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let err = failure.expect("a full disk must fail a write");
    eprintln!("disk full (no guard): {:?} {}", err.code(), err.message());
    assert!(
        err.message().contains("No space left on device") || err.code() == tonic::Code::Unavailable,
        "{err:?}"
    );
    let code = wait_exit(&mut cluster, 1, Duration::from_secs(15)).await;
    let log = cluster.log_text(1);
    assert!(
        matches!(code, Some(c) if c != 0),
        "the node must stop after a storage failure: {code:?}"
    );
    assert!(!log.contains("panicked"), "no panic on a full disk");
    assert!(log.contains("storage failure"), "log names the failure");

    // Restarted while the disk is still full (as systemd would): it stops
    // again at its first log write, without a panic, and changes nothing.
    let before = log.len();
    cluster.spawn_env(1, NO_BACKTRACE);
    let again = wait_exit(&mut cluster, 1, Duration::from_secs(20)).await;
    let log = cluster.log_text(1);
    let tail = &log[before.min(log.len())..];
    eprintln!("restart with the disk still full: exit {again:?}");
    assert!(
        matches!(again, Some(c) if c != 0),
        "a node on a full disk must stop, not limp: {again:?}"
    );
    assert!(!tail.contains("panicked"), "{tail}");
    assert!(
        tail.contains("are needed to open the log and state safely"),
        "the refusal names the cause: {tail}"
    );

    // Space returns: a restart recovers every acknowledged write.
    std::fs::remove_file(&filler).unwrap();
    cluster.spawn_env(1, NO_BACKTRACE);
    cluster.wait_leader(&[1], Duration::from_secs(15)).await;
    let mut c = cluster.client(1);
    let names = host_names(&mut c, pb::Consistency::Linearizable)
        .await
        .expect("read after recovery");
    let lost: Vec<_> = acked.difference(&names).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    put(&mut c, host(900)).await.expect("writes after recovery");
    eprintln!(
        "disk full: {} acknowledged writes intact after ENOSPC stop and restart (exit code {code:?})",
        acked.len()
    );
}
