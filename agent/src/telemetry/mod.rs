//! The agent's own telemetry: self-metrics, logging, readiness of components.

pub mod exposition;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod readiness;

pub use metrics::{ComponentMetrics, Drops, FileMetrics, Metrics, PathsMetrics, ReceiverMetrics, Responses, ScrapeMetrics};
pub use readiness::{Readiness, ReadyHandle};
