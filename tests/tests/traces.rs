//! Traces end to end: the OpenTelemetry Rust SDK sends spans to the agent's OTLP receivers
//! (gRPC and HTTP/protobuf), and a stand-in for Jaeger's collector checks what the agent's
//! Jaeger exporter delivers: every field unchanged apart from the node's `host.name`, every
//! span exactly once, through outages, rejections and shutdown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Array, Context, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_proto::tonic::common::v1::{
    any_value, InstrumentationScope as ProtoScope, KeyValue as ProtoKeyValue,
};
use opentelemetry_proto::tonic::trace::v1::{
    span as proto_span, status as proto_status, Span as ProtoSpan, Status as ProtoStatus,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use periscope_e2e::spans::{array_kv, bool_kv, by_key, double_kv, hex, int_kv, string_kv};
use periscope_e2e::{Agent, Collector, FlatSpan, Reply, Script, TestConfig};

const NODE: &str = "test-node";
const SERVICE: &str = "checkout";
const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.26.0";
/// Spans of the bulk trace, on top of the four hand-made ones.
const BULK_SPANS: usize = 40;

// ---------------------------------------------------------------------------------------
// The client: the SDK with its OTLP exporter, and a workload whose every field is known.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Wire {
    Grpc,
    Http,
}

/// An SDK tracer provider exporting to the agent's receiver over `wire`, with the batch span
/// processor an application would use. Built inside the runtime, as the tonic client needs.
fn sdk_provider(config: &TestConfig, wire: Wire) -> SdkTracerProvider {
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
    let resource = Resource::builder_empty()
        .with_service_name(SERVICE)
        .with_attribute(KeyValue::new("deployment.environment.name", "e2e"))
        .with_schema_url([], SCHEMA_URL)
        .build();
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

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("checkout-service")
        .with_version("2.4.1")
        .with_schema_url(SCHEMA_URL)
        .with_attributes([KeyValue::new("scope.kind", "library")])
        .build()
}

fn expected_scope() -> ProtoScope {
    ProtoScope {
        name: "checkout-service".to_owned(),
        version: "2.4.1".to_owned(),
        attributes: vec![string_kv("scope.kind", "library")],
        dropped_attributes_count: 0,
    }
}

/// The resource attributes the SDK sends, plus the node name the agent adds, sorted by key.
fn expected_resource_attributes() -> Vec<ProtoKeyValue> {
    let mut attributes = vec![
        string_kv("deployment.environment.name", "e2e"),
        string_kv("host.name", NODE),
        string_kv("service.name", SERVICE),
    ];
    attributes.sort_by(|a, b| a.key.cmp(&b.key));
    attributes
}

/// A point in time `offset_us` microseconds and 789 nanoseconds after a fixed base, so any
/// rounding of timestamps shows.
fn at(offset_us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_789 + offset_us * 1_000)
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).expect("after the epoch").as_nanos() as u64
}

/// The flags field the SDK writes: the W3C trace flags, and whether the parent was remote.
fn span_flags(parent_is_remote: bool) -> u32 {
    0x01 | 0x100 | if parent_is_remote { 0x200 } else { 0 }
}

fn proto_status(code: proto_status::StatusCode, message: &str) -> Option<ProtoStatus> {
    Some(ProtoStatus { message: message.to_owned(), code: code as i32 })
}

/// The remote caller of the consumer span: as if it came in a `traceparent` header.
fn remote_parent() -> SpanContext {
    SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
        SpanId::from_hex("00f067aa0ba902b7").expect("span id"),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "opaque")]).expect("trace state"),
    )
}

