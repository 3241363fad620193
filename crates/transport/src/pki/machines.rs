//! The machine store: which certificate is each registered machine's current one.
//!
//! Invariants:
//! * A machine id is bound to one certificate at a time (by the SHA-256 of its DER). The
//!   data path accepts a client certificate only if it is its machine's current one, so a
//!   superseded certificate (after a renewal or re-registration) and the certificate of a
//!   removed machine are refused even though they still chain to the CA.
//! * A bootstrap token only ever registers a machine id that is not in the store. An
//!   existing id gets a new certificate only when the request is authenticated by the
//!   machine's current certificate ([`MachineStore::replace`] checks the expected previous
//!   binding under the lock, so two renewals cannot both win), or after an operator
//!   removed it ([`MachineStore::remove`]).
//! * The file is the only state; every change is a read-modify-write under an exclusive
//!   lock on `<dir>/machines.lock` (the running server and `ripcord-ps machines remove`
//!   both change it), written crash-safely.
//!
//! File format (`<dir>/machines`, mode 0600), one line per machine:
//! `<machine id> <sha256(certificate DER) hex> <registered unix s> <expires unix s> <token id|->`
//! where `-` means the certificate was renewed with the machine's previous key.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{MachineId, sha256};
use crate::fsutil;

/// File name of the machine store inside the deployment directory.
pub const MACHINE_STORE_FILE: &str = "machines";
/// File name of the lock serialising changes to the machine store.
pub const MACHINE_LOCK_FILE: &str = "machines.lock";

const STORE_HEADER: &str = "# ripcord machines v1: <machine id> <sha256(certificate) hex> <registered unix s> <expires unix s> <token id|->";

/// Errors of the machine store and of checking a machine's certificate.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The machine id is registered to another key; the request was not authenticated by
    /// its current certificate.
    #[error(
        "machine {0} is already registered to another key: re-register from that machine \
         (its current certificate proves it), or remove it first with \
         `ripcord-ps machines remove {0}`"
    )]
    AlreadyRegistered(MachineId),
    /// The machine is not registered (never was, or an operator removed it).
    #[error(
        "machine {0} is not registered (removed by an operator?); register it again with a \
         new bootstrap token"
    )]
    NotRegistered(MachineId),
    /// The certificate is not the machine's current one (it was renewed or re-registered).
    #[error(
        "this certificate of machine {0} was superseded by a newer one (renewed or \
         re-registered); use the machine's current certificate"
    )]
    Superseded(MachineId),
    /// Reading or writing the store failed.
    #[error("machine store I/O on {path}: {source}")]
    Io {
        /// Path of the store or lock file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The store file is corrupt; fix or recreate it.
    #[error("machine store {path} is corrupt at line {line}")]
    Corrupt {
        /// Path of the store file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },
}

/// One registered machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRecord {
    /// The machine.
    pub machine_id: MachineId,
    /// SHA-256 of its current certificate's DER.
    pub cert_sha256: [u8; 32],
    /// When the current certificate was issued (unix seconds).
    pub registered_at: u64,
    /// When the current certificate expires (unix seconds).
    pub expires_at: u64,
    /// The bootstrap token that registered it; `None` when renewed by its previous key.
    pub token_id: Option<String>,
}

impl MachineRecord {
    /// A record binding `machine_id` to `cert_der`, issued now and valid until `expires_at`.
    pub fn new(
        machine_id: MachineId,
        cert_der: &[u8],
        expires_at: SystemTime,
        token_id: Option<String>,
    ) -> MachineRecord {
        MachineRecord {
            machine_id,
            cert_sha256: sha256(cert_der),
            registered_at: unix_secs(SystemTime::now()),
            expires_at: unix_secs(expires_at),
            token_id,
        }
    }
}

type Records = BTreeMap<String, MachineRecord>;

/// The registered machines at one instant ([`MachineStore::snapshot`]).
#[derive(Debug, Clone)]
pub struct MachineSnapshot(Records);

impl MachineSnapshot {
    /// Ok if `cert_der` is the current certificate of `machine`.
    pub fn check_current(&self, machine: &MachineId, cert_der: &[u8]) -> Result<(), MachineError> {
        match self.0.get(machine.as_str()) {
            None => Err(MachineError::NotRegistered(machine.clone())),
            Some(r) if r.cert_sha256 != sha256(cert_der) => {
                Err(MachineError::Superseded(machine.clone()))
            }
            Some(_) => Ok(()),
        }
    }
}

/// The registered machines of a deployment (`<dir>/machines`); see the module doc.
#[derive(Debug, Clone)]
pub struct MachineStore {
    path: PathBuf,
    lock_path: PathBuf,
}

