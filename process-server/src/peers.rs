//! Which machines are connected, and ending the connections whose certificate is no
//! longer current.
//!
//! Invariants:
//! * a data connection is admitted only if its client certificate is its machine's
//!   current one in the machine store ([`Peers::admit`]), checked after the TLS handshake
//!   and before anything from the peer is read;
//! * every admitted connection is tracked until it ends, and [`Peers::watch`] re-checks
//!   them against the store every [`RECHECK`]: a machine removed by an operator
//!   (`ripcord-ps machines remove`, another process) or a certificate superseded by a
//!   renewal loses its open connections within that time, closed with
//!   [`CLOSE_CERTIFICATE_REFUSED`] and the reason, which the agent reports and stops on;
//! * a machine holds at most [`MAX_CONNECTIONS_PER_MACHINE`] connections.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use quinn::Connection;
use ripcord_transport::{
    CLOSE_CERTIFICATE_REFUSED, MachineError, MachineId, MachineStore, peer_certificate,
    peer_machine_id,
};

/// How often open connections are re-checked against the machine store.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Open data connections one machine may hold (an agent needs one; a reconnect may
/// briefly overlap the old one until the server notices it is gone).
pub const MAX_CONNECTIONS_PER_MACHINE: usize = 3;

struct Live {
    machine: MachineId,
    /// The client certificate (DER).
    cert: Vec<u8>,
    conn: Connection,
}

/// The admitted data connections.
pub struct Peers {
    machines: MachineStore,
    live: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
}

/// An admitted connection; untracked when dropped.
pub struct Admitted<'a> {
    peers: &'a Peers,
    id: u64,
    /// The machine, from its verified certificate.
    pub machine: MachineId,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.peers.live.lock().expect("peers lock").remove(&self.id);
    }
}

impl Peers {
    pub fn new(machines: MachineStore) -> Peers {
        Peers {
            machines,
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Admits `conn` if its certificate is its machine's current one; otherwise closes it
    /// with the reason and returns the error.
    /// Whether the peer's certificate is its machine's current one now (nothing refused).
    pub fn is_current(&self, conn: &Connection) -> bool {
        let (Ok(machine), Ok(cert)) = (peer_machine_id(conn), peer_certificate(conn)) else {
            return false;
        };
        self.machines.check_current(&machine, &cert).is_ok()
    }

    pub fn admit(&self, conn: &Connection) -> anyhow::Result<Admitted<'_>> {
        let machine = peer_machine_id(conn)?;
        let cert = peer_certificate(conn)?.to_vec();
        if let Err(e) = self.machines.check_current(&machine, &cert) {
            refuse(conn, &e);
            return Err(e.into());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut live = self.live.lock().expect("peers lock");
        if live.values().filter(|l| l.machine == machine).count() >= MAX_CONNECTIONS_PER_MACHINE {
            conn.close(
                quinn::VarInt::from_u32(CLOSE_TOO_MANY_CONNECTIONS),
                b"too many connections from this machine",
            );
            anyhow::bail!(
                "machine {machine} already has {MAX_CONNECTIONS_PER_MACHINE} connections open"
            );
        }
        live.insert(
            id,
            Live {
                machine: machine.clone(),
                cert,
                conn: conn.clone(),
            },
        );
        Ok(Admitted {
            peers: self,
            id,
            machine,
        })
    }

    /// Closes every tracked connection whose certificate is no longer current. Returns
    /// how many it closed.
    pub fn recheck(&self) -> usize {
        // One read of the store for every connection.
        let snapshot = match self.machines.snapshot() {
            Ok(s) => s,
            Err(e) => {
                // An unreadable store closes nothing: the next check decides.
                tracing::warn!("re-checking connected machines: {e}");
                return 0;
            }
        };
        let live = self.live.lock().expect("peers lock");
        let mut closed = 0;
        for l in live.values() {
            match snapshot.check_current(&l.machine, &l.cert) {
                Ok(()) => {}
                Err(e @ (MachineError::NotRegistered(_) | MachineError::Superseded(_))) => {
                    tracing::warn!(machine = %l.machine, "closing its connection: {e}");
                    refuse(&l.conn, &e);
                    closed += 1;
                }
                Err(e) => tracing::warn!("re-checking machine {}: {e}", l.machine),
            }
        }
        closed
    }

    /// Re-checks every [`RECHECK`] until the task is dropped.
    pub async fn watch(&self) {
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.recheck();
        }
    }
}

/// Application close code for a connection over [`MAX_CONNECTIONS_PER_MACHINE`]; the
/// agent retries (its old connection will have closed by then).
const CLOSE_TOO_MANY_CONNECTIONS: u32 = 0x7263_0002;

fn refuse(conn: &Connection, e: &MachineError) {
    conn.close(
        quinn::VarInt::from_u32(CLOSE_CERTIFICATE_REFUSED),
        e.to_string().as_bytes(),
    );
}
