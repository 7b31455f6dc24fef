//! `config check`, `config show` and `version`.

use serde_json::json;

use crate::cli::Invocation;
use crate::error::{Error, Kind, Result};
use crate::ops::output;

/// The config file in effect: the one named by --config/THINIMG_CONFIG, or
/// the default path (which may be absent).
fn config_file(inv: &Invocation) -> (String, bool) {
    let p = inv
        .get("config")
        .map(String::from)
        .unwrap_or_else(|| crate::cli::table::find_flag("config").and_then(|f| f.default).unwrap_or("").to_string());
    let exists = std::path::Path::new(&p).exists();
    (p, exists)
}

/// Parsing already checked every key and value (a bad file fails with 78
/// before this runs); this reports the outcome.
pub fn check(inv: &Invocation) -> Result<u8> {
    if let Some(first) = inv.config_errors.first() {
        return Err(Error::new(Kind::Config, first.clone()));
    }
    let (path, exists) = config_file(inv);
    if inv.json() {
        output::json(&json!({ "file": path, "exists": exists, "ok": true }))?;
    } else if !inv.flag("quiet") {
        if exists {
            println!("{path}: ok");
        } else {
            println!("{path}: absent (built-in defaults apply)");
        }
    }
    Ok(0)
}

pub fn show(inv: &Invocation) -> Result<u8> {
    let (path, exists) = config_file(inv);
    let mut rows = vec![vec![
        "config".to_string(),
        if exists { path.clone() } else { format!("{path} (absent)") },
        inv.source("config").unwrap_or("default").to_string(),
    ]];
    let mut items = Vec::new();
    for (f, _) in crate::cli::docs::config_keys() {
        let value =
            if f.value.is_none() { Some(inv.flag(f.long).to_string()) } else { inv.get(f.long).map(String::from) };
        let source = inv.source(f.long).unwrap_or("unset").to_string();
        rows.push(vec![f.long.to_string(), value.clone().unwrap_or_else(|| "-".into()), source.clone()]);
        items.push(json!({ "key": f.long, "value": value, "source": source }));
    }
    if inv.json() {
        output::json(&json!({ "file": path, "exists": exists, "settings": items }))?;
    } else {
        output::table(&["KEY", "VALUE", "SOURCE"], &rows)?;
    }
    Ok(0)
}

pub fn version(inv: &Invocation) -> Result<u8> {
    print!("{}", version_text(inv.json()));
    Ok(0)
}

/// What `thinimg version` and `thinimg --version` print (JSON with `--json`).
pub fn version_text(json: bool) -> String {
    if json {
        let v = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "commit": env!("THINIMG_COMMIT"),
            "schema_version": crate::store::schema::MIGRATIONS.len(),
        });
        format!("{v:#}\n")
    } else {
        format!(
            "thinimg {} (commit {}, database schema {})\n",
            env!("CARGO_PKG_VERSION"),
            env!("THINIMG_COMMIT"),
            crate::store::schema::MIGRATIONS.len()
        )
    }
}
