//! Debian's `nats-server` for the cluster tests: started on loopback on
//! ports it picks itself (read back from its log), optionally as one of a
//! routed cluster or with a configuration file (TLS, users), killed on
//! drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::PATIENCE;

/// A running nats-server.
pub struct Nats {
    child: Child,
    /// Its client port.
    pub port: u16,
    /// Its route port, if it is part of a cluster.
    pub route_port: Option<u16>,
    routes: Vec<u16>,
    /// Its configuration file and the environment it reads (`$VAR`s).
    config: Option<(PathBuf, Vec<(String, String)>)>,
}

fn port_after(line: &str, marker: &str) -> Option<u16> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.trim().rsplit(':').next()?.parse().ok()
}

impl Nats {
    /// A lone server on a port of its choosing.
    pub fn start() -> Nats {
        Nats::spawn(0, None, &[], None)
    }

    /// A server of a routed cluster, with routes to `routes` (route ports).
    pub fn start_routed(routes: &[u16]) -> Nats {
        Nats::spawn(0, Some(0), routes, None)
    }

    /// A lone server with the configuration file `config` (its `$VAR`s
    /// from `env`), on loopback on a port of its choosing.
    pub fn start_with(config: &Path, env: &[(&str, &str)]) -> Nats {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Nats::spawn(0, None, &[], Some((config.to_path_buf(), env)))
    }

    /// `tls://127.0.0.1:PORT`.
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(
        port: u16,
        route_port: Option<u16>,
        routes: &[u16],
        config: Option<(PathBuf, Vec<(String, String)>)>,
    ) -> Nats {
        assert!(
            super::require_tool("nats-server"),
            "nats-server is needed (tests/run.sh installs it)"
        );
        let mut cmd = Command::new("nats-server");
        if let Some((file, env)) = &config {
            // Flags after -c win over the file: the address stays loopback.
            cmd.arg("-c")
                .arg(file)
                .envs(env.iter().map(|(k, v)| (k, v)));
        }
        let p = if port == 0 {
            "-1".to_string()
        } else {
            port.to_string()
        };
        cmd.args(["-a", "127.0.0.1", "-p", &p]);
        if let Some(rp) = route_port {
            let rp = if rp == 0 {
                "-1".to_string()
            } else {
                rp.to_string()
            };
            cmd.args(["--cluster_name", "udphub-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{rp}")]);
            if !routes.is_empty() {
                let list: Vec<String> = routes
                    .iter()
                    .map(|r| format!("nats://127.0.0.1:{r}"))
                    .collect();
                cmd.args(["--routes", &list.join(",")]);
            }
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nats-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    // Keep draining so the server never blocks on its log.
                    continue;
                }
            }
        });
        let (mut client, mut route) = (None, None);
        let deadline = Instant::now() + PATIENCE;
        let mut seen = Vec::new();
        while client.is_none() || (route_port.is_some() && route.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left.max(Duration::from_millis(1))) else {
                let _ = child.kill();
                panic!("nats-server never got ready: {seen:?}");
            };
            client = client.or(port_after(&line, "Listening for client connections on"));
            route = route.or(port_after(&line, "Listening for route connections on"));
            seen.push(line);
        }
        Nats {
            child,
            port: client.unwrap_or_default(),
            route_port: route,
            routes: routes.to_vec(),
            config,
        }
    }

    /// Kills the server (as a crash would: no lame-duck goodbye).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + PATIENCE;
        loop {
            // The port may linger a moment after the kill.
            let again = std::panic::catch_unwind(|| {
                Nats::spawn(
                    self.port,
                    self.route_port,
                    &self.routes,
                    self.config.clone(),
                )
            });
            match again {
                Ok(n) => {
                    *self = n;
                    return;
                }
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}
