//! `thinimg sync`: the wanted refs (arguments, `--from`, `--all`) pulled
//! in parallel and, with `--prune`, images no longer wanted removed.

use crate::cli::Invocation;
use crate::error::{Error, Result};
use crate::ops::output;
use crate::pipeline::{sync, Env};

pub fn run(inv: &Invocation) -> Result<u8> {
    let set = crate::cli::settings::sync(inv)?;
    let mut refs: Vec<sync::Wanted> = inv.args.iter().map(|a| sync::Wanted::arg(a)).collect();
    if let Some(f) = &set.from {
        refs.extend(sync::read_refs(f)?);
    }
    if refs.is_empty() && !set.all {
        return Err(Error::usage("sync needs --all, --from FILE or at least one REF"));
    }
    // Herd control: sleep before the first request and before the lock.
    if let Some(max) = crate::cli::settings::jitter(inv)? {
        let d = crate::ops::retry::random_delay(max);
        log::info!("sync: waiting {:.1} s (--jitter {} s) before the first request", d.as_secs_f64(), max.as_secs());
        crate::ops::signals::sleep(d)?;
    }
    let mut env = Env::open(&crate::cli::settings::pipeline(inv)?)?;
    if set.all {
        for f in sync::all_families(&env.ctx)? {
            if !refs.iter().any(|w| w.reference == f) {
                refs.push(sync::Wanted::arg(&f));
            }
        }
    }
    let mode = sync::PruneMode { prune: set.prune, dry_run: set.dry_run, force: set.force };
    let rep = sync::sync(&mut env, refs, set.unpack_jobs, mode)?;
    let quiet = inv.flag("quiet");
    if inv.json() {
        output::json(&rep)?;
    } else {
        // Each failure is already on stderr (logged where it happened); with
        // --quiet that is the only place it appears.
        for i in &rep.images {
            match &i.error {
                None if quiet => {}
                None if rep.dry_run => println!("wanted  {}", i.image),
                None => println!("ok      {}", i.image),
                Some(_) if quiet => {}
                Some(e) => println!("FAILED  {} ({}): {}", i.image, e.kind, e.message),
            }
        }
        let verb = if rep.dry_run { "would prune" } else { "pruned" };
        for p in &rep.pruned {
            if !quiet || rep.dry_run {
                println!("{verb} {p}");
            }
        }
        for k in &rep.kept_with_activations {
            if !quiet {
                println!("kept    {k} (has activations)");
            }
        }
        if !quiet {
            println!(
                "sync: {} ok, {} failed{}",
                rep.ok,
                rep.failed,
                if rep.dry_run { " (dry run: nothing pulled)" } else { "" }
            );
        }
    }
    Ok(rep.exit_code())
}
