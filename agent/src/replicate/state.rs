//! Persistent agent state (`<state-dir>/state.json`): the server to use, the pinned
//! escrow key, and for each
//! protected device its disk id and last epoch. Epochs are persisted *before* they are
//! used, so one is never reused (nonces are unique per epoch and key).
//!
//! **Damage is found, never acted on.** A flipped bit here could lower an epoch, move a
//! disk to another id, or pin an escrow key nobody holds (every data key wrapped to it
//! would be lost, silently). So the file is a checked JSON file
//! ([`ripcord_crashsafe::checked`]: a CRC32C member over the rest), unknown fields are
//! refused (a flip in the checksum's own name is not an absent checksum), and
//! [`AgentState::load`] refuses a file that does not match, naming it and saying what to
//! do. A file without a checksum (written by an older version) is accepted and gets one at
//! the next save.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// One protected device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    /// 32 hex digits.
    pub disk_id: String,
    /// Last epoch started.
    pub epoch: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentState {
    /// Data endpoint saved by `register`.
    #[serde(default)]
    pub server: Option<String>,
    /// TLS name of the server (host part of the registration address).
    #[serde(default)]
    pub server_name: Option<String>,
    /// The registration endpoint (`HOST:PORT`) given to `register`: renewals go there.
    #[serde(default)]
    pub register_server: Option<String>,
    /// The deployment's escrow public key (hex), pinned by `register`: data keys are
    /// wrapped to it and to no other, whatever a process server's hello says.
    #[serde(default)]
    pub escrow_key: Option<String>,
    /// By device path.
    #[serde(default)]
    pub disks: BTreeMap<PathBuf, DiskState>,
}

impl AgentState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    pub fn load(state_dir: &Path) -> anyhow::Result<AgentState> {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(AgentState::default());
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let damaged = |what: String| {
            anyhow::anyhow!(
                "{} is damaged ({what}): the agent does not guess its disks' ids and epochs \
                 or the pinned escrow key. Restore the file from a backup, or move it away \
                 and run `ripcord-agent register` again (every disk then starts over with a \
                 new id and a full initial sync)",
                path.display()
            )
        };
        let (state, checksum) = ripcord_crashsafe::checked::from_checked_json(&bytes)
            .map_err(|e| damaged(e.to_string()))?;
        if checksum == ripcord_crashsafe::checked::Checksum::Absent {
            tracing::warn!(
                "{} has no checksum (written by an older version); it gets one at the next \
                 save",
                path.display()
            );
        }
        Ok(state)
    }

    /// The pinned escrow public key.
    pub fn pinned_escrow_key(&self) -> anyhow::Result<[u8; 32]> {
        let hex_key = self.escrow_key.as_deref().context(
            "no pinned escrow key in state.json (registered by an older version): run \
             `ripcord-agent register` again (with a new token; the current key renews)",
        )?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(hex_key, &mut key)
            .context("the pinned escrow key in state.json is not 64 hex digits")?;
        Ok(key)
    }

    /// Write crash-safely (temp file, fsync, rename, directory fsync), mode 0600.
    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        ensure_state_dir(state_dir)?;
        let path = Self::path(state_dir);
        ripcord_crashsafe::write_atomic(
            &path,
            &ripcord_crashsafe::checked::to_checked_json(self)?,
            ripcord_crashsafe::MODE_SECRET,
        )
        .with_context(|| format!("writing {}", path.display()))
    }

    /// The disk id of `device` and its newest epoch, if it was protected before.
    pub fn current_epoch(&self, device: &Path) -> anyhow::Result<Option<([u8; 16], u64)>> {
        let Some(entry) = self.disks.get(device).filter(|e| e.epoch > 0) else {
            return Ok(None);
        };
        Ok(Some((entry.id(device)?, entry.epoch)))
    }

    /// The disk id of `device` (new if unknown) and a fresh epoch for it, persisted.
    pub fn next_epoch(
        &mut self,
        device: &Path,
        state_dir: &Path,
    ) -> anyhow::Result<([u8; 16], u64)> {
        let entry = match self.disks.get_mut(device) {
            Some(e) => e,
            None => {
                let mut id = [0u8; 16];
                getrandom_fill(&mut id)?;
                self.disks.entry(device.to_owned()).or_insert(DiskState {
                    disk_id: ripcord_proto::DiskId(id).to_string(),
                    epoch: 0,
                })
            }
        };
        entry.epoch += 1;
        let epoch = entry.epoch;
        let id = entry.id(device)?;
        self.save(state_dir)?;
        Ok((id, epoch))
    }
}

