//! The Loki exporter: log records to Loki's push API (`POST /loki/api/v1/push`), protobuf
//! with snappy block compression as Loki's own clients send, or JSON for debugging.
//!
//! Log records arrive as OTLP (from the OTLP receivers and from file tailing alike) and are
//! turned into Loki streams here:
//!
//! - **Labels** (low cardinality only): `service_name` from `service.name`, `namespace`,
//!   `pod`, `container` and `node` from `k8s.namespace.name`, `k8s.pod.name`,
//!   `k8s.container.name` and `k8s.node.name` (or `host.name`), `stream` from the record's
//!   `log.iostream`, other `k8s.*.name` resource attributes as `k8s_*_name` (as Loki's own
//!   OTLP ingestion indexes them), plus the resource attributes that the resource names in
//!   `loki.resource.labels` (a comma-separated list; file tailing uses it for `job` and the
//!   configured static labels). Label names are made valid for Loki
//!   (`[a-zA-Z_][a-zA-Z0-9_]*`).
//! - **Line**: the record's body (a string as is; other values as JSON).
//! - **Structured metadata**: `level` (the severity text, or the severity number's name),
//!   `trace_id` and `span_id` (hex).
//! - **Time**: the record's time, else its observed time.
//!
//! Entries of one stream are sent in time order within a request.

pub mod push;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use prost::Message;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::driver::{Encoder, ExportSettings};
use super::otlp::{error_chain, header_map, parse_retry_after};
use super::{tls, BuildError, Delivered, ExportError, Exporter};
use crate::config::{LokiConfig, LokiEncoding};
use crate::signal::Logs;
use crate::telemetry::Responses;

pub const KEY: &str = "exporters.loki";

/// The resource attribute listing further resource attributes to use as labels.
pub const RESOURCE_LABELS_HINT: &str = "loki.resource.labels";

/// Resource attributes that become labels, and their label names.
const RESOURCE_LABELS: [(&str, &str); 5] = [
    ("service.name", "service_name"),
    ("k8s.namespace.name", "namespace"),
    ("k8s.pod.name", "pod"),
    ("k8s.container.name", "container"),
    ("k8s.node.name", "node"),
];

