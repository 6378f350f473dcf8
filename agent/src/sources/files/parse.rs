//! What a log line says: the container runtime's envelope (CRI, Docker's json-file) and, inside
//! it, the message's own structure (JSON, logfmt or plain text), from which the time, level,
//! trace id and span id are taken.

use crate::config::LogFormatKind;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A line with its envelope removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwrapped {
    pub message: String,
    /// Unix nanoseconds, when the envelope carries a time.
    pub time: Option<u64>,
    /// `stdout` or `stderr`, from CRI and Docker envelopes.
    pub stream: Option<&'static str>,
    /// The runtime split an over-long line: the message continues on the next line.
    pub partial: bool,
}

/// What the message itself says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    pub time: Option<u64>,
    pub level: Option<String>,
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<[u8; 8]>,
}

/// Removes the envelope of `format` (for `auto`, whichever the line has).
pub fn unwrap(format: LogFormatKind, line: &str) -> Unwrapped {
    let plain = || Unwrapped { message: line.to_owned(), time: None, stream: None, partial: false };
    match format {
        LogFormatKind::Cri => cri(line).unwrap_or_else(plain),
        LogFormatKind::Docker => docker(line).unwrap_or_else(plain),
        LogFormatKind::Auto => cri(line).or_else(|| docker(line)).unwrap_or_else(plain),
        LogFormatKind::Json | LogFormatKind::Logfmt | LogFormatKind::Plain => plain(),
    }
}

/// `<RFC3339Nano> <stdout|stderr> <P|F> <message>`
fn cri(line: &str) -> Option<Unwrapped> {
    let mut parts = line.splitn(4, ' ');
    let time = rfc3339(parts.next()?)?;
    let stream = match parts.next()? {
        "stdout" => "stdout",
        "stderr" => "stderr",
        _ => return None,
    };
    let partial = match parts.next()? {
        "P" => true,
        "F" => false,
        _ => return None,
    };
    let message = parts.next().unwrap_or("").to_owned();
    Some(Unwrapped { message, time: Some(time), stream: Some(stream), partial })
}

#[derive(serde::Deserialize)]
struct DockerLine {
    log: String,
    #[serde(default)]
    stream: String,
    #[serde(default)]
    time: String,
}

/// `{"log":"message\n","stream":"stdout","time":"2024-01-01T00:00:00.000000001Z"}`; a log
/// without its trailing newline is a piece of a longer line.
fn docker(line: &str) -> Option<Unwrapped> {
    if !line.starts_with('{') || !line.contains("\"log\"") {
        return None;
    }
    let parsed: DockerLine = serde_json::from_str(line).ok()?;
    let stream = match parsed.stream.as_str() {
        "stdout" => Some("stdout"),
        "stderr" => Some("stderr"),
        _ => None,
    };
    let partial = !parsed.log.ends_with('\n');
    let mut message = parsed.log;
    if message.ends_with('\n') {
        message.pop();
        if message.ends_with('\r') {
            message.pop();
        }
    }
    Some(Unwrapped { message, time: rfc3339(&parsed.time), stream, partial })
}

/// Reads the structure of a message as `format` says (for `auto` and the envelope formats,
/// JSON when it looks like JSON, else logfmt when it has `key=value` pairs).
pub fn fields(format: LogFormatKind, message: &str) -> Fields {
    let trimmed = message.trim_start();
    match format {
        LogFormatKind::Plain => Fields::default(),
        LogFormatKind::Json => json_fields(trimmed).unwrap_or_default(),
        LogFormatKind::Logfmt => logfmt_fields(trimmed),
        LogFormatKind::Auto | LogFormatKind::Cri | LogFormatKind::Docker => {
            if trimmed.starts_with('{') {
                json_fields(trimmed).unwrap_or_default()
            } else if trimmed.contains('=') {
                logfmt_fields(trimmed)
            } else {
                Fields::default()
            }
        }
    }
}

fn json_fields(message: &str) -> Option<Fields> {
    let value: serde_json::Value = serde_json::from_str(message).ok()?;
    let object = value.as_object()?;
    let mut fields = Fields::default();
    for (key, value) in object {
        let text = match value {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => continue,
        };
        apply(&mut fields, key, &text);
    }
    Some(fields)
}

fn logfmt_fields(message: &str) -> Fields {
    let mut fields = Fields::default();
    let mut rest = message;
    while !rest.is_empty() {
        rest = rest.trim_start();
        let Some(eq) = rest.find('=') else { break };
        let key = &rest[..eq];
        if key.is_empty() || key.contains(' ') {
            // Not a pair: skip the word.
            rest = rest.find(' ').map_or("", |i| &rest[i..]);
            continue;
        }
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut end = quoted.len();
            let mut chars = quoted.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        apply(&mut fields, key, &value);
        rest = next;
    }
    fields
}

