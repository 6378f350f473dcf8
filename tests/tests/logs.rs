//! Logs end to end: the agent tails real files (and takes OTLP logs from the OpenTelemetry
//! SDK) and pushes them to a stand-in for Loki that decodes every push as Loki would and
//! refuses what Loki would refuse. The tests write files the way applications, container
//! runtimes and logrotate do — numbered lines, rotations under continuous writing, crashes of
//! the agent — and check what arrived: every line, exactly once where the agent promises it,
//! with the labels and structured metadata Loki users query by.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, Tracer as _, TracerProvider as _,
};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use periscope_e2e::loki::{Encoding, Entry, LogAgent, Loki, Record, Reply, NODE};
use periscope_e2e::{free_port, DEADLINE, POLL_INTERVAL};

// ---------------------------------------------------------------------------------------
// Helpers: config, numbered lines, times.
// ---------------------------------------------------------------------------------------

/// One entry of `sources.logs`: `include` globs plus further keys (`format: cri, ...`).
fn group(include: &[&Path], more: &str) -> String {
    let include: Vec<String> =
        include.iter().map(|p| serde_json::Value::from(p.to_string_lossy().as_ref()).to_string()).collect();
    if more.is_empty() {
        format!("{{ include: [{}] }}", include.join(", "))
    } else {
        format!("{{ include: [{}], {more} }}", include.join(", "))
    }
}

/// Appends `text` to the file at `path`, creating it.
fn append(path: &Path, text: impl AsRef<[u8]>) {
    let mut file = OpenOptions::new().create(true).append(true).open(path).expect("cannot open a log file");
    file.write_all(text.as_ref()).expect("cannot write a log file");
}

/// `"<prefix> 0000042 ..."`: a line whose number survives any transport, padded to `width`
/// bytes without its newline.
fn numbered(prefix: &str, n: usize, width: usize) -> String {
    let mut line = format!("{prefix} {n:07} ");
    while line.len() < width {
        line.push('.');
    }
    line
}

/// The number of a [`numbered`] line of `prefix`.
fn number(prefix: &str, line: &str) -> Option<usize> {
    let rest = line.strip_prefix(prefix)?.strip_prefix(' ')?;
    rest.get(..7)?.parse().ok()
}

/// How often each numbered line of one prefix arrived in accepted pushes, updated from the
/// pushes it has not looked at yet.
struct Tally {
    prefix: &'static str,
    counts: Vec<u32>,
    distinct: usize,
    total: usize,
    looked_at: usize,
}

impl Tally {
    fn new(prefix: &'static str, lines: usize) -> Tally {
        Tally { prefix, counts: vec![0; lines], distinct: 0, total: 0, looked_at: 0 }
    }

    fn update(&mut self, record: &Record) {
        for push in record.pushes[self.looked_at..].iter().filter(|p| p.accepted()) {
            for entry in &push.entries {
                let Some(n) = number(self.prefix, &entry.line) else { continue };
                assert!(n < self.counts.len(), "line number {n} was never written: {:?}", entry.line);
                self.counts[n] += 1;
                self.total += 1;
                if self.counts[n] == 1 {
                    self.distinct += 1;
                }
            }
        }
        self.looked_at = record.pushes.len();
    }

    fn complete(&self) -> bool {
        self.distinct == self.counts.len()
    }

    fn duplicates(&self) -> usize {
        self.total - self.distinct
    }

    /// Line numbers that arrived more than once, with their counts (the first few).
    fn repeated(&self) -> Vec<(usize, u32)> {
        self.counts.iter().enumerate().filter(|(_, &c)| c > 1).map(|(n, &c)| (n, c)).take(10).collect()
    }
}

/// Waits until the stand-in holds every line of `tally`; returns the tally.
async fn wait_for_all(loki: &Loki, mut tally: Tally) -> Tally {
    let what = format!("all {} lines of {:?}", tally.counts.len(), tally.prefix);
    loki.wait_for(&what, |record| {
        tally.update(record);
        tally.complete()
    })
    .await;
    tally
}

/// [`wait_for_all`], then waits until the agent has every file's lines acknowledged, so that
/// anything it sent twice has arrived too.
async fn all_delivered(agent: &LogAgent, loki: &Loki, tally: Tally) -> Tally {
    let mut tally = wait_for_all(loki, tally).await;
    agent.wait_for_metric("periscope_file_checkpoint_lag_bytes", &[], |lag| lag == 0.0).await;
    loki.inspect(|record| tally.update(record));
    tally
}

