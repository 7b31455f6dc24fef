//! The image root and everything done inside it, with the kernel doing the
//! containment.
//!
//! The root is opened once. Every parent directory is resolved with
//! `openat2(root, parent, O_PATH|O_DIRECTORY, RESOLVE_IN_ROOT|
//! RESOLVE_NO_MAGICLINKS|RESOLVE_NO_XDEV)`, so `..`, absolute symlinks and
//! symlink chains all stay inside the root whatever the names say; the final
//! component is then created, removed or inspected relative to that parent fd
//! without being followed. This module never opens a path relative to the
//! process's working directory and never follows a final-component symlink.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};

/// Ownership, mode, times and xattrs to apply to one object.
#[derive(Debug, Clone)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<(CString, Vec<u8>)>,
}

const PARENT_CACHE: usize = 16;

/// The root directory of the image being built.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    /// Recently resolved parent directories (most recent last): tar streams
    /// are sorted, so a few entries save most lookups. Dropped on every
    /// removal, the only operation that can change what a resolved path names.
    cache: Vec<(Vec<u8>, OwnedFd)>,
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn in_root(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV)
}

/// openat2 in the root, retrying EAGAIN (a concurrent rename elsewhere in
/// the tree makes the kernel refuse to vouch for the walk).
fn openat2_retry(dir: BorrowedFd<'_>, rel: &[u8], flags: OFlag) -> Result<OwnedFd, Errno> {
    let p: &[u8] = if rel.is_empty() { b"." } else { rel };
    let mut tries = 0;
    loop {
        match nix::fcntl::openat2(dir, os(p), in_root(flags)) {
            Err(Errno::EAGAIN) if tries < 64 => tries += 1,
            Err(Errno::EINTR) => {}
            r => return r,
        }
    }
}

impl Root {
    /// Open the root directory (creating it if missing).
    pub fn open(path: &Path) -> std::io::Result<Root> {
        if !path.exists() {
            std::fs::create_dir_all(path)?;
        }
        let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        Ok(Root { fd, path: path.to_path_buf(), cache: Vec::new() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn invalidate(&mut self) {
        self.cache.clear();
    }

    /// Resolve a directory (relative, cleaned) inside the root as an O_PATH fd.
    pub fn dir(&self, rel: &[u8]) -> Result<OwnedFd, Errno> {
        openat2_retry(self.fd.as_fd(), rel, OFlag::O_PATH | OFlag::O_DIRECTORY)
    }

    /// Open a directory for metadata changes, refusing a symlink in the last
    /// component.
    pub fn reopen_dir(&self, rel: &[u8]) -> Result<OwnedFd, Errno> {
        openat2_retry(self.fd.as_fd(), rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW)
    }

    /// The parent directory `rel` (cached). With `create`, missing
    /// directories are made (mode 0755, root-owned), each step resolved in
    /// the root again; `made` receives the paths created.
    pub fn parent(&mut self, rel: &[u8], create: bool, made: &mut Vec<Vec<u8>>) -> Result<BorrowedFd<'_>, Errno> {
        let hit = self.cache.iter().rposition(|(p, _)| p.as_slice() == rel);
        let idx = match hit {
            Some(i) => i,
            None => {
                let fd = match self.dir(rel) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) if create => self.make_dirs(rel, made)?,
                    Err(e) => return Err(e),
                };
                if self.cache.len() >= PARENT_CACHE {
                    self.cache.remove(0);
                }
                self.cache.push((rel.to_vec(), fd));
                self.cache.len() - 1
            }
        };
        match self.cache.get(idx) {
            Some((_, fd)) => Ok(fd.as_fd()),
            None => Err(Errno::EIO),
        }
    }

