//! Reading one file: bytes to lines (cut at a maximum length, invalid UTF-8 replaced), lines
//! to entries (runtime envelopes removed, partial lines joined, multiline entries grouped).
//!
//! Every entry carries the file offset just past its last line, so the source knows how far
//! the file is delivered once the entry is acknowledged.

use regex::Regex;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use super::parse::{self, Unwrapped};
use crate::config::LogFormatKind;

/// A line as read, with the offset just past its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    /// The offset of its first byte.
    pub start: u64,
    pub end: u64,
}

/// Splits a file's bytes into lines.
pub struct LineReader {
    buf: Vec<u8>,
    /// The file offset of `buf[0]`.
    buf_start: u64,
    /// Dropping the rest of a line that was cut at `max_line`.
    skipping: bool,
    max_line: usize,
    chunk: Vec<u8>,
}

/// What one read produced.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: u64,
    pub truncated: u64,
}

impl LineReader {
    pub fn new(offset: u64, max_line: usize) -> Self {
        LineReader { buf: Vec::new(), buf_start: offset, skipping: false, max_line: max_line.max(1), chunk: vec![0; 64 * 1024] }
    }

    /// Where the next read continues: past everything read, including an unfinished line.
    pub fn read_offset(&self) -> u64 {
        self.buf_start + self.buf.len() as u64
    }

    /// Starts over at `offset`, forgetting what was buffered.
    pub fn reset(&mut self, offset: u64) {
        self.buf.clear();
        self.buf_start = offset;
        self.skipping = false;
    }

    /// Reads up to one chunk from `file` and appends the complete lines to `out`.
    pub fn read(&mut self, file: &mut File, out: &mut Vec<Line>) -> io::Result<Progress> {
        file.seek(SeekFrom::Start(self.read_offset()))?;
        let n = file.read(&mut self.chunk)?;
        let mut result = Progress { bytes: n as u64, truncated: 0 };
        if n == 0 {
            return Ok(result);
        }
        let mut start = 0;
        let chunk_start = self.read_offset();
        for i in 0..n {
            if self.chunk[i] != b'\n' {
                continue;
            }
            let piece = &self.chunk[start..i];
            let end = chunk_start + i as u64 + 1;
            if self.skipping {
                self.skipping = false;
            } else {
                self.buf.extend_from_slice(piece);
                out.push(Line { text: text(&self.buf), start: self.buf_start, end });
            }
            self.buf.clear();
            self.buf_start = end;
            start = i + 1;
        }
        if start < n {
            if !self.skipping {
                self.buf.extend_from_slice(&self.chunk[start..n]);
            } else {
                self.buf_start += (n - start) as u64;
            }
        }
        // A line longer than the limit is cut there (at a character boundary); the rest of it
        // is skipped.
        if !self.skipping && self.buf.len() > self.max_line {
            let end = self.read_offset();
            let mut cut = self.max_line;
            while cut > 0 && (self.buf[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            self.buf.truncate(cut);
            out.push(Line { text: text(&self.buf), start: self.buf_start, end });
            self.buf.clear();
            self.buf_start = end;
            self.skipping = true;
            result.truncated += 1;
        }
        // Lines completed in this chunk but longer than the limit.
        for line in out.iter_mut() {
            if line.text.len() > self.max_line {
                let mut cut = self.max_line;
                while !line.text.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.text.truncate(cut);
                result.truncated += 1;
            }
        }
        Ok(result)
    }

    /// At the end of a file that will not grow again: its unfinished last line, if any.
    pub fn finish(&mut self) -> Option<Line> {
        if self.buf.is_empty() || self.skipping {
            return None;
        }
        let end = self.read_offset();
        let line = Line { text: text(&self.buf), start: self.buf_start, end };
        self.buf.clear();
        self.buf_start = end;
        Some(line)
    }
}

/// Bytes as text, invalid UTF-8 replaced; a trailing `\r` dropped.
fn text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(bytes).into_owned()
}

/// One log entry, ready to become a log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub message: String,
    pub time: Option<u64>,
    pub stream: Option<&'static str>,
    /// The offset of its first line.
    pub start: u64,
    /// The offset just past the entry's last line.
    pub end: u64,
    /// Part of it was cut to stay within the maximum size.
    pub cut: bool,
}

struct Pending {
    entry: Entry,
    lines: usize,
    since: Instant,
}

/// Turns lines into entries: envelope, partial lines, multiline grouping.
pub struct Joiner {
    format: LogFormatKind,
    start_pattern: Option<Regex>,
    max_lines: usize,
    timeout: Duration,
    max_bytes: usize,
    /// Pieces of a line the runtime split (CRI `P`, Docker without newline), per stream:
    /// stdout, stderr, unnamed.
    partial: [Option<Entry>; 3],
    pending: Option<Pending>,
}

fn stream_slot(stream: Option<&'static str>) -> usize {
    match stream {
        Some("stdout") => 0,
        Some("stderr") => 1,
        _ => 2,
    }
}

