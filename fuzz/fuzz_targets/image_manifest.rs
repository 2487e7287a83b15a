//! An image manifest as it reaches the system: the protobuf
//! `ImageManifest` of a `Put`/`Apply` (prost decode), the coordinator's
//! validation (`image_from_proto`: name, sha256 digests, relative paths),
//! the blob check every Put runs against the node's store
//! (`missing_blobs` over a real, empty `BlobStore`), the round trip back to
//! protobuf, and the relay side: the manifest in a rack state, file lookup
//! `images/<image>/<path>` (TFTP/HTTP), pins and references of the cache.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use pxemesh_coordinator::api::convert::{image_from_proto, record_to_proto};
use pxemesh_coordinator::blobs::{BlobStore, Digest};
use pxemesh_coordinator::images::missing_blobs;
use pxemesh_coordinator::model::Record;
use pxemesh_proto::v1 as pb;
use pxemesh_relay::cache;
use pxemesh_relay::state::RackState;

fn store() -> &'static BlobStore {
    static S: OnceLock<BlobStore> = OnceLock::new();
    S.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pxemesh-fuzz-images-{}", std::process::id()));
        BlobStore::open(&dir).expect("blob store")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = pb::ImageManifest::decode(data) else {
        return;
    };
    let Ok(img) = image_from_proto(&manifest) else {
        return;
    };
    for f in &img.files {
        let d: Result<Digest, _> = f.digest.parse();
        assert!(d.is_ok(), "validated digest {:?} does not parse", f.digest);
        assert!(!f.path.starts_with('/') && !f.path.split('/').any(|c| c == ".." || c.is_empty()));
    }
    // Nothing is stored: every distinct digest is missing, none is an error.
    let missing = missing_blobs(
        store(),
        img.files.iter().map(|f| (f.digest.as_str(), f.size)),
    );
    assert!(missing.is_ok(), "{missing:?}");
    // Back to protobuf and in again: the same image.
    if let Some(pb::object::Record::Image(back)) =
        record_to_proto(&Record::Image(img.clone())).record
    {
        let again = image_from_proto(&back).expect("own manifest refused");
        assert_eq!(again, img);
    }
    let state = RackState::default().with_images([img.clone()]);
    for f in &img.files {
        let rel = format!("images/{}/{}", img.name, f.path);
        assert!(cache::resolve(&state, &rel).is_some(), "{rel} not found");
    }
    let _ = cache::pins(&state);
    let _ = cache::referenced(&state);
});
