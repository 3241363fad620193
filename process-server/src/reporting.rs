//! Process servers that joined a deployment report to its configuration role (issue 15):
//! this server's reporter (`config-role` in ps.toml), and the configuration role's side of
//! the link, which authenticates each report and records it.
//!
//! # Invariants
//! - **Replication never waits for the configuration role.** The reporter keeps only the
//!   latest report (a `watch` channel: a slow or absent role costs no memory and no
//!   backlog); when the role is unreachable the server goes on and keeps retrying.
//! - **A refusal that retrying cannot cure stops the server at start** (a clone, a removed
//!   server, a version newer than the role): its message names the cause and the fix.
//!   Later refusals are logged as errors (once per kind) and replication goes on.
//! - **The configuration role believes a report only from its server**: the TLS client
//!   certificate (verified against the deployment CA) names the server; the certificate
//!   must be its current one, the version not newer than the role's, the fingerprint the
//!   one it joined with (else: a clone, refused, with a critical alert), and no other live
//!   process may report with the same identity at the same time (else: refused while the
//!   other is seen, with a critical alert). A server's disk reports count only for
//!   machines assigned to it: a compromised process server cannot rewrite another's.
//! - **A joined server admits exactly the machines assigned to it**, with the certificate
//!   the configuration role's machine store holds now (so a removal or a renewal there
//!   reaches it with its next report).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::bail;
use ripcord_control::{ControlDb, DiskReport, Severity};
use ripcord_transport::{
    MachineId, MachineStore, ServerIdentity,
    control::{
        AssignedMachine, ClockReading, ControlClient, ControlError, Refusal, Reply, ReportAccepted,
        ReportRequest, Request, read_message, write_message,
    },
    pki::process_server_id_from_cert,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    control::{Event, unix_now},
    health::HealthReport,
    join::{newer_message, newer_than_ours},
    server::State,
};

/// What a joined server reports: its latest health (none yet at start) and its disks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReportBody {
    pub health: Option<HealthReport>,
    pub disks: Vec<DiskReport>,
}

/// How long the first report may take before the server starts without it.
const FIRST_REPORT_WAIT: Duration = Duration::from_secs(5);

/// Another process reporting with the same identity within this long is a second live copy.
const SEEN_TWICE_WINDOW: Duration = Duration::from_secs(10);

/// This server's reporter: hand it the latest report; a task sends it.
pub(crate) struct Reporter {
    latest: watch::Sender<ReportBody>,
    /// Asks the task to report now.
    refresh: Arc<tokio::sync::Notify>,
    /// Told after each report's reply was handled (the machines synced).
    reported: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
    /// The group schedules the configuration role relays for this server's machines,
    /// with this server's clock offset to the coordinator (`crate::groups::Relay`).
    pub(crate) groups: watch::Receiver<crate::groups::Schedules>,
    /// The policies the configuration role relays for this server's machines
    /// (`crate::policies::Relay`).
    pub(crate) policies: watch::Receiver<crate::policies::Policies>,
}

impl Reporter {
    /// Replaces the report to send with `body` (never blocks).
    pub(crate) fn send(&self, body: ReportBody) {
        self.latest.send_replace(body);
    }

