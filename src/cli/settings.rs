//! Invocation → typed settings: the one place where the string-keyed
//! [`Invocation`] becomes the typed values the layers below take.
//!
//! Defaults live only in the flag table ([`super::table`]): every value is
//! read through [`Invocation::number`] and friends, which fall back to the
//! table's default, so nothing here restates one. Ranges are checked when
//! the invocation is parsed; the rules that span more than one value (or a
//! multiple-of rule) are checked here, before any lock is taken or any
//! work is done. Other areas may add their own blocks below.

use std::time::Duration;

use super::Invocation;
use crate::error::{Error, Result};
use crate::fetch::s3::S3Config;
use crate::fetch::FetchOptions;

/// `-q`, `-v` and `--log-format`: how the process logs.
pub fn log_config(inv: &Invocation) -> crate::ops::log::LogConfig {
    crate::ops::log::LogConfig {
        quiet: inv.flag("quiet"),
        verbose: inv.count("verbose"),
        json: inv.get("log-format") == Some("json"),
    }
}

/// The extraction limits (`--max-entries` ...), read through the table.
pub fn extract_limits(inv: &Invocation) -> Result<crate::extract::Limits> {
    Ok(crate::extract::Limits {
        max_entries: number_or_default(inv, "max-entries")?,
        max_file_size: number_or_default(inv, "max-file-size")?,
        max_total_size: number_or_default(inv, "max-total-size")?,
        max_path_len: number_or_default(inv, "max-path-len")?,
        max_depth: number_or_default(inv, "max-depth")?,
        max_header_size: number_or_default(inv, "max-header-size")?,
    })
}

/// A number flag's value, or its table default for a command that does not
/// take the flag.
fn number_or_default(inv: &Invocation, long: &str) -> Result<u64> {
    if crate::cli::table::flags_of(Some(inv.command)).any(|f| f.long == long) {
        inv.number(long)
    } else {
        default_u64(long)
    }
}

/// `--jobs`: file-writer threads, one range everywhere (1..=256, checked at
/// parse time); the number of CPUs when unset.
fn extract_jobs(inv: &Invocation) -> Result<usize> {
    Ok(match inv.u64_opt("jobs")? {
        Some(n) => usize::try_from(n).map_err(|_| Error::usage("--jobs is too large"))?,
        None => crate::extract::default_jobs(),
    })
}

/// The options of `thinimg unpack`: the safe policy unless
/// --keep-privileges / --devices ask for more.
pub fn unpack_options(inv: &Invocation) -> Result<crate::extract::Options> {
    let policy = crate::extract::Policy { privileges: inv.flag("keep-privileges"), devices: inv.flag("devices") };
    Ok(crate::extract::Options { limits: extract_limits(inv)?, jobs: extract_jobs(inv)?, policy })
}

/// `--wait`: how long to queue behind another instance (`None`: not at all).
pub fn wait(inv: &Invocation) -> Result<Option<Duration>> {
    Ok(inv.u64_opt("wait")?.map(Duration::from_secs))
}

/// `--runs-retention`: finished, failed and cancelled runs older than this
/// are pruned from the journal by commands that write.
pub fn runs_retention(inv: &Invocation) -> Result<Duration> {
    Ok(Duration::from_secs(inv.number("runs-retention")?))
}

/// Everything the pipeline takes from the command line, checked before
/// any lock is taken. The S3 settings are kept with their error, if any:
/// only the steps that talk to S3 fail for a bad one.
pub fn pipeline(inv: &Invocation) -> Result<crate::pipeline::Settings> {
    let opts = pipeline_opts(inv)?;
    let pool = pool_request(inv)?;
    Ok(crate::pipeline::Settings {
        state_dir: inv.state_dir(),
        run_dir: inv.run_dir(),
        wait: wait(inv)?,
        runs_retention: runs_retention(inv)?,
        opts,
        prefix: prefix(inv),
        s3: crate::pipeline::Deferred::new(s3_config(inv)),
        // Pulls show progress unless --quiet, and trust the store's hashes.
        fetch: FetchOptions { verify: false, progress: !inv.flag("quiet"), ..fetch_options(inv)? },
        pool,
    })
}

