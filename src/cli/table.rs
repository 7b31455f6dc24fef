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
    Flag { long, short, value: None, env: None, config: false, default: None, help }
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
    },
    Flag {
        long: "run-dir",
        short: None,
        value: Some("DIR"),
        env: Some("THINIMG_RUN_DIR"),
        config: true,
        default: Some("/run/thinimg"),
        help: "Where device nodes and temporary mount points live (cleared by a reboot).",
    },
    Flag {
        long: "config",
        short: None,
        value: Some("FILE"),
        env: Some("THINIMG_CONFIG"),
        config: false,
        default: Some("/etc/thinimg/thinimg.conf"),
        help: "Config file of `key = value` lines (keys are long flag names). A missing default file is ignored.",
    },
    Flag {
        long: "bucket",
        short: None,
        value: Some("NAME"),
        env: Some("THINIMG_BUCKET"),
        config: true,
        default: Some("flyio-platform-hiring-challenge"),
        help: "S3 bucket holding the images.",
    },
    Flag {
        long: "prefix",
        short: None,
        value: Some("PREFIX"),
        env: Some("THINIMG_PREFIX"),
        config: true,
        default: Some("images/"),
        help: "Key prefix under which each image is a folder of <N>.tar layers.",
    },
    Flag {
        long: "region",
        short: None,
        value: Some("REGION"),
        env: Some("AWS_REGION"),
        config: true,
        default: Some("us-east-1"),
        help: "S3 region (used for signing).",
    },
    Flag {
        long: "endpoint",
        short: None,
        value: Some("URL"),
        env: Some("AWS_ENDPOINT_URL"),
        config: true,
        default: None,
        help: "S3-compatible endpoint URL (path-style addressing); several, comma-separated, are tried in order: one that is unreachable or answers 5xx passes the request to the next (logged once), an auth error or a 404 never does. Default: AWS for --region.",
    },
    Flag {
        long: "anonymous",
        short: None,
        value: None,
        env: Some("THINIMG_ANONYMOUS"),
        config: true,
        default: None,
        help: "Send unsigned requests. Also used when no credentials are found.",
    },
    Flag {
        long: "timeout",
        short: None,
        value: Some("SECONDS"),
        env: Some("THINIMG_TIMEOUT"),
        config: true,
        default: Some("10"),
        help: "Overall deadline of one S3 request (1..=3600): connecting, the reply and a listing page; an object's body gets this plus its size at 64 KiB/s.",
    },
    Flag {
        long: "retries",
        short: None,
        value: Some("N"),
        env: Some("THINIMG_RETRIES"),
        config: true,
        default: Some("2"),
        help: "Retries of an S3 request that failed in a way that may pass (timeout, refused, 5xx, SlowDown), 0..=20, with backoff.",
    },
    Flag {
        long: "wait",
        short: None,
        value: Some("SECONDS"),
        env: Some("THINIMG_WAIT"),
        config: true,
        default: None,
        help: "If another instance holds the state dir, wait up to SECONDS for it instead of exiting 75.",
    },
    Flag {
        long: "metrics-file",
        short: None,
        value: Some("PATH"),
        env: Some("THINIMG_METRICS_FILE"),
        config: true,
        default: None,
        help: "Write Prometheus textfile metrics here (atomically) when the command ends.",
    },
    Flag {
        long: "json",
        short: None,
        value: None,
        env: None,
        config: false,
        default: None,
        help: "Print results as JSON on stdout.",
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
    },
    Flag {
        long: "max-blob-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("16G"),
        help: "Refuse S3 objects larger than this (suffixes K, M, G, T).",
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
        help: "File-writer threads per unpack (default: number of CPUs).",
    },
    Flag {
        long: "max-entries",
        short: None,
        value: Some("N"),
        env: None,
        config: true,
        default: Some("1000000"),
        help: "Reject a layer with more tar entries than this.",
    },
    Flag {
        long: "max-file-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("8G"),
        help: "Reject a layer holding a file larger than this (apparent size, sparse included).",
    },
    Flag {
        long: "max-total-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("64G"),
        help: "Reject a layer whose files add up to more than this.",
    },
    Flag {
        long: "max-path-len",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("4095"),
        help: "Reject entries whose path is longer than this.",
    },
    Flag {
        long: "max-depth",
        short: None,
        value: Some("N"),
        env: None,
        config: true,
        default: Some("128"),
        help: "Reject entries whose path has more components than this.",
    },
    Flag {
        long: "max-header-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("1M"),
        help: "Reject PAX/GNU extension headers larger than this.",
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
    },
    Flag {
        long: "meta-dev",
        short: None,
        value: Some("DEV"),
        env: None,
        config: true,
        default: None,
        help: "Block device for pool metadata (with --data-dev).",
    },
    Flag {
        long: "data-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("20G"),
        help: "Size of the loop-file pool created when none exists (sparse file).",
    },
    Flag {
        long: "block-size",
        short: None,
        value: Some("SECTORS"),
        env: None,
        config: true,
        default: Some("128"),
        help: "Thin-pool block size in 512-byte sectors (multiple of 128).",
    },
    Flag {
        long: "device-size",
        short: None,
        value: Some("BYTES"),
        env: None,
        config: true,
        default: Some("8G"),
        help: "Virtual size of each image's thin device (the ext4 size).",
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
}];

