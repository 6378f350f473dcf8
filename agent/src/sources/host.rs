//! Host metrics (`sources.host_metrics`) read from `<root>/proc` and `<root>/sys`, under
//! node_exporter's names and labels so that existing node dashboards work: CPU, memory, load,
//! filesystems, disks, network, boot time, context switches, interrupts, forks, processes.
//!
//! Devices and filesystems are filtered with node_exporter's default exclusions (partitions,
//! loop and ram devices; pseudo filesystems and the mount points under /dev, /proc, /sys).
//! Every collection is one OTLP request in the scrape scope, with `job="node"` and
//! `instance=<node name>`.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use regex::Regex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

use crate::exporters::prometheus::store::SCRAPE_SCOPE;
use crate::pipeline::Pipeline;
use crate::signal::Metrics;

pub const KEY: &str = "sources.host_metrics";

/// Clock ticks per second of `/proc/stat` times (USER_HZ, 100 on every Linux architecture
/// Periscope runs on).
const USER_HZ: f64 = 100.0;

const FS_TYPES_EXCLUDE: &str = "^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|squashfs|erofs|sysfs|tracefs)$";
const MOUNT_POINTS_EXCLUDE: &str = "^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)";
const DISK_EXCLUDE: &str = r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$";
const NETDEV_EXCLUDE: &str = "^$";

type Labels = Vec<(&'static str, String)>;

/// One metric of a collection: whether a counter, its help, its points.
type Family = (bool, String, Vec<(Labels, f64)>);

/// Metrics of one collection, by name.
#[derive(Default)]
struct Collected {
    metrics: BTreeMap<String, Family>,
}

impl Collected {
    fn add(&mut self, name: impl Into<String>, counter: bool, help: &str, labels: Labels, value: f64) {
        self.metrics.entry(name.into()).or_insert_with(|| (counter, help.to_owned(), Vec::new())).2.push((labels, value));
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }),
        ..Default::default()
    }
}

fn point(labels: &Labels, value: f64, time: u64) -> NumberDataPoint {
    NumberDataPoint {
        attributes: labels.iter().map(|(k, v)| kv(k, v)).collect(),
        time_unix_nano: time,
        value: Some(number_data_point::Value::AsDouble(value)),
        ..Default::default()
    }
}

pub struct HostMetrics {
    root: PathBuf,
    node: String,
    fs_types_exclude: Regex,
    mount_points_exclude: Regex,
    disk_exclude: Regex,
    netdev_exclude: Regex,
}

impl HostMetrics {
    pub fn new(root: &Path, node: String) -> HostMetrics {
        let regex = |p: &str| Regex::new(p).expect("a constant pattern");
        HostMetrics {
            root: root.to_owned(),
            node,
            fs_types_exclude: regex(FS_TYPES_EXCLUDE),
            mount_points_exclude: regex(MOUNT_POINTS_EXCLUDE),
            disk_exclude: regex(DISK_EXCLUDE),
            netdev_exclude: regex(NETDEV_EXCLUDE),
        }
    }

