//! Logging to stderr: plain text for people, JSON lines for collectors.
//!
//! `-q` shows errors only, default warnings and info, `-v` debug, `-vv`
//! trace; `RUST_LOG` overrides. JSON lines carry the fields set with
//! [`set_context`] (run id, step, image) and the elapsed milliseconds.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use crate::cli::Invocation;

static CONTEXT: Mutex<Vec<(&'static str, String)>> = Mutex::new(Vec::new());
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Set (or with `None`, clear) a context field included in JSON log lines.
pub fn set_context(key: &'static str, value: Option<String>) {
    if let Ok(mut c) = CONTEXT.lock() {
        c.retain(|(k, _)| *k != key);
        if let Some(v) = value {
            c.push((key, v));
        }
    }
}

pub fn init(inv: &Invocation) {
    let _ = START.set(Instant::now());
    let level = if inv.flag("quiet") {
        "error"
    } else {
        match inv.count("verbose") {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let json = inv.get("log-format") == Some("json");
    let mut b = env_logger::Builder::new();
    b.parse_filters(&format!("{level},ureq=warn,rustls=warn,attohttpc=warn"));
    if let Ok(f) = std::env::var("RUST_LOG") {
        b.parse_filters(&f);
    }
    b.target(env_logger::Target::Stderr);
    if json {
        b.format(|buf, rec| {
            let mut m = serde_json::Map::new();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            m.insert("ts".into(), serde_json::json!(now));
            m.insert("level".into(), serde_json::json!(rec.level().as_str().to_ascii_lowercase()));
            m.insert("msg".into(), serde_json::json!(rec.args().to_string()));
            m.insert("target".into(), serde_json::json!(rec.target()));
            if let Some(s) = START.get() {
                m.insert("elapsed_ms".into(), serde_json::json!(s.elapsed().as_millis() as u64));
            }
            if let Ok(c) = CONTEXT.lock() {
                for (k, v) in c.iter() {
                    m.insert((*k).into(), serde_json::json!(v));
                }
            }
            writeln!(buf, "{}", serde_json::Value::Object(m))
        });
    } else {
        b.format(|buf, rec| {
            let lvl = match rec.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            writeln!(buf, "thinimg: {lvl}{}", rec.args())
        });
    }
    let _ = b.try_init();
}
