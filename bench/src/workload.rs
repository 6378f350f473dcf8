//! The traces the load generator sends: what a gateway-like service emits for its requests.
//! Every trace is one handler call of eight spans — a server span, middleware, the handler, a
//! cache lookup, two queries and rendering — with 16-byte trace ids, 8-byte span ids, parent
//! links, ten attributes of mixed types and one event per span, under a resource carrying
//! `service.name` and a few more attributes. Generation is deterministic per request index, so
//! two runs send the same bytes. [`handlers`] builds traces of many handlers, with variants and
//! a downstream service, for execution-path analysis.

pub mod handlers;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

/// Spans in one trace of the workload.
pub const SPANS_PER_TRACE: usize = 8;

const SERVICES: [&str; 4] = ["feed", "comments", "profile", "search"];
const ROUTES: [&str; 4] = ["/api/feed/v4", "/api/comment", "/api/profile/{id}", "/api/search"];
const METHODS: [&str; 4] = ["GET", "POST", "GET", "GET"];

/// One step of a handler call: its name, kind, parent (index within the trace) and what kind
/// of attributes it carries.
struct Step {
    name: &'static str,
    kind: SpanKind,
    parent: Option<usize>,
    role: Role,
    /// Start offset and typical duration in microseconds.
    start_us: u64,
    duration_us: u64,
}

#[derive(Clone, Copy)]
enum Role {
    Server,
    Middleware,
    Cache,
    Database,
    /// A call into another service.
    Rpc,
}

const STEPS: [Step; SPANS_PER_TRACE] = [
    Step { name: "", kind: SpanKind::Server, parent: None, role: Role::Server, start_us: 0, duration_us: 12_000 },
    Step {
        name: "auth",
        kind: SpanKind::Internal,
        parent: Some(0),
        role: Role::Middleware,
        start_us: 50,
        duration_us: 400,
    },
    Step {
        name: "rate_limit",
        kind: SpanKind::Internal,
        parent: Some(0),
        role: Role::Middleware,
        start_us: 480,
        duration_us: 120,
    },
    Step {
        name: "handler",
        kind: SpanKind::Internal,
        parent: Some(0),
        role: Role::Middleware,
        start_us: 650,
        duration_us: 10_800,
    },
    Step {
        name: "redis.get",
        kind: SpanKind::Client,
        parent: Some(3),
        role: Role::Cache,
        start_us: 700,
        duration_us: 600,
    },
    Step {
        name: "SELECT posts",
        kind: SpanKind::Client,
        parent: Some(3),
        role: Role::Database,
        start_us: 1_400,
        duration_us: 4_500,
    },
    Step {
        name: "SELECT users",
        kind: SpanKind::Client,
        parent: Some(3),
        role: Role::Database,
        start_us: 6_000,
        duration_us: 3_200,
    },
    Step {
        name: "render",
        kind: SpanKind::Internal,
        parent: Some(3),
        role: Role::Middleware,
        start_us: 9_300,
        duration_us: 2_000,
    },
];

/// A small deterministic generator (SplitMix64): ids and jitter without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn id<const N: usize>(&mut self) -> Vec<u8> {
        let mut id = Vec::with_capacity(N);
        while id.len() < N {
            id.extend_from_slice(&self.next().to_le_bytes()[..(N - id.len()).min(8)]);
        }
        id
    }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    value_of(key, any_value::Value::StringValue(value.into()))
}

fn int(key: &str, value: i64) -> KeyValue {
    value_of(key, any_value::Value::IntValue(value))
}

fn float(key: &str, value: f64) -> KeyValue {
    value_of(key, any_value::Value::DoubleValue(value))
}

fn flag(key: &str, value: bool) -> KeyValue {
    value_of(key, any_value::Value::BoolValue(value))
}

