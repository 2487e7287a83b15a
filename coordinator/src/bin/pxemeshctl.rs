//! pxemeshctl: the admin CLI over the coordinators' AdminService.
//!
//! Thin by design: argument parsing, one or a few RPCs, rendering. Tables for
//! people (`-o table`, the default), stable JSON for scripts (`-o json`).

#[path = "pxemeshctl/cloudstack.rs"]
mod cloudstack;
#[path = "pxemeshctl/jobs.rs"]
mod jobs;

use std::collections::HashMap;
use std::future::Future;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{presets, Table};
use pxemesh_certs::{Tls, TlsPaths};
use pxemesh_coordinator::{client, import};
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use pxemesh_proto::v1::object::Record;
use pxemesh_proto::v1::{
    AddMemberRequest, ApplyRequest, Bmc, BootProfile, ClusterStatusRequest, ClusterStatusResponse,
    Consistency, DeleteRequest, GetRequest, Host, Kind, ListRequest, Member, Network, Object,
    Outcome, PutRequest, Rack, RemoveMemberRequest, TransferLeaderRequest,
};
use pxemesh_proto::v1::{HostEvent, ListEventsRequest, WatchEventsRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

#[derive(Parser)]
#[command(
    name = "pxemeshctl",
    version,
    about = "Administer a pxemesh coordinator cluster",
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
#[command(next_help_heading = "Global options")]
struct GlobalOpts {
    /// Coordinator gRPC endpoints (host:port), tried in order.
    #[arg(
        long,
        env = "PXEMESH_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7000",
        global = true
    )]
    endpoints: Vec<String>,
    /// Directory holding ca.pem and the client certificate and key.
    #[arg(long, env = "PXEMESH_TLS_DIR", default_value = ".", global = true)]
    tls_dir: PathBuf,
    /// Client certificate stem: loads <tls-dir>/<stem>.pem and <stem>-key.pem.
    #[arg(
        long,
        env = "PXEMESH_CERT_STEM",
        default_value = "admin",
        global = true
    )]
    cert_stem: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Seconds to wait for an answer.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..),
        global = true
    )]
    timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Coordinator cluster: status and membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Racks.
    #[command(subcommand)]
    Rack(RackCmd),
    /// Provisioning networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Hosts: DHCP reservations and BMCs.
    #[command(subcommand)]
    Host(HostCmd),
    /// Boot profiles.
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Rack relays: liveness and sync lag.
    #[command(subcommand)]
    Relay(RelayCmd),
    /// Boot events reported by the relays.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Power hosts on, off, cycle... through their rack's relay (IPMI).
    Power(jobs::PowerArgs),
    /// Set hosts' boot device through their rack's relay (IPMI).
    Bootdev(jobs::BootdevArgs),
    /// Power and boot-device jobs.
    #[command(subcommand)]
    Job(jobs::JobCmd),
    /// Boot images: content-addressed files replicated to every coordinator.
    #[command(subcommand)]
    Image(ImageCmd),
    /// CloudStack bridge: on-demand sync and status.
    #[command(subcommand)]
    Cloudstack(cloudstack::CloudStackCmd),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Upload a directory (or one file) and commit it as an image manifest.
    Push {
        /// Directory or file to push.
        path: PathBuf,
        /// Image name.
        #[arg(long)]
        name: String,
    },
    /// Have the coordinator download files over HTTP(S) into an image (each
    /// file named by its URL's last segment, or by --path with one URL).
    Import {
        /// http:// or https:// URLs.
        #[arg(required = true)]
        urls: Vec<String>,
        /// Image name.
        #[arg(long)]
        name: String,
        /// Path inside the image (only with a single URL).
        #[arg(long)]
        path: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        import_timeout: u64,
    },
    /// Image manifests.
    List,
    /// Delete an image (its blobs go after the coordinators' grace period).
    Delete {
        /// Image name.
        name: String,
    },
}

