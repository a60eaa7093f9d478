//! Source cookies for verify mode: proof that a client receives at the
//! address it sends from, without the relay storing anything for it.
//!
//! A cookie is a MAC of the source address and a time epoch (two minutes
//! long) under a key the relay draws from the OS at start; the current and
//! the previous epoch are accepted, so a cookie is good for two to four
//! minutes. An off-path attacker who forges a victim's address never sees
//! the cookie the relay sends there, so it cannot register the victim.
//!
//! Epochs count from the key's birth on the monotonic clock, not the wall
//! clock: the key lives and dies with the process, so nothing else needs
//! to agree on the time, and a wall-clock step (NTP, an operator's `date`)
//! can neither age fresh cookies out nor revive old ones.
//!
//! The MAC is HMAC-SHA-256 (RustCrypto), truncated to 128 bits and checked
//! with `verify_truncated_left` (constant time); on the wire it is 22
//! base64url characters. The keyed state (HMAC's inner and outer pads and
//! the domain label) is computed once, when the key is made, and cloned
//! for each cookie: under a flood of hellos each costs two SHA-256
//! compressions, not four. Pure: the caller passes the instant.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::time::Instant;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::core::addr::RawAddr;

/// How long one cookie epoch lasts.
pub const EPOCH_SECS: u64 = 120;
/// Bytes of MAC a cookie carries.
const TAG_LEN: usize = 16;
/// Length of a cookie on the wire (base64url of `TAG_LEN` bytes).
pub const COOKIE_LEN: usize = 22;

/// The relay's cookie key, and the instant its epochs count from. Never
/// printed. Clones share both, so every loop of a relay makes and checks
/// the same cookies.
#[derive(Clone)]
pub struct CookieKey {
    /// HMAC keyed with the secret and fed the domain label: the state every
    /// cookie's MAC starts from.
    keyed: Hmac<Sha256>,
    /// The secret itself, kept only to hand it to a new process
    /// ([`CookieKey::export`]): cookies handed out stay valid across a
    /// hand-over.
    secret: [u8; 32],
    /// When epoch 0 began.
    born: Instant,
}

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(<redacted>)")
    }
}

impl CookieKey {
    /// A key from 32 random bytes (the runtime reads them from the OS),
    /// whose epochs count from `born`.
    pub fn new(bytes: [u8; 32], born: Instant) -> CookieKey {
        let mut keyed = match Hmac::<Sha256>::new_from_slice(&bytes) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        keyed.update(b"udphub cookie v1");
        CookieKey {
            keyed,
            secret: bytes,
            born,
        }
    }

    /// The secret and how long ago epoch 0 began at `now`: what a new
    /// process needs to make and check the same cookies
    /// (`CookieKey::new(secret, now - age)` there).
    pub fn export(&self, now: Instant) -> ([u8; 32], std::time::Duration) {
        (self.secret, now.saturating_duration_since(self.born))
    }

    /// The epoch `now` falls in.
    fn epoch(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_secs() / EPOCH_SECS
    }

    fn mac(&self, epoch: u64, addr: &RawAddr) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(&epoch.to_be_bytes());
        mac.update(addr.as_bytes());
        mac
    }

    /// The cookie for `addr` at `now`.
    pub fn make(&self, addr: &RawAddr, now: Instant) -> [u8; COOKIE_LEN] {
        let tag = self.mac(self.epoch(now), addr).finalize().into_bytes();
        let mut out = [0u8; COOKIE_LEN];
        // 16 bytes encode to exactly 22 base64url characters, no padding.
        let _ = URL_SAFE_NO_PAD.encode_slice(&tag[..TAG_LEN], &mut out);
        out
    }

    /// Whether `cookie` was made for `addr` in this epoch or the last one.
    pub fn check(&self, cookie: &[u8], addr: &RawAddr, now: Instant) -> bool {
        self.check_age(cookie, addr, now).is_some()
    }

    /// Like [`check`](Self::check), saying which epoch: `Some(Fresh)` for
    /// this one, `Some(Aging)` for the last one (good, but due for renewal:
    /// it ages out at the next epoch), `None` if it proves nothing.
    pub fn check_age(&self, cookie: &[u8], addr: &RawAddr, now: Instant) -> Option<CookieAge> {
        if cookie.len() != COOKIE_LEN {
            return None;
        }
        let mut tag = [0u8; TAG_LEN + 2];
        let Ok(TAG_LEN) = URL_SAFE_NO_PAD.decode_slice(cookie, &mut tag) else {
            return None;
        };
        let epoch = self.epoch(now);
        let made_in = |e: u64| {
            self.mac(e, addr)
                .verify_truncated_left(&tag[..TAG_LEN])
                .is_ok()
        };
        if made_in(epoch) {
            Some(CookieAge::Fresh)
        } else if epoch > 0 && made_in(epoch - 1) {
            Some(CookieAge::Aging)
        } else {
            None
        }
    }
}

