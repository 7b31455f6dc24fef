//! `thinimg runs`, `runs show RUN-ID` and `thinimg cancel [RUN-ID | --failed]`.

use std::fmt::Write as _;

use crate::cli::Invocation;
use crate::error::{Error, Kind, Result};
use crate::journal::{self, RunInfo, RunState};
use crate::ops::output;
use crate::pipeline::views::CancelView;
use crate::pipeline::Env;
use crate::store::Db;

fn current_step(r: &RunInfo) -> String {
    r.steps
        .iter()
        .find(|s| s.state != crate::journal::StepState::Done)
        .map(|s| s.name.clone())
        .unwrap_or_else(|| "-".into())
}

pub fn list(inv: &Invocation) -> Result<u8> {
    let runs = match Db::open_read(&inv.state_dir())? {
        Some(db) => journal::list(&db.conn, inv.flag("all"))?,
        None => Vec::new(),
    };
    if inv.json() {
        output::json(&serde_json::json!({ "runs": runs }))?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let done = r.steps.iter().filter(|s| s.state == crate::journal::StepState::Done).count();
            let state = match r.superseded_by {
                Some(l) => format!("{} (superseded by {l})", r.state.as_str()),
                None => r.state.as_str().to_string(),
            };
            vec![
                r.id.to_string(),
                output::utc(r.created_at),
                output::utc(r.updated_at),
                r.kind.clone(),
                r.subject.clone(),
                state,
                format!("{done}/{}", r.steps.len()),
                current_step(r),
                r.error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(&["ID", "STARTED", "UPDATED", "KIND", "SUBJECT", "STATE", "STEPS", "CURRENT", "ERROR"], &rows)?;
    Ok(0)
}

fn parse_id(s: &str) -> Result<i64> {
    s.parse().map_err(|_| Error::usage(format!("run id {s:?} is not a number (see 'thinimg runs')")))
}

/// What an operator should do about a run, in one sentence.
fn next_step(r: &RunInfo) -> String {
    let pid_alive = r.pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
    match (r.state, r.superseded_by) {
        (RunState::Done, _) => "nothing: the run finished".into(),
        (RunState::Cancelled, _) => "nothing: the run was cancelled; gc removes what it left unused".into(),
        (RunState::Failed, Some(l)) => format!("nothing: run {l} of the same {} {} replaced it", r.kind, r.subject),
        (RunState::Failed, None) => {
            let why = match r.error_kind.as_deref().and_then(Kind::parse) {
                Some(Kind::BadData | Kind::NoSuchImage) => {
                    "the input was rejected; it is not retried until the bucket changes"
                }
                Some(Kind::Unavailable) => "S3 could not be reached; check the endpoint and the network",
                Some(Kind::NoPerm) => "permission was denied; check credentials or run as root",
                Some(Kind::HostFatal) => "the host needs an operator; see 'thinimg doctor'",
                Some(Kind::Usage | Kind::Config) => {
                    "an option or the config file was wrong; see 'thinimg config check'"
                }
                _ => "fix the cause above",
            };
            format!(
                "{why}; running '{} {}' again starts a new run, and 'thinimg cancel {}' marks this one resolved",
                r.kind, r.subject, r.id
            )
        }
        (RunState::Active | RunState::Cancelling, _) if pid_alive => {
            format!("wait: pid {} is working on it", r.pid.unwrap_or(0))
        }
        (RunState::Active, _) => "it was interrupted; the next command that writes resumes it".into(),
        (RunState::Cancelling, _) => "the next command that writes finishes cancelling it".into(),
    }
}

pub fn explain(r: &RunInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "run {}: {} {} is {}", r.id, r.kind, r.subject, r.state.as_str());
    let by = r.pid.map(|p| format!(" by pid {p}")).unwrap_or_default();
    let _ = writeln!(s, "started   {}{by}", output::utc(r.created_at));
    let _ = writeln!(
        s,
        "updated   {} ({}s after it started)",
        output::utc(r.updated_at),
        (r.updated_at - r.created_at).max(0)
    );
    if !r.request.is_null() {
        let _ = writeln!(s, "request   {}", r.request);
    }
    let _ = writeln!(s, "steps:");
    for st in &r.steps {
        let attempts = match st.attempts {
            0 => String::new(),
            1 => " (1 attempt)".to_string(),
            n => format!(" ({n} attempts)"),
        };
        let _ = write!(s, "  {:>2}. {:<14} {}{attempts}", st.idx + 1, st.name, st.state.as_str());
        if let Some(e) = &st.error {
            let _ = write!(s, ": {}{e}", st.error_kind.as_deref().map(|k| format!("[{k}] ")).unwrap_or_default());
        }
        s.push('\n');
    }
    if let Some(e) = &r.error {
        let _ = writeln!(s, "error     [{}] {e}", r.error_kind.as_deref().unwrap_or("?"));
    }
    let _ = writeln!(s, "next      {}", next_step(r));
    s
}

pub fn show(inv: &Invocation) -> Result<u8> {
    let id = parse_id(&inv.args[0])?;
    let db = Db::open_read(&inv.state_dir())?
        .ok_or_else(|| Error::new(Kind::NoSuchImage, format!("no run with id {id} (no database yet)")))?;
    let r = journal::get(&db.conn, id)?;
    if inv.json() {
        let mut v = serde_json::to_value(&r).map_err(|e| Error::software("run to JSON").with_source(e))?;
        v["next"] = next_step(&r).into();
        output::json(&v)?;
    } else {
        print!("{}", explain(&r));
    }
    Ok(0)
}

pub fn cancel(inv: &Invocation) -> Result<u8> {
    let ids: Vec<i64> = match (inv.args.first(), inv.flag("failed")) {
        (Some(_), true) => return Err(Error::usage("cancel takes a RUN-ID or --failed, not both")),
        (None, false) => return Err(Error::usage("cancel needs a RUN-ID or --failed (see 'thinimg runs')")),
        (Some(a), false) => vec![parse_id(a)?],
        (None, true) => match Db::open_read(&inv.state_dir())? {
            Some(db) => journal::failed_ids(&db.conn)?,
            None => Vec::new(),
        },
    };
    // Env::open resumes unfinished runs first; a run being cancelled must not
    // be resumed, so mark it before that.
    if !ids.is_empty() {
        let db = Db::open(&inv.state_dir())?;
        let _lock = crate::ops::lock::StateLock::acquire(&inv.state_dir(), crate::cli::settings::wait(inv)?)?;
        for id in &ids {
            journal::request_cancel(&db.conn, *id)?;
        }
    }
    let mut env = Env::open(&crate::cli::settings::pipeline(inv)?)?;
    let mut out = Vec::new();
    for id in ids {
        out.push(CancelView { id, state: env.drive_existing(id)? });
    }
    if inv.json() {
        if inv.flag("failed") {
            output::json(&serde_json::json!({ "cancelled": out }))?;
        } else if let Some(one) = out.first() {
            output::json(one)?;
        }
    } else if !inv.flag("quiet") {
        for o in &out {
            println!("run {}: {}", o.id, o.state.as_str());
        }
        if inv.flag("failed") && out.is_empty() {
            println!("no failed runs");
        }
    }
    Ok(0)
}
