//! `scrape-bench`: the agent's Prometheus exposition parser in process, on a large exposition
//! shaped like a busy node's.
//!
//! ```text
//! scrape-bench [--series N] [--format text|openmetrics|both] [--seconds S] [--report FILE]
//! scrape-bench [--series N] [--format text|openmetrics] --write FILE   (text by default)
//! ```
//! The exposition is built once, before any clock starts: `N` series (100,000 by default) in
//! eight families — HTTP and gRPC request counters with four labels, container CPU counters and
//! memory gauges with four or five labels and pod-style values, resource-request gauges with six,
//! queue gauges, and two histograms (11 and 9 bounds plus `+Inf`, `_sum` and `_count`) — with
//! values written as Go's client library writes them (`1.234567e+06`). Then
//! `periscope::sources::prometheus::parse::parse` runs on it again and again for `S`
//! CPU-seconds per format (3 by default), dropping each result as a scrape does. The figure is
//! samples per CPU-second of this (single-threaded) process, from the median parse.
//!
//! `--write FILE` writes the exposition to `FILE` instead (for `metrics-target` to serve), and
//! prints its sum of sample values, which a receiver holding every sample reproduces.

use periscope::config::StaticTarget;
use periscope::sources::prometheus::parse::{self, Format};
use periscope::sources::prometheus::scrape::Target;
use periscope_bench::args::Args;
use periscope_bench::report;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

const USAGE: &str = "usage: scrape-bench [--series N] [--format text|openmetrics|both] [--seconds S] [--report FILE] \
                     [--write FILE]";
const FLAGS: [&str; 5] = ["series", "format", "seconds", "report", "write"];
/// Parses timed per format at least, however fast they are.
const MIN_PARSES: usize = 5;

