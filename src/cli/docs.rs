//! Documents generated from the flag table (`thinimg generate WHAT`): the
//! man pages thinimg(8) and thinimg.conf(5), the commented default config
//! file and the bash completion.
//!
//! The outputs are checked in (`man/`, `packaging/`) and a test compares
//! them with what the binary prints, so help, man page, config file and
//! completion cannot drift from the parser. This module only formats text:
//! it never reads the environment, a file or the state directory, and its
//! output depends on nothing but the table and the crate version (so
//! packages built from the same source are byte-identical).

use std::fmt::Write;

use super::table::{self, Command, Flag};

/// The documents `thinimg generate` knows, with the path each is checked in at.
pub const GENERATED: &[(&str, &str)] = &[
    ("man", "man/thinimg.8"),
    ("man-conf", "man/thinimg.conf.5"),
    ("conf", "packaging/thinimg.conf"),
    ("bash", "packaging/thinimg.bash"),
];

/// Render one of [`GENERATED`] by name.
pub fn generate(what: &str) -> Option<String> {
    match what {
        "man" => Some(man_page()),
        "man-conf" => Some(conf_man_page()),
        "conf" => Some(default_config()),
        "bash" => Some(bash_completion()),
        _ => None,
    }
}

const DEFAULT_CONFIG: &str = "/etc/thinimg/thinimg.conf";

// ---------------------------------------------------------------- roff --

/// Escape running text for roff: backslashes, dashes (so options survive
/// copy and paste as ASCII), quotes that groff would curl, and a leading
/// control character that would make the line a request.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\e"),
            '-' => o.push_str("\\-"),
            '\'' => o.push_str("\\(aq"),
            '`' => o.push_str("\\(ga"),
            '"' => o.push_str("\\(dq"),
            _ => o.push(c),
        }
    }
    if o.starts_with('.') {
        o.insert_str(0, "\\&");
    }
    o
}

fn bold(s: &str) -> String {
    format!("\\fB{}\\fR", esc(s))
}

fn ital(s: &str) -> String {
    format!("\\fI{}\\fR", esc(s))
}

