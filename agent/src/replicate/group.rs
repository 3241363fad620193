//! Group points on the agent's side: where the coordinator's clock is, and when this
//! machine's next group cut is due (issue 16, decision 0027).
//!
//! The network side feeds [`GroupClock`] with the process server's [`GroupSchedule`] and
//! with clock probes (`TimeProbe` / `TimeReply`, every second); the producer asks it for
//! the next [`GroupTarget`] and runs a group round that takes its instant at the target
//! (`pipeline::round` with `CutRequest::Group`).
//!
//! # Invariants
//! - **An offset is used only with a bound on its error.** A probe sent at local `t0`,
//!   received by the server at `t1`, answered at `t2` and back at local `t3` puts the
//!   local clock minus the server's at `((t0 - t1) + (t3 - t2)) / 2`, off by at most
//!   `((t3 - t0) - (t2 - t1)) / 2` (the one-way delays are unknown but non-negative).
//!   The sample with the smallest such bound among the recent ones wins; its bound grows
//!   by [`DRIFT_PPM`] of its age, the most two crystal clocks drift apart.
//! - **A clock step voids the samples.** Each sample remembers the local wall clock minus
//!   CLOCK_MONOTONIC; if that moved by more than [`STEP_NS`] since, the wall clock was set
//!   (NTP step, an operator), and the sample says nothing about the clocks now.
//! - **No group cut without a fresh sample**: none younger than [`MAX_SAMPLE_AGE`], no
//!   target (the cut is then an ordinary crash-consistent cut, unstamped).
//! - The bound of the server's own offset to the coordinator (a joined server measures
//!   it) is added to the agent's: errors of the two hops add.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use ripcord_proto::{GroupSchedule, GroupStamp, TimeReply};

use crate::clock::{now_mono_ns, now_wall_ns};

/// How many recent probe samples are kept.
const SAMPLES: usize = 16;
/// Samples older than this are not used.
const MAX_SAMPLE_AGE: Duration = Duration::from_secs(30);
/// Most two clocks drift apart, in parts per million (crystals are within ±100 ppm;
/// NTP-disciplined hosts far better).
pub const DRIFT_PPM: u64 = 200;
/// A change of the wall clock against CLOCK_MONOTONIC larger than this is a step.
const STEP_NS: u64 = 1_000_000;

/// One probe round trip.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Local wall clock minus the server's (ns).
    offset_ns: i64,
    /// Bound on the error of `offset_ns` at `taken_mono` (ns).
    error_ns: u64,
    taken_mono: u64,
    /// Local wall clock minus CLOCK_MONOTONIC when taken.
    wall_minus_mono: i128,
}

/// The next group cut of this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupTarget {
    /// The instant to cut at, on the local wall clock (`now_wall_ns`).
    pub local_ns: u64,
    /// The stamp the cut carries, its `error_ns` still without the cut's own lateness.
    pub stamp: GroupStamp,
    /// Largest error a stamped cut may have (half the group's limit).
    pub max_error_ns: u64,
    /// An application-consistent group point: the agent freezes its file systems before
    /// the instant and cuts while frozen (`points::group_app_point`).
    pub app: bool,
    /// CLOCK_MONOTONIC and the wall clock minus it when the target was handed out: the
    /// cut checks that the wall clock was not stepped since, and adds the drift over the
    /// time since to its error ([`GroupTarget::clock_at`]).
    pub due_mono_ns: u64,
    due_wall_minus_mono: i128,
}

impl GroupTarget {
    /// The error the target's offset has at the local clocks `wall`, `mono` (grown by
    /// [`DRIFT_PPM`] since it was handed out), or `None` if the wall clock was stepped
    /// since (the target's `local_ns` then no longer names the coordinator's instant).
    pub fn clock_at(&self, wall: u64, mono: u64) -> Option<u64> {
        let step = wall_minus_mono(wall, mono) - self.due_wall_minus_mono;
        if step.unsigned_abs() > u128::from(STEP_NS) {
            return None;
        }
        let age = mono.saturating_sub(self.due_mono_ns);
        Some(self.stamp.error_ns + age / 1_000_000 * DRIFT_PPM)
    }

    /// The same instant, crash-consistent (an application-consistent attempt failed).
    pub fn crash_consistent(self) -> GroupTarget {
        GroupTarget { app: false, ..self }
    }

    /// The offset's error as it will have grown by the instant (`local_ns`): how far
    /// before and after it an application-consistent member must be frozen.
    pub fn error_at_instant(&self) -> u64 {
        let due_wall = i128::from(self.due_mono_ns) + self.due_wall_minus_mono;
        let lead = (i128::from(self.local_ns) - due_wall).max(0) as u64;
        self.stamp.error_ns + lead / 1_000_000 * DRIFT_PPM
    }
}

