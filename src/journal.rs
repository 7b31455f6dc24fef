//! The journal: every operation is a run of named, idempotent steps,
//! persisted in the same SQLite database as the domain tables.
//!
//! Owns the `runs` and `steps` tables and the rules of DESIGN.md:
//! 1. a run records kind, subject, request and its ordered steps; at most one
//!    active run per (kind, subject), enforced by a partial UNIQUE index;
//! 2. a step's completion and its domain writes commit in ONE transaction
//!    ([`StepCx::complete`]);
//! 3. intent before action ([`StepCx::record_intent`] commits durably before
//!    the step touches the kernel or the filesystem; a resumed step sees the
//!    intent of the attempt that died and adopts or cleans up its work);
//! 4. errors are classified: retryable (bounded attempts with backoff, the
//!    count persisted), permanent (the run fails with the reason), fatal to
//!    the host (the run fails and everything stops);
//! 5. interrupted runs are resumed by the next invocation that writes;
//!    a run can be cancelled.
//!
//! The engine knows nothing about images or devices: an [`Executor`] per run
//! kind does the work. It never sleeps while holding a transaction.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Kind, Result};
use crate::ops::retry::RetryPolicy;
use crate::ops::{fault, output::now};

pub type RunId = i64;

/// What to create: a run of `kind` on `subject` with these steps.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub kind: String,
    pub subject: String,
    pub request: Value,
    pub steps: Vec<String>,
}

column_enum! {
    /// Where a run stands (`runs.state`).
    RunState, "run row" { Active = "active", Cancelling = "cancelling", Done = "done", Failed = "failed", Cancelled = "cancelled" }
}

column_enum! {
    /// Where a step stands (`steps.state`).
    StepState, "step row" { Pending = "pending", Running = "running", Done = "done", Failed = "failed" }
}

/// Does the work of one run kind. Every step must be idempotent: after a
/// crash it is called again, with [`StepCx::intent`] holding what the dead
/// attempt recorded.
pub trait Executor {
    fn step(&mut self, cx: &mut StepCx<'_>) -> Result<()>;

    /// Undo the half-done work a step recorded in its intent (used when a
    /// run is cancelled mid-step). Completed steps are not undone.
    fn abort(&mut self, _cx: &mut StepCx<'_>) -> Result<()> {
        Ok(())
    }
}

/// A step's view of the journal while it runs.
pub struct StepCx<'a> {
    pub conn: &'a mut Connection,
    pub run_id: RunId,
    pub kind: String,
    pub subject: String,
    pub request: Value,
    pub step: String,
    pub idx: i64,
    /// 1 for the first attempt in this or any earlier process.
    pub attempt: u32,
    intent: Option<Value>,
    completed: bool,
    /// The policy this run is driven with; nested runs inherit it.
    policy: RetryPolicy,
}

impl StepCx<'_> {
    /// The run's request as the executor's own type: a request this
    /// version cannot read is an error, not empty fields.
    pub fn request_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.request.clone()).map_err(|e| {
            Error::software(format!("run {}: request {} is not one this version reads", self.run_id, self.request))
                .with_source(e)
        })
    }

    /// Start (or join the active) run for `spec`, a run on its own subject
    /// that this step needs done first, and drive it to the end with this
    /// run's retry policy. It is resumable on its own.
    pub fn run_nested(&mut self, spec: &RunSpec, exec: &mut dyn Executor) -> Result<Outcome> {
        let (id, _) = start(self.conn, spec)?;
        drive(self.conn, id, exec, &self.policy)
    }

    /// The intent recorded by this step, in this attempt or a dead earlier one.
    pub fn intent(&self) -> Option<&Value> {
        self.intent.as_ref()
    }

    /// Durably record what the step is about to do, before doing it.
    pub fn record_intent(&mut self, v: Value) -> Result<()> {
        self.record_intent_with(|_| Ok(v))
    }

    /// Record the intent together with domain rows (e.g. a `creating` device
    /// row) in one transaction; the closure writes the rows and returns the
    /// intent (which may name what it allocated).
    pub fn record_intent_with(&mut self, f: impl FnOnce(&Transaction) -> Result<Value>) -> Result<()> {
        let tx = self.conn.transaction()?;
        let v = f(&tx)?;
        tx.execute(
            "UPDATE steps SET intent = ?1 WHERE run_id = ?2 AND idx = ?3",
            params![v.to_string(), self.run_id, self.idx],
        )?;
        tx.commit()?;
        self.intent = Some(v);
        Ok(())
    }

    /// Finish the step: the closure's domain writes, the step's completion
    /// (with the outcome it returns) and any appended steps commit together.
    pub fn complete(&mut self, f: impl FnOnce(&Transaction) -> Result<Completion>) -> Result<()> {
        let tx = self.conn.transaction()?;
        let c = f(&tx)?;
        mark_done(&tx, self.run_id, self.idx, c.outcome.as_ref())?;
        if !c.append.is_empty() {
            append_steps(&tx, self.run_id, &c.append)?;
        }
        tx.commit()?;
        self.completed = true;
        Ok(())
    }
}

