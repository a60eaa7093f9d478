//! systemd's readiness protocol (`sd_notify`): under `Type=notify` the
//! service manager passes `NOTIFY_SOCKET`, a Unix datagram socket, and
//! waits for `READY=1` before it calls the service started; `STOPPING=1`
//! says the service is shutting down. After a hand-over inside the
//! service (SIGUSR2, [`crate::runtime::upgrade`]) the process that took
//! over says `MAINPID=<its pid>` with its `READY=1`, and the one that
//! handed over names it as `MAINPID=` before it exits (never
//! `STOPPING=1`: the service goes on).
//!
//! Written by hand rather than with the `sd-notify` crate: it is one
//! datagram to one address. Bounded: the socket is non-blocking, each
//! message is one `send_to` that either goes or is logged, and nothing
//! ever waits on systemd. Without `NOTIFY_SOCKET` (not under systemd, or
//! `Type=exec`) every call does nothing.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;

/// Where to tell systemd, if it listens.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// `NOTIFY_SOCKET` as given: a path, or `@name` for an abstract socket.
    target: Option<OsString>,
    /// This process took over from the service's main process: its
    /// `READY=1` comes with `MAINPID=` (systemd then follows it).
    successor: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` once (at start).
    pub fn from_env() -> Notifier {
        Notifier {
            target: std::env::var_os("NOTIFY_SOCKET").filter(|t| !t.is_empty()),
            successor: false,
        }
    }

    /// A notifier that tells nobody.
    pub fn none() -> Notifier {
        Notifier {
            target: None,
            successor: false,
        }
    }

    /// A notifier that tells the socket at `path` (tests).
    #[cfg(test)]
    pub(crate) fn at(path: &std::path::Path) -> Notifier {
        Notifier {
            target: Some(path.as_os_str().to_owned()),
            successor: false,
        }
    }

    /// The same, for a process that takes over (`--takeover`): its
    /// [`ready`](Self::ready) says `MAINPID=<pid>` first.
    pub fn successor(self) -> Notifier {
        Notifier {
            successor: true,
            ..self
        }
    }

    /// `READY=1`; from a successor, `MAINPID=<pid>` and `READY=1` in one
    /// datagram (systemd reads `MAINPID=` first, and needs
    /// `NotifyAccess=all` to take it from a process that is not yet the
    /// main one).
    pub fn ready(&self) {
        if self.successor {
            self.notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        } else {
            self.notify("READY=1");
        }
    }

    /// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=…`), if systemd
    /// listens; a failure is logged, never fatal.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else {
            return;
        };
        if let Err(e) = send(target, state.as_bytes()) {
            tracing::warn!(
                event = "notify_failed",
                state = %state,
                notify_socket = %target.to_string_lossy(),
                error = %e,
                "cannot tell systemd {state:?} through NOTIFY_SOCKET {}: {e}",
                target.to_string_lossy()
            );
        }
    }
}

/// One non-blocking datagram to `target`.
fn send(target: &OsString, message: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    let bytes = target.as_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message, &addr)?
        }
        None => socket.send_to(message, std::path::Path::new(target))?,
    };
    if sent != message.len() {
        return Err(std::io::Error::other("short send"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_path_socket_and_an_abstract_one() {
        let dir = std::env::temp_dir().join(format!("udphub-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(path.clone().into_os_string()),
            successor: false,
        };
        n.ready();
        let mut buf = [0u8; 64];
        let got = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"READY=1");
        n.successor().ready();
        let got = listener.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..got],
            format!("MAINPID={}\nREADY=1", std::process::id()).as_bytes()
        );

        use std::os::linux::net::SocketAddrExt;
        let name = format!("udphub-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: Some(format!("@{name}").into()),
            successor: false,
        };
        n.notify("STOPPING=1");
        let got = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"STOPPING=1");
        // Nobody listening: logged, not fatal.
        let _ = std::fs::remove_file(&path);
        Notifier {
            target: Some(path.into_os_string()),
            successor: false,
        }
        .notify("READY=1");
        Notifier::none().notify("READY=1");
    }
}
