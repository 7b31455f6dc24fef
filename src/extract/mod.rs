//! Applying one hostile layer tarball onto a root directory with
//! container-layer semantics: regular files, directories, symlinks (targets
//! verbatim), hard links (resolved inside the root), devices and FIFOs,
//! OCI whiteouts and opaque directories (acting on lower layers only),
//! numeric ownership, modes, times and xattrs.
//!
//! Owns: the limits (checked before bytes are written), the lexical rules
//! (`rules`), the tar block walk (`stream`), in-root creation through
//! openat2 (`root`) and the bounded file writers (`writers`). It must never
//! write outside the root it was given, never follow a final-component
//! symlink, never look up user or group names, never feed compressed or
//! non-tar data to the parser, and never panic on input.
//!
//! Compressed layers (gzip, zstd, xz, bzip2, lz4) are recognised by magic
//! number and refused with a clear error naming the compression: the
//! allowed dependency set has no decompressor, and the reference bucket
//! holds uncompressed tars only. Refusing is safer than a hand-written
//! inflater and keeps every limit meaningful.

pub mod root;
pub mod rules;
pub mod stream;
pub mod writers;

use std::collections::HashMap;
use std::ffi::CString;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::stat::SFlag;

use crate::error::{Error, Kind, Result};
use root::{Meta, Root};
use rules::{CleanPath, Reject, Whiteout};
use stream::{Member, MemberKind, TarStream};
use writers::{PendingFile, Writers, CHUNK};

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

/// What a layer may materialize besides plain files, directories, links
/// and FIFOs. The pipeline keeps everything (its build mounts are
/// nosuid,nodev); `thinimg unpack` onto a host directory keeps neither
/// unless asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// setuid/setgid bits on non-directories and `security.capability`.
    pub privileges: bool,
    /// Character and block device nodes.
    pub devices: bool,
}

impl Policy {
    pub const FULL: Policy = Policy { privileges: true, devices: true };
    pub const SAFE: Policy = Policy { privileges: false, devices: false };
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::FULL
    }
}

/// How to apply a layer.
#[derive(Debug, Clone)]
pub struct Options {
    pub limits: Limits,
    /// File-writer threads (at least 1).
    pub jobs: usize,
    pub policy: Policy,
}

