//! Execution paths end to end: services send spans with the OpenTelemetry Rust SDK (or raw
//! OTLP where a test must control how spans are split into requests), and the agent's
//! `/api/v1/paths` API, its Prometheus exporter and its self-metrics must show exactly the
//! trees, times, shares, variants, service graph and bounds that the known input implies.
//!
//! Every wait polls the API or metrics until the expected number of traces has been analysed.
//! The trace timeout is short (longer only where one trace's spans travel in several
//! requests that a busy machine may spread out), so analysis follows within seconds.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{
    span as proto_span, status as proto_status, ResourceSpans, ScopeSpans, Span as ProtoSpan, Status as ProtoStatus,
};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use periscope_e2e::otlp::{self, post_protobuf, trace_request};
use periscope_e2e::spans::{by_key, flatten, string_kv};
use periscope_e2e::{Agent, Collector, FlatSpan, Metrics, Script, TestConfig, DEADLINE, POLL_INTERVAL};
use serde_json::Value;

const NODE: &str = "test-node";
/// Short enough that a test's traces are analysed within a second of their last span.
const TRACE_TIMEOUT: &str = "300ms";

// ---------------------------------------------------------------------------------------
// Trace shapes: spans of known names, kinds, parents and times
// ---------------------------------------------------------------------------------------

/// One span of a trace shape. Times are in units from the trace's origin; each trace
/// chooses how long a unit is.
#[derive(Clone)]
struct Node {
    name: &'static str,
    parent: Option<usize>,
    kind: SpanKind,
    start: u32,
    end: u32,
    attributes: Vec<KeyValue>,
    error: bool,
}

/// An internal span under `parent` (an index into the shape), from `start` to `end`.
fn node(parent: Option<usize>, name: &'static str, start: u32, end: u32) -> Node {
    Node { name, parent, kind: SpanKind::Internal, start, end, attributes: Vec::new(), error: false }
}

impl Node {
    fn kind(mut self, kind: SpanKind) -> Node {
        self.kind = kind;
        self
    }

    /// `http.request.method` and `http.route`, as current HTTP instrumentation sets them.
    fn route(self, method: &'static str, route: &'static str) -> Node {
        self.attribute("http.request.method", method).attribute("http.route", route)
    }

    fn attribute(mut self, key: &'static str, value: &'static str) -> Node {
        self.attributes.push(KeyValue::new(key, value));
        self
    }
}

/// GET /feed, 0–100: auth 0–10, handler 10–90 with db 20–50 and cache 20–40 in parallel,
/// render 90–100.
fn feed_shape() -> Vec<Node> {
    vec![
        node(None, "GET", 0, 100).kind(SpanKind::Server).route("GET", "/feed"),
        node(Some(0), "auth", 0, 10),
        node(Some(0), "handler", 10, 90),
        node(Some(2), "db", 20, 50).kind(SpanKind::Client),
        node(Some(2), "cache", 20, 40).kind(SpanKind::Client),
        node(Some(0), "render", 90, 100),
    ]
}

/// A point in time: a fixed base plus `trace` seconds (each trace its own second) plus
/// `offset`.
fn at(trace: u32, offset: Duration) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(trace)) + offset
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).expect("after the epoch").as_nanos() as u64
}

/// Records one trace of `shape` with the SDK: spans started parents first with explicit
/// start times and parent contexts, ended children first with explicit end times.
fn record(tracer: &SdkTracer, shape: &[Node], trace: u32, unit: Duration) {
    let mut contexts: Vec<Context> = Vec::with_capacity(shape.len());
    for node in shape {
        let parent = node.parent.map_or_else(Context::new, |p| contexts[p].clone());
        let mut span = tracer
            .span_builder(node.name)
            .with_kind(node.kind.clone())
            .with_start_time(at(trace, unit * node.start))
            .with_attributes(node.attributes.clone())
            .start_with_context(tracer, &parent);
        if node.error {
            span.set_status(Status::error("failed"));
        }
        contexts.push(parent.with_span(span));
    }
    for (node, context) in shape.iter().zip(&contexts).rev() {
        context.span().end_with_timestamp(at(trace, unit * node.end));
    }
}

/// A trace id of raw requests, unique to `n`.
fn raw_trace_id(n: u32) -> Vec<u8> {
    let mut id = vec![0x5e; 12];
    id.extend(n.to_be_bytes());
    id
}

/// The span id of the `index`th span of a raw trace.
fn raw_span_id(index: usize) -> Vec<u8> {
    vec![0xab, 0xcd, 0, 0, 0, 0, 0, index as u8 + 1]
}

fn proto_kind(kind: &SpanKind) -> i32 {
    let kind = match kind {
        SpanKind::Internal => proto_span::SpanKind::Internal,
        SpanKind::Server => proto_span::SpanKind::Server,
        SpanKind::Client => proto_span::SpanKind::Client,
        SpanKind::Producer => proto_span::SpanKind::Producer,
        SpanKind::Consumer => proto_span::SpanKind::Consumer,
    };
    kind as i32
}

/// The spans of one trace of `shape` as raw OTLP, ids derived from `trace`.
fn raw_spans(shape: &[Node], trace: u32, unit: Duration) -> Vec<ProtoSpan> {
    shape
        .iter()
        .enumerate()
        .map(|(i, node)| ProtoSpan {
            trace_id: raw_trace_id(trace),
            span_id: raw_span_id(i),
            parent_span_id: node.parent.map(raw_span_id).unwrap_or_default(),
            name: node.name.to_owned(),
            kind: proto_kind(&node.kind),
            start_time_unix_nano: nanos(at(trace, unit * node.start)),
            end_time_unix_nano: nanos(at(trace, unit * node.end)),
            attributes: node.attributes.iter().map(|kv| string_kv(kv.key.as_str(), &kv.value.as_str())).collect(),
            status: node
                .error
                .then(|| ProtoStatus { message: "failed".to_owned(), code: proto_status::StatusCode::Error as i32 }),
            ..Default::default()
        })
        .collect()
}

/// One export request of `service` carrying `spans`.
fn raw_request(service: &str, spans: Vec<ProtoSpan>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(otlp::resource(service)),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
}

