//! Journal and sync behaviour that needs pull runs to really run, so a real
//! kernel (run by `scripts/vm-test`; without /dev/mapper/control every test
//! FAILS): failed runs superseded, explained, cancelled in bulk and pruned;
//! JSON log lines of a parallel sync carry their own thread's run and image.
//! (On a host without device-mapper no pull run is started at all: see
//! tests/host_kernel.rs.)

mod common;

use common::{S3Server, Thinimg};
use std::path::Path;

fn need_dm() {
    if !Path::new("/dev/mapper/control").exists() {
        panic!("needs device-mapper (/dev/mapper/control is missing): run scripts/vm-test");
    }
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root");
    }
}

/// Small pools and devices: the VM's /tmp is a tmpfs.
fn small_pool(t: &Thinimg) -> (String, String) {
    let base = t.state.parent().unwrap().to_path_buf();
    let conf = base.join("thinimg.conf");
    std::fs::write(&conf, "data-size = 2G\ndevice-size = 64M\n").unwrap();
    (conf.display().to_string(), base.join("run").display().to_string())
}

fn runs_json(t: &Thinimg, all: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["runs", "--json"];
    if all {
        args.push("--all");
    }
    let r = t.ok(&args);
    r.json()["runs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn failed_runs_are_superseded_explained_cancelled_in_bulk_and_pruned() {
    need_dm();
    let srv = S3Server::shared();
    srv.put("pub", "runs1/other/1.tar", &common::tar_layer(31, 1000));
    let t = Thinimg::new(srv, "pub", "runs1/");
    // Two failures of the same subject, one of another: only the latest of each counts.
    for _ in 0..2 {
        assert_eq!(t.run(&["pull", "ghost"], &[]).code, 66);
    }
    assert_eq!(t.run(&["pull", "phantom"], &[]).code, 66);
    let all = runs_json(&t, true);
    let current = runs_json(&t, false);
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(current.len(), 2, "the first ghost failure is history: {current:?}");
    let first = all.iter().map(|r| r["id"].as_i64().unwrap()).min().unwrap();
    let second_ghost = all.iter().filter(|r| r["subject"] == "ghost").map(|r| r["id"].as_i64().unwrap()).max().unwrap();
    assert!(all.iter().any(|r| r["id"] == first && r["superseded_by"] == second_ghost), "{all:?}");
    let r = t.run(&["doctor", "--json"], &[]);
    let v = r.json();
    let chk = v["checks"].as_array().unwrap().iter().find(|c| c["name"] == "runs").cloned().unwrap();
    assert!(chk["detail"].as_str().unwrap().starts_with("2 "), "{chk}");
    // The text list has timestamps; runs show explains one run in words.
    let r = t.ok(&["runs"]);
    assert!(r.stdout.contains("STARTED") && r.stdout.contains("Z "), "{}", r.stdout);
    let r = t.ok(&["runs", "--no-headings"]);
    assert!(!r.stdout.contains("STARTED") && r.stdout.lines().count() == 2, "{}", r.stdout);
    let r = t.ok(&["runs", "show", &second_ghost.to_string()]);
    assert!(r.stdout.contains("pull ghost is failed"), "{}", r.stdout);
    assert!(r.stdout.contains("next ") && r.stdout.contains("not retried until the bucket changes"), "{}", r.stdout);
    let r = t.ok(&["runs", "show", &first.to_string()]);
    assert!(r.stdout.contains(&format!("run {second_ghost} of the same")), "{}", r.stdout);
    assert_eq!(t.run(&["runs", "show", "9999"], &[]).code, 66);
    // cancel --failed resolves every failure; doctor no longer warns about runs.
    let r = t.ok(&["cancel", "--failed", "--json"]);
    assert_eq!(r.json()["cancelled"].as_array().map(|a| a.len()), Some(3), "{}", r.stdout);
    assert!(runs_json(&t, false).is_empty());
    let v = t.run(&["doctor", "--json"], &[]).json();
    assert!(!v["checks"].as_array().unwrap().iter().any(|c| c["name"] == "runs" && c["status"] != "ok"), "{v}");
    // Retention: runs that ended long ago go with the next writing command;
    // an unresolved failure stays.
    assert_eq!(t.run(&["pull", "ghost"], &[]).code, 66);
    let conn = rusqlite::Connection::open(t.state.join("state.db")).unwrap();
    conn.execute("UPDATE runs SET updated_at = updated_at - 20 * 86400", []).unwrap();
    drop(conn);
    // A writing command prunes (a dry run changes nothing, history included).
    t.ok(&["--runs-retention", "14d", "gc"]);
    let left = runs_json(&t, true);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["state"], "failed");
    assert_eq!(left[0]["subject"], "ghost");
}

