//! The pipeline: journaled runs that turn refs into images, chains and
//! activations. Each run kind has an [`Executor`] whose steps are
//! idempotent and record intent before any kernel or filesystem action.
//!
//! Owns: the order of work and the domain writes that go with each step.
//! Calls the mechanisms (s3/fetch, extract, dm/pool); never parses argv,
//! never reads flags (it takes [`Settings`], typed once by `cli::settings`)
//! and never prints results (that is `cmd`'s job). A pool is created (first
//! use) or re-assembled with its activations (after a reboot) only in the
//! named pool step, [`Ctx::prepare_pool`], which steps call where they
//! first need the pool.

pub mod activate;
pub mod batch;
pub mod gc;
pub mod health;
pub mod mount;
pub mod pull;
pub mod remove;
pub mod sources;
pub mod sync;
pub mod views;

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Kind, Result};
use crate::fetch::s3::S3Config;
use crate::fetch::FetchOptions;
use crate::journal::{self, Executor, Outcome, RunId, RunSpec};
use crate::ops::lock::StateLock;
use crate::ops::retry::RetryPolicy;
use crate::pool::{CreateRequest, PoolManager, Prepared};
use crate::store::Db;

pub use remove::rm_spec;

/// Options the steps need; part of [`Settings`] (defaults come from the
/// flag table).
#[derive(Debug, Clone)]
pub struct Opts {
    /// Virtual size of each image's thin device, bytes.
    pub device_size: u64,
    pub extract: crate::extract::Options,
    pub download_jobs: usize,
    pub max_blob_size: u64,
    /// `--unpack-jobs`: images whose chains build at the same time.
    pub unpack_jobs: usize,
    /// `--stream-unpack`: which layers unpack while their blobs download.
    pub stream_unpack: StreamUnpack,
}

/// `--stream-unpack WHEN`: which layers a pull unpacks while their blobs
/// still download (the rest wait for their blob to be stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamUnpack {
    /// None: every chain builds from a stored, verified blob.
    Never,
    /// Only the last blob still downloading, once every other download of
    /// the command has ended: its unpack then overlaps the download tail
    /// without competing with other downloads for CPU.
    Last,
    /// Every layer whose blob is still downloading when its chain is due.
    Always,
}

impl StreamUnpack {
    /// The setting's spelling in the flag table.
    pub fn parse(word: &str) -> Option<StreamUnpack> {
        match word {
            "never" => Some(StreamUnpack::Never),
            "last" => Some(StreamUnpack::Last),
            "always" => Some(StreamUnpack::Always),
            _ => None,
        }
    }
}

/// Everything the pipeline takes from the command line, typed once by the
/// command layer (`cli::settings::pipeline`) before anything is locked or
/// opened. The pipeline never sees the invocation itself.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// `--wait`: how long to queue behind another instance (`None`: not at all).
    pub wait: Option<Duration>,
    /// `--runs-retention`: finished runs older than this are pruned on open.
    pub runs_retention: Duration,
    pub opts: Opts,
    /// The key prefix refs are read against (`--prefix`, ending in `/`).
    pub prefix: String,
    /// How to reach the bucket; a bad value fails only what talks to S3.
    pub s3: Deferred<S3Config>,
    /// How pulls download blobs.
    pub fetch: FetchOptions,
    /// The pool created on first use when none is recorded.
    pub pool: CreateRequest,
}

/// A setting only some steps use, kept with its error: a bad value fails
/// the step that needs it (a bad `--timeout` fails what talks to S3), not
/// every command that opens the pipeline.
#[derive(Debug, Clone)]
pub struct Deferred<T>(std::result::Result<T, (Kind, String)>);

impl<T> Deferred<T> {
    pub fn new(r: Result<T>) -> Deferred<T> {
        Deferred(r.map_err(|e| (e.kind(), e.full_message())))
    }

    pub fn get(&self) -> Result<&T> {
        self.0.as_ref().map_err(|(kind, msg)| Error::new(*kind, msg.clone()))
    }
}

/// Everything steps need besides the database connection. The S3 client
/// is made on first use, so commands that never touch it never fail for
/// its sake. The pool is created, assembled or its activations brought
/// back only by the named pool step, [`Ctx::prepare_pool`].
pub struct Ctx {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub opts: Opts,
    pub prefix: String,
    pub s3: Deferred<S3Config>,
    pub fetch: FetchOptions,
    /// The pool [`Ctx::prepare_pool`] creates when none is recorded.
    pool_request: CreateRequest,
    pool: Option<PoolManager>,
    /// Blobs downloading in the background for the pulls of this command
    /// (`pull`, `sync`); `None` when a step must fetch for itself (a
    /// resumed run, `fetch`).
    pub feed: Option<std::sync::Arc<sources::Feed>>,
}