async fn send_grpc(config: &TestConfig, request: ExportTraceServiceRequest) {
    otlp::trace_client(&config.grpc_endpoint()).await.export(request).await.expect("the agent refused the export");
}

// ---------------------------------------------------------------------------------------
// The SDK as a service uses it
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Wire {
    Grpc,
    Http,
}

/// A tracer provider of `service` exporting to the agent over `wire` through the batch span
/// processor. Built inside the runtime, as the tonic client needs.
fn sdk_provider(config: &TestConfig, service: &'static str, wire: Wire) -> SdkTracerProvider {
    let exporter = match wire {
        Wire::Grpc => {
            opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(config.grpc_endpoint()).build()
        }
        Wire::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", config.http_endpoint()))
            .build(),
    }
    .expect("cannot build the SDK's OTLP exporter");
    let resource = Resource::builder_empty().with_service_name(service).build();
    SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build()
}

/// Exports everything the provider holds; the SDK reports whether the agent accepted it.
async fn flush(provider: &SdkTracerProvider) {
    let provider = provider.clone();
    let result = tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("flush task");
    assert!(result.is_ok(), "the SDK could not export to the agent: {result:?}");
}

async fn shutdown(provider: SdkTracerProvider) {
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}

// ---------------------------------------------------------------------------------------
// Reading the API
// ---------------------------------------------------------------------------------------

