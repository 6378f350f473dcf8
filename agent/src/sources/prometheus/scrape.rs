//! One scrape target: fetch, parse, label, and hand the samples to the metrics pipeline as
//! OTLP (scope [`SCRAPE_SCOPE`], so exporters keep the names as scraped).
//!
//! As Prometheus does with `honor_labels: false`: every series gets `job` and `instance`
//! (the target's `host:port`) and the target's static labels; a scraped label that clashes
//! with one of these is kept as `exported_<name>`. Every scrape also yields `up`,
//! `scrape_duration_seconds` and `scrape_samples_scraped`. Series that were in the previous
//! scrape and are not in this one (or all of them, when the scrape fails) are sent once more
//! flagged "no recorded value", so exporters drop them: no ghost series.

use ahash::RandomState;
use flate2::read::GzDecoder;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exemplar, metric, number_data_point, summary_data_point::ValueAtQuantile, AggregationTemporality, Exemplar, Gauge,
    Histogram, HistogramDataPoint, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary,
    SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::parse::{self, Exposition, Format, Kind};
use crate::config::StaticTarget;
use crate::exporters::prometheus::store::SCRAPE_SCOPE;
use crate::signal::Metrics;

/// Largest body taken from a target, after decompression.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Series kept per target; new series beyond it are dropped and counted.
pub const MAX_SERIES_PER_TARGET: usize = 200_000;

const ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const NO_RECORDED_VALUE: u32 = 1;

/// Why a scrape failed, for the `reason` label and the log.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("GET {url}: {message}")]
    Connect { url: String, message: String },
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url}: {message}")]
    Parse { url: String, message: String },
}

impl ScrapeError {
    pub fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Connect { .. } => "connect",
            ScrapeError::Timeout { .. } => "timeout",
            ScrapeError::Status { .. } => "http_status",
            ScrapeError::TooLarge { .. } => "too_large",
            ScrapeError::Parse { .. } => "parse",
        }
    }
}

/// What one scrape produced.
pub struct Scraped {
    pub request: Metrics,
    pub samples: usize,
    pub error: Option<ScrapeError>,
    /// New series left out because the target has [`MAX_SERIES_PER_TARGET`].
    pub over_limit: usize,
}

/// Attributes of a series, sorted by name.
type Attributes = Vec<(String, String)>;

/// What a series looked like when last sent, so that its staleness marker covers every
/// sample it had (each bucket, each quantile).
#[derive(Clone, Debug, PartialEq)]
enum Shape {
    Number,
    Histogram(Vec<f64>),
    Summary(Vec<f64>),
}

/// A series as sent: metric name and sorted attributes.
#[derive(Clone, PartialEq, Eq, Hash)]
struct SeriesId {
    metric: String,
    attributes: Vec<(String, String)>,
}

pub struct Target {
    pub job: String,
    pub url: String,
    pub instance: String,
    labels: Vec<(String, String)>,
    client: reqwest::Client,
    timeout: Duration,
    previous: HashMap<u64, (SeriesId, Shape), RandomState>,
    hasher: RandomState,
}

