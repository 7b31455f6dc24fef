//! The one table of commands and flags.
//!
//! Parsing (`cli::parse`), `--help`, the man page (`thinimg generate man`)
//! and the bash completion (`thinimg generate bash`) are all derived from
//! these statics, so they cannot drift apart. Adding a flag means adding a
//! row here and reading it with `Invocation::get`/`flag` in the command.

/// One flag. `value` is the placeholder of its argument (`None`: a switch).
/// `key` is the name used in the config file and by `Invocation::get`;
/// `env` the environment variable that may set it. Precedence:
/// command line > environment > config file > `default`.
#[derive(Debug)]
pub struct Flag {
    pub long: &'static str,
    pub short: Option<char>,
    pub value: Option<&'static str>,
    pub env: Option<&'static str>,
    /// May be set in the config file (`long = value`).
    pub config: bool,
    pub default: Option<&'static str>,
    pub help: &'static str,
    /// What a value must look like; checked when the command line, the
    /// environment and the config file are read, for every command.
    pub kind: ValueKind,
}

/// The type of a flag's value, with its allowed range. Values are checked
/// against it when they are read (command line, environment, config file),
/// so a bad value fails every command the same way, before any work starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// No value: the flag is a switch (`true`/`false` in the config file).
    Switch,
    Text,
    Path,
    /// Bytes; a plain number or one with a K, M, G or T suffix (powers of 1024).
    Size {
        min: u64,
        max: u64,
    },
    /// A plain whole number (no suffixes).
    Count {
        min: u64,
        max: u64,
    },
    /// Seconds: a plain number, or one with an s, m, h or d suffix; at most `max` seconds.
    Duration {
        max: u64,
    },
    Choice(&'static [&'static str]),
    /// An S3 bucket name.
    Bucket,
    /// An http:// or https:// URL.
    Url,
}

impl ValueKind {
    /// Check `v`; a number-like value is returned in its base unit (bytes,
    /// seconds, a count).
    pub fn check(self, v: &str) -> Result<Option<u64>, String> {
        match self {
            ValueKind::Switch => crate::cli::truthy(v).map(|b| Some(u64::from(b))),
            ValueKind::Text | ValueKind::Path => {
                if v.contains('\0') {
                    Err("contains a NUL byte".into())
                } else {
                    Ok(None)
                }
            }
            ValueKind::Size { min, max } => {
                let n = crate::cli::parse_size(v)?;
                in_range(n, min, max, &crate::cli::show_size).map(Some)
            }
            ValueKind::Count { min, max } => {
                let t = v.trim();
                let n: u64 = t.parse().map_err(|_| {
                    if t.ends_with(|c: char| c.is_ascii_alphabetic()) {
                        "is not a whole number (suffixes are only for sizes)".to_string()
                    } else {
                        "is not a whole number".to_string()
                    }
                })?;
                in_range(n, min, max, &|n| n.to_string()).map(Some)
            }
            ValueKind::Duration { max } => {
                let n = crate::cli::parse_duration(v)?;
                in_range(n, 0, max, &crate::cli::show_duration).map(Some)
            }
            ValueKind::Choice(words) => {
                if words.contains(&v) {
                    Ok(None)
                } else {
                    Err(format!("must be one of {}", words.join(", ")))
                }
            }
            ValueKind::Bucket => {
                let ok = (3..=255).contains(&v.len())
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
                if ok {
                    Ok(None)
                } else {
                    Err("is not a bucket name (3 to 255 letters, digits, '.', '-' or '_'; a '#' comment must be on its own line)".into())
                }
            }
            // One URL, or several separated by commas (tried in order).
            ValueKind::Url => {
                for u in v.split(',').map(str::trim) {
                    let rest = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://"));
                    match rest {
                        Some(r) if !r.is_empty() && !r.contains(char::is_whitespace) => {}
                        _ => return Err(format!("{u:?} is not an http:// or https:// URL")),
                    }
                }
                Ok(None)
            }
        }
    }

