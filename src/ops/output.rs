//! Printing results: `--json` documents on stdout, or aligned text tables.

use std::io::Write;

use crate::error::{Error, Result};

/// Print one JSON document followed by a newline.
pub fn json(v: &impl serde::Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::software("encoding JSON output").with_source(e))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").map_err(|e| Error::io("writing to stdout", e))
}

static NO_HEADINGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--no-headings`: tables print their rows only.
pub fn set_no_headings(on: bool) {
    NO_HEADINGS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Print rows as a table with a header (unless --no-headings); columns
/// padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let headings = !NO_HEADINGS.load(std::sync::atomic::Ordering::Relaxed);
    let mut w: Vec<usize> = header.iter().map(|h| if headings { h.len() } else { 0 }).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let mut s = String::new();
    let line = |cells: Vec<&str>, s: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(c);
            if i + 1 < n {
                for _ in c.chars().count()..w[i] + 2 {
                    s.push(' ');
                }
            }
        }
        s.push('\n');
    };
    if headings {
        line(header.to_vec(), &mut s);
    }
    for r in rows {
        line(r.iter().map(|c| c.as_str()).collect(), &mut s);
    }
    std::io::stdout().lock().write_all(s.as_bytes()).map_err(|e| Error::io("writing to stdout", e))
}

/// Human-readable byte count: 1.5 GiB.
pub fn bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Seconds since the epoch, for timestamps in the database.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Seconds since the epoch as `2026-12-02 06:07:49Z` (UTC; 0 and below: `-`).
pub fn utc(ts: i64) -> String {
    if ts <= 0 {
        return "-".to_string();
    }
    let days = ts.div_euclid(86400);
    let secs = ts.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1), "1970-01-01 00:00:01Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_796_180_869), "2026-12-02 03:07:49Z");
    }
}
