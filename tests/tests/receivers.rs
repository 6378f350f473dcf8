//! The OTLP receivers under raw clients: bad input of every kind is refused with the right
//! status and a message while other senders carry on, OTLP/JSON and protobuf arrive intact,
//! resources get the node's name, metrics and logs are accepted and counted, and a full
//! pipeline tells senders to come back later.

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, Span, Status};
use periscope_e2e::otlp::{self, gzip, post, post_protobuf, trace_request};
use periscope_e2e::spans::{array_kv, bool_kv, by_key, double_kv, flatten, int_kv, string_attribute, string_kv};
use periscope_e2e::{Agent, Collector, FlatSpan, Reply, Script, TestConfig};
use prost::Message as _;

const NODE: &str = "test-node";
const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// The spans of `request` as they must arrive: `host.name` added to each resource that has
/// neither it nor `k8s.node.name`, resource attributes sorted for comparison.
fn as_delivered(request: &ExportTraceServiceRequest, node_key: &str) -> Vec<FlatSpan> {
    flatten(request)
        .into_iter()
        .map(|span| {
            let has_node = span.resource.attributes.iter().any(|kv| kv.key == "host.name" || kv.key == "k8s.node.name");
            let span = if has_node { span } else { span.with_resource_attribute(node_key, NODE) };
            normalized(span)
        })
        .collect()
}

fn normalized(mut span: FlatSpan) -> FlatSpan {
    span.resource.attributes = span.sorted_resource_attributes();
    span
}

/// Checks that exactly `expected` arrived, each span unchanged.
fn assert_exactly(expected: Vec<FlatSpan>, received: Vec<FlatSpan>) {
    let received = by_key(received.into_iter().map(normalized));
    let expected = by_key(expected);
    for (key, span) in &expected {
        match received.get(key) {
            Some(arrived) => assert_eq!(arrived, span, "span {:?} arrived changed", span.span.name),
            None => panic!("span {:?} never arrived", span.span.name),
        }
    }
    let unexpected: Vec<_> = received.keys().filter(|k| !expected.contains_key(*k)).collect();
    assert!(unexpected.is_empty(), "spans arrived that were never accepted: {unexpected:?}");
}

fn resource_of(service: &str, extra: &[(&str, &str)]) -> Resource {
    let mut resource = otlp::resource(service);
    resource.attributes.extend(extra.iter().map(|(k, v)| string_kv(k, v)));
    resource
}

/// A request whose single span has the given ids, otherwise valid.
fn request_with_ids(trace_id: Vec<u8>, span_id: Vec<u8>) -> ExportTraceServiceRequest {
    let mut request = trace_request("bad-ids", 250, 1);
    let span = &mut request.resource_spans[0].scope_spans[0].spans[0];
    span.trace_id = trace_id;
    span.span_id = span_id;
    request
}

/// A valid request larger than `bytes` on the wire (mostly zeros, so it compresses well).
fn request_larger_than(bytes: usize, seed: u8) -> ExportTraceServiceRequest {
    let mut request = trace_request("big", seed, 1);
    request.resource_spans[0].scope_spans[0].spans[0].attributes.push(string_kv("padding", &"0".repeat(bytes)));
    request
}

// ---------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------

struct HttpCase {
    name: &'static str,
    content_type: &'static str,
    content_encoding: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    outcome: &'static str,
}

const MAX_REQUEST: usize = 16 * 1024;

