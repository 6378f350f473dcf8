//! A stand-in for Jaeger's collector: an OTLP trace server over gRPC (the generated
//! `TraceServiceServer`) or HTTP (`POST /v1/traces`, protobuf, optionally gzip) that records
//! every request with its headers and answers from a [`Script`], so tests can play outages
//! and rejections and then compare what arrived with what was sent.
//!
//! Either can serve over TLS with the certificates of a [`Pki`], requiring clients to present
//! a certificate of the same CA. Handshakes run in their own tasks, and each one that fails
//! is recorded with rustls' reason, so a test can tell a refused connection from one that
//! never came.

use std::collections::VecDeque;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::{header, HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;

use crate::spans::{flatten, FlatSpan};
use crate::tls::{Pki, ALPN_GRPC, ALPN_HTTP1};
use crate::DEADLINE;

/// Largest request the stand-in takes; far above anything the tests send.
const MAX_REQUEST: usize = 64 << 20;

/// How long a client may take over its TLS handshake before the stand-in gives up on it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the stand-in answers one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Success: an empty `ExportTraceServiceResponse`.
    Accept,
    /// gRPC stand-in: this status code and message.
    Grpc(tonic::Code, String),
    /// HTTP stand-in: this status code, a `google.rpc.Status` body carrying `message`, and
    /// `Retry-After: <seconds>` when given.
    Http { status: u16, retry_after: Option<u32>, message: String },
}

impl Reply {
    pub fn grpc(code: tonic::Code, message: &str) -> Reply {
        Reply::Grpc(code, message.to_owned())
    }

    pub fn http(status: u16, retry_after: Option<u32>, message: &str) -> Reply {
        Reply::Http { status, retry_after, message: message.to_owned() }
    }
}

/// The answers to successive requests: the listed ones first, then `then` forever.
#[derive(Debug, Clone)]
pub struct Script {
    first: VecDeque<Reply>,
    then: Reply,
}

impl Script {
    /// Accept everything.
    pub fn accept() -> Script {
        Script::always(Reply::Accept)
    }

    /// Answer every request with `reply`.
    pub fn always(reply: Reply) -> Script {
        Script { first: VecDeque::new(), then: reply }
    }

    /// Answer the first `n` requests with `reply`, then accept.
    pub fn first(n: usize, reply: Reply) -> Script {
        Script { first: std::iter::repeat_n(reply, n).collect(), then: Reply::Accept }
    }

    /// Answer the first requests with `replies`, one each, then accept.
    pub fn then_accept(replies: Vec<Reply>) -> Script {
        Script { first: replies.into(), then: Reply::Accept }
    }

    fn next(&mut self) -> Reply {
        self.first.pop_front().unwrap_or_else(|| self.then.clone())
    }
}

/// One request as the stand-in saw it, and what it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub request: ExportTraceServiceRequest,
    pub reply: Reply,
}

impl Received {
    pub fn accepted(&self) -> bool {
        self.reply == Reply::Accept
    }

