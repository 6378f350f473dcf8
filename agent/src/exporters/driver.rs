//! The shared exporter driver: batching, bounded queue, concurrency, retries.
//!
//! ```text
//! deliveries ──▶ batcher (Encoder::append) ──▶ closed batches ──▶ N workers ──▶ Exporter::export
//! ```
//! The batcher appends each delivery to the open batch and closes it at `max_batch_items`,
//! at `max_batch_bytes` or after `batch_timeout`. Each batch keeps the queue permits of what it
//! holds until it is delivered or dropped, so the consumer's queue bounds everything here,
//! retries included — when a backend is down the queue fills and the receivers push back.
//! It keeps the deliveries' acknowledgements too, failing them when it lets go of data that a
//! restart could still deliver (shutdown, retries exhausted).
//!
//! Workers retry retryable failures with exponential backoff and jitter (or after the delay
//! the server asked for), up to `retry.max_elapsed_time`. On shutdown they keep delivering
//! until the hard-stop token fires at the shutdown deadline; what is left then is counted as
//! dropped with reason `shutdown`.

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ExportError, Exporter};
use crate::config::RetryConfig;
use crate::pipeline::ack::Ack;
use crate::pipeline::{ConsumerInput, Permit};
use crate::signal::Payload;
use crate::telemetry::ComponentMetrics;

#[derive(Debug, Clone)]
pub struct ExportSettings {
    pub max_batch_items: usize,
    /// A batch is also closed once its payloads added about this many bytes.
    pub max_batch_bytes: usize,
    pub batch_timeout: Duration,
    pub queue_items: usize,
    pub concurrency: usize,
    pub request_timeout: Duration,
    pub retry: RetryConfig,
}

/// Turns payloads into request bodies for one backend protocol.
pub trait Encoder<T>: Send + Sync + 'static {
    type Batch: Default + Send + 'static;
    /// Adds `data` to `batch`; returns about how many bytes that added.
    fn append(&self, batch: &mut Self::Batch, data: &T) -> usize;
    /// The request body of a closed batch.
    fn finish(&self, batch: Self::Batch) -> Bytes;
}

/// OTLP: concatenated protobuf encodings of requests decode as one request holding them all.
pub struct Concatenated;

impl<T: Payload + prost::Message> Encoder<T> for Concatenated {
    type Batch = BytesMut;

    fn append(&self, batch: &mut BytesMut, data: &T) -> usize {
        let before = batch.len();
        // Encoding into a BytesMut cannot run out of room: it grows.
        let _ = data.encode(batch);
        batch.len() - before
    }

    fn finish(&self, batch: BytesMut) -> Bytes {
        batch.freeze()
    }
}

/// A batch being filled or delivered, and the queue space and acknowledgements it holds.
struct Batch<B> {
    data: B,
    items: usize,
    bytes: usize,
    permits: Vec<Permit>,
    acks: Vec<Ack>,
}

impl<B: Default> Batch<B> {
    fn new() -> Self {
        Batch { data: B::default(), items: 0, bytes: 0, permits: Vec::new(), acks: Vec::new() }
    }
}

impl<B> Batch<B> {
    /// Lets go of the batch without delivering it: sources waiting for it hear so.
    fn abandon(self) {
        for ack in &self.acks {
            ack.fail();
        }
    }
}

/// Runs an exporter until its input closes and everything is delivered, or `hard_stop` fires.
pub async fn run<T: Payload, X: Exporter, E: Encoder<T>>(
    exporter: X,
    encoder: E,
    mut input: ConsumerInput<T>,
    settings: ExportSettings,
    metrics: ComponentMetrics,
    hard_stop: CancellationToken,
) {
    let exporter = Arc::new(exporter);
    let encoder = Arc::new(encoder);
    let (ready_tx, ready_rx) = mpsc::unbounded_channel::<Batch<E::Batch>>();
    let ready_rx = Arc::new(Mutex::new(ready_rx));
    let mut workers = JoinSet::new();
    for _ in 0..settings.concurrency.max(1) {
        let worker = Worker {
            exporter: exporter.clone(),
            encoder: encoder.clone(),
            settings: settings.clone(),
            metrics: metrics.clone(),
            hard_stop: hard_stop.clone(),
        };
        let ready_rx = ready_rx.clone();
        workers.spawn(async move {
            loop {
                let next = ready_rx.lock().await.recv().await;
                match next {
                    Some(batch) => worker.deliver(batch).await,
                    None => break,
                }
            }
        });
    }

    let mut open = Batch::new();
    // One timer for the open batch, re-armed when a batch opens (not re-created per delivery).
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut timer_armed = false;
    loop {
        tokio::select! {
            delivery = input.recv() => {
                let Some(delivery) = delivery else { break };
                open.bytes += encoder.append(&mut open.data, &delivery.data);
                open.items += delivery.items;
                open.permits.push(delivery.permit);
                open.acks.extend(delivery.ack);
                if !timer_armed {
                    timer.as_mut().reset(Instant::now() + settings.batch_timeout);
                    timer_armed = true;
                }
                if open.items >= settings.max_batch_items || open.bytes >= settings.max_batch_bytes {
                    let _ = ready_tx.send(std::mem::replace(&mut open, Batch::new()));
                    timer_armed = false;
                }
            }
            _ = timer.as_mut(), if timer_armed => {
                let _ = ready_tx.send(std::mem::replace(&mut open, Batch::new()));
                timer_armed = false;
            }
        }
    }
    if open.items > 0 {
        let _ = ready_tx.send(open);
    }
    drop(ready_tx);
    while let Some(result) = workers.join_next().await {
        if let Err(e) = result {
            tracing::error!(component = metrics.component(), error = %e, "export worker failed");
        }
    }
}

