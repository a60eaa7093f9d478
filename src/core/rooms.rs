//! Rooms: their names, and per-room member lists — what makes fan-out
//! cost O(room), never O(table).
//!
//! Each room keeps a dense `Vec` of its members' table slots; each client
//! remembers its position in that `Vec`, so joining and leaving are O(1)
//! (`swap_remove`, then the one moved member's position is fixed). A
//! message walks only its room's list.
//!
//! The lobby ([`LOBBY`], the room with the empty name) always exists: it is
//! where every client that never joined lives, v1's one group. Named rooms
//! are made by their first join and freed when their last member leaves;
//! their ids are reused. Both caps (`--max-rooms`, `--max-room-clients`)
//! are checked here, against the relay's counts ([`Census`]): every member
//! added or removed here is told to it.
//!
//! A fan-out that spans several loop passes (sliced, or parked on a full
//! send buffer: `runtime::relay`) walks its room's list by position, with a
//! **cursor** kept here so that members leaving meanwhile never make it
//! skip anyone: the list is kept as `[reached | not yet reached]`, and a
//! member leaving the reached part is replaced by the last reached member,
//! whose place the last member of the list takes (the cursor moves back by
//! one). Members who join meanwhile are appended and may get the message
//! too; nobody who left is reached; no membership is reached twice (one
//! reached who leaves and joins again meanwhile is appended as a new
//! member, and may get the message again). Each room id
//! also has an **incarnation**, bumped when a freed id is reused, so a
//! parked fan-out never reaches the members of a newer room.

use hashbrown::HashMap;

use crate::core::census::Census;

/// A room's identity within one hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoomId(pub u32);

/// The lobby: the room of every client that never joined another (v1's
/// one group). It always exists.
pub const LOBBY: RoomId = RoomId(0);

/// The longest room name.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `name` is a valid room name: 1–64 bytes of `A-Z a-z 0-9 _ . : -`.
pub fn valid_name(name: &[u8]) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Why a room can't take one more member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `--max-rooms` named rooms exist already.
    Rooms,
    /// The room has `--max-room-clients` members.
    Members,
}

/// A room appearing or going away here: what a cluster node subscribes
/// to and unsubscribes from, and what the other loops of the relay hand
/// its messages by (see [`Rooms::track_changes`]). The lobby (the empty
/// name) always exists, but it is reported too, as it gets its first
/// member and loses its last: a loop whose lobby is empty needs none of
/// the lobby's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomChange {
    /// The room got its first member here.
    Opened(Box<[u8]>),
    /// Its last member here left.
    Closed(Box<[u8]>),
}

/// The rooms and their member lists.
#[derive(Debug)]
pub struct Rooms {
    /// `members[room]`: table slots of the room's members, in no order.
    members: Vec<Vec<u32>>,
    /// `names[room]`: its name (empty for the lobby and for free ids).
    names: Vec<Box<[u8]>>,
    /// Named rooms by name.
    by_name: HashMap<Box<[u8]>, RoomId>,
    /// Ids of freed rooms, to reuse.
    free: Vec<u32>,
    /// `--max-rooms`: named rooms at once.
    max_rooms: usize,
    /// `--max-room-clients`: members of one named room.
    max_members: usize,
    /// Rooms opened and closed since last taken, if tracked.
    changes: Option<Vec<RoomChange>>,
    /// `cursors[room]`: where the fan-out in progress in the room has got
    /// to (its members before it were reached), or [`NO_CURSOR`].
    cursors: Vec<u32>,
    /// `incarnations[room]`: a number new each time the id is given to a
    /// room, so a parked fan-out can tell its room from a later one.
    incarnations: Vec<u32>,
    /// The next room's incarnation (wraps: a parked fan-out lives far
    /// shorter than 2^32 rooms opening).
    next_incarnation: u32,
}

/// No fan-out in progress in the room.
const NO_CURSOR: u32 = u32::MAX;

/// Members whose position in their room's list changed on a removal:
/// `(slot, new position)`, at most two (see [`Rooms::remove`]).
pub type Moved = [Option<(u32, u32)>; 2];

impl Default for Rooms {
    fn default() -> Rooms {
        Rooms::new(usize::MAX, usize::MAX, 0)
    }
}

impl Rooms {
    /// Just the lobby (with room for `reserve` members up front), admitting
    /// up to `max_rooms` named rooms of up to `max_members` each.
    pub fn new(max_rooms: usize, max_members: usize, reserve: usize) -> Rooms {
        Rooms {
            members: vec![Vec::with_capacity(reserve)],
            names: vec![Box::default()],
            by_name: HashMap::new(),
            free: Vec::new(),
            max_rooms,
            max_members,
            changes: None,
            cursors: vec![NO_CURSOR],
            incarnations: vec![0],
            next_incarnation: 1,
        }
    }

