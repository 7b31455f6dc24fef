//! `thinimg unpack --dest DIR LAYER.tar...`: apply layer files in order into
//! a directory with the same rules as the pipeline. Parsing and printing only.

use crate::cli::Invocation;
use crate::error::{Error, Result};
use crate::extract::{apply_layer, Report};

pub fn run(inv: &Invocation) -> Result<u8> {
    let dest = inv.path("dest").ok_or_else(|| Error::usage("unpack needs --dest DIR"))?;
    let opts = crate::cli::settings::unpack_options(inv)?;
    prepare_dest(&dest, inv.flag("apply-on-top"))?;
    crate::ops::signals::install();
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
        if rep.setid_bits_stripped + rep.capabilities_dropped + rep.devices_skipped > 0 {
            log::warn!(
                "layer {name}: not materialized on this host: {} setuid/setgid bits, {} file capabilities, {} device nodes (--keep-privileges, --devices keep them)",
                rep.setid_bits_stripped,
                rep.capabilities_dropped,
                rep.devices_skipped
            );
        }
        reports.push(rep);
    }
    if inv.json() {
        crate::ops::output::json(&serde_json::json!({ "dest": dest, "layers": reports }))?;
    }
    Ok(0)
}

/// Make `dest` safe to unpack into: created 0700 (only root can reach
/// what a hostile layer puts there) when missing; `/` refused; an existing
/// directory must be empty unless `on_top` (whiteouts would delete its
/// content). Checked once, before the first layer.
fn prepare_dest(dest: &std::path::Path, on_top: bool) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::canonicalize(dest) {
        Ok(c) if c == std::path::Path::new("/") => {
            return Err(Error::usage(format!(
                "refusing to unpack onto / ({}): give an empty directory",
                dest.display()
            )))
        }
        Ok(c) => {
            let mut entries = std::fs::read_dir(&c).map_err(|e| Error::io(format!("reading {}", dest.display()), e))?;
            if !on_top && entries.next().is_some() {
                return Err(Error::usage(format!(
                    "{} is not empty: unpack into an empty or new directory, or pass --apply-on-top to apply the layers onto its content (whiteouts may delete it)",
                    dest.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
            }
            // The mode is set explicitly too: the umask must not widen or narrow it.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dest)
                .map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
            std::fs::set_permissions(dest, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(|e| Error::io(format!("setting the mode of {}", dest.display()), e))?;
        }
        Err(e) => return Err(Error::io(format!("inspecting {}", dest.display()), e)),
    }
    Ok(())
}