impl MachineStore {
    /// Opens the store in `dir` (created empty if missing) and checks that it parses.
    pub fn open(dir: &Path) -> Result<MachineStore, MachineError> {
        let store = MachineStore {
            path: dir.join(MACHINE_STORE_FILE),
            lock_path: dir.join(MACHINE_LOCK_FILE),
        };
        fsutil::ensure_dir(dir).map_err(|e| store.io_err(&store.path, e))?;
        if !store.path.exists() {
            store.update(|_| Ok(()))?;
        }
        store.read()?;
        Ok(store)
    }

    /// Every registered machine, by id.
    pub fn list(&self) -> Result<Vec<MachineRecord>, MachineError> {
        Ok(self.read()?.into_values().collect())
    }

    /// The record of `machine`, if registered.
    pub fn get(&self, machine: &MachineId) -> Result<Option<MachineRecord>, MachineError> {
        Ok(self.read()?.remove(machine.as_str()))
    }

    /// Ok if `cert_der` is the current certificate of `machine`.
    pub fn check_current(&self, machine: &MachineId, cert_der: &[u8]) -> Result<(), MachineError> {
        self.snapshot()?.check_current(machine, cert_der)
    }

    /// The store as read now, to check many certificates with one read.
    pub fn snapshot(&self) -> Result<MachineSnapshot, MachineError> {
        Ok(MachineSnapshot(self.read()?))
    }

    /// Binds `record.machine_id` to a new certificate. `previous` is the binding the caller
    /// authenticated against: `None` for a new machine (refused if the id is taken), or
    /// the SHA-256 of the certificate the request was authenticated with (refused unless
    /// it is still the current one).
    pub fn replace(
        &self,
        record: MachineRecord,
        previous: Option<[u8; 32]>,
    ) -> Result<(), MachineError> {
        self.update(|records| {
            let current = records
                .get(record.machine_id.as_str())
                .map(|r| r.cert_sha256);
            if current != previous {
                return Err(MachineError::AlreadyRegistered(record.machine_id.clone()));
            }
            records.insert(record.machine_id.as_str().to_owned(), record);
            Ok(())
        })
    }

    /// Makes the store hold exactly `assigned` (machine, SHA-256 of its current
    /// certificate): what a process server that joined a deployment is told by its
    /// configuration role. A record whose certificate is unchanged keeps its times; a new
    /// one has no known expiry (0). Writes only when something changed; returns whether it
    /// did.
    pub fn sync(&self, assigned: &[(MachineId, [u8; 32])]) -> Result<bool, MachineError> {
        let current = self.read()?;
        let same = current.len() == assigned.len()
            && assigned.iter().all(|(id, hash)| {
                current
                    .get(id.as_str())
                    .is_some_and(|r| &r.cert_sha256 == hash)
            });
        if same {
            return Ok(false);
        }
        let now = unix_secs(SystemTime::now());
        self.update(|records| {
            let mut next = Records::new();
            for (id, hash) in assigned {
                let record = records
                    .get(id.as_str())
                    .filter(|r| &r.cert_sha256 == hash)
                    .cloned()
                    .unwrap_or_else(|| MachineRecord {
                        machine_id: id.clone(),
                        cert_sha256: *hash,
                        registered_at: now,
                        expires_at: 0,
                        token_id: None,
                    });
                next.insert(id.as_str().to_owned(), record);
            }
            *records = next;
            Ok(())
        })?;
        Ok(true)
    }

    /// Removes a machine: its certificate is refused from now on. Returns whether it was
    /// registered.
    pub fn remove(&self, machine: &MachineId) -> Result<bool, MachineError> {
        self.update(|records| Ok(records.remove(machine.as_str()).is_some()))
    }

    fn io_err(&self, path: &Path, source: io::Error) -> MachineError {
        MachineError::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn update<R>(
        &self,
        change: impl FnOnce(&mut Records) -> Result<R, MachineError>,
    ) -> Result<R, MachineError> {
        let _held = ripcord_crashsafe::lock_exclusive(&self.lock_path)
            .map_err(|e| self.io_err(&self.lock_path, e))?;
        let mut records = match self.read() {
            Err(MachineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Records::new()
            }
            other => other?,
        };
        let result = change(&mut records)?;
        let mut text = format!("{STORE_HEADER}\n");
        for r in records.values() {
            text.push_str(&format!(
                "{} {} {} {} {}\n",
                r.machine_id,
                hex::encode(r.cert_sha256),
                r.registered_at,
                r.expires_at,
                r.token_id.as_deref().unwrap_or("-")
            ));
        }
        fsutil::write_atomic(&self.path, text.as_bytes(), fsutil::MODE_SECRET)
            .map_err(|e| self.io_err(&self.path, e))?;
        Ok(result)
    }

    fn read(&self) -> Result<Records, MachineError> {
        let text = fsutil::read_text(&self.path).map_err(|e| self.io_err(&self.path, e))?;
        let mut records = Records::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let corrupt = || MachineError::Corrupt {
                path: self.path.clone(),
                line: i + 1,
            };
            let record = parse_record(line).ok_or_else(corrupt)?;
            let key = record.machine_id.as_str().to_owned();
            if records.insert(key, record).is_some() {
                return Err(corrupt());
            }
        }
        Ok(records)
    }
}

