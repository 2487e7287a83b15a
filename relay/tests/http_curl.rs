//! HTTP boot against the real `curl`: per-host scripts, files with Range and
//! ETag, traversal refusals, the provision-done callback.

use std::process::Command;
use std::sync::Arc;

use pxemesh_relay::boot::LoaderTracker;
use pxemesh_relay::config::RelayConfig;
use pxemesh_relay::events::{EventKind, EventLog};
use pxemesh_relay::http::{self, HttpContext};
use pxemesh_relay::metrics::RelayMetrics;
use pxemesh_relay::state::{self, RackState};

const RACK: &str = r#"
rack = "r1"
[[networks]]
name = "prov"
rack = "r1"
subnet = "127.0.0.0/8"
mtu = 1500
lease_seconds = 600
[[profiles]]
name = "ks"
kind = "kickstart"
kernel = "centos/vmlinuz"
initrds = ["centos/initrd.img"]
kickstart_url = "http://127.0.0.1/ks.cfg"
[[hosts]]
name = "n1"
mac = "52:54:00:12:34:01"
ip = "127.0.0.1"
rack = "r1"
network = "prov"
profile = "ks"
[[hosts]]
name = "n2"
mac = "52:54:00:12:34:02"
ip = "127.0.0.2"
rack = "r1"
network = "prov"
profile = "ks"
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    base: String,
    events: Arc<EventLog>,
    metrics: Arc<RelayMetrics>,
    shutdown: tokio_util::sync::CancellationToken,
    blob: Vec<u8>,
}

async fn start() -> Fixture {
    start_with("").await
}

/// `http_extra`: more lines for the relay's `[http]` section.
async fn start_with(http_extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(boot.join("centos")).unwrap();
    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(boot.join("centos/vmlinuz"), &blob).unwrap();
    std::fs::write(boot.join("undionly.kpxe"), b"loader").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", boot.join("escape")).unwrap();
    let rack = dir.path().join("rack.toml");
    std::fs::write(&rack, RACK).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg = RelayConfig::from_toml(&format!(
        "name = \"relay-a\"\ndata_dir = \"{d}\"\nstatic_state = \"{r}\"\n[[interfaces]]\nname = \"lo\"\naddress = \"127.0.0.1\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n{http_extra}\n[boot]\ndir = \"{b}\"\n",
        d = dir.path().display(),
        r = rack.display(),
        b = boot.display()
    ))
    .unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let metrics = Arc::new(RelayMetrics::new());
    let events = Arc::new(EventLog::open(&db, metrics.clone()).unwrap());
    let state = state::shared(RackState::from_static_file(&rack).unwrap());
    let ctx = Arc::new(HttpContext::new(
        Arc::new(cfg),
        state,
        events.clone(),
        metrics.clone(),
        Arc::new(LoaderTracker::default()),
    ));
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(http::run(ctx, listener, shutdown.clone()));
    Fixture {
        _dir: dir,
        base: format!("http://127.0.0.1:{port}"),
        events,
        metrics,
        shutdown,
        blob,
    }
}

