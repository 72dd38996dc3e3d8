//! A throwaway `mariadbd`: a fresh data dir made by `mariadb-install-db` in
//! a temporary directory, the server on a free loopback port with its
//! socket, pid file and error log in that directory and `root` without a
//! password, SIGKILLed and reaped on drop (the data dir goes with the temp
//! dir). Never the machine's own server on 3306.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::free_port;

/// How long a start waits for the server to greet a client: a cold InnoDB
/// start on a busy 2-core machine takes a few seconds.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// Run at start with full rights: `root` from 127.0.0.1 without a password
/// (mariadb-install-db makes `root@localhost`; this does not depend on
/// name resolution), and the database tests use.
const INIT_SQL: &str = "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';\n\
    GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;\n\
    CREATE DATABASE IF NOT EXISTS mall;\n";

/// A `mariadbd` child process on a loopback port, SIGKILLed on drop.
pub struct MariaDbServer {
    /// The running server.
    child: Child,
    /// Its loopback port.
    port: u16,
    /// Data dir, socket, pid file, error log; removed on drop.
    dir: tempfile::TempDir,
}

impl MariaDbServer {
    /// Makes a data dir and starts `mariadbd` on a free loopback port; the
    /// database `mall` exists. Panics, naming `scripts/setup`, when MariaDB
    /// is not installed.
    pub fn start() -> MariaDbServer {
        let (Some(mariadbd), Some(install_db)) = (
            find_program(&["mariadbd", "mysqld"]),
            find_program(&["mariadb-install-db", "mysql_install_db"]),
        ) else {
            panic!(
                "mariadbd / mariadb-install-db not found: run scripts/setup \
                 (it installs mariadb-server)"
            );
        };
        let dir = tempfile::tempdir().expect("create temp dir for mariadbd");
        let data = dir.path().join("data");
        let mut install = Command::new(&install_db);
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            // Its bootstrap server names temporary tables by pid in
            // TMPDIR: two installs sharing /tmp can take each other's.
            .env("TMPDIR", dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::null());
        if is_root() {
            install.arg("--user=root");
        }
        let out = install
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", install_db.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}{}",
            install_db.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let init = dir.path().join("init.sql");
        std::fs::write(&init, INIT_SQL).expect("write init.sql");

        // The picked port can be taken between probing and binding; retry.
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(&mariadbd, dir.path(), port);
            match wait_ready(port, &mut child, dir.path()) {
                Ok(()) => return MariaDbServer { child, port, dir },
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_err = e;
                }
            }
        }
        panic!("mariadbd did not start after 5 attempts: {last_err}");
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `mysql://root@127.0.0.1:port/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }

    /// The server's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("mysqld.sock")
    }

    /// The server's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for MariaDbServer {
    /// SIGKILLs and reaps the server; the temp dir (data included) goes next.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this process runs as root (mariadbd then needs `--user=root`).
fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The first of `names` in `PATH` or the sbin directories (where Debian
/// puts `mariadbd`, often not on a user's `PATH`).
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    names
        .iter()
        .flat_map(|n| dirs.iter().map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// Starts `mariadbd` on `port` with everything under `dir`. The settings
/// that differ from a default server only make a test server small and
/// quick: a 32 MiB buffer pool, no binary log, and the redo log flushed
/// once a second instead of at each commit (nothing here outlives a crash).
fn spawn(mariadbd: &Path, dir: &Path, port: u16) -> Child {
    let path = |name: &str| dir.join(name).display().to_string();
    let log = std::fs::File::create(dir.join("stdout.log")).expect("create mariadbd stdout log");
    let mut cmd = Command::new(mariadbd);
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", path("data")))
        .arg(format!("--socket={}", path("mysqld.sock")))
        .arg(format!("--pid-file={}", path("mariadbd.pid")))
        .arg(format!("--log-error={}", path("error.log")))
        .arg(format!("--init-file={}", path("init.sql")))
        .arg(format!("--tmpdir={}", dir.display()))
        .arg(format!("--port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--skip-networking=0")
        .arg("--skip-log-bin")
        .arg("--innodb-buffer-pool-size=32M")
        .arg("--innodb-flush-log-at-trx-commit=2")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            log.try_clone().expect("clone mariadbd log handle"),
        ))
        .stderr(Stdio::from(log));
    if is_root() {
        cmd.arg("--user=root");
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", mariadbd.display()))
}

/// Waits until the server sends its protocol-10 greeting on `port`, or the
/// process exits, or the deadline passes.
fn wait_ready(port: u16, child: &mut Child, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + READY_DEADLINE;
    let error_log = || std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "mariadbd on port {port} exited early: {status}\n--- error.log ---\n{}",
                error_log()
            ));
        }
        if greets(port) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "mariadbd on port {port} did not greet within {READY_DEADLINE:?}\n--- error.log ---\n{}",
                error_log()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a client connecting to `port` gets a MySQL handshake packet
/// (protocol version 10) rather than an error packet or nothing.
fn greets(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    // 3-byte length, 1-byte sequence, then the payload's first byte.
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).is_ok() && head[4] == 10
}