/// What a completing step returns from its transaction closure.
#[derive(Debug, Default)]
pub struct Completion {
    pub outcome: Option<Value>,
    /// Steps to add after the last one (a planning step discovers them).
    pub append: Vec<String>,
}

impl Completion {
    pub fn with_outcome(v: Value) -> Completion {
        Completion { outcome: Some(v), append: Vec::new() }
    }
}

fn mark_done(tx: &Transaction, run: RunId, idx: i64, outcome: Option<&Value>) -> Result<()> {
    tx.execute(
        "UPDATE steps SET state = 'done', outcome = ?1, finished_at = ?2, error = NULL, error_kind = NULL
         WHERE run_id = ?3 AND idx = ?4",
        params![outcome.map(|v| v.to_string()), now(), run, idx],
    )?;
    tx.execute("UPDATE runs SET updated_at = ?1 WHERE id = ?2", params![now(), run])?;
    Ok(())
}

fn append_steps(tx: &Transaction, run: RunId, names: &[String]) -> Result<()> {
    let next: i64 =
        tx.query_row("SELECT COALESCE(MAX(idx), -1) + 1 FROM steps WHERE run_id = ?1", [run], |r| r.get(0))?;
    for (i, n) in names.iter().enumerate() {
        tx.execute(
            "INSERT INTO steps (run_id, idx, name, state) VALUES (?1, ?2, ?3, 'pending')",
            params![run, next + i as i64, n],
        )
        .map_err(|e| Error::from(e).context(format!("adding step {n} to run {run}")))?;
    }
    Ok(())
}

/// Create a run, or return the active run for (kind, subject) if there is one.
/// The boolean is true when the run was newly created.
pub fn start(conn: &mut Connection, spec: &RunSpec) -> Result<(RunId, bool)> {
    let tx = conn.transaction()?;
    if let Some(id) = active_run(&tx, &spec.kind, &spec.subject)? {
        return Ok((id, false));
    }
    tx.execute(
        "INSERT INTO runs (kind, subject, request, state, pid, created_at, updated_at)
         VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?5)",
        params![spec.kind, spec.subject, spec.request.to_string(), std::process::id(), now()],
    )?;
    let id = tx.last_insert_rowid();
    append_steps(&tx, id, &spec.steps)?;
    tx.commit()?;
    Ok((id, true))
}

fn active_run(conn: &Connection, kind: &str, subject: &str) -> Result<Option<RunId>> {
    Ok(conn
        .query_row(
            "SELECT id FROM runs WHERE kind = ?1 AND subject = ?2 AND state IN ('active', 'cancelling')",
            params![kind, subject],
            |r| r.get(0),
        )
        .optional()?)
}

/// The kind of run `id` (66 when there is no such run).
pub fn kind_of(conn: &Connection, id: RunId) -> Result<String> {
    conn.query_row("SELECT kind FROM runs WHERE id = ?1", [id], |r| r.get(0)).map_err(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Error::new(Kind::NoSuchImage, format!("no run with id {id}")),
        e => Error::from(e),
    })
}

/// Runs that an earlier process left unfinished, oldest first.
pub fn unfinished(conn: &Connection) -> Result<Vec<(RunId, String, String, RunState)>> {
    let mut st =
        conn.prepare("SELECT id, kind, subject, state FROM runs WHERE state IN ('active', 'cancelling') ORDER BY id")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, k, s, st) = row?;
        out.push((id, k, s, RunState::parse(&st)?));
    }
    Ok(out)
}

/// Intents (run, step index, intent) whose JSON field `key` equals `value`,
/// left on steps of runs that will never run again (failed or cancelled):
/// work a dead attempt could not tear down, for a later run to finish.
pub fn dead_intents(conn: &Connection, key: &str, value: &str) -> Result<Vec<(RunId, i64, Value)>> {
    let mut st = conn.prepare(
        "SELECT s.run_id, s.idx, s.intent FROM steps s JOIN runs r ON r.id = s.run_id
         WHERE r.state IN ('failed', 'cancelled') AND s.intent IS NOT NULL
           AND json_extract(s.intent, '$.' || ?1) = ?2",
    )?;
    intents_of(&mut st, params![key, value])
}

