//! The example `checkout` service beside a real agent, loaded by `loadgen`: every way the
//! service is instrumented must show up where the agent puts it, with the counts `loadgen`
//! reports — its trace spans as the handler's execution path and the service graph, its
//! OpenTelemetry metrics and its scraped Prometheus metrics on the pull endpoint, its JSON
//! log lines at a Loki stand-in with their trace ids, and its CPU profile through the agent.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use periscope_e2e::loki::Loki;
use periscope_e2e::{free_port, Agent, Metrics, DEADLINE, POLL_INTERVAL};
use serde_json::Value;

/// A child process killed (and reaped) when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < DEADLINE, "{what} did not happen within {DEADLINE:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn step<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
    node["children"].as_array()?.iter().find(|c| c["name"] == name)
}

fn config(admin: u16, otlp: u16, pull: u16, service: u16, logs: &Path, loki: &Loki) -> String {
    let mut y = String::new();
    let _ = writeln!(y, "node_name: example-node");
    let _ = writeln!(y, "server: {{ listen: 127.0.0.1:{admin} }}");
    let _ = writeln!(y, "sources:");
    let _ = writeln!(y, "  otlp: {{ grpc: null, http: 127.0.0.1:{otlp} }}");
    let _ = writeln!(y, "  host_metrics: {{ enabled: false }}");
    let _ = writeln!(y, "  prometheus:");
    let _ = writeln!(y, "    scrape_interval: 500ms");
    let _ = writeln!(y, "    scrape_timeout: 400ms");
    let _ = writeln!(y, "    static_targets: [ {{ job: checkout, url: \"http://127.0.0.1:{service}/metrics\" }} ]");
    let _ = writeln!(y, "  logs:");
    let _ = writeln!(y, "    - {{ include: [\"{}/*.log\"], format: json, labels: {{ job: checkout }} }}", logs.display());
    let _ = writeln!(y, "  pprof:");
    let _ = writeln!(y, "    targets: [ {{ name: checkout, url: \"http://127.0.0.1:{service}/debug/pprof/profile\" }} ]");
    let _ = writeln!(y, "paths: {{ enabled: true, trace_timeout: 500ms }}");
    let _ = writeln!(y, "exporters:");
    let _ = writeln!(y, "  prometheus: {{ listen: 127.0.0.1:{pull} }}");
    let _ = writeln!(y, "  loki:");
    for line in loki.exporter_config(&[]).lines() {
        let _ = writeln!(y, "    {line}");
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instrumented_service_shows_up_in_every_signal_the_agent_collects() {
    let loki = Loki::start().await;
    let (admin, otlp, pull, service) = (free_port(), free_port(), free_port(), free_port());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let agent = Agent::start(&config(admin, otlp, pull, service, dir.path(), &loki)).await;

    // The service writes its log lines to standard output, which goes to a file the agent
    // tails, as a container runtime would do with it.
    let log = dir.path().join("checkout.log");
    let stdout = std::fs::File::create(&log).expect("the service's log file");
    let _checkout = Process(
        Command::new(env!("CARGO_BIN_EXE_checkout"))
            .args(["--listen", &format!("127.0.0.1:{service}"), "--otlp", &format!("http://127.0.0.1:{otlp}")])
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start checkout"),
    );
    wait_until("the service listening", async || std::fs::read_to_string(&log).ok().filter(|l| l.contains("listening on")).map(|_| ())).await;

    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["--target", &format!("http://127.0.0.1:{service}"), "--rate", "50", "--requests", "60"])
            .output()
            .expect("cannot run loadgen")
    })
    .await
    .expect("the loadgen task");
    assert!(output.status.success(), "loadgen: {}", String::from_utf8_lossy(&output.stderr));
    let counts: BTreeMap<String, u64> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once('=').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect();
    assert_eq!(counts["failed"], 0, "{counts:?}");
    let (created, declined, carts) = (counts["checkouts_created"], counts["checkouts_declined"], counts["carts"]);
    let checkouts = created + declined;
    assert_eq!(checkouts + carts, 60, "{counts:?}");

    // Traces: the handler's execution path, every request counted.
    let tree = wait_until("every checkout analysed", async || {
        let (status, body) = agent.get("/api/v1/paths/tree?service=checkout&handler=POST%20/api/checkout").await;
        let tree: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && tree["traces"] == checkouts).then_some(tree)
    })
    .await;
    let names: Vec<&str> = tree["root"]["children"].as_array().expect("children").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["auth", "checkout_handler"], "{tree:#}");
    let handler = step(&tree["root"], "checkout_handler").expect("the handler");
    for (name, count) in [("SELECT carts", checkouts), ("payments.charge", checkouts), ("INSERT orders", created)] {
        assert_eq!(step(handler, name).map(|s| s["count"].clone()), Some(count.into()), "{name}: {handler:#}");
    }
    if declined > 0 {
        let charge = step(handler, "payments.charge").expect("the charge");
        let rate = charge["error_rate"].as_f64().expect("error_rate");
        // The API rounds rates to four decimals.
        assert!((rate - declined as f64 / checkouts as f64).abs() < 1e-4, "declined charges are errors: {charge:#}");
    }

    // Metrics: scraped from the service, sent by its SDK, and derived from its spans.
    let pull_url = format!("http://127.0.0.1:{pull}/metrics");
    let metrics = wait_until("the service's metrics", async || {
        let m = Metrics::scrape(&pull_url).await;
        let orders = m.lookup("checkout_orders_total", &[("job", "checkout")]).unwrap_or(0.0);
        let durations = m.lookup("http_server_request_duration_seconds_count", &[("job", "shop/checkout")]).unwrap_or(0.0);
        (orders == created as f64 && durations == 60.0).then_some(m)
    })
    .await;
    assert_eq!(metrics.lookup("checkout_cart_items_count", &[("job", "checkout")]), Some(created as f64));
    assert_eq!(metrics.lookup("up", &[("job", "checkout")]), Some(1.0));
    assert_eq!(
        metrics.lookup("traces_service_graph_request_total", &[("client", "checkout"), ("server", "payments")]),
        Some(checkouts as f64),
        "{}",
        metrics.text()
    );

    // Logs: every request's line, with the trace id of its spans.
    let entries = wait_until("every log line at Loki", async || {
        let entries: Vec<_> = loki.entries().into_iter().filter(|e| e.meta("trace_id").is_some()).collect();
        (entries.len() as u64 == 60).then_some(entries)
    })
    .await;
    assert!(entries.iter().all(|e| e.label("job") == Some("checkout")));
    assert!(entries.iter().all(|e| e.meta("trace_id").is_some_and(|t| t.len() == 32)));

    // A CPU profile of the service, pulled by the agent.
    let (status, body) = agent.get("/debug/pprof/profile?target=checkout&seconds=1&format=folded").await;
    assert_eq!(status, 200, "{body}");
}

#[test]
fn the_example_agent_config_is_valid() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("periscope.yaml");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let exited = periscope_e2e::run_to_exit(&["validate", "--config", &config.display().to_string()], dir.path(), &[]);
    assert!(exited.status.success(), "{}{}", exited.stdout, exited.stderr);
}
