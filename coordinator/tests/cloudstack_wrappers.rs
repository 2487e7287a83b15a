//! CloudStack's DHCP entry points, as its bare metal plugin runs them over
//! SSH (`deploy/cloudstack/README.md`), against a real coordinator cluster:
//! `dnsmasq_edithosts.sh <mac> <ip> <name>` and `dhcpd_edithosts.py <mac>
//! <ip> <name> <dns> <gateway> <next server>` must leave exactly the
//! reservation CloudStack asked for, replacing earlier entries for the same
//! MAC or IP, the way the original scripts rewrite their hosts files, and
//! keeping what pxemesh knows beyond them (BMC, labels). The kickstart pair,
//! `prepare_kickstart_kernel_initrd.py` and `prepare_kickstart_bootfile.py`,
//! must turn a template's kernel and initrd into image `cs-<uuid>` once and
//! give the host a kickstart profile over it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use pxemesh_proto::v1 as pb;

fn wrapper(c: &Cluster, script: &str, args: &[&str]) -> (bool, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/cloudstack")
        .join(script);
    let out = Command::new(&path)
        .args(args)
        .env("PXEMESHCTL", ctl_bin())
        .env("PXEMESH_ENDPOINTS", c.endpoints())
        .env("PXEMESH_TLS_DIR", c.dir())
        .env("PXEMESH_CERT_STEM", "admin")
        .env("PXEMESH_RACK", "r1")
        .env("PXEMESH_NETWORK", "n1")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn host(c: &Cluster, leader: u64, name: &str) -> Option<pb::Host> {
    let mut cl = c.client(leader);
    let r = cl
        .get(pb::GetRequest {
            kind: pb::Kind::Host as i32,
            name: name.into(),
            consistency: 0,
        })
        .await
        .ok()?
        .into_inner();
    match r.object?.record? {
        pb::object::Record::Host(h) => Some(h),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcp_edithosts_wrappers_make_the_reservation() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("\n*** SKIPPED: python3 is not installed (the wrappers are python, like CloudStack's) ***\n");
        return;
    }
    let c = Cluster::new(1);
    let leader = c.wait_leader(&[1], Duration::from_secs(15)).await;
    let mut cl = c.client(leader);
    seed(&mut cl).await;

    // dnsmasq flavour: <mac> <ip> <name>.
    let (ok, out) = wrapper(
        &c,
        "dnsmasq_edithosts.sh",
        &["52:54:00:cc:00:01", "10.10.0.50", "i-2-17-VM"],
    );
    assert!(ok, "{out}");
    let h = host(&c, leader, "i-2-17-VM")
        .await
        .expect("reservation made");
    assert_eq!(
        (h.mac.as_str(), h.ip.as_str(), h.hostname.as_str()),
        ("52:54:00:cc:00:01", "10.10.0.50", "i-2-17-VM")
    );
    assert_eq!((h.rack.as_str(), h.network.as_str()), ("r1", "n1"));

    // The same MAC again under a new name and address (the instance was
    // recreated): the old entry goes, like the original script's sed.
    let (ok, out) = wrapper(
        &c,
        "dnsmasq_edithosts.sh",
        &["52-54-00-CC-00-01", "10.10.0.51", "i-2-18-VM"],
    );
    assert!(ok, "{out}");
    assert!(
        host(&c, leader, "i-2-17-VM").await.is_none(),
        "old entry kept"
    );
    let h = host(&c, leader, "i-2-18-VM")
        .await
        .expect("new reservation");
    assert_eq!(
        (h.mac.as_str(), h.ip.as_str()),
        ("52:54:00:cc:00:01", "10.10.0.51")
    );

    // dhcpd flavour: <mac> <ip> <name> <dns> <gateway> <next server>; the
    // IP of the earlier entry is taken over.
    let (ok, out) = wrapper(
        &c,
        "dhcpd_edithosts.py",
        &[
            "52:54:00:cc:00:02",
            "10.10.0.51",
            "i-2-19-VM",
            "10.10.0.2",
            "10.10.0.1",
            "10.10.0.3",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        host(&c, leader, "i-2-18-VM").await.is_none(),
        "old IP holder kept"
    );
    let h = host(&c, leader, "i-2-19-VM")
        .await
        .expect("dhcpd reservation");
    assert_eq!(
        (h.mac.as_str(), h.ip.as_str()),
        ("52:54:00:cc:00:02", "10.10.0.51")
    );

    // A host that already has a BMC and labels keeps them when CloudStack
    // re-sends its DHCP entry (the password stays sealed where it was).
    std::fs::write(c.dir().join("bmc-pw"), "s3cret-bmc\n").unwrap();
    let out = c.ctl(&[
        "host",
        "put",
        "i-2-19-VM",
        "--mac",
        "52:54:00:cc:00:02",
        "--ip",
        "10.10.0.51",
        "--rack",
        "r1",
        "--network",
        "n1",
        "--label",
        "pod=p1",
        "--bmc-address",
        "10.99.0.5",
        "--bmc-user",
        "ADMIN",
        "--bmc-password-file",
        c.dir().join("bmc-pw").to_str().unwrap(),
        "--cipher-suite",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out) = wrapper(
        &c,
        "dnsmasq_edithosts.sh",
        &["52:54:00:cc:00:02", "10.10.0.51", "i-2-19-VM"],
    );
    assert!(ok, "{out}");
    let h = host(&c, leader, "i-2-19-VM").await.unwrap();
    let bmc = h.bmc.clone().expect("BMC kept");
    assert_eq!((bmc.address.as_str(), bmc.cipher_suite), ("10.99.0.5", 3));
    assert!(bmc.password_set, "BMC password kept");
    assert_eq!(h.labels.get("pod").map(String::as_str), Some("p1"));

    // Kickstart: the template's kernel and initrd become image cs-<uuid>
    // (once), then the host's boot file becomes a kickstart profile.
    let uuid = "5b6e2c1a-7f00-4c2e-9d11-0a1b2c3d4e5f";
    let src = c.dir().join("nfs-export");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("vmlinuz"), vec![7u8; 300_000]).unwrap();
    std::fs::write(src.join("initrd.img"), vec![9u8; 700_000]).unwrap();
    let dest = format!("/var/lib/tftpboot/{uuid}");
    let kernel = src.join("vmlinuz").display().to_string();
    let initrd = src.join("initrd.img").display().to_string();
    for expect in ["pushed", "already present"] {
        let (ok, out) = wrapper(
            &c,
            "prepare_kickstart_kernel_initrd.py",
            &[&kernel, &initrd, &dest],
        );
        assert!(ok, "{out}");
        assert!(out.contains(expect), "{out}");
    }
    let out = c.ctl(&["-o", "json", "image", "list"]);
    let images: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let img = images
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == format!("cs-{uuid}"))
        .expect("template image");
    let mut paths: Vec<&str> = img["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(paths, ["initrd.img", "vmlinuz"]);

    let (ok, out) = wrapper(
        &c,
        "prepare_kickstart_bootfile.py",
        &[
            "/var/lib/tftpboot",
            "52:54:00:cc:00:02",
            &format!("{uuid}/vmlinuz"),
            &format!("{uuid}/initrd.img"),
            "http://10.10.0.1/ks/centos7.cfg",
            "52:54:00:cc:00:02",
        ],
    );
    assert!(ok, "{out}");
    let h = host(&c, leader, "i-2-19-VM").await.unwrap();
    assert_eq!(h.profile, format!("cs-{uuid}"));
    assert!(h.bmc.is_some_and(|b| b.password_set), "BMC kept");
    let out = c.ctl(&["-o", "json", "profile", "get", &format!("cs-{uuid}")]);
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["kind"], "kickstart");
    assert_eq!(p["image"], format!("cs-{uuid}"));
    assert_eq!(p["kernel"], "vmlinuz");
    assert_eq!(p["kickstart_url"], "http://10.10.0.1/ks/centos7.cfg");
    assert_eq!(
        p["cmdline"],
        "ramdisk_size=66000 ksdevice=52:54:00:cc:00:02"
    );
    // A MAC pxemesh does not know: the DHCP entry must come first.
    let (ok, out) = wrapper(
        &c,
        "prepare_kickstart_bootfile.py",
        &[
            "/var/lib/tftpboot",
            "52:54:00:cc:00:99",
            &format!("{uuid}/vmlinuz"),
            &format!("{uuid}/initrd.img"),
            "http://10.10.0.1/ks/centos7.cfg",
        ],
    );
    assert!(!ok && out.contains("no host with MAC"), "{out}");

    // Bad input: a clear message, exit 1, nothing changed.
    for args in [
        vec!["not-a-mac", "10.10.0.60", "x"],
        vec!["52:54:00:cc:00:03", "10.10.0.60"],
    ] {
        let (ok, out) = wrapper(&c, "dnsmasq_edithosts.sh", &args);
        assert!(!ok, "{args:?} accepted: {out}");
        assert!(out.contains("pxemesh:") || out.contains("usage:"), "{out}");
    }
    // An address outside the network: pxemesh's validation answers.
    let (ok, out) = wrapper(
        &c,
        "dnsmasq_edithosts.sh",
        &["52:54:00:cc:00:04", "192.168.99.9", "i-2-20-VM"],
    );
    assert!(!ok, "{out}");
    assert!(host(&c, leader, "i-2-20-VM").await.is_none());
}