/// Polls `condition` until it holds, failing the test with `what` after the suite's deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "waited {DEADLINE:?} for {what}");
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Writes numbered lines to `file` at a steady pace (the behaviour under test is writing
/// while files rotate, so the pace is time itself), from `next` on, `count` of them.
async fn write_steadily(file: &Path, prefix: &str, next: &mut usize, count: usize) {
    let mut out = OpenOptions::new().create(true).append(true).open(file).expect("cannot open the log file");
    for _ in 0..count {
        writeln!(out, "{}", numbered(prefix, *next, 60)).expect("cannot write the log file");
        *next += 1;
        if *next % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A time as RFC 3339 with nanoseconds, as container runtimes write it.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).expect("a time after 1970");
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

fn nanos(time: SystemTime) -> i128 {
    time.duration_since(UNIX_EPOCH).expect("a time after 1970").as_nanos() as i128
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn metadata(entry: &Entry) -> Vec<(&str, &str)> {
    entry.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The entry whose line is `line`; fails when there is not exactly one.
fn only<'a>(entries: &'a [Entry], line: &str) -> &'a Entry {
    let found: Vec<&Entry> = entries.iter().filter(|e| e.line == line).collect();
    assert_eq!(found.len(), 1, "expected exactly one entry {line:?}; entries: {entries:#?}");
    found[0]
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SPAN_ID: &str = "00f067aa0ba902b7";
const OTHER_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const OTHER_SPAN_ID: &str = "b7ad6b7169203331";

// ---------------------------------------------------------------------------------------
// The wire format.
// ---------------------------------------------------------------------------------------

/// A pod's CRI log file gives namespace, pod and container labels, the static `job` label
/// and the `stream`; JSON and logfmt messages give `level`, `trace_id` and `span_id` as
/// structured metadata, also from a W3C `traceparent`; the tenant goes in `X-Scope-OrgID`.
#[tokio::test(flavor = "multi_thread")]
async fn pod_logs_arrive_as_snappy_protobuf_with_labels_metadata_and_tenant() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let container =
        agent.logs().join("pods").join("shop_checkout-7d9f_5d1e0a4c-7e2b-4f0a-9c1d-2a3b4c5d6e7f").join("server");
    fs::create_dir_all(&container).unwrap();
    let t0 = SystemTime::now() - Duration::from_secs(5);
    let at = |i: u64| t0 + Duration::from_millis(i);
    let mut cri = String::new();
    let messages = [
        (
            "stdout",
            format!(r#"{{"level":"WARN","msg":"slow checkout","trace_id":"{TRACE_ID}","span_id":"{SPAN_ID}"}}"#),
        ),
        (
            "stderr",
            format!(
                r#"ts={} level=error msg="card declined" traceparent=00-{OTHER_TRACE_ID}-{OTHER_SPAN_ID}-01"#,
                rfc3339(at(1))
            ),
        ),
        ("stdout", format!(r#"{{"severity":"Info","traceparent":"00-{TRACE_ID}-{OTHER_SPAN_ID}-00","msg":"paid"}}"#)),
        ("stdout", "GET /healthz 200".to_owned()),
    ];
    for (i, (stream, message)) in messages.iter().enumerate() {
        cri.push_str(&format!("{} {stream} F {message}\n", rfc3339(at(i as u64))));
    }
    fs::write(container.join("0.log"), cri).unwrap();

    let pods = agent.logs().join("pods/*/*/*.log");
    let groups = [group(
        &[&pods],
        r#"format: cri, labels: { job: pods, team: payments, app.kubernetes.io/part-of: shop, note: 'say "hi" \ now' }"#,
    )];
    let exporter = loki.exporter_config(&[("tenant_id", "team-a"), ("headers", "{ X-Team: payments }")]);
    let yaml = agent.config(&groups, &exporter, None);
    agent.start(&yaml).await;
    loki.wait_for_entries(messages.len()).await;

    let pushes = loki.pushes();
    for push in &pushes {
        assert_eq!(push.encoding, Encoding::Protobuf);
        assert_eq!(push.header("content-type"), Some("application/x-protobuf"));
        assert_eq!(push.tenant(), Some("team-a"));
        assert_eq!(push.header("x-team"), Some("payments"));
    }
    let entries = loki.entries();
    assert_eq!(entries.len(), messages.len(), "{entries:#?}");
    let pod_labels = |stream: &str| {
        labels(&[
            ("container", "server"),
            ("app_kubernetes_io_part_of", "shop"),
            ("job", "pods"),
            ("namespace", "shop"),
            ("node", NODE),
            ("note", r#"say "hi" \ now"#),
            ("pod", "checkout-7d9f"),
            ("stream", stream),
            ("team", "payments"),
        ])
    };

    let json = only(&entries, &messages[0].1);
    assert_eq!(*json.labels, pod_labels("stdout"));
    assert_eq!(metadata(json), [("level", "warn"), ("span_id", SPAN_ID), ("trace_id", TRACE_ID)]);
    assert_eq!(json.time, nanos(at(0)), "the time of the CRI envelope");

    let logfmt = only(&entries, &messages[1].1);
    assert_eq!(*logfmt.labels, pod_labels("stderr"));
    assert_eq!(metadata(logfmt), [("level", "error"), ("span_id", OTHER_SPAN_ID), ("trace_id", OTHER_TRACE_ID)]);

    let traceparent = only(&entries, &messages[2].1);
    assert_eq!(metadata(traceparent), [("level", "info"), ("span_id", OTHER_SPAN_ID), ("trace_id", TRACE_ID)]);

    let plain = only(&entries, &messages[3].1);
    assert_eq!(*plain.labels, pod_labels("stdout"));
    assert!(plain.metadata.is_empty(), "a plain line has no structured metadata: {plain:?}");
    assert_eq!(plain.time, nanos(at(3)));
}

/// With `encoding: json` the same streams arrive in Loki's JSON push format.
#[tokio::test(flavor = "multi_thread")]
async fn json_encoding_pushes_the_same_labels_and_metadata() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let line = format!(
        r#"time="{}" level=warn msg="disk almost full" trace_id={TRACE_ID} span_id={SPAN_ID}"#,
        rfc3339(SystemTime::now())
    );
    append(&file, format!("{line}\nplain words\n"));
    let groups = [group(&[&file], r#"labels: { job: app, note: 'say "hi" \ now' }"#)];
    let yaml = agent.config(&groups, &loki.exporter_config(&[("encoding", "json"), ("tenant_id", "ops")]), None);
    agent.start(&yaml).await;
    loki.wait_for_entries(2).await;

    for push in loki.pushes() {
        assert_eq!(push.encoding, Encoding::Json);
        assert_eq!(push.header("content-type"), Some("application/json"));
        assert_eq!(push.tenant(), Some("ops"));
    }
    let entries = loki.entries();
    let logfmt = only(&entries, &line);
    assert_eq!(*logfmt.labels, labels(&[("job", "app"), ("node", NODE), ("note", r#"say "hi" \ now"#)]));
    assert_eq!(metadata(logfmt), [("level", "warn"), ("span_id", SPAN_ID), ("trace_id", TRACE_ID)]);
    assert!(only(&entries, "plain words").metadata.is_empty());
}

// ---------------------------------------------------------------------------------------
// Crashes and restarts.
// ---------------------------------------------------------------------------------------

/// Bytes of each line of the crash test, newline included.
const CRASH_LINE_BYTES: usize = 100;
/// Lines of the crash test's file.
const CRASH_LINES: usize = 240_000;
/// What the agent may have sent and not had acknowledged when it dies
/// (`sources::files::MAX_UNACKED_BYTES`).
const MAX_UNACKED_BYTES: usize = 4 << 20;
/// What one read of a file may add on top of that: a 64 KiB chunk.
const ONE_READ_BYTES: usize = 64 << 10;

/// [`CRASH_LINES`] numbered lines of [`CRASH_LINE_BYTES`].
fn write_big_file(path: &Path) {
    let mut out = std::io::BufWriter::new(File::create(path).expect("cannot create the big file"));
    for n in 0..CRASH_LINES {
        writeln!(out, "{}", numbered("line", n, CRASH_LINE_BYTES - 1)).expect("cannot write the big file");
    }
    out.flush().expect("cannot write the big file");
}

/// SIGKILL three times while the agent reads a large file, restarting it on the same data
/// directory each time: every line arrives, and each crash re-sends at most what was sent
/// and not yet acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_file_three_times_loses_no_line_and_resends_only_the_unacknowledged() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("big.log");
    write_big_file(&file);
    let groups = [group(&[&file], "labels: { job: big }")];
    let yaml = agent.config(&groups, &loki.exporter_config(&[("batch", "{ max_bytes: 1MiB, timeout: 100ms }")]), None);

    let mut tally = Tally::new("line", CRASH_LINES);
    let mut duplicates_per_crash = Vec::new();
    agent.start(&yaml).await;
    for quarter in 1..=3 {
        let target = CRASH_LINES * quarter / 4;
        loki.wait_for(&format!("{target} distinct lines"), |record| {
            tally.update(record);
            tally.distinct >= target
        })
        .await;
        agent.kill();
        // What arrived by the time the process was gone.
        loki.inspect(|record| tally.update(record));
        assert!(
            !tally.complete(),
            "the agent had delivered the whole file before crash {quarter}; the test needs a larger file"
        );
        eprintln!("crash {quarter}: {} of {CRASH_LINES} lines had arrived", tally.distinct);
        duplicates_per_crash.push(tally.duplicates());
        agent.start(&yaml).await;
    }
    let tally = all_delivered(&agent, &loki, tally).await;

    // Duplicates before the first crash are a bug of their own; after that, each crash adds
    // what the next run sent again.
    let mut before = duplicates_per_crash[0];
    let resent: Vec<usize> = duplicates_per_crash[1..]
        .iter()
        .chain(std::iter::once(&tally.duplicates()))
        .map(|&total| {
            let added = total - before;
            before = total;
            added
        })
        .collect();
    eprintln!(
        "crash test: {CRASH_LINES} lines of {CRASH_LINE_BYTES} bytes; duplicates before the first crash: {}; re-sent after each crash: {resent:?}; total duplicates: {}",
        duplicates_per_crash[0],
        tally.duplicates()
    );
    assert_eq!(duplicates_per_crash[0], 0, "duplicates without any crash: {:?}", tally.repeated());
    // With 1 MiB batches: four batches and one read.
    let bound = (MAX_UNACKED_BYTES + ONE_READ_BYTES) / CRASH_LINE_BYTES;
    for (crash, &lines) in resent.iter().enumerate() {
        assert!(
            lines <= bound,
            "crash {} made the agent send {lines} lines again; at most {bound} were unacknowledged",
            crash + 1
        );
    }
    let most = tally.counts.iter().max().copied().unwrap_or(0);
    assert!(most <= 4, "a line arrived {most} times in four runs: {:?}", tally.repeated());
}

/// One push hangs (Loki stuck on it) while the others are accepted: the checkpoint cannot
/// pass the hanging push, so what a crash would make the agent send again grows with every
/// line read past it. Reading must pause once that reaches the read-ahead limit: after a
/// SIGKILL, no line far beyond the limit has arrived, and the restart re-sends no more.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_one_push_hangs_resends_no_more_than_the_read_ahead_limit() {
    let loki = Loki::start().await;
    loki.answer_next(1, Reply::Stall);
    let mut agent = LogAgent::new();
    let file = agent.logs().join("big.log");
    write_big_file(&file);
    let groups = [group(&[&file], "")];
    let exporter = loki.exporter_config(&[("batch", "{ max_bytes: 1MiB, timeout: 100ms }"), ("timeout", "120s")]);
    let yaml = agent.config(&groups, &exporter, None);
    agent.start(&yaml).await;

    // The checkpoint stays before the hanging push, so a correct agent reads at most this far.
    let bound = (MAX_UNACKED_BYTES + ONE_READ_BYTES) / CRASH_LINE_BYTES;
    // It reads at least this far before it pauses.
    let below_limit = MAX_UNACKED_BYTES / CRASH_LINE_BYTES - 2 * ONE_READ_BYTES / CRASH_LINE_BYTES;
    let mut tally = Tally::new("line", CRASH_LINES);
    let hanging = loki.wait_for_pushes(1).await.remove(0);
    assert_eq!(hanging.reply, Reply::Stall);
    let hanging_last = hanging.entries.iter().filter_map(|e| number("line", &e.line)).max().expect("numbered lines");
    loki.wait_for(&format!("lines {} to {below_limit}", hanging_last + 1), |record| {
        tally.update(record);
        tally.counts[hanging_last + 1..=below_limit].iter().all(|&c| c > 0)
    })
    .await;
    // Everything but the hanging push delivered: the agent has heard of every other push.
    let hanging_entries = hanging.entries.len() as f64;
    agent.wait_for_metric("periscope_queue_items", &[("component", "loki")], |n| n == hanging_entries).await;
    // What is under test is that reading stays paused: give the agent time to read on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.kill();
    loki.release(Reply::unavailable());
    loki.inspect(|record| tally.update(record));
    let furthest = tally.counts.iter().rposition(|&c| c > 0).unwrap_or(0);
    let arrived = tally.distinct;

    agent.start(&yaml).await;
    let tally = all_delivered(&agent, &loki, tally).await;
    let resent = tally.duplicates();
    eprintln!(
        "hanging push: lines 0..={hanging_last}; before SIGKILL lines up to {furthest} had arrived ({arrived} distinct); the restart re-sent {resent} lines; limit {bound} lines"
    );
    assert!(
        furthest <= bound,
        "with one push hanging the agent read on to line {furthest}, past the read-ahead limit of {bound} lines"
    );
    assert!(resent <= bound, "the restart re-sent {resent} lines; at most {bound} were read ahead of the checkpoint");
}

/// Shutdown with SIGTERM exits 0 and saves where each file was delivered: a restart sends
/// nothing again and goes on with what was written while the agent was down.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_sigterm_resumes_where_delivery_stopped() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "rs", &mut next, 1000).await;
    let groups = [group(&[&file], "")];
    let yaml = agent.config(&groups, &loki.exporter_config(&[]), None);
    agent.start(&yaml).await;
    loki.wait_for_entries(1000).await;
    let status = agent.stop().await;
    assert!(status.success(), "SIGTERM ended the agent with {status}");
    write_steadily(&file, "rs", &mut next, 500).await;
    agent.start(&yaml).await;
    let tally = all_delivered(&agent, &loki, Tally::new("rs", next)).await;
    assert_eq!(tally.duplicates(), 0, "{:?}", tally.repeated());
}

/// SIGTERM while Loki refuses every push: the agent still exits 0 (what is queued is let go
/// at the shutdown deadline), its checkpoints stay where delivery stopped, and after a
/// restart everything arrives once Loki accepts again.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_an_outage_keeps_undelivered_lines_for_the_next_run() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "sd", &mut next, 100).await;
    let groups = [group(&[&file], "")];
    let yaml = agent
        .config(&groups, &loki.exporter_config(&[]), None)
        .replace("shutdown_timeout: 10s", "shutdown_timeout: 2s");
    agent.start(&yaml).await;
    loki.wait_for_entries(100).await;
    loki.answer(Reply::unavailable());
    write_steadily(&file, "sd", &mut next, 400).await;
    loki.wait_for("two refused pushes", |record| record.pushes.iter().filter(|p| !p.accepted()).count() >= 2).await;

    let stopping = Instant::now();
    let status = agent.stop().await;
    eprintln!("the agent took {:?} to stop with shutdown_timeout: 2s", stopping.elapsed());
    assert!(status.success(), "SIGTERM ended the agent with {status}");
    loki.answer(Reply::Accept);
    agent.start(&yaml).await;
    let tally = all_delivered(&agent, &loki, Tally::new("sd", next)).await;
    assert_eq!(tally.duplicates(), 0, "{:?}", tally.repeated());
}

/// A file deleted while the agent was down, and a new one created under its name on the
/// same inode (what ext4 does with a freed inode) starting with the same first line: the
/// checkpoint of the old file must not be applied to the new one, which is read from its
/// start.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_file_on_a_reused_inode_is_read_from_its_start_after_a_restart() {
    use std::os::unix::fs::MetadataExt as _;
    const BANNER: &str = "server starting";
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    append(&file, format!("{BANNER}\n"));
    let groups = [group(&[&file], "")];
    let yaml = agent.config(&groups, &loki.exporter_config(&[]), None);
    agent.start(&yaml).await;
    loki.wait_for_line("the banner", |line| line == BANNER).await;
    let mut next = 0;
    write_steadily(&file, "old", &mut next, 500).await;
    wait_for_all(&loki, Tally::new("old", next)).await;
    let status = agent.stop().await;
    assert!(status.success(), "SIGTERM ended the agent with {status}");

    let old_inode = fs::metadata(&file).unwrap().ino();
    fs::remove_file(&file).unwrap();
    // ext4 hands out the lowest free inode of a group: create files (outside the glob) until
    // one gets the freed inode, and make that one the new app.log.
    let mut fillers = Vec::new();
    let reused = loop {
        let candidate = agent.logs().join(format!("candidate.{}", fillers.len()));
        File::create(&candidate).unwrap();
        if fs::metadata(&candidate).unwrap().ino() == old_inode {
            break Some(candidate);
        }
        fillers.push(candidate);
        if fillers.len() == 5000 {
            break None;
        }
    };
    for filler in fillers {
        fs::remove_file(filler).unwrap();
    }
    match &reused {
        Some(candidate) => fs::rename(candidate, &file).unwrap(),
        None => eprintln!("inode {old_inode} was not handed out again on this file system; this run proves little"),
    }
    append(&file, format!("{BANNER}\n"));
    let mut next = 0;
    write_steadily(&file, "new", &mut next, 1000).await;
    agent.start(&yaml).await;
    let tally = all_delivered(&agent, &loki, Tally::new("new", next)).await;
    assert_eq!(tally.duplicates(), 0);
}

// ---------------------------------------------------------------------------------------
// Which files, rotation, truncation and deletion.
// ---------------------------------------------------------------------------------------

/// logrotate's default `create` mode under continuous writing: `app.log` is renamed to
/// `app.log.N` (outside the glob) and a new `app.log` is created, five times. Every line
/// arrives exactly once: the renamed file is read to its end before it is let go, and the
/// new one from its start. Exactly once because nothing failed, so nothing was re-sent.
#[tokio::test(flavor = "multi_thread")]
async fn rename_and_create_rotation_under_continuous_writing_delivers_every_line_once() {
    rename_and_create_rotation("*.log").await;
}

/// The same with a glob that matches the rotated names too (`app.log*`): a renamed file is
/// the same file under a new name, followed on and not read again.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_renamed_within_the_glob_is_followed_not_read_again() {
    rename_and_create_rotation("app.log*").await;
}

async fn rename_and_create_rotation(glob: &str) {
    const ROTATIONS: usize = 5;
    const PER_FILE: usize = 1500;
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "rot", &mut next, 100).await;
    let groups = [group(&[&agent.logs().join(glob)], "labels: { job: rotated }")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;

    let mut first_of_file = 0;
    for rotation in 1..=ROTATIONS {
        // A file must live under a matching name until a scan has seen it; what a writer puts
        // in a file that is created and renamed between two scans is beyond any tailer. The
        // first line of the current file arriving says the agent follows it.
        let first = first_of_file;
        loki.wait_for_line(&format!("line {first}, the first of app.log"), |line| number("rot", line) == Some(first))
            .await;
        write_steadily(&file, "rot", &mut next, PER_FILE).await;
        fs::rename(&file, agent.logs().join(format!("app.log.{rotation}"))).unwrap();
        first_of_file = next;
        write_steadily(&file, "rot", &mut next, 100).await;
    }
    write_steadily(&file, "rot", &mut next, PER_FILE).await;

    let tally = all_delivered(&agent, &loki, Tally::new("rot", next)).await;
    assert_eq!(tally.duplicates(), 0, "lines that arrived more than once: {:?}", tally.repeated());
    for entry in loki.entries() {
        assert_eq!(*entry.labels, labels(&[("job", "rotated"), ("node", NODE)]));
    }
    if glob == "*.log" {
        // The renamed files were read to their end and let go.
        let logs = agent.logs();
        eventually("the agent to hold only app.log open", || {
            let open: Vec<String> =
                agent.open_files().into_iter().filter(|f| f.starts_with(&*logs.to_string_lossy())).collect();
            open == [file.to_string_lossy().into_owned()]
        })
        .await;
    }
}

/// logrotate's `copytruncate` under continuous writing: `app.log` is copied to `app.log.N`
/// (outside the glob) and truncated in place, five times, and the agent reads the new
/// content from the start. Copytruncate loses, in any tailer, what is written between the
/// copy and the truncation and what the tailer has not read when the file is truncated; so
/// the writer pauses for those moments — it waits until the agent has read all it wrote
/// (the last line arrived at Loki), then copies and truncates. Each cycle writes less than
/// the one before, so the file never grows back past the agent's old offset before the
/// agent notices it shrank: a truncation is then always detectable by size. Every line
/// arrives exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn copytruncate_rotation_under_continuous_writing_loses_nothing() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "cpt", &mut next, 200).await;
    let groups = [group(&[&file], "labels: { job: copytruncate }")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;

    let cycles = [3000, 2500, 2000, 1500, 1000];
    for (rotation, lines) in cycles.iter().enumerate() {
        write_steadily(&file, "cpt", &mut next, *lines).await;
        let last = next - 1;
        loki.wait_for_line(&format!("line {last}, the last one written"), |line| number("cpt", line) == Some(last))
            .await;
        fs::copy(&file, agent.logs().join(format!("app.log.{}", rotation + 1))).unwrap();
        OpenOptions::new().write(true).open(&file).unwrap().set_len(0).unwrap();
    }
    write_steadily(&file, "cpt", &mut next, 500).await;

    let tally = all_delivered(&agent, &loki, Tally::new("cpt", next)).await;
    assert_eq!(tally.duplicates(), 0, "lines that arrived more than once: {:?}", tally.repeated());
    let truncations = agent.stderr().matches("log file was truncated").count();
    assert_eq!(truncations, cycles.len(), "the agent noticed {truncations} truncations:\n{}", agent.stderr());
}

/// A restart (SIGTERM, then start) after a copytruncate rotation resumes where delivery
/// stopped in the truncated file: nothing is sent twice, nothing skipped.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_copytruncate_resumes_at_the_checkpoint() {
    restart_after_copytruncate("beginning").await;
}

/// The same with `start_at: end`, which applies to files without a checkpoint only: the
/// lines written while the agent was down still arrive.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_copytruncate_resumes_at_the_checkpoint_with_start_at_end() {
    restart_after_copytruncate("end").await;
}

async fn restart_after_copytruncate(start_at: &str) {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let marker = agent.logs().join("marker.log");
    append(&marker, "first scan\n");
    let mut next = 0;
    write_steadily(&file, "ct", &mut next, 600).await;
    let groups = [group(&[&file], &format!("start_at: {start_at}")), group(&[&marker], "")];
    let yaml = agent.config(&groups, &loki.exporter_config(&[]), None);
    // app.log is read from its start either way: with `end`, it appears after the agent's
    // first scan (which the marker's line arriving proves), so it is a new file.
    let aside = agent.logs().join("app.log.aside");
    fs::rename(&file, &aside).unwrap();
    agent.start(&yaml).await;
    loki.wait_for_line("the marker", |line| line == "first scan").await;
    fs::rename(&aside, &file).unwrap();
    wait_for_all(&loki, Tally::new("ct", next)).await;
    fs::copy(&file, agent.logs().join("app.log.1")).unwrap();
    OpenOptions::new().write(true).open(&file).unwrap().set_len(0).unwrap();
    write_steadily(&file, "ct", &mut next, 300).await;
    wait_for_all(&loki, Tally::new("ct", next)).await;

    let status = agent.stop().await;
    assert!(status.success(), "SIGTERM ended the agent with {status}");
    write_steadily(&file, "ct", &mut next, 100).await;
    agent.start(&yaml).await;
    let tally = all_delivered(&agent, &loki, Tally::new("ct", next)).await;
    assert_eq!(
        tally.duplicates(),
        0,
        "sent again after the restart: {} lines, e.g. {:?}",
        tally.duplicates(),
        tally.repeated()
    );
}

/// A file deleted while the agent follows it is read to its end through the open
/// descriptor, then closed: the agent's `/proc/<pid>/fd` no longer points to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_file_is_read_to_its_end_and_released() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("gone.log");
    let keep = agent.logs().join("kept.log");
    let mut next = 0;
    write_steadily(&file, "del", &mut next, 100).await;
    append(&keep, "kept 0\n");
    let groups = [group(&[&agent.logs().join("*.log")], "")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_line("kept 0", |line| line == "kept 0").await;

    let path = file.to_string_lossy().into_owned();
    assert!(agent.open_files().contains(&path), "the agent does not hold {path} open: {:?}", agent.open_files());
    // Lines written just before the deletion are read after it, through the descriptor.
    write_steadily(&file, "del", &mut next, 400).await;
    fs::remove_file(&file).unwrap();

    let tally = all_delivered(&agent, &loki, Tally::new("del", next)).await;
    assert_eq!(tally.duplicates(), 0, "{:?}", tally.repeated());
    eventually(&format!("the agent to close {path}"), || !agent.open_files().iter().any(|f| f.starts_with(&path)))
        .await;
    assert!(agent.open_files().contains(&keep.to_string_lossy().into_owned()), "the other file is still followed");
    // And the agent still follows the directory.
    append(&keep, "kept 1\n");
    loki.wait_for_line("kept 1", |line| line == "kept 1").await;
}

/// Files matched by the glob but compressed — by name (`.gz`) or by content (gzip magic
/// under a `.log` name) — are not read, whether present at start or created later.
#[tokio::test(flavor = "multi_thread")]
async fn gzip_files_matched_by_the_glob_are_not_read() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let logs = agent.logs();
    let gz_lines: String = (0..50).map(|i| format!("gz line {i}\n")).collect();
    fs::write(logs.join("app.log.1.gz"), periscope_e2e::otlp::gzip(gz_lines.as_bytes())).unwrap();
    fs::write(logs.join("archive.log"), periscope_e2e::otlp::gzip(gz_lines.as_bytes())).unwrap();
    append(&logs.join("app.log"), "plain line 0\n");
    let groups = [group(&[&logs.join("*")], "")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_line("plain line 0", |line| line == "plain line 0").await;

    // Created later, gzip first: the scan that finds the plain file has seen it too.
    fs::write(logs.join("app.log.2.gz"), periscope_e2e::otlp::gzip(gz_lines.as_bytes())).unwrap();
    append(&logs.join("later.log"), "plain line 1\n");
    loki.wait_for_line("plain line 1", |line| line == "plain line 1").await;
    append(&logs.join("app.log"), "plain line 2\n");
    loki.wait_for_line("plain line 2", |line| line == "plain line 2").await;

    let lines: Vec<String> = loki.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(lines.len(), 3, "only the plain lines: {lines:?}");
}

/// `start_at: end` skips what files present at start-up already hold; files that appear
/// later are read from their beginning; `exclude` wins over `include`.
#[tokio::test(flavor = "multi_thread")]
async fn start_at_end_skips_existing_content_but_new_files_are_read_from_their_start() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let logs = agent.logs();
    append(&logs.join("old.log"), "old 0\nold 1\n");
    append(&logs.join("debug.log"), "excluded 0\n");
    let groups = [group(
        &[&logs.join("*.log")],
        &format!("exclude: [{:?}], start_at: end", logs.join("debug*").to_string_lossy()),
    )];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    // Followed once a scan found it: appended lines then count.
    eventually("the agent to follow old.log", || agent.open_files().iter().any(|f| f.ends_with("/old.log"))).await;
    append(&logs.join("old.log"), "old 2\n");
    append(&logs.join("debug.log"), "excluded 1\n");
    append(&logs.join("new.log"), "new 0\nnew 1\n");
    loki.wait_for_line("new 1", |line| line == "new 1").await;
    loki.wait_for_line("old 2", |line| line == "old 2").await;

    let mut lines: Vec<String> = loki.entries().into_iter().map(|e| e.line).collect();
    lines.sort();
    assert_eq!(lines, ["new 0", "new 1", "old 2"]);
}

// ---------------------------------------------------------------------------------------
// Loki's answers.
// ---------------------------------------------------------------------------------------

/// Loki answering 503 for a while: the agent retries the same entries until Loki is back,
/// and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread")]
async fn pushes_refused_with_503_are_retried_until_loki_is_back() {
    let loki = Loki::start().await;
    loki.answer(Reply::unavailable());
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "down", &mut next, 500).await;
    let groups = [group(&[&file], "")];
    // A queue smaller than what is written: reading has to wait for Loki.
    let exporter = loki.exporter_config(&[("queue", "{ max_entries: 300 }")]);
    agent.start(&agent.config(&groups, &exporter, None)).await;

    loki.wait_for("three refused pushes", |record| record.pushes.len() >= 3).await;
    write_steadily(&file, "down", &mut next, 1500).await;
    agent
        .wait_for_metric("periscope_export_responses_total", &[("component", "loki"), ("code", "503")], |n| n >= 3.0)
        .await;
    let queued = agent.wait_for_metric("periscope_queue_items", &[("component", "loki")], |n| n > 0.0).await;
    assert!(queued.metric_value("periscope_queue_items", &[("component", "loki")]) <= 300.0);
    loki.answer(Reply::Accept);

    let tally = all_delivered(&agent, &loki, Tally::new("down", next)).await;
    assert_eq!(tally.duplicates(), 0, "{:?}", tally.repeated());
    let refused: usize = loki.pushes().iter().filter(|p| !p.accepted()).map(|p| p.entries.len()).sum();
    assert!(refused > 0);
    let metrics = agent.metrics().await;
    assert!(metrics.metric_value("periscope_retried_items_total", &[("component", "loki")]) > 0.0);
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("component", "loki")]), 0.0);
}