/// What the network side learnt about the group and the clocks; shared with the producer.
#[derive(Debug, Default)]
pub struct GroupClock {
    schedule: Option<GroupSchedule>,
    samples: VecDeque<Sample>,
    /// The instant (coordinator clock) of the last target handed out, so each is taken once.
    last_instant: u64,
}

/// The shared handle.
pub type SharedGroupClock = Arc<Mutex<GroupClock>>;

fn wall_minus_mono(wall: u64, mono: u64) -> i128 {
    i128::from(wall) - i128::from(mono)
}

impl GroupClock {
    /// The server's schedule for this machine (members 0: in no group).
    pub fn set_schedule(&mut self, schedule: GroupSchedule) {
        let changed = self.schedule.map(|s| (s.group, s.interval_ms, s.members))
            != Some((schedule.group, schedule.interval_ms, schedule.members));
        if changed {
            if schedule.members == 0 {
                tracing::info!("this machine is in no consistency group");
            } else {
                tracing::info!(
                    group = %schedule.group,
                    interval_ms = schedule.interval_ms,
                    members = schedule.members,
                    max_error_ms = schedule.max_error_ns as f64 / 1e6,
                    "consistency group: a group cut at every multiple of the interval of the \
                     coordinator's clock"
                );
            }
        }
        self.schedule = (schedule.members > 0).then_some(schedule);
    }

    /// A probe's answer: `sent` and `received` are the local wall clock when the probe
    /// left and when the reply arrived, `mono` CLOCK_MONOTONIC at arrival.
    pub fn add_sample(&mut self, sent: u64, reply: &TimeReply, received: u64, mono: u64) {
        let Some((offset_ns, error_ns)) =
            ripcord_proto::clock_offset(sent, reply.received_ns, reply.sent_ns, received)
        else {
            return; // the wall clock went back during the probe: useless
        };
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            offset_ns,
            error_ns,
            taken_mono: mono,
            wall_minus_mono: wall_minus_mono(received, mono),
        });
    }

    /// The best current estimate of the local clock minus the coordinator's, and its error
    /// bound, at local `(wall, mono)`; `None` without a usable sample or schedule.
    pub fn offset_at(&self, wall: u64, mono: u64) -> Option<(i64, u64)> {
        let schedule = self.schedule?;
        let now_delta = wall_minus_mono(wall, mono);
        let best = self
            .samples
            .iter()
            .filter(|s| {
                let age = mono.saturating_sub(s.taken_mono);
                age <= MAX_SAMPLE_AGE.as_nanos() as u64
                    && (now_delta - s.wall_minus_mono).unsigned_abs() <= u128::from(STEP_NS)
            })
            .map(|s| {
                let age = mono.saturating_sub(s.taken_mono);
                (s.error_ns + age / 1_000_000 * DRIFT_PPM, s.offset_ns)
            })
            .min()?;
        // Local − coordinator = (local − server) + (server − coordinator).
        let offset = best.1.checked_add(schedule.coordinator_offset_ns)?;
        Some((offset, best.0 + schedule.coordinator_error_ns))
    }

    /// The next group cut if one is due within `lead` of the local `wall` clock (within
    /// `lead + app_lead` for an application-consistent one, which freezes first), once per
    /// instant.
    pub fn due(
        &mut self,
        wall: u64,
        mono: u64,
        lead: Duration,
        app_lead: Duration,
    ) -> Option<GroupTarget> {
        let schedule = self.schedule?;
        let (offset, error) = self.offset_at(wall, mono)?;
        let interval = schedule.interval_ms * 1_000_000;
        // The coordinator's clock now, and its next multiple of the interval.
        let coordinator_now = wall.checked_add_signed(-offset)?;
        let instant = coordinator_now.div_ceil(interval) * interval;
        if instant <= self.last_instant {
            return None;
        }
        let local_ns = instant.checked_add_signed(offset)?;
        let app = schedule.app_every > 0
            && (instant / interval).is_multiple_of(u64::from(schedule.app_every));
        let lead = if app { lead + app_lead } else { lead };
        if local_ns.saturating_sub(wall) > lead.as_nanos() as u64 {
            return None;
        }
        self.last_instant = instant;
        Some(GroupTarget {
            local_ns,
            stamp: GroupStamp {
                group: schedule.group,
                instant_ns: instant,
                members: schedule.members,
                offset_ns: offset,
                error_ns: error,
            },
            max_error_ns: schedule.max_error_ns / 2,
            app,
            due_mono_ns: mono,
            due_wall_minus_mono: wall_minus_mono(wall, mono),
        })
    }
}

