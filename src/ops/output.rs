//! Printing results: `--json` documents on stdout, or aligned text tables.

use std::io::Write;

use crate::error::{Error, Result};

/// Print one JSON document followed by a newline.
pub fn json(v: &impl serde::Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::software("encoding JSON output").with_source(e))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}").map_err(|e| Error::io("writing to stdout", e))
}

/// Print rows as a table with a header; columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
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
    line(header.to_vec(), &mut s);
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