/// A file rotated away (renamed out of the glob) while Loki refuses every push, for longer
/// than the exporter retries: the entries it gave up on are read again from the rotated
/// file, which still exists, and arrive once Loki is back.
#[tokio::test(flavor = "multi_thread")]
async fn lines_of_a_file_rotated_during_an_outage_arrive_after_retries_run_out() {
    let loki = Loki::start().await;
    loki.answer(Reply::unavailable());
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "out", &mut next, 200).await;
    let groups = [group(&[&agent.logs().join("*.log")], "")];
    let retry = "{ initial_interval: 50ms, max_interval: 200ms, max_elapsed_time: 3s }";
    agent.start(&agent.config(&groups, &loki.exporter_config(&[("retry", retry)]), None)).await;
    loki.wait_for("a refused push", |record| !record.pushes.is_empty()).await;

    fs::rename(&file, agent.logs().join("app.log.1")).unwrap();
    write_steadily(&file, "out", &mut next, 100).await;
    agent
        .wait_for_metric(
            "periscope_dropped_items_total",
            &[("component", "loki"), ("reason", "retries_exhausted")],
            |n| n >= 200.0,
        )
        .await;
    loki.answer(Reply::Accept);
    wait_for_all(&loki, Tally::new("out", next)).await;
}

/// Loki unreachable (its port closed) for a while: what was written meanwhile arrives once
/// it listens again.
#[tokio::test(flavor = "multi_thread")]
async fn lines_written_while_loki_is_unreachable_arrive_once_it_listens_again() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "gone", &mut next, 100).await;
    let groups = [group(&[&file], "")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_entries(100).await;

    loki.halt().await;
    write_steadily(&file, "gone", &mut next, 900).await;
    agent
        .wait_for_metric(
            "periscope_export_responses_total",
            &[("component", "loki"), ("code", "connection_error")],
            |n| n >= 2.0,
        )
        .await;
    loki.resume().await;

    let tally = all_delivered(&agent, &loki, Tally::new("gone", next)).await;
    assert_eq!(tally.duplicates(), 0, "{:?}", tally.repeated());
}

