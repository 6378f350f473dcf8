//! Span metrics (rate, errors, duration per operation) with the OpenTelemetry spanmetrics
//! connector's Prometheus names, and the service graph with Tempo's, so that Jaeger's Monitor
//! tab and Grafana's service graph read them as they are.
//!
//! Both are bounded: past [`MAX_SPAN_SERIES`] operations, further spans are counted in one
//! series labelled `otel_metric_overflow="true"` as the connector does; past [`MAX_EDGES`]
//! edges, further requests are counted in an edge between `__overflow__` and `__overflow__`.

use ahash::RandomState;
use std::collections::HashMap;
use std::sync::Arc;

use super::span::{Kind, StatusCode};
use crate::telemetry::exposition::{Exposition, Histogram, Type};

pub const MAX_SPAN_SERIES: usize = 20_000;
pub const MAX_EDGES: usize = 10_000;

/// The connector's default bounds, in milliseconds.
pub static DURATION_BUCKETS_MS: [f64; 16] =
    [2.0, 4.0, 6.0, 8.0, 10.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1000.0, 1400.0, 2000.0, 5000.0, 10000.0, 15000.0];
/// Bounds in seconds for service-graph latencies: Tempo's defaults with finer steps below 100 ms.
pub static GRAPH_BUCKETS_S: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8];

const OVERFLOW: &str = "__overflow__";

struct SpanSeries {
    calls: u64,
    duration_ms: Histogram,
}

impl SpanSeries {
    fn new() -> Self {
        SpanSeries { calls: 0, duration_ms: Histogram::new(&DURATION_BUCKETS_MS) }
    }
}

/// Series index by span kind and status code.
fn slot(kind: Kind, status: StatusCode) -> usize {
    kind as usize * StatusCode::ALL.len() + status as usize
}
const SLOTS: usize = Kind::ALL.len() * StatusCode::ALL.len();

/// One series per (kind, status) of a span name.
type Slots = Box<[Option<SpanSeries>]>;

/// `traces_span_metrics_*`: calls and duration per service, span name, kind and status.
pub struct SpanMetrics {
    /// service → span name → its series.
    series: HashMap<Arc<str>, HashMap<Box<str>, Slots, RandomState>, RandomState>,
    count: usize,
    overflow: SpanSeries,
}

impl Default for SpanMetrics {
    fn default() -> Self {
        SpanMetrics { series: HashMap::with_hasher(RandomState::new()), count: 0, overflow: SpanSeries::new() }
    }
}

impl SpanMetrics {
    /// Counts one span. Returns false when it went to the overflow series.
    pub fn record(&mut self, service: &Arc<str>, name: &str, kind: Kind, status: StatusCode, duration_ns: u64) -> bool {
        let duration_ms = duration_ns as f64 / 1e6;
        let has_room = self.count < MAX_SPAN_SERIES;
        let names = match self.series.get_mut(service) {
            Some(names) => names,
            None if has_room => self.series.entry(service.clone()).or_insert_with(|| HashMap::with_hasher(RandomState::new())),
            None => return self.overflow(duration_ms),
        };
        let slots = match names.get_mut(name) {
            Some(slots) => slots,
            None if has_room => names.entry(name.into()).or_insert_with(|| (0..SLOTS).map(|_| None).collect()),
            None => return self.overflow(duration_ms),
        };
        let series = match &mut slots[slot(kind, status)] {
            Some(series) => series,
            empty if has_room => {
                self.count += 1;
                empty.insert(SpanSeries::new())
            }
            _ => return self.overflow(duration_ms),
        };
        series.calls += 1;
        series.duration_ms.observe(duration_ms);
        true
    }

    fn overflow(&mut self, duration_ms: f64) -> bool {
        self.overflow.calls += 1;
        self.overflow.duration_ms.observe(duration_ms);
        false
    }

    pub fn series(&self) -> usize {
        self.count
    }