    /// The allowed values in words, for --help and the man pages (`None`: nothing to say).
    pub fn describe(self) -> Option<String> {
        match self {
            ValueKind::Size { min, max } => {
                Some(format!("From {} to {}.", crate::cli::show_size(min), crate::cli::show_size(max)))
            }
            ValueKind::Count { min, max } => Some(format!("From {min} to {max}.")),
            ValueKind::Duration { max } => Some(format!(
                "A duration: seconds, or a number with s, m, h or d (600, 10s, 5m, 1h); at most {}.",
                crate::cli::show_duration(max)
            )),
            _ => None,
        }
    }
}

fn in_range(n: u64, min: u64, max: u64, show: &dyn Fn(u64) -> String) -> Result<u64, String> {
    if n < min {
        Err(format!("must be at least {}", show(min)))
    } else if n > max {
        Err(format!("must be at most {}", show(max)))
    } else {
        Ok(n)
    }
}

/// One command. `name` may be two words (`pool create`).
#[derive(Debug)]
pub struct Command {
    pub name: &'static str,
    pub args: &'static str,
    pub min_args: usize,
    /// `None`: any number.
    pub max_args: Option<usize>,
    pub summary: &'static str,
    /// Longer description for the man page.
    pub description: &'static str,
    pub flags: &'static [&'static [Flag]],
    /// Takes the per-state-dir write lock and resumes interrupted runs first.
    pub writes: bool,
}

const fn sw(long: &'static str, short: Option<char>, help: &'static str) -> Flag {
    Flag { long, short, value: None, env: None, config: false, default: None, help, kind: ValueKind::Switch }
}

pub static GLOBAL: &[Flag] = &[
    Flag {
        long: "state-dir",
        short: None,
        value: Some("DIR"),
        env: Some("THINIMG_STATE_DIR"),
        config: true,
        default: Some("/var/lib/thinimg"),
        help: "Where the database, blobs and loop-pool files live.",
        kind: ValueKind::Path,
    },
    Flag {
        long: "run-dir",
        short: None,
        value: Some("DIR"),
        env: Some("THINIMG_RUN_DIR"),
        config: true,
        default: Some("/run/thinimg"),
        help: "Where device nodes and temporary mount points live (cleared by a reboot).",
        kind: ValueKind::Path,
    },
    Flag {
        long: "config",
        short: None,
        value: Some("FILE"),
        env: Some("THINIMG_CONFIG"),
        config: false,
        default: Some("/etc/thinimg/thinimg.conf"),
        help: "Config file of `key = value` lines (keys are long flag names). A missing default file is ignored.",
        kind: ValueKind::Path,
    },
    Flag {
        long: "bucket",
        short: None,
        value: Some("NAME"),
        env: Some("THINIMG_BUCKET"),
        config: true,
        default: Some("flyio-platform-hiring-challenge"),
        help: "S3 bucket holding the images.",
        kind: ValueKind::Bucket,
    },
    Flag {
        long: "prefix",
        short: None,
        value: Some("PREFIX"),
        env: Some("THINIMG_PREFIX"),
        config: true,
        default: Some("images/"),
        help: "Key prefix under which each image is a folder of <N>.tar layers.",
        kind: ValueKind::Text,
    },
    Flag {
        long: "region",
        short: None,
        value: Some("REGION"),
        env: Some("AWS_REGION"),
        config: true,
        default: Some("us-east-1"),
        help: "S3 region (used for signing).",
        kind: ValueKind::Text,
    },
    Flag {
        long: "endpoint",
        short: None,
        value: Some("URL"),
        env: Some("AWS_ENDPOINT_URL"),
        config: true,
        default: None,
        help: "S3-compatible endpoint URL (path-style addressing); several, comma-separated, are tried in order: one that is unreachable or answers 5xx passes the request to the next (logged once), an auth error or a 404 never does. Default: AWS for --region.",
        kind: ValueKind::Url,
    },
    Flag {
        long: "anonymous",
        short: None,
        value: None,
        env: Some("THINIMG_ANONYMOUS"),
        config: true,
        default: None,
        help: "Send unsigned requests. Also used when no credentials are found.",
        kind: ValueKind::Switch,
    },
    Flag {
        long: "timeout",
        short: None,
        value: Some("SECONDS"),
        env: Some("THINIMG_TIMEOUT"),
        config: true,
        default: Some("10"),
        help: "Overall deadline of one S3 request (1s to 1h): connecting, the reply and a listing page; an object's body gets this plus its size at 64 KiB/s.",
        kind: ValueKind::Duration { max: 3600 },
    },
    Flag {
        long: "retries",
        short: None,
        value: Some("N"),
        env: Some("THINIMG_RETRIES"),
        config: true,
        default: Some("2"),
        help: "Retries of an S3 request that failed in a way that may pass (timeout, refused, 5xx, SlowDown), 0..=20, with backoff.",
        kind: ValueKind::Count { min: 0, max: 20 },
    },
    Flag {
        long: "wait",
        short: None,
        value: Some("DURATION"),
        env: Some("THINIMG_WAIT"),
        config: true,
        default: None,
        help: "If another instance holds the state dir, wait up to DURATION for it instead of exiting 75.",
        kind: ValueKind::Duration { max: 7 * 86400 },
    },
    Flag {
        long: "metrics-file",
        short: None,
        value: Some("PATH"),
        env: Some("THINIMG_METRICS_FILE"),
        config: true,
        default: None,
        help: "Write Prometheus textfile metrics here (atomically) when the command ends; each command keeps its own last outcome. A path that cannot be written is a warning.",
        kind: ValueKind::Path,
    },
    Flag {
        long: "runs-retention",
        short: None,
        value: Some("DURATION"),
        env: None,
        config: true,
        default: Some("14d"),
        help: "Finished, failed and cancelled runs older than this are removed from the journal by the next command that writes.",
        kind: ValueKind::Duration { max: 3650 * 86400 },
    },
    Flag {
        long: "json",
        short: None,
        value: None,
        env: None,
        config: false,
        default: None,
        help: "Print results as JSON on stdout.",
        kind: ValueKind::Switch,
    },
    sw("quiet", Some('q'), "Only print errors."),
    sw("verbose", Some('v'), "More log output; repeat for debug."),
    Flag {
        long: "log-format",
        short: None,
        value: Some("text|json"),
        env: Some("THINIMG_LOG_FORMAT"),
        config: true,
        default: Some("text"),
        help: "Format of log lines on stderr.",
        kind: ValueKind::Choice(&["text", "json"]),
    },
    sw("help", Some('h'), "Print help and exit."),
    sw("version", Some('V'), "Print the version and exit."),
];

