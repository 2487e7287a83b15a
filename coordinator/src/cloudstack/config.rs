//! Configuration of the CloudStack bridge (see deploy/cloudstack.example.toml).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::model::validate_name;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudStackConfig {
    /// API endpoint, e.g. `https://cloudstack.example.org:8443/client/api`.
    pub url: String,
    pub api_key: String,
    /// File holding the secret key (mode 0600); read at start, never logged.
    pub secret_key_file: PathBuf,
    /// CA certificate(s) (PEM) for the management server; default: system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Zones (names or ids) to mirror; empty = every zone.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Pod (name or id) → pxemesh rack. Pods not listed map to their name.
    #[serde(default)]
    pub pod_racks: BTreeMap<String, String>,
    /// CloudStack network (id or name) → pxemesh network. Unlisted NICs match
    /// the rack's network whose subnet holds the NIC's address.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// BMC credentials for bare metal hosts (the API does not return them).
    pub bmc: BmcDefaults,
    #[serde(default = "default_interval")]
    pub interval_seconds: u64,
    #[serde(default = "default_rate")]
    pub rate_limit_per_second: f64,
    #[serde(default = "default_burst")]
    pub rate_limit_burst: u32,
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_seconds: u64,
    #[serde(default = "default_async_timeout")]
    pub async_job_timeout_seconds: u64,
    #[serde(default = "default_signature_lifetime")]
    pub signature_lifetime_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcDefaults {
    pub username: String,
    /// File holding the BMC password; sealed with the cluster key when host
    /// records are written, never stored in plaintext.
    pub password_file: PathBuf,
    #[serde(default = "default_bmc_port")]
    pub port: u16,
    #[serde(default = "default_cipher_suite")]
    pub cipher_suite: u8,
    /// Per-host overrides by CloudStack host name or id.
    #[serde(default)]
    pub hosts: BTreeMap<String, BmcOverride>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BmcOverride {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub port: Option<u16>,
}

fn default_interval() -> u64 {
    60
}
fn default_rate() -> f64 {
    5.0
}
fn default_burst() -> u32 {
    10
}
fn default_page_size() -> u32 {
    500
}
fn default_request_timeout() -> u64 {
    30
}
fn default_async_timeout() -> u64 {
    600
}
fn default_signature_lifetime() -> u64 {
    300
}
fn default_bmc_port() -> u16 {
    623
}
fn default_cipher_suite() -> u8 {
    3
}

impl CloudStackConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &std::path::Path) -> Result<CloudStackConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        CloudStackConfig::from_toml_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_toml_str(text: &str) -> Result<CloudStackConfig, String> {
        let cfg: CloudStackConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let url = self.url.trim();
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!("url {url:?} must start with https:// or http://"));
        }
        if url.contains('?') {
            return Err(format!("url {url:?} must not carry a query string"));
        }
        if self.api_key.trim().is_empty() {
            return Err("api_key must not be empty".into());
        }
        if self.secret_key_file.as_os_str().is_empty() {
            return Err("secret_key_file must be set".into());
        }
        if url.starts_with("http://") && self.ca_file.is_some() {
            return Err("ca_file is set but url is plain http://".into());
        }
        if self.interval_seconds < 5 || self.interval_seconds > 86_400 {
            return Err(format!(
                "interval_seconds {} is outside 5..=86400",
                self.interval_seconds
            ));
        }
        if !(self.rate_limit_per_second > 0.0 && self.rate_limit_per_second <= 1000.0) {
            return Err(format!(
                "rate_limit_per_second {} is outside (0, 1000]",
                self.rate_limit_per_second
            ));
        }
        if self.rate_limit_burst == 0 {
            return Err("rate_limit_burst must be at least 1".into());
        }
        if self.page_size == 0 || self.page_size > 10_000 {
            return Err(format!("page_size {} is outside 1..=10000", self.page_size));
        }
        if self.request_timeout_seconds == 0 || self.async_job_timeout_seconds == 0 {
            return Err("request_timeout_seconds and async_job_timeout_seconds must be > 0".into());
        }
        if !(30..=3600).contains(&self.signature_lifetime_seconds) {
            return Err(format!(
                "signature_lifetime_seconds {} is outside 30..=3600",
                self.signature_lifetime_seconds
            ));
        }
        for (pod, rack) in &self.pod_racks {
            validate_name("rack", rack).map_err(|e| format!("pod_racks[{pod:?}]: {e}"))?;
        }
        for (net, target) in &self.networks {
            validate_name("network", target).map_err(|e| format!("networks[{net:?}]: {e}"))?;
        }
        if self.bmc.username.is_empty() {
            return Err("bmc.username must not be empty".into());
        }
        if self.bmc.port == 0 {
            return Err("bmc.port must not be 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_validates() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/cloudstack.example.toml");
        let cfg = CloudStackConfig::load(&path).unwrap();
        assert!(cfg.url.starts_with("https://"));
        assert_eq!(
            cfg.pod_racks.get("POD0").map(String::as_str),
            Some("rack-a")
        );
        assert_eq!(cfg.bmc.port, 623);
    }

    fn base() -> String {
        r#"
url = "https://cs.example.org/client/api"
api_key = "k"
secret_key_file = "/etc/pxemesh/cs.secret"
[bmc]
username = "ADMIN"
password_file = "/etc/pxemesh/bmc.pw"
"#
        .to_string()
    }

    #[test]
    fn defaults_and_refusals() {
        let cfg = CloudStackConfig::from_toml_str(&base()).unwrap();
        assert_eq!(cfg.interval_seconds, 60);
        assert_eq!(cfg.page_size, 500);
        let bad = [
            base().replace("https://cs.example.org/client/api", "ftp://x"),
            base().replace("api_key = \"k\"", "api_key = \" \""),
            format!("interval_seconds = 1\n{}", base()),
            format!("rate_limit_per_second = 0.0\n{}", base()),
            format!("page_size = 0\n{}", base()),
            format!("{}[pod_racks]\nPOD0 = \"bad name\"\n", base()),
            format!("unknown_key = 1\n{}", base()),
            base().replace("https://cs.example.org/client/api", "https://x/api?a=b"),
        ];
        for b in bad {
            assert!(
                CloudStackConfig::from_toml_str(&b).is_err(),
                "accepted:\n{b}"
            );
        }
    }
}
