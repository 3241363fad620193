//! Block regions (`START:LEN`).

use std::fmt;
use std::str::FromStr;

use crate::block::BLOCK_SIZE;

/// A range of 4 KiB blocks: `start..start+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First block.
    pub start: u64,
    /// Number of blocks.
    pub len: u64,
}

impl Region {
    /// One past the last block.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    /// Whether `block` lies in the region.
    pub fn contains(&self, block: u64) -> bool {
        block >= self.start && block < self.end()
    }
    /// Whether `self` lies entirely within `outer`.
    pub fn within(&self, outer: &Region) -> bool {
        self.start >= outer.start && self.end() <= outer.end()
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.len)
    }
}

fn parse_amount(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], Some(m))
        }
        _ => (s, None),
    };
    let n: u64 = digits.parse().map_err(|_| format!("not a number: {s:?}"))?;
    match mult {
        None => Ok(n),
        Some(m) => {
            let bytes = n.checked_mul(m).ok_or_else(|| format!("{s:?} overflows"))?;
            if bytes % BLOCK_SIZE as u64 != 0 {
                return Err(format!("{s:?} is not a multiple of 4 KiB"));
            }
            Ok(bytes / BLOCK_SIZE as u64)
        }
    }
}

/// Parses `START:LEN`: plain numbers are 4 KiB blocks; a K/M/G/T suffix means bytes
/// (which must be 4 KiB-aligned).
impl FromStr for Region {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s.split_once(':').ok_or("region must be START:LEN")?;
        let r = Region {
            start: parse_amount(a)?,
            len: parse_amount(b)?,
        };
        if r.len == 0 {
            return Err("region length must be > 0".into());
        }
        r.start.checked_add(r.len).ok_or("region overflows")?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parse() {
        assert_eq!(
            "0:16".parse::<Region>().unwrap(),
            Region { start: 0, len: 16 }
        );
        assert_eq!(
            "4K:1M".parse::<Region>().unwrap(),
            Region { start: 1, len: 256 }
        );
        assert!("1:0".parse::<Region>().is_err());
        assert!("1K:4K".parse::<Region>().is_err());
        assert!("x".parse::<Region>().is_err());
    }
}
