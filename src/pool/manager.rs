//! The pool as the database records it, joined with the kernel: the one
//! place that reads and writes the pool's rows (`store::thin_pool`) and
//! acts on the kernel pool for them (containerd's devmapper `PoolDevice`).
//!
//! - Lifecycle: [`create`] with the intent recorded first (a crash mid-way
//!   is finished by a rerun), [`destroy`], [`assemble_recorded`] after a
//!   reboot (a block pool only on its own devices).
//! - [`PoolManager`]: the pool made usable for the pipeline's steps by
//!   [`PoolManager::prepare`] (found, assembled after a reboot, or created
//!   on first use; it says which), with [`PoolManager::reactivate`] as the
//!   one way activations come back. Every dm call of the process goes
//!   through one lock; thin ids come from the database; the pool's
//!   transaction id is cross-checked on every prepare.
//!
//! It imports the store, never the pipeline or the command layer; device
//! names come from [`super::names`].

use std::path::{Path, PathBuf};

use super::kernel::{Created, Pool};
use super::names::Names;
use super::spec::{self, PoolKind, PoolSpec};
use super::status::{PoolStatus, ThinStatus};
use crate::dm::{DmName, Sectors, ThinId};
use crate::error::{Error, Kind, Result};
use crate::ops::fault;
use crate::store::images::{self as img, ActivationState};
use crate::store::thin_pool::{self as rows, PoolState, ThinRole};

/// What `pool create` was asked for, and what the first pull creates when
/// no pool is recorded.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// Block devices (data, metadata); `None` means loop files under the state dir.
    pub devices: Option<(PathBuf, PathBuf)>,
    pub data_size: u64,
    pub block_sectors: u64,
}

/// The directory holding a loop pool's files.
pub fn loop_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pool")
}

/// Create the pool, or finish a creation a crash interrupted, or (already
/// ready) just assemble it. Returns the pool and whether it was ready before.
/// Devices asked for that are not the recorded pool's are a configuration
/// conflict (78), never silently ignored.
pub fn create(
    conn: &rusqlite::Connection,
    state_dir: &Path,
    run_dir: &Path,
    req: &CreateRequest,
) -> Result<(Pool, bool)> {
    let spec = match rows::load(conn)? {
        Some((spec, PoolState::Ready)) => {
            check_configured_devices(&spec, req.devices.as_ref())?;
            log::info!("thin-pool {} already exists; assembling it", spec.dm_name);
            return Ok((assemble_recorded(conn, &spec, run_dir)?, true));
        }
        Some((spec, PoolState::Creating)) => {
            check_configured_devices(&spec, req.devices.as_ref())?;
            log::info!("finishing the interrupted creation of thin-pool {}", spec.dm_name);
            spec
        }
        None => {
            let name = super::names::default_pool_name(state_dir)?;
            let spec = match &req.devices {
                Some((data, meta)) => spec::block_spec(name, data, meta, req.block_sectors)?,
                None => {
                    let spec = spec::loop_spec(&loop_dir(state_dir), name, req.data_size, req.block_sectors)?;
                    check_loop_fits(state_dir, &spec)?;
                    spec
                }
            };
            // Nothing is recorded or made on a host that cannot run a pool.
            crate::dm::Dm::open()?;
            rows::save(conn, &spec, PoolState::Creating)?;
            spec
        }
    };
    fault::point("pool-create:intent");
    if spec.kind == PoolKind::Loop {
        log::warn!(
            "thin-pool {} is on loop files under {}: for development only, use --data-dev/--meta-dev in production",
            spec.dm_name,
            spec.data_path.parent().unwrap_or(Path::new("/")).display()
        );
        spec::make_loop_files(&spec)?;
        fault::point("pool-create:files");
    }
    let p = Pool::create(&spec, run_dir)?;
    fault::point("pool-create:device");
    if spec.kind == PoolKind::Block {
        if let (Some(d), Some(m)) = (spec::device_identity(&spec.data_path), spec::device_identity(&spec.meta_path)) {
            rows::set_device_ids(conn, &d, &m)?;
        }
    }
    rows::set_state(conn, PoolState::Ready)?;
    Ok((p, false))
}

