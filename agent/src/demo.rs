//! `periscope demo`: the agent on its config, plus a synthetic workload that makes it show
//! what it does within seconds.
//!
//! The workload plays a gateway-like service `feed` (and the `users` service it calls): its
//! handlers pass through middleware (`auth`, `rate_limit`, `metrics`) into handlers that call
//! a cache and a database, with log-normal latencies, cache hits and misses, an N+1 query,
//! requests refused by the rate limiter and failed queries. It is a client of the agent like
//! any instrumented service: traces and metrics go as OTLP/HTTP protobuf to the agent's own
//! `sources.otlp.http` receiver over loopback, and one JSON log line per request, carrying
//! the trace and span ids, goes to `<data_dir>/demo/feed.log`, which the demo adds as a log
//! source (rotated at 8 MiB). Nothing about the agent is special in the demo: it analyses,
//! exports and serves this traffic as it would a real service's.

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{status, ResourceSpans, ScopeSpans, Span, Status};
use prost::Message as _;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, LogFormatKind, LogSourceConfig, StartAt};

/// Traces per second unless `--rate` says otherwise.
pub const DEFAULT_RATE: u32 = 20;
/// How often the workload sends what it made.
const TICK: Duration = Duration::from_millis(250);
/// How often it sends its metrics.
const METRICS_EVERY: Duration = Duration::from_secs(5);
/// The log file is rotated (renamed to `feed.log.1`) past this size.
const LOG_ROTATE_BYTES: u64 = 8 * 1024 * 1024;
/// Bounds of the request-duration histogram, in seconds.
const DURATION_BOUNDS: [f64; 10] = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// What the demo needs from the config, checked before the agent starts.
pub struct Setup {
    /// `http://host:port` of the agent's OTLP/HTTP receiver.
    pub otlp_url: String,
    pub log_dir: PathBuf,
    pub rate: u32,
}

/// Checks that the workload can reach the agent and adds its log file as a log source.
pub fn prepare(config: &mut Config, rate: u32) -> Result<Setup, String> {
    let Some(addr) = config.sources.otlp.http else {
        return Err("periscope demo sends its workload to sources.otlp.http, which this config disables".into());
    };
    if config.sources.otlp.tls.is_some() {
        return Err("periscope demo sends plain OTLP/HTTP to sources.otlp.http; this config serves it over TLS".into());
    }
    if !(1..=10_000).contains(&rate) {
        return Err(format!("--rate {rate}: expected 1 to 10000 traces per second"));
    }
    if !config.paths.enabled {
        tracing::warn!("paths.enabled is false: the demo's traces are exported but no execution paths are built");
    }
    let log_dir = config.data_dir.join("demo");
    std::fs::create_dir_all(&log_dir).map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
    config.sources.logs.push(LogSourceConfig {
        include: vec![log_dir.join("*.log").display().to_string()],
        exclude: Vec::new(),
        format: LogFormatKind::Json,
        start_at: StartAt::End,
        multiline: Default::default(),
        labels: BTreeMap::from([("job".to_owned(), "demo".to_owned())]),
    });
    Ok(Setup { otlp_url: format!("http://{}", reachable(addr.0)), log_dir, rate })
}

/// The address to connect to for a listener bound to `addr` (a wildcard means this host).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port()),
        _ => addr,
    }
}

