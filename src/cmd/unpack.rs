//! `thinimg unpack --dest DIR LAYER.tar...`: apply layer files in order into
//! a directory with the same rules as the pipeline. Parsing and printing only.

use crate::cli::Invocation;
use crate::error::{Error, Result};
use crate::extract::{apply_layer, Options, Report};

pub fn run(inv: &Invocation) -> Result<u8> {
    let dest = inv.path("dest").ok_or_else(|| Error::usage("unpack needs --dest DIR"))?;
    let opts = Options::from_invocation(inv)?;
    std::fs::create_dir_all(&dest).map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
    let mut reports: Vec<Report> = Vec::new();
    for layer in &inv.args {
        let name = std::path::Path::new(layer)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| layer.clone());
        let mut f = std::fs::File::open(layer).map_err(|e| {
            let k = if e.kind() == std::io::ErrorKind::NotFound { crate::Kind::NoSuchImage } else { crate::Kind::Io };
            Error::io(format!("opening layer {layer}"), e).with_kind(k)
        })?;
        let mut src = std::io::BufReader::with_capacity(1 << 20, &mut f);
        let rep = match apply_layer(&dest, &mut src, &name, &opts) {
            Ok(r) => r,
            Err(e) if inv.json() => {
                // One document: the layers applied, then the one that failed.
                let code = e.kind().exit_code();
                crate::ops::output::json(&serde_json::json!({
                    "dest": dest,
                    "layers": reports,
                    "failed": { "layer": name, "kind": e.kind().as_str(), "message": e.full_message(), "exit_code": code },
                }))?;
                log::error!("{}", e.full_message());
                return Ok(code);
            }
            Err(e) => return Err(e),
        };
        log::debug!(
            "layer {name}: {} entries, {} files, {} written",
            rep.entries,
            rep.files,
            crate::ops::output::bytes(rep.bytes_written)
        );
        reports.push(rep);
    }
    if inv.json() {
        crate::ops::output::json(&serde_json::json!({ "dest": dest, "layers": reports }))?;
    }
    Ok(0)
}
