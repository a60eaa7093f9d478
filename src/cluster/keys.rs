//! Which cluster keys a node signs and accepts with, and how a reload
//! rotates them: the bridge signs every batch with the current key and
//! accepts a batch the current key verifies, or, for [`KEY_GRACE`] after a
//! reload changed the key, one the previous key verifies. "No key" is a
//! state like any other: a node without one sends untagged batches and
//! accepts any well-formed batch (it cannot tell), and a node that just
//! got its first key still accepts untagged ones during the grace period,
//! so a cluster can be keyed (or re-keyed) one relay at a time.
//!
//! The reader (the bridge's tasks) locks a mutex per NATS message; the
//! writer (the supervisor, on SIGHUP) only on a reload.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::frame::{self, Batch};
use crate::config::ClusterKey;

/// How long the previous key is still accepted after a reload changed it:
/// long enough to send SIGHUP to every relay of a cluster in turn, short
/// enough that a retired (perhaps leaked) key soon stops working.
pub const KEY_GRACE: Duration = Duration::from_secs(60);

/// Why a batch was refused before any of its bodies was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No tag, at a node with a key.
    Unsigned,
    /// A tag no accepted key made for this subject and these bytes.
    BadMac,
    /// Tagged correctly, but its time is too far from this node's clock
    /// ([`frame::FRESHNESS`]).
    Stale,
}

/// The keys in force.
#[derive(Debug, Default)]
struct Ring {
    /// Signs, and verifies.
    current: Option<ClusterKey>,
    /// The one before the last change, and until when it still verifies.
    previous: Option<(Option<ClusterKey>, Instant)>,
}

/// The node's cluster keys, shared by the bridge and the supervisor.
#[derive(Debug, Clone, Default)]
pub struct Keys(Arc<Mutex<Ring>>);

impl Keys {
    /// Keys starting with `current` (none: unsigned).
    pub fn new(current: Option<ClusterKey>) -> Keys {
        Keys(Arc::new(Mutex::new(Ring {
            current,
            previous: None,
        })))
    }

