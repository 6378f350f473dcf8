//! Logs end to end: a stand-in for Loki's push API, and an agent process that tests can kill
//! with SIGKILL and start again on the same data directory.
//!
//! [`Loki`] serves `POST /loki/api/v1/push` on a loopback port. It decodes what the agent sends
//! with its own copy of Loki's `pkg/push/push.proto` (snappy block-compressed protobuf, or
//! Loki's JSON push format) and enforces the rules Loki's distributor applies with its default
//! limits: a known Content-Type, at least one label per stream, labels that parse as a
//! `{name="value", ...}` selector with valid and unique names, entries of a stream in
//! non-decreasing time order within a request, lines within `max_line_size`, timestamps
//! neither older than a week nor more than ten minutes ahead. A request that breaks a rule is
//! answered 400 with Loki-like words and recorded as a problem, which fails the test that
//! reads the stand-in. Otherwise it answers from a script (accept, 429/503 with Retry-After,
//! 400) and records every request; it can also be stopped and started again on the same port
//! to play an outage.
//!
//! [`LogAgent`] exists because the crash tests need what [`crate::Agent`] does not give: the
//! process id (to send SIGKILL and to look at `/proc/<pid>/fd`) and restarts on one directory.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::{header, HeaderMap, StatusCode};
use prost::Message as _;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::prometheus::Metrics;
use crate::{free_port, periscope_bin, DEADLINE, POLL_INTERVAL};

/// The push endpoint's path.
pub const PUSH_PATH: &str = "/loki/api/v1/push";

/// Loki's default limits (`limits_config`), as its distributor enforces them.
pub mod limits {
    use std::time::Duration;

    /// `max_line_size: 256KB` (Loki's sizes are binary: 256 × 1024).
    pub const MAX_LINE_SIZE: usize = 256 * 1024;
    /// `max_label_names_per_series`.
    pub const MAX_LABEL_NAMES: usize = 15;
    /// `max_label_name_length`.
    pub const MAX_LABEL_NAME_LENGTH: usize = 1024;
    /// `max_label_value_length`.
    pub const MAX_LABEL_VALUE_LENGTH: usize = 2048;
    /// `reject_old_samples_max_age: 1w`.
    pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
    /// `creation_grace_period: 10m`.
    pub const CREATION_GRACE: Duration = Duration::from_secs(600);
}

/// Largest request body the stand-in reads; far above the agent's batches.
const MAX_REQUEST: usize = 64 << 20;

/// Loki's push messages, written from the field numbers of Loki's `pkg/push/push.proto` and
/// `google/protobuf/timestamp.proto`.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        pub streams: Vec<StreamAdapter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StreamAdapter {
        #[prost(string, tag = "1")]
        pub labels: String,
        #[prost(message, repeated, tag = "2")]
        pub entries: Vec<EntryAdapter>,
        #[prost(uint64, tag = "3")]
        pub hash: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EntryAdapter {
        #[prost(message, optional, tag = "1")]
        pub timestamp: Option<Timestamp>,
        #[prost(string, tag = "2")]
        pub line: String,
        #[prost(message, repeated, tag = "3")]
        pub structured_metadata: Vec<LabelPairAdapter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LabelPairAdapter {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }
}

// ---------------------------------------------------------------------------------------
// What arrived.
// ---------------------------------------------------------------------------------------

/// A stream's labels, by name.
pub type Labels = BTreeMap<String, String>;

/// One log entry as Loki would store it, with the labels of its stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub labels: Arc<Labels>,
    /// Unix nanoseconds.
    pub time: i128,
    pub line: String,
    pub metadata: BTreeMap<String, String>,
}

impl Entry {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }

    pub fn meta(&self, name: &str) -> Option<&str> {
        self.metadata.get(name).map(String::as_str)
    }
}

/// The wire format of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/x-protobuf`, snappy block-compressed.
    Protobuf,
    /// `application/json`.
    Json,
}

/// How the stand-in answers one push.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 204 No Content, as Loki answers a stored push.
    Accept,
    /// This status, a plain-text body holding `message`, and `Retry-After: <seconds>` when
    /// given.
    Status { status: u16, retry_after: Option<u32>, message: String },
    /// No answer until [`Loki::release`] says which, as a Loki stuck on one request. The push
    /// is recorded as stalled meanwhile and with the released answer afterwards (so a
    /// condition that looks only at new pushes does not see it accepted).
    Stall,
}