pub static DOWNLOAD: &[Flag] = &[
    Flag {
        long: "download-jobs",
        short: None,
        value: Some("N"),
        env: None,
        config: true,
        default: Some("4"),
        help: "Parallel blob downloads.",
        kind: ValueKind::Count { min: 1, max: 64 },
    },
    Flag {
        long: "max-blob-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("16G"),
        help: "Refuse S3 objects larger than this (suffixes K, M, G, T).",
        kind: ValueKind::Size { min: 1, max: 1 << 44 },
    },
];

pub static BLOBS: &[Flag] = &[Flag {
    long: "clear-rejection",
    short: None,
    value: Some("DIGEST"),
    env: None,
    config: false,
    default: None,
    help: "Forget that blob DIGEST was rejected (takes the state lock): the next fetch of a key holding it downloads and checks it again. A rejection is otherwise cleared only by a change of the object.",
    kind: ValueKind::Text,
}];

/// The free-space reserve: read by the commands that download and by doctor.
pub static SPACE: &[Flag] = &[
    Flag {
        long: "min-free",
        short: None,
        value: Some("BYTES"),
        env: Some("THINIMG_MIN_FREE"),
        config: true,
        default: Some("256M"),
        help: "Keep at least this much free on the state filesystem: downloads that would leave less are refused before they start (suffixes K, M, G, T); doctor warns below it.",
        kind: ValueKind::Size { min: 0, max: 1 << 50 },
    },
];

pub static VERIFY: &[Flag] = &[sw(
    "verify",
    None,
    "Re-hash blobs already in the store before counting them as present; corrupt ones are removed and fetched again.",
)];

