//! Relay configuration: a TOML file, then command-line overrides.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use pxemesh_coordinator::model::Network;
use serde::Deserialize;

use crate::error::RelayError;

/// A provisioning interface of the relay and its address on it. DHCP listens
/// per interface (broadcasts are told apart by arrival interface) and the
/// address is what clients on that network use for TFTP and HTTP.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    pub address: Ipv4Addr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    pub enabled: bool,
    /// Server port (67; tests may use a high port).
    pub port: u16,
    /// Port of clients (68).
    pub client_port: u16,
    /// Port of relay agents that replies to relayed requests go to (67).
    pub relay_agent_port: u16,
    /// How long a pool address offered but not yet requested stays reserved.
    pub offer_hold_seconds: u32,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            enabled: true,
            port: 67,
            client_port: 68,
            relay_agent_port: 67,
            offer_hold_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Retransmission timeout when the client negotiates none.
    pub timeout_ms: u64,
    /// Retransmissions of one window before a transfer is abandoned.
    pub retries: u32,
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Concurrent transfers in total; more RRQs get an ERROR, not a queue.
    pub max_transfers: usize,
}

impl Default for TftpConfig {
    fn default() -> Self {
        TftpConfig {
            enabled: true,
            listen: "0.0.0.0:69".parse().expect("static address"),
            timeout_ms: 1000,
            retries: 5,
            max_blksize: 1468,
            max_windowsize: 64,
            max_transfers: 2048,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Port clients use in URLs (defaults to the listen port; differs behind a NAT or proxy).
    pub advertise_port: Option<u16>,
    /// Who may report `GET /baremetal/provisiondone/<mac>` for a host.
    pub provision_done_from: ProvisionDoneFrom,
}

/// With the CloudStack bridge a provision-done moves an instance to Running,
/// so production relays should take it only from the host itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisionDoneFrom {
    /// Any client (load tests that send every host's callback from one
    /// address; the default, for compatibility).
    Any,
    /// Only the host's own reserved address; others get 403 and are counted
    /// (`dropped_total{protocol="http",reason="provision_done_not_from_host"}`).
    Host,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: "0.0.0.0:80".parse().expect("static address"),
            advertise_port: None,
            provision_done_from: ProvisionDoneFrom::Any,
        }
    }
}

/// Boot loaders handed out by architecture; files live in `dir`, which is
/// also the TFTP root and what HTTP serves under `/files/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    pub dir: PathBuf,
    pub bios: String,
    pub uefi_x64: String,
    pub uefi_arm64: String,
    /// Chainload our boot loader even into clients whose NIC ROM already runs
    /// iPXE (e.g. QEMU's ROMs, or to get a known iPXE build everywhere). The
    /// loader's own DHCP request then gets the per-host script.
    pub chainload_ipxe: bool,
}

impl Default for BootConfig {
    fn default() -> Self {
        BootConfig {
            dir: PathBuf::from("/var/lib/pxemesh/relay/boot"),
            bios: "undionly.kpxe".into(),
            uefi_x64: "ipxe.efi".into(),
            uefi_arm64: "ipxe-arm64.efi".into(),
            chainload_ipxe: false,
        }
    }
}

/// Sync mode: the coordinators to watch the rack from, and this relay's
/// mTLS identity (`spiffe://<td>/relay/<rack>/<name>`; the certificate, not
/// this file, decides the rack).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorsConfig {
    /// `host:port` (or `https://host:port`) of each coordinator; tried in
    /// order, round-robin on failure.
    pub endpoints: Vec<String>,
    /// CA bundle, relay certificate and its private key (PEM).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Heartbeat period; a coordinator may ask for another one.
    #[serde(default = "default_heartbeat_seconds")]
    pub heartbeat_seconds: u64,
}