impl Reply {
    pub fn status(status: u16, retry_after: Option<u32>, message: &str) -> Reply {
        Reply::Status { status, retry_after, message: message.to_owned() }
    }

    /// What Loki answers while its ingesters are unavailable.
    pub fn unavailable() -> Reply {
        Reply::status(503, None, "at least 1 live replicas required, could only find 0")
    }
}

/// One valid push request as the stand-in saw it, and what it answered.
#[derive(Debug, Clone)]
pub struct Push {
    pub headers: HeaderMap,
    pub encoding: Encoding,
    /// The labels of each stream as sent (selector text for protobuf, or rebuilt from JSON).
    pub selectors: Vec<String>,
    pub entries: Vec<Entry>,
    pub reply: Reply,
    /// When the stand-in answered.
    pub at: Instant,
}

impl Push {
    pub fn accepted(&self) -> bool {
        self.reply == Reply::Accept
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `X-Scope-OrgID` header: Loki's tenant.
    pub fn tenant(&self) -> Option<&str> {
        self.header("x-scope-orgid")
    }
}

/// Everything the stand-in recorded.
#[derive(Default)]
pub struct Record {
    pub pushes: Vec<Push>,
    /// Requests Loki would have refused: what was wrong with each.
    pub problems: Vec<String>,
    /// Entries of accepted pushes, duplicates included.
    pub accepted_entries: usize,
}

/// The answers to come: the queued ones first, then `then` for every request.
struct Script {
    next: VecDeque<Reply>,
    then: Reply,
}

struct Shared {
    script: Mutex<Script>,
    record: Mutex<Record>,
    /// Bumped on every request, valid or not, so waiters look again.
    changes: watch::Sender<u64>,
    /// The answer to stalled pushes, once released.
    released: watch::Sender<Option<Reply>>,
}

impl Shared {
    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A server of the stand-in: stopped by the sender, finished when its task ends.
struct Serving {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A running stand-in for Loki. The server stops when this is dropped.
pub struct Loki {
    addr: SocketAddr,
    shared: Arc<Shared>,
    serving: Mutex<Option<Serving>>,
}

impl Loki {
    /// A stand-in on a free loopback port that accepts every valid push.
    pub async fn start() -> Loki {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("cannot bind the Loki stand-in");
        let addr = listener.local_addr().expect("no local address");
        let shared = Arc::new(Shared {
            script: Mutex::new(Script { next: VecDeque::new(), then: Reply::Accept }),
            record: Mutex::new(Record::default()),
            changes: watch::Sender::new(0),
            released: watch::Sender::new(None),
        });
        let loki = Loki { addr, shared, serving: Mutex::new(None) };
        loki.serve(listener);
        loki
    }

    fn serve(&self, listener: TcpListener) {
        let router = Router::new()
            .route(PUSH_PATH, post(push))
            .layer(DefaultBodyLimit::max(MAX_REQUEST))
            .with_state(self.shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = served.await {
                eprintln!("the Loki stand-in stopped: {e}");
            }
        });
        *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(Serving { stop, task });
    }