/// Records the workload with the SDK and returns the spans as they must arrive:
/// - trace 1: a server span with attributes of every type and status OK; its client child
///   with an error status, an event with attributes and a link to the remote trace; a
///   grandchild;
/// - trace 2: a consumer span whose parent is remote, inheriting trace state;
/// - trace 3: a root and `BULK_SPANS` children, for volume.
fn record_workload(provider: &SdkTracerProvider, tag: &str) -> Vec<ProtoSpan> {
    let tracer = provider.tracer_with_scope(scope());
    let mut expected = Vec::new();

    let root_attributes = vec![
        KeyValue::new("http.request.method", "GET"),
        KeyValue::new("http.route", "/api/checkout"),
        KeyValue::new("http.response.status_code", 200_i64),
        KeyValue::new("checkout.ratio", 0.75_f64),
        KeyValue::new("checkout.retried", false),
        KeyValue::new(
            "checkout.tags",
            Value::Array(Array::String(vec![StringValue::from("a"), StringValue::from("b")])),
        ),
        KeyValue::new("checkout.sizes", Value::Array(Array::I64(vec![1, 2, 3]))),
        KeyValue::new("run", tag.to_owned()),
    ];
    let mut root = tracer
        .span_builder("GET /api/checkout")
        .with_kind(SpanKind::Server)
        .with_start_time(at(0))
        .with_attributes(root_attributes)
        .start_with_context(&tracer, &Context::new());
    root.set_status(Status::Ok);
    let root_context = root.span_context().clone();
    let root_cx = Context::new().with_span(root);

    let link_attributes = vec![KeyValue::new("link.reason", "retry-of")];
    let mut charge = tracer
        .span_builder("charge card")
        .with_kind(SpanKind::Client)
        .with_start_time(at(1_000))
        .with_attributes(vec![
            KeyValue::new("payment.provider", "acme-pay"),
            KeyValue::new("payment.amount_cents", 1999_i64),
        ])
        .with_links(vec![Link::new(remote_parent(), link_attributes, 0)])
        .start_with_context(&tracer, &root_cx);
    charge.add_event_with_timestamp(
        "payment.declined",
        at(20_000),
        vec![KeyValue::new("decline.reason", "insufficient funds"), KeyValue::new("decline.attempt", 2_i64)],
    );
    charge.set_status(Status::error("card declined"));
    let charge_context = charge.span_context().clone();
    let charge_cx = root_cx.with_span(charge);

    let mut query = tracer
        .span_builder("SELECT accounts")
        .with_kind(SpanKind::Internal)
        .with_start_time(at(2_000))
        .with_attributes(vec![KeyValue::new("db.system.name", "postgresql")])
        .start_with_context(&tracer, &charge_cx);
    let query_context = query.span_context().clone();
    query.end_with_timestamp(at(9_000));
    charge_cx.span().end_with_timestamp(at(30_000));
    root_cx.span().end_with_timestamp(at(50_000));

    let mut consumer = tracer
        .span_builder("orders process")
        .with_kind(SpanKind::Consumer)
        .with_start_time(at(60_000))
        .with_attributes(vec![KeyValue::new("messaging.system", "kafka")])
        .start_with_context(&tracer, &Context::new().with_remote_span_context(remote_parent()));
    let consumer_context = consumer.span_context().clone();
    consumer.end_with_timestamp(at(61_000));

    let root_id = root_context.span_id().to_bytes().to_vec();
    let trace_1 = root_context.trace_id().to_bytes().to_vec();
    let remote = remote_parent();
    expected.push(ProtoSpan {
        trace_id: trace_1.clone(),
        span_id: root_id.clone(),
        trace_state: String::new(),
        parent_span_id: Vec::new(),
        flags: span_flags(false),
        name: "GET /api/checkout".to_owned(),
        kind: proto_span::SpanKind::Server as i32,
        start_time_unix_nano: nanos(at(0)),
        end_time_unix_nano: nanos(at(50_000)),
        attributes: vec![
            string_kv("http.request.method", "GET"),
            string_kv("http.route", "/api/checkout"),
            int_kv("http.response.status_code", 200),
            double_kv("checkout.ratio", 0.75),
            bool_kv("checkout.retried", false),
            array_kv(
                "checkout.tags",
                vec![any_value::Value::StringValue("a".into()), any_value::Value::StringValue("b".into())],
            ),
            array_kv(
                "checkout.sizes",
                vec![any_value::Value::IntValue(1), any_value::Value::IntValue(2), any_value::Value::IntValue(3)],
            ),
            string_kv("run", tag),
        ],
        status: proto_status(proto_status::StatusCode::Ok, ""),
        ..Default::default()
    });
    expected.push(ProtoSpan {
        trace_id: trace_1.clone(),
        span_id: charge_context.span_id().to_bytes().to_vec(),
        parent_span_id: root_id,
        flags: span_flags(false),
        name: "charge card".to_owned(),
        kind: proto_span::SpanKind::Client as i32,
        start_time_unix_nano: nanos(at(1_000)),
        end_time_unix_nano: nanos(at(30_000)),
        attributes: vec![string_kv("payment.provider", "acme-pay"), int_kv("payment.amount_cents", 1999)],
        events: vec![proto_span::Event {
            time_unix_nano: nanos(at(20_000)),
            name: "payment.declined".to_owned(),
            attributes: vec![string_kv("decline.reason", "insufficient funds"), int_kv("decline.attempt", 2)],
            dropped_attributes_count: 0,
        }],
        links: vec![proto_span::Link {
            trace_id: remote.trace_id().to_bytes().to_vec(),
            span_id: remote.span_id().to_bytes().to_vec(),
            trace_state: "vendor=opaque".to_owned(),
            attributes: vec![string_kv("link.reason", "retry-of")],
            dropped_attributes_count: 0,
            flags: span_flags(true),
        }],
        status: proto_status(proto_status::StatusCode::Error, "card declined"),
        ..Default::default()
    });
    expected.push(ProtoSpan {
        trace_id: trace_1,
        span_id: query_context.span_id().to_bytes().to_vec(),
        parent_span_id: charge_context.span_id().to_bytes().to_vec(),
        flags: span_flags(false),
        name: "SELECT accounts".to_owned(),
        kind: proto_span::SpanKind::Internal as i32,
        start_time_unix_nano: nanos(at(2_000)),
        end_time_unix_nano: nanos(at(9_000)),
        attributes: vec![string_kv("db.system.name", "postgresql")],
        status: proto_status(proto_status::StatusCode::Unset, ""),
        ..Default::default()
    });
    expected.push(ProtoSpan {
        trace_id: remote.trace_id().to_bytes().to_vec(),
        span_id: consumer_context.span_id().to_bytes().to_vec(),
        trace_state: "vendor=opaque".to_owned(),
        parent_span_id: remote.span_id().to_bytes().to_vec(),
        flags: span_flags(true),
        name: "orders process".to_owned(),
        kind: proto_span::SpanKind::Consumer as i32,
        start_time_unix_nano: nanos(at(60_000)),
        end_time_unix_nano: nanos(at(61_000)),
        attributes: vec![string_kv("messaging.system", "kafka")],
        status: proto_status(proto_status::StatusCode::Unset, ""),
        ..Default::default()
    });

    expected.extend(record_bulk(provider, BULK_SPANS, tag));
    expected
}