fn default_heartbeat_seconds() -> u64 {
    5
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// This relay's name; in sync mode it must match the certificate's.
    pub name: String,
    pub data_dir: PathBuf,
    /// Static mode: serve the rack described in this TOML/JSON file.
    #[serde(default)]
    pub static_state: Option<PathBuf>,
    /// Sync mode: follow the rack's state from the coordinators (exactly one
    /// of `static_state` and `[coordinators]` is set).
    #[serde(default)]
    pub coordinators: Option<CoordinatorsConfig>,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// `/metrics` has no authentication: a `metrics_listen` outside
    /// loopback is refused unless this is set.
    #[serde(default)]
    pub metrics_allow_remote: bool,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Address put in URLs for networks the relay reaches only through DHCP
    /// relay agents (no interface of its own in them).
    #[serde(default)]
    pub advertise_address: Option<Ipv4Addr>,
    #[serde(default)]
    pub dhcp: DhcpConfig,
    #[serde(default)]
    pub tftp: TftpConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub boot: BootConfig,
    /// Power jobs (sync mode).
    #[serde(default)]
    pub ipmi: crate::ipmi::IpmiConfig,
    /// Image cache (sync mode).
    #[serde(default)]
    pub cache: crate::cache::CacheConfig,
    /// Flood control (DHCP rate limits, transfer caps).
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
}

impl RelayConfig {
    pub fn from_toml(text: &str) -> Result<RelayConfig, RelayError> {
        toml::from_str(text).map_err(|e| RelayError::Config(e.to_string()))
    }

