//! The safe device-mapper API on top of [`ioctl`]: version, list, create,
//! load a table, suspend/resume, status/table, target messages, remove, info.
//!
//! It owns the encoding of tables and the decoding of replies (name lists,
//! target specs), the kernel-limited newtypes ([`DmName`], [`DmUuid`],
//! [`ThinId`], [`Sectors`]) and device numbers. It never depends on udev or
//! `/dev/mapper/<name>`: device nodes are made from the `dev` in the reply.
//! It never retries: policy (EBUSY backoff, EEXIST reconcile) belongs to
//! `pool`.

pub mod ioctl;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::{Error, Kind, Result};
use ioctl::{Cmd, IoctlError, Reply, Request};

/// A dm device name: 1..=127 bytes, no '/', not "." or "..", printable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DmName(String);

impl DmName {
    pub fn new(s: impl Into<String>) -> Result<DmName> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() < ioctl::DM_NAME_LEN
            && s != "."
            && s != ".."
            && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
        if !ok {
            return Err(Error::new(
                Kind::Usage,
                format!("invalid device-mapper name {s:?}: 1-127 printable ASCII bytes, no '/' or spaces"),
            ));
        }
        Ok(DmName(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for DmName {
    type Error = Error;
    fn try_from(s: String) -> Result<DmName> {
        DmName::new(s)
    }
}
impl From<DmName> for String {
    fn from(n: DmName) -> String {
        n.0
    }
}
impl std::fmt::Display for DmName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A dm uuid: 1..=128 printable bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmUuid(String);
impl DmUuid {
    pub fn new(s: impl Into<String>) -> Result<DmUuid> {
        let s = s.into();
        if s.is_empty() || s.len() >= ioctl::DM_UUID_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::new(Kind::Usage, format!("invalid device-mapper uuid {s:?}")));
        }
        Ok(DmUuid(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A thin device id inside a pool: 24 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u64", into = "u32")]
pub struct ThinId(u32);
impl TryFrom<u64> for ThinId {
    type Error = String;
    fn try_from(v: u64) -> std::result::Result<ThinId, String> {
        ThinId::new(v).map_err(|e| e.message().to_string())
    }
}
impl From<ThinId> for u32 {
    fn from(t: ThinId) -> u32 {
        t.0
    }
}
impl ThinId {
    pub const MAX: u32 = (1 << 24) - 1;
    pub fn new(v: u64) -> Result<ThinId> {
        if v > ThinId::MAX as u64 {
            return Err(Error::new(Kind::Software, format!("thin id {v} is out of range (max {})", ThinId::MAX)));
        }
        Ok(ThinId(v as u32))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}
impl std::fmt::Display for ThinId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A length in 512-byte sectors (never bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Sectors(pub u64);
impl Sectors {
    /// Whole sectors in `bytes` (rounded down).
    pub fn from_bytes(bytes: u64) -> Sectors {
        Sectors(bytes / 512)
    }
    pub fn bytes(self) -> u64 {
        self.0 * 512
    }
}

/// A block device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}
impl DevId {
    /// Decode the kernel's `huge_encode_dev` form used in `dm_ioctl.dev`.
    pub fn from_kernel(dev: u64) -> DevId {
        DevId { major: ((dev >> 8) & 0xfff) as u32, minor: ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32 }
    }
    pub fn to_kernel(self) -> u64 {
        let (ma, mi) = (self.major as u64, self.minor as u64);
        (mi & 0xff) | (ma << 8) | ((mi & !0xff) << 12)
    }
    /// From a `st_rdev` (glibc's dev_t layout).
    pub fn from_rdev(rdev: u64) -> DevId {
        let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
        let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
        DevId { major: major as u32, minor: minor as u32 }
    }
    pub fn to_rdev(self) -> u64 {
        let (ma, mi) = (self.major as u64, self.minor as u64);
        ((ma & 0xfffff000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffffff00) << 12) | (mi & 0xff)
    }
}
impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of a table: `start length type params`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: Sectors,
    pub length: Sectors,
    pub kind: String,
    pub params: String,
}

/// What DM_DEV_STATUS says about a device.
#[derive(Debug, Clone)]
pub struct DevInfo {
    pub name: String,
    pub dev: DevId,
    pub open_count: i32,
    pub target_count: u32,
    pub suspended: bool,
    pub active_table: bool,
    pub inactive_table: bool,
    pub event_nr: u32,
}

/// A failed dm operation on a named device, errno kept for matching.
#[derive(Debug)]
pub struct DmError {
    pub op: &'static str,
    pub device: String,
    pub source: IoctlError,
}
impl DmError {
    pub fn errno(&self) -> Errno {
        self.source.errno
    }
}
impl std::fmt::Display for DmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.device.is_empty() {
            write!(f, "device-mapper {}", self.op)
        } else {
            write!(f, "device-mapper {} of {}", self.op, self.device)
        }
    }
}
impl std::error::Error for DmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}
impl From<DmError> for Error {
    fn from(e: DmError) -> Error {
        let kind = match e.errno() {
            Errno::EBUSY | Errno::EAGAIN | Errno::ENOSPC => Kind::TempFail,
            Errno::EPERM | Errno::EACCES => Kind::NoPerm,
            Errno::EEXIST => Kind::CantCreate,
            _ => Kind::Io,
        };
        let msg = e.to_string();
        Error::new(kind, msg).with_source(e)
    }
}

pub type DmResult<T> = std::result::Result<T, DmError>;

/// An open `/dev/mapper/control`.
pub struct Dm {
    ctl: File,
}

pub const CONTROL: &str = "/dev/mapper/control";

/// What an operator does about a host without (working) device-mapper.
pub const MODPROBE_ADVICE: &str =
    "load the driver with `modprobe dm-mod dm-thin-pool` (the kernel needs CONFIG_DM_THIN_PROVISIONING)";

/// The host lacks device-mapper or its thin-pool target: HostFatal (71),
/// never retried, with the modprobe advice.
pub fn unavailable(what: &str) -> Error {
    Error::new(Kind::HostFatal, format!("device-mapper is not available on this host ({what}); {MODPROBE_ADVICE}"))
}

impl Dm {
    pub fn open() -> Result<Dm> {
        Dm::open_at(Path::new(CONTROL))
    }

    /// Open the control node. A node that is missing, or whose driver is
    /// absent (ENODEV/ENXIO), is a host condition (HostFatal, exit 71): no
    /// retry can fix it, an operator must load the driver.
    pub fn open_at(path: &Path) -> Result<Dm> {
        let ctl = OpenOptions::new().read(true).write(true).open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                unavailable(&format!("opening {}", path.display())).with_source(e)
            }
            _ => Error::io(format!("opening {}", path.display()), e),
        })?;
        Ok(Dm { ctl })
    }