/// `host:port` of a URL, as Prometheus names an instance.
pub fn instance_of(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) => {
            let host = uri.host().unwrap_or("");
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            format!("{host}:{port}")
        }
        Err(_) => url.to_owned(),
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Target {
    pub fn new(config: &StaticTarget, client: reqwest::Client, timeout: Duration) -> Target {
        Target {
            job: config.job.clone(),
            url: config.url.clone(),
            instance: instance_of(&config.url),
            labels: config.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            client,
            timeout,
            previous: HashMap::with_hasher(RandomState::new()),
            hasher: RandomState::new(),
        }
    }

    async fn fetch(&self) -> Result<(Vec<u8>, Format), ScrapeError> {
        let url = &self.url;
        let request = self
            .client
            .get(url)
            .header(http::header::ACCEPT, ACCEPT)
            .header(http::header::ACCEPT_ENCODING, "gzip")
            .header("X-Prometheus-Scrape-Timeout-Seconds", format!("{}", self.timeout.as_secs_f64()))
            .timeout(self.timeout);
        let mut response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                ScrapeError::Timeout { url: url.clone(), timeout: self.timeout }
            } else {
                ScrapeError::Connect { url: url.clone(), message: crate::exporters::otlp::error_chain(&e) }
            }
        })?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status { url: url.clone(), status: response.status().as_u16() });
        }
        let header = |name| response.headers().get(name).and_then(|v: &http::HeaderValue| v.to_str().ok()).unwrap_or("").to_owned();
        let format = if header(http::header::CONTENT_TYPE).starts_with("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Text
        };
        let gzip = header(http::header::CONTENT_ENCODING).eq_ignore_ascii_case("gzip");
        let mut body = Vec::new();
        loop {
            let chunk = tokio::time::timeout(self.timeout, response.chunk()).await.map_err(|_| ScrapeError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })?;
            match chunk {
                Ok(Some(bytes)) => {
                    if body.len() + bytes.len() > MAX_BODY_BYTES {
                        return Err(ScrapeError::TooLarge { url: url.clone() });
                    }
                    body.extend_from_slice(&bytes);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(ScrapeError::Connect { url: url.clone(), message: crate::exporters::otlp::error_chain(&e) })
                }
            }
        }
        if gzip {
            let mut inflated = Vec::new();
            GzDecoder::new(&body[..])
                .take(MAX_BODY_BYTES as u64 + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| ScrapeError::Parse { url: url.clone(), message: format!("bad gzip body: {e}") })?;
            if inflated.len() > MAX_BODY_BYTES {
                return Err(ScrapeError::TooLarge { url: url.clone() });
            }
            body = inflated;
        }
        Ok((body, format))
    }

    /// Scrapes once.
    pub async fn scrape(&mut self) -> Scraped {
        let started = Instant::now();
        let fetched = self.fetch().await;
        let time = now_nanos();
        let mut builder = Builder::new(time);
        let mut over_limit = 0;
        let (samples, error) = match fetched {
            Ok((body, format)) => match std::str::from_utf8(&body) {
                Ok(text) => match parse::parse(text, format) {
                    Ok(exposition) => {
                        over_limit = self.convert(&exposition, &mut builder);
                        (exposition.samples.len(), None)
                    }
                    Err(e) => (0, Some(ScrapeError::Parse { url: self.url.clone(), message: e.to_string() })),
                },
                Err(e) => (0, Some(ScrapeError::Parse { url: self.url.clone(), message: format!("body is not UTF-8: {e}") })),
            },
            Err(e) => (0, Some(e)),
        };
        if error.is_some() {
            builder.clear();
        }
        let target = self.target_attributes();
        let up = if error.is_none() { 1.0 } else { 0.0 };
        builder.gauge("up", &target, up, Kind::Gauge);
        builder.gauge("scrape_duration_seconds", &target, started.elapsed().as_secs_f64(), Kind::Gauge);
        builder.gauge("scrape_samples_scraped", &target, samples as f64, Kind::Gauge);

        // Staleness: what was there last time and is not now.
        let mut current: HashMap<u64, (SeriesId, Shape), RandomState> =
            HashMap::with_capacity_and_hasher(builder.ids.len(), RandomState::new());
        for (id, shape) in builder.ids.drain(..) {
            current.insert(self.hash(&id), (id, shape));
        }
        for (hash, (id, shape)) in &self.previous {
            if !current.contains_key(hash) {
                builder.stale(id, shape);
            }
        }
        self.previous = current;
        Scraped { request: builder.finish(&self.job, &self.instance), samples, error, over_limit }
    }

    fn hash(&self, id: &SeriesId) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The labels every series of this target carries as attributes (job and instance travel
    /// on the resource).
    fn target_attributes(&self) -> Vec<(String, String)> {
        self.labels.clone()
    }

    /// A scraped label set with clashing names renamed and the target's labels added.
    fn attributes(&self, exposition: &Exposition<'_>, labels: std::ops::Range<usize>, skip: Option<&str>) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::with_capacity(labels.len() + self.labels.len());
        for label in &exposition.labels[labels] {
            if Some(label.name) == skip {
                continue;
            }
            let clashes = label.name == "job" || label.name == "instance" || self.labels.iter().any(|(k, _)| k == label.name);
            let name = if clashes { format!("exported_{}", label.name) } else { label.name.to_owned() };
            out.push((name, label.value.clone().into_owned()));
        }
        out.extend(self.labels.iter().cloned());
        out.sort();
        out
    }

    /// Returns how many new series were left out over the per-target limit.
    fn convert(&mut self, exposition: &Exposition<'_>, builder: &mut Builder) -> usize {
        let mut over_limit = 0;
        let known = self.previous.len();
        let mut admitted = 0usize;
        let mut admit = |target: &Target, id: &SeriesId| -> bool {
            if target.previous.contains_key(&target.hash(id)) {
                return true;
            }
            if known + admitted < MAX_SERIES_PER_TARGET {
                admitted += 1;
                true
            } else {
                over_limit += 1;
                false
            }
        };
        for family in &exposition.families {
            let samples = &exposition.samples[family.samples.clone()];
            let help = family.help.as_deref().unwrap_or("");
            match family.kind {
                Kind::Histogram => {
                    let mut groups: BTreeMap<Vec<(String, String)>, HistogramDataPoint> = BTreeMap::new();
                    let mut buckets: BTreeMap<Attributes, Vec<(f64, f64)>> = BTreeMap::new();
                    let mut examples: BTreeMap<Attributes, Vec<Exemplar>> = BTreeMap::new();
                    for s in samples {
                        let suffix = &s.name[family.name.len()..];
                        let skip = if suffix == "_bucket" { Some("le") } else { None };
                        let attributes = self.attributes(exposition, s.labels.clone(), skip);
                        let point = groups.entry(attributes.clone()).or_default();
                        match suffix {
                            "_bucket" => {
                                let le = exposition.labels[s.labels.clone()]
                                    .iter()
                                    .find(|l| l.name == "le")
                                    .and_then(|l| parse_le(&l.value));
                                if let Some(e) = &s.exemplar {
                                    examples.entry(attributes.clone()).or_default().push(otlp_exemplar(e, builder.time));
                                }
                                if let Some(le) = le {
                                    buckets.entry(attributes).or_default().push((le, s.value));
                                }
                            }
                            "_sum" => point.sum = Some(s.value),
                            "_count" => point.count = s.value.max(0.0) as u64,
                            _ => {}
                        }
                    }
                    for (attributes, mut point) in groups {
                        let id = SeriesId { metric: family.name.to_owned(), attributes };
                        if !admit(self, &id) {
                            continue;
                        }
                        let mut cumulative = buckets.remove(&id.attributes).unwrap_or_default();
                        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
                        let mut previous = 0.0;
                        for (le, count) in cumulative {
                            if le.is_infinite() {
                                point.bucket_counts.push((count - previous).max(0.0) as u64);
                                previous = count;
                                continue;
                            }
                            point.explicit_bounds.push(le);
                            point.bucket_counts.push((count - previous).max(0.0) as u64);
                            previous = count;
                        }
                        if point.bucket_counts.len() == point.explicit_bounds.len() {
                            point.bucket_counts.push((point.count as f64 - previous).max(0.0) as u64);
                        }
                        point.exemplars = examples.remove(&id.attributes).unwrap_or_default();
                        builder.histogram(id, help, point);
                    }
                }
                Kind::Summary => {
                    let mut groups: BTreeMap<Vec<(String, String)>, SummaryDataPoint> = BTreeMap::new();
                    for s in samples {
                        let suffix = &s.name[family.name.len()..];
                        let quantile = exposition.labels[s.labels.clone()].iter().find(|l| l.name == "quantile");
                        let skip = if suffix.is_empty() { Some("quantile") } else { None };
                        let point = groups.entry(self.attributes(exposition, s.labels.clone(), skip)).or_default();
                        match suffix {
                            "" => {
                                if let Some(q) = quantile.and_then(|q| q.value.parse::<f64>().ok()) {
                                    point.quantile_values.push(ValueAtQuantile { quantile: q, value: s.value });
                                }
                            }
                            "_sum" => point.sum = s.value,
                            "_count" => point.count = s.value.max(0.0) as u64,
                            _ => {}
                        }
                    }
                    for (attributes, point) in groups {
                        let id = SeriesId { metric: family.name.to_owned(), attributes };
                        if admit(self, &id) {
                            builder.summary(id, help, point);
                        }
                    }
                }
                kind => {
                    for s in samples {
                        if s.name.ends_with("_created") && kind == Kind::Counter {
                            continue;
                        }
                        let id = SeriesId { metric: s.name.to_owned(), attributes: self.attributes(exposition, s.labels.clone(), None) };
                        if admit(self, &id) {
                            let exemplar = s.exemplar.as_deref().map(|e| otlp_exemplar(e, builder.time));
                            builder.number(id, help, s.value, kind, exemplar, s.timestamp_ms);
                        }
                    }
                }
            }
        }
        over_limit
    }
}

