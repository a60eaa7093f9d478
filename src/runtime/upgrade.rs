//! The in-place upgrade (SIGUSR2): a relay serving hand-overs (`--control`)
//! starts its successor itself — the binary at the path it was started
//! from (resolved at start: after an upgrade the file there is the new
//! binary), with its own command line plus `--takeover` — as its own child,
//! so that under systemd the successor runs in the service's cgroup and
//! systemd follows it as the service's main process (`MAINPID=`, see
//! [`crate::runtime::readiness`]). The child takes over through the
//! ordinary hand-over ([`crate::runtime::handover`]); this module only
//! starts it and watches it.
//!
//! Bounded: one upgrade at a time (another SIGUSR2 meanwhile is logged
//! and ignored); a watcher thread reaps a child that exits without taking
//! over (logging its status: no zombie) and kills one that neither takes
//! over nor exits within [`UPGRADE_PATIENCE`]. Nothing waits on the child:
//! when it takes over, this process exits and the child is re-parented
//! (to systemd, under systemd).
//!
//! It also owns the cgroup comparison the old relay makes of a
//! `--takeover` peer under systemd ([`same_cgroup`]), and remembers that
//! peer's pid ([`note_peer`]) so that the old relay can tell systemd who
//! the main process is before it exits.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// How long a child started by SIGUSR2 may take to take over or exit. Its
/// own steps are bounded (each hand-over step by
/// [`crate::runtime::handover::STEP_TIMEOUT`], the metrics address by a
/// few seconds); one still running after this is stuck before it asked
/// for anything, and is killed so that the next SIGUSR2 can try again.
pub const UPGRADE_PATIENCE: Duration = Duration::from_secs(30);

/// How often the watcher looks at the child (std has no wait with a
/// timeout): a twentieth of a second between the child's exit and its
/// log line.
const WATCH_INTERVAL: Duration = Duration::from_millis(50);

/// The pid of the last process seen at the other end of the control
/// socket (0: none). The supervisor serves one connection at a time, so
/// after a hand-over it is the successor's.
static PEER: AtomicU32 = AtomicU32::new(0);

/// Records `pid` as the process at the other end of the control socket
/// (the old relay, as it checks a peer).
pub fn note_peer(pid: u32) {
    PEER.store(pid, Ordering::SeqCst);
}

/// The process that took this one over, if a peer was seen: systemd is
/// told it is the service's main process now.
pub fn successor() -> Option<u32> {
    Some(PEER.load(Ordering::SeqCst)).filter(|&pid| pid != 0)
}

/// Whether two processes whose `/proc/PID/cgroup` texts are `mine` and
/// `theirs` share every cgroup: what a child of a service's process does
/// (it inherits them all), and a process started from a shell,
/// `systemd-run` or another unit does not. An empty or unreadable text
/// (the peer already exited) never matches.
pub fn same_cgroup(mine: &str, theirs: &str) -> bool {
    !mine.trim().is_empty() && mine == theirs
}

/// What SIGUSR2 needs, resolved at start.
#[derive(Debug)]
pub struct Upgrade {
    /// The binary this process was started from, resolved at start: after
    /// a package upgrade the file at that path is the new binary, while
    /// `/proc/self/exe` names the old one (deleted).
    exe: Result<PathBuf, String>,
    /// This process's arguments after the program name, without any
    /// `--takeover` (the successor gets its own).
    args: Vec<OsString>,
    /// `--control`: what the successor takes over through; without it
    /// there is no upgrade.
    control: Option<PathBuf>,
    /// The child's pid while one runs (0: none); cleared by its watcher.
    running: Arc<AtomicU32>,
}

impl Upgrade {
    /// Resolves this process's binary and command line (call it at
    /// start); `control` is `--control`.
    pub fn prepare(control: Option<&Path>) -> Upgrade {
        let mut args = std::env::args_os();
        let exe = binary_path(
            args.next().as_deref(),
            std::env::current_dir().ok().as_deref(),
            std::env::var_os("PATH").as_deref(),
            std::env::current_exe,
        );
        Upgrade::new(exe, args, control)
    }

