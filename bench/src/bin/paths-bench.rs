//! `paths-bench`: Periscope's execution-path analysis in process — span records, span
//! metrics, trace assembly, analysis into handler trees, the service graph — without the
//! network or protobuf decoding.
//!
//! ```text
//! paths-bench [--phase all|throughput|memory|handlers] [--spans N] [--rate R] [--timeout-ms T]
//!             [--in-flight N] [--handlers H] [--traces-per-handler N] [--routes R] [--report FILE]
//! ```
//! Requests of the `handlers` workload (512 spans each) are built before any clock starts; a
//! pool of them is fed again and again with new trace ids each round. The processor's clock is
//! simulated: request `n` arrives at `n × 512 / rate` seconds and `Processor::expire` runs on
//! the agent's tick, so traces complete continuously after `--timeout-ms`.
//!
//! - **throughput**: after a warm-up of twice `rate × timeout` spans (steady state), feeds
//!   `--spans` spans; reports spans per CPU-second of the thread running `ingest` and `expire`
//!   (`CLOCK_THREAD_CPUTIME_ID` around those calls only) and wall time.
//! - **memory**: with a one-hour timeout, feeds traces until `--in-flight` wait in assembly;
//!   reports the growth of the heap (a counting allocator) and of `VmRSS` per span in flight.
//! - **handlers**: feeds `--traces-per-handler` traces of each of `--handlers` handlers and
//!   analyses them; reports the heap and `VmRSS` growth per handler.
//!
//! `all` runs each phase in a fresh process of its own, so that one phase's freed memory does
//! not hide the next one's growth. `--report FILE` writes the figures as `name=value` lines.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use periscope::config::PathsConfig;
use periscope::paths::{self, Paths, Processor, Rendered, TreeFormat};
use periscope::signal::Signal;
use periscope::telemetry::{Metrics, PathsMetrics};
use periscope_bench::args::Args;
use periscope_bench::report;
use periscope_bench::workload::{self, handlers, span_count};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: paths-bench [--phase all|throughput|memory|handlers] [--spans N] [--rate R] \
                     [--timeout-ms T] [--in-flight N] [--handlers H] [--traces-per-handler N] [--routes R] \
                     [--report FILE]";
const FLAGS: [&str; 9] =
    ["phase", "spans", "rate", "timeout-ms", "in-flight", "handlers", "traces-per-handler", "routes", "report"];
/// Spans per request, as the load generator sends them.
const BATCH: usize = 512;
/// Distinct requests fed round-robin.
const POOL: u64 = 64;
/// Distinct requests when handlers are many: enough traces per round to take every route.
const WIDE_POOL: u64 = 256;
/// Start time of the first trace (the spans' own clock, not the processor's).
const BASE_UNIX_NANOS: u64 = 1_700_000_000_000_000_000;

/// Counts the bytes this thread holds on the heap. The benchmark is single-threaded, so the
/// count is the processor's (and the benchmark's own) live heap.
struct CountingAllocator;

thread_local! {
    static LIVE_BYTES: Cell<i64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    let _ = LIVE_BYTES.try_with(|live| live.set(live.get() + delta));
}

fn live_bytes() -> i64 {
    LIVE_BYTES.with(Cell::get)
}

// SAFETY: every call is forwarded to the system allocator unchanged; only a thread-local
// counter is updated beside it.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size() as i64);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            count(layout.size() as i64);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn main() {
    if let Err(message) = run() {
        eprintln!("paths-bench: {message}");
        std::process::exit(1);
    }
}

/// The knobs, with their defaults.
struct Options {
    spans: u64,
    rate: u64,
    timeout: Duration,
    in_flight: u64,
    handlers: usize,
    traces_per_handler: u64,
    routes: usize,
}

