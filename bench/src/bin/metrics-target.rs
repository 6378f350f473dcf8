//! `metrics-target`: a scrape target serving one fixed exposition, as an exporter would.
//!
//! ```text
//! metrics-target --listen 127.0.0.1:19100 --body FILE [--format text|openmetrics] [--stats FILE]
//! ```
//! `GET /metrics` answers the body of `FILE` with the content type of the format (text 0.0.4 by
//! default), gzip-compressed when the scraper accepts gzip, as Go's client library does; the
//! compressed body is made once at start, so a scrape costs the target almost nothing.
//! `POST /quit` stops the target once the scrapes in progress are answered: later scrapes find
//! the port closed.
//!
//! The stats file (`name=value` lines, replaced whole after every scrape) holds `scrapes`,
//! `gzip_scrapes` and the wall-clock time in Unix nanoseconds of the latest scrape
//! (`last_ns`). It first appears, with zero scrapes, once the port is bound.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use periscope_bench::args::Args;
use periscope_bench::report;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

const USAGE: &str =
    "usage: metrics-target --listen ADDR --body FILE [--format text|openmetrics] [--stats FILE]";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPEN_METRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Default)]
struct Counts {
    scrapes: u64,
    gzip_scrapes: u64,
    last_ns: u128,
}

struct Target {
    plain: Bytes,
    gzip: Bytes,
    content_type: HeaderValue,
    counts: Mutex<Counts>,
    stats: Option<PathBuf>,
    quit: Notify,
}

impl Target {
    fn write_stats(&self, counts: &Counts) {
        if let Some(path) = &self.stats {
            let entries = [
                ("scrapes", counts.scrapes.to_string()),
                ("gzip_scrapes", counts.gzip_scrapes.to_string()),
                ("last_ns", counts.last_ns.to_string()),
            ];
            if let Err(e) = report::write(path, &entries) {
                eprintln!("metrics-target: cannot write {}: {e}", path.display());
            }
        }
    }
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            coding
                .split(';')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("gzip"))
        })
}

async fn metrics(State(target): State<Arc<Target>>, headers: HeaderMap) -> Response {
    let gzip = accepts_gzip(&headers);
    {
        let mut counts = target.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.scrapes += 1;
        counts.gzip_scrapes += u64::from(gzip);
        counts.last_ns = report::unix_nanos();
        target.write_stats(&counts);
    }
    let mut response_headers = HeaderMap::new();
    response_headers.insert(header::CONTENT_TYPE, target.content_type.clone());
    if gzip {
        response_headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        (response_headers, target.gzip.clone()).into_response()
    } else {
        (response_headers, target.plain.clone()).into_response()
    }
}

async fn quit(State(target): State<Arc<Target>>) -> &'static str {
    target.quit.notify_one();
    "stopping\n"
}

fn main() {
    if let Err(message) = run() {
        eprintln!("metrics-target: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = Args::parse(
        std::env::args().skip(1),
        &["listen", "body", "format", "stats"],
    )
    .map_err(|e| format!("{e}\n{USAGE}"))?;
    let listen: SocketAddr = args
        .text("listen")
        .ok_or(USAGE)?
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    let path = args.text("body").ok_or(USAGE)?;
    let body = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let content_type = match args.text("format").unwrap_or("text") {
        "text" => TEXT,
        "openmetrics" => OPEN_METRICS,
        other => return Err(format!("--format {other:?}: expected text or openmetrics")),
    };
    let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::default());
    encoder
        .write_all(&body)
        .and_then(|()| encoder.flush())
        .map_err(|e| format!("gzip: {e}"))?;
    let gzip = encoder.finish().map_err(|e| format!("gzip: {e}"))?;
    println!(
        "serving {} bytes ({} gzipped) on http://{listen}/metrics",
        body.len(),
        gzip.len()
    );
    let target = Arc::new(Target {
        plain: Bytes::from(body),
        gzip: Bytes::from(gzip),
        content_type: HeaderValue::from_static(content_type),
        counts: Mutex::new(Counts::default()),
        stats: args.text("stats").map(PathBuf::from),
        quit: Notify::new(),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        target.write_stats(&Counts::default());
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/quit", post(quit))
            .with_state(target.clone());
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { target.quit.notified().await })
            .await
            .map_err(|e| format!("serve: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_recognised_among_other_codings() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity, GZIP;q=0.5"),
        );
        assert!(accepts_gzip(&headers));
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, deflate"),
        );
        assert!(!accepts_gzip(&headers));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
