//! One pipeline per signal: processors run on the sender's task, then the payload fans out to
//! every consumer (exporters, and later the execution-path aggregator) through each
//! consumer's own bounded queue.
//!
//! Fan-out is all or nothing: space is reserved in every consumer's queue before the payload
//! is handed to any, so a client told "try later" never causes a duplicate downstream. When a
//! queue stays full longer than the sender is willing to wait, the sender gets
//! [`SendError::Full`] and passes the pressure on to its client (HTTP 503, gRPC UNAVAILABLE).
//!
//! A consumer made with [`lossy_consumer`] (analysis, such as execution paths) never holds
//! the pipeline back: when its queue is full it misses the payload, counted as dropped with
//! reason `queue_full`, and delivery to the others goes on.

pub mod ack;
pub mod cardinality;
pub mod enrich;
pub mod queue;

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

use crate::signal::Payload;
use crate::telemetry::{ComponentMetrics, Drops};
use enrich::NodeEnricher;
pub use queue::{Permit, Queue};

/// A payload handed to one consumer, holding its space in that consumer's queue.
pub struct Delivery<T> {
    pub data: Arc<T>,
    pub items: usize,
    pub permit: Permit,
    /// Present when the source waits to hear that the payload was delivered.
    pub ack: Option<ack::Ack>,
}

/// The pipeline's end of one consumer.
pub struct ConsumerHandle<T> {
    name: String,
    lossy: bool,
    queue: Queue,
    tx: mpsc::UnboundedSender<Delivery<T>>,
    metrics: ComponentMetrics,
}

/// The consumer's end: deliveries arrive here until every pipeline sender is gone.
pub type ConsumerInput<T> = mpsc::UnboundedReceiver<Delivery<T>>;

/// Connects a consumer with a queue of `capacity` items.
pub fn consumer<T>(capacity: usize, metrics: ComponentMetrics) -> (ConsumerHandle<T>, ConsumerInput<T>) {
    let queue = Queue::new(capacity, metrics.queue_items.clone(), &metrics.queue_capacity);
    let (tx, rx) = mpsc::unbounded_channel();
    let name = metrics.component().to_owned();
    (ConsumerHandle { name, lossy: false, queue, tx, metrics }, rx)
}

/// Connects a consumer that misses payloads, counted, rather than make senders wait.
pub fn lossy_consumer<T>(capacity: usize, metrics: ComponentMetrics) -> (ConsumerHandle<T>, ConsumerInput<T>) {
    let (mut handle, rx) = consumer(capacity, metrics);
    handle.lossy = true;
    (handle, rx)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("the {consumer} queue is full; retry after {}s", retry_after.as_secs())]
    Full { consumer: String, retry_after: Duration },
    #[error("the agent is shutting down")]
    Closed,
}

/// The sending side of a signal's pipeline, shared by its sources.
pub struct Pipeline<T> {
    enricher: NodeEnricher,
    consumers: Vec<ConsumerHandle<T>>,
    /// Counts payloads that have nowhere to go (no exporter for this signal yet).
    unrouted: Drops,
}