impl DiskState {
    /// The disk id, parsed (`device` names the entry in the error).
    fn id(&self, device: &Path) -> anyhow::Result<[u8; 16]> {
        hex::decode(&self.disk_id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| {
                format!(
                    "bad disk id {:?} in state for {}",
                    self.disk_id,
                    device.display()
                )
            })
    }
}

/// Create the state directory (and missing parents) with mode 0700, or tighten an
/// existing one that others may read: it holds the machine's private key.
pub fn ensure_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let mode = std::fs::metadata(state_dir)
        .with_context(|| format!("reading {}", state_dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "state directory {} had mode {:o}: setting 0700 (it holds the machine's key)",
            state_dir.display(),
            mode & 0o777
        );
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", state_dir.display()))?;
    }
    Ok(())
}

fn getrandom_fill(buf: &mut [u8]) -> anyhow::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_advance_and_persist() {
        let dir = std::env::temp_dir().join(format!("ripcord-state-test-{}", std::process::id()));
        let mut s = AgentState::default();
        let (id1, e1) = s.next_epoch(Path::new("/dev/loop9"), &dir).unwrap();
        let (id2, e2) = s.next_epoch(Path::new("/dev/loop9"), &dir).unwrap();
        assert_eq!((id1, e1 + 1), (id2, e2));
        let loaded = AgentState::load(&dir).unwrap();
        assert_eq!(loaded, s);
        let (id3, e3) = AgentState::load(&dir)
            .unwrap()
            .next_epoch(Path::new("/dev/loop8"), &dir)
            .unwrap();
        assert_ne!(id3, id1);
        assert_eq!(e3, 1);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "state directory");
        assert_eq!(mode(&AgentState::path(&dir)), 0o600, "state.json");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every single-bit flip and every truncation of a saved state.json is refused with
    /// the file named, or (a flip that leaves the same JSON value, none known) yields the
    /// saved state exactly: never another epoch, disk id or escrow key.
    #[test]
    fn a_damaged_state_file_is_refused_never_misread() {
        let dir = std::env::temp_dir().join(format!("ripcord-state-flip-{}", std::process::id()));
        let mut s = AgentState {
            server: Some("ps.example:7443".into()),
            server_name: Some("ps.example".into()),
            register_server: Some("ps.example:7444".into()),
            escrow_key: Some("ab".repeat(32)),
            ..AgentState::default()
        };
        s.next_epoch(Path::new("/dev/sdb"), &dir).unwrap();
        s.next_epoch(Path::new("/dev/nvme0n1p2"), &dir).unwrap();
        let path = AgentState::path(&dir);
        let good = std::fs::read(&path).unwrap();
        let name = path.display().to_string();
        let (mut refused, mut same) = (0, 0);
        let mut check = |bytes: &[u8], what: &str| {
            std::fs::write(&path, bytes).unwrap();
            match AgentState::load(&dir) {
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(
                        msg.contains(&name) && msg.contains("damaged"),
                        "{what}: {msg}"
                    );
                    refused += 1;
                }
                Ok(loaded) => {
                    assert_eq!(loaded, s, "{what} was read as another state");
                    same += 1;
                }
            }
        };
        for i in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                check(&bad, &format!("bit {bit} of byte {i} flipped"));
            }
        }
        for len in 0..good.len() - 1 {
            check(&good[..len], &format!("truncated to {len} bytes"));
        }
        assert!(
            refused > good.len() * 8,
            "{refused} refused, {same} read the same"
        );
        // An older version's file (no checksum) still loads.
        let mut old: serde_json::Value = serde_json::from_slice(&good).unwrap();
        old.as_object_mut().unwrap().remove("crc32c");
        std::fs::write(&path, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
        assert_eq!(AgentState::load(&dir).unwrap(), s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
