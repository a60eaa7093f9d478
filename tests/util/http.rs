//! Plain HTTP/1.0 GETs against the relay's metrics listener (the probes,
//! `/metrics`), each bounded in time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::PATIENCE;

/// `GET path`: the status code and body, or `None` if the listener is not
/// there (refused, reset, closed early).
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

/// Asks `path` until it answers `want` (bounded by [`PATIENCE`]); returns
/// the body. Fails with the last answer if it never does.
pub fn wait_status(addr: SocketAddr, path: &str, want: u16) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = get(addr, path);
        if let Some((code, body)) = &got {
            if *code == want {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {want}; last: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
