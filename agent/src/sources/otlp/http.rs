//! The OTLP/HTTP receiver: `POST /v1/traces|metrics|logs` with `application/x-protobuf` or
//! `application/json` bodies, optionally `Content-Encoding: gzip`.
//!
//! Sizes are checked before anything is buffered (Content-Length) and again while reading
//! and inflating, so neither a large body nor a gzip bomb can exceed `max_request_size`.
//! Errors answer with a `google.rpc.Status` in the request's encoding, as the OTLP
//! specification says.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use prost::Message;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::io::Read;
use tokio::net::TcpListener;

use super::tls::{server_config, TlsListener};
use super::{Answer, Intake, Rejection, MAX_CONCURRENT_REQUESTS};
use crate::config::ServerTlsConfig;
use crate::signal::status::RpcStatus;
use crate::signal::{Logs, Metrics, Payload, Traces};

#[derive(Clone)]
struct Receiver {
    traces: Intake<Traces>,
    metrics: Intake<Metrics>,
    logs: Intake<Logs>,
    max_request_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// The router, without a socket (tests drive it with `oneshot`).
pub fn router(
    traces: Intake<Traces>,
    metrics: Intake<Metrics>,
    logs: Intake<Logs>,
    max_request_size: usize,
) -> Router {
    let receiver = Receiver { traces, metrics, logs, max_request_size };
    Router::new()
        .route("/v1/traces", post(|State(r): State<Receiver>, h: HeaderMap, b: Body| async move { handle(&r.traces, r.max_request_size, h, b).await }))
        .route("/v1/metrics", post(|State(r): State<Receiver>, h: HeaderMap, b: Body| async move { handle(&r.metrics, r.max_request_size, h, b).await }))
        .route("/v1/logs", post(|State(r): State<Receiver>, h: HeaderMap, b: Body| async move { handle(&r.logs, r.max_request_size, h, b).await }))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS))
        .with_state(receiver)
}

/// Serves the router on `listener` (over TLS when configured) until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<&ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    match tls {
        Some(tls) => {
            let listener = TlsListener::new(listener, server_config(tls)?).map_err(|e| e.to_string())?;
            axum::serve(listener, router).with_graceful_shutdown(shutdown).await
        }
        None => axum::serve(listener, router).with_graceful_shutdown(shutdown).await,
    }
    .map_err(|e| e.to_string())
}

async fn handle<T>(intake: &Intake<T>, max: usize, headers: HeaderMap, body: Body) -> Response
where
    T: Answer + prost::Message + Default + DeserializeOwned,
{
    let encoding = match media_type(&headers) {
        Ok(encoding) => encoding,
        Err(rejection) => return respond(intake.reject(rejection), Encoding::Json),
    };
    let data = match read_body(&headers, body, max).await.and_then(|bytes| decode::<T>(&bytes, encoding)) {
        Ok(data) => data,
        Err(rejection) => return respond(intake.reject(rejection), encoding),
    };
    match intake.accept(data).await {
        // An Export*ServiceResponse: empty on full success (an empty protobuf message, or
        // `{}`), with `partial_success` when part of the request was refused.
        Ok(accepted) => {
            let answer = T::answer(&accepted);
            let body: Bytes = match encoding {
                Encoding::Protobuf => answer.encode_to_vec().into(),
                Encoding::Json => serde_json::to_vec(&answer).unwrap_or_else(|_| b"{}".to_vec()).into(),
            };
            ([(header::CONTENT_TYPE, encoding.content_type())], body).into_response()
        }
        Err(rejection) => respond(rejection, encoding),
    }
}

fn media_type(headers: &HeaderMap) -> Result<Encoding, Rejection> {
    let value = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Encoding::Protobuf),
        "application/json" => Ok(Encoding::Json),
        _ => Err(Rejection::UnsupportedMediaType(format!(
            "unsupported Content-Type `{value}`: use application/x-protobuf or application/json"
        ))),
    }
}

