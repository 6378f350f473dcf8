//! `otlp-sink`: an OTLP/gRPC trace receiver that decodes every request, counts its spans and
//! keeps nothing. It stands where Jaeger's collector would, so a benchmark measures the agent
//! and not the backend.
//!
//! ```text
//! otlp-sink --listen 127.0.0.1:14317 --stats /tmp/sink.stats
//! ```
//! The stats file (`name=value` lines, replaced whole every 100 ms) holds `spans`, `requests`,
//! and the wall-clock times in Unix nanoseconds of the first and the latest request that
//! carried spans (`first_ns`, `last_ns`). It first appears once the port is bound. A line on
//! stdout each second shows the running total.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use periscope_bench::args::Args;
use periscope_bench::{report, workload};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

const USAGE: &str = "usage: otlp-sink --listen ADDR [--stats FILE]";

#[derive(Default)]
struct Counts {
    spans: AtomicU64,
    requests: AtomicU64,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

impl Counts {
    fn entries(&self) -> Vec<(&'static str, String)> {
        vec![
            ("spans", self.spans.load(Ordering::Acquire).to_string()),
            ("requests", self.requests.load(Ordering::Acquire).to_string()),
            ("first_ns", self.first_ns.load(Ordering::Acquire).to_string()),
            ("last_ns", self.last_ns.load(Ordering::Acquire).to_string()),
        ]
    }
}

struct Sink {
    counts: Arc<Counts>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = workload::span_count(request.get_ref());
        if spans > 0 {
            let now = report::unix_nanos() as u64;
            let counts = &self.counts;
            let _ = counts.first_ns.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
            counts.last_ns.fetch_max(now, Ordering::AcqRel);
            counts.spans.fetch_add(spans, Ordering::AcqRel);
        }
        self.counts.requests.fetch_add(1, Ordering::AcqRel);
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::main]
async fn main() {
    if let Err(message) = run().await {
        eprintln!("otlp-sink: {message}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let args = Args::parse(std::env::args().skip(1), &["listen", "stats"]).map_err(|e| format!("{e}\n{USAGE}"))?;
    let listen: SocketAddr = args
        .text("listen")
        .ok_or_else(|| format!("--listen is required\n{USAGE}"))?
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    let stats = args.text("stats").map(PathBuf::from);

    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot bind {listen}: {e}"))?;
    let counts = Arc::new(Counts::default());
    if let Some(path) = &stats {
        report::write(path, &counts.entries()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    println!("otlp-sink: listening on {listen}");
    tokio::spawn(publish(counts.clone(), stats));

    let service = TraceServiceServer::new(Sink { counts })
        .max_decoding_message_size(64 << 20)
        .accept_compressed(CompressionEncoding::Gzip);
    tonic::transport::Server::builder()
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .serve_with_incoming(service, TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await
        .map_err(|e| format!("server failed: {e}"))
}

/// Refreshes the stats file every 100 ms and prints the total each second while it grows.
async fn publish(counts: Arc<Counts>, stats: Option<PathBuf>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut written = 0;
    let mut printed = 0;
    for round in 0u64.. {
        tick.tick().await;
        let spans = counts.spans.load(Ordering::Acquire);
        if let Some(path) = &stats {
            if spans != written {
                match report::write(path, &counts.entries()) {
                    Ok(()) => written = spans,
                    Err(e) => eprintln!("otlp-sink: cannot write {}: {e}", path.display()),
                }
            }
        }
        if round % 10 == 0 && spans != printed {
            println!("otlp-sink: {spans} spans (+{}/s)", spans - printed);
            printed = spans;
        }
    }
}
