//! Kernel tests of the device-mapper layer, loop devices and the thin-pool
//! manager. They need a kernel with device-mapper and root: run them with
//! `scripts/vm-test` (this target is never run on the host by `make check`).
//! Without /dev/mapper/control every test FAILS, never skips.
//!
//! dmsetup is used only as an independent oracle of what the kernel holds.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use thinimg::dm::{Dm, DmName, Sectors, ThinId};
use thinimg::pool::manager;
use thinimg::pool::{CreateRequest, Created, Gone, Names, Pool, PoolMode, PoolStatus, ThinStatus};
use thinimg::store::Db;
use thinimg::Kind;

const MIB: u64 = 1 << 20;

fn need_dm() {
    if !Path::new("/dev/mapper/control").exists() {
        panic!("needs device-mapper (/dev/mapper/control is missing): run scripts/vm-test");
    }
}

/// A state dir with a loop pool made through `pool::manager::create`, torn down on drop.
struct Fx {
    state: PathBuf,
    run: PathBuf,
    db: Db,
    pool: Option<Pool>,
    mounts: Vec<PathBuf>,
}

impl Fx {
    fn new(tag: &str, data_size: u64) -> Fx {
        need_dm();
        let base = PathBuf::from(format!("/tmp/kt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let state = base.join("state");
        let run = base.join("run");
        std::fs::create_dir_all(&state).unwrap();
        let db = Db::open(&state).unwrap();
        let req = CreateRequest { devices: None, data_size, block_sectors: 128 };
        let (pool, existed) = manager::create(&db.conn, &state, &run, &req).unwrap();
        assert!(!existed);
        Fx { state, run, db, pool: Some(pool), mounts: Vec::new() }
    }
    fn pool(&self) -> &Pool {
        self.pool.as_ref().unwrap()
    }
    fn name(&self, n: &str) -> DmName {
        // Under the pool's prefix (its unique tag) so concurrent state dirs never clash.
        DmName::new(format!("{}{n}", Names::of_pool(self.pool().name()).prefix())).unwrap()
    }
    fn mount(&mut self, dev: &Path, tag: &str) -> PathBuf {
        let mnt = self.state.parent().unwrap().join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&mnt).unwrap();
        run(Command::new("mount").args(["-o", "nosuid,nodev"]).arg(dev).arg(&mnt));
        self.mounts.push(mnt.clone());
        mnt
    }
    fn umount(&mut self, mnt: &Path) {
        run(Command::new("umount").arg(mnt));
        self.mounts.retain(|m| m != mnt);
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        for m in self.mounts.drain(..) {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(p) = self.pool.take() {
            if let Err(e) = p.teardown() {
                eprintln!("teardown: {}", e.full_message());
            }
        }
        let _ = std::fs::remove_dir_all(self.state.parent().unwrap());
    }
}

fn run(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("running {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mkfs(dev: &Path) {
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"])
        .arg(dev));
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn usage(p: &Pool) -> thinimg::pool::PoolUsage {
    match p.status().unwrap() {
        PoolStatus::Active(u) => u,
        other => panic!("pool status {other:?}"),
    }
}

fn id(n: u64) -> ThinId {
    ThinId::new(n).unwrap()
}

#[test]
fn version_list_and_pool_matches_dmsetup() {
    let fx = Fx::new("oracle", 256 * MIB);
    let dm = Dm::open().unwrap();
    let v = dm.version().unwrap();
    assert_eq!(v[0], 4, "dm interface major version");
    let p = fx.pool();
    let listed = dm.list().unwrap();
    assert!(listed.iter().any(|(n, d)| n == p.name().as_str() && *d == p.dev()), "{listed:?}");
    // Our table and status equal dmsetup's.
    let t = dm.table(p.name()).unwrap();
    let ours = t
        .iter()
        .map(|t| format!("{} {} {} {}", t.start.0, t.length.0, t.kind, t.params))
        .collect::<Vec<_>>()
        .join("\n");
    let theirs = run(Command::new("dmsetup").args(["table", p.name().as_str()]));
    assert_eq!(norm(&ours), norm(&theirs));
    let s = dm.status(p.name(), false).unwrap();
    let ours = format!("{} {} {} {}", s[0].start.0, s[0].length.0, s[0].kind, s[0].params);
    let theirs = run(Command::new("dmsetup").args(["status", p.name().as_str()]));
    println!("real thin-pool status: {ours:?}");
    assert_eq!(norm(&ours), norm(&theirs));
    let u = usage(p);
    assert_eq!(u.transaction_id, 0);
    assert_eq!(u.data_used, 0);
    assert_eq!(u.data_total, 256 * MIB / (128 * 512));
    assert_eq!(u.mode, PoolMode::Rw);
    assert!(!u.needs_check);
    p.check_usable().unwrap();
    p.ensure_space(100 * MIB).unwrap();
    assert_eq!(p.ensure_space(300 * MIB).unwrap_err().kind(), Kind::TempFail);
    // info by name agrees with the list, and is ENXIO-free for a missing name.
    let info = dm.info(p.name()).unwrap();
    assert_eq!(info.dev, p.dev());
    assert!(info.active_table && !info.suspended);
    assert!(dm.try_info(&DmName::new("thinimg-no-such-device").unwrap()).unwrap().is_none());
    // A second create on the same state dir adopts, not duplicates.
    let req = CreateRequest { devices: None, data_size: 256 * MIB, block_sectors: 128 };
    let (again, existed) = manager::create(&fx.db.conn, &fx.state, &fx.run, &req).unwrap();
    assert!(existed);
    assert_eq!(again.dev(), p.dev());
}

#[test]
fn thin_mkfs_mount_snapshot_then_diverge() {
    let mut fx = Fx::new("snap", 512 * MIB);
    let (oname, sname) = (fx.name("origin"), fx.name("snap"));
    let size = Sectors::from_bytes(256 * MIB);
    assert_eq!(fx.pool().create_thin(id(0)).unwrap(), Created::New);
    let origin = fx.pool().activate(&oname, id(0), size).unwrap();
    assert!(origin.path.starts_with(fx.run.join("dev")));
    mkfs(&origin.path);
    let om = fx.mount(&origin.path.clone(), "origin");
    std::fs::write(om.join("hello"), b"before snapshot").unwrap();
    run(&mut Command::new("sync"));
    // Snapshot while the origin is mounted and active: suspend, create_snap, resume.
    assert_eq!(fx.pool().snapshot(id(1), id(0), Some(&oname)).unwrap(), Created::New);
    let dm = Dm::open().unwrap();
    assert!(!dm.info(&oname).unwrap().suspended, "origin left suspended");
    let snap = fx.pool().activate(&sname, id(1), size).unwrap();
    let sm = fx.mount(&snap.path.clone(), "snap");
    assert_eq!(std::fs::read(sm.join("hello")).unwrap(), b"before snapshot");
    // Diverge.
    std::fs::write(om.join("hello"), b"origin after").unwrap();
    std::fs::write(sm.join("hello"), b"snapshot after").unwrap();
    std::fs::write(sm.join("only-in-snap"), b"x").unwrap();
    run(&mut Command::new("sync"));
    fx.umount(&om);
    fx.umount(&sm);
    let om = fx.mount(&origin.path, "origin2");
    let sm = fx.mount(&snap.path, "snap2");
    assert_eq!(std::fs::read(om.join("hello")).unwrap(), b"origin after");
    assert_eq!(std::fs::read(sm.join("hello")).unwrap(), b"snapshot after");
    assert!(!om.join("only-in-snap").exists());
    assert!(sm.join("only-in-snap").exists());
    // dmsetup agrees on the thin table.
    let theirs = run(Command::new("dmsetup").args(["table", sname.as_str()]));
    assert_eq!(norm(&theirs), format!("0 {} thin {} 1", size.0, fx.pool().dev()));
    let u = usage(fx.pool());
    assert!(u.data_used > 0);
}

#[test]
fn snapshot_always_resumes_origin_even_on_error() {
    let fx = Fx::new("resume", 128 * MIB);
    let oname = fx.name("o");
    fx.pool().create_thin(id(5)).unwrap();
    fx.pool().activate(&oname, id(5), Sectors::from_bytes(64 * MIB)).unwrap();
    let dm = Dm::open().unwrap();
    // Origin id 9 does not exist: the message fails, the active device is resumed anyway.
    let e = fx.pool().snapshot(id(6), id(9), Some(&oname)).unwrap_err();
    assert!(e.full_message().contains("create_snap 6 of 9"), "{}", e.full_message());
    assert!(!dm.info(&oname).unwrap().suspended);
    // An existing target id is reported, not retried, and the origin is resumed.
    fx.pool().snapshot(id(6), id(5), Some(&oname)).unwrap();
    assert_eq!(fx.pool().snapshot(id(6), id(5), Some(&oname)).unwrap(), Created::Exists);
    assert!(!dm.info(&oname).unwrap().suspended);
}

#[test]
fn remove_busy_device_retries_then_fails_clearly_then_succeeds() {
    let fx = Fx::new("busy", 128 * MIB);
    let name = fx.name("held");
    fx.pool().create_thin(id(0)).unwrap();
    let node = fx.pool().activate(&name, id(0), Sectors::from_bytes(32 * MIB)).unwrap();
    let holder = File::open(&node.path).unwrap();
    let t = std::time::Instant::now();
    let e = fx.pool().deactivate(&name).unwrap_err();
    let took = t.elapsed();
    assert_eq!(e.kind(), Kind::TempFail);
    assert!(e.full_message().contains(name.as_str()) && e.full_message().contains("busy"), "{}", e.full_message());
    assert!(took.as_secs() < 30, "bounded retries took {took:?}");
    assert!(Dm::open().unwrap().try_info(&name).unwrap().is_some());
    // Deleting the thin while its device is active is refused too (EBUSY), boundedly.
    assert!(fx.pool().delete_thin(id(0)).is_err());
    drop(holder);
    assert_eq!(fx.pool().deactivate(&name).unwrap(), Gone::Removed);
    assert!(!node.path.exists(), "device node left behind");
    assert_eq!(fx.pool().deactivate(&name).unwrap(), Gone::AlreadyGone);
    assert_eq!(fx.pool().delete_thin(id(0)).unwrap(), Gone::Removed);
}

#[test]
fn delete_missing_is_success_and_create_existing_is_reported() {
    let fx = Fx::new("idem", 128 * MIB);
    let p = fx.pool();
    assert_eq!(p.delete_thin(id(42)).unwrap(), Gone::AlreadyGone);
    assert_eq!(p.create_thin(id(3)).unwrap(), Created::New);
    assert_eq!(p.create_thin(id(3)).unwrap(), Created::Exists);
    assert_eq!(p.delete_thin(id(3)).unwrap(), Gone::Removed);
    assert_eq!(p.delete_thin(id(3)).unwrap(), Gone::AlreadyGone);
    assert_eq!(p.create_thin(id(16_777_215)).unwrap(), Created::New);
    // Activation is idempotent for the same table and refuses a different one.
    let n = fx.name("a");
    let a = p.activate(&n, id(16_777_215), Sectors(2048)).unwrap();
    let b = p.activate(&n, id(16_777_215), Sectors(2048)).unwrap();
    assert_eq!(a, b);
    assert_eq!(p.activate(&n, id(16_777_215), Sectors(4096)).unwrap_err().kind(), Kind::CantCreate);
    // Thin status: nothing mapped yet, then 64 KiB (one block) after a write.
    assert_eq!(p.thin_status(&n).unwrap(), ThinStatus::Active { mapped: Sectors(0), highest: None });
    fill(&a.path, MIB).unwrap();
    assert_eq!(p.thin_status(&n).unwrap(), ThinStatus::Active { mapped: Sectors(2048), highest: Some(Sectors(2047)) });
    // Transaction id compare-and-swap.
    p.set_transaction_id(0, 7).unwrap();
    assert_eq!(usage(p).transaction_id, 7);
    let e = p.set_transaction_id(0, 8).unwrap_err();
    assert_eq!(e.kind(), Kind::Software);
    assert_eq!(usage(p).transaction_id, 7);
    // A device left suspended (as by a crash mid-snapshot) is resumed.
    Dm::open().unwrap().suspend(&n).unwrap();
    assert!(p.resume_if_suspended(&n).unwrap());
    assert!(!p.resume_if_suspended(&n).unwrap());
    let names = Names::of_pool(p.name());
    assert!(names.is_ours(n.as_str()));
    let ours = p.list_ours(&names).unwrap();
    assert_eq!(ours.len(), 1);
    assert_eq!((ours[0].1.major, ours[0].1.minor), (a.major, a.minor));
}

#[test]
fn full_pool_errors_cleanly_and_recovers_after_delete() {
    // 32 MiB of data (512 blocks of 64 KiB); two 64 MiB thin devices.
    let fx = Fx::new("full", 32 * MIB);
    let p = fx.pool();
    let (a, b) = (fx.name("a"), fx.name("b"));
    p.create_thin(id(0)).unwrap();
    p.create_thin(id(1)).unwrap();
    let na = p.activate(&a, id(0), Sectors::from_bytes(64 * MIB)).unwrap();
    let nb = p.activate(&b, id(1), Sectors::from_bytes(64 * MIB)).unwrap();
    fill(&na.path, 8 * MIB).unwrap();
    // Now fill b until the pool refuses.
    let err = fill(&nb.path, 64 * MIB).expect_err("writing 72 MiB into a 32 MiB pool must fail");
    let errno = err.raw_os_error();
    assert!(errno == Some(libc::EIO) || errno == Some(libc::ENOSPC), "write error {err:?}");
    let line = &Dm::open().unwrap().status(p.name(), false).unwrap()[0].params;
    println!("real full thin-pool status: {line:?}");
    let u = usage(p);
    assert_eq!(u.mode, PoolMode::OutOfDataSpace, "{u:?}");
    assert_eq!(u.data_used, u.data_total);
    let e = p.check_usable().unwrap_err();
    assert_eq!(e.kind(), Kind::TempFail);
    assert!(e.full_message().contains("out of data space"));
    assert_eq!(p.ensure_space(MIB).unwrap_err().kind(), Kind::TempFail);
    // Free space: remove b and delete its thin; the pool returns to rw.
    assert_eq!(p.deactivate(&b).unwrap(), Gone::Removed);
    assert_eq!(p.delete_thin(id(1)).unwrap(), Gone::Removed);
    let u = usage(p);
    assert_eq!(u.mode, PoolMode::Rw, "{u:?}");
    assert!(u.data_used < u.data_total);
    p.check_usable().unwrap();
    // And a is still readable, and new writes work.
    let mut buf = vec![0u8; 4096];
    File::open(&na.path).unwrap().read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0xa5));
    fill(&na.path, 4 * MIB).unwrap();
}

/// Write `bytes` of 0xa5 to a block device and fsync it.
fn fill(dev: &Path, bytes: u64) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(dev)?;
    let chunk = vec![0xa5u8; MIB as usize];
    for _ in 0..bytes / MIB {
        f.write_all(&chunk)?;
    }
    f.sync_all()
}

