//! The Kubernetes deployment of `deploy/` against the agent it deploys.
//!
//! A DaemonSet and its config must agree on many small things that no cluster is here to
//! check: the config has to pass the agent's own `validate` with the variables the pod sets,
//! every listener must be a declared container port, the probes must reach the admin server,
//! every path the config reads or writes must be mounted (the root filesystem is read-only),
//! the grace period must outlast the agent's flush at shutdown, and the service account may
//! do exactly what pod discovery needs. Every manifest must also be a valid object of the
//! Kubernetes 1.30 API, checked against the published OpenAPI schemas by the PyPI package
//! `kubernetes-validate` (installed with pip into `target/e2e-python` when missing), whose
//! PyYAML also turns the YAML into JSON for these tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use periscope_e2e::{run_to_exit, Exited};
use serde_json::Value;

/// The Kubernetes version the manifests must be valid for.
const KUBERNETES_VERSION: &str = "1.30.0";

/// The node name the tests give the config, as the downward API would.
const NODE: &str = "deploy-test-node";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubernetes_dir() -> PathBuf {
    repository().join("deploy").join("kubernetes")
}

// ---------------------------------------------------------------------------------------
// Python: kubernetes-validate, and PyYAML to read YAML
// ---------------------------------------------------------------------------------------

/// Makes `kubernetes_validate` (and the PyYAML it depends on) importable, installing it
/// with pip the first time; once per test process, so that tests running in parallel do not
/// install into the same folder at once.
fn ensure_kubernetes_validate() -> &'static Path {
    static INSTALLED: OnceLock<PathBuf> = OnceLock::new();
    INSTALLED.get_or_init(|| periscope_e2e::python::ensure("kubernetes_validate, yaml", "kubernetes-validate"))
}

fn python() -> Command {
    let mut command = Command::new("python3");
    command.env("PYTHONPATH", ensure_kubernetes_validate());
    command
}

/// The documents of a YAML stream as JSON (empty documents left out), read by PyYAML's
/// safe loader: YAML 1.1, as Kubernetes' own YAML reader takes it.
fn yaml_documents(yaml: &str, what: &str) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = [d for d in yaml.safe_load_all(sys.stdin.read()) if d is not None]\n\
        json.dump(docs, sys.stdout, default=str)\n";
    let mut child = python()
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run python3");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("python3's stdin");
        stdin.write_all(yaml.as_bytes()).expect("cannot write to python3");
    }
    let output = child.wait_with_output().expect("python3 did not finish");
    assert!(output.status.success(), "{what} is not valid YAML: {}", String::from_utf8_lossy(&output.stderr));
    match serde_json::from_slice(&output.stdout) {
        Ok(Value::Array(docs)) => docs,
        other => panic!("{what}: unexpected conversion result {other:?}"),
    }
}

fn yaml_file(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    yaml_documents(&text, &path.display().to_string())
}

// ---------------------------------------------------------------------------------------
// The manifests
// ---------------------------------------------------------------------------------------

/// One object of the deployment and the file it is in.
struct Object {
    file: String,
    json: Value,
}

fn kustomization() -> Value {
    let docs = yaml_file(&kubernetes_dir().join("kustomization.yaml"));
    assert_eq!(docs.len(), 1, "kustomization.yaml should be one document");
    docs.into_iter().next().unwrap_or_default()
}

/// The files `kustomization.yaml` lists under `resources`.
fn resource_files() -> Vec<String> {
    kustomization()["resources"]
        .as_array()
        .expect("kustomization.yaml has no resources list")
        .iter()
        .map(|r| r.as_str().expect("a resource is not a string").to_owned())
        .collect()
}

/// Every object `kubectl apply -k deploy/kubernetes` applies, read once per test process.
fn objects() -> &'static [Object] {
    static OBJECTS: OnceLock<Vec<Object>> = OnceLock::new();
    OBJECTS.get_or_init(|| {
        let mut objects = Vec::new();
        for file in resource_files() {
            for json in yaml_file(&kubernetes_dir().join(&file)) {
                objects.push(Object { file: file.clone(), json });
            }
        }
        objects
    })
}

