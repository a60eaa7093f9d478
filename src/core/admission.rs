//! Admission: the one step that decides whether a datagram reaches the
//! hub's logic, and the owner of every reason for dropping one.
//!
//! It runs first, before the hub touches any state, so the hub's own code
//! has no drop paths and every drop is counted in exactly one place, with
//! exactly one [`DropReason`]. Checks that later work adds (rate limits,
//! source cookies, per-IP caps) go here too, as new reasons — one line in
//! the table below.

use crate::core::addr::RawAddr;
use crate::core::cookie::CookieKey;
use crate::core::limits::{CookieBudget, LocalBudget, Rate};
use crate::core::protocol::{self, Kind};
use crate::core::rooms::LOBBY;
use crate::core::table::Table;

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
        /// Verify mode: from a source that has not proven its address (it
        /// was sent a cookie if the datagram was long enough).
        Unverified => "unverified",
        /// Verify mode: a cookie that is wrong or too old (the sender is sent
        /// a fresh one if the datagram was long enough).
        BadCookie => "bad_cookie",
        /// Verify mode: a member's `quit`, `^join^`, heartbeat or timeout
        /// question without its cookie: it proves nothing, so it changes
        /// nothing (a member's liveness needs its cookie).
        Unproven => "unproven",
        /// Verify mode: no cookie sent, the per-prefix or global budget for
        /// cookie replies is spent.
        CookieBudget => "cookie_budget",
        /// Over the client's `--client-rate`.
        RateLimited => "rate_limited",
        /// A new client from an IP at `--max-clients-per-ip`.
        IpFull => "ip_full",
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
    /// Whether it shows the sender is alive at its address: always outside
    /// verify mode; in verify mode only with the sender's cookie, so that
    /// an off-path spoofer cannot keep a silent member alive.
    pub proves_liveness: bool,
    /// Verify mode: it carried a good cookie of the last epoch, which ages
    /// out at the next: the member is due a fresh one.
    pub cookie_aging: bool,
}

/// What admission decided.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// On to the hub.
    Admit(Admitted<'a>),
    /// Dropped, for this reason.
    Drop(DropReason),
    /// Verify mode: dropped for this reason (unverified, or a bad cookie),
    /// and the sender is to be sent a cookie (the datagram was at least
    /// [`protocol::HELLO_LEN`] long, and the budget allowed it).
    Challenge(DropReason),
}

/// Verify mode's state: the cookie key and the budget for cookie replies.
#[derive(Debug)]
pub struct Verify {
    /// Makes and checks cookies.
    pub key: CookieKey,
    /// Cookie replies per /24 (IPv4) or /56 (IPv6), sharing the total
    /// fairly (see [`crate::core::limits::PrefixLimiter`]): this loop's
    /// own, or the relay's shared by its loops.
    budget: Box<dyn CookieBudget>,
}

/// Cookie replies each /24 or /56 may get by default (`--cookie-rate`): 20
/// a second — enough for the clients behind one NAT, nothing for an
/// amplifier (each reply is shorter than the hello that asked for it).
pub const COOKIE_PREFIX_RATE: f64 = 20.0;
/// The least burst a prefix gets (100 replies at once: a NAT's worth of
/// clients starting together; 3 KB at a victim prefix, once).
pub const COOKIE_PREFIX_BURST: f64 = 100.0;
/// Cookie replies a second in all, for the whole relay: 20,000 (each is ≤
/// the request, so this bounds only the CPU a flood of hellos costs).
/// Shared fairly between the prefixes asking.
pub const COOKIE_TOTAL_RATE: f64 = 20_000.0;
/// Prefixes the cookie budget tracks at once (~25 bytes each in the map:
/// a flood of spoofed prefixes costs at most ~3.3 MiB). 65,536 is every
/// /24 of a /8.
pub const COOKIE_PREFIXES: usize = 65_536;

impl Verify {
    /// Verify mode with this key and `budget`.
    pub fn new(key: CookieKey, budget: Box<dyn CookieBudget>) -> Verify {
        Verify { key, budget }
    }

