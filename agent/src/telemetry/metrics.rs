//! Self-metrics (prometheus-client), all named `periscope_*`.
//!
//! Families are registered once; components take per-label handles at build time so the hot
//! path is an atomic add. Every place that drops data counts it under
//! `periscope_dropped_items_total{reason}`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::Arc;

use crate::signal::Signal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    component: String,
    signal: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    component: String,
    signal: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    component: String,
    signal: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    component: String,
    signal: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathOutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnomalyLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    component: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScrapeLabels {
    job: String,
    instance: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: String,
}

/// The agent's metric families and the registry that exposes them on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    families: Families,
}

#[derive(Clone, Default)]
struct Families {
    received: Family<ComponentLabels, Counter>,
    sent: Family<ComponentLabels, Counter>,
    retried: Family<ComponentLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    export_errors: Family<KindLabels, Counter>,
    requests: Family<OutcomeLabels, Counter>,
    queue_items: Family<ComponentLabels, Gauge>,
    queue_capacity: Family<ComponentLabels, Gauge>,
    task_failures: Family<TaskLabels, Counter>,
    path_traces: Family<PathOutcomeLabels, Counter>,
    path_anomalies: Family<AnomalyLabels, Counter>,
    path_traces_in_flight: Gauge,
    path_spans_in_flight: Gauge,
    path_handlers: Gauge,
    path_span_series: Gauge,
    path_edges: Gauge,
    file_bytes: Counter,
    file_entries: Counter,
    file_truncated: Counter,
    files: Gauge,
    file_lag: Family<PathLabels, Gauge>,
    responses: Family<CodeLabels, Counter>,
    scrape_failures: Family<ScrapeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let families = Families::default();
        let mut registry = Registry::with_prefix("periscope");
        registry.register(
            "build",
            "Periscope build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "received_items",
            "Items (spans, data points, log records) accepted by a source",
            families.received.clone(),
        );
        registry.register(
            "sent_items",
            "Items an exporter delivered and the backend acknowledged",
            families.sent.clone(),
        );
        registry.register(
            "retried_items",
            "Items whose export was retried after a retryable error",
            families.retried.clone(),
        );
        registry.register(
            "dropped_items",
            "Items dropped, by component and reason",
            families.dropped.clone(),
        );
        registry.register(
            "export_errors",
            "Failed export attempts by kind (retryable, throttled, permanent)",
            families.export_errors.clone(),
        );
        registry.register(
            "receiver_requests",
            "Requests handled by a receiver, by outcome",
            families.requests.clone(),
        );
        registry.register(
            "queue_items",
            "Items waiting in or being exported from a component's queue",
            families.queue_items.clone(),
        );
        registry.register(
            "queue_capacity_items",
            "Capacity of a component's queue in items",
            families.queue_capacity.clone(),
        );
        registry.register(
            "task_failures",
            "Component tasks that ended with a panic or an error",
            families.task_failures.clone(),
        );
        registry.register(
            "paths_traces",
            "Traces that left assembly for analysis: complete (quiet for paths.trace_timeout), evicted (to stay within paths.max_traces_in_flight) or flushed (at shutdown)",
            families.path_traces.clone(),
        );
        registry.register(
            "paths_anomalies",
            "Problems found in traces and cuts made to stay within bounds, by kind",
            families.path_anomalies.clone(),
        );
        registry.register(
            "paths_traces_in_flight",
            "Traces waiting in assembly",
            families.path_traces_in_flight.clone(),
        );
        registry.register("paths_spans_in_flight", "Spans waiting in assembly", families.path_spans_in_flight.clone());
        registry.register("paths_handlers", "Handlers with execution-path aggregates", families.path_handlers.clone());
        registry.register(
            "paths_span_metric_series",
            "Series of traces_span_metrics_* kept",
            families.path_span_series.clone(),
        );
        registry.register(
            "paths_service_graph_edges",
            "Edges of traces_service_graph_* kept",
            families.path_edges.clone(),
        );
        registry.register("file_read_bytes", "Bytes read from log files", families.file_bytes.clone());
        registry.register(
            "file_entries",
            "Log entries read from files and handed to the logs pipeline",
            families.file_entries.clone(),
        );
        registry.register(
            "file_lines_truncated",
            "Log lines cut at the maximum line length",
            families.file_truncated.clone(),
        );
        registry.register("files_followed", "Log files being followed", families.files.clone());
        registry.register(
            "file_checkpoint_lag_bytes",
            "Bytes of a log file not yet acknowledged by the exporter",
            families.file_lag.clone(),
        );
        registry.register(
            "export_responses",
            "Answers of a backend to export requests, by HTTP status code (or `connection_error`)",
            families.responses.clone(),
        );
        registry.register(
            "scrape_failures",
            "Failed scrapes by target and reason (connect, timeout, http_status, too_large, parse)",
            families.scrape_failures.clone(),
        );
        registry.register_collector(Box::new(super::process::ProcessCollector));
        Metrics { registry: Arc::new(registry), families }
    }

    /// Handles for scraping.
    pub fn scrapes(&self) -> ScrapeMetrics {
        ScrapeMetrics { failures: self.families.scrape_failures.clone() }
    }

    /// Counts a backend's answers by status code.
    pub fn responses(&self, component: &str) -> Responses {
        Responses { component: component.to_owned(), family: self.families.responses.clone() }
    }

    /// Handles for file tailing.
    pub fn files(&self) -> FileMetrics {
        FileMetrics {
            bytes: self.families.file_bytes.clone(),
            entries: self.families.file_entries.clone(),
            truncated: self.families.file_truncated.clone(),
            files: self.families.files.clone(),
            lag: self.families.file_lag.clone(),
        }
    }

    /// Handles for execution-path analysis.
    pub fn paths(&self) -> PathsMetrics {
        let outcome = |outcome| self.families.path_traces.get_or_create(&PathOutcomeLabels { outcome }).clone();
        PathsMetrics {
            complete: outcome("complete"),
            evicted: outcome("evicted"),
            flushed: outcome("flushed"),
            traces_in_flight: self.families.path_traces_in_flight.clone(),
            spans_in_flight: self.families.path_spans_in_flight.clone(),
            handlers: self.families.path_handlers.clone(),
            span_series: self.families.path_span_series.clone(),
            edges: self.families.path_edges.clone(),
            families: self.families.clone(),
        }
    }

    /// The registry, for encoding `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Handles for one component handling one signal.
    pub fn component(&self, component: &str, signal: Signal) -> ComponentMetrics {
        let labels = ComponentLabels { component: component.to_owned(), signal: signal.as_str() };
        ComponentMetrics {
            component: component.to_owned(),
            signal,
            received: self.families.received.get_or_create(&labels).clone(),
            sent: self.families.sent.get_or_create(&labels).clone(),
            retried: self.families.retried.get_or_create(&labels).clone(),
            queue_items: self.families.queue_items.get_or_create(&labels).clone(),
            queue_capacity: self.families.queue_capacity.get_or_create(&labels).clone(),
            families: self.families.clone(),
        }
    }

    /// Handles for a receiver (a source answering requests).
    pub fn receiver(&self, component: &str, signal: Signal) -> ReceiverMetrics {
        let labels = ComponentLabels { component: component.to_owned(), signal: signal.as_str() };
        ReceiverMetrics {
            component: component.to_owned(),
            signal,
            received: self.families.received.get_or_create(&labels).clone(),
            families: self.families.clone(),
        }
    }

    /// A drop counter for a component that only ever drops (a pipeline with nowhere to send).
    pub fn drops(&self, component: &str, signal: Signal) -> Drops {
        Drops { component: component.to_owned(), signal, families: self.families.clone() }
    }

    /// Shows a supervised task's failure counter at 0 from its start, so that dashboards and
    /// alerts see the series before anything fails.
    pub fn task_started(&self, task: &str) {
        let _ = self.families.task_failures.get_or_create(&TaskLabels { task: task.to_owned() });
    }

    pub fn task_failed(&self, task: &str) {
        self.families.task_failures.get_or_create(&TaskLabels { task: task.to_owned() }).inc();
    }
}