fn object(kind: &str) -> &'static Value {
    let found: Vec<&Object> = objects().iter().filter(|o| o.json["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "the deployment should have exactly one {kind}, found {}", found.len());
    &found[0].json
}

fn daemonset() -> &'static Value {
    object("DaemonSet")
}

fn pod_spec() -> &'static Value {
    &daemonset()["spec"]["template"]["spec"]
}

/// The agent's container (the DaemonSet's only one).
fn container() -> &'static Value {
    let containers = pod_spec()["containers"].as_array().expect("the DaemonSet has no containers");
    assert_eq!(containers.len(), 1, "the DaemonSet should run one container, the agent");
    &containers[0]
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// The agent's config as the ConfigMap holds it.
fn config_yaml() -> String {
    let configmap = object("ConfigMap");
    configmap["data"]["periscope.yaml"].as_str().expect("the ConfigMap has no periscope.yaml").to_owned()
}

/// Runs `periscope ARGS --config <the ConfigMap's periscope.yaml>` with `env`.
fn with_config(args: &[&str], env: &[(&str, &str)]) -> Exited {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("periscope.yaml"), config_yaml()).expect("write the config");
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--config", "periscope.yaml"]);
    run_to_exit(&full, dir.path(), env)
}

/// The effective config (`print-config`) of the ConfigMap's file on node [`NODE`].
fn effective_config() -> &'static Value {
    static CONFIG: OnceLock<Value> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let exited = with_config(&["print-config"], &[("NODE_NAME", NODE)]);
        assert_eq!(exited.status.code(), Some(0), "print-config failed; stderr:\n{}", exited.stderr);
        let mut docs = yaml_documents(&exited.stdout, "print-config's output");
        assert_eq!(docs.len(), 1, "print-config should print one document:\n{}", exited.stdout);
        docs.remove(0)
    })
}

/// Every listener of the effective config: key and address.
fn listeners(config: &Value) -> Vec<(&'static str, String)> {
    let mut found = vec![("server.listen", text(&config["server"]["listen"]).to_owned())];
    for (key, value) in [
        ("sources.otlp.grpc", &config["sources"]["otlp"]["grpc"]),
        ("sources.otlp.http", &config["sources"]["otlp"]["http"]),
        ("exporters.prometheus.listen", &config["exporters"]["prometheus"]["listen"]),
    ] {
        if let Some(address) = value.as_str() {
            found.push((key, address.to_owned()));
        }
    }
    found
}

fn port_of(address: &str) -> u16 {
    let (_, port) = address.rsplit_once(':').unwrap_or_else(|| panic!("{address:?} has no port"));
    port.parse().unwrap_or_else(|_| panic!("{address:?} has no numeric port"))
}

/// The container port a probe's or a Service's `port` names: a number or a port's name.
fn container_port(reference: &Value) -> u16 {
    if let Some(number) = reference.as_u64() {
        return u16::try_from(number).expect("a port number above 65535");
    }
    let name = text(reference);
    let port = list(&container()["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port is named {name:?}"));
    u16::try_from(port["containerPort"].as_u64().expect("containerPort is not a number")).expect("port above 65535")
}

/// A duration as the agent writes it (`20s`, `500ms`, `1m 30s`, `2h`).
fn duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let number: u64 = rest[..digits].parse().unwrap_or_else(|_| panic!("not a duration: {text:?}"));
        rest = &rest[digits..];
        let unit = rest.find(|c: char| c.is_ascii_digit() || c == ' ').unwrap_or(rest.len());
        total += match &rest[..unit] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" | "min" => Duration::from_secs(number * 60),
            "h" => Duration::from_secs(number * 3600),
            other => panic!("unknown unit {other:?} in duration {text:?}"),
        };
        rest = rest[unit..].trim_start();
    }
    total
}

