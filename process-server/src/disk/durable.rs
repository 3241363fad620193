//! The receiver's durable state next to a disk's journal (`receiver-state.json`): what
//! the journal no longer shows once its records are trimmed (the epoch, the durable
//! sequence, the newest cut, and the current epoch's data key), saved before each trim and
//! rebuilt at open from it and every record still in the journal.

use std::path::Path;

use anyhow::Context as _;
use ripcord_journal::Journal;
use ripcord_proto::{DurableState, receiver::CutPos};

use super::{Entry, decode_entry};

pub(super) const STATE_FILE: &str = "receiver-state.json";

pub(super) fn save_state(
    dir: &Path,
    st: &DurableState,
    wrapped_key: Option<&[u8]>,
) -> anyhow::Result<()> {
    let v = serde_json::json!({
        "epoch": st.epoch,
        "durable_seq": st.durable_seq,
        "last_cut": st.last_cut.map(|c| [c.id, c.seq]),
        "wrapped_key": wrapped_key.map(hex::encode),
    });
    crate::deploy::write_atomic(&dir.join(STATE_FILE), v.to_string().as_bytes())
}

/// The saved durable state and current epoch's key (`None` before the first trim).
pub(super) fn load_state(dir: &Path) -> anyhow::Result<(Option<DurableState>, Option<Vec<u8>>)> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, None)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let num = |k: &str| {
        v[k].as_u64()
            .with_context(|| format!("{}: no {k}", path.display()))
    };
    let last_cut = v["last_cut"].as_array().and_then(|a| {
        Some(CutPos {
            id: a.first()?.as_u64()?,
            seq: a.get(1)?.as_u64()?,
        })
    });
    let wrapped_key = match v["wrapped_key"].as_str() {
        Some(h) => {
            Some(hex::decode(h).with_context(|| format!("{}: wrapped_key", path.display()))?)
        }
        None => None,
    };
    Ok((
        Some(DurableState {
            epoch: num("epoch")?,
            durable_seq: num("durable_seq")?,
            last_cut,
        }),
        wrapped_key,
    ))
}

/// Rebuild the receiver's durable state and the current key: the saved ones (from before
/// the last trim), then every record still in the journal (all durable: recovery dropped
/// any torn tail).
pub(super) fn scan(
    journal: &Journal,
    saved: Option<DurableState>,
    mut wrapped_key: Option<Vec<u8>>,
) -> anyhow::Result<(DurableState, Option<Vec<u8>>)> {
    let mut state = saved.unwrap_or(DurableState {
        epoch: 0,
        durable_seq: 0,
        last_cut: None,
    });
    for record in journal.read_from(journal.first_seq())? {
        let record = record?;
        let entry = decode_entry(record.kind, &record.payload)
            .with_context(|| format!("journal record {}", record.seq))?;
        let (epoch, batch, cut) = match &entry {
            Entry::EpochStart(p) | Entry::KeyRotation { pd: p, .. } => (p.epoch, None, None),
            Entry::Batch(b) => (b.epoch, Some(b.last_seq), None),
            Entry::Cut(c) => (
                c.epoch,
                None,
                Some(CutPos {
                    id: c.id,
                    seq: c.seq,
                }),
            ),
        };
        if epoch < state.epoch {
            continue; // an older epoch's records, not yet trimmed
        }
        if epoch > state.epoch {
            state = DurableState {
                epoch,
                durable_seq: 0,
                last_cut: None,
            };
            wrapped_key = None;
        }
        if let Entry::EpochStart(p) | Entry::KeyRotation { pd: p, .. } = entry {
            wrapped_key = Some(p.wrapped_key);
        }
        if let Some(seq) = batch {
            state.durable_seq = state.durable_seq.max(seq);
        }
        if let Some(c) = cut
            && state.last_cut.is_none_or(|l| l.id < c.id)
        {
            state.last_cut = Some(c);
        }
    }
    Ok((state, wrapped_key))
}