#[derive(Subcommand)]
enum EventsCmd {
    /// Recent events, oldest first.
    List {
        /// Only this host's events (MAC).
        #[arg(long)]
        mac: Option<String>,
        /// Only events after this id.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Stream events as relays report them (Ctrl-C to stop).
    Watch {
        #[arg(long)]
        mac: Option<String>,
        /// Start after this event id (default: only new events).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand)]
enum RelayCmd {
    /// Every relay that has heartbeated: rack, last seen, lag and state.
    List {
        /// A relay unseen for longer is "stale"; a brief pause never flaps it.
        #[arg(long, default_value_t = 20)]
        stale_after: u64,
        /// A relay unseen for longer is "offline".
        #[arg(long, default_value_t = 120)]
        offline_after: u64,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Ask every endpoint for its Raft status.
    Status,
    /// Add a coordinator to the cluster.
    AddMember {
        /// Node id of the new coordinator.
        #[arg(long)]
        id: u64,
        /// host:port of the new coordinator's gRPC listener.
        #[arg(long)]
        address: String,
        /// Add as a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a coordinator from the cluster.
    RemoveMember {
        /// Node id to remove.
        #[arg(long)]
        id: u64,
    },
    /// Hand leadership to another coordinator.
    TransferLeader {
        /// Node id of the new leader.
        #[arg(long)]
        id: u64,
    },
}

/// get/list/delete, shared by every record kind.
#[derive(Subcommand)]
enum CommonCmd {
    /// Show one record.
    Get {
        /// Record name.
        name: String,
        /// Read from the answering node's applied state (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// List records.
    List {
        /// Only records of this rack.
        #[arg(long)]
        rack: Option<String>,
        /// Read from the answering node's applied state (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    /// Delete one record.
    Delete {
        /// Record name.
        name: String,
    },
}

#[derive(Subcommand)]
enum RackCmd {
    /// Create or replace a rack.
    Put(Box<RackPut>),
    #[command(flatten)]
    Common(CommonCmd),
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create or replace a network.
    Put(Box<NetworkPut>),
    #[command(flatten)]
    Common(CommonCmd),
}

#[derive(Subcommand)]
enum HostCmd {
    /// Create or replace a host.
    Put(Box<HostPut>),
    /// Create or replace many hosts from a CSV or JSON file, atomically.
    Import {
        /// CSV or JSON file ("-" reads standard input).
        file: String,
        /// Validate and report outcomes without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Names of the hosts with this BMC address (exit status 1 when none).
    Find {
        /// BMC (IPMI) address as stored in the host record.
        #[arg(long)]
        bmc: String,
    },
    #[command(flatten)]
    Common(CommonCmd),
}

#[derive(Subcommand)]
enum ProfileCmd {
    /// Create or replace a boot profile.
    Put(Box<ProfilePut>),
    #[command(flatten)]
    Common(CommonCmd),
}

#[derive(Args)]
struct RackPut {
    /// Rack name.
    name: String,
    /// Free-form description.
    #[arg(long)]
    description: Option<String>,
    /// CIDR of an out-of-band (BMC) network of the rack (repeatable).
    #[arg(long = "oob", value_name = "CIDR", value_parser = parse_cidr)]
    oob: Vec<String>,
    /// Label (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

#[derive(Args)]
struct NetworkPut {
    /// Network name.
    name: String,
    /// Rack whose relay serves the network.
    #[arg(long)]
    rack: String,
    /// Subnet CIDR, e.g. 10.20.0.0/24.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    subnet: String,
    /// Default gateway, inside the subnet.
    #[arg(long, value_name = "IP")]
    gateway: Option<IpAddr>,
    /// DNS server (repeatable).
    #[arg(long, value_name = "IP")]
    dns: Vec<IpAddr>,
    /// DNS search domain.
    #[arg(long)]
    domain: Option<String>,
    /// Interface MTU handed out by DHCP (576-9216; default 1500).
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=9216))]
    mtu: Option<u32>,
    /// 802.1Q VLAN id (1-4094; default untagged).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4094))]
    vlan: Option<u32>,
    /// Dynamic pool for unknown machines.
    #[arg(long, value_name = "START-END", value_parser = parse_pool)]
    pool: Option<(String, String)>,
    /// DHCP lease time in seconds.
    #[arg(long, value_name = "N")]
    lease_seconds: Option<u32>,
    /// Relay interface serving this network.
    #[arg(long, value_name = "IF")]
    interface: Option<String>,
}

#[derive(Args)]
struct HostPut {
    /// Host name.
    name: String,
    /// MAC address of the provisioning NIC (aa:bb:cc:dd:ee:ff).
    #[arg(long)]
    mac: String,
    /// Reserved IP address, inside the network's subnet. Without --ip and
    /// --network the host has no reservation: relays do not answer it, power
    /// jobs work when it has a BMC.
    #[arg(long, requires = "network")]
    ip: Option<IpAddr>,
    /// Rack the host is in.
    #[arg(long)]
    rack: String,
    /// Network the reservation belongs to.
    #[arg(long, requires = "ip")]
    network: Option<String>,
    /// Hostname handed out by DHCP.
    #[arg(long)]
    hostname: Option<String>,
    /// Boot profile.
    #[arg(long)]
    profile: Option<String>,
    /// Label (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// BMC address (IP or DNS name on the rack's OOB network).
    #[arg(long, value_name = "ADDR")]
    bmc_address: Option<String>,
    /// BMC RMCP+ port (default 623).
    #[arg(long, value_name = "PORT")]
    bmc_port: Option<u16>,
    /// BMC user name.
    #[arg(long, value_name = "USER")]
    bmc_user: Option<String>,
    /// Read the BMC password from this file (first line).
    #[arg(long, value_name = "FILE", conflicts_with = "bmc_password_env")]
    bmc_password_file: Option<PathBuf>,
    /// Read the BMC password from this environment variable.
    #[arg(long, value_name = "VAR")]
    bmc_password_env: Option<String>,
    /// IPMI cipher suite (3 or 17).
    #[arg(long, value_name = "N", value_parser = parse_cipher_suite)]
    cipher_suite: Option<u32>,
}

#[derive(Args)]
struct ProfilePut {
    /// Profile name.
    name: String,
    /// How the host boots.
    #[arg(long, value_parser = ["ipxe", "kickstart", "pxelinux", "localboot"])]
    kind: String,
    /// Image manifest the files come from.
    #[arg(long)]
    image: Option<String>,
    /// Kernel path inside the image.
    #[arg(long)]
    kernel: Option<String>,
    /// Initrd path inside the image (repeatable, in order).
    #[arg(long = "initrd", value_name = "FILE")]
    initrds: Vec<String>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Kickstart file URL.
    #[arg(long, value_name = "URL")]
    kickstart_url: Option<String>,
    /// Free-form description.
    #[arg(long)]
    description: Option<String>,
}

fn parse_cidr(s: &str) -> Result<String, String> {
    s.parse::<ipnet::IpNet>()
        .map(|_| s.to_string())
        .map_err(|e| format!("{e} (expected a CIDR like 10.20.0.0/24)"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err("expected KEY=VALUE".into()),
    }
}

fn parse_pool(s: &str) -> Result<(String, String), String> {
    let (a, b) = s.split_once('-').ok_or("expected START-END")?;
    let (a, b) = (a.trim(), b.trim());
    for ip in [a, b] {
        ip.parse::<IpAddr>()
            .map_err(|e| format!("{ip:?}: {e} (expected START-END)"))?;
    }
    Ok((a.to_string(), b.to_string()))
}

fn parse_cipher_suite(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (3 | 17)) => Ok(n),
        _ => Err("allowed cipher suites: 3, 17".into()),
    }
}

fn labels_map(labels: Vec<(String, String)>) -> HashMap<String, String> {
    labels.into_iter().collect()
}

// ---------------------------------------------------------------------------
// Record kinds
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Noun {
    Rack,
    Network,
    Host,
    Profile,
}

impl Noun {
    fn kind(self) -> Kind {
        match self {
            Noun::Rack => Kind::Rack,
            Noun::Network => Kind::Network,
            Noun::Host => Kind::Host,
            Noun::Profile => Kind::Profile,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Noun::Rack => "rack",
            Noun::Network => "network",
            Noun::Host => "host",
            Noun::Profile => "profile",
        }
    }

    fn headers(self) -> &'static [&'static str] {
        match self {
            Noun::Rack => &["NAME", "DESCRIPTION", "OOB NETWORKS", "LABELS", "REVISION"],
            Noun::Network => &[
                "NAME",
                "RACK",
                "SUBNET",
                "GATEWAY",
                "VLAN",
                "MTU",
                "POOL",
                "INTERFACE",
                "REVISION",
            ],
            Noun::Host => &[
                "NAME",
                "MAC",
                "IP",
                "RACK",
                "NETWORK",
                "PROFILE",
                "BMC ADDRESS",
                "PASSWORD SET",
                "REVISION",
            ],
            Noun::Profile => &["NAME", "KIND", "IMAGE", "KERNEL", "INITRDS", "REVISION"],
        }
    }

    fn of(record: &Record) -> Option<Noun> {
        match record {
            Record::Rack(_) => Some(Noun::Rack),
            Record::Network(_) => Some(Noun::Network),
            Record::Host(_) => Some(Noun::Host),
            Record::Profile(_) => Some(Noun::Profile),
            _ => None,
        }
    }
}

/// "KIND_HOST" → "host", "OUTCOME_NOT_FOUND" → "not_found".
fn enum_word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn kind_word(kind: i32) -> String {
    Kind::try_from(kind)
        .map(|k| enum_word(k.as_str_name(), "KIND_"))
        .unwrap_or_else(|_| format!("kind_{kind}"))
}

fn outcome_word(outcome: i32) -> String {
    Outcome::try_from(outcome)
        .map(|o| enum_word(o.as_str_name(), "OUTCOME_"))
        .unwrap_or_else(|_| format!("outcome_{outcome}"))
}

fn record_name(record: &Record) -> &str {
    match record {
        Record::Rack(r) => &r.name,
        Record::Network(n) => &n.name,
        Record::Host(h) => &h.name,
        Record::Profile(p) => &p.name,
        Record::Image(i) => &i.name,
        Record::Job(j) => &j.id,
        Record::Relay(r) => &r.name,
    }
}

fn sorted_labels(labels: &HashMap<String, String>) -> String {
    let mut v: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

fn nonzero(n: u32) -> String {
    if n == 0 {
        String::new()
    } else {
        n.to_string()
    }
}

/// "-" for an empty field that means "none" (a host without a reservation).
fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn pool(start: &str, end: &str) -> String {
    if start.is_empty() && end.is_empty() {
        String::new()
    } else {
        format!("{start}-{end}")
    }
}

/// One list row, in the order of [`Noun::headers`].
fn record_row(record: &Record) -> Vec<String> {
    match record {
        Record::Rack(r) => vec![
            r.name.clone(),
            r.description.clone(),
            r.oob_networks.join(","),
            sorted_labels(&r.labels),
            r.revision.to_string(),
        ],
        Record::Network(n) => vec![
            n.name.clone(),
            n.rack.clone(),
            n.subnet.clone(),
            n.gateway.clone(),
            nonzero(n.vlan),
            nonzero(n.mtu),
            pool(&n.pool_start, &n.pool_end),
            n.interface.clone(),
            n.revision.to_string(),
        ],
        Record::Host(h) => {
            let bmc = h.bmc.clone().unwrap_or_default();
            vec![
                h.name.clone(),
                h.mac.clone(),
                dash(&h.ip),
                h.rack.clone(),
                h.network.clone(),
                h.profile.clone(),
                bmc.address,
                yes_no(bmc.password_set),
                h.revision.to_string(),
            ]
        }
        Record::Profile(p) => vec![
            p.name.clone(),
            p.kind.clone(),
            p.image.clone(),
            p.kernel.clone(),
            p.initrds.join(","),
            p.revision.to_string(),
        ],
        other => vec![record_name(other).to_string()],
    }
}

/// Every field of one record, for `get`.
fn record_details(record: &Record) -> Vec<(&'static str, String)> {
    match record {
        Record::Rack(r) => vec![
            ("name", r.name.clone()),
            ("description", r.description.clone()),
            ("oob networks", r.oob_networks.join(", ")),
            ("labels", sorted_labels(&r.labels)),
            ("created at revision", r.create_revision.to_string()),
            ("revision", r.revision.to_string()),
        ],
        Record::Network(n) => vec![
            ("name", n.name.clone()),
            ("rack", n.rack.clone()),
            ("subnet", n.subnet.clone()),
            ("gateway", n.gateway.clone()),
            ("dns", n.dns.join(", ")),
            ("domain", n.domain.clone()),
            ("mtu", nonzero(n.mtu)),
            ("vlan", nonzero(n.vlan)),
            ("pool", pool(&n.pool_start, &n.pool_end)),
            ("lease seconds", nonzero(n.lease_seconds)),
            ("interface", n.interface.clone()),
            ("created at revision", n.create_revision.to_string()),
            ("revision", n.revision.to_string()),
        ],
        Record::Host(h) => {
            let mut v = vec![
                ("name", h.name.clone()),
                ("mac", h.mac.clone()),
                ("ip", dash(&h.ip)),
                ("hostname", h.hostname.clone()),
                ("rack", h.rack.clone()),
                ("network", h.network.clone()),
                ("profile", h.profile.clone()),
                ("labels", sorted_labels(&h.labels)),
            ];
            if let Some(b) = &h.bmc {
                v.extend([
                    ("bmc address", b.address.clone()),
                    ("bmc port", nonzero(b.port)),
                    ("bmc username", b.username.clone()),
                    ("bmc password set", yes_no(b.password_set)),
                    ("bmc cipher suite", nonzero(b.cipher_suite)),
                ]);
            }
            v.extend([
                ("created at revision", h.create_revision.to_string()),
                ("revision", h.revision.to_string()),
            ]);
            v
        }
        Record::Profile(p) => vec![
            ("name", p.name.clone()),
            ("description", p.description.clone()),
            ("kind", p.kind.clone()),
            ("image", p.image.clone()),
            ("kernel", p.kernel.clone()),
            ("initrds", p.initrds.join(", ")),
            ("cmdline", p.cmdline.clone()),
            ("kickstart url", p.kickstart_url.clone()),
            ("ipxe script", p.ipxe_script.clone()),
            ("created at revision", p.create_revision.to_string()),
            ("revision", p.revision.to_string()),
        ],
        other => vec![("name", record_name(other).to_string())],
    }
}

fn labels_json(labels: &HashMap<String, String>) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

/// Stable JSON for one record (never includes a password).
fn record_json(record: &Record) -> Value {
    match record {
        Record::Rack(r) => json!({
            "name": r.name,
            "description": r.description,
            "oob_networks": r.oob_networks,
            "labels": labels_json(&r.labels),
            "create_revision": r.create_revision,
            "revision": r.revision,
        }),
        Record::Network(n) => json!({
            "name": n.name,
            "rack": n.rack,
            "subnet": n.subnet,
            "gateway": n.gateway,
            "dns": n.dns,
            "domain": n.domain,
            "mtu": n.mtu,
            "vlan": n.vlan,
            "pool_start": n.pool_start,
            "pool_end": n.pool_end,
            "lease_seconds": n.lease_seconds,
            "interface": n.interface,
            "create_revision": n.create_revision,
            "revision": n.revision,
        }),
        Record::Host(h) => json!({
            "name": h.name,
            "mac": h.mac,
            "ip": h.ip,
            "hostname": h.hostname,
            "rack": h.rack,
            "network": h.network,
            "profile": h.profile,
            "labels": labels_json(&h.labels),
            "bmc": h.bmc.as_ref().map(|b| json!({
                "address": b.address,
                "port": b.port,
                "username": b.username,
                "password_set": b.password_set,
                "cipher_suite": b.cipher_suite,
            })),
            "create_revision": h.create_revision,
            "revision": h.revision,
        }),
        Record::Profile(p) => json!({
            "name": p.name,
            "description": p.description,
            "kind": p.kind,
            "image": p.image,
            "kernel": p.kernel,
            "initrds": p.initrds,
            "cmdline": p.cmdline,
            "kickstart_url": p.kickstart_url,
            "ipxe_script": p.ipxe_script,
            "create_revision": p.create_revision,
            "revision": p.revision,
        }),
        other => json!({ "name": record_name(other) }),
    }
}

// ---------------------------------------------------------------------------
// Output helpers
// ---------------------------------------------------------------------------

fn new_table<S: AsRef<str>>(headers: &[S]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(
        headers
            .iter()
            .map(|h| h.as_ref().to_string())
            .collect::<Vec<_>>(),
    );
    table
}

fn print_table(table: &mut Table) {
    // No padding left of the first column: output starts at column 0.
    if let Some(first) = table.column_mut(0) {
        first.set_padding((0, 1));
    }
    for line in table.to_string().lines() {
        println!("{}", line.trim_end());
    }
}

async fn host_timeline(ctl: &Ctl, mac: &str) -> Result<Vec<HostEvent>> {
    // The newest 20, shown oldest first.
    let msg = ListEventsRequest {
        mac: mac.to_string(),
        after_id: 0,
        limit: 1000,
        consistency: 0,
    };
    let mut events = ctl
        .call(msg, |mut c, r| async move { c.list_events(r).await })
        .await?
        .events;
    let skip = events.len().saturating_sub(20);
    Ok(events.split_off(skip))
}

fn event_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", unix_ms % 1000)
}

fn event_json(e: &HostEvent) -> Value {
    json!({
        "id": e.id, "mac": e.mac, "host": e.host, "rack": e.rack, "relay": e.relay,
        "kind": e.kind, "detail": e.detail, "unix_ms": e.unix_ms,
    })
}

fn events_table(events: &[HostEvent]) -> Table {
    let mut table = new_table(&["ID", "TIME (UTC)", "HOST", "MAC", "KIND", "DETAIL", "RELAY"]);
    for e in events {
        table.add_row(vec![
            e.id.to_string(),
            event_time(e.unix_ms),
            e.host.clone(),
            e.mac.clone(),
            e.kind.clone(),
            e.detail.clone(),
            format!("{}/{}", e.rack, e.relay),
        ]);
    }
    table
}

fn print_events(ctl: &Ctl, events: &[HostEvent]) -> Result<()> {
    match ctl.output {
        Output::Json => {
            print_json(&json!({ "events": events.iter().map(event_json).collect::<Vec<_>>() }))
        }
        Output::Table => {
            print_table(&mut events_table(events));
            Ok(())
        }
    }
}

async fn events_watch(
    ctl: &Ctl,
    mac: Option<String>,
    after: u64,
    count: Option<u64>,
) -> Result<()> {
    let (endpoint, channel) = client::first_reachable(&ctl.endpoints, ctl.tls.clone()).await?;
    let mut stream = AdminServiceClient::new(channel)
        .watch_events(WatchEventsRequest {
            after_id: after,
            mac: mac.unwrap_or_default(),
        })
        .await
        .with_context(|| format!("watching events on {endpoint}"))?
        .into_inner();
    let mut seen = 0u64;
    while let Some(e) = stream.message().await? {
        match ctl.output {
            Output::Json => println!("{}", event_json(&e)),
            Output::Table => println!(
                "{} {} {} {} {} {}",
                e.id,
                event_time(e.unix_ms),
                if e.host.is_empty() { "-" } else { &e.host },
                e.mac,
                e.kind,
                e.detail
            ),
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

/// A relay's state from how long ago it was last seen.
fn relay_state(age_ms: u64, stale_after: u64, offline_after: u64) -> &'static str {
    if age_ms > offline_after * 1000 {
        "offline"
    } else if age_ms > stale_after * 1000 {
        "stale"
    } else {
        "ready"
    }
}

async fn relay_list(ctl: &Ctl, stale_after: u64, offline_after: u64) -> Result<()> {
    let msg = ListRequest {
        kind: Kind::Relay as i32,
        rack: String::new(),
        consistency: Consistency::Linearizable as i32,
    };
    let resp = ctl
        .call(msg, |mut c, r| async move { c.list(r).await })
        .await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let rows: Vec<(pxemesh_proto::v1::RelayRecord, u64, u64, &str)> = resp
        .objects
        .into_iter()
        .filter_map(|o| match o.record {
            Some(Record::Relay(r)) => Some(r),
            _ => None,
        })
        .map(|r| {
            let age = now.saturating_sub(r.last_seen_unix_ms);
            let lag = resp.revision.saturating_sub(r.applied_revision);
            let state = relay_state(age, stale_after, offline_after);
            (r, age, lag, state)
        })
        .collect();
    if ctl.output == Output::Json {
        let items: Vec<Value> = rows
            .iter()
            .map(|(r, age, lag, state)| {
                json!({
                    "name": r.name, "rack": r.rack, "version": r.version,
                    "last_seen_unix_ms": r.last_seen_unix_ms, "seconds_since_seen": age / 1000,
                    "applied_revision": r.applied_revision, "lag": lag, "state": state,
                    "uptime_seconds": r.uptime_seconds,
                })
            })
            .collect();
        return print_json(&json!({ "items": items, "revision": resp.revision }));
    }
    let mut table = new_table(&[
        "NAME",
        "RACK",
        "VERSION",
        "LAST SEEN",
        "APPLIED",
        "LAG",
        "STATE",
    ]);
    for (r, age, lag, state) in &rows {
        table.add_row(vec![
            r.name.clone(),
            r.rack.clone(),
            r.version.clone(),
            format!("{}s ago", age / 1000),
            r.applied_revision.to_string(),
            lag.to_string(),
            state.to_string(),
        ]);
    }
    print_table(&mut table);
    Ok(())
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn members_table(members: &[Member], leader_id: u64) -> Table {
    let mut table = new_table(&["ID", "ADDRESS", "ROLE", "MATCHED"]);
    for m in members {
        let mut role = if m.learner { "learner" } else { "voter" }.to_string();
        if leader_id != 0 && m.id == leader_id {
            role.push_str(" (leader)");
        }
        table.add_row(vec![
            m.id.to_string(),
            m.address.clone(),
            role,
            m.matched_index.to_string(),
        ]);
    }
    table
}

fn members_json(members: &[Member]) -> Value {
    Value::Array(
        members
            .iter()
            .map(|m| {
                json!({
                    "id": m.id,
                    "address": m.address,
                    "learner": m.learner,
                    "role": if m.learner { "learner" } else { "voter" },
                    "matched_index": m.matched_index,
                })
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------
// Talking to the cluster
// ---------------------------------------------------------------------------

struct Ctl {
    endpoints: Vec<String>,
    tls: Arc<Tls>,
    timeout: Duration,
    output: Output,
}

impl Ctl {
    fn request<M>(&self, msg: M) -> Request<M> {
        let mut req = Request::new(msg);
        req.set_timeout(self.timeout);
        req
    }

    /// One unary call: endpoints in order (a leader named by a coordinator
    /// first); the next one is tried when an endpoint cannot be reached or
    /// answers `Unavailable`. Any other status is final.
    async fn call<M, T, F, Fut>(&self, msg: M, mut f: F) -> Result<T>
    where
        M: Clone,
        F: FnMut(AdminServiceClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut queue: std::collections::VecDeque<String> =
            self.endpoints.iter().cloned().collect();
        let mut tried = std::collections::HashSet::new();
        let mut failures = Vec::new();
        while let Some(endpoint) = queue.pop_front() {
            if !tried.insert(endpoint.clone()) {
                continue;
            }
            let channel = match tokio::time::timeout(
                self.timeout,
                client::channel(&endpoint, self.tls.clone()),
            )
            .await
            {
                Ok(Ok(ch)) => ch,
                Ok(Err(e @ client::ClientError::InvalidEndpoint { .. })) => return Err(e.into()),
                Ok(Err(e)) => {
                    failures.push(client::error_chain(&e));
                    continue;
                }
                Err(_) => {
                    failures.push(format!("{endpoint}: connect timed out"));
                    continue;
                }
            };
            let client = AdminServiceClient::new(channel);
            match tokio::time::timeout(self.timeout, f(client, self.request(msg.clone()))).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) if status.code() == Code::Unavailable => {
                    failures.push(format!("{endpoint}: {}", status.message()));
                }
                Ok(Err(status)) => return Err(status.into()),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "{endpoint} did not answer within {} s",
                        self.timeout.as_secs()
                    ))
                    .into())
                }
            }
        }
        Err(Status::unavailable(format!("no endpoint answered: {}", failures.join("; "))).into())
    }

    /// ClusterStatus from one endpoint, or why not.
    async fn status_of(&self, endpoint: &str) -> Result<ClusterStatusResponse, String> {
        let fut = async {
            let channel = client::channel(endpoint, self.tls.clone())
                .await
                .map_err(|e| client::error_chain(&e))?;
            AdminServiceClient::new(channel)
                .cluster_status(self.request(ClusterStatusRequest {}))
                .await
                .map(Response::into_inner)
                .map_err(|s| status_text(&s))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} s", self.timeout.as_secs())),
        }
    }
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

async fn cluster(ctl: &Ctl, cmd: ClusterCmd) -> Result<()> {
    let members = match cmd {
        ClusterCmd::Status => return cluster_status(ctl).await,
        ClusterCmd::AddMember {
            id,
            address,
            learner,
        } => {
            let msg = AddMemberRequest {
                id,
                address,
                learner,
            };
            ctl.call(msg, |mut c, r| async move { c.add_member(r).await })
                .await?
                .members
        }
        ClusterCmd::RemoveMember { id } => {
            ctl.call(RemoveMemberRequest { id }, |mut c, r| async move {
                c.remove_member(r).await
            })
            .await?
            .members
        }
        ClusterCmd::TransferLeader { id } => {
            let resp = ctl
                .call(TransferLeaderRequest { id }, |mut c, r| async move {
                    c.transfer_leader(r).await
                })
                .await?;
            return match ctl.output {
                Output::Json => print_json(&json!({ "leader_id": resp.leader_id })),
                Output::Table => {
                    println!("leader is now node {}", resp.leader_id);
                    Ok(())
                }
            };
        }
    };
    match ctl.output {
        Output::Json => print_json(&json!({ "members": members_json(&members) })),
        Output::Table => {
            print_table(&mut members_table(&members, 0));
            Ok(())
        }
    }
}

async fn cluster_status(ctl: &Ctl) -> Result<()> {
    let results = futures::future::join_all(
        ctl.endpoints
            .iter()
            .map(|ep| async move { (ep.clone(), ctl.status_of(ep).await) }),
    )
    .await;
    let answers: Vec<&ClusterStatusResponse> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    // The cluster's view: the newest term any node reports, and the leader known
    // in it; members from the leader (only it knows replication progress), else
    // from the first node that answered.
    let term = answers.iter().map(|s| s.term).max().unwrap_or(0);
    let leader_id = answers
        .iter()
        .filter(|s| s.term == term && s.leader_id != 0)
        .map(|s| s.leader_id)
        .next()
        .unwrap_or(0);
    let members: &[Member] = answers
        .iter()
        .find(|s| s.role == "leader" && s.term == term)
        .or(answers.first())
        .map(|s| s.members.as_slice())
        .unwrap_or(&[]);

    match ctl.output {
        Output::Json => {
            let nodes: Vec<Value> = results
                .iter()
                .map(|(ep, r)| match r {
                    Ok(s) => json!({
                        "endpoint": ep,
                        "reachable": true,
                        "node_id": s.node_id,
                        "role": s.role,
                        "removed": s.removed,
                        "term": s.term,
                        "leader_id": s.leader_id,
                        "applied_index": s.applied_index,
                        "commit_index": s.commit_index,
                        "first_index": s.first_index,
                        "last_index": s.last_index,
                        "snapshot_index": s.snapshot_index,
                        "revision": s.revision,
                        "version": s.version,
                        "raft_messages_received": s.raft_messages_received,
                    }),
                    Err(e) => json!({ "endpoint": ep, "reachable": false, "error": e }),
                })
                .collect();
            print_json(&json!({
                "nodes": nodes,
                "members": members_json(members),
                "leader_id": leader_id,
                "term": term,
            }))?;
        }
        Output::Table => {
            let mut table = new_table(&[
                "ENDPOINT", "NODE", "ROLE", "TERM", "LEADER", "APPLIED", "COMMIT", "REVISION",
            ]);
            for (ep, r) in &results {
                match r {
                    Ok(s) => table.add_row(vec![
                        ep.clone(),
                        s.node_id.to_string(),
                        if s.removed {
                            "removed".to_string()
                        } else {
                            s.role.clone()
                        },
                        s.term.to_string(),
                        s.leader_id.to_string(),
                        s.applied_index.to_string(),
                        s.commit_index.to_string(),
                        s.revision.to_string(),
                    ]),
                    Err(_) => {
                        let mut row = vec![ep.clone(), "-".into(), "unreachable".into()];
                        row.resize(8, "-".into());
                        table.add_row(row)
                    }
                };
            }
            print_table(&mut table);
            for (ep, r) in &results {
                if let Err(e) = r {
                    println!("{ep}: unreachable: {e}");
                }
            }
            if !members.is_empty() {
                println!();
                print_table(&mut members_table(members, leader_id));
            }
        }
    }
    if answers.is_empty() {
        return Err(Status::unavailable("no endpoint answered").into());
    }
    Ok(())
}

async fn put(ctl: &Ctl, record: Record) -> Result<()> {
    let noun = Noun::of(&record).map(Noun::word).unwrap_or("object");
    let name = record_name(&record).to_string();
    let msg = PutRequest {
        object: Some(Object {
            record: Some(record),
        }),
    };
    let resp = ctl
        .call(msg, |mut c, r| async move { c.put(r).await })
        .await?;
    let outcome = outcome_word(resp.outcome);
    match ctl.output {
        Output::Json => print_json(&json!({
            "kind": noun,
            "name": name,
            "outcome": outcome,
            "revision": resp.revision,
            "object": resp.object.and_then(|o| o.record).as_ref().map(record_json),
        })),
        Output::Table => {
            println!(
                "{noun} {name} {} (revision {})",
                outcome.replace('_', " "),
                resp.revision
            );
            Ok(())
        }
    }
}

fn consistency(serializable: bool) -> i32 {
    if serializable {
        Consistency::Serializable as i32
    } else {
        Consistency::Linearizable as i32
    }
}

async fn common(ctl: &Ctl, noun: Noun, cmd: CommonCmd) -> Result<()> {
    let kind = noun.kind() as i32;
    match cmd {
        CommonCmd::Get { name, serializable } => {
            let msg = GetRequest {
                kind,
                name: name.clone(),
                consistency: consistency(serializable),
            };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.get(r).await })
                .await?;
            let record = resp
                .object
                .and_then(|o| o.record)
                .ok_or_else(|| Status::not_found(format!("{} {name} not found", noun.word())))?;
            // A host's recent boot timeline comes with it.
            let timeline = match &record {
                Record::Host(h) => Some(host_timeline(ctl, &h.mac).await?),
                _ => None,
            };
            match ctl.output {
                Output::Json => {
                    let mut v = record_json(&record);
                    if let (Some(events), Value::Object(map)) = (&timeline, &mut v) {
                        map.insert(
                            "events".into(),
                            Value::Array(events.iter().map(event_json).collect()),
                        );
                    }
                    print_json(&v)?
                }
                Output::Table => {
                    let mut table = new_table(&["FIELD", "VALUE"]);
                    for (k, v) in record_details(&record) {
                        table.add_row(vec![k.to_string(), v]);
                    }
                    print_table(&mut table);
                    if let Some(events) = timeline.filter(|e| !e.is_empty()) {
                        println!();
                        print_table(&mut events_table(&events));
                    }
                }
            }
        }
        CommonCmd::List { rack, serializable } => {
            let msg = ListRequest {
                kind,
                rack: rack.unwrap_or_default(),
                consistency: consistency(serializable),
            };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.list(r).await })
                .await?;
            let records: Vec<Record> = resp.objects.into_iter().filter_map(|o| o.record).collect();
            match ctl.output {
                Output::Json => print_json(&json!({
                    "items": records.iter().map(record_json).collect::<Vec<_>>(),
                    "revision": resp.revision,
                }))?,
                Output::Table => {
                    let mut table = new_table(noun.headers());
                    for r in &records {
                        table.add_row(record_row(r));
                    }
                    print_table(&mut table);
                }
            }
        }
        CommonCmd::Delete { name } => {
            let msg = DeleteRequest {
                kind,
                name: name.clone(),
            };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.delete(r).await })
                .await?;
            let outcome = outcome_word(resp.outcome);
            match ctl.output {
                Output::Json => print_json(&json!({
                    "kind": noun.word(),
                    "name": name,
                    "outcome": outcome,
                    "revision": resp.revision,
                }))?,
                Output::Table => println!(
                    "{} {name} {} (revision {})",
                    noun.word(),
                    outcome.replace('_', " "),
                    resp.revision
                ),
            }
        }
    }
    Ok(())
}

