//! Analysis of one assembled trace: find each service's entry spans (its handlers), walk each
//! handler's own spans, measure self time and the critical path, and add the result to the
//! handler's aggregates and the service graph.
//!
//! A handler's tree holds only its own service's spans: a call into another service is a leaf
//! step here (the time waiting on it), and that service's spans make up a handler of its own.
//!
//! Broken input is tolerated and counted: duplicate span ids (the first wins), spans that are
//! their own parent or sit on a parent cycle (left out), children that start before or end
//! after their parent (clipped to the parent, as Jaeger does for its critical path) and spans
//! that end before they start (treated as lasting nothing).

use super::handlers::{Call, Handlers, Lookup, ROOT};
use super::red::{Request, ServiceGraph};
use super::span::{Kind, SpanRecord};

const NONE: u32 = u32::MAX;

/// Problems found in traces, and what was cut to stay within bounds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Anomalies {
    pub duplicate_span: u64,
    pub cycle: u64,
    pub clock_skew: u64,
    pub negative_duration: u64,
    /// A span other than a server or consumer span whose parent never arrived.
    pub missing_parent: u64,
    /// Traces counted under the overflow handler.
    pub handler_overflow: u64,
    /// Spans left out of a handler's tree because it has [`super::handlers::MAX_STEPS`] steps.
    pub step_overflow: u64,
    /// Requests counted under the overflow edge of the service graph.
    pub edge_overflow: u64,
}

/// Scratch space reused from trace to trace.
#[derive(Default)]
pub struct Analyzer {
    order: Vec<u32>,
    alive: Vec<bool>,
    parent: Vec<u32>,
    /// Children of the same service, grouped by parent and sorted by start.
    child_start: Vec<u32>,
    /// The same children, grouped by parent and sorted by end, latest first.
    child_end: Vec<u32>,
    child_offset: Vec<u32>,
    clip: Vec<(u64, u64)>,
    visited: Vec<bool>,
    walk: Vec<u32>,
    stack: Vec<u32>,
    step: Vec<u32>,
    critical: Vec<u64>,
    cursor: Vec<u32>,
    paired: Vec<bool>,
    steps_taken: Vec<u32>,
}

impl Analyzer {
    /// Analyses one trace's spans into `handlers` and `graph`.
    pub fn analyze(
        &mut self,
        spans: &[SpanRecord],
        handlers: &mut Handlers,
        graph: &mut ServiceGraph,
        anomalies: &mut Anomalies,
    ) {
        let n = spans.len();
        if n == 0 || n >= NONE as usize {
            return;
        }
        self.link(spans, anomalies);
        self.children(spans);

        // Handlers: entry spans are those whose parent is not a span of their own service.
        self.visited.clear();
        self.visited.resize(n, false);
        self.clip.clear();
        self.clip.resize(n, (0, 0));
        self.critical.clear();
        self.critical.resize(n, 0);
        self.step.clear();
        self.step.resize(n, NONE);
        for entry in 0..n {
            if self.alive[entry] && self.is_entry(spans, entry) {
                self.handler(spans, entry as u32, handlers, anomalies);
            }
        }
        let unreachable = (0..n).filter(|&i| self.alive[i] && !self.visited[i]).count();
        anomalies.cycle += unreachable as u64;

        self.service_graph(spans, graph, anomalies);
    }

    fn is_entry(&self, spans: &[SpanRecord], i: usize) -> bool {
        match self.parent[i] {
            NONE => true,
            p => spans[p as usize].service != spans[i].service,
        }
    }

    /// Resolves parents by span id and marks duplicates and self-parents.
    fn link(&mut self, spans: &[SpanRecord], anomalies: &mut Anomalies) {
        let n = spans.len();
        self.order.clear();
        self.order.extend(0..n as u32);
        self.order.sort_unstable_by_key(|&i| (spans[i as usize].span_id, i));
        self.alive.clear();
        self.alive.resize(n, true);
        for pair in self.order.windows(2) {
            if spans[pair[0] as usize].span_id == spans[pair[1] as usize].span_id {
                self.alive[pair[1] as usize] = false;
                anomalies.duplicate_span += 1;
            }
        }
        self.parent.clear();
        self.parent.resize(n, NONE);
        for i in 0..n {
            let span = &spans[i];
            if !self.alive[i] {
                continue;
            }
            if span.end < span.start {
                anomalies.negative_duration += 1;
            }
            if span.parent_id == 0 {
                continue;
            }
            if span.parent_id == span.span_id {
                anomalies.cycle += 1;
                self.alive[i] = false;
                continue;
            }
            let found = self
                .order
                .binary_search_by_key(&(span.parent_id, 0), |&j| (spans[j as usize].span_id, 0))
                .ok()
                .map(|pos| self.first_with_id(spans, pos));
            match found {
                Some(p) => self.parent[i] = p,
                None if !matches!(span.kind, Kind::Server | Kind::Consumer) => anomalies.missing_parent += 1,
                None => {}
            }
        }
    }

