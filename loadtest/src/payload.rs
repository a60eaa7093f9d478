//! The message payload: who sent it, its sequence number, when.
//!
//! ASCII (hex fields, `.` padding) so that relays that decode text — the
//! seeds' Python server calls `data.decode()` — relay it unharmed, and so
//! it survives a relay's `--format` wrapping: it is parsed from the start of
//! whatever arrives.

/// Every loadtest message starts with this.
pub const MAGIC: &[u8] = b"lt1 ";
/// `lt1 SSSSSSSS QQQQQQQQQQQQQQQQ TTTTTTTTTTTTTTTT`: the shortest payload.
pub const HEADER_LEN: usize = 4 + 8 + 1 + 16 + 1 + 16;

/// What a message says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The sending client's index.
    pub sender: u32,
    /// Per-sender sequence number, from 0.
    pub seq: u64,
    /// Send time, nanoseconds since the run's start.
    pub sent_ns: u64,
}

/// Writes a message of `size` bytes (at least [`HEADER_LEN`]) into `buf`.
pub fn encode(buf: &mut Vec<u8>, stamp: Stamp, size: usize) {
    use std::io::Write;
    buf.clear();
    let _ = write!(
        buf,
        "lt1 {:08x} {:016x} {:016x}",
        stamp.sender, stamp.seq, stamp.sent_ns
    );
    buf.resize(size.max(HEADER_LEN), b'.');
}

/// Reads the stamp at the start of `data`, if it is a loadtest message.
pub fn decode(data: &[u8]) -> Option<Stamp> {
    if data.len() < HEADER_LEN || !data.starts_with(MAGIC) {
        return None;
    }
    let field = |from: usize, len: usize| -> Option<u64> {
        let s = std::str::from_utf8(&data[from..from + len]).ok()?;
        u64::from_str_radix(s, 16).ok()
    };
    Some(Stamp {
        sender: u32::try_from(field(4, 8)?).ok()?,
        seq: field(13, 16)?,
        sent_ns: field(30, 16)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrapped() {
        let s = Stamp {
            sender: 7,
            seq: 123_456,
            sent_ns: 99,
        };
        let mut buf = Vec::new();
        encode(&mut buf, s, 64);
        assert_eq!(buf.len(), 64);
        assert!(buf.is_ascii());
        assert_eq!(decode(&buf), Some(s));
        // A relay's default format appends ". from ip:port".
        buf.extend_from_slice(b". from 127.0.0.1:5");
        assert_eq!(decode(&buf), Some(s));
        encode(&mut buf, s, 10);
        assert_eq!(buf.len(), HEADER_LEN);
    }

    #[test]
    fn garbage_is_not_a_stamp() {
        assert_eq!(decode(b"bye"), None);
        assert_eq!(decode(&[b'x'; 64]), None);
        let mut bad = b"lt1 zzzzzzzz ".to_vec();
        bad.resize(64, b'.');
        assert_eq!(decode(&bad), None);
    }
}
