//! Sources: where data enters the agent. Each hands what it receives to its signal's
//! pipeline and, when the pipeline is full, waits or tells its client to retry later —
//! never buffers without bound.

pub mod files;
pub mod host;
pub mod otlp;
pub mod prometheus;
