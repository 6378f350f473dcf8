//! Traces of known shape through the processor: the trees, times, shares and variants they
//! must produce.

use super::*;
use crate::config::PathsConfig;
use crate::telemetry::Metrics;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

const MS: u64 = 1_000_000;
const T0: u64 = 1_700_000_000_000_000_000;

fn attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

/// A span of trace `trace`; times in milliseconds from an arbitrary origin.
fn span(trace: u128, id: u64, parent: u64, name: &str, start_ms: f64, end_ms: f64) -> Span {
    Span {
        trace_id: trace.to_be_bytes().to_vec(),
        span_id: id.to_be_bytes().to_vec(),
        parent_span_id: if parent == 0 { Vec::new() } else { parent.to_be_bytes().to_vec() },
        name: name.into(),
        kind: if parent == 0 { 2 } else { 1 },
        start_time_unix_nano: T0 + (start_ms * MS as f64) as u64,
        end_time_unix_nano: T0 + (end_ms * MS as f64) as u64,
        ..Default::default()
    }
}

fn with_kind(mut s: Span, kind: i32) -> Span {
    s.kind = kind;
    s
}

fn failed(mut s: Span) -> Span {
    s.status = Some(Status { code: 2, message: "boom".into() });
    s
}

fn request(service: &str, spans: Vec<Span>) -> Traces {
    Traces {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: vec![attr("service.name", service)], ..Default::default() }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
}

struct Fixture {
    metrics: Metrics,
    paths: Paths,
    processor: Processor,
    now: Instant,
}

const TIMEOUT: Duration = Duration::from_secs(5);

impl Fixture {
    fn new() -> Self {
        Self::with(PathsConfig { trace_timeout: TIMEOUT, ..PathsConfig::default() })
    }

    fn with(config: PathsConfig) -> Self {
        let metrics = Metrics::new();
        let (paths, processor) =
            build(&config, metrics.paths(), metrics.component(KEY, crate::signal::Signal::Traces));
        Fixture { metrics, paths, processor, now: Instant::now() }
    }

    fn send(&mut self, traces: Traces) {
        self.processor.ingest(&traces, self.now);
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.processor.expire(self.now);
    }

    /// Lets every waiting trace complete.
    fn settle(&mut self) {
        self.advance(TIMEOUT + Duration::from_millis(1));
    }

    fn tree(&self, service: &str, handler: &str) -> TreeJson {
        match self.paths.tree(service, handler, TreeFormat::Json) {
            Some(Ok(Rendered::Json(tree))) => tree,
            _ => panic!("no handler {service} / {handler}: {:?}", self.paths.handlers()),
        }
    }

    fn self_metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, self.metrics.registry()).unwrap();
        text
    }

    fn exposition(&self) -> String {
        let mut out = Exposition::new();
        self.paths.collect(&mut out);
        out.into_text()
    }
}

fn child<'a>(step: &'a handlers::StepJson, name: &str) -> &'a handlers::StepJson {
    step.children.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no step {name} under {}", step.name))
}

fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= expected.abs() * handlers::SKETCH_RELATIVE_ERROR * 1.01 + 1e-9
}

/// GET /feed (0–100 ms): auth 0–10, handler 10–90 with db 20–50 and cache 20–40 in parallel,
/// render 90–100.
fn feed_trace(trace: u128) -> Vec<Span> {
    let mut root = span(trace, 1, 0, "GET", 0.0, 100.0);
    root.attributes = vec![attr("http.request.method", "GET"), attr("http.route", "/feed")];
    vec![
        root,
        span(trace, 2, 1, "auth", 0.0, 10.0),
        span(trace, 3, 1, "handler", 10.0, 90.0),
        span(trace, 4, 3, "db.query", 20.0, 50.0),
        span(trace, 5, 3, "cache.get", 20.0, 40.0),
        span(trace, 6, 1, "render", 90.0, 100.0),
    ]
}