    /// Reports now and waits (at most `wait`) until the reply was handled: the machines
    /// assigned to this server are then current.
    pub(crate) async fn refresh(&self, wait: Duration) {
        let reported = self.reported.notified();
        tokio::pin!(reported);
        reported.as_mut().enable();
        self.refresh.notify_one();
        let _ = tokio::time::timeout(wait, reported).await;
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one report came to.
enum Outcome {
    Accepted(ReportAccepted),
    Refused(Refusal, String),
    /// Not resolved, not answering, or broken in transit: retried.
    Unreachable(String),
}

/// The link to the configuration role: its address is resolved again until it resolves
/// (a name server down at start must not stop replication).
struct Link {
    config_role: String,
    host: String,
    identity: ServerIdentity,
    client: Option<ControlClient>,
}

impl Link {
    async fn report(&mut self, request: ReportRequest) -> Outcome {
        if self.client.is_none() {
            let resolved = tokio::net::lookup_host(&self.config_role).await;
            match resolved.map(|mut addrs| addrs.next()) {
                Ok(Some(addr)) => {
                    self.client = Some(ControlClient::new(addr, &self.host, self.identity.clone()))
                }
                Ok(None) => return Outcome::Unreachable("its name resolves to no address".into()),
                Err(e) => return Outcome::Unreachable(format!("resolving its name: {e}")),
            }
        }
        let client = self.client.as_mut().expect("resolved above");
        match client.report(request).await {
            Ok(accepted) => Outcome::Accepted(accepted),
            Err(ControlError::Refused { refusal, message }) => Outcome::Refused(refusal, message),
            Err(e) => Outcome::Unreachable(e.to_string()),
        }
    }
}

/// Starts reporting to the configuration role at `config_role`; sends a first report and
/// fails if the role refuses this server for good (see the module doc).
pub(crate) async fn start_reporting(
    config_role: &str,
    identity: &ServerIdentity,
    fingerprint: String,
    machines: MachineStore,
) -> anyhow::Result<Reporter> {
    let mut relay = crate::groups::Relay::default();
    let mut policy_relay = crate::policies::Relay::default();
    let mut link = Link {
        config_role: config_role.to_owned(),
        host: crate::config::config_role_host(config_role)?.to_owned(),
        identity: identity.clone(),
        client: None,
    };
    let instance = hex::encode(rand_bytes()?);
    let request = move |body: &ReportBody| ReportRequest {
        version: crate::join::VERSION.to_owned(),
        fingerprint: fingerprint.clone(),
        instance: instance.clone(),
        body: serde_json::to_value(body).expect("a report serialises"),
    };
    let first = tokio::time::timeout(
        FIRST_REPORT_WAIT,
        link.report(request(&ReportBody::default())),
    );
    match first.await {
        Ok(Outcome::Accepted(accepted)) => {
            tracing::info!(config_role, "reporting to the configuration role");
            sync_machines(&machines, &accepted.machines).await;
            relay.update(&accepted);
            policy_relay.update(&accepted);
        }
        Ok(Outcome::Refused(refusal, message)) if refusal.is_final() => {
            bail!("the configuration role at {config_role} refuses this server: {message}")
        }
        Ok(Outcome::Refused(_, e) | Outcome::Unreachable(e)) => tracing::warn!(
            config_role,
            "the configuration role does not take reports yet ({e}); replication goes on, \
             retrying"
        ),
        Err(_) => tracing::warn!(
            config_role,
            "the configuration role did not answer within {}s; replication goes on, retrying",
            FIRST_REPORT_WAIT.as_secs()
        ),
    }
    let groups_rx = relay.subscribe();
    let policies_rx = policy_relay.subscribe();
    let (latest, mut rx) = watch::channel(ReportBody::default());
    let config_role = config_role.to_owned();
    let refresh = Arc::new(tokio::sync::Notify::new());
    let reported = Arc::new(tokio::sync::Notify::new());
    let (refresh_rx, reported_tx) = (Arc::clone(&refresh), Arc::clone(&reported));
    let task = tokio::spawn(async move {
        let mut failing: Option<String> = None;
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                () = refresh_rx.notified() => {}
            }
            let body = rx.borrow_and_update().clone();
            let outcome = link.report(request(&body)).await;
            let kind = match &outcome {
                Outcome::Accepted(_) => None,
                Outcome::Refused(refusal, _) => Some(format!("{refusal:?}")),
                Outcome::Unreachable(_) => Some("unreachable".to_owned()),
            };
            if let Outcome::Accepted(accepted) = &outcome {
                sync_machines(&machines, &accepted.machines).await;
                relay.update(accepted);
                policy_relay.update(accepted);
            }
            reported_tx.notify_waiters();
            if kind == failing {
                continue;
            }
            match outcome {
                Outcome::Accepted(_) => {
                    tracing::info!(config_role, "reports to the configuration role work again")
                }
                Outcome::Refused(_, message) => tracing::error!(
                    config_role,
                    "the configuration role refuses this server's reports: {message}"
                ),
                Outcome::Unreachable(e) => tracing::warn!(
                    config_role,
                    "reporting to the configuration role: {e}; replication goes on, retrying"
                ),
            }
            failing = kind;
        }
    });
    Ok(Reporter {
        latest,
        refresh,
        reported,
        task,
        groups: groups_rx,
        policies: policies_rx,
    })
}

/// Makes this server's machine store hold exactly the machines the configuration role
/// assigns it (off the runtime's workers: the store fsyncs). Malformed entries are
/// skipped and logged; a store that cannot be written keeps what it held (the next report
/// tries again).
async fn sync_machines(store: &MachineStore, assigned: &[AssignedMachine]) {
    let mut wanted = Vec::with_capacity(assigned.len());
    for m in assigned {
        let hash = hex::decode(&m.cert_sha256)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok());
        match (MachineId::new(&m.id), hash) {
            (Ok(id), Some(hash)) => wanted.push((id, hash)),
            _ => tracing::warn!(
                machine = m.id,
                "the configuration role assigned a machine with a malformed id or certificate \
                 hash; ignored"
            ),
        }
    }
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.sync(&wanted)).await {
        Ok(Ok(true)) => tracing::info!(
            machines = assigned.len(),
            "the machines assigned by the configuration role changed"
        ),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => tracing::warn!("recording the assigned machines: {e}"),
        Err(e) => tracing::warn!("recording the assigned machines: {e}"),
    }
}

