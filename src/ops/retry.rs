//! The one retry policy: bounded exponential backoff, used for a journal
//! step ([`RetryPolicy::step`]) and for an S3 request
//! ([`RetryPolicy::request`]), and the jitter both it and `sync --jitter`
//! draw from. Sleeps wake early with an error on SIGINT/SIGTERM.

use std::time::Duration;

use crate::error::Result;

/// How often to try, and how long to wait between tries: before retry
/// number `n` (1-based) at most `base`·2^(n-1), never more than `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, counting the first.
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl RetryPolicy {
    /// A journal step that failed retryably: 4 attempts, 0.5 s doubling to
    /// at most 20 s. A step is expensive and its failures (a busy device,
    /// an unreachable bucket) take a while to clear.
    pub const fn step() -> RetryPolicy {
        RetryPolicy { attempts: 4, base: Duration::from_millis(500), cap: Duration::from_secs(20) }
    }

    /// One S3 request: 6 attempts (`--retries` 5), 0.2 s doubling to at
    /// most 10 s, jittered.
    pub const fn request() -> RetryPolicy {
        RetryPolicy { attempts: 6, base: Duration::from_millis(200), cap: Duration::from_secs(10) }
    }

    /// The same backoff with `attempts` tries in all.
    pub const fn with_attempts(self, attempts: u32) -> RetryPolicy {
        RetryPolicy { attempts, ..self }
    }

    /// The longest sleep before retry number `attempt` (1-based).
    pub fn max_sleep(&self, attempt: u32) -> Duration {
        self.base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(self.cap)
    }

    /// Sleep exactly [`max_sleep`](Self::max_sleep) before retry number
    /// `attempt` (a journal step: one process, nobody to herd with).
    pub fn sleep(&self, attempt: u32) -> Result<()> {
        crate::ops::signals::sleep(self.max_sleep(attempt))
    }

    /// Sleep before retry number `attempt` with "equal jitter": between
    /// half and all of [`max_sleep`](Self::max_sleep) (a request: many
    /// hosts may retry against one server at once).
    pub fn sleep_jittered(&self, attempt: u32) -> Result<()> {
        let max = self.max_sleep(attempt).as_millis().max(1) as u64;
        crate::ops::signals::sleep(Duration::from_millis(max / 2 + jitter() % (max / 2 + 1)))
    }
}

/// A random delay in [0, max): herd control (`sync --jitter`).
pub fn random_delay(max: Duration) -> Duration {
    let ms = max.as_millis().min(u128::from(u64::MAX)) as u64;
    if ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(jitter() % ms)
}

/// A random-enough number for jitter without a rand dependency: std's
/// per-process random SipHash keys over the time.
fn jitter() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::step();
        let s: Vec<u64> = (1..=8).map(|a| p.max_sleep(a).as_millis() as u64).collect();
        assert_eq!(s, [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);
        let r = RetryPolicy::request();
        assert_eq!(r.max_sleep(1), Duration::from_millis(200));
        assert_eq!(r.max_sleep(7), Duration::from_secs(10));
        assert_eq!(r.max_sleep(u32::MAX), Duration::from_secs(10));
        assert_eq!(r.with_attempts(2).attempts, 2);
        assert_eq!(r.with_attempts(2).base, r.base);
    }

    #[test]
    fn random_delay_stays_below_its_bound() {
        assert_eq!(random_delay(Duration::ZERO), Duration::ZERO);
        for _ in 0..100 {
            assert!(random_delay(Duration::from_millis(50)) < Duration::from_millis(50));
        }
    }
}
