//! Mounting a thin device for unpacking, and finding mounts we left behind.
//!
//! Mount points live under `<run-dir>/mnt/<thin-id>`; anything mounted
//! there is ours, and a mount there that no running step owns is stray.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, IoContext, Kind, Result};

pub fn mount_root(run_dir: &Path) -> PathBuf {
    run_dir.join("mnt")
}

pub fn mount_point(run_dir: &Path, thin_id: crate::dm::ThinId) -> PathBuf {
    mount_root(run_dir).join(thin_id.to_string())
}

/// Mount an ext4 device nosuid,nodev (never noexec-dependent: we only write).
pub fn mount_ext4(dev: &Path, at: &Path) -> Result<()> {
    std::fs::create_dir_all(at).ctx(|| format!("creating mount point {}", at.display()))?;
    if is_mountpoint(at)? {
        return Ok(());
    }
    nix::mount::mount(Some(dev), at, Some("ext4"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None::<&str>)
        .map_err(|e| Error::io(format!("mounting {} on {}", dev.display(), at.display()), e.into()))
}

/// Flush a finished layer to its device and unmount it. A failed `syncfs`
/// means writes were lost (writeback errors are reported here and nowhere
/// later: `umount` and dm remove succeed regardless), so the layer must
/// not be marked ready: the mount is still taken down, and the error
/// returned.
pub fn sync_and_unmount(at: &Path) -> Result<()> {
    let synced = {
        let f = std::fs::File::open(at).ctx(|| format!("opening {} to flush it", at.display()))?;
        nix::unistd::syncfs(&f).map_err(|e| {
            Error::io(
                format!("flushing the layer unpacked at {} (writes to the thin device were lost)", at.display()),
                e.into(),
            )
        })
    };
    let unmounted = unmount(at);
    synced?;
    unmounted
}

/// Whether the ext4 superblock on `dev` records errors (s_state has
/// EXT4_ERROR_FS, or s_error_count is non-zero): the filesystem saw a
/// failed write or corruption while the layer was written.
pub fn ext4_has_errors(dev: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).ctx(|| format!("opening {} to check its filesystem", dev.display()))?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, 1024).ctx(|| format!("reading the ext4 superblock of {}", dev.display()))?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return Err(Error::new(Kind::Io, format!("{} holds no ext4 superblock after unpacking", dev.display())));
    }
    let state = u16::from_le_bytes([sb[0x3A], sb[0x3B]]);
    let errors = u32::from_le_bytes([sb[0x194], sb[0x195], sb[0x196], sb[0x197]]);
    Ok(state & 0x0002 != 0 || errors != 0)
}

/// Unmount, flushing first; a path that is not mounted is fine. For
/// teardown, where the content is discarded: a failed flush is ignored.
pub fn unmount(at: &Path) -> Result<()> {
    if !is_mountpoint(at)? {
        let _ = std::fs::remove_dir(at);
        return Ok(());
    }
    if let Ok(f) = std::fs::File::open(at) {
        let _ = nix::unistd::syncfs(&f);
    }
    let mut last = None;
    for attempt in 0..20u32 {
        match nix::mount::umount2(at, MntFlags::empty()) {
            Ok(()) => {
                let _ = std::fs::remove_dir(at);
                return Ok(());
            }
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                last = Some(nix::errno::Errno::EBUSY);
                std::thread::sleep(std::time::Duration::from_millis(50 * u64::from(attempt + 1)));
            }
            Err(e) => return Err(Error::io(format!("unmounting {}", at.display()), e.into())),
        }
    }
    Err(Error::new(Kind::TempFail, format!("unmounting {}: still busy after retries", at.display()))
        .with_source(std::io::Error::from(last.unwrap_or(nix::errno::Errno::EBUSY))))
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (from /proc/self/mountinfo) at or below `under`.
pub fn mounts_under(under: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "reading /proc/self/mountinfo".into())?;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(mp) = line.split(' ').nth(4) {
            let p = PathBuf::from(unescape_mountinfo(mp));
            if p.starts_with(under) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

pub fn is_mountpoint(p: &Path) -> Result<bool> {
    let canon = match std::fs::canonicalize(p) {
        Ok(c) => c,
        Err(_) => return Ok(false),
    };
    Ok(mounts_under(&canon)?.iter().any(|m| m == &canon))
}

/// Directories every image gets (mount points a VM's init expects), and
/// the entries whose absence makes a root filesystem suspicious.
pub const MOUNT_POINTS: &[(&str, u32)] =
    &[("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("tmp", 0o1777), ("run", 0o755)];
pub const EXPECTED: &[&str] = &["etc", "usr", "bin/sh"];

/// Create missing mount points in-root and report what a root filesystem
/// should have but this one lacks (a warning, not a failure: layers are
/// allowed to be anything; the operator sees it in `thinimg images`).
pub fn ensure_layout(root: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let mut created = Vec::new();
    for (d, mode) in MOUNT_POINTS {
        let p = root.join(d);
        match std::fs::symlink_metadata(&p) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&p).ctx(|| format!("creating /{d} in the image"))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                    .ctx(|| format!("chmod /{d} in the image"))?;
                created.push(format!("/{d}"));
            }
            Err(e) => return Err(Error::io(format!("checking /{d} in the image"), e)),
        }
    }
    Ok(created)
}

/// What of [`EXPECTED`] the root lacks. `bin/sh` may be reached through a
/// `bin -> usr/bin` symlink, so it is resolved inside the root.
pub fn missing_layout(root: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    for e in EXPECTED {
        if resolve_in_root(root, e).is_none() {
            missing.push(format!("/{e}"));
        }
    }
    missing
}

fn resolve_in_root(root: &Path, rel: &str) -> Option<()> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let dir = std::fs::File::open(root).ok()?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(&dir, rel, how).ok().map(|_| ())
}
