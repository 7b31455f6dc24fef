//! The generated documents against the real binary: the checked-in man
//! pages, default config and bash completion must be exactly what
//! `thinimg generate` prints; `--help` and the man page must list the same
//! commands and flags; the man pages must render without groff warnings;
//! the completion must complete; the packaged config must parse; and the
//! command lines in the systemd unit, the cron file and the README must be
//! accepted by the parser.
//!
//! Needs `bash` and `groff` (package groff-base); a missing tool fails the
//! test with its name, it is never skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_thinimg");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap_or_else(|e| panic!("running {BIN}: {e}"));
    assert!(out.status.success(), "thinimg {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

fn tool(name: &str, package: &str) -> Command {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file())).unwrap_or(false);
    assert!(found, "{name} is not installed; this test needs it (apt-get install {package})");
    Command::new(name)
}

#[test]
fn checked_in_documents_are_the_binarys_output() {
    for (what, rel) in thinimg::cli::docs::GENERATED {
        let generated = run(&["generate", what]);
        let file = read(rel);
        if generated != file {
            let line = generated.lines().zip(file.lines()).position(|(a, b)| a != b).map(|i| i + 1);
            panic!(
                "{rel} differs from 'thinimg generate {what}' (first differing line: {line:?}); \
                 run 'make man' and commit the result"
            );
        }
    }
}

#[test]
fn generate_rejects_unknown_documents() {
    let out = Command::new(BIN).args(["generate", "pdf"]).output().expect("run");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

// ------------------------------------------------- help vs man page --

/// `-j/--jobs` or `--jobs`, from an option line of --help or a roff tag.
fn flag_names(line: &str) -> Option<String> {
    let mut short = None;
    for tok in line.split_whitespace() {
        let tok = tok.trim_end_matches(',');
        if let Some(long) = tok.strip_prefix("--") {
            return Some(match short {
                Some(s) => format!("-{s}/--{long}"),
                None => format!("--{long}"),
            });
        } else if let Some(s) = tok.strip_prefix('-') {
            short = Some(s.to_string());
        } else {
            return None;
        }
    }
    None
}

/// The flags listed under `heading` in --help output (until a blank line).
fn help_section(text: &str, heading: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        if line == heading {
            inside = true;
        } else if inside && line.trim().is_empty() {
            break;
        } else if inside && line.trim_start().starts_with('-') {
            out.insert(flag_names(line.trim()).unwrap_or_else(|| panic!("unparsable help line {line:?}")));
        }
    }
    out
}

fn unroff(s: &str) -> String {
    s.replace("\\fB", "").replace("\\fI", "").replace("\\fR", "").replace("\\-", "-").replace("\\(aq", "'")
}

/// The man page as sections (`.SH`) of subsections (`.SS`, "" before the first).
fn man_structure(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let (mut sh, mut ss) = (String::new(), String::new());
    for line in text.lines() {
        if let Some(h) = line.strip_prefix(".SH ") {
            sh = unroff(h.trim_matches('"'));
            ss.clear();
        } else if let Some(h) = line.strip_prefix(".SS ") {
            ss = unroff(h.trim_matches('"'));
        }
        out.entry(sh.clone()).or_default().entry(ss.clone()).or_default().push(line.to_string());
    }
    out
}

/// Flags documented as `.TP` items in a block of roff lines.
fn man_flags(lines: &[String]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for w in lines.windows(2) {
        if w[0] == ".TP" && w[1].starts_with("\\fB\\-") {
            out.insert(flag_names(&unroff(&w[1])).unwrap_or_else(|| panic!("unparsable man tag {:?}", w[1])));
        }
    }
    out
}