/// How old a good cookie is (see [`CookieKey::check_age`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieAge {
    /// Made in this epoch.
    Fresh,
    /// Made in the last epoch: still good, gone at the next.
    Aging,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::SocketAddr;
    use std::time::Duration;

    fn addr(s: &str) -> RawAddr {
        s.parse::<SocketAddr>().unwrap().into()
    }

    #[test]
    fn a_cookie_proves_one_address_for_two_epochs() {
        let born = Instant::now();
        let at = |secs: u64| born + Duration::from_secs(secs);
        let key = CookieKey::new([9; 32], born);
        let a = addr("127.0.0.1:5000");
        let c = key.make(&a, at(1_000));
        assert!(key.check(&c, &a, at(1_000)));
        assert!(key.check(&c, &a, at(1_000 + EPOCH_SECS)), "previous epoch");
        assert_eq!(key.check_age(&c, &a, at(1_000)), Some(CookieAge::Fresh));
        assert_eq!(
            key.check_age(&c, &a, at(1_000 + EPOCH_SECS)),
            Some(CookieAge::Aging)
        );
        assert!(!key.check(&c, &a, at(1_000 + 2 * EPOCH_SECS)), "too old");
        assert!(
            !key.check(&c, &addr("127.0.0.1:5001"), at(1_000)),
            "another port"
        );
        assert!(
            !key.check(&c, &addr("127.0.0.2:5000"), at(1_000)),
            "another host"
        );
        assert!(
            !CookieKey::new([8; 32], born).check(&c, &a, at(1_000)),
            "another key"
        );
        assert!(!key.check(&c[..21], &a, at(1_000)));
        assert!(!key.check(b"!!!!!!!!!!!!!!!!!!!!!!", &a, at(1_000)));
        assert!(format!("{key:?}").contains("redacted"));
    }

    #[test]
    fn epochs_follow_the_keys_birth_not_the_wall_clock() {
        // Two keys with the same secret born at different instants disagree
        // on epochs: time is the process's own, from the key's birth.
        let born = Instant::now();
        let a = addr("[::1]:7");
        let key = CookieKey::new([5; 32], born);
        let c = key.make(&a, born);
        assert!(key.check(&c, &a, born + Duration::from_secs(EPOCH_SECS + 1)));
        let later = CookieKey::new([5; 32], born + Duration::from_secs(10 * EPOCH_SECS));
        assert!(
            later.check(&c, &a, born + Duration::from_secs(10 * EPOCH_SECS)),
            "epoch 0 of each"
        );
        // An instant before the key's birth is epoch 0, never a panic.
        assert!(later.check(&c, &a, born));
        // A clone makes the same cookies (the loops of one relay share one).
        assert_eq!(key.clone().make(&a, born), c);
    }

    proptest! {
        #[test]
        fn check_never_panics(c in proptest::collection::vec(any::<u8>(), 0..40)) {
            let key = CookieKey::new([1; 32], Instant::now());
            let _ = key.check(&c, &addr("[::1]:1"), Instant::now());
        }
    }
}
