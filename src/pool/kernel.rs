//! The thin-pool in the kernel: assembling it (loops, the pool dm device)
//! after creation or a reboot, finding it, its status, and the thin
//! devices inside it (create, snapshot, delete, activate, deactivate).
//!
//! It owns the policy around the raw dm calls: bounded EBUSY retries,
//! EEXIST/ENODATA/ENXIO meaning "exists"/"already done", suspend-then-
//! ALWAYS-resume around snapshots, refusing foreign or unhealthy pools.
//! It never touches the database (`manager` persists the spec and
//! allocates thin ids through `store::thin_pool`) and never removes a dm
//! device it was not told to, except in [`Pool::teardown`], which only
//! removes devices whose table points at this pool.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use super::names::Names;
use super::spec::{block_dev_of, PoolKind, PoolSpec, THIN_SUPERBLOCK_MAGIC};
use super::status::{PoolStatus, PoolUsage, ThinStatus};
use crate::dm::{self, DevId, Dm, DmName, Sectors, Target, ThinId};
use crate::error::{Error, Kind, Result};
use crate::loopdev;

/// Whether a thin device is new or was already there (the caller reconciles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    Exists,
}

/// Whether a delete/remove did something or found it already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    Removed,
    AlreadyGone,
}

/// A block device node of an active dm device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DevNode {
    pub major: u32,
    pub minor: u32,
    pub path: PathBuf,
}

/// An assembled thin-pool.
pub struct Pool {
    spec: PoolSpec,
    dm: Dm,
    dev: DevId,
    run_dir: PathBuf,
    loops: Vec<loopdev::Loop>,
    /// This process created the pool dm device (it had no thin devices active).
    assembled_now: bool,
}