/// Intents (run, step index, intent) left on steps named `step_prefix`…
/// of dead runs (failed or cancelled) of `kind`, whose JSON has no field
/// `key`: work a dead attempt could not tear down and that names nothing a
/// later step could look it up by.
pub fn dead_intents_without(
    conn: &Connection,
    kind: &str,
    step_prefix: &str,
    key: &str,
) -> Result<Vec<(RunId, i64, Value)>> {
    let mut st = conn.prepare(
        "SELECT s.run_id, s.idx, s.intent FROM steps s JOIN runs r ON r.id = s.run_id
         WHERE r.state IN ('failed', 'cancelled') AND r.kind = ?1 AND s.intent IS NOT NULL
           AND substr(s.name, 1, length(?2)) = ?2
           AND json_type(s.intent, '$.' || ?3) IS NULL",
    )?;
    intents_of(&mut st, params![kind, step_prefix, key])
}

/// The (run, step index, intent) rows a `SELECT run_id, idx, intent` returns.
fn intents_of(st: &mut rusqlite::Statement<'_>, p: impl rusqlite::Params) -> Result<Vec<(RunId, i64, Value)>> {
    let rows = st.query_map(p, |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (run, idx, intent) = row?;
        if let Some(v) = parse_intent(run, Some(intent))? {
            out.push((run, idx, v));
        }
    }
    Ok(out)
}

/// Drop a step's intent once its work was undone.
pub fn clear_intent(conn: &Connection, run: RunId, idx: i64) -> Result<()> {
    conn.execute("UPDATE steps SET intent = NULL WHERE run_id = ?1 AND idx = ?2", params![run, idx])?;
    Ok(())
}

/// How a driven run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Done,
    Cancelled,
}

impl Outcome {
    /// The word `--json` prints (serde's spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Cancelled => "cancelled",
        }
    }
}

struct StepRow {
    idx: i64,
    name: String,
    state: StepState,
    attempts: u32,
    intent: Option<String>,
}

fn next_step(conn: &Connection, run: RunId) -> Result<Option<StepRow>> {
    Ok(conn
        .query_row(
            "SELECT idx, name, state, attempts, intent FROM steps
             WHERE run_id = ?1 AND state <> 'done' ORDER BY idx LIMIT 1",
            [run],
            |r| {
                Ok(StepRow {
                    idx: r.get(0)?,
                    name: r.get(1)?,
                    state: r.get(2)?,
                    attempts: r.get(3)?,
                    intent: r.get(4)?,
                })
            },
        )
        .optional()?)
}

fn load_run(conn: &Connection, run: RunId) -> Result<(String, String, Value, RunState)> {
    let (kind, subject, req, state): (String, String, String, String) = conn
        .query_row("SELECT kind, subject, request, state FROM runs WHERE id = ?1", [run], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?
        .ok_or_else(|| Error::new(Kind::NoSuchImage, format!("no run with id {run}")))?;
    let req: Value = serde_json::from_str(&req)
        .map_err(|e| Error::software(format!("run {run}: request is not valid JSON")).with_source(e))?;
    Ok((kind, subject, req, RunState::parse(&state)?))
}

/// A step's intent as the executor's own type. A cleared intent (`null`)
/// or one that does not name `key` (recorded before anything was
/// allocated) is `None`; an intent that names it but does not read as `T`
/// is an error, never "nothing to undo".
pub fn typed_intent<T: serde::de::DeserializeOwned>(v: &Value, key: &str) -> Result<Option<T>> {
    if v.get(key).is_none() {
        return Ok(None);
    }
    serde_json::from_value(v.clone())
        .map(Some)
        .map_err(|e| Error::software(format!("step intent {v} is not one this version reads")).with_source(e))
}

/// An executor's typed intent as the JSON the journal stores.
pub fn intent_value<T: Serialize>(t: &T) -> Result<Value> {
    serde_json::to_value(t).map_err(|e| Error::software("step intent does not serialize").with_source(e))
}

fn parse_intent(run: RunId, s: Option<String>) -> Result<Option<Value>> {
    match s {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::software(format!("run {run}: step intent is not valid JSON")).with_source(e)),
    }
}

fn fail_run(conn: &Connection, run: RunId, idx: i64, e: &Error) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    tx.execute(
        "UPDATE steps SET state = 'failed', error_kind = ?1, error = ?2, finished_at = ?3 WHERE run_id = ?4 AND idx = ?5",
        params![e.kind().as_str(), e.full_message(), now(), run, idx],
    )?;
    tx.execute(
        "UPDATE runs SET state = 'failed', error_kind = ?1, error = ?2, updated_at = ?3 WHERE id = ?4",
        params![e.kind().as_str(), e.full_message(), now(), run],
    )?;
    tx.commit()?;
    Ok(())
}

