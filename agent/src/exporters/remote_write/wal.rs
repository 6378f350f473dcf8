//! A write-ahead log for one remote_write shard: samples are appended (and fsynced) before the
//! pipeline lets go of them, and leave only once Prometheus accepted them, so a restart or an
//! outage loses nothing.
//!
//! Layout under the shard's directory: segment files `<16 digits>.wal` of records
//! `[len u32][crc32 u32][samples u32][payload]` (payload: a protobuf `WriteRequest`, so that
//! records read back one after another are one `WriteRequest` as they are), and a
//! `position` file saying up to which segment and offset everything was delivered, replaced
//! atomically. The log is bounded in bytes: past the bound the oldest segment is dropped and
//! its undelivered samples counted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
const HEADER: u64 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

pub struct Wal {
    dir: PathBuf,
    max_bytes: u64,
    /// Segment numbers present, oldest first.
    segments: Vec<u64>,
    writer: Option<File>,
    writer_len: u64,
    delivered: Position,
}

/// What [`Wal::read`] found.
pub struct Batch {
    /// The records' payloads back to back: one encoded `WriteRequest`.
    pub body: Vec<u8>,
    pub samples: u64,
    /// Where delivery stands once this batch is accepted.
    pub end: Position,
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016}.wal"))
}

impl Wal {
    /// Opens (or creates) the log in `dir`.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Wal> {
        fs::create_dir_all(dir)?;
        let mut segments: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".wal")?.parse().ok())
            .collect();
        segments.sort_unstable();
        let delivered = fs::read(dir.join("position"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Position>(&b).ok())
            .unwrap_or(Position { segment: segments.first().copied().unwrap_or(1), offset: 0 });
        let mut wal = Wal { dir: dir.to_owned(), max_bytes: max_bytes.max(SEGMENT_BYTES * 2), segments, writer: None, writer_len: 0, delivered };
        // Segments entirely delivered before a crash can go.
        wal.remove_delivered()?;
        Ok(wal)
    }

    pub fn delivered(&self) -> Position {
        self.delivered
    }

    /// Bytes held on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().filter_map(|s| fs::metadata(segment_path(&self.dir, *s)).ok()).map(|m| m.len()).sum()
    }

    /// Appends one encoded request and makes it durable. Returns the samples dropped to stay
    /// within the bound (oldest first).
    pub fn append(&mut self, payload: &[u8], samples: u32) -> io::Result<u64> {
        self.append_all(&[(payload, samples)])
    }

    /// Appends encoded requests, one record each, and makes them durable with one sync.
    pub fn append_all(&mut self, records: &[(&[u8], u32)]) -> io::Result<u64> {
        for (payload, samples) in records {
            self.write_record(payload, *samples)?;
        }
        if let Some(writer) = self.writer.as_mut() {
            writer.sync_data()?;
        }
        self.enforce_bound()
    }

    fn write_record(&mut self, payload: &[u8], samples: u32) -> io::Result<()> {
        if self.writer.is_none() || self.writer_len >= SEGMENT_BYTES {
            if let Some(previous) = self.writer.as_mut() {
                previous.sync_data()?;
            }
            let next = self.segments.last().map_or(self.delivered.segment.max(1), |s| s + 1);
            let file = OpenOptions::new().create(true).append(true).open(segment_path(&self.dir, next))?;
            self.writer_len = file.metadata()?.len();
            self.writer = Some(file);
            if self.segments.last() != Some(&next) {
                self.segments.push(next);
            }
        }
        let Some(writer) = self.writer.as_mut() else { return Ok(()) };
        let mut header = [0u8; HEADER as usize];
        header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        header[8..12].copy_from_slice(&samples.to_le_bytes());
        writer.write_all(&header)?;
        writer.write_all(payload)?;
        self.writer_len += HEADER + payload.len() as u64;
        Ok(())
    }

    fn enforce_bound(&mut self) -> io::Result<u64> {
        let mut dropped = 0;
        while self.segments.len() > 1 && self.bytes() > self.max_bytes {
            let oldest = self.segments[0];
            let from = if oldest == self.delivered.segment { self.delivered.offset } else { 0 };
            if oldest >= self.delivered.segment {
                dropped += count_samples(&segment_path(&self.dir, oldest), from)?;
            }
            fs::remove_file(segment_path(&self.dir, oldest))?;
            self.segments.remove(0);
            if self.delivered.segment <= oldest {
                self.delivered = Position { segment: self.segments[0], offset: 0 };
                self.save_position()?;
            }
        }
        Ok(dropped)
    }

    /// Reads undelivered records from the delivered position: as many as fit in
    /// `max_samples`, and at least one.
    pub fn read(&self, max_samples: u64) -> io::Result<Batch> {
        let mut batch = Batch { body: Vec::new(), samples: 0, end: self.delivered };
        for &segment in self.segments.iter().filter(|&&s| s >= self.delivered.segment) {
            let path = segment_path(&self.dir, segment);
            let mut file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut offset = if segment == self.delivered.segment { self.delivered.offset } else { 0 };
            file.seek(SeekFrom::Start(offset))?;
            loop {
                if batch.samples >= max_samples {
                    return Ok(batch);
                }
                let mut header = [0u8; HEADER as usize];
                if read_full(&mut file, &mut header)? < header.len() {
                    break;
                }
                let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
                let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
                let samples = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
                if batch.samples > 0 && batch.samples + u64::from(samples) > max_samples {
                    return Ok(batch);
                }
                let start = batch.body.len();
                batch.body.resize(start + len, 0);
                if read_full(&mut file, &mut batch.body[start..])? < len || crc32fast::hash(&batch.body[start..]) != crc {
                    // A torn write at the end of the log (a crash mid-append): nothing after it.
                    batch.body.truncate(start);
                    break;
                }
                offset += HEADER + len as u64;
                batch.samples += u64::from(samples);
                batch.end = Position { segment, offset };
            }
            // Moving past a finished segment.
            if Some(&segment) != self.segments.last() {
                batch.end = Position { segment: segment + 1, offset: 0 };
            }
        }
        Ok(batch)
    }

    /// Records that everything before `position` was delivered, and drops what it covers.
    pub fn commit(&mut self, position: Position) -> io::Result<()> {
        self.delivered = position;
        self.save_position()?;
        self.remove_delivered()
    }

    fn save_position(&self) -> io::Result<()> {
        let tmp = self.dir.join("position.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&self.delivered).unwrap_or_default())?;
        file.sync_all()?;
        fs::rename(&tmp, self.dir.join("position"))
    }

    fn remove_delivered(&mut self) -> io::Result<()> {
        while let Some(&oldest) = self.segments.first() {
            if oldest >= self.delivered.segment || self.segments.len() == 1 && self.writer.is_some() {
                break;
            }
            fs::remove_file(segment_path(&self.dir, oldest))?;
            self.segments.remove(0);
        }
        Ok(())
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut read = 0;
    while read < buf.len() {
        match file.read(&mut buf[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(read)
}

/// Samples in a segment's records from `from` on.
fn count_samples(path: &Path, from: u64) -> io::Result<u64> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut total = 0;
    loop {
        let mut header = [0u8; HEADER as usize];
        if read_full(&mut file, &mut header)? < header.len() {
            return Ok(total);
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as i64;
        total += u64::from(u32::from_le_bytes([header[8], header[9], header[10], header[11]]));
        file.seek(SeekFrom::Current(len))?;
    }
}

#[cfg(test)]
mod tests {
    use super::super::prompb::{Label, Sample, TimeSeries, WriteRequest};
    use super::*;
    use prost::Message;

    fn request(value: f64) -> Vec<u8> {
        WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label { name: "__name__".into(), value: "x".into() }],
                samples: vec![Sample { value, timestamp: value as i64 }],
            }],
        }
        .encode_to_vec()
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("periscope-wal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn values(batch: &Batch) -> Vec<f64> {
        let request = WriteRequest::decode(batch.body.as_slice()).unwrap();
        request.timeseries.iter().flat_map(|t| t.samples.iter().map(|s| s.value)).collect()
    }

    #[test]
    fn appended_samples_survive_a_reopen_until_committed() {
        let dir = dir("reopen");
        let mut wal = Wal::open(&dir, 1 << 30).unwrap();
        for v in 0..5 {
            wal.append(&request(v as f64), 1).unwrap();
        }
        let first = wal.read(2).unwrap();
        assert_eq!(values(&first), [0.0, 1.0]);
        wal.commit(first.end).unwrap();
        drop(wal);
        let wal = Wal::open(&dir, 1 << 30).unwrap();
        let rest = wal.read(100).unwrap();
        assert_eq!(values(&rest), [2.0, 3.0, 4.0]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_read_stays_within_max_samples_but_takes_at_least_one_record() {
        let dir = dir("max");
        let mut wal = Wal::open(&dir, 1 << 30).unwrap();
        for v in 0..3 {
            wal.append(&request(v as f64), 3).unwrap();
        }
        let batch = wal.read(5).unwrap();
        assert_eq!((values(&batch), batch.samples), (vec![0.0], 3));
        let batch = wal.read(6).unwrap();
        assert_eq!((values(&batch), batch.samples), (vec![0.0, 1.0], 6));
        assert_eq!(wal.read(2).unwrap().samples, 3, "a record larger than the limit still goes");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_record_at_the_end_is_ignored() {
        let dir = dir("torn");
        let mut wal = Wal::open(&dir, 1 << 30).unwrap();
        wal.append(&request(1.0), 1).unwrap();
        drop(wal);
        let segment = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).find(|e| e.path().extension().is_some_and(|x| x == "wal")).unwrap();
        OpenOptions::new().append(true).open(segment.path()).unwrap().write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let wal = Wal::open(&dir, 1 << 30).unwrap();
        assert_eq!(values(&wal.read(100).unwrap()), [1.0]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn past_the_bound_the_oldest_segment_goes_and_is_counted() {
        let dir = dir("bound");
        let mut wal = Wal::open(&dir, 0).unwrap();
        // Each request about 1 MiB: the bound (two segments) is passed after ~16.
        let big = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label { name: "__name__".into(), value: "y".repeat(1 << 20) }],
                samples: vec![Sample { value: 1.0, timestamp: 1 }],
            }],
        }
        .encode_to_vec();
        let mut dropped = 0;
        for _ in 0..30 {
            dropped += wal.append(&big, 1).unwrap();
        }
        assert!(dropped > 0);
        assert!(wal.bytes() <= 2 * SEGMENT_BYTES + (2 << 20), "{}", wal.bytes());
        let remaining = wal.read(1000).unwrap().samples;
        assert_eq!(remaining + dropped, 30);
        fs::remove_dir_all(dir).unwrap();
    }
}
