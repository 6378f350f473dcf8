//! The agent's configuration: serde structs mirroring the YAML of SPEC.md, loading with
//! environment substitution, and validation.
//!
//! Loading runs in three steps, each reporting every problem it finds with the key path and
//! the line: `${VAR}` substitution over the text, typed deserialization (unknown keys are
//! rejected everywhere), then semantic checks (URLs, addresses, files, limits). Every section
//! and key is optional; defaults are those of the embedded default config.

mod env;
mod locate;
mod units;

pub use units::ByteSize;

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use units::duration;

/// The config `periscope run` uses when neither `--config` nor `$PERISCOPE_CONFIG` is given.
pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");

/// One problem in a config: where (key path, line) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { path: path.into(), line: None, message: message.into() }
    }

    fn at_line(line: usize, message: impl Into<String>) -> Self {
        ConfigError { path: String::new(), line: Some(line), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (false, Some(line)) => write!(f, "{} (line {line}): {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => f.write_str(&self.message),
        }
    }
}

/// Every problem found in one config, in file order.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub source_name: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{} has {n} error{}:",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for error in &self.errors {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

/// Where a config came from, for messages.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "config {}", path.display()),
            ConfigSource::Embedded => f.write_str("the embedded default config"),
        }
    }
}

impl Config {
    /// Loads and validates a config file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let source = match path {
            Some(path) => ConfigSource::File(path.to_owned()),
            None => ConfigSource::Embedded,
        };
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|e| ConfigErrors {
                source_name: source.to_string(),
                errors: vec![ConfigError::new("", format!("cannot read {}: {e}", path.display()))],
            })?,
            None => DEFAULT_CONFIG.to_owned(),
        };
        Config::from_yaml(&text, &source, |name| std::env::var(name).ok())
    }

    /// Parses and validates config text; `lookup` resolves `${VAR}` references.
    pub fn from_yaml(
        text: &str,
        source: &ConfigSource,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let fail = |mut errors: Vec<ConfigError>| {
            for error in &mut errors {
                if error.line.is_none() && !error.path.is_empty() {
                    error.line = locate::line_of(text, &error.path);
                }
            }
            errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
            ConfigErrors { source_name: source.to_string(), errors }
        };
        let expanded = env::substitute(text, lookup).map_err(fail)?;
        let config = parse(&expanded).map_err(|e| fail(vec![e]))?;
        let errors = config.validate();
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(fail(errors))
        }
    }

    /// The effective config as YAML, with secrets redacted.
    pub fn to_yaml(&self) -> String {
        let mut shown = self.clone();
        shown.node_name = self.effective_node_name();
        if !shown.server.auth_token.is_empty() {
            shown.server.auth_token = "<redacted>".into();
        }
        serde_norway::to_string(&shown).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    /// `node_name`, or the host name when it is empty.
    pub fn effective_node_name(&self) -> String {
        if !self.node_name.trim().is_empty() {
            return self.node_name.trim().to_owned();
        }
        gethostname::gethostname().to_string_lossy().into_owned()
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    // An empty file (or one with only comments) is the all-defaults config.
    let only_comments = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---");
    if only_comments {
        return Ok(Config::default());
    }
    let deserializer = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Config>(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let line = inner.location().map(|l| l.line());
        let mut message = inner.to_string();
        if let Some(location) = inner.location() {
            let suffix = format!(" at line {} column {}", location.line(), location.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
        let path = if path == "." { String::new() } else { path };
        // The YAML library names the enclosing mapping itself (`sources.otlp: unknown field`);
        // the key path already says where.
        if let Some((prefix, rest)) = message.split_once(": ") {
            if !prefix.is_empty() && path.starts_with(prefix) {
                message = rest.to_owned();
            }
        }
        ConfigError { path, line, message }
    })
}

/// The whole configuration. Field docs name the YAML keys of SPEC.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Added to all data as `node` / `k8s.node.name` / `host.name`; empty means the host name.
    pub node_name: String,
    pub data_dir: PathBuf,
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    pub server: ServerConfig,
    pub log: LogConfig,
    pub sources: SourcesConfig,
    pub paths: PathsConfig,
    pub exporters: ExportersConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: String::new(),
            data_dir: PathBuf::from("./data"),
            shutdown_timeout: Duration::from_secs(10),
            server: ServerConfig::default(),
            log: LogConfig::default(),
            sources: SourcesConfig::default(),
            paths: PathsConfig::default(),
            exporters: ExportersConfig {
                prometheus: Some(PrometheusExporterConfig::default()),
                ..ExportersConfig::default()
            },
        }
    }
}

