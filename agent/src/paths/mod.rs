//! Handler execution paths from trace spans, with span metrics and the service graph.
//!
//! ```text
//! traces pipeline ──lossy queue──▶ Processor ──▶ span metrics (per span, at once)
//!                                     │
//!                                     └─▶ Assembler (by trace id, until quiet for trace_timeout)
//!                                              └─▶ Analyzer ──▶ Handlers (trees, variants)
//!                                                           └─▶ ServiceGraph
//! Paths (shared, behind one lock) ◀── admin API (/api/v1/paths), Prometheus exporter
//! ```
//!
//! The processor is a consumer of the traces pipeline next to the exporters. Its queue is
//! lossy: when analysis cannot keep up, it misses spans (counted) rather than slow the
//! delivery of spans to Jaeger.

pub mod analysis;
pub mod assembly;
pub mod handlers;
pub mod red;
pub mod span;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::PathsConfig;
use crate::pipeline::ConsumerInput;
use crate::signal::Traces;
use crate::telemetry::exposition::{Collect, Exposition};
use crate::telemetry::{ComponentMetrics, PathsMetrics};
use analysis::{Analyzer, Anomalies};
use assembly::{Added, Assembler, Finish};
use handlers::{HandlerSummary, Handlers, TreeJson};
use red::{ServiceGraph, SpanMetrics};
use span::SpanRecord;

/// The component name in self-metrics and logs.
pub const KEY: &str = "paths";
/// Spans the processor's queue holds before it misses payloads.
pub const QUEUE_SPANS: usize = 64 * 1024;

struct State {
    handlers: Handlers,
    span_metrics: SpanMetrics,
    graph: ServiceGraph,
}

/// The aggregates, shared between the processor and their readers.
#[derive(Clone)]
pub struct Paths {
    state: Arc<Mutex<State>>,
}

/// What `/api/v1/paths/tree` renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeFormat {
    Json,
    Folded,
    Svg,
}

impl TreeFormat {
    pub fn parse(format: &str) -> Option<TreeFormat> {
        match format {
            "json" => Some(TreeFormat::Json),
            "folded" => Some(TreeFormat::Folded),
            "svg" => Some(TreeFormat::Svg),
            _ => None,
        }
    }
}

/// A rendered tree.
pub enum Rendered {
    Json(TreeJson),
    Text(String),
}

impl Paths {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves aggregates that are still well formed.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every handler, the busiest first.
    pub fn handlers(&self) -> Vec<HandlerSummary> {
        self.lock().handlers.summaries()
    }

    /// One handler's aggregated path, or `None` when the handler is unknown.
    pub fn tree(&self, service: &str, handler: &str, format: TreeFormat) -> Option<Result<Rendered, String>> {
        let state = self.lock();
        let found = state.handlers.find(service, handler)?;
        Some(match format {
            TreeFormat::Json => Ok(Rendered::Json(found.tree())),
            TreeFormat::Folded => Ok(Rendered::Text(found.folded())),
            TreeFormat::Svg => {
                let folded = found.folded();
                let title = format!("{service}: {handler}");
                drop(state);
                flame_graph(&title, &folded).map(Rendered::Text)
            }
        })
    }
}

/// Renders collapsed stacks weighted in microseconds as a flame graph.
pub fn flame_graph(title: &str, folded: &str) -> Result<String, String> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "µs self time".to_owned();
    let mut svg = Vec::new();
    let lines: Vec<&str> = if folded.is_empty() { vec!["(no self time recorded) 1"] } else { folded.lines().collect() };
    inferno::flamegraph::from_lines(&mut options, lines, &mut svg).map_err(|e| format!("cannot render the flame graph: {e}"))?;
    String::from_utf8(svg).map_err(|e| format!("cannot render the flame graph: {e}"))
}

impl Collect for Paths {
    fn collect(&self, out: &mut Exposition) {
        // Copy under the lock, format outside it.
        let (families, spans_text, graph_text) = {
            let state = self.lock();
            let mut spans = Exposition::new();
            state.span_metrics.write(&mut spans);
            let mut graph = Exposition::new();
            state.graph.write(&mut graph);
            (state.handlers.families(), spans, graph)
        };
        out.append(spans_text);
        out.append(graph_text);
        families.write(out);
    }
}

/// Takes spans from the traces pipeline and keeps the aggregates up to date.
pub struct Processor {
    paths: Paths,
    assembler: Assembler,
    analyzer: Analyzer,
    anomalies: Anomalies,
    metrics: PathsMetrics,
    component: ComponentMetrics,
    tick: Duration,
}