#[test]
fn help_and_man_page_list_the_same_commands_and_flags() {
    let top = run(&["--help"]);
    let man = man_structure(&read("man/thinimg.8"));

    let man_globals = man_flags(&man["GLOBAL OPTIONS"][""]);
    assert!(man_globals.contains("--state-dir") && man_globals.contains("-V/--version"), "{man_globals:?}");
    assert_eq!(help_section(&top, "Global options:"), man_globals, "global options: --help (left) vs man page (right)");

    // Command names from the "Commands:" list of --help: the lower-case words.
    let mut help_commands = Vec::new();
    let mut inside = false;
    for line in top.lines() {
        if line == "Commands:" {
            inside = true;
        } else if inside && line.trim().is_empty() {
            break;
        } else if inside {
            let head = line.trim_start().split("  ").next().unwrap_or("");
            let name: Vec<&str> =
                head.split(' ').take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-')).collect();
            help_commands.push(name.join(" "));
        }
    }
    let commands = &man["COMMANDS"];
    let man_commands: BTreeSet<String> = commands.keys().filter(|k| !k.is_empty()).cloned().collect();
    assert_eq!(help_commands.iter().cloned().collect::<BTreeSet<_>>(), man_commands, "commands: --help vs man");
    assert!(help_commands.len() >= 18, "{help_commands:?}");

    let shared = &man["SHARED OPTIONS"];
    for name in &help_commands {
        let mut argv: Vec<&str> = name.split(' ').collect();
        argv.push("--help");
        let help = run(&argv);
        assert_eq!(help_section(&help, "Global options:"), man_globals, "global options in 'thinimg {name} --help'");
        let help_own = help_section(&help, "Options:");

        let block = &commands[name];
        let mut man_own = man_flags(block);
        for line in block.iter().filter(|l| l.starts_with("Also takes the ")) {
            for group in line.split("\\fI").skip(1).filter_map(|s| s.split("\\fR").next()) {
                let group = unroff(group);
                let lines = shared.get(&group).unwrap_or_else(|| panic!("{name}: no SHARED OPTIONS entry {group:?}"));
                man_own.extend(man_flags(lines));
            }
        }
        assert_eq!(help_own, man_own, "options of '{name}': --help (left) vs man page (right)");
    }
}

// ------------------------------------------------------- rendering --

