//! Applying one hostile layer tarball onto a root directory with
//! container-layer semantics: regular files, directories, symlinks (targets
//! verbatim), hard links (resolved inside the root), devices and FIFOs,
//! OCI whiteouts and opaque directories (acting on lower layers only),
//! numeric ownership, modes, times and xattrs.
//!
//! Owns: the limits (checked before bytes are written), the lexical rules
//! (`rules`), the tar block walk (`stream`), in-root creation through
//! openat2 (`root`) and the bounded writer pool (`pool`). It must never
//! write outside the root it was given, never follow a final-component
//! symlink, never look up user or group names, never feed compressed or
//! non-tar data to the parser, and never panic on input.
//!
//! Compressed layers (gzip, zstd, xz, bzip2, lz4) are recognised by magic
//! number and refused with a clear error naming the compression: the
//! allowed dependency set has no decompressor, and the reference bucket
//! holds uncompressed tars only. Refusing is safer than a hand-written
//! inflater and keeps every limit meaningful.

pub mod pool;
pub mod root;
pub mod rules;
pub mod stream;

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::stat::SFlag;

use crate::error::{Error, Kind, Result};
use pool::{PendingFile, Pool, CHUNK};
use root::{Meta, Root};
use rules::{CleanPath, Reject, Whiteout};
use stream::{Member, MemberKind, TarStream};

/// Hard limits for one layer. Defaults are the flag table's defaults.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Limits {
    pub max_entries: u64,
    pub max_file_size: u64,
    pub max_total_size: u64,
    pub max_path_len: u64,
    pub max_depth: u64,
    pub max_header_size: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entries: 1_000_000,
            max_file_size: 8 << 30,
            max_total_size: 64 << 30,
            max_path_len: 4095,
            max_depth: 128,
            max_header_size: 1 << 20,
        }
    }
}

impl Limits {
    pub fn from_invocation(inv: &crate::cli::Invocation) -> Result<Limits> {
        let d = Limits::default();
        Ok(Limits {
            max_entries: inv.u64_opt("max-entries")?.unwrap_or(d.max_entries),
            max_file_size: inv.u64_opt("max-file-size")?.unwrap_or(d.max_file_size),
            max_total_size: inv.u64_opt("max-total-size")?.unwrap_or(d.max_total_size),
            max_path_len: inv.u64_opt("max-path-len")?.unwrap_or(d.max_path_len),
            max_depth: inv.u64_opt("max-depth")?.unwrap_or(d.max_depth),
            max_header_size: inv.u64_opt("max-header-size")?.unwrap_or(d.max_header_size),
        })
    }
}

/// How to apply a layer.
#[derive(Debug, Clone)]
pub struct Options {
    pub limits: Limits,
    /// File-writer threads (at least 1).
    pub jobs: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options { limits: Limits::default(), jobs: default_jobs() }
    }
}

impl Options {
    pub fn from_invocation(inv: &crate::cli::Invocation) -> Result<Options> {
        // One range everywhere (unpack and the pipeline): 1..=256.
        let jobs = match inv.u64_opt("jobs")? {
            Some(n @ 1..=256) => n as usize,
            Some(n) => return Err(Error::usage(format!("--jobs {n}: must be between 1 and 256"))),
            None => default_jobs(),
        };
        Ok(Options { limits: Limits::from_invocation(inv)?, jobs })
    }
}

pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(256)
}

/// What applying one layer did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub layer: String,
    /// Archive members read (extension headers folded in).
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub implicit_dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub devices: u64,
    pub fifos: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Existing objects replaced by an entry of another type or a new file.
    pub replaced: u64,
    pub sparse_files: u64,
    pub bytes_written: u64,
    pub xattrs_set: u64,
    /// xattrs not applied by policy (security.selinux, trusted.*, unknown namespaces).
    pub xattrs_dropped: u64,
    /// Entries naming the root itself ("./"), which never change it.
    pub root_entries_ignored: u64,
}

