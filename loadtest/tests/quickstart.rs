//! The README's first command, `deploy/quickstart.sh`, run for real: a
//! 3-node cluster, two relays, an image push and a boot storm through each
//! relay; every simulated host must be done, a second run must be a no-op,
//! and `--down` must leave no process behind.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

fn target_dir() -> PathBuf {
    // <target>/debug/pxemesh-loadtest
    Path::new(env!("CARGO_BIN_EXE_pxemesh-loadtest"))
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn quickstart(home: &Path, arg: Option<&str>) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/quickstart.sh");
    let mut c = Command::new("bash");
    c.arg(script);
    if let Some(a) = arg {
        c.arg(a);
    }
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_pxemesh-loadtest"))
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let out = c
        .env("PXEMESH_HOME", home)
        .env(
            "PXEMESH_PROFILE",
            if profile_dir == "release" {
                "release"
            } else {
                "debug"
            },
        )
        .env("CARGO_TARGET_DIR", target_dir())
        // `cargo test --workspace` has built every binary of the workspace.
        .env("PXEMESH_SKIP_BUILD", "1")
        .env("PXEMESH_STORM_HOSTS", "30")
        .output()
        .expect("run deploy/quickstart.sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Processes whose command line mentions the work directory.
fn leftovers(home: &Path) -> Vec<String> {
    let needle = home.to_string_lossy().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) {
            found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    found
}

#[test]
fn quickstart_boots_both_racks_and_down_leaves_nothing() {
    for bin in [
        "pxemesh-coordinator",
        "pxemeshctl",
        "pxemesh-certs",
        "pxemesh-relay",
    ] {
        if !target_dir().join("debug").join(bin).is_file()
            && !target_dir().join("release").join(bin).is_file()
        {
            eprintln!("\n*** SKIPPED quickstart test: {bin} is not built (run the suite with `cargo test --workspace`) ***\n");
            return;
        }
    }
    let busy: Vec<u16> = [7101, 7102, 7103, 6701, 6702, 8101, 8102, 9101, 9201]
        .into_iter()
        .filter(|p| TcpListener::bind(("127.0.0.1", *p)).is_err())
        .collect();
    if !busy.is_empty() {
        eprintln!("\n*** SKIPPED quickstart test: ports {busy:?} on 127.0.0.1 are in use (a quickstart already running? `deploy/quickstart.sh --down`) ***\n");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    struct Down<'a>(&'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = quickstart(self.0, Some("--down"));
        }
    }
    let _down = Down(home.path());

    let (ok, out) = quickstart(home.path(), None);
    assert!(ok, "quickstart failed:\n{out}");
    for rack in ["a", "b"] {
        let json = home.path().join(format!("storm-{rack}.json"));
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&json)
                .unwrap_or_else(|e| panic!("{}: {e}\n{out}", json.display())),
        )
        .unwrap();
        let run = &report["runs"][0];
        assert_eq!(run["hosts"], 30, "{run}");
        assert_eq!(
            run["completed"], 30,
            "rack {rack}: not every host done: {run}"
        );
        assert_eq!(run["failed"], 0, "{run}");
        assert!(home.path().join(format!("storm-{rack}.html")).is_file());
    }
    assert!(out.contains("pxemesh quickstart is running."), "{out}");

    // Re-running is safe: nothing restarted, nothing re-uploaded.
    let (ok, again) = quickstart(home.path(), None);
    assert!(ok, "second quickstart run failed:\n{again}");
    assert!(again.contains("coordinator 1 already running"), "{again}");
    assert!(again.contains("relay-a already running"), "{again}");
    assert!(again.contains("image demo unchanged"), "{again}");

    let (ok, out) = quickstart(home.path(), Some("--down"));
    assert!(ok, "--down failed:\n{out}");
    let left = leftovers(home.path());
    assert!(left.is_empty(), "processes left after --down: {left:#?}");
}
