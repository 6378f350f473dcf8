//! `exporters.prometheus_remote_write`: the metrics pipeline to Prometheus' remote write 1.0
//! (protobuf + snappy, `X-Prometheus-Remote-Write-Version: 0.1.0`).
//!
//! ```text
//! metrics pipeline ──▶ convert (names, labels, deltas accumulated) ──▶ shard by series
//!                       ──▶ shard WAL (fsync) ──▶ shard sender ──▶ Prometheus
//! ```
//!
//! Each series always goes to the same shard, and a shard sends its log in order, so samples
//! of a series arrive in order while shards send in parallel. A batch leaves the log only once
//! Prometheus accepted it: 5xx, 429 (honouring `Retry-After`) and connection errors are retried
//! with backoff for as long as the log holds the batch; other 4xx answers are not retried (the
//! batch is dropped, counted, and logged with Prometheus' message). The logs are bounded in
//! bytes; past the bound the oldest samples are dropped and counted (`reason="wal_full"`).

pub mod prompb;
pub mod wal;

use backon::{BackoffBuilder, ExponentialBuilder};
use http::{HeaderMap, HeaderValue};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::otlp::{error_chain, header_map, parse_retry_after};
use super::prometheus::convert::{self, Labels, Value};
use super::{tls, BuildError};
use crate::config::RemoteWriteConfig;
use crate::pipeline::ConsumerInput;
use crate::signal::Metrics;
use crate::telemetry::{ComponentMetrics, Responses};
use crate::signal::scrape::{encode_time_series, Scrape};
use prompb::{Label, Sample, TimeSeries, STALE_NAN};
use wal::Wal;

pub const KEY: &str = "exporters.prometheus_remote_write";
/// Series whose delta values are being accumulated; beyond it deltas pass as they are.
const MAX_DELTA_SERIES: usize = 500_000;

struct Shard {
    wal: Mutex<Wal>,
    notify: Notify,
}

pub struct RemoteWrite {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    shards: Vec<Arc<Shard>>,
    config: RemoteWriteConfig,
    hasher: ahash::RandomState,
    responses: Responses,
}

