//! A CloudStack management server's answer body, as the bridge's client
//! receives it: `decode_answer` (envelope, API errors, HTTP statuses) for
//! each list command the sync issues, the page decoding into the model
//! types, then `reconcile::plan` (pods → racks, bare metal hosts +
//! instances → host records, kickstart templates → profiles via
//! `KickstartUrl::parse`) on what was decoded. The plan must be stable: a
//! plan computed against its own result writes and deletes nothing.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use pxemesh_coordinator::cloudstack::client::{decode_answer, decode_page};
use pxemesh_coordinator::cloudstack::model::{
    CsHost, KickstartUrl, Pod, Template, VirtualMachine, Zone,
};
use pxemesh_coordinator::cloudstack::reconcile::{plan, Inputs, Mapping};
use pxemesh_coordinator::model::{Kind, Network};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn page<T: DeserializeOwned>(command: &str, body: &[u8], key: &str) -> Vec<T> {
    match decode_answer(command, 200, body) {
        Ok(answer) => decode_page::<T>(command, &answer, key)
            .map(|(items, _count)| items)
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

fn networks() -> Vec<Network> {
    let v = serde_json::json!([
        {"name": "rack-a-prov", "rack": "rack-a", "subnet": "10.1.1.0/24", "mtu": 1500, "lease_seconds": 600},
        {"name": "guest", "rack": "pod1", "subnet": "10.1.2.0/24", "mtu": 1500, "lease_seconds": 600, "vlan": 1994}
    ]);
    serde_json::from_value(v).expect("networks")
}

fuzz_target!(|data: &[u8]| {
    // A failed HTTP status is never taken as an answer, whatever the body.
    for status in [0u16, 401, 431, 530] {
        assert!(decode_answer("listHosts", status, data).is_err());
    }
    let zones: Vec<Zone> = page("listZones", data, "zone");
    let pods: Vec<Pod> = page("listPods", data, "pod");
    let hosts: Vec<CsHost> = page("listHosts", data, "host");
    let vms: Vec<VirtualMachine> = page("listVirtualMachines", data, "virtualmachine");
    let templates: Vec<Template> = page("listTemplates", data, "template");
    // The async-job poll reads these fields of the answer.
    if let Ok(v) = decode_answer("queryAsyncJobResult", 200, data) {
        let _ = (
            v.get("jobstatus").and_then(Value::as_u64),
            v.get("jobresult"),
        );
    }
    for t in &templates {
        if let Some(url) = &t.url {
            let _ = KickstartUrl::looks_like(url);
            if let Ok(k) = KickstartUrl::parse(url) {
                assert!(!k.ks.is_empty() && !k.kernel.is_empty() && !k.initrd.is_empty());
            }
        }
    }
    for vm in &vms {
        let _ = (vm.is_gone(), vm.boot_nic().map(|n| n.vlan()));
    }
    for h in &hosts {
        let _ = (h.is_bare_metal(), h.host_mac());
    }
    let mapping = Mapping {
        zones: Vec::new(),
        pod_racks: BTreeMap::from([("POD0".to_string(), "rack-a".to_string())]),
        networks: BTreeMap::from([("baremetal-guest".to_string(), "rack-a-prov".to_string())]),
        bmc_username: "ADMIN".into(),
        bmc_port: 623,
        bmc_cipher_suite: 3,
        bmc_overrides: BTreeMap::from([("bm-07".to_string(), (Some("root".to_string()), None))]),
    };
    let inp = Inputs {
        zones,
        pods,
        hosts,
        vms,
        templates,
        mapping,
        racks: Vec::new(),
        networks: networks(),
        pxe_hosts: Vec::new(),
        profiles: Vec::new(),
    };
    let first = plan(&inp);
    // Apply the plan the way the writer does (put by name, delete by name)
    // and plan again.
    let mut again = inp.clone();
    for r in &first.racks {
        again.racks.retain(|x| x.name != r.name);
        again.racks.push(r.clone());
    }
    for p in &first.profiles {
        again.profiles.retain(|x| x.name != p.name);
        again.profiles.push(p.clone());
    }
    for h in &first.hosts {
        again.pxe_hosts.retain(|x| x.name != h.name);
        again.pxe_hosts.push(h.clone());
    }
    for d in &first.deletes {
        if d.kind == Kind::Host {
            again.pxe_hosts.retain(|x| x.name != d.name);
        }
    }
    let second = plan(&again);
    assert!(
        second.is_noop(),
        "plan is not stable: first {first:#?}\nsecond {second:#?}"
    );
});
