//! The demo, the status API and the web UI, end to end.
//!
//! `periscope demo` must, within seconds, show the `feed` service's handlers with their
//! execution paths, span metrics, the service graph, OTLP metrics on the pull endpoint, and
//! its JSON logs (with trace ids as structured metadata) at a Loki stand-in — everything
//! the agent derives from the workload it sends to its own receivers. `GET /api/v1/status`
//! must count exactly what was sent. The web UI is loaded in a real headless Chromium
//! (Debian's `chromium`, which `scripts/test` installs), and the DOM it built from the API
//! is checked: pipelines, handlers, a chosen handler's steps and variants, and telemetry
//! that looks like markup shown as text.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use periscope_e2e::loki::Loki;
use periscope_e2e::{free_port, otlp, Agent, Metrics, DEADLINE, POLL_INTERVAL};
use serde_json::Value;

const NODE: &str = "ui-node";

struct Ports {
    admin: u16,
    otlp_http: u16,
    pull: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports { admin: free_port(), otlp_http: free_port(), pull: free_port() }
    }
}

/// A config with the OTLP/HTTP receiver, quick execution paths and the pull endpoint, and
/// `extra` exporters.
fn config(ports: &Ports, data_dir: Option<&std::path::Path>, extra: &str) -> String {
    let mut y = String::new();
    let _ = writeln!(y, "node_name: {NODE}");
    if let Some(dir) = data_dir {
        let _ = writeln!(y, "data_dir: {}", serde_json::to_string(&dir.display().to_string()).expect("a string"));
    }
    let _ = writeln!(y, "shutdown_timeout: 3s");
    let _ = writeln!(y, "server: {{ listen: 127.0.0.1:{} }}", ports.admin);
    let _ = writeln!(y, "sources:");
    let _ = writeln!(y, "  otlp: {{ grpc: null, http: 127.0.0.1:{} }}", ports.otlp_http);
    let _ = writeln!(y, "  host_metrics: {{ enabled: false }}");
    let _ = writeln!(y, "paths: {{ enabled: true, trace_timeout: 500ms }}");
    let _ = writeln!(y, "exporters:");
    let _ = writeln!(y, "  prometheus: {{ listen: 127.0.0.1:{} }}", ports.pull);
    y.push_str(extra);
    y
}

async fn get_json(agent: &Agent, path: &str) -> (u16, Value) {
    let (status, body) = agent.get(path).await;
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {body}"));
    (status, value)
}

/// Polls `GET path` until `condition` holds for its JSON; returns that JSON.
async fn wait_json(agent: &Agent, path: &str, what: &str, condition: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (status, value) = get_json(agent, path).await;
        if status == 200 && condition(&value) {
            return value;
        }
        if started.elapsed() > DEADLINE {
            panic!("GET {path} never showed {what} within {DEADLINE:?}; last answer {status}: {value:#}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn has_handler(list: &Value, service: &str, handler: &str) -> bool {
    list.as_array().is_some_and(|handlers| handlers.iter().any(|h| h["service"] == service && h["handler"] == handler))
}

/// The step named `name` anywhere under `node`.
fn find_step<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
    if node["name"] == name {
        return Some(node);
    }
    node["children"].as_array()?.iter().find_map(|child| find_step(child, name))
}

fn child_names(node: &Value) -> Vec<&str> {
    node["children"].as_array().map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect()).unwrap_or_default()
}

