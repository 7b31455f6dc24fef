//! One function per command: read the invocation, call into the library,
//! print the result. No business logic lives here.

mod images;
mod runs;

use crate::cli::Invocation;
use crate::error::{Error, Result};

/// Run the command; `Ok(code)` is the exit code (0, or 1 for a partial sync).
pub fn dispatch(inv: &Invocation) -> Result<u8> {
    match inv.command.name {
        "runs" => runs::list(inv),
        "cancel" => runs::cancel(inv),
        "pull" => images::pull(inv),
        "activate" => images::activate(inv),
        "deactivate" => images::deactivate(inv),
        "rm" => images::rm(inv),
        "images" => images::images(inv),
        "activations" => images::activations(inv),
        "gc" => images::gc(inv),
        other => Err(Error::software(format!("command '{other}' is not implemented in this build"))),
    }
}