fn apply(fields: &mut Fields, key: &str, value: &str) {
    match key.to_ascii_lowercase().as_str() {
        "level" | "lvl" | "severity" | "loglevel" if fields.level.is_none() && !value.is_empty() => {
            fields.level = Some(value.to_ascii_lowercase());
        }
        "trace_id" | "traceid" | "trace-id" => fields.trace_id = fields.trace_id.or_else(|| hex_id(value)),
        "span_id" | "spanid" | "span-id" => fields.span_id = fields.span_id.or_else(|| hex_id(value)),
        "traceparent" => {
            if let Some((trace, span)) = traceparent(value) {
                fields.trace_id = fields.trace_id.or(Some(trace));
                fields.span_id = fields.span_id.or(Some(span));
            }
        }
        "time" | "timestamp" | "ts" | "@timestamp" if fields.time.is_none() => {
            fields.time = rfc3339(value).or_else(|| epoch(value));
        }
        _ => {}
    }
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>` (W3C Trace Context).
fn traceparent(value: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    if version.len() != 2 || version == "ff" {
        return None;
    }
    let trace = hex_id(parts.next()?)?;
    let span = hex_id(parts.next()?)?;
    Some((trace, span))
}

/// A non-zero id of exactly `N` bytes written in hex.
fn hex_id<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    out.iter().any(|&b| b != 0).then_some(out)
}

/// Seconds (or milliseconds, microseconds, nanoseconds, told apart by size) since the epoch,
/// with an optional decimal fraction; exact, without floating point.
fn epoch(value: &str) -> Option<u64> {
    let (whole, fraction) = value.trim().split_once('.').unwrap_or((value.trim(), ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let unit: u64 = match whole {
        0 => return None,
        1..=99_999_999_999 => 1_000_000_000,
        100_000_000_000..=99_999_999_999_999 => 1_000_000,
        100_000_000_000_000..=99_999_999_999_999_999 => 1_000,
        _ => 1,
    };
    let mut nanos = whole.checked_mul(unit)?;
    let mut scale = unit;
    for digit in fraction.bytes().take(9) {
        scale /= 10;
        nanos += u64::from(digit - b'0') * scale;
    }
    Some(nanos)
}

/// An RFC 3339 time (`2024-05-01T12:00:00.123456789Z`, or with a `+02:00` offset) as Unix
/// nanoseconds.
pub fn rfc3339(text: &str) -> Option<u64> {
    let text = text.trim();
    if text.len() < 20 || !text.is_char_boundary(10) || text.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    let (local, offset) = if let Some(local) = text.strip_suffix('Z').or_else(|| text.strip_suffix('z')) {
        (local, 0i64)
    } else {
        let cut = text.len().checked_sub(6)?;
        let (local, zone) = text.split_at(cut);
        let sign = match zone.as_bytes().first()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let hours: i64 = zone.get(1..3)?.parse().ok()?;
        let minutes: i64 = zone.get(4..6)?.parse().ok()?;
        (local, sign * (hours * 3600 + minutes * 60))
    };
    let parsed = humantime::parse_rfc3339_weak(local).ok()?;
    let since = parsed.duration_since(UNIX_EPOCH).ok()?;
    let adjusted = if offset >= 0 {
        since.checked_sub(Duration::from_secs(offset as u64))?
    } else {
        since + Duration::from_secs((-offset) as u64)
    };
    u64::try_from(adjusted.as_nanos()).ok()
}

/// Now, as Unix nanoseconds.
pub fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_123_456_789;

    #[test]
    fn cri_lines_give_time_stream_and_partial_flag() {
        let u = unwrap(LogFormatKind::Cri, "2023-11-14T22:13:20.123456789Z stderr P part one ");
        assert_eq!(u, Unwrapped { message: "part one ".into(), time: Some(T), stream: Some("stderr"), partial: true });
        let u = unwrap(LogFormatKind::Auto, "2023-11-14T22:13:20.123456789Z stdout F ");
        assert_eq!((u.message.as_str(), u.partial), ("", false));
        // Not CRI: taken as it is.
        let u = unwrap(LogFormatKind::Cri, "hello world");
        assert_eq!((u.message.as_str(), u.time), ("hello world", None));
    }

    #[test]
    fn docker_lines_unwrap_and_join_markers() {
        let u = unwrap(LogFormatKind::Auto, r#"{"log":"hello\n","stream":"stdout","time":"2023-11-14T22:13:20.123456789Z"}"#);
        assert_eq!(u, Unwrapped { message: "hello".into(), time: Some(T), stream: Some("stdout"), partial: false });
        let u = unwrap(LogFormatKind::Docker, r#"{"log":"no newline","stream":"stderr","time":"2023-11-14T22:13:20.123456789Z"}"#);
        assert!(u.partial);
    }

    #[test]
    fn json_and_logfmt_give_level_ids_and_time() {
        let f = fields(
            LogFormatKind::Auto,
            r#"{"level":"WARN","msg":"slow","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":"00f067aa0ba902b7","time":"2023-11-15T00:13:20.123456789+02:00"}"#,
        );
        assert_eq!(f.level.as_deref(), Some("warn"));
        assert_eq!(f.trace_id.map(|t| t[0]), Some(0x4b));
        assert_eq!(f.span_id.map(|s| s[7]), Some(0xb7));
        assert_eq!(f.time, Some(T));

        let f = fields(LogFormatKind::Logfmt, r#"ts=2023-11-14T22:13:20.123456789Z lvl=error msg="a \"quoted\" thing" traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"#);
        assert_eq!(f.level.as_deref(), Some("error"));
        assert_eq!(f.time, Some(T));
        assert!(f.trace_id.is_some() && f.span_id.is_some());

        assert_eq!(fields(LogFormatKind::Auto, "GET /index.html 200"), Fields::default());
        assert_eq!(fields(LogFormatKind::Plain, "level=error"), Fields::default());
    }

    #[test]
    fn bad_ids_and_times_are_ignored() {
        let f = fields(LogFormatKind::Json, r#"{"trace_id":"xyz","span_id":"0000000000000000","time":"yesterday"}"#);
        assert_eq!(f, Fields::default());
        assert_eq!(rfc3339("2023-11-14 22:13:20Z"), None);
        assert_eq!(epoch("1700000000.5"), Some(1_700_000_000_500_000_000));
        assert_eq!(epoch("1700000000123"), Some(1_700_000_000_123_000_000));
    }
}
