//! `thinimg pool create`, `pool assemble`, `pool status` and `pool destroy`:
//! parse flags, call `pool::manager` (or the pipeline's pool step), print
//! (`pool status` and `create` print `pipeline::views::PoolReport`).
//! (Named after its command, like every file in `cmd/`; the pool itself is
//! `src/pool/`.)

use crate::cli::Invocation;
use crate::error::{Error, Result};
use crate::ops::output;
use crate::pipeline::views;
use crate::pool::manager;
use crate::pool::{Pool, PoolStatus};
use crate::store::Db;

pub fn create(inv: &Invocation) -> Result<u8> {
    let req = crate::cli::settings::pool_request(inv)?;
    // The state lock, and interrupted runs resumed first.
    let env = crate::pipeline::Env::open(&crate::cli::settings::pipeline(inv)?)?;
    let (pool, existed) = manager::create(&env.db.conn, &env.ctx.state_dir, &env.ctx.run_dir, &req)?;
    let status = pool.status()?;
    print(inv, &pool, Some(&status), &env.db, if existed { "exists" } else { "created" })?;
    Ok(0)
}

pub fn destroy(inv: &Invocation) -> Result<u8> {
    let dry = inv.flag("dry-run");
    let settings = crate::cli::settings::pipeline(inv)?;
    let env = if dry {
        crate::pipeline::Env::open_without_resume(&settings)?
    } else {
        crate::pipeline::Env::open(&settings)?
    };
    let d = manager::destroy(&env.db.conn, &env.ctx.run_dir, inv.flag("force"), dry)?;
    if inv.json() {
        output::json(&d)?;
    } else if !inv.flag("quiet") {
        let verb = if dry { "would destroy" } else { "destroyed" };
        println!(
            "{verb} {} thin-pool {} ({:?}) with {} chain(s) and {} activation(s){}",
            d.kind.as_str(),
            d.dm_name,
            d.state,
            d.chains,
            d.activations,
            if d.removed_files.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} {}",
                    if dry { "would remove" } else { "removed" },
                    d.removed_files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            }
        );
    }
    Ok(0)
}

/// At boot (thinimg-pool.service): the recorded pool and every active
/// activation back in the kernel. Never creates a pool.
pub fn assemble(inv: &Invocation) -> Result<u8> {
    let recorded = match Db::open_existing(&inv.state_dir())? {
        Some(db) => crate::store::thin_pool::load(&db.conn)?.is_some(),
        None => false,
    };
    if !recorded {
        println!("no thin-pool is recorded in {}; nothing to assemble", inv.state_dir().display());
        return Ok(0);
    }
    // The state lock, and interrupted runs resumed first.
    let mut env = crate::pipeline::Env::open(&crate::cli::settings::pipeline(inv)?)?;
    let (pool, present, missing) = {
        let env = &mut env;
        // Assembled, and its activations re-activated, by the pipeline's pool step.
        let dev = env.ctx.prepare_pool(&env.db.conn)?;
        let present = dev.list_ours()?;
        let missing: Vec<String> = crate::store::images::activations(&env.db.conn)?
            .into_iter()
            .filter(|a| {
                a.state == crate::store::images::ActivationState::Active
                    && !present.contains(&dev.activation_name(&a.name))
            })
            .map(|a| a.name)
            .collect();
        (dev.pool_name(), present.len(), missing)
    };
    if !missing.is_empty() {
        return Err(Error::new(
            crate::error::Kind::TempFail,
            format!("pool {pool} assembled, but activation(s) {} could not be brought back (see the log above; `thinimg gc` retries)", missing.join(", ")),
        ));
    }
    if inv.json() {
        output::json(&serde_json::json!({ "dm_name": pool, "assembled": true, "devices": present }))?;
    } else {
        println!("pool {pool} assembled; {present} dm device(s) of this state dir in the kernel");
    }
    Ok(0)
}

pub fn status(inv: &Invocation) -> Result<u8> {
    let Some(db) = Db::open_existing(&inv.state_dir())? else { return Err(manager::no_pool()) };
    let spec = manager::spec(&db.conn)?;
    let Some(pool) = Pool::find(&spec, &inv.run_dir())? else {
        if inv.json() {
            output::json(&serde_json::json!({ "dm_name": spec.dm_name, "kind": spec.kind, "assembled": false }))?;
        } else {
            println!(
                "pool {} ({}) is not assembled (after a reboot, the next command that needs it assembles it)",
                spec.dm_name,
                spec.kind.as_str()
            );
        }
        return Ok(0);
    };
    let st = pool.status()?;
    print(inv, &pool, Some(&st), &db, "assembled")?;
    // Unhealthy pools exit non-zero (71 or 75) after printing, for cron checks.
    st.usable(pool.name())?;
    Ok(0)
}

fn print(inv: &Invocation, pool: &Pool, st: Option<&PoolStatus>, db: &Db, what: &'static str) -> Result<()> {
    let r = views::pool_report(&db.conn, pool, st, what)?;
    if inv.json() {
        return output::json(&r);
    }
    println!("pool      {} ({}, {}, {what})", r.dm_name, r.dev, r.kind.as_str());
    match (&r.status, r.mode) {
        (Some(PoolStatus::Active(u)), Some(mode)) => {
            println!(
                "data      {} of {} used ({}%)",
                output::bytes(r.data_used_bytes.unwrap_or(0)),
                output::bytes(r.data_total_bytes.unwrap_or(0)),
                r.data_used_pct.unwrap_or(0.0)
            );
            println!("metadata  {}/{} blocks used ({}%)", u.meta_used, u.meta_total, r.meta_used_pct.unwrap_or(0.0));
            println!("mode      {mode}{}", if u.needs_check { ", needs_check" } else { "" });
            println!("txn       {}", u.transaction_id);
        }
        (Some(PoolStatus::Fail), _) => println!("mode      FAIL"),
        (Some(PoolStatus::Error), _) => println!("mode      ERROR (status unreadable)"),
        _ => {}
    }
    println!("devices   {} thin devices recorded", r.thin_devices);
    Ok(())
}