/// Drive a run to its end: execute its pending steps in order, retrying
/// retryable failures with backoff, failing the run on permanent ones.
/// Interruptions (SIGINT/SIGTERM) leave the run active for the next
/// invocation. A run in `cancelling` state is aborted instead.
pub fn drive(conn: &mut Connection, run: RunId, exec: &mut dyn Executor, policy: &RetryPolicy) -> Result<Outcome> {
    let (kind, subject, request, state) = load_run(conn, run)?;
    match state {
        RunState::Done => return Ok(Outcome::Done),
        RunState::Cancelled => return Ok(Outcome::Cancelled),
        RunState::Failed => {
            let (ek, em): (Option<String>, Option<String>) =
                conn.query_row("SELECT error_kind, error FROM runs WHERE id = ?1", [run], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            let k = ek.as_deref().and_then(Kind::parse).unwrap_or(Kind::Software);
            return Err(Error::new(k, em.unwrap_or_else(|| format!("run {run} failed"))));
        }
        RunState::Cancelling => {
            abort_run(conn, run, exec, policy)?;
            return Ok(Outcome::Cancelled);
        }
        RunState::Active => {}
    }
    conn.execute("UPDATE runs SET pid = ?1 WHERE id = ?2", params![std::process::id(), run])?;
    // This thread's log lines carry the run and step while it is driven;
    // the previous context (an outer run, or none) comes back afterwards.
    let _context = LogContext::enter(run);
    loop {
        let Some(row) = next_step(conn, run)? else {
            conn.execute("UPDATE runs SET state = 'done', updated_at = ?1 WHERE id = ?2", params![now(), run])?;
            crate::ops::log::set_context("step", None);
            return Ok(Outcome::Done);
        };
        if crate::ops::signals::pending().is_some() {
            return Err(crate::ops::signals::interrupted_error());
        }
        let attempt = row.attempts + 1;
        if row.state == StepState::Running {
            log::info!("run {run} ({kind} {subject}): resuming step {} after an interruption", row.name);
        }
        conn.execute(
            "UPDATE steps SET state = 'running', attempts = ?1, started_at = ?2 WHERE run_id = ?3 AND idx = ?4",
            params![attempt, now(), run, row.idx],
        )?;
        crate::ops::log::set_context("step", Some(row.name.clone()));
        fault::point(&format!("before:{}", row.name));
        let mut cx = StepCx {
            conn,
            run_id: run,
            kind: kind.clone(),
            subject: subject.clone(),
            request: request.clone(),
            step: row.name.clone(),
            idx: row.idx,
            attempt,
            intent: parse_intent(run, row.intent)?,
            completed: false,
            policy: *policy,
        };
        let res = exec.step(&mut cx);
        let completed = cx.completed;
        match res {
            Ok(()) => {
                if !completed {
                    let tx = conn.transaction()?;
                    mark_done(&tx, run, row.idx, None)?;
                    tx.commit()?;
                }
                fault::point(&format!("after:{}", row.name));
            }
            Err(e) if matches!(e.kind(), Kind::Interrupted | Kind::Terminated) => {
                conn.execute(
                    "UPDATE steps SET state = 'pending', attempts = attempts - 1 WHERE run_id = ?1 AND idx = ?2",
                    params![run, row.idx],
                )?;
                return Err(e);
            }
            Err(e) if e.kind().retryable() && attempt < policy.attempts => {
                let d = policy.max_sleep(attempt);
                log::warn!(
                    "run {run} ({kind} {subject}) step {}: attempt {attempt}/{} failed, retrying in {:.1}s: {}",
                    row.name,
                    policy.attempts,
                    d.as_secs_f64(),
                    e.full_message()
                );
                conn.execute(
                    "UPDATE steps SET state = 'pending', error_kind = ?1, error = ?2 WHERE run_id = ?3 AND idx = ?4",
                    params![e.kind().as_str(), e.full_message(), run, row.idx],
                )?;
                policy.sleep(attempt)?;
            }
            Err(e) => {
                let e = e.context(format!("{kind} {subject}: step {}", row.name));
                fail_run(conn, run, row.idx, &e)?;
                return Err(e);
            }
        }
    }
}

/// Restores the thread's `run` and `step` log context when dropped.
struct LogContext {
    prev: Vec<(&'static str, String)>,
}

impl LogContext {
    fn enter(run: RunId) -> LogContext {
        let prev = crate::ops::log::context().into_iter().filter(|(k, _)| matches!(*k, "run" | "step")).collect();
        crate::ops::log::set_context("run", Some(run.to_string()));
        crate::ops::log::set_context("step", None);
        LogContext { prev }
    }
}

impl Drop for LogContext {
    fn drop(&mut self) {
        for key in ["run", "step"] {
            let v = self.prev.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
            crate::ops::log::set_context(key, v);
        }
    }
}

fn abort_run(conn: &mut Connection, run: RunId, exec: &mut dyn Executor, policy: &RetryPolicy) -> Result<()> {
    let (kind, subject, request, _) = load_run(conn, run)?;
    if let Some(row) = next_step(conn, run)? {
        if row.intent.is_some() {
            let mut cx = StepCx {
                conn,
                run_id: run,
                kind,
                subject,
                request,
                step: row.name.clone(),
                idx: row.idx,
                attempt: row.attempts,
                intent: parse_intent(run, row.intent)?,
                completed: false,
                policy: *policy,
            };
            exec.abort(&mut cx)?;
            // Undone: nothing may find this intent and undo it again later.
            clear_intent(conn, run, row.idx)?;
        }
    }
    conn.execute("UPDATE runs SET state = 'cancelled', updated_at = ?1 WHERE id = ?2", params![now(), run])?;
    Ok(())
}

/// Mark a run for cancellation. The caller (holding the lock) then drives it
/// with its executor, which aborts the current step's half-done work.
pub fn request_cancel(conn: &Connection, run: RunId) -> Result<RunState> {
    let (_, _, _, state) = load_run(conn, run)?;
    match state {
        RunState::Active => {
            conn.execute("UPDATE runs SET state = 'cancelling', updated_at = ?1 WHERE id = ?2", params![now(), run])?;
            Ok(RunState::Cancelling)
        }
        RunState::Failed => {
            // A failed step may keep work its teardown could not undo: the
            // caller drives the run to abort it. If a newer run of the same
            // subject is active, that run finishes the teardown instead.
            let (kind, subject, _, _) = load_run(conn, run)?;
            let newer = active_run(conn, &kind, &subject)?.is_some();
            let to = if newer { RunState::Cancelled } else { RunState::Cancelling };
            conn.execute(
                "UPDATE runs SET state = ?1, updated_at = ?2 WHERE id = ?3",
                params![to.as_str(), now(), run],
            )?;
            Ok(to)
        }
        other => Ok(other),
    }
}

/// A run and its steps, for `thinimg runs`.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    pub id: RunId,
    pub kind: String,
    pub subject: String,
    pub state: RunState,
    pub request: Value,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub pid: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// For a failed or cancelled run: the later run of the same kind and
    /// subject that replaced it (its failure is history, not a problem).
    pub superseded_by: Option<RunId>,
    pub steps: Vec<StepInfo>,
}

#[derive(Debug, Serialize)]
pub struct StepInfo {
    pub idx: i64,
    pub name: String,
    pub state: StepState,
    pub attempts: u32,
    /// When its last attempt started and when it ended (seconds since the epoch).
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub intent: Option<Value>,
    pub outcome: Option<Value>,
}

/// A failed run counts as a problem only while it is the newest run of its
/// (kind, subject): a later run, whatever its outcome, supersedes it.
const UNRESOLVED: &str = "state = 'failed' AND NOT EXISTS
     (SELECT 1 FROM runs later WHERE later.kind = runs.kind AND later.subject = runs.subject AND later.id > runs.id)";

const RUN_COLUMNS: &str = "id, kind, subject, state, request, error_kind, error, pid, created_at, updated_at,
     (SELECT MIN(later.id) FROM runs later WHERE later.kind = runs.kind AND later.subject = runs.subject AND later.id > runs.id)";

/// Runs, newest first: all of them, or only the current state (unfinished
/// runs and unresolved failures).
pub fn list(conn: &Connection, all: bool) -> Result<Vec<RunInfo>> {
    let sql = if all {
        format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC")
    } else {
        format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE state IN ('active', 'cancelling') OR ({UNRESOLVED}) ORDER BY id DESC"
        )
    };
    query_runs(conn, &sql, [])
}

