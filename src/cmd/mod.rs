//! One function per command: read the invocation, call into the library,
//! print the result. No business logic lives here.

pub mod blobs;
pub mod fetch;
pub mod ls_remote;

use crate::cli::Invocation;
use crate::error::{Error, Result};

/// Run the command; `Ok(code)` is the exit code (0, or 1 for a partial sync).
pub fn dispatch(inv: &Invocation) -> Result<u8> {
    match inv.command.name {
        "ls-remote" => crate::cmd::ls_remote::run(inv),
        "fetch" => crate::cmd::fetch::run(inv),
        "blobs" => crate::cmd::blobs::run(inv),
        other => Err(Error::software(format!("command '{other}' is not implemented in this build"))),
    }
}
