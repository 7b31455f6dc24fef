//! The content-addressed blob store: where verified blobs live on disk.
//!
//! Owns `<state-dir>/blobs/sha256/<hex>` (complete blobs, named only by
//! their SHA-256) and `<state-dir>/blobs/partial/<id>.partial` (downloads
//! in progress, named by a database id, never by a key). Files move from
//! `partial/` into `sha256/` only by an atomic rename with both directories
//! fsynced ([`BlobStore::install`]); the download that fills a partial is in
//! [`super::download`]. It never opens the database and never talks to the
//! network. Nothing outside the two directories is ever written.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

/// A SHA-256 digest as 64 lower-case hex digits: the name of a blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlobDigest(String);

impl TryFrom<String> for BlobDigest {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<BlobDigest, String> {
        BlobDigest::parse(&s).map_err(|e| e.message().to_string())
    }
}

impl From<BlobDigest> for String {
    fn from(d: BlobDigest) -> String {
        d.0
    }
}

impl BlobDigest {
    pub fn parse(s: &str) -> Result<BlobDigest> {
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(BlobDigest(s.to_string()))
        } else {
            Err(Error::software(format!("{s:?} is not a SHA-256 hex digest")))
        }
    }
    pub(super) fn from_hasher(h: Sha256) -> BlobDigest {
        BlobDigest(crate::ops::encode::hex(&h.finalize()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Space on the state filesystem, for `fetch` (checked before downloading)
/// and for `status`/`doctor`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    /// Bytes an unprivileged writer may still use on the filesystem.
    pub free: u64,
    /// Bytes held by partial downloads.
    pub partial_bytes: u64,
    pub partial_files: u64,
}

pub struct BlobStore {
    root: PathBuf,
}

fn sync_dir(p: &Path) -> Result<()> {
    File::open(p).and_then(|f| f.sync_all()).ctx(|| format!("fsync directory {}", p.display()))
}

impl BlobStore {
    /// Open (creating the directories of) the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<BlobStore> {
        let root = state_dir.join("blobs");
        for d in [root.join("sha256"), root.join("partial")] {
            std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        Ok(BlobStore { root })
    }

    /// The store as it is, for read-only callers; nothing is created.
    pub fn at(state_dir: &Path) -> BlobStore {
        BlobStore { root: state_dir.join("blobs") }
    }

    /// `<state-dir>/blobs`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Free space on the store's filesystem and the partial downloads in it.
    /// Works on a store that does not exist yet (measures the nearest
    /// existing parent).
    pub fn space(&self) -> Result<Space> {
        let mut probe: &Path = &self.root;
        while !probe.exists() {
            match probe.parent() {
                Some(p) => probe = p,
                None => break,
            }
        }
        let st = nix::sys::statvfs::statvfs(probe)
            .map_err(|e| Error::io(format!("statvfs {}", probe.display()), std::io::Error::from(e)))?;
        // fsblkcnt_t and c_ulong are narrower than u64 on some targets.
        #[allow(clippy::useless_conversion)]
        let free = u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size()));
        let mut space = Space { free, ..Space::default() };
        if let Ok(rd) = std::fs::read_dir(self.root.join("partial")) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        space.partial_files += 1;
                        space.partial_bytes += m.len();
                    }
                }
            }
        }
        Ok(space)
    }

    pub fn blob_path(&self, d: &BlobDigest) -> PathBuf {
        self.root.join("sha256").join(d.as_str())
    }

    pub(super) fn partial_path(&self, name: &str) -> Result<PathBuf> {
        let ok =
            name.strip_suffix(".partial").is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(Error::software(format!("partial download name {name:?} is not <id>.partial")));
        }
        Ok(self.root.join("partial").join(name))
    }

    /// Whether the blob file exists as a regular file of `size` bytes (the
    /// cheap check done before every use; see [`BlobStore::verify`]).
    pub fn size_ok(&self, d: &BlobDigest, size: u64) -> Result<bool> {
        match std::fs::symlink_metadata(self.blob_path(d)) {
            Ok(m) => Ok(m.file_type().is_file() && m.len() == size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("stat blob {d}"), e)),
        }
    }

    /// Re-hash a stored blob. A blob whose content no longer matches its
    /// name is removed (the caller marks it missing so it is fetched again);
    /// returns whether it is intact.
    pub fn verify(&self, d: &BlobDigest) -> Result<bool> {
        let p = self.blob_path(d);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(format!("opening blob {}", p.display()), e)),
        };
        let (h, _) = hash_reader(f, u64::MAX, None).ctx(|| format!("reading blob {}", p.display()))?;
        if BlobDigest::from_hasher(h) == *d {
            return Ok(true);
        }
        log::warn!("blob {d} is corrupt (content does not hash to its name); removing it");
        remove_if_exists(&p)?;
        sync_dir(&self.root.join("sha256"))?;
        Ok(false)
    }

    /// Remove a blob file (corrupt or unwanted). Missing is fine.
    pub fn remove_blob(&self, d: &BlobDigest) -> Result<()> {
        remove_if_exists(&self.blob_path(d))
    }

    /// Bytes in a partial download (0 if it is gone or misnamed).
    pub fn partial_len(&self, name: &str) -> u64 {
        self.partial_path(name).ok().and_then(|p| std::fs::symlink_metadata(p).ok()).map(|m| m.len()).unwrap_or(0)
    }

    pub fn remove_partial(&self, name: &str) -> Result<()> {
        remove_if_exists(&self.partial_path(name)?)
    }

    /// Remove partial files that no download row names (left by a crash
    /// between creating the file and recording it, or by a restart).
    pub fn remove_stale_partials(&self, keep: &std::collections::HashSet<String>) -> Result<u64> {
        let dir = self.root.join("partial");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).ctx(|| format!("reading {}", dir.display()))? {
            let e = e.ctx(|| format!("reading {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) && self.partial_path(&name).is_ok() {
                remove_if_exists(&e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Finish a download that a crash interrupted after it was verified:
    /// the blob is in place (true), or the complete partial still hashes to
    /// `digest` and is renamed now (true), or the work must be redone (false).
    pub fn adopt_verified(&self, partial: &str, d: &BlobDigest, size: u64) -> Result<bool> {
        let pp = self.partial_path(partial)?;
        if self.size_ok(d, size)? {
            remove_if_exists(&pp)?;
            return Ok(true);
        }
        let f = match File::open(&pp) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(format!("opening {}", pp.display()), e)),
        };
        let (h, n) = hash_reader(f, u64::MAX, None).ctx(|| format!("reading {}", pp.display()))?;
        if n != size || BlobDigest::from_hasher(h) != *d {
            return Ok(false);
        }
        self.install(&pp, d)?;
        Ok(true)
    }

    pub(super) fn install(&self, partial: &Path, d: &BlobDigest) -> Result<()> {
        let dst = self.blob_path(d);
        std::fs::rename(partial, &dst).ctx(|| format!("renaming {} to {}", partial.display(), dst.display()))?;
        sync_dir(&self.root.join("sha256"))?;
        sync_dir(&self.root.join("partial"))
    }
}

/// Hash up to `limit` bytes of `r`, keeping its first 512 bytes in `head`.
pub(super) fn hash_reader(r: impl Read, limit: u64, head: Option<&mut Vec<u8>>) -> std::io::Result<(Sha256, u64)> {
    let mut h = Sha256::new();
    let n = read_prefix(r, limit, head, |b| h.update(b))?;
    Ok((h, n))
}

/// Read up to `limit` bytes of `r` in 1 MiB pieces, handing each to `each`
/// and keeping the first 512 bytes in `head`; returns the bytes read.
pub(super) fn read_prefix(
    mut r: impl Read,
    limit: u64,
    mut head: Option<&mut Vec<u8>>,
    mut each: impl FnMut(&[u8]),
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    while n < limit {
        let want = (limit - n).min(buf.len() as u64) as usize;
        let got = match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if let Some(hd) = head.as_deref_mut() {
            let take = (512 - hd.len().min(512)).min(got);
            hd.extend_from_slice(&buf[..take]);
        }
        each(&buf[..got]);
        n += got as u64;
    }
    Ok(n)
}

pub(super) fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_partial_names_are_validated() {
        assert!(BlobDigest::parse(&"a".repeat(64)).is_ok());
        assert!(BlobDigest::parse(&"A".repeat(64)).is_err());
        assert!(BlobDigest::parse("../x").is_err());
        let s = BlobStore::at(Path::new("/nonexistent"));
        assert!(s.partial_path("12.partial").is_ok());
        assert!(s.partial_path("../12.partial").is_err());
        assert!(s.partial_path(".partial").is_err());
    }

    #[test]
    fn verify_removes_a_corrupt_blob() {
        let dir = std::env::temp_dir().join(format!("thinimg-blobs-{}", std::process::id()));
        let s = BlobStore::open(&dir).unwrap();
        let mut h = Sha256::new();
        h.update(b"hello");
        let d = BlobDigest::from_hasher(h);
        std::fs::write(s.blob_path(&d), b"hello").unwrap();
        assert!(s.verify(&d).unwrap());
        assert!(s.size_ok(&d, 5).unwrap());
        std::fs::write(s.blob_path(&d), b"hellO").unwrap();
        assert!(s.size_ok(&d, 5).unwrap(), "same size: only a re-hash notices");
        assert!(!s.verify(&d).unwrap());
        assert!(!s.blob_path(&d).exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