/// A loop pool's files are sparse, but the pool is allowed to fill them:
/// never make one larger than the state dir's filesystem has room for.
fn check_loop_fits(state_dir: &Path, spec: &PoolSpec) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(state_dir)
        .map_err(|e| Error::io(format!("free space of {}", state_dir.display()), e.into()))?;
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    let need = spec.data_sectors.bytes() + spec.meta_sectors.bytes();
    if need > free {
        return Err(Error::new(
            Kind::CantCreate,
            format!(
                "a loop thin-pool of {} does not fit in the {} free under {}; pass a smaller --data-size, or --data-dev/--meta-dev",
                crate::ops::output::bytes(need),
                crate::ops::output::bytes(free),
                state_dir.display()
            ),
        ));
    }
    Ok(())
}

fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

/// Refuse (78) configured pool devices that are not the recorded pool's.
pub fn check_configured_devices(spec: &PoolSpec, devices: Option<&(PathBuf, PathBuf)>) -> Result<()> {
    let Some((data, meta)) = devices else { return Ok(()) };
    let matches = spec.kind == PoolKind::Block && same_path(data, &spec.data_path) && same_path(meta, &spec.meta_path);
    if matches {
        return Ok(());
    }
    Err(Error::new(
        Kind::Config,
        format!(
            "the configured pool devices (data-dev {}, meta-dev {}) are not those of the recorded {} thin-pool {} \
             (data {}, metadata {}); fix data-dev/meta-dev, or remove the recorded pool with `thinimg pool destroy`",
            data.display(),
            meta.display(),
            spec.kind.as_str(),
            spec.dm_name,
            spec.data_path.display(),
            spec.meta_path.display()
        ),
    ))
}

/// What `pool destroy` did (or, dry, would do).
#[derive(Debug, serde::Serialize)]
pub struct Destroyed {
    pub dm_name: String,
    pub kind: PoolKind,
    pub state: PoolState,
    pub chains: u64,
    pub activations: u64,
    pub removed_files: Vec<PathBuf>,
    pub dry_run: bool,
}

/// Remove the recorded pool: its dm devices and loop bindings (when
/// device-mapper is there at all), a loop pool's files, and every row that
/// depends on it. Refuses while chains or activations exist unless `force`.
pub fn destroy(conn: &rusqlite::Connection, run_dir: &Path, force: bool, dry_run: bool) -> Result<Destroyed> {
    let Some((spec, state)) = rows::load(conn)? else { return Err(no_pool()) };
    let (chains, activations) = rows::dependents(conn)?;
    if (chains > 0 || activations > 0) && !force {
        return Err(Error::new(
            Kind::TempFail,
            format!(
                "thin-pool {} holds {chains} chain(s) and {activations} activation(s); remove them (deactivate --delete, rm, gc) or pass --force to destroy them with the pool",
                spec.dm_name
            ),
        ));
    }
    let files: Vec<PathBuf> = match spec.kind {
        PoolKind::Loop => [&spec.data_path, &spec.meta_path].into_iter().filter(|p| p.is_file()).cloned().collect(),
        PoolKind::Block => Vec::new(),
    };
    let out = Destroyed {
        dm_name: spec.dm_name.as_str().to_string(),
        kind: spec.kind,
        state,
        chains,
        activations,
        removed_files: files.clone(),
        dry_run,
    };
    if dry_run {
        return Ok(out);
    }
    match Pool::find(&spec, run_dir) {
        Ok(Some(p)) => p.teardown()?,
        Ok(None) => {
            // No pool device (an unfinished creation, or after a reboot):
            // only loop bindings of our files may be left.
            if spec.kind == PoolKind::Loop {
                for f in [&spec.meta_path, &spec.data_path] {
                    if let Some(l) = crate::loopdev::find(f)? {
                        crate::loopdev::detach(&l)?;
                    }
                }
            }
        }
        // No device-mapper on this host: nothing of the pool is in the kernel.
        Err(e) if e.kind() == Kind::HostFatal => {}
        Err(e) => return Err(e),
    }
    fault::point("pool-destroy:kernel");
    rows::destroy_rows(conn)?;
    for f in &files {
        std::fs::remove_file(f).map_err(|e| Error::io(format!("removing pool file {}", f.display()), e))?;
    }
    Ok(out)
}

/// The recorded spec, or a clear error when there is none or it is unfinished.
pub fn spec(conn: &rusqlite::Connection) -> Result<PoolSpec> {
    match rows::load(conn)? {
        Some((spec, PoolState::Ready)) => Ok(spec),
        Some((spec, PoolState::Creating)) => Err(Error::new(
            Kind::NoSuchImage,
            format!(
                "thin-pool {} was not finished being created; run `thinimg pool create` to finish it, or `thinimg pool destroy` to roll it back",
                spec.dm_name
            ),
        )),
        None => Err(no_pool()),
    }
}