#[test]
fn teardown_like_reboot_then_reassemble_from_sqlite() {
    let mut fx = Fx::new("reboot", 256 * MIB);
    let name = fx.name("data");
    let size = Sectors::from_bytes(128 * MIB);
    fx.pool().create_thin(id(0)).unwrap();
    let node = fx.pool().activate(&name, id(0), size).unwrap();
    mkfs(&node.path);
    let m = fx.mount(&node.path, "a");
    std::fs::write(m.join("keep"), b"survives reboot").unwrap();
    fx.umount(&m);
    let spec = fx.pool().spec().clone();
    let pool_name = fx.pool().name().clone();
    // "Reboot": every dm device of the pool gone, loops detached, run dir wiped.
    fx.pool.take().unwrap().teardown().unwrap();
    let dm = Dm::open().unwrap();
    let names: Vec<String> = dm.list().unwrap().into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n == pool_name.as_str() || n == name.as_str()), "{names:?}");
    assert!(thinimg::loopdev::find(&spec.data_path).unwrap().is_none(), "data loop still bound");
    assert!(thinimg::loopdev::find(&spec.meta_path).unwrap().is_none(), "meta loop still bound");
    let _ = std::fs::remove_dir_all(&fx.run);
    // Back from the database alone.
    let db = Db::open(&fx.state).unwrap();
    let pool = manager::assemble_usable(&db.conn, &fx.run).unwrap();
    assert_eq!(pool.spec(), &spec);
    assert_eq!(usage(&pool).transaction_id, 0);
    let node = pool.activate(&name, id(0), size).unwrap();
    fx.pool = Some(pool);
    let m = fx.mount(&node.path, "b");
    assert_eq!(std::fs::read(m.join("keep")).unwrap(), b"survives reboot");
    // Assembling again while up adopts (no second loop binding, same dev).
    let again = manager::assemble_usable(&db.conn, &fx.run).unwrap();
    assert_eq!(again.dev(), fx.pool().dev());
    let loops: Vec<_> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .map(|s| s.trim() == spec.data_path.to_str().unwrap())
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(loops.len(), 1, "data file bound more than once");
}

