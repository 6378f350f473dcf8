//! A parser for the Prometheus text exposition format (0.0.4) and OpenMetrics 1.0 text.
//!
//! It borrows from the scraped body (label values are copied only when they hold escapes),
//! keeps every sample's labels in one shared vector, and checks what Prometheus checks: each
//! line's syntax, sample names against their family's type, and duplicate series. Any error
//! fails the whole scrape with the line number and what is wrong, as Prometheus does.

use ahash::RandomState;
use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};
use std::ops::Range;

/// Which text format a body is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`
    Text,
    /// `application/openmetrics-text; version=1.0.0`
    OpenMetrics,
}

/// A family's declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    Unknown,
}

impl Kind {
    fn parse(text: &str) -> Option<Kind> {
        Some(match text {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "gaugehistogram" => Kind::GaugeHistogram,
            "summary" => Kind::Summary,
            "info" => Kind::Info,
            "stateset" => Kind::StateSet,
            "untyped" | "unknown" => Kind::Unknown,
            _ => return None,
        })
    }

    /// The suffixes a sample of this family may add to the family name.
    fn suffixes(self, format: Format) -> &'static [&'static str] {
        match (self, format) {
            (Kind::Counter, Format::OpenMetrics) => &["_total", "_created"],
            (Kind::Counter, Format::Text) => &["", "_total"],
            (Kind::Histogram, _) => &["_bucket", "_sum", "_count", "_created"],
            (Kind::GaugeHistogram, _) => &["_bucket", "_gsum", "_gcount"],
            (Kind::Summary, _) => &["", "_sum", "_count", "_created"],
            (Kind::Info, _) => &["_info"],
            (Kind::Gauge | Kind::StateSet | Kind::Unknown, _) => &[""],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family<'a> {
    pub name: &'a str,
    pub kind: Kind,
    pub help: Option<Cow<'a, str>>,
    pub unit: Option<&'a str>,
    /// This family's samples, as a range of [`Exposition::samples`].
    pub samples: Range<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Label<'a> {
    pub name: &'a str,
    pub value: Cow<'a, str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar<'a> {
    pub labels: Vec<Label<'a>>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// Bytes of the line up to the end of the series (the name, and the labels' closing
    /// brace): a later line that starts with the same bytes is the same series.
    pub key_len: usize,
    /// This sample's labels, as a range of [`Exposition::labels`].
    pub labels: Range<usize>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
    pub exemplar: Option<Box<Exemplar<'a>>>,
}

/// A parsed scrape.
#[derive(Debug, Default)]
pub struct Exposition<'a> {
    pub families: Vec<Family<'a>>,
    pub samples: Vec<Sample<'a>>,
    pub labels: Vec<Label<'a>>,
}

impl<'a> Exposition<'a> {
    pub fn labels_of(&self, sample: &Sample<'a>) -> &[Label<'a>] {
        &self.labels[sample.labels.clone()]
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError { line, message: message.into() })
}

/// Parses a whole body.
pub fn parse(body: &str, format: Format) -> Result<Exposition<'_>, ParseError> {
    let mut out = Exposition::default();
    // At most one sample per line, and at most one label per '=': sized once, in one pass,
    // rather than grown (and copied) as the body is read.
    let (lines, equals) = body.bytes().fold((0usize, 0usize), |(lines, equals), b| (lines + usize::from(b == b'\n'), equals + usize::from(b == b'=')));
    out.samples.reserve(lines + 1);
    out.labels.reserve(equals);
    let hasher = RandomState::with_seeds(1, 2, 3, 4);
    let mut seen: HashSet<u64, ahash::RandomState> = HashSet::with_capacity_and_hasher(lines + 1, RandomState::new());
    let mut seen_families: HashSet<&str> = HashSet::new();
    let mut current: Option<Family<'_>> = None;
    let mut eof = false;
    // The index of the last piece of the body split at newlines (empty when it ends in one).
    let last = lines;

    for (index, raw) in body.split('\n').enumerate() {
        let number = index + 1;
        let line = if format == Format::Text { raw.trim_end_matches('\r') } else { raw };
        if eof {
            if line.is_empty() && index == last {
                continue;
            }
            return err(number, "content after # EOF");
        }
        if line.is_empty() {
            if format == Format::OpenMetrics && index != last {
                return err(number, "empty lines are not allowed in OpenMetrics");
            }
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if format == Format::OpenMetrics && comment == " EOF" {
                eof = true;
                continue;
            }
            let comment = comment.trim_start();
            let (keyword, rest) = comment.split_once(' ').unwrap_or((comment, ""));
            match keyword {
                "HELP" | "TYPE" | "UNIT" => {
                    let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                    if !valid_metric_name(name) {
                        return err(number, format!("invalid metric name {name:?} in # {keyword}"));
                    }
                    let same = current.as_ref().is_some_and(|f| f.name == name);
                    if !same {
                        if let Some(done) = current.take() {
                            out.families.push(done);
                        }
                        if !seen_families.insert(name) {
                            return err(number, format!("metadata for {name} after its samples or a second time"));
                        }
                        current = Some(Family {
                            name,
                            kind: Kind::Unknown,
                            help: None,
                            unit: None,
                            samples: out.samples.len()..out.samples.len(),
                        });
                    }
                    let Some(family) = current.as_mut() else { continue };
                    match keyword {
                        "HELP" => {
                            if family.help.is_some() {
                                return err(number, format!("second # HELP for {name}"));
                            }
                            family.help = Some(unescape(value, false));
                        }
                        "TYPE" => {
                            if family.samples.start != out.samples.len() {
                                return err(number, format!("# TYPE for {name} after its samples"));
                            }
                            family.kind = match Kind::parse(value.trim()) {
                                Some(kind) => kind,
                                None => return err(number, format!("unknown type {:?} for {name}", value.trim())),
                            };
                        }
                        _ => family.unit = Some(value.trim()),
                    }
                }
                _ if format == Format::OpenMetrics => return err(number, "unknown comment in OpenMetrics"),
                _ => {}
            }
            continue;
        }

        let sample = parse_sample(line, number, format, &mut out.labels)?;
        // Which family does it belong to?
        let belongs = current.as_ref().is_some_and(|f| {
            sample.name.strip_prefix(f.name).is_some_and(|suffix| f.kind.suffixes(format).contains(&suffix))
        });
        if !belongs {
            if let Some(family) = current.as_ref() {
                if sample.name.starts_with(family.name) && family.kind != Kind::Unknown && sample.name != family.name {
                    return err(number, format!("sample {} does not fit the {:?} family {}", sample.name, family.kind, family.name));
                }
            }
            if let Some(done) = current.take() {
                out.families.push(done);
            }
            if !seen_families.insert(sample.name) {
                return err(number, format!("samples of {} are not together", sample.name));
            }
            current = Some(Family {
                name: sample.name,
                kind: Kind::Unknown,
                help: None,
                unit: None,
                samples: out.samples.len()..out.samples.len(),
            });
        }
        let mut h = hasher.build_hasher();
        sample.name.hash(&mut h);
        for label in &out.labels[sample.labels.clone()] {
            label.name.hash(&mut h);
            label.value.hash(&mut h);
        }
        if !seen.insert(h.finish()) {
            return err(number, format!("duplicate series {}", describe(&sample, &out.labels)));
        }
        out.samples.push(sample);
        if let Some(family) = current.as_mut() {
            family.samples.end = out.samples.len();
        }
    }
    if format == Format::OpenMetrics && !eof {
        return err(last + 1, "missing # EOF");
    }
    if let Some(done) = current.take() {
        out.families.push(done);
    }
    Ok(out)
}

