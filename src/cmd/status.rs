//! `thinimg status`: the pool, counts, space, runs in flight and recent
//! failures, read without the lock; `--watch` redraws it every second.

use serde_json::json;

use crate::cli::Invocation;
use crate::error::Result;
use crate::ops::output;
use crate::pipeline::health;
use crate::store::Db;

fn status_doc(inv: &Invocation) -> Result<serde_json::Value> {
    let Some(db) = Db::open_existing(&inv.state_dir())? else {
        let space = health::space(&inv.state_dir(), None, None);
        return Ok(json!({ "state_dir": inv.state_dir(), "database": false, "space": space }));
    };
    let pool = health::pool_view(&db, &inv.run_dir())?;
    let counts = health::counts(&db)?;
    let space = health::space(&inv.state_dir(), Some(&counts), pool.as_ref());
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
        "space": space,
        "runs_in_flight": in_flight,
        "recent_errors": errors,
    }))
}

/// A JSON value as text: strings bare, and `-` for null (no raw `null` in text output).
fn txt(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn pct_txt(v: &serde_json::Value) -> String {
    if v.is_null() {
        "-".to_string()
    } else {
        format!("{}%", txt(v))
    }
}

fn bytes_txt(v: &serde_json::Value) -> String {
    v.as_u64().map(output::bytes).unwrap_or_else(|| "-".to_string())
}

fn render_space(s: &mut String, sp: &serde_json::Value) {
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "space    blobs {} ({}), partial downloads {} ({})",
        txt(&sp["blobs"]),
        bytes_txt(&sp["blob_bytes"]),
        txt(&sp["partial_downloads"]),
        bytes_txt(&sp["partial_bytes"])
    );
    for f in sp["pool_files"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "         pool file {}: {} ({} allocated)",
            txt(&f["path"]),
            bytes_txt(&f["size_bytes"]),
            bytes_txt(&f["allocated_bytes"])
        );
    }
    if !sp["pool_data_total_bytes"].is_null() {
        let _ = writeln!(
            s,
            "         pool data {} of {}, metadata {}",
            bytes_txt(&sp["pool_data_used_bytes"]),
            bytes_txt(&sp["pool_data_total_bytes"]),
            pct_txt(&sp["pool_meta_used_pct"])
        );
    }
    let _ = writeln!(
        s,
        "         state filesystem {} free of {}",
        bytes_txt(&sp["fs_free_bytes"]),
        bytes_txt(&sp["fs_total_bytes"])
    );
}

fn render_status(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if v["database"] == json!(false) {
        let _ = writeln!(s, "no database under {} yet", txt(&v["state_dir"]));
        render_space(&mut s, &v["space"]);
        return s;
    }
    match v.get("pool") {
        Some(p) if !p.is_null() => {
            let state = if p["assembled"] == json!(true) { txt(&p["mode"]) } else { "not assembled".to_string() };
            let _ = write!(s, "pool     {} ({}): {state}", txt(&p["dm_name"]), txt(&p["kind"]));
            if p["assembled"] == json!(true) {
                let _ = write!(
                    s,
                    ", data {} metadata {} needs_check {}",
                    pct_txt(&p["data_used_pct"]),
                    pct_txt(&p["meta_used_pct"]),
                    txt(&p["needs_check"])
                );
            }
            let _ = writeln!(s, ", thin devices {}", txt(&p["thin_devices"]));
            if !p["error"].is_null() {
                let _ = writeln!(s, "         {}", txt(&p["error"]));
            }
        }
        _ => {
            let _ = writeln!(s, "pool     none yet");
        }
    }
    let c = &v["counts"];
    let _ = writeln!(
        s,
        "blobs    {} ({}), {} rejected\nchains   {}\nimages   {} ({} ready)\nactive   {} of {} activations",
        txt(&c["blobs"]),
        bytes_txt(&c["blob_bytes"]),
        txt(&c["rejected_blobs"]),
        txt(&c["chains"]),
        txt(&c["images"]),
        txt(&c["images_ready"]),
        txt(&c["activations_active"]),
        txt(&c["activations"])
    );
    render_space(&mut s, &v["space"]);
    for r in v["runs_in_flight"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "run {}   {} {} at {} ({}){}",
            txt(&r["id"]),
            txt(&r["kind"]),
            txt(&r["subject"]),
            txt(&r["step"]),
            txt(&r["progress"]),
            if r["running"] == json!(true) { "" } else { " interrupted; resumes on the next write" }
        );
    }
    for e in v["recent_errors"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "failed   run {} {} {}: {}",
            txt(&e["id"]),
            txt(&e["kind"]),
            txt(&e["subject"]),
            txt(&e["error"])
        );
    }
    s
}

pub fn run(inv: &Invocation) -> Result<u8> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_never_prints_a_raw_null() {
        // A half-made pool: recorded, not assembled, every kernel figure unknown.
        let v = json!({
            "state_dir": "/x", "database": true,
            "pool": { "dm_name": "p", "kind": "loop", "assembled": false, "mode": null, "needs_check": null,
                      "data_used_pct": null, "meta_used_pct": null, "thin_devices": 0, "error": null },
            "counts": { "blobs": 0, "blob_bytes": 0, "rejected_blobs": 0, "chains": 0, "images": 0,
                        "images_ready": 0, "activations_active": 0, "activations": 0 },
            "space": { "blobs": 0, "blob_bytes": 0, "partial_downloads": 1, "partial_bytes": 5,
                       "pool_files": [], "pool_data_used_bytes": null, "pool_data_total_bytes": null,
                       "pool_meta_used_pct": null, "fs_free_bytes": null, "fs_total_bytes": null },
            "runs_in_flight": [{ "id": 1, "kind": "pull", "subject": "x", "step": null, "progress": "0/1", "running": false }],
            "recent_errors": [{ "id": 2, "kind": "pull", "subject": "y", "error": null }],
        });
        let t = render_status(&v);
        assert!(!t.contains("null"), "{t}");
        assert!(t.contains("not assembled") && t.contains("partial downloads 1"), "{t}");
        // Present pool with figures.
        let mut v2 = v.clone();
        v2["pool"]["assembled"] = json!(true);
        v2["pool"]["mode"] = json!("out_of_data_space");
        let t = render_status(&v2);
        assert!(!t.contains("null") && t.contains("out_of_data_space"), "{t}");
    }
}
