//! The backlog: fan-outs a loop has yet to finish, bounded in bytes.
//!
//! A fan-out is parked here when it is larger than one slice
//! (`--fanout-slice`: the loop goes back to reading between slices) or when
//! the kernel's send buffer is full (the loop waits for it to be writable
//! rather than dropping). Each room has its own queue, in arrival order:
//! a message to a room whose fan-out is parked waits behind it, so a
//! member still gets its room's messages in order; rooms take turns
//! (round robin), so one huge room never holds up the others.
//!
//! Sans-I/O: this only keeps the queue; the runtime sends, and the room's
//! member list keeps the parked fan-out's position (its cursor,
//! [`crate::core::rooms`]), so members joining and leaving meanwhile are
//! handled where the list is.

use std::collections::VecDeque;
use std::time::Instant;

use hashbrown::HashMap;

use crate::core::hub::FanoutId;
use crate::core::rooms::RoomId;

/// What a parked fan-out costs the backlog besides its payload: the entry
/// itself and its share of the queues (an estimate, so that empty messages
/// are bounded too).
pub const ENTRY_COST: usize = 96;

/// One fan-out not yet finished.
#[derive(Debug, Clone)]
pub struct Parked {
    /// Its room, incarnation and the member it leaves out.
    pub id: FanoutId,
    /// The bytes every recipient gets, copied once when parked (a `Box`,
    /// not an `Arc`: one loop owns it, and the core keeps no atomics).
    pub payload: Box<[u8]>,
    /// When this loop read the message, for the fan-out duration
    /// histogram; `None` for a message from elsewhere (another loop or
    /// node), whose receipt the loop that read it times.
    pub received_at: Option<Instant>,
    /// Whether it has begun: its room's cursor is its position. A message
    /// queued behind another starts from the beginning when its turn comes.
    pub started: bool,
}

impl Parked {
    /// What it costs the backlog.
    pub fn cost(&self) -> usize {
        cost(self.payload.len())
    }
}

/// What a parked fan-out of a `len`-byte payload costs the backlog.
pub fn cost(len: usize) -> usize {
    len + ENTRY_COST
}

/// The backlog of one loop.
#[derive(Debug)]
pub struct Backlog {
    /// Each room's parked fan-outs, oldest first; no empty queues.
    rooms: HashMap<RoomId, VecDeque<Parked>>,
    /// Rooms with parked fan-outs, in turn order: the front's head is next.
    turns: VecDeque<RoomId>,
    /// Bytes parked ([`Parked::cost`] summed).
    bytes: usize,
    /// The most bytes that may be parked (`--send-backlog`).
    limit: usize,
}

impl Backlog {
    /// An empty backlog holding up to `limit` bytes.
    pub fn new(limit: usize) -> Backlog {
        Backlog {
            rooms: HashMap::new(),
            turns: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    /// Whether `room` has a parked fan-out (then a new message to it must
    /// queue behind).
    pub fn has(&self, room: RoomId) -> bool {
        self.rooms.contains_key(&room)
    }

    /// Bytes parked.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Fan-outs parked.
    pub fn len(&self) -> usize {
        self.rooms.values().map(VecDeque::len).sum()
    }

    /// Parks `parked` behind its room's others; gives it back if that
    /// would take the backlog over its limit (the caller drops it and
    /// counts the drop).
    pub fn push(&mut self, parked: Parked) -> Result<(), Parked> {
        let cost = parked.cost();
        if self.bytes + cost > self.limit {
            return Err(parked);
        }
        self.bytes += cost;
        let room = parked.id.room;
        let queue = self.rooms.entry(room).or_default();
        if queue.is_empty() {
            self.turns.push_back(room);
        }
        queue.push_back(parked);
        Ok(())
    }

    /// The fan-out whose turn it is: the oldest of the room at the front.
    pub fn front(&mut self) -> Option<&mut Parked> {
        let room = self.turns.front()?;
        self.rooms.get_mut(room).and_then(VecDeque::front_mut)
    }

    /// Removes the fan-out whose turn it is (finished, or its room gone);
    /// the room's next, if any, keeps the turn.
    pub fn pop_front(&mut self) -> Option<Parked> {
        let room = *self.turns.front()?;
        let queue = self.rooms.get_mut(&room)?;
        let done = queue.pop_front();
        if queue.is_empty() {
            self.rooms.remove(&room);
            self.turns.pop_front();
        }
        if let Some(done) = &done {
            self.bytes -= done.cost();
        }
        done
    }

    /// Ends the front room's turn: the next room goes first.
    pub fn next_turn(&mut self) {
        if let Some(room) = self.turns.pop_front() {
            self.turns.push_back(room);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(room: u32, payload: &[u8]) -> Parked {
        Parked {
            id: FanoutId {
                room: RoomId(room),
                incarnation: 0,
                skip: None,
            },
            payload: payload.into(),
            received_at: Some(Instant::now()),
            started: false,
        }
    }

    fn front(b: &mut Backlog) -> Option<(u32, Vec<u8>)> {
        b.front().map(|p| (p.id.room.0, p.payload.to_vec()))
    }

    #[test]
    fn a_room_keeps_its_order_and_rooms_take_turns() {
        let mut b = Backlog::new(1 << 20);
        for (room, m) in [(1, b"a1"), (1, b"a2"), (2, b"b1"), (3, b"c1"), (2, b"b2")] {
            b.push(parked(room, m)).unwrap();
        }
        assert_eq!(b.len(), 5);
        assert!(b.has(RoomId(1)) && !b.has(RoomId(4)));
        assert_eq!(front(&mut b), Some((1, b"a1".to_vec())));
        // Room 1's turn ends unfinished: rooms 2 and 3 go before it again.
        b.next_turn();
        assert_eq!(front(&mut b), Some((2, b"b1".to_vec())));
        b.pop_front();
        assert_eq!(
            front(&mut b),
            Some((2, b"b2".to_vec())),
            "the room keeps its turn"
        );
        b.pop_front();
        assert_eq!(front(&mut b), Some((3, b"c1".to_vec())));
        b.pop_front();
        assert_eq!(front(&mut b), Some((1, b"a1".to_vec())));
        b.pop_front();
        assert_eq!(front(&mut b), Some((1, b"a2".to_vec())));
        b.pop_front();
        assert!(b.is_empty() && b.front().is_none() && b.pop_front().is_none());
        assert_eq!(b.bytes(), 0);
        assert!(!b.has(RoomId(1)));
    }

    #[test]
    fn the_limit_is_in_bytes_and_a_refused_fanout_comes_back() {
        let mut b = Backlog::new(2 * cost(100));
        b.push(parked(1, &[0; 100])).unwrap();
        b.push(parked(2, &[0; 100])).unwrap();
        assert_eq!(b.bytes(), 2 * cost(100));
        let refused = b.push(parked(1, &[0; 1])).unwrap_err();
        assert_eq!(refused.payload.len(), 1);
        assert_eq!(b.len(), 2);
        b.pop_front();
        b.push(parked(1, &[0; 1])).unwrap();
        assert_eq!(b.bytes(), cost(100) + cost(1));
    }

    #[test]
    fn empty_payloads_are_bounded_too() {
        let mut b = Backlog::new(10 * ENTRY_COST);
        let parked_ok = (0..100).filter(|_| b.push(parked(1, b"")).is_ok()).count();
        assert_eq!(parked_ok, 10);
    }
}
