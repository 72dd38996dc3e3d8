use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long `GatewayBuilder::start` waits for `/healthz` to answer 200.
const READY_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval while waiting for readiness or exit.
const POLL: Duration = Duration::from_millis(50);

/// A port that was free on 127.0.0.1 a moment ago (bound to 0, read, released).
///
/// A port is handed out at most once per test process: the kernel may
/// offer a just-released port again, and two gateways of parallel tests
/// must never be told the same one before either has bound it.
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0 to find a free port")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
    panic!("no fresh free port after 1000 tries");
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The config most gateway tests start from: two threads, a one-second
/// shutdown, one upstream `mall` at `mall` (connect 500 ms, read 10 s)
/// that is the default, and the rules in `lua-free-rules/*.yaml`. `top`
/// adds top-level lines (each ending in a newline), `upstream` lines under
/// `mall` (indented four spaces, each ending in a newline).
pub fn mall_config(mall: SocketAddr, top: &str, upstream: &str) -> String {
    format!(
        "listen: ${{LISTEN}}\n\
         admin: {{ listen: ${{ADMIN}} }}\n\
         threads: 2\n\
         shutdown: {{ grace_period: 1s, timeout: 1s }}\n\
         {top}\
         upstreams:\n  mall:\n    servers: [{mall}]\n{upstream}    connect_timeout: 500ms\n    read_timeout: 10s\n\
         default_upstream: mall\n\
         rules: lua-free-rules/*.yaml\n"
    )
}

/// The `sluice` binary under test: `$SLUICE_BIN` when set, else the one
/// cargo built beside the running test or bench (`target/<profile>/sluice`;
/// the test itself runs from `target/<profile>/deps/`). Cargo builds a
/// package's binaries before its integration tests and benches.
pub fn sluice_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("path of the running test");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir.join(format!("sluice{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} not found: build it (cargo test / cargo bench do) or set SLUICE_BIN",
        bin.display()
    );
    bin
}

/// A `Command` for the `sluice` binary under test (e.g. for `sluice check`).
pub fn sluice_cmd() -> Command {
    Command::new(sluice_bin())
}

/// Value of the first sample of exactly `name` whose labels include all of `labels`.
pub fn metric_value(metrics_text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics_text.lines().find_map(|line| {
        let (sample_name, sample_labels, value) = parse_sample(line)?;
        if sample_name != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v));
        all.then_some(value)
    })
}

/// A sample's label pairs, in line order.
type Labels = Vec<(String, String)>;

/// Parses a Prometheus text sample line `name{a="b"} value [ts]`; `None` for comments/blank/garbage.
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices().peekable();
        let end = loop {
            // Skip separators and whitespace before a label name or the closing brace.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let (start, c) = chars.next()?;
            if c == '}' {
                break start + 1;
            }
            let mut key_end = start + c.len_utf8();
            loop {
                let (i, c) = chars.next()?;
                if c == '=' {
                    break;
                }
                key_end = i + c.len_utf8();
            }
            let key = after_brace[start..key_end].trim().to_string();
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        };
        rest = &after_brace[end..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, labels, value))
}

/// Collects the config, extra files and environment for a gateway process.
#[derive(Default)]
pub struct GatewayBuilder {
    /// gateway.yaml text with `${LISTEN}`/`${ADMIN}` placeholders.
    config: Option<String>,
    /// Extra files, relative to the temp dir.
    files: Vec<(String, String)>,
    /// Extra environment variables for the process.
    env: Vec<(String, String)>,
    /// `RLIMIT_NOFILE` (soft, hard) for the process, as `ulimit -n` would set it.
    fd_limit: Option<(u64, u64)>,
    /// Pass `--config gateway.yaml`, relative to its folder (the working
    /// directory), as an operator would.
    relative_config: bool,
}

impl GatewayBuilder {
    /// Starts the process with `--config gateway.yaml`, relative to its
    /// working directory (the gateway's folder), instead of the full path.
    pub fn relative_config(mut self) -> Self {
        self.relative_config = true;
        self
    }

    /// Sets the gateway.yaml text; `${LISTEN}` and `${ADMIN}` become free loopback addresses.
    pub fn config(mut self, yaml: &str) -> Self {
        self.config = Some(yaml.to_string());
        self
    }

