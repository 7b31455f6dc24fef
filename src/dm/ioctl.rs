//! The raw device-mapper ioctl layer: the `struct dm_ioctl` header, the
//! command numbers, and [`call`], the one function through which every dm
//! ioctl in thinimg goes.
//!
//! It owns the byte layout of requests and replies (encoded and decoded field
//! by field at offsets that are checked against the hand-written `#[repr(C)]`
//! structs at compile time, never by casting buffers to structs), the
//! interface version sent per command, buffer growth on
//! `DM_BUFFER_FULL_FLAG`, and keeping the errno of a failed call. It must
//! never interpret targets, retry on its own, or hide an errno in a string:
//! callers match EBUSY/ENXIO/EEXIST/ENODATA.

use std::fs::File;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;

use nix::errno::Errno;

pub const DM_NAME_LEN: usize = 128;
pub const DM_UUID_LEN: usize = 129;
pub const DM_MAX_TYPE_NAME: usize = 16;

/// `struct dm_ioctl` from `<linux/dm-ioctl.h>`. Only used for its size and
/// field offsets; requests are built as byte buffers.
#[repr(C)]
#[allow(dead_code)]
pub struct DmIoctl {
    pub version: [u32; 3],
    pub data_size: u32,
    pub data_start: u32,
    pub target_count: u32,
    pub open_count: i32,
    pub flags: u32,
    pub event_nr: u32,
    pub padding: u32,
    pub dev: u64,
    pub name: [u8; DM_NAME_LEN],
    pub uuid: [u8; DM_UUID_LEN],
    pub data: [u8; 7],
}

/// `struct dm_target_spec`.
#[repr(C)]
#[allow(dead_code)]
pub struct DmTargetSpec {
    pub sector_start: u64,
    pub length: u64,
    pub status: i32,
    pub next: u32,
    pub target_type: [u8; DM_MAX_TYPE_NAME],
}

pub const HDR: usize = size_of::<DmIoctl>();
pub const SPEC: usize = size_of::<DmTargetSpec>();

const _: () = {
    assert!(HDR == 312);
    assert!(SPEC == 40);
    assert!(offset_of!(DmIoctl, version) == 0);
    assert!(offset_of!(DmIoctl, data_size) == 12);
    assert!(offset_of!(DmIoctl, data_start) == 16);
    assert!(offset_of!(DmIoctl, target_count) == 20);
    assert!(offset_of!(DmIoctl, open_count) == 24);
    assert!(offset_of!(DmIoctl, flags) == 28);
    assert!(offset_of!(DmIoctl, event_nr) == 32);
    assert!(offset_of!(DmIoctl, dev) == 40);
    assert!(offset_of!(DmIoctl, name) == 48);
    assert!(offset_of!(DmIoctl, uuid) == 176);
    assert!(offset_of!(DmIoctl, data) == 305);
    assert!(offset_of!(DmTargetSpec, sector_start) == 0);
    assert!(offset_of!(DmTargetSpec, length) == 8);
    assert!(offset_of!(DmTargetSpec, status) == 16);
    assert!(offset_of!(DmTargetSpec, next) == 20);
    assert!(offset_of!(DmTargetSpec, target_type) == 24);
};

// Field offsets used by the encoder/decoder; asserted equal to the struct above.
const O_DATA_SIZE: usize = offset_of!(DmIoctl, data_size);
const O_DATA_START: usize = offset_of!(DmIoctl, data_start);
const O_TARGET_COUNT: usize = offset_of!(DmIoctl, target_count);
const O_OPEN_COUNT: usize = offset_of!(DmIoctl, open_count);
const O_FLAGS: usize = offset_of!(DmIoctl, flags);
const O_EVENT_NR: usize = offset_of!(DmIoctl, event_nr);
const O_DEV: usize = offset_of!(DmIoctl, dev);
const O_NAME: usize = offset_of!(DmIoctl, name);
const O_UUID: usize = offset_of!(DmIoctl, uuid);

pub const DM_READONLY_FLAG: u32 = 1 << 0;
pub const DM_SUSPEND_FLAG: u32 = 1 << 1;
pub const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
pub const DM_ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
pub const DM_INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
pub const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
pub const DM_NOFLUSH_FLAG: u32 = 1 << 11;
pub const DM_DATA_OUT_FLAG: u32 = 1 << 16;