/// A query-string value, percent-encoded.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn tree_path(service: &str, handler: &str, format: Option<&str>) -> String {
    let mut path = format!("/api/v1/paths/tree?service={}&handler={}", encode(service), encode(handler));
    if let Some(format) = format {
        path.push_str("&format=");
        path.push_str(format);
    }
    path
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Polls the handler's tree until it counts `traces` traces, and returns it. Fails if more
/// arrive than expected.
async fn wait_for_tree(agent: &Agent, service: &str, handler: &str, traces: u64) -> Value {
    let path = tree_path(service, handler, None);
    let started = Instant::now();
    loop {
        let (status, body) = agent.get(&path).await;
        if status == 200 {
            let tree = json(&body);
            let seen = tree["traces"].as_u64().expect("traces is a count");
            assert!(
                seen <= traces,
                "{service} / {handler} counts {seen} traces, more than the {traces} sent: {tree:#}"
            );
            if seen == traces {
                return tree;
            }
        } else {
            assert_eq!(status, 404, "GET {path}: {body}");
        }
        if started.elapsed() > DEADLINE {
            let (_, handlers) = agent.get("/api/v1/paths").await;
            panic!("{service} / {handler} did not reach {traces} traces within {DEADLINE:?}; last answer {status}: {body}\nhandlers: {handlers}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `GET /api/v1/paths`, parsed.
async fn handlers(agent: &Agent) -> Vec<Value> {
    let (status, body) = agent.get("/api/v1/paths").await;
    assert_eq!(status, 200, "GET /api/v1/paths: {body}");
    json(&body).as_array().unwrap_or_else(|| panic!("not a list: {body}")).clone()
}

/// `GET path` with the response's content type.
async fn get_with_type(agent: &Agent, path: &str) -> (u16, String, String) {
    let response = reqwest::get(agent.url(path)).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    let content_type =
        response.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (status, content_type, response.text().await.unwrap_or_default())
}

/// The child step called `name`.
fn step<'a>(parent: &'a Value, name: &str) -> &'a Value {
    parent["children"]
        .as_array()
        .and_then(|children| children.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no step {name:?} under {:?}: {parent:#}", parent["name"]))
}

/// The names of a step's children, in the order the API lists them.
fn children(step: &Value) -> Vec<&str> {
    step["children"].as_array().expect("children is a list").iter().map(|c| c["name"].as_str().expect("name")).collect()
}

fn num(value: &Value) -> f64 {
    value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().expect("a list").iter().map(|s| s.as_str().expect("a string")).collect()
}

/// Within the sketch's 1 % relative error, and the API's rounding to four decimals.
#[track_caller]
fn assert_close(actual: &Value, expected: f64, what: &str) {
    let actual = num(actual);
    let tolerance = expected.abs() * 0.0101 + 1e-4;
    assert!((actual - expected).abs() <= tolerance, "{what}: {actual}, expected {expected} within 1 %");
}

/// A step's duration and self-time quantiles, both `[p50, p90, p99]` in milliseconds.
#[track_caller]
fn assert_times(step: &Value, duration: [f64; 3], self_time: [f64; 3]) {
    let name = step["name"].as_str().unwrap_or_default().to_owned();
    for (key, expected) in [("duration_ms", duration), ("self_ms", self_time)] {
        for (q, value) in ["p50", "p90", "p99"].into_iter().zip(expected) {
            assert_close(&step[key][q], value, &format!("{name} {key}.{q}"));
        }
    }
}

/// Self-metrics of the analysis: anomalies of any kind.
fn anomalies(metrics: &Metrics) -> f64 {
    metrics.metric_value("periscope_paths_anomalies_total", &[])
}

async fn wait_for_outcome(agent: &Agent, outcome: &str, traces: f64) -> Metrics {
    agent.wait_for_metric("periscope_paths_traces_total", &[("outcome", outcome)], |v| v == traces).await
}

// ---------------------------------------------------------------------------------------
// The tree of a handler
// ---------------------------------------------------------------------------------------

/// Twenty traces of the feed shape, trace `i` stretched `i` times (GET /feed lasts 10·i ms):
/// the tree, self times, critical shares and quantiles are known exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_trace_shape_gives_its_exact_tree_times_and_critical_path() {
    const TRACES: u32 = 20;
    let config = TestConfig::new().paths(TRACE_TIMEOUT).prometheus_exporter();
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, "feed", Wire::Grpc);
    let tracer = provider.tracer("feed-server");
    for i in 1..=TRACES {
        record(&tracer, &feed_shape(), i, Duration::from_micros(100) * i);
    }
    flush(&provider).await;

    let tree = wait_for_tree(&agent, "feed", "GET /feed", u64::from(TRACES)).await;
    assert_eq!(tree["service"], "feed");
    assert_eq!(tree["handler"], "GET /feed");

    // Quantiles of values v·i for i = 1..=20: the sketch's ranks ⌊q·19⌋ are i = 10, 18 and 19.
    let q = |per_unit_ms: f64| [10.0 * per_unit_ms, 18.0 * per_unit_ms, 19.0 * per_unit_ms];
    let root = &tree["root"];
    assert_eq!(root["name"], "GET /feed", "the handler's name: method and route");
    assert_eq!(root["kind"], "server");
    assert_eq!(children(root), ["auth", "handler", "render"], "children by start offset");
    let handler = step(root, "handler");
    let mut handler_children = children(handler);
    handler_children.sort_unstable();
    assert_eq!(handler_children, ["cache", "db"]);

    // name, kind, duration per unit, self time per unit (the union of children taken out:
    // handler 80 − |20–50 ∪ 20–40| = 50), critical share.
    let expected = [
        (root, "server", 10.0, 0.0, 0.0),
        (step(root, "auth"), "internal", 1.0, 1.0, 0.1),
        (handler, "internal", 8.0, 5.0, 0.5),
        (step(handler, "db"), "client", 3.0, 3.0, 0.3),
        (step(handler, "cache"), "client", 2.0, 2.0, 0.0),
        (step(root, "render"), "internal", 1.0, 1.0, 0.1),
    ];
    for (s, kind, duration, self_time, critical_share) in expected {
        let name = s["name"].as_str().unwrap_or_default();
        assert_eq!(s["kind"], kind, "kind of {name}");
        assert_eq!(s["count"], TRACES, "count of {name}");
        assert_eq!(num(&s["calls_per_trace"]), 1.0, "calls per trace of {name}");
        assert_eq!(num(&s["error_rate"]), 0.0, "error rate of {name}");
        assert_times(s, q(duration), q(self_time));
        assert_close(&s["critical_share"], critical_share, &format!("critical share of {name}"));
    }
    assert!(children(step(handler, "db")).is_empty() && children(step(root, "render")).is_empty());

    let variants = tree["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 1, "every trace took the same steps: {variants:#?}");
    assert_eq!(num(&variants[0]["share"]), 1.0);
    assert_eq!(variants[0]["traces"], TRACES);
    assert_close(&variants[0]["p50_ms"], 100.0, "variant p50");
    assert_close(&variants[0]["p99_ms"], 190.0, "variant p99");
    let steps = strings(&variants[0]["steps"]);
    assert_eq!((steps.first(), steps.last()), (Some(&"auth"), Some(&"render")), "steps in path order: {steps:?}");
    let mut sorted = steps.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, ["auth", "handler", "handler > cache", "handler > db", "render"]);

    let listed = handlers(&agent).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["service"], "feed");
    assert_eq!(listed[0]["handler"], "GET /feed");
    assert_eq!(listed[0]["traces"], TRACES);
    assert_close(&listed[0]["p50_ms"], 100.0, "handler p50");
    assert_close(&listed[0]["p99_ms"], 190.0, "handler p99");
    assert_eq!(num(&listed[0]["error_rate"]), 0.0);

    let metrics = agent.metrics().await;
    assert_eq!(metrics.metric_value("periscope_paths_traces_total", &[("outcome", "complete")]), f64::from(TRACES));
    assert_eq!(anomalies(&metrics), 0.0, "{}", metrics.text());
    assert_eq!(metrics.metric_value("periscope_paths_handlers", &[]), 1.0);
    assert_eq!(metrics.metric_value("periscope_paths_traces_in_flight", &[]), 0.0);
    assert_eq!(metrics.metric_value("periscope_paths_spans_in_flight", &[]), 0.0);

    // The same aggregates as Prometheus sees them.
    let scraped = Metrics::scrape(&config.prometheus_url()).await;
    let path = |step: &'static str| [("service", "feed"), ("handler", "GET /feed"), ("step", step)];
    assert_eq!(
        scraped.lookup("periscope_path_traces_total", &[("service", "feed"), ("handler", "GET /feed")]),
        Some(f64::from(TRACES))
    );
    // db is on the critical path for all of its 3·i ms: 3 · 210 ms.
    let critical = scraped.metric_value("periscope_path_critical_seconds_total", &path("GET /feed > handler > db"));
    assert!((critical - 0.63).abs() < 1e-9, "critical seconds of db: {critical}");
    assert_eq!(
        scraped.metric_value("periscope_path_critical_seconds_total", &path("GET /feed > handler > cache")),
        0.0
    );
    let handler_step = path("GET /feed > handler");
    assert_eq!(scraped.lookup("periscope_path_step_duration_seconds_count", &handler_step), Some(20.0));
    // handler lasts 8·i ms: i ≤ 6 within 50 ms, i ≤ 12 within 100 ms.
    let bucket = |le: &'static str| [handler_step[0], handler_step[1], handler_step[2], ("le", le)];
    assert_eq!(scraped.lookup("periscope_path_step_duration_seconds_bucket", &bucket("0.05")), Some(6.0));
    assert_eq!(scraped.lookup("periscope_path_step_duration_seconds_bucket", &bucket("0.1")), Some(12.0));
    let root_self = [("service", "feed"), ("handler", "GET /feed"), ("step", "GET /feed"), ("le", "0.0001")];
    assert_eq!(
        scraped.lookup("periscope_path_step_self_seconds_bucket", &root_self),
        Some(20.0),
        "the root has no self time"
    );

    // Span metrics per span, named as the spanmetrics connector names them.
    let span = |name: &'static str, kind: &'static str| {
        [("service_name", "feed"), ("span_name", name), ("span_kind", kind), ("status_code", "STATUS_CODE_UNSET")]
    };
    assert_eq!(scraped.lookup("traces_span_metrics_calls_total", &span("GET", "SPAN_KIND_SERVER")), Some(20.0));
    assert_eq!(scraped.lookup("traces_span_metrics_calls_total", &span("db", "SPAN_KIND_CLIENT")), Some(20.0));
    assert_eq!(scraped.lookup("traces_span_metrics_calls_total", &span("auth", "SPAN_KIND_INTERNAL")), Some(20.0));
    let sum = scraped.metric_value("traces_span_metrics_duration_milliseconds_sum", &span("GET", "SPAN_KIND_SERVER"));
    assert!((sum - 2100.0).abs() < 1e-6, "GET lasts 10·i ms, 2100 ms in all: {sum}");
    assert_eq!(scraped.lookup("traces_service_graph_request_total", &[]), None, "one service, no edges");
    shutdown(provider).await;
}

/// An N+1 query: one `SELECT order`, then five `SELECT item` siblings one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sibling_calls_are_one_step_with_their_calls_per_trace() {
    const TRACES: u32 = 4;
    const ITEMS: u32 = 5;
    let mut shape = vec![
        node(None, "GET /orders/{id}", 0, 60).kind(SpanKind::Server).route("GET", "/orders/{id}"),
        node(Some(0), "SELECT order", 1, 4).kind(SpanKind::Client),
    ];
    for k in 0..ITEMS {
        shape.push(node(Some(0), "SELECT item", 5 + 10 * k, 13 + 10 * k).kind(SpanKind::Client));
    }
    let config = TestConfig::new().paths(TRACE_TIMEOUT).prometheus_exporter();
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, "orders", Wire::Grpc);
    let tracer = provider.tracer("orders-server");
    for i in 1..=TRACES {
        record(&tracer, &shape, i, Duration::from_millis(1));
    }
    flush(&provider).await;

    let tree = wait_for_tree(&agent, "orders", "GET /orders/{id}", u64::from(TRACES)).await;
    let root = &tree["root"];
    assert_eq!(children(root), ["SELECT order", "SELECT item"], "{tree:#}");
    let item = step(root, "SELECT item");
    assert_eq!(item["count"], TRACES, "traces in which the step occurs");
    assert_eq!(num(&item["calls_per_trace"]), f64::from(ITEMS));
    assert_times(item, [8.0; 3], [8.0; 3]);
    assert_eq!(num(&step(root, "SELECT order")["calls_per_trace"]), 1.0);
    // Critical path: the five items (40 ms), the order (3 ms), the gaps in the root (17 ms).
    assert_close(&item["critical_share"], 40.0 / 60.0, "critical share of the items");
    assert_close(&step(root, "SELECT order")["critical_share"], 0.05, "critical share of the order");
    assert_close(&root["critical_share"], 17.0 / 60.0, "critical share of the root");
    assert_times(root, [60.0; 3], [17.0; 3]);
    let variants = tree["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 1, "{variants:#?}");
    assert_eq!(strings(&variants[0]["steps"]), ["SELECT order", "SELECT item"]);

    // Every call is observed: 5 per trace.
    let scraped = Metrics::scrape(&config.prometheus_url()).await;
    let labels = [("service", "orders"), ("handler", "GET /orders/{id}"), ("step", "GET /orders/{id} > SELECT item")];
    assert_eq!(scraped.lookup("periscope_path_step_duration_seconds_count", &labels), Some(f64::from(TRACES * ITEMS)));
    assert_eq!(
        scraped.lookup("traces_span_metrics_calls_total", &[("service_name", "orders"), ("span_name", "SELECT item")]),
        Some(f64::from(TRACES * ITEMS))
    );
    shutdown(provider).await;
}

/// Cache hits (the cache call only) and misses (cache, database, cache fill), sent over
/// OTLP/HTTP; the handler has no route, so it is named after its span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hits_and_misses_are_two_variants_with_their_shares() {
    const HANDLER: &str = "ProductService/Get";
    let hit =
        vec![node(None, HANDLER, 0, 5).kind(SpanKind::Server), node(Some(0), "cache.get", 1, 3).kind(SpanKind::Client)];
    let miss = vec![
        node(None, HANDLER, 0, 25).kind(SpanKind::Server),
        node(Some(0), "cache.get", 1, 3).kind(SpanKind::Client),
        node(Some(0), "db.query", 3, 20).kind(SpanKind::Client),
        node(Some(0), "cache.set", 20, 22).kind(SpanKind::Client),
    ];
    let config = TestConfig::new().paths(TRACE_TIMEOUT);
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, "products", Wire::Http);
    let tracer = provider.tracer("products-server");
    for i in 0..8 {
        let shape = if i % 4 == 3 { &miss } else { &hit };
        record(&tracer, shape, i, Duration::from_millis(1));
    }
    flush(&provider).await;

    let tree = wait_for_tree(&agent, "products", HANDLER, 8).await;
    let root = &tree["root"];
    assert_eq!(root["name"], HANDLER);
    assert_eq!(children(root), ["cache.get", "db.query", "cache.set"], "{tree:#}");
    assert_eq!(step(root, "cache.get")["count"], 8);
    assert_eq!(step(root, "db.query")["count"], 2);
    assert_eq!(step(root, "cache.set")["count"], 2);
    // Latencies 5 ms ×6 and 25 ms ×2, self times 3 ms and 4 ms: ranks 3 and 6 of 8.
    assert_times(root, [5.0, 25.0, 25.0], [3.0, 4.0, 4.0]);

    let variants = tree["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 2, "{variants:#?}");
    let (hits, misses) = (&variants[0], &variants[1]);
    assert_eq!(strings(&hits["steps"]), ["cache.get"]);
    assert_eq!(hits["traces"], 6);
    assert_eq!(num(&hits["share"]), 0.75);
    assert_close(&hits["p50_ms"], 5.0, "hit p50");
    assert_close(&hits["p99_ms"], 5.0, "hit p99");
    assert_eq!(strings(&misses["steps"]), ["cache.get", "db.query", "cache.set"]);
    assert_eq!(misses["traces"], 2);
    assert_eq!(num(&misses["share"]), 0.25);
    assert_close(&misses["p50_ms"], 25.0, "miss p50");
    assert_close(&misses["p99_ms"], 25.0, "miss p99");
    shutdown(provider).await;
}

/// Four requests: in one the store call fails and a retry hides it, in another it fails the
/// whole request. The handler is named from the older `http.method` attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_spans_give_error_rates_to_their_step_and_handler() {
    let shape = |store_failed: bool, request_failed: bool| {
        let mut root = node(None, "POST", 0, 10)
            .kind(SpanKind::Server)
            .attribute("http.method", "POST")
            .attribute("http.route", "/comments");
        let mut store = node(Some(0), "store", 2, 8).kind(SpanKind::Client);
        root.error = request_failed;
        store.error = store_failed;
        vec![root, node(Some(0), "validate", 0, 2), store]
    };
    let config = TestConfig::new().paths(TRACE_TIMEOUT).prometheus_exporter();
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, "comments", Wire::Http);
    let tracer = provider.tracer("comments-server");
    record(&tracer, &shape(false, false), 0, Duration::from_millis(1));
    record(&tracer, &shape(true, false), 1, Duration::from_millis(1));
    record(&tracer, &shape(true, true), 2, Duration::from_millis(1));
    record(&tracer, &shape(false, false), 3, Duration::from_millis(1));
    flush(&provider).await;

    let tree = wait_for_tree(&agent, "comments", "POST /comments", 4).await;
    let root = &tree["root"];
    assert_eq!(num(&root["error_rate"]), 0.25, "{tree:#}");
    assert_eq!(num(&step(root, "store")["error_rate"]), 0.5);
    assert_eq!(num(&step(root, "validate")["error_rate"]), 0.0);
    let listed = handlers(&agent).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["handler"], "POST /comments");
    assert_eq!(num(&listed[0]["error_rate"]), 0.25);

    let scraped = Metrics::scrape(&config.prometheus_url()).await;
    let calls = |span: &'static str, status: &'static str| {
        scraped.lookup(
            "traces_span_metrics_calls_total",
            &[("service_name", "comments"), ("span_name", span), ("status_code", status)],
        )
    };
    assert_eq!(calls("store", "STATUS_CODE_ERROR"), Some(2.0));
    assert_eq!(calls("store", "STATUS_CODE_UNSET"), Some(2.0));
    assert_eq!(calls("POST", "STATUS_CODE_ERROR"), Some(1.0));
    assert_eq!(calls("POST", "STATUS_CODE_UNSET"), Some(3.0));
    shutdown(provider).await;
}