struct Worker<X, E> {
    exporter: Arc<X>,
    encoder: Arc<E>,
    settings: ExportSettings,
    metrics: ComponentMetrics,
    hard_stop: CancellationToken,
}

impl<X: Exporter, E> Worker<X, E> {
    async fn deliver<T>(&self, mut batch: Batch<E::Batch>)
    where
        E: Encoder<T>,
    {
        let items = batch.items as u64;
        let body = self.encoder.finish(std::mem::take(&mut batch.data));
        let component = self.metrics.component();
        let retry = &self.settings.retry;
        let started = Instant::now();
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(retry.initial_interval)
            .with_max_delay(retry.max_interval)
            .with_factor(1.5)
            .with_jitter()
            .without_max_times()
            .build();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let timeout = self.settings.request_timeout;
            let result = tokio::select! {
                result = tokio::time::timeout(timeout, self.exporter.export(body.clone())) => {
                    result.unwrap_or_else(|_| Err(ExportError::Retryable {
                        reason: format!("no answer within {}", humantime::format_duration(timeout)),
                        after: None,
                    }))
                }
                _ = self.hard_stop.cancelled() => {
                    self.metrics.dropped("shutdown", items);
                    batch.abandon();
                    return;
                }
            };
            let error = match result {
                Ok(delivered) => {
                    let rejected = delivered.rejected.min(items);
                    self.metrics.sent.inc_by(items - rejected);
                    if rejected > 0 {
                        self.metrics.dropped("rejected", rejected);
                        tracing::warn!(component, rejected, message = %delivered.message, "the backend rejected part of a batch");
                    }
                    return;
                }
                Err(error) => error,
            };
            self.metrics.export_error(error.kind());
            if let ExportError::Permanent(message) = &error {
                self.metrics.dropped("permanent", items);
                tracing::error!(component, items, error = %message, "export failed permanently; batch dropped");
                return;
            }
            let delay = error
                .retry_after()
                .unwrap_or_else(|| backoff.next().unwrap_or(retry.max_interval));
            if !retry.enabled || started.elapsed() + delay > retry.max_elapsed_time {
                self.metrics.dropped("retries_exhausted", items);
                tracing::error!(component, items, attempts = attempt, error = %error, "export failed; giving up on the batch");
                batch.abandon();
                return;
            }
            self.metrics.retried.inc_by(items);
            if attempt == 1 {
                tracing::warn!(component, items, error = %error, retry_in = ?delay, "export failed; retrying");
            } else {
                tracing::debug!(component, items, attempt, error = %error, retry_in = ?delay, "export failed again; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.hard_stop.cancelled() => {
                    self.metrics.dropped("shutdown", items);
                    batch.abandon();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exporters::Delivered;
    use crate::pipeline::{consumer, enrich::NodeEnricher, Pipeline};
    use crate::signal::{Signal, Traces};
    use crate::telemetry::Metrics;
    use bytes::Bytes;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;
    use std::sync::Mutex as StdMutex;

    /// Answers from a script, then succeeds; records every body it was sent.
    struct Scripted {
        script: StdMutex<Vec<ExportError>>,
        bodies: Arc<StdMutex<Vec<Bytes>>>,
    }

    impl Exporter for Scripted {
        async fn export(&self, body: Bytes) -> Result<Delivered, ExportError> {
            self.bodies.lock().unwrap().push(body);
            match self.script.lock().unwrap().pop() {
                Some(error) => Err(error),
                None => Ok(Delivered::default()),
            }
        }
    }

    fn traces(n: usize) -> Traces {
        Traces {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: (0..n).map(|i| Span { name: format!("s{i}"), ..Default::default() }).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn settings() -> ExportSettings {
        ExportSettings {
            max_batch_items: 10,
            max_batch_bytes: usize::MAX,
            batch_timeout: Duration::from_secs(3600),
            queue_items: 100,
            concurrency: 2,
            request_timeout: Duration::from_secs(5),
            retry: RetryConfig {
                enabled: true,
                initial_interval: Duration::from_millis(1),
                max_interval: Duration::from_millis(2),
                max_elapsed_time: Duration::from_secs(60),
            },
        }
    }

    async fn run_with(script: Vec<ExportError>, sends: &[usize]) -> (Vec<Bytes>, ComponentMetrics) {
        let metrics = Metrics::new();
        let component = metrics.component("test", Signal::Traces);
        let (handle, input) = consumer::<Traces>(100, component.clone());
        let pipeline = Pipeline::new(NodeEnricher::new(String::new(), false), vec![handle], metrics.drops("t", Signal::Traces));
        let bodies = Arc::new(StdMutex::new(Vec::new()));
        let exporter = Scripted { script: StdMutex::new(script), bodies: bodies.clone() };
        let task = tokio::spawn(run(exporter, Concatenated, input, settings(), component.clone(), CancellationToken::new()));
        for &n in sends {
            pipeline.send(traces(n), Duration::from_secs(1)).await.unwrap();
        }
        drop(pipeline);
        task.await.unwrap();
        let bodies = bodies.lock().unwrap().clone();
        (bodies, component)
    }

    #[tokio::test]
    async fn batches_close_at_max_items_and_the_rest_is_flushed_at_the_end() {
        let (bodies, metrics) = run_with(vec![], &[4, 4, 4, 1]).await;
        let counts: Vec<usize> = bodies.iter().map(|b| Traces::decode(b.clone()).unwrap().item_count()).collect();
        assert_eq!(counts, vec![12, 1]);
        assert_eq!(metrics.sent.get(), 13);
        assert_eq!(metrics.queue_items.get(), 0);
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_until_delivered() {
        let unavailable = || ExportError::Retryable { reason: "unavailable".into(), after: None };
        let (bodies, metrics) = run_with(vec![unavailable(), unavailable()], &[3]).await;
        assert_eq!(bodies.len(), 3);
        assert!(bodies.iter().all(|b| b == &bodies[0]));
        assert_eq!(metrics.sent.get(), 3);
        assert_eq!(metrics.retried.get(), 6);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let (bodies, metrics) = run_with(vec![ExportError::Permanent("400 bad".into())], &[3]).await;
        assert_eq!(bodies.len(), 1);
        assert_eq!(metrics.sent.get(), 0);
        assert_eq!(metrics.retried.get(), 0);
    }

    #[tokio::test]
    async fn acknowledgements_say_whether_the_batch_was_delivered() {
        use crate::pipeline::ack;
        let metrics = Metrics::new();
        let component = metrics.component("test", Signal::Traces);
        let (handle, input) = consumer::<Traces>(100, component.clone());
        let pipeline = Pipeline::new(NodeEnricher::new(String::new(), false), vec![handle], metrics.drops("t", Signal::Traces));
        // The first attempt is refused for good, later ones fail until retries run out.
        let unavailable = || ExportError::Retryable { reason: "unavailable".into(), after: None };
        let mut script = vec![unavailable(); 50];
        script.push(ExportError::Permanent("400 bad".into()));
        let exporter = Scripted { script: StdMutex::new(script), bodies: Arc::new(StdMutex::new(Vec::new())) };
        let mut s = settings();
        s.max_batch_items = 1;
        s.concurrency = 1;
        s.retry.max_elapsed_time = Duration::from_millis(20);
        let task = tokio::spawn(run(exporter, Concatenated, input, s, component.clone(), CancellationToken::new()));
        let (acker, mut acks) = ack::channel();
        pipeline.send_acked(traces(1), Duration::from_secs(1), Some(acker.ack(1))).await.unwrap();
        assert_eq!(acks.recv().await, Some(ack::Acked { token: 1, delivered: true }), "a permanent refusal is final");
        pipeline.send_acked(traces(1), Duration::from_secs(1), Some(acker.ack(2))).await.unwrap();
        assert_eq!(acks.recv().await, Some(ack::Acked { token: 2, delivered: false }), "retries ran out");
        drop(pipeline);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn batch_timeout_closes_a_partial_batch() {
        let metrics = Metrics::new();
        let component = metrics.component("test", Signal::Traces);
        let (handle, input) = consumer::<Traces>(100, component.clone());
        let pipeline = Pipeline::new(NodeEnricher::new(String::new(), false), vec![handle], metrics.drops("t", Signal::Traces));
        let bodies = Arc::new(StdMutex::new(Vec::new()));
        let exporter = Scripted { script: StdMutex::new(vec![]), bodies: bodies.clone() };
        let mut s = settings();
        s.batch_timeout = Duration::from_millis(200);
        let _task = tokio::spawn(run(exporter, Concatenated, input, s, component.clone(), CancellationToken::new()));
        pipeline.send(traces(2), Duration::ZERO).await.unwrap();
        while component.sent.get() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(bodies.lock().unwrap().len(), 1);
    }
}
