//! Profiles kept from continuous capture, under `data_dir/profiles`: the newest ones within a
//! size bound, each as `<id>.pb.gz` with a `<id>.json` beside it saying what it is. The store
//! is read back at start, so what was kept survives a restart.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What the list of profiles says about one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileMeta {
    pub id: String,
    pub target: String,
    pub node: String,
    pub service: String,
    /// RFC 3339.
    pub start: String,
    pub duration_seconds: u64,
    pub samples: u64,
    pub size: u64,
}

pub struct ProfileStore {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first.
    entries: Mutex<Vec<ProfileMeta>>,
}

impl ProfileStore {
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<ProfileStore> {
        fs::create_dir_all(dir)?;
        let mut entries: Vec<ProfileMeta> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .filter(|m: &ProfileMeta| dir.join(format!("{}.pb.gz", m.id)).exists())
            .collect();
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(ProfileStore { dir: dir.to_owned(), max_bytes, entries: Mutex::new(entries) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ProfileMeta>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Newest first.
    pub fn list(&self) -> Vec<ProfileMeta> {
        let mut all = self.lock().clone();
        all.reverse();
        all
    }

    pub fn read(&self, id: &str) -> Option<Vec<u8>> {
        let known = self.lock().iter().any(|m| m.id == id);
        if !known {
            return None;
        }
        fs::read(self.dir.join(format!("{id}.pb.gz"))).ok()
    }

    /// Keeps a profile, dropping the oldest ones past the size bound.
    pub fn save(&self, meta: ProfileMeta, body: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{}.tmp", meta.id));
        fs::write(&tmp, body)?;
        fs::rename(&tmp, self.dir.join(format!("{}.pb.gz", meta.id)))?;
        fs::write(self.dir.join(format!("{}.json", meta.id)), serde_json::to_vec(&meta).unwrap_or_default())?;
        let mut entries = self.lock();
        entries.push(meta);
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        while entries.len() > 1 && entries.iter().map(|m| m.size).sum::<u64>() > self.max_bytes {
            let old = entries.remove(0);
            let _ = fs::remove_file(self.dir.join(format!("{}.pb.gz", old.id)));
            let _ = fs::remove_file(self.dir.join(format!("{}.json", old.id)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, size: u64) -> ProfileMeta {
        ProfileMeta {
            id: id.into(),
            target: "feed".into(),
            node: "n".into(),
            service: "feed".into(),
            start: "2026-01-01T00:00:00Z".into(),
            duration_seconds: 10,
            samples: 5,
            size,
        }
    }

    #[test]
    fn the_newest_profiles_are_kept_within_the_bound_across_reopens() {
        let dir = std::env::temp_dir().join(format!("periscope-profiles-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = ProfileStore::open(&dir, 250).unwrap();
        for i in 0..5 {
            store.save(meta(&format!("{i:020}-feed"), 100), &[1; 100]).unwrap();
        }
        let ids: Vec<String> = store.list().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, [format!("{:020}-feed", 4), format!("{:020}-feed", 3)]);
        drop(store);
        let store = ProfileStore::open(&dir, 250).unwrap();
        assert_eq!(store.list().len(), 2);
        assert_eq!(store.read(&format!("{:020}-feed", 4)).unwrap(), vec![1; 100]);
        assert!(store.read(&format!("{:020}-feed", 0)).is_none());
        fs::remove_dir_all(dir).unwrap();
    }
}
