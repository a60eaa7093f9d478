//! Which loop a datagram goes to: the classic BPF program udphub attaches
//! to its loops' SO_REUSEPORT group (`SO_ATTACH_REUSEPORT_CBPF`).
//!
//! Without a program the kernel picks a socket by a hash of the datagram's
//! source and destination *over the group's current size*. Any process of
//! the same user may join the group by binding the same address with
//! SO_REUSEPORT; from then on it receives its share of the relay's clients,
//! and every client is rehashed over N + 1 sockets. With this program the
//! kernel runs it instead: it returns an index below N computed from the
//! source address and port alone, so
//!
//! - a socket that joins later (index N or more) is never chosen, and
//! - each client's loop is fixed by its address for the relay's life,
//!   whoever joins or leaves.
//!
//! The kernel runs the program with the packet pulled past the UDP header,
//! so every load is relative to the network header (`SKF_NET_OFF`). The IP
//! version is read from the packet, not the socket: IPv4 datagrams reaching
//! an IPv6 socket (`::ffff:a.b.c.d` clients of `[::]`) carry an IPv4 header.
//!
//! The hash is MurmurHash3's 32-bit finaliser over the mixed address and
//! port, so the many ports of one address (a loopback benchmark, or a NAT)
//! spread as evenly as many addresses do. A load past the end of the packet
//! (never, for a datagram that reached a UDP socket) ends the program with
//! 0: loop 0, still one of ours.
//!
//! Building the program is plain data; attaching it is
//! [`crate::net::batch_io::attach_reuseport_cbpf`].

use libc::{
    sock_filter, BPF_A, BPF_ABS, BPF_ADD, BPF_ALU, BPF_B, BPF_H, BPF_IND, BPF_JA, BPF_JEQ, BPF_JMP,
    BPF_K, BPF_LD, BPF_LDX, BPF_MEM, BPF_MISC, BPF_MOD, BPF_MSH, BPF_MUL, BPF_RET, BPF_RSH, BPF_ST,
    BPF_TAX, BPF_W, BPF_X, BPF_XOR,
};

/// Most loops a program steers between: the relay's `MAX_SHARDS`.
pub const MAX_LOOPS: u32 = 64;

/// The network header's offset for classic BPF loads (`SKF_NET_OFF`),
/// as the instruction's unsigned `k` (the kernel reads it as signed).
const NET: u32 = libc::SKF_NET_OFF as u32;
/// Fibonacci hashing's multiplier (2^32 / φ), to mix address words.
const GOLDEN: u32 = 0x9E37_79B1;
/// MurmurHash3 fmix32's multipliers.
const FMIX1: u32 = 0x85EB_CA6B;
const FMIX2: u32 = 0xC2B2_AE35;
/// Scratch memory words: the address hash, and a temporary.
const M_ADDR: u32 = 0;
const M_TMP: u32 = 1;
/// IPv6's next-header value for UDP.
const NEXT_HEADER_UDP: u32 = 17;

fn op(code: u32) -> u16 {
    code as u16
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: op(code),
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: op(code),
        jt,
        jf,
        k,
    }
}

/// A = A ^ (A >> shift), through the scratch word.
fn xor_shift(p: &mut Vec<sock_filter>, shift: u32) {
    p.extend([
        stmt(BPF_ST, M_TMP),
        stmt(BPF_ALU | BPF_RSH | BPF_K, shift),
        stmt(BPF_MISC | BPF_TAX, 0),
        stmt(BPF_LD | BPF_MEM, M_TMP),
        stmt(BPF_ALU | BPF_XOR | BPF_X, 0),
    ]);
}

