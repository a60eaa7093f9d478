//! The cluster key (`--cluster-key-file`): the HMAC key every message on
//! the bus is tagged with, read from its file at start and on each reload,
//! never shown (its `Debug` is redacted, and nothing derived from it is
//! logged).

use std::fmt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::Error;

/// The shortest cluster key taken: 256 bits, HMAC-SHA-256's block of
/// security (`openssl rand -hex 32` makes 64).
pub const MIN_CLUSTER_KEY_LEN: usize = 32;

/// A cluster key. Its bytes are never printed.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl ClusterKey {
    /// A key from its bytes; `Err` says why they can't be one.
    pub fn new(bytes: Vec<u8>) -> Result<ClusterKey, String> {
        if bytes.len() < MIN_CLUSTER_KEY_LEN {
            return Err(format!(
                "the cluster key is {} bytes; it needs at least {MIN_CLUSTER_KEY_LEN} (e.g. `openssl rand -hex 32 > FILE`, the same file on every relay)",
                bytes.len()
            ));
        }
        Ok(ClusterKey(bytes))
    }

    /// Whether `other` is the same key (in constant time: a reload
    /// compares the running key with the file's).
    pub fn same_as(&self, other: &ClusterKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == other.0.len() && bool::from(self.0.ct_eq(&other.0))
    }

    /// A fresh HMAC-SHA-256 under this key.
    pub fn mac(&self) -> Hmac<Sha256> {
        match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        }
    }
}

/// Compared in constant time ([`ClusterKey::same_as`]).
impl PartialEq for ClusterKey {
    fn eq(&self, other: &ClusterKey) -> bool {
        self.same_as(other)
    }
}

impl Eq for ClusterKey {}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(<{} bytes, redacted>)", self.0.len())
    }
}

/// Reads a cluster key file: its bytes, less one trailing newline.
pub fn read_cluster_key(path: &Path) -> Result<ClusterKey, Error> {
    let mut bytes = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read --cluster-key-file {}: {e}",
            path.display()
        ))
    })?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    ClusterKey::new(bytes)
        .map_err(|e| Error::Config(format!("--cluster-key-file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused_and_keys_never_shown() {
        let e = ClusterKey::new(vec![b'k'; 31]).unwrap_err();
        assert!(e.contains("31 bytes") && e.contains("openssl rand"), "{e}");
        let k = ClusterKey::new(vec![b'k'; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "ClusterKey(<32 bytes, redacted>)");
        assert!(k.same_as(&ClusterKey::new(vec![b'k'; 32]).unwrap()));
        assert!(!k.same_as(&ClusterKey::new(vec![b'j'; 32]).unwrap()));
    }
}