// ---------------------------------------------------------------------------------------
// Assembly: spans of one trace in several requests, and late spans
// ---------------------------------------------------------------------------------------

/// GET /search with `query` (which looks up an index) and `rank`; sent as four requests,
/// grandchild first and the entry span last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arriving_out_of_order_in_separate_requests_make_one_tree() {
    let shape = vec![
        node(None, "GET /search", 0, 40).kind(SpanKind::Server).route("GET", "/search"),
        node(Some(0), "query", 2, 30),
        node(Some(1), "index.lookup", 5, 25),
        node(Some(0), "rank", 30, 38),
    ];
    // Generous: the requests of one trace may be spread out on a busy machine.
    let config = TestConfig::new().paths("2s");
    let agent = Agent::start(&config.yaml()).await;
    let mut spans = raw_spans(&shape, 1, Duration::from_millis(1));
    let mut client = otlp::trace_client(&config.grpc_endpoint()).await;
    for index in [2, 3, 1, 0] {
        let request = raw_request("search", vec![std::mem::take(&mut spans[index])]);
        client.export(request).await.expect("the agent refused the export");
    }

    let tree = wait_for_tree(&agent, "search", "GET /search", 1).await;
    let root = &tree["root"];
    assert_eq!(children(root), ["query", "rank"], "{tree:#}");
    assert_eq!(children(step(root, "query")), ["index.lookup"]);
    assert_times(step(root, "query"), [28.0; 3], [8.0; 3]);

    let metrics = wait_for_outcome(&agent, "complete", 1.0).await;
    let listed = handlers(&agent).await;
    assert_eq!(listed.len(), 1, "the children that came first are not handlers: {listed:#?}");
    assert_eq!(metrics.metric_value("periscope_paths_anomalies_total", &[("kind", "missing_parent")]), 0.0);
    assert_eq!(metrics.metric_value("periscope_paths_traces_in_flight", &[]), 0.0);
    assert_eq!(metrics.metric_value("periscope_paths_spans_in_flight", &[]), 0.0);
}

