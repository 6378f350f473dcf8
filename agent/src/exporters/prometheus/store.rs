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

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::convert::{self, Labels, Value};
use crate::signal::scrape::{RenderFamily, Scrape};
use crate::signal::Metrics;
use std::sync::Arc;
use crate::telemetry::exposition::{Collect, ExemplarText, Exposition, Type};
use crate::telemetry::Drops;

pub use super::convert::SCRAPE_SCOPE;
/// A series not updated this long is removed.
pub const EXPIRY: Duration = Duration::from_secs(300);


struct Series {
    value: Value,
    updated: Instant,
    /// The most recent exemplars, newest last.
    exemplars: Vec<ExemplarText>,
}

/// Exemplars kept per series.
const EXEMPLARS: usize = 8;

fn keep_exemplars(kept: &mut Vec<ExemplarText>, new: Vec<ExemplarText>) {
    kept.extend(new);
    if kept.len() > EXEMPLARS {
        kept.drain(..kept.len() - EXEMPLARS);
    }
}

struct Family {
    kind: Type,
    help: String,
    series: HashMap<Labels, Series>,
}

struct Inner {
    families: BTreeMap<String, Family>,
    target_info: HashMap<Labels, Instant>,
    count: usize,
    /// The latest scrape of each target (job, instance): its series are exactly what the
    /// target exposed last, so vanished series are gone with the next scrape.
    scrapes: HashMap<(Arc<str>, Arc<str>), (Arc<Scrape>, Instant)>,
}

pub struct Store {
    inner: Mutex<Inner>,
    max_series: usize,
    drops: Drops,
}




