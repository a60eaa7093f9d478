//! What `/proc` says about a process: the relay's CPU time and memory;
//! loadtest's own threads' CPU time and its sockets' receive-buffer drops
//! (to tell when loadtest, not the relay, was the bottleneck).

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

/// Datagrams the kernel dropped at the full receive buffers of the UDP
/// sockets bound to `ports` (the `drops` column of `/proc/net/udp`, or
/// `udp6`), summed; `None` when the table cannot be read.
pub fn socket_drops(ports: &[u16], ipv6: bool) -> Option<u64> {
    let table = if ipv6 {
        "/proc/net/udp6"
    } else {
        "/proc/net/udp"
    };
    let text = std::fs::read_to_string(table).ok()?;
    let ports: std::collections::HashSet<u16> = ports.iter().copied().collect();
    Some(drops_of(&text, &ports))
}

fn drops_of(text: &str, ports: &std::collections::HashSet<u16>) -> u64 {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `sl local_address rem_address st … drops`: the port is the hex
            // after the local address's ':', the drops the last field.
            let port = fields.get(1)?.rsplit(':').next()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            if !ports.contains(&port) {
                return None;
            }
            fields.last()?.parse::<u64>().ok()
        })
        .sum()
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
    }

    #[test]
    fn sums_the_drops_of_our_ports_only() {
        let text = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5\n\
  2: 0100007F:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 7\n\
  3: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 100\n";
        let ports = [0x1F90, 0x1F91].into_iter().collect();
        assert_eq!(drops_of(text, &ports), 12);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        assert_eq!(socket_drops(&[port], false), Some(0));
    }
}
