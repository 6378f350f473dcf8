//! Per-handler aggregates: the tree of steps, per-step statistics in constant space, and the
//! variants of the path. Filled by [`super::analysis`], read by the API and the Prometheus
//! exporter.
//!
//! Bounds: at most `max_handlers` handlers (traces of further handlers are counted under
//! [`OVERFLOW`], root only), [`MAX_STEPS`] steps per handler and [`MAX_VARIANTS`] variants per
//! handler (the rest are counted as one "other" variant). Durations are kept in DDSketches
//! with 1 % relative error and in fixed-bucket histograms for Prometheus.

use ahash::RandomState;
use serde::Serialize;
use sketches_ddsketch::{Config as SketchConfig, DDSketch};
use std::collections::HashMap;
use std::sync::Arc;

use super::span::Kind;
use crate::telemetry::exposition::{Exposition, Histogram, Type};

/// The service and handler name that traces of handlers beyond `max_handlers` are counted under.
pub const OVERFLOW: &str = "__overflow__";
/// Steps kept per handler; deeper or wider trees are cut and the cut counted.
pub const MAX_STEPS: usize = 256;
/// Variants kept per handler; traces of further variants are counted together.
pub const MAX_VARIANTS: usize = 64;
/// The relative error of every quantile reported.
pub const SKETCH_RELATIVE_ERROR: f64 = 0.01;
/// Upper bounds (seconds) of the `periscope_path_step_*_seconds` histograms.
pub static STEP_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn sketch() -> DDSketch {
    // Values in milliseconds; below a nanosecond counts as zero.
    DDSketch::new(SketchConfig::new(SKETCH_RELATIVE_ERROR, 2048, 1e-6))
}

/// A quantile, kept within the exact minimum and maximum the sketch also tracks (so a step
/// that always takes 100 ms reports 100, not the middle of its bucket).
fn quantile(sketch: &DDSketch, q: f64) -> f64 {
    match (sketch.quantile(q), sketch.min(), sketch.max()) {
        (Ok(Some(value)), Some(min), Some(max)) => value.clamp(min, max),
        _ => 0.0,
    }
}

const NS_PER_MS: f64 = 1e6;
const NS_PER_S: f64 = 1e9;

/// One step of a handler's path: every span with this name under the same parent step.
pub struct Step {
    name: Box<str>,
    kind: Kind,
    /// The path from the root joined with ` > ` (the root's is its name).
    path: Box<str>,
    /// The path below the root, as variants list it; empty for the root.
    relative_path: Box<str>,
    children: Vec<u32>,
    /// Traces in which the step occurs.
    traces: u64,
    calls: u64,
    errors: u64,
    duration_ms: DDSketch,
    self_ms: DDSketch,
    duration_hist: Histogram,
    self_hist: Histogram,
    self_ns_total: u64,
    critical_ns: u64,
    start_offset_ns_total: u128,
    /// The last trace that touched this step, to count `traces` once per trace.
    mark: u64,
}

impl Step {
    fn new(name: &str, kind: Kind, path: Box<str>, relative_path: Box<str>) -> Step {
        Step {
            name: name.into(),
            kind,
            path,
            relative_path,
            children: Vec::new(),
            traces: 0,
            calls: 0,
            errors: 0,
            duration_ms: sketch(),
            self_ms: sketch(),
            duration_hist: Histogram::new(&STEP_BUCKETS),
            self_hist: Histogram::new(&STEP_BUCKETS),
            self_ns_total: 0,
            critical_ns: 0,
            start_offset_ns_total: 0,
            mark: 0,
        }
    }

    fn mean_start_offset(&self) -> u128 {
        self.start_offset_ns_total / u128::from(self.calls.max(1))
    }
}

/// One call of a step in one trace, as analysis measured it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Call {
    pub duration_ns: u64,
    pub self_ns: u64,
    pub critical_ns: u64,
    pub start_offset_ns: u64,
    pub error: bool,
}

struct Variant {
    traces: u64,
    latency_ms: DDSketch,
}

impl Variant {
    fn new() -> Self {
        Variant { traces: 0, latency_ms: sketch() }
    }

    fn add(&mut self, latency_ms: f64) {
        self.traces += 1;
        self.latency_ms.add(latency_ms);
    }
}

/// A service's handler and everything aggregated for it.
pub struct Handler {
    service: Arc<str>,
    name: Box<str>,
    steps: Vec<Step>,
    max_steps: usize,
    variants: HashMap<Box<[u32]>, Variant, RandomState>,
    other_variants: Option<Variant>,
    traces: u64,
    errors: u64,
    critical_total_ns: u64,
    trace_seq: u64,
}

