//! UNMAP_DMA, including the pinned-pages handshake with the unmap listeners.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::error::StoreError;
use super::mapping;
use super::region::StoreRegion;
use super::{IommuStore, UnmapListener};

impl IommuStore {
    /// UNMAP_DMA: removes the whole mappings inside `iova..iova + size` (or every mapping
    /// when `all`) and returns the bytes unmapped (0 when the range holds no mapping).
    ///
    /// If some of those mappings have pinned pages, they are first marked dying (new pins in
    /// them fail with EINVAL), every live [`UnmapListener`] is told with no store lock held,
    /// and the unmap waits up to the unmap timeout (see [`IommuStore::set_unmap_timeout`])
    /// for the pins to be dropped. If they are not, it fails with EBUSY and leaves every
    /// mapping of the range in place (pins possible again). (Two unmaps racing over the same
    /// pinned mapping: the one that times out revives it even if the other still waits.)
    ///
    /// Errors: `all` with a non-zero `iova` or `size`; without `all`, a zero size, bad
    /// alignment, a wrapping range, or a range that bisects a mapping: EINVAL.
    pub fn unmap_dma(&self, iova: u64, size: u64, all: bool) -> Result<u64, StoreError> {
        let (iova, last) = if all {
            if iova != 0 || size != 0 {
                return Err(StoreError::Invalid("unmap-all needs iova = size = 0"));
            }
            (0, u64::MAX)
        } else {
            (iova, mapping::check_range(iova, size)?)
        };
        let victims = {
            let mut table = self.table();
            let victims = table.whole_in(iova, last)?;
            if victims.is_empty() {
                return Ok(0);
            }
            // Dying first, then the totals: pairs with the pin's add-then-check.
            for v in &victims {
                v.0.shared.dying.store(true, Ordering::SeqCst);
            }
            if victims
                .iter()
                .all(|v| v.0.shared.total.load(Ordering::SeqCst) == 0)
            {
                let bytes = victims
                    .iter()
                    .map(|v| table.remove_shared(&v.0.shared))
                    .sum();
                self.mark_stale();
                if all {
                    drop(table);
                    // Cheap when empty; releases the old memory now.
                    self.ensure_fresh();
                }
                return Ok(bytes);
            }
            victims
        };
        self.drain_pins(&victims, iova, last)?;
        let mut table = self.table();
        let bytes = victims
            .iter()
            .map(|v| table.remove_shared(&v.0.shared))
            .sum();
        self.mark_stale();
        Ok(bytes)
    }

    /// Tells the listeners about each pinned victim and waits for its pins to go; on timeout
    /// revives the victims and fails with EBUSY.
    fn drain_pins(
        &self,
        victims: &[Arc<StoreRegion>],
        iova: u64,
        last: u64,
    ) -> Result<(), StoreError> {
        let listeners: Vec<Arc<dyn UnmapListener>> = {
            let mut ls = self
                .inner
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            ls.retain(|w| w.strong_count() > 0);
            ls.iter().filter_map(|w| w.upgrade()).collect()
        };
        for v in victims {
            let sh = &v.0.shared;
            if sh.total.load(Ordering::SeqCst) != 0 {
                for l in &listeners {
                    l.unmap_pinned(sh.iova, sh.size);
                }
            }
        }
        drop(listeners);
        let released = self.inner.globals.wait_until(self.unmap_timeout(), || {
            victims
                .iter()
                .all(|v| v.0.shared.total.load(Ordering::SeqCst) == 0)
        });
        if !released {
            for v in victims {
                v.0.shared.dying.store(false, Ordering::SeqCst);
            }
            return Err(StoreError::Busy {
                iova,
                size: last.wrapping_sub(iova).wrapping_add(1),
            });
        }
        Ok(())
    }
}
