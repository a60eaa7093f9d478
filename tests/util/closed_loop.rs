//! A closed-loop chat load for the hand-over and upgrade tests: members
//! joined to one room, rounds in which every member sends once and must
//! receive every member's message of the round exactly once, in order.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// `n` clients joined to room `r`, each seen answered.
pub fn members(relay: SocketAddr, n: usize) -> Vec<UdpSocket> {
    (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(PATIENCE)).unwrap();
            s.send_to(b"^join^r", relay).unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = s.recv_from(&mut buf).expect("a ^room^ answer");
            assert_eq!(&buf[..n], b"^room^r");
            s
        })
        .collect()
}

/// What the closed loop saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Rounds finished.
    pub rounds: usize,
    /// Messages received, all members together.
    pub received: usize,
}

/// Rounds of a closed loop: each member sends `i:k`, then every member
/// must receive every sender's `i:k` of this round exactly once (in
/// order per sender, since round `k` is sent only when `k - 1` is all
/// in) before the next round. Runs until `stop` and at least `min`
/// rounds; `round` counts finished rounds. Panics on anything lost,
/// duplicated, out of order, or unexpected (a `bye` included).
pub fn closed_loop(
    relay: SocketAddr,
    clients: Vec<UdpSocket>,
    stop: Arc<AtomicBool>,
    round: Arc<AtomicUsize>,
    min: usize,
) -> Tally {
    let n = clients.len();
    let mut tally = Tally::default();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(120);
    for k in 0.. {
        if (stop.load(Ordering::SeqCst) && k >= min) || Instant::now() > deadline {
            break;
        }
        for (i, c) in clients.iter().enumerate() {
            c.send_to(format!("{i}:{k}").as_bytes(), relay).unwrap();
        }
        for (j, c) in clients.iter().enumerate() {
            let mut seen = vec![false; n];
            for _ in 0..n {
                let (len, _) = c
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("member {j}, round {k}: {e} (lost)"));
                let text = String::from_utf8_lossy(&buf[..len]).to_string();
                let (i, got_k) = text
                    .split_once(':')
                    .and_then(|(i, k)| Some((i.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
                    .unwrap_or_else(|| panic!("member {j}: unexpected {text:?}"));
                assert_eq!(got_k, k, "member {j}: {text:?} in round {k} (reordered)");
                assert!(i < n && !seen[i], "member {j}: {text:?} twice (duplicated)");
                seen[i] = true;
                tally.received += 1;
            }
        }
        tally.rounds = k + 1;
        round.store(k + 1, Ordering::SeqCst);
    }
    tally
}

/// Waits (bounded) until the closed loop has finished `rounds` rounds.
pub fn wait_rounds(round: &AtomicUsize, rounds: usize) {
    let deadline = Instant::now() + PATIENCE * 4;
    while round.load(Ordering::SeqCst) < rounds {
        assert!(Instant::now() < deadline, "the closed loop stalled");
        thread::sleep(Duration::from_millis(5));
    }
}