fn rand_bytes() -> anyhow::Result<[u8; 16]> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    Ok(b)
}

/// The live process of each reporting server, by server id: its instance and when it
/// last reported.
#[derive(Default)]
pub(crate) struct Instances(Mutex<HashMap<String, (String, Instant)>>);

impl Instances {
    /// Records that `instance` of server `id` reports at `now`; false (and nothing
    /// recorded) when another instance of it reported within [`SEEN_TWICE_WINDOW`]: two
    /// live processes with one identity. A restarted server (the old instance silent)
    /// is admitted once the window has passed.
    fn admit(&self, id: &str, instance: &str, now: Instant) -> bool {
        let mut instances = self.0.lock().expect("instances lock");
        if let Some((other, at)) = instances.get(id)
            && other != instance
            && now.saturating_duration_since(*at) < SEEN_TWICE_WINDOW
        {
            return false;
        }
        instances.insert(id.to_owned(), (instance.to_owned(), now));
        true
    }
}

/// Serves one connection on the control ALPN: join requests and reports, one per stream,
/// in order, until the peer closes. Runs on the configuration role.
pub(crate) async fn serve_control(state: Arc<State>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let peer = ripcord_transport::peer_certificate(&conn).ok();
    let mut db: Option<ControlDb> = None;
    loop {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let reply = match read_message::<Request>(&mut recv).await {
            Err(e) => {
                tracing::info!(%remote, "control request refused: {e}");
                Reply::Refused {
                    refusal: Refusal::Malformed,
                    message: e.to_string(),
                }
            }
            Ok(Request::Join(join)) => on_blocking_thread(|| join_request(&state, &join)),
            Ok(Request::Report(report)) => {
                let received_ns = crate::groups::now_wall_ns();
                let mut reply =
                    on_blocking_thread(|| take_report(&state, peer.as_deref(), &mut db, report));
                if let Reply::Accepted { clock, .. } = &mut reply {
                    *clock = Some(ClockReading {
                        received_ns,
                        sent_ns: crate::groups::now_wall_ns().max(received_ns),
                    });
                }
                reply
            }
        };
        let refused = matches!(reply, Reply::Refused { .. });
        if write_message(&mut send, &reply).await.is_err() || refused {
            // Let the peer read the refusal before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            return;
        }
    }
}

fn on_blocking_thread<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn join_request(state: &State, join: &ripcord_transport::control::JoinRequest) -> Reply {
    let Some(ca) = state.dep.ca.as_ref() else {
        return Reply::Refused {
            refusal: Refusal::Internal,
            message: "this server holds no CA key".into(),
        };
    };
    let tokens = match ripcord_transport::TokenStore::open_or_create(
        &crate::deploy::server_tokens_dir(&state.dep.dir),
    ) {
        Ok(t) => t,
        Err(e) => {
            return Reply::Refused {
                refusal: Refusal::Internal,
                message: format!("the join token store: {e}"),
            };
        }
    };
    let facts = crate::join::DeploymentFacts {
        escrow: state.dep.escrow.clone(),
        target: state.dep.config.target.clone(),
    };
    crate::join::admit(
        &crate::join::JoinDesk {
            ca,
            tokens: &tokens,
            db: &crate::control::db_path(&state.dep.dir),
            facts: &facts,
            validity: ripcord_transport::pki::LEAF_VALIDITY,
        },
        join,
    )
}

/// Checks a report (see the module doc) and queues what it says for the database.
fn take_report(
    state: &State,
    peer: Option<&[u8]>,
    db: &mut Option<ControlDb>,
    report: ReportRequest,
) -> Reply {
    match check_report(state, peer, db, &report) {
        Ok((server, body, machines)) => {
            let Some(control) = &state.control else {
                return refused(
                    Refusal::Internal,
                    "this server keeps no configuration database",
                );
            };
            if let Some(health) = body.health {
                control.send_for(server.clone(), Event::Health(health));
            }
            control.send_for(server, Event::Disks(body.disks));
            let groups = crate::groups::relayed(&state.groups.borrow(), &machines);
            let policies = crate::policies::relayed(&state.policies.borrow(), &machines);
            Reply::Accepted {
                machines,
                groups,
                clock: None,
                policies,
            }
        }
        Err((refusal, message)) => {
            tracing::warn!(?refusal, "report refused: {message}");
            refused(refusal, &message)
        }
    }
}

fn refused(refusal: Refusal, message: &str) -> Reply {
    Reply::Refused {
        refusal,
        message: message.to_owned(),
    }
}