    pub fn write(&self, out: &mut Exposition) {
        let mut rows: Vec<(&str, &str, Kind, StatusCode, &SpanSeries)> = Vec::with_capacity(self.count);
        for (service, names) in &self.series {
            for (name, slots) in names {
                for kind in Kind::ALL {
                    for status in StatusCode::ALL {
                        if let Some(series) = &slots[slot(kind, status)] {
                            rows.push((service, name, kind, status, series));
                        }
                    }
                }
            }
        }
        rows.sort_by(|a, b| (a.0, a.1, a.2 as u8, a.3 as u8).cmp(&(b.0, b.1, b.2 as u8, b.3 as u8)));
        let overflow = (self.overflow.calls > 0).then_some(&self.overflow);

        out.family("traces_span_metrics_calls_total", "Spans per service, span name, kind and status.", Type::Counter);
        for (service, name, kind, status, series) in &rows {
            let labels = [
                ("service_name", *service),
                ("span_name", *name),
                ("span_kind", kind.otel_name()),
                ("status_code", status.otel_name()),
            ];
            out.sample("traces_span_metrics_calls_total", &labels, series.calls as f64);
        }
        if let Some(series) = overflow {
            out.sample("traces_span_metrics_calls_total", &[("otel_metric_overflow", "true")], series.calls as f64);
        }
        out.family(
            "traces_span_metrics_duration_milliseconds",
            "Span durations per service, span name, kind and status.",
            Type::Histogram,
        );
        for (service, name, kind, status, series) in &rows {
            let labels = [
                ("service_name", *service),
                ("span_name", *name),
                ("span_kind", kind.otel_name()),
                ("status_code", status.otel_name()),
            ];
            out.histogram("traces_span_metrics_duration_milliseconds", &labels, &series.duration_ms);
        }
        if let Some(series) = overflow {
            out.histogram("traces_span_metrics_duration_milliseconds", &[("otel_metric_overflow", "true")], &series.duration_ms);
        }
    }
}

struct Edge {
    requests: u64,
    failed: u64,
    server_seconds: Histogram,
    client_seconds: Histogram,
}

impl Edge {
    fn new() -> Self {
        Edge {
            requests: 0,
            failed: 0,
            server_seconds: Histogram::new(&GRAPH_BUCKETS_S),
            client_seconds: Histogram::new(&GRAPH_BUCKETS_S),
        }
    }
}

/// One request between two services, as analysis paired it.
pub struct Request<'a> {
    pub client: &'a str,
    pub server: &'a str,
    pub client_ns: Option<u64>,
    pub server_ns: Option<u64>,
    pub failed: bool,
}

/// `traces_service_graph_*`: requests between services, by client then server.
#[derive(Default)]
pub struct ServiceGraph {
    edges: HashMap<Box<str>, HashMap<Box<str>, Edge, RandomState>, RandomState>,
    count: usize,
}

impl ServiceGraph {
    /// Counts one request. Returns false when it went to the overflow edge.
    pub fn record(&mut self, request: Request<'_>) -> bool {
        // Look up without allocating; allocate only for a new edge.
        let known = self.edges.get(request.client).is_some_and(|servers| servers.contains_key(request.server));
        let kept = known || self.count < MAX_EDGES;
        let (client, server) = if kept { (request.client, request.server) } else { (OVERFLOW, OVERFLOW) };
        let servers = match self.edges.get_mut(client) {
            Some(servers) => servers,
            None => self.edges.entry(client.into()).or_default(),
        };
        let edge = match servers.get_mut(server) {
            Some(edge) => edge,
            None => {
                self.count += 1;
                servers.entry(server.into()).or_insert_with(Edge::new)
            }
        };
        edge.requests += 1;
        edge.failed += u64::from(request.failed);
        if let Some(ns) = request.server_ns {
            edge.server_seconds.observe(ns as f64 / 1e9);
        }
        if let Some(ns) = request.client_ns {
            edge.client_seconds.observe(ns as f64 / 1e9);
        }
        kept
    }

    pub fn edges(&self) -> usize {
        self.count
    }

