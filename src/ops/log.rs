//! Logging to stderr: plain text for people, JSON lines for collectors.
//!
//! `-q` shows errors only, default warnings and info, `-v` debug, `-vv`
//! trace; `RUST_LOG` overrides. JSON lines carry the fields set with
//! [`set_context`] (run id, step, image) and the elapsed milliseconds.
//! The context is per thread: `sync` pulls images on several threads, and
//! each line must carry the run, step and image of the thread that logs it.

use std::cell::RefCell;
use std::io::Write;
use std::time::Instant;

thread_local! {
    static CONTEXT: RefCell<Vec<(&'static str, String)>> = const { RefCell::new(Vec::new()) };
}
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Set (or with `None`, clear) a context field of this thread's JSON log lines.
pub fn set_context(key: &'static str, value: Option<String>) {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|(k, _)| *k != key);
        if let Some(v) = value {
            c.push((key, v));
        }
    });
}

/// This thread's context fields.
pub fn context() -> Vec<(&'static str, String)> {
    CONTEXT.with(|c| c.borrow().clone())
}

/// How to log, from the command line (built by the command layer).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogConfig {
    /// `-q`: errors only.
    pub quiet: bool,
    /// `-v` count: 1 debug, 2 or more trace.
    pub verbose: u32,
    /// `--log-format json`.
    pub json: bool,
}

pub fn init(cfg: LogConfig) {
    let _ = START.set(Instant::now());
    let level = if cfg.quiet {
        "error"
    } else {
        match cfg.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let json = cfg.json;
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
            for (k, v) in context() {
                m.insert(k.into(), serde_json::json!(v));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_belongs_to_the_thread_that_sets_it() {
        set_context("image", Some("main".into()));
        let seen: Vec<Vec<(&str, String)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    s.spawn(move || {
                        set_context("image", Some(format!("img{i}")));
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        context()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, c) in seen.iter().enumerate() {
            assert_eq!(c, &vec![("image", format!("img{i}"))]);
        }
        assert_eq!(context(), vec![("image", "main".to_string())]);
        set_context("image", None);
        assert!(context().is_empty());
    }
}
