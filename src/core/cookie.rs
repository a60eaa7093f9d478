//! Source cookies for verify mode: proof that a client receives at the
//! address it sends from, without the relay storing anything for it.
//!
//! A cookie is a MAC of the source address and a time epoch (two minutes
//! long) under a key the relay draws from the OS at start; the current and
//! the previous epoch are accepted, so a cookie is good for two to four
//! minutes. An off-path attacker who forges a victim's address never sees
//! the cookie the relay sends there, so it cannot register the victim.
//!
//! The MAC is HMAC-SHA-256 (RustCrypto), truncated to 128 bits and checked
//! with `verify_truncated_left` (constant time); on the wire it is 22
//! base64url characters. Pure: the caller passes the time and the key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::core::addr::RawAddr;

/// How long one cookie epoch lasts.
pub const EPOCH_SECS: u64 = 120;
/// Bytes of MAC a cookie carries.
const TAG_LEN: usize = 16;
/// Length of a cookie on the wire (base64url of [`TAG_LEN`] bytes).
pub const COOKIE_LEN: usize = 22;

/// The relay's cookie key. Never printed.
#[derive(Clone)]
pub struct CookieKey([u8; 32]);

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(<redacted>)")
    }
}

impl CookieKey {
    /// A key from 32 random bytes (the runtime reads them from the OS).
    pub fn new(bytes: [u8; 32]) -> CookieKey {
        CookieKey(bytes)
    }

    fn mac(&self, epoch: u64, addr: &RawAddr) -> Hmac<Sha256> {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(b"udphub cookie v1");
        mac.update(&epoch.to_be_bytes());
        mac.update(addr.as_bytes());
        mac
    }

    /// The cookie for `addr` at unix time `now`.
    pub fn make(&self, addr: &RawAddr, now: u64) -> [u8; COOKIE_LEN] {
        let tag = self.mac(now / EPOCH_SECS, addr).finalize().into_bytes();
        let mut out = [0u8; COOKIE_LEN];
        // 16 bytes encode to exactly 22 base64url characters, no padding.
        let _ = URL_SAFE_NO_PAD.encode_slice(&tag[..TAG_LEN], &mut out);
        out
    }

    /// Whether `cookie` was made for `addr` in this epoch or the last one.
    pub fn check(&self, cookie: &[u8], addr: &RawAddr, now: u64) -> bool {
        if cookie.len() != COOKIE_LEN {
            return false;
        }
        let mut tag = [0u8; TAG_LEN + 2];
        let Ok(TAG_LEN) = URL_SAFE_NO_PAD.decode_slice(cookie, &mut tag) else {
            return false;
        };
        let epoch = now / EPOCH_SECS;
        [epoch, epoch.saturating_sub(1)].iter().any(|&e| {
            self.mac(e, addr)
                .verify_truncated_left(&tag[..TAG_LEN])
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    fn addr(s: &str) -> RawAddr {
        s.parse::<SocketAddr>().unwrap().into()
    }

    #[test]
    fn a_cookie_proves_one_address_for_two_epochs() {
        let key = CookieKey::new([9; 32]);
        let a = addr("127.0.0.1:5000");
        let c = key.make(&a, 1_000);
        assert!(key.check(&c, &a, 1_000));
        assert!(key.check(&c, &a, 1_000 + EPOCH_SECS), "previous epoch");
        assert!(!key.check(&c, &a, 1_000 + 2 * EPOCH_SECS), "too old");
        assert!(
            !key.check(&c, &addr("127.0.0.1:5001"), 1_000),
            "another port"
        );
        assert!(
            !key.check(&c, &addr("127.0.0.2:5000"), 1_000),
            "another host"
        );
        assert!(!CookieKey::new([8; 32]).check(&c, &a, 1_000), "another key");
        assert!(!key.check(&c[..21], &a, 1_000));
        assert!(!key.check(b"!!!!!!!!!!!!!!!!!!!!!!", &a, 1_000));
        assert!(format!("{key:?}").contains("redacted"));
    }

    proptest! {
        #[test]
        fn check_never_panics(c in proptest::collection::vec(any::<u8>(), 0..40)) {
            let key = CookieKey::new([1; 32]);
            let _ = key.check(&c, &addr("[::1]:1"), 5);
        }
    }
}