/// A listen address: `host:port` with an IP host, or `localhost:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl ListenAddr {
    pub const fn loopback(port: u16) -> Self {
        ListenAddr(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(ListenAddr(addr));
        }
        if let Some(port) = text.strip_prefix("localhost:") {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(ListenAddr::loopback(port));
            }
        }
        Err(serde::de::Error::custom(format!(
            "invalid listen address `{text}` (expected host:port with an IP address, e.g. `127.0.0.1:4317` or `0.0.0.0:4317`)"
        )))
    }
}

/// Deserializes an optional section so that a present-but-empty section (`prometheus:`)
/// means "on with defaults" rather than "off".
fn present_means_on<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(Option::<T>::deserialize(deserializer)?.unwrap_or_default()))
}

fn default_listen(port: u16) -> Option<ListenAddr> {
    Some(ListenAddr::loopback(port))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    /// Bearer token guarding `/debug/pprof/*` and state-changing endpoints.
    pub auth_token: String,
    /// On-demand CPU profiles started per profiled process (the agent, each pprof target)
    /// within a minute; further requests get 429 with `Retry-After`.
    pub max_profiles_per_minute: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: ListenAddr::loopback(8686), auth_token: String::new(), max_profiles_per_minute: 6 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,periscope=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesConfig {
    pub otlp: OtlpConfig,
    pub prometheus: ScrapeConfig,
    pub host_metrics: HostMetricsConfig,
    pub logs: Vec<LogSourceConfig>,
    pub pprof: PprofConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// gRPC listener; `null` disables it.
    pub grpc: Option<ListenAddr>,
    /// HTTP listener (`/v1/traces`, `/v1/metrics`, `/v1/logs`); `null` disables it.
    pub http: Option<ListenAddr>,
    /// Largest accepted request, compressed or not.
    pub max_request_size: ByteSize,
    /// Serve both listeners over TLS.
    pub tls: Option<ServerTlsConfig>,
    /// Metric series (resource, metric name and attributes) taken from OTLP senders; data
    /// points of further series are refused (OTLP partial success) and counted.
    pub max_metric_series: usize,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            grpc: default_listen(4317),
            http: default_listen(4318),
            max_request_size: ByteSize::mib(16),
            tls: None,
            max_metric_series: 200_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    #[serde(with = "duration")]
    pub scrape_interval: Duration,
    #[serde(with = "duration")]
    pub scrape_timeout: Duration,
    pub static_targets: Vec<StaticTarget>,
    pub kubernetes_pods: bool,
    /// Series kept per target; further ones (in the target's order) are dropped and counted.
    pub max_series_per_target: usize,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        ScrapeConfig {
            scrape_interval: Duration::from_secs(15),
            scrape_timeout: Duration::from_secs(10),
            static_targets: Vec::new(),
            kubernetes_pods: false,
            max_series_per_target: 200_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticTarget {
    pub job: String,
    pub url: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostMetricsConfig {
    pub enabled: bool,
    #[serde(with = "duration")]
    pub interval: Duration,
    pub root: PathBuf,
}

impl Default for HostMetricsConfig {
    fn default() -> Self {
        HostMetricsConfig { enabled: true, interval: Duration::from_secs(15), root: "/".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSourceConfig {
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub format: LogFormatKind,
    #[serde(default)]
    pub start_at: StartAt,
    #[serde(default)]
    pub multiline: MultilineConfig,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatKind {
    #[default]
    Auto,
    Cri,
    Docker,
    Json,
    Logfmt,
    Plain,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartAt {
    #[default]
    Beginning,
    End,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultilineConfig {
    pub start_pattern: Option<String>,
    pub max_lines: usize,
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for MultilineConfig {
    fn default() -> Self {
        MultilineConfig { start_pattern: None, max_lines: 500, timeout: Duration::from_secs(1) }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PprofConfig {
    pub targets: Vec<PprofTarget>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PprofTarget {
    pub name: String,
    pub url: String,
    #[serde(default, with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_profile_seconds")]
    pub seconds: u32,
}

fn default_profile_seconds() -> u32 {
    10
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    pub enabled: bool,
    #[serde(with = "duration")]
    pub trace_timeout: Duration,
    pub max_traces_in_flight: usize,
    pub max_handlers: usize,
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            enabled: true,
            trace_timeout: Duration::from_secs(5),
            max_traces_in_flight: 50_000,
            max_handlers: 2_000,
        }
    }
}

/// An exporter is on when its section is present. With no `exporters` section at all, the
/// pull endpoint for Prometheus is on (see `Config::default`), as in the embedded default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportersConfig {
    #[serde(deserialize_with = "present_means_on", skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusExporterConfig>,
    #[serde(deserialize_with = "present_means_on", skip_serializing_if = "Option::is_none")]
    pub prometheus_remote_write: Option<RemoteWriteConfig>,
    #[serde(deserialize_with = "present_means_on", skip_serializing_if = "Option::is_none")]
    pub jaeger: Option<JaegerConfig>,
    #[serde(deserialize_with = "present_means_on", skip_serializing_if = "Option::is_none")]
    pub loki: Option<LokiConfig>,
}


#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusExporterConfig {
    pub listen: ListenAddr,
    /// OTLP and host series kept for the pull endpoint; further new ones are dropped and
    /// counted.
    pub max_series: usize,
}

impl Default for PrometheusExporterConfig {
    fn default() -> Self {
        PrometheusExporterConfig { listen: ListenAddr::loopback(9464), max_series: 500_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteConfig {
    pub url: String,
    pub headers: BTreeMap<String, String>,
    /// Parallel senders; each series always goes through the same one, in order.
    pub shards: usize,
    pub batch: RemoteWriteBatchConfig,
    pub wal: WalConfig,
    pub retry: RetryConfig,
    /// Deadline of one write request.
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub tls: Option<ClientTlsConfig>,
}

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        RemoteWriteConfig {
            url: "http://prometheus:9090/api/v1/write".into(),
            headers: BTreeMap::new(),
            shards: 4,
            batch: RemoteWriteBatchConfig::default(),
            wal: WalConfig::default(),
            retry: RetryConfig {
                initial_interval: Duration::from_millis(500),
                max_interval: Duration::from_secs(30),
                max_elapsed_time: Duration::from_secs(2 * 3600),
                ..RetryConfig::default()
            },
            timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteBatchConfig {
    /// Samples per write request...
    pub max_samples: usize,
    /// ...or what arrived within this long.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for RemoteWriteBatchConfig {
    fn default() -> Self {
        RemoteWriteBatchConfig { max_samples: 2000, timeout: Duration::from_secs(1) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalConfig {
    /// Bytes the write-ahead log (under `data_dir/remote_write`) may hold; past it the oldest
    /// samples are dropped and counted.
    pub max_bytes: ByteSize,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig { max_bytes: ByteSize::mib(512) }
    }
}

/// Loki's push API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LokiConfig {
    /// The push endpoint, `http(s)://host:3100/loki/api/v1/push`.
    pub url: String,
    /// Sent as `X-Scope-OrgID`.
    pub tenant_id: Option<String>,
    pub headers: BTreeMap<String, String>,
    /// `protobuf` (snappy-compressed, what Loki's own clients send) or `json` (for debugging).
    pub encoding: LokiEncoding,
    /// Deadline of one push request.
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub batch: LokiBatchConfig,
    pub queue: LokiQueueConfig,
    /// Retries of a push; entries from files whose push gave up are read again after a restart.
    pub retry: RetryConfig,
    /// Push requests in flight at once.
    pub concurrency: usize,
    pub tls: Option<ClientTlsConfig>,
}

impl Default for LokiConfig {
    fn default() -> Self {
        LokiConfig {
            url: "http://loki:3100/loki/api/v1/push".into(),
            tenant_id: None,
            headers: BTreeMap::new(),
            encoding: LokiEncoding::Protobuf,
            timeout: Duration::from_secs(10),
            batch: LokiBatchConfig::default(),
            queue: LokiQueueConfig::default(),
            retry: RetryConfig { max_elapsed_time: Duration::from_secs(3600), ..RetryConfig::default() },
            concurrency: 2,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LokiEncoding {
    #[default]
    Protobuf,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LokiBatchConfig {
    /// A push is sent once its lines add up to about this much...
    pub max_bytes: ByteSize,
    /// ...or when its oldest entry has waited this long.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for LokiBatchConfig {
    fn default() -> Self {
        LokiBatchConfig { max_bytes: ByteSize::mib(1), timeout: Duration::from_secs(1) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LokiQueueConfig {
    /// Log entries queued or in a push (retries included); when full, sources wait.
    pub max_entries: usize,
}

impl Default for LokiQueueConfig {
    fn default() -> Self {
        LokiQueueConfig { max_entries: 100_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    Grpc,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
}

/// OTLP to Jaeger's collector, which ingests OTLP natively.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JaegerConfig {
    /// gRPC: `http(s)://host:4317`. HTTP: a base URL (`/v1/traces` is appended when the
    /// path is empty) or the full URL of the traces endpoint.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    /// Deadline of one export request.
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub batch: SpanBatchConfig,
    pub queue: SpanQueueConfig,
    pub retry: RetryConfig,
    /// Export requests in flight at once.
    pub concurrency: usize,
    pub tls: Option<ClientTlsConfig>,
}

impl Default for JaegerConfig {
    fn default() -> Self {
        JaegerConfig {
            endpoint: "http://jaeger-collector:4317".into(),
            protocol: OtlpProtocol::Grpc,
            headers: BTreeMap::new(),
            compression: Compression::None,
            timeout: Duration::from_secs(10),
            batch: SpanBatchConfig::default(),
            queue: SpanQueueConfig::default(),
            retry: RetryConfig::default(),
            concurrency: 4,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpanBatchConfig {
    /// A batch is sent when it holds this many spans...
    pub max_spans: usize,
    /// ...or when its oldest span has waited this long.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for SpanBatchConfig {
    fn default() -> Self {
        SpanBatchConfig { max_spans: 8192, timeout: Duration::from_millis(200) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpanQueueConfig {
    /// Spans waiting for or under export; when full, receivers answer "try later".
    pub max_spans: usize,
}

impl Default for SpanQueueConfig {
    fn default() -> Self {
        SpanQueueConfig { max_spans: 65_536 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    pub enabled: bool,
    #[serde(with = "duration")]
    pub initial_interval: Duration,
    #[serde(with = "duration")]
    pub max_interval: Duration,
    /// Give up on a batch (dropped, counted) after retrying this long.
    #[serde(with = "duration")]
    pub max_elapsed_time: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            enabled: true,
            initial_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            max_elapsed_time: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// CA bundle (PEM) to verify the server; the built-in web roots when unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) and key for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name to verify the server certificate against, when not the endpoint's host.
    pub server_name: Option<String>,
}

// ---- semantic validation -------------------------------------------------------------

impl Config {
    /// Checks what types cannot: URLs, files, limits, clashing addresses. Returns every problem.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: &str, message: String| errors.push(ConfigError::new(path, message));

        if self.shutdown_timeout.is_zero() {
            err("shutdown_timeout", "must be greater than 0".into());
        }
        if self.server.max_profiles_per_minute == 0 {
            err("server.max_profiles_per_minute", "must be greater than 0".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            err("log.level", format!("invalid filter `{}`: {e}", self.log.level));
        }

        let otlp = &self.sources.otlp;
        if otlp.max_request_size.0 == 0 {
            err("sources.otlp.max_request_size", "must be greater than 0".into());
        }
        if otlp.max_metric_series == 0 {
            err("sources.otlp.max_metric_series", "must be greater than 0".into());
        }
        if self.sources.prometheus.max_series_per_target == 0 {
            err("sources.prometheus.max_series_per_target", "must be greater than 0".into());
        }
        if self.exporters.prometheus.as_ref().is_some_and(|p| p.max_series == 0) {
            err("exporters.prometheus.max_series", "must be greater than 0".into());
        }
        if let Some(tls) = &otlp.tls {
            check_file(&mut err, "sources.otlp.tls.cert_file", Some(&tls.cert_file));
            check_file(&mut err, "sources.otlp.tls.key_file", Some(&tls.key_file));
            check_file(&mut err, "sources.otlp.tls.client_ca_file", tls.client_ca_file.as_ref());
        }

        for (i, target) in self.sources.prometheus.static_targets.iter().enumerate() {
            if let Err(e) = check_http_url(&target.url) {
                err(&format!("sources.prometheus.static_targets[{i}].url"), e);
            }
        }
        for (i, source) in self.sources.logs.iter().enumerate() {
            if source.include.is_empty() {
                err(&format!("sources.logs[{i}].include"), "needs at least one glob pattern".into());
            }
        }
        for (i, target) in self.sources.pprof.targets.iter().enumerate() {
            if let Err(e) = check_http_url(&target.url) {
                err(&format!("sources.pprof.targets[{i}].url"), e);
            }
        }

        if let Some(jaeger) = &self.exporters.jaeger {
            match check_http_url(&jaeger.endpoint) {
                Err(e) => err("exporters.jaeger.endpoint", e),
                Ok(uri) => {
                    let has_path = !matches!(uri.path(), "" | "/");
                    if jaeger.protocol == OtlpProtocol::Grpc && has_path {
                        err(
                            "exporters.jaeger.endpoint",
                            format!("a gRPC endpoint has no path: write `{}://{}`", uri.scheme_str().unwrap_or("http"), uri.authority().map(|a| a.as_str()).unwrap_or("")),
                        );
                    }
                }
            }
            check_headers(&mut err, "exporters.jaeger.headers", &jaeger.headers);
            if jaeger.batch.max_spans == 0 {
                err("exporters.jaeger.batch.max_spans", "must be greater than 0".into());
            }
            if jaeger.queue.max_spans < jaeger.batch.max_spans {
                err(
                    "exporters.jaeger.queue.max_spans",
                    format!("must be at least batch.max_spans ({})", jaeger.batch.max_spans),
                );
            }
            if !(1..=256).contains(&jaeger.concurrency) {
                err("exporters.jaeger.concurrency", "must be between 1 and 256".into());
            }
            if jaeger.timeout.is_zero() {
                err("exporters.jaeger.timeout", "must be greater than 0".into());
            }
            if jaeger.retry.initial_interval.is_zero() {
                err("exporters.jaeger.retry.initial_interval", "must be greater than 0".into());
            }
            if jaeger.retry.max_interval < jaeger.retry.initial_interval {
                err(
                    "exporters.jaeger.retry.max_interval",
                    "must not be less than retry.initial_interval".into(),
                );
            }
            if let Some(tls) = &jaeger.tls {
                check_file(&mut err, "exporters.jaeger.tls.ca_file", tls.ca_file.as_ref());
                check_file(&mut err, "exporters.jaeger.tls.cert_file", tls.cert_file.as_ref());
                check_file(&mut err, "exporters.jaeger.tls.key_file", tls.key_file.as_ref());
                if tls.cert_file.is_some() != tls.key_file.is_some() {
                    err("exporters.jaeger.tls", "cert_file and key_file go together".into());
                }
            }
        }
        if self.paths.enabled {
            if self.paths.trace_timeout.is_zero() {
                err("paths.trace_timeout", "must be greater than 0".into());
            }
            if self.paths.max_traces_in_flight == 0 {
                err("paths.max_traces_in_flight", "must be greater than 0".into());
            }
            if self.paths.max_handlers == 0 {
                err("paths.max_handlers", "must be greater than 0".into());
            }
        }
        if let Some(rw) = &self.exporters.prometheus_remote_write {
            if let Err(e) = check_http_url(&rw.url) {
                err("exporters.prometheus_remote_write.url", e);
            }
            check_headers(&mut err, "exporters.prometheus_remote_write.headers", &rw.headers);
            if !(1..=64).contains(&rw.shards) {
                err("exporters.prometheus_remote_write.shards", "must be between 1 and 64".into());
            }
            if rw.batch.max_samples == 0 {
                err("exporters.prometheus_remote_write.batch.max_samples", "must be greater than 0".into());
            }
            if rw.timeout.is_zero() {
                err("exporters.prometheus_remote_write.timeout", "must be greater than 0".into());
            }
            if rw.retry.initial_interval.is_zero() {
                err("exporters.prometheus_remote_write.retry.initial_interval", "must be greater than 0".into());
            }
            if let Some(tls) = &rw.tls {
                check_file(&mut err, "exporters.prometheus_remote_write.tls.ca_file", tls.ca_file.as_ref());
                check_file(&mut err, "exporters.prometheus_remote_write.tls.cert_file", tls.cert_file.as_ref());
                check_file(&mut err, "exporters.prometheus_remote_write.tls.key_file", tls.key_file.as_ref());
            }
        }
        if let Some(loki) = &self.exporters.loki {
            if let Err(e) = check_http_url(&loki.url) {
                err("exporters.loki.url", e);
            }
            check_headers(&mut err, "exporters.loki.headers", &loki.headers);
            if loki.batch.max_bytes.0 == 0 {
                err("exporters.loki.batch.max_bytes", "must be greater than 0".into());
            }
            if loki.queue.max_entries == 0 {
                err("exporters.loki.queue.max_entries", "must be greater than 0".into());
            }
            if !(1..=64).contains(&loki.concurrency) {
                err("exporters.loki.concurrency", "must be between 1 and 64".into());
            }
            if loki.timeout.is_zero() {
                err("exporters.loki.timeout", "must be greater than 0".into());
            }
            if loki.retry.initial_interval.is_zero() {
                err("exporters.loki.retry.initial_interval", "must be greater than 0".into());
            }
            if loki.retry.max_interval < loki.retry.initial_interval {
                err("exporters.loki.retry.max_interval", "must not be less than retry.initial_interval".into());
            }
            if let Some(tls) = &loki.tls {
                check_file(&mut err, "exporters.loki.tls.ca_file", tls.ca_file.as_ref());
                check_file(&mut err, "exporters.loki.tls.cert_file", tls.cert_file.as_ref());
                check_file(&mut err, "exporters.loki.tls.key_file", tls.key_file.as_ref());
                if tls.cert_file.is_some() != tls.key_file.is_some() {
                    err("exporters.loki.tls", "cert_file and key_file go together".into());
                }
            }
        }

        // Two listeners on one port would fail at start-up; say so now, naming both keys.
        let mut listeners: Vec<(&str, SocketAddr)> = vec![("server.listen", self.server.listen.0)];
        if let Some(a) = otlp.grpc {
            listeners.push(("sources.otlp.grpc", a.0));
        }
        if let Some(a) = otlp.http {
            listeners.push(("sources.otlp.http", a.0));
        }
        if let Some(p) = &self.exporters.prometheus {
            listeners.push(("exporters.prometheus.listen", p.listen.0));
        }
        for (i, (key, addr)) in listeners.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| {
                a.port() == addr.port()
                    && (a.ip() == addr.ip() || a.ip().is_unspecified() || addr.ip().is_unspecified())
            }) {
                err(key, format!("{addr} is also used by {other}"));
            }
        }
        errors
    }
}

fn check_http_url(text: &str) -> Result<http::Uri, String> {
    if !(text.starts_with("http://") || text.starts_with("https://")) {
        return Err(format!("invalid URL `{text}`: it must start with http:// or https://"));
    }
    let uri: http::Uri = text.parse().map_err(|e| format!("invalid URL `{text}`: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("invalid URL `{text}`: the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("invalid URL `{text}`: no host"));
    }
    Ok(uri)
}

fn check_headers(err: &mut impl FnMut(&str, String), key: &str, headers: &BTreeMap<String, String>) {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            err(&format!("{key}.{name}"), format!("`{name}` is not a valid header name"));
        } else if http::HeaderValue::from_str(value).is_err() {
            err(&format!("{key}.{name}"), "the value is not a valid header value".into());
        }
    }
}

fn check_file(err: &mut impl FnMut(&str, String), key: &str, path: Option<&PathBuf>) {
    if let Some(path) = path {
        if let Err(e) = std::fs::metadata(path) {
            err(key, format!("cannot read {}: {e}", path.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_yaml(text, &ConfigSource::Embedded, |name| match name {
            "NODE_NAME" => Some("node-a".into()),
            _ => None,
        })
    }

    #[test]
    fn embedded_default_config_is_valid_and_matches_the_defaults() {
        let config = load(DEFAULT_CONFIG).unwrap();
        assert_eq!(config.node_name, "node-a");
        assert_eq!(config.sources.otlp.grpc, Some(ListenAddr::loopback(4317)));
        assert_eq!(config.sources.otlp.http, Some(ListenAddr::loopback(4318)));
        assert!(config.exporters.prometheus.is_some());
        assert!(config.exporters.jaeger.is_none());
        let mut all_defaults = load("").unwrap();
        all_defaults.node_name = "node-a".into();
        assert_eq!(config.to_yaml(), all_defaults.to_yaml());
    }

    #[test]
    fn spec_example_config_is_valid() {
        let text = r#"
node_name: ${NODE_NAME:-}
data_dir: ./data
shutdown_timeout: 10s
server:
  listen: 127.0.0.1:8686
  auth_token: ${PERISCOPE_TOKEN:-}
sources:
  otlp:
    grpc: 127.0.0.1:4317
    http: 127.0.0.1:4318
  prometheus:
    scrape_interval: 15s
    scrape_timeout: 10s
    static_targets:
      - job: feed
        url: http://127.0.0.1:9100/metrics
        labels: { team: video }
    kubernetes_pods: false
  host_metrics:
    enabled: true
    interval: 15s
    root: /
  logs:
    - include: ["/var/log/pods/*/*/*.log"]
      exclude: []
      format: auto
      start_at: beginning
      multiline: { start_pattern: null, max_lines: 500, timeout: 1s }
      labels: { job: pods }
  pprof:
    targets:
      - name: feed
        url: http://127.0.0.1:6060/debug/pprof/profile
        interval: 0s
        seconds: 10
paths:
  enabled: true
  trace_timeout: 5s
  max_traces_in_flight: 50000
  max_handlers: 2000
exporters:
  prometheus:
    listen: 127.0.0.1:9464
  prometheus_remote_write:
    url: http://prometheus:9090/api/v1/write
    headers: {}
  jaeger:
    endpoint: http://jaeger-collector:4317
    protocol: grpc
    headers: {}
  loki:
    url: http://loki:3100/loki/api/v1/push
    tenant_id: null
"#;
        let config = load(text).unwrap();
        assert_eq!(config.sources.prometheus.static_targets[0].labels["team"], "video");
        assert_eq!(config.exporters.jaeger.unwrap().protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let env = |name: &str| (name == "NODE_NAME").then(|| "node-1".to_string());
            // Parse and type-check only: the TLS examples name files of a real deployment.
            let expanded = env::substitute(&text, env).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
            parse(&expanded).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(seen >= 2);
    }

    #[test]
    fn unknown_key_is_rejected_with_path_and_line() {
        let errors = load("sources:\n  otlp:\n    grcp: 127.0.0.1:4317\n").unwrap_err();
        assert_eq!(errors.errors.len(), 1);
        let e = &errors.errors[0];
        assert!(e.path.starts_with("sources.otlp"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.starts_with("unknown field `grcp`"), "{e}");
    }

    #[test]
    fn wrong_enum_value_names_key_and_line() {
        let errors = load("exporters:\n  jaeger:\n    protocol: grcp\n").unwrap_err();
        let e = &errors.errors[0];
        assert_eq!(e.path, "exporters.jaeger.protocol");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("grcp"), "{e}");
    }

    #[test]
    fn bad_duration_names_key() {
        let errors = load("shutdown_timeout: soon\n").unwrap_err();
        assert_eq!(errors.errors[0].path, "shutdown_timeout");
        assert!(errors.errors[0].message.contains("soon"));
    }

    #[test]
    fn semantic_errors_are_all_reported_with_lines() {
        let text = "exporters:\n  jaeger:\n    endpoint: htp:/x\n    concurrency: 0\n    headers:\n      \"bad header\": x\n";
        let errors = load(text).unwrap_err();
        let found: Vec<_> = errors.errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            found,
            vec![
                ("exporters.jaeger.endpoint", Some(3)),
                ("exporters.jaeger.concurrency", Some(4)),
                ("exporters.jaeger.headers.bad header", Some(6)),
            ]
        );
    }

    #[test]
    fn null_disables_a_receiver_and_empty_section_enables_an_exporter() {
        let config = load("sources:\n  otlp:\n    grpc: null\nexporters:\n  jaeger:\n").unwrap();
        assert_eq!(config.sources.otlp.grpc, None);
        assert!(config.sources.otlp.http.is_some());
        assert!(config.exporters.jaeger.is_some());
        // A present `exporters` section lists exactly the exporters that are on.
        assert!(config.exporters.prometheus.is_none());
    }

    #[test]
    fn clashing_listeners_are_reported() {
        let errors = load("server:\n  listen: 127.0.0.1:4317\n").unwrap_err();
        assert_eq!(errors.errors[0].path, "sources.otlp.grpc");
    }

    #[test]
    fn unset_variable_is_an_error_with_line() {
        let errors = load("node_name: ${NOT_SET_ANYWHERE}\n").unwrap_err();
        assert_eq!(errors.errors[0].line, Some(1));
        assert!(errors.to_string().contains("NOT_SET_ANYWHERE"));
    }

    #[test]
    fn auth_token_is_redacted_when_printed() {
        let config = load("server:\n  auth_token: s3cret\n").unwrap();
        assert!(!config.to_yaml().contains("s3cret"));
    }

    proptest::proptest! {
        #[test]
        fn any_text_gives_a_config_or_errors(text in "[a-z_:{}\\[\\] \n\\-#$0-9.]{0,200}") {
            let _ = load(&text);
        }
    }
}
