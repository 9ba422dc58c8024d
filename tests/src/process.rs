//! Child processes for tests: started on free loopback ports, their output
//! in a log file a failing test prints, killed (by their own pid, and only
//! them) when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starting daprd, Redis or a host takes a second or two; this is the bound
/// after which a test fails with the process's log rather than hanging.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Ports handed out come from here: below Linux's ephemeral range
/// (32768-60999 by default), which the kernel gives to outgoing connections
/// and to `bind(0)`. A port taken from that range (as `bind(0)` would give)
/// can be taken again by any client socket before the child binds it, which
/// made a host or daprd fail to start with "address already in use" now and
/// then on a busy machine.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1 for a child to listen on: never one this
/// process handed out before (until the range wraps), outside the ports the
/// kernel picks for clients, and bindable now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Each test process starts at its own place in the range, so two run
    // side by side do not walk the same ports.
    static NEXT: std::sync::OnceLock<AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7919)));
    let span = u32::from(PORTS.end - PORTS.start);
    for _ in 0..span {
        let port = PORTS.start + (next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        // Free on loopback and on all interfaces (daprd listens on both),
        // each listener closed before the next bind.
        let loopback = TcpListener::bind(("127.0.0.1", port)).is_ok();
        let any = loopback && TcpListener::bind(("0.0.0.0", port)).is_ok();
        if any {
            return port;
        }
    }
    panic!("no free port in {PORTS:?}");
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A tool's path from `$env` when it is set (scripts/test.sh sets it), else
/// what `script` (run from the repository, printing the path on stdout and
/// installing the tool if it must) prints.
pub fn script_output(env: &str, script: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let output = Command::new("bash")
        .arg(repo_root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(output.status.success(), "{script} failed");
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// A child process killed (by its pid) when dropped, with its output in a
/// log file that a failing test prints.
pub struct Process {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> Self {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self { name: name.to_owned(), child: Some(child), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to finish anything (a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn terminate(&mut self) {
        self.signal_terminate();
        if self.wait_exit(Duration::from_secs(20)).is_none() {
            self.kill();
        }
    }

    /// SIGTERM, without waiting: the stop begins.
    pub fn signal_terminate(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
    }

    /// Waits up to `limit` for the process to exit; its status, or `None`
    /// if it is still running (it is then left running).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: String = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            eprintln!("---- last lines of {} ({}) ----\n{tail}", self.name, self.log.display());
        }
    }
}

/// CPU time `pid` has used so far, in clock ticks (Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces): utime, stime are the
    // 12th and 13th fields.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Waits until `port` answers HTTP `GET path` with a 2xx (a host binds its
/// port before it has loaded its components, so an open port is not yet
/// a serving host); fails like [`wait_for_port`] on a stall: neither its
/// log nor its CPU time moved for [`START_TIMEOUT`] (compiling an 18 MB
/// component on a busy machine logs nothing for a minute, but uses CPU).
pub fn wait_for_http(port: u16, path: &str, process: &Process) {
    use std::io::{Read, Write};
    let mut last_log_len = 0;
    let mut last_cpu = 0;
    let mut since = Instant::now();
    loop {
        let answered = std::net::TcpStream::connect(("127.0.0.1", port)).ok().and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).ok()?;
            Some(head.starts_with(b"HTTP/1.1 2"))
        });
        if answered == Some(true) {
            return;
        }
        let log_len = std::fs::metadata(&process.log).map(|m| m.len()).unwrap_or(0);
        // A second of CPU counts as progress; an idle process's timer
        // threads use far less than that in a minute.
        let cpu = cpu_ticks(process.pid()).unwrap_or(0);
        if log_len != last_log_len || cpu >= last_cpu + 100 {
            (last_log_len, last_cpu, since) = (log_len, cpu, Instant::now());
        }
        assert!(since.elapsed() < START_TIMEOUT, "{} did not serve {path} on {port}:\n{}", process.name, process.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `port` accepts connections, or fails with the process's log
/// once it has written nothing new for [`START_TIMEOUT`]: a host compiling
/// large components logs each one it loads, so a slow start is progress and
/// only a stalled one fails.
pub fn wait_for_port(port: u16, process: &Process) {
    let mut last_log_len = 0;
    let mut since = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log_len = std::fs::metadata(&process.log).map(|m| m.len()).unwrap_or(0);
        if log_len != last_log_len {
            (last_log_len, since) = (log_len, Instant::now());
        }
        assert!(since.elapsed() < START_TIMEOUT, "{} did not listen on {port}:\n{}", process.name, process.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