/// Runs the workload until `stop` fires.
pub async fn run(setup: Setup, stop: CancellationToken) {
    let client = crate::exporters::tls::rustls_client_config(None, "demo")
        .map_err(|e| e.to_string())
        .and_then(|tls| reqwest::Client::builder().tls_backend_preconfigured(tls).timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string()));
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "demo: cannot build an HTTP client; no workload");
            return;
        }
    };
    let mut log = match LogFile::open(&setup.log_dir.join("feed.log")) {
        Ok(log) => log,
        Err(e) => {
            tracing::error!(error = %e, "demo: cannot write its log file; no workload");
            return;
        }
    };
    tracing::info!(rate = setup.rate, otlp = %setup.otlp_url, log = %log.path.display(), "demo workload running: services feed and users");
    let mut workload = Workload::new(fastrand::Rng::new());
    let per_tick = f64::from(setup.rate) * TICK.as_secs_f64();
    let (mut owed, mut since_metrics, mut failing) = (0.0, Duration::ZERO, false);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        owed += per_tick;
        let count = owed as usize;
        owed -= count as f64;
        let now = unix_nanos();
        let mut batch = Batch::default();
        for i in (0..count).rev() {
            // Requests spread over the tick, not all at its end, oldest first.
            let end = now - (TICK.as_nanos() as u64 * i as u64 / count.max(1) as u64);
            workload.request(end, &mut batch);
        }
        if let Err(e) = log.write(&batch.lines) {
            tracing::warn!(error = %e, "demo: cannot write its log file");
        }
        let mut sent = post(&client, &format!("{}/v1/traces", setup.otlp_url), batch.traces().encode_to_vec()).await;
        since_metrics += TICK;
        if since_metrics >= METRICS_EVERY && sent.is_ok() {
            since_metrics = Duration::ZERO;
            sent = post(&client, &format!("{}/v1/metrics", setup.otlp_url), workload.metrics(now).encode_to_vec()).await;
        }
        match sent {
            Ok(()) if failing => {
                tracing::info!("demo: the agent takes the workload again");
                failing = false;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "demo: the agent did not take the workload; retrying with the next batch");
                failing = true;
            }
            _ => {}
        }
    }
}

async fn post(client: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(), String> {
    let response = client
        .post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {}", crate::exporters::otlp::error_chain(&e)))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST {url}: HTTP {}", response.status()))
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The demo's log file, appended to and rotated by size.
struct LogFile {
    path: PathBuf,
    file: File,
    written: u64,
}

impl LogFile {
    fn open(path: &Path) -> std::io::Result<LogFile> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(LogFile { path: path.to_owned(), file, written })
    }

    fn write(&mut self, text: &str) -> std::io::Result<()> {
        if self.written + text.len() as u64 > LOG_ROTATE_BYTES {
            // Rename and create, as logrotate does; the agent reads the old file to its end.
            let rotated = self.path.with_extension("log.1");
            std::fs::rename(&self.path, rotated)?;
            *self = LogFile::open(&self.path)?;
        }
        self.file.write_all(text.as_bytes())?;
        self.written += text.len() as u64;
        Ok(())
    }
}

/// One tick's worth of spans and log lines.
#[derive(Default)]
struct Batch {
    feed: Vec<Span>,
    users: Vec<Span>,
    lines: String,
}

impl Batch {
    fn traces(self) -> ExportTraceServiceRequest {
        let resource_spans = [("feed", self.feed), ("users", self.users)]
            .into_iter()
            .filter(|(_, spans)| !spans.is_empty())
            .map(|(service, spans)| ResourceSpans {
                resource: Some(resource(service)),
                scope_spans: vec![ScopeSpans { scope: Some(scope()), spans, schema_url: String::new() }],
                schema_url: String::new(),
            })
            .collect();
        ExportTraceServiceRequest { resource_spans }
    }
}

fn resource(service: &str) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", service),
            kv("service.namespace", "demo"),
            kv("service.instance.id", &format!("{service}-1")),
            kv("service.version", "4.2.0"),
            kv("deployment.environment.name", "demo"),
        ],
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope { name: "periscope-demo".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }), ..Default::default() }
}

fn kv_int(key: &str, value: i64) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::IntValue(value)) }), ..Default::default() }
}

const MS: f64 = 1_000_000.0;

/// Routes of `feed`, with their share of the requests.
const ROUTES: [(&str, &str, f64); 3] = [("GET", "/api/feed/v4", 0.6), ("POST", "/api/comment", 0.25), ("GET", "/api/profile/{id}", 0.15)];

/// Request counts and duration histograms since the start, per route and status.
#[derive(Default)]
struct Counts {
    requests: BTreeMap<(usize, u16), (u64, f64, [u64; DURATION_BOUNDS.len() + 1])>,
    cache: [u64; 2],
}