fn describe(sample: &Sample<'_>, labels: &[Label<'_>]) -> String {
    let labels: Vec<String> = labels[sample.labels.clone()].iter().map(|l| format!("{}={:?}", l.name, l.value)).collect();
    format!("{}{{{}}}", sample.name, labels.join(","))
}

fn parse_sample<'a>(line: &'a str, number: usize, format: Format, labels: &mut Vec<Label<'a>>) -> Result<Sample<'a>, ParseError> {
    let bytes = line.as_bytes();
    let name_end = bytes.iter().position(|&b| b == b'{' || b == b' ' || b == b'\t').unwrap_or(bytes.len());
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return err(number, format!("invalid metric name {name:?}"));
    }
    let first_label = labels.len();
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        rest = parse_labels(&rest[1..], number, labels)?;
    }
    let label_range = first_label..labels.len();
    // Duplicate label names make a series ambiguous.
    let set = &labels[label_range.clone()];
    for (i, a) in set.iter().enumerate() {
        if set[i + 1..].iter().any(|b| b.name == a.name) {
            return err(number, format!("label {} appears twice", a.name));
        }
    }
    let key_len = line.len() - rest.len();
    let (value, timestamp_ms, exemplar) = parse_tail(rest, number, format)?;
    Ok(Sample { name, key_len, labels: label_range, value, timestamp_ms, exemplar })
}