    pub fn spans(&self) -> Vec<FlatSpan> {
        flatten(&self.request)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct Record {
    received: Vec<Received>,
    /// Requests that were not valid OTLP: the agent sent something Jaeger could not read.
    problems: Vec<String>,
    /// Why each failed TLS handshake failed.
    failed_handshakes: Vec<String>,
}

struct Shared {
    script: Mutex<Script>,
    record: Mutex<Record>,
    accepted_spans: watch::Sender<usize>,
    requests: watch::Sender<usize>,
    failed_handshakes: watch::Sender<usize>,
}

impl Shared {
    fn new(script: Script) -> Arc<Shared> {
        Arc::new(Shared {
            script: Mutex::new(script),
            record: Mutex::new(Record::default()),
            accepted_spans: watch::Sender::new(0),
            requests: watch::Sender::new(0),
            failed_handshakes: watch::Sender::new(0),
        })
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn answer(&self, headers: HeaderMap, request: ExportTraceServiceRequest) -> Reply {
        let reply = self.script.lock().unwrap_or_else(|p| p.into_inner()).next();
        let spans = flatten(&request).len();
        self.record().received.push(Received { headers, request, reply: reply.clone() });
        if reply == Reply::Accept {
            self.accepted_spans.send_modify(|n| *n += spans);
        }
        self.requests.send_modify(|n| *n += 1);
        reply
    }

    fn problem(&self, problem: String) {
        self.record().problems.push(problem);
        self.requests.send_modify(|n| *n += 1);
    }

    fn failed_handshake(&self, reason: String) {
        self.record().failed_handshakes.push(reason);
        self.failed_handshakes.send_modify(|n| *n += 1);
    }
}

/// A running stand-in; the server stops when this is dropped.
pub struct Collector {
    addr: SocketAddr,
    protocol: &'static str,
    tls: bool,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    /// The task that accepts connections and runs TLS handshakes, when serving TLS.
    acceptor: Option<JoinHandle<()>>,
}

impl Collector {
    /// An OTLP/gRPC trace server (gzip accepted) on a free loopback port.
    pub async fn grpc(script: Script) -> Collector {
        let incoming = TcpIncoming::bind(([127, 0, 0, 1], 0).into()).expect("cannot bind the gRPC stand-in");
        let addr = incoming.local_addr().expect("no local address");
        let shared = Shared::new(script);
        let service = grpc_service(&shared);
        let task = tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await
            {
                eprintln!("the gRPC stand-in stopped: {e}");
            }
        });
        Collector { addr, protocol: "grpc", tls: false, shared, task, acceptor: None }
    }

    /// [`Collector::grpc`] over TLS: `pki`'s server certificate, and clients must present a
    /// certificate signed by `pki`'s CA.
    pub async fn grpc_tls(script: Script, pki: &Pki) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("cannot bind the gRPC stand-in");
        let addr = listener.local_addr().expect("no local address");
        let shared = Shared::new(script);
        let (connections, acceptor) = accept_tls(listener, pki.rustls_server(ALPN_GRPC), shared.clone());
        let incoming = ReceiverStream::new(connections).map(Ok::<_, std::io::Error>);
        let service = grpc_service(&shared);
        let task = tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await
            {
                eprintln!("the gRPC stand-in stopped: {e}");
            }
        });
        Collector { addr, protocol: "grpc", tls: true, shared, task, acceptor: Some(acceptor) }
    }

    /// An OTLP/HTTP trace server (`POST /v1/traces`, protobuf, gzip accepted) on a free
    /// loopback port.
    pub async fn http(script: Script) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("cannot bind the HTTP stand-in");
        let addr = listener.local_addr().expect("no local address");
        let shared = Shared::new(script);
        let router = http_router(&shared);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("the HTTP stand-in stopped: {e}");
            }
        });
        Collector { addr, protocol: "http", tls: false, shared, task, acceptor: None }
    }

    /// [`Collector::http`] over TLS (HTTP/1.1): `pki`'s server certificate, and clients must
    /// present a certificate signed by `pki`'s CA.
    pub async fn http_tls(script: Script, pki: &Pki) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("cannot bind the HTTP stand-in");
        let addr = listener.local_addr().expect("no local address");
        let shared = Shared::new(script);
        let (connections, acceptor) = accept_tls(listener, pki.rustls_server(ALPN_HTTP1), shared.clone());
        let router = http_router(&shared);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(TlsConnections { addr, connections }, router).await {
                eprintln!("the HTTP stand-in stopped: {e}");
            }
        });
        Collector { addr, protocol: "http", tls: true, shared, task, acceptor: Some(acceptor) }
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// The URL the agent's exporter is given: `http://127.0.0.1:PORT`, or over TLS
    /// `https://localhost:PORT` (a name the server certificate of [`Pki::new`] holds).
    pub fn endpoint(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// `grpc` or `http`: the value of `exporters.jaeger.protocol` that reaches this stand-in.
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// The body of `exporters.jaeger` pointing at this stand-in, with quick batches and
    /// retries; `overrides` replace or add keys (`("compression", "gzip")`).
    pub fn exporter_config(&self, overrides: &[(&str, &str)]) -> String {
        let mut keys: Vec<(String, String)> = [
            ("endpoint", self.endpoint()),
            ("protocol", self.protocol.to_owned()),
            ("timeout", "5s".to_owned()),
            ("batch", "{ max_spans: 512, timeout: 100ms }".to_owned()),
            ("retry", "{ initial_interval: 50ms, max_interval: 500ms, max_elapsed_time: 60s }".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (key, value) in overrides {
            match keys.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = (*value).to_owned(),
                None => keys.push(((*key).to_owned(), (*value).to_owned())),
            }
        }
        keys.iter().map(|(k, v)| format!("{k}: {v}\n")).collect()
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        let record = self.shared.record();
        assert!(record.problems.is_empty(), "the agent sent requests that are not valid OTLP: {:?}", record.problems);
        record.received.clone()
    }

    /// The spans of every accepted request, in arrival order (duplicates included).
    pub fn accepted_spans(&self) -> Vec<FlatSpan> {
        self.requests().iter().filter(|r| r.accepted()).flat_map(Received::spans).collect()
    }

    /// Waits until accepted requests hold at least `n` spans; returns the accepted spans.
    pub async fn wait_for_spans(&self, n: usize) -> Vec<FlatSpan> {
        let mut counter = self.shared.accepted_spans.subscribe();
        let waited = tokio::time::timeout(DEADLINE, counter.wait_for(|count| *count >= n)).await.is_ok();
        if !waited {
            panic!(
                "only {} of {n} spans arrived at the stand-in within {DEADLINE:?} ({} requests: {:?})",
                *self.shared.accepted_spans.borrow(),
                self.requests().len(),
                self.requests().iter().map(|r| (&r.reply, r.spans().len())).collect::<Vec<_>>()
            );
        }
        self.accepted_spans()
    }

    /// Why each failed TLS handshake failed, in order; empty for a plain stand-in.
    pub fn failed_handshakes(&self) -> Vec<String> {
        self.shared.record().failed_handshakes.clone()
    }

    /// Waits until at least `n` TLS handshakes have failed; returns why each failed.
    pub async fn wait_for_failed_handshakes(&self, n: usize) -> Vec<String> {
        let mut counter = self.shared.failed_handshakes.subscribe();
        let waited = tokio::time::timeout(DEADLINE, counter.wait_for(|count| *count >= n)).await.is_ok();
        if !waited {
            panic!(
                "only {} of {n} failed TLS handshakes at the stand-in within {DEADLINE:?}",
                *self.shared.failed_handshakes.borrow()
            );
        }
        self.failed_handshakes()
    }

    /// Waits until at least `n` requests have arrived (answered whatever the script said).
    pub async fn wait_for_requests(&self, n: usize) -> Vec<Received> {
        let mut counter = self.shared.requests.subscribe();
        let waited = tokio::time::timeout(DEADLINE, counter.wait_for(|count| *count >= n)).await.is_ok();
        if !waited {
            panic!(
                "only {} of {n} requests arrived at the stand-in within {DEADLINE:?}",
                *self.shared.requests.borrow()
            );
        }
        self.requests()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(acceptor) = &self.acceptor {
            acceptor.abort();
        }
    }
}

fn grpc_service(shared: &Arc<Shared>) -> TraceServiceServer<GrpcStandIn> {
    TraceServiceServer::new(GrpcStandIn(shared.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_REQUEST)
}

fn http_router(shared: &Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/traces", post(http_export))
        .layer(DefaultBodyLimit::max(MAX_REQUEST))
        .with_state(shared.clone())
}

/// Accepts TCP connections on `listener` and runs each TLS handshake in its own task, so a
/// client that fails or stalls one holds up no other. Finished connections come out of the
/// returned channel; failed handshakes go to the record.
fn accept_tls(
    listener: TcpListener,
    config: rustls::ServerConfig,
    shared: Arc<Shared>,
) -> (mpsc::Receiver<TlsStream<TcpStream>>, JoinHandle<()>) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (sender, connections) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("the TLS stand-in cannot accept: {e}");
                    return;
                }
            };
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(connection)) => {
                        let _ = sender.send(connection).await;
                    }
                    Ok(Err(e)) => shared.failed_handshake(e.to_string()),
                    Err(_) => shared.failed_handshake(format!("no handshake within {HANDSHAKE_TIMEOUT:?}")),
                }
            });
        }
    });
    (connections, task)
}