    /// The first live span in `order` with the id found at `pos`.
    fn first_with_id(&self, spans: &[SpanRecord], mut pos: usize) -> u32 {
        let id = spans[self.order[pos] as usize].span_id;
        while pos > 0 && spans[self.order[pos - 1] as usize].span_id == id {
            pos -= 1;
        }
        self.order[pos]
    }

    /// Builds both children lists (same service only) as offsets into flat arrays.
    fn children(&mut self, spans: &[SpanRecord]) {
        let n = spans.len();
        self.child_offset.clear();
        self.child_offset.resize(n + 1, 0);
        for i in 0..n {
            let p = self.parent[i];
            if self.alive[i] && p != NONE && spans[p as usize].service == spans[i].service {
                self.child_offset[p as usize + 1] += 1;
            }
        }
        for i in 0..n {
            self.child_offset[i + 1] += self.child_offset[i];
        }
        let total = self.child_offset[n] as usize;
        self.child_start.clear();
        self.child_start.resize(total, 0);
        self.cursor.clear();
        self.cursor.extend_from_slice(&self.child_offset[..n]);
        for i in 0..n {
            let p = self.parent[i];
            if self.alive[i] && p != NONE && spans[p as usize].service == spans[i].service {
                let at = &mut self.cursor[p as usize];
                self.child_start[*at as usize] = i as u32;
                *at += 1;
            }
        }
        for i in 0..n {
            let range = self.child_offset[i] as usize..self.child_offset[i + 1] as usize;
            self.child_start[range].sort_unstable_by_key(|&c| (spans[c as usize].start, c));
        }
        self.child_end.clear();
        self.child_end.extend_from_slice(&self.child_start);
    }

    fn kids(&self, i: u32) -> std::ops::Range<usize> {
        self.child_offset[i as usize] as usize..self.child_offset[i as usize + 1] as usize
    }

    /// Walks one handler's spans and adds the trace to its aggregates.
    fn handler(&mut self, spans: &[SpanRecord], entry: u32, handlers: &mut Handlers, anomalies: &mut Anomalies) {
        let root = &spans[entry as usize];
        let (index, overflow) = match handlers.lookup(&root.service, root.handler_name(), root.kind) {
            Lookup::Found(index) => (index, false),
            Lookup::Overflow(index) => (index, true),
        };
        if overflow {
            anomalies.handler_overflow += 1;
        }
        let handler = handlers.get_mut(index);
        handler.begin_trace();

        // Pre-order walk, clipping each span to its parent's interval.
        self.walk.clear();
        self.stack.clear();
        self.stack.push(entry);
        self.clip[entry as usize] = (root.start, root.end.max(root.start));
        self.step[entry as usize] = ROOT;
        while let Some(i) = self.stack.pop() {
            if self.visited[i as usize] {
                continue;
            }
            self.visited[i as usize] = true;
            self.walk.push(i);
            let (parent_start, parent_end) = self.clip[i as usize];
            let parent_step = self.step[i as usize];
            for k in self.kids(i) {
                let c = self.child_start[k];
                if self.visited[c as usize] {
                    continue;
                }
                let child = &spans[c as usize];
                let (start, end) = (child.start, child.end.max(child.start));
                if start < parent_start || end > parent_end {
                    anomalies.clock_skew += 1;
                }
                let clipped_start = start.clamp(parent_start, parent_end);
                let clipped_end = end.clamp(clipped_start, parent_end);
                self.clip[c as usize] = (clipped_start, clipped_end);
                self.step[c as usize] = match parent_step {
                    NONE => NONE,
                    p => match handler.child(p, &child.name, child.kind) {
                        Some(step) => step,
                        None => {
                            // The overflow handler keeps its root only, by design.
                            anomalies.step_overflow += u64::from(!overflow);
                            NONE
                        }
                    },
                };
                self.stack.push(c);
            }
        }

        // Children by clipped end, latest first, for the critical path.
        for &i in &self.walk {
            let range = self.kids(i);
            let clip = &self.clip;
            self.child_end[range].sort_unstable_by(|&a, &b| clip[b as usize].1.cmp(&clip[a as usize].1).then(a.cmp(&b)));
        }
        self.critical_path(entry);

        // Record every call, then the trace.
        let origin = self.clip[entry as usize].0;
        self.steps_taken.clear();
        for &i in &self.walk {
            let step = self.step[i as usize];
            if step == NONE {
                continue;
            }
            let (start, end) = self.clip[i as usize];
            let call = Call {
                duration_ns: end - start,
                self_ns: end - start - self.covered_by_children(i),
                critical_ns: self.critical[i as usize],
                start_offset_ns: start - origin,
                error: spans[i as usize].is_error(),
            };
            handler.record(step, call);
            if step != ROOT {
                self.steps_taken.push(step);
            }
        }
        self.steps_taken.sort_unstable();
        self.steps_taken.dedup();
        let (start, end) = self.clip[entry as usize];
        handler.end_trace(end - start, root.is_error(), &self.steps_taken);
    }

