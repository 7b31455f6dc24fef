//! `thinimg doctor`: health checks with advice; the exit code is the worst
//! level found.

use serde_json::json;

use crate::cli::Invocation;
use crate::error::{Kind, Result};
use crate::ops::output;
use crate::pipeline::health;

/// Free space on the state filesystem against --min-free (owned by fetch).
fn space_check(inv: &Invocation) -> health::Check {
    let store = crate::fetch::blobstore::BlobStore::at(&inv.state_dir());
    let (status, detail, advice) = match (store.space(), crate::cli::settings::min_free(inv)) {
        (Ok(s), Ok(min)) => {
            let detail = format!(
                "{} free, reserve --min-free {}; {} partial download(s) ({})",
                output::bytes(s.free),
                output::bytes(min),
                s.partial_files,
                output::bytes(s.partial_bytes)
            );
            if s.free < min {
                (
                    health::Level::Warn,
                    detail,
                    Some("free space: 'thinimg gc' removes unused blobs and partial downloads".to_string()),
                )
            } else {
                (health::Level::Ok, detail, None)
            }
        }
        (Err(e), _) | (_, Err(e)) => (health::Level::Warn, e.full_message(), None),
    };
    health::Check { name: "state filesystem", status, detail, advice }
}

pub fn run(inv: &Invocation) -> Result<u8> {
    let mut checks = health::doctor(&inv.state_dir(), &inv.run_dir(), &inv.config_errors);
    checks.push(space_check(inv));
    let worst = checks.iter().map(|c| c.status).max().unwrap_or(health::Level::Ok);
    if inv.json() {
        output::json(&json!({ "worst": worst, "checks": checks }))?;
    } else {
        for c in &checks {
            let tag = match c.status {
                health::Level::Ok => "ok  ",
                health::Level::Warn => "WARN",
                health::Level::Fail => "FAIL",
            };
            if c.status == health::Level::Ok && inv.flag("quiet") {
                continue;
            }
            println!("{tag} {:<22} {}", c.name, c.detail);
            if let Some(a) = &c.advice {
                if c.status != health::Level::Ok {
                    println!("     {:<22} advice: {a}", "");
                }
            }
        }
    }
    Ok(match worst {
        health::Level::Ok => 0,
        health::Level::Warn => 1,
        health::Level::Fail => Kind::HostFatal.exit_code(),
    })
}