impl Ctx {
    pub fn new(s: &Settings) -> Ctx {
        Ctx {
            state_dir: s.state_dir.clone(),
            run_dir: s.run_dir.clone(),
            opts: s.opts.clone(),
            prefix: s.prefix.clone(),
            s3: s.s3.clone(),
            fetch: s.fetch.clone(),
            pool_request: s.pool.clone(),
            pool: None,
            feed: None,
        }
    }

    /// A context with the same settings and nothing opened yet (for
    /// another thread); it shares this one's feed.
    pub fn fresh(&self) -> Ctx {
        Ctx {
            state_dir: self.state_dir.clone(),
            run_dir: self.run_dir.clone(),
            opts: self.opts.clone(),
            prefix: self.prefix.clone(),
            s3: self.s3.clone(),
            fetch: self.fetch.clone(),
            pool_request: self.pool_request.clone(),
            pool: None,
            feed: self.feed.clone(),
        }
    }

    /// The pipeline's one pool step, called by name where a step first
    /// needs the pool (a chain build, a snapshot, a deactivation, gc,
    /// `pool assemble`), once per context: the recorded pool, assembled
    /// when it is not in the kernel (after a reboot; then every active
    /// activation is re-activated, [`PoolManager::reactivate`]), or, when
    /// none is recorded, the one the settings describe (`--data-dev`/
    /// `--meta-dev`, else the default loop pool) created. A run that fails
    /// before it needs a pool (a ref the bucket does not have) creates none.
    pub fn prepare_pool(&mut self, conn: &rusqlite::Connection) -> Result<&PoolManager> {
        if self.pool.is_none() {
            let (pool, what) = PoolManager::prepare(conn, &self.state_dir, &self.run_dir, &self.pool_request)?;
            if what == Prepared::Assembled {
                for r in pool.reactivate(conn)? {
                    match r.result {
                        Ok(p) => log::info!("re-activated {} at {}", r.name, p.display()),
                        Err(e) => log::error!("re-activating {}: {}", r.name, e.full_message()),
                    }
                }
            }
            self.pool = Some(pool);
        }
        self.pool.as_ref().ok_or_else(|| Error::software("pool vanished"))
    }
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
    pub fn open(settings: &Settings) -> Result<Env> {
        let mut env = Env::open_without_resume(settings)?;
        env.resume_all()?;
        // History older than --runs-retention goes; unresolved failures stay.
        let keep = settings.runs_retention;
        let cutoff = crate::ops::output::now() - i64::try_from(keep.as_secs()).unwrap_or(i64::MAX);
        match journal::prune(&env.db.conn, cutoff) {
            Ok(0) => {}
            Ok(n) => log::debug!("pruned {n} run(s) that ended before the --runs-retention of {}s", keep.as_secs()),
            Err(e) => log::warn!("pruning old runs: {}", e.full_message()),
        }
        Ok(env)
    }

    /// The lock and the database, without resuming interrupted runs: for
    /// commands that must not change anything (`gc --dry-run`).
    pub fn open_without_resume(settings: &Settings) -> Result<Env> {
        let state_dir = &settings.state_dir;
        crate::ops::lock::check_state_dir_modes(state_dir)?;
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("creating state dir {}", state_dir.display()), e))?;
        // Signals first: a SIGINT while queued behind another instance
        // (--wait) must end with 130, not the default action.
        crate::ops::signals::install();
        let lock = StateLock::acquire(state_dir, settings.wait)?;
        let db = Db::open(state_dir)?;
        Ok(Env { db, ctx: Ctx::new(settings), policy: RetryPolicy::step(), _lock: lock })
    }

    /// Resume every run an earlier process left unfinished. A run that now
    /// fails is recorded as failed and reported; only host-fatal errors and
    /// interruptions stop the current invocation.
    pub fn resume_all(&mut self) -> Result<()> {
        let mut kernel: Option<Result<()>> = None;
        for (id, kind, subject, _) in journal::unfinished(&self.db.conn)? {
            // Without device-mapper a kernel run cannot progress: leave it
            // for a later invocation instead of failing it (or making this
            // command, maybe about another subject, pay for it).
            // (A kind this version does not know fails in drive_existing, below.)
            if RunKind::parse(&kind).is_ok_and(RunKind::needs_kernel) {
                if let Err(e) = kernel.get_or_insert_with(require_kernel) {
                    log::info!("run {id} ({kind} {subject}) waits for device-mapper: {}", e.message());
                    continue;
                }
            }
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
        if RunKind::parse(&spec.kind)?.needs_kernel() {
            require_kernel()?;
        }
        let (id, _) = journal::start(&mut self.db.conn, spec)?;
        let out = self.drive_existing(id)?;
        Ok((id, out))
    }

    pub fn drive_existing(&mut self, id: RunId) -> Result<Outcome> {
        let kind = RunKind::parse(&journal::kind_of(&self.db.conn, id)?)?;
        let policy = self.policy;
        let mut exec = executor_for(kind, &mut self.ctx);
        journal::drive(&mut self.db.conn, id, exec.as_mut(), &policy)
    }
}

