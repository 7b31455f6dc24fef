//! Storage invariants that fail safe, against a real kernel (run by
//! `scripts/vm-test`; without /dev/mapper/control every test FAILS):
//! a layer is kept only if every write reached the pool; gc never leaves a
//! ready chain without a device; a failed teardown does not block a chain
//! for other images; a database that diverged from the pool stops
//! everything and deletes nothing; the idempotent `activate` answer is
//! checked against the kernel.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{S3Server, Thinimg};

fn need_dm() {
    if !Path::new("/dev/mapper/control").exists() {
        panic!("needs device-mapper (/dev/mapper/control is missing): run scripts/vm-test");
    }
    if !nix::unistd::geteuid().is_root() {
        panic!("needs root");
    }
}

fn fixture(rel: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("build/fixtures/bucket-small/images").join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {} ({e}): run scripts/make-fixtures", p.display()))
}

struct Host {
    t: Thinimg,
    run: PathBuf,
    conf: PathBuf,
    prefix: String,
}

impl Host {
    fn new(tag: &str, conf: &str) -> Host {
        need_dm();
        let srv = S3Server::shared();
        let prefix = format!("st-{tag}/");
        let t = Thinimg::new(srv, "pub", &prefix);
        let base = t.state.parent().unwrap().to_path_buf();
        let run = base.join("run");
        let cpath = base.join("thinimg.conf");
        std::fs::write(&cpath, conf).unwrap();
        Host { t, run, conf: cpath, prefix }
    }

    /// Upload `family/N.tar` objects under this host's prefix.
    fn upload(&self, objs: &[(&str, Vec<u8>)]) {
        let objs: Vec<(String, Vec<u8>)> =
            objs.iter().map(|(k, d)| (format!("{}{k}", self.prefix), d.clone())).collect();
        S3Server::shared().put_many("pub", &objs);
    }

    fn cmd(&self, args: &[&str], env: &[(&str, &str)]) -> common::Run {
        let mut e: Vec<(&str, &str)> =
            vec![("THINIMG_RUN_DIR", self.run.to_str().unwrap()), ("THINIMG_CONFIG", self.conf.to_str().unwrap())];
        e.extend_from_slice(env);
        self.t.run(args, &e)
    }

    fn ok(&self, args: &[&str]) -> common::Run {
        let r = self.cmd(args, &[]);
        assert_eq!(
            r.code, 0,
            "thinimg {args:?} failed (exit {}):\nstdout:\n{}\nstderr:\n{}",
            r.code, r.stdout, r.stderr
        );
        r
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        self.ok(&a).json()
    }

    fn db(&self) -> thinimg::store::Db {
        thinimg::store::Db::open(&self.t.state).unwrap()
    }

    fn count(&self, sql: &str) -> i64 {
        self.db().conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// The names of this state dir's devices (the one rule, `pool::names`).
    fn names(&self) -> thinimg::pool::Names {
        let (spec, _) = thinimg::store::thin_pool::load(&self.db().conn).unwrap().expect("a pool");
        thinimg::pool::Names::of_pool(&spec.dm_name)
    }

    fn pool_name(&self) -> String {
        let (spec, _) = thinimg::store::thin_pool::load(&self.db().conn).unwrap().expect("a pool");
        spec.dm_name.as_str().to_string()
    }

    /// dm devices of this state dir other than the pool.
    fn devices(&self) -> Vec<String> {
        let pool = self.pool_name();
        let names = self.names();
        let dm = thinimg::dm::Dm::open().unwrap();
        let mut v: Vec<String> =
            dm.list().unwrap().into_iter().map(|(n, _)| n).filter(|n| names.is_ours(n) && *n != pool).collect();
        v.sort();
        v
    }

    fn mounts(&self) -> Vec<PathBuf> {
        thinimg::pipeline::mount::mounts_under(&self.run).unwrap()
    }

    fn pool_usage(&self) -> (u64, u64) {
        let v = self.json(&["pool", "status"]);
        (v["data_used_bytes"].as_u64().unwrap(), v["data_bytes"].as_u64().unwrap())
    }

    /// Whether thin id `id` exists in the pool (create_thin says EEXIST).
    /// A probe that creates it is deleted again at once.
    fn thin_exists(&self, id: u32) -> bool {
        let pool = self.pool_name();
        let out = Command::new("dmsetup").args(["message", &pool, "0", &format!("create_thin {id}")]).output().unwrap();
        if out.status.success() {
            let del = Command::new("dmsetup").args(["message", &pool, "0", &format!("delete {id}")]).status().unwrap();
            assert!(del.success());
            false
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("File exists") || err.contains("exists"), "probe of thin {id}: {err}");
            true
        }
    }

