//! Validated machine identifiers.

use std::fmt;
use std::str::FromStr;

/// Maximum length of a machine id in bytes.
pub const MACHINE_ID_MAX_LEN: usize = 64;

/// Why a string is not a valid machine id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineIdError {
    /// The id is empty; supply a non-empty id.
    #[error("machine id is empty")]
    Empty,
    /// The id is longer than [`MACHINE_ID_MAX_LEN`] bytes; use a shorter id.
    #[error("machine id is {len} bytes long, the maximum is {MACHINE_ID_MAX_LEN}")]
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
    },
    /// The id contains a character outside `[a-zA-Z0-9._-]`.
    #[error("machine id contains invalid character {ch:?} at byte {pos}; allowed: [a-zA-Z0-9._-]")]
    InvalidChar {
        /// The offending character.
        ch: char,
        /// Byte offset of the character.
        pos: usize,
    },
}

/// A machine identity: `[a-zA-Z0-9._-]{1,64}`.
///
/// It is the CN of an agent's client certificate and appears as the URI SAN
/// `ripcord://machine/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineId(String);

impl MachineId {
    /// Validates `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, MachineIdError> {
        if s.is_empty() {
            return Err(MachineIdError::Empty);
        }
        if s.len() > MACHINE_ID_MAX_LEN {
            return Err(MachineIdError::TooLong { len: s.len() });
        }
        if let Some((pos, ch)) = s
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'))
        {
            return Err(MachineIdError::InvalidChar { ch, pos });
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the id, returning the inner string.
    pub fn into_string(self) -> String {
        self.0
    }

    /// The URI SAN placed in client certificates: `ripcord://machine/<id>`.
    pub fn uri(&self) -> String {
        format!("{}{}", super::MACHINE_URI_PREFIX, self.0)
    }
}

impl FromStr for MachineId {
    type Err = MachineIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for MachineId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for s in ["a", "host-01.example_x", &"z".repeat(64), "A.B-C_9"] {
            assert_eq!(MachineId::new(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn invalid_ids() {
        assert_eq!(MachineId::new(""), Err(MachineIdError::Empty));
        assert_eq!(
            MachineId::new(&"a".repeat(65)),
            Err(MachineIdError::TooLong { len: 65 })
        );
        assert_eq!(
            MachineId::new("ab/c"),
            Err(MachineIdError::InvalidChar { ch: '/', pos: 2 })
        );
        assert!(matches!(
            MachineId::new("é"),
            Err(MachineIdError::InvalidChar { ch: 'é', pos: 0 })
        ));
        assert!(MachineId::new("a b").is_err());
        assert!(MachineId::new("a\0").is_err());
    }
}
