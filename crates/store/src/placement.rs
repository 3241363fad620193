//! Authenticated placement: checking a [`Plan`] against the extent lists of the batches
//! it reads, once those lists are authenticated.
//!
//! A plan is derived from index segments and checkpoints, which carry only CRCs, so
//! someone who can write the bucket can move authentic bytes to other sectors, turn data
//! into zeros, or shift an offset inside a batch's plaintext. A batch's extent list,
//! however, is part of the AEAD additional data it was sealed with
//! (`ripcord_proto::aead::batch_aad`): once a reader has opened the batch with the data
//! key, the list in its pack record is the agent's. [`Placement::check`] then holds the
//! plan to it.
//!
//! Invariants a passing check establishes for batch `s`, with `net(s)` = the batch's
//! extents applied in order (later extents win, as when the plan was built):
//!
//! 1. **Every run the plan takes from `s` is in `net(s)`**: same sectors, same kind
//!    (data, zero, discard), and for data the same plaintext offset, sector by sector
//!    ([`PlacementProblem::NotWritten`] otherwise). So every byte placed from `s`, and
//!    every zeroed or discarded range attributed to `s`, is covered by the authenticated
//!    extent list of the record it came from.
//! 2. **Nothing `s` wrote is hidden**: every sector of `net(s)` is, in the plan, from `s`
//!    itself or from a later batch; an older batch's content there is
//!    [`PlacementProblem::HiddenByOlder`], a hole is [`PlacementProblem::Unplaced`].
//!
//! Errors name the index object that placed `s` ([`Plan::placed_by`]).
//!
//! Not covered (needs an agent-authenticated summary of the whole map, see decision
//! 0012): a batch the plan does not read at all. Dropping every run of a batch, or its
//! index entry, is only caught where another batch the plan reads contradicts it.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, PlacementProblem, Result};
use crate::format::RunTarget;
use crate::resolve::ExtentMap;
use crate::types::{Extent, Plan, Run};

/// A plan prepared for checking batch by batch (runs grouped by batch once).
#[derive(Debug, Clone)]
pub struct Placement {
    epoch: u64,
    runs: Vec<Run>,
    by_seq: HashMap<u64, Vec<usize>>,
    placed_by: BTreeMap<u64, String>,
}

impl Plan {
    /// Prepares this plan for [`Placement::check`] (once per plan, not per batch).
    pub fn placement(&self) -> Placement {
        let mut by_seq: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, r) in self.runs.iter().enumerate() {
            by_seq.entry(r.source.seq()).or_default().push(i);
        }
        Placement {
            epoch: self.epoch.epoch,
            runs: self.runs.clone(),
            by_seq,
            placed_by: self.placed_by.clone(),
        }
    }

    /// Checks batch `seq` alone against its authenticated extent list (see
    /// [`Placement::check`]; for many batches, build [`Plan::placement`] once).
    pub fn check_placement(&self, seq: u64, authenticated: &[Extent]) -> Result<()> {
        self.placement().check(seq, authenticated)
    }
}

impl Placement {
    /// Runs of every kind the plan takes from batch `seq`, in sector order.
    pub fn runs_of(&self, seq: u64) -> impl Iterator<Item = &Run> {
        self.by_seq
            .get(&seq)
            .into_iter()
            .flatten()
            .map(|&i| &self.runs[i])
    }

    /// Checks that the plan places batch `seq` exactly as `authenticated` (the batch's
    /// extent list, authenticated by opening the batch) says: the invariants in the
    /// module docs. Call it after the batch opened and before placing any of its runs.
    pub fn check(&self, seq: u64, authenticated: &[Extent]) -> Result<()> {
        let mut net = ExtentMap::default();
        net.apply_extents(seq, authenticated);
        for r in self.runs_of(seq) {
            let want: RunTarget = r.source.into();
            if !net.covers(r.sector, r.sector + r.sectors, want) {
                return Err(self.error(seq, r.sector, PlacementProblem::NotWritten));
            }
        }
        for (start, len, _) in net.runs() {
            let end = start + len;
            let mut at = start;
            let mut i = self.runs.partition_point(|r| r.sector + r.sectors <= start);
            while at < end {
                let Some(r) = self.runs.get(i).filter(|r| r.sector <= at) else {
                    return Err(self.error(seq, at, PlacementProblem::Unplaced));
                };
                if r.source.seq() < seq {
                    return Err(self.error(seq, at, PlacementProblem::HiddenByOlder));
                }
                at = r.sector + r.sectors;
                i += 1;
            }
        }
        Ok(())
    }

