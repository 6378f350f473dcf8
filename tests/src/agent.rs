//! The agent under test: a config file in a temporary directory, the `periscope` process
//! started on it, and ways to watch it (readiness, self-metrics, stderr) and stop it.
//!
//! The process is killed when its [`Agent`] is dropped, so a failing test cleans up too; a
//! panicking test prints the agent's stderr to explain itself.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Instant;

use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::prometheus::Metrics;
use crate::{free_port, DEADLINE, POLL_INTERVAL};

/// Environment variables that change the agent's behaviour and must not leak in from the
/// shell that runs the suite.
const SCRUBBED_ENV: [&str; 5] =
    ["KUBERNETES_SERVICE_HOST", "PERISCOPE_CONFIG", "RUST_LOG", "NODE_NAME", "PERISCOPE_TOKEN"];

/// The binary under test: `$PERISCOPE_BIN`, else `target/debug/periscope` of this workspace.
pub fn periscope_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PERISCOPE_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "PERISCOPE_BIN={} is not a file", path.display());
        return path;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace.join("target"));
    let path = target.join("debug").join("periscope");
    assert!(
        path.is_file(),
        "the agent binary {} is missing: run `cargo build -p periscope` first (or set PERISCOPE_BIN)",
        path.display()
    );
    path
}

/// The usual config of a test: every listener on a free loopback port, host metrics off,
/// and optionally execution paths, the Jaeger exporter and the Prometheus pull exporter.
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub node_name: String,
    pub admin_port: u16,
    pub grpc_port: u16,
    pub http_port: u16,
    pub shutdown_timeout: String,
    pub max_request_size: Option<String>,
    /// The value of `sources.otlp.tls` (a flow mapping), serving both receivers over TLS.
    pub otlp_tls: Option<String>,
    /// The body of `exporters.jaeger`, one `key: value` per line, without indentation.
    pub jaeger: Option<String>,
    /// The `paths` section; `None` writes `paths: { enabled: false }`.
    pub paths: Option<PathsSettings>,
    /// The port of `exporters.prometheus.listen`, when that exporter is on.
    pub prometheus_port: Option<u16>,
}

/// `paths` with analysis on. Bounds left `None` keep the agent's defaults.
#[derive(Debug, Clone)]
pub struct PathsSettings {
    pub trace_timeout: String,
    pub max_traces_in_flight: Option<usize>,
    pub max_handlers: Option<usize>,
}

impl Default for TestConfig {
    fn default() -> Self {
        TestConfig {
            node_name: "test-node".to_owned(),
            admin_port: free_port(),
            grpc_port: free_port(),
            http_port: free_port(),
            shutdown_timeout: "10s".to_owned(),
            max_request_size: None,
            otlp_tls: None,
            jaeger: None,
            paths: None,
            prometheus_port: None,
        }
    }
}

impl TestConfig {
    pub fn new() -> Self {
        TestConfig::default()
    }

    pub fn jaeger(mut self, body: impl Into<String>) -> Self {
        self.jaeger = Some(body.into());
        self
    }

    pub fn max_request_size(mut self, size: &str) -> Self {
        self.max_request_size = Some(size.to_owned());
        self
    }

    /// Serves both OTLP receivers over TLS with `sources.otlp.tls: <tls>`.
    pub fn otlp_tls(mut self, tls: impl Into<String>) -> Self {
        self.otlp_tls = Some(tls.into());
        self
    }

    /// Turns execution paths on: a trace is analysed once it has been quiet for `trace_timeout`.
    pub fn paths(mut self, trace_timeout: &str) -> Self {
        self.paths = Some(PathsSettings {
            trace_timeout: trace_timeout.to_owned(),
            max_traces_in_flight: None,
            max_handlers: None,
        });
        self
    }

    /// Sets `paths.max_traces_in_flight` and `paths.max_handlers` (after [`TestConfig::paths`]).
    pub fn paths_bounds(mut self, max_traces_in_flight: usize, max_handlers: usize) -> Self {
        let paths = self.paths.as_mut().expect("call TestConfig::paths before paths_bounds");
        paths.max_traces_in_flight = Some(max_traces_in_flight);
        paths.max_handlers = Some(max_handlers);
        self
    }

    /// Turns the Prometheus pull exporter on, on a free port.
    pub fn prometheus_exporter(mut self) -> Self {
        self.prometheus_port = Some(free_port());
        self
    }

