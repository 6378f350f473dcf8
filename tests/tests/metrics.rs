//! Metrics end to end, against real peers: a real Prometheus scrapes the agent's pull
//! endpoint or receives its remote writes, and PromQL must return exactly what went in —
//! series scraped from targets built with real client libraries (Rust's `prometheus-client`,
//! Python's `prometheus_client`), host metrics (checked against `/proc` and against a
//! node_exporter running beside the agent), and OTLP metrics sent by the OpenTelemetry Rust
//! SDK, named per the OpenTelemetry→Prometheus compatibility rules. Series that vanish go
//! stale, remote write loses nothing across Prometheus outages and agent restarts (graceful or
//! SIGKILL), and broken targets and a refusing endpoint are counted by reason without
//! stopping anything else.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::metrics::{Aggregation, Instrument, PeriodicReader, SdkMeterProvider, Stream, Temporality};
use opentelemetry_sdk::Resource;
use periscope_e2e::promserver::{Exposition, NodeExporter, Prometheus, ScrapeTarget, Series};
use periscope_e2e::{free_port, tls, Agent, Metrics, DEADLINE, POLL_INTERVAL};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::Message as _;

const NODE: &str = "metrics-node";
/// A label value that needs every escape of the exposition formats.
const TRICKY: &str = "say \"hi\" \\ then\nnext line";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

// ---------------------------------------------------------------------------------------
// The agent's config
// ---------------------------------------------------------------------------------------

struct StaticTarget {
    job: String,
    url: String,
    labels: Vec<(String, String)>,
}

/// The sections of the agent's config a metrics test needs; every listener on a free port.
struct Setup {
    admin: u16,
    otlp_http: Option<u16>,
    host_interval: Option<&'static str>,
    pull: Option<u16>,
    remote_write: Option<String>,
    shards: Option<usize>,
    scrape_interval: &'static str,
    scrape_timeout: &'static str,
    targets: Vec<StaticTarget>,
    kubernetes_pods: bool,
    data_dir: Option<PathBuf>,
    /// `sources.prometheus.max_series_per_target` and `sources.otlp.max_metric_series`.
    limits: Option<(usize, usize)>,
}

/// A YAML double-quoted scalar (JSON's string syntax is valid YAML).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

impl Setup {
    fn new() -> Setup {
        Setup {
            admin: free_port(),
            otlp_http: None,
            host_interval: None,
            pull: None,
            remote_write: None,
            shards: None,
            scrape_interval: "1s",
            scrape_timeout: "800ms",
            targets: Vec::new(),
            kubernetes_pods: false,
            data_dir: None,
            limits: None,
        }
    }

    fn series_limits(mut self, per_target: usize, otlp: usize) -> Setup {
        self.limits = Some((per_target, otlp));
        self
    }

    fn kubernetes_pods(mut self) -> Setup {
        self.kubernetes_pods = true;
        self
    }

    fn otlp(mut self) -> Setup {
        self.otlp_http = Some(free_port());
        self
    }

    fn host_metrics(mut self, interval: &'static str) -> Setup {
        self.host_interval = Some(interval);
        self
    }

    fn pull(mut self) -> Setup {
        self.pull = Some(free_port());
        self
    }

    fn remote_write(mut self, url: &str) -> Setup {
        self.remote_write = Some(url.to_owned());
        self
    }

    /// Remote write through one sender, so that requests arrive in the order of one log.
    fn one_shard(mut self) -> Setup {
        self.shards = Some(1);
        self
    }

    fn scrape(mut self, interval: &'static str, timeout: &'static str) -> Setup {
        self.scrape_interval = interval;
        self.scrape_timeout = timeout;
        self
    }

    fn target(mut self, job: &str, url: &str, labels: &[(&str, &str)]) -> Setup {
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.targets.push(StaticTarget { job: job.to_owned(), url: url.to_owned(), labels });
        self
    }

    fn data_dir(mut self, dir: &Path) -> Setup {
        self.data_dir = Some(dir.to_owned());
        self
    }

    fn yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(y, "node_name: {NODE}");
        match &self.data_dir {
            Some(dir) => {
                let _ = writeln!(y, "data_dir: {}", quoted(&dir.display().to_string()));
            }
            None => {
                let _ = writeln!(y, "data_dir: ./data");
            }
        }
        let _ = writeln!(y, "shutdown_timeout: 3s");
        let _ = writeln!(y, "server: {{ listen: 127.0.0.1:{} }}", self.admin);
        let _ = writeln!(y, "log: {{ format: text }}");
        let _ = writeln!(y, "sources:");
        let otlp_limit = self.limits.map(|(_, otlp)| format!(", max_metric_series: {otlp}")).unwrap_or_default();
        match self.otlp_http {
            Some(port) => {
                let _ = writeln!(y, "  otlp: {{ grpc: null, http: 127.0.0.1:{port}{otlp_limit} }}");
            }
            None => {
                let _ = writeln!(y, "  otlp: {{ grpc: null, http: null }}");
            }
        }
        match self.host_interval {
            Some(interval) => {
                let _ = writeln!(y, "  host_metrics: {{ enabled: true, interval: {interval}, root: / }}");
            }
            None => {
                let _ = writeln!(y, "  host_metrics: {{ enabled: false }}");
            }
        }
        if !self.targets.is_empty() || self.kubernetes_pods {
            let _ = writeln!(y, "  prometheus:");
            let _ = writeln!(y, "    scrape_interval: {}", self.scrape_interval);
            let _ = writeln!(y, "    scrape_timeout: {}", self.scrape_timeout);
            let _ = writeln!(y, "    kubernetes_pods: {}", self.kubernetes_pods);
            if let Some((per_target, _)) = self.limits {
                let _ = writeln!(y, "    max_series_per_target: {per_target}");
            }
            let _ = writeln!(y, "    static_targets:{}", if self.targets.is_empty() { " []" } else { "" });
            for target in &self.targets {
                let _ = writeln!(y, "      - job: {}", quoted(&target.job));
                let _ = writeln!(y, "        url: {}", quoted(&target.url));
                let labels: Vec<String> =
                    target.labels.iter().map(|(k, v)| format!("{}: {}", quoted(k), quoted(v))).collect();
                let _ = writeln!(y, "        labels: {{ {} }}", labels.join(", "));
            }
        }
        let _ = writeln!(y, "paths: {{ enabled: false }}");
        if self.pull.is_none() && self.remote_write.is_none() {
            let _ = writeln!(y, "exporters: {{}}");
            return y;
        }
        let _ = writeln!(y, "exporters:");
        if let Some(port) = self.pull {
            let _ = writeln!(y, "  prometheus: {{ listen: 127.0.0.1:{port} }}");
        }
        if let Some(url) = &self.remote_write {
            let _ = writeln!(y, "  prometheus_remote_write:");
            let _ = writeln!(y, "    url: {}", quoted(url));
            let _ = writeln!(y, "    batch: {{ max_samples: 2000, timeout: 100ms }}");
            let _ = writeln!(y, "    retry: {{ initial_interval: 100ms, max_interval: 500ms }}");
            let _ = writeln!(y, "    timeout: 5s");
            if let Some(shards) = self.shards {
                let _ = writeln!(y, "    shards: {shards}");
            }
        }
        y
    }

    fn pull_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.pull.expect("the pull exporter is on"))
    }

    fn otlp_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_http.expect("the OTLP/HTTP receiver is on"))
    }
}

fn client() -> reqwest::Client {
    tls::install_crypto_provider();
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("an HTTP client")
}

/// The agent's pull endpoint, parsed.
async fn pull(setup: &Setup) -> Metrics {
    let response = client().get(setup.pull_url()).send().await.unwrap_or_else(|e| panic!("GET pull endpoint: {e}"));
    assert_eq!(response.status(), 200, "the pull endpoint answered {}", response.status());
    Metrics::parse(&response.text().await.unwrap_or_default())
}

