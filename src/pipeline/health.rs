//! Read-only views of the host for `status` and `doctor`: pool usage,
//! object counts, runs in flight, and health checks with advice. Nothing
//! here changes the pool, the kernel or the database.

use serde::Serialize;

use crate::error::Result;
use crate::store::Db;

#[derive(Debug, Serialize, Clone)]
pub struct PoolView {
    /// Serialized with the same names as `pool status --json`.
    #[serde(rename = "dm_name")]
    pub name: String,
    pub kind: String,
    #[serde(rename = "assembled")]
    pub present: bool,
    pub mode: Option<String>,
    pub needs_check: Option<bool>,
    pub data_used_pct: Option<f64>,
    pub meta_used_pct: Option<f64>,
    pub data_used_bytes: Option<u64>,
    pub data_total_bytes: Option<u64>,
    pub thin_devices: usize,
    pub error: Option<String>,
}

/// The recorded pool and, if its dm device is up, its status. Never assembles.
pub fn pool_view(db: &Db, run_dir: &std::path::Path) -> Result<Option<PoolView>> {
    let Some((spec, _)) = crate::store::thin_pool::load(&db.conn)? else { return Ok(None) };
    let thin = crate::store::thin_pool::thin_count(&db.conn)?;
    let mut v = PoolView {
        name: spec.dm_name.as_str().to_string(),
        kind: spec.kind.as_str().to_string(),
        present: false,
        mode: None,
        needs_check: None,
        data_used_pct: None,
        meta_used_pct: None,
        data_used_bytes: None,
        data_total_bytes: None,
        thin_devices: usize::try_from(thin).unwrap_or(usize::MAX),
        error: None,
    };
    match crate::pool::Pool::find(&spec, run_dir) {
        Ok(Some(p)) => {
            v.present = true;
            match p.status() {
                Ok(crate::pool::PoolStatus::Active(u)) => {
                    let block = spec.block_sectors.0 * 512;
                    // The same spelling as `pool status --json` (serde's).
                    v.mode = serde_json::to_value(u.mode).ok().and_then(|m| m.as_str().map(String::from));
                    v.needs_check = Some(u.needs_check);
                    v.data_used_pct = Some(pct(u.data_used, u.data_total));
                    v.meta_used_pct = Some(pct(u.meta_used, u.meta_total));
                    v.data_used_bytes = Some(u.data_used * block);
                    v.data_total_bytes = Some(u.data_total * block);
                }
                Ok(other) => v.mode = Some(format!("{other:?}").to_lowercase()),
                Err(e) => v.error = Some(e.full_message()),
            }
        }
        Ok(None) => {}
        Err(e) => v.error = Some(e.full_message()),
    }
    Ok(Some(v))
}

/// used/total as a percentage with one decimal (0 for an empty total).
pub fn pct(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (used as f64 * 1000.0 / total as f64).round() / 10.0
    }
}

/// Where the state directory's space goes, and what is left.
#[derive(Debug, Serialize, Default)]
pub struct SpaceView {
    pub blobs: i64,
    pub blob_bytes: i64,
    /// Partial downloads under blobs/partial/ (kept to resume).
    pub partial_downloads: u64,
    pub partial_bytes: u64,
    /// Loop-pool files: apparent size and bytes actually allocated on disk.
    pub pool_files: Vec<PoolFile>,
    pub pool_data_used_bytes: Option<u64>,
    pub pool_data_total_bytes: Option<u64>,
    pub pool_meta_used_pct: Option<f64>,
    /// Free space of the filesystem holding the state directory.
    pub fs_free_bytes: Option<u64>,
    pub fs_total_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct PoolFile {
    pub path: std::path::PathBuf,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
}

/// Free and total bytes of the filesystem holding `path` (for unprivileged users).
pub fn fs_space(path: &std::path::Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frag = st.fragment_size();
    Some((st.blocks_available().saturating_mul(frag), st.blocks().saturating_mul(frag)))
}

pub fn space(state_dir: &std::path::Path, counts: Option<&Counts>, pool: Option<&PoolView>) -> SpaceView {
    use std::os::unix::fs::MetadataExt;
    let mut v = SpaceView::default();
    if let Some(c) = counts {
        v.blobs = c.blobs;
        v.blob_bytes = c.blob_bytes;
    }
    if let Ok(rd) = std::fs::read_dir(state_dir.join("blobs").join("partial")) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_file() {
                    v.partial_downloads += 1;
                    v.partial_bytes += m.len();
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(state_dir.join("pool")) {
        let mut files: Vec<PoolFile> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| PoolFile { path: e.path(), size_bytes: m.len(), allocated_bytes: m.blocks() * 512 })
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        v.pool_files = files;
    }
    if let Some(p) = pool {
        v.pool_data_used_bytes = p.data_used_bytes;
        v.pool_data_total_bytes = p.data_total_bytes;
        v.pool_meta_used_pct = p.meta_used_pct;
    }
    if let Some((free, total)) = fs_space(state_dir) {
        v.fs_free_bytes = Some(free);
        v.fs_total_bytes = Some(total);
    }
    v
}

pub use crate::store::stats::Counts;

pub fn counts(db: &Db) -> Result<Counts> {
    crate::store::stats::counts(&db.conn)
}

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Level,
    pub detail: String,
    pub advice: Option<String>,
}