/// The dm commands thinimg uses (the `nr` of the ioctl).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Version = 0,
    ListDevices = 2,
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    DevStatus = 7,
    TableLoad = 9,
    TableStatus = 12,
    ListVersions = 13,
    TargetMsg = 14,
}

impl Cmd {
    /// The ioctl request number: `_IOWR(0xfd, nr, struct dm_ioctl)`.
    pub fn request(self) -> u32 {
        nix::request_code_readwrite!(0xfd, self as u8, HDR) as u32
    }

    /// The lowest interface version that has this command: the kernel
    /// rejects a minor version above its own, so never ask for more.
    pub fn version(self) -> [u32; 3] {
        match self {
            Cmd::TargetMsg => [4, 2, 0],
            Cmd::ListVersions => [4, 1, 0],
            _ => [4, 0, 0],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Cmd::Version => "DM_VERSION",
            Cmd::ListDevices => "DM_LIST_DEVICES",
            Cmd::DevCreate => "DM_DEV_CREATE",
            Cmd::DevRemove => "DM_DEV_REMOVE",
            Cmd::DevSuspend => "DM_DEV_SUSPEND",
            Cmd::DevStatus => "DM_DEV_STATUS",
            Cmd::TableLoad => "DM_TABLE_LOAD",
            Cmd::TableStatus => "DM_TABLE_STATUS",
            Cmd::ListVersions => "DM_LIST_VERSIONS",
            Cmd::TargetMsg => "DM_TARGET_MSG",
        }
    }
}

/// What a request names the device by (exactly one, or none for global commands).
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    pub name: Option<&'a str>,
    pub uuid: Option<&'a str>,
    pub dev: u64,
    pub flags: u32,
    pub event_nr: u32,
    pub target_count: u32,
    /// Bytes placed right after the header (data_start = 312).
    pub payload: &'a [u8],
}

/// The decoded reply header and the data area the kernel filled.
#[derive(Debug, Clone)]
pub struct Reply {
    pub version: [u32; 3],
    pub target_count: u32,
    pub open_count: i32,
    pub flags: u32,
    pub event_nr: u32,
    pub dev: u64,
    pub name: String,
    pub uuid: String,
    /// `buf[data_start..data_size]`.
    pub data: Vec<u8>,
}

/// A failed dm ioctl: the command and the errno, kept for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoctlError {
    pub cmd: Cmd,
    pub errno: Errno,
}

impl std::fmt::Display for IoctlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {} ({})", self.cmd.as_str(), self.errno.desc(), self.errno)
    }
}
impl std::error::Error for IoctlError {}

const START_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 64 * 1024 * 1024;

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}
/// A NUL-terminated string at the start of `b` (lossy: names are validated on the way in).
pub(crate) fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Build the request bytes for `cmd` in a buffer of `size` bytes.
/// Name and uuid must already fit (checked by `DmName`/`DmUuid`).
pub fn encode(cmd: Cmd, req: &Request<'_>, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size.max(HDR + req.payload.len())];
    let v = cmd.version();
    put_u32(&mut b, 0, v[0]);
    put_u32(&mut b, 4, v[1]);
    put_u32(&mut b, 8, v[2]);
    let len = b.len() as u32;
    put_u32(&mut b, O_DATA_SIZE, len);
    put_u32(&mut b, O_DATA_START, HDR as u32);
    put_u32(&mut b, O_TARGET_COUNT, req.target_count);
    put_u32(&mut b, O_FLAGS, req.flags);
    put_u32(&mut b, O_EVENT_NR, req.event_nr);
    put_u64(&mut b, O_DEV, req.dev);
    if let Some(n) = req.name {
        let n = n.as_bytes();
        let n = &n[..n.len().min(DM_NAME_LEN - 1)];
        b[O_NAME..O_NAME + n.len()].copy_from_slice(n);
    }
    if let Some(u) = req.uuid {
        let u = u.as_bytes();
        let u = &u[..u.len().min(DM_UUID_LEN - 1)];
        b[O_UUID..O_UUID + u.len()].copy_from_slice(u);
    }
    b[HDR..HDR + req.payload.len()].copy_from_slice(req.payload);
    b
}

