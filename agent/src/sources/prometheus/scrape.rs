//! One scrape target: fetch, parse, label, and hand the samples to the exporters as a
//! [`Scrape`]: the target's series table and one value per series.
//!
//! As Prometheus does with `honor_labels: false`: every series gets `job` and `instance`
//! (the target's `host:port`) and the target's static labels; a scraped label that clashes
//! with one of these is kept as `exported_<name>`. Every scrape also yields `up`,
//! `scrape_duration_seconds` and `scrape_samples_scraped`. Series that were in the previous
//! scrape and are not in this one (or all of them, when the scrape fails) are listed as stale,
//! so exporters drop them and remote write sends staleness markers: no ghost series.
//!
//! Most targets expose the same series, in the same order, scrape after scrape. A target keeps
//! a [`Template`] of its last body — its comment lines and the bytes of every sample's series —
//! and reads the next body by comparing bytes and parsing only the values. A body that differs
//! anywhere is parsed in full and checked as the first was, and becomes the new template.

use ahash::RandomState;
use flate2::read::GzDecoder;
use std::collections::HashSet;
use std::borrow::Cow;
use std::io::Read as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::parse::{self, Exposition, Format, Kind};
use crate::config::StaticTarget;
use crate::signal::scrape::{Scrape, SeriesTable, TableBuilder};
use crate::telemetry::exposition::{ExemplarText, Type};

/// Largest body taken from a target, after decompression.
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

const ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Why a scrape failed, for the `reason` label and the log.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("GET {url}: {message}")]
    Connect { url: String, message: String },
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url}: {message}")]
    Parse { url: String, message: String },
}

impl ScrapeError {
    pub fn reason(&self) -> &'static str {
        match self {
            ScrapeError::Connect { .. } => "connect",
            ScrapeError::Timeout { .. } => "timeout",
            ScrapeError::Status { .. } => "http_status",
            ScrapeError::TooLarge { .. } => "too_large",
            ScrapeError::Parse { .. } => "parse",
        }
    }
}

/// What one scrape produced.
pub struct Scraped {
    pub scrape: Scrape,
    pub samples: usize,
    pub error: Option<ScrapeError>,
    /// Series left out because the target has more than its `max_series`.
    pub over_limit: usize,
}

/// A line of the template: a comment (or empty) line compared whole, or a sample line whose
/// series is compared and whose value is parsed.
#[derive(Debug, Clone, Copy)]
struct Line {
    /// End of this line's bytes in [`Template::raw`].
    end: u32,
    /// The series index, or [`COMMENT`], or [`SKIP`] for a sample that is not exported
    /// (`_created`, or over the series limit).
    series: u32,
}

const COMMENT: u32 = u32::MAX;
const SKIP: u32 = u32::MAX - 1;

/// What the last body that parsed looked like.
struct Template {
    format: Format,
    /// Comment lines and sample series, back to back.
    raw: Vec<u8>,
    lines: Vec<Line>,
    table: Arc<SeriesTable>,
    /// Samples in the body (`scrape_samples_scraped`).
    samples: usize,
    over_limit: usize,
}

/// What reading a body gave.
struct Reading {
    table: Arc<SeriesTable>,
    values: Vec<f64>,
    timestamps: Vec<i64>,
    exemplars: Vec<(u32, ExemplarText)>,
    samples: usize,
    over_limit: usize,
}

