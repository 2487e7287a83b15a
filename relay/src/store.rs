//! The persisted copy of the rack's state (sync mode), in the relay's sled
//! database, tree `rack-state`:
//!
//! - `rec/<kind>/<name>` → JSON of the coordinator's `Record` (rack, networks,
//!   hosts, profiles, images);
//! - `meta/revision` → the resume point: every change up to this cluster
//!   revision is in the records (u64 BE);
//! - `meta/rack` → the rack they belong to.
//!
//! Changes accumulate in memory and are written by [`RackStore::commit`] as ONE
//! sled batch that carries the records and the revision together: sled applies
//! a batch atomically, also across a crash, so the tree never claims a
//! revision whose records it lacks. A snapshot's batch removes every stored
//! record first. [`RackStore::flush`] makes the committed state durable (the
//! caller decides how often); [`RackStore::durable_revision`] is the revision
//! known to be on disk, the one a relay may acknowledge.
//!
//! One cluster revision may change several records (one command puts many),
//! so the watch delivers several events with the same revision. Revision R is
//! known complete only once something later arrives (an event after R, a
//! progress, a snapshot); until then the resume point stays at R - 1, and a
//! reconnect replays R's events, which are full records and idempotent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pxemesh_coordinator::model::{Image, Kind, Rack, Record};
use tracing::{error, warn};

use crate::error::RelayError;
use crate::state::RackState;

const TREE: &str = "rack-state";
const REVISION_KEY: &[u8] = b"meta/revision";
const RACK_KEY: &[u8] = b"meta/rack";
const RECORD_PREFIX: &str = "rec/";

type Key = (Kind, String);

fn sled_key((kind, name): &Key) -> Vec<u8> {
    format!("{RECORD_PREFIX}{kind}/{name}").into_bytes()
}

pub struct RackStore {
    tree: sled::Tree,
    rack: String,
    /// Highest revision applied to `records` (what the served state reflects).
    applied: u64,
    /// Every change up to here is in `records`: the resume point, persisted.
    resume: u64,
    /// A snapshot was applied or a revision persisted: events may follow.
    synced: bool,
    records: BTreeMap<Key, Record>,
    /// A snapshot was applied since the last commit: rewrite everything.
    replace_all: bool,
    /// Changed keys since the last commit (None = deleted).
    dirty: BTreeMap<Key, Option<Record>>,
    /// Revision (or records) changed since the last commit.
    uncommitted: bool,
    /// Revision of the last successful commit.
    committed: u64,
    /// Revision known to be flushed to disk.
    durable: Arc<AtomicU64>,
    /// Messages committed but not yet flushed.
    unflushed: usize,
}

impl RackStore {
    /// Opens the persisted copy for `rack`. A copy that belongs to another rack
    /// (the relay got a certificate for a different rack) is discarded.
    pub fn open(db: &sled::Db, rack: &str) -> Result<RackStore, RelayError> {
        let tree = db.open_tree(TREE)?;
        if let Some(stored) = tree.get(RACK_KEY)? {
            if stored.as_ref() != rack.as_bytes() {
                warn!(
                    stored = %String::from_utf8_lossy(&stored),
                    rack,
                    "the persisted rack state belongs to another rack than this relay's certificate; discarding it"
                );
                tree.clear()?;
                crate::durable::flush_blocking(&tree)?;
            }
        }
        let mut revision = match tree.get(REVISION_KEY)? {
            Some(v) => {
                match <[u8; 8]>::try_from(v.as_ref()) {
                    Ok(b) => u64::from_be_bytes(b),
                    Err(_) => {
                        error!("persisted rack state: malformed revision; starting from a full snapshot");
                        0
                    }
                }
            }
            None => 0,
        };
        let mut records = BTreeMap::new();
        for item in tree.scan_prefix(RECORD_PREFIX) {
            let (k, v) = item?;
            match serde_json::from_slice::<Record>(&v) {
                Ok(rec) => {
                    records.insert((rec.kind(), rec.name().to_string()), rec);
                }
                Err(e) => {
                    error!(key = %String::from_utf8_lossy(&k), error = %e,
                        "persisted rack state: undecodable record; asking the coordinators for a full snapshot");
                    revision = 0;
                }
            }
        }
        Ok(RackStore {
            tree,
            rack: rack.to_string(),
            applied: revision,
            resume: revision,
            synced: revision > 0,
            records,
            replace_all: false,
            dirty: BTreeMap::new(),
            uncommitted: false,
            committed: revision,
            durable: Arc::new(AtomicU64::new(revision)),
            unflushed: 0,
        })
    }