pub fn build(config: &LokiConfig, responses: Responses) -> Result<(LokiExporter, LokiEncoder, ExportSettings), BuildError> {
    let tls_key = format!("{KEY}.tls");
    let tls = tls::rustls_client_config(config.tls.as_ref(), &tls_key)?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("periscope/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BuildError::new(KEY, format!("HTTP client setup failed: {e}")))?;
    let mut headers = header_map(KEY, &config.headers)?;
    let content_type = match config.encoding {
        LokiEncoding::Protobuf => "application/x-protobuf",
        LokiEncoding::Json => "application/json",
    };
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(tenant) = config.tenant_id.as_deref().filter(|t| !t.is_empty()) {
        let value = HeaderValue::from_str(tenant)
            .map_err(|e| BuildError::new(format!("{KEY}.tenant_id"), format!("not a valid header value: {e}")))?;
        headers.insert("x-scope-orgid", value);
    }
    let exporter = LokiExporter { client, url: config.url.clone(), headers, responses };
    let encoder = LokiEncoder { encoding: config.encoding };
    let settings = ExportSettings {
        max_batch_items: config.queue.max_entries.max(1),
        max_batch_bytes: config.batch.max_bytes.as_usize().max(1),
        batch_timeout: config.batch.timeout,
        queue_items: config.queue.max_entries,
        concurrency: config.concurrency,
        request_timeout: config.timeout,
        retry: config.retry.clone(),
    };
    Ok((exporter, encoder, settings))
}

/// One log line on its way to Loki.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub time_unix_nano: u64,
    pub line: String,
    pub metadata: Vec<(&'static str, String)>,
}

/// Entries grouped by stream (the labels in selector form).
#[derive(Default)]
pub struct Streams {
    streams: HashMap<String, Vec<Entry>>,
}

impl Streams {
    pub fn entries(&self) -> usize {
        self.streams.values().map(Vec::len).sum()
    }
}

/// Builds push requests from OTLP logs.
pub struct LokiEncoder {
    encoding: LokiEncoding,
}

impl LokiEncoder {
    pub fn new(encoding: LokiEncoding) -> Self {
        LokiEncoder { encoding }
    }
}

impl Encoder<Logs> for LokiEncoder {
    type Batch = Streams;

    fn append(&self, batch: &mut Streams, data: &Logs) -> usize {
        let mut bytes = 0;
        for resource_logs in &data.resource_logs {
            let attributes = resource_logs.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
            let base = resource_labels(attributes);
            // A resource's records differ in their labels only by stream: one selector each.
            let mut selectors: Vec<(Option<&str>, String)> = Vec::with_capacity(3);
            for scope in &resource_logs.scope_logs {
                for record in &scope.log_records {
                    let stream = string_attribute(&record.attributes, "log.iostream");
                    let selector = match selectors.iter().find(|(s, _)| *s == stream) {
                        Some((_, selector)) => selector,
                        None => {
                            let mut labels = base.clone();
                            if let Some(stream) = stream {
                                labels.push(("stream".into(), stream.to_owned()));
                            }
                            selectors.push((stream, selector(labels)));
                            &selectors[selectors.len() - 1].1
                        }
                    };
                    let entry = entry(record);
                    bytes += entry.line.len() + selector.len() / 8 + 16;
                    match batch.streams.get_mut(selector.as_str()) {
                        Some(entries) => entries.push(entry),
                        None => {
                            batch.streams.insert(selector.clone(), vec![entry]);
                        }
                    }
                }
            }
        }
        bytes
    }

    fn finish(&self, batch: Streams) -> Bytes {
        let mut streams: Vec<(String, Vec<Entry>)> = batch.streams.into_iter().collect();
        streams.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, entries) in &mut streams {
            entries.sort_by_key(|e| e.time_unix_nano);
        }
        match self.encoding {
            LokiEncoding::Protobuf => {
                let request = push::PushRequest {
                    streams: streams
                        .into_iter()
                        .map(|(labels, entries)| push::StreamAdapter {
                            labels,
                            entries: entries
                                .into_iter()
                                .map(|e| push::EntryAdapter {
                                    timestamp: Some(push::Timestamp::from_unix_nanos(e.time_unix_nano)),
                                    line: e.line,
                                    structured_metadata: e
                                        .metadata
                                        .into_iter()
                                        .map(|(name, value)| push::LabelPairAdapter { name: name.into(), value })
                                        .collect(),
                                })
                                .collect(),
                            hash: 0,
                        })
                        .collect(),
                };
                let raw = request.encode_to_vec();
                // Compressing into a buffer of max_compress_len cannot fail; an empty body
                // would be refused by Loki and counted, should it ever.
                let mut compressed = vec![0; snap::raw::max_compress_len(raw.len())];
                match snap::raw::Encoder::new().compress(&raw, &mut compressed) {
                    Ok(n) => {
                        compressed.truncate(n);
                        Bytes::from(compressed)
                    }
                    Err(_) => Bytes::new(),
                }
            }
            LokiEncoding::Json => {
                let streams: Vec<serde_json::Value> = streams
                    .into_iter()
                    .map(|(labels, entries)| {
                        let values: Vec<serde_json::Value> = entries
                            .into_iter()
                            .map(|e| {
                                let metadata: serde_json::Map<String, serde_json::Value> =
                                    e.metadata.into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
                                serde_json::json!([e.time_unix_nano.to_string(), e.line, metadata])
                            })
                            .collect();
                        serde_json::json!({ "stream": parse_selector(&labels), "values": values })
                    })
                    .collect();
                Bytes::from(serde_json::json!({ "streams": streams }).to_string())
            }
        }
    }
}

/// The labels a resource gives its records.
fn resource_labels(attributes: &[KeyValue]) -> Vec<(String, String)> {
    let mut labels = Vec::with_capacity(8);
    for (attribute, label) in RESOURCE_LABELS {
        if let Some(value) = string_attribute(attributes, attribute) {
            labels.push((label.to_owned(), value.to_owned()));
        }
    }
    // Other Kubernetes workload names (deployment, statefulset, cluster, ...) as Loki's own
    // OTLP ingestion indexes them: `k8s_deployment_name`.
    for kv in attributes {
        let key = kv.key.as_str();
        if key.starts_with("k8s.") && key.ends_with(".name") && !RESOURCE_LABELS.iter().any(|(a, _)| *a == key) {
            if let Some(value) = string_attribute(attributes, key) {
                labels.push((label_name(key), value.to_owned()));
            }
        }
    }
    if !labels.iter().any(|(name, _)| name == "node") {
        if let Some(host) = string_attribute(attributes, "host.name") {
            labels.push(("node".to_owned(), host.to_owned()));
        }
    }
    if let Some(hint) = string_attribute(attributes, RESOURCE_LABELS_HINT) {
        for attribute in hint.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            if let Some(value) = string_attribute(attributes, attribute) {
                let name = label_name(attribute);
                labels.retain(|(existing, _)| *existing != name);
                labels.push((name, value.to_owned()));
            }
        }
    }
    labels
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref() {
        Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    })
}