fn value_of(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// The request with index `index`: one resource, one scope and `spans` spans, made of whole
/// traces (the last one cut short when `spans` is not a multiple of [`SPANS_PER_TRACE`]).
/// `base_unix_nanos` is the start time of the first trace.
pub fn request(index: u64, spans: usize, base_unix_nanos: u64) -> ExportTraceServiceRequest {
    let mut rng = Rng(index.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED);
    let service = (index % SERVICES.len() as u64) as usize;
    let resource = Resource {
        attributes: vec![
            text("service.name", SERVICES[service]),
            text("service.version", "4.18.2"),
            text("service.instance.id", format!("{}-{:04x}", SERVICES[service], rng.below(0x10000))),
            text("host.name", "node-17.cluster.local"),
            text("k8s.namespace.name", "video"),
            text("k8s.pod.name", format!("{}-7d9f8c6b5-{:05x}", SERVICES[service], rng.below(0x100000))),
            text("telemetry.sdk.language", "rust"),
            text("telemetry.sdk.name", "opentelemetry"),
        ],
        ..Default::default()
    };

    let mut out = Vec::with_capacity(spans);
    let mut trace_start = base_unix_nanos;
    while out.len() < spans {
        let trace_id = rng.id::<16>();
        let failed = rng.below(50) == 0;
        let mut span_ids: Vec<Vec<u8>> = Vec::with_capacity(SPANS_PER_TRACE);
        for step in STEPS.iter().take(spans - out.len()) {
            let span_id = rng.id::<8>();
            let jitter = rng.below(step.duration_us / 4 + 1);
            let start = trace_start + step.start_us * 1_000;
            let end = start + (step.duration_us + jitter) * 1_000;
            let error = failed && matches!(step.role, Role::Server | Role::Database);
            let name = match step.role {
                Role::Server => format!("{} {}", METHODS[service], ROUTES[service]),
                _ => step.name.to_string(),
            };
            out.push(Span {
                trace_id: trace_id.clone(),
                span_id: span_id.clone(),
                parent_span_id: step.parent.map(|p| span_ids[p].clone()).unwrap_or_default(),
                flags: 0x101,
                name,
                kind: step.kind as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes: attributes(step.role, service, error, &mut rng),
                events: vec![Event {
                    time_unix_nano: start + 10_000,
                    name: if error { "exception".into() } else { "log".into() },
                    attributes: vec![
                        text("message", if error { "deadline exceeded" } else { "step started" }),
                        int("attempt", 1),
                    ],
                    ..Default::default()
                }],
                status: Some(Status {
                    code: if error { StatusCode::Error } else { StatusCode::Unset } as i32,
                    message: if error { "deadline exceeded".into() } else { String::new() },
                }),
                ..Default::default()
            });
            span_ids.push(span_id);
        }
        trace_start += 1_000_000 + rng.below(1_000_000);
    }

    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "periscope-bench".into(),
                    version: "1.0.0".into(),
                    ..Default::default()
                }),
                spans: out,
                schema_url: String::new(),
            }],
            schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
        }],
    }
}

/// Ten attributes of mixed types, as instrumentation libraries set them for each role.
fn attributes(role: Role, service: usize, error: bool, rng: &mut Rng) -> Vec<KeyValue> {
    let thread = rng.below(16) as i64;
    let common = [int("thread.id", thread), text("thread.name", format!("tokio-runtime-worker-{thread}"))];
    let specific: [KeyValue; 8] = match role {
        Role::Server => [
            text("http.request.method", METHODS[service]),
            text("http.route", ROUTES[service]),
            int("http.response.status_code", if error { 504 } else { 200 }),
            text("url.scheme", "https"),
            text("server.address", "api.example.com"),
            int("server.port", 443),
            text("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
            int("http.response.body.size", 2_048 + rng.below(30_000) as i64),
        ],
        Role::Middleware => [
            text("code.function", "call"),
            text("code.namespace", "gateway::middleware"),
            int("code.lineno", 40 + rng.below(400) as i64),
            flag("cache.enabled", true),
            float("sample.ratio", 0.25),
            text("tenant", "tenant-42"),
            int("queue.depth", rng.below(32) as i64),
            flag("retry", false),
        ],
        Role::Cache => [
            text("db.system", "redis"),
            text("db.operation.name", "GET"),
            text("server.address", "redis.video.svc"),
            int("server.port", 6379),
            flag("cache.hit", rng.below(4) != 0),
            int("db.response.size", rng.below(4_096) as i64),
            float("cache.ttl_seconds", 30.0),
            text("network.transport", "tcp"),
        ],
        Role::Database => [
            text("db.system", "postgresql"),
            text("db.namespace", "feed"),
            text("db.query.text", "SELECT id, author, body FROM posts WHERE author = ANY($1) LIMIT 50"),
            text("server.address", "pg.video.svc"),
            int("server.port", 5432),
            int("db.response.returned_rows", rng.below(50) as i64),
            float("db.client.wait_ms", rng.below(1_000) as f64 / 100.0),
            flag("db.prepared", true),
        ],
        Role::Rpc => [
            text("http.request.method", "GET"),
            text("url.full", format!("http://users.video.svc/users/{}", rng.below(100_000))),
            text("server.address", "users.video.svc"),
            int("server.port", 8080),
            text("peer.service", "users"),
            int("http.response.status_code", if error { 504 } else { 200 }),
            text("network.protocol.version", "1.1"),
            int("http.request.resend_count", 0),
        ],
    };
    common.into_iter().chain(specific).collect()
}

/// The mask that [`renew_trace_ids`] and [`patch_trace_ids`] apply in round `round` of sending
/// a pool of requests again: 0 in round 0, so the first round sends the ids as built.
pub fn round_mask(round: u64) -> u64 {
    if round == 0 {
        0
    } else {
        Rng(round).next() | 1
    }
}

/// XORs the first eight bytes of every trace id in `request` with `mask`: applying
/// `round_mask(r - 1) ^ round_mask(r)` turns round `r - 1`'s ids into round `r`'s, so a pool
/// of requests sent again and again carries new traces each round.
pub fn renew_trace_ids(request: &mut ExportTraceServiceRequest, mask: u64) {
    for span in request.resource_spans.iter_mut().flat_map(|r| &mut r.scope_spans).flat_map(|s| &mut s.spans) {
        xor_prefix(&mut span.trace_id, mask);
    }
}

/// Where the encoding of `request` holds each span's trace id: the offsets of the sixteen id
/// bytes, in span order, for [`patch_trace_ids`].
pub fn trace_id_offsets(encoded: &[u8], request: &ExportTraceServiceRequest) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut from = 0;
    for span in request.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans) {
        // Field 1, length-delimited, 16 bytes long, then the id.
        let mut field = vec![0x0A, 0x10];
        field.extend_from_slice(&span.trace_id);
        let Some(at) = encoded[from..].windows(field.len()).position(|w| w == field) else { break };
        offsets.push(from + at + 2);
        from += at + field.len();
    }
    offsets
}

