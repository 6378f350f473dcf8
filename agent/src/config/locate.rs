//! Finds the line of a key path (`exporters.jaeger.endpoint`, `sources.logs[1].include`) in
//! YAML text, so that errors found after parsing can still point at a line.
//!
//! A line scanner, not a YAML parser: it follows block mappings by indentation, sequence
//! items written `- `, and keys inside a one-line flow mapping. When it cannot go deeper it
//! answers the line of the deepest key it found, which is still the right neighbourhood.

/// One step of a key path.
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(end) = rest.find(']') {
            if let Ok(index) = rest[1..end].parse() {
                out.push(Segment::Index(index));
            }
            rest = &rest[end + 1..];
        }
    }
    out
}

struct Line<'a> {
    number: usize,
    indent: usize,
    /// The text after the indentation and any `- ` sequence markers.
    body: &'a str,
    /// Column where a `- ` item marker stands, if the line starts a sequence item.
    item_at: Option<usize>,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = raw.len() - trimmed.len();
        let (item_at, body) = match trimmed.strip_prefix("- ").or(trimmed.strip_prefix('-').filter(|r| r.is_empty())) {
            Some(rest) => {
                let rest_trimmed = rest.trim_start();
                let body_indent = indent + 1 + (rest.len() - rest_trimmed.len()) + 1;
                (Some(indent), (rest_trimmed, body_indent))
            }
            None => (None, (trimmed, indent)),
        };
        out.push(Line { number: i + 1, indent: body.1.max(indent), body: body.0, item_at });
    }
    out
}

fn key_of(body: &str) -> Option<&str> {
    let colon = body.find(':')?;
    let key = body[..colon].trim().trim_matches(|c| c == '"' || c == '\'');
    (!key.is_empty() && !key.contains(' ') || body.starts_with(['"', '\''])).then_some(key)
}

/// Line (1-based) of `path` in `text`, or of the deepest part of it that was found.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let lines = lines(text);
    let mut found = None;
    // The window of lines that belong to the current node, and the indentation of its children.
    let (mut start, mut end, mut parent_indent): (usize, usize, Option<usize>) = (0, lines.len(), None);
    for segment in segments(path) {
        match segment {
            Segment::Key(key) => {
                // A key inside a flow mapping on the line found so far: `labels: { job: x }`.
                if let Some(prev) = found.and_then(|n| lines.iter().find(|l| l.number == n)) {
                    if prev.body.contains('{') && prev.body.contains(&format!("{key}:")) {
                        return Some(prev.number);
                    }
                }
                let child_indent = lines[start..end]
                    .iter()
                    .map(|l| l.indent)
                    .filter(|&i| parent_indent.is_none_or(|p| i > p))
                    .min();
                let Some(child_indent) = child_indent else { return found };
                let Some(pos) = (start..end).find(|&i| {
                    lines[i].indent == child_indent && key_of(lines[i].body) == Some(key)
                }) else {
                    return found;
                };
                found = Some(lines[pos].number);
                let next = (pos + 1..end).find(|&i| lines[i].indent <= child_indent && lines[i].item_at.is_none_or(|c| c <= child_indent)).unwrap_or(end);
                start = pos + 1;
                end = next;
                parent_indent = Some(child_indent);
            }
            Segment::Index(index) => {
                let items: Vec<usize> = (start..end).filter(|&i| lines[i].item_at.is_some()).collect();
                let Some(item_column) = items.iter().map(|&i| lines[i].item_at.unwrap_or(0)).min() else {
                    return found;
                };
                let items: Vec<usize> = items.into_iter().filter(|&i| lines[i].item_at == Some(item_column)).collect();
                let Some(&pos) = items.get(index) else { return found };
                found = Some(lines[pos].number);
                let next = items.iter().copied().find(|&i| i > pos).unwrap_or(end);
                start = pos;
                end = next;
                parent_indent = Some(item_column);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::line_of;

    const TEXT: &str = "\
# comment
node_name: a
sources:
  otlp:
    grpc: 127.0.0.1:4317
  logs:
    - include: [a]
      format: json
    - include: [b]
      labels: { job: pods }
exporters:
  jaeger:
    endpoint: x
    headers:
      x-a: b
";

    #[test]
    fn finds_nested_keys() {
        assert_eq!(line_of(TEXT, "node_name"), Some(2));
        assert_eq!(line_of(TEXT, "sources.otlp.grpc"), Some(5));
        assert_eq!(line_of(TEXT, "exporters.jaeger.endpoint"), Some(13));
        assert_eq!(line_of(TEXT, "exporters.jaeger.headers.x-a"), Some(15));
    }

    #[test]
    fn finds_sequence_items_and_flow_keys() {
        assert_eq!(line_of(TEXT, "sources.logs[0].format"), Some(8));
        assert_eq!(line_of(TEXT, "sources.logs[1].include"), Some(9));
        assert_eq!(line_of(TEXT, "sources.logs[1].labels.job"), Some(10));
    }

    #[test]
    fn missing_keys_answer_the_deepest_found() {
        assert_eq!(line_of(TEXT, "exporters.jaeger.tls"), Some(12));
        assert_eq!(line_of(TEXT, "nothing"), None);
    }
}
