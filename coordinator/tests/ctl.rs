//! `pxemeshctl` end to end against a real coordinator: every noun's
//! put/get/list/delete, stable JSON, errors and exit codes.

mod common;

use std::time::Duration;

use common::*;
use pxemesh_certs::Role;

fn run(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = cluster.ctl(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let (ok, out, err) = run(cluster, &full);
    assert!(ok, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_noun_round_trips_through_pxemeshctl() {
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;

    let (ok, out, err) = run(
        &cluster,
        &[
            "rack",
            "put",
            "r1",
            "--description",
            "row 3",
            "--oob",
            "10.250.1.0/24",
            "--label",
            "row=3",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("rack r1 created"), "{out}");
    let (_, out, _) = run(
        &cluster,
        &[
            "rack",
            "put",
            "r1",
            "--description",
            "row 3",
            "--oob",
            "10.250.1.0/24",
            "--label",
            "row=3",
        ],
    );
    assert!(out.contains("rack r1 unchanged"), "{out}");
    let r = json(&cluster, &["rack", "get", "r1"]);
    assert_eq!(r["description"], "row 3");
    assert_eq!(r["oob_networks"][0], "10.250.1.0/24");

    let (ok, _, err) = run(
        &cluster,
        &[
            "network",
            "put",
            "n1",
            "--rack",
            "r1",
            "--subnet",
            "10.30.0.0/24",
            "--gateway",
            "10.30.0.1",
            "--dns",
            "10.30.0.2",
            "--mtu",
            "9000",
            "--vlan",
            "300",
            "--pool",
            "10.30.0.200-10.30.0.220",
        ],
    );
    assert!(ok, "{err}");
    let n = json(&cluster, &["network", "get", "n1"]);
    assert_eq!(
        (n["vlan"].as_u64(), n["mtu"].as_u64()),
        (Some(300), Some(9000)),
        "{n}"
    );
    assert_eq!(n["pool_start"], "10.30.0.200");

    let (ok, _, err) = run(
        &cluster,
        &[
            "profile",
            "put",
            "p1",
            "--kind",
            "kickstart",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "initrd.img",
            "--kickstart-url",
            "http://10.30.0.5/ks.cfg",
        ],
    );
    assert!(ok, "{err}");
    let pw = cluster.dir().join("bmc.pw");
    std::fs::write(&pw, "calvin\n").unwrap();
    let (ok, _, err) = run(
        &cluster,
        &[
            "host",
            "put",
            "h1",
            "--mac",
            "52:54:00:30:00:01",
            "--ip",
            "10.30.0.11",
            "--rack",
            "r1",
            "--network",
            "n1",
            "--profile",
            "p1",
            "--bmc-address",
            "10.250.1.11",
            "--bmc-user",
            "root",
            "--bmc-password-file",
            pw.to_str().unwrap(),
            "--cipher-suite",
            "3",
        ],
    );
    assert!(ok, "{err}");
    let h = json(&cluster, &["host", "get", "h1"]);
    assert_eq!(h["mac"], "52:54:00:30:00:01");
    let text = h.to_string();
    assert!(
        text.contains("\"password_set\":true") && !text.contains("calvin"),
        "{text}"
    );

    let list = json(&cluster, &["host", "list", "--rack", "r1"]);
    assert_eq!(list["items"].as_array().map(|a| a.len()), Some(1), "{list}");
    assert!(list["revision"].as_u64().unwrap() >= 4);
    let empty = json(&cluster, &["host", "list", "--rack", "other"]);
    assert_eq!(empty["items"].as_array().map(|a| a.len()), Some(0));

    // Refusals print the gRPC code and reason and exit non-zero.
    let (ok, _, err) = run(&cluster, &["network", "delete", "n1"]);
    assert!(
        !ok && err.contains("failed_precondition") && err.contains("in use by host h1"),
        "{err}"
    );
    let (ok, _, err) = run(&cluster, &["profile", "delete", "p1"]);
    assert!(!ok && err.contains("in use by host h1"), "{err}");

    let (ok, out, _) = run(&cluster, &["host", "delete", "h1"]);
    assert!(ok && out.contains("deleted"), "{out}");
    let (ok, _, err) = run(&cluster, &["host", "get", "h1"]);
    assert!(!ok && err.contains("not_found"), "{err}");
    for (noun, name) in [("profile", "p1"), ("network", "n1"), ("rack", "r1")] {
        let (ok, out, err) = run(&cluster, &[noun, "delete", name]);
        assert!(ok && out.contains("deleted"), "{noun}: {out}{err}");
    }
    assert_eq!(
        json(&cluster, &["rack", "list"])["items"]
            .as_array()
            .map(|a| a.len()),
        Some(0)
    );

    // A viewer certificate reads but cannot write.
    cluster.pki.issue(
        Role::Viewer {
            name: "vera".into(),
        },
        "viewer-vera",
    );
    let out = cluster.ctl_as("viewer-vera", &["rack", "put", "r9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission_denied"));
    let out = cluster.ctl_as("viewer-vera", &["rack", "list"]);
    assert!(out.status.success());

    // Usage errors exit 2; a password is never accepted on the command line.
    let (ok, _, err) = run(&cluster, &["host", "put", "h2", "--bmc-password", "x"]);
    assert!(!ok && err.contains("--bmc-password"), "{err}");
}
