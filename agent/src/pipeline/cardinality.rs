//! The cardinality guard of OTLP metrics (`sources.otlp.max_metric_series`).
//!
//! A series is a resource (its attributes), a metric name and a data point's attributes: what
//! becomes one Prometheus series (or one set of bucket series) downstream. The guard keeps
//! the series it has seen, up to the limit; data points of further series are taken out of
//! the request before it enters the pipeline, counted (`reason="series_limit"`) and reported
//! to the sender as OTLP partial success. A series nobody sent for [`EXPIRY`] is forgotten,
//! so a sender that went away frees its room.
//!
//! The guard holds one 64-bit hash and a timestamp per series (about 20 bytes), never the
//! labels themselves.

use ahash::RandomState;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::signal::Metrics;

/// A series not sent for this long is forgotten (as the pull endpoint forgets it).
pub const EXPIRY: Duration = crate::exporters::prometheus::store::EXPIRY;
/// How often forgotten series are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub struct SeriesLimit {
    limit: usize,
    hasher: RandomState,
    started: Instant,
    state: Mutex<State>,
}

struct State {
    /// Series hash → when it was last sent, in seconds since `started`.
    seen: HashMap<u64, u32, RandomState>,
    last_sweep: u32,
}

impl SeriesLimit {
    pub fn new(limit: usize) -> SeriesLimit {
        SeriesLimit {
            limit,
            hasher: RandomState::with_seeds(0x5eed, 0xcafe, 0xf00d, 0xbeef),
            started: Instant::now(),
            state: Mutex::new(State { seen: HashMap::with_hasher(RandomState::new()), last_sweep: 0 }),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Series being tracked.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.seen.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the data points of series beyond the limit out of `request`; returns how many.
    pub fn apply(&self, request: &mut Metrics) -> u64 {
        self.apply_at(request, self.started.elapsed())
    }

    fn apply_at(&self, request: &mut Metrics, now: Duration) -> u64 {
        let now = u32::try_from(now.as_secs()).unwrap_or(u32::MAX);
        let Ok(mut state) = self.state.lock() else { return 0 };
        let state = &mut *state;
        if now.saturating_sub(state.last_sweep) >= SWEEP_EVERY.as_secs() as u32 {
            let expiry = EXPIRY.as_secs() as u32;
            state.seen.retain(|_, seen| now.saturating_sub(*seen) < expiry);
            state.last_sweep = now;
        }
        let mut refused = 0u64;
        for resource in &mut request.resource_metrics {
            let base = attributes_hash(&self.hasher, resource.resource.as_ref().map_or(&[][..], |r| &r.attributes));
            for scope in &mut resource.scope_metrics {
                for metric in &mut scope.metrics {
                    let named = base ^ self.hasher.hash_one(&metric.name);
                    let mut admit = |attributes: &[KeyValue]| {
                        let key = named.wrapping_add(attributes_hash(&self.hasher, attributes).rotate_left(17));
                        if let Some(seen) = state.seen.get_mut(&key) {
                            *seen = now;
                            return true;
                        }
                        if state.seen.len() < self.limit {
                            state.seen.insert(key, now);
                            return true;
                        }
                        refused += 1;
                        false
                    };
                    match &mut metric.data {
                        Some(Data::Gauge(g)) => g.data_points.retain(|p| admit(&p.attributes)),
                        Some(Data::Sum(s)) => s.data_points.retain(|p| admit(&p.attributes)),
                        Some(Data::Histogram(h)) => h.data_points.retain(|p| admit(&p.attributes)),
                        Some(Data::ExponentialHistogram(h)) => h.data_points.retain(|p| admit(&p.attributes)),
                        Some(Data::Summary(s)) => s.data_points.retain(|p| admit(&p.attributes)),
                        None => {}
                    }
                }
            }
        }
        refused
    }
}

/// A hash of a set of attributes that does not depend on their order (senders need not sort
/// them): the sum of each attribute's own hash.
fn attributes_hash(hasher: &RandomState, attributes: &[KeyValue]) -> u64 {
    attributes
        .iter()
        .map(|kv| {
            let mut h = hasher.build_hasher();
            kv.key.hash(&mut h);
            kv.key_strindex.hash(&mut h);
            hash_value(kv.value.as_ref(), &mut h);
            h.finish()
        })
        .fold(0u64, u64::wrapping_add)
}

fn hash_value(value: Option<&AnyValue>, h: &mut impl Hasher) {
    match value.and_then(|v| v.value.as_ref()) {
        None => h.write_u8(0),
        Some(any_value::Value::StringValue(s)) => {
            h.write_u8(1);
            s.hash(h);
        }
        Some(any_value::Value::BoolValue(b)) => {
            h.write_u8(2);
            b.hash(h);
        }
        Some(any_value::Value::IntValue(i)) => {
            h.write_u8(3);
            i.hash(h);
        }
        Some(any_value::Value::DoubleValue(d)) => {
            h.write_u8(4);
            d.to_bits().hash(h);
        }
        Some(any_value::Value::BytesValue(b)) => {
            h.write_u8(5);
            b.hash(h);
        }
        Some(any_value::Value::ArrayValue(a)) => {
            h.write_u8(6);
            h.write_usize(a.values.len());
            for v in &a.values {
                hash_value(Some(v), h);
            }
        }
        Some(any_value::Value::StringValueStrindex(i)) => {
            h.write_u8(8);
            i.hash(h);
        }
        Some(any_value::Value::KvlistValue(list)) => {
            h.write_u8(7);
            for kv in &list.values {
                kv.key.hash(h);
                hash_value(kv.value.as_ref(), h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics};
    use opentelemetry_proto::tonic::resource::v1::Resource;

    fn attribute(key: &str, value: &str) -> KeyValue {
        KeyValue { key: key.into(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }), ..Default::default() }
    }

    /// A gauge `name` from service `service` with one point per attribute set.
    fn gauge(service: &str, name: &str, points: &[&[(&str, &str)]]) -> Metrics {
        let data_points = points
            .iter()
            .map(|attrs| NumberDataPoint {
                attributes: attrs.iter().map(|(k, v)| attribute(k, v)).collect(),
                ..Default::default()
            })
            .collect();
        Metrics {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource { attributes: vec![attribute("service.name", service)], ..Default::default() }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric { name: name.into(), data: Some(Data::Gauge(Gauge { data_points })), ..Default::default() }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn points(m: &Metrics) -> usize {
        match &m.resource_metrics[0].scope_metrics[0].metrics[0].data {
            Some(Data::Gauge(g)) => g.data_points.len(),
            _ => 0,
        }
    }

    #[test]
    fn series_beyond_the_limit_are_refused_and_known_ones_still_pass() {
        let limit = SeriesLimit::new(3);
        let mut first = gauge("a", "queue", &[&[("q", "1")], &[("q", "2")]]);
        assert_eq!(limit.apply(&mut first), 0);
        // Two new series: room for one.
        let mut second = gauge("a", "queue", &[&[("q", "3")], &[("q", "4")]]);
        assert_eq!(limit.apply(&mut second), 1);
        assert_eq!(points(&second), 1);
        // The known series keep passing, the new one is refused every time.
        let mut third = gauge("a", "queue", &[&[("q", "1")], &[("q", "2")], &[("q", "3")], &[("q", "5")]]);
        assert_eq!(limit.apply(&mut third), 1);
        assert_eq!(points(&third), 3);
        assert_eq!(limit.len(), 3);
    }

    #[test]
    fn a_series_is_its_resource_name_and_attributes_in_any_order() {
        let limit = SeriesLimit::new(10);
        let mut m = gauge("a", "queue", &[&[("x", "1"), ("y", "2")]]);
        limit.apply(&mut m);
        let mut reordered = gauge("a", "queue", &[&[("y", "2"), ("x", "1")]]);
        limit.apply(&mut reordered);
        assert_eq!(limit.len(), 1, "the same attributes in another order are the same series");
        for mut other in [
            gauge("b", "queue", &[&[("x", "1"), ("y", "2")]]),
            gauge("a", "depth", &[&[("x", "1"), ("y", "2")]]),
            gauge("a", "queue", &[&[("x", "2"), ("y", "1")]]),
            gauge("a", "queue", &[&[("x", "1")]]),
        ] {
            limit.apply(&mut other);
        }
        assert_eq!(limit.len(), 5);
    }

    #[test]
    fn series_not_sent_for_the_expiry_make_room() {
        let limit = SeriesLimit::new(1);
        assert_eq!(limit.apply_at(&mut gauge("a", "q", &[&[("q", "1")]]), Duration::ZERO), 0);
        assert_eq!(limit.apply_at(&mut gauge("a", "q", &[&[("q", "2")]]), Duration::from_secs(100)), 1);
        // Sent again within the expiry: still known.
        assert_eq!(limit.apply_at(&mut gauge("a", "q", &[&[("q", "1")]]), Duration::from_secs(200)), 0);
        let later = Duration::from_secs(200) + EXPIRY + SWEEP_EVERY;
        assert_eq!(limit.apply_at(&mut gauge("a", "q", &[&[("q", "2")]]), later), 0, "the first series expired");
    }
}
