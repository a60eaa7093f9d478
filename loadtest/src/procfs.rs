//! What `/proc` says about a process: the relay's CPU time and memory;
//! loadtest's own threads' CPU time and wait for a core, and its sockets'
//! receive-buffer drops and backlog (to tell when loadtest, not the relay,
//! was the bottleneck).

/// Kernel clock ticks per second in `/proc/PID/stat` (USER_HZ, 100 on
/// every Linux architecture that matters).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds of the whole process (all threads).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// User + system CPU seconds of the calling thread.
pub fn thread_cpu_seconds() -> Option<f64> {
    stat_cpu_seconds("/proc/thread-self/stat")
}

fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces; fields start after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// Resident set size in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Nanoseconds the calling thread has spent runnable but waiting for a
/// core (`/proc/thread-self/schedstat`, second field): what a busy machine
/// costs a thread that its own CPU time does not show.
pub fn thread_run_delay_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// The UDP sockets bound to `ports`, summed: what the kernel dropped at
/// their full receive buffers, and the bytes waiting in them unread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketQueues {
    /// The `drops` column of `/proc/net/udp`.
    pub drops: u64,
    /// The `rx_queue` column: bytes received and not yet read.
    pub rx_queue_bytes: u64,
}

/// [`SocketQueues`] of the sockets bound to `ports` (`/proc/net/udp`, or
/// `udp6`); `None` when the table cannot be read.
pub fn socket_queues(ports: &[u16], ipv6: bool) -> Option<SocketQueues> {
    let table = if ipv6 {
        "/proc/net/udp6"
    } else {
        "/proc/net/udp"
    };
    let text = std::fs::read_to_string(table).ok()?;
    let ports: std::collections::HashSet<u16> = ports.iter().copied().collect();
    Some(queues_of(&text, &ports))
}

fn queues_of(text: &str, ports: &std::collections::HashSet<u16>) -> SocketQueues {
    let mut total = SocketQueues::default();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `sl local_address rem_address st tx_queue:rx_queue … drops`: the
        // port is the hex after the local address's ':', the queues hex,
        // the drops the last field.
        let Some(port) = fields
            .get(1)
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| u16::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !ports.contains(&port) {
            continue;
        }
        total.drops += fields.last().and_then(|d| d.parse().ok()).unwrap_or(0);
        total.rx_queue_bytes += fields
            .get(4)
            .and_then(|q| q.split(':').nth(1))
            .and_then(|q| u64::from_str_radix(q, 16).ok())
            .unwrap_or(0);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_bytes(me).unwrap() > 1024 * 1024);
        assert_eq!(cpu_seconds(u32::MAX), None);
        assert!(thread_cpu_seconds().is_some());
        assert!(thread_run_delay_seconds().is_some());
    }

    #[test]
    fn sums_the_queues_of_our_ports_only() {
        let text = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5\n\
  2: 0100007F:1F91 00000000:0000 07 00000000:00000240 00:00000000 00000000     0        0 1 2 0000000000000000 7\n\
  3: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 100\n";
        let ports = [0x1F90, 0x1F91].into_iter().collect();
        assert_eq!(
            queues_of(text, &ports),
            SocketQueues {
                drops: 12,
                rx_queue_bytes: 0x240
            }
        );
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        assert_eq!(socket_queues(&[port], false), Some(SocketQueues::default()));
        // A datagram waiting unread shows in its queue.
        sock.send_to(b"x", sock.local_addr().unwrap()).unwrap();
        let mut waited = 0;
        while socket_queues(&[port], false).unwrap().rx_queue_bytes == 0 && waited < 100 {
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 1;
        }
        assert!(socket_queues(&[port], false).unwrap().rx_queue_bytes > 0);
    }
}
