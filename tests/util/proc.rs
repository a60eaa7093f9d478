//! A `udphub` child process (chat, send, echo) with piped stdin and its
//! stdout read line by line on a thread.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::{udphub_bin, PATIENCE};

/// A `udphub` child with piped stdin/stdout, lines of stdout on a channel.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its stdout, line by line.
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `udphub ARGS`.
    pub fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(udphub_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn udphub");
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Proc { child, lines: rx }
    }

    /// Writes one line to its stdin.
    pub fn write_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// The next stdout line containing `needle`, within PATIENCE.
    pub fn expect_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                if line.contains(needle) {
                    return line;
                }
                seen.push(line);
            }
        }
        panic!("no line with {needle:?}; saw {seen:?}");
    }

    /// Closes stdin, then waits (bounded) for exit; returns the code and stderr.
    pub fn wait(mut self) -> (Option<i32>, String) {
        drop(self.child.stdin.take());
        self.wait_with_stdin_open()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Like `wait`, but without closing stdin first (the exit must come
    /// from elsewhere).
    pub fn wait_with_stdin_open(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status.code(), err);
            }
            assert!(Instant::now() < deadline, "udphub did not exit");
            thread::sleep(Duration::from_millis(10));
        }
    }
}
