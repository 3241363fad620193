//! Where new machines replicate (issue 15, item 4), decided by the configuration role when
//! a machine registers, following the seeds: new machines go only to a green server that
//! can absorb 30% more of its measured load, and red servers refuse new machines.
//!
//! # Rules
//! - A machine registered already keeps its server (a renewal or re-registration never
//!   moves it; moving is an operator's decision).
//! - A candidate has reported within the heartbeat window, is green, and stays green with 30%
//!   more load: its window's mean CPU and memory use times 1.3 stay under the orange
//!   threshold (80%; judged once it registered two minutes ago, see `LOAD_SETTLED_SECS`),
//!   and its cache has more than 30% free. Among candidates, the one with
//!   the fewest machines, then the least CPU, then the id.
//! - No candidate: a lone server (the deployment has no other) takes the machine unless
//!   it reported red (nowhere else to put it; a server that has not reported yet, just
//!   started, is not red). Otherwise the registration is refused, naming each server and
//!   why it cannot take the machine.
//! - An agent that cannot be told another server (registration protocol 2) stays on the
//!   configuration role's own server, unless that one is red.
//! - The decision and its record use the database directly (on the registration's
//!   blocking thread), so the assignment is durable before the agent is answered: the
//!   server it is sent to learns it with its next report.

use std::path::PathBuf;

use ripcord_control::{ControlDb, Health, Machine, ProcessServer};
use ripcord_transport::{MachineId, Placed, Placement};

/// Load a candidate must absorb: 30% more (the seeds' rule).
const HEADROOM: f64 = 1.3;
/// The CPU and memory level where orange begins (DESIGN.md section 3).
const ORANGE_PERCENT: f64 = 80.0;
/// Cache free space a green server keeps.
const GREEN_CACHE_FREE: f64 = 30.0;
/// CPU and memory headroom are judged only on a server registered at least this long
/// ago. Over its first samples a server's load is mostly its own start-up (and, under
/// `cargo xtask deploy`, the copying of binaries and the starting of services beside it),
/// which the health model itself never calls orange: a signal must be sustained over its
/// window. Cache space is judged at once.
const LOAD_SETTLED_SECS: i64 = 120;

/// The configuration role's placement (see the module doc).
#[derive(Debug)]
pub struct Placer {
    pub db: PathBuf,
    /// This (configuration role's) server.
    pub own_id: String,
    /// A server silent for longer is disconnected (`health.heartbeat-window-secs`).
    pub heartbeat_window_secs: i64,
}

impl Placement for Placer {
    fn place(&self, machine: &MachineId, redirect: bool) -> Result<Placed, String> {
        let db = ControlDb::open(&self.db).map_err(|e| e.to_string())?;
        let servers = db.process_servers().map_err(|e| e.to_string())?;
        let machines = db.machines().map_err(|e| e.to_string())?;
        let now = crate::control::unix_now();
        choose(
            &servers,
            &machines,
            &self.own_id,
            machine.as_str(),
            redirect,
            now,
            self.heartbeat_window_secs,
        )
    }

    fn record(
        &self,
        machine: &MachineId,
        cert_sha256: &[u8; 32],
        placed: &Placed,
    ) -> Result<(), String> {
        let mut db = ControlDb::open(&self.db).map_err(|e| e.to_string())?;
        db.register_machine(
            machine.as_str(),
            &hex::encode(cert_sha256),
            crate::control::unix_now(),
            &placed.server_id,
        )
        .map_err(|e| e.to_string())
    }
}