#[test]
fn tree_self_times_and_critical_path_of_a_trace_with_parallel_children() {
    let mut f = Fixture::new();
    f.send(request("feed", feed_trace(1)));
    f.settle();

    let tree = f.tree("feed", "GET /feed");
    assert_eq!(tree.traces, 1);
    let root = &tree.root;
    assert_eq!(root.name, "GET /feed");
    assert_eq!(root.kind, "server");
    let names: Vec<&str> = root.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["auth", "handler", "render"], "children in start order");
    assert!(close(root.duration_ms.p50, 100.0), "{}", root.duration_ms.p50);
    assert_eq!(root.self_ms.p50, 0.0);

    let handler = child(root, "handler");
    assert!(close(handler.duration_ms.p50, 80.0));
    // 80 ms minus the union of db (20–50) and cache (20–40): 50 ms, not 30.
    assert!(close(handler.self_ms.p50, 50.0), "{}", handler.self_ms.p50);
    let db = child(handler, "db.query");
    let cache = child(handler, "cache.get");
    assert_eq!(handler.children.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["db.query", "cache.get"]);

    // Critical path: render 10, handler 50 (90→50 and 20→10), db 30, auth 10; the parallel
    // cache call is never on it.
    assert_eq!(child(root, "auth").critical_share, 0.1);
    assert_eq!(handler.critical_share, 0.5);
    assert_eq!(db.critical_share, 0.3);
    assert_eq!(cache.critical_share, 0.0);
    assert_eq!(child(root, "render").critical_share, 0.1);
    assert_eq!(root.critical_share, 0.0);

    assert_eq!(tree.variants.len(), 1);
    assert_eq!(tree.variants[0].share, 1.0);
    assert_eq!(
        tree.variants[0].steps,
        ["auth", "handler", "handler > db.query", "handler > cache.get", "render"]
    );

    let text = f.exposition();
    assert!(text.contains("periscope_path_traces_total{service=\"feed\",handler=\"GET /feed\"} 1\n"), "{text}");
    assert!(
        text.contains("periscope_path_critical_seconds_total{service=\"feed\",handler=\"GET /feed\",step=\"GET /feed > handler > db.query\"} 0.03\n"),
        "{text}"
    );
    assert!(
        text.contains("periscope_path_step_self_seconds_bucket{service=\"feed\",handler=\"GET /feed\",step=\"GET /feed > handler\",le=\"0.05\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("traces_span_metrics_calls_total{service_name=\"feed\",span_name=\"db.query\",span_kind=\"SPAN_KIND_INTERNAL\",status_code=\"STATUS_CODE_UNSET\"} 1\n"), "{text}");
}

#[test]
fn repeated_sibling_calls_are_one_step_called_n_times() {
    let mut f = Fixture::new();
    for trace in 1..=4u128 {
        let mut spans = vec![span(trace, 1, 0, "list", 0.0, 60.0)];
        for i in 0..5u64 {
            let start = 5.0 + 10.0 * i as f64;
            spans.push(span(trace, 10 + i, 1, "SELECT item", start, start + 8.0));
        }
        f.send(request("shop", spans));
    }
    f.settle();
    let tree = f.tree("shop", "list");
    assert_eq!(tree.traces, 4);
    assert_eq!(tree.root.children.len(), 1);
    let query = &tree.root.children[0];
    assert_eq!(query.count, 4, "traces containing the step");
    assert_eq!(query.calls_per_trace, 5.0);
    assert!(close(query.duration_ms.p50, 8.0));
    // 60 ms minus 5 × 8 ms of queries.
    assert!(close(tree.root.self_ms.p50, 20.0), "{}", tree.root.self_ms.p50);
    assert!(close(query.critical_share, 40.0 / 60.0));
}