/// An entry-level failure: a rule violation, or an error of the target.
enum Fail {
    Rule(Reject),
    Err(Error),
}

impl From<Reject> for Fail {
    fn from(r: Reject) -> Fail {
        Fail::Rule(r)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Err(e)
    }
}

fn r(rule: &'static str, detail: impl Into<String>) -> Fail {
    Fail::Rule(Reject::new(rule, detail))
}

/// A kernel refusal during resolution that is the archive's fault.
fn resolve_fail(e: Errno, what: &str) -> Fail {
    match e {
        Errno::ELOOP => r("symlink-loop", format!("{what}: too many levels of symbolic links")),
        Errno::ENOTDIR => r("parent-not-directory", format!("{what}: a path component is not a directory")),
        Errno::EXDEV => r("mount-crossing", format!("{what}: resolution would cross a mount point")),
        Errno::ENAMETOOLONG => r("path-length", format!("{what}: name too long")),
        Errno::ENOENT => r("parent-unresolvable", format!("{what}: a parent is a dangling symlink")),
        Errno::ENOSYS => Fail::Err(Error::software("openat2(2) is not available: Linux 5.6 or later is required")),
        e => Fail::Err(Error::io(what.to_string(), std::io::Error::from(e))),
    }
}

fn io_fail(e: Errno, what: String) -> Fail {
    Fail::Err(Error::io(what, std::io::Error::from(e)))
}

/// Apply one layer read sequentially from `src` onto the directory `root`.
/// `layer` names the layer in error messages (key or file name).
pub fn apply_layer(root: &Path, src: &mut dyn Read, layer: &str, opts: &Options) -> Result<Report> {
    let mut head = Vec::with_capacity(512);
    src.take(512).read_to_end(&mut head).map_err(|e| Error::io(format!("layer {layer}: reading"), e))?;
    let magic = crate::magic::classify(&head);
    match magic {
        crate::magic::Magic::Tar | crate::magic::Magic::EmptyTar => {}
        m if m.is_compressed() => {
            return Err(Error::bad_data(format!(
            "layer {layer}: rule compressed: the layer is {}-compressed; thinimg reads uncompressed tar layers only",
            m.name()
        )))
        }
        crate::magic::Magic::TooShort if head.is_empty() => {
            return Err(Error::bad_data(format!("layer {layer}: rule not-tar: the layer is empty (0 bytes)")))
        }
        m => return Err(Error::bad_data(format!("layer {layer}: rule not-tar: {}", m.name()))),
    }
    let mut chained = std::io::Cursor::new(head).chain(src);
    let mut rootdir = Root::open(root).map_err(|e| Error::io(format!("opening {}", root.display()), e))?;
    let pool = Pool::new(opts.jobs)?;
    let mut a = Applier {
        root: &mut rootdir,
        limits: opts.limits,
        pool: &pool,
        report: Report { layer: layer.to_string(), ..Report::default() },
        created: HashSet::new(),
        ancestors: HashSet::new(),
        dir_meta: Vec::new(),
        dir_index: HashMap::new(),
        total: 0,
        applied: 0,
        small_buf: Vec::new(),
        inline_bytes: 0,
    };
    let mut stream = TarStream::new(&mut chained, opts.limits);
    let mut current: Option<String> = None;
    let mut res = a.run(&mut stream, &mut current);
    let applied = a.applied;
    let inline_bytes = a.inline_bytes;
    let mut report = std::mem::take(&mut a.report);
    let dir_meta = std::mem::take(&mut a.dir_meta);
    drop(a);
    let finished = pool.finish();
    if res.is_ok() {
        res = finished.map(|b| report.bytes_written = b + inline_bytes).map_err(Fail::Err);
    }
    if res.is_ok() {
        res = apply_dir_meta(&rootdir, &dir_meta);
    }
    match res {
        Ok(()) => Ok(report),
        Err(f) => {
            let entry = match &current {
                Some(e) => format!("entry {e:?}"),
                None => format!("entry #{}", stream.members().max(1)),
            };
            let consequence = if applied > 0 {
                format!(
                    " ({applied} entries of the rejected layer were applied to {0} before the rejection; {0} is not a consistent image)",
                    root.display()
                )
            } else {
                String::new()
            };
            Err(match f {
                Fail::Rule(rej) => match rej.io {
                    Some(e) => Error::io(format!("layer {layer}: reading the layer"), e),
                    None => Error::bad_data(format!("layer {layer}: {entry}: {rej}{consequence}")),
                },
                Fail::Err(e) => {
                    let k = e.kind();
                    e.context(format!("layer {layer}: {entry}{consequence}")).with_kind(k)
                }
            })
        }
    }
}

