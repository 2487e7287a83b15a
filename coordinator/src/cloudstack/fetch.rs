//! What one sync reads from CloudStack, and the provision-done notification.

use super::client::{params, Client, CsError};
use super::model::{CsHost, Pod, Template, VirtualMachine, Zone};

/// Everything `reconcile::plan` needs from the management server.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub zones: Vec<Zone>,
    pub pods: Vec<Pod>,
    pub hosts: Vec<CsHost>,
    pub vms: Vec<VirtualMachine>,
    pub templates: Vec<Template>,
}

/// Lists the zones, then per zone in scope (`zones` by name or id; empty =
/// all) its pods, bare metal hosts, bare metal instances (all accounts) and
/// bare metal templates. Any failed call fails the whole listing: a partial
/// listing must never reach `plan`, which deletes what is absent.
pub async fn fetch(client: &Client, zones: &[String]) -> Result<Listing, CsError> {
    let all_zones: Vec<Zone> = client.list_all("listZones", &[], "zone").await?;
    let mut out = Listing::default();
    for z in all_zones {
        if !zones.is_empty() && !zones.iter().any(|w| w == &z.id || w == &z.name) {
            continue;
        }
        let zid = z.id.as_str();
        out.pods.extend(
            client
                .list_all::<Pod>("listPods", &params(&[("zoneid", zid)]), "pod")
                .await?,
        );
        out.hosts.extend(
            client
                .list_all::<CsHost>(
                    "listHosts",
                    &params(&[
                        ("zoneid", zid),
                        ("hypervisor", "BareMetal"),
                        ("type", "Routing"),
                    ]),
                    "host",
                )
                .await?,
        );
        out.vms.extend(
            client
                .list_all::<VirtualMachine>(
                    "listVirtualMachines",
                    &params(&[
                        ("zoneid", zid),
                        ("hypervisor", "BareMetal"),
                        ("listall", "true"),
                    ]),
                    "virtualmachine",
                )
                .await?,
        );
        out.templates.extend(
            client
                .list_all::<Template>(
                    "listTemplates",
                    &params(&[
                        ("zoneid", zid),
                        ("hypervisor", "BareMetal"),
                        ("templatefilter", "all"),
                    ]),
                    "template",
                )
                .await?,
        );
        out.zones.push(z);
    }
    tracing::info!(
        zones = out.zones.len(),
        pods = out.pods.len(),
        hosts = out.hosts.len(),
        instances = out.vms.len(),
        templates = out.templates.len(),
        "cloudstack listing"
    );
    Ok(out)
}

/// `notifyBaremetalProvisionDone mac=<mac>` (async), polled to completion:
/// CloudStack then moves the instance from Starting to Running.
pub async fn notify_provision_done(client: &Client, mac: &str) -> Result<(), CsError> {
    client
        .call_async("notifyBaremetalProvisionDone", &params(&[("mac", mac)]))
        .await?;
    Ok(())
}

/// The state of one instance (`listVirtualMachines id=<id>`), `None` when
/// CloudStack no longer lists it (expunged).
pub async fn vm_state(client: &Client, vm_id: &str) -> Result<Option<String>, CsError> {
    let vms: Vec<VirtualMachine> = client
        .list_all(
            "listVirtualMachines",
            &params(&[("id", vm_id), ("listall", "true")]),
            "virtualmachine",
        )
        .await?;
    Ok(vms.into_iter().find(|v| v.id == vm_id).map(|v| v.state))
}
