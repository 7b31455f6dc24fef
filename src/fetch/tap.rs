//! Reading a blob while it downloads.
//!
//! A [`Tap`] is the meeting point of one download and one reader. The
//! download says where its partial file is and how many bytes of it are
//! written ([`Tap::begin`], [`Tap::wrote`]); the feed says how it ended
//! ([`Tap::finish`]: the blob's digest once it is verified and stored, or
//! the error). A [`TapReader`] reads the partial as it grows, waiting for
//! bytes that are not written yet, and reports the end of the blob only
//! after the download verified it: until then a reader has seen bytes, not
//! a blob, and must not conclude anything from them. If the object changes
//! in the bucket mid-download (the download restarts from byte 0), the tap
//! is broken: what a reader has consumed belongs to the old version, so it
//! gets an error, never the new bytes.
//!
//! Nothing here opens the database. Memory: the reader's caller chooses its
//! buffer; the tap holds a file handle and a few counters.

use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::blobstore::BlobDigest;
use crate::error::{Error, Kind, Result};
use crate::ops::direct::{BlockReader, Extent};

/// How a download ended, as its reader is told.
pub type Ending = std::result::Result<BlobDigest, (Kind, String)>;

/// One download, seen by whoever wants to read its bytes as they arrive.
pub struct Tap {
    key: String,
    size: u64,
    state: Mutex<TapState>,
    changed: Condvar,
}

#[derive(Default)]
struct TapState {
    /// A handle on the partial being written (set once the download opened
    /// it): the download may rename it into the store, or drop it, at any
    /// moment, and a reader reads the same file regardless. (Kept while the
    /// tap lives, the command's feed: a reader may come after the end. A
    /// dropped partial's space is freed with it.)
    file: Option<Arc<File>>,
    /// Bytes [0, written) of the partial hold the object's bytes.
    written: u64,
    /// The object changed mid-download: the partial was restarted.
    broken: bool,
    end: Option<Ending>,
}

/// What a reader waiting for a tap found.
pub enum Start {
    /// The download is writing its partial: read it with [`TapReader`].
    Streaming,
    /// The download ended (or never began: stored already, deduplicated,
    /// refused) before the reader came: use the blob store.
    Ended,
}