async fn host_import(ctl: &Ctl, file: &str, dry_run: bool) -> Result<()> {
    let content = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
    };
    let hosts = import::parse_hosts(file, &content).with_context(|| file.to_string())?;
    let msg = ApplyRequest {
        objects: hosts
            .into_iter()
            .map(|h| Object {
                record: Some(Record::Host(h)),
            })
            .collect(),
        dry_run,
    };
    let resp = ctl
        .call(msg, |mut c, r| async move { c.apply(r).await })
        .await?;
    let count = |o: Outcome| {
        resp.results
            .iter()
            .filter(|r| r.outcome == o as i32)
            .count()
    };
    let (created, updated, unchanged) = (
        count(Outcome::Created),
        count(Outcome::Updated),
        count(Outcome::Unchanged),
    );
    match ctl.output {
        Output::Json => {
            let results: Vec<Value> = resp
                .results
                .iter()
                .map(|r| {
                    json!({
                        "kind": kind_word(r.kind),
                        "name": r.name,
                        "outcome": outcome_word(r.outcome),
                    })
                })
                .collect();
            print_json(&json!({
                "results": results,
                "created": created,
                "updated": updated,
                "unchanged": unchanged,
                "revision": resp.revision,
                "dry_run": dry_run,
            }))
        }
        Output::Table => {
            for r in &resp.results {
                println!(
                    "{} {} {}",
                    kind_word(r.kind),
                    r.name,
                    outcome_word(r.outcome).replace('_', " ")
                );
            }
            let summary = format!(
                "{} hosts: {created} created, {updated} updated, {unchanged} unchanged (revision {})",
                resp.results.len(),
                resp.revision
            );
            if dry_run {
                println!("dry run, nothing changed: would import {summary}");
            } else {
                println!("imported {summary}");
            }
            Ok(())
        }
    }
}

