//! Real firmware: a QEMU VM whose NIC ROM is iPXE boots through the relay in a
//! network namespace: DHCP → TFTP (our iPXE loader) → DHCP again → the
//! per-host HTTP iPXE script → the script's kernel request reaches the relay.
//! Every step must appear, in order, in the relay's boot events.

mod netns;

use std::time::Duration;

use netns::*;

const MAC: &str = "52:54:00:91:00:10";
/// QEMU's default virtio-net ROM: a combined BIOS/UEFI iPXE image (Debian's
/// older `pxe-virtio.rom` registers no boot entry with QEMU 7.2's SeaBIOS).
const ROM: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";
const LOADER: &str = "/usr/lib/ipxe/undionly.kpxe";

#[test]
fn qemu_ipxe_boots_through_the_relay() {
    if skip_unless(
        is_root(),
        "the QEMU boot test needs root for network namespaces and tap devices",
    ) || skip_unless(
        have("qemu-system-x86_64"),
        "qemu-system-x86 is not installed (deploy/test-packages.txt)",
    ) || skip_unless(
        std::path::Path::new(ROM).exists() && std::path::Path::new(LOADER).exists(),
        "ipxe-qemu / ipxe are not installed",
    ) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let boot = dir.join("boot");
    std::fs::create_dir_all(boot.join("demo")).unwrap();
    std::fs::copy(LOADER, boot.join("undionly.kpxe")).unwrap();
    // Not a bootable kernel: the point is that iPXE asks the relay for it.
    std::fs::write(boot.join("demo/vmlinuz"), vec![0u8; 64 * 1024]).unwrap();
    std::fs::write(boot.join("demo/initrd.img"), vec![0u8; 16 * 1024]).unwrap();
    std::fs::write(
        dir.join("rack.toml"),
        format!(
            r#"rack = "r1"
[[networks]]
name = "prov"
rack = "r1"
subnet = "10.91.0.0/24"
mtu = 1500
lease_seconds = 600
[[profiles]]
name = "demo"
kind = "ipxe"
kernel = "demo/vmlinuz"
initrds = ["demo/initrd.img"]
cmdline = "console=ttyS0"
[[hosts]]
name = "vm1"
mac = "{MAC}"
ip = "10.91.0.10"
rack = "r1"
network = "prov"
profile = "demo"
"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("relay.toml"),
        format!(
            r#"name = "relay-q"
data_dir = "{d}/data"
static_state = "{d}/rack.toml"
[[interfaces]]
name = "br0"
address = "10.91.0.1"
[tftp]
listen = "10.91.0.1:69"
[http]
listen = "10.91.0.1:8080"
[boot]
dir = "{d}/boot"
chainload_ipxe = true
"#,
            d = dir.display()
        ),
    )
    .unwrap();

    let mut ns = Netns::new("qemu");
    ns.bridge("br0", "10.91.0.1/24");
    ns.tap("tap0", "br0");
    let relay_log = dir.join("relay.log");
    ns.spawn(
        env!("CARGO_BIN_EXE_pxemesh-relay"),
        &["--config", dir.join("relay.toml").to_str().unwrap()],
        &relay_log,
    );
    let serving = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&relay_log)
            .ok()
            .filter(|l| l.contains("relay serving"))
    });
    assert!(
        serving.is_some(),
        "relay did not start:\n{}",
        std::fs::read_to_string(&relay_log).unwrap_or_default()
    );

    let serial = dir.join("serial.log");
    ns.spawn(
        "qemu-system-x86_64",
        &[
            "-machine",
            "accel=tcg",
            "-m",
            "128",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            &format!("file:{}", serial.display()),
            // SeaBIOS's own log (boot order, option ROMs), for diagnosis.
            "-debugcon",
            &format!("file:{}", dir.join("seabios.log").display()),
            "-global",
            "isa-debugcon.iobase=0x402",
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no",
            // No romfile: QEMU loads its default iPXE ROM for the NIC.
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={MAC}"),
            "-boot",
            "n",
        ],
        &dir.join("qemu.log"),
    );

    // Each step: substrings that must all appear in one "boot event" line,
    // and the steps must appear in this order.
    let script = format!("/boot/{MAC}.ipxe");
    let steps: [[&str; 2]; 4] = [
        ["dhcp-ack", MAC],
        ["tftp-file", "undionly.kpxe"],
        ["http-file", &script],
        ["http-file", "/files/demo/vmlinuz"],
    ];
    let done = wait_for(Duration::from_secs(150), || {
        let log = std::fs::read_to_string(&relay_log).ok()?;
        let events: Vec<&str> = log.lines().filter(|l| l.contains("boot event")).collect();
        let mut at = 0;
        for step in &steps {
            at += events[at..]
                .iter()
                .position(|l| step.iter().all(|p| l.contains(p)))?
                + 1;
        }
        Some(())
    });
    let log = std::fs::read_to_string(&relay_log).unwrap_or_default();
    assert!(
        done.is_some(),
        "boot did not go DHCP → TFTP → HTTP script → kernel request.\nrelay log:\n{log}\nqemu log:\n{}\nSeaBIOS log (tail):\n{}",
        std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default(),
        std::fs::read_to_string(dir.join("seabios.log")).unwrap_or_default().lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    eprintln!("QEMU iPXE boot reached the kernel request; relay boot events:");
    for l in log.lines().filter(|l| l.contains("boot event")) {
        eprintln!("  {l}");
    }
}
