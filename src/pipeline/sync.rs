//! `sync`: bring the host to a wanted set of images.
//!
//! One listing decides what the refs mean. Blobs of all wanted images are
//! prefetched together (bounded by --download-jobs, deduplicated), then the
//! images are pulled by --unpack-jobs threads, each with its own database
//! connection and pool handle; device-mapper calls are serialized inside
//! `devices`, and a chain wanted by two images is built by one thread while
//! the other waits for it. One image's failure never stops the others.

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde::Serialize;

use super::{pull, Ctx, Env};
use crate::error::{Error, Kind, Result};
use crate::journal;
use crate::store::{images as q, Db};

#[derive(Debug, Serialize)]
pub struct Failure {
    pub kind: &'static str,
    pub exit_code: u8,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct ItemReport {
    pub reference: String,
    /// Where the ref came from: `FILE:LINE` for `--from`, absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub image: String,
    pub ok: bool,
    pub error: Option<Failure>,
}

/// One wanted ref and where it came from (`FILE:LINE` for `--from`).
#[derive(Debug, Clone)]
pub struct Wanted {
    pub reference: String,
    pub source: Option<String>,
}

impl Wanted {
    pub fn arg(r: &str) -> Wanted {
        Wanted { reference: r.to_string(), source: None }
    }
}

/// What to do besides pulling.
#[derive(Debug, Clone, Copy, Default)]
pub struct PruneMode {
    pub prune: bool,
    /// Report what would be pruned; pull and remove nothing.
    pub dry_run: bool,
    /// Prune even when the safety rules say no.
    pub force: bool,
}

#[derive(Debug, Serialize)]
pub struct SyncReport {
    pub images: Vec<ItemReport>,
    /// Removed (or, with --dry-run, would be removed).
    pub pruned: Vec<String>,
    pub kept_with_activations: Vec<String>,
    pub dry_run: bool,
    pub ok: usize,
    pub failed: usize,
}

impl SyncReport {
    /// The exit code of the most severe failure (0 when none failed).
    pub fn exit_code(&self) -> u8 {
        const SEVERITY: [Kind; 11] = [
            Kind::HostFatal,
            Kind::Software,
            Kind::Config,
            Kind::NoPerm,
            Kind::Unavailable,
            Kind::Io,
            Kind::CantCreate,
            Kind::BadData,
            Kind::NoSuchImage,
            Kind::TempFail,
            Kind::Usage,
        ];
        let kinds: Vec<&str> = self.images.iter().filter_map(|i| i.error.as_ref().map(|e| e.kind)).collect();
        for k in SEVERITY {
            if kinds.contains(&k.as_str()) {
                return k.exit_code();
            }
        }
        if kinds.is_empty() {
            0
        } else {
            1
        }
    }
}

fn failure(e: &Error) -> Failure {
    Failure { kind: e.kind().as_str(), exit_code: e.kind().exit_code(), message: e.full_message() }
}

/// Refs from a file (or "-" for stdin): one per line, `#` comments; each
/// remembers its `FILE:LINE` for error messages.
pub fn read_refs(path: &str) -> Result<Vec<Wanted>> {
    let text = if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Error::io("reading refs from stdin", e))?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading refs from {path}"), e))?
    };
    let name = if path == "-" { "<stdin>" } else { path };
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| Wanted { reference: l.to_string(), source: Some(format!("{name}:{}", i + 1)) })
        .collect())
}

/// The bucket's listing read as families and layers (what is ignored is logged).
fn catalog(ctx: &Ctx) -> Result<crate::fetch::catalog::Catalog> {
    let client = crate::fetch::s3::S3Client::new(ctx.s3.get()?.clone())?;
    let objects = client.list(client.prefix())?;
    let cat = crate::fetch::catalog::Catalog::build(client.bucket(), client.prefix(), objects);
    for i in &cat.ignored {
        log::info!("ignoring s3://{}/{}: {}", cat.bucket, crate::fetch::catalog::show_key(&i.key), i.reason);
    }
    Ok(cat)
}

/// Every family in the bucket (valid or not: invalid ones are reported as failures).
pub fn all_families(ctx: &Ctx) -> Result<Vec<String>> {
    Ok(catalog(ctx)?.families.keys().cloned().collect())
}