    fn error(&self, seq: u64, sector: u64, problem: PlacementProblem) -> Error {
        Error::Placement {
            object: self
                .placed_by
                .get(&seq)
                .cloned()
                .unwrap_or_else(|| "(no index object placed this batch)".into()),
            epoch: self.epoch,
            seq,
            sector,
            problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{EpochInfo, ExtentKind, RunSource, SECTOR_BYTES};

    fn ext(sector: u64, sectors: u32, kind: ExtentKind) -> Extent {
        Extent {
            sector,
            sectors,
            kind,
        }
    }

    /// The honest plan of: batch 1 = data 0..8, data 16..20; batch 2 = zero 2..4, data 30..31.
    fn batches() -> Vec<Vec<Extent>> {
        vec![
            vec![ext(0, 8, ExtentKind::Data), ext(16, 4, ExtentKind::Data)],
            vec![ext(2, 2, ExtentKind::Zero), ext(30, 1, ExtentKind::Data)],
        ]
    }

    fn plan(batches: &[Vec<Extent>]) -> Plan {
        let mut map = ExtentMap::default();
        for (i, b) in batches.iter().enumerate() {
            map.apply_extents(i as u64 + 1, b);
        }
        Plan {
            epoch: EpochInfo {
                epoch: 1,
                machine_id: "m".into(),
                size_bytes: 64 * SECTOR_BYTES,
                sector_size: 512,
                wrapped_key: Vec::new(),
                device: None,
            },
            size_bytes: 64 * SECTOR_BYTES,
            runs: map
                .runs()
                .map(|(sector, sectors, t)| Run {
                    sector,
                    sectors,
                    source: t.into(),
                })
                .collect(),
            locations: BTreeMap::new(),
            placed_by: (1..=batches.len() as u64)
                .map(|s| (s, format!("idx-{s}")))
                .collect(),
        }
    }

    fn check_all(p: &Plan, batches: &[Vec<Extent>]) -> Result<()> {
        let pl = p.placement();
        for (i, b) in batches.iter().enumerate() {
            pl.check(i as u64 + 1, b)?;
        }
        Ok(())
    }

    fn problem(r: Result<()>) -> (String, u64, u64, PlacementProblem) {
        match r {
            Err(Error::Placement {
                object,
                seq,
                sector,
                problem,
                ..
            }) => (object, seq, sector, problem),
            other => panic!("expected a placement error, got {other:?}"),
        }
    }

    #[test]
    fn an_honest_plan_passes() {
        let b = batches();
        check_all(&plan(&b), &b).expect("honest plan");
    }

    #[test]
    fn a_run_moved_to_other_sectors_is_not_written_there() {
        let b = batches();
        let mut p = plan(&b);
        let r = p.runs.iter_mut().find(|r| r.sector == 16).expect("run");
        r.sector = 40;
        let (obj, seq, _, pr) = problem(check_all(&p, &b));
        assert_eq!(
            (obj.as_str(), seq, pr),
            ("idx-1", 1, PlacementProblem::NotWritten)
        );
    }

    #[test]
    fn a_shifted_plaintext_offset_is_not_written_there() {
        let b = batches();
        let mut p = plan(&b);
        let r = p.runs.iter_mut().find(|r| r.sector == 16).expect("run");
        r.source = RunSource::Data { seq: 1, offset: 0 };
        assert_eq!(problem(check_all(&p, &b)).3, PlacementProblem::NotWritten);
    }

    #[test]
    fn data_turned_into_zeros_of_the_same_or_another_batch_is_refused() {
        let b = batches();
        for seq in [1, 2] {
            let mut p = plan(&b);
            let r = p.runs.iter_mut().find(|r| r.sector == 16).expect("run");
            r.source = RunSource::Zero { seq };
            // The batch named for the zeros never zeroed sector 16.
            let (_, s, sector, pr) = problem(check_all(&p, &b));
            assert_eq!((s, sector, pr), (seq, 16, PlacementProblem::NotWritten));
        }
    }

    #[test]
    fn a_later_write_dropped_from_the_plan_is_hidden_or_unplaced() {
        let b = batches();
        // Batch 2's zero extent left out of the index: batch 1's bytes show at 2..4.
        let mut told = b.clone();
        told[1].remove(0);
        let (obj, seq, sector, pr) = problem(check_all(&plan(&told), &b));
        assert_eq!(
            (obj.as_str(), seq, sector, pr),
            ("idx-2", 2, 2, PlacementProblem::HiddenByOlder)
        );
        // Batch 1's second extent left out: a hole where it wrote.
        let mut told = b.clone();
        told[0].pop();
        let (_, seq, sector, pr) = problem(check_all(&plan(&told), &b));
        assert_eq!((seq, sector, pr), (1, 16, PlacementProblem::Unplaced));
    }

    #[test]
    fn later_extents_of_a_batch_win_as_in_the_plan() {
        // Within one batch a later extent overwrites an earlier one: the net effect is
        // what the plan must show.
        let b = vec![vec![
            ext(0, 8, ExtentKind::Data),
            ext(2, 2, ExtentKind::Discard),
            ext(6, 4, ExtentKind::Data),
        ]];
        check_all(&plan(&b), &b).expect("honest plan");
    }
}
