//! Command-line parsing, driven entirely by the table in [`table`].
//!
//! Owns: turning argv + environment + config file into an [`Invocation`],
//! and rendering `--help`. It never touches the state dir, a device or the
//! network: `-h` and `-V` return before anything else happens.

pub mod docs;
pub mod help;
pub mod settings;
pub mod table;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use crate::error::{Error, Result};
pub use table::{Command, Flag};

/// What the user asked for. Values are resolved with the precedence
/// command line > environment > config file > table default, and every
/// value has been checked against its flag's [`table::ValueKind`].
#[derive(Debug, Clone)]
pub struct Invocation {
    pub command: &'static Command,
    pub args: Vec<String>,
    values: BTreeMap<&'static str, String>,
    switches: BTreeMap<&'static str, u32>,
    /// Where each resolved value came from (for `config show`).
    sources: BTreeMap<&'static str, String>,
    /// Config-file problems `doctor` reports instead of failing on (every
    /// other command fails with exit 78 at parse time).
    pub config_errors: Vec<String>,
}

/// What `parse` returns: either work to do or text to print.
#[derive(Debug)]
pub enum Parsed {
    Run(Invocation),
    /// Print on stdout, exit 0.
    Help(String),
    /// Print on stderr, exit 64 (no command, or an incomplete one).
    Usage(String),
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

    /// Where a flag's value came from: "command line", "environment VAR",
    /// "FILE:LINE" or "default" (`None`: unset).
    pub fn source(&self, long: &str) -> Option<&str> {
        self.sources.get(long).map(|s| s.as_str())
    }

    /// A flag's value that must be present (table default or given).
    pub fn req(&self, long: &str) -> Result<&str> {
        self.get(long).ok_or_else(|| Error::usage(format!("--{long} is required for '{}'", self.command.name)))
    }

    /// A number-like flag (size, count or duration in seconds), checked
    /// against the flag's kind and range in the table.
    pub fn u64_opt(&self, long: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(long) else { return Ok(None) };
        let kind = table::find_flag(long).map(|f| f.kind).unwrap_or(table::ValueKind::Size { min: 0, max: u64::MAX });
        match kind.check(v) {
            Ok(Some(n)) => Ok(Some(n)),
            Ok(None) => Err(Error::software(format!("--{long} is not a number-like option"))),
            Err(m) => Err(Error::usage(format!("--{long} {v:?} {m}"))),
        }
    }

    /// A number-like flag whose default is in the table (the only place defaults live).
    pub fn number(&self, long: &str) -> Result<u64> {
        self.u64_opt(long)?
            .ok_or_else(|| Error::software(format!("--{long} has no value and no default in the flag table")))
    }

    pub fn path(&self, long: &str) -> Option<PathBuf> {
        self.get(long).map(PathBuf::from)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state-dir").unwrap_or_else(|| PathBuf::from(table_default("state-dir")))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.path("run-dir").unwrap_or_else(|| PathBuf::from(table_default("run-dir")))
    }

    pub fn json(&self) -> bool {
        self.flag("json")
    }

    /// An invocation built in a unit test: the command's table defaults,
    /// then `values`. Not part of the library's API.
    #[cfg(test)]
    pub(crate) fn for_test(cmd: &str, args: &[&str], values: &[(&'static str, &str)]) -> Invocation {
        let command = table::find_command(cmd).unwrap_or(&table::COMMANDS[0]);
        let mut inv = Invocation {
            command,
            args: args.iter().map(|s| s.to_string()).collect(),
            values: BTreeMap::new(),
            switches: BTreeMap::new(),
            sources: BTreeMap::new(),
            config_errors: Vec::new(),
        };
        for f in table::flags_of(Some(command)) {
            if let Some(d) = f.default {
                inv.values.insert(f.long, d.to_string());
            }
        }
        for (k, v) in values {
            inv.values.insert(k, v.to_string());
        }
        inv
    }
}

fn table_default(long: &str) -> &'static str {
    table::find_flag(long).and_then(|f| f.default).unwrap_or("")
}

/// Parse `10`, `4K`, `16M`, `2G`, `1T` (binary multiples).
pub fn parse_size(v: &str) -> std::result::Result<u64, String> {
    let v = v.trim();
    let (num, mul) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("has an unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&v[..i], m)
        }
        _ => (v, 1),
    };
    let n: u64 = num.parse().map_err(|_| "is not a size (a whole number, optionally with K, M, G or T)".to_string())?;
    n.checked_mul(mul).ok_or_else(|| "is too large".to_string())
}

