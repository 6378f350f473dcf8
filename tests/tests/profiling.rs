//! CPU profiles end to end: `go tool pprof` reads the agent's profile of itself under load; a
//! Go service (the standard library's `net/http/pprof`, `fixtures/gopprof`) and a Rust service
//! (pprof-rs, `fixtures/pprof_rs_service.rs`) are pulled through `sources.pprof` and rendered
//! in every format; stand-ins for targets that hang, answer HTML or garbage, are busy or are
//! gone check the agent's errors; then the access rules, the query checks, and continuous
//! capture kept across a restart.
//!
//! Both services spend their CPU in one named function, so the profile's top entry is known.
//! Waits poll a signal (a request reaching a stand-in, the profiler thread in `/proc`, the
//! list of kept profiles) under the suite's deadline; captures last one to three seconds.
//! The tests need Go's toolchain (`go build`, `go tool pprof`); `scripts/test` installs it.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use flate2::write::GzEncoder;
use periscope_e2e::{free_port, otlp, Agent, TestConfig, DEADLINE, POLL_INTERVAL};
use pprof::protos::Message as _;
use serde_json::Value;
use tokio::sync::Semaphore;

const NODE: &str = "test-node";
/// What a stand-in answers a profile request with: status, content type and body.
type Reply = (u16, &'static str, Vec<u8>);

// ---------------------------------------------------------------------------------------
// The agent: its config with `sources.pprof`, and requests to its profile endpoints
// ---------------------------------------------------------------------------------------

/// A `sources.pprof` target.
struct Target {
    name: &'static str,
    url: String,
    interval: &'static str,
    seconds: u32,
}

/// An on-demand target.
fn target(name: &'static str, url: impl Into<String>) -> Target {
    Target { name, url: url.into(), interval: "0s", seconds: 1 }
}

/// `text` with `old` replaced by `new`, where `old` must occur.
fn replace_once(text: &str, old: &str, new: &str) -> String {
    assert!(text.contains(old), "the harness config has no {old:?}:\n{text}");
    text.replacen(old, new, 1)
}

/// The harness's config with `server` set (a flow mapping ending in `listen`, where the
/// harness finds the admin address), `data_dir` set when given, and `targets`.
fn profiling_yaml(config: &TestConfig, server: Option<&str>, data_dir: Option<&Path>, targets: &[Target]) -> String {
    let mut yaml = config.yaml();
    if let Some(server) = server {
        let loopback = format!("server: {{ listen: 127.0.0.1:{} }}", config.admin_port);
        yaml = replace_once(&yaml, &loopback, &format!("server: {server}"));
    }
    if let Some(dir) = data_dir {
        yaml = replace_once(&yaml, "data_dir: ./data", &format!("data_dir: \"{}\"", dir.display()));
    }
    if !targets.is_empty() {
        let mut pprof = String::from("  pprof:\n    targets:\n");
        for t in targets {
            pprof.push_str(&format!(
                "      - {{ name: {}, url: \"{}\", interval: {}, seconds: {} }}\n",
                t.name, t.url, t.interval, t.seconds
            ));
        }
        let host = "  host_metrics: { enabled: false }\n";
        yaml = replace_once(&yaml, host, &format!("{host}{pprof}"));
    }
    yaml
}

/// Starts an agent on loopback (no token) with `targets`.
async fn start_agent(config: &TestConfig, targets: &[Target]) -> Agent {
    Agent::start(&profiling_yaml(config, None, None, targets)).await
}

/// An answer of an HTTP endpoint.
struct Answer {
    status: u16,
    content_type: String,
    /// `Retry-After`, in seconds.
    retry_after: Option<u64>,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The message of an API error, `{"error": "..."}`.
    fn error(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("HTTP {} is not an API error: {}", self.status, self.text()))
    }

    /// Fails unless the answer is a 200 of `content_type`.
    fn expect_ok(self, what: &str, content_type: &str) -> Answer {
        assert_eq!(self.status, 200, "{what} answered {}: {}", self.status, self.text());
        assert_eq!(self.content_type, content_type, "{what}: content type");
        self
    }
}

/// `GET url`, with `Authorization: Bearer <token>` when given. The client waits longer than
/// any capture of these tests, including the agent's own deadline on a target that hangs.
async fn fetch(url: &str, token: Option<&str>) -> Answer {
    periscope_e2e::tls::install_crypto_provider();
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(90)).build().expect("cannot build an HTTP client");
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status().as_u16();
    let content_type =
        response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let retry_after =
        response.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let body = response.bytes().await.unwrap_or_else(|e| panic!("GET {url}: reading the body: {e}")).to_vec();
    Answer { status, content_type, retry_after, body }
}

/// `GET /debug/pprof/profile?<query>` on the agent.
async fn capture(agent: &Agent, query: &str) -> Answer {
    fetch(&agent.url(&format!("/debug/pprof/profile?{query}")), None).await
}

const PPROF: &str = "application/octet-stream";
const FOLDED: &str = "text/plain; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// The id of the agent's process, found by its config file on the command line.
fn agent_pid(agent: &Agent) -> u32 {
    let config = agent.dir().join("periscope.yaml");
    let config = config.to_string_lossy();
    for entry in std::fs::read_dir("/proc").expect("cannot list /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|&b| b == 0).any(|arg| arg == config.as_bytes()) {
            return pid;
        }
    }
    panic!("no process runs with {config}");
}