/// The directory a glob's matches are under: its part before the first wildcard, up to the
/// last `/`.
fn glob_directory(glob: &str) -> &str {
    let literal = glob.find(['*', '?', '[', '{']).map_or(glob, |i| &glob[..i]);
    literal.rfind('/').map_or("/", |i| if i == 0 { "/" } else { &literal[..i] })
}

/// The container's volume mount that `path` is at or under (the deepest one).
fn mount_of(path: &str) -> Option<&'static Value> {
    let path = Path::new(path);
    list(&container()["volumeMounts"])
        .iter()
        .filter(|m| path.starts_with(text(&m["mountPath"])))
        .max_by_key(|m| text(&m["mountPath"]).len())
}

fn volume(name: &str) -> &'static Value {
    list(&pod_spec()["volumes"])
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("the DaemonSet has no volume {name:?}"))
}

/// The pod's environment variable `name`.
fn env_var(name: &str) -> &'static Value {
    list(&container()["env"])
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("the container does not set {name}"))
}

/// The commented-out Secret of `secret.example.yaml`, uncommented.
fn example_secret_yaml() -> String {
    let path = kubernetes_dir().join("secret.example.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let start = text.find("# apiVersion: v1").expect("secret.example.yaml has no commented `apiVersion: v1` object");
    text[start..]
        .lines()
        .map(|line| line.strip_prefix("# ").or_else(|| line.strip_prefix('#')).unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// ---------------------------------------------------------------------------------------
// The config
// ---------------------------------------------------------------------------------------

#[test]
fn the_configmap_config_passes_validate_with_the_variables_the_pod_sets() {
    let exited = with_config(&["validate"], &[("NODE_NAME", NODE)]);
    assert_eq!(
        exited.status.code(),
        Some(0),
        "validate refused the ConfigMap's periscope.yaml; stderr:\n{}",
        exited.stderr
    );
    // The config really depends on the downward API: without NODE_NAME it is refused.
    let exited = with_config(&["validate"], &[]);
    assert_eq!(exited.status.code(), Some(1), "the config should need NODE_NAME; stderr:\n{}", exited.stderr);
    assert!(exited.stderr.contains("NODE_NAME"), "the error should name NODE_NAME:\n{}", exited.stderr);
}

#[test]
fn the_effective_config_is_a_node_agent_config() {
    let config = effective_config();
    assert_eq!(config["node_name"], NODE);
    assert_eq!(config["data_dir"], "/var/lib/periscope");
    assert_eq!(config["sources"]["prometheus"]["kubernetes_pods"], true, "pod discovery should be on");
    assert_eq!(config["sources"]["host_metrics"]["enabled"], true);
    assert_eq!(config["sources"]["host_metrics"]["root"], "/host");
    let logs = list(&config["sources"]["logs"]);
    assert!(
        logs.iter()
            .any(|group| group["format"] == "cri"
                && list(&group["include"]).iter().any(|g| g == "/var/log/pods/*/*/*.log")),
        "no log group tails /var/log/pods/*/*/*.log as CRI: {logs:?}"
    );
    assert_eq!(config["paths"]["enabled"], true);
    for exporter in ["prometheus", "prometheus_remote_write", "jaeger", "loki"] {
        assert!(config["exporters"][exporter].is_object(), "exporters.{exporter} should be on");
    }
    let listeners = listeners(config);
    assert_eq!(listeners.len(), 4, "server, both OTLP receivers and the pull exporter should listen: {listeners:?}");
    for (key, address) in &listeners {
        assert!(address.starts_with("0.0.0.0:"), "{key} should listen on every interface of the pod, not {address}");
    }
}

#[test]
fn the_auth_token_comes_from_the_environment_the_secret_fills() {
    let printed = |env: &[(&str, &str)]| {
        let exited = with_config(&["print-config"], env);
        assert_eq!(exited.status.code(), Some(0), "stderr:\n{}", exited.stderr);
        yaml_documents(&exited.stdout, "print-config's output").remove(0)
    };
    let with_token = printed(&[("NODE_NAME", NODE), ("PERISCOPE_TOKEN", "s3cret")]);
    assert_eq!(with_token["server"]["auth_token"], "<redacted>", "PERISCOPE_TOKEN should set server.auth_token");
    let without = printed(&[("NODE_NAME", NODE)]);
    assert_eq!(without["server"]["auth_token"], "", "without the Secret, the agent should start with no token");
}

// ---------------------------------------------------------------------------------------
// The DaemonSet against its config
// ---------------------------------------------------------------------------------------

#[test]
fn every_port_the_config_listens_on_is_a_container_port() {
    let ports: BTreeMap<u64, &Value> = list(&container()["ports"])
        .iter()
        .map(|p| (p["containerPort"].as_u64().expect("containerPort is not a number"), p))
        .collect();
    let listened: BTreeSet<u64> = listeners(effective_config()).iter().map(|(_, a)| u64::from(port_of(a))).collect();
    for (key, address) in listeners(effective_config()) {
        let port = u64::from(port_of(&address));
        let declared = ports.get(&port).unwrap_or_else(|| panic!("{key} listens on {port}, which is no containerPort"));
        assert_eq!(declared["protocol"].as_str().unwrap_or("TCP"), "TCP", "{key}: port {port} should be TCP");
        // Services on the node reach the receivers at the node's IP.
        if key.starts_with("sources.otlp.") {
            assert_eq!(declared["hostPort"].as_u64(), Some(port), "{key}: port {port} should have hostPort {port}");
        }
    }
    for port in ports.keys() {
        assert!(listened.contains(port), "containerPort {port} is declared but the config listens on {listened:?}");
    }
}

#[test]
fn the_probes_ask_the_admin_server_for_health_and_readiness() {
    let admin = port_of(text(&effective_config()["server"]["listen"]));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container()[probe]["httpGet"];
        assert!(get.is_object(), "the container has no {probe}.httpGet");
        assert_eq!(get["path"], path, "{probe} should GET {path}");
        assert_eq!(container_port(&get["port"]), admin, "{probe} should reach server.listen's port {admin}");
        assert_eq!(get["scheme"].as_str().unwrap_or("HTTP"), "HTTP", "{probe}: the admin server speaks plain HTTP");
    }
}

#[test]
fn the_daemonset_mounts_every_path_its_config_reads() {
    let config = effective_config();
    // The config file itself: the path `run --config` is given is a key of the mounted ConfigMap.
    let args: Vec<&str> = list(&container()["args"]).iter().map(text).collect();
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .unwrap_or_else(|| panic!("the container's args do not pass --config: {args:?}"));
    assert_eq!(args.first().copied(), Some("run"), "the container should `run` the agent: {args:?}");
    let mount = mount_of(config_path).unwrap_or_else(|| panic!("--config {config_path} is on no volume mount"));
    let source = &volume(text(&mount["name"]))["configMap"];
    assert_eq!(
        source["name"],
        object("ConfigMap")["metadata"]["name"],
        "--config {config_path} should be on the ConfigMap's volume"
    );
    let relative = Path::new(config_path).strip_prefix(text(&mount["mountPath"])).expect("under the mount");
    assert_eq!(relative, Path::new("periscope.yaml"), "--config should name the ConfigMap's periscope.yaml");

    // data_dir is written to, and the root filesystem is read-only.
    let data_dir = text(&config["data_dir"]);
    let mount = mount_of(data_dir).unwrap_or_else(|| panic!("data_dir {data_dir} is on no volume mount"));
    assert_ne!(mount["readOnly"], true, "data_dir {data_dir} must be writable");
    let host_path = &volume(text(&mount["name"]))["hostPath"];
    assert_eq!(host_path["path"], data_dir, "data_dir should be kept on the node at the same path");
    assert_eq!(host_path["type"], "DirectoryOrCreate");

    // The host's root, for /proc and /sys.
    let root = text(&config["sources"]["host_metrics"]["root"]);
    let mount = mount_of(root).unwrap_or_else(|| panic!("host_metrics.root {root} is on no volume mount"));
    assert_eq!(mount["mountPath"], root, "host_metrics.root should be the mount itself");
    assert_eq!(volume(text(&mount["name"]))["hostPath"]["path"], "/", "host_metrics.root should be the node's /");
    assert_eq!(mount["readOnly"], true, "the node's / should be mounted read-only");
    assert_eq!(mount["mountPropagation"], "HostToContainer");

    // Every log glob's directory, from the node at the same path (the kubelet's symlinks in
    // /var/log/containers point there).
    for group in list(&config["sources"]["logs"]) {
        for glob in list(&group["include"]).iter().map(text) {
            let dir = glob_directory(glob);
            let mount = mount_of(dir).unwrap_or_else(|| panic!("log glob {glob}: {dir} is on no volume mount"));
            let mount_path = text(&mount["mountPath"]);
            assert_ne!(mount_path, "/", "log glob {glob} is not mounted");
            assert_eq!(
                volume(text(&mount["name"]))["hostPath"]["path"],
                mount_path,
                "{mount_path} should be the node's {mount_path}"
            );
            assert_eq!(mount["readOnly"], true, "{mount_path} should be read-only");
        }
    }
    for path in ["/var/log/pods", "/var/log/containers"] {
        let mount = mount_of(path).unwrap_or_else(|| panic!("{path} is not mounted"));
        assert_eq!(mount["mountPath"], path);
        assert_eq!(volume(text(&mount["name"]))["hostPath"]["path"], path);
    }

    // Every mount names a volume of the pod.
    for mount in list(&container()["volumeMounts"]) {
        volume(text(&mount["name"]));
    }
}

#[test]
fn the_node_name_comes_from_the_downward_api() {
    let node_name = env_var("NODE_NAME");
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert!(node_name.get("value").is_none(), "NODE_NAME should not be a fixed value");
    assert!(
        config_yaml().lines().any(|l| l.trim() == "node_name: ${NODE_NAME}"),
        "the config should read node_name from NODE_NAME"
    );
}

#[test]
fn the_token_is_read_from_an_optional_secret_that_the_example_creates() {
    let reference = &env_var("PERISCOPE_TOKEN")["valueFrom"]["secretKeyRef"];
    assert_eq!(reference["optional"], true, "the agent should start without the Secret");
    let docs = yaml_documents(&example_secret_yaml(), "the Secret of secret.example.yaml");
    assert_eq!(docs.len(), 1, "secret.example.yaml should hold one commented Secret");
    let secret = &docs[0];
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["metadata"]["name"], reference["name"], "the example Secret should be the one the pod reads");
    assert!(
        secret["stringData"].get(text(&reference["key"])).is_some(),
        "the example Secret should have the key {}",
        reference["key"]
    );
    assert_eq!(secret["metadata"]["namespace"], object("Namespace")["metadata"]["name"]);
    assert!(!resource_files().iter().any(|f| f == "secret.example.yaml"), "the example Secret must not be applied");
}

#[test]
fn the_grace_period_outlasts_the_shutdown_timeout() {
    let shutdown = duration(text(&effective_config()["shutdown_timeout"]));
    // Kubernetes' default when the field is not set.
    let grace = Duration::from_secs(pod_spec()["terminationGracePeriodSeconds"].as_u64().unwrap_or(30));
    assert!(
        grace > shutdown,
        "terminationGracePeriodSeconds ({grace:?}) should exceed shutdown_timeout ({shutdown:?}), or SIGKILL cuts the flush short"
    );
}

#[test]
fn the_agents_run_everywhere_one_per_node_and_roll_out_gradually() {
    let spec = &daemonset()["spec"];
    assert!(
        list(&pod_spec()["tolerations"])
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none() && t.get("effect").is_none()),
        "the pods should tolerate every taint"
    );
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], "10%");
    // With hostPorts and one data directory per node, two agents cannot share a node.
    assert!(
        matches!(spec["updateStrategy"]["rollingUpdate"]["maxSurge"].as_u64(), None | Some(0)),
        "maxSurge must be 0"
    );
    let selector = spec["selector"]["matchLabels"].as_object().expect("the DaemonSet has no matchLabels");
    let labels = &spec["template"]["metadata"]["labels"];
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "the pod template should carry the selector's {key}");
    }
    for (resource, limit) in [("cpu", "limits"), ("memory", "limits"), ("cpu", "requests"), ("memory", "requests")] {
        assert!(container()["resources"][limit][resource].is_string(), "resources.{limit}.{resource} should be set");
    }
}

