//! The pure mapping from CloudStack state to pxemesh records.
//!
//! `plan` takes what the client listed (zones, pods, bare metal hosts,
//! instances, templates), the mapping configuration and the current pxemesh
//! records, and returns the records to write, the records to delete and a
//! reason for everything it left out. No I/O, no clock: the same inputs give
//! the same plan, and a plan computed against its own result writes nothing.
//!
//! Mapping:
//! - pod → rack (by `pod_racks[pod name | pod id]`, else the pod's name);
//! - every bare metal host → one host record named after it, with the BMC
//!   (IPMI address = host `ipaddress`, credentials from configuration), CPU
//!   and memory (labels). Without a live instance the record has no
//!   reservation (MAC = the host's `hostmac`, no ip/network/profile): it is
//!   power-controllable but relays do not answer it;
//! - a live instance on it adds the reservation: the instance's boot NIC
//!   gives MAC, IP and network, its kickstart template the profile;
//! - bare metal kickstart template → kickstart profile `cs-<template id>`;
//! - an instance destroyed/expunging, or no longer listed → its host's
//!   record goes back to idle (kept); a host no longer listed in a zone that
//!   was listed → its record is deleted. Nothing is deleted on missing
//!   evidence (a zone that was not listed, a host still listed but not
//!   mappable); a host whose live instance cannot be mapped keeps its
//!   record unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use crate::model::{validate_name, Bmc, Host, Kind, Mac, Network, Profile, ProfileKind, Rack};

use super::config::CloudStackConfig;
use super::model::{CsHost, KickstartUrl, Pod, Template, VirtualMachine, Zone};

/// Labels the bridge sets on what it owns.
pub const LABEL_VM_ID: &str = "cloudstack.vm-id";
pub const LABEL_VM_STATE: &str = "cloudstack.vm-state";
pub const LABEL_HOST_ID: &str = "cloudstack.host-id";
pub const LABEL_ZONE_ID: &str = "cloudstack.zone-id";
pub const LABEL_POD_ID: &str = "cloudstack.pod-id";
pub const LABEL_TEMPLATE_ID: &str = "cloudstack.template-id";
pub const LABEL_CPUS: &str = "cloudstack.cpu-number";
pub const LABEL_CPU_MHZ: &str = "cloudstack.cpu-speed-mhz";
pub const LABEL_MEMORY: &str = "cloudstack.memory-bytes";
/// Labels under this prefix are the bridge's own bookkeeping (start counter,
/// jobs submitted, provision-done notified); `plan` carries them over from the
/// current record unchanged.
pub const BRIDGE_LABEL_PREFIX: &str = "cloudstack.bridge.";

/// The parts of the configuration `plan` needs (no file paths, no secrets).
#[derive(Debug, Clone, Default)]
pub struct Mapping {
    pub zones: Vec<String>,
    pub pod_racks: BTreeMap<String, String>,
    pub networks: BTreeMap<String, String>,
    pub bmc_username: String,
    pub bmc_port: u16,
    pub bmc_cipher_suite: u8,
    /// Per CloudStack host (name or id): (username, port) overrides.
    pub bmc_overrides: BTreeMap<String, (Option<String>, Option<u16>)>,
}

impl Mapping {
    pub fn from_config(c: &CloudStackConfig) -> Mapping {
        Mapping {
            zones: c.zones.clone(),
            pod_racks: c.pod_racks.clone(),
            networks: c.networks.clone(),
            bmc_username: c.bmc.username.clone(),
            bmc_port: c.bmc.port,
            bmc_cipher_suite: c.bmc.cipher_suite,
            bmc_overrides: c
                .bmc
                .hosts
                .iter()
                .map(|(k, o)| (k.clone(), (o.username.clone(), o.port)))
                .collect(),
        }
    }
}

/// Everything `plan` looks at.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub zones: Vec<Zone>,
    pub pods: Vec<Pod>,
    pub hosts: Vec<CsHost>,
    pub vms: Vec<VirtualMachine>,
    pub templates: Vec<Template>,
    pub mapping: Mapping,
    /// Current pxemesh records.
    pub racks: Vec<Rack>,
    pub networks: Vec<Network>,
    pub pxe_hosts: Vec<Host>,
    pub profiles: Vec<Profile>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Delete {
    pub kind: Kind,
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skip {
    /// What was skipped, e.g. `instance vm-1 (id)`.
    pub object: String,
    pub reason: String,
}

/// A bare metal host with no live instance: written without a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleHost {
    pub cloudstack_id: String,
    pub name: String,
    pub rack: String,
    pub bmc_address: Option<String>,
    pub mac: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Records to write (only those that differ from the current ones).
    pub racks: Vec<Rack>,
    pub profiles: Vec<Profile>,
    /// Hosts to write. `bmc.password` is `None`: the writer seals the
    /// configured password (see `bmc_credentials`).
    pub hosts: Vec<Host>,
    pub deletes: Vec<Delete>,
    pub skipped: Vec<Skip>,
    pub warnings: Vec<Skip>,
    /// Idle hosts in scope (their records are in `hosts` when they changed).
    pub idle: Vec<IdleHost>,
    /// Desired records already present unchanged.
    pub unchanged: usize,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.racks.is_empty()
            && self.profiles.is_empty()
            && self.hosts.is_empty()
            && self.deletes.is_empty()
    }
}

/// A valid pxemesh record name from a CloudStack name: invalid characters
/// become '-', a leading '.' is dropped, at most 128 characters.
pub fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    while out.starts_with('.') {
        out.remove(0);
    }
    out.truncate(128);
    out
}

pub fn profile_name(template_id: &str) -> String {
    sanitize_name(&format!("cs-{template_id}"))
}