async fn pull(ports: &Ports) -> Metrics {
    Metrics::scrape(&format!("http://127.0.0.1:{}/metrics", ports.pull)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_handler_paths_span_metrics_service_graph_metrics_and_logs() {
    let loki = Loki::start().await;
    let ports = Ports::new();
    let data = tempfile::tempdir().expect("a temporary directory");
    let exporter: String = loki.exporter_config(&[]).lines().map(|l| format!("    {l}\n")).collect();
    let mut agent = Agent::start_demo(&config(&ports, Some(data.path()), &format!("  loki:\n{exporter}")), 50).await;

    let handlers = [("feed", "GET /api/feed/v4"), ("feed", "POST /api/comment"), ("feed", "GET /api/profile/{id}"), ("users", "GET /users/{id}")];
    wait_json(&agent, "/api/v1/paths", "every handler of the demo", |list| {
        handlers.iter().all(|(service, handler)| has_handler(list, service, handler))
    })
    .await;

    // The feed handler: middleware in order, then the handler and what it calls.
    let (status, tree) = get_json(&agent, "/api/v1/paths/tree?service=feed&handler=GET%20/api/feed/v4").await;
    assert_eq!(status, 200, "{tree}");
    assert_eq!(child_names(&tree["root"])[..4], ["auth", "rate_limit", "metrics", "feed_v4_handler"], "{tree:#}");
    let handler = find_step(&tree["root"], "feed_v4_handler").expect("the handler step");
    for call in ["redis.get", "render"] {
        assert!(child_names(handler).contains(&call), "no {call} under the handler: {handler:#}");
    }
    assert!(tree["variants"].as_array().is_some_and(|v| v.len() >= 2), "cache hits and misses are variants: {tree:#}");
    // The N+1 query of the profile handler is one step called several times per trace.
    let profile = wait_json(&agent, "/api/v1/paths/tree?service=feed&handler=GET%20/api/profile/%7Bid%7D", "the avatars query", |t| {
        find_step(&t["root"], "SELECT avatars").is_some()
    })
    .await;
    let avatars = find_step(&profile["root"], "SELECT avatars").expect("the avatars query");
    let calls = avatars["calls_per_trace"].as_f64().expect("calls_per_trace");
    assert!((2.0..=8.0).contains(&calls), "SELECT avatars is called 2 to 8 times per trace, not {calls}");

    // Span metrics, the service graph and the workload's own OTLP metrics, on the pull endpoint.
    let started = Instant::now();
    let metrics = loop {
        let metrics = pull(&ports).await;
        let ready = metrics.lookup("traces_service_graph_request_total", &[("client", "feed"), ("server", "users")]).is_some()
            && metrics.lookup("http_server_request_duration_seconds_count", &[("job", "demo/feed")]).is_some();
        if ready {
            break metrics;
        }
        assert!(started.elapsed() < DEADLINE, "the pull endpoint lacks the demo's series:\n{}", metrics.text());
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    assert!(metrics.metric_value("traces_span_metrics_calls_total", &[("service_name", "feed"), ("span_name", "auth")]) > 0.0);
    assert!(metrics.metric_value("periscope_path_traces_total", &[("service", "feed"), ("handler", "GET /api/feed/v4")]) > 0.0);
    assert!(metrics.metric_value("feed_cache_lookups_total", &[("result", "hit")]) > 0.0, "{}", metrics.text());

    // Logs: the JSON lines reach Loki with their trace ids as structured metadata.
    let entry = loki.wait_for_line("a demo log line", |line| line.contains("\"service\":\"feed\"")).await;
    assert_eq!(entry.label("job"), Some("demo"));
    let trace_id = entry.meta("trace_id").expect("trace_id in structured metadata");
    assert!(trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()), "{trace_id:?}");
    assert!(data.path().join("demo/feed.log").exists());
    assert!(loki.problems().is_empty(), "Loki's rules were broken: {:?}", loki.problems());

    let status = agent.stop().await;
    assert!(status.success(), "the demo exited with {status}:\n{}", agent.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_api_counts_exactly_what_was_received_and_sent() {
    let ports = Ports::new();
    let agent = Agent::start(&config(&ports, None, "")).await;
    let (status, body) = get_json(&agent, "/api/v1/status").await;
    assert_eq!(status, 200);
    assert_eq!(body["ready"], true, "{body:#}");
    assert_eq!(body["node"], NODE);
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));

    let url = format!("http://127.0.0.1:{}/v1/traces", ports.otlp_http);
    for seed in 1..=3 {
        let answer = otlp::post_protobuf(&url, &otlp::trace_request("checkout", seed, 4)).await;
        assert_eq!(answer.status, 200, "{}", answer.body_text());
    }
    let answer = otlp::post(&url, "application/x-protobuf", None, b"\xff\xff not protobuf".to_vec()).await;
    assert_eq!(answer.status, 400);
    let component = |body: &Value, name: &str| -> Value {
        body["components"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["component"] == name && c["signal"] == "traces").cloned())
            .unwrap_or(Value::Null)
    };
    let body = wait_json(&agent, "/api/v1/status", "12 spans analysed", |b| component(b, "paths")["sent"] == 12).await;
    let receiver = component(&body, "otlp_http");
    assert_eq!(receiver["received"], 12, "{body:#}");
    assert_eq!(receiver["requests"]["ok"], 3, "{body:#}");
    assert_eq!(receiver["requests"]["malformed"], 1, "{body:#}");
    let paths = component(&body, "paths");
    assert_eq!(paths["received"], 12, "{body:#}");
    assert!(paths["queue_capacity"].as_u64().is_some_and(|c| c > 0), "{body:#}");
    // The same figures as /metrics.
    let own = agent.metrics().await;
    assert_eq!(own.metric_value("periscope_received_items_total", &[("component", "otlp_http"), ("signal", "traces")]), 12.0);
}

/// Debian's Chromium, headless, as `scripts/test` installs it.
fn chromium() -> PathBuf {
    for path in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(path).exists() {
            return PathBuf::from(path);
        }
    }
    panic!("no Chromium: install Debian's chromium package (scripts/test does)");
}

