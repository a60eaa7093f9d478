//! Room interest told from one thread to another, coalesced per room.
//!
//! A loop tells another thread which rooms it has members in: the other
//! loops of its relay (`--threads`), so they hand it messages for those
//! rooms, and the cluster bridge, so it subscribes to their subjects. A
//! queue of "opened"/"closed" events would grow while the reader is slow
//! with every join a client makes (one client alternating between two
//! rooms is enough), and dropping an "opened" would silence a room. So
//! what is kept is not the events but the difference between what the
//! writer knows and what the reader was last told: one entry per room
//! whose state changed since the reader last looked, and a room that
//! changes back before then leaves no entry at all. Its size is bounded by
//! the rooms open on either side, which `--max-rooms` bounds; nothing is
//! ever dropped.
//!
//! The writer takes a mutex only when a room opens or closes (never per
//! message); the reader checks one atomic flag before each hand-off and
//! takes the mutex only when something changed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use hashbrown::HashMap;

/// Rooms whose state changed since the reader last looked.
#[derive(Debug, Default)]
pub struct Interest {
    /// Room name → open (true) or closed (false), as the writer now has it.
    changes: Mutex<HashMap<Box<[u8]>, bool>>,
    /// Whether `changes` is not empty: what the reader checks first.
    pending: AtomicBool,
}

impl Interest {
    /// Nothing to tell yet: the reader believes every room closed.
    pub fn new() -> Interest {
        Interest::default()
    }

    /// The writer: room `name` is now open (`true`) or closed here.
    pub fn tell(&self, name: &[u8], open: bool) {
        let mut changes = self.lock();
        match changes.get(name) {
            // It changes back before the reader saw the change: the reader
            // already believes the truth.
            Some(&told) if told != open => {
                changes.remove(name);
            }
            Some(_) => {}
            None => {
                changes.insert(name.into(), open);
            }
        }
        self.pending.store(!changes.is_empty(), Ordering::Release);
    }

    /// The reader: hands every change since the last call to `apply`
    /// (room, open), in no particular order (each room's latest state).
    pub fn take(&self, mut apply: impl FnMut(Box<[u8]>, bool)) {
        if !self.pending.load(Ordering::Acquire) {
            return;
        }
        let changes = {
            let mut changes = self.lock();
            self.pending.store(false, Ordering::Release);
            std::mem::take(&mut *changes)
        };
        for (name, open) in changes {
            apply(name, open);
        }
    }

    /// Changes waiting for the reader.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no change is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The map. A thread that panicked while holding it left it as it was
    /// (each update is one entry): carry on.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<[u8]>, bool>> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(i: &Interest) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        i.take(|name, open| out.push((name.into_vec(), open)));
        out.sort();
        out
    }

    #[test]
    fn the_reader_gets_each_rooms_latest_state() {
        let i = Interest::new();
        assert!(taken(&i).is_empty());
        i.tell(b"a", true);
        i.tell(b"b", true);
        assert_eq!(
            taken(&i),
            vec![(b"a".to_vec(), true), (b"b".to_vec(), true)]
        );
        i.tell(b"a", false);
        assert_eq!(taken(&i), vec![(b"a".to_vec(), false)]);
        assert!(taken(&i).is_empty(), "told once");
    }

    #[test]
    fn a_client_alternating_rooms_grows_nothing_while_the_reader_sleeps() {
        // The attack: one client joins room after room (each opens and
        // closes a room) while the reader is slow. Only rooms whose state
        // differs from what the reader knows are kept.
        let i = Interest::new();
        i.tell(b"home", true);
        assert_eq!(taken(&i).len(), 1);
        for n in 0..100_000u32 {
            let name = format!("r{n}");
            i.tell(b"home", false);
            i.tell(name.as_bytes(), true);
            i.tell(name.as_bytes(), false);
            i.tell(b"home", true);
            assert!(i.len() <= 1);
        }
        assert!(
            taken(&i).is_empty(),
            "the reader's view was right all along"
        );
        i.tell(b"home", false);
        i.tell(b"x", true);
        assert_eq!(
            taken(&i),
            vec![(b"home".to_vec(), false), (b"x".to_vec(), true)]
        );
    }
}
