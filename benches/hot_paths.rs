//! Micro benchmarks of the per-datagram work, apart from the syscalls:
//! classify, template rendering, client-table refresh/join/remove at
//! several table sizes, the timer wheel with a million deadlines (and the
//! idle `next_wakeup` asked before every poll), walking a room's members to
//! build fan-out batches, and the whole sans-I/O hub per datagram.
//!
//! `cargo bench --bench hot_paths`; groups are named after their parameters.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};

use udphub::core::addr::RawAddr;
use udphub::core::admission::Arrival;
use udphub::core::counts::Counts;
use udphub::core::hub::{Effect, Hub, HubConfig};
use udphub::core::protocol::{classify, Template};
use udphub::core::rooms::LOBBY;
use udphub::core::table::Table;
use udphub::core::wheel::Wheel;

fn addr(i: u32) -> RawAddr {
    // Distinct loopback sources: 127.x.y.z with a port.
    let ip = [127, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    SocketAddr::from((ip, 10_000 + (i % 50_000) as u16)).into()
}

fn protocol(c: &mut Criterion) {
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    for (name, d) in [
        ("heartbeat", &b"^hb^\n"[..]),
        ("message_64B", &[b'm'; 64][..]),
        ("message_1472B", &[b'm'; 1472][..]),
    ] {
        g.bench_with_input(BenchmarkId::from_parameter(name), d, |b, d| {
            b.iter(|| classify(black_box(d)))
        });
    }
    g.finish();

    // The sender's `ip:port` as the default template wrote it before
    // issue 23 (`write!` through `fmt`), beside today's `render`, in one
    // run: this machine's drift between runs is larger than the gain.
    let mut g = c.benchmark_group("render_before_issue_23");
    g.throughput(Throughput::Elements(1));
    let from = addr(12345);
    let mut out = Vec::with_capacity(2048);
    for size in [64usize, 1472] {
        let body = vec![b'b'; size];
        g.bench_function(BenchmarkId::new("default_with_fmt", size), |b| {
            b.iter(|| {
                use std::io::Write as _;
                let (body, from) = (black_box(&body), black_box(&from));
                out.clear();
                out.extend_from_slice(body);
                out.extend_from_slice(b". from ");
                let _ = write!(out, "{}:{}", from.display_ip(), from.port());
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("render");
    g.throughput(Throughput::Elements(1));
    let from = addr(12345);
    let mut out = Vec::with_capacity(2048);
    for (name, spec) in [("default", Template::DEFAULT), ("raw", "raw")] {
        let t = Template::parse(spec).unwrap();
        for size in [64usize, 1472] {
            let body = vec![b'b'; size];
            g.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| t.render(black_box(&body), black_box(&from), &mut out))
            });
        }
    }
    g.finish();
}

fn table(c: &mut Criterion) {
    let mut g = c.benchmark_group("table");
    g.throughput(Throughput::Elements(1));
    for size in [1_000u32, 100_000, 1_000_000] {
        let mut t = Table::new(1000);
        for i in 0..size {
            t.insert(addr(i), 0);
        }
        let mut i = 0u32;
        g.bench_function(BenchmarkId::new("refresh", size), |b| {
            b.iter(|| {
                i = (i + 7919) % size;
                if let Some(k) = t.find(black_box(&addr(i))) {
                    t.refresh(k, 1, 0);
                }
            })
        });
        g.bench_function(BenchmarkId::new("join_then_quit", size), |b| {
            b.iter(|| {
                let a = addr(size + 1);
                if t.find(black_box(&a)).is_none() {
                    t.insert(a, 1);
                }
                t.remove(&a)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("fanout_batches");
    for size in [64u32, 1_000, 100_000] {
        let mut t = Table::new(1000);
        for i in 0..size {
            t.insert(addr(i), 0);
        }
        let mut staging: Vec<RawAddr> = Vec::with_capacity(256);
        g.throughput(Throughput::Elements(u64::from(size)));
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                let mut it = t.recipients(LOBBY, 1, None);
                let mut batches = 0;
                loop {
                    staging.clear();
                    staging.extend(it.by_ref().take(256).copied());
                    if staging.is_empty() {
                        break batches;
                    }
                    batches += 1;
                    black_box(&staging);
                }
            })
        });
    }
    g.finish();
}

fn wheel(c: &mut Criterion) {
    const N: u32 = 1_000_000;
    let mut g = c.benchmark_group("wheel");
    g.sample_size(10);
    g.throughput(Throughput::Elements(u64::from(N)));
    g.bench_function(BenchmarkId::new("schedule", N), |b| {
        b.iter_batched(
            || Wheel::new(512, 0),
            |mut w| {
                for k in 0..N {
                    w.schedule(k, 0, u64::from(k % 400) + 1);
                }
                w
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function(BenchmarkId::new("advance_all_due", N), |b| {
        b.iter_batched(
            || {
                let mut w = Wheel::new(512, 0);
                for k in 0..N {
                    w.schedule(k, 0, u64::from(k % 400) + 1);
                }
                (w, Vec::with_capacity(N as usize))
            },
            |(mut w, mut out)| {
                while w.advance(500, usize::MAX, &mut out) {}
                out.len()
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    // Asked before every idle poll: with a 1-hour timeout the ring has
    // 65,536 slots; one far-away entry is the worst case for a scan.
    let mut g = c.benchmark_group("wheel_next_wakeup");
    g.throughput(Throughput::Elements(1));
    for slots in [512usize, 65_536] {
        let mut w = Wheel::new(slots, 0);
        w.schedule(0, 0, slots as u64 - 1);
        g.bench_function(BenchmarkId::from_parameter(slots), |b| {
            b.iter(|| black_box(&w).next_wakeup())
        });
    }
    g.finish();
}

/// The relay's defaults, with this timeout and table size.
fn hub_config(timeout: Duration, max_clients: usize, expect_clients: usize) -> HubConfig {
    HubConfig {
        timeout,
        format: Template::default(),
        echo: true,
        max_clients,
        expect_clients,
        max_datagram: 1472,
        max_rooms: 100_000,
        max_room_clients: 100_000,
        room_secret: None,
        lobby_open: true,
        cookie_key: None,
        cookie_rate: 20.0,
        client_rate: None,
        max_clients_per_ip: None,
    }
}

/// Verify mode under a flood of forged hellos: a cookie made (HMAC from
/// the keyed state computed at start), and a hello from one of 15,000
/// flooding /24s that the fair budget refuses (the common case in a
/// flood: what each forged datagram costs the hub).
fn verify(c: &mut Criterion) {
    use udphub::core::cookie::CookieKey;
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    let t0 = Instant::now();
    let key = CookieKey::new([7; 32], t0);
    let a = addr(1);
    g.bench_function("cookie_make", |b| b.iter(|| key.make(black_box(&a), t0)));
    let cookie = key.make(&a, t0);
    g.bench_function("cookie_check", |b| {
        b.iter(|| key.check(black_box(&cookie), &a, t0))
    });
    let mut hub = Hub::new(
        &HubConfig {
            cookie_key: Some(key.clone()),
            ..hub_config(Duration::from_secs(10), 1_000, 0)
        },
        t0,
    );
    let mut hello = b"^hello^".to_vec();
    hello.resize(64, b' ');
    let mut counts = Counts::default();
    let mut i = 0u32;
    g.bench_function("forged_hello_flood", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            // 15,000 /24s in 127.78/16 and up, 256 sources each.
            let ip = std::net::Ipv4Addr::from(0x7f4e_0000 + (i % 3_840_000));
            let arrival = Arrival {
                data: &hello,
                source: Some(SocketAddr::from((ip, 4000)).into()),
                truncated: false,
            };
            black_box(matches!(
                hub.handle(t0 + Duration::from_secs(1), arrival, &mut counts),
                Effect::Reply { .. }
            ))
        })
    });
    g.finish();
}

/// The whole hub per datagram, no sockets: a heartbeat from a known client,
/// and a message rendered and fanned out (recipients walked) to N members.
fn hub(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub");
    g.throughput(Throughput::Elements(1));
    for members in [64u32, 1_000] {
        let config = hub_config(Duration::from_secs(60), 1_000_000, 0);
        let t0 = Instant::now();
        let mut hub = Hub::new(&config, t0);
        let mut counts = Counts::default();
        for i in 0..members {
            let a = Arrival {
                data: b"^hb^",
                source: Some(addr(i)),
                truncated: false,
            };
            let _ = hub.handle(t0, a, &mut counts);
        }
        let now = t0 + Duration::from_millis(1);
        let body = [b'm'; 64];
        g.bench_function(BenchmarkId::new("heartbeat", members), |b| {
            b.iter(|| {
                let a = Arrival {
                    data: b"^hb^",
                    source: Some(addr(7)),
                    truncated: false,
                };
                matches!(hub.handle(now, black_box(a), &mut counts), Effect::Nothing)
            })
        });
        g.bench_function(BenchmarkId::new("message_fanout", members), |b| {
            b.iter(|| {
                let a = Arrival {
                    data: &body,
                    source: Some(addr(7)),
                    truncated: false,
                };
                match hub.handle(now, black_box(a), &mut counts) {
                    Effect::Fanout(f) => f.recipients.fold(0, |n, a| n + a.port() as usize),
                    _ => 0,
                }
            })
        });
    }
    g.finish();
}

/// A message to a 100-member room, sent for real (sendmmsg to 100 loopback
/// sockets): alone on the relay, and among 1,000,000 clients in 10,000
/// rooms. Fan-out walks the room's member list, so the two should cost the
/// same per delivery. `alone_pktinfo`: alone, as on a wildcard address,
/// every delivery carrying an IP_PKTINFO for its source address (what
/// `alone` is spared when bound to one address).
fn room_fanout(c: &mut Criterion) {
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use udphub::net::batch_io::{LocalAddr, SourceControl};
    use udphub::net::fanout::FanoutSender;

    let relay = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let members: Vec<UdpSocket> = (0..100)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let mut g = c.benchmark_group("room_fanout");
    g.throughput(Throughput::Elements(100));
    g.sample_size(30);
    let local = LocalAddr {
        ip: [127, 0, 0, 1].into(),
        ifindex: 0,
    };
    let pktinfo = [SourceControl::new(&local, false).expect("an IPv4 source")];
    for (label, other_rooms, tag) in [
        ("alone", 0u32, 0u8),
        ("alone_pktinfo", 0, 1),
        ("among_1M_in_10k_rooms", 9_999, 0),
    ] {
        let sources: &[SourceControl] = if tag == 0 { &[] } else { &pktinfo };
        let config = hub_config(Duration::from_secs(3600), 2_000_000, 1_000_000);
        let t0 = Instant::now();
        let mut hub = Hub::new(&config, t0);
        let mut counts = Counts::default();
        let join = |hub: &mut Hub, counts: &mut Counts, from: RawAddr, room: u32| {
            let datagram = format!("^join^r{room}");
            let a = Arrival {
                data: datagram.as_bytes(),
                source: Some(from),
                truncated: false,
            };
            let _ = hub.handle(t0, a, counts);
        };
        for m in &members {
            let from = RawAddr::from(m.local_addr().unwrap()).with_local(tag);
            join(&mut hub, &mut counts, from, 0);
        }
        for room in 1..=other_rooms {
            for j in 0..100 {
                join(&mut hub, &mut counts, addr(room * 100 + j), room);
            }
        }
        let sender = RawAddr::from(members[0].local_addr().unwrap()).with_local(tag);
        let mut fanout = FanoutSender::default();
        let body = [b'm'; 64];
        let now = t0 + Duration::from_millis(1);
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| {
                let a = Arrival {
                    data: &body,
                    source: Some(sender),
                    truncated: false,
                };
                match hub.handle(now, a, &mut counts) {
                    Effect::Fanout(f) => {
                        fanout
                            .send(relay.as_fd(), sources, f.payload, f.recipients)
                            .delivered
                    }
                    _ => 0,
                }
            })
        });
    }
    g.finish();
}

/// The cost of crossing loops (`--threads`): handing one message to the
/// other loops' queues (an `Arc` clone and a slot each), draining them on
/// the other side, and one wake-up (an eventfd write).
fn shards(c: &mut Criterion) {
    use udphub::runtime::shards;
    let mut g = c.benchmark_group("shards");
    for n in [2usize, 8] {
        let polls: Vec<mio::Poll> = (0..n).map(|_| mio::Poll::new().unwrap()).collect();
        let wakers: Vec<std::sync::Arc<mio::Waker>> = polls
            .iter()
            .map(|p| std::sync::Arc::new(mio::Waker::new(p.registry(), mio::Token(1)).unwrap()))
            .collect();
        let mut sibs: Vec<shards::Siblings> = shards::queues(n)
            .into_iter()
            .map(|u| u.wire(&wakers))
            .collect();
        let mut counts = udphub::core::counts::Counts::default();
        let payload = [b'x'; 64];
        // Every other loop has lobby members.
        for s in sibs.iter_mut().skip(1) {
            s.room_opened(b"");
        }
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("hand_off_and_drain_per_message", n), |b| {
            b.iter(|| {
                sibs[0].hand_off(b"", &payload, &mut counts);
                for s in sibs.iter_mut().skip(1) {
                    s.drain(|_, p| {
                        std::hint::black_box(p);
                    });
                }
            })
        });
    }
    // A lobby message on a loop whose siblings have no lobby member.
    {
        let polls: Vec<mio::Poll> = (0..8).map(|_| mio::Poll::new().unwrap()).collect();
        let wakers: Vec<std::sync::Arc<mio::Waker>> = polls
            .iter()
            .map(|p| std::sync::Arc::new(mio::Waker::new(p.registry(), mio::Token(1)).unwrap()))
            .collect();
        let mut sibs: Vec<shards::Siblings> = shards::queues(8)
            .into_iter()
            .map(|u| u.wire(&wakers))
            .collect();
        let mut counts = udphub::core::counts::Counts::default();
        let payload = [b'x'; 64];
        g.throughput(Throughput::Elements(1));
        g.bench_function(
            BenchmarkId::new("lobby_hand_off_no_members_elsewhere", 8),
            |b| {
                b.iter(|| {
                    sibs[0].hand_off(b"", &payload, &mut counts);
                    for s in sibs.iter_mut().skip(1) {
                        s.drain(|_, p| {
                            std::hint::black_box(p);
                        });
                    }
                })
            },
        );
    }
    for size in [64usize, 1200] {
        let payload = vec![b'x'; size];
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("handoff_new", size), |b| {
            b.iter(|| shards::Handoff::new(black_box(b"room-42"), black_box(&payload)))
        });
        // How a hand-off was built before issue 23, in the same run: a Vec
        // copied again into an Arc<[u8]>.
        g.bench_function(BenchmarkId::new("handoff_vec_into_arc_slice", size), |b| {
            b.iter(|| {
                let (name, payload) = (black_box(&b"room-42"[..]), black_box(&payload));
                let mut bytes = Vec::with_capacity(name.len() + payload.len());
                bytes.extend_from_slice(name);
                bytes.extend_from_slice(payload);
                let shared: std::sync::Arc<[u8]> = bytes.into();
                shared
            })
        });
    }
    let poll = mio::Poll::new().unwrap();
    let waker = mio::Waker::new(poll.registry(), mio::Token(1)).unwrap();
    g.bench_function("wake", |b| b.iter(|| waker.wake().unwrap()));
    g.finish();
}

criterion_group!(
    benches,
    protocol,
    table,
    wheel,
    hub,
    room_fanout,
    shards,
    verify
);
criterion_main!(benches);
