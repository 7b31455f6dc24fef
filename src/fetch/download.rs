//! The resumable, verifying download of one S3 object into the blob store.
//!
//! Streams from S3, hashes while writing, checkpoints (fsync, then reports
//! the durable offset to its caller), verifies size and type, and hands the
//! finished partial to [`BlobStore::install`]. It never opens the database:
//! the caller persists checkpoints through a callback.
//!
//! Nothing is stored on an unverified claim: MD5 is computed next to
//! SHA-256 over every byte of the blob (a resumed download re-reads its
//! durable prefix), and a download whose bytes do not match a plain-MD5
//! ETag is refused and dropped, so a server that changes bytes between
//! ranges cannot splice a blob. A multipart ETag (`<hex>-<parts>`) is an
//! MD5 of part MD5s and cannot be checked from the bytes; such a blob is
//! identified by the SHA-256 of what was received only. When the server
//! sends `x-amz-checksum-sha256` with a whole-object reply, the blob's
//! SHA-256 must match it too. A full disk (ENOSPC, EDQUOT) drops the
//! partial: it is not kept for a resume that would fill the disk again.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use md5::Md5;
use sha2::{Digest, Sha256};

use super::blobstore::{remove_if_exists, BlobDigest, BlobStore};
use super::s3::{etag_is_plain_md5, Got, S3Client};
use crate::error::{Error, IoContext, Kind, Result};
use crate::magic::{classify, Magic};
use crate::ops::direct::{AlignedBuf, BlockReader, DirectFile};
use crate::ops::fault;

/// Durable progress is reported every this many bytes.
pub const CHECKPOINT_BYTES: u64 = 16 << 20;
const BUF: usize = 256 << 10;
/// Buffers in flight to the writer thread (16 × 256 KiB = 4 MiB): enough
/// to keep receiving through a checkpoint's fsync.
const WRITE_QUEUE: usize = 16;
/// Writeback of what was written is started every this many bytes, so a
/// checkpoint's fsync finds little left to wait for.
const WRITEBACK_BYTES: u64 = 4 << 20;

/// What a download reports to its caller while it runs.
pub enum Progress<'a> {
    /// Bytes [0, offset) of the partial are fsynced and belong to the
    /// object version `etag` of `size` bytes (offset 0: restarted).
    Durable { offset: u64, etag: &'a str, size: u64 },
    /// The partial is complete, fsynced and hashes to `digest`; it is about
    /// to be renamed into the store.
    Verified { digest: &'a BlobDigest, size: u64 },
}

/// One object to download into the partial file `partial`.
pub struct DownloadJob<'a> {
    pub key: &'a str,
    /// The ETag the listing reported; the download insists on it (If-Match)
    /// unless the object turns out to have changed, then restarts.
    pub etag: &'a str,
    pub size: u64,
    pub partial: &'a str,
    /// Bytes already durable in the partial (from a checkpoint).
    pub resume_offset: u64,
    pub max_size: u64,
    /// Incremented with every byte received (progress display).
    pub counter: Option<&'a AtomicU64>,
    /// Told where the partial is and how much of it is written, for a
    /// reader that unpacks the blob as it arrives.
    pub tap: Option<&'a super::tap::Tap>,
}

#[derive(Debug, Clone)]
pub struct Downloaded {
    pub digest: BlobDigest,
    pub size: u64,
    /// The version actually stored (differs from the job's if it changed).
    pub etag: String,
    /// Bytes received over the network in this call.
    pub transferred: u64,
    /// Bytes reused from an earlier, interrupted call.
    pub resumed_from: u64,
}

