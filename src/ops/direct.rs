//! Bulk bytes past the page cache: direct I/O (`O_DIRECT`).
//!
//! A blob is written once, as it downloads, and read once, by the build of
//! its chain; an unpacked file's data is written and not read back. Through
//! the page cache each byte costs a page allocation (the kernel zeroes every
//! new page: `init_on_alloc`, on by default in Debian and Ubuntu kernels), a
//! copy in (and for a blob a copy out), and it leaves cache behind that
//! nothing reads again. With `O_DIRECT` the device moves the bytes to and
//! from this process's buffers. Measured in the VM (scripts/bench-pipeline,
//! real-scale bucket, `BENCH_PERF=1`): page zeroing and kernel copies were a
//! quarter of a pull's CPU; with blobs and whole chunks of file data direct,
//! the pull's system CPU went from 99 s to 60 s.
//!
//! Direct I/O needs the file offset, the buffer's address and the length
//! aligned to the device's block size; [`ALIGN`] (4096) covers every
//! logical block size Linux supports. [`DirectFile`] sends aligned spans
//! through a second open file description with `O_DIRECT`, opened on the
//! same inode (through `/proc/self/fd`, so no path is resolved again), and
//! everything else (a blob's tail, the bytes after an interrupted read)
//! through the ordinary one; Linux keeps the two coherent. Where direct I/O
//! is not available (tmpfs before Linux 6.6, no `/proc`, a filesystem that
//! refuses it at the first transfer) everything goes through the ordinary
//! description: slower, never different bytes.
//!
//! [`BlockReader`] reads a file sequentially in aligned blocks into one
//! [`AlignedBuf`] (what `BufReader` did, minus the page cache), up to an
//! end that its [`Extent`] says is readable: the file's size, or what a
//! download has written so far (`tap::TapReader`).

use std::borrow::Borrow;
use std::fs::File;
use std::io::Read;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The alignment of direct transfers: offsets, lengths and addresses.
pub const ALIGN: usize = 4096;

/// Bytes a [`BlockReader`] reads at a time.
pub const READ_BLOCK: usize = 1 << 20;

