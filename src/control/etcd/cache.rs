//! The last good snapshot on disk (`--cache-dir`): the document text, the overrides and the
//! etcd revision of every snapshot the etcd source publishes, so a gateway started while etcd
//! is down still serves. Written atomically: a temporary file, fsync, then rename.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::topology::Overrides;

/// What the cache holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedSnapshot {
    pub cluster: String,
    pub revision: u64,
    /// The topology document exactly as stored in etcd.
    pub document: String,
    pub overrides: Overrides,
    /// Unix seconds when it was written.
    pub written_at: u64,
}

/// One cluster's cache file in the cache directory.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    path: PathBuf,
}

impl SnapshotCache {
    pub fn new(dir: &Path, cluster: &str) -> SnapshotCache {
        SnapshotCache {
            path: dir.join(format!("etcd-snapshot-{cluster}.json")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached snapshot; `Ok(None)` when there is none yet.
    pub fn load(&self) -> Result<Option<CachedSnapshot>, String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: not a cached snapshot: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: cannot read: {e}", self.path.display())),
        }
    }

    /// Replaces the cache atomically: a reader (or a crash) sees the old file or the new one,
    /// never half of one.
    pub fn store(&self, snapshot: &CachedSnapshot) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or_else(|| Path::new("."));
        std::fs::create_dir_all(dir)?;
        let bytes = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            self.path
                .file_name()
                .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // The rename itself must reach the disk too, or a power loss could bring back the old
        // file; best effort, as not every file system lets a directory be synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn store_then_load_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(&dir.path().join("sub"), "demo");
        assert_eq!(cache.load().unwrap(), None);
        let mut snap = CachedSnapshot {
            cluster: "demo".into(),
            revision: 7,
            document: "cluster = \"demo\"\n".into(),
            overrides: Overrides::default(),
            written_at: 1,
        };
        cache.store(&snap).unwrap();
        assert_eq!(cache.load().unwrap(), Some(snap.clone()));
        snap.revision = 9;
        cache.store(&snap).unwrap();
        assert_eq!(cache.load().unwrap().unwrap().revision, 9);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::write(cache.path(), b"{not json").unwrap();
        assert!(cache.load().is_err());
    }
}