impl BlobStore {
    /// Download `job.key` into the store, resuming from `job.resume_offset`.
    /// `progress` is called after every checkpoint and before the final
    /// rename; an error from it aborts the download (the partial stays).
    ///
    /// The network is read and hashed (SHA-256, MD5) on the calling thread
    /// while a writer thread writes and fsyncs, so a checkpoint's fsync or a
    /// slow disk does not stall the connection. Memory: a few 256 KiB
    /// buffers.
    pub fn download(
        &self,
        s3: &S3Client,
        job: &DownloadJob<'_>,
        progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Downloaded> {
        let url = s3.url_of(job.key);
        check_size(&url, job.size, job.max_size)?;
        let pp = self.partial_path(job.partial)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&pp)
            .ctx(|| format!("opening {}", pp.display()))?;
        let have = file.metadata().ctx(|| format!("stat {}", pp.display()))?.len();
        // Only bytes a checkpoint declared durable are trusted.
        let offset = job.resume_offset.min(have).min(job.size);
        file.set_len(offset).ctx(|| format!("truncating {}", pp.display()))?;
        let mut head = Vec::with_capacity(512);
        // Read like the blob will be written: past the page cache.
        let prefix = file.try_clone().and_then(BlockReader::whole).ctx(|| format!("re-reading {}", pp.display()))?;
        let (mut sums, n) = reread(prefix, offset, &mut head).ctx(|| format!("re-reading {}", pp.display()))?;
        if n != offset {
            return Err(Error::new(Kind::Io, format!("{} shrank while being re-read", pp.display())));
        }
        if job.size == 0 {
            // An empty object is not a layer; check_head says why.
            drop(file);
            remove_if_exists(&pp)?;
            check_head(&url, &head, 0, 0)?;
            return Err(Error::bad_data(format!("{url} is empty")));
        }
        let (to_writer, writer_rx) = std::sync::mpsc::sync_channel::<ToWriter>(WRITE_QUEUE);
        let (writer_tx, from_writer) = std::sync::mpsc::channel::<FromWriter>();
        if let Some(t) = job.tap {
            t.begin(file.try_clone().ctx(|| format!("a second handle on {}", pp.display()))?, offset);
        }
        let tap = job.tap;
        let outcome = std::thread::scope(|scope| {
            let writer = scope.spawn(move || write_loop(file, offset, writer_rx, writer_tx, tap));
            let mut w = WriterLink { tx: to_writer, rx: from_writer, pool: Vec::new(), path: &pp, syncing: false };
            let r = self.receive(s3, job, &url, &mut w, &mut sums, &mut head, offset, progress);
            drop(w);
            let (file, werr) = match writer.join() {
                Ok(v) => v,
                Err(_) => return Err(Error::software(format!("writer thread for {} panicked", pp.display()))),
            };
            if let Some(e) = werr {
                return Err(write_error(&pp, e));
            }
            let r = r?;
            Ok((r, file))
        });
        let ((etag, size, transferred, restarted, checksum), file) = match outcome {
            Ok(v) => v,
            Err(e) => {
                if e.kind() == Kind::BadData || is_disk_full(&e) {
                    remove_if_exists(&pp)?;
                }
                return Err(e);
            }
        };
        if let Err(e) = file.sync_all() {
            let e = write_error(&pp, e);
            if is_disk_full(&e) {
                remove_if_exists(&pp)?;
            }
            return Err(e);
        }
        let len = file.metadata().ctx(|| format!("stat {}", pp.display()))?.len();
        drop(file);
        if len != size {
            return Err(Error::new(Kind::Io, format!("{}: wrote {len} bytes, expected {size}", pp.display())));
        }
        let Sums { sha, md5 } = sums;
        let digest = BlobDigest::from_hasher(sha);
        if let Err(e) = check_claims(&url, &etag, md5, checksum.as_deref(), &digest) {
            remove_if_exists(&pp)?;
            return Err(e);
        }
        progress(Progress::Verified { digest: &digest, size })?;
        self.install(&pp, &digest)?;
        fault::point("download:renamed");
        let resumed_from = if restarted { 0 } else { offset };
        Ok(Downloaded { digest, size, etag, transferred, resumed_from })
    }

