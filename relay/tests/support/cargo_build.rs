//! `cargo build` of other workspace packages' binaries from inside a test,
//! shared by the tests that start coordinator processes.

use std::path::Path;
use std::process::Command;

/// `cargo build -p <pkg>... --bins` at the workspace root, without the
/// variables cargo set for this test binary (CARGO_PKG_*, CARGO_MANIFEST_DIR,
/// CARGO_PRIMARY_PACKAGE, OUT_DIR, ...): inherited, they make the
/// fingerprints differ and the two builds keep rebuilding each other.
pub fn cargo_build_bins(packages: &[&str]) -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    let keep = [
        "CARGO_HOME",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_PROFILE_",
        "CARGO_INCREMENTAL",
        "CARGO_TERM_",
    ];
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO_") && !keep.iter().any(|p| k.starts_with(p))) || k == "OUT_DIR" {
            c.env_remove(&k);
        }
    }
    c.arg("build");
    for p in packages {
        c.args(["-p", p]);
    }
    c.arg("--bins").current_dir(root);
    c
}
