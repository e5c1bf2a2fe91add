//! [`ChannelMemory`] over guest memory: the storage a guest's own channel program sees, with
//! optional per-page storage keys. It is the reference memory for running a guest program
//! directly (the other side of the translation property test).

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::css::memory::{AccessFault, ChannelMemory};

/// Size of the storage-key granule (a 4 KiB frame).
pub const KEY_PAGE: u64 = 4096;

/// Fetch-protection bit of a storage key byte.
pub const KEY_FETCH_PROTECT: u8 = 0x08;

/// Guest memory as a channel sees it.
///
/// Without storage keys every access is allowed (as if all pages had key 0). With keys
/// enabled, a page with no key set has key 0 without fetch protection. A key byte holds the
/// access-control bits in its high nibble and fetch protection in bit 0x08; the reference and
/// change bits are not modelled.
#[derive(Debug)]
pub struct GuestChannelMemory<M: GuestMemory> {
    mem: M,
    keys: Option<HashMap<u64, u8>>,
}

impl<M: GuestMemory> GuestChannelMemory<M> {
    /// Wraps guest memory; no storage keys.
    pub fn new(mem: M) -> Self {
        GuestChannelMemory { mem, keys: None }
    }

    /// Wraps guest memory with storage keys enabled (all pages key 0 until set).
    pub fn with_keys(mem: M) -> Self {
        GuestChannelMemory {
            mem,
            keys: Some(HashMap::new()),
        }
    }

    /// The wrapped guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Sets the storage key byte of the 4 KiB page holding `addr` (enables keys if off).
    pub fn set_key(&mut self, addr: u64, key: u8) {
        self.keys
            .get_or_insert_with(HashMap::new)
            .insert(addr / KEY_PAGE, key);
    }

    /// The storage key byte of the page holding `addr` (0 when unset or keys are off).
    pub fn key(&self, addr: u64) -> u8 {
        self.keys
            .as_ref()
            .and_then(|k| k.get(&(addr / KEY_PAGE)).copied())
            .unwrap_or(0)
    }

    /// Checks every page of `[addr, addr + len)` before any byte moves.
    fn check(&self, addr: u64, len: usize, key: u8, store: bool) -> Result<(), AccessFault> {
        if len == 0 {
            return Ok(());
        }
        let end = addr
            .checked_add(len as u64 - 1)
            .ok_or(AccessFault::Addressing(addr))?;
        let perm = if store {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut cur = addr;
        loop {
            let page_end = (cur | (KEY_PAGE - 1)).min(end);
            let n = (page_end - cur + 1) as usize;
            if !self.mem.check_range(GuestAddress(cur), n, perm) {
                return Err(AccessFault::Addressing(cur));
            }
            if key != 0 && self.keys.is_some() {
                let k = self.key(cur);
                let matches = k >> 4 == key;
                let fetch_protected = k & KEY_FETCH_PROTECT != 0;
                if !matches && (store || fetch_protected) {
                    return Err(AccessFault::Protection(cur));
                }
            }
            if page_end == end {
                return Ok(());
            }
            cur = page_end + 1;
        }
    }
}

impl<M: GuestMemory> ChannelMemory for GuestChannelMemory<M> {
    fn read(&self, addr: u64, buf: &mut [u8], key: u8) -> Result<(), AccessFault> {
        self.check(addr, buf.len(), key, false)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| AccessFault::Addressing(addr))
    }

    fn write(&self, addr: u64, data: &[u8], key: u8) -> Result<(), AccessFault> {
        self.check(addr, data.len(), key, true)?;
        if data.is_empty() {
            return Ok(());
        }
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| AccessFault::Addressing(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestChannelMemory<GuestMemoryMmap<()>> {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x8000), 0x1000),
        ])
        .unwrap();
        GuestChannelMemory::with_keys(gm)
    }

    #[test]
    fn read_write_and_unmapped() {
        let m = mem();
        m.write(0x100, &[1, 2, 3], 0).unwrap();
        let mut b = [0u8; 3];
        m.read(0x100, &mut b, 0).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(
            m.write(0x3ffe, &[9; 4], 0),
            Err(AccessFault::Addressing(0x4000))
        );
        // Nothing stored on a fault.
        let mut b = [0u8; 2];
        m.read(0x3ffe, &mut b, 0).unwrap();
        assert_eq!(b, [0, 0]);
        assert_eq!(
            m.read(u64::MAX - 1, &mut [0; 4], 0),
            Err(AccessFault::Addressing(u64::MAX - 1))
        );
        m.read(0x8000, &mut [0; 16], 0).unwrap();
        assert!(m.write(0x100, &[], 0).is_ok());
    }

    #[test]
    fn storage_keys() {
        let mut m = mem();
        m.set_key(0x1000, 0x30); // key 3, not fetch protected
        m.set_key(0x2000, 0x38); // key 3, fetch protected
        assert_eq!(m.key(0x1fff), 0x30);
        // Key 0 is always allowed.
        m.write(0x2000, &[1], 0).unwrap();
        // Store needs the matching key.
        assert_eq!(
            m.write(0x1000, &[1], 5),
            Err(AccessFault::Protection(0x1000))
        );
        m.write(0x1000, &[1], 3).unwrap();
        // Fetch needs it only when fetch protected.
        let mut b = [0u8; 1];
        m.read(0x1000, &mut b, 5).unwrap();
        assert_eq!(
            m.read(0x2000, &mut b, 5),
            Err(AccessFault::Protection(0x2000))
        );
        m.read(0x2000, &mut b, 3).unwrap();
        // A range spanning pages faults at the first protected page; nothing stored.
        m.set_key(0x3000, 0x40);
        assert_eq!(
            m.write(0x2ff0, &[7; 32], 3),
            Err(AccessFault::Protection(0x3000))
        );
        let mut b = [0u8; 16];
        m.read(0x2ff0, &mut b, 0).unwrap();
        assert_eq!(b, [0; 16]);
        // Unset pages have key 0: only key 0 may store there.
        assert_eq!(m.write(0, &[1], 3), Err(AccessFault::Protection(0)));
    }
}