/// What follows a sample's series on its line: the value, the timestamp if any, and the
/// exemplar if any.
pub(crate) fn parse_tail<'a>(
    rest: &'a str,
    number: usize,
    format: Format,
) -> Result<(f64, Option<i64>, Option<Box<Exemplar<'a>>>), ParseError> {
    let rest = rest.trim_start_matches([' ', '\t']);
    let (value_text, rest) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
    let value = parse_value_bytes(value_text.as_bytes()).ok_or_else(|| ParseError { line: number, message: format!("invalid value {value_text:?}") })?;
    let rest = rest.trim_start_matches([' ', '\t']);
    if rest.is_empty() {
        return Ok((value, None, None));
    }
    // An exemplar follows " # "; a byte search for '#' avoids building a substring searcher
    // for every sample.
    let exemplar_at = rest.find('#').filter(|&i| i > 0 && rest.as_bytes()[i - 1] == b' ' && rest.as_bytes().get(i + 1) == Some(&b' '));
    let (timestamp_text, rest) = match exemplar_at.map(|i| (&rest[..i - 1], &rest[i + 2..])) {
        Some((ts, exemplar)) => (ts.trim(), Some(exemplar)),
        None if rest.starts_with("# ") => ("", Some(&rest[2..])),
        None => (rest.trim(), None),
    };
    let timestamp_ms = if timestamp_text.is_empty() {
        None
    } else {
        Some(parse_timestamp(timestamp_text, format).ok_or_else(|| ParseError {
            line: number,
            message: format!("invalid timestamp {timestamp_text:?}"),
        })?)
    };
    let exemplar = match rest {
        Some(text) if format == Format::OpenMetrics => Some(Box::new(parse_exemplar(text, number)?)),
        Some(_) => return err(number, "exemplars are only allowed in OpenMetrics"),
        None => None,
    };
    Ok((value, timestamp_ms, exemplar))
}

/// Parses `name="value",...}` and returns what follows the closing brace.
fn parse_labels<'a>(mut rest: &'a str, number: usize, labels: &mut Vec<Label<'a>>) -> Result<&'a str, ParseError> {
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or_else(|| ParseError { line: number, message: "label without =".into() })?;
        let name = rest[..eq].trim_end();
        if !valid_label_name(name) {
            return err(number, format!("invalid label name {name:?}"));
        }
        rest = rest[eq + 1..].trim_start();
        let Some(quoted) = rest.strip_prefix('"') else { return err(number, format!("value of label {name} is not quoted")) };
        let bytes = quoted.as_bytes();
        let mut i = 0;
        let mut escaped = false;
        loop {
            match bytes.get(i) {
                None => return err(number, format!("unterminated value of label {name}")),
                Some(b'\\') => {
                    escaped = true;
                    i += 2;
                }
                Some(b'"') => break,
                Some(_) => i += 1,
            }
        }
        let raw = quoted.get(..i).ok_or_else(|| ParseError { line: number, message: "bad escape".into() })?;
        let value = if escaped { unescape(raw, true) } else { Cow::Borrowed(raw) };
        labels.push(Label { name, value });
        rest = quoted[i + 1..].trim_start_matches([' ', '\t']);
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return err(number, "expected , or } after a label");
        }
    }
}