fn bad_http_cases() -> Vec<HttpCase> {
    let good = trace_request("good", 9, 2).encode_to_vec();
    let case = |name, content_type, content_encoding, body, status, outcome| HttpCase {
        name,
        content_type,
        content_encoding,
        body,
        status,
        outcome,
    };
    let truncated_gzip = {
        let compressed = gzip(&good);
        compressed[..compressed.len() / 2].to_vec()
    };
    vec![
        // Field 1 says 100 bytes follow; two do.
        case("malformed protobuf", PROTOBUF, None, vec![0x0a, 0x64, 0x01, 0x02], 400, "malformed"),
        case("protobuf of the wrong message", PROTOBUF, None, vec![0x08, 0x07], 400, "malformed"),
        case("bad JSON", JSON, None, br#"{"resourceSpans": [ {"#.to_vec(), 400, "malformed"),
        case("JSON of the wrong shape", JSON, None, br#"{"resourceSpans": "none"}"#.to_vec(), 400, "malformed"),
        case("unsupported content type", "text/plain", None, good.clone(), 415, "unsupported_media_type"),
        case("unsupported content encoding", PROTOBUF, Some("br"), good.clone(), 415, "unsupported_media_type"),
        case("truncated gzip", PROTOBUF, Some("gzip"), truncated_gzip, 400, "malformed"),
        case("gzip that is not gzip", PROTOBUF, Some("gzip"), good.clone(), 400, "malformed"),
        case(
            "oversize body",
            PROTOBUF,
            None,
            request_larger_than(4 * MAX_REQUEST, 150).encode_to_vec(),
            413,
            "too_large",
        ),
        case(
            "oversize once inflated",
            PROTOBUF,
            Some("gzip"),
            gzip(&request_larger_than(64 * MAX_REQUEST, 151).encode_to_vec()),
            413,
            "too_large",
        ),
        case(
            "protobuf trace id of 15 bytes",
            PROTOBUF,
            None,
            request_with_ids(vec![7; 15], vec![8; 8]).encode_to_vec(),
            400,
            "malformed",
        ),
        case(
            "protobuf span id of 7 bytes",
            PROTOBUF,
            None,
            request_with_ids(vec![7; 16], vec![8; 7]).encode_to_vec(),
            400,
            "malformed",
        ),
        case(
            "JSON trace id of 15 bytes",
            JSON,
            None,
            json_span("0102030405060708090a0b0c0d0e0f", "0102030405060708").into_bytes(),
            400,
            "malformed",
        ),
        case(
            "JSON trace id that is not hex",
            JSON,
            None,
            json_span("zz02030405060708090a0b0c0d0e0f10", "0102030405060708").into_bytes(),
            400,
            "malformed",
        ),
        case(
            "JSON span id of 9 bytes",
            JSON,
            None,
            json_span("0102030405060708090a0b0c0d0e0f10", "010203040506070809").into_bytes(),
            400,
            "malformed",
        ),
    ]
}

fn json_span(trace_id: &str, span_id: &str) -> String {
    format!(
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":"bad-json"}}}}]}},
            "scopeSpans":[{{"spans":[{{"traceId":"{trace_id}","spanId":"{span_id}","name":"x","kind":1,
            "startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000000000001"}}]}}]}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_is_refused_with_a_message_and_other_senders_carry_on() {
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().max_request_size("16KiB").jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let url = format!("{}/v1/traces", config.http_endpoint());

    let cases = bad_http_cases();
    let mut failures = Vec::new();
    let mut expected = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let answer = post(&url, case.content_type, case.content_encoding, case.body.clone()).await;
        if answer.status != case.status {
            failures.push(format!(
                "{}: expected {}, got {} ({:?})",
                case.name,
                case.status,
                answer.status,
                answer.body_text()
            ));
        } else if answer.body.is_empty() {
            failures.push(format!("{}: {} without a message", case.name, answer.status));
        }
        // Another sender right after: unaffected.
        let good = trace_request("good", i as u8 + 1, 2);
        let answer = post_protobuf(&url, &good).await;
        if answer.status != 200 {
            failures.push(format!("good request after {}: {} {:?}", case.name, answer.status, answer.body_text()));
        } else {
            expected.extend(as_delivered(&good, "host.name"));
        }
    }

    collector.wait_for_spans(expected.len()).await;
    agent.wait_until_exporter_idle().await;
    assert_exactly(expected, collector.accepted_spans());

    let metrics = agent.metrics().await;
    let count = |o: &str| cases.iter().filter(|c| c.outcome == o).count();
    check_outcomes(
        &metrics,
        "otlp_http",
        &[
            ("ok", cases.len()),
            ("malformed", count("malformed")),
            ("too_large", count("too_large")),
            ("unsupported_media_type", count("unsupported_media_type")),
        ],
        &mut failures,
    );
    assert!(failures.is_empty(), "receiver answers that break the contract:\n  {}", failures.join("\n  "));
    assert_eq!(agent.get("/healthz").await.0, 200);
}

/// Compares `periscope_receiver_requests_total` of `component` per outcome with `expected`.
fn check_outcomes(
    metrics: &periscope_e2e::Metrics,
    component: &str,
    expected: &[(&str, usize)],
    failures: &mut Vec<String>,
) {
    for (outcome, count) in expected {
        let value = metrics.metric_value(
            "periscope_receiver_requests_total",
            &[("component", component), ("signal", "traces"), ("outcome", outcome)],
        );
        if value != *count as f64 {
            failures.push(format!("periscope_receiver_requests_total{{component={component},outcome={outcome}}} is {value}, expected {count}"));
        }
    }
}

/// `ExportTraceServiceRequest`'s field 1 (`resource_spans`, a message) sent as a varint.
#[derive(Clone, PartialEq, prost::Message)]
struct WrongWireType {
    #[prost(uint64, tag = "1")]
    resource_spans: u64,
}

const TRACE_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

async fn send_wrong_wire_type(endpoint: &str) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the agent");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<WrongWireType, ExportTraceServiceResponse>::default();
    grpc.unary(
        tonic::Request::new(WrongWireType { resource_spans: 7 }),
        http::uri::PathAndQuery::from_static(TRACE_EXPORT),
        codec,
    )
    .await
    .map(|_| ())
}

async fn send_grpc(endpoint: &str, request: ExportTraceServiceRequest) -> Result<(), tonic::Status> {
    otlp::trace_client(endpoint).await.export(request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_input_is_refused_with_a_message_and_other_senders_carry_on() {
    let collector = Collector::http(Script::accept()).await;
    let config = TestConfig::new().max_request_size("16KiB").jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let endpoint = config.grpc_endpoint();

    let cases: Vec<(&str, tonic::Code, &str)> = vec![
        ("protobuf of the wrong wire type", tonic::Code::InvalidArgument, "malformed"),
        ("trace id of 15 bytes", tonic::Code::InvalidArgument, "malformed"),
        ("empty trace id", tonic::Code::InvalidArgument, "malformed"),
        ("span id of 7 bytes", tonic::Code::InvalidArgument, "malformed"),
        ("oversize request", tonic::Code::ResourceExhausted, "too_large"),
    ];
    let mut failures = Vec::new();
    let mut expected = Vec::new();
    for (i, (name, code, _)) in cases.iter().enumerate() {
        let result = match i {
            0 => send_wrong_wire_type(&endpoint).await,
            1 => send_grpc(&endpoint, request_with_ids(vec![7; 15], vec![8; 8])).await,
            2 => send_grpc(&endpoint, request_with_ids(Vec::new(), vec![8; 8])).await,
            3 => send_grpc(&endpoint, request_with_ids(vec![7; 16], vec![8; 7])).await,
            _ => send_grpc(&endpoint, request_larger_than(4 * MAX_REQUEST, 152)).await,
        };
        match result {
            Ok(()) => failures.push(format!("{name}: accepted")),
            Err(status) if status.code() != *code => {
                failures.push(format!("{name}: expected {code:?}, got {:?} ({:?})", status.code(), status.message()))
            }
            Err(status) if status.message().is_empty() => failures.push(format!("{name}: {code:?} without a message")),
            Err(_) => {}
        }
        let good = trace_request("good", i as u8 + 1, 2);
        match send_grpc(&endpoint, good.clone()).await {
            Ok(()) => expected.extend(as_delivered(&good, "host.name")),
            Err(status) => failures.push(format!("good request after {name}: {status}")),
        }
    }

    collector.wait_for_spans(expected.len()).await;
    agent.wait_until_exporter_idle().await;
    assert_exactly(expected, collector.accepted_spans());

    let metrics = agent.metrics().await;
    let count = |o: &str| cases.iter().filter(|c| c.2 == o).count();
    check_outcomes(
        &metrics,
        "otlp_grpc",
        &[("ok", cases.len()), ("malformed", count("malformed")), ("too_large", count("too_large"))],
        &mut failures,
    );
    assert!(failures.is_empty(), "receiver answers that break the contract:\n  {}", failures.join("\n  "));
}

// ---------------------------------------------------------------------------------------
// Good input arrives intact
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_json_with_hex_ids_arrives_intact() {
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;

    // The OTLP/JSON encoding: hex ids, 64-bit integers as strings, enums as integers.
    let body = r#"{
      "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]},
        "scopeSpans": [{
          "scope": {"name": "json-client", "version": "0.9.1"},
          "spans": [
            {
              "traceId": "5b8efff798038103d269b633813fc60c",
              "spanId": "eee19b7ec3c1b174",
              "name": "GET /orders",
              "kind": 2,
              "startTimeUnixNano": "1700000000123456789",
              "endTimeUnixNano": "1700000000223456789",
              "attributes": [
                {"key": "http.route", "value": {"stringValue": "/orders"}},
                {"key": "http.response.status_code", "value": {"intValue": "503"}},
                {"key": "orders.ratio", "value": {"doubleValue": 0.5}},
                {"key": "orders.cached", "value": {"boolValue": true}},
                {"key": "orders.ids", "value": {"arrayValue": {"values": [{"intValue": "1"}, {"intValue": "2"}]}}}
              ],
              "events": [
                {"timeUnixNano": "1700000000150000000", "name": "retry", "attributes": [{"key": "attempt", "value": {"intValue": "3"}}]}
              ],
              "status": {"code": 2, "message": "upstream unavailable"}
            },
            {
              "traceId": "5b8efff798038103d269b633813fc60c",
              "spanId": "eee19b7ec3c1b175",
              "parentSpanId": "eee19b7ec3c1b174",
              "name": "SELECT orders",
              "kind": 3,
              "startTimeUnixNano": "1700000000130000000",
              "endTimeUnixNano": "1700000000140000000"
            }
          ]
        }]
      }]
    }"#;
    let answer = post(&format!("{}/v1/traces", config.http_endpoint()), JSON, None, body.as_bytes().to_vec()).await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());

    let received = by_key(collector.wait_for_spans(2).await);
    agent.wait_until_exporter_idle().await;
    assert_eq!(received.len(), 2);
    let trace_id = vec![0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f, 0xc6, 0x0c];
    let root_id = vec![0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74];
    let child_id = vec![0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x75];

    let root = &received[&(trace_id.clone(), root_id.clone())];
    assert_eq!(
        root.span,
        Span {
            trace_id: trace_id.clone(),
            span_id: root_id.clone(),
            name: "GET /orders".to_owned(),
            kind: span::SpanKind::Server as i32,
            start_time_unix_nano: 1_700_000_000_123_456_789,
            end_time_unix_nano: 1_700_000_000_223_456_789,
            attributes: vec![
                string_kv("http.route", "/orders"),
                int_kv("http.response.status_code", 503),
                double_kv("orders.ratio", 0.5),
                bool_kv("orders.cached", true),
                array_kv(
                    "orders.ids",
                    vec![
                        opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(1),
                        opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(2)
                    ]
                ),
            ],
            events: vec![span::Event {
                time_unix_nano: 1_700_000_000_150_000_000,
                name: "retry".to_owned(),
                attributes: vec![int_kv("attempt", 3)],
                dropped_attributes_count: 0,
            }],
            status: Some(Status { message: "upstream unavailable".to_owned(), code: status::StatusCode::Error as i32 }),
            ..Default::default()
        }
    );
    let child = &received[&(trace_id.clone(), child_id.clone())];
    assert_eq!(child.span.parent_span_id, root_id);
    assert_eq!(child.span.kind, span::SpanKind::Client as i32);
    assert_eq!(child.span.name, "SELECT orders");
    assert_eq!(
        (child.span.start_time_unix_nano, child.span.end_time_unix_nano),
        (1_700_000_000_130_000_000, 1_700_000_000_140_000_000)
    );
    for span in [root, child] {
        assert_eq!(span.scope.name, "json-client");
        assert_eq!(span.scope.version, "0.9.1");
        assert_eq!(
            span.sorted_resource_attributes(),
            vec![string_kv("host.name", NODE), string_kv("service.name", "json-svc")]
        );
    }
}

