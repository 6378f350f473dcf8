//! pprof's `profile.proto` (field numbers of Google's published `proto/profile.proto`), what
//! `go tool pprof` reads, and conversions: stacks to a profile, a profile to collapsed stacks.

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use prost::Message;
use std::collections::HashMap;
use std::io::{Read, Write};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// One stack, root first, with how many times it was sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    /// (function name, file, line), root first.
    pub frames: Vec<(String, String, u32)>,
    pub count: i64,
}

/// Builds a CPU profile (`samples/count`, `cpu/nanoseconds`) from sampled stacks.
pub fn from_stacks(stacks: &[Stack], frequency: i64, start_nanos: i64, duration_nanos: i64) -> Profile {
    let mut strings: Vec<String> = vec![String::new()];
    let mut string_index: HashMap<String, i64> = HashMap::new();
    let mut intern = |s: &str| -> i64 {
        if let Some(&i) = string_index.get(s) {
            return i;
        }
        strings.push(s.to_owned());
        let i = strings.len() as i64 - 1;
        string_index.insert(s.to_owned(), i);
        i
    };
    let samples_type = ValueType { r#type: intern("samples"), unit: intern("count") };
    let cpu_type = ValueType { r#type: intern("cpu"), unit: intern("nanoseconds") };
    let period = 1_000_000_000 / frequency.max(1);
    let mut functions: Vec<Function> = Vec::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut by_frame: HashMap<(String, String, u32), u64> = HashMap::new();
    let mut samples = Vec::with_capacity(stacks.len());
    for stack in stacks {
        let mut ids = Vec::with_capacity(stack.frames.len());
        // pprof lists a sample's locations leaf first.
        for frame in stack.frames.iter().rev() {
            let id = match by_frame.get(frame) {
                Some(&id) => id,
                None => {
                    let id = locations.len() as u64 + 1;
                    let name = intern(&frame.0);
                    let file = intern(&frame.1);
                    functions.push(Function { id, name, system_name: name, filename: file });
                    locations.push(Location { id, mapping_id: 0, address: 0, line: vec![Line { function_id: id, line: i64::from(frame.2) }] });
                    by_frame.insert(frame.clone(), id);
                    id
                }
            };
            ids.push(id);
        }
        samples.push(Sample { location_id: ids, value: vec![stack.count, stack.count * period], label: Vec::new() });
    }
    Profile {
        sample_type: vec![samples_type, cpu_type],
        sample: samples,
        mapping: Vec::new(),
        location: locations,
        function: functions,
        string_table: strings,
        time_nanos: start_nanos,
        duration_nanos,
        period_type: Some(cpu_type),
        period,
        default_sample_type: 0,
    }
}

/// The profile as `go tool pprof` reads it: gzipped protobuf.
pub fn encode_gzipped(profile: &Profile) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(&profile.encode_to_vec());
    encoder.finish().unwrap_or_default()
}

/// Reads a profile, gzipped or not.
pub fn decode(bytes: &[u8]) -> Result<Profile, String> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(bytes).take(512 * 1024 * 1024).read_to_end(&mut out).map_err(|e| format!("bad gzip: {e}"))?;
        out
    } else {
        bytes.to_vec()
    };
    let profile = Profile::decode(raw.as_slice()).map_err(|e| format!("not a profile.proto: {e}"))?;
    if profile.sample_type.is_empty() || profile.string_table.first().is_none_or(|s| !s.is_empty()) {
        return Err("not a profile.proto: no sample types or a malformed string table".into());
    }
    Ok(profile)
}

/// Collapsed stacks (`root;caller;leaf count`), weighted by the sample count when the profile
/// has a `samples` value (the last value otherwise), sorted for stable output.
pub fn folded(profile: &Profile) -> String {
    let string = |i: i64| profile.string_table.get(i as usize).map_or("?", String::as_str);
    let value_index = profile
        .sample_type
        .iter()
        .position(|t| string(t.r#type) == "samples")
        .unwrap_or(profile.sample_type.len().saturating_sub(1));
    let functions: HashMap<u64, &Function> = profile.function.iter().map(|f| (f.id, f)).collect();
    let locations: HashMap<u64, &Location> = profile.location.iter().map(|l| (l.id, l)).collect();
    let mut lines: HashMap<String, i64> = HashMap::new();
    for sample in &profile.sample {
        let mut frames: Vec<String> = Vec::new();
        for id in sample.location_id.iter().rev() {
            let Some(location) = locations.get(id) else { continue };
            if location.line.is_empty() {
                frames.push(format!("0x{:x}", location.address));
            }
            // The last line is the caller the others were inlined into.
            for line in location.line.iter().rev() {
                let name = functions.get(&line.function_id).map_or("?", |f| string(f.name));
                frames.push(name.replace(';', ":"));
            }
        }
        let value = sample.value.get(value_index).copied().unwrap_or(0);
        if value > 0 && !frames.is_empty() {
            *lines.entry(frames.join(";")).or_default() += value;
        }
    }
    let mut sorted: Vec<(String, i64)> = lines.into_iter().collect();
    sorted.sort();
    let mut out = String::new();
    for (stack, value) in sorted {
        out.push_str(&stack);
        out.push(' ');
        out.push_str(&value.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacks() -> Vec<Stack> {
        let frame = |n: &str| (n.to_owned(), "main.rs".to_owned(), 1);
        vec![
            Stack { frames: vec![frame("main"), frame("work"), frame("hot")], count: 30 },
            Stack { frames: vec![frame("main"), frame("idle")], count: 2 },
        ]
    }

    #[test]
    fn stacks_round_trip_through_a_gzipped_profile() {
        let profile = from_stacks(&stacks(), 100, 1, 2);
        let bytes = encode_gzipped(&profile);
        assert_eq!(&bytes[..2], &[0x1f, 0x8b]);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded, profile);
        assert_eq!(folded(&decoded), "main;idle 2\nmain;work;hot 30\n");
    }

    #[test]
    fn garbage_is_not_a_profile() {
        assert!(decode(b"<html>hello</html>").is_err());
        assert!(decode(&[0x1f, 0x8b, 0, 0]).is_err());
    }
}
