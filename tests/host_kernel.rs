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

#[derive(Clone, Copy, Debug)]
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
        .env("THINIMG_BUCKET", "b")
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
