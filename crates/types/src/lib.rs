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

/// A consistency group's identity: 16 random bytes chosen when the group is created
/// (`ripcord group create`), so two groups never share one even if a name is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub [u8; 16]);

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for GroupId {
    type Err = ParseDiskIdError;
    /// 32 hexadecimal digits, as [`GroupId`]'s `Display` writes them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DiskId::from_hex(s)
            .map(|d| GroupId(d.0))
            .ok_or_else(|| ParseDiskIdError(s.to_owned()))
    }
}

/// Most disks one consistency group's points may span (a group holds at most this many
/// machines' disks in total).
pub const MAX_GROUP_MEMBERS: u16 = 256;

/// What makes a crash-consistent cut one member of a **group point**: the cut was placed
/// at `instant_ns` of the group's coordinator clock, within `error_ns`.
///
/// The agent measures its clock against the coordinator's (round trips, as NTP does), and
/// places the cut at the instant converted to its own clock; `error_ns` bounds, in real
/// time, how far the cut may lie from the coordinator's instant (the offset's error plus
/// how late the cut was taken). Two members' cuts of one instant are therefore at most
/// the sum of their errors apart, which is the group point's clock-error bound (decision
/// 0027). The agent MACs the stamp with the cut, so neither a process server nor the
/// store can move a cut into another instant or group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupStamp {
    /// The group scheduled.
    pub group: GroupId,
    /// The instant, unix nanoseconds by the coordinator's clock (a multiple of the
    /// group's interval).
    pub instant_ns: u64,
    /// How many disks the group's point at this instant must have (every member machine's
    /// disks, as the coordinator knew them when scheduling; 1..=[`MAX_GROUP_MEMBERS`]).
    pub members: u16,
    /// The agent's clock minus the coordinator's, as measured (ns).
    pub offset_ns: i64,
    /// Bound on the distance, in real time, between this cut and the instant (ns).
    pub error_ns: u64,
}

/// Encoded size of a [`GroupStamp`]: group 16, instant 8, members 2, offset 8, error 8.
pub const GROUP_STAMP_LEN: usize = 16 + 8 + 2 + 8 + 8;

impl GroupStamp {
    /// The fixed little-endian encoding every format uses (the wire's Cut, the journal,
    /// the catalog, the cut MAC).
    pub fn to_bytes(&self) -> [u8; GROUP_STAMP_LEN] {
        let mut out = [0u8; GROUP_STAMP_LEN];
        out[..16].copy_from_slice(&self.group.0);
        out[16..24].copy_from_slice(&self.instant_ns.to_le_bytes());
        out[24..26].copy_from_slice(&self.members.to_le_bytes());
        out[26..34].copy_from_slice(&self.offset_ns.to_le_bytes());
        out[34..42].copy_from_slice(&self.error_ns.to_le_bytes());
        out
    }

    /// Decodes [`Self::to_bytes`]; `None` when `members` is outside
    /// 1..=[`MAX_GROUP_MEMBERS`].
    pub fn from_bytes(b: &[u8; GROUP_STAMP_LEN]) -> Option<GroupStamp> {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let members = u16::from_le_bytes([b[24], b[25]]);
        if members == 0 || members > MAX_GROUP_MEMBERS {
            return None;
        }
        Some(GroupStamp {
            group: GroupId(b[..16].try_into().expect("16 bytes")),
            instant_ns: u64_at(16),
            members,
            offset_ns: u64_at(26) as i64,
            error_ns: u64_at(34),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_stamp_round_trips_and_refuses_an_impossible_member_count() {
        let stamp = GroupStamp {
            group: GroupId([7; 16]),
            instant_ns: 1_800_000_000_000_000_000,
            members: 64,
            offset_ns: -250_000_000,
            error_ns: 1_234,
        };
        assert_eq!(GroupStamp::from_bytes(&stamp.to_bytes()), Some(stamp));
        for members in [0, MAX_GROUP_MEMBERS + 1] {
            let bad = GroupStamp { members, ..stamp };
            assert_eq!(GroupStamp::from_bytes(&bad.to_bytes()), None);
        }
        let text = stamp.group.to_string();
        assert_eq!(text.parse::<GroupId>(), Ok(stamp.group));
    }

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