/// Per-component handles; cheap to clone.
#[derive(Clone)]
pub struct ComponentMetrics {
    component: String,
    signal: Signal,
    pub received: Counter,
    pub sent: Counter,
    pub retried: Counter,
    pub queue_items: Gauge,
    pub queue_capacity: Gauge,
    families: Families,
}

impl ComponentMetrics {
    pub fn dropped(&self, reason: &'static str, items: u64) {
        Drops { component: self.component.clone(), signal: self.signal, families: self.families.clone() }
            .add(reason, items);
    }

    pub fn export_error(&self, kind: &'static str) {
        self.families
            .export_errors
            .get_or_create(&KindLabels {
                component: self.component.clone(),
                signal: self.signal.as_str(),
                kind,
            })
            .inc();
    }

    pub fn component(&self) -> &str {
        &self.component
    }
}

/// A receiver's handles: items accepted, and requests by outcome.
#[derive(Clone)]
pub struct ReceiverMetrics {
    component: String,
    signal: Signal,
    pub received: Counter,
    families: Families,
}

impl ReceiverMetrics {
    /// Counts one request under `outcome` (ok, malformed, too_large, unsupported_media_type, backpressure).
    pub fn request(&self, outcome: &'static str) {
        self.families
            .requests
            .get_or_create(&OutcomeLabels {
                component: self.component.clone(),
                signal: self.signal.as_str(),
                outcome,
            })
            .inc();
    }

