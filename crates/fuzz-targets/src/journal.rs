//! The process server's journal on the cache disk (`crates/journal`) and what its
//! records hold (`process-server/src/disk.rs`).

use ripcord_journal::{
    EngineChoice, Journal, JournalConfig, MIN_SEGMENT_SIZE, RecordType, RecoveryMode,
    format::{FORMAT_VERSION, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, encode_segment_header, fuzzing},
};

use crate::scratch;

/// Segment header and record decoding on a buffer (the segment number first, then an
/// optional segment header, then records): a header that decodes re-encodes to the same
/// bytes (current version); every valid record found re-encodes (header from
/// its decoded fields, same payload) to the same bytes, and the search for valid records
/// finds the one at the start.
pub fn journal_record(data: &[u8]) {
    // The segment number the checksums are mixed with comes first.
    let Some((segment, buf)) = data.split_first_chunk::<8>() else {
        return;
    };
    let segment = u64::from_le_bytes(*segment);
    // Records follow a segment header, if there is one.
    let mut at = 0;
    if let Some((number, first_seq, version)) = fuzzing::decode_segment_header(buf) {
        crate::accepted();
        if version == FORMAT_VERSION {
            assert_eq!(
                encode_segment_header(number, first_seq)[..],
                buf[..SEGMENT_HEADER_LEN]
            );
        }
        at = SEGMENT_HEADER_LEN;
    }
    while let Some(r) = fuzzing::decode_record(segment, &buf[at..]) {
        crate::accepted();
        let raw = &buf[at..at + r.len];
        let payload = &raw[ripcord_journal::RECORD_HEADER_LEN..];
        let header =
            fuzzing::encode_record_header(segment, r.kind, r.seq, r.unsynced_before, payload);
        assert_eq!(header[..], raw[..header.len()], "record header re-encodes");
        assert_eq!(fuzzing::find_valid_record(segment, &buf[at..]), Some(0));
        at += r.len;
    }
    // Whatever follows is not a record at its start; the search skips past it.
    if let Some(off) = fuzzing::find_valid_record(segment, &buf[at..]) {
        let off = usize::try_from(off).expect("an offset in the buffer");
        assert!(off > 0);
        assert!(fuzzing::decode_record(segment, &buf[at + off..]).is_some());
    }
}

/// A journal directory opened by recovery: the input is split into segment files at
/// each segment magic (at most 4, numbered from 1). Whatever recovery accepts (with
/// torn-tail tolerance, or else the operator's truncation) must then open in strict
/// mode with nothing left to repair, and read back the same contiguous records.
pub fn journal_segment(data: &[u8]) {
    scratch(|dir| {
        let mut starts: Vec<usize> = (0..data.len())
            .filter(|&i| data[i..].starts_with(&SEGMENT_MAGIC))
            .take(4)
            .collect();
        if starts.first() != Some(&0) {
            starts.insert(0, 0);
            starts.truncate(4);
        }
        for (i, &from) in starts.iter().enumerate() {
            let to = starts.get(i + 1).copied().unwrap_or(data.len());
            let name = format!("{:020}.seg", i + 1);
            std::fs::write(dir.join(name), &data[from..to]).expect("writing a segment");
        }
        let cfg = |recovery| JournalConfig {
            segment_size: MIN_SEGMENT_SIZE,
            engine: EngineChoice::Sync,
            recovery,
            ..JournalConfig::default()
        };
        let opened = Journal::open(dir, cfg(RecoveryMode::TolerateTornTail))
            .or_else(|_| Journal::open(dir, cfg(RecoveryMode::TruncateCorruptTail)));
        let Ok(journal) = opened else {
            return;
        };
        crate::accepted();
        let first = read_all(&journal);
        drop(journal);
        let journal =
            Journal::open(dir, cfg(RecoveryMode::Strict)).expect("recovered journal reopens");
        let report = journal.recovery_report();
        assert_eq!(report.truncated_bytes, 0, "second recovery truncated");
        assert_eq!(
            read_all(&journal),
            first,
            "second recovery reads differently"
        );
    });
}

fn read_all(journal: &Journal) -> Vec<(u64, RecordType, Vec<u8>)> {
    let from = journal.first_seq();
    let records: Vec<_> = journal
        .read_from(from)
        .expect("a recovered journal reads from its first record")
        .map(|r| {
            let r = r.expect("recovered records read back");
            (r.seq, r.kind, r.payload)
        })
        .collect();
    for (i, (seq, _, _)) in records.iter().enumerate() {
        assert_eq!(*seq, from + i as u64, "sequence numbers are contiguous");
    }
    assert_eq!(records.len() as u64, journal.next_seq() - from);
    records
}

/// A journal record's payload as the process server's replay decodes it (one protocol
/// frame of the type the record says): what decodes re-encodes to the same payload.
pub fn journal_entry(data: &[u8]) {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    let Some(kind) = RecordType::from_u8(kind) else {
        return;
    };
    use ripcord_process_server::disk::{Entry, decode_entry};
    use ripcord_proto::Message;
    let Ok(entry) = decode_entry(kind, payload) else {
        return;
    };
    crate::accepted();
    let (msg, prefix) = match entry {
        Entry::EpochStart(p) => (Message::ProtectDisk(p), None),
        Entry::KeyRotation { from_seq, pd } => (Message::ProtectDisk(pd), Some(from_seq)),
        Entry::Batch(b) => (Message::Batch(b), None),
        Entry::Cut(c) => (Message::Cut(c), None),
    };
    let frame = msg.to_frame().expect("a decoded frame is valid");
    let encoded = match prefix {
        Some(from_seq) => ripcord_process_server::disk::key_rotation_payload(from_seq, &frame),
        None => frame,
    };
    assert_eq!(encoded, payload);
}
