//! The machine's certificate while it replicates: renewed with its current key before it
//! expires, without an operator and without a token.
//!
//! Invariants:
//! * A renewal starts when less than a third of the certificate's lifetime is left
//!   (checked every tenth of the lifetime, at most hourly) and is retried until it
//!   succeeds or the certificate expires; the new identity is on disk (crash-safely, by
//!   `ripcord_transport::register`) before the replication session uses it.
//! * The server supersedes the previous certificate the moment it issues the new one and
//!   closes the connection made with it. [`MachineIdentity::replacement_for`] tells the
//!   network side whether such a refusal came from our own renewal (reconnect with the
//!   new certificate) or from an operator (stop and say why).
//! * An expired certificate is never presented: the agent says so and what to do.

use std::{
    net::{SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use ripcord_transport::{Credentials, Identity, ca_hash, register};

/// Longest wait between two checks of the certificate's expiry.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// Where renewals go: the registration endpoint recorded by `ripcord-agent register`.
#[derive(Clone, Debug)]
pub struct RenewTarget {
    /// `HOST:PORT` of the registration endpoint.
    pub server: String,
    /// The TLS name the server's certificate is checked for.
    pub server_name: String,
    /// Where the identity is stored.
    pub state_dir: PathBuf,
}

/// The identity the replication session uses, shared with the renewal task.
pub struct MachineIdentity {
    current: Mutex<Identity>,
    renewing: AtomicBool,
}

impl MachineIdentity {
    pub fn new(identity: Identity) -> MachineIdentity {
        MachineIdentity {
            current: Mutex::new(identity),
            renewing: AtomicBool::new(false),
        }
    }

    /// The identity to connect with now; an error naming what to do if it has expired.
    pub fn current(&self) -> anyhow::Result<Identity> {
        let id = self.current.lock().expect("identity lock").clone();
        if id.expired() {
            let (_, not_after) = id.validity()?;
            anyhow::bail!(
                "this machine's certificate ({}) expired at {}: it can no longer prove who it \
                 is. Ask the operator to run `ripcord-ps machines remove {}`, then register \
                 again with a new bootstrap token",
                id.machine_id(),
                humantime::format_rfc3339_seconds(not_after),
                id.machine_id()
            );
        }
        Ok(id)
    }

    /// After the server refused the certificate of `used`: the renewed identity to
    /// reconnect with, if our own renewal superseded it; `None` if nothing replaced it (an
    /// operator removed the machine, or another host renewed with a copy of our key).
    pub async fn replacement_for(&self, used: &Identity) -> Option<Identity> {
        // The server supersedes the old certificate before our renewal call returns.
        let deadline = tokio::time::Instant::now() + ripcord_transport::register::REGISTER_TIMEOUT;
        while self.renewing.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let now = self.current.lock().expect("identity lock").clone();
        (now.cert() != used.cert()).then_some(now)
    }

    fn replace(&self, identity: Identity) {
        *self.current.lock().expect("identity lock") = identity;
    }
}

/// When to renew: the time at which a third of the lifetime is left.
fn renew_at(identity: &Identity) -> anyhow::Result<(SystemTime, Duration)> {
    let (not_before, not_after) = identity.validity()?;
    let lifetime = not_after
        .duration_since(not_before)
        .context("certificate ends before it begins")?;
    Ok((not_after - lifetime / 3, lifetime))
}

/// Renews the certificate whenever it is due, until dropped.
pub async fn renew_forever(identity: &MachineIdentity, target: RenewTarget) {
    loop {
        let wait = match renew_once_if_due(identity, &target).await {
            Ok(wait) => wait,
            Err(e) => {
                tracing::warn!("certificate renewal failed: {e:#}; retrying in 60 s");
                Duration::from_secs(60)
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Renews if due; returns how long to wait before the next check.
async fn renew_once_if_due(
    identity: &MachineIdentity,
    target: &RenewTarget,
) -> anyhow::Result<Duration> {
    let id = identity.current()?;
    let (due, lifetime) = renew_at(&id)?;
    let check_every = (lifetime / 10).clamp(Duration::from_secs(1), MAX_CHECK_INTERVAL);
    if SystemTime::now() < due {
        let until_due = due.duration_since(SystemTime::now()).unwrap_or_default();
        return Ok(until_due.min(check_every));
    }
    let addr: SocketAddr = target
        .server
        .to_socket_addrs()
        .with_context(|| format!("resolving the registration endpoint {}", target.server))?
        .next()
        .with_context(|| format!("{} resolves to no address", target.server))?;
    identity.renewing.store(true, Ordering::SeqCst);
    let result = register(
        addr,
        &target.server_name,
        &ca_hash(id.ca_cert()),
        id.machine_id(),
        Credentials {
            token: None,
            current: Some(&id),
        },
        &target.state_dir,
    )
    .await;
    if let Ok(r) = &result {
        identity.replace(r.identity.clone());
    }
    identity.renewing.store(false, Ordering::SeqCst);
    let renewed = result.with_context(|| format!("renewing at {}", target.server))?;
    let (_, not_after) = renewed.identity.validity()?;
    tracing::info!(
        "certificate renewed with the machine's key; valid until {}",
        humantime::format_rfc3339_seconds(not_after)
    );
    Ok(check_every)
}
