//! Host tests of the kernel side that need no device-mapper: a host without
//! it (no control node, or a node whose driver is absent) is a host
//! condition that fails fast, once, with advice, and leaves nothing behind.
//!
//! Each command runs in a private mount namespace whose /dev is a fresh
//! tmpfs with only null/zero/urandom and the control-node variant under
//! test, so the tests mean the same on a host that does have dm. Root only
//! (mknod, mount); they panic otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn need_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!("host_kernel tests need root (private mount namespace, mknod)");
    }
}

fn tempdir(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("thinimg-hk-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Control {
    /// No /dev/mapper/control (module not loaded).
    Missing,
    /// The node exists but no driver answers (char 0:0: ENXIO/ENODEV).
    NoDriver,
}

struct Out {
    code: i32,
    stderr: String,
    took: Duration,
}

fn thinimg(state: &Path, control: Control, args: &[&str]) -> Out {
    let node = match control {
        Control::Missing => "",
        Control::NoDriver => "mkdir /dev/mapper; mknod -m 600 /dev/mapper/control c 0 0;",
    };
    let script = format!(
        "set -e; mount --make-rprivate /; mount -t tmpfs -o mode=755 none /dev; \
         mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 444 /dev/urandom c 1 9; {node} \
         exec \"$@\""
    );
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh", env!("CARGO_BIN_EXE_thinimg")])
        .args(args)
        .env("THINIMG_STATE_DIR", state)
        .env("THINIMG_RUN_DIR", state.join("run"))
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .env("THINIMG_BUCKET", "bkt")
        .env("AWS_REGION", "us-east-1")
        .env_remove("THINIMG_FAULT")
        .env_remove("THINIMG_CONFIG")
        .stdin(Stdio::null());
    let t0 = Instant::now();
    let out = c.output().expect("running unshare");
    let took = t0.elapsed();
    Out { code: out.status.code().unwrap_or(-1), stderr: String::from_utf8_lossy(&out.stderr).into_owned(), took }
}

fn runs(state: &Path) -> Vec<(String, String, String)> {
    let db = thinimg::store::Db::open(state).unwrap();
    let mut st = db.conn.prepare("SELECT kind, subject, state FROM runs ORDER BY id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(|r| r.unwrap()).collect()
}

#[test]
fn no_device_mapper_fails_fast_once_with_advice_and_leaves_no_runs() {
    need_root();
    for control in [Control::Missing, Control::NoDriver] {
        let d = tempdir(&format!("{control:?}"));
        let state = d.join("state");
        for args in [
            &["pull", "node"][..],
            &["activate", "node", "--name", "vm-1"],
            &["activate", "python/3", "--name", "vm-2", "--json"],
            &["sync", "node", "python", "golang/2"],
            &["deactivate", "vm-1"],
        ] {
            let r = thinimg(&state, control, args);
            if args[0] == "deactivate" {
                // No such activation: the usage check comes first and is fine.
                assert_ne!(r.code, 74, "{control:?} {args:?}: {}", r.stderr);
                continue;
            }
            assert_eq!(r.code, 71, "{control:?} {args:?}: exit {} stderr:\n{}", r.code, r.stderr);
            assert!(
                r.stderr.contains("modprobe dm-mod dm-thin-pool"),
                "{control:?} {args:?}: no advice:\n{}",
                r.stderr
            );
            assert!(!r.stderr.contains("retrying"), "{control:?} {args:?}: retried:\n{}", r.stderr);
            assert!(r.took < Duration::from_secs(1), "{control:?} {args:?} took {:?}", r.took);
        }
        assert_eq!(runs(&state), vec![], "{control:?}: runs were left behind");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

#[test]
fn an_interrupted_kernel_run_does_not_make_other_commands_pay() {
    need_root();
    let d = tempdir("resume");
    let state = d.join("state");
    {
        let mut db = thinimg::store::Db::open(&state).unwrap();
        thinimg::journal::start(&mut db.conn, &thinimg::pipeline::pull::spec("node", "node")).unwrap();
        thinimg::journal::start(&mut db.conn, &thinimg::pipeline::activate::spec("vm-9", "python", "python")).unwrap();
    }
    for control in [Control::Missing, Control::NoDriver] {
        let r = thinimg(&state, control, &["gc", "--dry-run"]);
        assert_eq!(r.code, 0, "{control:?}: gc --dry-run exit {}:\n{}", r.code, r.stderr);
        assert!(r.took < Duration::from_secs(1), "{control:?}: gc --dry-run took {:?}", r.took);
        assert!(!r.stderr.contains("retrying"), "{control:?}: retried:\n{}", r.stderr);
    }
    // Still waiting to be resumed once device-mapper is back, not failed.
    let states: Vec<String> = runs(&state).into_iter().map(|r| r.2).collect();
    assert_eq!(states, vec!["active", "active"]);
    std::fs::remove_dir_all(&d).unwrap();
}

fn plain(state: &Path, cwd: &Path, args: &[&str]) -> Out {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_thinimg"))
        .args(args)
        .current_dir(cwd)
        .env("THINIMG_STATE_DIR", state)
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
        .env("THINIMG_BUCKET", "bkt")
        .env_remove("THINIMG_FAULT")
        .env_remove("THINIMG_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t0.elapsed(),
    }
}

/// Issue 10 item 17: `--jobs` has one range, 1..=256, for every command.
#[test]
fn jobs_has_one_range_everywhere() {
    let d = tempdir("jobs");
    let state = d.join("state");
    std::fs::write(d.join("l.tar"), [0u8; 1024]).unwrap();
    for (args, want) in [
        (&["pull", "node", "--jobs", "1000"][..], 64),
        (&["pull", "node", "--jobs", "0"], 64),
        (&["unpack", "--dest", "out", "--jobs", "257", "l.tar"], 64),
        (&["unpack", "--dest", "out", "--jobs", "0", "l.tar"], 64),
        (&["sync", "node", "--jobs", "100000"], 64),
    ] {
        let r = plain(&state, &d, args);
        assert_eq!(r.code, want, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("--jobs"), "{args:?}: {}", r.stderr);
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Issue 10 item 17: as root, a state dir others can write, or that
/// another user owns, is refused before anything in it is trusted.
#[test]
fn root_refuses_a_state_dir_others_control() {
    need_root();
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir("modes");
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    for mode in [0o777, 0o775, 0o757] {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
        let r = plain(&state, &d, &["gc", "--dry-run"]);
        assert_eq!(r.code, 77, "mode {mode:o}: {}", r.stderr);
        assert!(r.stderr.contains("writable by group or others"), "{}", r.stderr);
        assert!(!state.join("state.db").exists(), "a refused state dir was written to");
    }
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let r = plain(&state, &d, &["gc", "--dry-run"]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("owned by uid 65534"), "{}", r.stderr);
    nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    let r = plain(&state, &d, &["gc", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Issue 10 item 17: a lock file planted as a symlink is never followed.
#[test]
fn a_symlinked_lock_file_is_refused_and_its_target_untouched() {
    let d = tempdir("locksym");
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(d.join("victim"), "precious").unwrap();
    std::os::unix::fs::symlink(d.join("victim"), state.join("lock")).unwrap();
    let r = plain(&state, &d, &["gc", "--dry-run"]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("symlink"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(d.join("victim")).unwrap(), "precious");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Issue 10 item 17: a relative --state-dir/--run-dir is made absolute at
/// parse time, so nothing relative is ever recorded.
#[test]
fn relative_state_and_run_dirs_become_absolute() {
    let thinimg::cli::Parsed::Run(inv) =
        thinimg::cli::parse(["--state-dir", "rel/st", "--run-dir", "./run", "runs"]).unwrap()
    else {
        panic!("not a run")
    };
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    assert_eq!(inv.state_dir(), cwd.join("rel/st"));
    assert_eq!(inv.run_dir(), cwd.join("run"));
}

/// Issue 11 item 7: `gc --dry-run` changes nothing in the kernel and works
/// without device-mapper, whatever pool is recorded (a finished one that is
/// not assembled, or an unfinished creation it must not "finish").
#[test]
fn gc_dry_run_never_creates_or_assembles_a_pool() {
    need_root();
    for state_kind in [thinimg::store::thin_pool::PoolState::Ready, thinimg::store::thin_pool::PoolState::Creating] {
        let d = tempdir(&format!("gcdry-{state_kind:?}"));
        let state = d.join("state");
        {
            let db = thinimg::store::Db::open(&state).unwrap();
            let name = thinimg::pool::names::default_pool_name(&state).unwrap();
            let spec = thinimg::pool::spec::loop_spec(&state.join("pool"), name, 1 << 30, 128).unwrap();
            thinimg::store::thin_pool::save(&db.conn, &spec, state_kind).unwrap();
        }
        for control in [Control::Missing, Control::NoDriver] {
            let r = thinimg(&state, control, &["gc", "--dry-run"]);
            assert_eq!(r.code, 0, "{state_kind:?} {control:?}: exit {}:\n{}", r.code, r.stderr);
            assert!(r.took < Duration::from_secs(1), "{control:?}: took {:?}", r.took);
        }
        assert!(!state.join("pool").exists(), "{state_kind:?}: a dry run made pool files");
        let db = thinimg::store::Db::open(&state).unwrap();
        assert_eq!(thinimg::store::thin_pool::load(&db.conn).unwrap().unwrap().1, state_kind);
        std::fs::remove_dir_all(&d).unwrap();
    }
}

fn record_loop_pool(state: &Path, st: thinimg::store::thin_pool::PoolState, files: bool) -> thinimg::pool::PoolSpec {
    let db = thinimg::store::Db::open(state).unwrap();
    let name = thinimg::pool::names::default_pool_name(state).unwrap();
    let spec = thinimg::pool::spec::loop_spec(&state.join("pool"), name, 64 << 20, 128).unwrap();
    thinimg::store::thin_pool::save(&db.conn, &spec, st).unwrap();
    if files {
        thinimg::pool::spec::make_loop_files(&spec).unwrap();
    }
    spec
}

/// Issue 11 item 7: no accidental loop pool. One larger than the free
/// space is refused before anything is recorded or made; configured
/// devices that are not the recorded pool's are refused with 78 naming
/// both, never silently ignored.
#[test]
fn loop_pools_fit_and_configured_devices_must_match_the_recorded_pool() {
    need_root();
    let d = tempdir("loopfit");
    let state = d.join("state");
    let r = thinimg(&state, Control::Missing, &["pool", "create", "--data-size", "1000T"]);
    assert_eq!(r.code, 73, "{}", r.stderr);
    assert!(r.stderr.contains("does not fit"), "{}", r.stderr);
    let db = thinimg::store::Db::open(&state).unwrap();
    assert!(thinimg::store::thin_pool::load(&db.conn).unwrap().is_none(), "a refused pool was recorded");
    assert!(!state.join("pool").exists(), "a refused pool made files");
    drop(db);

    // Without dm, a fitting pool is refused fast with 71, leaving nothing.
    let r = thinimg(&state, Control::Missing, &["pool", "create", "--data-size", "64M"]);
    assert_eq!(r.code, 71, "{}", r.stderr);
    assert!(thinimg::store::thin_pool::load(&thinimg::store::Db::open(&state).unwrap().conn).unwrap().is_none());

    for st in [thinimg::store::thin_pool::PoolState::Ready, thinimg::store::thin_pool::PoolState::Creating] {
        let spec = record_loop_pool(&state, st, false);
        std::fs::write(d.join("data"), "").unwrap();
        std::fs::write(d.join("meta"), "").unwrap();
        let (dd, md) = (d.join("data"), d.join("meta"));
        let r = thinimg(
            &state,
            Control::Missing,
            &["pool", "create", "--data-dev", dd.to_str().unwrap(), "--meta-dev", md.to_str().unwrap()],
        );
        assert_eq!(r.code, 78, "{st:?}: {}", r.stderr);
        for want in [dd.to_str().unwrap(), spec.data_path.to_str().unwrap(), "pool destroy"] {
            assert!(r.stderr.contains(want), "{st:?}: message lacks {want}:\n{}", r.stderr);
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Issue 11 item 7: `pool destroy` refuses while chains exist unless
/// forced, changes nothing with --dry-run, and rolls back an unfinished
/// creation (row and loop files), also without device-mapper.
#[test]
fn pool_destroy_refuses_with_chains_and_rolls_back_an_unfinished_creation() {
    need_root();
    let d = tempdir("destroy");
    let state = d.join("state");
    let r = thinimg(&state, Control::Missing, &["pool", "destroy"]);
    assert_eq!(r.code, 66, "no pool: {}", r.stderr);

    let spec = record_loop_pool(&state, thinimg::store::thin_pool::PoolState::Creating, true);
    assert!(spec.data_path.exists() && spec.meta_path.exists());
    {
        let mut db = thinimg::store::Db::open(&state).unwrap();
        let tx = db.conn.transaction().unwrap();
        tx.execute(
            "INSERT INTO blobs (digest, size, state, created_at) VALUES (?1, 1, 'present', 0)",
            ["b".repeat(64)],
        )
        .unwrap();
        let id = thinimg::pool::manager::alloc_thin_id(
            &tx,
            thinimg::store::thin_pool::ThinRole::Chain,
            None,
            thinimg::dm::Sectors(1 << 17),
        )
        .unwrap();
        let chain = thinimg::store::ids::ChainId::parse(&"c".repeat(64)).unwrap();
        let blob = thinimg::fetch::blobstore::BlobDigest::parse(&"b".repeat(64)).unwrap();
        thinimg::store::images::insert_chain_building(&tx, &chain, None, &blob, 1, id).unwrap();
        tx.commit().unwrap();
    }
    let r = thinimg(&state, Control::Missing, &["pool", "destroy"]);
    assert_eq!(r.code, 75, "chains exist: {}", r.stderr);
    assert!(r.stderr.contains("--force"), "{}", r.stderr);
    let r = thinimg(&state, Control::Missing, &["pool", "destroy", "--force", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(spec.data_path.exists(), "a dry run removed files");
    assert!(thinimg::store::thin_pool::load(&thinimg::store::Db::open(&state).unwrap().conn).unwrap().is_some());
    for control in [Control::NoDriver, Control::Missing] {
        let r = thinimg(&state, control, &["pool", "destroy", "--force"]);
        if control == Control::NoDriver {
            assert_eq!(r.code, 0, "{}", r.stderr);
        } else {
            assert_eq!(r.code, 66, "already destroyed: {}", r.stderr);
        }
    }
    let db = thinimg::store::Db::open(&state).unwrap();
    assert!(thinimg::store::thin_pool::load(&db.conn).unwrap().is_none());
    assert_eq!(thinimg::store::thin_pool::thin_count(&db.conn).unwrap(), 0);
    assert!(!spec.data_path.exists() && !spec.meta_path.exists(), "loop files left");
    std::fs::remove_dir_all(&d).unwrap();
}

/// UX review #32 and #19: one device as both data and metadata is a usage
/// error; a half-made pool is reported with both ways out, not as "retry".
#[test]
fn same_device_twice_and_a_half_made_pool_are_explained() {
    need_root();
    let d = tempdir("same");
    let state = d.join("state");
    std::fs::write(d.join("f"), vec![0u8; 4096]).unwrap();
    let f = d.join("f");
    let r = thinimg(
        &state,
        Control::Missing,
        &["pool", "create", "--data-dev", f.to_str().unwrap(), "--meta-dev", f.to_str().unwrap()],
    );
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stderr.contains("same device"), "{}", r.stderr);
    record_loop_pool(&state, thinimg::store::thin_pool::PoolState::Creating, false);
    let r = thinimg(&state, Control::Missing, &["pool", "status"]);
    assert_ne!(r.code, 75, "{}", r.stderr);
    assert!(r.stderr.contains("pool destroy") && r.stderr.contains("pool create"), "{}", r.stderr);
    std::fs::remove_dir_all(&d).unwrap();
}