    fn new(
        exe: Result<PathBuf, String>,
        args: impl IntoIterator<Item = OsString>,
        control: Option<&Path>,
    ) -> Upgrade {
        Upgrade {
            exe,
            args: without_takeover(args),
            control: control.map(Path::to_path_buf),
            running: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The successor's arguments: this process's, then `--takeover PATH`.
    fn successor_args(&self, control: &Path) -> Vec<OsString> {
        let mut args = self.args.clone();
        args.push("--takeover".into());
        args.push(control.as_os_str().to_owned());
        args
    }

    /// SIGUSR2: starts the successor, unless one runs already or there is
    /// no `--control` (each said in one log line).
    pub fn start(&mut self) {
        let Some(control) = self.control.clone() else {
            tracing::warn!(
                event = "upgrade_refused",
                "SIGUSR2: no upgrade without a control socket: start the relay with --control PATH (the systemd unit's ExecStart has --control /run/udphub/control); serving on"
            );
            return;
        };
        if std::process::id() == 1 {
            tracing::error!(
                event = "upgrade_refused",
                "SIGUSR2: this relay is process 1 (a container without an init): once it handed over and exited, the kernel would end every process of the container, its successor and all the members with it; upgrade by replacing the container (a rolling restart) instead; serving on"
            );
            return;
        }
        let running = self.running.load(Ordering::SeqCst);
        if running != 0 {
            tracing::info!(
                event = "upgrade_ignored",
                pid = running,
                "SIGUSR2: an upgrade is already under way (process {running}); ignored"
            );
            return;
        }
        let exe = match &self.exe {
            Ok(exe) => exe.clone(),
            Err(why) => {
                tracing::error!(
                    event = "upgrade_failed",
                    error = %why,
                    "SIGUSR2: cannot upgrade: {why}; serving on (restart the service instead)"
                );
                return;
            }
        };
        if !exe.exists() {
            tracing::error!(
                event = "upgrade_failed",
                exe = %exe.display(),
                "SIGUSR2: cannot upgrade: {} (the binary this relay was started from) no longer exists; install the new binary at that path and send SIGUSR2 again; serving on",
                exe.display()
            );
            return;
        }
        // The watcher first: a child nobody would reap is never started.
        let (hand, child_rx) = mpsc::channel::<Child>();
        let running = Arc::clone(&self.running);
        let watcher = thread::Builder::new()
            .name("udphub-upgrade".into())
            .spawn(move || {
                // No child (the spawn failed): `running` was never set,
                // and a later attempt's pid must not be cleared.
                if let Ok(child) = child_rx.recv() {
                    let pid = child.id();
                    watch(child);
                    let _ = running.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
                }
            });
        if let Err(e) = watcher {
            tracing::error!(event = "upgrade_failed", error = %e, "SIGUSR2: cannot start the thread that watches the new process ({e}); serving on");
            return;
        }
        // stdout and stderr are this process's (the journal, under
        // systemd); every descriptor of this process is close-on-exec:
        // the UDP sockets pass through the control socket, not here.
        let spawned = Command::new(&exe)
            .args(self.successor_args(&control))
            .stdin(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                tracing::error!(
                    event = "upgrade_failed",
                    exe = %exe.display(),
                    error = %e,
                    "SIGUSR2: cannot start {}: {e}; serving on",
                    exe.display()
                );
                // The watcher's channel closes: it ends.
                return;
            }
        };
        let pid = child.id();
        tracing::info!(
            event = "upgrade",
            pid,
            exe = %exe.display(),
            control = %control.display(),
            "SIGUSR2: upgrading: started {} as process {pid} to take over through --control {}",
            exe.display(),
            control.display()
        );
        self.running.store(pid, Ordering::SeqCst);
        // The receiver lives until it has the child (the thread waits on
        // nothing else): the send cannot fail.
        let _ = hand.send(child);
    }
}

/// Waits (bounded) for `child` to exit and logs how; kills it if it has
/// neither exited nor taken over within [`UPGRADE_PATIENCE`]. When it
/// takes over, this process exits while this thread still waits.
fn watch(mut child: Child) {
    let pid = child.id();
    let deadline = Instant::now() + UPGRADE_PATIENCE;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(
                    event = "upgrade_failed",
                    pid,
                    status = %status,
                    "upgrade: process {pid} exited ({status}) without taking over (its log says why); serving on, every member kept"
                );
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "upgrade_failed", pid, error = %e, "upgrade: cannot wait for process {pid}: {e}");
                return;
            }
        }
        // Not while a hand-over is under way: it ends (well or not)
        // within its own steps.
        if Instant::now() >= deadline && !crate::runtime::handover::in_progress() {
            let _ = child.kill();
            let status = child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            tracing::warn!(
                event = "upgrade_failed",
                pid,
                status = %status,
                "upgrade: process {pid} neither took over nor exited within {UPGRADE_PATIENCE:?}: killed ({status}); serving on"
            );
            return;
        }
        thread::sleep(WATCH_INTERVAL);
    }
}

/// The path this process was started from: its `argv[0]` when that names
/// a path (`/usr/local/bin/udphub` as `ExecStart=` says it; a relative
/// one made absolute against `cwd`, the directory at start), a bare name
/// as the shell found it on `path` (`PATH` at start, absolute directories
/// only), else what the kernel says it runs (`current_exe`). The argument
/// first: where the installed path is a symlink to a versioned file, an
/// upgrade repoints the symlink, and `current_exe` would name the old
/// file (symlinks resolved).
fn binary_path(
    argv0: Option<&OsStr>,
    cwd: Option<&Path>,
    path: Option<&OsStr>,
    current_exe: impl FnOnce() -> std::io::Result<PathBuf>,
) -> Result<PathBuf, String> {
    use std::os::unix::ffi::OsStrExt;
    if let Some(argv0) = argv0.filter(|a| a.as_bytes().contains(&b'/')) {
        let path = Path::new(argv0);
        if path.is_absolute() {
            return Ok(path.to_path_buf());
        }
        if let Some(cwd) = cwd {
            return Ok(cwd.join(path));
        }
    }
    if let (Some(name), Some(path)) = (argv0.filter(|a| !a.is_empty()), path) {
        let found = std::env::split_paths(path)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file());
        if let Some(found) = found {
            return Ok(found);
        }
    }
    current_exe().map_err(|e| format!("cannot tell which binary this process runs: {e}"))
}

