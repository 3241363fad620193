//! The identifiers and extent types every ripcord crate shares, declared once.
//!
//! The wire protocol (`ripcord-proto`) and the target store (`ripcord-store`) both speak
//! in these types, so a batch goes from the agent to the store without conversions. The
//! numeric values of [`ExtentKind`] and [`CutKind`] are the ones both formats encode;
//! changing one is a format change.
//!
//! A [`DiskId`] has one text form, everywhere (object names, cache directories, logs,
//! the command line): 32 lower-case hex digits ([`fmt::Display`], [`str::FromStr`]).

mod report;

pub use report::report;

use std::{fmt, str::FromStr};

/// Bytes per sector in [`Extent`] addressing: always 512, whatever the device's logical
/// block size.
pub const SECTOR_BYTES: u64 = 512;

/// Stable 16-byte identifier of a protected disk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DiskId(pub [u8; 16]);

impl DiskId {
    /// Parses 32 hex digits (either case); `None` otherwise.
    pub fn from_hex(s: &str) -> Option<DiskId> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(DiskId(out))
    }
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiskId({self})")
    }
}

/// A disk id that is not 32 hex digits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseDiskIdError(String);

impl fmt::Display for ParseDiskIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "disk id {:?} is not 32 hex digits", self.0)
    }
}

impl std::error::Error for ParseDiskIdError {}

impl FromStr for DiskId {
    type Err = ParseDiskIdError;

    fn from_str(s: &str) -> Result<DiskId, ParseDiskIdError> {
        DiskId::from_hex(s.trim()).ok_or_else(|| ParseDiskIdError(s.chars().take(64).collect()))
    }
}

/// What a run of sectors in a batch holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExtentKind {
    /// New contents; the bytes are in the (sealed) payload, in extent order.
    Data = 0,
    /// The sectors were zeroed (no payload bytes).
    Zero = 1,
    /// The sectors were discarded or trimmed (no payload bytes; they read as zero).
    Discard = 2,
}

impl ExtentKind {
    /// Parses an encoded value; `None` for values no format defines.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Data),
            1 => Some(Self::Zero),
            2 => Some(Self::Discard),
            _ => None,
        }
    }
}

/// A run of `sectors` sectors starting at `sector`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First sector, in 512-byte units ([`SECTOR_BYTES`]).
    pub sector: u64,
    /// Number of 512-byte sectors.
    pub sectors: u32,
    /// What happened to these sectors.
    pub kind: ExtentKind,
}

/// Kind of consistency point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CutKind {
    /// Crash-consistent: write-order fidelity only.
    Crash = 0,
    /// Application-consistent: taken while applications were quiesced.
    App = 1,
}

impl CutKind {
    /// Parses an encoded value; `None` for values no format defines.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Crash),
            1 => Some(Self::App),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_id_has_one_text_form_and_parses_back() {
        let id = DiskId([0xab; 16]);
        let text = id.to_string();
        assert_eq!(text, "ab".repeat(16));
        assert_eq!(id.to_string(), text);
        assert_eq!(text.parse::<DiskId>(), Ok(id));
        assert_eq!(text.to_uppercase().parse::<DiskId>(), Ok(id));
        assert_eq!(format!("{id:?}"), format!("DiskId({text})"));
    }

    #[test]
    fn malformed_disk_ids_are_refused_with_the_input_named() {
        for bad in [
            "",
            "ab",
            &"g".repeat(32),
            &"a".repeat(33),
            "ééééééééééééééää",
        ] {
            let err = bad.parse::<DiskId>().unwrap_err();
            assert!(err.to_string().contains("not 32 hex digits"), "{err}");
        }
    }

    #[test]
    fn encoded_kinds_round_trip_and_unknown_values_are_refused() {
        for k in [ExtentKind::Data, ExtentKind::Zero, ExtentKind::Discard] {
            assert_eq!(ExtentKind::from_u8(k as u8), Some(k));
        }
        for k in [CutKind::Crash, CutKind::App] {
            assert_eq!(CutKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(ExtentKind::from_u8(3), None);
        assert_eq!(CutKind::from_u8(2), None);
    }
}