pub fn no_pool() -> Error {
    Error::new(Kind::NoSuchImage, "no thin-pool is recorded in this state dir; run `thinimg pool create`")
}

/// The names of the recorded pool's devices (from its recorded dm name,
/// not from where the state dir is now), if a pool is recorded.
pub fn recorded_names(conn: &rusqlite::Connection) -> Result<Option<Names>> {
    Ok(rows::load(conn)?.map(|(spec, _)| Names::of_pool(&spec.dm_name)))
}

/// Assemble the recorded pool (after a reboot nothing of it is in the
/// kernel) and check it is healthy.
pub fn assemble_usable(conn: &rusqlite::Connection, run_dir: &Path) -> Result<Pool> {
    let spec = spec(conn)?;
    let p = assemble_recorded(conn, &spec, run_dir)?;
    p.check_usable()?;
    Ok(p)
}

/// Assemble a pool that was created before: a block pool only once its
/// devices are identified as the recorded ones ([`spec::check_block_identity`]).
/// A pool device already in the kernel is adopted as it is (its table is
/// compared by `Pool::assemble`).
pub fn assemble_recorded(conn: &rusqlite::Connection, spec: &PoolSpec, run_dir: &Path) -> Result<Pool> {
    if spec.kind == PoolKind::Block && Pool::find(spec, run_dir)?.is_none() {
        let ids = rows::device_ids(conn)?;
        spec::check_block_identity(spec, ids.as_ref().map(|(d, m)| (d.as_str(), m.as_str())))?;
    }
    Pool::assemble(spec, run_dir)
}

/// Reserve a thin id (row in state `creating`) inside the caller's transaction.
pub fn alloc_thin_id(
    tx: &rusqlite::Connection,
    role: ThinRole,
    origin: Option<ThinId>,
    size: Sectors,
) -> Result<ThinId> {
    rows::alloc_thin_id(tx, role, origin, size)
}

/// EEXIST for a thin id the database just allocated as free.
pub fn diverged(pool: &str, id: ThinId) -> Error {
    Error::new(
        Kind::HostFatal,
        format!(
            "thin id {id} already exists in thin-pool {pool}, but the database does not know it: the database and the \
             pool have diverged (state.db restored from a backup?). Nothing was deleted; compare `thinimg pool status` \
             with the pool (`dmsetup message {pool} 0 reserve_metadata_snap`, thin_dump) before going on"
        ),
    )
}

/// Device-mapper calls of all threads of this process go one at a time:
/// the kernel serializes pool metadata changes anyway, and interleaved
/// suspend/message/resume sequences from two threads would be unsafe.
static DM_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn dm_lock() -> std::sync::MutexGuard<'static, ()> {
    // A poisoned lock only means another thread panicked mid-call; the
    // kernel state is still consistent, so carry on.
    DM_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn name(s: &str) -> Result<DmName> {
    DmName::new(s.to_string())
}

/// Keep the pool's transaction id in step with the database: compare it on
/// every open, then bump it, so a database that is older than the pool (a
/// restored backup) is caught before it hands out thin ids that are in use.
/// The bump records its target first, so a crash between the kernel's
/// change and the database's is recognized, not taken for a divergence.
fn check_transaction_id(conn: &rusqlite::Connection, pool: &Pool) -> Result<()> {
    let PoolStatus::Active(u) = pool.status()? else {
        return Ok(()); // Fail/Error: every use is refused by check_usable anyway
    };
    let k = u.transaction_id;
    match rows::transaction_ids(conn)? {
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
    rows::set_transaction_next(conn, next)?;
    pool.set_transaction_id(k, next)?;
    rows::set_transaction_id(conn, next)
}

/// What [`PoolManager::prepare`] had to do to make the pool usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// The recorded pool was in the kernel already.
    Found,
    /// The recorded pool was not in the kernel (after a reboot) and was
    /// assembled: its activations are not back until [`PoolManager::reactivate`].
    Assembled,
    /// No pool was recorded (or its creation was interrupted): it was created.
    Created,
}

/// One activation [`PoolManager::reactivate`] tried to bring back.
#[derive(Debug)]
pub struct Reactivated {
    pub name: String,
    /// The device node, or why it could not be brought back.
    pub result: Result<PathBuf>,
}

/// An opened pool: the kernel pool and its device names.
pub struct PoolManager {
    pool: Pool,
    names: Names,
}