    fn read(&self, relative: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(relative)).ok()
    }

    /// Reads everything once.
    pub fn collect(&self) -> Metrics {
        let time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut c = Collected::default();
        self.stat(&mut c);
        self.meminfo(&mut c);
        self.loadavg(&mut c);
        self.filesystems(&mut c);
        self.disks(&mut c);
        self.network(&mut c);

        let metrics: Vec<Metric> = c
            .metrics
            .into_iter()
            .map(|(name, (counter, help, points))| {
                let data_points = points.iter().map(|(labels, value)| point(labels, *value, time)).collect();
                let data = if counter {
                    metric::Data::Sum(Sum {
                        data_points,
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                        is_monotonic: true,
                    })
                } else {
                    metric::Data::Gauge(Gauge { data_points })
                };
                Metric { name, description: help, data: Some(data), ..Default::default() }
            })
            .collect();
        Metrics {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", "node"), kv("service.instance.id", &self.node)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope { name: SCRAPE_SCOPE.to_owned(), ..Default::default() }),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    /// `/proc/stat`: CPU times, boot time, context switches, interrupts, forks, processes.
    fn stat(&self, c: &mut Collected) {
        let Some(text) = self.read("proc/stat") else { return };
        const MODES: [&str; 8] = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let Some(key) = fields.next() else { continue };
            let values: Vec<f64> = fields.filter_map(|f| f.parse().ok()).collect();
            match key {
                cpu if cpu.starts_with("cpu") && cpu.len() > 3 => {
                    let id = cpu[3..].to_owned();
                    for (mode, value) in MODES.iter().zip(&values) {
                        c.add(
                            "node_cpu_seconds_total",
                            true,
                            "Seconds the CPUs spent in each mode.",
                            vec![("cpu", id.clone()), ("mode", (*mode).to_owned())],
                            value / USER_HZ,
                        );
                    }
                    // Guest time is also counted in user and nice; node_exporter shows it apart.
                    if let (Some(guest), Some(guest_nice)) = (values.get(8), values.get(9)) {
                        let help = "Seconds the CPUs spent in guests (VMs) for each mode.";
                        c.add("node_cpu_guest_seconds_total", true, help, vec![("cpu", id.clone()), ("mode", "user".into())], guest / USER_HZ);
                        c.add("node_cpu_guest_seconds_total", true, help, vec![("cpu", id), ("mode", "nice".into())], guest_nice / USER_HZ);
                    }
                }
                "btime" => c.add("node_boot_time_seconds", false, "Node boot time, in unixtime.", vec![], values.first().copied().unwrap_or(0.0)),
                "ctxt" => c.add("node_context_switches_total", true, "Total number of context switches.", vec![], values.first().copied().unwrap_or(0.0)),
                "intr" => c.add("node_intr_total", true, "Total number of interrupts serviced.", vec![], values.first().copied().unwrap_or(0.0)),
                "processes" => c.add("node_forks_total", true, "Total number of forks.", vec![], values.first().copied().unwrap_or(0.0)),
                "procs_running" => c.add("node_procs_running", false, "Number of processes in runnable state.", vec![], values.first().copied().unwrap_or(0.0)),
                "procs_blocked" => c.add("node_procs_blocked", false, "Number of processes blocked waiting for I/O to complete.", vec![], values.first().copied().unwrap_or(0.0)),
                _ => {}
            }
        }
    }

    /// `/proc/meminfo`, one gauge per line as node_exporter names them.
    fn meminfo(&self, c: &mut Collected) {
        let Some(text) = self.read("proc/meminfo") else { return };
        for line in text.lines() {
            let Some((key, rest)) = line.split_once(':') else { continue };
            let mut parts = rest.split_whitespace();
            let Some(value) = parts.next().and_then(|v| v.parse::<f64>().ok()) else { continue };
            let name = key.replace('(', "_").replace(')', "");
            let (name, value) = match parts.next() {
                Some("kB") => (format!("node_memory_{name}_bytes"), value * 1024.0),
                _ => (format!("node_memory_{name}"), value),
            };
            c.add(name, false, &format!("Memory information field {key}."), vec![], value);
        }
    }

    fn loadavg(&self, c: &mut Collected) {
        let Some(text) = self.read("proc/loadavg") else { return };
        let values: Vec<f64> = text.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect();
        for (name, value) in ["node_load1", "node_load5", "node_load15"].into_iter().zip(values) {
            c.add(name, false, "Load average.", vec![], value);
        }
    }

    /// Mounted filesystems from `/proc/1/mounts` (the host's when the root is the host's).
    fn filesystems(&self, c: &mut Collected) {
        let Some(text) = self.read("proc/1/mounts").or_else(|| self.read("proc/mounts")) else { return };
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [device, mount_point, fstype, options, ..] = fields[..] else { continue };
            let mount_point = mount_point.replace("\\040", " ");
            if self.fs_types_exclude.is_match(fstype) || self.mount_points_exclude.is_match(&mount_point) {
                continue;
            }
            if !seen.insert((device.to_owned(), mount_point.clone())) {
                continue;
            }
            let path = self.root.join(mount_point.trim_start_matches('/'));
            let Some(stats) = statvfs(&path) else { continue };
            let labels = || vec![("device", device.to_owned()), ("fstype", fstype.to_owned()), ("mountpoint", mount_point.clone())];
            let block = stats.block_size as f64;
            c.add("node_filesystem_size_bytes", false, "Filesystem size in bytes.", labels(), stats.blocks as f64 * block);
            c.add("node_filesystem_free_bytes", false, "Filesystem free space in bytes.", labels(), stats.blocks_free as f64 * block);
            c.add("node_filesystem_avail_bytes", false, "Filesystem space available to non-root users in bytes.", labels(), stats.blocks_available as f64 * block);
            c.add("node_filesystem_files", false, "Filesystem total file nodes.", labels(), stats.files as f64);
            c.add("node_filesystem_files_free", false, "Filesystem total free file nodes.", labels(), stats.files_free as f64);
            let readonly = options.split(',').any(|o| o == "ro");
            c.add("node_filesystem_readonly", false, "Filesystem read-only status.", labels(), if readonly { 1.0 } else { 0.0 });
        }
    }

    /// `/proc/diskstats`.
    fn disks(&self, c: &mut Collected) {
        let Some(text) = self.read("proc/diskstats") else { return };
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 14 {
                continue;
            }
            let device = fields[2];
            if self.disk_exclude.is_match(device) {
                continue;
            }
            let n = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            let labels = || vec![("device", device.to_owned())];
            c.add("node_disk_reads_completed_total", true, "The total number of reads completed successfully.", labels(), n(3));
            c.add("node_disk_reads_merged_total", true, "The total number of reads merged.", labels(), n(4));
            c.add("node_disk_read_bytes_total", true, "The total number of bytes read successfully.", labels(), n(5) * 512.0);
            c.add("node_disk_read_time_seconds_total", true, "The total number of seconds spent by all reads.", labels(), n(6) * 0.001);
            c.add("node_disk_writes_completed_total", true, "The total number of writes completed successfully.", labels(), n(7));
            c.add("node_disk_writes_merged_total", true, "The number of writes merged.", labels(), n(8));
            c.add("node_disk_written_bytes_total", true, "The total number of bytes written successfully.", labels(), n(9) * 512.0);
            c.add("node_disk_write_time_seconds_total", true, "This is the total number of seconds spent by all writes.", labels(), n(10) * 0.001);
            c.add("node_disk_io_now", false, "The number of I/Os currently in progress.", labels(), n(11));
            c.add("node_disk_io_time_seconds_total", true, "Total seconds spent doing I/Os.", labels(), n(12) * 0.001);
            c.add("node_disk_io_time_weighted_seconds_total", true, "The weighted # of seconds spent doing I/Os.", labels(), n(13) * 0.001);
            // Discards (kernel 4.18+) and flushes (5.5+), when the kernel has the fields.
            if fields.len() >= 18 {
                c.add("node_disk_discards_completed_total", true, "The total number of discards completed successfully.", labels(), n(14));
                c.add("node_disk_discards_merged_total", true, "The total number of discards merged.", labels(), n(15));
                c.add("node_disk_discarded_sectors_total", true, "The total number of sectors discarded successfully.", labels(), n(16));
                c.add("node_disk_discard_time_seconds_total", true, "This is the total number of seconds spent by all discards.", labels(), n(17) * 0.001);
            }
            if fields.len() >= 20 {
                c.add("node_disk_flush_requests_total", true, "The total number of flush requests completed successfully", labels(), n(18));
                c.add("node_disk_flush_requests_time_seconds_total", true, "This is the total number of seconds spent by all flush requests.", labels(), n(19) * 0.001);
            }
        }
    }

    /// `/proc/1/net/dev`: the network of the host's init, so that an agent in a pod without
    /// the host's network (a DaemonSet reading `/host/proc`) reports the node's interfaces,
    /// not its own pod's, which `proc/net/dev` (through `proc/self`) would give. Falls back to
    /// `proc/net/dev` where pid 1 is hidden.
    fn network(&self, c: &mut Collected) {
        let Some(text) = self.read("proc/1/net/dev").or_else(|| self.read("proc/net/dev")) else { return };
        const RECEIVE: [&str; 8] = ["bytes", "packets", "errs", "drop", "fifo", "frame", "compressed", "multicast"];
        const TRANSMIT: [&str; 8] = ["bytes", "packets", "errs", "drop", "fifo", "colls", "carrier", "compressed"];
        for line in text.lines().skip(2) {
            let Some((device, rest)) = line.split_once(':') else { continue };
            let device = device.trim();
            if self.netdev_exclude.is_match(device) {
                continue;
            }
            let values: Vec<f64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
            if values.len() < 16 {
                continue;
            }
            for (i, field) in RECEIVE.iter().enumerate() {
                c.add(format!("node_network_receive_{field}_total"), true, "Network device statistic (receive).", vec![("device", device.to_owned())], values[i]);
            }
            for (i, field) in TRANSMIT.iter().enumerate() {
                c.add(format!("node_network_transmit_{field}_total"), true, "Network device statistic (transmit).", vec![("device", device.to_owned())], values[8 + i]);
            }
        }
    }
}

