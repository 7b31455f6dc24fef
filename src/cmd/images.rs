//! `pull`, `activate`, `deactivate`, `rm`, `images`, `activations`, `gc`:
//! run the pipeline, print the read models of `pipeline::views`.

use serde_json::json;

use crate::cli::Invocation;
use crate::error::{Error, Kind, Result};
use crate::ops::output;
use crate::pipeline::views::{self, ActivationView, ImageView};
use crate::pipeline::{activate, batch, gc, sources, Env};
use crate::store::{images as q, Db};

fn quiet(inv: &Invocation) -> bool {
    inv.flag("quiet")
}

pub fn pull(inv: &Invocation) -> Result<u8> {
    let settings = crate::cli::settings::pipeline(inv)?;
    // Every ref is checked before anything is locked or fetched; a ref
    // naming an image already given is pulled once.
    let mut items: Vec<batch::Item> = Vec::new();
    for r in &inv.args {
        let image = sources::image_name(&settings.prefix, r)?;
        if !items.iter().any(|i| i.image == image) {
            items.push(batch::Item { reference: r.clone(), image });
        }
    }
    let mut env = Env::open(&settings)?;
    let jobs = settings.opts.unpack_jobs;
    let several = items.len() > 1;
    let outcomes = batch::pull_images(&mut env, &items, None, jobs, several)?;
    let failed: Vec<(&batch::Item, Error)> =
        items.iter().zip(outcomes).filter_map(|(i, e)| e.map(|e| (i, e))).collect();
    if let Some((first, e)) = failed.first() {
        if !several {
            return Err(Error::new(e.kind(), e.full_message()));
        }
        // Each failure was reported as it happened; the exit code is the first's.
        let names: Vec<&str> = failed.iter().map(|(i, _)| i.image.as_str()).collect();
        return Err(Error::new(
            e.kind(),
            format!(
                "{} of {} images failed ({}); the exit code is {}'s",
                failed.len(),
                items.len(),
                names.join(", "),
                first.image
            ),
        ));
    }
    let mut done = Vec::new();
    for i in &items {
        done.push(views::image(&env.db.conn, &i.image)?);
    }
    if inv.json() {
        output::json(&json!({ "images": done }))?;
    } else if !quiet(inv) {
        for d in &done {
            println!("{} ready ({} layers, top chain {})", d.name, d.layers.len(), short_chain(d));
        }
    }
    Ok(0)
}

/// The first 12 hex digits of the image's top chain, or `-`.
fn short_chain(i: &ImageView) -> &str {
    i.top_chain.as_ref().map(|c| &c.as_str()[..12]).unwrap_or("-")
}

pub fn activate(inv: &Invocation) -> Result<u8> {
    let name = inv
        .get("name")
        .ok_or_else(|| Error::usage("activate needs --name NAME (the activation's stable name)"))?
        .to_string();
    activate::check_name(&name)?;
    let reference = &inv.args[0];
    let image = sources::image_name(&crate::cli::settings::prefix(inv), reference)?;
    // The idempotent answer, from a read-only look: when the activation is
    // active with its node in place and no interrupted run waits to be
    // resumed, there is nothing to lock, resume or do. First the answer an
    // earlier re-run kept, valid while the database is unchanged (no
    // database open at all); then the database, read only.
    let (state_dir, run_dir) = (inv.state_dir(), inv.run_dir());
    if let Some(info) = views::remembered_activation(&state_dir, &run_dir, &name, &image) {
        log::debug!(
            "activation {name}: up, and the database unchanged since it was read: answered from the kept answer"
        );
        return print_activation(inv, &info);
    }
    let before = crate::store::stamp(&state_dir);
    if let Some(db) = Db::open_existing(&state_dir)? {
        if crate::journal::unfinished(&db.conn)?.is_empty() {
            let ready =
                views::activation(&state_dir, &run_dir, &db.conn, &name)?.filter(|i| i.image == image && i.is_up());
            if let Some(info) = ready {
                drop(db);
                log::debug!("activation {name}: up: answered from the database");
                views::remember_activation(&state_dir, &run_dir, &info, before);
                return print_activation(inv, &info);
            }
        }
    }
    let mut env = Env::open(&crate::cli::settings::pipeline(inv)?)?;
    if let Some(a) = q::activation(&env.db.conn, &name)? {
        if a.image != image {
            return Err(Error::new(
                Kind::CantCreate,
                format!("activation {name} already exists for image {}; deactivate --delete it first", a.image),
            ));
        }
    }
    let view = |env: &Env| views::activation(&env.ctx.state_dir, &env.ctx.run_dir, &env.db.conn, &name);
    let ready = view(&env)?.filter(|i| i.is_up() && std::path::Path::new(&i.path).exists());
    let info = match ready {
        Some(i) => i,
        None => {
            env.run(&activate::spec(&name, &image, reference))?;
            view(&env)?.ok_or_else(|| Error::software(format!("activation {name} missing after a successful run")))?
        }
    };
    print_activation(inv, &info)
}