/// Three resources: one without a node attribute (gets `host.name`), one with its own
/// `host.name` and one with `k8s.node.name` (both left alone).
fn mixed_resources_request() -> ExportTraceServiceRequest {
    let mut request = trace_request("plain", 40, 3);
    let mut own_host = trace_request("own-host", 41, 2).resource_spans.remove(0);
    own_host.resource = Some(resource_of("own-host", &[("host.name", "sender-host")]));
    let mut on_k8s = trace_request("on-k8s", 42, 2).resource_spans.remove(0);
    on_k8s.resource = Some(resource_of("on-k8s", &[("k8s.node.name", "node-b")]));
    let no_resource = ResourceSpans { resource: None, ..trace_request("none", 43, 1).resource_spans.remove(0) };
    request.resource_spans.extend([own_host, on_k8s, no_resource]);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_arrives_unchanged_apart_from_the_node_name() {
    let collector = Collector::http(Script::accept()).await;
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;

    let over_grpc = mixed_resources_request();
    send_grpc(&config.grpc_endpoint(), over_grpc.clone()).await.expect("gRPC export");
    let mut over_http = trace_request("gzipped", 44, 4);
    over_http.resource_spans.extend(trace_request("gzipped-2", 45, 2).resource_spans);
    let answer = post(
        &format!("{}/v1/traces", config.http_endpoint()),
        PROTOBUF,
        Some("gzip"),
        gzip(&over_http.encode_to_vec()),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());

    let mut expected = as_delivered(&over_grpc, "host.name");
    expected.extend(as_delivered(&over_http, "host.name"));
    collector.wait_for_spans(expected.len()).await;
    agent.wait_until_exporter_idle().await;
    let received = collector.accepted_spans();
    assert_exactly(expected, received.clone());

    let by_service = |service: &str| {
        received
            .iter()
            .find(|s| string_attribute(&s.resource.attributes, "service.name") == Some(service))
            .unwrap_or_else(|| panic!("no span of {service}"))
            .resource
            .attributes
            .clone()
    };
    assert_eq!(string_attribute(&by_service("plain"), "host.name"), Some(NODE));
    assert_eq!(string_attribute(&by_service("own-host"), "host.name"), Some("sender-host"));
    assert_eq!(string_attribute(&by_service("on-k8s"), "host.name"), None);
    assert_eq!(string_attribute(&by_service("on-k8s"), "k8s.node.name"), Some("node-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_kubernetes_the_node_name_goes_to_k8s_node_name() {
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start_with_env(&config.yaml(), &[("KUBERNETES_SERVICE_HOST", "10.96.0.1")]).await;

    let request = mixed_resources_request();
    send_grpc(&config.grpc_endpoint(), request.clone()).await.expect("gRPC export");
    let expected = as_delivered(&request, "k8s.node.name");
    collector.wait_for_spans(expected.len()).await;
    agent.wait_until_exporter_idle().await;
    let received = collector.accepted_spans();
    assert_exactly(expected, received.clone());
    let plain = received
        .iter()
        .find(|s| string_attribute(&s.resource.attributes, "service.name") == Some("plain"))
        .expect("plain");
    assert_eq!(string_attribute(&plain.resource.attributes, "k8s.node.name"), Some(NODE));
    assert_eq!(string_attribute(&plain.resource.attributes, "host.name"), None);
}

// ---------------------------------------------------------------------------------------
// Metrics and logs
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_logs_are_accepted_and_counted() {
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let http = config.http_endpoint();

    let answer = post_protobuf(&format!("{http}/v1/metrics"), &otlp::metrics_request("svc", 3)).await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    let answer = post_protobuf(&format!("{http}/v1/logs"), &otlp::logs_request("svc", 4)).await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    let json_logs = r#"{"resourceLogs":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"svc"}}]},
        "scopeLogs":[{"logRecords":[{"timeUnixNano":"1700000000000000000","severityNumber":9,"body":{"stringValue":"hello"},
        "traceId":"5b8efff798038103d269b633813fc60c","spanId":"eee19b7ec3c1b174"}]}]}]}"#;
    let answer = post(&format!("{http}/v1/logs"), JSON, None, json_logs.as_bytes().to_vec()).await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());

    let mut metrics_client = MetricsServiceClient::connect(config.grpc_endpoint()).await.expect("connect");
    metrics_client.export(otlp::metrics_request("svc", 2)).await.expect("gRPC metrics export");
    let mut logs_client = LogsServiceClient::connect(config.grpc_endpoint()).await.expect("connect");
    logs_client.export(otlp::logs_request("svc", 5)).await.expect("gRPC logs export");

    // Nothing exports metrics or logs yet: all of them are dropped, and counted.
    agent.wait_for_metric("periscope_dropped_items_total", &[("signal", "metrics")], |v| v >= 5.0).await;
    let metrics = agent.wait_for_metric("periscope_dropped_items_total", &[("signal", "logs")], |v| v >= 10.0).await;
    let received = |component: &str, signal: &str| {
        metrics.metric_value("periscope_received_items_total", &[("component", component), ("signal", signal)])
    };
    assert_eq!(received("otlp_http", "metrics"), 3.0, "{}", metrics.text());
    assert_eq!(received("otlp_http", "logs"), 5.0, "{}", metrics.text());
    assert_eq!(received("otlp_grpc", "metrics"), 2.0, "{}", metrics.text());
    assert_eq!(received("otlp_grpc", "logs"), 5.0, "{}", metrics.text());
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("signal", "metrics")]), 5.0);
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("signal", "logs")]), 10.0);
    assert!(collector.requests().is_empty(), "metrics and logs must not reach the trace collector");
}