/// Decode a reply buffer. Bounds come from the kernel, so they are checked.
pub fn decode(b: &[u8]) -> Reply {
    let data_size = (get_u32(b, O_DATA_SIZE) as usize).min(b.len());
    let data_start = (get_u32(b, O_DATA_START) as usize).min(data_size);
    Reply {
        version: [get_u32(b, 0), get_u32(b, 4), get_u32(b, 8)],
        target_count: get_u32(b, O_TARGET_COUNT),
        open_count: get_u32(b, O_OPEN_COUNT) as i32,
        flags: get_u32(b, O_FLAGS),
        event_nr: get_u32(b, O_EVENT_NR),
        dev: get_u64(b, O_DEV),
        name: cstr(&b[O_NAME..O_NAME + DM_NAME_LEN]),
        uuid: cstr(&b[O_UUID..O_UUID + DM_UUID_LEN]),
        data: b[data_start..data_size].to_vec(),
    }
}

/// THE dm ioctl. Sends `req` for `cmd` on the control device, doubling the
/// buffer while the kernel says it was too small, and returns the decoded
/// reply or the errno.
pub fn call(ctl: &File, cmd: Cmd, req: &Request<'_>) -> Result<Reply, IoctlError> {
    let mut size = START_BUF;
    loop {
        // u64 storage keeps the buffer 8-byte aligned like the kernel's struct.
        let bytes = encode(cmd, req, size);
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        let len = bytes.len();
        // SAFETY: `words` owns at least `len` initialized bytes, u8 has no
        // alignment or validity requirements, and the view ends before any
        // other access to `words`.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }.copy_from_slice(&bytes);
        // SAFETY: open /dev/mapper/control fd; the kernel reads/writes a
        // dm_ioctl plus `data_size` bytes, and `data_size` (from `encode`)
        // equals `len`, the size of the live buffer `words` points to.
        let r = unsafe { libc::ioctl(ctl.as_raw_fd(), cmd.request() as _, words.as_mut_ptr()) };
        if r < 0 {
            return Err(IoctlError { cmd, errno: Errno::last() });
        }
        // SAFETY: as above: `len` initialized bytes owned by `words`, read-only view.
        let out = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len) };
        let reply = decode(out);
        if reply.flags & DM_BUFFER_FULL_FLAG != 0 {
            if size >= MAX_BUF {
                return Err(IoctlError { cmd, errno: Errno::ENOBUFS });
            }
            size *= 2;
            continue;
        }
        return Ok(reply);
    }
}

pub const DM_UEVENT_GENERATED_FLAG: u32 = 1 << 13;

/// The SysV semaphore behind a udev cookie, the protocol libdevmapper's udev
/// rules speak: the key is `0x0D4D << 16 | n`, the cookie passed in
/// `event_nr` is its low 16 bits, and the rules run `dmsetup udevcomplete
/// <cookie>`, which decrements the semaphore once they are done.
pub mod sem {
    use nix::errno::Errno;
    use std::time::{Duration, Instant};

    const COOKIE_MAGIC: u32 = 0x0D4D;

    pub struct Semaphore {
        id: libc::c_int,
        key: u32,
    }

    impl Semaphore {
        /// A new semaphore at value 1 (one pending udev event).
        pub fn create() -> Result<Semaphore, Errno> {
            let seed = std::process::id()
                ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            for i in 0..64u32 {
                let low = (seed.wrapping_add(i.wrapping_mul(40503)) & 0xffff).max(1);
                let key = (COOKIE_MAGIC << 16) | low;
                // SAFETY: plain syscall with integer arguments; no memory is passed.
                let id = unsafe { libc::semget(key as libc::key_t, 1, 0o600 | libc::IPC_CREAT | libc::IPC_EXCL) };
                if id < 0 {
                    match Errno::last() {
                        Errno::EEXIST => continue,
                        e => return Err(e),
                    }
                }
                let s = Semaphore { id, key };
                // SAFETY: SETVAL takes an int as its variadic argument; `id` is ours.
                if unsafe { libc::semctl(id, 0, libc::SETVAL, 1 as libc::c_int) } < 0 {
                    let e = Errno::last();
                    s.destroy();
                    return Err(e);
                }
                return Ok(s);
            }
            Err(Errno::EEXIST)
        }

        pub fn cookie(&self) -> u32 {
            self.key & 0xffff
        }

        /// Wait until udev has brought the value to zero, polling so the
        /// wait is bounded without semtimedop.
        pub fn wait(&self, timeout: Duration) -> Result<(), Errno> {
            let deadline = Instant::now() + timeout;
            loop {
                let mut op = libc::sembuf { sem_num: 0, sem_op: 0, sem_flg: libc::IPC_NOWAIT as libc::c_short };
                // SAFETY: `op` is one valid sembuf living across the call; nsops = 1.
                let r = unsafe { libc::semop(self.id, &mut op, 1) };
                if r == 0 {
                    return Ok(());
                }
                match Errno::last() {
                    Errno::EAGAIN | Errno::EINTR if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    e => return Err(e),
                }
            }
        }

