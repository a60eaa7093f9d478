//! Admission: the one step that decides whether a datagram reaches the
//! hub's logic, and the owner of every reason for dropping one.
//!
//! It runs first, before the hub touches any state, so the hub's own code
//! has no drop paths and every drop is counted in exactly one place, with
//! exactly one [`DropReason`]. Checks that later work adds (rate limits,
//! source cookies, per-IP caps) go here too, as new reasons — one line in
//! the table below.

use crate::core::addr::RawAddr;
use crate::core::protocol::{self, Kind};
use crate::core::rooms::{RoomId, LOBBY};

labelled_enum! {
    /// Why a datagram was dropped unrelayed (`udphub_dropped_total{reason}`).
    pub enum DropReason {
        /// Longer than `--max-datagram` (the kernel cut it: `MSG_TRUNC`).
        Oversize => "oversize",
        /// From a new client while the table is at `--max-clients`.
        TableFull => "table_full",
        /// The kernel reported a source address that is not IPv4/IPv6.
        BadSource => "bad_source",
        /// With a room secret and a closed lobby: anything but a join or a
        /// quit from a client that is not in a room.
        LobbyClosed => "lobby_closed",
    }
}

/// A datagram as the runtime read it, before any check.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// Its bytes (at most `--max-datagram` of them).
    pub data: &'a [u8],
    /// Who sent it; `None` if the kernel reported an address family we
    /// cannot answer.
    pub source: Option<RawAddr>,
    /// It was longer than `--max-datagram` and was cut.
    pub truncated: bool,
}

/// A datagram that passed admission: where from, what it asks, and the
/// sender's table slot if it is already a client (looked up once, here).
#[derive(Debug, Clone, Copy)]
pub struct Admitted<'a> {
    /// The sender.
    pub source: RawAddr,
    /// What the datagram asks.
    pub kind: Kind<'a>,
    /// The sender's slot in the client table, if it is a client.
    pub client: Option<u32>,
    /// The sender's room (the lobby for a newcomer).
    pub room: RoomId,
}

/// The admission limits.
#[derive(Debug, Clone)]
pub struct Admission {
    /// `--max-clients`: a datagram that would register one more is dropped.
    max_clients: usize,
    /// Whether the lobby relays (false: only room members talk).
    lobby_open: bool,
}

impl Admission {
    /// Admission with a cap of `max_clients` clients, and an open or a
    /// closed lobby.
    pub fn new(max_clients: usize, lobby_open: bool) -> Admission {
        Admission {
            max_clients,
            lobby_open,
        }
    }

    /// Checks what any server needs of a datagram: an answerable source,
    /// and not cut short. The echo server stops here; the relay goes on
    /// to [`admit`](Self::admit).
    pub fn envelope<'a>(arrival: &Arrival<'a>) -> Result<(RawAddr, &'a [u8]), DropReason> {
        let source = arrival.source.ok_or(DropReason::BadSource)?;
        if arrival.truncated {
            return Err(DropReason::Oversize);
        }
        Ok((source, arrival.data))
    }

    /// Checks a datagram for the relay. `lookup` finds the sender's table
    /// slot and room; `clients` is how many clients the table holds now.
    pub fn admit<'a>(
        &mut self,
        arrival: &Arrival<'a>,
        lookup: impl FnOnce(&RawAddr) -> Option<(u32, RoomId)>,
        clients: usize,
    ) -> Result<Admitted<'a>, DropReason> {
        let (source, data) = Admission::envelope(arrival)?;
        let kind = protocol::classify(data);
        let found = lookup(&source);
        let (client, room) = match found {
            Some((key, room)) => (Some(key), room),
            None => (None, LOBBY),
        };
        let talks = matches!(
            kind,
            Kind::Heartbeat | Kind::Message(_) | Kind::TimeoutQuery
        );
        if !self.lobby_open && room == LOBBY && talks {
            return Err(DropReason::LobbyClosed);
        }
        // A quit from a stranger registers nobody: it is harmless, and
        // counted as a quit rather than a drop, as in v1.
        let registers = client.is_none() && !matches!(kind, Kind::Quit);
        if registers && clients >= self.max_clients {
            return Err(DropReason::TableFull);
        }
        Ok(Admitted {
            source,
            kind,
            client,
            room,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn from(port: u16) -> Option<RawAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)).into())
    }

    fn arrival(data: &[u8]) -> Arrival<'_> {
        Arrival {
            data,
            source: from(1),
            truncated: false,
        }
    }

    #[test]
    fn labels_are_unique_and_indexed_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<_> = DropReason::ALL.iter().map(|r| r.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DropReason::COUNT);
    }

    #[test]
    fn envelope_drops_cut_and_unanswerable_datagrams() {
        let cut = Arrival {
            truncated: true,
            ..arrival(b"x")
        };
        assert_eq!(Admission::envelope(&cut), Err(DropReason::Oversize));
        let nowhere = Arrival {
            source: None,
            ..arrival(b"x")
        };
        assert_eq!(Admission::envelope(&nowhere), Err(DropReason::BadSource));
        assert!(Admission::envelope(&arrival(b"x")).is_ok());
    }

    #[test]
    fn a_full_table_refuses_newcomers_but_not_members_or_quits() {
        let mut a = Admission::new(2, true);
        let stranger = |_: &RawAddr| None;
        let member = |_: &RawAddr| Some((7, LOBBY));
        for d in [&b"^hb^"[..], b"hello", b""] {
            assert_eq!(
                a.admit(&arrival(d), stranger, 2).map(|_| ()),
                Err(DropReason::TableFull),
                "{d:?}"
            );
            assert_eq!(a.admit(&arrival(d), member, 2).unwrap().client, Some(7));
            assert!(a.admit(&arrival(d), stranger, 1).is_ok());
        }
        let quit = a.admit(&arrival(b"quit"), stranger, 2).unwrap();
        assert_eq!(quit.kind, Kind::Quit);
    }

    #[test]
    fn a_closed_lobby_lets_only_joins_quits_and_room_members_through() {
        let mut a = Admission::new(10, false);
        let stranger = |_: &RawAddr| None;
        let in_lobby = |_: &RawAddr| Some((1, LOBBY));
        let in_room = |_: &RawAddr| Some((1, RoomId(3)));
        for d in [&b"^hb^"[..], b"hi", b"^timeout^"] {
            assert_eq!(
                a.admit(&arrival(d), stranger, 0).map(|_| ()),
                Err(DropReason::LobbyClosed)
            );
            assert_eq!(
                a.admit(&arrival(d), in_lobby, 1).map(|_| ()),
                Err(DropReason::LobbyClosed)
            );
            assert!(a.admit(&arrival(d), in_room, 1).is_ok());
        }
        assert!(a.admit(&arrival(b"^join^r^t"), stranger, 0).is_ok());
        assert!(a.admit(&arrival(b"quit"), in_lobby, 1).is_ok());
    }
}