fn print_activation(inv: &Invocation, info: &ActivationView) -> Result<u8> {
    if inv.json() {
        output::json(info)?;
    } else {
        log::info!(
            "activation {} of {}: {} ({})",
            info.name,
            info.image,
            info.path,
            info.dev_path.as_deref().unwrap_or("?")
        );
        println!("{}", info.path);
    }
    Ok(0)
}

pub fn deactivate(inv: &Invocation) -> Result<u8> {
    let name = &inv.args[0];
    let delete = inv.flag("delete");
    if inv.flag("dry-run") {
        // A look at the database only: no lock, no resume, no kernel.
        let a = Db::open_read(&inv.state_dir())?
            .map(|db| q::activation(&db.conn, name))
            .transpose()?
            .flatten()
            .ok_or_else(|| Error::new(Kind::NoSuchImage, format!("no activation named {name}")))?;
        let what = if delete {
            format!("would deactivate {name} and delete its thin device {} (its data is lost)", a.thin_id)
        } else {
            format!("would deactivate {name} (its thin device {} is kept)", a.thin_id)
        };
        if inv.json() {
            output::json(&json!({ "name": name, "deleted": delete, "thin_id": a.thin_id, "dry_run": true }))?;
        } else if !quiet(inv) {
            println!("{what}");
        }
        return Ok(0);
    }
    let mut env = Env::open(&crate::cli::settings::pipeline(inv)?)?;
    if q::activation(&env.db.conn, name)?.is_none() {
        return Err(Error::new(Kind::NoSuchImage, format!("no activation named {name}")));
    }
    // Its kept answer no longer holds (the database changes too; this is
    // hygiene, not correctness).
    views::forget_activation(&inv.run_dir(), name);
    env.run(&activate::deactivate_spec(name, delete))?;
    if inv.json() {
        output::json(&json!({ "name": name, "deleted": delete }))?;
    } else if !quiet(inv) {
        println!("{name} {}", if delete { "deleted" } else { "deactivated" });
    }
    Ok(0)
}