struct DirMeta {
    path: Vec<u8>,
    meta: Meta,
}

struct Applier<'a> {
    root: &'a mut Root,
    limits: Limits,
    pool: &'a Pool,
    report: Report,
    /// Paths this layer created; whiteouts never remove them.
    created: HashSet<Vec<u8>>,
    /// Directories holding something this layer created.
    ancestors: HashSet<Vec<u8>>,
    dir_meta: Vec<DirMeta>,
    dir_index: HashMap<Vec<u8>, usize>,
    total: u64,
    /// Entries fully applied (for the report of a rejected layer).
    applied: u64,
    /// Reused buffer for files written on the reader thread.
    small_buf: Vec<u8>,
    inline_bytes: u64,
}

/// Files up to this size are written by the reader thread itself.
const INLINE_MAX: u64 = 32 * 1024;

fn xattr_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

impl Applier<'_> {
    fn run(&mut self, stream: &mut TarStream<'_>, current: &mut Option<String>) -> Result<(), Fail> {
        while let Some(m) = stream.next_member()? {
            *current = Some(m.display());
            self.report.entries += 1;
            self.pool.check()?;
            self.entry(&m, stream)?;
            self.applied += 1;
        }
        *current = None;
        Ok(())
    }

    fn meta(&mut self, m: &Member) -> Result<Meta, Fail> {
        let uid =
            u32::try_from(m.uid).map_err(|_| r("owner-range", format!("uid {} does not fit in 32 bits", m.uid)))?;
        let gid =
            u32::try_from(m.gid).map_err(|_| r("owner-range", format!("gid {} does not fit in 32 bits", m.gid)))?;
        let mut xattrs = Vec::new();
        for (k, v) in &m.xattrs {
            if !xattr_allowed(k) {
                self.report.xattrs_dropped += 1;
                continue;
            }
            let name = CString::new(k.clone()).map_err(|_| r("xattr-name", "xattr name contains NUL"))?;
            if v.len() > 65536 {
                return Err(r("xattr-size", "xattr value larger than 64 KiB"));
            }
            xattrs.push((name, v.clone()));
            self.report.xattrs_set += 1;
        }
        Ok(Meta { uid, gid, mode: m.mode, mtime_sec: m.mtime_sec, mtime_nsec: m.mtime_nsec, xattrs })
    }

    fn mark_created(&mut self, path: &[u8]) {
        let mut p = path;
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            if !self.ancestors.insert(p.to_vec()) {
                break;
            }
        }
        self.created.insert(path.to_vec());
    }

    /// The parent directory of `cp`, created if missing.
    fn parent_of(&mut self, cp: &CleanPath) -> Result<BorrowedFd<'_>, Fail> {
        let parent = cp.parent();
        let mut made = Vec::new();
        let res = self.root.parent(&parent, true, &mut made).map(|_| ());
        for p in made {
            self.report.implicit_dirs += 1;
            self.mark_created(&p);
        }
        res.map_err(|e| resolve_fail(e, "resolving the parent directory"))?;
        self.root.parent(&parent, false, &mut Vec::new()).map_err(|e| resolve_fail(e, "resolving the parent directory"))
    }

    fn entry(&mut self, m: &Member, stream: &mut TarStream<'_>) -> Result<(), Fail> {
        let lim = self.limits;
        let cp = rules::clean(&m.path, lim.max_path_len, lim.max_depth, "path")?;
        self.total = self.total.saturating_add(m.data_size);
        if self.total > lim.max_total_size {
            return Err(r("total-size", format!("layer data exceeds --max-total-size {}", lim.max_total_size)));
        }
        if cp.is_root() {
            if m.kind == MemberKind::Dir {
                self.report.root_entries_ignored += 1;
                return Ok(());
            }
            return Err(r("root-entry", "an entry other than a directory names the root itself"));
        }
        match rules::whiteout(cp.name())? {
            Whiteout::Opaque => {
                self.report.opaque_dirs += 1;
                return self.opaque(&cp.parent());
            }
            Whiteout::Delete(target) => {
                self.report.whiteouts += 1;
                let mut p = cp.parent();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&target);
                return self.whiteout(&p);
            }
            Whiteout::None => {}
        }
        if m.kind == MemberKind::File && m.apparent_size() > lim.max_file_size {
            return Err(r(
                "file-size",
                format!("file of {} bytes exceeds --max-file-size {}", m.apparent_size(), lim.max_file_size),
            ));
        }
        let meta = self.meta(m)?;
        let joined = cp.joined();
        match m.kind {
            MemberKind::Dir => self.dir(&cp, &joined, meta),
            MemberKind::File => self.file(&cp, &joined, meta, m, stream),
            MemberKind::Symlink => self.symlink(&cp, &joined, meta, m),
            MemberKind::HardLink => self.hardlink(&cp, &joined, m),
            MemberKind::Char | MemberKind::Block | MemberKind::Fifo => self.node(&cp, &joined, meta, m),
        }
    }

    /// Clear the final name for a new non-directory entry.
    fn clear_name(&mut self, cp: &CleanPath) -> Result<(), Fail> {
        let name = cp.name().to_vec();
        let pfd = self.parent_of(cp)?;
        let exists = root::lstat_at(pfd, &name).map_err(|e| io_fail(e, "inspecting the existing entry".into()))?;
        if exists.is_some() {
            root::remove_at(pfd, &name).map_err(|e| io_fail(e, "removing the existing entry".into()))?;
            self.root.invalidate();
            self.report.replaced += 1;
        }
        Ok(())
    }

    /// Create the final component with `make` (which must fail with EEXIST
    /// rather than reuse a name); an existing entry is removed first only
    /// when there is one, saving a lookup per entry on fresh trees.
    fn create_new<T>(
        &mut self,
        cp: &CleanPath,
        what: &str,
        make: impl Fn(BorrowedFd<'_>, &[u8]) -> Result<T, Errno>,
    ) -> Result<T, Fail> {
        let name = cp.name().to_vec();
        let first = {
            let pfd = self.parent_of(cp)?;
            make(pfd, &name)
        };
        match first {
            Err(Errno::EEXIST) => {
                self.clear_name(cp)?;
                let pfd = self.parent_of(cp)?;
                make(pfd, &name).map_err(|e| io_fail(e, format!("creating the {what}")))
            }
            r => r.map_err(|e| io_fail(e, format!("creating the {what}"))),
        }
    }

    fn dir(&mut self, cp: &CleanPath, joined: &[u8], meta: Meta) -> Result<(), Fail> {
        let name = cp.name().to_vec();
        let pfd = self.parent_of(cp)?;
        let existing = match root::mkdir(pfd, &name) {
            Ok(()) => None,
            Err(Errno::EEXIST) => {
                root::lstat_at(pfd, &name).map_err(|e| io_fail(e, "inspecting the existing entry".into()))?
            }
            Err(e) => return Err(io_fail(e, "creating the directory".into())),
        };
        match existing {
            None => {}
            Some(st) if root::is_dir(&st) => {}
            Some(_) => {
                root::remove_at(pfd, &name).map_err(|e| io_fail(e, "removing the existing entry".into()))?;
                self.report.replaced += 1;
                self.root.invalidate();
                let pfd = self.parent_of(cp)?;
                root::mkdir(pfd, &name).map_err(|e| io_fail(e, "creating the directory".into()))?;
            }
        }
        self.report.dirs += 1;
        self.mark_created(joined);
        match self.dir_index.get(joined) {
            Some(&i) => self.dir_meta[i].meta = meta,
            None => {
                self.dir_index.insert(joined.to_vec(), self.dir_meta.len());
                self.dir_meta.push(DirMeta { path: joined.to_vec(), meta });
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        cp: &CleanPath,
        joined: &[u8],
        meta: Meta,
        m: &Member,
        stream: &mut TarStream<'_>,
    ) -> Result<(), Fail> {
        let file = self.create_new(cp, "file", root::create_file)?;
        self.mark_created(joined);
        self.report.files += 1;
        let segments: Vec<(u64, u64)> = match &m.sparse {
            Some(s) => {
                self.report.sparse_files += 1;
                file.set_len(s.real_size).map_err(|e| Fail::Err(Error::io("sizing the sparse file", e)))?;
                s.map.clone()
            }
            None if m.data_size <= INLINE_MAX => return self.small_file(file, meta, m, stream),
            None => vec![(0, m.data_size)],
        };
        let pf = PendingFile::new(file, meta, m.display());
        let res = self.stream_data(&pf, &segments, stream);
        self.pool.done(&pf);
        res
    }

    /// A small file is written on the reader thread: handing it to a worker
    /// costs more (two thread wake-ups) than the write itself. Same order:
    /// data, then owner, xattrs, mode, times.
    fn small_file(
        &mut self,
        file: std::fs::File,
        meta: Meta,
        m: &Member,
        stream: &mut TarStream<'_>,
    ) -> Result<(), Fail> {
        use std::io::Write;
        let mut buf = std::mem::take(&mut self.small_buf);
        buf.resize(m.data_size as usize, 0);
        let mut got = 0;
        while got < buf.len() {
            let n = stream.read_data(&mut buf[got..])?;
            if n == 0 {
                return Err(r("truncated", "entry data ends before its declared size"));
            }
            got += n;
        }
        let name = m.display();
        (&file).write_all(&buf).map_err(|e| Fail::Err(Error::io(format!("writing {name}"), e)))?;
        self.inline_bytes += buf.len() as u64;
        self.small_buf = buf;
        root::apply_meta_fd(file.as_fd(), &meta)
            .map_err(|(op, e)| Fail::Err(root::meta_error(op, e, &format!("file {name:?}"))))
    }

    fn stream_data(
        &mut self,
        pf: &Arc<PendingFile>,
        segs: &[(u64, u64)],
        stream: &mut TarStream<'_>,
    ) -> Result<(), Fail> {
        for &(off, len) in segs {
            let mut done = 0u64;
            while done < len {
                let mut buf = self.pool.buffer();
                let want = (len - done).min(CHUNK as u64) as usize;
                buf.resize(want, 0);
                let mut got = 0;
                while got < want {
                    let n = stream.read_data(&mut buf[got..])?;
                    if n == 0 {
                        return Err(r("truncated", "entry data ends before its declared size"));
                    }
                    got += n;
                }
                self.pool.write(pf, off + done, buf)?;
                done += want as u64;
            }
        }
        Ok(())
    }

    fn symlink(&mut self, cp: &CleanPath, joined: &[u8], meta: Meta, m: &Member) -> Result<(), Fail> {
        if m.link.is_empty() {
            return Err(r("symlink-target", "symlink with an empty target"));
        }
        if m.link.contains(&0) {
            return Err(r("nul-in-path", "symlink target contains a NUL byte"));
        }
        if m.link.len() as u64 > self.limits.max_path_len {
            return Err(r("path-length", "symlink target longer than --max-path-len"));
        }
        // No xattrs on symlinks: setting them needs a path-based call that
        // would follow nothing useful here; counted as dropped.
        let n = meta.xattrs.len() as u64;
        self.report.xattrs_set -= n;
        self.report.xattrs_dropped += n;
        self.create_new(cp, "symlink", |pfd, n| root::symlink(pfd, n, &m.link))?;
        let name = cp.name().to_vec();
        let pfd = self.parent_of(cp)?;
        root::apply_meta_at(pfd, &name, &meta, true)
            .map_err(|(op, e)| Fail::Err(root::meta_error(op, e, "the symlink")))?;
        self.mark_created(joined);
        self.report.symlinks += 1;
        Ok(())
    }

    fn hardlink(&mut self, cp: &CleanPath, joined: &[u8], m: &Member) -> Result<(), Fail> {
        let lim = self.limits;
        let target = rules::clean(&m.link, lim.max_path_len, lim.max_depth, "hard-link target")?;
        if target.is_root() {
            return Err(r("hardlink-target", "hard link to the root directory"));
        }
        if target == *cp {
            return Err(r("hardlink-target", "hard link to itself"));
        }
        // Resolve the source first: its parent in the root, its last
        // component not followed (a link to a symlink links the symlink).
        let tparent = target.parent();
        let tname = target.name().to_vec();
        let sfd = self.root.dir(&tparent).map_err(|e| match e {
            Errno::ENOENT => r("hardlink-target", format!("target {:?} does not exist", stream::display_path(&m.link))),
            e => resolve_fail(e, "resolving the hard-link target"),
        })?;
        match root::lstat_at(sfd.as_fd(), &tname).map_err(|e| io_fail(e, "inspecting the hard-link target".into()))? {
            None => {
                return Err(r("hardlink-target", format!("target {:?} does not exist", stream::display_path(&m.link))))
            }
            Some(st) if root::is_dir(&st) => return Err(r("hardlink-target", "hard link to a directory")),
            Some(_) => {}
        }
        self.clear_name(cp)?;
        let name = cp.name().to_vec();
        // Clearing may have removed the target (a/x linked from a/x/..): re-resolve.
        let sfd = self.root.dir(&tparent).map_err(|e| resolve_fail(e, "resolving the hard-link target"))?;
        let pfd = self.parent_of(cp)?;
        match root::hardlink(sfd.as_fd(), &tname, pfd, &name) {
            Ok(()) => {}
            Err(Errno::ENOENT) => return Err(r("hardlink-target", "target vanished while linking")),
            Err(Errno::EXDEV) => return Err(r("mount-crossing", "hard link across file systems")),
            Err(Errno::EMLINK) => {
                return Err(r("hardlink-count", "the target has the most links the file system allows"))
            }
            Err(e) => return Err(io_fail(e, "creating the hard link".into())),
        }
        self.mark_created(joined);
        self.report.hardlinks += 1;
        Ok(())
    }

    fn node(&mut self, cp: &CleanPath, joined: &[u8], meta: Meta, m: &Member) -> Result<(), Fail> {
        let kind = match m.kind {
            MemberKind::Char => SFlag::S_IFCHR,
            MemberKind::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        // Linux device numbers are 12-bit major, 20-bit minor; mknod
        // refuses others with EINVAL, which is the archive's fault.
        if kind != SFlag::S_IFIFO && (m.dev_major >= 1 << 12 || m.dev_minor >= 1 << 20) {
            return Err(r(
                "device-number",
                format!("device {}:{} is not a Linux device number", m.dev_major, m.dev_minor),
            ));
        }
        self.create_new(cp, "node", |pfd, n| root::mknod(pfd, n, kind, m.dev_major, m.dev_minor))?;
        let name = cp.name().to_vec();
        let pfd = self.parent_of(cp)?;
        root::apply_meta_at(pfd, &name, &meta, false)
            .map_err(|(op, e)| Fail::Err(root::meta_error(op, e, "the node")))?;
        self.mark_created(joined);
        if m.kind == MemberKind::Fifo {
            self.report.fifos += 1;
        } else {
            self.report.devices += 1;
        }
        Ok(())
    }

    /// `.wh.NAME`: remove lower-layer content at `path`.
    fn whiteout(&mut self, path: &[u8]) -> Result<(), Fail> {
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        let pfd = match self.root.dir(parent) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return Ok(()),
            Err(e) => return Err(resolve_fail(e, "resolving the whiteout's directory")),
        };
        if root::lstat_at(pfd.as_fd(), name)
            .map_err(|e| io_fail(e, "inspecting the whited-out entry".into()))?
            .is_none()
        {
            return Ok(());
        }
        self.prune(pfd.as_fd(), name, path.to_vec())
    }

    /// `.wh..wh..opq` in `dir`: remove its lower-layer content.
    fn opaque(&mut self, dir: &[u8]) -> Result<(), Fail> {
        let dfd = match self.root.reopen_dir(dir) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => return Ok(()),
            Err(e) => return Err(resolve_fail(e, "resolving the opaque directory")),
        };
        for child in root::list_dir(&dfd).map_err(|e| io_fail(e, "listing the opaque directory".into()))? {
            let mut p = dir.to_vec();
            if !p.is_empty() {
                p.push(b'/');
            }
            p.extend_from_slice(&child);
            self.prune(dfd.as_fd(), &child, p)?;
        }
        Ok(())
    }

    /// Remove what lower layers put at `rel` (`name` in `dir`), keeping
    /// everything this layer created, wherever the marker sat in the stream.
    fn prune(&mut self, dir: BorrowedFd<'_>, name: &[u8], rel: Vec<u8>) -> Result<(), Fail> {
        let st = match root::lstat_at(dir, name).map_err(|e| io_fail(e, "inspecting a lower entry".into()))? {
            Some(st) => st,
            None => return Ok(()),
        };
        let ours = self.created.contains(&rel);
        let holds_ours = self.ancestors.contains(&rel);
        if (ours || holds_ours) && root::is_dir(&st) {
            let sub = root::open_subdir(dir, name).map_err(|e| io_fail(e, "opening a lower directory".into()))?;
            for child in root::list_dir(&sub).map_err(|e| io_fail(e, "listing a lower directory".into()))? {
                let mut p = rel.clone();
                p.push(b'/');
                p.extend_from_slice(&child);
                self.prune(sub.as_fd(), &child, p)?;
            }
            return Ok(());
        }
        if ours {
            return Ok(());
        }
        root::remove_at(dir, name).map_err(|e| io_fail(e, "removing a whited-out entry".into()))?;
        self.root.invalidate();
        Ok(())
    }
}

/// Directory modes and times last (creating entries changes a directory's
/// mtime; a read-only mode must not stop later entries), through
/// re-opened O_NOFOLLOW|O_DIRECTORY fds. A directory later replaced by
/// another type is skipped: the later entry won.
fn apply_dir_meta(root: &Root, dirs: &[DirMeta]) -> Result<(), Fail> {
    for d in dirs.iter().rev() {
        let fd = match root.reopen_dir(&d.path) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => continue,
            Err(e) => return Err(resolve_fail(e, "re-opening a directory for its metadata")),
        };
        root::apply_meta_fd(fd.as_fd(), &d.meta).map_err(|(op, e)| {
            Fail::Err(root::meta_error(op, e, &format!("directory {:?}", stream::display_path(&d.path))))
        })?;
    }
    Ok(())
}

