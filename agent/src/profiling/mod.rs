//! CPU profiles on demand: of the agent itself (sampled with pprof-rs) and of the services
//! beside it that expose a pprof endpoint (`sources.pprof`), as gzipped `profile.proto` (what
//! `go tool pprof` reads), a flame graph SVG, or collapsed stacks.
//!
//! One capture of each profiled process runs at a time (a second request gets 409), captures
//! last 1 to 300 seconds at 1 to 1000 Hz, and a capture of the agent stops when its client goes
//! away. On demand, each profiled process may be captured `server.max_profiles_per_minute`
//! times a minute; further requests get 429 with `Retry-After` — a loop of short captures
//! would otherwise spend the node's CPU on starting, symbolizing and rendering profiles (or
//! keep a service profiling without pause). Access rules are the admin server's (see
//! [`crate::admin`]).

pub mod profile;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{oneshot, Semaphore};

use crate::config::PprofTarget;
use profile::{Profile, Stack};

pub const MAX_SECONDS: u64 = 300;
pub const MAX_FREQUENCY: u32 = 1000;
pub const DEFAULT_FREQUENCY: u32 = 99;
pub const DEFAULT_SECONDS: u64 = 10;
/// Largest profile taken from a target.
pub const MAX_PULLED_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of profiles kept from continuous capture; the oldest go first.
pub const KEPT_PROFILE_BYTES: u64 = 256 * 1024 * 1024;

/// What a profile is rendered as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pprof,
    Svg,
    Folded,
}

impl Format {
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "pprof" | "proto" => Some(Format::Pprof),
            "svg" => Some(Format::Svg),
            "folded" | "collapsed" => Some(Format::Folded),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Pprof => "application/octet-stream",
            Format::Svg => "image/svg+xml",
            Format::Folded => "text/plain; charset=utf-8",
        }
    }
}

/// Why a profile could not be had, and the HTTP status that says so.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{0}")]
    Busy(String),
    #[error("{message}")]
    TooMany { message: String, retry_after: Duration },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    UnknownTarget(String),
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    Failed(String),
}

impl ProfileError {
    pub fn status(&self) -> u16 {
        match self {
            ProfileError::Busy(_) => 409,
            ProfileError::TooMany { .. } => 429,
            ProfileError::BadRequest(_) => 400,
            ProfileError::UnknownTarget(_) => 404,
            ProfileError::Upstream(_) => 502,
            ProfileError::Failed(_) => 500,
        }
    }
}

/// A rendered profile.
pub struct Rendered {
    pub format: Format,
    pub body: Vec<u8>,
}

/// How many captures of one process may start within a minute.
struct Budget {
    per_minute: usize,
    starts: Mutex<VecDeque<Instant>>,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Budget {
    fn new(per_minute: usize) -> Budget {
        Budget { per_minute: per_minute.max(1), starts: Mutex::new(VecDeque::new()) }
    }

    /// Counts a start now, or says how long until one is allowed.
    fn take(&self, now: Instant) -> Result<(), Duration> {
        let Ok(mut starts) = self.starts.lock() else { return Ok(()) };
        while starts.front().is_some_and(|&t| now.duration_since(t) >= MINUTE) {
            starts.pop_front();
        }
        if starts.len() >= self.per_minute {
            let oldest = starts.front().copied().unwrap_or(now);
            return Err(MINUTE.saturating_sub(now.duration_since(oldest)));
        }
        starts.push_back(now);
        Ok(())
    }

    fn refuse(&self, what: &str, retry_after: Duration) -> ProfileError {
        ProfileError::TooMany {
            message: format!(
                "{what} was profiled {} times in the last minute (server.max_profiles_per_minute); try again in {}s",
                self.per_minute,
                retry_after.as_secs().max(1)
            ),
            retry_after,
        }
    }
}

/// One profiled process: one capture at a time, within its budget.
struct Gate {
    busy: Arc<Semaphore>,
    budget: Budget,
}

impl Gate {
    fn new(per_minute: usize) -> Gate {
        Gate { busy: Arc::new(Semaphore::new(1)), budget: Budget::new(per_minute) }
    }

    /// Admits an on-demand capture of `what`, held until the permit drops.
    fn admit(&self, what: &str) -> Result<tokio::sync::OwnedSemaphorePermit, ProfileError> {
        let permit = self.lock(what)?;
        self.budget.take(Instant::now()).map_err(|after| self.budget.refuse(what, after))?;
        Ok(permit)
    }

    /// Admits a scheduled capture (continuous mode keeps to its own interval).
    fn lock(&self, what: &str) -> Result<tokio::sync::OwnedSemaphorePermit, ProfileError> {
        self.busy
            .clone()
            .try_acquire_owned()
            .map_err(|_| ProfileError::Busy(format!("a profile of {what} is already being captured; try again when it is done")))
    }
}

#[derive(Clone)]
pub struct Profiling {
    own: Arc<Gate>,
    targets: Arc<HashMap<String, (PprofTarget, Arc<Gate>)>>,
    client: reqwest::Client,
}

impl Profiling {
    pub fn new(targets: &[PprofTarget], client: reqwest::Client, per_minute: usize) -> Profiling {
        let targets = targets.iter().map(|t| (t.name.clone(), (t.clone(), Arc::new(Gate::new(per_minute))))).collect();
        Profiling { own: Arc::new(Gate::new(per_minute)), targets: Arc::new(targets), client }
    }

