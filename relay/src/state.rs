//! The rack's desired state as the relay holds it: networks, host reservations
//! and boot profiles, indexed for the hot paths (MAC lookup on every DHCP
//! packet). Immutable once built; updates swap in a whole new `RackState`
//! (`SharedState`), so readers never lock.
//!
//! Sources: a static file (`static` mode: a single-rack install without
//! coordinators) or, with the sync work, the coordinators' rack watch.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pxemesh_coordinator::model::{Host, Image, Mac, Network, Profile};
use serde::Deserialize;

use crate::error::RelayError;

pub type SharedState = Arc<ArcSwap<RackState>>;

#[derive(Debug, Default)]
pub struct RackState {
    pub rack: String,
    /// Cluster revision this state reflects (0 for a static file).
    pub revision: u64,
    networks: Vec<Network>,
    hosts: Vec<Host>,
    profiles: HashMap<String, Profile>,
    by_mac: HashMap<Mac, usize>,
    by_ip: HashMap<Ipv4Addr, usize>,
    /// Image manifests (sync mode): what `images/<name>/<path>` names.
    images: HashMap<String, Image>,
}

/// The static-file format (TOML or JSON): the same field names as the
/// coordinator's records, so a file exported from one loads in the other.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticFile {
    rack: String,
    #[serde(default)]
    networks: Vec<Network>,
    #[serde(default)]
    hosts: Vec<Host>,
    #[serde(default)]
    profiles: Vec<Profile>,
}

impl RackState {
    /// Build and validate. Everything a relay serves must be self-consistent:
    /// a bad record is refused here, never discovered while answering a client.
    pub fn new(
        rack: &str,
        revision: u64,
        networks: Vec<Network>,
        hosts: Vec<Host>,
        profiles: Vec<Profile>,
    ) -> Result<RackState, String> {
        let mut by_mac = HashMap::new();
        let mut by_ip = HashMap::new();
        let mut ips = HashMap::new();
        // Hosts without a reservation (an idle CloudStack host) are known
        // but never answered: they stay out of the lookup indexes, so DHCP,
        // TFTP and HTTP treat their MAC as unknown.
        let mut macs = std::collections::HashSet::new();
        for (i, h) in hosts.iter().enumerate() {
            if !macs.insert(h.mac) {
                return Err(format!("duplicate MAC {} (host {})", h.mac, h.name));
            }
            let Some((ip, network)) = h.reservation() else {
                if h.ip.is_some() || !h.network.is_empty() {
                    return Err(format!(
                        "host {}: ip and network are set together (both, or neither)",
                        h.name
                    ));
                }
                continue;
            };
            let net = networks
                .iter()
                .find(|n| n.name == network)
                .ok_or_else(|| format!("host {}: unknown network {:?}", h.name, network))?;
            if !net.subnet.contains(&ip) {
                return Err(format!(
                    "host {}: IP {} is outside network {} ({})",
                    h.name, ip, net.name, net.subnet
                ));
            }
            if let Some(p) = &h.profile {
                if !profiles.iter().any(|x| &x.name == p) {
                    return Err(format!("host {}: unknown profile {p:?}", h.name));
                }
            }
            by_mac.insert(h.mac, i);
            if let Some(other) = ips.insert((network.to_string(), ip), h.name.clone()) {
                return Err(format!(
                    "duplicate IP {} in network {}: hosts {other} and {}",
                    ip, network, h.name
                ));
            }
            by_ip.insert(ip, i);
        }
        for (i, a) in networks.iter().enumerate() {
            for b in &networks[i + 1..] {
                if a.subnet.contains(&b.subnet.network()) || b.subnet.contains(&a.subnet.network())
                {
                    return Err(format!(
                        "networks {} and {} overlap ({} / {})",
                        a.name, b.name, a.subnet, b.subnet
                    ));
                }
            }
        }
        Ok(RackState {
            by_ip,
            rack: rack.to_string(),
            revision,
            networks,
            hosts,
            profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
            by_mac,
            images: HashMap::new(),
        })
    }

