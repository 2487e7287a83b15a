//! Protobuf <-> domain conversion. Syntax is validated here, at the edge, so
//! malformed input never reaches the Raft log; referential checks (unknown rack,
//! duplicate MAC) happen deterministically in the state machine.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use pxemesh_proto::v1 as pb;

use crate::error::CoordError;
use crate::model::*;

type R<T> = Result<T, CoordError>;

fn bad(msg: impl Into<String>) -> CoordError {
    CoordError::invalid(msg)
}

pub fn kind_from_proto(k: i32) -> R<Kind> {
    Ok(
        match pb::Kind::try_from(k).unwrap_or(pb::Kind::Unspecified) {
            pb::Kind::Rack => Kind::Rack,
            pb::Kind::Network => Kind::Network,
            pb::Kind::Host => Kind::Host,
            pb::Kind::Profile => Kind::Profile,
            pb::Kind::Image => Kind::Image,
            pb::Kind::Job => Kind::Job,
            pb::Kind::Relay => Kind::Relay,
            pb::Kind::Unspecified => {
                return Err(bad(
                    "kind must be set (rack, network, host, profile, image, job or relay)",
                ))
            }
        },
    )
}

pub fn kind_to_proto(k: Kind) -> pb::Kind {
    match k {
        Kind::Rack => pb::Kind::Rack,
        Kind::Network => pb::Kind::Network,
        Kind::Host => pb::Kind::Host,
        Kind::Profile => pb::Kind::Profile,
        Kind::Image => pb::Kind::Image,
        Kind::Job => pb::Kind::Job,
        Kind::Relay => pb::Kind::Relay,
    }
}

fn ipv4(field: &str, s: &str) -> R<Ipv4Addr> {
    s.trim()
        .parse()
        .map_err(|_| bad(format!("{field}: malformed IPv4 address {s:?}")))
}

fn opt_ipv4(field: &str, s: &str) -> R<Option<Ipv4Addr>> {
    if s.trim().is_empty() {
        Ok(None)
    } else {
        ipv4(field, s).map(Some)
    }
}

fn name(what: &str, n: &str) -> R<()> {
    validate_name(what, n).map_err(bad)
}