impl Default for Options {
    fn default() -> Options {
        Options { limits: Limits::default(), jobs: default_jobs(), policy: Policy::FULL }
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
    /// Of `bytes_written`, those written with direct I/O (whole 256 KiB
    /// chunks of larger files, where the filesystem has it).
    pub bytes_direct: u64,
    pub xattrs_set: u64,
    /// xattrs not applied by policy (security.selinux, trusted.*, unknown namespaces).
    pub xattrs_dropped: u64,
    /// Entries naming the root itself ("./"), which never change it.
    pub root_entries_ignored: u64,
    /// setuid/setgid bits not applied (policy without privileges).
    pub setid_bits_stripped: u64,
    /// security.capability xattrs not applied (policy without privileges).
    pub capabilities_dropped: u64,
    /// Device nodes not created (policy without devices).
    pub devices_skipped: u64,
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

/// An error of the target file system that the entry caused: the layer
/// asks for more than the file system allows (space, links, xattr room,
/// open files for its depth). It is the layer's fault, not "retry later".
pub fn target_rule(e: Errno) -> Option<&'static str> {
    match e {
        Errno::ENOSPC | Errno::EDQUOT => Some("no-space"),
        Errno::EMLINK => Some("link-count"),
        Errno::E2BIG | Errno::ERANGE => Some("xattr-value"),
        Errno::EMFILE | Errno::ENFILE => Some("fd-limit"),
        Errno::EFBIG => Some("file-size"),
        Errno::ENAMETOOLONG => Some("path-length"),
        _ => None,
    }
}

/// An error of the target, classified: the entry's fault (a rule), an
/// interruption (SIGINT/SIGTERM seen during a long removal), or plain I/O.
fn io_fail(e: Errno, what: String) -> Fail {
    if e == Errno::EINTR && crate::ops::signals::pending().is_some() {
        return Fail::Err(crate::ops::signals::interrupted_error());
    }
    match target_rule(e) {
        Some(rule) => r(rule, format!("{what}: {}", std::io::Error::from(e))),
        None => Fail::Err(Error::io(what, std::io::Error::from(e))),
    }
}

/// The same for an `std::io::Error` (file data written by the writers).
pub fn target_error(what: String, e: std::io::Error) -> Error {
    match e.raw_os_error().map(Errno::from_raw).and_then(target_rule) {
        Some(rule) => Error::bad_data(format!("rule {rule}: {what}: {e}")),
        None => Error::io(what, e),
    }
}

fn meta_fail(op: &'static str, e: Errno, what: &str) -> Fail {
    if e == Errno::EINTR && crate::ops::signals::pending().is_some() {
        return Fail::Err(crate::ops::signals::interrupted_error());
    }
    Fail::Err(root::meta_error(op, e, what))
}

/// A fresh node or symlink was swapped for something else between its
/// creation and its metadata: another local process can write to its
/// directory. Nothing is applied to the impostor.
fn replaced(what: &str) -> Fail {
    Fail::Err(Error::new(
        Kind::Io,
        format!(
            "the new {what} was replaced by another process before its metadata was applied (a local user can write to its directory); nothing was applied to the replacement"
        ),
    ))
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
    let writers = Writers::new(opts.jobs)?;
    let mut a = Applier {
        root: &mut rootdir,
        limits: opts.limits,
        writers: &writers,
        report: Report { layer: layer.to_string(), ..Report::default() },
        policy: opts.policy,
        paths: PathSet::new(),
        dir_meta: Vec::new(),
        dir_index: HashMap::new(),
        retained: 0,
        xattr_bytes: 0,
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
    let finished = writers.finish();
    if res.is_ok() {
        res = finished
            .map(|(b, d)| {
                report.bytes_written = b + inline_bytes;
                report.bytes_direct = d;
            })
            .map_err(Fail::Err);
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
                    Some(e)
                        if e.kind() == std::io::ErrorKind::Interrupted && crate::ops::signals::pending().is_some() =>
                    {
                        crate::ops::signals::interrupted_error().context(format!("layer {layer}: {entry}"))
                    }
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

/// A directory's mode and times, applied when the layer is done (and a
/// default ACL, which would otherwise be inherited by the entries created
/// in it; and the owner when the entry has no xattrs). Other xattrs are
/// applied at once, so nothing large is kept per directory.
struct DirMeta {
    path: Box<[u8]>,
    /// The directory this entry made or met: the deferred metadata goes to
    /// that inode only, never to whatever the path names at the end.
    dev: u64,
    ino: u64,
    /// Still to apply (`None`: applied with the xattrs).
    owner: Option<(u32, u32)>,
    mode: u32,
    mtime_sec: i64,
    mtime_nsec: u32,
    acl_default: Option<Vec<u8>>,
}

const CREATED: u8 = 1;
const ANCESTOR: u8 = 2;

/// The paths this layer created, and the directories holding them, keyed
/// by a 128-bit hash of their components under per-layer random keys: a
/// fixed, small cost per path whatever its length, and no collisions an
/// archive could aim for.
struct PathSet {
    keys: (RandomState, RandomState),
    map: HashMap<u128, u8>,
}

impl PathSet {
    fn new() -> PathSet {
        PathSet { keys: (RandomState::new(), RandomState::new()), map: HashMap::new() }
    }

    /// The key of every prefix of `path` ("a", "a/b", "a/b/c"), in order.
    fn prefixes(&self, path: &[u8]) -> Vec<u128> {
        let (mut a, mut b) = (self.keys.0.build_hasher(), self.keys.1.build_hasher());
        let mut out = Vec::new();
        for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            for h in [&mut a, &mut b] {
                h.write_usize(c.len());
                h.write(c);
            }
            out.push((u128::from(a.clone().finish()) << 64) | u128::from(b.clone().finish()));
        }
        out
    }

    fn key(&self, path: &[u8]) -> u128 {
        self.prefixes(path).last().copied().unwrap_or(0)
    }

    fn flags(&self, path: &[u8]) -> u8 {
        self.map.get(&self.key(path)).copied().unwrap_or(0)
    }

    /// Mark `path` created and its parents as holding it; returns the
    /// number of new keys.
    fn mark(&mut self, path: &[u8]) -> u64 {
        let keys = self.prefixes(path);
        let Some((&last, parents)) = keys.split_last() else { return 0 };
        let mut added = 0;
        let f = self.map.entry(last).or_insert_with(|| {
            added += 1;
            0
        });
        *f |= CREATED;
        for &k in parents.iter().rev() {
            let f = self.map.entry(k).or_insert_with(|| {
                added += 1;
                0
            });
            if *f & ANCESTOR != 0 {
                break;
            }
            *f |= ANCESTOR;
        }
        added
    }
}

/// Memory kept for the whole layer (path keys, deferred directory
/// metadata) may grow by this much plus [`RETAINED_PER_ENTRY`] for every
/// entry read; beyond, the layer is refused (rule metadata-budget).
/// Ordinary layers use a fraction of it.
const RETAINED_BASE: u64 = 16 << 20;
const RETAINED_PER_ENTRY: u64 = 256;
/// Bytes one path key costs in the set (key, flags, table overhead).
const KEY_COST: u64 = 40;
/// xattr bytes handled (applied or dropped) may exceed the archive bytes
/// read by this much (global headers make members inherit xattrs they do
/// not carry); beyond, the layer is refused (rule xattr-amplification).
/// Each xattr counts at least [`XATTR_MIN_COST`] bytes.
const XATTR_SLACK: u64 = 16 << 20;
const XATTR_MIN_COST: u64 = 64;

struct Applier<'a> {
    root: &'a mut Root,
    limits: Limits,
    writers: &'a Writers,
    report: Report,
    policy: Policy,
    /// Paths this layer created (whiteouts never remove them) and the
    /// directories holding them.
    paths: PathSet,
    dir_meta: Vec<DirMeta>,
    dir_index: HashMap<u128, usize>,
    /// Bytes of bookkeeping kept for the layer (see [`RETAINED_BASE`]).
    retained: u64,
    /// xattr bytes handled so far (see [`XATTR_SLACK`]).
    xattr_bytes: u64,
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
            self.writers.check()?;
            crate::ops::signals::check()?;
            self.entry(&m, stream)?;
            self.applied += 1;
        }
        *current = None;
        Ok(())
    }