#[test]
fn variants_split_cache_hits_from_misses_with_their_latency() {
    let mut f = Fixture::new();
    for trace in 1..=10u128 {
        let miss = trace % 5 == 0;
        let mut spans = vec![span(trace, 1, 0, "get", 0.0, if miss { 50.0 } else { 5.0 }), span(trace, 2, 1, "cache", 1.0, 3.0)];
        if miss {
            spans.push(span(trace, 3, 1, "db", 3.0, 49.0));
        }
        f.send(request("api", spans));
    }
    f.settle();
    let tree = f.tree("api", "get");
    assert_eq!(tree.variants.len(), 2);
    let hit = &tree.variants[0];
    assert_eq!(hit.steps, ["cache"]);
    assert_eq!(hit.share, 0.8);
    assert!(close(hit.p50_ms, 5.0));
    let miss = &tree.variants[1];
    assert_eq!(miss.steps, ["cache", "db"]);
    assert_eq!(miss.share, 0.2);
    assert!(close(miss.p99_ms, 50.0));
    assert_eq!(child(&tree.root, "db").count, 2);
}

#[test]
fn quantiles_are_within_the_sketch_error() {
    let mut f = Fixture::new();
    for trace in 1..=1000u128 {
        f.send(request("q", vec![span(trace, 1, 0, "op", 0.0, trace as f64 / 10.0)]));
    }
    f.settle();
    let summary = f.paths.handlers();
    assert_eq!(summary.len(), 1);
    // Durations 0.1 ms … 100 ms in equal steps: the median is ~50 ms, p99 ~99 ms.
    let tree = f.tree("q", "op");
    let d = &tree.root.duration_ms;
    assert!((d.p50 - 50.0).abs() <= 50.0 * 0.011 + 0.1, "{}", d.p50);
    assert!((d.p90 - 90.0).abs() <= 90.0 * 0.011 + 0.1, "{}", d.p90);
    assert!((d.p99 - 99.0).abs() <= 99.0 * 0.011 + 0.1, "{}", d.p99);
    assert_eq!(summary[0].traces, 1000);
}

#[test]
fn errors_give_error_rates_per_step_and_handler() {
    let mut f = Fixture::new();
    for trace in 1..=4u128 {
        let mut root = span(trace, 1, 0, "pay", 0.0, 10.0);
        let mut charge = span(trace, 2, 1, "charge", 1.0, 9.0);
        if trace == 1 {
            root = failed(root);
            charge = failed(charge);
        }
        f.send(request("billing", vec![root, charge]));
    }
    f.settle();
    let tree = f.tree("billing", "pay");
    assert_eq!(tree.root.error_rate, 0.25);
    assert_eq!(child(&tree.root, "charge").error_rate, 0.25);
    assert_eq!(f.paths.handlers()[0].error_rate, 0.25);
    assert!(f.exposition().contains("status_code=\"STATUS_CODE_ERROR\"} 1\n"));
}

#[test]
fn spans_out_of_order_across_batches_with_the_entry_span_last_make_one_trace() {
    let mut f = Fixture::new();
    let spans = feed_trace(9);
    // Deepest first, the entry span last, each in its own request, within the timeout.
    for s in spans.into_iter().rev() {
        f.send(request("feed", vec![s]));
        f.advance(Duration::from_secs(1));
    }
    assert!(f.paths.handlers().is_empty(), "still waiting for late spans");
    f.settle();
    let handlers = f.paths.handlers();
    assert_eq!(handlers.len(), 1, "{handlers:?}");
    let tree = f.tree("feed", "GET /feed");
    assert_eq!(child(&tree.root, "handler").children.len(), 2);
    assert_eq!(child(child(&tree.root, "handler"), "db.query").critical_share, 0.3);
}

#[test]
fn a_span_after_its_trace_completed_is_counted_late_not_made_a_handler() {
    let mut f = Fixture::new();
    let mut spans = feed_trace(3);
    let straggler = spans.pop().unwrap();
    f.send(request("feed", spans));
    f.settle();
    f.send(request("feed", vec![straggler]));
    f.settle();
    assert_eq!(f.paths.handlers().len(), 1);
    let text = f.self_metrics();
    assert!(text.contains("periscope_dropped_items_total{component=\"paths\",signal=\"traces\",reason=\"late\"} 1"), "{text}");
    assert!(text.contains("periscope_paths_traces_total{outcome=\"complete\"} 1"), "{text}");
}