/// Whether the agent's profiler thread (`periscope-profiler`, 15 characters in `comm`) runs.
fn profiler_running(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|task| {
        std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == "periscope-profi")
    })
}

/// Polls until `condition` holds, failing with `what` after the suite's deadline.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "{what} did not happen within {DEADLINE:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------------------
// Profiles: a known one, and what the formats say about any
// ---------------------------------------------------------------------------------------

/// A CPU profile of one stack, `stub.main` calling `stub.work`, sampled `samples` times at
/// 100 Hz, as gzipped profile.proto built with pprof-rs's message types.
fn canned_profile(samples: i64) -> Vec<u8> {
    use pprof::protos::{Function, Line, Location, Profile, Sample, ValueType};
    let strings = ["", "samples", "count", "cpu", "nanoseconds", "stub.main", "stub.work", "stub.rs"];
    let function = |id: u64, name: i64| Function { id, name, system_name: name, filename: 7, start_line: 1 };
    let location = |id: u64| Location { id, line: vec![Line { function_id: id, line: 10 }], ..Default::default() };
    let cpu = ValueType { ty: 3, unit: 4 };
    let profile = Profile {
        sample_type: vec![ValueType { ty: 1, unit: 2 }, cpu.clone()],
        sample: vec![Sample { location_id: vec![2, 1], value: vec![samples, samples * 10_000_000], label: vec![] }],
        location: vec![location(1), location(2)],
        function: vec![function(1, 5), function(2, 6)],
        string_table: strings.iter().map(|s| (*s).to_owned()).collect(),
        time_nanos: 1_700_000_000_000_000_000,
        duration_nanos: 1_000_000_000,
        period_type: Some(cpu),
        period: 10_000_000,
        ..Default::default()
    };
    gzip(&profile.encode_to_vec())
}

/// A gzipped profile.proto, decoded with pprof-rs's message types.
fn decode_profile(gzipped: &[u8]) -> pprof::protos::Profile {
    assert_eq!(gzipped.get(..2), Some(&[0x1f, 0x8b][..]), "the profile is not gzipped");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gzipped).read_to_end(&mut raw).expect("the profile is not valid gzip");
    let profile = pprof::protos::Profile::decode(raw.as_slice()).expect("the profile is not a profile.proto");
    assert_eq!(profile.string_table.first().map(String::as_str), Some(""), "a malformed string table");
    profile
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// Collapsed stacks (`root;…;leaf count` lines) as frames and counts; fails on a bad line.
fn parse_folded(text: &str) -> Vec<(Vec<String>, u64)> {
    text.lines()
        .map(|line| {
            let (stack, count) =
                line.rsplit_once(' ').unwrap_or_else(|| panic!("a folded line without a count: {line:?}"));
            let count = count.parse().unwrap_or_else(|_| panic!("a folded line with a bad count: {line:?}"));
            assert!(count > 0, "a folded line with no samples: {line:?}");
            (stack.split(';').map(str::to_owned).collect(), count)
        })
        .collect()
}

/// The function with the most samples of its own (as the leaf of stacks), and how many.
fn top_self(folded: &str) -> (String, u64) {
    let mut own: HashMap<String, u64> = HashMap::new();
    for (frames, count) in parse_folded(folded) {
        *own.entry(frames.last().expect("an empty stack").clone()).or_default() += count;
    }
    own.into_iter().max_by_key(|(_, count)| *count).unwrap_or_else(|| panic!("no samples in:\n{folded}"))
}

/// The samples of the flame graph's frames titled `name` (`<title>name (N samples, P%)`).
fn svg_samples(svg: &str, name: &str) -> u64 {
    let prefix = format!("<title>{name} (");
    svg.match_indices(&prefix)
        .map(|(at, _)| {
            let rest = &svg[at + prefix.len()..];
            let count = rest.split(' ').next().unwrap_or_default().replace(',', "");
            count.parse::<u64>().unwrap_or_else(|_| panic!("a flame graph title without a count: {}", &rest[..40]))
        })
        .sum()
}

/// Checks that `svg` is a flame graph in which `function` spends more than half of all the
/// samples. Samples of the function itself (it calls nothing) are then more than those of
/// any other: it is the top entry.
fn assert_flame_graph_top(svg: &[u8], function: &str) {
    let svg = String::from_utf8_lossy(svg);
    assert!(svg.starts_with("<?xml") && svg.contains("<svg"), "not an SVG document: {}", &svg[..svg.len().min(200)]);
    let all = svg_samples(&svg, "all");
    let own = svg_samples(&svg, function);
    assert!(all > 0, "the flame graph has no samples");
    assert!(2 * own > all, "{function} has {own} of {all} samples in the flame graph");
}

// ---------------------------------------------------------------------------------------
// Go's toolchain: building the Go service, and `go tool pprof`
// ---------------------------------------------------------------------------------------

/// `go ARGS`, with its caches under this build's target directory and no network: the
/// fixture needs nothing from outside the standard library.
fn go(args: &[&str]) -> Command {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go");
    let mut command = Command::new("go");
    command
        .args(args)
        .env("GOCACHE", home.join("cache"))
        .env("GOPATH", home.join("path"))
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .env("GOTELEMETRY", "off");
    command
}