/// The next due target from the shared clock (see [`GroupClock::due`]).
pub fn next_target(
    clock: &SharedGroupClock,
    lead: Duration,
    app_lead: Duration,
) -> Option<GroupTarget> {
    clock
        .lock()
        .expect("group clock lock")
        .due(now_wall_ns(), now_mono_ns(), lead, app_lead)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_proto::GroupId;

    fn schedule(members: u16) -> GroupSchedule {
        GroupSchedule {
            group: GroupId([1; 16]),
            interval_ms: 1000,
            members,
            max_error_ns: 10_000_000,
            coordinator_offset_ns: 0,
            coordinator_error_ns: 0,
            app_every: 0,
        }
    }

    /// A probe against a server whose clock is `skew` behind ours, with one-way delays
    /// `out` and `back` and a hold of `held` (all ns).
    fn probe(c: &mut GroupClock, at: u64, skew: i64, out: u64, held: u64, back: u64) {
        let server_rx = (at + out).checked_add_signed(-skew).unwrap();
        let reply = TimeReply {
            nonce: 0,
            received_ns: server_rx,
            sent_ns: server_rx + held,
        };
        let received = at + out + held + back;
        c.add_sample(at, &reply, received, received - 1_000_000_000);
    }

    #[test]
    fn the_offset_is_within_its_bound_whatever_the_asymmetry() {
        for (out, back) in [(10_000, 10_000), (1_000, 90_000), (90_000, 1_000)] {
            let mut c = GroupClock::default();
            c.set_schedule(schedule(2));
            let skew = 250_000_000;
            probe(&mut c, 5_000_000_000, skew, out, 5_000, back);
            let (offset, error) = c.offset_at(5_001_000_000, 4_001_000_000).unwrap();
            assert!(
                (offset - skew).unsigned_abs() <= error,
                "offset {offset} vs {skew} ± {error}"
            );
            assert!(error <= (out + back) / 2 + 1, "{error}");
        }
    }

    #[test]
    fn the_tightest_sample_wins_and_a_clock_step_voids_samples() {
        let mut c = GroupClock::default();
        c.set_schedule(schedule(2));
        probe(&mut c, 1_000_000_000, 7, 50_000, 0, 50_000);
        probe(&mut c, 1_100_000_000, 7, 2_000, 0, 2_000);
        let (_, error) = c.offset_at(1_100_004_000, 100_004_000).unwrap();
        assert_eq!(error, 2_000, "half of a 4 µs round trip, no age yet");
        // The wall clock jumps 5 s against the monotonic one: nothing is usable.
        assert_eq!(c.offset_at(6_100_004_000, 100_004_000), None);
    }

    #[test]
    fn targets_fall_on_multiples_of_the_interval_of_the_coordinators_clock_once_each() {
        let mut c = GroupClock::default();
        c.set_schedule(schedule(3));
        let skew = 300_000_000; // we are 300 ms ahead of the coordinator
        probe(&mut c, 9_900_000_000, skew, 1_000, 0, 1_000);
        let mono = 8_900_002_000;
        // Coordinator now ≈ 9.6 s: the next instant is 10 s, local 10.3 s, 400 ms away.
        assert_eq!(
            c.due(
                9_900_002_000,
                mono,
                Duration::from_millis(100),
                Duration::ZERO
            ),
            None
        );
        let t = c
            .due(
                10_250_000_000,
                mono + 350_000_000,
                Duration::from_millis(100),
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(t.stamp.instant_ns, 10_000_000_000);
        assert_eq!(t.local_ns, 10_300_000_000);
        assert_eq!(t.stamp.members, 3);
        assert_eq!(t.max_error_ns, 5_000_000);
        assert_eq!(
            c.due(
                10_260_000_000,
                mono + 360_000_000,
                Duration::from_millis(100),
                Duration::ZERO,
            ),
            None,
            "an instant is handed out once"
        );
        // Every second instant application-consistent: 12 s is one, 11 s is not, and an
        // application-consistent one is handed out a freeze lead earlier.
        let mut sched = schedule(3);
        sched.app_every = 2;
        c.set_schedule(sched);
        let lead = Duration::from_millis(100);
        let app_lead = Duration::from_secs(1);
        let t = c.due(10_900_000_000, mono + 1_000_000_000, lead, app_lead);
        assert_eq!(t, None, "11.3 s is 400 ms away and not app");
        let t = c
            .due(11_250_000_000, mono + 1_350_000_000, lead, app_lead)
            .unwrap();
        assert!(!t.app && t.stamp.instant_ns == 11_000_000_000);
        let t = c
            .due(11_500_000_000, mono + 1_600_000_000, lead, app_lead)
            .unwrap();
        assert!(t.app && t.stamp.instant_ns == 12_000_000_000, "{t:?}");
        // Leaving the group: no more targets.
        c.set_schedule(schedule(0));
        assert_eq!(
            c.due(
                11_250_000_000,
                mono + 1_350_000_000,
                Duration::from_millis(100),
                Duration::ZERO,
            ),
            None
        );
    }
}