/// The connections of [`accept_tls`] as a listener for `axum::serve`.
struct TlsConnections {
    addr: SocketAddr,
    connections: mpsc::Receiver<TlsStream<TcpStream>>,
}

impl axum::serve::Listener for TlsConnections {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => {
                let peer = connection.get_ref().0.peer_addr().unwrap_or(self.addr);
                (connection, peer)
            }
            // The acceptor stopped: so does this server, waiting for its task to be aborted.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

struct GrpcStandIn(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for GrpcStandIn {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let (metadata, _, message) = request.into_parts();
        match self.0.answer(metadata.into_headers(), message) {
            Reply::Accept => Ok(tonic::Response::new(ExportTraceServiceResponse::default())),
            Reply::Grpc(code, message) => Err(tonic::Status::new(code, message)),
            other => Err(tonic::Status::internal(format!("the gRPC stand-in was scripted with {other:?}"))),
        }
    }
}

/// `google.rpc.Status` without details: the body of an OTLP/HTTP error answer.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

async fn http_export(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let request = match decode_http_request(&headers, &body) {
        Ok(request) => request,
        Err(problem) => {
            shared.problem(problem.clone());
            return (StatusCode::BAD_REQUEST, problem).into_response();
        }
    };
    let protobuf = [(header::CONTENT_TYPE, "application/x-protobuf")];
    match shared.answer(headers, request) {
        Reply::Accept => {
            (StatusCode::OK, protobuf, ExportTraceServiceResponse::default().encode_to_vec()).into_response()
        }
        Reply::Http { status, retry_after, message } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            // google.rpc.Code for the usual HTTP answers; only the message matters to tests.
            let code = match status.as_u16() {
                400 => 3,
                429 => 8,
                _ => 14,
            };
            let body = RpcStatus { code, message }.encode_to_vec();
            let mut response = (status, protobuf, body).into_response();
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
            }
            response
        }
        other => (StatusCode::INTERNAL_SERVER_ERROR, format!("the HTTP stand-in was scripted with {other:?}"))
            .into_response(),
    }
}

fn decode_http_request(headers: &HeaderMap, body: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type != "application/x-protobuf" {
        return Err(format!("Content-Type is {content_type:?}, not application/x-protobuf"));
    }
    let inflated;
    let body = match headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => body,
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body).read_to_end(&mut out).map_err(|e| format!("bad gzip body: {e}"))?;
            inflated = out;
            &inflated[..]
        }
        Some(other) => return Err(format!("unexpected Content-Encoding {other:?}")),
    };
    ExportTraceServiceRequest::decode(body).map_err(|e| format!("not an ExportTraceServiceRequest: {e}"))
}
