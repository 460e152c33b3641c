//! The real binary, as an operator runs it: `mantlegate serve` started on a config file, its JSON log lines read
//! as they come.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::WAIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_mantlegate");

pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mantlegate-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Served {
    pub child: Child,
    pub lines: Lines<BufReader<ChildStdout>>,
    pub addr: String,
    pub admin: String,
    /// The traffic thread count the listening line gives.
    pub workers: u64,
    /// Every line read so far, by [`Served::wait_for`] and [`Served::rest`].
    pub seen: Vec<serde_json::Value>,
}

impl Served {
    /// Reads log lines until one that `matches`, and returns it; fails after [`WAIT`] or at the end of the log.
    pub async fn wait_for(&mut self, what: &str, matches: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no log line {what}"))
                .unwrap()
                .unwrap_or_else(|| panic!("the gateway exited before logging {what}"));
            let v: serde_json::Value = serde_json::from_str(&line).expect("every log line is JSON");
            self.seen.push(v.clone());
            if matches(&v) {
                return v;
            }
        }
    }

    /// Every line still to come, to the end of the log (once the process has been told to stop).
    pub async fn rest(&mut self) -> Vec<serde_json::Value> {
        let mut rest = Vec::new();
        while let Some(line) =
            tokio::time::timeout(WAIT, self.lines.next_line()).await.expect("the log never ended").unwrap()
        {
            let v: serde_json::Value = serde_json::from_str(&line).expect("every log line is JSON");
            self.seen.push(v.clone());
            rest.push(v);
        }
        rest
    }

    /// Reads every log line from now on in a task of its own (a process whose log nobody reads blocks once the
    /// pipe is full), which returns them all once the log ends.
    pub fn read_all(self) -> (Child, tokio::task::JoinHandle<Vec<serde_json::Value>>) {
        let Self { child, mut lines, mut seen, .. } = self;
        let reader = tokio::spawn(async move {
            while let Some(line) = lines.next_line().await.unwrap() {
                seen.push(serde_json::from_str(&line).expect("every log line is JSON"));
            }
            seen
        });
        (child, reader)
    }

    /// Sends the process `signal` (`-HUP`, `-TERM`).
    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().await.unwrap().success());
    }
}

/// Starts `mantlegate serve` and waits for its "listening" log line, which names the bound addresses.
pub async fn serve(config: &std::path::Path, env: &[(&str, &str)]) -> Served {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"]).arg(config);
    serve_command(cmd, env).await
}

/// [`serve`], with at most `nofile` file descriptors.
pub async fn serve_with_nofile(config: &std::path::Path, env: &[(&str, &str)], nofile: u32) -> Served {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" serve --config \"$1\""), BIN]).arg(config);
    serve_command(cmd, env).await
}

async fn serve_command(mut cmd: Command, env: &[(&str, &str)]) -> Served {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    cmd.env_remove("MANTLEGATE_LOG").env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line =
            tokio::time::timeout(WAIT, lines.next_line()).await.expect("no listening line").unwrap().expect("exited");
        let v: serde_json::Value = serde_json::from_str(&line).expect("every log line is JSON");
        if v["message"] == "mantlegate listening" {
            let addr = v["addr"].as_str().unwrap().to_owned();
            let admin = v["admin_addr"].as_str().unwrap().to_owned();
            let workers = v["workers"].as_u64().unwrap();
            return Served { child, lines, addr, admin, workers, seen: vec![v] };
        }
    }
}

/// Sends `child` the signal `signal` (`-HUP`, `-TERM`).
pub async fn kill(child: &Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().await.unwrap().success());
}

pub async fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
}

/// `serve` of the standard test config with `opts`, in front of `upstream`, with a fresh ledger and the upstream
/// key in its environment; watched. Returns the gateway and its ledger's path.
pub async fn serve_metered(
    name: &str,
    upstream: std::net::SocketAddr,
    opts: super::Opts,
) -> (Watched, std::path::PathBuf) {
    let dir = temp_dir(name);
    let ledger = dir.join("usage.jsonl");
    let _ = std::fs::remove_file(&ledger);
    let extra = format!("{}\n[metering]\nledger_path = \"{}\"\n", opts.extra, ledger.display());
    let config = dir.join("gateway.toml");
    std::fs::write(&config, super::config_text(upstream, &super::Opts { extra, ..opts })).unwrap();
    (serve(&config, &[("MANTLE_API_KEY", super::UPSTREAM_KEY)]).await.watched(), ledger)
}

