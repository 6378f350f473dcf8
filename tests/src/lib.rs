//! The harness of Periscope's end-to-end suite.
//!
//! Tests drive the built `periscope` binary the way a user does: a config file, a process,
//! real clients on its receivers and a stand-in for Jaeger's collector on the other side.
//! Everything here waits on a signal (readiness, a span count, a metric) under one generous
//! deadline and never sleeps for a fixed time in place of one; a test that times out fails
//! with the agent's stderr.
//!
//! - [`Agent`]: a running agent on free ports, its self-metrics, SIGTERM and exit status.
//! - [`Collector`]: an OTLP trace server (gRPC or HTTP) standing in for Jaeger's collector,
//!   recording every request with its headers and answering from a [`Script`].
//! - [`spans`]: received requests flattened into spans for exact comparisons.
//! - [`prometheus`]: the agent's `/metrics` text parsed into queryable samples.
//! - [`otlp`]: builders of OTLP requests with known content, and raw clients.
//! - [`tls`]: a private CA and the certificates it signed, for receivers and stand-ins
//!   that speak TLS.
//! - [`loki`]: a stand-in for Loki's push API that checks what Loki would refuse, and an
//!   agent process that can be killed with SIGKILL and restarted on the same directory.
//! - [`kubernetes`]: a stand-in for the Kubernetes API server's pod list, over TLS with a
//!   service account, for pod discovery.

mod agent;
mod collector;
pub mod kubernetes;
pub mod loki;
pub mod otlp;
pub mod prometheus;
pub mod python;
pub mod spans;
pub mod tls;

pub use agent::{periscope_bin, run_to_exit, Agent, Exited, PathsSettings, TestConfig};
pub use collector::{Collector, Received, Reply, Script};
pub use prometheus::Metrics;
pub use spans::FlatSpan;

use std::net::TcpListener;
use std::time::Duration;

/// How long any wait of the suite may take before the test fails. Generous on purpose: the
/// suite runs on small machines, and a correct agent meets every wait in well under a second.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often a poll loop looks again at a condition that has no push notification
/// (an HTTP endpoint, a process exit).
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
}
pub mod promserver;