struct Workload {
    rng: fastrand::Rng,
    counts: Counts,
    started: u64,
}

/// Spans of one trace, built front to back on a timeline in nanoseconds from its start.
struct Trace<'a> {
    id: [u8; 16],
    rng: &'a mut fastrand::Rng,
    feed: Vec<Span>,
    users: Vec<Span>,
}

impl Trace<'_> {
    fn span_id(&mut self) -> [u8; 8] {
        let mut id = self.rng.u64(1..).to_be_bytes();
        id[0] |= 1;
        id
    }

    /// A log-normal duration with the given median (ms) and spread, in nanoseconds.
    fn duration(&mut self, median_ms: f64, sigma: f64) -> u64 {
        // Box–Muller: a standard normal from two uniforms.
        let (u, v) = (self.rng.f64().max(1e-12), self.rng.f64());
        let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        (median_ms * MS * (sigma * z).exp()).clamp(0.01 * MS, 5_000.0 * MS) as u64
    }

    /// A span with a new id (for spans made before their children).
    #[allow(clippy::too_many_arguments)]
    fn span(
        &mut self,
        users: bool,
        parent: Option<[u8; 8]>,
        name: &str,
        kind: SpanKind,
        start: u64,
        end: u64,
        attributes: Vec<KeyValue>,
        error: Option<&str>,
    ) -> [u8; 8] {
        let id = self.span_id();
        self.push(users, id, parent, name, kind, start, end, attributes, error);
        id
    }

    /// A span with the id `id` (for spans made after their children, who needed it).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        users: bool,
        id: [u8; 8],
        parent: Option<[u8; 8]>,
        name: &str,
        kind: SpanKind,
        start: u64,
        end: u64,
        attributes: Vec<KeyValue>,
        error: Option<&str>,
    ) {
        let span = Span {
            trace_id: self.id.to_vec(),
            span_id: id.to_vec(),
            parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes,
            status: error.map(|message| Status { code: status::StatusCode::Error as i32, message: message.into() }),
            ..Default::default()
        };
        if users {
            self.users.push(span);
        } else {
            self.feed.push(span);
        }
    }

    /// A client call of `name` taking about `median_ms`; returns its end.
    fn call(&mut self, parent: [u8; 8], name: &str, at: u64, median_ms: f64, attributes: Vec<KeyValue>, error: Option<&str>) -> u64 {
        let end = at + self.duration(median_ms, 0.5);
        self.span(false, Some(parent), name, SpanKind::Client, at, end, attributes, error);
        end
    }

    /// `auth`, `rate_limit` and `metrics`; returns where the handler starts, or `None` when
    /// the rate limiter refused the request.
    fn middleware(&mut self, server: [u8; 8], mut at: u64, refuse: bool) -> (u64, bool) {
        for (name, median) in [("auth", 0.35), ("rate_limit", 0.12), ("metrics", 0.04)] {
            let end = at + self.duration(median, 0.4);
            let refused = name == "rate_limit" && refuse;
            self.span(false, Some(server), name, SpanKind::Internal, at, end, vec![], refused.then_some("rate limit exceeded"));
            at = end + 20_000;
            if refused {
                return (at, false);
            }
        }
        (at, true)
    }

    fn redis(&mut self, parent: [u8; 8], command: &str, at: u64) -> u64 {
        let attributes = vec![kv("db.system", "redis"), kv("db.operation.name", command), kv("server.address", "redis")];
        self.call(parent, &format!("redis.{command}"), at, 0.25, attributes, None)
    }

    fn query(&mut self, parent: [u8; 8], statement: &str, at: u64, median_ms: f64, error: Option<&str>) -> u64 {
        let attributes = vec![kv("db.system", "postgresql"), kv("db.query.text", statement), kv("server.address", "postgres")];
        let name = statement.split(" FROM ").next().map_or(statement, |verb| verb.split(' ').next().unwrap_or(verb));
        let table = statement.split_whitespace().skip_while(|w| !matches!(*w, "FROM" | "INTO")).nth(1).unwrap_or("");
        self.call(parent, &format!("{name} {table}"), at, median_ms, attributes, error)
    }
}

