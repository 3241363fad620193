//! CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320).
//!
//! Used only as an accidental-damage check on key envelopes, so that a
//! bit-rotted escrow file is reported as damaged rather than as a wrong
//! passphrase. It is not a security mechanism (AES-GCM is). Envelopes are
//! ~100 bytes, so a bitwise loop is plenty fast and keeps the crate small.

/// CRC-32 of `data` (same as zlib's `crc32`).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::crc32;

    #[test]
    fn check_value() {
        // The standard CRC-32 check value.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }
}