fn parse_record(line: &str) -> Option<MachineRecord> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let [id, hash, registered, expires, token] = fields[..] else {
        return None;
    };
    let mut cert_sha256 = [0u8; 32];
    hex::decode_to_slice(hash, &mut cert_sha256).ok()?;
    Some(MachineRecord {
        machine_id: MachineId::new(id).ok()?,
        cert_sha256,
        registered_at: registered.parse().ok()?,
        expires_at: expires.parse().ok()?,
        token_id: (token != "-").then(|| token.to_owned()),
    })
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> MachineId {
        MachineId::new(s).unwrap()
    }

    fn record(machine: &str, cert: &[u8], token: Option<&str>) -> MachineRecord {
        MachineRecord::new(
            id(machine),
            cert,
            SystemTime::now(),
            token.map(str::to_owned),
        )
    }

    /// The attacker holds a bootstrap token and names an existing machine.
    #[test]
    fn a_token_never_rebinds_an_existing_machine() {
        let dir = tempfile::tempdir().unwrap();
        let store = MachineStore::open(dir.path()).unwrap();
        store
            .replace(record("db1", b"cert-1", Some("tok001")), None)
            .unwrap();
        let err = store
            .replace(record("db1", b"impostor", Some("tok002")), None)
            .unwrap_err();
        assert!(matches!(err, MachineError::AlreadyRegistered(_)), "{err}");
        assert!(err.to_string().contains("ripcord-ps machines remove db1"));
        store.check_current(&id("db1"), b"cert-1").unwrap();
        // Renewal authenticated by the current certificate supersedes it.
        store
            .replace(record("db1", b"cert-2", None), Some(sha256(b"cert-1")))
            .unwrap();
        assert!(matches!(
            store.check_current(&id("db1"), b"cert-1"),
            Err(MachineError::Superseded(_))
        ));
        // A second renewal with the superseded certificate loses.
        assert!(matches!(
            store.replace(record("db1", b"cert-3", None), Some(sha256(b"cert-1"))),
            Err(MachineError::AlreadyRegistered(_))
        ));
        // Persisted, and read by a second handle (the operator's CLI).
        let operator = MachineStore::open(dir.path()).unwrap();
        let listed = operator.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].token_id, None);
        assert!(operator.remove(&id("db1")).unwrap());
        assert!(matches!(
            store.check_current(&id("db1"), b"cert-2"),
            Err(MachineError::NotRegistered(_))
        ));
        assert!(!operator.remove(&id("db1")).unwrap());
        // After removal a token may register the id again (an explicit operator action).
        store
            .replace(record("db1", b"cert-4", Some("tok003")), None)
            .unwrap();
    }

    /// A joined process server holds exactly the machines its configuration role assigns.
    #[test]
    fn sync_holds_exactly_the_assigned_machines() {
        let dir = tempfile::tempdir().unwrap();
        let store = MachineStore::open(dir.path()).unwrap();
        store
            .replace(record("gone", b"cert-g", Some("tok001")), None)
            .unwrap();
        store
            .replace(record("kept", b"cert-k", Some("tok002")), None)
            .unwrap();
        let before = store.get(&id("kept")).unwrap().unwrap();
        let assigned = [
            (id("kept"), sha256(b"cert-k")),
            (id("new"), sha256(b"cert-n")),
        ];
        assert!(store.sync(&assigned).unwrap());
        assert!(
            !store.sync(&assigned).unwrap(),
            "nothing changed: nothing written"
        );
        store.check_current(&id("new"), b"cert-n").unwrap();
        assert_eq!(
            store.get(&id("kept")).unwrap().unwrap(),
            before,
            "times kept"
        );
        assert!(matches!(
            store.check_current(&id("gone"), b"cert-g"),
            Err(MachineError::NotRegistered(_))
        ));
        // A renewal seen by the configuration role supersedes the old certificate here.
        assert!(store.sync(&[(id("new"), sha256(b"cert-n2"))]).unwrap());
        assert!(matches!(
            store.check_current(&id("new"), b"cert-n"),
            Err(MachineError::Superseded(_))
        ));
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn a_corrupt_store_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MACHINE_STORE_FILE), "# h\nm1 zz 1 2 -\n").unwrap();
        assert!(matches!(
            MachineStore::open(dir.path()),
            Err(MachineError::Corrupt { line: 2, .. })
        ));
    }
}
