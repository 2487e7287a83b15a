//! What a booting client gets: the boot loader chosen by architecture (DHCP
//! option 93), the per-host iPXE script or pxelinux config rendered from the
//! host's boot profile. Shared by the DHCP, TFTP and HTTP services so the three
//! can never disagree.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pxemesh_coordinator::model::{Host, Profile, ProfileKind};

use crate::config::BootConfig;

/// Client system architecture, RFC 4578 option 93 (IANA registry values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientArch {
    Bios,
    UefiX64,
    UefiArm64,
    /// UEFI HTTP boot (x86-64 or ARM64): wants a URL, not a TFTP file name.
    UefiHttpX64,
    UefiHttpArm64,
    Other(u16),
}

impl ClientArch {
    /// `None` (no option 93) is a legacy BIOS PXE ROM.
    pub fn from_option93(code: Option<u16>) -> ClientArch {
        match code {
            None | Some(0) => ClientArch::Bios,
            Some(6) | Some(7) | Some(9) => ClientArch::UefiX64,
            Some(11) => ClientArch::UefiArm64,
            Some(15) | Some(16) => ClientArch::UefiHttpX64,
            Some(19) => ClientArch::UefiHttpArm64,
            Some(other) => ClientArch::Other(other),
        }
    }

    pub fn is_http_boot(self) -> bool {
        matches!(self, ClientArch::UefiHttpX64 | ClientArch::UefiHttpArm64)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClientArch::Bios => "bios",
            ClientArch::UefiX64 => "uefi-x64",
            ClientArch::UefiArm64 => "uefi-arm64",
            ClientArch::UefiHttpX64 => "uefi-http-x64",
            ClientArch::UefiHttpArm64 => "uefi-http-arm64",
            ClientArch::Other(_) => "other",
        }
    }
}

/// Where a client fetches its next stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootTarget {
    /// A file name for option 67 / `file`, fetched by TFTP from siaddr.
    Tftp(String),
    /// A URL for option 67 (UEFI HTTP boot, or iPXE fetching its script).
    Http(String),
    /// Nothing to boot (unsupported architecture).
    None,
}

pub fn http_base(server: Ipv4Addr, port: u16) -> String {
    if port == 80 {
        format!("http://{server}")
    } else {
        format!("http://{server}:{port}")
    }
}

/// URL path of a host's iPXE script.
pub fn script_path(mac: &str) -> String {
    format!("/boot/{mac}.ipxe")
}

/// Decide the next stage. A client already running iPXE (option 77 "iPXE" or
/// option 175 present) gets its per-host script over HTTP instead of another
/// chainload, which would loop forever.
///
/// With `boot.chainload_ipxe`, pass `is_ipxe` only when the client is running
/// *our* iPXE (see `LoaderTracker`); a ROM's built-in iPXE then gets the loader.
pub fn choose(
    arch: ClientArch,
    is_ipxe: bool,
    mac: &str,
    boot: &BootConfig,
    base: &str,
) -> BootTarget {
    if is_ipxe {
        return BootTarget::Http(format!("{base}{}", script_path(mac)));
    }
    match arch {
        ClientArch::Bios => BootTarget::Tftp(boot.bios.clone()),
        ClientArch::UefiX64 => BootTarget::Tftp(boot.uefi_x64.clone()),
        ClientArch::UefiArm64 => BootTarget::Tftp(boot.uefi_arm64.clone()),
        ClientArch::UefiHttpX64 => BootTarget::Http(format!("{base}/files/{}", boot.uefi_x64)),
        ClientArch::UefiHttpArm64 => BootTarget::Http(format!("{base}/files/{}", boot.uefi_arm64)),
        ClientArch::Other(_) => BootTarget::None,
    }
}

/// Remembers which client addresses just fetched our boot loader, so that
/// with `boot.chainload_ipxe` a NIC ROM that already runs iPXE is still
/// chainloaded into our iPXE build exactly once: the ROM's DHCP gets the loader
/// by TFTP, the loader's own DHCP (same address, moments later) gets the
/// per-host script. Keyed by address because TFTP never sees a MAC.
#[derive(Debug, Default)]
pub struct LoaderTracker {
    served: Mutex<HashMap<Ipv4Addr, Instant>>,
}

/// How long after fetching the loader a client counts as running our iPXE.
pub const LOADER_GRACE: Duration = Duration::from_secs(300);
const TRACKER_CAP: usize = 65_536;

impl LoaderTracker {
    pub fn loaded(&self, ip: Ipv4Addr) {
        let Ok(mut m) = self.served.lock() else {
            return;
        };
        if m.len() >= TRACKER_CAP {
            m.retain(|_, t| t.elapsed() < LOADER_GRACE);
        }
        m.insert(ip, Instant::now());
    }

