//! Exporters: one `export(body)` per backend protocol; [`driver`] does everything they share
//! (batching, the bounded queue, concurrency, retries with backoff and jitter, Retry-After,
//! self-metrics).
//!
//! An exporter only says what happened, as an [`ExportError`] class in the manner of the
//! OpenTelemetry Collector: retry it, back off because the server asked to, or give up.

pub mod driver;
pub mod jaeger;
pub mod loki;
pub mod otlp;
pub mod prometheus;
pub mod remote_write;
pub mod tls;

use bytes::Bytes;
use std::future::Future;
use std::time::Duration;

/// What a backend said about a batch it accepted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Items the backend accepted the request for but rejected (OTLP partial success).
    pub rejected: u64,
    /// The backend's explanation of a partial success.
    pub message: String,
}

/// Why an export failed, and so what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// A transient failure (unavailable, timeout, connection reset): retry with backoff,
    /// or after `after` when the server said so.
    #[error("{reason}")]
    Retryable { reason: String, after: Option<Duration> },
    /// The server is overloaded and asked us to slow down.
    #[error("{reason}")]
    Throttled { reason: String, after: Option<Duration> },
    /// The server will never accept this batch (bad request, auth): drop it and say why.
    #[error("{0}")]
    Permanent(String),
}

impl ExportError {
    /// The `kind` label of `periscope_export_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ExportError::Retryable { .. } => "retryable",
            ExportError::Throttled { .. } => "throttled",
            ExportError::Permanent(_) => "permanent",
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ExportError::Retryable { after, .. } | ExportError::Throttled { after, .. } => *after,
            ExportError::Permanent(_) => None,
        }
    }
}

/// A backend protocol: sends one encoded batch.
pub trait Exporter: Send + Sync + 'static {
    fn export(&self, body: Bytes) -> impl Future<Output = Result<Delivered, ExportError>> + Send;
}

/// A problem building an exporter from its config (files, TLS material, endpoints).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct BuildError {
    pub key: String,
    pub message: String,
}

impl BuildError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError { key: key.into(), message: message.into() }
    }
}
