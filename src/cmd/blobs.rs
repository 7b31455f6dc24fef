//! `thinimg blobs`: the local blob store. Read-only: takes no lock, and a
//! missing database reads as an empty store.

use crate::cli::Invocation;
use crate::error::Result;
use crate::fetch::catalog::show_key;
use crate::ops::output;
use crate::store::{blobs as q, Db};

#[derive(serde::Serialize)]
struct BlobOut {
    digest: String,
    size: u64,
    state: String,
    keys: Vec<String>,
}

pub fn run(inv: &Invocation) -> Result<u8> {
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
                b.digest.clone(),
                output::bytes(b.size),
                b.state.clone(),
                b.keys.iter().map(|k| show_key(k)).collect::<Vec<_>>().join(" "),
            ]
        })
        .collect();
    output::table(&["DIGEST", "SIZE", "STATE", "KEYS"], &rows)?;
    Ok(0)
}