fn check(name: &'static str, status: Level, detail: impl Into<String>, advice: Option<&str>) -> Check {
    Check { name, status, detail: detail.into(), advice: advice.map(String::from) }
}

/// All doctor checks, in order. `config_errors` are the config file's
/// problems found at parse time (doctor runs on despite them).
pub fn doctor(state_dir: &std::path::Path, run_dir: &std::path::Path, config_errors: &[String]) -> Vec<Check> {
    let mut out = Vec::new();
    if config_errors.is_empty() {
        out.push(check("config", Level::Ok, "every key and value valid", None));
    } else {
        out.push(check(
            "config",
            Level::Fail,
            config_errors.join(" | "),
            Some(
                "fix the file ('thinimg config check' lists every problem); every other command refuses to run with it",
            ),
        ));
    }
    // Free space of the state filesystem is checked by the caller against
    // --min-free (cmd::ops::doctor), with the partial downloads it holds.
    // Kernel support.
    if std::path::Path::new("/dev/mapper/control").exists() {
        match crate::dm::Dm::open().and_then(|d| d.version().map_err(crate::Error::from)) {
            Ok(v) => out.push(check("device-mapper", Level::Ok, format!("interface {}.{}.{}", v[0], v[1], v[2]), None)),
            Err(e) => {
                let advice =
                    if e.kind() == crate::error::Kind::NoPerm { "run as root" } else { crate::dm::MODPROBE_ADVICE };
                out.push(check("device-mapper", Level::Fail, e.full_message(), Some(advice)))
            }
        }
    } else {
        out.push(check(
            "device-mapper",
            Level::Fail,
            "/dev/mapper/control does not exist",
            Some("modprobe dm-mod dm-thin-pool (kernel needs CONFIG_DM_THIN_PROVISIONING)"),
        ));
    }
    let thin = std::fs::read_to_string("/proc/devices").map(|s| s.contains("device-mapper")).unwrap_or(false)
        && std::fs::read_to_string("/proc/modules").map(|s| s.contains("dm_thin_pool")).unwrap_or(true);
    if !thin {
        out.push(check("thin-pool target", Level::Warn, "dm_thin_pool is not loaded", Some("modprobe dm-thin-pool")));
    }
    match which("mkfs.ext4") {
        true => out.push(check("mkfs.ext4", Level::Ok, "found", None)),
        false => out.push(check("mkfs.ext4", Level::Fail, "not on PATH", Some("install e2fsprogs"))),
    }

    // The database and the pool.
    match Db::open_existing(state_dir) {
        Ok(None) => {
            out.push(check("database", Level::Ok, format!("{} has no database yet", state_dir.display()), None))
        }
        Ok(Some(db)) => {
            match crate::store::stats::quick_check(&db.conn) {
                Ok(s) if s == "ok" => out.push(check("database", Level::Ok, "quick_check ok", None)),
                Ok(s) => out.push(check("database", Level::Fail, s, Some("restore state.db from backup; run gc"))),
                Err(e) => out.push(check("database", Level::Fail, e.to_string(), None)),
            }
            if let Ok(c) = counts(&db) {
                if c.runs_failed > 0 {
                    out.push(check(
                        "runs",
                        Level::Warn,
                        format!("{} unresolved failed run(s): the latest run of its subject failed", c.runs_failed),
                        Some("'thinimg runs' lists them and 'thinimg runs show ID' explains one; fix the cause and run again (a later success resolves it), or 'thinimg cancel --failed'"),
                    ));
                }
            }
            match pool_view(&db, run_dir) {
                Ok(None) => out.push(check("pool", Level::Ok, "no pool created yet", None)),
                Ok(Some(p)) if !p.present => out.push(check(
                    "pool",
                    Level::Warn,
                    format!("pool {} is not assembled (after a reboot?)", p.name),
                    Some("any writing command (e.g. 'thinimg gc') re-assembles it"),
                )),
                Ok(Some(p)) => {
                    let mode = p.mode.clone().unwrap_or_default();
                    if p.needs_check == Some(true)
                        || mode.contains("fail")
                        || mode.contains("ro")
                        || mode.contains("error")
                    {
                        out.push(check(
                            "pool",
                            Level::Fail,
                            format!("pool {} mode {mode}, needs_check {:?}", p.name, p.needs_check),
                            Some("stop using the pool; run thin_check/thin_repair on its metadata"),
                        ));
                    } else {
                        out.push(check("pool", Level::Ok, format!("pool {} mode {mode}", p.name), None));
                    }
                    for (what, v) in [("data", p.data_used_pct), ("metadata", p.meta_used_pct)] {
                        let v = v.unwrap_or(0.0);
                        let (lvl, adv) = if v >= 95.0 {
                            (Level::Fail, Some("free space: 'thinimg gc', remove images, or grow the pool"))
                        } else if v >= 80.0 {
                            (Level::Warn, Some("run 'thinimg gc' or grow the pool soon"))
                        } else {
                            (Level::Ok, None)
                        };
                        out.push(check(
                            if what == "data" { "pool data space" } else { "pool metadata space" },
                            lvl,
                            format!("{v:.1}% used"),
                            adv,
                        ));
                    }
                }
                Err(e) => out.push(check("pool", Level::Fail, e.full_message(), None)),
            }
        }
        Err(e) => {
            let advice = match e.kind() {
                crate::error::Kind::NoPerm | crate::error::Kind::CantCreate => "check permissions of the state dir",
                crate::error::Kind::Config => "upgrade thinimg: the database was written by a newer version",
                _ => "see the message: restore state.db from a backup, or move the stray files away",
            };
            out.push(check("database", Level::Fail, e.full_message(), Some(advice)))
        }
    }

    // Processes stuck in uninterruptible sleep (often I/O on a full or failed pool).
    let stuck = d_state_processes();
    if stuck.is_empty() {
        out.push(check("D-state processes", Level::Ok, "none", None));
    } else {
        out.push(check(
            "D-state processes",
            Level::Warn,
            stuck.join(", "),
            Some("processes blocked in the kernel; check the pool's space and the kernel log"),
        ));
    }
    // Kernel log.
    match kernel_log_errors() {
        Some(lines) if !lines.is_empty() => out.push(check(
            "kernel log",
            Level::Warn,
            lines.join(" | "),
            Some("recent device-mapper errors; see dmesg"),
        )),
        Some(_) => out.push(check("kernel log", Level::Ok, "no recent device-mapper errors", None)),
        None => out.push(check("kernel log", Level::Warn, "cannot read /dev/kmsg", Some("run as root"))),
    }
    // Pressure.
    for (res, name) in [("memory", "memory pressure"), ("io", "I/O wait")] {
        match psi_avg10(res) {
            Some(v) if v >= 40.0 => out.push(check(
                name,
                Level::Fail,
                format!("{res} pressure some avg10 {v:.1}%"),
                Some("the host is thrashing; postpone image work"),
            )),
            Some(v) if v >= 10.0 => {
                out.push(check(name, Level::Warn, format!("{res} pressure some avg10 {v:.1}%"), None))
            }
            Some(v) => out.push(check(name, Level::Ok, format!("{res} pressure some avg10 {v:.1}%"), None)),
            None => out.push(check(name, Level::Ok, "pressure stall information not available", None)),
        }
    }
    out
}

