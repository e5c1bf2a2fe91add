//! The address plan of the kernel backend: which ranges the VFIO container maps, where.
//!
//! * Guest memory: each store mapping a program touches is mapped once, whole, at
//!   **IOVA = its process address** (identity). The host program's format-2 IDAWs already
//!   hold process addresses, so the same bytes run on the emulated channel and on the kernel.
//!   An identity entry can never translate to the wrong memory (the kernel resolves the
//!   process address when it pins), so entries are only replaced when a new store mapping
//!   overlaps one without matching it (the old mapping was unmapped and its addresses
//!   reused).
//! * The arena: one buffer mapped at the translator's `arena_base` (below 2 GiB, since CCW
//!   and ORB addresses are 31-bit); each start copies the host program image into it.
//! * Pass-through (baseline): guest memory at IOVA = guest-physical address.
//!
//! This module is pure bookkeeping (unit-tested); the backend performs the ioctls it asks for.

use std::collections::BTreeMap;

use thiserror::Error;

/// One container mapping: `iova..iova + size` translates to process address `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerMap {
    /// First IOVA.
    pub iova: u64,
    /// Process address of the first byte.
    pub host: u64,
    /// Length in bytes.
    pub size: u64,
}

impl ContainerMap {
    fn last(&self) -> u64 {
        self.iova + (self.size - 1)
    }

    fn overlaps(&self, iova: u64, last: u64) -> bool {
        self.iova <= last && iova <= self.last()
    }
}

/// A container operation the plan asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanOp {
    /// VFIO_IOMMU_UNMAP_DMA of a stale entry.
    Unmap {
        /// First IOVA.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// VFIO_IOMMU_MAP_DMA.
    Map(ContainerMap),
}

/// Why a range cannot be mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PlanError {
    /// Empty, unaligned or wrapping range (EINVAL).
    #[error("bad range {iova:#x}+{size:#x}")]
    BadRange {
        /// First IOVA.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// The range would overlap the arena (EEXIST): the arena's channel addresses are fixed.
    #[error("range {iova:#x}+{size:#x} overlaps the arena")]
    ArenaOverlap {
        /// First IOVA.
        iova: u64,
        /// Length.
        size: u64,
    },
}

impl PlanError {
    /// The errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            PlanError::BadRange { .. } => libc::EINVAL,
            PlanError::ArenaOverlap { .. } => libc::EEXIST,
        }
    }
}

const PAGE: u64 = 4096;

/// What the container maps (besides the arena) and where the arena is.
#[derive(Debug, Clone)]
pub struct AddressPlan {
    arena: ContainerMap,
    entries: BTreeMap<u64, ContainerMap>,
}

impl AddressPlan {
    /// A plan whose container maps only the arena: `arena_size` bytes at process address
    /// `arena_host`, at IOVA `arena_iova`.
    pub fn new(arena_iova: u64, arena_host: u64, arena_size: u64) -> Self {
        AddressPlan {
            arena: ContainerMap {
                iova: arena_iova,
                host: arena_host,
                size: arena_size,
            },
            entries: BTreeMap::new(),
        }
    }

    /// The arena's container mapping.
    pub fn arena(&self) -> ContainerMap {
        self.arena
    }

    /// The entry whose IOVA range contains `iova`.
    pub fn entry_at(&self, iova: u64) -> Option<ContainerMap> {
        self.entries
            .range(..=iova)
            .next_back()
            .map(|(_, e)| *e)
            .filter(|e| e.last() >= iova)
    }

    /// Whether `iova..iova + len` lies in one identity entry (the hot path of a start: no
    /// ioctl needed).
    pub fn covers_identity(&self, iova: u64, len: u64) -> bool {
        match self.entry_at(iova) {
            Some(e) => e.iova == e.host && iova - e.iova + len <= e.size,
            None => false,
        }
    }

    /// The operations that make `iova..iova + size` translate to `host`: none when an equal
    /// entry exists; otherwise unmaps of every overlapping (stale) entry, then the map.
    pub fn ensure(&self, iova: u64, host: u64, size: u64) -> Result<Vec<PlanOp>, PlanError> {
        let bad = PlanError::BadRange { iova, size };
        if size == 0 || iova % PAGE != 0 || size % PAGE != 0 || host % PAGE != 0 {
            return Err(bad);
        }
        let last = iova.checked_add(size - 1).ok_or(bad)?;
        host.checked_add(size - 1).ok_or(bad)?;
        let want = ContainerMap { iova, host, size };
        if self.arena.overlaps(iova, last) {
            return Err(PlanError::ArenaOverlap { iova, size });
        }
        if self.entries.get(&iova) == Some(&want) {
            return Ok(Vec::new());
        }
        let mut ops: Vec<PlanOp> = self
            .entries
            .values()
            .filter(|e| e.overlaps(iova, last))
            .map(|e| PlanOp::Unmap {
                iova: e.iova,
                size: e.size,
            })
            .collect();
        ops.push(PlanOp::Map(want));
        Ok(ops)
    }

    /// [`AddressPlan::ensure`] for guest memory at IOVA = process address.
    pub fn ensure_identity(&self, host: u64, size: u64) -> Result<Vec<PlanOp>, PlanError> {
        self.ensure(host, host, size)
    }

