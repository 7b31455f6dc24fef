//! Several pulls at once (`pull A B C`, `sync`): one listing, one blob
//! [`Feed`] downloading in the background, and `--unpack-jobs` threads,
//! each driving one image's pull run with its own database connection and
//! pool handle.
//!
//! A chain build starts as soon as its blob and its parent chain are
//! ready, while later blobs are still downloading; chains of different
//! images build at the same time; a chain two images share is built by one
//! thread while the other waits for it (`pull::ChainClaim`), and
//! device-mapper calls are serialized inside `devices`. Each run keeps the
//! journal's guarantees on its own: a kill -9 anywhere leaves runs that
//! the next invocation resumes (fetching for themselves, without a feed).
//! One image's failure never stops the others.

use std::sync::{Arc, Mutex};

use super::sources::Feed;
use super::{pull, Ctx, Env};
use crate::error::{Error, Kind, Result};
use crate::fetch::catalog::Catalog;
use crate::journal;
use crate::store::Db;

/// One image to pull: the ref as given and its local name.
#[derive(Debug, Clone)]
pub struct Item {
    pub reference: String,
    pub image: String,
}

/// Pull every item (distinct images), at most `jobs` at a time, with the
/// blobs of all of them downloading in the background. `catalog`: the
/// listing the refs were already checked against, if any; otherwise the
/// bucket is listed here (and if that fails, each pull lists for itself
/// and fails as it would alone). `report`: log each failure as it happens
/// (with the image's log context), for callers that report several.
/// Returns each item's failure (`None`: pulled), in order; `Err` when
/// nothing could be tried, on a host-fatal error and on an interruption.
pub fn pull_images(
    env: &mut Env,
    items: &[Item],
    catalog: Option<Catalog>,
    jobs: usize,
    report: bool,
) -> Result<Vec<Option<Error>>> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    // Without device-mapper no pull can progress: fail once, fast, before
    // any listing or run (exit 71).
    super::require_kernel()?;
    let catalog = match catalog {
        Some(c) => Some(c),
        None => match super::sources::catalog(&env.ctx) {
            Ok(c) => Some(c),
            Err(e) => {
                log::debug!("listing the bucket for the pulls' downloads: {}", e.full_message());
                None
            }
        },
    };
    let mut template = env.ctx.fresh();
    let feed = catalog.map(|c| Arc::new(Feed::new(c)));
    let planned = match &feed {
        Some(f) => f.plan(&items.iter().map(|i| i.reference.clone()).collect::<Vec<_>>()),
        None => Default::default(),
    };
    template.feed = feed.clone();
    let feed_ctx = template.fresh();

    let queue = Mutex::new(items.iter().enumerate().rev().collect::<Vec<_>>());
    // `None`: not taken by any thread (yet).
    let results: Mutex<Vec<Option<Option<Error>>>> = Mutex::new(items.iter().map(|_| None).collect());
    let state_dir = env.ctx.state_dir.clone();
    let policy = env.policy;
    let jobs = jobs.clamp(1, items.len());
    std::thread::scope(|s| {
        if let Some(feed) = &feed {
            let (feed, planned, feed_ctx) = (feed.clone(), &planned, &feed_ctx);
            s.spawn(move || feed.run(feed_ctx, planned));
        }
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
                    let Some((idx, item)) = next else { return };
                    let res = (|| -> Result<()> {
                        if local.is_none() {
                            local = Some((Db::open(&state_dir)?, template.fresh()));
                        }
                        let Some((db, ctx)) = local.as_mut() else {
                            return Err(Error::software("worker state vanished"));
                        };
                        // This thread's log context: this image, no run or step yet.
                        crate::ops::log::set_context("run", None);
                        crate::ops::log::set_context("step", None);
                        crate::ops::log::set_context("image", Some(item.image.clone()));
                        let (id, _) = journal::start(&mut db.conn, &pull::spec(&item.image, &item.reference))?;
                        let mut exec = pull::Pull { ctx };
                        journal::drive(&mut db.conn, id, &mut exec, &policy)?;
                        Ok(())
                    })();
                    match &res {
                        Ok(()) => log::info!("{}: ready", item.image),
                        // A host-fatal error ends everything and is reported
                        // once, by the caller.
                        Err(e) if report && e.kind() != Kind::HostFatal => {
                            log::error!("{}: {}", item.image, e.full_message())
                        }
                        Err(e) => log::debug!("{}: {}", item.image, e.full_message()),
                    }
                    crate::ops::log::set_context("image", None);
                    if let Ok(mut r) = results.lock() {
                        if let Some(slot) = r.get_mut(idx) {
                            *slot = Some(res.err());
                        }
                    }
                }
            });
        }
    });
    let taken = results.into_inner().map_err(|_| Error::software("pull results lock poisoned"))?;
    if let Some(e) = taken.iter().flatten().flatten().find(|e| e.kind() == Kind::HostFatal) {
        return Err(Error::new(Kind::HostFatal, e.message().to_string()));
    }
    // Items no thread took were stopped by an interruption.
    crate::ops::signals::check()?;
    Ok(taken
        .into_iter()
        .map(|t| t.unwrap_or_else(|| Some(Error::new(Kind::TempFail, "not attempted (the pulls stopped)"))))
        .collect())
}