pub const ROOT: u32 = 0;

impl Handler {
    fn new(service: Arc<str>, name: &str, kind: Kind, max_steps: usize) -> Handler {
        let root = Step::new(name, kind, name.into(), "".into());
        Handler {
            service,
            name: name.into(),
            steps: vec![root],
            max_steps,
            variants: HashMap::with_hasher(RandomState::new()),
            other_variants: None,
            traces: 0,
            errors: 0,
            critical_total_ns: 0,
            trace_seq: 0,
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts recording one trace of this handler.
    pub fn begin_trace(&mut self) {
        self.trace_seq += 1;
    }

    /// The step called `name` under `parent`, created if there is room.
    pub fn child(&mut self, parent: u32, name: &str, kind: Kind) -> Option<u32> {
        let parent_step = self.steps.get(parent as usize)?;
        if let Some(&id) = parent_step.children.iter().find(|&&c| &*self.steps[c as usize].name == name) {
            return Some(id);
        }
        if self.steps.len() >= self.max_steps {
            return None;
        }
        let path = format!("{} > {name}", parent_step.path).into_boxed_str();
        let relative = if parent == ROOT {
            name.into()
        } else {
            format!("{} > {name}", parent_step.relative_path).into_boxed_str()
        };
        let id = self.steps.len() as u32;
        self.steps.push(Step::new(name, kind, path, relative));
        self.steps[parent as usize].children.push(id);
        Some(id)
    }

    /// Records one call of `step` in the current trace.
    pub fn record(&mut self, step: u32, call: Call) {
        let seq = self.trace_seq;
        let Some(step) = self.steps.get_mut(step as usize) else { return };
        if step.mark != seq {
            step.mark = seq;
            step.traces += 1;
        }
        step.calls += 1;
        step.errors += u64::from(call.error);
        step.duration_ms.add(call.duration_ns as f64 / NS_PER_MS);
        step.self_ms.add(call.self_ns as f64 / NS_PER_MS);
        step.duration_hist.observe(call.duration_ns as f64 / NS_PER_S);
        step.self_hist.observe(call.self_ns as f64 / NS_PER_S);
        step.self_ns_total += call.self_ns;
        step.critical_ns += call.critical_ns;
        step.start_offset_ns_total += u128::from(call.start_offset_ns);
    }

    /// Ends the current trace: its latency, whether it failed, and the steps it took (sorted,
    /// without duplicates, without the root).
    pub fn end_trace(&mut self, latency_ns: u64, error: bool, steps: &[u32]) {
        self.traces += 1;
        self.errors += u64::from(error);
        self.critical_total_ns += latency_ns;
        let latency_ms = latency_ns as f64 / NS_PER_MS;
        if let Some(variant) = self.variants.get_mut(steps) {
            variant.add(latency_ms);
        } else if self.variants.len() < MAX_VARIANTS {
            self.variants.entry(steps.into()).or_insert_with(Variant::new).add(latency_ms);
        } else {
            self.other_variants.get_or_insert_with(Variant::new).add(latency_ms);
        }
    }

    pub fn traces(&self) -> u64 {
        self.traces
    }

    /// Steps in display order: depth first, siblings by their typical start offset.
    fn ordered_children(&self, step: u32) -> Vec<u32> {
        let mut children = self.steps[step as usize].children.clone();
        children.sort_by_key(|&c| (self.steps[c as usize].mean_start_offset(), c));
        children
    }

    fn depth_first(&self) -> Vec<u32> {
        let mut order = Vec::with_capacity(self.steps.len());
        let mut stack = vec![ROOT];
        while let Some(step) = stack.pop() {
            order.push(step);
            stack.extend(self.ordered_children(step).into_iter().rev());
        }
        order
    }

    pub fn summary(&self) -> HandlerSummary {
        let root = &self.steps[ROOT as usize];
        HandlerSummary {
            service: self.service.to_string(),
            handler: self.name.to_string(),
            traces: self.traces,
            p50_ms: round(quantile(&root.duration_ms, 0.5)),
            p99_ms: round(quantile(&root.duration_ms, 0.99)),
            error_rate: ratio(self.errors, self.traces),
        }
    }

    /// The execution path JSON of the SPEC.
    pub fn tree(&self) -> TreeJson {
        let order = self.depth_first();
        let position: HashMap<u32, usize> = order.iter().enumerate().map(|(i, &s)| (s, i)).collect();
        let mut variants: Vec<VariantJson> = self
            .variants
            .iter()
            .map(|(steps, variant)| {
                let mut steps: Vec<u32> = steps.to_vec();
                steps.sort_by_key(|s| position.get(s).copied().unwrap_or(usize::MAX));
                VariantJson {
                    share: ratio(variant.traces, self.traces),
                    traces: variant.traces,
                    p50_ms: round(quantile(&variant.latency_ms, 0.5)),
                    p99_ms: round(quantile(&variant.latency_ms, 0.99)),
                    steps: steps.iter().map(|&s| self.steps[s as usize].relative_path.to_string()).collect(),
                }
            })
            .collect();
        if let Some(other) = &self.other_variants {
            variants.push(VariantJson {
                share: ratio(other.traces, self.traces),
                traces: other.traces,
                p50_ms: round(quantile(&other.latency_ms, 0.5)),
                p99_ms: round(quantile(&other.latency_ms, 0.99)),
                steps: vec!["(other variants)".to_owned()],
            });
        }
        variants.sort_by(|a, b| b.traces.cmp(&a.traces).then_with(|| a.steps.cmp(&b.steps)));
        TreeJson {
            service: self.service.to_string(),
            handler: self.name.to_string(),
            traces: self.traces,
            root: self.step_json(ROOT),
            variants,
        }
    }

    fn step_json(&self, id: u32) -> StepJson {
        let step = &self.steps[id as usize];
        let quantiles = |sketch: &DDSketch| Quantiles {
            p50: round(quantile(sketch, 0.5)),
            p90: round(quantile(sketch, 0.9)),
            p99: round(quantile(sketch, 0.99)),
        };
        StepJson {
            name: step.name.to_string(),
            kind: step.kind.as_str(),
            count: step.traces,
            calls_per_trace: round(step.calls as f64 / step.traces.max(1) as f64),
            duration_ms: quantiles(&step.duration_ms),
            self_ms: quantiles(&step.self_ms),
            critical_share: round(step.critical_ns as f64 / self.critical_total_ns.max(1) as f64),
            error_rate: ratio(step.errors, step.calls),
            children: self.ordered_children(id).into_iter().map(|c| self.step_json(c)).collect(),
        }
    }

    /// Collapsed stacks weighted by self time in microseconds, one line per step that has any.
    pub fn folded(&self) -> String {
        let mut out = String::new();
        let mut stack: Vec<(u32, String)> = vec![(ROOT, frame(&self.steps[ROOT as usize].name))];
        while let Some((id, prefix)) = stack.pop() {
            let step = &self.steps[id as usize];
            let micros = step.self_ns_total / 1000;
            if micros > 0 {
                out.push_str(&prefix);
                out.push(' ');
                out.push_str(&micros.to_string());
                out.push('\n');
            }
            for child in self.ordered_children(id).into_iter().rev() {
                stack.push((child, format!("{prefix};{}", frame(&self.steps[child as usize].name))));
            }
        }
        out
    }

    fn collect(&self, out: &mut PathFamilies) {
        let service = &*self.service;
        let handler = &*self.name;
        out.traces.push((service.into(), handler.into(), self.traces));
        for step in &self.steps {
            if step.calls == 0 {
                continue;
            }
            out.steps.push(StepSeries {
                service: service.into(),
                handler: handler.into(),
                step: step.path.to_string(),
                duration: step.duration_hist.clone(),
                self_time: step.self_hist.clone(),
                critical_seconds: step.critical_ns as f64 / NS_PER_S,
            });
        }
    }
}

/// A frame of collapsed-stack text: `;` separates frames and a line is one stack, so neither
/// can be part of a name.
fn frame(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            ';' => ':',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect()
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round(part as f64 / whole as f64)
    }
}

/// Four significant decimals are plenty for people and keep the JSON short.
fn round(value: f64) -> f64 {
    (value * 10_000.0).round() / 10_000.0
}

#[derive(Debug, Serialize)]
pub struct HandlerSummary {
    pub service: String,
    pub handler: String,
    pub traces: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub error_rate: f64,
}

#[derive(Debug, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

#[derive(Debug, Serialize)]
pub struct StepJson {
    pub name: String,
    pub kind: &'static str,
    pub count: u64,
    pub calls_per_trace: f64,
    pub duration_ms: Quantiles,
    pub self_ms: Quantiles,
    pub critical_share: f64,
    pub error_rate: f64,
    pub children: Vec<StepJson>,
}

#[derive(Debug, Serialize)]
pub struct VariantJson {
    pub share: f64,
    pub traces: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub steps: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct TreeJson {
    pub service: String,
    pub handler: String,
    pub traces: u64,
    pub root: StepJson,
    pub variants: Vec<VariantJson>,
}

/// Every handler, within the bound.
pub struct Handlers {
    by_service: HashMap<Arc<str>, HashMap<Box<str>, usize, RandomState>, RandomState>,
    handlers: Vec<Handler>,
    overflow: Option<usize>,
    max_handlers: usize,
}

/// How a handler was found.
pub enum Lookup {
    Found(usize),
    /// Counted under [`OVERFLOW`] because `max_handlers` are already known.
    Overflow(usize),
}

impl Handlers {
    pub fn new(max_handlers: usize) -> Self {
        Handlers {
            by_service: HashMap::with_hasher(RandomState::new()),
            handlers: Vec::new(),
            overflow: None,
            max_handlers: max_handlers.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.handlers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    pub fn get_mut(&mut self, index: usize) -> &mut Handler {
        &mut self.handlers[index]
    }

    /// The handler `name` of `service`, created while there is room.
    pub fn lookup(&mut self, service: &Arc<str>, name: &str, kind: Kind) -> Lookup {
        if let Some(&index) = self.by_service.get(service).and_then(|names| names.get(name)) {
            return Lookup::Found(index);
        }
        let known = self.handlers.len() - usize::from(self.overflow.is_some());
        if known >= self.max_handlers {
            let index = match self.overflow {
                Some(index) => index,
                None => {
                    let index = self.handlers.len();
                    let service: Arc<str> = OVERFLOW.into();
                    self.handlers.push(Handler::new(service.clone(), OVERFLOW, Kind::Unspecified, 1));
                    self.by_service
                        .entry(service)
                        .or_insert_with(|| HashMap::with_hasher(RandomState::new()))
                        .insert(OVERFLOW.into(), index);
                    self.overflow = Some(index);
                    index
                }
            };
            return Lookup::Overflow(index);
        }
        let index = self.handlers.len();
        self.handlers.push(Handler::new(service.clone(), name, kind, MAX_STEPS));
        self.by_service
            .entry(service.clone())
            .or_insert_with(|| HashMap::with_hasher(RandomState::new()))
            .insert(name.into(), index);
        Lookup::Found(index)
    }

    pub fn find(&self, service: &str, name: &str) -> Option<&Handler> {
        let index = *self.by_service.get(service)?.get(name)?;
        self.handlers.get(index)
    }

    /// Every handler, the busiest first.
    pub fn summaries(&self) -> Vec<HandlerSummary> {
        let mut all: Vec<HandlerSummary> = self.handlers.iter().map(Handler::summary).collect();
        all.sort_by(|a, b| b.traces.cmp(&a.traces).then_with(|| (&a.service, &a.handler).cmp(&(&b.service, &b.handler))));
        all
    }

    /// A copy of what the Prometheus exporter shows, taken quickly under the lock.
    pub fn families(&self) -> PathFamilies {
        let mut families = PathFamilies::default();
        for handler in &self.handlers {
            handler.collect(&mut families);
        }
        families
    }
}

struct StepSeries {
    service: String,
    handler: String,
    step: String,
    duration: Histogram,
    self_time: Histogram,
    critical_seconds: f64,
}

/// The `periscope_path_*` families, copied out of the aggregates.
#[derive(Default)]
pub struct PathFamilies {
    traces: Vec<(String, String, u64)>,
    steps: Vec<StepSeries>,
}

impl PathFamilies {
    pub fn write(&self, out: &mut Exposition) {
        out.family("periscope_path_traces_total", "Traces analysed per handler.", Type::Counter);
        for (service, handler, traces) in &self.traces {
            out.sample("periscope_path_traces_total", &[("service", service), ("handler", handler)], *traces as f64);
        }
        out.family(
            "periscope_path_step_duration_seconds",
            "Duration of each call of a step of a handler's execution path.",
            Type::Histogram,
        );
        for s in &self.steps {
            let labels = [("service", &*s.service), ("handler", &*s.handler), ("step", &*s.step)];
            out.histogram("periscope_path_step_duration_seconds", &labels, &s.duration);
        }
        out.family(
            "periscope_path_step_self_seconds",
            "Self time (duration minus the union of its children) of each call of a step.",
            Type::Histogram,
        );
        for s in &self.steps {
            let labels = [("service", &*s.service), ("handler", &*s.handler), ("step", &*s.step)];
            out.histogram("periscope_path_step_self_seconds", &labels, &s.self_time);
        }
        out.family(
            "periscope_path_critical_seconds_total",
            "Time a step spent on its handler's critical path.",
            Type::Counter,
        );
        for s in &self.steps {
            let labels = [("service", &*s.service), ("handler", &*s.handler), ("step", &*s.step)];
            out.sample("periscope_path_critical_seconds_total", &labels, s.critical_seconds);
        }
    }
}
