//! Where each file was read to, as far as Loki acknowledged it, kept under `data_dir`.
//!
//! A file is known by its device and inode, checked against a checksum of its first bytes
//! (so that a re-used inode holding another file is not mistaken for the old one). The store
//! is one JSON file, replaced atomically (write a temporary file, fsync, rename, fsync the
//! directory): a crash at any moment leaves either the old or the new checkpoints.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// How many leading bytes identify a file's content.
pub const HEAD_BYTES: u64 = 256;

/// A file's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

/// The checksum of a file's first bytes and how many bytes it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub crc: u32,
    pub len: u64,
}

impl Head {
    /// The head of `file` over at most `HEAD_BYTES` (or exactly `len` bytes when given).
    pub fn read(file: &mut File, len: Option<u64>) -> io::Result<Head> {
        use std::io::Seek;
        let want = len.unwrap_or(HEAD_BYTES);
        let mut bytes = Vec::with_capacity(want as usize);
        file.seek(io::SeekFrom::Start(0))?;
        file.take(want).read_to_end(&mut bytes)?;
        Ok(Head { crc: crc32fast::hash(&bytes), len: bytes.len() as u64 })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub key: FileKey,
    pub head: Head,
    /// Everything before this offset was delivered.
    pub offset: u64,
    /// The path the file was last seen at, for people reading the store.
    pub path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    files: Vec<Checkpoint>,
}

pub struct Checkpoints {
    path: PathBuf,
    entries: HashMap<FileKey, Checkpoint>,
    dirty: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot create {dir}: {source}")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a checkpoint file ({source}); move it away to start over")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

impl Checkpoints {
    /// Loads the store in `dir` (created if missing); no file yet means no checkpoints.
    pub fn load(dir: &Path) -> Result<Checkpoints, CheckpointError> {
        fs::create_dir_all(dir).map_err(|source| CheckpointError::Dir { dir: dir.to_owned(), source })?;
        let path = dir.join("files.json");
        let entries = match fs::read(&path) {
            Ok(bytes) => {
                let stored: Stored = serde_json::from_slice(&bytes)
                    .map_err(|source| CheckpointError::Corrupt { path: path.clone(), source })?;
                stored.files.into_iter().map(|c| (c.key, c)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(source) => return Err(CheckpointError::Read { path, source }),
        };
        Ok(Checkpoints { path, entries, dirty: false })
    }

    pub fn get(&self, key: FileKey) -> Option<&Checkpoint> {
        self.entries.get(&key)
    }

    pub fn set(&mut self, checkpoint: Checkpoint) {
        if self.entries.get(&checkpoint.key) != Some(&checkpoint) {
            self.entries.insert(checkpoint.key, checkpoint);
            self.dirty = true;
        }
    }

    pub fn remove(&mut self, key: FileKey) {
        if self.entries.remove(&key).is_some() {
            self.dirty = true;
        }
    }

    pub fn keys(&self) -> Vec<FileKey> {
        self.entries.keys().copied().collect()
    }

    /// Writes the store if anything changed since the last save.
    pub fn save(&mut self) -> Result<(), CheckpointError> {
        if !self.dirty {
            return Ok(());
        }
        let mut files: Vec<Checkpoint> = self.entries.values().cloned().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let body = serde_json::to_vec_pretty(&Stored { version: 1, files }).unwrap_or_default();
        let tmp = self.path.with_extension("json.tmp");
        let write = |path: &Path| -> io::Result<()> {
            let mut file = File::create(path)?;
            file.write_all(&body)?;
            file.sync_all()
        };
        write(&tmp).map_err(|source| CheckpointError::Write { path: tmp.clone(), source })?;
        fs::rename(&tmp, &self.path).map_err(|source| CheckpointError::Write { path: self.path.clone(), source })?;
        if let Some(dir) = self.path.parent() {
            // Makes the rename itself durable.
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("periscope-checkpoint-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn checkpoints_survive_a_reload() {
        let dir = temp_dir("reload");
        let mut store = Checkpoints::load(&dir).unwrap();
        let key = FileKey { dev: 1, ino: 2 };
        store.set(Checkpoint { key, head: Head { crc: 3, len: 256 }, offset: 4096, path: "/var/log/a.log".into() });
        store.save().unwrap();
        let store = Checkpoints::load(&dir).unwrap();
        assert_eq!(store.get(key).map(|c| c.offset), Some(4096));
        assert!(!dir.join("files.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_store_is_an_error_naming_the_file() {
        let dir = temp_dir("corrupt");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("files.json"), b"{not json").unwrap();
        let Err(error) = Checkpoints::load(&dir) else { panic!("loaded a corrupt store") };
        assert!(error.to_string().contains("files.json is not a checkpoint file"), "{error}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
