//! Power and boot-device jobs in the replicated state machine.
//!
//! A job is a `Record::Job` (so Get/List and the change history see it) plus
//! a few keys of its own under `s:job:`:
//! - `s:job:next`                      next job number (u64 BE); ids are `j-<number>`
//! - `s:job:active:<rack>:<id>`        non-terminal jobs of a rack (what leasing scans)
//! - `s:job:key:<idempotency key>`     JSON list of the job ids a submission created
//!
//! Every command carries the proposer's clock (`now_ms`), so every replica
//! applies the same thing. Lease expiry is evaluated lazily when a relay
//! leases: a job whose lease ran out is leased again with `attempts + 1`,
//! and `attempts` is the lease token: a report must name the token of the
//! current lease, so a relay that lost its lease (it stalled or died and the
//! job went to another relay) cannot complete the job a second time.
//!
//! Per host, only the oldest active job may be leased: jobs of one host run
//! one after another, in submission order, cluster-wide.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{CoordError, StateError};
use crate::model::{Job, JobState, Kind, Record};
use crate::state::{Change, ChangeOp, ItemResult, Outcome, Txn};

/// Actions a job may carry (the words `pxemeshctl power|bootdev` map to).
pub const ACTIONS: [&str; 8] = [
    "power-on",
    "power-off",
    "power-soft",
    "power-cycle",
    "power-reset",
    "power-status",
    "bootdev-pxe",
    "bootdev-disk",
];
/// Arguments a job may carry (bootdev only), with "true"/"false" values.
pub const ARGS: [&str; 2] = ["uefi", "persistent"];
/// Non-terminal jobs per rack; submissions beyond are refused.
pub const MAX_ACTIVE_PER_RACK: usize = 10_000;
/// Hosts per submission.
pub const MAX_HOSTS_PER_SUBMIT: usize = 10_000;
/// Finished jobs are kept until this many newer jobs exist.
pub const JOBS_RETAIN: u64 = 50_000;
/// A job whose lease expired this many times fails instead of being leased again.
pub const MAX_LEASES: u32 = 5;
/// Jobs per lease call.
pub const MAX_LEASE_BATCH: u32 = 256;
/// Lease length bounds (ms).
pub const LEASE_MS_MIN: u64 = 5_000;
pub const LEASE_MS_MAX: u64 = 3_600_000;

const NEXT_KEY: &[u8] = b"s:job:next";

pub fn job_id(n: u64) -> String {
    format!("j-{n:010}")
}

fn active_prefix(rack: &str) -> Vec<u8> {
    format!("s:job:active:{rack}:").into_bytes()
}

fn active_key(rack: &str, id: &str) -> Vec<u8> {
    format!("s:job:active:{rack}:{id}").into_bytes()
}

fn idem_key(key: &str) -> Vec<u8> {
    format!("s:job:key:{key}").into_bytes()
}

