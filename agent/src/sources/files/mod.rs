//! File tailing (`sources.logs`): follow the files that match each group's globs and send
//! their lines to the logs pipeline, losing none.
//!
//! ```text
//! scan (globs, every second) ──▶ tailed files ──read──▶ lines ──▶ entries ──▶ logs pipeline
//!        ▲                           │ offsets                                  │
//!        └── checkpoints (data_dir) ◀┴──────── acknowledgements from Loki ◀─────┘
//! ```
//!
//! - A file is known by device and inode, checked against a checksum of its first bytes, so a
//!   renamed file is followed under its new name and a re-used inode is a new file.
//! - A checkpoint moves only when every entry before it was acknowledged by the exporter. An
//!   entry the exporter let go of without delivering (shutdown, retries exhausted) makes the
//!   source read its file again from the checkpoint. After a crash, reading resumes at the
//!   checkpoint: at most what was unacknowledged is sent again.
//! - Rotation: when a file's path points to another file (rename and create) or disappears,
//!   the old file is read to its end, then released. A file that shrank below the read offset
//!   (copytruncate) is read again from its start.
//! - Reading waits while the pipeline is full, so it runs at most a queue ahead of the
//!   exporter.
//! - Files present at start-up begin at `start_at`; files that appear later are read from
//!   their beginning (they are usually the new file of a rotation). Gzip-compressed files are
//!   skipped.

pub mod checkpoint;
pub mod parse;
pub mod tailer;

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use regex::Regex;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormatKind, LogSourceConfig, StartAt};
use crate::exporters::loki::RESOURCE_LABELS_HINT;
use crate::pipeline::ack::{self, AckReceiver, Acker};
use crate::pipeline::{Pipeline, SendError};
use crate::signal::Logs;
use crate::telemetry::FileMetrics;
use checkpoint::{Checkpoint, Checkpoints, FileKey, Head};
use tailer::{Entry, Joiner, Line, LineReader};

pub const KEY: &str = "sources.logs";

/// How often the globs are expanded again.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How long an idle source sleeps before looking at its files again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Entries per request to the pipeline.
const MAX_ENTRIES_PER_SEND: usize = 1000;
/// Longest line kept; the rest is cut and counted.
pub const MAX_LINE_BYTES: usize = 256 * 1024;
/// Bytes of log lines sent and not yet acknowledged, across all files, beyond which reading
/// pauses: what a crash can make the source send twice, and how far it reads ahead of a
/// stuck exporter.
pub const MAX_UNACKED_BYTES: u64 = 4 * 1024 * 1024;
/// How long shutdown waits for the exporter to acknowledge what was sent.
const ACK_WAIT_AT_SHUTDOWN: Duration = Duration::from_secs(30);

/// One configured group of files, ready to match paths.
struct Group {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
    format: LogFormatKind,
    start_at: StartAt,
    start_pattern: Option<Regex>,
    max_lines: usize,
    timeout: Duration,
    labels: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{key}: invalid glob {pattern:?}: {message}")]
    Glob { key: String, pattern: String, message: String },
    #[error("{key}: invalid regex: {message}")]
    Regex { key: String, message: String },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
}

/// Everything waiting for acknowledgement from one file, in order.
struct InFlight {
    token: u64,
    end: u64,
    done: bool,
}

/// A file being followed.
struct Tailed {
    key: FileKey,
    head: Head,
    path: PathBuf,
    group: usize,
    file: Option<File>,
    reader: LineReader,
    joiner: Joiner,
    /// Everything before this offset is delivered.
    acked: u64,
    in_flight: VecDeque<InFlight>,
    /// Its path now names another file, or nothing: read to the end, then release.
    rotated: bool,
    /// A rotated file read to its end: kept open until what was sent from it is acknowledged,
    /// so that it can be read again if that fails.
    done_reading: bool,
    resource: Arc<Resource>,
    path_attribute: KeyValue,
}

impl Tailed {
    /// The offset from which nothing is delivered yet and nothing is held.
    fn delivered_upto(&self) -> u64 {
        self.acked
    }
}

pub struct FileSource {
    groups: Vec<Group>,
    checkpoints: Checkpoints,
    files: HashMap<FileKey, Tailed>,
    tokens: HashMap<u64, FileKey>,
    next_token: u64,
    acker: Acker,
    acks: AckReceiver,
    metrics: FileMetrics,
    first_scan: bool,
}