/// Kind of an error from [`apply_layer`] that means "this layer is bad".
pub fn is_rejection(e: &Error) -> bool {
    e.kind() == Kind::BadData
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_limits_are_the_flag_table_defaults() {
        let d = Limits::default();
        let want = |long: &str| -> u64 {
            let f = crate::cli::table::EXTRACT.iter().find(|f| f.long == long).expect("flag in table");
            crate::cli::parse_size(f.default.expect("a default")).expect("parses")
        };
        assert_eq!(d.max_entries, want("max-entries"));
        assert_eq!(d.max_file_size, want("max-file-size"));
        assert_eq!(d.max_total_size, want("max-total-size"));
        assert_eq!(d.max_path_len, want("max-path-len"));
        assert_eq!(d.max_depth, want("max-depth"));
        assert_eq!(d.max_header_size, want("max-header-size"));
    }

    #[test]
    fn limits_from_flags() {
        let inv = crate::cli::Invocation::for_test(
            "unpack",
            &[],
            &[("max-entries", "10"), ("max-file-size", "1K"), ("max-header-size", "2M"), ("jobs", "3")],
        );
        let o = Options::from_invocation(&inv).unwrap();
        assert_eq!((o.limits.max_entries, o.limits.max_file_size, o.limits.max_header_size), (10, 1024, 2 << 20));
        assert_eq!(o.jobs, 3);
        assert_eq!(o.limits.max_depth, Limits::default().max_depth);
        let bad = crate::cli::Invocation::for_test("unpack", &[], &[("max-entries", "lots")]);
        assert_eq!(Limits::from_invocation(&bad).unwrap_err().kind(), Kind::Usage);
        let zero = crate::cli::Invocation::for_test("unpack", &[], &[("jobs", "0")]);
        assert_eq!(Options::from_invocation(&zero).unwrap_err().kind(), Kind::Usage);
    }

    fn tar_of(n: usize, pax_comment: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..n {
            let mut h = tar::Header::new_ustar();
            h.set_size(3);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            if pax_comment > 0 {
                b.append_pax_extensions([("comment", vec![b'c'; pax_comment].as_slice())]).unwrap();
            }
            b.append_data(&mut h, format!("f{i}"), &b"abc"[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn walk(bytes: &[u8], limits: Limits) -> std::result::Result<u64, &'static str> {
        let mut src: &[u8] = bytes;
        let mut s = TarStream::new(&mut src, limits);
        let mut n = 0;
        let mut buf = [0u8; 64];
        loop {
            match s.next_member() {
                Ok(Some(_)) => {
                    n += 1;
                    while s.read_data(&mut buf).map_err(|r| r.rule)? > 0 {}
                }
                Ok(None) => return Ok(n),
                Err(r) => return Err(r.rule),
            }
        }
    }

    #[test]
    fn entry_count_is_accounted_exactly() {
        let t = tar_of(5, 0);
        assert_eq!(walk(&t, Limits { max_entries: 5, ..Limits::default() }), Ok(5));
        assert_eq!(walk(&t, Limits { max_entries: 4, ..Limits::default() }), Err("entry-count"));
    }

    #[test]
    fn extension_header_size_is_accounted_before_reading() {
        let t = tar_of(1, 3000);
        assert_eq!(walk(&t, Limits { max_header_size: 4096, ..Limits::default() }), Ok(1));
        assert_eq!(walk(&t, Limits { max_header_size: 2048, ..Limits::default() }), Err("header-size"));
        // Only the header block of a huge extension is present: refused from
        // its size field, without reading (or allocating) the body.
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(1 << 40);
        h.set_cksum();
        assert_eq!(walk(h.as_bytes(), Limits::default()), Err("header-size"));
    }

    #[test]
    fn truncation_is_detected() {
        let t = tar_of(2, 0);
        // Cut inside the second file's data (header 512+512, header, 3 bytes of data).
        assert_eq!(walk(&t[..1024 + 512 + 2], Limits::default()), Err("truncated"));
        assert_eq!(walk(&t[..1024 + 100], Limits::default()), Err("truncated"));
        // Cut right after a complete member (no end-of-archive marker) is accepted.
        assert_eq!(walk(&t[..1024], Limits::default()), Ok(1));
    }
}