#[test]
fn the_agent_runs_as_root_without_root_powers() {
    let security = &container()["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_ne!(security["privileged"], true);
    assert_eq!(list(&security["capabilities"]["drop"]), [Value::from("ALL")], "every capability should be dropped");
    for added in list(&security["capabilities"]["add"]) {
        assert_eq!(added, "DAC_READ_SEARCH", "no capability beyond DAC_READ_SEARCH may be added");
    }
    assert_eq!(pod_spec()["hostPID"], false);
    assert_ne!(pod_spec()["hostNetwork"], true);
    // Only data_dir is writable on the node.
    let data_dir = text(&effective_config()["data_dir"]);
    for mount in list(&container()["volumeMounts"]) {
        if mount["mountPath"] != data_dir {
            assert_eq!(mount["readOnly"], true, "{} should be mounted read-only", mount["mountPath"]);
        }
    }
}

#[test]
fn the_cluster_role_grants_exactly_get_and_list_on_pods() {
    let role = object("ClusterRole");
    let rules = list(&role["rules"]);
    assert_eq!(rules.len(), 1, "one rule, for pods: {rules:?}");
    let rule = &rules[0];
    assert_eq!(list(&rule["apiGroups"]), [Value::from("")], "pods are in the core API group");
    assert_eq!(list(&rule["resources"]), [Value::from("pods")]);
    let verbs: BTreeSet<&str> = list(&rule["verbs"]).iter().map(text).collect();
    assert_eq!(verbs, BTreeSet::from(["get", "list"]));
    let allowed: BTreeSet<&str> = ["apiGroups", "resources", "verbs"].into();
    for key in rule.as_object().expect("a rule is a mapping").keys() {
        assert!(allowed.contains(key.as_str()), "the rule should not carry {key}");
    }

    let binding = object("ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let account = object("ServiceAccount");
    let subjects = list(&binding["subjects"]);
    assert_eq!(subjects.len(), 1, "the role should be bound to the agents' service account only");
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], account["metadata"]["name"]);
    assert_eq!(subjects[0]["namespace"], account["metadata"]["namespace"]);
    assert_eq!(pod_spec()["serviceAccountName"], account["metadata"]["name"], "the pods should run as that account");
    assert_ne!(pod_spec()["automountServiceAccountToken"], false, "pod discovery needs the account's token in the pod");
}

