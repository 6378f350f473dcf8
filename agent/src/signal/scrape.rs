//! Scraped samples as they travel from a scrape target to the Prometheus exporters.
//!
//! A scrape is Prometheus samples already: names and labels as the target exposed them, with
//! the target's labels added. Sending them through OTLP would mean building (and dropping) a
//! string for every label of every sample on every scrape, and converting back. Instead a
//! target keeps a [`SeriesTable`] — every series' labels, encoded once as remote write's
//! protobuf `Label` messages, back to back in one buffer — for as long as it exposes the same
//! series, and each scrape carries only the table's `Arc` and one value per series.

use std::sync::Arc;

use prost::encoding::{encode_varint, encoded_len_varint};

use crate::telemetry::exposition::{ExemplarText, Type};

/// One series of a table: where its labels end in [`SeriesTable::labels`], and a hash of
/// them (stable across runs) that picks its remote-write shard.
#[derive(Debug, Clone, Copy)]
struct Entry {
    end: u32,
    hash: u64,
}

/// Series that are written under one `# TYPE` line: a histogram's or summary's samples
/// together, other samples by name.
#[derive(Debug, PartialEq)]
pub struct RenderFamily {
    pub name: Box<str>,
    pub help: Box<str>,
    pub kind: Type,
    /// Indexes into the table, in the order the target exposed them.
    pub series: Vec<u32>,
}

/// The series one target exposes, labels encoded once.
#[derive(Debug, Default)]
pub struct SeriesTable {
    labels: Vec<u8>,
    series: Vec<Entry>,
    families: Vec<RenderFamily>,
}

/// Builds a [`SeriesTable`].
#[derive(Default)]
pub struct TableBuilder {
    table: SeriesTable,
    family_index: std::collections::HashMap<Box<str>, usize, ahash::RandomState>,
    order: Vec<usize>,
}

/// Seeds of the series hash: fixed, so a series keeps its shard across restarts (what the
/// remote-write log still holds for it stays ahead of what comes next).
const HASH_SEEDS: (u64, u64, u64, u64) = (0x5e71e5, 0x7ab1e, 0x5c4a9e, 0x9e3779b97f4a7c15);

impl TableBuilder {
    pub fn with_capacity(series: usize) -> TableBuilder {
        let mut builder = TableBuilder::default();
        builder.table.series.reserve(series);
        builder.table.labels.reserve(series * 96);
        builder
    }

    /// Adds a series: its name and its labels (in any order; empty values are left out, as
    /// Prometheus treats them as absent). Returns its index.
    pub fn push<K: AsRef<str>, V: AsRef<str>>(&mut self, family: (&str, &str, Type), name: &str, labels: &[(K, V)]) -> u32 {
        let index = self.table.series.len() as u32;
        // Sort label indexes by name, `__name__` among them.
        self.order.clear();
        self.order.push(usize::MAX);
        self.order.extend((0..labels.len()).filter(|&i| !labels[i].1.as_ref().is_empty()));
        let label = |i: usize| if i == usize::MAX { ("__name__", name) } else { (labels[i].0.as_ref(), labels[i].1.as_ref()) };
        self.order.sort_unstable_by(|&a, &b| label(a).0.cmp(label(b).0));
        let start = self.table.labels.len();
        for &i in &self.order {
            let (key, value) = label(i);
            encode_label(&mut self.table.labels, key, value);
        }
        let hash = ahash::RandomState::with_seeds(HASH_SEEDS.0, HASH_SEEDS.1, HASH_SEEDS.2, HASH_SEEDS.3)
            .hash_one(&self.table.labels[start..]);
        self.table.series.push(Entry { end: self.table.labels.len() as u32, hash });
        let (family_name, help, kind) = family;
        let at = match self.family_index.get(family_name) {
            Some(&at) => at,
            None => {
                self.table.families.push(RenderFamily { name: family_name.into(), help: help.into(), kind, series: Vec::new() });
                self.family_index.insert(family_name.into(), self.table.families.len() - 1);
                self.table.families.len() - 1
            }
        };
        self.table.families[at].series.push(index);
        index
    }

    pub fn len(&self) -> usize {
        self.table.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.series.is_empty()
    }

    pub fn finish(mut self) -> SeriesTable {
        self.table.labels.shrink_to_fit();
        self.table.series.shrink_to_fit();
        for family in &mut self.table.families {
            family.series.shrink_to_fit();
        }
        self.table
    }
}

fn encode_label(out: &mut Vec<u8>, key: &str, value: &str) {
    let inner = 1 + encoded_len_varint(key.len() as u64) + key.len() + 1 + encoded_len_varint(value.len() as u64) + value.len();
    out.push(0x0a);
    encode_varint(inner as u64, out);
    out.push(0x0a);
    encode_varint(key.len() as u64, out);
    out.extend_from_slice(key.as_bytes());
    out.push(0x12);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value.as_bytes());
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<usize> {
    let mut value = 0usize;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The labels of one series, decoded from its `Label` messages.
pub struct Labels<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Labels<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        // Label messages as written by `encode_label`: the table is only ever built by it.
        let b = self.bytes;
        if self.at >= b.len() {
            return None;
        }
        self.at += 1;
        let len = read_varint(b, &mut self.at)?;
        let end = self.at + len;
        self.at += 1;
        let key_len = read_varint(b, &mut self.at)?;
        let key = std::str::from_utf8(b.get(self.at..self.at + key_len)?).ok()?;
        self.at += key_len + 1;
        let value_len = read_varint(b, &mut self.at)?;
        let value = std::str::from_utf8(b.get(self.at..self.at + value_len)?).ok()?;
        self.at = end;
        Some((key, value))
    }
}

