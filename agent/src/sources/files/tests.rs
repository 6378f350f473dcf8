//! The file source against real files, with a pipeline consumer standing in for the exporter:
//! what arrives, what is sent again after a failed delivery, where a restart resumes.

use super::*;
use crate::config::{LogSourceConfig, MultilineConfig};
use crate::pipeline::{consumer, enrich::NodeEnricher, ConsumerInput};
use crate::signal::Signal;
use crate::telemetry::Metrics;
use std::io::Write;
use std::sync::Mutex;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("periscope-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        Dir(dir)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.0.join("logs").join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn append(path: &Path, lines: std::ops::Range<usize>) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    for i in lines {
        writeln!(file, "line {i}").unwrap();
    }
}

/// What the stand-in exporter received, and which payloads it should fail.
#[derive(Default)]
struct Received {
    lines: Vec<String>,
    fail_next: usize,
}

struct Running {
    received: Arc<Mutex<Received>>,
    stop: CancellationToken,
    source: tokio::task::JoinHandle<()>,
    consumer: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(dir: &Dir) -> Running {
        let config = LogSourceConfig {
            include: vec![dir.0.join("logs/*.log").to_string_lossy().into_owned()],
            exclude: vec![],
            format: LogFormatKind::Plain,
            start_at: StartAt::Beginning,
            multiline: MultilineConfig::default(),
            labels: Default::default(),
        };
        let metrics = Metrics::new();
        let source = FileSource::build(&[config], &dir.0.join("data"), metrics.files()).unwrap();
        let (handle, input) = consumer::<Logs>(10_000, metrics.component("test", Signal::Logs));
        let pipeline = Arc::new(Pipeline::new(NodeEnricher::new("n".into(), false), vec![handle], metrics.drops("p", Signal::Logs)));
        let received = Arc::new(Mutex::new(Received::default()));
        let consumer = tokio::spawn(consume(input, received.clone()));
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Handle::current();
        let source = {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || source.run(pipeline, runtime, stop))
        };
        Running { received, stop, source, consumer }
    }

    async fn wait_for(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.received.lock().unwrap().lines.clone();
            if lines.len() >= n {
                return lines;
            }
            assert!(Instant::now() < deadline, "waited for {n} lines, got {}: {lines:?}", lines.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        self.source.await.unwrap();
        self.consumer.await.unwrap();
        let lines = self.received.lock().unwrap().lines.clone();
        lines
    }
}

async fn consume(mut input: ConsumerInput<Logs>, received: Arc<Mutex<Received>>) {
    while let Some(delivery) = input.recv().await {
        let mut state = received.lock().unwrap();
        if state.fail_next > 0 {
            state.fail_next -= 1;
            if let Some(ack) = &delivery.ack {
                ack.fail();
            }
            continue;
        }
        for resource in &delivery.data.resource_logs {
            for scope in &resource.scope_logs {
                for record in &scope.log_records {
                    state.lines.push(crate::exporters::loki::body_text(record.body.as_ref()));
                }
            }
        }
    }
}

fn numbered(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("line {i}")).collect()
}

fn checkpoint_offsets(dir: &Dir) -> Vec<u64> {
    let store = Checkpoints::load(&dir.0.join("data/checkpoints")).unwrap();
    store.keys().into_iter().filter_map(|k| store.get(k).map(|c| c.offset)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_arrive_in_order_and_the_checkpoint_follows_the_acknowledgements() {
    let dir = Dir::new("order");
    let log = dir.log("app.log");
    append(&log, 0..100);
    let running = Running::start(&dir);
    running.wait_for(100).await;
    append(&log, 100..150);
    assert_eq!(running.wait_for(150).await, numbered(0..150));
    assert_eq!(running.stop().await, numbered(0..150));
    assert_eq!(checkpoint_offsets(&dir), vec![std::fs::metadata(&log).unwrap().len()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_were_not_delivered_are_read_again() {
    let dir = Dir::new("redeliver");
    let log = dir.log("app.log");
    let running = Running::start(&dir);
    running.received.lock().unwrap().fail_next = 1;
    append(&log, 0..10);
    let lines = running.wait_for(10).await;
    assert_eq!(lines, numbered(0..10), "the failed payload came again");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_at_the_checkpoint() {
    let dir = Dir::new("restart");
    let log = dir.log("app.log");
    append(&log, 0..50);
    let running = Running::start(&dir);
    running.wait_for(50).await;
    running.stop().await;
    append(&log, 50..80);
    let running = Running::start(&dir);
    running.wait_for(30).await;
    assert_eq!(running.stop().await, numbered(50..80));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_and_create_rotation_loses_nothing_and_releases_the_old_file() {
    let dir = Dir::new("rename");
    let log = dir.log("app.log");
    append(&log, 0..20);
    let running = Running::start(&dir);
    running.wait_for(20).await;
    append(&log, 20..30);
    std::fs::rename(&log, dir.log("app.log.1")).unwrap();
    append(&dir.log("app.log.1"), 30..35);
    append(&log, 35..60);
    let mut lines = running.wait_for(60).await;
    lines.sort_by_key(|l| l[5..].parse::<usize>().unwrap());
    assert_eq!(lines, numbered(0..60));
    // Once read to the end, the old file is let go of and its checkpoint forgotten.
    let deadline = Instant::now() + Duration::from_secs(10);
    while checkpoint_offsets(&dir).len() != 1 {
        assert!(Instant::now() < deadline, "the rotated file is still tracked: {:?}", checkpoint_offsets(&dir));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running.stop().await.len(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_is_read_again_from_its_start() {
    let dir = Dir::new("truncate");
    let log = dir.log("app.log");
    append(&log, 0..40);
    let running = Running::start(&dir);
    running.wait_for(40).await;
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    append(&log, 40..45);
    let lines = running.wait_for(45).await;
    assert_eq!(lines, numbered(0..45));
    running.stop().await;
}

#[test]
fn pod_log_paths_name_namespace_pod_and_container() {
    let pod = pod_log(Path::new("/var/log/pods/shop_web-7d9_0f1e/nginx/3.log")).unwrap();
    assert_eq!(
        pod,
        PodLog { namespace: "shop".into(), pod: "web-7d9".into(), uid: "0f1e".into(), container: "nginx".into() }
    );
    assert_eq!(pod_log(Path::new("/var/log/syslog")), None);
    assert_eq!(pod_log(Path::new("/var/log/pods/nounderscore/c/0.log")), None);
}
