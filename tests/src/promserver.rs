//! Real peers of the metrics path: a Prometheus server, a node_exporter, and a scrape target
//! whose exposition the test controls.
//!
//! - [`Prometheus`]: the `prometheus` binary on a free loopback port with a temporary config
//!   and storage directory, its remote-write receiver on, queried over its HTTP API. It can be
//!   stopped (SIGTERM, as an operator would) and started again on the same port and storage,
//!   to play an outage.
//! - [`NodeExporter`]: `prometheus-node-exporter` on a free port, read as parsed samples.
//! - [`ScrapeTarget`]: an HTTP server answering `GET /metrics` with whatever [`Exposition`]
//!   the test sets (a body and content type, an HTTP status, a delay, gzip), counting its
//!   scrapes.
//!
//! Processes are killed when their handle is dropped; a failing test prints their logs.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{header, HeaderMap, StatusCode};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::prometheus::Metrics;
use crate::{free_port, DEADLINE, POLL_INTERVAL};

/// A series' labels as Prometheus' API returns them, `__name__` included.
pub type Labels = BTreeMap<String, String>;

/// The Prometheus binary: `$PROMETHEUS_BIN`, else `prometheus` on the `PATH`.
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN").map(PathBuf::from).unwrap_or_else(|| "prometheus".into())
}

/// The node_exporter binary: `$NODE_EXPORTER_BIN`, else Debian's `prometheus-node-exporter`.
pub fn node_exporter_bin() -> PathBuf {
    std::env::var_os("NODE_EXPORTER_BIN").map(PathBuf::from).unwrap_or_else(|| "prometheus-node-exporter".into())
}

fn http_client() -> reqwest::Client {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("cannot build an HTTP client")
}

fn spawn_logged(program: &Path, args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("cannot open a log file");
    let err = out.try_clone().expect("cannot clone a log file handle");
    Command::new(program).args(args).stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| {
        panic!("cannot start {}: {e} (is it installed? scripts/test installs it)", program.display())
    })
}

fn terminate(child: &mut Child) -> ExitStatus {
    let pid = libc::pid_t::try_from(child.id()).expect("pid out of range");
    // SAFETY: kill(2) on a child this handle spawned and has not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("cannot poll a child process") {
            return status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("process {pid} did not exit within {DEADLINE:?} of SIGTERM");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------

/// A Prometheus server with its remote-write receiver on.
pub struct Prometheus {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    client: reqwest::Client,
}

/// One series of a query result.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Labels,
    /// `(unix seconds, value)`: one for an instant vector, every raw sample of a range.
    pub samples: Vec<(f64, f64)>,
}

impl Series {
    /// The value of an instant vector's element.
    pub fn value(&self) -> f64 {
        self.samples.last().map_or(f64::NAN, |s| s.1)
    }

    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

impl Prometheus {
    /// Starts Prometheus with `scrape_configs` (YAML list items, indented by two spaces, or
    /// empty for none) under a one-second global scrape interval, and waits for `/-/ready`.
    pub async fn start(scrape_configs: &str) -> Prometheus {
        let dir =
            tempfile::Builder::new().prefix("periscope-prometheus-").tempdir().expect("cannot create a directory");
        let config = if scrape_configs.trim().is_empty() {
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs: []\n"
                .to_owned()
        } else {
            format!("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{scrape_configs}")
        };
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("cannot write the Prometheus config");
        let mut prometheus = Prometheus { child: None, dir, port: free_port(), client: http_client() };
        prometheus.start_again().await;
        prometheus
    }