    fn call(&self, cmd: Cmd, op: &'static str, device: &str, req: &Request<'_>) -> DmResult<Reply> {
        ioctl::call(&self.ctl, cmd, req).map_err(|source| DmError { op, device: device.to_string(), source })
    }

    /// The kernel's dm interface version.
    pub fn version(&self) -> DmResult<[u32; 3]> {
        Ok(self.call(Cmd::Version, "version", "", &Request::default())?.version)
    }

    /// Target types the kernel has loaded, with their versions.
    pub fn target_versions(&self) -> DmResult<Vec<(String, [u32; 3])>> {
        let r = self.call(Cmd::ListVersions, "list versions", "", &Request::default())?;
        Ok(parse_versions(&r.data))
    }

    /// All dm devices: (name, dev).
    pub fn list(&self) -> DmResult<Vec<(String, DevId)>> {
        let r = self.call(Cmd::ListDevices, "list devices", "", &Request::default())?;
        Ok(parse_name_list(&r.data))
    }

    pub fn create(&self, name: &DmName, uuid: Option<&DmUuid>) -> DmResult<DevId> {
        let req = Request { name: Some(name.as_str()), uuid: uuid.map(|u| u.as_str()), ..Default::default() };
        let r = self.call(Cmd::DevCreate, "create", name.as_str(), &req)?;
        Ok(DevId::from_kernel(r.dev))
    }

    /// Load `targets` as the device's inactive table (made live by `resume`).
    pub fn load(&self, name: &DmName, targets: &[Target]) -> DmResult<()> {
        let payload = encode_table(targets);
        let req = Request {
            name: Some(name.as_str()),
            target_count: targets.len() as u32,
            payload: &payload,
            ..Default::default()
        };
        self.call(Cmd::TableLoad, "table load", name.as_str(), &req)?;
        Ok(())
    }

    pub fn suspend(&self, name: &DmName) -> DmResult<()> {
        let req = Request { name: Some(name.as_str()), flags: ioctl::DM_SUSPEND_FLAG, ..Default::default() };
        self.call(Cmd::DevSuspend, "suspend", name.as_str(), &req)?;
        Ok(())
    }