/// One run with its steps.
pub fn get(conn: &Connection, id: RunId) -> Result<RunInfo> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1");
    query_runs(conn, &sql, [id])?
        .pop()
        .ok_or_else(|| Error::new(Kind::NoSuchImage, format!("no run with id {id} (see 'thinimg runs --all')")))
}

/// Failed runs that no later run of the same kind and subject replaced.
pub fn unresolved_failures(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row(&format!("SELECT COUNT(*) FROM runs WHERE {UNRESOLVED}"), [], |r| r.get(0))?)
}

/// Ids of every failed run, oldest first (for `cancel --failed`).
pub fn failed_ids(conn: &Connection) -> Result<Vec<RunId>> {
    let mut st = conn.prepare("SELECT id FROM runs WHERE state = 'failed' ORDER BY id")?;
    let ids = st.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<Vec<RunId>>>()?;
    Ok(ids)
}

/// Remove runs (and their steps) that ended before `cutoff` (seconds since
/// the epoch): done and cancelled ones, and failed ones a later run
/// superseded. An unresolved failure stays until it is resolved or
/// cancelled: it is the current state, not history. Returns how many went.
pub fn prune(conn: &Connection, cutoff: i64) -> Result<usize> {
    let n = conn.execute(
        &format!(
            "DELETE FROM runs WHERE updated_at < ?1
               AND (state IN ('done', 'cancelled') OR (state = 'failed' AND NOT ({UNRESOLVED})))"
        ),
        [cutoff],
    )?;
    Ok(n)
}