    /// Samples the agent for `seconds` at `frequency` Hz. Dropping the future stops the capture.
    pub async fn capture_self(&self, seconds: u64, frequency: u32, format: Format) -> Result<Rendered, ProfileError> {
        let _permit = self.own.admit("the agent")?;
        let (done_tx, done_rx) = oneshot::channel();
        let (cancel_tx, cancel_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("periscope-profiler".into())
            .spawn(move || {
                let _ = done_tx.send(sample_self(seconds, frequency, cancel_rx));
            })
            .map_err(|e| ProfileError::Failed(format!("cannot start the profiler: {e}")))?;
        // Held until the capture ends; dropping it (the client went away) stops the sampling.
        let _cancel = cancel_tx;
        let profile = done_rx.await.map_err(|_| ProfileError::Failed("the profiler stopped unexpectedly".into()))??;
        render(&profile, None, format, "periscope")
    }

    /// Pulls a profile from the target called `name`, of `seconds` or the target's own
    /// `seconds` setting.
    pub async fn capture_target(&self, name: &str, seconds: Option<u64>, format: Format) -> Result<Rendered, ProfileError> {
        let seconds = match (seconds, self.targets.get(name)) {
            (Some(s), _) => s,
            (None, Some((target, _))) => u64::from(target.seconds).clamp(1, MAX_SECONDS),
            (None, None) => DEFAULT_SECONDS,
        };
        let (profile, body) = self.pull(name, seconds, true).await?;
        render(&profile, Some(body), format, name)
    }

    /// Pulls a profile and returns it decoded and as received; `on_demand` ones count against
    /// the target's budget.
    async fn pull(&self, name: &str, seconds: u64, on_demand: bool) -> Result<(Profile, Vec<u8>), ProfileError> {
        let Some((target, gate)) = self.targets.get(name) else {
            let known: Vec<&str> = self.targets.keys().map(String::as_str).collect();
            return Err(ProfileError::UnknownTarget(format!("no pprof target {name:?}; configured: {known:?}")));
        };
        let _permit = if on_demand { gate.admit(name)? } else { gate.lock(name)? };
        let separator = if target.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}seconds={seconds}", target.url);
        let response = self
            .client
            .get(&url)
            .timeout(Duration::from_secs(seconds + 15))
            .send()
            .await
            .map_err(|e| ProfileError::Upstream(format!("{name}: GET {url}: {}", crate::exporters::otlp::error_chain(&e))))?;
        let status = response.status();
        let mut response = response;
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_PULLED_BYTES {
                        return Err(ProfileError::Upstream(format!("{name}: the answer of {url} is larger than {MAX_PULLED_BYTES} bytes")));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(ProfileError::Upstream(format!("{name}: reading the answer of {url}: {e}"))),
            }
        }
        if !status.is_success() {
            let text: String = String::from_utf8_lossy(&body).trim().chars().take(300).collect();
            let message = format!("{name} answered HTTP {status}: {text}");
            // Go's net/http/pprof answers 500 "cpu profiling already in use".
            return Err(if status.as_u16() == 409 || text.contains("already in use") {
                ProfileError::Busy(message)
            } else {
                ProfileError::Upstream(message)
            });
        }
        let profile = profile::decode(&body).map_err(|e| {
            let start: String = String::from_utf8_lossy(&body[..body.len().min(40)]).chars().filter(|c| !c.is_control()).collect();
            ProfileError::Upstream(format!("{name} did not return a CPU profile ({e}); it began with {start:?}"))
        })?;
        Ok((profile, body))
    }

