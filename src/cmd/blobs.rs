//! `thinimg blobs`: the local blob store. Read-only: takes no lock, and a
//! missing database reads as an empty store. `--clear-rejection DIGEST` is
//! the one write: it takes the state lock.

use crate::cli::Invocation;
use crate::error::{Error, Kind, Result};
use crate::fetch::blobstore::BlobDigest;
use crate::fetch::catalog::show_key;
use crate::ops::output;
use crate::store::{blobs as q, Db};

#[derive(serde::Serialize)]
struct BlobOut {
    digest: BlobDigest,
    size: u64,
    state: q::BlobState,
    /// Why a rejected blob was rejected.
    reason: Option<String>,
    keys: Vec<String>,
}

pub fn run(inv: &Invocation) -> Result<u8> {
    if let Some(d) = inv.get("clear-rejection") {
        return clear_rejection(inv, d);
    }
    let rows = match Db::open_existing(&inv.state_dir())? {
        Some(db) => q::blobs_with_keys(&db.conn)?,
        None => Vec::new(),
    };
    let out: Vec<BlobOut> = rows
        .into_iter()
        .map(|(b, keys)| BlobOut {
            digest: b.digest,
            size: b.size,
            state: b.state,
            reason: b.reason,
            keys: keys.into_iter().map(|(bucket, k)| format!("s3://{bucket}/{k}")).collect(),
        })
        .collect();
    if inv.json() {
        return output::json(&serde_json::json!({ "blobs": out })).map(|()| 0);
    }
    let rows: Vec<Vec<String>> = out
        .iter()
        .map(|b| {
            vec![
                b.digest.to_string(),
                output::bytes(b.size),
                match &b.reason {
                    Some(r) => format!("{} ({})", b.state, crate::fetch::s3::printable(r, 200)),
                    None => b.state.to_string(),
                },
                b.keys.iter().map(|k| show_key(k)).collect::<Vec<_>>().join(" "),
            ]
        })
        .collect();
    output::table(&["DIGEST", "SIZE", "STATE", "KEYS"], &rows)?;
    Ok(0)
}

fn clear_rejection(inv: &Invocation, d: &str) -> Result<u8> {
    let digest = BlobDigest::parse(d).map_err(|_| {
        Error::usage(format!("--clear-rejection {:?}: not a SHA-256 digest (64 lower-case hex digits)", show_key(d)))
    })?;
    let env = crate::pipeline::Env::open(&crate::cli::settings::pipeline(inv)?)?;
    if !q::blob_clear_rejection(&env.db.conn, &digest)? {
        return Err(Error::new(Kind::NoSuchImage, format!("blob {digest} is not rejected")));
    }
    if !inv.flag("quiet") {
        println!("blob {digest}: rejection cleared; the next fetch of a key holding it downloads and checks it again");
    }
    Ok(0)
}
