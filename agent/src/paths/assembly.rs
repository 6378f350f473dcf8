//! Trace assembly: spans wait here, grouped by trace id, until their trace has been quiet for
//! `trace_timeout`; then the whole trace goes to analysis.
//!
//! Memory is bounded three ways: at most `max_traces` traces wait (the least recently active
//! one is handed on early, counted as evicted, when a new one arrives), at most
//! [`MAX_SPANS_PER_TRACE`] spans per trace, and a fixed-size memory of recently finished
//! trace ids so that a span arriving after its trace was analysed is counted as late instead
//! of posing as a handler of its own.

use ahash::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::span::SpanRecord;

/// Spans kept for one trace; more are counted and left out of the analysis.
pub const MAX_SPANS_PER_TRACE: usize = 10_000;

/// Why a trace left assembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Quiet for `trace_timeout`.
    Complete,
    /// Pushed out early to make room.
    Evicted,
    /// The agent is stopping.
    Flushed,
}

/// What became of a span handed to [`Assembler::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Waiting,
    /// Its trace was already analysed.
    Late,
    /// Its trace already holds [`MAX_SPANS_PER_TRACE`] spans.
    TraceFull,
}

struct Pending {
    spans: Vec<SpanRecord>,
    deadline: Instant,
}

pub struct Assembler {
    traces: HashMap<u128, Pending, RandomState>,
    /// Deadlines in the order they were set; an entry whose trace has since moved its
    /// deadline (or left) is stale and skipped.
    expiry: VecDeque<(Instant, u128)>,
    finished: RecentIds,
    timeout: Duration,
    max_traces: usize,
    spans: usize,
}

impl Assembler {
    pub fn new(timeout: Duration, max_traces: usize) -> Self {
        Assembler {
            traces: HashMap::with_hasher(RandomState::new()),
            expiry: VecDeque::new(),
            finished: RecentIds::new(max_traces.clamp(1024, 1 << 20)),
            timeout,
            max_traces: max_traces.max(1),
            spans: 0,
        }
    }

    pub fn traces_in_flight(&self) -> usize {
        self.traces.len()
    }

    pub fn spans_in_flight(&self) -> usize {
        self.spans
    }

    /// Adds a span that arrived at `now`. A trace pushed out to make room goes to `done`.
    pub fn add(
        &mut self,
        trace: u128,
        span: SpanRecord,
        now: Instant,
        done: &mut dyn FnMut(Vec<SpanRecord>, Finish),
    ) -> Added {
        let deadline = now + self.timeout;
        if let Some(pending) = self.traces.get_mut(&trace) {
            if pending.spans.len() >= MAX_SPANS_PER_TRACE {
                return Added::TraceFull;
            }
            pending.spans.push(span);
            self.spans += 1;
            if pending.deadline != deadline {
                pending.deadline = deadline;
                self.expiry.push_back((deadline, trace));
            }
            return Added::Waiting;
        }
        if self.finished.contains(trace) {
            return Added::Late;
        }
        while self.traces.len() >= self.max_traces {
            match self.pop_oldest() {
                Some(spans) => done(spans, Finish::Evicted),
                None => break,
            }
        }
        // Most traces have a handful of spans: start with room for them.
        let mut spans = Vec::with_capacity(8);
        spans.push(span);
        self.traces.insert(trace, Pending { spans, deadline });
        self.spans += 1;
        self.expiry.push_back((deadline, trace));
        Added::Waiting
    }

    /// Hands every trace that has been quiet until `now` to `done`.
    pub fn expire(&mut self, now: Instant, done: &mut dyn FnMut(Vec<SpanRecord>, Finish)) {
        while let Some(&(deadline, trace)) = self.expiry.front() {
            if deadline > now {
                break;
            }
            self.expiry.pop_front();
            if self.traces.get(&trace).is_some_and(|p| p.deadline == deadline) {
                if let Some(spans) = self.finish(trace) {
                    done(spans, Finish::Complete);
                }
            }
        }
        self.compact();
    }

    /// Hands every waiting trace to `done`, as when the agent stops.
    pub fn flush(&mut self, done: &mut dyn FnMut(Vec<SpanRecord>, Finish)) {
        while let Some((_, trace)) = self.expiry.pop_front() {
            if let Some(spans) = self.finish(trace) {
                done(spans, Finish::Flushed);
            }
        }
    }