    /// Walk `rel` from the root, creating missing directories. A plain
    /// directory is entered in one step from the previous one (O_NOFOLLOW:
    /// never through a symlink); a symlink, or anything not a directory, is
    /// resolved from the root with openat2 as the kernel would for the whole
    /// path. So a path costs its length, not its length squared, however
    /// deep the tree it leads into.
    fn make_dirs(&self, rel: &[u8], made: &mut Vec<Vec<u8>>) -> Result<OwnedFd, Errno> {
        let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
        let mut cur = self.dir(b"")?;
        let step = |dir: BorrowedFd<'_>, c: &[u8]| {
            nix::fcntl::openat(
                dir,
                os(c),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
        };
        for i in 0..comps.len() {
            let prefix = || comps[..=i].join(&b'/');
            cur = match step(cur.as_fd(), comps[i]) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match nix::sys::stat::mkdirat(cur.as_fd(), os(comps[i]), Mode::from_bits_truncate(0o755)) {
                        Ok(()) => made.push(prefix()),
                        // A dangling symlink (or a racing creator) sits there:
                        // resolve again and let that answer stand.
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e),
                    }
                    match step(cur.as_fd(), comps[i]) {
                        Ok(fd) => fd,
                        Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => self.dir(&prefix())?,
                        Err(e) => return Err(e),
                    }
                }
                Err(Errno::ENOTDIR) | Err(Errno::ELOOP) => self.dir(&prefix())?,
                Err(e) => return Err(e),
            };
        }
        Ok(cur)
    }
}

