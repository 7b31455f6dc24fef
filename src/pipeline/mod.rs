//! The pipeline: journaled runs that turn refs into images, chains and
//! activations. Each run kind has an [`Executor`] whose steps are
//! idempotent and record intent before any kernel or filesystem action.
//!
//! Owns: the order of work and the domain writes that go with each step.
//! Calls the mechanisms (s3/fetch, extract, dm/pool); never parses argv and
//! never prints results (that is `cmd`'s job).

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Invocation;
use crate::error::{Error, Kind, Result};
use crate::journal::{self, Executor, Outcome, RetryPolicy, RunId, RunSpec};
use crate::ops::lock::StateLock;
use crate::store::Db;

/// `--wait SECONDS` as a duration.
pub fn wait_of(inv: &Invocation) -> Result<Option<Duration>> {
    Ok(inv.u64_opt("wait")?.map(Duration::from_secs))
}

/// Everything steps need besides the database connection.
pub struct Ctx {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
}

/// A writer's environment: the lock, the database and the context.
/// Opening it resumes interrupted runs first (journal rule 5).
pub struct Env {
    pub db: Db,
    pub ctx: Ctx,
    pub policy: RetryPolicy,
    _lock: StateLock,
}

impl Env {
    pub fn open(inv: &Invocation) -> Result<Env> {
        let state_dir = inv.state_dir();
        std::fs::create_dir_all(&state_dir)
            .map_err(|e| Error::io(format!("creating state dir {}", state_dir.display()), e))?;
        let lock = StateLock::acquire(&state_dir, wait_of(inv)?)?;
        crate::ops::signals::install();
        let db = Db::open(&state_dir)?;
        let ctx = Ctx { state_dir, run_dir: inv.run_dir() };
        let mut env = Env { db, ctx, policy: RetryPolicy::default(), _lock: lock };
        env.resume_all()?;
        Ok(env)
    }

    /// Resume every run an earlier process left unfinished. A run that now
    /// fails is recorded as failed and reported; only host-fatal errors and
    /// interruptions stop the current invocation.
    pub fn resume_all(&mut self) -> Result<()> {
        for (id, kind, subject, _) in journal::unfinished(&self.db.conn)? {
            log::info!("resuming run {id} ({kind} {subject})");
            match self.drive_existing(id) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), Kind::HostFatal | Kind::Interrupted | Kind::Terminated) => return Err(e),
                Err(e) => log::warn!("resumed run {id} ({kind} {subject}) failed: {}", e.full_message()),
            }
        }
        Ok(())
    }

    /// Start (or join the active) run for the spec and drive it to the end.
    pub fn run(&mut self, spec: &RunSpec) -> Result<(RunId, Outcome)> {
        let (id, _) = journal::start(&mut self.db.conn, spec)?;
        let out = self.drive_existing(id)?;
        Ok((id, out))
    }

    pub fn drive_existing(&mut self, id: RunId) -> Result<Outcome> {
        let kind: String = self.db.conn.query_row("SELECT kind FROM runs WHERE id = ?1", [id], |r| r.get(0)).map_err(
            |e| match e {
                rusqlite::Error::QueryReturnedNoRows => Error::new(Kind::NoSuchImage, format!("no run with id {id}")),
                e => Error::from(e),
            },
        )?;
        let policy = self.policy;
        let mut exec = executor_for(&kind, &mut self.ctx)?;
        journal::drive(&mut self.db.conn, id, exec.as_mut(), &policy)
    }
}

fn executor_for<'a>(kind: &str, _ctx: &'a mut Ctx) -> Result<Box<dyn Executor + 'a>> {
    Err(Error::software(format!("unknown run kind {kind:?} in the journal (written by a newer thinimg?)")))
}