    pub fn write(&self, out: &mut Exposition) {
        let mut edges: Vec<((&str, &str), &Edge)> = self
            .edges
            .iter()
            .flat_map(|(client, servers)| servers.iter().map(move |(server, edge)| ((&**client, &**server), edge)))
            .collect();
        edges.sort_by(|a, b| a.0.cmp(&b.0));
        out.family("traces_service_graph_request_total", "Requests between two services.", Type::Counter);
        for ((client, server), edge) in &edges {
            out.sample("traces_service_graph_request_total", &[("client", client), ("server", server)], edge.requests as f64);
        }
        out.family(
            "traces_service_graph_request_failed_total",
            "Failed requests between two services.",
            Type::Counter,
        );
        for ((client, server), edge) in &edges {
            out.sample(
                "traces_service_graph_request_failed_total",
                &[("client", client), ("server", server)],
                edge.failed as f64,
            );
        }
        out.family(
            "traces_service_graph_request_server_seconds",
            "Request duration as the server saw it.",
            Type::Histogram,
        );
        for ((client, server), edge) in &edges {
            if edge.server_seconds.count() > 0 {
                out.histogram(
                    "traces_service_graph_request_server_seconds",
                    &[("client", client), ("server", server)],
                    &edge.server_seconds,
                );
            }
        }
        out.family(
            "traces_service_graph_request_client_seconds",
            "Request duration as the client saw it.",
            Type::Histogram,
        );
        for ((client, server), edge) in &edges {
            if edge.client_seconds.count() > 0 {
                out.histogram(
                    "traces_service_graph_request_client_seconds",
                    &[("client", client), ("server", server)],
                    &edge.client_seconds,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_metrics_use_the_connector_names_and_labels() {
        let mut metrics = SpanMetrics::default();
        let feed: Arc<str> = "feed".into();
        metrics.record(&feed, "GET /feed", Kind::Server, StatusCode::Unset, 3_000_000);
        metrics.record(&feed, "GET /feed", Kind::Server, StatusCode::Unset, 30_000_000);
        metrics.record(&feed, "GET /feed", Kind::Server, StatusCode::Error, 1_000_000);
        let mut out = Exposition::new();
        metrics.write(&mut out);
        let text = out.into_text();
        assert!(text.contains("traces_span_metrics_calls_total{service_name=\"feed\",span_name=\"GET /feed\",span_kind=\"SPAN_KIND_SERVER\",status_code=\"STATUS_CODE_UNSET\"} 2\n"), "{text}");
        assert!(text.contains("traces_span_metrics_calls_total{service_name=\"feed\",span_name=\"GET /feed\",span_kind=\"SPAN_KIND_SERVER\",status_code=\"STATUS_CODE_ERROR\"} 1\n"), "{text}");
        assert!(text.contains("traces_span_metrics_duration_milliseconds_bucket{service_name=\"feed\",span_name=\"GET /feed\",span_kind=\"SPAN_KIND_SERVER\",status_code=\"STATUS_CODE_UNSET\",le=\"4\"} 1\n"), "{text}");
        assert!(text.contains("traces_span_metrics_duration_milliseconds_sum{service_name=\"feed\",span_name=\"GET /feed\",span_kind=\"SPAN_KIND_SERVER\",status_code=\"STATUS_CODE_UNSET\"} 33\n"), "{text}");
    }

    #[test]
    fn span_metrics_past_the_bound_go_to_one_overflow_series() {
        let mut metrics = SpanMetrics::default();
        let service: Arc<str> = "s".into();
        for i in 0..MAX_SPAN_SERIES + 10 {
            metrics.record(&service, &format!("op-{i}"), Kind::Internal, StatusCode::Unset, 1);
        }
        assert_eq!(metrics.series(), MAX_SPAN_SERIES);
        assert_eq!(metrics.overflow.calls, 10);
        let mut out = Exposition::new();
        metrics.write(&mut out);
        assert!(out.into_text().contains("traces_span_metrics_calls_total{otel_metric_overflow=\"true\"} 10\n"));
    }

    #[test]
    fn service_graph_uses_tempo_names() {
        let mut graph = ServiceGraph::default();
        graph.record(Request { client: "web", server: "api", client_ns: Some(30_000_000), server_ns: Some(20_000_000), failed: false });
        graph.record(Request { client: "web", server: "api", client_ns: Some(1), server_ns: Some(1), failed: true });
        let mut out = Exposition::new();
        graph.write(&mut out);
        let text = out.into_text();
        assert!(text.contains("traces_service_graph_request_total{client=\"web\",server=\"api\"} 2\n"), "{text}");
        assert!(text.contains("traces_service_graph_request_failed_total{client=\"web\",server=\"api\"} 1\n"), "{text}");
        assert!(text.contains("traces_service_graph_request_server_seconds_bucket{client=\"web\",server=\"api\",le=\"0.025\"} 2\n"), "{text}");
    }
}