/// Run curl; returns (HTTP status, headers, body).
async fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    let hdrs = dir.path().join("headers");
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let (b, h) = (body.clone(), hdrs.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "20", "--path-as-is", "-o"])
            .arg(&b)
            .arg("-D")
            .arg(&h)
            .args(["-w", "%{http_code}"])
            .args(&args)
            .output()
            .expect("curl is installed (deploy/test-packages.txt)")
    })
    .await
    .unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (
        code,
        std::fs::read_to_string(&hdrs).unwrap_or_default(),
        std::fs::read(&body).unwrap_or_default(),
    )
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with(&format!("{}:", name.to_ascii_lowercase()))
        })
        .map(|l| l[name.len() + 1..].trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_scripts_files_and_ranges() {
    let f = start().await;

    // The per-host script, rendered from the profile.
    let (code, _, body) = curl(&[&format!("{}/boot/52:54:00:12:34:01.ipxe", f.base)]).await;
    let script = String::from_utf8(body).unwrap();
    assert_eq!(code, 200, "{script}");
    assert!(script.starts_with("#!ipxe"));
    assert!(
        script.contains(&format!("kernel {}/files/centos/vmlinuz", f.base)),
        "{script}"
    );
    assert!(script.contains("ks=http://127.0.0.1/ks.cfg"));

    // Whole file, byte-identical, with a digest ETag.
    let (code, headers, body) = curl(&[&format!("{}/files/centos/vmlinuz", f.base)]).await;
    assert_eq!(code, 200);
    assert!(body == f.blob, "file differs");
    let etag = header(&headers, "etag").expect("etag").to_string();
    assert!(etag.starts_with("\"sha256:"), "{etag}");

    // Ranges: a middle slice, an open end, a suffix; unsatisfiable is 416.
    let (code, headers, body) = curl(&[
        "-r",
        "1000-1999",
        &format!("{}/files/centos/vmlinuz", f.base),
    ])
    .await;
    assert_eq!(code, 206);
    assert_eq!(body, f.blob[1000..2000]);
    assert_eq!(
        header(&headers, "content-range"),
        Some("bytes 1000-1999/3000000")
    );
    let (_, _, body) = curl(&[
        "-r",
        "2999990-",
        &format!("{}/files/centos/vmlinuz", f.base),
    ])
    .await;
    assert_eq!(body, f.blob[2_999_990..]);
    let (_, _, body) = curl(&["-r", "-5", &format!("{}/files/centos/vmlinuz", f.base)]).await;
    assert_eq!(body, f.blob[f.blob.len() - 5..]);
    let (code, _, _) = curl(&[
        "-r",
        "5000000-",
        &format!("{}/files/centos/vmlinuz", f.base),
    ])
    .await;
    assert_eq!(code, 416);

    // Conditional requests.
    let inm = format!("If-None-Match: {etag}");
    let (code, _, body) = curl(&["-H", &inm, &format!("{}/files/centos/vmlinuz", f.base)]).await;
    assert_eq!((code, body.len()), (304, 0));
    let stale = "If-Range: \"sha256:0000\"";
    let (code, _, body) = curl(&[
        "-H",
        stale,
        "-r",
        "0-9",
        &format!("{}/files/centos/vmlinuz", f.base),
    ])
    .await;
    assert_eq!(
        (code, body.len()),
        (200, f.blob.len()),
        "a stale If-Range gets the whole file"
    );
    let (code, headers, _) = curl(&["-I", &format!("{}/files/centos/vmlinuz", f.base)]).await;
    assert_eq!(code, 200);
    assert_eq!(header(&headers, "content-length"), Some("3000000"));

    // Refusals carry a reason, never a panic.
    for (path, want) in [
        ("/files/../../etc/passwd", 403),
        ("/files/escape", 403),
        ("/files/missing.bin", 404),
        ("/boot/52:54:00:99:99:99.ipxe", 404),
        ("/boot/not-a-mac.ipxe", 400),
        ("/nothing/here", 404),
    ] {
        let (code, _, body) = curl(&[&format!("{}{path}", f.base)]).await;
        assert_eq!(code, want, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(!body.is_empty(), "{path}: empty reason");
    }

    // CloudStack's kickstart templates call this when the install finishes.
    let (code, _, _) = curl(&[&format!(
        "{}/baremetal/provisiondone/52:54:00:12:34:01",
        f.base
    )])
    .await;
    assert_eq!(code, 200);
    let (code, _, _) = curl(&[&format!(
        "{}/baremetal/provisiondone/52:54:00:00:00:99",
        f.base
    )])
    .await;
    assert_eq!(code, 404);
    let events = f.events.since(0, 100);
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::ProvisionDone && e.mac == "52:54:00:12:34:01"));
    assert!(events
        .iter()
        .any(|e| e.kind == EventKind::HttpFile && e.detail == "/boot/52:54:00:12:34:01.ipxe"));
    let m = f.metrics.render();
    assert!(
        m.contains("pxemesh_relay_http_requests_total{route=\"files\",code=\"206\"}"),
        "{m}"
    );
    f.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_downloads_are_complete() {
    let f = start().await;
    let url = format!("{}/files/centos/vmlinuz", f.base);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { curl(&[&url]).await }));
    }
    for t in tasks {
        let (code, _, body) = t.await.unwrap();
        assert_eq!(code, 200);
        assert!(body == f.blob);
    }
    f.shutdown.cancel();
}