fn parse_exemplar<'a>(text: &'a str, number: usize) -> Result<Exemplar<'a>, ParseError> {
    let text = text.trim();
    let Some(after) = text.strip_prefix('{') else { return err(number, "an exemplar starts with {") };
    let mut labels = Vec::new();
    let rest = parse_labels(after, number, &mut labels)?;
    let length: usize = labels.iter().map(|l| l.name.chars().count() + l.value.chars().count()).sum();
    if length > 128 {
        return err(number, "exemplar labels longer than 128 characters");
    }
    let mut parts = rest.split_whitespace();
    let value_text = parts.next().unwrap_or("");
    let value = parse_value(value_text).ok_or_else(|| ParseError { line: number, message: format!("invalid exemplar value {value_text:?}") })?;
    let timestamp_ms = match parts.next() {
        Some(ts) => Some(parse_timestamp(ts, Format::OpenMetrics).ok_or_else(|| ParseError {
            line: number,
            message: format!("invalid exemplar timestamp {ts:?}"),
        })?),
        None => None,
    };
    Ok(Exemplar { labels, value, timestamp_ms })
}

/// Powers of ten a double holds exactly.
const EXACT_POWERS: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// A sample value as bytes. Decimal numbers of up to 15 significant digits and a small
/// exponent — what client libraries write (`12`, `0.25`, `1.234567e+06`) — take Clinger's
/// fast path: the digits and the power of ten are both exact as doubles, so one
/// multiplication or division rounds correctly. Anything else goes to [`parse_value`].
#[inline]
pub(crate) fn parse_value_bytes(b: &[u8]) -> Option<f64> {
    match number_prefix(b) {
        Some((value, length)) if length == b.len() => Some(value),
        _ => parse_value(std::str::from_utf8(b).ok()?),
    }
}

/// The number at the start of `b` and its length, when it takes the fast path of
/// [`parse_value_bytes`]; `None` for anything else (which may still be a valid value).
#[inline]
pub(crate) fn number_prefix(b: &[u8]) -> Option<(f64, usize)> {
    let (negative, mut rest) = match b {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, b),
    };
    // Digits beyond 15 may wrap the mantissa: such values are not taken.
    let mut mantissa: u64 = 0;
    let mut digits: i32 = 0;
    while let [d @ b'0'..=b'9', tail @ ..] = rest {
        mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
        digits += 1;
        rest = tail;
    }
    let mut exponent: i32 = 0;
    if let [b'.', tail @ ..] = rest {
        rest = tail;
        while let [d @ b'0'..=b'9', tail @ ..] = rest {
            mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
            digits += 1;
            exponent -= 1;
            rest = tail;
        }
    }
    if let [b'e' | b'E', tail @ ..] = rest {
        let (negative_exponent, mut tail) = match tail {
            [b'-', t @ ..] => (true, t),
            [b'+', t @ ..] => (false, t),
            _ => (false, tail),
        };
        let mut e: i32 = 0;
        let mut exponent_digits = 0;
        while let [d @ b'0'..=b'9', t @ ..] = tail {
            e = (e * 10 + i32::from(d - b'0')).min(10_000);
            exponent_digits += 1;
            tail = t;
        }
        if exponent_digits == 0 {
            return None;
        }
        exponent += if negative_exponent { -e } else { e };
        rest = tail;
    }
    if !(1..=15).contains(&digits) || !(-22..=22).contains(&exponent) {
        return None;
    }
    let magnitude = mantissa as f64;
    let value = if exponent >= 0 { magnitude * EXACT_POWERS[exponent as usize] } else { magnitude / EXACT_POWERS[(-exponent) as usize] };
    Some((if negative { -value } else { value }, b.len() - rest.len()))
}