fn which(cmd: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let found = path.split(':').chain(["/sbin", "/usr/sbin"]).any(|d| std::path::Path::new(d).join(cmd).exists());
    found
}

fn d_state_processes() -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // comm may hold spaces: the state follows the last ')'.
        let Some(close) = stat.rfind(')') else { continue };
        if stat[close + 1..].trim_start().starts_with('D') {
            let comm = stat.find('(').map(|o| &stat[o + 1..close]).unwrap_or("?");
            let wchan = std::fs::read_to_string(e.path().join("wchan")).unwrap_or_default();
            out.push(format!("{pid} ({comm}) in {}", if wchan.is_empty() { "?" } else { wchan.trim() }));
        }
    }
    out
}

fn kernel_log_errors() -> Option<Vec<String>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                let msg = rec.split_once(';').map(|(_, m)| m).unwrap_or(&rec).trim().to_string();
                let l = msg.to_ascii_lowercase();
                if (l.contains("device-mapper") || l.contains("thin"))
                    && (l.contains("error")
                        || l.contains("fail")
                        || l.contains("needs_check")
                        || l.contains("out of data space")
                        || l.contains("read-only"))
                {
                    out.push(msg);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue, // overwritten records
            Err(_) => break,
        }
    }
    let n = out.len();
    Some(out.into_iter().skip(n.saturating_sub(5)).collect())
}

