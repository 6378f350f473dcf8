//! OpenTelemetry names to Prometheus names, as the OpenTelemetry→Prometheus compatibility
//! specification says: invalid characters become `_`, the unit becomes a suffix (`_seconds`,
//! `_bytes`, `_ratio` for a unit of 1 on a gauge, `_per_second` for `/s`), and monotonic
//! counters end in `_total`.

/// A metric name Prometheus accepts, from an OpenTelemetry one.
pub fn metric_name(name: &str, unit: &str, counter: bool, gauge: bool) -> String {
    let mut out = sanitize(name, true);
    let suffix = unit_suffix(unit, gauge);
    for word in suffix.split('_').filter(|w| !w.is_empty()) {
        // Append the unit unless the name already says it.
        if !out.split('_').any(|w| w == word) {
            out.push('_');
            out.push_str(word);
        }
    }
    if counter {
        if let Some(stripped) = out.strip_suffix("_total") {
            out.truncate(stripped.len());
        }
        out.push_str("_total");
    }
    out
}

/// A label name Prometheus accepts: invalid characters as `_`, a leading digit prefixed
/// with `key_`.
pub fn label_name(name: &str) -> String {
    let out = sanitize(name, false);
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        format!("key_{out}")
    } else if out.starts_with("__") && !name.starts_with("__") {
        out.trim_start_matches('_').to_owned()
    } else {
        out
    }
}

fn sanitize(name: &str, colons: bool) -> String {
    let mut out = String::with_capacity(name.len());
    let mut last_underscore = false;
    for c in name.chars() {
        let keep = c.is_ascii_alphanumeric() || (colons && c == ':');
        let c = if keep { c } else { '_' };
        if c == '_' && last_underscore {
            continue;
        }
        last_underscore = c == '_';
        out.push(c);
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) && colons {
        out.insert(0, '_');
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

fn unit_suffix(unit: &str, gauge: bool) -> String {
    // Annotations in braces say nothing Prometheus keeps.
    let unit = match unit.find('{') {
        Some(open) => unit[..open].trim(),
        None => unit.trim(),
    };
    if unit.is_empty() {
        return String::new();
    }
    if unit == "1" {
        return if gauge { "ratio".into() } else { String::new() };
    }
    match unit.split_once('/') {
        Some((per, base)) => {
            let per = unit_word(per);
            let base = per_word(base);
            match (per.is_empty(), base.is_empty()) {
                (true, true) => String::new(),
                (false, true) => per,
                (true, false) => format!("per_{base}"),
                (false, false) => format!("{per}_per_{base}"),
            }
        }
        None => unit_word(unit),
    }
}

fn unit_word(unit: &str) -> String {
    let word = match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        other => return sanitize(other, false).trim_matches('_').to_owned(),
    };
    word.to_owned()
}

fn per_word(unit: &str) -> String {
    let word = match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        other => return sanitize(other, false).trim_matches('_').to_owned(),
    };
    word.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_compatibility_rules() {
        assert_eq!(metric_name("http.server.request.duration", "s", false, false), "http_server_request_duration_seconds");
        assert_eq!(metric_name("http.server.requests", "{request}", true, false), "http_server_requests_total");
        assert_eq!(metric_name("process.memory.usage", "By", false, true), "process_memory_usage_bytes");
        assert_eq!(metric_name("system.cpu.utilization", "1", false, true), "system_cpu_utilization_ratio");
        assert_eq!(metric_name("throughput", "By/s", false, true), "throughput_bytes_per_second");
        assert_eq!(metric_name("jobs_total", "", true, false), "jobs_total");
        assert_eq!(metric_name("latency_seconds", "s", false, false), "latency_seconds");
        assert_eq!(metric_name("weird--name!", "", false, true), "weird_name_");
    }

    #[test]
    fn label_names_are_sanitized() {
        assert_eq!(label_name("http.request.method"), "http_request_method");
        assert_eq!(label_name("2xx"), "key_2xx");
        assert_eq!(label_name("_private"), "_private");
    }
}
