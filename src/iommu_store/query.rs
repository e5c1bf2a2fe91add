//! Read-only queries over the store's mappings, for backends that must mirror them (the
//! kernel vfio-ccw backend maps each store mapping into its VFIO container).

use std::sync::atomic::Ordering;

use super::{IommuStore, Perm};

/// One store mapping as a backend needs to mirror it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingInfo {
    /// First IOVA (guest-physical address) of the mapping.
    pub iova: u64,
    /// Length in bytes (page multiple).
    pub size: u64,
    /// Process-virtual address of the mapping's first byte (its current generation: a VADDR
    /// update changes it).
    pub host: u64,
    /// Permissions the mapping was created with.
    pub perm: Perm,
    /// False between a VADDR invalidate and its update (no pin can succeed then).
    pub valid: bool,
}

impl MappingInfo {
    /// Whether the process address `host` lies inside the mapping.
    pub fn contains_host(&self, host: u64) -> bool {
        host >= self.host && host - self.host < self.size
    }
}

impl IommuStore {
    /// The mapping containing `iova`, with its process address range.
    pub fn mapping_at(&self, iova: u64) -> Option<MappingInfo> {
        let table = self.table();
        table.containing(iova).map(|r| info(r))
    }

    /// Every mapping, in IOVA order (a copy: the store may change meanwhile).
    pub fn mappings(&self) -> impl Iterator<Item = MappingInfo> {
        let table = self.table();
        let v: Vec<MappingInfo> = table.iter().map(|r| info(r)).collect();
        v.into_iter()
    }
}

fn info(r: &super::StoreRegion) -> MappingInfo {
    let b = &r.0;
    MappingInfo {
        iova: b.shared.iova,
        size: b.shared.size,
        host: b.host_base(),
        perm: b.shared.perm,
        valid: b.valid.load(Ordering::SeqCst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu_store::{Backing, StoreConfig};

    #[test]
    fn mapping_at_and_iteration() {
        let s = IommuStore::new(StoreConfig::default());
        s.map_dma(0x20000, 0x3000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        s.map_dma(0x10000, 0x1000, Perm::READ, Backing::Anonymous)
            .unwrap();
        let m = s.mapping_at(0x22fff).unwrap();
        assert_eq!(
            (m.iova, m.size, m.perm),
            (0x20000, 0x3000, Perm::READ_WRITE)
        );
        assert!(m.valid);
        assert!(m.contains_host(m.host + 0x2fff));
        assert!(!m.contains_host(m.host + 0x3000));
        assert!(s.mapping_at(0x23000).is_none());
        assert!(s.mapping_at(0x1ffff).is_none());
        // The host address is where the store's bytes really are.
        s.write(0x20010, &[0xAB]).unwrap();
        // SAFETY: m.host + 0x10 lies inside the live anonymous mapping the store owns.
        let byte = unsafe { *((m.host + 0x10) as *const u8) };
        assert_eq!(byte, 0xAB);
        let all: Vec<_> = s.mappings().map(|m| m.iova).collect();
        assert_eq!(all, vec![0x10000, 0x20000]);
        s.invalidate_vaddr(0x10000, 0x1000).unwrap();
        assert!(!s.mapping_at(0x10000).unwrap().valid);
        s.unmap_dma(0x20000, 0x3000, false).unwrap();
        assert!(s.mapping_at(0x21000).is_none());
        assert_eq!(s.mappings().count(), 1);
    }
}
