//! The text of a configuration or data file, given to every parser the
//! daemons and `pxemeshctl` use on files: the relay's configuration and
//! static rack file (TOML and JSON), the coordinator's configuration, the
//! CloudStack bridge's configuration, and host-import files (CSV and JSON).
//! Each is parsed and, where the daemon does, validated and then used the
//! way start-up uses it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pxemesh_coordinator::cloudstack::config::CloudStackConfig;
use pxemesh_coordinator::cloudstack::reconcile::Mapping;
use pxemesh_coordinator::import::parse_hosts;
use pxemesh_coordinator::Config;
use pxemesh_relay::config::RelayConfig;
use pxemesh_relay::state::RackState;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = RelayConfig::from_toml(text) {
        if cfg.validate().is_ok() {
            let _ = cfg.http_port();
        }
    }
    if let Ok(cfg) = Config::from_toml(text) {
        if cfg.validate().is_ok() {
            let _ = cfg.raft_settings();
            let _ = cfg.peer_map();
        }
    }
    if let Ok(cfg) = CloudStackConfig::from_toml_str(text) {
        let _ = Mapping::from_config(&cfg);
    }
    for json in [false, true] {
        if let Ok(state) = RackState::from_static_text(text, json) {
            for h in state.hosts() {
                // Only hosts with a reservation are answered (indexed).
                assert_eq!(
                    state.host_by_mac(&h.mac).is_some(),
                    h.reservation().is_some()
                );
                let _ = state.profile_of(h);
            }
            for n in state.networks() {
                let _ = state.network_containing(n.subnet.network());
            }
        }
    }
    let _ = parse_hosts("hosts.csv", text);
    let _ = parse_hosts("hosts.json", text);
    let _ = parse_hosts("hosts", text);
});
