//! A room spanning relays of a cluster, for the cluster tests: members
//! joined with their answer checked, and a wait until NATS carries the
//! room between the relays (subscriptions travel asynchronously).

use std::time::{Duration, Instant};

use super::{Client, RelayProc, PATIENCE};

/// A client of `relay` in `room` (the answer checked).
pub fn member(relay: &RelayProc, room: &str) -> Client {
    let c = Client::new(relay.addr);
    c.send(format!("^join^{room}").as_bytes());
    assert_eq!(c.recv(), format!("^room^{room}").into_bytes());
    c
}

/// Subscriptions travel through NATS asynchronously: `sender` sends
/// probes until every one of `members` has heard one, then everyone's
/// inbox is emptied.
pub fn until_connected(sender: &Client, members: &[&Client]) {
    let deadline = Instant::now() + PATIENCE * 2;
    let mut heard = vec![false; members.len()];
    let mut n = 0;
    while heard.iter().any(|h| !h) {
        assert!(
            Instant::now() < deadline,
            "the room never spanned the nodes"
        );
        sender.send(format!("probe {n}").as_bytes());
        n += 1;
        for (i, m) in members.iter().enumerate() {
            if m.recv_within(Duration::from_millis(50)).is_some() {
                heard[i] = true;
            }
        }
    }
    // Empty every inbox up to a last probe: the sender's datagrams reach
    // each member exactly once and in order, so once its last probe is
    // in, no earlier one is still on its way (an observable end, not a
    // sleep).
    let last = format!("probe end {n}");
    sender.send(last.as_bytes());
    let deadline = Instant::now() + PATIENCE * 2;
    for m in members.iter().copied().chain([sender]) {
        while m
            .recv_within(PATIENCE)
            .is_some_and(|d| d != last.as_bytes())
        {
            assert!(Instant::now() < deadline, "the last probe never came");
        }
    }
}