/// A root span and `children` children, all with known fields; returns them as they must
/// arrive.
fn record_bulk(provider: &SdkTracerProvider, children: usize, tag: &str) -> Vec<ProtoSpan> {
    let tracer = provider.tracer_with_scope(scope());
    let root = tracer
        .span_builder("batch job")
        .with_kind(SpanKind::Internal)
        .with_start_time(at(100_000))
        .with_attributes(vec![KeyValue::new("run", tag.to_owned())])
        .start_with_context(&tracer, &Context::new());
    let root_context = root.span_context().clone();
    let root_cx = Context::new().with_span(root);
    let trace = root_context.trace_id().to_bytes().to_vec();
    let mut expected = Vec::new();
    for i in 0..children {
        let start = at(100_000 + 10 * i as u64);
        let end = at(100_005 + 10 * i as u64);
        let mut child = tracer
            .span_builder(format!("item {i}"))
            .with_kind(SpanKind::Producer)
            .with_start_time(start)
            .with_attributes(vec![KeyValue::new("item.index", i as i64)])
            .start_with_context(&tracer, &root_cx);
        expected.push(ProtoSpan {
            trace_id: trace.clone(),
            span_id: child.span_context().span_id().to_bytes().to_vec(),
            parent_span_id: root_context.span_id().to_bytes().to_vec(),
            flags: span_flags(false),
            name: format!("item {i}"),
            kind: proto_span::SpanKind::Producer as i32,
            start_time_unix_nano: nanos(start),
            end_time_unix_nano: nanos(end),
            attributes: vec![int_kv("item.index", i as i64)],
            status: proto_status(proto_status::StatusCode::Unset, ""),
            ..Default::default()
        });
        child.end_with_timestamp(end);
    }
    root_cx.span().end_with_timestamp(at(200_000));
    expected.push(ProtoSpan {
        trace_id: trace,
        span_id: root_context.span_id().to_bytes().to_vec(),
        flags: span_flags(false),
        name: "batch job".to_owned(),
        kind: proto_span::SpanKind::Internal as i32,
        start_time_unix_nano: nanos(at(100_000)),
        end_time_unix_nano: nanos(at(200_000)),
        attributes: vec![string_kv("run", tag)],
        status: proto_status(proto_status::StatusCode::Unset, ""),
        ..Default::default()
    });
    expected
}