/// The pool `pool create` makes, and the pipeline on first use when none
/// is recorded: `--data-dev`/`--meta-dev` (both or neither; loop files
/// otherwise), `--data-size`, `--block-size` (table defaults for a command
/// without them).
pub fn pool_request(inv: &Invocation) -> Result<crate::pool::CreateRequest> {
    let devices = match (inv.path("data-dev"), inv.path("meta-dev")) {
        (Some(d), Some(m)) => Some((d, m)),
        (None, None) => None,
        _ => return Err(Error::usage("--data-dev and --meta-dev go together")),
    };
    let block_sectors = number_or_default(inv, "block-size")?;
    if block_sectors % 128 != 0 {
        return Err(Error::usage(format!("--block-size {block_sectors} must be a multiple of 128 sectors (64 KiB)")));
    }
    Ok(crate::pool::CreateRequest { devices, data_size: number_or_default(inv, "data-size")?, block_sectors })
}

/// `--prefix` as the S3 listing and the ref names both read it: ending in
/// `/` unless empty.
pub fn prefix(inv: &Invocation) -> String {
    let mut prefix = inv.get("prefix").unwrap_or("").to_string();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    prefix
}

/// What the pipeline's steps need from the command line.
pub fn pipeline_opts(inv: &Invocation) -> Result<crate::pipeline::Opts> {
    let flags: Vec<&str> = crate::cli::table::flags_of(Some(inv.command)).map(|f| f.long).collect();
    let device_size =
        if flags.contains(&"device-size") { inv.number("device-size")? } else { default_u64("device-size")? };
    if device_size % 4096 != 0 {
        return Err(Error::usage(format!("--device-size {device_size} must be a multiple of 4K")));
    }
    let extract = crate::extract::Options {
        limits: extract_limits(inv)?,
        jobs: extract_jobs(inv)?,
        // Full fidelity: build mounts are nosuid,nodev.
        policy: crate::extract::Policy::FULL,
    };
    let download_jobs =
        if flags.contains(&"download-jobs") { inv.number("download-jobs")? } else { default_u64("download-jobs")? };
    let max_blob_size =
        if flags.contains(&"max-blob-size") { inv.number("max-blob-size")? } else { default_u64("max-blob-size")? };
    Ok(crate::pipeline::Opts {
        device_size,
        extract,
        download_jobs: usize::try_from(download_jobs).map_err(|_| Error::usage("--download-jobs is too large"))?,
        max_blob_size,
        unpack_jobs: usize::try_from(number_or_default(inv, "unpack-jobs")?)
            .map_err(|_| Error::usage("--unpack-jobs is too large"))?,
        stream_unpack: stream_unpack(inv, &flags)?,
    })
}

/// `--stream-unpack WHEN` (its table default for commands without the flag).
fn stream_unpack(inv: &Invocation, flags: &[&str]) -> Result<crate::pipeline::StreamUnpack> {
    let word = match inv.get("stream-unpack").filter(|_| flags.contains(&"stream-unpack")) {
        Some(w) => w,
        None => default_text("stream-unpack")?,
    };
    crate::pipeline::StreamUnpack::parse(word)
        .ok_or_else(|| Error::usage(format!("--stream-unpack {word:?}: expected never, last or always")))
}

/// A flag's table default as written there, for commands that do not take the flag.
fn default_text(long: &str) -> Result<&'static str> {
    let f = crate::cli::table::find_flag(long).ok_or_else(|| Error::software(format!("no flag --{long}")))?;
    f.default.ok_or_else(|| Error::software(format!("--{long} has no default")))
}

/// A flag's table default as a number, for commands that do not take the flag.
fn default_u64(long: &str) -> Result<u64> {
    let d = default_text(long)?;
    let f = crate::cli::table::find_flag(long).ok_or_else(|| Error::software(format!("no flag --{long}")))?;
    f.kind
        .check(d)
        .ok()
        .flatten()
        .ok_or_else(|| Error::software(format!("the table default of --{long} ({d:?}) does not parse")))
}

/// `sync`'s own settings.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub unpack_jobs: usize,
    pub all: bool,
    pub prune: bool,
    pub dry_run: bool,
    /// Prune even when the listing is empty or most local images would go.
    pub force: bool,
    pub from: Option<String>,
}

pub fn sync(inv: &Invocation) -> Result<SyncSettings> {
    let s = SyncSettings {
        unpack_jobs: usize::try_from(inv.number("unpack-jobs")?)
            .map_err(|_| Error::usage("--unpack-jobs is too large"))?,
        all: inv.flag("all"),
        prune: inv.flag("prune"),
        dry_run: inv.flag("dry-run"),
        force: inv.flag("force"),
        from: inv.get("from").map(String::from),
    };
    if (s.dry_run || s.force) && !s.prune {
        return Err(Error::usage("sync: --dry-run and --force only apply with --prune"));
    }
    Ok(s)
}