pub(crate) fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// Text format: integer milliseconds. OpenMetrics: seconds, possibly fractional.
fn parse_timestamp(text: &str, format: Format) -> Option<i64> {
    match format {
        Format::Text => text.parse().ok(),
        Format::OpenMetrics => {
            let seconds: f64 = text.parse().ok()?;
            seconds.is_finite().then(|| (seconds * 1000.0).round() as i64)
        }
    }
}

fn unescape(text: &str, quotes: bool) -> Cow<'_, str> {
    if !text.contains('\\') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('\\') => out.push('\\'),
            Some('"') if quotes => out.push('"'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

pub fn valid_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_' | b':'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

pub fn valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'A'..=b'Z' | b'_')) && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels<'a>(e: &'a Exposition<'a>, i: usize) -> Vec<(&'a str, &'a str)> {
        e.labels_of(&e.samples[i]).iter().map(|l| (l.name, l.value.as_ref())).collect()
    }

    #[test]
    fn text_format_families_samples_and_escapes() {
        let body = "# HELP http_requests_total Requests.\\nAll of them.\n# TYPE http_requests_total counter\n\
                    http_requests_total{method=\"post\",path=\"/a \\\"b\\\"\\\\\"} 1027 1395066363000\n\
                    http_requests_total{method=\"get\"} 3\n\
                    # TYPE rpc histogram\nrpc_bucket{le=\"0.1\"} 1\nrpc_bucket{le=\"+Inf\"} 2\nrpc_sum 0.3\nrpc_count 2\n\
                    untyped_thing NaN\n";
        let e = parse(body, Format::Text).unwrap();
        assert_eq!(e.families.len(), 3);
        assert_eq!(e.families[0].help.as_deref(), Some("Requests.\nAll of them."));
        assert_eq!(e.families[0].kind, Kind::Counter);
        assert_eq!(e.families[0].samples, 0..2);
        assert_eq!(labels(&e, 0), [("method", "post"), ("path", "/a \"b\"\\")]);
        assert_eq!(e.samples[0].timestamp_ms, Some(1395066363000));
        assert_eq!(e.families[1].kind, Kind::Histogram);
        assert_eq!(e.families[1].samples, 2..6);
        assert_eq!(e.samples[3].value, 2.0);
        assert!(e.samples[6].value.is_nan());
        assert_eq!(e.families[2].name, "untyped_thing");
    }

    #[test]
    fn openmetrics_exemplars_units_and_eof() {
        let body = "# TYPE latency_seconds histogram\n# UNIT latency_seconds seconds\n\
                    latency_seconds_bucket{le=\"1.0\"} 3 # {trace_id=\"abc\"} 0.5 1700000000.123\n\
                    latency_seconds_bucket{le=\"+Inf\"} 4\nlatency_seconds_sum 2.5\nlatency_seconds_count 4\n\
                    # TYPE jobs counter\njobs_total 7 1700000000.5\n# EOF\n";
        let e = parse(body, Format::OpenMetrics).unwrap();
        assert_eq!(e.families[0].unit, Some("seconds"));
        let exemplar = e.samples[0].exemplar.as_ref().unwrap();
        assert_eq!(exemplar.labels[0].value, "abc");
        assert_eq!(exemplar.timestamp_ms, Some(1_700_000_000_123));
        assert_eq!(e.samples[4].timestamp_ms, Some(1_700_000_000_500));
        assert_eq!(parse("a 1\n", Format::OpenMetrics).unwrap_err().message, "missing # EOF");
    }

    #[test]
    fn broken_expositions_are_refused_with_the_line() {
        let cases = [
            ("a{b=\"1\"} 1\na{b=\"1\"} 2\n", 2, "duplicate series a{b=\"1\"}"),
            ("a 1\nb 1\na 2\n", 3, "samples of a are not together"),
            ("a{b=1} 1\n", 1, "value of label b is not quoted"),
            ("a{b=\"1\" 1\n", 1, "expected , or } after a label"),
            ("a one\n", 1, "invalid value \"one\""),
            ("# TYPE a gauge\na_total 1\n", 2, "sample a_total does not fit the Gauge family a"),
            ("# TYPE a bogus\n", 1, "unknown type \"bogus\" for a"),
            ("0a 1\n", 1, "invalid metric name \"0a\""),
            ("a{b=\"1\",b=\"2\"} 1\n", 1, "label b appears twice"),
        ];
        for (body, line, message) in cases {
            let e = parse(body, Format::Text).unwrap_err();
            assert_eq!((e.line, e.message.as_str()), (line, message), "{body:?}");
        }
    }

    /// Pieces of the exposition grammar, so that random bodies reach deep into the parser.
    fn token_soup() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let token = prop_oneof![
            Just("a"), Just("a_total"), Just("a_bucket"), Just("a_sum"), Just("a_count"), Just("a_created"), Just("{"),
            Just("}"), Just("="), Just("\""), Just("\\"), Just(","), Just(" "), Just("\t"), Just("\n"), Just("\r"),
            Just("# TYPE a counter\n"), Just("# TYPE a histogram\n"), Just("# TYPE a summary\n"), Just("# HELP a x\\n\n"),
            Just("# UNIT a s\n"), Just("# EOF"), Just("#"), Just("le"), Just("quantile"), Just("1"), Just("-1.5e3"),
            Just("NaN"), Just("+Inf"), Just("1e400"), Just("123456789012345678901234567890"), Just("é"), Just(" # {t=\"1\"} 2 3"),
        ];
        proptest::collection::vec(token, 0..80).prop_map(|t| t.concat())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Whatever a target sends, the parser gives a parse or an error with a line in the
        /// body, never a panic.
        #[test]
        fn any_body_parses_or_is_refused_with_its_line(body in token_soup(), openmetrics in proptest::bool::ANY) {
            let format = if openmetrics { Format::OpenMetrics } else { Format::Text };
            match parse(&body, format) {
                Ok(e) => {
                    // Every sample is in exactly one family, in order.
                    let covered: usize = e.families.iter().map(|f| f.samples.len()).sum();
                    proptest::prop_assert_eq!(covered, e.samples.len());
                }
                Err(error) => proptest::prop_assert!(error.line >= 1 && error.line <= body.split('\n').count() + 1, "{error} in {body:?}"),
            }
        }

        #[test]
        fn any_value_text_is_read_like_the_standard_parser(text in "[-+]?[0-9]{0,20}(\\.[0-9]{0,20})?([eE][-+]?[0-9]{0,4})?") {
            let fast = parse_value_bytes(text.as_bytes());
            let standard = parse_value(&text);
            let same = match (fast, standard) {
                (Some(a), Some(b)) => a.to_bits() == b.to_bits(),
                (None, None) => true,
                _ => false,
            };
            proptest::prop_assert!(same, "{text:?}: fast {fast:?}, standard {standard:?}");
        }
    }

    #[test]
    fn the_fast_value_path_agrees_with_the_standard_parser() {
        let mut cases: Vec<String> = [
            "0", "-0", "+5", "12", "0.25", "1.234567e+06", "1.234567E-06", "123456789012345", "1234567890123456",
            "12345678901234567890", "0.1", "0.3", "9007199254740993", "1e22", "1e23", "1e-22", "1e-23", "4.9e-324",
            "1.7976931348623157e308", "-2.5e-3", "3.", ".5", "1e", "1e+", "-", "", "e5", "1.2.3", "NaN", "+Inf", "-Inf",
            "0x10", "1_000", "00012.500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if v.is_finite() {
                cases.push(format!("{v}"));
                cases.push(format!("{v:e}"));
            }
            let small = (x % 1_000_000_007) as f64 / 1000.0;
            cases.push(format!("{small}"));
            cases.push(format!("{:.6e}", small));
        }
        for case in cases {
            let fast = parse_value_bytes(case.as_bytes());
            let standard = parse_value(&case);
            let same = match (fast, standard) {
                (Some(a), Some(b)) => a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                (None, None) => true,
                _ => false,
            };
            assert!(same, "{case:?}: fast {fast:?}, standard {standard:?}");
        }
    }
}