fn patterns(key: &str, list: &[String]) -> Result<Vec<glob::Pattern>, BuildError> {
    list.iter()
        .map(|p| {
            glob::Pattern::new(p).map_err(|e| BuildError::Glob { key: key.to_owned(), pattern: p.clone(), message: e.to_string() })
        })
        .collect()
}

impl FileSource {
    pub fn build(configs: &[LogSourceConfig], data_dir: &Path, metrics: FileMetrics) -> Result<FileSource, BuildError> {
        let mut groups = Vec::new();
        for (index, config) in configs.iter().enumerate() {
            let key = format!("{KEY}[{index}]");
            let start_pattern = match &config.multiline.start_pattern {
                Some(pattern) => Some(Regex::new(pattern).map_err(|e| BuildError::Regex {
                    key: format!("{key}.multiline.start_pattern"),
                    message: e.to_string(),
                })?),
                None => None,
            };
            groups.push(Group {
                include: patterns(&format!("{key}.include"), &config.include)?,
                exclude: patterns(&format!("{key}.exclude"), &config.exclude)?,
                format: config.format,
                start_at: config.start_at,
                start_pattern,
                max_lines: config.multiline.max_lines,
                timeout: config.multiline.timeout,
                labels: config.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            });
        }
        let checkpoints = Checkpoints::load(&data_dir.join("checkpoints"))?;
        let (acker, acks) = ack::channel();
        Ok(FileSource {
            groups,
            checkpoints,
            files: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 0,
            acker,
            acks,
            metrics,
            first_scan: true,
        })
    }

    /// Runs until `stop` fires, then waits (boundedly) for what was sent to be acknowledged
    /// and saves the checkpoints. Blocking: run it on a thread of its own.
    pub fn run(mut self, pipeline: Arc<Pipeline<Logs>>, runtime: tokio::runtime::Handle, stop: CancellationToken) {
        let mut last_scan: Option<Instant> = None;
        let mut pipeline = Some(pipeline);
        while !stop.is_cancelled() {
            if last_scan.is_none_or(|at| at.elapsed() >= SCAN_INTERVAL) {
                self.scan();
                last_scan = Some(Instant::now());
            }
            let mut busy = false;
            let keys: Vec<FileKey> = self.files.keys().copied().collect();
            for key in keys {
                if stop.is_cancelled() || self.read_ahead() >= MAX_UNACKED_BYTES {
                    break;
                }
                if let Some(p) = &pipeline {
                    match self.pump(key, p, &runtime, &stop) {
                        Ok(read) => busy |= read,
                        Err(SendError::Closed) => {
                            pipeline = None;
                            break;
                        }
                        Err(SendError::Full { .. }) => {}
                    }
                }
            }
            self.take_acks();
            self.release_finished();
            self.save();
            if !busy {
                // Idle, or waiting for the exporter: wake at the next acknowledgement (which may
                // let reading go on) or after the poll interval (files may have grown).
                if let Ok(Some(acked)) =
                    runtime.block_on(async { tokio::time::timeout(POLL_INTERVAL, self.acks.recv()).await })
                {
                    self.ack(acked);
                }
            }
        }
        // Let the exporters finish, then hear what they delivered.
        drop(pipeline);
        let deadline = Instant::now() + ACK_WAIT_AT_SHUTDOWN;
        while !self.tokens.is_empty() && Instant::now() < deadline {
            match runtime.block_on(async { tokio::time::timeout(Duration::from_millis(200), self.acks.recv()).await }) {
                Ok(Some(acked)) => self.ack(acked),
                Ok(None) => break,
                Err(_) => {}
            }
            self.take_acks();
        }
        // Acknowledgements already heard move the checkpoints too.
        self.take_acks();
        self.save();
    }

    /// Bytes read from all files beyond what is delivered: what a crash would make the source
    /// read (and send) again.
    fn read_ahead(&self) -> u64 {
        self.files.values().map(|t| t.reader.read_offset().saturating_sub(t.acked)).sum()
    }