impl Tap {
    /// A tap for the object `key` of `size` bytes (as listed).
    pub fn new(key: &str, size: u64) -> Tap {
        Tap { key: key.to_string(), size, state: Mutex::new(TapState::default()), changed: Condvar::new() }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The object's size as listed (an estimate: the download goes by the
    /// size the server reports).
    pub fn size(&self) -> u64 {
        self.size
    }

    fn lock(&self) -> MutexGuard<'_, TapState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The download opened its partial (`file` is a handle on it), whose
    /// first `offset` bytes are already the object's (a resumed partial).
    pub fn begin(&self, file: File, offset: u64) {
        let mut st = self.lock();
        st.file = Some(Arc::new(file));
        st.written = offset;
        drop(st);
        self.changed.notify_all();
    }

    /// Bytes [0, pos) of the partial are written.
    pub fn wrote(&self, pos: u64) {
        let mut st = self.lock();
        if !st.broken {
            st.written = pos;
        }
        drop(st);
        self.changed.notify_all();
    }

    /// The object changed in the bucket and its download restarts: bytes a
    /// reader already took are of the old version. Called before the
    /// partial is truncated.
    pub fn restart(&self) {
        self.lock().broken = true;
        self.changed.notify_all();
    }

    /// Whether the download restarted because the object changed.
    pub fn restarted(&self) -> bool {
        self.lock().broken
    }

    /// How the download ended: the stored blob's digest, or why not. The
    /// first ending counts.
    pub fn finish(&self, end: Ending) {
        let mut st = self.lock();
        if st.end.is_none() {
            st.end = Some(end);
        }

        drop(st);
        self.changed.notify_all();
    }

    /// The ending, once there is one.
    pub fn ending(&self) -> Option<Ending> {
        self.lock().end.clone()
    }

    /// Wait until the download is writing its partial, or has ended.
    pub fn wait_start(&self) -> Result<Start> {
        let mut st = self.lock();
        loop {
            if st.end.is_some() {
                return Ok(Start::Ended);
            }
            if st.file.is_some() && !st.broken {
                return Ok(Start::Streaming);
            }
            crate::ops::signals::check()?;
            st = self.changed.wait_timeout(st, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Wait for the ending.
    pub fn wait_end(&self) -> Result<Ending> {
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.end {
                return Ok(e.clone());
            }
            crate::ops::signals::check()?;
            st = self.changed.wait_timeout(st, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Reads a tap's partial from byte 0 as it is written. It returns end of
/// file only once the download verified and stored the blob and every byte
/// of it was read; a failed, restarted or interrupted download is an
/// error (never a short blob).
pub struct TapReader<'a>(BlockReader<TapExtent<'a>, Arc<File>>);

/// What a [`TapReader`] may read: what the download has written.
struct TapExtent<'a> {
    tap: &'a Tap,
}

impl<'a> TapReader<'a> {
    /// Open the tap's partial ([`Tap::wait_start`] said it is streaming).
    /// It is read in aligned blocks, directly where the filesystem allows
    /// (the download writes it directly too: `crate::ops::direct`).
    pub fn open(tap: &'a Tap) -> Result<TapReader<'a>> {
        let st = tap.lock();
        let file = st.file.clone().ok_or_else(|| Error::software(format!("{}: tap not begun", tap.key)))?;
        drop(st);
        Ok(TapReader(BlockReader::new(TapExtent { tap }, file)))
    }
}

#[cfg(test)]
impl TapReader<'_> {
    fn direct_bytes(&self) -> u64 {
        self.0.direct_bytes()
    }
}

impl TapExtent<'_> {
    fn failure(&self, why: String) -> std::io::Error {
        std::io::Error::other(why)
    }

    /// The download restarted: the object changed in the bucket.
    fn changed(&self) -> std::io::Error {
        self.failure(format!("{} changed in the bucket while being unpacked from its download", self.tap.key))
    }
}

impl Extent for TapExtent<'_> {
    fn ready(&mut self, pos: u64) -> std::io::Result<Option<u64>> {
        let mut st = self.tap.lock();
        loop {
            if st.broken {
                return Err(self.changed());
            }
            if pos < st.written {
                return Ok(Some(st.written));
            }
            match &st.end {
                // Verified and stored, and every byte written was read
                // (the writer finished before the blob was verified).
                Some(Ok(_)) => return Ok(None),
                Some(Err((_, msg))) => {
                    return Err(self.failure(format!("downloading {}: {msg}", self.tap.key)));
                }
                None => {}
            }
            if let Some(sig) = crate::ops::signals::pending() {
                return Err(self.failure(format!("signal {sig} while reading {} as it downloads", self.tap.key)));
            }
            st = self.tap.changed.wait_timeout(st, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// A restart truncates the partial: what was read, and whatever a read
    /// racing with the truncation returned, belongs to the old version.
    fn check(&mut self) -> std::io::Result<()> {
        if self.tap.lock().broken {
            return Err(self.changed());
        }
        Ok(())
    }

    fn short(&self, _pos: u64) -> std::io::Error {
        self.failure(format!("{}: the partial download is shorter than the bytes reported written", self.tap.key))
    }
}

impl Read for TapReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::Arc;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("thinimg-tap-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a scratch dir");
        d
    }

    fn digest() -> BlobDigest {
        BlobDigest::parse(&"ab".repeat(32)).expect("a digest")
    }

    /// Write `data` into `path` in small pieces, telling `tap`, then end it.
    fn writer(tap: Arc<Tap>, path: PathBuf, data: Vec<u8>, end: Ending) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&path).expect("partial");
            tap.begin(std::fs::File::open(&path).expect("a reading handle"), 0);
            let mut pos = 0u64;
            for chunk in data.chunks(1000) {
                f.write_all(chunk).expect("write");
                pos += chunk.len() as u64;
                tap.wrote(pos);
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(Duration::from_millis(20));
            tap.finish(end);
        })
    }

    #[test]
    fn a_reader_follows_the_download_and_ends_only_when_it_is_verified() {
        let d = scratch("follow");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        let tap = Arc::new(Tap::new("k", data.len() as u64));
        let w = writer(tap.clone(), d.join("p"), data.clone(), Ok(digest()));
        assert!(matches!(tap.wait_start().unwrap(), Start::Streaming));
        let mut got = Vec::new();
        let mut r = TapReader::open(&tap).unwrap();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, data, "every byte, in order, and nothing before the ending");
        assert!(tap.ending().is_some(), "end of file only after the download ended");
        w.join().unwrap();
        // A reader that comes after the end (the partial renamed into the
        // store, or dropped) reads the same file.
        std::fs::remove_file(d.join("p")).unwrap();
        let mut again = Vec::new();
        TapReader::open(&tap).unwrap().read_to_end(&mut again).unwrap();
        assert!(again == data, "a late reader got other bytes");
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A download writes whole aligned buffers (directly) and sometimes a
    /// piece that is not one (a read cut short, the tail): the reader reads
    /// the aligned blocks directly too, and every byte in order.
    #[test]
    fn a_reader_reads_aligned_blocks_directly_as_they_are_written() {
        use crate::ops::direct::{AlignedBuf, DirectFile, ALIGN};
        let d = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("tap-direct-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("p");
        let pieces = [256 << 10, 1000, (256 << 10) - 1000, 3 * ALIGN, 256 << 10, 77];
        let total: usize = pieces.iter().sum();
        let data: Vec<u8> = (0..total).map(|i| (i * 13 + i / 4096) as u8).collect();
        let tap = Arc::new(Tap::new("k", total as u64));
        let (t2, p2, data2) = (tap.clone(), p.clone(), data.clone());
        let w = std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p2).unwrap();
            t2.begin(f.try_clone().unwrap(), 0);
            let f = DirectFile::new(f, true);
            let mut pos = 0usize;
            for n in pieces {
                let mut b = AlignedBuf::new(n);
                b.copy_from_slice(&data2[pos..pos + n]);
                f.write_all_at(&b, pos as u64).unwrap();
                pos += n;
                t2.wrote(pos as u64);
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(f.direct_bytes() > 0, "the writer never went direct");
            t2.finish(Ok(digest()));
        });
        assert!(matches!(tap.wait_start().unwrap(), Start::Streaming));
        let mut r = TapReader::open(&tap).unwrap();
        let mut got = Vec::new();
        let mut piece = vec![0u8; 512];
        loop {
            let n = r.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        w.join().unwrap();
        assert!(got == data, "bytes differ");
        assert!(r.direct_bytes() >= 512 << 10, "only {} bytes were read directly", r.direct_bytes());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_download_is_an_error_to_its_reader_never_a_short_blob() {
        let d = scratch("fail");
        let data = vec![1u8; 20_000];
        let tap = Arc::new(Tap::new("k", 40_000));
        let w = writer(tap.clone(), d.join("p"), data, Err((Kind::BadData, "ETag mismatch".into())));
        tap.wait_start().unwrap();
        let mut r = TapReader::open(&tap).unwrap();
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("ETag mismatch"), "{e}");
        w.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_restarted_download_breaks_its_reader() {
        let d = scratch("restart");
        let tap = Tap::new("k", 100);
        std::fs::write(d.join("p"), [7u8; 10]).unwrap();
        tap.begin(std::fs::File::open(d.join("p")).unwrap(), 0);
        tap.wrote(10);
        let mut r = TapReader::open(&tap).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        tap.restart();
        tap.wrote(10);
        assert!(r.read(&mut buf).unwrap_err().to_string().contains("changed in the bucket"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_download_that_ends_before_it_begins_is_not_streamed() {
        let tap = Tap::new("k", 1);
        tap.finish(Ok(digest()));
        tap.finish(Err((Kind::Io, "later".into())));
        assert!(matches!(tap.wait_start().unwrap(), Start::Ended));
        assert!(matches!(tap.ending(), Some(Ok(_))), "the first ending counts");
    }
}