#[test]
fn man_pages_render_without_groff_warnings() {
    for page in ["man/thinimg.8", "man/thinimg.conf.5"] {
        let out = tool("groff", "groff-base")
            .args(["-man", "-Tutf8", "-ww", "-P-cbou"])
            .arg(repo().join(page))
            .output()
            .expect("run groff");
        assert!(out.status.success(), "groff failed on {page}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "groff warns on {page}:\n{stderr}");
        let text = String::from_utf8_lossy(&out.stdout);
        for heading in ["NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"] {
            assert!(text.contains(heading), "{page} renders without {heading}");
        }
    }
    let out = tool("groff", "groff-base")
        .args(["-man", "-Tutf8", "-ww", "-P-cbou"])
        .arg(repo().join("man/thinimg.8"))
        .output()
        .expect("groff");
    let text = String::from_utf8_lossy(&out.stdout);
    for heading in [
        "COMMANDS",
        "GLOBAL OPTIONS",
        "CONFIGURATION FILE",
        "ENVIRONMENT",
        "FILES",
        "EXIT STATUS",
        "FAULT INJECTION",
        "EXAMPLES",
        "thinimg activate golang --name vm-42 --json",
    ] {
        assert!(text.contains(heading), "thinimg.8 renders without {heading:?}");
    }
}

#[test]
fn every_exit_code_and_config_key_is_in_the_man_pages() {
    let man8 = unroff(&read("man/thinimg.8"));
    let man5 = unroff(&read("man/thinimg.conf.5"));
    for (code, _) in thinimg::cli::table::EXIT_CODES {
        assert!(man8.contains(&format!(".TP\n{code}\n")), "exit code {code} missing from thinimg.8");
    }
    for (f, _) in thinimg::cli::docs::config_keys() {
        let item = format!(".TP\n{} = ", f.long);
        assert!(man8.contains(&item), "config key {} missing from thinimg.8", f.long);
        assert!(man5.contains(&item), "config key {} missing from thinimg.conf.5", f.long);
    }
}

// ------------------------------------------------ default config --

#[test]
fn packaged_config_parses_and_its_defaults_are_the_tables() {
    use thinimg::cli::{parse_with_env, Parsed};
    let text = read("packaging/thinimg.conf");
    let dir = std::env::temp_dir().join(format!("thinimg-docs-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // As shipped (everything commented out) it must be accepted.
    let shipped = dir.join("shipped.conf");
    std::fs::write(&shipped, &text).unwrap();
    let parsed = parse_with_env(["--config", shipped.to_str().unwrap(), "sync"], &|_| None);
    assert!(matches!(parsed, Ok(Parsed::Run(_))), "shipped config rejected: {parsed:?}");

    // Uncommenting every `# key = default` line must change nothing.
    let keys = thinimg::cli::docs::config_keys();
    let mut uncommented = String::new();
    let mut n = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# ") else { continue };
        let Some((k, _)) = rest.split_once(" = ") else { continue };
        if let Some((f, _)) = keys.iter().find(|(f, _)| f.long == k) {
            if f.value.is_none() || f.default.is_some() {
                uncommented.push_str(rest);
                uncommented.push('\n');
                n += 1;
            }
        }
    }
    assert!(n >= 15, "only {n} keys with defaults found:\n{uncommented}");
    let all = dir.join("all.conf");
    std::fs::write(&all, &uncommented).unwrap();
    let Ok(Parsed::Run(inv)) = parse_with_env(["--config", all.to_str().unwrap(), "sync"], &|_| None) else {
        panic!("uncommented config rejected:\n{uncommented}")
    };
    for (f, users) in &keys {
        if users.as_ref().is_some_and(|u| !u.contains(&"sync")) {
            continue;
        }
        match (f.value, f.default) {
            (None, _) => assert!(!inv.flag(f.long), "{} became true", f.long),
            (Some(_), Some(d)) => assert_eq!(inv.get(f.long), Some(d), "{}", f.long),
            (Some(_), None) => assert_eq!(inv.get(f.long), None, "{}", f.long),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------ bash completion --

fn complete(script: &Path, cwd: &Path, cases: &[&[&str]]) -> Vec<String> {
    let mut prog = format!("source '{}'\n", script.display());
    prog.push_str(
        "c() { COMP_WORDS=(\"$@\"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); _thinimg; \
         printf '%s\\n' \"$(printf '%s\\n' \"${COMPREPLY[@]}\" | sort | tr '\\n' ' ')\"; }\n",
    );
    for words in cases {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        prog.push_str(&format!("c {}\n", quoted.join(" ")));
    }
    let out = tool("bash", "bash").arg("-c").arg(&prog).env("LC_ALL", "C").current_dir(cwd).output().expect("run bash");
    assert!(out.status.success(), "bash failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim_end().to_string()).collect()
}

#[test]
fn bash_completion_completes_commands_flags_and_paths() {
    let dir = std::env::temp_dir().join(format!("thinimg-docs-bash-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("state1")).unwrap();
    std::fs::create_dir_all(dir.join("state 2")).unwrap();
    std::fs::create_dir_all(dir.join("layers")).unwrap();
    std::fs::write(dir.join("statefile"), "").unwrap();
    std::fs::write(dir.join("layers/1.tar"), "").unwrap();
    std::fs::write(dir.join("layers/notes.txt"), "").unwrap();
    let script = dir.join("thinimg.bash");
    std::fs::write(&script, run(&["generate", "bash"])).unwrap();

    let got = complete(
        &script,
        &dir,
        &[
            &["thinimg", ""],
            &["thinimg", "po"],
            &["thinimg", "pool", ""],
            &["thinimg", "pool", "create", "--d"],
            &["thinimg", "--log-format", ""],
            &["thinimg", "activate", "-n", "vm", "--na"],
            &["thinimg", "activate", "-n", ""],
            &["thinimg", "gc", "-n", "--dr"],
            &["thinimg", "--state-dir", "/x", "sync", "--al"],
            &["thinimg", "--state-dir", "sta"],
            &["thinimg", "unpack", "layers/"],
            &["thinimg", "images", "--ver"],
            &["thinimg", "runs", ""],
            &["thinimg", "runs", "show", "--al"],
            &["thinimg", "help", "ver"],
            &["thinimg", "config", ""],
        ],
    );
    let first = got[0].split(' ').collect::<Vec<_>>();
    for c in ["activate", "pool", "sync", "ls-remote", "doctor"] {
        assert!(first.contains(&c), "'thinimg <TAB>' lacks {c}: {}", got[0]);
    }
    assert!(!first.contains(&"create"), "'thinimg <TAB>' offers a second word: {}", got[0]);
    let want = [
        "pool",
        "assemble create destroy status",
        "--data-dev --data-size --device-size",
        "json text",
        "--name",
        "",
        "--dry-run",
        "--all",
        "state 2 state1",
        "layers/1.tar",
        "--verbose --version",
        "show",
        "",
        "version",
        "check show",
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(got[i + 1], *w, "case {}", i + 1);
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------- command lines in shipped files --

/// Every `thinimg ...` command line in `text`, cut at shell syntax.
fn command_lines(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line;
        while let Some(i) = rest.find("thinimg ") {
            let before = &rest[..i];
            rest = &rest[i + "thinimg ".len()..];
            // Only the program itself: "/usr/sbin/thinimg", "$ thinimg", "&& thinimg", "`thinimg".
            if !(before.is_empty() || before.ends_with(['/', ' ', '`', '(', '='])) {
                continue;
            }
            // Up to shell syntax or the end of a `code span`.
            let mut words: Vec<String> = Vec::new();
            for w in rest.split_whitespace() {
                if matches!(w, "&&" | "||" | "|" | ";" | ">" | "2>&1") || w.starts_with(['#', '`', ')']) {
                    break;
                }
                match w.split_once('`') {
                    Some((head, _)) => {
                        if !head.is_empty() {
                            words.push(head.to_string());
                        }
                        break;
                    }
                    None => words.push(w.trim_end_matches([';', ')']).to_string()),
                }
            }
            let is_command = |w: &String| {
                w.starts_with('-')
                    || thinimg::cli::table::COMMANDS.iter().any(|c| c.name.split(' ').next() == Some(w.as_str()))
            };
            if words.first().is_some_and(is_command) {
                out.push(words);
            }
        }
    }
    out
}

#[test]
fn command_lines_in_unit_cron_and_readme_are_valid() {
    let mut checked = 0;
    for rel in ["packaging/thinimg-sync.service", "packaging/thinimg.cron", "README.md"] {
        for words in command_lines(&read(rel)) {
            // Placeholders and shell expansions cannot be checked literally.
            if words.iter().any(|w| w.contains(['$', '<', '[', '\\', '"', '\'']) || w == "...") {
                continue;
            }
            if words.first().is_some_and(|w| w == "generate" || w == "help") {
                continue;
            }
            let mut argv = words.clone();
            argv.push("--help".to_string());
            let out = Command::new(BIN).args(&argv).output().expect("run");
            assert!(
                out.status.success(),
                "{rel}: 'thinimg {}' is not accepted: {}",
                words.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} command lines found");
}

#[test]
fn readme_covers_every_command_and_exit_code() {
    let readme = read("README.md");
    let first: Vec<&str> = readme.lines().skip_while(|l| !l.starts_with("```")).skip(1).take(2).collect();
    assert!(first[0].starts_with("make demo "), "README must start with make demo: {first:?}");
    assert!(first[1].starts_with("make check "), "README must then give make check: {first:?}");
    for c in thinimg::cli::table::COMMANDS {
        assert!(readme.contains(&format!("thinimg {}", c.name)), "README does not mention 'thinimg {}'", c.name);
    }
    for (code, _) in thinimg::cli::table::EXIT_CODES {
        assert!(readme.contains(&format!("\n| {code} | ")), "README's exit code table lacks {code}");
    }
}