    /// The persisted state, ready to serve, and the revision to resume from.
    ///
    /// A stored set that does not validate (should not happen: it was
    /// validated by the coordinators) is logged loudly; the relay then serves
    /// an empty rack and resumes from revision 0, i.e. a full snapshot.
    pub fn load(&mut self) -> (RackState, u64) {
        match self.build() {
            Ok(s) => (s, self.resume),
            Err(e) => {
                error!(
                    rack = %self.rack,
                    revision = self.resume,
                    error = %e,
                    "PERSISTED RACK STATE IS INCONSISTENT; serving an empty rack until a full snapshot arrives"
                );
                self.reset();
                (self.empty(), 0)
            }
        }
    }

    /// An empty rack (nothing persisted yet, or nothing usable).
    pub fn empty(&self) -> RackState {
        RackState::new(&self.rack, 0, Vec::new(), Vec::new(), Vec::new())
            .expect("an empty rack is valid")
    }

    /// Builds the serving state from the records held (committed or not).
    pub fn build(&self) -> Result<RackState, String> {
        let mut networks = Vec::new();
        let mut hosts = Vec::new();
        let mut profiles = Vec::new();
        for rec in self.records.values() {
            match rec {
                Record::Network(n) => networks.push(n.clone()),
                Record::Host(h) => hosts.push(h.clone()),
                Record::Profile(p) => profiles.push(p.clone()),
                _ => {}
            }
        }
        RackState::new(&self.rack, self.applied, networks, hosts, profiles)
            .map(|s| s.with_images(self.images().cloned()))
    }

    pub fn rack(&self) -> &str {
        &self.rack
    }

    /// The resume point: every change up to this revision is held (the
    /// `from_revision` of the next watch).
    pub fn revision(&self) -> u64 {
        self.resume
    }

    /// Highest revision applied (the revision of the state served; changes
    /// of it may still be arriving).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Whether a snapshot (now or in an earlier run) established the state,
    /// so that events may be applied on top of it.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Forget the resume point: the next watch asks for a full snapshot,
    /// whose commit rewrites everything.
    fn reset(&mut self) {
        self.applied = 0;
        self.resume = 0;
        self.synced = false;
        self.replace_all = true;
        self.dirty.clear();
    }

    /// Revision known to be on disk (shared with the heartbeat).
    pub fn durable_revision(&self) -> Arc<AtomicU64> {
        self.durable.clone()
    }

    /// The rack's own record, once a snapshot delivered it.
    pub fn rack_record(&self) -> Option<&Rack> {
        match self.records.get(&(Kind::Rack, self.rack.clone())) {
            Some(Record::Rack(r)) => Some(r),
            _ => None,
        }
    }

