//! The latest value of every series that reached the metrics pipeline, as Prometheus sees it.
//!
//! OTLP metrics are converted per the OpenTelemetry→Prometheus compatibility rules: names via
//! [`super::naming`], `job` and `instance` from `service.namespace`/`service.name` and
//! `service.instance.id`, the other resource attributes in `target_info`, delta sums and
//! histograms accumulated into cumulative ones, exponential histograms as classic buckets.
//! Scraped metrics (scope [`SCRAPE_SCOPE`]) keep their names and labels as scraped.
//!
//! A data point flagged "no recorded value" (a scraped series that vanished) removes its
//! series at once; a series nobody updated for [`EXPIRY`] is removed too, so a sender that went
//! away leaves no ghost series. At most `max_series` series are kept; further new series are
//! dropped and counted.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric, number_data_point, AggregationTemporality, Metric,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::naming;
use crate::signal::Metrics;
use crate::telemetry::exposition::{Collect, Exposition, Type};
use crate::telemetry::Drops;

/// The instrumentation scope of metrics scraped from Prometheus endpoints.
pub const SCRAPE_SCOPE: &str = "periscope.scrape";
/// A series not updated this long is removed.
pub const EXPIRY: Duration = Duration::from_secs(300);
/// OTLP's `DataPointFlags.FLAG_NO_RECORDED_VALUE`.
const NO_RECORDED_VALUE: u32 = 1;

type Labels = Vec<(String, String)>;

#[derive(Debug, Clone)]
enum Value {
    Number(f64),
    Histogram { bounds: Vec<f64>, counts: Vec<u64>, sum: f64, count: u64 },
    Summary { quantiles: Vec<(f64, f64)>, sum: f64, count: u64 },
}

struct Series {
    value: Value,
    updated: Instant,
}

struct Family {
    kind: Type,
    help: String,
    /// Summaries are written as Prometheus summaries (the exposition writer knows three types).
    summary: bool,
    series: HashMap<Labels, Series>,
}

struct Inner {
    families: BTreeMap<String, Family>,
    target_info: HashMap<Labels, Instant>,
    count: usize,
}

pub struct Store {
    inner: Mutex<Inner>,
    max_series: usize,
    drops: Drops,
}