/// A 429 with `Retry-After: 2`: the agent waits those two seconds before it pushes the
/// same entries again (its own backoff would have been 50 ms).
#[tokio::test(flavor = "multi_thread")]
async fn a_429_with_retry_after_delays_the_retry_by_that_long() {
    let loki = Loki::start().await;
    loki.answer_next(
        1,
        Reply::status(429, Some(2), "Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec)"),
    );
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "slow", &mut next, 20).await;
    let groups = [group(&[&file], "")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;

    let pushes = loki.wait_for_pushes(2).await;
    assert_eq!(
        pushes[0].reply,
        Reply::status(429, Some(2), "Ingestion rate limit exceeded for user fake (limit: 4194304 bytes/sec)")
    );
    assert!(pushes[1].accepted());
    let lines = |i: usize| pushes[i].entries.iter().map(|e| e.line.clone()).collect::<Vec<_>>();
    assert_eq!(lines(0), lines(1), "the retry carries the same entries");
    let waited = pushes[1].at - pushes[0].at;
    assert!(waited >= Duration::from_secs(2), "the retry came {waited:?} after the 429 with Retry-After: 2");
    wait_for_all(&loki, Tally::new("slow", next)).await;
}

/// A 400 is final: the push is not retried, its entries are counted as dropped with reason
/// `permanent`, the agent logs Loki's own words, and later lines are still delivered.
#[tokio::test(flavor = "multi_thread")]
async fn a_push_refused_with_400_is_dropped_counted_logged_and_not_retried() {
    const LOKI_SAYS: &str = "entry for stream '{job=\"app\"}' has timestamp too old: 2001-01-01T00:00:00Z";
    let loki = Loki::start().await;
    loki.answer_next(1, Reply::status(400, None, LOKI_SAYS));
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut next = 0;
    write_steadily(&file, "bad", &mut next, 5).await;
    let groups = [group(&[&file], "labels: { job: app }")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;

    let refused = loki.wait_for_pushes(1).await.remove(0);
    assert!(!refused.accepted());
    assert_eq!(refused.entries.len(), 5);
    agent
        .wait_for_metric("periscope_dropped_items_total", &[("component", "loki"), ("reason", "permanent")], |n| {
            n == 5.0
        })
        .await;
    agent.wait_for_stderr(LOKI_SAYS).await;

    append(&file, "good 0\n");
    loki.wait_for_line("good 0", |line| line == "good 0").await;
    let sent_again =
        loki.pushes()[1..].iter().flat_map(|p| &p.entries).filter(|e| number("bad", &e.line).is_some()).count();
    assert_eq!(sent_again, 0, "entries refused with 400 were pushed again");
    let metrics = agent.metrics().await;
    assert_eq!(metrics.metric_value("periscope_retried_items_total", &[("component", "loki")]), 0.0);
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("component", "loki")]), 5.0);
}

