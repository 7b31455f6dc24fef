//! Command-line parsing, driven entirely by the table in [`table`].
//!
//! Owns: turning argv + environment + config file into an [`Invocation`],
//! and rendering `--help`. It never touches the state dir, a device or the
//! network: `-h` and `-V` return before anything else happens.

pub mod help;
pub mod settings;
pub mod table;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use crate::error::{Error, Result};
pub use table::{Command, Flag};

/// What the user asked for. Values are resolved with the precedence
/// command line > environment > config file > table default.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: &'static Command,
    pub args: Vec<String>,
    values: BTreeMap<&'static str, String>,
    switches: BTreeMap<&'static str, u32>,
}

/// What `parse` returns: either work to do or text to print.
#[derive(Debug)]
pub enum Parsed {
    Run(Invocation),
    Help(String),
    Version,
    /// `thinimg generate WHAT` (man, man-conf, conf, bash): print a generated document.
    Generate(String),
}

impl Invocation {
    /// A flag's resolved value (`None` when unset and without default).
    pub fn get(&self, long: &str) -> Option<&str> {
        self.values.get(long).map(|s| s.as_str())
    }

    /// A switch: set on the command line, by its env variable or in the config file.
    pub fn flag(&self, long: &str) -> bool {
        self.switches.get(long).copied().unwrap_or(0) > 0
    }

    /// How often a switch was given (`-vv` = 2).
    pub fn count(&self, long: &str) -> u32 {
        self.switches.get(long).copied().unwrap_or(0)
    }

    /// A flag's value that must be present (table default or given).
    pub fn req(&self, long: &str) -> Result<&str> {
        self.get(long).ok_or_else(|| Error::usage(format!("--{long} is required for '{}'", self.command.name)))
    }

    /// A non-negative integer flag, with byte suffixes K/M/G/T accepted.
    pub fn u64_opt(&self, long: &str) -> Result<Option<u64>> {
        match self.get(long) {
            None => Ok(None),
            Some(v) => parse_size(v).map(Some).map_err(|m| Error::usage(format!("--{long} {v:?}: {m}"))),
        }
    }

    pub fn u64_or(&self, long: &str, default: u64) -> Result<u64> {
        Ok(self.u64_opt(long)?.unwrap_or(default))
    }

    pub fn path(&self, long: &str) -> Option<PathBuf> {
        self.get(long).map(PathBuf::from)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state-dir").unwrap_or_else(|| PathBuf::from("/var/lib/thinimg"))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path("run-dir").unwrap_or_else(|| PathBuf::from("/run/thinimg"))
    }

    pub fn json(&self) -> bool {
        self.flag("json")
    }

    /// Build an invocation programmatically (tests, internal re-dispatch).
    pub fn for_test(cmd: &str, args: &[&str], values: &[(&'static str, &str)]) -> Invocation {
        let command = table::find_command(cmd).unwrap_or(&table::COMMANDS[0]);
        let mut inv = Invocation {
            command,
            args: args.iter().map(|s| s.to_string()).collect(),
            values: BTreeMap::new(),
            switches: BTreeMap::new(),
        };
        for (k, v) in values {
            inv.values.insert(k, v.to_string());
        }
        inv
    }
}

/// Parse `10`, `4K`, `16M`, `2G`, `1T` (binary multiples), or `512s` sectors? no: plain numbers only.
pub fn parse_size(v: &str) -> std::result::Result<u64, String> {
    let v = v.trim();
    let (num, mul) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown suffix {c:?} (use K, M, G or T)")),
            };
            (&v[..i], m)
        }
        _ => (v, 1),
    };
    let n: u64 = num.parse().map_err(|_| "not a non-negative integer".to_string())?;
    n.checked_mul(mul).ok_or_else(|| "too large".to_string())
}

fn is_switch(f: &Flag) -> bool {
    f.value.is_none()
}

fn truthy(v: &str) -> std::result::Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{v:?} is not a boolean (true/false)")),
    }
}

/// Parse the process arguments (without argv[0]) against the table.
pub fn parse<I>(argv: I) -> Result<Parsed>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    parse_with_env(argv, &|k| std::env::var(k).ok())
}