#[test]
fn two_services_on_one_node_are_two_handlers_and_one_edge() {
    let mut f = Fixture::new();
    let mut front_root = span(5, 1, 0, "GET /", 0.0, 40.0);
    front_root.attributes = vec![attr("http.route", "/")];
    let call = with_kind(span(5, 2, 1, "GET users", 5.0, 35.0), 3);
    let mut users_root = with_kind(span(5, 3, 2, "GET /users", 10.0, 30.0), 2);
    users_root.attributes = vec![attr("http.route", "/users"), attr("http.method", "GET")];
    let query = span(5, 4, 3, "SELECT users", 12.0, 28.0);
    f.send(request("users", vec![users_root, query]));
    f.send(request("web", vec![front_root, call]));
    f.settle();

    let handlers = f.paths.handlers();
    assert_eq!(handlers.len(), 2, "{handlers:?}");
    let web = f.tree("web", "/");
    assert_eq!(web.root.children.len(), 1);
    let call = child(&web.root, "GET users");
    assert!(call.children.is_empty(), "the other service's spans are its own handler");
    assert!(close(call.self_ms.p50, 30.0));
    let users = f.tree("users", "GET /users");
    assert_eq!(child(&users.root, "SELECT users").count, 1);

    let text = f.exposition();
    assert!(text.contains("traces_service_graph_request_total{client=\"web\",server=\"users\"} 1\n"), "{text}");
    assert!(!text.contains("client=\"users\""), "{text}");
    assert!(text.contains("traces_service_graph_request_server_seconds_bucket{client=\"web\",server=\"users\",le=\"0.025\"} 1\n"), "{text}");
}

#[test]
fn a_client_span_without_its_server_side_is_an_edge_to_its_peer() {
    let mut f = Fixture::new();
    let mut call = with_kind(span(6, 2, 1, "redis GET", 1.0, 2.0), 3);
    call.attributes = vec![attr("server.address", "redis.cache.svc")];
    f.send(request("web", vec![span(6, 1, 0, "GET /", 0.0, 3.0), call]));
    f.settle();
    let text = f.exposition();
    assert!(text.contains("traces_service_graph_request_total{client=\"web\",server=\"redis.cache.svc\"} 1\n"), "{text}");
    assert!(text.contains("traces_service_graph_request_client_seconds_count{client=\"web\",server=\"redis.cache.svc\"} 1\n"), "{text}");
}

#[test]
fn broken_traces_are_analysed_without_panics_and_counted() {
    let mut f = Fixture::new();
    let spans = vec![
        span(7, 1, 0, "root", 10.0, 20.0),
        // Starts before its parent and ends after it: clipped to 10–20.
        span(7, 2, 1, "skewed", 5.0, 25.0),
        // Same id as the root: the first one wins.
        span(7, 1, 0, "duplicate", 0.0, 1.0),
        // Its own parent.
        span(7, 3, 3, "self-parent", 0.0, 1.0),
        // A parent cycle: 4 → 5 → 4.
        span(7, 4, 5, "loop-a", 0.0, 1.0),
        span(7, 5, 4, "loop-b", 0.0, 1.0),
        // Ends before it starts.
        span(7, 6, 1, "backwards", 15.0, 12.0),
        // Parent never arrives: an entry of its own (an internal span, so it is counted).
        span(7, 7, 99, "orphan", 0.0, 1.0),
    ];
    f.send(request("broken", spans));
    f.settle();
    let tree = f.tree("broken", "root");
    let skewed = child(&tree.root, "skewed");
    assert!(close(skewed.duration_ms.p50, 10.0), "{}", skewed.duration_ms.p50);
    assert_eq!(child(&tree.root, "backwards").duration_ms.p50, 0.0);
    assert!(f.tree("broken", "orphan").traces == 1);
    let text = f.self_metrics();
    for (kind, count) in
        [("duplicate_span", 1), ("cycle", 3), ("clock_skew", 1), ("negative_duration", 1), ("missing_parent", 1)]
    {
        let line = format!("periscope_paths_anomalies_total{{kind=\"{kind}\"}} {count}\n");
        assert!(text.contains(&line), "{line}\n{text}");
    }
}