// ---------------------------------------------------------------------------------------
// Content.
// ---------------------------------------------------------------------------------------

/// Invalid UTF-8 is replaced with U+FFFD, not dropped; a line over 256 KiB is cut there
/// and counted; the lines around them are untouched.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_is_replaced_and_an_overlong_line_is_cut_and_counted() {
    const MAX_LINE: usize = 256 * 1024;
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    let mut bytes = b"before\nbad \xff\xfe bytes\n".to_vec();
    // Ends within the read that crosses 256 KiB.
    bytes.extend(std::iter::repeat_n(b'x', 300 * 1024));
    bytes.push(b'\n');
    // Goes on for reads after it was cut.
    bytes.extend(std::iter::repeat_n(b'y', 1024 * 1024));
    bytes.extend_from_slice(b"\nafter\n");
    fs::write(&file, bytes).unwrap();
    let groups = [group(&[&file], "format: plain")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_line("after", |line| line == "after").await;

    let lines: Vec<String> = loki.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(lines.len(), 5, "{:?}", lines.iter().map(|l| l.len()).collect::<Vec<_>>());
    assert_eq!(lines[0], "before");
    assert_eq!(lines[1], "bad \u{fffd}\u{fffd} bytes");
    assert_eq!(lines[2].len(), MAX_LINE);
    assert!(lines[2].bytes().all(|b| b == b'x'));
    assert_eq!(lines[3].len(), MAX_LINE);
    assert!(lines[3].bytes().all(|b| b == b'y'));
    assert_eq!(lines[4], "after");
    let metrics = agent.metrics().await;
    assert_eq!(metrics.metric_value("periscope_file_lines_truncated_total", &[]), 2.0);
}