impl Joiner {
    pub fn new(format: LogFormatKind, start_pattern: Option<Regex>, max_lines: usize, timeout: Duration, max_bytes: usize) -> Self {
        Joiner {
            format,
            start_pattern,
            max_lines: max_lines.max(1),
            timeout,
            max_bytes,
            partial: [None, None, None],
            pending: None,
        }
    }

    /// Forgets everything held (the file is read again from an earlier offset).
    pub fn reset(&mut self) {
        self.partial = [None, None, None];
        self.pending = None;
    }

    /// Where the earliest line still held (not yet part of an emitted entry) starts: the
    /// file is delivered at most up to here.
    pub fn held_from(&self) -> Option<u64> {
        self.partial.iter().flatten().map(|p| p.start).chain(self.pending.as_ref().map(|p| p.entry.start)).min()
    }

    pub fn push(&mut self, line: Line, now: Instant, out: &mut Vec<Entry>) {
        let Unwrapped { message, time, stream, partial } = parse::unwrap(self.format, &line.text);
        let piece = Entry { message, time, stream, start: line.start, end: line.end, cut: false };
        let slot = stream_slot(stream);
        if partial {
            match &mut self.partial[slot] {
                Some(held) => {
                    held.cut |= append(&mut held.message, &piece.message, "", self.max_bytes);
                    held.end = piece.end;
                }
                None => self.partial[slot] = Some(piece),
            }
            return;
        }
        let whole = match self.partial[slot].take() {
            Some(mut held) => {
                held.cut |= append(&mut held.message, &piece.message, "", self.max_bytes);
                held.end = piece.end;
                held
            }
            None => piece,
        };
        self.group(whole, now, out);
    }

    fn group(&mut self, entry: Entry, now: Instant, out: &mut Vec<Entry>) {
        let Some(pattern) = &self.start_pattern else {
            out.push(entry);
            return;
        };
        let starts = pattern.is_match(&entry.message);
        match &mut self.pending {
            Some(pending) if !starts => {
                pending.entry.cut |= append(&mut pending.entry.message, &entry.message, "\n", self.max_bytes);
                pending.entry.end = entry.end;
                pending.lines += 1;
                pending.since = now;
                if pending.lines >= self.max_lines {
                    if let Some(done) = self.pending.take() {
                        out.push(done.entry);
                    }
                }
            }
            _ => {
                if let Some(done) = self.pending.take() {
                    out.push(done.entry);
                }
                if self.max_lines == 1 {
                    out.push(entry);
                } else {
                    self.pending = Some(Pending { entry, lines: 1, since: now });
                }
            }
        }
    }

    /// Emits a multiline entry that has waited `timeout` for more lines.
    pub fn flush_due(&mut self, now: Instant, out: &mut Vec<Entry>) {
        if self.pending.as_ref().is_some_and(|p| now.duration_since(p.since) >= self.timeout) {
            if let Some(done) = self.pending.take() {
                out.push(done.entry);
            }
        }
    }

    /// Emits everything held (the file ended for good).
    pub fn flush_all(&mut self, out: &mut Vec<Entry>) {
        let mut partials: Vec<Entry> = self.partial.iter_mut().filter_map(Option::take).collect();
        partials.sort_by_key(|p| p.start);
        for partial in partials {
            self.group(partial, Instant::now(), out);
        }
        if let Some(done) = self.pending.take() {
            out.push(done.entry);
        }
    }
}