fn read_password(file: Option<&Path>, env: Option<&str>) -> Result<Option<String>> {
    let password = match (file, env) {
        (Some(path), _) => {
            let s = std::fs::read_to_string(path)
                .with_context(|| format!("reading BMC password file {}", path.display()))?;
            s.lines().next().unwrap_or("").to_string()
        }
        (None, Some(var)) => std::env::var(var)
            .with_context(|| format!("reading BMC password from environment variable {var}"))?,
        (None, None) => return Ok(None),
    };
    if password.is_empty() {
        bail!("the BMC password is empty");
    }
    Ok(Some(password))
}

impl RackPut {
    fn into_record(self) -> Record {
        Record::Rack(Rack {
            name: self.name,
            description: self.description.unwrap_or_default(),
            oob_networks: self.oob,
            labels: labels_map(self.labels),
            ..Default::default()
        })
    }
}

impl NetworkPut {
    fn into_record(self) -> Record {
        let (pool_start, pool_end) = self.pool.unwrap_or_default();
        Record::Network(Network {
            name: self.name,
            rack: self.rack,
            subnet: self.subnet,
            gateway: self.gateway.map(|g| g.to_string()).unwrap_or_default(),
            dns: self.dns.iter().map(ToString::to_string).collect(),
            domain: self.domain.unwrap_or_default(),
            mtu: self.mtu.unwrap_or(0),
            vlan: self.vlan.unwrap_or(0),
            pool_start,
            pool_end,
            lease_seconds: self.lease_seconds.unwrap_or(0),
            interface: self.interface.unwrap_or_default(),
            ..Default::default()
        })
    }
}