fn main() {
    // The allocator set up as the agent sets it up.
    periscope::memory::configure();
    if let Err(message) = run() {
        eprintln!("scrape-bench: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args = Args::parse(raw, &FLAGS).map_err(|e| format!("{e}\n{USAGE}"))?;
    let series: usize = args.get("series", 100_000).map_err(|e| e.to_string())?;
    let seconds: f64 = args.get("seconds", 3.0).map_err(|e| e.to_string())?;
    let writing = args.text("write").is_some();
    let formats = match args
        .text("format")
        .unwrap_or(if writing { "text" } else { "both" })
    {
        "text" => vec![Format::Text],
        "openmetrics" => vec![Format::OpenMetrics],
        "both" if !writing => vec![Format::Text, Format::OpenMetrics],
        other => {
            return Err(format!(
                "--format {other:?}: expected text, openmetrics or (without --write) both"
            ))
        }
    };
    let exposition = Exposition::build(series);

    if let Some(path) = args.text("write") {
        let body = exposition.body(formats[0]);
        std::fs::write(path, body).map_err(|e| format!("cannot write {path}: {e}"))?;
        println!(
            "series={} bytes={} value_sum={:e}",
            exposition.samples,
            body.len(),
            exposition.value_sum
        );
        return Ok(());
    }

    println!(
        "{} series in {} families: {} counter, {} gauge and {} histogram samples",
        exposition.samples,
        exposition.families,
        exposition.counters,
        exposition.gauges,
        exposition.histograms
    );
    let mut figures = vec![("series", exposition.samples.to_string())];
    for format in formats {
        let body = exposition.body(format);
        let timing = measure(body, format, exposition.samples, seconds)?;
        let name = match format {
            Format::Text => "text",
            Format::OpenMetrics => "openmetrics",
        };
        // As a scrape reads the body: a target's first scrape (parse, label, build the series
        // table and the template) and every scrape after it with the same series (template).
        let first = measure_scrape(body, format, exposition.samples, seconds, true)?;
        let steady = measure_scrape(body, format, exposition.samples, seconds, false)?;
        for (what, t) in [("first scrape", &first), ("same series", &steady)] {
            println!(
                "{name:>11}: scrape read, {what}: {} reads, median {:.2} ms: {:.2} M samples per CPU-second",
                t.parses,
                t.median.as_secs_f64() * 1e3,
                t.samples_per_second() / 1e6
            );
        }
        figures.push((leak(format!("{name}_first_samples_per_cpu_s")), format!("{:.0}", first.samples_per_second())));
        figures.push((leak(format!("{name}_template_samples_per_cpu_s")), format!("{:.0}", steady.samples_per_second())));
        println!(
            "{name:>11}: {:.1} MB, {} parses, median {:.2} ms: {:.2} M samples per CPU-second, {:.0} MB per CPU-second \
             (all parses: {:.2} M/s)",
            body.len() as f64 / 1e6,
            timing.parses,
            timing.median.as_secs_f64() * 1e3,
            timing.samples_per_second() / 1e6,
            body.len() as f64 / timing.median.as_secs_f64() / 1e6,
            timing.overall_samples_per_second() / 1e6,
        );
        figures.push((leak(format!("{name}_bytes")), body.len().to_string()));
        figures.push((leak(format!("{name}_parses")), timing.parses.to_string()));
        figures.push((
            leak(format!("{name}_median_ms")),
            format!("{:.3}", timing.median.as_secs_f64() * 1e3),
        ));
        figures.push((
            leak(format!("{name}_samples_per_cpu_s")),
            format!("{:.0}", timing.samples_per_second()),
        ));
    }
    if let Some(path) = args.text("report") {
        let path = PathBuf::from(path);
        report::write(&path, &figures)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Report names are built once per run; leaking them keeps the report's `&str` keys simple.
fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

/// CPU time of parses of one body.
struct Timing {
    samples: usize,
    parses: usize,
    median: Duration,
    total: Duration,
}

impl Timing {
    fn samples_per_second(&self) -> f64 {
        self.samples as f64 / self.median.as_secs_f64()
    }

    fn overall_samples_per_second(&self) -> f64 {
        (self.samples * self.parses) as f64 / self.total.as_secs_f64()
    }
}

/// Parses `body` for about `seconds` of CPU time (one untimed parse first, which also checks
/// that every sample is there).
fn measure(body: &str, format: Format, samples: usize, seconds: f64) -> Result<Timing, String> {
    let parsed = parse::parse(body, format)
        .map_err(|e| format!("the {format:?} exposition does not parse: {e}"))?;
    if parsed.samples.len() != samples {
        return Err(format!(
            "{format:?}: {} samples parsed, {samples} written",
            parsed.samples.len()
        ));
    }
    drop(parsed);
    let budget = Duration::from_secs_f64(seconds);
    let mut times = Vec::new();
    let mut total = Duration::ZERO;
    while total < budget || times.len() < MIN_PARSES {
        let before = process_cpu();
        let parsed = parse::parse(std::hint::black_box(body), format);
        drop(std::hint::black_box(parsed));
        let spent = process_cpu() - before;
        times.push(spent);
        total += spent;
    }
    times.sort_unstable();
    Ok(Timing {
        samples,
        parses: times.len(),
        median: times[times.len() / 2],
        total,
    })
}

/// Reads `body` as a scrape target does, for about `seconds` of CPU time: with `fresh`, a new
/// target each time (its first scrape); else one target whose template fits every body.
fn measure_scrape(body: &str, format: Format, samples: usize, seconds: f64, fresh: bool) -> Result<Timing, String> {
    let config = StaticTarget { job: "bench".into(), url: "http://127.0.0.1:9/metrics".into(), labels: Default::default() };
    let client = periscope::sources::prometheus::client()?;
    let new_target = || Target::new(&config, client.clone(), Duration::from_secs(5), 200_000);
    let mut target = new_target();
    let read = target.read_body(body.as_bytes(), format).map_err(|e| e.to_string())?;
    if read != samples || !target.has_template() {
        return Err(format!("{format:?}: the scrape read {read} samples of {samples}, template: {}", target.has_template()));
    }
    // As a scrape does after a full parse: what it left free in the heap goes back.
    periscope::memory::release();
    let budget = Duration::from_secs_f64(seconds);
    let mut times = Vec::new();
    let mut total = Duration::ZERO;
    while total < budget || times.len() < MIN_PARSES {
        if fresh {
            target = new_target();
        }
        let before = process_cpu();
        let read = target.read_body(std::hint::black_box(body.as_bytes()), format);
        std::hint::black_box(&read);
        let spent = process_cpu() - before;
        times.push(spent);
        total += spent;
    }
    times.sort_unstable();
    Ok(Timing { samples, parses: times.len(), median: times[times.len() / 2], total })
}

/// CPU time (user + system) of this process.
fn process_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

// --- the exposition ---------------------------------------------------------------------------

const SERVICES: [&str; 25] = [
    "checkout",
    "cart",
    "catalog",
    "payments",
    "shipping",
    "recommendations",
    "search",
    "accounts",
    "inventory",
    "pricing",
    "reviews",
    "notifications",
    "auth",
    "gateway",
    "orders",
    "media",
    "ads",
    "loyalty",
    "fraud",
    "tax",
    "currency",
    "email",
    "profile",
    "session",
    "feed",
];
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];
const ROUTES: [&str; 40] = [
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/login",
    "/logout",
    "/api/v1/users",
    "/api/v1/users/{id}",
    "/api/v1/users/{id}/orders",
    "/api/v1/users/{id}/addresses",
    "/api/v1/orders",
    "/api/v1/orders/{id}",
    "/api/v1/orders/{id}/items",
    "/api/v1/orders/{id}/cancel",
    "/api/v1/cart",
    "/api/v1/cart/items",
    "/api/v1/cart/items/{sku}",
    "/api/v1/products",
    "/api/v1/products/{sku}",
    "/api/v1/products/{sku}/reviews",
    "/api/v1/search",
    "/api/v1/search/suggest",
    "/api/v1/payments",
    "/api/v1/payments/{id}",
    "/api/v1/payments/{id}/refund",
    "/api/v1/shipments",
    "/api/v1/shipments/{id}/track",
    "/api/v2/feed",
    "/api/v2/feed/{cursor}",
    "/api/v2/recommendations",
    "/api/v2/notifications",
    "/api/v2/notifications/{id}/read",
    "/api/v2/sessions",
    "/api/v2/sessions/{id}",
    "/internal/cache/flush",
    "/internal/config",
    "/webhooks/stripe",
    "/webhooks/github",
    "/graphql",
    "/static/{path}",
];
const STATUS_CODES: [&str; 8] = ["200", "201", "204", "304", "400", "404", "500", "503"];
const GRPC_SERVICES: [&str; 20] = [
    "payments.v1.PaymentService",
    "orders.v1.OrderService",
    "catalog.v1.CatalogService",
    "cart.v1.CartService",
    "users.v1.UserService",
    "auth.v1.AuthService",
    "search.v1.SearchService",
    "pricing.v1.PricingService",
    "inventory.v1.InventoryService",
    "shipping.v1.ShippingService",
    "reviews.v1.ReviewService",
    "feed.v2.FeedService",
    "ads.v1.AdService",
    "fraud.v1.FraudService",
    "tax.v1.TaxService",
    "currency.v1.CurrencyService",
    "email.v1.EmailService",
    "media.v1.MediaService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
];
const GRPC_METHODS: [&str; 25] = [
    "Get",
    "List",
    "Create",
    "Update",
    "Delete",
    "Search",
    "Watch",
    "Check",
    "BatchGet",
    "Reserve",
    "Release",
    "Authorize",
    "Capture",
    "Refund",
    "Quote",
    "Convert",
    "Send",
    "Track",
    "Validate",
    "Score",
    "Rank",
    "Upload",
    "Download",
    "Subscribe",
    "Ping",
];
const GRPC_CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const GRPC_TYPES: [&str; 2] = ["unary", "server_stream"];
const NAMESPACES: [&str; 12] = [
    "default",
    "kube-system",
    "monitoring",
    "payments",
    "checkout",
    "search",
    "ingress-nginx",
    "cert-manager",
    "logging",
    "data",
    "ml-serving",
    "platform",
];
const CONTAINERS: [&str; 3] = ["app", "istio-proxy", "log-shipper"];
const RESOURCES: [(&str, &str); 2] = [("cpu", "core"), ("memory", "byte")];
const QUEUES: [&str; 30] = [
    "orders.created",
    "orders.paid",
    "orders.cancelled",
    "payments.authorized",
    "payments.captured",
    "payments.refunded",
    "shipments.created",
    "shipments.delivered",
    "emails.outbound",
    "emails.bounced",
    "search.reindex",
    "catalog.updated",
    "prices.changed",
    "inventory.reserved",
    "inventory.released",
    "reviews.submitted",
    "fraud.checks",
    "fraud.alerts",
    "feed.fanout",
    "notifications.push",
    "notifications.sms",
    "users.signup",
    "users.deleted",
    "sessions.expired",
    "ads.impressions",
    "ads.clicks",
    "media.transcode",
    "media.thumbnails",
    "audit.events",
    "dead-letter",
];
const HTTP_BOUNDS: [&str; 11] = [
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
];
const RPC_BOUNDS: [&str; 9] = [
    "0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "5", "10",
];
/// Letters Kubernetes uses in generated names.
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The exposition in both formats, and what it holds.
struct Exposition {
    text: String,
    open_metrics: String,
    samples: usize,
    families: usize,
    counters: usize,
    gauges: usize,
    histograms: usize,
    /// The sum of every sample's value.
    value_sum: f64,
}

/// A small deterministic generator (SplitMix64), so every run serves the same exposition.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A whole number spread over several orders of magnitude below `max`, as counters are.
    fn count(&mut self, max: f64) -> f64 {
        (max.powf(self.unit())).floor()
    }
}

/// Digit `position` of `index` in a mixed radix whose digits are the pools' sizes; the last
/// digit is unbounded, so any index gets a distinct combination.
fn digits(mut index: usize, sizes: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        if i + 1 == sizes.len() {
            out.push(index);
        } else {
            out.push(index % size);
            index /= size;
        }
    }
    out
}

/// `pool[digit]`, or when the digit is past the pool, a numbered variant of one of its values.
fn pick(pool: &[&str], digit: usize) -> String {
    match pool.get(digit) {
        Some(value) => (*value).to_owned(),
        None => format!("{}-{}", pool[digit % pool.len()], digit / pool.len()),
    }
}

/// A name as Kubernetes generates them: `len` characters from its alphabet, from `seed`.
fn generated(mut seed: u64, len: usize) -> String {
    let base = NAME_ALPHABET.len() as u64;
    (0..len)
        .map(|_| {
            let c = NAME_ALPHABET[(seed % base) as usize] as char;
            seed /= base;
            c
        })
        .collect()
}

/// Pod `index`: its namespace, name and node.
fn pod(index: usize) -> (&'static str, String, String) {
    let service = SERVICES[index % SERVICES.len()];
    let namespace = NAMESPACES[(index / SERVICES.len()) % NAMESPACES.len()];
    // One replica set per service and namespace; pods of it differ in the last part, which
    // is distinct for every index below 27⁵ (the multiplier is prime to 27).
    let replica_set = generated(
        Rng((index % (SERVICES.len() * NAMESPACES.len())) as u64).next(),
        10,
    );
    let name = format!(
        "{service}-{replica_set}-{}",
        generated(index as u64 * 5_217_031 + 1_234_567, 5)
    );
    let node = (index.wrapping_mul(2_654_435_761) >> 7) % 60;
    let node = format!(
        "ip-10-0-{}-{}.eu-west-1.compute.internal",
        16 + node / 8,
        10 + (node % 8) * 23
    );
    (namespace, name, node)
}

/// Writes a float as Go's `strconv.FormatFloat(v, 'g', -1, 64)` does, which is how Go's
/// client library (most exporters) writes values: exponent form from 1e6 up and below 1e-4.
fn go_float(out: &mut String, value: f64) {
    if value == 0.0 || !value.is_finite() {
        let _ = write!(out, "{value}");
        return;
    }
    let scientific = format!("{value:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..6).contains(&exponent) {
        let _ = write!(out, "{value}");
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        let _ = write!(out, "{mantissa}e{sign}{:02}", exponent.abs());
    }
}

/// Writes both formats side by side: the sample lines are the same, the metadata differs
/// (an OpenMetrics counter family is named without `_total`) and OpenMetrics ends in `# EOF`.
struct Writer {
    exposition: Exposition,
    rng: Rng,
    line: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (type_name, open_metrics_name) = match kind {
            Kind::Counter => ("counter", name.strip_suffix("_total").unwrap_or(name)),
            Kind::Gauge => ("gauge", name),
            Kind::Histogram => ("histogram", name),
        };
        let e = &mut self.exposition;
        let _ = write!(e.text, "# HELP {name} {help}\n# TYPE {name} {type_name}\n");
        let _ = write!(
            e.open_metrics,
            "# HELP {open_metrics_name} {help}\n# TYPE {open_metrics_name} {type_name}\n"
        );
        e.families += 1;
    }

    /// One sample: `name{labels} value`.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64, kind: Kind) {
        self.line.clear();
        self.line.push_str(name);
        if !labels.is_empty() {
            self.line.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.line.push(',');
                }
                let _ = write!(self.line, "{label}=\"{value}\"");
            }
            self.line.push('}');
        }
        self.line.push(' ');
        go_float(&mut self.line, value);
        self.line.push('\n');
        let e = &mut self.exposition;
        e.text.push_str(&self.line);
        e.open_metrics.push_str(&self.line);
        e.samples += 1;
        e.value_sum += value;
        match kind {
            Kind::Counter => e.counters += 1,
            Kind::Gauge => e.gauges += 1,
            Kind::Histogram => e.histograms += 1,
        }
    }

    /// One histogram series: cumulative buckets, `+Inf`, `_sum` and `_count`.
    fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[&str],
        typical_seconds: f64,
    ) {
        let total = self.rng.count(5e6);
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        with_le.push(("le", ""));
        let mut cumulative = 0.0;
        let bucket = format!("{name}_bucket");
        for bound in bounds {
            let upper: f64 = bound.parse().unwrap_or(f64::INFINITY);
            // A log-normal-ish shape around the typical latency.
            let share = 1.0 / (1.0 + (typical_seconds / upper).powf(1.6));
            cumulative = (total * share).floor().max(cumulative);
            *with_le.last_mut().expect("le was pushed") = ("le", bound);
            self.sample(&bucket, &with_le, cumulative, Kind::Histogram);
        }
        *with_le.last_mut().expect("le was pushed") = ("le", "+Inf");
        self.sample(&bucket, &with_le, total, Kind::Histogram);
        let sum = total * typical_seconds * (0.8 + 0.4 * self.rng.unit());
        self.sample(
            &format!("{name}_sum"),
            labels,
            (sum * 1e3).round() / 1e3,
            Kind::Histogram,
        );
        self.sample(&format!("{name}_count"), labels, total, Kind::Histogram);
    }
}

