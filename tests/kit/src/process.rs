//! A harness for `tapledger-node` processes: commands that inherit none of
//! the caller's `TAPLEDGER_*` settings, bounded waits, loopback addresses
//! nobody listens on, and [`NodeProcess`], a `run` whose readiness is read
//! from what it prints on stdout (`listening on …`, `metrics on …`,
//! `replicating on …`) and which is killed if the test ends without
//! stopping it.
//!
//! The binary's path is the caller's: only the node's own integration tests
//! know it (`env!("CARGO_BIN_EXE_tapledger-node")`). Nothing here talks to a
//! node over QUIC; that is `wire` (feature `node`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tapledger_certs::Fingerprint;

/// A command for the binary at `bin` with no `TAPLEDGER_*` or `RUST_LOG`
/// variable inherited from the test's environment (a developer's settings
/// must not change what a test starts).
pub fn command(bin: &str) -> Command {
    let mut command = Command::new(bin);
    for (name, _) in std::env::vars() {
        if name.starts_with("TAPLEDGER_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command
}

/// Waits for `child` at most `limit`, killing it (and failing the test) if
/// it overstays.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tapledger-node did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` to its end (stdin empty, outputs captured), or kills it
/// after `limit`; `None` when it could not run or did not end in time.
pub fn output_within(mut command: Command, limit: Duration) -> Option<Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let pid = child.id();
    let (done, output) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match output.recv_timeout(limit) {
        Ok(output) => output.ok(),
        Err(_) => {
            // SAFETY: signalling our own child, not reaped yet (the thread
            // waiting on it is still blocked), so the pid is still its own.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            None
        }
    }
}

/// Runs `command` (bounded by `limit`), fails the test naming `what` unless
/// it succeeds, and returns its stdout.
pub fn run_ok(command: Command, limit: Duration, what: &str) -> String {
    let output = output_within(command, limit)
        .unwrap_or_else(|| panic!("{what}: did not run or did not end within {limit:?}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Loopback addresses nobody listens on (ports the OS handed out and that
/// were released again), all distinct.
pub fn free_addrs(count: usize) -> Vec<SocketAddr> {
    let sockets: Vec<std::net::UdpSocket> = (0..count)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    sockets
        .iter()
        .map(|socket| socket.local_addr().expect("address"))
        .collect()
}

/// The last `lines` lines of each file, each under its name, for a failure
/// message.
pub fn log_tails<'a>(files: impl IntoIterator<Item = &'a Path>, lines: usize) -> String {
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            format!("--- {}\n{tail}\n", file.display())
        })
        .collect()
}

/// What a `tapledger-node run` has announced on stdout so far.
#[derive(Clone, Debug, Default)]
pub struct Announced {
    /// `listening on ADDR (fingerprint HEX)`: where phones connect, and the
    /// certificate fingerprint they pin.
    pub listening: Option<(SocketAddr, Fingerprint)>,
    /// `metrics on http://ADDR/metrics`: the HTTP server (metrics, health,
    /// the loopback admin endpoints).
    pub metrics: Option<SocketAddr>,
    /// `replicating on ADDR as replica N` was printed: the replica's Raft
    /// endpoint is up.
    pub replicating: bool,
}

impl Announced {
    /// Takes note of one stdout line; other lines are ignored.
    fn note(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("listening on ") {
            let (addr, rest) = rest.split_once(' ').expect("address and fingerprint");
            let hex = rest
                .trim_start_matches("(fingerprint ")
                .trim_end_matches(')');
            self.listening = Some((
                addr.parse().expect("QUIC address"),
                Fingerprint::parse(hex).expect("fingerprint"),
            ));
        } else if let Some(rest) = line.strip_prefix("metrics on http://") {
            let addr = rest.trim_end_matches("/metrics");
            self.metrics = Some(addr.parse().expect("HTTP address"));
        } else if line.starts_with("replicating on ") {
            self.replicating = true;
        }
    }

    /// Phones connect here once the node listens.
    pub fn listens(&self) -> bool {
        self.listening.is_some()
    }
}

/// Spawns `command` (a `tapledger-node … run`) with stdin empty, stdout
/// piped and stderr appended to `log`, without waiting for anything (a test
/// that kills a node while it starts).
pub fn spawn_node(mut command: Command, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn tapledger-node run")
}

/// A running `tapledger-node run`, killed (SIGKILL) when dropped unless it
/// was stopped.
pub struct NodeProcess {
    child: Child,
    /// Where its stderr (the log) is appended.
    pub log: PathBuf,
    /// What it printed until it was ready.
    pub announced: Announced,
    /// Its later stdout lines. Kept (and so read) for the process's life, so
    /// that a write to stdout never meets a closed pipe.
    _stdout: mpsc::Receiver<String>,
}

impl NodeProcess {
    /// Spawns `command` as [`spawn_node`] does and reads its stdout until
    /// `ready` holds for what it announced; fails the test with the log, and
    /// kills the process, if that takes longer than `limit`.
    pub fn start(
        command: Command,
        log: &Path,
        limit: Duration,
        ready: impl Fn(&Announced) -> bool,
    ) -> NodeProcess {
        let mut child = spawn_node(command, log);
        let stdout = child.stdout.take().expect("stdout");
        let (lines, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut announced = Announced::default();
        let deadline = Instant::now() + limit;
        while !ready(&announced) {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(line) => announced.note(&line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "the node at {} did not get ready within {limit:?}; log:\n{}",
                        log.display(),
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
        }
        NodeProcess {
            child,
            log: log.to_path_buf(),
            announced,
            _stdout: receiver,
        }
    }

    /// Where phones connect. Panics if the node was started without waiting
    /// for `listening on`.
    pub fn quic(&self) -> SocketAddr {
        self.listening().0
    }

    /// The fingerprint phones pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.listening().1
    }

    fn listening(&self) -> (SocketAddr, Fingerprint) {
        self.announced
            .listening
            .expect("the node was started without waiting until it listens")
    }

    /// Its HTTP server. Panics if it was not announced before `ready`.
    pub fn http(&self) -> SocketAddr {
        self.announced
            .metrics
            .expect("the node was started without waiting for its metrics address")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// Sends SIGTERM and waits at most `limit` for the process to exit
    /// (failing the test beyond); returns how it exited and its log.
    pub fn terminate(mut self, limit: Duration) -> (ExitStatus, String) {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let sent = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM delivered");
        let status = wait_bounded(&mut self.child, limit);
        (status, self.log_text())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // A test that panicked leaves no process behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