impl HostPut {
    fn into_record(self) -> Result<Record> {
        let password = read_password(
            self.bmc_password_file.as_deref(),
            self.bmc_password_env.as_deref(),
        )?;
        let bmc = if self.bmc_address.is_some()
            || self.bmc_port.is_some()
            || self.bmc_user.is_some()
            || password.is_some()
            || self.cipher_suite.is_some()
        {
            Some(Bmc {
                address: self.bmc_address.unwrap_or_default(),
                port: self.bmc_port.map(u32::from).unwrap_or(0),
                username: self.bmc_user.unwrap_or_default(),
                password: password.unwrap_or_default(),
                password_set: false,
                cipher_suite: self.cipher_suite.unwrap_or(0),
            })
        } else {
            None
        };
        Ok(Record::Host(Host {
            name: self.name,
            mac: self.mac,
            ip: self.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            hostname: self.hostname.unwrap_or_default(),
            rack: self.rack,
            network: self.network.unwrap_or_default(),
            profile: self.profile.unwrap_or_default(),
            labels: labels_map(self.labels),
            bmc,
            ..Default::default()
        }))
    }
}

impl ProfilePut {
    fn into_record(self) -> Record {
        Record::Profile(BootProfile {
            name: self.name,
            description: self.description.unwrap_or_default(),
            kind: self.kind,
            image: self.image.unwrap_or_default(),
            kernel: self.kernel.unwrap_or_default(),
            initrds: self.initrds,
            cmdline: self.cmdline.unwrap_or_default(),
            kickstart_url: self.kickstart_url.unwrap_or_default(),
            ..Default::default()
        })
    }
}