    /// The earliest deadline that may be due, for the caller's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.expiry.front().map(|&(deadline, _)| deadline)
    }

    fn pop_oldest(&mut self) -> Option<Vec<SpanRecord>> {
        while let Some((deadline, trace)) = self.expiry.pop_front() {
            if self.traces.get(&trace).is_some_and(|p| p.deadline == deadline) {
                return self.finish(trace);
            }
        }
        None
    }

    fn finish(&mut self, trace: u128) -> Option<Vec<SpanRecord>> {
        let pending = self.traces.remove(&trace)?;
        self.spans -= pending.spans.len();
        self.finished.insert(trace);
        Some(pending.spans)
    }

    /// Stale deadline entries pile up when traces get spans in many batches; drop them once
    /// they outnumber live traces by far, so the queue stays proportional to what waits.
    fn compact(&mut self) {
        if self.expiry.len() > 4 * self.traces.len() + 1024 {
            let traces = &self.traces;
            self.expiry.retain(|(deadline, trace)| traces.get(trace).is_some_and(|p| p.deadline == *deadline));
        }
    }
}

/// A fixed number of the most recently inserted ids.
struct RecentIds {
    set: HashSet<u128, RandomState>,
    order: VecDeque<u128>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        RecentIds { set: HashSet::with_hasher(RandomState::new()), order: VecDeque::new(), capacity }
    }

    fn contains(&self, id: u128) -> bool {
        self.set.contains(&id)
    }

    fn insert(&mut self, id: u128) {
        if self.set.insert(id) {
            self.order.push_back(id);
            if self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::span::{Kind, StatusCode};

    fn span(id: u64) -> SpanRecord {
        SpanRecord {
            span_id: id,
            parent_id: 0,
            start: 0,
            end: 1,
            service: "svc".into(),
            name: "op".into(),
            route: None,
            peer: None,
            kind: Kind::Internal,
            status: StatusCode::Unset,
        }
    }

    fn collect(out: &mut Vec<(usize, Finish)>) -> impl FnMut(Vec<SpanRecord>, Finish) + '_ {
        move |spans, finish| out.push((spans.len(), finish))
    }

    #[test]
    fn a_trace_completes_after_it_has_been_quiet_for_the_timeout() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut assembler = Assembler::new(timeout, 10);
        let mut out = Vec::new();
        assembler.add(1, span(1), t0, &mut collect(&mut out));
        assembler.add(1, span(2), t0 + Duration::from_secs(3), &mut collect(&mut out));
        assembler.expire(t0 + Duration::from_secs(6), &mut collect(&mut out));
        assert!(out.is_empty(), "the second span moved the deadline");
        assembler.expire(t0 + Duration::from_secs(8), &mut collect(&mut out));
        assert_eq!(out, vec![(2, Finish::Complete)]);
        assert_eq!(assembler.traces_in_flight(), 0);
        assert_eq!(assembler.spans_in_flight(), 0);
        assert_eq!(assembler.add(1, span(3), t0 + Duration::from_secs(9), &mut collect(&mut out)), Added::Late);
    }

    #[test]
    fn the_least_recently_active_trace_is_evicted_for_a_new_one() {
        let t0 = Instant::now();
        let mut assembler = Assembler::new(Duration::from_secs(5), 2);
        let mut out = Vec::new();
        assembler.add(1, span(1), t0, &mut collect(&mut out));
        assembler.add(2, span(2), t0 + Duration::from_millis(1), &mut collect(&mut out));
        assembler.add(1, span(3), t0 + Duration::from_millis(2), &mut collect(&mut out));
        assembler.add(3, span(4), t0 + Duration::from_millis(3), &mut collect(&mut out));
        assert_eq!(out, vec![(1, Finish::Evicted)], "trace 2 was the least recently active");
        assert_eq!(assembler.traces_in_flight(), 2);
        assembler.flush(&mut collect(&mut out));
        assert_eq!(out, vec![(1, Finish::Evicted), (2, Finish::Flushed), (1, Finish::Flushed)]);
    }

    #[test]
    fn spans_beyond_the_per_trace_bound_are_refused() {
        let t0 = Instant::now();
        let mut assembler = Assembler::new(Duration::from_secs(5), 2);
        let mut out = Vec::new();
        for i in 0..MAX_SPANS_PER_TRACE as u64 {
            assert_eq!(assembler.add(7, span(i + 1), t0, &mut collect(&mut out)), Added::Waiting);
        }
        assert_eq!(assembler.add(7, span(u64::MAX), t0, &mut collect(&mut out)), Added::TraceFull);
        assert_eq!(assembler.spans_in_flight(), MAX_SPANS_PER_TRACE);
    }

    #[test]
    fn unending_unique_traces_stay_within_bounds() {
        let t0 = Instant::now();
        let mut assembler = Assembler::new(Duration::from_secs(3600), 100);
        let mut evicted = 0;
        for i in 0..100_000u128 {
            assembler.add(i + 1, span(1), t0 + Duration::from_micros(i as u64), &mut |_, _| evicted += 1);
        }
        assert_eq!(assembler.traces_in_flight(), 100);
        assert_eq!(evicted, 100_000 - 100);
        assert!(assembler.expiry.len() <= 100_000);
        assert!(assembler.finished.order.len() <= 1024);
    }
}
