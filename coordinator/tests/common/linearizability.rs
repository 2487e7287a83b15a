//! A linearizability checker for register histories (Wing & Gong search with
//! memoisation, in the style of Porcupine), used by the fault-injection tests.
//!
//! Every key is an independent register (linearizability is compositional),
//! checked on its own. Writes carry unique values. An operation whose outcome
//! the client does not know (timeout, error, connection lost) is
//! *indeterminate*: a write may or may not have taken effect, at any time
//! after its invocation; an indeterminate read says nothing and is dropped.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Write a (unique) value.
    Write(String),
    /// A read that returned this value (`None`: the key did not exist).
    Read(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub kind: Kind,
    /// Nanoseconds since the start of the run, taken before the request was sent.
    pub invoke: u64,
    /// Taken after the answer arrived; `None` = indeterminate.
    pub ret: Option<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub keys: usize,
    pub ops: usize,
    pub indeterminate_writes: usize,
    /// Indeterminate writes some read observed (so they took effect).
    pub indeterminate_observed: usize,
    pub dropped_reads: usize,
    pub steps: u64,
}

/// Check a whole history, key by key. `budget` bounds the search steps per
/// key: running out is reported as a failure (never as a pass).
pub fn check(history: &[Op], budget: u64) -> Result<Summary, String> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut sum = Summary {
        keys: by_key.len(),
        ..Default::default()
    };
    for (key, ops) in by_key {
        // An indeterminate write nobody read can always be taken as not
        // having happened: placing it never lets a read return anything it
        // could not otherwise (writes are blind, values unique). Dropping
        // them keeps the search small after crashes.
        let observed: HashSet<&str> = ops
            .iter()
            .filter_map(|o| match &o.kind {
                Kind::Read(Some(v)) if o.ret.is_some() => Some(v.as_str()),
                _ => None,
            })
            .collect();
        let mut kept = Vec::new();
        for op in ops {
            match (&op.kind, op.ret) {
                (Kind::Read(_), None) => sum.dropped_reads += 1,
                (Kind::Write(v), None) => {
                    sum.indeterminate_writes += 1;
                    if observed.contains(v.as_str()) {
                        sum.indeterminate_observed += 1;
                        kept.push(op.clone());
                    }
                }
                _ => kept.push(op.clone()),
            }
        }
        sum.ops += kept.len();
        let steps = check_key(&kept, budget).map_err(|e| format!("key {key:?}: {e}"))?;
        sum.steps += steps;
    }
    Ok(sum)
}

struct Search<'a> {
    ops: &'a [Op],
    /// Return time, `u64::MAX` for indeterminate writes.
    ret: Vec<u64>,
    done: Vec<u64>,
    memo: HashSet<(Vec<u64>, Option<usize>)>,
    steps: u64,
    budget: u64,
    required_left: usize,
    deepest: usize,
    depth: usize,
}

