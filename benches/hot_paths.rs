//! Micro benchmarks of the per-datagram work, apart from the syscalls:
//! classify, template rendering, client-table refresh/join/remove at
//! several table sizes, the timer wheel with a million deadlines, and
//! walking the table to build fan-out batches.
//!
//! `cargo bench --bench hot_paths`; groups are named after their parameters.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use udphub::addr::RawAddr;
use udphub::protocol::{classify, Template};
use udphub::table::Table;
use udphub::wheel::Wheel;

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
        let mut t = Table::new(2_000_000, 1000);
        for i in 0..size {
            t.touch(addr(i), 0);
        }
        let mut i = 0u32;
        g.bench_function(BenchmarkId::new("refresh", size), |b| {
            b.iter(|| {
                i = (i + 7919) % size;
                t.touch(black_box(addr(i)), 1)
            })
        });
        g.bench_function(BenchmarkId::new("join_then_quit", size), |b| {
            b.iter(|| {
                let a = addr(size + 1);
                t.touch(black_box(a), 1);
                t.remove(&a)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("fanout_batches");
    for size in [64u32, 1_000, 100_000] {
        let mut t = Table::new(2_000_000, 1000);
        for i in 0..size {
            t.touch(addr(i), 0);
        }
        let mut staging: Vec<RawAddr> = Vec::with_capacity(256);
        g.throughput(Throughput::Elements(u64::from(size)));
        g.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                let mut it = t.recipients(1).map(|(_, a)| a);
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
}

criterion_group!(benches, protocol, table, wheel);
criterion_main!(benches);
