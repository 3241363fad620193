//! Errors of computing and comparing digest maps (decoding has its own, [`crate::DecodeError`]).

use std::io;

/// What went wrong, and so what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// The device could not be read: retry later or report the device as failing.
    #[error("reading the device at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The device ended before the size the caller gave: the size is wrong (or the device
    /// shrank); recompute with the current size.
    #[error("the device ended at byte {at}, before its stated size of {size} bytes")]
    ShortDevice { at: u64, size: u64 },
    /// A region size outside `1..=MAX_REGION_BLOCKS`: a caller bug.
    #[error("region size of {0} blocks is outside 1..={max}", max = crate::MAX_REGION_BLOCKS)]
    RegionBlocks(u32),
    /// A block range outside the device: a caller bug, or a peer's map of another size.
    #[error("blocks {first}..{end} are outside the device's {blocks} blocks")]
    OutOfRange { first: u64, end: u64, blocks: u64 },
    /// Two maps (or digest lists) that cannot be compared: the two sides disagree on the
    /// device size or the region size, and must agree before a delta sync can start.
    #[error("cannot compare: {what} differs ({ours} here, {theirs} on the other side)")]
    LayoutMismatch {
        what: &'static str,
        ours: u64,
        theirs: u64,
    },
}