/// A line of multibyte characters over 256 KiB is cut at a character boundary at most
/// 256 KiB in, and counted once.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_cut_inside_a_multibyte_character_is_cut_at_a_boundary_and_counted_once() {
    const MAX_LINE: usize = 256 * 1024;
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("app.log");
    // 3-byte characters: 256 KiB falls inside one of them. The line goes on past the read
    // that crosses 256 KiB, so it is cut before its end is read.
    let long = "€".repeat(150_000);
    fs::write(&file, format!("{long}\nafter\n")).unwrap();
    let groups = [group(&[&file], "format: plain")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_line("after", |line| line == "after").await;

    let lines: Vec<String> = loki.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(lines.len(), 2);
    assert!(long.starts_with(&lines[0]), "the cut line is a prefix of the written one");
    assert_eq!(lines[0].len(), MAX_LINE / 3 * 3, "cut at the last whole character");
    let metrics = agent.metrics().await;
    assert_eq!(metrics.metric_value("periscope_file_lines_truncated_total", &[]), 1.0, "one line was cut");
}

/// Entries that grow past 256 KiB by joining — a CRI line the runtime split into 16 KiB
/// partial lines, a multiline entry — are cut at 256 KiB and counted like any long line.
#[tokio::test(flavor = "multi_thread")]
async fn entries_joined_past_256_kib_are_cut_and_counted() {
    const MAX_LINE: usize = 256 * 1024;
    const PIECE: usize = 16 * 1024;
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let logs = agent.logs();
    let cri_dir = logs.join("pods/web_frontend-0_0a1b2c3d/nginx");
    fs::create_dir_all(&cri_dir).unwrap();
    let time = rfc3339(SystemTime::now());
    let mut cri = String::new();
    for i in 0..20 {
        cri.push_str(&format!("{time} stdout P {}\n", char::from(b'a' + i).to_string().repeat(PIECE)));
    }
    cri.push_str(&format!("{time} stdout F end\n{time} stdout F next\n"));
    append(&cri_dir.join("0.log"), cri);
    let mut trace = String::from("2024-05-01 12:00:00 ERROR huge\n");
    for _ in 0..20 {
        trace.push_str(&format!("\tat {}\n", "m".repeat(PIECE)));
    }
    trace.push_str("2024-05-01 12:00:01 INFO next\n");
    append(&logs.join("java.log"), trace);
    let groups = [
        group(&[&logs.join("pods/*/*/*.log")], "format: cri"),
        group(&[&logs.join("java.log")], r"format: plain, multiline: { start_pattern: '^\d{4}-', timeout: 200ms }"),
    ];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_entries(4).await;

    let entries = loki.entries();
    assert_eq!(entries.len(), 4, "{:?}", entries.iter().map(|e| e.line.len()).collect::<Vec<_>>());
    let joined = entries.iter().find(|e| e.line.starts_with("aaaa")).expect("the joined CRI entry");
    assert_eq!(joined.line.len(), MAX_LINE);
    let stack = entries.iter().find(|e| e.line.starts_with("2024-05-01 12:00:00 ERROR huge")).expect("the stack trace");
    assert_eq!(stack.line.len(), MAX_LINE);
    only(&entries, "next");
    only(&entries, "2024-05-01 12:00:01 INFO next");
    let metrics = agent.metrics().await;
    assert_eq!(metrics.metric_value("periscope_file_lines_truncated_total", &[]), 2.0, "two entries were cut");
}