fn query_runs(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Vec<RunInfo>> {
    let mut st = conn.prepare(sql)?;
    let rows = st.query_map(p, |r| {
        Ok((
            (
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ),
            (
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, i64>(9)?,
                r.get::<_, Option<i64>>(10)?,
            ),
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let ((id, kind, subject, state, request), (error_kind, error, pid, created_at, updated_at, later)) = row?;
        let state = RunState::parse(&state)?;
        let superseded_by = if matches!(state, RunState::Failed | RunState::Cancelled) { later } else { None };
        out.push(RunInfo {
            id,
            kind,
            subject,
            state,
            request: serde_json::from_str(&request).unwrap_or(Value::Null),
            error_kind,
            error,
            pid,
            created_at,
            updated_at,
            superseded_by,
            steps: steps_of(conn, id)?,
        });
    }
    Ok(out)
}

fn steps_of(conn: &Connection, run: RunId) -> Result<Vec<StepInfo>> {
    let mut st = conn.prepare(
        "SELECT idx, name, state, attempts, error_kind, error, intent, outcome, started_at, finished_at
         FROM steps WHERE run_id = ?1 ORDER BY idx",
    )?;
    let rows = st.query_map([run], |r| {
        let intent: Option<String> = r.get(6)?;
        let outcome: Option<String> = r.get(7)?;
        Ok(StepInfo {
            idx: r.get(0)?,
            name: r.get(1)?,
            state: r.get(2)?,
            attempts: r.get(3)?,
            started_at: r.get(8)?,
            finished_at: r.get(9)?,
            error_kind: r.get(4)?,
            error: r.get(5)?,
            intent: intent.and_then(|s| serde_json::from_str(&s).ok()),
            outcome: outcome.and_then(|s| serde_json::from_str(&s).ok()),
        })
    })?;
    rows.map(|r| r.map_err(Error::from)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema;

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        c.execute_batch("PRAGMA foreign_keys=ON").unwrap();
        schema::migrate(&mut c).unwrap();
        c
    }

    fn spec(steps: &[&str]) -> RunSpec {
        RunSpec {
            kind: "test".into(),
            subject: "s".into(),
            request: serde_json::json!({"x": 1}),
            steps: steps.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Records what ran; fails as scripted.
    struct Script {
        ran: Vec<String>,
        fail: Vec<(String, Kind, u32)>,
    }

    impl Executor for Script {
        fn step(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
            self.ran.push(format!("{}#{}", cx.step, cx.attempt));
            for (name, kind, upto) in &self.fail {
                if *name == cx.step && cx.attempt <= *upto {
                    return Err(Error::new(*kind, "scripted failure"));
                }
            }
            if cx.step == "plan" {
                return cx.complete(|tx| {
                    tx.execute("INSERT INTO meta (key, value) VALUES ('planned', 'yes')", [])?;
                    Ok(Completion {
                        outcome: Some(serde_json::json!({"n": 2})),
                        append: vec!["x1".into(), "x2".into()],
                    })
                });
            }
            Ok(())
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy { attempts: 3, base: std::time::Duration::from_millis(1), cap: std::time::Duration::from_millis(2) }
    }

    #[test]
    fn runs_steps_in_order_and_appends_planned_steps_atomically() {
        let mut c = db();
        let (id, new) = start(&mut c, &spec(&["plan", "last"])).unwrap();
        assert!(new);
        let mut ex = Script { ran: vec![], fail: vec![] };
        assert_eq!(drive(&mut c, id, &mut ex, &fast()).unwrap(), Outcome::Done);
        assert_eq!(ex.ran, vec!["plan#1", "last#1", "x1#1", "x2#1"]);
        let v: String = c.query_row("SELECT value FROM meta WHERE key='planned'", [], |r| r.get(0)).unwrap();
        assert_eq!(v, "yes");
        // Driving a finished run does nothing.
        assert_eq!(drive(&mut c, id, &mut ex, &fast()).unwrap(), Outcome::Done);
        assert_eq!(ex.ran.len(), 4);
    }

    #[test]
    fn start_returns_the_active_run_for_the_same_subject() {
        let mut c = db();
        let (a, _) = start(&mut c, &spec(&["one"])).unwrap();
        let (b, new) = start(&mut c, &spec(&["one"])).unwrap();
        assert_eq!(a, b);
        assert!(!new);
    }

    #[test]
    fn retryable_errors_are_retried_with_persisted_attempts() {
        let mut c = db();
        let (id, _) = start(&mut c, &spec(&["a", "b"])).unwrap();
        let mut ex = Script { ran: vec![], fail: vec![("a".into(), Kind::Unavailable, 2)] };
        drive(&mut c, id, &mut ex, &fast()).unwrap();
        assert_eq!(ex.ran, vec!["a#1", "a#2", "a#3", "b#1"]);
        let n: u32 =
            c.query_row("SELECT attempts FROM steps WHERE run_id=?1 AND name='a'", [id], |r| r.get(0)).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn exhausted_retries_and_permanent_errors_fail_the_run() {
        let mut c = db();
        let (id, _) = start(&mut c, &spec(&["a", "b"])).unwrap();
        let mut ex = Script { ran: vec![], fail: vec![("a".into(), Kind::TempFail, 99)] };
        let e = drive(&mut c, id, &mut ex, &fast()).unwrap_err();
        assert_eq!(e.kind(), Kind::TempFail);
        assert_eq!(ex.ran, vec!["a#1", "a#2", "a#3"]);

        let mut c = db();
        let (id, _) = start(&mut c, &spec(&["a", "b"])).unwrap();
        let mut ex = Script { ran: vec![], fail: vec![("a".into(), Kind::BadData, 99)] };
        let e = drive(&mut c, id, &mut ex, &fast()).unwrap_err();
        assert_eq!(e.kind(), Kind::BadData);
        assert_eq!(ex.ran, vec!["a#1"]);
        let runs = list(&c, false).unwrap();
        assert_eq!(runs[0].state, RunState::Failed);
        assert_eq!(runs[0].error_kind.as_deref(), Some("bad_data"));
        // Re-driving a failed run reports the same failure without running anything.
        let e2 = drive(&mut c, id, &mut ex, &fast()).unwrap_err();
        assert_eq!(e2.kind(), Kind::BadData);
        assert_eq!(ex.ran.len(), 1);
        // A new run for the same subject may start once the failed one is not active.
        let (id2, new) = start(&mut c, &spec(&["a"])).unwrap();
        assert!(new && id2 != id);
    }

    #[test]
    fn a_step_left_running_by_a_dead_process_is_resumed_with_its_intent() {
        let mut c = db();
        let (id, _) = start(&mut c, &spec(&["a", "b"])).unwrap();
        // Simulate a process that recorded intent for `a` and died.
        c.execute(
            "UPDATE steps SET state='running', attempts=1, intent='{\"thin_id\":7}' WHERE run_id=?1 AND idx=0",
            [id],
        )
        .unwrap();
        struct Check(Option<Value>);
        impl Executor for Check {
            fn step(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
                if cx.step == "a" {
                    self.0 = cx.intent().cloned();
                    assert_eq!(cx.attempt, 2);
                }
                Ok(())
            }
        }
        let mut ex = Check(None);
        assert_eq!(unfinished(&c).unwrap().len(), 1);
        drive(&mut c, id, &mut ex, &fast()).unwrap();
        assert_eq!(ex.0, Some(serde_json::json!({"thin_id": 7})));
        assert!(unfinished(&c).unwrap().is_empty());
    }

    #[test]
    fn dead_intents_without_a_field_are_those_of_dead_runs_of_that_kind_and_step() {
        let mut c = db();
        let (dead, _) = start(&mut c, &spec(&["chain:1", "chain:2", "other"])).unwrap();
        let (live, _) = start(&mut c, &RunSpec { subject: "t".into(), ..spec(&["chain:1"]) }).unwrap();
        let set = |run: RunId, idx: i64, v: &str| {
            c.execute("UPDATE steps SET intent = ?1 WHERE run_id = ?2 AND idx = ?3", params![v, run, idx]).unwrap();
        };
        set(dead, 0, r#"{"thin_id":7}"#);
        set(dead, 1, r#"{"thin_id":8,"chain_id":"x"}"#);
        set(dead, 2, r#"{"thin_id":9}"#);
        set(live, 0, r#"{"thin_id":10}"#);
        // Nothing while the run is alive.
        assert!(dead_intents_without(&c, "test", "chain:", "chain_id").unwrap().is_empty());
        c.execute("UPDATE runs SET state = 'failed' WHERE id = ?1", [dead]).unwrap();
        let got = dead_intents_without(&c, "test", "chain:", "chain_id").unwrap();
        assert_eq!(got, vec![(dead, 0, serde_json::json!({"thin_id": 7}))], "only the dead chain step naming no chain");
        assert!(dead_intents_without(&c, "pull", "chain:", "chain_id").unwrap().is_empty(), "another kind");
    }

    #[test]
    fn cancel_aborts_the_current_steps_recorded_work() {
        let mut c = db();
        let (id, _) = start(&mut c, &spec(&["a", "b"])).unwrap();
        c.execute("UPDATE steps SET state='running', intent='{\"dev\":\"x\"}' WHERE run_id=?1 AND idx=0", [id])
            .unwrap();
        struct Ab(Vec<Value>);
        impl Executor for Ab {
            fn step(&mut self, _cx: &mut StepCx<'_>) -> Result<()> {
                panic!("no step may run on a cancelled run")
            }
            fn abort(&mut self, cx: &mut StepCx<'_>) -> Result<()> {
                self.0.push(cx.intent().cloned().unwrap_or(Value::Null));
                Ok(())
            }
        }
        assert_eq!(request_cancel(&c, id).unwrap(), RunState::Cancelling);
        let mut ex = Ab(vec![]);
        assert_eq!(drive(&mut c, id, &mut ex, &fast()).unwrap(), Outcome::Cancelled);
        assert_eq!(ex.0, vec![serde_json::json!({"dev": "x"})]);
        assert!(list(&c, false).unwrap().is_empty());
        assert_eq!(list(&c, true).unwrap()[0].state, RunState::Cancelled);
    }

    #[test]
    fn driving_a_run_tags_log_lines_and_restores_the_context_after() {
        let mut c = db();
        crate::ops::log::set_context("run", None);
        struct Seen(Vec<Vec<(&'static str, String)>>);
        impl Executor for Seen {
            fn step(&mut self, _cx: &mut StepCx<'_>) -> Result<()> {
                self.0.push(crate::ops::log::context());
                Ok(())
            }
        }
        let (id, _) = start(&mut c, &spec(&["a", "b"])).unwrap();
        let mut ex = Seen(vec![]);
        drive(&mut c, id, &mut ex, &fast()).unwrap();
        assert_eq!(ex.0[1], vec![("run", id.to_string()), ("step", "b".to_string())]);
        assert!(crate::ops::log::context().is_empty(), "{:?}", crate::ops::log::context());
        // A failing run restores it too.
        let mut failing = Script { ran: vec![], fail: vec![("a".into(), Kind::BadData, 9)] };
        let mut other = spec(&["a"]);
        other.subject = "t".into();
        let (id2, _) = start(&mut c, &other).unwrap();
        drive(&mut c, id2, &mut failing, &fast()).unwrap_err();
        assert!(crate::ops::log::context().is_empty());
    }

    #[test]
    fn a_later_run_of_the_same_subject_resolves_a_failure_and_old_history_is_pruned() {
        let mut c = db();
        let mut failing = Script { ran: vec![], fail: vec![("a".into(), Kind::BadData, 99)] };
        let (f1, _) = start(&mut c, &spec(&["a"])).unwrap();
        drive(&mut c, f1, &mut failing, &fast()).unwrap_err();
        // A different subject's failure is unrelated.
        let mut other = spec(&["a"]);
        other.subject = "other".into();
        let (f2, _) = start(&mut c, &other).unwrap();
        drive(&mut c, f2, &mut failing, &fast()).unwrap_err();
        assert_eq!(unresolved_failures(&c).unwrap(), 2);
        // A second failure of the same subject replaces the first as the problem.
        let (f3, _) = start(&mut c, &spec(&["a"])).unwrap();
        drive(&mut c, f3, &mut failing, &fast()).unwrap_err();
        assert_eq!(unresolved_failures(&c).unwrap(), 2);
        let ids: Vec<RunId> = list(&c, false).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![f3, f2]);
        // Then a success resolves it.
        let mut ok = Script { ran: vec![], fail: vec![] };
        let (d, _) = start(&mut c, &spec(&["a"])).unwrap();
        drive(&mut c, d, &mut ok, &fast()).unwrap();
        assert_eq!(unresolved_failures(&c).unwrap(), 1);
        assert_eq!(get(&c, f1).unwrap().superseded_by, Some(f3));
        assert_eq!(get(&c, f3).unwrap().superseded_by, Some(d));
        // Pruning: everything ended "long ago" except the unresolved failure goes.
        c.execute("UPDATE runs SET updated_at = 1", []).unwrap();
        let n = prune(&c, 100).unwrap();
        assert_eq!(n, 3, "f1, f3 (superseded) and d (done)");
        let left: Vec<RunId> = list(&c, true).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(left, vec![f2]);
        let steps: i64 = c.query_row("SELECT COUNT(*) FROM steps WHERE run_id <> ?1", [f2], |r| r.get(0)).unwrap();
        assert_eq!(steps, 0, "steps go with their run");
        // Recent history is kept.
        let (d2, _) = start(&mut c, &spec(&["a"])).unwrap();
        drive(&mut c, d2, &mut ok, &fast()).unwrap();
        assert_eq!(prune(&c, 100).unwrap(), 0);
    }
}