fn check_report(
    state: &State,
    peer: Option<&[u8]>,
    db: &mut Option<ControlDb>,
    report: &ReportRequest,
) -> Result<(String, ReportBody, Vec<AssignedMachine>), (Refusal, String)> {
    let internal = |e: &dyn std::fmt::Display| (Refusal::Internal, e.to_string());
    let cert = peer.ok_or((
        Refusal::NotAuthenticated,
        "a report needs the process server's certificate".to_owned(),
    ))?;
    let id = process_server_id_from_cert(cert)
        .map_err(|e| (Refusal::NotAuthenticated, e.to_string()))?
        .into_string();
    if db.is_none() {
        *db = Some(
            ControlDb::open(&crate::control::db_path(&state.dep.dir)).map_err(|e| internal(&e))?,
        );
    }
    let db = db.as_mut().expect("opened above");
    let Some(row) = db.process_server(&id).map_err(|e| internal(&e))? else {
        return Err((
            Refusal::NotRegistered,
            format!(
                "process server {id} is not registered with the configuration role (removed \
                 by an operator?): join again with a new token"
            ),
        ));
    };
    if row.cert_sha256 != hex::encode(ripcord_transport::pki::sha256(cert)) {
        return Err((
            Refusal::CertificateSuperseded,
            format!("this certificate is not process server {id}'s current one"),
        ));
    }
    if newer_than_ours(&report.version).map_err(|e| (Refusal::Malformed, e.to_string()))? {
        return Err((Refusal::NewerThanConfigRole, newer_message(&report.version)));
    }
    let now = unix_now();
    if row.fingerprint != report.fingerprint {
        let message = format!(
            "process server {id} reports from another host or directory than it joined from \
             (a cloned server?): refused. If it moved, remove it (`ripcord ps remove --server \
             {id}`) and join it again"
        );
        db.raise_alert(&id, "cloned", Severity::Critical, &message, now)
            .map_err(|e| internal(&e))?;
        return Err((Refusal::Cloned, message));
    }
    if !state.instances.admit(&id, &report.instance, Instant::now()) {
        let message = format!(
            "another process reports as process server {id} right now (a cloned server?): \
             refused while the other one is seen"
        );
        db.raise_alert(&id, "seen-twice", Severity::Critical, &message, now)
            .map_err(|e| internal(&e))?;
        return Err((Refusal::SeenTwice, message));
    }
    db.set_process_server_version(&id, &report.version)
        .map_err(|e| internal(&e))?;
    let mut body: ReportBody = serde_json::from_value(report.body.clone())
        .map_err(|e| (Refusal::Malformed, format!("report body: {e}")))?;
    // The machine store is the truth about certificates: a machine removed by an operator
    // (`ripcord-ps machines remove`) or renewed is sent as the store has it, so the joined
    // server refuses it as this one does.
    let current: std::collections::HashMap<String, String> = state
        .machines
        .list()
        .map_err(|e| internal(&e))?
        .into_iter()
        .map(|m| (m.machine_id.into_string(), hex::encode(m.cert_sha256)))
        .collect();
    let assigned: Vec<AssignedMachine> = db
        .machines()
        .map_err(|e| internal(&e))?
        .into_iter()
        .filter(|m| m.process_server.as_deref() == Some(id.as_str()))
        .filter_map(|m| {
            Some(AssignedMachine {
                cert_sha256: current.get(&m.id)?.clone(),
                id: m.id,
            })
        })
        .collect();
    let before = body.disks.len();
    body.disks
        .retain(|d| assigned.iter().any(|m| m.id == d.machine));
    if body.disks.len() != before {
        tracing::warn!(
            server = id,
            ignored = before - body.disks.len(),
            "a process server reported disks of machines not assigned to it; ignored"
        );
    }
    Ok((id, body, assigned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_live_instance_is_refused_and_a_restart_is_admitted_after_the_window() {
        let instances = Instances::default();
        let t0 = Instant::now();
        assert!(instances.admit("ps2", "a", t0));
        assert!(instances.admit("ps2", "a", t0 + Duration::from_secs(1)));
        assert!(
            !instances.admit("ps2", "b", t0 + Duration::from_secs(2)),
            "a copy reporting while the first one does"
        );
        assert!(
            instances.admit("ps2", "a", t0 + Duration::from_secs(3)),
            "the first goes on"
        );
        assert!(
            instances.admit("ps3", "b", t0 + Duration::from_secs(3)),
            "ids are apart"
        );
        assert!(
            instances.admit("ps2", "b", t0 + Duration::from_secs(3) + SEEN_TWICE_WINDOW),
            "a restart, once the old process is silent"
        );
        assert!(!instances.admit("ps2", "a", t0 + Duration::from_secs(4) + SEEN_TWICE_WINDOW));
    }
}
