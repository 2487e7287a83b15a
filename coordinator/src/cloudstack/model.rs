//! The CloudStack objects the bridge reads, as the management server returns
//! them in JSON (lower-case field names, everything optional but the id).
//!
//! Bare metal specifics (from CloudStack's baremetal plugin): hosts have
//! `hypervisor = "BareMetal"`; a host is added with `url=http://<IPMI address>`
//! and the discoverer stores that address as the host's private IP, which
//! `listHosts` returns as `ipaddress`; the provisioning NIC's MAC is the
//! `hostmac` detail given to `addHost` (returned under `details` where the
//! server exposes host details). Kickstart templates carry
//! `url = "ks=<kickstart URL>;kernel=<NFS path>;initrd=<NFS path>"`.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Zone {
    pub id: String,
    pub name: String,
    pub networktype: String,
    pub dns1: Option<String>,
    pub dns2: Option<String>,
    pub allocationstate: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Pod {
    pub id: String,
    pub name: String,
    pub zoneid: String,
    pub zonename: String,
    pub gateway: Option<String>,
    pub netmask: Option<String>,
    pub allocationstate: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CsHost {
    pub id: String,
    pub name: String,
    pub hypervisor: String,
    #[serde(rename = "type")]
    pub host_type: String,
    pub podid: String,
    pub podname: String,
    pub zoneid: String,
    pub zonename: String,
    /// For bare metal: the IPMI address from the host URL.
    pub ipaddress: Option<String>,
    pub state: Option<String>,
    pub resourcestate: Option<String>,
    pub cpunumber: Option<u64>,
    pub cpuspeed: Option<u64>,
    pub memorytotal: Option<u64>,
    /// Provisioning NIC MAC (bare metal `hostmac`), when returned top-level.
    pub hostmac: Option<String>,
    pub details: Option<BTreeMap<String, serde_json::Value>>,
}

impl CsHost {
    pub fn is_bare_metal(&self) -> bool {
        self.hypervisor.eq_ignore_ascii_case("BareMetal")
            && (self.host_type.is_empty() || self.host_type.eq_ignore_ascii_case("Routing"))
    }

    /// The provisioning MAC: `hostmac` top-level or in `details`.
    pub fn host_mac(&self) -> Option<&str> {
        if let Some(m) = self.hostmac.as_deref().filter(|m| !m.is_empty()) {
            return Some(m);
        }
        self.details
            .as_ref()?
            .get("hostmac")
            .and_then(|v| v.as_str())
            .filter(|m| !m.is_empty())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Nic {
    pub id: String,
    pub macaddress: Option<String>,
    pub ipaddress: Option<String>,
    pub netmask: Option<String>,
    pub gateway: Option<String>,
    pub networkid: Option<String>,
    pub networkname: Option<String>,
    pub isdefault: bool,
    pub broadcasturi: Option<String>,
    pub traffictype: Option<String>,
}

impl Nic {
    /// VLAN id from `broadcasturi` like `vlan://1994`.
    pub fn vlan(&self) -> Option<u16> {
        self.broadcasturi
            .as_deref()?
            .strip_prefix("vlan://")?
            .parse()
            .ok()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct VirtualMachine {
    pub id: String,
    pub name: String,
    pub displayname: Option<String>,
    pub instancename: Option<String>,
    pub state: String,
    pub hypervisor: Option<String>,
    pub hostid: Option<String>,
    pub hostname: Option<String>,
    pub zoneid: String,
    pub zonename: Option<String>,
    pub templateid: Option<String>,
    pub templatename: Option<String>,
    pub nic: Vec<Nic>,
}

impl VirtualMachine {
    /// Destroyed or being expunged: its reservation must go.
    pub fn is_gone(&self) -> bool {
        matches!(
            self.state.to_ascii_lowercase().as_str(),
            "destroyed" | "expunging" | "expunged"
        )
    }

    /// The NIC that boots: the default one, else the first.
    pub fn boot_nic(&self) -> Option<&Nic> {
        self.nic.iter().find(|n| n.isdefault).or(self.nic.first())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub displaytext: Option<String>,
    pub url: Option<String>,
    pub hypervisor: Option<String>,
    pub zoneid: Option<String>,
    pub isready: Option<bool>,
    pub ostypename: Option<String>,
}

/// `ks=…;kernel=…;initrd=…` of a bare metal kickstart template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KickstartUrl {
    pub ks: String,
    pub kernel: String,
    pub initrd: String,
}

impl KickstartUrl {
    /// Parses the template URL as CloudStack's kickstart service does: three
    /// `;`-separated `key=value` parts with keys `ks`, `kernel`, `initrd`, each
    /// once. (CloudStack splits each part on every `=`, so it refuses values
    /// containing `=`; we split on the first, which accepts a superset.)
    pub fn parse(url: &str) -> Result<KickstartUrl, String> {
        let err = |why: &str| {
            format!(
                "template url {url:?} is not ks=<kickstart URL>;kernel=<path>;initrd=<path>: {why}"
            )
        };
        let parts: Vec<&str> = url.trim().split(';').collect();
        if parts.len() != 3 {
            return Err(err("expected three ';'-separated parts"));
        }
        let (mut ks, mut kernel, mut initrd) = (None, None, None);
        for part in parts {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err("a part has no '='"))?;
            let v = v.trim();
            if v.is_empty() {
                return Err(err(&format!("{k} is empty")));
            }
            let slot = match k.trim() {
                "ks" => &mut ks,
                "kernel" => &mut kernel,
                "initrd" => &mut initrd,
                other => return Err(err(&format!("unknown key {other:?}"))),
            };
            if slot.replace(v.to_string()).is_some() {
                return Err(err(&format!("{k} given twice")));
            }
        }
        match (ks, kernel, initrd) {
            (Some(ks), Some(kernel), Some(initrd)) => Ok(KickstartUrl { ks, kernel, initrd }),
            _ => Err(err("ks, kernel and initrd are all required")),
        }
    }

    /// Whether a template URL is meant as a kickstart triple at all.
    pub fn looks_like(url: &str) -> bool {
        let u = url.trim_start();
        u.starts_with("ks=") || u.contains(";kernel=") || u.contains(";initrd=")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kickstart_url() {
        let k = KickstartUrl::parse(
            "ks=http://10.0.0.5/ks/centos7.cfg;kernel=10.0.0.5:/export/centos7/vmlinuz;initrd=10.0.0.5:/export/centos7/initrd.img",
        )
        .unwrap();
        assert_eq!(k.ks, "http://10.0.0.5/ks/centos7.cfg");
        assert_eq!(k.kernel, "10.0.0.5:/export/centos7/vmlinuz");
        assert_eq!(k.initrd, "10.0.0.5:/export/centos7/initrd.img");
        // order does not matter
        assert!(KickstartUrl::parse("initrd=i;ks=k;kernel=v").is_ok());
        for bad in [
            "ks=a;kernel=b",
            "ks=a;kernel=b;initrd=c;x=d",
            "ks=a;kernel=b;ramdisk=c",
            "ks=a;ks=b;initrd=c",
            "ks=;kernel=b;initrd=c",
            "ks=a;kernelb;initrd=c",
        ] {
            assert!(KickstartUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(KickstartUrl::looks_like("ks=a;kernel=b"));
        assert!(!KickstartUrl::looks_like("http://dl.openvm.eu/x.vhd.bz2"));
    }

    #[test]
    fn shapes_from_real_responses() {
        // Fields exactly as a 4.16 management server returns them.
        let h: CsHost = serde_json::from_str(
            r#"{"capabilities":"hvm","clusterid":"c","cpunumber":4,"cpuspeed":8000,
            "hypervisor":"BareMetal","id":"h1","ipaddress":"172.16.15.5","memorytotal":8589934592,
            "name":"bm-01","podid":"p1","podname":"POD0","state":"Up","type":"Routing",
            "zoneid":"z1","zonename":"Z","hostha":{"haenable":false},
            "details":{"hostmac":"52:54:00:aa:bb:01"}}"#,
        )
        .unwrap();
        assert!(h.is_bare_metal());
        assert_eq!(h.host_mac(), Some("52:54:00:aa:bb:01"));
        assert_eq!(h.memorytotal, Some(8_589_934_592));
        let vm: VirtualMachine = serde_json::from_str(
            r#"{"id":"v1","name":"vm1","state":"Running","hostid":"h1","zoneid":"z1",
            "nic":[{"broadcasturi":"vlan://1994","gateway":"10.1.1.1","id":"n1","ipaddress":"10.1.1.62",
            "isdefault":true,"macaddress":"02:00:34:fb:00:01","netmask":"255.255.255.0",
            "networkid":"net1","networkname":"test","secondaryip":[],"traffictype":"Guest","type":"Isolated"}]}"#,
        )
        .unwrap();
        assert_eq!(vm.boot_nic().unwrap().vlan(), Some(1994));
        assert!(!vm.is_gone());
    }
}