impl Template {
    /// Reads a body with exactly the template's lines: every comment line and every sample's
    /// series byte for byte, values free. `None` when anything differs or does not parse.
    fn read(&self, body: &[u8], format: Format) -> Option<Reading> {
        if format != self.format {
            return None;
        }
        let mut read = Reading {
            table: self.table.clone(),
            values: vec![0.0; self.table.len()],
            timestamps: Vec::new(),
            exemplars: Vec::new(),
            samples: self.samples,
            over_limit: self.over_limit,
        };
        let mut pos = 0usize;
        let mut start = 0usize;
        for line in &self.lines {
            let raw = &self.raw[start..line.end as usize];
            start = line.end as usize;
            let rest = body.get(pos..)?;
            if !rest.starts_with(raw) {
                return None;
            }
            let after = pos + raw.len();
            if line.series == COMMENT {
                match body.get(after) {
                    Some(b'\n') => pos = after + 1,
                    None => pos = after + 1,
                    Some(_) => return None,
                }
                continue;
            }
            // The series must end where it ended before: at its closing brace, or at the blank
            // after its name.
            if raw.last() != Some(&b'}') && !matches!(body.get(after), Some(b' ' | b'\t')) {
                return None;
            }
            // Most lines end in one blank and a plain number: read it in one pass.
            if body.get(after) == Some(&b' ') {
                if let Some((value, length)) = parse::number_prefix(&body[after + 1..]) {
                    let end = after + 1 + length;
                    if matches!(body.get(end), Some(b'\n') | None) {
                        if line.series != SKIP {
                            read.values[line.series as usize] = value;
                        }
                        pos = end + 1;
                        continue;
                    }
                }
            }
            // Other values (NaN, +Inf, long digits) in a second pass.
            let mut i = after;
            while matches!(body.get(i), Some(b' ' | b'\t')) {
                i += 1;
            }
            let value_start = i;
            while let Some(&b) = body.get(i) {
                if matches!(b, b'\n' | b' ' | b'\t' | b'\r' | b'#') {
                    break;
                }
                i += 1;
            }
            if matches!(body.get(i), Some(b'\n') | None) && i > value_start {
                let value = parse::parse_value_bytes(&body[value_start..i])?;
                if line.series != SKIP {
                    read.values[line.series as usize] = value;
                }
                pos = i + 1;
                continue;
            }
            // A timestamp, an exemplar, or a carriage return: the parser's own way.
            let eol = memchr::memchr(b'\n', &body[i..]).map_or(body.len(), |n| i + n);
            let mut tail = &body[after..eol];
            if format == Format::Text {
                while let [head @ .., b'\r'] = tail {
                    tail = head;
                }
            }
            let tail = std::str::from_utf8(tail).ok()?;
            let (value, timestamp, exemplar) = parse::parse_tail(tail, 0, format).ok()?;
            if line.series != SKIP {
                let series = line.series as usize;
                read.values[series] = value;
                if let Some(ms) = timestamp {
                    if read.timestamps.is_empty() {
                        read.timestamps = vec![0; self.table.len()];
                    }
                    read.timestamps[series] = ms;
                }
                if let Some(e) = exemplar {
                    read.exemplars.push((line.series, exemplar_text(&e)));
                }
            }
            pos = eol + 1;
        }
        (pos == body.len() + 1).then_some(read)
    }
}

fn exemplar_text(e: &parse::Exemplar<'_>) -> ExemplarText {
    ExemplarText {
        labels: e.labels.iter().map(|l| (l.name.to_owned(), l.value.clone().into_owned())).collect(),
        value: e.value,
        timestamp: e.timestamp_ms.map(|ms| ms as f64 / 1000.0),
    }
}

pub struct Target {
    pub job: String,
    pub url: String,
    pub instance: String,
    job_label: Arc<str>,
    instance_label: Arc<str>,
    labels: Vec<(String, String)>,
    client: reqwest::Client,
    timeout: Duration,
    /// Series kept; further ones, in the order the target exposes them, are dropped and
    /// counted.
    max_series: usize,
    template: Option<Template>,
    /// The table of a failed scrape: `up` and the scrape's own series only.
    down: Option<Arc<SeriesTable>>,
    /// The table of the last scrape, whose series vanish if the next one lacks them.
    current: Option<Arc<SeriesTable>>,
    /// About the size of the last body, to size the next one's buffer.
    body_hint: std::sync::atomic::AtomicUsize,
    full_parses: u64,
}