/// How long a full queue makes a client wait before we tell it to retry later.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl<T: Payload> Pipeline<T> {
    pub fn new(enricher: NodeEnricher, consumers: Vec<ConsumerHandle<T>>, unrouted: Drops) -> Self {
        Pipeline { enricher, consumers, unrouted }
    }

    /// Processes `data` and hands it to every consumer, waiting up to `wait` for queue space.
    /// Returns the number of items accepted.
    pub async fn send(&self, data: T, wait: Duration) -> Result<usize, SendError> {
        self.send_acked(data, wait, None).await
    }

    /// As [`Pipeline::send`], with an acknowledgement every consumer holds until it is done.
    /// When the payload goes nowhere (no consumer, or it is refused) the ack is simply dropped.
    pub async fn send_acked(&self, mut data: T, wait: Duration, ack: Option<ack::Ack>) -> Result<usize, SendError> {
        let items = data.item_count();
        if items == 0 {
            return Ok(0);
        }
        if self.consumers.is_empty() {
            self.unrouted.add("no_exporter", items as u64);
            return Ok(items);
        }
        // Reserve everywhere first; the permits already taken are released if one queue is full.
        let mut permits = Vec::with_capacity(self.consumers.len());
        for consumer in self.consumers.iter().filter(|c| !c.lossy) {
            match consumer.queue.reserve(items, wait).await {
                Some(permit) => permits.push(Some(permit)),
                None => {
                    if let Some(ack) = ack {
                        ack.forget();
                    }
                    return Err(SendError::Full { consumer: consumer.name.clone(), retry_after: RETRY_AFTER });
                }
            }
        }
        for consumer in self.consumers.iter().filter(|c| c.lossy) {
            let permit = consumer.queue.reserve(items, Duration::ZERO).await;
            if permit.is_none() {
                consumer.metrics.dropped("queue_full", items as u64);
            }
            permits.push(permit);
        }
        self.enricher.process(&mut data);
        let data = Arc::new(data);
        let in_order = self.consumers.iter().filter(|c| !c.lossy).chain(self.consumers.iter().filter(|c| c.lossy));
        for (consumer, permit) in in_order.zip(permits) {
            let Some(permit) = permit else { continue };
            let delivery = Delivery { data: data.clone(), items, permit, ack: ack.clone() };
            if consumer.tx.send(delivery).is_err() {
                // The consumer has stopped: only during shutdown.
                if let Some(ack) = &ack {
                    ack.fail();
                }
                return Err(SendError::Closed);
            }
            consumer.metrics.received.inc_by(items as u64);
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::{Signal, Traces};
    use crate::telemetry::Metrics;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn traces(n: usize) -> Traces {
        Traces {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans { spans: vec![Span::default(); n], ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    #[tokio::test]
    async fn fan_out_is_all_or_nothing() {
        let metrics = Metrics::new();
        let (big, mut big_rx) = consumer::<Traces>(100, metrics.component("big", Signal::Traces));
        let (small, mut small_rx) = consumer::<Traces>(5, metrics.component("small", Signal::Traces));
        let pipeline = Pipeline::new(
            NodeEnricher::new("n".into(), false),
            vec![big, small],
            metrics.drops("traces", Signal::Traces),
        );
        assert_eq!(pipeline.send(traces(4), Duration::ZERO).await, Ok(4));
        let err = pipeline.send(traces(4), Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, SendError::Full { ref consumer, .. } if consumer == "small"), "{err:?}");
        // Only the first payload reached either consumer.
        assert_eq!(big_rx.try_recv().unwrap().items, 4);
        assert!(big_rx.try_recv().is_err());
        let delivered = small_rx.try_recv().unwrap();
        assert!(small_rx.try_recv().is_err());
        // Once the consumer is done with it, there is room again.
        drop(delivered);
        assert_eq!(pipeline.send(traces(4), Duration::ZERO).await, Ok(4));
    }

    #[tokio::test]
    async fn a_full_lossy_consumer_misses_payloads_without_holding_others_back() {
        let metrics = Metrics::new();
        let (exporter, mut exporter_rx) = consumer::<Traces>(100, metrics.component("exporter", Signal::Traces));
        let (analysis, mut analysis_rx) = lossy_consumer::<Traces>(5, metrics.component("analysis", Signal::Traces));
        let pipeline = Pipeline::new(
            NodeEnricher::new("n".into(), false),
            vec![analysis, exporter],
            metrics.drops("traces", Signal::Traces),
        );
        assert_eq!(pipeline.send(traces(4), Duration::ZERO).await, Ok(4));
        assert_eq!(pipeline.send(traces(4), Duration::ZERO).await, Ok(4));
        assert_eq!(exporter_rx.try_recv().unwrap().items, 4);
        assert_eq!(exporter_rx.try_recv().unwrap().items, 4);
        assert_eq!(analysis_rx.try_recv().unwrap().items, 4);
        assert!(analysis_rx.try_recv().is_err(), "the second payload did not fit");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics.registry()).unwrap();
        assert!(
            text.contains("periscope_dropped_items_total{component=\"analysis\",signal=\"traces\",reason=\"queue_full\"} 4"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn payloads_are_enriched_before_delivery() {
        let metrics = Metrics::new();
        let (handle, mut rx) = consumer::<Traces>(100, metrics.component("c", Signal::Traces));
        let pipeline = Pipeline::new(NodeEnricher::new("node-7".into(), false), vec![handle], metrics.drops("traces", Signal::Traces));
        pipeline.send(traces(1), Duration::ZERO).await.unwrap();
        let delivery = rx.try_recv().unwrap();
        let resource = delivery.data.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes[0].key, enrich::HOST_NAME);
    }
}