    pub fn recently_loaded(&self, ip: Ipv4Addr) -> bool {
        self.served
            .lock()
            .map(|m| m.get(&ip).is_some_and(|t| t.elapsed() < LOADER_GRACE))
            .unwrap_or(false)
    }
}

/// Is `path` (as requested over TFTP/HTTP) one of the configured boot loaders?
pub fn is_loader(path: &str, boot: &BootConfig) -> bool {
    let p = path.trim_start_matches('/');
    p == boot.bios || p == boot.uefi_x64 || p == boot.uefi_arm64
}

/// Why a host has nothing to boot (answered as 404 / TFTP "file not found").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoScript(pub String);

fn kernel_args(host: &Host, profile: &Profile) -> String {
    let mut args = profile.cmdline.trim().to_string();
    if !profile.kickstart_url.is_empty() {
        // `ks=` is what CloudStack's kickstart templates and older installers
        // read; `inst.ks=` is the modern spelling. Give both.
        for a in [
            format!("ks={}", profile.kickstart_url),
            format!("inst.ks={}", profile.kickstart_url),
        ] {
            if !args.is_empty() {
                args.push(' ');
            }
            args.push_str(&a);
        }
        args.push_str(&format!(" ksdevice={}", host.mac));
    }
    args
}

/// The per-host iPXE script (served at `/boot/<mac>.ipxe` and as TFTP `<mac>.ipxe`).
pub fn ipxe_script(host: &Host, profile: Option<&Profile>, base: &str) -> Result<String, NoScript> {
    let Some(p) = profile else {
        return Err(NoScript(format!(
            "host {} ({}) has no boot profile",
            host.name, host.mac
        )));
    };
    if !p.ipxe_script.trim().is_empty() {
        let s = p
            .ipxe_script
            .replace("{{base}}", base)
            .replace("{{mac}}", &host.mac.to_string())
            .replace(
                "{{ip}}",
                &host.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            )
            .replace("{{hostname}}", &host.hostname)
            .replace("{{name}}", &host.name);
        return Ok(if s.starts_with("#!ipxe") {
            s
        } else {
            format!("#!ipxe\n{s}")
        });
    }
    let mut s = format!(
        "#!ipxe\necho pxemesh: {} ({}) profile {}\n",
        host.name, host.mac, p.name
    );
    if p.kind == ProfileKind::Localboot {
        s.push_str("exit\n");
        return Ok(s);
    }
    if p.kernel.is_empty() {
        return Err(NoScript(format!("profile {} has no kernel", p.name)));
    }
    let initrd_names: Vec<String> = p
        .initrds
        .iter()
        .map(|i| i.rsplit('/').next().unwrap_or(i).to_string())
        .collect();
    let mut args = kernel_args(host, p);
    for n in &initrd_names {
        args = format!("initrd={n} {args}");
    }
    s.push_str(&format!(
        "kernel {base}/files/{} {}\n",
        file_name(p, &p.kernel),
        args.trim()
    ));
    for (i, path) in p.initrds.iter().enumerate() {
        s.push_str(&format!(
            "initrd --name {} {base}/files/{}\n",
            initrd_names[i],
            file_name(p, path)
        ));
    }
    s.push_str("boot\n");
    Ok(s)
}

/// The per-host pxelinux config (TFTP `pxelinux.cfg/01-<mac-with-dashes>`).
pub fn pxelinux_config(host: &Host, profile: Option<&Profile>) -> Result<String, NoScript> {
    let Some(p) = profile else {
        return Err(NoScript(format!(
            "host {} ({}) has no boot profile",
            host.name, host.mac
        )));
    };
    if p.kind == ProfileKind::Localboot {
        return Ok("DEFAULT local\nLABEL local\n  LOCALBOOT 0\n".into());
    }
    if p.kernel.is_empty() {
        return Err(NoScript(format!("profile {} has no kernel", p.name)));
    }
    let mut append = String::new();
    if !p.initrds.is_empty() {
        let names: Vec<String> = p.initrds.iter().map(|i| file_name(p, i)).collect();
        append.push_str(&format!("initrd={}", names.join(",")));
    }
    let args = kernel_args(host, p);
    if !args.is_empty() {
        if !append.is_empty() {
            append.push(' ');
        }
        append.push_str(&args);
    }
    Ok(format!(
        "DEFAULT pxemesh\nPROMPT 0\nTIMEOUT 1\nLABEL pxemesh\n  KERNEL {}\n  APPEND {}\n",
        file_name(p, &p.kernel),
        append
    ))
}

/// The TFTP/HTTP name of a profile's kernel or initrd: a path in the boot
/// directory, or `images/<image>/<path>` (served from the image cache) when
/// the profile names an image.
pub fn file_name(p: &Profile, path: &str) -> String {
    if p.image.is_empty() {
        path.to_string()
    } else {
        format!("images/{}/{path}", p.image)
    }
}

