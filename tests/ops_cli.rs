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
fn newer_database_schema_exits_70() {
    let d = common::tempdir("oc70");
    let r = run_in(&d, &["runs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Create the db, then pretend a newer thinimg migrated it.
    let r = run_in(&d, &["gc", "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let conn = rusqlite::Connection::open(d.join("state.db")).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    let r = run_in(&d, &["images"]);
    assert_eq!(r.code, 70, "{}", r.stderr);
    assert!(r.stderr.contains("newer"), "{}", r.stderr);
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
    assert_eq!(out.status.code(), Some(74), "{}", String::from_utf8_lossy(&out.stderr));
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
    let r = run_in(&d, &["runs", "--json"]);
    assert_eq!(r.stdout.trim(), "[]");
    // Errors in --json mode are JSON on stdout too.
    let r = run_in(&d, &["--json", "cancel", "5"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["error"]["exit_code"], 66);
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
