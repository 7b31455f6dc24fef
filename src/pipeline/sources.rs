//! The pipeline's view of S3 and the blob store: resolve a ref to its
//! layers and make their blobs present; re-fetch one that went missing or
//! corrupt; collect blobs no image needs.

use std::path::PathBuf;

use rusqlite::Connection;

use super::Ctx;
use crate::error::{Error, Kind, Result};
use crate::fetch;
use crate::fetch::blobstore::{BlobDigest, BlobStore};
use crate::fetch::s3::S3Client;
use crate::store::blobs as q;

/// The local image name of a ref: `golang` for a whole family, `golang/3`
/// for a family up to layer 3 (given as `golang/3`, `golang/3.tar` or the
/// full key `images/golang/3.tar`, where `images/` is the `prefix`).
pub fn image_name(prefix: &str, r: &str) -> Result<String> {
    let rel = r.strip_prefix(prefix).filter(|s| s.contains('/')).unwrap_or(r);
    let (family, layer) = match rel.split_once('/') {
        None => (rel, None),
        Some((f, l)) => {
            let l = if l.ends_with(".tar") { l.to_string() } else { format!("{l}.tar") };
            let n = crate::fetch::catalog::layer_number(&l).map_err(|why| {
                Error::usage(format!("reference {r:?}: {why}; expected FAMILY, FAMILY/N or {prefix}FAMILY/N.tar"))
            })?;
            (f, Some(n))
        }
    };
    if let Some(why) = crate::fetch::catalog::family_name_problem(family) {
        return Err(Error::usage(format!("reference {r:?}: {why}")));
    }
    Ok(match layer {
        None => family.to_string(),
        Some(n) => format!("{family}/{n}"),
    })
}

#[derive(Debug)]
pub struct FetchedLayer {
    pub position: i64,
    pub key: String,
    pub digest: String,
    pub size: u64,
    pub how: String,
}

#[derive(Debug)]
pub struct Fetched {
    pub family: String,
    pub layers: Vec<FetchedLayer>,
}

fn s3(ctx: &Ctx) -> Result<S3Client> {
    S3Client::new(ctx.s3.get()?.clone())
}

/// Resolve `reference` with one listing and make every layer's blob present.
pub fn fetch_image(ctx: &mut Ctx, conn: &mut Connection, reference: &str) -> Result<Fetched> {
    let client = s3(ctx)?;
    let store = BlobStore::open(&ctx.state_dir)?;
    let report = fetch::fetch_refs(conn, &ctx.state_dir, &client, &store, &[reference.to_string()], &ctx.fetch)?;
    let img = report
        .images
        .into_iter()
        .next()
        .ok_or_else(|| Error::software(format!("fetch of {reference} returned no image")))?;
    Ok(Fetched {
        family: img.family,
        layers: img
            .layers
            .into_iter()
            .map(|l| FetchedLayer {
                position: i64::from(l.n),
                key: l.key,
                digest: l.digest.as_str().to_string(),
                size: l.size,
                how: serde_json::to_value(l.source).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            })
            .collect(),
    })
}

/// Download the blobs of several refs in one go (parallel, deduplicated).
pub fn prefetch(ctx: &mut Ctx, conn: &mut Connection, refs: &[String]) -> Result<()> {
    let client = s3(ctx)?;
    let store = BlobStore::open(&ctx.state_dir)?;
    let objects = client.list(client.prefix())?;
    let cat = crate::fetch::catalog::Catalog::build(client.bucket(), client.prefix(), objects);
    let keys: Vec<String> = refs.iter().filter(|r| cat.resolve(r).is_ok()).cloned().collect();
    if keys.is_empty() {
        return Ok(());
    }
    fetch::fetch_refs(conn, &ctx.state_dir, &client, &store, &keys, &ctx.fetch).map(|_| ())
}

