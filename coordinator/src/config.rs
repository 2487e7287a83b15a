//! Coordinator configuration: a TOML file, then command-line overrides.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::CoordError;
use crate::node::RaftSettings;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Seconds between checks of the certificate files for rotation (SIGHUP also reloads).
    #[serde(default = "default_reload_secs")]
    pub reload_check_seconds: u64,
}

fn default_reload_secs() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_entries: u64,
    pub catchup_entries: u64,
    pub proposal_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let d = RaftSettings::default();
        RaftConfig {
            tick_ms: d.tick.as_millis() as u64,
            election_ticks: d.election_ticks,
            heartbeat_ticks: d.heartbeat_ticks,
            snapshot_entries: d.snapshot_entries,
            catchup_entries: d.catchup_entries,
            proposal_timeout_ms: d.proposal_timeout.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node_id: u64,
    /// gRPC (mTLS) listen address.
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this node (default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Plain-HTTP Prometheus endpoint (unauthenticated). Must be a loopback
    /// address unless `metrics_allow_remote = true`.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow `metrics_listen` on a non-loopback address (a management network
    /// you trust: anyone who reaches it reads the metrics).
    #[serde(default)]
    pub metrics_allow_remote: bool,
    pub data_dir: PathBuf,
    pub cluster_key_file: PathBuf,
    pub tls: TlsConfig,
    /// Initial cluster members, identical on every initial node.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Join a running cluster (after `pxemeshctl cluster add-member`) instead of bootstrapping.
    #[serde(default)]
    pub join: bool,
    #[serde(default)]
    pub raft: RaftConfig,
    /// Image store: replication, garbage collection, scrubbing.
    #[serde(default)]
    pub images: crate::images::ImagesConfig,
    /// Resource limits (free disk space, gRPC message sizes, per-connection streams).
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// CloudStack bridge (`[cloudstack]`, see deploy/cloudstack.example.toml);
    /// the Raft leader runs it.
    #[serde(default)]
    pub cloudstack: Option<crate::cloudstack::CloudStackConfig>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, CoordError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CoordError::Config(format!("cannot read {}: {e}", path.display())))?;
        Config::from_toml(&text).map_err(|e| CoordError::Config(format!("{}: {e}", path.display())))
    }

    pub fn from_toml(text: &str) -> Result<Config, CoordError> {
        let cfg: Config = toml::from_str(text).map_err(|e| CoordError::Config(e.to_string()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), CoordError> {
        let bad = |m: String| Err(CoordError::Config(m));
        if self.node_id == 0 {
            return bad("node_id must be a positive integer".into());
        }
        let mut seen = BTreeMap::new();
        for p in &self.peers {
            if p.id == 0 {
                return bad("peer ids must be positive".into());
            }
            if seen.insert(p.id, &p.address).is_some() {
                return bad(format!("peer {} is listed twice", p.id));
            }
        }
        if !self.join && !seen.contains_key(&self.node_id) {
            return bad(format!(
                "node {} is not in [[peers]]; list every initial member (including this one) or set join = true",
                self.node_id
            ));
        }
        if self.join && !seen.keys().any(|id| *id != self.node_id) {
            // The leader contacts a joining node, but the node must answer:
            // without its peers' addresses every reply is dropped and it
            // never catches up.
            return bad(format!(
                "join = true needs [[peers]] with the addresses of the running members (node {} must be able to answer the leader)",
                self.node_id
            ));
        }
        if let Some(m) = self.metrics_listen {
            if !m.ip().is_loopback() && !self.metrics_allow_remote {
                return bad(format!(
                    "metrics_listen = {m} is not a loopback address; the metrics endpoint is unauthenticated, so bind it to 127.0.0.1/::1 or set metrics_allow_remote = true"
                ));
            }
        }
        self.limits.validate()?;
        let r = &self.raft;
        if r.tick_ms == 0 || r.heartbeat_ticks == 0 || r.election_ticks <= r.heartbeat_ticks {
            return bad("raft: need tick_ms > 0 and election_ticks > heartbeat_ticks > 0".into());
        }
        if r.snapshot_entries < 2 || r.catchup_entries >= r.snapshot_entries {
            return bad(
                "raft: need snapshot_entries >= 2 and catchup_entries < snapshot_entries".into(),
            );
        }
        Ok(())
    }

    pub fn raft_settings(&self) -> RaftSettings {
        RaftSettings {
            tick: Duration::from_millis(self.raft.tick_ms),
            election_ticks: self.raft.election_ticks,
            heartbeat_ticks: self.raft.heartbeat_ticks,
            snapshot_entries: self.raft.snapshot_entries,
            catchup_entries: self.raft.catchup_entries,
            proposal_timeout: Duration::from_millis(self.raft.proposal_timeout_ms),
        }
    }

    pub fn peer_map(&self) -> BTreeMap<u64, String> {
        self.peers
            .iter()
            .map(|p| (p.id, p.address.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
node_id = 1
listen = "127.0.0.1:7001"
data_dir = "/tmp/x"
cluster_key_file = "/tmp/k"
[tls]
ca = "ca.pem"
cert = "c.pem"
key = "c-key.pem"
[[peers]]
id = 1
address = "127.0.0.1:7001"
[raft]
snapshot_entries = 100
catchup_entries = 10
"#;

    #[test]
    fn shipped_example_config_is_valid() {
        let c = Config::from_toml(include_str!("../../deploy/coordinator.example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.peers.len(), 3);
    }

    #[test]
    fn parse_and_validate() {
        let c = Config::from_toml(SAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.raft.snapshot_entries, 100);
        assert_eq!(c.raft.tick_ms, 100);
        let mut c2 = c.clone();
        c2.node_id = 2;
        assert!(c2
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not in [[peers]]"));
        // The unauthenticated metrics endpoint stays on loopback unless allowed.
        let mut m = c.clone();
        m.metrics_listen = Some("127.0.0.1:9100".parse().unwrap());
        m.validate().unwrap();
        m.metrics_listen = Some("[::1]:9100".parse().unwrap());
        m.validate().unwrap();
        for public in ["0.0.0.0:9100", "192.0.2.7:9100", "[::]:9100"] {
            m.metrics_listen = Some(public.parse().unwrap());
            m.metrics_allow_remote = false;
            let e = m.validate().unwrap_err().to_string();
            assert!(e.contains("not a loopback address"), "{e}");
            m.metrics_allow_remote = true;
            m.validate().unwrap();
        }
        let err = Config::from_toml(&SAMPLE.replace("node_id", "nodeid")).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        // A joining node needs the running members' addresses to answer them.
        let mut j = c.clone();
        j.node_id = 9;
        j.join = true;
        j.validate().unwrap();
        j.peers.clear();
        assert!(j
            .validate()
            .unwrap_err()
            .to_string()
            .contains("join = true needs [[peers]]"));
    }
}