    pub fn component(&self) -> &str {
        &self.component
    }
}

/// Execution-path analysis: traces by outcome, anomalies by kind, and what is held.
#[derive(Clone)]
pub struct PathsMetrics {
    pub complete: Counter,
    pub evicted: Counter,
    pub flushed: Counter,
    pub traces_in_flight: Gauge,
    pub spans_in_flight: Gauge,
    pub handlers: Gauge,
    pub span_series: Gauge,
    pub edges: Gauge,
    families: Families,
}

impl PathsMetrics {
    pub fn anomaly(&self, kind: &'static str, count: u64) {
        if count > 0 {
            self.families.path_anomalies.get_or_create(&AnomalyLabels { kind }).inc_by(count);
        }
    }
}

/// File tailing: bytes and entries read, lines cut, files followed, checkpoint lag per file.
#[derive(Clone)]
pub struct FileMetrics {
    pub bytes: Counter,
    pub entries: Counter,
    pub truncated: Counter,
    pub files: Gauge,
    lag: Family<PathLabels, Gauge>,
}

impl FileMetrics {
    pub fn lag(&self, path: &std::path::Path, bytes: u64) {
        let labels = PathLabels { path: path.to_string_lossy().into_owned() };
        self.lag.get_or_create(&labels).set(bytes as i64);
    }

    /// Stops reporting a file that is no longer followed.
    pub fn forget(&self, path: &std::path::Path) {
        self.lag.remove(&PathLabels { path: path.to_string_lossy().into_owned() });
    }
}

/// Scrape failures by target and reason.
#[derive(Clone)]
pub struct ScrapeMetrics {
    failures: Family<ScrapeLabels, Counter>,
}

impl ScrapeMetrics {
    pub fn failure(&self, job: &str, instance: &str, reason: &'static str) {
        self.failures.get_or_create(&ScrapeLabels { job: job.to_owned(), instance: instance.to_owned(), reason }).inc();
    }
}

/// A backend's answers by status code.
#[derive(Clone)]
pub struct Responses {
    component: String,
    family: Family<CodeLabels, Counter>,
}

impl Responses {
    pub fn count(&self, code: &str) {
        self.family.get_or_create(&CodeLabels { component: self.component.clone(), code: code.to_owned() }).inc();
    }
}

/// Counts drops of one component.
#[derive(Clone)]
pub struct Drops {
    component: String,
    signal: Signal,
    families: Families,
}

impl Drops {
    pub fn add(&self, reason: &'static str, items: u64) {
        if items == 0 {
            return;
        }
        self.families
            .dropped
            .get_or_create(&ReasonLabels {
                component: self.component.clone(),
                signal: self.signal.as_str(),
                reason,
            })
            .inc_by(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_appear_in_the_text_exposition() {
        let metrics = Metrics::new();
        let jaeger = metrics.component("jaeger", Signal::Traces);
        jaeger.sent.inc_by(5);
        jaeger.dropped("permanent", 2);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics.registry()).unwrap();
        assert!(text.contains("periscope_sent_items_total{component=\"jaeger\",signal=\"traces\"} 5"), "{text}");
        assert!(text.contains(
            "periscope_dropped_items_total{component=\"jaeger\",signal=\"traces\",reason=\"permanent\"} 2"
        ));
    }
}
