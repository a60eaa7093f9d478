//! Times the in-process phases of a hand-over of N members (default a
//! million, all IPv4 in the lobby): the old hub's export into its records,
//! the snapshot's encode, the new process's check, and a fresh hub's
//! restore, each in wall-clock and CPU time (on a shared machine the
//! wall clock also counts other processes). No sockets:
//! `loadtest/handover.sh` measures the whole pause; this is what to
//! profile between its runs (`perf record`).
//!
//! `cargo run --release --example handover_phases -- [MEMBERS] [ROUNDS]`
//! (`PREFAULT=1`: the new hub's table is written once before the clock
//! starts, as `serve --takeover` does with `--expect-clients`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use udphub::core::hub::{Hub, HubConfig};
use udphub::core::snapshot::{self, LoopState, Member};

fn config(n: usize) -> HubConfig {
    HubConfig {
        timeout: Duration::from_secs(60),
        format: Default::default(),
        echo: true,
        max_clients: n,
        expect_clients: n,
        max_datagram: 1472,
        max_rooms: 1000,
        max_room_clients: n,
        room_secret: None,
        lobby_open: true,
        cookie_key: None,
        cookie_rate: 10.0,
        client_rate: None,
        max_clients_per_ip: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// This thread's CPU time (user and system): on a shared machine the wall
/// clock also counts the time other processes held the core.
fn cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(Duration::ZERO, |u| {
        let t = |v: nix::sys::time::TimeVal| {
            Duration::new(v.tv_sec() as u64, v.tv_usec() as u32 * 1000)
        };
        t(u.user_time()) + t(u.system_time())
    })
}

/// Runs `f`, returning its result and its wall and CPU time.
fn timed<T>(f: impl FnOnce() -> T) -> (T, String) {
    let (wall, cpu0) = (Instant::now(), cpu());
    let out = f();
    let (w, c) = (wall.elapsed(), cpu() - cpu0);
    (out, format!("{:.1} ms ({:.1} CPU)", ms(w), ms(c)))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |name: &str, default: usize| match args.next() {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| {
            eprintln!(
                "{name} {s:?}: expected a whole number (usage: handover_phases [MEMBERS] [ROUNDS])"
            );
            std::process::exit(2)
        }),
    };
    let n = arg("MEMBERS", 1_000_000);
    let rounds = arg("ROUNDS", 3);
    let members: Vec<Member> = (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(127, (i >> 16) as u8, (i >> 8) as u8, i as u8 | 1);
            Member {
                addr: SocketAddr::V4(SocketAddrV4::new(ip, 10_000 + (i % 50_000) as u16)),
                room: Box::default(),
                silent: Duration::from_millis((i as u64 * 7919) % 20_000),
                tokens: f32::MAX,
            }
        })
        .collect();
    let seed = LoopState {
        members,
        kernel_drops: 0,
    };
    let cfg = config(n);
    let now = Instant::now();
    let mut old = Hub::new(&cfg, Hub::resume_start(&cfg, now));
    old.restore(seed.iter(), now).expect("seed");
    drop(seed);
    for round in 0..rounds {
        let now = Instant::now();
        let (state, export) = timed(|| old.export_encoded(now));
        let (bytes, encode) = timed(|| snapshot::encode_loops(None, &[state]));
        let (decoded, decode) =
            timed(|| snapshot::Received::check(bytes.clone(), n).expect("a valid snapshot"));
        // Made (and, with PREFAULT=1, its memory written once) before the
        // clock starts: what a process taking over does before its hello.
        let mut table = Hub::table_for(&cfg);
        let (_, prefault) = timed(|| {
            if std::env::var_os("PREFAULT").is_some_and(|v| v == "1") {
                table.prefault();
            }
        });
        let mut new = Hub::with_table(&cfg, Hub::resume_start(&cfg, now), table);
        let (restored, restore) =
            timed(|| new.restore(decoded.members_of(0), now).expect("restore"));
        drop(decoded);
        drop(old);
        println!(
            "round {round}: {restored} members, {} B: export {export}, encode {encode}, check {decode} (with a copy of the bytes), restore {restore} (prefault before: {prefault})",
            bytes.len(),
        );
        old = new;
    }
}