/// Parse a duration in seconds: `600`, `10s`, `5m`, `1h`, `2d`.
pub fn parse_duration(v: &str) -> std::result::Result<u64, String> {
    let v = v.trim();
    let (num, mul) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return Err(format!("has an unknown time unit {c:?} (use s, m, h or d, e.g. 600, 10s, 5m, 1h)")),
            };
            (&v[..i], m)
        }
        _ => (v, 1),
    };
    let n: u64 = num.parse().map_err(|_| "is not a duration (e.g. 600, 10s, 5m, 1h)".to_string())?;
    n.checked_mul(mul).ok_or_else(|| "is too large".to_string())
}

/// `4096` → `4K`, `65536` → `64K`, `1000` → `1000`: the shortest exact spelling.
pub fn show_size(n: u64) -> String {
    for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// `604800` → `7d`, `90` → `90s`.
pub fn show_duration(n: u64) -> String {
    for (suffix, unit) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if n != 0 && n % unit == 0 {
            return format!("{}{suffix}", n / unit);
        }
    }
    format!("{n}s")
}

fn is_switch(f: &Flag) -> bool {
    f.value.is_none()
}

pub(crate) fn truthy(v: &str) -> std::result::Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{v:?} is not a boolean (true/false)")),
    }
}

/// Edit distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a small edit distance, as " (did you mean X?)".
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean_as(word, candidates, "")
}

/// [`did_you_mean`] with the suggestion written with a prefix (`--`).
pub fn did_you_mean_as<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>, prefix: &str) -> String {
    let best = candidates
        .into_iter()
        .map(|c| (distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!("; did you mean '{prefix}{c}'?"),
        None => String::new(),
    }
}

/// Whether a usage error should be printed as JSON (`--json` among the
/// arguments, before any `--`).
pub fn wants_json(args: &[OsString]) -> bool {
    args.iter().take_while(|a| *a != "--").any(|a| a == "--json")
}

/// Whether log lines are JSON, judged from the raw arguments and the
/// environment (for errors found before the logger exists).
pub fn wants_json_log(args: &[OsString]) -> bool {
    let mut it = args.iter().take_while(|a| *a != "--");
    while let Some(a) = it.next() {
        if a == "--log-format" {
            return it.next().is_some_and(|v| v == "json");
        }
        if a == "--log-format=json" {
            return true;
        }
    }
    std::env::var("THINIMG_LOG_FORMAT").is_ok_and(|v| v == "json")
}

/// Parse the process arguments (without argv[0]) against the table.
pub fn parse<I>(argv: I) -> Result<Parsed>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    parse_with_env(argv, &|k| std::env::var(k).ok())
}

/// Commands whose name starts with `prefix` followed by a space (`pool` → pool create, ...).
fn group_of(prefix: &str) -> Vec<&'static Command> {
    table::COMMANDS.iter().filter(|c| c.name.starts_with(&format!("{prefix} "))).collect()
}