/// The encoded counterpart of [`renew_trace_ids`], on a copy of the bytes as built: gives the
/// ids of round `round`.
pub fn patch_trace_ids(encoded: &mut [u8], offsets: &[usize], round: u64) {
    let mask = round_mask(round);
    for &at in offsets {
        xor_prefix(&mut encoded[at..at + 16], mask);
    }
}

fn xor_prefix(id: &mut [u8], mask: u64) {
    if let Some(prefix) = id.get_mut(..8) {
        for (byte, m) in prefix.iter_mut().zip(mask.to_be_bytes()) {
            *byte ^= m;
        }
    }
}

/// Spans in a request, however its resources and scopes are split.
pub fn span_count(request: &ExportTraceServiceRequest) -> u64 {
    request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len() as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::HashMap;

    #[test]
    fn a_request_holds_the_asked_number_of_spans_in_linked_traces() {
        let request = request(3, 515, 1_700_000_000_000_000_000);
        assert_eq!(span_count(&request), 515);
        let resource = request.resource_spans[0].resource.as_ref().unwrap();
        let service = resource.attributes.iter().find(|kv| kv.key == "service.name").unwrap();
        assert_eq!(service.value.as_ref().unwrap().value, Some(any_value::Value::StringValue("search".into())));

        let spans = &request.resource_spans[0].scope_spans[0].spans;
        let mut by_trace: HashMap<&[u8], Vec<&Span>> = HashMap::new();
        for span in spans {
            assert_eq!(span.trace_id.len(), 16);
            assert_eq!(span.span_id.len(), 8);
            assert_eq!(span.attributes.len(), 10);
            assert_eq!(span.events.len(), 1);
            assert!(span.end_time_unix_nano > span.start_time_unix_nano);
            by_trace.entry(&span.trace_id).or_default().push(span);
        }
        // 64 whole traces and one of three spans.
        assert_eq!(by_trace.len(), 65);
        for trace in by_trace.values() {
            let roots = trace.iter().filter(|s| s.parent_span_id.is_empty()).count();
            assert_eq!(roots, 1);
            for span in trace.iter().filter(|s| !s.parent_span_id.is_empty()) {
                assert!(trace.iter().any(|p| p.span_id == span.parent_span_id));
            }
        }
    }

    #[test]
    fn the_same_index_gives_the_same_bytes_and_another_index_other_ids() {
        let a = request(7, 64, 1).encode_to_vec();
        assert_eq!(a, request(7, 64, 1).encode_to_vec());
        let first = |r: &ExportTraceServiceRequest| r.resource_spans[0].scope_spans[0].spans[0].trace_id.clone();
        assert_ne!(first(&request(7, 64, 1)), first(&request(8, 64, 1)));
        // Realistic sizes: a few hundred bytes per span.
        let per_span = a.len() / 64;
        assert!((300..1_000).contains(&per_span), "{per_span} bytes per span");
    }

    #[test]
    fn renewed_ids_are_new_each_round_in_decoded_and_encoded_form_alike() {
        let built = request(5, 100, 1);
        let encoded = built.encode_to_vec();
        let offsets = trace_id_offsets(&encoded, &built);
        assert_eq!(offsets.len(), 100);

        let mut decoded = built.clone();
        let mut seen = std::collections::HashSet::new();
        for round in 0..4 {
            if round > 0 {
                renew_trace_ids(&mut decoded, round_mask(round - 1) ^ round_mask(round));
            }
            let mut bytes = encoded.clone();
            patch_trace_ids(&mut bytes, &offsets, round);
            assert_eq!(bytes, decoded.encode_to_vec(), "round {round}");
            let first = &decoded.resource_spans[0].scope_spans[0].spans[0].trace_id;
            assert!(seen.insert(first.clone()), "round {round} repeats an id");
        }
    }
}