#[test]
fn the_service_finds_the_agents_pull_endpoints_and_the_pods_do_not_invite_a_scrape() {
    let service = object("Service");
    assert_eq!(service["spec"]["clusterIP"], "None", "the Service should be headless");
    let labels = &daemonset()["spec"]["template"]["metadata"]["labels"];
    let selector = service["spec"]["selector"].as_object().expect("the Service has no selector");
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(&labels[key], value, "the Service selects {key}={value}, which the agents' pods lack");
    }
    let pull = port_of(text(&effective_config()["exporters"]["prometheus"]["listen"]));
    let ports = list(&service["spec"]["ports"]);
    let targets: Vec<u16> = ports
        .iter()
        .map(|p| container_port(if p["targetPort"].is_null() { &p["port"] } else { &p["targetPort"] }))
        .collect();
    assert!(targets.contains(&pull), "the Service should reach the pull exporter's port {pull}: {targets:?}");
    assert_eq!(service["metadata"]["annotations"]["prometheus.io/port"], pull.to_string());
    // The agent scrapes the annotated pods of its node: annotated itself, it would read its
    // own pull endpoint back in.
    let annotations = &daemonset()["spec"]["template"]["metadata"]["annotations"];
    assert_ne!(annotations["prometheus.io/scrape"], "true", "the agents' pods must not ask to be scraped");
}

