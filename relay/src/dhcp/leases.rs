//! Dynamic pool leases, persisted in an append-only log with group commit
//! ([`super::leaselog`], `<data_dir>/dhcp-leases.log`).
//!
//! Rules:
//! * an address has at most one owner (a MAC) at a time; an offer holds it
//!   for `offer_hold_seconds`, a bound lease for the lease time;
//! * a declined address is quarantined for [`DECLINE_QUARANTINE_SECS`],
//!   whoever asks;
//! * an expired (or released) record is free for anyone, but its last owner
//!   keeps first claim: the same MAC gets its previous address back, and
//!   never-used addresses are handed out before expired ones of other MACs;
//! * the caller passes the addresses that must never come from the pool
//!   (reservations, gateway, the relay's own addresses).
//!
//! Records live in memory behind one mutex (no await while held); the table
//! never grows beyond the pool sizes because it is keyed by address. Every
//! change is also encoded, in order, into a pending buffer that
//! [`Leases::flush`] appends to the lease log ([`super::leaselog`]) and
//! `fdatasync`s. The caller flushes before sending an ACK that binds a lease
//! ([`Leases::flush_async`]), so a crash can never hand the same address to
//! two clients. Offers are logged too, but nobody waits for them.
//!
//! Upgrade: a relay that kept its leases in sled (tree `dhcp-leases`, up to
//! this log's introduction) has them imported into the log once, when the
//! log is empty, and the sled tree is cleared afterwards.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use pxemesh_coordinator::model::{Mac, Network};
use serde::{Deserialize, Serialize};

use crate::error::RelayError;

use super::leaselog::{self, LeaseLog};

/// How long a declined address stays out of the pool (dnsmasq uses the same).
pub const DECLINE_QUARANTINE_SECS: u64 = 600;
/// Bound on the addresses scanned for one allocation.
pub const MAX_POOL_SCAN: u32 = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    Offered,
    Bound,
    Released,
    Declined,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub mac: Mac,
    pub network: String,
    pub state: LeaseState,
    /// Unix seconds.
    pub expires: u64,
}

/// What `ip` is to `mac` at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Avail {
    Never,
    Mine,
    Expired,
    Taken,
}

fn availability(rec: Option<&Lease>, mac: &Mac, now: u64) -> Avail {
    match rec {
        None => Avail::Never,
        Some(r) if r.state == LeaseState::Declined && r.expires > now => Avail::Taken,
        Some(r) if r.state == LeaseState::Declined => Avail::Expired,
        Some(r) if &r.mac == mac => Avail::Mine,
        Some(r) if r.expires <= now || r.state == LeaseState::Released => Avail::Expired,
        Some(_) => Avail::Taken,
    }
}

/// The usable range of a network's pool: inside the subnet, without the
/// network and broadcast addresses, capped at [`MAX_POOL_SCAN`] addresses.
pub fn pool_range(net: &Network) -> Option<(u32, u32)> {
    let (start, end) = net.pool?;
    let (mut s, mut e) = (u32::from(start), u32::from(end));
    if s > e {
        return None;
    }
    let (lo, hi) = (
        u32::from(net.subnet.network()),
        u32::from(net.subnet.broadcast()),
    );
    let (lo, hi) = if net.subnet.prefix_len() < 31 {
        (lo + 1, hi - 1)
    } else {
        (lo, hi)
    };
    s = s.max(lo);
    e = e.min(hi);
    if s > e {
        return None;
    }
    e = e.min(s.saturating_add(MAX_POOL_SCAN - 1));
    Some((s, e))
}

