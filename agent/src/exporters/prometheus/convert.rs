//! OTLP metrics as Prometheus series, per the OpenTelemetry→Prometheus compatibility rules:
//! names via [`super::naming`], `job` and `instance` from `service.namespace`/`service.name`
//! and `service.instance.id`, the other resource attributes in `target_info`, exponential
//! histograms as classic buckets. Metrics in the scrape scope ([`SCRAPE_SCOPE`]) keep their
//! names and labels as scraped.
//!
//! Shared by the pull endpoint's store and remote_write; what to do with delta temporality
//! and stale points is theirs to decide.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exemplar, exponential_histogram_data_point::Buckets, metric, number_data_point, AggregationTemporality, Exemplar,
    Metric,
};

use super::naming;
use crate::signal::Metrics;
use crate::telemetry::exposition::{ExemplarText, Type};

/// The instrumentation scope of metrics scraped from Prometheus endpoints.
pub const SCRAPE_SCOPE: &str = "periscope.scrape";
/// OTLP's `DataPointFlags.FLAG_NO_RECORDED_VALUE`: the series went away (stale).
pub const NO_RECORDED_VALUE: u32 = 1;

/// Label pairs, sorted by name.
pub type Labels = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    /// `counts` per bucket (not cumulative); one more count than bounds, for +Inf.
    Histogram { bounds: Vec<f64>, counts: Vec<u64>, sum: f64, count: u64 },
    Summary { quantiles: Vec<(f64, f64)>, sum: f64, count: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub labels: Labels,
    pub value: Value,
    /// Unix milliseconds.
    pub time_ms: i64,
    pub stale: bool,
    /// The value is a delta to add to the previous one.
    pub delta: bool,
    /// Exemplars of the point: `trace_id` / `span_id` and the filtered attributes as labels.
    pub exemplars: Vec<ExemplarText>,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn exemplars(list: &[Exemplar]) -> Vec<ExemplarText> {
    list.iter()
        .map(|e| {
            let mut labels = Vec::new();
            if !e.trace_id.is_empty() {
                labels.push(("trace_id".to_owned(), hex(&e.trace_id)));
            }
            if !e.span_id.is_empty() {
                labels.push(("span_id".to_owned(), hex(&e.span_id)));
            }
            for kv in &e.filtered_attributes {
                if let Some(value) = string_value(kv.value.as_ref()) {
                    labels.push((naming::label_name(&kv.key), value));
                }
            }
            let value = match e.value {
                Some(exemplar::Value::AsDouble(d)) => d,
                Some(exemplar::Value::AsInt(i)) => i as f64,
                None => 0.0,
            };
            let timestamp = (e.time_unix_nano > 0).then(|| e.time_unix_nano as f64 / 1e9);
            ExemplarText { labels, value, timestamp }
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: Type,
    pub help: String,
    pub points: Vec<Point>,
}

#[derive(Debug, Default)]
pub struct Converted {
    pub families: Vec<Family>,
    /// `target_info` label sets, one per resource of OTLP (not scraped) metrics.
    pub target_info: Vec<Labels>,
}

pub fn string_value(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref())
}

fn labels_of(attributes: &[KeyValue], raw: bool) -> Labels {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = string_value(kv.value.as_ref())?;
            let name = if raw { kv.key.clone() } else { naming::label_name(&kv.key) };
            Some((name, value))
        })
        .collect()
}

pub fn convert(request: &Metrics) -> Converted {
    let mut out = Converted::default();
    for resource_metrics in &request.resource_metrics {
        let resource = resource_metrics.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
        let service = string_value(attribute(resource, "service.name"));
        let namespace = string_value(attribute(resource, "service.namespace"));
        let job = match (namespace, service) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            (None, Some(name)) => Some(name),
            _ => None,
        };
        let instance = string_value(attribute(resource, "service.instance.id"));
        let mut target: Labels = Vec::new();
        target.extend(job.map(|j| ("job".to_owned(), j)));
        target.extend(instance.map(|i| ("instance".to_owned(), i)));
        for scope in &resource_metrics.scope_metrics {
            let raw = scope.scope.as_ref().is_some_and(|s| s.name == SCRAPE_SCOPE);
            if !raw && !target.is_empty() && !scope.metrics.is_empty() {
                let mut info = target.clone();
                for kv in resource {
                    if matches!(kv.key.as_str(), "service.name" | "service.namespace" | "service.instance.id") {
                        continue;
                    }
                    if let Some(value) = string_value(kv.value.as_ref()) {
                        info.push((naming::label_name(&kv.key), value));
                    }
                }
                info.sort();
                if !out.target_info.contains(&info) {
                    out.target_info.push(info);
                }
            }
            for metric in &scope.metrics {
                if let Some(family) = family(metric, &target, raw) {
                    out.families.push(family);
                }
            }
        }
    }
    out
}