/// `pxelinux.cfg/01-aa-bb-cc-dd-ee-ff` → the MAC, for per-host lookups.
pub fn mac_from_pxelinux_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix("pxelinux.cfg/01-")?;
    (rest.len() == 17).then(|| rest.replace('-', ":").to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pxemesh_coordinator::model::Meta;

    fn host() -> Host {
        Host {
            name: "n1".into(),
            mac: "52:54:00:12:34:01".parse().unwrap(),
            ip: Some("10.20.0.11".parse().unwrap()),
            hostname: "n1.example".into(),
            rack: "r1".into(),
            network: "prov".into(),
            profile: Some("ks".into()),
            labels: Default::default(),
            bmc: None,
            meta: Meta::default(),
        }
    }

    fn profile(kind: ProfileKind) -> Profile {
        Profile {
            name: "ks".into(),
            description: String::new(),
            kind,
            image: String::new(),
            kernel: "centos/vmlinuz".into(),
            initrds: vec!["centos/initrd.img".into()],
            cmdline: "console=ttyS0".into(),
            kickstart_url: "http://10.20.0.5/ks.cfg".into(),
            ipxe_script: String::new(),
            meta: Meta::default(),
        }
    }

    #[test]
    fn arch_selection() {
        let b = BootConfig::default();
        let base = "http://10.20.0.2:8080";
        let mac = "52:54:00:12:34:01";
        assert_eq!(
            choose(ClientArch::from_option93(None), false, mac, &b, base),
            BootTarget::Tftp("undionly.kpxe".into())
        );
        assert_eq!(
            choose(ClientArch::from_option93(Some(7)), false, mac, &b, base),
            BootTarget::Tftp("ipxe.efi".into())
        );
        assert_eq!(
            choose(ClientArch::from_option93(Some(11)), false, mac, &b, base),
            BootTarget::Tftp("ipxe-arm64.efi".into())
        );
        assert_eq!(
            choose(ClientArch::from_option93(Some(16)), false, mac, &b, base),
            BootTarget::Http(format!("{base}/files/ipxe.efi"))
        );
        // iPXE already running: script, whatever the architecture.
        assert_eq!(
            choose(ClientArch::from_option93(Some(7)), true, mac, &b, base),
            BootTarget::Http(format!("{base}/boot/{mac}.ipxe"))
        );
        assert_eq!(
            choose(ClientArch::from_option93(Some(99)), false, mac, &b, base),
            BootTarget::None
        );
    }

    #[test]
    fn image_profiles_name_cached_files() {
        let mut p = profile(ProfileKind::Kickstart);
        p.image = "centos9".into();
        let s = ipxe_script(&host(), Some(&p), "http://10.20.0.2").unwrap();
        assert!(
            s.contains("kernel http://10.20.0.2/files/images/centos9/centos/vmlinuz "),
            "{s}"
        );
        assert!(s.contains(
            "initrd --name initrd.img http://10.20.0.2/files/images/centos9/centos/initrd.img"
        ));
        let c = pxelinux_config(&host(), Some(&p)).unwrap();
        assert!(c.contains("KERNEL images/centos9/centos/vmlinuz"), "{c}");
        assert!(c.contains("initrd=images/centos9/centos/initrd.img"), "{c}");
    }

    #[test]
    fn script_and_pxelinux_render_the_profile() {
        let h = host();
        let p = profile(ProfileKind::Kickstart);
        let s = ipxe_script(&h, Some(&p), "http://10.20.0.2").unwrap();
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("kernel http://10.20.0.2/files/centos/vmlinuz initrd=initrd.img console=ttyS0 ks=http://10.20.0.5/ks.cfg"), "{s}");
        assert!(s.contains("initrd --name initrd.img http://10.20.0.2/files/centos/initrd.img"));
        assert!(s.trim_end().ends_with("boot"));
        let c = pxelinux_config(&h, Some(&p)).unwrap();
        assert!(
            c.contains("KERNEL centos/vmlinuz")
                && c.contains("APPEND initrd=centos/initrd.img console=ttyS0 ks="),
            "{c}"
        );
        assert!(ipxe_script(&h, None, "http://x")
            .unwrap_err()
            .0
            .contains("no boot profile"));
        let local = ipxe_script(&h, Some(&profile(ProfileKind::Localboot)), "http://x").unwrap();
        assert!(local.contains("exit"));
        let mut custom = profile(ProfileKind::Ipxe);
        custom.ipxe_script = "chain {{base}}/custom/{{mac}}".into();
        assert_eq!(
            ipxe_script(&h, Some(&custom), "http://b").unwrap(),
            "#!ipxe\nchain http://b/custom/52:54:00:12:34:01"
        );
        assert_eq!(
            mac_from_pxelinux_name("pxelinux.cfg/01-52-54-00-12-34-AB").as_deref(),
            Some("52:54:00:12:34:ab")
        );
        assert_eq!(mac_from_pxelinux_name("pxelinux.cfg/default"), None);
    }
}
