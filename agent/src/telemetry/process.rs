//! The agent's own process, read from `/proc/self` at every scrape of `/metrics`:
//! `periscope_process_cpu_seconds_total`, `periscope_process_resident_memory_bytes`,
//! `periscope_process_virtual_memory_bytes`, `periscope_process_threads`,
//! `periscope_process_open_fds`, `periscope_process_max_fds` and
//! `periscope_process_start_time_seconds` — the Prometheus client libraries' process metrics,
//! under the agent's prefix. What cannot be read (another OS, a restricted `/proc`) is left
//! out rather than reported as zero.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self` says now.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    threads: Option<f64>,
    start_time_seconds: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
}

fn read() -> Reading {
    let mut reading = Reading::default();
    // SAFETY: sysconf has no preconditions; it reads configuration values.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| boot_time(&s));
        parse_stat(&stat, ticks as f64, page as f64, boot, &mut reading);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        reading.open_fds = Some(entries.count() as f64);
    }
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        reading.max_fds = max_open_files(&limits);
    }
    reading
}

/// The fields of `/proc/self/stat` (proc(5)) after the command name, which may hold spaces.
fn parse_stat(stat: &str, ticks_per_second: f64, page_size: f64, boot_time: Option<f64>, out: &mut Reading) {
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return };
    // Field 3 (state) is the first after the name.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    if ticks_per_second > 0.0 {
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            out.cpu_seconds = Some((user + system) / ticks_per_second);
        }
        if let (Some(start), Some(boot)) = (field(22), boot_time) {
            out.start_time_seconds = Some(boot + start / ticks_per_second);
        }
    }
    out.threads = field(20);
    out.virtual_bytes = field(23);
    if page_size > 0.0 {
        out.resident_bytes = field(24).map(|pages| pages * page_size);
    }
}

fn boot_time(stat: &str) -> Option<f64> {
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

fn max_open_files(limits: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = read();
        if let Some(v) = r.cpu_seconds {
            let counter = ConstCounter::new(v);
            let metric = encoder.encode_descriptor("process_cpu", "User and system CPU time of the agent", Some(&Unit::Seconds), counter.metric_type())?;
            counter.encode(metric)?;
        }
        let gauges = [
            ("process_resident_memory", "Resident memory of the agent", Some(Unit::Bytes), r.resident_bytes),
            ("process_virtual_memory", "Virtual memory of the agent", Some(Unit::Bytes), r.virtual_bytes),
            ("process_threads", "Threads of the agent", None, r.threads),
            ("process_open_fds", "Open file descriptors of the agent", None, r.open_fds),
            ("process_max_fds", "The agent's limit of open file descriptors", None, r.max_fds),
            ("process_start_time", "When the agent started, in Unix seconds", Some(Unit::Seconds), r.start_time_seconds),
        ];
        for (name, help, unit, value) in gauges {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, unit.as_ref(), gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_past_a_command_name_with_spaces() {
        // proc(5): pid (comm) state ppid ... utime(14) stime(15) ... num_threads(20) ... starttime(22) vsize(23) rss(24)
        let stat = "4242 (periscope (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 7 0 12000 104857600 2560 18446744073709551615";
        let mut reading = Reading::default();
        parse_stat(stat, 100.0, 4096.0, Some(1_700_000_000.0), &mut reading);
        assert_eq!(reading.cpu_seconds, Some(3.0));
        assert_eq!(reading.threads, Some(7.0));
        assert_eq!(reading.start_time_seconds, Some(1_700_000_120.0));
        assert_eq!(reading.virtual_bytes, Some(104_857_600.0));
        assert_eq!(reading.resident_bytes, Some(2560.0 * 4096.0));
    }

    #[test]
    fn limits_and_boot_time_are_found() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024.0));
        assert_eq!(boot_time("cpu  1 2 3\nbtime 1700000000\n"), Some(1_700_000_000.0));
    }

    #[test]
    fn this_process_is_read() {
        let reading = read();
        assert!(reading.resident_bytes.is_some_and(|b| b > 0.0), "{reading:?}");
        assert!(reading.threads.is_some_and(|t| t >= 1.0), "{reading:?}");
        assert!(reading.open_fds.is_some_and(|n| n >= 1.0), "{reading:?}");
        assert!(reading.cpu_seconds.is_some(), "{reading:?}");
    }
}
