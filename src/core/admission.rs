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

labelled_enum! {
    /// Why a datagram was dropped unrelayed (`udphub_dropped_total{reason}`).
    pub enum DropReason {
        /// Longer than `--max-datagram` (the kernel cut it: `MSG_TRUNC`).
        Oversize => "oversize",
        /// From a new client while the table is at `--max-clients`.
        TableFull => "table_full",
        /// The kernel reported a source address that is not IPv4/IPv6.
        BadSource => "bad_source",
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
}

/// The admission limits.
#[derive(Debug, Clone)]
pub struct Admission {
    /// `--max-clients`: a datagram that would register one more is dropped.
    max_clients: usize,
}

impl Admission {
    /// Admission with a cap of `max_clients` clients.
    pub fn new(max_clients: usize) -> Admission {
        Admission { max_clients }
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
    /// slot; `clients` is how many clients the table holds now.
    pub fn admit<'a>(
        &mut self,
        arrival: &Arrival<'a>,
        lookup: impl FnOnce(&RawAddr) -> Option<u32>,
        clients: usize,
    ) -> Result<Admitted<'a>, DropReason> {
        let (source, data) = Admission::envelope(arrival)?;
        let kind = protocol::classify(data);
        let client = lookup(&source);
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
        let mut a = Admission::new(2);
        let stranger = |_: &RawAddr| None;
        let member = |_: &RawAddr| Some(7);
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
}