/// One keep-alive connection carrying a file (sendfile fast path), a script
/// (handed to the router mid-connection) and the file again (router path):
/// every answer complete, one TCP connection, the same ETag on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connection_moves_from_fast_path_to_router() {
    let f = start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = |n: &str| dir.path().join(n).display().to_string();
    let file = format!("{}/files/centos/vmlinuz", f.base);
    let script = format!("{}/boot/52:54:00:12:34:01.ipxe", f.base);
    // %63 = 'c': a percent-encoded path is not fast-path material.
    let encoded = format!("{}/files/%63entos/vmlinuz", f.base);
    let args: Vec<String> = vec![
        "-sS".into(),
        "--max-time".into(),
        "20".into(),
        "-D".into(),
        out("headers"),
        "-w".into(),
        "%{http_code} %{num_connects}\\n".into(),
        "-o".into(),
        out("a"),
        file.clone(),
        "-o".into(),
        out("b"),
        script,
        "-o".into(),
        out("c"),
        encoded,
    ];
    let res = tokio::task::spawn_blocking(move || Command::new("curl").args(&args).output())
        .await
        .unwrap()
        .expect("curl");
    let report = String::from_utf8_lossy(&res.stdout).to_string();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines, ["200 1", "200 0", "200 0"], "{report}");
    assert!(std::fs::read(out("a")).unwrap() == f.blob);
    assert!(std::fs::read_to_string(out("b"))
        .unwrap()
        .starts_with("#!ipxe"));
    assert!(std::fs::read(out("c")).unwrap() == f.blob);
    let headers = std::fs::read_to_string(out("headers")).unwrap();
    let etags: Vec<&str> = headers
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("etag:"))
        .map(|l| l[5..].trim())
        .collect();
    assert_eq!(etags.len(), 2, "{headers}");
    assert_eq!(etags[0], etags[1], "both paths give the same ETag");

    // HTTP/1.0 without keep-alive: the body ends with the connection.
    let (code, headers, body) = curl(&["-0", &file]).await;
    assert_eq!(code, 200);
    assert!(body == f.blob);
    assert_eq!(header(&headers, "connection"), Some("close"));
    f.shutdown.cancel();
}

/// With `provision_done_from = "host"` a host's callback counts only from
/// its own reserved address (n1 = 127.0.0.1, n2 = 127.0.0.2; curl binds
/// the source address with `--interface`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_done_only_from_the_hosts_own_address() {
    let f = start_with("provision_done_from = \"host\"").await;
    let n2 = format!("{}/baremetal/provisiondone/52:54:00:12:34:02", f.base);
    // n2's callback sent from n1's address: refused, recorded nowhere.
    let (code, _, body) = curl(&["--interface", "127.0.0.1", &n2]).await;
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("127.0.0.2"));
    assert!(f
        .events
        .since(0, 100)
        .iter()
        .all(|e| e.kind != EventKind::ProvisionDone));
    let refused = f
        .metrics
        .limits
        .dropped
        .get_or_create(&pxemesh_relay::limits::DropLabels {
            protocol: "http",
            reason: "provision_done_not_from_host",
        })
        .get();
    assert_eq!(refused, 1);
    // From n2's own address: recorded, with the address as the detail.
    let (code, _, _) = curl(&["--interface", "127.0.0.2", &n2]).await;
    assert_eq!(code, 200);
    let done: Vec<_> = f
        .events
        .since(0, 100)
        .into_iter()
        .filter(|e| e.kind == EventKind::ProvisionDone)
        .collect();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].mac, "52:54:00:12:34:02");
    assert_eq!(done[0].detail, "127.0.0.2");
    f.shutdown.cancel();
}