/// The blob's path, fetching it again if it went missing or changed size.
/// (Content corruption is caught while unpacking, which hashes every byte.)
pub fn ensure_blob(ctx: &mut Ctx, conn: &mut Connection, key: &str, digest: &str) -> Result<PathBuf> {
    let store = BlobStore::open(&ctx.state_dir)?;
    let d = BlobDigest::parse(digest)?;
    // A database error here is an error, never "absent" (which would fetch again).
    if let Some(b) = q::blob_get(conn, digest)?.filter(|b| b.state == q::BlobState::Present) {
        if store.size_ok(&d, b.size)? {
            return Ok(store.blob_path(&d));
        }
    }
    log::warn!("blob {digest} of {key} is missing from the store; fetching it again");
    let client = s3(ctx)?;
    // The key as listed now must still hold the same content.
    let report = fetch::fetch_refs(conn, &ctx.state_dir, &client, &store, &[key.to_string()], &ctx.fetch)?;
    let got = report
        .images
        .first()
        .and_then(|i| i.layers.iter().find(|l| l.key == key))
        .map(|l| l.digest.as_str().to_string());
    match got {
        Some(g) if g == digest => Ok(store.blob_path(&d)),
        Some(g) => Err(Error::new(
            Kind::TempFail,
            format!("{key} changed in the bucket while being pulled (now sha256 {g}, was {digest}); pull again"),
        )),
        None => Err(Error::new(Kind::NoSuchImage, format!("{key} is no longer in the bucket"))),
    }
}

/// How long a blob that `thinimg fetch` stored or used stays when no image
/// uses it: gc collects it only after no fetch has touched it for this
/// long, so `fetch` (pre-staging) and `gc` do not undo each other. Blobs
/// only pulled are collected as soon as no image uses them.
pub const FETCH_RETENTION_SECS: i64 = 7 * 24 * 3600;

/// Remove blobs no image layer references and no `thinimg fetch` used
/// within [`FETCH_RETENTION_SECS`], partial downloads no unfinished run owns, and
/// store files nothing knows. A rejected blob's file is removed but its row
/// (the rejection) is kept. Returns (digests removed, bytes freed, strays).
pub fn gc_blobs(ctx: &mut Ctx, conn: &mut Connection, dry_run: bool) -> Result<(Vec<String>, u64, Vec<String>)> {
    let store = BlobStore::open(&ctx.state_dir)?;
    let rows = q::unused_blobs(conn, crate::ops::output::now() - FETCH_RETENTION_SECS)?;
    let mut removed = Vec::new();
    let mut bytes = 0u64;
    for (d, size, state) in rows {
        let digest = BlobDigest::parse(&d)?;
        if state == q::BlobState::Rejected {
            if !dry_run {
                store.remove_blob(&digest)?;
            }
            continue;
        }
        removed.push(d.clone());
        bytes += size;
        if !dry_run {
            store.remove_blob(&digest)?;
            q::blob_delete(conn, &d)?;
        }
    }
    // gc holds the state lock, so no fetch is running: a partial download
    // that no unfinished run owns would only be resumed by chance, and may
    // be what filled the disk.
    let mut strays = Vec::new();
    let orphans = q::downloads_unowned(conn)?;
    if !orphans.is_empty() {
        let n = orphans.len();
        let partial_bytes: u64 = orphans.iter().map(|d| store.partial_len(&d.partial)).sum();
        if !dry_run {
            for d in &orphans {
                store.remove_partial(&d.partial)?;
                q::download_forget(conn, d.id)?;
            }
        }
        strays.push(format!("{n} partial download(s) ({})", crate::ops::output::bytes(partial_bytes)));
        bytes += partial_bytes;
    }
    let keep: std::collections::HashSet<String> = q::downloads_all(conn)?.into_iter().map(|d| d.partial).collect();
    if !dry_run {
        let n = store.remove_stale_partials(&keep)?;
        if n > 0 {
            strays.push(format!("{n} partial file(s)"));
        }
    }
    Ok((removed, bytes, strays))
}