    /// Records an operation the container performed.
    pub fn apply(&mut self, op: PlanOp) {
        match op {
            PlanOp::Unmap { iova, .. } => {
                self.entries.remove(&iova);
            }
            PlanOp::Map(m) => {
                self.entries.insert(m.iova, m);
            }
        }
    }

    /// Unmaps of every entry for which `live` says false (the store no longer has it).
    pub fn stale(&self, mut live: impl FnMut(&ContainerMap) -> bool) -> Vec<PlanOp> {
        self.entries
            .values()
            .filter(|e| !live(e))
            .map(|e| PlanOp::Unmap {
                iova: e.iova,
                size: e.size,
            })
            .collect()
    }

    /// Every entry (not the arena), in IOVA order.
    pub fn entries(&self) -> impl Iterator<Item = &ContainerMap> {
        self.entries.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARENA: u64 = 0x7000_0000;

    fn plan() -> AddressPlan {
        AddressPlan::new(ARENA, 0x3ff_a000_0000, 16 << 20)
    }

    fn run(p: &mut AddressPlan, ops: Vec<PlanOp>) {
        for op in ops {
            p.apply(op);
        }
    }

    #[test]
    fn identity_map_once() {
        let mut p = plan();
        let host = 0x3ff_8000_0000;
        let ops = p.ensure_identity(host, 0x10_0000).unwrap();
        assert_eq!(
            ops,
            vec![PlanOp::Map(ContainerMap {
                iova: host,
                host,
                size: 0x10_0000
            })]
        );
        run(&mut p, ops);
        // Second program in the same mapping: nothing to do.
        assert!(p.covers_identity(host + 0xF_F000, 0x1000));
        assert!(!p.covers_identity(host + 0xF_F800, 0x1000));
        assert_eq!(p.ensure_identity(host, 0x10_0000).unwrap(), vec![]);
    }

    #[test]
    fn reused_addresses_replace_stale_entries() {
        let mut p = plan();
        let a = 0x3ff_8000_0000;
        let ops = p.ensure_identity(a, 0x2000).unwrap();
        run(&mut p, ops);
        let ops = p.ensure_identity(a + 0x4000, 0x2000).unwrap();
        run(&mut p, ops);
        // A new, larger store mapping over both old ranges: both go, then one map.
        let ops = p.ensure_identity(a, 0x8000).unwrap();
        assert_eq!(
            ops,
            vec![
                PlanOp::Unmap {
                    iova: a,
                    size: 0x2000
                },
                PlanOp::Unmap {
                    iova: a + 0x4000,
                    size: 0x2000
                },
                PlanOp::Map(ContainerMap {
                    iova: a,
                    host: a,
                    size: 0x8000
                }),
            ]
        );
        run(&mut p, ops);
        assert_eq!(p.entries().count(), 1);
    }

    #[test]
    fn arena_is_protected_and_ranges_checked() {
        let p = plan();
        assert_eq!(
            p.ensure_identity(ARENA + (16 << 20) - 0x1000, 0x2000),
            Err(PlanError::ArenaOverlap {
                iova: ARENA + (16 << 20) - 0x1000,
                size: 0x2000
            })
        );
        assert!(p.ensure_identity(ARENA + (16 << 20), 0x1000).is_ok());
        assert!(p.ensure_identity(ARENA - 0x1000, 0x1000).is_ok());
        assert_eq!(p.ensure(0, 0, 0).unwrap_err().errno(), libc::EINVAL);
        assert!(p.ensure(0x1800, 0x1800, 0x1000).is_err());
        assert!(p.ensure(u64::MAX - 0xfff, 0, 0x2000).is_err());
        assert!(p.ensure(0x1000, u64::MAX - 0xfff, 0x2000).is_err());
    }

    #[test]
    fn passthrough_differs_from_identity() {
        let mut p = plan();
        // Guest-physical 0x10000 backed at a process address.
        let ops = p.ensure(0x10000, 0x3ff_8000_0000, 0x4000).unwrap();
        run(&mut p, ops);
        assert_eq!(p.entry_at(0x13fff).unwrap().host, 0x3ff_8000_0000);
        assert!(!p.covers_identity(0x10000, 0x1000));
        // Same iova, other host: the old entry goes first.
        let ops = p.ensure(0x10000, 0x3ff_9000_0000, 0x4000).unwrap();
        assert_eq!(ops.len(), 2);
        assert!(matches!(ops[0], PlanOp::Unmap { iova: 0x10000, .. }));
    }

    #[test]
    fn stale_entries() {
        let mut p = plan();
        let ops = p.ensure_identity(0x10_0000, 0x1000).unwrap();
        run(&mut p, ops);
        let ops = p.ensure_identity(0x20_0000, 0x1000).unwrap();
        run(&mut p, ops);
        let ops = p.stale(|e| e.iova == 0x20_0000);
        assert_eq!(
            ops,
            vec![PlanOp::Unmap {
                iova: 0x10_0000,
                size: 0x1000
            }]
        );
        run(&mut p, ops);
        assert!(p.entry_at(0x10_0000).is_none());
        assert!(p.entry_at(0x20_0fff).is_some());
    }
}
