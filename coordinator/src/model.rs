//! Domain records held in the replicated state machine.
//!
//! These are the coordinator's own types: the gRPC edge converts protobuf
//! messages into them (validating syntax on the way in, see `api::convert`), the
//! Raft log carries them as JSON inside commands, and sled stores them as JSON.
//! JSON keeps stored state readable and lets fields be added with
//! `#[serde(default)]` without a migration.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// Revisions stamped on every record by the state machine; never taken from clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub create_revision: u64,
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Rack,
    Network,
    Host,
    Profile,
    Image,
    Job,
    Relay,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Rack,
        Kind::Network,
        Kind::Host,
        Kind::Profile,
        Kind::Image,
        Kind::Job,
        Kind::Relay,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rack => "rack",
            Kind::Network => "network",
            Kind::Host => "host",
            Kind::Profile => "profile",
            Kind::Image => "image",
            Kind::Job => "job",
            Kind::Relay => "relay",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A MAC address, stored and printed as lower-case `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let err = || format!("malformed MAC address {s:?} (expected aa:bb:cc:dd:ee:ff)");
        let parts: Vec<&str> = if s.contains(':') {
            s.split(':').collect()
        } else if s.contains('-') {
            s.split('-').collect()
        } else {
            return Err(err());
        };
        if parts.len() != 6 {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(err());
            }
            out[i] = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // By hand: `write!` with six `{:02x}` cost ~2,800 instructions, and
        // the relay formats MACs several times per DHCP exchange.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b':'; 17];
        for (i, b) in self.0.iter().enumerate() {
            out[i * 3] = HEX[usize::from(b >> 4)];
            out[i * 3 + 1] = HEX[usize::from(b & 0xf)];
        }
        // Only ASCII hex digits and colons were written.
        f.pad(std::str::from_utf8(&out).unwrap_or_default())
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rack {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub oob_networks: Vec<IpNet>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub rack: String,
    pub subnet: Ipv4Net,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    #[serde(default)]
    pub domain: String,
    pub mtu: u16,
    #[serde(default)]
    pub vlan: Option<u16>,
    #[serde(default)]
    pub pool: Option<(Ipv4Addr, Ipv4Addr)>,
    pub lease_seconds: u32,
    #[serde(default)]
    pub interface: String,
    #[serde(default)]
    pub meta: Meta,
}

/// A BMC password sealed with the cluster key (see `crypto`). Only ciphertext
/// ever reaches the Raft log, sled, or a snapshot.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed(pub String);

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealed(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bmc {
    pub address: String,
    pub port: u16,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: Option<Sealed>,
    pub cipher_suite: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub mac: Mac,
    /// The reservation (address inside `network`). `None` (with an empty
    /// `network`): a known machine without a reservation, e.g. an idle
    /// CloudStack bare metal host. It has a MAC and maybe a BMC (power jobs
    /// work) but relays do not answer it: DHCP treats it as an unknown MAC.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub hostname: String,
    pub rack: String,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub bmc: Option<Bmc>,
    #[serde(default)]
    pub meta: Meta,
}

impl Host {
    /// The reserved address and its network, when the host has a reservation.
    pub fn reservation(&self) -> Option<(Ipv4Addr, &str)> {
        match self.ip {
            Some(ip) if !self.network.is_empty() => Some((ip, self.network.as_str())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    Ipxe,
    Kickstart,
    Pxelinux,
    Localboot,
}

impl FromStr for ProfileKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ipxe" => Ok(ProfileKind::Ipxe),
            "kickstart" => Ok(ProfileKind::Kickstart),
            "pxelinux" => Ok(ProfileKind::Pxelinux),
            "localboot" => Ok(ProfileKind::Localboot),
            other => Err(format!(
                "unknown profile kind {other:?} (expected ipxe, kickstart, pxelinux or localboot)"
            )),
        }
    }
}

impl ProfileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Ipxe => "ipxe",
            ProfileKind::Kickstart => "kickstart",
            ProfileKind::Pxelinux => "pxelinux",
            ProfileKind::Localboot => "localboot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub kind: ProfileKind,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub initrds: Vec<String>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub kickstart_url: String,
    #[serde(default)]
    pub ipxe_script: String,
    #[serde(default)]
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageFile {
    pub path: String,
    pub digest: String,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    pub files: Vec<ImageFile>,
    #[serde(default)]
    pub meta: Meta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Leased,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub host: String,
    pub rack: String,
    pub action: String,
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    pub state: JobState,
    #[serde(default)]
    pub leased_by: String,
    #[serde(default)]
    pub lease_expires_unix_ms: u64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub result: String,
    #[serde(default)]
    pub idempotency_key: String,
    #[serde(default)]
    pub created_unix_ms: u64,
    #[serde(default)]
    pub updated_unix_ms: u64,
    #[serde(default)]
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relay {
    pub name: String,
    pub rack: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub last_seen_unix_ms: u64,
    #[serde(default)]
    pub applied_revision: u64,
    #[serde(default)]
    pub uptime_seconds: u64,
    #[serde(default)]
    pub cache_bytes: u64,
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    #[serde(default)]
    pub meta: Meta,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec", rename_all = "lowercase")]
pub enum Record {
    Rack(Rack),
    Network(Network),
    Host(Host),
    Profile(Profile),
    Image(Image),
    Job(Job),
    Relay(Relay),
}

impl Record {
    pub fn kind(&self) -> Kind {
        match self {
            Record::Rack(_) => Kind::Rack,
            Record::Network(_) => Kind::Network,
            Record::Host(_) => Kind::Host,
            Record::Profile(_) => Kind::Profile,
            Record::Image(_) => Kind::Image,
            Record::Job(_) => Kind::Job,
            Record::Relay(_) => Kind::Relay,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Record::Rack(r) => &r.name,
            Record::Network(r) => &r.name,
            Record::Host(r) => &r.name,
            Record::Profile(r) => &r.name,
            Record::Image(r) => &r.name,
            Record::Job(r) => &r.id,
            Record::Relay(r) => &r.name,
        }
    }

    pub fn meta(&self) -> Meta {
        match self {
            Record::Rack(r) => r.meta,
            Record::Network(r) => r.meta,
            Record::Host(r) => r.meta,
            Record::Profile(r) => r.meta,
            Record::Image(r) => r.meta,
            Record::Job(r) => r.meta,
            Record::Relay(r) => r.meta,
        }
    }

    pub fn meta_mut(&mut self) -> &mut Meta {
        match self {
            Record::Rack(r) => &mut r.meta,
            Record::Network(r) => &mut r.meta,
            Record::Host(r) => &mut r.meta,
            Record::Profile(r) => &mut r.meta,
            Record::Image(r) => &mut r.meta,
            Record::Job(r) => &mut r.meta,
            Record::Relay(r) => &mut r.meta,
        }
    }

    /// The rack a record belongs to, for rack-scoped listing and relay watches.
    pub fn rack(&self) -> Option<&str> {
        match self {
            Record::Rack(r) => Some(&r.name),
            Record::Network(r) => Some(&r.rack),
            Record::Host(r) => Some(&r.rack),
            Record::Job(r) => Some(&r.rack),
            Record::Relay(r) => Some(&r.rack),
            Record::Profile(_) | Record::Image(_) => None,
        }
    }

    /// Equality ignoring revisions: decides "unchanged" for idempotent writes.
    pub fn same_content(&self, other: &Record) -> bool {
        let mut a = self.clone();
        let mut b = other.clone();
        *a.meta_mut() = Meta::default();
        *b.meta_mut() = Meta::default();
        a == b
    }
}

/// Names are used in keys, certificate SANs and file names: keep them boring.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} name must not be empty"));
    }
    if name.len() > 128 {
        return Err(format!(
            "{what} name {name:?} is longer than 128 characters"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || name.starts_with('.')
    {
        return Err(format!(
            "{what} name {name:?} may contain only letters, digits, '-', '_' and '.', and must not start with '.'"
        ));
    }
    Ok(())
}

pub const DEFAULT_MTU: u16 = 1500;
pub const DEFAULT_LEASE_SECONDS: u32 = 3600;
pub const DEFAULT_BMC_PORT: u16 = 623;
pub const DEFAULT_CIPHER_SUITE: u8 = 17;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_display_is_lowercase_colon_hex_and_round_trips() {
        let m = Mac([0x00, 0x1b, 0xAC, 0xff, 0x09, 0xf0]);
        assert_eq!(m.to_string(), "00:1b:ac:ff:09:f0");
        assert_eq!(format!("{m:>19}"), "  00:1b:ac:ff:09:f0");
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"00:1b:ac:ff:09:f0\"");
    }

    #[test]
    fn mac_parse_and_print() {
        let m: Mac = "AA:bb:0C:dd:ee:0F".parse().unwrap();
        assert_eq!(m.to_string(), "aa:bb:0c:dd:ee:0f");
        let m2: Mac = "aa-bb-0c-dd-ee-0f".parse().unwrap();
        assert_eq!(m, m2);
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:gg",
            "aabbccddeeff",
            "a:bb:cc:dd:ee:ff0",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("host", "node-01.rack_a").is_ok());
        assert!(validate_name("host", "").is_err());
        assert!(validate_name("host", "a/b").is_err());
        assert!(validate_name("host", ".hidden").is_err());
        assert!(validate_name("host", &"x".repeat(129)).is_err());
    }

    #[test]
    fn same_content_ignores_revisions() {
        let a = Record::Rack(Rack {
            name: "r1".into(),
            meta: Meta {
                create_revision: 1,
                revision: 2,
            },
            ..Default::default()
        });
        let mut b = a.clone();
        *b.meta_mut() = Meta {
            create_revision: 5,
            revision: 9,
        };
        assert!(a.same_content(&b));
    }
}

#[cfg(test)]
mod serde_tests {
    use super::*;

    #[test]
    fn every_record_kind_round_trips_through_json() {
        let p = Record::Profile(Profile {
            name: "p".into(),
            description: String::new(),
            kind: ProfileKind::Kickstart,
            image: String::new(),
            kernel: "vmlinuz".into(),
            initrds: vec![],
            cmdline: String::new(),
            kickstart_url: String::new(),
            ipxe_script: String::new(),
            meta: Meta::default(),
        });
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn host_json_before_optional_reservations_still_reads() {
        // As stored before `ip` became optional.
        let old = r#"{"kind":"host","spec":{"name":"h1","mac":"52:54:00:00:00:01","ip":"10.0.0.5",
            "rack":"r1","network":"n1","meta":{"create_revision":3,"revision":4}}}"#;
        let Record::Host(h) = serde_json::from_str::<Record>(old).unwrap() else {
            panic!("not a host")
        };
        assert_eq!(h.reservation(), Some(("10.0.0.5".parse().unwrap(), "n1")));
        assert_eq!(h.meta.revision, 4);
        // A host without a reservation round-trips and has none.
        let idle = Host {
            ip: None,
            network: String::new(),
            ..h
        };
        let text = serde_json::to_string(&Record::Host(idle.clone())).unwrap();
        let Record::Host(back) = serde_json::from_str::<Record>(&text).unwrap() else {
            panic!("not a host")
        };
        assert_eq!(back, idle);
        assert_eq!(back.reservation(), None);
        let no_fields =
            r#"{"kind":"host","spec":{"name":"h2","mac":"52:54:00:00:00:02","rack":"r1"}}"#;
        let Record::Host(h2) = serde_json::from_str::<Record>(no_fields).unwrap() else {
            panic!("not a host")
        };
        assert_eq!(h2.reservation(), None);
    }
}
