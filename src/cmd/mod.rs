//! One function per command: read the invocation, call into the library,
//! print the result. No business logic lives here.

mod blobs;
mod config;
mod doctor;
mod fetch;
mod images;
mod ls_remote;
mod pool;
mod runs;
mod status;
mod sync;
mod unpack;

pub use config::version_text;

use crate::cli::Invocation;
use crate::error::{Error, Result};

/// Run the command; `Ok(code)` is the exit code (non-zero without an error
/// only for `sync` with failed images and `doctor` with warnings). With
/// --metrics-file, the metrics are written whatever the outcome; failing to
/// write them is a warning.
pub fn dispatch(inv: &Invocation) -> Result<u8> {
    let t0 = std::time::Instant::now();
    let res = run(inv);
    if let Some(path) = inv.path("metrics-file") {
        let code = match &res {
            Ok(c) => *c,
            Err(e) => e.kind().exit_code(),
        };
        let w = crate::pipeline::health::write_metrics(
            &path,
            &inv.state_dir(),
            &inv.run_dir(),
            inv.command.name,
            code,
            t0.elapsed().as_secs_f64(),
        );
        // Metrics are evidence about the command, not its result: a path
        // that cannot be written must not turn a success into a failure.
        if let Err(e) = w {
            log::warn!("metrics not written: {}", e.full_message());
        }
    }
    res
}

fn run(inv: &Invocation) -> Result<u8> {
    crate::ops::output::set_no_headings(inv.flag("no-headings"));
    match inv.command.name {
        "runs" => runs::list(inv),
        "runs show" => runs::show(inv),
        "config check" => config::check(inv),
        "config show" => config::show(inv),
        "version" => config::version(inv),
        "cancel" => runs::cancel(inv),
        "pull" => images::pull(inv),
        "activate" => images::activate(inv),
        "deactivate" => images::deactivate(inv),
        "rm" => images::rm(inv),
        "images" => images::images(inv),
        "activations" => images::activations(inv),
        "gc" => images::gc(inv),
        "sync" => sync::run(inv),
        "status" => status::run(inv),
        "doctor" => doctor::run(inv),
        "pool create" => pool::create(inv),
        "pool status" => pool::status(inv),
        "pool destroy" => pool::destroy(inv),
        "pool assemble" => pool::assemble(inv),
        "ls-remote" => ls_remote::run(inv),
        "fetch" => fetch::run(inv),
        "blobs" => blobs::run(inv),
        "unpack" => unpack::run(inv),
        other => Err(Error::software(format!("command '{other}' is not implemented in this build"))),
    }
}