/// A span of a trace that has already been analysed is dropped as late: it neither joins
/// the finished tree nor poses as a handler of its own. Span metrics still count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_arriving_after_its_trace_completed_is_dropped_as_late() {
    let shape = vec![
        node(None, "GET /cart", 0, 20).kind(SpanKind::Server).route("GET", "/cart"),
        node(Some(0), "load cart", 2, 18),
        node(Some(0), "late step", 18, 19),
    ];
    let config = TestConfig::new().paths(TRACE_TIMEOUT).prometheus_exporter();
    let agent = Agent::start(&config.yaml()).await;
    let mut spans = raw_spans(&shape, 7, Duration::from_millis(1));
    let late = spans.pop().expect("three spans");
    send_grpc(&config, raw_request("cart", spans)).await;
    wait_for_tree(&agent, "cart", "GET /cart", 1).await;
    wait_for_outcome(&agent, "complete", 1.0).await;

    send_grpc(&config, raw_request("cart", vec![late])).await;
    let late_drops = [("component", "paths"), ("signal", "traces"), ("reason", "late")];
    let metrics = agent.wait_for_metric("periscope_dropped_items_total", &late_drops, |v| v == 1.0).await;
    assert_eq!(metrics.metric_value("periscope_paths_traces_total", &[("outcome", "complete")]), 1.0);
    assert_eq!(metrics.metric_value("periscope_paths_traces_in_flight", &[]), 0.0);
    assert_eq!(metrics.metric_value("periscope_paths_handlers", &[]), 1.0);

    let listed = handlers(&agent).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["handler"], "GET /cart");
    assert_eq!(listed[0]["traces"], 1);
    let (_, body) = agent.get(&tree_path("cart", "GET /cart", None)).await;
    assert_eq!(children(&json(&body)["root"]), ["load cart"]);

    let scraped = Metrics::scrape(&config.prometheus_url()).await;
    assert_eq!(
        scraped.lookup("traces_span_metrics_calls_total", &[("service_name", "cart"), ("span_name", "late step")]),
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------------
// Services calling services
// ---------------------------------------------------------------------------------------

/// frontend's GET /home calls backend through a client span; backend's server span is its
/// child (a remote parent, as propagated in `traceparent`). The two services send with
/// their own SDKs, over gRPC and HTTP. One of three backend requests fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_between_two_services_gives_two_handlers_and_one_graph_edge() {
    const REQUESTS: u32 = 3;
    // Generous: the two SDKs export one after the other, and each trace needs both halves.
    let config = TestConfig::new().paths("2s").prometheus_exporter();
    let agent = Agent::start(&config.yaml()).await;
    let frontend = sdk_provider(&config, "frontend", Wire::Grpc);
    let backend = sdk_provider(&config, "backend", Wire::Http);
    let frontend_tracer = frontend.tracer("frontend-server");
    let backend_tracer = backend.tracer("backend-server");
    let ms = Duration::from_millis(1);

    for i in 0..REQUESTS {
        let home = frontend_tracer
            .span_builder("GET /home")
            .with_kind(SpanKind::Server)
            .with_start_time(at(i, Duration::ZERO))
            .with_attributes([KeyValue::new("http.request.method", "GET"), KeyValue::new("http.route", "/home")])
            .start_with_context(&frontend_tracer, &Context::new());
        let home_cx = Context::new().with_span(home);
        let call = frontend_tracer
            .span_builder("GET")
            .with_kind(SpanKind::Client)
            .with_start_time(at(i, ms * 10))
            .with_attributes([
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("server.address", "backend.internal"),
            ])
            .start_with_context(&frontend_tracer, &home_cx);
        let call_cx = home_cx.with_span(call);

        // In the backend process: the caller's context arrives with the request.
        let remote = Context::new().with_remote_span_context(call_cx.span().span_context().clone());
        let mut data = backend_tracer
            .span_builder("GET /api/data")
            .with_kind(SpanKind::Server)
            .with_start_time(at(i, ms * 12))
            .with_attributes([KeyValue::new("http.request.method", "GET"), KeyValue::new("http.route", "/api/data")])
            .start_with_context(&backend_tracer, &remote);
        if i == 1 {
            data.set_status(Status::error("upstream timeout"));
        }
        let data_cx = remote.with_span(data);
        let mut load = backend_tracer
            .span_builder("load")
            .with_start_time(at(i, ms * 15))
            .start_with_context(&backend_tracer, &data_cx);
        load.end_with_timestamp(at(i, ms * 35));
        data_cx.span().end_with_timestamp(at(i, ms * 38));

        call_cx.span().end_with_timestamp(at(i, ms * 40));
        home_cx.span().end_with_timestamp(at(i, ms * 45));
    }
    flush(&frontend).await;
    flush(&backend).await;

    let home = wait_for_tree(&agent, "frontend", "GET /home", u64::from(REQUESTS)).await;
    let data = wait_for_tree(&agent, "backend", "GET /api/data", u64::from(REQUESTS)).await;
    let listed = handlers(&agent).await;
    assert_eq!(listed.len(), 2, "{listed:#?}");
    // The call into backend is a leaf of frontend's path; backend's spans are its own.
    assert_eq!(children(&home["root"]), ["GET"], "{home:#}");
    let call = step(&home["root"], "GET");
    assert_eq!(call["kind"], "client");
    assert!(children(call).is_empty(), "{home:#}");
    assert_eq!(data["root"]["kind"], "server");
    assert_eq!(children(&data["root"]), ["load"]);
    assert_close(&data["root"]["error_rate"], 1.0 / 3.0, "backend error rate");
    assert_eq!(num(&home["root"]["error_rate"]), 0.0);

    let scraped = Metrics::scrape(&config.prometheus_url()).await;
    let edges: Vec<_> = scraped.series("traces_service_graph_request_total", &[]).collect();
    assert_eq!(edges.len(), 1, "one edge, paired by parentage rather than server.address: {edges:?}");
    let edge = [("client", "frontend"), ("server", "backend")];
    assert_eq!(scraped.lookup("traces_service_graph_request_total", &edge), Some(f64::from(REQUESTS)));
    assert_eq!(scraped.lookup("traces_service_graph_request_failed_total", &edge), Some(1.0));
    let bucket = |le: &'static str| [edge[0], edge[1], ("le", le)];
    // backend's server span lasts 26 ms.
    assert_eq!(scraped.lookup("traces_service_graph_request_server_seconds_bucket", &bucket("0.025")), Some(0.0));
    assert_eq!(scraped.lookup("traces_service_graph_request_server_seconds_bucket", &bucket("0.05")), Some(3.0));

    let calls = |service: &'static str, span: &'static str, kind: &'static str, status: &'static str| {
        scraped.lookup(
            "traces_span_metrics_calls_total",
            &[("service_name", service), ("span_name", span), ("span_kind", kind), ("status_code", status)],
        )
    };
    assert_eq!(calls("frontend", "GET /home", "SPAN_KIND_SERVER", "STATUS_CODE_UNSET"), Some(3.0));
    assert_eq!(calls("frontend", "GET", "SPAN_KIND_CLIENT", "STATUS_CODE_UNSET"), Some(3.0));
    assert_eq!(calls("backend", "GET /api/data", "SPAN_KIND_SERVER", "STATUS_CODE_UNSET"), Some(2.0));
    assert_eq!(calls("backend", "GET /api/data", "SPAN_KIND_SERVER", "STATUS_CODE_ERROR"), Some(1.0));
    assert_eq!(calls("backend", "load", "SPAN_KIND_INTERNAL", "STATUS_CODE_UNSET"), Some(3.0));
    let home_series = [
        ("service_name", "frontend"),
        ("span_name", "GET /home"),
        ("span_kind", "SPAN_KIND_SERVER"),
        ("status_code", "STATUS_CODE_UNSET"),
    ];
    let bucket = |le: &'static str| [home_series[0], home_series[1], home_series[2], home_series[3], ("le", le)];
    assert_eq!(scraped.lookup("traces_span_metrics_duration_milliseconds_bucket", &bucket("10")), Some(0.0));
    assert_eq!(scraped.lookup("traces_span_metrics_duration_milliseconds_bucket", &bucket("50")), Some(3.0));
    assert_eq!(scraped.lookup("traces_span_metrics_duration_milliseconds_count", &home_series), Some(3.0));
    let sum = scraped.metric_value("traces_span_metrics_duration_milliseconds_sum", &home_series);
    assert!((sum - 135.0).abs() < 1e-6, "three requests of 45 ms: {sum}");
    shutdown(frontend).await;
    shutdown(backend).await;
}

