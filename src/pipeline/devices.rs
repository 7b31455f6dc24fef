//! The pipeline's view of the pool: naming of our dm devices, and the
//! pool opened (re-assembled after a reboot, or created as a loop pool on
//! first use) from what the database recorded.
//!
//! Names: every dm device of a state dir starts with `thinimg-<tag>-`
//! (tag from the state dir's path, see `pool::default_dm_name`): the pool
//! `…pool`, chain build devices `…c<thin-id>`, activations `…a-<name>`.
//! Nodes are made under `<run-dir>/dev/<dm-name>`.

use std::path::{Path, PathBuf};

use crate::dm::{DmName, Sectors, ThinId};
use crate::error::{Error, Kind, Result};
pub use crate::pool::Created;
use crate::pool::Pool;

/// Device-mapper calls of all threads of this process go one at a time:
/// the kernel serializes pool metadata changes anyway, and interleaved
/// suspend/message/resume sequences from two threads would be unsafe.
static DM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn dm_lock() -> std::sync::MutexGuard<'static, ()> {
    // A poisoned lock only means another thread panicked mid-call; the
    // kernel state is still consistent, so carry on.
    DM_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Devices {
    pool: Pool,
    prefix: String,
}

/// `thinimg-<tag>-` for a state dir.
pub fn prefix_for(state_dir: &Path) -> String {
    match crate::pool::default_dm_name(state_dir) {
        Ok(n) => n.as_str().trim_end_matches("pool").to_string(),
        Err(_) => "thinimg-unknown-".to_string(),
    }
}

pub fn activation_name_for(state_dir: &Path, name: &str) -> String {
    format!("{}a-{name}", prefix_for(state_dir))
}