    /// The length of the union of `i`'s children's clipped intervals.
    fn covered_by_children(&self, i: u32) -> u64 {
        let mut covered = 0;
        let mut current: Option<(u64, u64)> = None;
        // Sorted by raw start; clipping to the parent keeps that order.
        for k in self.kids(i) {
            let c = self.child_start[k] as usize;
            if !self.visited[c] {
                continue;
            }
            let (start, end) = self.clip[c];
            current = match current {
                Some((s, e)) if start <= e => Some((s, e.max(end))),
                Some((s, e)) => {
                    covered += e - s;
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some((s, e)) = current {
            covered += e - s;
        }
        covered
    }

    /// Jaeger's critical path: from the end of the entry span walk back, always into the
    /// child that finished last before the point reached; time not covered by such a child
    /// belongs to the span itself. The segments partition the entry span's duration.
    ///
    /// Unlike Jaeger, a child that ends exactly where the previous one started is followed
    /// (`<=`), so back-to-back steps are not charged to their parent. Each child is
    /// considered once per parent (the cursor only moves forward, as the point reached only
    /// moves back), so the walk is linear in the number of spans.
    fn critical_path(&mut self, entry: u32) {
        for &i in &self.walk {
            self.cursor[i as usize] = self.child_offset[i as usize];
        }
        let mut current = entry;
        let mut returning: Option<u64> = None;
        loop {
            let (start, end) = self.clip[current as usize];
            let bound = returning.unwrap_or(end);
            let range = self.kids(current);
            let mut next = None;
            let mut at = self.cursor[current as usize] as usize;
            while at < range.end {
                let c = self.child_end[at];
                at += 1;
                if !self.visited[c as usize] {
                    continue;
                }
                let child_end = self.clip[c as usize].1;
                if returning.is_none_or(|r| child_end <= r) {
                    next = Some(c);
                    break;
                }
            }
            self.cursor[current as usize] = at as u32;
            match next {
                Some(child) => {
                    let child_end = self.clip[child as usize].1;
                    self.critical[current as usize] += bound.saturating_sub(child_end);
                    current = child;
                    returning = None;
                }
                None => {
                    self.critical[current as usize] += bound.saturating_sub(start);
                    if current == entry {
                        break;
                    }
                    returning = Some(start);
                    current = self.parent[current as usize];
                }
            }
        }
    }

    /// Pairs client and server spans into service-graph requests.
    fn service_graph(&mut self, spans: &[SpanRecord], graph: &mut ServiceGraph, anomalies: &mut Anomalies) {
        let n = spans.len();
        self.paired.clear();
        self.paired.resize(n, false);
        for i in 0..n {
            let server = &spans[i];
            if !self.alive[i] || !matches!(server.kind, Kind::Server | Kind::Consumer) {
                continue;
            }
            let p = self.parent[i];
            if p == NONE {
                continue;
            }
            let client = &spans[p as usize];
            if matches!(client.kind, Kind::Client | Kind::Producer) && client.service != server.service {
                self.paired[p as usize] = true;
                let kept = graph.record(Request {
                    client: &client.service,
                    server: &server.service,
                    client_ns: Some(client.duration()),
                    server_ns: Some(server.duration()),
                    failed: client.is_error() || server.is_error(),
                });
                anomalies.edge_overflow += u64::from(!kept);
            }
        }
        for (i, client) in spans.iter().enumerate() {
            if !self.alive[i] || self.paired[i] || !matches!(client.kind, Kind::Client | Kind::Producer) {
                continue;
            }
            if let Some(peer) = client.peer.as_deref() {
                if *peer == *client.service {
                    continue;
                }
                let kept = graph.record(Request {
                    client: &client.service,
                    server: peer,
                    client_ns: Some(client.duration()),
                    server_ns: None,
                    failed: client.is_error(),
                });
                anomalies.edge_overflow += u64::from(!kept);
            }
        }
    }
}