pub fn sync(env: &mut Env, refs: Vec<Wanted>, unpack_jobs: usize, mode: PruneMode) -> Result<SyncReport> {
    // Normalize; a malformed ref is that ref's failure, not the whole sync's.
    let mut items: Vec<ItemReport> = Vec::new();
    let mut todo: Vec<(usize, String, String)> = Vec::new();
    let mut seen = BTreeSet::new();
    for w in refs {
        let r = w.reference;
        match super::sources::image_name(&env.ctx.prefix, &r) {
            Ok(image) => {
                if seen.insert(image.clone()) {
                    todo.push((items.len(), r.clone(), image.clone()));
                    items.push(ItemReport { reference: r, source: w.source, image, ok: false, error: None });
                }
            }
            Err(e) => {
                let e = match &w.source {
                    Some(src) => e.context(src),
                    None => e,
                };
                log::error!("{}", e.full_message());
                items.push(ItemReport {
                    reference: r.clone(),
                    source: w.source,
                    image: r,
                    ok: false,
                    error: Some(failure(&e)),
                })
            }
        }
    }
    if mode.dry_run {
        // Nothing is pulled: only what pruning would do is reported.
        for (idx, _, _) in &todo {
            if let Some(it) = items.get_mut(*idx) {
                it.ok = true;
            }
        }
        let (pruned, kept) = prune_plan(env, &items, mode)?;
        let ok = items.iter().filter(|i| i.ok).count();
        let failed = items.len() - ok;
        return Ok(SyncReport { images: items, pruned, kept_with_activations: kept, dry_run: true, ok, failed });
    }

    // The host first: without device-mapper nothing below can work, and the
    // sync fails once, fast, for all its images (exit 71), touching no S3.
    if !todo.is_empty() {
        super::require_kernel()?;
    }
    // One listing answers for every wanted ref before any work: a ref the
    // bucket does not have (or has with a gap) is that ref's failure, with
    // no run; an unreadable bucket fails every ref at once.
    if !todo.is_empty() {
        match catalog(&env.ctx) {
            Ok(cat) => todo.retain(|(idx, r, image)| match cat.resolve(r) {
                Ok(_) => true,
                Err(e) => {
                    crate::ops::log::set_context("image", Some(image.clone()));
                    log::error!("{image}: {}", e.full_message());
                    crate::ops::log::set_context("image", None);
                    if let Some(it) = items.get_mut(*idx) {
                        it.error = Some(failure(&e));
                    }
                    false
                }
            }),
            Err(e) => {
                log::error!("{}", e.full_message());
                for (idx, _, _) in todo.drain(..) {
                    if let Some(it) = items.get_mut(idx) {
                        it.error = Some(failure(&e));
                    }
                }
            }
        }
    }
    // The prune safety rules that the wanted set alone decides are judged
    // before anything is pulled (and again after, when pulls failed).
    if mode.prune {
        prune_plan(env, &items, mode)?;
    }
    // Prefetch everything together: parallel, deduplicated downloads. A
    // failure here is only logged; each image's own pull reports it.
    let good: Vec<String> = todo.iter().map(|(_, r, _)| r.clone()).collect();
    if good.len() > 1 {
        if let Err(e) = super::sources::prefetch(&mut env.ctx, &mut env.db.conn, &good) {
            log::debug!("prefetch: {}", e.full_message());
        }
    }

    let queue = Mutex::new(todo.into_iter().rev().collect::<Vec<_>>());
    let results: Mutex<Vec<(usize, Option<Error>)>> = Mutex::new(Vec::new());
    let jobs = unpack_jobs.max(1);
    let state_dir = env.ctx.state_dir.clone();
    let template = env.ctx.fresh();
    let policy = env.policy;
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                let mut local: Option<(Db, Ctx)> = None;
                loop {
                    if crate::ops::signals::pending().is_some() {
                        return;
                    }
                    let next = match queue.lock() {
                        Ok(mut q) => q.pop(),
                        Err(_) => return,
                    };
                    let Some((idx, reference, image)) = next else { return };
                    if local.is_none() {
                        match Db::open(&state_dir) {
                            Ok(db) => local = Some((db, template.fresh())),
                            Err(e) => {
                                if let Ok(mut r) = results.lock() {
                                    r.push((idx, Some(e)));
                                }
                                continue;
                            }
                        }
                    }
                    let Some((db, ctx)) = local.as_mut() else { return };
                    // This thread's log context: this image, no run or step yet.
                    crate::ops::log::set_context("run", None);
                    crate::ops::log::set_context("step", None);
                    crate::ops::log::set_context("image", Some(image.clone()));
                    let res = (|| -> Result<()> {
                        let (id, _) = journal::start(&mut db.conn, &pull::spec(&image, &reference))?;
                        let mut exec = pull::Pull { ctx };
                        journal::drive(&mut db.conn, id, &mut exec, &policy)?;
                        Ok(())
                    })();
                    if let Err(e) = &res {
                        // A host-fatal error ends the whole sync and is reported
                        // once, by the caller; every other failure is reported here.
                        if e.kind() != Kind::HostFatal {
                            log::error!("{image}: {}", e.full_message());
                        }
                    } else {
                        log::info!("{image}: ready");
                    }
                    if let Ok(mut r) = results.lock() {
                        r.push((idx, res.err()));
                    }
                }
            });
        }
    });
    crate::ops::log::set_context("image", None);
    if let Ok(rs) = results.into_inner() {
        for (idx, err) in rs {
            if let Some(item) = items.get_mut(idx) {
                item.ok = err.is_none();
                item.error = err.as_ref().map(failure);
            }
        }
    }
    // Host-fatal conditions and interruptions end the whole sync.
    if let Some(e) = items.iter().filter_map(|i| i.error.as_ref()).find(|e| e.kind == Kind::HostFatal.as_str()) {
        return Err(Error::new(Kind::HostFatal, e.message.clone()));
    }
    crate::ops::signals::check()?;
    for it in items.iter_mut() {
        if it.error.is_none() && !it.ok {
            it.error = Some(Failure { kind: "interrupted", exit_code: 75, message: "not attempted".into() });
        }
    }

    let ok = items.iter().filter(|i| i.ok).count();
    let failed = items.len() - ok;
    let mut report =
        SyncReport { images: items, pruned: Vec::new(), kept_with_activations: Vec::new(), dry_run: false, ok, failed };
    if mode.prune {
        // On a refusal the pulls above stand; the refusal is the sync's outcome.
        let (doomed, kept) = prune_plan(env, &report.images, mode)?;
        report.kept_with_activations = kept;
        for name in doomed {
            env.run(&super::rm_spec(&name, false))?;
            report.pruned.push(name);
        }
        if !report.pruned.is_empty() {
            let Env { db, ctx, .. } = env;
            super::gc::run(ctx, &mut db.conn, false)?;
        }
    }
    Ok(report)
}

