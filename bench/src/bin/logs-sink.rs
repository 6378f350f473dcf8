//! `logs-sink`: a log backend stand-in that decodes every push, counts its lines and keeps
//! nothing. It speaks both protocols of the logs benchmark:
//!
//! - `POST /loki/api/v1/push`: Loki's push API, `push.proto` compressed with snappy's block
//!   format, as Loki's own clients (and Periscope) send it; answered with 204.
//! - `POST /v1/logs`: OTLP/HTTP protobuf, uncompressed or with `Content-Encoding` `gzip`,
//!   `deflate` or `snappy` (block or framed); answered with an empty
//!   `ExportLogsServiceResponse`.
//!
//! ```text
//! logs-sink --listen 127.0.0.1:3100 --stats /tmp/sink.stats
//! ```
//! Lines that carry a sequence number (`seq=<digits>`) are checked off, so the stats tell lost
//! lines from duplicates. The stats file (`name=value` lines, replaced whole every 100 ms)
//! holds `lines` (all lines received), `distinct` (distinct sequence numbers), `duplicates`
//! (lines whose sequence number came before), `unnumbered` (lines without one), `requests`,
//! and the wall-clock times in Unix nanoseconds of the first and the latest request that
//! carried lines (`first_ns`, `last_ns`). It first appears once the port is bound. A line on
//! stdout each second shows the running total.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::Router;
use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use periscope_bench::args::Args;
use periscope_bench::report;
use prost::Message;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const USAGE: &str = "usage: logs-sink --listen ADDR [--stats FILE]";

/// Loki's push API messages, as the agent defines them.
use periscope::exporters::loki::push as loki;

/// What arrived so far.
#[derive(Default)]
struct Tally {
    lines: u64,
    distinct: u64,
    duplicates: u64,
    unnumbered: u64,
    requests: u64,
    first_ns: u64,
    last_ns: u64,
    /// One bit per sequence number seen.
    seen: Vec<u64>,
}

impl Tally {
    /// Counts one request's lines.
    fn add<'a>(&mut self, lines: impl Iterator<Item = &'a str>) {
        self.requests += 1;
        let before = self.lines;
        for line in lines {
            self.lines += 1;
            match sequence(line) {
                Some(seq) => self.check_off(seq),
                None => self.unnumbered += 1,
            }
        }
        if self.lines > before {
            let now = report::unix_nanos() as u64;
            if self.first_ns == 0 {
                self.first_ns = now;
            }
            self.last_ns = self.last_ns.max(now);
        }
    }

    fn check_off(&mut self, seq: u64) {
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
        } else {
            self.seen[word] |= bit;
            self.distinct += 1;
        }
    }

    fn entries(&self) -> Vec<(&'static str, String)> {
        vec![
            ("lines", self.lines.to_string()),
            ("distinct", self.distinct.to_string()),
            ("duplicates", self.duplicates.to_string()),
            ("unnumbered", self.unnumbered.to_string()),
            ("requests", self.requests.to_string()),
            ("first_ns", self.first_ns.to_string()),
            ("last_ns", self.last_ns.to_string()),
        ]
    }
}

