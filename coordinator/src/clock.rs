//! The wall-clock time this coordinator writes into commands whose meaning
//! depends on elapsed time (job leases). It is the system clock read once at
//! start, advanced by the monotonic clock: a step of the system clock while
//! the process runs (an NTP step, `date -s`) does not move it, so a lease
//! granted for 60 s stays granted for 60 s; slewing still applies (the
//! monotonic clock follows the NTP frequency correction). A step is picked
//! up at the next restart, and is visible meanwhile as the
//! `pxemesh_coordinator_wall_clock_step_ms` gauge and a warning.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

static ANCHOR: OnceLock<(u64, Instant)> = OnceLock::new();
/// Last step reported in the log (ms, rounded to seconds), to warn once per step.
static REPORTED_STEP: AtomicI64 = AtomicI64::new(0);

fn system_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn anchor() -> &'static (u64, Instant) {
    ANCHOR.get_or_init(|| (system_unix_ms(), Instant::now()))
}

/// Anchor the clock now (called at start; later calls keep the first anchor).
pub fn init() {
    anchor();
}

/// Milliseconds since the Unix epoch, immune to steps of the system clock.
pub fn unix_ms() -> u64 {
    let (at, since) = anchor();
    at.saturating_add(since.elapsed().as_millis() as u64)
}

/// How far the system clock has been stepped since start (ms, + = ahead).
/// Logs a warning when the step changes by a second or more.
pub fn step_ms() -> i64 {
    let step = system_unix_ms() as i64 - unix_ms() as i64;
    let rounded = step / 1000 * 1000;
    let before = REPORTED_STEP.swap(rounded, Ordering::Relaxed);
    if (rounded - before).abs() >= 1000 {
        tracing::warn!(
            step_ms = step,
            "the system clock was stepped since this coordinator started; job lease timing keeps the start-time clock until the next restart"
        );
    }
    step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_monotonic_clock() {
        init();
        let a = unix_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = unix_ms();
        assert!(b >= a + 20 && b < a + 2_000, "{a} {b}");
        // Without a step, it agrees with the system clock.
        assert!(step_ms().abs() < 1_000);
    }
}