    /// Captures every target that has an `interval` into `store`, until `stop` fires.
    pub async fn continuous(&self, store: Arc<store::ProfileStore>, node: String, stop: tokio_util::sync::CancellationToken) {
        let mut tasks = tokio::task::JoinSet::new();
        for (name, (target, _)) in self.targets.iter() {
            if target.interval.is_zero() {
                continue;
            }
            let (this, store, node, stop, name) = (self.clone(), store.clone(), node.clone(), stop.clone(), name.clone());
            let (interval, seconds) = (target.interval, u64::from(target.seconds.clamp(1, MAX_SECONDS as u32)));
            tasks.spawn(async move {
                tracing::info!(target = %name, ?interval, seconds, "capturing profiles continuously");
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let started = SystemTime::now();
                    let pulled = tokio::select! {
                        pulled = this.pull(&name, seconds, false) => pulled,
                        _ = stop.cancelled() => return,
                    };
                    match pulled {
                        Ok((profile, body)) => {
                            let start_ms = started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                            let meta = store::ProfileMeta {
                                id: format!("{start_ms:020}-{}-{:08x}", sanitize(&name), crc32fast::hash(name.as_bytes())),
                                target: name.clone(),
                                node: node.clone(),
                                service: name.clone(),
                                start: humantime::format_rfc3339_millis(started).to_string(),
                                duration_seconds: seconds,
                                samples: profile.sample.iter().map(|s| s.value.first().copied().unwrap_or(0).max(0) as u64).sum(),
                                size: body.len() as u64,
                            };
                            if let Err(e) = store.save(meta, &body) {
                                tracing::warn!(target = %name, error = %e, "cannot keep a profile");
                            }
                        }
                        Err(e) => tracing::warn!(target = %name, error = %e, "continuous profile failed"),
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Renders a kept profile.
pub fn render_kept(body: &[u8], format: Format, title: &str) -> Result<Rendered, ProfileError> {
    let profile = profile::decode(body).map_err(ProfileError::Failed)?;
    render(&profile, Some(body.to_vec()), format, title)
}

impl Profiling {
    /// The configured targets' names.
    pub fn target_names(&self) -> Vec<String> {
        self.targets.keys().cloned().collect()
    }
}

fn render(profile: &Profile, original: Option<Vec<u8>>, format: Format, title: &str) -> Result<Rendered, ProfileError> {
    let body = match format {
        Format::Pprof => original.unwrap_or_else(|| profile::encode_gzipped(profile)),
        Format::Folded => profile::folded(profile).into_bytes(),
        Format::Svg => {
            let folded = profile::folded(profile);
            let mut options = inferno::flamegraph::Options::default();
            options.title = format!("CPU: {title}");
            options.count_name = "samples".into();
            let lines: Vec<&str> = if folded.is_empty() { vec!["(no samples) 1"] } else { folded.lines().collect() };
            let mut svg = Vec::new();
            inferno::flamegraph::from_lines(&mut options, lines, &mut svg)
                .map_err(|e| ProfileError::Failed(format!("cannot render the flame graph: {e}")))?;
            svg
        }
    };
    Ok(Rendered { format, body })
}

/// Samples this process on the calling thread's behalf until `seconds` pass or `cancel` hangs up.
fn sample_self(seconds: u64, frequency: u32, cancel: std::sync::mpsc::Receiver<()>) -> Result<Profile, ProfileError> {
    let start = SystemTime::now();
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(frequency as i32)
        // Unwinding through these from a signal handler can deadlock.
        .blocklist(&["libc", "libgcc", "pthread", "vdso", "ld-linux"])
        .build()
        .map_err(|e| ProfileError::Failed(format!("cannot start sampling: {e}")))?;
    // Either the time is up or the client went away.
    let _ = cancel.recv_timeout(Duration::from_secs(seconds));
    let report = guard.report().build().map_err(|e| ProfileError::Failed(format!("cannot build the report: {e}")))?;
    // Stopping replaces pprof-rs's table of stacks (64 MiB, in small blocks) with a fresh one,
    // and symbolizing left the debug info of every library parsed in a cache (tens of MiB):
    // both go back to the system rather than stay with an idle agent. The next capture parses
    // the debug info again (a fraction of a CPU-second).
    drop(guard);
    backtrace::clear_symbol_cache();
    crate::memory::release();
    let stacks: Vec<Stack> = report
        .data
        .iter()
        .map(|(frames, count)| {
            let mut stack = vec![(frames.thread_name_or_id(), String::new(), 0)];
            // Frames are leaf first; inlined symbols of a frame likewise.
            for frame in frames.frames.iter().rev() {
                for symbol in frame.iter().rev() {
                    stack.push((symbol.name(), symbol.filename().into_owned(), symbol.lineno()));
                }
            }
            Stack { frames: stack, count: *count as i64 }
        })
        .collect();
    let start_nanos = start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    let duration = report.timing.duration.as_nanos() as i64;
    Ok(profile::from_stacks(&stacks, i64::from(frequency), start_nanos, duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_admits_so_many_starts_a_minute_and_says_when_the_next_is_due() {
        let budget = Budget::new(2);
        let t0 = Instant::now();
        assert_eq!(budget.take(t0), Ok(()));
        assert_eq!(budget.take(t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!(budget.take(t0 + Duration::from_secs(20)), Err(Duration::from_secs(40)));
        // A minute after the first start, one more fits.
        assert_eq!(budget.take(t0 + Duration::from_secs(60)), Ok(()));
        assert_eq!(budget.take(t0 + Duration::from_secs(61)), Err(Duration::from_secs(9)));
    }

    #[test]
    fn a_busy_refusal_uses_no_budget_and_an_exhausted_budget_answers_429() {
        let gate = Gate::new(1);
        let permit = gate.admit("x").unwrap();
        assert!(matches!(gate.admit("x"), Err(ProfileError::Busy(_))), "one at a time");
        drop(permit);
        let refused = gate.admit("x").unwrap_err();
        assert_eq!(refused.status(), 429);
        assert!(refused.to_string().contains("server.max_profiles_per_minute"), "{refused}");
    }
}