    fn cleanup(&self) {
        if let Ok(Some((spec, _))) = thinimg::store::thin_pool::load(&self.db().conn) {
            if let Ok(Some(pool)) = thinimg::pool::Pool::find(&spec, &self.run) {
                for m in self.mounts() {
                    let _ = Command::new("umount").arg(&m).status();
                }
                let _ = pool.teardown();
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A layer of `n` empty directories: ~1 KiB of tar each, but a 4 KiB
/// directory block plus journal traffic each on ext4, so it needs many
/// times its own size in the pool.
fn dirs_layer(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1);
        b.append_data(&mut h, format!("d/{i:05}/"), std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}

fn write_bytes(dev: &Path, offset: u64, len: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

/// Issue 10 item 12: the pool fills up while a layer is written. The layer
/// passes the free-space gate (its blob is small) but needs far more room
/// on ext4; the build must fail, keep nothing, and succeed once space is
/// freed. With few directories the unpack ends in the page cache and only
/// the flush (syncfs) meets the full pool; with many, ext4's journal fails
/// during the unpack.
#[test]
fn state_layer_is_not_kept_when_the_pool_fills_during_its_build() {
    for dirs in [200, 1500] {
        let h = Host::new(&format!("fill{dirs}"), "device-size = 64M\ndata-size = 64M\n");
        let layer = dirs_layer(dirs);
        h.upload(&[
            ("base/1.tar", fixture("golang/1.tar")),
            ("dirs/1.tar", fixture("golang/1.tar")),
            ("dirs/2.tar", layer.clone()),
        ]);
        h.ok(&["pull", "base"]);
        let path = h.ok(&["activate", "base", "--name", "filler"]).stdout.trim().to_string();
        // Leave about 1.5x the blob free: enough for the gate, not for ext4.
        let (used, total) = h.pool_usage();
        let leave = layer.len() as u64 * 3 / 2;
        let fill = (total - used).saturating_sub(leave) / 65536 * 65536;
        write_bytes(Path::new(&path), 0, fill);
        let (used, total) = h.pool_usage();
        assert!(total - used >= layer.len() as u64 * 5 / 4, "{dirs}: gate would refuse: {used}/{total}");

        let r = h.cmd(&["pull", "dirs"], &[]);
        assert_ne!(r.code, 0, "{dirs}: a layer written into a full pool was kept:\n{}", r.stderr);
        let ready = h.count("SELECT COUNT(*) FROM chains WHERE state = 'ready'");
        assert_eq!(ready, 1, "{dirs}: only base's chain may be ready:\n{}", r.stderr);
        assert_eq!(h.count("SELECT COUNT(*) FROM images WHERE name = 'dirs' AND state = 'ready'"), 0);
        assert_eq!(h.devices(), vec![h.names().activation("filler")], "leaked devices");
        assert!(h.mounts().is_empty(), "{dirs}: stray mounts {:?}", h.mounts());

        // Space back: the same pull now builds the layer.
        h.ok(&["deactivate", "filler", "--delete"]);
        h.ok(&["pull", "dirs"]);
        assert_eq!(h.count("SELECT COUNT(*) FROM chains WHERE state = 'ready'"), 2);
        h.db().integrity_check().unwrap();
    }
}

/// Issue 10 item 13: kill -9 inside gc, after the chain row went and after
/// the kernel deleted its device; a pull of an image that needs the same
/// chain afterwards builds it again (never shares a chain without device).
#[test]
fn state_gc_killed_mid_delete_never_leaves_a_ready_chain_without_device() {
    for (i, fault) in ["gc:chain-forgotten", "gc:thin-deleted"].iter().enumerate() {
        let h = Host::new(&format!("gc{i}"), "device-size = 64M\ndata-size = 256M\n");
        h.upload(&[
            ("a/1.tar", fixture("golang/1.tar")),
            ("a/2.tar", fixture("golang/2.tar")),
            ("b/1.tar", fixture("golang/1.tar")),
            ("b/2.tar", fixture("golang/2.tar")),
        ]);
        h.ok(&["pull", "a"]);
        h.ok(&["rm", "a"]);
        let r = h.cmd(&["gc"], &[("THINIMG_FAULT", fault)]);
        assert_eq!(r.code, -1, "{fault}: expected death by SIGKILL, got {}:\n{}", r.code, r.stderr);
        // No ready chain whose thin device is not ready.
        let bad = h.count(
            "SELECT COUNT(*) FROM chains c LEFT JOIN thin_devices t ON t.thin_id = c.thin_id
             WHERE c.state = 'ready' AND (t.state IS NULL OR t.state <> 'ready')",
        );
        assert_eq!(bad, 0, "{fault}: a ready chain lost its device");
        h.ok(&["activate", "b", "--name", "vm"]);
        let p = h.json(&["activations"])["activations"][0]["path"].as_str().unwrap().to_string();
        assert!(Path::new(&p).exists(), "{fault}: activation node {p}");
        let g = h.json(&["gc"]);
        assert!(g["errors"].as_array().unwrap().is_empty(), "{fault}: {g}");
        // b's 2 chains + the activation; the dead thin row was deleted.
        assert_eq!(h.count("SELECT COUNT(*) FROM thin_devices"), 3, "{fault}");
        h.db().integrity_check().unwrap();
    }
}

/// Issue 10 item 14: a build fails and so does its teardown; the run
/// fails. Another image needing the same chain finishes that teardown and
/// builds; cancelling a failed run runs its abort.
#[test]
fn state_failed_teardown_does_not_block_the_chain_and_cancel_aborts() {
    let h = Host::new("td", "device-size = 64M\ndata-size = 256M\n");
    h.upload(&[
        ("a/1.tar", fixture("golang/1.tar")),
        ("b/1.tar", fixture("golang/1.tar")),
        ("b/2.tar", fixture("golang/2.tar")),
        ("c/1.tar", fixture("node/1.tar")),
        ("c/2.tar", fixture("python/4.tar")),
    ]);
    let fail = [("THINIMG_FAULT", "fail:build:*")];
    let r = h.cmd(&["pull", "a"], &fail);
    assert_ne!(r.code, 0, "the injected build failure must fail the pull");
    assert!(r.stderr.contains("injected failure at build:teardown"), "teardown did not fail:\n{}", r.stderr);
    assert_eq!(h.count("SELECT COUNT(*) FROM chains WHERE state = 'building'"), 1);
    // b shares a's first chain: it finishes the dead attempt and builds it.
    h.ok(&["pull", "b"]);
    assert_eq!(h.count("SELECT COUNT(*) FROM chains WHERE state = 'building'"), 0);
    assert_eq!(h.count("SELECT COUNT(*) FROM chains WHERE state = 'ready'"), 2);
    assert!(h.devices().is_empty(), "leaked {:?}", h.devices());

    // c/2 fails the same way; cancelling its failed run aborts it.
    let r = h.cmd(&["pull", "c"], &[("THINIMG_FAULT", "fail:build:*"), ("THINIMG_FAULT_SKIP", "0")]);
    assert_ne!(r.code, 0);
    let id: i64 = h.count("SELECT id FROM runs WHERE subject = 'c' AND state = 'failed'");
    assert_eq!(h.count("SELECT COUNT(*) FROM chains WHERE state = 'building'"), 1);
    h.ok(&["cancel", &id.to_string()]);
    assert_eq!(h.count("SELECT COUNT(*) FROM chains WHERE state = 'building'"), 0, "cancel did not abort");
    assert_eq!(h.count("SELECT COUNT(*) FROM thin_devices WHERE state <> 'ready'"), 0);
    assert!(h.devices().is_empty(), "leaked {:?}", h.devices());
    assert!(h.mounts().is_empty(), "stray mounts {:?}", h.mounts());
    h.ok(&["pull", "c"]);
    h.db().integrity_check().unwrap();
}

/// Issue 10 item 15: state.db restored from a backup while the pool went
/// on. The pool's transaction id gives it away at once; and if the ids
/// were patched to match, EEXIST on create stops everything. Nothing of
/// the pool is ever deleted.
#[test]
fn state_database_that_diverged_from_the_pool_stops_and_deletes_nothing() {
    let h = Host::new("div", "device-size = 64M\ndata-size = 256M\n");
    h.upload(&[
        ("a/1.tar", fixture("golang/1.tar")),
        ("b/1.tar", fixture("node/1.tar")),
        ("b/2.tar", fixture("node/2.tar")),
        ("c/1.tar", fixture("python/1.tar")),
        ("c/2.tar", fixture("python/4.tar")),
    ]);
    h.ok(&["pull", "a"]);
    let db = h.t.state.join("state.db");
    let backup = h.t.state.join("backup.db");
    // A consistent copy (WAL checkpointed into the main file).
    h.db().conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    std::fs::copy(&db, &backup).unwrap();
    h.ok(&["pull", "b"]);
    h.ok(&["activate", "b", "--name", "vm"]);
    h.ok(&["deactivate", "vm"]);
    let known: Vec<u32> = {
        let c = h.db();
        let mut st = c.conn.prepare("SELECT thin_id FROM thin_devices").unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(|r| r.unwrap()).collect()
    };
    // a/1 == b/1 (shared chain), b/2, and the activation vm.
    assert_eq!(known.len(), 3, "{known:?}");

    // Restore the backup.
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(h.t.state.join(format!("state.db{suffix}")));
    }
    std::fs::copy(&backup, &db).unwrap();
    let r = h.cmd(&["pull", "c"], &[]);
    assert_eq!(r.code, 71, "a restored database must stop everything:\n{}", r.stderr);
    assert!(r.stderr.contains("transaction id"), "{}", r.stderr);
    for id in &known {
        assert!(h.thin_exists(*id), "thin {id} was deleted");
    }

    // Patch the recorded transaction id to the pool's: now the id
    // allocator hands out ids that exist; EEXIST must stop, not delete.
    let status = Command::new("dmsetup").args(["status", &h.pool_name()]).output().unwrap();
    let line = String::from_utf8_lossy(&status.stdout).to_string();
    let txn: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    thinimg::store::thin_pool::set_transaction_id(&h.db().conn, txn).unwrap();
    let r = h.cmd(&["pull", "c"], &[]);
    assert_eq!(r.code, 71, "EEXIST must stop everything:\n{}", r.stderr);
    assert!(r.stderr.contains("diverged"), "{}", r.stderr);
    for id in &known {
        assert!(h.thin_exists(*id), "thin {id} was deleted");
    }
    assert_eq!(h.count("SELECT COUNT(*) FROM runs WHERE state = 'active'"), 0);
}

/// Issue 10 item 16: a node at the activation's path that is not that dm
/// device is never the answer; the next `activate` repairs it.
#[test]
fn state_idempotent_activate_answer_is_checked_against_the_kernel() {
    use std::os::unix::fs::MetadataExt;
    let h = Host::new("idem", "device-size = 64M\ndata-size = 256M\n");
    h.upload(&[("a/1.tar", fixture("golang/1.tar"))]);
    let first = h.json(&["activate", "a", "--name", "vm"]);
    let path = PathBuf::from(first["path"].as_str().unwrap());
    let (ma, mi) = (first["major"].as_u64().unwrap(), first["minor"].as_u64().unwrap());
    assert_eq!(first["dev_path"], format!("/dev/dm-{mi}"));
    // A re-run answers from the database and keeps that answer; the next
    // one answers from it (no database open) with the same bytes.
    let kept = h.run.join("answers/activate-vm.json");
    let from = |r: &common::Run| {
        if r.stderr.contains("answered from the kept answer") {
            "kept"
        } else if r.stderr.contains("answered from the database") {
            "database"
        } else {
            "run"
        }
    };
    let r = h.cmd(&["activate", "a", "--name", "vm", "--json", "-vv"], &[]);
    assert_eq!((r.code, from(&r)), (0, "database"), "{}", r.stderr);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap(), first);
    assert!(kept.exists(), "no answer kept at {}", kept.display());
    let r = h.cmd(&["activate", "a", "--name", "vm", "--json", "-vv"], &[]);
    assert_eq!((r.code, from(&r)), (0, "kept"), "{}", r.stderr);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap(), first);
    // It never outlives a change of the database, even with the device up
    // as it was: an interrupted run (here: a pull killed mid-way) must be
    // resumed by the next command, not skipped by an answer from before.
    let saved = std::fs::read(&kept).unwrap();
    h.upload(&[("b/1.tar", fixture("golang/2.tar"))]);
    let r = h.cmd(&["pull", "b"], &[("THINIMG_FAULT", "after:fetch")]);
    assert_eq!(r.code, -1, "expected death by SIGKILL, got exit {}: {}", r.code, r.stderr);
    assert_eq!(h.count("SELECT COUNT(*) FROM runs WHERE state = 'active'"), 1, "no interrupted run");
    std::fs::write(&kept, &saved).unwrap();
    let r = h.cmd(&["activate", "a", "--name", "vm", "--json", "-vv"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(from(&r), "run", "answered without resuming the interrupted pull: {}", r.stderr);
    assert_eq!(h.count("SELECT COUNT(*) FROM runs WHERE state = 'active'"), 0, "the pull was not resumed");
    // Replace the node with one for another block device (a loop device).
    std::fs::remove_file(&path).unwrap();
    let other = std::fs::metadata("/dev/loop0").map(|m| m.rdev()).unwrap_or(nix::sys::stat::makedev(7, 0));
    nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        other,
    )
    .unwrap();
    let v = h.json(&["activations"]);
    assert!(v["activations"][0]["minor"].is_null(), "a foreign node was reported: {v}");
    let again = h.json(&["activate", "a", "--name", "vm"]);
    assert_eq!((again["major"].as_u64().unwrap(), again["minor"].as_u64().unwrap()), (ma, mi), "{again}");
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.rdev(), nix::sys::stat::makedev(ma, mi), "the node was not repaired");
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Issue 10 item 15 (R9): after a "reboot" the paths of a block pool name
/// other devices; the pool is not assembled on them (nothing formatted),
/// and once the names are right again it comes back.
#[test]
fn state_block_pool_is_reassembled_only_on_its_own_devices() {
    let h = Host::new("blk", "device-size = 64M\n");
    let dir = h.t.state.parent().unwrap().join("disks");
    std::fs::create_dir_all(&dir).unwrap();
    let (data, meta) = (dir.join("data.img"), dir.join("meta.img"));
    std::fs::File::create(&data).unwrap().set_len(256 << 20).unwrap();
    std::fs::File::create(&meta).unwrap().set_len(8 << 20).unwrap();
    let ld = sh(&format!("losetup --find --show {}", data.display()));
    let lm = sh(&format!("losetup --find --show {}", meta.display()));
    h.ok(&["pool", "create", "--data-dev", &ld, "--meta-dev", &lm]);
    h.upload(&[("a/1.tar", fixture("golang/1.tar"))]);
    h.ok(&["pull", "a"]);
    // Reboot: pool gone, loops gone; then the names come back swapped.
    {
        let (spec, _) = thinimg::store::thin_pool::load(&h.db().conn).unwrap().unwrap();
        thinimg::pool::Pool::find(&spec, &h.run).unwrap().unwrap().teardown().unwrap();
    }
    sh(&format!("losetup -d {ld} {lm}"));
    sh(&format!("losetup {ld} {} && losetup {lm} {}", meta.display(), data.display()));
    let before = std::fs::read(&meta).unwrap()[..4096].to_vec();
    let r = h.cmd(&["gc"], &[]);
    assert_eq!(r.code, 71, "assembled on the wrong devices?\n{}", r.stderr);
    assert!(r.stderr.contains("refusing to assemble"), "{}", r.stderr);
    assert_eq!(std::fs::read(&meta).unwrap()[..4096].to_vec(), before, "the metadata was touched");
    assert!(
        h.devices().is_empty()
            && thinimg::dm::Dm::open().unwrap().list().unwrap().iter().all(|(n, _)| *n != h.pool_name())
    );
    // Names right again: the pool and its image come back.
    sh(&format!("losetup -d {ld} {lm}"));
    sh(&format!("losetup {ld} {} && losetup {lm} {}", data.display(), meta.display()));
    h.ok(&["activate", "a", "--name", "vm"]);
    {
        let (spec, _) = thinimg::store::thin_pool::load(&h.db().conn).unwrap().unwrap();
        thinimg::pool::Pool::find(&spec, &h.run).unwrap().unwrap().teardown().unwrap();
    }
    sh(&format!("losetup -d {ld} {lm}"));
}
