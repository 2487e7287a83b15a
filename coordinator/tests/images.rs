//! The coordinators' image store with real processes: `pxemeshctl image
//! push` of a directory, replication of every blob to every coordinator,
//! fetching from a survivor after `kill -9`, a corrupt blob on one node's disk
//! detected by the scrub and replaced from a peer, an interrupted upload
//! resumed at its offset, and garbage collection after `image delete`.

mod common;

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Cluster;
use pxemesh_certs::Role;
use pxemesh_coordinator::blobs::{BlobStore, Digest};
use pxemesh_coordinator::imagepush;
use pxemesh_coordinator::images::fetch_into;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use sha2::{Digest as _, Sha256};

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8 ^ seed)
        .collect()
}

fn blob_path(c: &Cluster, id: u64, digest: &str) -> PathBuf {
    c.dir()
        .join(format!("node{id}/data/blobs/sha256"))
        .join(digest.trim_start_matches("sha256:"))
}

fn holds(c: &Cluster, id: u64, digest: &str) -> bool {
    std::fs::read(blob_path(c, id, digest)).is_ok_and(|b| sha(&b) == digest)
}

async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out after {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_replicate_survive_scrub_resume_and_collect() {
    let mut c = Cluster::with_extra(
        3,
        10_000,
        1_000,
        5_000,
        "\n[images]\nsync_interval_ms = 200\ngc_grace_seconds = 4\nscrub_interval_seconds = 1\n",
    );
    c.wait_leader(&[1, 2, 3], Duration::from_secs(15)).await;

    // A directory with several files (one duplicate, one in a subdirectory).
    let src = c.dir().join("image-src");
    let mut files = BTreeMap::new();
    files.insert("vmlinuz", bytes(1, 1_500_000));
    files.insert("initrd.img", bytes(2, 2_500_000));
    files.insert("ks/ks.cfg", b"text\nreboot\n".to_vec());
    files.insert("ks/ks-copy.cfg", b"text\nreboot\n".to_vec());
    for (p, data) in &files {
        let path = src.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let out = c.ctl(&["image", "push", src.to_str().unwrap(), "--name", "centos"]);
    assert!(
        out.status.success(),
        "push: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("image centos created (4 files"), "{text}");

    let digests: Vec<String> = files.values().map(|d| sha(d)).collect();
    let took = until(
        "every blob on every coordinator",
        Duration::from_secs(20),
        || (1..=3).all(|id| digests.iter().all(|d| holds(&c, id, d))),
    )
    .await;
    eprintln!("replicated in {took:?}");

    let out = c.ctl(&["-o", "json", "image", "list"]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "centos");
    assert_eq!(list[0]["files"].as_array().unwrap().len(), 4);

    // Node 1 (the one pushed to) dies; a relay fetches every blob from node 2.
    c.kill(1);
    let relay_tls = c.pki.tls(
        Role::Relay {
            rack: "r1".into(),
            name: "relay-x".into(),
        },
        "relay-x",
    );
    let store = Arc::new(BlobStore::open(&c.dir().join("relay-blobs")).unwrap());
    let ch = pxemesh_coordinator::client::channel_lazy(&c.addr(2), relay_tls).unwrap();
    let mut rc = RelayServiceClient::new(ch);
    for d in &digests {
        let d: Digest = d.parse().unwrap();
        if store.contains(&d) {
            continue;
        }
        let g = store.lock_writer(&d).unwrap();
        fetch_into(store.clone(), &mut rc, g, |_| {}).await.unwrap();
        store.verify(&d).unwrap();
    }
    // An admin certificate may not download blobs.
    let admin_ch = pxemesh_coordinator::client::channel_lazy(&c.addr(2), c.admin.clone()).unwrap();
    let denied = RelayServiceClient::new(admin_ch)
        .fetch_blob(pb::FetchBlobRequest {
            digest: digests[0].clone(),
            offset: 0,
        })
        .await
        .expect_err("admin refused");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    c.spawn(1);
    c.wait_leader(&[1, 2, 3], Duration::from_secs(15)).await;

    // Corruption on node 3's disk: the scrub removes it, a peer replaces it.
    let victim = sha(&files["initrd.img"]);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(blob_path(&c, 3, &victim))
            .unwrap();
        f.seek(SeekFrom::Start(1000)).unwrap();
        f.write_all(b"bit rot").unwrap();
    }
    assert!(!holds(&c, 3, &victim));
    until("corrupt blob replaced", Duration::from_secs(20), || {
        holds(&c, 3, &victim)
    })
    .await;
    assert!(c.metric(3, "pxemesh_coordinator_blobs_corrupt_total").await >= Some(1.0));
    assert!(
        c.metric(3, "pxemesh_coordinator_blobs_replicated_total")
            .await
            >= Some(1.0)
    );

    // An interrupted upload resumes at its offset.
    let mut admin = c.client(2);
    let data = bytes(9, 1_000_000);
    let digest = sha(&data);
    let half = pb::BlobUpload {
        digest: digest.clone(),
        size: data.len() as u64,
        offset: 0,
        data: data[..400_000].to_vec(),
    };
    let r = admin
        .push_blob(tokio_stream::iter(vec![half]))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.stored);
    assert_eq!(r.received_offset, 400_000);
    let st = admin
        .stat_blob(pb::StatBlobRequest {
            digest: digest.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!st.present);
    assert_eq!(st.partial_offset, 400_000);
    // A wrong offset is refused, and nothing is lost.
    let wrong = pb::BlobUpload {
        digest: digest.clone(),
        size: data.len() as u64,
        offset: 0,
        data: data[..10].to_vec(),
    };
    let e = admin
        .push_blob(tokio_stream::iter(vec![wrong]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let local = c.dir().join("resume.bin");
    std::fs::write(&local, &data).unwrap();
    let lf = imagepush::scan(&local).unwrap().remove(0);
    let sent = imagepush::push_blob(&mut admin, &lf).await.unwrap();
    assert_eq!(sent, 600_000, "only the rest was sent");
    let st = admin
        .stat_blob(pb::StatBlobRequest {
            digest: digest.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(st.present && st.size == 1_000_000);

    // Delete: after the grace period no node keeps a blob no manifest names
    // (the resumed blob was never in one either).
    let out = c.ctl(&["image", "delete", "centos"]);
    assert!(out.status.success());
    let took = until(
        "blobs collected on every node",
        Duration::from_secs(30),
        || {
            (1..=3).all(|id| {
                digests
                    .iter()
                    .chain(std::iter::once(&digest))
                    .all(|d| !blob_path(&c, id, d).exists())
            })
        },
    )
    .await;
    eprintln!("collected {took:?} after the delete");
    // Node 2: three distinct blobs of the image (one file is a duplicate)
    // and the resumed one.
    assert_eq!(
        c.metric(2, "pxemesh_coordinator_blobs_collected_total")
            .await,
        Some(4.0)
    );
}

/// An HTTP server of our own on 127.0.0.1:0, on its own thread and runtime
/// (the test's `pxemeshctl` calls block), serving `files` at `/<name>`.
fn http_server(files: BTreeMap<&'static str, Vec<u8>>) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let files = Arc::new(files);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/{name}",
                axum::routing::get(
                    move |axum::extract::Path(name): axum::extract::Path<String>| {
                        let files = files.clone();
                        async move {
                            match files.get(name.as_str()) {
                                Some(d) => (axum::http::StatusCode::OK, d.clone()),
                                None => (axum::http::StatusCode::NOT_FOUND, b"no".to_vec()),
                            }
                        }
                    },
                ),
            );
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = axum::serve(l, app).await;
        });
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_from_urls_stores_verified_blobs_everywhere() {
    let c = Cluster::with_extra(
        3,
        10_000,
        1_000,
        5_000,
        "\n[images]\nsync_interval_ms = 200\n",
    );
    c.wait_leader(&[1, 2, 3], Duration::from_secs(15)).await;
    let mut files = BTreeMap::new();
    files.insert("vmlinuz", bytes(7, 3_000_000));
    files.insert("initrd.img", bytes(8, 5_000_001));
    let want: BTreeMap<&str, String> = files.iter().map(|(k, v)| (*k, sha(v))).collect();
    let addr = http_server(files);

    let out = c.ctl(&[
        "image",
        "import",
        &format!("http://{addr}/vmlinuz"),
        &format!("http://{addr}/initrd.img"),
        "--name",
        "cs-template-7",
    ]);
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("image cs-template-7 created (2 files, 8000001 bytes downloaded"),
        "{text}"
    );
    let out = c.ctl(&["-o", "json", "image", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let img = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "cs-template-7")
        .expect("imported image listed");
    for f in img["files"].as_array().unwrap() {
        let path = f["path"].as_str().unwrap();
        assert_eq!(f["digest"].as_str().unwrap(), want[path], "{path}");
    }
    // Replicated like a pushed image.
    until(
        "imported blobs on every coordinator",
        Duration::from_secs(20),
        || (1..=3).all(|id| want.values().all(|d| holds(&c, id, d))),
    )
    .await;

    // Re-importing changes nothing.
    let out = c.ctl(&[
        "image",
        "import",
        &format!("http://{addr}/vmlinuz"),
        &format!("http://{addr}/initrd.img"),
        "--name",
        "cs-template-7",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));

    // A missing file: a clear error, and no image committed.
    let out = c.ctl(&[
        "image",
        "import",
        &format!("http://{addr}/vmlinuz"),
        &format!("http://{addr}/missing.img"),
        "--name",
        "broken",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 404") && err.contains("missing.img"),
        "{err}"
    );
    let out = c.ctl(&["-o", "json", "image", "list"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\"broken\""));
    // Refused before any download: not HTTP(S), or no usable file name.
    for (url, why) in [
        ("ftp://example.invalid/vmlinuz", "only http:// and https://"),
        (&format!("http://{addr}/") as &str, "not a usable file path"),
    ] {
        let out = c.ctl(&["image", "import", url, "--name", "bad"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{url}: {err}");
    }
    // No download leftovers in any node's temporary area.
    for id in 1..=3 {
        let tmp = c.dir().join(format!("node{id}/data/blobs/tmp"));
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "node {id} tmp: {left:?}");
    }
}