impl Search<'_> {
    fn is_done(&self, i: usize) -> bool {
        self.done[i / 64] & (1 << (i % 64)) != 0
    }
    fn flip(&mut self, i: usize) {
        self.done[i / 64] ^= 1 << (i % 64);
    }

    fn value(&self, state: Option<usize>) -> Option<&str> {
        state.map(|w| match &self.ops[w].kind {
            Kind::Write(v) => v.as_str(),
            Kind::Read(_) => unreachable!("state is always a write"),
        })
    }

    /// Depth-first search for a linearization of the remaining operations
    /// from register state `state` (index of the last write applied).
    fn dfs(&mut self, state: Option<usize>) -> Result<bool, String> {
        if self.required_left == 0 {
            return Ok(true);
        }
        self.steps += 1;
        if self.steps > self.budget {
            return Err(format!(
                "search budget of {} steps exhausted (inconclusive, treated as failure)",
                self.budget
            ));
        }
        if !self.memo.insert((self.done.clone(), state)) {
            return Ok(false);
        }
        let n = self.ops.len();
        // An op may go next only if no remaining op returned before it was invoked.
        let min_ret = (0..n)
            .filter(|i| !self.is_done(*i))
            .map(|i| self.ret[i])
            .min()
            .unwrap_or(u64::MAX);
        let mut candidates: Vec<usize> = (0..n)
            .filter(|i| !self.is_done(*i) && self.ops[*i].invoke <= min_ret)
            .collect();
        // Known outcomes first; indeterminate writes only when needed.
        candidates.sort_by_key(|i| (self.ret[*i] == u64::MAX, self.ops[*i].invoke));
        for i in candidates {
            let next = match &self.ops[i].kind {
                Kind::Write(_) => Some(i),
                Kind::Read(v) => {
                    if v.as_deref() != self.value(state) {
                        continue;
                    }
                    state
                }
            };
            let required = self.ret[i] != u64::MAX;
            self.flip(i);
            if required {
                self.required_left -= 1;
            }
            self.depth += 1;
            self.deepest = self.deepest.max(self.depth);
            let ok = self.dfs(next)?;
            self.depth -= 1;
            if required {
                self.required_left += 1;
            }
            self.flip(i);
            if ok {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Check one key's operations; returns the number of search steps.
pub fn check_key(ops: &[Op], budget: u64) -> Result<u64, String> {
    let mut ops = ops.to_vec();
    ops.sort_by_key(|o| o.invoke);
    let ret: Vec<u64> = ops.iter().map(|o| o.ret.unwrap_or(u64::MAX)).collect();
    let required_left = ops.iter().filter(|o| o.ret.is_some()).count();
    let mut s = Search {
        ops: &ops,
        ret,
        done: vec![0; ops.len().div_ceil(64).max(1)],
        memo: HashSet::new(),
        steps: 0,
        budget,
        required_left,
        deepest: 0,
        depth: 0,
    };
    // The search recurses once per operation: run it on a thread with room.
    let result = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(256 * 1024 * 1024)
            .spawn_scoped(scope, || s.dfs(None).map(|ok| (ok, s.steps, s.deepest)))
            .expect("spawn checker thread")
            .join()
            .expect("checker thread")
    })?;
    match result {
        (true, steps, _) => Ok(steps),
        (false, _, deepest) => {
            let first_unplaced = ops
                .get(deepest.min(ops.len().saturating_sub(1)))
                .map(|o| format!("{o:?}"))
                .unwrap_or_default();
            Err(format!(
                "not linearizable: {} operations, at most {deepest} could be ordered; around {first_unplaced}",
                ops.len()
            ))
        }
    }
}

#[cfg(test)]
mod self_test {
    use super::*;

    fn w(client: usize, v: &str, invoke: u64, ret: Option<u64>) -> Op {
        Op {
            client,
            key: "k".into(),
            kind: Kind::Write(v.into()),
            invoke,
            ret,
        }
    }
    fn r(client: usize, v: Option<&str>, invoke: u64, ret: u64) -> Op {
        Op {
            client,
            key: "k".into(),
            kind: Kind::Read(v.map(String::from)),
            invoke,
            ret: Some(ret),
        }
    }

    #[test]
    fn accepts_sequential_and_concurrent_histories() {
        // Sequential: write a, read a, write b, read b.
        let h = vec![
            w(0, "a", 0, Some(10)),
            r(1, Some("a"), 11, 20),
            w(0, "b", 21, Some(30)),
            r(1, Some("b"), 31, 40),
        ];
        check(&h, 10_000).unwrap();
        // A read concurrent with a write may see either value.
        for seen in [None, Some("a")] {
            let h = vec![w(0, "a", 0, Some(10)), r(1, seen, 5, 15)];
            check(&h, 10_000).unwrap();
        }
        // Reads that overlap can be ordered to fit.
        let h = vec![
            w(0, "a", 0, Some(100)),
            r(1, Some("a"), 10, 20),
            r(2, None, 5, 30),
        ];
        check(&h, 10_000).unwrap();
    }

    #[test]
    fn indeterminate_writes_may_or_may_not_take_effect() {
        // Timed out, later observed: took effect.
        let h = vec![w(0, "a", 0, None), r(1, Some("a"), 50, 60)];
        check(&h, 10_000).unwrap();
        // Timed out, never observed: did not.
        let h = vec![w(0, "a", 0, None), r(1, None, 50, 60)];
        check(&h, 10_000).unwrap();
        // Took effect long after the client gave up (still allowed).
        let h = vec![
            w(0, "a", 0, None),
            r(1, None, 50, 60),
            r(1, Some("a"), 70, 80),
        ];
        check(&h, 10_000).unwrap();
    }

    #[test]
    fn rejects_a_stale_read_after_an_acknowledged_write() {
        let h = vec![
            w(0, "a", 0, Some(10)),
            w(0, "b", 20, Some(30)),
            // Invoked after b was acknowledged, yet sees a: stale.
            r(1, Some("a"), 40, 50),
        ];
        let e = check(&h, 10_000).unwrap_err();
        assert!(e.contains("not linearizable"), "{e}");
    }

    #[test]
    fn rejects_a_lost_acknowledged_write() {
        // b acknowledged, then the key reads as never written.
        let h = vec![w(0, "b", 0, Some(10)), r(1, None, 20, 30)];
        assert!(check(&h, 10_000).is_err());
    }

    #[test]
    fn rejects_a_value_nobody_wrote_and_flip_flops() {
        let h = vec![r(1, Some("ghost"), 0, 10)];
        assert!(check(&h, 10_000).is_err());
        // Two concurrent writes; readers must agree on one order.
        let h = vec![
            w(0, "a", 0, Some(100)),
            w(1, "b", 0, Some(100)),
            r(2, Some("a"), 110, 120),
            r(3, Some("b"), 130, 140),
            r(2, Some("a"), 150, 160),
        ];
        assert!(check(&h, 10_000).is_err());
    }

    #[test]
    fn keys_are_independent() {
        let mut h = vec![w(0, "a", 0, Some(10)), r(1, Some("a"), 20, 30)];
        let mut other = r(1, None, 20, 30);
        other.key = "other".into();
        h.push(other);
        let s = check(&h, 10_000).unwrap();
        assert_eq!(s.keys, 2);
    }
}