// ---------------------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------------------

/// Thousands of traces that never complete (the timeout is an hour), each its own handler:
/// assembly keeps at most `max_traces_in_flight` and hands the oldest on early; handlers
/// beyond `max_handlers` are counted under `__overflow__`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_traces_and_routes_stay_within_the_configured_bounds() {
    const MAX_TRACES: u32 = 100;
    const MAX_HANDLERS: u32 = 20;
    const BATCHES: u32 = 30;
    const PER_BATCH: u32 = 100;
    const TOTAL: u32 = BATCHES * PER_BATCH;
    let config =
        TestConfig::new().paths("1h").paths_bounds(MAX_TRACES as usize, MAX_HANDLERS as usize).prometheus_exporter();
    let agent = Agent::start(&config.yaml()).await;
    let mut client = otlp::trace_client(&config.grpc_endpoint()).await;

    let mut most_in_flight = 0.0_f64;
    for batch in 0..BATCHES {
        let spans = (0..PER_BATCH)
            .map(|k| {
                let n = batch * PER_BATCH + k;
                ProtoSpan {
                    trace_id: raw_trace_id(n),
                    span_id: raw_span_id(0),
                    name: "GET".to_owned(),
                    kind: proto_span::SpanKind::Server as i32,
                    start_time_unix_nano: nanos(at(n, Duration::ZERO)),
                    end_time_unix_nano: nanos(at(n, Duration::from_millis(3))),
                    attributes: vec![
                        string_kv("http.request.method", "GET"),
                        string_kv("http.route", &format!("/r/{n}")),
                    ],
                    ..Default::default()
                }
            })
            .collect();
        client.export(raw_request("sprawl", spans)).await.expect("the agent refused the export");
        let metrics = agent.metrics().await;
        let in_flight = metrics.metric_value("periscope_paths_traces_in_flight", &[]);
        let spans_in_flight = metrics.metric_value("periscope_paths_spans_in_flight", &[]);
        assert!(in_flight <= f64::from(MAX_TRACES), "after batch {batch}: {in_flight} traces in flight");
        assert!(spans_in_flight <= f64::from(MAX_TRACES), "after batch {batch}: {spans_in_flight} spans in flight");
        assert!(metrics.metric_value("periscope_paths_handlers", &[]) <= f64::from(MAX_HANDLERS + 1));
        most_in_flight = most_in_flight.max(in_flight);
    }

    let evicted = f64::from(TOTAL - MAX_TRACES);
    let metrics = wait_for_outcome(&agent, "evicted", evicted).await;
    assert_eq!(
        metrics.metric_value("periscope_dropped_items_total", &[("component", "paths")]),
        0.0,
        "{}",
        metrics.text()
    );
    assert_eq!(metrics.metric_value("periscope_paths_traces_total", &[("outcome", "complete")]), 0.0);
    assert_eq!(metrics.metric_value("periscope_paths_traces_in_flight", &[]), f64::from(MAX_TRACES));
    assert_eq!(metrics.metric_value("periscope_paths_spans_in_flight", &[]), f64::from(MAX_TRACES));
    assert_eq!(
        metrics.metric_value("periscope_paths_handlers", &[]),
        f64::from(MAX_HANDLERS + 1),
        "the bound and __overflow__"
    );
    // The first MAX_HANDLERS evicted traces made handlers; every later one is overflow.
    let overflow = evicted - f64::from(MAX_HANDLERS);
    assert_eq!(metrics.metric_value("periscope_paths_anomalies_total", &[("kind", "handler_overflow")]), overflow);
    assert!(most_in_flight > 0.0, "the gauge was never seen above zero");

    let listed = handlers(&agent).await;
    assert_eq!(listed.len(), (MAX_HANDLERS + 1) as usize);
    assert_eq!(listed[0]["service"], "__overflow__", "the busiest first: {:#}", listed[0]);
    assert_eq!(listed[0]["handler"], "__overflow__");
    assert_eq!(num(&listed[0]["traces"]), overflow);
    let mut named: Vec<String> =
        listed[1..].iter().map(|h| format!("{} {} {}", h["service"], h["handler"], h["traces"])).collect();
    let mut expected: Vec<String> = (0..MAX_HANDLERS).map(|n| format!("\"sprawl\" \"GET /r/{n}\" 1")).collect();
    named.sort();
    expected.sort();
    assert_eq!(named, expected, "the oldest traces were evicted first and made the handlers");

    let scraped = Metrics::scrape(&config.prometheus_url()).await;
    assert_eq!(scraped.series("periscope_path_traces_total", &[]).count(), (MAX_HANDLERS + 1) as usize);
    assert_eq!(
        scraped.lookup("periscope_path_traces_total", &[("service", "__overflow__"), ("handler", "__overflow__")]),
        Some(overflow)
    );
}