        pub fn destroy(self) {
            // SAFETY: IPC_RMID on our own semaphore id; the variadic arg is unused.
            unsafe { libc::semctl(self.id, 0, libc::IPC_RMID, 0 as libc::c_int) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udev_cookie_semaphore_waits_boundedly_and_completes() {
        let s = sem::Semaphore::create().unwrap();
        assert_ne!(s.cookie(), 0);
        assert!(s.cookie() <= 0xffff);
        // Nobody confirmed: the wait gives up.
        let t = std::time::Instant::now();
        assert_eq!(s.wait(std::time::Duration::from_millis(50)), Err(Errno::EAGAIN));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // What `dmsetup udevcomplete <cookie>` does: decrement by one.
        let key = (0x0D4D << 16) | s.cookie();
        // SAFETY: test-only syscalls on our own semaphore; `op` is a live sembuf.
        let id = unsafe { libc::semget(key as libc::key_t, 1, 0) };
        assert!(id >= 0);
        let mut op = libc::sembuf { sem_num: 0, sem_op: -1, sem_flg: 0 };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::semop(id, &mut op, 1) }, 0);
        s.wait(std::time::Duration::from_secs(1)).unwrap();
        s.destroy();
        // SAFETY: as above; the semaphore is gone now.
        assert!(unsafe { libc::semget(key as libc::key_t, 1, 0) } < 0);
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(Cmd::Version.request(), 0xc138fd00);
        assert_eq!(Cmd::ListDevices.request(), 0xc138fd02);
        assert_eq!(Cmd::DevCreate.request(), 0xc138fd03);
        assert_eq!(Cmd::DevRemove.request(), 0xc138fd04);
        assert_eq!(Cmd::DevSuspend.request(), 0xc138fd06);
        assert_eq!(Cmd::DevStatus.request(), 0xc138fd07);
        assert_eq!(Cmd::TableLoad.request(), 0xc138fd09);
        assert_eq!(Cmd::TableStatus.request(), 0xc138fd0c);
        assert_eq!(Cmd::ListVersions.request(), 0xc138fd0d);
        assert_eq!(Cmd::TargetMsg.request(), 0xc138fd0e);
    }

    #[test]
    fn versions_per_command() {
        assert_eq!(Cmd::TargetMsg.version(), [4, 2, 0]);
        assert_eq!(Cmd::TableLoad.version(), [4, 0, 0]);
    }

    #[test]
    fn encode_lays_out_header() {
        let req =
            Request { name: Some("abc"), flags: DM_SUSPEND_FLAG, event_nr: 7, payload: b"xy", ..Default::default() };
        let b = encode(Cmd::DevSuspend, &req, 1024);
        assert_eq!(b.len(), 1024);
        assert_eq!(get_u32(&b, 0), 4);
        assert_eq!(get_u32(&b, 4), 0);
        assert_eq!(get_u32(&b, 12), 1024);
        assert_eq!(get_u32(&b, 16), 312);
        assert_eq!(get_u32(&b, 28), DM_SUSPEND_FLAG);
        assert_eq!(get_u32(&b, 32), 7);
        assert_eq!(&b[48..52], b"abc\0");
        assert_eq!(&b[312..314], b"xy");
        let r = decode(&b);
        assert_eq!(r.name, "abc");
        assert_eq!(r.data.len(), 1024 - 312);
    }

    #[test]
    fn encode_grows_for_big_payload() {
        let p = vec![1u8; 20000];
        let req = Request { payload: &p, ..Default::default() };
        let b = encode(Cmd::TableLoad, &req, START_BUF);
        assert_eq!(b.len(), 312 + 20000);
        assert_eq!(get_u32(&b, 12) as usize, b.len());
    }

    #[test]
    fn decode_clamps_hostile_bounds() {
        let mut b = encode(Cmd::Version, &Request::default(), 400);
        put_u32(&mut b, O_DATA_SIZE, 1 << 30);
        put_u32(&mut b, O_DATA_START, 1 << 31);
        let r = decode(&b);
        assert!(r.data.is_empty());
    }
}
