//! The pool's lifecycle as recorded in the database: create it with intent
//! first (so a crash mid-way is finished by a rerun), and open it after a
//! reboot from its persisted spec.
//!
//! It is the only place that joins `store::thin_pool` (the row) with `pool` (the
//! kernel). It never allocates or deletes thin devices; the pipeline does.

use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};
use crate::ops::fault;
use crate::pool::{self, Pool, PoolKind, PoolSpec};
use crate::store::thin_pool::{self as spool, PoolState};

/// What `pool create` was asked for.
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
    let spec = match spool::load(conn)? {
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
            let name = pool::default_dm_name(state_dir)?;
            let spec = match &req.devices {
                Some((data, meta)) => pool::block_spec(name, data, meta, req.block_sectors)?,
                None => {
                    let spec = pool::loop_spec(&loop_dir(state_dir), name, req.data_size, req.block_sectors)?;
                    check_loop_fits(state_dir, &spec)?;
                    spec
                }
            };
            // Nothing is recorded or made on a host that cannot run a pool.
            crate::dm::Dm::open()?;
            spool::save(conn, &spec, PoolState::Creating)?;
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
        pool::make_loop_files(&spec)?;
        fault::point("pool-create:files");
    }
    let p = Pool::create(&spec, run_dir)?;
    fault::point("pool-create:device");
    if spec.kind == PoolKind::Block {
        if let (Some(d), Some(m)) = (pool::device_identity(&spec.data_path), pool::device_identity(&spec.meta_path)) {
            spool::set_device_ids(conn, &d, &m)?;
        }
    }
    spool::set_state(conn, PoolState::Ready)?;
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
    let Some((spec, state)) = spool::load(conn)? else { return Err(no_pool()) };
    let (chains, activations) = spool::dependents(conn)?;
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
    spool::destroy_rows(conn)?;
    for f in &files {
        std::fs::remove_file(f).map_err(|e| Error::io(format!("removing pool file {}", f.display()), e))?;
    }
    Ok(out)
}

/// The recorded spec, or a clear error when there is none or it is unfinished.
pub fn spec(conn: &rusqlite::Connection) -> Result<PoolSpec> {
    match spool::load(conn)? {
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

/// Assemble the recorded pool (after a reboot nothing of it is in the
/// kernel) and check it is healthy.
pub fn open(conn: &rusqlite::Connection, run_dir: &Path) -> Result<Pool> {
    let spec = spec(conn)?;
    let p = assemble_recorded(conn, &spec, run_dir)?;
    p.check_usable()?;
    Ok(p)
}

/// Assemble a pool that was created before: a block pool only once its
/// devices are identified as the recorded ones ([`pool::check_block_identity`]).
/// A pool device already in the kernel is adopted as it is (its table is
/// compared by `Pool::assemble`).
pub fn assemble_recorded(conn: &rusqlite::Connection, spec: &PoolSpec, run_dir: &Path) -> Result<Pool> {
    if spec.kind == PoolKind::Block && Pool::find(spec, run_dir)?.is_none() {
        let ids = spool::device_ids(conn)?;
        pool::check_block_identity(spec, ids.as_ref().map(|(d, m)| (d.as_str(), m.as_str())))?;
    }
    Pool::assemble(spec, run_dir)
}