#[test]
fn json_logs_of_a_parallel_sync_carry_each_threads_own_run_and_image() {
    need_dm();
    let srv = S3Server::shared();
    let fams = ["fa", "fb", "fc", "fd"];
    for (i, f) in fams.iter().enumerate() {
        srv.put("pub", &format!("jlog/{f}/1.tar"), &common::tar_layer(50 + i as u64, 2000));
    }
    let t = Thinimg::new(srv, "pub", "jlog/");
    let mut args = vec!["--log-format", "json", "-v", "sync", "--unpack-jobs", "4", "ghost"];
    args.extend(fams);
    let (conf, run) = small_pool(&t);
    let r = t.run(&args, &[("THINIMG_CONFIG", &conf), ("THINIMG_RUN_DIR", &run)]);
    assert!(r.stderr.contains("fa: ready"), "the sync did not build fa:\n{}", r.stderr);
    let mut checked = 0;
    let mut runs_of: std::collections::BTreeMap<String, String> = Default::default();
    for line in r.stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let msg = v["msg"].as_str().unwrap_or("");
        // "run N (pull IMAGE) ..." must be tagged with that run and image.
        if let Some(rest) = msg.strip_prefix("run ") {
            if let Some((id, tail)) = rest.split_once(" (pull ") {
                let image = tail.split(')').next().unwrap_or("");
                assert_eq!(v["run"].as_str(), Some(id), "{line}");
                assert_eq!(v["image"].as_str(), Some(image), "{line}");
                checked += 1;
            }
        }
        // "IMAGE: ..." lines from a worker carry that image.
        for f in fams.iter().chain(["ghost"].iter()) {
            if msg.starts_with(&format!("{f}: ")) {
                assert_eq!(v["image"].as_str(), Some(*f), "{line}");
                checked += 1;
            }
        }
        // One image's lines never carry two different runs.
        if let (Some(img), Some(run)) = (v["image"].as_str(), v["run"].as_str()) {
            let prev = runs_of.entry(img.to_string()).or_insert_with(|| run.to_string());
            assert_eq!(prev, run, "image {img} tagged with two runs: {line}");
        }
    }
    assert!(checked > fams.len(), "only {checked} lines checked:\n{}", r.stderr);
}

#[test]
fn sync_prune_refuses_a_wanted_set_that_does_not_exist_and_forced_it_prunes() {
    need_dm();
    let srv = S3Server::shared();
    let t = Thinimg::new(srv, "pub", "prune-none/");
    let (conf, run) = small_pool(&t);
    let env = [("THINIMG_CONFIG", conf.as_str()), ("THINIMG_RUN_DIR", run.as_str())];
    // Local images as recorded by earlier pulls.
    assert_eq!(t.run(&["gc", "--dry-run"], &env).code, 0);
    let conn = rusqlite::Connection::open(t.state.join("state.db")).unwrap();
    for n in ["a", "b", "c"] {
        conn.execute(
            "INSERT INTO images (name, family, top_layer, top_chain, state, updated_at) VALUES (?1, ?1, 1, NULL, 'ready', 0)",
            [n],
        )
        .unwrap();
    }
    drop(conn);
    let names = |t: &Thinimg| -> Vec<String> {
        t.ok(&["images", "--json"]).json()["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    // Wanting only images the bucket does not have: refused (78), nothing pruned.
    let r = t.run(&["sync", "--prune", "ghost"], &env);
    assert_eq!(r.code, 78, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("none of it exists"), "{}", r.stderr);
    assert_eq!(names(&t).len(), 3);
    // Forced, it prunes for real (the absent "a" fails on its own, 66).
    let r = t.run(&["sync", "--prune", "--force", "a"], &env);
    assert_eq!(r.code, 66, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("pruned  b") || r.stdout.contains("pruned b"), "{}", r.stdout);
    assert_eq!(names(&t), vec!["a".to_string()]);
}