    /// Writes once over the lobby's member list up to its capacity (see
    /// [`crate::core::table::Table::prefault`]); only while it is empty.
    pub fn prefault_lobby(&mut self) {
        if let Some(list) = self.members.first_mut().filter(|l| l.is_empty()) {
            let capacity = list.capacity();
            list.resize(capacity, 0);
            list.clear();
        }
    }

    /// Changes the caps of a running relay: rooms and members beyond new,
    /// lower caps stay; only joins are refused.
    pub fn set_limits(&mut self, max_rooms: usize, max_members: usize) {
        self.max_rooms = max_rooms;
        self.max_members = max_members;
    }

    /// Records from now on every named room opened and closed, for
    /// [`take_changes`](Self::take_changes). Off by default: only a
    /// cluster node needs it.
    pub fn track_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    /// The rooms opened and closed since the last call, in order.
    pub fn take_changes(&mut self) -> Vec<RoomChange> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Named rooms now (the lobby is not counted).
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether only the lobby exists.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The room called `name` (the empty name is the lobby), if it exists.
    pub fn find(&self, name: &[u8]) -> Option<RoomId> {
        if name.is_empty() {
            return Some(LOBBY);
        }
        self.by_name.get(name).copied()
    }

    /// The room called `name` with room for one more member in the relay
    /// (`census`), made here if need be. `name` must be [`valid_name`] or
    /// empty (the lobby, never full).
    pub fn open(&mut self, name: &[u8], census: &dyn Census) -> Result<RoomId, Full> {
        if let Some(room) = self.find(name) {
            if room != LOBBY && census.members(name) >= self.max_members {
                return Err(Full::Members);
            }
            return Ok(room);
        }
        // Not open here; it may be on another loop of the relay, with
        // members, and then it is not a new room for `--max-rooms`.
        let members = census.members(name);
        if self.max_members == 0 || members >= self.max_members {
            return Err(Full::Members);
        }
        if members == 0 && census.rooms() >= self.max_rooms {
            return Err(Full::Rooms);
        }
        let name: Box<[u8]> = name.into();
        let incarnation = self.next_incarnation;
        self.next_incarnation = incarnation.wrapping_add(1);
        let room = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = name.clone();
                self.cursors[id as usize] = NO_CURSOR;
                self.incarnations[id as usize] = incarnation;
                RoomId(id)
            }
            None => {
                self.members.push(Vec::new());
                self.names.push(name.clone());
                self.cursors.push(NO_CURSOR);
                self.incarnations.push(incarnation);
                RoomId((self.members.len() - 1) as u32)
            }
        };
        if let Some(changes) = &mut self.changes {
            changes.push(RoomChange::Opened(name.clone()));
        }
        self.by_name.insert(name, room);
        Ok(room)
    }

    /// The name of `room` (empty for the lobby).
    pub fn name(&self, room: RoomId) -> &[u8] {
        self.names.get(room.0 as usize).map_or(&[][..], |n| n)
    }

    /// Adds slot `key` to `room`, and tells `census`; returns its position
    /// in the member list.
    pub fn add(&mut self, room: RoomId, key: u32, census: &mut dyn Census) -> u32 {
        if room != LOBBY {
            census.member_added(self.name(room));
        }
        let list = &mut self.members[room.0 as usize];
        list.push(key);
        if room == LOBBY && list.len() == 1 {
            if let Some(changes) = &mut self.changes {
                changes.push(RoomChange::Opened(Box::default()));
            }
        }
        (list.len() - 1) as u32
    }

    /// Removes the member at `position` of `room`, tells `census`, and
    /// frees a named room left empty. Returns the members that moved, with
    /// their new positions, which the caller must store: one (the last
    /// member, into the gap), or, when the room has a fan-out in progress
    /// and the member leaving was already reached, two (the last reached
    /// member into the gap, the last member into its place), so that the
    /// members not yet reached all stay at or after the cursor.
    pub fn remove(&mut self, room: RoomId, position: u32, census: &mut dyn Census) -> Moved {
        let mut moved = [None, None];
        let Some(list) = self.members.get_mut(room.0 as usize) else {
            return moved;
        };
        let cursor = &mut self.cursors[room.0 as usize];
        let mut at = position as usize;
        if at >= list.len() {
            return moved;
        }
        if *cursor != NO_CURSOR && position < *cursor {
            // Keep [reached | not yet reached]: the last reached member
            // takes the gap, the gap moves to the end of the reached part.
            let last_reached = (*cursor - 1) as usize;
            if at != last_reached {
                list.swap(at, last_reached);
                moved[0] = Some((list[at], position));
            }
            at = last_reached;
            *cursor -= 1;
        }
        list.swap_remove(at);
        if let Some(&key) = list.get(at) {
            moved[1] = Some((key, at as u32));
        }
        if room != LOBBY {
            census.member_removed(&self.names[room.0 as usize]);
        }
        if list.is_empty() && room == LOBBY {
            if let Some(changes) = &mut self.changes {
                changes.push(RoomChange::Closed(Box::default()));
            }
        }
        if list.is_empty() && room != LOBBY {
            let name = std::mem::take(&mut self.names[room.0 as usize]);
            self.by_name.remove(&name);
            // Give the memory of a big room back; a small one keeps its Vec.
            list.shrink_to(16);
            self.free.push(room.0);
            *cursor = NO_CURSOR;
            if let Some(changes) = &mut self.changes {
                changes.push(RoomChange::Closed(name));
            }
        }
        moved
    }

    /// Where the fan-out in progress in `room` has got to, if one is.
    pub fn cursor(&self, room: RoomId) -> Option<u32> {
        match self.cursors.get(room.0 as usize) {
            Some(&c) if c != NO_CURSOR => Some(c),
            _ => None,
        }
    }

    /// Starts, advances (`Some`) or ends (`None`) the fan-out in progress
    /// in `room`. A position past the list's end is kept as its end.
    pub fn set_cursor(&mut self, room: RoomId, at: Option<u32>) {
        let len = self.members(room).len() as u32;
        if let Some(c) = self.cursors.get_mut(room.0 as usize) {
            *c = at.map_or(NO_CURSOR, |at| at.min(len));
        }
    }

    /// `room`'s incarnation: changes when its id is reused by a new room.
    pub fn incarnation(&self, room: RoomId) -> u32 {
        self.incarnations.get(room.0 as usize).copied().unwrap_or(0)
    }

    /// The slots of `room`'s members.
    pub fn members(&self, room: RoomId) -> &[u32] {
        self.members
            .get(room.0 as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// Empties every room, telling `census`; only the lobby remains.
    pub fn clear(&mut self, census: &mut dyn Census) {
        for (name, room) in &self.by_name {
            for _ in 0..self.members(*room).len() {
                census.member_removed(name);
            }
        }
        if let Some(changes) = &mut self.changes {
            changes.extend(self.by_name.keys().map(|n| RoomChange::Closed(n.clone())));
            if !self.members[LOBBY.0 as usize].is_empty() {
                changes.push(RoomChange::Closed(Box::default()));
            }
        }
        self.members.truncate(1);
        self.members[0].clear();
        self.cursors.truncate(1);
        self.cursors[0] = NO_CURSOR;
        self.incarnations.truncate(1);
        self.names.truncate(1);
        self.by_name.clear();
        self.free.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::census::{Census, LocalCensus};

    #[test]
    fn tracked_changes_say_when_a_room_opens_and_closes() {
        let mut rooms = Rooms::default();
        let mut c = LocalCensus::default();
        let untracked = rooms.open(b"quiet", &c).unwrap();
        rooms.add(untracked, 9, &mut c);
        assert!(rooms.take_changes().is_empty(), "off by default");
        rooms.track_changes();
        let red = rooms.open(b"red", &c).unwrap();
        let a = rooms.add(red, 1, &mut c);
        let b = rooms.add(red, 2, &mut c);
        assert_eq!(rooms.open(b"red", &c), Ok(red));
        assert_eq!(
            rooms.take_changes(),
            vec![RoomChange::Opened(b"red"[..].into())]
        );
        rooms.remove(red, b, &mut c);
        assert!(rooms.take_changes().is_empty(), "one member left");
        rooms.remove(red, a, &mut c);
        let blue = rooms.open(b"blue", &c).unwrap();
        rooms.add(blue, 3, &mut c);
        assert_eq!(
            rooms.take_changes(),
            vec![
                RoomChange::Closed(b"red"[..].into()),
                RoomChange::Opened(b"blue"[..].into())
            ]
        );
        rooms.clear(&mut c);
        let mut closed = rooms.take_changes();
        closed.sort_by_key(|c| match c {
            RoomChange::Opened(n) | RoomChange::Closed(n) => n.clone(),
        });
        assert_eq!(
            closed,
            vec![
                RoomChange::Closed(b"blue"[..].into()),
                RoomChange::Closed(b"quiet"[..].into())
            ]
        );
    }

    #[test]
    fn the_lobby_is_reported_as_it_fills_and_empties() {
        let mut r = Rooms::default();
        let mut c = LocalCensus::default();
        r.track_changes();
        let a = r.add(LOBBY, 1, &mut c);
        r.add(LOBBY, 2, &mut c);
        assert_eq!(r.take_changes(), vec![RoomChange::Opened(Box::default())]);
        r.remove(LOBBY, a, &mut c);
        assert!(r.take_changes().is_empty(), "one member left");
        r.remove(LOBBY, 0, &mut c);
        assert_eq!(r.take_changes(), vec![RoomChange::Closed(Box::default())]);
        r.add(LOBBY, 3, &mut c);
        r.take_changes();
        r.clear(&mut c);
        assert_eq!(r.take_changes(), vec![RoomChange::Closed(Box::default())]);
    }

    #[test]
    fn remove_moves_the_last_member_into_the_gap() {
        let mut r = Rooms::default();
        let mut c = LocalCensus::default();
        assert_eq!(r.add(LOBBY, 10, &mut c), 0);
        assert_eq!(r.add(LOBBY, 11, &mut c), 1);
        assert_eq!(r.add(LOBBY, 12, &mut c), 2);
        assert_eq!(r.remove(LOBBY, 0, &mut c), [None, Some((12, 0))]);
        assert_eq!(r.members(LOBBY), &[12, 11]);
        assert_eq!(r.remove(LOBBY, 1, &mut c), [None, None]);
        assert_eq!(r.members(LOBBY), &[12]);
        assert_eq!(r.remove(LOBBY, 5, &mut c), [None, None]);
        assert_eq!(r.members(RoomId(9)), &[] as &[u32]);
    }

    /// Applies a removal's moves to a model of the clients' positions.
    fn apply(pos: &mut std::collections::HashMap<u32, u32>, moved: Moved) {
        for (key, at) in moved.into_iter().flatten() {
            pos.insert(key, at);
        }
    }

    #[test]
    fn a_member_leaving_behind_the_cursor_never_makes_it_skip_anyone() {
        let mut r = Rooms::default();
        let mut c = LocalCensus::default();
        let mut pos = std::collections::HashMap::new();
        for key in 0..6 {
            pos.insert(key, r.add(LOBBY, key, &mut c));
        }
        r.set_cursor(LOBBY, Some(3)); // 0, 1, 2 reached
        let at = pos.remove(&0).unwrap();
        apply(&mut pos, r.remove(LOBBY, at, &mut c));
        // 2 (last reached) took 0's place, 5 (last) took 2's: [2 1 5 | 3 4]
        assert_eq!(r.members(LOBBY), &[2, 1, 5, 3, 4]);
        assert_eq!(r.cursor(LOBBY), Some(2));
        for (&key, &at) in &pos {
            assert_eq!(r.members(LOBBY)[at as usize], key);
        }
        // Leaving ahead of the cursor: the plain swap.
        let at = pos.remove(&3).unwrap();
        apply(&mut pos, r.remove(LOBBY, at, &mut c));
        assert_eq!(r.members(LOBBY), &[2, 1, 5, 4]);
        assert_eq!(r.cursor(LOBBY), Some(2));
        r.set_cursor(LOBBY, None);
        assert_eq!(r.cursor(LOBBY), None);
    }

    #[test]
    fn a_reused_id_is_a_new_incarnation_without_a_cursor() {
        let mut r = Rooms::default();
        let mut c = LocalCensus::default();
        let a = r.open(b"a", &c).unwrap();
        r.add(a, 1, &mut c);
        r.set_cursor(a, Some(1));
        let first = r.incarnation(a);
        r.remove(a, 0, &mut c);
        let b = r.open(b"b", &c).unwrap();
        assert_eq!(a, b);
        assert_ne!(r.incarnation(b), first);
        assert_eq!(r.cursor(b), None);
    }

    proptest::proptest! {
        /// A walk by cursor while members join and leave reaches every
        /// member present from its start to its end exactly once, and
        /// nobody after they left.
        #[test]
        fn a_cursor_walk_reaches_every_member_that_stays_once(
            start in 1u32..40,
            steps in proptest::collection::vec((0u8..4, 0u32..1000), 0..120),
        ) {
            let mut r = Rooms::default();
            let mut c = LocalCensus::default();
            let mut pos = std::collections::HashMap::new();
            let mut next_key = 0u32;
            for _ in 0..start {
                pos.insert(next_key, r.add(LOBBY, next_key, &mut c));
                next_key += 1;
            }
            let present_at_start: std::collections::HashSet<u32> = pos.keys().copied().collect();
            let mut left = std::collections::HashSet::new();
            let mut reached = Vec::new();
            r.set_cursor(LOBBY, Some(0));
            for (what, n) in steps {
                match what {
                    0 => {
                        pos.insert(next_key, r.add(LOBBY, next_key, &mut c));
                        next_key += 1;
                    }
                    1 if !pos.is_empty() => {
                        let mut keys: Vec<u32> = pos.keys().copied().collect();
                        keys.sort();
                        let key = keys[n as usize % keys.len()];
                        let at = pos.remove(&key).unwrap();
                        apply(&mut pos, r.remove(LOBBY, at, &mut c));
                        left.insert(key);
                    }
                    _ => {
                        // Reach up to n % 4 members.
                        let cur = r.cursor(LOBBY).unwrap();
                        let list = r.members(LOBBY);
                        let end = (cur as usize + n as usize % 4).min(list.len());
                        reached.extend_from_slice(&list[cur as usize..end]);
                        r.set_cursor(LOBBY, Some(end as u32));
                    }
                }
                for (&key, &at) in &pos {
                    proptest::prop_assert_eq!(r.members(LOBBY)[at as usize], key);
                }
            }
            let cur = r.cursor(LOBBY).unwrap() as usize;
            reached.extend_from_slice(&r.members(LOBBY)[cur..]);
            let mut seen = std::collections::HashSet::new();
            for key in &reached {
                proptest::prop_assert!(seen.insert(*key), "{} reached twice", key);
            }
            for key in present_at_start {
                if !left.contains(&key) {
                    proptest::prop_assert!(seen.contains(&key), "{} missed", key);
                }
            }
        }
    }

    #[test]
    fn names_follow_the_grammar() {
        for ok in [&b"a"[..], b"Ops-1", b"game:42", b"x.y_z", &[b'a'; 64]] {
            assert!(valid_name(ok), "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"a b",
            b"caf\xc3\xa9",
            b"a^b",
            b"a/b",
            &[b'a'; 65],
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn rooms_are_made_on_first_join_and_freed_when_empty() {
        let mut r = Rooms::new(2, 2, 0);
        let mut census = LocalCensus::default();
        let a = r.open(b"a", &census).unwrap();
        assert_eq!(r.open(b"a", &census), Ok(a));
        assert_eq!(r.name(a), b"a");
        r.add(a, 1, &mut census);
        r.add(a, 2, &mut census);
        assert_eq!(r.open(b"a", &census), Err(Full::Members));
        let b = r.open(b"b", &census).unwrap();
        r.add(b, 3, &mut census);
        assert_eq!(r.open(b"c", &census), Err(Full::Rooms));
        assert_eq!(r.len(), 2);
        // The lobby is never full.
        assert_eq!(r.open(b"", &census), Ok(LOBBY));
        r.remove(b, 0, &mut census);
        assert_eq!((r.len(), r.find(b"b")), (1, None));
        let c = r.open(b"c", &census).unwrap();
        assert_eq!(c, b, "a freed id is reused");
        assert_eq!(r.name(c), b"c");
        r.clear(&mut census);
        assert!(r.is_empty());
    }

    /// With the relay's counts (what another loop's members add to), the
    /// caps are the relay's: a room full elsewhere is full here, and a room
    /// open elsewhere is no new room.
    #[test]
    fn the_caps_count_the_whole_relay() {
        let mut r = Rooms::new(2, 2, 0);
        let mut census = LocalCensus::default();
        census.member_added(b"a");
        census.member_added(b"a");
        census.member_added(b"b");
        census.member_added(b"c");
        assert_eq!(r.open(b"a", &census), Err(Full::Members), "full elsewhere");
        assert_eq!(
            r.open(b"d", &census),
            Err(Full::Rooms),
            "three rooms elsewhere"
        );
        let b = r
            .open(b"b", &census)
            .expect("open elsewhere: not a new room");
        r.add(b, 1, &mut census);
        assert_eq!(census.members(b"b"), 2);
        assert_eq!(r.open(b"b", &census), Err(Full::Members));
        r.remove(b, 0, &mut census);
        assert_eq!((census.members(b"b"), census.rooms()), (1, 3));
    }
}