    pub fn resume(&self, name: &DmName) -> DmResult<()> {
        let cookie = udev::Cookie::new();
        let req = Request { name: Some(name.as_str()), event_nr: cookie.value(), ..Default::default() };
        let r = self.call(Cmd::DevSuspend, "resume", name.as_str(), &req);
        cookie.wait(fired(&r));
        r.map(|_| ())
    }

    pub fn remove(&self, name: &DmName) -> DmResult<()> {
        let cookie = udev::Cookie::new();
        let req = Request { name: Some(name.as_str()), event_nr: cookie.value(), ..Default::default() };
        let r = self.call(Cmd::DevRemove, "remove", name.as_str(), &req);
        cookie.wait(fired(&r));
        r.map(|_| ())
    }

    pub fn info(&self, name: &DmName) -> DmResult<DevInfo> {
        let req = Request { name: Some(name.as_str()), ..Default::default() };
        let r = self.call(Cmd::DevStatus, "info", name.as_str(), &req)?;
        Ok(DevInfo {
            name: r.name.clone(),
            dev: DevId::from_kernel(r.dev),
            open_count: r.open_count,
            target_count: r.target_count,
            suspended: r.flags & ioctl::DM_SUSPEND_FLAG != 0,
            active_table: r.flags & ioctl::DM_ACTIVE_PRESENT_FLAG != 0,
            inactive_table: r.flags & ioctl::DM_INACTIVE_PRESENT_FLAG != 0,
            event_nr: r.event_nr,
        })
    }

