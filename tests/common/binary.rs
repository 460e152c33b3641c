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
