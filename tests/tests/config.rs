//! The command line and the config file: `validate` names the key path and line of each
//! problem, `print-config` shows the effective config with variables substituted, `--version`,
//! and a port that cannot be bound ends `run` with a one-line error instead of a panic.

use std::net::TcpListener;
use std::path::Path;

use periscope_e2e::{run_to_exit, Exited, TestConfig};

/// A config using every key the tests rely on.
const GOOD: &str = r#"node_name: test-node
data_dir: ./data
shutdown_timeout: 5s
server: { listen: 127.0.0.1:18686 }
log: { format: json }
sources:
  otlp:
    grpc: 127.0.0.1:14317
    http: null
    max_request_size: 1MiB
  host_metrics: { enabled: false }
paths: { enabled: false }
exporters:
  jaeger:
    endpoint: http://127.0.0.1:24317
    protocol: grpc
    compression: gzip
    headers: { x-tenant: acme }
    timeout: 5s
    batch: { max_spans: 512, timeout: 100ms }
    retry: { initial_interval: 50ms, max_interval: 500ms, max_elapsed_time: 60s }
    queue: { max_spans: 100000 }
"#;

fn write(dir: &Path, name: &str, yaml: &str) -> String {
    std::fs::write(dir.join(name), yaml).expect("write the config");
    name.to_owned()
}

fn validate(yaml: &str, env: &[(&str, &str)]) -> Exited {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "periscope.yaml", yaml);
    run_to_exit(&["validate", "--config", &file], dir.path(), env)
}

fn print_config(yaml: &str, env: &[(&str, &str)]) -> Exited {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "periscope.yaml", yaml);
    run_to_exit(&["print-config", "--config", &file], dir.path(), env)
}

/// `yaml` with the line that starts with `prefix` (after indentation) replaced by `line`,
/// and that line's number (1-based).
fn with_line(yaml: &str, prefix: &str, line: &str) -> (String, usize) {
    let mut number = None;
    let lines: Vec<String> = yaml
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if number.is_none() && l.trim_start().starts_with(prefix) {
                number = Some(i + 1);
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}{line}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    (lines.join("\n") + "\n", number.unwrap_or_else(|| panic!("no line starts with {prefix:?}")))
}

/// `validate` refuses the config with exit code 1, on stderr, naming `path` and the line.
fn assert_refused(exited: &Exited, path: &str, line: usize) {
    assert_eq!(exited.status.code(), Some(1), "exit status; stderr:\n{}", exited.stderr);
    let error_line = exited
        .stderr
        .lines()
        .find(|l| l.contains(path))
        .unwrap_or_else(|| panic!("no error names {path:?}; stderr:\n{}", exited.stderr));
    assert!(error_line.contains(&format!("line {line}")), "the error should name line {line}: {error_line:?}");
    assert!(!exited.stderr.contains("panicked"), "{}", exited.stderr);
}