    /// The same state with these image manifests.
    pub fn with_images(mut self, images: impl IntoIterator<Item = Image>) -> RackState {
        self.images = images.into_iter().map(|i| (i.name.clone(), i)).collect();
        self
    }

    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.get(name)
    }

    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.images.values()
    }

    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    pub fn from_static_file(path: &Path) -> Result<RackState, RelayError> {
        let err = |msg: String| RelayError::State {
            path: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let json = path.extension().is_some_and(|e| e == "json");
        RackState::from_static_text(&text, json).map_err(err)
    }

    /// The static-file format from its text (JSON or TOML), validated.
    pub fn from_static_text(text: &str, json: bool) -> Result<RackState, String> {
        let file: StaticFile = if json {
            serde_json::from_str(text).map_err(|e| e.to_string())?
        } else {
            toml::from_str(text).map_err(|e| e.to_string())?
        };
        RackState::new(&file.rack, 0, file.networks, file.hosts, file.profiles)
    }

    /// The reserved host with this MAC (hosts without a reservation are
    /// not found: the relay does not answer them).
    pub fn host_by_mac(&self, mac: &Mac) -> Option<&Host> {
        self.by_mac.get(mac).map(|i| &self.hosts[*i])
    }

    /// The reserved host with this address (networks never overlap, so the
    /// address alone identifies it).
    pub fn host_by_ip(&self, ip: Ipv4Addr) -> Option<&Host> {
        self.by_ip.get(&ip).map(|i| &self.hosts[*i])
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn networks(&self) -> &[Network] {
        &self.networks
    }

    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }

    /// The network whose subnet holds `ip` (a relay agent's giaddr, or the
    /// relay's own address on a directly attached interface).
    pub fn network_containing(&self, ip: Ipv4Addr) -> Option<&Network> {
        self.networks.iter().find(|n| n.subnet.contains(&ip))
    }

    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name)
    }

    /// The boot profile of the host with this MAC, if it has one.
    pub fn profile_of(&self, host: &Host) -> Option<&Profile> {
        host.profile.as_deref().and_then(|p| self.profile(p))
    }
}

pub fn shared(state: RackState) -> SharedState {
    Arc::new(ArcSwap::from_pointee(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"
rack = "r1"

[[networks]]
name = "prov"
rack = "r1"
subnet = "10.20.0.0/24"
gateway = "10.20.0.1"
dns = ["10.20.0.1"]
domain = "rack1.example"
mtu = 9000
vlan = 120
pool = ["10.20.0.200", "10.20.0.210"]
lease_seconds = 600

[[profiles]]
name = "centos"
kind = "kickstart"
kernel = "centos/vmlinuz"
initrds = ["centos/initrd.img"]
cmdline = "inst.text"
kickstart_url = "http://10.20.0.5/ks.cfg"

[[hosts]]
name = "n1"
mac = "52:54:00:12:34:01"
ip = "10.20.0.11"
rack = "r1"
network = "prov"
profile = "centos"
hostname = "n1.rack1.example"
"#;

    #[test]
    fn static_file_loads_and_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rack.toml");
        std::fs::write(&p, SAMPLE).unwrap();
        let s = RackState::from_static_file(&p).unwrap();
        let mac: Mac = "52:54:00:12:34:01".parse().unwrap();
        let h = s.host_by_mac(&mac).unwrap();
        assert_eq!(h.name, "n1");
        assert_eq!(s.profile_of(h).unwrap().kernel, "centos/vmlinuz");
        assert_eq!(
            s.network_containing("10.20.0.77".parse().unwrap())
                .unwrap()
                .name,
            "prov"
        );
        assert!(s.network_containing("10.21.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn static_file_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rack.toml");
        let bad_ip = SAMPLE.replace("ip = \"10.20.0.11\"", "ip = \"10.99.0.11\"");
        std::fs::write(&p, bad_ip).unwrap();
        assert!(RackState::from_static_file(&p)
            .unwrap_err()
            .to_string()
            .contains("outside network prov"));
        let dup = format!("{SAMPLE}\n[[hosts]]\nname = \"n2\"\nmac = \"52:54:00:12:34:01\"\nip = \"10.20.0.12\"\nrack = \"r1\"\nnetwork = \"prov\"\n");
        std::fs::write(&p, dup).unwrap();
        assert!(RackState::from_static_file(&p)
            .unwrap_err()
            .to_string()
            .contains("duplicate MAC"));
        std::fs::write(&p, "rack = 5").unwrap();
        assert!(RackState::from_static_file(&p).is_err());
    }
}