pub fn in_pool(net: &Network, ip: Ipv4Addr) -> bool {
    pool_range(net).is_some_and(|(s, e)| (s..=e).contains(&u32::from(ip)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Bound; `new` when this MAC did not already hold a bound lease on it.
    Bound { new: bool },
    /// The address is not this MAC's to take.
    Refused,
}

/// The in-memory mirror, indexed for the hot path: finding a MAC's own
/// lease and a never-used address must not scan the pool (a boot storm of
/// unknown machines allocates thousands per second).
#[derive(Default)]
struct Table {
    by_ip: BTreeMap<Ipv4Addr, Lease>,
    by_mac: HashMap<Mac, BTreeSet<Ipv4Addr>>,
    /// Per network: where the search for a never-used address resumes.
    cursor: HashMap<String, u32>,
    /// Encoded changes not yet in the log file, in order, and their count.
    pending: Vec<u8>,
    pending_records: u64,
}

impl Table {
    fn get(&self, ip: &Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(ip)
    }

    fn insert(&mut self, ip: Ipv4Addr, lease: Lease) {
        if let Some(old) = self.by_ip.get(&ip) {
            if old.mac != lease.mac {
                if let Some(set) = self.by_mac.get_mut(&old.mac) {
                    set.remove(&ip);
                    if set.is_empty() {
                        self.by_mac.remove(&old.mac);
                    }
                }
            }
        }
        self.by_mac.entry(lease.mac).or_default().insert(ip);
        self.by_ip.insert(ip, lease);
    }

    /// The addresses `mac` has a record for.
    fn of_mac(&self, mac: &Mac) -> Vec<Ipv4Addr> {
        self.by_mac
            .get(mac)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Cheap to clone: clones share the table and the log.
#[derive(Clone)]
pub struct Leases {
    table: Arc<Mutex<Table>>,
    /// Taken before the table lock by whoever writes the file, so appends
    /// reach the file in the order the table changed.
    log: Arc<Mutex<LeaseLog>>,
}

impl Leases {
    /// Open the lease log in `dir` (creating it), replaying it into memory.
    /// `legacy`: the relay's sled database, whose `dhcp-leases` tree is
    /// imported once if the log is empty.
    pub fn open(dir: &Path, legacy: Option<&sled::Db>) -> Result<Leases, RelayError> {
        std::fs::create_dir_all(dir)?;
        let (mut log, replay) = LeaseLog::open(&dir.join(leaselog::FILE_NAME))?;
        let mut table = Table::default();
        let empty = replay.records.is_empty();
        for (ip, lease) in replay.records {
            table.insert(ip, lease);
        }
        if let (true, Some(db)) = (empty, legacy) {
            let tree = db.open_tree("dhcp-leases")?;
            if !tree.is_empty() {
                let mut image = Vec::new();
                let mut count = 0u64;
                for item in tree.iter() {
                    let (k, v) = item?;
                    let Ok(octets) = <[u8; 4]>::try_from(k.as_ref()) else {
                        continue;
                    };
                    let Ok(lease) = serde_json::from_slice::<Lease>(&v) else {
                        continue;
                    };
                    let ip = Ipv4Addr::from(octets);
                    leaselog::encode(&mut image, ip, &lease)?;
                    table.insert(ip, lease);
                    count += 1;
                }
                log.replace(&image, count)?;
                tree.clear()?;
                crate::durable::flush_blocking(&tree)?;
                tracing::info!(
                    leases = count,
                    "dhcp-leases: imported the pool leases from sled into the lease log"
                );
            }
        }
        Ok(Leases {
            table: Arc::new(Mutex::new(table)),
            log: Arc::new(Mutex::new(log)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic elsewhere while holding the lock leaves the table consistent
        // (every change is one insert), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self, table: &mut Table, ip: Ipv4Addr, lease: Lease) -> Result<(), RelayError> {
        leaselog::encode(&mut table.pending, ip, &lease)?;
        table.pending_records += 1;
        table.insert(ip, lease);
        Ok(())
    }

    /// The record of `ip`, if any.
    pub fn get(&self, ip: Ipv4Addr) -> Option<Lease> {
        self.lock().get(&ip).cloned()
    }

    /// All records, by address.
    pub fn snapshot(&self) -> Vec<(Ipv4Addr, Lease)> {
        self.lock()
            .by_ip
            .iter()
            .map(|(ip, l)| (*ip, l.clone()))
            .collect()
    }

    /// Pick an address for `mac` in `net`'s pool and hold it as an offer.
    /// Preference: this MAC's previous address, then the requested one (if
    /// free), then a never-used one, then the longest-expired one.
    /// `Ok(None)` when the pool is exhausted (or the network has none).
    pub fn offer(
        &self,
        mac: &Mac,
        net: &Network,
        excluded: &dyn Fn(Ipv4Addr) -> bool,
        requested: Option<Ipv4Addr>,
        now: u64,
        hold_secs: u32,
    ) -> Result<Option<Ipv4Addr>, RelayError> {
        let Some((s, e)) = pool_range(net) else {
            return Ok(None);
        };
        let mut table = self.lock();
        let usable = |ip: Ipv4Addr| !excluded(ip) && (s..=e).contains(&u32::from(ip));

        // 1. The MAC's own record (latest expiry wins).
        let mine = table
            .of_mac(mac)
            .into_iter()
            .filter_map(|ip| table.get(&ip).map(|l| (ip, l)))
            .filter(|(ip, l)| usable(*ip) && availability(Some(l), mac, now) == Avail::Mine)
            .max_by_key(|(_, l)| l.expires)
            .map(|(ip, _)| ip);
        // 2. The requested address, 3. never used, 4. expired longest ago.
        let pick = mine
            .or_else(|| {
                requested.filter(|ip| {
                    usable(*ip)
                        && matches!(
                            availability(table.get(ip), mac, now),
                            Avail::Never | Avail::Expired
                        )
                })
            })
            .or_else(|| {
                // Resume where the last never-used address was found, wrapping once.
                let start = table
                    .cursor
                    .get(&net.name)
                    .copied()
                    .unwrap_or(s)
                    .clamp(s, e);
                (start..=e)
                    .chain(s..start)
                    .map(Ipv4Addr::from)
                    .find(|ip| usable(*ip) && !table.by_ip.contains_key(ip))
            })
            .or_else(|| {
                table
                    .by_ip
                    .range(Ipv4Addr::from(s)..=Ipv4Addr::from(e))
                    .filter(|(ip, l)| {
                        usable(**ip) && availability(Some(l), mac, now) == Avail::Expired
                    })
                    .min_by_key(|(_, l)| l.expires)
                    .map(|(ip, _)| *ip)
            });
        let Some(ip) = pick else { return Ok(None) };
        if u32::from(ip) >= s && u32::from(ip) < e {
            table.cursor.insert(net.name.clone(), u32::from(ip) + 1);
        }

        let hold_until = now.saturating_add(u64::from(hold_secs));
        let keep_bound = table.get(&ip).is_some_and(|l| {
            l.mac == *mac && l.state == LeaseState::Bound && l.expires >= hold_until
        });
        if !keep_bound {
            let lease = Lease {
                mac: *mac,
                network: net.name.clone(),
                state: LeaseState::Offered,
                expires: hold_until,
            };
            self.store(&mut table, ip, lease)?;
        }
        Ok(Some(ip))
    }

    /// Bind `ip` to `mac` for `lease_secs` if it is free or already this MAC's.
    pub fn commit(
        &self,
        mac: &Mac,
        net: &Network,
        excluded: &dyn Fn(Ipv4Addr) -> bool,
        ip: Ipv4Addr,
        now: u64,
        lease_secs: u32,
    ) -> Result<Commit, RelayError> {
        if !in_pool(net, ip) || excluded(ip) {
            return Ok(Commit::Refused);
        }
        let mut table = self.lock();
        let prev = table.get(&ip);
        match availability(prev, mac, now) {
            Avail::Taken => return Ok(Commit::Refused),
            Avail::Never | Avail::Expired | Avail::Mine => {}
        }
        let new =
            !prev.is_some_and(|l| l.mac == *mac && l.state == LeaseState::Bound && l.expires > now);
        let lease = Lease {
            mac: *mac,
            network: net.name.clone(),
            state: LeaseState::Bound,
            expires: now.saturating_add(u64::from(lease_secs)),
        };
        self.store(&mut table, ip, lease)?;
        Ok(Commit::Bound { new })
    }

    /// Whether `ip` is a valid current lease (or offer) of `mac`.
    pub fn holds(&self, mac: &Mac, ip: Ipv4Addr, now: u64) -> bool {
        self.lock().get(&ip).is_some_and(|l| {
            &l.mac == mac
                && matches!(l.state, LeaseState::Bound | LeaseState::Offered)
                && l.expires > now
        })
    }

    /// The client gave the address back: free for anyone now, but the MAC
    /// keeps first claim. Returns whether anything changed.
    pub fn release(&self, mac: &Mac, ip: Ipv4Addr, now: u64) -> Result<bool, RelayError> {
        let mut table = self.lock();
        let Some(l) = table.get(&ip) else {
            return Ok(false);
        };
        if &l.mac != mac || !matches!(l.state, LeaseState::Bound | LeaseState::Offered) {
            return Ok(false);
        }
        let lease = Lease {
            state: LeaseState::Released,
            expires: now,
            ..l.clone()
        };
        self.store(&mut table, ip, lease)?;
        Ok(true)
    }

    /// Drop this MAC's pending offers other than `keep` (it chose another
    /// server, or another address).
    pub fn drop_offers(
        &self,
        mac: &Mac,
        keep: Option<Ipv4Addr>,
        now: u64,
    ) -> Result<(), RelayError> {
        let mut table = self.lock();
        let stale: Vec<Ipv4Addr> = table
            .of_mac(mac)
            .into_iter()
            .filter(|ip| {
                table.get(ip).is_some_and(|l| {
                    &l.mac == mac
                        && l.state == LeaseState::Offered
                        && l.expires > now
                        && Some(*ip) != keep
                })
            })
            .take(64)
            .collect();
        for ip in stale {
            if let Some(l) = table.get(&ip).cloned() {
                self.store(
                    &mut table,
                    ip,
                    Lease {
                        state: LeaseState::Released,
                        expires: now,
                        ..l
                    },
                )?;
            }
        }
        Ok(())
    }

    /// The client found `ip` in use (RFC 2131 DHCPDECLINE): quarantine it.
    /// Only the address's current holder (or a free address) can be declined.
    pub fn decline(
        &self,
        mac: &Mac,
        net: &Network,
        ip: Ipv4Addr,
        now: u64,
    ) -> Result<bool, RelayError> {
        if !in_pool(net, ip) {
            return Ok(false);
        }
        let mut table = self.lock();
        match availability(table.get(&ip), mac, now) {
            Avail::Taken => return Ok(false),
            Avail::Never | Avail::Expired | Avail::Mine => {}
        }
        let lease = Lease {
            mac: *mac,
            network: net.name.clone(),
            state: LeaseState::Declined,
            expires: now.saturating_add(DECLINE_QUARANTINE_SECS),
        };
        self.store(&mut table, ip, lease)?;
        Ok(true)
    }

    /// Make every change so far durable: append what is pending to the
    /// log and `fdatasync` it (one sync covers every change made before this
    /// call), then compact the log if it has grown far beyond the table.
    pub fn flush(&self) -> Result<(), RelayError> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let (bytes, count) = {
            let mut t = self.lock();
            let count = std::mem::take(&mut t.pending_records);
            (std::mem::take(&mut t.pending), count)
        };
        if let Err(e) = log.append_sync(&bytes, count) {
            // Keep the changes for the next attempt, in front of newer ones.
            let mut t = self.lock();
            let newer = std::mem::replace(&mut t.pending, bytes);
            t.pending.extend_from_slice(&newer);
            t.pending_records += count;
            return Err(e);
        }
        let snapshot = {
            let t = self.lock();
            if !log.wants_compaction(t.by_ip.len() as u64) {
                return Ok(());
            }
            t.by_ip
                .iter()
                .map(|(ip, l)| (*ip, l.clone()))
                .collect::<Vec<_>>()
        };
        // Changes made after the snapshot are still pending and will be
        // appended after the image; ones made between the append above and
        // the snapshot are in both, which a replay (last record wins) absorbs.
        let mut image = Vec::with_capacity(snapshot.len() * 96);
        for (ip, lease) in &snapshot {
            leaselog::encode(&mut image, *ip, lease)?;
        }
        log.replace(&image, snapshot.len() as u64)?;
        tracing::debug!(
            leases = snapshot.len(),
            "dhcp-leases: compacted the lease log"
        );
        Ok(())
    }

    pub async fn flush_async(&self) -> Result<(), RelayError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.flush())
            .await
            .map_err(|e| RelayError::Io(std::io::Error::other(e)))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(pool: (&str, &str)) -> Network {
        Network {
            name: "prov".into(),
            rack: "r1".into(),
            subnet: "10.20.0.0/24".parse().unwrap(),
            gateway: Some("10.20.0.1".parse().unwrap()),
            dns: vec![],
            domain: String::new(),
            mtu: 1500,
            vlan: None,
            pool: Some((pool.0.parse().unwrap(), pool.1.parse().unwrap())),
            lease_seconds: 600,
            interface: String::new(),
            meta: Default::default(),
        }
    }

    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn pool_range_clamps_to_the_subnet() {
        assert_eq!(
            pool_range(&net(("10.20.0.0", "10.20.0.255"))),
            Some((u32::from(ip("10.20.0.1")), u32::from(ip("10.20.0.254"))))
        );
        assert_eq!(pool_range(&net(("10.20.0.9", "10.20.0.3"))), None);
        assert_eq!(pool_range(&net(("10.30.0.1", "10.30.0.9"))), None);
        let mut n = net(("10.20.0.1", "10.20.0.2"));
        n.pool = None;
        assert_eq!(pool_range(&n), None);
    }

    #[test]
    fn offer_commit_release_decline() {
        let dir = tempfile::tempdir().unwrap();
        let l = Leases::open(dir.path(), None).unwrap();
        let n = net(("10.20.0.200", "10.20.0.202"));
        let none = |_: Ipv4Addr| false;
        let a = l
            .offer(&mac(1), &n, &none, None, 1000, 30)
            .unwrap()
            .unwrap();
        assert_eq!(a, ip("10.20.0.200"));
        // Held: another MAC gets another address; the same MAC the same one.
        assert_eq!(
            l.offer(&mac(2), &n, &none, Some(a), 1000, 30).unwrap(),
            Some(ip("10.20.0.201"))
        );
        assert_eq!(
            l.offer(&mac(1), &n, &none, None, 1001, 30).unwrap(),
            Some(a)
        );
        // Offer hold over: the address is free again, never-used ones first.
        assert_eq!(
            l.commit(&mac(3), &n, &none, a, 1000, 600).unwrap(),
            Commit::Refused
        );
        assert_eq!(
            l.commit(&mac(1), &n, &none, a, 1002, 600).unwrap(),
            Commit::Bound { new: true }
        );
        assert_eq!(
            l.commit(&mac(1), &n, &none, a, 1100, 600).unwrap(),
            Commit::Bound { new: false }
        );
        assert!(l.holds(&mac(1), a, 1100));
        assert!(!l.holds(&mac(2), a, 1100));
        assert!(l.release(&mac(1), a, 1200).unwrap());
        assert!(!l.holds(&mac(1), a, 1200));
        // Released: MAC 1 still gets it back first.
        assert_eq!(
            l.offer(&mac(1), &n, &none, None, 1201, 30).unwrap(),
            Some(a)
        );
        // Decline: quarantined for everyone, including the decliner.
        assert!(l.decline(&mac(1), &n, a, 1202).unwrap());
        assert_eq!(
            l.offer(&mac(1), &n, &none, None, 1203, 30).unwrap(),
            Some(ip("10.20.0.202"))
        );
        assert_eq!(
            l.commit(&mac(4), &n, &none, a, 1203, 600).unwrap(),
            Commit::Refused
        );
        let later = 1202 + DECLINE_QUARANTINE_SECS;
        assert_eq!(
            l.commit(&mac(4), &n, &none, a, later, 600).unwrap(),
            Commit::Bound { new: true }
        );
    }

    #[test]
    fn excluded_addresses_never_leave_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let l = Leases::open(dir.path(), None).unwrap();
        let n = net(("10.20.0.200", "10.20.0.201"));
        let ex = |a: Ipv4Addr| a == ip("10.20.0.200");
        assert_eq!(
            l.offer(&mac(1), &n, &ex, Some(ip("10.20.0.200")), 10, 30)
                .unwrap(),
            Some(ip("10.20.0.201"))
        );
        assert_eq!(l.offer(&mac(2), &n, &ex, None, 10, 30).unwrap(), None);
        assert_eq!(
            l.commit(&mac(2), &n, &ex, ip("10.20.0.200"), 10, 600)
                .unwrap(),
            Commit::Refused
        );
    }

    #[test]
    fn only_flushed_changes_survive_a_restart_and_sled_leases_are_imported() {
        let dir = tempfile::tempdir().unwrap();
        let n = net(("10.20.0.10", "10.20.0.20"));
        let none = |_: Ipv4Addr| false;
        // A relay from before the lease log: its leases are in sled.
        let db = crate::durable::test_db(dir.path().join("sled"));
        let old = Lease {
            mac: mac(7u8),
            network: "prov".into(),
            state: LeaseState::Bound,
            expires: 5000,
        };
        db.open_tree("dhcp-leases")
            .unwrap()
            .insert(ip("10.20.0.15").octets(), serde_json::to_vec(&old).unwrap())
            .unwrap();
        let l = Leases::open(dir.path(), Some(&db)).unwrap();
        assert_eq!(l.get(ip("10.20.0.15")), Some(old.clone()));
        assert!(db.open_tree("dhcp-leases").unwrap().is_empty());
        let a = l
            .offer(&mac(1), &n, &none, None, 1000, 30)
            .unwrap()
            .unwrap();
        l.commit(&mac(1), &n, &none, a, 1000, 600).unwrap();
        l.flush().unwrap();
        // Not flushed: lost on a crash, which is fine because no ACK for it
        // could have left.
        let b = l
            .offer(&mac(2), &n, &none, None, 1000, 30)
            .unwrap()
            .unwrap();
        l.commit(&mac(2), &n, &none, b, 1000, 600).unwrap();
        drop(l);
        let l = Leases::open(dir.path(), Some(&db)).unwrap();
        assert!(l.holds(&mac(1), a, 1001));
        assert!(!l.holds(&mac(2), b, 1001));
        assert_eq!(l.get(ip("10.20.0.15")), Some(old));
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    fn mac(i: u32) -> Mac {
        let b = i.to_be_bytes();
        Mac([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn many_clients_get_distinct_addresses_and_the_indexes_stay_true() {
        let dir = tempfile::tempdir().unwrap();
        let l = Leases::open(dir.path(), None).unwrap();
        let n = Network {
            name: "big".into(),
            rack: "r1".into(),
            subnet: "10.40.0.0/16".parse().unwrap(),
            gateway: None,
            dns: vec![],
            domain: String::new(),
            mtu: 1500,
            vlan: None,
            pool: Some((
                "10.40.0.10".parse().unwrap(),
                "10.40.39.255".parse().unwrap(),
            )),
            lease_seconds: 600,
            interface: String::new(),
            meta: Default::default(),
        };
        let reserved: Ipv4Addr = "10.40.0.12".parse().unwrap();
        let excluded = |ip: Ipv4Addr| ip == reserved;
        let mut seen = std::collections::HashSet::new();
        for i in 0..5_000 {
            let ip = l
                .offer(&mac(i), &n, &excluded, None, 100, 30)
                .unwrap()
                .unwrap();
            assert_ne!(ip, reserved);
            assert!(seen.insert(ip), "{ip} handed out twice");
            assert!(matches!(
                l.commit(&mac(i), &n, &excluded, ip, 101, 600).unwrap(),
                Commit::Bound { new: true }
            ));
        }
        // A returning MAC gets its own address back through the MAC index.
        let again = l
            .offer(&mac(1234), &n, &excluded, None, 200, 30)
            .unwrap()
            .unwrap();
        assert!(l.holds(&mac(1234), again, 200));
        // Reopened from the log: same indexes.
        l.flush().unwrap();
        drop(l);
        let l = Leases::open(dir.path(), None).unwrap();
        assert_eq!(
            l.offer(&mac(1234), &n, &excluded, None, 300, 30).unwrap(),
            Some(again)
        );
        let fresh = l
            .offer(&mac(99_999), &n, &excluded, None, 300, 30)
            .unwrap()
            .unwrap();
        assert!(!seen.contains(&fresh));
    }
}