/// A zeroed heap buffer of a fixed length whose first byte is
/// [`ALIGN`]-aligned. It moves like a `Vec` (the bytes stay where they are).
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        // At most ALIGN - 1 for a byte pointer; anything else (never seen)
        // leaves the buffer unaligned, and DirectFile then uses the
        // ordinary description for it.
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        AlignedBuf { raw, start, len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

fn aligned(pos: u64, buf: &[u8]) -> bool {
    pos % ALIGN as u64 == 0 && buf.len() % ALIGN == 0 && (buf.as_ptr() as usize) % ALIGN == 0
}

/// A file with a second, `O_DIRECT` description for aligned transfers.
/// `F` is the ordinary handle (`File`, or a shared `Arc<File>`). Shareable:
/// threads may write different ranges at once (the extract writers do).
pub struct DirectFile<F: Borrow<File>> {
    file: F,
    direct: Option<File>,
    /// The filesystem refused a direct transfer: the ordinary description
    /// serves from now on.
    refused: AtomicBool,
    direct_bytes: AtomicU64,
}

impl<F: Borrow<File>> DirectFile<F> {
    /// Open the direct description of `file` (for writing when `write`).
    /// Never fails: without direct I/O the ordinary description serves.
    pub fn new(file: F, write: bool) -> DirectFile<F> {
        let direct = reopen_direct(file.borrow(), write);
        DirectFile { file, direct, refused: AtomicBool::new(false), direct_bytes: AtomicU64::new(0) }
    }

    /// Everything through the ordinary description (nothing to gain from
    /// a second open: no transfer will be a whole aligned block).
    pub fn cached(file: F) -> DirectFile<F> {
        DirectFile { file, direct: None, refused: AtomicBool::new(false), direct_bytes: AtomicU64::new(0) }
    }

    /// The ordinary handle.
    pub fn file(&self) -> &File {
        self.file.borrow()
    }

    pub fn into_file(self) -> F {
        self.file
    }

    /// Bytes moved through the direct description so far.
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes.load(Ordering::Relaxed)
    }

    /// Whether aligned transfers still go direct.
    pub fn is_direct(&self) -> bool {
        self.direct().is_some()
    }

    fn direct(&self) -> Option<&File> {
        self.direct.as_ref().filter(|_| !self.refused.load(Ordering::Relaxed))
    }

    /// The filesystem refused a direct transfer it had accepted to open:
    /// use the ordinary description from now on.
    fn refused(&self, e: &std::io::Error) -> bool {
        if e.raw_os_error() == Some(libc::EINVAL) && self.direct.is_some() {
            if !self.refused.swap(true, Ordering::Relaxed) {
                log::debug!("direct I/O refused ({e}); using the page cache for this file");
            }
            return true;
        }
        false
    }

    /// Write all of `data` at `pos`: its whole aligned blocks directly when
    /// `pos` and `data` start aligned, the rest through the cache.
    pub fn write_all_at(&self, data: &[u8], pos: u64) -> std::io::Result<()> {
        let head = data.len() - data.len() % ALIGN;
        if head > 0 && aligned(pos, &data[..head]) {
            if let Some(d) = self.direct() {
                match d.write_all_at(&data[..head], pos) {
                    Ok(()) => {
                        self.direct_bytes.fetch_add(head as u64, Ordering::Relaxed);
                        return self.file.borrow().write_all_at(&data[head..], pos + head as u64);
                    }
                    // A short direct write left an unaligned rest: the
                    // ordinary description rewrites the whole span.
                    Err(e) if self.refused(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.file.borrow().write_all_at(data, pos)
    }

    /// Read into `buf` (an [`AlignedBuf`]'s bytes) from `pos`, no further
    /// than `end`: aligned whole blocks directly; a start that is not
    /// aligned only up to the next boundary, and a rest shorter than a
    /// block, through the ordinary description. Returns the bytes read (0:
    /// the file ends before `end`).
    pub fn read_span(&self, buf: &mut [u8], pos: u64, end: u64) -> std::io::Result<usize> {
        let avail = end.saturating_sub(pos).min(buf.len() as u64) as usize;
        if avail == 0 {
            return Ok(0);
        }
        let a = ALIGN as u64;
        if pos % a == 0 && avail >= ALIGN {
            let want = avail - avail % ALIGN;
            if aligned(pos, &buf[..want]) {
                if let Some(d) = self.direct() {
                    match read_retrying(d, &mut buf[..want], pos) {
                        Ok(n) => {
                            self.direct_bytes.fetch_add(n as u64, Ordering::Relaxed);
                            return Ok(n);
                        }
                        Err(e) if self.refused(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let want = if pos % a == 0 { avail } else { avail.min((a - pos % a) as usize) };
        read_retrying(self.file.borrow(), &mut buf[..want], pos)
    }
}

fn read_retrying(f: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    loop {
        match f.read_at(buf, pos) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && crate::ops::signals::pending().is_none() => {}
            r => return r,
        }
    }
}

/// A second open file description of `f`'s inode with `O_DIRECT`, or
/// `None` where direct I/O is not available.
fn reopen_direct(f: &File, write: bool) -> Option<File> {
    let link = format!("/proc/self/fd/{}", f.as_raw_fd());
    let mut o = std::fs::OpenOptions::new();
    if write {
        o.write(true);
    } else {
        o.read(true);
    }
    let d = match o.custom_flags(libc::O_DIRECT).open(&link) {
        Ok(d) => d,
        Err(e) => {
            log::debug!("no direct I/O on {link} ({e}); using the page cache");
            return None;
        }
    };
    // The magic link names the open file itself; check it anyway, so a
    // mistake here can only cost speed, never bytes.
    let same = match (f.metadata(), d.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino() && b.file_type().is_file(),
        _ => false,
    };
    same.then_some(d)
}

/// How far a [`BlockReader`] may read.
pub trait Extent {
    /// The end of the bytes readable from `pos` (greater than `pos`),
    /// waiting for more if they are coming, or `None` at the end.
    fn ready(&mut self, pos: u64) -> std::io::Result<Option<u64>>;
    /// Called before every read the reader answers: an error here (say,
    /// the bytes stopped being valid) is returned instead.
    fn check(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The error for a file that ends before the end `ready` promised.
    fn short(&self, pos: u64) -> std::io::Error;
}

/// A whole file, to the size it had when opened.
pub struct WholeFile {
    size: u64,
}

impl Extent for WholeFile {
    fn ready(&mut self, pos: u64) -> std::io::Result<Option<u64>> {
        Ok((pos < self.size).then_some(self.size))
    }
    fn short(&self, pos: u64) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file shrank while being read: ends at byte {pos} of {}", self.size),
        )
    }
}

/// Sequential reads of a file in aligned blocks of [`READ_BLOCK`] bytes.
pub struct BlockReader<E: Extent, F: Borrow<File> = File> {
    extent: E,
    file: DirectFile<F>,
    buf: AlignedBuf,
    /// Unread bytes of `buf`: `[lo, hi)`.
    lo: usize,
    hi: usize,
    /// File offset of `buf[hi]`.
    pos: u64,
}

impl BlockReader<WholeFile> {
    /// Read all of `file` from its start.
    pub fn whole(file: File) -> std::io::Result<BlockReader<WholeFile>> {
        let size = file.metadata()?.len();
        Ok(BlockReader::new(WholeFile { size }, file))
    }
}

impl<E: Extent, F: Borrow<File>> BlockReader<E, F> {
    pub fn new(extent: E, file: F) -> BlockReader<E, F> {
        BlockReader {
            extent,
            file: DirectFile::new(file, false),
            buf: AlignedBuf::new(READ_BLOCK),
            lo: 0,
            hi: 0,
            pos: 0,
        }
    }

    /// Bytes read from the file directly so far.
    pub fn direct_bytes(&self) -> u64 {
        self.file.direct_bytes()
    }
}

impl<E: Extent, F: Borrow<File>> Read for BlockReader<E, F> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        self.extent.check()?;
        if self.lo == self.hi {
            let Some(end) = self.extent.ready(self.pos)? else { return Ok(0) };
            let n = self.file.read_span(&mut self.buf, self.pos, end)?;
            // A restart that truncated the file under this read is seen here.
            self.extent.check()?;
            if n == 0 {
                return Err(self.extent.short(self.pos));
            }
            self.lo = 0;
            self.hi = n;
            self.pos += n as u64;
        }
        let n = (self.hi - self.lo).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.lo..self.lo + n]);
        self.lo += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A scratch directory on the filesystem the tests run from (not /tmp,
    /// which may be a tmpfs without direct I/O).
    fn scratch(tag: &str) -> PathBuf {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("direct-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a scratch dir");
        d
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 4099) as u8).collect()
    }

    fn open_rw(p: &std::path::Path) -> File {
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(p).expect("a file")
    }

    #[test]
    fn an_aligned_buffer_is_aligned_and_whole() {
        for len in [ALIGN, 3 * ALIGN, 256 << 10] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0), "zeroed");
            b[len - 1] = 7;
            let moved = b;
            assert_eq!(moved[len - 1], 7);
        }
    }

    /// The test bed's filesystem (ext4 under `target/`) has direct I/O: the
    /// aligned spans must go through it, the rest through the page cache,
    /// and the file must hold every byte where it was written.
    #[test]
    fn aligned_spans_are_written_directly_and_the_rest_through_the_cache() {
        let d = scratch("write");
        let p = d.join("blob");
        let data = bytes(5 * ALIGN + 123);
        let mut buf = AlignedBuf::new(5 * ALIGN + 123);
        buf.copy_from_slice(&data);
        let f = DirectFile::new(open_rw(&p), true);
        assert!(f.is_direct(), "no O_DIRECT on {}: the direct path is untested", d.display());
        // Aligned: two blocks at 0; a piece shorter than a block; a
        // realigning piece; two blocks and the tail in one write (the
        // blocks direct, the tail through the cache).
        f.write_all_at(&buf[..2 * ALIGN], 0).unwrap();
        f.write_all_at(&buf[2 * ALIGN..2 * ALIGN + 100], 2 * ALIGN as u64).unwrap();
        f.write_all_at(&buf[2 * ALIGN + 100..3 * ALIGN], (2 * ALIGN + 100) as u64).unwrap();
        f.write_all_at(&buf[3 * ALIGN..], 3 * ALIGN as u64).unwrap();
        assert_eq!(f.direct_bytes(), 4 * ALIGN as u64);
        drop(f);
        assert!(std::fs::read(&p).unwrap() == data, "the file differs from what was written");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_block_reader_returns_every_byte_whatever_the_read_sizes() {
        let d = scratch("read");
        for size in [0, 1, ALIGN - 1, ALIGN, READ_BLOCK + 1, 2 * READ_BLOCK + 3 * ALIGN + 17] {
            let p = d.join(format!("f{size}"));
            let data = bytes(size);
            std::fs::write(&p, &data).unwrap();
            for step in [1usize, 512, 4096, 256 << 10, 3 << 20] {
                let mut r = BlockReader::whole(File::open(&p).unwrap()).unwrap();
                let mut got = Vec::with_capacity(size);
                let mut piece = vec![0u8; step];
                loop {
                    let n = r.read(&mut piece).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&piece[..n]);
                }
                assert!(got == data, "size {size}, reads of {step}: bytes differ");
                let whole_blocks = (size - size % ALIGN) as u64;
                assert_eq!(r.direct_bytes(), whole_blocks, "size {size}: aligned blocks are read directly");
            }
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Where direct I/O is missing (a tmpfs before Linux 6.6) or a buffer
    /// is not aligned, the same bytes go through the page cache.
    #[test]
    fn without_direct_io_the_page_cache_serves() {
        let shm = PathBuf::from("/dev/shm").join(format!("thinimg-direct-{}", std::process::id()));
        let d = if std::fs::create_dir_all(&shm).is_ok() { shm } else { scratch("shm") };
        let p = d.join("blob");
        let data = bytes(3 * ALIGN + 5);
        let f = DirectFile::new(open_rw(&p), true);
        // An unaligned source never goes direct, wherever the file is.
        let unaligned = &data[1..];
        f.write_all_at(unaligned, 0).unwrap();
        f.write_all_at(&data[..1], unaligned.len() as u64).unwrap();
        assert_eq!(f.direct_bytes(), 0);
        drop(f);
        let mut r = BlockReader::whole(File::open(&p).unwrap()).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        let mut want = data[1..].to_vec();
        want.push(data[0]);
        assert!(got == want);
        let _ = std::fs::remove_dir_all(&d);
    }
}
