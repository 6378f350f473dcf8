//! The data passed between components: OTLP protobuf requests, as received.
//!
//! Keeping the wire types as the in-memory form means a span is decoded once at the edge and
//! encoded once per exporter, with nothing converted in between. Everything the pipeline
//! needs from a payload (how many items it holds, its resources, whether its ids are well
//! formed) is the [`Payload`] trait.

pub mod scrape;
pub mod status;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric;
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::fmt;

pub type Traces = ExportTraceServiceRequest;
pub type Metrics = ExportMetricsServiceRequest;
pub type Logs = ExportLogsServiceRequest;

/// The three kinds of telemetry, each with its own pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    pub const fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    /// What one item of this signal is called, for messages.
    pub const fn item_name(self) -> &'static str {
        match self {
            Signal::Traces => "spans",
            Signal::Metrics => "data points",
            Signal::Logs => "log records",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the pipeline needs to know about one OTLP request.
pub trait Payload: Send + Sync + 'static {
    const SIGNAL: Signal;

    /// Spans, data points or log records in the request.
    fn item_count(&self) -> usize;

    /// Every resource in the request, for enrichment.
    fn resources_mut(&mut self) -> impl Iterator<Item = &mut Resource>;

    /// Rejects ids of the wrong length, naming the first offending field.
    fn check_ids(&self) -> Result<(), String>;
}

fn check_len(field: impl FnOnce() -> String, id: &[u8], allowed: &[usize]) -> Result<(), String> {
    if allowed.contains(&id.len()) {
        Ok(())
    } else {
        let expected = allowed.iter().filter(|&&n| n > 0).map(|n| n.to_string()).collect::<Vec<_>>().join(" or ");
        Err(format!("{}: expected {expected} bytes, got {}", field(), id.len()))
    }
}

impl Payload for Traces {
    const SIGNAL: Signal = Signal::Traces;

    fn item_count(&self) -> usize {
        self.resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum()
    }

    fn resources_mut(&mut self) -> impl Iterator<Item = &mut Resource> {
        self.resource_spans.iter_mut().map(|r| r.resource.get_or_insert_with(Resource::default))
    }

    fn check_ids(&self) -> Result<(), String> {
        for (r, rs) in self.resource_spans.iter().enumerate() {
            for (s, ss) in rs.scope_spans.iter().enumerate() {
                for (i, span) in ss.spans.iter().enumerate() {
                    let at = |field: &str| format!("resource_spans[{r}].scope_spans[{s}].spans[{i}].{field}");
                    check_len(|| at("trace_id"), &span.trace_id, &[16])?;
                    check_len(|| at("span_id"), &span.span_id, &[8])?;
                    check_len(|| at("parent_span_id"), &span.parent_span_id, &[0, 8])?;
                    for (l, link) in span.links.iter().enumerate() {
                        check_len(|| at(&format!("links[{l}].trace_id")), &link.trace_id, &[16])?;
                        check_len(|| at(&format!("links[{l}].span_id")), &link.span_id, &[8])?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl Payload for Metrics {
    const SIGNAL: Signal = Signal::Metrics;

    fn item_count(&self) -> usize {
        self.resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| match &m.data {
                Some(metric::Data::Gauge(g)) => g.data_points.len(),
                Some(metric::Data::Sum(s)) => s.data_points.len(),
                Some(metric::Data::Histogram(h)) => h.data_points.len(),
                Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
                Some(metric::Data::Summary(s)) => s.data_points.len(),
                None => 0,
            })
            .sum()
    }

    fn resources_mut(&mut self) -> impl Iterator<Item = &mut Resource> {
        self.resource_metrics.iter_mut().map(|r| r.resource.get_or_insert_with(Resource::default))
    }

    fn check_ids(&self) -> Result<(), String> {
        Ok(())
    }
}

impl Payload for Logs {
    const SIGNAL: Signal = Signal::Logs;

    fn item_count(&self) -> usize {
        self.resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum()
    }

    fn resources_mut(&mut self) -> impl Iterator<Item = &mut Resource> {
        self.resource_logs.iter_mut().map(|r| r.resource.get_or_insert_with(Resource::default))
    }

    fn check_ids(&self) -> Result<(), String> {
        for (r, rl) in self.resource_logs.iter().enumerate() {
            for (s, sl) in rl.scope_logs.iter().enumerate() {
                for (i, record) in sl.log_records.iter().enumerate() {
                    let at = |field: &str| format!("resource_logs[{r}].scope_logs[{s}].log_records[{i}].{field}");
                    check_len(|| at("trace_id"), &record.trace_id, &[0, 16])?;
                    check_len(|| at("span_id"), &record.span_id, &[0, 8])?;
                }
            }
        }
        Ok(())
    }
}

impl Payload for scrape::Scrape {
    const SIGNAL: Signal = Signal::Metrics;

    fn item_count(&self) -> usize {
        self.values.len() + self.stale_count()
    }

    /// Scraped samples carry their target's labels, not a resource.
    fn resources_mut(&mut self) -> impl Iterator<Item = &mut Resource> {
        std::iter::empty()
    }

    fn check_ids(&self) -> Result<(), String> {
        Ok(())
    }
}

/// A string attribute.
pub fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn traces(spans: Vec<Span>) -> Traces {
        Traces {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    fn span(trace_id: usize, span_id: usize, parent: usize) -> Span {
        Span {
            trace_id: vec![1; trace_id],
            span_id: vec![2; span_id],
            parent_span_id: vec![3; parent],
            ..Default::default()
        }
    }

    #[test]
    fn well_formed_ids_pass() {
        let t = traces(vec![span(16, 8, 0), span(16, 8, 8)]);
        assert_eq!(t.item_count(), 2);
        assert_eq!(t.check_ids(), Ok(()));
    }

    #[test]
    fn wrong_id_lengths_name_the_field() {
        let err = traces(vec![span(16, 8, 0), span(15, 8, 0)]).check_ids().unwrap_err();
        assert_eq!(err, "resource_spans[0].scope_spans[0].spans[1].trace_id: expected 16 bytes, got 15");
        let err = traces(vec![span(16, 9, 0)]).check_ids().unwrap_err();
        assert!(err.ends_with("span_id: expected 8 bytes, got 9"), "{err}");
        let err = traces(vec![span(16, 8, 4)]).check_ids().unwrap_err();
        assert!(err.ends_with("parent_span_id: expected 8 bytes, got 4"), "{err}");
    }
}