fn command_words() -> Vec<&'static str> {
    let mut v: Vec<&str> = table::COMMANDS.iter().map(|c| c.name.split(' ').next().unwrap_or(c.name)).collect();
    v.push("help");
    v.dedup();
    v
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
    // `thinimg help [COMMAND...]`: the words after `help`.
    let mut help_words: Option<Vec<String>> = None;

    while let Some(arg) = p.next().map_err(usage_err)? {
        let (flag, display): (Option<&'static Flag>, String) = match &arg {
            Short(c) => (table::flags_of(command).find(|f| f.short == Some(*c)), format!("-{c}")),
            Long(l) => (table::flags_of(command).find(|f| f.long == *l), format!("--{l}")),
            Value(v) => {
                let s =
                    v.clone().into_string().map_err(|v| Error::usage(format!("argument {v:?} is not valid UTF-8")))?;
                if let Some(hw) = help_words.as_mut() {
                    hw.push(s);
                    continue;
                }
                match command {
                    None => {
                        if words.is_empty() && s == "generate" {
                            let what = p.value().map_err(usage_err)?.string().map_err(usage_err)?;
                            return Ok(Parsed::Generate(help::generate(&what)?));
                        }
                        if words.is_empty() && s == "help" {
                            help_words = Some(Vec::new());
                            continue;
                        }
                        words.push(s);
                        let joined = words.join(" ");
                        if let Some(c) = table::find_command(&joined) {
                            command = Some(c);
                            words.clear();
                        } else if group_of(&joined).is_empty() {
                            let hint = if words.len() == 1 {
                                did_you_mean(&joined, command_words())
                            } else {
                                did_you_mean(&joined, table::COMMANDS.iter().map(|c| c.name))
                            };
                            return Err(Error::usage(format!(
                                "unknown command '{joined}'{hint} (see 'thinimg --help')"
                            )));
                        }
                    }
                    Some(c) => {
                        // `runs show 3`: a longer command that starts with this one.
                        let longer = format!("{} {s}", c.name);
                        match table::find_command(&longer) {
                            Some(l) if words.is_empty() => command = Some(l),
                            _ => words.push(s),
                        }
                    }
                }
                continue;
            }
        };
        let Some(flag) = flag else {
            let (ctx, see) = match command {
                Some(c) => (format!(" for '{}'", c.name), format!("thinimg {} --help", c.name)),
                None => (String::new(), "thinimg --help".to_string()),
            };
            let hint = match &arg {
                Long(l) => did_you_mean_as(l, table::flags_of(command).map(|f| f.long), "--"),
                _ => String::new(),
            };
            return Err(Error::usage(format!("unknown option {display}{ctx}{hint} (see '{see}')")));
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
            flag.kind.check(&v).map_err(|m| Error::usage(format!("{display} {v:?} {m}")))?;
            cli_values.insert(flag.long, v);
        }
    }

    if version {
        return Ok(Parsed::Version);
    }
    if let Some(hw) = help_words {
        return help_for(&hw.join(" ")).map(Parsed::Help);
    }
    if help {
        return match command {
            Some(c) => Ok(Parsed::Help(help::render(Some(c)))),
            None if !words.is_empty() => help_for(&words.join(" ")).map(Parsed::Help),
            None => Ok(Parsed::Help(help::render(None))),
        };
    }
    let Some(command) = command else {
        if words.is_empty() {
            return Ok(Parsed::Usage(format!("thinimg: no command given\n\n{}", help::render(None))));
        }
        let joined = words.join(" ");
        return Ok(Parsed::Usage(format!("thinimg: incomplete command '{joined}'\n\n{}", help::render_group(&joined))));
    };
    if words.len() < command.min_args {
        return Err(Error::usage(format!(
            "'{}' needs {} (usage: thinimg {} {}; see 'thinimg {} --help')",
            command.name, command.args, command.name, command.args, command.name
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
    let config_path = cli_values.get("config").cloned().or_else(|| env("THINIMG_CONFIG").filter(|s| !s.is_empty()));
    let file = match &config_path {
        Some(p) => Some(load_config(p)?),
        None => {
            let def = table_default("config");
            if std::path::Path::new(def).exists() {
                Some(load_config(def)?)
            } else {
                None
            }
        }
    };
    // Every key of the file is checked, whichever command reads it.
    let mut config_errors = Vec::new();
    let mut file = file;
    if let Some(f) = file.as_mut() {
        config_errors = f.validate();
    }
    if !config_errors.is_empty() && !matches!(command.name, "doctor") {
        let n = config_errors.len();
        let more = if n > 1 { format!(" (and {} more; see 'thinimg config check')", n - 1) } else { String::new() };
        return Err(Error::new(crate::error::Kind::Config, format!("{}{more}", config_errors[0])));
    }

    let mut values = BTreeMap::new();
    let mut switches = BTreeMap::new();
    let mut sources = BTreeMap::new();
    // `config show` and `config check` resolve every key any command reads.
    let all: Vec<&'static Flag> = if command.name.starts_with("config ") {
        let mut v: Vec<&'static Flag> = Vec::new();
        for f in table::GLOBAL.iter().chain(table::COMMANDS.iter().flat_map(|c| c.flags.iter().flat_map(|g| g.iter())))
        {
            if (f.config || table::GLOBAL.iter().any(|g| g.long == f.long)) && !v.iter().any(|g| g.long == f.long) {
                v.push(f);
            }
        }
        v
    } else {
        table::flags_of(Some(command)).collect()
    };
    for f in &all {
        let from_env = f.env.and_then(|e| env(e).map(|v| (e, v)));
        let from_file = if f.config { file.as_ref().and_then(|c| c.entries.get(f.long)) } else { None };
        if is_switch(f) {
            let mut n = cli_switches.get(f.long).copied().unwrap_or(0);
            let mut src = if n > 0 { Some("command line".to_string()) } else { None };
            if n == 0 {
                if let Some((e, v)) = &from_env {
                    n = truthy(v).map_err(|m| Error::usage(format!("environment {e}: {m}")))? as u32;
                    src = Some(format!("environment {e}"));
                } else if let Some((line, v)) = from_file {
                    n = truthy(v).map_err(|m| {
                        Error::new(
                            crate::error::Kind::Config,
                            format!("{}:{line}: {m}", file.as_ref().map(|c| c.path.as_str()).unwrap_or("?")),
                        )
                    })? as u32;
                    src = Some(format!("{}:{line}", file.as_ref().map(|c| c.path.as_str()).unwrap_or("?")));
                }
            }
            if n > 0 {
                switches.insert(f.long, n);
            }
            sources.insert(f.long, src.unwrap_or_else(|| "default".to_string()));
        } else {
            let resolved: Option<(String, String)> = if let Some(v) = cli_values.get(f.long) {
                Some((v.clone(), "command line".into()))
            } else if let Some((e, v)) = from_env.filter(|(_, v)| !v.is_empty()) {
                f.kind.check(&v).map_err(|m| Error::usage(format!("environment {e}={v:?}: {m}")))?;
                Some((v, format!("environment {e}")))
            } else if let Some((line, v)) = from_file {
                Some((v.clone(), format!("{}:{line}", file.as_ref().map(|c| c.path.as_str()).unwrap_or("?"))))
            } else {
                f.default.map(|d| (d.to_string(), "default".into()))
            };
            if let Some((v, src)) = resolved {
                values.insert(f.long, v);
                sources.insert(f.long, src);
            }
        }
    }
    if let Some(p) = config_path {
        values.insert("config", p);
    }
    // State and run dirs are absolute from here on (canonical when they
    // exist), so nothing relative to the caller's cwd is ever recorded.
    for k in ["state-dir", "run-dir"] {
        if let Some(v) = values.get(k) {
            let abs = crate::ops::lock::absolute_dir(std::path::Path::new(v))
                .map_err(|e| Error::io(format!("resolving the {} {v:?} (--{k})", k.replace('-', " ")), e))?;
            values.insert(k, abs.to_string_lossy().into_owned());
        }
    }
    Ok(Parsed::Run(Invocation { command, args: words, values, switches, sources, config_errors }))
}

/// `thinimg help WORDS` / `thinimg WORDS --help`: a command's help, or a group's.
fn help_for(words: &str) -> Result<String> {
    if words.is_empty() {
        return Ok(help::render(None));
    }
    if let Some(c) = table::find_command(words) {
        return Ok(help::render(Some(c)));
    }
    if !group_of(words).is_empty() {
        return Ok(help::render_group(words));
    }
    let hint = did_you_mean(words, table::COMMANDS.iter().map(|c| c.name).chain(command_words()));
    Err(Error::usage(format!("no help for '{words}': not a command{hint} (see 'thinimg --help')")))
}

fn usage_err(e: lexopt::Error) -> Error {
    Error::usage(e.to_string())
}

/// A loaded config file: key → (line, value).
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: String,
    pub entries: BTreeMap<String, (usize, String)>,
}

impl ConfigFile {
    /// Check every key and value against the table; return one message per
    /// problem (`FILE:LINE: ...`) and drop the bad entries.
    fn validate(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let known: Vec<&'static Flag> = table::GLOBAL
            .iter()
            .chain(table::COMMANDS.iter().flat_map(|c| c.flags.iter().flat_map(|g| g.iter())))
            .filter(|f| f.config)
            .collect();
        let mut bad = Vec::new();
        for (k, (line, v)) in &self.entries {
            match known.iter().find(|f| f.long == k) {
                None => {
                    let hint = did_you_mean(k, known.iter().map(|f| f.long));
                    errors.push(format!("{}:{line}: unknown key '{k}'{hint}", self.path));
                    bad.push(k.clone());
                }
                Some(f) => {
                    if let Err(m) = f.kind.check(v) {
                        errors.push(format!("{}:{line}: {k} = {v:?}: {m}", self.path));
                        bad.push(k.clone());
                    }
                }
            }
        }
        for k in bad {
            self.entries.remove(&k);
        }
        errors
    }
}

fn load_config(path: &str) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("config file {path}"), e).with_kind(crate::error::Kind::Config))?;
    let mut entries = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(Error::new(crate::error::Kind::Config, format!("{path}:{}: expected 'key = value'", i + 1)));
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
        assert!(matches!(parse_env(&["pool"], &[]), Ok(Parsed::Usage(t)) if t.contains("pool create")));
        for bad in [
            &["nope"][..],
            &["fetch"][..],
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
        // Bare `thinimg` is a usage error (stderr, 64), not a success.
        assert!(matches!(parse_env(&[], &[]), Ok(Parsed::Usage(_))));
        assert!(matches!(parse_env(&["help"], &[]), Ok(Parsed::Help(t)) if t.contains("Exit codes:")));
        assert!(matches!(parse_env(&["help", "pool", "create"], &[]), Ok(Parsed::Help(t)) if t.contains("--data-dev")));
        assert!(matches!(parse_env(&["pool", "--help"], &[]), Ok(Parsed::Help(t)) if t.contains("pool status")));
        assert!(parse_env(&["help", "nope"], &[]).is_err());
    }

    #[test]
    fn typed_values_are_checked_at_parse_time_from_every_source() {
        let err = |args: &[&str], env: &[(&str, &str)]| match parse_env(args, env) {
            Err(e) => e,
            Ok(p) => panic!("{args:?} {env:?} parsed: {p:?}"),
        };
        // Counts take no suffix and have a range; durations take units, sizes take K/M/G/T.
        for args in [
            &["fetch", "--download-jobs", "0", "x"][..],
            &["fetch", "--download-jobs", "4K", "x"][..],
            &["fetch", "--download-jobs", "65", "x"][..],
            &["sync", "--unpack-jobs", "-1", "x"][..],
            &["pull", "--jobs", "0", "x"][..],
            &["--wait", "10K", "gc"][..],
            &["--wait", "8d", "gc"][..],
            &["pull", "--device-size", "1M", "x"][..],
            &["pull", "--block-size", "64", "x"][..],
            &["--endpoint", "ftp://x", "ls-remote"][..],
            &["--bucket", "a b", "ls-remote"][..],
        ] {
            assert_eq!(err(args, &[]).kind(), crate::error::Kind::Usage, "{args:?}");
        }
        assert_eq!(err(&["gc"], &[("THINIMG_WAIT", "5x")]).kind(), crate::error::Kind::Usage);
        let i = inv(&["--wait", "5m", "gc"]);
        assert_eq!(i.u64_opt("wait").ok().flatten(), Some(300));
        for (w, secs) in [("600", 600), ("10s", 10), ("1h", 3600), ("2d", 172_800)] {
            assert_eq!(inv(&["--wait", w, "gc"]).u64_opt("wait").ok().flatten(), Some(secs), "{w}");
        }
    }

    #[test]
    fn config_values_are_checked_for_every_command_with_file_and_line() {
        let dir = std::env::temp_dir().join(format!("thinimg-cfgv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.conf");
        // download-jobs is not read by ls-remote or status, but is still checked.
        std::fs::write(&f, "bucket = ok-bucket\n\ndownload-jobs = lots\n").unwrap();
        let fs = f.to_str().unwrap();
        for cmd in [&["ls-remote"][..], &["status"][..], &["config", "check"][..]] {
            let args: Vec<&str> = ["--config", fs].iter().chain(cmd.iter()).copied().collect();
            match parse_env(&args, &[]) {
                Err(e) => {
                    assert_eq!(e.kind(), crate::error::Kind::Config, "{cmd:?}");
                    assert!(e.message().contains(&format!("{fs}:3")), "{}", e.message());
                }
                Ok(p) => panic!("{cmd:?} parsed: {p:?}"),
            }
        }
        // doctor reports it instead of failing.
        let Ok(Parsed::Run(d)) = parse_env(&["--config", fs, "doctor"], &[]) else { panic!() };
        assert_eq!(d.config_errors.len(), 1);
        // Unknown keys suggest the known one.
        std::fs::write(&f, "download-jobz = 8\n").unwrap();
        let e = parse_env(&["--config", fs, "status"], &[]).unwrap_err();
        assert!(e.message().contains("did you mean 'download-jobs'"), "{}", e.message());
        // config show knows where each value came from.
        std::fs::write(&f, "bucket = from-file\n").unwrap();
        let Ok(Parsed::Run(i)) = parse_env(&["--config", fs, "config", "show"], &[("THINIMG_PREFIX", "p/")]) else {
            panic!()
        };
        assert_eq!(i.source("bucket"), Some(format!("{fs}:1").as_str()));
        assert_eq!(i.source("prefix"), Some("environment THINIMG_PREFIX"));
        assert_eq!(i.source("download-jobs"), Some("default"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn suggestions_for_typos() {
        assert!(did_you_mean("stauts", command_words()).contains("'status'"));
        assert!(did_you_mean("fecth", command_words()).contains("'fetch'"));
        assert_eq!(did_you_mean("zzzzzz", command_words()), "");
        let e = parse_env(&["gc", "--dryrun"], &[]).unwrap_err();
        assert!(e.message().contains("'--dry-run'"), "{}", e.message());
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
        assert_eq!(parse_duration("5m"), Ok(300));
        assert!(parse_duration("5M").is_err());
        assert_eq!(show_size(64 << 20), "64M");
        assert_eq!(show_duration(7 * 86400), "7d");
    }
}
