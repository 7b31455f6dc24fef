//! One function per command: read the invocation, call into the library,
//! print the result. No business logic lives here.

mod blobs;
mod fetch;
mod ls_remote;
mod runs;

use crate::cli::Invocation;
use crate::error::{Error, Result};

/// Run the command; `Ok(code)` is the exit code (0, or 1 for a partial sync).
pub fn dispatch(inv: &Invocation) -> Result<u8> {
    match inv.command.name {
        "ls-remote" => ls_remote::run(inv),
        "fetch" => fetch::run(inv),
        "blobs" => blobs::run(inv),
        "runs" => runs::list(inv),
        "cancel" => runs::cancel(inv),
        other => Err(Error::software(format!("command '{other}' is not implemented in this build"))),
    }
}