fn run() -> Result<(), String> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args = Args::parse(raw.iter().cloned(), &FLAGS).map_err(|e| format!("{e}\n{USAGE}"))?;
    let number = |name: &str, default: u64| args.get(name, default).map_err(|e| e.to_string());
    let options = Options {
        spans: number("spans", 4_000_000)?,
        rate: number("rate", 50_000)?,
        timeout: Duration::from_millis(number("timeout-ms", 5_000)?),
        in_flight: number("in-flight", 50_000)?,
        handlers: number("handlers", 2_000)? as usize,
        traces_per_handler: number("traces-per-handler", 20)?,
        routes: number("routes", handlers::DEFAULT_ROUTES as u64)? as usize,
    };
    if options.spans == 0 || options.rate == 0 || options.in_flight == 0 || options.handlers == 0 || options.routes == 0
    {
        return Err("--spans, --rate, --in-flight, --handlers and --routes must be greater than 0".into());
    }
    let report_path = args.text("report").map(PathBuf::from);
    let figures = match args.text("phase").unwrap_or("all") {
        "all" => return run_all(&raw),
        "throughput" => throughput(&options),
        "memory" => memory(&options),
        "handlers" => aggregates(&options),
        other => return Err(format!("--phase {other:?}: expected all, throughput, memory or handlers\n{USAGE}")),
    };
    if let Some(path) = report_path {
        report::write(&path, &figures).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Runs every phase in a process of its own with the same flags; their reports go to
/// `--report` together.
fn run_all(raw: &[String]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut forwarded = Vec::new();
    let mut report_path = None;
    let mut args = raw.iter();
    while let Some(arg) = args.next() {
        let (name, value) = match arg.split_once('=') {
            Some((name, value)) => (name.to_string(), value.to_string()),
            None => (arg.clone(), args.next().cloned().unwrap_or_default()),
        };
        match name.as_str() {
            "--phase" => {}
            "--report" => report_path = Some(PathBuf::from(value)),
            _ => forwarded.extend([name, value]),
        }
    }
    let mut combined = String::new();
    for phase in ["throughput", "memory", "handlers"] {
        let part = std::env::temp_dir().join(format!("paths-bench-{}-{phase}.report", std::process::id()));
        let status = Command::new(&exe)
            .args(&forwarded)
            .args(["--phase", phase, "--report"])
            .arg(&part)
            .status()
            .map_err(|e| format!("cannot run the {phase} phase: {e}"))?;
        if !status.success() {
            return Err(format!("the {phase} phase failed ({status})"));
        }
        combined.push_str(&std::fs::read_to_string(&part).map_err(|e| format!("cannot read {}: {e}", part.display()))?);
        let _ = std::fs::remove_file(&part);
    }
    if let Some(path) = report_path {
        std::fs::write(&path, combined).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// A pool of requests fed round-robin, each round with new trace ids.
struct Feed {
    pool: Vec<ExportTraceServiceRequest>,
    size: u64,
    spans: Vec<u64>,
    traces: Vec<u64>,
    next: u64,
}

impl Feed {
    fn new(size: u64, routes: usize) -> Feed {
        let pool: Vec<ExportTraceServiceRequest> =
            (0..size).map(|i| handlers::request(i, BATCH, BASE_UNIX_NANOS, routes)).collect();
        let spans = pool.iter().map(span_count).collect();
        let traces = pool.iter().map(trace_count).collect();
        Feed { pool, size, spans, traces, next: 0 }
    }

    /// The next request, its spans and its traces.
    fn next(&mut self) -> (&ExportTraceServiceRequest, u64, u64) {
        let at = (self.next % self.size) as usize;
        let round = self.next / self.size;
        if round > 0 {
            workload::renew_trace_ids(
                &mut self.pool[at],
                workload::round_mask(round - 1) ^ workload::round_mask(round),
            );
        }
        self.next += 1;
        (&self.pool[at], self.spans[at], self.traces[at])
    }
}

fn trace_count(request: &ExportTraceServiceRequest) -> u64 {
    let ids: HashSet<&[u8]> = request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .map(|s| s.trace_id.as_slice())
        .collect();
    ids.len() as u64
}

struct Bench {
    metrics: Metrics,
    handles: PathsMetrics,
    paths: Paths,
    processor: Processor,
}

impl Bench {
    fn new(config: &PathsConfig) -> Bench {
        let metrics = Metrics::new();
        let handles = metrics.paths();
        let (paths, processor) = paths::build(config, metrics.paths(), metrics.component(paths::KEY, Signal::Traces));
        Bench { metrics, handles, paths, processor }
    }

    fn traces_in_flight(&self) -> i64 {
        self.handles.traces_in_flight.get()
    }

    fn spans_in_flight(&self) -> i64 {
        self.handles.spans_in_flight.get()
    }

    /// The processor's own self-metric lines about paths (anomalies, outcomes, sizes).
    fn self_metrics(&self) -> Vec<String> {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, self.metrics.registry()).is_err() {
            return Vec::new();
        }
        text.lines().filter(|l| l.starts_with("periscope_paths_") && !l.ends_with(" 0")).map(str::to_owned).collect()
    }
}

/// The agent's tick for a timeout, as `paths::build` sets it.
fn tick(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

fn throughput(options: &Options) -> Vec<(&'static str, String)> {
    let config = PathsConfig { trace_timeout: options.timeout, ..PathsConfig::default() };
    let mut bench = Bench::new(&config);
    let mut feed = Feed::new(POOL, options.routes);
    let tick = tick(options.timeout);
    let start = Instant::now();
    let arrival = |n: u64| start + Duration::from_secs_f64((n * BATCH as u64) as f64 / options.rate as f64);
    let warmup = (2.0 * options.rate as f64 * options.timeout.as_secs_f64()) as u64;
    let mut next_tick = start + tick;
    let mut n = 0;

    // Warm-up: the same loop, unmeasured, until assembly holds its steady state.
    let mut fed = 0;
    while fed < warmup {
        let now = arrival(n);
        let (request, spans, _) = feed.next();
        bench.processor.ingest(request, now);
        while next_tick <= now {
            bench.processor.expire(next_tick);
            next_tick += tick;
        }
        fed += spans;
        n += 1;
    }

    let (mut ingest_cpu, mut expire_cpu) = (Duration::ZERO, Duration::ZERO);
    let process_before = cpu(libc::CLOCK_PROCESS_CPUTIME_ID);
    let wall = Instant::now();
    let mut measured = 0;
    while measured < options.spans {
        let now = arrival(n);
        let (request, spans, _) = feed.next();
        let before = cpu(libc::CLOCK_THREAD_CPUTIME_ID);
        bench.processor.ingest(request, now);
        let between = cpu(libc::CLOCK_THREAD_CPUTIME_ID);
        while next_tick <= now {
            bench.processor.expire(next_tick);
            next_tick += tick;
        }
        let after = cpu(libc::CLOCK_THREAD_CPUTIME_ID);
        ingest_cpu += between - before;
        expire_cpu += after - between;
        measured += spans;
        n += 1;
    }
    let wall = wall.elapsed();
    let process_cpu = cpu(libc::CLOCK_PROCESS_CPUTIME_ID) - process_before;
    let in_flight = (bench.traces_in_flight(), bench.spans_in_flight());

    let flush_cpu = {
        let before = cpu(libc::CLOCK_THREAD_CPUTIME_ID);
        bench.processor.flush();
        cpu(libc::CLOCK_THREAD_CPUTIME_ID) - before
    };
    let summaries = bench.paths.handlers();
    // The busiest front handler: the downstream one has a single path.
    let variants = summaries
        .iter()
        .find(|h| h.service != handlers::DOWNSTREAM)
        .and_then(|h| match bench.paths.tree(&h.service, &h.handler, TreeFormat::Json) {
            Some(Ok(Rendered::Json(tree))) => Some(tree.variants.len()),
            _ => None,
        })
        .unwrap_or(0);
    let cpu_total = ingest_cpu + expire_cpu;
    let per_cpu_second = measured as f64 / cpu_total.as_secs_f64();
    println!(
        "throughput: {measured} spans in {:.2} s of CPU ({:.2} s wall): {:.0} spans per CPU-second",
        cpu_total.as_secs_f64(),
        wall.as_secs_f64(),
        per_cpu_second
    );
    println!(
        "  ingest (records, span metrics, assembly) {:.2} s, expire (analysis, graph) {:.2} s; process CPU {:.2} s",
        ingest_cpu.as_secs_f64(),
        expire_cpu.as_secs_f64(),
        process_cpu.as_secs_f64()
    );
    println!(
        "  simulated {} spans/s, trace_timeout {:?}: {} traces ({} spans) in flight at the end; flush {:.3} s",
        options.rate,
        options.timeout,
        in_flight.0,
        in_flight.1,
        flush_cpu.as_secs_f64()
    );
    println!("  {} handlers; the busiest front handler has {variants} variants", summaries.len());
    for line in bench.self_metrics() {
        println!("  {line}");
    }
    vec![
        ("throughput_spans", measured.to_string()),
        ("throughput_cpu_s", format!("{:.3}", cpu_total.as_secs_f64())),
        ("throughput_ingest_cpu_s", format!("{:.3}", ingest_cpu.as_secs_f64())),
        ("throughput_expire_cpu_s", format!("{:.3}", expire_cpu.as_secs_f64())),
        ("throughput_wall_s", format!("{:.3}", wall.as_secs_f64())),
        ("throughput_spans_per_cpu_s", format!("{per_cpu_second:.0}")),
        ("throughput_traces_in_flight", in_flight.0.to_string()),
        ("throughput_spans_in_flight", in_flight.1.to_string()),
        ("throughput_handlers", summaries.len().to_string()),
        ("throughput_variants", variants.to_string()),
    ]
}

fn memory(options: &Options) -> Vec<(&'static str, String)> {
    let config = PathsConfig {
        trace_timeout: Duration::from_secs(3600),
        max_traces_in_flight: options.in_flight as usize + BATCH,
        ..PathsConfig::default()
    };
    let mut bench = Bench::new(&config);
    let mut feed = Feed::new(POOL, options.routes);
    let now = Instant::now();
    // One round through the pool, analysed, so that the aggregates exist before the reading.
    for _ in 0..POOL {
        let (request, ..) = feed.next();
        bench.processor.ingest(request, now);
    }
    bench.processor.flush();

    let (heap_before, rss_before) = (live_bytes(), rss_bytes());
    let mut traces = 0;
    while traces < options.in_flight {
        let (request, _, in_request) = feed.next();
        bench.processor.ingest(request, now);
        traces += in_request;
    }
    let (heap_after, rss_after) = (live_bytes(), rss_bytes());
    let (traces, spans) = (bench.traces_in_flight(), bench.spans_in_flight());
    let heap_per_span = (heap_after - heap_before) as f64 / spans as f64;
    let rss_per_span = (rss_after - rss_before) as f64 / spans as f64;
    println!(
        "memory: {traces} traces ({spans} spans) in flight: heap +{:.1} MiB ({heap_per_span:.0} B per span), \
         VmRSS +{:.1} MiB ({rss_per_span:.0} B per span)",
        mib(heap_after - heap_before),
        mib(rss_after - rss_before),
    );
    vec![
        ("memory_traces_in_flight", traces.to_string()),
        ("memory_spans_in_flight", spans.to_string()),
        ("memory_heap_bytes", (heap_after - heap_before).to_string()),
        ("memory_rss_bytes", (rss_after - rss_before).to_string()),
        ("memory_heap_bytes_per_span", format!("{heap_per_span:.0}")),
        ("memory_rss_bytes_per_span", format!("{rss_per_span:.0}")),
    ]
}

fn aggregates(options: &Options) -> Vec<(&'static str, String)> {
    // Traces complete as they go (a short timeout on the simulated clock), so what remains
    // at the end is the aggregates, not traces waiting.
    let timeout = Duration::from_secs(1);
    let config = PathsConfig {
        trace_timeout: timeout,
        // The front handlers and the downstream one, none counted as overflow.
        max_handlers: options.handlers + 1,
        ..PathsConfig::default()
    };
    let mut bench = Bench::new(&config);
    let mut feed = Feed::new(WIDE_POOL, options.handlers);
    let target = options.traces_per_handler * options.handlers as u64;
    let tick = tick(timeout);
    let start = Instant::now();
    let mut next_tick = start + tick;
    let (heap_before, rss_before) = (live_bytes(), rss_bytes());
    let (mut traces, mut n) = (0, 0);
    while traces < target {
        let now = start + Duration::from_secs_f64((n * BATCH as u64) as f64 / options.rate as f64);
        let (request, _, in_request) = feed.next();
        bench.processor.ingest(request, now);
        while next_tick <= now {
            bench.processor.expire(next_tick);
            next_tick += tick;
        }
        traces += in_request;
        n += 1;
    }
    bench.processor.flush();
    let (heap_after, rss_after) = (live_bytes(), rss_bytes());
    let handlers = bench.paths.handlers().len();
    let heap_per_handler = (heap_after - heap_before) as f64 / handlers as f64;
    let rss_per_handler = (rss_after - rss_before) as f64 / handlers as f64;
    println!(
        "handlers: {traces} traces over {handlers} handlers analysed: heap +{:.1} MiB ({:.1} KiB per handler), \
         VmRSS +{:.1} MiB ({:.1} KiB per handler)",
        mib(heap_after - heap_before),
        heap_per_handler / 1024.0,
        mib(rss_after - rss_before),
        rss_per_handler / 1024.0,
    );
    for line in bench.self_metrics() {
        println!("  {line}");
    }
    vec![
        ("handlers_count", handlers.to_string()),
        ("handlers_traces", traces.to_string()),
        ("handlers_heap_bytes", (heap_after - heap_before).to_string()),
        ("handlers_rss_bytes", (rss_after - rss_before).to_string()),
        ("handlers_heap_bytes_per_handler", format!("{heap_per_handler:.0}")),
        ("handlers_rss_bytes_per_handler", format!("{rss_per_handler:.0}")),
    ]
}

/// CPU time of `clock` (this thread's or this process's).
fn cpu(clock: libc::clockid_t) -> Duration {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let result = unsafe { libc::clock_gettime(clock, &mut now) };
    assert_eq!(result, 0, "clock_gettime({clock}) failed");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// `VmRSS` of this process in bytes.
fn rss_bytes() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status is readable");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        .map(|kib| kib * 1024)
        .expect("/proc/self/status has VmRSS")
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
