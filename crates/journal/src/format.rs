//! On-disk format (all integers little-endian).
//!
//! ## Segment files
//!
//! A journal directory holds append-only segment files named
//! `{segment_number:020}.seg`, where `segment_number` is a counter that starts
//! at 1 and increases by one for each new segment (never reused). Each segment
//! starts with a [`SEGMENT_HEADER_LEN`]-byte header:
//!
//! | offset | size | field                                            |
//! |--------|------|--------------------------------------------------|
//! | 0      | 8    | magic `b"RIPCJRNL"`                              |
//! | 8      | 4    | format version ([`FORMAT_VERSION`])              |
//! | 12     | 8    | segment number (must match the file name)        |
//! | 20     | 8    | sequence number of the first record in the file  |
//! | 28     | 4    | CRC32C of bytes 0..28                            |
//!
//! ## Records
//!
//! Records follow the header back to back, each a [`RECORD_HEADER_LEN`]-byte
//! header then the payload:
//!
//! | offset | size | field                                                |
//! |--------|------|------------------------------------------------------|
//! | 0      | 4    | payload length (≤ [`MAX_RECORD_PAYLOAD`])            |
//! | 4      | 1    | record type ([`RecordType`])                         |
//! | 5      | 3    | `unsynced_before` (u24, see below; 0 in version 1)   |
//! | 8      | 8    | sequence number                                      |
//! | 16     | 4    | CRC32C                                               |
//! | 20     | len  | payload                                              |
//!
//! The CRC is `crc32c(segment_number_le ‖ header[0..16] ‖ payload)`: mixing in
//! the segment number makes bytes left over from another segment (a reused or
//! preallocated file, a copied block) fail verification.
//!
//! `unsynced_before` is how many records had been appended and not yet made durable
//! (fdatasync) when this record was appended: every record with a sequence below
//! `seq - unsynced_before` was durable then. Recovery uses it to tell a torn group commit
//! from damage to acknowledged records (see `recovery.rs`). The journal syncs before a
//! group would make it exceed [`MAX_UNSYNCED_BEFORE`].
//!
//! Sequence numbers are contiguous across the whole journal: the first record
//! of segment *n+1* has the sequence following the last record of segment *n*
//! (the header's `first_seq` records this even for an empty segment).

/// Segment file magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"RIPCJRNL";
/// Current on-disk format version (2: records carry `unsynced_before`). Version 1
/// segments (field always zero) are still read.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest format version read.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Largest `unsynced_before` a record header holds (24 bits).
pub const MAX_UNSYNCED_BEFORE: u64 = (1 << 24) - 1;
/// Size of the segment header in bytes.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Size of a record header in bytes.
pub const RECORD_HEADER_LEN: usize = 20;
/// Largest payload accepted in one record (32 MiB). Lengths read from disk
/// are bounded by this before any allocation.
pub const MAX_RECORD_PAYLOAD: usize = 32 * 1024 * 1024;
/// Suffix of segment files.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of temporary (being created) segment files; removed at open.
pub const TEMP_SUFFIX: &str = ".seg.tmp";

/// Type of a journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordType {
    /// A sealed batch of changed disk blocks from an agent.
    Batch = 1,
    /// A consistency cut (crash-/app-consistent recovery point marker).
    Cut = 2,
    /// Start of a new replication epoch (e.g. after a resync).
    EpochStart = 3,
    /// A new data key for the current epoch from a sequence on (an agent restarted and
    /// continues its epoch): the sequence, u64 LE, then the agent's `ProtectDisk` frame.
    KeyRotation = 4,
}

impl RecordType {
    /// Decode a type byte; `None` for unknown values (including 0, so zeroed
    /// preallocated space never parses as a record).
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(RecordType::Batch),
            2 => Some(RecordType::Cut),
            3 => Some(RecordType::EpochStart),
            4 => Some(RecordType::KeyRotation),
            _ => None,
        }
    }
}

/// Decoded segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub number: u64,
    pub first_seq: u64,
}

