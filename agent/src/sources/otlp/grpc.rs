//! The OTLP/gRPC receiver (tonic, the generated OTLP services).

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{LogsService, LogsServiceServer};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};

use super::{Answer, Intake, Rejection, MAX_CONCURRENT_REQUESTS};
use crate::config::ServerTlsConfig;
use crate::signal::status::retry_details;
use crate::signal::{Logs, Metrics, Traces};
use crate::telemetry::ReceiverMetrics;

/// The three pipelines' intakes as seen by this receiver.
pub struct Intakes {
    pub traces: Intake<Traces>,
    pub metrics: Intake<Metrics>,
    pub logs: Intake<Logs>,
}

struct Service<T>(Intake<T>);

impl From<Rejection> for Status {
    fn from(rejection: Rejection) -> Status {
        match rejection {
            Rejection::Malformed(message) => Status::invalid_argument(message),
            Rejection::TooLarge(message) => Status::resource_exhausted(message),
            Rejection::UnsupportedMediaType(message) => Status::invalid_argument(message),
            Rejection::Full { message, retry_after } => {
                // UNAVAILABLE is retryable for every OTLP client; RetryInfo says when.
                let details = retry_details(Code::Unavailable as i32, &message, retry_after);
                Status::with_details(Code::Unavailable, message, details.into())
            }
            Rejection::ShuttingDown => Status::unavailable("the agent is shutting down"),
        }
    }
}

async fn export<T: Answer>(intake: &Intake<T>, request: Request<T>) -> Result<Response<T::Response>, Status> {
    let accepted = intake.accept(request.into_inner()).await?;
    Ok(Response::new(T::answer(&accepted)))
}

#[tonic::async_trait]
impl TraceService for Service<Traces> {
    async fn export(&self, request: Request<Traces>) -> Result<Response<ExportTraceServiceResponse>, Status> {
        export(&self.0, request).await
    }
}

#[tonic::async_trait]
impl MetricsService for Service<Metrics> {
    async fn export(&self, request: Request<Metrics>) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        export(&self.0, request).await
    }
}

#[tonic::async_trait]
impl LogsService for Service<Logs> {
    async fn export(&self, request: Request<Logs>) -> Result<Response<ExportLogsServiceResponse>, Status> {
        export(&self.0, request).await
    }
}

/// Requests that tonic refuses before our handlers run: a message over the size limit
/// (tonic answers OUT_OF_RANGE; the OTLP specification wants RESOURCE_EXHAUSTED) and a body
/// that does not decode or decompress (tonic answers INTERNAL; it is the client's fault, so
/// INVALID_ARGUMENT). Our handlers answer neither code themselves, so on this server those
/// codes always mean these failures. This layer rewrites the codes and counts the requests.
#[derive(Clone)]
struct DecodeFailures {
    receivers: Arc<[(&'static str, ReceiverMetrics); 3]>,
}

#[derive(Clone)]
struct DecodeFailuresService<S> {
    inner: S,
    receivers: Arc<[(&'static str, ReceiverMetrics); 3]>,
}

impl<S> tower::Layer<S> for DecodeFailures {
    type Service = DecodeFailuresService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DecodeFailuresService { inner, receivers: self.receivers.clone() }
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for DecodeFailuresService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let receiver = self.receivers.iter().find(|(prefix, _)| path.starts_with(prefix)).map(|(_, m)| m.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            let headers = response.headers_mut();
            let (code, outcome) = match headers.get("grpc-status").map(|v| v.as_bytes()) {
                Some(b"11") => ("8", "too_large"),
                Some(b"13") => ("3", "malformed"),
                _ => return Ok(response),
            };
            headers.insert("grpc-status", http::HeaderValue::from_static(code));
            if let Some(receiver) = receiver {
                receiver.request(outcome);
            }
            Ok(response)
        })
    }
}

/// Serves the OTLP gRPC services on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    intakes: Intakes,
    max_request_size: usize,
    tls: Option<&ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    // Larger HTTP/2 windows than the 64 KiB default let big export requests flow without
    // waiting on window updates.
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(1 << 20))
        .initial_connection_window_size(Some(4 << 20))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder.tls_config(server_tls(tls)?).map_err(|e| format!("TLS: {e}"))?;
    }
    let decode_failures = DecodeFailures {
        receivers: Arc::new([
            ("/opentelemetry.proto.collector.trace.v1.", intakes.traces.metrics().clone()),
            ("/opentelemetry.proto.collector.metrics.v1.", intakes.metrics.metrics().clone()),
            ("/opentelemetry.proto.collector.logs.v1.", intakes.logs.metrics().clone()),
        ]),
    };
    let traces = TraceServiceServer::new(Service(intakes.traces))
        .max_decoding_message_size(max_request_size)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let metrics = MetricsServiceServer::new(Service(intakes.metrics))
        .max_decoding_message_size(max_request_size)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let logs = LogsServiceServer::new(Service(intakes.logs))
        .max_decoding_message_size(max_request_size)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    builder
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(MAX_CONCURRENT_REQUESTS))
        .layer(decode_failures)
        .add_service(traces)
        .add_service(metrics)
        .add_service(logs)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
        .map_err(|e| e.to_string())
}

fn server_tls(tls: &ServerTlsConfig) -> Result<tonic::transport::ServerTlsConfig, String> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let identity = tonic::transport::Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}
