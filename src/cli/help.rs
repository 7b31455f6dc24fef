//! `--help` text, rendered from the flag table.

use std::fmt::Write;

use super::table::{self, Command, Flag};
use crate::error::{Error, Result};

fn flag_line(out: &mut String, f: &Flag) {
    let mut head = String::new();
    if let Some(c) = f.short {
        let _ = write!(head, "-{c}, ");
    }
    let _ = write!(head, "--{}", f.long);
    if let Some(v) = f.value {
        let _ = write!(head, " {v}");
    }
    let mut help = f.help.to_string();
    if let Some(r) = f.kind.describe() {
        let _ = write!(help, " {r}");
    }
    if let Some(d) = f.default {
        let _ = write!(help, " [default: {d}]");
    }
    if let Some(e) = f.env {
        let _ = write!(help, " [env: {e}]");
    }
    if head.len() <= 26 {
        let _ = writeln!(out, "  {head:<26} {help}");
    } else {
        let _ = writeln!(out, "  {head}\n  {:<26} {help}", "");
    }
}

pub fn render(cmd: Option<&'static Command>) -> String {
    let mut out = String::new();
    match cmd {
        Some(c) => {
            let _ = writeln!(out, "thinimg {} {}\n\n{}\n\n{}\n", c.name, c.args, c.summary, c.description);
            if c.flags.iter().any(|g| !g.is_empty()) {
                let _ = writeln!(out, "Options:");
                for f in c.flags.iter().flat_map(|g| g.iter()) {
                    flag_line(&mut out, f);
                }
                out.push('\n');
            }
            let _ = writeln!(out, "Global options:");
            for f in table::GLOBAL {
                flag_line(&mut out, f);
            }
        }
        None => {
            let _ = writeln!(
                out,
                "thinimg {} - container images from S3 as devicemapper thin devices\n\n\
                 Usage: thinimg [GLOBAL OPTIONS] COMMAND [ARGS]\n\nCommands:",
                env!("CARGO_PKG_VERSION")
            );
            for c in table::COMMANDS {
                let head = if c.args.is_empty() { c.name.to_string() } else { format!("{} {}", c.name, c.args) };
                let _ = writeln!(out, "  {head:<26} {}", c.summary);
            }
            let _ = writeln!(out, "\nGlobal options:");
            for f in table::GLOBAL {
                flag_line(&mut out, f);
            }
            let _ = writeln!(out, "\nExit codes:");
            for (code, what) in table::EXIT_CODES {
                let _ = writeln!(out, "  {code:<4} {what}");
            }
            let _ = writeln!(
                out,
                "\n'thinimg help COMMAND' or 'thinimg COMMAND --help' shows a command's options; man 8 thinimg has the rest."
            );
        }
    }
    out
}

/// Help for a group of two-word commands (`thinimg pool --help`).
pub fn render_group(prefix: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "thinimg {prefix} COMMAND\n\nCommands:");
    for c in table::COMMANDS.iter().filter(|c| c.name.starts_with(&format!("{prefix} "))) {
        let head = if c.args.is_empty() { c.name.to_string() } else { format!("{} {}", c.name, c.args) };
        let _ = writeln!(out, "  {head:<26} {}", c.summary);
    }
    let _ = writeln!(out, "\n'thinimg help {prefix} COMMAND' shows a command's options.");
    out
}

/// `thinimg generate WHAT`: a document rendered from the table (see `docs::GENERATED`).
pub fn generate(what: &str) -> Result<String> {
    crate::cli::docs::generate(what).ok_or_else(|| {
        let names: Vec<&str> = crate::cli::docs::GENERATED.iter().map(|(n, _)| *n).collect();
        Error::usage(format!("generate takes one of {}, not {what:?}", names.join(", ")))
    })
}
