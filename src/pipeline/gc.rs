//! Reconciliation and garbage collection.
//!
//! Compares the database with the kernel in both directions and removes
//! only what is provably ours and unused: dm devices with our name prefix
//! that no row accounts for, chains no image or activation uses (children
//! first), blobs no image layer references, partial downloads no download
//! row owns, stray mounts under our run directory. Everything found is
//! reported; `--dry-run` changes nothing. Runs under the state lock after
//! interrupted runs were resumed, so no step is mid-flight.

use serde::Serialize;
use serde_json::json;

use super::{mount, Ctx};
use crate::dm::ThinId;
use crate::error::Result;
use crate::fetch::blobstore::BlobDigest;
use crate::ops::fault;
use crate::store::ids::ChainId;
use crate::store::images as q;

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub stray_mounts: Vec<String>,
    pub unknown_devices: Vec<String>,
    pub missing_devices: Vec<String>,
    pub reactivated: Vec<String>,
    pub unused_chains: Vec<ChainId>,
    pub dead_thin_ids: Vec<ThinId>,
    pub unused_blobs: Vec<BlobDigest>,
    pub stray_files: Vec<String>,
    pub freed_blob_bytes: u64,
    pub errors: Vec<String>,
}

/// The kernel side of `gc --dry-run`: look, never change. The pool is
/// only looked up (never created, assembled or its transaction id bumped),
/// and without device-mapper, or with the pool not assembled, there is
/// nothing in the kernel to compare.
fn dry_run_kernel(ctx: &Ctx, conn: &rusqlite::Connection, rep: &mut GcReport) -> Result<()> {
    use crate::store::thin_pool::{self as spool, PoolState};
    let Some((spec, state)) = spool::load(conn)? else { return Ok(()) };
    if state != PoolState::Ready {
        return Ok(());
    }
    let pool = match crate::pool::Pool::find(&spec, &ctx.run_dir) {
        Ok(Some(p)) => p,
        Ok(None) => {
            log::info!("gc --dry-run: thin-pool {} is not assembled; nothing in the kernel to compare", spec.dm_name);
            return Ok(());
        }
        Err(e) if e.kind() == crate::error::Kind::HostFatal => {
            log::info!("gc --dry-run: {}; nothing in the kernel to compare", e.message());
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let names = crate::pool::Names::of_pool(pool.name());
    let present: Vec<String> = pool.list_ours(&names)?.into_iter().map(|(n, _)| n.as_str().to_string()).collect();
    let acts = q::activations(conn)?;
    let wanted: Vec<String> =
        acts.iter().filter(|a| a.state == q::ActivationState::Active).map(|a| names.activation(&a.name)).collect();
    rep.unknown_devices = present.iter().filter(|n| !wanted.contains(n)).cloned().collect();
    rep.missing_devices = acts
        .iter()
        .filter(|a| a.state == q::ActivationState::Active && !present.contains(&names.activation(&a.name)))
        .map(|a| a.name.clone())
        .collect();
    Ok(())
}

pub fn run(ctx: &mut Ctx, conn: &mut rusqlite::Connection, dry_run: bool) -> Result<GcReport> {
    let mut rep = GcReport { dry_run, ..Default::default() };

    // 1. Stray mounts under our run directory (no step is running now).
    for m in mount::mounts_under(&mount::mount_root(&ctx.run_dir))? {
        rep.stray_mounts.push(m.display().to_string());
        if !dry_run {
            if let Err(e) = mount::unmount(&m) {
                rep.errors.push(e.full_message());
            }
        }
    }

    let has_pool = crate::store::thin_pool::load(conn)?.is_some();
    if has_pool && dry_run {
        dry_run_kernel(ctx, conn, &mut rep)?;
    } else if has_pool {
        // Assembled after a reboot (and its activations re-activated), or
        // an interrupted creation finished, as before any run.
        let dev = ctx.prepare_pool(conn)?;
        // 2. Kernel -> database: our-prefixed dm devices nothing accounts for.
        let acts = q::activations(conn)?;
        let wanted: Vec<String> = acts
            .iter()
            .filter(|a| a.state == q::ActivationState::Active)
            .map(|a| dev.activation_name(&a.name))
            .collect();
        for name in dev.list_ours()? {
            if name == dev.pool_name() || wanted.contains(&name) {
                continue;
            }
            // Build devices and deactivated activations: nothing should be open.
            rep.unknown_devices.push(name.clone());
            if let Err(e) = dev.deactivate(&name) {
                rep.errors.push(e.full_message());
            }
        }
        // 3. Database -> kernel: active activations whose device is gone.
        for r in dev.reactivate(conn)? {
            rep.missing_devices.push(r.name.clone());
            match r.result {
                Ok(_) => rep.reactivated.push(r.name),
                Err(e) => rep.errors.push(e.full_message()),
            }
        }
        // 4. Unused chains, deepest first so a parent is only freed after its children.
        loop {
            let mut progressed = false;
            for c in q::unused_chains(conn)? {
                if q::has_children(conn, &c.chain_id)? || rep.unused_chains.contains(&c.chain_id) {
                    continue;
                }
                rep.unused_chains.push(c.chain_id.clone());
                // The chain stops being ready (its row goes) in the same
                // transaction that marks its thin device for deletion: a
                // crash after the kernel's delete can never leave a ready
                // chain without a device for a pull to share.
                let tx = conn.transaction()?;
                if let Some(t) = c.thin_id {
                    crate::store::thin_pool::set_thin_state(&tx, t, crate::store::thin_pool::ThinState::Deleting)?;
                }
                q::delete_chain(&tx, &c.chain_id)?;
                tx.commit()?;
                progressed = true;
                if let Some(t) = c.thin_id {
                    fault::point("gc:chain-forgotten");
                    if let Err(e) = dev.deactivate(&dev.build_name(t)).and_then(|_| dev.delete_thin(t)) {
                        // The thin row stays in `deleting`: step 5 retries it.
                        rep.errors.push(e.full_message());
                        continue;
                    }
                    fault::point("gc:thin-deleted");
                    crate::store::thin_pool::delete_thin_row(conn, t)?;
                }
            }
            if !progressed {
                break;
            }
        }
        // 5. Thin rows no chain or activation owns (e.g. a failed deletion).
        for t in crate::store::thin_pool::unowned_thin_ids(conn)? {
            rep.dead_thin_ids.push(t);
            match dev.delete_thin(t) {
                Ok(()) => crate::store::thin_pool::delete_thin_row(conn, t)?,
                Err(e) => rep.errors.push(e.full_message()),
            }
        }
    }

    if dry_run {
        // Steps 4 and 5 from the database alone.
        for c in q::unused_chains(conn)? {
            if !q::has_children(conn, &c.chain_id)? {
                rep.unused_chains.push(c.chain_id.clone());
            }
        }
        rep.dead_thin_ids = crate::store::thin_pool::unowned_thin_ids(conn)?;
    }

    // 6. Blobs no image layer references, and files the store does not know.
    let (blobs, bytes, strays) = super::sources::gc_blobs(ctx, conn, dry_run)?;
    rep.unused_blobs = blobs;
    rep.freed_blob_bytes = bytes;
    rep.stray_files = strays;
    log::debug!("gc: {}", json!(&rep));
    Ok(rep)
}