    /// Starts the process (again) on the same port, config and storage, and waits until ready.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "Prometheus is already running");
        let args = vec![
            format!("--config.file={}", self.dir.path().join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", self.dir.path().join("data").display()),
            format!("--web.listen-address=127.0.0.1:{}", self.port),
            "--web.enable-remote-write-receiver".to_owned(),
            "--enable-feature=exemplar-storage".to_owned(),
            "--storage.tsdb.retention.time=1d".to_owned(),
            "--log.level=info".to_owned(),
        ];
        self.child = Some(spawn_logged(&prometheus_bin(), &args, &self.dir.path().join("prometheus.log")));
        let url = self.url("/-/ready");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("Prometheus exited with {status} before it was ready:\n{}", self.log());
            }
            if let Ok(response) = self.client.get(&url).send().await {
                if response.status() == StatusCode::OK {
                    return;
                }
            }
            if started.elapsed() > DEADLINE {
                panic!("Prometheus was not ready within {DEADLINE:?}:\n{}", self.log());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the process with SIGTERM (Prometheus closes its storage cleanly) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = terminate(&mut child);
            assert!(status.success(), "Prometheus exited with {status} on SIGTERM:\n{}", self.log());
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Where remote write sends to.
    pub fn write_url(&self) -> String {
        self.url("/api/v1/write")
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Evaluates `promql` now. Vectors and matrices come back as series; a scalar as one
    /// series without labels.
    pub async fn query(&self, promql: &str) -> Vec<Series> {
        let url =
            reqwest::Url::parse_with_params(&self.url("/api/v1/query"), &[("query", promql)]).expect("a query URL");
        let response = self.client.get(url).send().await.unwrap_or_else(|e| panic!("query {promql}: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "query {promql} answered {status}: {body}");
        parse_result(&body).unwrap_or_else(|e| panic!("query {promql}: {e}: {body}"))
    }

    /// The exemplars Prometheus keeps for the series `promql` selects, from the last hour.
    pub async fn exemplars(&self, promql: &str) -> Vec<Exemplars> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let (start, end) = ((now - 3600).to_string(), (now + 60).to_string());
        let url = reqwest::Url::parse_with_params(
            &self.url("/api/v1/query_exemplars"),
            &[("query", promql), ("start", start.as_str()), ("end", end.as_str())],
        )
        .expect("a query URL");
        let response = self.client.get(url).send().await.unwrap_or_else(|e| panic!("exemplars of {promql}: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "exemplars of {promql} answered {status}: {body}");
        parse_exemplars(&body).unwrap_or_else(|e| panic!("exemplars of {promql}: {e}: {body}"))
    }

    /// Polls `promql` until `condition` holds for its result, and returns that result.
    pub async fn wait_for(&self, promql: &str, condition: impl Fn(&[Series]) -> bool) -> Vec<Series> {
        let started = Instant::now();
        loop {
            let result = self.query(promql).await;
            if condition(&result) {
                return result;
            }
            if started.elapsed() > DEADLINE {
                panic!("{promql} never met the condition within {DEADLINE:?}; last result: {result:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls an instant query until it returns exactly one series, and returns it.
    pub async fn wait_for_one(&self, promql: &str) -> Series {
        self.wait_for(promql, |r| r.len() == 1).await.remove(0)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- prometheus log (last lines) ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The exemplars of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplars {
    pub series: Labels,
    /// `(labels, value)` of each exemplar.
    pub exemplars: Vec<(Labels, f64)>,
}

fn string_map(value: &serde_json::Value) -> Result<Labels, String> {
    Ok(value
        .as_object()
        .ok_or("labels are not an object")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect())
}

fn parse_exemplars(body: &str) -> Result<Vec<Exemplars>, String> {
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    if json["status"] != "success" {
        return Err("status is not success".into());
    }
    let Some(data) = json["data"].as_array() else { return Ok(Vec::new()) };
    data.iter()
        .map(|item| {
            let exemplars = item["exemplars"]
                .as_array()
                .ok_or("exemplars is not a list")?
                .iter()
                .map(|e| {
                    let value = e["value"].as_str().and_then(|v| v.parse().ok()).ok_or("an exemplar value")?;
                    Ok((string_map(&e["labels"])?, value))
                })
                .collect::<Result<_, String>>()?;
            Ok(Exemplars { series: string_map(&item["seriesLabels"])?, exemplars })
        })
        .collect()
}

fn number(value: &serde_json::Value) -> Result<(f64, f64), String> {
    let pair = value.as_array().filter(|a| a.len() == 2).ok_or("a sample is not [time, value]")?;
    let time = pair[0].as_f64().ok_or("a sample time is not a number")?;
    let text = pair[1].as_str().ok_or("a sample value is not a string")?;
    let value = match text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other.parse().map_err(|e| format!("bad value {other:?}: {e}"))?,
    };
    Ok((time, value))
}

fn parse_result(body: &str) -> Result<Vec<Series>, String> {
    let json: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    if json["status"] != "success" {
        return Err("status is not success".into());
    }
    let data = &json["data"];
    let result = &data["result"];
    match data["resultType"].as_str() {
        Some("scalar") => Ok(vec![Series { labels: Labels::new(), samples: vec![number(result)?] }]),
        Some(kind @ ("vector" | "matrix")) => result
            .as_array()
            .ok_or("result is not a list")?
            .iter()
            .map(|item| {
                let labels = item["metric"]
                    .as_object()
                    .ok_or("metric is not an object")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let samples = if kind == "vector" {
                    vec![number(&item["value"])?]
                } else {
                    item["values"]
                        .as_array()
                        .ok_or("values is not a list")?
                        .iter()
                        .map(number)
                        .collect::<Result<_, _>>()?
                };
                Ok(Series { labels, samples })
            })
            .collect(),
        other => Err(format!("unexpected result type {other:?}")),
    }
}

// ---------------------------------------------------------------------------------------
// node_exporter
// ---------------------------------------------------------------------------------------

/// A node_exporter on a free loopback port.
pub struct NodeExporter {
    child: Child,
    dir: TempDir,
    port: u16,
    client: reqwest::Client,
}

impl NodeExporter {
    /// Starts node_exporter with `flags` (on top of the listen address) and waits until its
    /// `/metrics` answers.
    pub async fn start(flags: &[&str]) -> NodeExporter {
        let dir =
            tempfile::Builder::new().prefix("periscope-node-exporter-").tempdir().expect("cannot create a directory");
        let port = free_port();
        let mut args = vec![format!("--web.listen-address=127.0.0.1:{port}")];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let child = spawn_logged(&node_exporter_bin(), &args, &dir.path().join("node_exporter.log"));
        let mut exporter = NodeExporter { child, dir, port, client: http_client() };
        let started = Instant::now();
        loop {
            if let Some(status) = exporter.child.try_wait().ok().flatten() {
                panic!("node_exporter exited with {status}:\n{}", exporter.log());
            }
            if let Ok(response) = exporter.client.get(exporter.url()).send().await {
                if response.status() == StatusCode::OK {
                    return exporter;
                }
            }
            if started.elapsed() > DEADLINE {
                panic!("node_exporter did not answer within {DEADLINE:?}:\n{}", exporter.log());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node_exporter.log")).unwrap_or_default()
    }

    /// One scrape, parsed.
    pub async fn metrics(&self) -> Metrics {
        let response = self.client.get(self.url()).send().await.unwrap_or_else(|e| panic!("GET node_exporter: {e}"));
        assert_eq!(response.status(), StatusCode::OK);
        Metrics::parse(&response.text().await.unwrap_or_default())
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- node_exporter log ----\n{}", self.log());
        }
    }
}

// ---------------------------------------------------------------------------------------
// A scrape target
// ---------------------------------------------------------------------------------------

/// What the target answers to one scrape.
#[derive(Debug, Clone)]
pub struct Exposition {
    pub status: u16,
    pub content_type: String,
    pub body: String,
    /// Waits this long before answering.
    pub delay: Duration,
    /// Compresses the body with gzip when the scraper accepts it.
    pub gzip: bool,
}

pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Exposition {
    /// A body in the text format 0.0.4.
    pub fn text(body: impl Into<String>) -> Exposition {
        Exposition { status: 200, content_type: TEXT.to_owned(), body: body.into(), delay: Duration::ZERO, gzip: false }
    }

    /// A body in OpenMetrics 1.0.
    pub fn openmetrics(body: impl Into<String>) -> Exposition {
        Exposition { content_type: OPENMETRICS.to_owned(), ..Exposition::text(body) }
    }

    /// An HTTP error status with a short body.
    pub fn status(status: u16) -> Exposition {
        Exposition { status, ..Exposition::text("broken\n") }
    }

    /// The same answer, gzip-compressed for scrapers that accept it.
    pub fn gzipped(self) -> Exposition {
        Exposition { gzip: true, ..self }
    }

    /// The same answer, after `delay`.
    pub fn delayed(self, delay: Duration) -> Exposition {
        Exposition { delay, ..self }
    }
}

/// Builds the answer to the n-th scrape (counting from 1).
type Responder = Box<dyn Fn(u64) -> Exposition + Send + Sync>;

struct TargetState {
    responder: Mutex<Responder>,
    scrapes: AtomicU64,
    last_headers: Mutex<Option<HeaderMap>>,
}

/// An HTTP scrape target on a free loopback port. Stops serving when dropped.
pub struct ScrapeTarget {
    addr: SocketAddr,
    state: Arc<TargetState>,
    server: JoinHandle<()>,
}

impl ScrapeTarget {
    /// Serves `exposition` to every scrape.
    pub async fn start(exposition: Exposition) -> ScrapeTarget {
        ScrapeTarget::start_with(move |_| exposition.clone()).await
    }

    /// Serves what `responder` builds for the n-th scrape.
    pub async fn start_with(responder: impl Fn(u64) -> Exposition + Send + Sync + 'static) -> ScrapeTarget {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("cannot bind a scrape target");
        let addr = listener.local_addr().expect("a bound address");
        let state = Arc::new(TargetState {
            responder: Mutex::new(Box::new(responder)),
            scrapes: AtomicU64::new(0),
            last_headers: Mutex::new(None),
        });
        let app = Router::new().route("/metrics", axum::routing::get(answer)).with_state(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ScrapeTarget { addr, state, server }
    }

    /// From now on, serves `exposition`.
    pub fn set(&self, exposition: Exposition) {
        self.set_with(move |_| exposition.clone());
    }

    /// From now on, serves what `responder` builds.
    pub fn set_with(&self, responder: impl Fn(u64) -> Exposition + Send + Sync + 'static) {
        *self.state.responder.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(responder);
    }

    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// `host:port`, the `instance` Prometheus gives this target.
    pub fn instance(&self) -> String {
        self.addr.to_string()
    }

    /// Scrapes answered (or being answered) so far.
    pub fn scrapes(&self) -> u64 {
        self.state.scrapes.load(Ordering::SeqCst)
    }

    /// The request headers of the latest scrape.
    pub fn last_headers(&self) -> Option<HeaderMap> {
        self.state.last_headers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the target has answered `count` scrapes in all.
    pub async fn wait_for_scrapes(&self, count: u64) {
        let started = Instant::now();
        while self.scrapes() < count {
            if started.elapsed() > DEADLINE {
                panic!("{} was scraped {} times, not {count}, within {DEADLINE:?}", self.url(), self.scrapes());
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for ScrapeTarget {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(State(state): State<Arc<TargetState>>, headers: HeaderMap) -> Response {
    let n = state.scrapes.fetch_add(1, Ordering::SeqCst) + 1;
    let accepts_gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    *state.last_headers.lock().unwrap_or_else(|p| p.into_inner()) = Some(headers);
    let exposition = (state.responder.lock().unwrap_or_else(|p| p.into_inner()))(n);
    if !exposition.delay.is_zero() {
        tokio::time::sleep(exposition.delay).await;
    }
    let status = StatusCode::from_u16(exposition.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if exposition.gzip && accepts_gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let compressed = encoder.write_all(exposition.body.as_bytes()).and_then(|()| encoder.finish());
        let compressed = compressed.expect("gzip into memory cannot fail");
        let headers = [(header::CONTENT_TYPE, exposition.content_type), (header::CONTENT_ENCODING, "gzip".to_owned())];
        return (status, headers, compressed).into_response();
    }
    (status, [(header::CONTENT_TYPE, exposition.content_type)], exposition.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_results_of_every_kind_are_parsed() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","job":"a"},"value":[1700000000.5,"1"]}]}}"#;
        let got = parse_result(vector).unwrap();
        assert_eq!(got[0].label("job"), Some("a"));
        assert_eq!(got[0].samples, vec![(1_700_000_000.5, 1.0)]);
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"job":"a"},"values":[[1,"2"],[2,"+Inf"]]}]}}"#;
        assert_eq!(parse_result(matrix).unwrap()[0].samples, vec![(1.0, 2.0), (2.0, f64::INFINITY)]);
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[3,"4.5"]}}"#;
        assert_eq!(parse_result(scalar).unwrap()[0].value(), 4.5);
        assert!(parse_result(r#"{"status":"error"}"#).is_err());
    }

    #[test]
    fn exemplars_are_parsed() {
        let body = r#"{"status":"success","data":[{"seriesLabels":{"__name__":"a_total","job":"x"},
            "exemplars":[{"labels":{"trace_id":"ab"},"value":"3","timestamp":1700000000.5}]}]}"#;
        let got = parse_exemplars(body).unwrap();
        assert_eq!(got[0].series["job"], "x");
        assert_eq!(got[0].exemplars, vec![([("trace_id".to_owned(), "ab".to_owned())].into(), 3.0)]);
        assert!(parse_exemplars(r#"{"status":"success","data":null}"#).unwrap().is_empty());
    }
}