/// A label name Loki accepts: `[a-zA-Z_][a-zA-Z0-9_]*`, other characters as `_`.
pub fn label_name(name: &str) -> String {
    let mut out: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// `{a="x", b="y"}`, sorted by name; a stream needs at least one label.
fn selector(mut labels: Vec<(String, String)>) -> String {
    if labels.is_empty() {
        labels.push(("service_name".into(), "unknown_service".into()));
    }
    labels.sort();
    labels.dedup_by(|a, b| a.0 == b.0);
    let mut out = String::with_capacity(64);
    out.push('{');
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// The labels of a selector this module wrote, as a JSON object.
fn parse_selector(selector: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    let inner = selector.trim_start_matches('{').trim_end_matches('}');
    let mut rest = inner;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim_start_matches([',', ' ']).to_owned();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        map.insert(name, value.into());
        rest = &rest[end.min(rest.len())..];
    }
    map
}

fn entry(record: &LogRecord) -> Entry {
    let time_unix_nano = match (record.time_unix_nano, record.observed_time_unix_nano) {
        (0, 0) => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
        (0, observed) => observed,
        (time, _) => time,
    };
    let mut metadata = Vec::with_capacity(3);
    if let Some(level) = level(record) {
        metadata.push(("level", level));
    }
    if record.trace_id.iter().any(|&b| b != 0) {
        metadata.push(("trace_id", hex(&record.trace_id)));
    }
    if record.span_id.iter().any(|&b| b != 0) {
        metadata.push(("span_id", hex(&record.span_id)));
    }
    Entry { time_unix_nano, line: body_text(record.body.as_ref()), metadata }
}

fn level(record: &LogRecord) -> Option<String> {
    if !record.severity_text.is_empty() {
        return Some(record.severity_text.to_ascii_lowercase());
    }
    let name = match record.severity_number {
        1..=4 => "trace",
        5..=8 => "debug",
        9..=12 => "info",
        13..=16 => "warn",
        17..=20 => "error",
        21..=24 => "fatal",
        _ => return None,
    };
    Some(name.to_owned())
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A record's body as a line: strings as they are, anything else as JSON.
pub fn body_text(body: Option<&AnyValue>) -> String {
    match body.and_then(|b| b.value.as_ref()) {
        None => String::new(),
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(other) => any_to_json(other).to_string(),
    }
}

fn any_to_json(value: &any_value::Value) -> serde_json::Value {
    use any_value::Value;
    match value {
        Value::StringValue(s) => s.clone().into(),
        Value::BoolValue(b) => (*b).into(),
        Value::IntValue(i) => (*i).into(),
        Value::DoubleValue(d) => serde_json::Number::from_f64(*d).map_or(serde_json::Value::Null, Into::into),
        Value::BytesValue(b) => hex(b).into(),
        Value::ArrayValue(a) => {
            a.values.iter().map(|v| v.value.as_ref().map_or(serde_json::Value::Null, any_to_json)).collect()
        }
        Value::KvlistValue(kv) => kv
            .values
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.as_ref().and_then(|v| v.value.as_ref()).map_or(serde_json::Value::Null, any_to_json)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        #[allow(unreachable_patterns)]
        _ => serde_json::Value::Null,
    }
}

/// Pushes encoded batches to Loki.
pub struct LokiExporter {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    responses: Responses,
}

impl LokiExporter {
    pub fn target(&self) -> &str {
        &self.url
    }
}

impl Exporter for LokiExporter {
    async fn export(&self, body: Bytes) -> Result<Delivered, ExportError> {
        let url = &self.url;
        let response = self
            .client
            .post(url)
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| {
                self.responses.count("connection_error");
                ExportError::Retryable { reason: format!("POST {url}: {}", error_chain(&e)), after: None }
            })?;
        let status = response.status();
        self.responses.count(status.as_str());
        if status.is_success() {
            return Ok(Delivered::default());
        }
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = response.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut message: String = text.trim().chars().take(512).collect();
        if message.is_empty() {
            message = "(empty body)".into();
        }
        let reason = format!("HTTP {status} from {url}: {message}");
        Err(match status.as_u16() {
            429 => ExportError::Throttled { reason, after: retry_after },
            500..=599 => ExportError::Retryable { reason, after: retry_after },
            _ => ExportError::Permanent(reason),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::logs::v1::{ResourceLogs, ScopeLogs};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
            ..Default::default()
        }
    }

    fn record(time: u64, line: &str) -> LogRecord {
        LogRecord {
            time_unix_nano: time,
            body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.into())) }),
            ..Default::default()
        }
    }

    fn logs(resource: Vec<KeyValue>, records: Vec<LogRecord>) -> Logs {
        Logs {
            resource_logs: vec![ResourceLogs {
                resource: Some(Resource { attributes: resource, ..Default::default() }),
                scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    fn decode(body: Bytes) -> push::PushRequest {
        let raw = snap::raw::Decoder::new().decompress_vec(&body).expect("snappy");
        push::PushRequest::decode(raw.as_slice()).expect("push request")
    }

    #[test]
    fn records_become_streams_of_time_ordered_entries() {
        let encoder = LokiEncoder::new(LokiEncoding::Protobuf);
        let mut batch = Streams::default();
        let resource = vec![
            kv("service.name", "checkout"),
            kv("k8s.namespace.name", "shop"),
            kv("k8s.pod.name", "checkout-7d9"),
            kv("job", "pods"),
            kv("k8s.deployment.name", "checkout"),
            kv("k8s.pod.uid", "1234"),
            kv("team", "payments"),
            kv("not.a.label", "x"),
            kv(RESOURCE_LABELS_HINT, "job,team"),
        ];
        let mut late = record(2_000_000_001, "second");
        late.severity_number = 17;
        late.trace_id = vec![0xab; 16];
        late.span_id = vec![0xcd; 8];
        let mut early = record(1_000_000_000, "first");
        early.attributes = vec![kv("log.iostream", "stderr")];
        let early_stdout = record(1_500_000_000, "middle");
        encoder.append(&mut batch, &logs(resource, vec![late, early, early_stdout]));
        assert_eq!(batch.entries(), 3);
        let request = decode(encoder.finish(batch));
        let selectors: Vec<&str> = request.streams.iter().map(|s| s.labels.as_str()).collect();
        assert_eq!(
            selectors,
            [
                r#"{job="pods", k8s_deployment_name="checkout", namespace="shop", pod="checkout-7d9", service_name="checkout", stream="stderr", team="payments"}"#,
                r#"{job="pods", k8s_deployment_name="checkout", namespace="shop", pod="checkout-7d9", service_name="checkout", team="payments"}"#,
            ]
        );
        let lines: Vec<&str> = request.streams[1].entries.iter().map(|e| e.line.as_str()).collect();
        assert_eq!(lines, ["middle", "second"], "time order within a stream");
        let second = &request.streams[1].entries[1];
        assert_eq!(second.timestamp, Some(push::Timestamp { seconds: 2, nanos: 1 }));
        let metadata: Vec<(&str, &str)> =
            second.structured_metadata.iter().map(|p| (p.name.as_str(), p.value.as_str())).collect();
        assert_eq!(metadata, [("level", "error"), ("trace_id", "abababababababababababababababab"), ("span_id", "cdcdcdcdcdcdcdcd")]);
    }

    #[test]
    fn label_names_are_made_valid_and_values_escaped() {
        assert_eq!(label_name("k8s.pod-name"), "k8s_pod_name");
        assert_eq!(label_name("1abc"), "_1abc");
        assert_eq!(selector(vec![("a".into(), "say \"hi\"\\".into())]), r#"{a="say \"hi\"\\"}"#);
        assert_eq!(selector(vec![]), r#"{service_name="unknown_service"}"#);
    }

    #[test]
    fn json_encoding_carries_the_same_streams() {
        let encoder = LokiEncoder::new(LokiEncoding::Json);
        let mut batch = Streams::default();
        encoder.append(&mut batch, &logs(vec![kv("service.name", "a \"b\"")], vec![record(5, "x")]));
        let body: serde_json::Value = serde_json::from_slice(&encoder.finish(batch)).unwrap();
        assert_eq!(body["streams"][0]["stream"]["service_name"], "a \"b\"");
        assert_eq!(body["streams"][0]["values"][0][0], "5");
        assert_eq!(body["streams"][0]["values"][0][1], "x");
    }

    #[test]
    fn non_string_bodies_are_written_as_json() {
        let body = AnyValue {
            value: Some(any_value::Value::KvlistValue(opentelemetry_proto::tonic::common::v1::KeyValueList {
                values: vec![kv("msg", "hi")],
            })),
        };
        assert_eq!(body_text(Some(&body)), r#"{"msg":"hi"}"#);
    }
}