    /// The budget for `per_sec` cookie replies a second per prefix, this
    /// loop's own, counting time from `origin`.
    pub fn local_budget(per_sec: f64, origin: std::time::Instant) -> LocalBudget {
        LocalBudget::new(
            Verify::prefix_rate(per_sec),
            COOKIE_TOTAL_RATE,
            COOKIE_PREFIXES,
            origin,
        )
    }

    /// The per-prefix budget for `per_sec` replies a second: at least
    /// [`COOKIE_PREFIX_BURST`] at once.
    pub fn prefix_rate(per_sec: f64) -> Rate {
        Rate {
            per_sec,
            burst: per_sec.max(COOKIE_PREFIX_BURST),
        }
    }

    /// Shares the relay's budget from now on (the loops of `--threads`).
    pub fn share_budget(&mut self, budget: Box<dyn CookieBudget>) {
        self.budget = budget;
    }
}

/// The admission limits.
#[derive(Debug)]
pub struct Admission {
    /// `--max-clients`: a datagram that would register one more is dropped.
    max_clients: usize,
    /// Whether the lobby relays (false: only room members talk).
    lobby_open: bool,
    /// `--verify-sources`.
    verify: Option<Verify>,
    /// `--client-rate`: tokens per wheel tick, and the burst.
    client_rate: Option<(f32, f32)>,
    /// `--max-clients-per-ip`.
    max_per_ip: Option<u32>,
}

/// The moment a datagram is admitted at, in the units each check uses.
#[derive(Debug, Clone, Copy)]
pub struct When {
    /// Wheel tick (liveness, per-client buckets).
    pub tick: u64,
    /// Nanoseconds on the hub's clock (cookie budgets).
    pub nanos: u64,
    /// The instant itself (cookie epochs count from the key's birth).
    pub at: std::time::Instant,
}

impl Admission {
    /// Admission with a cap of `max_clients` clients, and an open or a
    /// closed lobby; no verify mode, no rate limits.
    pub fn new(max_clients: usize, lobby_open: bool) -> Admission {
        Admission {
            max_clients,
            lobby_open,
            verify: None,
            client_rate: None,
            max_per_ip: None,
        }
    }

    /// Turns on verify mode.
    pub fn verify_sources(mut self, verify: Verify) -> Admission {
        self.verify = Some(verify);
        self
    }

    /// Limits each client to `per_tick` datagrams per wheel tick, `burst`
    /// at once.
    pub fn client_rate(mut self, per_tick: f32, burst: f32) -> Admission {
        self.client_rate = Some((per_tick, burst.max(1.0)));
        self
    }

    /// Caps the clients per IP address.
    pub fn max_clients_per_ip(mut self, max: u32) -> Admission {
        self.max_per_ip = Some(max);
        self
    }

    /// Changes the limits of a running relay (a reload): the client cap,
    /// the lobby, the per-client rate (`per_tick`, `burst`), the per-IP cap
    /// and, in verify mode, the cookie replies per prefix a second. Clients
    /// already in the table stay, even above a lowered cap.
    pub fn reconfigure(
        &mut self,
        max_clients: usize,
        lobby_open: bool,
        client_rate: Option<(f32, f32)>,
        max_per_ip: Option<u32>,
        cookie_rate: f64,
    ) {
        self.max_clients = max_clients;
        self.lobby_open = lobby_open;
        self.client_rate = client_rate.map(|(per_tick, burst)| (per_tick, burst.max(1.0)));
        self.max_per_ip = max_per_ip;
        if let Some(verify) = &mut self.verify {
            verify
                .budget
                .set_rate(Verify::prefix_rate(cookie_rate), COOKIE_TOTAL_RATE);
        }
    }

    /// Whether clients are rate-limited (`--client-rate`).
    pub fn limits_clients(&self) -> bool {
        self.client_rate.is_some()
    }

    /// Verify mode's state, if on.
    pub fn verify_mut(&mut self) -> Option<&mut Verify> {
        self.verify.as_mut()
    }