impl Exposition {
    /// An exposition of exactly `series` samples.
    fn build(series: usize) -> Exposition {
        let empty = Exposition {
            text: String::with_capacity(series * 160),
            open_metrics: String::with_capacity(series * 160),
            samples: 0,
            families: 0,
            counters: 0,
            gauges: 0,
            histograms: 0,
            value_sum: 0.0,
        };
        let mut w = Writer {
            exposition: empty,
            rng: Rng(0x5eed),
            line: String::new(),
        };
        let share = |percent: usize| series * percent / 100;
        let http_buckets = HTTP_BOUNDS.len() + 3;
        let rpc_buckets = RPC_BOUNDS.len() + 3;

        w.family(
            "http_server_requests_total",
            Kind::Counter,
            "Total number of HTTP requests handled, by route and status code.",
        );
        for i in 0..share(20) {
            let d = digits(
                i,
                &[
                    STATUS_CODES.len(),
                    METHODS.len(),
                    ROUTES.len(),
                    SERVICES.len(),
                ],
            );
            let (status, method, route, service) = (
                pick(&STATUS_CODES, d[0]),
                pick(&METHODS, d[1]),
                pick(&ROUTES, d[2]),
                pick(&SERVICES, d[3]),
            );
            let value = w.rng.count(2e7);
            let labels = [
                ("service", &*service),
                ("method", &*method),
                ("route", &*route),
                ("status_code", &*status),
            ];
            w.sample("http_server_requests_total", &labels, value, Kind::Counter);
        }

        w.family(
            "http_server_request_duration_seconds",
            Kind::Histogram,
            "Time spent handling HTTP requests, in seconds.",
        );
        for i in 0..share(25) / http_buckets {
            let d = digits(i, &[METHODS.len(), ROUTES.len(), SERVICES.len()]);
            let (method, route, service) = (
                pick(&METHODS, d[0]),
                pick(&ROUTES, d[1]),
                pick(&SERVICES, d[2]),
            );
            let typical = 0.02 + 0.3 * w.rng.unit();
            let labels = [
                ("service", &*service),
                ("method", &*method),
                ("route", &*route),
            ];
            w.histogram(
                "http_server_request_duration_seconds",
                &labels,
                &HTTP_BOUNDS,
                typical,
            );
        }

        w.family(
            "grpc_server_handled_total",
            Kind::Counter,
            "Total number of RPCs completed on the server, regardless of success or failure.",
        );
        for i in 0..share(10) {
            let d = digits(
                i,
                &[
                    GRPC_CODES.len(),
                    GRPC_TYPES.len(),
                    GRPC_METHODS.len(),
                    GRPC_SERVICES.len(),
                ],
            );
            let (code, kind, method, service) = (
                pick(&GRPC_CODES, d[0]),
                pick(&GRPC_TYPES, d[1]),
                pick(&GRPC_METHODS, d[2]),
                pick(&GRPC_SERVICES, d[3]),
            );
            let value = w.rng.count(5e6);
            let labels = [
                ("grpc_service", &*service),
                ("grpc_method", &*method),
                ("grpc_code", &*code),
                ("grpc_type", &*kind),
            ];
            w.sample("grpc_server_handled_total", &labels, value, Kind::Counter);
        }

        w.family(
            "container_cpu_usage_seconds_total",
            Kind::Counter,
            "Cumulative cpu time consumed in seconds.",
        );
        for i in 0..share(10) {
            let (namespace, pod, node) = pod(i / CONTAINERS.len());
            let container = CONTAINERS[i % CONTAINERS.len()];
            let value = (w.rng.unit() * 2e5 * 1e6).round() / 1e6;
            let labels = [
                ("namespace", namespace),
                ("pod", &*pod),
                ("container", container),
                ("node", &*node),
                ("cpu", "total"),
            ];
            w.sample(
                "container_cpu_usage_seconds_total",
                &labels,
                value,
                Kind::Counter,
            );
        }

        w.family(
            "container_memory_working_set_bytes",
            Kind::Gauge,
            "Current working set in bytes.",
        );
        for i in 0..share(10) {
            let (namespace, pod, node) = pod(i / CONTAINERS.len());
            let container = CONTAINERS[i % CONTAINERS.len()];
            // 1 MiB to 4 GiB, in pages.
            let value = (2f64.powf(20.0 + 12.0 * w.rng.unit()) / 4096.0).floor() * 4096.0;
            let labels = [
                ("namespace", namespace),
                ("pod", &*pod),
                ("container", container),
                ("node", &*node),
            ];
            w.sample(
                "container_memory_working_set_bytes",
                &labels,
                value,
                Kind::Gauge,
            );
        }

        w.family(
            "kube_pod_container_resource_requests",
            Kind::Gauge,
            "The number of requested request resource by a container.",
        );
        for i in 0..share(10) {
            let (namespace, pod, node) = pod(i / (CONTAINERS.len() * RESOURCES.len()));
            let container = CONTAINERS[(i / RESOURCES.len()) % CONTAINERS.len()];
            let (resource, unit) = RESOURCES[i % RESOURCES.len()];
            let value = match resource {
                "cpu" => [0.05, 0.1, 0.25, 0.5, 1.0, 2.0][w.rng.next() as usize % 6],
                _ => [
                    6.7108864e7,
                    1.34217728e8,
                    2.68435456e8,
                    5.36870912e8,
                    1.073741824e9,
                ][w.rng.next() as usize % 5],
            };
            let labels = [
                ("namespace", namespace),
                ("pod", &*pod),
                ("container", container),
                ("node", &*node),
                ("resource", resource),
                ("unit", unit),
            ];
            w.sample(
                "kube_pod_container_resource_requests",
                &labels,
                value,
                Kind::Gauge,
            );
        }

        w.family(
            "rpc_client_duration_seconds",
            Kind::Histogram,
            "Duration of outbound RPCs, in seconds.",
        );
        for i in 0..share(10) / rpc_buckets {
            let d = digits(i, &[GRPC_METHODS.len(), SERVICES.len(), SERVICES.len()]);
            let (method, peer, service) = (
                pick(&GRPC_METHODS, d[0]),
                pick(&SERVICES, d[1]),
                pick(&SERVICES, d[2]),
            );
            let typical = 0.002 + 0.05 * w.rng.unit();
            let labels = [
                ("service", &*service),
                ("peer_service", &*peer),
                ("rpc_method", &*method),
            ];
            w.histogram("rpc_client_duration_seconds", &labels, &RPC_BOUNDS, typical);
        }

        // The rest, to reach exactly `series`.
        w.family(
            "queue_messages_pending",
            Kind::Gauge,
            "Messages waiting in a queue partition.",
        );
        for i in 0..series - w.exposition.samples {
            let d = digits(i, &[64, QUEUES.len(), SERVICES.len()]);
            let (partition, queue, service) =
                (d[0].to_string(), pick(&QUEUES, d[1]), pick(&SERVICES, d[2]));
            let value = w.rng.count(1e5);
            let labels = [
                ("service", &*service),
                ("queue", &*queue),
                ("partition", &*partition),
            ];
            w.sample("queue_messages_pending", &labels, value, Kind::Gauge);
        }

        w.exposition.open_metrics.push_str("# EOF\n");
        w.exposition
    }