    /// The network side of [`BlobStore::download`]: requests, retries,
    /// type check, checkpoints. Returns (etag, size, bytes transferred,
    /// whether it restarted from byte 0 because the object changed, the
    /// object's `x-amz-checksum-sha256` if the server sent it).
    #[allow(clippy::too_many_arguments)]
    fn receive(
        &self,
        s3: &S3Client,
        job: &DownloadJob<'_>,
        url: &str,
        w: &mut WriterLink<'_>,
        sums: &mut Sums,
        head: &mut Vec<u8>,
        mut offset: u64,
        progress: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<(String, u64, u64, bool, Option<String>)> {
        let mut checked_type = false;
        if offset > 0 {
            log::info!("resuming {url} at byte {offset} of {}", job.size);
        }
        let mut etag = job.etag.to_string();
        let mut size = job.size;
        let mut if_match = !etag.is_empty();
        let mut transferred = 0u64;
        let mut since_checkpoint = 0u64;
        let mut failures = 0u32;
        let mut restarts = 0u32;
        let mut checksum: Option<String> = None;
        let retry = s3.retry_policy();
        // A server that trickles, or keeps failing after some progress,
        // cannot hold this download (and the caller's lock) for ever.
        let started = std::time::Instant::now();
        let budget = s3.transfer_budget(job.size.saturating_sub(offset));
        'request: while offset < size {
            if started.elapsed() > budget {
                return Err(Error::new(
                    Kind::Unavailable,
                    format!(
                        "{url}: too slow from {}: {offset} of {size} bytes after {} s (the least waited for is 64 KiB/s, --timeout per attempt); the received part is kept for the next run",
                        s3.active_endpoint(),
                        started.elapsed().as_secs()
                    ),
                ));
            }
            let got = s3.get(job.key, offset, if_match.then_some(etag.as_str()), size.saturating_sub(offset))?;
            let mut body = match got {
                Got::Changed => {
                    restarts += 1;
                    if restarts > 3 {
                        return Err(Error::new(
                            Kind::Unavailable,
                            format!("{url} keeps changing while being downloaded"),
                        ));
                    }
                    log::warn!("{url} changed since it was listed (ETag no longer {etag}); restarting from byte 0");
                    if let Some(t) = job.tap {
                        t.restart();
                    }
                    w.reset()?;
                    *sums = Sums::default();
                    checksum = None;
                    offset = 0;
                    head.clear();
                    checked_type = false;
                    if_match = false;
                    since_checkpoint = 0;
                    progress(Progress::Durable { offset: 0, etag: &etag, size })?;
                    continue 'request;
                }
                Got::Body(b) => b,
            };
            if offset == 0 {
                // The first byte fixes the version: everything after must match it.
                if !body.etag.is_empty() {
                    etag = body.etag.clone();
                }
                checksum = body.checksum_sha256.clone();
                size = body.total_size;
                check_size(url, size, job.max_size)?;
                if size == 0 {
                    check_head(url, head, 0, 0)?;
                }
                if_match = !etag.is_empty();
            } else if body.total_size != size || (!body.etag.is_empty() && body.etag != etag) {
                return Err(Error::new(
                    Kind::Unavailable,
                    format!(
                        "{url}: server sent a different version on resume (size {} ETag {}); retry",
                        body.total_size, body.etag
                    ),
                ));
            }
            if !checked_type && offset > 0 {
                // Resuming: the partial's first block is of this version
                // (If-Match held), so it can be judged now.
                checked_type = check_head(url, head, offset, size)?;
            }
            loop {
                // Buffers end on BUF boundaries of the file, so each is one
                // aligned, direct write (only a blob's tail, and the rest of
                // a buffer a failed read cut short, go through the cache).
                let room = BUF as u64 - offset % BUF as u64;
                let want = (size - offset).min(room) as usize;
                if want == 0 {
                    break 'request;
                }
                if crate::ops::signals::pending().is_some() {
                    // Make what was received durable, so the next run
                    // resumes from here, then unwind.
                    let durable = w.sync_now(offset)?;
                    progress(Progress::Durable { offset: durable, etag: &etag, size })?;
                    return Err(crate::ops::signals::interrupted_error()
                        .context(format!("{url}: stopped at byte {durable} of {size}")));
                }
                // Full-length buffers, reused as they are: no zero-filling
                // of 256 KiB per read (measured: 7% of a pull's CPU).
                let mut buf = w.buffer();
                let (n, stop) = fill(&mut body, &mut buf[..want]);
                if n == 0 {
                    w.pool.push(buf);
                } else {
                    if !checked_type {
                        let take = (512 - head.len()).min(n);
                        head.extend_from_slice(&buf[..take]);
                        if head.len() == 512 || offset + n as u64 == size {
                            check_head(url, head, 512, size)?;
                            checked_type = true;
                        }
                    }
                    // Hashing here and writing on the writer thread overlap
                    // (a direct write waits for the device: measured on the
                    // host, MD5 on the writer thread cost a third of a
                    // download's speed).
                    sums.update(&buf[..n]);
                    w.write(buf, n)?;
                    offset += n as u64;
                    transferred += n as u64;
                    since_checkpoint += n as u64;
                    failures = 0;
                    if let Some(c) = job.counter {
                        c.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                // Checkpoints are asynchronous: the writer fsyncs while
                // this thread keeps receiving, and the offset is reported
                // durable when the fsync has answered.
                if since_checkpoint >= CHECKPOINT_BYTES && offset < size && w.request_sync(offset)? {
                    since_checkpoint = 0;
                }
                if let Some(durable) = w.poll()? {
                    progress(Progress::Durable { offset: durable, etag: &etag, size })?;
                    fault::point("download:chunk");
                }
                match stop {
                    Stop::Full | Stop::Interrupted => {}
                    Stop::Early => {
                        failures += 1;
                        if failures >= retry.attempts {
                            return Err(Error::new(
                                Kind::Unavailable,
                                format!("{url}: connection keeps ending early (at byte {offset} of {size})"),
                            ));
                        }
                        log::warn!("{url}: body ended at byte {offset} of {size}; resuming");
                        retry.sleep_jittered(failures)?;
                        continue 'request;
                    }
                    Stop::Failed(e) => {
                        failures += 1;
                        if failures >= retry.attempts {
                            return Err(Error::new(
                                Kind::Unavailable,
                                format!("{url}: reading at byte {offset} of {size}"),
                            )
                            .with_source(e));
                        }
                        log::warn!("{url}: read failed at byte {offset} of {size} ({e}); resuming");
                        retry.sleep_jittered(failures)?;
                        continue 'request;
                    }
                }
            }
        }
        Ok((etag, size, transferred, restarts > 0, checksum))
    }
}

/// The digests of every byte of the blob so far (the resumed prefix
/// included), computed on the receiving thread.
#[derive(Default)]
struct Sums {
    sha: Sha256,
    md5: Md5,
}

impl Sums {
    fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.md5.update(data);
    }
}

/// Why [`fill`] stopped.
enum Stop {
    /// The buffer is full.
    Full,
    /// A signal interrupted the read (the caller checks for it).
    Interrupted,
    /// The body ended first.
    Early,
    /// The read failed.
    Failed(std::io::Error),
}

/// Read from `body` until `buf` is full or the body stops; the bytes read
/// count whatever stopped it. A signal stops it after the read it arrived
/// in (ureq retries interrupted reads itself), as it did when every read
/// was written out on its own: a slow server cannot delay the answer to a
/// signal until a buffer is full.
fn fill(body: &mut impl Read, buf: &mut [u8]) -> (usize, Stop) {
    let mut n = 0;
    while n < buf.len() {
        match body.read(&mut buf[n..]) {
            Ok(0) => return (n, Stop::Early),
            Ok(k) => {
                n += k;
                if n < buf.len() && crate::ops::signals::pending().is_some() {
                    return (n, Stop::Interrupted);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                if crate::ops::signals::pending().is_some() {
                    return (n, Stop::Interrupted);
                }
            }
            Err(e) => return (n, Stop::Failed(e)),
        }
    }
    (n, Stop::Full)
}

enum ToWriter {
    /// A buffer and how many of its first bytes to write.
    Data(AlignedBuf, usize),
    /// fsync what was written (up to the offset given), then answer `Synced`.
    Sync(u64),
    /// Truncate to 0, then answer `Synced(0)`.
    Reset,
}

enum FromWriter {
    /// A written buffer, for reuse.
    Buf(AlignedBuf),
    /// Bytes up to this offset are durable (or the error that prevented it).
    Synced(std::result::Result<u64, std::io::Error>),
}

/// The network side's handle on the writer thread.
struct WriterLink<'a> {
    tx: std::sync::mpsc::SyncSender<ToWriter>,
    rx: std::sync::mpsc::Receiver<FromWriter>,
    pool: Vec<AlignedBuf>,
    path: &'a Path,
    /// A Sync was sent and not yet answered.
    syncing: bool,
}

impl WriterLink<'_> {
    /// A buffer of [`BUF`] bytes: a written one back from the writer, or a
    /// new (zeroed) one, aligned for direct I/O.
    fn buffer(&mut self) -> AlignedBuf {
        self.pool.pop().unwrap_or_else(|| AlignedBuf::new(BUF))
    }