fn prefix_len(netmask: &str) -> Option<u8> {
    let m: Ipv4Addr = netmask.parse().ok()?;
    let bits = u32::from(m);
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// The BMC record of a CloudStack host (password filled in by the writer).
fn bmc_of(cs_host: &CsHost, m: &Mapping) -> Option<Bmc> {
    let (user, port) = m
        .bmc_overrides
        .get(&cs_host.name)
        .or_else(|| m.bmc_overrides.get(&cs_host.id))
        .cloned()
        .unwrap_or((None, None));
    cs_host
        .ipaddress
        .as_deref()
        .filter(|a| !a.is_empty())
        .map(|addr| Bmc {
            address: addr.to_string(),
            port: port.unwrap_or(m.bmc_port),
            username: user.unwrap_or_else(|| m.bmc_username.clone()),
            password: None,
            cipher_suite: m.bmc_cipher_suite,
        })
}

/// Labels every bridge host record carries from its CloudStack host, plus
/// the bridge's own bookkeeping carried over from the current record.
fn host_labels(cs_host: &CsHost, existing: Option<&Host>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_HOST_ID.to_string(), cs_host.id.clone());
    labels.insert(LABEL_ZONE_ID.to_string(), cs_host.zoneid.clone());
    labels.insert(LABEL_POD_ID.to_string(), cs_host.podid.clone());
    if let Some(c) = cs_host.cpunumber {
        labels.insert(LABEL_CPUS.to_string(), c.to_string());
    }
    if let Some(c) = cs_host.cpuspeed {
        labels.insert(LABEL_CPU_MHZ.to_string(), c.to_string());
    }
    if let Some(c) = cs_host.memorytotal {
        labels.insert(LABEL_MEMORY.to_string(), c.to_string());
    }
    if let Some(e) = existing {
        for (k, v) in &e.labels {
            if k.starts_with(BRIDGE_LABEL_PREFIX) {
                labels.insert(k.clone(), v.clone());
            }
        }
    }
    labels
}

fn managed(h: &Host) -> bool {
    h.labels.contains_key(LABEL_VM_ID) || h.labels.contains_key(LABEL_HOST_ID)
}

/// Another pxemesh host already holding `mac` (the state machine refuses a
/// duplicate MAC for the whole batch).
fn mac_owner<'a>(hosts: &'a [Host], mac: &Mac, name: &str) -> Option<&'a str> {
    hosts
        .iter()
        .find(|e| e.mac == *mac && e.name != name)
        .map(|e| e.name.as_str())
}

fn same_host_record(a: &Host, b: &Host) -> bool {
    // The writer fills bmc.password and the state machine stamps meta.
    let strip = |h: &Host| {
        let mut h = h.clone();
        h.meta = Default::default();
        if let Some(b) = h.bmc.as_mut() {
            b.password = None;
        }
        h
    };
    strip(a) == strip(b)
}

