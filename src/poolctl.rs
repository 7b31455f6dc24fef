//! The pool's lifecycle as recorded in the database: create it with intent
//! first (so a crash mid-way is finished by a rerun), and open it after a
//! reboot from its persisted spec.
//!
//! It is the only place that joins `store::pool` (the row) with `pool` (the
//! kernel). It never allocates or deletes thin devices; the pipeline does.

use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};
use crate::ops::fault;
use crate::pool::{self, Pool, PoolKind, PoolSpec};
use crate::store::pool::{self as spool, PoolState};

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
pub fn create(
    conn: &rusqlite::Connection,
    state_dir: &Path,
    run_dir: &Path,
    req: &CreateRequest,
) -> Result<(Pool, bool)> {
    let spec = match spool::load(conn)? {
        Some((spec, PoolState::Ready)) => {
            let asked = if req.devices.is_some() { PoolKind::Block } else { PoolKind::Loop };
            if asked != spec.kind {
                log::warn!(
                    "a {} thin-pool {} is already recorded in this state dir; the {} pool asked for is not created",
                    spec.kind.as_str(),
                    spec.dm_name,
                    asked.as_str()
                );
            }
            log::info!("thin-pool {} already exists; assembling it", spec.dm_name);
            return Ok((Pool::assemble(&spec, run_dir)?, true));
        }
        Some((spec, PoolState::Creating)) => {
            log::info!("finishing the interrupted creation of thin-pool {}", spec.dm_name);
            spec
        }
        None => {
            let name = pool::default_dm_name(state_dir)?;
            let spec = match &req.devices {
                Some((data, meta)) => pool::block_spec(name, data, meta, req.block_sectors)?,
                None => pool::loop_spec(&loop_dir(state_dir), name, req.data_size, req.block_sectors)?,
            };
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
    spool::set_state(conn, PoolState::Ready)?;
    Ok((p, false))
}

/// The recorded spec, or a clear error when there is none or it is unfinished.
pub fn spec(conn: &rusqlite::Connection) -> Result<PoolSpec> {
    match spool::load(conn)? {
        Some((spec, PoolState::Ready)) => Ok(spec),
        Some((spec, PoolState::Creating)) => Err(Error::new(
            Kind::TempFail,
            format!("thin-pool {} was not finished being created; run `thinimg pool create` again", spec.dm_name),
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
    let p = Pool::assemble(&spec, run_dir)?;
    p.check_usable()?;
    Ok(p)
}