// ---------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_api_answers_bad_requests_and_unknown_handlers_with_json_errors() {
    let config = TestConfig::new().paths(TRACE_TIMEOUT);
    let agent = Agent::start(&config.yaml()).await;
    send_grpc(&config, raw_request("feed", raw_spans(&feed_shape(), 1, Duration::from_millis(1)))).await;
    wait_for_tree(&agent, "feed", "GET /feed", 1).await;

    let cases = [
        ("/api/v1/paths/tree".to_owned(), 400, "service and handler"),
        ("/api/v1/paths/tree?service=feed".to_owned(), 400, "service and handler"),
        (format!("/api/v1/paths/tree?handler={}", encode("GET /feed")), 400, "service and handler"),
        (tree_path("feed", "GET /feed", Some("xml")), 400, "xml"),
        (tree_path("feed", "GET /nope", None), 404, "GET /nope"),
        (tree_path("nope", "GET /feed", Some("svg")), 404, "nope"),
    ];
    for (path, status, words) in cases {
        let (got, body) = agent.get(&path).await;
        assert_eq!(got, status, "GET {path}: {body}");
        let error = json(&body)["error"].as_str().unwrap_or_else(|| panic!("no error message: {body}")).to_owned();
        assert!(error.contains(words), "GET {path}: {error:?} should mention {words:?}");
    }
}