    /// Owner, mode, times and (with `xattrs_apply`: files and directories,
    /// the only objects they can be set on through an fd) the allowed
    /// xattrs. `read` is the layer bytes read so far.
    fn meta(&mut self, m: &Member, xattrs_apply: bool, read: u64) -> Result<Meta, Fail> {
        // (uid_t)-1 means "leave unchanged" to chown: the object would stay root's.
        let id = |v: u64, what: &str| match u32::try_from(v) {
            Ok(u32::MAX) | Err(_) => {
                Err(r("owner-range", format!("{what} {v} is not a valid owner (0..={})", u32::MAX - 1)))
            }
            Ok(v) => Ok(v),
        };
        let uid = id(m.uid, "uid")?;
        let gid = id(m.gid, "gid")?;
        let mut mode = m.mode;
        if !self.policy.privileges && m.kind != MemberKind::Dir && mode & 0o6000 != 0 {
            mode &= !0o6000;
            self.report.setid_bits_stripped += 1;
        }
        let mut xattrs = Vec::new();
        for (k, v) in m.all_xattrs() {
            // Every xattr a member carries or inherits costs work, applied
            // or not: the total is bounded by the bytes read.
            self.xattr_bytes += ((k.len() + v.len()) as u64).max(XATTR_MIN_COST);
            if self.xattr_bytes > read.saturating_add(XATTR_SLACK) {
                return Err(r(
                    "xattr-amplification",
                    format!(
                        "xattrs of the entries so far ({} bytes) exceed the layer bytes read ({read}) by more than {} MiB (global headers make every entry inherit theirs)",
                        self.xattr_bytes,
                        XATTR_SLACK >> 20
                    ),
                ));
            }
            if !xattr_allowed(k) || !xattrs_apply {
                self.report.xattrs_dropped += 1;
                continue;
            }
            if !self.policy.privileges && k == b"security.capability" {
                self.report.capabilities_dropped += 1;
                continue;
            }
            let name = CString::new(k).map_err(|_| r("xattr-name", "xattr name contains NUL"))?;
            if v.len() > 65536 {
                return Err(r("xattr-size", "xattr value larger than 64 KiB"));
            }
            xattrs.push((name, v.to_vec()));
            self.report.xattrs_set += 1;
        }
        Ok(Meta { uid, gid, mode, mtime_sec: m.mtime_sec, mtime_nsec: m.mtime_nsec, xattrs })
    }

