//! The replicated state machine: a revisioned record store on the shared sled tree.
//!
//! Every applied command that changes anything bumps the global revision by one;
//! each record remembers the revision that created it and the one that last
//! changed it. A command is validated against the current state plus the earlier
//! parts of the same command, then written as one atomic sled batch together with
//! the applied index, so a crash never leaves half a command or an applied index
//! that disagrees with the data.
//!
//! Key layout (all under `s:`, which is exactly what a snapshot carries):
//! - `s:rec:<kind>:<name>`        record (JSON)
//! - `s:idx:mac:<mac>`            host name owning a MAC
//! - `s:idx:ip:<network>:<ip>`    host name owning an IP in a network
//! - `s:meta:revision`            global revision (u64 BE)
//! - `s:meta:applied`             applied raft index and term
//! - `s:peer:<id>`                coordinator peer address
//! - `s:fence:<writer>`           fencing epoch of a leader-run writer (u64 BE)

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{CoordError, StateError};
use crate::model::{Host, Kind, Network, Record};
use crate::storage::{decode_pair, encode_pair, KEY_APPLIED, KEY_CS};

const KEY_REVISION: &[u8] = b"s:meta:revision";
const CHANGE_PREFIX: &[u8] = b"s:chg:";
/// Revisions of change history kept for watchers to resume from; older
/// resume points get a fresh snapshot instead.
pub const CHANGELOG_RETAIN: u64 = 10_000;

fn change_key(revision: u64) -> Vec<u8> {
    let mut k = CHANGE_PREFIX.to_vec();
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOp {
    Put,
    Delete,
}

/// One record changed at one revision: what watchers replay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    pub kind: Kind,
    pub name: String,
    pub op: ChangeOp,
    /// The record as stored (puts only).
    pub record: Option<Record>,
    /// The rack the record belonged to before this change, when that differs
    /// from its rack afterwards (a move, or a delete): watchers of the old rack
    /// must see it go.
    pub old_rack: Option<String>,
}
const PEER_PREFIX: &str = "s:peer:";

pub(crate) fn rec_key(kind: Kind, name: &str) -> Vec<u8> {
    format!("s:rec:{}:{}", kind.as_str(), name).into_bytes()
}

fn rec_prefix(kind: Kind) -> Vec<u8> {
    format!("s:rec:{}:", kind.as_str()).into_bytes()
}

fn mac_key(host: &Host) -> Vec<u8> {
    format!("s:idx:mac:{}", host.mac).into_bytes()
}

fn ip_key(network: &str, ip: std::net::Ipv4Addr) -> Vec<u8> {
    format!("s:idx:ip:{network}:{ip}").into_bytes()
}

fn fence_key(writer: &str) -> Vec<u8> {
    format!("s:fence:{writer}").into_bytes()
}

/// A fenced writer's `epoch` is not below the one it last claimed.
fn check_epoch(txn: &Txn, writer: &str, epoch: u64) -> Result<(), CoordError> {
    let current = read_u64(txn.get(&fence_key(writer))?)?;
    if epoch < current {
        return Err(StateError::Fenced {
            writer: writer.to_string(),
            epoch,
            current,
        }
        .into());
    }
    Ok(())
}

fn peer_key(id: u64) -> Vec<u8> {
    format!("{PEER_PREFIX}{id:020}").into_bytes()
}

/// A command carried in a Raft entry (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Create or update these records atomically: all or none.
    Put(Vec<Record>),
    Delete {
        kind: Kind,
        name: String,
    },
    /// Boot events reported by one relay; events at or below the relay's
    /// acknowledged sequence are duplicates of an earlier delivery and dropped.
    BootEvents {
        rack: String,
        relay: String,
        events: Vec<EventIn>,
    },
    /// Power and boot-device jobs (`jobs.rs`).
    Jobs(crate::jobs::JobCommand),
    /// A leader-run writer (the CloudStack bridge) starts a stint: its
    /// fencing epoch (the Raft term it leads in) becomes the stored one.
    /// Refused (`StateError::Fenced`) when a higher epoch is already stored.
    ClaimEpoch {
        writer: String,
        epoch: u64,
    },
    /// A command of a fenced writer: applied only while `epoch` is not below
    /// the writer's stored epoch, checked here at apply time on every node,
    /// so a deposed stint cannot get a write through after a newer one
    /// claimed its epoch.
    Fenced {
        writer: String,
        epoch: u64,
        command: Box<Command>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
    Deleted,
    NotFound,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::Deleted => "deleted",
            Outcome::NotFound => "not-found",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub kind: Kind,
    pub name: String,
    pub outcome: Outcome,
}

/// What applying a command did; travels back to the proposer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApplyOutcome {
    /// Cluster revision after the command.
    pub revision: u64,
    pub results: Vec<ItemResult>,
    /// Records as stored (for Put responses).
    pub records: Vec<Record>,
    /// BootEvents: the relay's highest sequence now stored.
    #[serde(default)]
    pub acked_sequence: u64,
}

/// A boot event as a relay reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventIn {
    pub mac: String,
    pub kind: String,
    pub detail: String,
    pub unix_ms: u64,
    pub sequence: u64,
}

/// A boot event as the coordinators keep it. Events are history, not desired
/// state: storing them does not bump the revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: u64,
    pub mac: String,
    pub host: String,
    pub rack: String,
    pub relay: String,
    pub kind: String,
    pub detail: String,
    pub unix_ms: u64,
}

/// Events kept cluster-wide; older ones are dropped as new ones arrive.
pub const EVENTS_RETAIN: u64 = 100_000;
const EVT_NEXT: &[u8] = b"s:evt:next";
const EVT_ID_PREFIX: &[u8] = b"s:evt:id:";