/// How to reach the bucket: `--bucket`, `--prefix`, `--region`,
/// `--endpoint`, `--anonymous`, `--timeout`, `--retries`.
pub fn s3_config(inv: &Invocation) -> Result<S3Config> {
    let bucket = inv.req("bucket")?.to_string();
    if bucket.is_empty() || bucket.contains('/') {
        return Err(Error::usage(format!("--bucket {bucket:?}: not a bucket name")));
    }
    Ok(S3Config {
        bucket,
        prefix: prefix(inv),
        region: inv.get("region").unwrap_or("us-east-1").to_string(),
        endpoints: inv
            .get("endpoint")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        anonymous: inv.flag("anonymous"),
        timeout: match inv.number("timeout")? {
            0 => return Err(Error::usage("--timeout must be at least 1 second")),
            n => Duration::from_secs(n),
        },
        retries: u32::try_from(inv.number("retries")?).map_err(|_| Error::usage("--retries is too large"))?,
    })
}

/// How to fetch: `--download-jobs`, `--max-blob-size`, `--min-free` (table
/// defaults for a command without them, e.g. one that resumes a pull),
/// `--verify` (where the command has it), progress unless `--quiet`/`--json`.
pub fn fetch_options(inv: &Invocation) -> Result<FetchOptions> {
    Ok(FetchOptions {
        jobs: number_or_default(inv, "download-jobs")?.clamp(1, 64) as usize,
        max_blob_size: number_or_default(inv, "max-blob-size")?,
        min_free: number_or_default(inv, "min-free")?,
        verify: inv.flag("verify"),
        progress: !inv.flag("quiet") && !inv.json(),
        // `fetch` pre-stages: its blobs survive gc for the retention period.
        retain: inv.command.name == "fetch",
    })
}

/// `--min-free`: the free-space reserve on the state filesystem.
pub fn min_free(inv: &Invocation) -> Result<u64> {
    inv.u64_opt("min-free")?.ok_or_else(|| Error::usage("--min-free is required"))
}