    /// Image manifests (global; the image cache will use them).
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.records.values().filter_map(|r| match r {
            Record::Image(i) => Some(i),
            _ => None,
        })
    }

    pub fn image(&self, name: &str) -> Option<&Image> {
        match self.records.get(&(Kind::Image, name.to_string())) {
            Some(Record::Image(i)) => Some(i),
            _ => None,
        }
    }

    /// Number of records of `kind` held.
    pub fn count(&self, kind: Kind) -> usize {
        self.records.keys().filter(|(k, _)| *k == kind).count()
    }

    /// Whether a record belongs in this rack's copy: the rack's own record, its
    /// networks and hosts, and every profile and image.
    fn belongs(&self, rec: &Record) -> bool {
        match rec {
            Record::Rack(r) => r.name == self.rack,
            Record::Network(n) => n.rack == self.rack,
            Record::Host(h) => h.rack == self.rack,
            Record::Profile(_) | Record::Image(_) => true,
            Record::Job(_) | Record::Relay(_) => false,
        }
    }

    /// Replaces everything held by `records` at `revision`. Records that do
    /// not belong to this rack are left out (and counted in the result).
    pub fn snapshot(&mut self, revision: u64, records: Vec<Record>) -> usize {
        let mut foreign = 0;
        self.records.clear();
        for rec in records {
            if self.belongs(&rec) {
                self.records
                    .insert((rec.kind(), rec.name().to_string()), rec);
            } else {
                foreign += 1;
            }
        }
        self.applied = revision;
        self.resume = revision;
        self.synced = true;
        self.replace_all = true;
        self.dirty.clear();
        self.uncommitted = true;
        foreign
    }

    /// A record created or changed at `revision`. Returns false (and changes
    /// nothing) for a revision at or below the resume point (a replay). A
    /// record of another rack removes any copy of it held (it moved away).
    pub fn put(&mut self, revision: u64, rec: Record) -> bool {
        if !self.event_at(revision) {
            return false;
        }
        let key = (rec.kind(), rec.name().to_string());
        if self.belongs(&rec) {
            self.records.insert(key.clone(), rec.clone());
            self.mark(key, Some(rec));
        } else if self.records.remove(&key).is_some() {
            self.mark(key, None);
        }
        true
    }

    /// A record deleted (or moved to another rack) at `revision`.
    pub fn delete(&mut self, revision: u64, kind: Kind, name: &str) -> bool {
        if !self.event_at(revision) {
            return false;
        }
        let key = (kind, name.to_string());
        if self.records.remove(&key).is_some() {
            self.mark(key, None);
        }
        true
    }

    /// An event at `revision` that changes nothing held (a kind the relay
    /// does not keep, or a record it cannot read): only the revisions move.
    pub fn skip(&mut self, revision: u64) -> bool {
        self.event_at(revision)
    }

    /// An event at `revision` arrives: everything before it was delivered.
    fn event_at(&mut self, revision: u64) -> bool {
        if revision <= self.resume {
            return false;
        }
        self.resume = self.resume.max(revision - 1);
        self.applied = self.applied.max(revision);
        self.uncommitted = true;
        true
    }

    /// Every change up to `revision` was delivered (nothing else concerning
    /// this rack changed).
    pub fn progress(&mut self, revision: u64) -> bool {
        if revision <= self.resume {
            return false;
        }
        self.resume = revision;
        self.applied = self.applied.max(revision);
        self.uncommitted = true;
        true
    }

    fn mark(&mut self, key: Key, rec: Option<Record>) {
        if !self.replace_all {
            self.dirty.insert(key, rec);
        }
    }

    /// Whether changes are waiting for `commit`.
    pub fn uncommitted(&self) -> bool {
        self.uncommitted
    }

    /// Writes the changes since the last commit and the revision as one
    /// atomic sled batch (not yet flushed). On a write error the store asks
    /// for a full snapshot on the next watch, which rewrites everything.
    pub fn commit(&mut self) -> Result<(), RelayError> {
        if !self.uncommitted {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        if self.replace_all {
            for k in self.tree.iter().keys() {
                batch.remove(k?);
            }
            for (key, rec) in &self.records {
                batch.insert(sled_key(key), serde_json::to_vec(rec)?);
            }
        } else {
            for (key, rec) in &self.dirty {
                match rec {
                    Some(rec) => batch.insert(sled_key(key), serde_json::to_vec(rec)?),
                    None => batch.remove(sled_key(key)),
                }
            }
        }
        batch.insert(REVISION_KEY, &self.resume.to_be_bytes());
        batch.insert(RACK_KEY, self.rack.as_bytes());
        match self.tree.apply_batch(batch) {
            Ok(()) => {
                self.replace_all = false;
                self.dirty.clear();
                self.uncommitted = false;
                self.committed = self.resume;
                self.unflushed += 1;
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "cannot persist the rack state; will ask for a full snapshot");
                self.reset();
                Err(e.into())
            }
        }
    }

    /// Commits written but not yet flushed.
    pub fn unflushed(&self) -> usize {
        self.unflushed
    }

    /// Makes every commit so far durable, then publishes its revision as the
    /// durable one. Runs the fsync off the async threads.
    pub async fn flush(&mut self) -> Result<(), RelayError> {
        if self.unflushed == 0 {
            return Ok(());
        }
        let tree = self.tree.clone();
        let revision = self.committed;
        crate::durable::flush(tree).await?;
        self.unflushed = 0;
        self.durable.store(revision, Ordering::Release);
        Ok(())
    }
}

