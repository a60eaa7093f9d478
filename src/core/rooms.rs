//! Per-room member lists: what makes fan-out cost O(room), never O(table).
//!
//! Each room keeps a dense `Vec` of its members' table slots; each client
//! remembers its position in that `Vec`, so joining and leaving are O(1)
//! (`swap_remove`, then the one moved member's position is fixed). A
//! message walks only its room's list.
//!
//! v1 has one room, the lobby ([`LOBBY`]), which every client is in; the
//! rooms issue adds named rooms on the same lists.

/// A room's identity within one hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoomId(pub u32);

/// The lobby: the room of every client that never joined another (v1's
/// one group). It always exists.
pub const LOBBY: RoomId = RoomId(0);

/// Member lists, one per room.
#[derive(Debug)]
pub struct Rooms {
    /// `members[room]`: table slots of the room's members, in no order.
    members: Vec<Vec<u32>>,
}

impl Default for Rooms {
    fn default() -> Rooms {
        Rooms::new()
    }
}

impl Rooms {
    /// Just the lobby, empty.
    pub fn new() -> Rooms {
        Rooms {
            members: vec![Vec::new()],
        }
    }

    /// Like [`Rooms::new`], with room for `reserve` lobby members up front.
    pub fn with_capacity(reserve: usize) -> Rooms {
        Rooms {
            members: vec![Vec::with_capacity(reserve)],
        }
    }

    /// Adds slot `key` to `room`; returns its position in the member list.
    pub fn add(&mut self, room: RoomId, key: u32) -> u32 {
        let list = &mut self.members[room.0 as usize];
        list.push(key);
        (list.len() - 1) as u32
    }

    /// Removes the member at `position` of `room`. Returns the slot of the
    /// member that moved into that position, whose stored position must be
    /// updated to `position`, if any moved.
    pub fn remove(&mut self, room: RoomId, position: u32) -> Option<u32> {
        let list = &mut self.members[room.0 as usize];
        let position = position as usize;
        if position >= list.len() {
            return None;
        }
        list.swap_remove(position);
        list.get(position).copied()
    }

    /// The slots of `room`'s members.
    pub fn members(&self, room: RoomId) -> &[u32] {
        self.members
            .get(room.0 as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Empties every room.
    pub fn clear(&mut self) {
        for list in &mut self.members {
            list.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_moves_the_last_member_into_the_gap() {
        let mut r = Rooms::new();
        assert_eq!(r.add(LOBBY, 10), 0);
        assert_eq!(r.add(LOBBY, 11), 1);
        assert_eq!(r.add(LOBBY, 12), 2);
        assert_eq!(r.remove(LOBBY, 0), Some(12));
        assert_eq!(r.members(LOBBY), &[12, 11]);
        assert_eq!(r.remove(LOBBY, 1), None);
        assert_eq!(r.members(LOBBY), &[12]);
        assert_eq!(r.remove(LOBBY, 5), None);
        assert_eq!(r.members(RoomId(9)), &[] as &[u32]);
    }
}