/// `host:port` of a URL, as Prometheus names an instance.
pub fn instance_of(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(uri) => {
            let host = uri.host().unwrap_or("");
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            format!("{host}:{port}")
        }
        Err(_) => url.to_owned(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The series every scrape adds, in this order, after the target's own.
const SCRAPE_SERIES: [(&str, &str); 3] = [
    ("up", "1 if the target answered the last scrape with metrics that parse, 0 if not."),
    ("scrape_duration_seconds", "How long the last scrape of the target took."),
    ("scrape_samples_scraped", "Samples the target exposed in the last scrape."),
];

/// Indexes of `old`'s series that `new` does not have.
fn vanished(old: &SeriesTable, new: &SeriesTable) -> Vec<u32> {
    let kept: HashSet<&[u8], RandomState> = (0..new.len()).map(|i| new.encoded_labels(i)).collect();
    (0..old.len()).filter(|&i| !kept.contains(old.encoded_labels(i))).map(|i| i as u32).collect()
}

impl Target {
    pub fn new(config: &StaticTarget, client: reqwest::Client, timeout: Duration, max_series: usize) -> Target {
        let instance = instance_of(&config.url);
        Target {
            job: config.job.clone(),
            url: config.url.clone(),
            job_label: config.job.as_str().into(),
            instance_label: instance.as_str().into(),
            instance,
            labels: config.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            client,
            timeout,
            max_series,
            template: None,
            down: None,
            current: None,
            body_hint: Default::default(),
            full_parses: 0,
        }
    }

    async fn fetch(&self) -> Result<(Vec<u8>, Format), ScrapeError> {
        let url = &self.url;
        let request = self
            .client
            .get(url)
            .header(http::header::ACCEPT, ACCEPT)
            .header(http::header::ACCEPT_ENCODING, "gzip")
            .header("X-Prometheus-Scrape-Timeout-Seconds", format!("{}", self.timeout.as_secs_f64()))
            .timeout(self.timeout);
        let mut response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                ScrapeError::Timeout { url: url.clone(), timeout: self.timeout }
            } else {
                ScrapeError::Connect { url: url.clone(), message: crate::exporters::otlp::error_chain(&e) }
            }
        })?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status { url: url.clone(), status: response.status().as_u16() });
        }
        let header = |name| response.headers().get(name).and_then(|v: &http::HeaderValue| v.to_str().ok()).unwrap_or("").to_owned();
        let format = if header(http::header::CONTENT_TYPE).starts_with("application/openmetrics-text") {
            Format::OpenMetrics
        } else {
            Format::Text
        };
        let gzip = header(http::header::CONTENT_ENCODING).eq_ignore_ascii_case("gzip");
        let mut body = Vec::new();
        loop {
            let chunk = tokio::time::timeout(self.timeout, response.chunk()).await.map_err(|_| ScrapeError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })?;
            match chunk {
                Ok(Some(bytes)) => {
                    if body.len() + bytes.len() > MAX_BODY_BYTES {
                        return Err(ScrapeError::TooLarge { url: url.clone() });
                    }
                    body.extend_from_slice(&bytes);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(ScrapeError::Connect { url: url.clone(), message: crate::exporters::otlp::error_chain(&e) })
                }
            }
        }
        if gzip {
            // Room for as much as the last body held, so the buffer does not grow by doubling.
            let mut inflated = Vec::with_capacity(self.body_hint.load(std::sync::atomic::Ordering::Relaxed).min(MAX_BODY_BYTES));
            GzDecoder::new(&body[..])
                .take(MAX_BODY_BYTES as u64 + 1)
                .read_to_end(&mut inflated)
                .map_err(|e| ScrapeError::Parse { url: url.clone(), message: format!("bad gzip body: {e}") })?;
            if inflated.len() > MAX_BODY_BYTES {
                return Err(ScrapeError::TooLarge { url: url.clone() });
            }
            body = inflated;
        }
        self.body_hint.store(body.len() + body.len() / 16, std::sync::atomic::Ordering::Relaxed);
        Ok((body, format))
    }

    /// Scrapes once.
    pub async fn scrape(&mut self) -> Scraped {
        let started = Instant::now();
        let time_ms = now_ms();
        let full_parses = self.full_parses;
        let read = match self.fetch().await {
            Ok((body, format)) => self.read(&body, format),
            Err(e) => Err(e),
        };
        if self.full_parses != full_parses {
            // Parsing in full and building a table is a burst of allocations, once per change
            // of series: give back what it leaves free.
            crate::memory::release();
        }
        let (mut read, error) = match read {
            Ok(read) => (read, None),
            Err(e) => {
                let table = self.down_table();
                let values = vec![0.0; table.len()];
                (Reading { table, values, timestamps: Vec::new(), exemplars: Vec::new(), samples: 0, over_limit: 0 }, Some(e))
            }
        };
        let n = read.values.len();
        read.values[n - 3] = if error.is_none() { 1.0 } else { 0.0 };
        read.values[n - 2] = started.elapsed().as_secs_f64();
        read.values[n - 1] = read.samples as f64;
        let stale = match self.current.replace(read.table.clone()) {
            Some(old) if !Arc::ptr_eq(&old, &read.table) => {
                let gone = vanished(&old, &read.table);
                (!gone.is_empty()).then_some((old, gone))
            }
            _ => None,
        };
        let scrape = Scrape {
            job: self.job_label.clone(),
            instance: self.instance_label.clone(),
            table: read.table,
            values: read.values,
            timestamps: read.timestamps,
            time_ms,
            exemplars: read.exemplars,
            stale,
        };
        Scraped { scrape, samples: read.samples, error, over_limit: read.over_limit }
    }

    /// The last scrape of a target that goes away: every series it had, marked stale.
    pub fn retire(&mut self) -> Option<Scrape> {
        let table = self.current.take().filter(|t| !t.is_empty())?;
        let gone = (0..table.len() as u32).collect();
        self.template = None;
        Some(Scrape {
            job: self.job_label.clone(),
            instance: self.instance_label.clone(),
            table: Arc::new(SeriesTable::default()),
            values: Vec::new(),
            timestamps: Vec::new(),
            time_ms: now_ms(),
            exemplars: Vec::new(),
            stale: Some((table, gone)),
        })
    }

    /// Reads one body as a scrape does (by the template when it still fits, else in full),
    /// without fetching it: the samples it held. For benchmarks.
    pub fn read_body(&mut self, body: &[u8], format: Format) -> Result<usize, ScrapeError> {
        let reading = self.read(body, format)?;
        self.current = Some(reading.table.clone());
        Ok(reading.samples)
    }

    /// Whether the next body like the last one will be read by the template.
    pub fn has_template(&self) -> bool {
        self.template.is_some()
    }

    /// Reads a body: by the template when it still fits, else parsed in full.
    fn read(&mut self, body: &[u8], format: Format) -> Result<Reading, ScrapeError> {
        if let Some(read) = self.template.as_ref().and_then(|t| t.read(body, format)) {
            return Ok(read);
        }
        self.full_parses += 1;
        let parse_error = |message: String| ScrapeError::Parse { url: self.url.clone(), message };
        let text = std::str::from_utf8(body).map_err(|e| parse_error(format!("body is not UTF-8: {e}")))?;
        let exposition = parse::parse(text, format).map_err(|e| parse_error(e.to_string()))?;
        let (table, series_of, over_limit) = self.table(&exposition);
        // The same series as before (only values or comments changed): keep the table, so
        // that nothing downstream sees a change.
        let table = match &self.current {
            Some(current) if current.same_series(&table) => current.clone(),
            _ => Arc::new(table),
        };
        let mut read = Reading {
            table: table.clone(),
            values: vec![0.0; table.len()],
            timestamps: Vec::new(),
            exemplars: Vec::new(),
            samples: exposition.samples.len(),
            over_limit,
        };
        for (sample, &series) in exposition.samples.iter().zip(&series_of) {
            if series == SKIP {
                continue;
            }
            read.values[series as usize] = sample.value;
            if let Some(ms) = sample.timestamp_ms {
                if read.timestamps.is_empty() {
                    read.timestamps = vec![0; table.len()];
                }
                read.timestamps[series as usize] = ms;
            }
            if let Some(e) = &sample.exemplar {
                read.exemplars.push((series, exemplar_text(e)));
            }
        }
        read.exemplars.sort_by_key(|(i, _)| *i);
        self.template = template(text, format, &exposition, &series_of).map(|(raw, lines)| Template {
            format,
            raw,
            lines,
            table,
            samples: read.samples,
            over_limit,
        });
        Ok(read)
    }

    /// The series of a parsed body, labelled for this target, and each sample's series index
    /// (or [`SKIP`]).
    fn table(&self, exposition: &Exposition<'_>) -> (SeriesTable, Vec<u32>, usize) {
        let mut builder = TableBuilder::with_capacity(exposition.samples.len() + SCRAPE_SERIES.len());
        let mut series_of = vec![SKIP; exposition.samples.len()];
        let mut over_limit = 0;
        let mut pairs: Vec<(Cow<'_, str>, &str)> = Vec::new();
        for family in &exposition.families {
            let help = family.help.as_deref().unwrap_or("");
            for k in family.samples.clone() {
                let sample = &exposition.samples[k];
                let created = sample.name.ends_with("_created") && matches!(family.kind, Kind::Counter | Kind::Histogram | Kind::Summary);
                if created {
                    continue;
                }
                if builder.len() >= self.max_series {
                    over_limit += 1;
                    continue;
                }
                let (render, kind) = match family.kind {
                    Kind::Histogram => (family.name, Type::Histogram),
                    Kind::Summary => (family.name, Type::Summary),
                    Kind::Counter => (sample.name, Type::Counter),
                    _ => (sample.name, Type::Gauge),
                };
                pairs.clear();
                for label in exposition.labels_of(sample) {
                    let name = if self.clashes(label.name) { Cow::Owned(format!("exported_{}", label.name)) } else { Cow::Borrowed(label.name) };
                    pairs.push((name, &label.value));
                }
                self.target_labels(&mut pairs);
                series_of[k] = builder.push((render, help, kind), sample.name, &pairs);
            }
        }
        for (name, help) in SCRAPE_SERIES {
            pairs.clear();
            self.target_labels(&mut pairs);
            builder.push((name, help, Type::Gauge), name, &pairs);
        }
        (builder.finish(), series_of, over_limit)
    }

    fn clashes(&self, name: &str) -> bool {
        name == "job" || name == "instance" || self.labels.iter().any(|(k, _)| k == name)
    }

    fn target_labels<'a>(&'a self, pairs: &mut Vec<(Cow<'a, str>, &'a str)>) {
        pairs.extend(self.labels.iter().map(|(k, v)| (Cow::Borrowed(k.as_str()), v.as_str())));
        pairs.push((Cow::Borrowed("job"), &self.job));
        pairs.push((Cow::Borrowed("instance"), &self.instance));
    }

    fn down_table(&mut self) -> Arc<SeriesTable> {
        if let Some(down) = &self.down {
            return down.clone();
        }
        let (table, _, _) = self.table(&Exposition::default());
        let table = Arc::new(table);
        self.down = Some(table.clone());
        table
    }
}