async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, Rejection> {
    let too_large = || Rejection::TooLarge(format!("request body exceeds the limit of {max} bytes"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, max).await.map_err(|e| {
        let limit_hit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if limit_hit {
            too_large()
        } else {
            Rejection::Malformed(format!("cannot read request body: {e}"))
        }
    })?;
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(bytes),
        "gzip" | "x-gzip" => gunzip(&bytes, max),
        other => Err(Rejection::UnsupportedMediaType(format!(
            "unsupported Content-Encoding `{other}`: use gzip or none"
        ))),
    }
}

fn gunzip(compressed: &[u8], max: usize) -> Result<Bytes, Rejection> {
    let mut out = Vec::with_capacity((compressed.len() * 4).min(max));
    let mut reader = flate2::read::GzDecoder::new(compressed).take(max as u64 + 1);
    reader
        .read_to_end(&mut out)
        .map_err(|e| Rejection::Malformed(format!("invalid gzip body: {e}")))?;
    if out.len() > max {
        return Err(Rejection::TooLarge(format!("decompressed request body exceeds the limit of {max} bytes")));
    }
    Ok(out.into())
}

fn decode<T: Payload + prost::Message + Default + DeserializeOwned>(bytes: &[u8], encoding: Encoding) -> Result<T, Rejection> {
    match encoding {
        Encoding::Protobuf => T::decode(bytes).map_err(|e| Rejection::Malformed(format!("invalid protobuf body: {e}"))),
        Encoding::Json => serde_json::from_slice(bytes).map_err(|e| Rejection::Malformed(format!("invalid JSON body: {e}"))),
    }
}