/// The decision, from the database's rows (see the module doc).
pub fn choose(
    servers: &[ProcessServer],
    machines: &[Machine],
    own_id: &str,
    machine: &str,
    redirect: bool,
    now: i64,
    window: i64,
) -> Result<Placed, String> {
    let placed = |s: &ProcessServer| Placed {
        server_id: s.id.clone(),
        data_server: (s.id != own_id).then(|| s.address.clone()),
    };
    if let Some(current) = machines
        .iter()
        .find(|m| m.id == machine)
        .and_then(|m| m.process_server.as_deref())
        && let Some(s) = servers.iter().find(|s| s.id == current)
        && (redirect || s.id == own_id)
    {
        return Ok(placed(s));
    }
    let fresh = |s: &ProcessServer| s.last_heartbeat.is_some() && !s.silent(now, window);
    let red = |s: &ProcessServer| fresh(s) && s.health == Health::Red;
    let own = servers.iter().find(|s| s.id == own_id);
    if !redirect {
        return match own {
            Some(s) if red(s) => Err(format!("{own_id} (this server) is red")),
            Some(s) => Ok(placed(s)),
            None => Err(format!("{own_id} (this server) is not recorded yet")),
        };
    }
    let count = |s: &ProcessServer| {
        machines
            .iter()
            .filter(|m| m.process_server.as_deref() == Some(s.id.as_str()))
            .count()
    };
    let mut why = Vec::new();
    let mut candidates: Vec<&ProcessServer> = Vec::new();
    for s in servers {
        match unfit(s, fresh(s), window, now) {
            Some(reason) => why.push(format!("{}: {reason}", s.id)),
            None => candidates.push(s),
        }
    }
    let cpu = |s: &ProcessServer| s.load.map_or(0.0, |l| l.cpu_percent);
    if let Some(best) = candidates.into_iter().min_by(|a, b| {
        count(a)
            .cmp(&count(b))
            .then(cpu(a).total_cmp(&cpu(b)))
            .then(a.id.cmp(&b.id))
    }) {
        return Ok(placed(best));
    }
    if servers.len() == 1
        && let Some(s) = own
        && !red(s)
    {
        return Ok(placed(s));
    }
    Err(why.join("; "))
}