/// The lines of the ledger at `path` (none if it was never written).
pub fn read_ledger(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A running `serve` whose log a task of its own reads as it comes (so the pipe never fills) into a list the
/// test can look at while it runs, and whose descriptors and memory the test can read from /proc.
pub struct Watched {
    pub child: Child,
    pub addr: String,
    pub pid: u32,
    log: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    reader: tokio::task::JoinHandle<()>,
    /// Its descriptors as it started listening, with no connection open.
    started: Fds,
}

impl Served {
    /// Hands the log over to a reader task.
    pub fn watched(self) -> Watched {
        let Self { child, mut lines, seen, addr, .. } = self;
        let log = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let reader = tokio::spawn({
            let log = log.clone();
            async move {
                while let Some(line) = lines.next_line().await.unwrap() {
                    log.lock().unwrap().push(serde_json::from_str(&line).expect("every log line is JSON"));
                }
            }
        });
        let pid = child.id().unwrap();
        Watched { child, addr, pid, log, reader, started: Fds::of(pid) }
    }
}

impl Watched {
    /// Every log line so far.
    pub fn log(&self) -> Vec<serde_json::Value> {
        self.log.lock().unwrap().clone()
    }

    /// The access lines of request `id` so far.
    pub fn access_lines(&self, id: &str) -> Vec<serde_json::Value> {
        access_lines(&self.log(), id)
    }

    /// Request `id`'s access line, once it has been written.
    pub async fn access_line(&self, id: &str) -> serde_json::Value {
        super::eventually(&format!("no access line for {id}"), || self.access_lines(id).into_iter().next()).await
    }

    /// Stops the gateway (SIGTERM), and returns every line it logged once it has exited.
    pub async fn stop(mut self) -> Vec<serde_json::Value> {
        sigterm(&self.child).await;
        let status = tokio::time::timeout(WAIT, self.child.wait()).await.expect("no exit after SIGTERM").unwrap();
        assert!(status.success(), "{status:?}");
        tokio::time::timeout(WAIT, &mut self.reader).await.expect("the log never ended").unwrap();
        self.log()
    }

    /// The gateway's open file descriptors.
    pub fn fds(&self) -> Fds {
        Fds::of(self.pid)
    }

    /// The gateway's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        line.trim().trim_end_matches("kB").trim().parse().unwrap()
    }

    /// The gateway's descriptor count once it has no connection open (every caller and upstream connection
    /// closed), for a baseline.
    pub async fn quiet_fds(&self) -> usize {
        super::eventually("the gateway kept connections open", || {
            let fds = self.fds();
            fds.new_sockets(&self.started).is_empty().then_some(fds.count)
        })
        .await
    }

    /// Waits until the gateway holds no more descriptors than `baseline`, and no connection; fails, listing
    /// what it still holds, after [`WAIT`].
    pub async fn back_to(&self, baseline: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let fds = self.fds();
            if fds.new_sockets(&self.started).is_empty() && fds.count <= baseline {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "descriptors not back to {baseline}: {fds:#?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// The access lines (target `mantlegate::access`) of request `id` in `log`.
pub fn access_lines(log: &[serde_json::Value], id: &str) -> Vec<serde_json::Value> {
    log.iter().filter(|l| l["target"] == "mantlegate::access" && l["request_id"] == id).cloned().collect()
}

/// A process's open file descriptors.
#[derive(Debug)]
pub struct Fds {
    /// How many.
    pub count: usize,
    /// Where each leads (`socket:[inode]` for a socket).
    pub targets: Vec<String>,
}

impl Fds {
    pub fn of(pid: u32) -> Self {
        let mut targets = Vec::new();
        // Descriptors may close while they are listed.
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                targets.push(target.display().to_string());
            }
        }
        Self { count: targets.len(), targets }
    }

    /// The sockets among them that `earlier` did not have: on a gateway whose `earlier` was taken as it
    /// started (its listeners, and no connection yet), the connections it has open.
    pub fn new_sockets(&self, earlier: &Self) -> Vec<&str> {
        let sockets = self.targets.iter().filter(|t| t.starts_with("socket:"));
        sockets.filter(|t| !earlier.targets.contains(t)).map(String::as_str).collect()
    }
}
