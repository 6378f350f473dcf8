//! OTLP receivers: gRPC (trace, metrics and logs services) and HTTP (`/v1/traces`,
//! `/v1/metrics`, `/v1/logs`, protobuf or JSON, optionally gzipped).
//!
//! Both share [`Intake`]: check ids, count, and send to the pipeline, mapping the outcome to
//! the OTLP specification's answers (malformed → INVALID_ARGUMENT / 400; pipeline full →
//! UNAVAILABLE / 503 with a retry delay).

pub mod grpc;
pub mod http;
pub mod tls;

use opentelemetry_proto::tonic::collector::logs::v1::{ExportLogsPartialSuccess, ExportLogsServiceResponse};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsPartialSuccess, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};
use std::sync::Arc;
use std::time::Duration;

use crate::pipeline::cardinality::SeriesLimit;
use crate::pipeline::{Pipeline, SendError};
use crate::signal::{Logs, Metrics, Payload, Traces};
use crate::telemetry::{Drops, ReceiverMetrics};

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

/// Takes what a request may not bring in (for metrics: series beyond the limit) out of it,
/// before it enters the pipeline.
pub trait Guard<T>: Send + Sync {
    /// Removes the items refused; returns how many.
    fn apply(&self, data: &mut T) -> u64;
    /// Tells the sender why, for the partial-success answer.
    fn message(&self, refused: u64) -> String;
}

impl Guard<Metrics> for SeriesLimit {
    fn apply(&self, data: &mut Metrics) -> u64 {
        SeriesLimit::apply(self, data)
    }

    fn message(&self, refused: u64) -> String {
        format!(
            "{refused} data points refused: the agent takes at most {} metric series (sources.otlp.max_metric_series)",
            self.limit()
        )
    }
}

/// A request taken in, perhaps only in part.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub items: usize,
    /// Items refused (OTLP partial success), and why.
    pub refused: u64,
    pub message: String,
}

/// The OTLP answer of each signal, with partial success when part of a request was refused.
pub trait Answer: Payload {
    type Response: prost::Message + serde::Serialize + Default + Send + 'static;
    fn answer(accepted: &Accepted) -> Self::Response;
}

impl Answer for Traces {
    type Response = ExportTraceServiceResponse;
    fn answer(a: &Accepted) -> Self::Response {
        ExportTraceServiceResponse {
            partial_success: (a.refused > 0)
                .then(|| ExportTracePartialSuccess { rejected_spans: a.refused as i64, error_message: a.message.clone() }),
        }
    }
}

impl Answer for Metrics {
    type Response = ExportMetricsServiceResponse;
    fn answer(a: &Accepted) -> Self::Response {
        ExportMetricsServiceResponse {
            partial_success: (a.refused > 0).then(|| ExportMetricsPartialSuccess {
                rejected_data_points: a.refused as i64,
                error_message: a.message.clone(),
            }),
        }
    }
}

impl Answer for Logs {
    type Response = ExportLogsServiceResponse;
    fn answer(a: &Accepted) -> Self::Response {
        ExportLogsServiceResponse {
            partial_success: (a.refused > 0)
                .then(|| ExportLogsPartialSuccess { rejected_log_records: a.refused as i64, error_message: a.message.clone() }),
        }
    }
}

/// One receiver's way into one pipeline.
pub struct Intake<T> {
    pipeline: Arc<Pipeline<T>>,
    metrics: ReceiverMetrics,
    guard: Option<(Arc<dyn Guard<T>>, Drops)>,
}

impl<T> Clone for Intake<T> {
    fn clone(&self) -> Self {
        Intake { pipeline: self.pipeline.clone(), metrics: self.metrics.clone(), guard: self.guard.clone() }
    }
}

impl<T: Payload> Intake<T> {
    pub fn new(pipeline: Arc<Pipeline<T>>, metrics: ReceiverMetrics) -> Self {
        Intake { pipeline, metrics, guard: None }
    }

    /// Puts `guard` in front of the pipeline; what it refuses is counted in `drops`
    /// (`reason="series_limit"`).
    pub fn guarded(mut self, guard: Arc<dyn Guard<T>>, drops: Drops) -> Self {
        self.guard = Some((guard, drops));
        self
    }

    pub fn metrics(&self) -> &ReceiverMetrics {
        &self.metrics
    }

    /// Validates and forwards one decoded request.
    pub async fn accept(&self, mut data: T) -> Result<Accepted, Rejection> {
        if let Err(message) = data.check_ids() {
            return Err(self.reject(Rejection::Malformed(message)));
        }
        let (refused, message) = match &self.guard {
            Some((guard, drops)) => {
                let refused = guard.apply(&mut data);
                drops.add("series_limit", refused);
                (refused, if refused > 0 { guard.message(refused) } else { String::new() })
            }
            None => (0, String::new()),
        };
        match self.pipeline.send(data, QUEUE_WAIT).await {
            Ok(items) => {
                self.metrics.request("ok");
                self.metrics.received.inc_by(items as u64);
                Ok(Accepted { items, refused, message })
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