fn family(metric: &Metric, target: &Labels, raw: bool) -> Option<Family> {
    let data = metric.data.as_ref()?;
    let (kind, counter, gauge) = match data {
        metric::Data::Gauge(_) => (Type::Gauge, false, true),
        metric::Data::Sum(sum) if sum.is_monotonic => (Type::Counter, true, false),
        metric::Data::Sum(_) => (Type::Gauge, false, true),
        metric::Data::Histogram(_) | metric::Data::ExponentialHistogram(_) => (Type::Histogram, false, false),
        metric::Data::Summary(_) => (Type::Summary, false, false),
    };
    let name = if raw { metric.name.clone() } else { naming::metric_name(&metric.name, &metric.unit, counter, gauge) };
    let with_target = |attributes: &[KeyValue]| {
        let mut labels = labels_of(attributes, raw);
        for (k, v) in target {
            if !labels.iter().any(|(name, _)| name == k) {
                labels.push((k.clone(), v.clone()));
            }
        }
        labels.sort();
        labels
    };
    let number = |v: &Option<number_data_point::Value>| match v {
        Some(number_data_point::Value::AsDouble(d)) => *d,
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        None => 0.0,
    };
    let point = |attributes: &[KeyValue], time: u64, flags: u32, delta: bool, value: Value, examples: &[Exemplar]| Point {
        labels: with_target(attributes),
        value,
        time_ms: (time / 1_000_000) as i64,
        stale: flags & NO_RECORDED_VALUE != 0,
        delta,
        exemplars: exemplars(examples),
    };
    let delta_of = |t: i32| t == AggregationTemporality::Delta as i32;
    let points = match data {
        metric::Data::Gauge(g) => g
            .data_points
            .iter()
            .map(|p| point(&p.attributes, p.time_unix_nano, p.flags, false, Value::Number(number(&p.value)), &p.exemplars))
            .collect(),
        metric::Data::Sum(s) => s
            .data_points
            .iter()
            .map(|p| {
                let value = Value::Number(number(&p.value));
                point(&p.attributes, p.time_unix_nano, p.flags, delta_of(s.aggregation_temporality), value, &p.exemplars)
            })
            .collect(),
        metric::Data::Histogram(h) => h
            .data_points
            .iter()
            .map(|p| {
                let value = Value::Histogram {
                    bounds: p.explicit_bounds.clone(),
                    counts: p.bucket_counts.clone(),
                    sum: p.sum.unwrap_or(0.0),
                    count: p.count,
                };
                point(&p.attributes, p.time_unix_nano, p.flags, delta_of(h.aggregation_temporality), value, &p.exemplars)
            })
            .collect(),
        metric::Data::ExponentialHistogram(h) => h
            .data_points
            .iter()
            .map(|p| {
                let (bounds, counts) = exponential_to_classic(p.scale, p.zero_count, p.positive.as_ref(), p.negative.as_ref());
                let value = Value::Histogram { bounds, counts, sum: p.sum.unwrap_or(0.0), count: p.count };
                point(&p.attributes, p.time_unix_nano, p.flags, delta_of(h.aggregation_temporality), value, &p.exemplars)
            })
            .collect(),
        metric::Data::Summary(s) => s
            .data_points
            .iter()
            .map(|p| {
                let quantiles = p.quantile_values.iter().map(|q| (q.quantile, q.value)).collect();
                point(&p.attributes, p.time_unix_nano, p.flags, false, Value::Summary { quantiles, sum: p.sum, count: p.count }, &[])
            })
            .collect(),
    };
    Some(Family { name, kind, help: metric.description.clone(), points })
}

/// An exponential histogram as classic buckets: each bucket's upper bound is base^(index+1);
/// negative values and zeros all fall in the bucket at 0.
fn exponential_to_classic(scale: i32, zero_count: u64, positive: Option<&Buckets>, negative: Option<&Buckets>) -> (Vec<f64>, Vec<u64>) {
    let base = 2f64.powf(2f64.powi(-scale));
    let mut bounds = Vec::new();
    let mut counts = Vec::new();
    let below_zero: u64 = negative.map_or(0, |n| n.bucket_counts.iter().sum());
    bounds.push(0.0);
    counts.push(below_zero + zero_count);
    if let Some(positive) = positive {
        for (i, &c) in positive.bucket_counts.iter().enumerate() {
            let index = positive.offset + i as i32;
            bounds.push(base.powi(index + 1));
            counts.push(c);
        }
    }
    // The +Inf bucket.
    counts.push(0);
    (bounds, counts)
}