fn string_value(value: Option<&AnyValue>) -> Option<String> {
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

impl Store {
    pub fn new(max_series: usize, drops: Drops) -> Store {
        Store {
            inner: Mutex::new(Inner { families: BTreeMap::new(), target_info: HashMap::new(), count: 0 }),
            max_series,
            drops,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one request's data points.
    pub fn ingest(&self, request: &Metrics) {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut dropped = 0u64;
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
                if !raw && !target.is_empty() {
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
                    inner.target_info.insert(info, now);
                }
                for metric in &scope.metrics {
                    dropped += self.metric(&mut inner, metric, &target, raw, now);
                }
            }
        }
        drop(inner);
        self.drops.add("series_limit", dropped);
    }

    /// Returns how many new series did not fit.
    fn metric(&self, inner: &mut Inner, metric: &Metric, target: &Labels, raw: bool, now: Instant) -> u64 {
        let Some(data) = &metric.data else { return 0 };
        let (kind, summary, counter, gauge) = match data {
            metric::Data::Gauge(_) => (Type::Gauge, false, false, true),
            metric::Data::Sum(sum) if sum.is_monotonic => (Type::Counter, false, true, false),
            metric::Data::Sum(_) => (Type::Gauge, false, false, true),
            metric::Data::Histogram(_) | metric::Data::ExponentialHistogram(_) => (Type::Histogram, false, false, false),
            metric::Data::Summary(_) => (Type::Gauge, true, false, false),
        };
        let name = if raw { metric.name.clone() } else { naming::metric_name(&metric.name, &metric.unit, counter, gauge) };
        let mut points: Vec<(Labels, u32, bool, Value)> = Vec::new();
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
        match data {
            metric::Data::Gauge(g) => {
                for p in &g.data_points {
                    points.push((with_target(&p.attributes), p.flags, false, Value::Number(number(&p.value))));
                }
            }
            metric::Data::Sum(s) => {
                let delta = s.aggregation_temporality == AggregationTemporality::Delta as i32;
                for p in &s.data_points {
                    points.push((with_target(&p.attributes), p.flags, delta, Value::Number(number(&p.value))));
                }
            }
            metric::Data::Histogram(h) => {
                let delta = h.aggregation_temporality == AggregationTemporality::Delta as i32;
                for p in &h.data_points {
                    let value = Value::Histogram {
                        bounds: p.explicit_bounds.clone(),
                        counts: p.bucket_counts.clone(),
                        sum: p.sum.unwrap_or(0.0),
                        count: p.count,
                    };
                    points.push((with_target(&p.attributes), p.flags, delta, value));
                }
            }
            metric::Data::ExponentialHistogram(h) => {
                let delta = h.aggregation_temporality == AggregationTemporality::Delta as i32;
                for p in &h.data_points {
                    let (bounds, counts) = exponential_to_classic(p.scale, p.zero_count, p.positive.as_ref(), p.negative.as_ref());
                    let value = Value::Histogram { bounds, counts, sum: p.sum.unwrap_or(0.0), count: p.count };
                    points.push((with_target(&p.attributes), p.flags, delta, value));
                }
            }
            metric::Data::Summary(s) => {
                for p in &s.data_points {
                    let quantiles = p.quantile_values.iter().map(|q| (q.quantile, q.value)).collect();
                    let value = Value::Summary { quantiles, sum: p.sum, count: p.count };
                    points.push((with_target(&p.attributes), p.flags, false, value));
                }
            }
        }

        let count = &mut inner.count;
        let family = inner.families.entry(name).or_insert_with(|| Family {
            kind,
            help: metric.description.clone(),
            summary,
            series: HashMap::new(),
        });
        let mut dropped = 0;
        for (labels, flags, delta, value) in points {
            if flags & NO_RECORDED_VALUE != 0 {
                if family.series.remove(&labels).is_some() {
                    *count -= 1;
                }
                continue;
            }
            match family.series.get_mut(&labels) {
                Some(series) => {
                    series.value = if delta { accumulate(&series.value, value) } else { value };
                    series.updated = now;
                }
                None if *count < self.max_series => {
                    family.series.insert(labels, Series { value, updated: now });
                    *count += 1;
                }
                None => dropped += 1,
            }
        }
        dropped
    }

    /// Drops series that nobody updated for [`EXPIRY`].
    fn expire(inner: &mut Inner, now: Instant) {
        let mut removed = 0;
        for family in inner.families.values_mut() {
            let before = family.series.len();
            family.series.retain(|_, s| now.duration_since(s.updated) < EXPIRY);
            removed += before - family.series.len();
        }
        inner.count -= removed;
        inner.families.retain(|_, f| !f.series.is_empty());
        inner.target_info.retain(|_, at| now.duration_since(*at) < EXPIRY);
    }

    pub fn series(&self) -> usize {
        self.lock().count
    }
}

fn accumulate(old: &Value, new: Value) -> Value {
    match (old, new) {
        (Value::Number(a), Value::Number(b)) => Value::Number(a + b),
        (
            Value::Histogram { bounds, counts, sum, count },
            Value::Histogram { bounds: new_bounds, counts: new_counts, sum: new_sum, count: new_count },
        ) if *bounds == new_bounds && counts.len() == new_counts.len() => Value::Histogram {
            bounds: new_bounds,
            counts: counts.iter().zip(&new_counts).map(|(a, b)| a + b).collect(),
            sum: sum + new_sum,
            count: count + new_count,
        },
        (_, new) => new,
    }
}

/// An exponential histogram as classic buckets: each bucket's upper bound is base^(index+1).
fn exponential_to_classic(scale: i32, zero_count: u64, positive: Option<&Buckets>, negative: Option<&Buckets>) -> (Vec<f64>, Vec<u64>) {
    let base = 2f64.powf(2f64.powi(-scale));
    let mut bounds = Vec::new();
    let mut counts = Vec::new();
    // Negative values and zeros all fall at or below 0.
    let below_zero: u64 = negative.map_or(0, |n| n.bucket_counts.iter().sum());
    if below_zero + zero_count > 0 || positive.is_some() {
        bounds.push(0.0);
        counts.push(below_zero + zero_count);
    }
    if let Some(positive) = positive {
        for (i, &c) in positive.bucket_counts.iter().enumerate() {
            let index = positive.offset + i as i32;
            bounds.push(base.powi(index + 1));
            counts.push(c);
        }
    }
    (bounds, counts)
}

impl Collect for Store {
    fn collect(&self, out: &mut Exposition) {
        let mut inner = self.lock();
        Self::expire(&mut inner, Instant::now());
        for (name, family) in &inner.families {
            let mut series: Vec<(&Labels, &Series)> = family.series.iter().collect();
            series.sort_by(|a, b| a.0.cmp(b.0));
            if family.summary {
                out.raw(&format!("# HELP {name} {}\n# TYPE {name} summary\n", escape_help(&family.help)));
            } else {
                out.family(name, &family.help, family.kind);
            }
            for (labels, s) in series {
                let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                match &s.value {
                    Value::Number(v) => out.sample(name, &pairs, *v),
                    Value::Histogram { bounds, counts, sum, count } => {
                        let mut cumulative = 0;
                        let bucket = format!("{name}_bucket");
                        for (i, c) in counts.iter().enumerate() {
                            cumulative += c;
                            let le = bounds.get(i).copied().unwrap_or(f64::INFINITY);
                            if le.is_infinite() {
                                break;
                            }
                            out.sample_le(&bucket, &pairs, le, cumulative as f64);
                        }
                        out.sample_le(&bucket, &pairs, f64::INFINITY, *count as f64);
                        out.sample(&format!("{name}_sum"), &pairs, *sum);
                        out.sample(&format!("{name}_count"), &pairs, *count as f64);
                    }
                    Value::Summary { quantiles, sum, count } => {
                        for (q, v) in quantiles {
                            let q = q.to_string();
                            let mut with_q = pairs.clone();
                            with_q.push(("quantile", &q));
                            out.sample(name, &with_q, *v);
                        }
                        out.sample(&format!("{name}_sum"), &pairs, *sum);
                        out.sample(&format!("{name}_count"), &pairs, *count as f64);
                    }
                }
            }
        }
        if !inner.target_info.is_empty() {
            out.family("target_info", "Target metadata", Type::Gauge);
            let mut infos: Vec<&Labels> = inner.target_info.keys().collect();
            infos.sort();
            for labels in infos {
                let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                out.sample("target_info", &pairs, 1.0);
            }
        }
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Signal;
    use crate::telemetry::Metrics as SelfMetrics;
    use opentelemetry_proto::tonic::metrics::v1::{
        Gauge, Histogram, HistogramDataPoint, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }), ..Default::default() }
    }

    fn request(scope: &str, metrics: Vec<Metric>) -> Metrics {
        Metrics {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "shop"), kv("service.instance.id", "pod-1"), kv("host.arch", "amd64")],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope { name: scope.into(), ..Default::default() }),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn point(value: f64, attrs: Vec<KeyValue>) -> NumberDataPoint {
        NumberDataPoint { attributes: attrs, value: Some(number_data_point::Value::AsDouble(value)), ..Default::default() }
    }

    fn sum(name: &str, unit: &str, temporality: AggregationTemporality, value: f64) -> Metric {
        Metric {
            name: name.into(),
            unit: unit.into(),
            data: Some(metric::Data::Sum(Sum {
                data_points: vec![point(value, vec![kv("http.method", "GET")])],
                aggregation_temporality: temporality as i32,
                is_monotonic: true,
            })),
            ..Default::default()
        }
    }

    fn render(store: &Store) -> String {
        let mut out = Exposition::new();
        store.collect(&mut out);
        out.into_text()
    }

    fn store() -> Store {
        let metrics = SelfMetrics::new();
        Store::new(100, metrics.drops("prometheus", Signal::Metrics))
    }

    #[test]
    fn otlp_metrics_follow_the_compatibility_rules() {
        let store = store();
        store.ingest(&request("app", vec![sum("http.requests", "{request}", AggregationTemporality::Delta, 2.0)]));
        store.ingest(&request("app", vec![sum("http.requests", "{request}", AggregationTemporality::Delta, 3.0)]));
        let text = render(&store);
        assert!(text.contains("# TYPE http_requests_total counter\n"), "{text}");
        assert!(text.contains("http_requests_total{http_method=\"GET\",instance=\"pod-1\",job=\"shop\"} 5\n"), "delta accumulated: {text}");
        assert!(text.contains("target_info{host_arch=\"amd64\",instance=\"pod-1\",job=\"shop\"} 1\n"), "{text}");
    }

    #[test]
    fn scraped_metrics_keep_their_names_and_vanish_when_stale() {
        let store = store();
        let gauge = |flags: u32| Metric {
            name: "queue_depth".into(),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: vec![NumberDataPoint { flags, ..point(7.0, vec![kv("queue", "a.b")]) }],
            })),
            ..Default::default()
        };
        store.ingest(&request(SCRAPE_SCOPE, vec![gauge(0)]));
        let text = render(&store);
        assert!(text.contains("queue_depth{instance=\"pod-1\",job=\"shop\",queue=\"a.b\"} 7\n"), "{text}");
        assert!(!text.contains("target_info"), "{text}");
        store.ingest(&request(SCRAPE_SCOPE, vec![gauge(NO_RECORDED_VALUE)]));
        assert!(!render(&store).contains("queue_depth{"));
        assert_eq!(store.series(), 0);
    }

    #[test]
    fn histograms_are_cumulative_buckets() {
        let store = store();
        let histogram = Metric {
            name: "rpc.duration".into(),
            unit: "s".into(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: vec![HistogramDataPoint {
                    explicit_bounds: vec![0.1, 1.0],
                    bucket_counts: vec![1, 2, 3],
                    sum: Some(9.5),
                    count: 6,
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        };
        store.ingest(&request("app", vec![histogram]));
        let text = render(&store);
        assert!(text.contains("rpc_duration_seconds_bucket{instance=\"pod-1\",job=\"shop\",le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("rpc_duration_seconds_bucket{instance=\"pod-1\",job=\"shop\",le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("rpc_duration_seconds_bucket{instance=\"pod-1\",job=\"shop\",le=\"+Inf\"} 6\n"), "{text}");
        assert!(text.contains("rpc_duration_seconds_count{instance=\"pod-1\",job=\"shop\"} 6\n"), "{text}");
    }

    #[test]
    fn new_series_beyond_the_limit_are_dropped() {
        let metrics = SelfMetrics::new();
        let store = Store::new(2, metrics.drops("prometheus", Signal::Metrics));
        let points: Vec<NumberDataPoint> = (0..5).map(|i| point(1.0, vec![kv("i", &i.to_string())])).collect();
        let gauge = Metric { name: "g".into(), data: Some(metric::Data::Gauge(Gauge { data_points: points })), ..Default::default() };
        store.ingest(&request(SCRAPE_SCOPE, vec![gauge]));
        assert_eq!(store.series(), 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics.registry()).unwrap();
        assert!(text.contains("reason=\"series_limit\"} 3"), "{text}");
    }
}