/// `args` without `--takeover PATH` or `--takeover=PATH` (a process that
/// took over once is upgraded the same way again; clap refuses the flag
/// twice). Nothing after `--` is touched.
fn without_takeover(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(args);
            break;
        }
        if arg == "--takeover" {
            let _ = args.next();
            continue;
        }
        if starts_with(&arg, "--takeover=") {
            continue;
        }
        out.push(arg);
    }
    out
}

fn starts_with(arg: &OsStr, prefix: &str) -> bool {
    use std::os::unix::ffi::OsStrExt;
    arg.as_bytes().starts_with(prefix.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    /// The successor gets this process's arguments and its own
    /// `--takeover`, whatever form an earlier one had.
    #[test]
    fn the_successor_runs_the_same_command_line_and_takes_over() {
        let up = Upgrade::new(
            Ok("/usr/bin/udphub".into()),
            os(&[
                "serve",
                "--takeover",
                "/old",
                "--config",
                "/etc/u.toml",
                "--takeover=/older",
                "--control",
                "/run/c",
            ]),
            Some(Path::new("/run/c")),
        );
        assert_eq!(
            up.successor_args(Path::new("/run/c")),
            os(&[
                "serve",
                "--config",
                "/etc/u.toml",
                "--control",
                "/run/c",
                "--takeover",
                "/run/c"
            ])
        );
        assert_eq!(
            without_takeover(os(&["serve", "--", "--takeover", "x"])),
            os(&["serve", "--", "--takeover", "x"])
        );
    }

    /// The binary is the path the process was started as (made absolute
    /// at start), a bare name as found on `PATH`, else the kernel's.
    #[test]
    fn the_binary_is_the_path_started_from() {
        let kernel = || Ok(PathBuf::from("/opt/udphub-1.2/udphub"));
        let cwd = Some(Path::new("/srv"));
        let path = |argv0: Option<&str>| binary_path(argv0.map(OsStr::new), cwd, None, kernel);
        assert_eq!(
            path(Some("/usr/local/bin/udphub")),
            Ok("/usr/local/bin/udphub".into())
        );
        assert_eq!(path(Some("./bin/udphub")), Ok("/srv/./bin/udphub".into()));
        assert_eq!(path(Some("udphub")), Ok("/opt/udphub-1.2/udphub".into()));
        assert_eq!(path(None), Ok("/opt/udphub-1.2/udphub".into()));
        let gone = binary_path(Some(OsStr::new("udphub")), cwd, None, || {
            Err(std::io::Error::other("no /proc"))
        });
        assert!(gone.unwrap_err().contains("no /proc"));
        // A bare name is looked up on PATH (absolute directories only),
        // not resolved through symlinks by the kernel.
        let dir = std::env::temp_dir().join(format!("udphub-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("udphub-x"), b"").unwrap();
        let search = std::env::join_paths([
            "relative/bin".into(),
            PathBuf::from("/nonexistent"),
            dir.clone(),
        ])
        .unwrap();
        assert_eq!(
            binary_path(Some(OsStr::new("udphub-x")), cwd, Some(&search), kernel),
            Ok(dir.join("udphub-x"))
        );
        assert_eq!(
            binary_path(Some(OsStr::new("udphub-y")), cwd, Some(&search), kernel),
            Ok("/opt/udphub-1.2/udphub".into()),
            "not on PATH: the kernel's"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A child of the service shares its cgroups; a process elsewhere (or
    /// gone: nothing read) does not.
    #[test]
    fn only_a_process_in_the_same_cgroups_is_of_the_service() {
        let service = "0::/system.slice/udphub.service\n";
        assert!(same_cgroup(service, service));
        assert!(!same_cgroup(
            service,
            "0::/user.slice/user-1000.slice/session-2.scope\n"
        ));
        assert!(!same_cgroup(
            service,
            "0::/system.slice/udphub.service/sub\n"
        ));
        assert!(!same_cgroup(service, ""));
        assert!(!same_cgroup("", ""));
        let hybrid =
            "1:name=systemd:/system.slice/udphub.service\n0::/system.slice/udphub.service\n";
        assert!(same_cgroup(hybrid, hybrid));
        assert!(!same_cgroup(
            hybrid,
            "1:name=systemd:/system.slice/other.service\n0::/system.slice/udphub.service\n"
        ));
    }

    /// A binary that is gone is said so, and nothing starts; without
    /// `--control` nothing starts either.
    #[test]
    fn no_upgrade_without_control_or_binary() {
        let mut up = Upgrade::new(
            Ok("/nonexistent/udphub".into()),
            os(&["serve"]),
            Some(Path::new("/run/c")),
        );
        up.start();
        assert_eq!(up.running.load(Ordering::SeqCst), 0);
        let mut up = Upgrade::new(Ok("/bin/true".into()), os(&["serve"]), None);
        up.start();
        assert_eq!(up.running.load(Ordering::SeqCst), 0);
    }
}