/// A scraped exemplar as an OTLP one: `trace_id` / `span_id` labels as ids when they are hex
/// of the right length, the other labels as filtered attributes.
fn otlp_exemplar(e: &parse::Exemplar<'_>, scrape_time: u64) -> Exemplar {
    let mut out = Exemplar {
        time_unix_nano: e.timestamp_ms.map_or(scrape_time, |ms| (ms.max(0) as u64) * 1_000_000),
        value: Some(exemplar::Value::AsDouble(e.value)),
        ..Default::default()
    };
    for label in &e.labels {
        let bytes = hex_bytes(&label.value);
        match (label.name, bytes) {
            ("trace_id", Some(b)) if b.len() == 16 => out.trace_id = b,
            ("span_id", Some(b)) if b.len() == 8 => out.span_id = b,
            _ => out.filtered_attributes.push(kv(label.name, &label.value)),
        }
    }
    out
}

fn hex_bytes(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn parse_le(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" | "inf" | "+inf" => Some(f64::INFINITY),
        other => other.parse().ok(),
    }
}

/// Collects one scrape's OTLP metrics.
struct Builder {
    time: u64,
    metrics: Vec<Metric>,
    index: HashMap<String, usize>,
    ids: Vec<(SeriesId, Shape)>,
}

fn attributes_kv(attributes: &[(String, String)]) -> Vec<KeyValue> {
    attributes.iter().map(|(k, v)| kv(k, v)).collect()
}

