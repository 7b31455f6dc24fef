//! Loop devices for development pools: find a free one, bind a backing
//! file to it, find an existing binding of a file, detach.
//!
//! It owns the LOOP_* ioctls and `struct loop_config`/`loop_info64`
//! (hand-written, size-checked at compile time); all unsafe code for loops
//! lives here. It must never bind the same backing file twice: re-assembly
//! after a crash first looks for an existing binding (by device and inode,
//! not by path string). Bindings are made with LO_FLAGS_AUTOCLEAR: the dm
//! pool holds the loop open, so the binding lives exactly as long as the
//! pool (a process exit does not drop it, a pool removal or reboot does).

use std::fs::{File, OpenOptions};
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use crate::dm::DevId;
use crate::error::{Error, Kind, Result};

const LOOP_SET_FD: u32 = 0x4C00;
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_GET_STATUS64: u32 = 0x4C05;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LOOP_CTL_GET_FREE: u32 = 0x4C82;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;

const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = {
    assert!(size_of::<LoopInfo64>() == 232);
    assert!(size_of::<LoopConfig>() == 304);
    assert!(offset_of!(LoopInfo64, lo_flags) == 52);
    assert!(offset_of!(LoopInfo64, lo_file_name) == 56);
    assert!(offset_of!(LoopConfig, info) == 8);
};

impl LoopInfo64 {
    fn zeroed() -> LoopInfo64 {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// A bound loop device, held open: with autoclear, closing the last fd of
/// a device nothing else holds unbinds it, so the binding lives at least as
/// long as this value (and after, for as long as a dm table uses it).
#[derive(Debug)]
pub struct Loop {
    pub path: PathBuf,
    pub dev: DevId,
    _hold: File,
}

/// ioctl with an integer argument.
fn ioctl_int(f: &File, req: u32, arg: libc::c_ulong) -> std::result::Result<libc::c_int, Errno> {
    // SAFETY: every request passed here (LOOP_SET_FD, LOOP_CLR_FD,
    // LOOP_CTL_GET_FREE) takes an integer argument, not a pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

fn get_status(f: &File) -> std::result::Result<LoopInfo64, Errno> {
    let mut info = LoopInfo64::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64` (232 bytes,
    // layout asserted above) to the pointer, which points to a live local.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64 as _, &mut info as *mut LoopInfo64) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(info)
    }
}

fn set_status(f: &File, info: &LoopInfo64) -> std::result::Result<(), Errno> {
    // SAFETY: LOOP_SET_STATUS64 reads one `struct loop_info64` from a live local.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_STATUS64 as _, info as *const LoopInfo64) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn configure(f: &File, cfg: &LoopConfig) -> std::result::Result<(), Errno> {
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config` (304 bytes,
    // layout asserted above) from a live local.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CONFIGURE as _, cfg as *const LoopConfig) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn loop_dev_id(path: &Path) -> Result<DevId> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
    Ok(DevId::from_rdev(m.rdev()))
}

/// The loop device currently bound to `backing` (same st_dev and inode), if any.
pub fn find(backing: &Path) -> Result<Option<Loop>> {
    let m = std::fs::metadata(backing).map_err(|e| Error::io(format!("stat {}", backing.display()), e))?;
    let (want_dev, want_ino) = (m.dev(), m.ino());
    let rd = match std::fs::read_dir("/sys/block") {
        Ok(r) => r,
        Err(e) => return Err(Error::io("reading /sys/block (is sysfs mounted?)", e)),
    };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") || !ent.path().join("loop/backing_file").exists() {
            continue;
        }
        let path = PathBuf::from("/dev").join(&name);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(_) => continue, // raced with a detach, or no node
        };
        let Ok(info) = get_status(&f) else { continue };
        // lo_device is the kernel's new_encode_dev of st_dev, which equals
        // glibc's dev_t for the values that occur in practice.
        if info.lo_inode == want_ino && DevId::from_rdev(info.lo_device) == DevId::from_rdev(want_dev) {
            return Ok(Some(Loop { dev: loop_dev_id(&path)?, path, _hold: f }));
        }
    }
    Ok(None)
}

/// Bind `backing` to a free loop device, or return its existing binding.
pub fn attach(backing: &Path, read_only: bool) -> Result<Loop> {
    if let Some(l) = find(backing)? {
        log::debug!("{} is already bound to {}", backing.display(), l.path.display());
        return Ok(l);
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(backing)
        .map_err(|e| Error::io(format!("opening loop backing file {}", backing.display()), e))?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| Error::io("opening /dev/loop-control (is the loop module loaded?)", e))?;
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    let mut info = LoopInfo64::zeroed();
    info.lo_flags = flags;
    let fname = backing.as_os_str().as_encoded_bytes();
    let n = fname.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&fname[..n]);
    // Another process may take the free device between GET_FREE and the
    // bind (EBUSY): ask again, a bounded number of times.
    for _ in 0..16 {
        let idx = ioctl_int(&ctl, LOOP_CTL_GET_FREE, 0).map_err(|e| Error::io("LOOP_CTL_GET_FREE", e.into()))?;
        let path = PathBuf::from(format!("/dev/loop{idx}"));
        let dev = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let cfg = LoopConfig { fd: file.as_raw_fd() as u32, block_size: 0, info, reserved: [0; 8] };
        match configure(&dev, &cfg) {
            Ok(()) => {}
            Err(Errno::EBUSY) => continue,
            Err(Errno::EINVAL) | Err(Errno::ENOTTY) => {
                // Kernels before 5.8 have no LOOP_CONFIGURE.
                match ioctl_int(&dev, LOOP_SET_FD, file.as_raw_fd() as libc::c_ulong) {
                    Ok(_) => {}
                    Err(Errno::EBUSY) => continue,
                    Err(e) => return Err(Error::io(format!("LOOP_SET_FD {}", path.display()), e.into())),
                }
                if let Err(e) = set_status(&dev, &info) {
                    let _ = ioctl_int(&dev, LOOP_CLR_FD, 0);
                    return Err(Error::io(format!("LOOP_SET_STATUS64 {}", path.display()), e.into()));
                }
            }
            Err(e) => {
                return Err(Error::io(format!("LOOP_CONFIGURE {} for {}", path.display(), backing.display()), e.into()))
            }
        }
        return Ok(Loop { dev: loop_dev_id(&path)?, path, _hold: dev });
    }
    Err(Error::new(Kind::TempFail, format!("no free loop device for {} after 16 attempts", backing.display())))
}

/// Unbind a loop device. With autoclear set the kernel defers the unbind
/// until the last opener (e.g. a dm table) closes it; ENXIO means it is
/// already unbound. EBUSY (a non-autoclear device still open) is retried briefly.
pub fn detach(l: &Loop) -> Result<()> {
    let f = match File::open(&l.path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("opening {}", l.path.display()), e)),
    };
    for i in 0..10 {
        match ioctl_int(&f, LOOP_CLR_FD, 0) {
            Ok(_) | Err(Errno::ENXIO) => return Ok(()),
            Err(Errno::EBUSY) if i < 9 => std::thread::sleep(Duration::from_millis(20 << i.min(4))),
            Err(e) => return Err(Error::io(format!("LOOP_CLR_FD {}", l.path.display()), e.into())),
        }
    }
    Err(Error::new(Kind::TempFail, format!("loop device {} stays busy", l.path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(LOOP_CONFIGURE, 0x4C0A);
        assert_eq!(LOOP_CTL_GET_FREE, 0x4C82);
        assert_eq!(size_of::<LoopConfig>(), 304);
    }
}
