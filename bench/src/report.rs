//! Result files of the harness: `name=value` lines, one per figure, so `run.sh` can read them
//! with `source`. A file is replaced whole (written beside, then renamed), so a reader never
//! sees half of it.

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Renders `name=value` lines. Names must be shell identifiers and values plain numbers or
/// words, which is all the harness reports.
pub fn render(entries: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (name, value) in entries {
        debug_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        let _ = writeln!(out, "{name}={value}");
    }
    out
}

/// Writes the entries to `path`, replacing the file in one step.
pub fn write(path: &Path, entries: &[(&str, String)]) -> io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, render(entries))?;
    std::fs::rename(&partial, path)
}

/// Wall-clock time in nanoseconds since the Unix epoch: the one clock the load generator and
/// the sink (separate processes) share.
pub fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_shell_assignments_and_the_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("periscope-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats");
        write(&path, &[("spans", "10".into()), ("last_ns", "0".into())]).unwrap();
        write(&path, &[("spans", "2048".into()), ("last_ns", "17".into())]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "spans=2048\nlast_ns=17\n");
        assert!(!dir.join("stats.partial").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