    fn gone(&self) -> Error {
        Error::new(Kind::Io, format!("writing {}: the writer thread stopped", self.path.display()))
    }

    fn failed(&self, e: std::io::Error) -> Error {
        write_error(self.path, e)
    }

    /// Write `buf[..len]`; the buffer comes back whole, for reuse.
    fn write(&mut self, buf: AlignedBuf, len: usize) -> Result<()> {
        self.tx.send(ToWriter::Data(buf, len)).map_err(|_| self.gone())
    }

    /// Ask for an fsync of everything sent so far, unless one is running.
    fn request_sync(&mut self, offset: u64) -> Result<bool> {
        if self.syncing {
            return Ok(false);
        }
        self.tx.send(ToWriter::Sync(offset)).map_err(|_| self.gone())?;
        self.syncing = true;
        Ok(true)
    }

    /// Take back written buffers; the offset of a finished fsync, if any.
    fn poll(&mut self) -> Result<Option<u64>> {
        let mut durable = None;
        loop {
            match self.rx.try_recv() {
                Ok(FromWriter::Buf(b)) => self.pool.push(b),
                Ok(FromWriter::Synced(Ok(off))) => {
                    self.syncing = false;
                    durable = Some(off);
                }
                Ok(FromWriter::Synced(Err(e))) => return Err(self.failed(e)),
                Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(durable),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Err(self.gone()),
            }
        }
    }

