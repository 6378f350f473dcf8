//! Periscope: a node agent for observability.
//!
//! ```text
//! sources ──▶ pipeline (processors, fan-out) ──▶ exporters
//!   otlp, files,        enrich, cardinality,       jaeger, loki,
//!   scrape, host        paths                      prometheus, remote_write
//! admin server: health, readiness, self-metrics, API, UI, profiles
//! ```
//! [`app`] builds every component from the [`config`] and runs them; see each module for its part.

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod exporters;
pub mod memory;
pub mod paths;
pub mod pipeline;
pub mod profiling;
pub mod signal;
pub mod sources;
pub mod telemetry;