/// Runs `command` to completion and returns its stdout; fails with its stderr otherwise.
fn run(command: &mut Command, what: &str) -> String {
    let output = match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{what}`: Go's toolchain is missing; install golang-go (scripts/test does)")
        }
        Err(e) => panic!("`{what}`: {e}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "`{what}` failed ({}):\n{stderr}", output.status);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Go service, built once per run of this file.
fn gopprof() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gopprof").join("gopprof");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("gopprof");
        let out = binary.to_str().expect("a UTF-8 target directory");
        run(go(&["build", "-o", out, "."]).current_dir(source), "go build fixtures/gopprof");
        binary
    })
}

/// What `go tool pprof -top` says about a profile: the names of its rows, heaviest of their
/// own first, and the whole output.
struct Top {
    functions: Vec<String>,
    output: String,
}

fn pprof_top(profile: &[u8]) -> Top {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let file = dir.path().join("profile.pb.gz");
    std::fs::write(&file, profile).expect("cannot write the profile");
    let file = file.to_str().expect("a UTF-8 temporary directory");
    let output = run(&mut go(&["tool", "pprof", "-top", file]), "go tool pprof -top");
    // Rows after the header are `flat flat% sum% cum cum% name`; a name may hold spaces.
    let functions = output
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("flat"))
        .skip(1)
        .map(|line| {
            let mut rest = line.trim_start();
            for _ in 0..5 {
                let end = rest.find(char::is_whitespace).unwrap_or_else(|| panic!("a short row: {line:?}"));
                rest = rest[end..].trim_start();
            }
            rest.to_owned()
        })
        .collect();
    Top { functions, output }
}

// ---------------------------------------------------------------------------------------
// Targets: services in their own processes, and stand-ins in the test
// ---------------------------------------------------------------------------------------

/// A service process: prints `listening on ADDR`, serves until its stdin closes (so it ends
/// with the test process too), and is killed when dropped.
struct Service {
    child: Child,
    addr: String,
}

impl Service {
    fn start(program: &Path) -> Service {
        let child = Command::new(program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut service = Service { child, addr: String::new() };
        let stdout = service.child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line =
            rx.recv_timeout(DEADLINE).unwrap_or_else(|_| panic!("{} did not say where it listens", program.display()));
        let addr = line.trim().strip_prefix("listening on ");
        service.addr = addr.unwrap_or_else(|| panic!("{} printed {line:?}", program.display())).to_owned();
        service
    }

    fn profile_url(&self) -> String {
        format!("http://{}/debug/pprof/profile", self.addr)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Respond = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A stand-in for a service's pprof endpoint: records the path and query of every request and
/// answers the n-th (from 0) with what `respond(n)` resolves to.
struct Stub {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct StubState {
    requests: Arc<Mutex<Vec<String>>>,
    respond: Respond,
}

impl Stub {
    async fn start<F, Fut>(respond: F) -> Stub
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let respond: Respond = Arc::new(move |n| Box::pin(respond(n)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("cannot bind a stand-in");
        let addr = listener.local_addr().expect("no local address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let state = StubState { requests: requests.clone(), respond };
        let app = axum::Router::new().fallback(stub_answer).with_state(state);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Stub { addr, requests, server }
    }

    /// A stand-in that answers every request alike.
    async fn answering(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Stub {
        let body = body.into();
        Stub::start(move |_| std::future::ready((status, content_type, body.clone()))).await
    }

    fn url(&self) -> String {
        format!("http://{}/debug/pprof/profile", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("a poisoned lock").clone()
    }

    async fn wait_for_requests(&self, count: usize) {
        wait_until(&format!("request {count} reaching the stand-in"), || self.requests().len() >= count).await;
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn stub_answer(State(state): State<StubState>, uri: Uri) -> Response {
    let n = {
        let mut requests = state.requests.lock().expect("a poisoned lock");
        requests.push(uri.to_string());
        requests.len() - 1
    };
    let (status, content_type, body) = (state.respond)(n).await;
    let status = StatusCode::from_u16(status).expect("a valid status");
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

// ---------------------------------------------------------------------------------------
// The agent's own profile
// ---------------------------------------------------------------------------------------

/// Sends traces of 40 spans to the agent's OTLP/gRPC receiver until `stop` is set.
async fn send_traces_until(endpoint: String, stop: Arc<AtomicBool>) -> usize {
    let mut client = otlp::trace_client(&endpoint).await;
    let mut sent = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let request = otlp::trace_request("loadgen", (sent % 251) as u8, 40);
        client.export(request).await.expect("the agent refused the export");
        sent += 1;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_tool_pprof_reads_the_agents_own_profile_and_names_its_hot_functions_under_load() {
    let config = TestConfig::new().paths("300ms");
    let agent = start_agent(&config, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(send_traces_until(config.grpc_endpoint(), stop.clone()));

    let profile = capture(&agent, "seconds=2&frequency=499").await.expect_ok("a profile of the agent", PPROF);
    let folded = capture(&agent, "seconds=1&frequency=499&format=folded").await.expect_ok("folded", FOLDED);
    let svg = capture(&agent, "seconds=1&format=svg").await.expect_ok("a flame graph", SVG);
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.expect("the load generator failed");
    assert!(sent > 0, "no traces were sent during the captures");

    // Sampled at the frequency asked for, for as long as asked, in pprof's units.
    let decoded = decode_profile(&profile.body);
    let string = |i: i64| decoded.string_table[i as usize].as_str();
    let types: Vec<(&str, &str)> = decoded.sample_type.iter().map(|t| (string(t.ty), string(t.unit))).collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    assert_eq!(decoded.period, 1_000_000_000 / 499);
    assert!(decoded.duration_nanos >= 2_000_000_000, "a capture of 2 s lasted {} ns", decoded.duration_nanos);
    for sample in &decoded.sample {
        assert_eq!(sample.value[1], sample.value[0] * decoded.period, "cpu time is not samples × period");
    }

    let top = pprof_top(&profile.body);
    assert!(
        top.functions.iter().any(|f| f.starts_with("periscope::")),
        "no function of the agent in `go tool pprof -top`:\n{}",
        top.output
    );
    assert!(
        top.functions.iter().any(|f| f.contains("prost::") || f.contains("tonic::")),
        "no OTLP decoding in `go tool pprof -top`:\n{}",
        top.output
    );

    let stacks = parse_folded(&folded.text());
    assert!(
        stacks.iter().any(|(frames, _)| frames.iter().any(|f| f.starts_with("periscope::"))),
        "no function of the agent in the folded profile:\n{}",
        folded.text()
    );
    let svg = svg.text();
    assert!(svg.starts_with("<?xml") && svg.contains("CPU: periscope"), "not the agent's flame graph: {svg:.300}");
    assert!(svg_samples(&svg, "all") > 0, "the flame graph has no samples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_capture_of_the_agent_gets_409_and_a_client_that_goes_away_stops_the_capture() {
    let targets_stub = Stub::answering(200, PPROF, canned_profile(3)).await;
    let config = TestConfig::new();
    let agent = start_agent(&config, &[target("other", targets_stub.url())]).await;
    let pid = agent_pid(&agent);
    assert!(!profiler_running(pid), "the profiler runs before any capture");

    let first = {
        let url = agent.url("/debug/pprof/profile?seconds=3&format=folded");
        tokio::spawn(async move { fetch(&url, None).await })
    };
    wait_until("the profiler thread starting", || profiler_running(pid)).await;
    let second = capture(&agent, "seconds=1").await;
    assert_eq!(second.status, 409, "a second capture of the agent: {}", second.text());
    assert!(second.error().contains("already"), "{}", second.error());
    // Another process is another capture.
    let other = capture(&agent, "target=other&seconds=1&format=folded").await.expect_ok("the target meanwhile", FOLDED);
    assert_eq!(other.text(), "stub.main;stub.work 3\n");
    let first = first.await.expect("the first capture failed");
    let first = first.expect_ok("the first capture", FOLDED);
    parse_folded(&first.text());
    wait_until("the profiler thread ending", || !profiler_running(pid)).await;
    capture(&agent, "seconds=1").await.expect_ok("a capture after the first one", PPROF);

    // A client that goes away: the capture of 300 s ends with it, and the next one may start.
    let gone = {
        let url = agent.url("/debug/pprof/profile?seconds=300");
        tokio::spawn(async move { fetch(&url, None).await })
    };
    wait_until("the profiler thread starting", || profiler_running(pid)).await;
    gone.abort();
    wait_until("the profiler stopping after its client went away", || !profiler_running(pid)).await;
    capture(&agent, "seconds=1&format=svg").await.expect_ok("a capture after the abandoned one", SVG);
}

// ---------------------------------------------------------------------------------------
// Pulled profiles: a Go service and a Rust service
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_service_is_profiled_through_net_http_pprof_and_its_hot_function_tops_every_format() {
    let service = Service::start(gopprof());
    let config = TestConfig::new();
    let agent = start_agent(&config, &[target("gosvc", service.profile_url())]).await;

    let profile = capture(&agent, "target=gosvc&seconds=1").await.expect_ok("the Go profile", PPROF);
    let top = pprof_top(&profile.body);
    assert_eq!(top.functions.first().map(String::as_str), Some("main.burnCPU"), "{}", top.output);
    assert!(top.output.contains("main.keepBusy"), "{}", top.output);

    let folded = capture(&agent, "target=gosvc&seconds=1&format=folded").await.expect_ok("folded", FOLDED);
    assert_eq!(top_self(&folded.text()).0, "main.burnCPU", "{}", folded.text());
    assert!(
        parse_folded(&folded.text())
            .iter()
            .any(|(frames, _)| frames.ends_with(&["main.keepBusy".to_owned(), "main.burnCPU".to_owned()])),
        "main.burnCPU is not called by main.keepBusy:\n{}",
        folded.text()
    );

    let svg = capture(&agent, "target=gosvc&seconds=1&format=svg").await.expect_ok("a flame graph", SVG);
    assert_flame_graph_top(&svg.body, "main.burnCPU");
    assert!(svg.text().contains("CPU: gosvc"), "the flame graph is not titled after the target");

    // Busy with someone else's profile, Go answers 500 "cpu profiling already in use": 409.
    // Which of the two captures reaches Go first is not known, so try until the agent's does not.
    let started = Instant::now();
    loop {
        let direct = {
            let url = format!("{}?seconds=2", service.profile_url());
            tokio::spawn(async move { fetch(&url, None).await })
        };
        let answer = capture(&agent, "target=gosvc&seconds=1&format=folded").await;
        let direct = direct.await.expect("the direct capture failed");
        if answer.status == 409 {
            assert_eq!(direct.status, 200, "Go's own capture: {}", direct.text());
            assert!(answer.error().contains("already in use"), "{}", answer.error());
            break;
        }
        assert_eq!(answer.status, 200, "the agent's capture beside another: {}", answer.text());
        assert!(started.elapsed() < DEADLINE, "the agent never met Go busy with another capture");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_service_is_profiled_through_pprof_rs_and_its_hot_function_tops_the_profile() {
    let service = Service::start(Path::new(env!("CARGO_BIN_EXE_pprof-rs-service")));
    let config = TestConfig::new();
    let agent = start_agent(&config, &[target("rustsvc", service.profile_url())]).await;

    let folded = capture(&agent, "target=rustsvc&seconds=1&format=folded").await.expect_ok("folded", FOLDED);
    assert_eq!(top_self(&folded.text()).0, "pprof_rs_service::burn_cpu", "{}", folded.text());

    let profile = capture(&agent, "target=rustsvc&seconds=1").await.expect_ok("the pprof-rs profile", PPROF);
    let top = pprof_top(&profile.body);
    assert_eq!(top.functions.first().map(String::as_str), Some("pprof_rs_service::burn_cpu"), "{}", top.output);
}

// ---------------------------------------------------------------------------------------
// Targets that are busy, hang, answer something else or are gone
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_capture_of_a_target_gets_409_and_so_does_a_busy_target() {
    // The first request and the third wait for the gate; the others are answered at once.
    let gate = Arc::new(Semaphore::new(0));
    let gated = {
        let gate = gate.clone();
        Stub::start(move |n| {
            let gate = gate.clone();
            async move {
                if n == 0 || n == 2 {
                    gate.acquire().await.expect("the gate closed").forget();
                }
                (200, PPROF, canned_profile(5))
            }
        })
        .await
    };
    let go_busy = Stub::answering(500, FOLDED, "Could not enable CPU profiling: cpu profiling already in use\n").await;
    let rs_busy = Stub::answering(409, "text/plain", "a profile is already being captured\n").await;
    let config = TestConfig::new();
    let targets = [target("gated", gated.url()), target("gobusy", go_busy.url()), target("rsbusy", rs_busy.url())];
    let agent = start_agent(&config, &targets).await;

    let first = {
        let url = agent.url("/debug/pprof/profile?target=gated&seconds=2&format=folded");
        tokio::spawn(async move { fetch(&url, None).await })
    };
    gated.wait_for_requests(1).await;
    let second = capture(&agent, "target=gated&seconds=1").await;
    assert_eq!(second.status, 409, "a second capture of the target: {}", second.text());
    assert!(second.error().contains("gated"), "{}", second.error());
    capture(&agent, "seconds=1").await.expect_ok("the agent's own profile meanwhile", PPROF);
    gate.add_permits(1);
    let first = first.await.expect("the first capture failed").expect_ok("the first capture", FOLDED);
    assert_eq!(first.text(), "stub.main;stub.work 5\n");
    assert_eq!(gated.requests(), ["/debug/pprof/profile?seconds=2"], "the second capture reached the target");
    let third = capture(&agent, "target=gated&seconds=1").await.expect_ok("a capture after the first one", PPROF);
    assert_eq!(third.body, canned_profile(5), "a pprof profile is passed through as the target sent it");

    // A client that goes away ends the pull: the next capture need not wait for the agent's
    // own deadline on the target (20 s + 15 s, longer than this test waits).
    let gone = {
        let url = agent.url("/debug/pprof/profile?target=gated&seconds=20");
        tokio::spawn(async move { fetch(&url, None).await })
    };
    gated.wait_for_requests(3).await;
    gone.abort();
    let started = Instant::now();
    loop {
        let answer = capture(&agent, "target=gated&seconds=1&format=folded").await;
        if answer.status == 200 {
            assert_eq!(answer.text(), "stub.main;stub.work 5\n");
            break;
        }
        assert_eq!(answer.status, 409, "a capture after an abandoned one: {}", answer.text());
        assert!(started.elapsed() < DEADLINE, "the abandoned pull still held the target after {DEADLINE:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }

    for name in ["gobusy", "rsbusy"] {
        let answer = capture(&agent, &format!("target={name}&seconds=1")).await;
        assert_eq!(answer.status, 409, "{name}: {}", answer.text());
        assert!(answer.error().contains("already"), "{name}: {}", answer.error());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_beyond_the_budget_of_a_process_get_429_with_retry_after_and_other_processes_go_on() {
    let stub = Stub::answering(200, PPROF, canned_profile(2)).await;
    let other = Stub::answering(200, PPROF, canned_profile(4)).await;
    let config = TestConfig::new();
    let server = format!("{{ max_profiles_per_minute: 2, listen: 127.0.0.1:{} }}", config.admin_port);
    let targets = [target("feed", stub.url()), target("cart", other.url())];
    let agent = Agent::start(&profiling_yaml(&config, Some(&server), None, &targets)).await;

    for process in ["", "target=feed&"] {
        for n in 1..=2 {
            capture(&agent, &format!("{process}seconds=1&format=folded")).await.expect_ok(&format!("capture {n} of {process:?}"), FOLDED);
        }
        let refused = capture(&agent, &format!("{process}seconds=1")).await;
        assert_eq!(refused.status, 429, "a third capture of {process:?} within a minute: {}", refused.text());
        assert!(refused.error().contains("server.max_profiles_per_minute"), "{}", refused.error());
        let after = refused.retry_after.expect("a Retry-After header");
        assert!((1..=60).contains(&after), "Retry-After: {after}");
    }
    assert_eq!(stub.requests().len(), 2, "the refused capture reached the target");
    // Another target has a budget of its own.
    let answer = capture(&agent, "target=cart&seconds=1&format=folded").await.expect_ok("another target", FOLDED);
    assert_eq!(answer.text(), "stub.main;stub.work 4\n");
}

/// Bytes that are neither gzip nor profile.proto.
fn garbage(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_hang_answer_html_or_garbage_or_are_gone_get_502_and_the_agent_stays_responsive() {
    let hang = Stub::start(|_| std::future::pending::<Reply>()).await;
    let webpage = Stub::answering(
        200,
        "text/html; charset=utf-8",
        "<!DOCTYPE html>\n<html><head><title>Welcome</title></head><body>It works</body></html>\n",
    )
    .await;
    let noise = Stub::answering(200, PPROF, garbage(600)).await;
    let mut bad_gzip_body = vec![0x1f, 0x8b, 0x08, 0x00];
    bad_gzip_body.extend(garbage(100));
    let bad_gzip = Stub::answering(200, PPROF, bad_gzip_body).await;
    let empty = Stub::answering(200, PPROF, Vec::new()).await;
    let missing = Stub::answering(404, FOLDED, "404 page not found\n").await;
    let gone_port = free_port();
    let gone_url = format!("http://127.0.0.1:{gone_port}/debug/pprof/profile");
    let targets = [
        target("hang", hang.url()),
        target("webpage", webpage.url()),
        target("noise", noise.url()),
        target("badgzip", bad_gzip.url()),
        target("empty", empty.url()),
        target("missing", missing.url()),
        target("gone", gone_url.clone()),
    ];
    let config = TestConfig::new();
    let agent = start_agent(&config, &targets).await;

    let started = Instant::now();
    let hanging = {
        let url = agent.url("/debug/pprof/profile?target=hang&seconds=1");
        tokio::spawn(async move { fetch(&url, None).await })
    };
    hang.wait_for_requests(1).await;

    // While one pull hangs, everything else answers.
    let (status, body) = agent.get("/healthz").await;
    assert_eq!(status, 200, "/healthz during a hanging pull: {body}");
    capture(&agent, "seconds=1").await.expect_ok("the agent's own profile during a hanging pull", PPROF);

    let answer = capture(&agent, "target=webpage&seconds=1").await;
    assert_eq!(answer.status, 502, "HTML: {}", answer.text());
    let error = answer.error();
    assert!(error.contains("webpage") && error.contains("CPU profile"), "{error}");
    assert!(error.contains("<!DOCTYPE html>"), "the error does not quote what came: {error}");

    for name in ["noise", "badgzip", "empty"] {
        let answer = capture(&agent, &format!("target={name}&seconds=1")).await;
        assert_eq!(answer.status, 502, "{name}: {}", answer.text());
        assert!(answer.error().contains(name) && answer.error().contains("profile"), "{name}: {}", answer.error());
    }

    let answer = capture(&agent, "target=missing&seconds=1").await;
    assert_eq!(answer.status, 502, "a 404 of the target: {}", answer.text());
    assert!(answer.error().contains("404") && answer.error().contains("page not found"), "{}", answer.error());

    let answer = capture(&agent, "target=gone&seconds=1").await;
    assert_eq!(answer.status, 502, "an unreachable target: {}", answer.text());
    assert!(answer.error().contains(&gone_url), "the error does not name the URL: {}", answer.error());

    let answer = capture(&agent, "target=nosuch&seconds=1").await;
    assert_eq!(answer.status, 404, "an unknown target: {}", answer.text());
    assert!(answer.error().contains("nosuch") && answer.error().contains("webpage"), "{}", answer.error());

    // The hanging pull ends in an error once its capture could have been done, not before.
    let answer = hanging.await.expect("the hanging capture failed");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the agent gave up on the target before its capture could end"
    );
    assert_eq!(answer.status, 502, "a target that hangs: {}", answer.text());
    assert!(answer.error().contains("hang"), "{}", answer.error());
    assert_eq!(hang.requests(), ["/debug/pprof/profile?seconds=1"]);
    let (status, _) = agent.get("/healthz").await;
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------
// Access and query checks
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_need_the_token_when_one_is_set_and_a_loopback_listener_when_none_is() {
    let stub = Stub::answering(200, PPROF, canned_profile(2)).await;
    let token = "s3cret-t0ken";

    // Every interface, no token: refused with instructions; health and metrics stay open.
    let config = TestConfig::new();
    let open = format!("{{ listen: 0.0.0.0:{} }}", config.admin_port);
    let agent = Agent::start(&profiling_yaml(&config, Some(&open), None, &[target("feed", stub.url())])).await;
    for query in ["seconds=1", "seconds=1&target=feed&format=folded"] {
        let answer = capture(&agent, query).await;
        assert_eq!(answer.status, 403, "{query} without a token on 0.0.0.0: {}", answer.text());
        assert!(answer.error().contains("server.auth_token"), "403 does not say what to set: {}", answer.error());
    }
    assert_eq!(agent.get("/healthz").await.0, 200);
    assert_eq!(agent.get("/metrics").await.0, 200);
    assert!(stub.requests().is_empty(), "a refused capture reached the target");
    drop(agent);

    // A token, on every interface and on loopback: needed, and enough.
    for listen in ["0.0.0.0", "127.0.0.1"] {
        let config = TestConfig::new();
        let server = format!("{{ auth_token: \"${{PERISCOPE_TOKEN}}\", listen: {listen}:{} }}", config.admin_port);
        let yaml = profiling_yaml(&config, Some(&server), None, &[target("feed", stub.url())]);
        let agent = Agent::start_with_env(&yaml, &[("PERISCOPE_TOKEN", token)]).await;
        let url = agent.url("/debug/pprof/profile?seconds=1&target=feed&format=folded");
        for wrong in [None, Some(""), Some("s3cret"), Some("s3cret-t0ken2"), Some("S3CRET-T0KEN")] {
            let answer = fetch(&url, wrong).await;
            assert_eq!(answer.status, 401, "{listen}, token {wrong:?}: {}", answer.text());
        }
        let answer = fetch(&agent.url("/debug/pprof/profile?seconds=1"), None).await;
        assert_eq!(answer.status, 401, "{listen}: the agent's own profile without a token: {}", answer.text());
        assert!(stub.requests().is_empty(), "an unauthorised capture reached the target");

        let answer = fetch(&url, Some(token)).await.expect_ok("the right token", FOLDED);
        assert_eq!(answer.text(), "stub.main;stub.work 2\n");
        let own = fetch(&agent.url("/debug/pprof/profile?seconds=1"), Some(token)).await;
        own.expect_ok("the agent's own profile with the token", PPROF);
        assert_eq!(stub.requests().len(), 1);
        stub.requests.lock().expect("a poisoned lock").clear();
    }

    // Loopback and no token: open.
    let config = TestConfig::new();
    let agent = start_agent(&config, &[target("feed", stub.url())]).await;
    capture(&agent, "seconds=1&target=feed").await.expect_ok("loopback without a token", PPROF);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_values_get_400_and_the_bounds_themselves_are_accepted() {
    let stub = Stub::answering(200, PPROF, canned_profile(1)).await;
    let config = TestConfig::new();
    let agent = start_agent(&config, &[target("feed", stub.url())]).await;

    for query in [
        "seconds=0",
        "seconds=301",
        "seconds=-1",
        "seconds=1.5",
        "seconds=ten",
        "seconds=",
        "frequency=0",
        "frequency=1001",
        "frequency=abc",
        "format=xml",
        "format=",
        "target=feed&seconds=0",
        "target=feed&seconds=301",
        "target=feed&format=xml",
        "target=nosuch&format=xml",
    ] {
        let answer = capture(&agent, query).await;
        assert_eq!(answer.status, 400, "{query}: {}", answer.text());
        assert!(!answer.error().is_empty(), "{query}: an empty message");
    }
    assert!(stub.requests().is_empty(), "a bad query reached the target");
    assert!(capture(&agent, "seconds=0").await.error().contains("300"), "the message does not give the bound");

    capture(&agent, "seconds=1&frequency=1000&format=folded").await.expect_ok("1000 Hz", FOLDED);
    capture(&agent, "seconds=1&frequency=1").await.expect_ok("1 Hz", PPROF);

    // No continuous target: nothing is kept.
    let (status, body) = agent.get("/api/v1/profiles").await;
    assert_eq!((status, body.as_str()), (200, "[]"));
    let (status, body) = agent.get("/api/v1/profiles/00000000000000000001-feed").await;
    assert_eq!(status, 404, "{body}");
}

// ---------------------------------------------------------------------------------------
// Continuous capture
// ---------------------------------------------------------------------------------------

/// `GET /api/v1/profiles`, parsed.
async fn kept_profiles(agent: &Agent) -> Vec<Value> {
    let (status, body) = agent.get("/api/v1/profiles").await;
    assert_eq!(status, 200, "GET /api/v1/profiles: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /api/v1/profiles is not a JSON list ({e}): {body}"))
}

async fn wait_for_kept_profiles(agent: &Agent, count: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let list = kept_profiles(agent).await;
        if list.len() >= count {
            return list;
        }
        assert!(started.elapsed() < DEADLINE, "{count} profiles were not kept within {DEADLINE:?}: {list:?}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Checks every entry of the list against what the stand-in served (its n-th profile has
/// n + 1 samples), and that the newest come first.
fn check_kept_list(list: &[Value]) {
    let fields: BTreeSet<&str> =
        ["id", "target", "node", "service", "start", "duration_seconds", "samples", "size"].into_iter().collect();
    for entry in list {
        let keys: BTreeSet<&str> =
            entry.as_object().expect("an entry is an object").keys().map(String::as_str).collect();
        assert_eq!(keys, fields, "{entry}");
        assert_eq!(entry["target"], "feed", "{entry}");
        assert_eq!(entry["service"], "feed", "{entry}");
        assert_eq!(entry["node"], NODE, "{entry}");
        assert_eq!(entry["duration_seconds"], 1, "{entry}");
        let samples = entry["samples"].as_i64().expect("samples is a number");
        assert!(samples >= 1, "{entry}");
        assert_eq!(entry["size"], canned_profile(samples).len(), "the size of the profile served: {entry}");
        let start = entry["start"].as_str().expect("start is a string");
        let shape = start.len() == 24
            && start.ends_with('Z')
            && start.char_indices().all(|(i, c)| match i {
                4 | 7 => c == '-',
                10 => c == 'T',
                13 | 16 => c == ':',
                19 => c == '.',
                23 => c == 'Z',
                _ => c.is_ascii_digit(),
            });
        assert!(shape, "start is not an RFC 3339 time in UTC: {entry}");
    }
    for pair in list.windows(2) {
        let (newer, older) = (&pair[0], &pair[1]);
        assert!(newer["id"].as_str() > older["id"].as_str(), "not newest first: {newer} before {older}");
        assert!(newer["start"].as_str() >= older["start"].as_str(), "not newest first: {newer} before {older}");
        assert!(newer["samples"].as_i64() > older["samples"].as_i64(), "not newest first: {newer} before {older}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_profiles_are_listed_newest_first_served_in_every_format_and_kept_across_a_restart() {
    // The n-th capture (from 0) has n + 1 samples, so each kept profile says which it was.
    let feed = Stub::start(|n| std::future::ready((200, PPROF, canned_profile(n as i64 + 1)))).await;
    let on_demand = Stub::answering(200, PPROF, canned_profile(1)).await;
    let data = tempfile::tempdir().expect("cannot create a temporary directory");
    let config = TestConfig::new();
    let targets =
        [Target { name: "feed", url: feed.url(), interval: "200ms", seconds: 1 }, target("idle", on_demand.url())];
    let yaml = profiling_yaml(&config, None, Some(data.path()), &targets);

    let mut agent = Agent::start(&yaml).await;
    let before = wait_for_kept_profiles(&agent, 3).await;
    check_kept_list(&before);
    assert!(on_demand.requests().is_empty(), "a target without an interval was captured: {:?}", on_demand.requests());
    assert!(feed.requests().iter().all(|r| r == "/debug/pprof/profile?seconds=1"), "{:?}", feed.requests());
    let status = agent.stop().await;
    assert!(status.success(), "the agent exited with {status}");
    drop(agent);
    for entry in &before {
        let id = entry["id"].as_str().expect("id is a string");
        let file = data.path().join("profiles").join(format!("{id}.pb.gz"));
        assert!(file.is_file(), "{} is missing", file.display());
    }

    let agent = Agent::start(&yaml).await;
    let after = kept_profiles(&agent).await;
    check_kept_list(&after);
    let position = |entry: &Value| after.iter().position(|e| e == entry);
    let positions: Vec<Option<usize>> = before.iter().map(position).collect();
    assert!(
        positions.iter().all(Option::is_some),
        "profiles were lost in the restart:\nbefore {before:?}\nafter {after:?}"
    );
    assert!(positions.windows(2).all(|p| p[0] < p[1]), "the kept profiles changed order: {positions:?}");

    // The oldest kept profile, in every format.
    let oldest = before.last().expect("a kept profile");
    let id = oldest["id"].as_str().expect("id is a string");
    let samples = oldest["samples"].as_i64().expect("samples is a number");
    let url = |format: &str| agent.url(&format!("/api/v1/profiles/{id}{format}"));
    let pprof = fetch(&url(""), None).await.expect_ok("a kept profile", PPROF);
    assert_eq!(pprof.body, canned_profile(samples), "the kept profile is not what the target served");
    assert_eq!(fetch(&url("?format=pprof"), None).await.body, pprof.body);
    let top = pprof_top(&pprof.body);
    assert_eq!(top.functions.first().map(String::as_str), Some("stub.work"), "{}", top.output);
    let folded = fetch(&url("?format=folded"), None).await.expect_ok("a kept profile, folded", FOLDED);
    assert_eq!(folded.text(), format!("stub.main;stub.work {samples}\n"));
    let svg = fetch(&url("?format=svg"), None).await.expect_ok("a kept profile's flame graph", SVG);
    assert_eq!(svg_samples(&svg.text(), "stub.work"), samples as u64, "{}", svg.text());

    let answer = fetch(&url("?format=xml"), None).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    let answer = fetch(&agent.url("/api/v1/profiles/00000000000000000001-feed"), None).await;
    assert_eq!(answer.status, 404, "{}", answer.text());
    let answer = fetch(&agent.url("/api/v1/profiles/..%2F..%2Fperiscope.yaml"), None).await;
    assert_eq!(answer.status, 404, "{}", answer.text());
}