journal_enum! {
    /// The kinds of journaled runs (`runs.kind`); each has one executor.
    RunKind, "run kind" { Pull = "pull", Activate = "activate", Deactivate = "deactivate", Rm = "rm" }
}

impl RunKind {
    /// Whether its steps need device-mapper (`rm` only edits rows, and
    /// runs nested `deactivate` runs, which check for themselves).
    fn needs_kernel(self) -> bool {
        matches!(self, RunKind::Pull | RunKind::Activate | RunKind::Deactivate)
    }
}

/// Fail fast, before any run is started, on a host without device-mapper:
/// HostFatal (71) with the modprobe advice, no retries, no failed runs.
pub fn require_kernel() -> Result<()> {
    crate::dm::Dm::open().map(|_| ())
}

fn executor_for<'a>(kind: RunKind, ctx: &'a mut Ctx) -> Box<dyn Executor + 'a> {
    match kind {
        RunKind::Pull => Box::new(pull::Pull { ctx }),
        RunKind::Activate => Box::new(activate::Activate { ctx }),
        RunKind::Deactivate => Box::new(activate::Deactivate { ctx }),
        RunKind::Rm => Box::new(remove::Remove { ctx }),
    }
}

#[cfg(test)]
mod tests {
    use super::activate::{ActivateStep, DeactivateStep};
    use super::remove::RemoveStep;
    use super::*;

    #[test]
    fn run_kinds_and_steps_read_back_and_refuse_other_spellings() {
        for k in [RunKind::Pull, RunKind::Activate, RunKind::Deactivate, RunKind::Rm] {
            assert_eq!(RunKind::parse(k.as_str()).unwrap(), k);
        }
        assert!(!RunKind::Rm.needs_kernel() && RunKind::Pull.needs_kernel());
        for bad in ["Pull", "", "gc", "pull "] {
            let e = RunKind::parse(bad).unwrap_err();
            assert_eq!(e.kind(), Kind::Software);
            assert!(e.message().contains("run kind"), "{}", e.message());
        }
        for s in [ActivateStep::Image, ActivateStep::Snapshot, ActivateStep::Device] {
            assert_eq!(ActivateStep::parse(s.as_str()).unwrap(), s);
        }
        for s in [DeactivateStep::Remove, DeactivateStep::Delete] {
            assert_eq!(DeactivateStep::parse(s.as_str()).unwrap(), s);
        }
        for s in [RemoveStep::Activations, RemoveStep::Forget] {
            assert_eq!(RemoveStep::parse(s.as_str()).unwrap(), s);
        }
        assert!(ActivateStep::parse("remove").is_err() && DeactivateStep::parse("snapshot").is_err());
        // The specs are spelled with the same names the executors parse.
        let spec = activate::deactivate_spec("vm1", true);
        assert_eq!(RunKind::parse(&spec.kind).unwrap(), RunKind::Deactivate);
        assert_eq!(spec.steps, ["remove", "delete"]);
        assert_eq!(spec.request, serde_json::json!({"delete": true}));
        let spec = rm_spec("golang", false);
        assert_eq!((spec.kind.as_str(), spec.request.clone()), ("rm", serde_json::json!({"force": false})));
        let spec = activate::spec("vm1", "golang", "golang/3");
        assert_eq!(spec.steps, ["image", "snapshot", "device"]);
        assert_eq!(spec.request, serde_json::json!({"image": "golang", "ref": "golang/3"}));
        assert_eq!(pull::spec("golang", "golang").request, serde_json::json!({"ref": "golang"}));
    }
}