impl Builder {
    fn new(time: u64) -> Self {
        Builder { time, metrics: Vec::new(), index: HashMap::new(), ids: Vec::new() }
    }

    fn clear(&mut self) {
        self.metrics.clear();
        self.index.clear();
        self.ids.clear();
    }

    fn metric(&mut self, name: &str, help: &str, empty: impl FnOnce() -> metric::Data) -> &mut metric::Data {
        let index = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.metrics.push(Metric { name: name.to_owned(), description: help.to_owned(), data: Some(empty()), ..Default::default() });
                self.index.insert(name.to_owned(), self.metrics.len() - 1);
                self.metrics.len() - 1
            }
        };
        // Every metric was created with data.
        self.metrics[index].data.get_or_insert_with(|| metric::Data::Gauge(Gauge::default()))
    }

    fn number_point(&self, attributes: &[(String, String)], value: f64, flags: u32) -> NumberDataPoint {
        NumberDataPoint {
            attributes: attributes_kv(attributes),
            time_unix_nano: self.time,
            value: Some(number_data_point::Value::AsDouble(value)),
            flags,
            ..Default::default()
        }
    }

    /// A sample at the scrape's time, or at the time the target gave it (as Prometheus
    /// honours exposed timestamps).
    fn number(&mut self, id: SeriesId, help: &str, value: f64, kind: Kind, exemplar: Option<Exemplar>, timestamp_ms: Option<i64>) {
        let mut point = self.number_point(&id.attributes, value, 0);
        point.exemplars.extend(exemplar);
        if let Some(ms) = timestamp_ms.filter(|&ms| ms > 0) {
            point.time_unix_nano = ms as u64 * 1_000_000;
        }
        match self.metric(&id.metric, help, || data_for(kind)) {
            metric::Data::Sum(sum) => sum.data_points.push(point),
            metric::Data::Gauge(gauge) => gauge.data_points.push(point),
            _ => {}
        }
        self.ids.push((id, Shape::Number));
    }

    fn gauge(&mut self, name: &str, attributes: &[(String, String)], value: f64, kind: Kind) {
        let id = SeriesId { metric: name.to_owned(), attributes: attributes.to_vec() };
        self.number(id, "", value, kind, None, None);
    }

    fn histogram(&mut self, id: SeriesId, help: &str, mut point: HistogramDataPoint) {
        point.attributes = attributes_kv(&id.attributes);
        point.time_unix_nano = self.time;
        let shape = Shape::Histogram(point.explicit_bounds.clone());
        if let metric::Data::Histogram(h) = self.metric(&id.metric, help, histogram_data) {
            h.data_points.push(point);
        }
        self.ids.push((id, shape));
    }

    fn summary(&mut self, id: SeriesId, help: &str, mut point: SummaryDataPoint) {
        point.attributes = attributes_kv(&id.attributes);
        point.time_unix_nano = self.time;
        let shape = Shape::Summary(point.quantile_values.iter().map(|q| q.quantile).collect());
        if let metric::Data::Summary(s) = self.metric(&id.metric, help, || metric::Data::Summary(Summary::default())) {
            s.data_points.push(point);
        }
        self.ids.push((id, shape));
    }

    /// A "no recorded value" point for a series that is gone, shaped as it was (buckets,
    /// quantiles), so every sample it had is marked.
    fn stale(&mut self, id: &SeriesId, shape: &Shape) {
        let point = self.number_point(&id.attributes, f64::NAN, NO_RECORDED_VALUE);
        let time = self.time;
        let empty = || match shape {
            Shape::Number => metric::Data::Gauge(Gauge::default()),
            Shape::Histogram(_) => histogram_data(),
            Shape::Summary(_) => metric::Data::Summary(Summary::default()),
        };
        match (self.metric(&id.metric, "", empty), shape) {
            (metric::Data::Sum(sum), _) => sum.data_points.push(point),
            (metric::Data::Gauge(gauge), _) => gauge.data_points.push(point),
            (metric::Data::Histogram(h), shape) => {
                let bounds = match shape {
                    Shape::Histogram(bounds) => bounds.clone(),
                    _ => Vec::new(),
                };
                h.data_points.push(HistogramDataPoint {
                    attributes: point.attributes,
                    time_unix_nano: time,
                    bucket_counts: vec![0; bounds.len() + 1],
                    explicit_bounds: bounds,
                    flags: NO_RECORDED_VALUE,
                    ..Default::default()
                })
            }
            (metric::Data::Summary(s), shape) => {
                let quantile_values = match shape {
                    Shape::Summary(quantiles) => {
                        quantiles.iter().map(|&quantile| ValueAtQuantile { quantile, value: f64::NAN }).collect()
                    }
                    _ => Vec::new(),
                };
                s.data_points.push(SummaryDataPoint {
                    attributes: point.attributes,
                    time_unix_nano: time,
                    quantile_values,
                    flags: NO_RECORDED_VALUE,
                    ..Default::default()
                })
            }
            (metric::Data::ExponentialHistogram(_), _) => {}
        }
    }

    fn finish(self, job: &str, instance: &str) -> Metrics {
        Metrics {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", job), kv("service.instance.id", instance)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope { name: SCRAPE_SCOPE.to_owned(), ..Default::default() }),
                    metrics: self.metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }
}

