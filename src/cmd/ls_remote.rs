//! `thinimg ls-remote [FAMILY]`: the bucket as images, layers and ignored objects.

use crate::cli::Invocation;
use crate::error::{Error, Kind, Result};
use crate::fetch::catalog::{show_key, Catalog};
use crate::fetch::s3::S3Client;
use crate::ops::output;

pub fn run(inv: &Invocation) -> Result<u8> {
    let s3 = S3Client::new(crate::cli::settings::s3_config(inv)?)?;
    let objects = s3.list(s3.prefix())?;
    if objects.is_empty() {
        // An empty answer is more often a wrong --bucket/--prefix than an empty bucket.
        log::warn!(
            "no objects under s3://{}/{} at {}; check --bucket and --prefix",
            s3.bucket(),
            s3.prefix(),
            s3.endpoint()
        );
    }
    let mut cat = Catalog::build(s3.bucket(), s3.prefix(), objects);
    if let Some(f) = inv.args.first() {
        if !cat.families.contains_key(f) {
            return Err(Error::new(
                Kind::NoSuchImage,
                format!("no image family {:?} under s3://{}/{}", show_key(f), s3.bucket(), s3.prefix()),
            ));
        }
        cat.families.retain(|k, _| k == f);
        let pre = format!("{}{f}/", s3.prefix());
        cat.ignored.retain(|i| i.key.starts_with(&pre));
    }
    if inv.json() {
        return output::json(&cat).map(|()| 0);
    }
    let mut rows = Vec::new();
    for fam in cat.families.values() {
        for l in &fam.layers {
            rows.push(vec![
                fam.name.clone(),
                l.n.to_string(),
                output::bytes(l.size),
                crate::fetch::s3::printable(&l.etag, 80),
                show_key(&l.key),
            ]);
        }
    }
    output::table(&["FAMILY", "LAYER", "SIZE", "ETAG", "KEY"], &rows)?;
    let invalid: Vec<Vec<String>> =
        cat.families.values().filter_map(|f| f.invalid.as_ref().map(|why| vec![f.name.clone(), why.clone()])).collect();
    if !invalid.is_empty() {
        println!();
        output::table(&["INVALID", "REASON"], &invalid)?;
    }
    if !cat.ignored.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = cat.ignored.iter().map(|i| vec![show_key(&i.key), i.reason.clone()]).collect();
        output::table(&["IGNORED", "REASON"], &rows)?;
    }
    Ok(0)
}
