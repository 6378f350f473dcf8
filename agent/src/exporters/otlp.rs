//! An OTLP client over gRPC or HTTP/protobuf, sending batches that are already encoded.
//!
//! Batches arrive as the bytes of an `Export*ServiceRequest`: several requests encoded back
//! to back are one valid request (protobuf concatenates repeated fields), so the driver
//! batches by appending and nothing is decoded or re-encoded here. gRPC goes through tonic
//! with a pass-through codec; HTTP through reqwest. Status codes are classified as the OTLP
//! specification says (retryable, throttled, permanent).

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::{Duration, SystemTime};
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::{tls, BuildError, Delivered, ExportError, Exporter};
use crate::config::{ClientTlsConfig, Compression, OtlpProtocol};
use crate::signal::status::{retry_delay, RpcStatus};
use crate::signal::{Logs, Metrics, Payload, Traces};

/// Per-signal facts of the OTLP protocol.
pub trait OtlpSignal: Payload {
    const GRPC_PATH: &'static str;
    const HTTP_PATH: &'static str;
    type Response: Message + Default + Send + Sync + 'static;
    /// Items rejected in a partial success, and the server's message.
    fn rejected(response: &Self::Response) -> (u64, String);
}

impl OtlpSignal for Traces {
    const GRPC_PATH: &'static str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    const HTTP_PATH: &'static str = "/v1/traces";
    type Response = ExportTraceServiceResponse;
    fn rejected(r: &Self::Response) -> (u64, String) {
        r.partial_success
            .as_ref()
            .map(|p| (p.rejected_spans.max(0) as u64, p.error_message.clone()))
            .unwrap_or_default()
    }
}

impl OtlpSignal for Metrics {
    const GRPC_PATH: &'static str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";
    const HTTP_PATH: &'static str = "/v1/metrics";
    type Response = ExportMetricsServiceResponse;
    fn rejected(r: &Self::Response) -> (u64, String) {
        r.partial_success
            .as_ref()
            .map(|p| (p.rejected_data_points.max(0) as u64, p.error_message.clone()))
            .unwrap_or_default()
    }
}

impl OtlpSignal for Logs {
    const GRPC_PATH: &'static str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
    const HTTP_PATH: &'static str = "/v1/logs";
    type Response = ExportLogsServiceResponse;
    fn rejected(r: &Self::Response) -> (u64, String) {
        r.partial_success
            .as_ref()
            .map(|p| (p.rejected_log_records.max(0) as u64, p.error_message.clone()))
            .unwrap_or_default()
    }
}

/// Where and how to send: the parts of an exporter config that concern the wire.
pub struct OtlpClientConfig<'a> {
    /// Config key of the exporter, for messages (`exporters.jaeger`).
    pub key: &'a str,
    pub endpoint: &'a str,
    pub protocol: OtlpProtocol,
    pub headers: &'a BTreeMap<String, String>,
    pub compression: Compression,
    pub timeout: Duration,
    pub tls: Option<&'a ClientTlsConfig>,
}

pub struct OtlpExporter<S: OtlpSignal> {
    transport: Transport,
    _signal: PhantomData<fn() -> S>,
}

enum Transport {
    Grpc { channel: Channel, endpoint: String, path: http::uri::PathAndQuery, headers: HeaderMap, gzip: bool },
    Http { client: reqwest::Client, url: String, headers: HeaderMap },
}

pub(crate) fn header_map(key: &str, headers: &BTreeMap<String, String>) -> Result<HeaderMap, BuildError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|e| BuildError::new(format!("{key}.headers.{name}"), e.to_string()))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| BuildError::new(format!("{key}.headers.{name}"), e.to_string()))?;
        map.insert(name, value);
    }
    Ok(map)
}