pub fn plan(inp: &Inputs) -> Plan {
    let mut p = Plan::default();
    let m = &inp.mapping;

    // Zones in scope, by id.
    let mut zones: BTreeMap<&str, &Zone> = BTreeMap::new();
    for z in &inp.zones {
        if m.zones.is_empty() || m.zones.iter().any(|w| w == &z.id || w == &z.name) {
            zones.insert(z.id.as_str(), z);
        }
    }
    for want in &m.zones {
        if !inp.zones.iter().any(|z| &z.id == want || &z.name == want) {
            p.skipped.push(Skip {
                object: format!("zone {want}"),
                reason: "configured zone was not listed by CloudStack".into(),
            });
        }
    }

    // Pods → racks.
    let mut pod_rack: BTreeMap<&str, String> = BTreeMap::new();
    let mut rack_owner: BTreeMap<String, &str> = BTreeMap::new();
    let mut pods: Vec<&Pod> = inp.pods.iter().collect();
    pods.sort_by(|a, b| a.id.cmp(&b.id));
    for pod in pods {
        if !zones.contains_key(pod.zoneid.as_str()) {
            continue;
        }
        let rack = m
            .pod_racks
            .get(&pod.name)
            .or_else(|| m.pod_racks.get(&pod.id))
            .cloned()
            .unwrap_or_else(|| sanitize_name(&pod.name));
        if let Err(e) = validate_name("rack", &rack) {
            p.skipped.push(Skip {
                object: format!("pod {} ({})", pod.name, pod.id),
                reason: format!("{e}; map it in pod_racks"),
            });
            continue;
        }
        if let Some(other) = rack_owner.get(&rack) {
            p.skipped.push(Skip {
                object: format!("pod {} ({})", pod.name, pod.id),
                reason: format!("rack name {rack} is already used by pod {other}"),
            });
            continue;
        }
        rack_owner.insert(rack.clone(), pod.id.as_str());
        pod_rack.insert(pod.id.as_str(), rack.clone());

        let existing = inp.racks.iter().find(|r| r.name == rack);
        let mut desired = existing.cloned().unwrap_or_else(|| Rack {
            name: rack.clone(),
            description: format!("CloudStack pod {} in zone {}", pod.name, pod.zonename),
            ..Default::default()
        });
        desired.meta = Default::default();
        desired.labels.insert(LABEL_POD_ID.into(), pod.id.clone());
        desired
            .labels
            .insert(LABEL_ZONE_ID.into(), pod.zoneid.clone());
        match existing {
            Some(e)
                if {
                    let mut e = e.clone();
                    e.meta = Default::default();
                    e == desired
                } =>
            {
                p.unchanged += 1
            }
            _ => p.racks.push(desired),
        }
    }

    // Kickstart templates → profiles (a template is listed once per zone).
    let mut profiles: BTreeMap<String, Profile> = BTreeMap::new();
    let mut templates: Vec<&Template> = inp.templates.iter().collect();
    templates.sort_by(|a, b| a.id.cmp(&b.id));
    for t in templates {
        let bare = t
            .hypervisor
            .as_deref()
            .is_some_and(|h| h.eq_ignore_ascii_case("BareMetal"));
        let Some(url) = t.url.as_deref() else {
            continue;
        };
        if !bare && !KickstartUrl::looks_like(url) {
            continue;
        }
        let name = profile_name(&t.id);
        if profiles.contains_key(&name) {
            continue;
        }
        match KickstartUrl::parse(url) {
            Ok(k) => {
                profiles.insert(
                    name.clone(),
                    Profile {
                        name,
                        description: format!(
                            "CloudStack template {} ({}); kernel {}; initrd {}",
                            t.name, t.id, k.kernel, k.initrd
                        ),
                        kind: ProfileKind::Kickstart,
                        image: profile_name(&t.id),
                        kernel: "vmlinuz".into(),
                        initrds: vec!["initrd.img".into()],
                        cmdline: "ramdisk_size=66000".into(),
                        kickstart_url: k.ks,
                        ipxe_script: String::new(),
                        meta: Default::default(),
                    },
                );
            }
            Err(e) => p.skipped.push(Skip {
                object: format!("template {} ({})", t.name, t.id),
                reason: e,
            }),
        }
    }
    for prof in profiles.values() {
        match inp.profiles.iter().find(|e| e.name == prof.name) {
            Some(e)
                if {
                    let mut e = e.clone();
                    e.meta = Default::default();
                    &e == prof
                } =>
            {
                p.unchanged += 1
            }
            _ => p.profiles.push(prof.clone()),
        }
    }

    // Bare metal hosts in scope, by id.
    let mut hosts: BTreeMap<&str, (&CsHost, String)> = BTreeMap::new();
    for h in &inp.hosts {
        if !h.is_bare_metal() || !zones.contains_key(h.zoneid.as_str()) {
            continue;
        }
        match pod_rack.get(h.podid.as_str()) {
            Some(rack) => {
                hosts.insert(h.id.as_str(), (h, rack.clone()));
            }
            None => p.skipped.push(Skip {
                object: format!("host {} ({})", h.name, h.id),
                reason: format!("its pod {} ({}) has no rack", h.podname, h.podid),
            }),
        }
    }

    // Instances → host records.
    let mut desired_hosts: BTreeMap<String, Host> = BTreeMap::new();
    let mut used_hosts: BTreeSet<&str> = BTreeSet::new();
    let mut used_macs: BTreeMap<Mac, String> = BTreeMap::new();
    let mut used_ips: BTreeMap<(String, Ipv4Addr), String> = BTreeMap::new();
    let mut mapped_host_ids: BTreeSet<&str> = BTreeSet::new();
    let mut vms: Vec<&VirtualMachine> = inp.vms.iter().collect();
    vms.sort_by(|a, b| a.id.cmp(&b.id));
    for vm in vms {
        if !zones.contains_key(vm.zoneid.as_str()) || vm.is_gone() {
            continue;
        }
        let obj = format!("instance {} ({})", vm.name, vm.id);
        let skip = |p: &mut Plan, reason: String| {
            p.skipped.push(Skip {
                object: obj.clone(),
                reason,
            })
        };
        let Some(hostid) = vm.hostid.as_deref() else {
            if vm
                .hypervisor
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case("BareMetal"))
            {
                skip(&mut p, format!("state {}: not placed on a host", vm.state));
            }
            continue;
        };
        let Some((cs_host, rack)) = hosts.get(hostid) else {
            // Not a bare metal host of ours (another hypervisor, another zone).
            continue;
        };
        if !used_hosts.insert(hostid) {
            skip(
                &mut p,
                format!("host {} already carries another instance", cs_host.name),
            );
            continue;
        }
        let Some(nic) = vm.boot_nic() else {
            skip(&mut p, "has no NIC".into());
            continue;
        };
        let mac: Mac = match nic.macaddress.as_deref().map(str::parse) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                skip(&mut p, e);
                continue;
            }
            None => {
                skip(&mut p, "its NIC has no MAC address".into());
                continue;
            }
        };
        let ip: Ipv4Addr = match nic.ipaddress.as_deref().map(str::parse) {
            Some(Ok(a)) => a,
            _ => {
                skip(&mut p, format!("its NIC {mac} has no IPv4 address"));
                continue;
            }
        };
        if let Some(hm) = cs_host.host_mac() {
            if hm.parse::<Mac>().ok() != Some(mac) {
                p.warnings.push(Skip {
                    object: obj.clone(),
                    reason: format!(
                        "NIC MAC {mac} differs from host {} hostmac {hm}; using the NIC's",
                        cs_host.name
                    ),
                });
            }
        }

        // Network: explicit mapping, else the rack's network holding the IP.
        let nic_net_keys = [nic.networkid.as_deref(), nic.networkname.as_deref()];
        let mapped = nic_net_keys
            .iter()
            .flatten()
            .find_map(|k| m.networks.get(*k));
        let network = match mapped {
            Some(name) => match inp.networks.iter().find(|n| &n.name == name) {
                Some(n) if &n.rack == rack => n,
                Some(n) => {
                    skip(
                        &mut p,
                        format!(
                            "mapped network {name} belongs to rack {}, the host is in rack {rack}",
                            n.rack
                        ),
                    );
                    continue;
                }
                None => {
                    skip(
                        &mut p,
                        format!("mapped network {name} does not exist in pxemesh"),
                    );
                    continue;
                }
            },
            None => {
                let vlan = nic.vlan();
                let candidates: Vec<&Network> = inp
                    .networks
                    .iter()
                    .filter(|n| &n.rack == rack && n.subnet.contains(&ip))
                    .filter(|n| match (n.vlan, vlan) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    })
                    .collect();
                match candidates.as_slice() {
                    [one] => *one,
                    [] => {
                        let vlan_note = vlan.map(|v| format!(" on VLAN {v}")).unwrap_or_default();
                        skip(&mut p, format!(
                            "no pxemesh network on rack {rack} holds {ip}{vlan_note} (CloudStack network {}); map it in [networks]",
                            nic.networkname.as_deref().or(nic.networkid.as_deref()).unwrap_or("?")
                        ));
                        continue;
                    }
                    many => {
                        let names: Vec<&str> = many.iter().map(|n| n.name.as_str()).collect();
                        skip(
                            &mut p,
                            format!(
                            "{ip} fits several networks on rack {rack} ({}); map it in [networks]",
                            names.join(", ")
                        ),
                        );
                        continue;
                    }
                }
            }
        };
        if let Some(mask) = nic.netmask.as_deref() {
            if prefix_len(mask) != Some(network.subnet.prefix_len()) {
                p.warnings.push(Skip {
                    object: obj.clone(),
                    reason: format!(
                        "NIC netmask {mask} differs from network {} ({})",
                        network.name, network.subnet
                    ),
                });
            }
        }
        if let Some(gw) = nic
            .gateway
            .as_deref()
            .and_then(|g| g.parse::<Ipv4Addr>().ok())
        {
            if network.gateway != Some(gw) {
                p.warnings.push(Skip {
                    object: obj.clone(),
                    reason: format!(
                        "NIC gateway {gw} differs from network {}'s {:?}",
                        network.name, network.gateway
                    ),
                });
            }
        }
        if let Some(zone) = zones.get(vm.zoneid.as_str()) {
            let dns: Vec<IpAddr> = [zone.dns1.as_deref(), zone.dns2.as_deref()]
                .into_iter()
                .flatten()
                .filter_map(|d| d.parse().ok())
                .collect();
            if !dns.is_empty() && !dns.iter().all(|d| network.dns.contains(d)) {
                p.warnings.push(Skip {
                    object: obj.clone(),
                    reason: format!(
                        "zone DNS {dns:?} not all in network {}'s {:?}",
                        network.name, network.dns
                    ),
                });
            }
        }

        let name = sanitize_name(&cs_host.name);
        if let Err(e) = validate_name("host", &name) {
            skip(&mut p, format!("host {}: {e}", cs_host.name));
            continue;
        }
        if desired_hosts.contains_key(&name) {
            skip(
                &mut p,
                format!("host name {name} is taken by another CloudStack host"),
            );
            continue;
        }
        if let Some(other) = used_macs.get(&mac) {
            skip(&mut p, format!("MAC {mac} is already used by {other}"));
            continue;
        }
        if let Some(e) = inp.pxe_hosts.iter().find(|e| e.name == name) {
            if !managed(e) {
                skip(
                    &mut p,
                    format!("host name {name} is taken by a record the bridge does not manage"),
                );
                continue;
            }
        }
        if let Some(other) = mac_owner(&inp.pxe_hosts, &mac, &name) {
            skip(&mut p, format!("MAC {mac} belongs to pxemesh host {other}"));
            continue;
        }
        // What the state machine would refuse for the whole batch.
        let subnet = network.subnet;
        let why_not = if !subnet.contains(&ip) {
            Some(format!(
                "IP {ip} is outside network {} ({subnet})",
                network.name
            ))
        } else if subnet.prefix_len() < 31 && (ip == subnet.network() || ip == subnet.broadcast()) {
            Some(format!(
                "IP {ip} is the network or broadcast address of {subnet}"
            ))
        } else if network.gateway == Some(ip) {
            Some(format!(
                "IP {ip} is the gateway of network {}",
                network.name
            ))
        } else if let Some(o) = used_ips.get(&(network.name.clone(), ip)) {
            Some(format!("IP {ip} is already used by {o}"))
        } else {
            inp.pxe_hosts
                .iter()
                .find(|e| e.network == network.name && e.ip == Some(ip) && e.name != name)
                .map(|e| format!("IP {ip} belongs to pxemesh host {}", e.name))
        };
        if let Some(why) = why_not {
            skip(&mut p, why);
            continue;
        }

        let profile = vm
            .templateid
            .as_deref()
            .map(profile_name)
            .filter(|n| profiles.contains_key(n));
        if profile.is_none() {
            p.warnings.push(Skip {
                object: obj.clone(),
                reason: format!(
                    "template {} is not a kickstart template: no boot profile",
                    vm.templatename
                        .as_deref()
                        .or(vm.templateid.as_deref())
                        .unwrap_or("?")
                ),
            });
        }
        let bmc = bmc_of(cs_host, m);
        if bmc.is_none() {
            p.warnings.push(Skip {
                object: format!("host {} ({})", cs_host.name, cs_host.id),
                reason: "no IPMI address (ipaddress) listed: no BMC record".into(),
            });
        }
        let mut labels = host_labels(cs_host, inp.pxe_hosts.iter().find(|e| e.name == name));
        labels.insert(LABEL_VM_ID.to_string(), vm.id.clone());
        labels.insert(LABEL_VM_STATE.to_string(), vm.state.clone());
        labels.insert(LABEL_ZONE_ID.to_string(), vm.zoneid.clone());
        if let Some(t) = &vm.templateid {
            labels.insert(LABEL_TEMPLATE_ID.to_string(), t.clone());
        }
        used_macs.insert(mac, name.clone());
        used_ips.insert((network.name.clone(), ip), name.clone());
        mapped_host_ids.insert(hostid);
        desired_hosts.insert(
            name.clone(),
            Host {
                name: name.clone(),
                mac,
                ip: Some(ip),
                hostname: sanitize_name(&vm.name),
                rack: rack.clone(),
                network: network.name.clone(),
                profile,
                labels,
                bmc,
                meta: Default::default(),
            },
        );
    }
    // Idle bare metal hosts: a record without a reservation. A host whose
    // live instance could not be mapped keeps its record as it is.
    let mut kept_host_ids: BTreeSet<&str> = BTreeSet::new();
    for (id, (cs_host, rack)) in &hosts {
        if mapped_host_ids.contains(id) {
            continue;
        }
        if used_hosts.contains(id) {
            kept_host_ids.insert(id);
            continue;
        }
        let obj = format!("host {} ({})", cs_host.name, cs_host.id);
        let mut skip = |p: &mut Plan, reason: String| {
            kept_host_ids.insert(id);
            p.skipped.push(Skip {
                object: obj.clone(),
                reason,
            })
        };
        let name = sanitize_name(&cs_host.name);
        if let Err(e) = validate_name("host", &name) {
            skip(&mut p, e);
            continue;
        }
        if desired_hosts.contains_key(&name) {
            skip(
                &mut p,
                format!("host name {name} is taken by another CloudStack host"),
            );
            continue;
        }
        let existing = inp.pxe_hosts.iter().find(|e| e.name == name);
        if existing.is_some_and(|e| !managed(e)) {
            skip(
                &mut p,
                format!("host name {name} is taken by a record the bridge does not manage"),
            );
            continue;
        }
        // CloudStack gives a bare metal instance the host's MAC; an idle
        // host is known by its `hostmac` (else the MAC its record has).
        let mac = match cs_host.host_mac().map(str::parse::<Mac>) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                skip(&mut p, format!("hostmac: {e}"));
                continue;
            }
            // Only this CloudStack host's own record counts: with two hosts
            // of one name, the other's record must not lend its MAC (the
            // name would then change hands on every sync; found by fuzzing).
            None => match existing.filter(|e| {
                e.labels.get(LABEL_HOST_ID).map(String::as_str) == Some(cs_host.id.as_str())
            }) {
                Some(e) => e.mac,
                None => {
                    skip(
                        &mut p,
                        "idle host without a hostmac detail: no record".into(),
                    );
                    continue;
                }
            },
        };
        if let Some(other) = used_macs.get(&mac) {
            skip(&mut p, format!("MAC {mac} is already used by {other}"));
            continue;
        }
        if let Some(other) = mac_owner(&inp.pxe_hosts, &mac, &name) {
            skip(&mut p, format!("MAC {mac} belongs to pxemesh host {other}"));
            continue;
        }
        let bmc = bmc_of(cs_host, m);
        if bmc.is_none() {
            p.warnings.push(Skip {
                object: obj.clone(),
                reason: "no IPMI address (ipaddress) listed: no BMC record".into(),
            });
        }
        used_macs.insert(mac, name.clone());
        p.idle.push(IdleHost {
            cloudstack_id: cs_host.id.clone(),
            name: name.clone(),
            rack: rack.clone(),
            bmc_address: cs_host.ipaddress.clone(),
            mac: Some(mac.to_string()),
        });
        desired_hosts.insert(
            name.clone(),
            Host {
                name: name.clone(),
                mac,
                ip: None,
                hostname: String::new(),
                rack: rack.clone(),
                network: String::new(),
                profile: None,
                labels: host_labels(cs_host, existing),
                bmc,
                meta: Default::default(),
            },
        );
    }
    for h in desired_hosts.values() {
        match inp.pxe_hosts.iter().find(|e| e.name == h.name) {
            Some(e) if same_host_record(e, h) => p.unchanged += 1,
            _ => p.hosts.push(h.clone()),
        }
    }

    // Deletes: managed host records whose CloudStack host is gone, with
    // evidence (its zone was listed and the host is not listed any more).
    let listed_hosts: BTreeSet<&str> = inp.hosts.iter().map(|h| h.id.as_str()).collect();
    let desired_ids: BTreeMap<&str, &str> = desired_hosts
        .values()
        .filter_map(|h| {
            h.labels
                .get(LABEL_HOST_ID)
                .map(|id| (id.as_str(), h.name.as_str()))
        })
        .collect();
    let mut existing: Vec<&Host> = inp.pxe_hosts.iter().collect();
    existing.sort_by(|a, b| a.name.cmp(&b.name));
    for e in existing {
        if !managed(e) || desired_hosts.contains_key(&e.name) {
            continue;
        }
        let zone_listed = e
            .labels
            .get(LABEL_ZONE_ID)
            .is_some_and(|z| zones.contains_key(z.as_str()));
        if !zone_listed {
            p.skipped.push(Skip {
                object: format!("host record {}", e.name),
                reason: "its zone is not in scope or was not listed; not deleting".into(),
            });
            continue;
        }
        let Some(host_id) = e.labels.get(LABEL_HOST_ID) else {
            p.skipped.push(Skip {
                object: format!("host record {}", e.name),
                reason: format!("no {LABEL_HOST_ID} label; not deleting"),
            });
            continue;
        };
        let reason = if let Some(now) = desired_ids.get(host_id.as_str()) {
            format!("CloudStack host {host_id} is now host record {now}")
        } else if listed_hosts.contains(host_id.as_str())
            || kept_host_ids.contains(host_id.as_str())
        {
            p.skipped.push(Skip {
                object: format!("host record {}", e.name),
                reason: format!(
                    "CloudStack host {host_id} is still listed but not mapped; record kept"
                ),
            });
            continue;
        } else {
            format!("CloudStack host {host_id} is no longer listed (removed)")
        };
        p.deletes.push(Delete {
            kind: Kind::Host,
            name: e.name.clone(),
            reason,
        });
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    fn j<T: DeserializeOwned>(s: &str) -> T {
        serde_json::from_str(s).unwrap()
    }

    fn net(name: &str, rack: &str, subnet: &str, gw: &str, vlan: Option<u16>) -> Network {
        Network {
            name: name.into(),
            rack: rack.into(),
            subnet: subnet.parse().unwrap(),
            gateway: Some(gw.parse().unwrap()),
            dns: vec!["10.1.1.2".parse().unwrap()],
            domain: String::new(),
            mtu: 1500,
            vlan,
            pool: None,
            lease_seconds: 3600,
            interface: String::new(),
            meta: Default::default(),
        }
    }

    /// Two pods in zone Z (bare metal), one pod in another zone; three bare
    /// metal hosts and one simulator host; instances: running, starting,
    /// destroyed, unplaced, on an unmapped network; templates: kickstart,
    /// malformed kickstart, ordinary VHD.
    fn fixture() -> Inputs {
        Inputs {
            zones: j(
                r#"[{"id":"z1","name":"Z","networktype":"Advanced","dns1":"10.1.1.2"},
                        {"id":"z2","name":"Other","networktype":"Basic"}]"#,
            ),
            pods: j(
                r#"[{"id":"p1","name":"POD0","zoneid":"z1","zonename":"Z","gateway":"172.16.15.1","netmask":"255.255.255.0"},
                        {"id":"p2","name":"Pod 2","zoneid":"z1","zonename":"Z"},
                        {"id":"p9","name":"far","zoneid":"z2","zonename":"Other"}]"#,
            ),
            hosts: j(r#"[
              {"id":"h1","name":"bm-01","hypervisor":"BareMetal","type":"Routing","podid":"p1","podname":"POD0",
               "zoneid":"z1","zonename":"Z","ipaddress":"172.16.15.11","cpunumber":16,"cpuspeed":2400,
               "memorytotal":68719476736,"state":"Up","details":{"hostmac":"52:54:00:00:00:01"}},
              {"id":"h2","name":"bm-02","hypervisor":"BareMetal","type":"Routing","podid":"p2","podname":"Pod 2",
               "zoneid":"z1","zonename":"Z","ipaddress":"172.16.16.12","cpunumber":8,"memorytotal":34359738368},
              {"id":"h3","name":"bm-03","hypervisor":"BareMetal","type":"Routing","podid":"p1","podname":"POD0",
               "zoneid":"z1","zonename":"Z","ipaddress":"172.16.15.13"},
              {"id":"h4","name":"bm-04","hypervisor":"BareMetal","type":"Routing","podid":"p1","podname":"POD0",
               "zoneid":"z1","zonename":"Z","ipaddress":"172.16.15.14","cpunumber":4,
               "details":{"hostmac":"52:54:00:00:00:04"}},
              {"id":"s1","name":"SimulatedAgent.1","hypervisor":"Simulator","type":"Routing","podid":"p1",
               "podname":"POD0","zoneid":"z1","zonename":"Z","ipaddress":"172.16.15.5"}]"#),
            vms: j(r#"[
              {"id":"v1","name":"web-1","state":"Running","hypervisor":"BareMetal","hostid":"h1","zoneid":"z1",
               "templateid":"t-ks","templatename":"CentOS 7 ks",
               "nic":[{"id":"n1","macaddress":"52:54:00:00:00:01","ipaddress":"10.1.1.62","netmask":"255.255.255.0",
                       "gateway":"10.1.1.1","networkid":"net-a","networkname":"guest-a","isdefault":true,
                       "broadcasturi":"vlan://1994","traffictype":"Guest"}]},
              {"id":"v2","name":"db 2","state":"Starting","hypervisor":"BareMetal","hostid":"h2","zoneid":"z1",
               "templateid":"t-ks",
               "nic":[{"id":"n2","macaddress":"52:54:00:00:00:02","ipaddress":"10.2.0.20","netmask":"255.255.0.0",
                       "gateway":"10.2.0.1","networkid":"net-b","networkname":"guest-b","isdefault":true}]},
              {"id":"v3","name":"old","state":"Destroyed","hypervisor":"BareMetal","zoneid":"z1","nic":[]},
              {"id":"v4","name":"pending","state":"Stopped","hypervisor":"BareMetal","zoneid":"z1","nic":[]},
              {"id":"v5","name":"lost","state":"Running","hypervisor":"BareMetal","hostid":"h3","zoneid":"z1",
               "templateid":"t-vhd",
               "nic":[{"id":"n5","macaddress":"52:54:00:00:00:05","ipaddress":"192.168.99.5","netmask":"255.255.255.0",
                       "networkid":"net-x","networkname":"nowhere","isdefault":true}]},
              {"id":"v6","name":"sim","state":"Running","hypervisor":"Simulator","hostid":"s1","zoneid":"z1",
               "nic":[{"id":"n6","macaddress":"02:00:00:00:00:06","ipaddress":"10.1.1.99","isdefault":true}]}]"#),
            templates: j(r#"[
              {"id":"t-ks","name":"CentOS 7 ks","hypervisor":"BareMetal","zoneid":"z1",
               "url":"ks=http://10.0.0.5/ks/c7.cfg;kernel=10.0.0.5:/export/c7/vmlinuz;initrd=10.0.0.5:/export/c7/initrd.img"},
              {"id":"t-ks","name":"CentOS 7 ks","hypervisor":"BareMetal","zoneid":"z2",
               "url":"ks=http://10.0.0.5/ks/c7.cfg;kernel=10.0.0.5:/export/c7/vmlinuz;initrd=10.0.0.5:/export/c7/initrd.img"},
              {"id":"t-bad","name":"broken","hypervisor":"BareMetal","url":"ks=http://x/ks.cfg;kernel=/k"},
              {"id":"t-vhd","name":"macchinina","hypervisor":"XenServer",
               "url":"http://dl.openvm.eu/cloudstack/macchinina/x86_64/macchinina-xen.vhd.bz2"}]"#),
            mapping: Mapping {
                zones: vec!["Z".into()],
                pod_racks: [("POD0".to_string(), "rack-a".to_string())].into(),
                networks: [("net-b".to_string(), "rack-b-prov".to_string())].into(),
                bmc_username: "ADMIN".into(),
                bmc_port: 623,
                bmc_cipher_suite: 3,
                bmc_overrides: [("bm-02".to_string(), (Some("root".to_string()), Some(6230)))]
                    .into(),
            },
            racks: vec![],
            networks: vec![
                net(
                    "rack-a-guest",
                    "rack-a",
                    "10.1.1.0/24",
                    "10.1.1.1",
                    Some(1994),
                ),
                net("rack-a-other", "rack-a", "10.1.2.0/24", "10.1.2.1", Some(7)),
                net("rack-b-prov", "Pod-2", "10.2.0.0/16", "10.2.0.1", None),
            ],
            pxe_hosts: vec![],
            profiles: vec![],
        }
    }

    fn skipped_about<'a>(p: &'a Plan, what: &str) -> Vec<&'a str> {
        p.skipped
            .iter()
            .filter(|s| s.object.contains(what))
            .map(|s| s.reason.as_str())
            .collect()
    }

    #[test]
    fn maps_pods_hosts_instances_templates() {
        let inp = fixture();
        let p = plan(&inp);

        let racks: Vec<&str> = p.racks.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            racks,
            ["rack-a", "Pod-2"],
            "pods of zone Z only, mapped or sanitized"
        );
        assert_eq!(p.racks[0].labels[LABEL_POD_ID], "p1");

        assert_eq!(p.profiles.len(), 1, "t-ks once although listed per zone");
        let prof = &p.profiles[0];
        assert_eq!(prof.name, "cs-t-ks");
        assert_eq!(prof.kind, ProfileKind::Kickstart);
        assert_eq!(prof.kickstart_url, "http://10.0.0.5/ks/c7.cfg");
        assert!(prof.description.contains("10.0.0.5:/export/c7/vmlinuz"));
        assert_eq!(skipped_about(&p, "template broken").len(), 1);

        let names: Vec<&str> = p.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["bm-01", "bm-02", "bm-04"]);
        let h1 = &p.hosts[0];
        assert_eq!(h1.mac.to_string(), "52:54:00:00:00:01");
        assert_eq!(h1.ip.unwrap().to_string(), "10.1.1.62");
        assert_eq!(h1.rack, "rack-a");
        assert_eq!(
            h1.network, "rack-a-guest",
            "the rack's network holding the IP"
        );
        assert_eq!(h1.profile.as_deref(), Some("cs-t-ks"));
        assert_eq!(h1.hostname, "web-1");
        let bmc = h1.bmc.as_ref().unwrap();
        assert_eq!(
            (bmc.address.as_str(), bmc.port, bmc.username.as_str()),
            ("172.16.15.11", 623, "ADMIN")
        );
        assert!(bmc.password.is_none());
        assert_eq!(h1.labels[LABEL_VM_ID], "v1");
        assert_eq!(h1.labels[LABEL_CPUS], "16");
        assert_eq!(h1.labels[LABEL_MEMORY], "68719476736");

        let h2 = &p.hosts[1];
        assert_eq!(h2.network, "rack-b-prov", "explicit [networks] mapping");
        assert_eq!(h2.rack, "Pod-2");
        assert_eq!(h2.hostname, "db-2");
        assert_eq!(h2.labels[LABEL_VM_STATE], "Starting");
        let b2 = h2.bmc.as_ref().unwrap();
        assert_eq!((b2.port, b2.username.as_str()), (6230, "root"));

        // skipped with reasons
        assert!(skipped_about(&p, "instance lost")[0]
            .contains("no pxemesh network on rack rack-a holds 192.168.99.5"));
        assert!(skipped_about(&p, "instance pending")[0].contains("not placed on a host"));
        assert!(
            skipped_about(&p, "instance sim").is_empty(),
            "other hypervisors are not ours"
        );
        assert!(
            p.skipped.iter().all(|s| !s.object.contains("old")),
            "destroyed: nothing to map"
        );
        // bm-04 has no instance: a record without a reservation, with its
        // hostmac, BMC and labels. bm-03's instance was skipped but the host
        // is in use: no record is written for it.
        assert_eq!(p.idle.len(), 1);
        assert_eq!(p.idle[0].name, "bm-04");
        assert_eq!(p.idle[0].bmc_address.as_deref(), Some("172.16.15.14"));
        let h4 = &p.hosts[2];
        assert_eq!((h4.ip, h4.network.as_str()), (None, ""));
        assert_eq!(h4.reservation(), None);
        assert_eq!(h4.mac.to_string(), "52:54:00:00:00:04");
        assert_eq!((h4.rack.as_str(), h4.profile.as_deref()), ("rack-a", None));
        assert_eq!(h4.bmc.as_ref().unwrap().address, "172.16.15.14");
        assert_eq!(h4.labels[LABEL_HOST_ID], "h4");
        assert_eq!(h4.labels[LABEL_CPUS], "4");
        assert!(!h4.labels.contains_key(LABEL_VM_ID));
        assert!(p.hosts.iter().all(|h| h.name != "bm-03"));
        assert!(p.deletes.is_empty());
    }

    /// Fuzzing found it (fuzz/regressions/cloudstack_json/
    /// duplicate-host-name-without-hostmac-flips): two CloudStack hosts of one
    /// name, the first without `hostmac`. The second's record must not lend
    /// the first its MAC on the next sync, or the name changes hands forever.
    #[test]
    fn duplicate_host_names_settle_on_one_owner() {
        let mut inp = fixture();
        inp.vms.clear();
        inp.hosts = j(r#"[
          {"id":"h2","name":"bm-09","hypervisor":"BareMetal","type":"Routing","podid":"p1","podname":"POD0",
           "zoneid":"z1","zonename":"Z","ipaddress":"172.16.15.12"},
          {"id":"h3","name":"bm-09","hypervisor":"BareMetal","type":"Routing","podid":"p1","podname":"POD0",
           "zoneid":"z1","zonename":"Z","ipaddress":"172.16.15.13","details":{"hostmac":"52:54:00:00:00:13"}}]"#);
        let first = plan(&inp);
        let owner = |hosts: &[Host]| {
            hosts
                .iter()
                .find(|h| h.name == "bm-09")
                .and_then(|h| h.labels.get(LABEL_HOST_ID).cloned())
        };
        assert_eq!(owner(&first.hosts).as_deref(), Some("h3"));
        let mut applied = inp.clone();
        applied.racks = first.racks.clone();
        applied.profiles = first.profiles.clone();
        applied.pxe_hosts = first.hosts.clone();
        let second = plan(&applied);
        assert!(second.is_noop(), "{second:#?}");
    }

    #[test]
    fn idempotent_and_converges() {
        let inp = fixture();
        let first = plan(&inp);
        assert_eq!(first, plan(&inp), "same inputs, same plan");

        // Apply the plan (as the state machine would, sealing a password).
        let mut applied = inp.clone();
        applied.racks = first.racks.clone();
        applied.profiles = first.profiles.clone();
        applied.pxe_hosts = first
            .hosts
            .iter()
            .cloned()
            .map(|mut h| {
                if let Some(b) = h.bmc.as_mut() {
                    b.password = Some(crate::model::Sealed("ciphertext".into()));
                }
                h.meta.revision = 7;
                h
            })
            .collect();
        let second = plan(&applied);
        assert!(second.is_noop(), "{second:#?}");
        assert_eq!(second.unchanged, 2 + 1 + 3);
        // Input order does not matter.
        let mut shuffled = applied.clone();
        shuffled.vms.reverse();
        shuffled.hosts.reverse();
        shuffled.templates.reverse();
        shuffled.pods.reverse();
        assert_eq!(plan(&shuffled), second);
    }

    #[test]
    fn operator_rack_fields_are_kept() {
        let mut inp = fixture();
        inp.racks = vec![Rack {
            name: "rack-a".into(),
            description: "row 3".into(),
            oob_networks: vec!["172.16.15.0/24".parse().unwrap()],
            ..Default::default()
        }];
        let p = plan(&inp);
        let r = p.racks.iter().find(|r| r.name == "rack-a").unwrap();
        assert_eq!(r.description, "row 3");
        assert_eq!(r.oob_networks.len(), 1);
        assert_eq!(r.labels[LABEL_ZONE_ID], "z1");
    }

    #[test]
    fn deletes_only_with_evidence() {
        let inp = fixture();
        let first = plan(&inp);
        let mut later = inp.clone();
        later.pxe_hosts = first.hosts.clone();
        // v1 destroyed, v2 expunged (gone from the list).
        for vm in later.vms.iter_mut() {
            if vm.id == "v1" {
                vm.state = "Destroyed".into();
                vm.hostid = None;
            }
        }
        later.vms.retain(|v| v.id != "v2");
        let p = plan(&later);
        // Instances gone: their hosts go back to idle (kept, reservation
        // dropped, BMC and bookkeeping kept), nothing is deleted.
        assert!(p.deletes.is_empty(), "{:?}", p.deletes);
        let names: Vec<&str> = p.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["bm-01", "bm-02"]);
        for h in &p.hosts {
            assert_eq!(h.reservation(), None, "{h:?}");
            assert!(h.profile.is_none() && !h.labels.contains_key(LABEL_VM_ID));
            assert!(h.bmc.is_some());
        }
        assert_eq!(p.hosts[0].mac.to_string(), "52:54:00:00:00:01");
        assert_eq!(
            p.hosts[1].mac.to_string(),
            "52:54:00:00:00:02",
            "no hostmac listed: the record's MAC"
        );

        // The host itself removed from CloudStack: its record is deleted.
        let mut removed = later.clone();
        removed.pxe_hosts = plan(&later).hosts.clone();
        removed.hosts.retain(|h| h.id != "h2");
        let p = plan(&removed);
        let dels: Vec<(&str, &str)> = p
            .deletes
            .iter()
            .map(|d| (d.name.as_str(), d.reason.as_str()))
            .collect();
        assert_eq!(dels.len(), 1, "{dels:?}");
        assert_eq!(dels[0].0, "bm-02");
        assert!(dels[0].1.contains("no longer listed"), "{}", dels[0].1);

        // The zone was not listed at all: nothing is deleted.
        let mut blind = later.clone();
        blind.zones.retain(|z| z.id != "z1");
        let p = plan(&blind);
        assert!(p.deletes.is_empty(), "{:?}", p.deletes);
        assert!(p
            .skipped
            .iter()
            .any(|s| s.reason.contains("configured zone was not listed")));

        // Alive but unmappable (its pxemesh network is gone): kept, with a reason.
        let mut unmapped = inp.clone();
        unmapped.pxe_hosts = first.hosts.clone();
        unmapped.networks.retain(|n| n.name != "rack-b-prov");
        let p = plan(&unmapped);
        assert!(p.deletes.is_empty(), "{:?}", p.deletes);
        assert!(p
            .skipped
            .iter()
            .any(|s| s.object == "host record bm-02" && s.reason.contains("record kept")));
    }

    #[test]
    fn conflicts_are_skipped_not_written() {
        let mut inp = fixture();
        // An operator-made host already uses bm-01's name; another holds v2's MAC.
        let mut foreign = plan(&inp).hosts[0].clone();
        foreign.labels.clear();
        let mut mac_owner = plan(&inp).hosts[1].clone();
        mac_owner.name = "hand-made".into();
        mac_owner.labels.clear();
        inp.pxe_hosts = vec![foreign, mac_owner];
        let p = plan(&inp);
        let names: Vec<&str> = p.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["bm-04"], "only the idle host is written");
        assert!(skipped_about(&p, "instance web-1")[0].contains("does not manage"));
        assert!(skipped_about(&p, "instance db 2")[0].contains("belongs to pxemesh host hand-made"));
        assert!(p.deletes.is_empty(), "unmanaged records are never deleted");
    }

    #[test]
    fn vlan_must_match_when_both_are_known() {
        let mut inp = fixture();
        for n in inp.networks.iter_mut() {
            if n.name == "rack-a-guest" {
                n.vlan = Some(5);
            }
        }
        let p = plan(&inp);
        assert!(p.hosts.iter().all(|h| h.name != "bm-01"));
        let why = skipped_about(&p, "instance web-1");
        assert!(why[0].contains("holds 10.1.1.62 on VLAN 1994"), "{why:?}");
        // No VLAN on the pxemesh network: the subnet decides.
        for n in inp.networks.iter_mut() {
            if n.name == "rack-a-guest" {
                n.vlan = None;
            }
        }
        assert!(plan(&inp).hosts.iter().any(|h| h.name == "bm-01"));
    }

    #[test]
    fn addresses_the_state_machine_would_refuse_are_skipped() {
        // The mapped network does not hold the NIC's address.
        let mut inp = fixture();
        inp.mapping
            .networks
            .insert("net-a".into(), "rack-a-other".into());
        let why = skipped_about(&plan(&inp), "instance web-1").join(" ");
        assert!(why.contains("outside network rack-a-other"), "{why}");
        // The NIC's address is the network's gateway.
        let mut inp = fixture();
        inp.vms[0].nic[0].ipaddress = Some("10.1.1.1".into());
        let why = skipped_about(&plan(&inp), "instance web-1").join(" ");
        assert!(why.contains("is the gateway"), "{why}");
        // Another record already has the address on that network.
        let mut inp = fixture();
        let mut other = plan(&inp).hosts[0].clone();
        other.name = "someone".into();
        other.mac = "02:00:00:00:00:99".parse().unwrap();
        other.labels.clear();
        inp.pxe_hosts = vec![other];
        let why = skipped_about(&plan(&inp), "instance web-1").join(" ");
        assert!(why.contains("belongs to pxemesh host someone"), "{why}");
    }

    /// The plan's records go through the coordinator's real state machine
    /// (all validation), read back, and plan again to nothing; a destroyed
    /// instance's delete applies too.
    #[test]
    fn plan_applies_to_the_real_state_machine() {
        use crate::model::Record;
        use crate::state::{Command, State};
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let st = State::new(db.open_tree("pxemesh").unwrap());
        let mut idx = 0u64;
        let mut apply = |cmd: Command| {
            idx += 1;
            st.execute(&cmd, Some((idx, 1)))
                .unwrap()
                .unwrap_or_else(|e| panic!("refused: {e:?}"))
        };
        let inp = fixture();
        let p = plan(&inp);
        apply(Command::Put(
            p.racks.iter().cloned().map(Record::Rack).collect(),
        ));
        apply(Command::Put(
            inp.networks.iter().cloned().map(Record::Network).collect(),
        ));
        let mut batch: Vec<Record> = p.profiles.iter().cloned().map(Record::Profile).collect();
        batch.extend(p.hosts.iter().cloned().map(Record::Host));
        let out = apply(Command::Put(batch));
        assert_eq!(out.results.len(), 1 + 3);

        let read = |kind| st.list(kind).unwrap();
        let mut again = inp.clone();
        again.racks = read(Kind::Rack)
            .into_iter()
            .filter_map(|r| match r {
                Record::Rack(r) => Some(r),
                _ => None,
            })
            .collect();
        again.pxe_hosts = read(Kind::Host)
            .into_iter()
            .filter_map(|r| match r {
                Record::Host(h) => Some(h),
                _ => None,
            })
            .collect();
        again.profiles = read(Kind::Profile)
            .into_iter()
            .filter_map(|r| match r {
                Record::Profile(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(again.pxe_hosts.len(), 3);
        let second = plan(&again);
        assert!(second.is_noop(), "{second:#?}");

        // Expunged instance: the host record loses its reservation (the
        // state machine accepts the transition and frees the address).
        for vm in again.vms.iter_mut() {
            if vm.id == "v1" {
                vm.state = "Expunging".into();
            }
        }
        let third = plan(&again);
        assert!(third.deletes.is_empty());
        assert_eq!(third.hosts.len(), 1);
        apply(Command::Put(
            third.hosts.iter().cloned().map(Record::Host).collect(),
        ));
        let Some(Record::Host(bm1)) = st.get(Kind::Host, "bm-01").unwrap() else {
            panic!("bm-01 gone")
        };
        assert_eq!(bm1.reservation(), None);
        assert_eq!(read(Kind::Host).len(), 3);

        // The host removed from CloudStack: deleted.
        again.hosts.retain(|h| h.id != "h1");
        again.pxe_hosts = vec![bm1];
        let fourth = plan(&again);
        assert_eq!(fourth.deletes.len(), 1);
        for d in &fourth.deletes {
            apply(Command::Delete {
                kind: d.kind,
                name: d.name.clone(),
            });
        }
        assert_eq!(read(Kind::Host).len(), 2);
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("Pod 2/east"), "Pod-2-east");
        assert_eq!(sanitize_name("..x"), "x");
        assert_eq!(sanitize_name(&"a".repeat(300)).len(), 128);
        assert_eq!(prefix_len("255.255.255.0"), Some(24));
        assert_eq!(prefix_len("255.0.255.0"), None);
    }
}
