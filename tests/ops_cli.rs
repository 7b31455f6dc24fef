//! Operator-facing contract on the host (no device-mapper needed): every
//! documented exit code is produced by a real situation, `--metrics-file`
//! output parses with Prometheus' own Python parser, read-only commands
//! work without taking the lock, and `doctor`/`status` speak JSON.
//! Exit codes that need a kernel with device-mapper (73 name conflict,
//! 71 unhealthy pool) are covered in tests/kernel_pipeline.rs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{S3Server, Thinimg};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_thinimg")
}

fn run_in(state: &Path, args: &[&str]) -> common::Run {
    let out = Command::new(bin())
        .env("THINIMG_STATE_DIR", state)
        .env("THINIMG_RUN_DIR", state.join("run"))
        .env("THINIMG_CONFIG", "/dev/null")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    common::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn usage_errors_exit_64_with_a_message() {
    let d = common::tempdir("usage");
    for args in [
        &["frobnicate"][..],
        &["fetch"][..],
        &["activate", "golang"][..],
        &["activate", "golang", "--name", "../x"][..],
        &["images", "--bogus"][..],
        &["--log-format", "xml", "images"][..],
        &["pull", "golang/01"][..],
        &["sync"][..],
        &["cancel", "abc"][..],
    ] {
        let r = run_in(&d, args);
        assert_eq!(r.code, 64, "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("thinimg: "), "{args:?}: {}", r.stderr);
    }
    // Help and version never touch the state dir.
    let r = run_in(Path::new("/nonexistent/state"), &["--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Exit codes:"));
    assert!(!Path::new("/nonexistent/state").exists());
}

#[test]
fn no_such_image_or_run_exits_66() {
    let srv = S3Server::shared();
    srv.put("pub", "oc66/golang/1.tar", &common::tar_layer(1, 1000));
    let t = Thinimg::new(srv, "pub", "oc66/");
    let r = t.run(&["fetch", "nosuchfamily"], &[]);
    assert_eq!(r.code, 66, "{}", r.stderr);
    assert!(r.stderr.contains("nosuchfamily"), "{}", r.stderr);
    let r = t.run(&["fetch", "golang/2"], &[]);
    assert_eq!(r.code, 66, "{}", r.stderr);
    let r = t.run(&["cancel", "12345"], &[]);
    assert_eq!(r.code, 66, "{}", r.stderr);
    let r = t.run(&["deactivate", "nobody"], &[]);
    assert_eq!(r.code, 66, "{}", r.stderr);
}

#[test]
fn unreachable_s3_exits_69() {
    // A port nothing listens on: connection refused, retried, then 69.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = common::tempdir("oc69");
    let out = Command::new(bin())
        .env("THINIMG_STATE_DIR", &d)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("THINIMG_ANONYMOUS", "1")
        .args(["ls-remote"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn newer_database_schema_exits_78_saying_upgrade() {
    let d = common::tempdir("oc70");
    let r = run_in(&d, &["runs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Create the db, then pretend a newer thinimg migrated it.
    let r = run_in(&d, &["gc", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let conn = rusqlite::Connection::open(d.join("state.db")).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    for args in [&["images"][..], &["status"][..], &["gc", "--dry-run"][..]] {
        let r = run_in(&d, args);
        assert_eq!(r.code, 78, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("newer") && r.stderr.contains("upgrade thinimg"), "{}", r.stderr);
        assert!(!r.stderr.contains("bug"), "{}", r.stderr);
    }
}

#[test]
fn doctor_without_device_mapper_fails_with_71_and_advice() {
    let d = common::tempdir("oc71");
    let r = run_in(&d, &["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let dm = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "device-mapper").unwrap().clone();
    if Path::new("/dev/mapper/control").exists() {
        assert_eq!(dm["status"], "ok");
    } else {
        assert_eq!(dm["status"], "fail");
        assert!(dm["advice"].as_str().unwrap().contains("dm-mod"));
        assert_eq!(r.code, 71, "{}", r.stdout);
        assert_eq!(v["worst"], "fail");
    }
}

#[test]
fn state_dir_that_is_a_file_exits_74_and_unwritable_config_is_reported() {
    let d = common::tempdir("oc74");
    let f = d.join("file");
    std::fs::write(&f, b"x").unwrap();
    let r = run_in(&f.join("sub"), &["gc"]);
    assert_eq!(r.code, 74, "{}", r.stderr);
    assert!(r.stderr.contains("state dir"), "{}", r.stderr);
    let out = Command::new(bin()).args(["--config", "/nonexistent/thinimg.conf", "images"]).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn held_lock_exits_75_naming_the_holder_and_wait_queues() {
    let d = common::tempdir("oc75");
    std::fs::create_dir_all(&d).unwrap();
    let _lock = thinimg::ops::lock::StateLock::acquire(&d, None).unwrap();
    let r = run_in(&d, &["gc"]);
    assert_eq!(r.code, 75, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("pid {}", std::process::id())), "{}", r.stderr);
    // Read-only commands never take the lock.
    for ro in [&["runs"][..], &["images"][..], &["activations"][..], &["blobs"][..], &["status"][..]] {
        let r = run_in(&d, ro);
        assert_eq!(r.code, 0, "{ro:?}: {}", r.stderr);
    }
    // --wait gives up after the wait with the same 75.
    let t0 = std::time::Instant::now();
    let r = run_in(&d, &["--wait", "1", "gc"]);
    assert_eq!(r.code, 75, "{}", r.stderr);
    assert!(t0.elapsed().as_millis() >= 900);
}

#[test]
fn rejected_credentials_exit_77_and_hostile_blobs_65() {
    let srv = S3Server::shared();
    srv.put("priv", "oc77/golang/1.tar", &common::tar_layer(2, 1000));
    srv.put("pub", "oc65/junk/1.tar", &b"definitely not a tar archive ".repeat(40));
    let t = Thinimg::new(srv, "priv", "oc77/");
    let r = t.run(&["ls-remote"], &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-wrong-secret-wrong")]);
    assert_eq!(r.code, 77, "{}", r.stderr);
    let t = Thinimg::new(srv, "pub", "oc65/");
    let r = t.run(&["fetch", "junk"], &[]);
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(r.stderr.contains("oc65/junk/1.tar"), "names the key: {}", r.stderr);
}

#[test]
fn sigint_and_sigterm_exit_130_and_143() {
    for (sig, code) in [(nix::sys::signal::Signal::SIGINT, 130), (nix::sys::signal::Signal::SIGTERM, 143)] {
        let d = common::tempdir("sig");
        // A command that waits: gc queued behind a held lock.
        let _lock = thinimg::ops::lock::StateLock::acquire(&d, None).unwrap();
        let child = Command::new(bin())
            .env("THINIMG_STATE_DIR", &d)
            .env("THINIMG_CONFIG", "/dev/null")
            .args(["--wait", "60", "gc"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{sig:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn metrics_file_parses_with_prometheus_client() {
    let d = common::tempdir("metrics");
    let m = d.join("thinimg.prom");
    let r = run_in(&d, &["--metrics-file", m.to_str().unwrap(), "gc", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A failing command writes metrics too, with its exit code.
    let r = run_in(&d, &["--metrics-file", m.to_str().unwrap(), "cancel", "999"]);
    assert_eq!(r.code, 66);
    let text = std::fs::read_to_string(&m).unwrap();
    assert!(text.contains("thinimg_last_run_exit_code{command=\"cancel\"} 66"), "{text}");
    let py = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
names = set()
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    names.add(fam.name)
    for s in fam.samples:
        assert s.name == fam.name, (s.name, fam.name)
need = {"thinimg_last_run_exit_code", "thinimg_last_run_duration_seconds", "thinimg_blobs", "thinimg_runs", "thinimg_images"}
missing = need - names
if missing:
    sys.exit("missing: %s" % sorted(missing))
print(len(names))
"#;
    // scripts/install-deps installs prometheus_client into build/venv when
    // the system's python3 lacks it.
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("build/venv/bin/python3");
    let python = if venv.exists() { venv } else { "python3".into() };
    let out = Command::new(&python).arg("-c").arg(py).arg(&m).output().expect("python3");
    assert!(
        out.status.success(),
        "prometheus_client failed to parse (pip install prometheus_client is done by scripts/install-deps):\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        text
    );
}

#[test]
fn status_and_runs_speak_json_on_an_empty_host() {
    let d = common::tempdir("status");
    let r = run_in(&d, &["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["database"], false);
    // List commands share one JSON shape: an object with a named array.
    for (cmd, key) in [("runs", "runs"), ("images", "images"), ("activations", "activations"), ("blobs", "blobs")] {
        let r = run_in(&d, &[cmd, "--json"]);
        assert_eq!(r.code, 0, "{cmd}: {}", r.stderr);
        let v: serde_json::Value =
            serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{cmd}: {e}: {}", r.stdout));
        assert!(v[key].is_array(), "{cmd}: {}", r.stdout);
    }
    // Errors in --json mode are JSON on stdout too.
    let r = run_in(&d, &["--json", "cancel", "5"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["error"]["exit_code"], 66);
}

// ------------------------------------------------ the command line --

#[test]
fn bare_command_help_version_and_typos() {
    let d = common::tempdir("cli");
    // Bare thinimg: usage on stderr, 64, nothing on stdout.
    let r = run_in(&d, &[]);
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(r.stdout.is_empty() && r.stderr.contains("Usage:"), "{r:?}", r = (&r.stdout, &r.stderr));
    // A group's help lists its subcommands; `help COMMAND` is `COMMAND --help`.
    let r = run_in(&d, &["pool", "--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("pool create") && r.stdout.contains("pool status"), "{}", r.stdout);
    let r = run_in(&d, &["pool"]);
    assert_eq!(r.code, 64);
    assert!(r.stderr.contains("pool create"), "{}", r.stderr);
    assert_eq!(run_in(&d, &["help", "fetch"]).stdout, run_in(&d, &["fetch", "--help"]).stdout);
    assert_eq!(run_in(&d, &["help", "runs", "show"]).stdout, run_in(&d, &["runs", "show", "--help"]).stdout);
    // version: text and JSON with commit and schema version.
    let r = run_in(&d, &["version", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["commit"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert_eq!(v["schema_version"], thinimg::store::schema::MIGRATIONS.len());
    let r = run_in(&d, &["--version", "--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap(), v);
    // Bare `thinimg --json`: still 64, and the error is JSON on stdout.
    let r = run_in(&d, &["--json"]);
    assert_eq!(r.code, 64);
    let e: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    assert_eq!(e["error"]["kind"], "usage");
    // Did you mean, for commands and options; usage errors honour --json.
    for (args, want) in [
        (&["stauts"][..], "'status'"),
        (&["fecth", "x"][..], "'fetch'"),
        (&["gc", "--dryrun"][..], "'--dry-run'"),
        (&["sync", "--prnue", "x"][..], "'--prune'"),
    ] {
        let r = run_in(&d, args);
        assert_eq!(r.code, 64, "{args:?}");
        assert!(r.stderr.contains(&format!("did you mean {want}")), "{args:?}: {}", r.stderr);
    }
    let r = run_in(&d, &["--json", "fetch", "--frob"]);
    assert_eq!(r.code, 64);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    assert_eq!(v["error"]["exit_code"], 64);
    let r = run_in(&d, &["--log-format", "json", "--frob"]);
    let line: serde_json::Value = serde_json::from_str(r.stderr.trim()).unwrap_or_else(|e| panic!("{e}: {}", r.stderr));
    assert_eq!(line["level"], "error");
}

#[test]
fn durations_counts_and_sizes_are_checked_before_any_work() {
    let d = common::tempdir("values");
    // --wait is a duration: 5m is five minutes, not 5 MiB of seconds.
    let r = run_in(&d, &["--wait", "5m", "gc", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for (args, what) in [
        (&["--wait", "10K", "gc"][..], "time unit"),
        (&["--wait", "30d", "gc"][..], "at most"),
        (&["fetch", "--download-jobs", "0", "x"][..], "at least 1"),
        (&["fetch", "--download-jobs", "4K", "x"][..], "only for sizes"),
        (&["sync", "--unpack-jobs", "1000", "x"][..], "at most 64"),
        (&["pull", "--block-size", "100", "x"][..], "at least 128"),
        (&["pull", "--block-size", "200", "x"][..], "multiple of 128"),
        (&["pull", "--device-size", "8X", "x"][..], "suffix"),
    ] {
        let r = run_in(&d, args);
        assert_eq!(r.code, 64, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(what), "{args:?}: {}", r.stderr);
    }
    // Nothing was started: no run, no image.
    let r = run_in(&d, &["runs", "--all", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["runs"].as_array().map(|a| a.len()), Some(0), "{}", r.stdout);
}

#[test]
fn config_is_checked_on_load_for_every_command_and_shown_with_sources() {
    let d = common::tempdir("conf");
    let conf = d.join("thinimg.conf");
    std::fs::write(&conf, "# fleet\nbucket = fleet-images\ndownload-jobs = lots\n").unwrap();
    let c = conf.to_str().unwrap();
    // A key status never reads still fails status, with FILE:LINE and 78.
    for args in [&["status"][..], &["ls-remote"][..], &["config", "check"][..]] {
        let mut a = vec!["--config", c];
        a.extend_from_slice(args);
        let r = run_in(&d, &a);
        assert_eq!(r.code, 78, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("{c}:3")) && r.stderr.contains("download-jobs"), "{}", r.stderr);
    }
    // doctor runs on and reports it as a failed check.
    let r = run_in(&d, &["--config", c, "doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    let chk = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "config").cloned().unwrap();
    assert_eq!(chk["status"], "fail", "{chk}");
    assert!(chk["detail"].as_str().unwrap().contains(":3"), "{chk}");
    // Unknown keys get a suggestion; a trailing comment in a bucket name is caught.
    std::fs::write(&conf, "download-jobz = 8\n").unwrap();
    let r = run_in(&d, &["--config", c, "config", "check"]);
    assert_eq!(r.code, 78);
    assert!(r.stderr.contains("did you mean 'download-jobs'"), "{}", r.stderr);
    std::fs::write(&conf, "bucket = priv  # the private one\n").unwrap();
    assert_eq!(run_in(&d, &["--config", c, "images"]).code, 78);
    // A good file: check passes, show names each value's source.
    std::fs::write(&conf, "bucket = fleet-images\nwait = 10m\n").unwrap();
    let r = run_in(&d, &["--config", c, "config", "check"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = Command::new(bin())
        .env("THINIMG_STATE_DIR", &d)
        .env("THINIMG_PREFIX", "envprefix/")
        .args(["--config", c, "config", "show", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |k: &str| v["settings"].as_array().unwrap().iter().find(|s| s["key"] == k).cloned().unwrap();
    assert_eq!(get("bucket")["value"], "fleet-images");
    assert_eq!(get("bucket")["source"], format!("{c}:1"));
    assert_eq!(get("wait")["value"], "10m");
    assert_eq!(get("prefix")["source"], "environment THINIMG_PREFIX");
    assert_eq!(get("download-jobs")["source"], "default");
    assert_eq!(get("state-dir")["source"], "environment THINIMG_STATE_DIR");
}

// ------------------------------------------------ the state directory --

fn fresh_db(d: &Path) {
    let r = run_in(d, &["gc", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(d.join("state.db").exists());
}

#[test]
fn damaged_database_exits_74_naming_the_file_with_advice() {
    for (what, bytes) in [
        ("garbage", b"this is not a database at all, just text".repeat(200)),
        ("truncated", Vec::new()), // filled below from a real database
    ] {
        let d = common::tempdir("corrupt");
        fresh_db(&d);
        let db = d.join("state.db");
        let bytes = if what == "truncated" {
            let real = std::fs::read(&db).unwrap();
            let mut t = real[..real.len().min(4096 + 100)].to_vec();
            t[4096..].iter_mut().for_each(|b| *b = 0xAA);
            // Keep the header but damage the schema page.
            t[100..200].iter_mut().for_each(|b| *b = 0x55);
            t
        } else {
            bytes
        };
        std::fs::write(&db, &bytes).unwrap();
        let _ = std::fs::remove_file(d.join("state.db-wal"));
        let _ = std::fs::remove_file(d.join("state.db-shm"));
        for args in [&["status"][..], &["images"][..], &["gc", "--dry-run"][..], &["runs"][..]] {
            let r = run_in(&d, args);
            assert_eq!(r.code, 74, "{what} {args:?}: {}", r.stderr);
            assert!(r.stderr.contains(db.to_str().unwrap()), "{what} {args:?}: names the file: {}", r.stderr);
            assert!(r.stderr.contains("backup"), "{what} {args:?}: advice: {}", r.stderr);
            assert!(!r.stderr.contains("bug"), "{what} {args:?}: {}", r.stderr);
        }
        let r = run_in(&d, &["doctor", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let chk = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "database").cloned().unwrap();
        assert_eq!(chk["status"], "fail");
        assert!(!chk["advice"].as_str().unwrap_or("").contains("permissions"), "{chk}");
    }
}

#[test]
fn missing_or_empty_database_beside_blobs_or_pool_files_is_refused() {
    for (evidence, how) in
        [("blobs/sha256/ab", "deleted"), ("pool/data.img", "emptied"), ("blobs/partial/3.partial", "deleted")]
    {
        let d = common::tempdir("orphans");
        fresh_db(&d);
        let f = d.join(evidence);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"data").unwrap();
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(d.join(format!("state.db{ext}")));
        }
        if how == "emptied" {
            std::fs::write(d.join("state.db"), b"").unwrap();
        }
        for args in [&["status"][..], &["gc", "--dry-run"][..], &["images"][..]] {
            let r = run_in(&d, args);
            assert_eq!(r.code, 74, "{evidence} {args:?}: {}", r.stderr);
            assert!(r.stderr.contains("does not match") && r.stderr.contains("backup"), "{}", r.stderr);
        }
        // Nothing was re-created behind the operator's back.
        let len = std::fs::metadata(d.join("state.db")).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, 0, "{evidence}: the database was re-created");
    }
}

#[test]
fn read_only_commands_work_on_a_read_only_state_dir_and_as_another_user() {
    let d = common::tempdir("rostate");
    fresh_db(&d);
    // A clean close leaves no -wal/-shm: the hard case for a read-only open.
    for ext in ["-wal", "-shm"] {
        assert!(!d.join(format!("state.db{ext}")).exists() || ext == "-shm");
    }
    let ro: &[&[&str]] = &[
        &["status"],
        &["status", "--json"],
        &["images"],
        &["activations"],
        &["blobs"],
        &["runs", "--all"],
        &["doctor", "--json"],
    ];
    // As nobody, with a state dir it can read but not write.
    for args in ro {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin())
            .args(*args)
            .env("THINIMG_STATE_DIR", &d)
            .env("THINIMG_CONFIG", "/dev/null")
            .output()
            .expect("setpriv");
        let code = out.status.code();
        let ok = if args[0] == "doctor" { code != Some(74) && code != Some(73) } else { code == Some(0) };
        assert!(ok, "as nobody {args:?}: {code:?} {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("database"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // pool status without a pool says so (66), not a database error.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .args(["pool", "status"])
        .env("THINIMG_STATE_DIR", &d)
        .env("THINIMG_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66), "{}", String::from_utf8_lossy(&out.stderr));
    // On a read-only mount of the state dir (private mount namespace).
    let script = format!(
        "set -e; mount --make-rprivate /; mount --bind {d} {d}; mount -o remount,bind,ro {d}; \
         ! touch {d}/probe 2>/dev/null; for c in status images blobs 'runs --all' activations; do \
         THINIMG_STATE_DIR={d} THINIMG_CONFIG=/dev/null {bin} $c >/dev/null || {{ echo \"$c failed\"; exit 1; }}; done",
        d = d.display(),
        bin = bin()
    );
    let out = Command::new("unshare").args(["-m", "sh", "-c", &script]).output().expect("unshare");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

// ------------------------------------------------ evidence: metrics --

#[test]
fn metrics_keep_each_commands_last_outcome_and_never_fail_a_command() {
    let d = common::tempdir("metrics2");
    let m = d.join("thinimg.prom");
    let ms = m.to_str().unwrap();
    let r = run_in(&d, &["--metrics-file", ms, "cancel", "999"]);
    assert_eq!(r.code, 66);
    let r = run_in(&d, &["--metrics-file", ms, "status"]);
    assert_eq!(r.code, 0);
    let text = std::fs::read_to_string(&m).unwrap();
    assert!(text.contains("thinimg_last_run_exit_code{command=\"cancel\"} 66"), "{text}");
    assert!(text.contains("thinimg_last_run_exit_code{command=\"status\"} 0"), "{text}");
    assert!(text.contains("thinimg_runs_unresolved_failures 0"), "{text}");
    assert_eq!(text.matches("# TYPE thinimg_last_run_exit_code").count(), 1, "{text}");
    // A later run of the same command replaces only its own sample.
    let r = run_in(&d, &["--metrics-file", ms, "cancel", "998"]);
    assert_eq!(r.code, 66);
    let text = std::fs::read_to_string(&m).unwrap();
    assert_eq!(text.matches("command=\"cancel\"").count(), 3, "{text}");
    // An unwritable metrics path is a warning, not a failed command.
    for bad in [d.join("no/such/dir/m.prom"), d.join("thinimg.prom/inside")] {
        let r = run_in(&d, &["--metrics-file", bad.to_str().unwrap(), "status"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains("warning") && r.stderr.contains("metrics"), "{}", r.stderr);
        assert_eq!(r.stderr.matches("metrics not written").count(), 1, "reported once: {}", r.stderr);
    }
}

// ------------------------------------------------ status --

#[test]
fn status_shows_space_and_never_a_raw_null() {
    let d = common::tempdir("space");
    fresh_db(&d);
    std::fs::create_dir_all(d.join("blobs/partial")).unwrap();
    std::fs::write(d.join("blobs/partial/1.partial"), vec![7u8; 5000]).unwrap();
    let r = run_in(&d, &["status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["space"]["partial_downloads"], 1, "{v}");
    assert_eq!(v["space"]["partial_bytes"], 5000, "{v}");
    assert!(v["space"]["fs_free_bytes"].as_u64().is_some_and(|n| n > 0), "{v}");
    let r = run_in(&d, &["status"]);
    assert!(r.stdout.contains("partial downloads 1") && r.stdout.contains("free of"), "{}", r.stdout);
    assert!(!r.stdout.contains("null"), "{}", r.stdout);
}

// ------------------------------------------------ runs and sync (real S3) --

#[test]
fn sync_quiet_reports_each_failure_once_on_stderr_and_from_lines_by_number() {
    let srv = S3Server::shared();
    srv.put("pub", "syncq/alpha/1.tar", &common::tar_layer(41, 1000));
    let t = Thinimg::new(srv, "pub", "syncq/");
    let list = t.state.parent().unwrap().join("wanted.txt");
    // ghost is not in the bucket, node/0 is not a ref, alpha cannot be built
    // on this host (no device-mapper): each failure is reported once.
    std::fs::write(&list, "# wanted images\nghost\n\nnode/0\nalpha\n").unwrap();
    let r = t.run(&["sync", "--quiet", "--from", list.to_str().unwrap()], &[]);
    assert_ne!(r.code, 0);
    assert!(r.stdout.is_empty(), "quiet: nothing on stdout: {}", r.stdout);
    let l = list.to_str().unwrap();
    assert!(r.stderr.contains(&format!("{l}:4")), "a bad line is named FILE:LINE: {}", r.stderr);
    assert_eq!(r.stderr.matches("node/0").count(), 1, "once: {}", r.stderr);
    // Without device-mapper the wanted image is not attempted: the host's
    // failure is reported once instead.
    assert_eq!(r.stderr.lines().filter(|x| x.contains("device-mapper")).count(), 1, "once: {}", r.stderr);
    // The JSON report names the source line too (a list with nothing to
    // pull, so the host's missing device-mapper does not end it first).
    let only_bad = t.state.parent().unwrap().join("bad.txt");
    std::fs::write(&only_bad, "# wanted images\n\n\nnode/0\n").unwrap();
    let l = only_bad.to_str().unwrap();
    let r = t.run(&["sync", "--json", "--from", l], &[]);
    let v = r.json();
    let bad = v["images"].as_array().unwrap().iter().find(|i| i["reference"] == "node/0").cloned().unwrap();
    assert_eq!(bad["source"], format!("{l}:4"));
}

#[test]
fn sync_prune_refuses_an_empty_or_sweeping_wanted_set_unless_forced() {
    let srv = S3Server::shared();
    let t = Thinimg::new(srv, "pub", "prune-empty-prefix/");
    // Local images as recorded by earlier pulls.
    t.ok(&["gc", "--dry-run"]);
    let conn = rusqlite::Connection::open(t.state.join("state.db")).unwrap();
    for n in ["a", "b", "c"] {
        conn.execute(
            "INSERT INTO images (name, family, top_layer, top_chain, state, updated_at) VALUES (?1, ?1, 1, NULL, 'ready', 0)",
            [n],
        )
        .unwrap();
    }
    drop(conn);
    let images = |t: &Thinimg| -> usize { t.ok(&["images", "--json"]).json()["images"].as_array().unwrap().len() };
    // An empty listing (wrong prefix): refused with its own message and 78.
    let r = t.run(&["sync", "--all", "--prune"], &[]);
    assert_eq!(r.code, 78, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("sync --prune refused") && r.stderr.contains("empty"), "{}", r.stderr);
    assert_eq!(images(&t), 3);
    // Something to pull on a host without device-mapper: the host fails the
    // sync first (71), and nothing is pruned. (The refusal when none of the
    // wanted set exists is tested on a real kernel, tests/kernel_ops.rs.)
    let r = t.run(&["sync", "--prune", "ghost"], &[]);
    assert_eq!(r.code, 71, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("device-mapper"), "{}", r.stderr);
    assert_eq!(images(&t), 3);
    // Keeping one of three would remove most local images (dry run: nothing is pulled).
    let r = t.run(&["sync", "--prune", "--dry-run", "a"], &[]);
    assert_eq!(r.code, 78, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("would remove 2 of the 3"), "{}", r.stderr);
    assert_eq!(images(&t), 3);
    // --dry-run with --force lists what would go and changes nothing.
    let r = t.run(&["sync", "--prune", "--dry-run", "--force", "a"], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("would prune b") && r.stdout.contains("would prune c"), "{}", r.stdout);
    assert_eq!(images(&t), 3);
    // Two of three wanted: one may go (the dry run says so without --force).
    let r = t.run(&["sync", "--prune", "--dry-run", "a", "b"], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("would prune c") && !r.stdout.contains("would prune b"), "{}", r.stdout);
    assert_eq!(t.run(&["sync", "--dry-run", "a"], &[]).code, 64, "--dry-run needs --prune");
    // rm --dry-run says what it would do and does nothing; deactivate --dry-run knows no such activation.
    let r = t.run(&["rm", "--dry-run", "a"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("would remove a"), "{}", r.stdout);
    assert_eq!(images(&t), 3);
    assert_eq!(t.run(&["rm", "--dry-run", "zzz"], &[]).code, 66);
    assert_eq!(t.run(&["deactivate", "--dry-run", "--delete", "vm-1"], &[]).code, 66);
}

#[test]
fn pool_assemble_without_a_pool_does_nothing_and_creates_nothing() {
    // thinimg-pool.service may run on a host where no pool was created yet.
    let d = common::tempdir("assemble");
    let state = d.join("state");
    let r = run_in(&state, &["pool", "assemble"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("nothing to assemble"), "{}", r.stdout);
    assert!(!state.exists(), "pool assemble created the state dir");
}