/// Retries of EBUSY on remove/delete: ~3 s in all, then a TempFail.
const BUSY_RETRIES: u32 = 8;
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(25 << attempt.min(6))
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Pool {
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }
    pub fn dev(&self) -> DevId {
        self.dev
    }
    pub fn name(&self) -> &DmName {
        &self.spec.dm_name
    }
    pub fn dm(&self) -> &Dm {
        &self.dm
    }
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Create a pool that we believe is new: zero the metadata header unless
    /// it already holds a thin-pool superblock (a rerun after a crash), then
    /// assemble, then refuse it unless it is empty (transaction 0, no data
    /// blocks used): a non-empty pool is not ours.
    pub fn create(spec: &PoolSpec, run_dir: &Path) -> Result<Pool> {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&spec.meta_path)
            .map_err(|e| Error::io(format!("opening pool metadata {}", spec.meta_path.display()), e))?;
        let mut head = [0u8; 4096];
        f.read_exact(&mut head).map_err(|e| Error::io(format!("reading {}", spec.meta_path.display()), e))?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&head[32..40]);
        let formatted = u64::from_le_bytes(magic) == THIN_SUPERBLOCK_MAGIC;
        if !formatted && head.iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(0)).map_err(|e| Error::io("seek", e))?;
            f.write_all(&[0u8; 4096]).map_err(|e| Error::io(format!("zeroing {}", spec.meta_path.display()), e))?;
            f.sync_all().map_err(|e| Error::io(format!("fsync {}", spec.meta_path.display()), e))?;
        }
        drop(f);
        let pool = Pool::assemble(spec, run_dir)?;
        if formatted {
            let st = pool.status()?;
            if let PoolStatus::Active(u) = &st {
                if u.transaction_id != 0 || u.data_used != 0 {
                    let msg = format!(
                        "refusing foreign thin-pool metadata on {}: transaction id {}, {} data blocks used (a new pool has 0 and 0)",
                        spec.meta_path.display(),
                        u.transaction_id,
                        u.data_used
                    );
                    // Undo only what this call did: a pool device we just
                    // made has no thin devices on it yet. One that was
                    // already there is left alone (it and its devices may be
                    // in use). Our loop fds close with `pool`; autoclear
                    // bindings then go away with the device.
                    if pool.assembled_now {
                        remove_bounded(&pool.dm, &pool.spec.dm_name)?;
                    }
                    return Err(Error::new(Kind::CantCreate, msg));
                }
            }
        }
        Ok(pool)
    }

    /// Bring the pool up from its spec: bind loops (reusing bindings), and
    /// create the pool dm device, or adopt it when it is there with the same
    /// table. Never formats anything by itself.
    pub fn assemble(spec: &PoolSpec, run_dir: &Path) -> Result<Pool> {
        let dm = Dm::open()?;
        let mut loops = Vec::new();
        let (meta, data) = match spec.kind {
            PoolKind::Loop => {
                let m = loopdev::attach(&spec.meta_path, false)?;
                let d = loopdev::attach(&spec.data_path, false)?;
                let ids = (m.dev, d.dev);
                loops.push(m);
                loops.push(d);
                ids
            }
            PoolKind::Block => (block_dev_of(&spec.meta_path)?, block_dev_of(&spec.data_path)?),
        };
        let name = &spec.dm_name;
        let want = pool_params(spec, meta, data);
        let mut assembled_now = false;
        let dev = match dm.try_info(name)? {
            Some(info) if info.active_table => {
                let t = dm.table(name)?;
                let ok = t.len() == 1
                    && t[0].kind == "thin-pool"
                    && t[0].length == spec.data_sectors
                    && norm(&t[0].params) == norm(&want);
                if !ok {
                    return Err(Error::new(
                        Kind::CantCreate,
                        format!("dm device {name} exists with a different table ({t:?}); expected thin-pool {want}"),
                    ));
                }
                if info.suspended {
                    dm.resume(name)?;
                }
                info.dev
            }
            Some(info) => {
                // Created but never loaded (a crash between the two): finish.
                load_and_resume(&dm, name, &pool_target(spec, &want)).map_err(|e| pool_load_error(&dm, e))?;
                assembled_now = true;
                info.dev
            }
            None => {
                assembled_now = true;
                let dev = dm.create(name, None)?;
                if let Err(e) = load_and_resume(&dm, name, &pool_target(spec, &want)) {
                    let _ = dm.remove(name);
                    return Err(pool_load_error(&dm, e).context(format!(
                        "creating thin-pool {name} on {} / {}",
                        spec.meta_path.display(),
                        spec.data_path.display()
                    )));
                }
                dev
            }
        };
        log::debug!("thin-pool {name} is {dev}");
        Ok(Pool { spec: spec.clone(), dm, dev, run_dir: run_dir.to_path_buf(), loops, assembled_now })
    }

    /// The pool as it is now, without creating anything: `None` when its dm
    /// device does not exist (e.g. after a reboot, before assembly).
    pub fn find(spec: &PoolSpec, run_dir: &Path) -> Result<Option<Pool>> {
        let dm = Dm::open()?;
        let Some(info) = dm.try_info(&spec.dm_name)? else { return Ok(None) };
        let mut loops = Vec::new();
        if spec.kind == PoolKind::Loop {
            loops.extend(loopdev::find(&spec.meta_path)?);
            loops.extend(loopdev::find(&spec.data_path)?);
        }
        Ok(Some(Pool {
            spec: spec.clone(),
            dm,
            dev: info.dev,
            run_dir: run_dir.to_path_buf(),
            loops,
            assembled_now: false,
        }))
    }

    pub fn status(&self) -> Result<PoolStatus> {
        let t = self.dm.status(&self.spec.dm_name, false)?;
        match t.as_slice() {
            [one] if one.kind == "thin-pool" => PoolStatus::parse(&one.params),
            _ => Err(Error::new(
                Kind::Software,
                format!("{} does not have one thin-pool target: {t:?}", self.spec.dm_name),
            )),
        }
    }

    /// HostFatal for Fail/Error/needs_check/ro, TempFail for out_of_data_space.
    pub fn check_usable(&self) -> Result<PoolUsage> {
        self.status()?.usable(&self.spec.dm_name).cloned()
    }

    /// Gate device creation: the pool must be usable and have `data_bytes`
    /// of free data and metadata above the kernel's low watermark.
    pub fn ensure_space(&self, data_bytes: u64) -> Result<()> {
        let u = self.check_usable()?;
        let block_bytes = self.spec.block_sectors.bytes();
        let free = (u.data_total - u.data_used.min(u.data_total)) * block_bytes;
        if free < data_bytes {
            return Err(Error::new(
                Kind::TempFail,
                format!(
                    "thin-pool {} has {} free data, {} needed; free space by removing activations or run gc",
                    self.spec.dm_name,
                    crate::ops::output::bytes(free),
                    crate::ops::output::bytes(data_bytes)
                ),
            ));
        }
        let meta_free = u.meta_total - u.meta_used.min(u.meta_total);
        let meta_floor = u.meta_low_water.unwrap_or(u.meta_total / 20).max(16);
        if meta_free <= meta_floor {
            return Err(Error::new(
                Kind::TempFail,
                format!(
                    "thin-pool {} metadata is nearly full ({}/{} blocks used, floor {meta_floor} free)",
                    self.spec.dm_name, u.meta_used, u.meta_total
                ),
            ));
        }
        Ok(())
    }

    fn message(&self, msg: &str) -> dm::DmResult<Option<String>> {
        self.dm.message(&self.spec.dm_name, Sectors(0), msg)
    }

    /// `create_thin <id>`. EEXIST is reported as [`Created::Exists`].
    pub fn create_thin(&self, id: ThinId) -> Result<Created> {
        match self.message(&format!("create_thin {id}")) {
            Ok(_) => Ok(Created::New),
            Err(e) if e.errno() == Errno::EEXIST => Ok(Created::Exists),
            Err(e) => Err(Error::from(e).context(format!("create_thin {id} in {}", self.spec.dm_name))),
        }
    }

    /// `create_snap <new> <origin>`. An active origin must be suspended
    /// around the message (so its writes are on disk and stay consistent);
    /// it is ALWAYS resumed, whatever happened.
    pub fn snapshot(&self, new: ThinId, origin: ThinId, active_origin: Option<&DmName>) -> Result<Created> {
        if let Some(o) = active_origin {
            self.dm
                .suspend(o)
                .map_err(|e| Error::from(e).context(format!("suspending origin {o} for snapshot {new}")))?;
        }
        let r = self.message(&format!("create_snap {new} {origin}"));
        let resumed = match active_origin {
            Some(o) => self
                .dm
                .resume(o)
                .map_err(|e| Error::from(e).context(format!("resuming origin {o} after snapshot {new}"))),
            None => Ok(()),
        };
        let created = match r {
            Ok(_) => Created::New,
            Err(e) if e.errno() == Errno::EEXIST => Created::Exists,
            Err(e) => {
                let err = Error::from(e).context(format!("create_snap {new} of {origin} in {}", self.spec.dm_name));
                if let Err(re) = resumed {
                    log::error!("{}", re.full_message());
                }
                return Err(err);
            }
        };
        resumed?;
        Ok(created)
    }

    /// `set_transaction_id <old> <new>`: a compare-and-swap on the pool's
    /// transaction id, for cross-checking the database against the kernel.
    /// EINVAL (the kernel's answer when `old` is not current) is reported
    /// as a Software error naming both values.
    pub fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        match self.message(&format!("set_transaction_id {old} {new}")) {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == Errno::EINVAL => Err(Error::new(
                Kind::Software,
                format!("thin-pool {} transaction id is not {old} (wanted to set {new}); the database and the pool disagree", self.spec.dm_name),
            )
            .with_source(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// Resume `name` if a crash left it suspended (e.g. between the suspend
    /// and the resume of a snapshot). Missing is fine.
    pub fn resume_if_suspended(&self, name: &DmName) -> Result<bool> {
        match self.dm.try_info(name)? {
            Some(i) if i.suspended => {
                self.dm.resume(name)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Status of an active thin device.
    pub fn thin_status(&self, name: &DmName) -> Result<ThinStatus> {
        let t = self.dm.status(name, true)?;
        match t.as_slice() {
            [one] if one.kind == "thin" => ThinStatus::parse(&one.params),
            _ => Err(Error::new(Kind::Software, format!("{name} is not one thin target: {t:?}"))),
        }
    }

    /// `delete <id>`: ENODATA means already deleted; EBUSY (still open) is
    /// retried a bounded number of times.
    pub fn delete_thin(&self, id: ThinId) -> Result<Gone> {
        for attempt in 0..=BUSY_RETRIES {
            match self.message(&format!("delete {id}")) {
                Ok(_) => return Ok(Gone::Removed),
                Err(e) if e.errno() == Errno::ENODATA => return Ok(Gone::AlreadyGone),
                Err(e) if e.errno() == Errno::EBUSY && attempt < BUSY_RETRIES => std::thread::sleep(backoff(attempt)),
                Err(e) => return Err(Error::from(e).context(format!("deleting thin id {id} in {}", self.spec.dm_name))),
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    fn thin_target(&self, id: ThinId, size: Sectors) -> Target {
        Target { start: Sectors(0), length: size, kind: "thin".into(), params: format!("{} {id}", self.dev) }
    }

    /// Activate thin `id` as dm device `name` of `size`. Idempotent: a device
    /// of that name with the same table is adopted; with another table it is
    /// an error.
    pub fn activate(&self, name: &DmName, id: ThinId, size: Sectors) -> Result<DevNode> {
        let want = self.thin_target(id, size);
        let dev = match self.dm.try_info(name)? {
            Some(info) if info.active_table => {
                let t = self.dm.table(name)?;
                let same = t.len() == 1
                    && t[0].kind == want.kind
                    && t[0].length == want.length
                    && norm(&t[0].params) == norm(&want.params);
                if !same {
                    return Err(Error::new(
                        Kind::CantCreate,
                        format!(
                            "dm device {name} exists with another table ({t:?}), not thin {id} of {}",
                            self.spec.dm_name
                        ),
                    ));
                }
                if info.suspended {
                    self.dm.resume(name)?;
                }
                info.dev
            }
            Some(info) => {
                load_and_resume(&self.dm, name, &[want])?;
                info.dev
            }
            None => {
                let dev = self.dm.create(name, None)?;
                if let Err(e) = load_and_resume(&self.dm, name, &[want]) {
                    let _ = self.dm.remove(name);
                    return Err(Error::from(e).context(format!("activating thin {id} as {name}")));
                }
                dev
            }
        };
        let path = dm::make_node(&self.run_dir, name, dev)?;
        Ok(DevNode { major: dev.major, minor: dev.minor, path })
    }

    /// Remove dm device `name`: ENXIO means already gone; EBUSY is retried
    /// (bounded), then a TempFail naming the device and its open count.
    pub fn deactivate(&self, name: &DmName) -> Result<Gone> {
        remove_bounded(&self.dm, name).and_then(|g| {
            dm::remove_node(&self.run_dir, name)?;
            Ok(g)
        })
    }

    /// dm devices named as `names` names ours, except the pool itself.
    pub fn list_ours(&self, names: &Names) -> Result<Vec<(DmName, DevId)>> {
        let mut out = Vec::new();
        for (n, d) in self.dm.list()? {
            if names.is_ours(&n) && n != self.spec.dm_name.as_str() {
                out.push((DmName::new(n)?, d));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Remove every thin device of this pool, the pool device and its loop
    /// bindings: the state a reboot leaves. For tests and `gc --teardown`.
    pub fn teardown(self) -> Result<()> {
        let pool_ref = self.dev.to_string();
        for (n, _) in self.dm.list()? {
            let name = DmName::new(n)?;
            if name == self.spec.dm_name {
                continue;
            }
            let t = match self.dm.table(&name) {
                Ok(t) => t,
                Err(e) if e.errno() == Errno::ENXIO => continue,
                Err(e) => return Err(e.into()),
            };
            if t.iter().any(|t| t.kind == "thin" && t.params.split_whitespace().next() == Some(pool_ref.as_str())) {
                remove_bounded(&self.dm, &name)?;
                dm::remove_node(&self.run_dir, &name)?;
            }
        }
        remove_bounded(&self.dm, &self.spec.dm_name)?;
        dm::remove_node(&self.run_dir, &self.spec.dm_name)?;
        for l in &self.loops {
            loopdev::detach(l)?;
        }
        Ok(())
    }
}

/// (major, minor) of a block device node, if it is one.
pub fn node_numbers(p: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(p).ok()?;
    if !m.file_type().is_block_device() {
        return None;
    }
    let rdev = m.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// The dm name of block device `major:minor` as the kernel reports it in
/// sysfs, or `None` when it is not a dm device (or not there at all).
pub fn dm_name_of(major: u32, minor: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/dm/name")).ok()?;
    Some(s.trim_end_matches('\n').to_string())
}

fn pool_params(spec: &PoolSpec, meta: DevId, data: DevId) -> String {
    format!("{meta} {data} {} {} 1 error_if_no_space", spec.block_sectors.0, spec.low_water)
}

fn pool_target(spec: &PoolSpec, params: &str) -> [Target; 1] {
    [Target { start: Sectors(0), length: spec.data_sectors, kind: "thin-pool".into(), params: params.to_string() }]
}

/// A failed thin-pool table load. EINVAL is also the kernel's answer for
/// a target type it cannot load (dm-thin-pool missing): that is a host
/// condition, told apart by asking which targets the kernel has.
fn pool_load_error(dm: &Dm, e: dm::DmError) -> Error {
    if e.errno() == Errno::EINVAL {
        if let Ok(targets) = dm.target_versions() {
            if !targets.iter().any(|(n, _)| n == "thin-pool") {
                return dm::unavailable("the kernel has no thin-pool target").with_source(e);
            }
        }
    }
    Error::from(e)
}

fn load_and_resume(dm: &Dm, name: &DmName, t: &[Target]) -> dm::DmResult<()> {
    dm.load(name, t)?;
    dm.resume(name)
}

fn remove_bounded(dm: &Dm, name: &DmName) -> Result<Gone> {
    for attempt in 0..=BUSY_RETRIES {
        match dm.remove(name) {
            Ok(()) => return Ok(Gone::Removed),
            Err(e) if e.errno() == Errno::ENXIO => return Ok(Gone::AlreadyGone),
            Err(e) if e.errno() == Errno::EBUSY => {
                if attempt < BUSY_RETRIES {
                    std::thread::sleep(backoff(attempt));
                    continue;
                }
                let open = dm.info(name).map(|i| i.open_count).unwrap_or(-1);
                return Err(Error::new(
                    Kind::TempFail,
                    format!(
                        "dm device {name} is busy (open count {open}) after {} attempts; close whatever holds it (a mount, a VM, an open fd) and retry",
                        BUSY_RETRIES + 1
                    ),
                )
                .with_source(e));
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_table_params() {
        let spec = PoolSpec {
            dm_name: DmName::new("p").unwrap(),
            kind: PoolKind::Loop,
            data_path: "/d".into(),
            meta_path: "/m".into(),
            data_sectors: Sectors(4 << 20),
            meta_sectors: Sectors(8192),
            block_sectors: Sectors(128),
            low_water: 327,
        };
        let p = pool_params(&spec, DevId { major: 7, minor: 1 }, DevId { major: 7, minor: 0 });
        assert_eq!(p, "7:1 7:0 128 327 1 error_if_no_space");
        // The kernel echoes it with a trailing space; adoption compares normalized.
        assert_eq!(norm("7:1 7:0 128 327 1 error_if_no_space "), p);
        let j = serde_json::to_string(&spec).unwrap();
        let back: PoolSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, spec);
        assert!(serde_json::from_str::<PoolSpec>(&j.replace("\"p\"", "\"a/b\"")).is_err());
    }
}