#[test]
fn handlers_beyond_the_bound_are_counted_under_the_overflow_handler() {
    let mut f = Fixture::with(PathsConfig { trace_timeout: TIMEOUT, max_handlers: 10, ..PathsConfig::default() });
    for trace in 1..=100u128 {
        let mut root = span(trace, 1, 0, "GET", 0.0, 1.0);
        root.attributes = vec![attr("http.route", &format!("/item/{trace}"))];
        f.send(request("leaky", vec![root, span(trace, 2, 1, &format!("step-{trace}"), 0.0, 1.0)]));
    }
    f.settle();
    let handlers = f.paths.handlers();
    assert_eq!(handlers.len(), 11);
    assert_eq!(handlers[0].service, handlers::OVERFLOW);
    assert_eq!(handlers[0].traces, 90);
    let overflow = f.tree(handlers::OVERFLOW, handlers::OVERFLOW);
    assert!(overflow.root.children.is_empty(), "the overflow handler keeps no steps");
    let text = f.self_metrics();
    assert!(text.contains("periscope_paths_anomalies_total{kind=\"handler_overflow\"} 90\n"), "{text}");
    assert!(!text.contains("step_overflow"), "{text}");
}

#[test]
fn folded_stacks_are_weighted_by_self_time_in_microseconds() {
    let mut f = Fixture::new();
    f.send(request("feed", feed_trace(1)));
    f.send(request("feed", feed_trace(2)));
    f.settle();
    let Some(Ok(Rendered::Text(folded))) = f.paths.tree("feed", "GET /feed", TreeFormat::Folded) else {
        panic!("no folded output")
    };
    let lines: Vec<&str> = folded.lines().collect();
    assert_eq!(
        lines,
        [
            "GET /feed;auth 20000",
            "GET /feed;handler 100000",
            "GET /feed;handler;db.query 60000",
            "GET /feed;handler;cache.get 40000",
            "GET /feed;render 20000",
        ]
    );
    let Some(Ok(Rendered::Text(svg))) = f.paths.tree("feed", "GET /feed", TreeFormat::Svg) else {
        panic!("no svg output")
    };
    assert!(svg.starts_with("<?xml"), "{}", &svg[..100.min(svg.len())]);
    assert!(svg.contains("db.query"));
}

#[test]
fn memory_stays_bounded_under_unique_trace_ids_and_routes() {
    let config = PathsConfig { trace_timeout: Duration::from_secs(3600), max_traces_in_flight: 500, max_handlers: 50, ..PathsConfig::default() };
    let mut f = Fixture::with(config);
    for trace in 1..=20_000u128 {
        let mut root = span(trace, 1, 0, "GET", 0.0, 1.0);
        root.attributes = vec![attr("http.route", &format!("/u/{trace}"))];
        f.send(request("svc", vec![root]));
    }
    assert_eq!(f.processor.assembler.traces_in_flight(), 500);
    assert_eq!(f.paths.handlers().len(), 51);
    let text = f.self_metrics();
    assert!(text.contains("periscope_paths_traces_total{outcome=\"evicted\"} 19500\n"), "{text}");
    assert!(text.contains("periscope_paths_traces_in_flight 500\n"), "{text}");
}

#[test]
fn steps_beyond_the_bound_are_cut_and_counted() {
    let mut f = Fixture::new();
    let mut spans = vec![span(1, 1, 0, "fan-out", 0.0, 10.0)];
    for i in 0..300u64 {
        spans.push(span(1, 10 + i, 1, &format!("call-{i}"), 1.0, 2.0));
    }
    f.send(request("wide", spans));
    f.settle();
    let tree = f.tree("wide", "fan-out");
    assert_eq!(tree.root.children.len(), handlers::MAX_STEPS - 1);
    let cut = 300 - (handlers::MAX_STEPS - 1);
    assert!(f.self_metrics().contains(&format!("periscope_paths_anomalies_total{{kind=\"step_overflow\"}} {cut}\n")));
}