#[test]
fn every_file_the_kustomization_lists_exists_and_every_manifest_is_listed() {
    let listed = resource_files();
    for file in &listed {
        assert!(kubernetes_dir().join(file).is_file(), "kustomization.yaml lists {file}, which does not exist");
    }
    let entries = std::fs::read_dir(kubernetes_dir()).expect("cannot list deploy/kubernetes");
    for entry in entries {
        let name = entry.expect("a directory entry").file_name().to_string_lossy().into_owned();
        let manifest = name.ends_with(".yaml") && name != "kustomization.yaml" && !name.ends_with(".example.yaml");
        assert!(
            !manifest || listed.contains(&name),
            "{name} is not listed in kustomization.yaml, so `kubectl apply -k` skips it"
        );
    }
    // One namespace for everything, the one kustomization.yaml sets.
    let namespace = object("Namespace")["metadata"]["name"].clone();
    assert_eq!(kustomization()["namespace"], namespace);
    for object in objects() {
        let kind = text(&object.json["kind"]);
        if !matches!(kind, "Namespace" | "ClusterRole" | "ClusterRoleBinding") {
            assert_eq!(
                object.json["metadata"]["namespace"], namespace,
                "{kind} in {} is in another namespace",
                object.file
            );
        }
    }
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let secret = scratch.path().join("secret.example.uncommented.yaml");
    std::fs::write(&secret, example_secret_yaml()).expect("write the example Secret");
    let mut files: Vec<PathBuf> = resource_files().iter().map(|f| kubernetes_dir().join(f)).collect();
    files.push(secret);
    let documents = objects().len() + 1;
    let output = python()
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(&files)
        .output()
        .expect("cannot run python3 -m kubernetes_validate");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "kubernetes-validate refused the manifests:\n{report}");
    // A kind it has no schema for (a typo in `kind`) is only a warning with exit status 0.
    assert!(!report.contains("WARN") && !report.contains("ERROR"), "kubernetes-validate warned:\n{report}");
    let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(passed, documents, "every object should have been validated:\n{report}");
}

