//! The agent's `/metrics` (Prometheus or OpenMetrics text) parsed into samples that tests
//! query by name and labels.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    text: String,
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text exposition formats. Comment lines (`# HELP`, `# TYPE`, `# EOF`) are
    /// skipped; a sample line that cannot be parsed fails the test, quoting the line.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).unwrap_or_else(|e| panic!("unparsable metrics line {line:?}: {e}")))
            .collect();
        Metrics { text: text.to_owned(), samples }
    }

    /// Scrapes `url` as Prometheus would (text format) and parses the answer; any status
    /// but 200 fails the test.
    pub async fn scrape(url: &str) -> Metrics {
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder().build().expect("cannot build an HTTP client");
        let response = client.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status, reqwest::StatusCode::OK, "GET {url} answered {status}: {body}");
        Metrics::parse(&body)
    }

    /// The exposition as received, for failure messages.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The samples of `name` whose labels include every pair of `labels`.
    pub fn series<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name && labels.iter().all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching series, or `None` when there is none.
    pub fn lookup(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matching = self.series(name, labels).peekable();
        matching.peek()?;
        Some(matching.map(|sample| sample.value).sum())
    }

    /// The sum of the matching series; 0 when there is none (a counter never incremented).
    pub fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.lookup(name, labels).unwrap_or(0.0)
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices();
        let mut key = String::new();
        loop {
            let Some((i, c)) = chars.next() else { return Err("unterminated label set".into()) };
            match c {
                '}' => {
                    rest = &after_brace[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err("label value without quotes".into());
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().map(|(_, c)| c) {
                            Some('"') => break,
                            Some('\\') => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(other) => value.push(other),
                                None => return Err("dangling escape".into()),
                            },
                            Some(other) => value.push(other),
                            None => return Err("unterminated label value".into()),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().map_err(|e| format!("bad value {other:?}: {e}"))?,
    };
    Ok(Sample { name, labels, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_summed_over_matching_series() {
        let metrics = Metrics::parse(
            "# TYPE periscope_dropped_items counter\n\
             periscope_dropped_items_total{component=\"jaeger\",signal=\"traces\",reason=\"permanent\"} 3\n\
             periscope_dropped_items_total{component=\"jaeger\",signal=\"traces\",reason=\"shutdown\"} 4 1700000000\n\
             periscope_build_info{version=\"0.1.0\"} 1\n\
             odd{msg=\"a \\\"quoted\\\", value\"} 2.5\n\
             # EOF\n",
        );
        assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("component", "jaeger")]), 7.0);
        assert_eq!(metrics.metric_value("periscope_dropped_items_total", &[("reason", "permanent")]), 3.0);
        assert_eq!(metrics.lookup("periscope_dropped_items_total", &[("reason", "other")]), None);
        assert_eq!(metrics.lookup("odd", &[("msg", "a \"quoted\", value")]), Some(2.5));
        assert_eq!(metrics.lookup("periscope_build_info", &[]), Some(1.0));
    }
}