/// Why server `s` cannot take a new machine at `now`, if it cannot.
fn unfit(s: &ProcessServer, fresh: bool, window: i64, now: i64) -> Option<String> {
    if !fresh {
        return Some(match s.last_heartbeat {
            Some(_) => format!("silent for more than {window} s"),
            None => "has not reported yet".to_owned(),
        });
    }
    if s.health != Health::Green {
        return Some(format!("is {}", s.health.as_str()));
    }
    let Some(load) = s.load else {
        return Some("has not reported its load".to_owned());
    };
    let settled = now - s.registered_at >= LOAD_SETTLED_SECS;
    if settled && load.cpu_percent * HEADROOM >= ORANGE_PERCENT {
        return Some(format!(
            "CPU {:.0}% busy cannot absorb 30% more",
            load.cpu_percent
        ));
    }
    if settled && load.memory_percent * HEADROOM >= ORANGE_PERCENT {
        return Some(format!(
            "memory {:.0}% used cannot absorb 30% more",
            load.memory_percent
        ));
    }
    if load.cache_free_percent <= GREEN_CACHE_FREE {
        return Some(format!(
            "cache {:.0}% free, not above {GREEN_CACHE_FREE}%",
            load.cache_free_percent
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripcord_control::ServerLoad;

    const NOW: i64 = 10_000;
    const WINDOW: i64 = ripcord_control::HEARTBEAT_WINDOW_SECS;

    fn server(id: &str, health: Health, beat: Option<i64>, cpu: f64) -> ProcessServer {
        ProcessServer {
            id: id.into(),
            address: format!("{id}.example:9443"),
            version: "0.1.0".into(),
            cert_sha256: String::new(),
            config_role: id == "ps1",
            registered_at: 0,
            last_heartbeat: beat,
            health,
            fingerprint: String::new(),
            load: Some(ServerLoad {
                cpu_percent: cpu,
                memory_percent: 20.0,
                cache_free_percent: 70.0,
            }),
        }
    }

    fn on(id: &str, server: &str) -> Machine {
        Machine {
            id: id.into(),
            cert_sha256: String::new(),
            registered_at: 0,
            process_server: Some(server.into()),
            policy: None,
        }
    }

    fn pick(servers: &[ProcessServer], machines: &[Machine]) -> Result<String, String> {
        choose(servers, machines, "ps1", "new", true, NOW, WINDOW).map(|p| p.server_id)
    }

    #[test]
    fn a_server_that_just_registered_is_not_judged_by_its_start_up_load() {
        let young = ProcessServer {
            registered_at: NOW - 30,
            ..server("ps2", Health::Green, Some(NOW), 90.0)
        };
        let servers = [server("ps1", Health::Green, Some(NOW), 90.0), young.clone()];
        assert_eq!(
            pick(&servers, &[]).unwrap(),
            "ps2",
            "ps1 (registered long ago) is too busy; ps2's load is its start-up"
        );
        let full = ProcessServer {
            load: Some(ServerLoad {
                cache_free_percent: 20.0,
                ..young.load.unwrap()
            }),
            ..young
        };
        let err = pick(&[server("ps1", Health::Green, Some(NOW), 90.0), full], &[]).unwrap_err();
        assert!(
            err.contains("ps2: cache 20% free"),
            "cache is judged at once: {err}"
        );
    }

    #[test]
    fn new_machines_spread_over_green_servers_with_headroom() {
        let servers = [
            server("ps1", Health::Green, Some(NOW), 10.0),
            server("ps2", Health::Green, Some(NOW - 5), 20.0),
        ];
        assert_eq!(pick(&servers, &[]).unwrap(), "ps1", "least CPU first");
        assert_eq!(
            pick(&servers, &[on("a", "ps1")]).unwrap(),
            "ps2",
            "then fewest machines"
        );
        let placed = choose(&servers, &[on("a", "ps1")], "ps1", "new", true, NOW, WINDOW).unwrap();
        assert_eq!(placed.data_server.as_deref(), Some("ps2.example:9443"));
        let placed = choose(&servers, &[], "ps1", "new", true, NOW, WINDOW).unwrap();
        assert_eq!(
            placed.data_server, None,
            "the config role's own server: no redirect"
        );
    }

    #[test]
    fn red_orange_silent_and_busy_servers_take_no_new_machine() {
        let servers = [
            server("ps1", Health::Orange, Some(NOW), 10.0),
            server("ps2", Health::Red, Some(NOW), 10.0),
            server("ps3", Health::Green, Some(NOW - WINDOW - 1), 10.0),
            server("ps4", Health::Green, Some(NOW), 62.0),
            server("ps5", Health::Green, None, 1.0),
        ];
        let why = pick(&servers, &[]).unwrap_err();
        for reason in [
            "ps1: is orange",
            "ps2: is red",
            "ps3: silent",
            "ps4: CPU 62% busy cannot absorb 30% more",
            "ps5: has not reported yet",
        ] {
            assert!(why.contains(reason), "{reason:?} not in {why}");
        }
        let mut ok = servers.to_vec();
        ok.push(server("ps6", Health::Green, Some(NOW), 61.0));
        assert_eq!(pick(&ok, &[]).unwrap(), "ps6", "61% x 1.3 < 80%");
    }

    #[test]
    fn a_lone_server_takes_its_machines_unless_red_and_machines_keep_their_server() {
        let starting = [server("ps1", Health::Red, None, 0.0)];
        assert_eq!(
            pick(&starting, &[]).unwrap(),
            "ps1",
            "not reported yet is not red"
        );
        let busy = [server("ps1", Health::Orange, Some(NOW), 90.0)];
        assert_eq!(pick(&busy, &[]).unwrap(), "ps1", "nowhere else to put it");
        let red = [server("ps1", Health::Red, Some(NOW), 99.0)];
        assert!(pick(&red, &[]).unwrap_err().contains("ps1: is red"));
        // A registered machine keeps its server, whatever the others look like.
        let servers = [
            server("ps1", Health::Green, Some(NOW), 1.0),
            server("ps2", Health::Red, Some(NOW), 99.0),
        ];
        let kept = choose(&servers, &[on("m", "ps2")], "ps1", "m", true, NOW, WINDOW).unwrap();
        assert_eq!(kept.server_id, "ps2");
        // An agent that cannot be redirected stays on this server unless it is red.
        let old = choose(&servers, &[], "ps1", "old", false, NOW, WINDOW).unwrap();
        assert_eq!((old.server_id.as_str(), old.data_server), ("ps1", None));
        assert!(choose(&red, &[], "ps1", "old", false, NOW, WINDOW).is_err());
    }
}