/// The template of a body that parsed: its lines as [`parse::parse`] splits them.
fn template(text: &str, format: Format, exposition: &Exposition<'_>, series_of: &[u32]) -> Option<(Vec<u8>, Vec<Line>)> {
    let mut raw = Vec::with_capacity(text.len() / 2);
    let mut lines = Vec::with_capacity(exposition.samples.len() + exposition.families.len() * 2 + 1);
    let mut k = 0;
    for piece in text.split('\n') {
        let line = if format == Format::Text { piece.trim_end_matches('\r') } else { piece };
        if line.is_empty() || line.starts_with('#') {
            raw.extend_from_slice(piece.as_bytes());
            lines.push(Line { end: u32::try_from(raw.len()).ok()?, series: COMMENT });
            continue;
        }
        let sample = exposition.samples.get(k)?;
        raw.extend_from_slice(line.get(..sample.key_len)?.as_bytes());
        lines.push(Line { end: u32::try_from(raw.len()).ok()?, series: series_of[k] });
        k += 1;
    }
    (k == exposition.samples.len()).then_some((raw, lines))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Serves whatever body the test puts in, as text format 0.0.4.
    async fn serve(body: Arc<Mutex<String>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let body = body.clone();
                async move { body.lock().unwrap().clone() }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn target(url: &str) -> Target {
        let config = StaticTarget {
            job: "svc".into(),
            url: url.into(),
            labels: [("team".to_owned(), "video".to_owned())].into_iter().collect(),
        };
        Target::new(&config, crate::sources::prometheus::client().unwrap(), Duration::from_secs(5), 200_000)
    }

    type Sample = (String, Vec<(String, String)>, f64);

    fn series(table: &SeriesTable, i: usize) -> (String, Vec<(String, String)>) {
        let mut name = String::new();
        let mut labels = Vec::new();
        for (k, v) in table.labels(i) {
            if k == "__name__" {
                name = v.to_owned();
            } else {
                labels.push((k.to_owned(), v.to_owned()));
            }
        }
        (name, labels)
    }

    fn samples(scrape: &Scrape) -> Vec<Sample> {
        (0..scrape.values.len())
            .map(|i| {
                let (name, labels) = series(&scrape.table, i);
                (name, labels, scrape.values[i])
            })
            .collect()
    }

    fn stale(scrape: &Scrape) -> Vec<(String, Vec<(String, String)>)> {
        scrape.stale.iter().flat_map(|(table, gone)| gone.iter().map(|&i| series(table, i as usize))).collect()
    }

    fn value(got: &[Sample], name: &str) -> f64 {
        got.iter().find(|s| s.0 == name).unwrap_or_else(|| panic!("no {name} in {got:?}")).2
    }

    #[tokio::test]
    async fn samples_get_target_labels_and_vanished_series_are_marked_stale() {
        let body = Arc::new(Mutex::new("# TYPE hits_total counter\nhits_total{path=\"/a\",team=\"x\"} 3\nhits_total{path=\"/b\"} 4\n".to_owned()));
        let url = serve(body.clone()).await;
        let mut target = target(&url);
        let scraped = target.scrape().await;
        assert!(scraped.error.is_none());
        assert_eq!(scraped.samples, 2);
        let got = samples(&scraped.scrape);
        let a = got.iter().find(|p| p.0 == "hits_total" && p.2 == 3.0).unwrap();
        let instance = instance_of(&url);
        let expected: Vec<(String, String)> = [("exported_team", "x"), ("instance", instance.as_str()), ("job", "svc"), ("path", "/a"), ("team", "video")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(a.1, expected);
        assert_eq!(value(&got, "up"), 1.0);
        assert_eq!(value(&got, "scrape_samples_scraped"), 2.0);
        assert!(scraped.scrape.stale.is_none());

        *body.lock().unwrap() = "hits_total{path=\"/b\"} 5\n".to_owned();
        let scraped = target.scrape().await;
        let gone = stale(&scraped.scrape);
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert!(gone[0].1.contains(&("path".to_owned(), "/a".to_owned())), "{gone:?}");

        *body.lock().unwrap() = "hits_total{path=\"/b\"} 5\nhits_total{path=\"/b\"} 6\n".to_owned();
        let scraped = target.scrape().await;
        let error = scraped.error.expect("a duplicate series fails the scrape");
        assert_eq!(error.reason(), "parse");
        assert!(error.to_string().contains("line 2: duplicate series"), "{error}");
        let got = samples(&scraped.scrape);
        assert_eq!(value(&got, "up"), 0.0);
        assert!(got.iter().all(|s| s.0 != "hits_total"));
        assert!(stale(&scraped.scrape).iter().any(|s| s.0 == "hits_total"), "a failed scrape makes everything stale");
    }

    #[tokio::test]
    async fn an_unchanged_exposition_is_read_by_its_template_and_a_changed_one_in_full() {
        let exposition = |a: &str, b: &str| {
            format!(
                "# HELP rpc Latency.\n# TYPE rpc histogram\nrpc_bucket{{le=\"0.1\"}} {a}\nrpc_bucket{{le=\"+Inf\"}} {b}\nrpc_sum 3.5\nrpc_count {b}\n\
                 # TYPE temp gauge\ntemp{{room=\"a b\"}} -1.5e+01 1700000000000\n"
            )
        };
        let body = Arc::new(Mutex::new(exposition("2", "6")));
        let url = serve(body.clone()).await;
        let mut target = target(&url);
        let first = target.scrape().await;
        assert!(first.error.is_none(), "{:?}", first.error);
        assert!(target.template.is_some(), "a body that parses becomes the template");

        *body.lock().unwrap() = exposition("4", "9");
        let second = target.scrape().await;
        assert!(Arc::ptr_eq(&first.scrape.table, &second.scrape.table), "same series, same table");
        let got = samples(&second.scrape);
        let rpc: Vec<f64> = got.iter().filter(|s| s.0.starts_with("rpc")).map(|s| s.2).collect();
        assert_eq!(rpc, [4.0, 9.0, 3.5, 9.0]);
        assert_eq!(value(&got, "temp"), -15.0);
        let temp = got.iter().position(|s| s.0 == "temp").unwrap();
        assert_eq!(second.scrape.time_of(temp), 1_700_000_000_000);
        assert_eq!(second.scrape.table.families().iter().map(|f| (&*f.name, f.kind)).collect::<Vec<_>>(), [
            ("rpc", Type::Histogram),
            ("temp", Type::Gauge),
            ("up", Type::Gauge),
            ("scrape_duration_seconds", Type::Gauge),
            ("scrape_samples_scraped", Type::Gauge),
        ]);

        // A value the template reads but that does not parse: the full parse says why.
        *body.lock().unwrap() = exposition("4", "x");
        let bad = target.scrape().await;
        assert!(bad.error.as_ref().is_some_and(|e| e.to_string().contains("line 4: invalid value")), "{:?}", bad.error);

        // A new series: parsed in full, a new table, nothing stale.
        *body.lock().unwrap() = exposition("5", "10") + "temp{room=\"c\"} 20\n";
        let grown = target.scrape().await;
        assert!(grown.error.is_none());
        assert!(!Arc::ptr_eq(&first.scrape.table, &grown.scrape.table));
        assert_eq!(grown.scrape.values.len(), first.scrape.values.len() + 1);
        let temps: Vec<f64> = samples(&grown.scrape).iter().filter(|s| s.0 == "temp").map(|s| s.2).collect();
        assert_eq!(temps, [-15.0, 20.0]);
        assert!(grown.scrape.stale.is_none() || stale(&grown.scrape).is_empty());
    }

    #[test]
    fn templates_demand_every_byte_of_the_series() {
        let text = "# TYPE a counter\na_total 1\nb{x=\"1\"} 2 # {trace_id=\"ab\"} 1\n";
        let exposition = parse::parse(text, Format::OpenMetrics);
        assert!(exposition.is_err(), "no # EOF");
        let text = "# TYPE a counter\na_total 1\nb{x=\"1\"} 2\n";
        let exposition = parse::parse(text, Format::Text).unwrap();
        let target = target("http://127.0.0.1:1/metrics");
        let (table, series_of, _) = target.table(&exposition);
        let (raw, lines) = template(text, Format::Text, &exposition, &series_of).unwrap();
        let template = Template { format: Format::Text, raw, lines, table: Arc::new(table), samples: 2, over_limit: 0 };
        let read = |body: &str| template.read(body.as_bytes(), Format::Text).map(|r| r.values);
        assert_eq!(read("# TYPE a counter\na_total 7\nb{x=\"1\"} 8\n").unwrap()[..2], [7.0, 8.0]);
        assert_eq!(read("# TYPE a counter\na_total\t7\r\nb{x=\"1\"}9\n").unwrap()[..2], [7.0, 9.0]);
        for different in [
            "# TYPE a counter\na_total_x 7\nb{x=\"1\"} 8\n",
            "# TYPE a counter\na_total 7\nb{x=\"12\"} 8\n",
            "# TYPE a counter\na_total 7\nb{x=\"1\"} 8\nc 1\n",
            "# TYPE a counter\na_total 7\nb{x=\"1\"} 8",
            "# TYPE a gauge\na_total 7\nb{x=\"1\"} 8\n",
            "# TYPE a counter\na_total 7\n",
            "# TYPE a counter\na_total 7\nb{x=\"1\"} 8 # {a=\"b\"} 1\n",
        ] {
            assert!(read(different).is_none(), "{different:?}");
        }
        assert!(template.read(b"# TYPE a counter\na_total 7\nb{x=\"1\"} 8\n", Format::OpenMetrics).is_none());
    }

    /// What a reading says, comparable: every series' labels with its value (bits, so NaN
    /// equals NaN) and timestamp, and the exemplars.
    fn observed(reading: &Reading) -> (Vec<(Vec<(String, String)>, u64, i64)>, usize, Vec<(u32, String)>) {
        let series = (0..reading.table.len())
            .map(|i| {
                let labels = reading.table.labels(i).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
                let time = reading.timestamps.get(i).copied().unwrap_or(0);
                (labels, reading.values[i].to_bits(), time)
            })
            .collect();
        let exemplars = reading.exemplars.iter().map(|(i, e)| (*i, format!("{:?} {} {:?}", e.labels, e.value, e.timestamp))).collect();
        (series, reading.samples, exemplars)
    }

    /// Exposition lines a target might write, and edits a next scrape might make to them.
    fn exposition() -> impl proptest::strategy::Strategy<Value = (Vec<String>, Vec<(usize, String)>, bool)> {
        use proptest::prelude::*;
        let value = prop_oneof![
            Just("0".to_owned()),
            Just("NaN".to_owned()),
            Just("+Inf".to_owned()),
            Just("-Inf".to_owned()),
            (-1e9f64..1e9).prop_map(|v| format!("{v}")),
            (0u64..u64::MAX).prop_map(|v| format!("{v}")),
            (-1e6f64..1e6).prop_map(|v| format!("{v:e}")),
        ];
        let line = (0usize..4, "[a-c]{1,2}", "[ -~]{0,6}", value.clone(), proptest::option::of(0i64..2_000_000_000_000)).prop_map(
            |(family, label, label_value, value, ts)| -> (usize, String) {
                let escaped = label_value.replace('\\', "\\\\").replace('"', "\\\"");
                let ts = ts.map(|t| format!(" {t}")).unwrap_or_default();
                let line = match family {
                    0 => format!("requests_total{{path=\"{escaped}\",{label}=\"x\"}} {value}{ts}"),
                    1 => format!("temperature{{room=\"{label}\"}} {value}"),
                    2 => format!("latency_bucket{{le=\"{label}\"}} {value}"),
                    _ => format!("up_{label} {value}"),
                };
                (family, line)
            },
        );
        // A family's samples together, each series once: an exposition that parses.
        let lines = proptest::collection::vec(line, 0..30).prop_map(|mut lines| {
            lines.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            let mut seen = std::collections::HashSet::new();
            let mut kept = Vec::new();
            for (_, line) in lines {
                // The series: through the closing brace (values and timestamps hold none), or
                // the name alone.
                let series = match line.rfind('}') {
                    Some(end) => line[..=end].to_owned(),
                    None => line.split(' ').next().unwrap_or("").to_owned(),
                };
                if seen.insert(series) {
                    kept.push(line);
                }
            }
            kept
        });
        // An edit: (line, replacement); the replacement is a new value, a touched series, or noise.
        let edit = (0usize..40, prop_oneof![
            value.prop_map(|v| format!("=value {v}")),
            "[ -~]{0,12}".prop_map(|t| format!("=line {t}")),
            Just("=drop".to_owned()),
            Just("=crlf".to_owned()),
            Just("=tab".to_owned()),
        ]);
        (lines, proptest::collection::vec(edit, 0..4), proptest::bool::ANY)
    }

    fn apply_edits(lines: &[String], edits: &[(usize, String)]) -> String {
        let mut lines: Vec<String> = lines.to_vec();
        for (at, edit) in edits {
            if lines.is_empty() {
                break;
            }
            let at = at % lines.len();
            if let Some(v) = edit.strip_prefix("=value ") {
                let series_end = lines[at].rfind('}').map_or_else(|| lines[at].find(' ').unwrap_or(0), |i| i + 1);
                lines[at] = format!("{} {v}", &lines[at][..series_end]);
            } else if let Some(t) = edit.strip_prefix("=line ") {
                lines[at] = t.to_owned();
            } else if edit == "=drop" {
                lines.remove(at);
            } else if edit == "=crlf" {
                lines[at].push('\r');
            } else {
                lines[at] = lines[at].replacen(' ', "\t", 1);
            }
        }
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]
        /// The fast read of an unchanged exposition must say exactly what the full parse says,
        /// whatever the next scrape changed, or step aside for it.
        #[test]
        fn a_template_read_agrees_with_the_full_parse_or_steps_aside((lines, edits, openmetrics) in exposition()) {
            let format = if openmetrics { Format::OpenMetrics } else { Format::Text };
            let eof = if openmetrics { "# EOF\n" } else { "" };
            let first = apply_edits(&lines, &[]) + eof;
            let second = apply_edits(&lines, &edits) + eof;
            let mut reused = target("http://127.0.0.1:1/metrics");
            if let Err(e) = reused.read(first.as_bytes(), format) {
                proptest::prop_assert!(false, "the generated exposition does not parse ({e}): {first:?}");
            }
            let mut fresh = target("http://127.0.0.1:1/metrics");
            let by_template = reused.template.as_ref().and_then(|t| t.read(second.as_bytes(), format));
            let in_full = fresh.read(second.as_bytes(), format);
            match (by_template, in_full) {
                (Some(fast), Ok(full)) => proptest::prop_assert_eq!(observed(&fast), observed(&full), "{:?}", second),
                (Some(_), Err(e)) => proptest::prop_assert!(false, "the template read a body the parser refuses ({e}): {second:?}"),
                (None, _) => {}
            }
        }

        /// Whatever a target sends, a scrape ends with a reading or an error.
        #[test]
        fn any_body_is_read_or_refused(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300), openmetrics in proptest::bool::ANY) {
            let format = if openmetrics { Format::OpenMetrics } else { Format::Text };
            let mut t = target("http://127.0.0.1:1/metrics");
            let _ = t.read(&body, format);
            let _ = t.read(&body, format);
        }
    }

    #[test]
    fn instances_are_host_and_port() {
        assert_eq!(instance_of("http://127.0.0.1:9100/metrics"), "127.0.0.1:9100");
        assert_eq!(instance_of("https://node.local/metrics"), "node.local:443");
    }
}