async fn run(cli: Cli) -> Result<()> {
    let Cli { global: g, cmd } = cli;
    let endpoints: Vec<String> = g
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        bail!("no endpoints given (--endpoints or PXEMESH_ENDPOINTS)");
    }
    let paths = TlsPaths::in_dir(&g.tls_dir, &g.cert_stem);
    let tls = Tls::load(paths).map_err(|e| {
        anyhow!(
            "loading TLS material ({}/ca.pem, {stem}.pem, {stem}-key.pem): {e}",
            g.tls_dir.display(),
            stem = g.cert_stem
        )
    })?;
    let ctl = Ctl {
        endpoints,
        tls,
        timeout: Duration::from_secs(g.timeout),
        output: g.output,
    };
    match cmd {
        Cmd::Cluster(cmd) => cluster(&ctl, cmd).await,
        Cmd::Rack(RackCmd::Put(p)) => put(&ctl, (*p).into_record()).await,
        Cmd::Rack(RackCmd::Common(c)) => common(&ctl, Noun::Rack, c).await,
        Cmd::Network(NetworkCmd::Put(p)) => put(&ctl, (*p).into_record()).await,
        Cmd::Network(NetworkCmd::Common(c)) => common(&ctl, Noun::Network, c).await,
        Cmd::Host(HostCmd::Put(p)) => put(&ctl, (*p).into_record()?).await,
        Cmd::Host(HostCmd::Import { file, dry_run }) => host_import(&ctl, &file, dry_run).await,
        Cmd::Host(HostCmd::Common(c)) => common(&ctl, Noun::Host, c).await,
        Cmd::Profile(ProfileCmd::Put(p)) => put(&ctl, (*p).into_record()).await,
        Cmd::Profile(ProfileCmd::Common(c)) => common(&ctl, Noun::Profile, c).await,
        Cmd::Relay(RelayCmd::List {
            stale_after,
            offline_after,
        }) => relay_list(&ctl, stale_after, offline_after).await,
        Cmd::Events(EventsCmd::List { mac, after, limit }) => {
            let msg = ListEventsRequest {
                mac: mac.unwrap_or_default(),
                after_id: after,
                limit,
                consistency: 0,
            };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.list_events(r).await })
                .await?;
            print_events(&ctl, &resp.events)
        }
        Cmd::Events(EventsCmd::Watch { mac, after, count }) => {
            events_watch(&ctl, mac, after, count).await
        }
        Cmd::Power(a) => jobs::power(&ctl, a).await,
        Cmd::Bootdev(a) => jobs::bootdev(&ctl, a).await,
        Cmd::Job(c) => jobs::job(&ctl, c).await,
        Cmd::Image(cmd) => image(&ctl, cmd).await,
        Cmd::Cloudstack(cmd) => cloudstack::cloudstack(&ctl, cmd).await,
        Cmd::Host(HostCmd::Find { bmc }) => cloudstack::host_find_bmc(&ctl, &bmc).await,
    }
}