#[test]
fn foreign_pool_metadata_is_refused() {
    // Make a pool, put data in it, forget it in the database, and ask a new
    // state dir to "create" a pool on the same files: it must refuse.
    let fx = Fx::new("foreign", 64 * MIB);
    let p = fx.pool();
    p.create_thin(id(0)).unwrap();
    let n = fx.name("x");
    let node = p.activate(&n, id(0), Sectors::from_bytes(8 * MIB)).unwrap();
    fill(&node.path, MIB).unwrap();
    p.deactivate(&n).unwrap();
    let spec = p.spec().clone();
    let mut fx = fx;
    fx.pool.take().unwrap().teardown().unwrap();
    let e = match Pool::create(&spec, &fx.run) {
        Ok(p) => {
            let _ = p.teardown();
            panic!("adopted a pool with data as new");
        }
        Err(e) => e,
    };
    assert_eq!(e.kind(), Kind::CantCreate);
    assert!(e.full_message().contains("foreign"), "{}", e.full_message());
    assert!(Dm::open().unwrap().try_info(&spec.dm_name).unwrap().is_none(), "refused pool left assembled");
    // The same pool already assembled, with a device in use: refused, and
    // nothing of it is touched.
    let live = Pool::assemble(&spec, &fx.run).unwrap();
    let node = live.activate(&n, id(0), Sectors::from_bytes(8 * MIB)).unwrap();
    let e = Pool::create(&spec, &fx.run).err().expect("adopted a live pool with data as new");
    assert!(e.full_message().contains("foreign"), "{}", e.full_message());
    let dm = Dm::open().unwrap();
    assert!(dm.try_info(&spec.dm_name).unwrap().is_some(), "refusal removed a live foreign pool");
    assert!(dm.try_info(&n).unwrap().is_some(), "refusal removed a device of a foreign pool");
    let mut buf = [0u8; 512];
    File::open(&node.path).unwrap().read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));
    fx.pool = Some(live);
}

