//! Reading the configuration database for what the sessions hand to agents (group
//! schedules, policies): a thread of its own reads it every [`REFRESH`], and the data path
//! only ever looks at the last value of a [`watch`] channel, never at the database.
//!
//! Invariants: the receiver holds the default value until the first read, and keeps the
//! last value read while reads fail (one warning per run of failures); receivers are told
//! only of real changes.

use std::{path::Path, sync::Arc, time::Duration};

use ripcord_control::ControlDb;
use tokio::sync::watch;

/// How often the configuration database is read.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Reads `read` of the configuration database at `path` every [`REFRESH`] on a thread
/// named after `what` (which also names it in warnings).
pub fn watch<T>(
    path: &Path,
    what: &'static str,
    read: fn(&ControlDb) -> anyhow::Result<Arc<T>>,
) -> watch::Receiver<Arc<T>>
where
    T: PartialEq + Default + Send + Sync + 'static,
{
    let (tx, rx) = watch::channel(Arc::<T>::default());
    let path = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name(format!("ripcord-{what}"))
        .spawn(move || {
            let mut db = None;
            let mut failing = false;
            while !tx.is_closed() {
                let value = (|| -> anyhow::Result<Arc<T>> {
                    if db.is_none() {
                        db = Some(ControlDb::open_read_only(&path)?);
                    }
                    read(db.as_ref().expect("opened above"))
                })();
                match value {
                    Ok(value) => {
                        failing = false;
                        send_if_changed(&tx, value);
                    }
                    Err(e) => {
                        db = None;
                        if !failing {
                            tracing::warn!("cannot read the {what} from {}: {e:#}", path.display());
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(REFRESH);
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the reader of the {what}: {e}");
    }
    rx
}

/// Replaces the value of `tx` with `value` if it differs (receivers are told only then).
pub fn send_if_changed<T: PartialEq>(tx: &watch::Sender<Arc<T>>, value: Arc<T>) {
    tx.send_if_modified(|old| {
        let changed = **old != *value;
        if changed {
            *old = value;
        }
        changed
    });
}