pub fn rm(inv: &Invocation) -> Result<u8> {
    let image = sources::image_name(&crate::cli::settings::prefix(inv), &inv.args[0])?;
    if inv.flag("dry-run") {
        let db = Db::open_read(&inv.state_dir())?;
        let db = db
            .filter(|db| q::image(&db.conn, &image).ok().flatten().is_some())
            .ok_or_else(|| Error::new(Kind::NoSuchImage, format!("no image {image}")))?;
        let acts: Vec<String> = q::activations_of(&db.conn, &image)?.into_iter().map(|a| a.name).collect();
        if !acts.is_empty() && !inv.flag("force") {
            return Err(Error::new(
                Kind::TempFail,
                format!("image {image} has activations ({}); deactivate them or pass --force", acts.join(", ")),
            ));
        }
        if inv.json() {
            output::json(&json!({ "removed": image, "activations_deleted": acts, "dry_run": true }))?;
        } else if !quiet(inv) {
            println!("would remove {image}");
            for a in &acts {
                println!("would deactivate and delete activation {a}");
            }
        }
        return Ok(0);
    }
    let mut env = Env::open(&crate::cli::settings::pipeline(inv)?)?;
    if q::image(&env.db.conn, &image)?.is_none() {
        return Err(Error::new(Kind::NoSuchImage, format!("no image {image}")));
    }
    env.run(&crate::pipeline::rm_spec(&image, inv.flag("force")))?;
    if inv.json() {
        output::json(&json!({ "removed": image }))?;
    } else if !quiet(inv) {
        println!("{image} removed; 'thinimg gc' frees chains no other image uses");
    }
    Ok(0)
}

pub fn images(inv: &Invocation) -> Result<u8> {
    let Some(db) = Db::open_existing(&inv.state_dir())? else {
        return empty(inv, "images");
    };
    let all = views::images(&db.conn)?;
    if inv.json() {
        output::json(&json!({ "images": all }))?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                match i.rejected_layers.first() {
                    Some(r) => format!(
                        "{} (layer {} rejected: {})",
                        i.state,
                        r.position,
                        crate::fetch::s3::printable(&r.reason, 120)
                    ),
                    None => i.state.to_string(),
                },
                i.top_layer.to_string(),
                short_chain(i).to_string(),
                i.activations.len().to_string(),
            ]
        })
        .collect();
    output::table(&["IMAGE", "STATE", "LAYERS", "TOP CHAIN", "ACTIVATIONS"], &rows)?;
    Ok(0)
}

fn empty(inv: &Invocation, what: &str) -> Result<u8> {
    if inv.json() {
        output::json(&json!({ what: [] }))?;
    }
    Ok(0)
}

pub fn activations(inv: &Invocation) -> Result<u8> {
    let Some(db) = Db::open_existing(&inv.state_dir())? else {
        return empty(inv, "activations");
    };
    let all = views::activations(&inv.state_dir(), &inv.run_dir(), &db.conn)?;
    if inv.json() {
        output::json(&json!({ "activations": all }))?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.image.clone(),
                a.state.to_string(),
                a.thin_id.to_string(),
                a.path.clone(),
                a.dev_path.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(&["NAME", "IMAGE", "STATE", "THIN", "PATH", "DEV"], &rows)?;
    Ok(0)
}

pub fn gc(inv: &Invocation) -> Result<u8> {
    let dry = inv.flag("dry-run");
    // A dry run changes nothing: not even interrupted runs are resumed.
    let settings = crate::cli::settings::pipeline(inv)?;
    let mut env = if dry { Env::open_without_resume(&settings)? } else { Env::open(&settings)? };
    let Env { db, ctx, .. } = &mut env;
    let rep = gc::run(ctx, &mut db.conn, dry)?;
    if inv.json() {
        output::json(&rep)?;
    } else if !quiet(inv) {
        let verb = if dry { "would remove" } else { "removed" };
        println!(
            "gc: {verb} {} stray mount(s), {} unknown device(s), {} unused chain(s), {} orphan thin id(s), {} unused blob(s) ({}), {} stray file(s); re-activated {}",
            rep.stray_mounts.len(),
            rep.unknown_devices.len(),
            rep.unused_chains.len(),
            rep.dead_thin_ids.len(),
            rep.unused_blobs.len(),
            output::bytes(rep.freed_blob_bytes),
            rep.stray_files.len(),
            rep.reactivated.len()
        );
        for e in &rep.errors {
            log::error!("gc: {e}");
        }
    }
    if rep.errors.is_empty() {
        Ok(0)
    } else {
        Err(Error::new(Kind::TempFail, format!("gc: {} item(s) could not be removed; see above", rep.errors.len())))
    }
}