pub static EXTRACT: &[Flag] = &[
    Flag {
        long: "jobs",
        short: Some('j'),
        value: Some("N"),
        env: None,
        config: true,
        default: None,
        help: "File-writer threads per unpack, 1 to 256 (default: number of CPUs).",
        kind: ValueKind::Count { min: 1, max: 256 },
    },
    Flag {
        long: "max-entries",
        short: None,
        value: Some("N"),
        env: None,
        config: true,
        default: Some("1000000"),
        help: "Reject a layer with more tar entries than this.",
        kind: ValueKind::Count { min: 1, max: 1_000_000_000 },
    },
    Flag {
        long: "max-file-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("8G"),
        help: "Reject a layer holding a file larger than this (apparent size, sparse included).",
        kind: ValueKind::Size { min: 1, max: 1 << 50 },
    },
    Flag {
        long: "max-total-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("64G"),
        help: "Reject a layer whose files add up to more than this.",
        kind: ValueKind::Size { min: 1, max: 1 << 50 },
    },
    Flag {
        long: "max-path-len",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("4095"),
        help: "Reject entries whose path is longer than this.",
        kind: ValueKind::Count { min: 1, max: 65_536 },
    },
    Flag {
        long: "max-depth",
        short: None,
        value: Some("N"),
        env: None,
        config: true,
        default: Some("128"),
        help: "Reject entries whose path has more components than this.",
        kind: ValueKind::Count { min: 1, max: 4096 },
    },
    Flag {
        long: "max-header-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("1M"),
        help: "Reject PAX/GNU extension headers larger than this.",
        kind: ValueKind::Size { min: 512, max: 1 << 30 },
    },
];

pub static POOL_SIZE: &[Flag] = &[
    Flag {
        long: "data-dev",
        short: None,
        value: Some("DEV"),
        env: None,
        config: true,
        default: None,
        help: "Block device for pool data (with --meta-dev). Default: a loop file under the state dir.",
        kind: ValueKind::Path,
    },
    Flag {
        long: "meta-dev",
        short: None,
        value: Some("DEV"),
        env: None,
        config: true,
        default: None,
        help: "Block device for pool metadata (with --data-dev).",
        kind: ValueKind::Path,
    },
    Flag {
        long: "data-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("20G"),
        help: "Size of the loop-file pool created when none exists (sparse file).",
        kind: ValueKind::Size { min: 64 << 20, max: 1 << 50 },
    },
    Flag {
        long: "block-size",
        short: None,
        value: Some("SECTORS"),
        env: None,
        config: true,
        default: Some("128"),
        help: "Thin-pool block size in 512-byte sectors (multiple of 128).",
        kind: ValueKind::Count { min: 128, max: 2_097_152 },
    },
    Flag {
        long: "device-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("8G"),
        help: "Virtual size of each image's thin device (the ext4 size).",
        kind: ValueKind::Size { min: 64 << 20, max: 1 << 44 },
    },
];

pub static NAME: &[Flag] = &[Flag {
    long: "name",
    short: Some('n'),
    value: Some("NAME"),
    env: None,
    config: false,
    default: None,
    help: "Activation name (letters, digits, '-', '_', '.'; at most 100 bytes).",
    kind: ValueKind::Text,
}];

pub static DEST: &[Flag] = &[Flag {
    long: "dest",
    short: Some('C'),
    value: Some("DIR"),
    env: None,
    config: false,
    default: None,
    help: "Directory to unpack into: created with mode 0700 if missing; must be empty unless --apply-on-top; never /.",
    kind: ValueKind::Path,
}];

// `thinimg unpack` onto a host directory (extract helper's block).
pub static UNPACK: &[Flag] = &[
    sw(
        "apply-on-top",
        None,
        "Apply the layers onto a DIR that already holds files (its content may be changed or removed by whiteouts); without it a non-empty DIR is refused.",
    ),
    sw(
        "keep-privileges",
        None,
        "Keep setuid/setgid bits and security.capability xattrs (dropped by default: they would grant privileges on this host).",
    ),
    sw("devices", None, "Create character and block device nodes (skipped by default: they would expose host devices)."),
];