async fn image(ctl: &Ctl, cmd: ImageCmd) -> Result<()> {
    use pxemesh_coordinator::imagepush;
    match cmd {
        ImageCmd::Push { path, name } => {
            // Blobs and manifest go to one coordinator: the first reachable.
            let mut failures = Vec::new();
            let mut chosen = None;
            for endpoint in &ctl.endpoints {
                match tokio::time::timeout(ctl.timeout, client::channel(endpoint, ctl.tls.clone()))
                    .await
                {
                    Ok(Ok(ch)) => {
                        chosen = Some((endpoint.clone(), ch));
                        break;
                    }
                    Ok(Err(e)) => failures.push(client::error_chain(&e)),
                    Err(_) => failures.push(format!("{endpoint}: timed out")),
                }
            }
            let Some((endpoint, ch)) = chosen else {
                bail!("no coordinator reachable: {}", failures.join("; "));
            };
            let mut c = AdminServiceClient::new(ch);
            let t = std::time::Instant::now();
            let (resp, uploaded) = imagepush::push_image(&mut c, &path, &name)
                .await
                .map_err(|e| anyhow!("pushing {} to {endpoint}: {e}", path.display()))?;
            let files = match resp.object.as_ref().and_then(|o| o.record.as_ref()) {
                Some(Record::Image(m)) => m.files.len(),
                _ => 0,
            };
            match ctl.output {
                Output::Json => print_json(&json!({
                    "kind": "image",
                    "name": name,
                    "outcome": outcome_word(resp.outcome),
                    "files": files,
                    "uploaded_bytes": uploaded,
                    "revision": resp.revision,
                }))?,
                Output::Table => println!(
                    "image {name} {} ({files} files, {uploaded} bytes uploaded in {:.1} s, revision {})",
                    outcome_word(resp.outcome).replace('_', " "),
                    t.elapsed().as_secs_f64(),
                    resp.revision
                ),
            }
        }
        ImageCmd::Import {
            urls,
            name,
            path,
            import_timeout,
        } => {
            if path.is_some() && urls.len() != 1 {
                bail!("--path names the file of a single URL; give one URL or leave --path out");
            }
            let files: Vec<_> = urls
                .iter()
                .map(|u| pxemesh_proto::v1::ImportFile {
                    url: u.clone(),
                    path: path.clone().unwrap_or_default(),
                    mode: 0,
                })
                .collect();
            let mut failures = Vec::new();
            let mut answer = None;
            for endpoint in &ctl.endpoints {
                let ch = match tokio::time::timeout(
                    ctl.timeout,
                    client::channel(endpoint, ctl.tls.clone()),
                )
                .await
                {
                    Ok(Ok(ch)) => ch,
                    Ok(Err(e)) => {
                        failures.push(client::error_chain(&e));
                        continue;
                    }
                    Err(_) => {
                        failures.push(format!("{endpoint}: timed out"));
                        continue;
                    }
                };
                let mut req = tonic::Request::new(pxemesh_proto::v1::ImportImageRequest {
                    name: name.clone(),
                    files: files.clone(),
                });
                req.set_timeout(std::time::Duration::from_secs(import_timeout));
                // The coordinator that downloads also commits: no retry on
                // another endpoint once one answered (the error is final).
                let r = AdminServiceClient::new(ch).import_image(req).await;
                answer = Some(r.map_err(|s| {
                    anyhow!("importing into {name} via {endpoint}: {}", s.message())
                })?);
                break;
            }
            let Some(resp) = answer else {
                bail!("no coordinator reachable: {}", failures.join("; "));
            };
            let resp = resp.into_inner();
            let n = resp.image.as_ref().map(|m| m.files.len()).unwrap_or(0);
            match ctl.output {
                Output::Json => print_json(&json!({
                    "kind": "image",
                    "name": name,
                    "outcome": outcome_word(resp.outcome),
                    "files": resp.image.as_ref().map(|m| m.files.iter().map(|f| json!({
                        "path": f.path, "digest": f.digest, "size": f.size,
                    })).collect::<Vec<_>>()),
                    "downloaded_bytes": resp.bytes_downloaded,
                    "revision": resp.revision,
                }))?,
                Output::Table => println!(
                    "image {name} {} ({n} files, {} bytes downloaded by the coordinator, revision {})",
                    outcome_word(resp.outcome).replace('_', " "),
                    resp.bytes_downloaded,
                    resp.revision
                ),
            }
        }
        ImageCmd::List => {
            let msg = ListRequest {
                kind: Kind::Image as i32,
                rack: String::new(),
                consistency: 0,
            };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.list(r).await })
                .await?;
            let images: Vec<_> = resp
                .objects
                .iter()
                .filter_map(|o| match &o.record {
                    Some(Record::Image(m)) => Some(m),
                    _ => None,
                })
                .collect();
            match ctl.output {
                Output::Json => print_json(&json!(images
                    .iter()
                    .map(|m| json!({
                        "name": m.name,
                        "files": m.files.iter().map(|f| json!({
                            "path": f.path, "digest": f.digest, "size": f.size, "mode": f.mode,
                        })).collect::<Vec<_>>(),
                        "revision": m.revision,
                    }))
                    .collect::<Vec<_>>()))?,
                Output::Table => {
                    let mut t = new_table(&["NAME", "FILES", "BYTES", "REVISION"]);
                    for m in images {
                        t.add_row(vec![
                            m.name.clone(),
                            m.files.len().to_string(),
                            m.files.iter().map(|f| f.size).sum::<u64>().to_string(),
                            m.revision.to_string(),
                        ]);
                    }
                    print_table(&mut t);
                }
            }
        }
        ImageCmd::Delete { name } => {
            let msg = DeleteRequest {
                kind: Kind::Image as i32,
                name: name.clone(),
            };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.delete(r).await })
                .await?;
            let outcome = outcome_word(resp.outcome);
            match ctl.output {
                Output::Json => print_json(&json!({
                    "kind": "image", "name": name, "outcome": outcome, "revision": resp.revision,
                }))?,
                Output::Table => println!(
                    "image {name} {} (revision {})",
                    outcome.replace('_', " "),
                    resp.revision
                ),
            }
        }
    }
    Ok(())
}