    /// fsync everything sent so far and wait for it; the durable offset.
    fn sync_now(&mut self, offset: u64) -> Result<u64> {
        loop {
            if !self.syncing {
                self.tx.send(ToWriter::Sync(offset)).map_err(|_| self.gone())?;
                self.syncing = true;
            }
            match self.rx.recv() {
                Ok(FromWriter::Buf(b)) => self.pool.push(b),
                Ok(FromWriter::Synced(Ok(off))) => {
                    self.syncing = false;
                    if off == offset {
                        return Ok(off);
                    }
                }
                Ok(FromWriter::Synced(Err(e))) => return Err(self.failed(e)),
                Err(_) => return Err(self.gone()),
            }
        }
    }

    /// Truncate the partial. An fsync still running belongs to the
    /// old version: its answer is discarded, never reported.
    fn reset(&mut self) -> Result<()> {
        let mut reset_sent = false;
        loop {
            if !self.syncing && !reset_sent {
                self.tx.send(ToWriter::Reset).map_err(|_| self.gone())?;
                self.syncing = true;
                reset_sent = true;
            }
            match self.rx.recv() {
                Ok(FromWriter::Buf(b)) => self.pool.push(b),
                Ok(FromWriter::Synced(r)) => {
                    self.syncing = false;
                    if reset_sent {
                        return r.map(drop).map_err(|e| self.failed(e));
                    }
                }
                Err(_) => return Err(self.gone()),
            }
        }
    }
}

