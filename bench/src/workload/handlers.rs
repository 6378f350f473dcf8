//! Traces for execution-path analysis: many handlers, each with the gateway's steps, taking
//! one of four variants, and a call into a second service.
//!
//! ```text
//! <front service>  GET /api/<resource>/v<n>          server   one of `routes` handlers
//!                  ├─ auth, rate_limit               internal
//!                  └─ handler                        internal
//!                     ├─ redis.get                   client   always
//!                     ├─ SELECT posts                client   on a cache miss (1 in 4)
//!                     ├─ GET users                   client   every other trace
//!                     │  └─ users: GET /users/{id}   server   (second resource)
//!                     │     └─ SELECT users          client
//!                     └─ render                      internal
//! ```
//! A trace has 6 to 10 spans, 7.75 on average. Spans carry the same kinds of attributes and
//! one event as in the gateway workload. Generation is deterministic per request index.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

use super::{attributes, flag, int, text, Rng, Role, METHODS, SERVICES};

/// Handlers of the front services by default: twelve routes for each of the four services.
pub const DEFAULT_ROUTES: usize = 48;
/// The service every other trace calls into; its one handler comes on top of `routes`.
pub const DOWNSTREAM: &str = "users";
const DOWNSTREAM_ROUTE: &str = "/users/{id}";
const RESOURCES: [&str; 12] = [
    "feed",
    "comments",
    "profile",
    "search",
    "video",
    "upload",
    "alerts",
    "settings",
    "friends",
    "likes",
    "playlists",
    "history",
];

/// When a step occurs in a trace.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    Always,
    CacheMiss,
    Call,
}

/// Which resource a step's span belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Front,
    Downstream,
}

struct Step {
    name: &'static str,
    kind: SpanKind,
    parent: Option<usize>,
    role: Role,
    side: Side,
    when: When,
    start_us: u64,
    duration_us: u64,
}

const STEPS: [Step; 10] = [
    step("", SpanKind::Server, None, Role::Server, Side::Front, When::Always, 0, 12_000),
    step("auth", SpanKind::Internal, Some(0), Role::Middleware, Side::Front, When::Always, 50, 400),
    step("rate_limit", SpanKind::Internal, Some(0), Role::Middleware, Side::Front, When::Always, 480, 120),
    step("handler", SpanKind::Internal, Some(0), Role::Middleware, Side::Front, When::Always, 650, 10_800),
    step("redis.get", SpanKind::Client, Some(3), Role::Cache, Side::Front, When::Always, 700, 600),
    step("SELECT posts", SpanKind::Client, Some(3), Role::Database, Side::Front, When::CacheMiss, 1_400, 4_500),
    step("GET users", SpanKind::Client, Some(3), Role::Rpc, Side::Front, When::Call, 6_000, 3_200),
    step("", SpanKind::Server, Some(6), Role::Server, Side::Downstream, When::Call, 6_100, 2_900),
    step("SELECT users", SpanKind::Client, Some(7), Role::Database, Side::Downstream, When::Call, 6_300, 2_500),
    step("render", SpanKind::Internal, Some(3), Role::Middleware, Side::Front, When::Always, 9_300, 2_000),
];

#[allow(clippy::too_many_arguments)]
const fn step(
    name: &'static str,
    kind: SpanKind,
    parent: Option<usize>,
    role: Role,
    side: Side,
    when: When,
    start_us: u64,
    duration_us: u64,
) -> Step {
    Step { name, kind, parent, role, side, when, start_us, duration_us }
}

/// The method and route of front handler `handler` (`handler % 4` is its service).
pub fn route(handler: usize) -> (&'static str, String) {
    let resource = RESOURCES[(handler / SERVICES.len()) % RESOURCES.len()];
    let version = handler / (SERVICES.len() * RESOURCES.len()) + 1;
    (METHODS[(handler / SERVICES.len()) % METHODS.len()], format!("/api/{resource}/v{version}"))
}