fn respond(rejection: Rejection, encoding: Encoding) -> Response {
    let (status, message, retry_after) = match rejection {
        Rejection::Malformed(m) => (StatusCode::BAD_REQUEST, m, None),
        Rejection::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m, None),
        Rejection::UnsupportedMediaType(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, m, None),
        Rejection::Full { message, retry_after } => (StatusCode::SERVICE_UNAVAILABLE, message, Some(retry_after)),
        Rejection::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down".to_owned(),
            Some(std::time::Duration::from_secs(1)),
        ),
    };
    // gRPC code equivalents, for the Status body.
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => 3,
        StatusCode::PAYLOAD_TOO_LARGE => 8,
        _ => 14,
    };
    let body: Bytes = match encoding {
        Encoding::Protobuf => RpcStatus { code, message, details: vec![] }.encode_to_vec().into(),
        Encoding::Json => serde_json::json!({ "code": code, "message": message }).to_string().into(),
    };
    let mut response = (status, [(header::CONTENT_TYPE, encoding.content_type())], body).into_response();
    if let Some(after) = retry_after {
        let seconds = after.as_secs().max(1).to_string();
        if let Ok(value) = HeaderValue::from_str(&seconds) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::enrich::NodeEnricher;
    use crate::pipeline::{consumer, ConsumerInput, Pipeline};
    use crate::signal::Signal;
    use crate::telemetry::Metrics as SelfMetrics;
    use axum::http::Request;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use std::io::Write;
    use std::sync::Arc;
    use tower::ServiceExt;

    fn intake<T: Payload>(metrics: &SelfMetrics) -> (Intake<T>, ConsumerInput<T>) {
        let (handle, input) = consumer::<T>(100, metrics.component("sink", T::SIGNAL));
        let pipeline = Pipeline::new(NodeEnricher::new(String::new(), false), vec![handle], metrics.drops("p", T::SIGNAL));
        (Intake::new(Arc::new(pipeline), metrics.receiver("otlp_http", T::SIGNAL)), input)
    }

    struct Fixture {
        router: Router,
        traces: ConsumerInput<Traces>,
        _metrics: ConsumerInput<Metrics>,
        _logs: ConsumerInput<Logs>,
    }

    fn fixture() -> Fixture {
        let m = SelfMetrics::new();
        let (t, traces) = intake::<Traces>(&m);
        let (mi, metrics) = intake::<Metrics>(&m);
        let (l, logs) = intake::<Logs>(&m);
        Fixture { router: router(t, mi, l, 1024), traces, _metrics: metrics, _logs: logs }
    }

    fn one_span(trace_id_len: usize) -> Traces {
        Traces {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span { trace_id: vec![7; trace_id_len], span_id: vec![1; 8], name: "op".into(), ..Default::default() }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    async fn post(router: &Router, content_type: &str, encoding: Option<&str>, body: Vec<u8>) -> (StatusCode, HeaderMap, Bytes) {
        let mut request = Request::post("/v1/traces").header(header::CONTENT_TYPE, content_type);
        if let Some(encoding) = encoding {
            request = request.header(header::CONTENT_ENCODING, encoding);
        }
        let response = router.clone().oneshot(request.body(Body::from(body)).unwrap()).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        (status, headers, axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap())
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[tokio::test]
    async fn protobuf_json_and_gzip_bodies_are_accepted() {
        let mut f = fixture();
        let pb = one_span(16).encode_to_vec();
        assert_eq!(post(&f.router, "application/x-protobuf", None, pb.clone()).await.0, StatusCode::OK);
        assert_eq!(post(&f.router, "application/x-protobuf", Some("gzip"), gzip(&pb)).await.0, StatusCode::OK);
        let json = r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708","name":"j","kind":2,"startTimeUnixNano":"1700000000000000000"}]}]}]}"#;
        let (status, _, body) = post(&f.router, "application/json; charset=utf-8", None, json.into()).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        assert_eq!(f.traces.try_recv().unwrap().data.resource_spans[0].scope_spans[0].spans[0].name, "op");
        f.traces.try_recv().unwrap();
        let from_json = f.traces.try_recv().unwrap();
        let span = &from_json.data.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id, (1..=16).collect::<Vec<u8>>());
        assert_eq!(span.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(span.kind, 2);
    }

    #[tokio::test]
    async fn bad_input_gets_a_clear_4xx() {
        let f = fixture();
        let (status, _, body) = post(&f.router, "application/x-protobuf", None, vec![0xff, 0xff, 0xff]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(RpcStatus::decode(body).unwrap().message.starts_with("invalid protobuf body"));

        let (status, _, body) = post(&f.router, "application/json", None, b"{\"resourceSpans\": [".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(&body).contains("invalid JSON body"));

        assert_eq!(post(&f.router, "text/plain", None, b"hi".to_vec()).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);

        let truncated = gzip(&one_span(16).encode_to_vec());
        let (status, _, _) = post(&f.router, "application/x-protobuf", Some("gzip"), truncated[..truncated.len() / 2].to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let (status, _, body) = post(&f.router, "application/x-protobuf", None, one_span(15).encode_to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(RpcStatus::decode(body).unwrap().message.contains("trace_id: expected 16 bytes, got 15"));

        assert_eq!(post(&f.router, "application/x-protobuf", None, vec![0; 2048]).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        // A gzip bomb: small on the wire, over the limit once inflated.
        assert_eq!(post(&f.router, "application/x-protobuf", Some("gzip"), gzip(&[0; 4096])).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn full_pipeline_answers_503_with_retry_after() {
        let m = SelfMetrics::new();
        let (handle, _input) = consumer::<Traces>(1, m.component("sink", Signal::Traces));
        let pipeline = Arc::new(Pipeline::new(NodeEnricher::new(String::new(), false), vec![handle], m.drops("p", Signal::Traces)));
        let (mi, _a) = intake::<Metrics>(&m);
        let (l, _b) = intake::<Logs>(&m);
        let router = router(Intake::new(pipeline, m.receiver("otlp_http", Signal::Traces)), mi, l, 1024);
        let pb = one_span(16).encode_to_vec();
        assert_eq!(post(&router, "application/x-protobuf", None, pb.clone()).await.0, StatusCode::OK);
        let (status, headers, _) = post(&router, "application/x-protobuf", None, pb).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "1");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn any_body_gets_an_answer_not_a_panic(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            json in proptest::bool::ANY,
            gzipped in proptest::bool::ANY,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let status = runtime.block_on(async {
                let f = fixture();
                let content_type = if json { "application/json" } else { "application/x-protobuf" };
                let body = if gzipped { gzip(&body) } else { body };
                post(&f.router, content_type, gzipped.then_some("gzip"), body).await.0
            });
            proptest::prop_assert!(
                [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::PAYLOAD_TOO_LARGE].contains(&status),
                "unexpected {status}"
            );
        }
    }
}