impl SeriesTable {
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// The series' labels as remote write's protobuf `Label` messages (`TimeSeries.labels`).
    pub fn encoded_labels(&self, index: usize) -> &[u8] {
        let start = if index == 0 { 0 } else { self.series[index - 1].end as usize };
        &self.labels[start..self.series[index].end as usize]
    }

    /// The series' labels, `__name__` among them, sorted by name.
    pub fn labels(&self, index: usize) -> Labels<'_> {
        Labels { bytes: self.encoded_labels(index), at: 0 }
    }

    pub fn hash(&self, index: usize) -> u64 {
        self.series[index].hash
    }

    pub fn families(&self) -> &[RenderFamily] {
        &self.families
    }

    /// Whether both tables have the same series, in the same order, under the same families.
    pub fn same_series(&self, other: &SeriesTable) -> bool {
        self.series.len() == other.series.len() && self.labels == other.labels && self.families == other.families
    }

    /// Bytes held, for the agent's own accounting.
    pub fn heap_bytes(&self) -> usize {
        self.labels.capacity()
            + self.series.capacity() * std::mem::size_of::<Entry>()
            + self.families.iter().map(|f| f.series.capacity() * 4 + f.name.len() + f.help.len()).sum::<usize>()
    }
}

/// One scrape of one target.
#[derive(Debug)]
pub struct Scrape {
    pub job: Arc<str>,
    pub instance: Arc<str>,
    pub table: Arc<SeriesTable>,
    /// One per series of the table.
    pub values: Vec<f64>,
    /// Empty, or one per series: the time the target gave the sample, 0 for none.
    pub timestamps: Vec<i64>,
    /// When the scrape started, Unix milliseconds.
    pub time_ms: i64,
    /// Exemplars by series index, in index order (OpenMetrics targets).
    pub exemplars: Vec<(u32, ExemplarText)>,
    /// Series of an earlier table that this scrape no longer has: they get staleness markers.
    pub stale: Option<(Arc<SeriesTable>, Vec<u32>)>,
}

impl Scrape {
    /// The time of sample `index`, Unix milliseconds.
    pub fn time_of(&self, index: usize) -> i64 {
        match self.timestamps.get(index) {
            Some(&ms) if ms > 0 => ms,
            _ => self.time_ms,
        }
    }

    pub fn exemplar(&self, index: u32) -> Option<&ExemplarText> {
        self.exemplars.binary_search_by_key(&index, |(i, _)| *i).ok().map(|at| &self.exemplars[at].1)
    }

    pub fn stale_count(&self) -> usize {
        self.stale.as_ref().map_or(0, |(_, s)| s.len())
    }
}

/// Appends one remote-write `TimeSeries` field (of a `WriteRequest`) with one sample.
pub fn encode_time_series(out: &mut Vec<u8>, labels: &[u8], value: f64, timestamp_ms: i64) {
    let sample_len = 1 + 8 + 1 + encoded_len_varint(timestamp_ms as u64);
    let inner = labels.len() + 1 + encoded_len_varint(sample_len as u64) + sample_len;
    out.push(0x0a);
    encode_varint(inner as u64, out);
    out.extend_from_slice(labels);
    out.push(0x12);
    encode_varint(sample_len as u64, out);
    out.push(0x09);
    out.extend_from_slice(&value.to_le_bytes());
    out.push(0x10);
    encode_varint(timestamp_ms as u64, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exporters::remote_write::prompb::{Label, Sample, TimeSeries, WriteRequest};
    use prost::Message;

    #[test]
    fn tables_encode_what_remote_write_decodes() {
        let mut builder = TableBuilder::default();
        let family = ("http_requests_total", "Requests.", Type::Counter);
        builder.push(family, "http_requests_total", &[("path", "/a"), ("job", "shop"), ("Zone", "ü"), ("empty", "")]);
        builder.push(family, "http_requests_total", &[("path", "/b")]);
        let table = builder.finish();
        assert_eq!(table.len(), 2);
        let labels: Vec<_> = table.labels(0).collect();
        assert_eq!(labels, [("Zone", "ü"), ("__name__", "http_requests_total"), ("job", "shop"), ("path", "/a")]);
        assert_ne!(table.hash(0), table.hash(1));
        assert_eq!(table.families().len(), 1);
        assert_eq!(table.families()[0].series, [0, 1]);

        let mut body = Vec::new();
        encode_time_series(&mut body, table.encoded_labels(1), 2.5, 1_700_000_000_123);
        encode_time_series(&mut body, table.encoded_labels(0), 0.0, 7);
        let decoded = WriteRequest::decode(body.as_slice()).unwrap();
        let label = |n: &str, v: &str| Label { name: n.into(), value: v.into() };
        assert_eq!(
            decoded.timeseries,
            [
                TimeSeries {
                    labels: vec![label("__name__", "http_requests_total"), label("path", "/b")],
                    samples: vec![Sample { value: 2.5, timestamp: 1_700_000_000_123 }],
                },
                TimeSeries {
                    labels: vec![label("Zone", "ü"), label("__name__", "http_requests_total"), label("job", "shop"), label("path", "/a")],
                    samples: vec![Sample { value: 0.0, timestamp: 7 }],
                },
            ]
        );
    }

    #[test]
    fn long_labels_use_multi_byte_lengths() {
        let long = "x".repeat(300);
        let mut builder = TableBuilder::default();
        builder.push(("m", "", Type::Gauge), "m", &[("a", &long)]);
        let table = builder.finish();
        assert_eq!(table.labels(0).collect::<Vec<_>>(), [("__name__", "m"), ("a", long.as_str())]);
    }
}