impl<S: OtlpSignal> OtlpExporter<S> {
    pub fn new(config: &OtlpClientConfig<'_>) -> Result<Self, BuildError> {
        let endpoint_key = format!("{}.endpoint", config.key);
        let tls_key = format!("{}.tls", config.key);
        let mut headers = header_map(config.key, config.headers)?;
        let transport = match config.protocol {
            OtlpProtocol::Grpc => {
                let mut endpoint = Endpoint::from_shared(config.endpoint.to_owned())
                    .map_err(|e| BuildError::new(&endpoint_key, format!("invalid endpoint `{}`: {e}", config.endpoint)))?
                    .connect_timeout(config.timeout.min(Duration::from_secs(10)))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(Some(1 << 20))
                    .initial_connection_window_size(Some(4 << 20))
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(false);
                if config.endpoint.starts_with("https://") || config.tls.is_some() {
                    endpoint = endpoint
                        .tls_config(tls::tonic_client_config(config.tls, &tls_key)?)
                        .map_err(|e| BuildError::new(&tls_key, e.to_string()))?;
                }
                Transport::Grpc {
                    channel: endpoint.connect_lazy(),
                    endpoint: config.endpoint.to_owned(),
                    path: http::uri::PathAndQuery::from_static(S::GRPC_PATH),
                    headers,
                    gzip: config.compression == Compression::Gzip,
                }
            }
            OtlpProtocol::Http => {
                let tls = tls::rustls_client_config(config.tls, &tls_key)?;
                let client = reqwest::Client::builder()
                    .tls_backend_preconfigured(tls)
                    .tcp_nodelay(true)
                    .pool_idle_timeout(Duration::from_secs(60))
                    .user_agent(concat!("periscope/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| BuildError::new(config.key, format!("HTTP client setup failed: {e}")))?;
                let url = match config.endpoint.trim_end_matches('/') {
                    base if http_path_is_empty(base) => format!("{base}{}", S::HTTP_PATH),
                    full => full.to_owned(),
                };
                headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
                if config.compression == Compression::Gzip {
                    headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                }
                Transport::Http { client, url, headers }
            }
        };
        Ok(OtlpExporter { transport, _signal: PhantomData })
    }

    /// Where batches go, for logs.
    pub fn target(&self) -> String {
        match &self.transport {
            Transport::Grpc { endpoint, .. } => endpoint.clone(),
            Transport::Http { url, .. } => url.clone(),
        }
    }
}

fn http_path_is_empty(url: &str) -> bool {
    url.parse::<http::Uri>().map(|u| matches!(u.path(), "" | "/")).unwrap_or(false)
}

impl<S: OtlpSignal> Exporter for OtlpExporter<S> {
    async fn export(&self, body: Bytes) -> Result<Delivered, ExportError> {
        let response = match &self.transport {
            Transport::Grpc { channel, endpoint, path, headers, gzip } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone())
                    .accept_compressed(CompressionEncoding::Gzip)
                    .max_decoding_message_size(4 << 20);
                if *gzip {
                    grpc = grpc.send_compressed(CompressionEncoding::Gzip);
                }
                grpc.ready().await.map_err(|e| ExportError::Retryable {
                    reason: format!("cannot connect to {endpoint}: {}", error_chain(&e)),
                    after: None,
                })?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers.clone());
                let codec = RawCodec::<S::Response>(PhantomData);
                grpc.unary(request, path.clone(), codec)
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|status| classify_grpc(&status, endpoint))?
            }
            Transport::Http { client, url, headers } => send_http::<S>(client, url, headers, body).await?,
        };
        let (rejected, message) = S::rejected(&response);
        Ok(Delivered { rejected, message })
    }
}