/// Which local images pruning removes, and which it keeps for their
/// activations. Refuses (exit 78, unless --force) when the wanted set is
/// empty, when S3 could not be read for some wanted image (the remote view
/// cannot be trusted), or when more than half of the local images would go:
/// each is far more often a wrong prefix, bucket or wanted file than a
/// real intent to empty the host.
fn prune_plan(env: &Env, items: &[ItemReport], mode: PruneMode) -> Result<(Vec<String>, Vec<String>)> {
    let wanted: BTreeSet<String> = items.iter().map(|i| i.image.clone()).collect();
    let local = q::images(&env.db.conn)?;
    let mut doomed = Vec::new();
    let mut kept = Vec::new();
    for img in &local {
        if wanted.contains(&img.name) {
            continue;
        }
        if !q::activations_of(&env.db.conn, &img.name)?.is_empty() {
            kept.push(img.name.clone());
        } else {
            doomed.push(img.name.clone());
        }
    }
    if mode.force || doomed.is_empty() {
        return Ok((doomed, kept));
    }
    let refuse = |why: String| {
        Err(Error::new(
            Kind::Config,
            format!(
                "sync --prune refused: {why}; nothing was pruned ({} image(s) would have gone: {}). \
                 Check --bucket, --prefix and the wanted list, or pass --force",
                doomed.len(),
                doomed.join(", ")
            ),
        ))
    };
    // A wanted image "was read" when the bucket answered for it: it pulled,
    // or failed for a reason of its own (a bad layer, the host), not because
    // the ref was bad, the image absent or S3 unreadable.
    let unread = [Kind::Usage, Kind::NoSuchImage, Kind::Unavailable, Kind::NoPerm, Kind::Config];
    let read =
        items.iter().filter(|i| i.error.as_ref().is_none_or(|e| !unread.iter().any(|k| k.as_str() == e.kind))).count();
    if wanted.is_empty() || read == 0 {
        return refuse("the wanted set is empty, or none of it exists in the bucket or could be read".into());
    }
    if let Some(i) = items.iter().find(|i| i.error.as_ref().is_some_and(|e| e.kind == Kind::Unavailable.as_str())) {
        return refuse(format!("S3 could not be read for {} (the listing cannot be trusted)", i.reference));
    }
    if doomed.len() * 2 > local.len() {
        return refuse(format!("it would remove {} of the {} local images", doomed.len(), local.len()));
    }
    Ok((doomed, kept))
}