/// lstat of `name` in `dir`; `None` when absent.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<FileStat>, Errno> {
    match nix::sys::stat::fstatat(dir, os(name), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn is_dir(st: &FileStat) -> bool {
    (st.st_mode & libc::S_IFMT) == libc::S_IFDIR
}

/// Remove `name` in `dir`, a whole tree if it is a directory. Never follows
/// a symlink: a symlink is unlinked, not its target.
///
/// Depth-first with one directory open at a time, whatever the tree's depth
/// (a layer can build trees far deeper than the fd limit through symlink
/// hops): it descends by name with O_NOFOLLOW and climbs back through ".."
/// only after checking that ".." is the very directory it came from (dev
/// and inode), so a concurrent rename cannot lead it anywhere else.
/// A pending SIGINT/SIGTERM stops it with EINTR.
pub fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    let Some(st) = lstat_at(dir, name)? else { return Ok(()) };
    if !is_dir(&st) {
        return unlink_ok(dir, name, false);
    }
    // Identities of the directories between `dir` and `cur`, and the names
    // leading down to `cur`.
    let mut ids: Vec<(u64, u64)> = Vec::new();
    let mut names: Vec<Vec<u8>> = vec![name.to_vec()];
    let mut cur = open_subdir(dir, name)?;
    loop {
        if crate::ops::signals::pending().is_some() {
            return Err(Errno::EINTR);
        }
        if let Some(child) = empty_but_subdirs(&cur)? {
            ids.push(identity(&nix::sys::stat::fstat(cur.as_fd())?));
            cur = open_subdir(cur.as_fd(), &child)?;
            names.push(child);
            continue;
        }
        let Some(last) = names.pop() else { return Ok(()) };
        match ids.pop() {
            None => match nix::unistd::unlinkat(dir, os(&last), nix::unistd::UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => return Ok(()),
                // Something appeared meanwhile: empty it again.
                Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => names.push(last),
                Err(e) => return Err(e),
            },
            Some(want) => {
                let parent = nix::fcntl::openat(
                    cur.as_fd(),
                    os(b".."),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                if identity(&nix::sys::stat::fstat(parent.as_fd())?) != want {
                    // The tree was moved while it was being removed.
                    return Err(Errno::ESTALE);
                }
                cur = parent;
                match nix::unistd::unlinkat(cur.as_fd(), os(&last), nix::unistd::UnlinkatFlags::RemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

fn identity(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn unlink_ok(dir: BorrowedFd<'_>, name: &[u8], is_dir: bool) -> Result<(), Errno> {
    let flag = if is_dir { nix::unistd::UnlinkatFlags::RemoveDir } else { nix::unistd::UnlinkatFlags::NoRemoveDir };
    match nix::unistd::unlinkat(dir, os(name), flag) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Remove everything in `dir` except non-empty subdirectories; the first
/// of those is returned (`None`: `dir` is now empty, as far as one pass saw).
fn empty_but_subdirs(dir: &OwnedFd) -> Result<Option<Vec<u8>>, Errno> {
    let dup = dir.try_clone().map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let mut d = nix::dir::Dir::from_fd(dup)?;
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        let is_dir = match e.file_type() {
            Some(nix::dir::Type::Directory) => true,
            Some(_) => false,
            None => match lstat_at(dir.as_fd(), n)? {
                Some(st) => is_dir(&st),
                None => continue,
            },
        };
        if !is_dir {
            unlink_ok(dir.as_fd(), n, false)?;
            continue;
        }
        match nix::unistd::unlinkat(dir.as_fd(), os(n), nix::unistd::UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::ENOTEMPTY) | Err(Errno::EEXIST) => return Ok(Some(n.to_vec())),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Names in a directory (without . and ..).
pub fn list_dir(dir: &OwnedFd) -> Result<Vec<Vec<u8>>, Errno> {
    let dup = dir.try_clone().map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let mut d = nix::dir::Dir::from_fd(dup)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

/// Open a directory below `dir` for listing, not following a symlink.
pub fn open_subdir(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        os(name),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Create a new regular file (never through an existing name).
pub fn create_file(dir: BorrowedFd<'_>, name: &[u8]) -> Result<File, Errno> {
    let fd = nix::fcntl::openat(
        dir,
        os(name),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    Ok(File::from(fd))
}

pub fn mkdir(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    nix::sys::stat::mkdirat(dir, os(name), Mode::from_bits_truncate(0o755))
}

pub fn symlink(dir: BorrowedFd<'_>, name: &[u8], target: &[u8]) -> Result<(), Errno> {
    nix::unistd::symlinkat(os(target), dir, os(name))
}

/// Hard link without following a symlink source (the link then names the
/// symlink itself, which is what the archive recorded).
pub fn hardlink(src_dir: BorrowedFd<'_>, src: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), Errno> {
    nix::unistd::linkat(src_dir, os(src), dir, os(name), AtFlags::empty())
}

pub fn mknod(dir: BorrowedFd<'_>, name: &[u8], kind: SFlag, major: u32, minor: u32) -> Result<(), Errno> {
    let dev = libc::makedev(major, minor);
    nix::sys::stat::mknodat(dir, os(name), kind, Mode::from_bits_truncate(0o600), dev)
}

fn ts(sec: i64, nsec: u32) -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(sec, i64::from(nsec))
}

fn omit() -> nix::sys::time::TimeSpec {
    nix::sys::time::TimeSpec::new(0, libc::UTIME_OMIT)
}

/// Apply metadata through an open fd: owner first (chown clears setuid bits
/// and file capabilities), then xattrs (security.capability must come after
/// chown), then the mode (with setuid/setgid/sticky), then the times.
pub fn apply_meta_fd(fd: BorrowedFd<'_>, m: &Meta) -> Result<(), (&'static str, Errno)> {
    apply_owner_xattrs_fd(fd, m)?;
    apply_mode_times_fd(fd, m.mode, m.mtime_sec, m.mtime_nsec)
}

/// Owner, then xattrs, through an fd open for reading or writing.
pub fn apply_owner_xattrs_fd(fd: BorrowedFd<'_>, m: &Meta) -> Result<(), (&'static str, Errno)> {
    nix::unistd::fchown(fd, Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid))).map_err(|e| ("fchown", e))?;
    set_xattrs_fd(fd, &m.xattrs)
}

pub fn set_xattrs_fd(fd: BorrowedFd<'_>, xattrs: &[(CString, Vec<u8>)]) -> Result<(), (&'static str, Errno)> {
    for (name, value) in xattrs {
        // SAFETY: fd is a live descriptor borrowed for this call; name is a
        // NUL-terminated CString and value a valid slice for value.len() bytes.
        let r = unsafe { libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if r != 0 {
            return Err(("fsetxattr", Errno::last()));
        }
    }
    Ok(())
}

/// Mode, then times, through an fd open for reading or writing.
pub fn apply_mode_times_fd(fd: BorrowedFd<'_>, mode: u32, sec: i64, nsec: u32) -> Result<(), (&'static str, Errno)> {
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode & 0o7777)).map_err(|e| ("fchmod", e))?;
    nix::sys::stat::futimens(fd, &omit(), &ts(sec, nsec)).map_err(|e| ("futimens", e))?;
    Ok(())
}

/// Open `name` in `dir` as an O_PATH handle without following it: every
/// later metadata call goes to this inode, whatever happens to the name.
pub fn open_handle(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(dir, os(name), OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
}

/// Check that `h` is the object this process just created: the expected
/// type (and device number), owned by us, with one link. Another local
/// process that swapped the fresh name for a symlink, a FIFO or a hard
/// link of its own is caught here, before any metadata is applied.
pub fn is_fresh(h: BorrowedFd<'_>, kind: SFlag, rdev: Option<u64>) -> Result<bool, Errno> {
    let st = nix::sys::stat::fstat(h)?;
    let fmt = st.st_mode & libc::S_IFMT;
    Ok(fmt == kind.bits()
        && st.st_uid == nix::unistd::geteuid().as_raw()
        && st.st_nlink == 1
        && rdev.is_none_or(|d| st.st_rdev == d))
}

/// Metadata of a symlink, device or FIFO through its O_PATH handle (see
/// [`open_handle`]): nothing here resolves a name, so nothing can be
/// redirected through a symlink. Owner first, then the mode (not for
/// symlinks, which have none on Linux), then the times. No xattrs.
pub fn apply_meta_handle(h: BorrowedFd<'_>, m: &Meta, symlink: bool) -> Result<(), (&'static str, Errno)> {
    let empty = c"";
    // SAFETY: h is a live descriptor; the path is an empty NUL-terminated
    // string, which AT_EMPTY_PATH makes name `h` itself.
    let r = unsafe {
        libc::fchownat(h.as_raw_fd(), empty.as_ptr(), m.uid, m.gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    };
    if r != 0 {
        return Err(("fchownat", Errno::last()));
    }
    if !symlink {
        chmod_handle(h, m.mode & 0o7777).map_err(|e| ("fchmodat2", e))?;
    }
    let times = [omit(), ts(m.mtime_sec, m.mtime_nsec)];
    // SAFETY: as above; `times` holds two valid timespecs.
    let r = unsafe {
        libc::utimensat(
            h.as_raw_fd(),
            empty.as_ptr(),
            times.as_ptr().cast(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(("utimensat", Errno::last()));
    }
    Ok(())
}

/// chmod of the inode behind an O_PATH handle: fchmodat2(AT_EMPTY_PATH)
/// (Linux 6.6), else chmod of /proc/self/fd/N, which names the handle's
/// inode itself (a magic link is not a path lookup that a rename or a
/// symlink can redirect). Without either the call fails; it never falls
/// back to a name.
fn chmod_handle(h: BorrowedFd<'_>, mode: u32) -> Result<(), Errno> {
    let empty = c"";
    // SAFETY: raw syscall with a live fd, an empty NUL-terminated path and
    // integer arguments; the kernel reads nothing else.
    let r = unsafe { libc::syscall(SYS_FCHMODAT2, h.as_raw_fd(), empty.as_ptr(), mode, libc::AT_EMPTY_PATH) };
    if r == 0 {
        return Ok(());
    }
    match Errno::last() {
        Errno::ENOSYS | Errno::EINVAL => {}
        e => return Err(e),
    }
    let proc_path = format!("/proc/self/fd/{}", h.as_raw_fd());
    nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        proc_path.as_str(),
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
}

/// fchmodat2(2), the same number on every Linux architecture.
const SYS_FCHMODAT2: libc::c_long = 452;

/// The error for a failed metadata call on `what`. An xattr the kernel
/// refuses as malformed (EINVAL, ERANGE, E2BIG: e.g. a corrupt
/// security.capability) or has no room for (ENOSPC, EDQUOT: ext4 keeps an
/// inode's xattrs in one block) is the archive's fault, as is any other
/// limit of the target file system the entry runs into; the rest are the
/// target's.
pub fn meta_error(op: &'static str, e: Errno, what: &str) -> crate::error::Error {
    if op == "fsetxattr" {
        match e {
            Errno::EINVAL | Errno::ERANGE | Errno::E2BIG => {
                return crate::error::Error::bad_data(format!(
                    "rule xattr-value: {what}: the kernel refuses an xattr ({e})"
                ))
            }
            Errno::ENOSPC | Errno::EDQUOT => {
                return crate::error::Error::bad_data(format!(
                    "rule xattr-space: {what}: the file system has no room for the entry's xattrs ({e})"
                ))
            }
            _ => {}
        }
    }
    if let Some(rule) = super::target_rule(e) {
        return crate::error::Error::bad_data(format!("rule {rule}: {op} on {what}: {e}"));
    }
    crate::error::Error::io(format!("{op} on {what}"), std::io::Error::from(e))
}