/// CRI partial lines (`P`) are joined up to the full one (`F`); Docker json-file lines are
/// unwrapped, a line Docker split (no trailing `\n`) joined with its rest; both keep the
/// runtime's time and stream.
#[tokio::test(flavor = "multi_thread")]
async fn cri_partial_lines_are_joined_and_docker_json_lines_unwrapped() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let logs = agent.logs();
    let cri_dir = logs.join("pods/web_frontend-0_0a1b2c3d/nginx");
    fs::create_dir_all(&cri_dir).unwrap();
    let t0 = SystemTime::now() - Duration::from_secs(10);
    let at = |ms: u64| rfc3339(t0 + Duration::from_millis(ms));
    append(
        &cri_dir.join("0.log"),
        format!(
            "{} stdout P first part, \n{} stdout P second part, \n{} stdout F last part\n{} stderr F on its own\n",
            at(0),
            at(1),
            at(2),
            at(3)
        ),
    );
    let docker_dir = logs.join("docker");
    fs::create_dir_all(&docker_dir).unwrap();
    let docker_line = |log: &str, stream: &str, ms: u64| {
        serde_json::json!({ "log": log, "stream": stream, "time": at(ms) }).to_string() + "\n"
    };
    append(
        &docker_dir.join("abc123-json.log"),
        docker_line("{\"level\":\"error\",\"msg\":\"tab\\there\"}\n", "stderr", 10)
            + &docker_line("split by ", "stdout", 11)
            + &docker_line("docker\n", "stdout", 12),
    );
    let groups = [
        group(&[&logs.join("pods/*/*/*.log")], "format: cri"),
        group(&[&docker_dir.join("*-json.log")], "format: docker"),
    ];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_entries(4).await;

    let entries = loki.entries();
    assert_eq!(entries.len(), 4, "{entries:#?}");
    let joined = only(&entries, "first part, second part, last part");
    assert_eq!(joined.label("stream"), Some("stdout"));
    assert_eq!(joined.label("pod"), Some("frontend-0"));
    let alone = only(&entries, "on its own");
    assert_eq!(alone.label("stream"), Some("stderr"));
    assert_eq!(alone.time, nanos(t0 + Duration::from_millis(3)));

    let json = only(&entries, "{\"level\":\"error\",\"msg\":\"tab\\there\"}");
    assert_eq!(json.label("stream"), Some("stderr"));
    assert_eq!(json.meta("level"), Some("error"));
    assert_eq!(json.time, nanos(t0 + Duration::from_millis(10)));
    let split = only(&entries, "split by docker");
    assert_eq!(split.label("stream"), Some("stdout"));
}

/// The runtime writes both streams of a container into one file, so a stdout line split
/// into partial lines can have a stderr line between its pieces: pieces are joined per
/// stream, never across streams.
#[tokio::test(flavor = "multi_thread")]
async fn partial_lines_are_joined_per_stream_when_stdout_and_stderr_interleave() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let logs = agent.logs();
    let cri_dir = logs.join("pods/web_frontend-0_0a1b2c3d/nginx");
    fs::create_dir_all(&cri_dir).unwrap();
    let t0 = SystemTime::now() - Duration::from_secs(10);
    let at = |ms: u64| rfc3339(t0 + Duration::from_millis(ms));
    append(
        &cri_dir.join("0.log"),
        format!("{} stdout P a long line, \n{} stderr F a warning\n{} stdout F continued\n", at(0), at(1), at(2)),
    );
    let docker_dir = logs.join("docker");
    fs::create_dir_all(&docker_dir).unwrap();
    let docker_line = |log: &str, stream: &str, ms: u64| {
        serde_json::json!({ "log": log, "stream": stream, "time": at(ms) }).to_string() + "\n"
    };
    append(
        &docker_dir.join("abc123-json.log"),
        docker_line("another long line, ", "stdout", 10)
            + &docker_line("an error\n", "stderr", 11)
            + &docker_line("finished\n", "stdout", 12),
    );
    let groups = [
        group(&[&logs.join("pods/*/*/*.log")], "format: cri"),
        group(&[&docker_dir.join("*-json.log")], "format: docker"),
    ];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_entries(4).await;

    let entries = loki.entries();
    let mut got: Vec<(Option<&str>, &str)> = entries.iter().map(|e| (e.label("stream"), e.line.as_str())).collect();
    got.sort();
    assert_eq!(
        got,
        [
            (Some("stderr"), "a warning"),
            (Some("stderr"), "an error"),
            (Some("stdout"), "a long line, continued"),
            (Some("stdout"), "another long line, finished"),
        ]
    );
}