/// The rack's own record as last committed to the tree, read straight from
/// sled (for readers outside the sync loop: the power-job executor checks
/// BMC addresses against its OOB networks). None until a snapshot arrived.
pub fn persisted_rack(db: &sled::Db, rack: &str) -> Option<Rack> {
    let tree = db.open_tree(TREE).ok()?;
    if tree.get(RACK_KEY).ok()??.as_ref() != rack.as_bytes() {
        return None;
    }
    let v = tree.get(sled_key(&(Kind::Rack, rack.to_string()))).ok()??;
    match serde_json::from_slice::<Record>(&v).ok()? {
        Record::Rack(r) => Some(r),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pxemesh_coordinator::model::{Host, Meta, Network, Profile};

    pub(crate) fn network(name: &str, rack: &str, subnet: &str) -> Record {
        Record::Network(Network {
            name: name.into(),
            rack: rack.into(),
            subnet: subnet.parse().unwrap(),
            gateway: None,
            dns: vec![],
            domain: String::new(),
            mtu: 1500,
            vlan: None,
            pool: None,
            lease_seconds: 3600,
            interface: String::new(),
            meta: Meta::default(),
        })
    }

    pub(crate) fn host(name: &str, rack: &str, net: &str, mac: &str, ip: &str) -> Record {
        Record::Host(Host {
            name: name.into(),
            mac: mac.parse().unwrap(),
            ip: Some(ip.parse().unwrap()),
            hostname: String::new(),
            rack: rack.into(),
            network: net.into(),
            profile: None,
            labels: Default::default(),
            bmc: None,
            meta: Meta::default(),
        })
    }

    fn profile(name: &str) -> Record {
        Record::Profile(Profile {
            name: name.into(),
            description: String::new(),
            kind: "ipxe".parse().unwrap(),
            image: String::new(),
            kernel: "k".into(),
            initrds: vec![],
            cmdline: String::new(),
            kickstart_url: String::new(),
            ipxe_script: String::new(),
            meta: Meta::default(),
        })
    }

    fn image(name: &str) -> Record {
        Record::Image(Image {
            name: name.into(),
            files: vec![],
            meta: Meta::default(),
        })
    }

    fn names(s: &RackState) -> Vec<String> {
        let mut v: Vec<String> = s.hosts().iter().map(|h| h.name.clone()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn snapshot_events_reload_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = crate::durable::test_db(dir.path());
            let mut st = RackStore::open(&db, "r1").unwrap();
            let (s, rev) = st.load();
            assert_eq!((rev, s.hosts().len(), s.rack.as_str()), (0, 0, "r1"));

            // Snapshot: foreign records are left out.
            let foreign = st.snapshot(
                10,
                vec![
                    network("n1", "r1", "10.0.0.0/24"),
                    network("n2", "r2", "10.1.0.0/24"),
                    host("h1", "r1", "n1", "52:54:00:00:00:01", "10.0.0.11"),
                    host("h2", "r1", "n1", "52:54:00:00:00:02", "10.0.0.12"),
                    profile("p1"),
                    image("img1"),
                ],
            );
            assert_eq!(foreign, 1);
            st.commit().unwrap();
            st.flush().await.unwrap();
            assert_eq!(st.durable_revision().load(Ordering::Acquire), 10);

            // Events: a new host, a host moving to rack r2 (a DELETE), an
            // image deleted, two hosts put by one command (same revision).
            assert!(st.put(11, host("h3", "r1", "n1", "52:54:00:00:00:03", "10.0.0.13")));
            assert!(st.delete(12, Kind::Host, "h1"));
            assert!(st.delete(13, Kind::Image, "img1"));
            assert!(st.put(14, host("h4", "r1", "n1", "52:54:00:00:00:04", "10.0.0.14")));
            assert!(st.put(14, host("h5", "r1", "n1", "52:54:00:00:00:05", "10.0.0.15")));
            // Revision 14 may not be complete yet: resume from 13.
            assert_eq!((st.revision(), st.applied()), (13, 14));
            // A replay at or below the resume point is ignored.
            assert!(!st.put(13, host("h9", "r1", "n1", "52:54:00:00:00:09", "10.0.0.19")));
            st.commit().unwrap();
            st.flush().await.unwrap();
            assert_eq!(st.durable_revision().load(Ordering::Acquire), 13);
            // Progress confirms 14 and beyond.
            assert!(st.progress(20));
            assert!(!st.progress(15));
            st.commit().unwrap();
            st.flush().await.unwrap();
            let built = st.build().unwrap();
            assert_eq!(names(&built), vec!["h2", "h3", "h4", "h5"]);
            assert_eq!(built.revision, 20);
        }
        let db = crate::durable::test_db(dir.path());
        let mut st = RackStore::open(&db, "r1").unwrap();
        let (s, rev) = st.load();
        assert_eq!(rev, 20);
        assert_eq!(names(&s), vec!["h2", "h3", "h4", "h5"]);
        assert_eq!(s.networks().len(), 1);
        assert!(s.profile("p1").is_some());
        assert_eq!(st.images().count(), 0);
        assert_eq!(st.durable_revision().load(Ordering::Acquire), 20);

        // A second snapshot replaces everything, on disk too.
        st.snapshot(30, vec![network("n1", "r1", "10.0.0.0/24"), image("img2")]);
        st.commit().unwrap();
        st.flush().await.unwrap();
        drop(st);
        let mut st = RackStore::open(&db, "r1").unwrap();
        let (s, rev) = st.load();
        assert_eq!((rev, s.hosts().len()), (30, 0));
        assert!(s.profile("p1").is_none());
        assert!(st.image("img2").is_some());
        assert_eq!(st.count(Kind::Network), 1);
    }

    #[tokio::test]
    async fn another_racks_copy_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::durable::test_db(dir.path());
        let mut st = RackStore::open(&db, "r1").unwrap();
        st.snapshot(5, vec![network("n1", "r1", "10.0.0.0/24")]);
        st.commit().unwrap();
        drop(st);
        let mut st = RackStore::open(&db, "r2").unwrap();
        let (s, rev) = st.load();
        assert_eq!((rev, s.networks().len(), s.rack.as_str()), (0, 0, "r2"));
    }

    #[tokio::test]
    async fn inconsistent_copy_serves_empty_and_resyncs() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::durable::test_db(dir.path());
        let mut st = RackStore::open(&db, "r1").unwrap();
        // Overlapping networks: the coordinators accept it, RackState does not.
        st.snapshot(
            7,
            vec![
                network("n1", "r1", "10.0.0.0/24"),
                network("n2", "r1", "10.0.0.0/16"),
            ],
        );
        st.commit().unwrap();
        assert!(st.build().is_err());
        drop(st);
        let mut st = RackStore::open(&db, "r1").unwrap();
        let (s, rev) = st.load();
        assert_eq!((rev, s.networks().len()), (0, 0));
        assert_eq!(st.revision(), 0);
    }
}