    /// Closes the port and every connection, as a Loki that went away; pushes then fail to
    /// connect until [`Loki::resume`].
    pub async fn halt(&self) {
        let serving = self.serving.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(Serving { stop, mut task }) = serving else { return };
        let _ = stop.send(());
        // Graceful shutdown closes idle keep-alive connections at once and the others after
        // their answer; a client holding one open for longer is cut off.
        if tokio::time::timeout(Duration::from_secs(10), &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens on the same port again after [`Loki::halt`].
    pub async fn resume(&self) {
        let started = Instant::now();
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if started.elapsed() < DEADLINE => {
                    eprintln!("cannot listen on {} again yet: {e}", self.addr);
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// The push URL: `http://127.0.0.1:PORT/loki/api/v1/push`.
    pub fn url(&self) -> String {
        format!("http://{}{PUSH_PATH}", self.addr)
    }

    /// The body of `exporters.loki` pointing at this stand-in, with small, quick batches and
    /// quick retries; `overrides` replace or add keys (`("tenant_id", "team-a")`).
    pub fn exporter_config(&self, overrides: &[(&str, &str)]) -> String {
        let mut keys: Vec<(String, String)> = [
            ("url", self.url()),
            ("timeout", "5s".to_owned()),
            ("batch", "{ max_bytes: 64KiB, timeout: 100ms }".to_owned()),
            ("retry", "{ initial_interval: 50ms, max_interval: 500ms, max_elapsed_time: 300s }".to_owned()),
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

    /// Answers every push from now on with `reply` (after any queued answers).
    pub fn answer(&self, reply: Reply) {
        self.shared.script().then = reply;
    }

    /// Answers the next `n` pushes with `reply`, then as before.
    pub fn answer_next(&self, n: usize, reply: Reply) {
        self.shared.script().next.extend(std::iter::repeat_n(reply, n));
    }

    /// Answers the pushes stalled by [`Reply::Stall`] (and any stalled later) with `reply`.
    pub fn release(&self, reply: Reply) {
        assert_ne!(reply, Reply::Stall, "a stalled push is released with an answer");
        self.shared.released.send_replace(Some(reply));
    }

    /// Every valid push so far, in arrival order. Fails the test if the agent sent anything
    /// Loki would have refused.
    pub fn pushes(&self) -> Vec<Push> {
        let record = self.shared.record();
        assert_no_problems(&record);
        record.pushes.clone()
    }

    /// The entries of every accepted push, in arrival order, duplicates included.
    pub fn entries(&self) -> Vec<Entry> {
        let record = self.shared.record();
        assert_no_problems(&record);
        record.pushes.iter().filter(|p| p.accepted()).flat_map(|p| p.entries.iter().cloned()).collect()
    }

    /// Looks at the record as it is now (asserting the agent sent nothing Loki would refuse).
    pub fn inspect<R>(&self, look: impl FnOnce(&Record) -> R) -> R {
        let record = self.shared.record();
        assert_no_problems(&record);
        look(&record)
    }

    /// What was wrong with each request Loki would have refused.
    pub fn problems(&self) -> Vec<String> {
        self.shared.record().problems.clone()
    }

    /// Waits until `condition` holds for the record (looked at again after every request),
    /// failing the test after the suite's deadline with `what` and a summary of the record.
    /// The condition may keep state between calls to look only at new pushes.
    pub async fn wait_for(&self, what: &str, mut condition: impl FnMut(&Record) -> bool) {
        let mut changes = self.shared.changes.subscribe();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            {
                let record = self.shared.record();
                assert_no_problems(&record);
                if condition(&record) {
                    return;
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                let record = self.shared.record();
                let answers: Vec<String> = record
                    .pushes
                    .iter()
                    .rev()
                    .take(10)
                    .map(|p| format!("{} entries → {:?}", p.entries.len(), p.reply))
                    .collect();
                panic!(
                    "waited {DEADLINE:?} for {what}; the stand-in has {} pushes, {} accepted entries; last answers (newest first): {answers:#?}",
                    record.pushes.len(),
                    record.accepted_entries,
                );
            }
        }
    }

    /// Waits until accepted pushes hold at least `n` entries (duplicates count).
    pub async fn wait_for_entries(&self, n: usize) {
        self.wait_for(&format!("{n} accepted entries"), |record| record.accepted_entries >= n).await;
    }

    /// Waits until an accepted entry's line satisfies `matches`; returns that entry.
    pub async fn wait_for_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> Entry {
        let mut found = None;
        let mut looked_at = 0;
        self.wait_for(what, |record| {
            for push in &record.pushes[looked_at..] {
                if push.accepted() {
                    if let Some(entry) = push.entries.iter().find(|e| matches(&e.line)) {
                        found = Some(entry.clone());
                        return true;
                    }
                }
            }
            looked_at = record.pushes.len();
            false
        })
        .await;
        found.expect("the condition held without an entry")
    }

    /// Waits until at least `n` pushes were answered, whatever the answer.
    pub async fn wait_for_pushes(&self, n: usize) -> Vec<Push> {
        self.wait_for(&format!("{n} pushes"), |record| record.pushes.len() >= n).await;
        self.pushes()
    }
}

impl Drop for Loki {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.lock().unwrap_or_else(|p| p.into_inner()).take() {
            serving.task.abort();
        }
    }
}

fn assert_no_problems(record: &Record) {
    assert!(record.problems.is_empty(), "the agent sent pushes that Loki would refuse: {:#?}", record.problems);
}

async fn push(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let decoded = decode(&headers, &body).and_then(|(encoding, streams)| {
        let now = unix_nanos(SystemTime::now());
        let mut selectors = Vec::with_capacity(streams.len());
        let mut entries = Vec::new();
        for stream in streams {
            let labels = Arc::new(validate_stream(&stream, now)?);
            selectors.push(stream.selector);
            entries.extend(stream.entries.into_iter().map(|e| Entry {
                labels: labels.clone(),
                time: e.time,
                line: e.line,
                metadata: e.metadata,
            }));
        }
        Ok(Push { headers, encoding, selectors, entries, reply: Reply::Accept, at: Instant::now() })
    });
    let mut push = match decoded {
        Ok(push) => push,
        Err(problem) => {
            shared.record().problems.push(problem.clone());
            shared.changes.send_modify(|n| *n += 1);
            return (StatusCode::BAD_REQUEST, problem).into_response();
        }
    };
    let reply = {
        let mut script = shared.script();
        let then = script.then.clone();
        script.next.pop_front().unwrap_or(then)
    };
    push.reply = reply.clone();
    push.at = Instant::now();
    let index = {
        let mut record = shared.record();
        if reply == Reply::Accept {
            record.accepted_entries += push.entries.len();
        }
        record.pushes.push(push);
        record.pushes.len() - 1
    };
    shared.changes.send_modify(|n| *n += 1);
    let reply = match reply {
        Reply::Stall => {
            let mut released = shared.released.subscribe();
            let reply = match released.wait_for(Option::is_some).await {
                Ok(reply) => reply.clone().unwrap_or(Reply::Accept),
                Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
            };
            {
                let mut record = shared.record();
                if reply == Reply::Accept {
                    record.accepted_entries += record.pushes[index].entries.len();
                }
                record.pushes[index].reply = reply.clone();
                record.pushes[index].at = Instant::now();
            }
            shared.changes.send_modify(|n| *n += 1);
            reply
        }
        reply => reply,
    };
    match reply {
        Reply::Accept => StatusCode::NO_CONTENT.into_response(),
        Reply::Status { status, retry_after, message } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response();
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
            }
            response
        }
        Reply::Stall => unreachable!("released answers are never Stall"),
    }
}

// ---------------------------------------------------------------------------------------
// Decoding and Loki's rules.
// ---------------------------------------------------------------------------------------

/// A stream as sent, before validation.
struct RawStream {
    selector: String,
    /// From JSON: the labels object. From protobuf: parsed from the selector.
    labels: Option<Labels>,
    entries: Vec<RawEntry>,
}

struct RawEntry {
    time: i128,
    line: String,
    metadata: BTreeMap<String, String>,
}

fn decode(headers: &HeaderMap, body: &[u8]) -> Result<(Encoding, Vec<RawStream>), String> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let inflated;
    let body = match headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => body,
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body).read_to_end(&mut out).map_err(|e| format!("bad gzip body: {e}"))?;
            inflated = out;
            &inflated[..]
        }
        Some(other) => return Err(format!("unsupported Content-Encoding {other:?}")),
    };
    match media_type.as_str() {
        "application/x-protobuf" => decode_protobuf(body).map(|s| (Encoding::Protobuf, s)),
        "application/json" => decode_json(body).map(|s| (Encoding::Json, s)),
        _ => Err(format!("unsupported Content-Type {content_type:?}")),
    }
}

fn decode_protobuf(body: &[u8]) -> Result<Vec<RawStream>, String> {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("the body is not snappy block-compressed: {e}"))?;
    let request = proto::PushRequest::decode(raw.as_slice()).map_err(|e| format!("not a PushRequest: {e}"))?;
    request
        .streams
        .into_iter()
        .map(|stream| {
            let entries = stream
                .entries
                .into_iter()
                .map(|entry| {
                    let timestamp = entry
                        .timestamp
                        .ok_or_else(|| format!("stream {}: an entry without a timestamp", stream.labels))?;
                    if !(0..1_000_000_000).contains(&timestamp.nanos) {
                        return Err(format!(
                            "stream {}: timestamp nanos {} out of range",
                            stream.labels, timestamp.nanos
                        ));
                    }
                    Ok(RawEntry {
                        time: i128::from(timestamp.seconds) * 1_000_000_000 + i128::from(timestamp.nanos),
                        line: entry.line,
                        metadata: entry.structured_metadata.into_iter().map(|p| (p.name, p.value)).collect(),
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(RawStream { selector: stream.labels, labels: None, entries })
        })
        .collect()
}

/// `{"streams": [{"stream": {...}, "values": [["<unix ns>", "<line>", {<metadata>}?], ...]}]}`
fn decode_json(body: &[u8]) -> Result<Vec<RawStream>, String> {
    use serde_json::Value;
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let streams = value.get("streams").and_then(Value::as_array).ok_or("no \"streams\" array")?;
    streams
        .iter()
        .map(|stream| {
            let object =
                stream.get("stream").and_then(Value::as_object).ok_or("a stream without a \"stream\" object")?;
            let mut labels = Labels::new();
            for (name, value) in object {
                let value = value.as_str().ok_or_else(|| format!("label {name} is not a string"))?;
                labels.insert(name.clone(), value.to_owned());
            }
            let selector = format!(
                "{{{}}}",
                labels.iter().map(|(k, v)| format!("{k}={}", Value::from(v.as_str()))).collect::<Vec<_>>().join(", ")
            );
            let values = stream.get("values").and_then(Value::as_array).ok_or("a stream without \"values\"")?;
            let entries = values
                .iter()
                .map(|value| {
                    let parts = value.as_array().ok_or("a value that is not an array")?;
                    if !(2..=3).contains(&parts.len()) {
                        return Err(format!("a value of {} elements", parts.len()));
                    }
                    let time = parts[0]
                        .as_str()
                        .and_then(|t| t.parse::<i128>().ok())
                        .ok_or_else(|| format!("timestamp {} is not a string of nanoseconds", parts[0]))?;
                    let line = parts[1].as_str().ok_or("a line that is not a string")?.to_owned();
                    let mut metadata = BTreeMap::new();
                    if let Some(meta) = parts.get(2) {
                        let meta = meta.as_object().ok_or("structured metadata that is not an object")?;
                        for (name, value) in meta {
                            let value = value.as_str().ok_or_else(|| format!("metadata {name} is not a string"))?;
                            metadata.insert(name.clone(), value.to_owned());
                        }
                    }
                    Ok(RawEntry { time, line, metadata })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(RawStream { selector, labels: Some(labels), entries })
        })
        .collect()
}

/// Loki's checks of one stream with its default limits; the stream's labels when it passes.
fn validate_stream(stream: &RawStream, now: i128) -> Result<Labels, String> {
    let selector = &stream.selector;
    let labels = match &stream.labels {
        Some(labels) => {
            for name in labels.keys() {
                if !valid_label_name(name) {
                    return Err(format!("invalid label name {name:?} in {selector}"));
                }
            }
            labels.clone()
        }
        None => parse_selector(selector).map_err(|e| format!("error parsing labels {selector:?}: {e}"))?,
    };
    if labels.is_empty() {
        return Err("error at least one label pair is required per stream".to_owned());
    }
    if labels.len() > limits::MAX_LABEL_NAMES {
        return Err(format!("stream {selector} has {} label names; limit: {}", labels.len(), limits::MAX_LABEL_NAMES));
    }
    for (name, value) in &labels {
        if name.len() > limits::MAX_LABEL_NAME_LENGTH {
            return Err(format!("label name too long: {name:?}"));
        }
        if value.chars().count() > limits::MAX_LABEL_VALUE_LENGTH {
            return Err(format!("label value too long for {name} in {selector}"));
        }
    }
    let oldest = now - limits::MAX_AGE.as_nanos() as i128;
    let newest = now + limits::CREATION_GRACE.as_nanos() as i128;
    let mut previous = i128::MIN;
    for entry in &stream.entries {
        if entry.time < previous {
            return Err(format!(
                "entry out of order in stream {selector}: timestamp {} after {previous} within one push",
                entry.time
            ));
        }
        previous = entry.time;
        if entry.time < oldest {
            return Err(format!("entry for stream {selector} has timestamp too old: {}", entry.time));
        }
        if entry.time > newest {
            return Err(format!("entry for stream {selector} has timestamp too new: {}", entry.time));
        }
        if entry.line.len() > limits::MAX_LINE_SIZE {
            return Err(format!(
                "max entry size '{}' bytes exceeded for stream {selector} while adding an entry with length '{}' bytes",
                limits::MAX_LINE_SIZE,
                entry.line.len()
            ));
        }
    }
    Ok(labels)
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses a stream selector of equality matchers, `{name="value", ...}`, as Loki reads the
/// labels of a pushed stream: names must be valid and unique, values are Go string literals
/// (double-quoted with escapes, or back-quoted raw).
pub fn parse_selector(selector: &str) -> Result<Labels, String> {
    let mut chars = selector.trim().chars().peekable();
    if chars.next() != Some('{') {
        return Err("a selector starts with '{'".to_owned());
    }
    let mut labels = Labels::new();
    loop {
        skip_spaces(&mut chars);
        match chars.peek() {
            Some('}') => {
                chars.next();
                break;
            }
            Some(_) => {}
            None => return Err("unterminated selector".to_owned()),
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if !valid_label_name(&name) {
            return Err(format!("invalid label name {name:?}"));
        }
        skip_spaces(&mut chars);
        if chars.next() != Some('=') {
            return Err(format!("label {name}: expected '='"));
        }
        if matches!(chars.peek(), Some('~' | '=')) {
            return Err(format!("label {name}: only '=' matchers name a stream"));
        }
        skip_spaces(&mut chars);
        let value = match chars.next() {
            Some('"') => quoted(&mut chars)?,
            Some('`') => {
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some('`') => break value,
                        Some(c) => value.push(c),
                        None => return Err("unterminated raw string".to_owned()),
                    }
                }
            }
            _ => return Err(format!("label {name}: expected a quoted value")),
        };
        if labels.insert(name.clone(), value).is_some() {
            return Err(format!("duplicate label name {name:?}"));
        }
        skip_spaces(&mut chars);
        match chars.next() {
            Some(',') => {}
            Some('}') => break,
            other => return Err(format!("expected ',' or '}}' after label {name}, found {other:?}")),
        }
    }
    if chars.any(|c| !c.is_whitespace()) {
        return Err("text after the selector".to_owned());
    }
    Ok(labels)
}

fn skip_spaces(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while chars.peek().is_some_and(|c| c.is_whitespace()) {
        chars.next();
    }
}

/// The rest of a double-quoted Go string literal, its opening quote already read.
fn quoted(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<String, String> {
    let mut value = String::new();
    let hex = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>, digits: usize| -> Result<u32, String> {
        let text: String = chars.take(digits).collect();
        u32::from_str_radix(&text, 16).map_err(|_| format!("bad escape digits {text:?}"))
    };
    loop {
        match chars.next() {
            None => return Err("unterminated string".to_owned()),
            Some('"') => return Ok(value),
            Some('\n') => return Err("newline in string".to_owned()),
            Some('\\') => {
                let c = match chars.next() {
                    Some('a') => '\u{7}',
                    Some('b') => '\u{8}',
                    Some('f') => '\u{c}',
                    Some('n') => '\n',
                    Some('r') => '\r',
                    Some('t') => '\t',
                    Some('v') => '\u{b}',
                    Some('\\') => '\\',
                    Some('"') => '"',
                    Some('x') => char::from_u32(hex(chars, 2)?).ok_or("bad \\x escape")?,
                    Some('u') => char::from_u32(hex(chars, 4)?).ok_or("bad \\u escape")?,
                    Some('U') => char::from_u32(hex(chars, 8)?).ok_or("bad \\U escape")?,
                    other => return Err(format!("unknown escape \\{other:?}")),
                };
                value.push(c);
            }
            Some(c) => value.push(c),
        }
    }
}

/// A time as Unix nanoseconds.
pub fn unix_nanos(time: SystemTime) -> i128 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

// ---------------------------------------------------------------------------------------
// The agent, killable and restartable on one directory.
// ---------------------------------------------------------------------------------------

/// Environment variables that change the agent's behaviour and must not leak in from the
/// shell that runs the suite.
const SCRUBBED_ENV: [&str; 5] =
    ["KUBERNETES_SERVICE_HOST", "PERISCOPE_CONFIG", "RUST_LOG", "NODE_NAME", "PERISCOPE_TOKEN"];

/// The node name every [`LogAgent`] runs with; it reaches Loki as the `node` label.
pub const NODE: &str = "test-node";

/// An agent process on a directory of its own that outlives the process: config, `data/`
/// (checkpoints), `logs/` (files for the tests to write) and the stderr of every run. It can
/// be stopped with SIGTERM or killed with SIGKILL and started again on the same directory.
/// The process is killed on drop; when the test is failing, its stderr is printed then.
pub struct LogAgent {
    dir: TempDir,
    admin: SocketAddr,
    child: Option<Child>,
    runs: usize,
    client: reqwest::Client,
}

impl Default for LogAgent {
    fn default() -> Self {
        LogAgent::new()
    }
}

impl LogAgent {
    /// A directory with an empty `logs/`, and a free admin port; no process yet.
    pub fn new() -> LogAgent {
        let dir =
            tempfile::Builder::new().prefix("periscope-logs-").tempdir().expect("cannot create a temporary directory");
        std::fs::create_dir(dir.path().join("logs")).expect("cannot create the logs directory");
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder().build().expect("cannot build an HTTP client");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        LogAgent { dir, admin, child: None, runs: 0, client }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where tests write the files the agent tails.
    pub fn logs(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// The agent's `data_dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A config tailing `groups` (each a YAML flow mapping, one entry of `sources.logs`) into
    /// Loki with `loki` (the body of `exporters.loki`, one `key: value` per line). The OTLP
    /// receivers listen on `otlp` (gRPC, HTTP) ports when given and are off otherwise.
    pub fn config(&self, groups: &[String], loki: &str, otlp: Option<(u16, u16)>) -> String {
        let mut yaml = String::new();
        yaml.push_str(&format!("node_name: {NODE}\n"));
        yaml.push_str(&format!("data_dir: {}\n", self.data_dir().display()));
        yaml.push_str("shutdown_timeout: 10s\n");
        yaml.push_str(&format!("server: {{ listen: {} }}\n", self.admin));
        yaml.push_str("log: { format: text }\n");
        yaml.push_str("sources:\n");
        match otlp {
            Some((grpc, http)) => {
                yaml.push_str(&format!("  otlp: {{ grpc: 127.0.0.1:{grpc}, http: 127.0.0.1:{http} }}\n"))
            }
            None => yaml.push_str("  otlp: { grpc: null, http: null }\n"),
        }
        yaml.push_str("  host_metrics: { enabled: false }\n");
        if groups.is_empty() {
            yaml.push_str("  logs: []\n");
        } else {
            yaml.push_str("  logs:\n");
            for group in groups {
                yaml.push_str(&format!("    - {group}\n"));
            }
        }
        yaml.push_str("paths: { enabled: false }\n");
        yaml.push_str("exporters:\n  loki:\n");
        for line in loki.lines().filter(|line| !line.trim().is_empty()) {
            yaml.push_str(&format!("    {}\n", line.trim()));
        }
        yaml
    }

    /// Writes `yaml` as the config, starts the agent on it and waits until `/readyz` answers
    /// 200. The previous process must have ended ([`LogAgent::kill`], [`LogAgent::stop`]).
    pub async fn start(&mut self, yaml: &str) {
        assert!(self.child.is_none(), "the agent is already running");
        let config = self.dir.path().join("periscope.yaml");
        std::fs::write(&config, yaml).expect("cannot write the config file");
        self.runs += 1;
        let stderr_path = self.dir.path().join("stderr.log");
        let mut stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .expect("cannot open the stderr file");
        use std::io::Write as _;
        let _ = writeln!(stderr, "==== run {} ====", self.runs);
        let mut command = std::process::Command::new(periscope_bin());
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for name in SCRUBBED_ENV {
            command.env_remove(name);
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", periscope_bin().display()));
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let url = self.url("/readyz");
        let started = Instant::now();
        let mut last;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("cannot poll the agent process") {
                panic!("the agent exited with {status} before it was ready");
            }
            match self.client.get(&url).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::OK => return,
                Ok(response) => {
                    let status = response.status();
                    last = format!("{status}: {}", response.text().await.unwrap_or_default());
                }
                Err(e) => last = e.to_string(),
            }
            if started.elapsed() > DEADLINE {
                panic!("the agent was not ready within {DEADLINE:?} (last /readyz: {last})");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the agent is not running")
    }

    /// The running agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is not running").id()
    }

    /// SIGKILL, as the OOM killer or a node crash would end it; returns once it is gone.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("the agent is not running");
        // `Child::kill` sends SIGKILL on Unix.
        child.kill().expect("cannot send SIGKILL to the agent");
        let status = child.wait().expect("cannot wait for the agent");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the agent ended otherwise than by SIGKILL: {status}"
        );
    }

    /// SIGTERM, then waits for the process to exit.
    pub async fn stop(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid out of range");
        // SAFETY: kill(2) with a pid this harness spawned and has not reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "cannot send SIGTERM to the agent: {}", std::io::Error::last_os_error());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("cannot poll the agent process") {
                self.child = None;
                return status;
            }
            if started.elapsed() > DEADLINE {
                panic!("the agent did not exit within {DEADLINE:?} of SIGTERM");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Everything the agent wrote to stderr, over all its runs.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The agent's self-metrics, parsed.
    pub async fn metrics(&self) -> Metrics {
        let url = self.url("/metrics");
        let response = self.client.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, reqwest::StatusCode::OK, "GET /metrics answered {status}: {body}");
        Metrics::parse(&body)
    }

    /// Polls `/metrics` until the sum of the series of `name` matching `labels` satisfies
    /// `condition` (at least one such series must exist), and returns those metrics.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        condition: impl Fn(f64) -> bool,
    ) -> Metrics {
        let started = Instant::now();
        loop {
            let metrics = self.metrics().await;
            let value = metrics.lookup(name, labels);
            if value.is_some_and(&condition) {
                return metrics;
            }
            if started.elapsed() > DEADLINE {
                panic!(
                    "{name}{labels:?} never met the condition within {DEADLINE:?} (last value {value:?}); metrics:\n{}",
                    metrics.text()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Polls the agent's stderr until it holds `text`.
    pub async fn wait_for_stderr(&self, text: &str) -> String {
        let started = Instant::now();
        loop {
            let stderr = self.stderr();
            if stderr.contains(text) {
                return stderr;
            }
            if started.elapsed() > DEADLINE {
                panic!("the agent's stderr did not mention {text:?} within {DEADLINE:?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The files the running agent holds open (the targets of `/proc/<pid>/fd/*`); a deleted
    /// file shows as `<path> (deleted)`.
    pub fn open_files(&self) -> Vec<String> {
        let dir = PathBuf::from(format!("/proc/{}/fd", self.pid()));
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        entries
            .flatten()
            .filter_map(|entry| std::fs::read_link(entry.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for LogAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- periscope stderr ({}) ----\n{}", self.dir.path().display(), self.stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_as_loki_reads_them() {
        let labels = parse_selector(r#"{job="pods", pod="web-1", msg="say \"hi\"\n\\", raw=`a\b`}"#).unwrap();
        assert_eq!(labels["job"], "pods");
        assert_eq!(labels["msg"], "say \"hi\"\n\\");
        assert_eq!(labels["raw"], "a\\b");
        assert_eq!(parse_selector("{}").unwrap().len(), 0);
        for bad in [
            r#"job="x""#,
            r#"{1job="x"}"#,
            r#"{job.name="x"}"#,
            r#"{job=~"x"}"#,
            r#"{job="x", job="y"}"#,
            r#"{job="x"} extra"#,
            r#"{job="x"#,
            r#"{job="\q"}"#,
        ] {
            assert!(parse_selector(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn streams_breaking_loki_rules_are_refused() {
        let now = unix_nanos(SystemTime::now());
        let entry = |time: i128, line: &str| RawEntry { time, line: line.to_owned(), metadata: BTreeMap::new() };
        let stream = |selector: &str, entries| RawStream { selector: selector.to_owned(), labels: None, entries };
        assert!(validate_stream(&stream(r#"{a="b"}"#, vec![entry(now, "x"), entry(now, "y")]), now).is_ok());
        let out_of_order = validate_stream(&stream(r#"{a="b"}"#, vec![entry(now, "x"), entry(now - 1, "y")]), now);
        assert!(out_of_order.unwrap_err().contains("out of order"));
        assert!(validate_stream(&stream("{}", vec![entry(now, "x")]), now).is_err());
        let week = limits::MAX_AGE.as_nanos() as i128;
        assert!(validate_stream(&stream(r#"{a="b"}"#, vec![entry(now - week - 1_000_000_000, "x")]), now).is_err());
        let long = "x".repeat(limits::MAX_LINE_SIZE + 1);
        assert!(validate_stream(&stream(r#"{a="b"}"#, vec![entry(now, &long)]), now).is_err());
    }
}