fn evt_id_key(id: u64) -> Vec<u8> {
    let mut k = EVT_ID_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn evt_mac_prefix(mac: &str) -> Vec<u8> {
    format!("s:evt:mac:{mac}:").into_bytes()
}

fn evt_mac_key(mac: &str, id: u64) -> Vec<u8> {
    let mut k = evt_mac_prefix(mac);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn evt_ack_key(rack: &str, relay: &str) -> Vec<u8> {
    format!("s:evt:ack:{rack}/{relay}").into_bytes()
}

pub(crate) fn read_counter(v: Option<Vec<u8>>) -> Result<u64, CoordError> {
    read_u64(v)
}

fn read_u64(v: Option<Vec<u8>>) -> Result<u64, CoordError> {
    match v {
        Some(v) => Ok(u64::from_be_bytes(
            v.as_slice()
                .try_into()
                .map_err(|_| CoordError::Corrupt("counter".into()))?,
        )),
        None => Ok(0),
    }
}

/// Pending writes of one command over the tree (read-your-writes within the command).
type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Effects of applied entries not yet written to sled: everything one ready
/// cycle applies goes to disk as a single atomic batch.
#[derive(Default)]
pub struct Pending {
    writes: Overlay,
}

pub(crate) struct Txn<'a> {
    tree: &'a sled::Tree,
    /// Earlier commands of the same batch, visible to this one.
    parent: Option<&'a Overlay>,
    writes: Overlay,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(tree: &'a sled::Tree) -> Self {
        Txn {
            tree,
            parent: None,
            writes: BTreeMap::new(),
        }
    }

    fn over(tree: &'a sled::Tree, parent: &'a Overlay) -> Self {
        Txn {
            tree,
            parent: Some(parent),
            writes: BTreeMap::new(),
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, CoordError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.parent.and_then(|p| p.get(key)) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub(crate) fn del(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    pub(crate) fn scan(&self, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, CoordError> {
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.insert(k.to_vec(), v.to_vec());
        }
        for layer in self.parent.into_iter().chain(std::iter::once(&self.writes)) {
            for (k, v) in layer.range(prefix.to_vec()..) {
                if !k.starts_with(prefix) {
                    break;
                }
                match v {
                    Some(v) => out.insert(k.clone(), v.clone()),
                    None => out.remove(k),
                };
            }
        }
        Ok(out)
    }

    pub(crate) fn record(&self, kind: Kind, name: &str) -> Result<Option<Record>, CoordError> {
        match self.get(&rec_key(kind, name))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    fn records(&self, kind: Kind) -> Result<Vec<Record>, CoordError> {
        self.scan(&rec_prefix(kind))?
            .values()
            .map(|v| serde_json::from_slice(v).map_err(CoordError::from))
            .collect()
    }

    pub(crate) fn put_record(&mut self, rec: &Record) -> Result<(), CoordError> {
        self.put(rec_key(rec.kind(), rec.name()), serde_json::to_vec(rec)?);
        Ok(())
    }

    fn into_batch(self) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch
    }
}

fn exists(txn: &Txn, kind: Kind, name: &str) -> Result<bool, CoordError> {
    Ok(txn.get(&rec_key(kind, name))?.is_some())
}

fn require(txn: &Txn, kind: Kind, name: &str, by: &str) -> Result<(), CoordError> {
    if exists(txn, kind, name)? {
        Ok(())
    } else {
        Err(StateError::Invalid(format!("{by}: unknown {kind} {name:?}")).into())
    }
}

fn network_of(txn: &Txn, name: &str) -> Result<Option<Network>, CoordError> {
    Ok(match txn.record(Kind::Network, name)? {
        Some(Record::Network(n)) => Some(n),
        _ => None,
    })
}

fn hosts_in_network(txn: &Txn, network: &str) -> Result<Vec<String>, CoordError> {
    let prefix = format!("s:idx:ip:{network}:").into_bytes();
    Ok(txn
        .scan(&prefix)?
        .values()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect())
}

/// Referential and uniqueness checks that need the current state; syntax was
/// checked at the edge.
fn check_put(txn: &mut Txn, rec: &Record, old: Option<&Record>) -> Result<(), CoordError> {
    match rec {
        Record::Rack(_) | Record::Image(_) => Ok(()),
        Record::Profile(_) => Ok(()),
        Record::Job(j) => require(txn, Kind::Host, &j.host, &format!("job {}", j.id)),
        Record::Relay(r) => require(txn, Kind::Rack, &r.rack, &format!("relay {}", r.name)),
        Record::Network(n) => {
            require(txn, Kind::Rack, &n.rack, &format!("network {}", n.name))?;
            // A relay picks the network of a request by address; overlapping
            // subnets in one rack would make that ambiguous.
            for other in txn.records(Kind::Network)? {
                if let Record::Network(o) = other {
                    if o.name != n.name
                        && o.rack == n.rack
                        && (o.subnet.contains(&n.subnet.network())
                            || n.subnet.contains(&o.subnet.network()))
                    {
                        return Err(StateError::Conflict(format!(
                            "network {} ({}) overlaps network {} ({}) in rack {}",
                            n.name, n.subnet, o.name, o.subnet, n.rack
                        ))
                        .into());
                    }
                }
            }
            if let Some(Record::Network(prev)) = old {
                let hosts = hosts_in_network(txn, &n.name)?;
                if prev.rack != n.rack && !hosts.is_empty() {
                    return Err(StateError::InUse(format!(
                        "network {} has {} host(s) in rack {}; move or delete them before changing its rack",
                        n.name,
                        hosts.len(),
                        prev.rack
                    ))
                    .into());
                }
                if prev.subnet != n.subnet {
                    for h in hosts {
                        if let Some(Record::Host(host)) = txn.record(Kind::Host, &h)? {
                            if let Some(ip) = host.ip.filter(|ip| !n.subnet.contains(ip)) {
                                return Err(StateError::InUse(format!(
                                    "network {}: new subnet {} would leave host {} ({ip}) outside it",
                                    n.name, n.subnet, host.name
                                ))
                                .into());
                            }
                        }
                    }
                }
            }
            Ok(())
        }
        Record::Host(h) => check_host(txn, h, old),
    }
}

fn check_host(txn: &mut Txn, h: &Host, old: Option<&Record>) -> Result<(), CoordError> {
    let ctx = format!("host {}", h.name);
    require(txn, Kind::Rack, &h.rack, &ctx)?;
    match h.reservation() {
        Some((ip, network)) => check_reservation(txn, h, ip, network, &ctx)?,
        None if h.ip.is_some() || !h.network.is_empty() => {
            return Err(StateError::Invalid(format!(
                "{ctx}: ip and network are set together (both, or neither for a host without a reservation)"
            ))
            .into());
        }
        None if h.profile.is_some() => {
            return Err(StateError::Invalid(format!(
                "{ctx}: a boot profile needs a reservation (ip and network)"
            ))
            .into());
        }
        None => {}
    }
    if let Some(p) = &h.profile {
        require(txn, Kind::Profile, p, &ctx)?;
    }
    if let Some(owner) = txn.get(&mac_key(h))? {
        let owner = String::from_utf8_lossy(&owner).into_owned();
        if owner != h.name {
            return Err(StateError::Conflict(format!(
                "duplicate MAC {}: already used by host {owner}",
                h.mac
            ))
            .into());
        }
    }
    if let Some((ip, network)) = h.reservation() {
        if let Some(owner) = txn.get(&ip_key(network, ip))? {
            let owner = String::from_utf8_lossy(&owner).into_owned();
            if owner != h.name {
                return Err(StateError::Conflict(format!(
                    "duplicate IP {ip} in network {network}: already used by host {owner}"
                ))
                .into());
            }
        }
    }
    if let Some(Record::Host(prev)) = old {
        txn.del(mac_key(prev));
        if let Some((ip, network)) = prev.reservation() {
            txn.del(ip_key(network, ip));
        }
    }
    txn.put(mac_key(h), h.name.clone().into_bytes());
    if let Some((ip, network)) = h.reservation() {
        txn.put(ip_key(network, ip), h.name.clone().into_bytes());
    }
    Ok(())
}

/// A host's reservation: the network exists in the host's rack and the
/// address is a usable one of its subnet.
fn check_reservation(
    txn: &Txn,
    h: &Host,
    ip: std::net::Ipv4Addr,
    network: &str,
    ctx: &str,
) -> Result<(), CoordError> {
    let Some(net) = network_of(txn, network)? else {
        return Err(StateError::Invalid(format!("{ctx}: unknown network {network:?}")).into());
    };
    if net.rack != h.rack {
        return Err(StateError::Invalid(format!(
            "{ctx}: network {} belongs to rack {}, not {}",
            net.name, net.rack, h.rack
        ))
        .into());
    }
    if !net.subnet.contains(&ip) {
        return Err(StateError::Invalid(format!(
            "{ctx}: IP {ip} is outside network {} ({})",
            net.name, net.subnet
        ))
        .into());
    }
    if net.subnet.prefix_len() < 31 && (ip == net.subnet.network() || ip == net.subnet.broadcast())
    {
        return Err(StateError::Invalid(format!(
            "{ctx}: IP {ip} is the network or broadcast address of {}",
            net.subnet
        ))
        .into());
    }
    if Some(ip) == net.gateway {
        return Err(StateError::Invalid(format!(
            "{ctx}: IP {ip} is the gateway of network {}",
            net.name
        ))
        .into());
    }
    Ok(())
}

fn check_delete(txn: &mut Txn, old: &Record) -> Result<(), CoordError> {
    match old {
        Record::Rack(r) => {
            for kind in [Kind::Network, Kind::Host, Kind::Relay] {
                if let Some(user) = txn
                    .records(kind)?
                    .into_iter()
                    .find(|x| x.rack() == Some(&r.name))
                {
                    return Err(StateError::InUse(format!(
                        "rack {} is in use by {kind} {}",
                        r.name,
                        user.name()
                    ))
                    .into());
                }
            }
        }
        Record::Network(n) => {
            if let Some(h) = hosts_in_network(txn, &n.name)?.first() {
                return Err(
                    StateError::InUse(format!("network {} is in use by host {h}", n.name)).into(),
                );
            }
        }
        Record::Profile(p) => {
            let user = txn.records(Kind::Host)?.into_iter().find(|x| match x {
                Record::Host(h) => h.profile.as_deref() == Some(p.name.as_str()),
                _ => false,
            });
            if let Some(h) = user {
                return Err(StateError::InUse(format!(
                    "profile {} is in use by host {}",
                    p.name,
                    h.name()
                ))
                .into());
            }
        }
        Record::Host(h) => {
            txn.del(mac_key(h));
            if let Some((ip, network)) = h.reservation() {
                txn.del(ip_key(network, ip));
            }
        }
        Record::Image(_) | Record::Job(_) | Record::Relay(_) => {}
    }
    Ok(())
}

/// Reads of the state machine, usable from any task (sled is concurrent). The
/// Raft actor is the only writer.
#[derive(Clone)]
pub struct State {
    tree: sled::Tree,
}

impl State {
    pub fn new(tree: sled::Tree) -> State {
        State { tree }
    }

    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    pub fn revision(&self) -> Result<u64, CoordError> {
        Ok(match self.tree.get(KEY_REVISION)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| CoordError::Corrupt("revision".into()))?,
            ),
            None => 0,
        })
    }

    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<Record>, CoordError> {
        Txn::new(&self.tree).record(kind, name)
    }

    pub fn list(&self, kind: Kind) -> Result<Vec<Record>, CoordError> {
        Txn::new(&self.tree).records(kind)
    }

    /// The records of `kind` whose stored JSON contains `needle`, decoded.
    /// A cheap pre-filter for scans that want a small subset (a rack's hosts
    /// out of 100 000): only candidates pay for JSON decoding; callers still
    /// check the decoded record, since a match may be a false positive.
    pub fn list_containing(&self, kind: Kind, needle: &[u8]) -> Result<Vec<Record>, CoordError> {
        let finder = memchr::memmem::Finder::new(needle);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(rec_prefix(kind)) {
            let (_, v) = kv?;
            if finder.find(&v).is_some() {
                out.push(serde_json::from_slice(&v)?);
            }
        }
        Ok(out)
    }

    /// Stored boot events with an id above `after`, optionally of one MAC, oldest first.
    pub fn events(
        &self,
        mac: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredEvent>, CoordError> {
        let (prefix, start) = match mac {
            Some(m) => (evt_mac_prefix(m), evt_mac_key(m, after.saturating_add(1))),
            None => (EVT_ID_PREFIX.to_vec(), evt_id_key(after.saturating_add(1))),
        };
        let mut out = Vec::new();
        for kv in self.tree.range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(serde_json::from_slice(&v)?);
        }
        Ok(out)
    }

    /// The fencing epoch a leader-run writer last claimed (0 when never).
    pub fn fence_epoch(&self, writer: &str) -> Result<u64, CoordError> {
        read_u64(self.tree.get(fence_key(writer))?.map(|v| v.to_vec()))
    }

    /// The highest event id stored so far (0 when none).
    pub fn last_event_id(&self) -> Result<u64, CoordError> {
        Ok(read_u64(self.tree.get(EVT_NEXT)?.map(|v| v.to_vec()))?.saturating_sub(1))
    }

    /// The changes made at `revision`, if still retained.
    pub fn changes_at(&self, revision: u64) -> Result<Option<Vec<Change>>, CoordError> {
        match self.tree.get(change_key(revision))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// The oldest revision whose changes are retained (`revision + 1` when none is).
    pub fn changelog_floor(&self) -> Result<u64, CoordError> {
        let end = {
            let mut k = CHANGE_PREFIX.to_vec();
            k.extend_from_slice(&[0xff; 9]);
            k
        };
        match self.tree.range(CHANGE_PREFIX.to_vec()..end).next() {
            Some(kv) => {
                let (k, _) = kv?;
                let raw: [u8; 8] = k[CHANGE_PREFIX.len()..]
                    .try_into()
                    .map_err(|_| CoordError::Corrupt("changelog key".into()))?;
                Ok(u64::from_be_bytes(raw))
            }
            None => Ok(self.revision()? + 1),
        }
    }

    pub fn peers(&self) -> Result<BTreeMap<u64, String>, CoordError> {
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix(PEER_PREFIX.as_bytes()) {
            let (k, v) = kv?;
            let id = std::str::from_utf8(&k[PEER_PREFIX.len()..])
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| CoordError::Corrupt("peer key".into()))?;
            out.insert(id, String::from_utf8_lossy(&v).into_owned());
        }
        Ok(out)
    }

    /// Seed peer addresses at first boot (same on every initial member).
    pub fn seed_peers(&self, peers: &BTreeMap<u64, String>) -> Result<(), CoordError> {
        let mut batch = sled::Batch::default();
        for (id, addr) in peers {
            batch.insert(peer_key(*id), addr.as_bytes());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    fn finish(&self, mut txn: Txn, index: u64, term: u64) -> Result<(), CoordError> {
        txn.put(KEY_APPLIED.to_vec(), encode_pair(index, term).to_vec());
        self.tree.apply_batch(txn.into_batch())?;
        Ok(())
    }

    /// Record that an entry without state changes (leader no-op, rejected
    /// command) was applied.
    pub fn mark_applied(&self, index: u64, term: u64) -> Result<(), CoordError> {
        self.finish(Txn::new(&self.tree), index, term)
    }

    /// A membership change: conf state, peer address map and applied index, atomically.
    pub fn apply_membership(
        &self,
        index: u64,
        term: u64,
        add: Option<(u64, String)>,
        remove: Option<u64>,
        conf_state: &raft::eraftpb::ConfState,
    ) -> Result<(), CoordError> {
        use protobuf::Message as _;
        let mut txn = Txn::new(&self.tree);
        txn.put(KEY_CS.to_vec(), conf_state.write_to_bytes()?);
        if let Some((id, addr)) = add {
            txn.put(peer_key(id), addr.into_bytes());
        }
        if let Some(id) = remove {
            txn.del(peer_key(id));
        }
        self.finish(txn, index, term)
    }

    pub fn applied(&self) -> Result<(u64, u64), CoordError> {
        match self.tree.get(KEY_APPLIED)? {
            Some(v) => decode_pair(&v).ok_or_else(|| CoordError::Corrupt("applied".into())),
            None => Ok((0, 0)),
        }
    }

    /// Evaluate a command against the current state. With `commit`, the result
    /// is written together with the applied index; without it (dry run) nothing
    /// is written.
    pub fn execute(
        &self,
        cmd: &Command,
        commit: Option<(u64, u64)>,
    ) -> Result<Result<ApplyOutcome, StateError>, CoordError> {
        let mut pending = Pending::default();
        let out = self.execute_in(&mut pending, cmd, commit)?;
        self.commit(pending)?;
        Ok(out)
    }

    /// Write a batch of applied entries' effects atomically.
    pub fn commit(&self, pending: Pending) -> Result<(), CoordError> {
        if pending.writes.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in pending.writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// An entry without state changes (leader no-op) was applied.
    pub fn mark_applied_in(&self, pending: &mut Pending, index: u64, term: u64) {
        pending.writes.insert(
            KEY_APPLIED.to_vec(),
            Some(encode_pair(index, term).to_vec()),
        );
    }

    /// Like `execute`, but the effects join `pending` (seeing the commands
    /// already there) instead of being written at once.
    pub fn execute_in(
        &self,
        pending: &mut Pending,
        cmd: &Command,
        commit: Option<(u64, u64)>,
    ) -> Result<Result<ApplyOutcome, StateError>, CoordError> {
        let mut txn = Txn::over(&self.tree, &pending.writes);
        let current = match txn.get(KEY_REVISION)? {
            Some(v) => u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| CoordError::Corrupt("revision".into()))?,
            ),
            None => 0,
        };
        let next = current + 1;
        let mut results = Vec::new();
        let mut stored = Vec::new();
        let mut changes: Vec<Change> = Vec::new();
        let mut acked_sequence = 0u64;
        let verdict: Result<(), CoordError> = (|| {
            let cmd = match cmd {
                Command::Fenced {
                    writer,
                    epoch,
                    command,
                } => {
                    check_epoch(&txn, writer, *epoch)?;
                    if matches!(
                        **command,
                        Command::Fenced { .. } | Command::ClaimEpoch { .. }
                    ) {
                        return Err(StateError::Invalid(
                            "a fenced command cannot wrap another fence command".into(),
                        )
                        .into());
                    }
                    &**command
                }
                other => other,
            };
            match cmd {
                Command::Put(records) => {
                    let mut seen = std::collections::BTreeSet::new();
                    for rec in records {
                        if !seen.insert((rec.kind(), rec.name().to_string())) {
                            return Err(StateError::Invalid(format!(
                                "{} {:?} appears twice in one request",
                                rec.kind(),
                                rec.name()
                            ))
                            .into());
                        }
                        let old = txn.record(rec.kind(), rec.name())?;
                        if let Some(o) = &old {
                            if o.same_content(rec) {
                                results.push(ItemResult {
                                    kind: rec.kind(),
                                    name: rec.name().to_string(),
                                    outcome: Outcome::Unchanged,
                                });
                                stored.push(o.clone());
                                continue;
                            }
                        }
                        check_put(&mut txn, rec, old.as_ref())?;
                        let mut rec = rec.clone();
                        let meta = rec.meta_mut();
                        meta.revision = next;
                        meta.create_revision = old
                            .as_ref()
                            .map(|o| o.meta().create_revision)
                            .unwrap_or(next);
                        txn.put_record(&rec)?;
                        let old_rack = old
                            .as_ref()
                            .and_then(|o| o.rack())
                            .filter(|r| Some(*r) != rec.rack());
                        changes.push(Change {
                            kind: rec.kind(),
                            name: rec.name().to_string(),
                            op: ChangeOp::Put,
                            record: Some(rec.clone()),
                            old_rack: old_rack.map(str::to_string),
                        });
                        results.push(ItemResult {
                            kind: rec.kind(),
                            name: rec.name().to_string(),
                            outcome: if old.is_some() {
                                Outcome::Updated
                            } else {
                                Outcome::Created
                            },
                        });
                        stored.push(rec);
                    }
                }
                Command::Delete { kind, name } => match txn.record(*kind, name)? {
                    Some(old) => {
                        check_delete(&mut txn, &old)?;
                        txn.del(rec_key(*kind, name));
                        changes.push(Change {
                            kind: *kind,
                            name: name.clone(),
                            op: ChangeOp::Delete,
                            record: None,
                            old_rack: old.rack().map(str::to_string),
                        });
                        results.push(ItemResult {
                            kind: *kind,
                            name: name.clone(),
                            outcome: Outcome::Deleted,
                        });
                    }
                    None => results.push(ItemResult {
                        kind: *kind,
                        name: name.clone(),
                        outcome: Outcome::NotFound,
                    }),
                },
                Command::BootEvents {
                    rack,
                    relay,
                    events,
                } => {
                    let ack_key = evt_ack_key(rack, relay);
                    let mut acked = read_u64(txn.get(&ack_key)?)?;
                    let mut next_id = read_u64(txn.get(EVT_NEXT)?)?.max(1);
                    for ev in events {
                        if ev.sequence <= acked {
                            continue;
                        }
                        let host = txn
                            .get(format!("s:idx:mac:{}", ev.mac).as_bytes())?
                            .map(|v| String::from_utf8_lossy(&v).into_owned())
                            .unwrap_or_default();
                        let stored = StoredEvent {
                            id: next_id,
                            mac: ev.mac.clone(),
                            host,
                            rack: rack.clone(),
                            relay: relay.clone(),
                            kind: ev.kind.clone(),
                            detail: ev.detail.clone(),
                            unix_ms: ev.unix_ms,
                        };
                        let bytes = serde_json::to_vec(&stored)?;
                        txn.put(evt_id_key(next_id), bytes.clone());
                        txn.put(evt_mac_key(&ev.mac, next_id), bytes);
                        if next_id > EVENTS_RETAIN {
                            let old = next_id - EVENTS_RETAIN;
                            if let Some(v) = txn.get(&evt_id_key(old))? {
                                if let Ok(o) = serde_json::from_slice::<StoredEvent>(&v) {
                                    txn.del(evt_mac_key(&o.mac, old));
                                }
                                txn.del(evt_id_key(old));
                            }
                        }
                        next_id += 1;
                        acked = ev.sequence;
                    }
                    txn.put(ack_key, acked.to_be_bytes().to_vec());
                    txn.put(EVT_NEXT.to_vec(), next_id.to_be_bytes().to_vec());
                    acked_sequence = acked;
                }
                Command::Jobs(jc) => {
                    let eff = crate::jobs::execute(&mut txn, jc, next)?;
                    results.extend(eff.results);
                    changes.extend(eff.changes);
                    stored.extend(eff.records);
                }
                Command::ClaimEpoch { writer, epoch } => {
                    check_epoch(&txn, writer, *epoch)?;
                    txn.put(fence_key(writer), epoch.to_be_bytes().to_vec());
                }
                Command::Fenced { .. } => {
                    // Unwrapped above; a nested one was refused.
                }
            }
            Ok(())
        })();
        let changed = results.iter().any(|r| {
            matches!(
                r.outcome,
                Outcome::Created | Outcome::Updated | Outcome::Deleted
            )
        });
        let outcome = match verdict {
            Ok(()) => Ok(ApplyOutcome {
                revision: if changed { next } else { current },
                results,
                records: stored,
                acked_sequence,
            }),
            Err(CoordError::State(e)) => Err(e),
            Err(other) => return Err(other),
        };
        if let Some((index, term)) = commit {
            let keep = outcome.is_ok() && changed;
            // Events are history, not desired state: stored without a revision.
            // So is a fencing epoch: bookkeeping of the writers, not records.
            let history = outcome.is_ok()
                && matches!(cmd, Command::BootEvents { .. } | Command::ClaimEpoch { .. });
            if keep {
                txn.put(KEY_REVISION.to_vec(), next.to_be_bytes().to_vec());
                txn.put(change_key(next), serde_json::to_vec(&changes)?);
                if next > CHANGELOG_RETAIN {
                    txn.del(change_key(next - CHANGELOG_RETAIN));
                }
            }
            let writes = std::mem::take(&mut txn.writes);
            drop(txn);
            if keep || history {
                pending.writes.extend(writes);
            }
            self.mark_applied_in(pending, index, term);
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("pxemesh").unwrap();
        (dir, State::new(tree))
    }

    fn rack(name: &str) -> Record {
        Record::Rack(Rack {
            name: name.into(),
            ..Default::default()
        })
    }

    fn net(name: &str, rack: &str, subnet: &str) -> Record {
        Record::Network(Network {
            name: name.into(),
            rack: rack.into(),
            subnet: subnet.parse().unwrap(),
            gateway: None,
            dns: vec![],
            domain: String::new(),
            mtu: DEFAULT_MTU,
            vlan: None,
            pool: None,
            lease_seconds: DEFAULT_LEASE_SECONDS,
            interface: String::new(),
            meta: Meta::default(),
        })
    }

    fn host(name: &str, mac: &str, ip: &str) -> Record {
        Record::Host(Host {
            name: name.into(),
            mac: mac.parse().unwrap(),
            ip: Some(ip.parse().unwrap()),
            hostname: String::new(),
            rack: "r1".into(),
            network: "n1".into(),
            profile: None,
            labels: Default::default(),
            bmc: None,
            meta: Meta::default(),
        })
    }

    fn apply(s: &State, idx: &mut u64, cmd: Command) -> Result<ApplyOutcome, StateError> {
        *idx += 1;
        s.execute(&cmd, Some((*idx, 1))).unwrap()
    }

    #[test]
    fn list_containing_finds_exactly_the_rack_needle() {
        let (_d, s) = state();
        let mut i = 0;
        let mut other = host("h10", "52:54:00:00:00:10", "10.1.0.10");
        if let Record::Host(h) = &mut other {
            h.rack = "r10".into();
            h.network = "n10".into();
        }
        apply(
            &s,
            &mut i,
            Command::Put(vec![
                rack("r1"),
                rack("r10"),
                net("n1", "r1", "10.0.0.0/24"),
                net("n10", "r10", "10.1.0.0/24"),
                host("h1", "52:54:00:00:00:01", "10.0.0.10"),
                other,
            ]),
        )
        .unwrap();
        // The needle api/relay.rs builds for rack "r1".
        let needle = format!("\"rack\":{}", serde_json::to_string("r1").unwrap());
        let names = |k| -> Vec<String> {
            s.list_containing(k, needle.as_bytes())
                .unwrap()
                .iter()
                .map(|r| r.name().to_string())
                .collect()
        };
        assert_eq!(names(Kind::Host), ["h1"]);
        assert_eq!(names(Kind::Network), ["n1"]);
    }

    #[test]
    fn revisions_and_idempotence() {
        let (_d, s) = state();
        let mut i = 0;
        let out = apply(
            &s,
            &mut i,
            Command::Put(vec![rack("r1"), net("n1", "r1", "10.0.0.0/24")]),
        )
        .unwrap();
        assert_eq!(out.revision, 1);
        let out = apply(
            &s,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.10")]),
        )
        .unwrap();
        assert_eq!(out.revision, 2);
        assert_eq!(out.results[0].outcome, Outcome::Created);
        let out = apply(
            &s,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.10")]),
        )
        .unwrap();
        assert_eq!(
            out.revision, 2,
            "unchanged write must not bump the revision"
        );
        assert_eq!(out.results[0].outcome, Outcome::Unchanged);
        let out = apply(
            &s,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.11")]),
        )
        .unwrap();
        assert_eq!(out.results[0].outcome, Outcome::Updated);
        let rec = s.get(Kind::Host, "h1").unwrap().unwrap();
        assert_eq!(
            rec.meta(),
            Meta {
                create_revision: 2,
                revision: 3
            }
        );
        assert_eq!(s.applied().unwrap(), (4, 1));
    }

    #[test]
    fn validation_changes_nothing() {
        let (_d, s) = state();
        let mut i = 0;
        apply(
            &s,
            &mut i,
            Command::Put(vec![rack("r1"), net("n1", "r1", "10.0.0.0/24")]),
        )
        .unwrap();
        apply(
            &s,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.10")]),
        )
        .unwrap();
        let rev = s.revision().unwrap();
        let cases = vec![
            (
                host("h2", "52:54:00:00:00:01", "10.0.0.11"),
                "duplicate MAC",
            ),
            (host("h2", "52:54:00:00:00:02", "10.0.0.10"), "duplicate IP"),
            (
                host("h2", "52:54:00:00:00:02", "10.0.1.10"),
                "outside network",
            ),
            (host("h2", "52:54:00:00:00:02", "10.0.0.255"), "broadcast"),
        ];
        for (rec, want) in cases {
            let err = apply(&s, &mut i, Command::Put(vec![rec])).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} should mention {want}"
            );
        }
        // An atomic batch with one bad member writes nothing.
        let err = apply(
            &s,
            &mut i,
            Command::Put(vec![
                host("h3", "52:54:00:00:00:03", "10.0.0.13"),
                host("h4", "52:54:00:00:00:03", "10.0.0.14"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("duplicate MAC"));
        assert!(s.get(Kind::Host, "h3").unwrap().is_none());
        let mut h = host("h5", "52:54:00:00:00:05", "10.0.0.15");
        if let Record::Host(h) = &mut h {
            h.network = "nope".into();
        }
        assert!(apply(&s, &mut i, Command::Put(vec![h]))
            .unwrap_err()
            .to_string()
            .contains("unknown network"));
        assert_eq!(s.revision().unwrap(), rev);
        assert_eq!(
            s.applied().unwrap().0,
            i,
            "rejected commands still advance the applied index"
        );
    }

    #[test]
    fn delete_checks_references_and_frees_indexes() {
        let (_d, s) = state();
        let mut i = 0;
        apply(
            &s,
            &mut i,
            Command::Put(vec![rack("r1"), net("n1", "r1", "10.0.0.0/24")]),
        )
        .unwrap();
        apply(
            &s,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.10")]),
        )
        .unwrap();
        let err = apply(
            &s,
            &mut i,
            Command::Delete {
                kind: Kind::Network,
                name: "n1".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(err, StateError::InUse(_)));
        let err = apply(
            &s,
            &mut i,
            Command::Delete {
                kind: Kind::Rack,
                name: "r1".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(err, StateError::InUse(_)));
        let out = apply(
            &s,
            &mut i,
            Command::Delete {
                kind: Kind::Host,
                name: "h1".into(),
            },
        )
        .unwrap();
        assert_eq!(out.results[0].outcome, Outcome::Deleted);
        // MAC and IP are free again.
        apply(
            &s,
            &mut i,
            Command::Put(vec![host("h2", "52:54:00:00:00:01", "10.0.0.10")]),
        )
        .unwrap();
        let out = apply(
            &s,
            &mut i,
            Command::Delete {
                kind: Kind::Host,
                name: "ghost".into(),
            },
        )
        .unwrap();
        assert_eq!(out.results[0].outcome, Outcome::NotFound);
    }

    #[test]
    fn one_batch_sees_its_earlier_commands_and_drops_rejected_ones() {
        let (_d, s) = state();
        let mut p = Pending::default();
        let r1 = s
            .execute_in(
                &mut p,
                &Command::Put(vec![rack("r1"), net("n1", "r1", "10.0.0.0/24")]),
                Some((1, 1)),
            )
            .unwrap();
        assert_eq!(r1.unwrap().revision, 1);
        // Depends on the uncommitted network above.
        let r2 = s
            .execute_in(
                &mut p,
                &Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.10")]),
                Some((2, 1)),
            )
            .unwrap();
        assert_eq!(r2.unwrap().revision, 2);
        // Rejected: its partial writes must not reach the batch.
        let bad = Command::Put(vec![
            host("h2", "52:54:00:00:00:02", "10.0.0.20"),
            host("h3", "52:54:00:00:00:01", "10.0.0.30"),
        ]);
        assert!(s.execute_in(&mut p, &bad, Some((3, 1))).unwrap().is_err());
        assert!(
            s.get(Kind::Rack, "r1").unwrap().is_none(),
            "nothing is written before commit"
        );
        s.commit(p).unwrap();
        assert!(s.get(Kind::Host, "h1").unwrap().is_some());
        assert!(s.get(Kind::Host, "h2").unwrap().is_none());
        assert_eq!(s.revision().unwrap(), 2);
        assert_eq!(s.applied().unwrap(), (3, 1));
    }

    #[test]
    fn changelog_records_moves_and_deletes() {
        let (_d, s) = state();
        let mut i = 0;
        apply(
            &s,
            &mut i,
            Command::Put(vec![
                rack("r1"),
                rack("r2"),
                net("n1", "r1", "10.0.0.0/24"),
                net("n2", "r2", "10.1.0.0/24"),
            ]),
        )
        .unwrap();
        let out = apply(
            &s,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.10")]),
        )
        .unwrap();
        let c = s.changes_at(out.revision).unwrap().unwrap();
        assert_eq!(
            (c[0].kind, c[0].op, c[0].old_rack.clone()),
            (Kind::Host, ChangeOp::Put, None)
        );
        // Move h1 to rack r2: the change names the old rack.
        let mut moved = host("h1", "52:54:00:00:00:01", "10.1.0.10");
        if let Record::Host(h) = &mut moved {
            h.rack = "r2".into();
            h.network = "n2".into();
        }
        let out = apply(&s, &mut i, Command::Put(vec![moved])).unwrap();
        let c = s.changes_at(out.revision).unwrap().unwrap();
        assert_eq!(c[0].old_rack.as_deref(), Some("r1"));
        let out = apply(
            &s,
            &mut i,
            Command::Delete {
                kind: Kind::Host,
                name: "h1".into(),
            },
        )
        .unwrap();
        let c = s.changes_at(out.revision).unwrap().unwrap();
        assert_eq!(
            (c[0].op, c[0].old_rack.as_deref()),
            (ChangeOp::Delete, Some("r2"))
        );
        assert!(c[0].record.is_none());
        // Unchanged writes and rejected commands leave no history.
        let before = s.revision().unwrap();
        apply(&s, &mut i, Command::Put(vec![rack("r1")])).unwrap();
        assert_eq!(s.revision().unwrap(), before);
        assert!(s.changes_at(before + 1).unwrap().is_none());
        assert_eq!(s.changelog_floor().unwrap(), 1);
    }

    #[test]
    fn boot_events_are_stored_once_per_relay_sequence() {
        let (_d, s) = state();
        let mut i = 0;
        apply(
            &s,
            &mut i,
            Command::Put(vec![rack("r1"), net("n1", "r1", "10.0.0.0/24")]),
        )
        .unwrap();
        apply(
            &s,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.10")]),
        )
        .unwrap();
        let rev = s.revision().unwrap();
        let ev = |seq: u64, kind: &str| EventIn {
            mac: "52:54:00:00:00:01".into(),
            kind: kind.into(),
            detail: String::new(),
            unix_ms: seq,
            sequence: seq,
        };
        let batch = |events| Command::BootEvents {
            rack: "r1".into(),
            relay: "ra".into(),
            events,
        };
        let out = apply(
            &s,
            &mut i,
            batch(vec![ev(1, "dhcp-offer"), ev(2, "dhcp-ack")]),
        )
        .unwrap();
        assert_eq!(out.acked_sequence, 2);
        // Redelivery after a lost ack: only the new event is stored.
        let out = apply(
            &s,
            &mut i,
            batch(vec![ev(2, "dhcp-ack"), ev(3, "http-file")]),
        )
        .unwrap();
        assert_eq!(out.acked_sequence, 3);
        let all = s.events(Some("52:54:00:00:00:01"), 0, 100).unwrap();
        assert_eq!(
            all.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
            vec!["dhcp-offer", "dhcp-ack", "http-file"]
        );
        assert_eq!(all[0].host, "h1");
        assert_eq!(s.events(None, 2, 100).unwrap().len(), 1);
        assert_eq!(s.last_event_id().unwrap(), 3);
        assert_eq!(
            s.revision().unwrap(),
            rev,
            "events do not bump the revision"
        );
        // Another relay has its own sequence space.
        let other = Command::BootEvents {
            rack: "r1".into(),
            relay: "rb".into(),
            events: vec![ev(1, "dhcp-ack")],
        };
        assert_eq!(apply(&s, &mut i, other).unwrap().acked_sequence, 1);
        assert_eq!(s.events(None, 0, 100).unwrap().len(), 4);
    }

    #[test]
    fn overlapping_networks_in_one_rack_are_refused() {
        let (_d, s) = state();
        let mut i = 0;
        apply(
            &s,
            &mut i,
            Command::Put(vec![rack("r1"), rack("r2"), net("n1", "r1", "10.0.0.0/16")]),
        )
        .unwrap();
        let err = apply(
            &s,
            &mut i,
            Command::Put(vec![net("n2", "r1", "10.0.5.0/24")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("overlaps network n1"), "{err}");
        // Another rack may reuse the range (separate L2 domains), and n1 may be updated in place.
        apply(
            &s,
            &mut i,
            Command::Put(vec![net("n3", "r2", "10.0.5.0/24")]),
        )
        .unwrap();
        apply(
            &s,
            &mut i,
            Command::Put(vec![net("n1", "r1", "10.0.0.0/15")]),
        )
        .unwrap();
    }

    #[test]
    fn dry_run_writes_nothing() {
        let (_d, s) = state();
        let out = s
            .execute(&Command::Put(vec![rack("r1")]), None)
            .unwrap()
            .unwrap();
        assert_eq!(out.results[0].outcome, Outcome::Created);
        assert!(s.get(Kind::Rack, "r1").unwrap().is_none());
        assert_eq!(s.revision().unwrap(), 0);
    }

    #[test]
    fn hosts_without_a_reservation() {
        let (_d, st) = state();
        let mut i = 0;
        apply(
            &st,
            &mut i,
            Command::Put(vec![rack("r1"), net("n1", "r1", "10.0.0.0/24")]),
        )
        .unwrap();
        apply(
            &st,
            &mut i,
            Command::Put(vec![host("h1", "52:54:00:00:00:01", "10.0.0.5")]),
        )
        .unwrap();
        // Back to idle: the address is freed, the MAC stays taken.
        let Record::Host(mut idle) = host("h1", "52:54:00:00:00:01", "10.0.0.5") else {
            unreachable!()
        };
        idle.ip = None;
        idle.network.clear();
        idle.bmc = Some(Bmc {
            address: "10.9.0.5".into(),
            port: DEFAULT_BMC_PORT,
            username: "admin".into(),
            password: None,
            cipher_suite: DEFAULT_CIPHER_SUITE,
        });
        apply(&st, &mut i, Command::Put(vec![Record::Host(idle.clone())])).unwrap();
        apply(
            &st,
            &mut i,
            Command::Put(vec![host("h2", "52:54:00:00:00:02", "10.0.0.5")]),
        )
        .expect("the freed address");
        assert!(matches!(
            apply(
                &st,
                &mut i,
                Command::Put(vec![host("h3", "52:54:00:00:00:01", "10.0.0.6")])
            ),
            Err(StateError::Conflict(_))
        ));
        // Only reserved hosts use a network: h2 blocks the delete, h1 not.
        apply(
            &st,
            &mut i,
            Command::Delete {
                kind: Kind::Host,
                name: "h2".into(),
            },
        )
        .unwrap();
        apply(
            &st,
            &mut i,
            Command::Delete {
                kind: Kind::Network,
                name: "n1".into(),
            },
        )
        .expect("no reserved host left in n1");
        // Half a reservation, or a profile without one, is refused.
        let mut half = idle.clone();
        half.network = "n1".into();
        assert!(matches!(
            apply(&st, &mut i, Command::Put(vec![Record::Host(half)])),
            Err(StateError::Invalid(_))
        ));
        let mut prof = idle.clone();
        prof.profile = Some("p".into());
        let err = apply(&st, &mut i, Command::Put(vec![Record::Host(prof)])).unwrap_err();
        assert!(err.to_string().contains("needs a reservation"), "{err}");
        // Power jobs work on it (it has a BMC).
        let out = apply(
            &st,
            &mut i,
            Command::Jobs(crate::jobs::JobCommand::Submit {
                action: "power-status".into(),
                args: Default::default(),
                hosts: vec!["h1".into()],
                idempotency_key: String::new(),
                now_ms: 1,
            }),
        )
        .unwrap();
        assert_eq!(out.records.len(), 1);
    }

    #[test]
    fn fenced_writes_with_a_stale_epoch_are_refused_at_apply() {
        let (_d, st) = state();
        let mut idx = 0u64;
        let mut run = |cmd: Command| {
            idx += 1;
            st.execute(&cmd, Some((idx, 1))).unwrap()
        };
        let fenced = |epoch: u64, rec: Record| Command::Fenced {
            writer: "cloudstack".into(),
            epoch,
            command: Box::new(Command::Put(vec![rec])),
        };
        let claim = |epoch: u64| Command::ClaimEpoch {
            writer: "cloudstack".into(),
            epoch,
        };
        // Stint of term 3 claims and writes.
        run(claim(3)).unwrap();
        assert_eq!(st.fence_epoch("cloudstack").unwrap(), 3);
        let out = run(fenced(3, rack("r-old"))).unwrap();
        assert_eq!(out.results[0].outcome, Outcome::Created);
        // A newer stint (term 5) claims; the old stint's next write is
        // refused and changes nothing (no record, no revision).
        run(claim(5)).unwrap();
        let rev = st.revision().unwrap();
        match run(fenced(3, rack("r-late"))) {
            Err(StateError::Fenced {
                writer,
                epoch,
                current,
            }) => assert_eq!((writer.as_str(), epoch, current), ("cloudstack", 3, 5)),
            other => panic!("expected fenced, got {other:?}"),
        }
        assert!(st.get(Kind::Rack, "r-late").unwrap().is_none());
        assert_eq!(st.revision().unwrap(), rev);
        // An old claim is refused too; the stored epoch stays.
        assert!(matches!(run(claim(4)), Err(StateError::Fenced { .. })));
        assert_eq!(st.fence_epoch("cloudstack").unwrap(), 5);
        // The current stint writes; other writers are independent.
        assert!(run(fenced(5, rack("r-new"))).is_ok());
        assert!(run(Command::Fenced {
            writer: "other".into(),
            epoch: 1,
            command: Box::new(Command::Put(vec![rack("r-other")])),
        })
        .is_ok());
        // Nesting is refused.
        assert!(matches!(
            run(Command::Fenced {
                writer: "cloudstack".into(),
                epoch: 5,
                command: Box::new(claim(9)),
            }),
            Err(StateError::Invalid(_))
        ));
        assert_eq!(st.fence_epoch("cloudstack").unwrap(), 5);
        // The epoch survives as state (a snapshot carries `s:` keys).
        let dump: Vec<_> = st
            .tree
            .scan_prefix(b"s:fence:")
            .keys()
            .map(|k| String::from_utf8(k.unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(dump, ["s:fence:cloudstack"]);
    }
}
