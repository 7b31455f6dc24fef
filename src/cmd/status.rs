//! `thinimg status`: the pool, counts, space, runs in flight and recent
//! failures (`pipeline::views::StatusView`), read without the lock;
//! `--watch` redraws it every second.

use std::fmt::Write as _;

use crate::cli::Invocation;
use crate::error::Result;
use crate::ops::output;
use crate::pipeline::views::{self, SpaceView, StatusView};

/// An optional value as text: `-` when unknown (no raw `null` in text output).
fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_string())
}

fn pct_txt(v: Option<f64>) -> String {
    v.map(|p| format!("{p}%")).unwrap_or_else(|| "-".to_string())
}

fn bytes_txt(v: Option<u64>) -> String {
    v.map(output::bytes).unwrap_or_else(|| "-".to_string())
}

fn render_space(s: &mut String, sp: &SpaceView) {
    let _ = writeln!(
        s,
        "space    blobs {} ({}), partial downloads {} ({})",
        sp.blobs,
        bytes_txt(u64::try_from(sp.blob_bytes).ok()),
        sp.partial_downloads,
        output::bytes(sp.partial_bytes)
    );
    for f in &sp.pool_files {
        let _ = writeln!(
            s,
            "         pool file {}: {} ({} allocated)",
            f.path.display(),
            output::bytes(f.size_bytes),
            output::bytes(f.allocated_bytes)
        );
    }
    if sp.pool_data_total_bytes.is_some() {
        let _ = writeln!(
            s,
            "         pool data {} of {}, metadata {}",
            bytes_txt(sp.pool_data_used_bytes),
            bytes_txt(sp.pool_data_total_bytes),
            pct_txt(sp.pool_meta_used_pct)
        );
    }
    let _ = writeln!(
        s,
        "         state filesystem {} free of {}",
        bytes_txt(sp.fs_free_bytes),
        bytes_txt(sp.fs_total_bytes)
    );
}

fn render_status(v: &StatusView) -> String {
    let mut s = String::new();
    let Some(r) = &v.recorded else {
        let _ = writeln!(s, "no database under {} yet", v.state_dir.display());
        render_space(&mut s, &v.space);
        return s;
    };
    match &r.pool {
        Some(p) => {
            let state = if p.present { opt(p.mode) } else { "not assembled".to_string() };
            let _ = write!(s, "pool     {} ({}): {state}", p.name, p.kind.as_str());
            if p.present {
                let _ = write!(
                    s,
                    ", data {} metadata {} needs_check {}",
                    pct_txt(p.data_used_pct),
                    pct_txt(p.meta_used_pct),
                    opt(p.needs_check)
                );
            }
            let _ = writeln!(s, ", thin devices {}", p.thin_devices);
            if let Some(e) = &p.error {
                let _ = writeln!(s, "         {e}");
            }
        }
        None => {
            let _ = writeln!(s, "pool     none yet");
        }
    }
    let c = &r.counts;
    let _ = writeln!(
        s,
        "blobs    {} ({}), {} rejected\nchains   {}\nimages   {} ({} ready)\nactive   {} of {} activations",
        c.blobs,
        bytes_txt(u64::try_from(c.blob_bytes).ok()),
        c.rejected_blobs,
        c.chains,
        c.images,
        c.images_ready,
        c.activations_active,
        c.activations
    );
    render_space(&mut s, &v.space);
    for f in &r.runs_in_flight {
        let _ = writeln!(
            s,
            "run {}   {} {} at {} ({}){}",
            f.id,
            f.kind,
            f.subject,
            opt(f.step.as_deref()),
            f.progress,
            if f.running { "" } else { " interrupted; resumes on the next write" }
        );
    }
    for e in &r.recent_errors {
        let _ = writeln!(s, "failed   run {} {} {}: {}", e.id, e.kind, e.subject, opt(e.error.as_deref()));
    }
    s
}

pub fn run(inv: &Invocation) -> Result<u8> {
    use std::io::{IsTerminal, Write};
    let watch = inv.flag("watch") && std::io::stdout().is_terminal();
    if !watch {
        let v = views::status(&inv.state_dir(), &inv.run_dir())?;
        if inv.json() {
            output::json(&v)?;
        } else {
            print!("{}", render_status(&v));
        }
        return Ok(0);
    }
    crate::ops::signals::install();
    loop {
        let v = views::status(&inv.state_dir(), &inv.run_dir())?;
        let text = if inv.json() {
            format!(
                "{}\n",
                serde_json::to_string(&v).map_err(|e| crate::Error::software("status to JSON").with_source(e))?
            )
        } else {
            render_status(&v)
        };
        let mut out = std::io::stdout().lock();
        // Home, clear below: redraw in place without a TUI library.
        let _ = write!(out, "\x1b[H\x1b[J{text}");
        let _ = out.flush();
        drop(out);
        if crate::ops::signals::sleep(std::time::Duration::from_secs(1)).is_err() {
            return Ok(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::views::{PoolState, PoolView, RecentError, Recorded, RunInFlight};

    #[test]
    fn status_text_never_prints_a_raw_null() {
        // A half-made pool: recorded, not assembled, every kernel figure unknown.
        let pool = PoolView::recorded("p", crate::pool::PoolKind::Loop, 0);
        let space = SpaceView { partial_downloads: 1, partial_bytes: 5, ..SpaceView::default() };
        let mut v = StatusView {
            state_dir: "/x".into(),
            database: true,
            recorded: Some(Recorded {
                pool: Some(pool),
                counts: Default::default(),
                runs_in_flight: vec![RunInFlight {
                    id: 1,
                    kind: "pull".into(),
                    subject: "x".into(),
                    state: crate::journal::RunState::Active,
                    step: None,
                    progress: "0/1".into(),
                    pid: None,
                    running: false,
                }],
                recent_errors: vec![RecentError {
                    id: 2,
                    kind: "pull".into(),
                    subject: "y".into(),
                    error_kind: None,
                    error: None,
                }],
            }),
            space,
        };
        let t = render_status(&v);
        assert!(!t.contains("null"), "{t}");
        assert!(t.contains("not assembled") && t.contains("partial downloads 1"), "{t}");
        // Present pool with figures: the mode in the one spelling.
        let p = v.recorded.as_mut().and_then(|r| r.pool.as_mut()).unwrap();
        p.present = true;
        p.mode = Some(PoolState::OutOfDataSpace);
        let t = render_status(&v);
        assert!(!t.contains("null") && t.contains("out_of_data_space"), "{t}");
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["pool"]["mode"], "out_of_data_space");
    }
}