impl Workload {
    fn new(rng: fastrand::Rng) -> Workload {
        Workload { rng, counts: Counts::default(), started: unix_nanos() }
    }

    /// One request to `feed` ending at `end` (Unix nanoseconds): its spans and its log line.
    fn request(&mut self, end: u64, batch: &mut Batch) {
        let pick = self.rng.f64();
        let route = if pick < ROUTES[0].2 { 0 } else if pick < ROUTES[0].2 + ROUTES[1].2 { 1 } else { 2 };
        let refuse = self.rng.f64() < 0.02;
        let fail = self.rng.f64() < 0.03;
        let miss = self.rng.f64() < 0.3;
        let call_users = self.rng.bool();
        let avatars = self.rng.usize(2..=8);
        let mut id = [0u8; 16];
        self.rng.fill(&mut id);
        let mut trace = Trace { id, rng: &mut self.rng, feed: Vec::new(), users: Vec::new() };
        let (method, path, _) = ROUTES[route];
        let server = trace.span_id();
        let (mut at, admitted) = trace.middleware(server, 50_000, refuse);
        let mut status_code: u16 = if admitted { 200 } else { 429 };
        let mut cached = None;
        if admitted {
            let handler = trace.span_id();
            let start = at;
            at += 20_000;
            let name = match route {
                0 => {
                    at = trace.redis(handler, "get", at);
                    cached = Some(!miss);
                    if miss {
                        let error = fail.then_some("canceling statement due to statement timeout");
                        at = trace.query(handler, "SELECT * FROM posts WHERE feed_id = $1 LIMIT 50", at, if fail { 60.0 } else { 7.0 }, error);
                        if fail {
                            status_code = 500;
                        } else {
                            at = trace.redis(handler, "set", at);
                        }
                    }
                    if call_users && status_code == 200 {
                        at = users_call(&mut trace, handler, at);
                    }
                    if status_code == 200 {
                        let done = at + trace.duration(1.2, 0.3);
                        trace.span(false, Some(handler), "render", SpanKind::Internal, at, done, vec![], None);
                        at = done;
                    }
                    "feed_v4_handler"
                }
                1 => {
                    let error = fail.then_some("duplicate key value violates unique constraint");
                    at = trace.query(handler, "INSERT INTO comments (post_id, body) VALUES ($1, $2)", at, 3.5, error);
                    if fail {
                        status_code = 500;
                    } else {
                        let done = at + trace.duration(1.5, 0.4);
                        let attributes = vec![kv("messaging.system", "kafka"), kv("messaging.destination.name", "comments")];
                        trace.span(false, Some(handler), "comments publish", SpanKind::Producer, at, done, attributes, None);
                        at = done;
                        status_code = 201;
                    }
                    "comment_handler"
                }
                _ => {
                    at = trace.redis(handler, "get", at);
                    at = trace.query(handler, "SELECT * FROM users WHERE id = $1", at, 1.8, None);
                    // One query per avatar: an N+1 the path shows as one step called N times.
                    for _ in 0..avatars {
                        at = trace.query(handler, "SELECT * FROM avatars WHERE user_id = $1", at, 0.6, None) + 15_000;
                    }
                    "profile_handler"
                }
            };
            at += 30_000;
            let error = (status_code >= 500).then_some("internal error");
            trace.push(false, handler, Some(server), name, SpanKind::Internal, start, at, vec![], error);
        }
        at += 40_000;
        let attributes = vec![
            kv("http.request.method", method),
            kv("http.route", path),
            kv("url.path", &path.replace("{id}", "42")),
            kv_int("http.response.status_code", i64::from(status_code)),
        ];
        let error = (status_code >= 500).then_some("HTTP 500");
        trace.push(false, server, None, &format!("{method} {path}"), SpanKind::Server, 0, at, attributes, error);
        // The timeline ran from 0: move it so the request ends at `end`.
        let offset = end.saturating_sub(at);
        let (mut feed, mut users) = (std::mem::take(&mut trace.feed), std::mem::take(&mut trace.users));
        for span in feed.iter_mut().chain(users.iter_mut()) {
            span.start_time_unix_nano += offset;
            span.end_time_unix_nano += offset;
        }
        let seconds = at as f64 / 1e9;
        self.count(route, status_code, seconds, cached);
        log_line(&mut batch.lines, end, &id, &server, method, path, status_code, seconds);
        batch.feed.extend(feed);
        batch.users.extend(users);
    }

