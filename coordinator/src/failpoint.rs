//! Named failpoints for fault-injection tests.
//!
//! Always compiled in, inert unless the process starts with
//! `PXEMESH_FAILPOINTS` set, e.g.
//! `PXEMESH_FAILPOINTS="after_log_append=exit@40,before_apply=sleep(200)"`.
//! Each entry is `name=action[@N]`:
//! - `exit` ends the process at once with status 137, like `kill -9`: no
//!   destructor runs, nothing buffered is flushed (the WAL buffer and sled's
//!   page cache are lost exactly as in a crash);
//! - `sleep(MS)` stalls the calling thread (a slow disk or a stalled actor);
//! - `@N` fires on the N-th hit only (1-based; default: every hit).
//!
//! The hot path pays one relaxed atomic load when no failpoint is configured.
//! Points in the code (see ARCHITECTURE.md): `after_log_append`,
//! `before_apply`, `after_apply`, `after_snapshot_state`,
//! `before_compaction_rewrite`, `during_conf_change`,
//! `cloudstack_after_notify_accepted`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

pub const ENV: &str = "PXEMESH_FAILPOINTS";

/// Exit status of a failpoint crash (128 + SIGKILL, as a shell reports `kill -9`).
pub const EXIT_CODE: i32 = 137;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Exit,
    Sleep(Duration),
}

#[derive(Debug)]
struct Point {
    action: Action,
    /// Fire on this hit only (1-based); 0 = every hit.
    nth: u64,
    hits: AtomicU64,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static POINTS: OnceLock<HashMap<String, Point>> = OnceLock::new();

/// Parse a failpoint specification (the `PXEMESH_FAILPOINTS` syntax).
pub fn parse(spec: &str) -> Result<Vec<(String, Action, u64)>, String> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, rest) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: expected name=action"))?;
        let (action, nth) = match rest.split_once('@') {
            Some((a, n)) => (
                a,
                n.parse::<u64>()
                    .map_err(|_| format!("{item:?}: @N needs a number"))?,
            ),
            None => (rest, 0),
        };
        let action = if action == "exit" {
            Action::Exit
        } else if let Some(ms) = action
            .strip_prefix("sleep(")
            .and_then(|s| s.strip_suffix(')'))
        {
            Action::Sleep(Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("{item:?}: sleep(MS) needs milliseconds"))?,
            ))
        } else {
            return Err(format!("{item:?}: unknown action (exit, sleep(MS))"));
        };
        out.push((name.trim().to_string(), action, nth));
    }
    Ok(out)
}

/// Read `PXEMESH_FAILPOINTS` once. Called by `server::run`; a malformed
/// specification is an error (a fault test must not silently run without
/// its faults).
pub fn init_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    let parsed = parse(&spec)?;
    let map = parsed
        .into_iter()
        .map(|(name, action, nth)| {
            (
                name,
                Point {
                    action,
                    nth,
                    hits: AtomicU64::new(0),
                },
            )
        })
        .collect::<HashMap<_, _>>();
    if map.is_empty() {
        return Ok(());
    }
    tracing::warn!(failpoints = %spec, "FAILPOINTS ARE ACTIVE (fault-injection testing only)");
    let _ = POINTS.set(map);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// A named point in the code. Free unless failpoints are configured.
#[inline]
pub fn hit(name: &str) {
    if ENABLED.load(Ordering::Relaxed) {
        fire(name);
    }
}

#[cold]
fn fire(name: &str) {
    let Some(p) = POINTS.get().and_then(|m| m.get(name)) else {
        return;
    };
    let n = p.hits.fetch_add(1, Ordering::Relaxed) + 1;
    if p.nth != 0 && n != p.nth {
        return;
    }
    match &p.action {
        Action::Exit => {
            // Straight to stderr: the tracing writer may buffer.
            eprintln!("FAILPOINT {name} fired (hit {n}): exiting with status {EXIT_CODE}");
            std::process::exit(EXIT_CODE);
        }
        Action::Sleep(d) => {
            eprintln!("FAILPOINT {name} fired (hit {n}): sleeping {d:?}");
            std::thread::sleep(*d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec() {
        let p = parse("after_log_append=exit@40, before_apply=sleep(250),x=exit").unwrap();
        assert_eq!(
            p,
            vec![
                ("after_log_append".into(), Action::Exit, 40),
                (
                    "before_apply".into(),
                    Action::Sleep(Duration::from_millis(250)),
                    0
                ),
                ("x".into(), Action::Exit, 0),
            ]
        );
        assert!(parse("nope").is_err());
        assert!(parse("a=explode").is_err());
        assert!(parse("a=exit@x").is_err());
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn inert_without_configuration() {
        // Not initialised in unit tests: a hit is a no-op.
        hit("after_log_append");
    }
}