pub fn build(config: &RemoteWriteConfig, data_dir: &Path, responses: Responses) -> Result<RemoteWrite, BuildError> {
    let tls = tls::rustls_client_config(config.tls.as_ref(), &format!("{KEY}.tls"))?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("periscope/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BuildError::new(KEY, format!("HTTP client setup failed: {e}")))?;
    let mut headers = header_map(KEY, &config.headers)?;
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
    headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static("snappy"));
    headers.insert("x-prometheus-remote-write-version", HeaderValue::from_static("0.1.0"));
    let shards = (0..config.shards.max(1))
        .map(|i| {
            let dir = data_dir.join("remote_write").join(format!("shard-{i}"));
            let wal = Wal::open(&dir, config.wal.max_bytes.0 / config.shards.max(1) as u64)
                .map_err(|e| BuildError::new(format!("{KEY}.wal"), format!("cannot open {}: {e}", dir.display())))?;
            Ok(Arc::new(Shard { wal: Mutex::new(wal), notify: Notify::new() }))
        })
        .collect::<Result<Vec<_>, BuildError>>()?;
    Ok(RemoteWrite {
        client,
        url: config.url.clone(),
        headers,
        shards,
        config: config.clone(),
        hasher: ahash::RandomState::with_seeds(7, 11, 13, 17),
        responses,
    })
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Accumulates delta points into cumulative ones, per series.
#[derive(Default)]
struct Deltas {
    totals: HashMap<(String, Labels), Value>,
}

impl Deltas {
    fn cumulative(&mut self, name: &str, point: &mut convert::Point) {
        if !point.delta {
            return;
        }
        let key = (name.to_owned(), point.labels.clone());
        let room = self.totals.len() < MAX_DELTA_SERIES;
        match self.totals.get_mut(&key) {
            Some(total) => {
                *total = convert::add(total, point.value.clone());
                point.value = total.clone();
            }
            None if room => {
                self.totals.insert(key, point.value.clone());
            }
            None => {}
        }
    }
}

/// The last timestamp written per OTLP series (by the hash of its labels), so that each
/// series' samples leave in strictly increasing time. An SDK that exports twice within a
/// millisecond gives two points of one series the same timestamp; Prometheus keeps only the
/// first of them (silently within a request, with a 400 for the whole request across
/// requests), which would lose the newer value. Such a point moves to 1 ms after the last;
/// a point older than the last is dropped and counted (`reason="out_of_order"`) rather than
/// have Prometheus refuse the request it travels in.
#[derive(Default)]
struct Order {
    last: HashMap<u64, i64>,
}

impl Order {
    /// The timestamp to send `time_ms` of series `key` with, or `None` to drop it.
    fn admit(&mut self, key: u64, time_ms: i64) -> Option<i64> {
        let room = self.last.len() < MAX_DELTA_SERIES;
        match self.last.get_mut(&key) {
            Some(last) if time_ms < *last => None,
            Some(last) => {
                *last = if time_ms == *last { time_ms + 1 } else { time_ms };
                Some(*last)
            }
            None => {
                if room {
                    self.last.insert(key, time_ms);
                }
                Some(time_ms)
            }
        }
    }
}

/// Encoded `TimeSeries` per shard, cut into log records of at most `batch.max_samples`
/// samples each, so that a send never exceeds it.
struct Records {
    per_shard: Vec<(Vec<(Vec<u8>, u32)>, Vec<u8>, u32)>,
    max_samples: u32,
}

impl Records {
    fn new(shards: usize, max_samples: usize) -> Records {
        Records { per_shard: (0..shards).map(|_| (Vec::new(), Vec::new(), 0)).collect(), max_samples: max_samples.max(1) as u32 }
    }

    /// Adds one single-sample series, written by `encode`.
    fn push(&mut self, shard: usize, encode: impl FnOnce(&mut Vec<u8>)) {
        let (records, current, samples) = &mut self.per_shard[shard];
        encode(current);
        *samples += 1;
        if *samples >= self.max_samples {
            records.push((std::mem::take(current), std::mem::take(samples)));
        }
    }

    fn finish(self) -> Vec<Vec<(Vec<u8>, u32)>> {
        self.per_shard
            .into_iter()
            .map(|(mut records, current, samples)| {
                if samples > 0 {
                    records.push((current, samples));
                }
                records
            })
            .collect()
    }
}

impl RemoteWrite {
    pub fn target(&self) -> &str {
        &self.url
    }

    /// Runs the shard senders and writes what the pipelines deliver (OTLP metrics and
    /// scrapes) into the shards' logs, until both close; the senders then stop at `stop` (what
    /// is left stays in the logs for the next run).
    pub async fn run(
        self,
        mut input: ConsumerInput<Metrics>,
        mut scrapes: ConsumerInput<Scrape>,
        metrics: ComponentMetrics,
        stop: CancellationToken,
    ) {
        let this = Arc::new(self);
        let closed = CancellationToken::new();
        let mut senders = tokio::task::JoinSet::new();
        for shard in &this.shards {
            let (this, shard, metrics, stop, closed) = (this.clone(), shard.clone(), metrics.clone(), stop.clone(), closed.clone());
            senders.spawn(async move { this.send_loop(&shard, &metrics, &stop, &closed).await });
        }
        let mut deltas = Deltas::default();
        let mut order = Order::default();
        // One buffer for every scrape, reused shard after shard.
        let mut buffer = Vec::new();
        let (mut otlp_open, mut scrapes_open) = (true, true);
        while otlp_open || scrapes_open {
            tokio::select! {
                delivery = input.recv(), if otlp_open => match delivery {
                    Some(delivery) => {
                        let mut records = Records::new(this.shards.len(), this.config.batch.max_samples);
                        let late = this.convert_otlp(&delivery.data, &mut deltas, &mut order, &mut records);
                        metrics.dropped("out_of_order", late);
                        this.append(records, &metrics).await;
                    }
                    None => otlp_open = false,
                },
                delivery = scrapes.recv(), if scrapes_open => match delivery {
                    Some(delivery) => this.write_scrape(&delivery.data, &mut buffer, &metrics).await,
                    None => scrapes_open = false,
                },
            }
        }
        // The pipelines are closed: the senders deliver what is left, then stop (or stop at
        // the deadline, leaving the rest in the logs for the next run).
        closed.cancel();
        for shard in &this.shards {
            shard.notify.notify_one();
        }
        while senders.join_next().await.is_some() {}
    }

    /// Writes each shard's records to its log with one sync, and wakes its sender.
    async fn append(&self, records: Records, metrics: &ComponentMetrics) {
        for (i, records) in records.finish().into_iter().enumerate() {
            let slices: Vec<(&[u8], u32)> = records.iter().map(|(r, n)| (r.as_slice(), *n)).collect();
            self.append_shard(i, &slices, metrics).await;
        }
    }

    async fn append_shard(&self, shard: usize, records: &[(&[u8], u32)], metrics: &ComponentMetrics) {
        if records.is_empty() {
            return;
        }
        let shard = &self.shards[shard];
        let result = shard.wal.lock().await.append_all(records);
        match result {
            Ok(dropped) => metrics.dropped("wal_full", dropped),
            Err(e) => {
                tracing::error!(error = %e, "cannot write the remote_write log; samples dropped");
                metrics.dropped("wal_error", records.iter().map(|(_, n)| u64::from(*n)).sum());
            }
        }
        shard.notify.notify_one();
    }

    /// One scrape's samples (and staleness markers), straight from the target's series table,
    /// one shard at a time through `buffer`: records of at most `batch.max_samples`.
    async fn write_scrape(&self, scrape: &Scrape, buffer: &mut Vec<u8>, metrics: &ComponentMetrics) {
        let shards = self.shards.len() as u64;
        let max = self.config.batch.max_samples.max(1) as u32;
        let stale = f64::from_bits(STALE_NAN);
        let mut cuts: Vec<(usize, u32)> = Vec::new();
        for shard in 0..shards {
            buffer.clear();
            cuts.clear();
            let mut count = 0u32;
            let mut counted = |buffer: &Vec<u8>, cuts: &mut Vec<(usize, u32)>| {
                count += 1;
                if count >= max {
                    cuts.push((buffer.len(), count));
                    count = 0;
                }
            };
            let table = &scrape.table;
            for (i, &value) in scrape.values.iter().enumerate() {
                if table.hash(i) % shards == shard {
                    encode_time_series(buffer, table.encoded_labels(i), value, scrape.time_of(i));
                    counted(buffer, &mut cuts);
                }
            }
            if let Some((old, gone)) = &scrape.stale {
                for &i in gone {
                    let i = i as usize;
                    if old.hash(i) % shards == shard {
                        encode_time_series(buffer, old.encoded_labels(i), stale, scrape.time_ms);
                        counted(buffer, &mut cuts);
                    }
                }
            }
            if count > 0 {
                cuts.push((buffer.len(), count));
            }
            let mut start = 0;
            let records: Vec<(&[u8], u32)> = cuts
                .iter()
                .map(|&(end, n)| {
                    let record = (&buffer[start..end], n);
                    start = end;
                    record
                })
                .collect();
            self.append_shard(shard as usize, &records, metrics).await;
        }
        // Keep the buffer for the next scrape, unless one shard's share was unusually large.
        if buffer.capacity() > 64 << 20 {
            *buffer = Vec::new();
        }
    }

    /// Converts one OTLP request per the compatibility rules and shards its samples. Returns
    /// the samples dropped for being older than their series' last one.
    fn convert_otlp(&self, request: &Metrics, deltas: &mut Deltas, order: &mut Order, records: &mut Records) -> u64 {
        let converted = convert::convert(request);
        let now = now_ms();
        let shards = self.shards.len() as u64;
        let mut late = 0;
        let mut push = |name: &str, labels: Labels, value: f64, time_ms: i64| {
            let mut all: Vec<Label> = labels.into_iter().map(|(name, value)| Label { name, value }).collect();
            all.push(Label { name: "__name__".into(), value: name.to_owned() });
            all.sort_by(|a, b| a.name.cmp(&b.name));
            let hash = self.hasher.hash_one(&all);
            let Some(timestamp) = order.admit(hash, if time_ms > 0 { time_ms } else { now }) else {
                late += 1;
                return;
            };
            let shard = (hash % shards) as usize;
            let series = TimeSeries { labels: all, samples: vec![Sample { value, timestamp }] };
            records.push(shard, |out| prost::encoding::message::encode(1, &series, out));
        };
        for info in converted.target_info {
            push("target_info", info, 1.0, now);
        }
        for mut family in converted.families {
            for point in &mut family.points {
                deltas.cumulative(&family.name, point);
                if point.stale {
                    // A staleness marker for every sample the series had.
                    let stale = f64::from_bits(STALE_NAN);
                    match &point.value {
                        Value::Number(_) => push(&family.name, point.labels.clone(), stale, point.time_ms),
                        _ => {
                            for (name, labels, _) in convert::samples(&family.name, point) {
                                push(&name, labels, stale, point.time_ms);
                            }
                        }
                    }
                    continue;
                }
                for (name, labels, value) in convert::samples(&family.name, point) {
                    push(&name, labels, value, point.time_ms);
                }
            }
        }
        late
    }

    async fn send_loop(&self, shard: &Shard, metrics: &ComponentMetrics, stop: &CancellationToken, closed: &CancellationToken) {
        let max = self.config.batch.max_samples as u64;
        loop {
            let batch = match shard.wal.lock().await.read(max) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the remote_write log");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            };
            if batch.samples == 0 {
                if batch.end != shard.wal.lock().await.delivered() {
                    // Moved past an empty or finished segment.
                    let _ = shard.wal.lock().await.commit(batch.end);
                    continue;
                }
                if closed.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = shard.notify.notified() => {}
                    _ = tokio::time::sleep(self.config.batch.timeout) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            if batch.samples < max && !closed.is_cancelled() {
                // Give the batch a moment to fill, as Prometheus' own sender does.
                tokio::select! {
                    _ = tokio::time::sleep(self.config.batch.timeout) => {}
                    _ = stop.cancelled() => {}
                }
                let fuller = shard.wal.lock().await.read(max);
                if let Ok(fuller) = fuller {
                    if fuller.samples > batch.samples {
                        if self.deliver(fuller.body, fuller.samples, metrics, stop).await {
                            let _ = shard.wal.lock().await.commit(fuller.end);
                        } else {
                            return;
                        }
                        continue;
                    }
                }
            }
            if self.deliver(batch.body, batch.samples, metrics, stop).await {
                if let Err(e) = shard.wal.lock().await.commit(batch.end) {
                    tracing::error!(error = %e, "cannot record remote_write progress");
                }
            } else {
                return;
            }
        }
    }

    /// Sends one batch until it is accepted or refused for good. Returns false when stopped
    /// before that (the batch stays in the log).
    async fn deliver(&self, raw: Vec<u8>, samples: u64, metrics: &ComponentMetrics, stop: &CancellationToken) -> bool {
        let mut compressed = vec![0; snap::raw::max_compress_len(raw.len())];
        let body = match snap::raw::Encoder::new().compress(&raw, &mut compressed) {
            Ok(n) => {
                compressed.truncate(n);
                bytes::Bytes::from(compressed)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot compress a remote_write batch; dropped");
                metrics.dropped("encode", samples);
                return true;
            }
        };
        let retry = &self.config.retry;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(retry.initial_interval)
            .with_max_delay(retry.max_interval)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0;
        let started = std::time::Instant::now();
        loop {
            attempt += 1;
            let sent = self.client.post(&self.url).headers(self.headers.clone()).timeout(self.config.timeout).body(body.clone());
            let outcome = tokio::select! {
                outcome = sent.send() => outcome,
                _ = stop.cancelled() => return false,
            };
            let (reason, after) = match outcome {
                Ok(response) if response.status().is_success() => {
                    self.responses.count(response.status().as_str());
                    metrics.sent.inc_by(samples);
                    return true;
                }
                Ok(response) => {
                    let status = response.status();
                    self.responses.count(status.as_str());
                    let after = response.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
                    let text = response.text().await.unwrap_or_default();
                    let message: String = text.trim().chars().take(512).collect();
                    let reason = format!("HTTP {status} from {}: {message}", self.url);
                    if status.as_u16() != 429 && !status.is_server_error() {
                        metrics.export_error("permanent");
                        metrics.dropped("permanent", samples);
                        tracing::error!(component = "prometheus_remote_write", samples, error = %reason, "remote write refused; batch dropped");
                        return true;
                    }
                    metrics.export_error(if status.as_u16() == 429 { "throttled" } else { "retryable" });
                    (reason, after)
                }
                Err(e) => {
                    self.responses.count("connection_error");
                    metrics.export_error("retryable");
                    (format!("POST {}: {}", self.url, error_chain(&e)), None)
                }
            };
            let delay = after.unwrap_or_else(|| backoff.next().unwrap_or(retry.max_interval));
            if !retry.enabled || started.elapsed() + delay > retry.max_elapsed_time {
                metrics.dropped("retries_exhausted", samples);
                tracing::error!(component = "prometheus_remote_write", samples, attempts = attempt, error = %reason, "remote write failed; giving up on the batch");
                return true;
            }
            metrics.retried.inc_by(samples);
            if attempt == 1 {
                tracing::warn!(component = "prometheus_remote_write", samples, error = %reason, retry_in = ?delay, "remote write failed; retrying (the samples wait in the log)");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Order;

    #[test]
    fn a_series_leaves_in_strictly_increasing_time() {
        let mut order = Order::default();
        assert_eq!(order.admit(1, 1_000), Some(1_000));
        // Same millisecond: moved just after the last, so Prometheus keeps the newer value.
        assert_eq!(order.admit(1, 1_000), Some(1_001));
        assert_eq!(order.admit(1, 1_001), Some(1_002));
        assert_eq!(order.admit(1, 1_010), Some(1_010));
        // Older than the last: dropped, not sent to be refused.
        assert_eq!(order.admit(1, 1_005), None);
        assert_eq!(order.admit(1, 1_011), Some(1_011));
    }

    #[test]
    fn series_are_ordered_independently() {
        let mut order = Order::default();
        assert_eq!(order.admit(1, 2_000), Some(2_000));
        assert_eq!(order.admit(2, 1_000), Some(1_000));
        assert_eq!(order.admit(2, 1_000), Some(1_001));
        assert_eq!(order.admit(1, 2_000), Some(2_001));
    }
}
