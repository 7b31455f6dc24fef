//! Typed settings: the string-keyed [`Invocation`] turned into the typed
//! configuration a lower layer takes, one block per concern. Nothing below
//! the command layer reads flags; it gets one of these instead.

use super::Invocation;
use crate::error::{Error, Result};
use crate::fetch::s3::S3Config;

/// How to reach the bucket: `--bucket`, `--prefix`, `--region`,
/// `--endpoint`, `--anonymous`.
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
        endpoint: inv.get("endpoint").filter(|s| !s.is_empty()).map(str::to_string),
        anonymous: inv.flag("anonymous"),
    })
}