fn labels(
    what: &str,
    l: &std::collections::HashMap<String, String>,
) -> R<std::collections::BTreeMap<String, String>> {
    for (k, v) in l {
        if k.is_empty() || k.len() > 63 || v.len() > 253 {
            return Err(bad(format!(
                "{what}: label {k:?} has an empty/too long key or too long value"
            )));
        }
    }
    Ok(l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

pub fn rack_from_proto(r: &pb::Rack) -> R<Rack> {
    name("rack", &r.name)?;
    let oob = r
        .oob_networks
        .iter()
        .map(|c| {
            c.parse::<IpNet>().map_err(|_| {
                bad(format!(
                    "rack {}: oob_networks: malformed CIDR {c:?}",
                    r.name
                ))
            })
        })
        .collect::<R<Vec<_>>>()?;
    Ok(Rack {
        name: r.name.clone(),
        description: r.description.clone(),
        oob_networks: oob,
        labels: labels(&format!("rack {}", r.name), &r.labels)?,
        meta: Meta::default(),
    })
}

pub fn network_from_proto(n: &pb::Network) -> R<Network> {
    name("network", &n.name)?;
    let ctx = format!("network {}", n.name);
    if n.rack.is_empty() {
        return Err(bad(format!("{ctx}: rack must be set")));
    }
    let subnet: Ipv4Net = n
        .subnet
        .parse()
        .map_err(|_| bad(format!("{ctx}: subnet: malformed IPv4 CIDR {:?}", n.subnet)))?;
    let subnet = subnet.trunc();
    let gateway = opt_ipv4(&format!("{ctx}: gateway"), &n.gateway)?;
    if let Some(g) = gateway {
        if !subnet.contains(&g) {
            return Err(bad(format!(
                "{ctx}: gateway {g} is outside subnet {subnet}"
            )));
        }
    }
    let dns = n
        .dns
        .iter()
        .map(|d| {
            d.parse::<IpAddr>()
                .map_err(|_| bad(format!("{ctx}: dns: malformed IP address {d:?}")))
        })
        .collect::<R<Vec<_>>>()?;
    let mtu = match n.mtu {
        0 => DEFAULT_MTU,
        m @ 576..=9216 => m as u16,
        m => return Err(bad(format!("{ctx}: MTU {m} is outside 576-9216"))),
    };
    let vlan = match n.vlan {
        0 => None,
        v @ 1..=4094 => Some(v as u16),
        v => return Err(bad(format!("{ctx}: VLAN {v} is outside 1-4094"))),
    };
    let pool = match (n.pool_start.trim().is_empty(), n.pool_end.trim().is_empty()) {
        (true, true) => None,
        (false, false) => {
            let s = ipv4(&format!("{ctx}: pool_start"), &n.pool_start)?;
            let e = ipv4(&format!("{ctx}: pool_end"), &n.pool_end)?;
            if !subnet.contains(&s) || !subnet.contains(&e) {
                return Err(bad(format!(
                    "{ctx}: pool {s}-{e} is not inside subnet {subnet}"
                )));
            }
            if u32::from(s) > u32::from(e) {
                return Err(bad(format!("{ctx}: pool start {s} is after pool end {e}")));
            }
            Some((s, e))
        }
        _ => {
            return Err(bad(format!(
                "{ctx}: pool needs both pool_start and pool_end"
            )))
        }
    };
    if !n.domain.is_empty()
        && !n
            .domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(bad(format!("{ctx}: malformed domain {:?}", n.domain)));
    }
    Ok(Network {
        name: n.name.clone(),
        rack: n.rack.clone(),
        subnet,
        gateway,
        dns,
        domain: n.domain.clone(),
        mtu,
        vlan,
        pool,
        lease_seconds: if n.lease_seconds == 0 {
            DEFAULT_LEASE_SECONDS
        } else {
            n.lease_seconds
        },
        interface: n.interface.clone(),
        meta: Meta::default(),
    })
}

/// A host and, separately, the plaintext BMC password if the request carried
/// one; the caller seals it with the cluster key.
pub fn host_from_proto(h: &pb::Host) -> R<(Host, Option<String>)> {
    name("host", &h.name)?;
    let ctx = format!("host {}", h.name);
    let mac: Mac = h
        .mac
        .parse()
        .map_err(|e: String| bad(format!("{ctx}: {e}")))?;
    if h.rack.is_empty() {
        return Err(bad(format!("{ctx}: rack must be set")));
    }
    // Empty ip and network: a host without a reservation (relays do not
    // answer it; power jobs work when it has a BMC).
    let ip = match (h.ip.is_empty(), h.network.is_empty()) {
        (true, true) => None,
        (false, false) => Some(ipv4(&format!("{ctx}: ip"), &h.ip)?),
        _ => {
            return Err(bad(format!(
                "{ctx}: ip and network are set together (both, or neither for a host without a reservation)"
            )))
        }
    };
    if ip.is_none() && !h.profile.is_empty() {
        return Err(bad(format!(
            "{ctx}: a boot profile needs a reservation (ip and network)"
        )));
    }
    if !h.hostname.is_empty()
        && (h.hostname.len() > 253
            || !h
                .hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(bad(format!("{ctx}: malformed hostname {:?}", h.hostname)));
    }
    let mut password = None;
    let bmc = match &h.bmc {
        Some(b) if !b.address.is_empty() => {
            let port = match b.port {
                0 => DEFAULT_BMC_PORT,
                p @ 1..=65535 => p as u16,
                p => return Err(bad(format!("{ctx}: BMC port {p} is out of range"))),
            };
            let cipher_suite = match b.cipher_suite {
                0 => DEFAULT_CIPHER_SUITE,
                c @ (3 | 17) => c as u8,
                c => {
                    return Err(bad(format!(
                        "{ctx}: IPMI cipher suite {c} is not supported (use 3 or 17)"
                    )))
                }
            };
            if !b.password.is_empty() {
                password = Some(b.password.clone());
            }
            Some(Bmc {
                address: b.address.clone(),
                port,
                username: b.username.clone(),
                password: None,
                cipher_suite,
            })
        }
        Some(b) if !b.password.is_empty() || !b.username.is_empty() => {
            return Err(bad(format!(
                "{ctx}: BMC credentials given without a BMC address"
            )));
        }
        _ => None,
    };
    Ok((
        Host {
            name: h.name.clone(),
            mac,
            ip,
            hostname: h.hostname.clone(),
            rack: h.rack.clone(),
            network: h.network.clone(),
            profile: (!h.profile.is_empty()).then(|| h.profile.clone()),
            labels: labels(&ctx, &h.labels)?,
            bmc,
            meta: Meta::default(),
        },
        password,
    ))
}

pub fn profile_from_proto(p: &pb::BootProfile) -> R<Profile> {
    name("profile", &p.name)?;
    let kind: ProfileKind = p
        .kind
        .parse()
        .map_err(|e: String| bad(format!("profile {}: {e}", p.name)))?;
    Ok(Profile {
        name: p.name.clone(),
        description: p.description.clone(),
        kind,
        image: p.image.clone(),
        kernel: p.kernel.clone(),
        initrds: p.initrds.clone(),
        cmdline: p.cmdline.clone(),
        kickstart_url: p.kickstart_url.clone(),
        ipxe_script: p.ipxe_script.clone(),
        meta: Meta::default(),
    })
}

pub fn image_from_proto(i: &pb::ImageManifest) -> R<Image> {
    name("image", &i.name)?;
    let mut files = Vec::with_capacity(i.files.len());
    for f in &i.files {
        let ok_digest = f.digest.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        });
        if !ok_digest {
            return Err(bad(format!(
                "image {}: file {:?}: digest must be sha256:<64 lower-case hex>",
                i.name, f.path
            )));
        }
        if f.path.is_empty()
            || f.path.starts_with('/')
            || f.path.split('/').any(|s| s == ".." || s.is_empty())
        {
            return Err(bad(format!(
                "image {}: file path {:?} must be relative without '..'",
                i.name, f.path
            )));
        }
        files.push(ImageFile {
            path: f.path.clone(),
            digest: f.digest.clone(),
            size: f.size,
            mode: f.mode,
        });
    }
    Ok(Image {
        name: i.name.clone(),
        files,
        meta: Meta::default(),
    })
}

