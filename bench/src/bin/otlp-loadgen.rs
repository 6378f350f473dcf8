//! `otlp-loadgen`: sends a fixed number of spans to an OTLP/gRPC trace receiver as fast as it
//! accepts them, from several concurrent clients, and reports the rate achieved.
//!
//! ```text
//! otlp-loadgen --endpoint http://127.0.0.1:4317 --spans 2000000 --batch 512 --concurrency 4
//! ```
//! Requests are built and encoded before the clock starts (a pool of `--pool` distinct
//! requests, sent round-robin), so the measured time is the receiver's, not the generator's.
//! A request answered UNAVAILABLE or RESOURCE_EXHAUSTED — a receiver pushing back — is sent
//! again after a short backoff and counted as a retry; any other error counts its spans as
//! failed. `--report FILE` writes the figures as `name=value` lines (`start_ns`, `end_ns`,
//! `spans`, `failed_spans`, `requests`, `retries`).
//!
//! `--workload gateway` (the default) sends the gateway's traces of eight spans, the pool
//! round-robin as built. `--workload handlers` sends traces of `--routes` handlers with variants
//! and a downstream service (see `workload::handlers`), and gives each round through the pool
//! new trace ids (patched into a copy of the encoded bytes), so that every trace is new to an
//! agent that assembles traces.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use periscope_bench::args::Args;
use periscope_bench::codec::PreEncoded;
use periscope_bench::{report, workload};
use prost::Message;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

const USAGE: &str = "usage: otlp-loadgen --endpoint URL [--spans N] [--batch B] [--concurrency C] \
                     [--pool P] [--workload gateway|handlers] [--routes R] [--report FILE]";
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// Attempts per request before its spans count as failed: about 20 s of pushback.
const MAX_ATTEMPTS: u32 = 200;

struct Plan {
    /// Pre-encoded full requests, sent round-robin.
    pool: Vec<Bytes>,
    /// Per pooled request, where its trace ids are, when every round gets new ones.
    id_offsets: Option<Vec<Vec<usize>>>,
    /// The last request when the span total is not a multiple of the batch size.
    tail: Option<(Bytes, u64)>,
    batch: u64,
    full_requests: u64,
}

impl Plan {
    fn requests(&self) -> u64 {
        self.full_requests + u64::from(self.tail.is_some())
    }

    /// The body and span count of request number `n`.
    fn request(&self, n: u64) -> (Bytes, u64) {
        if n < self.full_requests {
            let at = (n % self.pool.len() as u64) as usize;
            let round = n / self.pool.len() as u64;
            let body = match &self.id_offsets {
                Some(offsets) if round > 0 => {
                    let mut bytes = self.pool[at].to_vec();
                    workload::patch_trace_ids(&mut bytes, &offsets[at], round);
                    Bytes::from(bytes)
                }
                _ => self.pool[at].clone(),
            };
            (body, self.batch)
        } else {
            self.tail.clone().unwrap_or_default()
        }
    }
}

#[derive(Default)]
struct Tally {
    next: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
}