    /// The URL Prometheus scrapes: `GET /metrics` on `exporters.prometheus.listen`.
    pub fn prometheus_url(&self) -> String {
        let port = self.prometheus_port.expect("the Prometheus exporter is off: call TestConfig::prometheus_exporter");
        format!("http://127.0.0.1:{port}/metrics")
    }

    /// Where an OTLP/gRPC client reaches the agent.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// The base URL of the agent's OTLP/HTTP receiver.
    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn yaml(&self) -> String {
        let mut yaml = String::new();
        let _ = writeln!(yaml, "node_name: {}", self.node_name);
        let _ = writeln!(yaml, "data_dir: ./data");
        let _ = writeln!(yaml, "shutdown_timeout: {}", self.shutdown_timeout);
        let _ = writeln!(yaml, "server: {{ listen: 127.0.0.1:{} }}", self.admin_port);
        let _ = writeln!(yaml, "log: {{ format: text }}");
        let _ = writeln!(yaml, "sources:");
        let _ = writeln!(yaml, "  otlp:");
        let _ = writeln!(yaml, "    grpc: 127.0.0.1:{}", self.grpc_port);
        let _ = writeln!(yaml, "    http: 127.0.0.1:{}", self.http_port);
        if let Some(size) = &self.max_request_size {
            let _ = writeln!(yaml, "    max_request_size: {size}");
        }
        if let Some(tls) = &self.otlp_tls {
            let _ = writeln!(yaml, "    tls: {tls}");
        }
        let _ = writeln!(yaml, "  host_metrics: {{ enabled: false }}");
        match &self.paths {
            Some(paths) => {
                let _ = writeln!(yaml, "paths:");
                let _ = writeln!(yaml, "  enabled: true");
                let _ = writeln!(yaml, "  trace_timeout: {}", paths.trace_timeout);
                if let Some(max) = paths.max_traces_in_flight {
                    let _ = writeln!(yaml, "  max_traces_in_flight: {max}");
                }
                if let Some(max) = paths.max_handlers {
                    let _ = writeln!(yaml, "  max_handlers: {max}");
                }
            }
            None => {
                let _ = writeln!(yaml, "paths: {{ enabled: false }}");
            }
        }
        if self.jaeger.is_none() && self.prometheus_port.is_none() {
            let _ = writeln!(yaml, "exporters: {{}}");
            return yaml;
        }
        let _ = writeln!(yaml, "exporters:");
        if let Some(body) = &self.jaeger {
            let _ = writeln!(yaml, "  jaeger:");
            for line in body.lines().filter(|line| !line.trim().is_empty()) {
                let _ = writeln!(yaml, "    {}", line.trim());
            }
        }
        if let Some(port) = self.prometheus_port {
            let _ = writeln!(yaml, "  prometheus: {{ listen: 127.0.0.1:{port} }}");
        }
        yaml
    }
}

/// A running agent. Killed on drop; when the test is failing, its stderr is printed then.
pub struct Agent {
    child: Child,
    dir: TempDir,
    admin: SocketAddr,
    client: reqwest::Client,
}

impl Agent {
    /// Starts the agent on `yaml` and waits until `/readyz` answers 200. The admin address is
    /// read from the config's `server: { listen: ADDR }` (or a `listen:` line under `server:`).
    pub async fn start(yaml: &str) -> Agent {
        Agent::start_with_env(yaml, &[]).await
    }

    /// [`Agent::start`] with extra environment variables for the process.
    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Agent {
        Agent::start_command(&["run"], yaml, env).await
    }

    /// `periscope demo --rate RATE` on `yaml`, once ready.
    pub async fn start_demo(yaml: &str, rate: u32) -> Agent {
        Agent::start_command(&["demo", "--rate", &rate.to_string()], yaml, &[]).await
    }