/// Every expected span arrived exactly once, every field as the SDK sent it, with the SDK's
/// resource plus `host.name`, and nothing else arrived.
fn assert_arrived_unchanged(expected: &[ProtoSpan], received: Vec<FlatSpan>) {
    let received = by_key(received);
    for span in expected {
        let key = (span.trace_id.clone(), span.span_id.clone());
        let Some(arrived) = received.get(&key) else {
            panic!("span {:?} ({}/{}) never arrived", span.name, hex(&span.trace_id), hex(&span.span_id));
        };
        assert_eq!(arrived.span, *span, "span {:?} arrived changed", span.name);
        assert_eq!(arrived.sorted_resource_attributes(), expected_resource_attributes(), "resource of {:?}", span.name);
        assert_eq!(arrived.resource_schema_url, SCHEMA_URL, "resource schema URL of {:?}", span.name);
        assert_eq!(arrived.scope, expected_scope(), "scope of {:?}", span.name);
        assert_eq!(arrived.scope_schema_url, SCHEMA_URL, "scope schema URL of {:?}", span.name);
    }
    assert_eq!(received.len(), expected.len(), "spans arrived that were never sent");
}

/// Waits until the stand-in holds `expected` spans and the agent has nothing left to send,
/// then checks them.
async fn assert_delivered(agent: &Agent, collector: &Collector, expected: &[ProtoSpan]) {
    collector.wait_for_spans(expected.len()).await;
    let metrics = agent.wait_until_exporter_idle().await;
    assert_arrived_unchanged(expected, collector.accepted_spans());
    assert_eq!(
        metrics.metric_value("periscope_sent_items_total", &[("component", "jaeger"), ("signal", "traces")]),
        expected.len() as f64,
        "sent items"
    );
}

fn receiver_component(wire: Wire) -> &'static str {
    match wire {
        Wire::Grpc => "otlp_grpc",
        Wire::Http => "otlp_http",
    }
}

// ---------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_spans_over_grpc_arrive_unchanged_at_a_grpc_collector() {
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, Wire::Grpc);

    let expected = record_workload(&provider, "grpc");
    flush(&provider).await;
    assert_delivered(&agent, &collector, &expected).await;

    let metrics = agent.metrics().await;
    assert_eq!(
        metrics.metric_value("periscope_received_items_total", &[("component", "otlp_grpc"), ("signal", "traces")]),
        expected.len() as f64
    );
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("signal", "traces")]), 0.0);
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_spans_over_http_arrive_unchanged_at_an_http_collector() {
    let collector = Collector::http(Script::accept()).await;
    // Small batches: the spans of one SDK request travel on in several exports.
    let config = TestConfig::new().jaeger(collector.exporter_config(&[("batch", "{ max_spans: 7, timeout: 100ms }")]));
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, Wire::Http);

    let expected = record_workload(&provider, "http");
    flush(&provider).await;
    assert_delivered(&agent, &collector, &expected).await;

    let metrics = agent.metrics().await;
    assert_eq!(
        metrics.metric_value("periscope_received_items_total", &[("component", "otlp_http"), ("signal", "traces")]),
        expected.len() as f64
    );
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_from_both_receivers_reach_one_collector() {
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let over_grpc = sdk_provider(&config, Wire::Grpc);
    let over_http = sdk_provider(&config, Wire::Http);

    let mut expected = record_workload(&over_grpc, "grpc");
    expected.extend(record_workload(&over_http, "http"));
    flush(&over_grpc).await;
    flush(&over_http).await;
    assert_delivered(&agent, &collector, &expected).await;
    shutdown(over_grpc).await;
    shutdown(over_http).await;
}

