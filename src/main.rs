//! Entry point: parse, dispatch, map errors to documented exit codes.

use std::io::Write;
use std::process::ExitCode;

use thinimg::cli::{self, Parsed};
use thinimg::error::Kind;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let parsed = match cli::parse(args.clone()) {
        Ok(p) => p,
        Err(e) => {
            // The logger does not exist yet: honour --json and a JSON log format by hand.
            let code = e.kind().exit_code();
            if cli::wants_json(&args) {
                let _ = writeln!(std::io::stdout(), "{}", error_json(&e));
            }
            if cli::wants_json_log(&args) {
                let line = serde_json::json!({
                    "ts": thinimg::ops::output::now(), "level": "error", "msg": e.full_message(),
                    "target": "thinimg", "kind": e.kind().as_str(),
                });
                eprintln!("{line}");
            } else {
                eprintln!("thinimg: {}", e.full_message());
            }
            return ExitCode::from(code);
        }
    };
    let inv = match parsed {
        Parsed::Help(text) => return print_ok(&text),
        Parsed::Usage(text) => {
            if cli::wants_json(&args) {
                let first = text.lines().next().unwrap_or("usage error").trim_start_matches("thinimg: ");
                let _ = writeln!(std::io::stdout(), "{}", error_json(&thinimg::Error::usage(first)));
            }
            let _ = std::io::stderr().write_all(text.as_bytes());
            return ExitCode::from(Kind::Usage.exit_code());
        }
        Parsed::Generate(text) => return print_ok(&text),
        Parsed::Version => return print_ok(&thinimg::cmd::version_text(cli::wants_json(&args))),
        Parsed::Run(inv) => inv,
    };
    thinimg::ops::log::init(cli::settings::log_config(&inv));
    match thinimg::cmd::dispatch(&inv) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.kind().exit_code();
            if inv.json() {
                let _ = writeln!(std::io::stdout(), "{}", error_json(&e));
            }
            log::error!("{}", e.full_message());
            if matches!(e.kind(), Kind::Software) {
                log::error!(
                    "this is a bug in thinimg; please report it with the output of 'thinimg runs --all --json'"
                );
            }
            ExitCode::from(code)
        }
    }
}

fn error_json(e: &thinimg::Error) -> serde_json::Value {
    serde_json::json!({
        "error": { "kind": e.kind().as_str(), "message": e.full_message(), "exit_code": e.kind().exit_code() }
    })
}

fn print_ok(text: &str) -> ExitCode {
    match std::io::stdout().write_all(text.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(Kind::Io.exit_code()),
    }
}

fn is_broken_pipe(e: &thinimg::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = cur {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return true;
            }
        }
        cur = s.source();
    }
    false
}
