//! `thinimg fetch REF...`: download layer blobs into the store.

use crate::cli::Invocation;
use crate::error::Result;
use crate::fetch::blobstore::BlobStore;
use crate::fetch::s3::S3Client;
use crate::fetch::{fetch_refs, Source};
use crate::ops::output;
use crate::pipeline::Env;

pub fn run(inv: &Invocation) -> Result<u8> {
    let opts = crate::cli::settings::fetch_options(inv)?;
    // Takes the state lock (--wait) and resumes interrupted runs first.
    let env = Env::open(&crate::cli::settings::pipeline(inv)?)?;
    let s3 = S3Client::new(crate::cli::settings::s3_config(inv)?)?;
    let store = BlobStore::open(&env.ctx.state_dir)?;
    let report = fetch_refs(&env.db.conn, &env.ctx.state_dir, &s3, &store, &inv.args, &opts)?;
    if inv.json() {
        return output::json(&report).map(|()| 0);
    }
    if inv.flag("quiet") {
        return Ok(0);
    }
    let mut rows = Vec::new();
    for img in &report.images {
        for l in &img.layers {
            let src = match l.source {
                Source::Downloaded => "downloaded",
                Source::Cached => "cached",
                Source::Deduped => "deduped",
            };
            rows.push(vec![
                img.reference.clone(),
                l.n.to_string(),
                l.digest.as_str()[..12].to_string(),
                output::bytes(l.size),
                src.to_string(),
            ]);
        }
    }
    output::table(&["REF", "LAYER", "BLOB", "SIZE", "SOURCE"], &rows)?;
    let rate = report.bytes_transferred as f64 / report.seconds.max(0.001);
    println!(
        "{} layers: {} downloaded, {} cached, {} deduped; {} transferred in {:.1}s ({}/s)",
        report.layers,
        report.downloaded,
        report.cached,
        report.deduped,
        output::bytes(report.bytes_transferred),
        report.seconds,
        output::bytes(rate as u64)
    );
    Ok(0)
}