fn histogram_data() -> metric::Data {
    metric::Data::Histogram(Histogram { data_points: Vec::new(), aggregation_temporality: AggregationTemporality::Cumulative as i32 })
}

fn data_for(kind: Kind) -> metric::Data {
    match kind {
        Kind::Counter => metric::Data::Sum(Sum {
            data_points: Vec::new(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        }),
        _ => metric::Data::Gauge(Gauge::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Serves whatever body the test puts in, as text format 0.0.4.
    async fn serve(body: Arc<Mutex<String>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let body = body.clone();
                async move { body.lock().unwrap().clone() }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn target(url: &str) -> Target {
        let config = StaticTarget {
            job: "svc".into(),
            url: url.into(),
            labels: [("team".to_owned(), "video".to_owned())].into_iter().collect(),
        };
        Target::new(&config, crate::sources::prometheus::client().unwrap(), Duration::from_secs(5))
    }

    fn points(request: &Metrics) -> Vec<(String, Attributes, f64, u32)> {
        let mut out = Vec::new();
        for m in &request.resource_metrics[0].scope_metrics[0].metrics {
            let number_points = match &m.data {
                Some(metric::Data::Gauge(g)) => &g.data_points,
                Some(metric::Data::Sum(s)) => &s.data_points,
                _ => continue,
            };
            for p in number_points {
                let attributes = p
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), match &kv.value.as_ref().and_then(|v| v.value.clone()) {
                        Some(any_value::Value::StringValue(s)) => s.clone(),
                        _ => String::new(),
                    }))
                    .collect();
                let value = match p.value {
                    Some(number_data_point::Value::AsDouble(d)) => d,
                    _ => 0.0,
                };
                out.push((m.name.clone(), attributes, value, p.flags));
            }
        }
        out
    }

    #[tokio::test]
    async fn samples_get_target_labels_and_vanished_series_are_marked_stale() {
        let body = Arc::new(Mutex::new("# TYPE hits_total counter\nhits_total{path=\"/a\",team=\"x\"} 3\nhits_total{path=\"/b\"} 4\n".to_owned()));
        let url = serve(body.clone()).await;
        let mut target = target(&url);
        let scraped = target.scrape().await;
        assert!(scraped.error.is_none());
        assert_eq!(scraped.samples, 2);
        let got = points(&scraped.request);
        let a = got.iter().find(|p| p.0 == "hits_total" && p.2 == 3.0).unwrap();
        assert_eq!(a.1, vec![("exported_team".into(), "x".into()), ("path".into(), "/a".into()), ("team".into(), "video".into())]);
        assert!(got.iter().any(|p| p.0 == "up" && p.2 == 1.0));
        assert!(got.iter().any(|p| p.0 == "scrape_samples_scraped" && p.2 == 2.0));

        *body.lock().unwrap() = "hits_total{path=\"/b\"} 5\n".to_owned();
        let got = points(&target.scrape().await.request);
        let stale: Vec<_> = got.iter().filter(|p| p.3 == NO_RECORDED_VALUE).collect();
        assert_eq!(stale.len(), 1, "{got:?}");
        assert_eq!(stale[0].1[1], ("path".to_owned(), "/a".to_owned()));

        *body.lock().unwrap() = "hits_total{path=\"/b\"} 5\nhits_total{path=\"/b\"} 6\n".to_owned();
        let scraped = target.scrape().await;
        let error = scraped.error.expect("a duplicate series fails the scrape");
        assert_eq!(error.reason(), "parse");
        assert!(error.to_string().contains("line 2: duplicate series"), "{error}");
        let got = points(&scraped.request);
        assert!(got.iter().any(|p| p.0 == "up" && p.2 == 0.0));
        assert!(got.iter().any(|p| p.0 == "hits_total" && p.3 == NO_RECORDED_VALUE), "a failed scrape makes everything stale");
    }

    #[tokio::test]
    async fn histograms_become_otlp_histograms() {
        let body = Arc::new(Mutex::new(
            "# TYPE rpc histogram\nrpc_bucket{le=\"0.1\"} 2\nrpc_bucket{le=\"1\"} 5\nrpc_bucket{le=\"+Inf\"} 6\nrpc_sum 3.5\nrpc_count 6\n".to_owned(),
        ));
        let url = serve(body).await;
        let scraped = target(&url).scrape().await;
        let metric = scraped.request.resource_metrics[0].scope_metrics[0].metrics.iter().find(|m| m.name == "rpc").unwrap();
        let Some(metric::Data::Histogram(h)) = &metric.data else { panic!("not a histogram") };
        assert_eq!(h.data_points[0].explicit_bounds, vec![0.1, 1.0]);
        assert_eq!(h.data_points[0].bucket_counts, vec![2, 3, 1]);
        assert_eq!((h.data_points[0].sum, h.data_points[0].count), (Some(3.5), 6));
    }

    #[test]
    fn instances_are_host_and_port() {
        assert_eq!(instance_of("http://127.0.0.1:9100/metrics"), "127.0.0.1:9100");
        assert_eq!(instance_of("https://node.local/metrics"), "node.local:443");
    }
}
