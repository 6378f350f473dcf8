//! Command-line flags of the harness binaries: `--name value` pairs, nothing more. The
//! binaries are driven by `run.sh`, so a small parser with clear errors is enough.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, PartialEq, Eq)]
pub struct ArgsError(pub String);

impl fmt::Display for ArgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArgsError {}

/// Flags given as `--name value`, checked against the names a binary knows.
#[derive(Debug)]
pub struct Args {
    values: BTreeMap<String, String>,
}

impl Args {
    /// Parses `args` (without the program name). `known` lists the accepted flag names,
    /// without the leading dashes.
    pub fn parse<I>(args: I, known: &[&str]) -> Result<Args, ArgsError>
    where
        I: IntoIterator<Item = String>,
    {
        let mut values = BTreeMap::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(ArgsError(format!("unexpected argument {arg:?}")));
            };
            let (name, value) = match name.split_once('=') {
                Some((name, value)) => (name.to_string(), value.to_string()),
                None => {
                    let value = args.next().ok_or_else(|| ArgsError(format!("--{name} needs a value")))?;
                    (name.to_string(), value)
                }
            };
            if !known.contains(&name.as_str()) {
                return Err(ArgsError(format!("unknown flag --{name}; known: --{}", known.join(", --"))));
            }
            values.insert(name, value);
        }
        Ok(Args { values })
    }

    /// The value of `--name` parsed as `T`, or `default` when the flag is absent.
    pub fn get<T>(&self, name: &str, default: T) -> Result<T, ArgsError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.values.get(name) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|e| ArgsError(format!("--{name} {raw:?}: {e}"))),
        }
    }

    /// The value of `--name` as text, if given.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], known: &[&str]) -> Result<Args, ArgsError> {
        Args::parse(args.iter().map(|s| s.to_string()), known)
    }

    #[test]
    fn both_flag_forms_are_read_and_absent_flags_take_the_default() {
        let args = parse(&["--spans", "1000", "--batch=64"], &["spans", "batch", "concurrency"]).unwrap();
        assert_eq!(args.get("spans", 0u64).unwrap(), 1000);
        assert_eq!(args.get("batch", 0usize).unwrap(), 64);
        assert_eq!(args.get("concurrency", 4usize).unwrap(), 4);
        assert_eq!(args.text("concurrency"), None);
    }

    #[test]
    fn unknown_flags_missing_values_and_bad_numbers_are_errors_naming_the_flag() {
        assert_eq!(
            parse(&["--spam", "1"], &["spans"]).unwrap_err(),
            ArgsError("unknown flag --spam; known: --spans".into())
        );
        assert_eq!(parse(&["--spans"], &["spans"]).unwrap_err(), ArgsError("--spans needs a value".into()));
        assert_eq!(parse(&["spans"], &["spans"]).unwrap_err(), ArgsError("unexpected argument \"spans\"".into()));
        let args = parse(&["--spans", "lots"], &["spans"]).unwrap();
        assert_eq!(
            args.get("spans", 0u64).unwrap_err(),
            ArgsError("--spans \"lots\": invalid digit found in string".into())
        );
    }
}