pub fn is_terminal(s: JobState) -> bool {
    matches!(
        s,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

pub fn state_word(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Leased => "leased",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// Job commands carried in `Command::Jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobCommand {
    /// One job per host (names resolved by the handler; checked again here).
    Submit {
        action: String,
        args: BTreeMap<String, String>,
        hosts: Vec<String>,
        idempotency_key: String,
        now_ms: u64,
    },
    /// Lease up to `max` jobs of `rack` to `relay` until `now_ms + lease_ms`.
    Lease {
        rack: String,
        relay: String,
        max: u32,
        lease_ms: u64,
        now_ms: u64,
    },
    /// A relay's progress or outcome for the lease with token `token`.
    Report {
        rack: String,
        relay: String,
        id: String,
        token: u32,
        state: JobState,
        reason: String,
        result: String,
        now_ms: u64,
        /// Running: renew the lease until `now_ms + extend_ms` (0 = keep).
        #[serde(default)]
        extend_ms: u64,
    },
    Cancel {
        id: String,
        now_ms: u64,
    },
}

/// What a job command did (the caller stamps revisions and history).
#[derive(Default)]
pub(crate) struct JobEffect {
    pub changes: Vec<Change>,
    pub results: Vec<ItemResult>,
    /// Jobs to answer with (as stored).
    pub records: Vec<Record>,
}

impl JobEffect {
    fn put(
        &mut self,
        txn: &mut Txn,
        mut job: Job,
        created: bool,
        rev: u64,
    ) -> Result<(), CoordError> {
        job.meta.revision = rev;
        if created {
            job.meta.create_revision = rev;
        }
        let rec = Record::Job(job);
        txn.put_record(&rec)?;
        self.changes.push(Change {
            kind: Kind::Job,
            name: rec.name().to_string(),
            op: ChangeOp::Put,
            record: Some(rec.clone()),
            old_rack: None,
        });
        self.results.push(ItemResult {
            kind: Kind::Job,
            name: rec.name().to_string(),
            outcome: if created {
                Outcome::Created
            } else {
                Outcome::Updated
            },
        });
        self.records.push(rec);
        Ok(())
    }

    fn unchanged(&mut self, job: Job) {
        self.results.push(ItemResult {
            kind: Kind::Job,
            name: job.id.clone(),
            outcome: Outcome::Unchanged,
        });
        self.records.push(Record::Job(job));
    }
}

fn job(txn: &Txn, id: &str) -> Result<Option<Job>, CoordError> {
    Ok(match txn.record(Kind::Job, id)? {
        Some(Record::Job(j)) => Some(j),
        _ => None,
    })
}

fn not_found(id: &str) -> CoordError {
    StateError::NotFound {
        kind: "job".into(),
        name: id.into(),
    }
    .into()
}

/// The active jobs of a rack, oldest first.
fn active_jobs(txn: &Txn, rack: &str) -> Result<Vec<Job>, CoordError> {
    let prefix = active_prefix(rack);
    let mut out = Vec::new();
    for k in txn.scan(&prefix)?.keys() {
        let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if let Some(j) = job(txn, &id)? {
            out.push(j);
        }
    }
    Ok(out)
}

/// Jobs a lease at `now_ms` would take: per host the oldest active job, when
/// it is queued or its lease has run out. Pure; used by the handler to skip
/// proposing when there is nothing to lease.
pub fn leasable<'a>(active: &'a [Job], now_ms: u64) -> impl Iterator<Item = &'a Job> + 'a {
    let mut seen = BTreeSet::new();
    active.iter().filter(move |j| {
        if !seen.insert(j.host.clone()) {
            return false;
        }
        match j.state {
            JobState::Queued => true,
            JobState::Leased | JobState::Running => j.lease_expires_unix_ms < now_ms,
            _ => false,
        }
    })
}

/// Whether rack `rack` has anything to lease at `now_ms` (read path).
pub fn has_leasable(
    state: &crate::state::State,
    rack: &str,
    now_ms: u64,
) -> Result<bool, CoordError> {
    let txn = Txn::new(state.tree());
    let active = active_jobs(&txn, rack)?;
    let found = leasable(&active, now_ms).next().is_some();
    Ok(found)
}

pub fn validate_action(action: &str, args: &BTreeMap<String, String>) -> Result<(), StateError> {
    if !ACTIONS.contains(&action) {
        return Err(StateError::Invalid(format!(
            "unknown job action {action:?} (expected one of {})",
            ACTIONS.join(", ")
        )));
    }
    for (k, v) in args {
        if !ARGS.contains(&k.as_str()) || !action.starts_with("bootdev-") {
            return Err(StateError::Invalid(format!(
                "job argument {k:?} is not accepted by {action}"
            )));
        }
        if v != "true" && v != "false" {
            return Err(StateError::Invalid(format!(
                "job argument {k}={v:?}: expected true or false"
            )));
        }
    }
    Ok(())
}

pub(crate) fn execute(txn: &mut Txn, cmd: &JobCommand, rev: u64) -> Result<JobEffect, CoordError> {
    let mut eff = JobEffect::default();
    match cmd {
        JobCommand::Submit {
            action,
            args,
            hosts,
            idempotency_key,
            now_ms,
        } => {
            validate_action(action, args)?;
            if hosts.is_empty() {
                return Err(StateError::Invalid("no hosts selected".into()).into());
            }
            if hosts.len() > MAX_HOSTS_PER_SUBMIT {
                return Err(StateError::Invalid(format!(
                    "at most {MAX_HOSTS_PER_SUBMIT} hosts per submission"
                ))
                .into());
            }
            if !idempotency_key.is_empty() {
                if let Some(v) = txn.get(&idem_key(idempotency_key))? {
                    let ids: Vec<String> = serde_json::from_slice(&v)?;
                    for id in ids {
                        if let Some(j) = job(txn, &id)? {
                            eff.unchanged(j);
                        }
                    }
                    return Ok(eff);
                }
            }
            let mut next = crate::state::read_counter(txn.get(NEXT_KEY)?)?.max(1);
            let mut per_rack: BTreeMap<String, usize> = BTreeMap::new();
            let mut ids = Vec::new();
            let mut seen = BTreeSet::new();
            for name in hosts {
                if !seen.insert(name) {
                    continue;
                }
                let host = match txn.record(Kind::Host, name)? {
                    Some(Record::Host(h)) => h,
                    _ => {
                        return Err(
                            StateError::Invalid(format!("job: unknown host {name:?}")).into()
                        )
                    }
                };
                if host.bmc.is_none() {
                    return Err(StateError::Invalid(format!(
                        "host {name} has no BMC configured (host put --bmc-address ...)"
                    ))
                    .into());
                }
                let count = match per_rack.get(&host.rack) {
                    Some(c) => *c,
                    None => txn.scan(&active_prefix(&host.rack))?.len(),
                };
                if count >= MAX_ACTIVE_PER_RACK {
                    return Err(StateError::InUse(format!(
                        "rack {} already has {count} unfinished jobs (limit {MAX_ACTIVE_PER_RACK})",
                        host.rack
                    ))
                    .into());
                }
                per_rack.insert(host.rack.clone(), count + 1);
                let id = job_id(next);
                // Retention: the job JOBS_RETAIN numbers back goes if finished.
                if next > JOBS_RETAIN {
                    let old = job_id(next - JOBS_RETAIN);
                    if let Some(o) = job(txn, &old)? {
                        if is_terminal(o.state) {
                            txn.del(crate::state::rec_key(Kind::Job, &old));
                            eff.changes.push(Change {
                                kind: Kind::Job,
                                name: old.clone(),
                                op: ChangeOp::Delete,
                                record: None,
                                old_rack: Some(o.rack.clone()),
                            });
                        }
                    }
                }
                next += 1;
                txn.put(active_key(&host.rack, &id), host.name.clone().into_bytes());
                ids.push(id.clone());
                let j = Job {
                    id,
                    host: host.name.clone(),
                    rack: host.rack.clone(),
                    action: action.clone(),
                    args: args.clone(),
                    state: JobState::Queued,
                    leased_by: String::new(),
                    lease_expires_unix_ms: 0,
                    attempts: 0,
                    reason: String::new(),
                    result: String::new(),
                    idempotency_key: idempotency_key.clone(),
                    created_unix_ms: *now_ms,
                    updated_unix_ms: *now_ms,
                    meta: Default::default(),
                };
                eff.put(txn, j, true, rev)?;
            }
            txn.put(NEXT_KEY.to_vec(), next.to_be_bytes().to_vec());
            if !idempotency_key.is_empty() {
                txn.put(idem_key(idempotency_key), serde_json::to_vec(&ids)?);
            }
        }
        JobCommand::Lease {
            rack,
            relay,
            max,
            lease_ms,
            now_ms,
        } => {
            let max = (*max).clamp(1, MAX_LEASE_BATCH) as usize;
            let lease_ms = (*lease_ms).clamp(LEASE_MS_MIN, LEASE_MS_MAX);
            let active = active_jobs(txn, rack)?;
            let picked: Vec<Job> = leasable(&active, *now_ms).cloned().collect();
            let mut leased = 0;
            for mut j in picked {
                if leased >= max {
                    break;
                }
                if j.attempts >= MAX_LEASES {
                    j.state = JobState::Failed;
                    j.reason = format!(
                        "gave up after {} leases expired without a report (last relay: {})",
                        j.attempts, j.leased_by
                    );
                    j.updated_unix_ms = *now_ms;
                    txn.del(active_key(rack, &j.id));
                    eff.put(txn, j, false, rev)?;
                    // Not an answer to the relay: keep it out of `records`.
                    eff.records.pop();
                    continue;
                }
                j.state = JobState::Leased;
                j.leased_by = relay.clone();
                j.lease_expires_unix_ms = now_ms.saturating_add(lease_ms);
                j.attempts += 1;
                j.updated_unix_ms = *now_ms;
                eff.put(txn, j, false, rev)?;
                leased += 1;
            }
        }
        JobCommand::Report {
            rack,
            relay,
            id,
            token,
            state,
            reason,
            result,
            now_ms,
            extend_ms,
        } => {
            let Some(mut j) = job(txn, id)? else {
                return Err(not_found(id));
            };
            if &j.rack != rack {
                return Err(not_found(id));
            }
            if !matches!(
                state,
                JobState::Running | JobState::Succeeded | JobState::Failed
            ) {
                return Err(StateError::Invalid(format!(
                    "job {id}: a relay reports running, succeeded or failed, not {}",
                    state_word(*state)
                ))
                .into());
            }
            let same_lease = j.attempts == *token && &j.leased_by == relay;
            if is_terminal(j.state) {
                // A repeated report (the acknowledgement was lost) is answered again.
                if same_lease && j.state == *state {
                    eff.unchanged(j);
                    return Ok(eff);
                }
                return Err(StateError::InUse(format!(
                    "job {id} is already {}; report from relay {relay} (lease {token}) refused",
                    state_word(j.state)
                ))
                .into());
            }
            if !same_lease || j.state == JobState::Queued {
                return Err(StateError::InUse(format!(
                    "stale report for job {id}: lease {token} of relay {relay} was superseded (now lease {} of relay {:?}, {})",
                    j.attempts,
                    j.leased_by,
                    state_word(j.state)
                ))
                .into());
            }
            if *state == JobState::Running {
                if *extend_ms > 0 {
                    let until =
                        now_ms.saturating_add((*extend_ms).clamp(LEASE_MS_MIN, LEASE_MS_MAX));
                    j.lease_expires_unix_ms = j.lease_expires_unix_ms.max(until);
                } else if j.state == JobState::Running {
                    eff.unchanged(j);
                    return Ok(eff);
                }
            }
            j.state = *state;
            j.reason = reason.chars().take(2048).collect();
            j.result = result.chars().take(2048).collect();
            j.updated_unix_ms = *now_ms;
            if is_terminal(j.state) {
                txn.del(active_key(rack, id));
            }
            eff.put(txn, j, false, rev)?;
        }
        JobCommand::Cancel { id, now_ms } => {
            let Some(mut j) = job(txn, id)? else {
                return Err(not_found(id));
            };
            match j.state {
                JobState::Cancelled => eff.unchanged(j),
                JobState::Queued | JobState::Leased => {
                    j.state = JobState::Cancelled;
                    j.reason = "cancelled by an operator".into();
                    j.updated_unix_ms = *now_ms;
                    txn.del(active_key(&j.rack, id));
                    eff.put(txn, j, false, rev)?;
                }
                JobState::Running => {
                    return Err(StateError::InUse(format!(
                        "job {id} is running on relay {}; it can no longer be cancelled",
                        j.leased_by
                    ))
                    .into())
                }
                s => {
                    return Err(
                        StateError::InUse(format!("job {id} already {}", state_word(s))).into(),
                    )
                }
            }
        }
    }
    Ok(eff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::state::{ApplyOutcome, Command, State};

    fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, State::new(db.open_tree("t").unwrap()))
    }

    fn host(name: &str, n: u8) -> Record {
        Record::Host(Host {
            name: name.into(),
            mac: format!("52:54:00:00:00:{n:02x}").parse().unwrap(),
            ip: Some(format!("10.0.0.{n}").parse().unwrap()),
            hostname: String::new(),
            rack: "r1".into(),
            network: "n1".into(),
            profile: None,
            labels: Default::default(),
            bmc: Some(Bmc {
                address: "127.0.0.1".into(),
                port: 623,
                username: "admin".into(),
                password: None,
                cipher_suite: 3,
            }),
            meta: Meta::default(),
        })
    }

    struct T {
        _d: tempfile::TempDir,
        s: State,
        i: u64,
    }

    impl T {
        fn new() -> T {
            let (d, s) = state();
            let mut t = T { _d: d, s, i: 0 };
            let net = Record::Network(Network {
                name: "n1".into(),
                rack: "r1".into(),
                subnet: "10.0.0.0/24".parse().unwrap(),
                gateway: None,
                dns: vec![],
                domain: String::new(),
                mtu: DEFAULT_MTU,
                vlan: None,
                pool: None,
                lease_seconds: DEFAULT_LEASE_SECONDS,
                interface: String::new(),
                meta: Meta::default(),
            });
            let rack = Record::Rack(Rack {
                name: "r1".into(),
                ..Default::default()
            });
            t.run(Command::Put(vec![rack, net])).unwrap();
            t.run(Command::Put(vec![host("h1", 1), host("h2", 2)]))
                .unwrap();
            t
        }
        fn run(&mut self, cmd: Command) -> Result<ApplyOutcome, StateError> {
            self.i += 1;
            self.s.execute(&cmd, Some((self.i, 1))).unwrap()
        }
        fn jobs(&mut self, jc: JobCommand) -> Result<Vec<Job>, StateError> {
            self.run(Command::Jobs(jc)).map(|o| {
                o.records
                    .into_iter()
                    .filter_map(|r| match r {
                        Record::Job(j) => Some(j),
                        _ => None,
                    })
                    .collect()
            })
        }
        fn submit(&mut self, action: &str, hosts: &[&str], key: &str) -> Vec<Job> {
            self.jobs(JobCommand::Submit {
                action: action.into(),
                args: Default::default(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                idempotency_key: key.into(),
                now_ms: 1000,
            })
            .unwrap()
        }
        fn lease(&mut self, relay: &str, now_ms: u64) -> Vec<Job> {
            self.jobs(JobCommand::Lease {
                rack: "r1".into(),
                relay: relay.into(),
                max: 10,
                lease_ms: 10_000,
                now_ms,
            })
            .unwrap()
        }
        fn report(
            &mut self,
            relay: &str,
            id: &str,
            token: u32,
            state: JobState,
        ) -> Result<Vec<Job>, StateError> {
            self.jobs(JobCommand::Report {
                rack: "r1".into(),
                relay: relay.into(),
                id: id.into(),
                token,
                state,
                reason: String::new(),
                result: "on".into(),
                now_ms: 2000,
                extend_ms: 0,
            })
        }
    }

    #[test]
    fn idempotency_key_returns_the_existing_jobs() {
        let mut t = T::new();
        let a = t.submit("power-on", &["h1", "h2"], "k1");
        assert_eq!(a.len(), 2);
        let rev = t.s.revision().unwrap();
        let b = t.submit("power-on", &["h1", "h2"], "k1");
        assert_eq!(
            a.iter().map(|j| &j.id).collect::<Vec<_>>(),
            b.iter().map(|j| &j.id).collect::<Vec<_>>()
        );
        assert_eq!(t.s.revision().unwrap(), rev, "nothing new written");
        let c = t.submit("power-on", &["h1"], "");
        assert_ne!(c[0].id, a[0].id);
        assert!(t
            .jobs(JobCommand::Submit {
                action: "power-dance".into(),
                args: Default::default(),
                hosts: vec!["h1".into()],
                idempotency_key: String::new(),
                now_ms: 1,
            })
            .is_err());
    }

    #[test]
    fn one_job_per_host_at_a_time_in_order() {
        let mut t = T::new();
        let first = t.submit("bootdev-pxe", &["h1"], "");
        let second = t.submit("power-cycle", &["h1"], "");
        let other = t.submit("power-on", &["h2"], "");
        let leased = t.lease("ra", 5000);
        let ids: Vec<_> = leased.iter().map(|j| j.id.clone()).collect();
        assert_eq!(ids, vec![first[0].id.clone(), other[0].id.clone()]);
        assert!(t.lease("ra", 5001).is_empty(), "the rest waits for h1");
        t.report("ra", &first[0].id, 1, JobState::Succeeded)
            .unwrap();
        let next = t.lease("ra", 6000);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].id, second[0].id);
    }

    #[test]
    fn expired_leases_are_fenced() {
        let mut t = T::new();
        let j = t.submit("power-on", &["h1"], "")[0].clone();
        let l1 = t.lease("ra", 5000);
        assert_eq!((l1[0].attempts, l1[0].lease_expires_unix_ms), (1, 15_000));
        t.report("ra", &j.id, 1, JobState::Running).unwrap();
        assert!(t.lease("rb", 14_000).is_empty(), "lease still valid");
        // A renewal keeps it.
        t.jobs(JobCommand::Report {
            rack: "r1".into(),
            relay: "ra".into(),
            id: j.id.clone(),
            token: 1,
            state: JobState::Running,
            reason: String::new(),
            result: String::new(),
            now_ms: 10_000,
            extend_ms: 10_000,
        })
        .unwrap();
        assert!(t.lease("rb", 15_001).is_empty(), "renewed until 20 000");
        // ra went away; the lease runs out and rb takes the job.
        let l2 = t.lease("rb", 20_001);
        assert_eq!((l2[0].attempts, l2[0].leased_by.as_str()), (2, "rb"));
        // ra's late report is refused, rb's is taken, exactly once.
        let err = t.report("ra", &j.id, 1, JobState::Succeeded).unwrap_err();
        assert!(err.to_string().contains("stale report"), "{err}");
        t.report("rb", &j.id, 2, JobState::Succeeded).unwrap();
        // The same report again (lost acknowledgement) answers unchanged.
        let rev = t.s.revision().unwrap();
        let again = t.report("rb", &j.id, 2, JobState::Succeeded).unwrap();
        assert_eq!(again[0].state, JobState::Succeeded);
        assert_eq!(t.s.revision().unwrap(), rev);
        assert!(t.report("rb", &j.id, 2, JobState::Failed).is_err());
        assert!(t.lease("rb", 100_000).is_empty());
    }

    #[test]
    fn leases_that_keep_expiring_fail_the_job() {
        let mut t = T::new();
        let j = t.submit("power-on", &["h1"], "")[0].clone();
        let mut now = 1000;
        for _ in 0..MAX_LEASES {
            assert_eq!(t.lease("ra", now).len(), 1);
            now += 20_000;
        }
        assert!(t.lease("ra", now).is_empty());
        match t.s.get(Kind::Job, &j.id).unwrap() {
            Some(Record::Job(j)) => {
                assert_eq!(j.state, JobState::Failed);
                assert!(j.reason.contains("leases expired"), "{}", j.reason);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cancel_queued_and_leased_not_running() {
        let mut t = T::new();
        let a = t.submit("power-on", &["h1"], "")[0].clone();
        let b = t.submit("power-on", &["h2"], "")[0].clone();
        let c = t.jobs(JobCommand::Cancel {
            id: a.id.clone(),
            now_ms: 3,
        });
        assert_eq!(c.unwrap()[0].state, JobState::Cancelled);
        let leased = t.lease("ra", 5000);
        assert_eq!(leased.len(), 1);
        t.report("ra", &b.id, 1, JobState::Running).unwrap();
        let err = t
            .jobs(JobCommand::Cancel {
                id: b.id.clone(),
                now_ms: 3,
            })
            .unwrap_err();
        assert!(err.to_string().contains("running"), "{err}");
    }
}