// ---------------------------------------------------------------------------------------
// Backpressure
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_tells_senders_to_retry_later() {
    let collector =
        Collector::grpc(Script::always(Reply::grpc(tonic::Code::Unavailable, "down for maintenance"))).await;
    let config = TestConfig::new().jaeger(
        collector.exporter_config(&[("queue", "{ max_spans: 10 }"), ("batch", "{ max_spans: 5, timeout: 100ms }")]),
    );
    let agent = Agent::start(&config.yaml()).await;
    let url = format!("{}/v1/traces", config.http_endpoint());

    // Eight spans fill the queue, stuck retrying against a collector that is down.
    let answer = post_protobuf(&url, &trace_request("filler", 1, 8)).await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    collector.wait_for_requests(1).await;

    let answer = post_protobuf(&url, &trace_request("overflow", 2, 5)).await;
    assert!(matches!(answer.status, 429 | 503), "expected 429 or 503, got {}: {}", answer.status, answer.body_text());
    let retry_after = answer.headers.get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(!retry_after.is_empty(), "a retry-later answer carries Retry-After: {:?}", answer.headers);

    let status =
        send_grpc(&config.grpc_endpoint(), trace_request("overflow", 3, 5)).await.expect_err("the queue is full");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");

    let metrics = agent.metrics().await;
    let backpressure = |component: &str| {
        metrics.metric_value(
            "periscope_receiver_requests_total",
            &[("component", component), ("signal", "traces"), ("outcome", "backpressure")],
        )
    };
    assert_eq!(backpressure("otlp_http"), 1.0, "{}", metrics.text());
    assert_eq!(backpressure("otlp_grpc"), 1.0, "{}", metrics.text());
    assert_eq!(
        metrics.metric_value("periscope_received_items_total", &[("component", "otlp_http"), ("signal", "traces")]),
        8.0
    );
    let queued = metrics.metric_value("periscope_queue_items", &[("component", "jaeger"), ("signal", "traces")]);
    assert_eq!(queued, 8.0, "{}", metrics.text());
    assert_eq!(agent.get("/healthz").await.0, 200);
}