    /// `info`, with ENXIO (no such device) as `None`.
    pub fn try_info(&self, name: &DmName) -> DmResult<Option<DevInfo>> {
        match self.info(name) {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.errno() == Errno::ENXIO => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The live table (`dmsetup table`).
    pub fn table(&self, name: &DmName) -> DmResult<Vec<Target>> {
        let req = Request { name: Some(name.as_str()), flags: ioctl::DM_STATUS_TABLE_FLAG, ..Default::default() };
        let r = self.call(Cmd::TableStatus, "table", name.as_str(), &req)?;
        Ok(parse_status_specs(&r.data, r.target_count))
    }

    /// Target status (`dmsetup status`). `noflush` avoids a thin-pool
    /// metadata commit, at the price of slightly stale counters.
    pub fn status(&self, name: &DmName, noflush: bool) -> DmResult<Vec<Target>> {
        let flags = if noflush { ioctl::DM_NOFLUSH_FLAG } else { 0 };
        let req = Request { name: Some(name.as_str()), flags, ..Default::default() };
        let r = self.call(Cmd::TableStatus, "status", name.as_str(), &req)?;
        Ok(parse_status_specs(&r.data, r.target_count))
    }

    /// Send `msg` to the target at `sector`; returns any text the target answered.
    pub fn message(&self, name: &DmName, sector: Sectors, msg: &str) -> DmResult<Option<String>> {
        let mut payload = Vec::with_capacity(8 + msg.len() + 8);
        payload.extend_from_slice(&sector.0.to_ne_bytes());
        payload.extend_from_slice(msg.as_bytes());
        payload.push(0);
        while payload.len() % 8 != 0 {
            payload.push(0);
        }
        let req = Request { name: Some(name.as_str()), payload: &payload, ..Default::default() };
        let r = self.call(Cmd::TargetMsg, "message", name.as_str(), &req)?;
        if r.flags & ioctl::DM_DATA_OUT_FLAG != 0 {
            Ok(Some(ioctl::cstr(&r.data)))
        } else {
            Ok(None)
        }
    }
}

/// Whether the kernel sent a uevent that udev will confirm.
fn fired(r: &DmResult<Reply>) -> bool {
    r.as_ref().is_ok_and(|r| r.flags & ioctl::DM_UEVENT_GENERATED_FLAG != 0)
}

/// Table load payload: specs, each followed by its NUL-terminated params
/// padded to 8 bytes; `next` is relative to the current spec.
pub fn encode_table(targets: &[Target]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in targets {
        let mut params = t.params.as_bytes().to_vec();
        params.push(0);
        while (ioctl::SPEC + params.len()) % 8 != 0 {
            params.push(0);
        }
        let next = (ioctl::SPEC + params.len()) as u32;
        out.extend_from_slice(&t.start.0.to_ne_bytes());
        out.extend_from_slice(&t.length.0.to_ne_bytes());
        out.extend_from_slice(&0i32.to_ne_bytes());
        out.extend_from_slice(&next.to_ne_bytes());
        let mut ty = [0u8; ioctl::DM_MAX_TYPE_NAME];
        let k = t.kind.as_bytes();
        let k = &k[..k.len().min(ioctl::DM_MAX_TYPE_NAME - 1)];
        ty[..k.len()].copy_from_slice(k);
        out.extend_from_slice(&ty);
        out.extend_from_slice(&params);
    }
    out
}

/// Status/table reply: `next` is the offset of the next spec from the start
/// of the data area (unlike table load). Bounds are checked: the data came
/// from the kernel, but a parser never trusts offsets.
pub fn parse_status_specs(data: &[u8], count: u32) -> Vec<Target> {
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..count {
        if off + ioctl::SPEC > data.len() {
            break;
        }
        let s = &data[off..];
        let start = ioctl::get_u64(s, 0);
        let length = ioctl::get_u64(s, 8);
        let next = ioctl::get_u32(s, 20) as usize;
        let kind = ioctl::cstr(&s[24..24 + ioctl::DM_MAX_TYPE_NAME]);
        let params = ioctl::cstr(&s[ioctl::SPEC..]);
        out.push(Target { start: Sectors(start), length: Sectors(length), kind, params });
        if next <= off {
            break;
        }
        off = next;
    }
    out
}

/// DM_LIST_DEVICES reply: `struct dm_name_list { u64 dev; u32 next; char name[]; }`,
/// `next` relative to the current entry, 0 ends; dev 0 in the first means empty.
pub fn parse_name_list(data: &[u8]) -> Vec<(String, DevId)> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 12 <= data.len() {
        let dev = ioctl::get_u64(data, off);
        if dev == 0 && off == 0 {
            break;
        }
        let next = ioctl::get_u32(data, off + 8) as usize;
        out.push((ioctl::cstr(&data[off + 12..]), DevId::from_kernel(dev)));
        if next == 0 {
            break;
        }
        off += next;
    }
    out
}

/// DM_LIST_VERSIONS reply: `struct dm_target_versions { u32 next; u32
/// version[3]; char name[]; }`, `next` relative to the current entry, 0 ends.
pub fn parse_versions(data: &[u8]) -> Vec<(String, [u32; 3])> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 16 < data.len() {
        let next = ioctl::get_u32(data, off) as usize;
        let v = [ioctl::get_u32(data, off + 4), ioctl::get_u32(data, off + 8), ioctl::get_u32(data, off + 12)];
        out.push((ioctl::cstr(&data[off + 16..]), v));
        if next == 0 {
            break;
        }
        off += next;
    }
    out
}

/// Where the node of dm device `name` is made: `<run-dir>/dev/<name>`.
pub fn node_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("dev").join(name)
}

/// A block device node for `dev` at `<run_dir>/dev/<name>` (nothing else
/// names dm devices without udev). Where the kernel's devtmpfs has the
/// device's own node, `/dev/dm-<minor>`, this is a symlink to it: on a
/// systemd host /run is mounted `nodev`, so a node made there with mknod
/// cannot be opened (mkfs and mount fail with EACCES). Without that node
/// (no devtmpfs on /dev) it is made with mknod. An existing entry that
/// already leads to `dev` the chosen way is kept; anything else is replaced.
pub fn make_node(run_dir: &Path, name: &DmName, dev: DevId) -> Result<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let path = node_path(run_dir, name.as_str());
    let dir = run_dir.join("dev");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let is_dev = |m: &std::fs::Metadata| m.file_type().is_block_device() && DevId::from_rdev(m.rdev()) == dev;
    let kernel_node = PathBuf::from(format!("/dev/dm-{}", dev.minor));
    let via_devtmpfs = std::fs::metadata(&kernel_node).is_ok_and(|m| is_dev(&m));
    if let Ok(m) = std::fs::symlink_metadata(&path) {
        let kept = if via_devtmpfs {
            m.file_type().is_symlink() && std::fs::read_link(&path).is_ok_and(|t| t == kernel_node)
        } else {
            is_dev(&m)
        };
        if kept {
            return Ok(path);
        }
        std::fs::remove_file(&path).map_err(|e| Error::io(format!("removing stale node {}", path.display()), e))?;
    }
    if via_devtmpfs {
        std::os::unix::fs::symlink(&kernel_node, &path)
            .map_err(|e| Error::io(format!("symlink {} -> {}", path.display(), kernel_node.display()), e))?;
        return Ok(path);
    }
    nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        dev.to_rdev() as nix::libc::dev_t,
    )
    .map_err(|e| Error::io(format!("mknod {} ({dev})", path.display()), e.into()))?;
    Ok(path)
}