/// With a multiline `start_pattern`, each stack trace is one entry: its first line and the
/// lines that do not match the pattern, joined with `\n`; the last one is sent after the
/// multiline timeout.
#[tokio::test(flavor = "multi_thread")]
async fn multiline_stack_traces_are_one_entry_each() {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let file = agent.logs().join("java.log");
    let traces = [
        "2024-05-01 12:00:00.001 ERROR [main] c.e.Checkout - payment failed\njava.lang.IllegalStateException: card declined\n\tat com.example.Checkout.pay(Checkout.java:42)\n\tat com.example.Main.main(Main.java:7)",
        "2024-05-01 12:00:00.002 INFO [main] c.e.Checkout - retrying",
        "2024-05-01 12:00:00.003 ERROR [main] c.e.Checkout - gave up\njava.lang.RuntimeException: wrapped\n\tat com.example.Checkout.retry(Checkout.java:60)\nCaused by: java.lang.IllegalStateException: card declined\n\t... 3 more",
    ];
    append(&file, traces.join("\n") + "\n");
    let groups =
        [group(&[&file], r"format: plain, multiline: { start_pattern: '^\d{4}-\d{2}-\d{2} ', timeout: 200ms }")];
    agent.start(&agent.config(&groups, &loki.exporter_config(&[]), None)).await;
    loki.wait_for_entries(traces.len()).await;

    let lines: Vec<String> = loki.entries().into_iter().map(|e| e.line).collect();
    assert_eq!(lines, traces);
}

// ---------------------------------------------------------------------------------------
// OTLP logs from the OpenTelemetry SDK.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Wire {
    Grpc,
    Http,
}

/// Logs emitted with the SDK's logs API through its OTLP exporter over `wire` arrive at Loki
/// with the service and Kubernetes resource as labels, the severity as `level` and the trace
/// context (ambient or explicit) as `trace_id` and `span_id`.
async fn sdk_logs_arrive_with_labels_level_and_trace_context(wire: Wire) {
    let loki = Loki::start().await;
    let mut agent = LogAgent::new();
    let (grpc, http) = (free_port(), free_port());
    agent.start(&agent.config(&[], &loki.exporter_config(&[]), Some((grpc, http)))).await;

    let exporter = match wire {
        Wire::Grpc => opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_endpoint(format!("http://127.0.0.1:{grpc}"))
            .build(),
        Wire::Http => opentelemetry_otlp::LogExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("http://127.0.0.1:{http}/v1/logs"))
            .build(),
    }
    .expect("cannot build the SDK's OTLP log exporter");
    let resource = Resource::builder_empty()
        .with_service_name("checkout")
        .with_attributes([
            KeyValue::new("k8s.namespace.name", "shop"),
            KeyValue::new("k8s.pod.name", "checkout-7d9f"),
            KeyValue::new("k8s.container.name", "server"),
            KeyValue::new("k8s.deployment.name", "checkout"),
            KeyValue::new("k8s.pod.uid", "5d1e0a4c"),
        ])
        .build();
    let provider = SdkLoggerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build();
    let logger = provider.logger("checkout-service");
    let tracer_provider = SdkTracerProvider::builder().build();
    let tracer = tracer_provider.tracer("checkout-service");
    let t0 = SystemTime::now() - Duration::from_secs(1);

    // Inside an active span: the SDK takes the span's context.
    let ambient = tracer.in_span("pay", |cx| {
        let mut record = logger.create_log_record();
        record.set_timestamp(t0);
        record.set_severity_number(Severity::Error);
        record.set_severity_text("ERROR");
        record.set_body(AnyValue::from("payment declined"));
        logger.emit(record);
        cx.span().span_context().clone()
    });
    // An explicit context and a severity number alone.
    let explicit = SpanContext::new(
        TraceId::from_hex(OTHER_TRACE_ID).unwrap(),
        SpanId::from_hex(OTHER_SPAN_ID).unwrap(),
        TraceFlags::SAMPLED,
        true,
        Default::default(),
    );
    let mut record = logger.create_log_record();
    record.set_timestamp(t0 + Duration::from_millis(1));
    record.set_severity_number(Severity::Warn);
    record.set_body(AnyValue::from("retrying payment"));
    record.set_trace_context(explicit.trace_id(), explicit.span_id(), Some(explicit.trace_flags()));
    logger.emit(record);
    // No trace context at all.
    let mut record = logger.create_log_record();
    record.set_timestamp(t0 + Duration::from_millis(2));
    record.set_severity_number(Severity::Info);
    record.set_severity_text("INFO");
    record.set_body(AnyValue::from("cart saved"));
    logger.emit(record);

    let flushed = {
        let provider = provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("flush task")
    };
    assert!(flushed.is_ok(), "the SDK could not export to the agent over {wire:?}: {flushed:?}");
    loki.wait_for_entries(3).await;

    let entries = loki.entries();
    assert_eq!(entries.len(), 3, "{entries:#?}");
    let expected_labels = labels(&[
        ("container", "server"),
        ("k8s_deployment_name", "checkout"),
        ("namespace", "shop"),
        ("node", NODE),
        ("pod", "checkout-7d9f"),
        ("service_name", "checkout"),
    ]);
    for entry in &entries {
        assert_eq!(*entry.labels, expected_labels, "{entry:?}");
    }
    let declined = only(&entries, "payment declined");
    let trace_hex = format!("{:032x}", ambient.trace_id());
    let span_hex = format!("{:016x}", ambient.span_id());
    assert_eq!(
        metadata(declined),
        [("level", "error"), ("span_id", span_hex.as_str()), ("trace_id", trace_hex.as_str())]
    );
    assert_eq!(declined.time, nanos(t0));
    let retrying = only(&entries, "retrying payment");
    assert_eq!(metadata(retrying), [("level", "warn"), ("span_id", OTHER_SPAN_ID), ("trace_id", OTHER_TRACE_ID)]);
    let saved = only(&entries, "cart saved");
    assert_eq!(metadata(saved), [("level", "info")]);

    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_logs_over_otlp_grpc_arrive_with_labels_level_and_trace_context() {
    sdk_logs_arrive_with_labels_level_and_trace_context(Wire::Grpc).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_logs_over_otlp_http_arrive_with_labels_level_and_trace_context() {
    sdk_logs_arrive_with_labels_level_and_trace_context(Wire::Http).await;
}