    pub fn from_file(path: &std::path::Path) -> Result<RelayConfig, RelayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RelayError::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| RelayError::Config(format!("{}: {e}", path.display())))
    }

    pub fn validate(&self) -> Result<(), RelayError> {
        let bad = |m: String| Err(RelayError::Config(m));
        match (&self.static_state, &self.coordinators) {
            (Some(_), Some(_)) => {
                return bad("set either static_state (static mode: serve a rack file) or [coordinators] (sync mode), not both".into());
            }
            (None, None) => {
                return bad("set static_state (static mode: the rack file to serve) or a [coordinators] section (sync mode: endpoints, ca, cert, key)".into());
            }
            (None, Some(c)) => {
                if c.endpoints.is_empty() {
                    return bad(
                        "[coordinators] endpoints must list at least one coordinator (host:port)"
                            .into(),
                    );
                }
                if let Some(e) = c.endpoints.iter().find(|e| {
                    let e = e.trim();
                    e.is_empty() || !e.contains(':') || e.contains(char::is_whitespace)
                }) {
                    return bad(format!("[coordinators] endpoint {e:?} is not host:port"));
                }
                if !(1..=3600).contains(&c.heartbeat_seconds) {
                    return bad("[coordinators] heartbeat_seconds must be 1-3600".into());
                }
            }
            (Some(_), None) => {}
        }
        if self.dhcp.enabled && self.interfaces.is_empty() {
            return bad("DHCP needs at least one [[interfaces]] entry".into());
        }
        let t = &self.tftp;
        if !(512..=65464).contains(&t.max_blksize)
            || t.max_windowsize == 0
            || t.retries == 0
            || t.timeout_ms == 0
        {
            return bad("tftp: need max_blksize 512-65464, max_windowsize >= 1, retries >= 1, timeout_ms >= 1".into());
        }
        if let Some(m) = self.metrics_listen {
            if !m.ip().is_loopback() && !self.metrics_allow_remote {
                return bad(format!("metrics_listen {m} is not a loopback address: /metrics has no authentication; bind it to 127.0.0.1 (and scrape through a proxy or tunnel) or set metrics_allow_remote = true"));
            }
        }
        self.limits.validate().map_err(RelayError::Config)?;
        Ok(())
    }

    /// The relay's address as seen from `network`: its interface inside the
    /// subnet, else the advertised address for relayed networks.
    pub fn address_for(&self, network: &Network) -> Option<Ipv4Addr> {
        self.interfaces
            .iter()
            .find(|i| network.subnet.contains(&i.address))
            .map(|i| i.address)
            .or(self.advertise_address)
    }

    pub fn http_port(&self) -> u16 {
        self.http.advertise_port.unwrap_or(self.http.listen.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_examples_are_valid() {
        let c = RelayConfig::from_toml(include_str!("../../deploy/relay.example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.interfaces.len(), 2);
        let rack = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rack.example.toml");
        let s = crate::state::RackState::from_static_file(std::path::Path::new(rack)).unwrap();
        let net = s.network("r12-prov").unwrap();
        assert_eq!(c.address_for(net), Some("10.20.0.2".parse().unwrap()));
        assert_eq!(s.hosts().len(), 1);
    }

    /// The example's commented `[coordinators]` block, switched on instead of
    /// `static_state`, is a valid sync-mode configuration.
    #[test]
    fn shipped_example_in_sync_mode_is_valid() {
        let text = include_str!("../../deploy/relay.example.toml");
        let mut out = String::new();
        let mut in_block = false;
        for line in text.lines() {
            if line.starts_with("static_state") {
                continue;
            }
            if line == "# [coordinators]" {
                in_block = true;
            } else if !line.starts_with("# ") {
                in_block = false;
            }
            if in_block {
                out.push_str(&line[2..]);
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        let c = RelayConfig::from_toml(&out).unwrap();
        c.validate().unwrap();
        let co = c.coordinators.unwrap();
        assert_eq!(co.endpoints.len(), 3);
        assert_eq!(co.heartbeat_seconds, 5);
        assert!(c.static_state.is_none());
    }

    #[test]
    fn exactly_one_source_of_state() {
        let head = "name = \"r\"\ndata_dir = \"/tmp/x\"\n";
        let iface = "[[interfaces]]\nname=\"lo\"\naddress=\"127.0.0.1\"\n";
        let coord = "[coordinators]\nendpoints = [\"127.0.0.1:7000\"]\nca = \"/c\"\ncert = \"/r.pem\"\nkey = \"/r-key.pem\"\n";
        let err = |t: &str| {
            RelayConfig::from_toml(t)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(err(&format!("{head}{iface}")).contains("set static_state"));
        let both = format!("{head}static_state = \"/tmp/r.toml\"\n{iface}{coord}");
        assert!(err(&both).contains("not both"), "{}", err(&both));
        let sync = RelayConfig::from_toml(&format!("{head}{iface}{coord}")).unwrap();
        sync.validate().unwrap();
        assert_eq!(sync.coordinators.as_ref().unwrap().heartbeat_seconds, 5);
        let none = format!("{head}{iface}{}", coord.replace("\"127.0.0.1:7000\"", ""));
        assert!(err(&none).contains("at least one"));
        let bad_ep = format!("{head}{iface}{}", coord.replace("127.0.0.1:7000", "coord"));
        assert!(err(&bad_ep).contains("not host:port"));
        let hb = format!("{head}{iface}{coord}heartbeat_seconds = 0\n");
        assert!(err(&hb).contains("heartbeat_seconds"));
        let typo = format!("{head}{iface}{coord}endpoint = []\n");
        assert!(RelayConfig::from_toml(&typo)
            .unwrap_err()
            .to_string()
            .contains("unknown field"));
    }

    #[test]
    fn remote_metrics_need_an_explicit_allow() {
        let base = "name = \"r\"\ndata_dir = \"/tmp/x\"\nstatic_state = \"/tmp/r.toml\"\n";
        let iface = "[[interfaces]]\nname=\"lo\"\naddress=\"127.0.0.1\"\n";
        let with = |extra: &str| {
            RelayConfig::from_toml(&format!("{base}{extra}{iface}"))
                .unwrap()
                .validate()
        };
        with("metrics_listen = \"127.0.0.1:9200\"\n").unwrap();
        with("metrics_listen = \"[::1]:9200\"\n").unwrap();
        for addr in ["0.0.0.0:9200", "10.20.0.2:9200", "[::]:9200"] {
            let err = with(&format!("metrics_listen = \"{addr}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("metrics_allow_remote"), "{addr}: {err}");
            with(&format!(
                "metrics_listen = \"{addr}\"\nmetrics_allow_remote = true\n"
            ))
            .unwrap();
        }
        let err = RelayConfig::from_toml(&format!(
            "{base}{iface}[limits]\ndhcp_mac_per_second = -1.0\n"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("[limits]"), "{err}");
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let base = "name = \"r\"\ndata_dir = \"/tmp/x\"\nstatic_state = \"/tmp/r.toml\"\n";
        let no_iface = RelayConfig::from_toml(base).unwrap();
        assert!(no_iface
            .validate()
            .unwrap_err()
            .to_string()
            .contains("[[interfaces]]"));
        let err = RelayConfig::from_toml(&format!("{base}bogus = 1\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let c = RelayConfig::from_toml(&format!(
            "{base}[[interfaces]]\nname=\"lo\"\naddress=\"127.0.0.1\"\n[tftp]\nmax_blksize = 100\n"
        ))
        .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_blksize"));
    }
}