fn psi_avg10(res: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/pressure/{res}")).ok()?;
    let line = s.lines().find(|l| l.starts_with("some"))?;
    line.split_whitespace().find_map(|kv| kv.strip_prefix("avg10=")).and_then(|v| v.parse().ok())
}

/// The `thinimg_last_run_*{command="X"}` samples of a metrics file as it is:
/// command → [timestamp, exit code, duration]. Unreadable or foreign lines
/// are skipped (the file is ours to rewrite).
fn previous_outcomes(path: &std::path::Path) -> std::collections::BTreeMap<String, [f64; 3]> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return out };
    for line in text.lines() {
        let Some((metric, rest)) = line.split_once("{command=\"") else { continue };
        let i = match metric {
            "thinimg_last_run_timestamp_seconds" => 0,
            "thinimg_last_run_exit_code" => 1,
            "thinimg_last_run_duration_seconds" => 2,
            _ => continue,
        };
        let Some((cmd, value)) = rest.rsplit_once("\"} ") else { continue };
        let Ok(v) = value.trim().parse::<f64>() else { continue };
        if cmd.contains(['\\', '"']) {
            continue;
        }
        out.entry(cmd.to_string()).or_insert([0.0; 3])[i] = v;
    }
    out
}

/// Prometheus textfile (node_exporter textfile collector format), written
/// atomically (temp file + fsync + rename) so the collector never reads a
/// half-written file. Counts and totals come from the database (they are
/// cumulative over the host's history); the last command's outcome and
/// duration from this process.
pub fn write_metrics(
    path: &std::path::Path,
    state_dir: &std::path::Path,
    run_dir: &std::path::Path,
    command: &str,
    exit_code: u8,
    seconds: f64,
) -> Result<()> {
    use std::fmt::Write as _;
    let mut m = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(m, "{name}{labels} {v}");
        }
    };
    let now = crate::ops::output::now() as f64;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    // Serialize with other thinimg processes writing the same file (a
    // read-only `status` does not take the state lock): flock the directory.
    let dir_fd = std::fs::File::open(dir).map_err(|e| crate::Error::io(format!("opening {}", dir.display()), e))?;
    let _guard = nix::fcntl::Flock::lock(dir_fd, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| crate::Error::io(format!("locking {}", dir.display()), std::io::Error::from(e)))?;
    // Each command keeps its own last outcome: samples of other commands
    // are carried over from the file as it is.
    let mut last: std::collections::BTreeMap<String, [f64; 3]> = previous_outcomes(path);
    last.insert(command.to_string(), [now, f64::from(exit_code), seconds]);
    let label =
        |c: &str| format!("{{command=\"{}\"}}", c.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"));
    for (i, (name, help)) in [
        ("thinimg_last_run_timestamp_seconds", "When the last run of each thinimg command ended."),
        ("thinimg_last_run_exit_code", "Exit code of the last run of each thinimg command."),
        ("thinimg_last_run_duration_seconds", "Wall time of the last run of each thinimg command."),
    ]
    .into_iter()
    .enumerate()
    {
        let samples: Vec<(String, f64)> = last.iter().map(|(c, v)| (label(c), v[i])).collect();
        gauge(name, help, "gauge", &samples);
    }
    if let Ok(Some(db)) = Db::open_existing(state_dir) {
        if let Ok(c) = counts(&db) {
            gauge("thinimg_blobs", "Blobs in the local store.", "gauge", &[(String::new(), c.blobs as f64)]);
            gauge(
                "thinimg_runs_unresolved_failures",
                "Failed runs that no later run of the same kind and subject replaced.",
                "gauge",
                &[(String::new(), c.runs_failed as f64)],
            );
            gauge(
                "thinimg_blob_bytes",
                "Bytes of blobs in the local store.",
                "gauge",
                &[(String::new(), c.blob_bytes as f64)],
            );
            gauge(
                "thinimg_rejected_blobs",
                "Blobs rejected as hostile or invalid.",
                "gauge",
                &[(String::new(), c.rejected_blobs as f64)],
            );
            gauge("thinimg_chains", "Layer chains built (thin devices).", "gauge", &[(String::new(), c.chains as f64)]);
            gauge(
                "thinimg_images",
                "Local images by state.",
                "gauge",
                &[
                    ("{state=\"ready\"}".into(), c.images_ready as f64),
                    ("{state=\"pulling\"}".into(), (c.images - c.images_ready) as f64),
                ],
            );
            gauge(
                "thinimg_activations",
                "Activations by state.",
                "gauge",
                &[
                    ("{state=\"active\"}".into(), c.activations_active as f64),
                    ("{state=\"other\"}".into(), (c.activations - c.activations_active) as f64),
                ],
            );
        }
        if let Ok(runs) = crate::store::stats::runs_by_kind_state(&db.conn) {
            let rows: Vec<(String, f64)> = runs
                .into_iter()
                .map(|(kind, state, n)| (format!("{{kind=\"{kind}\",state=\"{state}\"}}"), n as f64))
                .collect();
            gauge("thinimg_runs", "Journaled runs by kind and state.", "gauge", &rows);
        }
        if let Ok(Some(p)) = pool_view(&db, run_dir) {
            gauge(
                "thinimg_pool_up",
                "1 if the pool's dm device is present.",
                "gauge",
                &[(String::new(), if p.present { 1.0 } else { 0.0 })],
            );
            if let (Some(u), Some(t)) = (p.data_used_bytes, p.data_total_bytes) {
                gauge("thinimg_pool_data_used_bytes", "Pool data space used.", "gauge", &[(String::new(), u as f64)]);
                gauge("thinimg_pool_data_total_bytes", "Pool data space.", "gauge", &[(String::new(), t as f64)]);
            }
            if let Some(v) = p.meta_used_pct {
                gauge(
                    "thinimg_pool_metadata_used_ratio",
                    "Pool metadata space used, 0..1.",
                    "gauge",
                    &[(String::new(), v / 100.0)],
                );
            }
            if let Some(nc) = p.needs_check {
                gauge(
                    "thinimg_pool_needs_check",
                    "1 if the pool's metadata needs checking.",
                    "gauge",
                    &[(String::new(), if nc { 1.0 } else { 0.0 })],
                );
            }
        }
    }
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("metrics"),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // A fresh file only: never follow or reuse whatever sits at the
        // predictable temp name (a planted symlink would be written through).
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A leftover of an earlier process with our pid: unlink it
                // (unlink never follows) and create afresh, once.
                std::fs::remove_file(&tmp)?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&tmp)?
            }
            r => r?,
        };
        f.write_all(m.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        crate::Error::io(format!("writing metrics file {}", path.display()), e)
    })
}
