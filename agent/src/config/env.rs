//! `${VAR}` and `${VAR:-default}` substitution over the raw config text.
//!
//! Substitution happens before YAML parsing so that every value (and only values a user
//! wrote) can take it, and line numbers stay those of the file. `$$` is a literal `$`.
//! Lines that are only a comment are left alone, so a commented-out `${VAR}` does not
//! require the variable. An unset variable without a default is an error: silently using
//! an empty string hides typos in DaemonSet manifests.

use super::ConfigError;

/// Replaces every `${NAME}` / `${NAME:-default}` using `lookup`; collects one error per
/// unset variable or malformed reference.
pub fn substitute(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                out.push('$');
                rest = stripped;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    errors.push(ConfigError::at_line(
                        line_no,
                        "unterminated `${` (write `$$` for a literal `$`)",
                    ));
                    out.push_str(&rest[pos..]);
                    rest = "";
                    break;
                };
                let reference = &body[..end];
                let (name, default) = match reference.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (reference, None),
                };
                if !is_valid_name(name) {
                    errors.push(ConfigError::at_line(
                        line_no,
                        format!("`${{{reference}}}`: `{name}` is not a valid environment variable name"),
                    ));
                } else {
                    // `${VAR:-default}` uses the default when VAR is unset or empty, as a shell does.
                    let value = lookup(name).filter(|v| !v.is_empty() || default.is_none());
                    match (value, default) {
                        (Some(value), _) => out.push_str(&value),
                        (None, Some(default)) => out.push_str(default),
                        (None, None) => errors.push(ConfigError::at_line(
                            line_no,
                            format!(
                                "environment variable {name} is not set (write `${{{name}:-default}}` to give a default)"
                            ),
                        )),
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "NODE" => Some("node-1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn set_variable_is_replaced() {
        assert_eq!(substitute("a: ${NODE}\n", env).unwrap(), "a: node-1\n");
    }

    #[test]
    fn default_is_used_when_unset_or_empty() {
        assert_eq!(substitute("a: ${MISSING:-x}", env).unwrap(), "a: x");
        assert_eq!(substitute("a: ${EMPTY:-x}", env).unwrap(), "a: x");
        assert_eq!(substitute("a: ${MISSING:-}", env).unwrap(), "a: ");
        assert_eq!(substitute("a: ${NODE:-x}", env).unwrap(), "a: node-1");
    }

    #[test]
    fn set_but_empty_without_default_is_empty() {
        assert_eq!(substitute("a: '${EMPTY}'", env).unwrap(), "a: ''");
    }

    #[test]
    fn unset_variable_without_default_names_variable_and_line() {
        let errors = substitute("a: 1\nb: ${NOPE}\n", env).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(2));
        assert!(errors[0].message.contains("NOPE"), "{}", errors[0].message);
    }

    #[test]
    fn dollar_dollar_is_a_literal_dollar_and_lone_dollar_stays() {
        assert_eq!(substitute("a: $${NODE} $5", env).unwrap(), "a: ${NODE} $5");
    }

    #[test]
    fn comment_lines_are_not_substituted() {
        assert_eq!(substitute("# ${NOPE}\na: 1", env).unwrap(), "# ${NOPE}\na: 1");
    }

    #[test]
    fn every_error_is_reported() {
        let errors = substitute("a: ${A}\nb: ${B}\nc: ${1x}\nd: ${open", env).unwrap_err();
        let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![Some(1), Some(2), Some(3), Some(4)]);
    }

    proptest::proptest! {
        #[test]
        fn any_text_gives_text_or_errors(text in "\\PC*") {
            let _ = substitute(&text, env);
        }
    }
}