impl Store {
    pub fn new(max_series: usize, drops: Drops) -> Store {
        Store {
            inner: Mutex::new(Inner { families: BTreeMap::new(), target_info: HashMap::new(), count: 0, scrapes: HashMap::new() }),
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
        let converted = convert::convert(request);
        let mut inner = self.lock();
        for info in converted.target_info {
            inner.target_info.insert(info, now);
        }
        let mut dropped = 0u64;
        for family in converted.families {
            dropped += self.family(&mut inner, family, now);
        }
        drop(inner);
        self.drops.add("series_limit", dropped);
    }

    /// Takes a target's latest scrape, in place of its previous one.
    pub fn ingest_scrape(&self, scrape: Arc<Scrape>) {
        let key = (scrape.job.clone(), scrape.instance.clone());
        if scrape.table.is_empty() {
            // The target is gone.
            self.lock().scrapes.remove(&key);
        } else {
            self.lock().scrapes.insert(key, (scrape, Instant::now()));
        }
    }

    /// Returns how many new series did not fit.
    fn family(&self, inner: &mut Inner, converted: convert::Family, now: Instant) -> u64 {
        let count = &mut inner.count;
        let family = inner.families.entry(converted.name).or_insert_with(|| Family {
            kind: converted.kind,
            help: converted.help,
            series: HashMap::new(),
        });
        let mut dropped = 0;
        for point in converted.points {
            if point.stale {
                if family.series.remove(&point.labels).is_some() {
                    *count -= 1;
                }
                continue;
            }
            match family.series.get_mut(&point.labels) {
                Some(series) => {
                    series.value = if point.delta { convert::add(&series.value, point.value) } else { point.value };
                    series.updated = now;
                    keep_exemplars(&mut series.exemplars, point.exemplars);
                }
                None if *count < self.max_series => {
                    let mut exemplars = Vec::new();
                    keep_exemplars(&mut exemplars, point.exemplars);
                    family.series.insert(point.labels, Series { value: point.value, updated: now, exemplars });
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
        inner.scrapes.retain(|_, (_, at)| now.duration_since(*at) < EXPIRY);
    }

    pub fn series(&self) -> usize {
        let inner = self.lock();
        inner.count + inner.scrapes.values().map(|(s, _)| s.values.len()).sum::<usize>()
    }
}



impl Collect for Store {
    fn collect(&self, out: &mut Exposition) {
        let mut inner = self.lock();
        Self::expire(&mut inner, Instant::now());
        // Scraped families by name, merged with the OTLP ones of the same name (one # TYPE).
        let mut scraped: BTreeMap<&str, Vec<(&Scrape, &RenderFamily)>> = BTreeMap::new();
        let mut targets: Vec<&Scrape> = inner.scrapes.values().map(|(s, _)| &**s).collect();
        targets.sort_by(|a, b| (&a.job, &a.instance).cmp(&(&b.job, &b.instance)));
        for scrape in targets {
            for family in scrape.table.families() {
                scraped.entry(&family.name).or_default().push((scrape, family));
            }
        }
        let mut names: Vec<&str> = inner.families.keys().map(String::as_str).chain(scraped.keys().copied()).collect();
        names.sort_unstable();
        names.dedup();
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for name in names {
            let parts = scraped.get(name);
            match (inner.families.get(name), parts.and_then(|p| p.first())) {
                (Some(family), _) => out.family(name, &family.help, family.kind),
                (None, Some((_, family))) => out.family(name, &family.help, family.kind),
                (None, None) => continue,
            }
            for (scrape, family) in parts.into_iter().flatten() {
                for &i in &family.series {
                    let mut sample = "";
                    pairs.clear();
                    for (key, value) in scrape.table.labels(i as usize) {
                        if key == "__name__" {
                            sample = value;
                        } else {
                            pairs.push((key, value));
                        }
                    }
                    out.sample_exemplar(sample, &pairs, None, scrape.values[i as usize], scrape.exemplar(i));
                }
            }
            let Some(family) = inner.families.get(name) else { continue };
            let mut series: Vec<(&Labels, &Series)> = family.series.iter().collect();
            series.sort_by(|a, b| a.0.cmp(b.0));
            for (labels, s) in series {
                let pairs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                match &s.value {
                    Value::Number(v) => {
                        let exemplar = (family.kind == Type::Counter).then(|| s.exemplars.last()).flatten();
                        out.sample_exemplar(name, &pairs, None, *v, exemplar);
                    }
                    Value::Histogram { bounds, counts, sum, count } => {
                        let mut cumulative = 0;
                        let bucket = format!("{name}_bucket");
                        let mut below = f64::NEG_INFINITY;
                        let in_bucket = |low: f64, high: f64| s.exemplars.iter().rev().find(|e| e.value > low && e.value <= high);
                        for (i, c) in counts.iter().enumerate() {
                            cumulative += c;
                            let le = bounds.get(i).copied().unwrap_or(f64::INFINITY);
                            if le.is_infinite() {
                                break;
                            }
                            out.sample_exemplar(&bucket, &pairs, Some(le), cumulative as f64, in_bucket(below, le));
                            below = le;
                        }
                        out.sample_exemplar(&bucket, &pairs, Some(f64::INFINITY), *count as f64, in_bucket(below, f64::INFINITY));
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


#[cfg(test)]
mod tests {
    use super::*;
    use super::convert::NO_RECORDED_VALUE;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, AggregationTemporality, Metric};
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
    fn exemplars_are_written_in_openmetrics_on_their_bucket() {
        use opentelemetry_proto::tonic::metrics::v1::{exemplar, Exemplar};
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
                    exemplars: vec![Exemplar {
                        trace_id: vec![0xab; 16],
                        value: Some(exemplar::Value::AsDouble(0.5)),
                        time_unix_nano: 1_700_000_000_000_000_000,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        };
        store.ingest(&request("app", vec![histogram]));
        let mut out = Exposition::openmetrics();
        store.collect(&mut out);
        let text = out.into_text();
        let line = text.lines().find(|l| l.contains("le=\"1\"")).unwrap();
        assert_eq!(line, "rpc_duration_seconds_bucket{instance=\"pod-1\",job=\"shop\",le=\"1\"} 3 # {trace_id=\"abababababababababababababababab\"} 0.5 1700000000.000");
        assert!(!text.lines().find(|l| l.contains("le=\"0.1\"")).unwrap().contains('#'));
        assert!(text.ends_with("# EOF\n"));
        // The text format has no exemplars.
        assert!(!render(&store).contains("trace_id"));
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
