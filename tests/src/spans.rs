//! Spans flattened out of OTLP requests, each with its resource and scope, so tests compare
//! what was sent with what arrived one span at a time, whatever batching happened between.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;

/// A span's identity: (trace id, span id).
pub type SpanKey = (Vec<u8>, Vec<u8>);

/// One span with everything that describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatSpan {
    pub resource: Resource,
    pub resource_schema_url: String,
    pub scope: InstrumentationScope,
    pub scope_schema_url: String,
    pub span: Span,
}

impl FlatSpan {
    pub fn key(&self) -> SpanKey {
        (self.span.trace_id.clone(), self.span.span_id.clone())
    }

    /// This span as it should arrive after the agent added `key: value` to its resource.
    pub fn with_resource_attribute(mut self, key: &str, value: &str) -> FlatSpan {
        self.resource.attributes.push(string_kv(key, value));
        self
    }

    /// The resource attributes sorted by key, for comparisons where the order is not the
    /// sender's (the SDK keeps its resource in a hash map).
    pub fn sorted_resource_attributes(&self) -> Vec<KeyValue> {
        let mut attributes = self.resource.attributes.clone();
        attributes.sort_by(|a, b| a.key.cmp(&b.key));
        attributes
    }
}

/// Every span of a request, in order.
pub fn flatten(request: &ExportTraceServiceRequest) -> Vec<FlatSpan> {
    let mut spans = Vec::new();
    for resource_spans in &request.resource_spans {
        let resource = resource_spans.resource.clone().unwrap_or_default();
        for scope_spans in &resource_spans.scope_spans {
            let scope = scope_spans.scope.clone().unwrap_or_default();
            for span in &scope_spans.spans {
                spans.push(FlatSpan {
                    resource: resource.clone(),
                    resource_schema_url: resource_spans.schema_url.clone(),
                    scope: scope.clone(),
                    scope_schema_url: scope_spans.schema_url.clone(),
                    span: span.clone(),
                });
            }
        }
    }
    spans
}

/// Spans keyed by (trace id, span id). Fails the test, naming the span, when one key occurs
/// twice: a duplicate delivery.
pub fn by_key(spans: impl IntoIterator<Item = FlatSpan>) -> BTreeMap<SpanKey, FlatSpan> {
    let mut map = BTreeMap::new();
    for span in spans {
        let key = span.key();
        if let Some(first) = map.insert(key.clone(), span) {
            panic!("span {} / {} ({:?}) arrived more than once", hex(&key.0), hex(&key.1), first.span.name);
        }
    }
    map
}

/// The value of attribute `key`, if present.
pub fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).and_then(|v| v.value.as_ref())
}

/// The value of string attribute `key`, if present and a string.
pub fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attribute(attributes, key) {
        Some(any_value::Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

pub fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

pub fn string_kv(key: &str, value: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.to_owned()))
}

pub fn int_kv(key: &str, value: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(value))
}

pub fn double_kv(key: &str, value: f64) -> KeyValue {
    kv(key, any_value::Value::DoubleValue(value))
}

pub fn bool_kv(key: &str, value: bool) -> KeyValue {
    kv(key, any_value::Value::BoolValue(value))
}

pub fn array_kv(key: &str, values: Vec<any_value::Value>) -> KeyValue {
    let values = values.into_iter().map(|v| AnyValue { value: Some(v) }).collect();
    kv(key, any_value::Value::ArrayValue(ArrayValue { values }))
}

/// Lower-case hex, as OTLP/JSON writes ids.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