    fn count(&mut self, route: usize, status: u16, seconds: f64, cached: Option<bool>) {
        let entry = self.counts.requests.entry((route, status)).or_insert((0, 0.0, [0; DURATION_BOUNDS.len() + 1]));
        entry.0 += 1;
        entry.1 += seconds;
        let bucket = DURATION_BOUNDS.iter().position(|&b| seconds <= b).unwrap_or(DURATION_BOUNDS.len());
        entry.2[bucket] += 1;
        if let Some(hit) = cached {
            self.counts.cache[usize::from(!hit)] += 1;
        }
    }

    /// The cumulative request metrics of `feed`, as its OpenTelemetry SDK would send them.
    fn metrics(&self, now: u64) -> ExportMetricsServiceRequest {
        let cumulative = AggregationTemporality::Cumulative as i32;
        let data_points = self
            .counts
            .requests
            .iter()
            .map(|(&(route, status), (count, sum, buckets))| HistogramDataPoint {
                attributes: vec![
                    kv("http.request.method", ROUTES[route].0),
                    kv("http.route", ROUTES[route].1),
                    kv_int("http.response.status_code", i64::from(status)),
                ],
                start_time_unix_nano: self.started,
                time_unix_nano: now,
                count: *count,
                sum: Some(*sum),
                bucket_counts: buckets.to_vec(),
                explicit_bounds: DURATION_BOUNDS.to_vec(),
                ..Default::default()
            })
            .collect();
        let cache_points = ["hit", "miss"]
            .iter()
            .zip(self.counts.cache)
            .map(|(result, n)| NumberDataPoint {
                attributes: vec![kv("result", result)],
                start_time_unix_nano: self.started,
                time_unix_nano: now,
                value: Some(number_data_point::Value::AsInt(n as i64)),
                ..Default::default()
            })
            .collect();
        let metrics = vec![
            Metric {
                name: "http.server.request.duration".into(),
                description: "Duration of HTTP server requests.".into(),
                unit: "s".into(),
                data: Some(metric::Data::Histogram(Histogram { data_points, aggregation_temporality: cumulative })),
                ..Default::default()
            },
            Metric {
                name: "feed.cache.lookups".into(),
                description: "Feed cache lookups by result.".into(),
                unit: "{lookup}".into(),
                data: Some(metric::Data::Sum(Sum { data_points: cache_points, aggregation_temporality: cumulative, is_monotonic: true })),
                ..Default::default()
            },
        ];
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(resource("feed")),
                scope_metrics: vec![ScopeMetrics { scope: Some(scope()), metrics, schema_url: String::new() }],
                schema_url: String::new(),
            }],
        }
    }
}

/// `feed` calling `users`: a client span in `feed`, the handler's server span in `users`.
fn users_call(trace: &mut Trace<'_>, parent: [u8; 8], at: u64) -> u64 {
    let client = trace.span_id();
    let server_start = at + 250_000;
    let server = trace.span_id();
    let query_end = trace.query_in_users(server, server_start + 60_000);
    let server_end = query_end + 80_000;
    let end = server_end + 250_000;
    let attributes = vec![kv("http.request.method", "GET"), kv("http.route", "/users/{id}"), kv_int("http.response.status_code", 200)];
    trace.push(true, server, Some(client), "GET /users/{id}", SpanKind::Server, server_start, server_end, attributes, None);
    let attributes = vec![kv("http.request.method", "GET"), kv("peer.service", "users"), kv("server.address", "users")];
    trace.push(false, client, Some(parent), "GET users", SpanKind::Client, at, end, attributes, None);
    end
}

