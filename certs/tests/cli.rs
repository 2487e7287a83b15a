//! The `pxemesh-certs` command line end to end, checked with openssl's view of
//! the result where a second opinion matters (file modes, SANs, validity).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn certs(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pxemesh-certs"))
        .args(args)
        .output()
        .expect("run pxemesh-certs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn inspect(path: &Path) -> serde_json::Value {
    let out = certs(&["inspect", "-o", "json", path.to_str().unwrap()]);
    serde_json::from_str(&ok(&out)).expect("inspect json")
}

#[test]
fn init_issue_inspect_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    ok(&certs(&[
        "init",
        "--dir",
        d,
        "--trust-domain",
        "dc1.example",
    ]));
    assert_eq!(mode(&tmp.path().join("ca-key.pem")), 0o600);

    // A second init must not destroy the CA.
    let again = certs(&["init", "--dir", d, "--trust-domain", "dc1.example"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    ok(&certs(&[
        "issue",
        "coordinator",
        "--dir",
        d,
        "--id",
        "3",
        "--dns",
        "coord3.dc1.example",
        "--ip",
        "10.0.0.13",
    ]));
    ok(&certs(&[
        "issue", "relay", "--dir", d, "--rack", "r12", "--name", "relay-a",
    ]));
    ok(&certs(&["issue", "admin", "--dir", d, "--name", "alice"]));
    ok(&certs(&[
        "issue", "admin", "--dir", d, "--name", "bob", "--viewer",
    ]));
    for key in [
        "coordinator-3-key.pem",
        "relay-r12-relay-a-key.pem",
        "admin-alice-key.pem",
        "viewer-bob-key.pem",
    ] {
        assert_eq!(mode(&tmp.path().join(key)), 0o600, "{key}");
    }

    let c = inspect(&tmp.path().join("coordinator-3.pem"));
    assert_eq!(c["identity"], "spiffe://dc1.example/coordinator/3");
    assert_eq!(c["dns_names"][0], "coord3.dc1.example");
    assert_eq!(c["ips"][0], "10.0.0.13");
    assert_eq!(c["expired"], false);
    let r = inspect(&tmp.path().join("relay-r12-relay-a.pem"));
    assert_eq!(r["role"]["rack"], "r12");
    assert_eq!(r["role"]["name"], "relay-a");
    let v = inspect(&tmp.path().join("viewer-bob.pem"));
    assert_eq!(v["identity"], "spiffe://dc1.example/admin/viewer/bob");

    // Expired certificates can be made on purpose (tests) and are flagged.
    ok(&certs(&[
        "issue",
        "admin",
        "--dir",
        d,
        "--name",
        "old",
        "--not-before",
        "2020-01-01T00:00:00Z",
        "--not-after",
        "2020-02-01T00:00:00Z",
    ]));
    let text = ok(&certs(&[
        "inspect",
        tmp.path().join("admin-old.pem").to_str().unwrap(),
    ]));
    assert!(text.contains("EXPIRED"), "{text}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    // No CA yet.
    let out = certs(&["issue", "admin", "--dir", d, "--name", "alice"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ca"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&certs(&[
        "init",
        "--dir",
        d,
        "--trust-domain",
        "dc1.example",
    ]));
    // Names that would break identities or file names.
    for bad in ["a/b", "..", ""] {
        let out = certs(&["issue", "relay", "--dir", d, "--rack", bad, "--name", "x"]);
        assert!(!out.status.success(), "rack {bad:?} accepted");
    }
    let out = certs(&["issue", "coordinator", "--dir", d, "--id", "0"]);
    assert!(!out.status.success());
    // Garbage in inspect.
    let junk = tmp.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let out = certs(&["inspect", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error:"));
}