    /// Expands every group's globs; follows new files and notices rotated ones.
    fn scan(&mut self) {
        let mut seen: HashMap<FileKey, PathBuf> = HashMap::new();
        for gi in 0..self.groups.len() {
            for path in self.matching(gi) {
                let Ok(meta) = std::fs::metadata(&path) else { continue };
                if !meta.is_file() {
                    continue;
                }
                let key = FileKey { dev: meta.dev(), ino: meta.ino() };
                if seen.contains_key(&key) {
                    continue;
                }
                seen.insert(key, path.clone());
                match self.files.get_mut(&key) {
                    Some(tailed) => {
                        if tailed.path != path {
                            tailed.path_attribute = string_kv("log.file.path", &path.to_string_lossy());
                            tailed.path = path;
                        }
                        tailed.rotated = false;
                    }
                    None => self.open(gi, key, path, meta.len()),
                }
            }
        }
        for tailed in self.files.values_mut() {
            if !seen.contains_key(&tailed.key) {
                tailed.rotated = true;
            }
        }
        self.first_scan = false;
        self.metrics.files.set(self.files.len() as i64);
    }

    fn matching(&self, gi: usize) -> Vec<PathBuf> {
        let group = &self.groups[gi];
        let mut paths = Vec::new();
        for include in &group.include {
            let Ok(found) = glob::glob(include.as_str()) else { continue };
            for path in found.flatten() {
                if group.exclude.iter().any(|e| e.matches_path(&path)) || is_compressed(&path) {
                    continue;
                }
                paths.push(path);
            }
        }
        paths
    }

