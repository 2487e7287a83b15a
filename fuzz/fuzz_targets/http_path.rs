//! Raw bytes of an HTTP connection into the relay's boot-file fast path:
//! the request-head parser that decides between `sendfile` and hyper, then
//! for a fast-path request the path resolution inside a real boot directory
//! and the conditional/Range decision (`If-None-Match`, `If-Range`,
//! `Range: bytes=`) for files of several sizes, with the invariants the
//! response writer relies on (a 206 span lies inside the file, so
//! `Content-Range` and `Content-Length` cannot overflow or lie).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use pxemesh_relay::files;
use pxemesh_relay::http::range_decision;
use pxemesh_relay::http_fast::{parse, Parsed};

fn root() -> &'static PathBuf {
    static R: OnceLock<PathBuf> = OnceLock::new();
    R.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pxemesh-fuzz-http-{}", std::process::id()));
        let root = dir.join("boot");
        std::fs::create_dir_all(root.join("centos")).expect("boot dir");
        std::fs::write(root.join("ipxe.efi"), b"loader").expect("file");
        std::fs::write(root.join("centos/vmlinuz"), b"kernel").expect("file");
        std::fs::write(dir.join("secret"), b"outside").expect("file");
        let _ = std::os::unix::fs::symlink("../secret", root.join("escape"));
        root.canonicalize().expect("root")
    })
}

const ETAG: &str = "\"sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03\"";

fuzz_target!(|data: &[u8]| {
    let Parsed::Fast(req) = parse(data) else {
        return;
    };
    assert!(req.head_len <= data.len());
    assert!(!req.path.is_empty() && !req.path.contains(['%', '?', '#']));
    if let Ok(full) = files::resolve(root(), &req.path) {
        assert!(
            full.starts_with(root()),
            "{full:?} escapes the boot directory"
        );
    }
    for len in [0u64, 1, 7, 1 << 20, u64::MAX / 2, u64::MAX] {
        let (code, start, count) = range_decision(&req.headers, ETAG, len);
        match code {
            StatusCode::OK => assert_eq!((start, count), (0, len)),
            StatusCode::PARTIAL_CONTENT => {
                assert!(count >= 1, "empty 206");
                let end = start.checked_add(count).expect("span overflows");
                assert!(end <= len, "206 span {start}+{count} past {len}");
                // What the response writer formats.
                let _ = format!("bytes {start}-{}/{len}", start + count - 1);
            }
            StatusCode::NOT_MODIFIED | StatusCode::RANGE_NOT_SATISFIABLE => {
                assert_eq!((start, count), (0, 0))
            }
            other => panic!("unexpected status {other}"),
        }
    }
});
