use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::free_port;

/// The server's unix socket, in its temp dir.
const SOCKET: &str = "redis.sock";

/// How long `start`/`restart` wait for the server to answer `PING`.
const READY_DEADLINE: Duration = Duration::from_secs(10);

/// A `redis-server` child process on a loopback port, SIGKILLed on drop.
pub struct RedisServer {
    /// The running process, `None` after `kill`.
    child: Option<Child>,
    /// The loopback port the server listens on (kept across restarts).
    port: u16,
    /// Working directory for the server, so nothing lands in the repository.
    dir: tempfile::TempDir,
    /// Whether it keeps an append-only file (`appendfsync always`).
    aof: bool,
}

impl RedisServer {
    /// Starts an empty, non-persistent `redis-server` on a free loopback port.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// Starts a `redis-server` that writes every change to an append-only
    /// file in its temporary dir (`appendfsync always`): a `restart` after
    /// `kill` comes back with the data.
    pub fn start_with_aof() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> RedisServer {
        if !on_path("redis-server") {
            panic!("redis-server not found: install it with apt-get install -y redis-server");
        }
        let dir = tempfile::tempdir().expect("create temp dir for redis-server");
        // The picked port can be taken between probing and binding; retry a few times.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(port, dir.path(), aof);
            match wait_ready(port, &mut child) {
                Ok(()) => {
                    return RedisServer {
                        child: Some(child),
                        port,
                        dir,
                        aof,
                    }
                }
                Err(e) => {
                    reap(&mut child);
                    last_err = e;
                }
            }
        }
        panic!("redis-server did not start after 5 attempts: {last_err}");
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `127.0.0.1:port` address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The connection URL `redis://127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The connection URL of its unix socket, `unix:///<dir>/redis.sock`.
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.dir.path().join(SOCKET).display())
    }

    /// How many times Redis ran the command `name` (lowercase) since it
    /// started, from `INFO commandstats`.
    pub fn calls(&self, name: &str) -> u64 {
        let info = self.command(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{name}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Sends one command (as a RESP array) and gives the reply: the line of
    /// a simple reply (`:3`, `+OK`, `-ERR ...`) or the text of a bulk one
    /// (`INFO`); panics when the server does not answer.
    pub fn command(&self, args: &[&str]) -> String {
        let mut stream = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect to redis {}: {e}", self.addr()));
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream
            .write_all(out.as_bytes())
            .expect("send redis command");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&got[..end]).into_owned();
                let Some(len) = line.strip_prefix('$') else {
                    return line;
                };
                let len: usize = len.parse().unwrap_or(0);
                if got.len() >= end + 2 + len {
                    return String::from_utf8_lossy(&got[end + 2..end + 2 + len]).into_owned();
                }
            }
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => {
                    panic!("redis {} closed before replying to {args:?}", self.addr())
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// SIGKILLs the server and reaps it; connecting afterwards is refused.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap(&mut child);
        }
    }

    /// SIGSTOPs the server: connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONTs a frozen server: it answers what piled up.
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Kills the server if running and starts it again on the same port:
    /// empty, or with its append-only file when started with one.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_DEADLINE;
        // The port is ours, but a lingering socket may delay the bind briefly.
        loop {
            let mut child = spawn(self.port, self.dir.path(), self.aof);
            match wait_ready(self.port, &mut child) {
                Ok(()) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => {
                    reap(&mut child);
                    if Instant::now() >= deadline {
                        panic!(
                            "redis-server did not restart on port {} within {:?}: {e}",
                            self.port, READY_DEADLINE
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Drop for RedisServer {
    /// SIGKILLs the server if it is still running.
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether an executable named `name` is in a `PATH` directory.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// Spawns `redis-server` on `port` in `dir`, with an fsync-always
/// append-only file or without persistence; output discarded.
fn spawn(port: u16, dir: &Path, aof: bool) -> Child {
    let appendonly = if aof { "yes" } else { "no" };
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", appendonly])
        .args(["--appendfsync", "always"])
        .args(["--dir", &dir.to_string_lossy()])
        .args(["--unixsocket", &dir.join(SOCKET).to_string_lossy()])
        .args(["--unixsocketperm", "700"])
        .args(["--daemonize", "no"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server")
}

/// SIGKILLs and waits for `child`, ignoring an already-exited process.
fn reap(child: &mut Child) -> Option<ExitStatus> {
    let _ = child.kill();
    child.wait().ok()
}

/// Waits until `PING` on `port` answers `+PONG`, or the process exits, or the deadline passes.
fn wait_ready(port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server on port {port} exited early: {status}"
            ));
        }
        if ping(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "redis-server on port {port} did not answer PING within {READY_DEADLINE:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a raw `PING` to `127.0.0.1:port` and reports whether `+PONG` came back.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 7 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"+PONG")
}
