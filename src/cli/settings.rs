//! Typed settings: the string-keyed [`Invocation`] turned into the typed
//! configuration a lower layer takes, one block per concern. Nothing below
//! the command layer reads flags; it gets one of these instead.

use super::Invocation;
use crate::error::{Error, Result};
use crate::fetch::s3::S3Config;
use crate::fetch::FetchOptions;

/// How to reach the bucket: `--bucket`, `--prefix`, `--region`,
/// `--endpoint`, `--anonymous`, `--timeout`, `--retries`.
pub fn s3_config(inv: &Invocation) -> Result<S3Config> {
    let bucket = inv.req("bucket")?.to_string();
    if bucket.is_empty() || bucket.contains('/') {
        return Err(Error::usage(format!("--bucket {bucket:?}: not a bucket name")));
    }
    let mut prefix = inv.get("prefix").unwrap_or("").to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(S3Config {
        bucket,
        prefix,
        region: inv.get("region").unwrap_or("us-east-1").to_string(),
        endpoints: inv
            .get("endpoint")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        anonymous: inv.flag("anonymous"),
        timeout: std::time::Duration::from_secs(bounded(inv, "timeout", 1, 3600)?),
        retries: bounded(inv, "retries", 0, 20)? as u32,
    })
}

/// How to fetch: `--download-jobs`, `--max-blob-size`, `--min-free`,
/// `--verify` (where the command has it), progress unless `--quiet`/`--json`.
pub fn fetch_options(inv: &Invocation) -> Result<FetchOptions> {
    let size =
        |long: &str| -> Result<u64> { inv.u64_opt(long)?.ok_or_else(|| Error::usage(format!("--{long} is required"))) };
    Ok(FetchOptions {
        jobs: size("download-jobs")?.clamp(1, 64) as usize,
        max_blob_size: size("max-blob-size")?,
        min_free: min_free(inv)?,
        verify: inv.flag("verify"),
        progress: !inv.flag("quiet") && !inv.json(),
        // `fetch` pre-stages: its blobs survive gc for the retention period.
        retain: inv.command.name == "fetch",
    })
}

/// `--min-free`: the free-space reserve on the state filesystem.
pub fn min_free(inv: &Invocation) -> Result<u64> {
    inv.u64_opt("min-free")?.ok_or_else(|| Error::usage("--min-free is required"))
}

/// `sync --jitter DURATION`: the longest random sleep before the first
/// request, if set. A duration is whole seconds with an optional unit
/// (`s`, `m`, `h`), at most 24 hours.
pub fn jitter(inv: &Invocation) -> Result<Option<std::time::Duration>> {
    let Some(v) = inv.get("jitter") else { return Ok(None) };
    let t = v.trim();
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => 0,
    };
    match num.parse::<u64>().ok().map(|n| n.saturating_mul(mult)) {
        Some(secs) if mult > 0 && secs <= 86_400 => Ok(Some(std::time::Duration::from_secs(secs))),
        _ => Err(Error::usage(format!(
            "--jitter {v:?}: expected a duration of whole seconds with an optional unit s, m or h (e.g. 600, 30s, 10m), at most 24h"
        ))),
    }
}

/// A plain decimal count from the table (its default included), in `lo..=hi`.
fn bounded(inv: &Invocation, long: &str, lo: u64, hi: u64) -> Result<u64> {
    let v = inv.req(long)?;
    match v.trim().parse::<u64>() {
        Ok(n) if (lo..=hi).contains(&n) => Ok(n),
        _ => Err(Error::usage(format!("--{long} {v:?}: expected a whole number from {lo} to {hi}"))),
    }
}
