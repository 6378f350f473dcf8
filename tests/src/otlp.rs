//! OTLP requests with known content, and the raw clients that send them: tests that need to
//! control every byte (bad input, exact comparisons) use these instead of an SDK.

use std::io::Write as _;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, InstrumentationScope};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use tonic::transport::Channel;

use crate::spans::{array_kv, bool_kv, double_kv, int_kv, string_kv};

/// Base of the timestamps in generated data: 2023-11-14T22:13:20Z, plus nanoseconds that
/// would be lost by any rounding to micro- or milliseconds.
pub const BASE_TIME_NANOS: u64 = 1_700_000_000_123_456_789;

/// A trace id unique to `seed`.
pub fn trace_id(seed: u8) -> Vec<u8> {
    (0..16u8).map(|i| i.wrapping_mul(17).wrapping_add(seed) | 1).collect()
}

/// A span id unique to (`seed`, `index`).
pub fn span_id(seed: u8, index: u8) -> Vec<u8> {
    vec![0xa0, seed, index, 0x11, 0x22, 0x33, 0x44, index.wrapping_add(1)]
}

/// A resource naming `service`, with one more attribute of the sender's own.
pub fn resource(service: &str) -> Resource {
    Resource {
        attributes: vec![string_kv("service.name", service), string_kv("service.instance.id", "instance-7")],
        ..Default::default()
    }
}

/// One trace of `count` spans with every kind of field set: a root server span and a chain
/// of children, attributes of each type, an event with attributes, a link, an error status,
/// trace state and flags. Ids derive from `seed`, so requests with different seeds never
/// share a span.
pub fn trace_request(service: &str, seed: u8, count: u8) -> ExportTraceServiceRequest {
    let trace = trace_id(seed);
    let spans = (0..count)
        .map(|i| {
            let start = BASE_TIME_NANOS + u64::from(seed) * 1_000_000_000 + u64::from(i) * 1_000_007;
            Span {
                trace_id: trace.clone(),
                span_id: span_id(seed, i),
                trace_state: "vendor=opaque".to_owned(),
                parent_span_id: if i == 0 { Vec::new() } else { span_id(seed, i - 1) },
                flags: 0x101,
                name: if i == 0 { "GET /api/items".to_owned() } else { format!("step-{i}") },
                kind: if i == 0 { span::SpanKind::Server as i32 } else { span::SpanKind::Internal as i32 },
                start_time_unix_nano: start,
                end_time_unix_nano: start + 5_000_003 - u64::from(i),
                attributes: vec![
                    string_kv("http.route", "/api/items"),
                    int_kv("items.count", -42 + i64::from(i)),
                    double_kv("items.ratio", 0.125),
                    bool_kv("items.cached", i % 2 == 0),
                    array_kv(
                        "items.tags",
                        vec![any_value::Value::StringValue("a".into()), any_value::Value::StringValue("b".into())],
                    ),
                    array_kv("items.sizes", vec![any_value::Value::IntValue(1), any_value::Value::IntValue(2)]),
                    crate::spans::kv("items.blob", any_value::Value::BytesValue(vec![0, 1, 2, 255])),
                ],
                dropped_attributes_count: 1,
                events: vec![span::Event {
                    time_unix_nano: start + 1_000,
                    name: "cache.miss".to_owned(),
                    attributes: vec![string_kv("cache.key", "items:7"), int_kv("cache.attempt", 2)],
                    dropped_attributes_count: 0,
                }],
                dropped_events_count: 0,
                links: if i == 0 {
                    Vec::new()
                } else {
                    vec![span::Link {
                        trace_id: trace_id(seed.wrapping_add(100)),
                        span_id: span_id(seed.wrapping_add(100), 0),
                        trace_state: String::new(),
                        attributes: vec![string_kv("link.reason", "follows")],
                        dropped_attributes_count: 0,
                        flags: 0x100,
                    }]
                },
                dropped_links_count: 0,
                status: Some(if i + 1 == count {
                    Status { message: "step failed: timeout".to_owned(), code: status::StatusCode::Error as i32 }
                } else {
                    Status { message: String::new(), code: status::StatusCode::Ok as i32 }
                }),
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource(service)),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "e2e-raw".to_owned(),
                    version: "1.0.0".to_owned(),
                    attributes: vec![string_kv("scope.origin", "tests")],
                    dropped_attributes_count: 0,
                }),
                spans,
                schema_url: "https://opentelemetry.io/schemas/1.26.0".to_owned(),
            }],
            schema_url: "https://opentelemetry.io/schemas/1.26.0".to_owned(),
        }],
    }
}

/// `count` gauges of one data point each.
pub fn metrics_request(service: &str, count: usize) -> ExportMetricsServiceRequest {
    let metrics = (0..count)
        .map(|i| Metric {
            name: format!("queue.depth.{i}"),
            description: "items waiting".to_owned(),
            unit: "{item}".to_owned(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![NumberDataPoint {
                    attributes: vec![string_kv("queue", "orders")],
                    time_unix_nano: BASE_TIME_NANOS,
                    value: Some(number_data_point::Value::AsInt(i as i64)),
                    ..Default::default()
                }],
            })),
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource(service)),
            scope_metrics: vec![ScopeMetrics { metrics, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// `count` log records.
pub fn logs_request(service: &str, count: usize) -> ExportLogsServiceRequest {
    let log_records = (0..count)
        .map(|i| LogRecord {
            time_unix_nano: BASE_TIME_NANOS + i as u64,
            severity_text: "INFO".to_owned(),
            severity_number: 9,
            body: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                value: Some(any_value::Value::StringValue(format!("order {i} shipped"))),
            }),
            trace_id: trace_id(200),
            span_id: span_id(200, i as u8),
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource(service)),
            scope_logs: vec![ScopeLogs { log_records, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// A fresh gRPC trace client (its own connection) to `endpoint`.
pub async fn trace_client(endpoint: &str) -> TraceServiceClient<Channel> {
    TraceServiceClient::connect(endpoint.to_owned())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {endpoint}: {e}"))
}

/// gzip of `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// An answer of an OTLP/HTTP receiver.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `POST url` with a fresh client (its own connection), the given content type, optional
/// content encoding and body.
pub async fn post(url: &str, content_type: &str, content_encoding: Option<&str>, body: Vec<u8>) -> HttpAnswer {
    crate::tls::install_crypto_provider();
    let client = reqwest::Client::builder().build().expect("cannot build an HTTP client");
    let mut request = client.post(url).header(http::header::CONTENT_TYPE, content_type).body(body);
    if let Some(encoding) = content_encoding {
        request = request.header(http::header::CONTENT_ENCODING, encoding);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    HttpAnswer { status, headers, body }
}

/// `POST url` of a protobuf message.
pub async fn post_protobuf(url: &str, message: &impl prost::Message) -> HttpAnswer {
    post(url, "application/x-protobuf", None, message.encode_to_vec()).await
}