/// Appends `more` after `separator` within `max_bytes`; returns whether anything was left out.
fn append(message: &mut String, more: &str, separator: &str, max_bytes: usize) -> bool {
    if message.len() >= max_bytes {
        return !(more.is_empty() && separator.is_empty());
    }
    message.push_str(separator);
    message.push_str(more);
    if message.len() > max_bytes {
        let mut cut = max_bytes;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, content: &[u8]) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("periscope-tailer-{name}-{}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        let file = File::open(&path).unwrap();
        (path, file)
    }

    fn lines(reader: &mut LineReader, file: &mut File) -> Vec<Line> {
        let mut out = Vec::new();
        while reader.read(file, &mut out).unwrap().bytes > 0 {}
        out
    }

    #[test]
    fn lines_carry_the_offset_past_their_newline_and_wait_for_their_end() {
        let (path, mut file) = temp_file("offsets", b"one\r\ntwo\nthr");
        let mut reader = LineReader::new(0, 1024);
        let got = lines(&mut reader, &mut file);
        assert_eq!(got, vec![Line { text: "one".into(), start: 0, end: 5 }, Line { text: "two".into(), start: 5, end: 9 }]);
        assert_eq!(reader.read_offset(), 12);
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"ee\n").unwrap();
        assert_eq!(lines(&mut reader, &mut file), vec![Line { text: "three".into(), start: 9, end: 15 }]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn long_lines_are_cut_and_invalid_utf8_replaced() {
        let mut content = vec![b'a'; 100];
        content.push(b'\n');
        content.extend_from_slice(b"ok \xff\xfe\n");
        let (path, mut file) = temp_file("long", &content);
        let mut reader = LineReader::new(0, 10);
        let mut out = Vec::new();
        let read = reader.read(&mut file, &mut out).unwrap();
        assert_eq!(read.truncated, 1);
        assert_eq!(out[0], Line { text: "a".repeat(10), start: 0, end: 101 });
        assert_eq!(out[1].text, "ok \u{fffd}\u{fffd}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_line_longer_than_a_read_is_cut_once_and_its_rest_skipped() {
        let mut content = vec![b'x'; 200 * 1024];
        content.extend_from_slice(b"\nnext\n");
        let (path, mut file) = temp_file("huge", &content);
        let mut reader = LineReader::new(0, 1000);
        let got = lines(&mut reader, &mut file);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].text.len(), 1000);
        assert_eq!(got[1], Line { text: "next".into(), start: content.len() as u64 - 5, end: content.len() as u64 });
        std::fs::remove_file(path).unwrap();
    }

    fn joiner(format: LogFormatKind, pattern: Option<&str>) -> Joiner {
        Joiner::new(format, pattern.map(|p| Regex::new(p).unwrap()), 500, Duration::from_secs(1), 1 << 20)
    }

    fn push_all(joiner: &mut Joiner, texts: &[&str]) -> Vec<Entry> {
        let mut out = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            joiner.push(Line { text: (*text).into(), start: i as u64 * 100, end: (i as u64 + 1) * 100 }, Instant::now(), &mut out);
        }
        out
    }

    #[test]
    fn cri_partial_lines_are_joined_until_the_full_one() {
        let mut j = joiner(LogFormatKind::Cri, None);
        let out = push_all(
            &mut j,
            &[
                "2024-01-01T00:00:00.000000001Z stdout P first ",
                "2024-01-01T00:00:00.000000002Z stdout P second ",
                "2024-01-01T00:00:00.000000003Z stdout F third",
                "2024-01-01T00:00:00.000000004Z stderr F alone",
            ],
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].message, "first second third");
        assert_eq!(out[0].end, 300);
        assert_eq!(out[0].stream, Some("stdout"));
        assert_eq!(out[1].message, "alone");
        assert_eq!(out[1].stream, Some("stderr"));
    }

    #[test]
    fn a_stack_trace_is_one_entry() {
        let mut j = joiner(LogFormatKind::Plain, Some(r"^\d{4}-"));
        let mut out = push_all(
            &mut j,
            &[
                "2024-01-01 ERROR boom",
                "java.lang.IllegalStateException: x",
                "\tat a.b(C.java:1)",
                "2024-01-01 INFO next",
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].message, "2024-01-01 ERROR boom\njava.lang.IllegalStateException: x\n\tat a.b(C.java:1)");
        assert_eq!(out[0].end, 300);
        assert_eq!(j.held_from(), Some(300), "the last entry waits for more lines");
        j.flush_due(Instant::now() + Duration::from_secs(2), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(j.held_from(), None);
    }

    #[test]
    fn partial_lines_are_joined_per_stream() {
        let mut j = joiner(LogFormatKind::Cri, None);
        let out = push_all(
            &mut j,
            &[
                "2024-01-01T00:00:00.000000001Z stdout P a long line, ",
                "2024-01-01T00:00:00.000000002Z stderr F a warning",
                "2024-01-01T00:00:00.000000003Z stdout F continued",
            ],
        );
        let got: Vec<(&str, Option<&str>, u64)> = out.iter().map(|e| (e.message.as_str(), e.stream, e.start)).collect();
        assert_eq!(got, [("a warning", Some("stderr"), 100), ("a long line, continued", Some("stdout"), 0)]);
    }

    #[test]
    fn a_cut_inside_a_multibyte_character_is_at_a_boundary_and_counted_once() {
        let mut content = "€".repeat(1000).into_bytes();
        content.push(b'\n');
        let (path, mut file) = temp_file("euro", &content);
        let mut reader = LineReader::new(0, 100);
        let mut out = Vec::new();
        let mut truncated = 0;
        loop {
            let read = reader.read(&mut file, &mut out).unwrap();
            truncated += read.truncated;
            if read.bytes == 0 {
                break;
            }
        }
        assert_eq!(truncated, 1);
        assert_eq!(out[0].text, "€".repeat(33));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn joined_entries_cut_at_the_limit_are_counted() {
        let mut j = Joiner::new(LogFormatKind::Cri, None, 500, Duration::from_secs(1), 10);
        let out = push_all(
            &mut j,
            &["2024-01-01T00:00:00.000000001Z stdout P 123456", "2024-01-01T00:00:00.000000002Z stdout F 789abc"],
        );
        assert_eq!(out[0].message, "123456789a");
        assert!(out[0].cut);
    }

    #[test]
    fn multiline_entries_stop_at_max_lines() {
        let mut j = Joiner::new(LogFormatKind::Plain, Some(Regex::new("^start").unwrap()), 3, Duration::from_secs(1), 1 << 20);
        let out = push_all(&mut j, &["start", "a", "b", "c", "d"]);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].message, "start\na\nb");
    }
}
