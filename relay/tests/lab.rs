//! The end-to-end lab (`deploy/lab/lab.sh`) as part of the suite: a power-on
//! through the mesh boots a real VM (QEMU + iPXE ROM) whose BMC is OpenIPMI's
//! ipmi_sim, into a tiny Linux that calls provision-done. Then the same lab
//! with the relay's TFTP disabled must fail and name that step.

mod netns;

use std::path::{Path, PathBuf};
use std::process::Command;

use netns::*;

fn bins() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_pxemesh-relay"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

fn lab(extra_env: &[(&str, &str)]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab/lab.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script).env("BIN", bins());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run deploy/lab/lab.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ready() -> bool {
    let missing: Vec<&str> = [
        "qemu-system-x86_64",
        "ipmi_sim",
        "ipmitool",
        "cpio",
        "dpkg-deb",
    ]
    .into_iter()
    .filter(|c| !have(c))
    .collect();
    !(skip_unless(is_root(), "the lab needs root (namespaces, tap devices)")
        || skip_unless(
            missing.is_empty(),
            &format!("the lab needs {missing:?} (deploy/test-packages.txt)"),
        )
        || skip_unless(
            bins().join("pxemeshctl").is_file() && bins().join("pxemesh-certs").is_file(),
            "pxemeshctl / pxemesh-certs not built (cargo test --workspace builds them)",
        ))
}

#[test]
fn power_on_boots_a_vm_through_the_mesh_and_a_broken_step_is_named() {
    if !ready() {
        return;
    }
    let (ok, out) = lab(&[]);
    assert!(ok, "the lab failed:\n{out}");
    assert!(out.contains("LAB PASSED"), "{out}");
    for step in [
        "pxemeshctl bootdev pxe + power on -> jobs succeed",
        "the BMC started the VM",
        "the VM's iPXE ROM got DHCP from the relay",
        "the VM loaded iPXE over TFTP",
        "the VM fetched kernel and initrd from the relay's image cache",
        "the tiny Linux booted and called provision-done",
    ] {
        assert!(out.contains(step), "step {step:?} not reported:\n{out}");
    }

    // Remove one link of the chain: the run fails and says which.
    let (ok, out) = lab(&[("LAB_BREAK", "tftp"), ("LAB_STEP_TIMEOUT", "60")]);
    assert!(!ok, "the lab passed with the relay's TFTP disabled:\n{out}");
    assert!(
        out.contains("LAB FAILED at step") && out.contains("(the VM loaded iPXE over TFTP)"),
        "the failure does not name the TFTP step:\n{out}"
    );
}