/// The program that steers each source to one of `loops` sockets (the
/// first `loops` of the group, in the order they joined it). `loops` is
/// clamped to 1..=[`MAX_LOOPS`].
pub fn program(loops: u32) -> Vec<sock_filter> {
    let loops = loops.clamp(1, MAX_LOOPS);

    // IPv4: the source address at 12, the UDP source port after the
    // header (its length from IHL: options are allowed).
    let v4 = [
        stmt(BPF_LD | BPF_W | BPF_ABS, NET.wrapping_add(12)),
        stmt(BPF_ST, M_ADDR),
        stmt(BPF_LDX | BPF_B | BPF_MSH, NET),
        stmt(BPF_LD | BPF_H | BPF_IND, NET),
    ];
    // IPv6: the source address's four words at 8..24, mixed; the UDP
    // source port right after the fixed header when the next header is
    // UDP. With extension headers (rare for UDP) the port is not where we
    // look: the address alone then decides (A holds the next-header byte).
    let mut v6 = vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, NET.wrapping_add(8)),
        stmt(BPF_ALU | BPF_MUL | BPF_K, GOLDEN),
        stmt(BPF_ST, M_ADDR),
    ];
    for word in [12u32, 16, 20] {
        v6.extend([
            stmt(BPF_LD | BPF_W | BPF_ABS, NET.wrapping_add(word)),
            stmt(BPF_LDX | BPF_MEM, M_ADDR),
            stmt(BPF_ALU | BPF_ADD | BPF_X, 0),
            stmt(BPF_ALU | BPF_MUL | BPF_K, GOLDEN),
            stmt(BPF_ST, M_ADDR),
        ]);
    }
    v6.extend([
        stmt(BPF_LD | BPF_B | BPF_ABS, NET.wrapping_add(6)),
        jump(BPF_JMP | BPF_JEQ | BPF_K, NEXT_HEADER_UDP, 0, 1),
        stmt(BPF_LD | BPF_H | BPF_ABS, NET.wrapping_add(40)),
    ]);

    let mut p = Vec::with_capacity(64);
    // The IP version, from the first nibble.
    p.push(stmt(BPF_LD | BPF_B | BPF_ABS, NET));
    p.push(stmt(BPF_ALU | BPF_RSH | BPF_K, 4));
    // Version 4 falls through to `v4`; anything else (6) jumps past it and
    // the jump that ends it.
    p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, 4, 0, v4.len() as u8 + 1));
    p.extend(v4);
    p.push(stmt(BPF_JMP | BPF_JA, v6.len() as u32));
    p.extend(v6);
    // Here A is the port and M_ADDR the address hash:
    // h = fmix32(addr * GOLDEN ^ port); index = h mod loops.
    p.extend([
        stmt(BPF_MISC | BPF_TAX, 0),
        stmt(BPF_LD | BPF_MEM, M_ADDR),
        stmt(BPF_ALU | BPF_MUL | BPF_K, GOLDEN),
        stmt(BPF_ALU | BPF_XOR | BPF_X, 0),
    ]);
    xor_shift(&mut p, 16);
    p.push(stmt(BPF_ALU | BPF_MUL | BPF_K, FMIX1));
    xor_shift(&mut p, 13);
    p.push(stmt(BPF_ALU | BPF_MUL | BPF_K, FMIX2));
    xor_shift(&mut p, 16);
    p.push(stmt(BPF_ALU | BPF_MOD | BPF_K, loops));
    p.push(stmt(BPF_RET | BPF_A, 0));
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A classic BPF interpreter for the instructions [`program`] uses,
    /// with the kernel's semantics for them: `packet` is what lies from the
    /// network header on; a load outside it ends the program with 0.
    fn run(prog: &[sock_filter], packet: &[u8]) -> u32 {
        let load = |k: u32, size: usize| -> Option<u32> {
            let off = (k as i32).checked_sub(libc::SKF_NET_OFF)?;
            let off = usize::try_from(off).ok()?;
            let bytes = packet.get(off..off + size)?;
            Some(bytes.iter().fold(0u32, |v, &b| v << 8 | u32::from(b)))
        };
        let (mut a, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0usize;
        for _ in 0..1000 {
            let i = prog[pc];
            let code = u32::from(i.code);
            pc += 1;
            match code {
                c if c == BPF_LD | BPF_B | BPF_ABS => match load(i.k, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == BPF_LD | BPF_H | BPF_ABS => match load(i.k, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == BPF_LD | BPF_W | BPF_ABS => match load(i.k, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == BPF_LD | BPF_H | BPF_IND => match load(i.k.wrapping_add(x), 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == BPF_LDX | BPF_B | BPF_MSH => match load(i.k, 1) {
                    Some(v) => x = 4 * (v & 0xf),
                    None => return 0,
                },
                c if c == BPF_LD | BPF_MEM => a = mem[i.k as usize],
                c if c == BPF_LDX | BPF_MEM => x = mem[i.k as usize],
                c if c == BPF_ST => mem[i.k as usize] = a,
                c if c == BPF_MISC | BPF_TAX => x = a,
                c if c == BPF_ALU | BPF_RSH | BPF_K => a >>= i.k,
                c if c == BPF_ALU | BPF_MUL | BPF_K => a = a.wrapping_mul(i.k),
                c if c == BPF_ALU | BPF_ADD | BPF_X => a = a.wrapping_add(x),
                c if c == BPF_ALU | BPF_XOR | BPF_X => a ^= x,
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf })
                }
                c if c == BPF_RET | BPF_A => return a,
                other => panic!("instruction {other:#x} not modelled"),
            }
        }
        panic!("program did not end");
    }

    fn v4_packet(src: Ipv4Addr, port: u16, options: usize) -> Vec<u8> {
        let ihl = 5 + options;
        let mut p = vec![0u8; ihl * 4 + 8];
        p[0] = 0x40 | ihl as u8;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.octets());
        p[ihl * 4..ihl * 4 + 2].copy_from_slice(&port.to_be_bytes());
        p
    }

    fn v6_packet(src: Ipv6Addr, port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[6] = 17;
        p[8..24].copy_from_slice(&src.octets());
        p[40..42].copy_from_slice(&port.to_be_bytes());
        p
    }

    /// How many of `count` sources land on each of `loops` loops.
    fn spread(loops: u32, packets: impl Iterator<Item = Vec<u8>>) -> Vec<usize> {
        let prog = program(loops);
        let mut per_loop = vec![0usize; loops as usize];
        for packet in packets {
            let i = run(&prog, &packet);
            assert!(i < loops, "index {i} with {loops} loops");
            per_loop[i as usize] += 1;
        }
        per_loop
    }

    fn assert_even(per_loop: &[usize], total: usize) {
        let mean = total as f64 / per_loop.len() as f64;
        for (i, &n) in per_loop.iter().enumerate() {
            assert!(
                (n as f64 - mean).abs() <= mean * 0.25,
                "loop {i} got {n} of {total}: {per_loop:?}"
            );
        }
    }

    #[test]
    fn fits_the_kernel_limits() {
        for loops in [1, 2, 4, 64, 0, 1000] {
            let p = program(loops);
            assert!(p.len() < 256, "jumps are u8 and the program is small");
            let m = p.last().map(|i| i.k);
            assert_eq!(m, Some(0));
            let modulo = p[p.len() - 2].k;
            assert_eq!(modulo, loops.clamp(1, MAX_LOOPS));
        }
    }

    #[test]
    fn many_ports_of_one_address_spread_evenly() {
        let lo = Ipv4Addr::LOCALHOST;
        for loops in [2, 3, 4, 8] {
            let total = 4000;
            let per = spread(loops, (32768..32768 + total).map(|p| v4_packet(lo, p, 0)));
            assert_even(&per, usize::from(total));
        }
        let lo6 = Ipv6Addr::LOCALHOST;
        let per = spread(4, (40000..44000).map(|p| v6_packet(lo6, p)));
        assert_even(&per, 4000);
    }

    #[test]
    fn many_addresses_on_one_port_spread_evenly() {
        let per = spread(
            4,
            (0..4000u32).map(|i| v4_packet(Ipv4Addr::from(0x0a00_0000 + i), 5000, 0)),
        );
        assert_even(&per, 4000);
        let per = spread(
            4,
            (0..4000u128).map(|i| v6_packet(Ipv6Addr::from(0x2001_0db8u128 << 96 | i), 5000)),
        );
        assert_even(&per, 4000);
    }

    #[test]
    fn the_choice_depends_on_the_source_alone() {
        let prog = program(4);
        let src = Ipv4Addr::new(192, 0, 2, 7);
        let plain = run(&prog, &v4_packet(src, 4321, 0));
        // IP options move the UDP header, not the answer.
        assert_eq!(run(&prog, &v4_packet(src, 4321, 3)), plain);
        // The destination and the payload play no part.
        let mut other = v4_packet(src, 4321, 0);
        other[16..20].copy_from_slice(&[10, 9, 8, 7]);
        other.extend_from_slice(b"payload");
        assert_eq!(run(&prog, &other), plain);
        // Other ports do land elsewhere.
        let indices: std::collections::HashSet<u32> = (0..64)
            .map(|p| run(&prog, &v4_packet(src, 4000 + p, 0)))
            .collect();
        assert_eq!(indices.len(), 4);
    }

    #[test]
    fn odd_packets_still_land_on_one_of_the_loops() {
        let prog = program(3);
        // A truncated header ends the program with loop 0.
        assert_eq!(run(&prog, &[0x45, 0, 0]), 0);
        assert_eq!(run(&prog, &[]), 0);
        // An IPv6 extension header: the address alone decides.
        let mut ext = v6_packet(Ipv6Addr::LOCALHOST, 9);
        ext[6] = 0; // hop-by-hop options
        assert!(run(&prog, &ext) < 3);
        // One loop: always 0.
        assert_eq!(run(&program(1), &v4_packet(Ipv4Addr::LOCALHOST, 9, 0)), 0);
    }
}