/// Remove the node made by [`make_node`]; missing is fine.
pub fn remove_node(run_dir: &Path, name: &DmName) -> Result<()> {
    let path = node_path(run_dir, name.as_str());
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

mod udev {
    //! udev synchronisation for remove/resume. Only when udev runs
    //! (`/run/udev/control` exists) and has the device-mapper rule that
    //! confirms events (`95-dm-notify.rules`) is there anything to wait for;
    //! otherwise the cookie is 0 and nothing waits. The wait is bounded.
    use super::ioctl::sem;
    use std::time::Duration;

    pub struct Cookie(Option<sem::Semaphore>);

    impl Cookie {
        pub fn new() -> Cookie {
            let rules = ["/usr/lib/udev/rules.d", "/lib/udev/rules.d", "/etc/udev/rules.d", "/run/udev/rules.d"];
            let confirmer = rules.iter().any(|d| std::path::Path::new(d).join("95-dm-notify.rules").exists());
            if !confirmer || !std::path::Path::new("/run/udev/control").exists() {
                return Cookie(None);
            }
            match sem::Semaphore::create() {
                Ok(s) => Cookie(Some(s)),
                Err(e) => {
                    log::debug!("no udev cookie (semaphore: {e}); not waiting for udev");
                    Cookie(None)
                }
            }
        }
        pub fn value(&self) -> u32 {
            self.0.as_ref().map_or(0, |s| s.cookie())
        }
        /// Wait (bounded) for udev's rules to finish with the event, then
        /// release the semaphore. `fired` is false when the ioctl failed and
        /// no event will come.
        pub fn wait(self, fired: bool) {
            if let Some(s) = self.0 {
                if fired {
                    if let Err(e) = s.wait(Duration::from_secs(10)) {
                        log::warn!("udev did not confirm device-mapper event within 10 s: {e}");
                    }
                }
                s.destroy();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing control node and a node whose driver is absent are one
    /// host condition: HostFatal (71) with the modprobe advice, not I/O.
    #[test]
    fn missing_or_driverless_control_node_is_host_fatal() {
        let d = std::env::temp_dir().join(format!("thinimg-dm-open-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let e = Dm::open_at(&d.join("absent")).err().expect("a missing node must fail");
        assert_eq!(e.kind(), Kind::HostFatal, "{e:?}");
        assert!(e.full_message().contains("modprobe dm-mod dm-thin-pool"), "{e:?}");
        // Char major 0 has no driver on any kernel: open gives ENXIO/ENODEV.
        if nix::unistd::geteuid().is_root() {
            let node = d.join("nodriver");
            nix::sys::stat::mknod(
                &node,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                0,
            )
            .unwrap();
            let e = Dm::open_at(&node).err().expect("a node without a driver must fail");
            assert_eq!(e.kind(), Kind::HostFatal, "{e:?}");
            assert!(e.full_message().contains("modprobe dm-mod dm-thin-pool"), "{e:?}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn target_versions_are_parsed() {
        let mut b = Vec::new();
        for (i, (name, v)) in [("thin-pool", [1u32, 23, 0]), ("linear", [1, 4, 0])].iter().enumerate() {
            let mut e = Vec::new();
            let mut n = name.as_bytes().to_vec();
            n.push(0);
            while (16 + n.len()) % 8 != 0 {
                n.push(0);
            }
            let next = if i == 1 { 0 } else { (16 + n.len()) as u32 };
            e.extend_from_slice(&next.to_ne_bytes());
            for x in v {
                e.extend_from_slice(&x.to_ne_bytes());
            }
            e.extend_from_slice(&n);
            b.extend_from_slice(&e);
        }
        let got = parse_versions(&b);
        assert_eq!(got, vec![("thin-pool".to_string(), [1, 23, 0]), ("linear".to_string(), [1, 4, 0])]);
        assert!(parse_versions(&[]).is_empty());
    }

    #[test]
    fn names_are_checked() {
        assert!(DmName::new("thinimg-abc-pool").is_ok());
        assert!(DmName::new("a/b").is_err());
        assert!(DmName::new("").is_err());
        assert!(DmName::new("..").is_err());
        assert!(DmName::new("a b").is_err());
        assert!(DmName::new("x".repeat(127)).is_ok());
        assert!(DmName::new("x".repeat(128)).is_err());
        assert!(ThinId::new(16_777_215).is_ok());
        assert!(ThinId::new(16_777_216).is_err());
    }

    #[test]
    fn dev_encoding_roundtrips() {
        for (ma, mi) in [(253u32, 0u32), (7, 1), (253, 300), (259, 1048575), (4095, 255)] {
            let d = DevId { major: ma, minor: mi };
            assert_eq!(DevId::from_kernel(d.to_kernel()), d);
            assert_eq!(DevId::from_rdev(d.to_rdev()), d);
        }
        assert_eq!(DevId::from_kernel(0xfd00), DevId { major: 253, minor: 0 });
        assert_eq!(DevId::from_kernel(0x10_fd05), DevId { major: 253, minor: 0x105 });
        // glibc makedev(253, 0x105)
        assert_eq!(DevId { major: 253, minor: 0x105 }.to_rdev(), 0x10fd05);
    }

    #[test]
    fn table_encoding_pads_params_and_links_relative() {
        let t = vec![
            Target { start: Sectors(0), length: Sectors(2048), kind: "thin".into(), params: "253:0 5".into() },
            Target { start: Sectors(2048), length: Sectors(8), kind: "error".into(), params: String::new() },
        ];
        let b = encode_table(&t);
        // first: 40 + "253:0 5\0" (8) = 48; second: 40 + "\0" padded to 8 = 48
        assert_eq!(b.len(), 96);
        assert_eq!(ioctl::get_u64(&b, 8), 2048);
        assert_eq!(ioctl::get_u32(&b, 20), 48);
        assert_eq!(&b[24..29], b"thin\0");
        assert_eq!(&b[40..48], b"253:0 5\0");
        assert_eq!(ioctl::get_u64(&b, 48), 2048);
        assert_eq!(ioctl::get_u32(&b, 48 + 20), 48);
        assert_eq!(&b[48 + 24..48 + 30], b"error\0");
    }

    #[test]
    fn status_specs_use_offsets_from_data_start() {
        // Build a reply the way the kernel does: next = offset from data start.
        let mut d = Vec::new();
        let p1 = b"0 0/1024 - \0\0\0\0\0";
        d.extend_from_slice(&0u64.to_ne_bytes());
        d.extend_from_slice(&100u64.to_ne_bytes());
        d.extend_from_slice(&0i32.to_ne_bytes());
        d.extend_from_slice(&((40 + p1.len()) as u32).to_ne_bytes());
        let mut ty = [0u8; 16];
        ty[..4].copy_from_slice(b"thin");
        d.extend_from_slice(&ty);
        d.extend_from_slice(p1);
        let second = d.len();
        d.extend_from_slice(&100u64.to_ne_bytes());
        d.extend_from_slice(&50u64.to_ne_bytes());
        d.extend_from_slice(&0i32.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        let mut ty = [0u8; 16];
        ty[..5].copy_from_slice(b"error");
        d.extend_from_slice(&ty);
        d.extend_from_slice(b"\0\0\0\0\0\0\0\0");
        assert_eq!(second, 56);
        let t = parse_status_specs(&d, 2);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].params, "0 0/1024 - ");
        assert_eq!(t[1].kind, "error");
        assert_eq!(t[1].start, Sectors(100));
        // A count larger than the data is clamped, not trusted.
        assert_eq!(parse_status_specs(&d[..60], 5).len(), 1);
    }

    #[test]
    fn name_list_parses_and_empty_is_empty() {
        let mut d = Vec::new();
        d.extend_from_slice(&0xfd00u64.to_ne_bytes());
        d.extend_from_slice(&24u32.to_ne_bytes());
        d.extend_from_slice(b"pool\0\0\0\0\0\0\0\0");
        d.extend_from_slice(&0xfd01u64.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(b"thin1\0\0\0");
        let l = parse_name_list(&d);
        assert_eq!(
            l,
            vec![("pool".into(), DevId { major: 253, minor: 0 }), ("thin1".into(), DevId { major: 253, minor: 1 })]
        );
        assert!(parse_name_list(&[0u8; 16]).is_empty());
    }
}