/// The number after the first `seq=` of a line, if there is one.
fn sequence(line: &str) -> Option<u64> {
    let rest = &line[line.find("seq=")? + 4..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

type Shared = Arc<Mutex<Tally>>;

fn refuse(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// `POST /loki/api/v1/push`
async fn loki_push(State(tally): State<Shared>, body: Bytes) -> Response {
    let raw = match snap::raw::Decoder::new().decompress_vec(&body) {
        Ok(raw) => raw,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("snappy: {e}")),
    };
    let request = match loki::PushRequest::decode(raw.as_slice()) {
        Ok(request) => request,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("push request: {e}")),
    };
    let lines = request.streams.iter().flat_map(|s| s.entries.iter().map(|e| e.line.as_str()));
    tally.lock().unwrap_or_else(|e| e.into_inner()).add(lines);
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /v1/logs`
async fn otlp_logs(State(tally): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity");
    let raw = match decompress(encoding, &body) {
        Ok(raw) => raw,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("{encoding}: {e}")),
    };
    let request = match ExportLogsServiceRequest::decode(raw.as_ref()) {
        Ok(request) => request,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("export request: {e}")),
    };
    let lines = request.resource_logs.iter().flat_map(|r| &r.scope_logs).flat_map(|s| &s.log_records).map(body_line);
    tally.lock().unwrap_or_else(|e| e.into_inner()).add(lines);
    let response = ExportLogsServiceResponse { partial_success: None }.encode_to_vec();
    ([(header::CONTENT_TYPE, "application/x-protobuf")], response).into_response()
}

/// A record's body as a line: a string body as it is, anything else empty (so it counts as unnumbered).
fn body_line(record: &LogRecord) -> &str {
    match record.body.as_ref().and_then(|b| b.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s,
        _ => "",
    }
}

/// A request body without its `Content-Encoding`.
fn decompress(encoding: &str, body: &Bytes) -> Result<Bytes, String> {
    const SNAPPY_FRAMED: &[u8] = b"\xff\x06\x00\x00sNaPpY";
    let mut out = Vec::with_capacity(body.len() * 4);
    let read = match encoding {
        "" | "identity" => return Ok(body.clone()),
        "gzip" => flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out),
        "deflate" => flate2::read::ZlibDecoder::new(&body[..]).read_to_end(&mut out),
        "x-snappy-framed" => snap::read::FrameDecoder::new(&body[..]).read_to_end(&mut out),
        "snappy" if body.starts_with(SNAPPY_FRAMED) => snap::read::FrameDecoder::new(&body[..]).read_to_end(&mut out),
        "snappy" => return snap::raw::Decoder::new().decompress_vec(body).map(Bytes::from).map_err(|e| e.to_string()),
        other => return Err(format!("unsupported content encoding {other:?}")),
    };
    read.map(|_| Bytes::from(out)).map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(message) = run().await {
        eprintln!("logs-sink: {message}");
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
    let tally: Shared = Arc::default();
    if let Some(path) = &stats {
        report::write(path, &Tally::default().entries())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    println!("logs-sink: listening on {listen}");
    tokio::spawn(publish(tally.clone(), stats));

    let app = Router::new()
        .route("/loki/api/v1/push", post(loki_push))
        .route("/v1/logs", post(otlp_logs))
        .layer(DefaultBodyLimit::max(256 << 20))
        .with_state(tally);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.map_err(|e| format!("server failed: {e}"))
}

/// Refreshes the stats file every 100 ms and prints the total each second while it grows.
async fn publish(tally: Shared, stats: Option<PathBuf>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut written = (0, 0);
    let mut printed = 0;
    for round in 0u64.. {
        tick.tick().await;
        let (entries, lines, requests) = {
            let tally = tally.lock().unwrap_or_else(|e| e.into_inner());
            (tally.entries(), tally.lines, tally.requests)
        };
        if let Some(path) = &stats {
            if (lines, requests) != written {
                match report::write(path, &entries) {
                    Ok(()) => written = (lines, requests),
                    Err(e) => eprintln!("logs-sink: cannot write {}: {e}", path.display()),
                }
            }
        }
        if round % 10 == 0 && lines != printed {
            println!("logs-sink: {lines} lines (+{}/s)", lines - printed);
            printed = lines;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_are_read_after_seq() {
        assert_eq!(sequence("2025-01-01T00:00:00Z level=info seq=0000000042 msg=x"), Some(42));
        assert_eq!(sequence("seq=7"), Some(7));
        assert_eq!(sequence("no number here"), None);
        assert_eq!(sequence("seq=x"), None);
    }

    #[test]
    fn duplicates_and_unnumbered_lines_are_told_apart() {
        let mut tally = Tally::default();
        tally.add(["seq=1", "seq=2", "seq=1000"].into_iter());
        tally.add(["seq=2", "plain"].into_iter());
        assert_eq!((tally.lines, tally.distinct, tally.duplicates, tally.unnumbered), (5, 3, 1, 1));
        assert_eq!(tally.requests, 2);
        assert!(tally.first_ns > 0 && tally.last_ns >= tally.first_ns);
    }

    #[test]
    fn every_supported_encoding_decompresses() {
        use std::io::Write;
        let plain = b"hello, hello, hello".to_vec();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&plain).unwrap();
        let block = snap::raw::Encoder::new().compress_vec(&plain).unwrap();
        let mut framed = snap::write::FrameEncoder::new(Vec::new());
        framed.write_all(&plain).unwrap();
        let framed = framed.into_inner().unwrap();
        for (encoding, body) in
            [("identity", plain.clone()), ("gzip", gzip.finish().unwrap()), ("snappy", block), ("snappy", framed)]
        {
            assert_eq!(decompress(encoding, &Bytes::from(body)).unwrap(), plain, "{encoding}");
        }
        assert!(decompress("br", &Bytes::from_static(b"x")).is_err());
    }
}