// ---------------------------------------------------------------------------------------
// The image and Grafana
// ---------------------------------------------------------------------------------------

/// The JSON array of a Dockerfile instruction (`ENTRYPOINT ["a", "b"]`).
fn exec_form(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .rev()
        .find(|l| l.starts_with(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("deploy/Dockerfile has no {instruction}"));
    let array: Value = serde_json::from_str(&line[instruction.len()..])
        .unwrap_or_else(|e| panic!("{instruction} is not in exec form: {e}"));
    list(&array).iter().map(|v| text(v).to_owned()).collect()
}

#[test]
fn the_image_runs_the_config_the_daemonset_mounts() {
    let dockerfile = std::fs::read_to_string(repository().join("deploy/Dockerfile")).expect("read deploy/Dockerfile");
    assert!(
        dockerfile.contains("cargo build --release --locked -p periscope"),
        "the image should build the agent from Cargo.lock"
    );
    assert_eq!(exec_form(&dockerfile, "ENTRYPOINT"), ["/usr/local/bin/periscope"]);
    let args: Vec<String> = list(&container()["args"]).iter().map(|a| text(a).to_owned()).collect();
    assert_eq!(exec_form(&dockerfile, "CMD"), args, "the image's default command should be the DaemonSet's");
    assert!(
        dockerfile.contains("COPY --from=build /src/target/release/periscope /usr/local/bin/periscope"),
        "the entrypoint should be the binary the build stage made"
    );
    let dockerignore = std::fs::read_to_string(repository().join(".dockerignore")).expect("read .dockerignore");
    assert!(
        dockerignore.lines().any(|l| l.trim().trim_end_matches('/') == "target"),
        ".dockerignore should leave target/ out"
    );
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or_default()
}

#[test]
fn grafana_reads_from_the_backends_the_agents_ship_to() {
    let docs = yaml_file(&repository().join("deploy/grafana/datasources.yaml"));
    let sources = list(&docs[0]["datasources"]);
    let by_type = |kind: &str| {
        let found: Vec<&Value> = sources.iter().filter(|s| s["type"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} datasource expected");
        found[0]
    };
    let (prometheus, loki, jaeger) = (by_type("prometheus"), by_type("loki"), by_type("jaeger"));
    let uids: BTreeSet<&str> = sources.iter().map(|s| text(&s["uid"])).collect();
    assert_eq!(uids.len(), sources.len(), "datasource uids should be set and distinct");
    assert_eq!(sources.iter().filter(|s| s["isDefault"] == true).count(), 1, "one default datasource");

    let exporters = &effective_config()["exporters"];
    assert_eq!(host_of(text(&prometheus["url"])), host_of(text(&exporters["prometheus_remote_write"]["url"])));
    assert_eq!(host_of(text(&loki["url"])), host_of(text(&exporters["loki"]["url"])));
    // Jaeger is written to by its collector and read through its query service.
    let collector = host_of(text(&exporters["jaeger"]["endpoint"]));
    let namespace_of =
        |host: &str| host.split(':').next().unwrap_or_default().split_once('.').map(|(_, ns)| ns.to_owned());
    assert_eq!(
        namespace_of(host_of(text(&jaeger["url"]))),
        namespace_of(collector),
        "Jaeger's query and collector should be in one namespace"
    );

    // Links between them point at datasources that exist.
    for field in list(&loki["jsonData"]["derivedFields"]) {
        assert_eq!(field["datasourceUid"], jaeger["uid"], "Loki's derived field should open Jaeger");
        assert_eq!(field["matcherType"], "label", "trace_id is structured metadata, not part of the line");
        assert_eq!(field["matcherRegex"], "trace_id");
    }
    assert_eq!(jaeger["jsonData"]["tracesToLogsV2"]["datasourceUid"], loki["uid"]);

    // The dashboards provider loads JSON from a folder, and every datasource type the
    // repository's dashboards ask for is provisioned.
    let providers = yaml_file(&repository().join("deploy/grafana/dashboards.yaml"));
    let provider = &list(&providers[0]["providers"])[0];
    assert_eq!(provider["type"], "file");
    assert!(text(&provider["options"]["path"]).starts_with('/'), "the provider should load an absolute folder");
    let types: BTreeSet<&str> = sources.iter().map(|s| text(&s["type"])).collect();
    let dashboards =
        std::fs::read_dir(repository().join("dashboards")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    for entry in dashboards.iter().filter(|e| e.path().extension().is_some_and(|x| x == "json")) {
        let Ok(dashboard) = serde_json::from_slice::<Value>(&std::fs::read(entry.path()).unwrap_or_default()) else {
            continue;
        };
        for variable in list(&dashboard["templating"]["list"]).iter().filter(|v| v["type"] == "datasource") {
            let wanted = text(&variable["query"]);
            assert!(
                types.contains(wanted),
                "{}: variable {} wants a {wanted} datasource",
                entry.path().display(),
                variable["name"]
            );
        }
    }
}

#[test]
fn durations_and_globs_are_read_as_the_agent_writes_them() {
    assert_eq!(duration("20s"), Duration::from_secs(20));
    assert_eq!(duration("1m 30s"), Duration::from_secs(90));
    assert_eq!(duration("250ms"), Duration::from_millis(250));
    assert_eq!(glob_directory("/var/log/pods/*/*/*.log"), "/var/log/pods");
    assert_eq!(glob_directory("/var/log/containers/*.log"), "/var/log/containers");
    assert_eq!(glob_directory("/data/app.log"), "/data");
}