    /// Count `bytes` more of kept bookkeeping against the layer's budget.
    fn retain(&mut self, bytes: u64) -> Result<(), Fail> {
        self.retained += bytes;
        let budget = RETAINED_BASE + RETAINED_PER_ENTRY * self.report.entries;
        if self.retained > budget {
            return Err(r(
                "metadata-budget",
                format!(
                    "the layer needs {} bytes of path and directory bookkeeping after {} entries, more than its budget of {} ({} MiB + {} bytes per entry)",
                    self.retained,
                    self.report.entries,
                    budget,
                    RETAINED_BASE >> 20,
                    RETAINED_PER_ENTRY
                ),
            ));
        }
        Ok(())
    }

    fn mark_created(&mut self, path: &[u8]) -> Result<(), Fail> {
        let added = self.paths.mark(path);
        self.retain(added * KEY_COST)
    }

    /// The parent directory of `cp`, created if missing.
    fn parent_of(&mut self, cp: &CleanPath) -> Result<BorrowedFd<'_>, Fail> {
        let parent = cp.parent();
        let mut made = Vec::new();
        let res = self.root.parent(&parent, true, &mut made).map(|_| ());
        for p in made {
            self.report.implicit_dirs += 1;
            self.mark_created(&p)?;
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
        let xattrs_apply = matches!(m.kind, MemberKind::File | MemberKind::Dir);
        let meta = self.meta(m, xattrs_apply, stream.offset)?;
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
        self.mark_created(joined)?;
        // xattrs now (with the owner first: chown would clear a capability),
        // through the directory itself; mode and times (and a default ACL,
        // inherited by what is created in it, and the owner when there are
        // no xattrs) at the end.
        let pfd = self.parent_of(cp)?;
        let (acl, now): (Vec<_>, Vec<_>) =
            meta.xattrs.into_iter().partition(|(n, _)| n.as_bytes() == b"system.posix_acl_default");
        let now = Meta { xattrs: now, ..meta };
        let (st, owner) = if now.xattrs.is_empty() {
            let st = root::lstat_at(pfd, &name).map_err(|e| io_fail(e, "inspecting the directory".into()))?;
            match st {
                Some(st) if root::is_dir(&st) => (st, Some((now.uid, now.gid))),
                _ => return Err(replaced("directory")),
            }
        } else {
            let fd = root::open_subdir(pfd, &name).map_err(|e| io_fail(e, "opening the directory".into()))?;
            let what = format!("directory {:?}", stream::display_path(joined));
            root::apply_owner_xattrs_fd(fd.as_fd(), &now).map_err(|(op, e)| meta_fail(op, e, &what))?;
            let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| io_fail(e, "inspecting the directory".into()))?;
            (st, None)
        };
        let d = DirMeta {
            path: joined.into(),
            dev: st.st_dev,
            ino: st.st_ino,
            owner,
            mode: now.mode,
            mtime_sec: now.mtime_sec,
            mtime_nsec: now.mtime_nsec,
            acl_default: acl.into_iter().next().map(|(_, v)| v),
        };
        let key = self.paths.key(joined);
        let acl_len = |d: &DirMeta| d.acl_default.as_ref().map_or(0, |v| v.len() as u64);
        match self.dir_index.get(&key) {
            Some(&i) => {
                let grow = acl_len(&d).saturating_sub(acl_len(&self.dir_meta[i]));
                self.retain(grow)?;
                self.dir_meta[i] = d;
            }
            None => {
                self.retain(d.path.len() as u64 + acl_len(&d) + 64 + KEY_COST)?;
                self.dir_index.insert(key, self.dir_meta.len());
                self.dir_meta.push(d);
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
        self.mark_created(joined)?;
        self.report.files += 1;
        let segments: Vec<(u64, u64)> = match &m.sparse {
            Some(s) => {
                self.report.sparse_files += 1;
                file.set_len(s.real_size).map_err(|e| Fail::Err(target_error("sizing the sparse file".into(), e)))?;
                s.map.clone()
            }
            None if m.data_size <= INLINE_MAX => return self.small_file(file, meta, m, stream),
            None => vec![(0, m.data_size)],
        };
        let whole_chunks = segments.iter().any(|&(_, len)| len >= CHUNK as u64);
        let pf = PendingFile::new(file, meta, m.display(), whole_chunks);
        let res = self.stream_data(&pf, &segments, stream);
        self.writers.done(&pf);
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
        // Kept at its largest length: only growth is zero-filled.
        let mut buf = std::mem::take(&mut self.small_buf);
        let size = m.data_size as usize;
        if buf.len() < size {
            buf.resize(size, 0);
        }
        let data = &mut buf[..size];
        let mut got = 0;
        while got < data.len() {
            let n = stream.read_data(&mut data[got..])?;
            if n == 0 {
                return Err(r("truncated", "entry data ends before its declared size"));
            }
            got += n;
        }
        let name = m.display();
        (&file).write_all(data).map_err(|e| Fail::Err(target_error(format!("writing {name}"), e)))?;
        self.inline_bytes += size as u64;
        self.small_buf = buf;
        root::apply_meta_fd(file.as_fd(), &meta).map_err(|(op, e)| meta_fail(op, e, &format!("file {name:?}")))
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
                crate::ops::signals::check()?;
                let mut buf = self.writers.buffer();
                let want = (len - done).min(CHUNK as u64) as usize;
                let mut got = 0;
                while got < want {
                    let n = stream.read_data(&mut buf[got..want])?;
                    if n == 0 {
                        return Err(r("truncated", "entry data ends before its declared size"));
                    }
                    got += n;
                }
                self.writers.write(pf, off + done, buf, want)?;
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
        // No xattrs on symlinks (counted as dropped by `meta`): they cannot
        // be set through an fd.
        self.create_new(cp, "symlink", |pfd, n| root::symlink(pfd, n, &m.link))?;
        self.fresh_meta(cp, SFlag::S_IFLNK, None, &meta, "symlink")?;
        self.mark_created(joined)?;
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
        self.mark_created(joined)?;
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
        if kind != SFlag::S_IFIFO && !self.policy.devices {
            self.report.devices_skipped += 1;
            return Ok(());
        }
        self.create_new(cp, "node", |pfd, n| root::mknod(pfd, n, kind, m.dev_major, m.dev_minor))?;
        let rdev = (kind != SFlag::S_IFIFO).then(|| libc::makedev(m.dev_major, m.dev_minor));
        self.fresh_meta(cp, kind, rdev, &meta, "node")?;
        self.mark_created(joined)?;
        if m.kind == MemberKind::Fifo {
            self.report.fifos += 1;
        } else {
            self.report.devices += 1;
        }
        Ok(())
    }

    /// Metadata of a symlink or node this entry just created, through an
    /// O_PATH handle checked to be that object (never by name: another
    /// local process may swap the name for a symlink to a host file).
    fn fresh_meta(
        &mut self,
        cp: &CleanPath,
        kind: SFlag,
        rdev: Option<u64>,
        meta: &Meta,
        what: &str,
    ) -> Result<(), Fail> {
        let name = cp.name().to_vec();
        let pfd = self.parent_of(cp)?;
        let h = root::open_handle(pfd, &name).map_err(|e| match e {
            Errno::ENOENT => replaced(what),
            e => io_fail(e, format!("opening the new {what}")),
        })?;
        if !root::is_fresh(h.as_fd(), kind, rdev).map_err(|e| io_fail(e, format!("inspecting the new {what}")))? {
            return Err(replaced(what));
        }
        root::apply_meta_handle(h.as_fd(), meta, kind == SFlag::S_IFLNK)
            .map_err(|(op, e)| meta_fail(op, e, &format!("the {what}")))
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
        let flags = self.paths.flags(&rel);
        let ours = flags & CREATED != 0;
        let holds_ours = flags & ANCESTOR != 0;
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
/// re-opened O_NOFOLLOW|O_DIRECTORY fds, and only to the directory the
/// entry made or met (same dev/inode): a directory later replaced, or a
/// path that now leads elsewhere through a later symlink, is skipped.
fn apply_dir_meta(root: &Root, dirs: &[DirMeta]) -> Result<(), Fail> {
    for d in dirs.iter().rev() {
        crate::ops::signals::check()?;
        let fd = match root.reopen_dir(&d.path) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => continue,
            Err(e) => return Err(resolve_fail(e, "re-opening a directory for its metadata")),
        };
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| io_fail(e, "inspecting a directory".into()))?;
        if (st.st_dev, st.st_ino) != (d.dev, d.ino) {
            continue;
        }
        let what = format!("directory {:?}", stream::display_path(&d.path));
        if let Some((uid, gid)) = d.owner {
            nix::unistd::fchown(
                fd.as_fd(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| meta_fail("fchown", e, &what))?;
        }
        if let Some(acl) = &d.acl_default {
            let name = CString::from(c"system.posix_acl_default");
            root::set_xattrs_fd(fd.as_fd(), &[(name, acl.clone())]).map_err(|(op, e)| meta_fail(op, e, &what))?;
        }
        root::apply_mode_times_fd(fd.as_fd(), d.mode, d.mtime_sec, d.mtime_nsec)
            .map_err(|(op, e)| meta_fail(op, e, &what))?;
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

    /// Whole chunks of the files the writer threads write go past the page
    /// cache where the filesystem has direct I/O (ext4 under target/, where
    /// the tests run), the rest through it; every byte lands.
    #[test]
    fn file_data_is_written_directly_in_whole_blocks() {
        let big: Vec<u8> = (0..(1usize << 20) + 123).map(|i| (i * 7 + i / 5000) as u8).collect();
        let mid: Vec<u8> = (0..40_965usize).map(|i| (i * 3) as u8).collect();
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in [("big", &big[..]), ("mid", &mid[..]), ("small", &b"tiny"[..])] {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, data).unwrap();
        }
        let archive = b.into_inner().unwrap();
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("extract-direct-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mut src: &[u8] = &archive;
        let opts = Options { jobs: 2, policy: Policy::SAFE, ..Options::default() };
        let rep = apply_layer(&root, &mut src, "t", &opts).unwrap();
        assert!(std::fs::read(root.join("big")).unwrap() == big);
        assert!(std::fs::read(root.join("mid")).unwrap() == mid);
        assert_eq!(std::fs::read(root.join("small")).unwrap(), b"tiny");
        assert_eq!(rep.bytes_written, (big.len() + mid.len() + 4) as u64);
        // big: four whole chunks, its 123-byte tail cached; mid: a chunk
        // shorter than CHUNK, cached; small: written inline.
        assert_eq!(rep.bytes_direct, 1 << 20, "no direct I/O under {}?", root.display());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn path_set_marks_paths_and_their_parents() {
        let mut p = PathSet::new();
        assert_eq!(p.mark(b"a/b/c"), 3);
        assert_eq!(p.flags(b"a/b/c"), CREATED);
        assert_eq!(p.flags(b"a/b"), ANCESTOR);
        assert_eq!(p.flags(b"a"), ANCESTOR);
        assert_eq!(p.flags(b"a/bc"), 0, "components, not bytes");
        assert_eq!(p.flags(b"ab/c"), 0);
        // A sibling adds one key: the walk up stops at the first known parent.
        assert_eq!(p.mark(b"a/b/d"), 1);
        assert_eq!(p.mark(b"a/b"), 0);
        assert_eq!(p.flags(b"a/b"), ANCESTOR | CREATED);
        // Same key however the path was written; a different set keys differently.
        assert_eq!(p.key(b"a/b/c"), p.key(b"a//b/c/"));
        assert_ne!(PathSet::new().key(b"a/b/c"), p.key(b"a/b/c"));
        // Memory per key is fixed, whatever the path length.
        let long = vec![b'n'; 4000];
        assert_eq!(p.mark(&long), 1);
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