fn meta_out(m: Meta) -> (u64, u64) {
    (m.create_revision, m.revision)
}

pub fn record_to_proto(rec: &Record) -> pb::Object {
    use pb::object::Record as O;
    let r = match rec {
        Record::Rack(r) => {
            let (create_revision, revision) = meta_out(r.meta);
            O::Rack(pb::Rack {
                name: r.name.clone(),
                description: r.description.clone(),
                oob_networks: r.oob_networks.iter().map(|n| n.to_string()).collect(),
                labels: r.labels.clone().into_iter().collect(),
                create_revision,
                revision,
            })
        }
        Record::Network(n) => {
            let (create_revision, revision) = meta_out(n.meta);
            O::Network(pb::Network {
                name: n.name.clone(),
                rack: n.rack.clone(),
                subnet: n.subnet.to_string(),
                gateway: n.gateway.map(|g| g.to_string()).unwrap_or_default(),
                dns: n.dns.iter().map(|d| d.to_string()).collect(),
                domain: n.domain.clone(),
                mtu: u32::from(n.mtu),
                vlan: n.vlan.map(u32::from).unwrap_or(0),
                pool_start: n.pool.map(|p| p.0.to_string()).unwrap_or_default(),
                pool_end: n.pool.map(|p| p.1.to_string()).unwrap_or_default(),
                lease_seconds: n.lease_seconds,
                interface: n.interface.clone(),
                create_revision,
                revision,
            })
        }
        Record::Host(h) => {
            let (create_revision, revision) = meta_out(h.meta);
            O::Host(pb::Host {
                name: h.name.clone(),
                mac: h.mac.to_string(),
                ip: h.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                hostname: h.hostname.clone(),
                rack: h.rack.clone(),
                network: h.network.clone(),
                profile: h.profile.clone().unwrap_or_default(),
                labels: h.labels.clone().into_iter().collect(),
                // The password never leaves the coordinators through this path.
                bmc: h.bmc.as_ref().map(|b| pb::Bmc {
                    address: b.address.clone(),
                    port: u32::from(b.port),
                    username: b.username.clone(),
                    password: String::new(),
                    password_set: b.password.is_some(),
                    cipher_suite: u32::from(b.cipher_suite),
                }),
                create_revision,
                revision,
            })
        }
        Record::Profile(p) => {
            let (create_revision, revision) = meta_out(p.meta);
            O::Profile(pb::BootProfile {
                name: p.name.clone(),
                description: p.description.clone(),
                kind: p.kind.as_str().to_string(),
                image: p.image.clone(),
                kernel: p.kernel.clone(),
                initrds: p.initrds.clone(),
                cmdline: p.cmdline.clone(),
                kickstart_url: p.kickstart_url.clone(),
                ipxe_script: p.ipxe_script.clone(),
                create_revision,
                revision,
            })
        }
        Record::Image(i) => {
            let (create_revision, revision) = meta_out(i.meta);
            O::Image(pb::ImageManifest {
                name: i.name.clone(),
                files: i
                    .files
                    .iter()
                    .map(|f| pb::ImageFile {
                        path: f.path.clone(),
                        digest: f.digest.clone(),
                        size: f.size,
                        mode: f.mode,
                    })
                    .collect(),
                create_revision,
                revision,
            })
        }
        Record::Job(j) => {
            let (create_revision, revision) = meta_out(j.meta);
            O::Job(pb::Job {
                id: j.id.clone(),
                host: j.host.clone(),
                rack: j.rack.clone(),
                action: j.action.clone(),
                args: j.args.clone().into_iter().collect(),
                state: job_state_to_proto(j.state) as i32,
                leased_by: j.leased_by.clone(),
                lease_expires_unix_ms: j.lease_expires_unix_ms,
                attempts: j.attempts,
                reason: j.reason.clone(),
                result: j.result.clone(),
                idempotency_key: j.idempotency_key.clone(),
                created_unix_ms: j.created_unix_ms,
                updated_unix_ms: j.updated_unix_ms,
                create_revision,
                revision,
            })
        }
        Record::Relay(r) => {
            let (create_revision, revision) = meta_out(r.meta);
            O::Relay(pb::RelayRecord {
                name: r.name.clone(),
                rack: r.rack.clone(),
                version: r.version.clone(),
                last_seen_unix_ms: r.last_seen_unix_ms,
                applied_revision: r.applied_revision,
                uptime_seconds: r.uptime_seconds,
                cache_bytes: r.cache_bytes,
                counters: r.counters.clone().into_iter().collect(),
                create_revision,
                revision,
            })
        }
    };
    pb::Object { record: Some(r) }
}