#[tokio::main]
async fn main() {
    if let Err(message) = run().await {
        eprintln!("otlp-loadgen: {message}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let args = Args::parse(
        std::env::args().skip(1),
        &["endpoint", "spans", "batch", "concurrency", "pool", "workload", "routes", "report"],
    )
    .map_err(|e| format!("{e}\n{USAGE}"))?;
    let endpoint = args.text("endpoint").ok_or_else(|| format!("--endpoint is required\n{USAGE}"))?.to_string();
    let spans: u64 = args.get("spans", 1_000_000).map_err(|e| e.to_string())?;
    let batch: u64 = args.get("batch", 512).map_err(|e| e.to_string())?;
    let concurrency: usize = args.get("concurrency", 4).map_err(|e| e.to_string())?;
    let pool_size: u64 = args.get("pool", 64).map_err(|e| e.to_string())?;
    let report_path = args.text("report").map(PathBuf::from);
    let shape = match args.text("workload").unwrap_or("gateway") {
        "gateway" => Workload::Gateway,
        "handlers" => Workload::Handlers {
            routes: args.get("routes", workload::handlers::DEFAULT_ROUTES).map_err(|e| e.to_string())?,
        },
        other => return Err(format!("--workload {other:?}: expected gateway or handlers\n{USAGE}")),
    };
    if batch == 0 || concurrency == 0 || pool_size == 0 {
        return Err("--batch, --concurrency and --pool must be greater than 0".into());
    }

    let plan = Arc::new(build_plan(spans, batch, pool_size, shape));
    let bytes: usize = plan.pool.iter().map(Bytes::len).sum();
    println!(
        "otlp-loadgen: {} requests of {batch} spans ({} bytes each on average) to {endpoint}, {concurrency} clients",
        plan.requests(),
        bytes / plan.pool.len().max(1),
    );

    let endpoint = Endpoint::from_shared(endpoint.clone())
        .map_err(|e| format!("--endpoint {endpoint:?}: {e}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20);
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let channel = endpoint.connect().await.map_err(|e| format!("cannot connect to {:?}: {e}", endpoint.uri()))?;
        clients.push(channel);
    }

    let tally = Arc::new(Tally::default());
    let start_ns = report::unix_nanos();
    let started = Instant::now();
    let workers: Vec<_> =
        clients.into_iter().map(|channel| tokio::spawn(send_all(channel, plan.clone(), tally.clone()))).collect();
    for worker in workers {
        worker.await.map_err(|e| format!("client task failed: {e}"))?;
    }
    let elapsed = started.elapsed();
    let end_ns = report::unix_nanos();

    let sent = tally.sent.load(Ordering::Acquire);
    let failed = tally.failed.load(Ordering::Acquire);
    let retries = tally.retries.load(Ordering::Acquire);
    println!(
        "otlp-loadgen: sent {sent} spans in {:.2} s: {:.0} spans/s; {retries} retries, {failed} spans failed",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
    );
    if let Some(path) = report_path {
        let entries = [
            ("start_ns", start_ns.to_string()),
            ("end_ns", end_ns.to_string()),
            ("spans", sent.to_string()),
            ("failed_spans", failed.to_string()),
            ("requests", plan.requests().to_string()),
            ("retries", retries.to_string()),
        ];
        report::write(&path, &entries).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if failed > 0 {
        return Err(format!("{failed} spans were not accepted"));
    }
    Ok(())
}

/// What the requests carry.
#[derive(Clone, Copy)]
enum Workload {
    Gateway,
    Handlers { routes: usize },
}

impl Workload {
    fn request(self, index: u64, spans: usize, base: u64) -> ExportTraceServiceRequest {
        match self {
            Workload::Gateway => workload::request(index, spans, base),
            Workload::Handlers { routes } => workload::handlers::request(index, spans, base, routes),
        }
    }
}

fn build_plan(spans: u64, batch: u64, pool_size: u64, shape: Workload) -> Plan {
    let base = report::unix_nanos() as u64;
    let full_requests = spans / batch;
    let requests: Vec<ExportTraceServiceRequest> =
        (0..pool_size.min(full_requests.max(1))).map(|i| shape.request(i, batch as usize, base)).collect();
    let pool: Vec<Bytes> = requests.iter().map(|r| Bytes::from(r.encode_to_vec())).collect();
    let id_offsets = match shape {
        Workload::Gateway => None,
        Workload::Handlers { .. } => {
            Some(requests.iter().zip(&pool).map(|(r, bytes)| workload::trace_id_offsets(bytes, r)).collect())
        }
    };
    let tail = (spans % batch != 0).then(|| {
        let rest = spans % batch;
        (Bytes::from(shape.request(full_requests, rest as usize, base).encode_to_vec()), rest)
    });
    Plan { pool, id_offsets, tail, batch, full_requests }
}

/// One client: takes the next request number until none are left, and sends it until the
/// receiver accepts it or gives a final answer.
async fn send_all(channel: Channel, plan: Arc<Plan>, tally: Arc<Tally>) {
    let mut grpc = Grpc::new(channel).max_decoding_message_size(64 << 20);
    let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
    loop {
        let n = tally.next.fetch_add(1, Ordering::AcqRel);
        if n >= plan.requests() {
            return;
        }
        let (body, spans) = plan.request(n);
        let mut backoff = Duration::from_millis(5);
        let mut attempt = 1;
        loop {
            let outcome = match grpc.ready().await {
                Ok(()) => grpc
                    .unary::<_, ExportTraceServiceResponse, _>(
                        Request::new(body.clone()),
                        path.clone(),
                        PreEncoded::default(),
                    )
                    .await
                    .map(|_| ()),
                Err(e) => Err(tonic::Status::unavailable(format!("connection not ready: {e}"))),
            };
            match outcome {
                Ok(()) => {
                    tally.sent.fetch_add(spans, Ordering::AcqRel);
                    break;
                }
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted)
                        && attempt < MAX_ATTEMPTS =>
                {
                    tally.retries.fetch_add(1, Ordering::AcqRel);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                    attempt += 1;
                }
                Err(status) => {
                    eprintln!("otlp-loadgen: request {n} failed: {:?} {}", status.code(), status.message());
                    tally.failed.fetch_add(spans, Ordering::AcqRel);
                    break;
                }
            }
        }
    }
}
