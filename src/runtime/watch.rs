//! The periodic check that the relay's address is still its own.
//!
//! The loops' steering program already keeps a socket that joins their
//! SO_REUSEPORT group from getting anything. What it cannot stop, a
//! process of the same user can still do on the relay's port: connect a
//! socket it added to the group (the kernel then prefers it for datagrams
//! from that peer), or bind a more specific address the relay's wildcard
//! covers. So every [`CHECK_INTERVAL`] the supervisor reads the kernel's
//! socket tables and reports every foreign socket on the address (an idle
//! member of the group too: harmless, but nothing should be there): the
//! `udphub_foreign_sockets` gauge, and one warning per new one, naming
//! its process. Cost: reading `/proc/net/udp` and `udp6` (one line per
//! UDP socket on the host), on the supervisor's thread, never a loop's.

use std::time::Duration;

use metrics::Gauge;

use crate::net::holders::{self, Claim};

/// How often the address is checked: often enough that an alert follows
/// within seconds, rarely enough that the tables' reads cost nothing.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Foreign sockets reported at once, at most (a flood of them is one
/// warning with a count, not thousands of lines).
const MAX_REPORTED: usize = 1024;

/// The relay's claim, and what the last check found.
pub struct AddressWatch {
    /// The address and the relay's own sockets.
    claim: Claim,
    /// `udphub_foreign_sockets`.
    gauge: Gauge,
    /// Inodes of the foreign sockets already warned about (those of the
    /// last check: one that closes and comes back is reported again).
    known: Vec<u64>,
    /// The tables could not be read: said once, not every interval.
    unreadable_said: bool,
}

impl AddressWatch {
    /// Watches `claim`; the gauge starts at 0.
    pub fn new(claim: Claim) -> AddressWatch {
        metrics::describe_gauge!(
            "udphub_foreign_sockets",
            "sockets of other processes on the relay's address, or on a more specific address its wildcard covers, checked every 2 s with --threads above 1 (should be 0: such a socket may take datagrams meant for the relay)"
        );
        let gauge = metrics::gauge!("udphub_foreign_sockets");
        gauge.set(0.0);
        AddressWatch {
            claim,
            gauge,
            known: Vec::new(),
            unreadable_said: false,
        }
    }

    /// Reads the kernel's tables once: sets the gauge and warns about each
    /// foreign socket not seen at the last check.
    pub fn check(&mut self) {
        let mut foreign = match self.claim.foreign() {
            Ok(f) => f,
            Err(e) => {
                if !std::mem::replace(&mut self.unreadable_said, true) {
                    tracing::warn!(
                        event = "holders_unreadable",
                        addr = %self.claim.addr(),
                        error = %e,
                        "udphub cannot check that no other process shares {}: {e}",
                        self.claim.addr()
                    );
                }
                return;
            }
        };
        self.gauge.set(foreign.len() as f64);
        foreign.truncate(MAX_REPORTED);
        let new: Vec<_> = foreign
            .iter()
            .filter(|e| !self.known.contains(&e.inode))
            .cloned()
            .collect();
        if !new.is_empty() {
            let holders = holders::describe(&new, true);
            tracing::warn!(
                event = "shared_address",
                addr = %self.claim.addr(),
                holders = %holders,
                "another process holds a socket on the relay's address {}: {} (it may take datagrams meant for the relay: stop it, and run the relay as a user of its own; see docs/SECURITY.md)",
                self.claim.addr(),
                holders
            );
        }
        self.known = foreign.into_iter().map(|e| e.inode).collect();
    }
}