    fn open(&mut self, gi: usize, key: FileKey, path: PathBuf, size: u64) {
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open log file");
                return;
            }
        };
        if size > 0 && is_gzip(&mut file) {
            return;
        }
        let head = match Head::read(&mut file, None) {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read log file");
                return;
            }
        };
        let known = self.checkpoints.get(key).cloned();
        let resumed = known.clone().filter(|c| {
            Head::read(&mut file, Some(c.head.len)).is_ok_and(|h| h == c.head) && c.offset <= size
        });
        let group = &self.groups[gi];
        let offset = match (&resumed, group.start_at) {
            (Some(c), _) => c.offset,
            // The inode has a checkpoint but other content: it was truncated or re-used while
            // the agent was away, so all of it is new.
            (None, _) if known.is_some() => 0,
            (None, StartAt::End) if self.first_scan => size,
            (None, _) => 0,
        };
        tracing::info!(path = %path.display(), offset, resumed = resumed.is_some(), "following log file");
        let resource = Arc::new(resource_for(&path, &group.labels));
        let tailed = Tailed {
            key,
            head,
            path_attribute: string_kv("log.file.path", &path.to_string_lossy()),
            path,
            group: gi,
            file: Some(file),
            reader: LineReader::new(offset, MAX_LINE_BYTES),
            joiner: Joiner::new(group.format, group.start_pattern.clone(), group.max_lines, group.timeout, MAX_LINE_BYTES),
            acked: offset,
            in_flight: VecDeque::new(),
            rotated: false,
            done_reading: false,
            resource,
        };
        self.checkpoints.set(Checkpoint { key, head: tailed.head, offset, path: tailed.path.clone() });
        self.files.insert(key, tailed);
    }

    /// Reads what one file has and sends it. Returns whether anything was read.
    fn pump(
        &mut self,
        key: FileKey,
        pipeline: &Pipeline<Logs>,
        runtime: &tokio::runtime::Handle,
        stop: &CancellationToken,
    ) -> Result<bool, SendError> {
        let Some(tailed) = self.files.get_mut(&key) else { return Ok(false) };
        if tailed.done_reading {
            return Ok(false);
        }
        let Some(file) = tailed.file.as_mut() else { return Ok(false) };
        let now = Instant::now();
        let mut lines: Vec<Line> = Vec::new();
        let mut entries: Vec<Entry> = Vec::new();
        let read = match tailed.reader.read(file, &mut lines) {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(path = %tailed.path.display(), error = %e, "cannot read log file");
                return Ok(false);
            }
        };
        self.metrics.bytes.inc_by(read.bytes);
        self.metrics.truncated.inc_by(read.truncated);
        if read.bytes == 0 {
            // Copytruncate: the file is now shorter than what was read.
            let size = file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            if size < tailed.reader.read_offset() {
                tracing::info!(path = %tailed.path.display(), size, "log file was truncated; reading it from the start");
                tailed.reader.reset(0);
                tailed.joiner.reset();
                tailed.acked = 0;
                tailed.in_flight.clear();
                if let Ok(head) = Head::read(file, None) {
                    tailed.head = head;
                }
                return Ok(true);
            }
            if tailed.rotated {
                if let Some(last) = tailed.reader.finish() {
                    lines.push(last);
                }
                for line in lines.drain(..) {
                    tailed.joiner.push(line, now, &mut entries);
                }
                tailed.joiner.flush_all(&mut entries);
                // Everything is read; the file is released once it is all acknowledged.
                tailed.done_reading = true;
                tracing::info!(path = %tailed.path.display(), "read a rotated or deleted log file to its end");
            }
        }
        for line in lines {
            tailed.joiner.push(line, now, &mut entries);
        }
        tailed.joiner.flush_due(now, &mut entries);
        self.metrics.truncated.inc_by(entries.iter().filter(|e| e.cut).count() as u64);
        // Until a file has HEAD_BYTES, its identity is checked on what it had; keep it current.
        if tailed.head.len < checkpoint::HEAD_BYTES && tailed.reader.read_offset() > tailed.head.len {
            if let Some(file) = tailed.file.as_mut() {
                if let Ok(head) = Head::read(file, None) {
                    tailed.head = head;
                }
            }
        }
        let got = read.bytes > 0;
        self.send(key, entries, pipeline, runtime, stop)?;
        Ok(got)
    }

    fn send(
        &mut self,
        key: FileKey,
        entries: Vec<Entry>,
        pipeline: &Pipeline<Logs>,
        runtime: &tokio::runtime::Handle,
        stop: &CancellationToken,
    ) -> Result<(), SendError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<Entry> = entries.by_ref().take(MAX_ENTRIES_PER_SEND).collect();
            let Some(tailed) = self.files.get_mut(&key) else { return Ok(()) };
            let group = &self.groups[tailed.group];
            // Delivered at most up to the first line still held back (a partial line of the
            // other stream, an unfinished multiline entry).
            let held = tailed.joiner.held_from().unwrap_or(u64::MAX);
            let end = chunk.last().map_or(0, |e| e.end).min(held);
            let count = chunk.len() as u64;
            let records: Vec<LogRecord> = chunk.into_iter().map(|e| record(e, group.format, &tailed.path_attribute)).collect();
            let payload = Logs {
                resource_logs: vec![ResourceLogs {
                    resource: Some((*tailed.resource).clone()),
                    scope_logs: vec![ScopeLogs { log_records: records, ..Default::default() }],
                    ..Default::default()
                }],
            };
            let token = self.next_token;
            self.next_token += 1;
            tailed.in_flight.push_back(InFlight { token, end, done: false });
            self.tokens.insert(token, key);
            let ack = self.acker.ack(token);
            let result = runtime.block_on(async {
                tokio::select! {
                    result = pipeline.send_acked(payload, Duration::from_secs(3600), Some(ack)) => result,
                    _ = stop.cancelled() => Err(SendError::Closed),
                }
            });
            match result {
                Ok(_) => {
                    self.metrics.entries.inc_by(count);
                }
                Err(e) => {
                    // Not sent: read it again from the checkpoint when the source runs again.
                    self.rewind(key);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn take_acks(&mut self) {
        while let Ok(acked) = self.acks.try_recv() {
            self.ack(acked);
        }
        // Move checkpoints past every acknowledged prefix.
        for tailed in self.files.values_mut() {
            while tailed.in_flight.front().is_some_and(|f| f.done) {
                if let Some(f) = tailed.in_flight.pop_front() {
                    tailed.acked = tailed.acked.max(f.end);
                }
            }
            self.checkpoints.set(Checkpoint {
                key: tailed.key,
                head: tailed.head,
                offset: tailed.delivered_upto(),
                path: tailed.path.clone(),
            });
            let size = tailed.file.as_ref().and_then(|f| f.metadata().ok()).map_or(tailed.acked, |m| m.len());
            self.metrics.lag(&tailed.path, size.saturating_sub(tailed.acked));
        }
    }

    fn ack(&mut self, acked: ack::Acked) {
        let Some(key) = self.tokens.remove(&acked.token) else { return };
        if !acked.delivered {
            tracing::warn!("log entries were not delivered; reading them again from the last checkpoint");
            self.rewind(key);
            return;
        }
        if let Some(tailed) = self.files.get_mut(&key) {
            if let Some(f) = tailed.in_flight.iter_mut().find(|f| f.token == acked.token) {
                f.done = true;
            }
        }
    }

    /// Reads a file again from its checkpoint, forgetting what is in flight from it.
    fn rewind(&mut self, key: FileKey) {
        let Some(tailed) = self.files.get_mut(&key) else { return };
        for f in tailed.in_flight.drain(..) {
            self.tokens.remove(&f.token);
        }
        tailed.reader.reset(tailed.acked);
        tailed.joiner.reset();
        // A rotated file is still open: read it again from the checkpoint.
        tailed.done_reading = false;
    }

    /// Forgets files that were read to the end and fully acknowledged.
    fn release_finished(&mut self) {
        let done: Vec<FileKey> = self
            .files
            .values()
            .filter(|t| (t.done_reading || t.file.is_none()) && t.in_flight.is_empty())
            .map(|t| t.key)
            .collect();
        for key in done {
            if let Some(tailed) = self.files.remove(&key) {
                self.metrics.forget(&tailed.path);
            }
            self.checkpoints.remove(key);
        }
        // Checkpoints of files that no longer exist anywhere are dropped once a scan has run.
        if !self.first_scan {
            for key in self.checkpoints.keys() {
                if !self.files.contains_key(&key) {
                    self.checkpoints.remove(key);
                }
            }
        }
    }

    fn save(&mut self) {
        if let Err(e) = self.checkpoints.save() {
            tracing::error!(error = %e, "cannot save file checkpoints");
        }
    }
}

fn record(entry: Entry, format: LogFormatKind, path: &KeyValue) -> LogRecord {
    let fields = parse::fields(format, &entry.message);
    let mut attributes = vec![path.clone()];
    if let Some(stream) = entry.stream {
        attributes.push(string_kv("log.iostream", stream));
    }
    let now = parse::now_nanos();
    LogRecord {
        time_unix_nano: entry.time.or(fields.time).unwrap_or(now),
        observed_time_unix_nano: now,
        severity_text: fields.level.unwrap_or_default(),
        body: Some(AnyValue { value: Some(any_value::Value::StringValue(entry.message)) }),
        attributes,
        trace_id: fields.trace_id.map(|t| t.to_vec()).unwrap_or_default(),
        span_id: fields.span_id.map(|s| s.to_vec()).unwrap_or_default(),
        ..Default::default()
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

/// The resource of a file's entries: Kubernetes names from a pod log path, the group's static
/// labels, and the hint that makes the static labels Loki labels.
fn resource_for(path: &Path, labels: &[(String, String)]) -> Resource {
    let mut attributes = Vec::new();
    if let Some(pod) = pod_log(path) {
        attributes.push(string_kv("k8s.namespace.name", &pod.namespace));
        attributes.push(string_kv("k8s.pod.name", &pod.pod));
        attributes.push(string_kv("k8s.pod.uid", &pod.uid));
        attributes.push(string_kv("k8s.container.name", &pod.container));
    }
    for (name, value) in labels {
        attributes.push(string_kv(name, value));
    }
    if !labels.is_empty() {
        let names: Vec<&str> = labels.iter().map(|(n, _)| n.as_str()).collect();
        attributes.push(string_kv(RESOURCE_LABELS_HINT, &names.join(",")));
    }
    Resource { attributes, ..Default::default() }
}

/// What a Kubernetes pod log path says.
#[derive(Debug, PartialEq, Eq)]
pub struct PodLog {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    pub container: String,
}

/// `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<N>.log`
pub fn pod_log(path: &Path) -> Option<PodLog> {
    let mut parts = path.iter().rev();
    let _file = parts.next()?;
    let container = parts.next()?.to_str()?;
    let pod_dir = parts.next()?.to_str()?;
    if parts.next()?.to_str()? != "pods" {
        return None;
    }
    let mut fields = pod_dir.splitn(3, '_');
    let namespace = fields.next()?;
    let pod = fields.next()?;
    let uid = fields.next()?;
    if namespace.is_empty() || pod.is_empty() || uid.is_empty() || container.is_empty() {
        return None;
    }
    Some(PodLog { namespace: namespace.into(), pod: pod.into(), uid: uid.into(), container: container.into() })
}

fn is_compressed(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz" || e == "zst" || e == "bz2" || e == "xz")
}

fn is_gzip(file: &mut File) -> bool {
    use std::io::{Read, Seek};
    let mut magic = [0u8; 2];
    let ok = file.seek(std::io::SeekFrom::Start(0)).is_ok() && file.read_exact(&mut magic).is_ok();
    ok && magic == [0x1f, 0x8b]
}


#[cfg(test)]
mod tests;