/// Collapsed stacks weighted by self time in µs, and the flame graph drawn from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_api_renders_folded_stacks_and_a_flame_graph() {
    let config = TestConfig::new().paths(TRACE_TIMEOUT);
    let agent = Agent::start(&config.yaml()).await;
    send_grpc(&config, raw_request("feed", raw_spans(&feed_shape(), 1, Duration::from_millis(1)))).await;
    let tree = wait_for_tree(&agent, "feed", "GET /feed", 1).await;

    let (status, body) = agent.get(&tree_path("feed", "GET /feed", Some("json"))).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body), tree, "json is the default format");

    let (status, content_type, folded) = get_with_type(&agent, &tree_path("feed", "GET /feed", Some("folded"))).await;
    assert_eq!(status, 200, "{folded}");
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let lines: Vec<&str> = folded.lines().collect();
    assert_eq!(lines.first(), Some(&"GET /feed;auth 10000"), "{folded}");
    assert_eq!(lines.last(), Some(&"GET /feed;render 10000"), "{folded}");
    let mut sorted = lines.clone();
    sorted.sort_unstable();
    // The root has no self time of its own, so no line.
    assert_eq!(
        sorted,
        [
            "GET /feed;auth 10000",
            "GET /feed;handler 50000",
            "GET /feed;handler;cache 20000",
            "GET /feed;handler;db 30000",
            "GET /feed;render 10000",
        ]
    );

    let (status, content_type, svg) = get_with_type(&agent, &tree_path("feed", "GET /feed", Some("svg"))).await;
    assert_eq!(status, 200, "{svg}");
    assert_eq!(content_type, "image/svg+xml");
    assert!(svg.starts_with("<?xml"), "{}", &svg[..svg.len().min(200)]);
    assert!(svg.contains("<svg"), "not an SVG document");
    for frame in ["handler", "db", "cache", "render"] {
        assert!(svg.contains(&format!(">{frame}")), "the flame graph has no frame {frame:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_api_is_not_found_when_paths_are_off() {
    let config = TestConfig::new();
    let agent = Agent::start(&config.yaml()).await;
    for path in ["/api/v1/paths".to_owned(), tree_path("feed", "GET /feed", None)] {
        let (status, body) = agent.get(&path).await;
        assert_eq!(status, 404, "GET {path}: {body}");
        let error = json(&body)["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains("paths.enabled"), "GET {path}: {error:?} should say how to turn paths on");
    }
}

// ---------------------------------------------------------------------------------------
// Next to the Jaeger exporter
// ---------------------------------------------------------------------------------------

/// The spans of `request` as they must reach Jaeger: `host.name` added, attributes sorted.
fn as_delivered(request: &ExportTraceServiceRequest) -> Vec<FlatSpan> {
    flatten(request).into_iter().map(|span| normalized(span.with_resource_attribute("host.name", NODE))).collect()
}

fn normalized(mut span: FlatSpan) -> FlatSpan {
    span.resource.attributes = span.sorted_resource_attributes();
    span
}

/// Analysis is a consumer of the traces pipeline beside the exporters: every span still
/// reaches Jaeger once and unchanged, and the same spans make up the handler's path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_jaeger_unchanged_while_their_paths_are_analysed() {
    const SPANS: u8 = 6;
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().jaeger(collector.exporter_config(&[])).paths(TRACE_TIMEOUT).prometheus_exporter();
    let agent = Agent::start(&config.yaml()).await;

    let mut expected = Vec::new();
    for seed in 1..=5 {
        let request = trace_request("items", seed, SPANS);
        expected.extend(as_delivered(&request));
        send_grpc(&config, request).await;
    }
    for seed in 6..=7 {
        let request = trace_request("items", seed, SPANS);
        expected.extend(as_delivered(&request));
        let answer = post_protobuf(&format!("{}/v1/traces", config.http_endpoint()), &request).await;
        assert_eq!(answer.status, 200, "{}", answer.body_text());
    }

    collector.wait_for_spans(expected.len()).await;
    let metrics = agent.wait_until_exporter_idle().await;
    let received = by_key(collector.accepted_spans().into_iter().map(normalized));
    let expected = by_key(expected);
    assert_eq!(received.len(), expected.len(), "spans arrived that were never sent");
    for (key, span) in &expected {
        assert_eq!(received.get(key), Some(span), "span {:?} did not arrive unchanged", span.span.name);
    }
    assert_eq!(
        metrics.metric_value("periscope_sent_items_total", &[("component", "jaeger"), ("signal", "traces")]),
        expected.len() as f64
    );

    // Each request is one trace of a chain: the route without a method names the handler.
    let tree = wait_for_tree(&agent, "items", "/api/items", 7).await;
    let mut step_of_chain = &tree["root"];
    for depth in 1..SPANS {
        let name = format!("step-{depth}");
        assert_eq!(children(step_of_chain), [name.as_str()], "{tree:#}");
        step_of_chain = step(step_of_chain, &name);
        assert_eq!(step_of_chain["count"], 7);
    }
    assert_eq!(num(&step_of_chain["error_rate"]), 1.0, "the last span of each chain failed");
    assert_eq!(num(&tree["root"]["error_rate"]), 0.0);

    let metrics = wait_for_outcome(&agent, "complete", 7.0).await;
    let paths = [("component", "paths"), ("signal", "traces")];
    assert_eq!(metrics.metric_value("periscope_received_items_total", &paths), expected.len() as f64);
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &paths), 0.0, "{}", metrics.text());
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("signal", "traces")]), 0.0);
    let scraped = Metrics::scrape(&config.prometheus_url()).await;
    assert_eq!(
        scraped.lookup("periscope_path_traces_total", &[("service", "items"), ("handler", "/api/items")]),
        Some(7.0)
    );
}
