//! `thinimg runs` and `thinimg cancel RUN-ID`.

use crate::cli::Invocation;
use crate::error::{Error, Result};
use crate::journal;
use crate::ops::output;
use crate::pipeline::Env;
use crate::store::Db;

pub fn list(inv: &Invocation) -> Result<u8> {
    let runs = match Db::open_existing(&inv.state_dir())? {
        Some(db) => journal::list(&db.conn, inv.flag("all"))?,
        None => Vec::new(),
    };
    if inv.json() {
        output::json(&runs)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let done = r.steps.iter().filter(|s| s.state == "done").count();
            let cur = r.steps.iter().find(|s| s.state != "done").map(|s| s.name.clone()).unwrap_or_default();
            vec![
                r.id.to_string(),
                r.kind.clone(),
                r.subject.clone(),
                r.state.as_str().to_string(),
                format!("{done}/{}", r.steps.len()),
                cur,
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["ID", "KIND", "SUBJECT", "STATE", "STEPS", "CURRENT", "ERROR"], &rows)?;
    Ok(0)
}

pub fn cancel(inv: &Invocation) -> Result<u8> {
    let id: i64 = inv.args[0]
        .parse()
        .map_err(|_| Error::usage(format!("run id {:?} is not a number (see 'thinimg runs')", inv.args[0])))?;
    // Env::open resumes unfinished runs first; a run being cancelled must not
    // be resumed, so mark it before that.
    {
        let db = Db::open(&inv.state_dir())?;
        let _lock = crate::ops::lock::StateLock::acquire(&inv.state_dir(), crate::pipeline::wait_of(inv)?)?;
        journal::request_cancel(&db.conn, id)?;
    }
    let mut env = Env::open(inv)?;
    let state = env.drive_existing(id);
    let state = match state {
        Ok(o) => format!("{o:?}").to_lowercase(),
        Err(e) => return Err(e),
    };
    if inv.json() {
        output::json(&serde_json::json!({ "id": id, "state": state }))?;
    } else if !inv.flag("quiet") {
        println!("run {id}: {state}");
    }
    Ok(0)
}