fn job_state_to_proto(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Leased => pb::JobState::Leased,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn outcome_to_proto(o: crate::state::Outcome) -> pb::Outcome {
    use crate::state::Outcome;
    match o {
        Outcome::Created => pb::Outcome::Created,
        Outcome::Updated => pb::Outcome::Updated,
        Outcome::Unchanged => pb::Outcome::Unchanged,
        Outcome::Deleted => pb::Outcome::Deleted,
        Outcome::NotFound => pb::Outcome::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> pb::Network {
        pb::Network {
            name: "n1".into(),
            rack: "r1".into(),
            subnet: "10.1.0.0/24".into(),
            ..Default::default()
        }
    }

    #[test]
    fn network_validation() {
        assert!(network_from_proto(&net()).is_ok());
        type Mutate = Box<dyn Fn(&mut pb::Network)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (Box::new(|n| n.vlan = 4095), "VLAN 4095 is outside 1-4094"),
            (Box::new(|n| n.mtu = 575), "MTU 575 is outside 576-9216"),
            (Box::new(|n| n.mtu = 9217), "MTU 9217"),
            (
                Box::new(|n| n.subnet = "10.1.0.0/33".into()),
                "malformed IPv4 CIDR",
            ),
            (
                Box::new(|n| n.gateway = "10.2.0.1".into()),
                "outside subnet",
            ),
            (
                Box::new(|n| n.gateway = "10.1.0.300".into()),
                "malformed IPv4 address",
            ),
            (
                Box::new(|n| {
                    n.pool_start = "10.1.0.50".into();
                    n.pool_end = "10.1.0.40".into()
                }),
                "after pool end",
            ),
            (
                Box::new(|n| n.pool_start = "10.1.0.50".into()),
                "needs both",
            ),
        ];
        for (mutate, want) in cases {
            let mut n = net();
            mutate(&mut n);
            let err = network_from_proto(&n).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        let mut n = net();
        n.vlan = 4094;
        n.mtu = 9000;
        let got = network_from_proto(&n).unwrap();
        assert_eq!((got.vlan, got.mtu), (Some(4094), 9000));
    }

    #[test]
    fn host_validation_and_password_is_never_returned() {
        let mut h = pb::Host {
            name: "h1".into(),
            mac: "52:54:00:aa:bb:cc".into(),
            ip: "10.1.0.5".into(),
            rack: "r1".into(),
            network: "n1".into(),
            bmc: Some(pb::Bmc {
                address: "10.9.0.5".into(),
                username: "admin".into(),
                password: "secret".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (host, pw) = host_from_proto(&h).unwrap();
        assert_eq!(pw.as_deref(), Some("secret"));
        let b = host.bmc.as_ref().unwrap();
        assert_eq!((b.port, b.cipher_suite), (623, 17));
        let mut stored = host.clone();
        stored.bmc.as_mut().unwrap().password = Some(Sealed("xc20p1:zzz".into()));
        let out = record_to_proto(&Record::Host(stored));
        let Some(pb::object::Record::Host(out)) = out.record else {
            panic!()
        };
        let ob = out.bmc.unwrap();
        assert!(ob.password.is_empty() && ob.password_set);

        h.mac = "52:54:00:aa:bb".into();
        assert!(host_from_proto(&h)
            .unwrap_err()
            .to_string()
            .contains("malformed MAC"));
        h.mac = "52:54:00:aa:bb:cc".into();
        h.ip = "10.1.0".into();
        assert!(host_from_proto(&h)
            .unwrap_err()
            .to_string()
            .contains("malformed IPv4"));
        h.ip = "10.1.0.5".into();
        h.bmc.as_mut().unwrap().cipher_suite = 1;
        assert!(host_from_proto(&h)
            .unwrap_err()
            .to_string()
            .contains("cipher suite 1"));
        h.bmc.as_mut().unwrap().cipher_suite = 17;

        // No reservation: ip and network both empty.
        let mut idle = h.clone();
        idle.ip.clear();
        idle.network.clear();
        let (got, _) = host_from_proto(&idle).unwrap();
        assert_eq!((got.ip, got.network.as_str()), (None, ""));
        assert!(got.bmc.is_some());
        let Some(pb::object::Record::Host(out)) = record_to_proto(&Record::Host(got)).record else {
            panic!()
        };
        assert_eq!((out.ip.as_str(), out.network.as_str()), ("", ""));
        idle.network = "n1".into();
        assert!(host_from_proto(&idle)
            .unwrap_err()
            .to_string()
            .contains("set together"));
        idle.network.clear();
        idle.profile = "p".into();
        assert!(host_from_proto(&idle)
            .unwrap_err()
            .to_string()
            .contains("needs a reservation"));
    }

    #[test]
    fn image_digest_validation() {
        let f = |d: &str, p: &str| pb::ImageManifest {
            name: "img".into(),
            files: vec![pb::ImageFile {
                path: p.into(),
                digest: d.into(),
                size: 1,
                mode: 0o644,
            }],
            ..Default::default()
        };
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(image_from_proto(&f(&good, "vmlinuz")).is_ok());
        assert!(image_from_proto(&f("sha256:abc", "vmlinuz")).is_err());
        assert!(image_from_proto(&f(&good, "../etc/passwd")).is_err());
        assert!(image_from_proto(&f(&good, "/abs")).is_err());
    }
}
