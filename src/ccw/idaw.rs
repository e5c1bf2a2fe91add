//! Indirect-data-address words (IDAWs): format 1 (31-bit, 2 KiB blocks) and
//! format 2 (64-bit, 4 KiB blocks, or 2 KiB blocks under the ORB's 2K-IDAW control).

/// The IDAW format and block size a channel program uses, from the ORB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdawFormat {
    /// Format 1: 4-byte IDAWs, 31-bit addresses, 2 KiB blocks.
    Format1,
    /// Format 2: 8-byte IDAWs, 64-bit addresses, 4 KiB blocks.
    Format2,
    /// Format 2 with 2 KiB blocks (ORB 2K-IDAW control).
    Format2Block2K,
}

impl IdawFormat {
    /// Chooses the format from the ORB's format-2-IDAW and 2K-IDAW controls.
    pub fn from_orb(format2: bool, block_2k: bool) -> Self {
        match (format2, block_2k) {
            (false, _) => IdawFormat::Format1,
            (true, false) => IdawFormat::Format2,
            (true, true) => IdawFormat::Format2Block2K,
        }
    }

    /// Size in bytes of one IDAW.
    pub const fn idaw_size(self) -> u64 {
        match self {
            IdawFormat::Format1 => 4,
            _ => 8,
        }
    }

    /// Size in bytes of the storage block each IDAW designates.
    pub const fn block_size(self) -> u64 {
        match self {
            IdawFormat::Format2 => 4096,
            _ => 2048,
        }
    }

    /// Decodes one IDAW. Format-1 IDAWs with bit 0 set are returned as they are;
    /// [`Idaw::is_valid`] tells whether the channel accepts them.
    pub fn decode(self, b: &[u8]) -> Idaw {
        match self {
            IdawFormat::Format1 => Idaw(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64),
            _ => Idaw(u64::from_be_bytes([
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
            ])),
        }
    }
}

/// One IDAW: the address it designates (the data address, for any format).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Idaw(pub u64);

impl Idaw {
    /// Whether the channel accepts this IDAW in the given format
    /// (a format-1 IDAW must have bit 0 zero: program check otherwise).
    pub fn is_valid(self, format: IdawFormat) -> bool {
        match format {
            IdawFormat::Format1 => self.0 & 0x8000_0000 == 0 && self.0 <= u32::MAX as u64,
            _ => true,
        }
    }

    /// Encodes a format-2 IDAW.
    pub fn to_format2_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Encodes a format-1 IDAW (the caller keeps the address below 2 GiB).
    pub fn to_format1_bytes(self) -> [u8; 4] {
        (self.0 as u32).to_be_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_and_encode() {
        let f1 = IdawFormat::Format1.decode(&[0x00, 0x12, 0x38, 0x00]);
        assert_eq!(f1, Idaw(0x0012_3800));
        assert!(f1.is_valid(IdawFormat::Format1));
        assert_eq!(f1.to_format1_bytes(), [0x00, 0x12, 0x38, 0x00]);
        let bad = IdawFormat::Format1.decode(&[0x80, 0, 0, 0]);
        assert!(!bad.is_valid(IdawFormat::Format1));
        let b = [0x00, 0x00, 0x03, 0xff, 0x12, 0x34, 0x50, 0x00];
        let f2 = IdawFormat::Format2.decode(&b);
        assert_eq!(f2, Idaw(0x0000_03ff_1234_5000));
        assert_eq!(f2.to_format2_bytes(), b);
    }

    #[test]
    fn sizes() {
        assert_eq!(IdawFormat::from_orb(false, true), IdawFormat::Format1);
        assert_eq!(IdawFormat::from_orb(true, false).block_size(), 4096);
        assert_eq!(IdawFormat::from_orb(true, true).block_size(), 2048);
        assert_eq!(IdawFormat::Format1.idaw_size(), 4);
        assert_eq!(IdawFormat::Format2Block2K.idaw_size(), 8);
    }
}