pub static DELETE: &[Flag] = &[sw("delete", None, "Also delete the thin device and forget the activation.")];
pub static FORCE: &[Flag] = &[sw("force", Some('f'), "Also deactivate and delete the image's activations.")];
pub static DRY_RUN: &[Flag] = &[sw("dry-run", Some('n'), "Report what would be removed; change nothing.")];
pub static POOL_FORCE: &[Flag] =
    &[sw("force", Some('f'), "Destroy the pool even though chains or activations exist (they are destroyed with it).")];
pub static NO_HEADINGS: &[Flag] = &[sw("no-headings", Some('H'), "Print table rows without the heading line.")];
pub static CANCEL: &[Flag] = &[sw("failed", None, "Cancel every failed run (instead of RUN-ID).")];
pub static ALL_RUNS: &[Flag] = &[sw("all", Some('a'), "Include finished runs.")];
pub static WATCH: &[Flag] = &[Flag {
    long: "watch",
    short: Some('w'),
    value: None,
    env: None,
    config: false,
    default: None,
    help: "Refresh every second on a terminal until interrupted.",
    kind: ValueKind::Switch,
}];

/// How many images' chains build at once (`pull` and `sync`).
pub static BUILD: &[Flag] = &[Flag {
    long: "unpack-jobs",
    short: None,
    value: Some("N"),
    env: None,
    config: true,
    default: Some("2"),
    help: "Images whose layer chains build at the same time (chains of different images are independent; one image's chains build in order). Downloads run beside them (--download-jobs).",
    kind: ValueKind::Count { min: 1, max: 64 },
}, Flag {
    long: "stream-unpack",
    short: None,
    value: Some("WHEN"),
    env: Some("THINIMG_STREAM_UNPACK"),
    config: true,
    default: Some("last"),
    help: "Which layers unpack while their blobs download, instead of after: never; last, the blob still downloading once every other download of the command has ended; always, every layer whose blob is still downloading when its chain is due. A chain built this way is recorded only once the download verified every byte, and a failed download leaves nothing. Unpacking beside other downloads competes with them for CPU: measured under emulation, always made the pull slower.",
    kind: ValueKind::Choice(&["never", "last", "always"]),
}];

pub static SYNC: &[Flag] = &[
    sw("all", Some('a'), "Want every image family in the bucket."),
    Flag {
        long: "from",
        short: None,
        value: Some("FILE"),
        env: None,
        config: false,
        default: None,
        help: "Read wanted refs from FILE ('-' = stdin), one per line, '#' comments.",
        kind: ValueKind::Path,
    },
    sw("prune", None, "Remove images that are no longer wanted (never ones with activations). Refused when the bucket listing is empty or failed, or when more than half of the local images would go, unless --force."),
    sw("force", None, "With --prune: prune even when the wanted set is empty or most local images would be removed."),
    sw("dry-run", Some('n'), "With --prune: report what would be pruned; pull and prune nothing."),
    Flag {
        long: "jitter",
        short: None,
        value: Some("DURATION"),
        env: Some("THINIMG_JITTER"),
        config: true,
        default: None,
        help: "Before the first request (and before taking the state lock), sleep a random time below DURATION (600, 30s, 10m, 1h; at most 24h), so a fleet started together spreads itself. Off by default.",
        kind: ValueKind::Duration { max: 86_400 },
    },
];