/// Polls the pull endpoint until `condition` holds, and returns what it served then.
async fn wait_pull(setup: &Setup, what: &str, condition: impl Fn(&Metrics) -> bool) -> Metrics {
    let started = Instant::now();
    loop {
        let metrics = pull(setup).await;
        if condition(&metrics) {
            return metrics;
        }
        if started.elapsed() > DEADLINE {
            panic!("the pull endpoint never showed {what} within {DEADLINE:?}; it served:\n{}", metrics.text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Polls until `promql` returns exactly one series whose value is `expected`.
async fn wait_value(prometheus: &Prometheus, promql: &str, expected: f64) -> Series {
    prometheus.wait_for(promql, |r| r.len() == 1 && close(r[0].value(), expected)).await.remove(0)
}

/// A histogram's buckets from `name_bucket` series: (le, cumulative count), by le.
fn buckets(series: &[Series]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = series
        .iter()
        .map(|s| {
            let le = s.label("le").unwrap_or_else(|| panic!("a bucket without le: {s:?}"));
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or_else(|e| panic!("le {le:?}: {e}")) };
            (le, s.value())
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------------------
// What goes in: a target built with prometheus-client, host metrics, the OTLP SDK.
// ---------------------------------------------------------------------------------------

/// An OpenMetrics exposition written by the `prometheus-client` crate: a counter family with
/// a label that needs escaping, a float gauge, a family whose labels clash with the
/// target's, a histogram, and a counter and a histogram carrying exemplars.
fn client_library_exposition() -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::exemplar::{CounterWithExemplar, HistogramWithExemplars};
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;
    type LabelSet = Vec<(String, String)>;
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());

    let mut registry = Registry::default();
    let requests = Family::<LabelSet, Counter>::default();
    registry.register("http_requests", "Requests handled", requests.clone());
    requests.get_or_create(&vec![pair("method", "GET"), pair("path", TRICKY)]).inc_by(7);
    let depth = Gauge::<f64, AtomicU64>::default();
    registry.register("queue_depth", "Items waiting", depth.clone());
    depth.set(-3.5);
    let clashing = Family::<LabelSet, Gauge>::default();
    registry.register("clashing", "Labels the target also sets", clashing.clone());
    clashing.get_or_create(&vec![pair("job", "inner"), pair("team", "core")]).set(1);
    let duration = Histogram::new([0.1, 0.5, 1.0]);
    registry.register("request_duration_seconds", "Request latency", duration.clone());
    for v in [0.05, 0.3, 0.3, 2.0] {
        duration.observe(v);
    }
    let jobs = CounterWithExemplar::<LabelSet>::default();
    registry.register("jobs_processed", "Jobs done", jobs.clone());
    jobs.inc_by(3, Some(vec![pair("trace_id", TRACE_ID)]), None);
    let payload = HistogramWithExemplars::<LabelSet>::new([100.0, 1000.0].into_iter());
    registry.register("payload_bytes", "Payload sizes", payload.clone());
    payload.observe(512.0, Some(vec![pair("trace_id", TRACE_ID)]), Some(SystemTime::now()));

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("the registry encodes");
    assert!(text.contains(" # {trace_id="), "prometheus-client wrote no exemplar:\n{text}");
    text
}

fn sample_lines(exposition: &str) -> usize {
    exposition.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count()
}

/// Checks what the target built with prometheus-client exposes, as Prometheus has it.
async fn check_client_library_target(prometheus: &Prometheus, target: &ScrapeTarget, exposition: &str) {
    let instance = target.instance();
    let base =
        |name: &str| labels(&[("__name__", name), ("job", "client"), ("instance", &instance), ("team", "video")]);

    let requests = wait_value(prometheus, r#"http_requests_total{job="client"}"#, 7.0).await;
    let mut expected = base("http_requests_total");
    expected.extend(labels(&[("method", "GET"), ("path", TRICKY)]));
    assert_eq!(requests.labels, expected, "labels of http_requests_total");
    // The escaped value matches in PromQL too.
    wait_value(prometheus, r#"http_requests_total{path="say \"hi\" \\ then\nnext line"}"#, 7.0).await;

    let depth = wait_value(prometheus, r#"queue_depth{job="client"}"#, -3.5).await;
    assert_eq!(depth.labels, base("queue_depth"));

    let clashing = wait_value(prometheus, r#"clashing{job="client"}"#, 1.0).await;
    let mut expected = base("clashing");
    expected.extend(labels(&[("exported_job", "inner"), ("exported_team", "core")]));
    assert_eq!(clashing.labels, expected, "scraped labels that clash are kept as exported_*");

    let bucket_series = prometheus.wait_for(r#"request_duration_seconds_bucket{job="client"}"#, |r| r.len() == 4).await;
    assert_eq!(buckets(&bucket_series), vec![(0.1, 1.0), (0.5, 3.0), (1.0, 3.0), (f64::INFINITY, 4.0)]);
    wait_value(prometheus, r#"request_duration_seconds_count{job="client"}"#, 4.0).await;
    wait_value(prometheus, r#"request_duration_seconds_sum{job="client"}"#, 0.05 + 0.3 + 0.3 + 2.0).await;

    wait_value(prometheus, r#"jobs_processed_total{job="client"}"#, 3.0).await;
    let payload = prometheus.wait_for(r#"payload_bytes_bucket{job="client"}"#, |r| r.len() == 3).await;
    assert_eq!(buckets(&payload), vec![(100.0, 0.0), (1000.0, 1.0), (f64::INFINITY, 1.0)]);
    wait_value(prometheus, r#"payload_bytes_sum{job="client"}"#, 512.0).await;

    let up = wait_value(prometheus, r#"up{job="client"}"#, 1.0).await;
    assert_eq!(up.labels, base("up"));
    wait_value(prometheus, r#"scrape_samples_scraped{job="client"}"#, sample_lines(exposition) as f64).await;
    let duration = prometheus.wait_for_one(r#"scrape_duration_seconds{job="client"}"#).await;
    assert!(duration.value() >= 0.0 && duration.value() < 1.0, "scrape_duration_seconds {duration:?}");
}

/// `MemTotal` of /proc/meminfo in bytes, the number of CPUs in /proc/stat and its `btime`.
fn proc_facts() -> (f64, usize, f64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpus =
        stat.lines().filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)).count();
    let btime = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .expect("btime in /proc/stat");
    (kib * 1024.0, cpus, btime)
}

/// Size in bytes of the filesystem mounted at `path`, as statvfs(3) reports it.
fn filesystem_size(path: &str) -> f64 {
    let c_path = std::ffi::CString::new(path).expect("a path without NUL");
    // SAFETY: a zeroed statvfs is a valid value for statvfs(3) to fill.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a statvfs owned by this frame.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    assert_eq!(rc, 0, "statvfs({path}) failed");
    stats.f_blocks as f64 * stats.f_frsize as f64
}

/// Checks host metrics against /proc, as Prometheus has them.
async fn check_host_metrics(prometheus: &Prometheus) {
    let (mem_total, cpus, btime) = proc_facts();
    let mem = wait_value(prometheus, r#"node_memory_MemTotal_bytes{job="node"}"#, mem_total).await;
    assert_eq!(mem.labels, labels(&[("__name__", "node_memory_MemTotal_bytes"), ("job", "node"), ("instance", NODE)]));
    wait_value(prometheus, r#"count(node_cpu_seconds_total{job="node",instance="metrics-node"})"#, (cpus * 8) as f64)
        .await;
    let modes = prometheus.query(r#"node_cpu_seconds_total{job="node",cpu="0"}"#).await;
    let modes: BTreeSet<&str> = modes.iter().filter_map(|s| s.label("mode")).collect();
    assert_eq!(modes, BTreeSet::from(["idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user"]));
    let idle = prometheus.wait_for_one(r#"sum(node_cpu_seconds_total{job="node",mode="idle"})"#).await;
    assert!(idle.value() > 0.0, "idle CPU seconds {idle:?}");
    wait_value(prometheus, r#"node_boot_time_seconds{job="node"}"#, btime).await;
    let filesystems = prometheus.wait_for(r#"node_filesystem_size_bytes{job="node"}"#, |r| !r.is_empty()).await;
    let root = filesystems.iter().find(|s| s.label("mountpoint") == Some("/")).unwrap_or(&filesystems[0]);
    let mountpoint = root.label("mountpoint").expect("a mountpoint label");
    assert_eq!(root.value(), filesystem_size(mountpoint), "size of the filesystem at {mountpoint}");
    prometheus.wait_for(r#"node_load1{job="node"} >= 0"#, |r| r.len() == 1).await;
    prometheus.wait_for(r#"node_network_receive_bytes_total{job="node",device="lo"} > 0"#, |r| r.len() == 1).await;
    prometheus.wait_for(r#"node_context_switches_total{job="node"} > 0"#, |r| r.len() == 1).await;
}

/// A meter provider exporting over OTLP/HTTP with `temporality`, exporting only when flushed.
/// `queue.wait` is aggregated as an exponential histogram.
fn meter_provider(endpoint: &str, temporality: Temporality) -> SdkMeterProvider {
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{endpoint}/v1/metrics"))
        .with_temporality(temporality)
        .build()
        .expect("the SDK's OTLP metric exporter");
    let reader = PeriodicReader::builder(exporter).with_interval(Duration::from_secs(3600)).build();
    let resource = Resource::builder_empty()
        .with_service_name("checkout")
        .with_attributes([
            KeyValue::new("service.namespace", "shop"),
            KeyValue::new("service.instance.id", "i-1"),
            KeyValue::new("deployment.environment.name", "e2e"),
        ])
        .build();
    SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(reader)
        .with_view(|instrument: &Instrument| {
            (instrument.name() == "queue.wait")
                .then(|| {
                    Stream::builder()
                        .with_aggregation(Aggregation::Base2ExponentialHistogram {
                            max_size: 160,
                            max_scale: 3,
                            record_min_max: true,
                        })
                        .build()
                        .ok()
                })
                .flatten()
        })
        .build()
}

async fn flush(provider: &SdkMeterProvider) {
    let provider = provider.clone();
    let result = tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("flush task");
    assert!(result.is_ok(), "the SDK could not export to the agent: {result:?}");
}

async fn shutdown(provider: SdkMeterProvider) {
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}

const EXPONENTIAL_VALUES: [f64; 3] = [1.5, 3.0, 6.0];

/// Records known measurements with the OpenTelemetry SDK and exports them to the agent: one
/// provider with cumulative temporality, one with delta temporality exporting twice.
async fn send_otlp(setup: &Setup) {
    let endpoint = setup.otlp_endpoint();
    let cumulative = meter_provider(&endpoint, Temporality::Cumulative);
    let meter = cumulative.meter("checkout");
    let orders = meter.u64_counter("orders.placed").with_unit("{order}").with_description("Orders placed").build();
    orders.add(3, &[KeyValue::new("payment.method", "card")]);
    orders.add(2, &[KeyValue::new("payment.method", "card")]);
    let duration = meter.f64_histogram("checkout.duration").with_unit("s").with_boundaries(vec![0.1, 0.5, 1.0]).build();
    for v in [0.05, 0.3, 0.7, 3.0] {
        duration.record(v, &[]);
    }
    let inflight = meter.i64_up_down_counter("inflight.requests").with_unit("{request}").build();
    inflight.add(5, &[]);
    inflight.add(-2, &[]);
    let utilization = meter.f64_gauge("cpu.utilization").with_unit("1").build();
    utilization.record(0.25, &[]);
    let wait = meter.f64_histogram("queue.wait").with_unit("ms").build();
    for v in EXPONENTIAL_VALUES {
        wait.record(v, &[]);
    }
    flush(&cumulative).await;

    let delta = meter_provider(&endpoint, Temporality::Delta);
    let meter = delta.meter("checkout");
    let egress = meter.u64_counter("network.egress").with_unit("By").build();
    let upload = meter.f64_histogram("upload.size").with_unit("By").with_boundaries(vec![200.0, 500.0, 1000.0]).build();
    egress.add(100, &[]);
    upload.record(100.0, &[]);
    upload.record(300.0, &[]);
    flush(&delta).await;
    egress.add(250, &[]);
    upload.record(700.0, &[]);
    flush(&delta).await;
    shutdown(cumulative).await;
    shutdown(delta).await;
}

/// Checks the SDK's metrics as Prometheus has them.
async fn check_otlp(prometheus: &Prometheus) {
    let target = [("job", "shop/checkout"), ("instance", "i-1")];
    let with = |name: &str, extra: &[(&str, &str)]| {
        let mut all = labels(&target);
        all.insert("__name__".into(), name.into());
        all.extend(labels(extra));
        all
    };

    let orders = wait_value(prometheus, r#"orders_placed_total{job="shop/checkout"}"#, 5.0).await;
    assert_eq!(orders.labels, with("orders_placed_total", &[("payment_method", "card")]));

    let egress = wait_value(prometheus, r#"network_egress_bytes_total{job="shop/checkout"}"#, 350.0).await;
    assert_eq!(egress.labels, with("network_egress_bytes_total", &[]), "delta sums are accumulated");

    let inflight = wait_value(prometheus, r#"inflight_requests{job="shop/checkout"}"#, 3.0).await;
    assert_eq!(inflight.labels, with("inflight_requests", &[]), "a non-monotonic sum is a gauge");
    let utilization = wait_value(prometheus, r#"cpu_utilization_ratio{job="shop/checkout"}"#, 0.25).await;
    assert_eq!(utilization.labels, with("cpu_utilization_ratio", &[]));

    let duration =
        prometheus.wait_for(r#"checkout_duration_seconds_bucket{job="shop/checkout"}"#, |r| r.len() == 4).await;
    assert_eq!(buckets(&duration), vec![(0.1, 1.0), (0.5, 2.0), (1.0, 3.0), (f64::INFINITY, 4.0)]);
    wait_value(prometheus, r#"checkout_duration_seconds_count{job="shop/checkout"}"#, 4.0).await;
    wait_value(prometheus, r#"checkout_duration_seconds_sum{job="shop/checkout"}"#, 0.05 + 0.3 + 0.7 + 3.0).await;

    // Delta histograms accumulate like delta sums.
    let upload = prometheus
        .wait_for(r#"upload_size_bytes_bucket{job="shop/checkout"}"#, |r| r.len() == 4 && buckets(r)[3].1 == 3.0)
        .await;
    assert_eq!(buckets(&upload), vec![(200.0, 1.0), (500.0, 2.0), (1000.0, 3.0), (f64::INFINITY, 3.0)]);
    wait_value(prometheus, r#"upload_size_bytes_count{job="shop/checkout"}"#, 3.0).await;
    wait_value(prometheus, r#"upload_size_bytes_sum{job="shop/checkout"}"#, 1100.0).await;

    // The exponential histogram as classic buckets: each bucket counts the values at or below
    // its bound.
    wait_value(prometheus, r#"queue_wait_milliseconds_count{job="shop/checkout"}"#, 3.0).await;
    wait_value(prometheus, r#"queue_wait_milliseconds_sum{job="shop/checkout"}"#, EXPONENTIAL_VALUES.iter().sum())
        .await;
    let wait = prometheus.wait_for(r#"queue_wait_milliseconds_bucket{job="shop/checkout"}"#, |r| !r.is_empty()).await;
    if let Err(e) = check_exponential_buckets(&buckets(&wait)) {
        panic!("the exponential histogram: {e}");
    }

    let info = prometheus.wait_for_one(r#"target_info{job="shop/checkout"}"#).await;
    assert_eq!(info.label("instance"), Some("i-1"));
    assert_eq!(info.label("deployment_environment_name"), Some("e2e"), "{info:?}");
    assert_eq!(info.label("host_name"), Some(NODE), "the node's name reaches target_info: {info:?}");
    assert_eq!(info.value(), 1.0);
}

/// Everything the pull and remote-write tests send, and checks of what arrived.
async fn run_sources(setup_for: impl FnOnce(Setup) -> Setup) -> (Agent, Setup, ScrapeTarget, String) {
    let exposition = client_library_exposition();
    let target = ScrapeTarget::start(Exposition::openmetrics(exposition.clone()).gzipped()).await;
    let setup = setup_for(Setup::new().otlp().host_metrics("1s").target("client", &target.url(), &[("team", "video")]));
    let agent = Agent::start(&setup.yaml()).await;
    send_otlp(&setup).await;
    (agent, setup, target, exposition)
}

// ---------------------------------------------------------------------------------------
// Prometheus scrapes the pull endpoint; Prometheus receives remote writes
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_the_pull_endpoint_sees_scraped_host_and_otlp_metrics() {
    let (_agent, setup, target, exposition) = run_sources(|s| s.pull()).await;
    let scrape = format!(
        "  - job_name: periscope\n    honor_labels: true\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
        setup.pull.expect("pull is on")
    );
    let prometheus = Prometheus::start(&scrape).await;
    wait_value(&prometheus, r#"up{job="periscope"}"#, 1.0).await;

    // The agent negotiated OpenMetrics and compression with the target.
    let headers = target.last_headers().expect("the target was scraped");
    let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(accept.starts_with("application/openmetrics-text"), "Accept: {accept}");
    let encoding = headers.get("accept-encoding").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(encoding.contains("gzip"), "Accept-Encoding: {encoding}");

    check_client_library_target(&prometheus, &target, &exposition).await;
    check_host_metrics(&prometheus).await;
    check_otlp(&prometheus).await;

    // The target's exemplars reach Prometheus through the pull endpoint (OpenMetrics).
    for (promql, value) in
        [(r#"jobs_processed_total{job="client"}"#, 3.0), (r#"payload_bytes_bucket{job="client"}"#, 512.0)]
    {
        let started = Instant::now();
        loop {
            let found = prometheus.exemplars(promql).await;
            let matches = found
                .iter()
                .flat_map(|s| &s.exemplars)
                .any(|(labels, v)| labels.get("trace_id").map(String::as_str) == Some(TRACE_ID) && *v == value);
            if matches {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no exemplar trace_id={TRACE_ID} value {value} for {promql}: {found:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_write_into_prometheus_delivers_scraped_host_and_otlp_metrics() {
    let prometheus = Prometheus::start("").await;
    let (agent, _setup, target, exposition) = run_sources(|s| s.remote_write(&prometheus.write_url())).await;

    check_client_library_target(&prometheus, &target, &exposition).await;
    check_host_metrics(&prometheus).await;
    check_otlp(&prometheus).await;

    let metrics = agent.metrics().await;
    assert!(
        metrics.metric_value("periscope_sent_items_total", &[("component", "prometheus_remote_write")]) > 0.0,
        "{}",
        metrics.text()
    );
    assert_eq!(
        metrics.metric_value("periscope_dropped_items_total", &[("component", "prometheus_remote_write")]),
        0.0,
        "{}",
        metrics.text()
    );
}

/// The classic buckets of an exponential histogram of [`EXPONENTIAL_VALUES`] must each count
/// the values at or below their bound.
fn check_exponential_buckets(buckets: &[(f64, f64)]) -> Result<(), String> {
    if buckets.len() <= EXPONENTIAL_VALUES.len() {
        return Err(format!("too few buckets: {buckets:?}"));
    }
    for (le, count) in buckets {
        let expected = EXPONENTIAL_VALUES.iter().filter(|v| *v <= le).count() as f64;
        if *count != expected {
            return Err(format!("bucket le={le} counts {count}, not {expected}: {buckets:?}"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_exponential_histograms_accumulate_on_both_exporters() {
    let prometheus = Prometheus::start("").await;
    let setup = Setup::new().otlp().pull().remote_write(&prometheus.write_url());
    let agent = Agent::start(&setup.yaml()).await;
    let provider = meter_provider(&setup.otlp_endpoint(), Temporality::Delta);
    let wait = provider.meter("checkout").f64_histogram("queue.wait").with_unit("ms").build();
    // One value per export: each delta covers its own range of buckets.
    for v in EXPONENTIAL_VALUES {
        wait.record(v, &[]);
        flush(&provider).await;
    }
    shutdown(provider).await;
    let sum: f64 = EXPONENTIAL_VALUES.iter().sum();
    let count = EXPONENTIAL_VALUES.len() as f64;

    // The pull endpoint, once the store took all three exports.
    agent.wait_for_metric("periscope_sent_items_total", &[("component", "prometheus")], |v| v >= count).await;
    let job = [("job", "shop/checkout")];
    let metrics =
        wait_pull(&setup, "the histogram", |m| m.lookup("queue_wait_milliseconds_count", &job).is_some()).await;
    assert_eq!(metrics.lookup("queue_wait_milliseconds_count", &job), Some(count), "{}", metrics.text());
    assert_eq!(metrics.lookup("queue_wait_milliseconds_sum", &job), Some(sum), "{}", metrics.text());
    let mut pulled: Vec<(f64, f64)> = metrics
        .series("queue_wait_milliseconds_bucket", &job)
        .map(|s| {
            let le = &s.labels["le"];
            (if le == "+Inf" { f64::INFINITY } else { le.parse().expect("a numeric le") }, s.value)
        })
        .collect();
    pulled.sort_by(|a, b| a.0.total_cmp(&b.0));
    if let Err(e) = check_exponential_buckets(&pulled) {
        panic!("pull endpoint: {e}");
    }

    // Prometheus, once the last export's total arrived. (Not a sample per export: two
    // exports a few hundred microseconds apart carry the same millisecond, and Prometheus
    // keeps one sample per series and timestamp.)
    prometheus
        .wait_for(r#"queue_wait_milliseconds_count{job="shop/checkout"}"#, |r| r.len() == 1 && r[0].value() == count)
        .await;
    let written = prometheus.wait_for_one(r#"queue_wait_milliseconds_sum{job="shop/checkout"}"#).await;
    assert_eq!(written.value(), sum, "remote write");
    let written =
        prometheus.wait_for(r#"queue_wait_milliseconds_bucket{job="shop/checkout"}"#, |r| !r.is_empty()).await;
    if let Err(e) = check_exponential_buckets(&buckets(&written)) {
        panic!("remote write: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// Python's prometheus_client as a target
// ---------------------------------------------------------------------------------------

/// Makes `prometheus_client` importable, installing it with pip when it is not there yet.
fn ensure_prometheus_client() -> PathBuf {
    periscope_e2e::python::ensure("prometheus_client", "prometheus_client")
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_prometheus_client_target_is_scraped_with_every_metric_type() {
    let packages = tokio::task::spawn_blocking(ensure_prometheus_client).await.expect("pip task");
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("python_target.py");
    let _python = Process(
        Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .env("PYTHONPATH", &packages)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start the Python target"),
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    // What the library serves to a scraper that asks for OpenMetrics, as the agent does.
    let started = Instant::now();
    let exposition = loop {
        let asked = client().get(&url).header("accept", "application/openmetrics-text; version=1.0.0").send().await;
        if let Ok(response) = asked {
            if response.status() == 200 {
                break response.text().await.unwrap_or_default();
            }
        }
        assert!(started.elapsed() < DEADLINE, "the Python target never answered on {url}");
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    assert!(exposition.ends_with("# EOF\n"), "the Python target did not serve OpenMetrics:\n{exposition}");

    let setup = Setup::new().pull().target("python", &url, &[]);
    let _agent = Agent::start(&setup.yaml()).await;
    let instance = format!("127.0.0.1:{port}");
    let target = [("job", "python"), ("instance", instance.as_str())];
    let metrics = wait_pull(&setup, "the Python target's samples", |m| m.lookup("up", &target) == Some(1.0)).await;

    let find = |name: &str, extra: &[(&str, &str)]| -> f64 {
        let mut all = target.to_vec();
        all.extend_from_slice(extra);
        let found: Vec<_> = metrics.series(name, &all).collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{extra:?} should be one series; the pull endpoint served:\n{}",
            metrics.text()
        );
        found[0].value
    };
    let requests: Vec<_> = metrics.series("py_requests_total", &target).collect();
    assert_eq!(requests.len(), 2, "{}", metrics.text());
    assert_eq!(find("py_requests_total", &[("path", TRICKY)]), 3.0);
    assert_eq!(find("py_requests_total", &[("path", "/plain")]), 1.5);
    assert_eq!(find("py_temperature_celsius", &[]), -12.25);

    let mut latency: Vec<(f64, f64)> = metrics
        .series("py_latency_seconds_bucket", &target)
        .map(|s| {
            let le = &s.labels["le"];
            (if le == "+Inf" { f64::INFINITY } else { le.parse().expect("a numeric le") }, s.value)
        })
        .collect();
    latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(latency, vec![(0.1, 1.0), (0.5, 2.0), (1.0, 3.0), (f64::INFINITY, 4.0)]);
    assert_eq!(find("py_latency_seconds_count", &[]), 4.0);
    assert!(close(find("py_latency_seconds_sum", &[]), 0.05 + 0.3 + 0.7 + 2.5));

    assert_eq!(find("py_payload_bytes_count", &[]), 2.0);
    assert_eq!(find("py_payload_bytes_sum", &[]), 350.0);
    assert_eq!(find("py_build_info", &[("version", "1.2.3"), ("commit", "abc")]), 1.0);
    assert_eq!(find("py_state", &[("py_state", "running")]), 1.0);
    assert_eq!(find("py_state", &[("py_state", "stopped")]), 0.0);
    assert_eq!(find("scrape_samples_scraped", &[]), sample_lines(&exposition) as f64);
}

// ---------------------------------------------------------------------------------------
// Host metrics against node_exporter
// ---------------------------------------------------------------------------------------

/// node_exporter with the collectors the agent mirrors, and upstream node_exporter's default
/// exclusions (Debian's build leaves out `lo`, `/run`, `/mnt` and `/media` by default; the
/// agent follows upstream).
const NODE_EXPORTER_FLAGS: &[&str] = &[
    "--collector.disable-defaults",
    "--collector.cpu",
    "--collector.meminfo",
    "--collector.loadavg",
    "--collector.filesystem",
    "--collector.diskstats",
    "--collector.netdev",
    "--collector.stat",
    "--collector.netdev.device-exclude=^$",
    "--collector.filesystem.mount-points-exclude=^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)",
    "--collector.filesystem.fs-types-exclude=^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|erofs|sysfs|tracefs)$",
    "--collector.diskstats.device-exclude=^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\\d+n\\d+p)\\d+$",
];

type LabelSet = BTreeMap<String, String>;

/// Every `node_*` family's series: labels (without `job` and `instance`) to value.
fn node_families(metrics: &Metrics) -> BTreeMap<String, BTreeMap<LabelSet, f64>> {
    let mut out: BTreeMap<String, BTreeMap<LabelSet, f64>> = BTreeMap::new();
    for line in metrics.text().lines().filter(|l| l.starts_with("node_")) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        for sample in metrics.series(name, &[]) {
            let mut labels = sample.labels.clone();
            labels.remove("job");
            labels.remove("instance");
            out.entry(name.to_owned()).or_default().insert(labels, sample.value);
        }
    }
    out
}

fn proc_context_switches() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    stat.lines().find_map(|l| l.strip_prefix("ctxt ")).and_then(|v| v.trim().parse().ok()).expect("ctxt in /proc/stat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_metrics_have_node_exporters_names_labels_and_values() {
    let node_exporter = NodeExporter::start(NODE_EXPORTER_FLAGS).await;
    let setup = Setup::new().host_metrics("1s").pull();
    let _agent = Agent::start(&setup.yaml()).await;

    // Readings ordered in time: node_exporter, then an agent collection that began after it
    // (its context switch count passed one read after node_exporter answered), then
    // node_exporter again after the agent's collection was complete.
    let before = node_families(&node_exporter.metrics().await);
    let switches = proc_context_switches();
    let agent = wait_pull(&setup, "a host collection made after node_exporter's", |m| {
        m.lookup("node_context_switches_total", &[("job", "node")]).is_some_and(|v| v > switches)
    })
    .await;
    let after = node_families(&node_exporter.metrics().await);
    let agent = node_families(&agent);
    let ours = |name: &str| agent.get(name).map_or(0, BTreeMap::len);

    let mut problems = Vec::new();
    for family in [
        "node_cpu_seconds_total",
        "node_memory_MemTotal_bytes",
        "node_memory_MemAvailable_bytes",
        "node_load1",
        "node_load5",
        "node_load15",
        "node_filesystem_size_bytes",
        "node_filesystem_avail_bytes",
        "node_disk_read_bytes_total",
        "node_disk_written_bytes_total",
        "node_network_receive_bytes_total",
        "node_network_transmit_bytes_total",
        "node_boot_time_seconds",
        "node_context_switches_total",
    ] {
        if ours(family) == 0 {
            problems.push(format!("{family}: the agent has no series"));
        }
    }
    // Every diskstats family node_exporter has, the agent has too (the kernel decides which
    // exist); the udev-based ones (`_info`, `ata_`) are not read from /proc/diskstats.
    let from_udev = |n: &str| n.ends_with("_info") || n.starts_with("node_disk_ata_");
    for name in after.keys().filter(|n| n.starts_with("node_disk_") && !from_udev(n)) {
        if ours(name) == 0 {
            problems.push(format!("{name}: node_exporter has it, the agent does not"));
        }
    }
    for (name, series) in &agent {
        let Some(theirs) = after.get(name) else {
            problems.push(format!("{name}: node_exporter has no such family"));
            continue;
        };
        // A device or mount that came or went between the two node_exporter readings may be
        // in either; anything else must be in both or in neither.
        let empty = BTreeMap::new();
        let earlier = before.get(name).unwrap_or(&empty);
        let only_ours: Vec<&LabelSet> =
            series.keys().filter(|l| !earlier.contains_key(*l) && !theirs.contains_key(*l)).collect();
        let only_theirs: Vec<&LabelSet> =
            theirs.keys().filter(|l| earlier.contains_key(*l) && !series.contains_key(*l)).collect();
        if !only_ours.is_empty() || !only_theirs.is_empty() {
            problems.push(format!(
                "{name}: label sets differ; only the agent's: {only_ours:?}; only node_exporter's: {only_theirs:?}"
            ));
            continue;
        }
        for (labels, &value) in series {
            let (Some(&low), Some(&high)) = (before.get(name).and_then(|s| s.get(labels)), theirs.get(labels)) else {
                continue;
            };
            let cpu_idle = name == "node_cpu_seconds_total"
                && matches!(labels.get("mode").map(String::as_str), Some("idle" | "iowait"));
            let ok = if name.ends_with("_total") {
                // Counters read between two node_exporter readings. The kernel's idle and iowait
                // times may step back a little (NO_HZ accounting).
                let slack = if cpu_idle { 1.0 } else { 0.0 };
                low - slack <= value && value <= high + slack
            } else if name.starts_with("node_load") {
                (value - low).abs() <= 1.0
            } else if matches!(
                name.as_str(),
                "node_memory_MemTotal_bytes"
                    | "node_memory_SwapTotal_bytes"
                    | "node_boot_time_seconds"
                    | "node_filesystem_size_bytes"
                    | "node_filesystem_files"
                    | "node_filesystem_readonly"
            ) {
                value == low && value == high
            } else {
                true
            };
            if !ok {
                problems.push(format!("{name}{labels:?}: agent {value}, node_exporter {low} before and {high} after"));
            }
        }
    }
    assert!(problems.is_empty(), "host metrics differ from node_exporter's:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Staleness
// ---------------------------------------------------------------------------------------

/// A gauge, a histogram and a summary, each with the label sets `series` names.
fn stale_exposition(gauge: &[&str], histogram: &[&str], summary: &[&str]) -> String {
    let mut text = String::from("# TYPE stale_demo gauge\n");
    for s in gauge {
        let _ = writeln!(text, "stale_demo{{series=\"{s}\"}} 1");
    }
    text.push_str("# TYPE stale_hist histogram\n");
    for s in histogram {
        let _ = writeln!(text, "stale_hist_bucket{{series=\"{s}\",le=\"0.5\"}} 1");
        let _ = writeln!(text, "stale_hist_bucket{{series=\"{s}\",le=\"+Inf\"}} 2");
        let _ = writeln!(text, "stale_hist_sum{{series=\"{s}\"}} 1.5");
        let _ = writeln!(text, "stale_hist_count{{series=\"{s}\"}} 2");
    }
    text.push_str("# TYPE stale_summary summary\n");
    for s in summary {
        let _ = writeln!(text, "stale_summary{{series=\"{s}\",quantile=\"0.5\"}} 3");
        let _ = writeln!(text, "stale_summary_sum{{series=\"{s}\"}} 6");
        let _ = writeln!(text, "stale_summary_count{{series=\"{s}\"}} 2");
    }
    text
}

/// The `(name, series)` pairs of a result or an exposition.
type Present = BTreeSet<(String, String)>;

fn present_in_prometheus(result: &[Series]) -> Present {
    result
        .iter()
        .map(|s| {
            let name = s.label("__name__").unwrap_or_default();
            let name = match s.label("le").or(s.label("quantile")) {
                Some(bound) => format!("{name}@{bound}"),
                None => name.to_owned(),
            };
            (name, s.label("series").unwrap_or_default().to_owned())
        })
        .collect()
}

fn present_in_pull(metrics: &Metrics) -> Present {
    let mut out = Present::new();
    for line in metrics.text().lines().filter(|l| l.starts_with("stale_")) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        for sample in metrics.series(name, &[("job", "stale")]) {
            let name = match sample.labels.get("le").or(sample.labels.get("quantile")) {
                Some(bound) => format!("{name}@{bound}"),
                None => name.to_owned(),
            };
            out.insert((name, sample.labels.get("series").cloned().unwrap_or_default()));
        }
    }
    out
}

/// What [`stale_exposition`] yields, as `(name@bound, series)` pairs.
fn expected_present(gauge: &[&str], histogram: &[&str], summary: &[&str]) -> Present {
    let mut out = Present::new();
    for s in gauge {
        out.insert(("stale_demo".to_owned(), (*s).to_owned()));
    }
    for s in histogram {
        for name in ["stale_hist_bucket@0.5", "stale_hist_bucket@+Inf", "stale_hist_sum", "stale_hist_count"] {
            out.insert((name.to_owned(), (*s).to_owned()));
        }
    }
    for s in summary {
        for name in ["stale_summary@0.5", "stale_summary_sum", "stale_summary_count"] {
            out.insert((name.to_owned(), (*s).to_owned()));
        }
    }
    out
}

type Families<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str]);

/// Walks a target through `steps` (what it serves), then makes it fail; after each step the
/// pull endpoint and Prometheus (fed by remote write) must hold exactly what the target serves.
/// Without staleness markers Prometheus would keep returning a vanished series for five
/// minutes.
async fn check_staleness(steps: &[(&str, Families<'_>)]) {
    let prometheus = Prometheus::start("").await;
    let (gauge, histogram, summary) = steps[0].1;
    let target = ScrapeTarget::start(Exposition::text(stale_exposition(gauge, histogram, summary))).await;
    let setup = Setup::new()
        .scrape("500ms", "400ms")
        .target("stale", &target.url(), &[])
        .pull()
        .remote_write(&prometheus.write_url());
    let _agent = Agent::start(&setup.yaml()).await;
    let query = r#"{job="stale",__name__=~"stale_.+"}"#;
    let last = steps[0].1;
    for &(what, (gauge, histogram, summary)) in steps {
        let expected = expected_present(gauge, histogram, summary);
        target.set(Exposition::text(stale_exposition(gauge, histogram, summary)));
        wait_pull(&setup, what, |m| present_in_pull(m) == expected).await;
        let started = Instant::now();
        loop {
            let got = present_in_prometheus(&prometheus.query(query).await);
            if got == expected {
                break;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "after {what}, Prometheus still returns {:?} and lacks {:?}",
                got.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&got).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The target fails: everything of it goes, up says 0.
    let (gauge, histogram, summary) = last;
    target.set(Exposition::text(stale_exposition(gauge, histogram, summary)));
    let expected = expected_present(gauge, histogram, summary);
    wait_pull(&setup, "every series back", |m| present_in_pull(m) == expected).await;
    prometheus.wait_for(query, |r| present_in_prometheus(r) == expected).await;
    target.set(Exposition::status(500));
    wait_pull(&setup, "every series of the failing target gone", |m| {
        present_in_pull(m).is_empty() && m.lookup("up", &[("job", "stale")]) == Some(0.0)
    })
    .await;
    let left = prometheus.wait_for(query, |r| r.is_empty()).await;
    assert!(left.is_empty());
    wait_value(&prometheus, r#"up{job="stale"}"#, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_series_leave_the_pull_endpoint_and_go_stale_in_prometheus() {
    check_staleness(&[
        ("both gauge series", (&["a", "b"], &[], &[])),
        ("gauge series b gone", (&["a"], &[], &[])),
        ("every gauge series gone", (&[], &[], &[])),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_histogram_and_summary_series_go_stale_in_prometheus() {
    check_staleness(&[
        ("every series", (&["a", "b"], &["a", "b"], &["a", "b"])),
        ("series b gone from every family", (&["a"], &["a"], &["a"])),
        ("the histogram and summary families gone", (&["a"], &[], &[])),
    ])
    .await;
}

// ---------------------------------------------------------------------------------------
// Outages and restarts
// ---------------------------------------------------------------------------------------

/// Waits until nothing answers on the agent's admin address any more (the process is gone).
async fn wait_gone(admin: std::net::SocketAddr) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(admin).await.is_ok() {
        assert!(started.elapsed() < DEADLINE, "the killed agent still answers on {admin}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_write_loses_nothing_across_prometheus_outages_and_agent_restarts() {
    // A counter that counts its own scrapes: the n-th scrape reads n.
    let target =
        ScrapeTarget::start_with(|n| Exposition::text(format!("# TYPE ticks counter\nticks_total {n}\n"))).await;
    let mut prometheus = Prometheus::start("").await;
    let data = tempfile::tempdir().expect("a data directory");
    let write_url = prometheus.write_url();
    let setup = || {
        Setup::new()
            .scrape("500ms", "400ms")
            .target("ticks", &target.url(), &[])
            .remote_write(&write_url)
            .data_dir(data.path())
    };
    let ticks = r#"ticks_total{job="ticks"}"#;
    let mut agent = Agent::start(&setup().yaml()).await;
    prometheus.wait_for(ticks, |r| r.len() == 1 && r[0].value() >= 3.0).await;

    // Prometheus goes away; the agent keeps scraping into its log.
    prometheus.stop();
    target.wait_for_scrapes(target.scrapes() + 4).await;
    // The agent stops gracefully with undelivered samples...
    let status = agent.stop().await;
    assert!(status.success(), "the agent exited with {status} on SIGTERM:\n{}", agent.stderr());
    drop(agent);
    // ...starts again on the same data directory, scrapes more, and is killed.
    let agent = Agent::start(&setup().yaml()).await;
    target.wait_for_scrapes(target.scrapes() + 4).await;
    let admin = agent.admin();
    drop(agent);
    wait_gone(admin).await;

    // Prometheus and the agent come back: everything arrives.
    prometheus.start_again().await;
    let agent = Agent::start(&setup().yaml()).await;
    let served = target.scrapes();
    prometheus.wait_for(ticks, |r| r.len() == 1 && r[0].value() >= served as f64).await;

    let range = format!("{ticks}[15m]");
    let series = prometheus.query(&range).await;
    assert_eq!(series.len(), 1, "{series:?}");
    let values: Vec<f64> = series[0].samples.iter().map(|s| s.1).collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "samples out of order or repeated: {values:?}");
    let received: BTreeSet<u64> = values.iter().map(|v| *v as u64).collect();
    let last = *received.last().expect("samples");
    let missing: Vec<u64> = (1..=last).filter(|n| !received.contains(n)).collect();
    // A scrape in flight when the agent stops or dies is lost with it (at most one per stop);
    // every sample the agent took in is delivered.
    assert!(missing.len() <= 2, "remote write lost samples {missing:?} of 1..={last}:\n{}", agent.stderr());
    let metrics = agent.metrics().await;
    assert_eq!(
        metrics.metric_value("periscope_dropped_items_total", &[("component", "prometheus_remote_write")]),
        0.0,
        "{}",
        metrics.text()
    );
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_slow_and_failing_targets_are_counted_by_reason_and_huge_labels_pass() {
    let bad_line = ScrapeTarget::start(Exposition::text("# TYPE ok gauge\nok 1\nbroken{a=\"b\" 1\n")).await;
    let duplicate = ScrapeTarget::start(Exposition::text("dup{a=\"1\"} 1\ndup{a=\"1\"} 2\n")).await;
    let wrong_suffix = ScrapeTarget::start(Exposition::text("# TYPE temp gauge\ntemp_total 1\n")).await;
    let no_eof = ScrapeTarget::start(Exposition::openmetrics("# TYPE temp gauge\ntemp 1\n")).await;
    let slow = ScrapeTarget::start(Exposition::text("slow 1\n").delayed(Duration::from_secs(5))).await;
    let failing = ScrapeTarget::start(Exposition::status(500)).await;
    let blob = "x".repeat(64 * 1024);
    let huge = ScrapeTarget::start(Exposition::text(format!("big{{blob=\"{blob}\"}} 1\nfine 2\n"))).await;
    let good = ScrapeTarget::start(Exposition::text("alive 1\n")).await;
    let closed = format!("127.0.0.1:{}", free_port());
    let closed_url = format!("http://{closed}/metrics");
    let setup = Setup::new()
        .scrape("500ms", "300ms")
        .target("bad-line", &bad_line.url(), &[])
        .target("duplicate", &duplicate.url(), &[])
        .target("wrong-suffix", &wrong_suffix.url(), &[])
        .target("no-eof", &no_eof.url(), &[])
        .target("slow", &slow.url(), &[])
        .target("failing", &failing.url(), &[])
        .target("huge", &huge.url(), &[])
        .target("good", &good.url(), &[])
        .target("closed", &closed_url, &[])
        .pull();
    let agent = Agent::start(&setup.yaml()).await;

    let of = |target: &ScrapeTarget| (target.url(), target.instance());
    let cases = [
        (of(&bad_line), "bad-line", "parse", Some("line 3: expected , or } after a label")),
        (of(&duplicate), "duplicate", "parse", Some("line 2: duplicate series dup{a=\"1\"}")),
        (
            of(&wrong_suffix),
            "wrong-suffix",
            "parse",
            Some("line 2: sample temp_total does not fit the Gauge family temp"),
        ),
        (of(&no_eof), "no-eof", "parse", Some("missing # EOF")),
        (of(&slow), "slow", "timeout", None),
        (of(&failing), "failing", "http_status", Some("HTTP 500")),
        ((closed_url.clone(), closed.clone()), "closed", "connect", None),
    ];
    for ((_, instance), job, reason, _) in &cases {
        agent
            .wait_for_metric(
                "periscope_scrape_failures_total",
                &[("job", job), ("instance", instance), ("reason", reason)],
                |v| v >= 1.0,
            )
            .await;
    }
    let metrics = wait_pull(&setup, "up for every target", |m| {
        ["bad-line", "duplicate", "wrong-suffix", "no-eof", "slow", "failing", "closed", "huge", "good"]
            .iter()
            .all(|job| m.lookup("up", &[("job", job)]).is_some())
            && m.lookup("big", &[("job", "huge")]).is_some()
    })
    .await;
    for (_, job, _, _) in &cases {
        assert_eq!(metrics.lookup("up", &[("job", job)]), Some(0.0), "up of {job}:\n{}", metrics.text());
    }
    assert!(metrics.lookup("ok", &[]).is_none(), "a failed scrape exposes none of its samples");
    assert_eq!(metrics.lookup("up", &[("job", "good")]), Some(1.0));
    assert_eq!(metrics.lookup("alive", &[("job", "good")]), Some(1.0));
    assert_eq!(metrics.lookup("up", &[("job", "huge")]), Some(1.0));
    assert_eq!(
        metrics.lookup("big", &[("job", "huge"), ("blob", &blob)]),
        Some(1.0),
        "the 64 KiB label value arrives whole"
    );
    assert_eq!(metrics.lookup("fine", &[("job", "huge")]), Some(2.0));

    // The log says which target failed and why, with the line for a broken exposition.
    let stderr = agent.stderr();
    for ((url, _), job, _, words) in &cases {
        let Some(words) = words else { continue };
        let said = stderr.lines().any(|l| l.contains(url.as_str()) && l.contains(words));
        assert!(said, "no log line names {url} and says {words:?} for {job}:\n{stderr}");
    }
    let (status, _) = agent.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_beyond_each_sources_limit_are_dropped_counted_and_refused_to_otlp_senders() {
    let exposition = "# TYPE q gauge\nq{n=\"1\"} 1\nq{n=\"2\"} 2\nq{n=\"3\"} 3\nq{n=\"4\"} 4\nq{n=\"5\"} 5\n";
    let target = ScrapeTarget::start(Exposition::text(exposition)).await;
    let setup = Setup::new().otlp().pull().target("capped", &target.url(), &[]).series_limits(3, 2);
    let agent = Agent::start(&setup.yaml()).await;

    // The target's first three series are kept; the scrape itself is fine.
    let metrics = wait_pull(&setup, "the capped target", |m| m.lookup("up", &[("job", "capped")]) == Some(1.0)).await;
    let mut kept: Vec<f64> = metrics.series("q", &[("job", "capped")]).map(|s| s.value).collect();
    kept.sort_by(f64::total_cmp);
    assert_eq!(kept, [1.0, 2.0, 3.0], "{}", metrics.text());
    assert_eq!(metrics.lookup("scrape_samples_scraped", &[("job", "capped")]), Some(5.0));
    agent
        .wait_for_metric(
            "periscope_dropped_items_total",
            &[("component", "sources.prometheus"), ("reason", "series_limit")],
            |v| v >= 2.0,
        )
        .await;

    // OTLP: three series where two fit. The sender hears of it through partial success.
    let url = format!("{}/v1/metrics", setup.otlp_endpoint());
    let request = periscope_e2e::otlp::metrics_request("capped-service", 3);
    for round in 1..=2 {
        let answer = periscope_e2e::otlp::post_protobuf(&url, &request).await;
        assert_eq!(answer.status, 200, "{}", answer.body_text());
        let response = ExportMetricsServiceResponse::decode(&answer.body[..]).expect("an ExportMetricsServiceResponse");
        let partial = response.partial_success.expect("partial success");
        assert_eq!(partial.rejected_data_points, 1, "round {round}");
        assert!(partial.error_message.contains("sources.otlp.max_metric_series"), "{}", partial.error_message);
    }
    let metrics = wait_pull(&setup, "the OTLP gauges", |m| m.lookup("queue_depth_1", &[]).is_some()).await;
    assert_eq!(metrics.lookup("queue_depth_0", &[]), Some(0.0));
    assert_eq!(metrics.lookup("queue_depth_1", &[]), Some(1.0));
    assert_eq!(metrics.lookup("queue_depth_2", &[]), None, "{}", metrics.text());
    let own = agent.metrics().await;
    assert_eq!(
        own.metric_value("periscope_dropped_items_total", &[("component", "otlp_http"), ("reason", "series_limit")]),
        2.0,
        "{}",
        own.text()
    );
}

mod prompb {
    //! Remote write 1.0's messages, from the field numbers of Prometheus' `prompb`.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WriteRequest {
        #[prost(message, repeated, tag = "1")]
        pub timeseries: Vec<TimeSeries>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TimeSeries {
        #[prost(message, repeated, tag = "1")]
        pub labels: Vec<Label>,
        #[prost(message, repeated, tag = "2")]
        pub samples: Vec<Sample>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(double, tag = "1")]
        pub value: f64,
        #[prost(int64, tag = "2")]
        pub timestamp: i64,
    }
}

/// One answer of the remote-write stand-in: a status and an optional `Retry-After`.
type Answer = (u16, Option<&'static str>);

/// A remote-write endpoint answering from a script (then with `otherwise`), recording every
/// request: its body, when it came and how many samples it held.
struct WriteEndpoint {
    script: Mutex<VecDeque<Answer>>,
    otherwise: Answer,
    requests: Mutex<Vec<(Instant, Bytes, u16)>>,
    samples_accepted: AtomicU64,
    samples_refused: AtomicU64,
}

impl WriteEndpoint {
    async fn start(script: &[Answer], otherwise: Answer) -> (Arc<WriteEndpoint>, String, tokio::task::JoinHandle<()>) {
        let endpoint = Arc::new(WriteEndpoint {
            script: Mutex::new(script.iter().copied().collect()),
            otherwise,
            requests: Mutex::new(Vec::new()),
            samples_accepted: AtomicU64::new(0),
            samples_refused: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
        let url = format!("http://{}/api/v1/write", listener.local_addr().expect("an address"));
        let app = Router::new().route("/api/v1/write", post(write)).with_state(endpoint.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (endpoint, url, server)
    }

    fn requests(&self) -> Vec<(Instant, Bytes, u16)> {
        self.requests.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn write(State(endpoint): State<Arc<WriteEndpoint>>, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let raw = snap::raw::Decoder::new().decompress_vec(&body).unwrap_or_default();
    let samples: usize =
        prompb::WriteRequest::decode(raw.as_slice()).map_or(0, |r| r.timeseries.iter().map(|t| t.samples.len()).sum());
    let (status, retry_after) =
        endpoint.script.lock().unwrap_or_else(|p| p.into_inner()).pop_front().unwrap_or(endpoint.otherwise);
    endpoint.requests.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), body, status));
    let counter = if status < 300 { &endpoint.samples_accepted } else { &endpoint.samples_refused };
    counter.fetch_add(samples as u64, Ordering::SeqCst);
    let status = http::StatusCode::from_u16(status).expect("a valid status");
    let message = if status == http::StatusCode::BAD_REQUEST { "out of bounds: sample too old" } else { "" };
    match retry_after {
        Some(after) => (status, [(http::header::RETRY_AFTER, after)], message).into_response(),
        None => (status, message).into_response(),
    }
}

const RW: (&str, &str) = ("component", "prometheus_remote_write");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_write_refused_with_400_is_dropped_and_counted_not_retried() {
    let (endpoint, url, server) = WriteEndpoint::start(&[], (400, None)).await;
    let target = ScrapeTarget::start(Exposition::text("refused 1\n")).await;
    let setup = Setup::new().scrape("500ms", "400ms").target("refused", &target.url(), &[]).remote_write(&url);
    let agent = Agent::start(&setup.yaml()).await;

    // Every sample the endpoint was sent is counted as dropped, once.
    let dropped = [RW, ("reason", "permanent")];
    let started = Instant::now();
    loop {
        let metrics = agent.metrics().await;
        let counted = metrics.metric_value("periscope_dropped_items_total", &dropped);
        let refused = endpoint.samples_refused.load(Ordering::SeqCst) as f64;
        let requests = endpoint.requests().len();
        if requests >= 3 && counted == refused {
            assert_eq!(metrics.metric_value("periscope_retried_items_total", &[RW]), 0.0, "{}", metrics.text());
            assert_eq!(metrics.metric_value("periscope_sent_items_total", &[RW]), 0.0, "{}", metrics.text());
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "dropped samples {counted} never matched the {refused} samples in {requests} refused requests:\n{}",
            metrics.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = endpoint.requests();
    let distinct: HashSet<&Bytes> = requests.iter().map(|r| &r.1).collect();
    assert_eq!(distinct.len(), requests.len(), "a refused batch was sent again");
    let stderr = agent.stderr();
    assert!(stderr.contains("out of bounds: sample too old"), "the log does not quote the endpoint:\n{stderr}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_write_retries_5xx_and_429_honouring_retry_after_then_delivers() {
    let (endpoint, url, server) = WriteEndpoint::start(&[(503, None), (429, Some("2"))], (204, None)).await;
    let target = ScrapeTarget::start(Exposition::text("retried 1\n")).await;
    let setup =
        Setup::new().scrape("500ms", "400ms").target("retried", &target.url(), &[]).remote_write(&url).one_shard();
    let agent = Agent::start(&setup.yaml()).await;

    // Everything the endpoint accepted is counted as sent, nothing dropped.
    let started = Instant::now();
    let metrics = loop {
        let metrics = agent.metrics().await;
        let sent = metrics.metric_value("periscope_sent_items_total", &[RW]);
        let accepted = endpoint.samples_accepted.load(Ordering::SeqCst) as f64;
        if endpoint.requests().len() >= 4 && sent == accepted {
            break metrics;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "sent {sent} never matched the {accepted} samples accepted:\n{}",
            metrics.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[RW]), 0.0, "{}", metrics.text());
    let requests = endpoint.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.2).collect();
    assert_eq!(&statuses[..3], &[503, 429, 204], "{statuses:?}");
    // The refused batch was sent again as it was, and after the Retry-After the 429 asked for
    // (the configured backoff alone would be at most 500ms).
    assert_eq!(requests[0].1, requests[1].1, "the retry after 503 carried another batch");
    assert_eq!(requests[1].1, requests[2].1, "the retry after 429 carried another batch");
    let waited = requests[2].0.duration_since(requests[1].0);
    assert!(waited >= Duration::from_millis(1900), "the agent retried {waited:?} after `429 Retry-After: 2`");
    let retried = metrics.metric_value("periscope_retried_items_total", &[RW]);
    assert!(retried > 0.0, "{}", metrics.text());
    server.abort();
}

// ---------------------------------------------------------------------------------------
// Pods of this node, discovered through the Kubernetes API (a stand-in: no cluster runs here)
// ---------------------------------------------------------------------------------------

fn pod_exposition(value: u32) -> Exposition {
    Exposition::text(format!("# TYPE jobs_done_total counter\njobs_done_total {value}\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotated_pods_of_this_node_are_discovered_scraped_and_retired() {
    use periscope_e2e::kubernetes::{pod, KubernetesApi};
    let api = KubernetesApi::start().await;
    let api_target = ScrapeTarget::start(pod_exposition(1)).await;
    let web_target = ScrapeTarget::start(pod_exposition(2)).await;
    let elsewhere = ScrapeTarget::start(pod_exposition(3)).await;
    let port = |t: &ScrapeTarget| t.instance().rsplit(':').next().unwrap().to_owned();
    let (api_port, web_port, elsewhere_port) = (port(&api_target), port(&web_target), port(&elsewhere));
    let scrape = [("prometheus.io/scrape", "true")];
    api.set_pods(vec![
        // Port and path from annotations.
        (NODE, pod("shop", "api-7d4b9", "127.0.0.1", &[scrape[0], ("prometheus.io/port", &api_port), ("prometheus.io/path", "/metrics")], &[1])),
        // Port from the container's declared port.
        (NODE, pod("shop", "web-5f6c8", "127.0.0.1", &scrape, &[web_port.parse().unwrap()])),
        // Not annotated: not scraped.
        (NODE, pod("shop", "quiet-1", "127.0.0.1", &[("prometheus.io/port", &elsewhere_port)], &[])),
        // Another node's pod: the field selector leaves it out.
        ("other-node", pod("shop", "far-1", "127.0.0.1", &[scrape[0], ("prometheus.io/port", &elsewhere_port)], &[])),
    ]);
    let setup = Setup::new().scrape("300ms", "250ms").kubernetes_pods().pull();
    let env = api.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = Agent::start_with_env(&setup.yaml(), &env).await;

    let pod_labels = |pod: &str, target: &ScrapeTarget| {
        let instance = target.instance();
        let pairs = [("job", "kubernetes-pods"), ("namespace", "shop"), ("pod", pod), ("node", NODE), ("instance", instance.as_str())];
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<(String, String)>>()
    };
    let has = |m: &Metrics, pod: &str, target: &ScrapeTarget, value: f64| {
        let labels = pod_labels(pod, target);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        m.lookup("jobs_done_total", &labels) == Some(value)
    };
    let metrics = wait_pull(&setup, "both annotated pods of this node", |m| {
        has(m, "api-7d4b9", &api_target, 1.0) && has(m, "web-5f6c8", &web_target, 2.0)
    })
    .await;
    assert_eq!(metrics.series("jobs_done_total", &[]).count(), 2, "{}", metrics.text());
    assert_eq!(elsewhere.scrapes(), 0, "neither the unannotated pod nor the other node's pod is scraped");
    let (requests, unauthorized) = api.requests();
    assert!(requests >= 1 && unauthorized == 0, "{requests} requests, {unauthorized} without the service account's token");

    // The web pod ends: its series leave; the api pod's stay.
    api.set_pods(vec![(
        NODE,
        pod("shop", "api-7d4b9", "127.0.0.1", &[scrape[0], ("prometheus.io/port", &api_port)], &[]),
    )]);
    api_target.set(pod_exposition(5));
    wait_pull(&setup, "the ended pod's series gone", |m| {
        has(m, "api-7d4b9", &api_target, 5.0) && m.series("jobs_done_total", &[("pod", "web-5f6c8")]).count() == 0
            && m.lookup("up", &[("pod", "web-5f6c8")]).is_none()
    })
    .await;
    let scrapes = web_target.scrapes();
    api_target.wait_for_scrapes(api_target.scrapes() + 2).await;
    assert_eq!(web_target.scrapes(), scrapes, "an ended pod is not scraped any more");

    // The token is rotated to one the API server refuses: discovery fails, counted, and the
    // pods found before are still scraped.
    std::fs::write(api.service_account_dir().join("token"), "revoked\n").unwrap();
    agent
        .wait_for_metric("periscope_scrape_failures_total", &[("job", "kubernetes-pods"), ("reason", "discovery")], |v| v >= 1.0)
        .await;
    api_target.set(pod_exposition(6));
    wait_pull(&setup, "the known pod still scraped", |m| has(m, "api-7d4b9", &api_target, 6.0)).await;
    assert!(api.requests().1 >= 1);
}
