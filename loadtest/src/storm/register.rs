//! `--register`: put the storm's hosts into a coordinator cluster through the
//! AdminService (the same mTLS client as the `writes` driver) before the
//! storm, so a relay in sync mode serves them, and delete them afterwards.
//! The rack, network and boot profile are created only when missing and are
//! left in place.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pxemesh_certs::{Tls, TlsPaths};
use pxemesh_coordinator::client;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use super::fleet::{BootFiles, Fleet, PROFILE};

#[derive(Debug, Clone)]
pub struct Registration {
    pub endpoints: Vec<String>,
    pub tls: TlsPaths,
    pub rack: String,
    pub network: String,
}

/// Objects per Apply (the coordinator takes up to 10 000).
const BATCH: usize = 1000;

pub struct Registered {
    client: AdminServiceClient<Channel>,
    names: Vec<String>,
}

fn status(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

async fn missing(c: &mut AdminServiceClient<Channel>, kind: pb::Kind, name: &str) -> Result<bool> {
    match c
        .get(pb::GetRequest {
            kind: kind as i32,
            name: name.into(),
            consistency: 0,
        })
        .await
    {
        Ok(_) => Ok(false),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(true),
        Err(s) => bail!("get {kind:?} {name}: {}", status(&s)),
    }
}

pub async fn register(reg: &Registration, fleet: &Fleet, files: &BootFiles) -> Result<Registered> {
    let tls: Arc<Tls> = Tls::load(reg.tls.clone()).context("loading the admin certificate")?;
    let (_, ch) = client::first_reachable(&reg.endpoints, tls)
        .await
        .map_err(|e| anyhow::anyhow!("no coordinator reachable: {e}"))?;
    let mut c = AdminServiceClient::new(ch);
    let mut setup = Vec::new();
    if missing(&mut c, pb::Kind::Rack, &reg.rack).await? {
        setup.push(pb::object::Record::Rack(pb::Rack {
            name: reg.rack.clone(),
            description: "pxemesh-loadtest storm".into(),
            ..Default::default()
        }));
    }
    if missing(&mut c, pb::Kind::Network, &reg.network).await? {
        setup.push(pb::object::Record::Network(pb::Network {
            name: reg.network.clone(),
            rack: reg.rack.clone(),
            subnet: fleet.cidr(),
            lease_seconds: 3600,
            ..Default::default()
        }));
    }
    if missing(&mut c, pb::Kind::Profile, PROFILE).await? {
        setup.push(pb::object::Record::Profile(pb::BootProfile {
            name: PROFILE.into(),
            kind: "kickstart".into(),
            kernel: files.kernel.clone(),
            initrds: vec![files.initrd.clone()],
            cmdline: "console=ttyS0 inst.text".into(),
            ..Default::default()
        }));
    }
    let hosts = fleet.hosts();
    let mut objects: Vec<pb::Object> = setup
        .into_iter()
        .map(|r| pb::Object { record: Some(r) })
        .collect();
    objects.extend(hosts.iter().map(|h| pb::Object {
        record: Some(pb::object::Record::Host(pb::Host {
            name: h.name.clone(),
            mac: h.mac_text(),
            ip: h.ip.to_string(),
            hostname: h.name.clone(),
            rack: reg.rack.clone(),
            network: reg.network.clone(),
            profile: PROFILE.into(),
            ..Default::default()
        })),
    }));
    for chunk in objects.chunks(BATCH) {
        let mut req = tonic::Request::new(pb::ApplyRequest {
            objects: chunk.to_vec(),
            dry_run: false,
        });
        req.set_timeout(Duration::from_secs(30));
        c.apply(req)
            .await
            .map_err(|s| anyhow::anyhow!("registering hosts: {}", status(&s)))?;
    }
    Ok(Registered {
        client: c,
        names: hosts.into_iter().map(|h| h.name).collect(),
    })
}

impl Registered {
    /// Delete every registered host; returns how many deletes failed.
    pub async fn cleanup(mut self) -> Result<usize> {
        let mut failed = 0;
        for name in &self.names {
            let mut req = tonic::Request::new(pb::DeleteRequest {
                kind: pb::Kind::Host as i32,
                name: name.clone(),
            });
            req.set_timeout(Duration::from_secs(10));
            if self.client.delete(req).await.is_err() {
                failed += 1;
            }
        }
        Ok(failed)
    }
}