/// `sync --jitter DURATION`: the longest random sleep before the first
/// request, if set (the table's duration kind: 600, 30s, 10m; at most 24h).
pub fn jitter(inv: &Invocation) -> Result<Option<Duration>> {
    Ok(inv.u64_opt("jitter")?.filter(|&s| s > 0).map(Duration::from_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_default_passes_its_own_check() {
        for f in crate::cli::table::GLOBAL
            .iter()
            .chain(crate::cli::table::COMMANDS.iter().flat_map(|c| c.flags.iter().flat_map(|g| g.iter())))
        {
            if let Some(d) = f.default {
                if f.long != "config" {
                    assert!(f.kind.check(d).is_ok(), "--{} default {d:?}: {:?}", f.long, f.kind.check(d));
                }
            }
        }
    }

    #[test]
    fn defaults_come_from_the_table() {
        let inv = Invocation::for_test("pull", &["golang"], &[]);
        let o = pipeline_opts(&inv).unwrap();
        assert_eq!(
            o.device_size,
            crate::cli::parse_size(crate::cli::table::find_flag("device-size").unwrap().default.unwrap()).unwrap()
        );
        assert_eq!(
            o.download_jobs.to_string(),
            crate::cli::table::find_flag("download-jobs").unwrap().default.unwrap()
        );
        let bad = Invocation::for_test("pull", &["golang"], &[("block-size", "200")]);
        assert!(pipeline(&bad).is_err());
    }

    #[test]
    fn pipeline_settings_for_a_command_without_the_fetch_and_pool_flags() {
        // `rm` (and every writer) may resume a pull that must fetch a blob
        // again or create the pool: the table's defaults apply, as for
        // `pull`, instead of an error about a flag the command lacks.
        let s = pipeline(&Invocation::for_test("rm", &["golang"], &[])).unwrap();
        let want = |long: &str| default_u64(long).unwrap();
        assert_eq!(s.fetch.jobs as u64, want("download-jobs"));
        assert_eq!(s.fetch.max_blob_size, want("max-blob-size"));
        assert_eq!(s.fetch.min_free, want("min-free"));
        assert_eq!((s.pool.data_size, s.pool.block_sectors), (want("data-size"), want("block-size")));
        assert!(s.pool.devices.is_none());
        let pull = pipeline(&Invocation::for_test("pull", &["golang"], &[("download-jobs", "7")])).unwrap();
        assert_eq!(pull.fetch.jobs, 7);
        assert!(!pull.fetch.verify && !pull.fetch.retain);
    }

    #[test]
    fn stream_unpack_is_a_policy_word_defaulting_to_the_last_download() {
        use crate::pipeline::StreamUnpack;
        let opts = |cmd: &str, v: &[(&'static str, &str)]| pipeline_opts(&Invocation::for_test(cmd, &["golang"], v));
        assert_eq!(opts("pull", &[]).unwrap().stream_unpack, StreamUnpack::Last);
        assert_eq!(opts("rm", &[]).unwrap().stream_unpack, StreamUnpack::Last, "table default without the flag");
        for (word, want) in
            [("never", StreamUnpack::Never), ("last", StreamUnpack::Last), ("always", StreamUnpack::Always)]
        {
            assert_eq!(opts("sync", &[("stream-unpack", word)]).unwrap().stream_unpack, want);
        }
        let e = opts("pull", &[("stream-unpack", "1")]).unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::Usage);
        assert!(e.message().contains("never, last or always"), "{}", e.message());
    }

    #[test]
    fn pool_request_rules() {
        let one = Invocation::for_test("pull", &["golang"], &[("data-dev", "/dev/vdb")]);
        assert_eq!(pipeline(&one).unwrap_err().kind(), crate::error::Kind::Usage);
        let both = Invocation::for_test(
            "pool create",
            &[],
            &[("data-dev", "/dev/vdb"), ("meta-dev", "/dev/vdc"), ("data-size", "1G"), ("block-size", "256")],
        );
        let r = pool_request(&both).unwrap();
        assert_eq!(r.devices, Some(("/dev/vdb".into(), "/dev/vdc".into())));
        assert_eq!((r.data_size, r.block_sectors), (1 << 30, 256));
    }

    #[test]
    fn a_bad_s3_setting_fails_only_what_uses_s3() {
        let inv = Invocation::for_test("rm", &["golang"], &[("timeout", "0")]);
        let s = pipeline(&inv).unwrap();
        let e = s.s3.get().unwrap_err();
        assert_eq!(e.kind(), crate::error::Kind::Usage);
        assert!(e.message().contains("--timeout"), "{}", e.message());
        assert_eq!(s.s3.get().unwrap_err().message(), e.message(), "the error is kept, not used up");
    }

    #[test]
    fn refs_and_the_listing_read_one_prefix() {
        // `--prefix foo` lists `foo/...`; a ref given as a full key under it
        // names the same image as the short form.
        for given in ["foo", "foo/"] {
            let inv = Invocation::for_test("pull", &[], &[("prefix", given)]);
            let p = prefix(&inv);
            assert_eq!(p, "foo/");
            assert_eq!(s3_config(&inv).unwrap().prefix, p);
            let name = |r: &str| crate::pipeline::sources::image_name(&p, r).unwrap();
            assert_eq!(name("foo/golang/3.tar"), "golang/3");
            assert_eq!(name("golang/3"), "golang/3");
            assert_eq!(name("golang"), "golang");
        }
        let none = Invocation::for_test("pull", &[], &[("prefix", "")]);
        assert_eq!(prefix(&none), "");
        assert_eq!(crate::pipeline::sources::image_name("", "golang/3.tar").unwrap(), "golang/3");
    }

    #[test]
    fn default_limits_are_the_flag_table_defaults() {
        let d = crate::extract::Limits::default();
        let want = |long: &str| -> u64 {
            let f = crate::cli::table::EXTRACT.iter().find(|f| f.long == long).expect("flag in table");
            crate::cli::parse_size(f.default.expect("a default")).expect("parses")
        };
        assert_eq!(d.max_entries, want("max-entries"));
        assert_eq!(d.max_file_size, want("max-file-size"));
        assert_eq!(d.max_total_size, want("max-total-size"));
        assert_eq!(d.max_path_len, want("max-path-len"));
        assert_eq!(d.max_depth, want("max-depth"));
        assert_eq!(d.max_header_size, want("max-header-size"));
    }

    #[test]
    fn limits_from_flags() {
        let inv = Invocation::for_test(
            "unpack",
            &[],
            &[("max-entries", "10"), ("max-file-size", "1K"), ("max-header-size", "2M"), ("jobs", "3")],
        );
        let o = unpack_options(&inv).unwrap();
        assert_eq!((o.limits.max_entries, o.limits.max_file_size, o.limits.max_header_size), (10, 1024, 2 << 20));
        assert_eq!(o.jobs, 3);
        assert_eq!(o.limits.max_depth, crate::extract::Limits::default().max_depth);
        let bad = Invocation::for_test("unpack", &[], &[("max-entries", "lots")]);
        assert_eq!(extract_limits(&bad).unwrap_err().kind(), crate::error::Kind::Usage);
        let zero = Invocation::for_test("unpack", &[], &[("jobs", "0")]);
        assert_eq!(unpack_options(&zero).unwrap_err().kind(), crate::error::Kind::Usage);
    }
}