pub static DEST: &[Flag] = &[Flag {
    long: "dest",
    short: Some('C'),
    value: Some("DIR"),
    env: None,
    config: false,
    default: None,
    help: "Directory to unpack into (created if missing).",
}];

pub static DELETE: &[Flag] = &[sw("delete", None, "Also delete the thin device and forget the activation.")];
pub static FORCE: &[Flag] = &[sw("force", Some('f'), "Also deactivate and delete the image's activations.")];
pub static DRY_RUN: &[Flag] = &[sw("dry-run", Some('n'), "Report what would be removed; change nothing.")];
pub static ALL_RUNS: &[Flag] = &[sw("all", Some('a'), "Include finished runs.")];
pub static WATCH: &[Flag] = &[Flag {
    long: "watch",
    short: Some('w'),
    value: None,
    env: None,
    config: false,
    default: None,
    help: "Refresh every second on a terminal until interrupted.",
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
    },
    sw("prune", None, "Remove images that are no longer wanted (never ones with activations)."),
    Flag {
        long: "jitter",
        short: None,
        value: Some("DURATION"),
        env: Some("THINIMG_JITTER"),
        config: true,
        default: None,
        help: "Before the first request (and before taking the state lock), sleep a random time below DURATION (600, 30s, 10m, 1h; at most 24h), so a fleet started together spreads itself. Off by default.",
    },
    Flag {
        long: "unpack-jobs",
        short: None,
        value: Some("N"),
        env: None,
        config: true,
        default: Some("2"),
        help: "Layers unpacked at the same time.",
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
        flags: &[],
        writes: false,
    },
    Command {
        name: "fetch",
        args: "REF...",
        min_args: 1,
        max_args: None,
        summary: "Download an image's layer blobs into the content-addressed store.",
        description: "REF is a family (golang: all its layers) or one layer, written as the key images/golang/3.tar, as golang/3.tar or as golang/3, meaning the family's layers 1 to 3. Layers are the objects <N>.tar in the family folder, N a decimal without leading zeros, applied in numeric order. Downloads stream with SHA-256 verification, resume after interruption with a Range request, and identical content is stored once. Non-tar and compressed objects are refused (exit 65).",
        flags: &[DOWNLOAD, SPACE, VERIFY],
        writes: true,
    },
    Command {
        name: "blobs",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List the blobs in the local store.",
        description: "Lists each stored blob with its digest, size, state, the S3 keys known to hold it and, for a rejected blob, why. A rejected blob stays rejected: fetch refuses a key that held it (without downloading) and any download whose bytes are it, and gc keeps the rejection. --clear-rejection DIGEST forgets it.",
        flags: &[BLOBS],
        writes: false,
    },
    Command {
        name: "runs",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List journaled runs (active and failed by default).",
        description: "Each run is a journaled operation (pull, activate, ...) with its steps; an interrupted run is resumed by the next invocation that writes.",
        flags: &[ALL_RUNS],
        writes: false,
    },
    Command {
        name: "cancel",
        args: "RUN-ID",
        min_args: 1,
        max_args: Some(1),
        summary: "Cancel an interrupted or failed run; its half-done work is cleaned up.",
        description: "Marks the run cancelled and undoes the half-done work its current step recorded (devices, mounts). Finished steps' results stay; gc removes what nothing uses.",
        flags: &[],
        writes: true,
    },
    Command {
        name: "unpack",
        args: "LAYER.tar...",
        min_args: 1,
        max_args: None,
        summary: "Apply layer tarballs in order into a directory, with all hostile-input rules.",
        description: "Applies each layer with container-layer semantics (whiteouts, opaque directories, hard links resolved inside the root) under the same limits and containment as the pipeline. Layers must be uncompressed tar: gzip, zstd, xz, bzip2 and lz4 layers are recognised by magic number and refused (no decompressor is built in). Must run as root to set ownership and device nodes. A rejected layer exits 65 with one line naming the layer, the entry and the rule, and says how many of its entries were already applied to DIR (DIR is then not a consistent image); nothing outside DIR is changed. --json prints a report per applied layer.",
        flags: &[DEST, EXTRACT],
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
        description: "Fetches the blobs, then builds one thin device per layer chain: the first layer on a new ext4, each later layer on a snapshot of its parent. Chains shared with other images are reused.",
        flags: &[DOWNLOAD, SPACE, EXTRACT, POOL_SIZE],
        writes: true,
    },
    Command {
        name: "activate",
        args: "REF",
        min_args: 1,
        max_args: Some(1),
        summary: "Pull if needed, then create a writable snapshot of the image and print its device.",
        description: "Idempotent by --name: a second call with the same name does no device-mapper work and prints the same answer.",
        flags: &[NAME, DOWNLOAD, SPACE, EXTRACT, POOL_SIZE],
        writes: true,
    },
    Command {
        name: "deactivate",
        args: "NAME",
        min_args: 1,
        max_args: Some(1),
        summary: "Remove an activation's dm device (and with --delete, its thin device).",
        description: "Without --delete the writable snapshot is kept and is re-activated by the next activate with the same name.",
        flags: &[DELETE],
        writes: true,
    },
    Command {
        name: "rm",
        args: "IMAGE",
        min_args: 1,
        max_args: Some(1),
        summary: "Forget an image; gc then frees chains no image uses.",
        description: "Refuses while the image has activations unless --force.",
        flags: &[FORCE],
        writes: true,
    },
    Command {
        name: "images",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List local images.",
        description: "Lists each image with its layers, top chain and state.",
        flags: &[],
        writes: false,
    },
    Command {
        name: "activations",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "List activations and their device paths.",
        description: "Lists each activation with its image, thin id and device paths.",
        flags: &[],
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
        flags: &[SYNC, DOWNLOAD, SPACE, EXTRACT, POOL_SIZE],
        writes: true,
    },
    Command {
        name: "status",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Pool usage, object counts, runs in flight and recent errors.",
        description: "A read-only overview; never takes the write lock.",
        flags: &[WATCH],
        writes: false,
    },
    Command {
        name: "doctor",
        args: "",
        min_args: 0,
        max_args: Some(0),
        summary: "Health checks before device-mapper work; exit code reflects the worst.",
        description: "Checks pool mode, needs_check and space, processes stuck on dm devices, kernel log errors, memory pressure and I/O wait, each with advice. Warns when the state filesystem has less free than --min-free, and shows the bytes held by partial downloads.",
        flags: &[SPACE],
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
    (70, "internal error"),
    (71, "the pool is unsafe to use (needs_check, read-only, failed)"),
    (73, "cannot create a device, file or directory"),
    (74, "I/O error"),
    (75, "temporary failure: another instance holds the lock, a device is busy, or the pool is short of space; retry later"),
    (77, "permission denied: credentials rejected, access denied, or not root"),
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

pub fn find_command(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// All flags a command accepts, global ones first.
pub fn flags_of(cmd: Option<&'static Command>) -> impl Iterator<Item = &'static Flag> {
    let own = cmd.map(|c| c.flags).unwrap_or(&[]);
    GLOBAL.iter().chain(own.iter().flat_map(|g| g.iter()))
}