    fn body(&self, format: Format) -> &str {
        match format {
            Format::Text => &self.text,
            Format::OpenMetrics => &self.open_metrics,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go(value: f64) -> String {
        let mut out = String::new();
        go_float(&mut out, value);
        out
    }

    #[test]
    fn floats_are_written_as_go_writes_them() {
        assert_eq!(go(0.0), "0");
        assert_eq!(go(123456.0), "123456");
        assert_eq!(go(1234567.0), "1.234567e+06");
        assert_eq!(go(2.68435456e8), "2.68435456e+08");
        assert_eq!(go(0.0001), "0.0001");
        assert_eq!(go(0.00001234), "1.234e-05");
        assert_eq!(go(12.5), "12.5");
    }

    #[test]
    fn both_formats_parse_to_exactly_the_series_asked_for() {
        for series in [1_000, 12_345] {
            let e = Exposition::build(series);
            assert_eq!(e.samples, series);
            for format in [Format::Text, Format::OpenMetrics] {
                let parsed = parse::parse(e.body(format), format).unwrap();
                assert_eq!(parsed.samples.len(), series);
                assert_eq!(parsed.families.len(), e.families);
                let sum: f64 = parsed.samples.iter().map(|s| s.value).sum();
                assert!((sum - e.value_sum).abs() <= e.value_sum * 1e-12);
            }
        }
    }

    #[test]
    fn label_values_look_like_a_cluster() {
        let (namespace, name, node) = pod(31);
        assert_eq!(namespace, "kube-system");
        assert!(
            name.starts_with("search-") && name.len() == "search-".len() + 16,
            "{name}"
        );
        assert!(
            node.starts_with("ip-10-0-") && node.ends_with(".eu-west-1.compute.internal"),
            "{node}"
        );
        let pods: std::collections::HashSet<String> = (0..20_000).map(|i| pod(i).1).collect();
        assert_eq!(pods.len(), 20_000);
    }
}