    /// Adds a file at `relative_path` under the gateway's temp dir (parents created).
    pub fn file(mut self, relative_path: &str, contents: &str) -> Self {
        assert!(
            Path::new(relative_path).is_relative(),
            "GatewayBuilder::file wants a relative path, got {relative_path}"
        );
        self.files
            .push((relative_path.to_string(), contents.to_string()));
        self
    }

    /// Sets an environment variable for the gateway process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the process with its file-descriptor limit at `soft`/`hard`
    /// (`hard` must not exceed the test's own hard limit).
    pub fn fd_limit(mut self, soft: u64, hard: u64) -> Self {
        self.fd_limit = Some((soft, hard));
        self
    }

    /// Writes the files, spawns `sluice run --config <dir>/gateway.yaml`, and waits for
    /// `/healthz` and the main listener.
    pub fn start(self) -> Gateway {
        let config = self
            .config
            .expect("GatewayBuilder::start needs a config(yaml) first");
        let dir = tempfile::tempdir().expect("create gateway temp dir");
        let listen = free_addr();
        let mut admin = free_addr();
        while admin == listen {
            admin = free_addr();
        }
        let config = config
            .replace("${LISTEN}", &listen.to_string())
            .replace("${ADMIN}", &admin.to_string());
        let config_path = dir.path().join("gateway.yaml");
        write_file(&config_path, &config);
        for (rel, contents) in &self.files {
            write_file(&dir.path().join(rel), contents);
        }

        let log_path = dir.path().join("gateway.log");
        let child = spawn_sluice(
            &config_path,
            &log_path,
            &self.env,
            self.fd_limit,
            (false, self.relative_config),
        );
        let mut gateway = Gateway {
            child,
            status: None,
            listen,
            admin,
            log_path,
            dir: std::sync::Arc::new(dir),
            env: self.env,
            fd_limit: self.fd_limit,
            log_reported: false,
        };
        gateway.wait_healthy();
        gateway
    }
}

/// Spawns `sluice run --config <config>` (with `--upgrade` if asked, and
/// the config named by its file name alone if `relative`) in the config's
/// folder, its stdout and stderr appended to `log`.
fn spawn_sluice(
    config: &Path,
    log: &Path,
    env: &[(String, String)],
    fd_limit: Option<(u64, u64)>,
    (upgrade, relative): (bool, bool),
) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open gateway log");
    let err = out.try_clone().expect("clone gateway log handle");
    let mut cmd = sluice_cmd();
    let named = match (relative, config.file_name()) {
        (true, Some(name)) => Path::new(name),
        _ => config,
    };
    cmd.arg("run").arg("--config").arg(named);
    if upgrade {
        cmd.arg("--upgrade");
    }
    cmd.current_dir(config.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    if !env.iter().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "info");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some((soft, hard)) = fd_limit {
        use std::os::unix::process::CommandExt;
        let limit = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: runs in the forked child before exec; setrlimit(2) is
        // async-signal-safe and the closure allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    cmd.spawn().expect("spawn sluice run")
}

/// Writes `contents` to `path`, creating parent directories.
fn write_file(path: &Path, contents: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("create dir {}: {e}", parent.display()));
    }
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A running `sluice run` process with its temp dir; SIGKILLed on drop.
pub struct Gateway {
    /// The gateway process.
    child: Child,
    /// Exit status once reaped.
    status: Option<ExitStatus>,
    /// Proxy listen address (`${LISTEN}`).
    listen: SocketAddr,
    /// Admin listen address (`${ADMIN}`).
    admin: SocketAddr,
    /// `<dir>/gateway.log`.
    log_path: PathBuf,
    /// Temp dir holding gateway.yaml, extra files and the log (shared
    /// with the process that upgrades this one).
    dir: std::sync::Arc<tempfile::TempDir>,
    /// Extra environment of the process.
    env: Vec<(String, String)>,
    /// Its file-descriptor limits, if set.
    fd_limit: Option<(u64, u64)>,
    /// Set when a panic message already carries the log, so Drop does not repeat it.
    log_reported: bool,
}

impl Gateway {
    /// A builder for a gateway process.
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// The proxy listen address (`${LISTEN}`).
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The admin listen address (`${ADMIN}`).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The temp dir with gateway.yaml, extra files and gateway.log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes (or replaces) a file under the temp dir, as an operator
    /// editing the config would; `${LISTEN}`/`${ADMIN}` are filled in.
    pub fn write(&self, relative_path: &str, contents: &str) {
        let contents = contents
            .replace("${LISTEN}", &self.listen.to_string())
            .replace("${ADMIN}", &self.admin.to_string());
        write_file(&self.dir.path().join(relative_path), &contents);
    }

