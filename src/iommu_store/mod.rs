//! TEMPORARY stand-in with the agreed API, replaced by the real store at merge. Not committed.
#![allow(missing_docs, dead_code)]
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
pub const PAGE_SIZE: u64 = 4096;
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Perm {
    pub read: bool,
    pub write: bool,
}
impl Perm {
    pub const READ: Perm = Perm {
        read: true,
        write: false,
    };
    pub const WRITE: Perm = Perm {
        read: false,
        write: true,
    };
    pub const READ_WRITE: Perm = Perm {
        read: true,
        write: true,
    };
}
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid")]
    Invalid,
    #[error("perm")]
    Perm,
}
impl StoreError {
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Invalid => libc::EINVAL,
            StoreError::Perm => libc::EPERM,
        }
    }
}
pub enum Backing {
    Anonymous,
}
#[derive(Default)]
pub struct StoreConfig {
    pub dma_entry_limit: u32,
}
struct M {
    size: u64,
    perm: Perm,
    mem: Box<[u8]>,
    base: usize,
}
#[derive(Clone, Default)]
pub struct IommuStore {
    maps: Arc<Mutex<BTreeMap<u64, M>>>,
    pins: Arc<Mutex<u64>>,
}
#[derive(Clone, Copy, Debug)]
pub struct PinnedPage {
    pub iova: u64,
    pub host_addr: u64,
    pub storage_key: u8,
    pub writable: bool,
}
pub struct PinnedPages {
    pages: Vec<PinnedPage>,
    pins: Arc<Mutex<u64>>,
}
impl PinnedPages {
    pub fn pages(&self) -> &[PinnedPage] {
        &self.pages
    }
}
impl Drop for PinnedPages {
    fn drop(&mut self) {
        *self.pins.lock().unwrap() -= self.pages.len() as u64;
    }
}
pub trait UnmapListener: Send + Sync {
    fn unmap_pinned(&self, iova: u64, size: u64);
}
pub struct StoreStats {
    pub mappings: usize,
    pub pinned_pages: u64,
}
impl IommuStore {
    pub fn new(_c: StoreConfig) -> Self {
        Self::default()
    }
    pub fn map_dma(&self, iova: u64, size: u64, perm: Perm, _b: Backing) -> Result<(), StoreError> {
        self.maps.lock().unwrap().insert(
            iova,
            M {
                size,
                perm,
                base: 0,
                mem: vec![0u8; size as usize + 4096].into_boxed_slice(),
            },
        );
        Ok(())
    }
    fn with<R>(
        &self,
        iova: u64,
        len: u64,
        f: impl FnOnce(&mut M, usize) -> R,
    ) -> Result<R, StoreError> {
        let mut g = self.maps.lock().unwrap();
        let (b, m) = g
            .range_mut(..=iova)
            .next_back()
            .ok_or(StoreError::Invalid)?;
        if iova - b + len > m.size {
            return Err(StoreError::Invalid);
        }
        let base = (4096 - (m.mem.as_ptr() as usize % 4096)) % 4096;
        let off = (iova - b) as usize + base + m.base;
        Ok(f(m, off))
    }
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.with(iova, buf.len() as u64, |m, o| {
            buf.copy_from_slice(&m.mem[o..o + buf.len()])
        })
    }
    pub fn write(&self, iova: u64, d: &[u8]) -> Result<(), StoreError> {
        self.with(iova, d.len() as u64, |m, o| {
            m.mem[o..o + d.len()].copy_from_slice(d)
        })
    }
    pub fn pin(&self, iova: u64, n: usize, perm: Perm) -> Result<PinnedPages, StoreError> {
        if n == 0 || n > 512 {
            return Err(StoreError::Invalid);
        }
        let pages = self.with(iova, n as u64 * PAGE_SIZE, |m, o| {
            if perm.write && !m.perm.write {
                return Err(StoreError::Perm);
            }
            Ok((0..n)
                .map(|i| PinnedPage {
                    iova: iova + i as u64 * PAGE_SIZE,
                    host_addr: m.mem.as_ptr() as u64 + (o + i * 4096) as u64,
                    storage_key: 0,
                    writable: m.perm.write,
                })
                .collect::<Vec<_>>())
        })??;
        *self.pins.lock().unwrap() += n as u64;
        Ok(PinnedPages {
            pages,
            pins: self.pins.clone(),
        })
    }
    pub fn register_unmap_listener(&self, _l: std::sync::Weak<dyn UnmapListener>) {}
    pub fn unmap_dma(&self, iova: u64, _size: u64, _all: bool) -> Result<u64, StoreError> {
        Ok(self
            .maps
            .lock()
            .unwrap()
            .remove(&iova)
            .map(|m| m.size)
            .unwrap_or(0))
    }
    pub fn set_storage_key(&self, _iova: u64, _key: u8) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            mappings: self.maps.lock().unwrap().len(),
            pinned_pages: *self.pins.lock().unwrap(),
        }
    }
}