/// "NotFound" → "not_found".
fn code_word(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn status_text(status: &Status) -> String {
    if status.message().is_empty() {
        code_word(status.code())
    } else {
        format!("{}: {}", code_word(status.code()), status.message())
    }
}

fn error_text(err: &anyhow::Error) -> String {
    match err.downcast_ref::<Status>() {
        Some(status) => status_text(status),
        None => format!("{err:#}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn words() {
        assert_eq!(code_word(Code::NotFound), "not_found");
        assert_eq!(code_word(Code::Unavailable), "unavailable");
        assert_eq!(outcome_word(Outcome::NotFound as i32), "not_found");
        assert_eq!(kind_word(Kind::Profile as i32), "profile");
    }

    #[test]
    fn host_password_never_from_argv() {
        let cli = Cli::try_parse_from([
            "pxemeshctl",
            "host",
            "put",
            "h1",
            "--mac",
            "aa:bb:cc:dd:ee:01",
            "--ip",
            "10.0.0.1",
            "--rack",
            "r1",
            "--network",
            "n1",
            "--bmc-password",
            "x",
        ]);
        assert!(cli.is_err());
    }

    #[test]
    fn parsers() {
        assert!(parse_cidr("10.0.0.0/24").is_ok());
        assert!(parse_cidr("10.0.0.0").is_err());
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_label("=x").is_err());
        assert_eq!(
            parse_pool("10.0.0.100-10.0.0.200").unwrap(),
            ("10.0.0.100".into(), "10.0.0.200".into())
        );
        assert!(parse_pool("10.0.0.100").is_err());
        assert!(parse_cipher_suite("3").is_ok());
        assert!(parse_cipher_suite("1").is_err());
    }
}