#[test]
fn validate_accepts_a_good_config() {
    let exited = validate(GOOD, &[]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    let exited = validate(&TestConfig::new().jaeger("endpoint: http://127.0.0.1:4317\n").yaml(), &[]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
}

#[test]
fn validate_names_an_unknown_key_and_its_line() {
    let (yaml, line) = with_line(GOOD, "protocol:", "protocl: grpc");
    assert_refused(&validate(&yaml, &[]), "exporters.jaeger.protocl", line);
    let (yaml, line) = with_line(GOOD, "data_dir:", "data_directory: ./data");
    assert_refused(&validate(&yaml, &[]), "data_directory", line);
}

#[test]
fn validate_names_a_value_of_the_wrong_type() {
    let (yaml, line) = with_line(GOOD, "headers:", "headers: [x-tenant, acme]");
    assert_refused(&validate(&yaml, &[]), "exporters.jaeger.headers", line);
    let (yaml, line) = with_line(GOOD, "host_metrics:", "host_metrics: { enabled: maybe }");
    assert_refused(&validate(&yaml, &[]), "sources.host_metrics.enabled", line);
}

#[test]
fn validate_names_a_bad_duration() {
    let (yaml, line) = with_line(GOOD, "timeout: 5s", "timeout: 5 parsecs");
    assert_refused(&validate(&yaml, &[]), "exporters.jaeger.timeout", line);
    let (yaml, line) = with_line(GOOD, "shutdown_timeout:", "shutdown_timeout: soon");
    assert_refused(&validate(&yaml, &[]), "shutdown_timeout", line);
}

#[test]
fn validate_names_a_bad_size() {
    let (yaml, line) = with_line(GOOD, "max_request_size:", "max_request_size: lots");
    assert_refused(&validate(&yaml, &[]), "sources.otlp.max_request_size", line);
}

#[test]
fn validate_names_an_invalid_protocol() {
    let (yaml, line) = with_line(GOOD, "protocol:", "protocol: carrier-pigeon");
    assert_refused(&validate(&yaml, &[]), "exporters.jaeger.protocol", line);
}

#[test]
fn validate_names_an_unset_variable() {
    let (yaml, _) = with_line(GOOD, "endpoint:", "endpoint: http://${PERISCOPE_E2E_UNSET_HOST}:4317");
    let exited = validate(&yaml, &[]);
    assert_eq!(exited.status.code(), Some(1), "stderr:\n{}", exited.stderr);
    assert!(
        exited.stderr.contains("PERISCOPE_E2E_UNSET_HOST"),
        "the error should name the variable:\n{}",
        exited.stderr
    );
    // Set, the same file is fine.
    let exited = validate(&yaml, &[("PERISCOPE_E2E_UNSET_HOST", "collector")]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
}

#[test]
fn validate_names_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exited = run_to_exit(&["validate", "--config", "nowhere.yaml"], dir.path(), &[]);
    assert_eq!(exited.status.code(), Some(1), "stderr:\n{}", exited.stderr);
    assert!(exited.stderr.contains("nowhere.yaml"), "{}", exited.stderr);
    assert!(!exited.stderr.contains("panicked"), "{}", exited.stderr);
}

#[test]
fn print_config_substitutes_variables_and_defaults() {
    let (yaml, _) = with_line(GOOD, "node_name:", "node_name: ${PERISCOPE_E2E_NODE:-fallback-node}");
    let (yaml, _) = with_line(&yaml, "endpoint:", "endpoint: http://${PERISCOPE_E2E_HOST}:4317");

    let exited = print_config(&yaml, &[("PERISCOPE_E2E_HOST", "collector.internal")]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    assert!(exited.stdout.lines().any(|l| l.trim() == "node_name: fallback-node"), "{}", exited.stdout);
    assert!(exited.stdout.contains("http://collector.internal:4317"), "{}", exited.stdout);
    assert!(!exited.stdout.contains("${"), "{}", exited.stdout);

    let exited =
        print_config(&yaml, &[("PERISCOPE_E2E_HOST", "collector.internal"), ("PERISCOPE_E2E_NODE", "from-env")]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    assert!(exited.stdout.lines().any(|l| l.trim() == "node_name: from-env"), "{}", exited.stdout);
}

#[test]
fn print_config_fills_in_defaults_and_is_itself_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exited = print_config("node_name: tiny\nexporters:\n  jaeger: {}\n", &[]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    // Defaults of the contract, filled in.
    for default in ["127.0.0.1:4317", "127.0.0.1:4318", "127.0.0.1:8686", "protocol: grpc", "node_name: tiny"] {
        assert!(exited.stdout.contains(default), "missing {default:?}:\n{}", exited.stdout);
    }
    let file = write(dir.path(), "effective.yaml", &exited.stdout);
    let revalidated = run_to_exit(&["validate", "--config", &file], dir.path(), &[]);
    assert_eq!(revalidated.status.code(), Some(0), "print-config's output is refused:\n{}", revalidated.stderr);
}

#[test]
fn print_config_without_a_file_prints_the_embedded_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exited = run_to_exit(&["print-config"], dir.path(), &[]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    for default in ["127.0.0.1:4317", "127.0.0.1:4318", "127.0.0.1:8686", "127.0.0.1:9464"] {
        assert!(exited.stdout.contains(default), "missing {default:?}:\n{}", exited.stdout);
    }
}

#[test]
fn print_config_reads_periscope_config_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "from-env.yaml", "node_name: named-by-env-file\n");
    let exited = run_to_exit(&["print-config"], dir.path(), &[("PERISCOPE_CONFIG", &file)]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    assert!(exited.stdout.lines().any(|l| l.trim() == "node_name: named-by-env-file"), "{}", exited.stdout);
}

#[test]
fn version_is_printed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exited = run_to_exit(&["--version"], dir.path(), &[]);
    assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
    assert_eq!(exited.stdout.trim(), format!("periscope {}", env!("CARGO_PKG_VERSION")));
}

/// `run` with one of its listeners on a port that another process holds.
fn run_with_port_taken(which: &str) {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").port();
    let mut config = TestConfig::new();
    match which {
        "server.listen" => config.admin_port = taken,
        "sources.otlp.grpc" => config.grpc_port = taken,
        _ => config.http_port = taken,
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "periscope.yaml", &config.yaml());
    let exited = run_to_exit(&["run", "--config", &file], dir.path(), &[]);

    assert!(!exited.status.success(), "{which}: the agent ran on a taken port; stderr:\n{}", exited.stderr);
    assert!(!exited.stderr.contains("panicked"), "{which}: a panic instead of an error:\n{}", exited.stderr);
    assert!(!exited.stderr.contains("stack backtrace"), "{which}:\n{}", exited.stderr);
    // The last thing printed is the whole error, on one line, naming the address.
    let last = exited.stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.contains(&format!("127.0.0.1:{taken}")), "{which}: the error should name the address: {last:?}");
    drop(holder);
}

#[test]
fn run_on_a_taken_admin_port_fails_with_one_line() {
    run_with_port_taken("server.listen");
}

#[test]
fn run_on_a_taken_grpc_port_fails_with_one_line() {
    run_with_port_taken("sources.otlp.grpc");
}

#[test]
fn run_on_a_taken_http_port_fails_with_one_line() {
    run_with_port_taken("sources.otlp.http");
}