pub fn node_path(run_dir: &Path, dm_name: &str) -> PathBuf {
    run_dir.join("dev").join(dm_name)
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

/// Reserve a thin id (row in state `creating`) inside the caller's transaction.
pub fn alloc_thin_id(
    tx: &rusqlite::Connection,
    activation: bool,
    origin: Option<u32>,
    size_sectors: u64,
) -> Result<u32> {
    use crate::store::thin_pool::ThinRole;
    let role = if activation { ThinRole::Activation } else { ThinRole::Chain };
    let origin = origin.map(thin).transpose()?;
    Ok(crate::store::thin_pool::alloc_thin_id(tx, role, origin, Sectors(size_sectors))?.get())
}

fn name(s: &str) -> Result<DmName> {
    DmName::new(s.to_string())
}

fn thin(id: u32) -> Result<ThinId> {
    ThinId::new(u64::from(id))
}

/// EEXIST for a thin id the database just allocated as free.
pub fn diverged(pool: &str, id: u32) -> Error {
    Error::new(
        Kind::HostFatal,
        format!(
            "thin id {id} already exists in thin-pool {pool}, but the database does not know it: the database and the \
             pool have diverged (state.db restored from a backup?). Nothing was deleted; compare `thinimg pool status` \
             with the pool (`dmsetup message {pool} 0 reserve_metadata_snap`, thin_dump) before going on"
        ),
    )
}

/// Keep the pool's transaction id in step with the database: compare it on
/// every open, then bump it, so a database that is older than the pool (a
/// restored backup) is caught before it hands out thin ids that are in use.
/// The bump records its target first, so a crash between the kernel's
/// change and the database's is recognized, not taken for a divergence.
fn check_transaction_id(conn: &rusqlite::Connection, pool: &Pool) -> Result<()> {
    use crate::store::thin_pool as spool;
    let crate::pool::PoolStatus::Active(u) = pool.status()? else {
        return Ok(()); // Fail/Error: every use is refused by check_usable anyway
    };
    let k = u.transaction_id;
    match spool::transaction_ids(conn)? {
        (None, _) => log::info!("thin-pool {}: recording its transaction id {k}", pool.name()),
        (Some(n), _) if n == k => {}
        (Some(n), Some(next)) if next == n + 1 && k == next => {}
        (Some(n), _) => {
            return Err(Error::new(
                Kind::HostFatal,
                format!(
                    "thin-pool {} has transaction id {k}, but the database recorded {n}: the database does not match \
                     the pool (state.db restored from a backup, or the pool changed outside this state dir); refusing \
                     to create or delete anything in it",
                    pool.name()
                ),
            ));
        }
    }
    let next = k + 1;
    spool::set_transaction_next(conn, next)?;
    pool.set_transaction_id(k, next)?;
    spool::set_transaction_id(conn, next)
}

/// `thinimg-<tag>-` of the pool the database recorded (device names come
/// from it, not from where the state dir is now), if one is recorded.
pub fn recorded_prefix(conn: &rusqlite::Connection) -> Result<Option<String>> {
    Ok(crate::store::thin_pool::load(conn)?.map(|(spec, _)| spec.dm_name.as_str().trim_end_matches("pool").to_string()))
}

impl Devices {
    /// Assemble the recorded pool, or create the one `req` describes (the
    /// default loop pool unless --data-dev/--meta-dev) when none is
    /// recorded yet.
    pub fn open(
        state_dir: &Path,
        run_dir: &Path,
        req: &crate::poolctl::CreateRequest,
        conn: &rusqlite::Connection,
    ) -> Result<Devices> {
        use crate::store::thin_pool::{self as spool, PoolState};
        let _g = dm_lock();
        let recorded = spool::load(conn)?;
        if let Some((spec, _)) = &recorded {
            crate::poolctl::check_configured_devices(spec, req.devices.as_ref())?;
        }
        let (pool, was_down) = match recorded {
            Some((spec, PoolState::Ready)) => match Pool::find(&spec, run_dir)? {
                Some(p) => (p, false),
                None => {
                    log::info!("assembling thin-pool {} (not in the kernel: after a reboot?)", spec.dm_name);
                    (crate::poolctl::assemble_recorded(conn, &spec, run_dir)?, true)
                }
            },
            // First use (or an interrupted creation): the requested pool.
            _ => (crate::poolctl::create(conn, state_dir, run_dir, req)?.0, false),
        };
        check_transaction_id(conn, &pool)?;
        let prefix = pool.name().as_str().trim_end_matches("pool").to_string();
        drop(_g);
        let d = Devices { pool, prefix };
        if was_down {
            d.reactivate_all(conn)?;
        }
        Ok(d)
    }

    /// After a reboot: bring back every activation recorded as active.
    fn reactivate_all(&self, conn: &rusqlite::Connection) -> Result<()> {
        for a in crate::store::images::activations(conn)? {
            if a.state != crate::store::images::ActivationState::Active {
                continue;
            }
            let size = crate::store::thin_pool::thin_size(conn, a.thin_id)?;
            match self.activate(&self.activation_name(&a.name), a.thin_id, size) {
                Ok(p) => log::info!("re-activated {} at {}", a.name, p.display()),
                Err(e) => log::error!("re-activating {}: {}", a.name, e.full_message()),
            }
        }
        Ok(())
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn pool_name(&self) -> String {
        self.pool.name().as_str().to_string()
    }

    pub fn build_name(&self, thin_id: u32) -> String {
        format!("{}c{thin_id}", self.prefix)
    }

    pub fn activation_name(&self, act: &str) -> String {
        format!("{}a-{act}", self.prefix)
    }

    pub fn check_usable(&self) -> Result<()> {
        let _g = dm_lock();
        self.pool.check_usable().map(|_| ())
    }

    /// A thin device whose status is `Fail` lost writes.
    pub fn check_thin(&self, dm_name: &str) -> Result<()> {
        let _g = dm_lock();
        match self.pool.thin_status(&name(dm_name)?)? {
            crate::pool::ThinStatus::Fail => Err(Error::new(
                Kind::Io,
                format!("thin device {dm_name} has failed (status Fail): its writes were lost"),
            )),
            crate::pool::ThinStatus::Active { .. } => Ok(()),
        }
    }

    pub fn ensure_space(&self, data_bytes: u64) -> Result<()> {
        let _g = dm_lock();
        self.pool.ensure_space(data_bytes)
    }

    /// A fresh thin device under an id the database just allocated.
    /// `Created::Exists` means the database and the pool diverged (state.db
    /// restored from a backup, rows lost): that device may be a live VM's
    /// disk. The caller must never delete it and stops with [`diverged`].
    pub fn create_thin(&self, id: u32) -> Result<Created> {
        let _g = dm_lock();
        self.pool.create_thin(thin(id)?)
    }

    /// A snapshot of `origin`; suspends the origin if it happens to be
    /// active. `Created::Exists` as for [`Devices::create_thin`].
    pub fn snapshot(&self, id: u32, origin: u32) -> Result<Created> {
        let _g = dm_lock();
        let active = [self.build_name(origin)]
            .into_iter()
            .map(|n| name(&n))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .find(|n| matches!(self.pool.dm().try_info(n), Ok(Some(_))));
        self.pool.snapshot(thin(id)?, thin(origin)?, active.as_ref())
    }

    pub fn delete_thin(&self, id: u32) -> Result<()> {
        let _g = dm_lock();
        self.pool.delete_thin(thin(id)?).map(|_| ())
    }

    pub fn activate(&self, dm_name: &str, id: u32, size_sectors: u64) -> Result<PathBuf> {
        let _g = dm_lock();
        Ok(self.pool.activate(&name(dm_name)?, thin(id)?, Sectors(size_sectors))?.path)
    }

    pub fn deactivate(&self, dm_name: &str) -> Result<()> {
        let _g = dm_lock();
        self.pool.deactivate(&name(dm_name)?).map(|_| ())
    }

    /// Names of the dm devices of this state dir (pool included).
    pub fn list_ours(&self) -> Result<Vec<String>> {
        Ok(self.pool.list_ours(&self.prefix)?.into_iter().map(|(n, _)| n.as_str().to_string()).collect())
    }
}