/// The DOM of `url` once its scripts have run (and fetched what they fetch).
fn rendered_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("a temporary directory");
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("cannot run chromium");
    assert!(output.status.success(), "chromium failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the element carrying `attribute` (`data-step="auth"`): what follows the tag.
fn element<'a>(dom: &'a str, attribute: &str) -> Option<&'a str> {
    let at = dom.find(attribute)?;
    let rest = &dom[at..];
    let end = rest.find("</tr>").or_else(|| rest.find("</li>")).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_shows_pipelines_handlers_and_a_chosen_path_and_shows_telemetry_as_text() {
    let ports = Ports::new();
    let data = tempfile::tempdir().expect("a temporary directory");
    let agent = Agent::start_demo(&config(&ports, Some(data.path()), ""), 50).await;
    // A handler whose name looks like markup, sent as any service would.
    let url = format!("http://127.0.0.1:{}/v1/traces", ports.otlp_http);
    let mut request = otlp::trace_request("<b>evil</b>", 9, 1);
    let span = &mut request.resource_spans[0].scope_spans[0].spans[0];
    span.name = "<img src=x onerror=alert(1)>".into();
    span.attributes.clear();
    let answer = otlp::post_protobuf(&url, &request).await;
    assert_eq!(answer.status, 200, "{}", answer.body_text());
    wait_json(&agent, "/api/v1/paths", "the demo's and the odd handlers", |list| {
        has_handler(list, "feed", "GET /api/feed/v4") && list.as_array().is_some_and(|l| l.iter().any(|h| h["service"] == "<b>evil</b>"))
    })
    .await;
    wait_json(&agent, "/api/v1/paths/tree?service=feed&handler=GET%20/api/feed/v4", "the handler's steps", |t| {
        find_step(&t["root"], "redis.get").is_some()
    })
    .await;

    let page = agent.url("/#service=feed&handler=GET+%2Fapi%2Ffeed%2Fv4");
    let dom = tokio::task::spawn_blocking(move || rendered_dom(&page)).await.expect("the browser task");
    assert!(dom.contains(r#"id="ready-state">ready<"#), "the ready badge:\n{dom}");
    assert!(dom.contains(&format!("node {NODE}")), "the node name:\n{dom}");
    let receiver = element(&dom, r#"data-component="otlp_http" data-signal="traces""#).expect("the OTLP/HTTP traces row");
    assert!(receiver.contains("<td class=\"num\">"), "{receiver}");
    for (service, handler) in [("feed", "GET /api/feed/v4"), ("feed", "POST /api/comment"), ("users", "GET /users/{id}")] {
        let row = element(&dom, &format!(r#"data-service="{service}" data-handler="{handler}""#));
        assert!(row.is_some(), "no row for {service} {handler}:\n{dom}");
    }
    assert!(dom.contains("feed: GET /api/feed/v4"), "the chosen handler's title:\n{dom}");
    for step in ["GET /api/feed/v4", "auth", "rate_limit", "metrics", "feed_v4_handler", "redis.get"] {
        assert!(element(&dom, &format!(r#"data-step="{step}""#)).is_some(), "no step {step}:\n{dom}");
    }
    assert!(dom.contains("data-variant="), "no variants:\n{dom}");
    // Markup in telemetry is text: escaped in the DOM, never an element.
    assert!(dom.contains("&lt;b&gt;evil&lt;/b&gt;"), "the odd service name as text:\n{dom}");
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "the odd handler name as text:\n{dom}");
    assert!(!dom.contains("<td><b>") && !dom.contains("<img src=\"x\""), "telemetry became markup:\n{dom}");
}