/// Builds the processor and the shared aggregates it fills.
pub fn build(config: &PathsConfig, metrics: PathsMetrics, component: ComponentMetrics) -> (Paths, Processor) {
    let paths = Paths {
        state: Arc::new(Mutex::new(State {
            handlers: Handlers::new(config.max_handlers),
            span_metrics: SpanMetrics::default(),
            graph: ServiceGraph::default(),
        })),
    };
    let tick = (config.trace_timeout / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let processor = Processor {
        paths: paths.clone(),
        assembler: Assembler::new(config.trace_timeout, config.max_traces_in_flight),
        analyzer: Analyzer::default(),
        anomalies: Anomalies::default(),
        metrics,
        component,
        tick,
    };
    (paths, processor)
}

impl Processor {
    /// Takes one request's spans, received at `now`.
    pub fn ingest(&mut self, traces: &Traces, now: Instant) {
        let mut late = 0;
        let mut full = 0;
        let mut invalid = 0;
        {
            let mut state = self.paths.lock();
            let State { handlers, span_metrics, graph } = &mut *state;
            let analyzer = &mut self.analyzer;
            let anomalies = &mut self.anomalies;
            let (complete, evicted, flushed) = (&self.metrics.complete, &self.metrics.evicted, &self.metrics.flushed);
            let mut done = |spans: Vec<SpanRecord>, finish: Finish| {
                analyzer.analyze(&spans, handlers, graph, anomalies);
                count_finish(finish, complete, evicted, flushed);
            };
            for resource_spans in &traces.resource_spans {
                let attributes = resource_spans.resource.as_ref().map_or(&[][..], |r| &r.attributes[..]);
                let service: Arc<str> = span::service_name(attributes).into();
                for scope in &resource_spans.scope_spans {
                    for otlp_span in &scope.spans {
                        let Ok((trace, record)) = span::record(&service, otlp_span) else {
                            invalid += 1;
                            continue;
                        };
                        span_metrics.record(&service, &record.name, record.kind, record.status, record.duration());
                        match self.assembler.add(trace, record, now, &mut done) {
                            Added::Waiting => {}
                            Added::Late => late += 1,
                            Added::TraceFull => full += 1,
                        }
                    }
                }
            }
        }
        self.component.dropped("late", late);
        self.component.dropped("trace_too_large", full);
        self.component.dropped("invalid_id", invalid);
        self.publish();
    }

    /// Analyses every trace that has been quiet for `trace_timeout` at `now`.
    pub fn expire(&mut self, now: Instant) {
        self.finish_with(|assembler, done| assembler.expire(now, done));
    }

    /// Analyses every trace still waiting, as when the agent stops.
    pub fn flush(&mut self) {
        self.finish_with(|assembler, done| assembler.flush(done));
    }

    fn finish_with(&mut self, run: impl FnOnce(&mut Assembler, &mut dyn FnMut(Vec<SpanRecord>, Finish))) {
        if self.assembler.next_deadline().is_none() {
            return;
        }
        {
            let mut state = self.paths.lock();
            let State { handlers, graph, .. } = &mut *state;
            let analyzer = &mut self.analyzer;
            let anomalies = &mut self.anomalies;
            let (complete, evicted, flushed) = (&self.metrics.complete, &self.metrics.evicted, &self.metrics.flushed);
            let mut done = |spans: Vec<SpanRecord>, finish: Finish| {
                analyzer.analyze(&spans, handlers, graph, anomalies);
                count_finish(finish, complete, evicted, flushed);
            };
            run(&mut self.assembler, &mut done);
        }
        self.publish();
    }

    /// Moves counts and sizes into the self-metrics.
    fn publish(&mut self) {
        let a = std::mem::take(&mut self.anomalies);
        let m = &self.metrics;
        m.anomaly("duplicate_span", a.duplicate_span);
        m.anomaly("cycle", a.cycle);
        m.anomaly("clock_skew", a.clock_skew);
        m.anomaly("negative_duration", a.negative_duration);
        m.anomaly("missing_parent", a.missing_parent);
        m.anomaly("handler_overflow", a.handler_overflow);
        m.anomaly("step_overflow", a.step_overflow);
        m.anomaly("edge_overflow", a.edge_overflow);
        m.traces_in_flight.set(self.assembler.traces_in_flight() as i64);
        m.spans_in_flight.set(self.assembler.spans_in_flight() as i64);
        let state = self.paths.lock();
        m.handlers.set(state.handlers.len() as i64);
        m.span_series.set(state.span_metrics.series() as i64);
        m.edges.set(state.graph.edges() as i64);
    }

    /// Runs until the traces pipeline closes, then analyses what is still waiting. Blocking:
    /// analysis is CPU work, so it runs on a thread of its own rather than holding up the
    /// runtime's workers.
    pub fn run_blocking(mut self, mut input: ConsumerInput<Traces>, runtime: tokio::runtime::Handle) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match runtime.block_on(async { tokio::time::timeout(wait, input.recv()).await }) {
                Ok(Some(delivery)) => {
                    self.ingest(&delivery.data, Instant::now());
                    self.component.sent.inc_by(delivery.items as u64);
                }
                Ok(None) => break,
                Err(_) => {}
            }
            let now = Instant::now();
            if now >= next_tick {
                self.expire(now);
                next_tick = now + self.tick;
            }
        }
        self.flush();
    }
}

fn count_finish(
    finish: Finish,
    complete: &prometheus_client::metrics::counter::Counter,
    evicted: &prometheus_client::metrics::counter::Counter,
    flushed: &prometheus_client::metrics::counter::Counter,
) {
    match finish {
        Finish::Complete => complete.inc(),
        Finish::Evicted => evicted.inc(),
        Finish::Flushed => flushed.inc(),
    };
}

#[cfg(test)]
mod tests;