/// A delta added to a cumulative value. Histograms whose bounds differ (exponential
/// histograms exported at different ranges) are merged over the union of their bounds: a
/// bucket keeps its upper bound, so cumulative counts stay exact at every bound either had.
pub fn add(old: &Value, new: Value) -> Value {
    match (old, new) {
        (Value::Number(a), Value::Number(b)) => Value::Number(a + b),
        (
            Value::Histogram { bounds, counts, sum, count },
            Value::Histogram { bounds: new_bounds, counts: new_counts, sum: new_sum, count: new_count },
        ) => {
            if *bounds == new_bounds && counts.len() == new_counts.len() {
                return Value::Histogram {
                    counts: counts.iter().zip(&new_counts).map(|(a, b)| a + b).collect(),
                    bounds: new_bounds,
                    sum: sum + new_sum,
                    count: count + new_count,
                };
            }
            let mut merged: Vec<(f64, u64)> = Vec::with_capacity(bounds.len() + new_bounds.len() + 1);
            let mut push = |bounds: &[f64], counts: &[u64]| {
                for (i, c) in counts.iter().enumerate() {
                    merged.push((bounds.get(i).copied().unwrap_or(f64::INFINITY), *c));
                }
            };
            push(bounds, counts);
            push(&new_bounds, &new_counts);
            merged.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut out_bounds = Vec::new();
            let mut out_counts: Vec<u64> = Vec::new();
            for (bound, c) in merged {
                match out_bounds.last() {
                    Some(last) if *last == bound => {
                        if let Some(total) = out_counts.last_mut() {
                            *total += c;
                        }
                    }
                    _ => {
                        out_bounds.push(bound);
                        out_counts.push(c);
                    }
                }
            }
            // The +Inf bucket has no bound of its own.
            if out_bounds.last().is_some_and(|b| b.is_infinite()) {
                out_bounds.pop();
            } else {
                out_counts.push(0);
            }
            Value::Histogram { bounds: out_bounds, counts: out_counts, sum: sum + new_sum, count: count + new_count }
        }
        (_, new) => new,
    }
}

/// The Prometheus samples of a point: (metric name, labels, value).
pub fn samples(name: &str, point: &Point) -> Vec<(String, Labels, f64)> {
    match &point.value {
        Value::Number(v) => vec![(name.to_owned(), point.labels.clone(), *v)],
        Value::Histogram { bounds, counts, sum, count } => {
            let mut out = Vec::with_capacity(bounds.len() + 3);
            let mut cumulative = 0;
            for (i, c) in counts.iter().enumerate() {
                cumulative += c;
                let le = match bounds.get(i) {
                    Some(b) if b.is_finite() => format_le(*b),
                    _ => break,
                };
                out.push((format!("{name}_bucket"), with_label(&point.labels, "le", le), cumulative as f64));
            }
            out.push((format!("{name}_bucket"), with_label(&point.labels, "le", "+Inf".into()), *count as f64));
            out.push((format!("{name}_sum"), point.labels.clone(), *sum));
            out.push((format!("{name}_count"), point.labels.clone(), *count as f64));
            out
        }
        Value::Summary { quantiles, sum, count } => {
            let mut out: Vec<(String, Labels, f64)> = quantiles
                .iter()
                .map(|(q, v)| (name.to_owned(), with_label(&point.labels, "quantile", q.to_string()), *v))
                .collect();
            out.push((format!("{name}_sum"), point.labels.clone(), *sum));
            out.push((format!("{name}_count"), point.labels.clone(), *count as f64));
            out
        }
    }
}

fn format_le(bound: f64) -> String {
    bound.to_string()
}

fn with_label(labels: &Labels, name: &str, value: String) -> Labels {
    let mut out = labels.clone();
    out.push((name.to_owned(), value));
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_with_different_bounds_add_up_over_their_union() {
        let a = Value::Histogram { bounds: vec![0.0, 1.0, 2.0], counts: vec![0, 1, 0, 0], sum: 1.0, count: 1 };
        let b = Value::Histogram { bounds: vec![0.0, 4.0, 8.0], counts: vec![0, 0, 1, 0], sum: 6.0, count: 1 };
        let Value::Histogram { bounds, counts, sum, count } = add(&a, b) else { panic!("not a histogram") };
        assert_eq!(bounds, vec![0.0, 1.0, 2.0, 4.0, 8.0]);
        assert_eq!(counts, vec![0, 1, 0, 0, 1, 0]);
        assert_eq!((sum, count), (7.0, 2));
    }
}