async fn send_http<S: OtlpSignal>(
    client: &reqwest::Client,
    url: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<S::Response, ExportError> {
    let body = if headers.contains_key(http::header::CONTENT_ENCODING) {
        gzip(&body).map_err(|e| ExportError::Permanent(format!("gzip failed: {e}")))?
    } else {
        body
    };
    let response = client
        .post(url)
        .headers(headers.clone())
        .body(body)
        .send()
        .await
        .map_err(|e| ExportError::Retryable { reason: format!("POST {url}: {}", error_chain(&e)), after: None })?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = response.bytes().await.unwrap_or_default();
    if status.is_success() {
        // An empty body is a full success; a body that does not decode is not worth failing over.
        return Ok(S::Response::decode(bytes).unwrap_or_default());
    }
    let message = server_message(&content_type, &bytes);
    let reason = format!("HTTP {status} from {url}: {message}");
    Err(match status.as_u16() {
        429 => ExportError::Throttled { reason, after: retry_after },
        502..=504 => ExportError::Retryable { reason, after: retry_after },
        _ => ExportError::Permanent(reason),
    })
}

/// The message of an error response: a protobuf `google.rpc.Status`, or text.
fn server_message(content_type: &str, body: &[u8]) -> String {
    if content_type.starts_with("application/x-protobuf") {
        if let Ok(status) = RpcStatus::decode(body) {
            if !status.message.is_empty() {
                return status.message;
            }
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    let mut cut = text.chars().take(512).collect::<String>();
    if cut.len() < text.len() {
        cut.push('…');
    }
    cut
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// The OTLP specification's classes for gRPC status codes.
pub fn classify_grpc(status: &Status, endpoint: &str) -> ExportError {
    // The cause of a transport failure (a TLS alert, a reset) is in the source chain.
    let mut reason = format!("gRPC {:?} from {endpoint}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        reason.push_str(": ");
        reason.push_str(&error_chain(source));
    }
    let after = retry_delay(status.details());
    match status.code() {
        Code::Cancelled
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DataLoss => ExportError::Retryable { reason, after },
        // Only retryable when the server says when (RetryInfo), as the specification says.
        Code::ResourceExhausted if after.is_some() => ExportError::Throttled { reason, after },
        // Transport failures (connection reset mid-call) surface as Unknown with a source error.
        Code::Unknown if std::error::Error::source(status).is_some() => ExportError::Retryable { reason, after },
        _ => ExportError::Permanent(reason),
    }
}

pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn gzip(data: &[u8]) -> std::io::Result<Bytes> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::fast());
    encoder.write_all(data)?;
    Ok(encoder.finish()?.into())
}

/// A tonic codec that sends pre-encoded bytes and decodes the typed response.
struct RawCodec<R>(PhantomData<fn() -> R>);

impl<R: Message + Default + Send + 'static> Codec for RawCodec<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ResponseDecoder(PhantomData)
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

struct ResponseDecoder<R>(PhantomData<fn() -> R>);

impl<R: Message + Default> Decoder for ResponseDecoder<R> {
    type Item = R;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        let n = src.remaining();
        R::decode(src.copy_to_bytes(n))
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable response: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::status::retry_details;

    #[test]
    fn grpc_codes_are_classified_as_the_specification_says() {
        assert_eq!(classify_grpc(&Status::unavailable("x"), "e").kind(), "retryable");
        assert_eq!(classify_grpc(&Status::deadline_exceeded("x"), "e").kind(), "retryable");
        assert_eq!(classify_grpc(&Status::invalid_argument("x"), "e").kind(), "permanent");
        assert_eq!(classify_grpc(&Status::permission_denied("x"), "e").kind(), "permanent");
        // RESOURCE_EXHAUSTED is retried only when the server says when.
        assert_eq!(classify_grpc(&Status::resource_exhausted("x"), "e").kind(), "permanent");
        let details = retry_details(8, "slow down", Duration::from_secs(3));
        let throttled = classify_grpc(&Status::with_details(Code::ResourceExhausted, "x", details.into()), "e");
        assert_eq!(throttled, ExportError::Throttled {
            reason: "gRPC ResourceExhausted from e: x".into(),
            after: Some(Duration::from_secs(3)),
        });
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn server_messages_come_from_status_or_text() {
        let status = RpcStatus { code: 3, message: "bad span".into(), details: vec![] }.encode_to_vec();
        assert_eq!(server_message("application/x-protobuf", &status), "bad span");
        assert_eq!(server_message("text/plain", b" nope \n"), "nope");
        assert_eq!(server_message("", b""), "(empty body)");
    }

    #[test]
    fn concatenated_requests_decode_as_one() {
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let one = |name: &str| Traces {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: vec![Span { name: name.into(), ..Default::default() }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let mut buf = one("a").encode_to_vec();
        buf.extend(one("b").encode_to_vec());
        let merged = Traces::decode(buf.as_slice()).unwrap();
        assert_eq!(merged.item_count(), 2);
        assert_eq!(merged.resource_spans[1].scope_spans[0].spans[0].name, "b");
    }
}