struct FsStats {
    block_size: u64,
    blocks: u64,
    blocks_free: u64,
    blocks_available: u64,
    files: u64,
    files_free: u64,
}

fn statvfs(path: &Path) -> Option<FsStats> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed struct of the right type.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    if result != 0 {
        return None;
    }
    Some(FsStats {
        block_size: stats.f_frsize as u64,
        blocks: stats.f_blocks as u64,
        blocks_free: stats.f_bfree as u64,
        blocks_available: stats.f_bavail as u64,
        files: stats.f_files as u64,
        files_free: stats.f_ffree as u64,
    })
}

/// Collects every `interval` until `stop` fires.
pub async fn run(
    host: HostMetrics,
    interval: Duration,
    pipeline: Arc<Pipeline<Metrics>>,
    stop: CancellationToken,
) -> Result<(), String> {
    let host = Arc::new(host);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        let reader = host.clone();
        let Ok(request) = tokio::task::spawn_blocking(move || reader.collect()).await else { continue };
        if let Err(e) = pipeline.send(request, interval).await {
            tracing::warn!(error = %e, "host metrics dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root() -> PathBuf {
        let root = std::env::temp_dir().join(format!("periscope-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("proc/net")).unwrap();
        std::fs::write(root.join("proc/stat"), "cpu  10 0 5 100 1 0 0 0 0 0\ncpu0 250 1 30 9000 7 0 2 3 4 5\nctxt 123456\nbtime 1700000000\nprocesses 999\nprocs_running 2\nprocs_blocked 0\n").unwrap();
        std::fs::write(root.join("proc/meminfo"), "MemTotal:        2048 kB\nActive(anon):     512 kB\nHugePages_Total:       0\n").unwrap();
        std::fs::write(root.join("proc/loadavg"), "0.50 0.25 0.10 1/100 4242\n").unwrap();
        std::fs::write(root.join("proc/diskstats"), "   8       0 sda 100 2 800 40 50 3 1600 60 0 70 100 5 1 64 30 9 1500\n   8       1 sda1 1 1 1 1 1 1 1 1 0 1 1 0 0 0 0\n").unwrap();
        std::fs::write(root.join("proc/net/dev"), "Inter-| head\n face | head\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 1 0 0 0 0 0\n").unwrap();
        root
    }

    type Point = (String, Vec<(String, String)>, f64);

    fn values(request: &Metrics) -> Vec<Point> {
        let mut out = Vec::new();
        for m in &request.resource_metrics[0].scope_metrics[0].metrics {
            let points = match &m.data {
                Some(metric::Data::Gauge(g)) => &g.data_points,
                Some(metric::Data::Sum(s)) => &s.data_points,
                _ => continue,
            };
            for p in points {
                let labels = p
                    .attributes
                    .iter()
                    .map(|kv| {
                        let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(any_value::Value::StringValue(s)) => s.clone(),
                            _ => String::new(),
                        };
                        (kv.key.clone(), v)
                    })
                    .collect();
                let v = match p.value {
                    Some(number_data_point::Value::AsDouble(d)) => d,
                    _ => f64::NAN,
                };
                out.push((m.name.clone(), labels, v));
            }
        }
        out
    }

    fn find(all: &[Point], name: &str, labels: &[(&str, &str)]) -> f64 {
        all.iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v)))
            .map(|x| x.2)
            .unwrap_or_else(|| panic!("no {name} {labels:?}"))
    }

    #[test]
    fn proc_files_become_node_exporter_metrics() {
        let root = fake_root();
        let all = values(&HostMetrics::new(&root, "n1".into()).collect());
        assert_eq!(find(&all, "node_cpu_seconds_total", &[("cpu", "0"), ("mode", "user")]), 2.5);
        assert_eq!(find(&all, "node_cpu_seconds_total", &[("cpu", "0"), ("mode", "steal")]), 0.03);
        assert_eq!(find(&all, "node_cpu_guest_seconds_total", &[("cpu", "0"), ("mode", "nice")]), 0.05);
        assert_eq!(find(&all, "node_context_switches_total", &[]), 123456.0);
        assert_eq!(find(&all, "node_boot_time_seconds", &[]), 1_700_000_000.0);
        assert_eq!(find(&all, "node_memory_MemTotal_bytes", &[]), 2048.0 * 1024.0);
        assert_eq!(find(&all, "node_memory_Active_anon_bytes", &[]), 512.0 * 1024.0);
        assert_eq!(find(&all, "node_memory_HugePages_Total", &[]), 0.0);
        assert_eq!(find(&all, "node_load5", &[]), 0.25);
        assert_eq!(find(&all, "node_disk_read_bytes_total", &[("device", "sda")]), 800.0 * 512.0);
        assert_eq!(find(&all, "node_disk_discarded_sectors_total", &[("device", "sda")]), 64.0);
        assert_eq!(find(&all, "node_disk_flush_requests_time_seconds_total", &[("device", "sda")]), 1.5);
        assert!(!all.iter().any(|(_, l, _)| l.iter().any(|(_, v)| v == "sda1")), "partitions are left out");
        assert_eq!(find(&all, "node_network_transmit_bytes_total", &[("device", "eth0")]), 2000.0);
        assert_eq!(find(&all, "node_network_transmit_errs_total", &[("device", "eth0")]), 1.0);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn network_devices_are_the_hosts_not_the_pods() {
        let root = std::env::temp_dir().join(format!("periscope-host-netns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("proc/1/net")).unwrap();
        // proc/net is the reading process's own network (a pod's); proc/1/net the host's.
        std::fs::create_dir_all(root.join("proc/net")).unwrap();
        std::fs::write(root.join("proc/net/dev"), "Inter-| head\n face | head\n  eth0: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n").unwrap();
        std::fs::write(root.join("proc/1/net/dev"), "Inter-| head\n face | head\n  ens5: 7000 70 0 0 0 0 0 0 9000 90 0 0 0 0 0 0\n").unwrap();
        let all = values(&HostMetrics::new(&root, "n1".into()).collect());
        assert_eq!(find(&all, "node_network_receive_bytes_total", &[("device", "ens5")]), 7000.0);
        assert!(!all.iter().any(|(_, l, _)| l.iter().any(|(_, v)| v == "eth0")), "the pod's interface is not the node's");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_real_root_has_filesystems_and_cpus() {
        let all = values(&HostMetrics::new(Path::new("/"), "n1".into()).collect());
        assert!(all.iter().any(|(n, _, _)| n == "node_filesystem_avail_bytes"));
        assert!(all.iter().any(|(n, _, _)| n == "node_cpu_seconds_total"));
    }
}