impl PoolManager {
    /// Make the pool usable: assemble the recorded pool when it is not in
    /// the kernel (after a reboot), or create the one `req` describes (the
    /// default loop pool unless --data-dev/--meta-dev) when none is
    /// recorded or its creation was interrupted. Configured devices that
    /// are not the recorded pool's are refused (78). Re-activates nothing:
    /// after [`Prepared::Assembled`] the caller calls [`PoolManager::reactivate`].
    pub fn prepare(
        conn: &rusqlite::Connection,
        state_dir: &Path,
        run_dir: &Path,
        req: &CreateRequest,
    ) -> Result<(PoolManager, Prepared)> {
        let _g = dm_lock();
        let recorded = rows::load(conn)?;
        if let Some((spec, _)) = &recorded {
            check_configured_devices(spec, req.devices.as_ref())?;
        }
        let (pool, what) = match recorded {
            Some((spec, PoolState::Ready)) => match Pool::find(&spec, run_dir)? {
                Some(p) => (p, Prepared::Found),
                None => {
                    log::info!("assembling thin-pool {} (not in the kernel: after a reboot?)", spec.dm_name);
                    (assemble_recorded(conn, &spec, run_dir)?, Prepared::Assembled)
                }
            },
            _ => (create(conn, state_dir, run_dir, req)?.0, Prepared::Created),
        };
        check_transaction_id(conn, &pool)?;
        Ok((PoolManager { names: Names::of_pool(pool.name()), pool }, what))
    }

    /// Bring back every activation recorded as active whose device is not
    /// in the kernel (after a reboot: all of them). One activation that
    /// cannot be brought back does not stop the others; each is reported.
    pub fn reactivate(&self, conn: &rusqlite::Connection) -> Result<Vec<Reactivated>> {
        let present = self.list_ours()?;
        let mut out = Vec::new();
        for a in img::activations(conn)? {
            let dm_name = self.names.activation(&a.name);
            if a.state != ActivationState::Active || present.contains(&dm_name) {
                continue;
            }
            let size = rows::thin_size(conn, a.thin_id)?;
            let result = self.activate(&dm_name, a.thin_id, size);
            out.push(Reactivated { name: a.name, result });
        }
        Ok(out)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn pool_name(&self) -> String {
        self.pool.name().as_str().to_string()
    }

    pub fn build_name(&self, thin_id: ThinId) -> String {
        self.names.build(thin_id)
    }

    pub fn activation_name(&self, act: &str) -> String {
        self.names.activation(act)
    }

    pub fn check_usable(&self) -> Result<()> {
        let _g = dm_lock();
        self.pool.check_usable().map(|_| ())
    }

    /// A thin device whose status is `Fail` lost writes.
    pub fn check_thin(&self, dm_name: &str) -> Result<()> {
        let _g = dm_lock();
        match self.pool.thin_status(&name(dm_name)?)? {
            ThinStatus::Fail => Err(Error::new(
                Kind::Io,
                format!("thin device {dm_name} has failed (status Fail): its writes were lost"),
            )),
            ThinStatus::Active { .. } => Ok(()),
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
    pub fn create_thin(&self, id: ThinId) -> Result<Created> {
        let _g = dm_lock();
        self.pool.create_thin(id)
    }

    /// A snapshot of `origin`; suspends the origin if it happens to be
    /// active. `Created::Exists` as for [`PoolManager::create_thin`].
    pub fn snapshot(&self, id: ThinId, origin: ThinId) -> Result<Created> {
        let _g = dm_lock();
        let origin_dev = name(&self.build_name(origin))?;
        let active = matches!(self.pool.dm().try_info(&origin_dev), Ok(Some(_))).then_some(origin_dev);
        self.pool.snapshot(id, origin, active.as_ref())
    }

    pub fn delete_thin(&self, id: ThinId) -> Result<()> {
        let _g = dm_lock();
        self.pool.delete_thin(id).map(|_| ())
    }

    pub fn activate(&self, dm_name: &str, id: ThinId, size: Sectors) -> Result<PathBuf> {
        let _g = dm_lock();
        Ok(self.pool.activate(&name(dm_name)?, id, size)?.path)
    }

    pub fn deactivate(&self, dm_name: &str) -> Result<()> {
        let _g = dm_lock();
        self.pool.deactivate(&name(dm_name)?).map(|_| ())
    }

    /// Names of the dm devices of this state dir, the pool's own excluded.
    pub fn list_ours(&self) -> Result<Vec<String>> {
        Ok(self.pool.list_ours(&self.names)?.into_iter().map(|(n, _)| n.as_str().to_string()).collect())
    }
}
