//! OTLP receivers: gRPC (trace, metrics and logs services) and HTTP (`/v1/traces`,
//! `/v1/metrics`, `/v1/logs`, protobuf or JSON, optionally gzipped).
//!
//! Both share [`Intake`]: check ids, count, and send to the pipeline, mapping the outcome to
//! the OTLP specification's answers (malformed → INVALID_ARGUMENT / 400; pipeline full →
//! UNAVAILABLE / 503 with a retry delay).

pub mod grpc;
pub mod http;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use crate::pipeline::{Pipeline, SendError};
use crate::signal::Payload;
use crate::telemetry::ReceiverMetrics;

/// How long a request may wait for queue space before the client is told to retry.
/// Waiting a little smooths bursts; the wait is bounded so a stuck exporter cannot pile up
/// requests (each held request is also bounded by the receivers' concurrency limit).
const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Requests handled at once per receiver; each can hold up to `max_request_size` of data.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;

/// Why a request was not accepted.
#[derive(Debug)]
pub enum Rejection {
    Malformed(String),
    TooLarge(String),
    UnsupportedMediaType(String),
    Full { message: String, retry_after: Duration },
    ShuttingDown,
}

/// One receiver's way into one pipeline.
pub struct Intake<T> {
    pipeline: Arc<Pipeline<T>>,
    metrics: ReceiverMetrics,
}

impl<T> Clone for Intake<T> {
    fn clone(&self) -> Self {
        Intake { pipeline: self.pipeline.clone(), metrics: self.metrics.clone() }
    }
}

impl<T: Payload> Intake<T> {
    pub fn new(pipeline: Arc<Pipeline<T>>, metrics: ReceiverMetrics) -> Self {
        Intake { pipeline, metrics }
    }

    pub fn metrics(&self) -> &ReceiverMetrics {
        &self.metrics
    }

    /// Validates and forwards one decoded request.
    pub async fn accept(&self, data: T) -> Result<usize, Rejection> {
        if let Err(message) = data.check_ids() {
            return Err(self.reject(Rejection::Malformed(message)));
        }
        match self.pipeline.send(data, QUEUE_WAIT).await {
            Ok(items) => {
                self.metrics.request("ok");
                self.metrics.received.inc_by(items as u64);
                Ok(items)
            }
            Err(SendError::Full { consumer, retry_after }) => Err(self.reject(Rejection::Full {
                message: format!("the {consumer} queue is full; retry later"),
                retry_after,
            })),
            Err(SendError::Closed) => Err(self.reject(Rejection::ShuttingDown)),
        }
    }

    /// Counts a rejection by outcome and passes it through.
    pub fn reject(&self, rejection: Rejection) -> Rejection {
        self.metrics.request(match &rejection {
            Rejection::Malformed(_) => "malformed",
            Rejection::TooLarge(_) => "too_large",
            Rejection::UnsupportedMediaType(_) => "unsupported_media_type",
            Rejection::Full { .. } | Rejection::ShuttingDown => "backpressure",
        });
        tracing::debug!(component = self.metrics.component(), ?rejection, "request rejected");
        rejection
    }
}
