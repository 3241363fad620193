//! The in-flight table as the agent sees it: queued writes whose completion has not been
//! reported, the ones stalled past [`super::LOST_AFTER`] (completed unseen, or stuck: read
//! back once), and the ranges a round must read because one of them may have completed
//! before its instant without the completion probe running (decision 0005).

use std::{sync::atomic::Ordering, time::Duration};

use agent_common::{INFLIGHT_CLAIMING, INFLIGHT_SLOTS, INFLIGHT_WORDS_PER_SLOT, InflightBio};

use super::Capture;

/// A queued write whose completion was never reported (see [`Capture::stalled`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    /// The bio's address and queue time.
    pub id: (u64, u64),
    /// (slot, device-relative sector, sectors) of every protected device it touches.
    pub ranges: Vec<(usize, u64, u64)>,
}

impl Capture {
    /// Queued writes without a reported completion for longer than `after`, each returned
    /// once. Their completion happened unseen (or the device is stuck): the caller must
    /// read their ranges back. The entries stay in the map, so a completion that does
    /// come later is still reported.
    pub fn stalled(&mut self, after: Duration) -> Vec<Stalled> {
        let snapshot = self.inflight();
        self.stalled_in(&snapshot, after)
    }

    /// [`Capture::stalled`] over a snapshot the caller already took.
    pub fn stalled_in(&mut self, snapshot: &[InflightBio], after: Duration) -> Vec<Stalled> {
        let now = crate::clock::now_mono_ns();
        let limit = after.as_nanos() as u64;
        let mut out = Vec::new();
        for b in snapshot {
            let id = (b.bio, b.queued_ns);
            if now.saturating_sub(b.queued_ns) < limit || !self.reported.insert(id) {
                continue;
            }
            let ranges = self.protected_ranges(b);
            out.push(Stalled { id, ranges });
        }
        // Forget reports whose slot is gone (freed by a late completion or reused), so the
        // set stays small.
        if self.reported.len() > 4 * INFLIGHT_SLOTS as usize {
            let live: std::collections::HashSet<(u64, u64)> = self
                .inflight()
                .iter()
                .map(|b| (b.bio, b.queued_ns))
                .collect();
            self.reported.retain(|id| live.contains(id));
        }
        out
    }

    /// Data bios queued on protected disks whose completion has not been reported. Most
    /// are in flight; one that stays long was completed without the completion probe
    /// being run. Every write in the table for the whole walk is in the result; one
    /// claimed or freed during it may or may not be.
    pub fn inflight(&self) -> Vec<InflightBio> {
        let w = |i: usize| self.inflight.word(i).load(Ordering::Acquire);
        let mut out = Vec::new();
        for slot in 0..INFLIGHT_SLOTS as usize {
            let base = slot * INFLIGHT_WORDS_PER_SLOT as usize;
            let bio = w(base);
            if bio <= INFLIGHT_CLAIMING {
                continue;
            }
            let (queued_ns, sector, dev_sectors, op) =
                (w(base + 1), w(base + 2), w(base + 3), w(base + 4));
            // Rewritten meanwhile (freed and claimed again): that write is newer than
            // the walk's start, so skipping it is safe.
            if w(base) != bio || w(base + 1) != queued_ns {
                continue;
            }
            out.push(InflightBio {
                bio,
                queued_ns,
                sector,
                dev: dev_sectors as u32,
                sectors: (dev_sectors >> 32) as u32,
                op: op as u32,
                _pad: 0,
            });
        }
        out
    }

    /// (slot, device-relative sector, sectors) of every protected range the in-flight
    /// writes of `snapshot` touch. A round reads them after its instant: one of them may
    /// have completed before it without the completion probe running, and reading the
    /// range after the instant captures it either way. Writes already reported stalled
    /// stay in: one may still complete unseen later (a slow device, not a lost
    /// completion), and every cut until its entry goes must read its range after the
    /// cut's instant, or the cut would claim a state without it.
    pub fn inflight_ranges(&self, snapshot: &[InflightBio]) -> Vec<(usize, u64, u64)> {
        snapshot
            .iter()
            .flat_map(|b| self.protected_ranges(b))
            .collect()
    }

    /// The parts of `bio` on protected devices, as (slot, device-relative sector, sectors).
    pub(super) fn protected_ranges(&self, bio: &InflightBio) -> Vec<(usize, u64, u64)> {
        let end = bio.sector.saturating_add(u64::from(bio.sectors));
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.disk.kernel() == bio.dev)
            .filter_map(|(slot, d)| {
                let lo = bio.sector.max(d.start);
                let hi = end.min(d.start + d.sectors);
                (lo < hi).then_some((slot, lo - d.start, hi - lo))
            })
            .collect()
    }
}