async fn headers_and_gzip_reach_the_collector(collector: Collector, wire: Wire) {
    let config = TestConfig::new().jaeger(
        collector
            .exporter_config(&[("headers", "{ x-tenant: acme, x-scope-orgid: \"team-7\" }"), ("compression", "gzip")]),
    );
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, wire);
    let expected = record_workload(&provider, "headers");
    flush(&provider).await;
    assert_delivered(&agent, &collector, &expected).await;

    let encoding_header = match collector.protocol() {
        "grpc" => "grpc-encoding",
        _ => "content-encoding",
    };
    let requests = collector.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(request.header("x-tenant"), Some("acme"), "headers: {:?}", request.headers);
        assert_eq!(request.header("x-scope-orgid"), Some("team-7"), "headers: {:?}", request.headers);
        assert_eq!(request.header(encoding_header), Some("gzip"), "headers: {:?}", request.headers);
    }
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_headers_and_gzip_reach_a_grpc_collector() {
    headers_and_gzip_reach_the_collector(Collector::grpc(Script::accept()).await, Wire::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_headers_and_gzip_reach_an_http_collector() {
    headers_and_gzip_reach_the_collector(Collector::http(Script::accept()).await, Wire::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_with_a_path_is_used_as_given() {
    let collector = Collector::http(Script::accept()).await;
    let endpoint = format!("{}/v1/traces", collector.endpoint());
    let config = TestConfig::new().jaeger(collector.exporter_config(&[("endpoint", &endpoint)]));
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, Wire::Grpc);
    let expected = record_workload(&provider, "full-url");
    flush(&provider).await;
    assert_delivered(&agent, &collector, &expected).await;
    shutdown(provider).await;
}

// ---------------------------------------------------------------------------------------
// Failures downstream
// ---------------------------------------------------------------------------------------

/// The collector fails the first requests with retryable answers, then recovers: every span
/// arrives exactly once, and the failed attempts are counted.
async fn outage_is_ridden_out(collector: Collector, failures: usize, wire: Wire) {
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, wire);
    let expected = record_workload(&provider, "outage");
    flush(&provider).await;
    assert_delivered(&agent, &collector, &expected).await;

    let requests = collector.requests();
    let rejected: Vec<_> = requests.iter().filter(|r| !r.accepted()).collect();
    assert_eq!(rejected.len(), failures, "the script fails exactly the first {failures} requests");
    assert!(requests.len() > failures, "the agent must try again after the outage");
    // What was refused is what was later delivered: retried, not lost or invented.
    let delivered = by_key(collector.accepted_spans());
    for request in rejected {
        for span in request.spans() {
            assert!(delivered.contains_key(&span.key()), "refused span {:?} was never delivered", span.span.name);
        }
    }

    let metrics = agent.metrics().await;
    let jaeger = [("component", "jaeger"), ("signal", "traces")];
    assert!(metrics.metric_value("periscope_retried_items_total", &jaeger) > 0.0, "{}", metrics.text());
    assert_eq!(metrics.metric_value("periscope_export_errors_total", &jaeger), failures as f64, "{}", metrics.text());
    assert_eq!(
        metrics.metric_value("periscope_export_errors_total", &[("component", "jaeger"), ("kind", "permanent")]),
        0.0
    );
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &jaeger), 0.0, "{}", metrics.text());
    assert_eq!(
        metrics.metric_value(
            "periscope_received_items_total",
            &[("component", receiver_component(wire)), ("signal", "traces")]
        ),
        expected.len() as f64
    );
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_outage_is_retried_and_every_span_arrives_once() {
    let collector =
        Collector::grpc(Script::first(3, Reply::grpc(tonic::Code::Unavailable, "collector restarting"))).await;
    outage_is_ridden_out(collector, 3, Wire::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_collector_retryable_codes_are_retried() {
    let collector = Collector::grpc(Script::then_accept(vec![
        Reply::grpc(tonic::Code::DeadlineExceeded, "slow storage"),
        Reply::grpc(tonic::Code::Aborted, "conflict"),
        Reply::grpc(tonic::Code::DataLoss, "lost"),
    ]))
    .await;
    outage_is_ridden_out(collector, 3, Wire::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_collector_outage_with_retry_after_is_retried_and_every_span_arrives_once() {
    let collector = Collector::http(Script::then_accept(vec![
        Reply::http(503, Some(1), "collector restarting"),
        Reply::http(429, Some(1), "slow down"),
        Reply::http(502, None, "bad gateway"),
        Reply::http(504, None, "gateway timeout"),
    ]))
    .await;
    outage_is_ridden_out(collector, 4, Wire::Http).await;
}

/// The collector rejects everything as invalid: each span is offered exactly once, counted as
/// dropped for a permanent reason, the server's message is logged, and the agent carries on.
async fn permanent_rejection_is_not_retried(collector: Collector, server_message: &str, wire: Wire) {
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, wire);
    let permanent = [("component", "jaeger"), ("signal", "traces"), ("reason", "permanent")];

    let first = record_workload(&provider, "rejected-1");
    flush(&provider).await;
    agent.wait_for_metric("periscope_dropped_items_total", &permanent, |v| v >= first.len() as f64).await;
    let metrics = agent.wait_until_exporter_idle().await;
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &permanent), first.len() as f64);
    assert_eq!(metrics.metric_value("periscope_sent_items_total", &[("component", "jaeger")]), 0.0);
    assert_eq!(metrics.metric_value("periscope_retried_items_total", &[("component", "jaeger")]), 0.0);
    assert!(
        metrics.metric_value("periscope_export_errors_total", &[("component", "jaeger"), ("kind", "permanent")]) >= 1.0
    );

    // Each span was offered once: never retried.
    let offered: Vec<FlatSpan> = collector.requests().iter().flat_map(|r| r.spans()).collect();
    assert_eq!(offered.len(), first.len(), "spans offered to the collector, retries included");
    assert_eq!(by_key(offered).len(), first.len());
    assert!(collector.requests().iter().all(|r| !r.accepted()));

    let stderr = agent.stderr();
    assert!(
        stderr.contains(server_message),
        "the agent should log the collector's message {server_message:?}:\n{stderr}"
    );

    // Still serving: new spans are accepted and meet the same fate.
    assert_eq!(agent.get("/healthz").await.0, 200);
    let second = record_bulk(&provider, 5, "rejected-2");
    flush(&provider).await;
    let total = (first.len() + second.len()) as f64;
    agent.wait_for_metric("periscope_dropped_items_total", &permanent, |v| v >= total).await;
    let metrics = agent.wait_until_exporter_idle().await;
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &permanent), total);
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_invalid_argument_is_dropped_without_retry() {
    let message = "span rejected: attribute limit exceeded (code 7731)";
    let collector = Collector::grpc(Script::always(Reply::grpc(tonic::Code::InvalidArgument, message))).await;
    permanent_rejection_is_not_retried(collector, message, Wire::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_400_is_dropped_without_retry() {
    let message = "payload rejected: bad span kind (code 4412)";
    let collector = Collector::http(Script::always(Reply::http(400, None, message))).await;
    permanent_rejection_is_not_retried(collector, message, Wire::Http).await;
}

// ---------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_held_batches_and_exits_zero() {
    let collector = Collector::grpc(Script::accept()).await;
    // Batches that would wait an hour: only the shutdown can send them.
    let config = TestConfig::new().jaeger(collector.exporter_config(&[("batch", "{ max_spans: 10000, timeout: 1h }")]));
    let mut agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, Wire::Grpc);
    let expected = record_workload(&provider, "shutdown");
    flush(&provider).await;
    agent
        .wait_for_metric("periscope_received_items_total", &[("component", "otlp_grpc"), ("signal", "traces")], |v| {
            v == expected.len() as f64
        })
        .await;
    // Held, not sent: in the exporter's queue, not at the collector.
    let metrics = agent.metrics().await;
    let queued = metrics.metric_value("periscope_queue_items", &[("component", "jaeger"), ("signal", "traces")]);
    assert_eq!(queued, expected.len() as f64, "{}", metrics.text());
    assert_eq!(collector.accepted_spans().len(), 0, "the batch should be held until it is full or an hour old");

    let status = agent.stop().await;
    assert!(status.success(), "exit status {status}");
    assert_arrived_unchanged(&expected, collector.accepted_spans());
    shutdown(provider).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_collector_down_still_exits_zero() {
    let collector =
        Collector::grpc(Script::always(Reply::grpc(tonic::Code::Unavailable, "down for maintenance"))).await;
    let mut config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    config.shutdown_timeout = "1s".to_owned();
    let mut agent = Agent::start(&config.yaml()).await;
    let provider = sdk_provider(&config, Wire::Grpc);
    let expected = record_bulk(&provider, 9, "doomed");
    flush(&provider).await;
    collector.wait_for_requests(1).await;

    let status = agent.stop().await;
    assert!(status.success(), "exit status {status}");
    assert!(collector.accepted_spans().is_empty());
    let offered = by_key(collector.requests()[0].spans());
    assert!(expected.iter().any(|s| offered.contains_key(&(s.trace_id.clone(), s.span_id.clone()))));
    shutdown(provider).await;
}
