//! Cluster key: seals BMC passwords before they enter the Raft log, so the log,
//! sled and every snapshot hold only ciphertext. All coordinators share the key
//! file; relays never see it (they get plaintext for their own rack over mTLS).

use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::error::CoordError;
use crate::model::Sealed;

const AAD: &[u8] = b"pxemesh/v1/bmc-password";
const PREFIX: &str = "xc20p1:";

#[derive(Clone)]
pub struct ClusterKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// Writes a new random key (hex, 0600). Refuses to overwrite an existing file:
    /// losing the key loses every stored BMC password.
    pub fn generate(path: &Path) -> Result<(), CoordError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| CoordError::Crypto(format!("{}: {e}", path.display())))?;
        writeln!(f, "{}", hex::encode(key))?;
        f.sync_all()?;
        Ok(())
    }

    pub fn load(path: &Path) -> Result<ClusterKey, CoordError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoordError::Crypto(format!("cannot read cluster key {}: {e}", path.display()))
        })?;
        let raw = hex::decode(text.trim()).map_err(|_| {
            CoordError::Crypto(format!("{}: not a hex-encoded key", path.display()))
        })?;
        if raw.len() != 32 {
            return Err(CoordError::Crypto(format!(
                "{}: key must be 32 bytes, found {}",
                path.display(),
                raw.len()
            )));
        }
        Ok(ClusterKey::from_bytes(&raw))
    }

    pub fn from_bytes(raw: &[u8]) -> ClusterKey {
        ClusterKey {
            cipher: XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(raw)),
        }
    }

    pub fn seal(&self, plaintext: &str) -> Result<Sealed, CoordError> {
        let mut nonce = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: AAD,
                },
            )
            .map_err(|_| CoordError::Crypto("encryption failed".into()))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(Sealed(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )))
    }

    pub fn open(&self, sealed: &Sealed) -> Result<String, CoordError> {
        let bad =
            || CoordError::Crypto("stored secret cannot be decrypted with this cluster key".into());
        let b64 = sealed.0.strip_prefix(PREFIX).ok_or_else(bad)?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?;
        if blob.len() < 24 {
            return Err(bad());
        }
        let (nonce, ct) = blob.split_at(24);
        let pt = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: AAD })
            .map_err(|_| bad())?;
        String::from_utf8(pt).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let k = ClusterKey::from_bytes(&[7u8; 32]);
        let s = k.seal("hunter2").unwrap();
        assert!(!s.0.contains("hunter2"));
        assert_eq!(k.open(&s).unwrap(), "hunter2");
        assert_ne!(k.seal("hunter2").unwrap(), s, "nonces must differ");
        let other = ClusterKey::from_bytes(&[8u8; 32]);
        assert!(other.open(&s).is_err());
        assert!(k.open(&Sealed("xc20p1:AAAA".into())).is_err());
    }

    #[test]
    fn key_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.key");
        ClusterKey::generate(&p).unwrap();
        assert!(ClusterKey::generate(&p).is_err(), "must not overwrite");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k = ClusterKey::load(&p).unwrap();
        assert_eq!(k.open(&k.seal("x").unwrap()).unwrap(), "x");
    }
}
