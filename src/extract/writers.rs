//! The bounded file writers: a fixed set of threads that write file
//! data for the tar reader (`Writers`; the extract module's only thread pool).
//!
//! The tar stream is read once, by one thread; file bytes are written by a
//! fixed number of workers. In-flight memory is bounded: chunks are at most
//! [`CHUNK`] bytes, at most [`MAX_BUFFERS`] of them exist whatever `--jobs`
//! says (the reader waits for a free one), and buffers are recycled. Each chunk is written at its offset (`pwrite`) into a file
//! already created and opened by the reader, so a later entry that replaces
//! or removes the path cannot redirect a pending write: it goes to the inode
//! the entry created. A file's metadata (owner, xattrs, mode, times) is
//! applied by whichever thread finishes its last chunk, after all its data.
//! The writers never resolve a path. Files of at most 32 KiB are written by
//! the reader itself (see `Applier::small_file`): for them the hand-off
//! costs more than the write.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::root::{apply_meta_fd, Meta};
use crate::error::{Error, Result};
use crate::ops::direct::{AlignedBuf, DirectFile};

pub const CHUNK: usize = 256 * 1024;

/// Chunk buffers in existence at most (16 MiB of file data in flight).
pub const MAX_BUFFERS: usize = 64;

/// A file whose data is being written.
pub struct PendingFile {
    /// Whole aligned blocks of a chunk go past the page cache
    /// (`ops::direct`): the unpacked bytes are not read back by this
    /// process, and a page-cache write costs a zeroed page and a copy.
    file: DirectFile<File>,
    meta: Meta,
    name: String,
    /// Chunks not yet written, plus one while the reader may still send.
    outstanding: AtomicUsize,
}

impl PendingFile {
    /// `whole_chunks`: some of its data will come as whole [`CHUNK`]s (the
    /// ones written directly), worth a second open of the file.
    pub fn new(file: File, meta: Meta, name: String, whole_chunks: bool) -> Arc<PendingFile> {
        let file = if whole_chunks { DirectFile::new(file, true) } else { DirectFile::cached(file) };
        Arc::new(PendingFile { file, meta, name, outstanding: AtomicUsize::new(1) })
    }
    pub fn file(&self) -> &File {
        self.file.file()
    }
}

struct Chunk {
    file: Arc<PendingFile>,
    offset: u64,
    /// A whole [`CHUNK`]-byte buffer, of which the first `len` bytes are written.
    buf: AlignedBuf,
    len: usize,
}

struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    /// Recycled buffers, and how many exist in all.
    free: Mutex<(Vec<AlignedBuf>, usize)>,
    freed: Condvar,
    bytes: AtomicUsize,
    /// Of `bytes`, those written past the page cache.
    direct: AtomicU64,
}

impl Shared {
    fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::SeqCst);
        if let Ok(mut slot) = self.error.lock() {
            if slot.is_none() {
                *slot = Some(e);
            }
        }
    }
}

pub struct Writers {
    tx: Option<SyncSender<Chunk>>,
    workers: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

fn finalize(f: &PendingFile) -> Result<()> {
    apply_meta_fd(f.file().as_fd(), &f.meta)
        .map_err(|(op, e)| super::root::meta_error(op, e, &format!("file {:?}", f.name)))
}

/// Drop one reference to the file's outstanding work; the last one applies
/// the metadata.
fn release(f: &PendingFile, shared: &Shared) {
    if f.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 && !shared.failed.load(Ordering::SeqCst) {
        shared.direct.fetch_add(f.file.direct_bytes(), Ordering::Relaxed);
        if let Err(e) = finalize(f) {
            shared.fail(e);
        }
    }
}

fn worker(rx: Arc<Mutex<Receiver<Chunk>>>, shared: Arc<Shared>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(chunk) = job else { return };
        if !shared.failed.load(Ordering::SeqCst) {
            let data = chunk.buf.get(..chunk.len).unwrap_or(&chunk.buf[..]);
            // Whole chunks only go past the page cache: written directly,
            // a file's shorter last chunk (and a whole file under a chunk)
            // would be allocated by ext4 at write time, in pieces, where
            // delayed allocation packs it with its neighbours. Measured
            // (fixture bucket, pool blocks against tar's): +6% with every
            // aligned block direct, +0.6% with whole chunks only.
            let r = if chunk.len == CHUNK {
                chunk.file.file.write_all_at(data, chunk.offset)
            } else {
                std::os::unix::fs::FileExt::write_all_at(chunk.file.file(), data, chunk.offset)
            };
            if let Err(e) = r {
                shared.fail(super::target_error(format!("writing {}", chunk.file.name), e));
            } else {
                shared.bytes.fetch_add(data.len(), Ordering::Relaxed);
            }
        }
        release(&chunk.file, &shared);
        // Returned whole, not cleared: the next user reads into it as it is
        // (zero-filling every chunk was measured at several % of a pull).
        let buf = chunk.buf;
        if let Ok(mut free) = shared.free.lock() {
            free.0.push(buf);
            shared.freed.notify_one();
        }
    }
}

