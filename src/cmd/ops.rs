//! `sync`, `status`, `doctor`.

use serde_json::json;

use crate::cli::Invocation;
use crate::error::{Error, Kind, Result};
use crate::ops::output;
use crate::pipeline::{health, sync, Env};
use crate::store::Db;

pub fn sync(inv: &Invocation) -> Result<u8> {
    let mut refs: Vec<String> = inv.args.clone();
    if let Some(f) = inv.get("from") {
        refs.extend(sync::read_refs(f)?);
    }
    let all = inv.flag("all");
    if refs.is_empty() && !all {
        return Err(Error::usage("sync needs --all, --from FILE or at least one REF"));
    }
    let unpack_jobs = inv.u64_or("unpack-jobs", 2)?.clamp(1, 64) as usize;
    // Herd control: sleep before the first request and before the lock.
    if let Some(max) = crate::cli::settings::jitter(inv)? {
        let d = crate::fetch::s3::random_delay(max);
        log::info!("sync: waiting {:.1} s (--jitter {} s) before the first request", d.as_secs_f64(), max.as_secs());
        crate::ops::signals::sleep(d)?;
    }
    let mut env = Env::open(inv)?;
    if all {
        for f in sync::all_families(&env.ctx)? {
            if !refs.contains(&f) {
                refs.push(f);
            }
        }
    }
    let rep = sync::sync(&mut env, refs, unpack_jobs, inv.flag("prune"))?;
    if inv.json() {
        output::json(&rep)?;
    } else {
        for i in &rep.images {
            match &i.error {
                None => {
                    if !inv.flag("quiet") {
                        println!("ok      {}", i.image);
                    }
                }
                Some(e) => println!("FAILED  {} ({}): {}", i.image, e.kind, e.message),
            }
        }
        for p in &rep.pruned {
            if !inv.flag("quiet") {
                println!("pruned  {p}");
            }
        }
        for k in &rep.kept_with_activations {
            println!("kept    {k} (has activations)");
        }
        if !inv.flag("quiet") || rep.failed > 0 {
            println!("sync: {} ok, {} failed", rep.ok, rep.failed);
        }
    }
    Ok(rep.exit_code())
}

fn status_doc(inv: &Invocation) -> Result<serde_json::Value> {
    let Some(db) = Db::open_existing(&inv.state_dir())? else {
        return Ok(json!({ "state_dir": inv.state_dir(), "database": false }));
    };
    let pool = health::pool_view(&db, &inv.run_dir())?;
    let counts = health::counts(&db)?;
    let runs = crate::journal::list(&db.conn, false)?;
    let in_flight: Vec<serde_json::Value> = runs
        .iter()
        .filter(|r| matches!(r.state, crate::journal::RunState::Active | crate::journal::RunState::Cancelling))
        .map(|r| {
            let done = r.steps.iter().filter(|s| s.state == "done").count();
            let cur = r.steps.iter().find(|s| s.state != "done");
            let pid_alive = r.pid.map(|p| std::path::Path::new(&format!("/proc/{p}")).exists()).unwrap_or(false);
            json!({
                "id": r.id, "kind": r.kind, "subject": r.subject, "state": r.state,
                "step": cur.map(|s| s.name.clone()), "progress": format!("{done}/{}", r.steps.len()),
                "pid": r.pid, "running": pid_alive,
            })
        })
        .collect();
    let errors: Vec<serde_json::Value> = runs
        .iter()
        .filter(|r| r.state == crate::journal::RunState::Failed)
        .take(5)
        .map(|r| json!({ "id": r.id, "kind": r.kind, "subject": r.subject, "error_kind": r.error_kind, "error": r.error }))
        .collect();
    Ok(json!({
        "state_dir": inv.state_dir(),
        "database": true,
        "pool": pool,
        "counts": counts,
        "runs_in_flight": in_flight,
        "recent_errors": errors,
    }))
}