/// Why a segment header failed to decode.
pub(crate) enum HeaderError {
    BadMagic,
    Version(u32),
    Checksum,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.number.to_le_bytes());
        b[20..28].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; SEGMENT_HEADER_LEN]) -> Result<Self, HeaderError> {
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let crc = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes"));
        if crc32c::crc32c(&b[0..28]) != crc {
            return Err(HeaderError::Checksum);
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(HeaderError::Version(version));
        }
        Ok(SegmentHeader {
            number: u64::from_le_bytes(b[12..20].try_into().expect("8 bytes")),
            first_seq: u64::from_le_bytes(b[20..28].try_into().expect("8 bytes")),
        })
    }
}

/// Decoded record header (before checksum verification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub len: u32,
    pub kind: RecordType,
    /// Records appended and not yet durable when this one was appended.
    pub unsynced_before: u32,
    pub seq: u64,
    pub crc: u32,
}

impl RecordHeader {
    /// Build and checksum a header for `payload` in segment `segment`.
    pub fn encode(
        segment: u64,
        kind: RecordType,
        seq: u64,
        unsynced_before: u64,
        payload: &[u8],
    ) -> [u8; RECORD_HEADER_LEN] {
        debug_assert!(payload.len() <= MAX_RECORD_PAYLOAD);
        debug_assert!(unsynced_before <= MAX_UNSYNCED_BEFORE);
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b[4] = kind as u8;
        b[5..8].copy_from_slice(&(unsynced_before as u32).to_le_bytes()[..3]);
        b[8..16].copy_from_slice(&seq.to_le_bytes());
        let crc = record_crc(segment, &b[0..16], payload);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse a header; `None` if structurally invalid (unknown type, length over
    /// the maximum). Does not verify the checksum.
    pub fn decode(b: &[u8]) -> Option<Self> {
        debug_assert!(b.len() >= RECORD_HEADER_LEN);
        let len = u32::from_le_bytes(b[0..4].try_into().ok()?);
        if len as usize > MAX_RECORD_PAYLOAD {
            return None;
        }
        let kind = RecordType::from_u8(b[4])?;
        Some(RecordHeader {
            len,
            kind,
            unsynced_before: u32::from_le_bytes([b[5], b[6], b[7], 0]),
            seq: u64::from_le_bytes(b[8..16].try_into().ok()?),
            crc: u32::from_le_bytes(b[16..20].try_into().ok()?),
        })
    }

    /// Verify the checksum given the raw header bytes and payload.
    pub fn verify(&self, segment: u64, raw_header: &[u8], payload: &[u8]) -> bool {
        record_crc(segment, &raw_header[0..16], payload) == self.crc
    }
}

/// CRC32C over segment number, the first 16 header bytes, and the payload.
pub(crate) fn record_crc(segment: u64, header16: &[u8], payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&segment.to_le_bytes());
    let c = crc32c::crc32c_append(c, header16);
    crc32c::crc32c_append(c, payload)
}

/// Encode a complete record (header + payload) as it would appear in segment
/// `segment`, appended when every earlier record was durable. For tools and tests (e.g.
/// crafting stale or forged bytes).
pub fn encode_record(segment: u64, kind: RecordType, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    v.extend_from_slice(&RecordHeader::encode(segment, kind, seq, 0, payload));
    v.extend_from_slice(payload);
    v
}

/// Encode a segment header. For tools and tests.
pub fn encode_segment_header(number: u64, first_seq: u64) -> [u8; SEGMENT_HEADER_LEN] {
    SegmentHeader { number, first_seq }.encode()
}

/// Total on-disk size of a record with a payload of `payload_len` bytes.
pub fn record_size(payload_len: usize) -> u64 {
    (RECORD_HEADER_LEN + payload_len) as u64
}

/// File name of segment `number`.
pub(crate) fn segment_file_name(number: u64) -> String {
    format!("{number:020}{SEGMENT_SUFFIX}")
}

/// File name of the temporary file used while creating segment `number`.
pub(crate) fn temp_file_name(number: u64) -> String {
    format!("{number:020}{TEMP_SUFFIX}")
}

/// Parse a segment file name into its number.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Search `buf` (whose first byte is at file offset `base`) for any offset
/// where a complete record with a valid checksum for `segment` starts.
/// Returns the file offset of the first such record.
pub(crate) fn find_valid_record(segment: u64, buf: &[u8], base: u64) -> Option<u64> {
    if buf.len() < RECORD_HEADER_LEN {
        return None;
    }
    for i in 0..=buf.len() - RECORD_HEADER_LEN {
        let raw = &buf[i..i + RECORD_HEADER_LEN];
        let Some(h) = RecordHeader::decode(raw) else {
            continue;
        };
        let end = i + RECORD_HEADER_LEN + h.len as usize;
        if end > buf.len() {
            continue;
        }
        if h.verify(segment, raw, &buf[i + RECORD_HEADER_LEN..end]) {
            return Some(base + i as u64);
        }
    }
    None
}

/// Entry points for the fuzz targets (`crates/fuzz-targets`), not an API: the header
/// decoders above, on bytes from anywhere.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// A decoded record header and where its record ends.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct RecordView {
        /// Record type.
        pub kind: RecordType,
        /// Sequence number.
        pub seq: u64,
        /// Records not yet durable when this one was appended.
        pub unsynced_before: u64,
        /// Bytes the record takes (header and payload).
        pub len: usize,
    }

    /// Decodes a segment header: `(number, first_seq, version)`; `None` if recovery
    /// would refuse it. Needs `SEGMENT_HEADER_LEN` bytes.
    pub fn decode_segment_header(b: &[u8]) -> Option<(u64, u64, u32)> {
        let h = SegmentHeader::decode(b.get(..SEGMENT_HEADER_LEN)?.try_into().ok()?).ok()?;
        let version = u32::from_le_bytes(b[8..12].try_into().ok()?);
        Some((h.number, h.first_seq, version))
    }

    /// Decodes the record at the start of `buf` in segment `segment` as recovery and the
    /// reader do (structure, then checksum); `None` if it is not a whole valid record.
    pub fn decode_record(segment: u64, buf: &[u8]) -> Option<RecordView> {
        let raw = buf.get(..RECORD_HEADER_LEN)?;
        let h = RecordHeader::decode(raw)?;
        let len = RECORD_HEADER_LEN + h.len as usize;
        let payload = buf.get(RECORD_HEADER_LEN..len)?;
        h.verify(segment, raw, payload).then_some(RecordView {
            kind: h.kind,
            seq: h.seq,
            unsynced_before: u64::from(h.unsynced_before),
            len,
        })
    }

    /// Encodes a record header with its `unsynced_before` (what the journal writes).
    pub fn encode_record_header(
        segment: u64,
        kind: RecordType,
        seq: u64,
        unsynced_before: u64,
        payload: &[u8],
    ) -> [u8; RECORD_HEADER_LEN] {
        RecordHeader::encode(segment, kind, seq, unsynced_before, payload)
    }

    /// The offset of the first whole valid record in `buf`, as recovery searches for one
    /// past damage.
    pub fn find_valid_record(segment: u64, buf: &[u8]) -> Option<u64> {
        super::find_valid_record(segment, buf, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = SegmentHeader {
            number: 42,
            first_seq: 1000,
        };
        let b = h.encode();
        assert!(SegmentHeader::decode(&b).ok() == Some(h));
        let mut bad = b;
        bad[13] ^= 1;
        assert!(matches!(
            SegmentHeader::decode(&bad),
            Err(HeaderError::Checksum)
        ));
    }

    #[test]
    fn record_crc_mixes_segment_number() {
        let payload = b"hello";
        let h = RecordHeader::encode(7, RecordType::Batch, 3, 2, payload);
        let d = RecordHeader::decode(&h).unwrap();
        assert_eq!(d.unsynced_before, 2);
        assert!(d.verify(7, &h, payload));
        assert!(!d.verify(8, &h, payload));
    }

    #[test]
    fn zeroes_are_not_a_record() {
        assert!(RecordHeader::decode(&[0u8; RECORD_HEADER_LEN]).is_none());
        assert_eq!(find_valid_record(1, &[0u8; 4096], 0), None);
    }

    #[test]
    fn names() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg.tmp"),
            None
        );
    }
}