impl Writers {
    pub fn new(jobs: usize) -> Result<Writers> {
        let jobs = jobs.max(1);
        let (tx, rx) = sync_channel::<Chunk>(2 * jobs);
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            free: Mutex::new((Vec::new(), 0)),
            freed: Condvar::new(),
            bytes: AtomicUsize::new(0),
            direct: AtomicU64::new(0),
        });
        let mut workers = Vec::with_capacity(jobs);
        for i in 0..jobs {
            let (rx, shared) = (rx.clone(), shared.clone());
            let h = std::thread::Builder::new()
                .name(format!("unpack-writer-{i}"))
                .spawn(move || worker(rx, shared))
                .map_err(|e| Error::io("starting a file-writer thread", e))?;
            workers.push(h);
        }
        Ok(Writers { tx: Some(tx), workers, shared })
    }

    /// A buffer of [`CHUNK`] bytes (old contents): a recycled one, a new one
    /// while fewer than [`MAX_BUFFERS`] exist, else the next one a worker
    /// frees (every queued chunk is written and its buffer returned, so the
    /// wait ends).
    pub fn buffer(&self) -> AlignedBuf {
        let Ok(mut free) = self.shared.free.lock() else { return AlignedBuf::new(CHUNK) };
        loop {
            if let Some(b) = free.0.pop() {
                return b;
            }
            if free.1 < MAX_BUFFERS {
                free.1 += 1;
                return AlignedBuf::new(CHUNK);
            }
            free = match self.shared.freed.wait(free) {
                Ok(f) => f,
                Err(_) => return AlignedBuf::new(CHUNK),
            };
        }
    }

    /// The first error a worker hit, if any (the reader stops on it).
    pub fn check(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.take_error());
        }
        Ok(())
    }

    fn take_error(&self) -> Error {
        match self.shared.error.lock().ok().and_then(|mut e| e.take()) {
            Some(e) => e,
            None => Error::software("a file-writer thread failed without an error"),
        }
    }

    /// Queue `buf` to be written at `offset` (blocks while the queue is full).
    /// Queue `buf[..len]` for writing at `offset` (`buf` from [`Writers::buffer`]).
    pub fn write(&self, file: &Arc<PendingFile>, offset: u64, buf: AlignedBuf, len: usize) -> Result<()> {
        self.check()?;
        file.outstanding.fetch_add(1, Ordering::AcqRel);
        let tx = self.tx.as_ref().ok_or_else(|| Error::software("file-writer pool already finished"))?;
        if tx.send(Chunk { file: file.clone(), offset, buf, len }).is_err() {
            file.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::software("file-writer threads exited early"));
        }
        Ok(())
    }

    /// The reader has sent everything for this file.
    pub fn done(&self, file: &Arc<PendingFile>) {
        release(file, &self.shared);
    }

    /// Wait for every queued write; the first error wins. Returns the
    /// bytes written, and how many of them went past the page cache.
    pub fn finish(mut self) -> Result<(u64, u64)> {
        self.tx = None;
        for h in self.workers.drain(..) {
            if h.join().is_err() {
                self.shared.fail(Error::software("a file-writer thread panicked"));
            }
        }
        self.check()?;
        Ok((self.shared.bytes.load(Ordering::Relaxed) as u64, self.shared.direct.load(Ordering::Relaxed)))
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.shared.failed.store(true, Ordering::SeqCst);
        self.tx = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_bounded_whatever_the_job_count() {
        let writers = Writers::new(256).unwrap();
        let held: Vec<AlignedBuf> = (0..MAX_BUFFERS).map(|_| writers.buffer()).collect();
        let path = std::env::temp_dir().join(format!("thinimg-writers-test-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let (uid, gid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        let meta = Meta { uid, gid, mode: 0o600, mtime_sec: 0, mtime_nsec: 0, xattrs: Vec::new() };
        let pf = PendingFile::new(file, meta, "t".into(), true);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| writers.buffer());
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert!(!waiter.is_finished(), "a buffer beyond MAX_BUFFERS was handed out");
            // Writing one chunk returns its buffer, which the waiter gets.
            let mut it = held.into_iter();
            let mut b = it.next().unwrap();
            b[0] = b'x';
            writers.write(&pf, 0, b, 1).unwrap();
            let got = waiter.join().unwrap();
            assert_eq!(got.len(), CHUNK, "handed out whole");
            assert_eq!(writers.shared.free.lock().unwrap().1, MAX_BUFFERS);
        });
        writers.done(&pf);
        writers.finish().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