fn resource(service: &str, rng: &mut Rng) -> Resource {
    Resource {
        attributes: vec![
            text("service.name", service),
            text("service.version", "4.18.2"),
            text("service.instance.id", format!("{service}-{:04x}", rng.below(0x10000))),
            text("host.name", "node-17.cluster.local"),
            text("k8s.namespace.name", "video"),
            text("k8s.pod.name", format!("{service}-7d9f8c6b5-{:05x}", rng.below(0x100000))),
            text("telemetry.sdk.language", "rust"),
            text("telemetry.sdk.name", "opentelemetry"),
        ],
        ..Default::default()
    }
}

fn resource_spans(resource: Resource, spans: Vec<Span>) -> ResourceSpans {
    ResourceSpans {
        resource: Some(resource),
        scope_spans: vec![ScopeSpans {
            scope: Some(InstrumentationScope {
                name: "periscope-bench".into(),
                version: "1.0.0".into(),
                ..Default::default()
            }),
            spans,
            schema_url: String::new(),
        }],
        schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
    }
}

/// The request with index `index`: `spans` spans of whole traces (the last one cut short when
/// needed) of one front service (`index % 4`) and the downstream service, over `routes`
/// front handlers. `base_unix_nanos` is the start time of the first trace.
pub fn request(index: u64, spans: usize, base_unix_nanos: u64, routes: usize) -> ExportTraceServiceRequest {
    let mut rng = Rng(index.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xFA7E);
    let service = (index % SERVICES.len() as u64) as usize;
    let per_service = routes.div_ceil(SERVICES.len()).max(1) as u64;
    let front_resource = resource(SERVICES[service], &mut rng);
    let downstream_resource = resource(DOWNSTREAM, &mut rng);

    let mut front = Vec::with_capacity(spans);
    let mut downstream = Vec::new();
    let mut trace_start = base_unix_nanos;
    while front.len() + downstream.len() < spans {
        let handler = service + SERVICES.len() * rng.below(per_service) as usize;
        let (method, route) = route(handler);
        let trace_id = rng.id::<16>();
        let failed = rng.below(50) == 0;
        let miss = rng.below(4) == 0;
        let call = rng.below(2) == 0;
        // One pace for the whole trace keeps children inside their parents.
        let pace = 100 + rng.below(25);
        let mut span_ids: [Vec<u8>; STEPS.len()] = Default::default();
        for (i, step) in STEPS.iter().enumerate() {
            let taken = match step.when {
                When::Always => true,
                When::CacheMiss => miss,
                When::Call => call,
            };
            if !taken || front.len() + downstream.len() >= spans {
                continue;
            }
            let span_id = rng.id::<8>();
            let start = trace_start + step.start_us * pace * 10;
            // Up to 0.4 % shorter than the pace says: within every parent's margin.
            let end = start + step.duration_us * pace * 10 * (1_000 - rng.below(5)) / 1_000;
            let error = failed && matches!(step.role, Role::Server | Role::Database);
            let (name, attributes) = match (step.role, step.side) {
                (Role::Server, Side::Front) => (format!("{method} {route}"), server(method, &route, error, &mut rng)),
                (Role::Server, Side::Downstream) => {
                    (format!("GET {DOWNSTREAM_ROUTE}"), server("GET", DOWNSTREAM_ROUTE, error, &mut rng))
                }
                (role, _) => {
                    let mut attributes = attributes(role, service, error, &mut rng);
                    if let Some(hit) = attributes.iter_mut().find(|kv| kv.key == "cache.hit") {
                        *hit = flag("cache.hit", !miss);
                    }
                    (step.name.to_string(), attributes)
                }
            };
            let span = Span {
                trace_id: trace_id.clone(),
                span_id: span_id.clone(),
                parent_span_id: step.parent.map(|p| span_ids[p].clone()).unwrap_or_default(),
                flags: 0x101,
                name,
                kind: step.kind as i32,
                start_time_unix_nano: start,
                end_time_unix_nano: end,
                attributes,
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
            };
            match step.side {
                Side::Front => front.push(span),
                Side::Downstream => downstream.push(span),
            }
            span_ids[i] = span_id;
        }
        trace_start += 1_000_000 + rng.below(1_000_000);
    }

    let mut resource_spans = vec![resource_spans(front_resource, front)];
    if !downstream.is_empty() {
        resource_spans.push(self::resource_spans(downstream_resource, downstream));
    }
    ExportTraceServiceRequest { resource_spans }
}