/// The writer thread: write, start writeback, fsync on request. Returns
/// the file and the first write error.
fn write_loop(
    file: File,
    mut pos: u64,
    rx: std::sync::mpsc::Receiver<ToWriter>,
    tx: std::sync::mpsc::Sender<FromWriter>,
    tap: Option<&super::tap::Tap>,
) -> (File, Option<std::io::Error>) {
    let mut err: Option<std::io::Error> = None;
    let mut written_back = pos;
    // Whole aligned buffers go past the page cache (ops::direct).
    let file = DirectFile::new(file, true);
    for m in rx {
        match m {
            ToWriter::Data(buf, len) => {
                let data = buf.get(..len).unwrap_or(&buf[..]);
                if err.is_none() {
                    match file.write_all_at(data, pos) {
                        Ok(()) => {
                            pos += data.len() as u64;
                            if let Some(t) = tap {
                                t.wrote(pos);
                            }
                            if pos - written_back >= WRITEBACK_BYTES {
                                start_writeback(file.file(), written_back, pos - written_back);
                                written_back = pos;
                            }
                        }
                        Err(e) => err = Some(e),
                    }
                }
                let _ = tx.send(FromWriter::Buf(buf));
            }
            ToWriter::Sync(offset) => {
                let r = match &err {
                    Some(e) => Err(copy_io_error(e)),
                    None => file.file().sync_data().map(|()| offset),
                };
                let _ = tx.send(FromWriter::Synced(r));
            }
            ToWriter::Reset => {
                pos = 0;
                written_back = 0;
                let r = match &err {
                    Some(e) => Err(copy_io_error(e)),
                    None => file.file().set_len(0).and_then(|()| file.file().sync_data()).map(|()| 0),
                };
                let _ = tx.send(FromWriter::Synced(r));
            }
        }
    }
    if file.direct_bytes() > 0 {
        log::trace!("{} bytes written past the page cache", file.direct_bytes());
    }
    (file.into_file(), err)
}

/// The same error again (errno kept), for a second report of it.
fn copy_io_error(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// Ask the kernel to start writing [start, start+len) to disk now, without
/// waiting. Only a hint: failure changes nothing but speed.
fn start_writeback(f: &File, start: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a valid fd owned by `f`; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), start as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
    if r != 0 {
        log::trace!("sync_file_range: {}", std::io::Error::last_os_error());
    }
}

/// Re-read the durable prefix of a partial: its SHA-256 and MD5 (so the
/// final digests cover every byte of the blob, old and new), and its first
/// 512 bytes into `head`.
fn reread(r: impl Read, limit: u64, head: &mut Vec<u8>) -> std::io::Result<(Sums, u64)> {
    let mut sums = Sums::default();
    let n = super::blobstore::read_prefix(r, limit, Some(head), |b| sums.update(b))?;
    Ok((sums, n))
}

/// The object's claims about its content, checked against the bytes
/// received: a plain-MD5 ETag, and `x-amz-checksum-sha256` if sent.
fn check_claims(url: &str, etag: &str, md5: Md5, checksum: Option<&str>, digest: &BlobDigest) -> Result<()> {
    if etag_is_plain_md5(etag) {
        let got = crate::ops::encode::hex(&md5.finalize());
        if !got.eq_ignore_ascii_case(etag) {
            return Err(Error::bad_data(format!(
                "{url}: the bytes received do not match the object's ETag (MD5 {etag}, received bytes hash to {got}); not stored (the server changed the bytes between ranges, or they were corrupted in transit)"
            )));
        }
    } else {
        log::debug!("{url}: ETag {etag:?} is not a plain MD5 (multipart?); the blob is identified by its SHA-256 only");
    }
    if let Some(c) = checksum {
        let want = crate::ops::encode::unhex(digest.as_str())
            .map(|b| crate::ops::encode::base64(&b))
            .ok_or_else(|| Error::software(format!("blob digest {digest} is not hex")))?;
        if c.trim() != want {
            return Err(Error::bad_data(format!(
                "{url}: the bytes received do not match the object's x-amz-checksum-sha256 ({}, received {want}); not stored",
                super::s3::printable(c, 60)
            )));
        }
    }
    Ok(())
}

