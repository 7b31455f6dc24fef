//! Benchmark: one thin device lifecycle cycle (create_thin, activate,
//! snapshot of the active origin, activate the snapshot, remove both,
//! delete both thin ids) through thinimg's direct ioctls, versus the same
//! nine steps as dmsetup commands, on one loop pool. Run in the VM by
//! `scripts/bench-dm`; prints both timings and their ratio.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use thinimg::dm::{DmName, Sectors, ThinId};
use thinimg::pool::{spec, Pool};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cycles: u32 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let base = PathBuf::from(format!("/tmp/bench-dm-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let name = DmName::new(format!("bench-{}-pool", std::process::id()))?;
    let spec = spec::create_loop_files(&base.join("pool"), name, 256 << 20, 128)?;
    let p = Pool::create(&spec, &base.join("run"))?;
    let size = Sectors::from_bytes(64 << 20);
    let (o, s) = (DmName::new("bench-origin")?, DmName::new("bench-snap")?);
    let (oid, sid) = (ThinId::new(1)?, ThinId::new(2)?);

    let ours = |n: u32| -> Result<Duration, thinimg::Error> {
        let t = Instant::now();
        for _ in 0..n {
            p.create_thin(oid)?;
            p.activate(&o, oid, size)?;
            p.snapshot(sid, oid, Some(&o))?;
            p.activate(&s, sid, size)?;
            p.deactivate(&s)?;
            p.deactivate(&o)?;
            p.delete_thin(sid)?;
            p.delete_thin(oid)?;
        }
        Ok(t.elapsed())
    };
    let pool_name = spec.dm_name.as_str().to_string();
    let table = |id: ThinId| format!("0 {} thin {} {id}", size.0, p.dev());
    let dmsetup = |args: &[&str]| -> Result<(), Box<dyn std::error::Error>> {
        let out = Command::new("dmsetup").arg("--noudevsync").args(args).output()?;
        if !out.status.success() {
            return Err(format!("dmsetup {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    };
    let theirs = |n: u32| -> Result<Duration, Box<dyn std::error::Error>> {
        let t = Instant::now();
        for _ in 0..n {
            dmsetup(&["message", &pool_name, "0", &format!("create_thin {oid}")])?;
            dmsetup(&["create", o.as_str(), "--table", &table(oid)])?;
            dmsetup(&["suspend", o.as_str()])?;
            dmsetup(&["message", &pool_name, "0", &format!("create_snap {sid} {oid}")])?;
            dmsetup(&["resume", o.as_str()])?;
            dmsetup(&["create", s.as_str(), "--table", &table(sid)])?;
            dmsetup(&["remove", s.as_str()])?;
            dmsetup(&["remove", o.as_str()])?;
            dmsetup(&["message", &pool_name, "0", &format!("delete {sid}")])?;
            dmsetup(&["message", &pool_name, "0", &format!("delete {oid}")])?;
        }
        Ok(t.elapsed())
    };
    // Warm up both paths once, then alternate halves to spread noise.
    ours(1)?;
    theirs(1)?;
    let (mut a, mut b) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..2 {
        a += ours(cycles / 2)?;
        b += theirs(cycles / 2)?;
    }
    let n = (cycles / 2 * 2).max(1);
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / n as f64;
    println!(
        "bench-dm: cycle = create_thin, activate, snapshot active origin, activate snapshot, remove x2, delete x2"
    );
    println!("bench-dm: cycles={n}");
    println!("bench-dm: thinimg ioctls  {:8.2} ms/cycle", per(a));
    println!("bench-dm: dmsetup execs   {:8.2} ms/cycle", per(b));
    println!("bench-dm: ratio thinimg/dmsetup = {:.3} (goal <= 0.2)", per(a) / per(b));
    p.teardown()?;
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