pub static COMMANDS: &[Command] = &[
    Command {
        name: "ls-remote",
        args: "[FAMILY]",
        min_args: 0,
        max_args: Some(1),
        summary: "List the images and layers in the bucket, and objects that are ignored.",
        description: "Lists every image family under the prefix with its layers in numeric order. Objects that are not <N>.tar are listed as ignored with the reason; a gap in the numbering marks the image invalid.",
        flags: &[NO_HEADINGS],
        writes: false,
    },
    Command {
        name: "fetch",
        args: "REF...",
        min_args: 1,
        max_args: None,
        summary: "Download an image's layer blobs into the content-addressed store.",
        description: "REF is a family (golang: all its layers) or one layer, written as the key images/golang/3.tar, as golang/3.tar or as golang/3, meaning the family's layers 1 to 3. Layers are the objects <N>.tar in the family folder, N a decimal without leading zeros, applied in numeric order. Downloads stream with SHA-256 verification, resume after interruption with a Range request, and identical content is stored once. Non-tar and compressed objects are refused (exit 65).",
        flags: &[DOWNLOAD, SPACE, VERIFY, NO_HEADINGS],
        writes: true,
    },
    Command {
        name: "blobs",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List the blobs in the local store.",
        description: "Lists each stored blob with its digest, size, state, the S3 keys known to hold it and, for a rejected blob, why. A rejected blob stays rejected: fetch refuses a key that held it (without downloading) and any download whose bytes are it, and gc keeps the rejection. --clear-rejection DIGEST forgets it.",
        flags: &[BLOBS, NO_HEADINGS],
        writes: false,
    },
    Command {
        name: "runs",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List journaled runs (active and unresolved failures by default).",
        description: "Each run is a journaled operation (pull, activate, ...) with its steps; an interrupted run is resumed by the next invocation that writes. A failed run is resolved (and no longer listed or counted by doctor and status) once a later run of the same kind and subject succeeded. Runs that ended more than --runs-retention ago are pruned by the next command that writes.",
        flags: &[ALL_RUNS, NO_HEADINGS],
        writes: false,
    },
    Command {
        name: "runs show",
        args: "RUN-ID",
        min_args: 1,
        max_args: Some(1),
        summary: "Explain one run in words: what it did, where it stopped and why.",
        description: "Prints the run's kind, subject, times and state, then one line per step with its attempts, error and outcome, and what to do next.",
        flags: &[],
        writes: false,
    },
    Command {
        name: "cancel",
        args: "[RUN-ID]",
        min_args: 0,
        max_args: Some(1),
        summary: "Cancel an interrupted or failed run (or, with --failed, every failed run).",
        description: "Marks the run cancelled and undoes the half-done work its current step recorded (devices, mounts). Finished steps' results stay; gc removes what nothing uses.",
        flags: &[CANCEL],
        writes: true,
    },
    Command {
        name: "unpack",
        args: "LAYER.tar...",
        min_args: 1,
        max_args: None,
        summary: "Apply layer tarballs in order into a directory, with all hostile-input rules.",
        description: "Applies each layer with container-layer semantics (whiteouts, opaque directories, hard links resolved inside the root) under the same limits and containment as the pipeline. Layers must be uncompressed tar: gzip, zstd, xz, bzip2 and lz4 layers are recognised by magic number and refused (no decompressor is built in). Must run as root to set ownership. Safe by default for a host directory: DIR is created with mode 0700, / and a non-empty DIR are refused (--apply-on-top allows the latter), setuid/setgid bits and security.capability are dropped (--keep-privileges keeps them) and device nodes are skipped (--devices creates them); the report counts what was dropped or skipped. The pipeline always keeps full fidelity on its nosuid,nodev mounts. SIGINT or SIGTERM stops it between entries (exit 130 or 143). A rejected layer exits 65 with one line naming the layer, the entry and the rule, and says how many of its entries were already applied to DIR (DIR is then not a consistent image); nothing outside DIR is changed. --json prints a report per applied layer.",
        flags: &[DEST, UNPACK, EXTRACT],
        writes: false,
    },
    Command {
        name: "pool create",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Create the thin-pool on block devices or on loop files under the state dir.",
        description: "Creates and records the one thin-pool. With --data-dev and --meta-dev it uses those devices (refusing a foreign pool with data in it); otherwise sparse loop files of --data-size under the state dir (for development).",
        flags: &[POOL_SIZE],
        writes: true,
    },
    Command {
        name: "pool destroy",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Remove the recorded thin-pool, or roll back its unfinished creation.",
        description: "Removes the pool's dm devices and loop bindings, deletes a loop pool's files, and forgets the pool, its chains, images and activations (downloaded blobs stay). Refuses while chains or activations exist unless --force. Block devices are left as they are; wipe the metadata device before creating a pool on it again. Use it to get rid of a pool created by accident (e.g. a loop pool on a host meant to use --data-dev/--meta-dev).",
        flags: &[POOL_FORCE, DRY_RUN],
        writes: true,
    },
    Command {
        name: "pool assemble",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Bring the recorded pool and its active activations back into the kernel (at boot).",
        description: "What a reboot removed: assembles the recorded thin-pool from its devices and re-creates the dm device of every activation recorded as active, after resuming interrupted runs. Does nothing when they are all present, and exits 0 with a message when no pool is recorded. Exits 75 when an activation could not be brought back. The packaged thinimg-pool.service runs it at boot.",
        flags: &[],
        writes: true,
    },
    Command {
        name: "pool status",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Show pool usage, mode and health.",
        description: "Prints data and metadata usage, mode (rw, ro, out_of_data_space, fail), needs_check and the number of thin devices. Exits 71 when the pool is unusable (fail, read-only, needs_check) and 75 when it is out of data space.",
        flags: &[],
        writes: false,
    },
    Command {
        name: "pull",
        args: "REF...",
        min_args: 1,
        max_args: None,
        summary: "Fetch an image and build its layer chain of thin devices.",
        description: "Builds one thin device per layer chain: the first layer on a new ext4, each later layer on a snapshot of its parent. Blobs download in the background while chains build: a chain starts as soon as its blob and its parent chain are ready (or, for the last download still running, as its blob arrives: --stream-unpack), and the chains of several images build at the same time (--unpack-jobs). Chains shared with other images are reused. Every image is attempted; the exit code is that of the first image (in argument order) that failed.",
        flags: &[BUILD, DOWNLOAD, SPACE, EXTRACT, POOL_SIZE],
        writes: true,
    },
    Command {
        name: "activate",
        args: "REF",
        min_args: 1,
        max_args: Some(1),
        summary: "Pull if needed, then create a writable snapshot of the image and print its device.",
        description: "Idempotent by --name: a second call with the same name does no device-mapper work and prints the same answer. Such an answer is kept under the run directory (answers/activate-NAME.json) and printed again without opening the database while the database is unchanged and the kernel still shows the device.",
        flags: &[NAME, DOWNLOAD, SPACE, EXTRACT, POOL_SIZE],
        writes: true,
    },
    Command {
        name: "deactivate",
        args: "NAME",
        min_args: 1,
        max_args: Some(1),
        summary: "Remove an activation's dm device (and with --delete, its thin device).",
        description: "Without --delete the writable snapshot is kept and is re-activated by the next activate with the same name. --dry-run says what would be removed.",
        flags: &[DELETE, DRY_RUN],
        writes: true,
    },
    Command {
        name: "rm",
        args: "IMAGE",
        min_args: 1,
        max_args: Some(1),
        summary: "Forget an image; gc then frees chains no image uses.",
        description: "Refuses while the image has activations unless --force. --dry-run says what would be removed.",
        flags: &[FORCE, DRY_RUN],
        writes: true,
    },
    Command {
        name: "images",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List local images.",
        description: "Lists each image with its layers, top chain and state.",
        flags: &[NO_HEADINGS],
        writes: false,
    },
    Command {
        name: "activations",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List activations and their device paths.",
        description: "Lists each activation with its image, thin id and device paths.",
        flags: &[NO_HEADINGS],
        writes: false,
    },
    Command {
        name: "gc",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Reconcile the database with the kernel and remove what is ours and unused.",
        description: "Compares recorded devices with the kernel's in both directions, and removes unused chains, unreferenced blobs, stray mounts and partial downloads. Never removes anything the database does not know for sure is ours. Retention: a blob no image uses is removed only when thinimg fetch has not stored or used it for 7 days, so blobs pre-staged with fetch survive (blobs only pulled are freed as soon as no image uses them); a rejected blob's file is removed but its rejection kept; partial downloads are removed unless a run is in flight.",
        flags: &[DRY_RUN],
        writes: true,
    },
    Command {
        name: "sync",
        args: "[REF...]",
        min_args: 0,
        max_args: None,
        summary: "Bring the host to the wanted set of images (for cron and timers).",
        description: "Pulls every wanted image on bounded queues; one bad image does not stop the others. The exit code is that of the most severe failure (e.g. 65 for a hostile layer, 66 for a missing image) and the summary names each.",
        flags: &[SYNC, BUILD, DOWNLOAD, SPACE, EXTRACT, POOL_SIZE],
        writes: true,
    },
    Command {
        name: "status",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Pool usage, space, object counts, runs in flight and unresolved failures.",
        description: "A read-only overview: the pool, the space used by blobs, partial downloads and pool files, the free space of the state filesystem, and runs. Works on a read-only state directory.",
        flags: &[WATCH],
        writes: false,
    },
    Command {
        name: "doctor",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Health checks before device-mapper work; exit code reflects the worst.",
        description: "Checks the config file, pool mode, needs_check and space, unresolved failed runs, processes stuck on dm devices, kernel log errors, memory pressure and I/O wait, each with advice. Warns when the state filesystem has less free than --min-free, and shows the bytes held by partial downloads.",
        flags: &[SPACE],
        writes: false,
    },
    Command {
        name: "config check",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Check the config file: every key known, every value valid.",
        description: "Exits 0 when the file (or its absence) is fine, and 78 naming FILE:LINE for each problem otherwise. Every command checks the file the same way when it starts.",
        flags: &[],
        writes: false,
    },
    Command {
        name: "config show",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Show every setting's effective value and where it came from.",
        description: "For each config key: the value in effect and its source (command line, environment variable, FILE:LINE, or default).",
        flags: &[NO_HEADINGS],
        writes: false,
    },
    Command {
        name: "version",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Print the version, the git commit and the database schema version.",
        description: "With --json: {\"version\", \"commit\", \"schema_version\"}.",
        flags: &[],
        writes: false,
    },
    Command {
        name: "help",
        args: "[COMMAND]",
        min_args: 0,
        max_args: None,
        summary: "Show the help of a command (or of a group such as 'pool').",
        description: "Same as 'thinimg COMMAND --help'.",
        flags: &[],
        writes: false,
    },
];