/// Whether an error is the state filesystem running out of space.
pub fn is_disk_full(e: &Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                return true;
            }
        }
        cur = s.source();
    }
    false
}

/// A write or fsync of a partial failed. A full disk is not "retry later"
/// (75) and not worth keeping: it says so, and the caller drops the partial.
fn write_error(path: &Path, e: std::io::Error) -> Error {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        return Error::new(
            Kind::Io,
            format!(
                "writing {}: the state filesystem is full; the partial download is dropped (free space, or see --min-free)",
                path.display()
            ),
        )
        .with_source(e);
    }
    Error::io(format!("writing {}", path.display()), e)
}

fn check_size(url: &str, size: u64, max: u64) -> Result<()> {
    if size > max {
        return Err(Error::bad_data(format!(
            "{url} is {size} bytes, larger than --max-blob-size {max}; refusing to download it"
        )));
    }
    Ok(())
}

/// Refuse non-tar content from its first block. `have` is how many bytes
/// of the object are known (`head` holds up to 512 of them). Returns
/// whether the check could be made.
fn check_head(url: &str, head: &[u8], have: u64, size: u64) -> Result<bool> {
    if head.len() < 512 && (head.len() as u64) < size && have < size {
        return Ok(false);
    }
    match classify(head) {
        Magic::Tar | Magic::EmptyTar => Ok(true),
        m if m.is_compressed() => Err(Error::bad_data(format!(
            "{url} is {}-compressed; only uncompressed tar layers are supported",
            m.name()
        ))),
        Magic::Zip => Err(Error::bad_data(format!("{url} is a zip archive, not a tar layer"))),
        m => Err(Error::bad_data(format!("{url} is {}", m.name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_checked_against_the_bytes() {
        let data = b"hello world";
        let sha = BlobDigest::from_hasher(Sha256::new_with_prefix(data));
        let md5 = || Md5::new_with_prefix(data);
        let right = "5eb63bbbe01eeed093cb22bb8f5acdc3";
        check_claims("u", right, md5(), None, &sha).unwrap();
        let e = check_claims("u", "5eb63bbbe01eeed093cb22bb8f5acdc4", md5(), None, &sha).unwrap_err();
        assert_eq!(e.kind(), Kind::BadData);
        assert!(e.message().contains("do not match the object's ETag"), "{}", e.message());
        // A multipart ETag says nothing about the bytes.
        assert!(check_claims("u", "5eb63bbbe01eeed093cb22bb8f5acdc4-3", md5(), None, &sha).is_ok());
        let b64 = "uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=";
        assert_eq!(crate::ops::encode::base64(&crate::ops::encode::unhex(sha.as_str()).unwrap()), b64);
        assert!(check_claims("u", right, md5(), Some(b64), &sha).is_ok());
        assert!(check_claims("u", right, md5(), Some("AAAA"), &sha).is_err());
    }

    #[test]
    fn head_check_names_the_object_and_the_rule() {
        let e = check_head("s3://b/k", &[0x1f, 0x8b, 8, 0], 4, 4).unwrap_err();
        assert_eq!(e.kind(), Kind::BadData);
        assert_eq!(e.message(), "s3://b/k is gzip-compressed; only uncompressed tar layers are supported");
        assert!(check_head("s3://b/k", b"hello", 5, 5).unwrap_err().message().contains("truncated"));
        assert!(!check_head("s3://b/k", b"hel", 3, 5000).unwrap());
        assert!(check_head("s3://b/k", &[0u8; 512], 512, 1024).unwrap());
    }
}