impl Trace<'_> {
    /// `SELECT users` inside the `users` service; returns its end.
    fn query_in_users(&mut self, parent: [u8; 8], at: u64) -> u64 {
        let end = at + self.duration(1.6, 0.5);
        let attributes = vec![kv("db.system", "postgresql"), kv("db.query.text", "SELECT * FROM users WHERE id = $1")];
        self.span(true, Some(parent), "SELECT users", SpanKind::Client, at, end, attributes, None);
        end
    }
}

#[allow(clippy::too_many_arguments)]
fn log_line(out: &mut String, end: u64, trace_id: &[u8; 16], span_id: &[u8; 8], method: &str, path: &str, status: u16, seconds: f64) {
    let time = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(end));
    let level = match status {
        500.. => "error",
        400.. => "warn",
        _ => "info",
    };
    let line = serde_json::json!({
        "time": time.to_string(),
        "level": level,
        "msg": format!("{method} {path} {status} in {:.1} ms", seconds * 1000.0),
        "service": "feed",
        "trace_id": hex(trace_id),
        "span_id": hex(span_id),
        "http.route": path,
        "status": status,
    });
    out.push_str(&line.to_string());
    out.push('\n');
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Payload as _;

    #[test]
    fn requests_are_whole_traces_of_two_services_with_a_log_line_each() {
        let mut workload = Workload::new(fastrand::Rng::with_seed(7));
        let mut batch = Batch::default();
        let end = 1_700_000_000_000_000_000;
        for _ in 0..200 {
            workload.request(end, &mut batch);
        }
        assert_eq!(batch.lines.lines().count(), 200);
        let traces = batch.traces();
        assert!(traces.check_ids().is_ok());
        let spans: Vec<&Span> = traces.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans).collect();
        let roots: Vec<&&Span> = spans.iter().filter(|s| s.parent_span_id.is_empty()).collect();
        assert_eq!(roots.len(), 200, "one server span without a parent per request");
        for root in &roots {
            assert_eq!(root.end_time_unix_nano, end, "{}", root.name);
            assert!(root.start_time_unix_nano < end);
        }
        // Every parent is in the trace, and children lie within their parents.
        for span in &spans {
            if span.parent_span_id.is_empty() {
                continue;
            }
            let parent = spans
                .iter()
                .find(|p| p.trace_id == span.trace_id && p.span_id == span.parent_span_id)
                .unwrap_or_else(|| panic!("{} has no parent", span.name));
            assert!(parent.start_time_unix_nano <= span.start_time_unix_nano && span.end_time_unix_nano <= parent.end_time_unix_nano,
                "{} lies outside {}", span.name, parent.name);
        }
        let names: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        for name in ["GET /api/feed/v4", "POST /api/comment", "GET /api/profile/{id}", "auth", "rate_limit", "metrics",
            "feed_v4_handler", "redis.get", "SELECT posts", "GET users", "GET /users/{id}", "SELECT users", "render",
            "SELECT avatars", "INSERT comments", "comments publish"] {
            assert!(names.contains(name), "no span {name:?} in {names:?}");
        }
        assert_eq!(traces.resource_spans.len(), 2, "feed and users");
        let metrics = workload.metrics(end);
        assert!(metrics.item_count() >= 4, "histogram points per route and status, and the cache counter");
    }

    #[test]
    fn the_log_file_rotates_past_its_size() {
        let dir = std::env::temp_dir().join(format!("periscope-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("feed.log");
        let mut log = LogFile::open(&path).unwrap();
        let line = "x".repeat(1023) + "\n";
        for _ in 0..(LOG_ROTATE_BYTES / 1024 + 1) {
            log.write(&line).unwrap();
        }
        assert_eq!(std::fs::metadata(dir.join("feed.log.1")).unwrap().len(), LOG_ROTATE_BYTES);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