/// Documented exit codes, for `--help` and the man page.
pub static EXIT_CODES: &[(u8, &str)] = &[
    (0, "success"),
    (1, "doctor: some check warned (a failed check exits 71)"),
    (64, "usage error"),
    (65, "bad data: a blob or layer was rejected (hostile, malformed, not a tar)"),
    (66, "no such image, layer or activation (also a gap in an image's layers)"),
    (69, "S3 unavailable (network, 5xx after retries)"),
    (70, "internal error (a bug in thinimg)"),
    (71, "the host cannot run the pool: device-mapper or its thin-pool target is missing, the pool is unsafe (needs_check, read-only, failed), or the database and the pool diverged"),
    (73, "cannot create a device, file or directory"),
    (74, "I/O error, including a corrupt database or a state directory that does not match its database"),
    (75, "temporary failure: another instance holds the lock, a device is busy, or the pool is short of space; retry later"),
    (77, "permission denied: credentials rejected, access denied, or not root"),
    (78, "configuration error: a bad config file (unknown key, invalid value, missing file), configured pool devices that are not the recorded pool's, a database written by a newer thinimg, or sync --prune refused as unsafe (empty or unreadable wanted set, most local images would go)"),
    (130, "interrupted by SIGINT"),
    (143, "terminated by SIGTERM"),
];

/// Environment variables read besides the flags' own.
pub static ENVIRONMENT: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN", "S3 credentials."),
    ("AWS_PROFILE", "Profile to read from ~/.aws/credentials (default: default)."),
    ("AWS_SHARED_CREDENTIALS_FILE", "Credentials file instead of ~/.aws/credentials."),
    ("THINIMG_FAULT", "Testing only: abort the process as kill -9 would at a named point (see FAULT INJECTION)."),
    ("RUST_LOG", "Overrides the log filter (env_logger syntax)."),
];

/// A flag by its long name, wherever it is defined (globals first).
pub fn find_flag(long: &str) -> Option<&'static Flag> {
    GLOBAL.iter().chain(COMMANDS.iter().flat_map(|c| c.flags.iter().flat_map(|g| g.iter()))).find(|f| f.long == long)
}

pub fn find_command(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// All flags a command accepts, global ones first.
pub fn flags_of(cmd: Option<&'static Command>) -> impl Iterator<Item = &'static Flag> {
    let own = cmd.map(|c| c.flags).unwrap_or(&[]);
    GLOBAL.iter().chain(own.iter().flat_map(|g| g.iter()))
}
