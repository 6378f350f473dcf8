//! Periscope's benchmark harness: a load generator that sends realistic OTLP traces over gRPC
//! and a sink that counts the spans an agent forwards to it. `bench/run.sh` puts an agent
//! between the two and reads the agent's CPU time and peak memory from `/proc`. `paths-bench`
//! drives the agent's execution-path analysis in process, on the same traces.
//!
//! The harness itself must cost little and the same for every agent under test: the load
//! generator encodes its requests once, before the clock starts, and the sink only decodes and
//! counts.

pub mod args;
pub mod codec;
pub mod report;
pub mod workload;