/// `[REF...]` → `[\fIREF\fR...]`: placeholders italic, punctuation roman.
fn args_roff(args: &str) -> String {
    args.split_whitespace()
        .map(|tok| {
            let (open, rest) = tok.strip_prefix('[').map_or(("", tok), |r| ("[", r));
            let (rest, close) = rest.strip_suffix(']').map_or((rest, ""), |r| (r, "]"));
            let (word, dots) = rest.strip_suffix("...").map_or((rest, ""), |r| (r, "..."));
            format!("{open}{}{dots}{close}", ital(word))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A block of literal lines (shell examples), indented and unfilled.
fn example(o: &mut String, lines: &[&str]) {
    o.push_str(".PP\n.RS 4\n.nf\n");
    for l in lines {
        let _ = writeln!(o, "{}", if l.is_empty() { String::new() } else { esc(l) });
    }
    o.push_str(".fi\n.RE\n");
}

fn para(o: &mut String, text: &str) {
    let _ = writeln!(o, ".PP\n{}", esc(text));
}

fn flag_head(f: &Flag) -> String {
    let mut head = String::new();
    if let Some(c) = f.short {
        let _ = write!(head, "{}, ", bold(&format!("-{c}")));
    }
    head.push_str(&bold(&format!("--{}", f.long)));
    if let Some(v) = f.value {
        let _ = write!(head, " {}", ital(v));
    }
    head
}

fn man_flag(o: &mut String, f: &Flag) {
    let _ = writeln!(o, ".TP\n{}", flag_head(f));
    let mut help = esc(f.help);
    if let Some(r) = f.kind.describe() {
        let _ = write!(help, " {}", esc(&r));
    }
    if let Some(d) = f.default {
        let _ = write!(help, " Default: {}.", bold(d));
    }
    if let Some(e) = f.env {
        let _ = write!(help, " Environment: {}.", bold(e));
    }
    if f.config {
        let _ = write!(help, " Config key: {}.", bold(f.long));
    }
    let _ = writeln!(o, "{help}");
}

/// Flag groups that several commands share: documented once, under a name.
const SHARED: &[(&[Flag], &str)] =
    &[(table::DOWNLOAD, "download options"), (table::EXTRACT, "unpack options"), (table::POOL_SIZE, "pool options")];

/// Groups are compared by their flags' names: a static's address is not
/// guaranteed to be the same at every use.
fn same_group(a: &[Flag], b: &[Flag]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.long == y.long)
}

fn shared_group(g: &[Flag]) -> Option<&'static str> {
    SHARED.iter().find(|(s, _)| same_group(s, g)).map(|(_, name)| *name)
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn own_flags(c: &Command) -> impl Iterator<Item = &'static Flag> + '_ {
    c.flags.iter().flat_map(|g| g.iter())
}

/// Every key the config file accepts, in table order (globals first), with
/// the commands that read it (`None`: all of them).
pub fn config_keys() -> Vec<(&'static Flag, Option<Vec<&'static str>>)> {
    let mut keys: Vec<(&'static Flag, Option<Vec<&'static str>>)> =
        table::GLOBAL.iter().filter(|f| f.config).map(|f| (f, None)).collect();
    for c in table::COMMANDS {
        for f in own_flags(c).filter(|f| f.config) {
            match keys.iter_mut().find(|(k, _)| k.long == f.long) {
                Some((_, Some(users))) => users.push(c.name),
                Some((_, None)) => {}
                None => keys.push((f, Some(vec![c.name]))),
            }
        }
    }
    keys
}

fn mentions_default(f: &Flag) -> bool {
    f.help.to_ascii_lowercase().contains("default")
}

/// The default as the config file documents it: a switch is false, and a
/// value without default is left to the help text when it explains it.
fn default_note(f: &Flag) -> Option<String> {
    match (f.value, f.default) {
        (_, Some(d)) => Some(bold(d)),
        (None, None) => Some(bold("false")),
        (Some(_), None) if mentions_default(f) => None,
        (Some(_), None) => Some("unset".to_string()),
    }
}

fn used_by(users: &Option<Vec<&str>>) -> String {
    match users {
        None => "all commands".to_string(),
        Some(u) => u.join(", "),
    }
}

fn header(o: &mut String, what: &str, title: &str, section: u8, volume: &str) {
    let _ = writeln!(o, ".\\\" Generated by 'thinimg generate {what}' from the flag table. Do not edit.");
    let _ = writeln!(o, ".TH {title} {section} \"\" \"thinimg {}\" \"{volume}\"", env!("CARGO_PKG_VERSION"));
    // Hyphenated option names and paths would not survive copy and paste.
    o.push_str(".nh\n.ad l\n");
}

// ------------------------------------------------------------ thinimg.8 --

pub fn man_page() -> String {
    let mut o = String::new();
    header(&mut o, "man", "THINIMG", 8, "System Administration");

    o.push_str(".SH NAME\nthinimg \\- turn container images in S3 into devicemapper thin devices\n");

    o.push_str(".SH SYNOPSIS\n");
    let _ = writeln!(
        o,
        "{} [{}] {} [{}] [{}]",
        bold("thinimg"),
        ital("global options"),
        ital("command"),
        ital("options"),
        ital("args")
    );
    for c in table::COMMANDS {
        let mut line = format!(".br\n{} {}", bold("thinimg"), bold(c.name));
        if own_flags(c).next().is_some() {
            let _ = write!(line, " [{}]", ital("options"));
        }
        if !c.args.is_empty() {
            let _ = write!(line, " {}", args_roff(c.args));
        }
        let _ = writeln!(o, "{line}");
    }
    let _ = writeln!(o, ".br\n{} {} | {}", bold("thinimg"), bold("--help"), bold("--version"));

    o.push_str(".SH DESCRIPTION\n");
    for p in DESCRIPTION {
        para(&mut o, p);
    }

    o.push_str(".SH COMMANDS\n");
    para(
        &mut o,
        "Global options may be given before or after the command. A command that takes the write \
         lock holds an exclusive lock on the state directory while it runs (see --wait) and first \
         resumes the runs that an earlier invocation left unfinished. Read-only commands never wait \
         for the lock and see a consistent snapshot of the database.",
    );
    for c in table::COMMANDS {
        let _ = writeln!(o, ".SS \"{}\"", esc(c.name));
        let mut syn = format!("{} {}", bold("thinimg"), bold(c.name));
        if own_flags(c).next().is_some() {
            let _ = write!(syn, " [{}]", ital("options"));
        }
        if !c.args.is_empty() {
            let _ = write!(syn, " {}", args_roff(c.args));
        }
        let _ = writeln!(o, "{syn}");
        let _ = writeln!(o, ".PP\n{}", esc(c.summary));
        if !c.description.is_empty() {
            let _ = writeln!(o, "{}", esc(c.description));
        }
        let _ =
            writeln!(o, "{}", if c.writes { "Takes the write lock." } else { "Read\\-only; never takes the lock." });
        for f in c.flags.iter().filter(|g| shared_group(g).is_none()).flat_map(|g| g.iter()) {
            man_flag(&mut o, f);
        }
        let shared: Vec<String> = c.flags.iter().filter_map(|g| shared_group(g)).map(ital).collect();
        if !shared.is_empty() {
            let _ = writeln!(o, ".PP\nAlso takes the {} (see {}).", join_and(&shared), bold("SHARED OPTIONS"));
        }
    }

    o.push_str(".SH SHARED OPTIONS\n");
    para(&mut o, "Options that several commands take, with the same meaning in each.");
    for (group, name) in SHARED {
        let users: Vec<&str> =
            table::COMMANDS.iter().filter(|c| c.flags.iter().any(|g| same_group(g, group))).map(|c| c.name).collect();
        let _ = writeln!(o, ".SS \"{}\"", esc(name));
        let _ = writeln!(o, "Taken by {}.", esc(&users.join(", ")));
        for f in group.iter() {
            man_flag(&mut o, f);
        }
    }

    o.push_str(".SH GLOBAL OPTIONS\n");
    for f in table::GLOBAL {
        man_flag(&mut o, f);
    }

    o.push_str(".SH CONFIGURATION FILE\n");
    para(
        &mut o,
        &format!(
            "Settings are read from {DEFAULT_CONFIG}, or from the file named by --config or \
             THINIMG_CONFIG (which must then exist; a missing default file is ignored). Each line is \
             key = value, where key is a long option name without the dashes; blank lines and lines \
             starting with # are ignored, and a value may be enclosed in double quotes. Switches take \
             true/false (also 1/0, yes/no, on/off). Every key and value is checked when the file is \
             loaded, by every command: an unknown key or an invalid value exits 78 naming the file and \
             line (thinimg config check does only that); a key of another command is accepted and ignored. thinimg.conf(5) describes the file in full."
        ),
    );
    para(
        &mut o,
        "Precedence, highest first: the command line, then the option's environment variable, then \
         the configuration file, then the built-in default. An empty environment variable counts as \
         unset for an option with a value, and as false for a switch.",
    );
    para(&mut o, "Keys (see the options above for their meaning):");
    for (f, users) in config_keys() {
        let _ = writeln!(o, ".TP\n{} = {}", bold(f.long), ital(f.value.unwrap_or("true|false")));
        let mut line = format!("Default: {}.", default_note(f).unwrap_or_else(|| "unset".to_string()));
        if let Some(e) = f.env {
            let _ = write!(line, " Environment: {}.", bold(e));
        }
        let _ = write!(line, " Used by: {}.", esc(&used_by(&users)));
        let _ = writeln!(o, "{line}");
    }

    o.push_str(".SH ENVIRONMENT\n");
    for f in table::GLOBAL.iter().chain(table::COMMANDS.iter().flat_map(own_flags)) {
        if let Some(e) = f.env {
            let _ = writeln!(o, ".TP\n{}\nSets {}.", bold(e), bold(&format!("--{}", f.long)));
        }
    }
    for (k, v) in table::ENVIRONMENT {
        let _ = writeln!(o, ".TP\n{}\n{}", bold(k), esc(v));
    }

    o.push_str(".SH FILES\n");
    for (path, what) in FILES {
        let _ = writeln!(o, ".TP\n{}\n{}", ital(path), esc(what));
    }

    o.push_str(".SH EXIT STATUS\n");
    para(
        &mut o,
        "Exit codes follow sysexits(3), so scripts can tell a bad image (65, 66: do not retry until \
         the bucket changes) from a transient problem (69, 75: retry later) and from a host that \
         needs an operator (71, 77).",
    );
    for (code, what) in table::EXIT_CODES {
        let _ = writeln!(o, ".TP\n{}\n{}", bold(&code.to_string()), esc(what));
    }
    para(
        &mut o,
        "With --json, a failing command prints {\"error\": {\"kind\": ..., \"message\": ..., \
         \"exit_code\": ...}} on standard output; the message is also logged on standard error.",
    );

    o.push_str(".SH FAULT INJECTION\n");
    para(
        &mut o,
        "For crash testing only. THINIMG_FAULT=POINT makes the process kill itself with SIGKILL, \
         exactly as kill -9 would (no destructors, no flushing), when it reaches POINT. Points are \
         before:STEP and after:STEP at the boundaries of journaled steps, and named points inside \
         steps; a POINT ending in * matches every point with that prefix. THINIMG_FAULT_SKIP=N \
         lets the first N matching hits pass. The next invocation must then resume the run without \
         repeating finished work and without leaking devices, mounts or files.",
    );
    example(
        &mut o,
        &[
            "THINIMG_FAULT='after:*' THINIMG_FAULT_SKIP=3 thinimg pull golang; echo $?   # 137",
            "thinimg pull golang   # resumes the interrupted run",
        ],
    );

    o.push_str(".SH EXAMPLES\n");
    for (title, lines) in EXAMPLES {
        para(&mut o, title);
        example(&mut o, lines);
    }

    o.push_str(".SH SEE ALSO\n");
    let _ = writeln!(
        o,
        "{}(5), {}(8), {}(8), {}(8), {}(5), {}(5), {}(5), {}(3)",
        bold("thinimg.conf"),
        bold("dmsetup"),
        bold("thin_check"),
        bold("mkfs.ext4"),
        bold("systemd.timer"),
        bold("systemd.exec"),
        bold("crontab"),
        bold("sysexits")
    );
    o
}

const DESCRIPTION: &[&str] = &[
    "thinimg pulls the layer tarballs of container images from an S3 bucket, unpacks them into \
     ext4 filesystems on thin devices of one device-mapper thin-pool, and activates an image as a \
     writable thin snapshot that a virtual machine can boot from.",
    "An image is a folder under the bucket prefix (images/golang/) whose objects named N.tar are \
     its layers, applied in numeric order with OCI whiteout semantics. A reference to one key \
     (images/golang/3.tar) means that image up to and including that layer. Objects that are not \
     N.tar are reported and skipped; a gap in the numbering makes the image invalid.",
    "Downloaded objects are stored once per content, named by their SHA-256. Each prefix of an \
     image's layers (a layer chain, identified as in OCI) is one thin device: the first layer on \
     a new ext4, each later layer on a thin snapshot of its parent, so images that share base \
     layers share their devices. An activation is a writable snapshot of an image's top device \
     with a stable name.",
    "Every byte of a layer is treated as hostile: paths are resolved inside the image root by the \
     kernel (openat2 with RESOLVE_IN_ROOT), and limits on sizes, counts and path lengths are \
     checked before data is written. A layer that breaks a rule is rejected as a whole with a \
     message naming the layer, the entry and the rule.",
    "A SQLite database under the state directory is the single source of truth. Every operation \
     is a journaled run of idempotent steps that records its intent before touching the kernel; \
     the next invocation resumes an interrupted run after a crash, kill -9 or reboot, and gc \
     reconciles the database with the kernel. thinimg talks to device-mapper through \
     /dev/mapper/control directly and needs neither dmsetup, libdevmapper nor udev.",
    "Device work needs root (CAP_SYS_ADMIN), /dev/mapper/control and the dm-thin-pool kernel \
     module; unpacking needs mkfs.ext4 from e2fsprogs. Without --data-dev and --meta-dev the pool \
     lives on sparse loop files under the state directory, which is meant for development.",
    "On success commands are quiet apart from their result; --json prints results as JSON on \
     standard output. Log lines go to standard error, as text or as JSON lines (--log-format).",
];

const FILES: &[(&str, &str)] = &[
    (DEFAULT_CONFIG, "The configuration file; see thinimg.conf(5)."),
    ("/etc/thinimg/environment", "Optional KEY=value lines that thinimg-sync.service reads into its environment, such as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for a private bucket; keep it mode 0600."),
    ("/var/lib/thinimg/", "The state directory (--state-dir)."),
    ("/var/lib/thinimg/state.db", "The SQLite database: images, chains, devices, activations, the pool and the run journal. Back it up together with the pool's metadata device."),
    ("/var/lib/thinimg/blobs/sha256/", "Downloaded layer blobs, named by the SHA-256 of their content."),
    ("/var/lib/thinimg/lock", "Held (flock) by the one invocation that may write; it names its holder."),
    ("/run/thinimg/", "The run directory (--run-dir): device nodes and temporary mount points, cleared by a reboot."),
    ("/usr/lib/systemd/system/thinimg-sync.service", "Runs thinimg sync --all once; started by thinimg-sync.timer."),
    ("/usr/lib/systemd/system/thinimg-sync.timer", "Starts the sync every 15 minutes with a random per-host delay (not enabled by the package)."),
    ("/usr/lib/systemd/system/thinimg-pool.service", "Runs thinimg pool assemble at boot: the pool and every active activation back in the kernel (not enabled by the package)."),
    ("/usr/share/doc/thinimg/examples/thinimg.cron", "The same schedule as a cron.d file, for hosts without systemd."),
];

const EXAMPLES: &[(&str, &[&str])] = &[
    (
        "Activate an image for a VM from a provisioning script. A second call with the same name \
         does no device-mapper work and prints the same answer, so the script may simply be re-run:",
        &[
            "out=$(thinimg activate golang --name vm-42 --json --wait 300)",
            "rc=$?",
            "case $rc in",
            "0)  ;;                      # $out describes the activation and its device",
            "75) exit 75 ;;              # busy or short of pool space: retry later",
            "*)  echo \"activate failed ($rc): $out\" >&2; exit 1 ;;",
            "esac",
        ],
    ),
    (
        "Set up a host whose pool lives on LVM logical volumes (after installing the package), so \
         that the pool and its activations come back by themselves after every reboot:",
        &[
            "lvcreate -n thinimg-meta -L 64M vg0",
            "lvcreate -n thinimg-data -l 100%FREE vg0",
            "# in /etc/thinimg/thinimg.conf: bucket, endpoint,",
            "#   data-dev = /dev/vg0/thinimg-data, meta-dev = /dev/vg0/thinimg-meta",
            "thinimg pool create",
            "systemctl enable thinimg-pool.service",
        ],
    ),
    (
        "Keep every image of the bucket current with the packaged systemd timer (a random delay of up \
         to 10 minutes per host spreads a fleet's requests):",
        &[
            "systemctl enable --now thinimg-sync.timer",
            "systemctl list-timers thinimg-sync.timer",
            "journalctl -u thinimg-sync.service",
        ],
    ),
    (
        "Or from cron, as in /usr/share/doc/thinimg/examples/thinimg.cron:",
        &["*/15 * * * * root sleep $(shuf -i 0-599 -n 1) && /usr/sbin/thinimg sync --all --wait 600 --quiet"],
    ),
    (
        "Use a private bucket on an S3-compatible server, with credentials from a profile:",
        &[
            "AWS_PROFILE=images thinimg --endpoint https://s3.example.net \\",
            "    --bucket fleet-images --prefix images/ sync --all",
        ],
    ),
    (
        "Only keep the images listed in a file, and remove the others that have no activations:",
        &["thinimg sync --from /etc/thinimg/wanted --prune"],
    ),
    (
        "After a reboot or a crash: see what is in flight and what gc would remove, then let it:",
        &["thinimg status", "thinimg runs", "thinimg doctor", "thinimg gc --dry-run && thinimg gc"],
    ),
    (
        "Look inside layers without a pool (as root, to keep ownership and device nodes):",
        &["thinimg unpack --dest /tmp/root 1.tar 2.tar 3.tar"],
    ),
];

// ------------------------------------------------------- thinimg.conf.5 --

pub fn conf_man_page() -> String {
    let mut o = String::new();
    header(&mut o, "man-conf", "THINIMG.CONF", 5, "File Formats");
    o.push_str(".SH NAME\nthinimg.conf \\- configuration file of thinimg\n");
    let _ = writeln!(o, ".SH SYNOPSIS\n{}", ital(DEFAULT_CONFIG));
    o.push_str(".SH DESCRIPTION\n");
    para(
        &mut o,
        "thinimg(8) reads its settings from this file, from environment variables and from the \
         command line. Every key is the long name of a command-line option without the leading \
         dashes and means exactly what that option means; the packaged file lists every key with \
         its default, commented out.",
    );
    para(
        &mut o,
        "Another file can be named with --config FILE or THINIMG_CONFIG=FILE; it must then exist. \
         The default file may be absent.",
    );
    o.push_str(".SH FORMAT\n");
    para(
        &mut o,
        "One key = value per line. Space around the = and at the ends of the line is ignored. A value \
         may be enclosed in double quotes, which are removed. Blank lines and lines whose first \
         non-blank character is # are ignored; a # later in a line is part of the value. When a key \
         appears twice, the last line wins. Sizes take the suffixes K, M, G and T (powers of 1024); \
         durations take s, m, h and d (600, 10s, 5m, 1h); counts are plain numbers. \
         Switches take true, yes, on or 1, and false, no, off, 0 or an empty value.",
    );
    para(
        &mut o,
        "Every key and value is checked when the file is loaded, whichever command runs: a key that \
         no command knows, or a value that is not valid for its key (a size, a count out of range, a \
         duration), is an error (exit status 78) naming the file and line. Keys that only some \
         commands read are accepted by all and ignored by the others, so one file serves every \
         command. thinimg config check checks the file; thinimg config show prints every setting's \
         effective value and where it came from.",
    );
    o.push_str(".SH PRECEDENCE\n");
    para(
        &mut o,
        "For each setting the first of these that is present wins: the command-line option; its \
         environment variable, if it has one (an empty value counts as unset for an option with a \
         value, and as false for a switch); this file; the built-in default. Options that only make sense for one invocation (--json, --quiet, --name, \
         --dest, ...) cannot be set here.",
    );
    o.push_str(".SH KEYS\n");
    for (f, users) in config_keys() {
        let _ = writeln!(o, ".TP\n{} = {}", bold(f.long), ital(f.value.unwrap_or("true|false")));
        let mut line = esc(f.help);
        if let Some(d) = default_note(f) {
            let _ = write!(line, " Default: {}.", d);
        }
        if let Some(e) = f.env {
            let _ = write!(line, " Environment: {}.", bold(e));
        }
        let _ = write!(line, " Used by: {}.", esc(&used_by(&users)));
        let _ = writeln!(o, "{line}");
    }
    o.push_str(".SH EXAMPLE\n");
    example(
        &mut o,
        &[
            "# /etc/thinimg/thinimg.conf",
            "bucket = fleet-images",
            "prefix = images/",
            "endpoint = https://s3.example.net",
            "data-dev = /dev/vg0/thinimg-data",
            "meta-dev = /dev/vg0/thinimg-meta",
            "download-jobs = 8",
            "log-format = json",
        ],
    );
    o.push_str(".SH FILES\n");
    let _ = writeln!(o, ".TP\n{}\nThe default location.", ital(DEFAULT_CONFIG));
    let _ = writeln!(o, ".SH SEE ALSO\n{}(8)", bold("thinimg"));
    o
}

// ---------------------------------------------------- thinimg.conf file --

/// The packaged /etc/thinimg/thinimg.conf: every key, commented out, with
/// its default (so uncommenting a line changes nothing until it is edited).
pub fn default_config() -> String {
    let mut o = String::new();
    o.push_str(
        "# /etc/thinimg/thinimg.conf: settings for thinimg(8); the format is in thinimg.conf(5).\n\
         # Generated by 'thinimg generate conf'. Every key is listed, commented out, with its\n\
         # built-in default. Precedence: command line > environment > this file > default.\n\
         # A '#' starts a comment only at the beginning of a line.\n",
    );
    let mut last_users: Option<Option<Vec<&str>>> = None;
    for (f, users) in config_keys() {
        if last_users.as_ref() != Some(&users) {
            let _ = writeln!(
                o,
                "\n# ---- {} ----",
                match &users {
                    None => "all commands".to_string(),
                    Some(u) => format!("used by: {}", u.join(", ")),
                }
            );
            last_users = Some(users.clone());
        }
        o.push('\n');
        let mut help = f.help.to_string();
        if let Some(e) = f.env {
            let _ = write!(help, " Environment: {e}.");
        }
        for line in wrap(&help, 76) {
            let _ = writeln!(o, "# {line}");
        }
        match (f.value, f.default) {
            (None, _) => {
                let _ = writeln!(o, "# {} = false", f.long);
            }
            (Some(_), Some(d)) => {
                let _ = writeln!(o, "# {} = {d}", f.long);
            }
            (Some(v), None) => {
                if !mentions_default(f) {
                    o.push_str("# (unset by default)\n");
                }
                let _ = writeln!(o, "# {} = {v}", f.long);
            }
        }
    }
    o
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

// ------------------------------------------------------- bash completion --

/// How the value of an option is completed, from its placeholder.
fn value_kind(placeholder: &str) -> String {
    match placeholder {
        "DIR" => "dir".to_string(),
        "FILE" | "PATH" => "file".to_string(),
        "DEV" => "dev".to_string(),
        p if p.contains('|') => format!("words:{}", p.replace('|', " ")),
        _ => "none".to_string(),
    }
}

fn sh_case_alts(pats: &[String]) -> String {
    pats.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join("|")
}

pub fn bash_completion() -> String {
    let mut o = String::new();
    let mut first_words: Vec<&str> = Vec::new();
    for c in table::COMMANDS {
        let w = c.name.split(' ').next().unwrap_or(c.name);
        if !first_words.contains(&w) {
            first_words.push(w);
        }
    }
    let opt_names = |f: &Flag| -> Vec<String> {
        let mut v = vec![format!("--{}", f.long)];
        if let Some(s) = f.short {
            v.push(format!("-{s}"));
        }
        v
    };
    let globals: Vec<String> = table::GLOBAL.iter().map(|f| format!("--{}", f.long)).collect();

    o.push_str("# bash completion for thinimg(8). Generated by 'thinimg generate bash'; do not edit.\n\n");

    // Which options take a value, per command (the same short letter may be
    // a switch in one command and take a value in another).
    o.push_str("# Print how the value of option $2 of command $1 is completed; nothing for a switch.\n");
    o.push_str("_thinimg_value_kind() {\n    case \"$1 $2\" in\n");
    for f in table::GLOBAL.iter().filter(|f| f.value.is_some()) {
        let alts = opt_names(f).iter().map(|n| format!("*\" {n}\"")).collect::<Vec<_>>().join("|");
        let _ = writeln!(o, "        {alts}) echo {:?} ;;", value_kind(f.value.unwrap_or("")));
    }
    for c in table::COMMANDS {
        for f in own_flags(c).filter(|f| f.value.is_some()) {
            let pats: Vec<String> = opt_names(f).iter().map(|n| format!("{} {n}", c.name)).collect();
            let _ = writeln!(o, "        {}) echo {:?} ;;", sh_case_alts(&pats), value_kind(f.value.unwrap_or("")));
        }
    }
    o.push_str("    esac\n}\n\n");

    o.push_str("_thinimg() {\n");
    o.push_str("    local cur prev cmd=\"\" words=\"\" i w kind opts\n");
    o.push_str("    COMPREPLY=()\n    cur=\"${COMP_WORDS[COMP_CWORD]}\"\n    prev=\"${COMP_WORDS[COMP_CWORD-1]}\"\n");
    o.push_str("    # Find the command among the words before the cursor, skipping options and their values.\n");
    o.push_str("    for ((i = 1; i < COMP_CWORD; i++)); do\n        w=\"${COMP_WORDS[i]}\"\n        case \"$w\" in\n");
    o.push_str(
        "            --*=*) ;;\n            -*) [[ -n $(_thinimg_value_kind \"$cmd\" \"$w\") ]] && ((i++)) ;;\n",
    );
    o.push_str("            *)\n                if [[ -z $cmd ]]; then\n");
    o.push_str("                    words=\"$words${words:+ }$w\"\n                    case \"$words\" in\n");
    let all: Vec<String> = table::COMMANDS.iter().map(|c| c.name.to_string()).collect();
    let _ = writeln!(o, "                        {}) cmd=\"$words\" ;;", sh_case_alts(&all));
    // A command followed by a word that makes a longer command (`runs show`).
    let longer: Vec<String> = table::COMMANDS
        .iter()
        .filter(|c| table::COMMANDS.iter().any(|p| c.name.starts_with(&format!("{} ", p.name))))
        .map(|c| c.name.to_string())
        .collect();
    o.push_str("                    esac\n");
    if longer.is_empty() {
        o.push_str("                fi ;;\n        esac\n    done\n\n");
    } else {
        o.push_str("                else\n                    case \"$cmd $w\" in\n");
        let _ = writeln!(o, "                        {}) cmd=\"$cmd $w\" ;;", sh_case_alts(&longer));
        o.push_str("                    esac\n                fi ;;\n        esac\n    done\n\n");
    }

    o.push_str("    kind=$(_thinimg_value_kind \"$cmd\" \"$prev\")\n    case \"$kind\" in\n");
    o.push_str(
        "        dir) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -d -- \"$cur\"); return ;;\n",
    );
    o.push_str(
        "        file) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- \"$cur\"); return ;;\n",
    );
    o.push_str(
        "        dev) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- \"${cur:-/dev/}\"); return ;;\n",
    );
    o.push_str("        words:*) mapfile -t COMPREPLY < <(compgen -W \"${kind#words:}\" -- \"$cur\"); return ;;\n");
    o.push_str("        none) return ;;\n    esac\n\n");

    let _ = writeln!(o, "    opts=\"{}\"", globals.join(" "));
    o.push_str("    case \"$cmd\" in\n");
    for c in table::COMMANDS {
        let own: Vec<String> = own_flags(c).map(|f| format!("--{}", f.long)).collect();
        if !own.is_empty() {
            let _ = writeln!(o, "        \"{}\") opts=\"{} $opts\" ;;", c.name, own.join(" "));
        }
    }
    o.push_str("    esac\n");
    o.push_str("    if [[ $cur == -* ]]; then\n        mapfile -t COMPREPLY < <(compgen -W \"$opts\" -- \"$cur\")\n        return\n    fi\n\n");

    o.push_str("    if [[ -z $cmd ]]; then\n        case \"$words\" in\n");
    let mut seconds: Vec<(&str, Vec<&str>)> = Vec::new();
    for c in table::COMMANDS {
        if let Some((a, b)) = c.name.split_once(' ') {
            match seconds.iter_mut().find(|(x, _)| *x == a) {
                Some((_, v)) => v.push(b),
                None => seconds.push((a, vec![b])),
            }
        }
    }
    for (a, bs) in &seconds {
        let _ = writeln!(
            o,
            "            \"{a}\") mapfile -t COMPREPLY < <(compgen -W \"{}\" -- \"$cur\") ;;",
            bs.join(" ")
        );
    }
    let _ = writeln!(
        o,
        "            \"\") mapfile -t COMPREPLY < <(compgen -W \"{}\" -- \"$cur\") ;;",
        first_words.join(" ")
    );
    o.push_str("        esac\n        return\n    fi\n\n");

    o.push_str("    # Arguments: command names for help, subcommands (runs show), layer files for unpack.\n");
    o.push_str("    # Refs, images and activations are not completed:\n");
    o.push_str("    # listing them needs the network or the state directory.\n");
    o.push_str("    case \"$cmd\" in\n");
    let _ = writeln!(
        o,
        "        help) mapfile -t COMPREPLY < <(compgen -W \"{}\" -- \"$cur\") ;;",
        first_words.iter().filter(|w| **w != "help").copied().collect::<Vec<_>>().join(" ")
    );
    for p in table::COMMANDS {
        let ext: Vec<&str> =
            table::COMMANDS.iter().filter_map(|c| c.name.strip_prefix(&format!("{} ", p.name))).collect();
        if !ext.is_empty() {
            let _ = writeln!(
                o,
                "        \"{}\") mapfile -t COMPREPLY < <(compgen -W \"{}\" -- \"$cur\") ;;",
                p.name,
                ext.join(" ")
            );
        }
    }
    o.push_str("        unpack) compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -X '!*.tar' -- \"$cur\"; compgen -d -- \"$cur\") ;;\n");
    o.push_str("    esac\n}\n\ncomplete -F _thinimg thinimg\n");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_requests_out_and_dashes_ascii() {
        assert_eq!(esc(".hidden"), "\\&.hidden");
        assert_eq!(esc("--all"), "\\-\\-all");
        assert_eq!(esc("a\\b 'x'"), "a\\eb \\(aqx\\(aq");
        assert_eq!(args_roff("[REF...]"), "[\\fIREF\\fR...]");
        assert_eq!(args_roff("LAYER.tar..."), "\\fILAYER.tar\\fR...");
    }

    #[test]
    fn every_config_key_is_in_the_default_config_once() {
        let conf = default_config();
        for (f, _) in config_keys() {
            let n = conf.lines().filter(|l| l.starts_with(&format!("# {} = ", f.long))).count();
            assert_eq!(n, 1, "{} appears {n} times", f.long);
        }
    }

    #[test]
    fn config_keys_are_unique_and_configurable() {
        let keys = config_keys();
        for (i, (f, _)) in keys.iter().enumerate() {
            assert!(f.config, "{}", f.long);
            assert!(!keys[i + 1..].iter().any(|(g, _)| g.long == f.long), "duplicate {}", f.long);
        }
        assert!(keys.iter().any(|(f, u)| f.long == "download-jobs" && u.as_ref().is_some_and(|u| u.contains(&"sync"))));
    }
}
