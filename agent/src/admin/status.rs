//! `GET /api/v1/status`: the pipelines' health in one JSON document, for the web UI and for
//! scripts — readiness, and per component what it received, sent, retried and dropped (by
//! reason) and how full its queue is, plus the receivers' requests by outcome and failing
//! scrape targets.
//!
//! The figures are the agent's own metrics (the same registry `/metrics` serves), read back
//! through the exposition parser, so the two endpoints can never disagree.

use serde::Serialize;
use std::collections::BTreeMap;

use crate::sources::prometheus::parse::{self, Format};
use crate::telemetry::{Metrics, Readiness};

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Status {
    pub version: &'static str,
    pub node: String,
    pub uptime_seconds: f64,
    pub ready: bool,
    /// Components not (yet) running, with why.
    pub problems: Vec<String>,
    pub components: Vec<Component>,
    pub scrape_failures: Vec<ScrapeFailure>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Component {
    pub component: String,
    pub signal: String,
    pub received: u64,
    pub sent: u64,
    pub retried: u64,
    /// Items dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_items: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_capacity: Option<u64>,
    /// Requests by outcome (receivers only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct ScrapeFailure {
    pub job: String,
    pub instance: String,
    pub reason: String,
    pub count: u64,
}

/// The status now.
pub fn status(metrics: &Metrics, readiness: &Readiness, node: &str, uptime_seconds: f64) -> Result<Status, String> {
    let mut text = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut text, metrics.registry()).map_err(|e| format!("cannot encode metrics: {e}"))?;
    let (ready, problems) = match readiness.check() {
        Ok(_) => (true, Vec::new()),
        Err(problems) => (false, problems),
    };
    let mut status = from_exposition(&text)?;
    status.version = env!("CARGO_PKG_VERSION");
    status.node = node.to_owned();
    status.uptime_seconds = uptime_seconds;
    status.ready = ready;
    status.problems = problems;
    Ok(status)
}

fn from_exposition(text: &str) -> Result<Status, String> {
    let exposition = parse::parse(text, Format::OpenMetrics).map_err(|e| format!("cannot read the agent's own metrics: {e}"))?;
    let mut components: BTreeMap<(String, String), Component> = BTreeMap::new();
    let mut scrape_failures = Vec::new();
    for sample in &exposition.samples {
        let labels: BTreeMap<&str, &str> = exposition.labels_of(sample).iter().map(|l| (l.name, l.value.as_ref())).collect();
        let value = if sample.value.is_finite() && sample.value > 0.0 { sample.value as u64 } else { 0 };
        let label = |name: &str| labels.get(name).copied().unwrap_or("").to_owned();
        if sample.name == "periscope_scrape_failures_total" {
            scrape_failures.push(ScrapeFailure { job: label("job"), instance: label("instance"), reason: label("reason"), count: value });
            continue;
        }
        let field = match sample.name {
            "periscope_received_items_total" | "periscope_sent_items_total" | "periscope_retried_items_total"
            | "periscope_dropped_items_total" | "periscope_queue_items" | "periscope_queue_capacity_items"
            | "periscope_receiver_requests_total" => sample.name,
            _ => continue,
        };
        let key = (label("component"), label("signal"));
        let component = components
            .entry(key.clone())
            .or_insert_with(|| Component { component: key.0, signal: key.1, ..Default::default() });
        match field {
            "periscope_received_items_total" => component.received += value,
            "periscope_sent_items_total" => component.sent += value,
            "periscope_retried_items_total" => component.retried += value,
            "periscope_dropped_items_total" => *component.dropped.entry(label("reason")).or_default() += value,
            "periscope_queue_items" => component.queue_items = Some(value),
            "periscope_queue_capacity_items" => component.queue_capacity = Some(value),
            _ => *component.requests.entry(label("outcome")).or_default() += value,
        }
    }
    Ok(Status { components: components.into_values().collect(), scrape_failures, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::Signal;

    #[test]
    fn components_add_up_what_the_self_metrics_say() {
        let metrics = Metrics::new();
        let jaeger = metrics.component("jaeger", Signal::Traces);
        jaeger.received.inc_by(10);
        jaeger.sent.inc_by(7);
        jaeger.retried.inc_by(2);
        jaeger.dropped("permanent", 3);
        jaeger.dropped("permanent", 1);
        let receiver = metrics.receiver("otlp_http", Signal::Traces);
        receiver.received.inc_by(10);
        receiver.request("ok");
        receiver.request("ok");
        receiver.request("malformed");
        metrics.scrapes().failure("feed", "127.0.0.1:9100", "timeout");
        let readiness = Readiness::default();
        let pending = readiness.register("exporters.jaeger");

        let status = status(&metrics, &readiness, "node-1", 1.5).unwrap();
        assert!(!status.ready);
        assert_eq!(status.problems.len(), 1, "{:?}", status.problems);
        let of = |name: &str| status.components.iter().find(|c| c.component == name && c.signal == "traces").unwrap();
        let exporter = of("jaeger");
        assert_eq!((exporter.received, exporter.sent, exporter.retried), (10, 7, 2));
        assert_eq!(exporter.dropped, BTreeMap::from([("permanent".to_owned(), 4)]));
        assert!(exporter.queue_capacity.is_some());
        let intake = of("otlp_http");
        assert_eq!(intake.received, 10);
        assert_eq!(intake.requests, BTreeMap::from([("malformed".to_owned(), 1), ("ok".to_owned(), 2)]));
        assert_eq!(
            status.scrape_failures,
            [ScrapeFailure { job: "feed".into(), instance: "127.0.0.1:9100".into(), reason: "timeout".into(), count: 1 }]
        );
        pending.ready();
        assert!(super::status(&metrics, &readiness, "node-1", 2.0).unwrap().ready);
    }
}