fn render_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if v["database"] == json!(false) {
        let _ = writeln!(s, "no database under {} yet", v["state_dir"].as_str().unwrap_or("?"));
        return s;
    }
    match v.get("pool") {
        Some(p) if !p.is_null() => {
            let _ = writeln!(
                s,
                "pool     {} ({}): {} data {}% metadata {}% needs_check {} thin devices {}",
                p["name"].as_str().unwrap_or("?"),
                p["kind"].as_str().unwrap_or("?"),
                if p["present"] == json!(true) { p["mode"].as_str().unwrap_or("?") } else { "not assembled" },
                p["data_used_pct"],
                p["meta_used_pct"],
                p["needs_check"],
                p["thin_devices"]
            );
        }
        _ => {
            let _ = writeln!(s, "pool     none yet");
        }
    }
    let c = &v["counts"];
    let _ = writeln!(
        s,
        "blobs    {} ({}), {} rejected\nchains   {}\nimages   {} ({} ready)\nactive   {} of {} activations",
        c["blobs"],
        output::bytes(c["blob_bytes"].as_u64().unwrap_or(0)),
        c["rejected_blobs"],
        c["chains"],
        c["images"],
        c["images_ready"],
        c["activations_active"],
        c["activations"]
    );
    for r in v["runs_in_flight"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "run {}   {} {} at {} ({}){}",
            r["id"],
            r["kind"].as_str().unwrap_or(""),
            r["subject"].as_str().unwrap_or(""),
            r["step"].as_str().unwrap_or("-"),
            r["progress"].as_str().unwrap_or(""),
            if r["running"] == json!(true) { "" } else { " interrupted; resumes on the next write" }
        );
    }
    for e in v["recent_errors"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "failed   run {} {} {}: {}",
            e["id"],
            e["kind"].as_str().unwrap_or(""),
            e["subject"].as_str().unwrap_or(""),
            e["error"].as_str().unwrap_or("")
        );
    }
    s
}

pub fn status(inv: &Invocation) -> Result<u8> {
    use std::io::{IsTerminal, Write};
    let watch = inv.flag("watch") && std::io::stdout().is_terminal();
    if !watch {
        let v = status_doc(inv)?;
        if inv.json() {
            output::json(&v)?;
        } else {
            print!("{}", render_status(&v));
        }
        return Ok(0);
    }
    crate::ops::signals::install();
    loop {
        let v = status_doc(inv)?;
        let text = if inv.json() { format!("{v}\n") } else { render_status(&v) };
        let mut out = std::io::stdout().lock();
        // Home, clear below: redraw in place without a TUI library.
        let _ = write!(out, "\x1b[H\x1b[J{text}");
        let _ = out.flush();
        drop(out);
        if crate::ops::signals::sleep(std::time::Duration::from_secs(1)).is_err() {
            return Ok(0);
        }
    }
}

/// Free space on the state filesystem against --min-free (owned by fetch).
fn space_check(inv: &Invocation) -> health::Check {
    let store = crate::fetch::blobstore::BlobStore::at(&inv.state_dir());
    let (status, detail, advice) = match (store.space(), crate::cli::settings::min_free(inv)) {
        (Ok(s), Ok(min)) => {
            let detail = format!(
                "{} free, reserve --min-free {}; {} partial download(s) ({})",
                output::bytes(s.free),
                output::bytes(min),
                s.partial_files,
                output::bytes(s.partial_bytes)
            );
            if s.free < min {
                (
                    health::Level::Warn,
                    detail,
                    Some("free space: 'thinimg gc' removes unused blobs and partial downloads".to_string()),
                )
            } else {
                (health::Level::Ok, detail, None)
            }
        }
        (Err(e), _) | (_, Err(e)) => (health::Level::Warn, e.full_message(), None),
    };
    health::Check { name: "state filesystem", status, detail, advice }
}

pub fn doctor(inv: &Invocation) -> Result<u8> {
    let mut checks = health::doctor(&inv.state_dir(), &inv.run_dir());
    checks.push(space_check(inv));
    let worst = checks.iter().map(|c| c.status).max().unwrap_or(health::Level::Ok);
    if inv.json() {
        output::json(&json!({ "worst": worst, "checks": checks }))?;
    } else {
        for c in &checks {
            let tag = match c.status {
                health::Level::Ok => "ok  ",
                health::Level::Warn => "WARN",
                health::Level::Fail => "FAIL",
            };
            if c.status == health::Level::Ok && inv.flag("quiet") {
                continue;
            }
            println!("{tag} {:<22} {}", c.name, c.detail);
            if let Some(a) = &c.advice {
                if c.status != health::Level::Ok {
                    println!("     {:<22} advice: {a}", "");
                }
            }
        }
    }
    Ok(match worst {
        health::Level::Ok => 0,
        health::Level::Warn => 1,
        health::Level::Fail => Kind::HostFatal.exit_code(),
    })
}
