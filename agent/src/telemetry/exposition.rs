//! Writing metrics in the Prometheus text exposition format (0.0.4), for the metrics Periscope
//! derives from what it collects (span metrics, service graph, execution paths).
//!
//! Anything that holds such metrics implements [`Collect`]; the Prometheus exporter asks each
//! one to write itself on every scrape.

use std::fmt::Write;

/// A source of metric families for the Prometheus exporter.
pub trait Collect: Send + Sync {
    fn collect(&self, out: &mut Exposition);
}

/// The text being built for one scrape, in the text format 0.0.4 or OpenMetrics 1.0.
#[derive(Default)]
pub struct Exposition {
    text: String,
    openmetrics: bool,
}

/// An exemplar to write after a sample (OpenMetrics only).
#[derive(Debug, Clone, PartialEq)]
pub struct ExemplarText {
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Unix seconds.
    pub timestamp: Option<f64>,
}

/// The type line of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Exposition {
    pub fn new() -> Self {
        Exposition { text: String::with_capacity(64 * 1024), openmetrics: false }
    }

    /// An exposition in OpenMetrics 1.0: counter families named without `_total`, exemplars,
    /// `# EOF` at the end.
    pub fn openmetrics() -> Self {
        Exposition { text: String::with_capacity(64 * 1024), openmetrics: true }
    }

    pub fn is_openmetrics(&self) -> bool {
        self.openmetrics
    }

    pub fn into_text(mut self) -> String {
        if self.openmetrics {
            self.text.push_str("# EOF\n");
        }
        self.text
    }

    /// Appends what another exposition holds.
    pub fn append(&mut self, other: Exposition) {
        self.text.push_str(&other.text);
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Type) {
        let name = match kind {
            Type::Counter if self.openmetrics => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let kind = match kind {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
            Type::Histogram => "histogram",
            Type::Summary => "summary",
        };
        self.text.push_str("# HELP ");
        self.text.push_str(name);
        self.text.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.text.push_str("\\\\"),
                '\n' => self.text.push_str("\\n"),
                c => self.text.push(c),
            }
        }
        self.text.push('\n');
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One histogram bucket line: `name{labels,le="bound"} value`.
    pub fn sample_le(&mut self, name: &str, labels: &[(&str, &str)], le: f64, value: f64) {
        self.sample_with(name, labels, Some(le), value);
    }

    /// A sample (or bucket, with `le`) followed by an exemplar when writing OpenMetrics.
    pub fn sample_exemplar(&mut self, name: &str, labels: &[(&str, &str)], le: Option<f64>, value: f64, exemplar: Option<&ExemplarText>) {
        self.sample_with(name, labels, le, value);
        let Some(exemplar) = exemplar.filter(|_| self.openmetrics) else { return };
        // Replace the newline just written with the exemplar.
        self.text.pop();
        self.text.push_str(" # {");
        for (i, (key, value)) in exemplar.labels.iter().enumerate() {
            if i > 0 {
                self.text.push(',');
            }
            self.text.push_str(key);
            self.text.push_str("=\"");
            escape_label_value(&mut self.text, value);
            self.text.push('"');
        }
        self.text.push_str("} ");
        write_value(&mut self.text, exemplar.value);
        if let Some(ts) = exemplar.timestamp {
            let _ = write!(self.text, " {ts:.3}");
        }
        self.text.push('\n');
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.sample_with(name, labels, None, value);
    }

    fn sample_with(&mut self, name: &str, labels: &[(&str, &str)], le: Option<f64>, value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() || le.is_some() {
            self.text.push('{');
            let mut first = true;
            for (key, value) in labels {
                if !first {
                    self.text.push(',');
                }
                first = false;
                self.text.push_str(key);
                self.text.push_str("=\"");
                escape_label_value(&mut self.text, value);
                self.text.push('"');
            }
            if let Some(le) = le {
                if !first {
                    self.text.push(',');
                }
                self.text.push_str("le=\"");
                write_value(&mut self.text, le);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        write_value(&mut self.text, value);
        self.text.push('\n');
    }

    /// The `_bucket`, `_sum` and `_count` lines of one histogram series.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut bucket = String::with_capacity(name.len() + 7);
        bucket.push_str(name);
        bucket.push_str("_bucket");
        let mut cumulative = 0;
        for (bound, count) in histogram.bounds.iter().zip(histogram.counts.iter()) {
            cumulative += count;
            self.sample_with(&bucket, labels, Some(*bound), cumulative as f64);
        }
        self.sample_with(&bucket, labels, Some(f64::INFINITY), histogram.count as f64);
        self.sample(&format!("{name}_sum"), labels, histogram.sum);
        self.sample(&format!("{name}_count"), labels, histogram.count as f64);
    }
}

fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_value(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{value}");
    }
}

/// A histogram with fixed upper bounds, as Prometheus' classic histograms have.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; observations above the last bound are only in `count`.
    counts: Box<[u64]>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()].into_boxed_slice(), sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, value: f64) {
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        if let Some(count) = self.counts.get_mut(bucket) {
            *count += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_an_infinite_bucket() {
        static BOUNDS: [f64; 3] = [0.1, 1.0, 10.0];
        let mut h = Histogram::new(&BOUNDS);
        for v in [0.05, 0.1, 0.5, 20.0] {
            h.observe(v);
        }
        let mut out = Exposition::new();
        out.family("x_seconds", "How long.", Type::Histogram);
        out.histogram("x_seconds", &[("step", "a > b")], &h);
        let text = out.into_text();
        assert_eq!(
            text,
            "# HELP x_seconds How long.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{step=\"a > b\",le=\"0.1\"} 2\n\
             x_seconds_bucket{step=\"a > b\",le=\"1\"} 3\n\
             x_seconds_bucket{step=\"a > b\",le=\"10\"} 3\n\
             x_seconds_bucket{step=\"a > b\",le=\"+Inf\"} 4\n\
             x_seconds_sum{step=\"a > b\"} 20.65\n\
             x_seconds_count{step=\"a > b\"} 4\n"
        );
    }

    #[test]
    fn openmetrics_names_counter_families_without_total_and_ends_with_eof() {
        let mut out = Exposition::openmetrics();
        out.family("jobs_total", "Jobs.", Type::Counter);
        let exemplar = ExemplarText { labels: vec![("trace_id".into(), "abc".into())], value: 1.0, timestamp: Some(1.5) };
        out.sample_exemplar("jobs_total", &[], None, 3.0, Some(&exemplar));
        assert_eq!(
            out.into_text(),
            "# HELP jobs Jobs.\n# TYPE jobs counter\njobs_total 3 # {trace_id=\"abc\"} 1 1.500\n# EOF\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::new();
        out.sample("y_total", &[("handler", "say \"hi\"\\\n")], 1.0);
        assert_eq!(out.into_text(), "y_total{handler=\"say \\\"hi\\\"\\\\\\n\"} 1\n");
    }
}