pub fn parse_with_env<I>(argv: I, env: &dyn Fn(&str) -> Option<String>) -> Result<Parsed>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(argv);
    let mut words: Vec<String> = Vec::new();
    let mut command: Option<&'static Command> = None;
    let mut cli_values: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut cli_switches: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut help = false;
    let mut version = false;

    while let Some(arg) = p.next().map_err(usage_err)? {
        let (flag, display): (Option<&'static Flag>, String) = match &arg {
            Short(c) => (table::flags_of(command).find(|f| f.short == Some(*c)), format!("-{c}")),
            Long(l) => (table::flags_of(command).find(|f| f.long == *l), format!("--{l}")),
            Value(v) => {
                let s =
                    v.clone().into_string().map_err(|v| Error::usage(format!("argument {v:?} is not valid UTF-8")))?;
                if command.is_none() {
                    if s == "generate" {
                        let what = p.value().map_err(usage_err)?.string().map_err(usage_err)?;
                        return Ok(Parsed::Generate(help::generate(&what)?));
                    }
                    words.push(s);
                    let joined = words.join(" ");
                    if let Some(c) = table::find_command(&joined) {
                        command = Some(c);
                        words.clear();
                    } else if !table::COMMANDS.iter().any(|c| c.name.starts_with(&format!("{joined} "))) {
                        return Err(Error::usage(format!("unknown command '{joined}' (see 'thinimg --help')")));
                    }
                } else {
                    words.push(s);
                }
                continue;
            }
        };
        let Some(flag) = flag else {
            let ctx = command.map(|c| format!(" for '{}'", c.name)).unwrap_or_default();
            return Err(Error::usage(format!("unknown option {display}{ctx} (see 'thinimg --help')")));
        };
        if flag.long == "help" {
            help = true;
        } else if flag.long == "version" {
            version = true;
        } else if is_switch(flag) {
            *cli_switches.entry(flag.long).or_insert(0) += 1;
        } else {
            let v = p
                .value()
                .map_err(usage_err)?
                .into_string()
                .map_err(|v| Error::usage(format!("{display} value {v:?} is not valid UTF-8")))?;
            cli_values.insert(flag.long, v);
        }
    }

    if version {
        return Ok(Parsed::Version);
    }
    if help {
        return Ok(Parsed::Help(help::render(command)));
    }
    let Some(command) = command else {
        if words.is_empty() {
            return Ok(Parsed::Help(help::render(None)));
        }
        return Err(Error::usage(format!("incomplete command '{}' (see 'thinimg --help')", words.join(" "))));
    };
    if words.len() < command.min_args {
        return Err(Error::usage(format!(
            "'{}' needs {} (usage: thinimg {} {})",
            command.name, command.args, command.name, command.args
        )));
    }
    if let Some(max) = command.max_args {
        if words.len() > max {
            return Err(Error::usage(format!(
                "'{}' takes at most {max} argument(s), got {} (usage: thinimg {} {})",
                command.name,
                words.len(),
                command.name,
                command.args
            )));
        }
    }

    // Config file: explicit path must exist; the default one may be absent.
    let config_path = cli_values.get("config").cloned().or_else(|| env("THINIMG_CONFIG"));
    let file = match &config_path {
        Some(p) => Some(load_config(p)?),
        None => {
            let def = "/etc/thinimg/thinimg.conf";
            if std::path::Path::new(def).exists() {
                Some(load_config(def)?)
            } else {
                None
            }
        }
    };

    let mut values = BTreeMap::new();
    let mut switches = BTreeMap::new();
    let all: Vec<&'static Flag> = table::flags_of(Some(command)).collect();
    if let Some(file) = &file {
        for (k, (line, _)) in &file.entries {
            if !all.iter().any(|f| f.long == k && f.config) && !table::flags_of(None).any(|f| f.long == k && f.config) {
                // Keys for other commands are fine; unknown keys are an error.
                let known = table::COMMANDS
                    .iter()
                    .flat_map(|c| c.flags.iter().flat_map(|g| g.iter()))
                    .chain(table::GLOBAL.iter())
                    .any(|f| f.long == k && f.config);
                if !known {
                    return Err(Error::usage(format!("{}:{line}: unknown key '{k}'", file.path)));
                }
            }
        }
    }
    for f in &all {
        if is_switch(f) {
            let mut n = cli_switches.get(f.long).copied().unwrap_or(0);
            if n == 0 {
                let from_env = f.env.and_then(env);
                let from_file = if f.config { file.as_ref().and_then(|c| c.get(f.long)) } else { None };
                if let Some(v) = from_env.or(from_file) {
                    n = truthy(&v).map_err(|m| Error::usage(format!("{}: {m}", f.long)))? as u32;
                }
            }
            if n > 0 {
                switches.insert(f.long, n);
            }
        } else {
            let v = cli_values
                .get(f.long)
                .cloned()
                .or_else(|| f.env.and_then(env).filter(|s| !s.is_empty()))
                .or_else(|| if f.config { file.as_ref().and_then(|c| c.get(f.long)) } else { None })
                .or_else(|| f.default.map(String::from));
            if let Some(v) = v {
                values.insert(f.long, v);
            }
        }
    }
    if let Some(p) = config_path {
        values.insert("config", p);
    }
    if let Some(fmt) = values.get("log-format") {
        if fmt != "text" && fmt != "json" {
            return Err(Error::usage(format!("--log-format must be text or json, not {fmt:?}")));
        }
    }
    // State and run dirs are absolute from here on (canonical when they
    // exist), so nothing relative to the caller's cwd is ever recorded.
    for k in ["state-dir", "run-dir"] {
        if let Some(v) = values.get(k) {
            let abs = crate::ops::lock::absolute_dir(std::path::Path::new(v))
                .map_err(|e| Error::usage(format!("--{k} {v:?}: {e}")))?;
            values.insert(k, abs.to_string_lossy().into_owned());
        }
    }
    Ok(Parsed::Run(Invocation { command, args: words, values, switches }))
}