    /// The cookie key, in verify mode.
    pub fn cookie_key(&self) -> Option<&CookieKey> {
        self.verify.as_ref().map(|v| &v.key)
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

    /// Checks a datagram for the relay, against the client table. A
    /// member's rate-limit bucket is charged here.
    pub fn admit<'a>(
        &mut self,
        arrival: &Arrival<'a>,
        table: &mut Table,
        when: When,
    ) -> Verdict<'a> {
        let (source, data) = match Admission::envelope(arrival) {
            Ok(ok) => ok,
            Err(reason) => return Verdict::Drop(reason),
        };
        let kind = protocol::classify(data);
        let found = table
            .find(&source)
            .map(|key| (key, table.get(key).map_or(LOBBY, |c| c.room)));
        let (client, room) = match found {
            Some((key, room)) => (Some(key), room),
            None => (None, LOBBY),
        };
        let mut proves_liveness = true;
        let mut cookie_aging = false;
        if let Some(verify) = &mut self.verify {
            let age = match kind {
                Kind::Cookie { cookie, .. } => verify.key.check_age(cookie, &source, when.at),
                _ => None,
            };
            let proven = age.is_some();
            cookie_aging = age == Some(crate::core::cookie::CookieAge::Aging);
            let bad_cookie = matches!(kind, Kind::Cookie { .. }) && !proven;
            if (client.is_none() && !proven) || bad_cookie {
                // Nothing registers without a cookie, and a wrong or stale
                // one proves nothing. A datagram at least as long as the
                // answer gets a fresh cookie, within budget: how a client
                // the relay forgot (a restart, a new NAT port) or whose
                // cookie aged out finds its way back.
                let reason = if bad_cookie {
                    DropReason::BadCookie
                } else {
                    DropReason::Unverified
                };
                if data.len() < protocol::HELLO_LEN {
                    return Verdict::Drop(reason);
                }
                if !verify.budget.allow(&source, when.at) {
                    return Verdict::Drop(DropReason::CookieBudget);
                }
                return Verdict::Challenge(reason);
            }
            // A member's datagram without its cookie may be anyone's: it
            // can talk (within its rate) or ask for a cookie, but it can
            // neither move, evict nor keep alive.
            if client.is_some()
                && !proven
                && matches!(
                    kind,
                    Kind::Quit | Kind::Join { .. } | Kind::Heartbeat | Kind::TimeoutQuery
                )
            {
                return Verdict::Drop(DropReason::Unproven);
            }
            proves_liveness = proven;
        }
        if let (Some(key), Some((per_tick, burst))) = (client, self.client_rate) {
            // Charged always; but a proven heartbeat or quit is never
            // refused for it, or a spoofer spending a member's budget in
            // its name could have it expire. A proven join of the room the
            // member is in is a heartbeat too (`udphub chat` in a room
            // heartbeats that way, to be brought back if forgotten).
            let exempt = self.verify.is_some()
                && proves_liveness
                && match kind {
                    Kind::Cookie {
                        then: protocol::Proven::Register | protocol::Proven::Quit,
                        ..
                    } => true,
                    Kind::Cookie {
                        then: protocol::Proven::Join { room: name, .. },
                        ..
                    } => table.rooms().name(room) == name,
                    _ => false,
                };
            if !table.charge(key, when.tick, per_tick, burst) && !exempt {
                return Verdict::Drop(DropReason::RateLimited);
            }
        }
        let talks = matches!(
            kind,
            Kind::Heartbeat | Kind::Message(_) | Kind::TimeoutQuery | Kind::Hello(_)
        ) || matches!(
            kind,
            Kind::Cookie {
                then: protocol::Proven::Register,
                ..
            }
        );
        if !self.lobby_open && room == LOBBY && talks {
            return Verdict::Drop(DropReason::LobbyClosed);
        }
        // A quit registers nobody: harmless, counted as a quit, as in v1.
        let registers = client.is_none()
            && !matches!(kind, Kind::Quit)
            && !matches!(
                kind,
                Kind::Cookie {
                    then: protocol::Proven::Quit,
                    ..
                }
            );
        if registers {
            if table.total_len() >= self.max_clients {
                return Verdict::Drop(DropReason::TableFull);
            }
            if self
                .max_per_ip
                .is_some_and(|max| table.clients_at(&source) >= max)
            {
                return Verdict::Drop(DropReason::IpFull);
            }
        }
        Verdict::Admit(Admitted {
            source,
            kind,
            client,
            proves_liveness,
            cookie_aging,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Instant;

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

    /// `secs` after `born`, the instant a test's cookie key is born at.
    fn when(born: Instant, secs: u64) -> When {
        When {
            tick: 0,
            nanos: secs * 1_000_000_000,
            at: born + std::time::Duration::from_secs(secs),
        }
    }

    fn verdict(
        born: Instant,
        a: &mut Admission,
        t: &mut Table,
        d: &[u8],
        port: u16,
    ) -> Result<Option<u32>, DropReason> {
        let one = Arrival {
            source: from(port),
            ..arrival(d)
        };
        match a.admit(&one, t, when(born, 1_000)) {
            Verdict::Admit(ad) => Ok(ad.client),
            Verdict::Drop(r) => Err(r),
            Verdict::Challenge(_) => Err(DropReason::Unverified),
        }
    }

    #[test]
    fn a_full_table_refuses_newcomers_but_not_members_or_quits() {
        let born = Instant::now();
        let mut a = Admission::new(2, true);
        let mut t = Table::new(100);
        t.insert(from(1).unwrap(), 0);
        t.insert(from(2).unwrap(), 0);
        for d in [&b"^hb^"[..], b"hello", b""] {
            assert_eq!(
                verdict(born, &mut a, &mut t, d, 3),
                Err(DropReason::TableFull),
                "{d:?}"
            );
            assert!(verdict(born, &mut a, &mut t, d, 1).unwrap().is_some());
        }
        assert_eq!(verdict(born, &mut a, &mut t, b"quit", 3), Ok(None));
    }

    #[test]
    fn a_closed_lobby_lets_only_joins_quits_and_room_members_through() {
        let born = Instant::now();
        let mut a = Admission::new(10, false);
        let mut t = Table::new(100);
        t.insert(from(1).unwrap(), 0);
        let k2 = t.insert(from(2).unwrap(), 0).key;
        t.move_to(k2, b"r").unwrap();
        for d in [&b"^hb^"[..], b"hi", b"^timeout^"] {
            assert_eq!(
                verdict(born, &mut a, &mut t, d, 9),
                Err(DropReason::LobbyClosed)
            );
            assert_eq!(
                verdict(born, &mut a, &mut t, d, 1),
                Err(DropReason::LobbyClosed)
            );
            assert!(verdict(born, &mut a, &mut t, d, 2).is_ok());
        }
        assert!(verdict(born, &mut a, &mut t, b"^join^r^t", 9).is_ok());
        assert!(verdict(born, &mut a, &mut t, b"quit", 1).is_ok());
    }

    #[test]
    fn verify_mode_lets_nothing_register_without_a_cookie() {
        let born = Instant::now();
        let key = CookieKey::new([3; 32], born);
        let mut a = Admission::new(10, true).verify_sources(Verify::new(
            key.clone(),
            Box::new(Verify::local_budget(COOKIE_PREFIX_RATE, born)),
        ));
        let mut t = Table::new(100);
        let hello = [&b"^hello^"[..], &[b' '; 57]].concat();
        assert_eq!(
            verdict(born, &mut a, &mut t, b"hi", 1),
            Err(DropReason::Unverified)
        );
        let hi = Arrival {
            source: from(1),
            ..arrival(&hello)
        };
        assert!(matches!(
            a.admit(&hi, &mut t, when(born, 1_000)),
            Verdict::Challenge(DropReason::Unverified)
        ));
        let good = [
            &b"^cookie^"[..],
            &key.make(&from(1).unwrap(), when(born, 1_000).at),
        ]
        .concat();
        assert_eq!(
            verdict(born, &mut a, &mut t, &good, 1),
            Ok(None),
            "admitted, not yet a client"
        );
        assert_eq!(
            verdict(born, &mut a, &mut t, &good, 2),
            Err(DropReason::BadCookie),
            "another port's"
        );
        assert_eq!(
            verdict(born, &mut a, &mut t, b"^cookie^AAAAAAAAAAAAAAAAAAAAAA", 1),
            Err(DropReason::BadCookie)
        );
        // A bad cookie long enough to answer gets a fresh one: how a client
        // the relay forgot, or whose cookie aged out, finds its way back.
        let stale = [&b"^cookie^AAAAAAAAAAAAAAAAAAAAAA"[..], &[b' '; 40]].concat();
        let one = Arrival {
            source: from(1),
            ..arrival(&stale)
        };
        assert!(matches!(
            a.admit(&one, &mut t, when(born, 1_000)),
            Verdict::Challenge(DropReason::BadCookie)
        ));
        // A member: talks freely, but quit, join, heartbeats and timeout
        // questions need its cookie.
        t.insert(from(1).unwrap(), 0);
        assert!(verdict(born, &mut a, &mut t, b"hi", 1).is_ok());
        for unproven in [&b"quit"[..], b"^join^r", b"^hb^", b"", b"^timeout^"] {
            assert_eq!(
                verdict(born, &mut a, &mut t, unproven, 1),
                Err(DropReason::Unproven),
                "{unproven:?}"
            );
        }
        let admitted = |a: &mut Admission, t: &mut Table, d: &[u8]| {
            let one = Arrival {
                source: from(1),
                ..arrival(d)
            };
            match a.admit(&one, t, when(born, 1_000)) {
                Verdict::Admit(ad) => Some(ad.proves_liveness),
                _ => None,
            }
        };
        assert_eq!(
            admitted(&mut a, &mut t, b"hi"),
            Some(false),
            "a message proves nothing"
        );
        assert_eq!(
            admitted(&mut a, &mut t, &hello),
            Some(false),
            "nor does a hello"
        );
        assert_eq!(
            admitted(&mut a, &mut t, &good),
            Some(true),
            "the cookie does"
        );
        let quit = [&good[..], b"^quit"].concat();
        assert!(verdict(born, &mut a, &mut t, &quit, 1).is_ok());
        // The cookie budget: 100 replies per /24 at once, then its rate.
        let challenged = (100..300)
            .filter(|p| {
                let hi = Arrival {
                    source: from(*p),
                    ..arrival(&hello)
                };
                matches!(
                    a.admit(&hi, &mut t, when(born, 1_000)),
                    Verdict::Challenge(_)
                )
            })
            .count();
        assert_eq!(challenged, 98, "the /24 had 2 of its 100 spent already");
    }

    #[test]
    fn a_proven_heartbeat_is_never_rate_limited() {
        let born = Instant::now();
        // A spoofer sending messages in a member's name spends its rate
        // budget, but cannot get the member's proven heartbeats refused.
        let key = CookieKey::new([3; 32], born);
        let mut a = Admission::new(10, true)
            .verify_sources(Verify::new(
                key.clone(),
                Box::new(Verify::local_budget(COOKIE_PREFIX_RATE, born)),
            ))
            .client_rate(0.0, 2.0);
        let mut t = Table::new(100);
        t.set_burst(2.0);
        t.insert(from(1).unwrap(), 0);
        let good = [
            &b"^cookie^"[..],
            &key.make(&from(1).unwrap(), when(born, 1_000).at),
        ]
        .concat();
        let sent: Vec<_> = (0..4)
            .map(|_| verdict(born, &mut a, &mut t, b"m", 1))
            .collect();
        assert_eq!(sent[3], Err(DropReason::RateLimited));
        assert!(verdict(born, &mut a, &mut t, &good, 1).is_ok());
        let quit = [&good[..], b"^quit"].concat();
        assert!(verdict(born, &mut a, &mut t, &quit, 1).is_ok());
        let join = [&good[..], b"^join^r"].concat();
        assert_eq!(
            verdict(born, &mut a, &mut t, &join, 1),
            Err(DropReason::RateLimited),
            "a move is not spared"
        );
    }

    #[test]
    fn rate_limits_and_per_ip_caps() {
        let born = Instant::now();
        let mut a = Admission::new(10, true)
            .client_rate(1.0, 3.0)
            .max_clients_per_ip(2);
        let mut t = Table::new(100);
        t.set_burst(3.0);
        t.count_per_ip();
        t.insert(from(1).unwrap(), 0);
        t.insert(from(2).unwrap(), 0);
        assert_eq!(
            verdict(born, &mut a, &mut t, b"^hb^", 3),
            Err(DropReason::IpFull)
        );
        let sent: Vec<_> = (0..5)
            .map(|_| verdict(born, &mut a, &mut t, b"m", 1))
            .collect();
        assert_eq!(sent.iter().filter(|v| v.is_ok()).count(), 3, "{sent:?}");
        assert_eq!(sent[4], Err(DropReason::RateLimited));
    }
}