    /// A reload read `key`: from now on it signs; the one it replaces
    /// still verifies until `now + KEY_GRACE`. Returns whether anything
    /// changed.
    pub fn rotate(&self, key: Option<ClusterKey>, now: Instant) -> bool {
        let mut ring = self.lock();
        let same = match (&ring.current, &key) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_as(b),
            _ => false,
        };
        if same {
            return false;
        }
        let old = std::mem::replace(&mut ring.current, key);
        ring.previous = Some((old, now + KEY_GRACE));
        true
    }

    /// The key to sign with, if any.
    pub fn signing(&self) -> Option<ClusterKey> {
        self.lock().current.clone()
    }

    /// Whether `batch`, received on `subject` at `now` (and `unix` seconds
    /// by the wall clock), may be delivered: `Ok(true)` if a key verified
    /// it, `Ok(false)` if it was taken unchecked (no key is in force, or
    /// the first key's grace period still takes unsigned batches).
    pub fn check(
        &self,
        batch: &Batch<'_>,
        subject: &str,
        now: Instant,
        unix: u64,
    ) -> Result<bool, Refusal> {
        let ring = self.lock();
        let first = accepts(ring.current.as_ref(), batch, subject, unix);
        if first.is_ok() {
            return first;
        }
        match &ring.previous {
            Some((old, until)) if now < *until => {
                // The current key's verdict is the one to count.
                accepts(old.as_ref(), batch, subject, unix).or(first)
            }
            _ => first,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // Each update is one assignment: a panic elsewhere leaves it whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a node with `key` accepts `batch` (true: verified by it).
fn accepts(
    key: Option<&ClusterKey>,
    batch: &Batch<'_>,
    subject: &str,
    unix: u64,
) -> Result<bool, Refusal> {
    let Some(key) = key else {
        return Ok(false);
    };
    let Some(tag) = batch.tag else {
        return Err(Refusal::Unsigned);
    };
    if !frame::verify(key, subject, batch.signed, tag) {
        return Err(Refusal::BadMac);
    }
    if !frame::fresh(batch.time, unix) {
        return Err(Refusal::Stale);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::frame::{parse, BatchWriter, Stamp};

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(vec![b; 32]).unwrap()
    }

    fn msg(key: Option<&ClusterKey>, time: u32) -> Vec<u8> {
        let mut w = BatchWriter::default();
        let stamp = Stamp {
            epoch: 1,
            stream: 1,
            seq: 1,
        };
        w.begin(time, stamp, key.is_some());
        w.push(b"hi");
        w.finish(key, "u.room.r")
    }

    const T: u32 = 1_800_000_000;

    /// `Ok(())` if taken, whether verified or not.
    fn check(keys: &Keys, m: &[u8], now: Instant) -> Result<(), Refusal> {
        keys.check(&parse(m).unwrap(), "u.room.r", now, u64::from(T))
            .map(|_| ())
    }

    #[test]
    fn a_keyed_node_refuses_unsigned_forged_misrouted_and_stale_batches() {
        let now = Instant::now();
        let keys = Keys::new(Some(key(1)));
        assert_eq!(check(&keys, &msg(Some(&key(1)), T), now), Ok(()));
        assert_eq!(check(&keys, &msg(None, T), now), Err(Refusal::Unsigned));
        assert_eq!(
            check(&keys, &msg(Some(&key(2)), T), now),
            Err(Refusal::BadMac)
        );
        let m = msg(Some(&key(1)), T);
        assert_eq!(
            keys.check(&parse(&m).unwrap(), "u.room.s", now, u64::from(T))
                .map(|_| ()),
            Err(Refusal::BadMac),
            "replayed into another room"
        );
        let old = T - frame::FRESHNESS as u32 - 1;
        assert_eq!(
            check(&keys, &msg(Some(&key(1)), old), now),
            Err(Refusal::Stale)
        );
        // A node without a key cannot tell, and takes both, unverified.
        let open = Keys::new(None);
        let verified =
            |keys: &Keys, m: &[u8]| keys.check(&parse(m).unwrap(), "u.room.r", now, u64::from(T));
        assert_eq!(verified(&open, &msg(None, T)), Ok(false));
        assert_eq!(verified(&open, &msg(Some(&key(2)), old)), Ok(false));
        assert_eq!(verified(&keys, &msg(Some(&key(1)), T)), Ok(true));
    }

    #[test]
    fn after_a_rotation_the_old_key_verifies_for_the_grace_period_only() {
        let t0 = Instant::now();
        let keys = Keys::new(Some(key(1)));
        assert!(!keys.rotate(Some(key(1)), t0), "the same key: no change");
        assert!(keys.rotate(Some(key(2)), t0));
        assert!(
            keys.signing().unwrap().same_as(&key(2)),
            "signs with the new"
        );
        let (old, new) = (msg(Some(&key(1)), T), msg(Some(&key(2)), T));
        assert_eq!(check(&keys, &new, t0), Ok(()));
        assert_eq!(check(&keys, &old, t0 + KEY_GRACE / 2), Ok(()));
        assert_eq!(
            check(&keys, &old, t0 + KEY_GRACE),
            Err(Refusal::BadMac),
            "retired"
        );
        assert_eq!(check(&keys, &msg(None, T), t0), Err(Refusal::Unsigned));
        // Keying a cluster one node at a time: the first key still takes
        // unsigned batches for the grace period.
        let fresh = Keys::new(None);
        assert!(fresh.rotate(Some(key(3)), t0));
        assert_eq!(check(&fresh, &msg(None, T), t0), Ok(()));
        assert_eq!(
            check(&fresh, &msg(None, T), t0 + KEY_GRACE),
            Err(Refusal::Unsigned)
        );
    }
}