    /// `periscope ARGS --config FILE` on `yaml`, with extra environment variables, once ready.
    async fn start_command(args: &[&str], yaml: &str, env: &[(&str, &str)]) -> Agent {
        let admin = admin_address(yaml)
            .unwrap_or_else(|| panic!("the test config has no `server: {{ listen: ADDR }}`:\n{yaml}"));
        let dir =
            tempfile::Builder::new().prefix("periscope-e2e-").tempdir().expect("cannot create a temporary directory");
        let config = dir.path().join("periscope.yaml");
        std::fs::write(&config, yaml).expect("cannot write the config file");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("cannot create the stderr file");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("cannot create the stdout file");

        let mut command = Command::new(periscope_bin());
        command
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        for name in SCRUBBED_ENV {
            command.env_remove(name);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", periscope_bin().display()));
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder().build().expect("cannot build an HTTP client");
        let mut agent = Agent { child, dir, admin, client };
        agent.wait_ready().await;
        agent
    }

    async fn wait_ready(&mut self) {
        let url = self.url("/readyz");
        let started = Instant::now();
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot poll the agent process") {
                panic!("the agent exited with {status} before it was ready");
            }
            match self.client.get(&url).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::OK => return,
                Ok(response) => {
                    let status = response.status();
                    last = format!("{status}: {}", response.text().await.unwrap_or_default());
                }
                Err(e) => last = e.to_string(),
            }
            if started.elapsed() > DEADLINE {
                panic!("the agent was not ready within {DEADLINE:?} (last /readyz: {last})");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The admin server's address (`server.listen`).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The directory the agent runs in (its config, stderr and `./data` live here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the agent has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// `GET path` on the admin server: status code and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.url(path)).send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// The agent's self-metrics, parsed.
    pub async fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "GET /metrics answered {status}: {body}");
        Metrics::parse(&body)
    }

    /// Polls `/metrics` until the sum of the series of `name` matching `labels` satisfies
    /// `condition` (at least one such series must exist), and returns those metrics.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        condition: impl Fn(f64) -> bool,
    ) -> Metrics {
        let started = Instant::now();
        loop {
            let metrics = self.metrics().await;
            let value = metrics.lookup(name, labels);
            if value.is_some_and(&condition) {
                return metrics;
            }
            if started.elapsed() > DEADLINE {
                panic!(
                    "{name}{labels:?} never met the condition within {DEADLINE:?} (last value {value:?}); metrics:\n{}",
                    metrics.text()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the Jaeger exporter's queue is empty: nothing waits for export or retry.
    pub async fn wait_until_exporter_idle(&self) -> Metrics {
        self.wait_for_metric("periscope_queue_items", &[("component", "jaeger"), ("signal", "traces")], |v| v == 0.0)
            .await
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn stop(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("the agent has already been reaped");
        let pid = libc::pid_t::try_from(pid).expect("pid out of range");
        // SAFETY: kill(2) with a pid this test spawned and still owns (not yet reaped).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "cannot send SIGTERM to the agent: {}", std::io::Error::last_os_error());
        match tokio::time::timeout(DEADLINE, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("cannot wait for the agent: {e}"),
            Err(_) => panic!("the agent did not exit within {DEADLINE:?} of SIGTERM"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("---- periscope stderr ({}) ----\n{}", self.dir.path().display(), self.stderr());
        }
    }
}

/// The admin address of a config: `listen:` on the `server:` line or the next lines under it.
fn admin_address(yaml: &str) -> Option<SocketAddr> {
    let mut lines = yaml.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("server:") else { continue };
        let candidates = std::iter::once(rest).chain(lines.by_ref().take_while(|l| l.starts_with(' ')));
        for candidate in candidates {
            if let Some((_, after)) = candidate.split_once("listen:") {
                let addr = after.trim().trim_end_matches('}').trim().trim_matches('"');
                return addr.parse().ok();
            }
        }
        return None;
    }
    None
}

/// A finished `periscope` command.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `periscope ARGS` in `dir` with `env` to completion (killed and failed after the
/// suite's deadline). The variables that change the agent's behaviour are scrubbed first.
pub fn run_to_exit(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Exited {
    let outputs = tempfile::tempdir().expect("cannot create a temporary directory");
    let out_path = outputs.path().join("stdout.log");
    let err_path = outputs.path().join("stderr.log");
    let stdout = std::fs::File::create(&out_path).expect("cannot create the stdout file");
    let stderr = std::fs::File::create(&err_path).expect("cannot create the stderr file");
    let mut command = std::process::Command::new(periscope_bin());
    command.args(args).current_dir(dir).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    for name in SCRUBBED_ENV {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", periscope_bin().display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot poll the process") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`periscope {}` did not exit within {DEADLINE:?}; stderr:\n{}",
                args.join(" "),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    Exited {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_address_is_found_inline_and_in_a_block() {
        assert_eq!(admin_address("a: 1\nserver: { listen: 127.0.0.1:9 }\n"), Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(
            admin_address("server:\n  auth_token: x\n  listen: \"127.0.0.1:10\"\nsources: {}\n"),
            Some("127.0.0.1:10".parse().unwrap())
        );
        assert_eq!(admin_address("sources:\n  listen: 127.0.0.1:1\n"), None);
    }
}