#[test]
fn cli_pool_create_and_status() {
    need_dm();
    let base = PathBuf::from(format!("/tmp/kt-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let exe = env!("CARGO_BIN_EXE_thinimg");
    let cmd = |args: &[&str]| {
        let out = Command::new(exe)
            .arg("--state-dir")
            .arg(base.join("state"))
            .arg("--run-dir")
            .arg(base.join("run"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = cmd(&["pool", "status"]);
    assert_eq!(code, Some(66), "status without a pool: {err}");
    let (code, out, err) = cmd(&["pool", "create", "--data-size", "128M"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(err.contains("development"), "loop pool warning missing: {err}");
    let (code, out, err) = cmd(&["--json", "pool", "status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["kind"], "loop");
    assert_eq!(v["status"]["health"], "active");
    assert_eq!(v["status"]["mode"], "rw");
    assert_eq!(v["status"]["needs_check"], false);
    assert_eq!(v["data_used_pct"], 0.0);
    assert_eq!(v["thin_devices"], 0);
    let name = v["dm_name"].as_str().unwrap().to_string();
    assert!(name.starts_with("thinimg-") && name.ends_with("-pool"));
    // `status` reports the same pool with the same spelling of its mode.
    let (code, out, err) = cmd(&["--json", "status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(s["pool"]["dm_name"], v["dm_name"], "{s}");
    assert_eq!(s["pool"]["assembled"], true, "{s}");
    assert_eq!(s["pool"]["mode"], v["status"]["mode"], "status and pool status disagree: {s}\n{v}");
    assert_eq!(s["pool"]["data_total_bytes"], v["data_total_bytes"], "{s}\n{v}");
    let (code, out, err) = cmd(&["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("pool     {name} (loop): rw, data 0%")), "{out}");
    // Rerun is idempotent.
    let (code, out, err) = cmd(&["pool", "create", "--data-size", "128M"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("exists"), "{out}");
    // Clean up through the library.
    let db = Db::open(&base.join("state")).unwrap();
    let spec = manager::spec(&db.conn).unwrap();
    Pool::find(&spec, &base.join("run")).unwrap().unwrap().teardown().unwrap();
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn crash_after_intent_is_finished_by_rerun() {
    need_dm();
    let base = PathBuf::from(format!("/tmp/kt-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let exe = env!("CARGO_BIN_EXE_thinimg");
    let go = |fault: Option<&str>| {
        let mut c = Command::new(exe);
        c.arg("--state-dir").arg(base.join("state")).arg("--run-dir").arg(base.join("run"));
        c.args(["pool", "create", "--data-size", "64M"]);
        if let Some(f) = fault {
            c.env("THINIMG_FAULT", f);
        }
        c.output().unwrap()
    };
    for point in ["pool-create:intent", "pool-create:files", "pool-create:device"] {
        let out = go(Some(point));
        assert_eq!(out.status.code(), None, "{point}: expected SIGKILL, got {:?}", out.status);
    }
    let out = go(None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let db = Db::open(&base.join("state")).unwrap();
    let spec = manager::spec(&db.conn).unwrap();
    let pool = Pool::find(&spec, &base.join("run")).unwrap().expect("pool assembled");
    assert_eq!(usage(&pool).transaction_id, 0);
    // Only one binding of each file, whatever the crashes did.
    let bound = |p: &Path| {
        std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("loop/backing_file"))
                    .map(|s| s.trim() == p.to_str().unwrap())
                    .unwrap_or(false)
            })
            .count()
    };
    assert_eq!(bound(&spec.data_path), 1);
    assert_eq!(bound(&spec.meta_path), 1);
    pool.teardown().unwrap();
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn list_grows_its_buffer_past_16k() {
    need_dm();
    let dm = Dm::open().unwrap();
    let tag = format!("kt-list-{}-", std::process::id());
    let names: Vec<DmName> =
        (0..300).map(|i| DmName::new(format!("{tag}{i:03}-{}", "x".repeat(48))).unwrap()).collect();
    let err =
        [thinimg::dm::Target { start: Sectors(0), length: Sectors(8), kind: "error".into(), params: String::new() }];
    for n in &names {
        dm.create(n, None).unwrap();
        dm.load(n, &err).unwrap();
        dm.resume(n).unwrap();
    }
    // Each entry is 12 bytes + a 65-byte name, 8-aligned, + 8 bytes of
    // event_nr/flags on 6.x: ~88 bytes, so 300 cannot fit the first 16 KiB
    // reply and the choke point must grow its buffer.
    let listed = dm.list().unwrap();
    let ours = listed.iter().filter(|(n, _)| n.starts_with(&tag)).count();
    let theirs = run(Command::new("dmsetup").args(["ls"])).lines().filter(|l| l.starts_with(&tag)).count();
    for n in &names {
        dm.remove(n).unwrap();
    }
    assert_eq!(ours, 300);
    assert_eq!(theirs, 300);
    assert!(dm.list().unwrap().iter().all(|(n, _)| !n.starts_with(&tag)));
}