    /// Everything the process wrote to stdout/stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many file descriptors the process has open now (`/proc/<pid>/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|dir| dir.count())
            .unwrap_or_else(|e| panic!("read /proc/{}/fd: {e}", self.child.id()))
    }

    /// The process's `RLIMIT_NOFILE` as (soft, hard), from `/proc/<pid>/limits`.
    pub fn fd_limits(&self) -> (u64, u64) {
        let path = format!("/proc/{}/limits", self.child.id());
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_else(|| panic!("no 'Max open files' in {path}"));
        let mut numbers = line
            .trim_start_matches("Max open files")
            .split_whitespace()
            .map(|n| n.parse::<u64>().unwrap_or(u64::MAX));
        match (numbers.next(), numbers.next()) {
            (Some(soft), Some(hard)) => (soft, hard),
            _ => panic!("cannot read limits from {line:?}"),
        }
    }

    /// Sends SIGTERM (no-op once the process has been reaped).
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Starts `sluice run --upgrade` on this gateway's config, dir and
    /// environment (its log in `gateway-upgrade-<n>.log`). It waits for
    /// the listening sockets, which this process hands over on SIGQUIT
    /// ([`Gateway::sigquit`]); then [`Gateway::wait_ready`] on it.
    pub fn upgrade(&self) -> Gateway {
        let mut n = 1;
        let log_path = loop {
            let candidate = self.dir.path().join(format!("gateway-upgrade-{n}.log"));
            if !candidate.exists() {
                break candidate;
            }
            n += 1;
        };
        let child = spawn_sluice(
            &self.dir.path().join("gateway.yaml"),
            &log_path,
            &self.env,
            self.fd_limit,
            (true, false),
        );
        Gateway {
            child,
            status: None,
            listen: self.listen,
            admin: self.admin,
            log_path,
            dir: self.dir.clone(),
            env: self.env.clone(),
            fd_limit: self.fd_limit,
            log_reported: false,
        }
    }

    /// Sends SIGQUIT: hand the listeners to an upgrading process, drain, exit.
    pub fn sigquit(&self) {
        self.signal(libc::SIGQUIT);
    }

    /// Waits for `/healthz` and the main listener (after an upgrade).
    pub fn wait_ready(&mut self) {
        self.wait_healthy();
    }

    /// Sends SIGHUP: reload the config.
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Sends `sig` unless the process has already been reaped (its pid may be reused).
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reaps the process if it exited, remembering the status.
    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Polls `/metrics` until the sample `name{labels}` equals `want`
    /// (requests are counted just after their answer is written), or
    /// panics after 10 s with the series it saw.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics().await;
            let got = metric_value(&text, name, labels);
            if got == Some(want) {
                return;
            }
            if std::time::Instant::now() >= deadline {
                let series: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
                panic!(
                    "{name}{labels:?}: want {want}, got {got:?}\n{}",
                    series.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /metrics` on the admin address; panics unless 200.
    pub async fn metrics(&self) -> String {
        let resp = crate::client::get(self.admin, "/metrics").await;
        assert_eq!(
            resp.status,
            200,
            "GET /metrics on {} answered {}: {}",
            self.admin,
            resp.status,
            resp.text()
        );
        resp.text()
    }

    /// Polls `/healthz` until 200; panics with exit status and log on early exit or timeout.
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Some(status) = self.try_wait() {
                self.log_reported = true;
                panic!(
                    "gateway exited before becoming healthy: {status}\n--- gateway.log ---\n{}",
                    self.log()
                );
            }
            // Healthy admin, and the main listener accepting too: pingora
            // starts its services side by side.
            if healthz_status(self.admin) == Some(200)
                && std::net::TcpStream::connect_timeout(&self.listen, POLL).is_ok()
            {
                return;
            }
            if Instant::now() >= deadline {
                self.kill();
                self.log_reported = true;
                panic!(
                    "gateway not healthy on http://{}/healthz within {READY_DEADLINE:?} (killed, {:?})\n--- gateway.log ---\n{}",
                    self.admin,
                    self.status,
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Gateway {
    /// SIGKILLs the process if still running; prints the log if the test is failing.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && !self.log_reported {
            eprintln!(
                "--- gateway.log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Blocking `GET /healthz` with short timeouts; the status code, or `None` on any error.
fn healthz_status(admin: SocketAddr) -> Option<u16> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&admin, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}