/// A server span's ten attributes.
fn server(method: &str, route: &str, error: bool, rng: &mut Rng) -> Vec<KeyValue> {
    let thread = rng.below(16) as i64;
    vec![
        int("thread.id", thread),
        text("thread.name", format!("tokio-runtime-worker-{thread}")),
        text("http.request.method", method),
        text("http.route", route),
        int("http.response.status_code", if error { 504 } else { 200 }),
        text("url.scheme", "https"),
        text("server.address", "api.example.com"),
        int("server.port", 443),
        text("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
        int("http.response.body.size", 2_048 + rng.below(30_000) as i64),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::span_count;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use std::collections::{HashMap, HashSet};

    fn service_of(resource_spans: &ResourceSpans) -> String {
        let resource = resource_spans.resource.as_ref().unwrap();
        let kv = resource.attributes.iter().find(|kv| kv.key == "service.name").unwrap();
        match &kv.value.as_ref().unwrap().value {
            Some(any_value::Value::StringValue(s)) => s.clone(),
            other => panic!("service.name is {other:?}"),
        }
    }

    #[test]
    fn a_request_holds_the_asked_spans_in_linked_traces_across_two_services() {
        let request = request(1, 512, 1_700_000_000_000_000_000, DEFAULT_ROUTES);
        assert_eq!(span_count(&request), 512);
        assert_eq!(request.resource_spans.len(), 2);
        assert_eq!(service_of(&request.resource_spans[0]), "comments");
        assert_eq!(service_of(&request.resource_spans[1]), DOWNSTREAM);

        let all: Vec<&Span> = request.resource_spans.iter().flat_map(|r| &r.scope_spans[0].spans).collect();
        let mut by_trace: HashMap<&[u8], Vec<&Span>> = HashMap::new();
        for span in &all {
            assert_eq!(span.attributes.len(), 10, "{}", span.name);
            assert!(span.end_time_unix_nano > span.start_time_unix_nano);
            by_trace.entry(&span.trace_id).or_default().push(span);
        }
        let mut handlers = HashSet::new();
        let mut sizes = HashSet::new();
        for trace in by_trace.values() {
            let root = trace.iter().find(|s| s.parent_span_id.is_empty()).expect("a root span");
            handlers.insert(root.name.clone());
            sizes.insert(trace.len());
            for span in trace.iter().filter(|s| !s.parent_span_id.is_empty()) {
                let parent = trace.iter().find(|p| p.span_id == span.parent_span_id).expect("the parent");
                assert!(parent.start_time_unix_nano <= span.start_time_unix_nano, "{}", span.name);
                assert!(span.end_time_unix_nano <= parent.end_time_unix_nano, "{} in {}", span.name, parent.name);
            }
        }
        // ~66 traces over the service's 12 handlers, in all four variants (6, 7, 9, 10 spans).
        assert!((60..=75).contains(&by_trace.len()), "{} traces", by_trace.len());
        assert_eq!(handlers.len(), 12, "{handlers:?}");
        assert!(sizes.is_superset(&HashSet::from([6, 7, 9, 10])), "{sizes:?}");
    }

    #[test]
    fn routes_spread_over_services_and_versions() {
        assert_eq!(route(0), ("GET", "/api/feed/v1".to_string()));
        assert_eq!(route(5), ("POST", "/api/comments/v1".to_string()));
        assert_eq!(route(48), ("GET", "/api/feed/v2".to_string()));
        let distinct: HashSet<(usize, String)> = (0..2_000).map(|h| (h % 4, route(h).1)).collect();
        assert_eq!(distinct.len(), 2_000);
    }
}
