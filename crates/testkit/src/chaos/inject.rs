//! The faults themselves: what each [`Fault`] does to the rig, and how it comes back.

use std::{path::PathBuf, time::Duration};

use rand::RngExt as _;

use super::{Fault, Progress};
use crate::{
    FaultConfig, FaultProxy, Faults, Flap, Site, master_target::MasterTarget,
    replication::Replicator,
};

/// What faults act on: the proxy between agent and server, the agent's device and
/// arguments, and the master target if the run has one.
pub(super) struct Rig {
    pub(super) proxy: FaultProxy,
    pub(super) disk: PathBuf,
    /// `ripcord-agent protect` arguments besides the proxy's address and the device.
    pub(super) agent_args: Vec<String>,
    pub(super) master_target: Option<MasterTargetRig>,
}

/// A master target following the disk onto a second device.
pub(super) struct MasterTargetRig {
    pub(super) disk: String,
    pub(super) device: PathBuf,
    pub(super) state: PathBuf,
    /// Starts so far (each gets its own log).
    pub(super) runs: usize,
}

impl MasterTargetRig {
    pub(super) fn start(&self, site: &Site) -> MasterTarget {
        MasterTarget::start(site, &self.disk, &self.device, &self.state, self.runs)
    }
}

impl Rig {
    /// The agent, replicating through the proxy.
    pub(super) fn start_agent(&self, site: &Site) -> Replicator {
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        site.replicator_via(self.proxy.addr(), &[&self.disk], &args)
    }

    /// Injects `fault` (a killed process stays down for `down`); returns how, for the
    /// schedule. Returns once the fault is over: the process restarted, the link healed.
    pub(super) fn inject(
        &mut self,
        site: &mut Site,
        run: &mut Progress,
        fault: Fault,
        down: Duration,
        rng: &mut impl rand::Rng,
    ) -> anyhow::Result<String> {
        use anyhow::Context as _;
        Ok(match fault {
            Fault::KillAgent => {
                let mut a = run.agent.take().expect("the agent runs");
                a.kill9();
                run.logs += &format!("\n=== agent killed ===\n{}", a.log());
                drop(a);
                std::thread::sleep(down);
                run.agent = Some(self.start_agent(site));
                format!("down {down:?}")
            }
            Fault::KillServer => {
                site.ps.kill9();
                std::thread::sleep(down);
                site.ps.spawn().context("restarting the process server")?;
                format!("down {down:?}")
            }
            Fault::KillMasterTarget => {
                let rig = self
                    .master_target
                    .as_mut()
                    .context("no master target in this run")?;
                let mut mt = run.master_target.take().expect("the master target runs");
                mt.kill9();
                run.logs += &format!("\n=== master target killed ===\n{}", mt.log());
                drop(mt);
                std::thread::sleep(down);
                rig.runs += 1;
                run.master_target = Some(rig.start(site));
                format!("down {down:?}")
            }
            Fault::LossyNetwork => {
                let rate = rng.random_range(0.02..0.15);
                let f = Faults {
                    drop: rate,
                    duplicate: rate / 2.0,
                    reorder: rate,
                    corrupt: 0.01,
                    delay: Duration::from_millis(1),
                    jitter: Duration::from_millis(4),
                };
                let d = Duration::from_millis(rng.random_range(3000..10_000));
                self.proxy.set(FaultConfig::both(f));
                std::thread::sleep(d);
                self.proxy.set(FaultConfig::default());
                format!("{:.0}% loss for {d:?}", rate * 100.0)
            }
            Fault::Partition => {
                let d = Duration::from_millis(rng.random_range(2000..9000));
                self.proxy.partition_for(d);
                std::thread::sleep(d);
                format!("for {d:?}")
            }
            Fault::Flap => {
                let down = Duration::from_millis(rng.random_range(300..800));
                let d = Duration::from_millis(rng.random_range(5000..10_000));
                self.proxy.set(FaultConfig {
                    flap: Some(Flap {
                        up: Duration::from_secs(1),
                        down,
                    }),
                    ..FaultConfig::default()
                });
                std::thread::sleep(d);
                self.proxy.set(FaultConfig::default());
                format!(
                    "down {down:?} of every {:?}, for {d:?}",
                    down + Duration::from_secs(1)
                )
            }
            Fault::Rebind => {
                self.proxy.rebind();
                String::new()
            }
        })
    }
}
