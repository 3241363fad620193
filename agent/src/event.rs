//! Decoding of [`ChangeEvent`]s from ring-buffer records.
//!
//! A pure function over bytes: the kernel is trusted to write whole records, but a decoder
//! that reads shared memory still checks everything it relies on.

use agent_common::{CHANGE_EVENT_SIZE, ChangeEvent, MAX_SLOTS, op};

/// Why a ring-buffer record is not a valid [`ChangeEvent`]. Any of these means the BPF
/// object and the agent disagree (a build mismatch): the caller should stop and resync.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("ring record is {got} bytes, a change event is {CHANGE_EVENT_SIZE}")]
    Length { got: usize },
    #[error("change event names slot {0}, but at most {MAX_SLOTS} slots exist")]
    Slot(u32),
    #[error("change event has unknown op flags {0:#x}")]
    Op(u32),
    #[error("change event at sector {sector} with {sectors} sectors overflows the sector space")]
    Range { sector: u64, sectors: u32 },
}

const KNOWN_OPS: u32 = op::WRITE
    | op::DISCARD
    | op::WRITE_ZEROES
    | op::FLUSH
    | op::FUA
    | op::SECURE_ERASE
    | op::ERROR
    | op::LOST;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Decode one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<ChangeEvent, DecodeError> {
    if bytes.len() != CHANGE_EVENT_SIZE {
        return Err(DecodeError::Length { got: bytes.len() });
    }
    let event = ChangeEvent {
        time_ns: u64_at(bytes, 0),
        seq: u64_at(bytes, 8),
        sector: u64_at(bytes, 16),
        sectors: u32_at(bytes, 24),
        slot: u32_at(bytes, 28),
        op: u32_at(bytes, 32),
        error: u32_at(bytes, 36) as i32,
    };
    if event.slot >= MAX_SLOTS {
        return Err(DecodeError::Slot(event.slot));
    }
    if event.op & !KNOWN_OPS != 0 {
        return Err(DecodeError::Op(event.op));
    }
    if event.sector.checked_add(u64::from(event.sectors)).is_none() {
        return Err(DecodeError::Range {
            sector: event.sector,
            sectors: event.sectors,
        });
    }
    Ok(event)
}

/// The name of an event's operation in `--json` output.
pub fn op_name(flags: u32) -> &'static str {
    if flags & op::LOST != 0 {
        "lost"
    } else if flags & op::WRITE != 0 {
        "write"
    } else if flags & (op::DISCARD | op::SECURE_ERASE) != 0 {
        "discard"
    } else if flags & op::WRITE_ZEROES != 0 {
        "write-zeroes"
    } else {
        "flush"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(e: &ChangeEvent) -> Vec<u8> {
        let mut b = Vec::with_capacity(CHANGE_EVENT_SIZE);
        b.extend_from_slice(&e.time_ns.to_le_bytes());
        b.extend_from_slice(&e.seq.to_le_bytes());
        b.extend_from_slice(&e.sector.to_le_bytes());
        b.extend_from_slice(&e.sectors.to_le_bytes());
        b.extend_from_slice(&e.slot.to_le_bytes());
        b.extend_from_slice(&e.op.to_le_bytes());
        b.extend_from_slice(&e.error.to_le_bytes());
        b
    }

    fn sample() -> ChangeEvent {
        ChangeEvent {
            time_ns: 123_456_789,
            seq: 42,
            sector: 2048,
            sectors: 8,
            slot: 3,
            op: op::WRITE | op::FUA,
            error: 0,
        }
    }

    #[test]
    fn decodes_a_crafted_record() {
        assert_eq!(decode(&encode(&sample())), Ok(sample()));
        let mut failed = sample();
        failed.error = -5;
        failed.op |= op::ERROR;
        assert_eq!(decode(&encode(&failed)), Ok(failed));
    }

    #[test]
    fn layout_matches_the_kernel_struct() {
        // The decoder reads fields at fixed offsets; this pins them to the repr(C) layout.
        let e = sample();
        // SAFETY: ChangeEvent is repr(C) without padding (asserted in agent-common).
        let raw =
            unsafe { std::slice::from_raw_parts((&raw const e).cast::<u8>(), CHANGE_EVENT_SIZE) };
        assert_eq!(decode(raw), Ok(e));
    }

    #[test]
    fn rejects_bad_lengths() {
        let b = encode(&sample());
        assert_eq!(decode(&b[..39]), Err(DecodeError::Length { got: 39 }));
        assert_eq!(decode(&[]), Err(DecodeError::Length { got: 0 }));
        let mut long = b.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(DecodeError::Length { got: 41 }));
    }

    #[test]
    fn rejects_bad_fields() {
        let mut e = sample();
        e.slot = MAX_SLOTS;
        assert_eq!(decode(&encode(&e)), Err(DecodeError::Slot(MAX_SLOTS)));
        let mut e = sample();
        e.op = 1 << 20;
        assert_eq!(decode(&encode(&e)), Err(DecodeError::Op(1 << 20)));
        let mut e = sample();
        e.sector = u64::MAX - 2;
        assert!(matches!(
            decode(&encode(&e)),
            Err(DecodeError::Range { .. })
        ));
    }

    #[test]
    fn op_names() {
        assert_eq!(op_name(op::WRITE | op::FLUSH | op::FUA), "write");
        assert_eq!(op_name(op::DISCARD), "discard");
        assert_eq!(op_name(op::SECURE_ERASE), "discard");
        assert_eq!(op_name(op::WRITE_ZEROES), "write-zeroes");
        assert_eq!(op_name(op::FLUSH), "flush");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let _ = decode(&bytes);
        }
    }
}
