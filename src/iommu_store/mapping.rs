//! The authoritative mapping table and the type1 MAP/UNMAP argument rules.
//!
//! The table is a `BTreeMap` keyed by IOVA, so every overlap or bisect check is O(log n).
//! Lookups on the hot path go through the published snapshot instead (see `mod.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use vm_memory::GuestRegionCollection;

use super::error::StoreError;
use super::region::{Shared, StoreRegion};
use super::types::PAGE_SIZE;

/// Checks the alignment and extent of a MAP range; returns its last byte (inclusive).
pub(crate) fn check_range(iova: u64, size: u64) -> Result<u64, StoreError> {
    if size == 0 {
        return Err(StoreError::Invalid("size is zero"));
    }
    if iova % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 {
        return Err(StoreError::Invalid("iova or size not page aligned"));
    }
    // Inclusive end: a range ending exactly at u64::MAX is legal, one past it wraps.
    iova.checked_add(size - 1)
        .ok_or(StoreError::Invalid("range wraps around the address space"))
}

/// The mappings, keyed by first IOVA.
pub(crate) struct Table {
    entries: BTreeMap<u64, Arc<StoreRegion>>,
    limit: u32,
}

impl Table {
    pub(crate) fn new(limit: u32) -> Self {
        Table {
            entries: BTreeMap::new(),
            limit,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit
    }

    /// The mapping containing `addr`, if any.
    pub(crate) fn containing(&self, addr: u64) -> Option<&Arc<StoreRegion>> {
        self.entries
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.0.shared.last() >= addr)
    }

    /// Any mapping overlapping `iova..=last`.
    pub(crate) fn first_overlap(&self, iova: u64, last: u64) -> Option<&Arc<StoreRegion>> {
        self.containing(iova)
            .or_else(|| self.entries.range(iova..=last).next().map(|(_, r)| r))
    }

    /// Refuses a new mapping `iova..=last` that overlaps (EEXIST) or exceeds the limit
    /// (ENOSPC), in the kernel's order.
    pub(crate) fn check_new(&self, iova: u64, last: u64) -> Result<(), StoreError> {
        if self.first_overlap(iova, last).is_some() {
            return Err(StoreError::Exists {
                iova,
                size: last - iova + 1,
            });
        }
        if self.entries.len() >= self.limit as usize {
            return Err(StoreError::NoSpace(self.limit));
        }
        Ok(())
    }

    pub(crate) fn insert(&mut self, r: Arc<StoreRegion>) {
        self.entries.insert(r.0.shared.iova, r);
    }

    /// The mapping exactly equal to `iova`/`size`.
    pub(crate) fn exact(&self, iova: u64, size: u64) -> Option<&Arc<StoreRegion>> {
        self.entries.get(&iova).filter(|r| r.0.shared.size == size)
    }

    /// The whole mappings inside `iova..=last`; EINVAL if the range bisects a mapping at
    /// either end (type1 v2 rule).
    pub(crate) fn whole_in(
        &self,
        iova: u64,
        last: u64,
    ) -> Result<Vec<Arc<StoreRegion>>, StoreError> {
        if let Some(r) = self.containing(iova) {
            if r.0.shared.iova != iova {
                return Err(StoreError::Invalid("range bisects a mapping at its start"));
            }
        }
        if let Some(r) = self.containing(last) {
            if r.0.shared.last() != last {
                return Err(StoreError::Invalid("range bisects a mapping at its end"));
            }
        }
        Ok(self
            .entries
            .range(iova..=last)
            .map(|(_, r)| Arc::clone(r))
            .collect())
    }

    /// Removes the mapping whose per-page state is `shared` (whatever its current memory
    /// generation); returns its size, or 0 if it is already gone.
    pub(crate) fn remove_shared(&mut self, shared: &Arc<Shared>) -> u64 {
        match self.entries.get(&shared.iova) {
            Some(r) if Arc::ptr_eq(&r.0.shared, shared) => {
                self.entries.remove(&shared.iova);
                shared.size
            }
            _ => 0,
        }
    }

    /// Replaces the entry at the same IOVA (a VADDR update).
    pub(crate) fn replace(&mut self, r: Arc<StoreRegion>) {
        self.entries.insert(r.0.shared.iova, r);
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<StoreRegion>> {
        self.entries.values()
    }

    /// The vm-memory collection to publish: O(n) `Arc` clones, done once per batch of
    /// changes (the store rebuilds lazily).
    pub(crate) fn snapshot(&self) -> GuestRegionCollection<StoreRegion> {
        if self.entries.is_empty() {
            return GuestRegionCollection::new();
        }
        // Sorted and disjoint by construction; fall back to empty rather than panic.
        GuestRegionCollection::from_arc_regions(self.entries.values().cloned().collect())
            .unwrap_or_default()
    }
}