fn usage_err(e: lexopt::Error) -> Error {
    Error::usage(e.to_string())
}

struct ConfigFile {
    path: String,
    entries: BTreeMap<String, (usize, String)>,
}

impl ConfigFile {
    fn get(&self, k: &str) -> Option<String> {
        self.entries.get(k).map(|(_, v)| v.clone())
    }
}

fn load_config(path: &str) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("config file {path}"), e))?;
    let mut entries = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Error::usage(format!("{path}:{}: expected 'key = value'", i + 1)));
        };
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v);
        entries.insert(k.trim().to_string(), (i + 1, v.to_string()));
    }
    Ok(ConfigFile { path: path.to_string(), entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Parsed> {
        let env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        parse_with_env(args.iter().map(|s| s.to_string()), &move |k| {
            env.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone())
        })
    }

    fn inv(args: &[&str]) -> Invocation {
        match parse_env(args, &[]) {
            Ok(Parsed::Run(i)) => i,
            other => panic!("expected a run, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_precedence() {
        let i = inv(&["fetch", "golang"]);
        assert_eq!(i.command.name, "fetch");
        assert_eq!(i.args, vec!["golang"]);
        assert_eq!(i.get("bucket"), Some("flyio-platform-hiring-challenge"));
        assert_eq!(i.get("prefix"), Some("images/"));
        assert_eq!(i.get("region"), Some("us-east-1"));
        assert_eq!(i.get("download-jobs"), Some("4"));
        assert!(!i.flag("anonymous"));

        let Ok(Parsed::Run(i)) = parse_env(
            &["--bucket", "cli", "fetch", "x"],
            &[("THINIMG_BUCKET", "env"), ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"), ("THINIMG_ANONYMOUS", "1")],
        ) else {
            panic!()
        };
        assert_eq!(i.get("bucket"), Some("cli"));
        assert_eq!(i.get("endpoint"), Some("http://127.0.0.1:1"));
        assert!(i.flag("anonymous"));
    }

    #[test]
    fn two_word_commands_and_flags_after_command() {
        let i = inv(&["pool", "create", "--data-size", "2G", "--json", "-vv"]);
        assert_eq!(i.command.name, "pool create");
        assert_eq!(i.u64_opt("data-size").ok().flatten(), Some(2 << 30));
        assert!(i.json());
        assert_eq!(i.count("verbose"), 2);
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &["nope"][..],
            &["fetch"][..],
            &["pool"][..],
            &["images", "extra"][..],
            &["fetch", "--dest", "x", "golang"][..],
            &["--log-format", "xml", "images"][..],
        ] {
            match parse_env(bad, &[]) {
                Err(e) => assert_eq!(e.kind(), crate::error::Kind::Usage, "{bad:?}"),
                Ok(p) => panic!("{bad:?} parsed: {p:?}"),
            }
        }
    }

    #[test]
    fn help_and_version_short_circuit() {
        assert!(matches!(parse_env(&["--help"], &[]), Ok(Parsed::Help(_))));
        assert!(matches!(parse_env(&["fetch", "-h"], &[]), Ok(Parsed::Help(_))));
        assert!(matches!(parse_env(&["-V"], &[]), Ok(Parsed::Version)));
        assert!(matches!(parse_env(&[], &[]), Ok(Parsed::Help(_))));
    }

    #[test]
    fn config_file_is_below_env_and_cli() {
        let dir = std::env::temp_dir().join(format!("thinimg-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.conf");
        std::fs::write(&f, "# comment\nbucket = filebucket\nprefix=\"p/\"\nanonymous = true\n").unwrap();
        let fs = f.to_str().unwrap();
        let Ok(Parsed::Run(i)) = parse_env(&["--config", fs, "ls-remote"], &[("THINIMG_PREFIX", "envp/")]) else {
            panic!()
        };
        assert_eq!(i.get("bucket"), Some("filebucket"));
        assert_eq!(i.get("prefix"), Some("envp/"));
        assert!(i.flag("anonymous"));
        std::fs::write(&f, "bogus = 1\n").unwrap();
        assert!(parse_env(&["--config", fs, "ls-remote"], &[]).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10"), Ok(10));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
